"""The frozen audio tokenizer: an EnCodec port (SEANet encoder/decoder with LSTM, residual vector quantizer).

Loads the weights users hold: AudioCraft's `compression_state_dict.bin` (legacy `weight_g`/`weight_v` or
`parametrizations.weight.original0/1` names, config from its `xp.cfg`), Hugging Face EnCodec directories
(`config.json` + `model.safetensors` or `pytorch_model.bin`) and codecs trained by train_codec.py (a run directory or
its signature), and computes what they compute. Weight norm is
folded into plain weights at load time. `load_codec("debug")` is a tiny seeded codec for tests (demo.py builds it).

    python codec.py //reference/encodec_32khz                  # summary and identity of a codec
    python codec.py debug in.wav out.wav                       # encode + decode a file
    python codec.py PATH --export out/compression_state_dict.bin   # write AudioCraft's layout
    python codec.py PATH --export_hf out/encodec                   # write a Hugging Face EnCodec directory
    python codec.py SIG in.wav out.wav                             # a codec trained by train_codec.py (SIG or run dir)

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
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from env import UserError, cli, load_tensors, resolve_path, write_atomic

AUDIOCRAFT_FILE = "compression_state_dict.bin"
_EXPECTED = f"; expected an AudioCraft {AUDIOCRAFT_FILE} or a Hugging Face EnCodec directory"  # unreadable files


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


# ----------------------------------------------------------------------------------------------------------
# Loading: AudioCraft and Hugging Face layouts -> our keys, weight norm folded

def _our_key(key):
    """Map an AudioCraft or HF key onto ours; None for state we do not keep (EMA statistics)."""
    m = re.match(r"quantizer\.(?:vq\.)?layers\.(\d+)\._?codebook\.(\w+)$", key)
    if m:
        return f"codebooks.{m[1]}" if m[2] == "embed" else None
    key = re.sub(r"^(encoder|decoder)\.(model|layers)\.", r"\1.", key)
    key = key.replace("conv.conv.", "").replace("convtr.convtr.", "").replace("conv.", "")
    return key.replace("parametrizations.weight.original0", "weight_g").replace(
        "parametrizations.weight.original1", "weight_v")


def _load_weights(codec, state, source):
    """Fold weight norm (weight = g * v / |v|, norm over all dims but 0) and load into `codec`, strictly."""
    named = {_our_key(k): v for k, v in state.items()}
    ours, codebooks = {}, {}
    for k, v in named.items():
        if k is None or k.endswith(".weight_v"):
            continue
        if k == "codebooks":   # our own layout
            codebooks.update(enumerate(v))
        elif k.startswith("codebooks."):
            codebooks[int(k.split(".")[1])] = v
        elif k.endswith(".weight_g"):
            if k[:-1] + "v" not in named:
                raise UserError(f"{source}: has the weight-norm magnitude of {k[:-9]} but not its direction (_v)")
            ours[k[:-2]] = torch._weight_norm(named[k[:-1] + "v"].float(), v.float(), 0)
        else:
            ours[k] = v
    n_q = codec.cfg.n_q
    if sorted(codebooks)[:n_q] != list(range(n_q)):
        raise UserError(f"{source}: has codebooks {sorted(codebooks)}, the config needs {n_q}")
    ours["codebooks"] = torch.stack([codebooks[q] for q in range(n_q)])
    expected = codec.state_dict()
    missing = sorted(set(expected) - set(ours))
    unexpected = sorted(set(ours) - set(expected))
    if missing or unexpected:
        raise UserError(f"{source}: weights do not match the config (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    for k, v in ours.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise UserError(f"{source}: {k} has shape {tuple(v.shape)}, the config needs {tuple(expected[k].shape)}")
    codec.load_state_dict({k: v.float() for k, v in ours.items()})
    return codec


def _resolve_interpolations(node, root):
    """OmegaConf's `${a.b}` references, as an unresolved xp.cfg dump may hold them."""
    if isinstance(node, dict):
        return {k: _resolve_interpolations(v, root) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve_interpolations(v, root) for v in node]
    m = re.fullmatch(r"\$\{([\w.]+)\}", node) if isinstance(node, str) else None
    if m:
        target = root
        for part in m[1].split("."):
            target = target[part]
        return _resolve_interpolations(target, root)
    return node


