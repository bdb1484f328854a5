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
    assert meta["description"] and meta["cfg_coef"] == 3.0
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
    resumed = run(TINY, tmp_path / "b", dataset)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from checkpoint.pt" in resumed.stdout
    assert not list(d.glob("*.tmp")), "a resumed run removes the temporary files of the killed one"
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
    args = TINY + ["--parallel=fsdp", "--epochs=1"]
    procs, outs = run_two(args + ["--updates_per_epoch=2"], tmp_path, dataset)
    assert [p.returncode for p in procs] == [0, 0], outs
    ckpt = final_weights(tmp_path)
    assert ckpt["step"] == 2 and all(not hasattr(v, "device_mesh") for v in ckpt["model"].values())
    one_proc = run(args + ["--updates_per_epoch=2", "--parallel=ddp"], tmp_path, dataset)  # same signature: resumes
    assert one_proc.returncode == 0 and "already finished" in one_proc.stdout, one_proc.stdout + one_proc.stderr
    shapes = {k: v.shape for k, v in torch.load(only_run_dir(tmp_path) / "checkpoint.pt", weights_only=True)["model"].items()}
    assert shapes["transformer.layers.0.self_attn.in_proj_weight"] == (96, 32)


def test_continue_from_an_exported_audiocraft_file(tmp_path, dataset):
    import model as lm_lib
    import text
    cfg = train.parse_args(TINY)
    lm_cfg = lm_lib.LMConfig(**{f: getattr(cfg, f) for f in lm_lib.LMConfig.__dataclass_fields__ if hasattr(cfg, f)})
    torch.manual_seed(7)
    cond = text.build_conditioner("lut", cfg.dim, lut_tokenizer=cfg.lut_tokenizer, lut_dim=cfg.lut_dim,
                                  lut_layers=cfg.lut_layers)
    source = lm_lib.MusicGenLM(lm_cfg, cond)
    lm_lib.export_audiocraft_lm(source, lm_cfg, tmp_path / "state_dict.bin")
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


def test_frechet_distance_is_zero_for_equal_sets_and_grows_with_shift():
    x = torch.randn(500, 4, generator=torch.Generator().manual_seed(0))
    assert abs(train.frechet_distance(x, x)) < 1e-6
    assert abs(train.frechet_distance(x, x + 2.0) - 16.0) < 1e-3


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
