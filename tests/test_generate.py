"""generate.py: sampling from a run and from an AudioCraft export, continuation, sliding windows, normalisation,
export, and the errors a user sees."""
import io
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import soundfile as sf
import torch
import yaml

import data
import env
import formats
import generate
import model as lm_lib
import text
import train
import _faults_util as fu
from _model_util import TINY_RUN, make_run
from env import UserError

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(2)

TINY = TINY_RUN


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def mg(run_dir):
    return generate.load(run_dir)


def codes_for(mg, prompts, seconds, seed=0, **kw):
    """model.sample as generate.py calls it: row i draws from seed + i."""
    n = int(round(seconds * mg.codec.frame_rate))
    return lm_lib.sample(mg.lm, prompts, n, window=mg.window, seeds=[seed + i for i in range(len(prompts))],
                         **{**mg.defaults, **kw})


def sine(path, seconds, rate, freq=440.0):
    t = np.arange(int(seconds * rate)) / rate
    sf.write(path, 0.5 * np.sin(2 * np.pi * freq * t), rate)


def test_run_loads_its_best_ema_state(run_dir, mg):
    best = torch.load(run_dir / "checkpoint.pt", weights_only=True)["best_state"]
    state = mg.lm.state_dict()
    assert mg.weights == "best_state" and all(torch.equal(state[k], v) for k, v in best.items())
    assert mg.max_duration == 0.5 and mg.window == 25 and mg.defaults["top_k"] == 50


def test_fixed_seed_gives_identical_audio_twice(run_dir, mg, tmp_path, capsys):
    for name in ("a", "b"):
        generate.main([f"--run={run_dir}", "--prompt=slow calm strings", "--duration=0.3", "--seed=7",
                       f"--out={tmp_path / name}.wav"])
    a, rate = sf.read(tmp_path / "a.wav")
    b, _ = sf.read(tmp_path / "b.wav")
    assert rate == mg.codec.sample_rate and len(a) == int(0.3 * rate) and np.abs(a).max() > 0
    assert np.array_equal(a, b)
    meta = json.loads((tmp_path / "a.json").read_text())
    assert meta["prompt"] == "slow calm strings" and meta["seed"] == 7 and meta["weights"] == "best_state"
    assert meta["top_k"] == 50 and meta["cfg_coef"] == 3.0 and "--seed=7" in meta["command"]
    out = capsys.readouterr().out
    assert "steps/s" in out and "x real time" in out


def test_a_file_of_a_batch_regenerates_alone_from_its_row_seed(mg, run_dir, tmp_path):
    """Each prompt draws from seed + its index only: the second of three, made in one batch, comes out the same
    alone with --seed=its row_seed (0.8 s: two sliding windows, so the later window's stream is covered too).
    The codes are identical; decoding a batch of 3 or of 1 rounds differently, by one 16-bit step at most."""
    n = int(round(0.8 * mg.codec.frame_rate))
    three = codes_for(mg, ["slow calm strings", "fast loud drums", "soft piano"], 0.8, seed=40)
    assert torch.equal(three[1:2], codes_for(mg, ["fast loud drums"], 0.8, seed=41))
    assert not torch.equal(three[0], three[1])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("slow calm strings\nfast loud drums\nsoft piano\n")
    common = [f"--run={run_dir}", "--duration=0.8", "--normalize=none"]
    generate.main(common + [f"--prompts={prompts}", "--seed=40", "--batch_size=3", f"--out={tmp_path / 'batch'}/"])
    meta = json.loads((tmp_path / "batch" / "001.json").read_text())
    assert (meta["prompt"], meta["row_seed"]) == ("fast loud drums", 41)
    generate.main(common + ["--prompt=fast loud drums", "--seed=41", f"--out={tmp_path / 'alone.wav'}"])
    batch, alone = sf.read(tmp_path / "batch" / "001.wav")[0], sf.read(tmp_path / "alone.wav")[0]
    assert np.abs(batch - alone).max() <= 2.0 ** -15


