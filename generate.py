"""Sample music from a run or a released MusicGen model, continue an audio file, export a run to AudioCraft.

    python generate.py --run=SIG --prompt="lofi piano, rain" --duration=10 --out=out.wav
    python generate.py --run=runs/xps/SIG --prompts=prompts.txt --out=samples/ --batch_size=8
    python generate.py --run=//reference/musicgen-small --prompt="80s synth pop" --duration=60 --out=long.flac
    python generate.py --run=SIG --audio_prompt=intro.wav --prompt_duration=3 --duration=15 --out=more.wav
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
differently, by a 16-bit step).

Options (--key=value): --duration (s, 10) --out (a .wav/.flac file, or a directory) --cfg_coef --top_k --top_p
--temperature (default: the run's settings) --seed (default: random, printed and saved) --batch_size (8)
--device (cuda when there is one) --dtype (float32 | bfloat16 | float16 autocast; bfloat16 on CUDA)
--audio_prompt=FILE --prompt_duration (s of it, 3; resampled to the codec's rate) --extend_stride (s, 0.6 x the
context) --normalize (loudness: -headroom_db LUFS, 14 | peak: -headroom_db dBFS, 1 | none; never above -1 dBFS)
--t5=PATH --codec=PATH (instead of the run's) --runs_dir.

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
import difflib
import json
import math
import os
import random
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

import data
import env
import formats
import model as lm_lib
from env import UserError, resolve_path
from formats import SAMPLING_DEFAULTS, MusicGen, load  # noqa: F401  (runs and exports are read in formats.py)

DTYPES = lm_lib.DTYPES      # the one table of precisions (--dtype)
PEAK_CEILING_DB = -1.0       # no sample above -1 dBFS after normalisation: no clipping, room for resampling overshoot


# ----------------------------------------------------------------------------------------------------------
# Sampling

class Progress:
    """Counts LM steps through a forward hook on the final norm (one call per step) and prints steps/s and the
    speed against real time: in place on a terminal, a line every 10 s in a log."""

    def __init__(self, label, total_steps, audio_seconds, enabled=True):
        self.label, self.total, self.audio = label, max(total_steps, 1), audio_seconds
        self.enabled, self.tty = enabled, sys.stdout.isatty()
        self.steps, self.t0 = 0, time.time()
        self.shown = self.t0   # the first line after one interval: the first steps warm up

    def hook(self, *_):
        self.steps += 1
        now = time.time()
        if self.enabled and now - self.shown >= (0.5 if self.tty else 10.0):
            self.shown = now
            print(self.line(now), end="\r" if self.tty else "\n", flush=True)

    def line(self, now=None):
        dt = max((now or time.time()) - self.t0, 1e-9)
        done = self.audio * min(self.steps / self.total, 1.0)
        eta = dt * (self.total - self.steps) / max(self.steps, 1)
        return (f"{self.label} | step {self.steps}/{self.total} | {self.steps / dt:.1f} steps/s | "
                f"{done / dt:.2f}x real time | eta {eta:.0f}s   ")


def _steps(lm, n_frames, prompt_frames):
    """LM steps generate() takes for n_frames after a prompt: from the first pattern step holding an unknown
    frame to the end of the layout."""
    tables = lm_lib.pattern_tables(lm.cfg.pattern, lm.cfg.n_q, lm.delays, n_frames, False)
    held = tables.code_step[:, prompt_frames]
    return tables.S - int(held[held < tables.S].min())


@torch.no_grad()
def sample_codes(mg, descriptions, n_frames, prompt=None, cfg_coef=3.0, top_k=250, top_p=0.0, temperature=1.0,
                 generator=None, stride=None, progress=None, seeds=None):
    """descriptions (None or "": unconditional) -> codes [B, K, n_frames], starting with the prompt's codes
    [B, K, T0] unchanged. seeds (one int per description) key each row's randomness (model.keyed_noise), else
    generator draws for the whole batch. Past one window (mg.window frames) a window slides by `stride` frames
    and starts from the previous window's last (window - stride) frames (AudioCraft's extend_stride). progress:
    a label to print steps/s under, or None."""
    lm, window = mg.lm, mg.window
    rate = mg.codec.frame_rate
    T0 = 0 if prompt is None else prompt.shape[-1]
    if not T0 < min(n_frames, window):
        raise UserError(f"the audio prompt ({T0 / rate:g} s) must be shorter than the duration ({n_frames / rate:g} s)"
                        f" and the model's context ({mg.max_duration:g} s): lower --prompt_duration")
    stride = max(1, int(round(0.6 * window))) if stride is None else stride
    if n_frames > window and not 0 < stride < window:
        raise UserError(f"extend_stride={stride / rate:g} s: must be at least one frame ({1 / rate:g} s) and shorter "
                        f"than the model's context ({mg.max_duration:g} s)")
    plan, offset, t0 = [], 0, T0           # (window length, prompt frames) of each window
    while True:
        length = min(n_frames - offset, window)
        plan.append((length, t0))
        if offset + length >= n_frames:
            break
        offset, t0 = offset + stride, length - stride
    descriptions = [d or None for d in descriptions]
    if seeds is not None:
        seeds = torch.as_tensor(seeds, dtype=torch.int64)
    condition, mask = lm.conditioner(descriptions)
    meter = Progress(progress or "", sum(_steps(lm, n, p) for n, p in plan), len(descriptions) * (n_frames - T0)
                     / rate, enabled=progress is not None)
    handle = lm.out_norm.register_forward_hook(meter.hook)
    try:
        pieces = []
        for i, (length, t0) in enumerate(plan):
            meter.label = f"{progress} | window {i + 1}/{len(plan)}" if len(plan) > 1 else progress
            keys = None if seeds is None else lm_lib.mix_seeds(seeds, i) if i else seeds
            codes = lm.generate(condition, mask, length, cfg_coef=cfg_coef, temperature=temperature, top_k=top_k,
                                top_p=top_p, prompt=prompt if t0 else None, generator=generator,
                                seeds=keys)                                              # [B, K, length]
            pieces.append(codes[..., t0:] if pieces else codes)
            prompt = codes[..., stride:]
    finally:
        handle.remove()
    if progress is not None:
        print(meter.line(), flush=True)
    return torch.cat(pieces, -1)


def read_prompt_audio(path, seconds, codec):
    """The first `seconds` of an audio file at the codec's rate and channels: wav [C, S] float32."""
    try:
        wav = data.read_audio(resolve_path(path), 0.0, seconds, sample_rate=codec.sample_rate,
                              channels=codec.channels)
    except data.BadFile as e:
        raise UserError(f"--audio_prompt={path}: {e}") from None
    return torch.from_numpy(wav)


