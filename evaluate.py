"""Evaluate a model without training: generate for each reference item's description, score against the reference.

    python evaluate.py --run=SIG --dataset=DIR --metrics=fad,kld,clap --out=eval/my-run
    python evaluate.py --run=//reference/musicgen-small --t5=//reference/t5-base --manifest=my/test.jsonl \
        --metrics=fad,kld,clap --duration=10 --seed=0 --batch_size=16 --device=cuda --out=eval/musicgen-small
    python evaluate.py --run=runs/xps/SIG --dataset=demo --metrics=chroma_cos --duration=1 --out=eval/debug
    torchrun --nproc_per_node=8 -- evaluate.py --run=SIG --dataset=DIR --out=eval/SIG   # items across ranks ("--":
                                                                # else torchrun takes --run for its --run-path)

--run is what generate.py takes: a run signature or directory (its best EMA state), a checkpoint file, an AudioCraft
export directory (e.g. the released musicgen-small under //reference/) or a transformers MusicGen directory (e.g.
facebook/musicgen-small as save_pretrained writes it). The items are the split's manifest
(--dataset=DIR with --split, default evaluate: DIR/<split>/data.jsonl[.gz], AudioCraft's layout; --dataset=demo is
train.py's synthetic set) or one --manifest=FILE, in order, the first --samples of them (0: all). Item i (its line
in the manifest) is generated from its description (the sidecar's, as train.py's evaluate split reads it; none:
unconditional; a melody model, config/melody.py or musicgen-melody, also follows the item's reference audio as
generate.py --melody=FILE does) with row seed --seed + i, for --duration seconds, --batch_size at a time, with
model.sample (the sampler of generate.py and train.py; windows slide past the model's context) and
loudness-normalised as generate.py does (--normalize=none keeps the codec's level, as AudioCraft's metrics see it).
Each becomes OUT/samples/NNN.wav with a .json holding every setting and the generate.py command that remakes it
alone. The metrics then read those files and the references (the first --duration seconds of each, at the codec's
rate and channels): fad, kld, clap and chroma_cos as metrics.py defines them (its --help lists the weights files
and where they go). A reference
shorter than --duration is compared over its own length: its generated clip is cut to match (the report counts
them); an unreadable reference or sidecar skips its item with a warning (the report lists them).

Writes OUT/report.json (metrics, counts, the model, the data, every setting, timing) and, when --run is one of our
runs, appends a `stage: evaluate_only` row to its history.jsonl (--history=False: the report only). A run that a
live process holds (training: its lock file) is refused before any work, naming the holder; the row is appended
under the run's lock, taken for that moment only, so evaluation never blocks a training launch.

Resumable: SIGTERM, SIGUSR1 or Ctrl-C stop between two decode steps (exit 75); the same command reuses every file
whose .json records the same settings (generate.py's check) and makes only the rest. A second run of a finished
command samples nothing and recomputes the metrics.

Options (--key=value): --metrics (fad,kld,clap) --duration (s, 10) --seed (0) --batch_size (8) --samples (0: all)
--cfg_coef --top_k --top_p --temperature (default: the model's) --extend_stride --device --dtype --compile
--normalize --headroom_db --t5 --codec --runs_dir (as generate.py) --vggish --passt --clap (metric weights, as
metrics.py) --history (True) --out (a directory, default evaluation).
"""
import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import data
import demo
import env
import formats
import generate
import melody
import metrics
import model as lm_lib
import train
from env import UserError

REPORT = "report.json"
STAGE = "evaluate_only"
# the sampling and file options are generate.py's (one schema, one set of checks); the rest are evaluate's own
SHARED = ("run", "cfg_coef", "top_k", "top_p", "temperature", "batch_size", "device", "dtype", "compile",
          "t5", "codec", "extend_stride", "normalize", "headroom_db", "runs_dir")
OPTIONS = {**{k: generate.OPTIONS[k] for k in SHARED}, "duration": train.Config.generate_duration, "seed": 0,
           "out": "evaluation", "dataset": (str, None), "manifest": (str, None), "split": "evaluate", "samples": 0,
           "metrics": "fad,kld,clap", "vggish": (str, None), "passt": (str, None), "clap": (str, None),
           "history": True}
USAGE = "python evaluate.py --run=RUN --dataset=DIR|--manifest=FILE [--key=value ...] (python evaluate.py --help)"


