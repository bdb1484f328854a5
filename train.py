"""Train a MusicGen-style LM: config, processes, the loop, its stages, checkpoints and resume.

    python train.py config/debug.py                                   # tiny model, synthetic data, ~1 min CPU
    python train.py config/base.py --batch_size=32 --lr=3e-4          # files apply left to right, then --key=value
    python train.py config/base.py --print_config=True                # resolved config, signature, run dir
    torchrun --nproc_per_node=8 train.py config/base.py               # one node
    srun --ntasks-per-node=8 python train.py config/base.py           # SLURM without torchrun (see grids/)

The run directory is <runs_dir>/xps/<signature>/: running the same config again resumes it.
"""
import ast
import dataclasses
import difflib
import json
import math
import os
import sys
import types
from dataclasses import dataclass, field, fields
from pathlib import Path

import env
from env import UserError


@dataclass
class Config:
    # run
    seed: int = 2036
    runs_dir: str = ""                # empty: the team's dora_dir
    clear: bool = False               # wipe the run directory first
    from_sig: str = ""                # start from that run's config.json
    print_config: bool = False        # print config, signature and run directory, then exit
    continue_from: str = ""           # weights only: AudioCraft state_dict.bin, a checkpoint, //reference/..., or a SIG
    label: str = ""                   # free text that is part of the signature (AudioCraft's `label`)
    # data
    dataset: str = "demo"             # <dir>/{train,valid,evaluate,generate}/data.jsonl, or "demo" (built-in synthetic set)
    token_cache: bool = True          # train on pre-computed codes (else encode raw audio every step)
    cache_dir: str = ""               # empty: <runs_dir>/cache
    segment_duration: float = 30.0
    min_segment_ratio: float = 0.8
    sample_on_weight: bool = True
    sample_on_duration: bool = True
    merge_text_p: float = 0.25        # merge sidecar metadata into the description
    drop_desc_p: float = 0.5          # drop the original description when merging
    keep_field_p: float = 0.5         # keep each other metadata field when merging
    max_skip_fraction: float = 0.05   # abort when more than this fraction of reads fail
    num_workers: int = 2
    # codec
    codec: str = "//reference/encodec_32khz"   # AudioCraft compression_state_dict.bin, HF directory, or "debug"
    # model
    dim: int = 1024
    n_layers: int = 24
    n_heads: int = 16
    hidden_scale: int = 4
    n_q: int = 4
    card: int = 2048
    pattern: str = "delay"            # delay | parallel | unroll | coarse_first | musiclm
    delays: tuple = ()                # empty: 0..n_q-1
    text_dim: int = 768
    fuse: str = "cross"               # cross | prepend | sum
    mask_memory: bool = False         # mask padded text positions (released models were trained without)
    dropout: float = 0.0
    # conditioning
    conditioner: str = "t5"           # t5 | lut
    t5_path: str = "//reference/t5-base"
    t5_dtype: str = "float32"
    word_dropout: float = 0.3
    text_max_length: int = 0          # 0: no limit
    lut_tokenizer: str = "bytes"      # bytes | <sentencepiece .model> | tiktoken:<bpe file>
    lut_dim: int = 256
    lut_layers: int = 0
    cfg_dropout: float = 0.3
    cfg_dropout_per_batch: bool = False   # AudioCraft: one coin for the whole batch
    # optimisation
    epochs: int = 500
    updates_per_epoch: int = 2000
    batch_size: int = 192             # global, split across ranks
    grad_accum: int = 1               # micro-steps per update (same global batch)
    lr: float = 1e-4
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_matrices_only: bool = False  # AudioCraft decays every parameter
    lr_schedule: str = "cosine"       # cosine | linear | constant
    warmup: int = 4000
    lr_min_ratio: float = 0.0
    max_norm: float = 1.0
    ema: bool = True
    ema_decay: float = 0.99
    ema_every: int = 10
    train_on_padding: bool = False    # AudioCraft trains on padded frames; we mask them by default
    max_nonfinite: int = 10           # abort after this many non-finite steps in a row
    # precision and speed
    dtype: str = "bfloat16"           # autocast dtype: bfloat16 | float16 | float32
    compile: bool = False
    device: str = ""                  # empty: cuda, then mps, then cpu
    parallel: str = "ddp"             # ddp | fsdp
    # stages
    valid_batches: int = 0            # 0: the whole valid split
    generate_every: int = 25
    generate_duration: float = 10.0
    generate_count: int = 4           # samples per generate stage (from the generate split's descriptions)
    evaluate_every: int = 25
    save_every: int = 50              # keep checkpoint_<epoch>.pt every this many epochs
    cfg_coef: float = 3.0
    top_k: int = 250
    top_p: float = 0.0
    temperature: float = 1.0
    # logging and distributed
    log_every: int = 10
    dist_timeout: int = 600           # seconds before a collective gives up (a dead rank must not hang the rest)


