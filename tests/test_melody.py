"""Melody conditioning and several attributes (issue 19): AudioCraft's musicgen-melody files against transformers'
MusicgenMelodyForConditionalGeneration (random weights from a config shaped like the public one), the chroma
condition's two semantics, per-attribute dropout, the chroma cache beside the token cache, stem removal, a melody
model that learns to follow the chroma, and generate.py --melody.

    python -m pytest tests/test_melody.py -q --durations=5
"""
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

import data
import formats
import generate
import melody
import model as lm_lib
import train
from _model_util import TINY_RUN, make_run
from env import UserError

ROOT = Path(__file__).resolve().parents[1]
CARD, K, DIM, TEXT_DIM, SECONDS = 64, 4, 64, 32, 2.0
FRAMES = melody.chroma_frames(int(melody.CHROMA_RATE * SECONDS))     # one segment's chroma: 16 frames
torch.set_num_threads(2)


# ---- a musicgen-melody state_dict.bin and transformers' model of it

def hf_melody(seed=0):
    """transformers' MusicgenMelodyForConditionalGeneration shaped like facebook/musicgen-melody, shrunk: a T5 text
    encoder, EnCodec at 32 kHz, a 2-layer decoder without cross-attention, chroma_length one segment's chroma; random
    weights, random norm gains and biases (a misplaced one cannot pass)."""
    from transformers import (EncodecConfig, MusicgenMelodyConfig, MusicgenMelodyDecoderConfig,
                              MusicgenMelodyForConditionalGeneration, T5Config)
    config = MusicgenMelodyConfig(
        text_encoder=T5Config(vocab_size=200, d_model=TEXT_DIM, d_kv=8, num_heads=4, d_ff=48, num_layers=2,
                              relative_attention_num_buckets=16, relative_attention_max_distance=20,
                              feed_forward_proj="relu", dropout_rate=0.0),
        audio_encoder=EncodecConfig(sampling_rate=32000, audio_channels=1, upsampling_ratios=[8, 5, 4, 4],
                                    num_filters=4, hidden_size=16, num_lstm_layers=1, codebook_size=CARD,
                                    target_bandwidths=[1.2], use_causal_conv=False, normalize=False,
                                    use_conv_shortcut=False, norm_type="weight_norm", pad_mode="constant"),
        decoder=MusicgenMelodyDecoderConfig(vocab_size=CARD, num_codebooks=K, hidden_size=DIM, num_hidden_layers=2,
                                            num_attention_heads=4, ffn_dim=4 * DIM, pad_token_id=CARD,
                                            bos_token_id=CARD, dropout=0.0),
        num_chroma=12, chroma_length=FRAMES)
    torch.manual_seed(seed)
    hf = MusicgenMelodyForConditionalGeneration(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5 if name.endswith("weight") else
                        0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("proj.bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return hf


# transformers' convert_musicgen_melody_transformers.py renames AudioCraft's keys by these substitutions; undone here
HF_TO_AUDIOCRAFT = [("decoder.model.decoder.embed_tokens", "emb"), ("decoder.model.decoder.layer_norm", "out_norm"),
                    ("decoder.model.decoder.layers", "transformer.layers"), ("decoder.lm_heads", "linears"),
                    ("self_attn_layer_norm", "norm1"), ("final_layer_norm", "norm2"), ("fc1", "linear1"),
                    ("fc2", "linear2"),
                    ("audio_enc_to_dec_proj", "condition_provider.conditioners.self_wav.output_proj"),
                    ("enc_to_dec_proj", "condition_provider.conditioners.description.output_proj")]


def audiocraft_state(hf):
    """The musicgen-melody state_dict.bin's best_state for transformers' weights: AudioCraft's names, q | k | v fused
    into in_proj_weight, and the Spectrogram window its ChromaExtractor registers (transformers' converter drops
    it as an expected extra key)."""
    state = {}
    for key, value in hf.state_dict().items():
        if key.startswith(("text_encoder.", "audio_encoder.")):
            continue
        for a, b in HF_TO_AUDIOCRAFT:
            key = key.replace(a, b) if not (a == "enc_to_dec_proj" and "audio_enc" in key) else key
        state[key] = value.clone()
    for key in [k for k in state if k.endswith("q_proj.weight")]:
        base = key[:-len("q_proj.weight")]
        state[base + "in_proj_weight"] = torch.cat([state.pop(base + f"{n}_proj.weight") for n in "qkv"])
    state["condition_provider.conditioners.self_wav.chroma.spec.window"] = torch.hann_window(2 ** 14)
    return state


# AudioCraft's musicgen-melody xp.cfg (config/conditioner/chroma2music.yaml over musicgen_lm), shrunk to the tiny model
MELODY_XP = f"""
device: cuda
dtype: float16
sample_rate: 32000
channels: 1
lm_model: transformer_lm
dataset: {{segment_duration: {SECONDS}, batch_size: 192}}
codebooks_pattern:
  modeling: delay
  delay: {{delays: [0, 1, 2, 3], flatten_first: 0, empty_initial: 0}}
transformer_lm:
  dim: {DIM}
  num_heads: 4
  num_layers: 2
  hidden_scale: 4
  n_q: {K}
  card: {CARD}
  dropout: 0.0
  activation: gelu
  norm_first: true
  bias_ff: false
  bias_attn: false
  bias_proj: false
  causal: true
  past_context: null
  custom: false
  memory_efficient: true
  layer_scale: null
  positional_embedding: sin
  norm: layer_norm
  cross_attention: false
  qk_layer_norm: false
  kv_repeat: 1
classifier_free_guidance: {{training_dropout: 0.2, inference_coef: 3.0}}
attribute_dropout:
  args: {{active_on_eval: false}}
  text: {{}}
  wav: {{self_wav: 0.5}}
fuser:
  cross_attention_pos_emb: false
  cross_attention_pos_emb_scale: 1
  sum: []
  prepend: [self_wav, description]
  cross: []
  input_interpolate: []
conditioners:
  self_wav:
    model: chroma_stem
    chroma_stem: {{sample_rate: '${{sample_rate}}', n_chroma: 12, radix2_exp: 14, argmax: true,
                  match_len_on_eval: false, eval_wavs: null, n_eval_wavs: 100, cache_path: null}}
  description:
    model: t5
    t5: {{name: t5-base, finetune: false, word_dropout: 0.2, normalize_text: false}}
"""


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """(state_dict.bin of a musicgen-melody-shaped model, transformers' model with the same weights)."""
    hf = hf_melody()
    path = tmp_path_factory.mktemp("musicgen-melody") / "state_dict.bin"
    torch.save({"best_state": audiocraft_state(hf), "xp.cfg": MELODY_XP, "version": "1.0.0"}, path)
    return path, hf


def one_hot(classes):
    return torch.nn.functional.one_hot(classes, 12).float()


@torch.no_grad()
def hf_logits(hf, ids, mask, chroma, sequence):
    """transformers' logits for token ids, a chroma [B, T, 12] (None: its null, class C) and steps [B, K, S]."""
    B, _, S = sequence.shape
    out = hf(input_ids=ids, attention_mask=mask, input_features=chroma,
             decoder_input_ids=sequence.reshape(B * K, S)).logits               # [B * K, P + S, card]
    return out[:, -S:].reshape(B, K, S, CARD)


def text_states(hf, ids, mask):
    with torch.no_grad():
        return hf.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state


def test_musicgen_melody_file_loads_with_transformers_logits(released):
    path, hf = released
    lm, cfg = formats.load_audiocraft_lm(path)
    assert (cfg.fuse, cfg.chroma_fuse, cfg.attributes, cfg.attribute_dropout) == ("prepend", "prepend", (),
                                                                                  ("self_wav:0.5",))
    assert not any(layer.cross_attention for layer in lm.transformer.layers) and lm.melody.frames == FRAMES
    assert lm.melody.stems == melody.DEMUCS_WEIGHTS      # AudioCraft's chroma is of the song without drums and bass
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 200, (3, 6), generator=g)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 6])                  # a padded row: not masked, as there
    codes = torch.randint(0, CARD, (3, K, 9), generator=g)
    sequence = lm_lib.build_sequence(codes, lm_lib.pattern_tables("delay", K, (0, 1, 2, 3), 9, False), CARD)
    states = text_states(hf, ids, mask)
    # a melody shorter than a segment loops, a longer one is trimmed (AudioCraft's match_len_on_eval, as sampling)
    for T in (5, FRAMES, FRAMES + 7):
        classes = torch.randint(0, 12, (3, T), generator=g)
        conditions = {"description": lm.conditioner(states, mask.bool()), "self_wav": lm.melody(classes, True)}
        got = lm(sequence, conditions)
        want = hf_logits(hf, ids, mask, one_hot(classes), sequence)
        assert (got - want).abs().max() <= 1e-5, T
    # no melody: the chroma of silence, class C (transformers' default input_features, AudioCraft's nullified wav)
    null = lm.null_conditions(3, "cpu")["self_wav"]
    got = lm(sequence, {"description": lm.conditioner(states, mask.bool()), "self_wav": null})
    assert (got - hf_logits(hf, ids, mask, None, sequence)).abs().max() <= 1e-5
    # another melody changes the logits by far more than the tolerance: the chroma is used
    assert (lm(sequence, {"description": lm.conditioner(states, mask.bool()),
                          "self_wav": lm.melody(torch.full((3, 4), 5), True)}) - got).abs().max() > 2e-4