@dataclass
class Item:
    index: int                # line of the manifest (0-based): the row seed is seed + index, the file NNN.wav
    path: str                 # the reference audio
    description: str | None   # None: generated unconditionally


# ----------------------------------------------------------------------------------------------------------
# What is evaluated: the items of a manifest

def manifest_of(o):
    """--dataset + --split, or --manifest -> the manifest file."""
    if o["manifest"] is not None:
        return data.manifest_file(o["manifest"])
    if o["dataset"] == "demo":   # train.py's synthetic set, where train.py puts it
        root = Path(demo.dataset_dir("demo", o["runs_dir"]))
    else:
        root = env.resolve_path(env.map_dataset_path(o["dataset"]))
        if not root.is_dir():
            raise UserError(f"--dataset={o['dataset']}: {root} is not a directory (expected {root}/<split>/data.jsonl)")
    if not (root / o["split"]).is_dir():
        raise UserError(f"--dataset={o['dataset']} has no split {o['split']!r}: expected {root / o['split']}/"
                        f"data.jsonl[.gz] (--split names another, e.g. {', '.join(data.SPLITS)})")
    return data.manifest_file(root / o["split"])


def read_items(file, limit, needs_text):
    """The manifest's first `limit` entries (0: all) -> (items, skipped [{index, path, reason}]). An entry whose audio
    or sidecar cannot be read is skipped with a warning; its index stays unused, so the others keep their seeds."""
    metas = data.read_manifest(file)
    if not metas:
        raise UserError(f"{file} lists no files")
    items, skipped = [], []
    for i, meta in enumerate(metas[:limit or None]):
        try:
            data.probe(meta.path)   # the header only: a missing or foreign file is found before anything is made
            items.append(Item(i, meta.path, data.describe(data.read_info(meta.path)) or None))
        except data.BadFile as e:
            print(f"warning: skipping item {i} ({meta.path}): {e}", file=sys.stderr, flush=True)
            skipped.append({"index": i, "path": meta.path, "reason": str(e)})
    if not items:
        raise UserError(f"{file}: none of its {len(metas[:limit or None])} items is readable (see the warnings above)")
    silent = [it for it in items if it.description is None]
    if needs_text and silent:
        raise UserError(f"clap compares each clip with its description, but {len(silent)} of the {len(items)} items of "
                        f"{file} have none (e.g. {silent[0].path}): add a description to their sidecar .json, or "
                        f"leave clap out")
    return items, skipped


# ----------------------------------------------------------------------------------------------------------
# Processes: one, or torchrun's (items strided across ranks, one collective per batch)

def setup(o):
    """train.py's process setup (torchrun or srun variables, the device) with this command's device and dtype."""
    return train.setup_distributed(train.Config(device=o["device"] or "", dtype=o["dtype"] or "float32"))


def stop_point(d):
    """Between two batches: a stop signal on any rank stops every rank (collective: all ranks call it together)."""
    if d.world_size > 1:
        train.check_stop_everywhere(d)
    else:
        env.check_stop()


def say(d, *args, **kw):
    if d.main:
        print(*args, **kw, flush=True)


def eta_line(label, done, total, t0):
    """`label done/total items | s/item | elapsed | eta`: the progress of a whole phase, after each batch."""
    dt = time.time() - t0
    per = dt / max(done, 1)
    return f"{label} {done}/{total} items | {per:.2f} s/item | {dt:.0f} s | eta {per * (total - done):.0f} s"


# ----------------------------------------------------------------------------------------------------------
# The run's history

def live_holder(folder):
    """(pid, host, since) of a live process holding the run's lock (training), or None. Read only: taking the lock
    to look would refuse a training launch at that instant."""
    holder = env.RunLock(folder).live_holder()   # the lock's own staleness rule (a dead PID, a silent other host)
    if holder is None:
        return None
    pid, host, started = holder
    return pid, host, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"


def in_use(folder, holder, then):
    pid, host, since = holder
    return (f"{folder} is in use by process {pid} on {host} (since {since}; lock {folder / env.LOCK_FILE}): its "
            f"history cannot take an {STAGE} row while it runs; {then}")


