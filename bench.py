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
import contextlib
import difflib
import math
import os
import platform
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

import env
import formats
import model as lm
import quantize
from env import UserError, cli

SIZES = {  # the LM sizes of config/debug.py, base.py (small), medium.py and large.py
    "debug": dict(dim=128, n_layers=4, n_heads=4, card=256, text_dim=128),
    "small": dict(dim=1024, n_layers=24, n_heads=16),
    "medium": dict(dim=1536, n_layers=48, n_heads=24),
    "large": dict(dim=2048, n_layers=48, n_heads=32),
}
MODES = ("train", "generate", "codec", "data", "quality", "memory", "suite")
OPTIONS = dict(size="", device="", dtype="", compile=False, batch_size=0, seconds=0.0, text_len=32, repeats=0,
               warmup=1, threads=0, clock="wall", keep_freed=True, reference=True, profile=False, codec="debug",
               dataset="demo", cache_dir="", num_workers=2, quantize="", group_size=32, parts="", budget=0.0, out="",
               check=False, run="", runs_dir="")
# (batch, seconds) when not given. A GPU gets the shapes; a CPU reduced ones, so that a run takes minutes.
GPU_SHAPES = {"train": (8, 30.0), "generate": (1, 30.0), "codec": (32, 30.0), "data": (16, 30.0),
              "quality": (1, 10.0), "memory": (1, 30.0), "suite": (1, 30.0)}
CPU_SHAPES = {"train": (1, 1.0), "generate": (1, 1.0), "codec": (1, 10.0), "data": (16, 4.0), "quality": (1, 10.0),
              "memory": (1, 30.0), "suite": (1, 30.0), ("train", "debug"): (16, 4.0), ("generate", "debug"): (1, 10.0)}


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
    mode = argv[0]
    modes = opts["quantize"].split(",") if opts["quantize"] else []
    if any(m not in quantize.MODES for m in modes) or (len(modes) > 1 and mode != "quality"):
        raise UserError(f"--quantize={opts['quantize']}: one of {', '.join(quantize.MODES)}"
                        f"{' (a comma list)' if mode == 'quality' else ''}")
    if opts["dtype"] and opts["dtype"] not in lm.DTYPES:
        raise UserError(f"--dtype={opts['dtype']}: one of {', '.join(lm.DTYPES)}")
    try:
        device = torch.device(opts["device"] or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise UserError(f"--device={opts['device']}: not a torch device (cpu, cuda, cuda:1)") from None
    if device.type not in ("cpu", "cuda") or (device.type == "cuda" and not torch.cuda.is_available()):
        raise UserError(f"--device={opts['device']}: bench runs on cpu or an available cuda device")
    opts["device"] = device
    suite_size = "small" if device.type == "cuda" else "debug"
    opts["size"] = opts["size"] or {"memory": "small,medium,large", "suite": suite_size}.get(mode, "debug")
    sizes = opts["size"].split(",")
    if any(size not in SIZES for size in sizes) or (len(sizes) > 1 and mode != "memory"):
        listed = " (a comma list)" if mode == "memory" else ""
        raise UserError(f"--size={opts['size']}: one of {', '.join(SIZES)}{listed}")
    parts = opts["parts"].split(",") if opts["parts"] else []
    if any(part not in SUITE_PARTS for part in parts):
        raise UserError(f"--parts={opts['parts']}: a comma list of {', '.join(SUITE_PARTS)}")
    if opts["clock"] not in CLOCKS or (opts["clock"] == "cpu" and device.type != "cpu"):
        raise UserError(f"--clock={opts['clock']}: wall, or cpu (on a CPU device)")
    # bf16 where it is what training uses: a GPU, and the memory table (autocast's activations) on any device
    opts["dtype"] = lm.DTYPES[opts["dtype"] or ("bfloat16" if device.type == "cuda" or mode == "memory" else "float32")]
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

def build_lm(a, **overrides):
    """Our LM at a size (overrides: other LMConfig fields), on precomputed text states (T5's projection only, as
    transformers' decoder takes them)."""
    torch.manual_seed(0)
    with torch.device(a["device"]):   # initialised where it runs (a 3.3B model would take minutes on the host)
        ours = lm.build_lm({**SIZES[a["size"]], "cfg_dropout": 0.0, **overrides}, with_t5=False)
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
    for layer in ours.transformer.layers:   # in train.py's order: checkpointing, then compile
        if a.get("checkpointing"):
            import train
            layer.forward = train._checkpointed(layer.forward)
        if a["compile"]:
            layer.compile(**a.get("compile_options", {}))
    ours.train()
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.95),
                            weight_decay=0.1, fused=True)
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
                layer.compile(**a.get("compile_options", {}))
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

@torch.no_grad()
def text_condition(model, B, L, generator):
    """A random text condition [B, L, dim] through the model's projection (as T5's states would go), mask [B, L]."""
    device, dtype = model.out_norm.weight.device, model.out_norm.weight.dtype
    states = torch.randn(B, L, model.cfg.text_dim, generator=generator).to(device, dtype)
    return model.conditioner(states, torch.ones(B, L, dtype=torch.bool, device=device))


def generate_calls(a, ours, cfg, ref=None):
    device = a["device"]
    B, n, L = a["batch_size"], max(1, round(a["seconds"] * 50)), a["text_len"]
    g = torch.Generator().manual_seed(1)
    # weights in the compute dtype (as gpt-fast): autocast would re-cast every weight at every step
    ours.to(a["dtype"]).eval()
    condition, condition_mask = text_condition(ours, B, L, g)                                # [B, L, dim]
    # what every step must read: the transformer's and the heads' weights, float for the reference
    weights = {"transformers": quantize.weight_bytes(ours)}
    if a["quantize"]:
        quantize.quantize(ours, a["quantize"], a["group_size"])
    if a["compile"]:
        compile_decode(ours)   # the decode-and-sample step as generate.py compiles it (CUDA graphs on a GPU)
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
    weights["ours"] = quantize.weight_bytes(ours)
    return calls, out, (B, n, L), weights


