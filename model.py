"""The MusicGen language model: codebook patterns, the transformer (AudioCraft's weights), CFG dropout, the loss,
generation with a static KV cache and classifier-free guidance, and build_lm, which turns settings into a model.

    python model.py                                     # the default LMConfig: parameters and training FLOPs
    python model.py --dim=1536 --n_layers=48 --n_heads=24   # another size (any LMConfig field as --key=value)
    python formats.py lm //reference/musicgen-small     # a released state_dict.bin (formats.py reads and writes files)

Weight compatibility: parameter names and shapes are AudioCraft's `LMModel` (emb.{k}, transformer.layers.{i}.
{self_attn,cross_attention}.in_proj_weight (fused Q|K|V), out_proj, linear1/2, norm1/norm_cross/norm2, out_norm,
linears.{k}, condition_provider.conditioners.description.output_proj), so a released `state_dict.bin` loads strictly
and our `best_state` exports without renaming. Shapes: B batch, K codebooks (n_q), T frames, S sequence steps of the
codebook pattern, L text positions, card codebook size (the special "no code" token is card).

Speed: `layer.compile()` on each of model.transformer.layers compiles in place and keeps the state-dict names;
`compile_decode(lm)` compiles the decode-and-sample step with static shapes (CUDA graphs on a GPU); compute_loss
does no host sync (it checks code values only for CPU tensors).

Sampling (generate.py and train.py's generate stage): `sample(lm, descriptions, n_frames, window=..., seeds=...)`.
"""
import contextlib
import functools
import math
import numbers
import re
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import melody as melody_lib
import text
from env import UserError, cli, parse_options
from text import sin_embedding  # AudioCraft's create_sin_embedding; the lookup-table text encoder shares it

PATTERNS = ("delay", "parallel", "unroll", "coarse_first", "musiclm")
FUSES = ("cross", "prepend", "sum")
# The precisions a model computes in (autocast dtype, --dtype): train.py, generate.py and bench.py
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LMConfig:
    dim: int = 1024
    n_layers: int = 24
    n_heads: int = 16
    hidden_scale: int = 4
    n_q: int = 4
    card: int = 2048
    pattern: str = "delay"            # delay | parallel | unroll | coarse_first | musiclm
    delays: tuple = ()                # empty: range(n_q) for delay, zeros for unroll / coarse_first (n_q - 1 of them)
    text_dim: int = 768
    fuse: str = "cross"               # cross | prepend | sum (sum adds the masked mean of the condition)
    mask_memory: bool = False         # mask padded text positions (released models were trained without)
    dropout: float = 0.0
    cfg_dropout: float = 0.3
    cfg_dropout_per_batch: bool = False   # AudioCraft: one coin for the whole batch
    max_period: float = 10000.0
    attributes: tuple = ()            # more text conditions (sidecar fields), each NAME or NAME:FUSE (default: fuse)
    chroma_fuse: str = ""             # the melody condition self_wav (melody.py): "" none | prepend | cross
    attribute_dropout: tuple = ()     # NAME:P: training drops condition NAME with probability P (e.g. self_wav:0.5)
    attribute_dropout_per_batch: bool = False   # AudioCraft: one coin per attribute for the whole batch


def check_config(cfg):
    if cfg.pattern not in PATTERNS:
        raise UserError(f'pattern="{cfg.pattern}" is not one of {", ".join(PATTERNS)}')
    if cfg.fuse not in FUSES:
        raise UserError(f'fuse="{cfg.fuse}" is not one of {", ".join(FUSES)}')
    attribute_dropout(cfg)   # checks attributes and chroma_fuse too
    if cfg.dim % cfg.n_heads:
        raise UserError(f"dim={cfg.dim} is not a multiple of n_heads={cfg.n_heads}")
    if cfg.dim < 4 or cfg.dim % 2:
        raise UserError(f"dim={cfg.dim} must be even and at least 4 (sinusoidal positions)")
    pattern_delays(cfg.pattern, cfg.n_q, cfg.delays)


MELODY = "self_wav"                 # the chroma condition's name (AudioCraft's, in its state dict and xp.cfg)
CHROMA_FUSES = ("prepend", "cross")  # a chroma has its own length: AudioCraft's sum needs the music's


def condition_fuses(cfg):
    """{condition name: fuse} in the order AudioCraft's fuser applies them: text conditions (description, then the
    attributes), then the melody. Prepended conditions end up in reverse order before the music (each goes in
    front of the ones before it), cross-attended ones one after the other in the memory."""
    fuses = {"description": cfg.fuse}
    for spec in cfg.attributes:
        name, _, fuse = str(spec).partition(":")
        fuse = fuse or cfg.fuse
        if not name.isidentifier() or name in fuses or name == MELODY:
            raise UserError(f"attributes={list(cfg.attributes)}: {name!r} must be a field name (genre, moods...), given "
                            f"once, other than description and {MELODY}")
        if fuse not in FUSES:
            raise UserError(f"attributes: {spec!r}: fuse {fuse!r} is not one of {', '.join(FUSES)}")
        fuses[name] = fuse
    if cfg.chroma_fuse:
        if cfg.chroma_fuse not in CHROMA_FUSES:
            raise UserError(f'chroma_fuse="{cfg.chroma_fuse}" is not one of "", {", ".join(CHROMA_FUSES)}')
        fuses[MELODY] = cfg.chroma_fuse
    return fuses


def attribute_dropout(cfg):
    """{condition name: probability} from attribute_dropout's NAME:P entries, checked against the conditions."""
    names, out = condition_fuses(cfg), {}
    for spec in cfg.attribute_dropout:
        name, _, p = str(spec).partition(":")
        try:
            p = float(p)
        except ValueError:
            p = None
        if name not in names or p is None or not 0 <= p <= 1 or name in out:
            raise UserError(f"attribute_dropout={list(cfg.attribute_dropout)}: {spec!r} must be NAME:P once per "
                            f"condition, with NAME one of {', '.join(names)} and P in [0, 1]")
        out[name] = p
    return out


# ----------------------------------------------------------------------------------------------------------
# Codebook patterns (AudioCraft's `codebooks_patterns.py` semantics)

def pattern_delays(pattern, n_q, delays=()):
    """The delays a pattern uses, defaults filled in and checked."""
    delays = tuple(int(d) for d in delays)
    need = {"delay": n_q, "unroll": n_q, "coarse_first": n_q - 1}.get(pattern, 0)
    if pattern == "delay" and not delays:
        delays = tuple(range(n_q))
    elif pattern in ("unroll", "coarse_first") and not delays:
        delays = (0,) * need
    elif pattern in ("parallel", "musiclm"):
        if any(delays):
            raise UserError(f"delays={list(delays)}: the {pattern} pattern takes no delays (leave delays empty)")
        return ()
    if len(delays) != need:
        raise UserError(f"delays={list(delays)} has {len(delays)} entries; the {pattern} pattern with n_q={n_q} "
                        f"needs {need}")
    if list(delays) != sorted(delays) or min(delays, default=0) < 0:
        raise UserError(f"delays={list(delays)} must be non-negative and non-decreasing")
    if pattern == "musiclm" and n_q % 2:
        raise UserError(f"the musiclm pattern groups codebooks by 2: n_q={n_q} must be even")
    return delays


