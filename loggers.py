"""Experiment trackers (TensorBoard, Weights & Biases) and training curves as pictures.

    python env.py plot SIG [SIG ...] --out=curves.png   # ce, ce_uncond, lr and throughput of runs, from history.jsonl
    python -m grids NAME --plot[=FILE]                  # the same for every run of a grid that has a history
    tensorboard --logdir <runs_dir>/xps                 # every run with tensorboard=True, named <signature>/tensorboard

Both trackers are optional packages, imported only when their key is on (tensorboard: `pip install tensorboard`,
wandb: `pip install wandb`; plots: `pip install matplotlib`). Only the main process logs, and a logging failure (no
network, a full disk, a broken package) is one warning line, after which that tracker is off: training goes on.

What is logged, and at which step (the global update count):
    train/<key>          every log line's scalars (ce, ppl, lr, grad, frames_per_s, mfu, mem_gib, data_wait)
    <stage>/<key>        every history row's numbers (valid/ce, valid/ce_uncond, valid/ce_q1.., evaluate/fd, ...);
                         the train row's epoch averages under train_epoch/ so they never share a tag with log lines
    samples/...          generate-stage audio, with its prompt (TensorBoard: the tag's description and a text
                         summary <tag>/prompt; W&B: the caption)
    config               the resolved config, signature, commit, world size (TensorBoard text + hparams; W&B config)

Resume: TensorBoard writes into the same directory (<run dir>/tensorboard) and marks a restart at the checkpoint's
step + 1, so what the killed process logged past its checkpoint is discarded by TensorBoard's readers, and what it
logged at the checkpoint's step itself (a stage run after the checkpoint, run again) is not written twice; W&B
resumes the run whose id is the signature and never takes a step twice. History rows the tracker lacks (its
directory was deleted, it was turned on late) are replayed from the checkpoint's history, each (tag, step) once.
"""
import contextlib
import importlib.util
import io
import json
import math
import mmap
import os
import struct
import textwrap
import time
import wave
from pathlib import Path

import env
from env import UserError

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}   # config key -> the package it needs
WANDB_MODES = ("online", "offline")
ROW_SECTION = {"train": "train_epoch"}   # the train row's epoch averages: apart from the log lines' train/<key>
NOT_LOGGED = {"epoch", "step", "stage"}  # row fields that say where a row is, not what it measured


def check(settings):
    """One UserError line for a tracker turned on without its package, or a wandb_mode W&B does not have. Cheap
    (nothing is imported): call it on every process while validating the config, before anything is written."""
    for key, package in PACKAGES.items():
        if settings.get(key) and importlib.util.find_spec(package) is None:
            raise UserError(f"{key}=True needs the {package} package: pip install {package} (or set {key}=False)")
    if settings.get("wandb") and settings.get("wandb_mode", "online") not in WANDB_MODES:
        raise UserError(f"wandb_mode={settings.get('wandb_mode')!r} must be one of {', '.join(WANDB_MODES)}")


def row_step(row, updates_per_epoch):
    """The global update at which a history row was made: its `step`, else (rows written before rows had one) the
    end of its epoch, which is where every stage row of an epoch is made."""
    step = row.get("step")
    return step if isinstance(step, int) else int(row.get("epoch", 0)) * int(updates_per_epoch)


def row_values(row):
    """{tag: number} of a history row: <stage>/<key> for each numeric field."""
    section = ROW_SECTION.get(row.get("stage"), row.get("stage") or "history")
    return {f"{section}/{key}": float(value) for key, value in row.items()
            if key not in NOT_LOGGED and isinstance(value, (int, float)) and not isinstance(value, bool)}


def one_line(e):
    """An exception as `Type: first line of its message`, for a warning that must stay one line."""
    reason = (str(e).strip().splitlines() or [""])[0][:200]
    return f"{type(e).__name__}{': ' + reason if reason else ''}"


