"""metrics.py and melody.py against their references, built with random weights (nothing is downloaded):
torchvggish's model and mel features (FAD), scipy's sqrtm formula (Google's FAD tool), hear21passt's PaSST with
Kaldi mel banks measured from kaldi-native-fbank (KLD), transformers' CLAP (CLAP score), transformers' and
AudioCraft's chroma definitions (chroma cosine). Then known answers, bad weights, and the command line."""
import contextlib
import io
import json
import math
import sys
import types
import warnings

import numpy as np
import pytest
import torch

import env
import melody
import metrics

torch.set_num_threads(2)


def noise(seconds, rate, seed=0, scale=0.3):
    return torch.randn(int(seconds * rate), generator=torch.Generator().manual_seed(seed)) * scale


def tone(seconds, rate, hz, partials=(1.0, 0.5, 0.25)):
    t = torch.arange(int(seconds * rate), dtype=torch.float64) / rate
    return sum(a * torch.sin(2 * math.pi * hz * (k + 1) * t) for k, a in enumerate(partials)).float() * 0.3


def randomize(module, scale, seed=0):
    """Replace every parameter with noise (LayerNorm scales around 1), so that no mapping hides behind an init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if "norm" in name and name.endswith("weight")
                                                                 or name.startswith("head.0.weight") else 0.0))
    return module


# ----------------------------------------------------------------------------------------------------------
# FAD: VGGish front end and network against torchvggish, the Fréchet distance against scipy

@pytest.fixture
def torchvggish(monkeypatch):
    """torchvggish 0.2 imports resampy at the top, which we neither need (our inputs are at 16 kHz) nor install."""
    monkeypatch.setitem(sys.modules, "resampy", types.ModuleType("resampy"))
    from torchvggish import mel_features, torchvggish
    return types.SimpleNamespace(mel_features=mel_features, model=torchvggish)


def google_fad_examples(wav, mel_features):
    """What Google's FAD tool (AudioSetModel.extract_features, model_step_size 8000) feeds VGGish, with torchvggish's
    copy of the AudioSet mel code: peak-normalise, 1 s windows every 0.5 s, each framed into 0.96 s patches."""
    x = wav.double().numpy()
    x = x / max(0.1 / 32768, x.max())
    patches = []
    for start in range(0, len(x) - 16000 + 1, 8000):
        log_mel = mel_features.log_mel_spectrogram(x[start:start + 16000], audio_sample_rate=16000, log_offset=0.01,
                                                   window_length_secs=0.025, hop_length_secs=0.010, num_mel_bins=64,
                                                   lower_edge_hertz=125, upper_edge_hertz=7500)
        patches.append(mel_features.frame(log_mel, window_length=96, hop_length=96))
    return np.concatenate(patches)


def test_vggish_examples_match_google_fad_front_end(torchvggish):
    wav = noise(3.7, 16000) + tone(3.7, 16000, 220.0)
    ours = metrics.vggish_examples(wav)
    ref = google_fad_examples(wav, torchvggish.mel_features)
    assert ours.shape == ref.shape == (6, 96, 64)      # windows at 0, 0.5, ... 2.5 s
    np.testing.assert_allclose(ours.numpy(), ref, atol=2e-6)
    assert metrics.vggish_examples(noise(0.99, 16000)).shape == (0, 96, 64)   # under 1 s: nothing, as the tool
    # the tool scales each clip to a positive peak of 1: loudness does not change the embedding inputs
    np.testing.assert_allclose(metrics.vggish_examples(0.1 * wav).numpy(), ours.numpy(), atol=1e-5)


def test_vggish_matches_torchvggish_without_its_last_relu(torchvggish):
    torch.manual_seed(0)
    ref = torchvggish.model._vgg(postprocess=False).eval()        # torch's init: random weights and biases
    ours = metrics.VGGish().eval()
    ours.load_state_dict(ref.state_dict())                        # torchvggish's key names load as they are
    examples = metrics.vggish_examples(noise(2.5, 16000) + tone(2.5, 16000, 440.0))
    with torch.no_grad():
        with_relu = ref(examples[:, None])
        ref.embeddings = ref.embeddings[:-1]                      # what the PyTorch FAD tools do (use_activation=False)
        without = ref(examples[:, None])
        got = ours(examples)
    assert (without < 0).any()                                    # so the ReLU would matter
    torch.testing.assert_close(got, without, rtol=1e-5, atol=1e-5 * without.abs().max().item())
    torch.testing.assert_close(torch.relu(got), with_relu, rtol=1e-5, atol=1e-5 * without.abs().max().item())


def scipy_fad(a, b):
    """Google's fad_utils.frechet_distance on np.cov statistics, with its sqrtm of the product."""
    from scipy import linalg
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a.dot(cov_b))
    return float((mu_a - mu_b) @ (mu_a - mu_b) + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(root.real))


