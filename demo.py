"""The built-in fixtures: the synthetic demo music set and the small codecs that go with it.

The demo set is procedural music whose descriptions say what the audio is (timbre, register, tempo, mode, drums),
so that a tiny model trained on it for a minute learns to follow the text. The demo codec (`load_codec("demo")`,
assets/demo_codec.bin) is a small EnCodec trained on that set by config/codec_demo.py and shipped, so that the first
command's samples are music; `python demo.py codec` makes it again (33 min on one thread). The debug
codec (`load_codec("debug")`) is a seeded, untrained EnCodec-shaped codec for tests.

    python demo.py set OUT_DIR [--seed=0]          # write the synthetic demo set
    python demo.py codec                           # train the demo codec again: rebuilds assets/demo_codec.bin
    python demo.py measure-codec CODEC             # SI-SNR, mel distance, pitch accuracy on held-out clips
    python demo.py prompts > prompts.txt           # 16 prompts asking for a low register, 16 for a high one
    python generate.py --run=SIG --prompts=prompts.txt --out=reg/ --duration=3 && python demo.py measure-registers reg/
"""
import argparse
import json
import math
import os
import shutil
import time
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from codec import Codec, CodecConfig, run_layers
from data import SPLITS, AudioMeta, _FileLock, _log, save_audio, write_manifest
import env
from env import UserError, cli, write_atomic

# ----------------------------------------------------------------------------------------------------------
# The demo set: procedural music whose descriptions say what the audio is

DEMO_VERSION = 2
DEMO_RATE = 16000      # the demo codec's rate: half the compute of 32 kHz, and every note's harmonics up to 8 kHz
DEMO_SIZES = {"train": 256, "valid": 24, "evaluate": 24, "generate": 8}
DEMO_SECONDS = (4.0, 6.0)
TIMBRES = {"sine": "soft sine wave", "square": "square wave synth", "sawtooth": "bright sawtooth synth",
           "plucked": "plucked string"}
REGISTERS = {"low": 36, "middle": 48, "high": 60}   # lowest tonic (MIDI note) of each register: an octave apart
TEMPOS = {"slow": (60, 80), "moderate": (96, 116), "fast": (132, 160)}
SCALES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10)}
NOTE_NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
PROGRESSIONS = ((0, 3, 4, 0), (0, 5, 3, 4), (0, 4, 5, 3), (5, 3, 0, 4))  # triad roots (scale degrees) per bar
MELODY_DEGREES = (3, 12)   # the melody moves between these scale degrees above the tonic (about an octave and a half)
TEMPLATES = ("A {tempo} {mode} melody on a {instrument} in a {register} register, {bpm} bpm{drums}.",
             "{Instrument}, {tempo} tempo, {key} {mode}, {register} register{drums}.",
             "A {tempo} tune in {key} {mode} played by a {instrument}, {register} register, {bpm} bpm{drums}.")
TABLE = 2048   # samples per wavetable period