def pattern_layout(pattern, n_q, T, delays=()):
    """AudioCraft's layout: for each sequence step the (t, q) codes it holds; step 0 is empty (all special)."""
    delays = pattern_delays(pattern, n_q, delays)
    layout = [[]]
    if pattern in ("delay", "parallel"):
        delays = delays or (0,) * n_q
        for s in range(T + max(delays)):
            layout.append([(s - d, q) for q, d in enumerate(delays) if s - d >= 0])
    elif pattern == "unroll":
        # one inner step per codebook; a delay moves that codebook's steps later, then steps are sorted
        steps, end = [], T + max(delays)
        for t in range(end):
            for q, d in enumerate(delays):
                if t + d < end:
                    steps.append((t + d, [(t, q)]))
        layout += [coords for _, coords in sorted(steps)]
    elif pattern == "coarse_first":
        layout += [[(t, 0)] for t in range(T)]
        for s in range(T + max(delays, default=0)):
            layout.append([(s - d, q + 1) for q, d in enumerate(delays) if s - d >= 0])
    elif pattern == "musiclm":
        for first in range(0, n_q, 2):
            layout += [[(t, q)] for t in range(T) for q in (first, first + 1)]
    return layout


@dataclass
class PatternTables:
    """Index tables that turn build/revert into one gather each. Flat code index q*T+t, K*T = special."""
    S: int
    seq_index: torch.Tensor   # [K, S] flat code index at each sequence position
    seq_mask: torch.Tensor    # [K, S] bool: a real code sits there
    tgt_index: torch.Tensor   # [K, S] flat index of the code the output at each position predicts
    code_step: torch.Tensor   # [K, T] sequence step holding code (t, q); S where absent
    out_index: torch.Tensor   # [K, T] flat index q*S+s of the output predicting code (t, q) (0 where none)
    out_mask: torch.Tensor    # [K, T] bool: some output predicts code (t, q)


@functools.lru_cache(maxsize=64)
def pattern_tables(pattern, n_q, delays, T, valid_only, device="cpu"):
    """Cached per length and device. valid_only: AudioCraft's keep_only_valid_steps (training), else the full
    layout (generation)."""
    if str(device) != "cpu":
        cpu = pattern_tables(pattern, n_q, delays, T, valid_only)
        return PatternTables(cpu.S, *(getattr(cpu, f.name).to(device) for f in fields(cpu)[1:]))
    layout = pattern_layout(pattern, n_q, T, delays)
    if valid_only:
        max_delay = max([t + 1 for coords in layout[1:] for t, _ in coords] + [T]) - T
        layout = layout[:len(layout) - max_delay]
    S, K = len(layout), n_q
    seq_index = np.full((K, S), K * T, dtype=np.int64)
    code_step = np.full((K, T), S, dtype=np.int64)
    for s, coords in enumerate(layout):
        for t, q in coords:
            if t < T:
                seq_index[q, s] = q * T + t
                code_step[q, t] = s
    # the output at position s predicts the codes of step s + 1 (step 0 is the all-special start)
    tgt_index = np.concatenate([seq_index[:, 1:], np.full((K, 1), K * T, dtype=np.int64)], axis=1)
    out_mask = code_step < S
    out_index = np.where(out_mask, np.arange(K)[:, None] * S + code_step - 1, 0)
    t = torch.from_numpy
    return PatternTables(S, t(seq_index), t(seq_index != K * T), t(tgt_index), t(code_step), t(out_index),
                         t(out_mask))


def build_sequence(codes, tables, special):
    """codes [B, K, T] -> sequence [B, K, S], `special` where the pattern holds no code."""
    B, K, T = codes.shape
    flat = torch.cat([codes.reshape(B, K * T), codes.new_full((B, 1), special)], 1)
    return flat.index_select(1, tables.seq_index.reshape(-1)).view(B, K, tables.S)


def revert_sequence(sequence, tables, special):
    """sequence [B, K, S] -> codes [B, K, T], `special` where the sequence holds no code for (t, q)."""
    B, K, S = sequence.shape
    flat = torch.cat([sequence.reshape(B, K * S), sequence.new_full((B, 1), special)], 1)
    index = tables.code_step + torch.arange(K, device=sequence.device)[:, None] * S
    index = torch.where(tables.code_step < S, index, K * S)
    return flat.index_select(1, index.reshape(-1)).view(B, K, -1)


def revert_logits(logits, tables):
    """logits [B, K, S, card] (output s predicts step s+1) -> ([B, K, T, card] aligned with codes, NaN where no
    output predicts a code, mask [K, T])."""
    B, K, S, card = logits.shape
    out = logits.reshape(B, K * S, card).index_select(1, tables.out_index.reshape(-1)).view(B, K, -1, card)
    return out.masked_fill(~tables.out_mask[None, :, :, None], float("nan")), tables.out_mask


# ----------------------------------------------------------------------------------------------------------
# The transformer

def _pooled(cond, mask):
    """AudioCraft's sum fuse adds a condition of matching length; for text we add its masked mean to every step.
    cond [B, L, dim] (zeros where masked), mask [B, L] -> [B, 1, dim]"""
    return cond.sum(1, keepdim=True) / mask.sum(-1).clamp(min=1)[:, None, None].to(cond.dtype)


def _dropout(x, p):
    return F.dropout(x, p, True) if p > 0 else x


def _coins(p, per_batch, n):
    """n bools, each True with probability p (torch's global RNG; one coin for all with per_batch); none drawn
    when p is 0."""
    if p <= 0:
        return [False] * n
    drop = (torch.rand(1 if per_batch else n) < p).tolist()
    return drop * n if per_batch else drop


def _null_rows(values, drop):
    """The dropped rows of one condition's values made null: None in a list of texts, -1 in chroma classes [B, T]."""
    if values is None or not any(drop):
        return values if values is None or isinstance(values, torch.Tensor) else list(values)
    if isinstance(values, torch.Tensor):
        return torch.where(torch.tensor(drop, device=values.device)[:, None], -1, values)
    return [None if d else v for d, v in zip(drop, values)]


@dataclass
class Fused:
    """The conditions fused with the input (MusicGenLM._fuse)."""
    x: torch.Tensor          # [B, P + S, dim]: the prefix, then the input with the sum term added
    memory: object           # [B, L, dim] the cross-attention memory, or None
    cross_mask: object       # [B, 1, 1, L] bool (mask_memory) or None
    prefix_valid: object     # [B, P] bool: the prefix's real positions (mask_memory), or None
    add: object              # [B, 1, dim] the sum term, or None
    P: int                   # prepended positions


class Attention(nn.Module):
    """The parameters (AudioCraft's names) and the fused projection; the attention itself lives in Layer.forward."""

    def __init__(self, dim):
        super().__init__()
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))   # rows Q | K | V, heads contiguous
        self.out_proj = nn.Linear(dim, dim, bias=False)
        nn.init.kaiming_uniform_(self.in_proj_weight, a=math.sqrt(5))    # nn.Linear's default, as AudioCraft keeps it

    def project(self, x, rows=slice(None), weight=None):
        """x [..., dim] -> x W[rows]^T for the fused W = in_proj_weight (rows Q | K | V, or a part of them); weight:
        W[rows] when the caller already split it. The one place W is applied: adapters.py adds its update here."""
        return F.linear(x, self.in_proj_weight[rows] if weight is None else weight)