def append_row(folder, row):
    """The row at the end of <run>/history.jsonl, under the run's lock (held for this write only). The same row
    (timing aside) already there is not added twice."""
    same = lambda r: {k: v for k, v in r.items() if k != "seconds"} == {k: v for k, v in row.items() if k != "seconds"}  # noqa: E731
    history = folder / "history.jsonl"
    with env.RunLock(folder):
        if any(same(r) for r in env.read_history(history)):
            return False
        text = history.read_bytes() if history.is_file() else b""
        if text and not text.endswith(b"\n"):
            text += b"\n"   # a line cut by a crash stays a line of its own (read_history skips it)
        env.write_atomic(history, lambda f: f.write(text + (json.dumps(row) + "\n").encode()))
    return True


# ----------------------------------------------------------------------------------------------------------
# The two phases: generate what is missing, then score every item from the files

def item_melody(mg, item):
    """The melody values an item's .json records (generate.py's --melody and its file identity): its reference audio
    for a melody model, none otherwise."""
    if mg.lm.melody is None:
        return {"melody": None, "melody_file": None}
    return {"melody": item.path, "melody_file": generate.stat_identity(item.path)}


def generate_missing(d, o, mg, items, paths, todo, settings, resolved, common, n_frames, stride, device, dtype):
    """model.sample for the items at positions `todo` (this rank's share), batch by batch; each wav + .json written
    whole (generate.write_output). -> (files written, seconds, this process's CPU seconds)."""
    rate, sr = mg.codec.frame_rate, mg.codec.sample_rate
    B = o["batch_size"]
    mine = todo[d.rank::d.world_size]
    turns = math.ceil(math.ceil(len(todo) / d.world_size) / B)   # the same on every rank: collective stop checks
    advice = "; free some space and run the same command again: finished files are kept"
    t0, cpu0, written = time.time(), time.process_time(), 0
    for turn in range(turns):
        stop_point(d)
        chunk = mine[turn * B:(turn + 1) * B]
        if not chunk:
            continue
        batch = [items[j] for j in chunk]
        # steps/s and stop checks between decode steps; with several ranks only the collective check between batches
        meter = generate.Progress(f"batch {turn + 1}/{turns}", len(chunk) * n_frames / rate) \
            if d.world_size == 1 else None
        melodies = None if mg.lm.melody is None else [   # a melody model: each reference's, as generate.py --melody
            mg.lm.melody.melody_classes(melody.read_melody(it.path, f"item {it.index}: melody"), melody.CHROMA_RATE)
            for it in batch]
        with torch.autocast(device.type, dtype=generate.DTYPES[dtype], enabled=dtype != "float32"):
            codes = lm_lib.sample(mg.lm, [it.description for it in batch], n_frames, window=mg.window, stride=stride,
                                  seeds=[o["seed"] + it.index for it in batch], melodies=melodies,
                                  frame_rate=rate, on_step=meter, **settings)   # [b, K, n_frames]
        for j, it, row in zip(chunk, batch, codes):
            # decoded one at a time: a file is then the same whatever batch made it (a resumed run's, another
            # rank's, generate.py's remake from the .json's command); batched decoding rounds differently
            audio = mg.codec.decode(row[None]).float().cpu()[0]                               # [C, S]
            audio, gain_db = data.normalize(audio, sr, o["normalize"], o["headroom_db"])
            row_seed = o["seed"] + it.index
            command = shlex.join(["python", "generate.py", f"--run={o['run']}"]
                                 + ([f"--prompt={it.description}"] if it.description else [])
                                 + [f"--seed={row_seed}", f"--out={paths[j].name}"]
                                 + ([f"--melody={it.path}"] if mg.lm.melody is not None else [])
                                 + [f"--{k}={resolved[k]}" for k in ("duration", *formats.SAMPLING_DEFAULTS,
                                                                     "extend_stride", "normalize", "headroom_db",
                                                                     "device", "dtype", "t5", "codec")
                                    if resolved[k] is not None])
            meta = {**resolved, **common, **item_melody(mg, it), "prompt": it.description, "index": it.index,
                    "row_seed": row_seed, "reference": it.path, "file": paths[j].name, "signature": mg.signature,
                    "sample_rate": sr, "gain_db": round(gain_db, 2), "command": command}
            generate.write_output(paths[j], audio, sr, meta, advice)
            written += 1
        if meter is not None:
            print(meter.line().rstrip(), flush=True)
        say(d, eta_line("generated", min(written * d.world_size, len(todo)), len(todo), t0))
    return written, time.time() - t0, time.process_time() - cpu0