# ----------------------------------------------------------------------------------------------------------
# Normalisation: ITU-R BS.1770 loudness (K-weighted, gated) or peak, and never above PEAK_CEILING_DB

def _k_weighting(n, sample_rate):
    """BS.1770's K-weighting (a +4 dB shelf above ~1.7 kHz, then a ~38 Hz high-pass) as a frequency response on
    the rfft bins of n samples. Bilinear-transform parameters that give the standard's 48 kHz coefficients
    exactly, so other rates get the same curve."""
    z = np.exp(-2j * np.pi * np.fft.rfftfreq(n))           # z^-1 on the unit circle
    K = math.tan(math.pi * 1681.974450955533 / sample_rate)
    Q, Vh = 0.7071752369554196, 10 ** (3.999843853973347 / 20)
    Vb = Vh ** 0.4996667741545416
    shelf = (Vh + Vb * K / Q + K * K + 2 * (K * K - Vh) * z + (Vh - Vb * K / Q + K * K) * z * z) / \
        (1 + K / Q + K * K + 2 * (K * K - 1) * z + (1 - K / Q + K * K) * z * z)
    K, Q = math.tan(math.pi * 38.13547087602444 / sample_rate), 0.5003270373238773
    a0 = 1 + K / Q + K * K
    high_pass = a0 * (1 - z) ** 2 / (a0 + 2 * (K * K - 1) * z + (1 - K / Q + K * K) * z * z)
    return shelf * high_pass


def loudness(wav, sample_rate):
    """Integrated loudness in LUFS of wav [C, S] (channels weighted 1, as BS.1770 does left, right and centre):
    400 ms blocks every 100 ms, absolute gate -70 LUFS, relative gate -10 LU. -inf for silence."""
    x = np.asarray(wav, dtype=np.float64).reshape(-1, np.shape(wav)[-1])
    pad = sample_rate // 2                                 # room for the filters' tails (the FFT wraps around)
    n = x.shape[-1] + pad
    y = np.fft.irfft(np.fft.rfft(x, n) * _k_weighting(n, sample_rate), n)[:, :x.shape[-1]]
    block, hop = int(0.4 * sample_rate), int(0.1 * sample_rate)
    starts = range(0, max(y.shape[-1] - block, 0) + 1, hop)
    power = np.array([(y[:, s:s + block] ** 2).mean(-1).sum() for s in starts])   # [blocks]
    with np.errstate(divide="ignore"):
        lufs = -0.691 + 10 * np.log10(power)
        gated = power[lufs > -70]
        if not len(gated):
            return float("-inf")
        gated = power[(lufs > -70) & (lufs > -0.691 + 10 * np.log10(gated.mean()) - 10)]
        return float(-0.691 + 10 * np.log10(gated.mean()))


