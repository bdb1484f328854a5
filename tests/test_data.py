"""data.py: manifests, sidecars, descriptions, audio segments, the token cache, sampling.

    python -m pytest tests/test_data.py -q --durations=5
"""
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import env  # noqa: E402
from env import UserError  # noqa: E402

torch.set_num_threads(2)


class FakeCodec:
    """Stand-in for codec.py with its interface: frames the audio (hop 640 at 32 kHz) and quantises each
    frame's energy and zero-crossing rate. Frame-local, so chunked encoding equals whole-file encoding."""
    sample_rate, channels, hop, n_q, card, frame_rate = 32000, 1, 640, 2, 64, 50.0

    def __init__(self, name="fake-1", fail_after=None):
        self.name, self.fail_after, self.calls = name, fail_after, 0

    def identity(self):
        return self.name

    def encode(self, wav):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("simulated crash")
        B, C, S = wav.shape
        T = -(-S // self.hop)
        x = torch.nn.functional.pad(wav.mean(1), (0, T * self.hop - S)).view(B, T, self.hop)
        rms = x.pow(2).mean(-1).sqrt()
        zc = (x[..., 1:] * x[..., :-1] < 0).float().mean(-1)
        codes = torch.stack([rms * 4 * self.card, zc * self.card], 1)
        return codes.long().clamp(0, self.card - 1)  # codes: [B, K, T] int64


def tone(seconds, sr, channels=1, freq=440.0, seed=0):
    """A sine whose loudness ramps up, plus a little noise: frames at different times differ."""
    t = np.arange(int(seconds * sr)) / sr
    x = np.sin(2 * np.pi * freq * t) * (0.1 + 0.8 * t / max(seconds, 1e-9))
    x = x + 0.01 * np.random.default_rng(seed).standard_normal(len(t))
    return np.stack([x * (0.9 ** c) for c in range(channels)], 1).astype(np.float32)  # [S, C]


SUBTYPES = {".wav": "PCM_16", ".flac": "PCM_16", ".ogg": "VORBIS"}


def write(path, seconds=1.0, sr=32000, channels=1, side=None, seed=0):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, tone(seconds, sr, channels, seed=seed), sr, subtype=SUBTYPES[path.suffix])
    if side is not None:
        path.with_suffix(".json").write_text(json.dumps(side))
    return path


def make_dataset(root, splits):
    """splits: {split: [(name, seconds, sr, channels)]} -> dataset dir with manifests (built by data.py)."""
    for split, files in splits.items():
        for k, (name, seconds, sr, channels) in enumerate(files):
            write(root / "audio" / split / name, seconds, sr, channels, seed=k,
                  side={"description": f"{split} clip {k}", "genre": "Test", "bpm": 100 + k})
        data.build_manifest(root / "audio" / split, _split_dir(root, split) / "data.jsonl")
    return root


def _split_dir(root, split):
    (root / split).mkdir(parents=True, exist_ok=True)
    return root / split


SEGMENTS = dict(segment_duration=1.0, seed=3, min_segment_ratio=0.8, merge_text_p=0.25, drop_desc_p=0.5,
                keep_field_p=0.5, max_skip_fraction=0.05)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    return make_dataset(root, {
        "train": [("a.wav", 2.5, 32000, 1), ("b.flac", 0.6, 44100, 2), ("c.ogg", 3.0, 48000, 2),
                  ("d.wav", 1.5, 16000, 1)],
        "valid": [("v0.wav", 0.5, 32000, 1), ("v1.flac", 1.2, 48000, 2), ("v2.wav", 2.0, 16000, 1)]})


def entry_codes(out, path, K=FakeCodec.n_q):
    """codes [K, frames] of one file, read back from a cache's memmap through its index."""
    rows = {r["path"]: r for r in data._cache_rows(Path(out)).values()}
    r = rows[str(path)]
    mm = np.memmap(Path(out) / f"codes.{r['shard']}.u16", dtype=np.uint16, mode="r").reshape(-1, K)
    return torch.from_numpy(mm[r["offset"]:r["offset"] + r["frames"]].T.astype(np.int64))


def reference_codes(codec, path):
    wav = data.read_audio(path, sample_rate=codec.sample_rate, channels=codec.channels)
    return codec.encode(torch.from_numpy(wav)[None])[0]


# ----------------------------------------------------------------------------------------------------------
# Manifests and metadata

