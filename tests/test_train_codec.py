"""train_codec.py: each loss and the balancer on known inputs, the VQ's EMA updates and dead codes, the discriminator,
a few-step run that lowers the loss, checkpoints and resumes bit for bit, and exports that load elsewhere.

    python -m pytest tests/test_train_codec.py -q --durations=5
"""
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import codec as codec_lib
import demo
import env
import formats
import train_codec as tc
from codec import CodecConfig
from env import UserError
from test_train import _free_port, only_run_dir, wait_for_log

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(2)
TINY_CODEC = CodecConfig(sample_rate=8000, ratios=(4, 2), n_filters=2, dimension=4, lstm=1, n_q=2, card=8,
                         pad_mode="constant")
# A codec and a discriminator small enough that an update takes milliseconds, on 0.128 s segments at 8 kHz.
TINY = ["--sample_rate=8000", "--ratios=[4,4,2]", "--n_filters=4", "--dimension=8", "--lstm=1", "--n_q=2",
        "--card=16", "--segment_duration=0.128", "--batch_size=4", "--disc_filters=4", "--disc_n_ffts=[256,128]",
        "--kmeans_iters=5", "--lr=3e-3", "--epochs=2", "--updates_per_epoch=6", "--log_every=2", "--generate_every=2",
        "--generate_count=2", "--generate_duration=0.5", "--num_workers=0"]


def sine(freq, seconds=0.5, sr=8000, amp=0.5):
    t = torch.arange(int(seconds * sr)) / sr
    return (amp * torch.sin(2 * math.pi * freq * t))[None, None]   # [1, 1, S]


# ----------------------------------------------------------------------------------------------------------
# Losses and metrics

