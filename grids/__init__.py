"""Grids: sweeps of training runs, launched on this machine or on SLURM with the same train.py command.

A grid is a Python file grids/<name>.py with an `explore(launcher)` function:

    def explore(launcher):
        launcher.bind_("config/debug.py")            # config files for every run below (then --key=value)
        launcher.slurm_(gpus=0, cpus=1, time=10)      # SLURM resources for every run below
        for lr in (1e-3, 3e-3):
            launcher(lr=lr)                           # one run: train.py config/debug.py --lr=0.001
        wide = launcher.bind(dim=128)                 # a copy with more bound; `launcher` is unchanged
        wide.slurm(cpus=2)(lr=1e-3)                   # slurm() copies too; calling adds the run

    python -m grids debug                 # status table (SLURM, else the run directories)
    python -m grids debug                 # on a SLURM cluster: also submits the runs not queued, running or done
    python -m grids debug --dry_run       # the table and the sbatch scripts, nothing submitted
    python -m grids debug --local         # run them here, one after another (torchrun when gpus > 1)
    python -m grids debug --epochs=1      # --key=value: an override added to every run
    python -m grids debug --cancel        # scancel its jobs; --clear cancels and wipes, then launches afresh
    python -m grids debug --tail SIG      # follow a run's log

Bindings compose: a grid may call another grid's explore with a bound launcher
(`from grids import debug; debug.explore(launcher.bind(seed=1))`).

Submitted jobs run from a snapshot of the code taken at submission (<runs_dir>/code/<hash>/, the files git
knows about, committed or not), so editing the checkout does not change queued runs; grids/train.sbatch
in that snapshot runs the training.

This is the one module besides tests that imports train.py: the launcher must parse configs and compute
signatures exactly as `python train.py ...` will, so it calls train.py's own functions, not a copy of them.
"""
import difflib
import hashlib
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import env
import train
from env import UserError

ROOT = Path(__file__).resolve().parents[1]
WRAPPER = "grids/train.sbatch"

# SLURM resources of a run; a grid changes them with launcher.slurm_(...).
SLURM_DEFAULTS = {
    "gpus": 8,              # in all; 0 for a CPU job. More than gpus_per_node: gpus / gpus_per_node nodes
    "gpus_per_node": 8,
    "cpus_per_gpu": 10,
    "cpus": 0,              # CPUs per node; 0: cpus_per_gpu per GPU (1 for a CPU job)
    "mem_per_gpu": 40,      # GB
    "mem": 0,               # GB per node; 0: mem_per_gpu per GPU (the partition's default for a CPU job)
    "time": 4320,           # minutes; the job checkpoints and requeues itself before the limit
    "partition": None,      # None: the team's partitions (config/teams/*.yaml)
    "exclude": None,        # None: the team's slurm_exclude
    "constraint": "",
    "account": "",
    "qos": "",
    "comment": "",
    "signal_seconds": 120,  # SIGUSR1 this long before the time limit: checkpoint, exit 75, requeue
    "max_requeues": 20,
    "setup": (),            # shell lines run before training, e.g. "module load cuda", "source venv/bin/activate"
}

