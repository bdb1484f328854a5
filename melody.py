"""Melody features: the chromagram AudioCraft's melody models condition on and its chroma metric compares.

    python melody.py song.wav            # print the pitch class of each frame (C C# D ... B)

`chroma()` is AudioCraft's ChromaExtractor (modules/chroma.py, radix2_exp 14 for MusicGen-melody: n_fft 16384, hop
4096 at 32 kHz, 12 bins, argmax) and Hugging Face's MusicgenMelodyFeatureExtractor, without torchaudio or librosa:
the STFT is torchaudio's Spectrogram(power=2, normalized=True) spelled in torch, and the filter bank is
librosa.filters.chroma spelled in torch. Issue 19 adds the chroma conditioner and stem removal here.
"""

import torch

import env

N_FFT = 2 ** 14   # AudioCraft's radix2_exp=14 for MusicGen-melody; the hop is a quarter window
PITCH_CLASSES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")


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


def main(argv):
    if len(argv) != 1:
        raise env.UserError("usage: python melody.py AUDIO_FILE")
    import data
    try:
        wav = data.read_audio(argv[0], sample_rate=32000, channels=1)
    except data.BadFile as e:
        raise env.UserError(f"{argv[0]}: {e}") from None
    classes = chroma(torch.from_numpy(wav), 32000)[0].argmax(-1)
    step = N_FFT // 4 / 32000
    for i, c in enumerate(classes.tolist()):
        print(f"{i * step:7.2f} s  {PITCH_CLASSES[c]}")
    return 0


if __name__ == "__main__":
    env.cli(main)