def config_from_audiocraft(xp_cfg, source):
    """CodecConfig from an AudioCraft xp.cfg (YAML text or dict). Missing keys take SEANet's defaults."""
    try:
        cfg = yaml.safe_load(xp_cfg) if isinstance(xp_cfg, str) else dict(xp_cfg)
        cfg = _resolve_interpolations(cfg, cfg)
        enc, sea, rvq = cfg.get("encodec", {}), dict(cfg["seanet"]), cfg["rvq"]
    except (KeyError, TypeError, ValueError, yaml.YAMLError) as e:
        raise UserError(f"{source}: xp.cfg lacks the EnCodec settings ({type(e).__name__}: {e}): "
                        f"not a compression model file") from None
    if cfg.get("compression_model", "encodec") != "encodec" or enc.get("autoencoder", "seanet") != "seanet":
        raise UserError(f"{source}: only EnCodec (seanet + rvq) compression models are supported")
    if enc.get("renormalize", False):
        raise UserError(f"{source}: renormalize=True codecs need per-item scales, which the LM cannot use")
    dec = sea.pop("decoder", None) or {}
    if sea.pop("encoder", None) or set(dec) - {"trim_right_ratio", "final_activation", "final_activation_params"}:
        raise UserError(f"{source}: separate encoder/decoder seanet overrides are not supported")
    if sea.get("activation", "ELU") != "ELU" or (sea.get("activation_params") or {}).get("alpha", 1.0) != 1.0 \
            or dec.get("final_activation"):
        raise UserError(f"{source}: only ELU(alpha=1) activations and no final activation are supported")
    if sea.get("norm", "none") not in ("weight_norm", "none"):
        raise UserError(f"{source}: norm {sea['norm']!r} is not supported (weight_norm or none)")
    return CodecConfig(
        sample_rate=int(enc.get("sample_rate", cfg.get("sample_rate", 32000))),
        channels=int(sea.get("channels", enc.get("channels", cfg.get("channels", 1)))),
        n_filters=sea.get("n_filters", 32), ratios=tuple(sea.get("ratios", (8, 5, 4, 2))),
        dimension=sea.get("dimension", 128), n_residual_layers=sea.get("n_residual_layers", 3),
        kernel_size=sea.get("kernel_size", 7), residual_kernel_size=sea.get("residual_kernel_size", 3),
        last_kernel_size=sea.get("last_kernel_size", 7), dilation_base=sea.get("dilation_base", 2),
        compress=sea.get("compress", 2), lstm=sea.get("lstm", 0), causal=bool(sea.get("causal", False)),
        pad_mode=sea.get("pad_mode", "reflect"), true_skip=bool(sea.get("true_skip", True)),
        norm=sea.get("norm", "none"), disable_norm_outer_blocks=sea.get("disable_norm_outer_blocks", 0),
        trim_right_ratio=float(dec.get("trim_right_ratio", 1.0)), n_q=rvq.get("n_q", 8),
        card=rvq.get("bins", 1024))


