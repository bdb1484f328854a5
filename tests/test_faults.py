"""Faults injected into real training processes: kill -9, signals, a failing disk, corrupt checkpoints, non-finite
gradients, a dead or hung rank, files that go bad mid-training. Whatever happens, no finished work is lost.

Training processes are forked from a warm zygote (tests/_faults_util.py) so that each starts in a fraction of a
second; they are separate processes all the same, killed with real signals.
"""
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import time
from pathlib import Path

import pytest
import torch

import _faults_util as fu
import demo
import env
import train

ROOT = Path(__file__).resolve().parents[1]

# 3 epochs of 2 updates, a checkpoint after each epoch, checkpoint_2.pt kept: a run takes well under a second.
FAULT = [str(ROOT / "config/debug.py"), "--dim=32", "--n_layers=2", "--n_heads=2", "--lut_dim=32",
         "--segment_duration=1.0", "--min_segment_ratio=1.0", "--batch_size=4", "--updates_per_epoch=2", "--epochs=3",
         "--warmup=2", "--ema_every=2", "--generate_every=0", "--evaluate_every=0", "--num_workers=0",
         "--log_every=1", "--save_every=2"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    fu.context()  # the zygote warms up while the demo set is written
    root = tmp_path_factory.mktemp("data")
    demo.make_demo_set(root / "demo", seed=0, sizes={"train": 12, "valid": 4, "evaluate": 4, "generate": 2})
    yield root
    fu.kill_leftovers()


def start(runs, dataset, *extra, fault=None, extra_env=None):
    """A forked `python train.py FAULT... EXTRA... --runs_dir=RUNS ...`; its output in RUNS/out.<n>.txt."""
    runs.mkdir(parents=True, exist_ok=True)
    log = runs / f"out.{len(list(runs.glob('out.*.txt')))}.txt"
    argv = FAULT + list(extra) + [f"--runs_dir={runs}", f"--dataset={dataset / 'demo'}",
                                  f"--cache_dir={dataset / 'cache'}"]
    return fu.Training(argv, log, extra_env=extra_env, fault=fault)


def run_dir(runs):
    (d,) = (Path(runs) / "xps").iterdir()
    return d


def run_log(runs):
    logs = list(Path(runs).glob("xps/*/log.txt"))
    return logs[0].read_text() if logs else ""


def status(runs):
    return env.run_status(run_dir(runs))["status"]


def assert_same_training(a, b):
    """Two checkpoints hold the same weights, EMA, best state and history, bit for bit."""
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"]
    for part in ("model", "best_state"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs"
    for k in a["ema"]["state"]:
        assert torch.equal(a["ema"]["state"][k], b["ema"]["state"][k]), f"ema.{k} differs"
    timing = ("frames_per_s", "seconds")   # how fast the machine was, not what was trained
    strip = lambda rows: [{k: v for k, v in row.items() if k not in timing} for row in rows]  # noqa: E731
    assert strip(a["history"]) == strip(b["history"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, dataset):
    """The run directory of an uninterrupted run of FAULT."""
    runs = tmp_path_factory.mktemp("reference")
    proc = start(runs, dataset)
    assert proc.wait() == 0, proc.output()
    return run_dir(runs)


def test_kill_9_at_random_moments_and_mid_checkpoint_loses_nothing(tmp_path, dataset, reference):
    rng = random.Random(2036)
    runs = tmp_path / "runs"
    ckpt_file = lambda: next(runs.glob("xps/*/checkpoint.pt"), None)  # noqa: E731
    # (moment, saves this process completes first). slow_save: half a checkpoint written, 0.3 s, the rest, then
    # 0.3 s before the rename to checkpoint.pt. A save takes 0.6 s, so a random moment (< 1.2 s) cannot finish the
    # two epochs left after the first trial: the first four trials are kills.
    trials = [("mid_write", 1), ("before_rename", 0), ("random", 0), ("mid_write", 0), ("random", 0),
              ("before_rename", 0)]
    announced = {"mid_write": "fault: writing a checkpoint", "before_rename": "fault: renaming to checkpoint.pt"}
    killed, steps = [], []
    for moment, let_through in trials:
        proc = start(runs, dataset, fault="slow_save=0.3")
        if moment == "random":
            time.sleep(rng.uniform(0.0, 1.2))
        else:
            if not wait_or_end(lambda: proc.output().count(announced[moment]) > let_through, proc):
                assert proc.wait() == 0, proc.output()
                break  # finished before the moment came
            time.sleep(rng.uniform(0.0, 0.25))
        proc.signal(signal.SIGKILL)
        code = proc.wait()
        if code == 0:  # a random moment came after the end
            break
        assert code == -signal.SIGKILL, proc.output()
        killed.append(moment)
        if ckpt_file() is not None:
            ckpt = train.load_checkpoint(ckpt_file())  # the latest checkpoint is whole, whenever the kill came
            assert ckpt["step"] % 2 == 0 and not ckpt["pending"]  # written after an epoch's valid, nothing partial
            assert not steps or ckpt["step"] >= steps[-1]
            steps.append(ckpt["step"])
    assert {"mid_write", "before_rename"} <= set(killed) and len(killed) >= 4 and steps, (killed, steps)
    proc = start(runs, dataset)
    assert proc.wait() == 0, proc.output()
    assert "resumed from checkpoint.pt" in proc.output()
    assert_same_training(train.load_checkpoint(reference / "checkpoint.pt"),
                         train.load_checkpoint(run_dir(runs) / "checkpoint.pt"))


def wait_or_end(predicate, proc, timeout=60):
    """True once predicate() holds; False if the process ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if not proc.alive():
            return bool(predicate())
        time.sleep(0.005)
    raise AssertionError("timed out")


def test_sigusr1_writes_the_checkpoint_within_a_step_and_asks_for_a_requeue(tmp_path, dataset):
    runs = tmp_path / "runs"
    proc = start(runs, dataset, "--epochs=1", "--updates_per_epoch=1000")
    fu.wait_until(lambda: "epoch 1 step 3/" in run_log(runs), proc, what="update 3")
    proc.signal(signal.SIGSTOP)  # frozen: the last update it logged is the one in flight, or the one before
    last = max(int(s) for s in re.findall(r"^epoch 1 step (\d+)/1000 ", run_log(runs), re.M))
    proc.signal(signal.SIGUSR1)
    proc.signal(signal.SIGCONT)
    assert proc.wait() == train.EXIT_REQUEUE, proc.output()
    ckpt = train.load_checkpoint(run_dir(runs) / "checkpoint.pt")
    assert last < ckpt["step"] <= last + 2, (last, ckpt["step"])  # the update in flight, at most one more
    log = run_log(runs)
    assert f"stopped by signal SIGUSR1 at update {ckpt['step']}: checkpoint written, exit 75" in log
    assert max(int(s) for s in re.findall(r"^epoch 1 step (\d+)/1000 ", log, re.M)) == ckpt["step"]
    assert status(runs) == "preempted"


def test_failing_write_keeps_the_previous_checkpoint_and_stops_cleanly(tmp_path, dataset, reference):
    runs = tmp_path / "runs"
    proc = start(runs, dataset, fault="slow_save=0.3")  # slow saves: the first checkpoint is far from the end
    fu.wait_until(lambda: next(runs.glob("xps/*/checkpoint.pt"), None) is not None, proc, what="a checkpoint")
    proc.signal(signal.SIGKILL)
    proc.wait()
    assert status(runs) == "killed"  # the status file still says running, but its process is gone
    path = run_dir(runs) / "checkpoint.pt"
    before = hashlib.sha1(path.read_bytes()).hexdigest()
    # The resumed run's first save fails: no file may grow past 64 kB (log lines still fit, a checkpoint does not).
    proc = start(runs, dataset, fault="fsize=65536")
    assert proc.wait() == 2, proc.output()
    assert (f"error: could not write {path}: File too large; the previous checkpoint is intact (make room or fix "
            f"the directory, then run the same command again to resume)") in proc.output()
    assert "Traceback" not in proc.output()
    assert f"error: could not write {path}: File too large" in (path.parent / "log.txt").read_text()
    assert hashlib.sha1(path.read_bytes()).hexdigest() == before
    train.load_checkpoint(path)
    assert not [p.name for p in run_dir(runs).iterdir() if "tmp" in p.name]  # no half-written file left behind
    assert status(runs) == "failed"
    # With room again, the same command resumes and finishes as if nothing had happened.
    proc = start(runs, dataset)
    assert proc.wait() == 0, proc.output()
    assert_same_training(train.load_checkpoint(reference / "checkpoint.pt"), train.load_checkpoint(path))


def test_corrupt_checkpoint_falls_back_to_the_last_kept_one(tmp_path, reference, dataset):
    runs = tmp_path / "runs"
    shutil.copytree(reference.parent.parent, runs)  # a finished run: checkpoint.pt (epoch 3), checkpoint_2.pt
    d = run_dir(runs)
    os.truncate(d / "checkpoint.pt", (d / "checkpoint.pt").stat().st_size // 2)
    proc = start(runs, dataset)
    assert proc.wait() == 0, proc.output()
    log = run_log(runs)
    assert re.search(rf"warning: {re.escape(str(d / 'checkpoint.pt'))} is unreadable \(.*\); falling back to "
                     rf"{re.escape(str(d / 'checkpoint_2.pt'))}", log), log
    assert "resumed from checkpoint_2.pt: epoch 3, update 4" in log
    # epoch 3 trained again from the kept checkpoint: the same weights as the run that was never corrupted
    assert_same_training(train.load_checkpoint(reference / "checkpoint.pt"), train.load_checkpoint(d / "checkpoint.pt"))


def test_non_finite_gradients_are_skipped_and_counted_then_stop_with_the_last_good_checkpoint(tmp_path, dataset):
    runs = tmp_path / "runs"
    # updates 1 (epoch 1), 3 (epoch 2) and 4 (epoch 3) get an infinite gradient from a finite loss
    proc = start(runs, dataset, "--max_nonfinite=2", fault="inf_grad=1,3,4")
    assert proc.wait() == 1, proc.output()
    log = run_log(runs)
    skips = re.findall(r"warning: update (\d+): 1 update\(s\) with a non-finite loss or gradient skipped since the "
                       r"last log line \((\d) in a row now; last ce (\S+), grad (\S+)\)", log)
    assert [(int(u), n) for u, n, _, _ in skips] == [(2, "1"), (4, "1"), (5, "2")]   # log_every=1: every update
    assert all(float(ce) < 100 and not torch.isfinite(torch.tensor(float(g))) for _, _, ce, g in skips)
    assert "error: 2 non-finite updates in a row (max_nonfinite=2)" in log
    assert status(runs) == "failed"
    ckpt = train.load_checkpoint(run_dir(runs) / "checkpoint.pt")  # the last good one: after epoch 2
    assert (ckpt["epoch"], ckpt["step"], ckpt["nonfinite_total"]) == (3, 4, 2)
    assert [row["skipped"] for row in ckpt["history"] if row["stage"] == "train"] == [1, 1]
    tensors = list(ckpt["model"].values()) + list(ckpt["ema"]["state"].values())
    assert all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())  # no bad update was applied


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_two(runs, dataset, *extra, fault=None):
    port = str(_free_port())
    return [start(runs, dataset, *extra, fault=fault, extra_env={"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
            for r in (0, 1)]


def test_a_dead_or_hung_rank_stops_the_other_in_bounded_time_then_the_run_resumes(tmp_path, dataset):
    runs, timeout = tmp_path / "runs", 4
    args = ["--epochs=2", "--updates_per_epoch=20", f"--dist_timeout={timeout}"]
    # kill -9 rank 1 in epoch 2: rank 0 notices the closed connection at its next collective
    ranks = start_two(runs, dataset, *args)
    fu.wait_until(lambda: "epoch 2 step 1/" in ranks[0].output(), ranks[0], what="epoch 2")
    ranks[1].signal(signal.SIGSTOP)
    ranks[1].signal(signal.SIGKILL)
    t0 = time.time()
    assert ranks[0].wait(60) == 1 and time.time() - t0 < timeout, ranks[0].output()
    assert "error: rank 0 failed" in ranks[0].output()
    assert status(runs) == "failed"
    # rank 0 hangs (stopped) after resuming: rank 1 gives up after dist_timeout instead of waiting forever
    ranks = start_two(runs, dataset, *args)
    fu.wait_until(lambda: "epoch 2 step 1/" in ranks[0].output(), ranks[0], what="epoch 2 after resuming")
    assert "resumed from checkpoint.pt: epoch 2, update 20" in ranks[0].output()
    ranks[0].signal(signal.SIGSTOP)
    t0 = time.time()
    assert ranks[1].wait(60) == 1 and time.time() - t0 < timeout + 10, ranks[1].output()
    assert "error: rank 1 failed" in ranks[1].output()
    ranks[0].signal(signal.SIGKILL)
    ranks[0].wait()
    # the same command again: resumes from the checkpoint after epoch 1 and finishes
    ranks = start_two(runs, dataset, *args)
    assert [r.wait() for r in ranks] == [0, 0], [r.output() for r in ranks]
    assert "resumed from checkpoint.pt: epoch 2, update 20" in ranks[0].output()
    assert train.load_checkpoint(run_dir(runs) / "checkpoint.pt")["step"] == 40 and status(runs) == "done"


def test_files_that_go_bad_mid_training_are_skipped_then_past_the_limit_abort(tmp_path, dataset):
    root = tmp_path / "data"
    shutil.copytree(dataset / "demo", root / "demo")
    train_dir = root / "demo" / "train"
    # after the manifest was made: one file deleted, one overwritten with garbage, one sidecar broken
    (train_dir / "clip_0000.wav").unlink()
    (train_dir / "clip_0001.wav").write_bytes(b"RIFF\x00\x00garbage" * 50)
    (train_dir / "clip_0002.json").write_text("{not json")
    runs = tmp_path / "runs"
    args = ["--token_cache=False", "--batch_size=8", "--updates_per_epoch=4"]  # 96 draws: every file comes up
    proc = start(runs, root, *args, "--max_skip_fraction=0.5")
    assert proc.wait() == 0, proc.output()
    out = proc.output()
    assert f"warning: data: skipping {train_dir / 'clip_0000.wav'}: missing" in out
    assert f"warning: data: skipping {train_dir / 'clip_0001.wav'}: unreadable (" in out
    assert f"warning: data: skipping {train_dir / 'clip_0002.wav'}: sidecar {train_dir / 'clip_0002.json'} is not JSON" in out
    assert status(runs) == "done" and train.load_checkpoint(run_dir(runs) / "checkpoint.pt")["step"] == 12
    rows = [json.loads(line) for line in (run_dir(runs) / "history.jsonl").read_text().splitlines()]
    assert sum(row.get("bad_reads", 0) for row in rows if row["stage"] == "train") >= 3  # each bad file, once at least
    # Most files gone: past max_skip_fraction (default 0.05) the run stops with a summary, not a traceback.
    for i in range(3, 9):
        (train_dir / f"clip_{i:04d}.wav").unlink()
    runs = tmp_path / "runs2"
    proc = start(runs, root, *args)
    assert proc.wait() == 2, proc.output()
    found = re.search(r"error: demo/train: (\d+) of (\d+) audio reads failed, more than max_skip_fraction=0.05: "
                      r"fix or remove the files named in the warnings above, or raise max_skip_fraction", proc.output())
    assert found and int(found[1]) > 5, proc.output()
    assert status(runs) == "failed"


def test_compiled_layers_record_few_graphs_through_every_stage(tmp_path, dataset):
    """compile=True with the valid, generate and evaluate stages: evaluation runs the layers eager and sampling its
    own compiled step, so dynamo records two graphs of the layers (static, then with the text length dynamic) and at
    most three of the decode step (static, then text length, then batch dynamic), then no more, however many epochs;
    it never reaches its recompile limit, which would fall back to eager with a warning."""
    runs = tmp_path / "runs"
    proc = start(runs, dataset, "--compile=True", "--generate_every=1", "--evaluate_every=1", "--epochs=3",
                 "--generate_duration=0.3", "--evaluate_samples=3", fault="compile_eager=1",
                 extra_env={"TORCH_LOGS": "recompiles"})
    assert proc.wait(timeout=300) == 0, proc.output()
    out = proc.output()
    graphs = int(re.search(r"dynamo: (\d+) graphs", out).group(1))
    assert 1 <= graphs <= 5, out
    assert "recompile_limit" not in out and "cache_size_limit" not in out, out
    assert [row["stage"] for row in train.load_checkpoint(run_dir(runs) / "checkpoint.pt")["history"]] == \
        ["train", "valid", "generate", "evaluate"] * 3


def test_float16_overflows_are_the_scalers_business_not_divergence(tmp_path, dataset):
    """With float16 the gradient scaler skips overflowing updates and lowers its scale; they are not counted as
    non-finite updates (ten early overflows used to abort a run)."""
    runs = tmp_path / "runs"
    proc = start(runs, dataset, "--dtype=float16", "--max_nonfinite=2", fault="inf_grad=0,1,2")
    assert proc.wait() == 0, proc.output()
    ckpt = train.load_checkpoint(run_dir(runs) / "checkpoint.pt")
    assert ckpt["nonfinite_total"] == 0 and ckpt["scaler"]["scale"] == 2.0 ** 13   # 2**16 halved three times
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())


def test_fsdp_float16_ranks_agree_on_an_overflow_only_one_of_them_sees(tmp_path, dataset):
    """Under FSDP each rank checks only its shards of the gradients: an overflow on rank 1 alone must make both ranks
    skip the update and halve their scale (else their shards would drift apart)."""
    runs = tmp_path / "runs"
    procs = start_two(runs, dataset, "--parallel=fsdp", "--dtype=float16", "--epochs=1", fault="inf_grad=1@1")
    assert [p.wait(timeout=300) for p in procs] == [0, 0], [p.output()[-2000:] for p in procs]
    ckpt = train.load_checkpoint(run_dir(runs) / "checkpoint.pt")   # written by rank 0
    assert ckpt["scaler"]["scale"] == 2.0 ** 15 and ckpt["step"] == 2


def test_kill_9_then_resume_shows_each_tensorboard_step_once(tmp_path, dataset):
    """TensorBoard on: a run killed after logging updates past its checkpoint, then resumed, shows each update's
    scalars once (read back with tensorboard's own reader), and each history row once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    runs = tmp_path / "runs"
    proc = start(runs, dataset, "--tensorboard=True", fault="slow_save=0.2")
    fu.wait_until(lambda: "epoch 2 step 1/2" in run_log(runs), proc, what="update 3")   # past the epoch 1 checkpoint
    proc.signal(signal.SIGKILL)
    proc.wait()
    proc = start(runs, dataset, "--tensorboard=True")
    assert proc.wait() == 0, proc.output()
    acc = EventAccumulator(str(run_dir(runs) / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/ce")] == [1, 2, 3, 4, 5, 6]
    assert [e.step for e in acc.Scalars("valid/ce")] == [2, 4, 6]
    assert "train_epoch/ce" in acc.Tags()["scalars"]
