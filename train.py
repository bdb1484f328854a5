"""Train a MusicGen-style LM: the config, then one loop with its stages, checkpoints and resume.

    python train.py config/debug.py                                   # tiny model, synthetic data, CPU
    python train.py config/base.py --batch_size=32 --lr=3e-4          # files apply left to right, then --key=value
    python train.py config/base.py --print_config=True                # resolved config, signature, run dir
    torchrun --nproc_per_node=8 train.py config/base.py               # one node (DDP; --parallel=fsdp shards)
    srun --ntasks-per-node=8 python train.py config/base.py           # SLURM without torchrun (see grids/)

The run directory is <runs_dir>/xps/<signature>/: running the same config again resumes it. Read train() from
top to bottom: setup, then for each epoch the updates (lr, micro-steps, clip, step, EMA, log), valid on the EMA
weights, a checkpoint, and the generate/evaluate stages when due.
"""
import contextlib
import copy
import dataclasses
import datetime
import json
import math
import os
import random
import re
import shutil
import socket
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import adapters
import data
import demo
import env
import formats
import loggers
import melody
import metrics
import model as lm_lib
import quantize
from env import EXIT_REQUEUE, UserError


@dataclass
class Config:
    # run
    seed: int = 2036                  # model init, data sampling, dropout; a run replays exactly from it
    runs_dir: str = ""                # empty: the team's dora_dir
    clear: bool = False               # wipe the run directory first (refused while another process runs it)
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
    sample_on_weight: bool = False    # draw files by their manifest weight (AudioCraft's MusicGen: uniform)
    sample_on_duration: bool = False  # draw files in proportion to their duration (AudioCraft's MusicGen: uniform)
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
    delays: tuple[int, ...] = ()      # empty: 0..n_q-1
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
    lut_tokenizer: str = "bytes"      # bytes | words:N | <sentencepiece .model> | tiktoken:<bpe file>
    lut_dim: int = 256
    lut_layers: int = 0
    cfg_dropout: float = 0.3          # drop the whole description with this probability (classifier-free guidance)
    cfg_dropout_per_batch: bool = False   # AudioCraft: one coin for the whole batch
    attributes: tuple[str, ...] = ()  # more text conditions from the sidecars: NAME or NAME:FUSE (genre, moods:prepend)
    chroma_fuse: str = ""             # the melody (chroma) condition self_wav: "" none | prepend | cross (melody.py)
    chroma_stems: str = ""            # Demucs weights that remove drums and bass before the chroma; "": the full mix
    attribute_dropout: tuple[str, ...] = ()   # NAME:P drops condition NAME with probability P, e.g. self_wav:0.5
    attribute_dropout_per_batch: bool = False   # AudioCraft: one coin per attribute for the whole batch
    # fine-tuning: low-rank adapters (adapters.py) on a base from continue_from
    lora_rank: int = 0                # adapters of this rank on lora_targets; 0: every weight trains
    lora_alpha: float = 16.0          # the adapters' update is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0         # dropout on the adapters' inputs
    lora_targets: tuple[str, ...] = ("in_proj", "out_proj")   # of in_proj, out_proj, ffn, heads, emb, cond
    freeze_base: bool = True          # with adapters: only they (and train_also) train
    train_also: tuple[str, ...] = ()  # with adapters: parameters whose names contain one of these train too (linears)
    # optimisation
    epochs: int = 500                 # each epoch: updates_per_epoch updates, then valid
    updates_per_epoch: int = 2000
    batch_size: int = 192             # global, split across ranks
    grad_accum: int = 1               # micro-steps per update (same global batch)
    lr: float = 1e-4                  # peak learning rate (AdamW)
    betas: tuple[float, ...] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_matrices_only: bool = False  # AudioCraft decays every parameter
    lr_schedule: str = "cosine"       # cosine | linear | constant
    warmup: int = 4000                # updates of linear warmup
    lr_min_ratio: float = 0.0         # the schedule's floor, as a fraction of lr
    max_norm: float = 1.0             # gradient clipping; 0: off
    ema: bool = True                  # a moving average of the weights, used by valid, generate and evaluate
    ema_decay: float = 0.99
    ema_every: int = 10               # updates between EMA updates (counted over the whole run)
    ema_device: str = ""              # empty: the training device; cpu: the host (frees device memory, never stalls)
    train_on_padding: bool = False    # AudioCraft trains on padded frames; we mask them by default
    max_nonfinite: int = 10           # abort after this many non-finite updates in a row (each is skipped)
    # precision and speed
    dtype: str = "bfloat16"           # autocast dtype: bfloat16 | float16 (with a gradient scaler) | float32
    compile: bool = False             # torch.compile each transformer layer (training; eval and sampling run eager)
    checkpointing: bool = False       # recompute each layer's activations in the backward (less memory, 1/3 more work)
    device: str = ""                  # empty: cuda (the local rank's GPU), then mps, then cpu
    parallel: str = "ddp"             # ddp | fsdp (same numerics: fp32 weights, autocast)
    # stages
    valid_batches: int = 0            # batches per rank in the valid stage; 0: the whole valid split
    generate_every: int = 25          # epochs between generate stages (and the last epoch); 0: never
    generate_duration: float = 10.0   # seconds per sample in the generate stage
    generate_count: int = 4           # samples per generate stage (from the generate split's descriptions)
    evaluate_every: int = 25          # likewise for evaluate; 0: never
    save_every: int = 50              # keep a copy checkpoint_<epoch>.pt every this many epochs; 0: none
    keep_last: int = 0                # keep only the newest this many copies; 0: all
    keep_weights_only: bool = False   # copies without optimizer state (small; checkpoint.pt stays complete)
    cfg_coef: float = 3.0             # classifier-free guidance coefficient for sampling
    top_k: int = 250                  # sample among the k most likely codes; 0: all
    top_p: float = 0.0                # nucleus sampling; wins over top_k when > 0
    temperature: float = 1.0          # 0: greedy
    quantize: str = ""                # int8 | int4: the generate and evaluate stages sample from a quantized copy
    evaluate_samples: int = 64        # evaluate-split items generated for fd and the metrics; 0: all
    metrics: tuple[str, ...] = ()     # evaluate stage: fad, kld, clap, chroma_cos (metrics.py; weights below)
    vggish_path: str = "//reference/fad/vggish-10086976.pth"   # fad: torchvggish's VGGish weights
    passt_path: str = "//reference/kld/passt-s-f128-20sec-p16-s10-ap.474-swa.pt"   # kld: PaSST tagger weights
    clap_path: str = "//reference/clap/larger_clap_music"      # clap: a Hugging Face CLAP directory
    # logging and distributed
    log_every: int = 10               # updates between log lines (and between checks for a stop signal)
    tensorboard: bool = False         # event files in <run dir>/tensorboard (pip install tensorboard)
    wandb: bool = False               # a Weights & Biases run whose id is the signature (pip install wandb)
    wandb_project: str = "nanomusicgen"
    wandb_entity: str = ""            # empty: your default entity
    wandb_group: str = ""             # e.g. a grid's name
    wandb_name: str = ""              # empty: the signature
    wandb_mode: str = "online"        # online | offline (wandb sync <run dir>/wandb/offline-run-* later)
    dist_timeout: int = 600           # seconds before a collective gives up (a dead rank must not hang the rest)


# Keys that change how a run executes, not what it computes: left out of the signature, so the same experiment
# on another machine, with other workers or compiled, lands in the same run directory.
INFRA_KEYS = {"runs_dir", "clear", "from_sig", "print_config", "num_workers", "device", "compile", "checkpointing",
              "parallel", "grad_accum", "log_every", "dist_timeout", "cache_dir", "generate_every", "evaluate_every",
              "save_every", "ema_device", "keep_last", "keep_weights_only", "trust_checkpoint", "evaluate_samples",
              "metrics", "quantize", "vggish_path", "passt_path",
              "clap_path", "tensorboard", "wandb", "wandb_project", "wandb_entity", "wandb_group", "wandb_name",
              "wandb_mode"}

FIELDS = {f.name: f for f in fields(Config)}
TYPES = env.option_types(Config)
CHOICES = {"pattern": lm_lib.PATTERNS, "fuse": lm_lib.FUSES, "conditioner": ("t5", "lut"),
           "dtype": ("bfloat16", "float16", "float32"), "lr_schedule": ("cosine", "linear", "constant"),
           "parallel": ("ddp", "fsdp"), "t5_dtype": ("float32", "bfloat16"), "ema_device": ("", "cpu"),
           "chroma_fuse": ("", *lm_lib.CHROMA_FUSES), "quantize": ("",) + quantize.MODES}
