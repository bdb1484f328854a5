"""Everything between a folder of music and batches of codes.

Owns: AudioCraft manifests (`data.jsonl[.gz]`) and sidecar metadata (`<audio>.json`), training descriptions,
reading audio segments (soundfile + soxr), the token cache (codec codes as uint16 memmaps), deterministic
resumable sampling across ranks. (The synthetic demo set lives in demo.py.)

    python data.py manifest ROOT OUT.jsonl[.gz] [--workers=16] [--complete]   # walk ROOT, write a manifest
    python data.py tokenize MANIFEST CACHE_DIR --codec=PATH [--device=cuda] [--batch_size=16] [--num_workers=4]
    torchrun --nproc_per_node=8 data.py tokenize DATASET CACHE_DIR --codec=//reference/encodec_32khz --device=cuda
    python data.py tokenizer MANIFEST OUT.model --vocab_size=4000             # sentencepiece for conditioner=lut
    python data.py tokenize --help                                            # a command's options

A dataset is a directory of splits, as AudioCraft's egs: <dataset>/{train,valid,evaluate,generate}/data.jsonl[.gz].
`tokenize` puts a split's cache at CACHE_DIR/<codec identity>/<split>-<manifest digest>, where training with
token_cache=True, cache_dir=CACHE_DIR finds it (and makes it itself when missing: every rank encodes its share,
no collective). A cache notices edited sidecars and re-recorded audio (sizes and mtimes) and redoes those files.
`manifest` and `tokenize` stop within seconds on SIGTERM, SIGUSR1 or Ctrl-C, exit 75, and the same command goes
on where they stopped. In code:

    ds = open_split(cfg.dataset, "train", codec=codec, train=True, segment_duration=30, token_cache=True,
                    rank=rank, world_size=world_size, ...)
    for batch in make_loader(ds, 8, rank=rank, world_size=world, start=batches_done, num_workers=4):
        batch["codes"]  # [B, K, T] int64 (batch["wav"] [B, C, S] without the cache), batch["valid"] [B, T] bool

Sampling: train item i is a function of (seed, i) alone: the file, the start and the description
augmentation. Batch b of rank r holds items (b * world_size + r) * batch_size + j, so ranks are disjoint and
a run resumes exactly by passing the number of batches it consumed (there is no separate epoch: the item
index keeps growing). Other splits give one segment per file, from its start, without augmentation.
"""
import concurrent.futures
import fcntl
import gzip
import hashlib
import io
import itertools
import json
import math
import os
import re
import socket
import stat
import sys
import textwrap
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch

import env
import melody
from env import UserError, check_stop, cli, map_dataset_path, resolve_path, stop_requested, write_atomic

SPLITS = ("train", "valid", "evaluate", "generate")
# What soundfile (libsndfile 1.2) decodes; .m4a/.aac are not among them.
AUDIO_EXTS = {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc", ".au", ".caf",
              ".w64", ".rf64"}
INFO_FIELDS = ("title", "artist", "key", "bpm", "genre", "moods", "keywords", "description", "name", "instrument")
MERGED_FIELDS = ("key", "bpm", "genre", "moods", "instrument", "keywords")  # AudioCraft's text augmentation
CACHE_FORMAT = "nanomusicgen-token-cache/2"
MIN_READS = 100        # below this many reads, max_skip_fraction counts against MIN_READS (no abort on 1 of 2)
MAX_DRAWS = 1000       # an item gives up after this many unreadable files in a row
MAX_WORKERS = 64       # rows of the shared skip counters (one per loader worker, plus the main process)


class BadFile(Exception):
    """An audio file (or its sidecar) that cannot be used; the message is the reason."""


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


def _open_text(path, mode="rt"):
    return gzip.open(path, mode, encoding="utf-8") if str(path).endswith(".gz") else open(path, mode, encoding="utf-8")


def _default_cache_dir():
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nanomusicgen"


# ----------------------------------------------------------------------------------------------------------
# Manifests (AudioCraft's AudioMeta, one JSON object per line)

@dataclass
class AudioMeta:
    path: str
    duration: float               # seconds
    sample_rate: int
    amplitude: float | None = None
    weight: float | None = None
    info_path: str | None = None  # AudioCraft: a path inside a zip; kept, not used


def manifest_file(path):
    """The manifest a user named: a data.jsonl[.gz] file, or a directory holding one."""
    p = resolve_path(map_dataset_path(str(path)))
    if p.is_dir():
        for name in ("data.jsonl", "data.jsonl.gz"):
            if (p / name).is_file():
                return p / name
        raise UserError(f"{p}: no data.jsonl or data.jsonl.gz in this directory "
                        f"(make one with `python data.py manifest AUDIO_DIR {p / 'data.jsonl'}`)")
    if not p.is_file():
        raise UserError(f"manifest {p} does not exist")
    return p


def read_manifest(path):
    """list[AudioMeta] with paths through the team's dataset mappers and //reference resolution.

    Relative paths are relative to the manifest's directory, or to the current directory (AudioCraft's
    rule) when the first one is found there and not next to the manifest."""
    file = manifest_file(path)
    metas, base = [], None
    try:
        with _open_text(file) as f:
            lines = list(enumerate(f, 1))
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"manifest {file} cannot be read ({e})") from None
    for n, line in lines:
        if not line.strip():
            continue
        where = f"{file} line {n}"
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(d, dict):
            raise UserError(f"{where}: expected a JSON object with path, duration, sample_rate")
        for key in ("path", "duration", "sample_rate"):
            if key not in d:
                raise UserError(f'{where}: missing field "{key}"')
        try:
            meta = AudioMeta(path=str(d["path"]), duration=float(d["duration"]), sample_rate=int(d["sample_rate"]),
                             amplitude=None if d.get("amplitude") is None else float(d["amplitude"]),
                             weight=None if d.get("weight") is None else float(d["weight"]),
                             info_path=d.get("info_path"))
        except (TypeError, ValueError):
            raise UserError(f"{where}: duration, sample_rate, amplitude and weight must be numbers") from None
        if not (meta.duration > 0 and meta.sample_rate > 0 and (meta.weight is None or meta.weight >= 0)):
            raise UserError(f"{where}: duration {meta.duration} and sample_rate {meta.sample_rate} must be "
                            f"positive and weight {meta.weight} not negative (remove the line or rebuild)")
        try:
            p = resolve_path(map_dataset_path(meta.path))
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        if not p.is_absolute():
            if base is None:
                base = Path.cwd() if p.exists() and not (file.parent / p).exists() else file.parent
            p = base / p
        meta.path = str(p)
        metas.append(meta)
    return metas


def write_manifest(metas, path):
    """Atomically: a reader never sees half a manifest."""
    path = Path(path)
    text = "".join(json.dumps(asdict(m)) + "\n" for m in metas).encode()
    write_atomic(path, lambda f: f.write(gzip.compress(text) if path.suffix == ".gz" else text))


def probe(path, complete=False):
    """AudioMeta of one file (complete: decode it all for the peak amplitude and NaN check), or BadFile."""
    _check_regular(path)
    try:
        info = sf.info(str(path))
    except Exception as e:
        raise BadFile(_read_error(path, e)) from None
    if info.frames <= 0 or info.samplerate <= 0:
        raise BadFile("no audio samples")
    amplitude = None
    if complete:
        peak = 0.0
        try:
            for block in sf.blocks(str(path), blocksize=1 << 18, dtype="float32", always_2d=True):
                if not np.isfinite(block).all():
                    raise BadFile("NaN or infinite samples")
                peak = max(peak, float(np.abs(block).max(initial=0.0)))
        except BadFile:
            raise
        except Exception as e:
            raise BadFile(_read_error(path, e)) from None
        amplitude = peak
    return AudioMeta(path=str(path), duration=info.frames / info.samplerate, sample_rate=info.samplerate,
                     amplitude=amplitude)


def find_audio(root):
    """Audio files under root, symlinks followed (each real directory visited once), sorted."""
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a link cycle
            dirnames[:] = []
            continue
        seen.add(real)
        found += [os.path.join(dirpath, f) for f in filenames if os.path.splitext(f)[1].lower() in AUDIO_EXTS]
    return sorted(os.path.abspath(p) for p in found)


