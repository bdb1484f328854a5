"""Low-rank adapters (LoRA) and freezing, for fine-tuning a released model on the GPU people have.

    python train.py config/base.py --continue_from=//reference/musicgen-small --lora_rank=16   # adapters on attention
    python train.py ... --lora_rank=16 --lora_targets=in_proj,out_proj,ffn --train_also=linears   # + the heads

An adapter adds scale * B A (rank r, scale = alpha / r, B zero at the start) to a weight the model reads, so a
fresh adapter changes nothing. The base weights keep their names and their values (frozen); the adapters are
extra parameters named `<module>.lora_<weight>.{a,b}`, so a checkpoint holds them alone and an export folds them in
(merge). The model knows nothing of it: add() hooks the places a weight is used, as train.py's parallelize applies
checkpointing, compile and FSDP.

Targets (--lora_targets): in_proj (the fused Q|K|V of self- and cross-attention), out_proj, ffn (linear1, linear2),
heads (the output layers, linears.k), emb (the codebook embeddings), cond (the text projection, output_proj).
"""
import hashlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from env import UserError

TARGETS = ("in_proj", "out_proj", "ffn", "heads", "emb", "cond")


class LowRank(nn.Module):
    """The update scale * B A of an [out, in] weight, applied to inputs (x A^T B^T) or as a weight (B A)."""

    def __init__(self, out_features, in_features, rank, alpha, dropout):
        super().__init__()
        self.a = nn.Parameter(torch.empty(rank, in_features))
        self.b = nn.Parameter(torch.zeros(out_features, rank))   # zero: the adapted model starts as the base
        nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))          # PEFT's and nn.Linear's default
        self.scale, self.dropout = alpha / rank, dropout

    def forward(self, x, rows=slice(None)):   # x [..., in] -> [..., out] (the rows of out that are asked for)
        if self.training and self.dropout > 0:
            x = F.dropout(x, self.dropout)
        return F.linear(F.linear(x, self.a.to(x.dtype)), self.b[rows].to(x.dtype)) * self.scale

    def weight(self):   # [out, in]
        return (self.b @ self.a) * self.scale


def _wrap_linear(module, lora):
    """module (an nn.Linear called as a module) computes its own output plus the adapter's."""
    forward = module.forward
    module.lora_weight = lora
    module.forward = lambda x: forward(x) + lora(x)


def _wrap_attention(attn, lora):
    """Attention.project(x, rows) reads rows of the fused in_proj_weight: the adapter adds the same rows."""
    project = attn.project
    attn.lora_in_proj_weight = lora
    attn.project = lambda x, rows=slice(None), weight=None: project(x, rows, weight) + lora(x, rows)


def _wrap_embedding(emb, lora):
    """An embedding's rows plus the adapter's: A's columns are the per-code vectors, B maps them to the width."""
    forward = emb.forward
    emb.lora_weight = lora
    emb.forward = lambda ids: forward(ids) + F.embedding(ids, lora.a.T) @ lora.b.T * lora.scale


def _wrap_heads(lm, loras):
    """The output layers are read as one concatenated weight (one matmul for every codebook): add the updates to it."""
    head_weight = lm.head_weight
    for linear, lora in zip(lm.linears, loras):
        linear.lora_weight = lora
    lm.head_weight = lambda: head_weight() + torch.cat([lora.weight() for lora in loras]).to(head_weight().dtype)


def add(lm, rank, alpha=16.0, dropout=0.0, targets=("in_proj", "out_proj"), train_also=()):
    """Add adapters to `lm` (in place) and freeze everything else but the parameters whose names contain one of
    train_also (e.g. "linears" for the heads). -> the adapters' parameter names."""
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown or not targets:
        raise UserError(f"lora_targets={list(targets)}: choose from {', '.join(TARGETS)}")
    make = lambda out, inp: LowRank(out, inp, rank, alpha, dropout).to(lm.out_norm.weight.device)  # noqa: E731
    dim = lm.cfg.dim
    for layer in lm.transformer.layers:
        attns = [layer.self_attn] + ([layer.cross_attention] if layer.cross_attention is not None else [])
        for attn in attns:
            if "in_proj" in targets:
                _wrap_attention(attn, make(3 * dim, dim))
            if "out_proj" in targets:
                _wrap_linear(attn.out_proj, make(dim, dim))
        if "ffn" in targets:
            for linear in (layer.linear1, layer.linear2):
                _wrap_linear(linear, make(linear.out_features, linear.in_features))
    if "heads" in targets:
        _wrap_heads(lm, [make(lm.cfg.card, dim) for _ in lm.linears])
    if "emb" in targets:
        for emb in lm.emb:
            _wrap_embedding(emb, make(dim, emb.num_embeddings))
    if "cond" in targets:
        proj = getattr(lm.conditioner, "output_proj", None)
        if proj is None:
            raise UserError("lora_targets=cond: this conditioner has no output_proj")
        _wrap_linear(proj, make(proj.out_features, proj.in_features))
    names = [k for k, _ in lm.named_parameters() if ".lora_" in k]
    missing = [t for t in train_also if not any(t in k for k, _ in lm.named_parameters() if ".lora_" not in k)]
    if missing:
        raise UserError(f"train_also={list(train_also)}: no parameter name contains {missing[0]!r} (e.g. linears, "
                        f"out_norm, emb, condition_provider)")
    for k, p in lm.named_parameters():
        p.requires_grad_(".lora_" in k or any(t in k for t in train_also))
    return names


def apply(lm, settings):
    """The adapters a config asks for (lora_rank > 0), as train.py and the loaders call it. -> their names."""
    if not settings.get("lora_rank"):
        return []
    targets = settings.get("lora_targets") or ("in_proj", "out_proj")
    return add(lm, int(settings["lora_rank"]), float(settings.get("lora_alpha", 16.0)),
               float(settings.get("lora_dropout", 0.0)), tuple(targets), tuple(settings.get("train_also") or ()))


@torch.no_grad()
def merge(lm):
    """Fold every adapter into the weight it adapts (W + scale B A), remove the adapters and their hooks, and make
    every parameter trainable again: a plain model for export or fast sampling. In place; -> lm."""
    for module in list(lm.modules()):
        for name, lora in list(module._modules.items()):
            if not name.startswith("lora_"):
                continue
            weight_name = name[len("lora_"):]
            weight = getattr(module, weight_name)
            update = lora.weight()
            update = update if update.shape == weight.shape else update.T   # an embedding's weight is [n, dim]
            weight.add_(update.to(weight.dtype))
            del module._modules[name]
            for attr in ("forward", "project", "head_weight"):
                module.__dict__.pop(attr, None)   # the instance hooks add() put there
    lm.__dict__.pop("head_weight", None)
    for p in lm.parameters():
        p.requires_grad_(True)
    return lm


def state_hash(state, names=None):
    """A content hash of tensors (names: those keys, in order; default all): what an adapter checkpoint records of
    the base weights it was trained on, and checks when it is loaded again."""
    h = hashlib.blake2b(digest_size=16)
    for k in sorted(names if names is not None else state):
        t = state[k].detach().to("cpu").contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