def test_keyed_noise_is_exponential_per_row_and_samples_by_the_probabilities():
    seeds, index = torch.arange(20000), torch.arange(3).expand(20000, 2, 3)
    e = lm_lib.keyed_noise(seeds, 5, index)
    assert e.shape == (20000, 2, 3) and e.min() > 0 and abs(e.mean().item() - 1.0) < 0.02
    assert torch.equal(lm_lib.keyed_noise(seeds[7:9], 5, index[7:9]), e[7:9])   # a row's draws ignore its batch
    assert torch.equal(lm_lib.keyed_noise(seeds, 5, index.flip(-1)), e.flip(-1))  # an entry's draw, wherever it is
    assert not torch.equal(e[:, 0], e[:, 1])                                      # codebooks draw apart
    assert not torch.equal(lm_lib.keyed_noise(seeds, 6, index), e)                # each step draws afresh
    assert not torch.equal(lm_lib.keyed_noise(lm_lib.mix_seeds(seeds, 1), 5, index), e)
    # seeds up to 2**63 - 1: the high half counts (seed + 2**32 is another seed), and below 2**32 nothing changed
    high = seeds[:5] + 2 ** 32
    assert not torch.equal(lm_lib.keyed_noise(high, 5, index[:5]), e[:5])
    assert not torch.equal(lm_lib.mix_seeds(high, 1), lm_lib.mix_seeds(seeds[:5], 1))
    assert torch.equal(lm_lib._fold(seeds), seeds)
    assert torch.isfinite(lm_lib.keyed_noise(torch.tensor([lm_lib.MAX_SEED]), 5, index[:1])).all()
    for bad in ([-1], [2 ** 63], [1.5], [True]):
        with pytest.raises(UserError, match="must be an integer between 0 and 9223372036854775807"):
            lm_lib.check_seeds(bad, 1)
    assert lm_lib.check_seeds([np.int64(3), lm_lib.MAX_SEED], 2).tolist() == [3, lm_lib.MAX_SEED]
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(20000, 2, 4)
    for kw, expected in [({}, probs), ({"top_k": 3}, probs[:3] / 0.95), ({"top_p": 0.7}, probs[:2] / 0.8)]:
        picks = lm_lib.sample_next(logits, noise=lambda i: lm_lib.keyed_noise(seeds, 0, i), **kw)
        freq = torch.bincount(picks.flatten(), minlength=4)[:len(expected)] / picks.numel()
        assert torch.allclose(freq, expected, atol=0.012), (kw, freq)


def test_different_prompts_give_different_codes(mg):
    a = codes_for(mg, ["slow calm strings"], 0.3)
    b = codes_for(mg, ["fast loud drums"], 0.3)
    assert a.shape == (1, 4, 15) and not torch.equal(a, b)
    assert torch.equal(a, codes_for(mg, ["slow calm strings"], 0.3))


def test_cfg_coef_zero_equals_the_unconditional_model(mg):
    n = 15
    uncond = mg.lm.generate(None, None, n, cfg_coef=3.0, top_k=50, seeds=[3])
    guided0 = codes_for(mg, ["fast loud drums"], 0.3, seed=3, cfg_coef=0.0)
    guided3 = codes_for(mg, ["fast loud drums"], 0.3, seed=3, cfg_coef=3.0)
    assert torch.equal(guided0, uncond) and not torch.equal(guided3, uncond)


@pytest.mark.parametrize("rate", [32000, 16000])
def test_continuation_keeps_the_prompt_codes(mg, tmp_path, rate):
    sine(tmp_path / "intro.wav", 0.5, rate)
    wav = generate.read_prompt_audio(tmp_path / "intro.wav", 0.2, mg.codec)   # resampled to the codec's rate
    assert wav.shape == (1, int(0.2 * mg.codec.sample_rate))
    prompt = mg.codec.encode(wav[None])
    assert prompt.shape == (1, 4, 10)
    codes = codes_for(mg, ["slow calm strings"], 0.4, prompt=prompt)
    assert codes.shape == (1, 4, 20) and torch.equal(codes[..., :10], prompt)