def test_musicgen_melody_exports_back_to_audiocraft_files(released, tmp_path):
    """An export of the melody model has AudioCraft's keys (transformers' converter's expected keys, window
    included) and xp.cfg conditioners/fuser as chroma2music.yaml; it loads back with the same logits."""
    path, hf = released
    lm, cfg = formats.load_audiocraft_lm(path)
    out = formats.export_audiocraft_lm(lm, cfg, tmp_path / "export")
    pkg = torch.load(out, weights_only=True)
    assert set(pkg["best_state"]) == set(audiocraft_state(hf))
    xp = yaml.safe_load(pkg["xp.cfg"])
    assert xp["conditioners"]["self_wav"] == {"model": "chroma_stem", "chroma_stem": {
        "sample_rate": 32000, "n_chroma": 12, "radix2_exp": 14, "argmax": True, "match_len_on_eval": False,
        "eval_wavs": None, "n_eval_wavs": 100, "cache_path": None}}
    # AudioCraft's builder passes every chroma_stem key to ChromaStemConditioner (or on to ChromaExtractor)
    assert set(xp["conditioners"]["self_wav"]["chroma_stem"]) <= {
        "sample_rate", "n_chroma", "radix2_exp", "match_len_on_eval", "eval_wavs", "n_eval_wavs", "cache_path",
        "nfft", "winlen", "winhop", "argmax", "norm"}
    assert xp["conditioners"]["description"]["model"] == "t5" and list(xp["conditioners"])[0] == "self_wav"
    assert sorted(xp["fuser"]["prepend"]) == ["description", "self_wav"] and xp["fuser"]["cross"] == []
    assert xp["transformer_lm"]["cross_attention"] is False
    assert xp["attribute_dropout"]["wav"] == {"self_wav": 0.5}
    again, cfg2 = formats.load_audiocraft_lm(out)
    assert cfg2 == cfg
    g = torch.Generator().manual_seed(2)
    states, mask = torch.randn(2, 4, TEXT_DIM, generator=g), torch.ones(2, 4, dtype=torch.bool)
    classes = torch.randint(0, 12, (2, FRAMES), generator=g)
    codes = torch.randint(0, CARD, (2, K, 7), generator=g)
    for model in (lm, again):
        conditions = {"description": model.conditioner(states, mask), "self_wav": model.melody(classes)}
        model.logits = model.compute_predictions(codes, conditions)[0].nan_to_num()
    assert torch.equal(lm.logits, again.logits)


