"""Environment resolution under faked variables: clusters, team files, overrides, //reference and mappers."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import env
from env import UserError

ROOT = Path(__file__).resolve().parents[1]

AUDIOCRAFT_TEAM_FILE = """
default:
  dora_dir: /tmp/audiocraft_${oc.env:USER}
  partitions:
    global: debug
    team: debug
  reference_dir: /tmp
slurm:
  dora_dir: /checkpoint/$USER/experiments
  partitions:
    global: learnlab
    team: audio
  reference_dir: /large/reference
  slurm_exclude: node[1-3]
  dataset_mappers:
    "^/checkpoint/[a-z]+": "/fsx/data"
    "/fsx/data/old": "/fsx/data/new"
darwin:
  dora_dir: ~/runs
  reference_dir: ~/reference
"""


@pytest.fixture
def team_file(tmp_path, monkeypatch):
    path = tmp_path / "labs.yaml"
    path.write_text(AUDIOCRAFT_TEAM_FILE)
    monkeypatch.setenv("AUDIOCRAFT_CONFIG", str(path))
    monkeypatch.setenv("USER", "ada")
    return path


def test_default_team_works_out_of_the_box():
    e = env.get_env()
    assert e.team == "default" and e.config_file == ROOT / "config/teams/default.yaml"
    assert e.runs_dir == ROOT / "runs" and e.reference_dir == ROOT / "reference"


def test_environment_is_cached_until_reset(monkeypatch, tmp_path):
    first = env.get_env()
    monkeypatch.setenv("AUDIOCRAFT_DORA_DIR", str(tmp_path))
    assert env.get_env() is first and env.get_env().runs_dir != tmp_path
    env.reset()
    assert env.get_env().runs_dir == tmp_path


def test_audiocraft_team_file_loads_unchanged_and_expands_variables(team_file):
    e = env.get_env()
    assert e.cluster == "default" and e.runs_dir == Path("/tmp/audiocraft_ada") and e.reference_dir == Path("/tmp")


def test_slurm_job_is_detected_and_selects_its_section(team_file, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    e = env.get_env()
    assert e.cluster == "slurm" and e.runs_dir == Path("/checkpoint/ada/experiments")
    assert env.slurm_partitions() == "audio,learnlab" and e.slurm_exclude == "node[1-3]"


def test_macos_is_detected(team_file, monkeypatch):
    monkeypatch.setattr(env.platform, "system", lambda: "Darwin")
    e = env.get_env()
    assert e.cluster == "darwin" and e.runs_dir == Path.home() / "runs"


def test_aws_is_detected(monkeypatch):
    monkeypatch.setattr(env.platform, "release", lambda: "5.10.0-1-aws")
    assert env.detect_cluster() == "aws"


def test_every_override_variable_wins(team_file, monkeypatch, tmp_path):
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    monkeypatch.setenv("AUDIOCRAFT_CLUSTER", "darwin")
    monkeypatch.setenv("AUDIOCRAFT_DORA_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("AUDIOCRAFT_REFERENCE_DIR", str(tmp_path / "ref"))
    e = env.get_env()
    assert (e.cluster, e.runs_dir, e.reference_dir) == ("darwin", tmp_path / "runs", tmp_path / "ref")


def test_team_selects_its_file(monkeypatch):
    monkeypatch.setenv("AUDIOCRAFT_TEAM", "nosuchteam")
    with pytest.raises(UserError, match=r"team file .*nosuchteam.yaml not found \(AUDIOCRAFT_TEAM='nosuchteam'"):
        env.get_env()


def test_broken_team_files_are_clear_errors(tmp_path, monkeypatch):
    bad = tmp_path / "bad.yaml"
    monkeypatch.setenv("AUDIOCRAFT_CONFIG", str(bad))
    bad.write_text("default: [unclosed\n")
    with pytest.raises(UserError, match=r"bad.yaml: not valid YAML"):
        env.get_env()
    env.reset()
    bad.write_text("default:\n  dataset_mappers:\n    '([': x\n")
    with pytest.raises(UserError, match=r"dataset mapper '\(\[' is not a valid regex"):
        env.get_env()


def test_reference_paths_resolve_and_missing_ones_name_both(tmp_path, monkeypatch):
    (tmp_path / "t5-base").mkdir()
    monkeypatch.setenv("AUDIOCRAFT_REFERENCE_DIR", str(tmp_path))
    assert env.resolve_path("//reference/t5-base") == tmp_path / "t5-base"
    assert env.resolve_path("/abs/path") == Path("/abs/path")
    with pytest.raises(UserError) as e:
        env.resolve_path("//reference/encodec_32khz")
    assert "//reference/encodec_32khz" in str(e.value) and str(tmp_path / "encodec_32khz") in str(e.value)
    env.reset()
    monkeypatch.setenv("AUDIOCRAFT_REFERENCE_DIR", str(tmp_path / "gone"))
    with pytest.raises(UserError, match=r"reference directory .*gone does not exist"):
        env.resolve_path("//reference/t5-base")


def test_dataset_mappers_apply_in_order(team_file, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    assert env.map_dataset_path("/checkpoint/ada/old/a.wav") == "/fsx/data/new/a.wav"
    assert env.map_dataset_path("/elsewhere/a.wav") == "/elsewhere/a.wav"


def test_run_status_reads_history(tmp_path):
    d = tmp_path / "xps" / "abcd1234"
    assert env.run_status(d)["status"] == "not started"
    d.mkdir(parents=True)
    rows = [{"epoch": 1, "stage": "train", "ce": 5.0}, {"epoch": 1, "stage": "valid", "ce": 4.0},
            {"epoch": 2, "stage": "train", "ce": 4.5}, {"epoch": 2, "stage": "valid", "ce": 4.2}]
    (d / "history.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{\"cut")
    s = env.run_status(d)
    assert (s["status"], s["epoch"], s["train_ce"], s["valid_ce"], s["best_ce"]) == ("running", 2, 4.5, 4.2, 4.0)
    (d / "status").write_text("done\n")
    assert env.run_status(d)["status"] == "done"


def test_run_status_tells_a_killed_run_from_a_running_one(tmp_path):
    """train.py writes `running PID HOST`; a process gone from this host means nobody wrote the final status."""
    import socket
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / "status").write_text(f"running\n{gone.pid} {socket.gethostname()}\n")
    assert env.run_status(tmp_path)["status"] == "killed"
    (tmp_path / "status").write_text(f"running\n{os.getpid()} {socket.gethostname()}\n")
    assert env.run_status(tmp_path)["status"] == "running"
    (tmp_path / "status").write_text(f"running\n{gone.pid} another-host\n")  # cannot tell from here
    assert env.run_status(tmp_path)["status"] == "running"


def test_env_command_prints_environment_and_run_info(tmp_path):
    runs = tmp_path / "runs"
    (runs / "xps" / "abcd1234").mkdir(parents=True)
    (runs / "xps" / "abcd1234" / "config.json").write_text('{"lr": 0.001}')
    e = dict(__import__("os").environ, AUDIOCRAFT_DORA_DIR=str(runs))
    out = subprocess.run([sys.executable, "env.py"], cwd=ROOT, env=e, capture_output=True, text=True)
    assert out.returncode == 0 and f"runs dir    {runs}" in out.stdout
    out = subprocess.run([sys.executable, "env.py", "info", "abcd1234"], cwd=ROOT, env=e, capture_output=True, text=True)
    assert out.returncode == 0 and '"lr": 0.001' in out.stdout and '"status": "not started"' in out.stdout
    out = subprocess.run([sys.executable, "env.py", "info", "nope"], cwd=ROOT, env=e, capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.startswith("error: no run 'nope'")


def test_git_commit_of_a_code_snapshot_comes_from_its_stamp(tmp_path, monkeypatch):
    (tmp_path / "GIT_COMMIT").write_text('{"git_commit": "abc123", "git_dirty": true}\n')
    monkeypatch.setattr(env, "ROOT", tmp_path)
    assert env.git_commit() == ("abc123", True)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_keeps_a_freed_block_mapped():
    """After the call a freed 16 MB block stays in the heap: allocating it again faults no new pages (glibc's
    default serves it by mmap and hands it back on free: 4096 page faults every time)."""
    import ctypes
    import resource
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]

    def touch_and_free(n=16 << 20):
        block = libc.malloc(n)
        ctypes.memset(block, 1, n)
        libc.free(block)
    assert env.keep_freed_memory()
    touch_and_free()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    touch_and_free()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 1000


@pytest.mark.parametrize("entry", [["train.py"], ["generate.py"], ["bench.py"], ["env.py"], ["text.py"],
                                   ["model.py"], ["formats.py"], ["data.py"], ["data.py", "tokenize"],
                                   ["data.py", "tokenizer"], ["-m", "grids"]])
def test_every_entry_point_answers_help(entry):
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, *entry, "--help"], cwd=root, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(root)))
    assert r.returncode == 0 and len(r.stdout.splitlines()) >= 3 and not r.stderr.strip(), r.stderr
    assert "usage" in r.stdout.lower() or "python " in r.stdout


def test_read_weights_reads_only_the_shards_it_needs(tmp_path):
    import torch
    from safetensors.torch import save_file
    save_file({"a.weight": torch.ones(2), "b.weight": torch.zeros(3)}, tmp_path / "model-1.safetensors")
    (tmp_path / "model-2.safetensors").write_bytes(b"\0" * 64)            # a broken shard
    index = {"weight_map": {"a.weight": "model-1.safetensors", "b.weight": "model-1.safetensors",
                            "c.weight": "model-2.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    got = env.read_weights(tmp_path, ["a.weight", "missing"])
    assert list(got) == ["a.weight"] and torch.equal(got["a.weight"], torch.ones(2))   # the broken shard unread
    assert list(env.read_weights(tmp_path, lambda name: name.startswith("b."))) == ["b.weight"]
    with pytest.raises(UserError, match="model-2.safetensors: not a readable safetensors file"):
        env.read_weights(tmp_path, ["c.weight"])
    (tmp_path / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(UserError, match="not a weights index"):
        env.read_weights(tmp_path, ["a.weight"])
    with pytest.raises(UserError, match=r"T5 directory .*: no weights \(expected one of model.safetensors.index.json"):
        env.read_weights(tmp_path / "nothing", ["a.weight"], "T5 directory")


def test_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "history.jsonl"
    env.write_atomic(path, lambda f: f.write(b"old\n"))

    def fail(f):
        f.write(b"half")
        raise OSError(27, "File too large")
    with pytest.raises(UserError, match=f"could not write {path}: File too large"):
        env.write_atomic(path, fail)
    assert path.read_bytes() == b"old\n" and [p.name for p in tmp_path.iterdir()] == ["history.jsonl"]


# ---- the shared --key=value parser

def test_parse_options_types_defaults_and_positionals():
    schema = {"duration": 10.0, "seed": (int, None), "compile": False, "delays": (), "out": "out.wav"}
    args, o = env.parse_options(["export", "--seed=7", "--compile", "--delays=0,1", "RUN"], schema, positionals=(2, 2))
    assert args == ["export", "RUN"] and o == {"duration": 10.0, "seed": 7, "compile": True, "delays": (0, 1),
                                                 "out": "out.wav"}
    assert env.parse_options(["--seed=none", "--duration=3"], schema)[1]["seed"] is None


@pytest.mark.parametrize("argv,message", [
    (["--sede=3"], 'command line: unknown key "sede" (did you mean "seed"?)'),
    (["--seed=1.5"], "command line: seed='1.5' is not an int"),
    (["--seed=1e999"], "command line: seed='1e999' is not an int"),
    (["--duration=fast"], "command line: duration='fast' is not a float"),
    (["--duration"], 'command line: "--duration" must be --key=value'),
    (["x"], "command line: unexpected arguments (got x); usage: python x.py"),
])
def test_parse_options_errors_are_one_line_naming_the_key(argv, message):
    with pytest.raises(UserError) as e:
        env.parse_options(argv, {"duration": 10.0, "seed": (int, None)}, usage="python x.py")
    assert str(e.value) == message


# ---- stop signals

def test_first_signal_is_recorded_and_a_second_ctrl_c_interrupts():
    import signal
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        env.install_stop_handlers()
        assert env.stop_requested() is None
        env.check_stop()                      # nothing to stop for: no exception
        os.kill(os.getpid(), signal.SIGUSR1)
        assert env.stop_requested() == "SIGUSR1"
        with pytest.raises(env.Stopped, match="SIGUSR1"):
            env.check_stop()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # a second signal, Ctrl-C: interrupt now
    finally:
        env.reset_stop()
        for s, h in saved.items():
            signal.signal(s, h)


# ---- the run directory's lock

def test_run_lock_refuses_a_live_holder_and_names_it(tmp_path):
    with env.RunLock(tmp_path):
        with pytest.raises(UserError, match=rf"{tmp_path} is in use by process {os.getpid()} on "):
            env.RunLock(tmp_path).acquire()
    assert not (tmp_path / "lock").exists()   # released
    env.RunLock(tmp_path).acquire().release()


def test_run_lock_is_taken_over_from_a_killed_process(tmp_path):
    code = ("import sys, time, env; env.RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=f"in use by process {p.pid}"):
            env.RunLock(tmp_path).acquire()
    finally:
        p.kill()
        p.wait()
    lock = env.RunLock(tmp_path).acquire()      # kill -9 left the file; its PID is gone: stale, taken over
    assert (tmp_path / "lock").read_text().split()[0] == str(os.getpid())
    lock.release()


def test_run_lock_of_another_host_is_stale_only_when_untouched(tmp_path):
    lock = tmp_path / "lock"
    lock.write_text("4242 some-other-node 1700000000\n")
    with pytest.raises(UserError, match="in use by process 4242 on some-other-node"):
        env.RunLock(tmp_path).acquire()           # fresh: its holder may be alive on that node
    old = os.stat(lock).st_mtime - env.LOCK_STALE - 1
    os.utime(lock, (old, old))
    env.RunLock(tmp_path).acquire().release()     # untouched for longer than LOCK_STALE: taken over
