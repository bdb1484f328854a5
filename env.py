"""The environment a run lives in: team, cluster, paths, and the run directory.

Resolved once per process from environment variables and the team's YAML file (AudioCraft's format, so
AudioCraft users' team files load unchanged), cached, and `reset()` for tests.

    python env.py              # print the resolved environment
    python env.py info SIG     # print a run's config and status

Variables (AudioCraft's names): AUDIOCRAFT_TEAM (default "default"), AUDIOCRAFT_CLUSTER (else detected:
slurm, darwin, aws, default), AUDIOCRAFT_CONFIG (team file, else config/teams/<team>.yaml),
AUDIOCRAFT_DORA_DIR (runs directory), AUDIOCRAFT_REFERENCE_DIR (what //reference/ points to).
"""
import hashlib
import json
import os
import platform
import re
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent
REFERENCE = "//reference"


class UserError(Exception):
    """Bad input from the user: entry points print it as one line and exit with status 2."""


def write_atomic(path, write, advice=""):
    """write(f) into a temporary file beside path (named for this process, so concurrent writers never share one),
    fsync, rename, fsync the directory: a crash leaves the old file or the new one, never half of one. A failed
    write removes its temporary file and raises one UserError line naming the path and the cause, then `advice`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException as e:
        try:
            tmp.unlink(missing_ok=True)  # never leave half a file behind
        except OSError:
            pass
        # torch.save reports a failed write (disk full, EIO, EFBIG) as a RuntimeError whose context is the OSError
        cause = e if isinstance(e, OSError) else e.__context__
        if not isinstance(cause, OSError):
            raise
        raise UserError(f"could not write {path}: {cause.strerror or cause}{advice}") from None


def remove_stale_temporaries(directory):
    """A process killed mid-write leaves write_atomic's temporary file (.NAME.tmpPID) behind; call at start."""
    for tmp in Path(directory).glob(".*.tmp*"):
        tmp.unlink(missing_ok=True)


def load_tensors(path, mmap=False, map_location="cpu", hint="", expected=""):
    """torch.load of tensors and plain containers only (weights_only: a pickled object is refused, never run); a
    failure is one UserError line (load_error). mmap=True maps the file, or reads it whole when it predates torch's
    zip format. torch is imported here, so that env.py itself stays quick to import."""
    import torch
    try:
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except RuntimeError:
            if not mmap:
                raise
            return torch.load(path, map_location=map_location, weights_only=True)  # not a zip file: no mapping
    except Exception as e:
        raise UserError(load_error(path, e, hint, expected)) from None


def load_error(path, e, hint="", expected=""):
    """One line for a failed torch.load(path, weights_only=True). A refused pickle names the object it refused (and
    gets `hint`, e.g. how to trust the file); an unreadable file gets `expected` (what the file should have been).
    torch's own message runs over many lines with terminal colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if refused:
        return (f"{path}: refused: it pickles Python objects ({refused.group(1)}), which could run code when loaded; "
                f"only tensors and plain containers are read (nothing was run){hint}")
    detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)  # garbage trips the restricted unpickler too
    first = (detail.group(1) if detail else (text.strip().splitlines() or [""])[0]).split(". ")[0][:200]
    return (f"{path}: not a readable checkpoint ({type(e).__name__}{': ' + first if first else ''}): truncated, "
            f"corrupt or another format{expected}")


@dataclass
class Environment:
    team: str
    cluster: str
    config_file: Path
    runs_dir: Path
    reference_dir: Path
    partitions: dict = field(default_factory=dict)   # {"global": ..., "team": ...}
    slurm_exclude: str = ""
    dataset_mappers: list = field(default_factory=list)  # [(compiled regex, replacement)], applied in order


_env = None


def reset():
    """Forget the cached environment (tests change variables and call this)."""
    global _env
    _env = None


def detect_cluster(environ=os.environ):
    """AudioCraft's cluster names where they apply; a SLURM job wins since it decides how we launch."""
    if environ.get("AUDIOCRAFT_CLUSTER"):
        return environ["AUDIOCRAFT_CLUSTER"]
    if environ.get("SLURM_JOB_ID"):
        return "slurm"
    if platform.system() == "Darwin":
        return "darwin"
    if platform.release().endswith("-aws") or ".ec2" in socket.getfqdn():
        return "aws"
    return "default"