def test_frechet_distance_matches_scipy_and_streams():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 24, generator=g, dtype=torch.float64) @ torch.randn(24, 24, generator=g, dtype=torch.float64)
    b = torch.randn(300, 24, generator=g, dtype=torch.float64) * 1.5 + 0.3
    expected = scipy_fad(a.numpy(), b.numpy())
    assert metrics.frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    moments = [metrics.Moments(24), metrics.Moments(24)]
    for m, x in zip(moments, (a, b)):
        for chunk in x.split(37):                # batch by batch, as the evaluator feeds it
            m.add(chunk)
    assert metrics.frechet_distance_stats(*moments[0].mean_cov(), *moments[1].mean_cov()) == pytest.approx(
        expected, rel=1e-9)


def test_frechet_distance_known_answers():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(500, 16, generator=g, dtype=torch.float64)
    assert abs(metrics.frechet_distance(a, a)) < 1e-9 * torch.cov(a.T).trace()
    shift = torch.randn(16, generator=g, dtype=torch.float64)
    assert metrics.frechet_distance(a, a + shift) == pytest.approx(float(shift.square().sum()), rel=1e-9)
    assert metrics.frechet_distance(a, 2 * a) > 1.0                # a wider set is farther


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    """A //reference directory with random VGGish weights (torchvggish's layout, 289 MB) and a small PaSST."""
    root = tmp_path_factory.mktemp("reference")
    (root / "fad").mkdir()
    (root / "kld").mkdir()
    torch.manual_seed(0)
    torch.save(metrics.VGGish().state_dict(), root / "fad" / "vggish-10086976.pth")
    torch.save(randomize(metrics.PaSST(time_positions=99, dim=64, depth=2, n_classes=527), 0.1).state_dict(),
               root / "kld" / "passt-s-f128-20sec-p16-s10-ap.474-swa.pt")
    return root


@pytest.fixture
def with_reference(reference_dir, monkeypatch):
    monkeypatch.setenv("AUDIOCRAFT_REFERENCE_DIR", str(reference_dir))
    env.reset()
    return reference_dir


def test_fad_of_audio_with_itself_is_zero_and_noise_raises_it(with_reference):
    clips = torch.stack([tone(1.5, 32000, 220.0 * (i + 1)) + noise(1.5, 32000, i, 0.05) for i in range(4)])[:, None]
    ev = metrics.Evaluator("fad", 32000)
    ev.add(generated=clips, reference=clips)
    same = ev.result()["fad"]
    cov_trace = float(ev.moments["reference"].mean_cov()[1].trace())
    assert ev.moments["generated"].n == 4 * 2                    # 1.5 s: windows at 0 and 0.5 s
    assert abs(same) < 1e-6 * cov_trace                          # 8 embeddings in 128-d: singular covariances
    ev.moments["generated"] = metrics.Moments(128)
    ev.add(generated=clips + 0.2 * torch.randn_like(clips))
    assert ev.result()["fad"] > 1e-3 * cov_trace