QUEUED = {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SUSPENDED"}
RUNNING = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING", "RESIZING"}


@dataclass
class Run:
    argv: list          # train.py's arguments: config files, then --key=value
    configs: list
    overrides: dict
    slurm: dict         # resolved: nodes, gpus_per_node, cpus, mem, ...
    sig: str
    dir: Path
    where: str          # file:line of the grid that added it
    epochs: int = 0


def _show(path):
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _caller():
    """file:line of the grid code that called into the launcher, for error messages."""
    frame = sys._getframe(1)
    while frame.f_back and frame.f_code.co_filename == __file__:
        frame = frame.f_back
    return f"{_show(frame.f_code.co_filename)}:{frame.f_lineno}"


def _arg(key, value):
    """An override as train.py's command line spells it, so that it parses back to the same value."""
    if isinstance(value, (list, tuple)):
        value = "[" + ",".join(repr(v) for v in value) + "]"
    elif isinstance(value, (bool, int, float, str, Path)):
        value = str(value) if isinstance(value, (str, Path)) else repr(value)
    else:
        raise UserError(f"{key}={value!r}: a grid value must be a bool, number, string or list")
    return f"--{key}={value}"


class Launcher:
    """Collects a grid's runs. bind_/slurm_ change this launcher, bind/slurm return a changed copy, and
    calling it adds a run with what is bound plus the call's arguments. Copies share the list of runs."""

    def __init__(self, grid="grid", extra=None):
        self.grid = grid
        self.configs = []
        self.overrides = {}
        self.resources = dict(SLURM_DEFAULTS)
        self.extra = dict(extra or {})   # overrides from the command line: applied last, to every run
        self.runs = []

    def copy(self):
        new = Launcher.__new__(Launcher)
        new.__dict__.update(self.__dict__)
        new.configs, new.overrides, new.resources = list(self.configs), dict(self.overrides), dict(self.resources)
        return new

    def bind_(self, *args, **overrides):
        """Config files (paths), '--key=value' strings, dicts and key=value arguments, for every later run."""
        where = _caller()
        for arg in args:
            if isinstance(arg, dict):
                self.overrides.update(arg)
            elif isinstance(arg, str) and arg.startswith("--"):
                key, eq, value = arg[2:].partition("=")
                if not eq:
                    raise UserError(f'{where}: "{arg}" must be --key=value')
                self.overrides[key] = value
            elif isinstance(arg, (str, Path)):
                self.configs.append(str(arg))
            else:
                raise UserError(f"{where}: {arg!r} is neither a config file, a '--key=value' string nor a dict")
        self.overrides.update(overrides)
        return self

    def bind(self, *args, **overrides):
        return self.copy().bind_(*args, **overrides)

    def slurm_(self, **resources):
        where = _caller()
        for key, value in resources.items():
            if key not in SLURM_DEFAULTS:
                match = difflib.get_close_matches(key, SLURM_DEFAULTS, n=1)
                hint = f' (did you mean "{match[0]}"?)' if match else f" (known: {', '.join(SLURM_DEFAULTS)})"
                raise UserError(f'{where}: unknown SLURM setting "{key}"{hint}')
            default = SLURM_DEFAULTS[key]
            ok = (isinstance(value, int) and not isinstance(value, bool) and value >= 0 if isinstance(default, int)
                  else isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
                  if isinstance(default, tuple) else value is None or isinstance(value, str))
            if not ok:
                kind = {int: "a non-negative int", tuple: "a list of shell lines"}.get(type(default), "a string")
                raise UserError(f"{where}: SLURM setting {key}={value!r} must be {kind}")
            self.resources[key] = tuple(value) if isinstance(default, tuple) else value
        return self

    def slurm(self, **resources):
        return self.copy().slurm_(**resources)

    def __call__(self, *args, **overrides):
        where = _caller()
        launcher = self.bind(*args, **overrides)
        self.runs.append(launcher._run(where))

    def _run(self, where):
        overrides = {**self.overrides, **self.extra}
        argv = self.configs + [_arg(k, v) for k, v in overrides.items()]
        # config paths are relative to the project (where jobs start), not to wherever this command runs
        local = [str(ROOT / a) if not a.startswith("--") and not Path(a).is_absolute() else a for a in argv]
        try:
            slurm = resolve_slurm(self.resources)
            cfg = train.parse_args(local)
            train.validate(cfg, world_size=slurm["nodes"] * max(slurm["gpus_per_node"], 1))
        except UserError as e:
            raise UserError(f"{where}: {str(e).removeprefix('command line: ')}") from None
        sig = train.config_signature(cfg)
        return Run(argv=argv, configs=list(self.configs), overrides=overrides, slurm=slurm, sig=sig,
                   dir=train.run_dir(cfg, sig), where=where, epochs=cfg.epochs)


def resolve_slurm(resources):
    """A grid's SLURM settings -> what one job asks for: nodes, GPUs and CPUs per node, memory, time."""
    r = dict(resources)
    gpus, per_node = r["gpus"], r["gpus_per_node"] or 1
    if gpus > per_node and gpus % per_node:
        raise UserError(f"gpus={gpus} spans nodes but is not a multiple of gpus_per_node={per_node}")
    r["nodes"], r["gpus_per_node"] = (gpus // per_node, per_node) if gpus > per_node else (1, gpus)
    r["cpus"] = r["cpus"] or max(1, r["gpus_per_node"] * r["cpus_per_gpu"])
    r["mem"] = r["mem"] or r["gpus_per_node"] * r["mem_per_gpu"]
    if r["partition"] is None:   # the team's and the global partition, often the same one
        r["partition"] = ",".join(dict.fromkeys(p for p in env.slurm_partitions().split(",") if p))
    if r["exclude"] is None:
        r["exclude"] = env.get_env().slurm_exclude
    if r["time"] <= 0 or r["signal_seconds"] >= r["time"] * 60:
        raise UserError(f"signal_seconds={r['signal_seconds']} must be shorter than time={r['time']} minutes")
    return r


# ----------------------------------------------------------------------------------------------------------
# Loading a grid file

def grid_path(name):
    path = Path(name) if name.endswith(".py") or "/" in name else ROOT / "grids" / f"{name}.py"
    if not path.is_file() or path.name.startswith("__"):
        known = sorted(p.stem for p in (ROOT / "grids").glob("*.py") if not p.name.startswith("_"))
        raise UserError(f"no grid {name!r} ({path} not found); grids: {', '.join(known)}")
    return path


def load(name, extra=None):
    """Run a grid file's explore(launcher) -> its runs, one per signature, in the order they were added."""
    path = grid_path(name)
    inside = path.resolve().parent == ROOT / "grids"
    spec = importlib.util.spec_from_file_location(f"grids.{path.stem}" if inside else f"_grid_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    launcher = Launcher(path.stem, extra)
    try:
        spec.loader.exec_module(module)
        explore = getattr(module, "explore", None)
        if not callable(explore):
            raise UserError(f"{_show(path)}: no explore(launcher) function; define one calling launcher(...) per run")
        explore(launcher)
    except UserError:
        raise
    except SyntaxError as e:
        raise UserError(f"{_show(path)}:{e.lineno}: SyntaxError: {e.msg}") from None
    except Exception as e:
        # point at the grid's own line, not at the launcher's insides
        frames = [f for f in traceback.extract_tb(e.__traceback__) if Path(f.filename).resolve() == path.resolve()]
        where = f"{_show(path)}:{frames[-1].lineno}" if frames else _show(path)
        raise UserError(f"{where}: {type(e).__name__}: {e}") from None
    if not launcher.runs:
        raise UserError(f"{_show(path)}: explore() added no runs; call launcher(...) once per run")
    runs, seen = [], {}
    for run in launcher.runs:
        if run.sig in seen:
            print(f"warning: {run.where}: same experiment as {seen[run.sig]} (signature {run.sig}): "
                  "listed once", file=sys.stderr)
            continue
        seen[run.sig] = run.where
        runs.append(run)
    return runs


# ----------------------------------------------------------------------------------------------------------
# Status: SLURM's word for queued and running jobs, the run directory's for the rest

def _slurm(*cmd, timeout=60):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


_available = None


def slurm_available():
    """sbatch is here and its controller answers."""
    global _available
    if _available is None:
        try:
            _available = bool(shutil.which("sbatch")) and _slurm("sinfo", "-h", "-o", "%P", timeout=30).returncode == 0
        except (OSError, subprocess.SubprocessError):
            _available = False
    return _available


def job_states(job_ids):
    """{job id: SLURM state} from squeue (recent jobs, any state), then sacct where accounting is on."""
    ids = sorted({str(j) for j in job_ids if j})
    if not ids or not slurm_available():
        return {}
    states = {}
    out = _slurm("squeue", "-h", "-t", "all", "-o", "%i|%T", "-j", ",".join(ids))
    for line in out.stdout.splitlines():
        job, _, state = line.partition("|")
        states[job] = state.strip()
    missing = [j for j in ids if j not in states]
    if missing and shutil.which("sacct"):
        out = _slurm("sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(missing))
        if out.returncode == 0:
            for line in out.stdout.splitlines():
                job, _, state = line.partition("|")
                states.setdefault(job, state.split()[0] if state.split() else "")
    return states


def read_job(run):
    path = run.dir / "slurm" / "job.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def status(runs):
    """One row per run: env.run_status's fields, the status corrected by SLURM, and the job id."""
    jobs = {run.sig: read_job(run) for run in runs}
    states = job_states(j["job_id"] for j in jobs.values() if j)
    rows = []
    for run in runs:
        info = env.run_status(run.dir)
        job = jobs[run.sig]
        state = states.get(str(job["job_id"])) if job else None
        if state in QUEUED:
            info["status"] = "queued"
        elif state in RUNNING:
            info["status"] = "running"
        elif job and slurm_available() and info["status"] in ("running", "killed", "not started"):
            # the job ended (or SLURM forgot it) without the training saying how: killed, out of memory,
            # bad input, node failure
            info["status"] = "preempted" if state == "PREEMPTED" else "failed"
        info["job"] = job["job_id"] if job else ""
        rows.append(info)
    return rows


def _fmt(value):
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def table(name, runs, rows):
    """The grid's status as text: what all runs share on one line, then a row per run with what differs."""
    args = [run.configs + [a[2:] for a in run.argv if a.startswith("--")] for run in runs]
    common = [a for a in args[0] if all(a in other for other in args)]
    head = ["sig", "overrides", "status", "epoch", "train ce", "valid ce", "best ce"]
    with_jobs = any(row["job"] for row in rows)
    body = []
    for run, own, row in zip(runs, args, rows):
        line = [run.sig, " ".join(a for a in own if a not in common) or "-", row["status"],
                f"{row['epoch']}/{run.epochs}", _fmt(row["train_ce"]), _fmt(row["valid_ce"]), _fmt(row["best_ce"])]
        body.append(line + ([str(row["job"] or "-")] if with_jobs else []))
    head += ["job"] if with_jobs else []
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    lines = [f"grid {name}: {len(runs)} run(s) of {' '.join(common) or '(defaults)'}"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head] + body]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Code snapshots and sbatch scripts

def code_files():
    """The project's files as git sees them (committed, changed or new, not ignored); else every file."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
        names = [n for n in out.stdout.split("\0") if n] if out.returncode == 0 else []
    except (OSError, subprocess.SubprocessError):
        names = []
    if not names:   # not a git checkout: everything but runs, references and caches
        skip = {".git", "runs", "reference", "__pycache__", ".pytest_cache"}
        names = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
                 if p.is_file() and not skip & set(p.relative_to(ROOT).parts)]
    return sorted(n for n in names if (ROOT / n).is_file())


def snapshot_id(files):
    digest = hashlib.sha1()
    for name in files:
        digest.update(name.encode() + b"\0" + hashlib.sha1((ROOT / name).read_bytes()).digest())
    return digest.hexdigest()[:12]


def snapshot_dir(snap_id):
    return env.get_env().runs_dir / "code" / snap_id


def make_snapshot():
    """Copy the code into <runs_dir>/code/<hash of its files>/ (once per distinct content) -> that directory."""
    files = code_files()
    target = snapshot_dir(snapshot_id(files))
    if target.is_dir():
        return target
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    for name in files:
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, tmp / name)
    commit, dirty = env.git_commit()
    (tmp / "GIT_COMMIT").write_text(json.dumps({"git_commit": commit, "git_dirty": dirty}) + "\n")
    try:
        tmp.rename(target)
    except OSError:   # another launcher made the same snapshot meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def sbatch_directives(name, run):
    s = run.slurm
    out = [f"--job-name={name}_{run.sig}", f"--nodes={s['nodes']}", "--ntasks-per-node=1",
           f"--cpus-per-task={s['cpus']}"]
    if s["gpus_per_node"]:
        out.append(f"--gpus-per-node={s['gpus_per_node']}")
    if s["mem"]:
        out.append(f"--mem={s['mem']}G")
    out.append(f"--time={s['time']}")
    for key in ("partition", "exclude", "constraint", "account", "qos", "comment"):
        if s[key]:
            out.append(f"--{key}={s[key]}")
    out += ["--requeue", f"--signal=USR1@{s['signal_seconds']}", "--open-mode=append",
            f"--output={run.dir / 'slurm' / '%j.out'}"]
    return out


def sbatch_script(name, run, code):
    """The script a run is submitted with: its directives, then the wrapper from the code snapshot."""
    s, e = run.slurm, env.get_env()
    lines = ["#!/bin/bash"] + [f"#SBATCH {d}" for d in sbatch_directives(name, run)]
    lines += [f"# grid {name}, run {run.sig} ({run.where}); code snapshot {code}",
              # the launcher's directories, not ones resolved again inside the snapshot or on another cluster
              f"export AUDIOCRAFT_DORA_DIR={shlex.quote(str(e.runs_dir))}",
              f"export AUDIOCRAFT_REFERENCE_DIR={shlex.quote(str(e.reference_dir))}",
              f"export TRAIN_PYTHON={shlex.quote(sys.executable)}",
              f"export TRAIN_RUN_DIR={shlex.quote(str(run.dir))}",
              f"export MAX_REQUEUES={s['max_requeues']}",
              # git inside the snapshot must not find the checkout's .git above it (GIT_COMMIT says which)
              f"export GIT_CEILING_DIRECTORIES={shlex.quote(str(Path(code).parent))}"]
    lines += list(s["setup"])
    lines.append(f"exec bash {shlex.quote(str(Path(code) / WRAPPER))} {shlex.join(run.argv)}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------
# Actions

def submit(name, runs, rows, dry_run=False):
    """sbatch each run that is not queued, running or done; returns {sig: job id}."""
    todo = [(run, row) for run, row in zip(runs, rows) if row["status"] not in ("queued", "running", "done")]
    if not todo:
        print("nothing to submit: every run is queued, running or done")
        return {}
    code = snapshot_dir(snapshot_id(code_files())) if dry_run else make_snapshot()
    commit, dirty = env.git_commit()
    submitted = {}
    for run, row in todo:
        script = sbatch_script(name, run, code)
        if dry_run:
            print(f"\n# {run.dir / 'slurm' / 'train.sbatch'} (would submit)\n{script}", end="")
            continue
        (run.dir / "slurm").mkdir(parents=True, exist_ok=True)
        path = run.dir / "slurm" / "train.sbatch"
        path.write_text(script)
        out = _slurm("sbatch", "--parsable", str(path))
        if out.returncode != 0:
            raise UserError(f"sbatch {path} failed: {out.stderr.strip() or out.stdout.strip()}")
        job_id = out.stdout.strip().split(";")[0]
        (run.dir / "slurm" / "job.json").write_text(json.dumps(
            {"job_id": job_id, "grid": name, "argv": run.argv, "code": str(code), "git_commit": commit,
             "git_dirty": dirty, "submitted": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=1) + "\n")
        print(f"submitted {run.sig} as job {job_id} ({row['status']} before)")
        submitted[run.sig] = job_id
    return submitted


def local_processes(run):
    """How many processes a local launch uses: the grid's GPUs per node, as far as this machine has them."""
    if run.slurm["gpus"] <= 1:
        return 1
    import torch   # only here: the table and submission need no torch
    return max(1, min(run.slurm["gpus"], torch.cuda.device_count()))


def run_local(runs, rows, dry_run=False):
    """Train each run that is not done, here, one after another; returns the number that failed."""
    failed = 0
    for run, row in zip(runs, rows):
        if row["status"] == "done":
            print(f"{run.sig}: done, skipped")
            continue
        if row["status"] in ("queued", "running") and row["job"]:
            print(f"{run.sig}: {row['status']} on SLURM as job {row['job']}, skipped")
            continue
        nproc = local_processes(run)
        cmd = [sys.executable, "train.py", *run.argv] if nproc == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py",
             *run.argv]
        print(f"=== {run.sig}: {shlex.join(cmd[1:] if nproc == 1 else ['torchrun', *cmd[3:]])}", flush=True)
        if dry_run:
            continue
        proc = subprocess.Popen(cmd, cwd=ROOT)
        try:
            rc = proc.wait()
        except KeyboardInterrupt:   # the training got the same Ctrl-C: let it checkpoint, then stop the grid
            rc = proc.wait()
            print(f"{run.sig}: interrupted (exit status {rc}); the remaining runs were not started")
            return failed + 1
        if rc == 2:
            raise UserError(f"{run.sig}: train.py rejected its input (exit status 2); see above")
        if rc != 0:
            failed += 1
            print(f"{run.sig}: failed with exit status {rc}")
    return failed


def cancel(runs, rows):
    ids = [str(row["job"]) for row in rows if row["job"] and row["status"] in ("queued", "running")]
    if ids:
        out = _slurm("scancel", *ids)
        if out.returncode != 0:
            raise UserError(f"scancel {' '.join(ids)} failed: {out.stderr.strip()}")
        print(f"cancelled job(s) {', '.join(ids)}")
    return ids


def clear(runs, rows):
    """Cancel the runs' jobs and delete their directories."""
    cancel(runs, rows)
    for run in runs:
        if run.dir.exists():
            shutil.rmtree(run.dir)
            print(f"wiped {run.dir}")


def log_file(run_dir):
    """The log to follow: the newest attempt's node-0 log (all of its output) when SLURM ran it, else log.txt."""
    run_dir = Path(run_dir)
    attempts = sorted((run_dir / "slurm").glob("*_node0.log"), key=lambda f: f.stat().st_mtime)
    if attempts:
        return attempts[-1]
    return run_dir / "log.txt" if (run_dir / "log.txt").is_file() else None


def tail(run_dir, follow=True, poll=0.5, still_going=lambda: False):
    """Print a run's log, then what gets appended to it (or to a requeued attempt's log) while the run goes on."""
    current, handle = None, None
    while True:
        path = log_file(run_dir)
        if path and path != current:
            current = path
            if handle:
                handle.close()
            handle = open(current, errors="replace")
            print(f"==> {current} <==", flush=True)
        text = handle.read() if handle else ""
        print(text, end="", flush=True)
        if not follow or (not text and not still_going()):
            break
        time.sleep(poll)
    if handle is None:
        print(f"no log yet in {run_dir}")
    else:
        handle.close()