def build_manifest(root, out, workers=16, complete=False):
    """Probe every audio file under root in parallel and write the manifest. Returns (metas, skipped).

    A stop signal (env.install_stop_handlers) ends it within a second with env.Stopped, keeping what was probed in
    .<out name>.partial beside out: the same call goes on from there (probing again the files changed since)."""
    root = resolve_path(root)
    if not root.is_dir():
        raise UserError(f"{root} is not a directory")
    out = Path(out)
    if not out.name.endswith((".jsonl", ".jsonl.gz")):
        raise UserError(f"{out}: the manifest name must end with .jsonl or .jsonl.gz")
    if not out.parent.is_dir():
        raise UserError(f"{out.parent} does not exist")
    files = find_audio(root)
    partial = out.with_name(f".{out.name}.partial")
    results = _read_partial(partial, complete, set(files))  # {path: [stamp, AudioMeta dict or None, skip reason]}
    todo = [p for p in files if p not in results or results[p][0] != input_stamp(p)[:2]]
    _log(f"manifest: {len(files)} audio files under {root}"
         + (f" ({len(files) - len(todo)} probed by the stopped run before)" if len(todo) < len(files) else ""))
    t0, shown = time.time(), 0.0
    # Threads: libsndfile releases the GIL, and most of the time is spent waiting on the disk.
    pool = concurrent.futures.ThreadPoolExecutor(max(1, workers))
    try:
        pending = {pool.submit(_probe_stamped, p, complete): p for p in todo}
        while pending:
            finished, _ = concurrent.futures.wait(pending, timeout=1.0, return_when=concurrent.futures.FIRST_COMPLETED)
            for fut in finished:
                results[pending.pop(fut)] = fut.result()
            if stop_requested():
                text = "".join(json.dumps({"path": p, "probe": r, "complete": complete}) + "\n"
                               for p, r in results.items())
                write_atomic(partial, lambda f: f.write(text.encode()))
                check_stop()
            n = len(todo) - len(pending)
            if time.time() - shown > 1 or not pending:
                shown = time.time()
                _progress(f"manifest: {n}/{len(todo)} files, {n / max(shown - t0, 1e-9):.0f} files/s")
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    metas = [AudioMeta(**results[p][1]) for p in files if results[p][1] is not None]
    skipped = [(p, results[p][2]) for p in files if results[p][1] is None]
    write_manifest(metas, out)
    partial.unlink(missing_ok=True)
    hours = sum(m.duration for m in metas) / 3600
    _log(f"manifest: found {len(files)}, wrote {len(metas)} ({hours:.2f} h) to {out}, skipped {len(skipped)}")
    for path, reason in skipped:
        _log(f"  skipped {path}: {reason}")
    return metas, skipped


def _probe_stamped(path, complete):
    """[stamp, AudioMeta dict or None, None or why it was skipped]; the stamp taken first, so that a file changed
    while it is probed is probed again by a resumed run."""
    stamp = input_stamp(path)[:2]
    try:
        return [stamp, asdict(probe(path, complete)), None]
    except BadFile as e:
        return [stamp, None, str(e)]


def _read_partial(partial, complete, files):
    """What a stopped build_manifest probed: {path: _probe_stamped(...)} of the files still there."""
    results = {}
    try:
        for line in partial.read_text().splitlines():
            row = json.loads(line)
            if row["complete"] == complete and row["path"] in files:
                results[row["path"]] = row["probe"]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # none, or not ours: probe everything
    return results


def _progress(msg):
    # One rewritten line on a terminal; plain lines in a log file.
    end = "\r" if sys.stderr.isatty() else "\n"
    print(msg.ljust(79) if end == "\r" else msg, file=sys.stderr, end=end, flush=True)


def _check_regular(path):
    """BadFile unless path is a regular file (links followed): a FIFO or a device named *.wav would block a reader
    forever, and a directory is no audio."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise BadFile("missing") from None
    except OSError as e:
        raise BadFile(f"unreadable ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a directory" if stat.S_ISDIR(mode) else "a socket"
                if stat.S_ISSOCK(mode) else "a device")
        raise BadFile(f"not a regular file ({kind}): only regular files are read")


def _read_error(path, e):
    if not os.path.exists(path):
        return "missing"
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        return "empty file"
    return f"unreadable ({getattr(e, 'error_string', None) or e})"  # libsndfile's reason, without the path


# ----------------------------------------------------------------------------------------------------------
# Sidecar metadata and descriptions

def _text(value, field, sep=", "):
    """A sidecar text field as one string. Lists of strings are joined (several captions or tags are how some
    datasets store them), numbers are written out (a song called 1999), except as a description; anything else
    (a dict, a bool, a number as a description) is a BadFile naming the field, so that the file is skipped with
    that reason (and counted against max_skip_fraction) instead of being trained on its Python repr."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return sep.join(v.strip() for v in value if v.strip())
    if isinstance(value, (int, float)) and not isinstance(value, bool) and field != "description":
        return str(value) if isinstance(value, int) else f"{value:g}"
    shown = json.dumps(value)
    raise BadFile(f'"{field}" is {type(value).__name__} {shown[:40]}{"..." if len(shown) > 40 else ""}: expected '
                  f'a string or a list of strings (fix the sidecar)')


def _words(value, field):
    """AudioCraft's list fields: a list, or a string split on commas and whitespace; lower case."""
    if value is None:
        return []
    if isinstance(value, list):
        items = [_text(v, field) for v in value]
    else:
        items = re.split(r"[,\s]", _text(value, field))
    return [v.strip().lower() for v in items if v.strip()]


def _number(value):
    try:
        x = float(value) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else None
    except ValueError:
        return None
    return x if x is not None and math.isfinite(x) else None


def normalize_info(raw):
    """AudioCraft's MusicInfo preprocessing; missing fields are empty ("" / [] / None), not an error; a bpm that
    is not a number is None. A text field of the wrong kind is a BadFile (see _text)."""
    text = {k: _text(raw.get(k), k, " " if k == "description" else ", ")
            for k in ("title", "artist", "description", "genre", "name", "instrument", "key")}
    info = {k: text[k] for k in ("title", "artist", "description")}
    info.update({k: text[k].lower() for k in ("genre", "name", "instrument")})
    key = text["key"].lower()
    info["key"] = "" if key == "none" or "," in key else key
    info["bpm"] = _number(raw.get("bpm"))
    info["moods"], info["keywords"] = _words(raw.get("moods"), "moods"), _words(raw.get("keywords"), "keywords")
    return info