def test_long_pieces_slide_a_window_with_extend_stride(mg, monkeypatch):
    calls, generate_window = [], mg.lm.generate

    def spy(condition, mask, n_frames, prompt=None, **kw):
        out = generate_window(condition, mask, n_frames, prompt=prompt, **kw)
        calls.append((n_frames, prompt, out))
        return out
    monkeypatch.setattr(mg.lm, "generate", spy)
    codes = codes_for(mg, ["fast loud drums"], 0.8, stride=15)                   # 40 frames, 25 per window
    assert codes.shape == (1, 4, 40)
    assert [(n, 0 if p is None else p.shape[-1]) for n, p, _ in calls] == [(25, 0), (25, 10)]
    # the second window starts from the first one's last 10 frames, kept as they were
    assert torch.equal(calls[1][1], codes[..., 15:25]) and torch.equal(codes[..., 15:], calls[1][2])


def test_export_loads_back_with_identical_logits(run_dir, mg, tmp_path, capsys):
    out = tmp_path / "export"
    generate.main(["export", str(run_dir), str(out)])
    pkg = torch.load(out / "state_dict.bin", weights_only=True)
    assert isinstance(torch.load(out / "compression_state_dict.bin", weights_only=True)["best_state"], dict)
    xp = yaml.safe_load(pkg["xp.cfg"])
    # AudioCraft's MusicGen needs a context over its default extend_stride of 18 s; ours stays 0.5 s
    assert xp["dataset"]["segment_duration"] == 30.0 and xp["conditioners"]["description"]["model"] == "lut"
    # config/debug.py trains with mask_memory=True and a lookup-table conditioner: AudioCraft differs on both, and
    # the export says so in one line each and records it
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: ")]
    assert [n.split(":")[1].strip() for n in notes] == ["mask_memory=True", "conditioner=lut"]
    assert "padded rows of a batch of prompts of different lengths" in notes[0]
    assert xp["nanomusicgen"]["audiocraft_differences"] == [n[len("note: "):] for n in notes]
    lm, cfg = formats.load_audiocraft_lm(out)   # the conditioner the run was trained with, from the export's settings
    assert cfg == mg.lm_cfg and type(lm.conditioner) is type(mg.lm.conditioner)
    sequence = torch.randint(0, 257, (2, 4, 12), generator=torch.Generator().manual_seed(0))
    texts = ["slow calm strings", None]
    with torch.no_grad():
        assert torch.equal(lm(sequence, *lm.conditioner(texts)), mg.lm(sequence, *mg.lm.conditioner(texts)))
    # and generate.py samples the export as it samples the run
    exported = generate.load(out)
    assert exported.max_duration == 0.5 and exported.defaults == mg.defaults
    assert torch.equal(codes_for(exported, ["fast loud drums"], 0.3), codes_for(mg, ["fast loud drums"], 0.3))
    with pytest.raises(UserError, match="already holds an export"):
        generate.main(["export", str(run_dir), str(out)])


def t5_export(root):
    """An AudioCraft-style export of a T5-conditioned model (no T5 weights needed to write it)."""
    cfg = lm_lib.LMConfig(dim=32, n_layers=1, n_heads=2, n_q=4, card=256, text_dim=16)
    formats.export_audiocraft_lm(lm_lib.MusicGenLM(cfg), cfg, root)
    formats.export_audiocraft_codec(formats.load_codec("debug"), root / "compression_state_dict.bin")
    return root


def write_t5(directory):
    """A Hugging Face-style T5 directory (config.json, pytorch_model.bin, spiece.model) with random weights."""
    buf = io.BytesIO()
    words = "slow fast calm loud piano drums strings rain lofi synth bass guitar".split()
    texts = [" ".join(words[(i * 7 + j) % len(words)] for j in range(i % 5 + 1)) for i in range(200)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=buf, vocab_size=40, pad_id=0,
                                   eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2)
    directory.mkdir(parents=True)
    (directory / "spiece.model").write_bytes(buf.getvalue())
    config = {"vocab_size": 200, "d_model": 16, "d_kv": 8, "d_ff": 32, "num_layers": 1, "num_heads": 2}
    (directory / "config.json").write_text(json.dumps(config))
    encoder = text.T5Encoder(text.T5Config(**config))
    torch.save({text.hf_key(k): v for k, v in encoder.state_dict().items()}, directory / "pytorch_model.bin")
    return directory