def read_pair(gen_path, ref_path, seconds, codec):
    """-> (generated [C, S], reference [C, S'] float32 at the codec's rate: its first `seconds`)."""
    try:
        gen = data.read_audio(gen_path, sample_rate=codec.sample_rate, channels=codec.channels)
    except data.BadFile as e:
        raise UserError(f"{gen_path}: {e}: delete it and run the same command again (it is made anew)") from None
    ref = data.read_audio(ref_path, 0.0, seconds, sample_rate=codec.sample_rate, channels=codec.channels)
    return torch.from_numpy(gen), torch.from_numpy(ref)


def score(d, o, ev, mg, items, paths):
    """Every item's generated file against its reference, a batch at a time, this rank's share; the totals summed
    over ranks. -> (metrics, counts)."""
    B = o["batch_size"]
    mine = list(range(d.rank, len(items), d.world_size))
    turns = math.ceil(math.ceil(len(items) / d.world_size) / B)
    counts = {"scored": 0, "short_references": 0, "unreadable_references": []}
    t0 = time.time()
    ev.reset()
    for turn in range(turns):
        stop_point(d)
        gens, refs, lengths, texts = [], [], [], []
        for j in mine[turn * B:(turn + 1) * B]:
            try:
                gen, ref = read_pair(paths[j], items[j].path, o["duration"], mg.codec)
            except data.BadFile as e:
                print(f"warning: skipping item {items[j].index} ({items[j].path}): {e}", file=sys.stderr, flush=True)
                counts["unreadable_references"].append({"index": items[j].index, "path": items[j].path,
                                                        "reason": str(e)})
                continue
            S = gen.shape[-1]
            counts["short_references"] += ref.shape[-1] < S - mg.codec.hop   # shorter than the clip by a frame
            gens.append(gen)
            refs.append(torch.nn.functional.pad(ref[:, :S], (0, max(0, S - ref.shape[-1]))))
            lengths.append(min(S, ref.shape[-1]))
            texts.append(items[j].description)
        if gens:
            reference = torch.stack(refs)                                                  # [b, C, S]
            ev.add(generated=torch.stack(gens), reference=reference, descriptions=texts, lengths=lengths,
                   melodies=reference if "chroma_cos" in ev.names else None, sample_rate=mg.codec.sample_rate)
            counts["scored"] += len(gens)
        say(d, eta_line("scored", min((turn + 1) * B * d.world_size, len(items)), len(items), t0))
    if d.world_size > 1:
        ev.reduce(lambda x: train.all_sum(d, list(x)))
        gathered = [None] * d.world_size
        dist.all_gather_object(gathered, counts)
        counts = {"scored": sum(c["scored"] for c in gathered),
                  "short_references": sum(c["short_references"] for c in gathered),
                  "unreadable_references": sorted((r for c in gathered for r in c["unreadable_references"]),
                                                  key=lambda r: r["index"])}
    if not counts["scored"]:
        raise UserError("no item could be scored: every reference was unreadable (see the warnings above)")
    return ev.result(), counts


# ----------------------------------------------------------------------------------------------------------
# The command

