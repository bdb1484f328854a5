"""Train a MusicGen-style LM: config, processes, the loop, its stages, checkpoints and resume.

    python train.py config/debug.py                                   # tiny model, synthetic data, ~1 min CPU
    python train.py config/base.py --batch_size=32 --lr=3e-4          # files apply left to right, then --key=value
    python train.py config/base.py --print_config=True                # resolved config, signature, run dir
    torchrun --nproc_per_node=8 train.py config/base.py               # one node
    srun --ntasks-per-node=8 python train.py config/base.py           # SLURM without torchrun (see grids/)

The run directory is <runs_dir>/xps/<signature>/: running the same config again resumes it.
"""
import ast
import contextlib
import dataclasses
import datetime
import difflib
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import sys
import time
import types
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import codec as codec_lib
import data
import demo
import env
import model as lm_lib
import text
from env import UserError


@dataclass
class Config:
    # run
    seed: int = 2036                  # model init, data sampling, dropout; a run replays exactly from it
    runs_dir: str = ""                # empty: the team's dora_dir
    clear: bool = False               # wipe the run directory first
    from_sig: str = ""                # start from that run's config.json
    print_config: bool = False        # print config, signature and run directory, then exit
    continue_from: str = ""           # weights only: AudioCraft state_dict.bin, a checkpoint, //reference/..., or a SIG
    trust_checkpoint: bool = False    # continue_from may unpickle (AudioCraft's checkpoint.th); pickles can run code
    label: str = ""                   # free text that is part of the signature (AudioCraft's `label`)
    # data
    dataset: str = "demo"             # <dir>/{train,valid,evaluate,generate}/data.jsonl, or "demo" (built-in synthetic set)
    token_cache: bool = True          # train on pre-computed codes (else encode raw audio every step)
    cache_dir: str = ""               # empty: <runs_dir>/cache
    segment_duration: float = 30.0    # seconds per training segment (the model's context)
    min_segment_ratio: float = 0.8    # a segment holds at least this fraction of real frames (the rest: padding)
    sample_on_weight: bool = True     # draw files by their manifest weight
    sample_on_duration: bool = True   # draw files in proportion to their duration
    merge_text_p: float = 0.25        # merge sidecar metadata into the description
    drop_desc_p: float = 0.5          # drop the original description when merging
    keep_field_p: float = 0.5         # keep each other metadata field when merging
    max_skip_fraction: float = 0.05   # abort when more than this fraction of reads fail
    num_workers: int = 2              # data loader processes per rank
    # codec
    codec: str = "//reference/encodec_32khz"   # AudioCraft compression_state_dict.bin, HF directory, or "debug"
    # model
    dim: int = 1024                   # model width
    n_layers: int = 24
    n_heads: int = 16
    hidden_scale: int = 4             # feed-forward width = hidden_scale x dim
    n_q: int = 4                      # codebooks (must match the codec)
    card: int = 2048                  # entries per codebook (must match the codec)
    pattern: str = "delay"            # delay | parallel | unroll | coarse_first | musiclm
    delays: tuple = ()                # empty: 0..n_q-1
    text_dim: int = 768               # width of the text encoder's states (T5-base: 768)
    fuse: str = "cross"               # cross | prepend | sum
    mask_memory: bool = False         # mask padded text positions (released models were trained without)
    dropout: float = 0.0
    # conditioning
    conditioner: str = "t5"           # t5 | lut
    t5_path: str = "//reference/t5-base"   # Hugging Face T5 directory or //reference/...
    t5_dtype: str = "float32"         # float32 | bfloat16
    word_dropout: float = 0.3         # drop each word of a description with this probability (training)
    text_max_length: int = 0          # 0: no limit
    lut_tokenizer: str = "bytes"      # bytes | <sentencepiece .model> | tiktoken:<bpe file>
    lut_dim: int = 256
    lut_layers: int = 0
    cfg_dropout: float = 0.3          # drop the whole description with this probability (classifier-free guidance)
    cfg_dropout_per_batch: bool = False   # AudioCraft: one coin for the whole batch
    # optimisation
    epochs: int = 500                 # each epoch: updates_per_epoch updates, then valid
    updates_per_epoch: int = 2000
    batch_size: int = 192             # global, split across ranks
    grad_accum: int = 1               # micro-steps per update (same global batch)
    lr: float = 1e-4                  # peak learning rate (AdamW)
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_matrices_only: bool = False  # AudioCraft decays every parameter
    lr_schedule: str = "cosine"       # cosine | linear | constant
    warmup: int = 4000                # updates of linear warmup
    lr_min_ratio: float = 0.0         # the schedule's floor, as a fraction of lr
    max_norm: float = 1.0             # gradient clipping; 0: off
    ema: bool = True                  # a moving average of the weights, used by valid, generate and evaluate
    ema_decay: float = 0.99
    ema_every: int = 10               # updates between EMA updates
    train_on_padding: bool = False    # AudioCraft trains on padded frames; we mask them by default
    max_nonfinite: int = 10           # abort after this many non-finite steps in a row
    # precision and speed
    dtype: str = "bfloat16"           # autocast dtype: bfloat16 | float16 | float32
    compile: bool = False             # torch.compile each transformer layer
    device: str = ""                  # empty: cuda, then mps, then cpu
    parallel: str = "ddp"             # ddp | fsdp
    # stages
    valid_batches: int = 0            # 0: the whole valid split
    generate_every: int = 25          # epochs between generate stages (and the last epoch); 0: never
    generate_duration: float = 10.0   # seconds per sample in the generate stage
    generate_count: int = 4           # samples per generate stage (from the generate split's descriptions)
    evaluate_every: int = 25          # likewise for evaluate; 0: never
    save_every: int = 50              # keep checkpoint_<epoch>.pt every this many epochs
    cfg_coef: float = 3.0             # classifier-free guidance coefficient for sampling
    top_k: int = 250                  # sample among the k most likely codes; 0: all
    top_p: float = 0.0                # nucleus sampling; wins over top_k when > 0
    temperature: float = 1.0
    # logging and distributed
    log_every: int = 10               # updates between log lines
    dist_timeout: int = 600           # seconds before a collective gives up (a dead rank must not hang the rest)