def test_export_directory_takes_t5_from_reference_or_t5_option(tmp_path, monkeypatch):
    t5_export(tmp_path / "reference" / "musicgen-tiny")
    write_t5(tmp_path / "reference" / "t5-base")   # the name its xp.cfg gives
    monkeypatch.setenv("AUDIOCRAFT_REFERENCE_DIR", str(tmp_path / "reference"))
    env.reset()
    mg = generate.load("//reference/musicgen-tiny")
    assert mg.weights == "export" and mg.max_duration == 30.0 and mg.conditioner["t5_path"] == "//reference/t5-base"
    a = codes_for(mg, ["slow piano, rain"], 0.2)
    shutil.move(tmp_path / "reference" / "t5-base", tmp_path / "elsewhere")
    with pytest.raises(UserError, match="t5-base: resolved to .* which does not exist .*--t5=PATH"):
        generate.load("//reference/musicgen-tiny")
    b = codes_for(generate.load("//reference/musicgen-tiny", t5=str(tmp_path / "elsewhere")), ["slow piano, rain"], 0.2)
    assert a.shape == (1, 4, 10) and torch.equal(a, b)


@pytest.mark.parametrize("args, message", [
    (["--run=deadbeef"], "no run deadbeef in"),
    (["--duration=0"], r"--duration=0.0: must be positive"),
    (["--duration=-2"], r"--duration=-2.0: must be positive"),
    (["--extend_stride=0.6", "--duration=2"], r"extend_stride=0.6 s: .* shorter than the model's context \(0.5 s\)"),
    (["--audio_prompt=garbage.wav"], r"--audio_prompt=garbage.wav: unreadable"),
    (["--audio_prompt=nothere.wav"], r"--audio_prompt=nothere.wav: no such file"),
    (["--audio_prompt=intro.wav", "--prompt_duration=0.5"], r"audio prompt \(0.5 s\) must be shorter"),
    (["--top_p=2"], r"--top_p=2.0: must be between 0 and 1"),
    (["--prompts=missing.txt"], r"--prompts=.*missing.txt: cannot read"),
    (["--temprature=1"], r'command line: unknown key "temprature" \(did you mean "temperature"\?\)'),
    (["--out=x.mp3"], r"--out=.*x.mp3: write a .wav or .flac file"),
    (["--quantize=int3"], r"--quantize=int3: expected int8 or int4"),
    (["--codec=/nonexistent/codec"], r"codec /nonexistent/codec: .* does not exist \(pass --codec=PATH"),
    (["T5", "--t5=/nonexistent/t5"], r"T5 path /nonexistent/t5 is not a directory .*--t5=PATH"),
])
def test_bad_input_is_one_clear_error_and_writes_nothing(run_dir, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "garbage.wav").write_text("not audio")
    sine(tmp_path / "intro.wav", 1.0, 32000)
    run = str(t5_export(tmp_path / "t5run")) if args[0] == "T5" else str(run_dir)
    args = [a for a in args if a != "T5"]
    out = tmp_path / "out"
    with pytest.raises(UserError, match=message) as e:
        generate.main([f"--run={run}", "--duration=0.4", f"--out={out}/", "--seed=0", *args])
    assert "\n" not in str(e.value) and not out.exists()


