"""The metrics papers report for text-to-music: FAD (VGGish), KLD (PaSST), CLAP score, chroma cosine similarity.

    python metrics.py fad REF_DIR GEN_DIR                          # Fréchet audio distance; JSON report on stdout
    python metrics.py kld REF_DIR GEN_DIR                          # pairs GEN_DIR/x.wav with REF_DIR/x.<any audio>
    python metrics.py clap GEN_DIR                                 # prompts from each file's .json ("prompt")
    python metrics.py chroma_cos REF_DIR GEN_DIR                   # REF_DIR: the melodies the generations followed
    python metrics.py fad,kld,clap REF_DIR GEN_DIR --out=report.json --device=cuda

Options: --vggish=PATH, --passt=PATH, --clap=DIR (weights: `//reference/...` or a path; the defaults are below),
--out=FILE (also write the report there), --device=cpu|cuda. Nothing is downloaded: put the files under the team's
reference directory (`python env.py` shows where //reference points):
    fad   //reference/fad/vggish-10086976.pth      torchvggish's VGGish weights (its v0.1 release)
    kld   //reference/kld/passt-s-f128-20sec-p16-s10-ap.474-swa.pt   PaSST, AudioSet (kkoutini/PaSST v0.0.5 release);
          the 10 s model passt-s-f128-p16-s10-ap.476-swa.pt (v0.0.1-audioset) works too
    clap  //reference/clap/larger_clap_music       a Hugging Face CLAP directory (laion/larger_clap_music); needs
          transformers (pip install transformers)

Definitions: AudioCraft's evaluate stage (audiocraft/metrics/*, config/solver/musicgen/default.yaml), with our
resampler (soxr) where AudioCraft uses julius. Audio is mixed to mono first.
- fad: Google's FAD tool, which AudioCraft runs: each clip at 16 kHz is scaled to a positive peak of 1, cut into 1 s
  windows every 0.5 s, each window's first 0.96 s is a log-mel patch (25 ms Hann frames every 10 ms, 64 HTK mel
  bands 125-7500 Hz, log(x + 0.01)) and VGGish's 128-d embedding layer (no ReLU, no PCA) embeds it; the Fréchet
  distance between Gaussians fitted to all generated and all reference embeddings. Clips under 1 s add nothing.
- kld: PaSST's 527 AudioSet label probabilities (softmax of the logits) on each 20 s segment at 32 kHz (10 s for
  the 10 s model; a last segment of <= 0.15 s is dropped), KL(reference || generated) per segment pair with the
  generated probabilities smoothed by 1e-6, averaged over segments. Also kld_qp (the other direction), kld_both.
- clap: cosine similarity between CLAP's embedding of the prompt (RoBERTa tokens, max 77) and of the generated
  audio at 48 kHz (10 s: longer clips are cropped at a seeded random offset, shorter ones repeated), averaged.
- chroma_cos: per-frame cosine similarity between the argmax chromagrams (melody.py) of the generated audio and its
  melody at 32 kHz, averaged over all frames.

In code, batch by batch (nothing but embeddings and sums is kept):
    ev = Evaluator(("fad", "kld", "clap"), sample_rate=32000)
    ev.add(generated=wav [B, C, S], reference=ref [B, C, S'], descriptions=[...], lengths=None)
    ev.reduce(lambda x: all_sum(x))   # with several processes: sum the running totals across ranks first
    ev.result()   # {"fad": ..., "kld": ..., "kld_qp": ..., "kld_both": ..., "clap": ...}
"""
import difflib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import soxr
import torch
from torch import nn
import torch.nn.functional as F

import env
import melody

METRICS = ("fad", "kld", "clap", "chroma_cos")
WEIGHTS = {  # metric: (default path, option, what to put there)
    "fad": ("//reference/fad/vggish-10086976.pth", "vggish",
            "torchvggish's VGGish weights vggish-10086976.pth (its v0.1 release)"),
    "kld": ("//reference/kld/passt-s-f128-20sec-p16-s10-ap.474-swa.pt", "passt",
            "PaSST's AudioSet weights passt-s-f128-20sec-p16-s10-ap.474-swa.pt (kkoutini/PaSST v0.0.5 release)"),
    "clap": ("//reference/clap/larger_clap_music", "clap",
             "a Hugging Face CLAP directory (laion/larger_clap_music: config.json, weights, tokenizer files)"),
}
VGGISH_RATE, PASST_RATE, CLAP_RATE, CHROMA_RATE = 16000, 32000, 48000, 32000


