"""Melody: the chromagram AudioCraft's melody models condition on (and its chroma metric compares), the chroma
condition itself (AudioCraft's ChromaStemConditioner), stem removal with Demucs, and the chroma as the token cache
stores it.

    python melody.py song.wav                              # the pitch class of each frame (C C# D ... B)
    python melody.py song.wav --stems=//reference/demucs/955717e8-8726e21a.th   # of the song without drums and bass
    python train.py config/debug.py config/melody.py       # a melody model (chroma + text, both prepended)
    python generate.py --run=SIG --prompt="lofi piano" --melody=tune.wav --out=out.wav

`chroma()` is AudioCraft's ChromaExtractor (modules/chroma.py, radix2_exp 14 for MusicGen-melody: n_fft 16384, hop
4096 at 32 kHz, 12 bins, argmax) and Hugging Face's MusicgenMelodyFeatureExtractor, without torchaudio or librosa:
the STFT is torchaudio's Spectrogram(power=2, normalized=True) spelled in torch, and the filter bank is
librosa.filters.chroma spelled in torch.

The condition (ChromaConditioner, the model's `self_wav`): argmax chroma classes [B, frames] (-1 where a frame has
no audio) -> output_proj(one-hot) [B, frames, dim]. Two uses, as in AudioCraft: the loss (its training solver)
masks frames without audio, so a dropped melody is all zeros; sampling (its MusicGen.get_pretrained, which sets
match_len_on_eval and turns masking off) loops or trims the chroma to the frames of one training segment and masks
nothing, so frames without audio, and a missing melody, read as the chroma of silence (class C).

Stems: AudioCraft takes the chroma of the song with its drums and bass removed by Demucs (htdemucs). That needs the
optional package `demucs` and its weights on disk (chroma_stems=//reference/demucs/955717e8-8726e21a.th); with
chroma_stems="" (the default) the chroma is of the full mix. The setting is part of a run's config and of its chroma
cache's name, so the two kinds of chroma never mix.
"""
import functools
import math
from pathlib import Path

import numpy as np
import soxr
import torch
import torch.nn as nn
import torch.nn.functional as F

import env

N_FFT = 2 ** 14   # AudioCraft's radix2_exp=14 for MusicGen-melody; the hop is a quarter window
HOP = N_FFT // 4
N_CHROMA = 12
CHROMA_RATE = 32000                # the rate the chroma is taken at (AudioCraft's: the model's, 32 kHz)
FRAME_RATE = CHROMA_RATE / HOP     # 7.8125 chroma frames per second
PITCH_CLASSES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
MIN_MELODY_RATE = 8000             # below this a file holds no pitch above 4 kHz: not a melody to follow
DEMUCS_WEIGHTS = "//reference/demucs/955717e8-8726e21a.th"   # htdemucs, the model AudioCraft removes stems with
# The conditioning keys of train.py's Config that the chroma condition reads, with its defaults
SETTINGS = {"chroma_stems": "", "segment_duration": 30.0}


