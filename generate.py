"""Sample music from a run or a released MusicGen model, continue an audio file, export a run to AudioCraft.

    python generate.py --run=SIG --prompt="lofi piano, rain" --duration=10 --out=out.wav
    python generate.py --run=runs/xps/SIG --prompts=prompts.txt --out=samples/ --batch_size=8
    python generate.py --run=//reference/musicgen-small --prompt="80s synth pop" --duration=60 --out=long.flac
    python generate.py --run=SIG --audio_prompt=intro.wav --prompt_duration=3 --duration=15 --out=more.wav
    python generate.py --run=//reference/musicgen-melody --prompt="80s synth pop" --melody=tune.wav --out=pop.wav
    python generate.py export SIG out/my-musicgen         # state_dict.bin + compression_state_dict.bin

--run is a run signature (under the team's runs directory, or --runs_dir), a run directory (config.json +
checkpoint.pt: its best EMA state), one checkpoint file, or an AudioCraft export directory (state_dict.bin +
compression_state_dict.bin, e.g. the released musicgen-small) whose T5 comes from //reference/<its t5 name> or
--t5=PATH. A prompts file holds one description per line, generated --batch_size at a time. Longer than the
model's context (the segment duration it was trained on, 30 s for the released models), generation slides a
window: each new window starts from the last (context - extend_stride) seconds of the previous one, as
AudioCraft's extend_stride does. Every file gets a .json beside it with the prompt, every setting and the
command that regenerates it (the same audio on the same device and torch version). The prompt at index i draws
its randomness from seed + i alone (its `row_seed`), so `--prompt=THAT --seed=ROW_SEED` regenerates one file of
a batch by itself, at any --batch_size: the same codes (decoding a different batch may round the audio
differently, by a 16-bit step). train.py's generate stage samples with the same sampler (model.sample) and row
seeds seed + epoch + i, so its sample i of an epoch is `--prompt=THAT --seed=SEED+EPOCH+i` here (same dtype).

Long runs: SIGTERM, SIGUSR1 or Ctrl-C stop between two decode steps; the files already written stay (each wav
with its .json: a file is written whole or not at all) and the exit status is 75. Running the same command again
makes only the missing files: an output whose .json records the same settings (prompt, row seed, sampling,
duration, weights file, device, dtype, torch) is kept; without --seed, a partly made set takes up the seed of its
files, and a complete set is made afresh with a new random seed.

Options (--key=value): --duration (s, 10) --out (a .wav/.flac file, or a directory) --cfg_coef --top_k --top_p
--temperature (default: the run's settings) --seed (default: random, printed and saved; 0 to 2**63-1)
--batch_size (8) --device (cuda, then mps, then cpu) --dtype (float32 | bfloat16 | float16 autocast; bfloat16 on
CUDA) --compile (the decode-and-sample step compiled, CUDA graphs on a GPU; default: on CUDA only, as compiling
costs a CPU ~20-45 s) --audio_prompt=FILE --prompt_duration (s of it, 3; resampled to the codec's rate)
--extend_stride (s, 0.6 x the context) --normalize (loudness: -headroom_db LUFS, 14 | peak: -headroom_db dBFS, 1 |
none; never above -1 dBFS) --t5=PATH --codec=PATH (instead of the run's) --runs_dir --quantize (int8 | int4:
weight-only quantized decoding, quantize.py; fewer bytes per step for some loss of fidelity, see BENCHMARKS.md).

Melody models (config/melody.py, the released musicgen-melody) follow --melody=FILE, as AudioCraft's
generate_with_chroma: the file (mono, resampled to 32 kHz, at least 0.51 s) becomes its chroma (melody.py: drums and
bass removed by Demucs when the model's chroma_stems names its weights; --chroma_stems=PATH or "" to change that),
which loops or is trimmed to the model's context; a piece longer than one window follows the melody on, looping
it. Every prompt follows the same melody; without --melody a melody model plays without one.

Export writes AudioCraft's layout, so `audiocraft.models.MusicGen.get_pretrained(OUT_DIR)` loads the model and
`python generate.py --run=OUT_DIR` samples it: the LM's best EMA state with its xp.cfg, and the codec. AudioCraft
conditions released-style models on T5: a model trained here with conditioner=t5 means the same thing there. A
model with our lookup-table conditioner (conditioner=lut) exports with that conditioner's weights and settings,
which nanomusicgen reloads exactly; AudioCraft loads it only with lut_layers=0, and then tokenizes text its own
way, so its text conditioning is meaningless there. A model trained with mask_memory=True (config/debug.py) masks
padded text positions, which AudioCraft cannot: its logits there equal ours for one prompt at a time but differ on
the padded rows of a batch of prompts of different lengths. Export prints each such difference in a `note:` line
and records it in xp.cfg (nanomusicgen.audiocraft_differences). AudioCraft's MusicGen asserts that its default
extend_stride (18 s) is shorter than the context, so a context of 18 s or less is written as 30 s in xp.cfg
(generate.py keeps the true one). formats.py reads and writes these files.
"""
import json
import math
import os
import random
import shlex
import sys
import time
from pathlib import Path

