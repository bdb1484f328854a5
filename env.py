"""The environment a run lives in: team, cluster, paths, and the run directory.

Resolved once per process from environment variables and the team's YAML file (AudioCraft's format, so
AudioCraft users' team files load unchanged), cached, and `reset()` for tests.

    python env.py              # print the resolved environment
    python env.py info SIG     # print a run's config and status
    python env.py plot SIG [SIG ...] --out=curves.png   # training curves of runs (needs matplotlib; loggers.py)

Variables (AudioCraft's names): AUDIOCRAFT_TEAM (default "default"), AUDIOCRAFT_CLUSTER (else detected:
slurm, darwin, aws, default), AUDIOCRAFT_CONFIG (team file, else config/teams/<team>.yaml),
AUDIOCRAFT_DORA_DIR (runs directory), AUDIOCRAFT_REFERENCE_DIR (what //reference/ points to).
"""
import ast
import dataclasses
import difflib
import hashlib
import json
import math
import os
import platform
import re
import socket
import sys
import time
import types as types_
import typing
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


# A Hugging Face checkpoint directory keeps its weights in the first of these that exists
WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin")


def read_weights(directory, wanted, what="directory", expected=""):
    """{name: tensor} from a Hugging Face checkpoint directory (safetensors or torch .bin, one file or shards named
    by an index), reading only the names `wanted` (a collection, or a test name -> bool): a T5 file also holds its
    decoder, a MusicGen file its text encoder and codec. `what` names the directory in errors (e.g. "T5 directory");
    `expected` goes after an unreadable .bin's message."""
    keep = wanted if callable(wanted) else set(wanted).__contains__
    directory = Path(directory)
    file = next((directory / f for f in WEIGHT_FILES if (directory / f).is_file()), None)
    if file is None:
        raise UserError(f"{what} {directory}: no weights (expected one of {', '.join(WEIGHT_FILES)})")
    files = [file]
    if file.name.endswith(".index.json"):  # sharded: {"weight_map": {name: shard file}}, only the shards needed
        try:
            weight_map = json.loads(file.read_text())["weight_map"]
            files = [directory / shard for shard in dict.fromkeys(s for n, s in weight_map.items() if keep(n))]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{file}: not a weights index ({type(e).__name__}: {e})") from None
    out = {}
    for path in files:
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            try:
                with safe_open(str(path), framework="pt") as f:
                    out.update({n: f.get_tensor(n) for n in f.keys() if keep(n)})
            except Exception as e:  # safetensors has its own error types
                raise UserError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
        else:
            state = load_tensors(path, mmap=True, expected=expected)
            if not isinstance(state, dict):
                raise UserError(f"{path}: holds a {type(state).__name__}, not a state dict{expected}")
            out.update({n: v for n, v in state.items() if keep(n)})
    return out


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


def read_history(path):
    """The rows of a history.jsonl ([] when there is none yet)."""
    rows = []
    if Path(path).is_file():
        for line in Path(path).read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line cut by a crash says nothing we need
    return rows


def run_status(path):
    """What a run directory says about its run: status, epoch, last train/valid ce, best valid ce."""
    path = Path(path)
    info = {"status": "not started", "epoch": 0, "train_ce": None, "valid_ce": None, "best_ce": None}
    if not path.is_dir():
        return info
    history = read_history(path / "history.jsonl")
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
    return _pid_alive(int(owner[0]))


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


def resolve_device(name, local_rank=None, local_world=None):
    """The one place a process picks its device (train.py, generate.py, data.py tokenize). Empty: cuda, then mps,
    then cpu. `cuda` without an index is the local rank's GPU (LOCAL_RANK when not given; modulo the GPUs this
    process sees: under srun with one GPU per task that is cuda:0)."""
    import torch
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if local_rank is None else local_rank
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if local_world is None else local_world
    if not name:
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f'device="{name}" is not a torch device (cpu, cuda, cuda:1, mps)') from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f'device="{name}": CUDA is not available on this machine (use --device=cpu)')
        count = torch.cuda.device_count()
        if device.index is None:
            device = torch.device("cuda", local_rank % count)
        elif local_world > 1 and count > 1:
            raise UserError(f'device="{name}" names one GPU, but {local_world} processes run on this node and '
                            f'would all use it: use --device=cuda (each process takes its local rank\'s GPU)')
        elif device.index >= count:
            raise UserError(f'device="{name}": this process sees {count} GPU(s)')
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f'device="{name}": MPS is not available on this machine')
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f'device="{name}" is not a device to compute on (use cpu, cuda or mps)')
    return device


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