class Loggers:
    """The trackers a run writes to. With none on (or on a process other than the main one), every method returns
    at once: the training loop calls them unconditionally."""

    def __init__(self, backends=(), updates_per_epoch=1, warn=print):
        self.backends, self.updates_per_epoch, self.warn = list(backends), updates_per_epoch, warn

    def scalars(self, step, values, prefix="train"):
        """One log line's numbers at global update `step`: {name: number}; None values (no MFU on a CPU) are left
        out."""
        if not self.backends:
            return
        tagged = {f"{prefix}/{k}": float(v) for k, v in values.items() if v is not None}
        self._each(lambda b: b.scalars(step, tagged))

    def row(self, row):
        """A history row, as train.py appends it (at its `step`). Flushed (handed to the OS, which a kill -9 does not
        undo), so that whatever a checkpoint's history holds was written before the checkpoint was."""
        if not self.backends:
            return
        step, values = row_step(row, self.updates_per_epoch), row_values(row)
        self._each(lambda b: (b.scalars(step, values), b.flush()))

    def audio(self, tag, wav, sample_rate, step, caption=""):
        """A sample wav [C, S] (tensor or array, floats in [-1, 1]) with its prompt."""
        if not self.backends:
            return
        import numpy as np
        samples = np.clip(np.asarray(wav.detach().float().cpu() if hasattr(wav, "detach") else wav,
                                     dtype=np.float32), -1, 1)
        samples = samples[None] if samples.ndim == 1 else samples   # [C, S]
        self._each(lambda b: b.audio(tag, samples, int(sample_rate), step, caption))

    def samples(self, folder, step):
        """A generate stage's samples as train.py leaves them, every rank's (<run>/samples/<epoch>/NNN.wav and
        NNN_uncond.wav, each with a .json holding its description): audio tagged samples/NNN[_uncond], captioned."""
        if not self.backends:
            return
        import soundfile as sf
        try:
            for path in sorted(Path(folder).glob("*.wav")):
                about = path.with_suffix(".json")
                meta = json.loads(about.read_text()) if about.is_file() else {}
                text = meta.get("prompt", meta.get("description"))
                wav, sample_rate = sf.read(path, dtype="float32", always_2d=True)   # [S, C]
                twin = path.stem.removesuffix("_uncond")
                self.audio(f"samples/{path.stem}", wav.T, sample_rate, step,
                           text or (f"no text: the unconditional twin of {twin}" if twin != path.stem else ""))
        except (OSError, ValueError, RuntimeError) as e:   # a sample unreadable: the rest of the run does not care
            self.warn(f"warning: samples in {folder} not logged ({one_line(e)})")

    def replay(self, history, resume_step):
        """Write the rows of `history` (a checkpoint's, all made at or before resume_step) that a tracker lacks: per
        tag, those after the last step it holds. Never a step twice: rows it has stay as they are."""
        for backend in list(self.backends):
            ok = True
            for row in history:
                step = row_step(row, self.updates_per_epoch)
                if step > resume_step:
                    continue  # not in the checkpoint's timeline: logged again when training gets there
                values = {t: v for t, v in row_values(row).items() if step > backend.last_step(t)}
                if values and not (ok := self._call(backend, lambda b: b.scalars(step, values))):
                    break
            if ok:
                self._call(backend, lambda b: b.flush())

    def flush(self):
        """Everything logged so far to disk: call before writing a checkpoint that no row precedes (a stop signal
        mid-epoch)."""
        self._each(lambda b: b.flush())

    def close(self):
        self._each(lambda b: b.close())
        self.backends = []

    def _each(self, fn):
        for backend in list(self.backends):
            self._call(backend, fn)

    def _call(self, backend, fn):
        """fn(backend); a failure turns that tracker off with one warning line: logging never stops training."""
        try:
            fn(backend)
            return True
        except Exception as e:
            self.backends.remove(backend)
            self.warn(f"warning: {backend.name} logging failed ({one_line(e)}); {backend.name} is off for the rest "
                      f"of this run, training goes on")
            with contextlib.suppress(Exception):
                backend.close()
            return False


def open_loggers(settings, run_dir, signature, meta, resume_step=0, history=(), main=True, warn=print):
    """The trackers `settings` (the resolved config as a dict) turns on, attached to the run in `run_dir`.

    meta: facts about this process to record with the config ({"git_commit", "world_size", "device", ...}).
    resume_step: the global update the run resumes from (0: a fresh start); what a killed process logged after it
    is discarded. history: the checkpoint's history rows, replayed where a tracker lacks them. main=False (any
    process but the main one) gives loggers that do nothing. A missing package is a UserError (see check); any other
    failure to start a tracker is one warning line and the run goes on without it."""
    updates_per_epoch = settings.get("updates_per_epoch", 1)
    if not main or not any(settings.get(key) for key in PACKAGES):
        return Loggers(updates_per_epoch=updates_per_epoch, warn=warn)
    check(settings)
    run_dir = Path(run_dir)
    tags = {tag for row in history for tag in row_values(row)}   # what a replay may need to know about
    start = {"tensorboard": lambda: TensorBoard(run_dir / "tensorboard", resume_step, tags, settings, signature, meta),
             "wandb": lambda: WandB(settings, run_dir, signature, meta, resume_step, warn)}
    backends = []
    for key in PACKAGES:
        if settings.get(key):
            try:
                backends.append(start[key]())
            except Exception as e:
                warn(f"warning: {key} could not start ({one_line(e)}); training goes on without it")
    loggers = Loggers(backends, updates_per_epoch, warn)
    loggers.replay(history, resume_step)
    return loggers


