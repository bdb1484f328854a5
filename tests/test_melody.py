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
import demo as demo_lib
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
    weights, random norm gains and biases and projection biases (a misplaced one cannot pass)."""
    from transformers import MusicgenMelodyConfig, MusicgenMelodyDecoderConfig, MusicgenMelodyForConditionalGeneration
    from test_hf import musicgen_config, randomize
    small = musicgen_config(spiece_size=100)     # test_hf's shrunk T5 and EnCodec, musicgen-small's kinds
    config = MusicgenMelodyConfig(
        text_encoder=small.text_encoder.to_dict(), audio_encoder=small.audio_encoder.to_dict(),
        decoder=MusicgenMelodyDecoderConfig(vocab_size=CARD, num_codebooks=K, hidden_size=DIM, num_hidden_layers=2,
                                            num_attention_heads=4, ffn_dim=4 * DIM, pad_token_id=CARD,
                                            bos_token_id=CARD, dropout=0.0),
        num_chroma=12, chroma_length=FRAMES)
    torch.manual_seed(seed)
    hf = MusicgenMelodyForConditionalGeneration(config).eval()
    randomize(hf, seed)                          # norm gains and biases, codebooks
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("proj.bias"):           # the chroma's and the text's projections too
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


# ---- the chroma condition, dropout

def tiny_melody_lm(duration=SECONDS, **overrides):
    cfg = dict(dim=32, n_layers=2, n_heads=2, n_q=2, card=24, fuse="prepend", chroma_fuse="prepend", cfg_dropout=0.0,
               attribute_dropout=("self_wav:0.5",))
    cfg.update(overrides)
    import text
    torch.manual_seed(0)
    return lm_lib.MusicGenLM(lm_lib.LMConfig(**cfg), {"description": text.LUTConditioner("words:64", cfg["dim"], 16)},
                             duration=duration)


def test_chroma_condition_masks_for_the_loss_and_loops_for_sampling():
    c = melody.ChromaConditioner(8, duration=SECONDS)
    assert c.frames == FRAMES == 1 + 64000 // 4096
    classes = torch.tensor([[3, 3, 7, -1, -1], [-1] * 5])
    cond, mask = c(classes)
    assert mask.tolist() == [[True, True, True, False, False], [False] * 5]
    assert not cond[~mask].any() and torch.allclose(cond[0, 2], c.output_proj.weight[:, 7] + c.output_proj.bias)
    cond, mask = c(classes, sampling=True)      # looped to one segment, silence (-1) reads as C, nothing masked
    assert cond.shape == (2, FRAMES, 8) and mask.all()
    assert torch.allclose(cond[0, 5], cond[0, 0]) and torch.allclose(cond[0, 3], c.output_proj.bias + c.output_proj.weight[:, 0])
    assert torch.allclose(c.null(2, "cpu")[0], cond[1:].expand(2, -1, -1))
    assert c(torch.arange(FRAMES + 5)[None] % 12, sampling=True)[0].shape[1] == FRAMES    # trimmed
    # windows of a long piece: each melody repeats periodically from the window's start time
    tune = torch.arange(10)
    assert melody.window_classes([tune, None], 0.0, 4).tolist() == [[0, 1, 2, 3], [-1] * 4]
    assert melody.window_classes([tune], 1.0, 4).tolist() == [[7, 8, 9, 0]]        # 1 s = 7.8 frames: from frame 7


def test_attribute_dropout_drops_what_it_should_at_its_rate():
    lm = tiny_melody_lm(attributes=("genre",), attribute_dropout=("self_wav:0.5", "genre:0.2"), cfg_dropout=0.1).train()
    n, rounds = 64, 40
    values = {"description": ["calm piano"] * n, "genre": ["jazz"] * n, "self_wav": torch.zeros(n, 5, dtype=torch.long)}
    drops = {name: 0 for name in values}
    torch.manual_seed(0)
    for _ in range(rounds):
        out = lm.drop_conditions(values)
        desc = torch.tensor([d is None for d in out["description"]])
        genre = torch.tensor([g is None for g in out["genre"]])
        tune = (out["self_wav"] == -1).all(1)
        assert torch.equal((out["self_wav"] == -1).any(1), tune)        # a row's melody goes whole, or stays
        drops["description"] += int(desc.sum())
        drops["genre"] += int(genre.sum())
        drops["self_wav"] += int(tune.sum())
        assert bool((genre & tune)[desc].all())                       # CFG dropout nulls every attribute of its rows
    total = n * rounds
    # description only by CFG (0.1); genre 1 - 0.9 * 0.8 = 0.28; the melody 1 - 0.9 * 0.5 = 0.55
    for name, p in (("description", 0.1), ("genre", 0.28), ("self_wav", 0.55)):
        assert abs(drops[name] / total - p) < 4 * math.sqrt(p * (1 - p) / total), name
    kept = lm.eval().drop_conditions(values)                          # eval: nothing dropped
    assert torch.equal(kept["self_wav"], values["self_wav"]) and kept["genre"] == values["genre"]
    # AudioCraft's option: one coin per attribute for the whole batch
    batch = tiny_melody_lm(attribute_dropout=("self_wav:0.5",), attribute_dropout_per_batch=True).train()
    kinds = {tuple((batch.drop_conditions(values)["self_wav"] == -1).all(1).tolist()) for _ in range(30)}
    assert kinds == {(True,) * n, (False,) * n}
    with pytest.raises(UserError, match=r"attribute_dropout=\['mood:0.5'\]: 'mood:0.5' must be NAME:P"):
        tiny_melody_lm(attribute_dropout=("mood:0.5",))
    with pytest.raises(UserError, match="must be NAME:P"):
        tiny_melody_lm(attribute_dropout=("self_wav:1.5",))


def test_a_dropped_melody_is_no_melody_to_the_loss():
    """The loss of a batch whose melody was dropped equals the loss without melody values at all; a real melody
    gives another loss (the condition reaches the model)."""
    lm = tiny_melody_lm().eval()
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 24, (3, 2, 20), generator=g)
    classes = torch.randint(0, 12, (3, FRAMES), generator=g)
    none = lm.compute_loss(codes, lm.condition({"description": ["a", "b", "c"]}))[0]
    dropped = lm.compute_loss(codes, lm.condition({"description": ["a", "b", "c"], "self_wav": classes * 0 - 1}))[0]
    real = lm.compute_loss(codes, lm.condition({"description": ["a", "b", "c"], "self_wav": classes}))[0]
    assert torch.equal(none, dropped) and (real - none).abs() > 1e-4


# ---- a melody model learns to follow the chroma

CODES_PER_CHROMA = 4      # code frames per chroma frame in the synthetic task: 31.25 code frames per second
STEPS = 150


def synthetic_batch(g, B, frames):
    """Melodies of two held notes (chroma classes [B, frames]) and codes [B, 2, 4 * frames] that play them:
    codebook 0 holds the pitch class (+ 12 at random: two timbres), codebook 1 noise. A stand-in for audio whose
    codec keeps pitch (the debug codec's decoder does not: its output's chroma is one class whatever the codes)."""
    notes = torch.randint(0, 12, (B, 2), generator=g)
    classes = notes.repeat_interleave(math.ceil(frames / 2), 1)[:, :frames]            # [B, frames]
    q0 = classes.repeat_interleave(CODES_PER_CHROMA, 1) + 12 * torch.randint(0, 2, (B, 1), generator=g)
    q1 = torch.randint(0, 24, q0.shape, generator=g)
    return torch.stack([q0, q1], 1), classes                                            # [B, 2, T], [B, frames]


def codes_chroma(codes):
    """The pitch class of each chroma frame of generated codes [B, 2, T]: the most common of its code frames."""
    pitch = (codes[:, 0] % 12).unflatten(1, (-1, CODES_PER_CHROMA))                     # [B, frames, 4]
    return torch.nn.functional.one_hot(pitch, 12).sum(2).argmax(-1)                    # [B, frames]


def chroma_cos(a, b):
    """AudioCraft's chroma cosine on argmax chroma: the mean cosine of one-hot frames (1 where the classes agree)."""
    return float(torch.nn.functional.cosine_similarity(
        torch.nn.functional.one_hot(a, 12).float(), torch.nn.functional.one_hot(b, 12).float(), dim=-1).mean())