import torch

import data
import env
import formats
import melody
import model as lm_lib
import quantize
from env import UserError, resolve_path
from formats import SAMPLING_DEFAULTS, MusicGen, load  # noqa: F401  (runs and exports are read in formats.py)

DTYPES = lm_lib.DTYPES      # the one table of precisions (--dtype)


# ----------------------------------------------------------------------------------------------------------
# Sampling: model.sample does the work; here progress, stop checks and the files

class Progress:
    """model.sample's on_step: prints steps/s and the speed against real time (in place on a terminal, a line every
    10 s in a log), and stops at a stop signal (env.check_stop: SIGTERM, SIGUSR1, Ctrl-C) between two steps."""

    def __init__(self, label, audio_seconds, enabled=True):
        self.label, self.audio, self.enabled, self.tty = label, audio_seconds, enabled, sys.stdout.isatty()
        self.steps, self.total, self.t0 = 0, 1, time.time()
        self.shown = self.t0   # the first line after one interval: the first steps warm up

    def __call__(self, done, total):
        self.steps, self.total = done, max(total, 1)
        now = time.time()
        if self.enabled and now - self.shown >= (0.5 if self.tty else 10.0):
            self.shown = now
            print(self.line(now), end="\r" if self.tty else "\n", flush=True)
        env.check_stop()

    def line(self, now=None):
        dt = max((now or time.time()) - self.t0, 1e-9)
        done = self.audio * min(self.steps / self.total, 1.0)
        eta = dt * (self.total - self.steps) / max(self.steps, 1)
        return (f"{self.label} | step {self.steps}/{self.total} | {self.steps / dt:.1f} steps/s | "
                f"{done / dt:.2f}x real time | eta {eta:.0f}s   ")


def read_prompt_audio(path, seconds, codec):
    """The first `seconds` of an audio file at the codec's rate and channels: wav [C, S] float32."""
    try:
        wav = data.read_audio(resolve_path(path), 0.0, seconds, sample_rate=codec.sample_rate,
                              channels=codec.channels)
    except data.BadFile as e:
        raise UserError(f"--audio_prompt={path}: {e}") from None
    return torch.from_numpy(wav)