def read_info(audio_path):
    """The sidecar `<audio path with .json suffix>` (AudioCraft's convention), normalised. BadFile if it is not a
    JSON object of usable fields."""
    side = Path(audio_path).with_suffix(".json")
    try:
        _check_regular(side)
        text = side.read_text(encoding="utf-8")
    except FileNotFoundError:
        return normalize_info({})
    except BadFile as e:
        if str(e) == "missing":
            return normalize_info({})
        raise BadFile(f"sidecar {side}: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BadFile(f"sidecar {side} unreadable ({e})") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadFile(f"sidecar {side} is not JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(raw, dict):
        raise BadFile(f"sidecar {side} is not a JSON object")
    try:
        return normalize_info(raw)
    except BadFile as e:
        raise BadFile(f"sidecar {side}: {e}") from None


def _field_text(value):
    if isinstance(value, list):
        return ", ".join(value)
    if isinstance(value, float):
        return f"{value:g}"
    return value or ""


def describe(info, rng=None, merge_text_p=0.0, drop_desc_p=0.0, keep_field_p=1.0):
    """The text an item is trained on. Without rng: the description (or, if empty, all metadata fields).

    With rng (training): with probability merge_text_p append "field: value" pairs, each field kept with
    probability keep_field_p, in random order, dropping the description itself with probability drop_desc_p.
    AudioCraft's augmentation, minus its stray trailing period when nothing is merged."""
    desc = info["description"]
    if rng is None:
        if desc:
            return desc
        return ". ".join(f"{k}: {_field_text(info[k])}" for k in MERGED_FIELDS if _field_text(info[k]))
    if rng.random() >= merge_text_p:
        return desc
    pairs = [f"{k}: {_field_text(info[k])}" for k in MERGED_FIELDS
             if _field_text(info[k]) and rng.random() < keep_field_p]
    pairs = [pairs[j] for j in rng.permutation(len(pairs))]
    if rng.random() < drop_desc_p:
        desc = ""
    return ". ".join(([desc.rstrip(".")] if desc else []) + pairs)


ATTRIBUTE_FIELDS = tuple(f for f in INFO_FIELDS if f != "description")   # the text attributes a model may take


def check_attributes(names):
    """Text attributes (a config's `attributes`, NAME or NAME:FUSE) must be sidecar fields."""
    for spec in names:
        name = str(spec).partition(":")[0]
        if name not in ATTRIBUTE_FIELDS:
            raise UserError(f"attributes: {name!r} is not a sidecar field; the text attributes are "
                            f"{', '.join(ATTRIBUTE_FIELDS)}")


def attribute_text(info, name):
    """The text of one sidecar field as AudioCraft's MusicInfo gives it to its conditioner (lists joined by spaces,
    numbers written out), None when empty."""
    value = info.get(name)
    if isinstance(value, list):
        value = " ".join(value)
    elif isinstance(value, float):
        value = f"{value:g}"
    return value or None


def manifest_texts(manifest):
    """Each item's description and its metadata as the text augmentation writes it ("genre: rock. bpm: 120"): the
    corpus a tokenizer for the lookup-table conditioner is trained on (python data.py tokenizer)."""
    metas = read_manifest(manifest)
    texts, with_text, bad = [], 0, []
    for n, meta in enumerate(metas, 1):
        try:
            info = read_info(meta.path)
        except BadFile as e:
            bad.append(str(e))
            continue
        found = [t for t in (info["description"], describe({**info, "description": ""})) if t]
        texts += found
        with_text += bool(found)
        if n % 10000 == 0 or n == len(metas):
            print(f"read {n}/{len(metas)} manifest entries, {with_text} with text", flush=True)
    if bad:
        print(f"skipped {len(bad)} unreadable sidecars, the first: {bad[0]}", flush=True)
    if not texts:
        raise UserError(f"manifest {manifest}: none of its {len(metas)} entries has text (a sidecar <audio>.json "
                        f"with a description or {'/'.join(MERGED_FIELDS)}); nothing written")
    return texts


# ----------------------------------------------------------------------------------------------------------
# Audio

def convert_channels(x, channels):
    """x [S, C] -> [S, channels]: mean to mono, mono repeated, extra channels dropped (AudioCraft's rules)."""
    c = x.shape[1]
    if c == channels:
        return x
    if channels == 1:
        return x.mean(axis=1, keepdims=True)
    if c == 1:
        return np.repeat(x, channels, axis=1)
    if c > channels:
        return x[:, :channels]
    raise BadFile(f"{c} channels cannot become {channels}")


def read_audio(path, start=0.0, duration=None, *, sample_rate=None, channels=None, expect_rate=None):
    """float32 [C, S]: `duration` seconds (None: to the end) from `start`, converted to `channels` and
    resampled to `sample_rate` (soxr). Only the frames asked for are decoded. BadFile on any problem."""
    path = str(path)
    _check_regular(path)
    try:
        with sf.SoundFile(path) as f:
            sr = f.samplerate
            if expect_rate and sr != expect_rate:
                raise BadFile(f"sample rate is {sr} Hz but the manifest says {expect_rate} Hz (rebuild the manifest)")
            first = int(round(start * sr))
            if f.frames <= 0:
                raise BadFile("no audio samples")
            if first >= f.frames:
                raise BadFile(f"no audio at {start:.2f} s: the file lasts {f.frames / sr:.2f} s (is the manifest's "
                              f"duration right?)")
            if first:
                f.seek(first)
            x = f.read(-1 if duration is None else int(math.ceil(duration * sr)), dtype="float32", always_2d=True)
    except BadFile:
        raise
    except Exception as e:
        raise BadFile(_read_error(path, e)) from None
    if x.size == 0:
        raise BadFile("no audio samples")
    if not np.isfinite(x).all():
        raise BadFile("NaN or infinite samples")
    if channels is not None:
        x = convert_channels(x, channels)
    if sample_rate is not None and sample_rate != sr:
        x = soxr.resample(x, sr, sample_rate)
    return np.ascontiguousarray(x.T, dtype=np.float32)  # wav: [C, S] float32


SUBTYPES = {"WAV": "PCM_16", "FLAC": "PCM_16", "OGG": "VORBIS", "MP3": "MPEG_LAYER_III"}


def save_audio(path, wav, sample_rate):
    """Write wav ([C, S] or [S], tensor or array, floats in [-1, 1]) in the format its suffix names (.wav and
    .flac as 16-bit PCM). Through memory: soundfile syncs a file to disk on close, slow for many small files."""
    Path(path).write_bytes(audio_bytes(wav, sample_rate, Path(path).suffix))


def audio_bytes(wav, sample_rate, suffix=".wav"):
    """The file save_audio writes, as bytes (for env.write_atomic: generated samples are written whole or not at
    all)."""
    x = wav.detach().float().cpu().numpy() if torch.is_tensor(wav) else np.asarray(wav, dtype=np.float32)
    fmt = suffix.lstrip(".").upper()
    buf = io.BytesIO()
    sf.write(buf, np.clip(x.T, -1, 1), sample_rate, format=fmt, subtype=SUBTYPES.get(fmt))
    return buf.getvalue()


# Normalisation of generated audio (generate.py, the generate stage): ITU-R BS.1770 loudness (K-weighted, gated)
# or peak, and never above PEAK_CEILING_DB

PEAK_CEILING_DB = -1.0   # no sample above -1 dBFS after normalisation: no clipping, room for resampling overshoot


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
    if headroom_db is not None and not math.isfinite(headroom_db):
        raise UserError(f"headroom_db={headroom_db}: must be a finite number of dB")
    peak = float(wav.abs().max())
    if peak == 0:
        return wav, 0.0
    gain_db = 0.0
    if strategy == "loudness":
        level = loudness(wav.detach().float().cpu().numpy(), sample_rate)
        gain_db = -(14.0 if headroom_db is None else headroom_db) - level if math.isfinite(level) else 0.0
    elif strategy == "peak":
        gain_db = -(1.0 if headroom_db is None else headroom_db) - 20 * math.log10(peak)
    gain_db = min(gain_db, PEAK_CEILING_DB - 20 * math.log10(peak))
    if strategy == "none" and peak <= 1.0:
        gain_db = 0.0
    return wav * 10 ** (gain_db / 20), gain_db


# ----------------------------------------------------------------------------------------------------------
# The token cache: a directory per split and codec, <cache_dir>/<codec identity>/<split>-<digest>/ holding
#
#   cache.json        what made it: codec, manifest digest, chunking and batch shape
#   codes.<s>.u16     shard s: [frames, K] uint16 codes, appended
#   index.<s>.jsonl   shard s: a row per file, {i, path, offset, frames, stamp, info} or {i, path, stamp, error}
#   lock.<s>          flock-ed by shard s's one writer, whose name it holds: two writers never append to one shard
#
# Rank r of world_size writes shard r, files i % world_size == r. A row counts while its stamp (size and mtime of
# the audio and of its sidecar) matches the files on disk: an edited description is read again, a re-recorded
# file encoded again. Codes are written before their row and a row is one line: a cut line is skipped, so
# readers never see half a row. Each chunk is padded to a length that depends on the chunk alone, and every
# encode has the cache's batch shape, so a file's codes do not depend on its batch-mates or which rank encoded it.

# A waiting rank gives up when no shard has written or touched anything for STALL_TIMEOUT seconds: a healthy writer
# shows progress after every encode, so only a dead or hung one goes quiet that long; 15 minutes is far above one
# encode (seconds on a GPU, a minute or two of CPU for 16 x 30 s) and a network filesystem's attribute caching
# (up to a minute), and far below the hours a job would otherwise wait for a rank that will never write again.
STALL_TIMEOUT = 900.0
POLL_SECONDS = 1.0     # between looks at the cache files while waiting
PAD_SECONDS = 1.0      # chunks are zero-padded to a multiple of this; chunks of one padded length are batched


def manifest_digest(metas):
    """Names the data a cache was made from (resolved paths, durations, rates and weights) and its format."""
    h = hashlib.sha1(CACHE_FORMAT.encode())
    for m in metas:
        h.update(json.dumps([m.path, m.duration, m.sample_rate, m.weight]).encode())
    return h.hexdigest()


def _codec_tag(identity):
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(identity))[:48] or "codec"


def split_name(file):
    """'train' for <dataset>/train/data.jsonl, the file's stem otherwise."""
    file = Path(file)
    return file.parent.name if file.name.startswith("data.jsonl") else file.name.split(".")[0]


def cache_path(cache_dir, codec, file, metas):
    """Where the cache of a manifest lives: <cache_dir>/<codec identity>/<split>-<digest>."""
    return Path(cache_dir) / _codec_tag(codec.identity()) / f"{split_name(file)}-{manifest_digest(metas)[:12]}"


def input_stamp(path):
    """[size, mtime_ns] of an audio file, then of its sidecar (None, None where missing). Two stats: cheap enough
    to check every file at every start, unlike a content hash; a rewrite keeping both size and mtime (copied
    with its times) goes unnoticed."""
    stamp = []
    for p in (path, Path(path).with_suffix(".json")):
        try:
            st = os.stat(p)
            stamp += [st.st_size, st.st_mtime_ns]
        except OSError:
            stamp += [None, None]
    return stamp


