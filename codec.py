"""The frozen audio tokenizer: an EnCodec port (SEANet encoder/decoder with LSTM, residual vector quantizer).

Computes what AudioCraft's EnCodec and Hugging Face's EncodecModel compute, from plain weights (weight norm is folded
away when formats.py loads them: AudioCraft's `compression_state_dict.bin`, Hugging Face EnCodec directories).
`formats.load_codec("debug")` is a tiny seeded codec for tests (demo.py builds it); train_codec.py trains codecs.

    python formats.py codec //reference/encodec_32khz          # summary and identity of a codec
    python formats.py codec debug in.wav out.wav               # encode + decode a file
    python formats.py codec PATH --export=out/                 # write AudioCraft's compression_state_dict.bin

Long inputs are processed in time chunks (bounded memory) without changing the math: the convolutions before
the LSTM have a finite receptive field, so chunks overlap by a margin that covers it; the LSTM runs over the
whole sequence, a chunk at a time with its state carried; the decoder's upsampling stack is chunked like the
encoder's convolutions. Inputs that fit one pass (20 s on CPU) give EnCodec's bits exactly; chunked ones differ
by float rounding (~1e-6 relative, the conv kernels round differently on other lengths), which can flip a code
at a near-tie (none in the tests).
"""
import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from env import UserError


@dataclass
class CodecConfig:
    sample_rate: int = 32000
    channels: int = 1                 # the codec's own channels (stereo MusicGen wraps a mono codec instead)
    n_filters: int = 64
    ratios: tuple = (8, 5, 4, 4)      # decoder (upsampling) order; the encoder uses them reversed
    dimension: int = 128              # latent size = codebook dimension
    n_residual_layers: int = 1
    kernel_size: int = 7
    residual_kernel_size: int = 3
    last_kernel_size: int = 7
    dilation_base: int = 2
    compress: int = 2                 # residual branch width = dim // compress
    lstm: int = 2                     # LSTM layers after the encoder / before the decoder (0: none)
    causal: bool = False
    pad_mode: str = "reflect"         # "reflect" (HF encodec_32khz) or "constant" (AudioCraft's xp.cfg)
    true_skip: bool = True            # identity shortcut in residual blocks (False: a 1x1 conv)
    norm: str = "weight_norm"         # how the source stores conv weights: "weight_norm" or "none"
    disable_norm_outer_blocks: int = 0
    trim_right_ratio: float = 1.0
    n_q: int = 4                      # residual codebooks per channel
    card: int = 2048                  # entries per codebook

    def __post_init__(self):
        # the declared types, so that configs read from YAML or JSON hash alike (identity())
        for f in fields(self):
            value = getattr(self, f.name)
            setattr(self, f.name, tuple(int(r) for r in value) if f.name == "ratios" else
                    (bool(value) if f.type is bool else f.type(value)))

    @staticmethod
    def encodec_32khz(pad_mode="reflect"):
        """MusicGen's tokenizer. The HF hub config says reflect; AudioCraft's own xp.cfg says constant."""
        return CodecConfig(pad_mode=pad_mode)

    @staticmethod
    def debug():
        """A tiny 32 kHz codec with the same hop (640) and frame rate (50 Hz): ~100 s of audio per second."""
        return CodecConfig(n_filters=4, dimension=32, lstm=1, n_q=4, card=256, pad_mode="constant")

    @property
    def hop(self):
        return math.prod(self.ratios)


# ----------------------------------------------------------------------------------------------------------
# SEANet layers. Module names follow AudioCraft's Sequential indices minus the weight-norm wrappers, so a
# state dict maps onto ours by dropping `.model`/`.layers`, `conv.conv.`/`convtr.convtr.`/`conv.`.

def pad1d(x, left, right, mode):
    """F.pad, except that reflect padding of a signal shorter than the pad first appends zeros (as EnCodec)."""
    if mode != "reflect":
        return F.pad(x, (left, right), mode)
    extra = max(0, max(left, right) - x.shape[-1] + 1)
    if extra:
        x = F.pad(x, (0, extra))
    x = F.pad(x, (left, right), mode)
    return x[..., :x.shape[-1] - extra]