# ----------------------------------------------------------------------------------------------------------
# One --key=value parser for every entry point: config files and options, the same coercion and the same words

def option_types(schema):
    """{key: (type, nullable)} of a dataclass (its annotations) or a dict {key: default} (the defaults' types; a
    default may be a type, or a (type, None) pair for "a value of that type, or None")."""
    if dataclasses.is_dataclass(schema):
        hints = typing.get_type_hints(schema if isinstance(schema, type) else type(schema))
        out = {}
        for f in dataclasses.fields(schema):
            kind = hints[f.name]
            args = [a for a in typing.get_args(kind) if a is not type(None)]
            if args and len(typing.get_args(kind)) > len(args):       # X | None
                out[f.name] = (args[0], True)
            elif typing.get_origin(kind) in (tuple, list):             # tuple[int, ...]: the items' type too
                items = [a for a in typing.get_args(kind) if a is not Ellipsis]
                out[f.name] = (typing.get_origin(kind), False, items[0] if len(set(items)) == 1 else None)
            else:
                out[f.name] = (kind, False)
        return out
    out = {}
    for key, default in schema.items():
        if isinstance(default, tuple) and len(default) == 2 and default[1] is None and isinstance(default[0], type):
            out[key] = (default[0], True)
        elif isinstance(default, type):
            out[key] = (default, False)
        else:
            out[key] = (type(default), default is None)
    return out


def option_defaults(schema):
    """{key: default} of a schema (see option_types): a bare type or a (type, None) pair defaults to None."""
    if dataclasses.is_dataclass(schema):
        return {f.name: getattr(schema, f.name) if not isinstance(schema, type) else
                f.default_factory() if f.default is dataclasses.MISSING else f.default
                for f in dataclasses.fields(schema)}
    typed = lambda v: isinstance(v, type) or (isinstance(v, tuple) and len(v) == 2 and v[1] is None  # noqa: E731
                                              and isinstance(v[0], type))
    return {k: None if typed(v) else v for k, v in schema.items()}


def _closest(key, names):
    match = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    return f' (did you mean "{match[0]}"?)' if match else ""


