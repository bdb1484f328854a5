"""Train an EnCodec tokenizer (SEANet encoder/decoder with LSTM, residual VQ): AudioCraft's compression recipe.

    python train_codec.py config/codec_demo.py                       # the demo's tiny codec on the synthetic set (CPU)
    python train_codec.py --dataset=egs/mine --batch_size=64          # MusicGen's 32 kHz codec on your audio
    torchrun --nproc_per_node=8 train_codec.py --dataset=egs/mine     # one node
    python train_codec.py config/codec_demo.py --print_config=True   # resolved config, signature, run dir

Then tokenize with it: `python data.py tokenize DATASET CACHE --codec=SIG` or `python train.py ... --codec=SIG`
(SIG or the run directory: the codec is its latest EMA weights), and export it:
`python formats.py codec SIG --export=out/` (AudioCraft's compression_state_dict.bin) or `--export_hf=out/hf`
(a transformers EncodecModel directory).

The recipe (AudioCraft's solver/compression/default.yaml): L1 waveform and multi-scale mel losses, a multi-scale STFT
discriminator with hinge adversarial and feature-matching losses, all combined by the loss balancer (each weight is
the fraction of the output's gradient that loss gives); a residual VQ whose codebooks follow an EMA of the vectors
assigned to them (k-means start, dead codes replaced by batch vectors) with a commitment loss; quantizer dropout for
variable bandwidth; weight norm on every convolution (folded into plain weights for inference and export); Adam
(betas 0.5, 0.9) and an EMA of the weights that valid, generate and the exported codec use.

Run directory <runs_dir>/xps/<signature>/ as train.py's: config.json, checkpoint.pt (+ checkpoint_<epoch>.pt),
history.jsonl, log.txt, samples/<epoch>/NNN.wav (reconstruction) and NNN_reference.wav, status. Running the same
config again resumes it exactly; SIGTERM/SIGUSR1 save and exit 75.
"""
import contextlib
import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass, fields
from functools import lru_cache

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import data
import env
from codec import Codec, CodecConfig, Conv, ConvTr, run_layers
from env import EXIT_REQUEUE, UserError
from train import (Log, all_sum, config_dict, finished, load_checkpoint, lr_at, run_directory, run_to_exit,
                   save_atomic, set_status, setup_distributed, write_run_file)


@dataclass
class Config:
    # run
    seed: int = 2036                  # weights, k-means, dead codes, quantizer dropout, data: a run replays from it
    runs_dir: str = ""                # empty: the team's dora_dir
    clear: bool = False               # wipe the run directory first
    print_config: bool = False        # print config, signature and run directory, then exit
    label: str = ""                   # free text that is part of the signature
    # data
    dataset: str = "demo"             # <dir>/{train,valid,generate}/data.jsonl, or "demo" (the built-in synthetic set)
    segment_duration: float = 1.0     # seconds per training segment (a whole number of codec frames)
    valid_duration: float = 0.0       # seconds per valid item, from each file's start; 0: segment_duration
    max_skip_fraction: float = 0.05   # abort when more than this fraction of audio reads fail
    num_workers: int = 2              # data loader processes per rank
    # codec (codec.CodecConfig; the defaults are MusicGen's 32 kHz EnCodec, encodec_large_nq4_s640)
    sample_rate: int = 32000
    channels: int = 1
    n_filters: int = 64               # SEANet width; doubles at each downsampling
    ratios: tuple[int, ...] = (8, 5, 4, 4)   # decoder upsampling ratios; hop = their product
    dimension: int = 128              # latent and codebook dimension
    n_residual_layers: int = 1
    lstm: int = 2                     # LSTM layers after the encoder and before the decoder
    compress: int = 2
    causal: bool = False
    pad_mode: str = "constant"        # AudioCraft's SEANet default (the HF encodec_32khz config says reflect)
    n_q: int = 4                      # residual codebooks
    card: int = 2048                  # entries per codebook
    # quantizer
    q_dropout: bool = False           # train each batch on 1..n_q codebooks (variable bandwidth)
    vq_decay: float = 0.99            # EMA decay of the codebook updates
    kmeans_iters: int = 50            # k-means on the first batch starts each codebook
    dead_code_threshold: float = 0.1  # a code used less than this fraction of the average code takes a batch vector
    commitment: float = 1.0           # weight of the commitment loss (outside the balancer, as AudioCraft)
    # losses: with the balancer, weight / sum of weights is the share of the output's gradient each loss gives
    l1: float = 0.1                   # waveform L1
    msspec: float = 2.0               # multi-scale mel spectrogram (n_fft 64..1024: L1 on power + MSE on log)
    adv: float = 4.0                  # hinge adversarial loss against the multi-scale STFT discriminator; 0: no GAN
    feat: float = 4.0                 # the discriminator's feature matching (L1)
    balancer: bool = True             # False: a plain weighted sum of the losses
    balancer_total_norm: float = 1.0
    balancer_decay: float = 0.999     # EMA decay of each loss's gradient norm
    # discriminator (multi-scale STFT, AudioCraft's msstftd)
    disc_filters: int = 32
    disc_n_ffts: tuple[int, ...] = (1024, 2048, 512, 256, 128)   # one sub-discriminator each; hop n_fft / 4
    adv_every: int = 1                # train the discriminator on 1 / adv_every of the updates (drawn)
    # optimisation
    epochs: int = 200
    updates_per_epoch: int = 2000
    batch_size: int = 64              # global, split across ranks
    lr: float = 3e-4                  # Adam, for the codec and the discriminator
    betas: tuple[float, ...] = (0.5, 0.9)
    weight_decay: float = 0.0
    max_norm: float = 0.0             # gradient clipping; 0: off (AudioCraft's)
    lr_schedule: str = "constant"     # constant | cosine | linear
    warmup: int = 0                   # updates of linear warmup
    lr_min_ratio: float = 0.0
    ema: bool = True                  # a moving average of the weights (and codebooks) for valid, generate, export
    ema_decay: float = 0.99
    ema_every: int = 1
    # precision and devices
    dtype: str = "float32"            # autocast dtype for the encoder/decoder: float32 | bfloat16 (VQ stays float32)
    device: str = ""                  # empty: cuda, then mps, then cpu
    # stages
    valid_batches: int = 0            # 0: the whole valid split
    generate_every: int = 25          # epochs between generate stages (and the last epoch); 0: never
    generate_count: int = 4           # reconstructions per generate stage (from the generate split)
    generate_duration: float = 10.0   # seconds per reconstruction (from each file's start)
    save_every: int = 25              # keep checkpoint_<epoch>.pt every this many epochs
    log_every: int = 10               # updates between log lines
    dist_timeout: int = 600           # seconds before a collective gives up