# ----------------------------------------------------------------------------------------------------------
# TensorBoard: event files in <run dir>/tensorboard, written with tensorboard's own writer

class TensorBoard:
    name = "tensorboard"

    def __init__(self, log_dir, resume_step, tags, settings, signature, meta):
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
        self.pb, self.summary_pb = event_pb2, summary_pb2
        self.resume_step = resume_step
        self.last, self.at_resume = held_steps(log_dir, resume_step, set(tags) | {"config"})
        _after_newest_event_file(log_dir)
        # flush_secs: a live TensorBoard sees a log line within half a minute; rows flush at once (Loggers.row)
        self.writer = EventFileWriter(str(log_dir), max_queue_size=100, flush_secs=30)
        # A restart at resume_step + 1: TensorBoard's Python readers drop what earlier files hold from that step on
        # (its Rust data server does so per tag when the steps go back, which they do at the next log line).
        self.writer.add_event(event_pb2.Event(wall_time=time.time(), step=resume_step + 1,
                                              session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
        if "config" not in self.last:
            self._write_config(settings, signature, meta)

    def last_step(self, tag):
        return self.last.get(tag, -1)

    def _event(self, step, values):
        self.writer.add_event(self.pb.Event(wall_time=time.time(), step=step, summary=self.summary_pb.Summary(value=values)))

    def held(self, tag, step):
        """Whether the directory already shows `tag` at `step`: a stage that a killed process had finished after its
        checkpoint, run again at the checkpoint's step after the resume (the restart mark does not hide that step)."""
        return step == self.resume_step and tag in self.at_resume

    def scalars(self, step, values):
        Value = self.summary_pb.Summary.Value
        values = [Value(tag=tag, simple_value=v) for tag, v in values.items() if not self.held(tag, step)]
        if values:
            self._event(step, values)

    def _text(self, tag, text):
        from tensorboard.compat.proto import tensor_pb2, tensor_shape_pb2, types_pb2
        from tensorboard.plugins.text import metadata
        tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=[text.encode()],
                                        tensor_shape=tensor_shape_pb2.TensorShapeProto())
        return self.summary_pb.Summary.Value(tag=tag, tensor=tensor,
                                             metadata=metadata.create_summary_metadata(display_name=tag, description=""))

    def _write_config(self, settings, signature, meta):
        from tensorboard.plugins.hparams import summary_v2 as hparams
        facts = {"signature": signature, **meta}
        rows = [f"| {k} | `{v}` |" for k, v in list(facts.items()) + sorted(settings.items())]
        self._event(0, [self._text("config", "| key | value |\n| --- | --- |\n" + "\n".join(rows))])
        plain = {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v) for k, v in {**settings, **facts}.items()}
        self.writer.add_event(self.pb.Event(wall_time=time.time(), step=0,
                                            summary=hparams.hparams_pb(plain, trial_id=signature)))

    def audio(self, tag, samples, sample_rate, step, caption):
        if self.held(tag, step):
            return
        Summary = self.summary_pb.Summary
        channels, frames = samples.shape
        clip = Summary.Audio(sample_rate=sample_rate, num_channels=channels, length_frames=frames,
                             encoded_audio_string=wav_bytes(samples, sample_rate), content_type="audio/wav")
        from tensorboard.plugins.audio import metadata
        about = metadata.create_summary_metadata(display_name=tag, description=caption,   # the card shows it
                                                 encoding=metadata.Encoding.Value("WAV"))
        values = [Summary.Value(tag=tag, audio=clip, metadata=about)]
        self._event(step, values + ([self._text(f"{tag}/prompt", caption)] if caption else []))

    def flush(self):
        self.writer.flush()

    def close(self):
        self.writer.close()


