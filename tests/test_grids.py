"""Grids and their launcher: expansion, signatures, status, sbatch scripts, errors; and a real one-node SLURM.

    python -m pytest tests/test_grids.py -q                  # the real-SLURM test needs root (installs slurm-wlm)
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest

import env
import grids
import train
from env import UserError
from grids.__main__ import main as grids_main

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "tests" / "slurm_harness.sh"


@pytest.fixture
def runs_dir(tmp_path, monkeypatch):
    path = tmp_path / "runs"
    monkeypatch.setenv("AUDIOCRAFT_DORA_DIR", str(path))
    monkeypatch.setattr(grids, "_available", None)
    env.reset()
    return path


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "tiny.py"
    path.write_text("dim = 64\nn_layers = 2\nn_heads = 4\nbatch_size = 32\n")
    return path


def write_grid(tmp_path, body, name="g"):
    path = tmp_path / f"{name}.py"
    path.write_text(body)
    return str(path)


def no_slurm(monkeypatch):
    monkeypatch.setattr(grids, "_available", False)


# ----------------------------------------------------------------------------------------------------------
# Expansion and signatures

def test_grid_expands_bindings_in_order_and_copies_leave_the_parent_unchanged(tmp_path, runs_dir, tiny_config):
    grid = write_grid(tmp_path, f"""
def explore(launcher):
    launcher.bind_({str(tiny_config)!r}, seed=1)
    launcher.slurm_(gpus=0, cpus=2)
    for lr in (1e-3, 3e-3):
        launcher(lr=lr)
    wide = launcher.bind(dim=128, seed=2)
    wide.slurm(gpus=16)({{"label": "a b"}}, "--ema=False")
    launcher(betas=(0.8, 0.9))
""")
    runs = grids.load(grid, extra={"epochs": "3"})
    assert [r.overrides for r in runs] == [
        {"seed": 1, "lr": 1e-3, "epochs": "3"}, {"seed": 1, "lr": 3e-3, "epochs": "3"},
        {"seed": 2, "dim": 128, "label": "a b", "ema": "False", "epochs": "3"},
        {"seed": 1, "betas": (0.8, 0.9), "epochs": "3"}]
    assert runs[0].argv == [str(tiny_config), "--seed=1", "--lr=0.001", "--epochs=3"]
    assert runs[3].argv[-2] == "--betas=[0.8,0.9]"
    assert [(r.slurm["nodes"], r.slurm["gpus_per_node"], r.slurm["cpus"]) for r in runs] == \
        [(1, 0, 2), (1, 0, 2), (2, 8, 2), (1, 0, 2)]   # slurm() copied: the last run is back on CPU
    assert len({r.sig for r in runs}) == 4
    assert all(r.dir == runs_dir / "xps" / r.sig and r.epochs == 3 for r in runs)
    assert runs[2].where.endswith("g.py:8")


def test_grid_signature_and_run_dir_equal_train_py_for_the_same_command(tmp_path, runs_dir, tiny_config):
    values = [dict(lr=3e-4, betas=(0.8, 0.99), ema=False, label="two words", delays=[0, 2, 4, 6], warmup=0),
              dict(lr=1 / 3, max_norm=2, num_workers=7)]
    grid = write_grid(tmp_path, f"""
def explore(launcher):
    launcher.bind_({str(tiny_config)!r})
    for overrides in {values!r}:
        launcher(**overrides)
""")
    runs = grids.load(grid)
    for run, overrides in zip(runs, values):   # the values as a config file sets them, not their spelling
        cfg = train.parse_args([str(tiny_config)])
        for key, value in overrides.items():
            setattr(cfg, key, env.coerce_key(train.TYPES, key, value, "test"))
        assert run.sig == train.config_signature(cfg) and run.dir == train.run_dir(cfg)
    # and what a fresh `python train.py` makes of the run's command line
    out = subprocess.run([sys.executable, "train.py", *runs[0].argv, "--print_config=True"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert re.search(r"^signature: (\w+)$", out.stdout, re.M).group(1) == runs[0].sig
    assert re.search(r"^run dir: +(.+)$", out.stdout, re.M).group(1) == str(runs[0].dir)


def test_same_experiment_twice_is_listed_once_with_a_warning(tmp_path, runs_dir, tiny_config, capsys):
    grid = write_grid(tmp_path, f"""
