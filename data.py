"""Everything between a folder of music and batches of codes.

Owns: AudioCraft manifests (`data.jsonl[.gz]`) and sidecar metadata (`<audio>.json`), training descriptions,
reading audio segments (soundfile + soxr), the token cache (codec codes as uint16 memmaps), deterministic
resumable sampling across ranks. (The synthetic demo set lives in demo.py.)

    python data.py manifest ROOT OUT.jsonl[.gz] [--workers=16] [--complete]   # walk ROOT, write a manifest
    python data.py tokenize MANIFEST CACHE_DIR --codec=PATH [--device=cuda] [--batch_size=16] [--num_workers=4]
    torchrun --nproc_per_node=8 data.py tokenize DATASET CACHE_DIR --codec=//reference/encodec_32khz --device=cuda

A dataset is a directory of splits, as AudioCraft's egs: <dataset>/{train,valid,evaluate,generate}/data.jsonl[.gz].
`tokenize` puts a split's cache at CACHE_DIR/<codec identity>/<split>-<manifest digest>, where training with
token_cache=True, cache_dir=CACHE_DIR finds it (and makes it itself when missing). In code:

    ds = open_split(cfg.dataset, "train", codec=codec, train=True, segment_duration=30, token_cache=True, ...)
    for batch in make_loader(ds, 8, rank=rank, world_size=world, start=batches_done, num_workers=4):
        batch["codes"]  # [B, K, T] int64 (batch["wav"] [B, C, S] without the cache), batch["valid"] [B, T] bool

Sampling: train item i is a function of (seed, i) alone: the file, the start and the description
augmentation. Batch b of rank r holds items (b * world_size + r) * batch_size + j, so ranks are disjoint and
a run resumes exactly by passing the number of batches it consumed (there is no separate epoch: the item
index keeps growing). Other splits give one segment per file, from its start, without augmentation.
"""
import argparse
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
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch

from env import UserError, cli, map_dataset_path, resolve_path, write_atomic

SPLITS = ("train", "valid", "evaluate", "generate")
# What soundfile (libsndfile 1.2) decodes; .m4a/.aac are not among them.
AUDIO_EXTS = {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc", ".au", ".caf",
              ".w64", ".rf64"}
INFO_FIELDS = ("title", "artist", "key", "bpm", "genre", "moods", "keywords", "description", "name", "instrument")
MERGED_FIELDS = ("key", "bpm", "genre", "moods", "instrument", "keywords")  # AudioCraft's text augmentation
CACHE_FORMAT = "nanomusicgen-token-cache/1"
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
    """Probe every audio file under root in parallel and write the manifest. Returns (metas, skipped)."""
    root = resolve_path(root)
    if not root.is_dir():
        raise UserError(f"{root} is not a directory")
    out = Path(out)
    if not out.name.endswith((".jsonl", ".jsonl.gz")):
        raise UserError(f"{out}: the manifest name must end with .jsonl or .jsonl.gz")
    if not out.parent.is_dir():
        raise UserError(f"{out.parent} does not exist")
    files = find_audio(root)
    _log(f"manifest: {len(files)} audio files under {root}")
    metas, skipped, t0, shown = [], [], time.time(), 0.0
    # Threads: libsndfile releases the GIL, and most of the time is spent waiting on the disk.
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        futures = {pool.submit(probe, p, complete): p for p in files}
        for n, fut in enumerate(concurrent.futures.as_completed(futures), 1):
            try:
                metas.append(fut.result())
            except BadFile as e:
                skipped.append((futures[fut], str(e)))
            if time.time() - shown > 1 or n == len(files):
                shown = time.time()
                _progress(f"manifest: {n}/{len(files)} files, {n / max(shown - t0, 1e-9):.0f} files/s")
    metas.sort(key=lambda m: m.path)
    skipped.sort()
    write_manifest(metas, out)
    hours = sum(m.duration for m in metas) / 3600
    _log(f"manifest: found {len(files)}, wrote {len(metas)} ({hours:.2f} h) to {out}, skipped {len(skipped)}")
    for path, reason in skipped:
        _log(f"  skipped {path}: {reason}")
    return metas, skipped


def _progress(msg):
    # One rewritten line on a terminal; plain lines in a log file.
    end = "\r" if sys.stderr.isatty() else "\n"
    print(msg.ljust(79) if end == "\r" else msg, file=sys.stderr, end=end, flush=True)


def _read_error(path, e):
    if not os.path.exists(path):
        return "missing"
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        return "empty file"
    return f"unreadable ({getattr(e, 'error_string', None) or e})"  # libsndfile's reason, without the path