def evaluate(d, o):
    t_start = time.time()
    generate.check_options({**o, "prompt": None, "prompts": None, "audio_prompt": None, "quantize": "",
                            "prompt_duration": generate.OPTIONS["prompt_duration"]})
    if o["samples"] < 0:
        raise UserError(f"--samples={o['samples']}: must be >= 0 (0: every item of the split)")
    if (o["dataset"] is None) == (o["manifest"] is None):
        raise UserError("give --dataset=DIR (with --split, default evaluate) or --manifest=FILE, one of them")
    names = metrics.parse_names(o["metrics"])
    run_path = formats.find_run(o["run"], o["runs_dir"])                  # a missing run: before any other work
    file = manifest_of(o)
    items, skipped = read_items(file, o["samples"], "clap" in names)
    last = items[-1].index
    if o["seed"] + last > lm_lib.MAX_SEED:
        raise UserError(f"--seed={o['seed']}: item i draws from seed + i, so with {last + 1} items the seed must be at "
                        f"most {lm_lib.MAX_SEED - last}")
    out = Path(os.path.expanduser(o["out"]))
    all_paths = generate.output_paths(out / "samples", last + 1)
    paths = [all_paths[it.index] for it in items]
    generate.check_outputs(o["out"], paths + [out / REPORT])
    # one of our runs: a checkpoint beside its config.json (not an export's state_dict.bin, not a transformers
    # directory's config.json), whose history takes the row
    ours = run_path.name not in (formats.LM_FILE, formats.HF_CONFIG) and (run_path.parent / "config.json").is_file()
    folder = run_path.parent if ours else None
    holder = live_holder(folder) if folder and o["history"] else None
    if holder:
        raise UserError(in_use(folder, holder, "evaluate it when that run ends, or now with --history=False "
                                               "(the report only)"))
    device = d.device
    dtype = o["dtype"] or ("bfloat16" if device.type == "cuda" else "float32")
    compiled = o["compile"] if o["compile"] is not None else device.type == "cuda"
    # the metrics' models first: a missing weights file or package is one line before the model loads
    ev = metrics.Evaluator(names, 32000, vggish=o["vggish"], passt=o["passt"], clap=o["clap"], device=device,
                           seed=o["seed"])
    t_load = time.time()
    mg = formats.load(o["run"], o["runs_dir"], o["t5"], o["codec"], device)
    settings = {k: (o[k] if o[k] is not None else mg.defaults[k]) for k in formats.SAMPLING_DEFAULTS}
    generate.check_sampling(settings, f"{mg.source}: ")
    rate = mg.codec.frame_rate
    n_frames = max(1, int(round(o["duration"] * rate)))
    stride = None if o["extend_stride"] is None else int(round(o["extend_stride"] * rate))
    if n_frames > mg.window and stride is not None and not 0 < stride < mg.window:
        raise UserError(f"--extend_stride={o['extend_stride']:g} s: must be at least one frame ({1 / rate:g} s) and "
                        f"shorter than the model's context ({mg.max_duration:g} s)")
    stride = lm_lib.window_plan(n_frames, mg.window, stride)[1]
    text_len = max(len((it.description or "").encode()) for it in items) + 2
    generate.check_memory(o, mg, min(o["batch_size"], len(items)), n_frames, text_len, dtype, device)
    load_seconds = time.time() - t_load
    say(d, f"loaded {mg.source} ({mg.weights} weights, {lm_lib.num_params(mg.lm) / 1e6:.2f}M parameters, context "
           f"{mg.max_duration:g} s) in {load_seconds:.1f} s | {device} {dtype} | {len(items)} items of {file}"
           f"{f' ({len(skipped)} skipped)' if skipped else ''} | {o['duration']:g} s each | {', '.join(names)}")

    resolved = {**o, **settings, "device": str(device), "dtype": dtype, "compile": compiled,
                "extend_stride": round(stride / rate, 6), "audio_prompt": None, "prompt_duration": None, "quantize": "",
                "melody": None, "chroma_stems": None if mg.lm.melody is None else mg.lm.melody.stems}
    common = {"frames": n_frames, "audio_prompt_file": None, "melody_file": None, "source": str(mg.source),
              "source_file": generate.stat_identity(mg.source), "weights": mg.weights, "codec_source": mg.codec_source,
              "torch": torch.__version__}

    def wanted(j, seed):   # generate.py's resume check: the OUTPUT_KEYS values file j must record
        values = {**resolved, **common, "prompt": items[j].description, "row_seed": seed + items[j].index,
                  **item_melody(mg, items[j])}
        return {k: values[k] for k in generate.OUTPUT_KEYS}
    _, done = generate.resume(generate.read_previous(paths), wanted, o["seed"], len(items))
    todo = [j for j in range(len(items)) if j not in done]
    say(d, f"{len(done)} of {len(items)} files already made with these settings; making {len(todo)}" if done else
        f"making {len(todo)} files in {out / 'samples'}")
    if compiled and todo:
        lm_lib.compile_decode(mg.lm)
    written, gen_seconds, gen_cpu = generate_missing(d, o, mg, items, paths, todo, settings, resolved, common,
                                                     n_frames, stride, device, dtype) if todo else (0, 0.0, 0.0)
    written = int(train.all_sum(d, [written])[0]) if d.world_size > 1 else written   # also: every rank's files exist
    t_metrics = time.time()
    result, counts = score(d, o, ev, mg, items, paths)
    metric_seconds = time.time() - t_metrics

    report = {
        "metrics": result,
        "counts": {"items": len(items), "generated": written, "reused": len(done), **counts, "skipped": skipped},
        "model": {"run": o["run"], "source": str(mg.source), "weights": mg.weights, "signature": mg.signature,
                  "codec": mg.codec_source, "parameters": lm_lib.num_params(mg.lm), "context": mg.max_duration,
                  "conditioner": mg.conditioner.get("conditioner")},
        "data": {"manifest": str(file), "split": o["split"] if o["dataset"] else None, "samples": o["samples"]},
        "settings": {**{k: resolved[k] for k in ("duration", "seed", "batch_size", *formats.SAMPLING_DEFAULTS,
                                                 "extend_stride", "normalize", "headroom_db", "device", "dtype",
                                                 "compile")},
                     "frames": n_frames, "metrics": list(names), "metric_weights": ev.weights,
                     "processes": d.world_size},
        "timing": {"load_s": round(load_seconds, 2), "generate_s": round(gen_seconds, 2),
                   "seconds_per_item": round(gen_seconds / written, 3) if written else None,
                   # this process's CPU time (all its threads): on a shared machine, what the work itself took
                   "cpu_seconds_per_item": round(gen_cpu / written * d.world_size, 3) if written else None,
                   "metrics_s": round(metric_seconds, 2), "total_s": round(time.time() - t_start, 2)},
        "torch": torch.__version__, "git_commit": env.git_commit()[0],
        "command": o["command"],
    }
    failed = None
    if d.main:
        try:
            finish(o, report, out, folder, run_path, mg)
        except UserError as e:
            failed = e
    if d.world_size > 1 and train.all_sum(d, [failed is not None])[0]:   # every rank leaves the same way
        raise failed or UserError("rank 0 could not finish the report or the history row (its error says why)")
    if failed:
        raise failed
    return 0