def config_from_hf(c, source, n_codebooks):
    """CodecConfig from a Hugging Face EncodecConfig dict. Missing keys take transformers' defaults."""
    if c.get("normalize", False) or c.get("chunk_length_s") is not None:
        raise UserError(f"{source}: normalize/chunk_length_s (e.g. encodec_48khz) are not supported")
    if c.get("norm_type", "weight_norm") != "weight_norm":
        raise UserError(f"{source}: norm_type {c['norm_type']!r} is not supported (weight_norm only)")
    dim = c.get("hidden_size", 128)
    if c.get("codebook_dim") not in (None, dim):
        raise UserError(f"{source}: codebook_dim {c['codebook_dim']} != hidden_size {dim} is not supported")
    return CodecConfig(
        sample_rate=c.get("sampling_rate", 24000), channels=c.get("audio_channels", 1),
        n_filters=c.get("num_filters", 32), ratios=tuple(c.get("upsampling_ratios", (8, 5, 4, 2))),
        dimension=dim, n_residual_layers=c.get("num_residual_layers", 1),
        kernel_size=c.get("kernel_size", 7), residual_kernel_size=c.get("residual_kernel_size", 3),
        last_kernel_size=c.get("last_kernel_size", 7), dilation_base=c.get("dilation_growth_rate", 2),
        compress=c.get("compress", 2), lstm=c.get("num_lstm_layers", 2), causal=c.get("use_causal_conv", True),
        pad_mode=c.get("pad_mode", "reflect"), true_skip=not c.get("use_conv_shortcut", True),
        trim_right_ratio=c.get("trim_right_ratio", 1.0), n_q=n_codebooks, card=c.get("codebook_size", 1024))


def _read_audiocraft(path):
    pkg = load_tensors(path, expected=_EXPECTED)
    if not isinstance(pkg, dict):
        raise UserError(f"{path}: not an AudioCraft {AUDIOCRAFT_FILE} (no best_state/xp.cfg)")
    if "pretrained" in pkg:
        raise UserError(f"{path}: points to the pretrained model {pkg['pretrained']!r} instead of holding weights; "
                        f"download that Hugging Face directory and pass its path")
    if "best_state" not in pkg or "xp.cfg" not in pkg:
        raise UserError(f"{path}: not an AudioCraft {AUDIOCRAFT_FILE} (needs keys best_state and xp.cfg, "
                        f"has {sorted(pkg)[:5]})")
    state = pkg["best_state"]
    if isinstance(state, dict) and isinstance(state.get("model"), dict):   # a solver checkpoint's best_state
        state = state["model"]
    if not isinstance(state, dict):
        raise UserError(f"{path}: best_state is a {type(state).__name__}, not a state dict")
    return config_from_audiocraft(pkg["xp.cfg"], path), state


def _read_hf(directory):
    try:
        c = json.loads((directory / "config.json").read_text())
    except ValueError as e:
        raise UserError(f"{directory}/config.json: not valid JSON ({e})") from None
    prefix = ""
    if "audio_encoder" in c:   # a MusicGen directory: its EnCodec lives under audio_encoder.
        c, prefix = c["audio_encoder"], "audio_encoder."
    if c.get("model_type", "encodec") != "encodec":
        raise UserError(f"{directory}/config.json: model_type {c.get('model_type')!r} is not EnCodec")
    if (directory / "model.safetensors").exists():
        from safetensors import safe_open
        try:
            with safe_open(str(directory / "model.safetensors"), "pt") as f:
                state = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
        except Exception as e:   # safetensors raises its own error types
            raise UserError(f"{directory}/model.safetensors: cannot be read ({e})") from None
    elif (directory / "pytorch_model.bin").exists():
        weights = load_tensors(directory / "pytorch_model.bin", expected=_EXPECTED)
        state = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    else:
        raise UserError(f"{directory}: has config.json but no model.safetensors or pytorch_model.bin")
    n_codebooks = len({k for k in state if re.match(r"quantizer\.layers\.\d+\.codebook\.embed$", k)})
    if not n_codebooks:
        raise UserError(f"{directory}: its weights hold no quantizer.layers.N.codebook.embed: not an EnCodec")
    return config_from_hf(c, directory, n_codebooks), state