def test_manifest_cli_lists_every_format_follows_links_and_reports_skips(tmp_path, capsys):
    root = tmp_path / "music"
    write(root / "a.wav", 1.0, 16000, 1)
    write(root / "b.flac", 0.5, 44100, 2)
    write(root / "sub" / "c.ogg", 1.5, 48000, 2)
    write(root / "d.wav", 0.25, 32000, 2)
    write(tmp_path / "elsewhere" / "e.flac", 0.5, 48000, 1)
    os.symlink(tmp_path / "elsewhere", root / "link")
    (root / "bad.wav").write_bytes(b"RIFF not really a wave file" * 10)
    sf.write(root / "empty.wav", np.zeros((0, 1), np.float32), 32000)
    (root / "notes.txt").write_text("not audio")
    out = tmp_path / "data.jsonl.gz"
    assert data.main(["manifest", str(root), str(out), "--workers=3"]) == 0
    with gzip.open(out, "rt") as f:
        rows = [json.loads(line) for line in f]
    assert [Path(r["path"]).name for r in rows] == ["a.wav", "b.flac", "d.wav", "e.flac", "c.ogg"]
    assert all(set(r) == {"path", "duration", "sample_rate", "amplitude", "weight", "info_path"} for r in rows)
    assert [r["sample_rate"] for r in rows] == [16000, 44100, 32000, 48000, 48000]
    assert rows[0]["duration"] == pytest.approx(1.0) and rows[4]["duration"] == pytest.approx(1.5, abs=0.01)
    assert rows[3]["path"] == str(root / "link" / "e.flac")
    err = capsys.readouterr().err
    assert "found 7, wrote 5" in err and "skipped 2" in err
    assert f"skipped {root / 'bad.wav'}: unreadable" in err and f"skipped {root / 'empty.wav'}: no audio" in err
    with pytest.raises(UserError, match="is not a directory"):
        data.main(["manifest", str(tmp_path / "nowhere"), str(tmp_path / "other.jsonl")])
    assert not (tmp_path / "other.jsonl").exists()


def test_manifest_complete_records_peak_and_skips_nan(tmp_path, capsys):
    root = tmp_path / "music"
    write(root / "a.flac", 1.0)
    nan = tone(0.5, 32000)
    nan[100] = np.nan
    sf.write(root / "nan.wav", nan, 32000, subtype="FLOAT")
    metas, skipped = data.build_manifest(root, tmp_path / "m.jsonl", complete=True)
    assert len(metas) == 1 and metas[0].amplitude == pytest.approx(np.abs(sf.read(root / "a.flac")[0]).max(), abs=1e-4)
    assert skipped == [(str(root / "nan.wav"), "NaN or infinite samples")]


@pytest.mark.parametrize("line, message", [
    ('{"path": "a.wav", "duration": 1.0', "line 2: not JSON"),
    ('{"path": "a.wav", "sample_rate": 32000}', 'line 2: missing field "duration"'),
    ('{"path": "a.wav", "duration": "long", "sample_rate": 32000}', "line 2: duration, sample_rate"),
    ('["a.wav", 1.0, 32000]', "line 2: expected a JSON object"),
    ('{"path": "a.wav", "duration": 0, "sample_rate": 32000}', "line 2: duration 0.0"),
])
def test_manifest_errors_name_the_file_and_line(tmp_path, line, message):
    good = '{"path": "a.wav", "duration": 1.0, "sample_rate": 32000}'
    (tmp_path / "data.jsonl").write_text(good + "\n" + line + "\n")
    with pytest.raises(UserError, match=str(tmp_path / "data.jsonl") + " " + message.replace("(", r"\(")):
        data.read_manifest(tmp_path)