INFRA_KEYS = {"runs_dir", "clear", "print_config", "num_workers", "device", "log_every", "dist_timeout",
              "generate_every", "save_every"}
CHOICES = {"pad_mode": ("constant", "reflect"), "lr_schedule": ("constant", "cosine", "linear"),
           "dtype": ("float32", "bfloat16")}


# ----------------------------------------------------------------------------------------------------------
# Checks that span keys

def validate(cfg, world_size=1):
    """Checks that span keys, each error naming the keys and values; the codec's hop must divide the segments."""
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise UserError(f'{key}="{getattr(cfg, key)}" is not one of {", ".join(allowed)}')
    for key in ("sample_rate", "channels", "n_filters", "dimension", "n_q", "card", "compress", "epochs",
                "updates_per_epoch", "batch_size", "disc_filters", "adv_every", "ema_every", "log_every",
                "generate_count", "save_every"):
        if getattr(cfg, key) <= 0:
            raise UserError(f"{key}={getattr(cfg, key)} must be positive")
    for key in ("n_residual_layers", "lstm", "kmeans_iters", "dead_code_threshold", "commitment", "l1", "msspec",
                "adv", "feat", "lr", "weight_decay", "max_norm", "warmup", "valid_batches", "generate_every",
                "valid_duration", "generate_duration"):
        if not getattr(cfg, key) >= 0:
            raise UserError(f"{key}={getattr(cfg, key)} must not be negative")
    for key in ("vq_decay", "balancer_decay", "ema_decay", "lr_min_ratio", "max_skip_fraction"):
        if not 0 <= getattr(cfg, key) <= 1:
            raise UserError(f"{key}={getattr(cfg, key)} must be between 0 and 1")
    if not cfg.ratios or any(not isinstance(r, int) or r <= 0 for r in cfg.ratios):
        raise UserError(f"ratios={list(cfg.ratios)} must be positive integers")
    if cfg.card > 1 << 16:
        raise UserError(f"card={cfg.card}: token caches store codes as uint16, so at most 65536")
    if not (cfg.l1 or cfg.msspec or cfg.adv or cfg.feat):
        raise UserError("l1, msspec, adv and feat are all 0: nothing to train on")
    if (cfg.adv or cfg.feat) and not cfg.disc_n_ffts:
        raise UserError("adv or feat is on but disc_n_ffts is empty: give the discriminator's scales")
    if cfg.batch_size % world_size:
        raise UserError(f"batch_size={cfg.batch_size} does not divide across {world_size} processes: use a multiple "
                        f"of {world_size}")
    hop = math.prod(cfg.ratios)
    for key in ("segment_duration", "valid_duration", "generate_duration"):
        seconds = getattr(cfg, key)
        samples = seconds * cfg.sample_rate
        if key == "segment_duration" and not seconds > 0:
            raise UserError(f"segment_duration={seconds} must be positive")
        if seconds and (abs(samples - round(samples)) > 1e-6 * samples or round(samples) % hop):
            raise UserError(f"{key}={seconds} s is {samples:g} samples at {cfg.sample_rate} Hz, not a whole number of "
                            f"the codec's hop {hop} (ratios {list(cfg.ratios)}): use a multiple of "
                            f"{hop / cfg.sample_rate:g} s")
    window = max(max(cfg.disc_n_ffts) if cfg.adv or cfg.feat else 0, 1024)   # the discriminator's, the mel losses'
    shortest = min(cfg.segment_duration, cfg.valid_duration or cfg.segment_duration)
    if round(shortest * cfg.sample_rate) < window:
        raise UserError(f"segment_duration={cfg.segment_duration} s and valid_duration={cfg.valid_duration} s must "
                        f"hold at least {window} samples (the longest STFT window) at {cfg.sample_rate} Hz")


def codec_config(cfg):
    return CodecConfig(**{f.name: getattr(cfg, f.name) for f in fields(CodecConfig) if hasattr(cfg, f.name)})


def config_delta(cfg):
    default = Config()
    return {k.name: (list(v) if isinstance(v, tuple) else v) for k in fields(cfg)
            if k.name not in INFRA_KEYS and (v := getattr(cfg, k.name)) != getattr(default, k.name)}


def config_signature(cfg):
    """Codec runs share the runs directory with LM runs: the solver's name keeps their signatures apart."""
    return env.signature({"solver": "compression", **config_delta(cfg)})


# ----------------------------------------------------------------------------------------------------------
# Losses and metrics (AudioCraft's losses/specloss.py and sisnr.py, on torch.stft)

