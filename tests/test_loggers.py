"""Trackers and plots (loggers.py): what TensorBoard and W&B receive, at which steps, across kills and resumes, and
the pictures drawn from history.jsonl. Event files are read back with TensorBoard's own reader."""
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
import wave
from pathlib import Path

import numpy as np
import pytest

import env
import loggers
from env import UserError

ROOT = Path(__file__).resolve().parents[1]
TB = {"tensorboard": True, "updates_per_epoch": 10}

pytest.importorskip("tensorboard")


def tensorboard_view(log_dir):
    """What TensorBoard's Python reader shows: {tag: [(step, value)]} of scalars, restarts purged."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0, "audio": 0})
    acc.Reload()
    return acc, {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def rust_server_view(log_dir):
    """What TensorBoard's Rust data server shows: files in name order, and per tag, a step that goes back drops the
    values from that step on (its preemption rule; it ignores SessionLog.START)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    series = {}
    for path in sorted(Path(log_dir).glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name != "scalars":
                    continue
                points = series.setdefault(value.tag, [])
                points[:] = [(s, v) for s, v in points if s < event.step]
                points.append((event.step, float(np.asarray(value.tensor.float_val)[0])))
    return series


def history_rows(step, session):
    return [{"epoch": step // 10, "stage": "train", "step": step, "ce": 1000 * session + step, "ppl": 2.0, "grad": 0.5,
             "skipped": 0, "bad_reads": 0, "ce_q1": 1.5},
            {"epoch": step // 10, "stage": "valid", "step": step, "ce": 1000 * session + step + 0.5, "ppl": 2.0,
             "ce_uncond": 3.0}]


def test_event_files_hold_the_expected_tags_and_steps(tmp_path):
    lg = loggers.open_loggers(TB, tmp_path, "sig00001", {"git_commit": "abc123", "world_size": 2})
    for step in (5, 10):
        lg.scalars(step, {"ce": 4.0 / step, "lr": 1e-3 * step, "grad": 0.7, "frames_per_s": 1e4, "mfu": None})
    for row in history_rows(10, 1) + [{"epoch": 1, "stage": "evaluate", "step": 10, "ce": 3.1, "fd": 12.5},
                                      {"epoch": 1, "stage": "generate", "samples": 2, "seconds": 1.5}]:
        lg.row(row)  # the generate row has no step: the end of its epoch (10)
    stereo = np.stack([np.sin(np.arange(3200) * 0.1), np.zeros(3200)]) * 0.5
    lg.audio("samples/000", stereo, 32000, 10, caption="lofi piano, rain")
    lg.audio("samples/000_uncond", stereo[:1], 32000, 10, caption="")
    lg.close()

    acc, scalars = tensorboard_view(tmp_path / "tensorboard")
    assert scalars["train/ce"] == [(5, pytest.approx(0.8)), (10, pytest.approx(0.4))]
    assert [s for s, _ in scalars["train/lr"]] == [5, 10] and "train/mfu" not in scalars   # None: left out
    assert scalars["train_epoch/ce"] == [(10, 1010.0)] and scalars["train_epoch/ce_q1"] == [(10, 1.5)]
    assert scalars["valid/ce_uncond"] == [(10, 3.0)] and scalars["evaluate/fd"] == [(10, 12.5)]
    assert scalars["generate/seconds"] == [(10, 1.5)]
    assert not any(tag.endswith(("/epoch", "/step", "/stage")) for tag in scalars)
    clip = acc.Audio("samples/000")
    assert [e.step for e in clip] == [10] and clip[0].sample_rate == 32000
    with wave.open(__import__("io").BytesIO(clip[0].encoded_audio_string)) as w:
        assert (w.getnchannels(), w.getnframes(), w.getframerate()) == (2, 3200, 32000)
        pcm = np.frombuffer(w.readframes(3200), "<i2").reshape(-1, 2)
    assert np.abs(pcm[:, 0] / 32767 - stereo[0]).max() < 1e-4 and not pcm[:, 1].any()
    prompt = acc.Tensors("samples/000/prompt")
    assert prompt[0].step == 10 and prompt[0].tensor_proto.string_val == [b"lofi piano, rain"]
    assert "samples/000_uncond/prompt" not in acc.Tags()["tensors"]
    config = acc.Tensors("config")[0].tensor_proto.string_val[0].decode()
    assert "sig00001" in config and "abc123" in config and "updates_per_epoch" in config
    assert acc.PluginTagToContent("hparams")   # the run's settings in TensorBoard's HPARAMS tab
    assert acc.summary_metadata["samples/000"].summary_description == "lofi piano, rain"


def test_a_generate_stages_samples_are_logged_from_its_folder(tmp_path):
    import data
    folder = tmp_path / "samples" / "3"
    folder.mkdir(parents=True)
    for name, description in (("000", "lofi piano"), ("000_uncond", None), ("001", "jazz trio"), ("001_uncond", None)):
        data.save_audio(folder / f"{name}.wav", np.full((2, 1600), 0.25 if description else -0.5), 32000)
        (folder / f"{name}.json").write_text(json.dumps({"description": description, "epoch": 3}))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "000.wav").write_bytes(b"RIFF, but cut short")
    warnings = []
    lg = loggers.open_loggers(TB, tmp_path, "sig00014", {}, warn=warnings.append)
    lg.samples(tmp_path / "bad", 20)   # one line, and the tracker stays on
    lg.samples(folder, 30)
    lg.close()
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: samples in {tmp_path / 'bad'} not logged (")
    acc, _ = tensorboard_view(tmp_path / "tensorboard")
    assert sorted(acc.Tags()["audio"]) == ["samples/000", "samples/000_uncond", "samples/001", "samples/001_uncond"]
    clip = acc.Audio("samples/001_uncond")[0]
    with wave.open(__import__("io").BytesIO(clip.encoded_audio_string)) as w:
        assert (clip.step, w.getnchannels(), w.getnframes()) == (30, 2, 1600)
        assert np.allclose(np.frombuffer(w.readframes(1600), "<i2") / 32767, -0.5, atol=1e-4)
    assert acc.summary_metadata["samples/001"].summary_description == "jazz trio"
    assert acc.summary_metadata["samples/001_uncond"].summary_description == "no text: the unconditional twin of 001"


SESSION = textwrap.dedent('''
    """A stand-in for train.py's loop: log lines every update, rows and a checkpoint every 10 updates."""
    import json, os, sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[5])
    import loggers
    run_dir, session, save_until, stop_at = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    ckpt = run_dir / "checkpoint.json"
    state = json.loads(ckpt.read_text()) if ckpt.exists() else {"step": 0, "history": []}
    lg = loggers.open_loggers({"tensorboard": True, "updates_per_epoch": 10}, run_dir, "sig00002", {},
                              resume_step=state["step"], history=state["history"])
    history = state["history"]
    for step in range(state["step"] + 1, stop_at + 1):
        lg.scalars(step, {"ce": 1000 * session + step})
        if step % 10 == 0:
            for row in [{"epoch": step // 10, "stage": s, "step": step, "ce": 1000 * session + step} for s in ("train", "valid")]:
                history.append(row)
                lg.row(row)
            if step <= save_until:
                tmp = ckpt.with_suffix(".tmp")
                tmp.write_text(json.dumps({"step": step, "history": history}))
                os.replace(tmp, ckpt)
    if stop_at > save_until:   # steps past the last checkpoint are on disk; now wait for kill -9
        lg.flush()
        print("ready", flush=True)
        time.sleep(60)
    lg.close()
''')


def test_killed_run_resumed_from_its_checkpoint_shows_each_step_once(tmp_path):
    script = tmp_path / "session.py"
    script.write_text(SESSION)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # session 1 checkpoints at 10 and 20, logs rows at 30 and log lines to 33, then is killed before checkpoint 30
    child = subprocess.Popen([sys.executable, str(script), str(run_dir), "1", "20", "33", str(ROOT)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    _, before = tensorboard_view(run_dir / "tensorboard")
    assert [s for s, _ in before["train/ce"]] == list(range(1, 34)) and before["valid/ce"][-1] == (30, 1030.0)
    # session 2 resumes from checkpoint 20 and finishes at 40
    subprocess.run([sys.executable, str(script), str(run_dir), "2", "40", "40", str(ROOT)], check=True, timeout=120)
    expected_lines = [(s, float(1000 + s if s <= 20 else 2000 + s)) for s in range(1, 41)]
    expected_rows = [(s, float(1000 + s if s <= 20 else 2000 + s)) for s in (10, 20, 30, 40)]
    for view in (tensorboard_view(run_dir / "tensorboard")[1], rust_server_view(run_dir / "tensorboard")):
        assert view["train/ce"] == expected_lines
        assert view["train_epoch/ce"] == expected_rows and view["valid/ce"] == expected_rows


def test_rows_lost_with_the_log_dir_are_replayed_once(tmp_path):
    history = history_rows(10, 1) + history_rows(20, 1)
    lg = loggers.open_loggers(TB, tmp_path, "sig00003", {})
    for row in history:
        lg.row(row)
    lg.close()
    import shutil
    shutil.rmtree(tmp_path / "tensorboard")
    later = history_rows(30, 1)   # made after the checkpoint at 20: not the logger's to replay
    for _ in range(2):   # lost, then nothing lost: the second resume must not add a thing
        loggers.open_loggers(TB, tmp_path, "sig00003", {}, resume_step=20, history=history + later).close()
        acc, scalars = tensorboard_view(tmp_path / "tensorboard")
        assert scalars["train_epoch/ce"] == [(10, 1010.0), (20, 1020.0)]
        assert scalars["valid/ce_uncond"] == [(10, 3.0), (20, 3.0)]
        assert "train/ce" not in scalars   # log lines are not in the history: not replayed
        assert len(acc.Tensors("config")) == 1
        assert rust_server_view(tmp_path / "tensorboard")["valid/ce"] == [(10, 1010.5), (20, 1020.5)]


def test_a_tracker_turned_on_mid_run_gets_the_history_from_the_start(tmp_path):
    history = history_rows(10, 1) + history_rows(20, 1)
    loggers.open_loggers({**TB, "tensorboard": False}, tmp_path, "sig00004", {}, 20, history).close()
    assert not (tmp_path / "tensorboard").exists()
    lg = loggers.open_loggers(TB, tmp_path, "sig00004", {}, resume_step=20, history=history)
    lg.row(history_rows(30, 1)[1])
    lg.close()
    assert tensorboard_view(tmp_path / "tensorboard")[1]["valid/ce"] == [(10, 1010.5), (20, 1020.5), (30, 1030.5)]


def test_rows_a_failed_tracker_missed_are_replayed_over_a_killed_sessions_orphans(tmp_path):
    lg = loggers.open_loggers(TB, tmp_path, "sig00010", {})   # session 1 logs epochs 1 and 2, checkpoints only 1
    for row in history_rows(10, 1) + history_rows(20, 1):
        lg.row(row)
    lg.close()
    history = history_rows(10, 1) + history_rows(20, 2)
    lg = loggers.open_loggers(TB, tmp_path, "sig00010", {}, resume_step=10, history=history[:2], warn=lambda _: None)
    lg.backends[0].writer.add_event = None   # session 2: its disk fills before epoch 2's rows, then checkpoint 20
    lg.row(history[3])
    lg.close()
    # session 3: epoch 2's rows on disk are session 1's, behind session 2's restart at 11: TensorBoard hides them
    loggers.open_loggers(TB, tmp_path, "sig00010", {}, resume_step=20, history=history).close()
    assert tensorboard_view(tmp_path / "tensorboard")[1]["valid/ce"] == [(10, 1010.5), (20, 2020.5)]


def test_a_stage_run_again_after_a_resume_at_its_epochs_end_is_logged_once(tmp_path):
    # train.py checkpoints after valid, then runs generate and evaluate (pending in that checkpoint): a kill after
    # generate resumes at the same step and runs generate again
    history = history_rows(10, 1)
    lg = loggers.open_loggers(TB, tmp_path, "sig00013", {})
    for row in history:
        lg.row(row)
    lg.audio("samples/000", np.zeros((1, 800)), 32000, 10, caption="jazz trio")
    lg.row({"epoch": 1, "stage": "generate", "samples": 2, "seconds": 1.5})
    lg.flush()   # ... killed here
    lg = loggers.open_loggers(TB, tmp_path, "sig00013", {}, resume_step=10, history=history)
    lg.audio("samples/000", np.zeros((1, 800)), 32000, 10, caption="jazz trio")
    lg.row({"epoch": 1, "stage": "generate", "samples": 2, "seconds": 1.7})
    lg.row({"epoch": 1, "stage": "evaluate", "ce": 3.0})   # not reached before the kill: logged now
    lg.scalars(11, {"ce": 2.0})
    lg.close()
    acc, scalars = tensorboard_view(tmp_path / "tensorboard")
    assert scalars["generate/seconds"] == [(10, 1.5)] and scalars["evaluate/ce"] == [(10, 3.0)]
    assert [e.step for e in acc.Audio("samples/000")] == [10]
    assert [e.step for e in acc.Tensors("samples/000/prompt")] == [10]
    assert scalars["valid/ce"] == [(10, 1010.5)] and scalars["train/ce"] == [(11, 2.0)]


def test_a_restart_within_the_same_second_is_read_after_the_session_it_follows(tmp_path, monkeypatch):
    from tensorboard.summary.writer import event_file_writer
    # event file names end in a per-process counter: 9 then 10 sort the wrong way when the seconds before them tie
    monkeypatch.setattr(event_file_writer, "_global_uid", event_file_writer.AtomicCounter(9))
    for session, (resume, stop) in enumerate([(0, 5), (2, 4)], start=1):
        lg = loggers.open_loggers(TB, tmp_path, "sig00011", {}, resume_step=resume)
        for step in range(resume + 1, stop + 1):
            lg.scalars(step, {"ce": 1000 * session + step})
        lg.close()
    assert tensorboard_view(tmp_path / "tensorboard")[1]["train/ce"] == [(1, 1001), (2, 1002), (3, 2003), (4, 2004)]


def test_rows_without_a_step_land_at_the_end_of_their_epoch(tmp_path):
    old = [{"epoch": 1, "stage": "train", "ce": 5.0}, {"epoch": 2, "stage": "valid", "ce": 4.0}]
    assert [loggers.row_step(r, 250) for r in old] == [250, 500]
    loggers.open_loggers({**TB, "updates_per_epoch": 250}, tmp_path, "sig00005", {}, 500, old).close()
    scalars = tensorboard_view(tmp_path / "tensorboard")[1]
    assert scalars["train_epoch/ce"] == [(250, 5.0)] and scalars["valid/ce"] == [(500, 4.0)]


@pytest.mark.parametrize("key,package", [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_a_tracker_without_its_package_is_one_line(tmp_path, monkeypatch, key, package):
    monkeypatch.setitem(sys.modules, package, None)   # as if not installed
    with pytest.raises(UserError) as e:
        loggers.open_loggers({key: True}, tmp_path, "sig00006", {})
    assert str(e.value) == f"{key}=True needs the {package} package: pip install {package} (or set {key}=False)"
    assert not list(tmp_path.iterdir())   # nothing written
    loggers.open_loggers({key: True}, tmp_path, "sig00006", {}, main=False).close()   # other ranks: nothing to import


def test_plotting_without_matplotlib_is_one_line(tmp_path, monkeypatch):
    run = make_run(tmp_path / "xps", "aaaa0001", {"lr": 1e-3})
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(UserError, match=r"^plotting needs the matplotlib package: pip install matplotlib$"):
        loggers.plot_runs([run], tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()


def test_bad_wandb_mode_is_one_line():
    with pytest.raises(UserError, match=r"^wandb_mode='onlin' must be one of online, offline$"):
        loggers.check({"wandb": True, "wandb_mode": "onlin"})
    loggers.check({"wandb": False, "wandb_mode": "onlin"})   # off: not looked at


def test_with_every_tracker_off_nothing_is_imported_and_nothing_written(tmp_path):
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        import loggers
        for settings, main in (({{"tensorboard": False, "wandb": False}}, True), ({{"tensorboard": True}}, False)):
            lg = loggers.open_loggers(settings, {str(tmp_path)!r}, "sig", {{}}, 20, [{{"epoch": 1, "stage": "train", "ce": 1.0}}],
                                      main=main)
            t = time.perf_counter()
            for step in range(10000):
                lg.scalars(step, {{"ce": 1.0, "lr": 1e-4}})
            per_call = (time.perf_counter() - t) / 10000
            lg.row({{"epoch": 1, "stage": "valid", "ce": 1.0}}), lg.audio("a", [[0.0]], 32000, 1), lg.close()
        print(sorted(m for m in ("tensorboard", "wandb", "matplotlib") if m in sys.modules), per_call < 20e-6)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]", "True"]
    assert not list(tmp_path.iterdir())


def test_a_failing_tracker_is_one_warning_and_training_goes_on(tmp_path):
    warnings = []
    lg = loggers.open_loggers(TB, tmp_path, "sig00007", {}, warn=warnings.append)
    lg.scalars(1, {"ce": 5.0})

    def full_disk(event):
        raise OSError(28, "No space left on device")
    lg.backends[0].writer.add_event = full_disk
    for step in range(2, 5):
        lg.scalars(step, {"ce": 5.0})
    lg.row(history_rows(10, 1)[0])
    lg.audio("samples/000", np.zeros((1, 100)), 32000, 10)
    lg.close()
    assert warnings == ["warning: tensorboard logging failed (OSError: [Errno 28] No space left on device); "
                        "tensorboard is off for the rest of this run, training goes on"]


def test_a_tracker_that_cannot_start_is_one_warning(tmp_path):
    (tmp_path / "tensorboard").write_text("a file where the log directory goes")
    warnings = []
    lg = loggers.open_loggers(TB, tmp_path, "sig00008", {}, warn=warnings.append)
    lg.scalars(1, {"ce": 5.0})
    lg.close()
    assert len(warnings) == 1 and warnings[0].startswith("warning: tensorboard could not start (")
    assert warnings[0].endswith("training goes on without it") and "\n" not in warnings[0]


# ----------------------------------------------------------------------------------------------------------
# Weights & Biases, offline

def wandb_records(path):
    """The records of a .wandb file: W&B's 7-byte header, then LevelDB's log format (32 KiB blocks; each piece: crc
    u32, length u16, type u8 = full 1, first 2, middle 3, last 4)."""
    from wandb.proto import wandb_internal_pb2 as pb
    data, pos, pending, records = Path(path).read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768   # a block's tail too short for a header is padding
            continue
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        if pos + 7 + length > len(data):
            break   # still being written
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(pb.Record.FromString(pending))
            pending = b""
    return records


def test_wandb_offline_gets_steps_rows_audio_and_config(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))   # nothing under the user's home
    monkeypatch.setenv("WANDB_SILENT", "true")
    settings = {"wandb": True, "wandb_mode": "offline", "wandb_project": "p", "updates_per_epoch": 10, "lr": 1e-3}
    history = history_rows(10, 1)
    lg = loggers.open_loggers(settings, tmp_path, "sig00009", {"git_commit": "abc123"}, resume_step=10, history=history)
    lg.scalars(15, {"ce": 3.0})
    lg.row(history_rows(20, 1)[1])
    lg.audio("samples/000", np.zeros((2, 3200)), 32000, 20, caption="lofi piano")
    lg.close()
    [run_file] = (tmp_path / "wandb").glob("offline-run-*/run-sig00009.wandb")
    deadline = time.time() + 30
    while not (records := wandb_records(run_file)) or records[-1].WhichOneof("record_type") != "exit":
        assert time.time() < deadline, "W&B never finished its run file"
        time.sleep(0.1)   # offline, finish() returns before W&B's service process has written everything
    steps = {}
    config = {}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "history":
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):
                    steps.setdefault(key, []).append((record.history.step.num, json.loads(item.value_json)))
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
    assert steps["train_epoch/ce"] == [(10, 1010)] and steps["valid/ce"] == [(10, 1010.5), (20, 1020.5)]
    assert steps["train/ce"] == [(15, 3.0)]
    assert steps["samples/000/caption"] == [(20, "lofi piano")]
    assert (run_file.parent / "files" / steps["samples/000/path"][0][1]).is_file()
    assert (config["signature"], config["lr"], config["git_commit"]) == ("sig00009", 1e-3, "abc123")


def test_wandb_resumed_past_the_checkpoint_skips_the_steps_it_already_holds(tmp_path, monkeypatch):
    import importlib.machinery
    import types
    logged = []

    class Run:   # W&B's answer for a run that a killed process had logged to update 25
        step = 25
        config = types.SimpleNamespace(update=lambda values, allow_val_change: logged.append(("config", values)))
        log = staticmethod(lambda values, step: logged.append((step, sorted(values))))
        finish = staticmethod(lambda: logged.append("finish"))
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init, fake.Settings = lambda **kw: logged.append(("init", kw["id"], kw["resume"])) or Run(), dict
    monkeypatch.setitem(sys.modules, "wandb", fake)
    warnings = []
    history = history_rows(10, 1) + history_rows(20, 1)
    lg = loggers.open_loggers({"wandb": True, "updates_per_epoch": 10}, tmp_path, "sig00012", {}, 20, history,
                              warn=warnings.append)
    for step in range(21, 27):
        lg.scalars(step, {"ce": 1.0})
    lg.close()
    assert logged[0] == ("init", "sig00012", "allow") and logged[1][0] == "config"
    assert logged[2:] == [(25, ["train/ce"]), (26, ["train/ce"]), "finish"]   # rows 10, 20 and steps 21-24: held
    assert warnings == ["warning: W&B run sig00012 already holds updates up to 24, past the checkpoint's 20: it keeps "
                        "those as they were and takes this run's from update 25 on (W&B never rewrites a step)"]


# ----------------------------------------------------------------------------------------------------------
# Pictures

def make_run(xps, sig, overrides, epochs=4, upe=50, rich=True):
    """A run directory as train.py leaves it: config.json and history.jsonl (rich: rows with step, lr, frames/s)."""
    path = xps / sig
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"signature": sig, "updates_per_epoch": upe, "epochs": epochs,
                                                  "seed": 1, "git_commit": sig, **overrides}))
    rows = []
    for epoch in range(1, epochs + 1):
        step, ce = epoch * upe, 7.0 / epoch ** 0.5
        extra = {"step": step, "lr": 1e-3 * min(1, step / 100), "frames_per_s": 4e4} if rich else {}
        rows += [{"epoch": epoch, "stage": "train", "ce": ce, "ppl": 1.0, **extra},
                 {"epoch": epoch, "stage": "valid", "ce": ce + 0.1, "ce_uncond": ce + 0.3, **({"step": step} if rich else {})}]
    (path / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"epoch": 9, "sta')  # cut line
    return path


def assert_png(path):
    import matplotlib.image
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = matplotlib.image.imread(path).shape
    assert width > height > 400


def test_plot_command_draws_one_run_and_several(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("AUDIOCRAFT_DORA_DIR", str(tmp_path / "runs"))
    env.reset()
    xps = tmp_path / "runs" / "xps"
    make_run(xps, "aaaa0001", {"lr": 1e-3, "dim": 64})
    make_run(xps, "bbbb0002", {"lr": 3e-3, "dim": 64})
    make_run(xps, "cccc0003", {"lr": 1e-3, "dim": 128}, rich=False)   # history from before rows had step and lr
    assert env.main(["plot", "aaaa0001", f"--out={tmp_path / 'one.png'}"]) == 0
    assert_png(tmp_path / "one.png")
    assert env.main(["plot", "aaaa0001", "bbbb0002", str(xps / "cccc0003"), f"--out={tmp_path / 'all.png'}"]) == 0
    assert_png(tmp_path / "all.png")
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote {tmp_path / 'all.png'}"
    configs = [json.loads((xps / s / "config.json").read_text()) for s in ("aaaa0001", "bbbb0002", "cccc0003")]
    assert loggers.run_labels(configs) == ["aaaa0001: dim=64, lr=0.001", "bbbb0002: dim=64, lr=0.003",
                                           "cccc0003: dim=128, lr=0.001"]
    assert loggers.run_labels([{**configs[0], "overrides": {"lr": 1e-3, "dim": 64}}]) == ["aaaa0001: dim=64, lr=0.001"]
    with pytest.raises(UserError, match=r"deadbeef: not a run directory \(no config.json\)"):
        env.main(["plot", "deadbeef", f"--out={tmp_path / 'x.png'}"])
    with pytest.raises(UserError, match=r"^command line: missing arguments \(got none\); usage: python env.py plot SIG"):
        env.main(["plot", "--out=x.png"])
    with pytest.raises(UserError, match=r'^command line: unknown key "outt" \(did you mean "out"\?\)'):
        env.main(["plot", "aaaa0001", "--outt=x.png"])
    assert not (tmp_path / "x.png").exists()


def test_grid_plot_draws_the_runs_that_have_a_history(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    from grids.__main__ import main as grids_main
    import grids
    monkeypatch.setenv("AUDIOCRAFT_DORA_DIR", str(tmp_path / "runs"))
    env.reset()
    grid = tmp_path / "lrs.py"
    grid.write_text("def explore(launcher):\n    launcher.bind_('config/debug.py')\n"
                    "    for lr in (1e-3, 2e-3, 4e-3):\n        launcher(lr=lr)\n")
    runs = grids.load(str(grid))
    with pytest.raises(UserError, match=r"^--plot: no run of grid .* has finished an epoch yet"):
        grids_main([str(grid), "--plot"])
    for run in runs[:2]:
        make_run(run.dir.parent, run.sig, {"lr": run.overrides["lr"]})
    monkeypatch.chdir(tmp_path)
    assert grids_main([str(grid), "--plot"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "wrote curves_lrs.png (2 of 3 runs; the others have no history yet)"
    assert_png(tmp_path / "curves_lrs.png")
    assert grids_main([str(grid), f"--plot={tmp_path / 'g.png'}"]) == 0
    assert_png(tmp_path / "g.png")
    with pytest.raises(UserError, match="--plot go alone"):
        grids_main([str(grid), "--plot", "--local"])