def test_fad_padding_after_lengths_is_ignored(with_reference):
    clips = torch.stack([tone(1.5, 32000, 330.0), noise(1.5, 32000)])[:, None]
    padded = torch.cat([clips, torch.ones(2, 1, 16000)], -1)
    ev = metrics.Evaluator("fad", 32000)
    ev.add(generated=clips, reference=clips.flip(0))
    unpadded = ev.result()["fad"]
    ev.moments = {"generated": metrics.Moments(128), "reference": metrics.Moments(128)}
    ev.add(generated=padded, lengths=[48000, 48000])
    ev.add(reference=padded.flip(0), lengths=[48000, 48000])
    assert ev.result()["fad"] == pytest.approx(unpadded, rel=1e-9)


# ----------------------------------------------------------------------------------------------------------
# KLD: PaSST against hear21passt

def kaldi_native_mel_banks(num_bins, window_length_padded, sample_freq, low_freq, high_freq, **vtln):
    """torchaudio.compliance.kaldi.get_mel_banks's answer measured from Kaldi's own MelBanks (kaldi-native-fbank):
    with a rectangular window and no pre-processing, a cosine at FFT bin j has power (N/2)^2 at bin j alone, so
    the linear filter-bank energies of that frame are column j of the matrix times (N/2)^2."""
    import kaldi_native_fbank as knf
    n_fft = window_length_padded
    opts = knf.FbankOptions()
    frame = opts.frame_opts
    frame.samp_freq, frame.frame_length_ms = sample_freq, n_fft * 1000 / sample_freq
    frame.frame_shift_ms, frame.dither, frame.preemph_coeff = frame.frame_length_ms, 0.0, 0.0
    frame.remove_dc_offset, frame.window_type = False, "rectangular"
    opts.mel_opts.num_bins, opts.mel_opts.low_freq, opts.mel_opts.high_freq = num_bins, low_freq, high_freq
    opts.use_log_fbank, opts.use_power, opts.use_energy = False, True, False
    banks, n = np.zeros((num_bins, n_fft // 2)), np.arange(n_fft)
    for j in range(1, n_fft // 2):      # bin 0 (0 Hz) lies on the lowest edge: weight 0 in every filter
        fbank = knf.OnlineFbank(opts)
        fbank.accept_waveform(sample_freq, np.cos(2 * np.pi * j * n / n_fft).tolist())
        fbank.input_finished()
        banks[:, j] = np.asarray(fbank.get_frame(0)) / (n_fft / 2) ** 2
    return torch.from_numpy(banks).float(), torch.zeros(0)


@pytest.fixture
def hear21passt(monkeypatch):
    """hear21passt 0.0.26 with what it imports but cannot have here replaced: torchaudio (its wheels do not load
    beside torch 2.13+cpu) by Kaldi's mel banks and eval-mode no-op masks; timm (which imports torchvision) by the
    one download helper it names. Its models build with pretrained=False: random weights, nothing downloaded."""
    audio = types.ModuleType("torchaudio")
    audio.compliance = types.SimpleNamespace(kaldi=types.SimpleNamespace(get_mel_banks=kaldi_native_mel_banks))
    audio.transforms = types.SimpleNamespace(FrequencyMasking=lambda *a, **k: torch.nn.Identity(),
                                             TimeMasking=lambda *a, **k: torch.nn.Identity())
    hub = types.ModuleType("timm.models._hub")
    hub.download_cached_file = None
    for name, module in (("torchaudio", audio), ("timm", types.ModuleType("timm")),
                         ("timm.models", types.ModuleType("timm.models")), ("timm.models._hub", hub)):
        monkeypatch.setitem(sys.modules, name, module)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import hear21passt.base
        import hear21passt.base20sec
        from hear21passt.models.passt import PaSST

    def two_blocks_of_passt_s(arch, input_tdim=998, **kwargs):
        """What get_model(arch) builds for the 10 s and 20 s models (passt_s_swa_p16_128_ap476, passt_20sec), with
        2 of their 12 blocks: the same widths, heads and positions, a sixth of the time to build and run."""
        return PaSST(img_size=(128, input_tdim), patch_size=16, stride=(10, 10), in_chans=1, num_classes=527,
                     embed_dim=768, depth=2, num_heads=12, distilled=True)
    for base in (hear21passt.base, hear21passt.base20sec):
        monkeypatch.setattr(base, "get_model_passt", two_blocks_of_passt_s)
    return hear21passt


def test_kaldi_mel_banks_match_kaldi():
    ref = kaldi_native_mel_banks(128, 1024, 32000, 0.0, 15000.0)[0]
    ours = metrics.kaldi_mel_banks()
    assert ours.shape == (128, 513) and not ours[:, -1].any()
    np.testing.assert_allclose(ours[:, :-1].numpy(), ref.numpy(), atol=3e-5)   # Kaldi works in float32


@pytest.mark.parametrize("model, positions, seconds", [("base", 99, 10), ("base20sec", 200, 20)])
def test_passt_matches_hear21passt(hear21passt, tmp_path, model, positions, seconds):
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = getattr(hear21passt, model).get_basic_model(mode="logits").eval()   # AudioCraft's KLD model
        randomize(ref.net, 0.05)
        torch.save(ref.net.state_dict(), tmp_path / "passt.pt")
        ours = metrics.load_passt(tmp_path / "passt.pt")
        wav = torch.stack([noise(1.3, 32000), tone(1.3, 32000, 440.0)])
        with torch.no_grad():
            mel_ref, logits_ref = ref.mel(wav), ref(wav)
            mel, logits = metrics.passt_mel(wav), ours(metrics.passt_mel(wav))
    assert ours.time_new_pos_embed.shape[-1] == positions and ours.segment_samples == seconds * 32000
    torch.testing.assert_close(mel, mel_ref, atol=1e-4, rtol=0)   # the reference's mel banks are Kaldi's float32
    torch.testing.assert_close(logits, logits_ref, atol=1e-4, rtol=1e-4)
    assert logits.std() > 0.5                                      # random weights that do something


def audiocraft_kld(model, preds, targets, segment):
    """AudioCraft's PasstKLDivergenceMetric on mono 32 kHz clips of equal length: split, drop <= 0.15 s, softmax of
    each segment's logits, kl_div((p + 1e-6).log(), q) summed per segment, averaged over all segments."""
    def distributions(clips):
        probs = []
        for wav in clips:
            for s in torch.split(wav, segment):
                if s.shape[-1] > int(0.15 * 32000):
                    probs.append(torch.softmax(model(metrics.passt_mel(s[None])), -1).mean(0))
        return torch.stack(probs)
    p, q = distributions(preds), distributions(targets)
    kl = lambda a, b: torch.nn.functional.kl_div((a + 1e-6).log(), b, reduction="none").sum(-1)  # noqa: E731
    return float(kl(p, q).sum() / len(p)), float(kl(q, p).sum() / len(p))


def test_kld_follows_audiocraft_segments_and_aggregation(with_reference):
    ev = metrics.Evaluator("kld", 32000)
    ev.passt.time_new_pos_embed.data = ev.passt.time_new_pos_embed.data[..., :9]   # 1 s segments keep it quick
    assert ev.passt.segment_samples == 32000
    gen = torch.stack([tone(2.6, 32000, 440.0), noise(2.6, 32000, 1)])
    ref = torch.stack([tone(2.6, 32000, 660.0), noise(2.6, 32000, 2) + tone(2.6, 32000, 110.0)])
    with torch.no_grad():
        ev.add(generated=gen[:1, None], reference=ref[:1, None])
        ev.add(generated=gen[1:, None], reference=ref[1:, None])
        expected = audiocraft_kld(ev.passt, gen, ref, 32000)
    got = ev.result()
    assert ev.kld_segments == 2 * 3                    # 1 s, 1 s and 0.6 s per clip
    assert got["kld"] == pytest.approx(expected[0], rel=1e-5)
    assert got["kld_qp"] == pytest.approx(expected[1], rel=1e-5)
    assert got["kld_both"] == pytest.approx(sum(expected), rel=1e-5)
    assert got["kld"] > 1e-3


def test_kl_divergence_known_answers():
    p = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]], dtype=torch.float64)
    q = torch.tensor([[0.25, 0.25, 0.5], [0.2, 0.3, 0.5]], dtype=torch.float64)
    kl = metrics.kl_divergence(p, q)
    assert kl[0] == pytest.approx(0.25 * math.log(0.25 / 0.500001) * 2 + 0.5 * math.log(0.5 / 1e-6), rel=1e-9)
    assert kl[1] == pytest.approx(sum(x * math.log(x / (x + 1e-6)) for x in (0.2, 0.3, 0.5)), rel=1e-9)


