"""Speed, side by side with reference implementations in the same process: our train step against transformers'
MusicgenForCausalLM, our generation against its generate, our codec against its EncodecModel (identical weights in
each pair), and data loading against what the train step consumes. Every figure in BENCHMARKS.md comes from here.

    python bench.py train --size=debug                  # on a CPU: reduced shapes, said in the table's header
    python bench.py generate --size=small --seconds=1
    python bench.py codec --seconds=10
    python bench.py data
    python bench.py train --size=small --device=cuda --compile        # a GPU: 30 s segments, bf16
    python bench.py generate --size=small --device=cuda --compile     # static cache, CUDA-graph decode step

Options (--key=value, or --flag alone for true): size debug|small|medium|large, device, dtype float32|bfloat16|
float16, compile, batch_size, seconds (of a segment, of generated or of coded audio), text_len, repeats, warmup
(calls of each before timing), threads (CPU), clock wall|cpu (cpu: the process's CPU time, for a shared machine
with --threads=1), keep_freed (Linux CPU, default true: glibc keeps freed memory instead of handing it back to the
kernel and faulting it in again at the next step), reference (false: ours only), profile (print the top ops of
one call of each), codec, dataset, cache_dir, num_workers (data).

Method: warm-up calls first (compilation, allocator, caches), then rounds of one call of each implementation in
turn, the order alternating between rounds, so a change in machine load hits both. Times are medians with their
min-max; a ratio is the median of the per-round ratios (reference time / ours), with its min-max.
"""
import difflib
import math
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

import env
import formats
import model as lm
from env import UserError, cli

SIZES = {  # the LM sizes of config/debug.py, base.py (small), medium.py and large.py
    "debug": dict(dim=128, n_layers=4, n_heads=4, card=256, text_dim=128),
    "small": dict(dim=1024, n_layers=24, n_heads=16),
    "medium": dict(dim=1536, n_layers=48, n_heads=24),
    "large": dict(dim=2048, n_layers=48, n_heads=32),
}
MODES = ("train", "generate", "codec", "data")
OPTIONS = dict(size="debug", device="", dtype="", compile=False, batch_size=0, seconds=0.0, text_len=32, repeats=0,
               warmup=1, threads=0, clock="wall", keep_freed=True, reference=True, profile=False, codec="debug",
               dataset="demo", cache_dir="", num_workers=2)
# (batch, seconds) when not given. A GPU gets the shapes; a CPU reduced ones, so that a run takes minutes.
GPU_SHAPES = {"train": (8, 30.0), "generate": (1, 30.0), "codec": (32, 30.0), "data": (16, 30.0)}
CPU_SHAPES = {"train": (1, 1.0), "generate": (1, 1.0), "codec": (1, 10.0), "data": (16, 4.0),
              ("train", "debug"): (16, 4.0), ("generate", "debug"): (1, 10.0)}