# Ranges every value must be in (inclusive; None: unbounded), checked when the config is parsed.
RANGES = {
    **{k: (1, None) for k in ("epochs", "updates_per_epoch", "batch_size", "grad_accum", "ema_every", "log_every",
                               "dim", "n_layers", "n_heads", "hidden_scale", "n_q", "card", "text_dim", "lut_dim",
                               "generate_count", "max_nonfinite", "dist_timeout")},
    **{k: (0, None) for k in ("warmup", "valid_batches", "num_workers", "save_every", "generate_every",
                               "evaluate_samples", "keep_last", "lora_rank", "lora_alpha",
                               "evaluate_every", "top_k", "lut_layers", "text_max_length", "lr", "eps",
                               "weight_decay", "max_norm", "temperature", "lr_min_ratio")},
    **{k: (0.0, 1.0) for k in ("cfg_dropout", "word_dropout", "merge_text_p", "drop_desc_p", "keep_field_p",
                               "ema_decay", "min_segment_ratio", "max_skip_fraction", "top_p", "lr_min_ratio")},
    "dropout": (0.0, 0.99), "lora_dropout": (0.0, 0.99), "seed": (0, 2 ** 32 - 1), "segment_duration": (0.01, 3600.0),
    "generate_duration": (0.01, 3600.0), "cfg_coef": (-100.0, 100.0),
}


# ----------------------------------------------------------------------------------------------------------
# Parsing: config files (plain Python) then --key=value (env.parse_config), then the checks

def parse_args(argv):
    """argv (without the program name) -> Config. Files first, left to right, then --key=value; --from_sig loads
    another run's config before both."""
    def from_sig(cfg, overrides):
        sigs = [v for k, v in overrides if k == "from_sig"]
        if sigs:  # the runs directory it lives in may itself be an override
            cfg.runs_dir = next((v for k, v in reversed(overrides) if k == "runs_dir"), cfg.runs_dir)
            load_run_config(cfg, sigs[-1])
    cfg = env.parse_config(Config, argv, before_files=from_sig)
    validate(cfg)
    return cfg


def load_run_config(cfg, sig):
    path = run_dir(cfg, sig) / "config.json"
    if not path.is_file():
        raise UserError(f"--from_sig={sig}: no run config at {path}")
    try:
        saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a readable run config ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(saved, dict):
        raise UserError(f"{path}: not a run config (expected a JSON object of keys)")
    for key, value in saved.items():
        if key in FIELDS and key not in INFRA_KEYS:
            setattr(cfg, key, env.coerce_key(TYPES, key, value, str(path)))


def world_size_from_env():
    return int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)


def validate(cfg, world_size=None):
    """Every key's choices and range, then the checks that span keys; each error names the keys and values."""
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise UserError(f'{key}="{getattr(cfg, key)}" is not one of {", ".join(allowed)}')
    for key, (lo, hi) in RANGES.items():
        value = getattr(cfg, key)
        if not (math.isfinite(value) and (lo is None or value >= lo) and (hi is None or value <= hi)):
            show = lambda v: f"{v:g}" if isinstance(v, float) else str(v)  # noqa: E731
            span = f"between {show(lo)} and {show(hi)}" if hi is not None else f"at least {show(lo)}"
            raise UserError(f"{key}={value} must be {span}")
    if len(cfg.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in cfg.betas):
        raise UserError(f"betas={list(cfg.betas)} must be two numbers in [0, 1), e.g. [0.9, 0.95]")
    world_size = world_size or world_size_from_env()
    if cfg.batch_size % world_size:
        raise UserError(f"batch_size={cfg.batch_size} does not divide across {world_size} processes "
                        f"(WORLD_SIZE={world_size}): use a multiple of {world_size}")
    local = cfg.batch_size // world_size
    if local % cfg.grad_accum:
        raise UserError(f"grad_accum={cfg.grad_accum} does not divide the per-process batch {local} "
                        f"(batch_size={cfg.batch_size} over {world_size} processes)")
    if cfg.dim % cfg.n_heads:
        raise UserError(f"dim={cfg.dim} is not a multiple of n_heads={cfg.n_heads}")
    if cfg.delays and len(cfg.delays) != cfg.n_q:
        raise UserError(f"delays={list(cfg.delays)} has {len(cfg.delays)} entries but n_q={cfg.n_q}")
    lm_lib.check_config(lm_config(cfg))
    data.check_attributes(cfg.attributes)
    if cfg.chroma_fuse and cfg.chroma_stems:
        melody.check_stems(cfg.chroma_stems)
    if cfg.metrics:
        metrics.parse_names(cfg.metrics)
    if cfg.lora_rank and (set(cfg.lora_targets) - set(adapters.TARGETS) or not cfg.lora_targets):
        raise UserError(f"lora_targets={list(cfg.lora_targets)}: choose from {', '.join(adapters.TARGETS)}")
    if cfg.quantize and cfg.parallel == "fsdp" and world_size > 1:
        raise UserError(f'quantize="{cfg.quantize}" with parallel="fsdp": a quantized copy needs the whole model on '
                        f'each rank; sample the run afterwards with `python generate.py --quantize={cfg.quantize}`')
    loggers.check(config_dict(cfg))


def config_delta(cfg):
    """The experiment's (key, value) differences from the defaults, infrastructure keys left out."""
    default = Config()
    return {k: list(v) if isinstance(v, tuple) else v for k in FIELDS
            if k not in INFRA_KEYS and (v := getattr(cfg, k)) != getattr(default, k)}


def config_signature(cfg):
    return env.signature(config_delta(cfg))


def run_dir(cfg, sig=None):
    return env.run_dir(sig or config_signature(cfg), cfg.runs_dir or None)


def config_dict(cfg):
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}


def lm_config(cfg):
    return lm_lib.lm_config(dataclasses.asdict(cfg))


def print_config(cfg):
    width = max(map(len, FIELDS))
    for key in FIELDS:
        print(f"{key:<{width}} = {getattr(cfg, key)!r}")
    print(f"signature: {config_signature(cfg)}")
    print(f"run dir:   {run_dir(cfg)}")


def config_help():
    """The usage lines, then every key with its default and its comment, by section, read from Config's source
    (the one place they are written); infrastructure keys (outside the signature) are marked."""
    import inspect
    lines = [__doc__.strip(), "", "Keys (--key=value; * = infrastructure, not part of the signature):"]
    for line in inspect.getsource(Config).splitlines()[2:]:
        section = re.fullmatch(r"\s+# (.+)", line)
        field_ = re.fullmatch(r"\s+(\w+): [\w.\[\], ]+? = (.+?)(?:\s+# (.*))?", line)
        if section:
            lines.append(f"  {section[1]}")
        elif field_:
            key, default, note = field_[1], field_[2], field_[3] or ""
            mark = "*" if key in INFRA_KEYS else " "
            lines.append((f"   {mark}--{key}={default}".ljust(40) + f" {note}").rstrip())
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Processes and devices

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