# Keys that change how a run executes, not what it computes: left out of the signature, so the same experiment
# on another machine, with other workers or compiled, lands in the same run directory.
INFRA_KEYS = {"runs_dir", "clear", "from_sig", "print_config", "num_workers", "device", "compile", "parallel",
              "grad_accum", "log_every", "dist_timeout", "cache_dir", "generate_every", "evaluate_every",
              "save_every", "trust_checkpoint"}

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


# ----------------------------------------------------------------------------------------------------------
# Processes and devices

EXIT_REQUEUE = 75  # EX_TEMPFAIL: stopped by a signal after writing its checkpoint; the sbatch wrapper requeues


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self):
        return self.rank == 0


def first_slurm_host(nodelist):
    """'gpu[012-015,020],cpu1' -> 'gpu012': enough of SLURM's host-list syntax to find the head node."""
    prefix, first = re.match(r"([^,\[]*)(?:\[([^,\]-]*))?", nodelist).groups()
    return prefix + (first or "")


def setup_distributed(cfg):
    """torchrun (RANK, LOCAL_RANK, WORLD_SIZE), srun without torchrun (SLURM_*), or one process."""
    e = os.environ
    if "RANK" in e and "WORLD_SIZE" in e:
        rank, world, local = int(e["RANK"]), int(e["WORLD_SIZE"]), int(e.get("LOCAL_RANK", 0))
    elif int(e.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in e:
        rank, world, local = int(e["SLURM_PROCID"]), int(e["SLURM_NTASKS"]), int(e.get("SLURM_LOCALID", 0))
        e.setdefault("MASTER_ADDR", first_slurm_host(e.get("SLURM_JOB_NODELIST", "127.0.0.1")))
        e.setdefault("MASTER_PORT", str(20000 + int(e.get("SLURM_JOB_ID", "0")) % 20000))
    else:
        rank, world, local = 0, 1, 0
    if cfg.device:
        device = torch.device(cfg.device)
    elif torch.cuda.is_available():
        device = torch.device("cuda", local)
    elif torch.backends.mps.is_available():
        device = torch.device("mps")
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif device.type == "cpu":
        env.keep_freed_memory()  # glibc would hand freed activations back and fault them in again every update
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=cfg.dist_timeout))
    return Dist(rank, local, world, device)


def barrier(d):
    if d.world_size > 1:
        dist.barrier()


def all_sum(d, values):
    """Sum a list of floats across ranks in one collective (and one host sync)."""
    t = torch.tensor(values, dtype=torch.float64, device=d.device if d.device.type == "cuda" else "cpu")
    if d.world_size > 1:
        dist.all_reduce(t)
    return t.tolist()


# ----------------------------------------------------------------------------------------------------------
# The recipe's pieces

def lr_at(cfg, step, total):
    """Learning rate for update `step` (0-based): linear warmup, then cosine, linear or constant."""
    if step < cfg.warmup:
        return cfg.lr * step / cfg.warmup
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup) / max(1, total - cfg.warmup))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.lr_schedule == "cosine" else 1 - progress
    return cfg.lr * (cfg.lr_min_ratio + (1 - cfg.lr_min_ratio) * shape)


class EMA:
    """Unbiased moving average of the model's floating-point state, AudioCraft's: count = count*decay + 1,
    ema += (x - ema) / count. On the model's device, sharded like the model under FSDP."""

    def __init__(self, model, decay):
        self.decay, self.count = decay, 0.0
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model):
        self.count = self.count * self.decay + 1
        live = model.state_dict()
        torch._foreach_lerp_(list(self.state.values()), [live[k].detach() for k in self.state], 1.0 / self.count)


class TrainStep(torch.nn.Module):
    """One micro-step's forward: CFG dropout, the conditioner, the loss. DDP must wrap a module whose forward
    does all the work, so that it sees the conditioner's parameters and the LM's; this owns nothing."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        self.cond_len = 0

    def forward(self, codes, descriptions, valid, train=True):
        lm = self.lm
        if train:
            descriptions = lm.cfg_dropout(descriptions)
        condition, mask = lm.condition_provider.conditioners.description(descriptions)
        self.cond_len = mask.shape[-1]  # text positions in the last batch, for the MFU estimate
        return lm.compute_loss(codes, condition, mask, valid)


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: tensors are saved full (unsharded) and on the CPU, so a checkpoint written by FSDP on 8 GPUs
# resumes on one CPU and exports to AudioCraft without conversion.

RESUME_ADVICE = ("; the previous checkpoint is intact (make room or fix the directory, then run the same command "
                 "again to resume)")


def write_run_file(path, write):
    """A run directory's files (checkpoints, history, config.json) are written atomically, env.write_atomic."""
    env.write_atomic(path, write, advice=RESUME_ADVICE)


def save_atomic(obj, path):
    write_run_file(path, lambda f: torch.save(obj, f))


