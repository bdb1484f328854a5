"""evaluate.py: evaluate-only runs on a debug run: the report and the history row, reuse of generated files, resuming
after a stop, references shorter than the clips, the run's lock, several processes."""
import importlib.util
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import env
import evaluate
import generate
import metrics
import model as lm_lib
import _faults_util as fu
from _model_util import make_run
from env import UserError

if importlib.util.find_spec("transformers"):
    from test_hf import hf_dir  # noqa: F401  (the fixture: a random tiny transformers MusicGen directory)

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(2)


def tone(path, seconds, freq):
    t = np.arange(int(seconds * 32000)) / 32000
    data.save_audio(path, 0.4 * np.sin(2 * np.pi * freq * t), 32000)
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A debug run (random weights) whose checkpoint says it trained 3 epochs, 180 updates."""
    d = make_run(tmp_path_factory.mktemp("runs"))
    ckpt = torch.load(d / "checkpoint.pt", weights_only=True)
    torch.save({**ckpt, "epoch": 4, "step": 180}, d / "checkpoint.pt")
    return d


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """<ds>/evaluate: item 0 a 1 s tone, item 1 a 0.2 s tone (shorter than the clips), item 2 missing (skipped),
    item 3 a 1 s tone without a sidecar (generated unconditionally)."""
    root = tmp_path_factory.mktemp("ds")
    split = root / "evaluate"
    split.mkdir()
    files = [tone(split / "a.wav", 1.0, 440.0), tone(split / "b.wav", 0.2, 262.0), split / "gone.wav",
             tone(split / "d.wav", 1.0, 330.0)]
    for f, text in zip(files[:2], ("a calm piano in A", "a short C note")):
        f.with_suffix(".json").write_text(json.dumps({"description": text}))
    data.write_manifest([data.AudioMeta(str(f), 1.0, 32000) for f in files], split / "data.jsonl")
    return root


def args(run_dir, dataset, out, *extra):
    return [f"--run={run_dir}", f"--dataset={dataset}", "--metrics=chroma_cos", "--duration=0.3", "--batch_size=2",
            f"--out={out}", *extra]


def history_rows(run_dir):
    return [r for r in env.read_history(run_dir / "history.jsonl") if r.get("stage") == evaluate.STAGE]


def count_sampling(monkeypatch):
    calls = []
    real = lm_lib.sample
    monkeypatch.setattr(lm_lib, "sample", lambda *a, **kw: calls.append(len(a[1])) or real(*a, **kw))
    return calls


@pytest.fixture(scope="module")
def first(run_dir, dataset, tmp_path_factory):
    """One evaluate-only run: (its output directory, its report)."""
    out = tmp_path_factory.mktemp("eval") / "out"
    assert evaluate.main(args(run_dir, dataset, out)) == 0
    return out, json.loads((out / evaluate.REPORT).read_text())


def test_evaluate_only_writes_the_report_and_a_history_row(run_dir, dataset, first, tmp_path):
    out, report = first
    assert report["counts"]["items"] == 3 and report["counts"]["generated"] == 3 and report["counts"]["reused"] == 0
    assert [s["index"] for s in report["counts"]["skipped"]] == [2]
    assert report["counts"]["short_references"] == 1 and report["counts"]["scored"] == 3
    assert report["model"]["weights"] == "best_state" and report["model"]["source"] == str(run_dir / "checkpoint.pt")
    assert report["settings"]["top_k"] == 50 and report["settings"]["duration"] == 0.3   # the run's top_k
    assert report["timing"]["seconds_per_item"] > 0
    # item i is file i with row seed seed + i, from its sidecar's description (none: unconditional)
    assert sorted(p.name for p in (out / "samples").glob("*.wav")) == ["000.wav", "001.wav", "003.wav"]
    metas = {i: json.loads((out / "samples" / f"{i:03d}.json").read_text()) for i in (0, 1, 3)}
    assert [(m["row_seed"], m["prompt"]) for m in metas.values()] == [(0, "a calm piano in A"), (1, "a short C note"),
                                                                      (3, None)]
    assert metas[3]["reference"] == str(dataset / "evaluate" / "d.wav")
    # the number is metrics.py's on the same pairs (it pairs by name and cuts each pair to the shorter one)
    refs = tmp_path / "refs"
    refs.mkdir()
    for i, m in metas.items():
        (refs / f"{i:03d}.wav").symlink_to(m["reference"])
    assert metrics.main(["chroma_cos", str(refs), str(out / "samples"), f"--out={tmp_path / 'm.json'}"]) == 0
    expected = json.loads((tmp_path / "m.json").read_text())["metrics"]["chroma_cos"]
    assert report["metrics"]["chroma_cos"] == pytest.approx(expected, abs=1e-9)
    (row,) = history_rows(run_dir)
    assert row["chroma_cos"] == report["metrics"]["chroma_cos"] and (row["epoch"], row["step"]) == (3, 180)
    assert row["items"] == 3 and row["report"] == str((out / evaluate.REPORT).resolve())
    assert env.run_status(run_dir)["epoch"] == 3
    # a file remakes alone with the generate.py command its .json records
    command = shlex.split(metas[1]["command"])[2:]
    generate.main([a for a in command if not a.startswith("--out=")] + [f"--out={tmp_path / 'alone.wav'}"])
    assert (tmp_path / "alone.wav").read_bytes() == (out / "samples" / "001.wav").read_bytes()


def test_a_second_run_reuses_every_file_and_samples_nothing(run_dir, dataset, first, monkeypatch, capsys):
    out, report = first
    calls = count_sampling(monkeypatch)
    made = {p.name: p.stat().st_mtime_ns for p in (out / "samples").iterdir()}
    assert evaluate.main(args(run_dir, dataset, out)) == 0
    again = json.loads((out / evaluate.REPORT).read_text())
    assert calls == [] and {p.name: p.stat().st_mtime_ns for p in (out / "samples").iterdir()} == made
    assert again["metrics"] == report["metrics"] and again["counts"]["reused"] == 3
    assert again["counts"]["generated"] == 0
    assert len(history_rows(run_dir)) == 1 and "already holds" in capsys.readouterr().out   # no duplicate row
    # another setting is other files: only the first item (--samples=1), made again
    assert evaluate.main(args(run_dir, dataset, out, "--samples=1", "--top_k=3", "--history=False")) == 0
    assert calls == [1] and json.loads((out / "samples" / "000.json").read_text())["top_k"] == 3
    assert (out / "samples" / "001.wav").stat().st_mtime_ns == made["001.wav"]


def test_a_stopped_evaluation_resumes_to_the_report_of_an_uninterrupted_one(run_dir, dataset, tmp_path):
    """SIGTERM after the first batch: exit 75, the finished files kept; the same command makes the rest and ends
    with the report (and the files) of a run that was never stopped."""
    fu.context()
    common = ["--batch_size=1", "--history=False"]
    whole = fu.Training(args(run_dir, dataset, tmp_path / "whole", *common), tmp_path / "whole.txt",
                        target="evaluate.py")
    assert whole.wait(300) == 0, whole.output()
    out = tmp_path / "stopped"
    stopped = fu.Training(args(run_dir, dataset, out, *common), tmp_path / "stopped.txt", target="evaluate.py",
                          fault="slow=model.sample:1.5")    # each batch waits 1.5 s first: time to signal
    fu.wait_until(lambda: (out / "samples" / "000.json").exists(), stopped, timeout=120, what="the first file")
    stopped.signal(signal.SIGTERM)
    assert stopped.wait(60) == env.EXIT_REQUEUE, stopped.output()
    assert "stopped by SIGTERM" in stopped.output()
    assert not (out / "samples" / "003.wav").exists() and not (out / evaluate.REPORT).exists()
    resumed = fu.Training(args(run_dir, dataset, out, *common), tmp_path / "resumed.txt", target="evaluate.py")
    assert resumed.wait(300) == 0, resumed.output()
    a, b = (json.loads((d / evaluate.REPORT).read_text()) for d in (tmp_path / "whole", out))
    assert b["metrics"] == a["metrics"] and b["counts"]["reused"] >= 1 and b["counts"]["generated"] >= 1
    assert {k: v for k, v in b["counts"].items() if k not in ("generated", "reused")} == \
        {k: v for k, v in a["counts"].items() if k not in ("generated", "reused")}
    assert {k: v for k, v in b["settings"].items()} == a["settings"]
    for name in ("000.wav", "001.wav", "003.wav"):
        assert (out / "samples" / name).read_bytes() == (tmp_path / "whole" / "samples" / name).read_bytes()
    assert "eta" in whole.output() and "s/item" in whole.output()


def test_a_run_that_a_live_process_holds_is_refused_before_any_work(run_dir, dataset, tmp_path, monkeypatch):
    (run_dir / env.LOCK_FILE).write_text(f"{os.getpid()} {socket.gethostname()} {int(time.time())}\n")
    try:
        with pytest.raises(UserError, match=f"in use by process {os.getpid()}.*--history=False"):
            evaluate.main(args(run_dir, dataset, tmp_path / "out"))
        assert not (tmp_path / "out").exists()
        # a training process that starts during the evaluation: the report is written, the row is not
        answers = iter([None, (123, "elsewhere", "now")])
        monkeypatch.setattr(evaluate, "live_holder", lambda folder: next(answers))
        history = run_dir / "history.jsonl"
        before = history.read_text() if history.exists() else None
        with pytest.raises(UserError, match="process 123 on elsewhere.*the report is at"):
            evaluate.main(args(run_dir, dataset, tmp_path / "out", "--samples=1"))
        assert (tmp_path / "out" / evaluate.REPORT).is_file()
        assert (history.read_text() if history.exists() else None) == before
    finally:
        (run_dir / env.LOCK_FILE).unlink()


def test_clap_refuses_items_without_a_description_before_loading_anything(run_dir, dataset, tmp_path):
    with pytest.raises(UserError, match="clap compares each clip with its description, but 1 of the 3 items"):
        evaluate.main(args(run_dir, dataset, tmp_path / "out", "--metrics=clap"))


def test_torchrun_shards_the_items_and_reports_what_one_process_does(run_dir, dataset, first, tmp_path):
    out, report = first
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--",
           str(ROOT / "evaluate.py"), *args(run_dir, dataset, tmp_path / "out", "--history=False")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    two = json.loads((tmp_path / "out" / evaluate.REPORT).read_text())
    assert two["settings"]["processes"] == 2 and two["counts"] == {**report["counts"], "generated": 3, "reused": 0}
    assert two["metrics"]["chroma_cos"] == pytest.approx(report["metrics"]["chroma_cos"], abs=1e-6)
    for name in ("000.json", "001.json", "003.json"):   # the same items, prompts and seeds on either rank
        a, b = (json.loads((d / "samples" / name).read_text()) for d in (out, tmp_path / "out"))
        assert (a["prompt"], a["row_seed"], a["frames"]) == (b["prompt"], b["row_seed"], b["frames"])


def test_a_transformers_musicgen_directory_is_evaluated_without_a_history_row(dataset, tmp_path, request):
    pytest.importorskip("transformers")
    directory, _ = request.getfixturevalue("hf_dir")
    before = sorted(p.name for p in directory.iterdir())
    assert evaluate.main([f"--run={directory}", f"--dataset={dataset}", "--metrics=chroma_cos", "--duration=0.3",
                          f"--out={tmp_path / 'out'}"]) == 0
    report = json.loads((tmp_path / "out" / evaluate.REPORT).read_text())
    assert report["counts"]["generated"] == 3 and report["settings"]["top_k"] == 250   # its generation_config
    assert sorted(p.name for p in directory.iterdir()) == before   # no history.jsonl, no lock in it