class Layer(nn.Module):
    """Pre-norm: x += self_attn(norm1 x); x += cross_attention(norm_cross x, memory); x += ffn(norm2 x)."""

    def __init__(self, cfg: LMConfig, cross: bool):
        super().__init__()
        d, hidden = cfg.dim, cfg.hidden_scale * cfg.dim
        self.n_heads, self.dropout = cfg.n_heads, cfg.dropout
        # registration order = AudioCraft's state_dict order
        self.self_attn = Attention(d)
        self.linear1 = nn.Linear(d, hidden, bias=False)
        self.linear2 = nn.Linear(hidden, d, bias=False)
        self.norm1 = nn.LayerNorm(d, eps=1e-5)
        self.norm2 = nn.LayerNorm(d, eps=1e-5)
        if cross:
            self.cross_attention = Attention(d)
            self.norm_cross = nn.LayerNorm(d, eps=1e-5)
        else:
            self.cross_attention = None

    def _split(self, x):  # [B, T, dim] -> [B, H, T, D]
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, -1).transpose(1, 2)

    def _merge(self, x):  # [B, H, T, D] -> [B, T, dim]
        B, H, T, D = x.shape
        return x.transpose(1, 2).reshape(B, T, H * D)

    def forward(self, x, memory=None, self_mask=None, cross_mask=None, kv=None, positions=None, cross_kv=None):
        """x [B, T, dim]. Training: kv None, causal unless self_mask. Cached: kv = (k, v) [B, H, Smax, D] written at
        `positions` [T] and read whole under self_mask. cross_kv: precomputed cross-attention (k, v) [B, H, L, D]."""
        p = self.dropout if self.training else 0.0
        d = x.shape[-1]
        q, k, v = self.self_attn.project(self.norm1(x)).chunk(3, -1)
        q, k, v = self._split(q), self._split(k), self._split(v)
        if kv is not None:
            kv[0].index_copy_(2, positions, k.to(kv[0].dtype))
            kv[1].index_copy_(2, positions, v.to(kv[1].dtype))
            k, v = kv
        causal = self_mask is None and kv is None
        a = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=self_mask,
                                           is_causal=causal, dropout_p=p)
        x = x + _dropout(self.self_attn.out_proj(self._merge(a)), p)
        if self.cross_attention is not None:
            # one split, not two slices: the backward then writes one [3 dim, dim] gradient, not two zero-filled ones
            attn = self.cross_attention
            w_q, w_kv = attn.in_proj_weight.split([d, 2 * d])
            q = self._split(attn.project(self.norm_cross(x), slice(0, d), w_q))
            if cross_kv is None:
                k, v = (self._split(t) for t in attn.project(memory, slice(d, None), w_kv).chunk(2, -1))
            else:
                k, v = cross_kv
            a = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=cross_mask, dropout_p=p)
            x = x + _dropout(self.cross_attention.out_proj(self._merge(a)), p)
        h = _dropout(F.gelu(self.linear1(self.norm2(x))), p)
        return x + _dropout(self.linear2(h), p)