def test_a_run_whose_codec_is_missing_names_it(run_dir, tmp_path):
    moved = tmp_path / "xps" / run_dir.name
    moved.mkdir(parents=True)
    (moved / "checkpoint.pt").write_bytes((run_dir / "checkpoint.pt").read_bytes())
    config = json.loads((run_dir / "config.json").read_text())
    (moved / "config.json").write_text(json.dumps({**config, "codec": str(tmp_path / "gone" / "encodec")}))
    with pytest.raises(UserError, match=r"codec .*gone/encodec: .* does not exist \(pass --codec=PATH"):
        generate.main([f"--run={run_dir.name}", f"--runs_dir={tmp_path}", f"--out={tmp_path / 'o.wav'}"])
    assert not (tmp_path / "o.wav").exists()


def test_command_line_error_exits_2_with_one_line(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--run=cafef00d", f"--runs_dir={tmp_path}",
                        "--prompt=x"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: --run=cafef00d: no run cafef00d in")
    assert len(r.stderr.strip().splitlines()) == 1 and not list(tmp_path.iterdir())


def test_loudness_matches_bs1770_and_normalising_never_clips():
    rate = 32000
    t = np.arange(2 * rate) / rate
    tone = torch.tensor(np.sin(2 * np.pi * 997 * t), dtype=torch.float32)[None]
    # BS.1770: a full-scale 997 Hz sine in one channel reads -3.01 LUFS
    assert data.loudness(tone.numpy(), rate) == pytest.approx(-3.01, abs=0.05)
    quiet, gain = data.normalize(0.01 * tone, rate, "loudness", 14.0)
    assert data.loudness(quiet.numpy(), rate) == pytest.approx(-14.0, abs=0.05) and gain > 0
    clicks = torch.zeros(1, 2 * rate)
    clicks[0, ::8000] = 0.5                      # quiet on average, loud peaks: the ceiling wins over loudness
    limited, _ = data.normalize(clicks, rate, "loudness", 14.0)
    assert float(limited.abs().max()) == pytest.approx(10 ** (-1 / 20), rel=1e-5)
    peaked, _ = data.normalize(0.3 * tone, rate, "peak", 3.0)
    assert float(peaked.abs().max()) == pytest.approx(10 ** (-3 / 20), rel=1e-5)
    silent, gain = data.normalize(torch.zeros(1, rate), rate)
    assert gain == 0.0 and not silent.any()


# ---- the sampler: progress, the train stage's call, the compiled step

def test_on_step_counts_every_decode_step_of_every_window(mg):
    """A delay pattern over K codebooks takes (frames - prompt frames) + K - 1 steps per window; on_step hears each
    one, in order, with the total of all windows."""
    calls = []
    n, stride = 40, 15                                                   # 40 frames, 25 per window: 2 windows
    prompt = codes_for(mg, ["soft piano"], 0.2)                          # [1, 4, 10]
    codes = lm_lib.sample(mg.lm, ["soft piano"], n, window=mg.window, stride=stride, prompt=prompt, seeds=[5],
                          on_step=lambda done, total: calls.append((done, total)), **mg.defaults)
    total = (25 - 10 + 3) + (25 - (25 - stride) + 3)                     # window 1 after the prompt, window 2
    assert codes.shape == (1, 4, n) and torch.equal(codes[..., :10], prompt)
    assert calls == [(i + 1, total) for i in range(total)]


def test_a_training_sample_and_generate_py_give_the_same_codes_and_audio(run_dir, mg, tmp_path, monkeypatch):
    """train.py's generate stage samples the generate split's descriptions with row seeds seed + epoch + i under
    the run's settings and context, and normalises like generate.py: `generate.py --prompt=P --seed=ROW_SEED` on the
    same weights makes the same codes and the same file. 0.8 s: two windows."""
    cfg = train.parse_args(TINY)
    epoch, rate = 3, mg.codec.frame_rate
    descriptions = ["slow calm strings", "fast loud drums", "soft piano"]
    n_frames = max(1, int(round(0.8 * rate)))
    window = max(1, int(round(cfg.segment_duration * rate)))              # the stage's context, from its config
    with torch.autocast("cpu", dtype=getattr(torch, cfg.dtype), enabled=cfg.dtype != "float32"):
        stage = lm_lib.sample(mg.lm, descriptions, n_frames, window=window,
                              seeds=[cfg.seed + epoch + i for i in range(len(descriptions))],
                              **{k: getattr(cfg, k) for k in ("cfg_coef", "top_k", "top_p", "temperature")})
    made, sample = [], lm_lib.sample
    monkeypatch.setattr(lm_lib, "sample", lambda *a, **kw: made.append(sample(*a, **kw)) or made[-1])
    out = tmp_path / "one.wav"
    generate.main([f"--run={run_dir}", f"--prompt={descriptions[1]}", f"--seed={cfg.seed + epoch + 1}",
                   "--duration=0.8", f"--out={out}"])
    assert torch.equal(made[0], stage[1:2])
    # the stage decodes its codes and normalises them with data.normalize, as generate.py does
    audio, _ = data.normalize(mg.codec.decode(stage[1:2]).float()[0], mg.codec.sample_rate)
    assert out.read_bytes() == data.audio_bytes(audio, mg.codec.sample_rate)


def test_compiled_decode_gives_the_eager_tokens():
    """compile_decode (fullgraph: a graph break would raise) against the eager step: the same greedy tokens and the
    same keyed-noise samples, through two windows with a prompt, CFG and progress callbacks between steps."""
    torch.manual_seed(0)
    lm = lm_lib.build_lm(dict(dim=32, n_layers=1, n_heads=2, n_q=4, card=32, conditioner="lut", lut_tokenizer="bytes",
                              lut_dim=32, lut_layers=0)).eval()
    prompt = torch.randint(0, 32, (2, 4, 3))
    kw = dict(cfg_coef=3.0, top_k=8, top_p=0.0, temperature=1.0)

    def both():
        with torch.no_grad():
            condition, mask = lm.conditioner(["slow piano", "drums"])
        greedy = lm.generate(condition, mask, 14, greedy=True, prompt=prompt)
        steps = []
        sampled = lm_lib.sample(lm, ["slow piano", "drums"], 20, window=12, stride=7, prompt=prompt,
                                seeds=[7, 2 ** 40], on_step=lambda done, total: steps.append(done), **kw)
        return greedy, sampled, steps
    eager = both()
    lm_lib.compile_decode(lm)
    compiled = both()
    lm_lib.decompile_decode(lm)
    assert torch.equal(eager[0], compiled[0]) and torch.equal(eager[1], compiled[1])
    assert eager[2] == compiled[2] == list(range(1, len(eager[2]) + 1))
    assert not torch.equal(eager[1], lm_lib.sample(lm, ["slow piano", "drums"], 20, window=12, stride=7,
                                                   prompt=prompt, seeds=[8, 2 ** 40], **kw))


# ---- long runs: stop signals, resuming, a full disk

@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_generate_keeps_its_files_and_the_same_command_makes_the_rest(run_dir, tmp_path, signum):
    """SIGTERM (SLURM) or Ctrl-C in the middle of a prompts file: generate.py stops between two decode steps, keeps
    the files it finished (each wav with its .json, no temporary file) and exits 75. The same command again takes
    up the stopped run's seed and makes only the missing files, the ones an uninterrupted run makes."""
    fu.context()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"piece number {i}\n" for i in range(5)))
    out = tmp_path / "out"
    args = [f"--run={run_dir}", f"--prompts={prompts}", "--duration=0.8", "--batch_size=1", f"--out={out}/"]
    proc = fu.Training(args, tmp_path / "log.txt", target="generate.py")
    fu.wait_until(lambda: (out / "000.json").exists(), proc, timeout=120, what="the first file")
    proc.signal(signum)
    t0 = time.time()
    assert proc.wait(60) == env.EXIT_REQUEUE, proc.output()
    assert time.time() - t0 < 10
    assert f"stopped by {signal.Signals(signum).name} after writing" in proc.output()
    names = sorted(p.name for p in out.iterdir())
    assert "000.wav" in names and "004.wav" not in names and not [n for n in names if ".tmp" in n], names
    assert {p.stem for p in out.glob("*.wav")} == {p.stem for p in out.glob("*.json")}
    seed = json.loads((out / "000.json").read_text())["seed"]
    kept = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    generate.main(args)                                          # the same command, no --seed
    for i in range(5):
        assert json.loads((out / f"{i:03d}.json").read_text())["row_seed"] == seed + i
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept
    alone = tmp_path / "alone.wav"
    generate.main([f"--run={run_dir}", "--prompt=piece number 3", f"--seed={seed + 3}", "--duration=0.8",
                   f"--out={alone}"])
    assert alone.read_bytes() == (out / "003.wav").read_bytes()