def test_xp_cfg_conditions_it_cannot_compute_are_one_line_errors():
    xp = yaml.safe_load(MELODY_XP)
    xp["fuser"]["input_interpolate"], xp["fuser"]["prepend"] = ["self_wav"], ["description"]
    with pytest.raises(UserError, match=r"fuser.input_interpolate=\['self_wav'\] is not supported"):
        formats.lm_config_from_xp(xp)
    xp = yaml.safe_load(MELODY_XP)
    xp["conditioners"]["self_wav"]["chroma_stem"]["radix2_exp"] = 12
    with pytest.raises(UserError, match="radix2_exp=12 is not supported"):
        formats.lm_config_from_xp(xp)
    xp = yaml.safe_load(MELODY_XP)
    xp["conditioners"]["style"] = {"model": "style", "style": {}}
    with pytest.raises(UserError, match=r"conditioners style \(style\) not supported"):
        formats.lm_config_from_xp(xp)
    xp = yaml.safe_load(MELODY_XP)
    xp["fuser"]["prepend"], xp["fuser"]["sum"] = ["description"], ["self_wav"]
    with pytest.raises(UserError, match="fuser must put 'self_wav' in exactly one of prepend, cross"):
        formats.lm_config_from_xp(xp)


def test_text_attributes_round_trip_through_xp_cfg(tmp_path):
    """Several text attributes, each with its own output_proj under AudioCraft's name and its own fuse."""
    cfg = lm_lib.LMConfig(dim=DIM, n_layers=2, n_heads=4, card=CARD, text_dim=TEXT_DIM, fuse="cross",
                          attributes=("genre", "moods:prepend", "bpm:sum"), attribute_dropout=("genre:0.25",))
    torch.manual_seed(0)
    lm = lm_lib.MusicGenLM(cfg).eval()
    assert [k for k in lm.state_dict() if "output_proj.weight" in k] == [
        f"condition_provider.conditioners.{n}.output_proj.weight" for n in ("description", "genre", "moods", "bpm")]
    out = formats.export_audiocraft_lm(lm, cfg, tmp_path)
    xp = yaml.safe_load(torch.load(out, weights_only=True)["xp.cfg"])
    assert (xp["fuser"]["cross"], xp["fuser"]["prepend"], xp["fuser"]["sum"]) == (
        ["description", "genre"], ["moods"], ["bpm"])
    assert xp["attribute_dropout"]["text"] == {"genre": 0.25} and set(xp["conditioners"]) == {
        "description", "genre", "moods", "bpm"}
    again, cfg2 = formats.load_audiocraft_lm(out)
    assert cfg2.attributes == ("genre:cross", "moods:prepend", "bpm:sum") and cfg2.attribute_dropout == ("genre:0.25",)
    g = torch.Generator().manual_seed(0)
    conditions = {n: (torch.randn(2, 3, DIM, generator=g), torch.ones(2, 3, dtype=torch.bool)) for n in lm.fuses}
    codes = torch.randint(0, CARD, (2, K, 6), generator=g)
    assert torch.equal(lm.compute_predictions(codes, conditions)[0].nan_to_num(),
                       again.compute_predictions(codes, conditions)[0].nan_to_num())