def parse(argv):
    if not argv or argv[0] not in MODES:
        got = " ".join(argv[:1]) or "nothing"
        raise UserError(f"usage: python bench.py {'|'.join(MODES)} [--key=value ...] (got {got})")
    opts = dict(OPTIONS)
    for arg in argv[1:]:
        key, eq, value = arg[2:].partition("=")
        if not arg.startswith("--") or key not in opts:
            close = difflib.get_close_matches(key, opts, n=1)
            hint = f" (did you mean --{close[0]}?)" if close else f"; options: {', '.join(opts)}"
            raise UserError(f"unknown option {arg!r}{hint}")
        kind = type(OPTIONS[key])
        if kind is bool:
            if value.lower() not in ("", "true", "1", "false", "0"):
                raise UserError(f"--{key}={value}: expected true or false")
            opts[key] = value.lower() in ("", "true", "1")
        else:
            try:
                opts[key] = kind(value) if eq else None
            except ValueError:
                opts[key] = None
            if opts[key] is None:
                raise UserError(f"--{key}={value}: expected {'an integer' if kind is int else 'a number'}")
    if opts["size"] not in SIZES:
        raise UserError(f"--size={opts['size']}: one of {', '.join(SIZES)}")
    if opts["dtype"] and opts["dtype"] not in lm.DTYPES:
        raise UserError(f"--dtype={opts['dtype']}: one of {', '.join(lm.DTYPES)}")
    try:
        device = torch.device(opts["device"] or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise UserError(f"--device={opts['device']}: not a torch device (cpu, cuda, cuda:1)") from None
    if device.type not in ("cpu", "cuda") or (device.type == "cuda" and not torch.cuda.is_available()):
        raise UserError(f"--device={opts['device']}: bench runs on cpu or an available cuda device")
    opts["device"] = device
    if opts["clock"] not in CLOCKS or (opts["clock"] == "cpu" and device.type != "cpu"):
        raise UserError(f"--clock={opts['clock']}: wall, or cpu (on a CPU device)")
    opts["dtype"] = lm.DTYPES[opts["dtype"] or ("bfloat16" if device.type == "cuda" else "float32")]
    mode = argv[0]
    batch, seconds = GPU_SHAPES[mode] if device.type == "cuda" else \
        CPU_SHAPES.get((mode, opts["size"]), CPU_SHAPES[mode])
    opts["batch_size"] = opts["batch_size"] or batch
    opts["seconds"] = opts["seconds"] or seconds
    opts["reduced"] = device.type == "cpu" and (opts["batch_size"], opts["seconds"]) != GPU_SHAPES[mode]
    opts["repeats"] = opts["repeats"] or (7 if device.type == "cuda" else 5)
    if opts["batch_size"] < 1 or opts["seconds"] <= 0 or opts["text_len"] < 1:
        raise UserError("--batch_size, --seconds and --text_len must be positive")
    return mode, opts


# ----------------------------------------------------------------------------------------------------------
# Measuring

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def rounds(calls, repeats, device, warmup=1, clock="wall"):
    """calls {name: fn} -> {name: [seconds]}: warm-up calls, then `repeats` rounds of one call of each, the order
    reversed every other round. clock "cpu": the process's CPU time, which on a shared machine with one thread
    leaves out the time the scheduler gave to other processes."""
    names, now = list(calls), CLOCKS[clock]
    for _ in range(warmup):
        for name in names:
            calls[name]()
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            sync(device)
            t0 = now()
            calls[name]()
            sync(device)
            times[name].append(now() - t0)
    return times


def spread(xs, fmt="{:.3g}"):
    return f"{fmt.format(statistics.median(xs))} ({fmt.format(min(xs))}-{fmt.format(max(xs))})"


def ratio(ours, ref):
    """Per-round ratios ref/ours (the same round saw the same load): 'median (min-max)'."""
    return spread([b / a for a, b in zip(ours, ref)], "{:.2f}") + "x"


def rate(n, times):
    """Throughput at the median time and its spread: 'n / median (n / max - n / min)'."""
    return f"{_si(n / statistics.median(times))} ({_si(n / max(times))}-{_si(n / min(times))})"


def _si(x):
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def load():
    return os.getloadavg()[0]


def cpu_name():
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "CPU"


def describe_device(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} CPU, {torch.get_num_threads()} threads of {os.cpu_count()} cores"


def best_time(fn, device, clock, repeats=5):
    now, best = CLOCKS[clock], float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = now()
        fn()
        sync(device)
        best = min(best, now() - t0)
    return best


def matmul_peak(device, dtype, clock="wall"):
    """Best FLOP/s of a large matrix product: the CPU's practical peak (no datasheet table covers CPUs)."""
    n = 1536 if device.type == "cpu" else 8192
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n ** 3 / best_time(lambda: a @ b, device, clock)


def copy_bandwidth(device, clock="wall"):
    """Best bytes/s (read + write) of copying 256 MB: the practical memory bandwidth."""
    x = torch.rand(64 * 2 ** 20, device=device)
    y = torch.empty_like(x)
    return 2 * x.numel() * 4 / best_time(lambda: y.copy_(x), device, clock)


def peak_flops_for(device, dtype, clock="wall"):
    """(FLOP/s, label): the datasheet peak of a known GPU (model.py's table), else a measured matmul peak."""
    if device.type == "cuda":
        peak = lm.peak_flops(device)
        if peak:
            return peak, f"{_si(peak)}FLOP/s datasheet bf16 peak"
    peak = matmul_peak(device, dtype, clock)
    return peak, f"{_si(peak)}FLOP/s measured {str(dtype).split('.')[-1]} matmul peak"


def step_peak_memory(fn, device):
    """Bytes the call allocates at its peak on top of what was allocated before it (activations, gradients,
    temporaries). CUDA: the allocator's peak. CPU: the running sum of the profiler's per-op allocations and frees
    (independent of how malloc caches memory)."""
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    now = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        now += event.self_cpu_memory_usage
        peak = max(peak, now)
    return peak


def tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def optimizer_bytes(opt):
    return tensor_bytes(v for state in opt.state.values() for v in state.values() if torch.is_tensor(v))


def profile(calls, device, rows=12):
    from torch.profiler import ProfilerActivity
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for name, fn in calls.items():
        with torch.profiler.profile(activities=activities) as prof:
            fn()
            sync(device)
        key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(f"\nprofile: {name}\n" + prof.key_averages().table(sort_by=key, row_limit=rows))


def print_table(title, notes, header, rows):
    print(f"\n**{title}**\n")
    for note in notes:
        print(f"- {note}")
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")
    sys.stdout.flush()


def shape_note(a, mode):
    gpu_batch, gpu_seconds = GPU_SHAPES[mode]
    if a["reduced"]:
        return (f"REDUCED CPU SHAPES: batch {a['batch_size']} x {a['seconds']:g} s (the GPU benchmark runs "
                f"batch {gpu_batch} x {gpu_seconds:g} s)")
    return f"batch {a['batch_size']} x {a['seconds']:g} s"


def common_notes(a, load_start):
    clock = "process CPU time" if a["clock"] == "cpu" else "wall-clock time"
    malloc = "; glibc keeps freed memory (--keep_freed)" if a["device"].type == "cpu" and a["keep_freed"] else ""
    return [f"device: {describe_device(a['device'])}; load average {load_start:.1f} at start, {load():.1f} at end"
            + malloc,
            f"{a['repeats']} interleaved rounds after {a['warmup']} warm-up call(s) of each, timed by {clock}; "
            "median (min-max)"]


# ----------------------------------------------------------------------------------------------------------
# The models: ours and transformers' with the same weights

def build_lm(a):
    """Our LM at a size, on precomputed text states (T5's projection only, as transformers' decoder takes them)."""
    torch.manual_seed(0)
    ours = lm.build_lm({**SIZES[a["size"]], "cfg_dropout": 0.0}, with_t5=False).to(a["device"])
    return ours, ours.cfg


def require_transformers():
    try:
        import transformers  # noqa: F401  (the reference implementations; bench and tests only)
    except ImportError as e:
        raise UserError(f"the reference needs transformers ({e}): pip install transformers, or --reference=false")


def transformers_reference(model):
    """transformers' MusicgenForCausalLM with our LM's weights (eager attention; the parity tests use it too)."""
    require_transformers()
    from transformers import MusicgenDecoderConfig, MusicgenForCausalLM
    c = model.cfg
    hf_cfg = MusicgenDecoderConfig(
        vocab_size=c.card, num_codebooks=c.n_q, hidden_size=c.dim, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, ffn_dim=c.hidden_scale * c.dim, activation_function="gelu",
        pad_token_id=c.card, bos_token_id=c.card, dropout=0.0, attn_implementation="eager")
    hf = MusicgenForCausalLM(hf_cfg).eval()
    hf.load_state_dict(formats.to_transformers_state_dict(model.state_dict()), strict=True)
    gc = hf.generation_config
    gc.decoder_start_token_id = gc.pad_token_id = c.card
    gc.num_return_sequences = 1
    return hf


def transformers_cache():
    """generate()'s keyword for an explicit two-part cache (self- and cross-attention), in the spelling of the
    installed transformers: 5.24 renamed `past_key_values` to `cache` (and rejects the old name in generate)."""
    import inspect
    from transformers import DynamicCache, EncoderDecoderCache, MusicgenForCausalLM
    name = "cache" if "cache" in inspect.signature(MusicgenForCausalLM.forward).parameters else "past_key_values"
    return {name: EncoderDecoderCache(DynamicCache(), DynamicCache())}


def transformers_lm(ours):
    """transformers' MusicgenForCausalLM with our weights (its default SDPA attention), and the text projection
    (in transformers it belongs to MusicgenForConditionalGeneration: enc_to_dec_proj)."""
    device = ours.out_norm.weight.device
    ref = transformers_reference(ours).to(device)
    ref.set_attn_implementation("sdpa")
    proj = torch.nn.Linear(ours.cfg.text_dim, ours.cfg.dim).to(device)
    proj.load_state_dict(ours.conditioner.output_proj.state_dict())
    return ref, proj


def check_memory(need, what):
    """On a CPU, refuse shapes that would not fit rather than let the machine swap or kill the run."""
    try:
        avail = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemAvailable"))
    except (OSError, StopIteration):
        return
    if need > 0.9 * avail:
        raise UserError(f"{what} needs about {need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB are available: "
                        f"use a smaller --size, or --reference=false")


# ----------------------------------------------------------------------------------------------------------
# train: one optimizer update (forward, backward, clip, AdamW) per call

def train_calls(a, ours, cfg, ref=None, proj=None):
    """{name: step()} and the shapes, for ours and (given) the reference. Both get the same optimizer: AdamW,
    fused where torch has it (CUDA and CPU; transformers' Trainer default, adamw_torch_fused)."""
    device, dtype = a["device"], a["dtype"]
    B, T, L = a["batch_size"], max(1, round(a["seconds"] * 50)), a["text_len"]
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, cfg.card, (B, cfg.n_q, T), generator=g).to(device)               # [B, K, T]
    states = torch.randn(B, L, cfg.text_dim, generator=g).to(device)                         # [B, L, text_dim]
    mask = torch.ones(B, L, dtype=torch.bool, device=device)
    autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)  # noqa: E731
    if a["compile"]:
        for layer in ours.transformer.layers:
            layer.compile()
    ours.train()
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    losses = {}

    def step_ours():
        with autocast():
            condition, condition_mask = ours.conditioner(states, mask)
            ce, _ = ours.compute_loss(codes, condition, condition_mask)
        ce.backward()
        torch.nn.utils.clip_grad_norm_(ours.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.setdefault("ours", ce.detach())

    calls = {"ours": step_ours}
    tables = lm.pattern_tables(cfg.pattern, cfg.n_q, ours.delays, T, True, str(device))
    S = tables.S
    if ref is not None:
        # transformers shifts labels right itself (start token = card), so its input is our pattern sequence
        sequence = lm.build_sequence(codes, tables, cfg.card)                                 # [B, K, S]
        labels = torch.cat([sequence[..., 1:], sequence.new_full((B, cfg.n_q, 1), cfg.card)], -1).transpose(1, 2)
        if a["compile"]:
            for layer in ref.model.decoder.layers:
                layer.compile()
        ref.train()
        params = list(ref.parameters()) + list(proj.parameters())
        ref_opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)

        def step_ref():
            with autocast():
                loss = ref(input_ids=sequence.reshape(B * cfg.n_q, S), encoder_hidden_states=proj(states),
                           labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            ref_opt.step()
            ref_opt.zero_grad(set_to_none=True)
            losses.setdefault("transformers", loss.detach())

        calls["transformers"] = step_ref
    optimizers = {"ours": opt, "transformers": ref_opt if ref is not None else None}
    return calls, optimizers, losses, (B, T, S, L)


def bench_train(a):
    device = a["device"]
    ours, cfg = build_lm(a)
    n = lm.num_params(ours)
    if device.type == "cpu":
        check_memory((2 if a["reference"] else 1) * n * 16, f"training the {a['size']} model with AdamW")
    ref, proj = transformers_lm(ours) if a["reference"] else (None, None)
    calls, optimizers, losses, (B, T, S, L) = train_calls(a, ours, cfg, ref, proj)
    load_start = load()
    peak, peak_label = peak_flops_for(device, a["dtype"], a["clock"])
    times = rounds(calls, a["repeats"], device, max(a["warmup"], 2 if a["compile"] else 0), a["clock"])
    flops = lm.flops_per_token(cfg, S, L) * B * S      # per update, credited alike to both (the same math)
    models = {"ours": ours, "transformers": ref}
    rows = []
    for name, fn in calls.items():
        persistent = tensor_bytes(models[name].parameters()) + optimizer_bytes(optimizers[name])
        mem = (persistent + step_peak_memory(fn, device)) / 2 ** 30
        t = statistics.median(times[name])
        rows.append([name, spread(times[name]), rate(B * T, times[name]), rate(B * T * cfg.n_q, times[name]),
                     f"{100 * flops / t / peak:.1f}%", f"{mem:.2f} GiB", f"{float(losses[name]):.4f}"])
    if ref is not None:
        rows.append(["ratio (transformers time / ours)", ratio(times["ours"], times["transformers"]), "", "", "", "",
                     ""])
    notes = [f"model: {a['size']} ({cfg.dim} wide, {cfg.n_layers} layers, {n / 1e6:.1f}M parameters); "
             f"{shape_note(a, 'train')} = {T} frames, text {L} positions; {str(a['dtype']).split('.')[-1]}"
             f"{', compiled per block' if a['compile'] else ', eager'}",
             "one call = forward, backward, clip_grad_norm_, fused AdamW step, zero_grad; the same for both",
             f"MFU = flops_per_token x steps/s over {peak_label}; memory = parameters + optimizer state + the step's "
             f"peak on top ({'allocator' if device.type == 'cuda' else 'profiler'}); "
             "loss = the first step's (equal: the same computation)"] + common_notes(a, load_start)
    print_table(f"bench train: {a['size']}", notes,
                ["implementation", f"update {a['clock']} s", "frames/s", "tokens/s", "MFU", "peak memory",
                 "first loss"],
                rows)
    if a["profile"]:
        profile(calls, device)
    return times


# ----------------------------------------------------------------------------------------------------------
# generate: seconds of audio from a text condition, classifier-free guidance (coef 3), top-k 250 sampling

def generate_calls(a, ours, cfg, ref=None):
    device = a["device"]
    B, n, L = a["batch_size"], max(1, round(a["seconds"] * 50)), a["text_len"]
    g = torch.Generator().manual_seed(1)
    # weights in the compute dtype (as gpt-fast): autocast would re-cast every weight at every step
    ours.to(a["dtype"]).eval()
    states = torch.randn(B, L, cfg.text_dim, generator=g).to(device, a["dtype"])
    mask = torch.ones(B, L, dtype=torch.bool, device=device)
    with torch.no_grad():
        condition, condition_mask = ours.conditioner(states, mask)                           # [B, L, dim]
    if a["compile"]:
        # the decode-and-sample step with static shapes, as generate.py compiles it; on CUDA "reduce-overhead"
        # replays it as a CUDA graph
        lm.compile_decode(ours)
    out = {}

    def gen_ours():
        out["ours"] = ours.generate(condition, condition_mask, n, cfg_coef=3.0, top_k=250, temperature=1.0)

    calls = {"ours": gen_ours}
    if ref is not None:
        ref.to(a["dtype"]).eval()
        memory = torch.cat([condition, torch.zeros_like(condition)])   # conditional rows, then the null condition
        start = torch.full((B * cfg.n_q, 1), cfg.card, device=device)

        def gen_ref():
            # transformers 5: an all-ones attention mask and an explicit two-part cache, or its tokens are wrong
            with torch.no_grad():
                out["transformers"] = ref.generate(
                    input_ids=start, attention_mask=torch.ones_like(start), encoder_hidden_states=memory,
                    guidance_scale=3.0, do_sample=True, top_k=250, temperature=1.0, max_length=n + cfg.n_q,
                    **transformers_cache())

        calls["transformers"] = gen_ref
    return calls, out, (B, n, L)


def bench_generate(a):
    device = a["device"]
    ours, cfg = build_lm(a)
    ref = transformers_lm(ours)[0] if a["reference"] else None
    calls, out, (B, n, L) = generate_calls(a, ours, cfg, ref)
    load_start = load()
    bandwidth = copy_bandwidth(device, a["clock"])
    times = rounds(calls, a["repeats"], device, max(a["warmup"], 1 if a["compile"] else 0), a["clock"])
    for name, codes in out.items():
        if tuple(codes.shape) != (B, cfg.n_q, n):
            raise RuntimeError(f"{name} generated {tuple(codes.shape)}, expected {(B, cfg.n_q, n)}")
    steps = n + cfg.n_q - 1      # decode steps of the delay pattern, the same for both
    # bytes every step must read: the transformer's and heads' weights (embedding rows are gathered, not read)
    weights = tensor_bytes(p for name, p in ours.named_parameters() if not name.startswith(("emb.", "condition_")))
    rows = []
    for name in calls:
        t = statistics.median(times[name])
        rows.append([name, spread(times[name]), rate(steps, times[name]), rate(B * n, times[name]),
                     f"{B * a['seconds'] / t:.3g}x", f"{_si(weights * steps / t)}B/s"])
    if ref is not None:
        rows.append(["ratio (transformers time / ours)", ratio(times["ours"], times["transformers"]), "", "", "", ""])
    notes = [f"model: {a['size']} ({cfg.dim} wide, {cfg.n_layers} layers, {lm.num_params(ours) / 1e6:.1f}M "
             f"parameters); {shape_note(a, 'generate')} = {n} frames, {steps} decode steps, text {L} positions; "
             f"{str(a['dtype']).split('.')[-1]} weights; CFG coef 3 (conditional and null rows batched: {2 * B} rows), "
             "top-k 250 sampling",
             "ours: " + ("decode and sampling step compiled (model.compile_decode" +
                         (", reduce-overhead: CUDA graphs)" if device.type == "cuda" else ")")
                         if a["compile"] else "eager") + ", static KV cache, keyed-noise sampling; transformers: "
             "eager, its dynamic cache",
             f"real time = audio seconds generated per second; weights B/s = weight bytes read per step x "
             f"steps/s (measured copy bandwidth {_si(bandwidth)}B/s)"] + common_notes(a, load_start)
    print_table(f"bench generate: {a['size']}", notes,
                ["implementation", f"{a['clock']} s", "steps/s", "frames/s", "real time", "weights B/s"], rows)
    if a["profile"]:
        profile(calls, device)
    return times


# ----------------------------------------------------------------------------------------------------------
# codec: encode and decode, ours against transformers' EncodecModel with the same weights

def transformers_encodec(device, wav):
    """EncodecModel with facebook/encodec_32khz's config. Built from a config its codebooks are all zero, so they
    get random codewords on the scale of the encoder's output (stage 0 around its mean, residual stages smaller)."""
    require_transformers()
    from transformers import EncodecConfig, EncodecModel
    torch.manual_seed(0)
    hf = EncodecModel(EncodecConfig(
        sampling_rate=32000, audio_channels=1, upsampling_ratios=[8, 5, 4, 4], num_filters=64, codebook_size=2048,
        target_bandwidths=[2.2], use_causal_conv=False, normalize=False, use_conv_shortcut=False,
        norm_type="weight_norm", pad_mode="reflect")).eval()
    with torch.no_grad():
        z = hf.encoder(wav[:1, :, :32000])                                                    # [1, 128, 50]
        mean, std = z.mean((0, 2)), z.std((0, 2))
        g = torch.Generator().manual_seed(1)
        for q, layer in enumerate(hf.quantizer.layers):
            noise = torch.randn(layer.codebook.embed.shape, generator=g)
            layer.codebook.embed.copy_(mean + std * noise if q == 0 else 2 ** -q * std * noise)
    return hf.to(device)


def chord_signal(B, seconds, sr=32000):
    """[B, 1, S]: chords with harmonics under noise, a different root per item."""
    g = torch.Generator().manual_seed(2)
    t = torch.arange(int(seconds * sr)) / sr
    rows = []
    for b in range(B):
        root = 110.0 * 2 ** (b % 12 / 12)
        chord = sum(torch.sin(2 * math.pi * root * r * h * t) / h for r in (1, 1.26, 1.5) for h in (1, 2, 3))
        rows.append(0.1 * chord + 0.05 * torch.randn(t.shape, generator=g))
    return torch.stack(rows)[:, None]


def bench_codec(a):
    device, B, seconds = a["device"], a["batch_size"], a["seconds"]
    wav = chord_signal(B, seconds)
    hf = transformers_encodec("cpu", wav)
    with tempfile.TemporaryDirectory() as tmp:   # our loader reads the reference's own files: identical weights
        hf.save_pretrained(tmp)
        ours = formats.load_codec(tmp).to(device)
    hf = hf.to(device)
    wav = wav.to(device)
    if a["compile"]:   # layer by layer: the codec runs slices of its Sequentials, which a compiled parent would miss
        for layer in (*ours.encoder, *ours.decoder):
            layer.compile()
    out = {}
    with torch.no_grad():
        codes = ours.encode(wav)                                                              # [B, K, T]

    def call(name, fn):
        def run():
            with torch.no_grad():
                out[name] = fn()
        return run

    enc = {"ours": call("enc ours", lambda: ours.encode(wav))}
    dec = {"ours": call("dec ours", lambda: ours.decode(codes))}
    if a["reference"]:
        enc["transformers"] = call("enc transformers", lambda: hf.encode(wav, bandwidth=2.2).audio_codes[0])
        dec["transformers"] = call("dec transformers", lambda: hf.decode(codes[None], [None]).audio_values)
    load_start = load()
    times = {("encode", k): v for k, v in rounds(enc, a["repeats"], device, a["warmup"], a["clock"]).items()}
    times.update({("decode", k): v for k, v in rounds(dec, a["repeats"], device, a["warmup"], a["clock"]).items()})
    rows = []
    for (what, name), ts in times.items():
        rows.append([f"{what}: {name}", spread(ts), f"{B * seconds / statistics.median(ts):.3g}x "
                     f"({B * seconds / max(ts):.3g}-{B * seconds / min(ts):.3g})"])
        if name == "transformers":
            rows.append([f"{what}: ratio (transformers time / ours)", ratio(times[(what, 'ours')], ts), ""])
    agree = ""
    if a["reference"]:
        same = (out["enc ours"] == out["enc transformers"]).float().mean().item()
        err = ((out["dec ours"] - out["dec transformers"]).abs().max() / out["dec transformers"].abs().max()).item()
        agree = f"; codes equal to transformers': {100 * same:.2f}%, decoded audio max relative difference {err:.1e}"
    notes = [f"codec: encodec_32khz shape (64 filters, ratios 8 5 4 4, 2-layer LSTM, 4 x 2048 codebooks), random "
             f"weights, identical in both{agree}", f"{shape_note(a, 'codec')}; float32"
             f"{', our encoder and decoder compiled layer by layer' if a['compile'] else ''}",
             "real time = audio seconds processed per second (batch x seconds / time)"] + common_notes(a, load_start)
    print_table("bench codec: encodec_32khz", notes, ["call", f"{a['clock']} s", "real time"], rows)
    if a["profile"]:
        profile({f"{w} {k}": f for w, d in (("encode", enc), ("decode", dec)) for k, f in d.items()}, device)
    return times


# ----------------------------------------------------------------------------------------------------------
# data: segments per second from the token cache and from raw audio, against what the train step consumes

def bench_data(a):
    import data
    device, B, seconds = a["device"], a["batch_size"], a["seconds"]
    codec = formats.load_codec(a["codec"]).to(device)
    load_start = load()
    rows, speeds = [], {}
    for cached in (True, False):
        ds = data.open_split(a["dataset"], "train", codec=codec, train=True, segment_duration=seconds,
                             token_cache=cached, cache_dir=a["cache_dir"] or None)
        loader = data.make_loader(ds, B, num_workers=a["num_workers"], pin_memory=device.type == "cuda")
        r = data.loader_speed(loader, batches=max(4, 4 * a["repeats"]))
        speeds[cached] = r["segments_per_s"]
        rows.append([f"loader, {'token cache' if cached else 'raw audio'}", f"{_si(r['segments_per_s'])}",
                     f"{r['first_batch_s']:.2f}"])
        if not cached:
            wav = next(iter(loader))["wav"].to(device)                                        # [B, C, samples]
            times = rounds({"encode": lambda: codec.encode(wav)}, a["repeats"], device)["encode"]
            encode = B / statistics.median(times)
            rows.append([f"codec encode of those segments ({a['codec']} codec)", _si(encode), ""])
            speeds["end to end"] = 1 / (1 / speeds[False] + 1 / encode)
            rows.append(["raw audio end to end (loader, then encode)", _si(speeds["end to end"]), ""])
    # what the train step consumes: our update at this size and shape (no reference)
    ours, cfg = build_lm(a)
    if (cfg.n_q, cfg.card) != (codec.n_q, codec.card):
        raise UserError(f"--size={a['size']} (n_q={cfg.n_q}, card={cfg.card}) does not fit --codec={a['codec']} "
                        f"(n_q={codec.n_q}, card={codec.card}): pick a matching pair")
    calls = train_calls(a, ours, cfg)[0]
    need = B / statistics.median(rounds(calls, max(3, a["repeats"] // 2), device)["ours"])
    rows.append([f"train step consumes ({a['size']} model, {str(a['dtype']).split('.')[-1]})", _si(need), ""])
    notes = [f"dataset {a['dataset']}, train split, {shape_note(a, 'data')} segments, {a['num_workers']} loader "
             f"workers; codec {a['codec']}",
             f"headroom: token cache {speeds[True] / need:.1f}x, raw audio loader {speeds[False] / need:.1f}x, raw "
             f"audio with encoding {speeds['end to end'] / need:.1f}x the train step's need (below 1x the step waits)",
             "loader rates: one pass of the batches after 2 warm-up batches (first batch s = their mean); all rates "
             "by the wall clock (loader workers are other processes)"] + common_notes(a, load_start)[:1]
    print_table("bench data", notes, ["source", "segments/s", "first batch s"], rows)


def main(argv):
    mode, a = parse(argv)
    if a["device"].type == "cpu":
        torch.set_num_threads(a["threads"] or os.cpu_count())
        a["keep_freed"] = a["keep_freed"] and env.keep_freed_memory()
    {"train": bench_train, "generate": bench_generate, "codec": bench_codec, "data": bench_data}[mode](a)
    return 0


if __name__ == "__main__":
    cli(main)