class Transformer(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        cross = "cross" in condition_fuses(cfg).values()
        self.layers = nn.ModuleList([Layer(cfg, cross=cross) for _ in range(cfg.n_layers)])


class ProjectedCondition(nn.Module):
    """Text-encoder states -> LM width (AudioCraft's output_proj), zeroed where masked. For precomputed states."""

    def __init__(self, text_dim, dim):
        super().__init__()
        self.output_proj = nn.Linear(text_dim, dim)

    def forward(self, states, mask):  # states [B, L, text_dim], mask [B, L] -> ([B, L, dim], mask)
        return self.output_proj(states) * mask[..., None].to(states.dtype), mask


@dataclass
class DecodeCache:
    """Static per-generation state: every tensor is allocated before the first step."""
    k: list            # per layer [N, H, Smax, D]
    v: list
    cross_kv: list     # per layer (k, v) [N, H, L, D], or None per layer (no cross-attention)
    cross_mask: object  # [N, 1, 1, L] bool or None
    key_valid: object   # [N, Smax] bool or None (prepend + mask_memory)
    fuse_add: object    # [N, 1, dim] or None (sum fuse)
    pos_table: torch.Tensor  # [Smax, dim] float32
    heads: torch.Tensor      # [K * card, dim] the output heads' weights, concatenated once


class MusicGenLM(nn.Module):
    """conditioner: the description's conditioner, or {condition name: conditioner} for several (condition_fuses);
    a text condition without one gets ProjectedCondition, the melody melody.ChromaConditioner(duration)."""

    def __init__(self, cfg: LMConfig, conditioner: nn.Module | dict | None = None, duration: float = 30.0):
        super().__init__()
        check_config(cfg)
        self.cfg = cfg
        self.delays = pattern_delays(cfg.pattern, cfg.n_q, cfg.delays)
        self.fuses = condition_fuses(cfg)
        self.drop_p = attribute_dropout(cfg)
        given = conditioner if isinstance(conditioner, dict) else {"description": conditioner}
        unknown = set(given) - set(self.fuses)
        if unknown:
            raise UserError(f"conditioners {sorted(unknown)} have no condition in the config ({', '.join(self.fuses)})")
        # AudioCraft's module path, so the conditioners' parameters carry its state_dict names
        self.condition_provider = nn.Module()
        self.condition_provider.conditioners = nn.ModuleDict({
            name: given[name] if given.get(name) is not None else
            melody_lib.ChromaConditioner(cfg.dim, duration) if name == MELODY else
            ProjectedCondition(cfg.text_dim, cfg.dim) for name in self.fuses})
        self.emb = nn.ModuleList([nn.Embedding(cfg.card + 1, cfg.dim) for _ in range(cfg.n_q)])
        self.transformer = Transformer(cfg)
        self.out_norm = nn.LayerNorm(cfg.dim, eps=1e-5)
        self.linears = nn.ModuleList([nn.Linear(cfg.dim, cfg.card, bias=False) for _ in range(cfg.n_q)])
        self._init_weights()

    @property
    def conditioner(self):
        return self.condition_provider.conditioners.description

    @property
    def melody(self):
        """The chroma conditioner (melody.ChromaConditioner), or None for a model without a melody condition."""
        return self.condition_provider.conditioners[MELODY] if MELODY in self.fuses else None

    def condition(self, values, sampling=False):
        """{name: per-row values} -> {name: (condition [B, L, dim], mask [B, L])} for every condition of the model, in
        fuse order. Text conditions take a list of strings (None or "": none); the melody chroma classes [B, T]
        int64 (-1: none). A condition missing from values (or None) is absent for every row. sampling: the melody
        as AudioCraft samples it (ChromaConditioner.forward), else as its loss sees it."""
        B = next((len(v) for v in values.values() if v is not None), None)
        if B is None:
            raise UserError(f"condition: no values for any of {', '.join(self.fuses)}")
        out = {}
        for name in self.fuses:
            value, conditioner = values.get(name), self.condition_provider.conditioners[name]
            if name == MELODY:
                device = conditioner.output_proj.weight.device
                value = torch.full((B, conditioner.frames), -1, dtype=torch.long, device=device) if value is None \
                    else value.to(device)
                out[name] = conditioner(value, sampling=sampling)
            else:
                out[name] = conditioner(list(value) if value is not None else [None] * B)
        return out

    def _init_weights(self):
        """AudioCraft's gaussian init with depthwise 'current' scaling; in_proj_weight and the conditioner keep
        their default init, LayerNorms (1, 0)."""
        def trunc(w, std):
            # normal truncated at 3 std by the inverse CDF, one pass (torch 2.1's trunc_normal_, which AudioCraft
            # ran; newer torch rejection-samples, several times slower on big tables)
            lo, hi = (1 + math.erf(-3 / math.sqrt(2))) / 2, (1 + math.erf(3 / math.sqrt(2))) / 2
            with torch.no_grad():
                w.uniform_(2 * lo - 1, 2 * hi - 1).erfinv_().mul_(std * math.sqrt(2)).clamp_(-3 * std, 3 * std)
        for emb in self.emb:
            trunc(emb.weight, 1 / math.sqrt(self.cfg.dim))
        for i, layer in enumerate(self.transformer.layers):
            for m in layer.modules():
                if isinstance(m, nn.Linear):
                    trunc(m.weight, 1 / math.sqrt(m.in_features) / math.sqrt(2 * (i + 1)))
        for linear in self.linears:
            trunc(linear.weight, 1 / math.sqrt(self.cfg.dim))

    # ---- input checks: clear errors instead of index errors deep inside torch

    def check_codes(self, codes, name="codes", allow_special=True, values=None):
        cfg = self.cfg
        if not isinstance(codes, torch.Tensor) or codes.dim() != 3 or codes.dtype.is_floating_point \
                or codes.dtype == torch.bool:
            raise UserError(f"{name}: expected an integer tensor [B, K, T], got "
                            f"{type(codes).__name__} {tuple(getattr(codes, 'shape', ()))}")
        if codes.shape[1] != cfg.n_q:
            raise UserError(f"{name}: {codes.shape[1]} codebooks (shape {tuple(codes.shape)}) but the model has "
                            f"n_q={cfg.n_q}: use a codec with {cfg.n_q} codebooks or set n_q")
        # the value check needs the values on the host: free on CPU, a sync on an accelerator (asked for by
        # generate, skipped on the training path)
        if values is None:
            values = codes.device.type == "cpu" and not torch.compiler.is_compiling()
        if values:
            top = cfg.card if allow_special else cfg.card - 1
            if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > top):
                raise UserError(f"{name}: values in [{int(codes.min())}, {int(codes.max())}] outside [0, {top}] "
                                f"(card={cfg.card}): codes from a codec with a different codebook size?")

    def check_condition(self, condition, mask, batch=None, name="condition"):
        cfg = self.cfg
        if not isinstance(condition, torch.Tensor) or condition.dim() != 3:
            raise UserError(f"{name}: expected a tensor [B, L, {cfg.dim}], got "
                            f"{type(condition).__name__} {tuple(getattr(condition, 'shape', ()))}")
        if condition.shape[-1] != cfg.dim:
            hint = " (raw text-encoder states? pass them through model.conditioner first)" \
                if condition.shape[-1] == cfg.text_dim else ""
            raise UserError(f"{name}: width {condition.shape[-1]} but the model's dim is {cfg.dim}{hint}")
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(condition.shape[:2]):
            raise UserError(f"{name}_mask: shape {tuple(getattr(mask, 'shape', ()))} does not match "
                            f"{name} [B, L] = {tuple(condition.shape[:2])}")
        if batch is not None and condition.shape[0] != batch:
            raise UserError(f"{name}: batch {condition.shape[0]} but codes have batch {batch}")

    def _conditions(self, condition, mask, batch=None):
        """The conditions as {name: (condition, mask)}, checked: one tensor and its mask is the description's (a model
        with that one condition); several come as the dict condition() returns."""
        if not isinstance(condition, dict):
            if len(self.fuses) > 1:
                raise UserError(f"condition: this model has the conditions {', '.join(self.fuses)}: pass "
                                f"{{name: (condition, mask)}} (model.condition builds it)")
            condition = {"description": (condition, mask)}
        if set(condition) != set(self.fuses):
            raise UserError(f"condition: has {', '.join(condition)}; the model's are {', '.join(self.fuses)}")
        for name, value in condition.items():
            if not isinstance(value, (tuple, list)) or len(value) != 2:
                raise UserError(f"condition {name}: expected (condition [B, L, {self.cfg.dim}], mask [B, L])")
            self.check_condition(*value, batch, name=name if len(self.fuses) > 1 else "condition")
            batch = value[0].shape[0]
        return condition

    # ---- the network

    def _embed(self, sequence):  # [B, K, S] -> [B, S, dim]
        return sum(self.emb[k](sequence[:, k]) for k in range(self.cfg.n_q))

    def head_weight(self):
        """The output layers' weights as one [K * card, dim] matrix (one matmul for every codebook); adapters.py adds
        its update here."""
        return torch.cat([linear.weight for linear in self.linears], 0)

    def _heads(self, h, w=None):  # [B, S, dim] -> [B, S, K, card]: one matmul for all codebooks
        w = self.head_weight() if w is None else w
        return F.linear(h, w).unflatten(-1, (self.cfg.n_q, self.cfg.card))

    def _fuse(self, x, conditions):
        """x [B, S, dim] and {name: (condition, mask)} -> Fused, in AudioCraft's fuser order (condition_fuses)."""
        prefix, memory, add = [], [], None
        for name, fuse in self.fuses.items():
            condition, mask = conditions[name]
            mask = mask.bool()
            cond = condition * mask[..., None].to(condition.dtype)
            if fuse == "cross":
                memory.append((cond, mask))
            elif fuse == "sum":
                pooled = _pooled(cond, mask)
                add = pooled if add is None else add + pooled
            else:
                prefix.insert(0, (cond, mask))        # each prepended condition goes before the ones before it
        if add is not None:
            x = x + add.to(x.dtype)
        cross, cross_mask, prefix_valid = None, None, None
        if memory:
            cross = memory[0][0] if len(memory) == 1 else torch.cat([c.to(x.dtype) for c, _ in memory], 1)
            if self.cfg.mask_memory:
                mask = torch.cat([m for _, m in memory], 1)
                # a row with no condition attends to its zero memory, which gives 0 as with no mask
                cross_mask = (mask | ~mask.any(-1, keepdim=True))[:, None, None, :]
        if prefix:
            x = torch.cat([c.to(x.dtype) for c, _ in prefix] + [x], 1)
            if self.cfg.mask_memory:
                prefix_valid = torch.cat([m for _, m in prefix], 1)
        return Fused(x, cross, cross_mask, prefix_valid, add, sum(m.shape[1] for _, m in prefix))

    def _hidden(self, sequence, condition, condition_mask=None):  # -> [B, S, dim] after out_norm
        f = self._fuse(self._embed(sequence), self._conditions(condition, condition_mask))
        x = f.x + sin_embedding(torch.arange(f.x.shape[1], device=f.x.device), self.cfg.dim,
                                self.cfg.max_period).to(f.x.dtype)
        self_mask = None
        if f.prefix_valid is not None:
            B, n = x.shape[:2]
            idx = torch.arange(n, device=x.device)
            key_valid = torch.cat([f.prefix_valid, f.prefix_valid.new_ones(B, n - f.P)], 1)
            self_mask = ((idx[None, :] <= idx[:, None]) & (key_valid[:, None, :] | (idx[None, :] == idx[:, None])))
            self_mask = self_mask[:, None]
        for layer in self.transformer.layers:
            x = layer(x, f.memory, self_mask, f.cross_mask)
        return self.out_norm(x[:, f.P:])

    def forward(self, sequence, condition, condition_mask=None):
        """sequence [B, K, S] pattern steps -> logits [B, K, S, card]; output s predicts step s + 1. condition: the
        description's [B, L, dim] with condition_mask [B, L], or {name: (condition, mask)} (model.condition)."""
        return self._heads(self._hidden(sequence, condition, condition_mask)).permute(0, 2, 1, 3)

    def _tables(self, T, valid_only, device):
        return pattern_tables(self.cfg.pattern, self.cfg.n_q, self.delays, T, valid_only, str(device))

    def compute_predictions(self, codes, condition, condition_mask=None):
        """codes [B, K, T] -> (logits [B, K, T, card] aligned with codes (NaN where the pattern gives no
        prediction), mask [B, K, T] bool)."""
        self.check_codes(codes)
        condition = self._conditions(condition, condition_mask, codes.shape[0])
        B, K, T = codes.shape
        tables = self._tables(T, True, codes.device)
        logits = self(build_sequence(codes, tables, self.cfg.card), condition, condition_mask)
        logits, mask = revert_logits(logits, tables)
        return logits, mask[None].expand(B, -1, -1)

    def compute_loss(self, codes, condition, condition_mask=None, valid=None):
        """Masked per-codebook cross-entropy, averaged over codebooks (each over its own targets, AudioCraft's
        weighting). valid [B, T] bool marks real audio frames: padded frames are neither inputs (special token)
        nor targets; codes equal to card count as padding too. -> (ce, ce_per_q [K] detached). No host sync."""
        self.check_codes(codes)
        condition = self._conditions(condition, condition_mask, codes.shape[0])
        B, K, T = codes.shape
        card = self.cfg.card
        if valid is not None:
            if tuple(valid.shape) != (B, T):
                raise UserError(f"valid: shape {tuple(valid.shape)} but codes are [B, K, T] = {tuple(codes.shape)}")
            codes = torch.where(valid[:, None, :].bool(), codes, card)
        tables = self._tables(T, True, codes.device)
        sequence = build_sequence(codes, tables, card)                                  # [B, K, S]
        flat = torch.cat([codes.reshape(B, K * T), codes.new_full((B, 1), card)], 1)
        targets = flat.index_select(1, tables.tgt_index.reshape(-1)).view(B, K, -1)     # [B, K, S]
        targets = targets.transpose(1, 2)                                                # [B, S, K] like the logits
        ignore = targets == card
        logits = self._heads(self._hidden(sequence, condition, condition_mask))          # [B, S, K, card]
        ce = F.cross_entropy(logits.reshape(-1, card).float(), targets.masked_fill(ignore, -100).reshape(-1),
                             ignore_index=-100, reduction="none").view(B, -1, K)
        ce_per_q = ce.sum((0, 1)) / (~ignore).sum((0, 1)).clamp(min=1)
        return ce_per_q.mean(), ce_per_q.detach()

    # ---- classifier-free-guidance dropout, attribute dropout

    def cfg_dropout(self, descriptions):
        """Training: each description becomes None with probability cfg_dropout (one coin for the whole batch
        with cfg_dropout_per_batch), drawn from torch's global RNG. Eval: unchanged."""
        descriptions = list(descriptions)
        if not self.training:
            return descriptions
        drop = _coins(self.cfg.cfg_dropout, self.cfg.cfg_dropout_per_batch, len(descriptions))
        return _null_rows(descriptions, drop)

    def drop_conditions(self, values):
        """Training: CFG dropout nulls every condition of a row (text None, melody -1) with probability cfg_dropout,
        then attribute dropout nulls condition NAME with its attribute_dropout probability; per row, or one coin
        per batch with cfg_dropout_per_batch / attribute_dropout_per_batch (AudioCraft). values: condition()'s
        input, {name: per-row values} (the description's is required). Torch's global RNG. Eval: unchanged."""
        if not self.training:
            return dict(values)
        B = len(values["description"])
        drop_all = _coins(self.cfg.cfg_dropout, self.cfg.cfg_dropout_per_batch, B)
        out = {}
        for name in self.fuses:
            drop = drop_all
            if self.drop_p.get(name, 0) > 0:
                mine = _coins(self.drop_p[name], self.cfg.attribute_dropout_per_batch, B)
                drop = [a or b for a, b in zip(drop_all, mine)]
            out[name] = _null_rows(values.get(name), drop)
        return out

    # ---- generation

    def _compute_dtype(self, device):
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return self.out_norm.weight.dtype

    def _run_cached(self, x, positions, cache, n_keys=None):
        """x [N, P, dim] at `positions` [P] -> [N, P, dim] after out_norm, reading and writing the cache.
        n_keys None: attend over the whole static cache under a mask (static shapes). n_keys (a host int, the
        last position + 1): over the cache's first n_keys entries only, and with no mask for a single step."""
        x = x + cache.pos_table.index_select(0, positions)[None].to(x.dtype)
        n = cache.pos_table.shape[0] if n_keys is None else n_keys
        mask = None
        if n_keys is None or x.shape[1] > 1 or cache.key_valid is not None:
            keys = torch.arange(n, device=x.device)
            mask = keys[None, :] <= positions[:, None]                                  # [P, n]
            if cache.key_valid is not None:
                mask = mask[None] & (cache.key_valid[:, None, :n] | (keys[None, :] == positions[:, None])[None])
                mask = mask[:, None]                                                     # [N, 1, P, n]
            else:
                mask = mask[None, None]
        for i, layer in enumerate(self.transformer.layers):
            kv = (cache.k[i], cache.v[i]) if n_keys is None else (cache.k[i][:, :, :n], cache.v[i][:, :, :n])
            x = layer(x, None, mask, cache.cross_mask, kv=kv, positions=positions, cross_kv=cache.cross_kv[i])
        return self.out_norm(x)

    def decode_step(self, tokens, pos, cache, n_keys=None):
        """One generation step: tokens [N, K, 1] at position pos [1] (a tensor) -> logits [N, K, card] float32 for
        the next step. With n_keys None every shape is static (torch.compile(mode="reduce-overhead") replays it
        as a CUDA graph); eager generation passes n_keys = pos + 1 (a host int) to read only the written cache."""
        x = self._embed(tokens)
        if cache.fuse_add is not None:
            x = x + cache.fuse_add.to(x.dtype)
        return self._heads(self._run_cached(x, pos, cache, n_keys), cache.heads)[:, -1].float()

    def _start_cache(self, conditions, first, n_max):
        """Allocate the cache, compute cross-attention keys/values once and run the first chunk (prompt, or just
        the start step) -> (cache, logits [N, K, card] for the next step)."""
        cfg = self.cfg
        condition = next(iter(conditions.values()))[0]
        N, device = condition.shape[0], condition.device
        dtype = self._compute_dtype(device)
        f = self._fuse(self._embed(first), conditions)                                   # [N, P + P0, dim]
        x, memory, cross_mask, P = f.x, f.memory, f.cross_mask, f.P
        n_max += P
        H = cfg.n_heads
        shape = (N, H, n_max, cfg.dim // H)
        k = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.transformer.layers]
        v = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.transformer.layers]
        cross_kv = [None] * cfg.n_layers
        if memory is not None:
            for i, layer in enumerate(self.transformer.layers):
                kv = layer.cross_attention.project(memory, slice(cfg.dim, None))
                cross_kv[i] = tuple(layer._split(t) for t in kv.chunk(2, -1))
        key_valid = None
        if f.prefix_valid is not None:
            key_valid = torch.cat([f.prefix_valid, f.prefix_valid.new_ones(N, n_max - P)], 1)
        fuse_add = f.add
        pos_table = sin_embedding(torch.arange(n_max, device=device), cfg.dim, cfg.max_period)
        heads = self.head_weight()
        cache = DecodeCache(k, v, cross_kv, cross_mask, key_valid, fuse_add, pos_table, heads)
        if device.type == "cuda":
            # a CUDA graph of decode_step must neither copy these in at every replay nor skip the graph because
            # it writes into them: their addresses are fixed for this generation (a new one re-records the graph)
            for t in (*k, *v, *(t for kv in cross_kv if kv is not None for t in kv), pos_table, heads):
                torch._dynamo.mark_static_address(t)
        h = self._run_cached(x, torch.arange(x.shape[1], device=device), cache, x.shape[1])
        return cache, self._heads(h[:, -1:], heads)[:, -1].float()

    def sample_step(self, tokens, pos, cache, step, seeds, guided, cfg_coef, temperature, top_k, top_p, n_keys=None):
        """One decode step and its sampling: tokens [B, K, 1] (the codes of the last step) at position pos [1] ->
        codes [B, K] for sequence step `step` (int64 [1], a tensor so that a compiled step is not specialised on
        it). compile_decode compiles this whole function: the decode, the guidance and the ~25 small ops of the
        keyed noise in one graph (one CUDA graph with mode="reduce-overhead")."""
        if guided:
            tokens = torch.cat([tokens, tokens])
        logits = self.decode_step(tokens, pos, cache, n_keys)
        return pick_next(logits, step, seeds, guided, cfg_coef, temperature, top_k, top_p)

    @torch.no_grad()
    def null_conditions(self, batch, device, like=None):
        """{name: (condition, mask)} of no condition at all, for `batch` rows: zeros and an all-False mask for text (as
        long as `like`'s, so that both batch together; with cross-attention and no memory mask any length gives the
        same result), the conditioner's null() where it has one (the melody: the chroma of silence, as AudioCraft
        samples a model without a melody)."""
        out = {}
        for name in self.fuses:
            conditioner = self.condition_provider.conditioners[name]
            if hasattr(conditioner, "null"):
                out[name] = conditioner.null(batch, device)
                if like is not None and like[name][0].shape[1] != out[name][0].shape[1]:
                    raise UserError(f"condition {name}: {like[name][0].shape[1]} positions, but sampling takes "
                                    f"{out[name][0].shape[1]} (build it with model.condition(..., sampling=True))")
            elif like is not None:
                out[name] = (torch.zeros_like(like[name][0]), torch.zeros_like(like[name][1]))
            else:
                out[name] = (torch.zeros(batch, 1, self.cfg.dim, device=device),
                             torch.zeros(batch, 1, dtype=torch.bool, device=device))
        return out

    @torch.no_grad()
    def generate(self, condition, condition_mask, n_frames, cfg_coef=3.0, temperature=1.0, top_k=250, top_p=0.0,
                 prompt=None, generator=None, greedy=False, seeds=None, on_step=None):
        """condition [B, L, dim] with condition_mask [B, L] (the description's), or {name: (condition, mask)}
        (model.condition(..., sampling=True)), or None: unconditional; prompt [B, K, T0] codes kept as they are ->
        codes [B, K, n_frames]. With a condition and cfg_coef != 1, conditional and null-condition rows run as one
        batch: logits = uncond + cfg_coef * (cond - uncond). greedy or temperature 0: argmax; else softmax
        sampling with top_p (when > 0) or top_k (when > 0) from keyed_noise of the row seeds (int64 [B]): each
        row's music depends on its own seed only, not on its batch. Without seeds, the seeds are drawn from
        generator (or torch's global RNG). on_step() is called after every sampled step, outside any compiled
        code. A step compiled by compile_decode runs with static shapes (the whole cache under a mask)."""
        cfg = self.cfg
        device = self.out_norm.weight.device
        if prompt is not None:
            self.check_codes(prompt, "prompt", allow_special=False, values=True)
            prompt = prompt.to(device)
        if condition is not None:
            condition = self._conditions(condition, condition_mask)
        B = next(iter(condition.values()))[0].shape[0] if condition is not None else \
            prompt.shape[0] if prompt is not None else 1
        if prompt is not None and prompt.shape[0] != B:
            raise UserError(f"prompt: batch {prompt.shape[0]} but condition has batch {B}")
        greedy = greedy or temperature <= 0
        if greedy:
            seeds = None
        elif seeds is None:
            seeds = torch.randint(0, 2 ** 62, (B,), generator=generator,
                                  device=generator.device if generator is not None else "cpu")
        if seeds is not None:
            seeds = torch.as_tensor(seeds, dtype=torch.int64).to(device)
            if seeds.shape != (B,):
                raise UserError(f"seeds: {tuple(seeds.shape)} for a batch of {B}: one seed per row")
        T0 = 0 if prompt is None else prompt.shape[-1]
        if not 0 <= T0 < n_frames:
            raise UserError(f"n_frames={n_frames}: must exceed the prompt's {T0} frames")
        if condition is None:
            conditions, guided = self.null_conditions(B, device), False
        else:
            conditions = {name: (c.to(device), m.to(device).bool()) for name, (c, m) in condition.items()}
            guided = cfg_coef != 1.0
        if guided:
            # the null conditions batch with the conditional rows: the second half of the batch
            null = self.null_conditions(B, device, like=conditions)
            conditions = {name: (torch.cat([c, null[name][0].to(c.dtype)]), torch.cat([m, null[name][1]]))
                          for name, (c, m) in conditions.items()}

        tables = self._tables(n_frames, False, device)   # cached tables are made outside inference mode
        S = tables.S
        start = generation_steps(cfg, self.delays, n_frames, T0)[0]
        settings = (guided, cfg_coef, temperature, top_k, top_p)
        compiled = self.__dict__.get("compiled_step")    # set by compile_decode
        with torch.inference_mode():   # less work per op than no_grad alone; the codes are cloned out of it
            codes = torch.full((B, cfg.n_q, n_frames), -1, dtype=torch.long, device=device)  # -1: not generated
            if T0:
                codes[..., :T0] = prompt
            sequence = build_sequence(codes, tables, cfg.card)                           # [B, K, S]
            first = sequence[..., :start]
            cache, logits = self._start_cache(conditions, torch.cat([first, first]) if guided else first, S - 1)
            P = cache.pos_table.shape[0] - (S - 1)
            pos = torch.full((1,), P + start - 1, dtype=torch.long, device=device)
            step = torch.full((1,), start, dtype=torch.long, device=device)
            # compile_decode asked for this step compiled: it runs so even where the caller forces compiled code
            # eager (train.py's eval mode does, for its per-block compiled layers, which the prefill above ran)
            stance = torch.compiler.set_stance("default") if compiled is not None else contextlib.nullcontext()
            with stance:
                for s in range(start, S):
                    if s == start:
                        nxt = pick_next(logits, step, seeds, *settings)                     # [B, K]
                    else:
                        pos += 1
                        step += 1
                        tokens = sequence[..., s - 1:s]
                        if compiled is not None:
                            torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are no longer read
                            nxt = compiled(tokens, pos, cache, step, seeds, *settings)
                        else:
                            nxt = self.sample_step(tokens, pos, cache, step, seeds, *settings, n_keys=P + s)
                    # only unknown entries take the sample: prompt codes stay, steps without a code keep the special
                    sequence[..., s] = torch.where(sequence[..., s] == -1, nxt, sequence[..., s])
                    if on_step is not None:
                        on_step()
            codes = revert_sequence(sequence, tables, -1)
        return codes.clone()


