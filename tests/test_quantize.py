"""quantize.py: weight-only int8/int4 decoding. The quantized matmul computes what the dequantized float weight does,
greedy decoding stays close to the float model, a compiled decode step traces the quantized weights whole, and a
quantized model never reaches a checkpoint or an export."""
import copy

import pytest
import torch
import torch.nn.functional as F

import formats
import model as lm
import quantize
from env import UserError

torch.set_num_threads(1)
DEBUG = dict(dim=128, n_layers=2, n_heads=4, card=256, text_dim=128, cfg_dropout=0.0)


def debug_lm(**overrides):
    torch.manual_seed(0)
    return lm.build_lm({**DEBUG, **overrides}, with_t5=False).eval()


def condition(B=1, L=6):
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, L, DEBUG["dim"], generator=g), torch.ones(B, L, dtype=torch.bool)


@pytest.mark.parametrize("mode", quantize.MODES)
@pytest.mark.parametrize("kernel", [True, False], ids=["cpu-kernel", "portable"])
def test_quantized_linear_equals_the_dequantized_weight(mode, kernel):
    """Both matmuls (torch's packed CPU kernel, and the expression a GPU compiles) against x @ dequantize(w).T: the
    only difference allowed is the kernel's bfloat16 activations (relative error ~2^-8)."""
    g = torch.Generator().manual_seed(0)
    w = quantize.quantize_weight(torch.randn(192, 256, generator=g), mode, 64)
    x = torch.randn(3, 5, 256, generator=g)
    y = quantize.quantized_linear(x, w, kernel=kernel)
    ref = x @ w.dequantize().T
    assert y.shape == (3, 5, 192) and y.dtype == x.dtype
    assert ((y - ref).norm() / ref.norm()).item() < (1e-2 if kernel else 1e-6)
    assert torch.equal(F.linear(x, w), quantize.quantized_linear(x, w))   # F.linear dispatches to it


@pytest.mark.parametrize("mode", quantize.MODES)
def test_rounding_error_is_at_most_half_a_step(mode):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(32, 128, generator=g) * torch.logspace(-3, 1, 32)[:, None]   # rows of very different scale
    w = quantize.quantize_weight(weight, mode, 32)
    err = (w.dequantize() - weight).abs()
    if mode == "int8":
        assert (err <= w.scales[:, None] / 2 * 1.0001).all()
        assert w.q.dtype == torch.int8 and w.q.shape == (32, 128)
    else:   # per group of 32 inputs, with bfloat16 scales and offsets: half a step plus the offset's rounding
        step = w.scales.float().repeat_interleave(32, 1)
        assert (err <= step / 2 + weight.abs().amax() * 2 ** -8).all()
        assert w.q.dtype == torch.uint8 and w.q.shape == (32, 64)
    assert quantize.quantize_weight(torch.zeros(16, 32), mode, 32).dequantize().abs().max() < 1e-6


