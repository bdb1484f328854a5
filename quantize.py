"""Weight-only quantized decoding, as gpt-fast does it: the transformer's linear weights and the output heads are
kept as integers with scales and dequantized inside the matmul, so a decode step (which reads every weight once and
is bound by memory bandwidth at small batch) reads 4x (int8) or ~6x (int4) fewer bytes than in float32.

    python bench.py generate --size=small --quantize=int8    # speed, against transformers in the same run
    python bench.py quality --size=small --quantize=int8,int4 # what it costs: greedy agreement, logits error
    python -c "import model, quantize as q; print(q.quantize(model.build_lm({}, with_t5=False), 'int8').quantized)"

In code: `quantize(lm, "int8")` in place, after moving lm to its device and dtype; then lm.generate(...) as before.

int8: one float32 scale per output row (symmetric, [-127, 127]). int4: groups of group_size inputs per row, each
with a bfloat16 scale and offset (asymmetric, 16 levels; gpt-fast's and torchao's layout). On a CPU the matmul is
torch's packed kernel (_weight_int8pack_mm / _weight_int4pack_mm_for_cpu) with bfloat16 activations; elsewhere it
is the expression F.linear(x, w_int.to(dtype)) * scale, which torch.compile fuses into one kernel (eager, it
dequantizes the whole weight at every call: compile the decode step on a GPU).

What is quantized: every layer's self- and cross-attention in_proj_weight (the fused Q|K|V, used via F.linear),
out_proj, linear1, linear2, and the output heads. Embeddings (rows are gathered, not read whole), norms and the text
projection (run once per generation) stay float. A quantized model only decodes: it refuses state_dict and
load_state_dict, so no checkpoint or export can hold quantized weights (quantize a copy, or reload the float model).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from env import UserError

MODES = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)



def _bounds(index, n):
    """slice.indices(n) for a step-1 slice, in plain arithmetic: dynamo in torch 2.11 cannot trace slice.indices
    (the int8 decode step failed to compile on an H200 with that torch)."""
    def clamp(v, default):
        if v is None:
            return default
        v = v + n if v < 0 else v
        return min(max(v, 0), n)
    return clamp(index.start, 0), clamp(index.stop, n)

class QuantizedWeight(torch.Tensor):
    """A linear weight [N, K] as integers: int8 [N, K] with per-row scales [N], or int4 packed two per byte
    [N, K/2] uint8 with per-group scales and offsets [N, K/group_size]. The tensor itself holds the integers (so the
    module tree and .to() see it); F.linear(x, w) runs the quantized matmul; split and row slices give quantized
    pieces (the model splits the cross-attention's fused weight); torch.cat of pieces gives one (the model
    concatenates the heads). Any other use computes on the dequantized float weight: right, but slow."""

    @staticmethod
    def __new__(cls, q, mode, scales, zeros=None, group_size=0):
        t = torch.Tensor._make_subclass(cls, q)
        t.q, t.mode, t.scales, t.zeros, t.group_size = q, mode, scales, zeros, group_size
        t.pieces = {}
        t.packed = None   # the CPU kernel's layout (int4), made once here
        if q.device.type == "cuda":
            # a CUDA-graph decode step reads these in place (as it reads parameters), never copies them in
            for part in (q, scales, zeros):
                if part is not None:
                    torch._dynamo.mark_static_address(part)
        if q.device.type == "cpu":
            if mode == "int8":
                t.packed = scales.to(torch.bfloat16)   # the int8 kernel takes the activations' dtype for scales
            else:
                t.packed = (torch.ops.aten._convert_weight_to_int4pack_for_cpu(_unpack4(q), 1),
                            torch.stack([scales, zeros], -1).transpose(0, 1).contiguous())     # [G, N, 2]
        return t

    @property
    def logical_shape(self):
        n, k = self.q.shape
        return (n, 2 * k if self.mode == "int4" else k)

    def dequantize(self, dtype=torch.float32):
        """-> the float weight [N, K] these integers stand for."""
        if self.mode == "int8":
            return (self.q.to(torch.float32) * self.scales[:, None]).to(dtype)
        n, k = self.logical_shape
        q = _unpack4(self.q).to(torch.float32).view(n, k // self.group_size, self.group_size)
        return ((q - 8) * self.scales.float()[..., None] + self.zeros.float()[..., None]).view(n, k).to(dtype)

    def _rows(self, start, stop):
        """Rows start:stop as a quantized weight (scales are per row, so row slices stay exact)."""
        key = (start, stop)
        if key not in self.pieces:   # made once, eagerly: a compiled step then finds them (it cannot make them)
            zeros = None if self.zeros is None else self.zeros[start:stop]
            self.pieces[key] = QuantizedWeight(self.q[start:stop], self.mode, self.scales[start:stop], zeros,
                                               self.group_size)
        return self.pieces[key]

    # Methods, not __torch_function__ cases: torch.compile inlines a subclass's own Python methods.
    def split(self, sizes, dim=0):
        n = self.logical_shape[0]
        if dim not in (0, -2) or isinstance(sizes, int):
            return torch.Tensor.split(self.dequantize(), sizes, dim)
        bounds, start = [], 0
        for size in sizes:
            bounds.append((start, start + size))
            start += size
        if start != n:
            raise RuntimeError(f"split sizes {list(sizes)} do not add up to {n} rows")
        return tuple(self._rows(a, b) for a, b in bounds)

    def __getitem__(self, index):
        if isinstance(index, tuple) and len(index) == 2 and index[1] == slice(None):
            index = index[0]
        if isinstance(index, slice) and index.step in (None, 1):
            return self._rows(*_bounds(index, self.logical_shape[0]))
        return self.dequantize()[index]

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, w = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if isinstance(x, QuantizedWeight) or not isinstance(w, QuantizedWeight):
                raise NotImplementedError("quantized weights are only the second argument of F.linear")
            y = quantized_linear(x, w)
            return y if bias is None else y + bias
        if func is torch.cat:
            tensors = args[0]
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            if dim in (0, -2) and all(isinstance(t, QuantizedWeight) for t in tensors) \
                    and len({(t.mode, t.group_size, t.q.shape[1]) for t in tensors}) == 1:
                first = tensors[0]
                zeros = None if first.zeros is None else torch.cat([t.zeros for t in tensors])
                return QuantizedWeight(torch.cat([t.q for t in tensors]), first.mode,
                                       torch.cat([t.scales for t in tensors]), zeros, first.group_size)
        if func is torch.Tensor.__getitem__:   # w[rows] under torch.compile (eager Python calls the method itself)
            return args[0].__getitem__(*args[1:])
        if func is torch.Tensor.detach:   # nn.Parameter(w) detaches, and must keep the type
            w = args[0]
            return QuantizedWeight(w.q.detach(), w.mode, w.scales, w.zeros, w.group_size)
        if func is torch.Tensor.to:
            return _to(*args, **kwargs)
        if getattr(func, "__name__", "") in METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        # anything else: the same function on the float weights
        args, kwargs = torch.utils._pytree.tree_map_only(QuantizedWeight, lambda t: t.dequantize(), (args, kwargs))
        return func(*args, **kwargs)


# Tensor attributes and methods that read what the module tree needs (shape, device, dtype of the stored integers),
# passed through to the integer tensor. Under torch.compile, attribute reads arrive as "__get__".
METADATA = {"__get__", "size", "dim", "stride", "numel", "nelement", "element_size", "is_floating_point",
            "is_complex", "_is_view", "is_contiguous", "data_ptr", "requires_grad_", "__repr__", "__format__",
            "storage_offset", "untyped_storage", "_typed_storage", "get_device", "__reduce_ex__", "has_names"}


def _to(w, *args, **kwargs):
    """Tensor.to on a quantized weight: a float dtype gives the dequantized weight (what the weight means);
    another device is refused (the CPU kernels' layout is made at quantize time); no change returns it."""
    device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
    if device is not None and torch.device(device).type != w.q.device.type:
        raise UserError(f"a model quantized on {w.q.device.type} cannot move to {torch.device(device).type}: move "
                        f"the float model first, then quantize it")
    if dtype is not None and dtype.is_floating_point:
        return w.dequantize(dtype)
    return w


def _unpack4(packed):
    """uint8 [N, K/2] (low nibble first) -> int32 [N, K] in [0, 15]."""
    return torch.stack([packed & 15, packed >> 4], -1).flatten(-2).to(torch.int32)


def quantized_linear(x, w, kernel=None):
    """x [..., K] @ dequantize(w).T -> [..., N] in x's dtype, dequantizing inside the matmul. kernel: torch's packed
    CPU kernel (default: on a CPU), else the portable expression."""
    n, k = w.logical_shape
    if x.device.type == "cpu" if kernel is None else kernel:
        # torch's packed CPU kernels read the integers directly; they take bfloat16 activations (the float32
        # entry of the int8 kernel is a slow scalar loop: 0.6 GB/s of weights against ~5 GB/s)
        x2 = x.reshape(-1, k).to(torch.bfloat16)
        if w.mode == "int8":
            y = torch.ops.aten._weight_int8pack_mm(x2, w.q, w.packed)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, w.packed[0], w.group_size, w.packed[1])
        return y.to(x.dtype).view(*x.shape[:-1], n)
    if w.mode == "int8":   # gpt-fast's expression: inductor fuses the cast and the scale into the matmul
        return F.linear(x, w.q.to(x.dtype)) * w.scales.to(x.dtype)
    return F.linear(x, w.dequantize(x.dtype))