class Conv(nn.Conv1d):
    """Conv1d with EnCodec's padding: output length ceil(length / stride), extra right padding so the last
    window is full."""

    def __init__(self, cin, cout, kernel_size, stride=1, dilation=1, *, cfg, normed=True):
        super().__init__(cin, cout, kernel_size, stride, dilation=dilation)
        self.causal, self.pad_mode, self.normed = cfg.causal, cfg.pad_mode, normed and cfg.norm == "weight_norm"

    def forward(self, x):
        k, s = (self.kernel_size[0] - 1) * self.dilation[0] + 1, self.stride[0]
        total = k - s
        extra = -(-x.shape[-1] // s) * s - x.shape[-1]
        left = total if self.causal else total - total // 2
        right = total - left + extra
        if self.pad_mode == "constant" and left == right:   # zeros: let the kernel pad, saving a copy
            return F.conv1d(x, self.weight, self.bias, s, left, self.dilation)
        return F.conv1d(pad1d(x, left, right, self.pad_mode), self.weight, self.bias, s, 0, self.dilation)


class ConvTr(nn.ConvTranspose1d):
    """ConvTranspose1d trimmed back to length * stride."""

    def __init__(self, cin, cout, kernel_size, stride, *, cfg, normed=True):
        super().__init__(cin, cout, kernel_size, stride)
        self.causal, self.trim_right_ratio = cfg.causal, cfg.trim_right_ratio
        self.normed = normed and cfg.norm == "weight_norm"

    def forward(self, x):
        total = self.kernel_size[0] - self.stride[0]
        right = math.ceil(total * self.trim_right_ratio) if self.causal else total // 2
        y = F.conv_transpose1d(x, self.weight, self.bias, self.stride)
        return y[..., total - right:y.shape[-1] - right]


class ResBlock(nn.Module):
    def __init__(self, dim, dilation, cfg, normed):
        super().__init__()
        hidden = dim // cfg.compress
        self.block = nn.Sequential(   # x itself is kept for the skip: only the second ELU works in place
            nn.ELU(), Conv(dim, hidden, cfg.residual_kernel_size, dilation=dilation, cfg=cfg, normed=normed),
            nn.ELU(inplace=True), Conv(hidden, dim, 1, cfg=cfg, normed=normed))
        self.shortcut = nn.Identity() if cfg.true_skip else Conv(dim, dim, 1, cfg=cfg, normed=normed)

    def forward(self, x):
        return self.block(x).add_(self.shortcut(x))


class LSTM(nn.Module):
    """Time-major LSTM with a skip connection, on [B, C, T]; `state` carries over between time chunks."""

    def __init__(self, dim, layers):
        super().__init__()
        self.lstm = nn.LSTM(dim, dim, layers)

    def forward(self, x, state=None):
        x = x.permute(2, 0, 1)
        y, state = self.lstm(x, state)
        return (y + x).permute(1, 2, 0), state


def seanet_encoder(cfg):
    nf, n_blocks, off = cfg.n_filters, len(cfg.ratios) + 2, cfg.disable_norm_outer_blocks
    layers = [Conv(cfg.channels, nf, cfg.kernel_size, cfg=cfg, normed=off < 1)]
    mult = 1
    for i, ratio in enumerate(reversed(cfg.ratios)):
        normed = off < i + 2
        layers += [ResBlock(mult * nf, cfg.dilation_base ** j, cfg, normed) for j in range(cfg.n_residual_layers)]
        layers += [nn.ELU(inplace=True),
                   Conv(mult * nf, 2 * mult * nf, 2 * ratio, stride=ratio, cfg=cfg, normed=normed)]
        mult *= 2
    if cfg.lstm:
        layers.append(LSTM(mult * nf, cfg.lstm))
    layers += [nn.ELU(inplace=True),
               Conv(mult * nf, cfg.dimension, cfg.last_kernel_size, cfg=cfg, normed=off < n_blocks)]
    return nn.Sequential(*layers)


def seanet_decoder(cfg):
    nf, n_blocks, off = cfg.n_filters, len(cfg.ratios) + 2, cfg.disable_norm_outer_blocks
    mult = 2 ** len(cfg.ratios)
    layers = [Conv(cfg.dimension, mult * nf, cfg.kernel_size, cfg=cfg, normed=off < n_blocks)]
    if cfg.lstm:
        layers.append(LSTM(mult * nf, cfg.lstm))
    for i, ratio in enumerate(cfg.ratios):
        normed = off < n_blocks - (i + 1)
        # in place except the first: the decoder's chunks are overlapping views of the LSTM's output
        layers += [nn.ELU(inplace=i > 0), ConvTr(mult * nf, mult * nf // 2, 2 * ratio, ratio, cfg=cfg, normed=normed)]
        layers += [ResBlock(mult * nf // 2, cfg.dilation_base ** j, cfg, normed) for j in range(cfg.n_residual_layers)]
        mult //= 2
    layers += [nn.ELU(inplace=True), Conv(nf, cfg.channels, cfg.last_kernel_size, cfg=cfg, normed=off < 1)]
    return nn.Sequential(*layers)


def run_layers(layers, x):
    """x through a SEANet stack in one pass (the LSTM's state dropped): the differentiable path training takes."""
    for layer in layers:
        x = layer(x)[0] if isinstance(layer, LSTM) else layer(x)
    return x


def _convs(layers):
    return [m for m in layers.modules() if isinstance(m, (Conv, ConvTr))]


def chunk_margin(layers, up):
    """Frames of context on each side that make a chunk's interior exact: the span of inputs one output
    depends on, summed over the convolutions. `up` for the decoder, whose positions shrink as it goes."""
    span, per_frame = 0.0, 1   # positions per frame at the layer's input (decoder); samples per position (encoder)
    for m in _convs(layers):
        k, s = (m.kernel_size[0] - 1) * m.dilation[0] + 1, m.stride[0]
        if up:
            span += (math.ceil(k / s) if isinstance(m, ConvTr) else k - 1) / per_frame
            per_frame *= s if isinstance(m, ConvTr) else 1
        else:
            span += (k - 1) * per_frame
            per_frame *= s
    return math.ceil(span if up else span / per_frame) + 1


# ----------------------------------------------------------------------------------------------------------
# The codec

class Codec(nn.Module):
    """encode(wav [B, C, S]) -> codes [B, K, ceil(S / hop)]; decode(codes [B, K, T]) -> wav [B, C, T * hop].
    With stereo=True a mono codec codes left and right separately, codebooks interleaved [1L, 1R, 2L, 2R, ..]
    (AudioCraft's InterleaveStereoCompressionModel): channels 2 and n_q = K = 2 * cfg.n_q."""

    def __init__(self, cfg, stereo=False):
        super().__init__()
        if stereo and cfg.channels != 1:
            raise UserError(f"stereo=True wraps a mono codec, but this codec has {cfg.channels} channels")
        self.cfg, self.stereo = cfg, stereo
        self.sample_rate, self.card, self.hop = cfg.sample_rate, cfg.card, cfg.hop
        self.channels = 2 if stereo else cfg.channels
        self.n_q = cfg.n_q * (2 if stereo else 1)
        self.frame_rate = cfg.sample_rate / cfg.hop
        self.encoder, self.decoder = seanet_encoder(cfg), seanet_decoder(cfg)
        self.register_buffer("codebooks", torch.zeros(cfg.n_q, cfg.card, cfg.dimension))  # [n_q, card, dim]
        # The LSTM splits each network in two: chunked convolutions on the audio side, whole-sequence work
        # at frame rate on the other.
        lstm_at = [i for i, m in enumerate(self.encoder) if isinstance(m, LSTM)]
        self._enc_split = lstm_at[0] if lstm_at else len(self.encoder)
        lstm_at = [i for i, m in enumerate(self.decoder) if isinstance(m, LSTM)]
        self._dec_split = lstm_at[0] + 1 if lstm_at else 0
        self._enc_margin = chunk_margin(self.encoder[:self._enc_split], up=False)
        self._dec_margin = chunk_margin(self.decoder[self._dec_split:], up=True)
        self.max_frames = None  # frames (summed over the batch) per convolution pass; None: by device
        self._identity = None

    # -- chunking --------------------------------------------------------------------------------------
    def _plan(self, batch, frames):
        """Items per pass and frames per chunk so that one pass sees about `max_frames` frames: whole items
        while they fit, else one item at a time in time chunks."""
        budget = self.max_frames or (20_000 if self.codebooks.is_cuda else 1000)
        group = max(1, min(batch, budget // frames))
        return group, max(budget // group, 2 * max(self._enc_margin, self._dec_margin))

    def _lstm(self, lstm, h, chunk):
        """Run `lstm` over h [B, C, T] in place, a time chunk at a time with its state carried (exact)."""
        state = None
        for t in range(0, h.shape[-1], chunk):
            h[..., t:t + chunk], state = lstm(h[..., t:t + chunk], state)
        return h

    def _encode_native(self, wav):
        """The convolutions run in groups of items and time chunks (bounded memory); the LSTM and what follows
        run once over the whole batch at frame rate, where batching halves the LSTM's cost per item."""
        B, _, S = wav.shape
        T = -(-S // self.hop)
        group, chunk = self._plan(B, T)
        front, back = self.encoder[:self._enc_split], self.encoder[self._enc_split:]
        m, h = self._enc_margin, None   # h: [B, D, T] pre-LSTM features
        for b in range(0, B, group):
            x = wav[b:b + group]
            for t0 in range(0, T, chunk):
                t1 = min(T, t0 + chunk)
                a, z = max(0, t0 - m), min(T, t1 + m)
                y = front(x[..., a * self.hop:min(S, z * self.hop)])  # [g, D, z - a]
                if h is None:
                    h = y.new_empty(B, y.shape[1], T)
                h[b:b + group, :, t0:t1] = y[..., t0 - a:t1 - a]
        for layer in back:   # whole sequences at frame rate
            h = self._lstm(layer, h, chunk) if isinstance(layer, LSTM) else layer(h)
        return self._quantize(h, chunk)

    def _decode_native(self, codes):
        """Dequantizing and the LSTM run once over the whole batch; the upsampling convolutions in groups of items
        and time chunks."""
        B, _, T = codes.shape
        group, chunk = self._plan(B, T)
        head, tail = self.decoder[:self._dec_split], self.decoder[self._dec_split:]
        m, h = self._dec_margin, self._dequantize(codes)          # [B, dim, T]
        for layer in head:
            h = self._lstm(layer, h, chunk) if isinstance(layer, LSTM) else layer(h)
        wav = h.new_empty(B, self.cfg.channels, T * self.hop)
        for b in range(0, B, group):
            for t0 in range(0, T, chunk):
                t1 = min(T, t0 + chunk)
                a, z = max(0, t0 - m), min(T, t1 + m)
                y = tail(h[b:b + group, :, a:z])                   # [g, C, (z - a) * hop]
                wav[b:b + group, :, t0 * self.hop:t1 * self.hop] = y[..., (t0 - a) * self.hop:(t1 - a) * self.hop]
        return wav

    # -- residual vector quantizer ---------------------------------------------------------------------
    def _quantize(self, z, chunk):
        """z [g, dim, T] -> codes [g, n_q, T]: nearest codeword per stage, on the residual of the previous."""
        g, dim, T = z.shape
        res = z.transpose(1, 2).reshape(-1, dim)
        codes = torch.empty(self.cfg.n_q, res.shape[0], dtype=torch.long, device=z.device)
        rows = max(1, 4 * chunk)
        for r in range(0, res.shape[0], rows):
            x = res[r:r + rows]
            for q in range(self.cfg.n_q):
                et = self.codebooks[q].t()   # [dim, card]
                # EnCodec's expression, term for term, so that near-ties resolve the same way
                dist = -(x.pow(2).sum(1, keepdim=True) - 2 * x @ et + et.pow(2).sum(0, keepdim=True))
                codes[q, r:r + rows] = idx = dist.max(dim=-1).indices
                x = x - F.embedding(idx, self.codebooks[q])
        return codes.view(self.cfg.n_q, g, T).transpose(0, 1)

    def _dequantize(self, codes):
        """codes [g, n_q, T] -> z [g, dim, T], the sum of the stages' codewords."""
        z = F.embedding(codes[:, 0], self.codebooks[0])
        for q in range(1, codes.shape[1]):
            z = z + F.embedding(codes[:, q], self.codebooks[q])
        return z.transpose(1, 2)

    # -- public ----------------------------------------------------------------------------------------
    def check_rate(self, sample_rate):
        if sample_rate != self.sample_rate:
            raise UserError(f"audio sample rate {sample_rate} Hz does not match the codec's {self.sample_rate} Hz: "
                            f"resample to {self.sample_rate} Hz first")

    @torch.no_grad()
    def encode(self, wav, sample_rate=None):
        """wav [B, C, S] float -> codes [B, K, ceil(S / hop)] int64 (K = n_q)."""
        if sample_rate is not None:
            self.check_rate(sample_rate)
        if not torch.is_tensor(wav) or wav.dim() != 3:
            shape = tuple(wav.shape) if hasattr(wav, "shape") else type(wav).__name__
            raise UserError(f"audio must be a tensor [batch, channels, samples], got {shape}")
        if not wav.is_floating_point():
            raise UserError(f"audio must be float samples in [-1, 1], got dtype {wav.dtype}")
        B, C, S = wav.shape
        if C != self.channels:
            hint = "load the codec with stereo=True" if C == 2 and self.cfg.channels == 1 else "convert it first"
            raise UserError(f"audio has {C} channel(s) but the codec takes {self.channels}: {hint}")
        if B == 0 or S == 0:
            raise UserError(f"empty audio (shape {tuple(wav.shape)}): nothing to encode")
        if not torch.isfinite(wav).all():
            raise UserError("audio contains NaN or infinite samples: check the file or the preprocessing")
        wav = wav.to(self.codebooks.device, self.codebooks.dtype)
        if not self.stereo:
            return self._encode_native(wav)
        codes = self._encode_native(wav.reshape(B * 2, 1, S))   # [B*2, n_q, T], rows b0L, b0R, b1L, ...
        return codes.view(B, 2, self.cfg.n_q, -1).transpose(1, 2).reshape(B, self.n_q, -1)

    @torch.no_grad()
    def decode(self, codes):
        """codes [B, K, T] int -> wav [B, C, T * hop] float32."""
        if not torch.is_tensor(codes) or codes.dim() != 3 or codes.is_floating_point():
            shape = tuple(codes.shape) if hasattr(codes, "shape") else type(codes).__name__
            raise UserError(f"codes must be an integer tensor [batch, {self.n_q}, frames], got {shape}")
        B, K, T = codes.shape
        if K != self.n_q:
            raise UserError(f"codes have {K} codebooks but the codec has {self.n_q}")
        if B == 0 or T == 0:
            raise UserError(f"empty codes (shape {tuple(codes.shape)}): nothing to decode")
        if codes.min() < 0 or codes.max() >= self.card:
            raise UserError(f"codes out of range [0, {self.card}): min {int(codes.min())}, max {int(codes.max())}")
        codes = codes.to(self.codebooks.device, torch.long)
        if not self.stereo:
            return self._decode_native(codes)
        codes = codes.view(B, self.cfg.n_q, 2, T).transpose(1, 2).reshape(B * 2, self.cfg.n_q, T)
        return self._decode_native(codes).view(B, 2, -1)

    @torch.no_grad()
    def decode_latent(self, codes):
        """codes [B, K, T] -> the quantized latents the decoder starts from [B, dim, T] (stereo: [B, 2*dim, T]).
        Per-frame embeddings for the evaluate stage's Fréchet distance, with no audio decoded."""
        B, K, T = codes.shape
        if K != self.n_q:
            raise UserError(f"codes have {K} codebooks but the codec has {self.n_q}")
        codes = codes.to(self.codebooks.device, torch.long)
        if self.stereo:  # [1L, 1R, 2L, 2R, ...] -> left and right stacked along the channel axis
            codes = codes.view(B, self.cfg.n_q, 2, T).transpose(1, 2).reshape(B * 2, self.cfg.n_q, T)
            return self._dequantize(codes).reshape(B, -1, T)
        return self._dequantize(codes)

    def identity(self):
        """A stable short hash of the config and weights (token caches record it)."""
        if self._identity is None:
            h = hashlib.sha256(json.dumps([asdict(self.cfg), self.stereo], sort_keys=True).encode())
            for name, t in sorted(self.state_dict().items()):
                h.update(name.encode())
                h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
            self._identity = h.hexdigest()[:16]
        return self._identity
