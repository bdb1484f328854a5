"""The training loop end to end, on the CPU: stages, learning, exact resume, DDP/FSDP, signals, continue_from."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import data
import demo
import env
import train

ROOT = Path(__file__).resolve().parents[1]

# A model small enough that an update takes milliseconds; full segments so ranks see equal frame counts.
TINY = ["config/debug.py", "--dim=32", "--n_layers=2", "--n_heads=2", "--lut_dim=32", "--segment_duration=1.0",
        "--min_segment_ratio=1.0", "--batch_size=4", "--updates_per_epoch=4", "--epochs=2", "--warmup=2",
        "--ema_every=2", "--generate_every=0", "--evaluate_every=0", "--generate_duration=0.5",
        "--generate_count=2", "--num_workers=0", "--log_every=1", "--save_every=1"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A small demo set and its token cache, shared by the tests of this file."""
    root = tmp_path_factory.mktemp("data")
    demo.make_demo_set(root / "demo", seed=0, sizes={"train": 12, "valid": 4, "evaluate": 4, "generate": 2})
    return root


def run(args, runs, dataset, extra_env=None, wait=True, cache=None, **kw):
    cmd = [sys.executable, str(ROOT / "train.py"), *args, f"--runs_dir={runs}",
           f"--dataset={dataset / 'demo'}", f"--cache_dir={cache or dataset / 'cache'}"]
    e = dict(os.environ, OMP_NUM_THREADS="1", **(extra_env or {}))
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)
    return subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=300)


def only_run_dir(runs):
    (d,) = (runs / "xps").iterdir()
    return d


def final_weights(runs):
    ckpt = torch.load(only_run_dir(runs) / "checkpoint.pt", weights_only=True)
    return ckpt


def wait_for_log(runs, text, proc, timeout=120):
    """Poll the run's log.txt until `text` appears (the process must still be running)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        logs = list(Path(runs).glob("xps/*/log.txt"))
        if logs and text in logs[0].read_text():
            return
        if proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.stdout.read()}")
        time.sleep(0.02)
    raise AssertionError(f"{text!r} never appeared in the log under {runs}")


def test_tiny_run_goes_through_every_stage(tmp_path, dataset):
    r = run(TINY + ["--generate_every=2", "--evaluate_every=2"], tmp_path, dataset)
    assert r.returncode == 0, r.stdout + r.stderr
    d = only_run_dir(tmp_path)
    stages = [(row["epoch"], row["stage"]) for row in map(json.loads, (d / "history.jsonl").read_text().splitlines())]
    assert stages == [(1, "train"), (1, "valid"), (2, "train"), (2, "valid"), (2, "generate"), (2, "evaluate")]
    wavs = sorted(p.name for p in (d / "samples" / "2").glob("*.wav"))
    assert wavs == ["000.wav", "000_uncond.wav", "001.wav", "001_uncond.wav"]
    meta = json.loads((d / "samples" / "2" / "000.json").read_text())
    assert meta["prompt"] and meta["cfg_coef"] == 3.0 and meta["row_seed"] == 2036 + 2 + 0
    assert (d / "status").read_text().strip() == "done"
    assert (d / "checkpoint_1.pt").is_file() and (d / "checkpoint.pt").is_file()
    config = json.loads((d / "config.json").read_text())
    assert config["signature"] == d.name and "git_commit" in config
    log = (d / "log.txt").read_text()
    assert "epoch 2 step 4/4 | ce" in log and "evaluate | ce" in log and "| fd " in log
    # Running the same config again finds the finished run instead of training again, before it reads any data:
    # with a new cache directory (not part of the signature) nothing gets tokenized.
    again = run(TINY + ["--generate_every=2", "--evaluate_every=2"], tmp_path, dataset, cache=tmp_path / "cache2")
    assert again.returncode == 0 and "already finished 2 epochs" in again.stdout, again.stdout + again.stderr
    assert not (tmp_path / "cache2").exists()


def test_raw_audio_run_encodes_for_training_and_the_evaluate_stage(tmp_path, dataset):
    """--token_cache=False: the frozen codec encodes every batch, and the evaluate stage's reference clips too."""
    r = run(TINY + ["--token_cache=False", "--epochs=1", "--updates_per_epoch=2", "--evaluate_every=1"], tmp_path,
            dataset, cache=tmp_path / "no_cache")
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [json.loads(line) for line in (only_run_dir(tmp_path) / "history.jsonl").read_text().splitlines()]
    assert [row["stage"] for row in rows] == ["train", "valid", "evaluate"] and rows[-1]["fd"] > 0
    assert not (tmp_path / "no_cache").exists()