def explore(launcher):
    launcher.bind_({str(tiny_config)!r})
    launcher(lr=1e-3)
    launcher(lr=1e-3, num_workers=9)   # an infrastructure key: the same experiment
    launcher(lr=2e-3)
""")
    runs = grids.load(grid)
    assert [r.overrides["lr"] for r in runs] == [1e-3, 2e-3]
    assert "g.py:5: same experiment as" in capsys.readouterr().err


def test_bundled_grids_expand_with_audiocraft_resources(runs_dir):
    small, medium, large = grids.load("musicgen_base_32khz")
    assert [r.slurm["nodes"] for r in (small, medium, large)] == [4, 8, 12]
    assert [r.configs for r in (small, medium, large)] == [
        ["config/base.py"], ["config/base.py", "config/medium.py"], ["config/base.py", "config/large.py"]]
    # parallel is an infrastructure key: medium's signature is that of base + medium alone
    assert medium.sig == train.config_signature(train.parse_args(["config/base.py", "config/medium.py"]))
    debug = grids.load("debug")
    assert len(debug) == 2 and all(r.configs == ["config/debug.py"] and r.slurm["gpus"] == 0 for r in debug)


# ----------------------------------------------------------------------------------------------------------
# Bad grid files: one line naming the file, the line and what to do

BAD_GRIDS = {
    "no_explore": ("x = 1\n", "no explore(launcher) function"),
    "syntax": ("def explore(launcher)\n    pass\n", "bad.py:1: SyntaxError"),
    "no_runs": ("def explore(launcher):\n    launcher.bind_(lr=1)\n", "added no runs"),
    "unknown_key": ("def explore(launcher):\n    launcher(lrr=1e-3)\n",
                    'bad.py:2: unknown key "lrr" (did you mean "lr"?)'),
    "bad_value": ("def explore(launcher):\n    launcher(epochs='many')\n", "bad.py:2: command line: epochs"),
    "slurm_key": ("def explore(launcher):\n    launcher.slurm_(gpu=8)\n    launcher()\n",
                  'bad.py:2: unknown SLURM setting "gpu" (did you mean "gpus"?)'),
    "slurm_value": ("def explore(launcher):\n    launcher.slurm_(gpus='8')\n    launcher()\n",
                    "bad.py:2: SLURM setting gpus='8' must be a non-negative int"),
    "uneven_gpus": ("def explore(launcher):\n    launcher.slurm_(gpus=12)\n    launcher()\n",
                    "bad.py:3: gpus=12 spans nodes but is not a multiple of gpus_per_node=8"),
    "batch_per_gpu": ("def explore(launcher):\n    launcher.slurm_(gpus=64)\n    launcher(batch_size=100)\n",
                      "bad.py:3: batch_size=100 does not divide across 64 processes"),
    "missing_config": ("def explore(launcher):\n    launcher('config/nope.py')\n", "bad.py:2: "),
    "name_error": ("def explore(launcher):\n    for lr in lrs:\n        launcher(lr=lr)\n", "bad.py:2: NameError"),
    "bad_bind": ("def explore(launcher):\n    launcher.bind_(3)\n    launcher()\n", "bad.py:2: 3 is neither"),
    "bad_call": ("def explore(launcher):\n    launcher.bind_(lr=1)\n    launcher('--seed')\n",
                 'bad.py:3: "--seed" must be --key=value'),
}


@pytest.mark.parametrize("case", sorted(BAD_GRIDS))
def test_bad_grid_file_is_one_line_error_naming_file_and_line(case, tmp_path, runs_dir):
    body, expected = BAD_GRIDS[case]
    with pytest.raises(UserError) as e:
        grids.load(write_grid(tmp_path, body, name="bad"))
    assert expected.replace("command line: ", "") in str(e.value) and "\n" not in str(e.value)
    assert not runs_dir.exists()


def test_unknown_grid_name_lists_the_grids_and_cli_exits_2(runs_dir, capsys):
    with pytest.raises(UserError, match=r"no grid 'nope' .* grids: .*debug.*musicgen_base_32khz"):
        grids.load("nope")
    out = subprocess.run([sys.executable, "-m", "grids", "nope", "--dry_run"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.startswith("error: no grid 'nope'") and out.stderr.count("\n") == 1
    assert not runs_dir.exists()


# ----------------------------------------------------------------------------------------------------------
# Status

def fake_run_dir(path, status=None, history=(), checkpoint=False):
    path.mkdir(parents=True)
    if status:
        (path / "status").write_text(status + "\n")
    (path / "history.jsonl").write_text("".join(json.dumps(row) + "\n" for row in history))
    if checkpoint:
        (path / "checkpoint.pt").write_bytes(b"x")


def three_runs(tmp_path, tiny_config):
    grid = write_grid(tmp_path, f"""