def bench_generate(a):
    device = a["device"]
    ours, cfg = build_lm(a)
    ref = transformers_lm(ours)[0] if a["reference"] else None
    n_params = lm.num_params(ours)   # before quantizing (an int4 weight's tensor holds two values per element)
    calls, out, (B, n, L), weights = generate_calls(a, ours, cfg, ref)
    load_start = load()
    bandwidth = copy_bandwidth(device, a["clock"])
    times = rounds(calls, a["repeats"], device, max(a["warmup"], 1 if a["compile"] else 0), a["clock"])
    for name, codes in out.items():
        if tuple(codes.shape) != (B, cfg.n_q, n):
            raise RuntimeError(f"{name} generated {tuple(codes.shape)}, expected {(B, cfg.n_q, n)}")
    steps = n + cfg.n_q - 1      # decode steps of the delay pattern, the same for both
    rows = []
    for name in calls:
        t = statistics.median(times[name])
        rows.append([name, spread(times[name]), rate(steps, times[name]), rate(B * n, times[name]),
                     f"{B * a['seconds'] / t:.3g}x", f"{_si(weights[name] * steps / t)}B/s"])
    if ref is not None:
        rows.append(["ratio (transformers time / ours)", ratio(times["ours"], times["transformers"]), "", "", "", ""])
    notes = [f"model: {a['size']} ({cfg.dim} wide, {cfg.n_layers} layers, {n_params / 1e6:.1f}M "
             f"parameters); {shape_note(a, 'generate')} = {n} frames, {steps} decode steps, text {L} positions; "
             f"{weight_note(a)}; CFG coef 3 (conditional and null rows batched: {2 * B} rows), "
             "top-k 250 sampling",
             "ours: " + ("decode and sampling step compiled (model.compile_decode" +
                         (", reduce-overhead: CUDA graphs)" if device.type == "cuda" else ")")
                         if a["compile"] else "eager") + ", static KV cache, keyed-noise sampling; transformers: "
             "eager, its dynamic cache",
             f"real time = audio seconds generated per second; weights B/s = weight bytes read per step x "
             f"steps/s (measured copy bandwidth {_si(bandwidth)}B/s)"] + common_notes(a, load_start)
    if a["quantize"]:
        notes.insert(1, f"ours: weights quantized to {ours.quantized}, {_si(weights['ours'])}B read per step "
                        f"(transformers: {str(a['dtype']).split('.')[-1]}, {_si(weights['transformers'])}B); on a "
                        "CPU the quantized matmuls take bfloat16 activations")
    print_table(f"bench generate: {a['size']}", notes,
                ["implementation", f"{a['clock']} s", "steps/s", "frames/s", "real time", "weights B/s"], rows)
    if a["profile"]:
        profile(calls, device)
    return times


def weight_note(a):
    dtype = str(a["dtype"]).split(".")[-1]
    return f"{dtype} weights" + (f", ours quantized ({a['quantize']})" if a["quantize"] else "")


# Descriptions in the demo set's words, for a trained run's text conditioner (bench quality --run)
DEMO_PROMPTS = ("A slow major melody on a soft sine wave in a low register, 70 bpm.",
                "Bright sawtooth synth, fast tempo, D minor, high register, with drums.",
                "A moderate tune in A major played by a plucked string, middle register, 104 bpm.",
                "Square wave synth, slow tempo, E minor, low register, with drums.")


def bench_quality(a):
    """What weight-only quantization costs: greedy decoding of the float model against its quantized copies from
    the same condition (quantize.compare), one row per mode. --run: a trained run's weights, conditioned on
    descriptions in the demo set's words; else random weights at --size, on random text states."""
    import copy
    device = a["device"]
    B, n, L = a["batch_size"], max(1, round(a["seconds"] * 50)), a["text_len"]
    if a["run"]:
        loaded = formats.load(a["run"], a["runs_dir"] or None, device=device)
        ours, cfg, what = loaded.lm, loaded.lm.cfg, f"run {a['run']} ({loaded.weights} weights)"
        ours.to(a["dtype"]).eval()
        with torch.no_grad():
            condition, mask = ours.conditioner([DEMO_PROMPTS[i % len(DEMO_PROMPTS)] for i in range(B)])
    else:
        ours, cfg = build_lm(a)
        what = (f"{a['size']}, random weights (seed 0; a trained model's sharper logits flip less: see --run)")
        ours.to(a["dtype"]).eval()
        condition, mask = text_condition(ours, B, L, torch.Generator().manual_seed(1))
    load_start = load()
    rows = [[str(a["dtype"]).split(".")[-1], f"{_si(quantize.weight_bytes(ours))}B", "-", "-", "-", "-", "-"]]
    # the cost of bfloat16 weights and activations alone, where the model is float32: the yardstick for the rest
    copies = {"bfloat16 (not quantized)": lambda: copy.deepcopy(ours).to(torch.bfloat16)} \
        if a["dtype"] == torch.float32 else {}
    for mode in (a["quantize"] or ",".join(quantize.MODES)).split(","):
        copies[mode] = lambda mode=mode: quantize.quantize(copy.deepcopy(ours), mode, a["group_size"])
    for name, make in copies.items():
        other = make()
        r = quantize.compare(ours, other, condition, mask, n)
        err = r["step_error"]
        first = "never" if r["first_difference"] is None else f"frame {r['first_difference']}"
        rows.append([getattr(other, "quantized", name), f"{_si(quantize.weight_bytes(other))}B",
                     f"{100 * r['agreement']:.1f}%", first, f"{100 * r['top1']:.1f}%",
                     f"{err.median().item():.3g} ({err.max().item():.3g})", f"{r['logits_std']:.3g}"])
        del other
    notes = [f"model: {what}, {cfg.dim} wide, {cfg.n_layers} layers; {weight_note(a)}; greedy decoding of "
             f"{a['seconds']:g} s ({n} frames), batch {B}, CFG coef 3, text {mask.shape[1]} positions",
             "agreement: equal codes, each model decoding on its own; first difference: where they part (after it "
             "each continues from different codes); top-1: teacher-forced on the float model's codes, same argmax; "
             "logits error: largest |difference| of the guided logits per step, median (max) over steps, beside the "
             "float logits' std", f"device: {describe_device(device)}; load average {load_start:.1f}"]
    print_table(f"bench quality: {a['run'] or a['size']}", notes, ["weights", "bytes per step", "greedy agreement",
                                                      "first difference", "top-1 (teacher-forced)",
                                                      "max logits error per step", "logits std"], rows)


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


def codec_pair(a, B, seconds):
    """(ours, transformers' EncodecModel, wav [B, 1, samples]) on the device, with identical weights."""
    device = a["device"]
    wav = chord_signal(B, seconds)
    hf = transformers_encodec("cpu", wav)
    with tempfile.TemporaryDirectory() as tmp:   # our loader reads the reference's own files: identical weights
        hf.save_pretrained(tmp)
        ours = formats.load_codec(tmp).to(device)
    if a["compile"]:   # layer by layer: the codec runs slices of its Sequentials, which a compiled parent would miss
        for layer in (*ours.encoder, *ours.decoder):
            layer.compile()
    return ours, hf.to(device), wav.to(device)


def codec_calls(ours, hf, wav, reference=True, dtype=torch.float32):
    """({name: encode()}, {name: decode()}, out {name: last result}) for ours and the reference, under autocast to
    dtype unless float32 (the weights stay float32)."""
    device = wav.device
    out = {}
    with torch.no_grad():
        codes = ours.encode(wav)                                                              # [B, K, T]

    def call(name, fn):
        def run():
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                out[name] = fn()
        return run

    enc = {"ours": call("enc ours", lambda: ours.encode(wav))}
    dec = {"ours": call("dec ours", lambda: ours.decode(codes))}
    if reference:
        enc["transformers"] = call("enc transformers", lambda: hf.encode(wav, bandwidth=2.2).audio_codes[0])
        dec["transformers"] = call("dec transformers", lambda: hf.decode(codes[None], [None]).audio_values)
    return enc, dec, out