def generation_steps(cfg, delays, n_frames, prompt_frames):
    """-> (first, S): generating n_frames after prompt_frames runs the pattern steps first..S-1, from the first step
    holding an unknown frame to the end of the layout (host-side tables)."""
    tables = pattern_tables(cfg.pattern, cfg.n_q, delays, n_frames, False)
    steps = tables.code_step[:, prompt_frames]
    return int(steps[steps < tables.S].min()), tables.S


def pick_next(logits, step, seeds, guided, cfg_coef, temperature, top_k, top_p):
    """Logits [N, K, card] of sequence step `step` -> codes [B, K]: guidance (N = 2B: conditional rows, then the
    null-condition rows), then sample_next with the keyed noise of the row seeds (None: greedy)."""
    if guided:
        cond, uncond = logits.chunk(2)
        logits = uncond + cfg_coef * (cond - uncond)
    if seeds is None:
        return logits.argmax(-1)
    return sample_next(logits, temperature, top_k, top_p, noise=functools.partial(keyed_noise, seeds, step))


def sample_next(logits, temperature=1.0, top_k=0, top_p=0.0, generator=None, greedy=False, noise=None):
    """logits [B, K, card] -> codes [B, K]. AudioCraft's rules: top_p wins over top_k; temperature 0 is greedy.
    Sampling uses exponential races (argmax p / E), which needs no host sync unlike torch.multinomial. The Exp(1)
    draws E come from generator, or from noise(index) for the vocabulary entries index [B, K, n] in the race
    (keyed_noise: the same entry at the same step always gets the same draw)."""
    if greedy or temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    if top_p > 0:
        probs, index = probs.sort(-1, descending=True)
        probs = probs.masked_fill(probs.cumsum(-1) - probs > top_p, 0.0)
    elif 0 < top_k < probs.shape[-1]:
        probs, index = probs.topk(top_k, -1)      # a race among k entries only, as AudioCraft samples among k
    else:
        index = torch.arange(probs.shape[-1], device=probs.device).expand(probs.shape)
    e = torch.empty_like(probs).exponential_(1.0, generator=generator) if noise is None else noise(index)
    return index.gather(-1, (probs / e).argmax(-1, keepdim=True))[..., 0]