def _read_codec_run(directory):
    """(config, weights) of a train_codec.py run: the latest EMA weights it validated, weight norm already folded."""
    ckpt = load_tensors(directory / "checkpoint.pt", mmap=True, expected=_EXPECTED)
    if not isinstance(ckpt, dict) or "codec_config" not in ckpt:
        raise UserError(f"{directory}: its checkpoint.pt is not a codec's (train.py trains LMs; train_codec.py codecs)")
    if ckpt.get("best_state") is None:
        raise UserError(f"{directory}: the codec run has not finished an epoch yet: no weights to tokenize with")
    return CodecConfig(**ckpt["codec_config"]), ckpt["best_state"]


def load_codec(path, stereo=False, pad_mode=None, n_q=None):
    """A frozen Codec (eval, no grad) from an AudioCraft file or directory holding one, a Hugging Face
    directory, a train_codec.py run (its directory, or its signature under the team's runs directory), a
    //reference/... path, "demo" (the demo's trained codec, shipped in assets/) or "debug". pad_mode/n_q override the file's (AudioCraft inference used constant padding
    where the HF config says reflect; n_q keeps the first codebooks)."""
    if str(path) == "demo":
        from demo import DEMO_CODEC   # the fixtures import this module: imported here, not above
        if not DEMO_CODEC.is_file():
            raise UserError(f"codec demo: {DEMO_CODEC} is missing: make it again with `python demo.py codec`")
        path = DEMO_CODEC
    if str(path) == "debug":
        from demo import debug_codec_state
        cfg, state = debug_codec_state()
        source = "debug"
    else:
        p = resolve_path(path)
        if not p.exists() and re.fullmatch(r"[0-9a-f]{8}", str(path)):   # a train_codec.py signature
            from env import run_dir
            p = run_dir(str(path))
        if not p.exists():
            raise UserError(f"codec {path}: {p} does not exist")
        if p.is_dir() and (p / AUDIOCRAFT_FILE).exists():
            p = p / AUDIOCRAFT_FILE
        elif p.name == "config.json" or p.suffix == ".safetensors":   # a file of an HF directory
            p = p.parent
        if p.is_dir() and (p / "checkpoint.pt").exists():
            cfg, state = _read_codec_run(p)
        elif p.is_dir() and (p / "config.json").exists():
            cfg, state = _read_hf(p)
        elif p.is_file():
            cfg, state = _read_audiocraft(p)
        else:
            raise UserError(f"codec {path}: {p} holds neither {AUDIOCRAFT_FILE}, a Hugging Face config.json nor a "
                            f"train_codec.py checkpoint.pt")
        source = str(p)
    if pad_mode is not None:
        if pad_mode not in ("reflect", "constant"):
            raise UserError(f"pad_mode must be reflect or constant, got {pad_mode!r}")
        cfg.pad_mode = pad_mode
    if n_q is not None:
        if not 1 <= n_q <= cfg.n_q:
            raise UserError(f"codec {path}: n_q={n_q} but it has {cfg.n_q} codebooks")
        cfg.n_q = n_q
    codec = _load_weights(Codec(cfg, stereo=stereo), state, source)
    return codec.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------
# Export

def audiocraft_xp_cfg(cfg):
    """The parts of an AudioCraft xp.cfg that `builders.get_compression_model` reads."""
    return {
        "sample_rate": cfg.sample_rate, "channels": cfg.channels, "compression_model": "encodec",
        "encodec": {"autoencoder": "seanet", "quantizer": "rvq", "sample_rate": cfg.sample_rate,
                    "channels": cfg.channels, "causal": cfg.causal, "renormalize": False},
        "seanet": {"dimension": cfg.dimension, "channels": cfg.channels, "causal": cfg.causal,
                   "n_filters": cfg.n_filters, "n_residual_layers": cfg.n_residual_layers,
                   "ratios": list(cfg.ratios), "activation": "ELU", "activation_params": {"alpha": 1.0},
                   "norm": cfg.norm, "norm_params": {}, "kernel_size": cfg.kernel_size,
                   "residual_kernel_size": cfg.residual_kernel_size, "last_kernel_size": cfg.last_kernel_size,
                   "dilation_base": cfg.dilation_base, "pad_mode": cfg.pad_mode, "true_skip": cfg.true_skip,
                   "compress": cfg.compress, "lstm": cfg.lstm,
                   "disable_norm_outer_blocks": cfg.disable_norm_outer_blocks,
                   "decoder": {"trim_right_ratio": cfg.trim_right_ratio, "final_activation": None,
                               "final_activation_params": None},
                   "encoder": {}},
        "rvq": {"n_q": cfg.n_q, "q_dropout": False, "bins": cfg.card, "decay": 0.99, "kmeans_init": True,
                "kmeans_iters": 50, "threshold_ema_dead_code": 2, "orthogonal_reg_weight": 0.0,
                "orthogonal_reg_active_codes_only": False},
        "device": "cpu", "dtype": "float32",
    }