def demo_params(rng, split, i):
    """The musical choices of one clip. The generate split walks timbre x register (contrasting prompts)."""
    p = {"timbre": str(rng.choice(list(TIMBRES))), "register": str(rng.choice(list(REGISTERS))),
         "tempo": str(rng.choice(list(TEMPOS))), "mode": str(rng.choice(list(SCALES))),
         "tonic": int(rng.integers(12)), "drums": bool(rng.random() < 0.5)}
    if split == "generate":
        p["timbre"], p["register"] = list(TIMBRES)[i % 4], ("low", "high")[i // 4 % 2]
    lo, hi = TEMPOS[p["tempo"]]
    p["bpm"] = int(rng.integers(lo, hi + 1))
    p["duration"] = round(float(rng.uniform(*DEMO_SECONDS)), 2)
    p["template"] = int(rng.integers(len(TEMPLATES)))
    return p


def demo_score(p, rng):
    """The notes of one clip: {melody: [(onset s, length s, midi)], chords: [(onset, length, (root, third, fifth))],
    beats: [onset]}: a melody that steps around the scale over one triad per bar of four beats."""
    beat, scale = 60 / p["bpm"], SCALES[p["mode"]]
    tonic = REGISTERS[p["register"]] + p["tonic"]

    def pitch(degree):
        octave, step = divmod(degree, 7)
        return tonic + 12 * octave + scale[step]

    melody, t, degree = [], 0.0, 7 + int(rng.integers(3))
    while t < p["duration"]:
        length = beat * float(rng.choice([0.5, 0.5, 1, 1, 1, 2]))
        melody.append((t, length, pitch(degree)))
        degree = int(np.clip(degree + rng.choice([-2, -1, -1, 0, 1, 1, 2, 3, -3]), *MELODY_DEGREES))
        t += length
    progression = PROGRESSIONS[int(rng.integers(len(PROGRESSIONS)))]
    bars = range(math.ceil(p["duration"] / (4 * beat)))
    chords = [(4 * beat * b, 4 * beat, tuple(pitch(progression[b % 4] + k) for k in (0, 2, 4))) for b in bars]
    return {"melody": melody, "chords": chords, "beats": [k * beat for k in range(int(p["duration"] / beat) + 1)]}


@lru_cache(maxsize=None)
def _wavetable(timbre, midi, sr):
    """One period of the timbre at that pitch, its harmonics kept below 0.9 x Nyquist (no aliasing) -> [TABLE]."""
    k = np.arange(1, TABLE // 2)
    f0 = 440 * 2 ** ((midi - 69) / 12)
    if timbre == "sine":
        amp = (k == 1) * 1.0
    elif timbre == "square":      # odd harmonics at 1/k: hollow
        amp = (k % 2 == 1) / k * 0.7 * 4 / np.pi
    elif timbre == "sawtooth":    # every harmonic at 1/k: bright
        amp = 1 / k * 0.7 * 2 / np.pi
    else:                         # plucked: a mellow triangle (odd harmonics at 1/k^2), dying away below
        amp = (k % 2 == 1) * (-1.0) ** ((k - 1) // 2) / k ** 2 * 0.7 * 8 / np.pi ** 2
    amp = np.where(k * f0 < 0.45 * sr, amp, 0.0)
    spectrum = np.zeros(TABLE // 2 + 1, complex)
    spectrum[1:TABLE // 2] = -0.5j * TABLE * amp      # sine series: irfft gives sum_k amp_k sin(2 pi k t)
    return np.fft.irfft(spectrum, TABLE).astype(np.float32)


def _voice(timbre, onsets, lengths, midis, n, sr):
    """Back-to-back notes (onsets and lengths in seconds; midis [notes] or [notes, voices] for chords),
    vectorised over samples -> [n] float32."""
    first = np.minimum((np.asarray(onsets) * sr).astype(np.int64), n)
    counts = np.diff(first, append=n)                                  # samples of each note
    rep = lambda v: np.repeat(np.asarray(v), counts)                   # noqa: E731 (per note -> per sample)
    since = (np.arange(n, dtype=np.float32) - rep(first).astype(np.float32)) / sr   # seconds since the onset
    left = rep(np.asarray(lengths, dtype=np.float32)) - since         # seconds until its end
    note = rep(np.arange(len(first)))                                  # which note each sample belongs to
    x = np.zeros(n, np.float32)
    for midi in np.asarray(midis, dtype=np.float64).reshape(len(first), -1).T:
        tables = np.stack([_wavetable(timbre, float(m), sr) for m in midi])   # [notes, TABLE]
        cycles = rep((440 * 2 ** ((midi - 69) / 12)).astype(np.float32)) * since
        cycles -= np.floor(cycles)                                     # phase in [0, 1) (numpy's % is slow)
        x += tables[note, (cycles * TABLE).astype(np.int64) % TABLE]
    env = np.minimum(1, since / 0.005) * np.clip(left / 0.02, 0, 1)    # no clicks at either end
    if timbre == "plucked":
        env *= np.exp(-since / 0.3)
    return x * env


def render_demo(p, sr=DEMO_RATE, rng=None, score=None):
    """wav [S] float32 of one clip: its score (demo_score, drawn from rng unless given) with optional kick/noise
    drums on the beats."""
    rng = rng or np.random.default_rng(0)
    score = score or demo_score(p, rng)
    n = int(p["duration"] * sr)
    onsets, lengths, midis = zip(*score["melody"])
    wav = 0.5 * _voice(p["timbre"], onsets, lengths, midis, n, sr)
    onsets, lengths, triads = zip(*score["chords"])
    wav += 0.12 * _voice(p["timbre"], onsets, lengths, triads, n, sr)
    if p["drums"]:
        for k, onset in enumerate(score["beats"]):
            a = int(onset * sr)
            m = min(n - a, int(0.15 * sr))
            if m <= 0:
                break
            tt = np.arange(m) / sr
            if k % 2 == 0:  # kick: a falling sine
                hit = np.sin(2 * np.pi * (50 * tt + 2.5 * (1 - np.exp(-tt / 0.025)))) * np.exp(-tt / 0.12)
            else:           # snare-like noise burst
                hit = rng.standard_normal(m) * np.exp(-tt / 0.03) * 0.6
            wav[a:a + m] += 0.45 * hit.astype(np.float32)
    return (wav * (0.8 / max(1e-6, float(np.abs(wav).max())))).astype(np.float32)


def demo_clip(seed, split, i, sr=DEMO_RATE):
    """(params, score, wav) of clip i of a split of the demo set with that seed: what make_demo_set writes."""
    rng = np.random.default_rng([seed, SPLITS.index(split), i])
    p = demo_params(rng, split, i)
    score = demo_score(p, rng)
    return p, score, render_demo(p, sr, rng, score)


def demo_text(p):
    """(description, sidecar dict) of a clip: everything the description says is audible."""
    instrument = TIMBRES[p["timbre"]]
    key = NOTE_NAMES[p["tonic"]]
    words = dict(tempo=p["tempo"], mode=p["mode"], instrument=instrument, register=p["register"], bpm=p["bpm"],
                 key=key, drums=", with drums" if p["drums"] else "", Instrument=instrument.capitalize())
    desc = TEMPLATES[p["template"]].format(**words)
    desc = desc[0].upper() + desc[1:]
    side = {"title": "", "artist": "nanomusicgen demo", "key": f"{key} {p['mode']}", "bpm": p["bpm"],
            "genre": "synthetic", "moods": ["bright" if p["mode"] == "major" else "dark"],
            "keywords": [p["timbre"], p["register"], p["tempo"]] + (["drums"] if p["drums"] else []),
            "description": desc, "name": "", "instrument": p["timbre"]}
    return desc, side


def _demo_complete(root, marker):
    """True when root holds the demo set `marker` describes, every file at its recorded size."""
    try:
        old = json.loads((root / "demo.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if {k: old.get(k) for k in marker} != marker:
        return False
    return all(os.path.isfile(root / rel) and os.path.getsize(root / rel) == size for rel, size in old["files"])


def _ours(root):
    """Whether everything under an existing root was written by make_demo_set (an older or damaged demo set):
    only those may be replaced. An empty directory counts as ours."""
    try:
        listed = {rel for rel, _ in json.loads((root / "demo.json").read_text())["files"]} | {"demo.json"}
    except (OSError, ValueError, KeyError, TypeError):
        listed = set()
    found = {p.relative_to(root).as_posix() for p in root.rglob("*") if not p.is_dir()}
    dirs = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_dir()}
    return found <= listed and dirs <= set(SPLITS)


def _write_demo_set(root, seed, sizes):
    """Every file of the set under root (a new directory) -> the list of (relative path, size)."""
    files = []
    for split in SPLITS:
        d = root / split
        d.mkdir()
        metas = []
        for i in range(sizes.get(split, 0)):
            p, _, wav = demo_clip(seed, split, i)
            desc, side = demo_text(p)
            stem = f"clip_{i:04d}"
            save_audio(d / f"{stem}.wav", wav, DEMO_RATE)
            side.update(title=f"demo {split} {i}", name=stem)
            (d / f"{stem}.json").write_text(json.dumps(side, indent=1) + "\n")
            metas.append(AudioMeta(path=f"{stem}.wav", duration=len(wav) / DEMO_RATE, sample_rate=DEMO_RATE,
                                   amplitude=round(float(np.abs(wav).max()), 4)))
            files += [(f"{split}/{stem}.wav", (d / f"{stem}.wav").stat().st_size),
                      (f"{split}/{stem}.json", (d / f"{stem}.json").stat().st_size)]
        write_manifest(metas, d / "data.jsonl")
        files.append((f"{split}/data.jsonl", (d / "data.jsonl").stat().st_size))
    return files


def dataset_dir(dataset, runs_dir=None):
    """A dataset setting -> its directory: "demo" is the built-in set, written once under <runs_dir>/data/demo (the
    team's runs directory by default) and shared by train.py, train_codec.py, evaluate.py and bench.py; any other
    value is returned as given."""
    if dataset != "demo":
        return dataset
    return str(make_demo_set(Path(runs_dir or env.get_env().runs_dir) / "data" / "demo", seed=0))


def make_demo_set(root, seed=0, sizes=None):
    """Write the synthetic demo set under root (<root>/<split>/data.jsonl, clip_NNNN.wav + .json beside it);
    deterministic from the seed. Returns root.

    A complete set is reused as it is. Otherwise the set is written into a new directory beside root and renamed
    into place, so that a crash or a full disk leaves either the old directory or the new one, never half of one.
    It replaces only what it wrote itself (an older or damaged demo set, or an empty directory): a directory
    holding anything else is refused."""
    root = Path(root).expanduser().absolute()
    sizes = dict(sizes or DEMO_SIZES)
    marker = {"version": DEMO_VERSION, "seed": seed, "sizes": sizes}
    if _demo_complete(root, marker):
        return root
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"demo set {root}: cannot create {root.parent} ({e.strerror or e})") from None
    with _FileLock(root.parent / f".{root.name}.lock"):  # ranks and parallel runs: one builds, the others reuse
        if _demo_complete(root, marker):
            return root
        if root.exists() and not (root.is_dir() and _ours(root)):
            raise UserError(f"demo set {root}: the path holds files the demo set did not write; "
                            f"choose a new or empty directory")
        for stale in root.parent.glob(f".{root.name}.tmp*"):  # a killed build's (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        t0, tmp = time.time(), root.parent / f".{root.name}.tmp{os.getpid()}"
        try:
            tmp.mkdir()
            files = _write_demo_set(tmp, seed, sizes)
            text = json.dumps(dict(marker, files=files)) + "\n"
            write_atomic(tmp / "demo.json", lambda f: f.write(text.encode()))
            if root.exists():  # ours (checked above): moved aside, then removed once the new set is in place
                root.rename(tmp.with_name(tmp.name + ".old"))
            tmp.rename(root)
        except (OSError, UserError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).split(": ")[-1]
            raise UserError(f"could not write the demo set to {root}: {reason}; nothing was left behind "
                            f"(free some space and run again)") from None
        shutil.rmtree(tmp.with_name(tmp.name + ".old"), ignore_errors=True)
        _log(f"data: demo set ({sum(sizes.values())} clips, seed {seed}) written to {root} in {time.time() - t0:.1f} s")
    return root

# ----------------------------------------------------------------------------------------------------------
# The debug codec: seeded weights, codebooks fitted by k-means on a fixed synthetic signal

def _hash_uniform(n, seed):
    """n floats in [-1, 1) from integer hashing (splitmix64): identical on every machine and library version."""
    with np.errstate(over="ignore"):
        z = np.arange(n, dtype=np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(40)).astype(np.float64) / 2.0 ** 23 - 1.0


def _debug_signal(seconds=48, sr=32000, seed=1):
    """Half-second segments: notes and chords over five octaves in four timbres, noise hits, silence."""
    u = (_hash_uniform(8 * seconds * 2, seed) + 1) / 2   # [0, 1) control values, 8 per segment
    t = np.arange(sr // 2) / sr
    env = np.minimum(1, t / 0.01) * np.exp(-t * 2.0)
    out = []
    for i in range(seconds * 2):
        c = u[8 * i:8 * i + 8]
        kind = int(c[0] * 10)
        if kind == 0:
            seg = np.zeros_like(t)
        elif kind == 1:   # a drum-like hit: hashed noise under a fast decay
            seg = _hash_uniform(len(t), seed + 100 + i) * np.exp(-t * (10 + 40 * c[1]))
        else:
            seg, timbre = np.zeros_like(t), int(c[6] * 4)
            for n in range(1 + int(c[2] * 3)):   # 1 to 3 notes
                phase = (440.0 * 2 ** ((36 + int(c[3 + n] * 60) - 69) / 12) * t) % 1.0
                seg += (np.sin(2 * np.pi * phase) if timbre == 0 else 2 * phase - 1 if timbre == 1 else
                        np.where(phase < 0.5, 1.0, -1.0) if timbre == 2 else 4 * np.abs(phase - 0.5) - 1)
            seg *= env
        out.append(seg / (np.abs(seg).max() + 1e-9) * (0.05 + 0.85 * c[7]))
    return np.concatenate(out)


def _kmeans(x, k, iters, seed):
    """Lloyd's algorithm from k deterministic distinct starting points; empty clusters keep their centroid."""
    order = np.argsort(_hash_uniform(len(x), seed), kind="stable")
    centroids = x[torch.from_numpy(order[:k])].clone()

    def nearest():
        return (centroids.pow(2).sum(1)[None] - 2 * x @ centroids.T).argmin(1)

    for _ in range(iters):
        assign = nearest()
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None].to(x.dtype)
    return centroids, nearest()


@lru_cache(maxsize=1)
def _debug_state(seed=1234):
    """Hashed random weights, then codebooks fitted by k-means on the encoding of a synthetic signal, each
    stage on the residual of the stages before it; in float64, so that they do not depend on the machine's
    float32 kernels. (Fitting the last conv to the signal's note labels instead made codes tell notes apart
    less well.)"""
    cfg = CodecConfig.debug()
    codec = Codec(cfg).double()
    state = codec.state_dict()
    for offset, (name, t) in enumerate(state.items()):
        if t.dim() == 3:    # conv weights: variance 1 / fan_in
            bound = math.sqrt(3.0 / (t.shape[1] * t.shape[2]))
        else:               # LSTM as torch initialises it, small conv biases
            bound = 1.0 / math.sqrt(t.shape[-1] if t.dim() == 2 else t.shape[0] // 4) if "lstm" in name else 0.1
        t.copy_(torch.from_numpy(_hash_uniform(t.numel(), seed + offset).reshape(t.shape)) * bound)
    wav = torch.from_numpy(_debug_signal(sr=cfg.sample_rate))[None, None]
    with torch.no_grad():
        res = run_layers(codec.encoder, wav)
    res, books = res[0].T, []   # [frames, dim]
    for q in range(cfg.n_q):
        centroids, assign = _kmeans(res, cfg.card, 10, seed + 1000 + q)
        books.append(centroids)
        res = res - centroids[assign]
    state["codebooks"] = torch.stack(books)
    return cfg, {k: v.float() for k, v in state.items()}


def debug_codec_state():
    """(CodecConfig, state dict) of the debug codec; built once per process (~1 s)."""
    cfg, state = _debug_state()
    return CodecConfig(**asdict(cfg)), state


# ----------------------------------------------------------------------------------------------------------
# The demo codec: trained on the demo set by config/codec_demo.py, shipped as assets/demo_codec.bin

DEMO_CODEC = Path(__file__).resolve().parent / "assets" / "demo_codec.bin"
DEMO_CODEC_CONFIG = Path(__file__).resolve().parent / "config" / "codec_demo.py"
DEMO_CODEC_THREADS = 1   # CPU results depend on the thread count: pinned, so that the same command gives the same bits


def build_demo_codec(extra=()):
    """Train the demo codec (config/codec_demo.py on the CPU, DEMO_CODEC_THREADS threads) and export it to
    assets/demo_codec.bin in AudioCraft's compression_state_dict.bin layout. The shipped file is one full build by
    this function; two builds agree bit for bit (tested at a reduced size: one thread, the same seeds). A full
    rebuild of the file shipped before it gave other bits, because the training code had changed since. -> its path."""
    import train_codec
    from formats import export_audiocraft_codec, load_codec
    threads = torch.get_num_threads()
    torch.set_num_threads(DEMO_CODEC_THREADS)
    try:
        code = train_codec.main([str(DEMO_CODEC_CONFIG), "--device=cpu", *extra])
    finally:
        torch.set_num_threads(threads)
    if code:
        raise UserError(f"training the demo codec stopped (exit {code}); run the same command again to resume it")
    cfg = env.parse_config(train_codec.Config, [str(DEMO_CODEC_CONFIG), *extra])
    run = env.run_dir(train_codec.config_signature(cfg), cfg.runs_dir or None)
    return export_audiocraft_codec(load_codec(run), DEMO_CODEC)


# ----------------------------------------------------------------------------------------------------------
# Measuring what the demo promises: the codec keeps pitch and timbre; the LM follows the register it is asked for

def midi_of(hz):
    return 69 + 12 * np.log2(np.maximum(hz, 1e-9) / 440)


def fundamental(wav, sr, lo=50.0, hi=2500.0):
    """The frequency (Hz) of the strongest spectral peak between lo and hi, refined by a parabola through the log
    magnitudes around it. For the demo's timbres (harmonics at 1/k or 1/k^2) under a melody 12 dB above each chord
    voice, that is the melody note's fundamental."""
    n = max(1 << 15, 1 << math.ceil(math.log2(len(wav))))
    spec = np.log(np.abs(np.fft.rfft(wav * np.hanning(len(wav)), n)) + 1e-12)
    a, b = int(lo * n / sr), int(hi * n / sr)
    k = a + int(spec[a:b].argmax())
    left, mid, right = spec[k - 1], spec[k], spec[k + 1]
    offset = 0.5 * (left - right) / (left - 2 * mid + right) if left - 2 * mid + right < 0 else 0.0
    return (k + offset) * sr / n


def melody_pitch_errors(wav, original, score, sr, min_length=0.15):
    """Per sustained melody note (at least min_length s): the error in semitones of the fundamental of `wav` (a
    reconstruction) against the score, for the notes whose fundamental the estimator finds in `original` (within
    half a semitone): notes masked by the accompaniment or drums are left out, not counted as codec errors."""
    errors = []
    for onset, length, midi in score["melody"]:
        a, b = int((onset + 0.04) * sr), int((onset + length - 0.03) * sr)
        if (b - a) < min_length * sr or b > len(original):
            continue
        if abs(midi_of(fundamental(original[a:b], sr)) - midi) > 0.5:
            continue
        errors.append(float(midi_of(fundamental(wav[a:b], sr)) - midi))
    return errors


@torch.no_grad()
def measure_codec(codec, seed=0, split="evaluate", count=DEMO_SIZES["evaluate"]):
    """What a codec does to held-out demo clips (the evaluate split, which neither codec nor LM trains on):
    {sisnr (dB), mel (distance), pitch (fraction of sustained melody notes within a semitone), notes, clips}."""
    from train_codec import mel_distance, si_snr   # the trainer's metrics; imported here: it imports train.py
    sisnr, mel, errors = [], [], []
    for i in range(count):
        _, score, wav = demo_clip(seed, split, i, codec.sample_rate)
        x = torch.from_numpy(wav)[None, None]
        y = codec.decode(codec.encode(x))[..., :x.shape[-1]].float()
        sisnr.append(float(si_snr(y, x)))
        mel.append(float(mel_distance(y, x, codec.sample_rate)))
        errors += melody_pitch_errors(y[0, 0].numpy(), wav, score, codec.sample_rate)
    errors = np.abs(errors)
    return {"sisnr": float(np.mean(sisnr)), "mel": float(np.mean(mel)), "pitch": float(np.mean(errors < 1.0)),
            "pitch_median_error": float(np.median(errors)), "notes": len(errors), "clips": count}


def median_pitch(wav, sr, frame=0.1):
    """The median fundamental (MIDI) of a recording's louder frames (above a tenth of the loudest frame's energy)."""
    n = int(frame * sr)
    frames = [wav[a:a + n] for a in range(0, len(wav) - n + 1, n // 2)]
    energy = np.array([float(np.square(f).sum()) for f in frames])
    loud = [f for f, e in zip(frames, energy) if e > 0.1 * energy.max()]
    return float(np.median([midi_of(fundamental(f, sr)) for f in loud])) if loud else float("nan")


def register_prompts():
    """32 prompts in the demo set's words: each timbre x tempo (slow, fast) x mode, in a low and a high register."""
    prompts = []
    for register in ("low", "high"):
        for timbre in TIMBRES:
            for tempo in ("slow", "fast"):
                for mode in SCALES:
                    bpm = sum(TEMPOS[tempo]) // 2
                    prompts.append(TEMPLATES[0].format(tempo=tempo, mode=mode, instrument=TIMBRES[timbre],
                                                       register=register, bpm=bpm, drums="").capitalize())
    return prompts


def measure_registers(directory):
    """Samples (NNN.wav + NNN.json with their description, as the generate stage and generate.py write them) asked
    for a "low register" or a "high register": their median pitches -> {low, high (MIDI, per sample), gap (mean high
    minus mean low, semitones), ordered (fraction of (high, low) pairs where the high one is higher)}."""
    import soundfile as sf
    pitches = {"low": [], "high": []}
    for meta_path in sorted(Path(directory).glob("*.json")):
        meta = json.loads(meta_path.read_text())
        text = (meta.get("description") or meta.get("prompt") or "").lower()
        register = next((r for r in pitches if f"{r} register" in text), None)
        if register is None or not meta_path.with_suffix(".wav").is_file():
            continue
        wav, sr = sf.read(meta_path.with_suffix(".wav"), dtype="float32", always_2d=True)
        pitches[register].append(median_pitch(wav.mean(1), sr))
    low, high = pitches["low"], pitches["high"]
    if not low or not high:
        raise UserError(f"{directory}: needs samples whose descriptions ask for a low register and a high register")
    ordered = np.mean([h > lo for h in high for lo in low])
    return {"low": low, "high": high, "gap": float(np.mean(high) - np.mean(low)), "ordered": float(ordered)}


# ----------------------------------------------------------------------------------------------------------
# Command line

def main(argv):
    parser = argparse.ArgumentParser(prog="demo.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("set", help="write the synthetic demo set")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    sub.add_parser("codec", help="train the demo codec (config/codec_demo.py) and write assets/demo_codec.bin; "
                                 "--key=value goes to train_codec.py")
    p = sub.add_parser("measure-codec", help="SI-SNR, mel distance and pitch accuracy on held-out demo clips")
    p.add_argument("codec", help="codec path, run directory or signature, //reference/..., debug")
    sub.add_parser("prompts", help="print 32 prompts, 16 asking for a low register and 16 for a high one")
    p = sub.add_parser("measure-registers", help="median pitch of samples asked for a low vs a high register")
    p.add_argument("samples", help="a directory of NNN.wav + NNN.json (a run's samples/<epoch>, generate.py --out)")
    args, overrides = parser.parse_known_args(argv)
    if overrides and args.cmd != "codec":
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    if args.cmd == "set":
        print(make_demo_set(args.out, args.seed))
    elif args.cmd == "codec":
        print(f"wrote {build_demo_codec(overrides)}")
    elif args.cmd == "prompts":
        print("\n".join(register_prompts()))
    elif args.cmd == "measure-codec":
        from formats import load_codec
        m = measure_codec(load_codec(args.codec))
        print(f"codec {args.codec} on {m['clips']} held-out demo clips: SI-SNR {m['sisnr']:.2f} dB | mel distance "
              f"{m['mel']:.3f} | {100 * m['pitch']:.0f}% of {m['notes']} sustained melody notes within a semitone "
              f"(median error {m['pitch_median_error']:.2f} semitones)")
    else:
        m = measure_registers(args.samples)
        print(f"{args.samples}: median pitch of 'low register' samples {', '.join(f'{x:.1f}' for x in m['low'])}; "
              f"'high register' {', '.join(f'{x:.1f}' for x in m['high'])} (MIDI) | high - low {m['gap']:+.1f} "
              f"semitones | {100 * m['ordered']:.0f}% of (high, low) pairs in order")
    return 0


if __name__ == "__main__":
    cli(main, help=False)  # argparse answers --help, per subcommand too