def normalize(wav, sample_rate, strategy="loudness", headroom_db=None):
    """wav [C, S] -> (wav, gain_db). loudness: to -headroom_db LUFS (14: AudioCraft's samples); peak: peak at
    -headroom_db dBFS (default 1); none: unchanged. Then, whatever the strategy, lowered so no sample exceeds
    PEAK_CEILING_DB: the file never clips. Silence stays silence."""
    peak = float(wav.abs().max())
    if peak == 0:
        return wav, 0.0
    gain_db = 0.0
    if strategy == "loudness":
        level = loudness(wav.numpy(), sample_rate)
        gain_db = -(14.0 if headroom_db is None else headroom_db) - level if math.isfinite(level) else 0.0
    elif strategy == "peak":
        gain_db = -(1.0 if headroom_db is None else headroom_db) - 20 * math.log10(peak)
    gain_db = min(gain_db, PEAK_CEILING_DB - 20 * math.log10(peak))
    if strategy == "none" and peak <= 1.0:
        gain_db = 0.0
    return wav * 10 ** (gain_db / 20), gain_db


# ----------------------------------------------------------------------------------------------------------
# Command line

OPTIONS = {  # name: (type, default)
    "run": (str, None), "prompt": (str, None), "prompts": (str, None), "duration": (float, 10.0),
    "out": (str, "out.wav"), "cfg_coef": (float, None), "top_k": (int, None), "top_p": (float, None),
    "temperature": (float, None), "seed": (int, None), "batch_size": (int, 8), "device": (str, None),
    "dtype": (str, None), "audio_prompt": (str, None), "prompt_duration": (float, 3.0), "t5": (str, None),
    "codec": (str, None), "extend_stride": (float, None), "normalize": (str, "loudness"),
    "headroom_db": (float, None), "runs_dir": (str, None),
}


def parse_options(args, allowed=OPTIONS):
    """--key=value pairs -> {key: typed value}; unknown keys and bad values name themselves."""
    opts = {k: v[1] for k, v in OPTIONS.items() if k in allowed}
    for arg in args:
        if not arg.startswith("--") or "=" not in arg:
            raise UserError(f"unexpected argument {arg!r}: options are --key=value (python generate.py --help)")
        key, value = arg[2:].split("=", 1)
        if key not in allowed:
            match = difflib.get_close_matches(key, allowed, n=1)
            raise UserError(f"unknown option --{key}" + (f' (did you mean "--{match[0]}"?)' if match else ""))
        kind = OPTIONS[key][0]
        try:
            opts[key] = kind(value)
        except ValueError:
            raise UserError(f"--{key}={value}: not {'an int' if kind is int else 'a number'}") from None
    return opts


def check_options(o):
    """Everything that can be checked before loading a model."""
    if not o["run"]:
        raise UserError("--run is required: a run signature, a run directory or an AudioCraft export directory")
    if o["prompt"] is not None and o["prompts"] is not None:
        raise UserError("give --prompt or --prompts, not both")
    for key, ok, rule in (("duration", 0 < o["duration"] < math.inf, "must be positive (seconds)"),
                          ("prompt_duration", o["prompt_duration"] > 0, "must be positive (seconds)"),
                          ("batch_size", o["batch_size"] >= 1, "must be at least 1"),
                          ("top_k", o["top_k"] is None or o["top_k"] >= 0, "must be >= 0 (0: no top-k)"),
                          ("top_p", o["top_p"] is None or 0 <= o["top_p"] <= 1, "must be between 0 and 1"),
                          ("temperature", o["temperature"] is None or o["temperature"] >= 0,
                           "must be >= 0 (0: greedy)"),
                          ("extend_stride", o["extend_stride"] is None or o["extend_stride"] > 0,
                           "must be positive (seconds)")):
        if not ok:
            raise UserError(f"--{key}={o[key]}: {rule}")
    if o["audio_prompt"] is not None and not resolve_path(o["audio_prompt"]).is_file():
        raise UserError(f"--audio_prompt={o['audio_prompt']}: no such file")
    if o["normalize"] not in ("loudness", "peak", "none"):
        raise UserError(f"--normalize={o['normalize']}: expected loudness, peak or none")
    if o["dtype"] is not None and o["dtype"] not in DTYPES:
        raise UserError(f"--dtype={o['dtype']}: expected one of {', '.join(DTYPES)}")
    suffix = Path(o["out"]).suffix.lower()
    if suffix and suffix not in (".wav", ".flac"):
        raise UserError(f"--out={o['out']}: write a .wav or .flac file, or name a directory")
    if o["device"] is not None:
        try:
            device = torch.device(o["device"])
        except RuntimeError:
            raise UserError(f"--device={o['device']}: not a torch device (cpu, cuda, cuda:1, mps)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device={o['device']}: CUDA is not available on this machine")


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