def wav_bytes(samples, sample_rate):
    """16-bit PCM WAV of samples [C, S] in [-1, 1], interleaved as WAV wants ([S, C])."""
    import numpy as np
    pcm = np.round(samples.T * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(samples.shape[0])
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def event_files(log_dir):
    """A TensorBoard directory's event files in the order its readers take them: by name, which starts with the
    time the file was opened."""
    return sorted(Path(log_dir).glob("events.out.tfevents.*")) if Path(log_dir).is_dir() else []


def read_events(path):
    """The Event protos of one event file (TFRecord: u64 length, u32 crc, data, u32 crc), up to the first record cut
    short by a killed writer or otherwise unreadable. The checksums are not checked: this finds what a directory
    holds, quickly (about a second for 100k log lines), and a reader that checks them sees no more than that."""
    from google.protobuf.message import DecodeError
    from tensorboard.compat.proto.event_pb2 import Event
    with open(path, "rb") as f:
        if not os.fstat(f.fileno()).st_size:
            return
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)   # a long run's file stays on disk
    with data:
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack_from("<Q", data, pos)
            end = pos + 12 + length + 4
            if end > len(data):
                return
            try:
                yield Event.FromString(data[pos + 12:pos + 12 + length])
            except DecodeError:
                return
            pos = end


def held_steps(log_dir, resume_step, tags):
    """What the event files in log_dir show, as TensorBoard reads them: ({tag: its last step at or before
    resume_step}, for the given tags; {every tag shown at resume_step itself}). A SessionLog.START at step s (each
    resume writes one) drops every earlier-read value at s or later, as TensorBoard's readers do; past resume_step
    nothing counts, since this resume's START drops it."""
    from tensorboard.compat.proto.event_pb2 import SessionLog
    steps, at_resume = {}, set()   # steps: tag -> steps in the order read
    for path in event_files(log_dir):
        for event in read_events(path):
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                steps = {tag: [s for s in seen if s < event.step] for tag, seen in steps.items()}
                if event.step <= resume_step:
                    at_resume.clear()
            for value in event.summary.value:
                if value.tag in tags:
                    steps.setdefault(value.tag, []).append(event.step)
                if event.step == resume_step:
                    at_resume.add(value.tag)
    last = {tag: max((s for s in seen if s <= resume_step), default=None) for tag, seen in steps.items()}
    return {tag: s for tag, s in last.items() if s is not None}, at_resume


def _after_newest_event_file(log_dir):
    """Readers order event files by name, whose first field is the second the file was opened: a writer opened in
    the same second as the newest file could sort before it (pid and counter follow). Wait for the next second
    (at most one; only a restart within a second of the last one ever waits)."""
    newest = max((int(p.name.split(".")[3]) for p in event_files(log_dir) if p.name.split(".")[3].isdigit()),
                 default=0)
    while int(time.time()) <= newest:
        time.sleep(0.02)


# ----------------------------------------------------------------------------------------------------------
# Weights & Biases: the run whose id is the signature, its files in <run dir>/wandb

class WandB:
    name = "wandb"

    def __init__(self, settings, run_dir, signature, meta, resume_step, warn):
        import wandb
        self.wandb = wandb
        self.run = wandb.init(
            project=settings.get("wandb_project") or None, entity=settings.get("wandb_entity") or None,
            group=settings.get("wandb_group") or None, name=settings.get("wandb_name") or signature,
            id=signature, resume="allow", dir=str(run_dir), mode=settings.get("wandb_mode") or "online",
            settings=wandb.Settings(console="off"))   # log.txt holds the console already
        # a resumed run's config may differ in infrastructure keys (workers, device): not an error
        self.run.config.update({**settings, "signature": signature, **meta}, allow_val_change=True)
        self.start = self.run.step   # W&B drops any step below the one it expects next
        if self.start > resume_step + 1:
            warn(f"warning: W&B run {signature} already holds updates up to {self.start - 1}, past the checkpoint's "
                 f"{resume_step}: it keeps those as they were and takes this run's from update {self.start} on "
                 f"(W&B never rewrites a step)")

    def last_step(self, tag):
        return self.start - 1

    def scalars(self, step, values):
        if step >= self.start:
            self.run.log(values, step=step)

    def audio(self, tag, samples, sample_rate, step, caption):
        if step >= self.start:
            self.run.log({tag: self.wandb.Audio(samples.T, sample_rate=sample_rate, caption=caption or None)}, step=step)

    def flush(self):
        pass  # W&B's service process writes and uploads on its own

    def close(self):
        self.run.finish()


# ----------------------------------------------------------------------------------------------------------
# Curves as pictures, from history.jsonl and config.json alone

LABEL_IGNORES = {"signature", "git_commit", "git_dirty", "overrides"}