@pytest.mark.parametrize("mode", quantize.MODES)
def test_split_slice_and_cat_keep_rows_quantized(mode):
    """The model splits the cross-attention's fused weight, slices its K|V rows, and concatenates the heads: each
    gives a quantized weight holding exactly those rows."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 64, generator=g)
    w = quantize.quantize_weight(weight, mode, 32)
    full = w.dequantize()
    q, kv = w.split([32, 64])
    assert isinstance(q, quantize.QuantizedWeight) and torch.equal(q.dequantize(), full[:32])
    assert torch.equal(kv.dequantize(), full[32:]) and torch.equal(w[32:].dequantize(), full[32:])
    both = torch.cat([q, kv])
    assert isinstance(both, quantize.QuantizedWeight) and torch.equal(both.dequantize(), full)
    assert w.split([32, 64])[0] is q                       # made once: a compiled step finds them ready
    assert torch.equal(w.t(), full.t())                    # anything else runs on the float weight
    with pytest.raises(RuntimeError, match="do not add up"):
        w.split([32, 32])


@pytest.mark.parametrize("mode, agreement, top1", [("int8", 0.85, 0.95), ("int4", 0.6, 0.7)])
def test_quantized_greedy_decoding_agrees_with_the_float_model(mode, agreement, top1):
    """Thresholds from measurements on this model (random weights, whose near-flat logits flip more easily than a
    trained model's): int8 agreed on 96% of 100 frames and 98.8% of teacher-forced steps, int4 on 76% and 82%."""
    float_lm = debug_lm(n_layers=4)
    quantized = quantize.quantize(copy.deepcopy(float_lm), mode)
    r = quantize.compare(float_lm, quantized, *condition(), 100)
    assert r["agreement"] >= agreement and r["top1"] >= top1
    assert r["step_error"].shape == (103,) and r["step_error"].max() < r["logits_std"]
    # the same model asked for the same codes twice gives them: agreement measures quantization, nothing else
    same = quantize.compare(float_lm, float_lm, *condition(), 20)
    assert same["agreement"] == 1 and same["first_difference"] is None and same["step_error"].max() == 0


def test_compiled_decode_step_traces_quantized_weights_whole():
    """fullgraph: dynamo traces the quantized weights (F.linear, the self-attention's row slice, the cross-attention's
    split) without a graph break; every matmul of the step is the quantized kernel (none falls back to a float
    weight), and the compiled step gives the codes of the same static-shape step run eagerly (dynamo's eager backend:
    the tracing is the question)."""
    model = quantize.quantize(debug_lm(), "int8")
    c, m = condition()
    model.compiled_step = model.sample_step   # what compile_decode sets, uncompiled: the static path, eager
    static = model.generate(c, m, 30, greedy=True)
    graphs = []

    def backend(gm, inputs):
        graphs.append([str(n.target) for n in gm.graph.nodes if n.op == "call_function"])
        return gm.forward
    model.compiled_step = torch.compile(model.sample_step, fullgraph=True, backend=backend)
    assert torch.equal(model.generate(c, m, 30, greedy=True), static)
    (ops,) = graphs
    assert ops.count("aten._weight_int8pack_mm") == 2 * 6 + 1 and not any("linear" in op for op in ops)


def test_quantized_model_keeps_integers_through_dtype_moves_and_reads_fewer_bytes():
    model = debug_lm()
    before = quantize.weight_bytes(model)
    quantize.quantize(model, "int8").to(torch.bfloat16)
    w = model.transformer.layers[0].self_attn.in_proj_weight
    assert isinstance(w, quantize.QuantizedWeight) and w.q.dtype == torch.int8
    assert model.out_norm.weight.dtype == torch.bfloat16 and not any(p.requires_grad for p in model.parameters())
    assert before / quantize.weight_bytes(model) > 3.5         # float32 -> int8 with per-row scales
    c, m = condition()
    codes = model.generate(c.bfloat16(), m, 10, greedy=True)
    assert codes.shape == (1, 4, 10) and 0 <= codes.min() and codes.max() < DEBUG["card"]


def test_quantized_model_refuses_checkpoints_and_exports(tmp_path):
    """No state dict leaves a quantized model (so train.py's checkpoint, formats' exports and torch.save of its
    state dict all refuse), and none loads into it."""
    float_lm = debug_lm()
    state = float_lm.state_dict()
    model = quantize.quantize(float_lm, "int8")
    for call in (model.state_dict, lambda: model.load_state_dict(state),
                 lambda: model.transformer.layers[0].state_dict(),
                 lambda: formats.export_audiocraft_lm(model, {**DEBUG}, tmp_path / "state_dict.bin")):
        with pytest.raises(UserError, match="quantized for decoding") as e:
            call()
        assert "\n" not in str(e.value)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("args, message", [
    (("int3",), "quantize=int3: one of int8, int4"),
    (("int4", 48), "group_size=48: one of 32, 64, 128, 256"),
])
def test_bad_modes_are_one_line_errors(args, message):
    with pytest.raises(UserError, match=message):
        quantize.quantize(debug_lm(), *args)


def test_quantize_refuses_twice_a_meta_model_and_a_move_to_another_device():
    model = quantize.quantize(debug_lm(), "int8")
    with pytest.raises(UserError, match="already quantized"):
        quantize.quantize(model, "int8")
    with pytest.raises(UserError, match="cannot move to meta"):
        model.to("meta")
    with pytest.raises(UserError, match="meta device"):
        quantize.quantize(lm.build_lm(DEBUG, with_t5=False, meta=True), "int8")
    with pytest.raises(UserError, match="multiple of group_size=256"):
        quantize.quantize(debug_lm(), "int4", 256)   # dim 128 has no group of 256


def test_quantize_asks_for_adapters_to_be_merged_first():
    """Adapters add their update where a weight is read; quantized weights would drop it silently."""
    import adapters
    model = debug_lm()
    adapters.add(model, 4)
    with pytest.raises(UserError, match=r"fold them in first \(adapters.merge\(lm\)\)"):
        quantize.quantize(model, "int8")
    assert quantize.quantize(adapters.merge(model), "int8").quantized == "int8"


def test_row_bounds_match_slice_indices():
    # quantize._bounds replaces slice.indices, which dynamo in torch 2.11 could not trace (the int8 decode step
    # failed to compile on an H200); it must give the same rows for every start/stop, negative and out of range
    for n in (1, 5):
        for start in (None, -7, -2, 0, 3, 9):
            for stop in (None, -9, -1, 0, 2, 9):
                assert quantize._bounds(slice(start, stop), n) == slice(start, stop).indices(n)[:2], (start, stop)


def test_train_stages_sample_from_a_quantized_copy_and_keep_the_float_weights():
    """train.py's quantize key: the generate/evaluate stages' sampler runs on an int8 copy; the training model keeps
    its float weights (a quantized one would refuse state_dict), and the key is infrastructure (same signature)."""
    import train
    from _model_util import TINY_RUN
    cfg = train.parse_args(TINY_RUN + ["--quantize=int8"])
    model = train.build_model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sampler = train.sampling_model(model, cfg)
    assert sampler is not model and sampler.quantized == "int8"
    codes = train.sample_codes(sampler, cfg, ["slow calm strings", None], 12, [0, 1], torch.device("cpu"), False, 25)
    assert codes.shape == (2, cfg.n_q, 12)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not hasattr(model, "quantized")
    assert train.sampling_model(model, train.parse_args(TINY_RUN)) is model   # no quantize: the model itself
    assert train.config_signature(cfg) == train.config_signature(train.parse_args(TINY_RUN))
    with pytest.raises(UserError, match=r'quantize="int3" is not one of , int8, int4'):
        train.parse_args(TINY_RUN + ["--quantize=int3"])
    # FSDP shards the weights across ranks: no rank holds a whole model to copy, so the key is refused up front
    fsdp = train.parse_args(TINY_RUN + ["--quantize=int8", "--parallel=fsdp"])
    train.validate(fsdp, world_size=1)   # one process holds it all
    with pytest.raises(UserError, match=r'quantize="int8" with parallel="fsdp": .*generate.py --quantize=int8'):
        train.validate(fsdp, world_size=2)