def test_mel_spectrogram_matches_a_numpy_reference():
    """AudioCraft's conventions, computed independently: reflect padding, zeros to a full last frame, periodic
    Hann window, power normalised by the window's energy, HTK triangular filters from f_min to Nyquist."""
    sr, n_fft, hop, n_mels, f_min = 8000, 256, 64, 16, 64.0
    x = torch.randn(1, 1, 1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = tc.mel_spectrogram(x, sr, n_fft, hop, n_mels=n_mels, f_min=f_min, normalized=True)[0].numpy()
    xp = np.pad(x[0, 0].numpy(), (n_fft - hop) // 2, mode="reflect")
    frames = math.ceil((len(xp) - n_fft) / hop) + 1
    xp = np.pad(xp, (0, (frames - 1) * hop + n_fft - len(xp)))
    w = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    power = np.stack([np.abs(np.fft.rfft(xp[i * hop:i * hop + n_fft] * w)) ** 2 for i in range(frames)], 1)
    power /= (w ** 2).sum()
    mel = lambda f: 2595 * np.log10(1 + f / 700)  # noqa: E731
    edges = 700 * (10 ** (np.linspace(mel(f_min), mel(sr / 2), n_mels + 2) / 2595) - 1)
    freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    fb = np.zeros((n_mels, len(freqs)))
    for m in range(n_mels):
        lo, mid, hi = edges[m:m + 3]
        for k, f in enumerate(freqs):
            fb[m, k] = max(0.0, min((f - lo) / (mid - lo), (hi - f) / (hi - mid)))
    assert ours.shape == (n_mels, frames)
    np.testing.assert_allclose(ours, fb @ power, rtol=1e-5, atol=1e-9)


def test_losses_and_metrics_on_known_inputs():
    a, noise = sine(440.0), 0.3 * torch.randn(1, 1, 4000, generator=torch.Generator().manual_seed(1))
    # identical signals: nothing to learn
    assert tc.msspec_loss(a, a, 8000) == 0 and tc.mel_distance(a, a, 8000) == 0
    # twice as loud where every mel bin is far above the floor (noise): 4x the power, log10(4) apart
    assert float(tc.mel_distance(2 * noise, noise, 8000)) == pytest.approx(math.log10(4), rel=1e-3)
    # (at n_fft 64 some of the 64 mel filters are empty: silent in both, they add nothing to the log term)
    expected = sum(3 * float(tc.mel_spectrogram(noise, 8000, 2 ** i, 2 ** i // 4, normalized=True).mean())
                   + math.log10(4) ** 2 * float((tc.mel_filters(2 ** i, 64, 8000, 64.0).sum(0) > 0).float().mean())
                   for i in range(6, 11)) / 10
    assert float(tc.msspec_loss(2 * noise, noise, 8000)) == pytest.approx(expected, rel=1e-3)
    # wrong pitch: an octave off is further than a semitone off, in both
    semitone, octave = sine(440 * 2 ** (1 / 12)), sine(880.0)
    assert tc.mel_distance(octave, a, 8000) > 2 * tc.mel_distance(semitone, a, 8000) > 0
    assert tc.msspec_loss(octave, a, 8000) > 2 * tc.msspec_loss(semitone, a, 8000) > 0
    # SI-SNR: scale-invariant, and the SNR of a known additive noise
    assert tc.si_snr(3 * a, a) > 60 and tc.si_snr(-a, a) > 60
    quiet = 0.1 * noise
    expected = 10 * math.log10(float(a.square().sum()) / float(quiet.square().sum()))
    assert float(tc.si_snr(a + quiet, a)) == pytest.approx(expected, abs=0.5)
    assert tc.si_snr(noise, a) < -15
    assert tc.si_snr(torch.cat([a, noise]), torch.cat([a, a])).shape == (2,)


def test_msspec_has_finite_gradients_on_a_nearly_silent_output():
    """An untrained codec's output is nearly silent: the log terms' gradients there stay finite."""
    out = (1e-6 * torch.randn(1, 1, 2000, generator=torch.Generator().manual_seed(0))).requires_grad_()
    (tc.msspec_loss(out, sine(440.0, 0.25), 8000) + tc.mel_distance(out, sine(440.0, 0.25), 8000).sum()).backward()
    assert torch.isfinite(out.grad).all() and out.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------
# The discriminator and the adversarial losses

class FixedDiscriminator(torch.nn.Module):
    """Logits and feature maps given by hand: real audio is all ones here, fake audio its own values."""

    def __init__(self, logits):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.logits = logits

    def forward(self, wav):
        real = bool((wav == 1).all())
        logits = [(torch.full((2, 3), 2.0 if real else v) + wav.mean()) * self.w for v in self.logits]
        maps = [[wav * self.w, 2 * wav * self.w] for _ in self.logits]
        return logits, maps


def test_hinge_and_feature_matching_losses_on_known_logits():
    real, fake = torch.ones(2, 1, 8), torch.zeros(2, 1, 8, requires_grad=True)
    disc = FixedDiscriminator([-2.0, 0.5])   # scale 1: fake below -1 (no loss); scale 2: relu(1 + 0.5) = 1.5
    assert float(tc.discriminator_loss(disc, fake, real).detach()) == pytest.approx((0 + 0 + 0 + 1.5) / 2)
    adv, feat = tc.generator_losses(disc, fake, real)
    assert float(adv.detach()) == pytest.approx((2.0 - 0.5) / 2)  # -mean(fake logits), averaged over scales
    assert float(feat.detach()) == pytest.approx((1 + 2) / 2)      # L1 to the real maps, per scale then over scales
    adv.backward()
    assert disc.w.grad is None and fake.grad is not None          # read-only for the generator's losses
    assert disc.w.requires_grad                                    # and trainable again after


def test_multi_scale_stft_discriminator_shapes_and_gradients():
    disc = tc.MultiScaleSTFTDiscriminator(channels=1, filters=4, n_ffts=(256, 128))
    wav = torch.randn(2, 1, 2048, requires_grad=True)
    logits, fmaps = disc(wav)
    assert len(logits) == len(fmaps) == 2 and all(len(f) == 5 for f in fmaps)
    frames = [(2048 - n) // (n // 4) + 1 for n in (256, 128)]
    assert [tuple(x.shape[:3]) for x in logits] == [(2, 1, t) for t in frames]
    assert logits[0].shape[-1] == math.ceil((256 // 2 + 1) / 8)     # three frequency strides of 2
    sum(x.mean() for x in logits).backward()
    assert torch.isfinite(wav.grad).all() and wav.grad.abs().sum() > 0
    names = [n for n, _ in disc.named_parameters()]
    assert any("parametrizations.weight.original0" in n for n in names)   # weight norm, as AudioCraft's


# ----------------------------------------------------------------------------------------------------------
# The balancer

def test_balancer_gives_each_loss_its_share_of_the_gradient():
    y = torch.randn(4, 1, 50, requires_grad=True)
    z = torch.randn(3, requires_grad=True)                       # the commitment loss's own input
    big, small = lambda: 1000 * y.square().sum(), lambda: 1e-3 * y.sum()   # noqa: E731
    b = tc.Balancer({"big": 3.0, "small": 1.0}, total_norm=2.0, decay=0.5)
    g_big, g_small = 2000 * y.detach(), torch.full_like(y, 1e-3)
    per_item = lambda g: g.flatten(1).norm(dim=1).mean()          # noqa: E731
    scales = b.backward({"big": big(), "small": small()}, y, extra=[(z.sum(), 0.25)])
    expected = 2.0 * 0.75 * g_big / per_item(g_big) + 2.0 * 0.25 * g_small / per_item(g_small)
    torch.testing.assert_close(y.grad, expected)
    assert scales["big"] == pytest.approx(2.0 * 0.75 / float(per_item(g_big)), rel=1e-6)
    # whatever the losses' scales (a million apart), each one's part of the gradient has norm total_norm x share
    assert float(per_item(scales["big"] * g_big)) == pytest.approx(1.5) and \
        float(per_item(scales["small"] * g_small)) == pytest.approx(0.5)
    torch.testing.assert_close(z.grad, torch.full((3,), 0.25))    # extra losses pass through unbalanced
    # the norms follow a bias-corrected EMA over steps (flashy's averager)
    y.grad = None
    b.backward({"big": 10 * big(), "small": small()}, y)
    n1, n2 = float(per_item(g_big)), float(per_item(10 * g_big))
    avg = (0.5 * n1 + n2) / (0.5 + 1)
    torch.testing.assert_close(y.grad, 2.0 * 0.75 * 10 * g_big / avg + 2.0 * 0.25 * g_small / per_item(g_small))
    state = b.state_dict()
    again = tc.Balancer({"big": 3.0, "small": 1.0}, total_norm=2.0, decay=0.5)
    again.load_state_dict(json.loads(json.dumps(state)))          # plain floats: it travels in a checkpoint
    assert again.totals == b.totals and again.fix == b.fix


# ----------------------------------------------------------------------------------------------------------
# The residual VQ in training

def test_kmeans_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    x = centers.repeat(50, 1) + 0.1 * torch.randn(200, 2, generator=g)
    found, counts = tc.kmeans(x, 4, 10, torch.Generator().manual_seed(1))
    order = found[:, 0].argsort(stable=True)
    assert torch.cdist(found, centers).min(0).values.max() < 0.1 and counts.sum() == 200 and (counts == 50).all()


def test_codebook_ema_update_follows_audiocraft_formula():
    m = tc.TrainableCodec(TINY_CODEC, decay=0.9, dead_code_threshold=0.0)
    books = torch.arange(32, dtype=torch.float32).view(8, 4)
    m.codec.codebooks[0] = books
    m.embed_avg[0] = books * 3
    m.cluster_size[0] = torch.full((8,), 3.0)
    r = torch.stack([books[1] + 0.1, books[1] - 0.1, books[5] + 0.2])       # two vectors for code 1, one for 5
    idx = tc.nearest(r, books)
    assert idx.tolist() == [1, 1, 5]
    m._update(0, r, idx, torch.Generator().manual_seed(0), None)
    counts = torch.zeros(8).index_add_(0, idx, torch.ones(3))
    sums = torch.zeros(8, 4).index_add_(0, idx, r)
    size = 0.9 * 3.0 + 0.1 * counts
    avg = 0.9 * books * 3 + 0.1 * sums
    n = size.sum()
    torch.testing.assert_close(m.cluster_size[0], size)
    torch.testing.assert_close(m.embed_avg[0], avg)
    torch.testing.assert_close(m.codec.codebooks[0], avg / ((size + 1e-5) / (n + 8 * 1e-5) * n)[:, None])
    assert (m.codec.codebooks[1] == 0).all()      # other stages untouched


def test_dead_codes_take_vectors_of_the_batch_and_keep_them():
    """A code used less than `threshold` x the average code's count becomes one of the batch's vectors, and stays so
    through the same step's normalisation (AudioCraft's replacement is overwritten by it)."""
    m = tc.TrainableCodec(TINY_CODEC, decay=0.99, dead_code_threshold=0.3)   # 20 vectors, 8 codes: dead below 0.75
    books = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    m.codec.codebooks[0], m.embed_avg[0] = books, books * 5
    m.cluster_size[0] = torch.tensor([5.0, 5, 5, 0.5, 5, 5, 0.1, 5])      # codes 3 and 6 are dead
    r = 100 + torch.randn(20, 4, generator=torch.Generator().manual_seed(1))  # far from every codeword
    idx = tc.nearest(r, books)
    m._update(0, r, idx, torch.Generator().manual_seed(2), None)
    for code in (3, 6):
        distance = (r - m.codec.codebooks[0, code]).norm(dim=1).min()
        assert distance < 1e-3 * r.norm(dim=1).min(), code                 # one of the batch's vectors
        assert m.cluster_size[0, code] == pytest.approx(0.99 * 2.5 + 0.01 * float((idx == code).sum()))
    alive = [c for c in range(8) if c not in (3, 6) and not (idx == c).any()]
    assert alive and all((m.codec.codebooks[0, c] - books[c]).abs().max() < 1e-2 for c in alive)


def test_quantize_starts_from_kmeans_passes_gradients_straight_through_and_matches_inference():
    torch.manual_seed(0)
    m = tc.TrainableCodec(TINY_CODEC, kmeans_iters=5).train()
    z = torch.randn(2, 4, 30, requires_grad=True)
    out, codes, commit = m.quantize(z, 2, torch.Generator().manual_seed(0))
    assert m.inited.tolist() == [1.0, 1.0] and (m.codec.codebooks.abs().sum((1, 2)) > 0).all()
    assert codes.shape == (2, 2, 30) and commit > 0
    out.sum().backward()
    torch.testing.assert_close(z.grad, torch.ones_like(z))                # straight through the whole stack
    z.grad = None
    commit.backward()
    assert z.grad.abs().sum() > 0                                         # the commitment loss pulls the encoder
    m.eval()
    before = m.codec.codebooks.clone()
    out, codes, _ = m.quantize(z.detach(), 2)
    assert torch.equal(m.codec.codebooks, before)                         # eval: no update
    assert torch.equal(codes, m.codec._quantize(z.detach(), 100))         # the inference path's codes
    torch.testing.assert_close(out, m.codec._dequantize(codes))
    _, fewer, _ = m.quantize(z.detach(), 1)
    assert torch.equal(fewer, codes[:, :1])                               # quantizer dropout keeps the first stages


def test_weight_norm_trains_and_folds_into_the_inference_codec():
    torch.manual_seed(0)
    m = tc.TrainableCodec(TINY_CODEC).train()
    names = [n for n, _ in m.named_parameters()]
    assert any(n.endswith("parametrizations.weight.original0") for n in names)   # g and v are what Adam updates
    wav = 0.5 * torch.randn(2, 1, 800)
    out, codes, commit = m(wav, 2, torch.Generator().manual_seed(0))
    assert out.shape == wav.shape and codes.shape == (2, 2, 100)
    (F.l1_loss(out, wav) + commit).backward()
    assert all(p.grad is not None for p in m.parameters())
    plain = codec_lib.Codec(TINY_CODEC)
    plain.load_state_dict(m.fold())
    m.eval()
    assert torch.equal(plain.encode(wav), m.codec.encode(wav))
    torch.testing.assert_close(plain.decode(codes), m.codec.decode(codes))


# ----------------------------------------------------------------------------------------------------------
# Config checks

def test_hop_must_divide_segments_and_segments_must_hold_the_windows():
    cfg = env.parse_config(tc.Config, TINY)
    tc.validate(cfg)
    with pytest.raises(UserError, match=r"segment_duration=0.13 s is 1040 samples at 8000 Hz, not a whole number of "
                                        r"the codec's hop 32 .*use a multiple of 0.004 s"):
        tc.validate(env.parse_config(tc.Config, TINY + ["--segment_duration=0.13"]))
    with pytest.raises(UserError, match="must hold at least 1024 samples \\(the longest STFT window\\)"):
        tc.validate(env.parse_config(tc.Config, TINY + ["--segment_duration=0.016"]))
    with pytest.raises(UserError, match='unknown key "n_filter" \\(did you mean "n_filters"\\?\\)'):
        env.parse_config(tc.Config, ["--n_filter=4"])
    with pytest.raises(UserError, match="ratios=\\[0\\] must be positive integers"):
        tc.validate(env.parse_config(tc.Config, TINY + ["--ratios=[0]"]))
    assert tc.config_signature(tc.Config()) != env.signature({})   # apart from LM runs' signatures


# ----------------------------------------------------------------------------------------------------------
# Runs

@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("codec_data")
    return demo.make_demo_set(root / "demo", seed=0, sizes={"train": 6, "valid": 2, "evaluate": 1, "generate": 2})


def run(argv, runs, dataset, wait=True, extra_env=None):
    cmd = [sys.executable, str(ROOT / "train_codec.py")] + argv + [f"--runs_dir={runs}", f"--dataset={dataset}"]
    e = dict(os.environ, OMP_NUM_THREADS="1", **(extra_env or {}))
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=300)


def test_few_step_run_lowers_the_loss_and_goes_through_every_stage(tmp_path, dataset):
    """AudioCraft's recipe without the GAN (the resume test below trains one): the valid reconstruction improves."""
    argv = TINY + ["--epochs=4", "--updates_per_epoch=10", "--log_every=5", "--adv=0", "--feat=0"]
    r = run(argv, tmp_path, dataset)
    assert r.returncode == 0, r.stdout + r.stderr
    d = only_run_dir(tmp_path)
    rows = [json.loads(line) for line in (d / "history.jsonl").read_text().splitlines()]
    assert [(row["epoch"], row["stage"]) for row in rows] == [(e, s) for e in (1, 2, 3, 4) for s in ("train", "valid")]
    train = [row for row in rows if row["stage"] == "train"]
    assert all(k in train[0] for k in ("l1", "msspec", "commit")) and "adv" not in train[0]
    assert train[-1]["msspec"] < 0.8 * train[0]["msspec"], train
    valid = [row for row in rows if row["stage"] == "valid"]
    assert all(math.isfinite(row[k]) for row in valid for k in ("sisnr", "mel", "l1", "msspec"))
    assert valid[-1]["mel"] < valid[0]["mel"] and valid[-1]["sisnr"] > valid[0]["sisnr"], valid
    assert sorted(p.name for p in (d / "samples" / "2").iterdir()) == [
        "000.json", "000.wav", "000_reference.wav", "001.json", "001.wav", "001_reference.wav"]
    assert (d / "status").read_text().split() == ["done"]
    log = (d / "log.txt").read_text()
    assert "epoch 1 step 5/10 | l1" in log and "valid    | l1" in log and "x real time" in log
    config = json.loads((d / "config.json").read_text())
    assert config["signature"] == d.name and config["n_filters"] == 4
    again = run(argv, tmp_path, dataset)
    assert again.returncode == 0 and "already finished 4 epochs" in again.stdout


def test_resume_after_sigterm_matches_uninterrupted_run(tmp_path, dataset):
    argv = TINY + ["--q_dropout=True", "--generate_every=0"]
    straight = run(argv, tmp_path / "a", dataset)
    assert straight.returncode == 0, straight.stdout + straight.stderr
    proc = run(argv, tmp_path / "b", dataset, wait=False)
    wait_for_log(tmp_path / "b", "epoch 1 step 2/6", proc)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == tc.EXIT_REQUEUE, out
    d = only_run_dir(tmp_path / "b")
    assert (d / "status").read_text().split() == ["preempted"]
    stopped = torch.load(d / "checkpoint.pt", weights_only=True)
    assert 2 <= stopped["step"] < 12
    resumed = run(argv, tmp_path / "b", dataset)
    assert resumed.returncode == 0 and f"resumed from checkpoint.pt: epoch {stopped['epoch']}" in resumed.stdout
    a = torch.load(only_run_dir(tmp_path / "a") / "checkpoint.pt", weights_only=True)
    b = torch.load(d / "checkpoint.pt", weights_only=True)
    for part in ("model", "disc", "best_state"):
        assert a[part].keys() == b[part].keys() and all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert all(torch.equal(a["ema"]["state"][k], b["ema"]["state"][k]) for k in a["ema"]["state"])
    assert a["balancer"] == b["balancer"] and a["step"] == b["step"] == 12


def test_trained_codec_tokenizes_and_exports_to_audiocraft_and_transformers(tmp_path, dataset, monkeypatch):
    r = run(TINY + ["--epochs=1", "--adv=0", "--feat=0", "--generate_every=0"], tmp_path / "runs", dataset)
    assert r.returncode == 0, r.stdout + r.stderr
    d = only_run_dir(tmp_path / "runs")
    wav = 0.3 * torch.randn(2, 1, 4000, generator=torch.Generator().manual_seed(0))
    by_dir = formats.load_codec(d)
    monkeypatch.setenv("AUDIOCRAFT_DORA_DIR", str(tmp_path / "runs"))
    env.reset()
    by_sig = formats.load_codec(d.name)
    codes = by_dir.encode(wav)
    assert by_dir.identity() == by_sig.identity() and torch.equal(by_sig.encode(wav), codes)
    assert (by_dir.sample_rate, by_dir.hop, by_dir.n_q, by_dir.card) == (8000, 32, 2, 16)
    # the checkpoint's EMA weights, folded: what the run validated
    ckpt = torch.load(d / "checkpoint.pt", weights_only=True)
    m = tc.TrainableCodec(by_dir.cfg)
    m.load_state_dict(ckpt["ema"]["state"])
    assert torch.equal(m.eval().codec.encode(wav), codes)
    # AudioCraft's compression_state_dict.bin and a Hugging Face directory give the same codes
    ac = formats.export_audiocraft_codec(by_dir, tmp_path / "compression_state_dict.bin")
    assert torch.equal(formats.load_codec(ac).encode(wav), codes)
    hf_dir = formats.export_hf_codec(by_dir, tmp_path / "hf")
    assert torch.equal(formats.load_codec(hf_dir).encode(wav), codes)
    from transformers import EncodecModel
    hf = EncodecModel.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        hf_codes = hf.encode(wav).audio_codes[0]
        hf_wav = hf.decode(hf_codes[None], [None]).audio_values
    assert torch.equal(hf_codes, codes)
    torch.testing.assert_close(hf_wav, by_dir.decode(codes), atol=1e-5, rtol=1e-4)
    with pytest.raises(UserError, match="not a codec's"):
        lm_run = tmp_path / "lm"
        lm_run.mkdir()
        torch.save({"model": {}}, lm_run / "checkpoint.pt")
        formats.load_codec(lm_run)


def test_two_processes_match_one_process(tmp_path, dataset):
    """Gradients averaged over ranks, codebook statistics summed, k-means and dead codes on the gathered batch, the
    discriminator's coin and the quantizer dropout drawn alike: two processes compute what one does. (Adam's first
    steps move each weight by about lr x the sign of its gradient, so a weight whose gradient is within float
    rounding of zero may differ: a few of them, not the rest.)"""
    argv = TINY + ["--epochs=1", "--updates_per_epoch=1", "--q_dropout=True", "--generate_every=0"]
    one = run(argv, tmp_path / "one", dataset)
    assert one.returncode == 0, one.stdout + one.stderr
    port = str(_free_port())
    procs = [run(argv, tmp_path / "two", dataset, wait=False, extra_env={
        "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
        for r in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "batch 4 = 2 x 2 segments" in outs[0]
    a, b = (torch.load(only_run_dir(tmp_path / n) / "checkpoint.pt", weights_only=True) for n in ("one", "two"))
    rows = [row for row in a["history"] if row["stage"] == "train"], [row for row in b["history"] if row["stage"] == "train"]
    for k in ("l1", "msspec", "adv", "feat", "d_loss", "commit"):
        assert rows[1][0][k] == pytest.approx(rows[0][0][k], rel=1e-4), k   # the losses of the whole global batch
    for k in ("codec.codebooks", "cluster_size", "embed_avg"):
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-5)
    for part in ("model", "disc"):
        weights = [k for k in a[part] if "parametrizations" in k or k.endswith("bias")]
        differ = sum(int(((a[part][k] - b[part][k]).abs() > 1e-5).sum()) for k in weights)
        assert differ < 0.01 * sum(a[part][k].numel() for k in weights), part


def test_train_codec_ends_its_process_the_way_train_py_does(tmp_path, monkeypatch):
    """One entry-point ending (train.run_to_exit) for train.py and train_codec.py: a stop before the loop marks the
    run preempted, a bad input is exit 2 in log.txt and marks it failed. train_codec.py once left the status alone
    in both cases, and under several ranks lost the traceback of a crash to os._exit."""
    import types
    import train
    from env import Stopped
    d = types.SimpleNamespace(main=True, rank=0, world_size=1)
    (tmp_path / "log.txt").write_text("")

    def stop():
        raise Stopped("SIGTERM")

    def bad():
        raise UserError("dataset x: no such directory")
    assert train.run_to_exit(d, tmp_path, stop) == tc.EXIT_REQUEUE
    assert (tmp_path / "status").read_text().split() == ["preempted"]
    assert train.run_to_exit(d, tmp_path, bad) == 2
    assert (tmp_path / "status").read_text().split() == ["failed"]
    assert "error: dataset x: no such directory" in (tmp_path / "log.txt").read_text()
    monkeypatch.setattr(tc, "train", lambda cfg, d: stop())
    monkeypatch.setattr(tc, "setup_distributed", lambda cfg: d)
    monkeypatch.setattr(tc.env, "run_dir", lambda sig, runs=None: tmp_path)
    assert tc.main(TINY) == tc.EXIT_REQUEUE and (tmp_path / "status").read_text().split() == ["preempted"]