def test_kld_drops_tails_of_015_s_or_less(with_reference):
    ev = metrics.Evaluator("kld", 32000)
    assert len(metrics.passt_segments(torch.zeros(320000 + 4800), 320000)) == 1
    assert len(metrics.passt_segments(torch.zeros(320000 + 4801), 320000)) == 2
    ev.add(generated=torch.zeros(1, 1, 4800), reference=torch.zeros(1, 1, 4800))
    with pytest.raises(env.UserError, match="no generated/reference pair was longer than 0.15 s"):
        ev.result()


# ----------------------------------------------------------------------------------------------------------
# CLAP score: our glue against transformers called directly, AudioCraft's way

def byte_level_tokenizer_files(directory):
    """vocab.json + merges.txt of a RoBERTa tokenizer with the 256 byte symbols and no merges."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])}
    for symbol in bytes_to_unicode().values():
        vocab.setdefault(symbol, len(vocab))
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return len(vocab)


@pytest.fixture(scope="module")
def clap_dir(tmp_path_factory):
    """A small random CLAP saved as a Hugging Face directory; its feature extractor keeps the library's default
    truncation ("fusion"), the trap an unfused model falls into."""
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, RobertaTokenizer
    d = tmp_path_factory.mktemp("clap")
    vocab = byte_level_tokenizer_files(d)
    RobertaTokenizer.from_pretrained(d).save_pretrained(d)
    torch.manual_seed(0)
    config = ClapConfig(text_config=dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, intermediate_size=64),
                        audio_config=dict(hidden_size=64, depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 1, 2],
                                          patch_embeds_hidden_size=8, enable_fusion=False),
                        projection_dim=16)
    randomize(ClapModel(config), 0.05).save_pretrained(d)
    ClapFeatureExtractor().save_pretrained(d)
    return d


def test_clap_matches_transformers_called_as_audiocraft_does(clap_dir):
    from transformers import ClapFeatureExtractor, ClapModel, RobertaTokenizer
    clips = torch.stack([tone(4.0, 48000, 330.0), noise(4.0, 48000, 3)])
    texts = ["a calm piano tune", "loud white noise, no melody at all"]
    ev = metrics.Evaluator("clap", 48000, clap=clap_dir)
    ev.add(generated=clips[:, None], descriptions=texts)
    model = ClapModel.from_pretrained(clap_dir).eval()
    features = ClapFeatureExtractor(truncation="rand_trunc", padding="repeatpad")(
        list(clips.numpy()), sampling_rate=48000, return_tensors="pt")
    tokens = RobertaTokenizer.from_pretrained(clap_dir)(texts, padding="max_length", truncation=True, max_length=77,
                                                        return_tensors="pt")
    with torch.no_grad():
        audio = model.get_audio_features(input_features=features["input_features"],
                                         is_longer=features["is_longer"]).pooler_output
        text = model.get_text_features(**tokens).pooler_output
    expected = torch.nn.functional.cosine_similarity(audio, text, dim=1, eps=1e-8)
    assert expected.abs().min() > 1e-3
    assert ev.result()["clap"] == pytest.approx(float(expected.mean()), rel=1e-5, abs=1e-6)


def test_clap_crops_long_clips_reproducibly(clap_dir):
    clap = metrics.Clap(clap_dir)
    ramp = torch.arange(12 * 48000, dtype=torch.float32)
    crops = [clap.crop(ramp, torch.Generator().manual_seed(0)) for _ in range(2)]
    assert crops[0].shape == (480000,) and torch.equal(crops[0], crops[1])
    assert torch.equal(crops[0], ramp[int(crops[0][0]):int(crops[0][0]) + 480000])   # one contiguous 10 s
    assert clap.crop(ramp[:1000], None).shape == (1000,)                               # shorter: the extractor repeats
    long = torch.stack([tone(12.0, 32000, 220.0)])[:, None]
    scores = []
    for _ in range(2):
        ev = metrics.Evaluator("clap", 32000, clap=clap_dir, seed=5)
        ev.add(generated=long, descriptions=["a drone"])
        scores.append(ev.result()["clap"])
    assert scores[0] == scores[1]


# ----------------------------------------------------------------------------------------------------------
# chroma: melody.py against transformers' filter bank and AudioCraft's ChromaExtractor definition

@pytest.mark.parametrize("rate, n_fft", [(32000, 2 ** 14), (44100, 2 ** 12), (16000, 2 ** 11)])
def test_chroma_filter_bank_matches_transformers(rate, n_fft):
    from transformers.audio_utils import chroma_filter_bank
    ref = chroma_filter_bank(num_frequency_bins=n_fft, num_chroma=12, sampling_rate=rate, tuning=0.0)
    np.testing.assert_allclose(melody.chroma_filter_bank(rate, n_fft).numpy(), ref, atol=1e-12)


def audiocraft_chroma(wav, rate, n_fft=2 ** 14):
    """AudioCraft's ChromaExtractor (radix2_exp 14, argmax off), spelled in numpy from its definition: zero-pad to one
    window, reflect-pad n_fft/2, periodic-Hann frames every n_fft/4, |rfft|^2 / sum(window^2) (torchaudio's
    normalized=True), librosa's chroma filters, each frame divided by max(its max, 1e-6)."""
    from transformers.audio_utils import chroma_filter_bank
    x = wav.double().numpy()
    if len(x) < n_fft:
        pad = n_fft - len(x)
        x = np.pad(x, (pad // 2, pad - pad // 2))
    x = np.pad(x, n_fft // 2, mode="reflect")
    hop = n_fft // 4
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    frames = np.stack([x[i:i + n_fft] for i in range(0, len(x) - n_fft + 1, hop)])
    power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2 / np.sum(window ** 2)
    raw = power @ chroma_filter_bank(n_fft, 12, rate, tuning=0.0).T
    return raw / np.maximum(raw.max(1, keepdims=True), 1e-6)


@pytest.mark.parametrize("seconds", [2.3, 0.2])   # the second is shorter than one window
def test_chroma_matches_audiocraft_definition(seconds):
    wav = tone(seconds, 32000, 261.63) + tone(seconds, 32000, 392.0) * 0.5 + noise(seconds, 32000, 0, 0.01)
    ref = audiocraft_chroma(wav, 32000)
    ours = melody.chroma(wav[None], 32000, argmax=False)[0]
    assert ours.shape == ref.shape == (1 + max(len(wav), 2 ** 14) // 4096, 12)
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-5)
    one_hot = melody.chroma(wav[None], 32000)[0]
    assert torch.equal(one_hot.argmax(-1), torch.from_numpy(ref.argmax(1)))
    assert torch.equal(one_hot.sum(-1), torch.ones(len(ref)))
    assert melody.PITCH_CLASSES[int(one_hot[len(one_hot) // 2].argmax())] == "C"


def test_chroma_cos_known_answers():
    c, fsharp = tone(3.0, 32000, 261.63), tone(3.0, 32000, 369.99)
    ev = metrics.Evaluator("chroma_cos", 32000)
    ev.add(generated=c[None, None], melodies=c[None, None])
    assert ev.result()["chroma_cos"] == pytest.approx(1.0)
    assert ev.chroma_frames == math.ceil(3.0 * 32000 / 4096)      # AudioCraft's ceil(length / hop) frames
    ev = metrics.Evaluator("chroma_cos", 32000)
    ev.add(generated=fsharp[None, None], melodies=c[None, None])
    assert ev.result()["chroma_cos"] == pytest.approx(0.0)
    half = torch.cat([c[:48000], fsharp[48000:]])
    ev = metrics.Evaluator("chroma_cos", 16000)                   # resampled to 32 kHz first
    ev.add(generated=torch.stack([c, half])[:, None, ::2], melodies=torch.stack([c, c])[:, None, ::2])
    assert 0.7 < ev.result()["chroma_cos"] < 0.8                  # 1 on the first clip, about half on the second


def test_reduce_sums_the_totals_of_every_process(with_reference, clap_dir):
    """Two ranks' evaluators, each fed half the batches, reduced (the all-reduce done by hand) give what one
    evaluator fed everything gives."""
    names = ("fad", "kld", "clap", "chroma_cos")
    clips = [torch.stack([tone(1.2, 32000, 110.0 * (i + 2)) + noise(1.2, 32000, i, 0.05)])[:, None] for i in range(4)]
    texts = [[f"tune {i}"] for i in range(4)]
    whole, ranks = metrics.Evaluator(names, 32000, clap=clap_dir), [metrics.Evaluator(names, 32000, clap=clap_dir)
                                                                   for _ in range(2)]
    for i, clip in enumerate(clips):
        for ev in (whole, ranks[i % 2]):
            ev.add(generated=clip, reference=clips[-1 - i], melodies=clips[-1 - i], descriptions=texts[i])
    vectors = []
    for ev in ranks:        # what an all-reduce sees: each rank's vector, and it hands back their sum
        ev.reduce(lambda x: vectors.append(x) or x)
    for ev in ranks:
        ev.reduce(lambda x: vectors[0] + vectors[1])
    expected = whole.result()
    for ev in ranks:
        got = ev.result()
        assert got.keys() == expected.keys()
        for key in expected:
            assert got[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-9), key


# ----------------------------------------------------------------------------------------------------------
# Bad weights and inputs: one line each

def test_missing_weights_say_what_to_put_where(tmp_path, monkeypatch):
    monkeypatch.setenv("AUDIOCRAFT_REFERENCE_DIR", str(tmp_path))
    env.reset()
    for name, file, option in (("fad", "vggish-10086976.pth", "--vggish"), ("kld", "passt-s-f128-20sec", "--passt"),
                               ("clap", "larger_clap_music", "--clap")):
        with pytest.raises(env.UserError) as e:
            metrics.Evaluator(name, 32000)
        message = str(e.value)
        assert "\n" not in message and str(tmp_path) in message and file in message
        assert f"{name} needs" in message and f"{option}=PATH" in message
    monkeypatch.setenv("AUDIOCRAFT_REFERENCE_DIR", str(tmp_path / "nope"))
    env.reset()
    with pytest.raises(env.UserError, match="reference directory .*nope does not exist.*fad needs"):
        metrics.Evaluator("fad", 32000)


def test_wrong_weights_files_are_one_line(with_reference, tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(env.UserError, match="garbage.pth: not a readable checkpoint.*expected torchvggish"):
        metrics.Evaluator("fad", 32000, vggish=garbage)
    passt = with_reference / "kld" / "passt-s-f128-20sec-p16-s10-ap.474-swa.pt"
    with pytest.raises(env.UserError, match=r"not VGGish weights \(.*missing features.0.weight"):
        metrics.Evaluator("fad", 32000, vggish=passt)
    with pytest.raises(env.UserError, match="not PaSST weights"):
        metrics.Evaluator("kld", 32000, passt=with_reference / "fad" / "vggish-10086976.pth")
    with pytest.raises(env.UserError, match="no config.json; clap expects a Hugging Face CLAP directory"):
        metrics.Evaluator("clap", 32000, clap=tmp_path)


def test_names_and_pairs_are_checked():
    with pytest.raises(env.UserError, match='unknown metric \'fda\' \\(did you mean "fad"\\?\\)'):
        metrics.parse_names("kld,fda")
    assert metrics.parse_names("fad, clap,fad") == ("fad", "clap")
    ev = metrics.Evaluator("chroma_cos", 32000)
    with pytest.raises(env.UserError, match="chroma_cos needs the melodies of each generated clip"):
        ev.add(generated=torch.zeros(1, 1, 100))
    with pytest.raises(env.UserError, match="chroma_cos: 2 melodies for 1 generated clips"):
        ev.add(generated=torch.zeros(1, 1, 100), melodies=torch.zeros(2, 1, 100))
    with pytest.raises(env.UserError, match="generated: expected float audio"):
        ev.add(generated=torch.zeros(1, 1, 100, dtype=torch.int16), melodies=torch.zeros(1, 1, 100))


def test_clap_refuses_generations_without_a_prompt(clap_dir):
    ev = metrics.Evaluator("clap", 32000, clap=clap_dir)
    with pytest.raises(env.UserError, match="clap: description 1 of the batch is empty"):
        ev.add(generated=torch.zeros(2, 1, 32000), descriptions=["piano", None])


# ----------------------------------------------------------------------------------------------------------
# The command line

def write_wav(path, wav, rate=32000, prompt=None):
    import data
    path.parent.mkdir(parents=True, exist_ok=True)
    data.save_audio(path, wav[None], rate)
    if prompt is not None:
        path.with_suffix(".json").write_text(json.dumps({"prompt": prompt, "seed": 1}))


def test_cli_writes_a_report_for_two_folders(with_reference, clap_dir, tmp_path, capsys):
    ref, gen = tmp_path / "ref", tmp_path / "gen"
    for i, hz in enumerate((220.0, 330.0, 440.0)):
        write_wav(ref / f"{i:03d}.wav", tone(1.2, 32000, hz))
        write_wav(gen / f"{i:03d}.wav", tone(1.2, 32000, hz * 1.5) + noise(1.2, 32000, i, 0.05), prompt=f"tune {i}")
    write_wav(ref / "extra.flac", tone(1.0, 44100, 550.0), rate=44100)   # the reference set may be larger (fad)
    out = tmp_path / "report.json"
    metrics.main(["fad,kld,clap,chroma_cos", str(ref), str(gen), f"--clap={clap_dir}", f"--out={out}"])
    printed = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == printed
    assert set(printed["metrics"]) == {"fad", "kld", "kld_qp", "kld_both", "clap", "chroma_cos"}
    assert printed["generated_files"] == 3 and printed["reference_files"] == 4
    assert all(math.isfinite(v) for v in printed["metrics"].values()) and printed["metrics"]["fad"] > 0
    assert printed["metrics"]["chroma_cos"] < 0.5                      # a fifth above: other pitch classes
    assert printed["weights"]["fad"] == str(with_reference / "fad" / "vggish-10086976.pth")
    metrics.main(["chroma_cos", str(gen), str(gen)])
    assert json.loads(capsys.readouterr().out)["metrics"]["chroma_cos"] == pytest.approx(1.0)


def test_melody_command_prints_pitch_classes(tmp_path, capsys):
    write_wav(tmp_path / "a.wav", tone(1.0, 32000, 392.0))         # G4
    assert melody.main([str(tmp_path / "a.wav")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 + 32000 // 4096 and all(line.split()[-1] == "G" for line in lines)
    with pytest.raises(env.UserError, match="nope.wav: "):
        melody.main([str(tmp_path / "nope.wav")])


def test_cli_checks_pairs_and_prompts_before_loading_models(tmp_path):
    ref, gen = tmp_path / "ref", tmp_path / "gen"
    write_wav(ref / "000.wav", tone(1.0, 32000, 220.0))
    write_wav(gen / "001.wav", tone(1.0, 32000, 220.0))
    with pytest.raises(env.UserError, match="no 001.\\* in .*ref for .*001.wav"):
        metrics.main(["chroma_cos", str(ref), str(gen)])
    with pytest.raises(env.UserError, match="001.json: cannot read the prompt.*clap needs"):
        metrics.main(["clap", str(gen)])
    with pytest.raises(env.UserError, match="fad needs REF_DIR and GEN_DIR.*usage: python metrics.py"):
        metrics.main(["fad", str(gen)])
    with pytest.raises(env.UserError, match='unknown key "vgish" \\(did you mean "vggish"\\?\\)'):
        metrics.main(["fad", str(ref), str(gen), "--vgish=x"])
    with pytest.raises(env.UserError, match="--device=gpu: not a device"):
        metrics.main(["chroma_cos", str(gen), str(gen), "--device=gpu"])