def load_run(path):
    """(config.json as a dict, history rows) of a run directory; a missing file is a UserError naming it."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: not a run directory (no config.json); give a run's signature or directory")
    if not (path / "history.jsonl").is_file():
        raise UserError(f"{path / 'history.jsonl'} not found: the run has not finished an epoch yet; plot it later")
    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path / 'config.json'}: not JSON ({e})") from None
    return config, env.read_history(path / "history.jsonl")


def run_labels(configs):
    """A legend label per run: its signature and the settings it does not share with the others (one run: its
    overrides, when its config.json lists them)."""
    def show(items):
        return ", ".join(f"{k}={v}" for k, v in items)
    if len(configs) == 1:
        overrides = configs[0].get("overrides") or {}
        return [f"{configs[0].get('signature', '?')}" + (f": {show(sorted(overrides.items()))}" if overrides else "")]
    keys = sorted({k for c in configs for k in c} - LABEL_IGNORES)
    varying = [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1]
    return [f"{c.get('signature', '?')}" + (f": {show((k, c.get(k)) for k in varying)}" if varying else "")
            for c in configs]


def _pyplot():
    if importlib.util.find_spec("matplotlib") is None:
        raise UserError("plotting needs the matplotlib package: pip install matplotlib")
    import matplotlib
    matplotlib.use("Agg")   # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt
    return plt


def plot_runs(run_dirs, out_png, title=""):
    """Train and valid ce, valid ce_uncond, lr and throughput against updates, one colour per run, to a PNG.
    -> the runs drawn."""
    plt = _pyplot()
    from matplotlib.lines import Line2D
    runs = [load_run(d) for d in run_dirs]
    labels = [textwrap.shorten(label, 110, placeholder=" ...") for label in run_labels([c for c, _ in runs])]
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5), sharex=True, layout="constrained")
    ce_ax, uncond_ax, lr_ax, speed_ax = axes.flat
    panels = [  # axes, stage, field, line style, y label
        (ce_ax, "train", "ce", "-", "cross-entropy (nats)"), (ce_ax, "valid", "ce", "--", None),
        (uncond_ax, "valid", "ce_uncond", "--", "valid cross-entropy without text (nats)"),
        (lr_ax, "train", "lr", "-", "learning rate"), (speed_ax, "train", "frames_per_s", "-", "frames / s (train)")]
    missing = {id(ax): [] for ax in axes.flat}   # runs without the panel's field
    handles = []
    for i, ((config, history), label) in enumerate(zip(runs, labels)):
        colour = f"C{i % 10}"
        upe = config.get("updates_per_epoch", 1)
        for ax, stage, key, style, _ in panels:
            points = sorted((row_step(r, upe), r[key]) for r in history
                            if r.get("stage") == stage and isinstance(r.get(key), (int, float)) and math.isfinite(r[key]))
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, style, color=colour, marker="o" if len(xs) <= 40 else None, markersize=3.5, linewidth=1.5)
            elif style == "-" or ax is not ce_ax:
                missing[id(ax)].append(config.get("signature", "?"))
        handles.append(Line2D([], [], color=colour, linewidth=2.5, label=label))
    for ax, stage, key, _, ylabel in panels:
        if not ylabel:
            continue
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if missing[id(ax)]:  # said above the panel, so that a missing curve is not mistaken for a hidden one
            ax.set_title(textwrap.shorten(f"no {key} in the {stage} rows of {', '.join(missing[id(ax)])}", 70),
                         loc="right", fontsize=8, color="0.4")
    for ax in axes[1]:
        ax.set_xlabel("updates")
    for ax in (ce_ax, uncond_ax):
        values = [y for line in ax.lines for y in line.get_ydata()]
        if values and min(values) > 0 and max(values) / min(values) > 1.5:
            ax.set_yscale("log")   # ce falls fast, then slowly: a log axis shows both
            ax.yaxis.set_major_formatter("{x:.3g}")
            ax.yaxis.set_minor_formatter("{x:.3g}")
    for ax in (lr_ax, speed_ax):
        if ax.lines:   # from zero: a 2% wobble must not look like a collapse
            ax.set_ylim(0, 1.1 * max(max(line.get_ydata()) for line in ax.lines))
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    speed_ax.yaxis.set_major_formatter("{x:,.0f}")
    ce_ax.legend(handles=[Line2D([], [], color="0.3", linestyle="-", label="train"),
                          Line2D([], [], color="0.3", linestyle="--", label="valid")], loc="best", fontsize=9)
    fig.legend(handles=handles, loc="outside lower center", ncol=1 if len(handles) <= 6 else 2, fontsize=9,
               frameon=False)
    fig.suptitle(title or (f"run {labels[0]}" if len(runs) == 1 else f"{len(runs)} runs") + ": training curves")
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    env.write_atomic(out_png, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return len(runs)