def process_env():
    """(rank, world size, local rank, processes on this node): torchrun's variables, srun's, or one process."""
    e = os.environ
    if "RANK" in e and "WORLD_SIZE" in e:
        world, local = int(e["WORLD_SIZE"]), int(e.get("LOCAL_RANK", 0))
        return int(e["RANK"]), world, local, int(e.get("LOCAL_WORLD_SIZE", world))
    if int(e.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in e:
        e.setdefault("MASTER_ADDR", first_slurm_host(e.get("SLURM_JOB_NODELIST", "127.0.0.1")))
        e.setdefault("MASTER_PORT", str(20000 + int(e.get("SLURM_JOB_ID", "0")) % 20000))
        per_node = int(e.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
        return int(e["SLURM_PROCID"]), int(e["SLURM_NTASKS"]), int(e.get("SLURM_LOCALID", 0)), per_node
    return 0, 1, 0, 1


def setup_distributed(cfg):
    """torchrun (RANK, LOCAL_RANK, WORLD_SIZE), srun without torchrun (SLURM_*), or one process."""
    rank, world, local, local_world = process_env()
    device = env.resolve_device(cfg.device, local, local_world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True   # float32 matmuls on tensor cores (nanoGPT does the same)
        torch.backends.cudnn.allow_tf32 = True
        if cfg.dtype == "bfloat16" and not torch.cuda.is_bf16_supported(including_emulation=False):
            raise UserError(f"dtype=bfloat16: {torch.cuda.get_device_name(device)} has no bfloat16 tensor cores; "
                            f"use --dtype=float16 (with a gradient scaler) or --dtype=float32")
    elif device.type == "cpu":
        env.keep_freed_memory()  # glibc would hand freed activations back and fault them in again every update
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=cfg.dist_timeout))
    return Dist(rank, local, world, device)


def all_sum(d, values):
    """Sum numbers (floats or 0-dim tensors on the device) across ranks in one collective; -> floats on the host.
    The one host sync of wherever it is called."""
    device = d.device if d.device.type == "cuda" else torch.device("cpu")
    t = torch.stack([v.detach().to(device, torch.float64) if torch.is_tensor(v) else
                     torch.tensor(float(v), dtype=torch.float64, device=device) for v in values])
    if d.world_size > 1:
        dist.all_reduce(t)
    return t.tolist()


def check_stop_everywhere(d):
    """Raise env.Stopped on every rank when any rank got a stop signal (collective: all ranks call it together)."""
    if all_sum(d, [float(env.stop_requested() is not None)])[0]:
        raise env.Stopped(env.stop_requested() or "a signal on another rank")


# ----------------------------------------------------------------------------------------------------------
# The model, its parallel form, the optimizer, the EMA

def build_model(cfg):
    """The LM with its text conditioner (AudioCraft's parameter names), seeded so every rank starts the same."""
    torch.manual_seed(cfg.seed)
    return lm_lib.build_lm(dataclasses.asdict(cfg))


class TrainStep(torch.nn.Module):
    """One micro-step's forward: CFG dropout, the conditioner, the loss. DDP and FSDP wrap a module whose forward
    does all the work, so that they see the conditioner's parameters and the LM's; this owns nothing."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        self.cond_len = 0

    def forward(self, codes, descriptions, valid, attributes=None):
        lm = self.lm
        if attributes:   # a model with several conditions: {name: per-row values} (data.collate's, chroma classes)
            values = {"description": descriptions, **attributes}
            conditions = lm.condition(lm.drop_conditions(values) if self.training else values)
            self.cond_len = sum(mask.shape[-1] for _, mask in conditions.values())
            return lm.compute_loss(codes, conditions, None, valid)
        if self.training:
            descriptions = lm.cfg_dropout(descriptions)
        condition, mask = lm.conditioner(descriptions)
        self.cond_len = mask.shape[-1]  # text positions in the last batch, for the MFU estimate
        return lm.compute_loss(codes, condition, mask, valid)


def _checkpointed(forward):
    """forward with its activations recomputed in the backward (torch's non-reentrant checkpointing); state-dict
    names stay as they are, unlike with a wrapper module."""
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run


def parallelize(step, cfg, d):
    """Adapters (and freezing) first, then torchtitan's order: activation checkpointing, per-block compile,
    fully_shard per block, then the root; or DDP around the step. The model knows nothing of it. -> the module the
    loop calls."""
    adapters.apply(step.lm, config_dict(cfg))
    layers = step.lm.transformer.layers
    for layer in layers:
        if cfg.checkpointing:
            layer.forward = _checkpointed(layer.forward)
        if cfg.compile:
            layer.compile()   # in place: state-dict keys keep their names, no `_orig_mod.` in checkpoints
    if d.world_size == 1:
        return step
    if cfg.parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        # fp32 weights gathered and the same autocast as DDP: a run may switch between the two (parallel is not
        # part of the signature) and computes the same thing; gradients reduced in fp32
        mp = MixedPrecisionPolicy(reduce_dtype=torch.float32)
        for layer in layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(step, mp_policy=mp)  # the root is what the loop calls, so its hooks run
        return step
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(step, device_ids=[d.device.index] if d.device.type == "cuda" else None)


def leave_distributed(d, code):
    """End a process of several (train.py, train_codec.py, evaluate.py): wait for the others when all went well, then
    leave by os._exit, because gloo aborts at interpreter exit in some runs (ENVIRONMENT.md). One process: return."""
    if d.world_size > 1:
        if code in (0, EXIT_REQUEUE) and dist.is_initialized():
            dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def trainable(lm):
    """{name: parameter} of what trains: what the optimizer, the EMA and the best state hold."""
    return {k: p for k, p in lm.named_parameters() if p.requires_grad}


def make_optimizer(lm, cfg):
    params = list(trainable(lm).values())
    if cfg.decay_matrices_only:
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    else:
        groups = [{"params": params, "weight_decay": cfg.weight_decay}]
    # fused: one kernel, on CPU too (the default foreach AdamW was 6x slower there, BENCHMARKS.md), on FSDP's
    # DTensors too; and it skips an update on the device when its found_inf is set (no host sync, see train())
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=True)


def lr_at(cfg, step, total):
    """Learning rate for update `step` (0-based): linear warmup, then cosine, linear or constant."""
    if step < cfg.warmup:
        return cfg.lr * step / cfg.warmup
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup) / max(1, total - cfg.warmup))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.lr_schedule == "cosine" else 1 - progress
    return cfg.lr * (cfg.lr_min_ratio + (1 - cfg.lr_min_ratio) * shape)


def local(t):
    """This rank's part of a tensor: the local shard of an FSDP DTensor, the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


class EMA:
    """Unbiased moving average of what trains, AudioCraft's: count = count*decay + 1, ema += (x - ema) / count.
    As this rank's parts of the parameters (FSDP shards: sharded like the model), on the training device or, with
    device="cpu", on the host: then each update copies the weights out asynchronously (pinned memory, a side stream)
    and folds them in at the next update or read, so the training step never waits for it."""

    def __init__(self, model, decay, device=None, deferred=None):
        params = trainable(model)
        self.decay, self.count, self.pending = decay, 0.0, False
        self.state = {k: local(p).detach().to(device or local(p).device, copy=True) for k, p in params.items()}
        first = next(iter(params.values()), None)
        self.deferred = deferred if deferred is not None else \
            first is not None and self.state[next(iter(params))].device != local(first).device
        if self.deferred:
            cuda = local(first).device.type == "cuda"
            self.staged = {k: torch.empty_like(v, pin_memory=cuda) for k, v in self.state.items()}
            self.stream = torch.cuda.Stream(local(first).device) if cuda else None

    @torch.no_grad()
    def update(self, model):
        params = dict(model.named_parameters())
        if not self.deferred:
            self.count = self.count * self.decay + 1
            torch._foreach_lerp_(list(self.state.values()), [local(params[k]).detach() for k in self.state],
                                 1.0 / self.count)
            return
        self.flush()
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream())   # the weights of this update, as they are now
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            for k, staged in self.staged.items():
                staged.copy_(local(params[k]).detach(), non_blocking=True)
            self.event = self.stream.record_event() if self.stream is not None else None
        self.pending = True

    def before_step(self):
        """Call before the optimizer changes the weights: a copy in flight must have read them (a wait on the
        device, not on the host)."""
        if self.pending and self.stream is not None:
            torch.cuda.current_stream().wait_stream(self.stream)

    @torch.no_grad()
    def flush(self):
        """Fold in the copy in flight (deferred EMA): call before reading state."""
        if self.pending:
            if self.event is not None:
                self.event.synchronize()   # long done: it ran beside the updates since
            self.count = self.count * self.decay + 1
            torch._foreach_lerp_(list(self.state.values()), list(self.staged.values()), 1.0 / self.count)
            self.pending = False
        return self.state


@torch.no_grad()
def copy_parts(params, parts):
    """Copy this rank's parts (EMA, best state, a backup) into the live parameters."""
    for k, part in parts.items():
        local(params[k]).copy_(part)


@contextlib.contextmanager
def swapped(lm, parts):
    """The model holds `parts` (EMA or best weights) inside the block, its own weights again after (kept on the
    host meanwhile, so a large model needs no second copy on the device)."""
    if parts is None:
        yield
        return
    params = dict(lm.named_parameters())
    backup = {k: local(params[k]).detach().to("cpu", copy=True) for k in parts}
    copy_parts(params, parts)
    try:
        yield
    finally:
        copy_parts(params, backup)


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: full tensors gathered to rank 0 and written by it alone (a checkpoint written by FSDP on 8 GPUs
# resumes on one CPU and exports to AudioCraft without conversion); each rank reads back only its part.

CHECKPOINT_FORMAT = 2
RESUME_ADVICE = ("; the previous checkpoint is intact (make room or fix the directory, then run the same command "
                 "again to resume)")


def write_run_file(path, write):
    """A run directory's files (checkpoints, history, config.json) are written atomically, env.write_atomic."""
    env.write_atomic(path, write, advice=RESUME_ADVICE)


def save_atomic(obj, path):
    write_run_file(path, lambda f: torch.save(obj, f))


def load_checkpoint(path):
    """Tensors and plain containers only, memory-mapped: a pickled object is refused, never run (continue_from's
    trusted unpickling of AudioCraft's checkpoint.th is formats.read_lm_state's)."""
    return env.load_tensors(path, mmap=True)


def finished(path, epochs):
    """Whether a checkpoint has completed `epochs` epochs and their stages, read without loading its tensors; False
    when it is absent or unreadable (resume then reports or works around the damage)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return ckpt["epoch"] - 1 >= epochs and not ckpt.get("pending")
    except Exception:
        return False


def gather_parts(parts, params, d):
    """Full CPU tensors on rank 0 (None elsewhere) from each rank's parts of `params`; collective under FSDP."""
    out = {}
    for k, part in parts.items():
        p = params[k]
        if hasattr(p, "device_mesh"):
            from torch.distributed.tensor import DTensor
            part = DTensor.from_local(part.to(p.device), p.device_mesh, p.placements, shape=p.shape,
                                      stride=p.stride()).full_tensor()
        if d.main:
            out[k] = part.detach().to("cpu", copy=True)
    return out if d.main else None


def parts_of(full, params):
    """This rank's parts of full tensors (e.g. memory-mapped from a checkpoint): each rank reads only its slice."""
    out = {}
    for k, p in params.items():
        t = full[k]
        if hasattr(p, "device_mesh"):
            from torch.distributed.tensor import distribute_tensor
            t = distribute_tensor(t.to(p.device, p.dtype), p.device_mesh, p.placements, src_data_rank=None).to_local()
        out[k] = t.to(local(p).device, local(p).dtype, copy=True)
    return out


def rng_state(device):
    """Every random stream of this process: python, numpy, torch's CPU generator and its own accelerator's."""
    _, keys, pos, _, _ = np.random.get_state()
    state = {"python": random.getstate(), "numpy": torch.from_numpy(keys.copy()), "numpy_pos": int(pos),
             "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(("MT19937", state["numpy"].numpy(), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def all_rng_states(d):
    """Every rank's rng_state, on rank 0 (all_gather_object cannot carry tensors in torch 2.13: bytes travel)."""
    mine = rng_state(d.device)
    if d.world_size == 1:
        return [mine]
    wire = [None] * d.world_size
    dist.all_gather_object(wire, {k: v.numpy().tobytes() if torch.is_tensor(v) else v for k, v in mine.items()})
    as_tensor = lambda b, dtype: torch.frombuffer(bytearray(b), dtype=dtype)  # noqa: E731
    return [{k: as_tensor(v, torch.uint32 if k == "numpy" else torch.uint8) if isinstance(v, bytes) else v
             for k, v in r.items()} for r in wire]


def checkpoint_state(lm, optimizer, scaler, ema, best, state, cfg, d):
    """The whole training state as one dict on rank 0 (None elsewhere): full tensors on the CPU. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    # an adapter run (state["base"] set) keeps what trains; its base weights stay where state["base"] says
    model_sd, optim_sd = get_state_dict(lm, optimizer, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=state.get("base") is not None))
    params = trainable(lm)
    ema_full = gather_parts(ema.flush(), params, d) if ema else None
    best_full = gather_parts(best, params, d) if best is not None else None
    rngs = all_rng_states(d)
    if not d.main:
        return None
    return {"format": CHECKPOINT_FORMAT, "model": model_sd, "optimizer": optim_sd,
            "scheduler": {"step": state["step"]}, "scaler": scaler.state_dict(),
            "ema": {"state": ema_full, "count": ema.count} if ema else None, "best_state": best_full,
            **{k: v for k, v in state.items()}, "config": config_dict(cfg), "rng": rngs}


def load_base(lm, base, config, init_hash):
    """An adapter run's base weights: from the file it continued from, or the seeded initial weights (already in
    lm); either way their content hash must be the one the adapters were trained on."""
    if base["source"]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        source = formats.adapter_base(base, config)
        set_model_state_dict(lm, dict(source), options=StateDictOptions(full_state_dict=True, strict=False))
    elif init_hash != base["hash"]:
        raise UserError(f"the seeded initial weights (content hash {init_hash}) are not the base the "
                        f"adapters were trained on ({base['hash']}): the model code or seed changed")


def restore(ckpt, lm, optimizer, scaler, ema, state, d, fsdp, init_hash=None):
    """Load a checkpoint into the live objects; -> this rank's parts of the best state. Every rank has the file
    memory-mapped; under FSDP rank 0 broadcasts model and optimizer, and each rank slices its EMA and best state."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"checkpoint format {ckpt.get('format', 1)} is not this version's ({CHECKPOINT_FORMAT}): "
                        f"start afresh (--clear=True) or take its weights with --continue_from")
    mine = d.main or not fsdp
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=fsdp)
    if ckpt.get("base") is not None:   # an adapter run: its base first, checked against the hash it was trained on
        load_base(lm, ckpt["base"], ckpt["config"], init_hash)
        names = set(trainable(lm))
        if set(ckpt["model"]) != names:
            raise UserError(f"its adapters do not fit this model ({len(set(ckpt['model']) ^ names)} names differ, e.g. "
                            f"{sorted(set(ckpt['model']) ^ names)[0]}): lora_* keys changed?")
        opts = dataclasses.replace(opts, strict=False)
    set_model_state_dict(lm, ckpt["model"] if mine else {}, options=opts)
    if not ckpt.get("weights_only"):   # a kept copy may be weights only (keep_weights_only): moments start afresh
        # parameters that never had a gradient have no optimizer state: not an error
        set_optimizer_state_dict(lm, optimizer, ckpt["optimizer"] if mine else {},
                                 options=dataclasses.replace(opts, strict=False))
        scaler.load_state_dict(ckpt["scaler"])
    params = trainable(lm)
    if ema is not None and ckpt["ema"]:
        for k, part in parts_of(ckpt["ema"]["state"], params).items():
            ema.state[k].copy_(part)
        ema.count = ckpt["ema"]["count"]
    for key in state:
        state[key] = ckpt[key]
    rngs = ckpt.get("rng", [])
    if len(rngs) == d.world_size:
        set_rng_state(rngs[d.rank], d.device)
    else:
        state["resharded"] = "weights only" if ckpt.get("weights_only") else "processes"
    return None if ckpt["best_state"] is None else {k: v.cpu() for k, v in parts_of(ckpt["best_state"], params).items()}