def test_a_complete_set_is_skipped_with_its_seed_and_made_afresh_without(run_dir, tmp_path, capsys):
    out = tmp_path / "one.wav"
    args = [f"--run={run_dir}", "--prompt=soft piano", "--duration=0.2", f"--out={out}"]
    generate.main(args + ["--seed=11"])
    made = out.stat().st_mtime_ns
    generate.main(args + ["--seed=11"])
    assert out.stat().st_mtime_ns == made and "nothing to do" in capsys.readouterr().out
    generate.main(args + ["--seed=11", "--top_k=3"])            # another setting: made again
    assert json.loads(out.with_suffix(".json").read_text())["top_k"] == 3
    generate.main(args)                                          # no --seed: a new random draw, as always
    assert json.loads(out.with_suffix(".json").read_text())["seed"] != 11


def test_a_full_disk_leaves_no_half_written_sample_and_a_rerun_recovers(run_dir, tmp_path):
    fu.context()
    out = tmp_path / "out"
    args = [f"--run={run_dir}", "--prompt=soft piano", "--duration=0.3", "--seed=3", f"--out={out}/"]
    proc = fu.Training(args, tmp_path / "log.txt", target="generate.py", fault="fsize=8000")  # the wav is ~19 kB
    assert proc.wait(120) == 2, proc.output()
    (line,) = [x for x in proc.output().splitlines() if x.startswith("error: ")]
    assert f"could not write {out / '000.wav'}: File too large" in line and "--seed=3" in line
    assert not list(out.iterdir())
    generate.main(args)                                          # space again: the same command works
    assert sorted(p.name for p in out.iterdir()) == ["000.json", "000.wav"]