def coerce(key, value, kind, where, nullable=False, item=None):
    """A value (a string from the command line, or a Python object from a config file) -> `kind`. Strings are read
    as Python literals where the type is not str (`--lr=1` is a float, `--delays=[0,1]` or `0,1` a tuple, and
    `--metrics=fad,kld` a tuple of words); "none" is None where the key may be None; a tuple's items are coerced to
    `item` when given. Anything else is one UserError naming where, the key and the value."""
    example = "fad,kld" if item is str else "[0,1,2]"
    expected = {bool: "a bool (true/false)", int: "an int", float: "a float", str: "a string",
                tuple: f"a list such as {example}", list: f"a list such as {example}"}[kind]
    bad = UserError(f"{where}: {key}={value!r} is not {expected}")
    if nullable and (value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null"))):
        return None
    if isinstance(value, str) and kind is not str:
        text = value.strip()
        if kind is bool:
            if text.lower() in ("true", "1", "yes", "on"):
                return True
            if text.lower() in ("false", "0", "no", "off"):
                return False
            raise bad
        try:
            if kind in (tuple, list) and text[:1] not in "[(":   # 0,1,2 or fad,kld: items that are no literal are words
                value = [_literal_or_word(x.strip()) for x in text.split(",") if x.strip()]
            else:
                value = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise bad from None
    if kind is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or value != int(value):
            raise bad
        return int(value)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        try:
            return float(value)
        except OverflowError:  # an int too large for a float
            raise bad from None
    if kind in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise bad
        if item is not None:
            try:
                value = [coerce(key, v, item, where) for v in value]
            except UserError:
                raise bad from None
        return kind(value)
    if not isinstance(value, str):
        raise bad
    return value


def coerce_key(types, key, value, where):
    """coerce() with the type option_types() found for key."""
    kind, nullable, *item = types[key]
    return coerce(key, value, kind, where, nullable, *item)


def _literal_or_word(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if re.fullmatch(r"[A-Za-z_][\w.-]*", text):
            return text
        raise


def split_args(argv, types, where="command line"):
    """argv -> (positional arguments, [(key, value string)]). `--flag` alone means true for a bool key."""
    positionals, options = [], []
    for arg in argv:
        if not arg.startswith("--"):
            positionals.append(arg)
            continue
        key, eq, value = arg[2:].partition("=")
        if key not in types:
            raise UserError(f'{where}: unknown key "{key}"{_closest(key, types)}')
        if not eq:
            if types[key][0] is not bool:
                raise UserError(f'{where}: "{arg}" must be --key=value')
            value = "true"
        options.append((key, value))
    return positionals, options


def parse_options(argv, schema, *, where="command line", usage="", positionals=(0, 0)):
    """An entry point's command line -> (positional arguments, {key: value}): --key=value options typed by
    `schema` (a dataclass or {key: default}, see option_types), defaults for the rest, and between positionals[0]
    and positionals[1] positional arguments (a usage error otherwise)."""
    types = option_types(schema)
    args, options = split_args(argv, types, where)
    lo, hi = positionals
    if not lo <= len(args) <= hi:
        got = " ".join(args) or "none"
        raise UserError(f"{where}: {'unexpected arguments' if len(args) > hi else 'missing arguments'} "
                        f"(got {got}){'; usage: ' + usage if usage else ''}")
    values = option_defaults(schema)
    for key, value in options:
        values[key] = coerce_key(types, key, value, where)
    return args, values


def apply_config_file(cfg, path):
    """Run a config file (plain Python) with cfg's current values in scope; every public name it leaves must be a
    key of cfg (a dataclass instance), and is coerced to that key's type."""
    types = option_types(cfg)
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    scope = {k: getattr(cfg, k) for k in types}
    before = dict(scope)
    try:
        exec(compile(path.read_text(), str(path), "exec"), scope)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{path}: {type(e).__name__}: {e}") from None
    for name, value in scope.items():
        if name.startswith("_") or isinstance(value, (types_.ModuleType, types_.FunctionType, type)):
            continue
        if name not in types:
            raise UserError(f'{path}: unknown key "{name}"{_closest(name, types)} (helper names must start with _)')
        if name in before and value is before[name]:
            continue
        setattr(cfg, name, coerce_key(types, name, value, str(path)))


def parse_config(cls, argv, where="command line", before_files=None):
    """Config files (the positional arguments, applied left to right), then --key=value, into a new cls().
    before_files(cfg, overrides) runs first (train.py's --from_sig loads another run's config there)."""
    types = option_types(cls)
    files, overrides = split_args(argv, types, where)
    cfg = cls()
    if before_files:
        before_files(cfg, overrides)
    for path in files:
        apply_config_file(cfg, path)
    for key, value in overrides:
        setattr(cfg, key, coerce_key(types, key, value, where))
    return cfg


# ----------------------------------------------------------------------------------------------------------
# Stopping: SIGTERM / SIGUSR1 (SLURM's warning before preemption) and Ctrl-C ask every long phase to stop

class Stopped(Exception):
    """A stop signal arrived; whoever catches it saves what can be saved and exits EXIT_REQUEUE."""


EXIT_REQUEUE = 75  # EX_TEMPFAIL: stopped by a signal after writing what it had; the sbatch wrapper requeues
_stop_signal = None


def install_stop_handlers(signals=("SIGTERM", "SIGUSR1", "SIGINT")):
    """The first of these signals only records itself: loops poll stop_requested() or check_stop() and stop at a
    safe point within seconds. A second Ctrl-C interrupts at once (KeyboardInterrupt), for a stuck phase."""
    import signal

    def handler(signum, _frame):
        global _stop_signal
        name = signal.Signals(signum).name
        if _stop_signal is not None and name == "SIGINT":
            raise KeyboardInterrupt
        _stop_signal = _stop_signal or name
        if name == "SIGINT":
            print("\nstopping at the next safe point (Ctrl-C again to interrupt now)", file=sys.stderr, flush=True)
    for name in signals:
        signal.signal(getattr(signal, name), handler)


def stop_requested():
    """The name of the stop signal received (SIGTERM, SIGUSR1, SIGINT), or None."""
    return _stop_signal


def check_stop():
    if _stop_signal is not None:
        raise Stopped(_stop_signal)


def reset_stop():
    global _stop_signal
    _stop_signal = None


# ----------------------------------------------------------------------------------------------------------
# One writer per run directory

LOCK_FILE = "lock"
LOCK_HEARTBEAT = 60.0        # seconds between the holder's touches of its lock file
LOCK_STALE = 10 * LOCK_HEARTBEAT   # a lock of another host untouched this long belongs to a dead process


class RunLock:
    """<run dir>/lock, held for the life of a run: one writer per run directory. It holds "PID HOST START" and its
    holder touches it every LOCK_HEARTBEAT seconds. A lock is stale when its PID is gone from this host (kill -9,
    out of memory) or, for another host's lock on a shared filesystem, when it has not been touched for
    LOCK_STALE seconds; a stale lock is taken over, a live one is a UserError naming its holder."""

    def __init__(self, directory):
        self.path = Path(directory) / LOCK_FILE
        self.owner = f"{os.getpid()} {socket.gethostname()} {int(time.time())}"
        self._stop = None

    def holder(self):
        """(pid, host, started, seconds since the last touch) of the current lock, or None."""
        try:
            text, age = self.path.read_text(), time.time() - self.path.stat().st_mtime
        except (FileNotFoundError, NotADirectoryError):
            return None
        parts = text.split()
        if len(parts) != 3 or not parts[0].isdigit():
            return (None, None, None, age)  # half written or foreign: stale once old enough
        return (int(parts[0]), parts[1], int(parts[2]) if parts[2].isdigit() else 0, age)

    def live_holder(self):
        """(pid, host, started) of a live process holding this lock, or None; read only (taking the lock to look
        would refuse a training launch at that instant)."""
        holder = self.holder()
        if holder is None or self.stale(holder):
            return None
        return holder[:3]

    def stale(self, holder):
        pid, host, _, age = holder
        if pid is not None and host == socket.gethostname():
            return not _pid_alive(pid)
        return age > LOCK_STALE

    def acquire(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(10):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.holder()
                if holder is None:
                    continue  # released between the two calls
                if not self.stale(holder):
                    pid, host, started, _ = holder
                    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
                    raise UserError(f"{self.path.parent} is in use by process {pid} on {host} (since {since}; lock "
                                    f"{self.path}): wait for that run to finish or stop it first; two processes "
                                    f"writing one run directory would corrupt it")
                # stale: move it aside (only one of several contenders can) and try again
                try:
                    os.rename(self.path, self.path.with_name(f".{LOCK_FILE}.stale{os.getpid()}"))
                    self.path.with_name(f".{LOCK_FILE}.stale{os.getpid()}").unlink(missing_ok=True)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                f.write(self.owner + "\n")
            self._start_heartbeat()
            return self
        raise UserError(f"{self.path}: could not take the run directory's lock (contended); try again")

    def _start_heartbeat(self):
        import threading
        self._stop = threading.Event()

        def beat():
            while not self._stop.wait(LOCK_HEARTBEAT):
                try:
                    if self.path.read_text().strip() != self.owner:
                        return  # taken over (we were thought dead): stop touching it
                    os.utime(self.path)
                except OSError:
                    pass
        threading.Thread(target=beat, name="run-lock-heartbeat", daemon=True).start()

    def release(self):
        if self._stop is not None:
            self._stop.set()
        try:
            if self.path.read_text().strip() == self.owner:
                self.path.unlink()
        except OSError:
            pass

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass  # another user's process: alive
    return True


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
    if argv[0] == "plot":
        import loggers
        sigs, o = parse_options(argv[1:], {"out": "curves.png"}, positionals=(1, sys.maxsize),
                                usage="python env.py plot SIG [SIG ...] [--out=curves.png]")
        loggers.plot_runs([s if Path(s).is_dir() else run_dir(s) for s in sigs], o["out"])
        print(f"wrote {o['out']}")
        return 0
    raise UserError(f"usage: python env.py [info SIG | plot SIG [SIG ...] [--out=curves.png]] (got {' '.join(argv)!r})")


if __name__ == "__main__":
    import env  # run as a script this file is __main__; modules it calls (loggers) raise env's UserError
    env.cli(env.main)