@lru_cache(maxsize=None)
def mel_filters(n_fft, n_mels, sample_rate, f_min, f_max=None):
    """[n_fft // 2 + 1, n_mels] triangular filters on the HTK mel scale, unnormalised (torchaudio's defaults)."""
    f_max = f_max or sample_rate // 2
    freqs = torch.linspace(0, sample_rate // 2, n_fft // 2 + 1, dtype=torch.float64)
    to_mel = lambda f: 2595.0 * math.log10(1.0 + f / 700.0)  # noqa: E731
    edges = 700.0 * (10 ** (torch.linspace(to_mel(f_min), to_mel(f_max), n_mels + 2, dtype=torch.float64) / 2595.0) - 1)
    widths = edges[1:] - edges[:-1]
    slopes = edges[None] - freqs[:, None]                        # [freqs, n_mels + 2]
    down, up = -slopes[:, :-2] / widths[:-1], slopes[:, 2:] / widths[1:]
    return torch.clamp(torch.minimum(down, up), min=0).float()


def mel_spectrogram(wav, sample_rate, n_fft, hop, n_mels=64, f_min=64.0, normalized=False, log=False, floor=1e-5):
    """wav [B, C, S] -> [B, C * n_mels, frames] power (or log10) mel spectrogram, as AudioCraft's
    MelSpectrogramWrapper: reflect padding of (n_fft - hop) // 2 on each side, zeros so that the last frame is
    full, no centring; normalized divides by the window's energy."""
    B, C, S = wav.shape
    p = (n_fft - hop) // 2
    x = F.pad(wav.reshape(B * C, 1, S), (p, p), "reflect")[:, 0]
    frames = max(1, math.ceil((x.shape[-1] - n_fft) / hop) + 1)
    x = F.pad(x, (0, (frames - 1) * hop + n_fft - x.shape[-1]))
    window = torch.hann_window(n_fft, device=wav.device, dtype=wav.dtype)
    spec = torch.stft(x, n_fft, hop, window=window, center=False, return_complex=True)  # [B*C, freqs, frames]
    power = spec.real.square() + spec.imag.square()   # |z|^2, no square root taken
    if normalized:
        power = power / window.square().sum()
    filters = mel_filters(n_fft, n_mels, sample_rate, f_min).to(wav.device, wav.dtype)
    mel = filters.T @ power                            # [B*C, n_mels, frames]
    if log:
        mel = torch.log10(floor + mel)
    return mel.reshape(B, C * n_mels, -1)


def msspec_loss(out, ref, sample_rate, scales=range(6, 11)):
    """AudioCraft's MultiScaleMelSpectrogramLoss (msspec config: 64 mels from 64 Hz, normalized, no alphas): at
    n_fft 64..1024, hop n_fft / 4, L1 between power mel spectrograms plus MSE between their logs, averaged."""
    loss = 0.0
    for i in scales:
        n_fft = 2 ** i
        a = mel_spectrogram(out, sample_rate, n_fft, n_fft // 4, normalized=True)
        with torch.no_grad():
            b = mel_spectrogram(ref, sample_rate, n_fft, n_fft // 4, normalized=True)
        loss = loss + F.l1_loss(a, b) + F.mse_loss(torch.log10(1e-5 + a), torch.log10(1e-5 + b))
    return loss / (2 * len(scales))


def mel_distance(out, ref, sample_rate):
    """[B]: L1 between log10 mel spectrograms (n_fft 1024, hop 256, 64 mels from 64 Hz): AudioCraft's `mel` loss,
    per item."""
    a, b = (mel_spectrogram(x, sample_rate, 1024, 256, log=True) for x in (out, ref))
    return (a - b).abs().flatten(1).mean(1)


def si_snr(out, ref):
    """[B]: scale-invariant signal-to-noise ratio in dB of out against ref ([B, C, S], whole items), AudioCraft's."""
    eps = torch.finfo(torch.float32).eps * ref.shape[-1]
    ref, out = ref - ref.mean(-1, keepdim=True), out - out.mean(-1, keepdim=True)
    proj = (out * ref).sum(-1, keepdim=True) * ref / (eps + ref.square().sum(-1, keepdim=True))
    snr = 10 * (torch.log10(eps + proj.square().sum(-1)) - torch.log10(eps + (out - proj).square().sum(-1)))
    return snr.mean(-1)


# ----------------------------------------------------------------------------------------------------------
# The multi-scale STFT discriminator and the adversarial losses (AudioCraft's msstftd and adversarial/losses.py)

class STFTDiscriminator(nn.Module):
    """One scale: the complex STFT as 2 channels per audio channel, [B, 2C, frames, freqs], through 2-D convs
    dilated in time and strided in frequency. Returns (logits, feature maps)."""

    def __init__(self, channels, filters, n_fft, kernel=(3, 9), dilations=(1, 2, 4), slope=0.3):
        super().__init__()
        self.n_fft, self.hop, self.slope = n_fft, n_fft // 4, slope
        pad = lambda k, d=(1, 1): ((k[0] - 1) * d[0] // 2, (k[1] - 1) * d[1] // 2)  # noqa: E731
        square = (kernel[0], kernel[0])
        wn = nn.utils.parametrizations.weight_norm
        self.convs = nn.ModuleList([nn.Conv2d(2 * channels, filters, kernel, padding=pad(kernel))])  # no norm, as AudioCraft
        self.convs.extend(wn(nn.Conv2d(filters, filters, kernel, (1, 2), dilation=(d, 1), padding=pad(kernel, (d, 1))))
                          for d in dilations)
        self.convs.append(wn(nn.Conv2d(filters, filters, square, padding=pad(square))))
        self.post = wn(nn.Conv2d(filters, 1, square, padding=pad(square)))

    def forward(self, wav):
        B, C, S = wav.shape
        window = torch.hann_window(self.n_fft, device=wav.device, dtype=wav.dtype)
        spec = torch.stft(wav.reshape(B * C, S), self.n_fft, self.hop, window=window, center=False,
                          return_complex=True) / window.square().sum().sqrt()   # [B*C, freqs, frames]
        spec = spec.view(B, C, *spec.shape[1:])
        z = torch.cat([spec.real, spec.imag], 1).transpose(2, 3)               # [B, 2C, frames, freqs]
        fmaps = []
        for conv in self.convs:
            z = F.leaky_relu(conv(z), self.slope)
            fmaps.append(z)
        return self.post(z), fmaps


class MultiScaleSTFTDiscriminator(nn.Module):
    def __init__(self, channels, filters, n_ffts):
        super().__init__()
        self.scales = nn.ModuleList(STFTDiscriminator(channels, filters, n) for n in n_ffts)

    def forward(self, wav):
        """-> ([logits per scale], [[feature maps] per scale])."""
        outs = [scale(wav) for scale in self.scales]
        return [o[0] for o in outs], [o[1] for o in outs]


def discriminator_loss(disc, fake, real):
    """Hinge loss of the discriminator (real logits above 1, fake below -1), averaged over scales."""
    fake_logits, _ = disc(fake.detach())
    real_logits, _ = disc(real)
    loss = sum(F.relu(1 - r).mean() + F.relu(1 + f).mean() for f, r in zip(fake_logits, real_logits))
    return loss / len(fake_logits)


def generator_losses(disc, fake, real):
    """(adv, feat): the hinge generator loss -D(fake) and L1 feature matching against the real audio's feature
    maps, each averaged over scales (feature maps averaged within a scale). The discriminator is read-only here:
    its gradients come from discriminator_loss alone."""
    disc.requires_grad_(False)
    try:
        fake_logits, fake_maps = disc(fake)
        with torch.no_grad():
            _, real_maps = disc(real)
    finally:
        disc.requires_grad_(True)
    adv = sum(-f.mean() for f in fake_logits) / len(fake_logits)
    feat = sum(sum(F.l1_loss(a, b) for a, b in zip(fm, rm)) / len(fm) for fm, rm in zip(fake_maps, real_maps))
    return adv, feat / len(fake_maps)


# ----------------------------------------------------------------------------------------------------------
# The loss balancer

class Balancer:
    """AudioCraft's loss balancer. Each loss's gradient with respect to the codec's output y is taken separately,
    its norm (per batch item, averaged) followed by a bias-corrected EMA, and the gradients are summed rescaled,

        dL/dy = sum_i total_norm * w_i / sum_j(w_j) * g_i / avg(|g_i|),

    so that weight w_i is the share of the gradient that loss i gives, whatever its scale. `average` takes a list
    of floats to their mean over ranks (the norms are averaged across processes, as AudioCraft's)."""

    def __init__(self, weights, total_norm=1.0, decay=0.999, epsilon=1e-12):
        self.weights, self.total_norm, self.decay, self.epsilon = dict(weights), total_norm, decay, epsilon
        self.totals, self.fix = {}, {}     # EMA numerators and denominators per loss (flashy's averager)

    def state_dict(self):
        return {"totals": dict(self.totals), "fix": dict(self.fix)}

    def load_state_dict(self, state):
        self.totals, self.fix = dict(state["totals"]), dict(state["fix"])

    def backward(self, losses, y, extra=(), average=None):
        """Backpropagate the balanced gradient of `losses` {name: scalar} through y, together with `extra`
        [(scalar, weight)] added unbalanced (the commitment loss), in one backward pass. -> {name: scale}."""
        grads = {k: torch.autograd.grad(loss, [y], retain_graph=True)[0] for k, loss in losses.items()}
        norms = [float(g.flatten(1).norm(dim=1).mean()) for g in grads.values()]
        norms = average(norms) if average else norms
        total_weight = sum(self.weights[k] for k in grads)
        out = torch.zeros_like(y)
        scales = {}
        for (k, g), norm in zip(grads.items(), norms):
            self.totals[k] = self.totals.get(k, 0.0) * self.decay + norm
            self.fix[k] = self.fix.get(k, 0.0) * self.decay + 1.0
            avg = self.totals[k] / self.fix[k]
            scales[k] = self.weights[k] / total_weight * self.total_norm / (self.epsilon + avg)
            out.add_(g, alpha=scales[k])
        tensors = [y] + [loss for loss, _ in extra]
        torch.autograd.backward(tensors, [out] + [torch.full_like(loss, w) for loss, w in extra])
        return scales


# ----------------------------------------------------------------------------------------------------------
# The codec in training: weight norm, and the residual VQ's EMA codebook updates

def sample_vectors(x, n, generator):
    """n rows of x [N, D] drawn without replacement when it has enough, else with (AudioCraft's)."""
    if len(x) >= n:
        idx = torch.randperm(len(x), generator=generator)[:n]
    else:
        idx = torch.randint(len(x), (n,), generator=generator)
    return x[idx.to(x.device)]


def kmeans(x, k, iters, generator):
    """Lloyd's algorithm from k sampled rows of x [N, D] -> (centroids [k, D], counts [k]); an empty cluster keeps
    its centroid (AudioCraft's)."""
    centroids = sample_vectors(x, k, generator)
    counts = torch.zeros(k, device=x.device)
    for _ in range(iters):
        assign = nearest(x, centroids)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        filled = counts > 0
        centroids = torch.where(filled[:, None], sums / counts.clamp(min=1)[:, None], centroids)
    return centroids, counts


def nearest(x, books):
    """x [N, D], books [card, D] -> [N] index of the nearest codeword: EnCodec's expression, term for term, as
    codec.py's inference path (near-ties resolve the same way)."""
    et = books.t()
    return (-(x.pow(2).sum(1, keepdim=True) - 2 * x @ et + et.pow(2).sum(0, keepdim=True))).max(dim=-1).indices


class TrainableCodec(nn.Module):
    """A Codec with weight norm on its convolutions, as AudioCraft trains (inference folds it: fold()), and the
    residual VQ's training state per codebook: an EMA of each code's use count and of the sum of the vectors
    assigned to it (AudioCraft's EuclideanCodebook `cluster_size` and `embed_avg`). The codebooks are the codec's
    own `codebooks` buffer, so codec.encode/decode work on this model as they are."""

    def __init__(self, cfg, decay=0.99, kmeans_iters=50, dead_code_threshold=0.1, eps=1e-5):
        super().__init__()
        self.codec = Codec(cfg)
        for m in self.codec.modules():
            if isinstance(m, (Conv, ConvTr)) and m.normed:
                nn.utils.parametrizations.weight_norm(m)
        self.decay, self.kmeans_iters, self.threshold, self.eps = decay, kmeans_iters, dead_code_threshold, eps
        self.register_buffer("cluster_size", torch.zeros(cfg.n_q, cfg.card))                 # [n_q, card]
        self.register_buffer("embed_avg", torch.zeros(cfg.n_q, cfg.card, cfg.dimension))   # [n_q, card, dim]
        self.register_buffer("inited", torch.zeros(cfg.n_q))                                # 1: k-means done

    def forward(self, wav, n_q=None, generator=None, d=None):
        """wav [B, C, S] -> (reconstruction [B, C, S], codes [B, n_q, T], commitment loss). In training mode the
        codebooks are updated from this batch (across ranks when d has several)."""
        z = run_layers(self.codec.encoder, wav)                  # [B, dim, T]
        with torch.autocast(wav.device.type, enabled=False):
            zq, codes, commit = self.quantize(z.float(), n_q or self.codec.cfg.n_q, generator, d)
        return run_layers(self.codec.decoder, zq)[..., :wav.shape[-1]], codes, commit

    def quantize(self, z, n_q, generator=None, d=None):
        """z [B, dim, T] -> (quantized [B, dim, T] with straight-through gradients, codes [B, n_q, T], the mean
        over stages of the commitment MSE between each stage's input residual and its codeword)."""
        B, D, T = z.shape
        x = z.transpose(1, 2).reshape(-1, D)        # [B*T, dim]
        residual, out, losses, codes = x, torch.zeros_like(x), [], []
        for q in range(n_q):
            r = residual.detach()
            if self.training and not self.inited[q]:
                self._kmeans_init(q, r, generator, d)
            books = self.codec.codebooks[q]
            idx = nearest(r, books)
            quant = F.embedding(idx, books)          # this batch's codewords, before the update below (AudioCraft)
            if self.training:
                self._update(q, r, idx, generator, d)
            losses.append(F.mse_loss(residual, quant))
            residual, out = residual - quant, out + quant
            codes.append(idx)
        # straight through the whole stack at once (AudioCraft's fix of facebookresearch/encodec#25)
        out = x + (out - x).detach()
        return out.view(B, T, D).transpose(1, 2), torch.stack(codes).view(n_q, B, T).transpose(0, 1), torch.stack(losses).mean()

    @torch.no_grad()
    def _kmeans_init(self, q, r, generator, d):
        """Codebook q from k-means on the first batch's residuals, gathered from every rank (AudioCraft uses rank
        0's): every rank computes the same centroids, as one process with the whole batch would."""
        books, counts = kmeans(_gathered(r, d), self.codec.cfg.card, self.kmeans_iters, generator)
        self.codec.codebooks[q] = books
        self.embed_avg[q] = books
        self.cluster_size[q] = counts
        self.inited[q] = 1

    @torch.no_grad()
    def _update(self, q, r, idx, generator, d):
        """EMA of use counts and vector sums (summed over ranks: every rank makes the same update), dead codes
        replaced, codewords = average vector per code with Laplace-smoothed counts."""
        card = self.codec.cfg.card
        counts = torch.bincount(idx, minlength=card).to(r.dtype)               # [card]
        sums = torch.zeros_like(self.embed_avg[q]).index_add_(0, idx, r)      # [card, dim]
        if d is not None and d.world_size > 1:
            both = torch.cat([counts[:, None], sums], 1)
            dist.all_reduce(both)
            counts, sums = both[:, 0], both[:, 1:]
        if not (torch.isfinite(counts).all() and torch.isfinite(sums).all()):
            return   # a non-finite batch (the update is skipped too) must not poison the codebooks
        # Dead: used less than `threshold` times as often as the average code. AudioCraft counts absolutely (below 2
        # uses per update), which at small batches is most codes; its replacement was harmless only because the
        # normalisation below overwrote it in the same step. Here the statistics are reset too, to the average
        # code's, so that a replaced code lives ~230 updates (log 0.1 / log 0.99) unless the data finds it.
        average = counts.sum() / card
        dead = self.cluster_size[q] < self.threshold * average
        if self.threshold > 0 and dead.any():   # the same decision on every rank: the counts are global
            fresh = sample_vectors(_gathered(r, d), card, generator)
            self.embed_avg[q][dead] = fresh[dead] * average
            self.cluster_size[q][dead] = average
        self.cluster_size[q].mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_avg[q].mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size[q].sum()
        smoothed = (self.cluster_size[q] + self.eps) / (n + card * self.eps) * n
        self.codec.codebooks[q] = self.embed_avg[q] / smoothed[:, None]

    @torch.no_grad()
    def fold(self, state=None):
        """The inference Codec's state dict (weight norm folded into plain weights) of this model, or of it holding
        `state` (e.g. its EMA)."""
        out = Codec(self.codec.cfg)
        with holding(self, state):
            live = dict(self.codec.named_modules())
            for name, target in out.named_modules():
                if isinstance(target, (Conv, ConvTr)):
                    target.weight.copy_(live[name].weight)   # g * v / |v|, computed by the parametrization
                    target.bias.copy_(live[name].bias)
                elif isinstance(target, nn.LSTM):
                    target.load_state_dict(live[name].state_dict())
            out.codebooks.copy_(self.codec.codebooks)
        return {k: v.detach().cpu().clone() for k, v in out.state_dict().items()}


def _gathered(x, d):
    """x [N, D] of every rank, concatenated in rank order: the whole global batch, the same on every rank."""
    if d is None or d.world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(d.world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class StateEMA:
    """AudioCraft's unbiased EMA (count = count * decay + 1, ema += (x - ema) / count) over a model's whole floating
    state, buffers included, as its ModuleDictEMA: the codebooks are averaged with the encoder whose outputs they
    quantize. (train.py's EMA averages parameters only; here EMA weights with live codebooks quantize badly while the
    weights still move fast.)"""

    def __init__(self, model, decay):
        self.decay, self.count = decay, 0.0
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model):
        self.count = self.count * self.decay + 1
        live = model.state_dict()
        torch._foreach_lerp_(list(self.state.values()), [live[k].detach() for k in self.state], 1.0 / self.count)


@contextlib.contextmanager
def holding(model, state):
    """The model holds `state` (some of its state dict's entries, e.g. the EMA) inside the block, its own after."""
    if state is None:
        yield
        return
    live = model.state_dict()
    backup = {k: live[k].detach().clone() for k in state}
    with torch.no_grad():
        for k, v in state.items():
            live[k].copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for k, v in backup.items():
                live[k].copy_(v)


def sync_grads(params, d):
    """Average gradients over ranks in one collective (flashy's sync_grad; the balancer's backward and the codebook
    updates make DistributedDataParallel's hooks a poor fit)."""
    grads = [p.grad for p in params if p.grad is not None]
    if d.world_size == 1 or not grads:
        return
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= d.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


# ----------------------------------------------------------------------------------------------------------
# Data: raw audio segments at the codec's rate (no token cache: the codec is what is being trained)

def open_splits(cfg, codec, d):
    """{train, valid, generate} Segments of wav [C, S] (every rank at once; the demo set is written by one)."""
    import demo
    dataset = demo.dataset_dir(cfg.dataset, cfg.runs_dir)
    common = dict(codec=codec, seed=cfg.seed, token_cache=False, min_segment_ratio=1.0, merge_text_p=0.0,
                  max_skip_fraction=cfg.max_skip_fraction)
    splits = {"train": data.open_split(dataset, "train", train=True, segment_duration=cfg.segment_duration,
                                       sample_on_weight=True, sample_on_duration=True, **common),
              "valid": data.open_split(dataset, "valid", train=False,
                                       segment_duration=cfg.valid_duration or cfg.segment_duration, **common)}
    if cfg.generate_every:
        splits["generate"] = data.open_split(dataset, "generate", train=False,
                                             segment_duration=cfg.generate_duration or cfg.segment_duration, **common)
    train = splits["train"]
    if train.frames.max() < train.T:
        raise UserError(f"{train.name}: every file is shorter than segment_duration={cfg.segment_duration} s (the "
                        f"longest lasts {train.frames.max() / codec.frame_rate:.2f} s): lower segment_duration")
    return splits


# ----------------------------------------------------------------------------------------------------------
# The run

def step_generator(cfg, step):
    """Every random draw of update `step` (k-means starts, dead-code vectors, quantizer dropout, the discriminator's
    coin) comes from this: the same on every rank, and a resumed run replays it without saving RNG states."""
    return torch.Generator().manual_seed((cfg.seed % (1 << 31)) * 1_000_003 + step)


def format_row(row):
    keys = [k for k in ("l1", "msspec", "commit", "adv", "feat", "d_loss", "sisnr", "mel", "skipped")
            if row.get(k) is not None]
    return f"epoch {row['epoch']:>3} {row['stage']:<8} | " + " | ".join(f"{k} {row[k]:.4g}" for k in keys)


def train(cfg, d):
    """The run: setup, then the loop. -> exit status (0 done, EXIT_REQUEUE stopped by a signal, 1 diverged)."""
    validate(cfg, d.world_size)
    sig = config_signature(cfg)
    out = env.run_dir(sig, cfg.runs_dir or None)
    log = Log(d)
    env.install_stop_handlers()
    if not cfg.clear and finished(out / "checkpoint.pt", cfg.epochs):   # before any data is read
        log(f"run {sig} already finished {cfg.epochs} epochs")
        return 0
    device = d.device
    torch.manual_seed(cfg.seed)   # the same initial weights on every rank
    model = TrainableCodec(codec_config(cfg), cfg.vq_decay, cfg.kmeans_iters, cfg.dead_code_threshold).to(device)
    codec = model.codec
    gan = cfg.adv > 0 or cfg.feat > 0
    disc = MultiScaleSTFTDiscriminator(cfg.channels, cfg.disc_filters, cfg.disc_n_ffts).to(device) if gan else None
    adam = dict(lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, fused=True)
    optimizer = torch.optim.Adam(model.parameters(), **adam)
    disc_optimizer = torch.optim.Adam(disc.parameters(), **adam) if gan else None
    ema = StateEMA(model, cfg.ema_decay) if cfg.ema else None
    weights = {k: getattr(cfg, k) for k in ("l1", "msspec", "adv", "feat") if getattr(cfg, k) > 0}
    balancer = Balancer(weights, cfg.balancer_total_norm, cfg.balancer_decay) if cfg.balancer else None
    autocast = dict(device_type=device.type, dtype=getattr(torch, cfg.dtype), enabled=cfg.dtype != "float32")
    splits = open_splits(cfg, codec, d)   # a bad dataset fails before the run directory exists
    micro = cfg.batch_size // d.world_size
    total = cfg.epochs * cfg.updates_per_epoch
    s = {"epoch": 1, "step": 0, "history": [], "best_state": None, "nonfinite": 0}   # what a checkpoint carries

    def save(keep=False):
        ckpt = {"model": _cpu(model.state_dict()), "optimizer": optimizer.state_dict(),
                "disc": _cpu(disc.state_dict()) if gan else None,
                "disc_optimizer": disc_optimizer.state_dict() if gan else None,
                "balancer": balancer.state_dict() if balancer else None,
                "ema": {"state": _cpu(ema.state), "count": ema.count} if ema else None,
                "codec_config": dataclasses.asdict(codec.cfg), "config": config_dict(cfg), **s}
        if not d.main:
            return
        save_atomic(ckpt, out / "checkpoint.pt")
        history = "".join(json.dumps(row) + "\n" for row in s["history"]).encode()
        write_run_file(out / "history.jsonl", lambda f: f.write(history))
        if keep:  # a real copy, so that damage to checkpoint.pt leaves it readable
            with open(out / "checkpoint.pt", "rb") as src:
                write_run_file(out / f"checkpoint_{s['epoch'] - 1}.pt", lambda f: shutil.copyfileobj(src, f))

    def resume():
        ckpt = load_checkpoint(out / "checkpoint.pt")
        if not isinstance(ckpt, dict) or "codec_config" not in ckpt:
            raise UserError(f"{out / 'checkpoint.pt'}: not a train_codec.py checkpoint; run with --clear=True to "
                            f"start afresh")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if gan:
            disc.load_state_dict(ckpt["disc"])
            disc_optimizer.load_state_dict(ckpt["disc_optimizer"])
        if balancer:
            balancer.load_state_dict(ckpt["balancer"])
        if ema:
            ema.state = {k: v.to(device, copy=True) for k, v in ckpt["ema"]["state"].items()}
            ema.count = ckpt["ema"]["count"]
        s.update({k: ckpt[k] for k in s})
        log(f"resumed from checkpoint.pt: epoch {s['epoch']}, update {s['step']}")

    with run_directory(cfg, d, out, sig):
        log.file = out / "log.txt"
        if (out / "checkpoint.pt").exists():
            resume()
        c = codec.cfg
        log(f"nanomusicgen codec run {sig} at {out}")
        log(f"codec {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters | {c.sample_rate} Hz, hop "
            f"{c.hop}, {codec.frame_rate:g} frames/s, {c.n_q} x {c.card} codes "
            f"({c.n_q * math.log2(c.card) * codec.frame_rate / 1000:g} kbps) | "
            + (f"discriminator {sum(p.numel() for p in disc.parameters()) / 1e6:.2f}M" if gan else "no discriminator"))
        log(f"{d.world_size} x {device.type} | batch {cfg.batch_size} = {d.world_size} x {micro} segments of "
            f"{cfg.segment_duration:g} s | {splits['train']}")
        log("config: " + json.dumps(config_delta(cfg), sort_keys=True))
        if s["epoch"] > cfg.epochs:
            log(f"run {sig} already finished {cfg.epochs} epochs")
            return 0
        set_status(out, d, "running")
        batches = iter(data.make_loader(splits["train"], micro, rank=d.rank, world_size=d.world_size,
                                        start=s["step"], num_workers=cfg.num_workers,
                                        pin_memory=device.type == "cuda"))
        while s["epoch"] <= cfg.epochs:
            model.train()
            sums, counted, t_log, t_data, n_log = {}, 0, time.time(), 0.0, 0
            while s["step"] < s["epoch"] * cfg.updates_per_epoch:
                lr = lr_at(cfg, s["step"], total)
                for opt in filter(None, (optimizer, disc_optimizer)):
                    for group in opt.param_groups:
                        group["lr"] = lr
                t = time.time()
                wav = next(batches)["wav"].to(device, non_blocking=True)   # [B, C, S]
                t_data += time.time() - t
                g = step_generator(cfg, s["step"])
                n_q = int(torch.randint(1, c.n_q + 1, (1,), generator=g)) if cfg.q_dropout else c.n_q
                with torch.autocast(**autocast):
                    out_wav, _, commit = model(wav, n_q, g, d)
                out_wav = out_wav.float()
                metrics = {}
                if gan and float(torch.rand(1, generator=g)) <= 1 / cfg.adv_every:
                    with torch.autocast(**autocast):
                        d_loss = discriminator_loss(disc, out_wav, wav)
                    disc_optimizer.zero_grad(set_to_none=True)
                    d_loss.backward()
                    sync_grads(list(disc.parameters()), d)
                    disc_optimizer.step()
                    metrics["d_loss"] = d_loss.detach()
                losses = {}
                if cfg.l1:
                    losses["l1"] = F.l1_loss(out_wav, wav)
                if cfg.msspec:
                    losses["msspec"] = msspec_loss(out_wav, wav, c.sample_rate)
                if gan:
                    with torch.autocast(**autocast):
                        adv, feat = generator_losses(disc, out_wav, wav)
                    losses.update({k: v.float() for k, v in (("adv", adv), ("feat", feat)) if getattr(cfg, k) > 0})
                # the same decision on every rank: a rank that skips while another steps would desynchronise them
                finite = all_sum(d, [sum(float(v.detach()) for v in [*losses.values(), commit])])[0]
                finite = math.isfinite(finite)
                if finite:
                    if balancer:
                        average = (lambda xs: [x / d.world_size for x in all_sum(d, xs)]) if d.world_size > 1 else None
                        balancer.backward(losses, out_wav, extra=[(commit, cfg.commitment)], average=average)
                    else:
                        (sum(weights[k] * v for k, v in losses.items()) + cfg.commitment * commit).backward()
                    sync_grads(list(model.parameters()), d)
                    if cfg.max_norm:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_norm)
                    optimizer.step()
                    s["nonfinite"] = 0
                else:
                    s["nonfinite"] += 1
                    log(f"warning: update {s['step'] + 1}: non-finite loss ("
                        + ", ".join(f"{k} {float(v.detach()):.4g}" for k, v in losses.items())
                        + f"); skipped ({s['nonfinite']} in a row)")
                    if s["nonfinite"] >= 10:
                        log(f"error: 10 non-finite updates in a row: the codec diverged (lower lr); the last good "
                            f"checkpoint is {out / 'checkpoint.pt'}")
                        set_status(out, d, "failed")
                        return 1
                optimizer.zero_grad(set_to_none=True)
                s["step"] += 1
                if ema and s["step"] % cfg.ema_every == 0:
                    ema.update(model)
                metrics.update({k: v.detach() for k, v in losses.items()}, commit=commit.detach())
                if finite:
                    for k, v in metrics.items():
                        sums[k] = sums.get(k, 0.0) + float(v)
                    counted += 1
                n_log += 1
                in_epoch = s["step"] - (s["epoch"] - 1) * cfg.updates_per_epoch
                if in_epoch % cfg.log_every == 0 or in_epoch == cfg.updates_per_epoch:
                    *means, stops = all_sum(d, [*metrics.values(), env.stop_requested() is not None])  # all ranks'
                    dt = time.time() - t_log
                    rate = n_log * cfg.batch_size * cfg.segment_duration / dt   # seconds of audio per second
                    log(f"epoch {s['epoch']} step {in_epoch}/{cfg.updates_per_epoch} | "
                        + " | ".join(f"{k} {v / d.world_size:.4g}" for k, v in zip(metrics, means))
                        + f" | n_q {n_q} | lr {lr:.1e} | {rate:.3g}x real time | data {100 * t_data / dt:.0f}%")
                    t_log, t_data, n_log = time.time(), 0.0, 0
                    if stops and in_epoch < cfg.updates_per_epoch:
                        save()
                        log(f"stopped by signal {env.stop_requested() or 'on another rank'} at update {s['step']}: "
                            f"checkpoint written, exit {EXIT_REQUEUE} asks for a requeue (run the same command again "
                            f"to resume)")
                        set_status(out, d, "preempted")
                        return EXIT_REQUEUE
            totals = all_sum(d, [sums.get(k, 0.0) / max(counted, 1) for k in sorted(sums)])
            row = {"epoch": s["epoch"], "stage": "train", "step": s["step"],
                   **{k: v / d.world_size for k, v in zip(sorted(sums), totals)},
                   "skipped": cfg.updates_per_epoch - counted}
            s["history"].append(row)
            log(format_row(row))
            with holding(model, ema.state if ema else None):
                row = {"epoch": s["epoch"], **valid_stage(cfg, model, splits["valid"], d)}
                s["history"].append(row)
                log(format_row(row))
                s["best_state"] = model.fold()   # AudioCraft keeps the latest EMA weights of a codec as its best
                last = s["epoch"] == cfg.epochs
                if cfg.generate_every and (s["epoch"] % cfg.generate_every == 0 or last) and d.main:
                    t = time.time()
                    out_dir = generate_stage(cfg, codec, splits["generate"], out / "samples" / str(s["epoch"]))
                    log(f"epoch {s['epoch']:>3} generate | {min(cfg.generate_count, len(splits['generate']))} "
                        f"reconstructions in {out_dir} ({time.time() - t:.1f}s)")
            s["epoch"] += 1
            save(keep=(s["epoch"] - 1) % cfg.save_every == 0)
        set_status(out, d, "done")
        log(f"done: {cfg.epochs} epochs | " + format_row(s["history"][-1]).split("| ", 1)[1])
        return 0


def _cpu(state):
    return {k: v.detach().cpu().clone() for k, v in state.items()}


@torch.no_grad()
def valid_stage(cfg, model, split, d):
    """Reconstruction through the inference path (codec.encode, then decode: what tokenizing and sampling use) of one
    segment per file: SI-SNR (dB) and mel distance, per item over its real samples, and the training losses."""
    codec, hop = model.codec, model.codec.hop
    sums, count = [0.0] * 4, 0
    for i, batch in enumerate(data.make_loader(split, max(1, cfg.batch_size // d.world_size), rank=d.rank,
                                               world_size=d.world_size, train=False)):
        if cfg.valid_batches and i >= cfg.valid_batches:
            break
        wav = batch["wav"].to(d.device)                            # [B, C, S]
        out = codec.decode(codec.encode(wav))[..., :wav.shape[-1]]
        for b, frames in enumerate(batch["valid"].sum(1).tolist()):
            if frames * hop < 1024:   # shorter than the mel distance's window: the file is too short to measure
                continue
            x, y = wav[b:b + 1, :, :frames * hop], out[b:b + 1, :, :frames * hop]
            sums[0] += float(si_snr(y, x))
            sums[1] += float(mel_distance(y, x, codec.sample_rate))
            sums[2] += float(F.l1_loss(y, x))
            sums[3] += float(msspec_loss(y, x, codec.sample_rate))
            count += 1
    *sums, count = all_sum(d, sums + [count])
    count = max(count, 1)
    return {"stage": "valid", "sisnr": sums[0] / count, "mel": sums[1] / count, "l1": sums[2] / count,
            "msspec": sums[3] / count}


@torch.no_grad()
def generate_stage(cfg, codec, split, out_dir):
    """Reconstructions of the generate split's first files (from their start, generate_duration seconds) as wav,
    each beside its reference."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for i in range(min(cfg.generate_count, len(split))):
        item = split[i]
        n = int(item["valid"].sum()) * codec.hop
        wav = item["wav"][None, :, :n].to(codec.codebooks.device)      # [1, C, S]
        out = codec.decode(codec.encode(wav))[0, :, :n]
        data.save_audio(out_dir / f"{i:03d}.wav", out.cpu(), codec.sample_rate)
        data.save_audio(out_dir / f"{i:03d}_reference.wav", wav[0].cpu(), codec.sample_rate)
        measured = n >= 1024   # the mel distance's window
        meta = {"source": item["path"], "description": item["description"],
                "sisnr": float(si_snr(out[None], wav)) if measured else None,
                "mel": float(mel_distance(out[None], wav, codec.sample_rate)) if measured else None}
        (out_dir / f"{i:03d}.json").write_text(json.dumps(meta, indent=1))
    return out_dir


def print_config(cfg):
    width = max(len(f.name) for f in fields(cfg))
    for f in fields(cfg):
        print(f"{f.name:<{width}} = {getattr(cfg, f.name)!r}")
    print(f"signature: {config_signature(cfg)}")
    print(f"run dir:   {env.run_dir(config_signature(cfg), cfg.runs_dir or None)}")


def main(argv):
    cfg = env.parse_config(Config, argv)
    validate(cfg)
    if cfg.print_config:
        print_config(cfg)
        return 0
    d = setup_distributed(cfg)
    return run_to_exit(d, env.run_dir(config_signature(cfg), cfg.runs_dir or None), lambda: train(cfg, d))


if __name__ == "__main__":
    env.cli(main)