def finish(o, report, out, folder, run_path, mg):
    """Rank 0: the report, the result line, and for one of our runs the history row."""
    text = json.dumps(report, indent=1, allow_nan=False) + "\n"
    env.write_atomic(out / REPORT, lambda f: f.write(text.encode()))
    result, counts = report["metrics"], report["counts"]
    print(f"{STAGE} | " + " | ".join(f"{k} {v:.4g}" for k, v in result.items()) + f" | {counts['scored']} items "
          f"({counts['generated']} generated, {counts['reused']} reused) | report {out / REPORT}", flush=True)
    if not (folder and o["history"]):
        return
    ckpt = env.load_tensors(run_path, mmap=True)
    epoch = ckpt.get("epoch") if isinstance(ckpt, dict) else None
    row = {"stage": STAGE, "epoch": epoch - 1 if isinstance(epoch, int) else None,
           "step": ckpt.get("step") if isinstance(ckpt, dict) else None, **result, "items": counts["scored"],
           "weights": mg.weights, "checkpoint": run_path.name, "manifest": report["data"]["manifest"],
           **{k: report["settings"][k] for k in ("duration", "seed", *formats.SAMPLING_DEFAULTS)},
           "report": str(out.resolve() / REPORT), "seconds": report["timing"]["total_s"]}
    holder = live_holder(folder)
    if holder:   # a training process started meanwhile: the report stands, the row waits for a rerun
        raise UserError(in_use(folder, holder, f"the report is at {out / REPORT}; run the same command when that run "
                                               f"ends to append the row (every file is reused)"))
    try:
        added = append_row(folder, row)
    except UserError as e:
        raise UserError(f"{e}; the report is at {out / REPORT}") from None
    print(f"history: {'appended' if added else 'already holds'} the {STAGE} row in {folder / 'history.jsonl'}")


def main(argv):
    o = env.parse_options(argv, OPTIONS, usage=USAGE)[1]
    if not o["run"]:   # before any process setup
        raise UserError("--run is required: a run signature, a run directory or an AudioCraft export directory")
    d = setup(o)
    code = 1
    try:
        code = evaluate(d, {**o, "command": shlex.join(["python", "evaluate.py", *argv])})
    except UserError as e:
        if d.world_size == 1:
            raise
        print(f"error: {e}", file=sys.stderr)   # os._exit below leaves before env.cli would print it
        code = 2
    except env.Stopped as e:
        say(d, f"\nstopped by {e}; the same command goes on from the files already made; exit {env.EXIT_REQUEUE} "
               f"asks for a requeue")
        code = env.EXIT_REQUEUE
    finally:
        train.leave_distributed(d, code)
    return code


if __name__ == "__main__":
    env.install_stop_handlers()   # SIGTERM, SIGUSR1, Ctrl-C: stop between two steps, keep the finished files
    env.cli(main)