def chroma_filter_bank(sample_rate, n_fft, n_chroma=12, tuning=0.0):
    """[n_chroma, n_fft // 2 + 1] float64 weights from STFT bins to pitch classes, C first (librosa.filters.chroma
    with its defaults: ctroct 5, octwidth 2, L2 norm per bin, base_c). Each bin spreads over the pitch classes as a
    Gaussian around its own pitch, as wide as the bin is in pitch (at least one class); the bins are then weighted by
    a Gaussian over octaves centred on octave 5 (~ 880 Hz), two octaves wide, so rumble and hiss count little."""
    freqs = torch.arange(1, n_fft, dtype=torch.float64) * (sample_rate / n_fft)  # every bin but DC, up to sample_rate
    a0 = 440.0 * 2.0 ** (tuning / n_chroma) / 16                                 # A0 (27.5 Hz untuned)
    pitch = n_chroma * torch.log2(freqs / a0)                                    # in pitch classes above A0
    pitch = torch.cat([pitch[:1] - 1.5 * n_chroma, pitch])                       # DC: 1.5 octaves below bin 1
    width = torch.cat([(pitch[1:] - pitch[:-1]).clamp(min=1.0), pitch.new_ones(1)])
    half = round(n_chroma / 2)
    # distance of each bin's pitch to each class, wrapped into [-half, half): [n_chroma, n_fft]
    dist = torch.remainder(pitch - torch.arange(n_chroma, dtype=torch.float64)[:, None] + half + 10 * n_chroma,
                           n_chroma) - half
    weights = torch.exp(-0.5 * (2 * dist / width) ** 2)
    weights = weights / weights.square().sum(0, keepdim=True).sqrt()
    weights = weights * torch.exp(-0.5 * ((pitch / n_chroma - 5.0) / 2.0) ** 2)
    weights = torch.roll(weights, -3 * (n_chroma // 12), dims=0)                # A first -> C first
    return weights[:, :n_fft // 2 + 1].contiguous()


def chroma(wav, sample_rate, n_fft=N_FFT, hop=None, n_chroma=12, argmax=True):
    """wav [B, S] mono -> chroma [B, 1 + S // hop, n_chroma] (one-hot with argmax, else each frame scaled to max 1).

    Audio shorter than one window is zero-padded to it on both sides first, as AudioCraft does. The hop defaults to a
    quarter window (4096 for n_fft 16384; at 32 kHz that is 7.8 frames per second)."""
    hop = hop or n_fft // 4
    if wav.shape[-1] < n_fft:
        pad = n_fft - wav.shape[-1]
        wav = torch.nn.functional.pad(wav, (pad // 2, pad - pad // 2))
    window = torch.hann_window(n_fft, dtype=wav.dtype, device=wav.device)
    spec = torch.stft(wav, n_fft, hop, window=window, center=True, pad_mode="reflect", return_complex=True)
    power = spec.abs().square() / window.square().sum()               # [B, n_fft // 2 + 1, frames]
    filters = chroma_filter_bank(sample_rate, n_fft, n_chroma).to(power)
    raw = torch.einsum("cf,bft->btc", filters, power)                  # [B, frames, n_chroma]
    scaled = raw / raw.amax(dim=-1, keepdim=True).clamp(min=1e-6)      # torch.nn.functional.normalize(p=inf)
    if not argmax:
        return scaled
    return torch.nn.functional.one_hot(scaled.argmax(-1), n_chroma).to(wav.dtype)


def chroma_frames(n_samples):
    """Frames chroma() gives for n_samples at CHROMA_RATE (a clip shorter than one window is padded to one)."""
    return 1 + max(int(n_samples), N_FFT) // HOP


def resample(wav, from_rate, to_rate):
    """wav [B, S] float tensor -> [B, S * to_rate / from_rate] (soxr, as data.py reads audio), on wav's device."""
    if from_rate == to_rate:
        return wav
    out = soxr.resample(wav.detach().float().cpu().numpy().T, from_rate, to_rate).T   # soxr: [S, channels]
    return torch.from_numpy(np.ascontiguousarray(out)).to(wav.device)


def chroma_classes(wav, sample_rate, stems=""):
    """wav [B, S] mono at sample_rate -> the argmax pitch class of each chroma frame [B, frames] int64, taken at
    CHROMA_RATE (of the song without drums and bass when `stems` names Demucs weights)."""
    wav = resample(wav.float(), sample_rate, CHROMA_RATE)
    if stems:
        wav = remove_drums_and_bass(wav, CHROMA_RATE, stems)
    return chroma(wav, CHROMA_RATE, argmax=False).argmax(-1)


# ----------------------------------------------------------------------------------------------------------
# Stem removal (Demucs, optional)

def check_stems(stems):
    """chroma_stems names weights on disk and Demucs is installed (one line each, before any work): -> their path."""
    where = f"chroma_stems={stems}"
    try:
        import demucs  # noqa: F401
    except ImportError:
        raise env.UserError(f"{where}: removing drums and bass needs Demucs: pip install demucs==4.1.0 (or "
                            f"chroma_stems='' for the chroma of the full mix)") from None
    try:
        path = env.resolve_path(stems)
    except env.UserError as e:  # a //reference path whose directory or file is missing: name the key too
        raise env.UserError(f"{where}: {str(e).removeprefix(f'{stems}: ')}") from None
    if not path.exists():
        raise env.UserError(f"{where}: {path} does not exist (Demucs weights, e.g. htdemucs' 955717e8-8726e21a.th "
                            f"under //reference/demucs/; chroma_stems='' takes the chroma of the full mix)")
    return path


@functools.lru_cache(maxsize=2)
def load_demucs(stems):
    """The Demucs separator named by chroma_stems (a checkpoint file, or a directory holding htdemucs.yaml and its
    weights), in eval mode on the CPU."""
    where = f"chroma_stems={stems}"
    path = check_stems(stems)
    from demucs import pretrained, states
    try:
        model = states.load_model(path) if path.is_file() else pretrained.get_model("htdemucs", repo=path)
    except Exception as e:  # a pickle of another version, a truncated file, a repo without htdemucs
        raise env.UserError(f"{where}: not a Demucs model ({type(e).__name__}: {str(e)[:120]})") from None
    missing = {"vocals", "other"} - set(getattr(model, "sources", ()))
    if missing:
        raise env.UserError(f"{where}: the model separates {list(getattr(model, 'sources', ()))}, without "
                            f"{sorted(missing)}: use a 4-stem model such as htdemucs")
    return model.eval()


def separate(model, mix):
    """Demucs' apply_model without its random shifts (shifts=0, so the same song gives the same stems; AudioCraft
    keeps the default, one random shift): mix [B, C, S] -> sources [B, n_sources, C, S]."""
    from demucs.apply import apply_model
    return apply_model(model, mix, shifts=0, split=True, overlap=0.25, progress=False, device=mix.device)


def remove_drums_and_bass(wav, sample_rate, stems):
    """wav [B, S] mono -> [B, S] at sample_rate: the vocals and "other" stems Demucs finds, summed, as AudioCraft's
    ChromaStemConditioner keeps them for the chroma."""
    model = load_demucs(stems)
    x = resample(wav, sample_rate, model.samplerate)[:, None].expand(-1, model.audio_channels, -1)  # [B, C, S']
    with torch.no_grad():
        sources = separate(model, x.contiguous())                                # [B, n_sources, C, S']
    keep = [model.sources.index("vocals"), model.sources.index("other")]
    melody = sources[:, keep].sum(1).mean(1)                                       # [B, S'] mono
    return resample(melody, model.samplerate, sample_rate)[:, :wav.shape[-1]]


# ----------------------------------------------------------------------------------------------------------
# The condition

class ChromaConditioner(nn.Module):
    """AudioCraft's ChromaStemConditioner on precomputed argmax chroma classes [B, frames] int64 (-1: no audio
    there): output_proj(one-hot) -> (condition [B, frames, output_dim], mask [B, frames]). Parameter and buffer
    names are AudioCraft's (output_proj, and its Spectrogram's Hann window chroma.spec.window, which its
    checkpoints hold). `frames` is the chroma length of one training segment (AudioCraft's chroma_len);
    `stems` the Demucs weights used on audio (melody_classes), "" for the full mix."""

    def __init__(self, output_dim, duration=30.0, stems="", n_chroma=N_CHROMA):
        super().__init__()
        self.output_proj = nn.Linear(n_chroma, output_dim)
        self.chroma = nn.Module()
        self.chroma.spec = nn.Module()
        self.chroma.spec.register_buffer("window", torch.hann_window(N_FFT))   # persistent, as torchaudio's
        self.n_chroma, self.duration, self.stems = n_chroma, float(duration), stems
        self.frames = chroma_frames(int(CHROMA_RATE * duration))

    def forward(self, classes, sampling=False):
        """classes [B, T] int64 -> (condition [B, T', output_dim] zero where masked, mask [B, T'] bool). The loss
        (sampling=False): frames without audio are masked (T' = T). Sampling: the chroma looped or trimmed to
        `frames` (AudioCraft's match_len_on_eval), nothing masked, frames without audio read as class C."""
        if sampling:
            classes = classes[:, torch.arange(self.frames, device=classes.device) % classes.shape[-1]].clamp(min=0)
            mask = torch.ones_like(classes, dtype=torch.bool)
        else:
            mask = classes >= 0
        x = F.one_hot(classes.clamp(min=0), self.n_chroma).to(self.output_proj.weight.dtype)  # [B, T', 12]
        condition = self.output_proj(x)                                                         # [B, T', dim]
        return torch.where(mask[..., None], condition, 0.0), mask

    def null(self, batch, device):
        """The missing melody when sampling (AudioCraft's nullified wav): the chroma of silence, unmasked."""
        return self(torch.full((batch, self.frames), -1, dtype=torch.long, device=device), sampling=True)

    def melody_classes(self, wav, sample_rate):
        """A melody [S] (or [1, S]) at sample_rate -> its chroma classes [frames] (stems removed per `stems`)."""
        return chroma_classes(wav.reshape(1, -1), sample_rate, self.stems)[0]


def window_classes(melodies, offset_seconds, frames):
    """The chroma each row gets in a generation window starting offset_seconds into the piece: melodies, one per row,
    classes [T_i] int64 (None: no melody) -> [B, frames] int64, -1 where a row has none. Each melody repeats
    periodically (AudioCraft's generate_with_chroma slices its waveform this way for every window past the
    first; the first of a piece that fits one window gets the whole melody, looped or trimmed by the
    condition)."""
    rows = []
    for m in melodies:
        if m is None:
            rows.append(torch.full((frames,), -1, dtype=torch.long))
        elif offset_seconds == 0:
            rows.append(m[torch.arange(frames) % len(m)])
        else:
            first = int(offset_seconds * FRAME_RATE)
            rows.append(m[(first + torch.arange(frames)) % len(m)])
    return torch.stack(rows)


class ChromaEncoder:
    """The chroma shaped as the token cache's codec (data.py's tokenize machinery caches it beside the codes:
    sharded, resumable, stale inputs redone): encode(wav [B, 1, S] at 32 kHz) -> classes [B, 1, 1 + S // hop]."""
    channels, n_q, card, hop, sample_rate, frame_rate = 1, 1, N_CHROMA, HOP, CHROMA_RATE, FRAME_RATE

    def __init__(self, stems=""):
        self.stems = stems

    def identity(self):
        """The cache's name: what chroma it holds (full mix, or which stems model removed drums and bass)."""
        return f"chroma{N_FFT}-" + (f"stems-{Path(str(self.stems)).stem}" if self.stems else "mix")

    def encode(self, wav):
        return self.classes(wav[:, 0], CHROMA_RATE)[:, None]

    def classes(self, wav, sample_rate):
        """wav [B, S] at sample_rate -> classes [B, frames] (chroma_classes with this cache's stems)."""
        return chroma_classes(wav, sample_rate, self.stems)


def read_melody(path, option="--melody"):
    """A melody file -> mono float32 [S] at CHROMA_RATE, checked: readable, a rate that holds pitch, at least one
    chroma window long. Errors name the option."""
    import data
    import soundfile as sf
    try:
        wav = data.read_audio(env.resolve_path(path), sample_rate=CHROMA_RATE, channels=1)[0]
        rate = sf.info(str(env.resolve_path(path))).samplerate
    except (data.BadFile, RuntimeError) as e:   # soundfile's RuntimeError: a file it cannot open
        raise env.UserError(f"{option}={path}: {str(e).splitlines()[0][:160]} (a melody is an audio file: wav, flac, "
                            f"ogg, mp3)") from None
    if rate < MIN_MELODY_RATE:
        raise env.UserError(f"{option}={path}: sample rate {rate} Hz is too low for a melody (its chroma needs pitches "
                            f"up to ~4 kHz): give a file of at least {MIN_MELODY_RATE} Hz")
    if len(wav) < N_FFT:
        raise env.UserError(f"{option}={path}: {len(wav) / CHROMA_RATE:.2f} s is too short for a melody: give at least "
                            f"{N_FFT / CHROMA_RATE:.2f} s (one chroma window)")
    return torch.from_numpy(wav)


def main(argv):
    (path,), o = env.parse_options(argv, {"stems": ""}, positionals=(1, 1),
                                   usage="python melody.py AUDIO_FILE [--stems=DEMUCS_WEIGHTS]")
    classes = chroma_classes(read_melody(path, "melody file")[None], CHROMA_RATE, o["stems"])[0]
    for i, c in enumerate(classes.tolist()):
        print(f"{i / FRAME_RATE:7.2f} s  {PITCH_CLASSES[c]}")
    return 0


if __name__ == "__main__":
    env.cli(main)