def parse_names(names):
    """"fad,kld" or ("fad", "kld") -> ("fad", "kld"); an unknown name is one line with a suggestion."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    names = tuple(dict.fromkeys(names))
    for name in names:
        if name not in METRICS:
            match = difflib.get_close_matches(name, METRICS, n=1)
            raise env.UserError(f"unknown metric {name!r}" + (f' (did you mean "{match[0]}"?)' if match else "")
                                + f": choose from {', '.join(METRICS)}")
    if not names:
        raise env.UserError(f"no metric named: choose from {', '.join(METRICS)}")
    return names


def weights_path(metric, path=None, option_suffix=""):
    """The weights a metric needs, as an existing path; else one line saying what to put where (the option that
    names it is --vggish, --passt, --clap here; train.py's keys add option_suffix "_path")."""
    default, option, what = WEIGHTS[metric]
    path = path or default
    advice = f"{metric} needs {what}: put it there, or give its path with --{option}{option_suffix}=PATH"
    try:
        resolved = env.resolve_path(path)
    except env.UserError as e:
        raise env.UserError(f"{e}; {advice}") from None
    if not resolved.exists():
        raise env.UserError(f"{path}: {resolved} does not exist; {advice}")
    return resolved


def resample(wav, from_rate, to_rate):
    """wav [S] float tensor -> [S * to_rate / from_rate] (soxr, as data.py reads audio), on wav's device."""
    if from_rate == to_rate:
        return wav
    out = soxr.resample(wav.detach().float().cpu().numpy(), from_rate, to_rate)
    return torch.from_numpy(out).to(wav.device)


def _state_dict(path, metric, kind):
    """A weights file's tensors: a state dict, or one under 'model' / 'state_dict'."""
    expected = f"; expected {WEIGHTS[metric][2]}"
    state = env.load_tensors(path, expected=expected)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise env.UserError(f"{path}: not a {kind} state dict{expected}")
    return state


def _load_strict(module, state, path, kind, metric):
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        first = (f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}" if unexpected else
                 f"{wrong[0]} has shape {tuple(state[wrong[0]].shape)}, expected {tuple(own[wrong[0]].shape)}")
        raise env.UserError(f"{path}: not {kind} weights ({len(missing)} missing, {len(unexpected)} unexpected, "
                            f"{len(wrong)} misshapen keys; {first}); expected {WEIGHTS[metric][2]}")
    module.load_state_dict(state)
    return module


# ----------------------------------------------------------------------------------------------------------
# Fréchet distance

class Moments:
    """Running count, sum and sum of outer products of embeddings [N, D] (float64): mean and covariance of any number
    of batches without keeping the embeddings, as Google's FAD tool accumulates them."""

    def __init__(self, dim):
        self.n, self.sum, self.outer = 0, torch.zeros(dim, dtype=torch.float64), torch.zeros(dim, dim,
                                                                                           dtype=torch.float64)

    def add(self, x):
        x = x.detach().double().cpu()
        self.n += x.shape[0]
        self.sum += x.sum(0)
        self.outer += x.T @ x

    def mean_cov(self):
        """-> mean [D], unbiased covariance [D, D] (needs n >= 2)."""
        mean = self.sum / self.n
        return mean, (self.outer - self.n * torch.outer(mean, mean)) / (self.n - 1)


def frechet_distance_stats(mu_a, cov_a, mu_b, cov_b):
    """|mu_a - mu_b|^2 + tr(A) + tr(B) - 2 tr sqrt(A B) between two Gaussians (FAD's and FID's formula).

    tr sqrt(A B) is the sum of the square roots of the eigenvalues of A B, which are those of sqrt(A) B sqrt(A): a
    symmetric matrix, so eigh gives them stably, where scipy.linalg.sqrtm of the product (what the published tools
    call) can turn complex on nearly singular covariances and needs their epsilon fallback."""
    mu_a, cov_a, mu_b, cov_b = (t.double() for t in (mu_a, cov_a, mu_b, cov_b))
    vals, vecs = torch.linalg.eigh(cov_a)
    root_a = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * cross)


def frechet_distance(a, b):
    """Fréchet distance between Gaussians fitted to two sets of embeddings [N, D] (FAD's formula)."""
    a, b = a.double(), b.double()
    return frechet_distance_stats(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T))


# ----------------------------------------------------------------------------------------------------------
# VGGish (fad)