# ----------------------------------------------------------------------------------------------------------
# Batches, evaluation and the stages

def forward_loss(step, batch, cfg, codec, d, autocast):
    """(ce, ce per codebook, real frames) of one batch, all on the device (no host sync). Codes come from the
    token cache, or from raw audio encoded here by the frozen codec (float32, outside autocast, as AudioCraft)."""
    device = d.device
    with torch.no_grad():
        codes = batch["codes"].to(device, non_blocking=True) if "codes" in batch else \
            codec.encode(batch["wav"].to(device, non_blocking=True))
    valid = batch["valid"].to(device, non_blocking=True)
    if cfg.train_on_padding:
        valid = torch.ones_like(valid)
    attributes = dict(batch.get("attributes") or {})     # a model's other conditions: text, the melody's chroma
    if "chroma" in batch:
        attributes[lm_lib.MELODY] = batch["chroma"].to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=getattr(torch, cfg.dtype), enabled=autocast):
        ce, ce_q = step(codes, list(batch["descriptions"]), valid, attributes or None)
    return ce, ce_q, valid.sum()


@contextlib.contextmanager
def eval_mode(step, sampling=False):
    """Eval mode, eager (compiled training layers would each record new graphs for no-grad, other lengths and
    inference mode, past dynamo's recompile limit), and under FSDP with every layer gathered for sampling: each
    decode step then runs without an all-gather."""
    step.eval()
    fsdp_units = [m for m in step.modules() if hasattr(m, "unshard")] if sampling else []
    if fsdp_units:
        step._get_fsdp_state()._lazy_init()  # a root that has not run forward yet (a resumed pending stage)
        step.set_reshard_after_forward(False)   # every unit (the root's own default is already False)
        for m in fsdp_units:
            m.unshard()
    try:
        with torch.compiler.set_stance("force_eager"):
            yield
    finally:
        for m in fsdp_units:
            m.reshard()
            if m is not step:
                m.set_reshard_after_forward(True, recurse=False)
        step.train()


@torch.no_grad()
def evaluate_ce(step, split, cfg, codec, d, micro_batch, autocast, max_batches=0):
    """ce, ppl and per-codebook ce over a split, files strided across ranks, with and without the text. Every
    rank takes the same number of turns, each ending in a collective check for a stop signal; under FSDP, where
    every forward is collective, a rank out of files repeats a batch with weight 0."""
    fsdp = cfg.parallel == "fsdp" and d.world_size > 1
    turns = math.ceil(math.ceil(len(split) / d.world_size) / micro_batch)
    turns = min(turns, max_batches) if max_batches else turns
    batches = iter(data.make_loader(split, micro_batch, rank=d.rank, world_size=d.world_size, num_workers=0,
                                    train=False))
    sums = torch.zeros(3 + cfg.n_q, dtype=torch.float64, device=d.device)   # ce, ce_uncond, ce per codebook, items
    last = None
    for _ in range(turns):
        batch = next(batches, None)
        weight = 1.0 if batch is not None else 0.0
        if batch is None and fsdp:
            batch = last if last is not None else data.collate([split[0]])
        if batch is not None:
            last = batch
            n = len(batch["descriptions"])
            ce, ce_q, _ = forward_loss(step, batch, cfg, codec, d, autocast)
            ce_u, _, _ = forward_loss(step, data.unconditioned(batch), cfg, codec, d, autocast)
            sums += weight * n * torch.cat([torch.stack([ce, ce_u]).double(), ce_q.double(),
                                            torch.ones(1, dtype=torch.float64, device=d.device)])
        check_stop_everywhere(d)
    *totals, count = all_sum(d, list(sums))
    count = max(count, 1)
    ce = totals[0] / count
    return {"ce": ce, "ppl": math.exp(min(ce, 50)), "ce_uncond": totals[1] / count,
            **{f"ce_q{k + 1}": v / count for k, v in enumerate(totals[2:])}}