def test_manifest_directory_gz_relative_paths_and_dataset_mappers(tmp_path, monkeypatch):
    split = tmp_path / "train"
    write(split / "x.wav")
    with gzip.open(split / "data.jsonl.gz", "wt") as f:
        f.write(json.dumps({"path": "x.wav", "duration": 1.0, "sample_rate": 32000}) + "\n")
        f.write(json.dumps({"path": "/mounted/elsewhere/x.wav", "duration": 1.0, "sample_rate": 32000}) + "\n")
    team = tmp_path / "team.yaml"
    team.write_text(f"default:\n  dataset_mappers:\n    '^/mounted/elsewhere': '{split}'\n")
    monkeypatch.setenv("AUDIOCRAFT_CONFIG", str(team))
    monkeypatch.delenv("AUDIOCRAFT_CLUSTER", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    env.reset()
    try:
        metas = data.read_manifest(split)
    finally:
        env.reset()
    assert [m.path for m in metas] == [str(split / "x.wav")] * 2
    assert metas[0].weight is None and metas[0].sample_rate == 32000


def test_sidecar_fields_are_normalised_missing_are_empty_and_bad_json_is_a_bad_file(tmp_path):
    audio = write(tmp_path / "song.wav", side={"title": " My Song ", "key": "E Minor", "bpm": "120", "genre": "Rock ",
                                               "moods": "Happy, energetic", "keywords": ["Guitar", " drums"],
                                               "instrument": "Guitar", "extra": 1})
    info = data.read_info(audio)
    assert info == {"title": "My Song", "artist": "", "description": "", "genre": "rock", "name": "",
                    "instrument": "guitar", "key": "e minor", "bpm": 120.0, "moods": ["happy", "energetic"],
                    "keywords": ["guitar", "drums"]}
    assert data.read_info(tmp_path / "no_sidecar.wav")["description"] == ""
    assert data.normalize_info({"key": "C, G", "bpm": ""}) == data.normalize_info({})
    assert data.normalize_info({"bpm": "fast"})["bpm"] is None
    (tmp_path / "broken.json").write_text("{'single quotes': 1}")
    with pytest.raises(data.BadFile, match="broken.json is not JSON"):
        data.read_info(tmp_path / "broken.wav")


def test_sidecar_lists_are_joined_and_other_kinds_skip_the_file_with_the_field_named(tmp_path):
    info = data.normalize_info({"description": ["A calm piano piece.", " Slow. "], "genre": ["Rock", "Pop"],
                                "title": 1999, "artist": 2.5, "moods": ["Happy", 3], "bpm": [120]})
    assert (info["description"], info["genre"], info["title"], info["artist"]) == \
        ("A calm piano piece. Slow.", "rock, pop", "1999", "2.5")
    assert info["moods"] == ["happy", "3"] and info["bpm"] is None
    assert data.normalize_info({"bpm": float("nan")})["bpm"] is None
    for side, shown in [({"description": {"en": "calm"}}, '"description" is dict {"en": "calm"}'),
                        ({"description": 42}, '"description" is int 42'),
                        ({"description": ["calm", 1]}, '"description" is list ["calm", 1]'),
                        ({"genre": True}, '"genre" is bool true'), ({"moods": {"a": 1}}, '"moods" is dict')]:
        audio = write(tmp_path / "song.wav", side=side)
        with pytest.raises(data.BadFile) as e:
            data.read_info(audio)
        assert str(e.value).startswith(f"sidecar {tmp_path / 'song.json'}: {shown}"), str(e.value)
        assert "expected a string or a list of strings" in str(e.value)


def test_descriptions_merge_drop_and_keep_metadata_with_their_probabilities():
    info = data.normalize_info({"description": "Calm piano.", "key": "C major", "bpm": 90, "genre": "classical",
                                "moods": ["calm"], "instrument": "piano", "keywords": ["soft", "slow"]})
    rng = np.random.default_rng(0)
    assert data.describe(info, rng, merge_text_p=0.0) == "Calm piano."
    merged = data.describe(info, rng, merge_text_p=1.0, drop_desc_p=1.0, keep_field_p=1.0)
    assert "Calm piano" not in merged and sorted(merged.split(". ")) == sorted(
        ["key: c major", "bpm: 90", "genre: classical", "moods: calm", "instrument: piano", "keywords: soft, slow"])
    assert data.describe(info, rng, merge_text_p=1.0, drop_desc_p=0.0, keep_field_p=0.0) == "Calm piano"
    with_desc = with_genre = 0
    for seed in range(2000):
        text = data.describe(info, np.random.default_rng(seed), merge_text_p=1.0, drop_desc_p=0.3, keep_field_p=0.6)
        with_desc += text.startswith("Calm piano")
        with_genre += "genre: classical" in text
    assert abs(with_desc / 2000 - 0.7) < 0.04 and abs(with_genre / 2000 - 0.6) < 0.04
    assert data.describe(dict(info, description="")) == ("key: c major. bpm: 90. genre: classical. moods: calm. "
                                                         "instrument: piano. keywords: soft, slow")


# ----------------------------------------------------------------------------------------------------------
# Audio

@pytest.mark.parametrize("suffix, sr, channels", [(".wav", 16000, 1), (".flac", 44100, 2), (".ogg", 48000, 2),
                                                  (".wav", 32000, 2), (".flac", 48000, 1)])
def test_read_audio_seeks_resamples_and_converts_channels(tmp_path, suffix, sr, channels):
    path = write(tmp_path / f"x{suffix}", 2.0, sr, channels)
    full, _ = sf.read(path, dtype="float32", always_2d=True)  # [S, C] as decoded (ogg is lossy)
    ref = soxr.resample(full.mean(1, keepdims=True), sr, 32000)[:, 0]
    seg = data.read_audio(path, 0.5, 1.0, sample_rate=32000, channels=1)
    assert seg.shape == (1, 32000) and seg.dtype == np.float32
    # Away from the segment's edges (the resampler's transients) it is the same audio at the same time.
    np.testing.assert_allclose(seg[0, 1000:-1000], ref[16000 + 1000:48000 - 1000], atol=2e-3)
    stereo = data.read_audio(path, 1.5, 1.0, sample_rate=32000, channels=2)
    assert stereo.shape == (2, 16000)  # only half a second is left
    if channels == 1:
        np.testing.assert_array_equal(stereo[0], stereo[1])


def test_unusable_audio_is_a_bad_file_with_its_reason(tmp_path):
    cases = {tmp_path / "missing.wav": "missing", tmp_path / "corrupt.flac": "unreadable",
             tmp_path / "empty.wav": "no audio samples", tmp_path / "nan.wav": "NaN or infinite"}
    (tmp_path / "corrupt.flac").write_bytes(b"fLaC" + bytes(200))
    sf.write(tmp_path / "empty.wav", np.zeros((0, 1), np.float32), 32000)
    sf.write(tmp_path / "nan.wav", np.full((100, 1), np.nan, np.float32), 32000, subtype="FLOAT")
    for path, reason in cases.items():
        with pytest.raises(data.BadFile, match=reason):
            data.read_audio(path, sample_rate=32000, channels=1)
    write(tmp_path / "rate.wav", 0.5, 48000)
    with pytest.raises(data.BadFile, match="sample rate is 48000 Hz but the manifest says 44100 Hz"):
        data.read_audio(tmp_path / "rate.wav", expect_rate=44100)
    with pytest.raises(data.BadFile, match="no audio at 9.00 s: the file lasts 0.50 s"):
        data.read_audio(tmp_path / "rate.wav", 9.0, 1.0)


def test_save_audio_writes_what_read_audio_reads(tmp_path):
    wav = torch.from_numpy(np.ascontiguousarray(tone(0.5, 32000, 2).T))  # [C, S]
    for suffix in (".wav", ".flac"):
        data.save_audio(tmp_path / f"x{suffix}", wav, 32000)
        back = data.read_audio(tmp_path / f"x{suffix}")
        assert back.shape == (2, 16000) and sf.info(tmp_path / f"x{suffix}").samplerate == 32000
        np.testing.assert_allclose(back, wav.numpy(), atol=1.01 / 32768)
    data.save_audio(tmp_path / "mono.wav", wav[0].numpy() * 3, 32000)  # [S], clipped to [-1, 1]
    assert data.read_audio(tmp_path / "mono.wav").shape == (1, 16000)
    assert np.abs(sf.read(tmp_path / "mono.wav")[0]).max() <= 1


# ----------------------------------------------------------------------------------------------------------
# Segments and sampling

def test_eval_items_are_file_starts_padded_with_a_mask(dataset):
    codec = FakeCodec()
    ds = data.open_split(str(dataset), "valid", codec=codec, train=False, **SEGMENTS)
    assert len(ds) == 3
    for k, (name, seconds) in enumerate([("v0.wav", 0.5), ("v1.flac", 1.2), ("v2.wav", 2.0)]):
        item = ds[k]
        assert item["wav"].shape == (1, 32000) and item["valid"].shape == (50,)
        assert item["description"] == f"valid clip {k}" and item["path"].endswith(name)
        real = min(32000, round(seconds * 32000))
        assert int(item["valid"].sum()) == -(-real // 640)
        ref = data.read_audio(item["path"], 0.0, 1.0, sample_rate=32000, channels=1)
        torch.testing.assert_close(item["wav"][:, :real], torch.from_numpy(ref[:, :real]))
        assert not item["wav"][:, real:].any()
    with pytest.raises(IndexError):
        ds[3]


def test_train_items_are_a_function_of_seed_and_index_only(dataset):
    codec = FakeCodec()
    a = data.open_split(str(dataset), "train", codec=codec, train=True, **SEGMENTS)
    b = data.open_split(str(dataset), "train", codec=codec, train=True, **SEGMENTS)
    first = [a[i] for i in (5, 1, 12)]
    again = [b[i] for i in (12, 1, 5)][::-1]
    for x, y in zip(first, again):
        assert torch.equal(x["wav"], y["wav"]) and torch.equal(x["valid"], y["valid"])
        assert (x["description"], x["path"]) == (y["description"], y["path"])
    other = data.open_split(str(dataset), "train", codec=codec, train=True, **dict(SEGMENTS, seed=4))
    assert any(not torch.equal(a[i]["wav"], other[i]["wav"]) for i in range(5))


def cached_split(dataset, tmp_path, split="train", codec=None, **kw):
    return data.open_split(str(dataset), split, codec=codec or FakeCodec(), train=split == "train",
                           token_cache=True, cache_dir=str(tmp_path / "cache"), **dict(SEGMENTS, **kw))


def test_train_segments_hold_min_segment_ratio_of_real_audio_at_random_starts(dataset, tmp_path):
    ds = cached_split(dataset, tmp_path, segment_duration=2.0)
    T, need = 100, 80
    frames = {ds.paths[f]: int(ds.frames[f]) for f in range(len(ds))}
    starts = set()
    for i in range(300):
        item = ds[i]
        n = int(item["valid"].sum())
        assert n >= min(need, frames[item["path"]])
        assert torch.equal(item["valid"], torch.arange(T) < n)  # real frames first, then padding
        if frames[item["path"]] > T:
            starts.add(tuple(item["codes"][0, :3].tolist()))
    assert len(starts) > 20  # starts vary across the file


def test_sampling_on_weight_and_duration(tmp_path):
    split = tmp_path / "w" / "train"
    rows = []
    for name, seconds, weight in [("a.wav", 1.0, 1.0), ("b.wav", 2.0, 1.0), ("c.wav", 1.0, 3.0)]:
        write(split / name, seconds)
        rows.append({"path": name, "duration": seconds, "sample_rate": 32000, "weight": weight})
    (split / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def shares(**kw):
        ds = data.open_split(str(tmp_path / "w"), "train", codec=FakeCodec(), train=True, token_cache=True,
                             cache_dir=str(tmp_path / "cache"), **dict(SEGMENTS, **kw))
        names = [Path(ds[i]["path"]).name for i in range(1500)]
        return np.array([names.count(n) for n in ("a.wav", "b.wav", "c.wav")]) / 1500

    np.testing.assert_allclose(shares(), [1 / 3, 1 / 3, 1 / 3], atol=0.05)
    np.testing.assert_allclose(shares(sample_on_duration=True), [0.25, 0.5, 0.25], atol=0.05)
    np.testing.assert_allclose(shares(sample_on_weight=True), [0.2, 0.2, 0.6], atol=0.05)
    np.testing.assert_allclose(shares(sample_on_weight=True, sample_on_duration=True), [1 / 6, 2 / 6, 3 / 6],
                               atol=0.05)


def test_sampling_on_duration_trusts_the_cache_over_the_manifest_and_says_so_once(tmp_path, capsys):
    split = tmp_path / "w" / "train"
    write(split / "a.wav", 3.0)
    write(split / "b.wav", 1.0)
    write(split / "c.wav", 1.02)
    rows = [{"path": "a.wav", "duration": 1.0, "sample_rate": 32000},   # the manifest is wrong about a.wav
            {"path": "b.wav", "duration": 1.0, "sample_rate": 32000},
            {"path": "c.wav", "duration": 1.0, "sample_rate": 32000}]   # one frame off: rounding, not an error
    (split / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = data.open_split(str(tmp_path / "w"), "train", codec=FakeCodec(), train=True, token_cache=True,
                         cache_dir=str(tmp_path / "cache"), **dict(SEGMENTS, sample_on_duration=True))
    names = [Path(ds[i]["path"]).name for i in range(1500)]
    shares = np.array([names.count(n) for n in ("a.wav", "b.wav", "c.wav")]) / 1500
    np.testing.assert_allclose(shares, [3 / 5.02, 1 / 5.02, 1.02 / 5.02], atol=0.05)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert warnings == [f"warning: data: w/train: 1 of 3 files last longer or shorter than the manifest says (worst: "
                        f"{split / 'a.wav'}: 1.00 s in the manifest, 3.00 s of audio); the audio's durations are "
                        f"used (rebuild the manifest to make them agree)"]
    data.open_split(str(tmp_path / "w"), "train", codec=FakeCodec(), train=True, token_cache=True, rank=1,
                    world_size=2, cache_dir=str(tmp_path / "cache"), **dict(SEGMENTS, sample_on_duration=True))
    assert "warning" not in capsys.readouterr().err  # rank 0 says it, for every rank


# ----------------------------------------------------------------------------------------------------------
# Token cache

def test_token_cache_round_trip_equals_encoding_each_file(dataset, tmp_path):
    codec = FakeCodec()
    out = tmp_path / "cache"
    summary = data.tokenize(dataset / "train", out, codec, batch_size=3, chunk_seconds=0.5, verbose=False)
    assert summary["written"] == 4 and not summary["skipped"]
    for m in data.read_manifest(dataset / "train"):
        ref = reference_codes(codec, m.path)
        assert ref.shape[-1] == -(-round(m.duration * 32000) // 640)
        torch.testing.assert_close(entry_codes(out, m.path), ref, rtol=0, atol=0)
    meta = json.loads((out / "cache.json").read_text())
    assert (meta["codec"], meta["n_q"], meta["card"], meta["files"]) == ("fake-1", 2, 64, 4)
    # Eval items from the cache are the first segment_frames of those codes, masked past the end.
    ds = cached_split(dataset, tmp_path, "valid", segment_duration=1.0)
    for k in range(len(ds)):
        item = ds[k]
        ref = reference_codes(codec, item["path"])[:, :50]
        n = ref.shape[-1]
        assert item["codes"].shape == (2, 50) and int(item["valid"].sum()) == n
        assert torch.equal(item["codes"][:, :n], ref) and not item["codes"][:, n:].any()


def test_tokenize_resumes_after_a_crash_and_repairs_partial_writes(dataset, tmp_path):
    full = tmp_path / "full"
    data.tokenize(dataset / "train", full, FakeCodec(), batch_size=1, verbose=False)
    out = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        data.tokenize(dataset / "train", out, FakeCodec(fail_after=2), batch_size=1, verbose=False)
    assert len(data._cache_rows(out)) == 2
    with open(out / "codes.0.u16", "ab") as f:   # codes written, process killed before the index line
        f.write(np.arange(6, dtype=np.uint16).tobytes())
    with open(out / "index.0.jsonl", "a") as f:  # and a line cut in half
        f.write('{"i": 3, "path": "x", "off')
    codec = FakeCodec()
    summary = data.tokenize(dataset / "train", out, codec, batch_size=1, verbose=False)
    assert summary["written"] == 2 and codec.calls == 2  # only the files not done before
    assert (out / "codes.0.u16").stat().st_size == (full / "codes.0.u16").stat().st_size
    for m in data.read_manifest(dataset / "train"):
        assert torch.equal(entry_codes(out, m.path), entry_codes(full, m.path))


class Crashing:
    """A codec that dies in its n+1-th encode."""

    def __init__(self, codec, after):
        self.codec, self.after, self.calls = codec, after, 0

    def __getattr__(self, name):
        return getattr(self.codec, name)

    def encode(self, wav):
        self.calls += 1
        if self.calls > self.after:
            raise RuntimeError("simulated crash")
        return self.codec.encode(wav)


def test_codes_do_not_depend_on_batching_sharding_or_resuming(tmp_path):
    """A real codec (convolutions see the padding, an LSTM rounds by batch shape): a file's codes are the same
    whatever it was batched with, whichever rank encoded it, and however a crashed build was resumed."""
    import formats
    codec = formats.load_codec("debug")
    split = tmp_path / "ds" / "train"
    rows = []
    for k, seconds in enumerate([0.37, 1.3, 2.15, 0.8, 1.74, 0.52]):
        write(split / f"{k}.wav", seconds, seed=k)
        rows.append({"path": f"{k}.wav", "duration": seconds, "sample_rate": 32000})
    (split / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    kw = dict(verbose=False)  # one chunk per file
    data.tokenize(split, tmp_path / "clean", codec, batch_size=3, **kw)
    sharded = tmp_path / "sharded"
    with pytest.raises(RuntimeError, match="simulated crash"):  # rank 1 dies in its first encode
        data.tokenize(split, sharded, Crashing(codec, 0), batch_size=3, rank=1, world_size=2, **kw)
    data.tokenize(split, sharded, codec, batch_size=1, rank=1, world_size=2, **kw)  # the cache keeps batch 3
    data.tokenize(split, sharded, codec, batch_size=7, rank=0, world_size=2, **kw)
    for m in data.read_manifest(split):
        ref = entry_codes(tmp_path / "clean", m.path, codec.n_q)
        assert ref.shape[-1] == -(-round(m.duration * 32000) // codec.hop)
        assert torch.equal(entry_codes(sharded, m.path, codec.n_q), ref), m.path
    assert json.loads((sharded / "cache.json").read_text())["batch"] == 3


def test_an_edited_sidecar_is_read_again_and_a_rerecorded_file_encoded_again(tmp_path):
    split = tmp_path / "ds" / "train"
    for k in range(3):
        write(split / f"{k}.wav", 1.0, seed=k, side={"description": f"clip {k}"})
    (split / "data.jsonl").write_text("".join(json.dumps({"path": f"{k}.wav", "duration": 1.0,
                                                          "sample_rate": 32000}) + "\n" for k in range(3)))
    codec = FakeCodec()
    kw = dict(codec=codec, train=False, token_cache=True, cache_dir=str(tmp_path / "cache"), **SEGMENTS)

    def later(path):  # a real edit comes later than the file it replaces (mtime resolution is coarse on some disks)
        st = os.stat(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))

    ds = data.open_split(str(tmp_path / "ds"), "train", **kw)
    calls, size = codec.calls, (split / "1.wav").stat().st_size
    (split / "0.json").write_text(json.dumps({"description": "clip zero, described better"}))
    later(split / "0.json")
    write(split / "1.wav", 1.0, seed=99)  # another take, the same length: the same size
    later(split / "1.wav")
    assert (split / "1.wav").stat().st_size == size
    ds = data.open_split(str(tmp_path / "ds"), "train", **kw)
    assert [ds[k]["description"] for k in range(3)] == ["clip zero, described better", "clip 1", "clip 2"]
    assert codec.calls == calls + 1  # 1.wav encoded again; 0.wav's codes kept, its sidecar read again
    out = Path(ds.cache["dir"])
    assert torch.equal(entry_codes(out, split / "1.wav"), reference_codes(FakeCodec(), split / "1.wav"))
    assert torch.equal(ds[1]["codes"][:, :50], reference_codes(FakeCodec(), split / "1.wav"))
    ds = data.open_split(str(tmp_path / "ds"), "train", **kw)  # nothing changed since: nothing done
    assert codec.calls == calls + 1 and ds[0]["description"] == "clip zero, described better"
    (split / "2.wav").unlink()  # gone: recorded as unreadable, and tried again when it is back
    with pytest.raises(UserError, match="1 of 3 files are unreadable"):
        data.open_split(str(tmp_path / "ds"), "train", **kw)
    write(split / "2.wav", 1.0, seed=2)
    assert len(data.open_split(str(tmp_path / "ds"), "train", **kw)) == 3


def test_a_cache_from_another_codec_or_manifest_is_refused(dataset, tmp_path):
    out = tmp_path / "cache"
    data.tokenize(dataset / "valid", out, FakeCodec("codec-a"), verbose=False)
    with pytest.raises(UserError, match="made by codec 'codec-a', this codec is 'codec-b'"):
        data.tokenize(dataset / "valid", out, FakeCodec("codec-b"), verbose=False)
    with pytest.raises(UserError, match="made from another manifest"):
        data.tokenize(dataset / "train", out, FakeCodec("codec-a"), verbose=False)


def test_tokenize_shards_by_rank_and_training_reads_every_shard(dataset, tmp_path):
    codec = FakeCodec()
    file = data.manifest_file(dataset / "train")
    out = data.cache_path(tmp_path / "cache", codec, file, data.read_manifest(file))
    assert out.parent.name == "fake-1" and out.name.startswith("train-")
    for rank in (1, 0):
        s = data.tokenize(file, out, codec, rank=rank, world_size=2, verbose=False)
        assert s["written"] == 2
    rows = data._cache_rows(out)
    assert sorted(rows) == [0, 1, 2, 3] and {r["shard"] for r in rows.values()} == {0, 1}
    assert all(r["shard"] == i % 2 for i, r in rows.items())
    calls = codec.calls
    ds = cached_split(dataset, tmp_path, codec=codec)  # finds the finished cache: encodes nothing
    assert codec.calls == calls and len(ds) == 4
    for i in range(20):
        item = ds[i]
        assert item["codes"].shape == (2, 50) and item["description"] is not None


def test_open_split_tokenizes_once_and_counts_unreadable_files(tmp_path, capsys):
    split = tmp_path / "ds" / "train"
    rows = []
    for k in range(30):
        write(split / f"{k}.wav", 0.3, side={"description": f"clip {k}"})
        rows.append({"path": f"{k}.wav", "duration": 0.3, "sample_rate": 32000})
    (split / "bad.wav").write_bytes(b"garbage" * 30)
    rows.append({"path": "bad.wav", "duration": 0.3, "sample_rate": 32000})
    (split / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    codec = FakeCodec()
    kw = dict(codec=codec, train=True, token_cache=True, cache_dir=str(tmp_path / "cache"), **SEGMENTS)
    ds = data.open_split(str(tmp_path / "ds"), "train", **kw)
    assert len(ds) == 30 and ds.stats()["dropped"] == 1 and codec.calls > 0
    assert "1 of 31 files were unreadable" in capsys.readouterr().err
    calls = codec.calls
    data.open_split(str(tmp_path / "ds"), "train", **kw)
    assert codec.calls == calls
    with pytest.raises(UserError, match=r"1 of 31 files are unreadable .* max_skip_fraction=0.01"):
        data.open_split(str(tmp_path / "ds"), "train", **dict(kw, max_skip_fraction=0.01))


# ----------------------------------------------------------------------------------------------------------
# Loaders

def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def same_batches(xs, ys):
    return all(torch.equal(x["codes"], y["codes"]) and torch.equal(x["valid"], y["valid"])
               and x["descriptions"] == y["descriptions"] for x, y in zip(xs, ys)) and len(xs) == len(ys)


def test_loader_resumes_exactly_and_workers_change_nothing(dataset, tmp_path):
    ds = cached_split(dataset, tmp_path)
    run = take(data.make_loader(ds, 4), 6)
    assert run[0]["codes"].shape == (4, 2, 50) and run[0]["codes"].dtype == torch.int64
    assert run[0]["valid"].shape == (4, 50) and len(run[0]["descriptions"]) == 4
    resumed = take(data.make_loader(ds, 4, start=3), 3)
    assert same_batches(run[3:], resumed)
    assert not same_batches(run[:3], resumed)
    assert same_batches(run, take(data.make_loader(ds, 4, num_workers=2), 6))


def test_ranks_draw_disjoint_items(dataset, tmp_path):
    seen = []
    for rank in range(3):
        batches = data.train_batches(4, rank, 3)
        seen += [i for _ in range(10) for i in next(batches)]
    assert sorted(seen) == list(range(120))  # disjoint, and together no index is skipped
    ds = cached_split(dataset, tmp_path)
    batch = take(data.make_loader(ds, 4, rank=1, world_size=3, start=2), 1)[0]
    items = [ds[i] for i in range((2 * 3 + 1) * 4, (2 * 3 + 1) * 4 + 4)]
    assert torch.equal(batch["codes"], torch.stack([it["codes"] for it in items]))
    assert batch["descriptions"] == [it["description"] for it in items]


def test_eval_loader_is_one_pass_strided_across_ranks(dataset):
    ds = data.open_split(str(dataset), "valid", codec=FakeCodec(), train=False, **SEGMENTS)
    paths = []
    for rank in range(2):
        loader = data.make_loader(ds, 1, rank=rank, world_size=2, train=False)
        batches = list(loader)
        assert batches[0]["wav"].shape == (1, 1, 32000) and len(batches) == len(loader)
        paths += [p for b in batches for p in b["paths"]]
    assert sorted(paths) == sorted(ds.paths[i] for i in range(3))
    with pytest.raises(ValueError, match="train=False"):
        data.make_loader(ds, 1)


def bad_dataset(tmp_path):
    split = tmp_path / "bad" / "train"
    rows = []
    for k in range(4):
        write(split / f"{k}.wav", 1.0, seed=k)
        rows.append({"path": f"{k}.wav", "duration": 1.0, "sample_rate": 32000})
    (split / "corrupt.wav").write_bytes(b"RIFF" + bytes(100))
    sf.write(split / "nan.wav", np.full((32000, 1), np.nan, np.float32), 32000, subtype="FLOAT")
    write(split / "rate.wav", 1.0, 48000)
    for name in ("corrupt.wav", "nan.wav", "rate.wav", "missing.wav"):
        rows.append({"path": name, "duration": 1.0, "sample_rate": 32000})
    (split / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / "bad"


def test_bad_files_in_training_are_skipped_warned_counted_and_abort_past_the_fraction(tmp_path, capsys):
    root = bad_dataset(tmp_path)
    kw = dict(codec=FakeCodec(), train=True, **dict(SEGMENTS, max_skip_fraction=0.7))
    ds = data.open_split(str(root), "train", **kw)
    batches = take(data.make_loader(ds, 4), 10)
    assert all(not torch.isnan(b["wav"]).any() and b["valid"].any(1).all() for b in batches)
    s = ds.stats()
    assert s["attempted"] == 40 + s["skipped"] and s["skipped"] > 20
    err = capsys.readouterr().err
    for name, reason in [("corrupt.wav", "unreadable"), ("nan.wav", "NaN or infinite samples"),
                         ("rate.wav", "sample rate is 48000 Hz but the manifest says 32000 Hz"),
                         ("missing.wav", "missing")]:
        assert err.count(f"skipping {root / 'train' / name}: {reason}") == 1  # warned once per file
    # With loader workers the counters are shared: the main process sees every worker's reads.
    ds = data.open_split(str(root), "train", **kw)
    take(data.make_loader(ds, 4, num_workers=2), 5)
    assert ds.stats()["attempted"] >= 20 + ds.stats()["skipped"] and ds.stats()["skipped"] > 0
    ds = data.open_split(str(root), "train", **dict(kw, max_skip_fraction=0.05))
    with pytest.raises(UserError, match=r"\d+ of \d+ audio reads failed, more than max_skip_fraction=0.05"):
        take(data.make_loader(ds, 4, num_workers=2), 10)


# ----------------------------------------------------------------------------------------------------------
# With the real codec module, and the command line

def test_tokenize_cli_with_the_debug_codec(dataset, tmp_path, capsys):
    import formats
    codec = formats.load_codec("debug")
    assert data.main(["tokenize", str(dataset / "valid"), str(tmp_path / "cache"), "--codec=debug",
                      "--device=cpu", "--num_workers=0", "--batch_size=1"]) == 0
    out = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert out.parent.parent == tmp_path / "cache"
    assert json.loads((out / "cache.json").read_text())["codec"] == codec.identity()
    ds = data.open_split(str(dataset), "valid", codec=codec, train=False, token_cache=True,
                         cache_dir=str(tmp_path / "cache"), **dict(SEGMENTS, segment_duration=1.0))
    item = ds[1]  # v1.flac, 1.2 s at 48 kHz stereo: one chunk, encoded alone
    ref = codec.encode(torch.from_numpy(data.read_audio(item["path"], sample_rate=32000, channels=1))[None])[0]
    assert item["codes"].shape == (codec.n_q, 50) and torch.equal(item["codes"], ref[:, :50])


def test_cli_bad_manifest_line_is_one_error_line_and_writes_nothing(tmp_path):
    (tmp_path / "data.jsonl").write_text('{"path": "a.wav", "duration": 1, "sample_rate": 32000}\n{"path": "b.wav"}\n')
    r = subprocess.run([sys.executable, str(ROOT / "data.py"), "tokenize", str(tmp_path), str(tmp_path / "cache"),
                        "--codec=debug"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2
    assert r.stderr.strip() == f'error: {tmp_path / "data.jsonl"} line 2: missing field "duration"'
    assert not (tmp_path / "cache").exists()