def _expand(value):
    """Team files may say $USER or ${oc.env:USER} (AudioCraft's OmegaConf spelling)."""
    if not isinstance(value, str):
        return value
    value = re.sub(r"\$\{oc\.env:(\w+)\}", r"${\1}", value)
    return os.path.expandvars(os.path.expanduser(value))


def get_env():
    global _env
    if _env is None:
        _env = _load_env()
    return _env


def _load_env():
    team = os.environ.get("AUDIOCRAFT_TEAM", "default")
    cluster = detect_cluster()
    config_file = Path(os.environ.get("AUDIOCRAFT_CONFIG") or ROOT / "config" / "teams" / f"{team}.yaml")
    if not config_file.is_file():
        raise UserError(f"team file {config_file} not found (AUDIOCRAFT_TEAM={team!r}, AUDIOCRAFT_CONFIG="
                        f"{os.environ.get('AUDIOCRAFT_CONFIG', '')!r}): create it or pick another team")
    try:
        teams = yaml.safe_load(config_file.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{config_file}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(teams, dict):
        raise UserError(f"{config_file}: expected a mapping of cluster name to settings")
    # A cluster the team file does not know falls back to its `default` section, then to nothing.
    section = teams.get(cluster) or teams.get("default") or {}
    if not isinstance(section, dict):
        raise UserError(f"{config_file}: section {cluster!r} must be a mapping")
    runs = os.environ.get("AUDIOCRAFT_DORA_DIR") or _expand(section.get("dora_dir")) or "runs"
    reference = os.environ.get("AUDIOCRAFT_REFERENCE_DIR") or _expand(section.get("reference_dir")) or "reference"
    mappers = []
    for pattern, repl in (section.get("dataset_mappers") or {}).items():
        try:
            mappers.append((re.compile(pattern), repl))
        except re.error as e:
            raise UserError(f"{config_file}: dataset mapper {pattern!r} is not a valid regex ({e})") from None
    partitions = section.get("partitions") or {}
    if not isinstance(partitions, dict):
        raise UserError(f"{config_file}: `partitions` in section {cluster!r} must be a mapping (global, team)")
    return Environment(
        team=team, cluster=cluster, config_file=config_file,
        runs_dir=_absolute(runs), reference_dir=_absolute(reference),
        partitions=partitions, slurm_exclude=section.get("slurm_exclude") or "", dataset_mappers=mappers)


def _absolute(path):
    """Relative paths in team files are relative to the project, not to wherever the command ran."""
    path = Path(_expand(str(path)))
    return path if path.is_absolute() else ROOT / path


def slurm_partitions(kinds=("team", "global")):
    parts = get_env().partitions
    return ",".join(str(parts[k]) for k in kinds if parts.get(k))


def resolve_path(path):
    """`//reference/x` -> <reference_dir>/x, `~` expanded. Missing reference files are an error naming both."""
    text = str(path)
    if not text.startswith(REFERENCE):
        return Path(os.path.expanduser(text))
    ref = get_env().reference_dir
    rest = text[len(REFERENCE):].lstrip("/")
    if not ref.is_dir():
        raise UserError(f"{text}: reference directory {ref} does not exist (set AUDIOCRAFT_REFERENCE_DIR "
                        f"or reference_dir in {get_env().config_file})")
    resolved = ref / rest
    if not resolved.exists():
        raise UserError(f"{text}: resolved to {resolved}, which does not exist")
    return resolved


def map_dataset_path(path):
    """Apply the team's dataset mappers, in order, to a path read from a manifest."""
    path = str(path)
    for pattern, repl in get_env().dataset_mappers:
        path = pattern.sub(repl, path)
    return path


# ----------------------------------------------------------------------------------------------------------
# Signature and run directory

def signature(delta):
    """8 hex characters naming an experiment: a hash of its (key, value) differences from the defaults.

    `delta` is a dict of key -> JSON-able value. Sorted, compact JSON makes it independent of the order in
    which overrides were given, of the process and of the Python version (floats print as shortest repr)."""
    text = json.dumps(sorted(delta.items()), separators=(",", ":"), sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def run_dir(sig, runs_dir=None):
    return Path(runs_dir or get_env().runs_dir) / "xps" / sig


def git_commit():
    """(commit, dirty) of the code being run, or (None, None) outside a git checkout. A code snapshot made by
    grids at submission has no .git: it carries a GIT_COMMIT file ({"git_commit", "git_dirty"}) instead."""
    import subprocess
    stamp = ROOT / "GIT_COMMIT"
    if stamp.is_file():
        try:
            info = json.loads(stamp.read_text())
            return info.get("git_commit"), info.get("git_dirty")
        except (json.JSONDecodeError, AttributeError):
            pass  # not ours: ask git
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None, None
    return (commit or None), (bool(status) if commit else None)


def run_status(path):
    """What a run directory says about its run: status, epoch, last train/valid ce, best valid ce."""
    path = Path(path)
    info = {"status": "not started", "epoch": 0, "train_ce": None, "valid_ce": None, "best_ce": None}
    if not path.is_dir():
        return info
    history = []
    hist_file = path / "history.jsonl"
    if hist_file.is_file():
        for line in hist_file.read_text().splitlines():
            try:
                history.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line cut by a crash says nothing we need
    for row in history:
        info["epoch"] = max(info["epoch"], row.get("epoch", 0))
        ce = row.get("ce")
        if row.get("stage") == "train":
            info["train_ce"] = ce
        elif row.get("stage") == "valid" and ce is not None:
            info["valid_ce"] = ce
            info["best_ce"] = ce if info["best_ce"] is None else min(info["best_ce"], ce)
    marker = path / "status"
    if marker.is_file():
        word, *owner = marker.read_text().split() or ["running"]
        info["status"] = "killed" if word == "running" and not _owner_alive(owner) else word
    elif history or (path / "checkpoint.pt").exists():
        info["status"] = "running"
    return info


def _owner_alive(owner):
    """False only when the status file names a process on this host that no longer exists (killed -9, out of
    memory, power loss: nothing got to write the final status); True when it cannot tell."""
    if len(owner) != 2 or not owner[0].isdigit() or owner[1] != socket.gethostname():
        return True
    try:
        os.kill(int(owner[0]), 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass  # another user's process: alive
    return True


def set_status(run_dir, word):
    """A run directory's status file: running (with this process and host, so that run_status can tell a killed
    run), done, failed or preempted."""
    owner = f"{os.getpid()} {socket.gethostname()}\n" if word == "running" else ""
    (Path(run_dir) / "status").write_text(f"{word}\n{owner}")


def describe():
    env = get_env()
    lines = [f"team        {env.team}", f"cluster     {env.cluster}", f"team file   {env.config_file}",
             f"runs dir    {env.runs_dir}", f"reference   {env.reference_dir}",
             f"partitions  {json.dumps(env.partitions)}", f"exclude     {env.slurm_exclude or '-'}",
             "mappers     " + (", ".join(f"{p.pattern} -> {r}" for p, r in env.dataset_mappers) or "-")]
    return "\n".join(lines)


def keep_freed_memory():
    """For CPU training and generation on Linux. glibc returns large freed blocks to the kernel, and the next step
    faults them back in page by page (0.4-0.6 s of a 3 s small-model update; 7% of a debug-model one): serve blocks
    up to 32 MB (glibc's limit) from the heap and keep up to 2 GB of free heap. -> whether it took effect."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 2 ** 31 - 1))


def cli(main, help=None):
    """Run an entry point's main(argv): bad input (UserError) is one line on stderr and exit status 2. -h or
    --help prints help() (default: the entry point's module docstring) and exits 0; help=False leaves them to
    main (argparse)."""
    argv = sys.argv[1:]
    if help is not False and {"-h", "--help"} & set(argv):
        print(help() if help else (sys.modules[main.__module__].__doc__ or "").strip())
        sys.exit(0)
    try:
        sys.exit(main(argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def main(argv):
    if not argv:
        print(describe())
        return 0
    if argv[0] == "info" and len(argv) == 2:
        path = run_dir(argv[1])
        if not (path / "config.json").is_file():
            raise UserError(f"no run {argv[1]!r}: {path / 'config.json'} not found")
        print(f"run {argv[1]} at {path}")
        print((path / "config.json").read_text().rstrip())
        print(json.dumps(run_status(path)))
        return 0
    raise UserError(f"usage: python env.py [info SIG] (got {' '.join(argv)!r})")


if __name__ == "__main__":
    cli(main)