def bench_codec(a):
    device, B, seconds = a["device"], a["batch_size"], a["seconds"]
    ours, hf, wav = codec_pair(a, B, seconds)
    enc, dec, out = codec_calls(ours, hf, wav, a["reference"])
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
    import demo
    device, B, seconds = a["device"], a["batch_size"], a["seconds"]
    codec = formats.load_codec(a["codec"]).to(device)
    load_start = load()
    rows, speeds = [], {}
    dataset = demo.dataset_dir(a["dataset"])   # "demo": train.py's built-in set, where train.py writes it
    for cached in (True, False):
        ds = data.open_split(dataset, "train", codec=codec, train=True, segment_duration=seconds,
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


# ----------------------------------------------------------------------------------------------------------
# memory: peak training memory of one update, for fine-tuning the released sizes (30 s segments, bf16 autocast)

# setup -> (activation checkpointing, LoRA rank: 0 trains every weight; else adapters.py's adapters of that rank on
# its default targets, the attention's in_proj and out_proj, over a frozen base)
MEMORY_SETUPS = {"full": (False, 0), "full + checkpointing": (True, 0),
                 "adapters (LoRA rank 16, in_proj + out_proj) + checkpointing": (True, 16)}


def update_peak(a, size, n_layers, batch, frames, setup):
    """Peak bytes of the second training update (the first allocates AdamW's state) of our LM at `size` with
    n_layers, batch x frames, text a["text_len"] positions -> (peak, parameters, trained parameters). CUDA:
    the allocator's peak. CPU: parameters + optimizer state + the profiler's peak of the update on top."""
    import adapters
    checkpointing, rank = MEMORY_SETUPS[setup]
    b = {**a, "size": size, "batch_size": batch, "seconds": frames / 50, "compile": False,
         "checkpointing": checkpointing}
    model, _ = build_lm(b, n_layers=n_layers)
    if rank:
        adapters.add(model, rank)   # train.py's parallelize adds them first, before checkpointing
    calls, optimizers, _, _ = train_calls(b, model, model.cfg)
    peak = second_update_peak(calls["ours"], a["device"], [model], optimizers.values())
    counts = lm.num_params(model), sum(p.numel() for p in model.parameters() if p.requires_grad)
    del model, calls, optimizers
    release(a["device"])
    return (peak, *counts)


def second_update_peak(step, device, models, optimizers):
    """Bytes at the peak of a second call of step() (the first allocates the optimizer's state). CUDA: the
    allocator's peak, everything resident included. CPU: the models' parameters and the optimizers' state, and
    the profiler's peak of the update on top."""
    step()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        sync(device)
        return torch.cuda.max_memory_allocated(device)
    resident = tensor_bytes(p for m in models if m is not None for p in m.parameters())
    resident += sum(optimizer_bytes(o) for o in optimizers if o is not None)
    return resident + step_peak_memory(step, device)


def fit_memory(points):
    """Least squares of peak = c0 + c1 L over [(L, peak)] -> (c0, c1, the largest relative residual). At the full
    width and segment, both candidates for an update's peak grow linearly with the layers L: the activations saved
    for the backward (at its start) and the gradients (at its end); whichever grows faster per layer is the peak from
    a few layers on, so 2-4 layers find the line a full model lies on."""
    X = torch.tensor([[1.0, n] for n, _ in points], dtype=torch.float64)
    y = torch.tensor([p for _, p in points], dtype=torch.float64)
    c0, c1 = torch.linalg.lstsq(X, y[:, None]).solution[:, 0].tolist()
    return c0, c1, ((X @ torch.tensor([c0, c1], dtype=torch.float64) - y).abs() / y).max().item()


def bench_memory(a):
    """Peak training memory per update, batch 1 x 30 s, for each size and setup; the adapter target (medium, batch 2).
    A GPU measures the full shapes. A CPU measures at the size's full width and segment with 2, 3 and 4 layers and
    extrapolates in the layers (fit_memory); --check measures the first size at its full shape too, to test that."""
    device, frames, B = a["device"], round(a["seconds"] * 50), a["batch_size"]
    gib, load_start = 2 ** 30, load()
    rows, notes = [], []
    plan = [(size, setup, B) for size in a["size"].split(",") for setup in MEMORY_SETUPS]
    if "medium" in a["size"].split(","):
        plan.append(("medium", list(MEMORY_SETUPS)[2], 2))            # the target: under 24 GB
    for size, setup, batch in plan:
        n_layers = SIZES[size]["n_layers"]
        if device.type == "cuda":
            peak, params, trained = update_peak(a, size, n_layers, batch, frames, setup)
            how = "measured"
        else:
            c0, c1, residual = fit_memory([(n, update_peak(a, size, n, batch, frames, setup)[0]) for n in (2, 3, 4)])
            peak = c0 + c1 * n_layers
            full = lm.build_lm(SIZES[size], with_t5=False, meta=True)   # parameters counted, none allocated
            if MEMORY_SETUPS[setup][1]:
                import adapters
                adapters.add(full, MEMORY_SETUPS[setup][1])
            params, trained = lm.num_params(full), sum(p.numel() for p in full.parameters() if p.requires_grad)
            how = f"extrapolated from 2-4 layers ({_si(c1)}B per layer, fit within {100 * residual:.1f}%)"
            if a["check"] and size == plan[0][0] and batch == 1:
                measured = update_peak(a, size, n_layers, batch, frames, setup)[0]
                how += f"; measured at full shape {measured / gib:.3g} GiB ({100 * (peak / measured - 1):+.1f}%)"
        ema = 4 * trained
        rows.append([size, setup, batch, f"{params / 1e6:.1f}M", f"{trained / 1e6:.1f}M", f"{peak / gib:.3g}",
                     f"{(peak + ema) / gib:.3g}", how])
        print(f"| {' | '.join(map(str, rows[-1]))} |", file=sys.stderr, flush=True)
    notes = [f"one training update (forward, backward, clip, fused AdamW) of our LM, {a['seconds']:g} s segments "
             f"({frames} frames), text {a['text_len']} positions on precomputed states, "
             f"{str(a['dtype']).split('.')[-1]} autocast, float32 weights; peak = weights + gradients + AdamW state + "
             "activations at the update's peak (second update)",
             "with EMA: train.py's default EMA adds 4 bytes per trained parameter on the device; T5-base's encoder "
             "(frozen, float32) adds 0.41 GiB when conditioner=t5",
             "adapters: adapters.py's LoRA on the attention's in_proj and out_proj (its default targets), over a "
             "frozen base: no gradients or AdamW state for the base, but the backward runs through every layer",
             f"device: {describe_device(device)}; "
             + ("torch.cuda.max_memory_allocated" if device.type == "cuda" else
                "CPU: the profiler's allocations at the size's full width, segment and batch with 2, 3 and 4 layers, "
                "fitted by peak = c0 + c1 L (least squares) and evaluated at the size's layers")
             + f"; load average {load_start:.1f}"]
    print_table("bench memory: training peak per update", notes,
                ["size", "setup", "batch", "parameters", "trained", "peak GiB", "with EMA GiB", "how"], rows)
    return rows


# ----------------------------------------------------------------------------------------------------------
# suite: every GPU measurement of the issue in one process and one table. A CPU runs the same code at reduced shapes
# (the smoke test's run), so that it cannot rot between the GPU sessions that run it for real.

# The suite's shapes per device type. GPU: the issue's. CPU: small enough for about a minute on two cores.
SUITE_SHAPES = {
    "cuda": dict(train_seconds=30.0, gen_seconds=30.0, gen_batches=(1, 16), codec=(32, 30.0), loader_seconds=30.0,
                 loss_shape=(2, 5.0), greedy_seconds=4.0, budget=450.0, capacity=0.85, repeats=3,
                 memory=(("medium", 2, 2), ("small", 1, 1))),   # (size, MEMORY_SETUPS index, batch)
    "cpu": dict(train_seconds=1.0, gen_seconds=0.4, gen_batches=(1, 4), codec=(1, 0.5), loader_seconds=4.0,
                loss_shape=(2, 1.0), greedy_seconds=0.4, budget=300.0, capacity=0.25, repeats=1,
                memory=(("debug", 2, 2),)),
}
# Parts in the order they run, with their shares of the budget (seconds of the GPU's 450; scaled to --budget); a part
# may run to twice its share. The correctness checks first: what a first GPU run is likeliest to find.
SUITE_PARTS = {"checks": 70, "train": 170, "generate": 200, "codec": 25, "loader": 15, "memory": 30}
SUITE_HEADER = ["part", "measurement", "ours", "transformers", "ratio", "target", "result"]
DEBUG_CONFIG = str(Path(__file__).resolve().parent / "config" / "debug.py")


class TimeBox(BaseException):
    """A suite part ran past its time box. A BaseException: train.py's stage handlers catch Exception."""


@contextlib.contextmanager
def time_box(seconds):
    """Raise TimeBox in this (the main) thread after `seconds`, between Python bytecodes."""
    def alarm(signum, frame):
        raise TimeBox(f"time box of {seconds:.0f} s spent")
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1.0))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def compile_backend(backend):
    """torch.compile and nn.Module.compile with `backend` unless the caller names one (train.py's layer.compile(),
    model.compile_decode's mode). The CPU suite uses dynamo's "eager" backend: the same graphs, guards and
    recompiles, without inductor's minutes of C++ builds."""
    if backend is None:
        yield
        return
    originals = torch.compile, torch.nn.Module.compile

    def with_backend(original):
        def compile(*args, **kwargs):
            if "backend" not in kwargs:
                kwargs.pop("mode", None)   # modes are inductor's
                kwargs["backend"] = backend
            return original(*args, **kwargs)
        return compile
    torch.compile, torch.nn.Module.compile = map(with_backend, originals)
    try:
        yield
    finally:
        torch.compile, torch.nn.Module.compile = originals