# ----------------------------------------------------------------------------------------------------------
# Sidecar metadata and descriptions

def _words(value):
    """AudioCraft's list fields: a list, or a string split on commas and whitespace; lower case."""
    if value is None:
        return []
    items = value if isinstance(value, list) else re.split(r"[,\s]", str(value))
    return [str(v).strip().lower() for v in items if str(v).strip()]


def normalize_info(raw):
    """AudioCraft's MusicInfo preprocessing; missing fields are empty ("" / [] / None), not an error."""
    text = {k: ("" if raw.get(k) is None else str(raw.get(k)).strip()) for k in INFO_FIELDS}
    info = {k: text[k] for k in ("title", "artist", "description")}
    info.update({k: text[k].lower() for k in ("genre", "name", "instrument")})
    key = text["key"].lower()
    info["key"] = "" if key == "none" or "," in key else key
    try:
        info["bpm"] = float(text["bpm"]) if text["bpm"] else None
    except ValueError:
        info["bpm"] = None
    info["moods"], info["keywords"] = _words(raw.get("moods")), _words(raw.get("keywords"))
    return info


def read_info(audio_path):
    """The sidecar `<audio path with .json suffix>` (AudioCraft's convention), normalised. BadFile if not JSON."""
    side = Path(audio_path).with_suffix(".json")
    try:
        text = side.read_text(encoding="utf-8")
    except FileNotFoundError:
        return normalize_info({})
    except (OSError, UnicodeDecodeError) as e:
        raise BadFile(f"sidecar {side} unreadable ({e})") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadFile(f"sidecar {side} is not JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(raw, dict):
        raise BadFile(f"sidecar {side} is not a JSON object")
    return normalize_info(raw)


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
    x = wav.detach().float().cpu().numpy() if torch.is_tensor(wav) else np.asarray(wav, dtype=np.float32)
    fmt = Path(path).suffix[1:].upper()
    buf = io.BytesIO()
    sf.write(buf, np.clip(x.T, -1, 1), sample_rate, format=fmt, subtype=SUBTYPES.get(fmt))
    Path(path).write_bytes(buf.getvalue())


# ----------------------------------------------------------------------------------------------------------
# The token cache: <dir>/cache.json, codes.<rank>.u16 ([frames, K] uint16, appended), index.<rank>.jsonl

def manifest_digest(metas):
    """Names the data a cache was made from: resolved paths, durations, rates and weights."""
    h = hashlib.sha1()
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


def _cache_meta(codec, file, metas):
    return {"format": CACHE_FORMAT, "codec": codec.identity(), "n_q": codec.n_q, "card": codec.card,
            "hop": codec.hop, "sample_rate": codec.sample_rate, "channels": codec.channels,
            "frame_rate": codec.frame_rate, "manifest": str(file), "digest": manifest_digest(metas),
            "files": len(metas)}


def _claim_cache(out, meta):
    """Create the cache directory with its cache.json, or check that an existing one is for the same codec
    and manifest (a cache made by another codec or from other files is refused, never mixed)."""
    out.mkdir(parents=True, exist_ok=True)
    file = out / "cache.json"
    if file.exists():
        old = json.loads(file.read_text())
        if old.get("codec") != meta["codec"]:
            raise UserError(f"token cache {out} was made by codec {old.get('codec')!r}, this codec is "
                            f"{meta['codec']!r}: use another directory or delete this one")
        if old.get("digest") != meta["digest"]:
            raise UserError(f"token cache {out} was made from another manifest ({old.get('manifest')}): "
                            f"use another directory or delete this one")
        return
    text = json.dumps(meta, indent=1) + "\n"
    write_atomic(file, lambda f: f.write(text.encode()))  # ranks racing here write the same content


def _read_index(file):
    """Complete lines of one index shard: a crash can leave a cut last line."""
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


def _cache_rows(out):
    """{manifest index: row} over all shards, each row tagged with its shard."""
    rows = {}
    for s in _shards(out):
        for row in _read_index(Path(out) / f"index.{s}.jsonl"):
            rows.setdefault(row["i"], dict(row, shard=s))
    return rows


def _repair_shard(out, rank, K):
    """Make shard `rank` consistent after a crash (cut index line, codes written without their index line):
    keep the complete rows whose codes are on disk. Returns the next write offset, in frames."""
    codes, index = out / f"codes.{rank}.u16", out / f"index.{rank}.jsonl"
    have = codes.stat().st_size // (2 * K) if codes.exists() else 0
    rows = [r for r in _read_index(index) if "error" in r or r["offset"] + r["frames"] <= have]
    end = max((r["offset"] + r["frames"] for r in rows if "error" not in r), default=0)
    with open(codes, "ab") as f:
        f.truncate(end * 2 * K)
    with open(index, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return end


class _WholeFiles(torch.utils.data.Dataset):
    """Reads whole files for `tokenize` in loader workers, so decoding overlaps encoding."""

    def __init__(self, metas, todo, sample_rate, channels):
        self.metas, self.todo, self.sample_rate, self.channels = metas, todo, sample_rate, channels

    def __len__(self):
        return len(self.todo)

    def __getitem__(self, j):
        i = self.todo[j]
        m = self.metas[i]
        try:
            info = read_info(m.path)
            wav = read_audio(m.path, sample_rate=self.sample_rate, channels=self.channels, expect_rate=m.sample_rate)
            return i, torch.from_numpy(wav), info
        except BadFile as e:
            return i, None, str(e)


def _first(x):
    return x[0]


def _codec_device(codec):
    if isinstance(codec, torch.nn.Module):
        for t in itertools.chain(codec.parameters(), codec.buffers()):
            return t.device
    return torch.device("cpu")


def tokenize(manifest, out, codec, *, batch_size=16, num_workers=0, chunk_seconds=30.0, rank=0, world_size=1,
             verbose=True):
    """Encode every file of a manifest once into the cache directory `out` (whole files, in chunks of
    chunk_seconds batched across files). Resumable: files already in any shard's index are skipped. With
    world_size > 1 this rank takes files i % world_size == rank and writes its own shard. Files that cannot
    be read are recorded with the reason (training counts them against max_skip_fraction) and not retried:
    delete the cache directory to try them again. Returns a summary dict."""
    file = manifest_file(manifest)
    metas = read_manifest(file)
    if codec.card > 1 << 16:
        raise UserError(f"codec card {codec.card} does not fit the cache's uint16 codes")
    out, K, hop = Path(out), codec.n_q, codec.hop
    _claim_cache(out, _cache_meta(codec, file, metas))
    offset = _repair_shard(out, rank, K)  # first: rows it drops are to be done again
    done = _cache_rows(out)
    todo = [i for i in range(len(metas)) if i % world_size == rank and i not in done]
    total_s = sum(metas[i].duration for i in todo)
    summary = {"dir": str(out), "files": len(metas), "done_before": len(done), "written": 0, "skipped": [],
               "seconds": 0.0}
    if verbose and rank == 0:
        _log(f"tokenize: {file} -> {out}: {len(todo)} of {len(metas)} files to do on rank 0 of {world_size} "
             f"({_duration(total_s)} of audio)")
    if not todo:
        return summary
    device = _codec_device(codec)
    chunk = max(1, round(chunk_seconds * codec.frame_rate)) * hop
    reader = torch.utils.data.DataLoader(_WholeFiles(metas, todo, codec.sample_rate, codec.channels),
                                         batch_size=1, collate_fn=_first, num_workers=num_workers,
                                         prefetch_factor=4 if num_workers else None,
                                         generator=torch.Generator().manual_seed(0))  # leave the global RNG alone
    # chunks waiting for a batch; codes, chunk counts and sidecars of files not yet written, in file order
    pending, parts, expected, infos, order = [], {}, {}, {}, []
    t0, shown, read_s = time.time(), 0.0, 0.0
    with open(out / f"codes.{rank}.u16", "ab") as codes_f, open(out / f"index.{rank}.jsonl", "a") as index_f:

        def write_finished():
            nonlocal offset
            while order and len(parts[order[0]]) == expected[order[0]]:
                i = order.pop(0)
                codes = torch.cat(parts.pop(i), dim=-1)  # codes: [K, frames] int64
                del expected[i]
                if codes.min() < 0 or codes.max() >= codec.card:  # uint16 would wrap them silently
                    raise RuntimeError(f"codec gave codes outside [0, {codec.card}) for {metas[i].path}")
                codes_f.write(codes.T.numpy().astype(np.uint16).tobytes())
                codes_f.flush()  # codes before their index line: a crash between the two loses nothing
                row = {"i": i, "path": metas[i].path, "offset": offset, "frames": codes.shape[-1],
                       "info": infos.pop(i)}
                index_f.write(json.dumps(row) + "\n")
                index_f.flush()
                offset += codes.shape[-1]
                summary["written"] += 1
                summary["seconds"] += metas[i].duration

        def encode_pending():
            longest = -(-max(p.shape[-1] for _, p in pending) // hop) * hop
            batch = np.zeros((len(pending), codec.channels, longest), np.float32)  # wav: [B, C, S] float32
            for b, (_, p) in enumerate(pending):
                batch[b, :, :p.shape[-1]] = p
            with torch.inference_mode():
                codes = codec.encode(torch.from_numpy(batch).to(device)).cpu()  # codes: [B, K, S / hop] int64
            for b, (i, p) in enumerate(pending):
                parts[i].append(codes[b, :, :-(-p.shape[-1] // hop)])
            pending.clear()
            write_finished()

        for n, (i, wav, info) in enumerate(reader, 1):
            if wav is None:
                summary["skipped"].append((metas[i].path, info))
                index_f.write(json.dumps({"i": i, "path": metas[i].path, "error": info}) + "\n")
                index_f.flush()
            else:
                pieces = [wav[:, a:a + chunk].numpy() for a in range(0, wav.shape[-1], chunk)]
                parts[i], expected[i], infos[i] = [], len(pieces), info
                order.append(i)
                pending += [(i, p) for p in pieces]
                if len(pending) >= batch_size:
                    encode_pending()
            read_s += metas[i].duration
            now = time.time()
            if verbose and rank == 0 and (now - shown > 2 or n == len(todo)):
                shown, rate = now, read_s / max(now - t0, 1e-9)
                _progress(f"tokenize: {n}/{len(todo)} files, {_duration(read_s)} of audio, {rate:.0f}x real time, "
                          f"ETA {_duration((total_s - read_s) / max(rate, 1e-9))}")
        if pending:
            encode_pending()
    if verbose:
        _log(f"tokenize: rank {rank}: wrote {summary['written']} files ({_duration(summary['seconds'])} of audio) "
             f"in {time.time() - t0:.1f} s, skipped {len(summary['skipped'])}")
        for path, reason in summary["skipped"]:
            _log(f"  skipped {path}: {reason}")
    return summary


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


def _ensure_cache(out, file, metas, codec):
    """{manifest index: row} of a complete cache, tokenizing the split first when needed (by the first
    process to get here; the others wait and reuse it). `data.py tokenize` under torchrun does it in parallel."""
    rows = _cache_rows(out)
    if len(rows) < len(metas):
        with _FileLock(out / ".lock"):
            rows = _cache_rows(out)
            if len(rows) < len(metas):
                _log(f"data: tokenizing {file} into {out} (once; `python data.py tokenize` can do it ahead of time)")
                tokenize(file, out, codec)
                rows = _cache_rows(out)
    return rows


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
                 audio=None, dropped=0):
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
                    item["description"] = describe(item.pop("info"), rng, **self.aug)
                    return item
        else:
            if not 0 <= i < len(self):
                raise IndexError(i)
            for k in range(min(len(self), MAX_DRAWS)):  # an unreadable file: the next one stands in
                item = self._load((i + k) % len(self), 0)
                if item is not None:
                    item["description"] = describe(item.pop("info"))
                    return item
        raise UserError(f"{self.name}: no readable file after {MAX_DRAWS} tries (see the warnings above)")

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
        return {"codes": torch.from_numpy(codes), "valid": valid, "info": json.loads(self.infos[f])}

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
        return {"wav": torch.from_numpy(wav), "valid": valid, "info": info}


def open_split(dataset, split, *, codec, train, segment_duration=30.0, seed=0, token_cache=False, cache_dir=None,
               min_segment_ratio=0.8, sample_on_weight=False, sample_on_duration=False, merge_text_p=0.25,
               drop_desc_p=0.5, keep_field_p=0.5, max_skip_fraction=0.05):
    """The Segments of one split of a dataset directory.

    With token_cache the split is tokenized once into cache_path(...) and items hold codes; otherwise items
    hold wav at the codec's rate and channels for the trainer to encode. Ranks may call it together or one
    after the other: a missing cache is built once, by whichever comes first."""
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
    weights = None
    if sample_on_weight or sample_on_duration:
        weights = np.array([(m.weight if sample_on_weight and m.weight is not None else 1.0)
                            * (m.duration if sample_on_duration else 1.0) for m in metas])
    common = dict(train=train, segment_frames=T, hop=codec.hop, frame_rate=codec.frame_rate, seed=seed,
                  min_segment_ratio=min_segment_ratio, merge_text_p=merge_text_p, drop_desc_p=drop_desc_p,
                  keep_field_p=keep_field_p, max_skip_fraction=max_skip_fraction)
    name = f"{root.name}/{split}"
    if not token_cache:
        frames = [max(1, math.ceil(m.duration * codec.frame_rate - 1e-6)) for m in metas]
        audio = {"sample_rate": codec.sample_rate, "channels": codec.channels,
                 "rates": np.array([m.sample_rate for m in metas])}
        return Segments(name, [m.path for m in metas], frames, weights=weights, audio=audio, **common)
    out = cache_path(cache_root, codec, file, metas)
    _claim_cache(out, _cache_meta(codec, file, metas))
    rows = _ensure_cache(out, file, metas, codec)
    ok = [i for i in range(len(metas)) if "error" not in rows[i]]
    bad = [rows[i] for i in range(len(metas)) if "error" in rows[i]]
    if bad:
        _log(f"warning: data: {name}: {len(bad)} of {len(metas)} files were unreadable when {out} was made, "
             f"e.g. {bad[0]['path']}: {bad[0]['error']}")
        if len(bad) > max_skip_fraction * len(metas) or not ok:
            raise UserError(f"{name}: {len(bad)} of {len(metas)} files are unreadable (see {out}/index.*.jsonl), "
                            f"more than max_skip_fraction={max_skip_fraction}: fix them or rebuild the manifest")
    cache = {"dir": str(out), "n_q": codec.n_q, "shard": np.array([rows[i]["shard"] for i in ok], dtype=np.int32),
             "offset": np.array([rows[i]["offset"] for i in ok], dtype=np.int64)}
    return Segments(name, [metas[i].path for i in ok], [rows[i]["frames"] for i in ok],
                    weights=None if weights is None else weights[ok], cache=cache,
                    infos=[json.dumps(rows[i]["info"]) for i in ok], dropped=len(bad), **common)


# ----------------------------------------------------------------------------------------------------------
# Batches

def collate(items):
    """{codes [B, K, T] | wav [B, C, S], valid [B, T], descriptions list[str], paths list[str]}."""
    key = "codes" if "codes" in items[0] else "wav"
    stack = lambda k: torch.from_numpy(np.stack([it[k].numpy() for it in items]))  # noqa: E731 (numpy: one thread)
    return {key: stack(key), "valid": stack("valid"), "descriptions": [it["description"] for it in items],
            "paths": [it["path"] for it in items]}


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

def main(argv):
    parser = argparse.ArgumentParser(prog="data.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("manifest", help="walk ROOT for audio, write an AudioCraft manifest")
    p.add_argument("root")
    p.add_argument("out")
    p.add_argument("--workers", type=int, default=16)
    p.add_argument("--complete", action="store_true", help="decode every file: peak amplitude, NaN check")
    p = sub.add_parser("tokenize", help="encode a manifest (or every split of a dataset) into the token cache")
    p.add_argument("manifest", help="data.jsonl[.gz], a split directory, or a dataset directory (all splits)")
    p.add_argument("cache_dir", help="the cache_dir of the training config")
    p.add_argument("--codec", required=True, help='codec path, //reference/..., or "debug"')
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--num_workers", type=int, default=4)
    p.add_argument("--chunk_seconds", type=float, default=30.0)
    args = parser.parse_args(argv)
    if args.cmd == "manifest":
        build_manifest(args.root, args.out, args.workers, args.complete)
    else:
        _tokenize_cli(args)
    return 0


def _tokenize_cli(args):
    import codec as codec_lib
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    src = resolve_path(map_dataset_path(args.manifest))
    if src.is_dir() and not any((src / n).is_file() for n in ("data.jsonl", "data.jsonl.gz")):
        files = [manifest_file(src / s) for s in SPLITS if (src / s).is_dir()]
        if not files:
            raise UserError(f"{src} holds no data.jsonl[.gz] and no split directories ({', '.join(SPLITS)})")
    else:
        files = [manifest_file(src)]
    metas = [read_manifest(f) for f in files]  # every bad line is reported before anything is written
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    codec = codec_lib.load_codec(args.codec).to(device)
    cache_root = resolve_path(args.cache_dir)
    for file, m in zip(files, metas):
        out = cache_path(cache_root, codec, file, m)
        tokenize(file, out, codec, batch_size=args.batch_size, num_workers=args.num_workers,
                 chunk_seconds=args.chunk_seconds, rank=rank, world_size=world)
        if rank == 0:
            print(out)


if __name__ == "__main__":
    cli(main, help=False)  # argparse answers --help, per subcommand too