def test_stages_sample_from_a_quantized_copy_with_the_quantize_key(tmp_path, dataset):
    """quantize=int8: the generate and evaluate stages sample from one int8 copy per stage (train.sampling_model);
    training and its checkpoint stay float."""
    r = run(TINY + ["--epochs=1", "--generate_every=1", "--evaluate_every=1", "--evaluate_samples=2",
                    "--quantize=int8"], tmp_path, dataset)
    assert r.returncode == 0, r.stdout + r.stderr
    d = only_run_dir(tmp_path)
    rows = [json.loads(line) for line in (d / "history.jsonl").read_text().splitlines()]
    assert [row["stage"] for row in rows] == ["train", "valid", "generate", "evaluate"] and rows[-1]["fd"] >= 0
    assert sorted(p.name for p in (d / "samples" / "1").glob("*.wav")) == [
        "000.wav", "000_uncond.wav", "001.wav", "001_uncond.wav"]
    ckpt = torch.load(d / "checkpoint.pt", weights_only=True)
    assert all(v.is_floating_point() for k, v in ckpt["model"].items() if k.endswith("weight"))


def test_resume_after_sigterm_matches_uninterrupted_run(tmp_path, dataset):
    straight = run(TINY, tmp_path / "a", dataset)
    assert straight.returncode == 0, straight.stdout + straight.stderr
    proc = run(TINY, tmp_path / "b", dataset, wait=False)
    wait_for_log(tmp_path / "b", "epoch 1 step 2/4", proc)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == train.EXIT_REQUEUE, out
    d = only_run_dir(tmp_path / "b")
    assert (d / "status").read_text().strip() == "preempted"
    stopped = torch.load(d / "checkpoint.pt", weights_only=True)
    assert 2 <= stopped["step"] < 8
    for name in (".checkpoint.pt.tmp", ".history.jsonl.tmp"):  # what a SIGKILL mid-write leaves behind
        (d / name).write_bytes(b"half")
    row = {"epoch": 1, "stage": "evaluate_only", "step": stopped["step"], "chroma_cos": 0.5}   # evaluate.py's
    with open(d / "history.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    resumed = run(TINY, tmp_path / "b", dataset)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from checkpoint.pt" in resumed.stdout
    assert not list(d.glob("*.tmp")), "a resumed run removes the temporary files of the killed one"
    assert [r for r in history(tmp_path / "b") if r["stage"] == "evaluate_only"] == [row], "kept when it resumed"
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    for part in ("model", "best_state"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs after resume"
    for k in a["ema"]["state"]:
        assert torch.equal(a["ema"]["state"][k], b["ema"]["state"][k])
    assert a["step"] == b["step"] == 8


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two(args, runs, dataset):
    port = str(_free_port())
    procs = [run(args, runs, dataset, wait=False, extra_env={"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                                                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
             for r in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    return procs, outs


def test_two_processes_ddp_match_one_process(tmp_path, dataset):
    # mask_memory: with AudioCraft's unmasked text memory the loss depends on how far each rank pads its batch
    args = TINY + ["--cfg_dropout=0", "--word_dropout=0", "--epochs=1", "--mask_memory=True"]
    one = run(args, tmp_path / "one", dataset)
    assert one.returncode == 0, one.stdout + one.stderr
    procs, outs = run_two(args, tmp_path / "two", dataset)
    assert [p.returncode for p in procs] == [0, 0], outs
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert only_run_dir(tmp_path / "one").name == only_run_dir(tmp_path / "two").name  # world size is no recipe key
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-5)
    assert "batch 4 = 2 x 1 x 2" in outs[0]


def test_fsdp_two_processes_train_checkpoint_and_resume(tmp_path, dataset):
    """With the generate and evaluate stages on: sampling gathers each layer once (a sharded layer cannot be sliced
    for its cross-attention keys)."""
    args = TINY + ["--parallel=fsdp", "--epochs=1", "--generate_every=1", "--evaluate_every=1"]
    procs, outs = run_two(args + ["--updates_per_epoch=2"], tmp_path, dataset)
    assert [p.returncode for p in procs] == [0, 0], outs
    ckpt = final_weights(tmp_path)
    assert ckpt["step"] == 2 and all(not hasattr(v, "device_mesh") for v in ckpt["model"].values())
    assert [row["stage"] for row in ckpt["history"]] == ["train", "valid", "generate", "evaluate"]
    assert all("error" not in row for row in ckpt["history"]), ckpt["history"]
    assert len(list((only_run_dir(tmp_path) / "samples" / "1").glob("*.wav"))) == 4
    one_proc = run(args + ["--updates_per_epoch=2", "--parallel=ddp"], tmp_path, dataset)  # same signature: resumes
    assert one_proc.returncode == 0 and "already finished" in one_proc.stdout, one_proc.stdout + one_proc.stderr
    shapes = {k: v.shape for k, v in torch.load(only_run_dir(tmp_path) / "checkpoint.pt", weights_only=True)["model"].items()}
    assert shapes["transformer.layers.0.self_attn.in_proj_weight"] == (96, 32)


def test_continue_from_an_exported_audiocraft_file(tmp_path, dataset):
    import formats
    import model as lm_lib
    cfg = train.parse_args(TINY)
    torch.manual_seed(7)
    source = lm_lib.build_lm(train.config_dict(cfg))
    formats.export_audiocraft_lm(source, source.cfg, tmp_path / "state_dict.bin")
    r = run(TINY + ["--epochs=1", "--lr=0", f"--continue_from={tmp_path / 'state_dict.bin'}"], tmp_path / "runs", dataset)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "continuing from the weights in" in r.stdout
    final = final_weights(tmp_path / "runs")["model"]
    for k, v in source.state_dict().items():
        assert torch.equal(final[k], v), k
    bad = run(TINY + ["--continue_from=/nonexistent/state_dict.bin"], tmp_path / "runs2", dataset)
    assert bad.returncode == 2 and "continue_from=/nonexistent/state_dict.bin" in bad.stderr


def test_non_finite_loss_is_skipped_then_aborts(tmp_path, dataset):
    r = run(TINY + ["--lr=1e30", "--max_norm=0", "--max_nonfinite=2", "--warmup=0"], tmp_path, dataset)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "non-finite" in r.stdout and "max_nonfinite=2" in r.stdout
    assert (only_run_dir(tmp_path) / "status").read_text().strip() == "failed"


def test_lr_schedule():
    cfg = train.Config(lr=1.0, warmup=10, lr_schedule="cosine")
    assert train.lr_at(cfg, 0, 110) == 0 and train.lr_at(cfg, 5, 110) == 0.5 and train.lr_at(cfg, 10, 110) == 1.0
    assert abs(train.lr_at(cfg, 60, 110) - 0.5) < 1e-9 and train.lr_at(cfg, 110, 110) < 1e-12
    assert train.lr_at(train.Config(lr=1.0, warmup=0, lr_schedule="linear"), 25, 100) == 0.75
    assert train.lr_at(train.Config(lr=1.0, warmup=0, lr_schedule="constant"), 99, 100) == 1.0


def test_ema_is_unbiased():
    m = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        m.weight.fill_(1.0)
    ema = train.EMA(m, 0.5)
    with torch.no_grad():
        m.weight.fill_(3.0)
    ema.update(m)  # first update: count 1, the average is the current value, not biased toward the start
    assert torch.allclose(ema.state["weight"], torch.full((1, 2), 3.0))
    with torch.no_grad():
        m.weight.fill_(0.0)
    ema.update(m)  # count 1.5: 3 + (0 - 3) / 1.5 = 1
    assert torch.allclose(ema.state["weight"], torch.full((1, 2), 1.0))


def test_a_deferred_ema_equals_the_direct_one():
    """EMA on the host (ema_device=cpu) folds each copy in at the next update or read: the same averages."""
    m = torch.nn.Linear(3, 2)
    direct, deferred = train.EMA(m, 0.7), train.EMA(m, 0.7, deferred=True)
    for i in range(4):
        with torch.no_grad():
            m.weight.mul_(0.5).add_(i)
        direct.update(m)
        deferred.update(m)
        if i == 1:
            assert deferred.pending and torch.equal(deferred.flush()["weight"], direct.state["weight"])
    assert torch.equal(deferred.flush()["weight"], direct.state["weight"]) and deferred.count == direct.count


def test_first_slurm_host():
    assert train.first_slurm_host("gpu[012-015,020],cpu1") == "gpu012"
    assert train.first_slurm_host("node7,node8") == "node7"
    assert train.first_slurm_host("localhost") == "localhost"


def test_debug_recipe_learns_to_follow_text(tmp_path):
    """The README's recipe on a smaller demo set: valid ce falls well below its start, and the model given
    the text predicts better than the same model given none."""
    root = tmp_path / "data"
    demo.make_demo_set(root / "demo", seed=0, sizes={"train": 64, "valid": 16, "evaluate": 4, "generate": 2})
    r = run(["config/debug.py", "--generate_every=0", "--evaluate_every=0"], tmp_path / "runs", root)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [json.loads(line) for line in (only_run_dir(tmp_path / "runs") / "history.jsonl").read_text().splitlines()]
    valid = [row for row in rows if row["stage"] == "valid"]
    assert valid[-1]["ce"] < valid[0]["ce"] - 0.1, valid
    assert valid[-1]["ce"] < valid[-1]["ce_uncond"], valid


# ---- trust at scale: schedules, positions, one writer, interrupts, stage failures, devices

def history(runs):
    return [json.loads(line) for line in (only_run_dir(runs) / "history.jsonl").read_text().splitlines()]


def test_ema_is_scheduled_on_the_updates_of_the_run_not_of_the_epoch(tmp_path, dataset):
    """ema_every larger than an epoch: the EMA still updates (AudioCraft's per-epoch count never would), so valid
    and export do not see random weights."""
    r = run(TINY + ["--updates_per_epoch=2", "--ema_every=3", "--epochs=2"], tmp_path, dataset)
    assert r.returncode == 0, r.stdout + r.stderr
    ckpt = final_weights(tmp_path)
    assert ckpt["ema"]["count"] == 1.0   # one update, at update 3 of 4


def test_resume_with_another_grad_accum_continues_at_the_same_sample(tmp_path, dataset):
    """grad_accum is an infrastructure key: a run stopped with 1 micro-step per update and resumed with 2 consumes the
    same items in the same updates (the data position is counted in samples), so it ends where the straight run ends."""
    args = TINY + ["--epochs=1", "--updates_per_epoch=6"]
    straight = run(args, tmp_path / "a", dataset)
    assert straight.returncode == 0, straight.stdout + straight.stderr
    proc = run(args, tmp_path / "b", dataset, wait=False)
    wait_for_log(tmp_path / "b", "epoch 1 step 2/6", proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == train.EXIT_REQUEUE
    stopped = torch.load(only_run_dir(tmp_path / "b") / "checkpoint.pt", weights_only=True)
    assert stopped["samples"] == 4 * stopped["step"] and 2 <= stopped["step"] < 6
    resumed = run(args + ["--grad_accum=2"], tmp_path / "b", dataset)
    assert resumed.returncode == 0 and "batch 4 = 1 x 2 x 2" in resumed.stdout, resumed.stdout + resumed.stderr
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert b["samples"] == a["samples"] == 24
    for k in a["model"]:   # the same items; only the summation order of the two halves differs
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-5)


def test_a_second_launch_and_clear_are_refused_while_a_run_is_live(tmp_path, dataset):
    args = TINY + ["--epochs=1", "--updates_per_epoch=100000", "--log_every=50"]
    first = run(args, tmp_path, dataset, wait=False)
    try:
        wait_for_log(tmp_path, "epoch 1 step 50/100000", first)
        for extra in ([], ["--clear=True"]):
            second = run(args + extra, tmp_path, dataset)
            assert second.returncode == 2, second.stdout + second.stderr
            assert f"is in use by process {first.pid} on {socket.gethostname()}" in second.stderr, second.stderr
        assert first.poll() is None, "the first run is untouched"
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == train.EXIT_REQUEUE
    d = only_run_dir(tmp_path)
    assert (d / "log.txt").read_text().count("nanomusicgen run ") == 1   # one writer: no doubled log lines
    assert torch.load(d / "checkpoint.pt", weights_only=True)["step"] >= 2   # nothing of the first was deleted


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tmp_path, dataset):
    proc = run(TINY, tmp_path, dataset, wait=False)
    wait_for_log(tmp_path, "epoch 1 step 2/4", proc)
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == train.EXIT_REQUEUE, out
    assert "stopped by signal SIGINT" in out and "run the same command again to resume" in out
    assert "Traceback" not in out
    d = only_run_dir(tmp_path)
    assert (d / "status").read_text().strip() == "preempted"
    resumed = run(TINY, tmp_path, dataset)
    assert resumed.returncode == 0 and "resumed from checkpoint.pt" in resumed.stdout, resumed.stdout + resumed.stderr


def test_a_stop_during_the_generate_stage_keeps_the_epoch_and_runs_the_stage_on_resume(tmp_path, dataset):
    args = TINY + ["--epochs=1", "--generate_every=1", "--generate_count=2", "--generate_duration=20"]
    proc = run(args, tmp_path, dataset, wait=False)
    wait_for_log(tmp_path, "epoch   1 valid", proc)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == train.EXIT_REQUEUE, out
    assert "stopped by signal SIGTERM after the updates of epoch 1" in out
    ckpt = torch.load(only_run_dir(tmp_path) / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["pending"] == ["generate"]   # the epoch is saved; the stage is owed
    resumed = run(args, tmp_path, dataset)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert [(r["epoch"], r["stage"]) for r in history(tmp_path)] == [(1, "train"), (1, "valid"), (1, "generate")]
    assert len(list((only_run_dir(tmp_path) / "samples" / "1").glob("*.wav"))) == 4


def test_a_failing_generate_stage_is_reported_and_training_goes_on(tmp_path, dataset):
    """A full disk or a broken sample in the generate stage must not lose the epoch nor stop the run: the error is
    in the stage's history row and the log, and the next epochs train."""
    args = TINY + ["--generate_every=1"]
    d = train.run_dir(train.parse_args(args + [f"--runs_dir={tmp_path}", f"--dataset={dataset / 'demo'}"]))
    d.mkdir(parents=True)
    (d / "samples").write_text("a file where the samples folder goes")
    r = run(args, tmp_path, dataset)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = history(tmp_path)
    assert [(row["epoch"], row["stage"]) for row in rows] == [(1, "train"), (1, "valid"), (1, "generate"),
                                                              (2, "train"), (2, "valid"), (2, "generate")]
    assert all("error" in row and "samples" in row["error"] for row in rows if row["stage"] == "generate")
    assert "warning: the generate stage of epoch 1 failed; training goes on" in r.stdout
    assert (d / "status").read_text().strip() == "done"


def test_the_device_is_resolved_once_per_local_rank(monkeypatch):
    from env import UserError
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert env.resolve_device("cuda", 3, 8) == torch.device("cuda", 3)
    assert env.resolve_device("", 5, 8) == torch.device("cuda", 5)
    assert env.resolve_device("cuda:2", 0, 1) == torch.device("cuda", 2)   # one process: any GPU it names
    with pytest.raises(UserError, match=r'device="cuda:0" names one GPU, but 8 processes run on this node'):
        env.resolve_device("cuda:0", 1, 8)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)   # srun with one GPU per task: each sees cuda:0
    assert env.resolve_device("cuda", 6, 8) == torch.device("cuda", 0)
    with pytest.raises(UserError, match='device="meta" is not a device to compute on'):
        env.resolve_device("meta")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="CUDA is not available"):
        env.resolve_device("cuda")


def test_peak_flops_matches_whole_device_names():
    import model
    peak = lambda name: model.peak_flops(torch.device("cuda"), name)  # noqa: E731
    assert peak("NVIDIA L4") == 121e12 and peak("NVIDIA L40") == 181e12 and peak("NVIDIA L40S") == 362e12
    assert peak("NVIDIA H200 NVL") == 835e12 and peak("NVIDIA H200") == 989e12
    assert peak("NVIDIA H100 PCIe") == 756e12 and peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak("Tesla V100-SXM2-16GB") is None and peak("NVIDIA A10") == 125e12


def test_the_evaluate_stage_adds_the_chosen_metrics_to_its_row(tmp_path, dataset):
    """chroma_cos needs no weights: the evaluate row gets it beside ce and fd, between 0 and 1."""
    r = run(TINY + ["--epochs=1", "--evaluate_every=1", "--metrics=chroma_cos", "--evaluate_samples=3"], tmp_path,
            dataset)
    assert r.returncode == 0, r.stdout + r.stderr
    (row,) = [row for row in history(tmp_path) if row["stage"] == "evaluate"]
    assert 0 <= row["chroma_cos"] <= 1 and row["fd"] >= 0 and "error" not in row, row
    assert f"chroma_cos {row['chroma_cos']:.4g}" in r.stdout


def test_a_generate_stage_sample_is_remade_by_generate_py_from_its_json(tmp_path, dataset):
    """One sampler: the stage's sample i and `generate.py --run=RUN --prompt=P --seed=ROW_SEED` on the same (best)
    weights are the same music (the codec decodes a batch and a single row differently by at most a 16-bit step)."""
    import soundfile as sf
    r = run(TINY + ["--epochs=1", "--generate_every=1", "--generate_duration=1.5"], tmp_path, dataset)   # 2 windows
    assert r.returncode == 0, r.stdout + r.stderr
    d = only_run_dir(tmp_path)
    meta = json.loads((d / "samples" / "1" / "001.json").read_text())
    out = tmp_path / "again.wav"
    g = subprocess.run([sys.executable, str(ROOT / "generate.py"), f"--run={d}", f"--prompt={meta['prompt']}",
                        f"--seed={meta['row_seed']}", f"--duration={meta['generate_duration']}", f"--out={out}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert g.returncode == 0, g.stdout + g.stderr
    stage, _ = sf.read(d / "samples" / "1" / "001.wav", dtype="int16")
    again, _ = sf.read(out, dtype="int16")
    assert stage.shape == again.shape and abs(stage.astype(int) - again.astype(int)).max() <= 1
    assert (stage != 0).mean() > 0.5   # music, not silence