def hash32(x):
    """A 32-bit integer mix (lowbias32's shape) on int64 tensors holding values in [0, 2**32): every product stays
    below 2**63, so it is exact on any device."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & 0xFFFFFFFF
    return x ^ (x >> 16)


def keyed_noise(seeds, step, index):
    """Exp(1) draws [B, K, n] for the vocabulary entries index [B, K, n] of codebooks 0..K-1, that depend only on
    (seeds[b], step, k, entry): a row draws the same numbers whatever else is in its batch, so a prompt and its
    seed give the same music alone or in any batch. seeds: int64 [B] in [0, 2**63) (the high 32 bits are folded
    in; hash32(0) = 0, so seeds below 2**32 draw what they always drew); step: an int or an int64 [1] tensor."""
    B, K = index.shape[:2]
    key = hash32(hash32(_fold(seeds)) ^ (step & 0xFFFFFFFF))                           # [B]
    entry = (torch.arange(K, device=index.device)[:, None] << 20) | index              # [B, K, n], card < 2**20
    bits = hash32(key[:, None, None] ^ ((entry * 0x9E3779B1) & 0xFFFFFFFF))
    u = ((bits >> 8).to(torch.float32) + 0.5) * 2.0 ** -24                            # uniform in (0, 1)
    return -torch.log(u)


def _fold(seeds):
    """int64 seeds in [0, 2**63) -> [0, 2**32): the high half hashed into the low one. hash32(0) = 0, so a seed
    below 2**32 is itself (what it drew before seeds could be larger), and seed + 2**32 is not seed."""
    return (seeds & 0xFFFFFFFF) ^ hash32(seeds >> 32)


def mix_seeds(seeds, stream):
    """Seeds for another stream of draws (a later window of a long generation) from the same per-row seeds."""
    return hash32(_fold(seeds) ^ hash32(torch.full_like(seeds, stream)))


# ----------------------------------------------------------------------------------------------------------
# The sampler: windows, prompts, per-row seeds and progress, for generate.py and train.py's generate stage

MAX_SEED = 2 ** 63 - 1


def window_plan(n_frames, window, stride, prompt_frames=0):
    """-> [(frames, prompt frames)] per window. A piece longer than one window (the model's context, in frames)
    slides: each window after the first starts from the last (window - stride) frames of the one before, as
    AudioCraft's extend_stride does. stride None: 0.6 x window (AudioCraft's 18 s for 30 s)."""
    stride = max(1, int(round(0.6 * window))) if stride is None else stride
    if not 0 <= prompt_frames < min(n_frames, window):
        raise UserError(f"prompt of {prompt_frames} frames: must be shorter than the piece ({n_frames} frames) and "
                        f"the model's context ({window} frames)")
    if n_frames > window and not 0 < stride < window:
        raise UserError(f"stride of {stride} frames: must be at least one frame and shorter than the model's context "
                        f"({window} frames)")
    plan, offset, t0 = [], 0, prompt_frames
    while True:
        length = min(n_frames - offset, window)
        plan.append((length, t0))
        if offset + length >= n_frames:
            return plan, stride
        offset, t0 = offset + stride, length - stride


def sample_steps(lm, plan):
    """LM steps the windows of a plan take (what on_step counts): per window, from its first step holding an
    unknown frame to the end of its layout."""
    return sum(S - first for first, S in (generation_steps(lm.cfg, lm.delays, n, t0) for n, t0 in plan))


def check_seeds(seeds, n):
    """seeds: one int per row in [0, MAX_SEED] -> int64 [n]."""
    seeds = list(seeds)
    if len(seeds) != n:
        raise UserError(f"seeds: {len(seeds)} for {n} descriptions: one seed per row")
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= MAX_SEED:
            raise UserError(f"seed {seed!r}: must be an integer between 0 and {MAX_SEED}")
    return torch.tensor([int(seed) for seed in seeds], dtype=torch.int64)


@torch.no_grad()
def sample(lm, descriptions, n_frames, *, window, stride=None, prompt=None, cfg_coef, top_k, top_p, temperature,
           seeds, on_step=None, melodies=None, frame_rate=None, attributes=None):
    """The sampler of generate.py and train.py's generate stage. descriptions (None or "": unconditional) ->
    codes [B, K, n_frames], starting with prompt's codes [B, K, T0] unchanged. Row b draws its randomness from
    seeds[b] alone (keyed_noise), so a description and its seed give the same codes alone or in any batch.
    Longer than `window` frames (the model's context), windows slide by `stride` frames (window_plan); window i > 0
    draws from mix_seeds(seeds, i). on_step(done, total) is called between decode steps (the place for progress
    and stop checks: a hook inside a compiled step would break fullgraph). Run under the caller's autocast;
    compile_decode(lm) beforehand for the compiled step.

    A melody model follows melodies: one chroma-class tensor [T_i] per row (ChromaConditioner.melody_classes;
    None: no melody), repeated periodically through the piece as AudioCraft's generate_with_chroma does; frame_rate
    (codes per second) places each window in it. attributes: {name: one text per row} for a model's other text
    conditions (missing: none)."""
    descriptions = [d or None for d in descriptions]
    seeds = check_seeds(seeds, len(descriptions))
    plan, stride = window_plan(n_frames, window, stride, 0 if prompt is None else prompt.shape[-1])
    total, done = sample_steps(lm, plan), 0
    if melodies is not None:
        if lm.melody is None:
            raise UserError("a melody was given, but this model has no melody (chroma) condition: leave the melody "
                            "out, or use a melody model")
        if len(melodies) != len(descriptions) or (len(plan) > 1 and not frame_rate):
            raise UserError(f"melodies: {len(melodies)} for {len(descriptions)} descriptions (one per row, None for "
                            f"none), and frame_rate to place windows in them")

    def step():
        nonlocal done
        done += 1
        on_step(done, total)
    conditions = lm.condition({"description": descriptions, **(attributes or {})}, sampling=True)
    pieces = []
    for i, (length, t0) in enumerate(plan):
        if melodies is not None:
            offset = 0 if i == 0 else i * stride / frame_rate
            classes = melody_lib.window_classes(melodies, offset, lm.melody.frames)            # [B, frames]
            conditions[MELODY] = lm.melody(classes.to(lm.melody.output_proj.weight.device), sampling=True)
        codes = lm.generate(conditions, None, length, cfg_coef=cfg_coef, temperature=temperature, top_k=top_k,
                            top_p=top_p, prompt=prompt if t0 else None, seeds=mix_seeds(seeds, i) if i else seeds,
                            on_step=step if on_step is not None else None)               # [B, K, length]
        pieces.append(codes[..., t0:] if pieces else codes)
        prompt = codes[..., stride:]
    return torch.cat(pieces, -1)


def compile_decode(lm, mode=None):
    """Compile lm's decode-and-sample step for generate()/sample(): static shapes (the whole KV cache under a
    mask), fullgraph; on CUDA mode "reduce-overhead" replays it as a CUDA graph (recorded again for each new
    cache, i.e. each window). Keeps the state dict untouched. -> lm. decompile_decode(lm) undoes it."""
    device = lm.out_norm.weight.device
    mode = mode or ("reduce-overhead" if device.type == "cuda" else "default")
    lm.compiled_step = torch.compile(lm.sample_step, mode=mode, fullgraph=True)
    return lm


def decompile_decode(lm):
    lm.__dict__.pop("compiled_step", None)
    return lm


def cache_bytes(cfg: LMConfig, rows, steps, cond_len, itemsize):
    """Bytes of generate()'s KV cache for `rows` (2 x batch with CFG) and `steps` pattern steps of one window:
    self-attention keys and values for every step (and prepended text), cross-attention ones for the text."""
    positions = steps + (cond_len if cfg.fuse == "prepend" else 0)
    cross = 2 * cond_len if cfg.fuse == "cross" else 0
    return rows * cfg.n_layers * cfg.dim * (2 * positions + cross) * itemsize


# ----------------------------------------------------------------------------------------------------------
# Size and speed

def num_params(model):
    """Parameters in the module tree (a frozen T5 kept out of it, as in AudioCraft, is not counted)."""
    return sum(p.numel() for p in model.parameters())


def flops_per_token(cfg: LMConfig, seq_len: int, cond_len: int) -> float:
    """Training FLOPs per sequence step (forward + backward = 3 x forward, 2 FLOPs per multiply-add): 6 x the
    matmul weights a step uses, attention as in nanoGPT / PaLM (full, not halved for causality), and the
    once-per-sequence text work (output_proj, cross-attention K/V on cond_len positions) spread over seq_len."""
    d, L, h = cfg.dim, cfg.n_layers, cfg.hidden_scale * cfg.dim
    dense = L * (4 * d * d + 2 * h * d)                                 # multiply-adds per step
    heads = cfg.n_q * cfg.card * d
    attn = L * 2 * d * seq_len                                          # QK^T and AV
    text = cfg.text_dim * d * cond_len                                  # per sequence
    if cfg.fuse == "cross":
        dense += L * 2 * d * d                                          # cross-attention Q and out
        text += L * 2 * d * d * cond_len                                # cross-attention K, V
        attn += L * 2 * d * cond_len
    elif cfg.fuse == "prepend":
        n = seq_len + cond_len                                          # the prefix runs through every layer
        dense *= n / seq_len
        attn = L * 2 * d * n * n / seq_len
    return 6.0 * (dense + heads + attn + text / seq_len)


# Peak dense bf16 FLOP/s per device (vendors' datasheets, torchtitan's table), for MFU; an unlisted device has none.
# Matched as whole words of the device name, the longest name first: "L40S" before "L40" before "L4", "H100 NVL"
# before "H100". GPUs without bf16 tensor cores (V100, T4) are not listed: train.py refuses bf16 there.
PEAK_FLOPS = {"H200 NVL": 835e12, "H200": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12,
              "A100": 312e12, "A10G": 125e12, "A10": 125e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12,
              "B200": 2.25e15, "MI300X": 1300e12}


def peak_flops(device, name=None):
    """Peak dense bf16 FLOP/s of a CUDA device (name: its torch.cuda.get_device_name), or None."""
    if name is None:
        if device.type != "cuda":
            return None
        name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):
        if re.search(rf"(?<![\w-]){re.escape(key)}(?!\w)", name):
            return PEAK_FLOPS[key]
    return None


# ----------------------------------------------------------------------------------------------------------
# Settings -> model: the one builder (train.py, generate.py, bench.py and formats.py's importers call it)

def lm_config(settings):
    """LMConfig from a dict holding its fields (train.py's Config, a config.json: lists become tuples); a missing
    field takes LMConfig's default, which is Config's."""
    return LMConfig(**{f.name: tuple(settings[f.name]) if isinstance(settings[f.name], list) else settings[f.name]
                       for f in fields(LMConfig) if f.name in settings})


def build_lm(settings, *, with_t5=True, meta=False):
    """The LM and its conditioners from settings: a dict of train.py Config's keys (LMConfig's fields and the
    conditioning keys of text.SETTINGS and melody.SETTINGS; other keys are ignored, a missing one takes Config's
    default).

    with_t5=False leaves a frozen T5 out: conditioner=t5 then gets ProjectedCondition, the projection after T5 that
    holds all of its trained weights (exports, importers, benchmarks on precomputed states). meta=True builds the
    LM's parameters on the meta device, uninitialised, for weights loaded with load_state_dict(assign=True); the
    conditioner is built for real either way (T5 reads its weights from disk, and is not part of a state dict)."""
    cfg = lm_config(settings)
    conditioners = {}
    if with_t5 or settings.get("conditioner", text.SETTINGS["conditioner"]) != "t5":
        conditioners = text.build_conditioners(settings, cfg.dim, [n for n in condition_fuses(cfg) if n != MELODY])
    with torch.device("meta") if meta else contextlib.nullcontext():
        if cfg.chroma_fuse:
            chroma = {k: settings.get(k, default) for k, default in melody_lib.SETTINGS.items()}
            conditioners[MELODY] = melody_lib.ChromaConditioner(cfg.dim, chroma["segment_duration"],
                                                                chroma["chroma_stems"])
        return MusicGenLM(cfg, conditioners)


def summary(model):
    """The model's config, parameters and training FLOPs per step (1500 steps, 64 text positions), two lines."""
    return (f"{model.cfg}\nparameters: {num_params(model):,}; training FLOPs per step at 1500 steps, 64 text tokens: "
            f"{flops_per_token(model.cfg, 1500, 64):.3e}")


def main(argv):
    _, o = parse_options(argv, LMConfig, usage="python model.py [--key=value ...] (LMConfig's fields)")
    print(summary(build_lm(o, with_t5=False, meta=True)))
    return 0


if __name__ == "__main__":
    cli(main)