def compile_options(a):
    """torch.compile's options for the suite: inductor on a GPU, dynamo alone ("eager") on a CPU."""
    return {} if a["device"].type == "cuda" else {"backend": "eager"}


def compile_decode(model, cuda_graphs=None, backend=None):
    """model.compile_decode (the decode-and-sample step with static shapes; cuda_graphs: mode reduce-overhead,
    default on CUDA), replacing an earlier one. backend: the same compile with another dynamo backend (the CPU
    suite's "eager": the same graph, no inductor build); generate() runs whatever compiled_step holds."""
    lm.decompile_decode(model)
    if backend is None:
        mode = None if cuda_graphs is None else "reduce-overhead" if cuda_graphs else "default"
        return lm.compile_decode(model, mode)
    model.compiled_step = torch.compile(model.sample_step, fullgraph=True, backend=backend)
    return model


def release(device):
    """Between parts: drop compiled code (a fresh cache per part stays under dynamo's recompile limit) and memory."""
    import gc
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def verdict(value, goal, higher=True, device=None):
    """met or missed; "n/a on a CPU" for a GPU target measured on a CPU (device given)."""
    if device is not None and device.type != "cuda":
        return "n/a on a CPU"
    return "met" if (value >= goal if higher else value <= goal) else "missed"


def _gib(x):
    return f"{x / 2 ** 30:.2f} GiB"


def _med(times):
    return statistics.median(times)


def suite_data(a, ctx):
    """The demo set (small) and its token cache directory, shared by the loader and the train.py run: built once,
    in the suite's temporary directory."""
    import demo
    if "demo" not in ctx:
        root = Path(ctx["tmp"])
        ctx["demo"] = demo.make_demo_set(root / "demo", sizes={"train": 48, "valid": 8, "evaluate": 2, "generate": 2})
        ctx["cache"] = root / "cache"
    return ctx["demo"], ctx["cache"]


# -- checks: numerics and what only a GPU can show

def first_losses(a, dtype, batch, seconds, updates=3):
    """Losses of the first updates of our LM (seeded: the same init and batch whatever the dtype)."""
    b = {**a, "dtype": dtype, "batch_size": batch, "seconds": seconds, "compile": False}
    model, cfg = build_lm(b)
    calls, _, losses, _ = train_calls(b, model, cfg)
    out = []
    for _ in range(updates):
        calls["ours"]()
        out.append(float(losses.pop("ours")))
    return out


def check_losses(a, ctx, add):
    batch, seconds = ctx["shapes"]["loss_shape"]
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False   # the float32 reference in full float32
    try:
        fp32 = first_losses(a, torch.float32, batch, seconds)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    bf16 = first_losses(a, torch.bfloat16, batch, seconds)
    worst = max(abs(x - y) for x, y in zip(fp32, bf16))
    add(["checks", f"bf16 autocast loss vs float32, first {len(fp32)} updates ({a['size']}, batch {batch} x "
         f"{seconds:g} s)", " ".join(f"{x:.4f}" for x in bf16), "", "", "max diff <= 0.02",
         f"{'ok' if worst <= 0.02 else 'FAILED'} (float32 {' '.join(f'{x:.4f}' for x in fp32)}; diff {worst:.4f})"])