# Keys that change how a run executes, not what it computes: left out of the signature, so the same experiment
# on another machine, with other workers or compiled, lands in the same run directory.
INFRA_KEYS = {"runs_dir", "clear", "from_sig", "print_config", "num_workers", "device", "compile", "parallel",
              "grad_accum", "log_every", "dist_timeout", "cache_dir", "generate_every", "evaluate_every",
              "save_every"}

FIELDS = {f.name: f for f in fields(Config)}


# ----------------------------------------------------------------------------------------------------------
# Parsing: config files (plain Python) then --key=value

def _closest(key):
    match = difflib.get_close_matches(key, FIELDS, n=1, cutoff=0.6)
    return f' (did you mean "{match[0]}"?)' if match else ""


def coerce(key, value, where):
    """Value (a string from the command line, or a Python object from a file) -> the field's type."""
    kind = type(FIELDS[key].default)
    expected = {bool: "a bool (true/false)", int: "an int", float: "a float", str: "a string",
                tuple: "a list such as [0,1,2]"}[kind]
    bad = UserError(f'{where}: {key}={value!r} is not {expected}')
    if isinstance(value, str) and kind is not str:
        text = value.strip()
        if kind is bool:
            if text.lower() in ("true", "1", "yes", "on"):
                return True
            if text.lower() in ("false", "0", "no", "off"):
                return False
            raise bad
        if kind is tuple:
            try:
                value = ast.literal_eval(text) if text[:1] in "[(" else [ast.literal_eval(x) for x in text.split(",") if x]
            except (ValueError, SyntaxError):
                raise bad from None
        else:
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                raise bad from None
    if kind is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise bad
        return int(value)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if kind is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad
        return tuple(value)
    if not isinstance(value, str):
        raise bad
    return value