def available_memory(device):
    """Bytes that can still be allocated on device (a GPU: free memory; the host: MemAvailable), or None."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
    return None


def memory_needed(mg, batch, n_frames, text_len, dtype, device):
    """Rough peak bytes of one batch -> (on device, on the host): the KV cache of one window (with CFG's rows),
    the codes (generated, the windows' pieces and their concatenation), the decoded audio; on the host the audio
    again, and per file the loudness analysis (float64, its FFT) and the encoded file."""
    steps = lm_lib.generation_steps(mg.lm_cfg, mg.lm.delays, min(n_frames, mg.window), 0)[1]
    cache = lm_lib.cache_bytes(mg.lm_cfg, 2 * batch, steps, text_len, 4 if dtype == "float32" else 2)
    samples = n_frames * mg.codec.hop * mg.codec.channels
    on_device = cache + 3 * batch * mg.lm_cfg.n_q * n_frames * 8 + batch * samples * 4
    host = batch * samples * 4 + samples * 48
    return (on_device, host) if device.type != "cpu" else (0, on_device + host)


def check_memory(o, mg, batch, n_frames, text_len, dtype, device):
    """Refuse, before sampling, a --duration x --batch_size that cannot fit, with the numbers and what to lower."""
    lower = "lower --duration" + (" or --batch_size" if batch > 1 else "")
    for need, where in zip(memory_needed(mg, batch, n_frames, text_len, dtype, device), (device, torch.device("cpu"))):
        free = available_memory(where) if need else None
        if free is not None and need > free:
            raise UserError(f"--duration={o['duration']:g} s for a batch of {batch}: needs about {need / 2 ** 30:.3g} "
                            f"GiB of {'host' if where.type == 'cpu' else where} memory, {free / 2 ** 30:.3g} GiB are "
                            f"free: {lower}")


def stat_identity(path):
    """A file's identity for the resume check: its size and modification time (a checkpoint.pt that a running job
    rewrites is other weights)."""
    try:
        st = Path(path).stat()
        return f"{st.st_size}:{st.st_mtime_ns}"
    except (OSError, TypeError, ValueError):
        return None


# What makes a file: a .json beside an output with these values (and the same row_seed) is that output, and a
# re-run of the same command skips it. The batch, the batch size and timings are not among them: a row's codes
# do not depend on its batch.
OUTPUT_KEYS = ("prompt", "row_seed", "cfg_coef", "top_k", "top_p", "temperature", "frames", "extend_stride",
               "audio_prompt", "audio_prompt_file", "prompt_duration", "melody", "melody_file", "chroma_stems",
               "normalize", "headroom_db", "source", "source_file", "weights", "codec_source", "dtype", "device",
               "compile", "quantize", "torch")


def read_previous(paths):
    """{index: .json of an output whose wav and json both exist} (unreadable ones are simply made again)."""
    found = {}
    for i, path in enumerate(paths):
        meta_path = path.with_suffix(".json")
        if path.is_file() and meta_path.is_file():
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(meta, dict):
                found[i] = meta
    return found


def resume(previous, wanted, seed, n):
    """-> (seed, indices already made). previous: read_previous(); wanted(i, seed): the OUTPUT_KEYS values of
    output i. With --seed, the outputs that match are kept. Without, a partial set that matches under one seed is
    an interrupted run of the same command: its seed is taken up and the set completed; otherwise (nothing there,
    or a complete set) a new random seed is drawn and every file made afresh."""
    same = lambda i, s: all(previous[i].get(k) == v for k, v in wanted(i, s).items())  # noqa: E731
    if seed is None:
        seeds = {m.get("seed") for i, m in previous.items()
                 if isinstance(m.get("seed"), int) and not isinstance(m.get("seed"), bool) and same(i, m["seed"])}
        matching = [i for i, m in previous.items() if m.get("seed") in seeds]
        if len(seeds) == 1 and len(matching) < n:
            return seeds.pop(), matching
        return random.SystemRandom().randrange(2 ** 31), []
    return seed, [i for i in previous if same(i, seed)]


def write_output(path, audio, sample_rate, meta, advice):
    """The wav (or flac) and its .json, each written atomically; a .json that cannot be written takes its wav
    with it, so an output is both files or neither."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"could not create {path.parent}: {e.strerror or e}{advice}") from None
    env.write_atomic(path, lambda f: f.write(data.audio_bytes(audio, sample_rate, path.suffix)), advice)
    try:
        env.write_atomic(path.with_suffix(".json"),
                         lambda f: f.write((json.dumps(meta, indent=1, allow_nan=False) + "\n").encode()), advice)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------------------------------------
# Command line

OPTIONS = {  # env.parse_options' schema: key: default, or (type, None) for "of this type, default None"
    "run": (str, None), "prompt": (str, None), "prompts": (str, None), "duration": 10.0, "out": "out.wav",
    "cfg_coef": (float, None), "top_k": (int, None), "top_p": (float, None), "temperature": (float, None),
    "seed": (int, None), "batch_size": 8, "device": (str, None), "dtype": (str, None), "compile": (bool, None),
    "audio_prompt": (str, None), "prompt_duration": 3.0, "t5": (str, None), "codec": (str, None),
    "melody": (str, None), "chroma_stems": (str, None),
    "extend_stride": (float, None), "normalize": "loudness", "headroom_db": (float, None), "runs_dir": (str, None),
    "quantize": "",
}
USAGE = "python generate.py --run=RUN [--key=value ...] (python generate.py --help)"


def parse_options(argv):
    """--key=value pairs -> {key: typed value}: env.parse_options, the wording of every entry point."""
    return env.parse_options(argv, OPTIONS, usage=USAGE)[1]


def check_sampling(values, where="--"):
    """cfg_coef, top_k, top_p, temperature (None: the run's), from the command line or from the run."""
    rules = (("cfg_coef", lambda v: math.isfinite(v), "must be a finite number"),
             ("top_k", lambda v: v >= 0, "must be >= 0 (0: no top-k)"),
             ("top_p", lambda v: 0 <= v <= 1, "must be between 0 and 1"),
             ("temperature", lambda v: 0 <= v < math.inf, "must be a finite number >= 0 (0: greedy)"))
    for key, ok, rule in rules:
        if values[key] is not None and not ok(values[key]):
            raise UserError(f"{where}{key}={values[key]}: {rule}")


def check_options(o):
    """Everything that can be checked before loading a model."""
    if not o["run"]:
        raise UserError("--run is required: a run signature, a run directory or an AudioCraft export directory")
    if o["prompt"] is not None and o["prompts"] is not None:
        raise UserError("give --prompt or --prompts, not both")
    positive = lambda v: 0 < v < math.inf  # noqa: E731
    for key, ok, rule in (("duration", positive(o["duration"]), "must be positive (seconds)"),
                          ("prompt_duration", positive(o["prompt_duration"]), "must be positive (seconds)"),
                          ("batch_size", o["batch_size"] >= 1, "must be at least 1"),
                          ("extend_stride", o["extend_stride"] is None or positive(o["extend_stride"]),
                           "must be positive (seconds)"),
                          ("headroom_db", o["headroom_db"] is None or 0 <= o["headroom_db"] < math.inf,
                           "must be a finite number of dB >= 0"),
                          ("seed", o["seed"] is None or 0 <= o["seed"] <= lm_lib.MAX_SEED,
                           f"must be between 0 and {lm_lib.MAX_SEED}")):
        if not ok:
            raise UserError(f"--{key}={o[key]}: {rule}")
    check_sampling(o)
    if o["audio_prompt"] is not None and not resolve_path(o["audio_prompt"]).is_file():
        raise UserError(f"--audio_prompt={o['audio_prompt']}: no such file")
    if o["normalize"] not in ("loudness", "peak", "none"):
        raise UserError(f"--normalize={o['normalize']}: expected loudness, peak or none")
    if o["dtype"] is not None and o["dtype"] not in DTYPES:
        raise UserError(f"--dtype={o['dtype']}: expected one of {', '.join(DTYPES)}")
    if o["quantize"] not in ("",) + quantize.MODES:
        raise UserError(f"--quantize={o['quantize']}: expected {' or '.join(quantize.MODES)} (or leave it out: float "
                        "weights)")
    suffix = Path(o["out"]).suffix.lower()
    if suffix and suffix not in (".wav", ".flac"):
        raise UserError(f"--out={o['out']}: write a .wav or .flac file, or name a directory")
    env.resolve_device(o["device"])   # the one place a device is picked and checked (meta, a missing GPU)


def read_prompts(o):
    """-> descriptions (None: unconditional). A prompts file: one per line, blank lines skipped."""
    if o["prompts"] is None:
        return [o["prompt"] or None]
    path = resolve_path(o["prompts"])
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--prompts={o['prompts']}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise UserError(f"--prompts={o['prompts']}: no prompts in the file (one description per line)")
    return prompts


def output_paths(out, n):
    """--out: a .wav/.flac file (numbered name_000.wav... for several prompts) or a directory of 000.wav..."""
    out = Path(os.path.expanduser(out))
    if out.suffix.lower() in (".wav", ".flac"):
        return [out] if n == 1 else [out.with_name(f"{out.stem}_{i:03d}{out.suffix}") for i in range(n)]
    return [out / f"{i:03d}.wav" for i in range(n)]


def check_outputs(out, paths):
    """Before any work: every output (and its .json) is a regular file or nothing yet, and the nearest existing
    folder above it is a folder."""
    for path in paths:
        for file in (path, path.with_suffix(".json")):
            if file.exists() and not file.is_file():
                raise UserError(f"--out={out}: {file} exists and is not a file (a directory?): remove it or choose "
                                f"another --out")
        folder = path.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir():
            raise UserError(f"--out={out}: {folder} is a file, not a directory: remove it or choose another --out")


def generate_main(o):
    check_options(o)
    descriptions = read_prompts(o)
    n = len(descriptions)
    if o["seed"] is not None and o["seed"] + n - 1 > lm_lib.MAX_SEED:
        raise UserError(f"--seed={o['seed']}: prompt i draws from seed + i, so with {n} prompts the seed must be at "
                        f"most {lm_lib.MAX_SEED - n + 1}")
    paths = output_paths(o["out"], n)
    check_outputs(o["out"], paths)
    device = env.resolve_device(o["device"])
    dtype = o["dtype"] or ("bfloat16" if device.type == "cuda" else "float32")
    compiled = o["compile"] if o["compile"] is not None else device.type == "cuda"
    if device.type == "cpu":
        env.keep_freed_memory()
    tune = None if o["melody"] is None else melody.read_melody(o["melody"])         # [S] at 32 kHz, checked
    t_load = time.time()
    mg = load(o["run"], o["runs_dir"], o["t5"], o["codec"], device)
    if tune is not None and mg.lm.melody is None:
        raise UserError(f"--melody={o['melody']}: {mg.source} has no melody (chroma) condition, so it cannot follow "
                        f"one: leave --melody out, or use a melody model (config/melody.py, musicgen-melody)")
    stems = None if mg.lm.melody is None else mg.lm.melody.stems if o["chroma_stems"] is None else o["chroma_stems"]
    melody_classes = None if tune is None else melody.chroma_classes(tune[None], melody.CHROMA_RATE, stems)[0]
    if o["quantize"]:   # in place, on the device: the decode step reads 4x (int8) or ~6x (int4) fewer weight bytes
        quantize.quantize(mg.lm, o["quantize"])
    settings = {k: (o[k] if o[k] is not None else mg.defaults[k]) for k in SAMPLING_DEFAULTS}
    check_sampling(settings, f"{mg.source}: ")
    rate = mg.codec.frame_rate
    n_frames = max(1, int(round(o["duration"] * rate)))
    prompt_wav = None if o["audio_prompt"] is None else read_prompt_audio(o["audio_prompt"], o["prompt_duration"],
                                                                          mg.codec)           # [C, S]
    prompt_frames = 0 if prompt_wav is None else -(-prompt_wav.shape[-1] // mg.codec.hop)
    if prompt_frames and not prompt_frames < min(n_frames, mg.window):
        raise UserError(f"the audio prompt ({prompt_frames / rate:g} s) must be shorter than the duration "
                        f"({o['duration']:g} s) and the model's context ({mg.max_duration:g} s): lower --prompt_duration")
    stride = None if o["extend_stride"] is None else int(round(o["extend_stride"] * rate))
    if n_frames > mg.window and stride is not None and not 0 < stride < mg.window:
        raise UserError(f"--extend_stride={o['extend_stride']:g} s: must be at least one frame ({1 / rate:g} s) and "
                        f"shorter than the model's context ({mg.max_duration:g} s)")
    B = min(o["batch_size"], n)
    text_len = max(len((d or "").encode()) for d in descriptions) + 2
    check_memory(o, mg, B, n_frames, text_len, dtype, device)
    stride = lm_lib.window_plan(n_frames, mg.window, stride, prompt_frames)[1]
    print(f"loaded {mg.source} ({mg.weights} weights, {lm_lib.num_params(mg.lm) / 1e6:.2f}M parameters, context "
          f"{mg.max_duration:g} s) and codec {mg.codec_source} in {time.time() - t_load:.1f} s | {device} {dtype}"
          f"{' | compiled decode' if compiled else ''}{f' | {mg.lm.quantized} weights' if o['quantize'] else ''}",
          flush=True)

    resolved = {**o, **settings, "device": str(device), "dtype": dtype, "compile": compiled,
                "extend_stride": round(stride / rate, 6), "chroma_stems": stems if tune is not None else None}
    common = {"frames": n_frames, "audio_prompt_file": stat_identity(resolve_path(o["audio_prompt"]))
              if o["audio_prompt"] else None,
              "melody_file": stat_identity(resolve_path(o["melody"])) if o["melody"] else None,
              "source": str(mg.source), "source_file": stat_identity(mg.source),
              "weights": mg.weights, "codec_source": mg.codec_source, "torch": torch.__version__}

    def wanted(i, seed):
        values = {**resolved, **common, "prompt": descriptions[i], "row_seed": seed + i}
        return {k: values[k] for k in OUTPUT_KEYS}
    seed, done = resume(read_previous(paths), wanted, o["seed"], n)
    todo = [i for i in range(n) if i not in done]
    resolved["seed"] = seed
    command = shlex.join(["python", "generate.py"] + [f"--{k}={v}" for k, v in resolved.items() if v is not None])
    print(f"seed {seed}" + (f" | {len(done)} of {n} files already made with these settings: making the other "
                            f"{len(todo)}" if done else ""), flush=True)
    if not todo:
        print(f"nothing to do: all {n} files exist with these settings (another --seed makes new ones)")
        return 0
    prompt = None if prompt_wav is None else mg.codec.encode(prompt_wav[None].to(device))   # [1, K, T0]
    if compiled:
        lm_lib.compile_decode(mg.lm)
    advice = f"; free some space and run the same command again (with --seed={seed}): finished files are kept"
    batches = [todo[i:i + B] for i in range(0, len(todo), B)]
    written = 0
    try:
        for b, items in enumerate(batches):
            env.check_stop()
            t0 = time.time()
            batch = [descriptions[i] for i in items]
            label = f"batch {b + 1}/{len(batches)}"
            meter = Progress(label, len(items) * (n_frames - prompt_frames) / rate)
            with torch.autocast(device.type, dtype=DTYPES[dtype], enabled=dtype != "float32"):
                codes = lm_lib.sample(mg.lm, batch, n_frames, window=mg.window, stride=stride,
                                      prompt=None if prompt is None else prompt.expand(len(batch), -1, -1),
                                      seeds=[seed + i for i in items], on_step=meter,
                                      melodies=None if tune is None else [melody_classes] * len(batch),
                                      frame_rate=rate, **settings)                          # [b, K, n_frames]
            print(meter.line(), flush=True)
            wav = mg.codec.decode(codes).float().cpu()                                  # [b, C, n_frames * hop]
            seconds = time.time() - t0
            for j, i in enumerate(items):
                audio, gain_db = data.normalize(wav[j], mg.codec.sample_rate, o["normalize"], o["headroom_db"])
                meta = {**resolved, **common, "prompt": descriptions[i], "index": i, "row_seed": seed + i,
                        "batch": b, "file": paths[i].name, "signature": mg.signature,
                        "text_conditioner": mg.conditioner["conditioner"], "max_duration": mg.max_duration,
                        "sample_rate": mg.codec.sample_rate, "prompt_frames": prompt_frames,
                        "gain_db": round(gain_db, 2), "seconds": round(seconds, 2), "command": command}
                write_output(paths[i], audio, mg.codec.sample_rate, meta, advice)
                written += 1
            print(f"{label}: {len(items)} x {n_frames / rate:g} s in {seconds:.1f} s "
                  f"({len(items) * n_frames / rate / seconds:.2f}x real time) -> "
                  f"{', '.join(str(paths[i]) for i in items[:3])}{' ...' if len(items) > 3 else ''}", flush=True)
    except env.Stopped as e:
        print(f"\nstopped by {e} after writing {written} of {len(todo)} files; the same command (or with "
              f"--seed={seed}) makes the rest; exit {env.EXIT_REQUEUE} asks for a requeue", flush=True)
        return env.EXIT_REQUEUE
    return 0


def export_main(argv):
    """python generate.py export [--format=audiocraft|hf|adapters] RUN OUT_DIR: a run (or a model in the other
    format) as AudioCraft's files or as a transformers MusicGen directory (formats.export; an adapter run's adapters
    folded into its base), and what AudioCraft / transformers compute differently for this model, one line each;
    or an adapter run's adapters alone (adapters.pt)."""
    (run, out), o = env.parse_options(argv, formats.EXPORT_OPTIONS, positionals=(2, 2),
                                      usage="python generate.py export RUN OUT_DIR [--format=audiocraft|hf|adapters] "
                                            "[--runs_dir=DIR] [--codec=PATH] [--t5=PATH]")
    mg, written, differences = formats.export(run, out, o["runs_dir"], o["codec"], o["format"], o["t5"])
    if mg is None:
        print(f"exported the adapters of {run}: {written[0]} (the base they need is named inside)")
        return 0
    print(f"exported {mg.source} ({mg.weights} weights, {lm_lib.num_params(mg.lm) / 1e6:.2f}M parameters): "
          + ", ".join(str(p) for p in written))
    if o["format"] == "hf":
        print(f"load it with transformers.MusicgenForConditionalGeneration.from_pretrained('{out}') (and "
              f"AutoProcessor), or python generate.py --run={out}")
    else:
        print(f"load it with audiocraft.models.MusicGen.get_pretrained('{out}') or python generate.py --run={out}")
    for line in differences:
        print(f"note: {line}")
    return 0


def main(argv):
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if argv[0] == "export":
        return export_main(argv[1:])
    return generate_main(parse_options(argv))


if __name__ == "__main__":
    env.install_stop_handlers()   # SIGTERM, SIGUSR1, Ctrl-C: stop between two steps, keep the finished files
    env.cli(main)