def vggish_mel_matrix(n_bins=257, sample_rate=VGGISH_RATE, n_mels=64, fmin=125.0, fmax=7500.0):
    """[n_bins, n_mels] float64: VGGish's triangular filters on the HTK mel scale (1127 ln(1 + f/700)), bands
    equally spaced in mel between fmin and fmax, unnormalised, with the DC bin left out."""
    mel = lambda hz: 1127.0 * torch.log1p(torch.as_tensor(hz, dtype=torch.float64) / 700.0)  # noqa: E731
    bins = mel(torch.linspace(0, sample_rate / 2, n_bins, dtype=torch.float64))[:, None]
    edges = torch.linspace(float(mel(fmin)), float(mel(fmax)), n_mels + 2, dtype=torch.float64)
    lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
    weights = torch.minimum((bins - lower) / (center - lower), (upper - bins) / (upper - center)).clamp(min=0)
    weights[0] = 0
    return weights


def vggish_log_mel(wav):
    """wav [S] at 16 kHz -> log mel [1 + (S - 400) // 160, 64] float64: |rfft_512| of 25 ms periodic-Hann frames
    every 10 ms (no padding), 64 mel bands, log(x + 0.01)."""
    frames = wav.double().unfold(0, 400, 160)
    window = torch.hann_window(400, dtype=torch.float64, device=wav.device)
    magnitude = torch.fft.rfft(frames * window, n=512).abs()                      # [frames, 257]
    return torch.log(magnitude @ vggish_mel_matrix().to(wav.device) + 0.01)