def test_melody_model_follows_the_given_chroma_better_than_without_it():
    """Trained the way train.py trains (TrainStep: CFG and attribute dropout, the conditions, the loss), sampled the way
    generate.py samples (model.sample with melodies): the generated pitch classes follow the given melody; the same
    model without a melody plays the notes of no melody in particular."""
    lm = tiny_melody_lm(duration=1.0, dim=64, n_heads=4, cfg_dropout=0.1, attribute_dropout=("self_wav:0.3",))
    frames = lm.melody.frames                                                            # 8 chroma frames: 1 s
    step = train.TrainStep(lm).train()
    opt = torch.optim.AdamW(lm.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    for _ in range(STEPS):
        codes, classes = synthetic_batch(g, 16, frames)
        ce, _ = step(codes, [None] * 16, None, {"self_wav": classes})
        opt.zero_grad()
        ce.backward()
        opt.step()
    lm.eval()
    _, tunes = synthetic_batch(torch.Generator().manual_seed(99), 16, frames)
    T = frames * CODES_PER_CHROMA
    common = dict(window=T, cfg_coef=3.0, top_k=0, top_p=0.0, temperature=1.0, seeds=list(range(16)))
    with_tune = lm_lib.sample(lm, [None] * 16, T, melodies=list(tunes), frame_rate=T, **common)
    without = lm_lib.sample(lm, [None] * 16, T, **common)
    following, baseline = chroma_cos(codes_chroma(with_tune), tunes), chroma_cos(codes_chroma(without), tunes)
    print(f"chroma cosine to the given melody: {following:.3f} with it, {baseline:.3f} without")
    assert following > 0.7 and baseline < 0.3


# ---- the chroma cache beside the token cache, text attributes from the sidecars

NOTES = (261.63, 329.63, 392.0)      # C4, E4, G4: one second each


def notes_file(path, rate=32000, seconds=3.0, sidecar=None, notes=NOTES):
    t = np.arange(int(seconds * rate)) / rate
    hz = np.array(notes)[np.minimum((t // 1.0).astype(int), len(notes) - 1)]
    x = sum(a * np.sin(2 * np.pi * hz * k * t) for k, a in ((1, 0.5), (2, 0.2), (3, 0.1)))
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, x.astype(np.float32), rate)
    path.with_suffix(".json").write_text(json.dumps(sidecar or {}))
    return path


@pytest.fixture(scope="module")
def notes_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("notes")
    for split in ("train", "valid"):
        for k, seconds in enumerate((3.0, 2.2, 1.3)):
            notes_file(root / "audio" / split / f"{k}.wav", seconds=seconds,
                       sidecar={"description": f"clip {k}", "genre": "Jazz", "moods": ["calm", "warm"], "bpm": 90 + k})
        (root / split).mkdir()
        data.build_manifest(root / "audio" / split, root / split / "data.jsonl")
    return root


def test_chroma_cache_is_made_once_beside_the_token_cache_and_aligned_with_segments(notes_set, tmp_path, monkeypatch):
    from test_data import FakeCodec
    calls = []
    encode = melody.ChromaEncoder.encode
    monkeypatch.setattr(melody.ChromaEncoder, "encode", lambda self, wav: calls.append(len(wav)) or encode(self, wav))
    kw = dict(codec=FakeCodec(), segment_duration=1.0, token_cache=True, cache_dir=str(tmp_path), seed=1,
              attributes=("genre", "moods:prepend"), chroma=melody.ChromaEncoder())
    # two ranks fill the chroma cache as they fill the token cache: each its shard (data.tokenize)
    file = data.manifest_file(notes_set / "train")
    out = data.cache_path(tmp_path, melody.ChromaEncoder(), file, data.read_manifest(file))
    for rank in (1, 0):
        data.tokenize(file, out, melody.ChromaEncoder(), rank=rank, world_size=2, verbose=False)
    assert out.parent.name == "chroma16384-mix" and out.parent.parent == tmp_path
    assert {r["shard"] for r in data._cache_rows(out).values()} == {0, 1}
    n = len(calls)
    train_split = data.open_split(str(notes_set), "train", train=True, **kw)
    assert len(calls) == n and (tmp_path / "fake-1").is_dir()      # the finished chroma cache is only read
    valid = data.open_split(str(notes_set), "valid", train=False, **kw)
    assert len(calls) > n
    made = len(calls)
    data.open_split(str(notes_set), "valid", train=False, **kw)
    assert len(calls) == made                                       # made once: opening again encodes nothing
    whole = {}
    for ds in (train_split, valid):
        for i in range(12 if ds is train_split else len(ds)):
            item = ds[i]
            path = item["path"]
            if path not in whole:
                wav, rate = sf.read(path, dtype="float32")
                whole[path] = melody.chroma_classes(torch.from_numpy(wav)[None], rate)[0]
            real = int(item["valid"].sum())
            assert item["chroma"].shape == (melody.chroma_frames(32000),)
            got = item["chroma"][item["chroma"] >= 0]
            assert torch.equal(item["chroma"][:len(got)], got)       # frames past the segment's audio are -1
            assert len(got) <= min(math.ceil(real / 50 * melody.FRAME_RATE - 1e-9), 8)
            # the segment's chroma is the file's, from the frame at its start time on (the file start: frame 0)
            offsets = [s for s in range(len(whole[path]) - len(got) + 1)
                       if torch.equal(whole[path][s:s + len(got)], got)]
            assert (0 in offsets and len(got) == min(math.ceil(real / 50 * melody.FRAME_RATE), 8)) if not ds.train \
                else offsets, path
            assert item["attributes"] == {"genre": "jazz", "moods": "calm warm"}
    # reading audio instead of the cache: the chroma of each segment's audio, the same at the file starts
    audio = data.open_split(str(notes_set), "valid", train=False, **{**kw, "token_cache": False})
    for i in range(len(valid)):
        a, b = valid[i]["chroma"], audio[i]["chroma"]
        assert torch.equal(a >= 0, b >= 0) and (a == b).float().mean() >= 0.75
    batch = data.collate([valid[0], valid[1]])
    assert batch["chroma"].shape == (2, 8) and batch["attributes"]["genre"] == ["jazz", "jazz"]
    null = data.unconditioned(batch)
    assert (null["chroma"] == -1).all() and null["attributes"]["moods"] == [None, None] and null["descriptions"] == [
        None, None]


# ---- stems

class FakeDemucs:
    """Demucs' interface (sources, samplerate, audio_channels) for separate(): each stem a known tone."""
    sources, samplerate, audio_channels = ["drums", "bass", "other", "vocals"], 44100, 2


def test_stem_removal_keeps_vocals_and_other_and_is_one_line_without_demucs(monkeypatch, tmp_path):
    t = torch.arange(2 * 44100) / 44100

    def separate(model, mix):
        assert mix.shape[1:] == (2, 2 * 44100)                    # resampled to Demucs' rate, in stereo
        tone = lambda hz: torch.sin(2 * math.pi * hz * t)         # noqa: E731
        stems = torch.stack([torch.randn_like(t), tone(110.0) * 3, tone(392.0) * 0.3, tone(392.0) * 0.3])  # G
        return stems[None, :, None].expand(len(mix), -1, 2, -1)
    monkeypatch.setattr(melody, "load_demucs", lambda stems: FakeDemucs())
    monkeypatch.setattr(melody, "separate", separate)
    mix = torch.randn(1, 2 * 32000)
    classes = melody.chroma_classes(mix, 32000, stems="weights.th")
    assert (classes == melody.PITCH_CLASSES.index("G")).all()      # the bass's A and the drums' noise are gone
    assert not (melody.chroma_classes(mix, 32000) == 7).all()       # the full mix: the noise's own chroma
    assert melody.ChromaEncoder("//reference/demucs/htdemucs.th").identity() == "chroma16384-stems-htdemucs"
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "demucs", None)                # not installed
    with pytest.raises(UserError, match=r"chroma_stems=w.th: removing drums and bass needs Demucs: pip install demucs"):
        melody.check_stems("w.th")
    with pytest.raises(UserError, match="needs Demucs"):
        train.parse_args([str(ROOT / "config/debug.py"), str(ROOT / "config/melody.py"), "--chroma_stems=w.th"])
    monkeypatch.setitem(sys.modules, "demucs", type(sys)("demucs"))
    with pytest.raises(UserError, match=r"chroma_stems=//reference/demucs/x.th: .* does not exist"):
        melody.check_stems("//reference/demucs/x.th")


# ---- runs: train.py, generate.py --melody

MELODY_RUN = TINY_RUN + [str(ROOT / "config/melody.py")]


def test_debug_melody_run_trains_and_its_stages_follow_melodies(tmp_path):
    """config/debug.py + config/melody.py on a small demo set: the chroma cache is made beside the token cache, the
    run records its chroma (full mix), the generate stage writes melody samples and their text-only twins, the
    evaluate stage reports chroma_cos."""
    import os
    import subprocess
    demo = demo_lib.make_demo_set(tmp_path / "demo", seed=0,
                                  sizes={"train": 8, "valid": 2, "evaluate": 2, "generate": 2})
    args = [str(ROOT / "config/debug.py"), str(ROOT / "config/melody.py"), "--dim=32", "--n_layers=1", "--n_heads=2",
            "--lut_dim=32", "--epochs=1", "--updates_per_epoch=2", "--batch_size=4", "--generate_every=1",
            "--evaluate_every=1", "--evaluate_samples=2", "--generate_count=2", "--generate_duration=0.5",
            "--metrics=chroma_cos", "--num_workers=0", f"--dataset={demo}", f"--runs_dir={tmp_path / 'runs'}",
            f"--cache_dir={tmp_path / 'cache'}"]
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True, cwd=ROOT,
                       timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    run = next((tmp_path / "runs" / "xps").iterdir())
    config = json.loads((run / "config.json").read_text())
    chroma = (config["chroma_fuse"], config["chroma_stems"], config["attribute_dropout"])
    assert chroma == ("prepend", "", ["self_wav:0.5"])
    assert (tmp_path / "cache" / "chroma16384-mix").is_dir()
    samples = sorted(p.name for p in (run / "samples" / "1").glob("*.wav"))
    assert samples == ["000.wav", "000_text.wav", "000_uncond.wav", "001.wav", "001_text.wav", "001_uncond.wav"]
    meta = json.loads((run / "samples" / "1" / "000.json").read_text())
    text_only = json.loads((run / "samples" / "1" / "000_text.json").read_text())
    assert meta["melody"].endswith(".wav") and "melody" not in text_only
    rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    evaluate = next(row for row in rows if row["stage"] == "evaluate")
    assert 0 <= evaluate["chroma_cos"] <= 1 and evaluate["ce_uncond"] > 0


@pytest.fixture(scope="module")
def melody_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("runs"), MELODY_RUN)


def test_generate_follows_a_melody_file_and_records_it(melody_run, tmp_path):
    # G then E: a melody starting on C would read as the null melody (the chroma of silence is all C)
    tune = notes_file(tmp_path / "tune.flac", rate=44100, seconds=1.5, notes=NOTES[:0:-1])
    out = tmp_path / "out.wav"
    args = [f"--run={melody_run}", "--prompt=calm", "--duration=0.8", f"--out={out}", "--seed=3"]
    assert generate.main(args + [f"--melody={tune}"]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["melody"] == str(tune) and meta["chroma_stems"] == "" and meta["melody_file"]
    a = sf.read(out)[0]
    # the melody reached the model: without it (or with another) the same seed gives other audio
    assert generate.main(args[:-2] + [f"--out={tmp_path / 'none.wav'}", "--seed=3"]) == 0
    assert not np.array_equal(a, sf.read(tmp_path / "none.wav")[0])
    # what generate.py did is model.sample with the file's chroma classes, looped through the piece's windows
    mg = generate.load(str(melody_run))
    wav = melody.read_melody(tune)
    classes = mg.lm.melody.melody_classes(wav, melody.CHROMA_RATE)
    codes = lm_lib.sample(mg.lm, ["calm"], 40, window=mg.window, seeds=[3], melodies=[classes],
                          frame_rate=mg.codec.frame_rate, **mg.defaults)
    again = tmp_path / "again.wav"
    assert generate.main(args[:-2] + [f"--out={again}", "--seed=3", f"--melody={tune}"]) == 0
    assert np.array_equal(sf.read(again)[0], a) and codes.shape == (1, 4, 40)


def test_evaluate_follows_each_references_melody_as_generate_does(melody_run, tmp_path, monkeypatch):
    """evaluate.py on a melody model: each item follows its reference audio's melody, its .json records it as
    generate.py's --melody (its command remakes the file), and a second run reuses every file."""
    import shlex
    import evaluate
    split = tmp_path / "ds" / "evaluate"
    refs = [notes_file(split / "g.wav", seconds=1.0, notes=NOTES[:0:-1], sidecar={"description": "calm"}),
            notes_file(split / "c.wav", seconds=1.0, sidecar={"description": "calm"})]
    data.write_manifest([data.AudioMeta(str(f), 1.0, 32000) for f in refs], split / "data.jsonl")
    out = tmp_path / "eval"
    args = [f"--run={melody_run}", f"--dataset={tmp_path / 'ds'}", "--metrics=chroma_cos", "--duration=0.4",
            "--batch_size=2", f"--out={out}", "--history=False"]
    assert evaluate.main(args) == 0
    metas = [json.loads((out / "samples" / f"00{i}.json").read_text()) for i in range(2)]
    assert [m["melody"] for m in metas] == [str(f) for f in refs] and metas[0]["melody_file"]
    remake = [a for a in shlex.split(metas[0]["command"])[2:] if not a.startswith("--out=")]
    assert f"--melody={refs[0]}" in remake
    assert generate.main(remake + [f"--out={tmp_path / 'remake.wav'}"]) == 0
    assert np.array_equal(sf.read(tmp_path / "remake.wav")[0], sf.read(out / "samples" / "000.wav")[0])
    # and the melody is what made it: the same command without it gives other audio
    without = [a for a in remake if not a.startswith("--melody=")] + [f"--out={tmp_path / 'without.wav'}"]
    assert generate.main(without) == 0
    assert not np.array_equal(sf.read(tmp_path / "without.wav")[0], sf.read(out / "samples" / "000.wav")[0])
    calls = []
    monkeypatch.setattr(lm_lib, "sample", lambda *a, **kw: calls.append(1))
    assert evaluate.main(args) == 0 and calls == []