def sample_codes(lm, cfg, descriptions, n_frames, seeds, device, autocast, window, melodies=None, frame_rate=None):
    """Codes [B, K, n_frames] for descriptions (None: unconditional) with the config's sampling settings: model.py's
    one sampler (generate.py's), row b drawn from seeds[b] alone, windows of the model's context sliding past it;
    a melody model follows melodies (chroma classes per row, None: none). lm: sampling_model's."""
    with torch.autocast(device.type, dtype=getattr(torch, cfg.dtype), enabled=autocast):
        return lm_lib.sample(lm, list(descriptions), n_frames, window=window, seeds=seeds, cfg_coef=cfg.cfg_coef,
                             top_k=cfg.top_k, top_p=cfg.top_p, temperature=cfg.temperature, melodies=melodies,
                             frame_rate=frame_rate)


def sampling_model(lm, cfg):
    """What a stage samples from, made once per stage: lm itself, or with cfg.quantize a quantized copy (the training
    weights stay float; quantize.py refuses state_dict on what it touches)."""
    return quantize.quantize(copy.deepcopy(lm), cfg.quantize) if cfg.quantize else lm


def item_melody(item):
    """A split item's chroma classes as a melody to follow: its frames with audio (None: the split has none)."""
    if "chroma" not in item:
        return None
    classes = item["chroma"]
    return classes[classes >= 0] if (classes >= 0).any() else classes.clamp(min=0)


def generate_stage(step, lm, splits, cfg, codec, d, epoch, out, autocast, weights):
    """Samples for the generate split's descriptions and their unconditional twins, decoded to wav and
    loudness-normalised as generate.py does; row seed cfg.seed + epoch + i, so `python generate.py --run=SIG
    --prompt=P --seed=ROW_SEED` remakes sample i from the same weights. A melody model's samples follow the melody
    of their file (its first segment's cached chroma; generate.py --melody=FILE takes the whole file), with
    `_text` twins that have the description only. Prompts are strided across ranks; each rank writes its own
    files, each wav with its .json atomically. -> the history row."""
    split = splits["generate"]
    count = min(cfg.generate_count, len(split))
    mine = list(range(d.rank, count, d.world_size))
    items = [split[i] for i in mine]
    descriptions = [it["description"] for it in items]
    seeds = [cfg.seed + epoch + i for i in mine]
    # a melody model: each description with its file's melody (the chroma of its first segment), then without it
    melodies = [item_melody(it) for it in items] if lm.melody is not None else None
    variants = [("", descriptions, melodies)] + ([("_text", descriptions, None)] if melodies else []) + \
        [("_uncond", [None] * len(descriptions), None)]
    n_frames = max(1, int(round(cfg.generate_duration * codec.frame_rate)))
    window = max(1, int(round(cfg.segment_duration * codec.frame_rate)))
    folder = out / "samples" / str(epoch)
    folder.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(cfg, k) for k in ("cfg_coef", "top_k", "top_p", "temperature", "generate_duration")}
    t0 = time.time()
    with eval_mode(step, sampling=True):
        sampler = sampling_model(lm, cfg)
        for name, texts, tunes in variants:
            if texts:
                wav = codec.decode(sample_codes(sampler, cfg, texts, n_frames, seeds, d.device, autocast, window, tunes,
                                                codec.frame_rate))
            for j, i in enumerate(mine):
                path = folder / f"{i:03d}{name}.wav"
                audio, gain_db = data.normalize(wav[j].float().cpu(), codec.sample_rate)
                meta = {"prompt": texts[j], "epoch": epoch, "row_seed": seeds[j], "weights": weights,
                        "gain_db": round(gain_db, 2), **settings}
                if tunes:
                    meta["melody"] = items[j]["path"]   # the chroma of its first segment_duration seconds
                env.write_atomic(path, lambda f: f.write(data.audio_bytes(audio, codec.sample_rate, path.suffix)))
                env.write_atomic(path.with_suffix(".json"), lambda f: f.write(json.dumps(meta, indent=1).encode()))
            check_stop_everywhere(d)
    total = int(all_sum(d, [len(variants) * len(mine)])[0])
    return {"samples": total, "seconds": time.time() - t0}


def evaluate_stage(step, lm, splits, cfg, codec, d, epoch, micro_batch, autocast, evaluator=None):
    """ce/ppl on the evaluate split; then, for its first evaluate_samples items (strided across ranks, a batch at a
    time), music generated from their descriptions: `fd`, a Fréchet distance between codec embeddings (the quantized
    latents the decoder starts from) of generated and reference segments, and the chosen metrics (fad, kld, clap,
    chroma_cos) against the reference audio. -> the history row."""
    split = splits["evaluate"]
    with eval_mode(step):
        row = evaluate_ce(step, split, cfg, codec, d, micro_batch, autocast)
    n = min(len(split), cfg.evaluate_samples or len(split))
    mine = list(range(d.rank, n, d.world_size))
    turns = math.ceil(math.ceil(n / d.world_size) / micro_batch)   # the same on every rank: collective stop checks
    if evaluator is not None:
        evaluator.reset()
    latents = {"reference": [], "generated": []}                    # [frames, D] float32 on the host
    sampler = None                                                  # sampling_model's, at the first batch
    for turn in range(turns):
        chunk = mine[turn * micro_batch:(turn + 1) * micro_batch]
        items = [split[i] for i in chunk]
        if items:
            with torch.no_grad():
                reference = torch.stack([it["codes"] if "codes" in it else codec.encode(it["wav"][None].to(d.device))[0]
                                         for it in items]).to(d.device)                    # [B, K, T]
            with eval_mode(step, sampling=True):
                sampler = sampling_model(lm, cfg) if sampler is None else sampler
                melodies = [item_melody(it) for it in items] if lm.melody is not None else None
                generated = sample_codes(sampler, cfg, [it["description"] for it in items], reference.shape[-1],
                                         [cfg.seed + i for i in chunk], d.device, autocast, reference.shape[-1],
                                         melodies, codec.frame_rate)
            with torch.no_grad():
                for side, codes in (("reference", reference), ("generated", generated)):
                    latents[side].append(codec.decode_latent(codes).transpose(1, 2).flatten(0, 1).float().cpu())
                if evaluator is not None:
                    T = reference.shape[-1] * codec.hop
                    audio = torch.zeros(len(items), codec.channels, T)                   # [B, C, S]: the real audio
                    for b, it in enumerate(items):
                        x = data.read_audio(it["path"], 0.0, cfg.segment_duration, sample_rate=codec.sample_rate,
                                            channels=codec.channels)[:, :T]
                        audio[b, :, :x.shape[1]] = torch.from_numpy(x)
                    lengths = [int(it["valid"].sum()) * codec.hop for it in items]
                    wav = codec.decode(generated).float().cpu()[..., :T]
                    evaluator.add(generated=wav, reference=audio, descriptions=[it["description"] for it in items],
                                  melodies=audio if "chroma_cos" in evaluator.names else None, lengths=lengths)
        check_stop_everywhere(d)
    ref, gen = (torch.cat(latents[side]) if latents[side] else torch.zeros(0, codec.cfg.dimension)
                for side in ("reference", "generated"))
    if d.world_size > 1:
        gathered = [None] * d.world_size
        dist.all_gather_object(gathered, (ref.numpy(), gen.numpy()))
        ref = torch.cat([torch.from_numpy(r) for r, _ in gathered])
        gen = torch.cat([torch.from_numpy(g) for _, g in gathered])
    row["fd"] = metrics.frechet_distance(gen, ref)
    if evaluator is not None:
        evaluator.reduce(lambda x: all_sum(d, list(x)))
        row.update(evaluator.result())
    return row


# ----------------------------------------------------------------------------------------------------------
# The run

class Log:
    """Rank 0's printed log, also appended to the run's log.txt."""

    def __init__(self, d):
        self.main, self.file = d.main, None

    def __call__(self, msg, echo=True):
        if not self.main:
            return
        if echo:
            print(msg, flush=True)
        if self.file is not None:
            with open(self.file, "a") as f:
                f.write(msg + "\n")


def set_status(out, d, word):
    """The status file: running (with this process and host, so that env.run_status can tell a killed run),
    done, failed or preempted."""
    if d.main and out.is_dir():
        owner = f"{os.getpid()} {socket.gethostname()}\n" if word == "running" else ""
        (out / "status").write_text(f"{word}\n{owner}")


def format_row(row):
    keys = [k for k in ("ce", "ppl", "ce_uncond", "grad", "fd", *metrics.METRICS, "skipped")
            if row.get(k) is not None]
    keys += ["bad_reads"] if row.get("bad_reads") else []  # audio reads that failed, shown when there were some
    tail = " | ".join(f"{k} {row[k]:.4g}" for k in keys)
    if row.get("error"):
        tail = f"failed: {row['error']}"
    elif row["stage"] == "generate":
        tail = f"{row['samples']} samples ({row['seconds']:.1f}s)"
    return f"epoch {row['epoch']:>3} {row['stage']:<8} | {tail}"


