"""The token cache and manifests under real processes: many ranks building one fresh cache without a collective,
two tokenizers on one cache, ranks that die, stop signals, a full disk, FIFOs named *.wav. Whatever happens, the
cache ends up equal to a clean one-process build and nothing half-written is used.

Processes are forked from the warm zygote of tests/_faults_util.py (a fraction of a second each), so each test is
a few seconds.

    python -m pytest tests/test_data_faults.py -q --durations=5
"""
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import _faults_util as fu
import data
from env import UserError
from test_data import SEGMENTS, FakeCodec, entry_codes, write

ROOT = Path(__file__).resolve().parents[1]


class SlowCodec(FakeCodec):
    """FakeCodec (same identity, same codes) that takes `delay` seconds per encode: a tokenization that lasts."""

    def __init__(self, delay):
        super().__init__()
        self.delay = delay

    def encode(self, wav):
        time.sleep(self.delay)
        return super().encode(wav)


@pytest.fixture(scope="module", autouse=True)
def zygote():
    fu.context()
    yield
    fu.kill_leftovers()
    for p in _children:
        if p.is_alive():
            p.kill()
            p.join(10)


_children = []


def spawn(target, *args):
    p = fu.context().Process(target=target, args=args)
    p.start()
    _children.append(p)
    return p


def join(p, timeout=60):
    p.join(timeout)
    if p.exitcode is None:
        p.kill()
        p.join(10)
        raise AssertionError(f"process {p.pid} did not end within {timeout} s")
    return p.exitcode