def input_stamps(metas, workers=16):
    """input_stamp of every file, in threads (a network filesystem takes about a millisecond per stat)."""
    paths = [m.path for m in metas]
    step = max(1, -(-len(paths) // workers))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        parts = pool.map(lambda a: [input_stamp(p) for p in paths[a:a + step]], range(0, len(paths), step))
        return [s for part in parts for s in part]


def _cache_meta(codec, file, metas, chunk_seconds, batch_size):
    return {"format": CACHE_FORMAT, "codec": codec.identity(), "n_q": codec.n_q, "card": codec.card,
            "hop": codec.hop, "sample_rate": codec.sample_rate, "channels": codec.channels,
            "frame_rate": codec.frame_rate, "manifest": str(file), "digest": manifest_digest(metas),
            "files": len(metas), "chunk_frames": max(1, round(chunk_seconds * codec.frame_rate)),
            "pad_frames": max(1, round(PAD_SECONDS * codec.frame_rate)), "batch": batch_size}


def _claim_cache(out, meta):
    """Create the cache directory with its cache.json, or check that an existing one is for the same codec and
    manifest (a cache made by another codec or from other files is refused, never mixed). Returns the cache.json
    in force: a cache goes on with the chunking and batch it was started with (codes depend on them)."""
    file = out / "cache.json"
    try:
        out.mkdir(parents=True, exist_ok=True)
        old = json.loads(file.read_text()) if file.exists() else None
    except OSError as e:
        raise UserError(f"token cache {out}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        old = {}
    if old is None:
        text = json.dumps(meta, indent=1) + "\n"  # ranks racing here write the same content
        write_atomic(file, lambda f: f.write(text.encode()), advice=": free some space and run again")
        return meta
    if old.get("format") != CACHE_FORMAT or not {"chunk_frames", "pad_frames", "batch"} <= old.keys():
        raise UserError(f"token cache {file} is not one this version reads: delete {out} to build it again")
    if old.get("codec") != meta["codec"]:
        raise UserError(f"token cache {out} was made by codec {old.get('codec')!r}, this codec is "
                        f"{meta['codec']!r}: use another directory or delete this one")
    if old.get("digest") != meta["digest"]:
        raise UserError(f"token cache {out} was made from another manifest ({old.get('manifest')}): "
                        f"use another directory or delete this one")
    return old


def _read_index(file):
    """Complete lines of one index shard: a crash or a full disk can leave a cut last line."""
    rows = []
    if file.exists():
        with open(file, encoding="utf-8") as f:
            for line in f:
                if not line.endswith("\n"):
                    break
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    break
    return rows


def _shards(out):
    return sorted(int(p.name.split(".")[1]) for p in Path(out).glob("index.*.jsonl"))


def _index_rows(out):
    """Every complete row of every shard, each with the shard that holds its codes ("shard")."""
    rows = []
    for s in _shards(out):
        rows += [dict(r, shard=r.get("shard", s)) for r in _read_index(Path(out) / f"index.{s}.jsonl")]
    return rows


def _current(rows, stamps):
    """{manifest index: row} of the rows made from the files as they are now (any row when stamps is None)."""
    return {r["i"]: r for r in rows if stamps is None or (r["i"] < len(stamps) and r.get("stamp") == stamps[r["i"]])}


def _cache_rows(out, stamps=None):
    return _current(_index_rows(out), stamps)


def _repair_shard(out, s, K):
    """Make shard s consistent after a crash or a full disk (a cut index line, codes without their row): keep the
    complete rows whose codes are on disk. Run by the shard's writer, under its lock; rewrites only what is wrong,
    atomically (readers may be reading). Returns the next write offset, in frames."""
    codes, index = out / f"codes.{s}.u16", out / f"index.{s}.jsonl"
    have = codes.stat().st_size // (2 * K) if codes.exists() else 0
    rows = _read_index(index)
    # rows with an error hold no codes; rows with "shard" point at codes written before (a re-read sidecar)
    keep = [r for r in rows if "error" in r or "shard" in r or r["offset"] + r["frames"] <= have]
    end = max((r["offset"] + r["frames"] for r in keep if "error" not in r and "shard" not in r), default=0)
    text = index.read_bytes() if index.exists() else b""
    if len(keep) < len(rows) or text.count(b"\n") != len(rows) or not text.endswith(b"\n") and text:
        lines = "".join(json.dumps(r) + "\n" for r in keep).encode()
        write_atomic(index, lambda f: f.write(lines), advice=": free some space and run again")
    if codes.exists() and codes.stat().st_size != end * 2 * K:
        os.truncate(codes, end * 2 * K)
    return end


def _try_lock(out, s):
    """Shard s's lock: an open file holding an flock (released by closing it, or when the process dies), or None
    while another process holds it."""
    path = out / f"lock.{s}"
    try:
        f = open(path, "a+")
    except OSError as e:
        raise UserError(f"could not write {path}: {e.strerror or e}") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    except OSError as e:
        f.close()
        raise UserError(f"{path}: cannot take a file lock ({e.strerror}): put cache_dir on a filesystem with "
                        f"file locks (flock)") from None
    try:  # who writes the shard, for the messages of those waiting; the lock does not need it
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
    except OSError:
        pass
    return f


def _writer(out, s):
    """Who holds shard s's lock, in words."""
    lock = _try_lock(out, s)
    if lock is not None:
        lock.close()
        return "no writer (its process never started, or died)"
    try:
        return (out / f"lock.{s}").read_text().strip() or "another process"
    except OSError:
        return "another process"


def _cache_state(out):
    """Sizes and mtimes of the codes and index files: what moves while any writer works (a writer touches its
    index after each encode, so a long encode counts as work too)."""
    state = []
    for p in sorted(Path(out).iterdir()):
        if p.name.startswith(("codes.", "index.")):
            try:
                st = p.stat()
                state.append((p.name, st.st_size, st.st_mtime_ns))
            except OSError:
                pass
    return state


def _append(f, blob):
    """Write all of blob to an unbuffered file, or one UserError line: a full disk names the file and its cause
    (whatever was half-written is repaired by the next run)."""
    try:
        view = memoryview(blob)
        while view:
            view = view[f.write(view):]
    except OSError as e:
        raise UserError(f"could not write {f.name}: {e.strerror or e} (free some space and run the same command "
                        f"again: the token cache keeps every file written before and goes on)") from None


class _WholeFiles(torch.utils.data.Dataset):
    """Reads whole files for `tokenize` in loader workers, so decoding overlaps encoding. Each item is
    (i, wav or None, sidecar info or why the file is unusable, input stamp taken before reading)."""

    def __init__(self, metas, todo, sample_rate, channels):
        self.metas, self.todo, self.sample_rate, self.channels = metas, todo, sample_rate, channels

    def __len__(self):
        return len(self.todo)

    def __getitem__(self, j):
        i = self.todo[j]
        m = self.metas[i]
        stamp = input_stamp(m.path)
        try:
            info = read_info(m.path)
            wav = read_audio(m.path, sample_rate=self.sample_rate, channels=self.channels, expect_rate=m.sample_rate)
            return i, torch.from_numpy(wav), info, stamp
        except BadFile as e:
            return i, None, str(e), stamp


def _first(x):
    return x[0]


def _ignore_stop_signals(_worker_id):
    """In loader workers: the main process stops them when it stops (a worker killed by the signal would turn
    a clean stop into a 'worker exited unexpectedly' error)."""
    import signal
    for name in ("SIGINT", "SIGTERM", "SIGUSR1"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)


def _codec_device(codec):
    if isinstance(codec, torch.nn.Module):
        for t in itertools.chain(codec.parameters(), codec.buffers()):
            return t.device
    return torch.device("cpu")


def tokenize(manifest, out, codec, *, batch_size=16, num_workers=0, chunk_seconds=30.0, rank=0, world_size=1,
             wait=False, stall_timeout=STALL_TIMEOUT, verbose=True):
    """Encode the files of a manifest into the cache directory `out`, in chunks of chunk_seconds batched across
    files, batch_size at a time (a cache goes on with the chunking and batch size it was started with). This
    process takes files i % world_size == rank and writes shard `rank`; files with a current row in any shard are
    skipped (resumable: a crash, a stop signal or a full disk loses only the files in flight), changed files are
    done again.

    One writer per shard: while another process holds this shard, wait for it, then do what it left. With wait,
    then wait until every shard is done, by watching the cache files: every rank of a job may call this at once
    (no collective, so no timeout while work goes on); a UserError names the shard when no shard writes anything
    for stall_timeout seconds. Files that cannot be read are recorded with the reason (training counts them
    against max_skip_fraction), and tried again when they change. env.Stopped on a stop signal. Returns a
    summary dict."""
    file = manifest_file(manifest)
    metas = read_manifest(file)
    _, summary = _fill_cache(file, metas, input_stamps(metas), Path(out), codec, rank=rank, world_size=world_size,
                             wait=wait, stall_timeout=stall_timeout, verbose=verbose, batch_size=batch_size,
                             num_workers=num_workers, chunk_seconds=chunk_seconds)
    return summary


def _fill_cache(file, metas, stamps, out, codec, *, rank, world_size, wait, stall_timeout, verbose, **encode_kw):
    """tokenize's loop -> ({i: current row}, summary). Encodes this rank's missing files under its shard's lock;
    watches the files while another process holds that lock or (wait) other shards are not done. `stamps` (one
    input_stamp per file) is refreshed for files found encoded as they are now."""
    if codec.card > 1 << 16:
        raise UserError(f"codec card {codec.card} does not fit the cache's uint16 codes")
    if not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is not in [0, world_size={world_size})")
    meta = _claim_cache(out, _cache_meta(codec, file, metas, encode_kw.pop("chunk_seconds"),
                                         encode_kw.pop("batch_size")))
    summary = {"dir": str(out), "files": len(metas), "done_before": None, "written": 0, "reread": 0, "skipped": [],
               "seconds": 0.0}
    seen, changed, look, said = None, time.time(), 0.0, None
    while True:
        check_stop()
        state = _cache_state(out)
        if state != seen:  # something was written (or a first look): read the rows again
            t = time.time()
            rows = _index_rows(out)
            current = _current(rows, stamps)
            for i in {r["i"] for r in rows} - current.keys():  # changed since `stamps` and encoded as it is now?
                stamps[i] = input_stamp(metas[i].path)
            current = _current(rows, stamps)
            missing = [i for i in range(len(metas)) if i not in current]
            seen, changed, look = state, time.time(), time.time() - t
            if summary["done_before"] is None:
                summary["done_before"] = len(current)
        mine = [i for i in missing if i % world_size == rank]
        if not mine and (not wait or not missing):
            return current, summary
        lock = _try_lock(out, rank) if mine else None
        if lock is not None:
            try:
                _encode_share(out, rank, metas, stamps, codec, meta, summary, world_size=world_size,
                              verbose=verbose, **encode_kw)
            finally:
                lock.close()
            seen = None
            continue
        if time.time() - changed > stall_timeout:
            writers = "; ".join(f"shard {s} of {world_size}: {_writer(out, s)}"
                                for s in sorted({i % world_size for i in missing})[:3])
            raise UserError(f"token cache {out}: nothing was written for {stall_timeout:g} s and {len(missing)} files "
                            f"are missing, e.g. {metas[missing[0]].path} ({writers}): a process is stuck or gone. "
                            f"Every file written is kept: run again to go on (stall_timeout is how long a wait "
                            f"without progress may last)")
        if verbose and said != bool(mine) and (mine or rank == 0):
            said = bool(mine)
            _log(f"tokenize: {out}: " + (f"shard {rank} is being written by {_writer(out, rank)}: waiting for it"
                                         if mine else f"waiting for {len(missing)} files of shards "
                                         f"{', '.join(map(str, sorted({i % world_size for i in missing})))}"))
        time.sleep(max(POLL_SECONDS, 4 * look))  # reading the rows again must not become the work


def _encode_share(out, shard, metas, stamps, codec, meta, summary, *, world_size, verbose, num_workers):
    """Under shard `shard`'s lock: repair it, then encode the missing files i % world_size == shard into it.

    Every encode has the same shape, [batch, channels, padded length] (missing rows are zeros): kernels give a row
    the same result whatever the other rows hold, but not whatever the batch's shape (an LSTM batched over 16
    rows rounds differently than over 3), so this keeps a file's codes independent of its batch-mates, of
    sharding and of resuming."""
    K, hop, B = codec.n_q, codec.hop, meta["batch"]
    offset = _repair_shard(out, shard, K)  # first: rows it drops are to be done again
    rows = _index_rows(out)
    current = _current(rows, stamps)
    todo = [i for i in range(len(metas)) if i % world_size == shard and i not in current]
    # the audio is as it was, only the sidecar changed: read it again, keep the codes
    same_audio = {r["i"]: r for r in rows if "error" not in r and r["stamp"][:2] == stamps[r["i"]][:2]}
    reread = [i for i in todo if i in same_audio]
    todo = [i for i in todo if i not in same_audio]
    total_s = sum(metas[i].duration for i in todo)
    if verbose and shard == 0:
        _log(f"tokenize: {out}: {len(todo)} of {len(metas)} files to encode by shard 0 of {world_size} "
             f"({_duration(total_s)} of audio)" + (f", {len(reread)} changed sidecars to read" if reread else ""))
    device = _codec_device(codec)
    chunk, pad = meta["chunk_frames"] * hop, meta["pad_frames"] * hop
    reader = torch.utils.data.DataLoader(_WholeFiles(metas, todo, codec.sample_rate, codec.channels),
                                         batch_size=1, collate_fn=_first, num_workers=num_workers,
                                         prefetch_factor=4 if num_workers else None,
                                         worker_init_fn=_ignore_stop_signals,
                                         generator=torch.Generator().manual_seed(0))  # leave the global RNG alone
    # chunks waiting for a batch, by padded length: [(file, chunk number, wav [C, S])]; the codes of each chunk of
    # the files not written yet (None: not encoded yet) and their rows
    buckets, parts, rows_of = {}, {}, {}
    t0, shown, read_s = time.time(), 0.0, 0.0
    index_path = out / f"index.{shard}.jsonl"
    with open(out / f"codes.{shard}.u16", "ab", buffering=0) as codes_f, open(index_path, "ab", buffering=0) as index_f:

        def add_row(row):
            _append(index_f, (json.dumps(row) + "\n").encode())

        def write(i):
            nonlocal offset
            codes = torch.cat(parts.pop(i), dim=-1)  # codes: [K, frames] int64
            if codes.min() < 0 or codes.max() >= codec.card:  # uint16 would wrap them silently
                raise RuntimeError(f"codec gave codes outside [0, {codec.card}) for {metas[i].path}")
            _append(codes_f, codes.T.numpy().astype(np.uint16).tobytes())  # codes first, then the row saying
            add_row(dict(rows_of.pop(i), offset=offset, frames=codes.shape[-1]))  # they are whole
            offset += codes.shape[-1]
            summary["written"] += 1
            summary["seconds"] += metas[i].duration

        def encode(length):
            group, buckets[length] = buckets[length][:B], buckets[length][B:]
            if not buckets[length]:
                del buckets[length]
            batch = np.zeros((B, codec.channels, length), np.float32)  # wav: [B, C, S] float32
            for b, (_, _, p) in enumerate(group):
                batch[b, :, :p.shape[-1]] = p
            with torch.inference_mode():
                codes = codec.encode(torch.from_numpy(batch).to(device)).cpu()  # codes: [B, K, S / hop] int64
            for b, (i, k, p) in enumerate(group):
                parts[i][k] = codes[b, :, :-(-p.shape[-1] // hop)]
            for i in dict.fromkeys(i for i, _, _ in group):
                if all(p is not None for p in parts[i]):
                    write(i)
            os.utime(index_path)  # work in progress, for those watching

        def encode_ready(final=False):
            """Full batches; the fullest when too many chunks wait (memory); everything at the end."""
            while buckets:
                length = max(buckets, key=lambda n: (len(buckets[n]), n))
                if len(buckets[length]) < B and not final and sum(map(len, buckets.values())) <= 8 * B:
                    return
                encode(length)

        for i in reread:
            check_stop()
            r, stamp = same_audio[i], input_stamp(metas[i].path)
            try:
                add_row({"i": i, "path": metas[i].path, "shard": r["shard"], "offset": r["offset"],
                         "frames": r["frames"], "stamp": stamp, "info": read_info(metas[i].path)})
                summary["reread"] += 1
            except BadFile as e:
                add_row({"i": i, "path": metas[i].path, "stamp": stamp, "error": str(e)})
                summary["skipped"].append((metas[i].path, str(e)))
        for n, (i, wav, info, stamp) in enumerate(reader, 1):
            check_stop()  # the files in flight are dropped: a resumed run does them
            if wav is None:
                summary["skipped"].append((metas[i].path, info))
                add_row({"i": i, "path": metas[i].path, "stamp": stamp, "error": info})
            else:
                starts = range(0, wav.shape[-1], chunk)
                parts[i], rows_of[i] = [None] * len(starts), {"i": i, "path": metas[i].path, "stamp": stamp,
                                                               "info": info}
                for k, a in enumerate(starts):
                    piece = wav[:, a:a + chunk].numpy()
                    length = min(chunk, -(-piece.shape[-1] // pad) * pad)  # the chunk's own padded length
                    buckets.setdefault(length, []).append((i, k, piece))
                encode_ready()
            read_s += metas[i].duration
            now = time.time()
            if verbose and shard == 0 and (now - shown > 2 or n == len(todo)):
                shown, rate = now, read_s / max(now - t0, 1e-9)
                _progress(f"tokenize: {n}/{len(todo)} files, {_duration(read_s)} of audio, {rate:.0f}x real time, "
                          f"ETA {_duration((total_s - read_s) / max(rate, 1e-9))}")
        encode_ready(final=True)
    if verbose and (todo or reread):
        _log(f"tokenize: shard {shard}: wrote {summary['written']} files ({_duration(summary['seconds'])} of audio) "
             f"in {time.time() - t0:.1f} s, read {summary['reread']} changed sidecars, skipped "
             f"{len(summary['skipped'])}")
        for path, reason in summary["skipped"]:
            _log(f"  skipped {path}: {reason}")


def _duration(seconds):
    s = int(seconds)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class _FileLock:
    """An exclusive flock on `path` (created if missing), held for a `with` block: ranks or processes that
    open the same split or demo set wait for the one building it, without a collective and its timeout."""

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        self.file = open(self.path, "a")
        fcntl.flock(self.file, fcntl.LOCK_EX)

    def __exit__(self, *exc):
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


# ----------------------------------------------------------------------------------------------------------
# Segments: the torch Dataset the trainer iterates

class _Strings:
    """Many strings held in two numpy arrays: forked loader workers then share pages instead of copying
    them as Python reference counts change (the classic DataLoader memory growth)."""

    def __init__(self, strings):
        encoded = [s.encode() for s in strings]
        self.ends = np.cumsum([len(b) for b in encoded], dtype=np.int64)
        self.buf = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self):
        return len(self.ends)

    def __getitem__(self, i):
        return self.buf[self.ends[i - 1] if i else 0:self.ends[i]].tobytes().decode()


class Segments(torch.utils.data.Dataset):
    """Fixed-length segments of a split, from the token cache (items {codes [K, T] int64}) or from audio
    (items {wav [C, T * hop] float32}); both with valid [T] bool and description str.

    stats() -> {attempted, skipped, dropped}: reads tried and failed, summed over the main process and all
    loader workers (shared-memory counters, one row per worker), cumulative over the dataset's life;
    dropped counts files the cache recorded as unreadable when it was made."""

    def __init__(self, name, paths, frames, *, train, segment_frames, hop, frame_rate, seed, min_segment_ratio,
                 weights, merge_text_p, drop_desc_p, keep_field_p, max_skip_fraction, cache=None, infos=None,
                 audio=None, dropped=0, attributes=(), chroma=None):
        self.name, self.paths, self.frames = name, _Strings(paths), np.asarray(frames, dtype=np.int64)
        self.train, self.T, self.hop, self.frame_rate, self.seed = train, segment_frames, hop, frame_rate, seed
        self.min_frames = math.ceil(min_segment_ratio * segment_frames - 1e-9)
        self.cum = None if weights is None else np.cumsum(weights, dtype=np.float64)
        if self.cum is not None and not self.cum[-1] > 0:
            raise UserError(f"{name}: every file has weight 0")
        self.aug = dict(merge_text_p=merge_text_p, drop_desc_p=drop_desc_p, keep_field_p=keep_field_p)
        self.max_skip_fraction = max_skip_fraction
        self.cache, self.audio, self.dropped = cache, audio, dropped
        self.infos = None if infos is None else _Strings(infos)  # cache: sidecars as read by tokenize, JSON
        self.attributes = tuple(str(a).partition(":")[0] for a in attributes)   # text fields the items carry
        self.chroma = chroma   # the melody's chroma classes: a cache beside the token cache ({dir, shard, offset,
        # frames}) or, reading audio, an encoder; and the frames of one segment ("length")
        self.counts = torch.zeros(MAX_WORKERS + 1, 2, dtype=torch.int64).share_memory_()  # [row, (reads, fails)]
        self._mm, self._warned = {}, set()

    def __getstate__(self):  # memmaps are opened again in each worker
        return dict(self.__dict__, _mm={})

    def __len__(self):
        """Files in the split. A train split also takes any index >= len (each draws its own file)."""
        return len(self.frames)

    def __repr__(self):
        hours = self.frames.sum() / self.frame_rate / 3600
        src = f"token cache {self.cache['dir']}" if self.cache else "audio"
        return (f"{self.name}: {len(self)} files, {hours:.2f} h, {self.T}-frame segments from {src}"
                f"{', train sampling' if self.train else ''}")

    def stats(self):
        reads, fails = (int(v) for v in self.counts.sum(0))
        return {"attempted": reads, "skipped": fails, "dropped": self.dropped}

    def too_many_skips(self):
        """Failed reads pass max_skip_fraction of the reads (of at least MIN_READS: no abort on 1 of 2)."""
        s = self.stats()
        return s["skipped"] > self.max_skip_fraction * max(s["attempted"], MIN_READS)

    def check_skips(self):
        """UserError with a summary when too_many_skips()."""
        if self.too_many_skips():
            s = self.stats()
            raise UserError(f"{self.name}: {s['skipped']} of {s['attempted']} audio reads failed, more than "
                            f"max_skip_fraction={self.max_skip_fraction}: fix or remove the files named in the "
                            f"warnings above, or raise max_skip_fraction")

    # -- one item
    def __getitem__(self, i):
        if self.train:
            rng = np.random.default_rng([self.seed % (1 << 63), i])
            for _ in range(MAX_DRAWS):
                f = self._choose(rng)
                start = int(rng.integers(max(0, self.frames[f] - self.min_frames) + 1))
                item = self._load(f, start)
                if item is not None:
                    return self._texts(item, rng)
        else:
            if not 0 <= i < len(self):
                raise IndexError(i)
            for k in range(min(len(self), MAX_DRAWS)):  # an unreadable file: the next one stands in
                item = self._load((i + k) % len(self), 0)
                if item is not None:
                    return self._texts(item, None)
        raise UserError(f"{self.name}: no readable file after {MAX_DRAWS} tries (see the warnings above)")

    def _texts(self, item, rng):
        """The item's description (augmented in training) and its text attributes, from its sidecar."""
        info = item.pop("info")
        item["description"] = describe(info, rng, **self.aug) if rng is not None else describe(info)
        if self.attributes:
            item["attributes"] = {name: attribute_text(info, name) for name in self.attributes}
        return item

    def _choose(self, rng):
        if self.cum is None:
            return int(rng.integers(len(self)))
        return int(np.searchsorted(self.cum, rng.random() * self.cum[-1], side="right"))

    def _load(self, f, start):
        """{codes|wav, valid, info, path} for the segment of file f from frame start, or None (skip counted)."""
        worker = torch.utils.data.get_worker_info()
        row = self.counts[0 if worker is None else 1 + worker.id % MAX_WORKERS]
        row[0] += 1
        path = self.paths[f]
        try:
            item = self._read_codes(f, start) if self.cache else self._read_wav(f, start)
        except BadFile as e:
            row[1] += 1
            if path not in self._warned:
                self._warned.add(path)
                _log(f"warning: data: skipping {path}: {e}")
            self.check_skips()  # in a worker too: it stops drawing, the loader reports it
            return None
        item["path"] = path
        return item

    def _read_codes(self, f, start):
        c = self.cache
        shard = int(c["shard"][f])
        if shard not in self._mm:
            self._mm[shard] = np.memmap(Path(c["dir"]) / f"codes.{shard}.u16", dtype=np.uint16,
                                        mode="r").reshape(-1, c["n_q"])
        n = min(self.T, int(self.frames[f]) - start)
        first = int(c["offset"][f]) + start
        codes = np.zeros((c["n_q"], self.T), dtype=np.int64)  # codes: [K, T] int64, zeros past the end
        codes[:, :n] = self._mm[shard][first:first + n].T
        valid = torch.arange(self.T) < n  # valid: [T] bool
        item = {"codes": torch.from_numpy(codes), "valid": valid, "info": json.loads(self.infos[f])}
        if self.chroma:
            item["chroma"] = self._read_chroma(f, start, n)
        return item

    def _read_chroma(self, f, start, n, wav=None):
        """The chroma classes [length] int64 of the segment of n real frames from frame start, -1 past its audio
        (AudioCraft masks chroma frames at or after length / hop). From the cache, its frame at the segment's start
        time (AudioCraft's int(frame_rate * seek_time)) on; or from the segment's audio wav [C, S]."""
        c = self.chroma
        out = np.full(c["length"], -1, dtype=np.int64)          # classes: [length] int64
        real = min(c["length"], math.ceil(n / self.frame_rate * melody.FRAME_RATE - 1e-9))
        if wav is not None:
            classes = c["encoder"].classes(torch.from_numpy(wav.mean(0))[None], c["sample_rate"])[0].numpy()
            real = min(real, len(classes))
            out[:real] = classes[:real]
            return torch.from_numpy(out)
        shard, first = int(c["shard"][f]), int(start / self.frame_rate * melody.FRAME_RATE)
        key = ("chroma", shard)
        if key not in self._mm:
            self._mm[key] = np.memmap(Path(c["dir"]) / f"codes.{shard}.u16", dtype=np.uint16, mode="r")
        m = max(0, min(real, int(c["frames"][f]) - first))
        at = int(c["offset"][f]) + first
        out[:m] = self._mm[key][at:at + m]
        return torch.from_numpy(out)

    def _read_wav(self, f, start):
        a = self.audio
        path, sr = self.paths[f], a["sample_rate"]
        info = read_info(path)
        x = read_audio(path, start * self.hop / sr, self.T * self.hop / sr, sample_rate=sr,
                       channels=a["channels"], expect_rate=int(a["rates"][f]))
        S = self.T * self.hop
        n = min(S, x.shape[1])
        wav = np.zeros((a["channels"], S), np.float32)  # wav: [C, S] float32, zeros past the end
        wav[:, :n] = x[:, :n]                           # (numpy: torch's threaded fill is slow on busy CPUs)
        valid = torch.arange(self.T) < -(-n // self.hop)  # valid: [T] bool, frames touching real audio
        item = {"wav": torch.from_numpy(wav), "valid": valid, "info": info}
        if self.chroma:
            item["chroma"] = self._read_chroma(f, start, n / self.hop, wav)
        return item


def open_split(dataset, split, *, codec, train, segment_duration=30.0, seed=0, token_cache=False, cache_dir=None,
               min_segment_ratio=0.8, sample_on_weight=False, sample_on_duration=False, merge_text_p=0.25,
               drop_desc_p=0.5, keep_field_p=0.5, max_skip_fraction=0.05, rank=0, world_size=1,
               stall_timeout=STALL_TIMEOUT, attributes=(), chroma=None):
    """The Segments of one split of a dataset directory.

    With token_cache the split is tokenized once into cache_path(...) and items hold codes; otherwise items
    hold wav at the codec's rate and channels for the trainer to encode. Every rank of a job calls it at once,
    with its rank and world_size, and no collective: a missing or stale cache is encoded by all of them, each its
    share (tokenize(..., wait=True)), and each returns when the whole split is in. The cache's frame counts are
    the truth about durations: sample_on_duration uses them, and a manifest that disagrees is said once.

    attributes: sidecar fields the items carry as text conditions (item["attributes"]). chroma: a
    melody.ChromaEncoder: items carry the segment's chroma classes (item["chroma"], a melody model's condition),
    which with token_cache are computed once per file into a cache beside the token cache (the same machinery:
    cache_path(cache_dir, chroma, ...), sharded, resumable), and otherwise from each segment's audio."""
    if split not in SPLITS:
        raise UserError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    if segment_duration is None or not segment_duration > 0:
        raise UserError(f"segment_duration={segment_duration} must be positive")
    if not 0 <= min_segment_ratio <= 1:
        raise UserError(f"min_segment_ratio={min_segment_ratio} must be in [0, 1]")
    cache_root = resolve_path(cache_dir) if cache_dir else _default_cache_dir()
    root = resolve_path(map_dataset_path(str(dataset)))
    if not root.is_dir():
        raise UserError(f"dataset {dataset}: {root} is not a directory (expected {root}/<split>/data.jsonl)")
    if not (root / split).is_dir():
        raise UserError(f"dataset {root} has no split {split!r}: expected {root / split}/data.jsonl[.gz]")
    file = manifest_file(root / split)
    metas = read_manifest(file)
    if not metas:
        raise UserError(f"{file} lists no files")
    T = max(1, round(segment_duration * codec.frame_rate))
    check_attributes(attributes)
    common = dict(train=train, segment_frames=T, hop=codec.hop, frame_rate=codec.frame_rate, seed=seed,
                  min_segment_ratio=min_segment_ratio, merge_text_p=merge_text_p, drop_desc_p=drop_desc_p,
                  keep_field_p=keep_field_p, max_skip_fraction=max_skip_fraction, attributes=attributes)
    # one segment's chroma frames: the melody condition's length (ChromaConditioner.frames)
    chroma_length = melody.chroma_frames(int(melody.CHROMA_RATE * segment_duration))
    name = f"{root.name}/{split}"

    def weights(ok, seconds):
        if not (sample_on_weight or sample_on_duration):
            return None
        return np.array([(metas[i].weight if sample_on_weight and metas[i].weight is not None else 1.0)
                         * (s if sample_on_duration else 1.0) for i, s in zip(ok, seconds)])

    if not token_cache:
        frames = [max(1, math.ceil(m.duration * codec.frame_rate - 1e-6)) for m in metas]
        audio = {"sample_rate": codec.sample_rate, "channels": codec.channels,
                 "rates": np.array([m.sample_rate for m in metas])}
        chroma_cfg = None if chroma is None else {"encoder": chroma, "sample_rate": codec.sample_rate,
                                                    "length": chroma_length}
        return Segments(name, [m.path for m in metas], frames, audio=audio, chroma=chroma_cfg,
                        weights=weights(range(len(metas)), [m.duration for m in metas]), **common)
    stamps = input_stamps(metas)
    fill = dict(rank=rank, world_size=world_size, wait=True, stall_timeout=stall_timeout, verbose=True,
                batch_size=16, num_workers=0, chunk_seconds=30.0)
    out = cache_path(cache_root, codec, file, metas)
    rows, _ = _fill_cache(file, metas, list(stamps), out, codec, **fill)
    chroma_rows = rows
    if chroma is not None:   # the same machinery, its own directory beside the token cache
        chroma_out = cache_path(cache_root, chroma, file, metas)
        chroma_rows, _ = _fill_cache(file, metas, list(stamps), chroma_out, chroma, **fill)
    ok = [i for i in range(len(metas)) if "error" not in rows[i] and "error" not in chroma_rows[i]]
    bad = [rows[i] if "error" in rows[i] else chroma_rows[i] for i in sorted(set(range(len(metas))) - set(ok))]
    if bad:
        if rank == 0:
            _log(f"warning: data: {name}: {len(bad)} of {len(metas)} files were unreadable when {out} was made, "
                 f"e.g. {bad[0]['path']}: {bad[0]['error']}")
        if len(bad) > max_skip_fraction * len(metas) or not ok:
            raise UserError(f"{name}: {len(bad)} of {len(metas)} files are unreadable (see {out}/index.*.jsonl), "
                            f"more than max_skip_fraction={max_skip_fraction}: fix them or rebuild the manifest")
    seconds = [rows[i]["frames"] / codec.frame_rate for i in ok]
    # more than two frames apart is not rounding: the manifest is wrong about that file
    off = [(abs(s - metas[i].duration), i, s) for i, s in zip(ok, seconds)
           if abs(s - metas[i].duration) > 2 / codec.frame_rate]
    if off and rank == 0:
        _, i, s = max(off)
        _log(f"warning: data: {name}: {len(off)} of {len(ok)} files last longer or shorter than the manifest says "
             f"(worst: {metas[i].path}: {metas[i].duration:.2f} s in the manifest, {s:.2f} s of audio); the audio's "
             f"durations are used (rebuild the manifest to make them agree)")
    cache = {"dir": str(out), "n_q": codec.n_q, "shard": np.array([rows[i]["shard"] for i in ok], dtype=np.int32),
             "offset": np.array([rows[i]["offset"] for i in ok], dtype=np.int64)}
    chroma_cfg = None
    if chroma is not None:
        chroma_cfg = {"dir": str(chroma_out), "length": chroma_length,
                      "shard": np.array([chroma_rows[i]["shard"] for i in ok], dtype=np.int32),
                      "offset": np.array([chroma_rows[i]["offset"] for i in ok], dtype=np.int64),
                      "frames": np.array([chroma_rows[i]["frames"] for i in ok], dtype=np.int64)}
    return Segments(name, [metas[i].path for i in ok], [rows[i]["frames"] for i in ok], weights=weights(ok, seconds),
                    cache=cache, infos=[json.dumps(rows[i]["info"]) for i in ok], dropped=len(bad),
                    chroma=chroma_cfg, **common)


# ----------------------------------------------------------------------------------------------------------
# Batches

def collate(items):
    """{codes [B, K, T] | wav [B, C, S], valid [B, T], descriptions list[str], paths list[str]}, and with them
    attributes {name: list[str | None]} and chroma [B, length] int64 when the split has them."""
    key = "codes" if "codes" in items[0] else "wav"
    stack = lambda k: torch.from_numpy(np.stack([it[k].numpy() for it in items]))  # noqa: E731 (numpy: one thread)
    batch = {key: stack(key), "valid": stack("valid"), "descriptions": [it["description"] for it in items],
             "paths": [it["path"] for it in items]}
    if "attributes" in items[0]:
        batch["attributes"] = {name: [it["attributes"][name] for it in items] for name in items[0]["attributes"]}
    if "chroma" in items[0]:
        batch["chroma"] = stack("chroma")
    return batch


def unconditioned(batch):
    """The batch with no condition at all: no description, no attributes, no melody (the valid stage's ce_uncond)."""
    n = len(batch["descriptions"])
    out = dict(batch, descriptions=[None] * n)
    if "attributes" in batch:
        out["attributes"] = {name: [None] * n for name in batch["attributes"]}
    if "chroma" in batch:
        out["chroma"] = torch.full_like(batch["chroma"], -1)
    return out


def train_batches(batch_size, rank, world_size, start=0):
    """Endless item indices: batch b of rank r is (b * world_size + r) * batch_size + j, j < batch_size."""
    for b in itertools.count(start):
        first = (b * world_size + rank) * batch_size
        yield list(range(first, first + batch_size))


def make_loader(dataset, batch_size, *, rank=0, world_size=1, start=0, num_workers=0, pin_memory=False,
                train=True):
    """train: an endless iterator of batches starting at batch `start` of this rank (pass the number of
    batches consumed to resume exactly); it raises UserError when failed reads pass max_skip_fraction.
    Otherwise a DataLoader making one pass over the split, files strided across ranks (rank r takes files
    r, r + world_size, ...: ranks may get one batch more or less than others)."""
    if train and not dataset.train:
        raise ValueError(f"{dataset.name} was opened with train=False: make_loader(train=False) for a finite pass")
    if train:
        batches = train_batches(batch_size, rank, world_size, start)
    else:
        idx = list(range(rank, len(dataset), world_size))
        batches = [idx[j:j + batch_size] for j in range(0, len(idx), batch_size)]
    # Items are functions of (seed, index), so workers need no random seed of their own; a private generator
    # keeps DataLoader from drawing its base seed from the global RNG, which a resumed run must replay exactly.
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, collate_fn=collate, num_workers=num_workers,
        pin_memory=pin_memory and torch.cuda.is_available(), prefetch_factor=4 if num_workers else None,
        generator=torch.Generator().manual_seed(0))
    return _checked(loader, dataset) if train else loader


def _checked(loader, dataset):
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except Exception:
            if not dataset.too_many_skips():
                raise
            batch = None  # a worker gave up on bad files: said in one line below, not as its traceback
        if batch is None or dataset.too_many_skips():
            # Stop the workers now: the worker's exception sits in a reference cycle with the iterator, and a
            # later garbage collection can close its queues first, then wait 5 s for each worker.
            getattr(it, "_shutdown_workers", lambda: None)()
            dataset.check_skips()
        yield batch


def loader_speed(loader, batches=20, warmup=2):
    """Segments per second a loader delivers (bench.py): {segments_per_s, first_batch_s}. The first
    `warmup` batches (worker start, memmap faults) are timed separately."""
    it, t0 = iter(loader), time.perf_counter()
    for _ in range(warmup):
        next(it)
    t1, n = time.perf_counter(), 0
    for _ in range(batches):
        batch = next(it)
        n += len(batch["descriptions"])
    return {"segments_per_s": n / (time.perf_counter() - t1), "first_batch_s": (t1 - t0) / max(warmup, 1)}


# ----------------------------------------------------------------------------------------------------------
# Command line

COMMANDS = {  # name: (arguments, {option: default}, what it does, {option: what it means})
    "manifest": ("ROOT OUT.jsonl[.gz]", {"workers": 16, "complete": False},
                 "Walk ROOT for audio files (links followed; only regular files are read) and write an AudioCraft "
                 "manifest; unusable files are skipped and listed. A stopped run keeps what it probed and the same "
                 "command goes on from there.",
                 {"workers": "threads probing files", "complete": "decode every file: peak amplitude and a NaN check"}),
    "tokenize": ("MANIFEST CACHE_DIR", {"codec": (str, None), "device": (str, None), "batch_size": 16,
                                        "num_workers": 4, "chunk_seconds": 30.0, "stall_timeout": STALL_TIMEOUT},
                 "Encode a manifest (data.jsonl[.gz] or a split directory), or every split of a dataset directory, "
                 "into the token cache under CACHE_DIR (the cache_dir of the training config). Resumable, and "
                 "changed files are done again. Under torchrun each rank encodes its share (no collective) and "
                 "every rank returns when the whole cache is in.",
                 {"codec": 'the codec: a path, //reference/..., or "debug" (required)',
                  "device": "where to encode (default: cuda if available, else cpu; cuda:LOCAL_RANK under torchrun)",
                  "batch_size": "chunks per encode (a cache keeps the one it was started with)",
                  "num_workers": "processes reading audio",
                  "chunk_seconds": "files are encoded in chunks of this many seconds",
                  "stall_timeout": "seconds without progress on any shard before waiting ranks give up"}),
    "tokenizer": ("MANIFEST OUT.model", {"vocab_size": 4000},
                  "Train a sentencepiece model (T5's special ids) for conditioner=lut on a manifest's descriptions and "
                  "its metadata as the text augmentation writes it; then train with --conditioner=lut "
                  "--lut_tokenizer=OUT.model.", {"vocab_size": "tokens in the vocabulary (at least 8)"}),
}


def usage(cmd):
    """A command's help: its arguments, what it does, and each option with its default."""
    args, schema, what, notes = COMMANDS[cmd]
    defaults = {k: None if isinstance(v, tuple) else v for k, v in schema.items()}
    lines = [f"usage: python data.py {cmd} {args} [--key=value ...]", "", textwrap.fill(what, 110), ""]
    lines += [f"  --{k}={'' if v is None else v}".ljust(28) + f" {notes[k]}" for k, v in defaults.items()]
    return "\n".join(lines)


def _help():
    cmd = next((a for a in sys.argv[1:] if a in COMMANDS), None)
    return usage(cmd) if cmd else __doc__.strip()


def main(argv):
    if not argv or argv[0] not in COMMANDS:
        got = f"unknown command {argv[0]!r}" if argv else "no command"
        raise UserError(f"{got}: python data.py {{{','.join(COMMANDS)}}} ... (python data.py --help)")
    cmd, (args, schema, _, _) = argv[0], COMMANDS[argv[0]]
    n = len(args.split())
    pos, opts = env.parse_options(argv[1:], schema, where=f"data.py {cmd}", positionals=(n, n),
                                  usage=f"python data.py {cmd} {args} [--key=value ...]")
    for key in ("workers", "batch_size"):
        if key in opts and not 1 <= opts[key] <= 1024:
            raise UserError(f"data.py {cmd}: --{key}={opts[key]} must be between 1 and 1024")
    for key in ("num_workers",):
        if key in opts and opts[key] < 0:
            raise UserError(f"data.py {cmd}: --{key}={opts[key]} must not be negative")
    for key in ("chunk_seconds", "stall_timeout"):
        if key in opts and not 0 < opts[key] < math.inf:
            raise UserError(f"data.py {cmd}: --{key}={opts[key]} must be a positive number of seconds")
    try:
        if cmd == "manifest":
            build_manifest(pos[0], pos[1], opts["workers"], opts["complete"])
        elif cmd == "tokenizer":
            import text
            if opts["vocab_size"] < 8:
                raise UserError(f"vocab_size={opts['vocab_size']}: too small (at least 8)")
            text.train_sentencepiece(manifest_texts(pos[0]), pos[1], opts["vocab_size"])
        else:
            _tokenize_cli(*pos, **opts)
    except env.Stopped as e:
        _log(f"data.py {cmd}: stopped by {e}; everything written is kept: run the same command again to go on")
        return env.EXIT_REQUEUE
    return 0


def _tokenize_cli(manifest, cache_dir, *, codec, device, batch_size, num_workers, chunk_seconds, stall_timeout):
    import formats
    if codec is None:
        raise UserError('data.py tokenize: --codec is required (a codec path, //reference/..., or "debug")')
    try:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        raise UserError(f"RANK={os.environ.get('RANK')!r} and WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} must be "
                        f"numbers (set by torchrun)") from None
    if not 0 <= rank < world:
        raise UserError(f"RANK={rank} must be in [0, WORLD_SIZE={world})")
    device = env.resolve_device(device)
    src = resolve_path(map_dataset_path(manifest))
    if src.is_dir() and not any((src / n).is_file() for n in ("data.jsonl", "data.jsonl.gz")):
        files = [manifest_file(src / s) for s in SPLITS if (src / s).is_dir()]
        if not files:
            raise UserError(f"{src} holds no data.jsonl[.gz] and no split directories ({', '.join(SPLITS)})")
    else:
        files = [manifest_file(src)]
    metas = [read_manifest(f) for f in files]  # every bad line is reported before anything is written
    codec = formats.load_codec(codec).to(device)
    cache_root = resolve_path(cache_dir)
    kw = dict(rank=rank, world_size=world, stall_timeout=stall_timeout, verbose=True, batch_size=batch_size,
              num_workers=num_workers, chunk_seconds=chunk_seconds)
    outs = [cache_path(cache_root, codec, f, m) for f, m in zip(files, metas)]
    stamps = [input_stamps(m) for m in metas]
    for wait in (False, True):  # this rank's share of every split first, then wait for the other ranks' shares
        for f, m, st, out in zip(files, metas, stamps, outs):
            _fill_cache(f, m, st, out, codec, wait=wait, **kw)
    if rank == 0:
        print("\n".join(map(str, outs)))


if __name__ == "__main__":
    env.install_stop_handlers()
    cli(main, help=_help)