def audiocraft_state(codec):
    """Our weights in AudioCraft's EncodecModel layout, weight norm as legacy weight_g / weight_v."""
    state = {}
    for side in ("encoder", "decoder"):
        for name, m in getattr(codec, side).named_modules():
            if isinstance(m, LSTM):
                for k, v in m.lstm.state_dict().items():
                    state[f"{side}.model.{name}.lstm.{k}"] = v.detach().float().cpu().clone()
            elif isinstance(m, (Conv, ConvTr)):
                wrap = "convtr.convtr" if isinstance(m, ConvTr) else "conv.conv"
                prefix = f"{side}.model.{name}.{wrap}."
                w = m.weight.detach().float().cpu()
                if m.normed:
                    # g = |w| from the same kernel that folds it at load, so g / |v| is exactly 1 and a
                    # round trip gives back the very same weights (and identity)
                    state[prefix + "weight_g"] = torch._weight_norm_interface(w, w.new_ones(len(w), 1, 1), 0)[1]
                    state[prefix + "weight_v"] = w.clone()
                else:
                    state[prefix + "weight"] = w.clone()
                state[prefix + "bias"] = m.bias.detach().float().cpu().clone()
    for q, embed in enumerate(codec.codebooks.detach().float().cpu()):
        prefix = f"quantizer.vq.layers.{q}._codebook."
        state[prefix + "inited"] = torch.ones(1)
        state[prefix + "cluster_size"] = torch.ones(codec.card)
        state[prefix + "embed"] = embed.clone()
        state[prefix + "embed_avg"] = embed.clone()
    return state


def export_audiocraft_codec(codec, path):
    """Write `codec` as AudioCraft's compression_state_dict.bin ({best_state, xp.cfg}); `path` is the file or
    a directory for it. Written atomically."""
    path = Path(path)
    if path.is_dir():
        path = path / AUDIOCRAFT_FILE
    pkg = {"best_state": audiocraft_state(codec), "xp.cfg": yaml.safe_dump(audiocraft_xp_cfg(codec.cfg)),
           "version": "nanomusicgen", "exported": True}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: torch.save(pkg, f))
    return path


def hf_config(cfg):
    """The Hugging Face EncodecConfig (config.json) of a codec config."""
    frame_rate = math.ceil(cfg.sample_rate / cfg.hop)     # transformers' EncodecConfig.frame_rate
    bits = math.ceil(math.log2(cfg.card))                   # its codebook_nbits
    # transformers (5.x) builds 1000 * max(target_bandwidths) // (frame_rate * bits) quantizer layers and encodes
    # with as many; a little over the exact bandwidth, so that float rounding cannot drop one
    bandwidth = (cfg.n_q + 0.5) * bits * frame_rate / 1000
    return {"model_type": "encodec", "architectures": ["EncodecModel"], "sampling_rate": cfg.sample_rate,
            "audio_channels": cfg.channels, "num_filters": cfg.n_filters, "upsampling_ratios": list(cfg.ratios),
            "hidden_size": cfg.dimension, "codebook_dim": cfg.dimension, "codebook_size": cfg.card,
            "num_residual_layers": cfg.n_residual_layers, "kernel_size": cfg.kernel_size,
            "residual_kernel_size": cfg.residual_kernel_size, "last_kernel_size": cfg.last_kernel_size,
            "dilation_growth_rate": cfg.dilation_base, "compress": cfg.compress, "num_lstm_layers": cfg.lstm,
            "use_causal_conv": cfg.causal, "pad_mode": cfg.pad_mode, "use_conv_shortcut": not cfg.true_skip,
            "trim_right_ratio": cfg.trim_right_ratio, "norm_type": "weight_norm", "normalize": False,
            "chunk_length_s": None, "overlap": None, "target_bandwidths": [bandwidth]}