def check_greedy(a, ctx, add):
    """The compiled (CUDA-graph on a GPU) decode step gives the eager step's tokens under greedy decoding."""
    device = a["device"]
    model, cfg = build_lm({**a, "size": "debug"})
    model.eval()
    condition, mask = text_condition(model, 1, a["text_len"], torch.Generator().manual_seed(3))
    n = max(1, round(ctx["shapes"]["greedy_seconds"] * 50))
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        eager = model.generate(condition, mask, n, greedy=True)
        compile_decode(model, device.type == "cuda", compile_options(a).get("backend"))
        compiled = model.generate(condition, mask, n, greedy=True)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    same = (eager == compiled).float().mean().item()
    how = "CUDA graph" if device.type == "cuda" else "dynamo, eager backend"
    add(["checks", f"greedy tokens: compiled decode step ({how}) vs eager, debug model float32, {n} frames",
         f"{100 * same:.2f}% equal", "", "", "100%", "ok" if same == 1 else "FAILED"])


def _parallel_worker(rank, world, port, device_type, path):
    """One rank of check_parallel: the same bf16-autocast update of the debug model under DDP and under FSDP2
    (train.py's parallelize, TrainStep and optimizer); rank 0 saves the losses and the largest parameter difference."""
    import torch.distributed as dist
    import train
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    code = 0
    try:
        results = {}
        for parallel in ("ddp", "fsdp"):
            cfg = train.parse_args([DEBUG_CONFIG, f"--parallel={parallel}", "--dtype=bfloat16",
                                    f"--batch_size={2 * world}", "--cfg_dropout=0.5", "--word_dropout=0.5"])
            lm_ = train.build_model(cfg).to(device)
            model = train.parallelize(train.TrainStep(lm_), cfg, train.Dist(rank, rank, world, device))
            optimizer = train.make_optimizer(lm_, cfg)
            g = torch.Generator().manual_seed(rank)
            codes = torch.randint(0, cfg.card, (2, cfg.n_q, 50), generator=g).to(device)     # [B, K, T]
            valid = torch.ones(2, 50, dtype=torch.bool, device=device)
            torch.manual_seed(rank)   # the dropout draws (CFG: torch's; words: python's) the same under both
            random.seed(rank)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                ce, _ = model(codes, [f"a calm piano piece {rank}", "fast drums and bass"], valid)
            ce.backward()
            norm = torch.nn.utils.clip_grad_norm_(lm_.parameters(), cfg.max_norm)
            full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731
            grads = {k: full(p.grad).float().cpu() for k, p in lm_.named_parameters() if p.grad is not None}
            optimizer.step()
            loss = ce.detach().float().clone()
            dist.all_reduce(loss)
            results[parallel] = (loss.item() / world, full(norm).item(), grads)
        if rank == 0:
            ddp, fsdp = results["ddp"], results["fsdp"]
            diff = max(((ddp[2][k] - fsdp[2][k]).abs().max() / ddp[2][k].abs().max().clamp(min=1e-12)).item()
                       for k in ddp[2])
            torch.save({"loss": (ddp[0], fsdp[0]), "grad": (ddp[1], fsdp[1]), "grad_diff": diff,
                        "same_keys": ddp[2].keys() == fsdp[2].keys()}, path)
        dist.barrier()
    except BaseException:
        import traceback
        traceback.print_exc()
        code = 1
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)   # gloo can abort at interpreter exit (ENVIRONMENT.md)


def check_parallel(a, ctx, add):
    device = a["device"]
    world = torch.cuda.device_count() if device.type == "cuda" else 2
    if world < 2:
        add(["checks", "one FSDP2 update on NCCL vs DDP (bf16 autocast)", "", "", "", "", "skipped: one GPU"])
        return
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    path = Path(ctx["tmp"]) / "parallel.pt"
    world = min(world, 2)
    mp.start_processes(_parallel_worker, args=(world, port, device.type, str(path)), nprocs=world,
                       start_method="spawn")
    r = torch.load(path)
    backend = "NCCL" if device.type == "cuda" else "gloo"
    ok = abs(r["loss"][0] - r["loss"][1]) <= 1e-3 and r["grad_diff"] <= 1e-2 and r["same_keys"]
    add(["checks", f"one FSDP2 update vs DDP on {backend}, {world} processes, bf16 autocast (debug model)",
         f"loss {r['loss'][1]:.5f}, grad norm {r['grad'][1]:.4f}", "", "",
         "DDP's loss within 1e-3, gradients within 1%",
         f"{'ok' if ok else 'FAILED'} (DDP loss {r['loss'][0]:.5f}, grad norm {r['grad'][0]:.4f}; largest gradient "
         f"difference {100 * r['grad_diff']:.2g}% of its tensor's largest)"])