def _si(x):
    return f"{x / 1e6:.1f}M" if x >= 1e6 else f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


def open_splits(cfg, codec, d):
    """The four splits. Every rank opens them at once and encodes its share of a missing token cache; ranks wait for
    each other by watching the cache files (data.py), never in a collective that could time out."""
    runs = Path(cfg.runs_dir or env.get_env().runs_dir)
    dataset = demo.dataset_dir(cfg.dataset, runs)
    common = dict(codec=codec, segment_duration=cfg.segment_duration, seed=cfg.seed, token_cache=cfg.token_cache,
                  cache_dir=cfg.cache_dir or str(runs / "cache"), min_segment_ratio=cfg.min_segment_ratio,
                  sample_on_weight=cfg.sample_on_weight, sample_on_duration=cfg.sample_on_duration,
                  merge_text_p=cfg.merge_text_p, drop_desc_p=cfg.drop_desc_p, keep_field_p=cfg.keep_field_p,
                  max_skip_fraction=cfg.max_skip_fraction, rank=d.rank, world_size=d.world_size,
                  attributes=cfg.attributes, chroma=melody.ChromaEncoder(cfg.chroma_stems) if cfg.chroma_fuse else None)
    return {s: data.open_split(dataset, s, train=s == "train", **common) for s in data.SPLITS}


@contextlib.contextmanager
def run_directory(cfg, d, out, sig):
    """The run directory for the life of the run: its lock (one writer: a second launch, or --clear, is refused
    while a live process holds it), then what a start writes. Rank 0 does the writing; every rank learns whether
    the lock was taken."""
    lock, refused = env.RunLock(out), None
    if d.main:
        try:
            lock.acquire()
        except UserError as e:
            refused = e
    if all_sum(d, [refused is not None])[0]:
        raise refused or UserError(f"{out} is in use by another process (see {out / env.LOCK_FILE})")
    try:
        if d.main:
            if cfg.clear:
                for p in out.iterdir():
                    if p.name != env.LOCK_FILE:
                        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            env.remove_stale_temporaries(out)  # ours alone: the lock keeps any other writer out
            commit, dirty = env.git_commit()
            text_ = json.dumps({**config_dict(cfg), "signature": sig, "git_commit": commit, "git_dirty": dirty},
                               indent=1)
            write_run_file(out / "config.json", lambda f: f.write(text_.encode()))
        yield
    finally:
        if d.main:
            lock.release()


def memory_estimate(cfg, codec, fsdp_ranks):
    """A rough upper bound of one process's training memory in bytes: (fixed, per sample). Weights, gradients,
    AdamW moments and EMA in fp32 (sharded over fsdp_ranks); activations of a pre-norm layer (~34 x dim bytes per
    step under bf16 autocast, Korthikanti et al.; 2 with checkpointing), the fp32 logits, their softmax and
    gradient."""
    n_params = 12 * cfg.n_layers * cfg.dim ** 2 + cfg.n_q * (2 * cfg.card + 1) * cfg.dim
    steps = int(round(cfg.segment_duration * codec.frame_rate)) + cfg.n_q
    per_sample = steps * cfg.dim * cfg.n_layers * (2 if cfg.checkpointing else 34) + steps * cfg.n_q * cfg.card * 12
    return 20 * n_params / fsdp_ranks, per_sample