# ----------------------------------------------------------------------------------------------------------
# Quantizing a model

def quantize_weight(weight, mode, group_size=32):
    """A float weight [N, K] -> QuantizedWeight on the same device."""
    w = weight.detach().to(torch.float32)
    n, k = w.shape
    if mode == "int8":
        scales = w.abs().amax(1).clamp(min=1e-12) / 127                                   # [N]
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        return QuantizedWeight(q, mode, scales)
    if k % group_size or n % 16:
        raise UserError(f"int4 needs weights whose inputs ({k}) are a multiple of group_size={group_size} and "
                        f"outputs ({n}) a multiple of 16: use int8, or another group_size")
    groups = w.view(n, k // group_size, group_size)
    lo, hi = groups.amin(-1), groups.amax(-1)                                              # [N, G]
    # bfloat16 scales and offsets (gpt-fast's; the CPU kernel's), rounded before the levels are chosen
    scales = ((hi - lo).clamp(min=1e-6) / 15).to(torch.bfloat16)
    zeros = (lo + 8 * scales.float()).to(torch.bfloat16)   # the value of level 8: w = (q - 8) * scale + zero
    levels = (groups - zeros.float()[..., None]) / scales.float()[..., None] + 8
    q = torch.round(levels).clamp(0, 15).to(torch.uint8).view(n, k)
    return QuantizedWeight(q[:, ::2] | (q[:, 1::2] << 4), mode, scales, zeros, group_size)


def quantized_modules(lm):
    """[(module, parameter name)] of the weights quantize() replaces."""
    out = []
    for layer in lm.transformer.layers:
        for attention in (layer.self_attn, layer.cross_attention):
            if attention is not None:
                out += [(attention, "in_proj_weight"), (attention.out_proj, "weight")]
        out += [(layer.linear1, "weight"), (layer.linear2, "weight")]
    return out + [(linear, "weight") for linear in lm.linears]


def _refuse_state_dict(module, *args, **kwargs):
    raise UserError("this model's weights are quantized for decoding: checkpoints and exports take the float model "
                    "(load it again, or quantize a copy)")


def quantize(lm, mode, group_size=32):
    """Quantize lm's linear weights in place for decoding (mode int8 or int4, group_size for int4) -> lm, in eval
    mode. Call it after moving lm to its device and dtype; the result refuses state_dict/load_state_dict."""
    if mode not in MODES:
        raise UserError(f"quantize={mode}: one of {', '.join(MODES)}")
    if mode == "int4" and group_size not in INT4_GROUP_SIZES:
        raise UserError(f"group_size={group_size}: one of {', '.join(map(str, INT4_GROUP_SIZES))}")
    if getattr(lm, "quantized", None):
        raise UserError(f"the model is already quantized ({lm.quantized}): quantize the float model once")
    if any(".lora_" in name for name, _ in lm.named_parameters()):
        raise UserError("the model has low-rank adapters: fold them in first (adapters.merge(lm)), then quantize")
    if lm.out_norm.weight.device.type == "meta":
        raise UserError("the model has no weights yet (meta device): load them, then quantize")
    lm.eval().requires_grad_(False)
    for module, name in quantized_modules(lm):
        weight = quantize_weight(getattr(module, name), mode, group_size)
        del module._parameters[name]
        module.register_parameter(name, nn.Parameter(weight, requires_grad=False))
        module.register_state_dict_pre_hook(_refuse_state_dict)
        module.register_load_state_dict_pre_hook(_refuse_state_dict)
    lm.register_state_dict_pre_hook(_refuse_state_dict)
    lm.register_load_state_dict_pre_hook(_refuse_state_dict)
    lm.quantized = mode if mode == "int8" else f"int4 (groups of {group_size})"
    return lm


def weight_bytes(lm):
    """Bytes a decode step reads from the weights: the quantized ones (integers, scales, offsets) and the float
    matrices of the transformer and heads (embedding rows are gathered, the text projection runs once)."""
    total = 0
    for name, p in lm.named_parameters():
        if isinstance(p, QuantizedWeight):
            total += sum(t.numel() * t.element_size() for t in (p.q, p.scales, p.zeros) if t is not None)
        elif not name.startswith(("emb.", "condition_")):
            total += p.numel() * p.element_size()
    return total


# ----------------------------------------------------------------------------------------------------------
# What quantization costs: the float model against its quantized copy (bench.py quality, tests)

@torch.no_grad()
def compare(float_lm, quantized_lm, condition, mask, n_frames, cfg_coef=3.0):
    """Greedy decoding of a float model and its quantized copy (or any other copy: a bfloat16 one) from the same
    condition [B, L, dim] -> dict:
    agreement: fraction of the generated codes [B, K, n_frames] that are equal, each model running free (once they
        differ, each continues from its own codes);
    first_difference: the first frame where the codes differ (None: never);
    top1: teacher-forced on the float model's codes, the fraction of predicted codes where both models' guided
        logits have the same argmax (each step judged on the same input);
    step_error: teacher-forced, the largest |logit difference| of each step [S-1] (guided logits, real codes only);
    logits_std: the float model's guided logits' standard deviation (the scale of those errors)."""
    import model as lm_lib
    f_codes = float_lm.generate(condition, mask, n_frames, cfg_coef=cfg_coef, greedy=True)   # [B, K, T]
    q_codes = quantized_lm.generate(condition.to(quantized_lm.out_norm.weight.dtype), mask, n_frames,
                                    cfg_coef=cfg_coef, greedy=True)
    differ = (f_codes != q_codes).any(1).any(0).nonzero()
    tables = float_lm._tables(n_frames, False, f_codes.device)
    sequence = lm_lib.build_sequence(f_codes, tables, float_lm.cfg.card)                     # [B, K, S]
    both = torch.cat([sequence, sequence])
    condition2 = torch.cat([condition, torch.zeros_like(condition)])
    mask2 = torch.cat([mask, torch.zeros_like(mask)])

    def guided(lm):   # output s predicts step s + 1
        cond, uncond = lm(both, condition2.to(lm.out_norm.weight.dtype), mask2).float()[..., :-1, :].chunk(2)
        return uncond + cfg_coef * (cond - uncond)                                             # [B, K, S-1, card]

    f_logits, q_logits = guided(float_lm), guided(quantized_lm)
    real = tables.seq_mask[:, 1:].expand_as(f_logits[..., 0])                                 # [B, K, S-1]
    error = (q_logits - f_logits).abs().amax(-1).masked_fill(~real, 0)
    same = (q_logits.argmax(-1) == f_logits.argmax(-1))[real]
    return {"agreement": (f_codes == q_codes).float().mean().item(),
            "first_difference": int(differ[0]) if len(differ) else None,
            "top1": same.float().mean().item(),
            "step_error": error.amax((0, 1)).cpu(),
            "logits_std": f_logits[real].std().item()}