def explore(launcher):
    launcher.bind_({str(tiny_config)!r}, epochs=4)
    launcher.slurm_(gpus=0)
    for lr in (1, 2, 3):
        launcher(lr=lr * 1e-3)
""")
    return grid, grids.load(grid)


def test_status_table_from_run_directories(tmp_path, runs_dir, tiny_config, monkeypatch):
    no_slurm(monkeypatch)
    grid, (a, b, c) = three_runs(tmp_path, tiny_config)
    history = [{"epoch": 1, "stage": "train", "ce": 5.5}, {"epoch": 1, "stage": "valid", "ce": 5.25},
               {"epoch": 2, "stage": "train", "ce": 4.5}, {"epoch": 2, "stage": "valid", "ce": 5.375}]
    fake_run_dir(a.dir, "done", history, checkpoint=True)
    fake_run_dir(b.dir, "failed", [{"epoch": 1, "stage": "train", "ce": 7.0}])
    rows = grids.status([a, b, c])
    assert [r["status"] for r in rows] == ["done", "failed", "not started"]
    text = grids.table("g", [a, b, c], rows).splitlines()
    assert text[0] == f"grid g: 3 run(s) of {tiny_config} epochs=4"
    assert text[1].split() == ["sig", "overrides", "status", "epoch", "train", "ce", "valid", "ce", "best", "ce"]
    assert text[2].split() == [a.sig, "lr=0.001", "done", "2/4", "4.5000", "5.3750", "5.2500"]
    assert text[3].split() == [b.sig, "lr=0.002", "failed", "1/4", "7.0000", "-", "-"]
    assert text[4].split()[:4] == [c.sig, "lr=0.003", "not", "started"]


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """sbatch/squeue/sinfo/scancel stand-ins: sbatch records its script and answers job ids 101, 102, ...;
    squeue answers what <bin>/queue holds ("id|STATE" lines)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {
        "sinfo": "echo debug",
        "sbatch": 'n=$(( $(cat "$D/count" 2>/dev/null || echo 100) + 1 )); echo $n > "$D/count"; '
                  'echo "$n $*" >> "$D/sbatch.log"; echo "$n;cluster"',
        "squeue": 'cat "$D/queue" 2>/dev/null; true',
        "scancel": 'echo "$*" >> "$D/scancel.log"',
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text(f'#!/bin/bash\nD={bin_dir}\n{body}\n')
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setattr(grids, "_available", None)
    return bin_dir


def test_status_from_slurm_wins_over_run_directories(tmp_path, runs_dir, tiny_config, fake_slurm):
    grid, (a, b, c) = three_runs(tmp_path, tiny_config)
    for run, job in ((a, 7), (b, 8), (c, 9)):
        fake_run_dir(run.dir, "preempted" if run is a else "running")
        (run.dir / "slurm").mkdir()
        (run.dir / "slurm" / "job.json").write_text(json.dumps({"job_id": str(job)}))
    (fake_slurm / "queue").write_text("7|PENDING\n8|RUNNING\n9|CANCELLED\n")
    rows = grids.status([a, b, c])
    # requeued after preemption: queued; running; its job gone while the run said running: failed
    assert [r["status"] for r in rows] == ["queued", "running", "failed"]
    assert [r["job"] for r in rows] == ["7", "8", "9"]
    assert grids.table("g", [a, b, c], rows).splitlines()[1].split()[-1] == "job"


# ----------------------------------------------------------------------------------------------------------
# sbatch scripts and submission

def directives(script):
    return [line.split(" ", 1)[1] for line in script.splitlines() if line.startswith("#SBATCH ")]


def test_sbatch_script_directives_for_the_musicgen_grid(runs_dir):
    small, medium, large = grids.load("musicgen_base_32khz")
    code = runs_dir / "code" / "abc"
    script = grids.sbatch_script("musicgen_base_32khz", large, code)
    assert directives(script) == [
        f"--job-name=musicgen_base_32khz_{large.sig}", "--nodes=12", "--ntasks-per-node=1", "--cpus-per-task=80",
        "--gpus-per-node=8", "--mem=320G", "--time=4320", "--partition=debug", "--requeue", "--signal=USR1@120",
        "--open-mode=append", f"--output={large.dir}/slurm/%j.out"]
    assert script.splitlines()[-1] == \
        f"exec bash {code}/grids/train.sbatch config/base.py config/large.py --parallel=fsdp"
    assert "export MAX_REQUEUES=20" in script and f"GIT_CEILING_DIRECTORIES={code.parent}" in script
    # the job finds its run where the launcher looks for it, though the team file says "runs" (relative)
    assert f"export AUDIOCRAFT_DORA_DIR={runs_dir}\n" in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_sbatch_script_for_a_cpu_grid_with_team_partition_and_setup(tmp_path, runs_dir, tiny_config, monkeypatch):
    team = tmp_path / "team.yaml"
    team.write_text("default:\n  partitions: {team: audio, global: learnlab}\n  slurm_exclude: node[1-3]\n")
    monkeypatch.setenv("AUDIOCRAFT_CONFIG", str(team))
    env.reset()
    grid = write_grid(tmp_path, f"""
def explore(launcher):
    launcher.slurm_(gpus=0, cpus=3, time=30, signal_seconds=45, max_requeues=2, qos="high",
                    setup=["module load x", "source venv/bin/activate"])
    launcher({str(tiny_config)!r}, label="it's")
""")
    run, = grids.load(grid)
    script = grids.sbatch_script("cpu", run, tmp_path / "code" / "h")
    assert directives(script) == [
        f"--job-name=cpu_{run.sig}", "--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=3", "--time=30",
        "--partition=audio,learnlab", "--exclude=node[1-3]", "--qos=high", "--requeue", "--signal=USR1@45",
        "--open-mode=append", f"--output={run.dir}/slurm/%j.out"]
    lines = script.splitlines()
    assert lines[-3:-1] == ["module load x", "source venv/bin/activate"] and "export MAX_REQUEUES=2" in script
    assert lines[-1].endswith(f"train.sbatch {tiny_config} '--label=it'\"'\"'s'")   # quoted for bash


def test_wrapper_is_valid_bash_and_usable_by_hand():
    text = (ROOT / grids.WRAPPER).read_text()
    assert subprocess.run(["bash", "-n", str(ROOT / grids.WRAPPER)]).returncode == 0
    wanted = {"--ntasks-per-node=1", "--requeue", "--signal=USR1@120", "--open-mode=append"}
    assert wanted <= set(directives(text))
    assert "--rdzv_backend=c10d" in text and "scontrol requeue" in text


def test_submission_snapshots_code_writes_scripts_and_skips_active_runs(tmp_path, runs_dir, tiny_config,
                                                                        fake_slurm, capsys):
    grid, runs = three_runs(tmp_path, tiny_config)
    fake_run_dir(runs[2].dir, "done")
    assert grids_main([grid]) == 0
    out = capsys.readouterr().out
    assert "(status from SLURM and the run directories)" in out
    assert f"submitted {runs[0].sig} as job 101" in out and f"submitted {runs[1].sig} as job 102" in out
    assert runs[2].sig not in out.split("(status")[1]          # done: not submitted
    submitted = (fake_slurm / "sbatch.log").read_text().splitlines()
    assert submitted == [f"{101 + i} --parsable {r.dir}/slurm/train.sbatch" for i, r in enumerate(runs[:2])]
    job = json.loads((runs[0].dir / "slurm" / "job.json").read_text())
    assert job["job_id"] == "101" and job["argv"] == runs[0].argv
    code = Path(job["code"])
    assert code.parent == runs_dir / "code" and (code / "train.py").read_bytes() == (ROOT / "train.py").read_bytes()
    assert (code / grids.WRAPPER).is_file() and (code / "grids" / "__init__.py").is_file()
    assert set(json.loads((code / "GIT_COMMIT").read_text())) == {"git_commit", "git_dirty"}
    assert f"exec bash {code}/grids/train.sbatch" in (runs[0].dir / "slurm" / "train.sbatch").read_text()
    # again, with the two jobs in the queue: nothing to do
    (fake_slurm / "queue").write_text("101|PENDING\n102|RUNNING\n")
    assert grids_main([grid]) == 0
    assert "nothing to submit" in capsys.readouterr().out
    assert len((fake_slurm / "sbatch.log").read_text().splitlines()) == 2
    # cancel, then clear: both jobs cancelled, every run directory gone, and the runs submitted afresh
    assert grids_main([grid, "--cancel"]) == 0
    assert (fake_slurm / "scancel.log").read_text().split() == ["101", "102"]
    assert grids_main([grid, "--clear", "--yes"]) == 0
    assert not runs[2].dir.exists() or not (runs[2].dir / "status").exists()
    assert len((fake_slurm / "sbatch.log").read_text().splitlines()) == 5


def test_dry_run_prints_scripts_and_writes_nothing(tmp_path, runs_dir, tiny_config, fake_slurm, capsys):
    grid, runs = three_runs(tmp_path, tiny_config)
    assert grids_main([grid, "--dry_run", "--seed=5"]) == 0
    out = capsys.readouterr().out
    assert out.count("#!/bin/bash") == 3 and out.count("--seed=5") >= 3
    assert not runs_dir.exists() and not (fake_slurm / "sbatch.log").exists()


def test_without_slurm_the_launcher_shows_the_table_and_says_how_to_run(tmp_path, runs_dir, tiny_config,
                                                                        monkeypatch, capsys):
    no_slurm(monkeypatch)
    grid, runs = three_runs(tmp_path, tiny_config)
    assert grids_main([grid]) == 0
    out = capsys.readouterr().out
    assert "(status from the run directories)" in out and "add --local" in out and not runs_dir.exists()
    with pytest.raises(UserError, match="--cancel: no SLURM here"):
        grids_main([grid, "--cancel"])


def test_local_launch_runs_each_command_and_skips_done_runs(tmp_path, runs_dir, tiny_config, monkeypatch, capsys):
    no_slurm(monkeypatch)
    grid, runs = three_runs(tmp_path, tiny_config)
    fake_run_dir(runs[1].dir, "done")
    calls = []

    class Proc:
        def __init__(self, cmd, cwd):
            calls.append((cmd, cwd))

        def wait(self):
            return 0

    monkeypatch.setattr(grids.subprocess, "Popen", Proc)
    assert grids_main([grid, "--local", "--dry_run"]) == 0 and calls == []
    assert f"=== {runs[0].sig}: train.py {' '.join(runs[0].argv)}" in capsys.readouterr().out
    assert grids_main([grid, "--local"]) == 0
    assert calls == [([sys.executable, "train.py", *runs[0].argv], ROOT),
                     ([sys.executable, "train.py", *runs[2].argv], ROOT)]
    assert f"{runs[1].sig}: done, skipped" in capsys.readouterr().out


def test_local_launch_uses_torchrun_for_the_gpus_this_machine_has(tmp_path, runs_dir, tiny_config, monkeypatch):
    import torch
    grid = write_grid(tmp_path, "def explore(launcher):\n    launcher.slurm_(gpus=16)\n"
                                f"    launcher({str(tiny_config)!r})\n")
    run, = grids.load(grid)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert grids.local_processes(run) == 4    # 16 asked, 4 here: the batch is split over 4
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert grids.local_processes(run) == 1
    calls = []
    monkeypatch.setattr(grids, "local_processes", lambda run: 2)
    monkeypatch.setattr(grids.subprocess, "Popen", lambda cmd, cwd: calls.append(cmd) or type("P", (), {
        "wait": lambda self: 0})())
    assert grids.run_local([run], [{"status": "not started", "job": ""}]) == 0
    assert calls == [[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                      "train.py", *run.argv]]


def test_local_launch_really_runs_train_py(tmp_path, runs_dir, tiny_config, monkeypatch):
    """--print_config=True is an infrastructure key: same runs, and train.py exits at once."""
    no_slurm(monkeypatch)
    grid = write_grid(tmp_path, f"def explore(launcher):\n    launcher({str(tiny_config)!r}, seed=3)\n")
    runs = grids.load(grid)
    out = subprocess.run([sys.executable, "-m", "grids", grid, "--local", "--print_config=True"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert [m for m in re.findall(r"^signature: (\w+)$", out.stdout, re.M)] == [r.sig for r in runs]


def test_cli_rejects_bad_flags(runs_dir):
    for argv, message in ((["debug", "--dryrun"], "neither a flag"), (["debug", "--cancel", "--local"], "go alone"),
                          (["a", "b"], "expected one grid name"), (["debug", "--tail"], "needs a run signature")):
        with pytest.raises(UserError, match=message):
            grids_main(argv)


def test_help_prints_usage_and_the_grids_there_are(runs_dir):
    out = subprocess.run([sys.executable, "-m", "grids", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("python -m grids NAME"), out.stderr
    assert "grids here: debug, musicgen_base_32khz" in out.stdout


def test_tail_prints_the_log_of_the_latest_attempt(tmp_path, runs_dir, capsys):
    run = runs_dir / "xps" / "abcd1234"
    fake_run_dir(run, "done")
    (run / "log.txt").write_text("epoch 1\nepoch 2\n")
    assert grids_main(["--tail", "abcd1234"]) == 0
    assert capsys.readouterr().out == f"==> {run / 'log.txt'} <==\nepoch 1\nepoch 2\n"
    (run / "slurm").mkdir()
    for attempt, mtime in ((1, 2000), (0, 1000)):   # names sort the other way round
        (run / "slurm" / f"5_{attempt}_node0.log").write_text(f"attempt {attempt}\n")
        os.utime(run / "slurm" / f"5_{attempt}_node0.log", (mtime, mtime))
    assert grids_main(["--tail", "abcd1234"]) == 0
    assert capsys.readouterr().out == f"==> {run / 'slurm' / '5_1_node0.log'} <==\nattempt 1\n"
    with pytest.raises(UserError, match="no run directory"):
        grids_main(["--tail", "ffffffff"])


# ----------------------------------------------------------------------------------------------------------
# A real SLURM: slurmctld + slurmd + munge on localhost, the debug grid submitted, one run preempted

def _install_slurm():
    """None when SLURM's daemons are here (installing them with apt when root can); else why not."""
    needed = ("slurmctld", "slurmd", "sbatch", "munged")
    if all(shutil.which(b) or Path(f"/usr/sbin/{b}").exists() for b in needed):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "SLURM is not installed and cannot be installed here (needs root and apt-get)"
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", "slurm-wlm", "slurmctld", "slurmd",
           "slurm-client", "munge"]
    apt_env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=apt_env)
    if out.returncode != 0:   # a fresh container has no package lists yet
        subprocess.run(["apt-get", "update"], capture_output=True, timeout=600, env=apt_env)
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=apt_env)
    if out.returncode != 0:
        return f"apt-get install slurm-wlm failed: {(out.stderr or out.stdout).strip().splitlines()[-1:]}"
    return None


def _skip(reason):
    """Skipped, never passed: the reason goes to the output and to pytest's warnings summary."""
    print(f"\nSKIP real SLURM: {reason}")
    warnings.warn(f"real-SLURM test skipped: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def slurm_cluster():
    reason = _install_slurm()
    if reason is None and os.geteuid() != 0:
        reason = "the one-node SLURM needs root (slurmd and munged)"
    if reason:
        _skip(reason)
    # not pytest's tmp_path: munged runs as the munge user, who must reach its socket directory
    state = Path(tempfile.mkdtemp(prefix="nmg-slurm."))
    out = subprocess.run(["bash", str(HARNESS), "start", str(state)], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        subprocess.run(["bash", str(HARNESS), "stop", str(state)], timeout=60)
        _skip((out.stderr.strip().splitlines() or ["slurm harness failed"])[-1])
    try:
        yield state / "slurm.conf"
    finally:
        subprocess.run(["bash", str(HARNESS), "stop", str(state)], timeout=60)
        shutil.rmtree(state, ignore_errors=True)


def _wait(predicate, timeout, what, dump):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{dump()}")


# config/debug.py made smaller still, on a demo set of a dozen clips: seconds per run
DEBUG_OVERRIDES = ["--epochs=2", "--updates_per_epoch=5", "--batch_size=4", "--segment_duration=1", "--valid_batches=1",
                   "--generate_count=1", "--generate_duration=0.2"]


def test_debug_grid_on_real_slurm_finishes_and_resumes_after_preemption(slurm_cluster, runs_dir, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster))
    t0 = time.time()
    import demo as demo_lib
    demo = demo_lib.make_demo_set(runs_dir.parent / "demo", seed=0, sizes={"train": 8, "valid": 2, "evaluate": 2,
                                                                            "generate": 1})
    overrides = DEBUG_OVERRIDES + [f"--dataset={demo}"]
    command = [sys.executable, "-m", "grids", "debug", *overrides]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    runs = grids.load("debug", extra=dict(a[2:].split("=", 1) for a in overrides))
    jobs = {r.sig: json.loads((r.dir / "slurm" / "job.json").read_text())["job_id"] for r in runs}
    assert set(re.findall(r"submitted (\w+) as job (\d+)", out.stdout)) == set(jobs.items())
    first, second = runs

    def dump():
        text = []
        for r in runs:
            for f in sorted(r.dir.rglob("*")):
                if f.is_file() and f.suffix in (".log", ".out", ".txt", "") and f.stat().st_size < 100_000:
                    text.append(f"--- {f}\n{f.read_text(errors='replace')}")
        return "\n".join(text[-12:]) + "\n" + subprocess.run(["squeue", "-t", "all"], capture_output=True,
                                                              text=True).stdout

    # preempt the first run as soon as it trains (its handler is installed by then): it checkpoints where it
    # is, exits 75, the wrapper requeues the job and the next attempt resumes from the checkpoint
    _wait(lambda: env.run_status(first.dir)["status"] == "running", 180, "the first run to start training", dump)
    t_signal = time.time()
    assert subprocess.run(["scancel", "--signal=USR1", jobs[first.sig]]).returncode == 0
    final = lambda r: env.run_status(r.dir)["status"] in ("done", "failed")   # noqa: E731
    _wait(lambda: all(final(r) for r in runs), 240, "both runs to finish", dump)
    t_done = time.time()

    for run in runs:
        info = env.run_status(run.dir)
        assert info["status"] == "done" and info["epoch"] == 2, dump()
        assert (run.dir / "checkpoint.pt").is_file() and (run.dir / "log.txt").is_file()
        assert json.loads((run.dir / "config.json").read_text())["signature"] == run.sig
        assert (run.dir / "slurm" / f"{jobs[run.sig]}.out").is_file()
    first_job = jobs[first.sig]
    attempts = sorted(p.name for p in (first.dir / "slurm").glob("*_node*.log"))
    assert attempts == [f"{first_job}_0_node0.log", f"{first_job}_1_node0.log"], dump()
    batch_log = (first.dir / "slurm" / f"{first_job}.out").read_text()
    assert "run status preempted" in batch_log and "requeueing job" in batch_log, \
        "the run finished before the signal reached it: give it more updates per epoch\n" + dump()
    log = (first.dir / "log.txt").read_text()
    assert "SIGUSR1" in log and re.search(r"resumed? from checkpoint", log, re.I), dump()   # train.py's words
    assert [p.name for p in (second.dir / "slurm").glob("*_node*.log")] == [f"{jobs[second.sig]}_0_node0.log"]
    # a finished run is never requeued: both jobs end COMPLETED, the first after one requeue, the second after none
    ended = lambda: not set(grids.job_states(jobs.values()).values()) & (grids.QUEUED | grids.RUNNING)  # noqa: E731
    _wait(ended, 60, "both jobs to end", dump)
    assert set(grids.job_states(jobs.values()).values()) == {"COMPLETED"}, dump()
    assert len(list((first.dir / "slurm").glob("*_node0.log"))) == 2, dump()
    table = subprocess.run([sys.executable, "-m", "grids", "debug", "--dry_run", *overrides], cwd=ROOT,
                           capture_output=True, text=True, timeout=120).stdout
    assert "(status from SLURM and the run directories)" in table and table.count(" done ") == 2, table
    assert "nothing to submit" in table
    print(f"\nreal SLURM: submission to training {t_signal - t0:.1f} s, preemption to both runs done "
          f"{t_done - t_signal:.1f} s, total {time.time() - t0:.1f} s")


def test_wrapper_submitted_by_hand_runs_from_the_submit_directory(slurm_cluster, runs_dir, tmp_path, monkeypatch):
    """sbatch grids/train.sbatch CONFIG --key=value, its resources overridden on the command line."""
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster))
    argv = ["config/debug.py", "--seed=4", "--print_config=True"]   # train.py prints its config and exits 0
    out = subprocess.run(["sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=1", "--mem=1G",
                          f"--output={tmp_path}/hand-%j.out", "grids/train.sbatch", *argv], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    job = out.stdout.strip().split(";")[0]
    _wait(lambda: grids.job_states([job]).get(job) in ("COMPLETED", "FAILED"), 120, "the job",
          lambda: "\n".join(p.read_text() for p in tmp_path.glob("hand-*.out")))
    assert grids.job_states([job])[job] == "COMPLETED"
    run_dir = train.run_dir(train.parse_args(argv[:2]))
    batch_log = (tmp_path / f"hand-{job}.out").read_text()
    assert f"code {ROOT}, run {run_dir}" in batch_log and "exit status 0" in batch_log
    assert f"run dir:   {run_dir}" in (run_dir / "slurm" / f"{job}_0_node0.log").read_text()