def train(cfg, d):
    """The run: setup, then the loop. -> exit status (0 done, EXIT_REQUEUE stopped by a signal, 1 diverged)."""
    validate(cfg, d.world_size)
    sig, out = config_signature(cfg), run_dir(cfg)
    log = Log(d)
    env.install_stop_handlers()
    if not cfg.clear and finished(out / "checkpoint.pt", cfg.epochs):  # before any data is read
        log(f"run {sig} already finished {cfg.epochs} epochs")
        return 0
    fsdp = cfg.parallel == "fsdp" and d.world_size > 1
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    codec = formats.load_codec(cfg.codec).to(d.device)   # bad paths fail before anything is written
    if (codec.n_q, codec.card) != (cfg.n_q, cfg.card):
        raise UserError(f"codec {cfg.codec} has n_q={codec.n_q}, card={codec.card} but the config says "
                        f"n_q={cfg.n_q}, card={cfg.card}: set them to match")
    lm = build_model(cfg).to(d.device)
    adapter_run = cfg.lora_rank > 0 and cfg.freeze_base   # its checkpoints hold the adapters and name their base
    init_hash = adapters.state_hash(lm.state_dict()) if adapter_run and not cfg.continue_from else None
    step = TrainStep(lm)
    model = parallelize(step, cfg, d)       # what the loop calls: the step, or DDP around it; FSDP shards it in place
    if cfg.compile and not fsdp:            # the stages' decode step too (fullgraph cannot trace FSDP's hooks)
        lm_lib.compile_decode(lm)
    params = trainable(lm)
    optimizer = make_optimizer(lm, cfg)
    scaler = torch.amp.GradScaler(d.device.type, enabled=cfg.dtype == "float16")   # a no-op unless float16
    autocast = cfg.dtype != "float32"
    ema = EMA(lm, cfg.ema_decay, cfg.ema_device or None) if cfg.ema else None
    best = None   # this rank's parts of the best weights (lowest valid ce), on the host
    micro_batch = cfg.batch_size // d.world_size // cfg.grad_accum
    frames = int(round(cfg.segment_duration * codec.frame_rate))
    total = cfg.epochs * cfg.updates_per_epoch
    # the metrics' models load now: a missing weights file stops the run before it trains
    evaluator = metrics.Evaluator(cfg.metrics, codec.sample_rate, vggish=cfg.vggish_path, passt=cfg.passt_path,
                                  clap=cfg.clap_path, device=d.device, seed=cfg.seed, option_suffix="_path") \
        if cfg.metrics and cfg.evaluate_every else None
    rng = rng_state(d.device)
    splits = open_splits(cfg, codec, d)  # a bad dataset or manifest fails before the run directory exists
    set_rng_state(rng, d.device)         # building a cache may draw random numbers; a run must not depend on it
    # What a checkpoint carries besides tensors. epoch: the next to train; samples: training items consumed by all
    # ranks together (the data position, whatever grad_accum or world size); pending: what the last trained epoch
    # still owes (valid, generate, evaluate).
    state = {"epoch": 1, "step": 0, "samples": 0, "best_ce": float("inf"), "history": [], "pending": [],
             "nonfinite_total": 0, "base": {"source": "", "hash": init_hash} if adapter_run else None}
    tracker = loggers.Loggers()   # TensorBoard / W&B once the run directory is ours (loggers.py); until then none

    def add_row(row):
        state["history"].append(row)
        log(format_row(row))
        tracker.row(row)

    def save(keep=False):
        ckpt = checkpoint_state(lm, optimizer, scaler, ema, best, state, cfg, d)
        if not d.main:
            return
        tracker.flush()   # what the checkpoint's history holds reaches the trackers' files first
        save_atomic(ckpt, out / "checkpoint.pt")
        history = "".join(json.dumps(row) + "\n" for row in state["history"]).encode()
        write_run_file(out / "history.jsonl", lambda f: f.write(history))  # rewritten whole: no duplicate rows
        if keep:  # a real copy, not a link: damage to checkpoint.pt must leave the kept one readable
            path = out / f"checkpoint_{state['epoch'] - 1}.pt"
            if cfg.keep_weights_only:   # what export and generate read, without optimizer state
                small = {k: v for k, v in ckpt.items() if k not in ("optimizer", "scaler", "rng")}
                save_atomic({**small, "weights_only": True}, path)
            else:
                with open(out / "checkpoint.pt", "rb") as src:
                    write_run_file(path, lambda f: shutil.copyfileobj(src, f))
            kept = sorted(out.glob("checkpoint_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
            for old in kept[:-cfg.keep_last] if cfg.keep_last else []:
                old.unlink(missing_ok=True)

    def resume():
        """checkpoint.pt, else the newest readable kept copy. Every rank reads the same files (memory-mapped), so
        all agree on which one loads."""
        nonlocal best
        kept = sorted(out.glob("checkpoint_*.pt"), key=lambda p: int(p.stem.split("_")[1]), reverse=True)
        candidates = [p for p in [out / "checkpoint.pt"] if p.exists()] + kept
        for i, path in enumerate(candidates):
            try:
                ckpt = load_checkpoint(path)
                if not isinstance(ckpt, dict) or "model" not in ckpt:
                    raise UserError(f"{path}: not a nanomusicgen checkpoint")
                best = restore(ckpt, lm, optimizer, scaler, ema, state, d, fsdp, init_hash)
            except (UserError, KeyError, RuntimeError, ValueError, TypeError) as e:
                reason = (str(e).splitlines() or [type(e).__name__])[0][:300].removeprefix(f"{path}: ")
                if i + 1 == len(candidates):
                    raise UserError(f"{path}: cannot resume from it ({reason}); move it away or run with "
                                    f"--clear=True to start afresh") from None
                log(f"warning: {path} is unreadable ({reason}); falling back to {candidates[i + 1]}")
                continue
            # rows evaluate.py appended to history.jsonl since this checkpoint (under the lock we now hold): kept
            state["history"] += [r for r in env.read_history(out / "history.jsonl")
                                 if r.get("stage") == "evaluate_only" and r not in state["history"]]
            log(f"resumed from {path.name}: epoch {state['epoch']}, update {state['step']}")
            why = state.pop("resharded", None)
            if why == "processes":
                log("warning: checkpoint from another number of processes: random streams reseeded, so this run "
                    "no longer replays exactly (the data position is exact)")
            elif why:
                log(f"warning: {path.name} holds weights only (keep_weights_only): optimizer moments and random "
                    f"streams start afresh, so this run no longer replays exactly")
            for row in state["history"]:
                log(format_row(row))
            return True
        return False

    def run_pending(epoch):
        """What `epoch` owes after its updates, in order: valid on the EMA weights (best state, then the epoch's
        checkpoint), then the generate and evaluate stages on the best weights. A stage that fails is reported in its
        row and training goes on; a stop signal saves (when the checkpoint lacks the epoch) and ends the run."""
        nonlocal best
        if "valid" in state["pending"]:
            with swapped(lm, ema.flush() if ema else None), eval_mode(step):
                row = {"epoch": epoch, "stage": "valid", "step": state["step"],
                       **evaluate_ce(step, splits["valid"], cfg, codec, d, micro_batch, autocast, cfg.valid_batches)}
                if row["ce"] < state["best_ce"]:
                    state["best_ce"] = row["ce"]
                    best = {k: local(p).detach().to("cpu", copy=True) for k, p in params.items()}
            add_row(row)
            state["pending"].remove("valid")
            save(keep=bool(cfg.save_every) and epoch % cfg.save_every == 0)   # the stages cannot lose it
        weights = best if best is not None else ema.flush() if ema else None
        for stage in list(state["pending"]):
            t0, failed = time.time(), None
            try:
                with swapped(lm, weights):
                    if stage == "generate":
                        row = generate_stage(step, lm, splits, cfg, codec, d, epoch, out, autocast,
                                             "best" if best is not None else "ema")
                    else:
                        row = evaluate_stage(step, lm, splits, cfg, codec, d, epoch, micro_batch, autocast,
                                             evaluator)
            except env.Stopped:
                raise
            except Exception as e:  # a stage's failure (full disk, a bad sample) must not end the run
                failed = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
            if all_sum(d, [failed is not None])[0]:
                row = {"error": (failed or "failed on another rank").splitlines()[0][:300]}
            row = {"epoch": epoch, "stage": stage, "step": state["step"], **row, "seconds": round(time.time() - t0, 2)}
            add_row(row)
            state["pending"].remove(stage)
            if stage == "generate" and failed is None and d.main:
                tracker.samples(out / "samples" / str(epoch), state["step"])
            if failed is not None:
                log(f"warning: the {stage} stage of epoch {epoch} failed; training goes on (its checkpoint is saved)")
        if d.main:
            history = "".join(json.dumps(r) + "\n" for r in state["history"]).encode()
            write_run_file(out / "history.jsonl", lambda f: f.write(history))

    with run_directory(cfg, d, out, sig), contextlib.ExitStack() as cleanup:
        log.file = out / "log.txt"
        if not resume() and cfg.continue_from:
            source, path = formats.read_lm_state(cfg.continue_from, cfg.runs_dir or None, cfg.trust_checkpoint)
            formats.check_state_dict(lm, source, str(path))
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
            if adapter_run:
                state["base"] = {"source": cfg.continue_from, "hash": adapters.state_hash(source)}
            # a copy: with strict=False torch adds the model's missing keys to the dict it is given
            set_model_state_dict(lm, dict(source), options=StateDictOptions(full_state_dict=True,
                                                                            strict=not adapter_run))
            ema = EMA(lm, cfg.ema_decay, cfg.ema_device or None) if cfg.ema else None
            log(f"continuing from the weights in {path} (fresh optimizer and schedule)")
        commit, dirty = env.git_commit()
        e = env.get_env()
        dev = torch.cuda.get_device_name(d.device) if d.device.type == "cuda" else d.device.type
        log(f"nanomusicgen run {sig} at {out}")
        log(f"commit {commit or '-'}{' (dirty)' if dirty else ''} | team {e.team} | cluster {e.cluster} | "
            f"{d.world_size} x {dev} | torch {torch.__version__}")
        log(f"model {lm_lib.num_params(lm) / 1e6:.2f}M parameters ({sum(p.numel() for p in params.values()) / 1e6:.2f}M"
            f" training) | codec {cfg.codec} ({codec.n_q}x{codec.card}, {codec.frame_rate:g} frames/s) | segment "
            f"{frames} frames | batch {cfg.batch_size} = {d.world_size} x {cfg.grad_accum} x {micro_batch}")
        log("config: " + json.dumps(config_delta(cfg), sort_keys=True))
        tracker = loggers.open_loggers(
            config_dict(cfg), out, sig, {"git_commit": commit, "git_dirty": dirty, "world_size": d.world_size,
                                         "device": dev, "torch": torch.__version__},
            resume_step=state["step"], history=state["history"], main=d.main, warn=log)
        cleanup.callback(tracker.close)
        if d.device.type == "cuda":
            fixed, per_sample = memory_estimate(cfg, codec, d.world_size if fsdp else 1)
            have = torch.cuda.mem_get_info(d.device)[1]
            if fixed + per_sample * micro_batch > 0.9 * have:
                fit = max(1, int((0.9 * have - fixed) // per_sample))
                log(f"warning: a micro-batch of {micro_batch} x {frames} frames needs about "
                    f"{(fixed + per_sample * micro_batch) / 2 ** 30:.0f} GB and the GPU has {have / 2 ** 30:.0f} GB: "
                    f"use --grad_accum={math.ceil(micro_batch / fit) * cfg.grad_accum} (a micro-batch of {fit} or "
                    f"less) or --checkpointing=True")
        if state["epoch"] > cfg.epochs and not state["pending"]:
            log(f"run {sig} already finished {cfg.epochs} epochs")
            set_status(out, d, "done")
            return 0
        set_status(out, d, "running")
        batches = iter(data.make_loader(splits["train"], micro_batch, rank=d.rank, world_size=d.world_size,
                                        start=state["samples"] // (micro_batch * d.world_size),
                                        num_workers=cfg.num_workers, pin_memory=d.device.type == "cuda", train=True))
        peak = lm_lib.peak_flops(d.device)
        # Device-side counters, read on the host only at log lines: an update never waits for the GPU.
        zero = lambda: torch.zeros((), device=d.device)  # noqa: E731
        nonfinite_run, nonfinite_max, nonfinite_count = zero(), zero(), zero() + state["nonfinite_total"]

        while state["epoch"] <= cfg.epochs or state["pending"]:
            epoch = state["epoch"] - 1 if state["pending"] else state["epoch"]
            try:
                if state["pending"]:                  # a run stopped during an epoch's stages resumes there
                    run_pending(epoch)
                    continue
            except env.Stopped as e:
                if "valid" in state["pending"]:
                    save()
                log(f"stopped by signal {e} after the updates of epoch {epoch}: checkpoint written, exit "
                    f"{EXIT_REQUEUE} asks for a requeue (run the same command again to resume)")
                set_status(out, d, "preempted")
                return EXIT_REQUEUE
            # -- the updates of one epoch
            model.train()
            sums = torch.zeros(2 + cfg.n_q, device=d.device)   # ce, grad norm, per-codebook ce over good updates
            counted, skipped = zero(), zero()
            bad_reads = splits["train"].stats()["skipped"]     # this process and its loader workers, cumulative
            t_log, t_data, frames_log, steps_log, stop = time.time(), 0.0, zero(), 0, None
            t_epoch, frames_epoch = time.time(), 0.0   # the epoch's train throughput, for its history row
            while state["step"] < epoch * cfg.updates_per_epoch:
                lr = lr_at(cfg, state["step"], total)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                ce_sum, ce_q_sum = zero(), torch.zeros(cfg.n_q, device=d.device)
                for micro in range(cfg.grad_accum):
                    last = micro == cfg.grad_accum - 1
                    t0 = time.time()
                    batch = next(batches)
                    t_data += time.time() - t0
                    state["samples"] += micro_batch * d.world_size
                    if fsdp:
                        model.set_requires_gradient_sync(last)   # reduce-scatter once, after the last micro-step
                    sync = model.no_sync() if d.world_size > 1 and not fsdp and not last else contextlib.nullcontext()
                    with sync:
                        ce, ce_q, n = forward_loss(model, batch, cfg, codec, d, autocast)
                        scaler.scale(ce / cfg.grad_accum).backward()
                    ce_sum += ce.detach() / cfg.grad_accum
                    ce_q_sum += ce_q / cfg.grad_accum
                    frames_log += n
                scaler.unscale_(optimizer)
                if fsdp and scaler.is_enabled():   # each rank saw only its shards' gradients: agree on overflow
                    for found_inf in scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"].values():
                        dist.all_reduce(found_inf, op=dist.ReduceOp.MAX)
                grad = torch.nn.utils.clip_grad_norm_(lm.parameters(), cfg.max_norm if cfg.max_norm > 0 else math.inf)
                grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
                if scaler.is_enabled():   # float16: the scaler skips overflowing updates and lowers its scale
                    bad = ~torch.isfinite(ce_sum)
                    if ema is not None:
                        ema.before_step()
                    scaler.step(optimizer)
                    scaler.update()
                else:                     # the global grad norm: every rank skips the same updates, on the device
                    bad = ~(torch.isfinite(grad) & torch.isfinite(ce_sum))
                    optimizer.found_inf = bad.float()
                    if ema is not None:
                        ema.before_step()
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                state["step"] += 1
                nonfinite_run = torch.where(bad, nonfinite_run + 1, 0)
                nonfinite_max = torch.maximum(nonfinite_max, nonfinite_run)
                nonfinite_count += bad
                skipped += bad
                sums += torch.where(bad, 0.0, torch.cat([torch.stack([ce_sum, grad.float()]), ce_q_sum]))
                counted += ~bad
                steps_log += 1
                if ema is not None and state["step"] % cfg.ema_every == 0:
                    ema.update(lm)
                in_epoch = state["step"] - (epoch - 1) * cfg.updates_per_epoch
                if state["step"] % cfg.log_every == 0 or in_epoch == cfg.updates_per_epoch:
                    # the one host sync of a log line: loss across ranks, frames, non-finite counters, stop signals
                    ce_all, frames_all, worst, run_now, count, stops = all_sum(
                        d, [ce_sum, frames_log, nonfinite_max, nonfinite_run, nonfinite_count,
                            env.stop_requested() is not None])
                    dt = time.time() - t_log
                    computed = steps_log * cfg.batch_size * (frames + 1) / dt   # padded steps too: what ran
                    flops = lm_lib.flops_per_token(lm.cfg, frames + 1, step.cond_len) if peak else 0
                    mfu = f" | mfu {100 * flops * computed / (peak * d.world_size):.1f}%" if peak else ""
                    mem = f" | mem {torch.cuda.max_memory_allocated(d.device) / 2 ** 30:.1f}G" \
                        if d.device.type == "cuda" else ""
                    ce_now = ce_all / d.world_size
                    log(f"epoch {epoch} step {in_epoch}/{cfg.updates_per_epoch} | ce {ce_now:.3f} | "
                        f"ppl {math.exp(min(ce_now, 50)):.1f} | lr {lr:.1e} | grad {float(grad):.2f} | "
                        f"frames/s {_si(frames_all / dt)}{mfu}{mem} | data {100 * t_data / max(1e-9, dt):.1f}%")
                    tracker.scalars(state["step"], {
                        "ce": ce_now, "ppl": math.exp(min(ce_now, 50)), "lr": lr, "grad": float(grad),
                        "frames_per_s": frames_all / dt, "data_wait": 100 * t_data / max(1e-9, dt),
                        "mfu": 100 * flops * computed / (peak * d.world_size) if peak else None,
                        "mem_gib": torch.cuda.max_memory_allocated(d.device) / 2 ** 30
                        if d.device.type == "cuda" else None})
                    count = int(count / d.world_size)
                    if count > state["nonfinite_total"]:
                        log(f"warning: update {state['step']}: {count - state['nonfinite_total']} update(s) with a "
                            f"non-finite loss or gradient skipped since the last log line "
                            f"({int(run_now / d.world_size)}"
                            f" in a row now; last ce {ce_now:.4g}, grad {float(grad):.4g})")
                        state["nonfinite_total"] = count
                    if worst / d.world_size >= cfg.max_nonfinite:
                        log(f"error: {int(worst / d.world_size)} non-finite updates in a row (max_nonfinite="
                            f"{cfg.max_nonfinite}); the last good checkpoint is {out / 'checkpoint.pt'}")
                        set_status(out, d, "failed")
                        return 1
                    frames_epoch += frames_all
                    t_log, t_data, frames_log, steps_log = time.time(), 0.0, zero(), 0
                    if stops and in_epoch < cfg.updates_per_epoch:  # at the epoch's end, valid stops instead
                        stop = env.stop_requested() or "a signal on another rank"
                        break
            if stop:
                save()
                log(f"stopped by signal {stop} at update {state['step']}: checkpoint written, exit {EXIT_REQUEUE} asks "
                    f"for a requeue (run the same command again to resume)")
                set_status(out, d, "preempted")
                return EXIT_REQUEUE
            bad_reads = splits["train"].stats()["skipped"] - bad_reads
            *totals, good, skipped, bad_reads = all_sum(d, [*sums, counted, skipped, bad_reads])
            good = max(good / d.world_size, 1)
            ce = totals[0] / d.world_size / good
            row = {"epoch": epoch, "stage": "train", "step": state["step"], "lr": lr, "ce": ce,
                   "frames_per_s": frames_epoch / max(time.time() - t_epoch, 1e-9),
                   "ppl": math.exp(min(ce, 50)), "grad": totals[1] / d.world_size / good,
                   "skipped": int(skipped / d.world_size), "bad_reads": int(bad_reads),
                   **{f"ce_q{k + 1}": v / d.world_size / good for k, v in enumerate(totals[2:])}}
            add_row(row)
            state["pending"] = ["valid"] + [s for s, every in (("generate", cfg.generate_every),
                                                               ("evaluate", cfg.evaluate_every))
                                            if every and (epoch % every == 0 or epoch == cfg.epochs)]
            state["epoch"] += 1
        save()   # records that the last epoch's stages are done
        set_status(out, d, "done")
        log(f"done: {cfg.epochs} epochs, best valid ce {state['best_ce']:.4f}")
        return 0


# ----------------------------------------------------------------------------------------------------------
# Entry point

def main(argv):
    cfg = parse_args(argv)
    if cfg.print_config:
        print_config(cfg)
        return 0
    d = setup_distributed(cfg)

    def oom_advice():
        return (f"out of memory on {d.device} with a micro-batch of {cfg.batch_size // d.world_size // cfg.grad_accum}"
                f" (batch_size={cfg.batch_size} over {d.world_size} process(es), grad_accum={cfg.grad_accum}): raise "
                f"--grad_accum, or use --checkpointing=True or --parallel=fsdp")
    return run_to_exit(d, run_dir(cfg), lambda: train(cfg, d), oom_advice)


def run_to_exit(d, out, body, oom_advice=None):
    """Run body() (train.py's train, train_codec.py's) and end the process the same way for both: a UserError is one
    line on the terminal and in log.txt (exit 2); a stop signal before the loop exits 75 as "preempted"; with
    oom_advice, running out of GPU memory is one line saying what to change (exit 2); anything else is logged, marks
    the run "failed" and propagates (printed first under several ranks, where os._exit would swallow it)."""
    code = 1
    try:
        code = body()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        _log_error(out, d, f"error: {e}")
        code = 2
    except env.Stopped as e:   # a long phase before the loop (tokenizing, loading) stopped by a signal
        print(f"stopped by signal {e} before training: run the same command again to resume", file=sys.stderr)
        set_status(out, d, "preempted")
        code = EXIT_REQUEUE
    except BaseException as e:
        if oom_advice is not None and isinstance(e, torch.OutOfMemoryError):
            msg = oom_advice()
            print(f"error: {msg}", file=sys.stderr)
            _log_error(out, d, f"error: {msg}")
            set_status(out, d, "failed")
            code = 2
        else:
            if not isinstance(e, (KeyboardInterrupt, SystemExit)):
                _log_error(out, d, f"error: {type(e).__name__}: {e} (traceback on stderr)")
            set_status(out, d, "failed")
            if d.world_size == 1:
                raise
            import traceback
            traceback.print_exc()  # os._exit below would otherwise swallow it
            print(f"error: rank {d.rank} failed", file=sys.stderr)
    finally:
        leave_distributed(d, code)
    if code == 2 and d.main and (out / "log.txt").exists():
        set_status(out, d, "failed")
    return code


def _log_error(out, d, msg):
    """The terminal gets the error from main(); log.txt must tell the same story (a full disk must not hide the
    error itself)."""
    if d.main and (out / "log.txt").exists():
        with contextlib.suppress(OSError):
            with open(out / "log.txt", "a") as f:
                f.write(msg + "\n")


if __name__ == "__main__":
    env.cli(main, help=config_help)