def hf_state(codec):
    """Our weights in transformers' EncodecModel layout (weight norm as parametrizations.weight.original0/1, as
    save_pretrained writes them), from the AudioCraft layout by renaming."""
    state = {}
    for key, value in audiocraft_state(codec).items():
        m = re.match(r"quantizer\.vq\.layers\.(\d+)\._codebook\.(\w+)$", key)
        if m:
            state[f"quantizer.layers.{m[1]}.codebook.{m[2]}"] = value
            continue
        key = re.sub(r"^(encoder|decoder)\.model\.", r"\1.layers.", key)
        key = key.replace("conv.conv.", "conv.").replace("convtr.convtr.", "conv.")
        state[key.replace("weight_g", "parametrizations.weight.original0").replace(
            "weight_v", "parametrizations.weight.original1")] = value
    return state


def export_hf_codec(codec, directory):
    """Write `codec` as a Hugging Face EnCodec directory (config.json + model.safetensors) that transformers'
    EncodecModel.from_pretrained loads. Written atomically, file by file."""
    from safetensors.torch import save as save_safetensors
    if codec.cfg.norm != "weight_norm":
        raise UserError("a Hugging Face EnCodec has weight norm on every convolution: this codec has none")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    text = json.dumps(hf_config(codec.cfg), indent=2) + "\n"
    blob = save_safetensors({k: v.contiguous() for k, v in hf_state(codec).items()}, metadata={"format": "pt"})
    write_atomic(directory / "model.safetensors", lambda f: f.write(blob))
    write_atomic(directory / "config.json", lambda f: f.write(text.encode()))
    return directory


# ----------------------------------------------------------------------------------------------------------

def main(argv):
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if len(argv) not in (1, 3):
        raise UserError("usage: python codec.py PATH [in.wav out.wav | --export OUT | --export_hf OUT_DIR]")
    codec = load_codec(argv[0])
    c = codec.cfg
    print(f"codec {argv[0]}: {c.sample_rate} Hz, {codec.channels} ch, hop {codec.hop}, {codec.frame_rate:g} frames/s, "
          f"n_q {codec.n_q}, card {codec.card}, pad_mode {c.pad_mode}, "
          f"{sum(p.numel() for p in codec.parameters()) / 1e6:.1f}M params, identity {codec.identity()}")
    if len(argv) == 3 and argv[1] == "--export":
        print(f"wrote {export_audiocraft_codec(codec, argv[2])}")
    elif len(argv) == 3 and argv[1] == "--export_hf":
        print(f"wrote {export_hf_codec(codec, argv[2])}")
    elif len(argv) == 3:
        import soundfile as sf
        try:
            wav, sr = sf.read(argv[1], dtype="float32", always_2d=True)   # [S, C]
        except Exception as e:
            raise UserError(f"{argv[1]}: cannot read audio ({e})") from None
        codec.check_rate(sr)
        if wav.shape[1] == 2 and codec.channels == 1:
            codec = load_codec(argv[0], stereo=True)
        codes = codec.encode(torch.from_numpy(wav.T.copy())[None])
        out = codec.decode(codes)[0, :, :wav.shape[0]].T.numpy()
        sf.write(argv[2], out, sr)
        print(f"{argv[1]}: {codes.shape[-1]} frames x {codes.shape[1]} codebooks -> {argv[2]}")
    return 0


if __name__ == "__main__":
    cli(main)
