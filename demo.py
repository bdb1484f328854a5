"""The built-in fixtures: the synthetic demo music set and the small codecs that go with it.

The demo set is procedural music whose descriptions say what the audio is (timbre, register, tempo, mode, drums),
so that a tiny model trained on it for a minute learns to follow the text. The debug codec is a seeded, untrained
EnCodec-shaped codec for tests (`load_codec("debug")`).

    python demo.py set OUT_DIR [--seed=0]          # write the synthetic demo set
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
from env import UserError, cli, write_atomic

# ----------------------------------------------------------------------------------------------------------
# The demo set: procedural music whose descriptions say what the audio is

DEMO_VERSION = 1
DEMO_RATE = 32000
DEMO_SIZES = {"train": 256, "valid": 24, "evaluate": 24, "generate": 8}
DEMO_SECONDS = (4.0, 6.0)
TIMBRES = {"sine": "soft sine wave", "square": "square wave synth", "sawtooth": "bright sawtooth synth",
           "plucked": "plucked string"}
REGISTERS = {"low": 36, "middle": 55, "high": 74}   # lowest tonic (MIDI note) of each register
TEMPOS = {"slow": (60, 80), "moderate": (96, 116), "fast": (132, 160)}
SCALES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10)}
NOTE_NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
PROGRESSIONS = ((0, 3, 4, 0), (0, 5, 3, 4), (0, 4, 5, 3), (5, 3, 0, 4))  # triad roots (scale degrees) per bar
TEMPLATES = ("A {tempo} {mode} melody on a {instrument} in a {register} register, {bpm} bpm{drums}.",
             "{Instrument}, {tempo} tempo, {key} {mode}, {register} register{drums}.",
             "A {tempo} tune in {key} {mode} played by a {instrument}, {register} register, {bpm} bpm{drums}.")


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


def _voice(timbre, onsets, lengths, midis, n, sr):
    """Back-to-back notes (onsets and lengths in seconds; midis [notes] or [notes, voices] for chords),
    vectorised over samples -> [n] float32."""
    first = np.minimum((np.asarray(onsets) * sr).astype(np.int64), n)
    counts = np.diff(first, append=n)                                  # samples of each note
    rep = lambda v: np.repeat(np.asarray(v, dtype=np.float32), counts)  # noqa: E731 (per note -> per sample)
    since = (np.arange(n, dtype=np.float32) - rep(first)) / sr         # seconds since the note's onset
    left = rep(lengths) - since                                        # seconds until its end
    x = np.zeros(n, np.float32)
    for midi in np.asarray(midis, dtype=np.float64).reshape(len(first), -1).T:
        cycles = rep(440 * 2 ** ((midi - 69) / 12)) * since
        cycles -= np.floor(cycles)                                     # phase in [0, 1) (numpy's % is slow)
        if timbre == "sine":
            x += np.sin(2 * np.pi * cycles)
        elif timbre == "square":    # odd harmonics at 1/k: hollow
            x += np.where(cycles < 0.5, np.float32(0.7), np.float32(-0.7))
        elif timbre == "sawtooth":  # every harmonic at 1/k: bright
            x += 1.4 * cycles - 0.7
        else:                       # plucked: a mellow triangle (odd harmonics at 1/k^2), dying away below
            x += 2.8 * np.abs(cycles - 0.5) - 0.7
    env = np.minimum(1, since / 0.005) * np.clip(left / 0.02, 0, 1)    # no clicks at either end
    if timbre == "plucked":
        env *= np.exp(-since / 0.3)
    return x * env


def render_demo(p, sr=DEMO_RATE, rng=None):
    """wav [S] float32 of one clip: a melody over one triad per bar, with optional kick/noise drums."""
    rng = rng or np.random.default_rng(0)
    n = int(p["duration"] * sr)
    beat, scale = 60 / p["bpm"], SCALES[p["mode"]]
    tonic = REGISTERS[p["register"]] + p["tonic"]

    def pitch(degree):
        octave, step = divmod(degree, 7)
        return tonic + 12 * octave + scale[step]

    onsets, lengths, midis, t, degree = [], [], [], 0.0, 7 + int(rng.integers(5))
    while t < p["duration"]:
        length = beat * float(rng.choice([0.5, 0.5, 1, 1, 1, 2]))
        onsets.append(t), lengths.append(length), midis.append(pitch(degree))
        degree = int(np.clip(degree + rng.choice([-2, -1, -1, 0, 1, 1, 2, 3, -3]), 2, 16))
        t += length
    wav = 0.5 * _voice(p["timbre"], onsets, lengths, midis, n, sr)
    progression = PROGRESSIONS[int(rng.integers(len(PROGRESSIONS)))]
    bars = np.arange(math.ceil(p["duration"] / (4 * beat)))
    chords = [[pitch(progression[b % 4] + k) for k in (0, 2, 4)] for b in bars]  # root, third, fifth
    wav += 0.12 * _voice(p["timbre"], 4 * beat * bars, np.full(len(bars), 4 * beat), chords, n, sr)
    if p["drums"]:
        for k in range(int(p["duration"] / beat) + 1):
            a = int(k * beat * sr)
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
    for s, split in enumerate(SPLITS):
        d = root / split
        d.mkdir()
        metas = []
        for i in range(sizes.get(split, 0)):
            rng = np.random.default_rng([seed, s, i])
            p = demo_params(rng, split, i)
            wav = render_demo(p, DEMO_RATE, rng)
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
# Command line

def main(argv):
    parser = argparse.ArgumentParser(prog="demo.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("set", help="write the synthetic demo set")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.cmd == "set":
        print(make_demo_set(args.out, args.seed))
    return 0


if __name__ == "__main__":
    cli(main, help=False)  # argparse answers --help, per subcommand too