def generate_main(o):
    check_options(o)
    descriptions = read_prompts(o)
    device = torch.device(o["device"] or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = o["dtype"] or ("bfloat16" if device.type == "cuda" else "float32")
    if device.type == "cpu":
        env.keep_freed_memory()
    seed = o["seed"] if o["seed"] is not None else random.SystemRandom().randrange(2 ** 31)
    t_load = time.time()
    mg = load(o["run"], o["runs_dir"], o["t5"], o["codec"], device)
    settings = {k: (o[k] if o[k] is not None else mg.defaults[k]) for k in SAMPLING_DEFAULTS}
    rate = mg.codec.frame_rate
    n_frames = max(1, int(round(o["duration"] * rate)))
    # AudioCraft's 18 s for its 30 s context
    stride_s = o["extend_stride"] if o["extend_stride"] is not None else round(0.6 * mg.max_duration, 3)
    prompt = None
    if o["audio_prompt"] is not None:
        wav = read_prompt_audio(o["audio_prompt"], o["prompt_duration"], mg.codec)
        prompt = mg.codec.encode(wav[None].to(device))                                # [1, K, T0]
    paths = output_paths(o["out"], len(descriptions))
    print(f"loaded {mg.source} ({mg.weights} weights, {lm_lib.num_params(mg.lm) / 1e6:.2f}M parameters, context "
          f"{mg.max_duration:g} s) and codec {mg.codec_source} in {time.time() - t_load:.1f} s | {device} {dtype} | "
          f"seed {seed}", flush=True)

    resolved = {**o, **settings, "seed": seed, "device": str(device), "dtype": dtype, "extend_stride": stride_s}
    command = shlex.join(["python", "generate.py"] + [f"--{k}={v}" for k, v in resolved.items() if v is not None])
    B = o["batch_size"]
    batches = [range(i, min(i + B, len(descriptions))) for i in range(0, len(descriptions), B)]
    for b, items in enumerate(batches):
        t0 = time.time()
        batch = [descriptions[i] for i in items]
        with torch.autocast(device.type, dtype=DTYPES[dtype], enabled=dtype != "float32"):
            codes = sample_codes(mg, batch, n_frames, None if prompt is None else prompt.expand(len(batch), -1, -1),
                                 seeds=[seed + i for i in items], stride=int(round(stride_s * rate)),
                                 progress=f"batch {b + 1}/{len(batches)}",
                                 **settings)                                             # [b, K, n_frames]
        wav = mg.codec.decode(codes).float().cpu()                                      # [b, C, n_frames * hop]
        seconds = time.time() - t0
        for j, i in enumerate(items):
            audio, gain_db = normalize(wav[j], mg.codec.sample_rate, o["normalize"], o["headroom_db"])
            paths[i].parent.mkdir(parents=True, exist_ok=True)
            data.save_audio(paths[i], audio, mg.codec.sample_rate)
            meta = {**resolved, "prompt": descriptions[i], "index": i, "row_seed": seed + i, "batch": b,
                    "file": paths[i].name,
                    "source": str(mg.source), "weights": mg.weights, "signature": mg.signature,
                    "codec_source": mg.codec_source, "text_conditioner": mg.conditioner["conditioner"],
                    "max_duration": mg.max_duration, "frames": n_frames, "sample_rate": mg.codec.sample_rate,
                    "prompt_frames": 0 if prompt is None else prompt.shape[-1], "gain_db": round(gain_db, 2),
                    "seconds": round(seconds, 2), "torch": torch.__version__, "command": command}
            paths[i].with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
        print(f"batch {b + 1}/{len(batches)}: {len(items)} x {n_frames / rate:g} s in {seconds:.1f} s "
              f"({len(items) * n_frames / rate / seconds:.2f}x real time) -> "
              f"{', '.join(str(paths[i]) for i in items[:3])}{' ...' if len(items) > 3 else ''}", flush=True)
    return 0


def export_main(argv):
    """python generate.py export [--format=audiocraft|hf] RUN OUT_DIR: a run (or a model in the other format) as
    AudioCraft's files or as a transformers MusicGen directory (formats.export), and what AudioCraft / transformers
    compute differently for this model, one line each."""
    (run, out), o = env.parse_options(argv, formats.EXPORT_OPTIONS, positionals=(2, 2),
                                      usage="python generate.py export RUN OUT_DIR [--format=audiocraft|hf] "
                                            "[--runs_dir=DIR] [--codec=PATH] [--t5=PATH]")
    mg, written, differences = formats.export(run, out, o["runs_dir"], o["codec"], o["format"], o["t5"])
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
    env.cli(main)