def test_a_json_that_cannot_be_written_takes_its_wav_with_it(run_dir, tmp_path, monkeypatch):
    real = env.write_atomic

    def full_for_json(path, write, advice=""):
        if Path(path).suffix == ".json":
            raise UserError(f"could not write {path}: No space left on device{advice}")
        return real(path, write, advice)
    monkeypatch.setattr(env, "write_atomic", full_for_json)
    with pytest.raises(UserError, match="000.json: No space left on device"):
        generate.main([f"--run={run_dir}", "--prompt=soft piano", "--duration=0.2", f"--out={tmp_path}/"])
    assert not list(tmp_path.glob("000.*"))


def test_quantized_generation_records_its_mode_and_is_not_mistaken_for_float_files(run_dir, tmp_path, capsys):
    """--quantize=int8: the decode step runs on int8 weights (quantize.py), the .json says so, and a float file of the
    same prompt and seed is not taken for the quantized one (nor the reverse): the mode is part of what makes a file."""
    args = [f"--run={run_dir}", "--prompt=slow calm strings", "--duration=0.3", "--seed=7", f"--out={tmp_path}/"]
    assert generate.main(args) == 0
    float_wav = sf.read(tmp_path / "000.wav")[0]
    assert json.loads((tmp_path / "000.json").read_text())["quantize"] == ""
    capsys.readouterr()
    assert generate.main(args + ["--quantize=int8"]) == 0
    out = capsys.readouterr().out
    assert "| int8 weights" in out and "already made" not in out
    meta = json.loads((tmp_path / "000.json").read_text())
    assert meta["quantize"] == "int8" and "--quantize=int8" in meta["command"]
    q = sf.read(tmp_path / "000.wav")[0]
    assert q.shape == float_wav.shape and np.abs(q).max() > 0