def apply_file(cfg, path):
    """Run a config file with the current values in scope; every public name it leaves must be a key."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    scope = {k: getattr(cfg, k) for k in FIELDS}
    before = dict(scope)
    try:
        exec(compile(path.read_text(), str(path), "exec"), scope)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{path}: {type(e).__name__}: {e}") from None
    for name, value in scope.items():
        if name.startswith("_") or isinstance(value, (types.ModuleType, types.FunctionType, type)):
            continue
        if name not in FIELDS:
            raise UserError(f'{path}: unknown key "{name}"{_closest(name)} (helper names must start with _)')
        if name in before and value is before[name]:
            continue
        setattr(cfg, name, coerce(name, value, str(path)))


def parse_args(argv):
    """argv (without the program name) -> Config. Files first, left to right, then --key=value."""
    cfg = Config()
    files, overrides = [], []
    for arg in argv:
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if not eq:
                raise UserError(f'command line: "{arg}" must be --key=value')
            if key not in FIELDS:
                raise UserError(f'command line: unknown key "{key}"{_closest(key)}')
            overrides.append((key, value))
        else:
            files.append(arg)
    from_sig = [v for k, v in overrides if k == "from_sig"]
    if from_sig:  # the runs directory it lives in may itself be an override
        cfg.runs_dir = next((v for k, v in reversed(overrides) if k == "runs_dir"), cfg.runs_dir)
        load_run_config(cfg, from_sig[-1])
    for path in files:
        apply_file(cfg, path)
    for key, value in overrides:
        setattr(cfg, key, coerce(key, value, "command line"))
    validate(cfg)
    return cfg


def load_run_config(cfg, sig):
    path = run_dir(cfg, sig) / "config.json"
    if not path.is_file():
        raise UserError(f"--from_sig={sig}: no run config at {path}")
    for key, value in json.loads(path.read_text()).items():
        if key in FIELDS and key not in INFRA_KEYS:
            setattr(cfg, key, coerce(key, value, str(path)))


def world_size_from_env():
    return int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)


def validate(cfg, world_size=None):
    """Checks that span keys; each error names the keys and values."""
    world_size = world_size or world_size_from_env()
    choices = {"pattern": ("delay", "parallel", "unroll", "coarse_first", "musiclm"), "fuse": ("cross", "prepend", "sum"),
               "conditioner": ("t5", "lut"), "dtype": ("bfloat16", "float16", "float32"),
               "lr_schedule": ("cosine", "linear", "constant"), "parallel": ("ddp", "fsdp"),
               "t5_dtype": ("float32", "bfloat16")}
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise UserError(f'{key}="{getattr(cfg, key)}" is not one of {", ".join(allowed)}')
    if cfg.batch_size <= 0 or cfg.batch_size % world_size:
        raise UserError(f"batch_size={cfg.batch_size} does not divide across {world_size} processes "
                        f"(WORLD_SIZE={world_size}): use a multiple of {world_size}")
    local = cfg.batch_size // world_size
    if cfg.grad_accum <= 0 or local % cfg.grad_accum:
        raise UserError(f"grad_accum={cfg.grad_accum} does not divide the per-process batch {local} "
                        f"(batch_size={cfg.batch_size} over {world_size} processes)")
    if cfg.dim % cfg.n_heads:
        raise UserError(f"dim={cfg.dim} is not a multiple of n_heads={cfg.n_heads}")
    if cfg.delays and len(cfg.delays) != cfg.n_q:
        raise UserError(f"delays={list(cfg.delays)} has {len(cfg.delays)} entries but n_q={cfg.n_q}")
    for key in ("epochs", "updates_per_epoch", "ema_every", "log_every", "n_layers", "n_q", "card"):
        if getattr(cfg, key) <= 0:
            raise UserError(f"{key}={getattr(cfg, key)} must be positive")
    for key in ("cfg_dropout", "word_dropout", "merge_text_p", "drop_desc_p", "keep_field_p", "ema_decay",
                "min_segment_ratio", "max_skip_fraction"):
        if not 0.0 <= getattr(cfg, key) <= 1.0:
            raise UserError(f"{key}={getattr(cfg, key)} must be between 0 and 1")
    if cfg.segment_duration <= 0 or cfg.lr < 0:
        raise UserError(f"segment_duration={cfg.segment_duration} and lr={cfg.lr} must be positive")


def config_delta(cfg):
    """The experiment's (key, value) differences from the defaults, infrastructure keys left out."""
    default = Config()
    delta = {}
    for key in FIELDS:
        value = getattr(cfg, key)
        if key not in INFRA_KEYS and value != getattr(default, key):
            delta[key] = list(value) if isinstance(value, tuple) else value
    return delta


def config_signature(cfg):
    return env.signature(config_delta(cfg))


def run_dir(cfg, sig=None):
    return env.run_dir(sig or config_signature(cfg), cfg.runs_dir or None)


def config_dict(cfg):
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}


def print_config(cfg):
    width = max(map(len, FIELDS))
    for key in FIELDS:
        print(f"{key:<{width}} = {getattr(cfg, key)!r}")
    print(f"signature: {config_signature(cfg)}")
    print(f"run dir:   {run_dir(cfg)}")


def main(argv):
    cfg = parse_args(argv)
    if cfg.print_config:
        print_config(cfg)
        return 0
    return train(cfg)


def train(cfg):
    raise UserError("training is not available yet: the loop lands with issue 7; use --print_config=True")


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