def load_checkpoint(path, trust=False, hint=""):
    """Tensors and plain containers only: a pickled object is refused, never run. trust=True unpickles anything
    (AudioCraft's training checkpoint.th pickles its config), for files from a trusted source."""
    if not trust:
        return env.load_tensors(path, hint=hint)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as e:  # the pickle names a class from a package not installed
        raise UserError(f"{path}: unpickling it needs the module {e.name!r}: pip install "
                        f"{str(e.name).split('.')[0]}") from None
    except Exception as e:
        raise UserError(env.load_error(path, e)) from None


def finished_epochs(path):
    """Epochs a checkpoint has completed, read without loading its tensors; 0 when it is absent or unreadable
    (resume then reports or works around the damage)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"] - 1
    except Exception:
        return 0


def full_state(state):
    """Detached CPU copies; DTensor shards gathered (collective: every rank calls it)."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu().clone() for k, v in state.items()}


@torch.no_grad()
def copy_into(live, saved):
    """Copy full tensors into live ones, which may be DTensor shards of them."""
    for k, dst in live.items():
        src = saved[k].to(dst.device, dst.dtype)
        if hasattr(dst, "device_mesh") and not hasattr(src, "device_mesh"):
            from torch.distributed.tensor import distribute_tensor
            src = distribute_tensor(src, dst.device_mesh, dst.placements)
        dst.copy_(src)