def check_train_run(a, ctx, add):
    """train.py itself on the device: the debug config with compile=True through two epochs with valid and generate
    stages. Counts what dynamo compiles (and why it recompiles), and the host syncs inside steady-state updates
    (updates 4..N-1 of the first epoch, under torch.cuda.set_sync_debug_mode("warn"); "error" would raise at the
    first), each with the line of train.py (or model.py, text.py, data.py) that made it."""
    import io
    import logging
    import traceback
    import warnings
    import train
    from torch._dynamo.utils import counters
    from torch.optim.optimizer import register_optimizer_step_post_hook
    device = a["device"]
    demo, cache = suite_data(a, ctx)
    updates = 8
    argv = [DEBUG_CONFIG, f"--device={device}", f"--runs_dir={ctx['tmp']}/runs", f"--dataset={demo}",
            f"--cache_dir={cache}", "--compile=True", f"--dtype={'bfloat16' if device.type == 'cuda' else 'float32'}",
            "--epochs=2", f"--updates_per_epoch={updates}", "--log_every=1000", "--generate_every=1",
            "--evaluate_every=0", "--generate_count=2", "--generate_duration=0.5", "--valid_batches=2",
            f"--num_workers={2 if device.type == 'cuda' else 0}", "--save_every=0", "--ema_every=2", "--clear=True",
            "--segment_duration=1.0"]
    cfg = train.parse_args(argv)
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    d = train.setup_distributed(cfg)
    syncs, watching, steps = [], [False], [0]
    project = os.path.dirname(os.path.abspath(__file__))

    def after_step(optimizer, args, kwargs):
        steps[0] += 1
        if steps[0] in (3, updates - 1):   # between these steps: updates 4 .. updates-1, whole
            watching[0] = steps[0] == 3
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("warn" if watching[0] else 0)

    def show(message, category, filename, lineno, file=None, line=None):
        if watching[0] and "synchroniz" in str(message):
            stack = traceback.extract_stack()[:-1]
            ours = [f for f in stack if os.path.dirname(os.path.abspath(f.filename)) == project
                    and not f.filename.endswith("bench.py")]
            at = ours[-1] if ours else stack[-1]
            # the thread too: one sync per update, attributed to two unrelated lines on the H200 (a block's call,
            # optimizer.step), looks like one delivered late from another thread (the loader's pin-memory thread?)
            thread = threading.current_thread().name
            syncs.append(f"{os.path.basename(at.filename)}:{at.lineno} `{(at.line or '').strip()[:70]}` "
                         f"(in {os.path.basename(stack[-1].filename)}:{stack[-1].lineno}"
                         f"{'' if thread == 'MainThread' else ', thread ' + thread})")

    records = []

    class Recompiles(logging.Handler):
        def emit(self, record):
            message = record.getMessage()
            if "Recompiling" in message or "recompile_limit" in message:
                records.append(message.splitlines())

    handler, dynamo_log = Recompiles(level=logging.DEBUG), logging.getLogger("torch._dynamo")
    graphs = counters["stats"]["unique_graphs"]
    hook = register_optimizer_step_post_hook(after_step)
    dynamo_log.addHandler(handler)
    torch._logging.set_logs(recompiles=True)
    output = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(output), \
                compile_backend(compile_options(a).get("backend")):
            warnings.simplefilter("always")
            warnings.showwarning = show
            code = train.train(cfg, d)
    finally:
        hook.remove()
        dynamo_log.removeHandler(handler)
        torch._logging.set_logs()
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode(0)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    log = output.getvalue()
    if code != 0 or "failed" in log:
        tail = [line for line in log.splitlines() if "failed" in line or "error" in line][-1:] or [f"exit {code}"]
        add(["checks", "train.py run (debug config, compile=True, valid and generate stages)", "", "", "", "",
             f"FAILED: {tail[0][:200]}"])
    graphs = counters["stats"]["unique_graphs"] - graphs
    limit = [r for r in records if "recompile_limit" in " ".join(r)]
    reasons = sorted({line.strip().lstrip("- ")[:90] for r in records for line in r[2:3]})
    add(["checks", "train.py run, compile=True: graphs dynamo compiled, recompiles (two epochs, valid and generate "
         "stages)", f"{graphs} graphs, {len([r for r in records if 'Recompiling' in r[0]])} recompiles", "", "",
         "no recompile-limit warning", ("FAILED: hit the recompile limit" if limit else "ok")
         + (f"; recompiled for: {'; '.join(reasons)}" if reasons else "")])
    if device.type != "cuda":
        add(["checks", "host syncs in a steady-state training update (train.py)", "n/a on a CPU", "", "", "0", ""])
        return
    where = {}
    for s_ in syncs:
        where[s_] = where.get(s_, 0) + 1
    per_update = len(syncs) / max(1, updates - 4)
    add(["checks", f"host syncs in a steady-state training update (train.py, updates 4-{updates - 1})",
         f"{per_update:g} per update", "", "", "0", "ok" if not syncs else
         "FAILED: " + "; ".join(f"{n / max(1, updates - 4):g}x {k}" for k, n in where.items())])


def suite_checks(a, ctx, add):
    for check in (check_losses, check_greedy, check_train_run, check_parallel):
        try:
            check(a, ctx, add)
        except TimeBox:
            raise
        except Exception as e:   # one failing check must not hide the others
            add(["checks", check.__name__.replace("check_", ""), "", "", "", "", f"FAILED: {one_line(e)}"])
        release(a["device"])


# -- train: the largest batch that fits, ours against transformers, and with checkpointing