def make_split(root, n, seconds=lambda k: 0.3 + 0.1 * (k % 5)):
    """<root>/train with n short files (lengths vary) and their sidecars; data.jsonl beside them."""
    split = root / "train"
    rows = []
    for k in range(n):
        write(split / f"{k:02d}.wav", seconds(k), seed=k, side={"description": f"clip {k}"})
        rows.append({"path": f"{k:02d}.wav", "duration": round(seconds(k), 4), "sample_rate": 32000})
    (split / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return split


def cache_dir_of(cache_root, split, codec=None):
    file = data.manifest_file(split)
    return data.cache_path(cache_root, codec or FakeCodec(), file, data.read_manifest(file))


def assert_same_cache(out, clean, split, K=FakeCodec.n_q):
    """Every file of the split has the same codes and sidecar info in `out` as in the clean build."""
    a, b = data._cache_rows(out), data._cache_rows(clean)
    assert sorted(a) == sorted(b) == list(range(len(data.read_manifest(split))))
    for i, row in b.items():
        assert a[i]["info"] == row["info"] and a[i]["frames"] == row["frames"]
        assert torch.equal(entry_codes(out, row["path"], K), entry_codes(clean, row["path"], K)), row["path"]


def clean_build(split, out, codec=None):
    data.tokenize(split, out, codec or FakeCodec(), verbose=False)
    return out


# ----------------------------------------------------------------------------------------------------------
# Many ranks, one fresh cache

def _open_split_as_rank(root, cache_root, rank, world_size, delay, stall_timeout, result):
    """A rank of a job: open_split of the train split with the cache on; writes what it got (or its error)."""
    torch.set_num_threads(1)
    t0 = time.time()
    try:
        ds = data.open_split(str(root), "train", codec=SlowCodec(delay), train=True, token_cache=True,
                             cache_dir=str(cache_root), rank=rank, world_size=world_size, stall_timeout=stall_timeout,
                             **SEGMENTS)
        got = {"files": [ds.paths[f] for f in range(len(ds))], "offsets": ds.cache["offset"].tolist(),
               "shards": ds.cache["shard"].tolist(), "seconds": time.time() - t0}
        code = 0
    except UserError as e:
        got, code = {"error": str(e), "seconds": time.time() - t0}, 2
    Path(result).write_text(json.dumps(got))
    os._exit(code)


def test_ranks_build_one_fresh_cache_together_without_a_collective(tmp_path):
    split = make_split(tmp_path / "ds", 12, seconds=lambda k: 0.5 + k)  # lengths in 12 padding buckets
    # Rank 1 is slow (0.4 s per encode, one encode per length): rank 0 finishes its share early and waits well past
    # stall_timeout, which must not end its wait while rank 1 makes progress.
    procs = [spawn(_open_split_as_rank, tmp_path / "ds", tmp_path / "cache", r, 2, delay, 1.5, tmp_path / f"r{r}.json")
             for r, delay in ((0, 0.0), (1, 0.4))]
    codes = [join(p) for p in procs]
    got = [json.loads((tmp_path / f"r{r}.json").read_text()) for r in (0, 1)]
    assert codes == [0, 0], got
    assert got[0]["seconds"] > 1.5 + 0.5, got  # waited longer than stall_timeout, and did not give up
    assert got[0]["files"] == got[1]["files"] and got[0]["offsets"] == got[1]["offsets"]
    assert sorted(set(got[0]["shards"])) == [0, 1]
    out = cache_dir_of(tmp_path / "cache", split)
    assert_same_cache(out, clean_build(split, tmp_path / "clean"), split)


def test_a_rank_that_dies_is_named_after_stall_timeout_and_the_cache_goes_on(tmp_path, capsys):
    split = make_split(tmp_path / "ds", 10, seconds=lambda k: 0.5 + k)  # rank 1: one encode per file
    out = cache_dir_of(tmp_path / "cache", split)
    rank1 = spawn(_open_split_as_rank, tmp_path / "ds", tmp_path / "cache", 1, 2, 0.5, 60, tmp_path / "r1.json")
    fu.wait_until(lambda: len(data._read_index(out / "index.1.jsonl")) >= 1, timeout=60, what="rank 1's first file")
    os.kill(rank1.pid, signal.SIGKILL)
    join(rank1)
    t0 = time.time()
    with pytest.raises(UserError) as e:
        data.open_split(str(tmp_path / "ds"), "train", codec=FakeCodec(), train=True, token_cache=True,
                        cache_dir=str(tmp_path / "cache"), rank=0, world_size=2, stall_timeout=1.0, **SEGMENTS)
    assert time.time() - t0 < 15
    message = str(e.value)
    assert "nothing was written for 1 s" in message and "shard 1 of 2: no writer" in message, message
    assert "\n" not in message and "run again" in message
    # One process finishes what the dead rank left (another world size: the files of shard 1 go to shard 0).
    ds = data.open_split(str(tmp_path / "ds"), "train", codec=FakeCodec(), train=True, token_cache=True,
                         cache_dir=str(tmp_path / "cache"), **SEGMENTS)
    assert len(ds) == 10
    assert_same_cache(out, clean_build(split, tmp_path / "clean"), split)


def _tokenize_into(split, out, delay, result):
    torch.set_num_threads(1)
    summary = data.tokenize(split, out, SlowCodec(delay), batch_size=1, verbose=False)
    Path(result).write_text(json.dumps(summary))
    os._exit(0)


def test_two_tokenizers_on_one_cache_never_share_a_shard(tmp_path):
    split = make_split(tmp_path / "ds", 8)
    out = tmp_path / "cache"
    procs = [spawn(_tokenize_into, split, out, 0.15, tmp_path / f"t{k}.json") for k in range(2)]
    assert [join(p) for p in procs] == [0, 0]
    summaries = [json.loads((tmp_path / f"t{k}.json").read_text()) for k in range(2)]
    assert sum(s["written"] for s in summaries) == 8, summaries  # the second waited, then found the work done
    assert_same_cache(out, clean_build(split, tmp_path / "clean"), split)


def test_tokenize_cli_under_torchrun_ranks_equals_one_process(tmp_path):
    """`torchrun --nproc_per_node=2 data.py tokenize ...` without torchrun: no collective, only RANK/WORLD_SIZE."""
    split = make_split(tmp_path / "ds", 7, seconds=lambda k: 0.5 + 0.37 * k)
    args = ["tokenize", str(split), None, "--codec=debug", "--device=cpu", "--num_workers=0", "--batch_size=3"]
    run = lambda cache, rank, world: fu.Training(  # noqa: E731
        [a or str(cache) for a in args], tmp_path / f"{cache.name}.{rank}.txt", target="data.py",
        extra_env={"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    ranks = [run(tmp_path / "two", r, 2) for r in (0, 1)]
    one = run(tmp_path / "one", 0, 1)
    assert [p.wait() for p in ranks + [one]] == [0, 0, 0], [p.output() for p in ranks + [one]]
    out = Path(ranks[0].output().strip().splitlines()[-1])  # rank 0 prints the cache when every shard is in
    assert out.parent.parent == tmp_path / "two" and sorted(p.name for p in out.glob("index.*")) == \
        ["index.0.jsonl", "index.1.jsonl"]
    import formats
    K = formats.load_codec("debug").n_q
    assert_same_cache(out, Path(one.output().strip().splitlines()[-1]), split, K)


# ----------------------------------------------------------------------------------------------------------
# Stop signals, a full disk, FIFOs

def test_tokenize_stops_on_sigterm_within_seconds_and_resumes(tmp_path):
    split = make_split(tmp_path / "ds", 12)
    argv = ["tokenize", str(split), str(tmp_path / "cache"), "--codec=debug", "--device=cpu", "--num_workers=0",
            "--batch_size=1"]
    proc = fu.Training(argv, tmp_path / "out.0.txt", target="data.py", fault="slow=codec.Codec.encode:0.3")
    fu.wait_until(lambda: list((tmp_path / "cache").rglob("index.0.jsonl")) and
                  len(data._read_index(next((tmp_path / "cache").rglob("index.0.jsonl")))) >= 2, proc,
                  what="two files encoded")
    t0 = time.time()
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 75, proc.output()
    assert time.time() - t0 < 5
    last = proc.output().strip().splitlines()[-1]
    assert last.startswith("data.py tokenize: stopped by SIGTERM") and "run the same command again" in last
    done = len(data._cache_rows(next((tmp_path / "cache").rglob("train-*"))))
    assert 2 <= done < 12
    again = fu.Training(argv, tmp_path / "out.1.txt", target="data.py")
    assert again.wait() == 0, again.output()
    assert f"wrote {12 - done} files" in again.output()
    out = Path(again.output().strip().splitlines()[-1])
    import formats
    codec = formats.load_codec("debug")
    assert_same_cache(out, clean_build(split, tmp_path / "clean", codec), split, codec.n_q)


def test_manifest_stops_on_sigint_and_resumes_from_what_it_probed(tmp_path):
    audio = tmp_path / "audio"
    for k in range(30):
        write(audio / f"{k:02d}.wav", 0.1, seed=k)
    argv = ["manifest", str(audio), str(tmp_path / "m.jsonl"), "--workers=2"]
    proc = fu.Training(argv, tmp_path / "out.0.txt", target="data.py", fault="slow=soundfile.info:0.2")
    fu.wait_until(lambda: "manifest: " in proc.output() and "/30 files" in proc.output(), proc, what="progress")
    t0 = time.time()
    proc.signal(signal.SIGINT)
    assert proc.wait() == 75, proc.output()
    assert time.time() - t0 < 5 and "Traceback" not in proc.output()
    assert "run the same command again" in proc.output().strip().splitlines()[-1]
    assert not (tmp_path / "m.jsonl").exists() and (tmp_path / ".m.jsonl.partial").exists()
    again = fu.Training(argv, tmp_path / "out.1.txt", target="data.py")
    assert again.wait() == 0, again.output()
    assert "probed by the stopped run before" in again.output()
    data.build_manifest(audio, tmp_path / "ref.jsonl")
    assert (tmp_path / "m.jsonl").read_text() == (tmp_path / "ref.jsonl").read_text()
    assert not (tmp_path / ".m.jsonl.partial").exists()


def test_a_full_disk_while_tokenizing_is_one_line_and_the_cache_recovers(tmp_path):
    split = make_split(tmp_path / "ds", 6, seconds=lambda k: 1.0)
    argv = ["tokenize", str(split), str(tmp_path / "cache"), "--codec=debug", "--device=cpu", "--num_workers=0",
            "--batch_size=1"]
    # 400 bytes of codes per second of audio: the codes shard cannot pass 1000 bytes, the third file fails mid-write
    proc = fu.Training(argv, tmp_path / "out.0.txt", target="data.py", fault="fsize=1000")
    assert proc.wait() == 2, proc.output()
    assert "Traceback" not in proc.output()
    out = next((tmp_path / "cache").rglob("train-*"))
    last = proc.output().strip().splitlines()[-1]
    assert last == (f"error: could not write {out / 'codes.0.u16'}: File too large (free some space and run the same "
                    f"command again: the token cache keeps every file written before and goes on)")
    assert (out / "codes.0.u16").stat().st_size == 1000  # half a file's codes, without its row: never read
    assert len(data._cache_rows(out)) == 2
    again = fu.Training(argv, tmp_path / "out.1.txt", target="data.py")
    assert again.wait() == 0, again.output()
    assert "wrote 4 files" in again.output()
    import formats
    codec = formats.load_codec("debug")
    assert_same_cache(out, clean_build(split, tmp_path / "clean", codec), split, codec.n_q)


def test_fifos_named_like_audio_are_skipped_not_read(tmp_path):
    audio = tmp_path / "audio"
    write(audio / "ok.wav", 0.5, side={"description": "fine"})
    os.mkfifo(audio / "pipe.wav")
    write(audio / "side.wav", 0.5)
    os.mkfifo(audio / "side.json")  # a sidecar that is a FIFO
    proc = fu.Training(["manifest", str(audio), str(tmp_path / "m.jsonl")], tmp_path / "out.0.txt", target="data.py")
    assert proc.wait(30) == 0, proc.output()
    assert f"skipped {audio / 'pipe.wav'}: not a regular file (a FIFO): only regular files are read" in proc.output()
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [Path(r["path"]).name for r in rows] == ["ok.wav", "side.wav"]
    rows.append({"path": str(audio / "pipe.wav"), "duration": 0.5, "sample_rate": 32000})  # in a manifest anyway
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = fu.Training(["tokenize", str(tmp_path / "m.jsonl"), str(tmp_path / "cache"), "--codec=debug",
                        "--num_workers=0"], tmp_path / "out.1.txt", target="data.py")
    assert proc.wait(30) == 0, proc.output()
    assert f"skipped {audio / 'pipe.wav'}: not a regular file (a FIFO)" in proc.output()
    assert f"skipped {audio / 'side.wav'}: sidecar {audio / 'side.json'}: not a regular file (a FIFO)" in proc.output()
    assert "wrote 1 files" in proc.output()