def vggish_examples(wav):
    """wav [S] at 16 kHz -> VGGish inputs [N, 96, 64] float32, as Google's FAD tool makes them (model_step_size
    8000): the clip scaled to a positive peak of 1, one 0.96 s patch from each 1 s window, windows every 0.5 s.
    Window k's frames are frames 50k..50k+95 of the whole clip's log mel (8000 / 160 = 50), so it is computed once."""
    n = 0 if wav.shape[0] < VGGISH_RATE else (wav.shape[0] - VGGISH_RATE) // (VGGISH_RATE // 2) + 1
    if n == 0:
        return wav.new_zeros(0, 96, 64)
    # the tool divides the int16 samples it reads by max(0.1, their maximum): the positive peak, floored at 0.1/32768
    wav = wav.double() / wav.max().double().clamp(min=0.1 / 32768)
    log_mel = vggish_log_mel(wav[:VGGISH_RATE + (n - 1) * (VGGISH_RATE // 2)])
    return log_mel.unfold(0, 96, 50).transpose(1, 2).float()


class VGGish(nn.Module):
    """VGGish (Hershey et al. 2017) with torchvggish's parameter names (features.N, embeddings.N), so its weights file
    loads as is. The output is the 128-d embedding layer before any activation: Google's vggish_slim has none there
    (torchvggish adds a ReLU, which the PyTorch FAD tools remove), and FAD uses no PCA."""

    def __init__(self):
        super().__init__()
        layers, channels = [], 1
        for width in (64, "pool", 128, "pool", 256, 256, "pool", 512, 512, "pool"):
            if width == "pool":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
                channels = width
        self.features = nn.Sequential(*layers)
        self.embeddings = nn.Sequential(nn.Linear(512 * 6 * 4, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(),
                                        nn.Linear(4096, 128))

    def forward(self, examples):
        """examples [N, 96, 64] log-mel patches -> embeddings [N, 128]."""
        x = self.features(examples[:, None])              # [N, 512, 6, 4]
        x = x.permute(0, 2, 3, 1).flatten(1)              # TensorFlow's (height, width, channel) order, as trained
        return self.embeddings(x)


def load_vggish(path=None, device="cpu"):
    path = weights_path("fad", path)
    model = _load_strict(VGGish(), _state_dict(path, "fad", "VGGish"), path, "VGGish", "fad")
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------------------------
# PaSST (kld)

def kaldi_mel_banks(n_mels=128, n_fft=1024, sample_rate=PASST_RATE, fmin=0.0, fmax=15000.0):
    """[n_mels, n_fft // 2 + 1] float64: Kaldi's mel filters (torchaudio.compliance.kaldi.get_mel_banks, which PaSST
    calls): triangles equally spaced on 1127 ln(1 + f/700) between fmin and fmax over the bins k * sr / n_fft,
    unnormalised; the Nyquist column is zero. PaSST's fmax is 16000 - 2000 / 2 (its augmentation range)."""
    mel = lambda hz: 1127.0 * torch.log1p(torch.as_tensor(hz, dtype=torch.float64) / 700.0)  # noqa: E731
    low, high = float(mel(fmin)), float(mel(fmax))
    step = (high - low) / (n_mels + 1)
    left = low + step * torch.arange(n_mels, dtype=torch.float64)[:, None]
    bins = mel(torch.arange(n_fft // 2, dtype=torch.float64) * (sample_rate / n_fft))
    up, down = (bins - left) / step, (left + 2 * step - bins) / step
    return F.pad(torch.minimum(up, down).clamp(min=0), (0, 1))


def passt_mel(wav):
    """wav [B, S] at 32 kHz -> PaSST's input [B, 128, 1 + (S - 1) // 320] (hear21passt's AugmentMelSTFT in eval
    mode): pre-emphasis 0.97, |STFT|^2 (n_fft 1024, symmetric Hann of 800, hop 320, centred), Kaldi mel banks,
    log(x + 1e-5), then (x + 4.5) / 5."""
    x = wav[:, 1:] - 0.97 * wav[:, :-1]
    window = torch.hann_window(800, periodic=False, dtype=wav.dtype, device=wav.device)
    spec = torch.stft(x, 1024, 320, 800, window=window, center=True, pad_mode="reflect", return_complex=True)
    power = spec.real.square() + spec.imag.square()                        # [B, 513, frames]
    mel = kaldi_mel_banks().to(power) @ power
    return (torch.log(mel + 1e-5) + 4.5) / 5


class _Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, D))


class _Mlp(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), _Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), _Mlp(dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PaSST(nn.Module):
    """PaSST-S (Koutini et al. 2021) in eval mode, with hear21passt's parameter names: a ViT over 16x16 patches of
    the mel spectrogram taken every 10 bins/frames, separate frequency and time position embeddings (cut to the
    input's length), class and distillation tokens whose mean feeds the classifier. time_positions is 99 for the
    10 s model and 200 for the 20 s one; head_dist is in the weights but, as in hear21passt, unused."""

    def __init__(self, time_positions=99, dim=768, depth=12, heads=12, n_classes=527):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(1, dim, 16, stride=10)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.new_pos_embed = nn.Parameter(torch.zeros(1, 2, dim))
        self.freq_new_pos_embed = nn.Parameter(torch.zeros(1, dim, 12, 1))
        self.time_new_pos_embed = nn.Parameter(torch.zeros(1, dim, 1, time_positions))
        self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, n_classes))
        self.head_dist = nn.Linear(dim, n_classes)

    @property
    def segment_samples(self):
        """The clip length at 32 kHz the model was trained on, which its time positions cover: 10 s for the 99 of
        the 10 s model, 20 s for the 200 of the 20 s one (a 20 s input has 199 patches)."""
        return round(self.time_new_pos_embed.shape[-1] / 10) * PASST_RATE

    def forward(self, mel):
        """mel [B, 128, frames] (passt_mel, frames >= 16) -> AudioSet logits [B, 527]."""
        x = self.patch_embed.proj(mel[:, None])                                       # [B, D, 12, T]
        x = x + self.time_new_pos_embed[..., :x.shape[-1]] + self.freq_new_pos_embed
        x = x.flatten(2).transpose(1, 2)                                              # [B, 12 T, D] frequency-major
        tokens = torch.cat([self.cls_token, self.dist_token], 1) + self.new_pos_embed
        x = torch.cat([tokens.expand(x.shape[0], -1, -1), x], 1)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return self.head((x[:, 0] + x[:, 1]) / 2)


def load_passt(path=None, device="cpu"):
    path = weights_path("kld", path)
    state = _state_dict(path, "kld", "PaSST")
    state = {k.removeprefix("net."): v for k, v in state.items() if not k.startswith(("mel.", "device_proxy"))}
    shapes = {k: tuple(state[k].shape) for k in ("time_new_pos_embed", "cls_token", "head.1.weight") if k in state}
    if len(shapes) < 3 or len(shapes["time_new_pos_embed"]) != 4:
        raise env.UserError(f"{path}: not PaSST weights (no time_new_pos_embed, cls_token or head.1.weight); "
                            f"expected {WEIGHTS['kld'][2]}")
    # the released models are PaSST-S (768 wide, 12 blocks, 64 per head); reading the sizes lets tests use small ones
    dim = shapes["cls_token"][-1]
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    model = PaSST(shapes["time_new_pos_embed"][-1], dim, depth, max(1, dim // 64), shapes["head.1.weight"][0])
    return _load_strict(model, state, path, "PaSST", "kld").to(device).eval()


def passt_segments(wav, segment_samples, min_samples=PASST_RATE * 15 // 100):
    """wav [S] at 32 kHz -> the pieces PaSST sees: consecutive segments of segment_samples, dropping any of
    <= min_samples (0.15 s; too short for one patch), as AudioCraft does rather than padding."""
    return [s for s in torch.split(wav, segment_samples) if s.shape[0] > min_samples]


def passt_probs(model, segments):
    """[S_i] segments at 32 kHz -> label probabilities [len(segments), 527], same-length segments batched."""
    out = [None] * len(segments)
    by_length = {}
    for i, s in enumerate(segments):
        by_length.setdefault(s.shape[0], []).append(i)
    for indices in by_length.values():
        for chunk in (indices[j:j + 8] for j in range(0, len(indices), 8)):
            logits = model(passt_mel(torch.stack([segments[i] for i in chunk])))
            for i, p in zip(chunk, logits.softmax(-1)):
                out[i] = p
    return torch.stack(out) if out else torch.zeros(0, 527)


def kl_divergence(pred_probs, target_probs, eps=1e-6):
    """[N, C], [N, C] -> [N]: KL(target || pred) with pred smoothed by eps (AudioCraft's kl_divergence)."""
    return F.kl_div((pred_probs + eps).log(), target_probs, reduction="none").sum(-1)


# ----------------------------------------------------------------------------------------------------------
# CLAP (clap), through transformers

class Clap:
    """A Hugging Face CLAP directory: the model, its feature extractor and its RoBERTa tokenizer."""

    def __init__(self, path=None, device="cpu"):
        path = weights_path("clap", path)
        try:
            import transformers
        except ImportError:
            raise env.UserError("clap needs the transformers package: pip install transformers") from None
        if not (path / "config.json").is_file():
            raise env.UserError(f"{path}: no config.json; clap expects {WEIGHTS['clap'][2]}")
        try:
            self.model = transformers.ClapModel.from_pretrained(path).to(device).eval()
            self.extractor = transformers.ClapFeatureExtractor.from_pretrained(path)
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise env.UserError(f"{path}: cannot load a CLAP model ({type(e).__name__}: "
                                f"{str(e).strip().splitlines()[0][:200]}); expected {WEIGHTS['clap'][2]}") from None
        self.device = device
        self.fused = bool(self.model.config.audio_config.enable_fusion)
        self.max_samples = self.extractor.nb_max_samples                     # 10 s at 48 kHz

    @staticmethod
    def _features(output):
        return output if torch.is_tensor(output) else output.pooler_output  # transformers 5 returns an output object

    def crop(self, wav, generator):
        """wav [S] at 48 kHz -> at most 10 s. AudioCraft's CLAP takes a random 10 s of a longer clip (rand_trunc);
        drawing the offset from a seeded generator keeps the score reproducible. A fused model sees everything."""
        if self.fused or wav.shape[0] <= self.max_samples:
            return wav
        start = int(torch.randint(wav.shape[0] - self.max_samples + 1, (1,), generator=generator))
        return wav[start:start + self.max_samples]

    def scores(self, clips, texts):
        """clips: [S_i] mono at 48 kHz (cropped), texts: one per clip -> cosine similarities [B]."""
        # fusion is the extractor's default but gives an unfused model 4 channels it cannot read
        features = self.extractor([c.float().cpu().numpy() for c in clips], sampling_rate=CLAP_RATE,
                                  truncation="fusion" if self.fused else "rand_trunc", padding="repeatpad",
                                  return_tensors="pt")
        tokens = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=77,
                                return_tensors="pt").to(self.device)
        audio = self._features(self.model.get_audio_features(
            input_features=features["input_features"].to(self.device),
            is_longer=features["is_longer"].to(self.device)))
        text = self._features(self.model.get_text_features(**tokens))
        return F.cosine_similarity(audio, text, dim=1, eps=1e-8)


# ----------------------------------------------------------------------------------------------------------
# The evaluator: what the evaluate stage and the command line call

class Evaluator:
    """The chosen metrics, fed batch by batch; result() -> {name: float}. Models load here, so a missing weights file
    or package is found before any generation. Only embeddings' moments and running sums are kept."""

    def __init__(self, names, sample_rate, vggish=None, passt=None, clap=None, device="cpu", seed=0, option_suffix=""):
        self.names, self.sample_rate, self.device = parse_names(names), int(sample_rate), torch.device(device)
        given = {"fad": vggish, "kld": passt, "clap": clap}
        self.weights = {n: str(weights_path(n, given[n], option_suffix)) for n in self.names if n in WEIGHTS}
        self.seed = seed
        if "fad" in self.names:
            self.vggish = load_vggish(self.weights["fad"], self.device)
        if "kld" in self.names:
            self.passt = load_passt(self.weights["kld"], self.device)
        if "clap" in self.names:
            self.clap = Clap(self.weights["clap"], self.device)
        self.reset()

    def reset(self):
        """Forget what was added; the models stay loaded (one evaluator serves every evaluate stage of a run)."""
        self.moments = {"generated": Moments(128), "reference": Moments(128)} if "fad" in self.names else {}
        self.kld_pq, self.kld_qp, self.kld_segments = 0.0, 0.0, 0
        self.clap_sum, self.clap_count = 0.0, 0
        self.crop_generator = torch.Generator().manual_seed(self.seed)
        self.chroma_sum, self.chroma_frames = 0.0, 0

    def _clips(self, wav, lengths, sample_rate, what):
        """[B, C, S] (or [C, S]) -> mono clips [S_i] (each cut to its length), float32 on the device."""
        if wav is None:
            return None
        wav = torch.as_tensor(wav)
        if wav.dim() == 2:
            wav = wav[None]
        if wav.dim() != 3 or not wav.is_floating_point():
            raise env.UserError(f"{what}: expected float audio [batch, channels, samples], got {tuple(wav.shape)} "
                                f"{wav.dtype}")
        mono = wav.to(self.device, torch.float32).mean(1)
        lengths = [mono.shape[-1]] * len(mono) if lengths is None else [int(n) for n in lengths]
        if len(lengths) != len(mono):
            raise env.UserError(f"{what}: {len(lengths)} lengths for {len(mono)} clips")
        return [m[:n] for m, n in zip(mono, lengths)]

    @torch.no_grad()
    def add(self, generated=None, reference=None, descriptions=None, melodies=None, lengths=None, sample_rate=None):
        """generated, reference, melodies: float audio [B, C, S] at sample_rate (default: the evaluator's); lengths
        [B]: valid samples of each row (padding after it is ignored), for all three. Paired metrics (kld, chroma_cos)
        compare row i of generated with row i of reference / melodies, cut to the shorter of the two; fad takes
        either side alone (a reference set larger than the generated one is fine); clap needs descriptions."""
        rate = int(sample_rate or self.sample_rate)
        gen = self._clips(generated, lengths, rate, "generated")
        ref = self._clips(reference, lengths, rate, "reference")
        mel = self._clips(melodies, lengths, rate, "melodies")
        for name, needed, given in (("kld", "reference", ref), ("chroma_cos", "melodies", mel),
                                    ("clap", "descriptions", descriptions)):
            if name in self.names and gen is not None and given is None:
                raise env.UserError(f"{name} needs the {needed} of each generated clip")
            if name in self.names and gen is not None and len(given) != len(gen):
                raise env.UserError(f"{name}: {len(given)} {needed} for {len(gen)} generated clips")
        if "clap" in self.names and gen is not None:
            empty = [i for i, d in enumerate(descriptions) if not isinstance(d, str) or not d.strip()]
            if empty:
                raise env.UserError(f"clap: description {empty[0]} of the batch is empty; the CLAP score compares "
                                    f"audio with its prompt, so unconditional generations have none")
        if "fad" in self.names:
            for side, clips in (("generated", gen), ("reference", ref)):
                if clips:
                    self._add_fad(side, clips, rate)
        if gen is None:
            return
        if "kld" in self.names:
            self._add_kld(gen, ref, rate)
        if "clap" in self.names:
            clips = [self.clap.crop(resample(c, rate, CLAP_RATE), self.crop_generator) for c in gen]
            scores = self.clap.scores(clips, descriptions)
            self.clap_sum += float(scores.sum())
            self.clap_count += len(scores)
        if "chroma_cos" in self.names:
            self._add_chroma(gen, mel, rate)

    def _add_fad(self, side, clips, rate):
        examples = torch.cat([vggish_examples(resample(c, rate, VGGISH_RATE)) for c in clips])
        for chunk in examples.split(64):
            self.moments[side].add(self.vggish(chunk))

    def _add_kld(self, gen, ref, rate):
        size = self.passt.segment_samples
        pairs = [(resample(g, rate, PASST_RATE), resample(r, rate, PASST_RATE)) for g, r in zip(gen, ref)]
        gen_segments, ref_segments = [], []
        for g, r in pairs:
            n = min(g.shape[0], r.shape[0])
            gen_segments += passt_segments(g[:n], size)
            ref_segments += passt_segments(r[:n], size)
        if not gen_segments:
            return
        p, q = passt_probs(self.passt, gen_segments), passt_probs(self.passt, ref_segments)
        self.kld_pq += float(kl_divergence(p, q).sum())
        self.kld_qp += float(kl_divergence(q, p).sum())
        self.kld_segments += len(gen_segments)

    def _add_chroma(self, gen, mel, rate):
        for g, m in zip(gen, mel):
            g, m = resample(g, rate, CHROMA_RATE), resample(m, rate, CHROMA_RATE)
            n = min(g.shape[0], m.shape[0])
            frames = math.ceil(n / (melody.N_FFT // 4))  # AudioCraft's ceil(size / hop): the frames the audio spans
            a, b = (melody.chroma(x[None, :n], CHROMA_RATE)[0, :frames] for x in (g, m))
            self.chroma_sum += float(F.cosine_similarity(a, b, dim=1, eps=1e-8).sum())
            self.chroma_frames += frames

    def _totals(self):
        """(owner, attribute) of every running total: what reduce() sums across processes."""
        totals = [(m, a) for m in getattr(self, "moments", {}).values() for a in ("n", "sum", "outer")]
        for name, attrs in (("kld", ("kld_pq", "kld_qp", "kld_segments")), ("clap", ("clap_sum", "clap_count")),
                            ("chroma_cos", ("chroma_sum", "chroma_frames"))):
            totals += [(self, a) for a in attrs] if name in self.names else []
        return totals

    def reduce(self, all_sum):
        """Sum every running total across processes, on every rank, before result(): all_sum(x) takes a float64
        vector [N] (on the CPU) and returns the N sums over ranks (a tensor or a list), e.g. with train.py's helper
        `ev.reduce(lambda x: all_sum(d, x))`, or `lambda x: dist.all_reduce(x) or x`. One collective for all."""
        totals = self._totals()
        values = [torch.as_tensor(getattr(o, a), dtype=torch.float64) for o, a in totals]
        summed = torch.as_tensor(all_sum(torch.cat([v.flatten() for v in values])), dtype=torch.float64).cpu()
        for (owner, attr), value, chunk in zip(totals, values, summed.split([v.numel() for v in values])):
            old = getattr(owner, attr)
            setattr(owner, attr, chunk.view_as(value).clone() if torch.is_tensor(old) else type(old)(chunk.item()))

    def result(self):
        """-> {name: float} for every chosen metric (kld adds kld_qp and kld_both); one line if one has no data."""
        out = {}
        if "fad" in self.names:
            counts = {side: m.n for side, m in self.moments.items()}
            if min(counts.values()) < 2:
                raise env.UserError(f"fad needs at least 2 VGGish windows (1 s of audio each) on each side; got "
                                    f"{counts['generated']} generated and {counts['reference']} reference")
            out["fad"] = frechet_distance_stats(*self.moments["generated"].mean_cov(),
                                                *self.moments["reference"].mean_cov())
        if "kld" in self.names:
            if not self.kld_segments:
                raise env.UserError("kld: no generated/reference pair was longer than 0.15 s")
            pq, qp = self.kld_pq / self.kld_segments, self.kld_qp / self.kld_segments
            out.update(kld=pq, kld_qp=qp, kld_both=pq + qp)
        if "clap" in self.names:
            if not self.clap_count:
                raise env.UserError("clap: no generated clip was added")
            out["clap"] = self.clap_sum / self.clap_count
        if "chroma_cos" in self.names:
            if not self.chroma_frames:
                raise env.UserError("chroma_cos: no generated clip was added")
            out["chroma_cos"] = self.chroma_sum / self.chroma_frames
        return out


# ----------------------------------------------------------------------------------------------------------
# Command line

OPTIONS = {"vggish": (str, None), "passt": (str, None), "clap": (str, None), "out": (str, None), "device": "cpu"}
USAGE = "python metrics.py NAMES REF_DIR GEN_DIR [--key=value ...] (clap alone: NAMES GEN_DIR)"


def _audio_files(root, what):
    import data
    path = env.resolve_path(root)
    if not path.is_dir():
        raise env.UserError(f"{what} {root}: not a directory")
    files = [Path(p) for p in data.find_audio(path)]
    if not files:
        raise env.UserError(f"{what} {root}: no audio files in it")
    return path, files


def _read(path, sample_rate=None):
    """-> (audio [1, C, S] tensor, its sample rate): at sample_rate if given, else at the file's own."""
    import data
    import soundfile
    try:
        rate = sample_rate or soundfile.info(str(path)).samplerate
        return torch.from_numpy(data.read_audio(path, sample_rate=rate))[None], rate
    except (data.BadFile, RuntimeError) as e:  # soundfile raises LibsndfileError, a RuntimeError
        raise env.UserError(f"{path}: {e}") from None


def _prompt(path):
    """The prompt of a generated file: its .json sidecar's "prompt" (generate.py) or "description" (train.py)."""
    side = path.with_suffix(".json")
    try:
        meta = json.loads(side.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise env.UserError(f"{side}: cannot read the prompt ({getattr(e, 'strerror', None) or e}); clap needs a "
                            f".json beside each generated file with its \"prompt\", as generate.py writes") from None
    prompt = meta.get("prompt") or meta.get("description") if isinstance(meta, dict) else None
    if not isinstance(prompt, str) or not prompt.strip():
        raise env.UserError(f"{side}: no \"prompt\" (or \"description\") text; clap needs the prompt of each "
                            f"generated file")
    return prompt


def main(argv):
    positional, opts = env.parse_options(argv, OPTIONS, usage=USAGE, positionals=(2, 3))
    names = parse_names(positional[0])
    dirs = positional[1:]
    if len(dirs) == 1 and names != ("clap",):
        raise env.UserError(f"command line: missing arguments ({', '.join(names)} needs REF_DIR and GEN_DIR); "
                            f"usage: {USAGE}")
    ref_root, refs = _audio_files(dirs[0], "REF_DIR") if len(dirs) == 2 else (None, [])
    gen_root, gens = _audio_files(dirs[-1], "GEN_DIR")
    paired = [n for n in names if n in ("kld", "chroma_cos")]
    key = lambda root, p: p.relative_to(root).with_suffix("").as_posix()  # noqa: E731
    by_key = {key(ref_root, p): p for p in refs}
    if paired:
        missing = [g for g in gens if key(gen_root, g) not in by_key]
        if missing:
            raise env.UserError(f"{paired[0]} compares each generated file with the reference of the same name: no "
                                f"{key(gen_root, missing[0])}.* in {dirs[0]} for {missing[0]} ({len(missing)} "
                                f"without one)")
    if "clap" in names:
        prompts = {g: _prompt(g) for g in gens}   # all sidecars are checked before any model runs
    device = opts["device"]
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError):  # a bad name, or CUDA absent (torch asserts there)
        raise env.UserError(f"--device={device}: not a device this machine has (cpu, cuda, cuda:1, mps)") from None
    t0 = time.time()
    ev = Evaluator(names, 32000, vggish=opts["vggish"], passt=opts["passt"], clap=opts["clap"], device=device)
    used = set()
    last = time.time()
    for i, g in enumerate(gens):
        wav, rate = _read(g)
        ref = mel = None
        if paired or ("fad" in names and key(gen_root, g) in by_key):
            r = by_key[key(gen_root, g)]
            ref = _read(r, rate)[0]
            used.add(r)
            mel = ref if "chroma_cos" in names else None
        ev.add(generated=wav, reference=ref if ("kld" in names or "fad" in names) else None, melodies=mel,
               descriptions=[prompts[g]] if "clap" in names else None, sample_rate=rate)
        if time.time() - last > 10 or i + 1 == len(gens):
            done = time.time() - t0
            print(f"{i + 1}/{len(gens)} generated files, {done:.0f} s, eta {done / (i + 1) * (len(gens) - i - 1):.0f}"
                  f" s", file=sys.stderr, flush=True)
            last = time.time()
    if "fad" in names:
        for r in refs:
            if r not in used:
                wav, rate = _read(r)
                ev.add(reference=wav, sample_rate=rate)
    report = {"metrics": ev.result(), "generated": str(gen_root), "reference": str(ref_root) if ref_root else None,
              "generated_files": len(gens), "reference_files": len(refs), "seconds": round(time.time() - t0, 1),
              "weights": ev.weights}
    text = json.dumps(report, indent=1) + "\n"
    if opts["out"]:
        env.write_atomic(env.resolve_path(opts["out"]), lambda f: f.write(text.encode()))
    print(text, end="")
    return 0


if __name__ == "__main__":
    env.cli(main)