def largest_batch(b, ours, cfg, ref, proj, capacity):
    """The largest batch whose update fits in `capacity` bytes, for both models: peaks of eager updates at batch 1
    and 2 (the second update of each: the optimizer state exists) give a fixed part and a per-sample slope; the
    compiled update needs no more. -> (batch, note)."""
    device, peaks = b["device"], {}
    for batch in (1, 2):
        calls, optimizers, _, _ = train_calls({**b, "batch_size": batch, "compile": False}, ours, cfg, ref, proj)
        for name, fn in calls.items():
            peaks[name, batch] = second_update_peak(fn, device, (ours, ref, proj), optimizers.values())
        del calls, optimizers
        release(device)
    fits = {}
    for name in {n for n, _ in peaks}:
        per_sample = max(1, peaks[name, 2] - peaks[name, 1])
        fits[name] = max(1, int((capacity - (peaks[name, 1] - per_sample)) // per_sample))
    note = ", ".join(f"{name} {fit} ({_gib(peaks[name, 2] - peaks[name, 1])}/sample)" for name, fit in fits.items())
    return min(fits.values()), note


def suite_train(a, ctx, add):
    device, shapes = a["device"], ctx["shapes"]
    b = {**a, "compile": True, "compile_options": compile_options(a), "seconds": shapes["train_seconds"],
         "batch_size": 1}
    ours, cfg = build_lm(b)
    ref, proj = transformers_lm(ours) if a["reference"] else (None, None)
    capacity = shapes["capacity"] * (torch.cuda.mem_get_info(device)[1] if device.type == "cuda"
                                     else 2 ** 30 * 4)
    B, note = largest_batch(b, ours, cfg, ref, proj, capacity)
    if device.type == "cpu":
        B = min(B, 4)   # a smoke test, not a search
    peak, peak_label = peak_flops_for(device, b["dtype"])
    for attempt in range(2):   # the probe's estimate may miss what compilation needs: once more with 3/4 of it
        b["batch_size"] = B
        calls, optimizers, losses, (B, T, S, L) = train_calls(b, ours, cfg, ref, proj)
        try:
            times = rounds(calls, shapes["repeats"], device, warmup=2)
            break
        except torch.OutOfMemoryError:
            if attempt:
                raise
        del calls, optimizers   # outside the handler: its traceback holds the failed step's tensors
        release(device)
        note += f"; out of memory at batch {B}"
        B = max(1, B * 3 // 4)
    flops = lm.flops_per_token(cfg, S, L) * B * S
    models = {"ours": ours, "transformers": ref}
    memory = {name: tensor_bytes(models[name].parameters()) + optimizer_bytes(optimizers[name])
              + step_peak_memory(fn, device) for name, fn in calls.items()}
    what = f"{a['size']}, batch {B} x {b['seconds']:g} s ({T} frames), bf16 autocast, compiled per block"
    t = {name: _med(ts) for name, ts in times.items()}
    has_ref = "transformers" in t
    ref_col = lambda f: f(*(["transformers"])) if has_ref else ""  # noqa: E731
    add(["train", f"update s ({what}; largest batch: {note})", f"{t['ours']:.3f}",
         ref_col(lambda n: f"{t[n]:.3f}"), ratio(times["ours"], times["transformers"]) if has_ref else "",
         "ours >= 1.3x", verdict(t["transformers"] / t["ours"], 1.3, device=device) if has_ref else ""])
    add(["train", "tokens/s (frames x codebooks)", _si(B * T * cfg.n_q / t["ours"]),
         ref_col(lambda n: _si(B * T * cfg.n_q / t[n])), "", "", ""])
    mfu = {name: flops / t[name] / peak for name in t}
    add(["train", f"MFU (vs {peak_label})", f"{100 * mfu['ours']:.1f}%", ref_col(lambda n: f"{100 * mfu[n]:.1f}%"),
         "", ">= 45%", verdict(mfu["ours"], 0.45, device=device)])
    add(["train", "peak memory per update (weights, AdamW, activations)", _gib(memory["ours"]),
         ref_col(lambda n: _gib(memory[n])), "", "", ""])
    first = {name: float(loss) for name, loss in losses.items()}
    if has_ref:
        same = abs(first["ours"] - first["transformers"]) < 0.02
        add(["train", "first loss (the same weights and batch)", f"{first['ours']:.4f}",
             f"{first['transformers']:.4f}", "", "equal", "ok" if same else "FAILED"])
    ctx["train_segments_per_s"] = B / t["ours"]
    ctx["train_batch"] = B
    del calls, optimizers, ref, proj, models
    release(device)
    # checkpointing: a fresh model, each layer recomputed in the backward (train.py's order: then compile)
    ckpt, _ = build_lm(b)
    calls, optimizers, _, _ = train_calls({**b, "checkpointing": True}, ckpt, cfg)
    times = rounds(calls, shapes["repeats"], device, warmup=2)["ours"]
    mem = tensor_bytes(ckpt.parameters()) + optimizer_bytes(optimizers["ours"])
    mem += step_peak_memory(calls["ours"], device)
    add(["train", f"with checkpointing: update s, tokens/s, MFU, peak memory (batch {B})",
         f"{_med(times):.3f} s, {_si(B * T * cfg.n_q / _med(times))}, {100 * flops / _med(times) / peak:.1f}%, "
         f"{_gib(mem)}", "", f"{_med(times) / t['ours']:.2f}x the time", "", ""])


# -- generate: 30 s with CFG at batch 1 (eager, compiled, CUDA graph, int8) and at batch 16, against transformers

def suite_generate(a, ctx, add):
    """Each way of decoding: one timed generation of the full length (two where it is cheap), after a warm-up that
    compiles (the full length: static shapes) or warms the caches (a short one)."""
    import copy
    device, shapes = a["device"], ctx["shapes"]
    b = {**a, "seconds": shapes["gen_seconds"]}
    ours, cfg = build_lm(b)
    ref = transformers_lm(ours)[0] if a["reference"] else None
    ours.to(a["dtype"]).eval()
    if ref is not None:
        ref.to(a["dtype"]).eval()
    n, short = max(1, round(b["seconds"] * 50)), 5
    g = torch.Generator().manual_seed(1)
    conditions = {B: text_condition(ours, B, a["text_len"], g) for B in shapes["gen_batches"]}
    backend, graphs = compile_options(a).get("backend"), device.type == "cuda"
    out, dtype = {}, str(a["dtype"]).split(".")[-1]

    def ours_gen(model, B, frames):   # per-row seeds: the same draws for every model, so codes can be compared
        return model.generate(*conditions[B], frames, cfg_coef=3.0, top_k=250, seeds=torch.arange(B))

    def ref_gen(B, frames):
        condition = conditions[B][0]
        start = torch.full((B * cfg.n_q, 1), cfg.card, device=device)
        with torch.no_grad():
            return ref.generate(input_ids=start, attention_mask=torch.ones_like(start),
                                encoder_hidden_states=torch.cat([condition, torch.zeros_like(condition)]),
                                guidance_scale=3.0, do_sample=True, top_k=250, max_length=frames + cfg.n_q,
                                **transformers_cache())

    def timed(name, gen, repeats=1, compiled=False):
        gen(n if compiled else short)
        times = rounds({name: lambda: out.__setitem__(name, gen(n))}, repeats, device, warmup=0)[name]
        return _med(times)

    def versus(t, t_ref):
        return f"{t_ref / t:.2f}x" if t_ref else ""

    # The headline first (CUDA-graph decode on a GPU), the slow ways last: eager decoding is launch-bound (about
    # 65 ms a step for the small model on an H200) and a time box that runs out must cut the least telling rows.
    batch1 = {"ref": None, "waiting": []}   # transformers' batch-1 time, and the rows added before it was known

    def row(what, t, target="", result=""):
        r = ["generate", what, f"{t:.2f} s", "", "", target, result]
        batch1["waiting"].append((r, t))
        ratios()
        add(r)
        return r

    def ratios():   # the table is rendered from these lists at the end of the part
        if batch1["ref"] is not None:
            for r, t in batch1["waiting"]:
                r[3], r[4] = f"{batch1['ref']:.2f} s", versus(t, batch1["ref"])
            batch1["waiting"].clear()

    compile_decode(ours, graphs, backend)
    t_first = timed("compiled", lambda f: ours_gen(ours, 1, f), repeats=2, compiled=True)
    if graphs:
        first = row("batch 1: compiled, CUDA-graph replay (reduce-overhead)", t_first,
                    "<= 3 s and >= 3x transformers", "met" if t_first <= 3.0 else "missed")
        add(["generate", f"batch 1, CUDA graph: {dtype} weight bytes read per second",
             f"{_si(quantize.weight_bytes(ours) * (n + cfg.n_q - 1) / t_first)}B/s", "", "", "", ""])
    else:
        row("batch 1: decode step compiled (dynamo only, on a CPU)", t_first)
    torch._dynamo.reset()
    lm.decompile_decode(ours)   # the int8 copy must not share ours' compiled step
    try:   # a torch without dynamo support for quantize.py's indexing must not cost the rows after it
        q = quantize.quantize(copy.deepcopy(ours), "int8")
        compile_decode(q, graphs, backend)
        t = timed("int8", lambda f: ours_gen(q, 1, f), repeats=2, compiled=True)
        agree = (out["int8"] == out["compiled"]).float().mean().item()
        row("batch 1: int8 weights (quantize.py), compiled" + (", CUDA graph" if graphs else ""), t,
            result=f"{_si(quantize.weight_bytes(q) * (n + cfg.n_q - 1) / t)}B/s of weights; codes {100 * agree:.0f}% "
                   f"equal to the {dtype} model's (same seeds)")
        del q
    except Exception as e:
        add(["generate", "batch 1: int8 weights (quantize.py), compiled", "", "", "", "", f"FAILED: {one_line(e)}"])
    if ref is not None:
        batch1["ref"] = timed("transformers", lambda f: ref_gen(1, f))
        ratios()
        if graphs and batch1["ref"] / t_first < 3:
            first[6] = "missed"
    torch._dynamo.reset()
    compile_decode(ours, graphs, backend)
    for B in shapes["gen_batches"][1:]:
        t = timed(f"batch {B}", lambda f: ours_gen(ours, B, f), compiled=True)
        t_ref = timed(f"transformers {B}", lambda f: ref_gen(B, f)) if ref is not None else None
        add(["generate", f"batch {B}: compiled{', CUDA graph' if graphs else ''}; frames/s",
             f"{t:.2f} s, {_si(B * n / t)} frames/s", f"{t_ref:.2f} s" if t_ref else "", versus(t, t_ref), "", ""])
    torch._dynamo.reset()
    lm.decompile_decode(ours)
    if graphs:   # eager last: the slowest, and the least telling
        t = timed("eager", lambda f: ours_gen(ours, 1, f))
        row(f"batch 1, {b['seconds']:g} s with CFG ({a['size']}, {dtype} weights): eager, static KV cache", t)


# -- codec: encode and decode at batch 32 x 30 s, float32 and bf16, against transformers' EncodecModel

def suite_codec(a, ctx, add):
    device = a["device"]
    B, seconds = ctx["shapes"]["codec"]
    ours, hf, wav = codec_pair({**a, "compile": False}, B, seconds)
    for dtype in (torch.float32, torch.bfloat16):
        enc, dec, out = codec_calls(ours, hf, wav, a["reference"], dtype)
        name = str(dtype).split(".")[-1]
        for what, calls in (("encode", enc), ("decode", dec)):
            times = rounds(calls, ctx["shapes"]["repeats"], device, warmup=1)
            speed = {k: B * seconds / _med(v) for k, v in times.items()}
            goal = what == "encode"
            add(["codec", f"{what}, batch {B} x {seconds:g} s, {name}: real time", f"{speed['ours']:.0f}x",
                 f"{speed['transformers']:.0f}x" if "transformers" in speed else "",
                 ratio(times["ours"], times["transformers"]) if "transformers" in times else "",
                 ">= 1000x" if goal else "", verdict(speed["ours"], 1000, device=device) if goal else ""])
        if a["reference"]:
            same = (out["enc ours"] == out["enc transformers"]).float().mean().item()
            add(["codec", f"codes equal to transformers' ({name})", f"{100 * same:.2f}%", "", "", "", ""])


# -- loader: the token cache's segments/s against what the train step consumes

def suite_loader(a, ctx, add):
    import data
    device = a["device"]
    demo, cache = suite_data(a, ctx)
    seconds = ctx["shapes"]["loader_seconds"]
    codec = formats.load_codec("debug")
    ds = data.open_split(str(demo), "train", codec=codec, train=True, segment_duration=seconds, token_cache=True,
                         cache_dir=str(cache), min_segment_ratio=0.0)
    batch = ctx.get("train_batch", 8)
    loader = data.make_loader(ds, batch, num_workers=a["num_workers"], pin_memory=device.type == "cuda")
    speed = data.loader_speed(loader, batches=max(8, 64 // batch))["segments_per_s"]
    need = ctx.get("train_segments_per_s")
    add(["loader", f"token cache, {seconds:g} s segments (demo clips of 4-6 s padded), batch {batch}, "
         f"{a['num_workers']} workers: segments/s", _si(speed), "", "", "", ""])
    if need:
        add(["loader", f"headroom over the train step's need ({_si(need)} segments/s, train part)",
             f"{speed / need:.0f}x", "", "", ">= 50x", verdict(speed / need, 50, device=device)])
    else:
        add(["loader", "headroom over the train step's need", "", "", "", ">= 50x", "skipped: no train figure"])


# -- memory: the adapter target (medium, adapters + checkpointing, batch 2 x 30 s)

def suite_memory(a, ctx, add):
    for size, setup, batch in ctx["shapes"]["memory"]:
        setup = list(MEMORY_SETUPS)[setup]
        frames = round(30.0 * 50) if a["device"].type == "cuda" else 100
        peak = update_peak(a, size, SIZES[size]["n_layers"], batch, frames, setup)[0]
        target = size == "medium" and MEMORY_SETUPS[setup][1] > 0
        add(["memory", f"training peak per update: {size}, {setup}, batch {batch} x {frames / 50:g} s, bf16",
             _gib(peak), "", "", "< 24 GB" if target else "",
             verdict(peak, 24e9, higher=False, device=a["device"]) if target else ""])
        release(a["device"])


def one_line(e):
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:240]}"


def suite_table(rows, a, started, times=None):
    device = a["device"]
    name = describe_device(device)
    if device.type == "cuda":
        name += f", CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s)"
    lines = [f"**bench suite** on {name}; torch {torch.__version__}; "
             f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(started))}; {time.time() - started:.0f} s",
             "", f"`python bench.py {' '.join(a['argv'])}`", "",
             "| " + " | ".join(SUITE_HEADER) + " |", "|" + "|".join("---" for _ in SUITE_HEADER) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows]
    if times:
        lines += ["", "Seconds per part: " + ", ".join(f"{part} {t:.0f}" for part, t in times.items())]
    return "\n".join(lines) + "\n"


def bench_suite(a):
    """Every part in turn under its time box (the parts share --budget seconds); a part that fails or runs out of
    time leaves a row saying so, and the others still run. The table is printed at the end and, with --out, written
    after every part."""
    device, started = a["device"], time.time()
    shapes = SUITE_SHAPES[device.type]
    budget = a["budget"] or shapes["budget"]
    parts = a["parts"].split(",") if a["parts"] else list(SUITE_PARTS)
    scale = budget / sum(SUITE_PARTS[p] for p in parts)
    rows, times = [], {}

    def add(row):
        rows.append(row)
        print("| " + " | ".join(map(str, row)) + " |", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        ctx = {"tmp": tmp, "shapes": shapes}
        for part in parts:
            left = started + budget - time.time()
            if left < 10:
                add([part, "", "", "", "", "", f"skipped: the budget of {budget:.0f} s is spent"])
                continue
            t0 = time.time()
            try:
                with time_box(min(left, SUITE_PARTS[part] * scale * 2)):
                    {"checks": suite_checks, "train": suite_train, "generate": suite_generate,
                     "codec": suite_codec, "loader": suite_loader, "memory": suite_memory}[part](a, ctx, add)
            except (Exception, TimeBox) as e:
                add([part, "", "", "", "", "", f"FAILED after {time.time() - t0:.0f} s: {one_line(e)}"])
            finally:
                release(device)
                times[part] = time.time() - t0
            if a["out"]:   # after every part: a run killed later keeps what it measured
                write_table(a["out"], suite_table(rows, a, started, times))
    table = suite_table(rows, a, started, times)
    if a["out"]:
        write_table(a["out"], table)
    print("\n" + table)
    return rows


def write_table(path, table):
    env.write_atomic(path, lambda f: f.write(table.encode()))


def main(argv):
    mode, a = parse(argv)
    a["argv"] = list(argv)
    if a["device"].type == "cpu":
        torch.set_num_threads(a["threads"] or os.cpu_count())
        a["keep_freed"] = a["keep_freed"] and env.keep_freed_memory()
    {"train": bench_train, "generate": bench_generate, "codec": bench_codec, "data": bench_data,
     "quality": bench_quality, "memory": bench_memory, "suite": bench_suite}[mode](a)
    return 0


if __name__ == "__main__":
    cli(main)