def rng_state():
    _, keys, pos, _, _ = np.random.get_state()
    state = {"python": random.getstate(), "numpy": torch.from_numpy(keys.copy()), "numpy_pos": int(pos),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _tensors_as_bytes(state):
    return {k: [t.numpy().tobytes() for t in v] if k == "cuda" else v.numpy().tobytes() if torch.is_tensor(v) else v
            for k, v in state.items()}


def _bytes_as_tensors(state):
    as_tensor = lambda b, dtype: torch.frombuffer(bytearray(b), dtype=dtype)  # noqa: E731
    return {k: [as_tensor(b, torch.uint8) for b in v] if k == "cuda" else
            as_tensor(v, torch.uint32 if k == "numpy" else torch.uint8) if isinstance(v, bytes) else v
            for k, v in state.items()}


def set_rng_state(state):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(("MT19937", state["numpy"].numpy(), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def format_row(row):
    keys = [k for k in ("ce", "ppl", "ce_uncond", "grad", "fd", "skipped") if row.get(k) is not None]
    keys += ["bad_reads"] if row.get("bad_reads") else []  # audio reads that failed, shown when there were some
    return f"epoch {row['epoch']:>3} {row['stage']:<8} | " + " | ".join(f"{k} {row[k]:.4g}" for k in keys)


def frechet_distance(a, b):
    """Fréchet distance between Gaussians fitted to two sets of embeddings [N, D] (FAD's formula)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    # tr sqrt(A B) from the eigenvalues of sqrt(A) B sqrt(A), which is symmetric: no scipy needed
    vals, vecs = torch.linalg.eigh(cov_a)
    root_a = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * cross)


# ----------------------------------------------------------------------------------------------------------
# The run

class Run:
    """What a training run holds: model, optimizer, EMA, data position, history. Checkpoints see one object."""

    def __init__(self, cfg, d):
        self.cfg, self.d = cfg, d
        self.sig, self.dir = config_signature(cfg), run_dir(cfg)
        self.fsdp = cfg.parallel == "fsdp" and d.world_size > 1
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.codec = codec_lib.load_codec(cfg.codec).to(d.device)
        if (self.codec.n_q, self.codec.card) != (cfg.n_q, cfg.card):
            raise UserError(f"codec {cfg.codec} has n_q={self.codec.n_q}, card={self.codec.card} but the config "
                            f"says n_q={cfg.n_q}, card={cfg.card}: set them to match")
        lm_cfg = lm_lib.LMConfig(**{f.name: getattr(cfg, f.name) for f in fields(lm_lib.LMConfig) if f.name in FIELDS})
        conditioner = text.build_conditioner(
            cfg.conditioner, cfg.dim, t5_path=cfg.t5_path, t5_dtype=cfg.t5_dtype, word_dropout=cfg.word_dropout,
            text_max_length=cfg.text_max_length, lut_tokenizer=cfg.lut_tokenizer, lut_dim=cfg.lut_dim,
            lut_layers=cfg.lut_layers)
        self.lm_cfg = lm_cfg
        self.model = lm_lib.MusicGenLM(lm_cfg, conditioner).to(d.device)
        self.step_fn = TrainStep(self.model)
        self.frames = int(round(cfg.segment_duration * self.codec.frame_rate))
        self.micro_batch = cfg.batch_size // d.world_size // cfg.grad_accum
        self.total_updates = cfg.epochs * cfg.updates_per_epoch
        self.dtype = getattr(torch, cfg.dtype)
        # FSDP casts parameters itself (bf16 compute, fp32 reduction); elsewhere autocast does.
        self.autocast = cfg.dtype != "float32" and not self.fsdp
        self.scaler = torch.amp.GradScaler(d.device.type) if cfg.dtype == "float16" and not self.fsdp else None
        self.train_step = self._parallelize()
        self.optimizer = self._optimizer()
        self.ema = EMA(self.model, cfg.ema_decay) if cfg.ema else None
        self.best_state, self.best_ce = None, float("inf")
        self.epoch, self.step, self.step_in_epoch, self.data_position = 1, 0, 0, 0
        self.history, self.nonfinite_in_row, self.nonfinite_total = [], 0, 0
        self.stop_signal = None
        self.splits = None

    def _parallelize(self):
        cfg, d, model = self.cfg, self.d, self.model
        if cfg.compile:
            for layer in model.transformer.layers:
                layer.compile()  # in place: state-dict keys keep their names, no `_orig_mod.` in checkpoints
        if d.world_size == 1:
            return self.step_fn
        if self.fsdp:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
            mp = MixedPrecisionPolicy(param_dtype=self.dtype, reduce_dtype=torch.float32)
            for layer in model.transformer.layers:
                fully_shard(layer, mp_policy=mp)
            fully_shard(self.step_fn, mp_policy=mp)  # the root is what the loop calls, so its hooks run
            return self.step_fn
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(self.step_fn, device_ids=[d.device.index] if d.device.type == "cuda" else None)

    def _optimizer(self):
        cfg = self.cfg
        params = [p for p in self.model.parameters() if p.requires_grad]
        if cfg.decay_matrices_only:
            groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                      {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        else:
            groups = [{"params": params, "weight_decay": cfg.weight_decay}]
        # fused on CPU too: the default foreach AdamW was 6x slower there (BENCHMARKS.md); FSDP's DTensors keep foreach
        fused = True if self.d.device.type in ("cuda", "cpu") and not self.fsdp else None
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)

    # -- logging and the run directory
    def log(self, msg, echo=True):
        if self.d.main:
            if echo:
                print(msg, flush=True)
            with open(self.dir / "log.txt", "a") as f:
                f.write(msg + "\n")

    def set_status(self, word):
        """The status file: running (with this process and host, so that env.run_status can tell a killed run),
        done, failed or preempted."""
        if self.d.main:
            owner = f"{os.getpid()} {socket.gethostname()}\n" if word == "running" else ""
            (self.dir / "status").write_text(f"{word}\n{owner}")

    def header(self):
        commit, dirty = env.git_commit()
        e = env.get_env()
        dev = torch.cuda.get_device_name(self.d.device) if self.d.device.type == "cuda" else self.d.device.type
        n = sum(p.numel() for p in self.model.parameters())
        self.log(f"nanomusicgen run {self.sig} at {self.dir}")
        self.log(f"commit {commit or '-'}{' (dirty)' if dirty else ''} | team {e.team} | cluster {e.cluster} | "
                 f"{self.d.world_size} x {dev} | torch {torch.__version__}")
        self.log(f"model {n / 1e6:.2f}M parameters | codec {self.cfg.codec} ({self.codec.n_q}x{self.codec.card}, "
                 f"{self.codec.frame_rate:g} frames/s) | segment {self.frames} frames | batch {self.cfg.batch_size} "
                 f"= {self.d.world_size} x {self.cfg.grad_accum} x {self.micro_batch}")
        self.log("config: " + json.dumps(config_delta(self.cfg), sort_keys=True))

    # -- checkpoints
    def state_dict(self):
        """Every rank calls this (FSDP gathers shards collectively); only rank 0's copy is written. Model and
        optimizer tensors are full, so FSDP and single-process checkpoints are interchangeable."""
        optim = self.optimizer.state_dict()
        optim = {"state": {i: full_state(st) for i, st in optim["state"].items()}, "param_groups": optim["param_groups"]}
        model_state = full_state(self.model.state_dict())
        rngs = [rng_state()]
        if self.d.world_size > 1:  # all_gather_object cannot carry tensors in torch 2.13: send bytes
            wire = [None] * self.d.world_size
            dist.all_gather_object(wire, _tensors_as_bytes(rngs[0]))
            rngs = [_bytes_as_tensors(r) for r in wire]
        return {"model": model_state, "optimizer": optim, "scheduler": {"step": self.step},
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "ema": {"state": full_state(self.ema.state), "count": self.ema.count} if self.ema else None,
                "best_state": self.best_state, "best_ce": self.best_ce, "epoch": self.epoch, "step": self.step,
                "step_in_epoch": self.step_in_epoch, "data": {"position": self.data_position},
                "history": self.history, "nonfinite_total": self.nonfinite_total, "config": config_dict(self.cfg),
                "rng": rngs}

    def load_state_dict(self, ckpt):
        copy_into(self.model.state_dict(), ckpt["model"])
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        state = {}
        for i, st in ckpt["optimizer"]["state"].items():
            shard = {k: v for k, v in st.items()}
            p = params[int(i)]
            if hasattr(p, "device_mesh"):  # FSDP: each rank keeps its shard of the moments
                from torch.distributed.tensor import distribute_tensor
                shard = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements) if v.shape == p.shape else v
                         for k, v in st.items()}
            state[i] = shard
        self.optimizer.load_state_dict({"state": state, "param_groups": ckpt["optimizer"]["param_groups"]})
        if self.scaler and ckpt["scaler"]:
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema and ckpt["ema"]:
            copy_into(self.ema.state, ckpt["ema"]["state"])
            self.ema.count = ckpt["ema"]["count"]
        self.best_state, self.best_ce = ckpt["best_state"], ckpt["best_ce"]
        self.epoch, self.step, self.step_in_epoch = ckpt["epoch"], ckpt["step"], ckpt["step_in_epoch"]
        self.data_position, self.history = ckpt["data"]["position"], ckpt["history"]
        self.nonfinite_total = ckpt["nonfinite_total"]
        if len(ckpt["rng"]) == self.d.world_size:
            set_rng_state(ckpt["rng"][self.d.rank])
        else:
            self.log(f"warning: checkpoint from {len(ckpt['rng'])} processes resumed on {self.d.world_size}: "
                     f"random streams reseeded, so this run no longer replays exactly")

    def save(self, keep=False):
        state = self.state_dict()
        if not self.d.main:
            return
        path = self.dir / "checkpoint.pt"
        save_atomic(state, path)
        history = "".join(json.dumps(row) + "\n" for row in self.history).encode()
        write_run_file(self.dir / "history.jsonl", lambda f: f.write(history))  # rewritten whole: no duplicate rows
        if keep:  # a real copy, not a link: damage to checkpoint.pt must leave the kept one readable
            with open(path, "rb") as src:
                write_run_file(self.dir / f"checkpoint_{self.epoch - 1}.pt", lambda f: shutil.copyfileobj(src, f))

    def resume(self):
        """Load checkpoint.pt, falling back to the newest kept checkpoint when it is unreadable."""
        kept = sorted(self.dir.glob("checkpoint_*.pt"), key=lambda p: int(p.stem.split("_")[1]), reverse=True)
        candidates = [p for p in [self.dir / "checkpoint.pt"] if p.exists()] + kept
        for i, path in enumerate(candidates):
            try:
                self.load_state_dict(load_checkpoint(path))
            except (UserError, KeyError, RuntimeError, ValueError, TypeError) as e:
                reason = (str(e).splitlines() or [type(e).__name__])[0][:300].removeprefix(f"{path}: ")
                if i + 1 == len(candidates):
                    raise UserError(f"{path}: cannot resume from it ({reason}); move it away or run with "
                                    f"--clear=True to start afresh") from None
                self.log(f"warning: {path} is unreadable ({reason}); falling back to {candidates[i + 1]}")
                continue
            self.log(f"resumed from {path.name}: epoch {self.epoch}, update {self.step}")
            for row in self.history:
                self.log(format_row(row))
            return True
        return False

    def continue_from(self):
        """Weights only, from an AudioCraft state_dict.bin, one of our checkpoints, or another run (by SIG)."""
        source = self.cfg.continue_from
        if len(source) == 8 and all(c in "0123456789abcdef" for c in source) and not Path(source).exists():
            path = env.run_dir(source, self.cfg.runs_dir or None) / "checkpoint.pt"
        else:
            path = env.resolve_path(source)
        if path.is_dir():
            path = next((path / n for n in ("checkpoint.pt", "state_dict.bin") if (path / n).is_file()), path / "state_dict.bin")
        if not path.is_file():
            raise UserError(f"continue_from={source}: {path} not found")
        pkg = load_checkpoint(path, trust=self.cfg.trust_checkpoint,
                              hint="; AudioCraft's training checkpoint.th pickles its config: if you trust this file, "
                                   "add --trust_checkpoint=True (or use its exported state_dict.bin)")
        pkg = pkg if isinstance(pkg, dict) else {}
        state = pkg.get("fsdp_best_state") or pkg.get("best_state") or pkg.get("model")
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]  # AudioCraft training checkpoints nest the LM as best_state.model
        if not isinstance(state, dict):
            raise UserError(f"continue_from={source}: {path} holds neither `best_state` nor `model`")
        lm_lib.check_state_dict(self.model, state, str(path))
        copy_into(self.model.state_dict(), state)
        if self.ema:
            self.ema = EMA(self.model, self.cfg.ema_decay)
        self.log(f"continuing from the weights in {path} (fresh optimizer and schedule)")

    # -- swapping weights for evaluation
    @contextlib.contextmanager
    def swapped(self, state):
        """The model holds `state` (EMA or best weights) inside the block, its own weights again after."""
        if state is None:
            yield
            return
        live = self.model.state_dict()
        backup = {k: live[k].detach().clone() for k in state}
        copy_into({k: live[k] for k in state}, state)
        try:
            yield
        finally:
            copy_into({k: live[k] for k in state}, backup)

    def eval_state(self):
        """Weights for generate/evaluate: the best state when there is one, else the EMA, else the live ones."""
        if self.best_state is not None:
            return self.best_state
        return self.ema.state if self.ema else None

    # -- stages
    @torch.no_grad()
    def codes(self, batch):
        """[B, K, T] codes of a batch: from the token cache, or raw audio encoded here by the frozen codec (float32,
        outside autocast, as AudioCraft encodes)."""
        if "codes" in batch:
            return batch["codes"].to(self.d.device, non_blocking=True)
        return self.codec.encode(batch["wav"].to(self.d.device, non_blocking=True))

    def loss(self, batch, train):
        """(ce, ce_per_q, real frames) of one batch."""
        device = self.d.device
        codes = self.codes(batch)
        valid = batch["valid"].to(device, non_blocking=True)
        if self.cfg.train_on_padding:
            valid = torch.ones_like(valid)
        with torch.autocast(device.type, dtype=self.dtype, enabled=self.autocast):
            step = self.train_step if train else self.step_fn
            ce, ce_q = step(codes, list(batch["descriptions"]), valid, train)
        return ce, ce_q, valid.sum()

    def train_epoch(self, batches):
        cfg, d = self.cfg, self.d
        self.model.train()
        sums = torch.zeros(2 + cfg.n_q, device=d.device)  # ce, grad norm, ce per codebook, summed over updates
        counted, skipped, t_data, t_start = 0, 0, 0.0, time.time()
        bad_reads = self.splits["train"].stats()["skipped"]  # this process and its loader workers, cumulative
        t_log, frames_log = time.time(), 0.0
        peak = lm_lib.peak_flops(d.device)
        while self.step_in_epoch < cfg.updates_per_epoch:
            lr = lr_at(cfg, self.step, self.total_updates)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            ce_total, ce_q_total, frames = 0.0, 0.0, 0.0
            for micro in range(cfg.grad_accum):
                t0 = time.time()
                batch = next(batches)
                self.data_position += 1
                t_data += time.time() - t0
                last = micro == cfg.grad_accum - 1
                sync = self.train_step.no_sync() if (d.world_size > 1 and not self.fsdp and not last) else contextlib.nullcontext()
                with sync:
                    ce, ce_q, n = self.loss(batch, train=True)
                    loss = ce / cfg.grad_accum
                    (self.scaler.scale(loss) if self.scaler else loss).backward()
                ce_total, ce_q_total, frames = ce_total + ce.detach() / cfg.grad_accum, ce_q_total + ce_q.detach() / cfg.grad_accum, frames + n
            if self.scaler:
                self.scaler.unscale_(self.optimizer)
            grad = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_norm if cfg.max_norm > 0 else float("inf"))
            grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
            # One collective and one host sync per update: the loss across ranks, real frames, and the stop flag.
            ce_sum, frames_sum, stop = all_sum(d, [float(ce_total), float(frames), 1.0 if self.stop_signal else 0.0])
            finite = math.isfinite(ce_sum) and math.isfinite(float(grad))
            if finite or self.scaler:  # the fp16 scaler skips non-finite steps itself and lowers its scale
                (self.scaler.step(self.optimizer), self.scaler.update()) if self.scaler else self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self.step_in_epoch += 1
            if finite:
                self.nonfinite_in_row = 0
                sums += torch.cat([torch.stack([ce_total.float(), grad.float()]), ce_q_total.float()])
                counted += 1
            else:
                self.nonfinite_in_row += 1
                self.nonfinite_total += 1
                skipped += 1
                self.log(f"warning: update {self.step}: non-finite loss or gradient (ce {ce_sum / d.world_size:.4g}, "
                         f"grad {float(grad):.4g}); skipped ({self.nonfinite_in_row} in a row)")
                if self.nonfinite_in_row >= cfg.max_nonfinite:
                    raise Diverged(f"{self.nonfinite_in_row} non-finite updates in a row (max_nonfinite="
                                   f"{cfg.max_nonfinite}); the last good checkpoint is {self.dir / 'checkpoint.pt'}")
            if self.ema and self.step_in_epoch % cfg.ema_every == 0:
                self.ema.update(self.model)
            frames_log += frames_sum
            if self.step_in_epoch % cfg.log_every == 0 or self.step_in_epoch == cfg.updates_per_epoch:
                dt = time.time() - t_log
                fps = frames_log / dt
                flops = lm_lib.flops_per_token(self.lm_cfg, self.frames + 1, self.step_fn.cond_len) if peak else 0
                mfu = f" | mfu {100 * flops * fps / (peak * d.world_size):.1f}%" if peak else ""
                mem = f" | mem {torch.cuda.max_memory_allocated(d.device) / 2**30:.1f}G" if d.device.type == "cuda" else ""
                ce_now = ce_sum / d.world_size
                self.log(f"epoch {self.epoch} step {self.step_in_epoch}/{cfg.updates_per_epoch} | ce {ce_now:.3f} | "
                         f"ppl {math.exp(min(ce_now, 50)):.1f} | lr {lr:.1e} | grad {float(grad):.2f} | "
                         f"frames/s {_si(fps)}{mfu}{mem} | data {100 * t_data / max(1e-9, time.time() - t_start):.1f}%")
                t_log, frames_log = time.time(), 0.0
            if stop:
                return False
        bad_reads = self.splits["train"].stats()["skipped"] - bad_reads
        *totals, bad_reads = all_sum(d, (sums / max(counted, 1)).tolist() + [bad_reads])
        ce = totals[0] / d.world_size
        row = {"epoch": self.epoch, "stage": "train", "ce": ce, "ppl": math.exp(min(ce, 50)), "grad": totals[1] / d.world_size,
               "skipped": skipped, "bad_reads": int(bad_reads), **{f"ce_q{k + 1}": v / d.world_size for k, v in enumerate(totals[2:])}}
        self.history.append(row)
        self.log(format_row(row))
        return True

    @torch.no_grad()
    def evaluate_ce(self, split, stage):
        """ce, ppl and per-codebook ce over a split (strided across ranks), with and without the text."""
        cfg, d = self.cfg, self.d
        self.model.eval()
        sums, count = torch.zeros(2 + cfg.n_q, dtype=torch.float64), 0
        # Under FSDP every rank must run the same forward passes, so each evaluates the whole split.
        rank, world = (0, 1) if self.fsdp else (d.rank, d.world_size)
        batches = data.make_loader(self.splits[split], self.micro_batch, rank=rank, world_size=world,
                                   num_workers=0, train=False)
        for i, batch in enumerate(batches):
            if stage == "valid" and cfg.valid_batches and i >= cfg.valid_batches:
                break
            n = len(batch["descriptions"])
            ce, ce_q, _ = self.loss(batch, train=False)
            ce_u, _, _ = self.loss(dict(batch, descriptions=[None] * n), train=False)
            sums += torch.cat([torch.stack([ce, ce_u]), ce_q]).double().cpu() * n
            count += n
        totals = sums.tolist() + [count] if self.fsdp else all_sum(d, sums.tolist() + [count])
        count = max(totals[-1], 1)
        ce = totals[0] / count
        self.model.train()
        return {"epoch": self.epoch, "stage": stage, "ce": ce, "ppl": math.exp(min(ce, 50)),
                "ce_uncond": totals[1] / count, **{f"ce_q{k + 1}": v / count for k, v in enumerate(totals[2:-1])}}


    @torch.no_grad()
    def sample(self, descriptions, n_frames, seed, prompt=None):
        """Codes [B, K, n_frames] for descriptions (None: unconditional), with the sampling settings of the config."""
        cfg = self.cfg
        self.model.eval()
        if self.fsdp:  # the decode loop calls the LM directly, not the FSDP root's forward
            self.step_fn.unshard()
        with torch.autocast(self.d.device.type, dtype=self.dtype, enabled=self.autocast):
            condition, mask = self.model.condition_provider.conditioners.description(list(descriptions))
            gen = torch.Generator(self.d.device).manual_seed(seed)
            codes = self.model.generate(condition, mask, n_frames, cfg_coef=cfg.cfg_coef, temperature=cfg.temperature,
                                        top_k=cfg.top_k, top_p=cfg.top_p, prompt=prompt, generator=gen)
        if self.fsdp:
            self.step_fn.reshard()
        self.model.train()
        return codes

    def generate_stage(self):
        """Samples for the generate split's descriptions and their unconditional twins, decoded to wav."""
        cfg = self.cfg
        if not (self.d.main or self.fsdp):  # under FSDP every rank takes part in the forward passes
            return
        split = self.splits["generate"]
        descriptions = [split[i]["description"] for i in range(min(cfg.generate_count, len(split)))]
        n_frames = max(1, int(round(cfg.generate_duration * self.codec.frame_rate)))
        t0 = time.time()
        with self.swapped(self.eval_state()):
            codes = self.sample(descriptions, n_frames, seed=cfg.seed + self.epoch)
            uncond = self.sample([None] * len(descriptions), n_frames, seed=cfg.seed + self.epoch)
        if not self.d.main:
            return
        out = self.dir / "samples" / str(self.epoch)
        out.mkdir(parents=True, exist_ok=True)
        settings = {k: getattr(cfg, k) for k in ("cfg_coef", "top_k", "top_p", "temperature", "generate_duration")}
        for name, batch, texts in (("", codes, descriptions), ("_uncond", uncond, [None] * len(descriptions))):
            wav = self.codec.decode(batch).float().cpu()
            for i, description in enumerate(texts):
                path = out / f"{i:03d}{name}.wav"
                data.save_audio(path, wav[i], self.codec.sample_rate)
                meta = {"description": description, "epoch": self.epoch, "seed": cfg.seed + self.epoch,
                        "weights": "best" if self.best_state is not None else "ema", **settings}
                path.with_suffix(".json").write_text(json.dumps(meta, indent=1))
        self.history.append({"epoch": self.epoch, "stage": "generate", "samples": 2 * len(descriptions),
                             "seconds": time.time() - t0})
        self.log(f"epoch {self.epoch:>3} generate | {2 * len(descriptions)} samples in {out} "
                 f"({time.time() - t0:.1f}s)")

    def evaluate_stage(self):
        """ce/ppl on the evaluate split and a Fréchet distance between codec embeddings of generated and
        reference segments for the same descriptions (no extra model needed)."""
        cfg = self.cfg
        with self.swapped(self.eval_state()):
            row = self.evaluate_ce("evaluate", "evaluate")
            if self.d.main or self.fsdp:
                split = self.splits["evaluate"]
                n = min(len(split), max(cfg.generate_count, 8))
                items = [split[i] for i in range(n)]
                reference = [self.codes({k: it[k][None] for k in ("codes", "wav") if k in it})[0] for it in items]
                frames = min(c.shape[-1] for c in reference)
                reference = torch.stack([c[..., :frames] for c in reference]).to(self.d.device)
                generated = self.sample([it["description"] for it in items], frames, seed=cfg.seed)
                row["fd"] = frechet_distance(self._embed(generated), self._embed(reference))
        self.history.append(row)
        self.log(format_row(row))

    @torch.no_grad()
    def _embed(self, codes):
        """Per-frame codec embeddings [B*T, D]: the quantized latents the decoder starts from."""
        latents = self.codec.decode_latent(codes)  # [B, D, T]
        return latents.transpose(1, 2).reshape(-1, latents.shape[1]).float().cpu()

    def fit(self):
        cfg, d = self.cfg, self.d
        batches = iter(data.make_loader(self.splits["train"], self.micro_batch, rank=d.rank, world_size=d.world_size,
                                        start=self.data_position, num_workers=cfg.num_workers,
                                        pin_memory=d.device.type == "cuda", train=True))
        while self.epoch <= cfg.epochs:
            if not self.train_epoch(batches):
                self.save()
                self.log(f"stopped by signal {self.stop_signal} at update {self.step}: checkpoint written, "
                         f"exit {EXIT_REQUEUE} asks for a requeue")
                return EXIT_REQUEUE
            with self.swapped(self.ema.state if self.ema else None):
                row = self.evaluate_ce("valid", "valid")
                if row["ce"] < self.best_ce:
                    self.best_ce = row["ce"]
                    self.best_state = full_state({k: v for k, v in self.model.state_dict().items() if v.is_floating_point()})
            self.history.append(row)
            self.log(format_row(row))
            last = self.epoch == cfg.epochs
            if cfg.generate_every and (self.epoch % cfg.generate_every == 0 or last):
                self.generate_stage()
            if cfg.evaluate_every and (self.epoch % cfg.evaluate_every == 0 or last):
                self.evaluate_stage()
            self.epoch += 1
            self.step_in_epoch = 0
            self.save(keep=(self.epoch - 1) % cfg.save_every == 0)
        return 0


class Diverged(Exception):
    """Too many non-finite updates in a row: stop with the last good checkpoint intact."""


def _si(x):
    return f"{x / 1e6:.1f}M" if x >= 1e6 else f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"




# ----------------------------------------------------------------------------------------------------------
# Entry point

def train(cfg):
    d = setup_distributed(cfg)
    code = 1
    try:
        code = _train(cfg, d)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except BaseException:
        if d.world_size == 1:
            raise
        import traceback
        traceback.print_exc()  # os._exit below would otherwise swallow it
        print(f"error: rank {d.rank} failed", file=sys.stderr)
    finally:
        if d.world_size > 1:  # gloo aborts at interpreter exit in some runs (ENVIRONMENT.md): leave by os._exit
            if code in (0, EXIT_REQUEUE) and dist.is_initialized():
                dist.barrier()
            dist.destroy_process_group()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return code


def _train(cfg, d):
    validate(cfg, d.world_size)
    path = run_dir(cfg)
    run = Run(cfg, d)  # loads the codec and text model first: bad paths fail before anything is written
    for signum in (signal.SIGTERM, signal.SIGUSR1):  # before the data: a first tokenization can take long
        signal.signal(signum, lambda s, _: setattr(run, "stop_signal", signal.Signals(s).name))
    if not cfg.clear and finished_epochs(path / "checkpoint.pt") >= cfg.epochs:  # before the data: nothing to do
        run.log(f"run {run.sig} already finished {cfg.epochs} epochs")
        run.set_status("done")
        return 0
    state = rng_state()
    run.splits = open_splits(cfg, run.codec, d)  # likewise a bad dataset or manifest
    set_rng_state(state)  # building a cache may draw random numbers; a run must not depend on whether it did
    if d.main:
        if cfg.clear and path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        commit, dirty = env.git_commit()
        env.remove_stale_temporaries(path)
        text = json.dumps({**config_dict(cfg), "signature": run.sig, "git_commit": commit, "git_dirty": dirty},
                          indent=1)
        write_run_file(path / "config.json", lambda f: f.write(text.encode()))
    barrier(d)
    run.header()
    if not run.resume() and cfg.continue_from:
        run.continue_from()
    if run.epoch > cfg.epochs:
        run.log(f"run {run.sig} already finished {cfg.epochs} epochs")
        run.set_status("done")
        return 0
    run.set_status("running")
    try:
        code = run.fit()
    except Diverged as e:
        run.log(f"error: {e}")
        run.set_status("failed")
        return 1
    except BaseException as e:  # the terminal gets the error from train(); log.txt must tell the same story
        if not isinstance(e, (KeyboardInterrupt, SystemExit)):
            with contextlib.suppress(OSError):  # a full disk must not hide the error itself
                run.log(f"error: {e}" if isinstance(e, UserError) else f"error: {type(e).__name__}: {e} (traceback on "
                        f"stderr)", echo=False)
        run.set_status("failed")
        raise
    run.set_status("done" if code == 0 else "preempted")
    if code == 0:
        run.log(f"done: {cfg.epochs} epochs, best valid ce {run.best_ce:.4f}")
    return code


def open_splits(cfg, codec, d):
    """The four splits; the main process builds the demo set and token caches first, the others open them."""
    dataset, runs = cfg.dataset, Path(cfg.runs_dir or env.get_env().runs_dir)
    if dataset == "demo":
        dataset = str(runs / "data" / "demo")
        if d.main:
            demo.make_demo_set(dataset, seed=0)
    common = dict(codec=codec, segment_duration=cfg.segment_duration, seed=cfg.seed, token_cache=cfg.token_cache,
                  cache_dir=cfg.cache_dir or str(runs / "cache"), min_segment_ratio=cfg.min_segment_ratio,
                  sample_on_weight=cfg.sample_on_weight, sample_on_duration=cfg.sample_on_duration,
                  merge_text_p=cfg.merge_text_p, drop_desc_p=cfg.drop_desc_p, keep_field_p=cfg.keep_field_p,
                  max_skip_fraction=cfg.max_skip_fraction)
    splits = {}
    for turn in ([True, False] if d.world_size > 1 else [d.main]):
        if d.main == turn:
            splits = {s: data.open_split(dataset, s, train=s == "train", **common)
                      for s in ("train", "valid", "evaluate", "generate")}
        barrier(d)
    return splits


def config_help():
    """The usage lines, then every key with its default and its comment, by section, read from Config's source
    (the one place they are written); infrastructure keys (outside the signature) are marked."""
    import inspect
    lines = [__doc__.strip(), "", "Keys (--key=value; * = infrastructure, not part of the signature):"]
    for line in inspect.getsource(Config).splitlines()[2:]:
        section = re.fullmatch(r"\s+# (.+)", line)
        field_ = re.fullmatch(r"\s+(\w+): [\w.]+ = (.+?)(?:\s+# (.*))?", line)
        if section:
            lines.append(f"  {section[1]}")
        elif field_:
            key, default, note = field_[1], field_[2], field_[3] or ""
            mark = "*" if key in INFRA_KEYS else " "
            lines.append((f"   {mark}--{key}={default}".ljust(40) + f" {note}").rstrip())
    return "\n".join(lines)


def main(argv):
    cfg = parse_args(argv)
    if cfg.print_config:
        print_config(cfg)
        return 0
    return train(cfg)


if __name__ == "__main__":
    env.cli(main, help=config_help)
