"""formats.py: AudioCraft's LM and codec files, xp.cfg, continue_from sources, what an export records about AudioCraft,
and the command line.

    python -m pytest tests/test_formats.py -q --durations=5
"""
import argparse
import dataclasses

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

import formats
import model as lm
from _model_util import make_model, random_codes, random_condition, tiny_config
from env import UserError


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_lookup_follows_omegaconf_references():
    xp = yaml.safe_load("channels: 1\nseanet: {channels: '${channels}', ratios: [8, 5]}\nalias: '${seanet}'\n"
                        "loop: '${loop}'\nenv: '${oc.env:HOME}'\n")
    assert formats.lookup(xp, "seanet.channels") == 1 and formats.lookup(xp, "alias.ratios") == [8, 5]
    assert formats.lookup(xp, "alias.channels") == 1           # a reference through a reference
    assert formats.lookup(xp, "seanet.missing", 7) == 7 and formats.lookup(xp, "channels.deeper", 3) == 3
    assert formats.lookup(xp, "env") == "${oc.env:HOME}"        # a resolver is not a key: left as written
    with pytest.raises(UserError, match="loop"):
        formats.lookup(xp, "loop")


# ---- AudioCraft's state_dict.bin

@pytest.mark.parametrize("overrides", [{}, {"fuse": "prepend", "mask_memory": True, "delays": (0, 0, 1, 1),
                                            "cfg_dropout": 0.2, "cfg_dropout_per_batch": True}])
def test_export_load_round_trip(tmp_path, overrides):
    model = make_model(**overrides)
    cfg = model.cfg
    out = formats.export_audiocraft_lm(torch.compile(model), cfg, tmp_path / "run",
                                       extra={"dataset.segment_duration": 10.0,
                                              "conditioners": {"description": {"t5": {"name": "t5-large"}}}})
    assert out == tmp_path / "run" / "state_dict.bin" and not list((tmp_path / "run").glob("*.tmp*"))
    pkg = torch.load(out, weights_only=True)
    assert list(pkg["best_state"]) == list(model.state_dict())          # no _orig_mod. prefix
    xp = yaml.safe_load(pkg["xp.cfg"])
    assert xp["lm_model"] == "transformer_lm" and xp["transformer_lm"]["dim"] == cfg.dim
    assert xp["transformer_lm"]["num_layers"] == cfg.n_layers and xp["transformer_lm"]["bias_ff"] is False
    assert xp["fuser"][cfg.fuse] == ["description"] and xp["dataset"]["segment_duration"] == 10.0
    assert xp["conditioners"]["description"] == {"model": "t5", "t5": {"name": "t5-large", "finetune": False,
                                                                        "word_dropout": 0.3, "normalize_text": False}}
    assert xp["codebooks_pattern"]["delay"]["delays"] == list(lm.pattern_delays("delay", 4, cfg.delays))
    cond, mask = random_condition()
    codes = random_codes(2, 4, 9, 48)
    want = model.compute_predictions(codes, cond, mask)[0]
    for source in (tmp_path / "run", out):
        loaded, loaded_cfg = formats.load_audiocraft_lm(source)
        assert loaded_cfg == cfg and not loaded.training
        got = loaded.compute_predictions(codes, cond, mask)[0]
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())


AUDIOCRAFT_XP = """
device: cuda
dtype: float16
sample_rate: 32000
channels: 1
lm_model: transformer_lm
solver: musicgen
compression_model_checkpoint: //pretrained/facebook/encodec_32khz
dataset: {batch_size: 192, segment_duration: 30}
codebooks_pattern:
  modeling: delay
  delay: {delays: [0, 1, 2, 3], flatten_first: 0, empty_initial: 0}
  unroll: {flattening: [0, 1, 2, 3], delays: [0, 0, 0, 0]}
  music_lm: {group_by: 2}
  coarse_first: {delays: [0, 0, 0]}
transformer_lm:
  dim: 64
  num_heads: 4
  num_layers: 2
  hidden_scale: 4
  n_q: 4
  card: 48
  dropout: 0.0
  emb_lr: null
  activation: gelu
  norm_first: true
  bias_ff: false
  bias_attn: false
  bias_proj: false
  past_context: null
  causal: true
  custom: false
  memory_efficient: true
  attention_as_float32: false
  layer_scale: null
  positional_embedding: sin
  xpos: false
  checkpointing: none
  weight_init: gaussian
  depthwise_init: current
  zero_bias_init: true
  norm: layer_norm
  cross_attention: false
  qk_layer_norm: false
  qk_layer_norm_cross: false
  attention_dropout: null
  kv_repeat: 1
  two_step_cfg: false
classifier_free_guidance: {training_dropout: 0.3, inference_coef: 3.0}
attribute_dropout: {}
fuser: {cross_attention_pos_emb: false, cross_attention_pos_emb_scale: 1, sum: [], prepend: [],
        cross: [description], input_interpolate: []}
conditioners:
  description:
    model: t5
    t5: {name: t5-base, finetune: false, word_dropout: 0.3, normalize_text: false}
optim: {lr: 1, optimizer: dadam}
"""


def test_loads_an_audiocraft_file(tmp_path):
    # an AudioCraft export: fp16 best_state (as the released files), its full xp.cfg, extra package keys
    model = make_model(text_dim=768)
    state = {k: v.half() for k, v in model.state_dict().items()}
    torch.save({"best_state": state, "xp.cfg": AUDIOCRAFT_XP, "version": "1.4.0a2", "exported": True},
               tmp_path / "state_dict.bin")
    loaded, cfg = formats.load_audiocraft_lm(tmp_path)
    assert cfg == tiny_config(text_dim=768)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert torch.equal(loaded.emb[2].weight, state["emb.2.weight"].float())


def test_wrong_checkpoint_is_a_clear_error(tmp_path):
    model = make_model()
    path = formats.export_audiocraft_lm(model, model.cfg, tmp_path / "a")
    pkg = torch.load(path, weights_only=True)
    state = pkg["best_state"]
    del state["transformer.layers.1.linear2.weight"]
    state["transformer.layers.2.linear1.weight"] = torch.zeros(3)
    state["linears.0.weight"] = torch.zeros(47, 64)
    torch.save(pkg, path)
    with pytest.raises(UserError) as err:
        formats.load_audiocraft_lm(path)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
    assert "1 missing (transformer.layers.1.linear2.weight)" in msg
    assert "1 unexpected (transformer.layers.2.linear1.weight)" in msg
    assert "linears.0.weight (47, 64) vs model (48, 64)" in msg
    pkg = torch.load(formats.export_audiocraft_lm(model, model.cfg, tmp_path / "b"), weights_only=True)
    pkg["xp.cfg"] = pkg["xp.cfg"].replace("bias_ff: false", "bias_ff: true")
    torch.save(pkg, tmp_path / "b" / "state_dict.bin")
    with pytest.raises(UserError, match="bias_ff=True is not supported"):
        formats.load_audiocraft_lm(tmp_path / "b")
    with pytest.raises(UserError, match="no such file"):
        formats.load_audiocraft_lm(tmp_path / "missing")
    torch.save({"model": {}}, tmp_path / "other.bin")
    with pytest.raises(UserError, match="needs 'best_state' and 'xp.cfg'"):
        formats.load_audiocraft_lm(tmp_path / "other.bin")


def test_mask_memory_export_records_that_audiocraft_differs_on_padded_rows(tmp_path):
    """AudioCraft attends to every text position (its fuser drops the mask): on the same weights it computes our
    model with mask_memory=False. For one prompt the two agree; for a batch of prompts of different lengths the
    padded rows differ, and the export says so."""
    model = make_model(mask_memory=True)
    xp = yaml.safe_load(torch.load(formats.export_audiocraft_lm(model, model.cfg, tmp_path),
                                   weights_only=True)["xp.cfg"])
    (note,) = xp["nanomusicgen"]["audiocraft_differences"]
    assert note.startswith("mask_memory=True") and "padded rows of a batch" in note
    ours = formats.load_audiocraft_lm(tmp_path)[0]
    audiocraft = lm.MusicGenLM(dataclasses.replace(ours.cfg, mask_memory=False)).eval()
    audiocraft.load_state_dict(ours.state_dict())
    cond, mask = random_condition()                                  # row 1 is padded after 3 positions
    codes = random_codes(2, 4, 9, 48)
    a, b = (m.compute_predictions(codes, cond, mask)[0].nan_to_num() for m in (ours, audiocraft))
    assert torch.allclose(a[0], b[0], atol=1e-6)                       # the longest prompt: no padding
    assert (a[1] - b[1]).abs().max() > 1e-3                            # the padded row: AudioCraft differs
    alone = [m.compute_predictions(codes[1:], cond[1:, :3], mask[1:, :3])[0].nan_to_num() for m in (ours, audiocraft)]
    assert torch.allclose(alone[0], alone[1], atol=1e-6)             # the same prompt alone: they agree
    plain = make_model()
    plain_xp = yaml.safe_load(torch.load(formats.export_audiocraft_lm(plain, plain.cfg, tmp_path / "plain"),
                                         weights_only=True)["xp.cfg"])
    assert plain_xp["nanomusicgen"]["audiocraft_differences"] == []
    assert formats.audiocraft_differences(tiny_config(fuse="sum"))[0].startswith("fuse=sum")


# ---- continue_from

def test_read_lm_state_unpacks_every_continue_from_source(tmp_path):
    model = make_model()
    state = model.state_dict()
    formats.export_audiocraft_lm(model, model.cfg, tmp_path / "export")
    # AudioCraft's training checkpoint: the LM under best_state.model, the config pickled as an object
    torch.save({"best_state": {"model": state}, "xp.cfg": argparse.Namespace(lr=1e-4), "history": []},
               tmp_path / "checkpoint.th")
    torch.save({"fsdp_best_state": {"model": state}, "best_state": {}, "model": {}}, tmp_path / "fsdp.th")
    # one of ours, saved from a compiled model: prefixed names; its best_state wins over its live weights
    run = tmp_path / "runs" / "xps" / "cafef00d"
    run.mkdir(parents=True)
    torch.save({"model": {k: torch.zeros_like(v) for k, v in state.items()},
                "best_state": {f"_orig_mod.{k}": v for k, v in state.items()}}, run / "checkpoint.pt")
    sources = [(tmp_path / "export", {}, "state_dict.bin"), (tmp_path / "export" / "state_dict.bin", {}, None),
               (tmp_path / "checkpoint.th", {"trust": True}, None), (tmp_path / "fsdp.th", {}, None),
               (run, {}, "checkpoint.pt"), ("cafef00d", {"runs_dir": tmp_path / "runs"}, "checkpoint.pt")]
    for source, kw, name in sources:
        got, path = formats.read_lm_state(str(source), **kw)
        assert path.name == (name or path.name) and path.is_file()
        assert got.keys() == state.keys() and all(torch.equal(got[k], v) for k, v in state.items()), source
    with pytest.raises(UserError, match="refused: it pickles .*--trust_checkpoint=True"):
        formats.read_lm_state(tmp_path / "checkpoint.th")
    torch.save({"optimizer": {}}, tmp_path / "other.pt")
    with pytest.raises(UserError, match=r"continue_from=.*other.pt: .* holds neither `best_state` nor `model`"):
        formats.read_lm_state(tmp_path / "other.pt")
    with pytest.raises(UserError, match="continue_from=deadbeef: no run deadbeef in"):
        formats.read_lm_state("deadbeef", runs_dir=tmp_path / "runs")


# ---- the command line

def test_command_line_describes_files_and_round_trips_a_codec(tmp_path, capsys):
    model = make_model(mask_memory=True)
    formats.export_audiocraft_lm(model, model.cfg, tmp_path)
    assert formats.main(["lm", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"parameters: {lm.num_params(model):,}" in out and "note: mask_memory=True" in out
    assert formats.main(["codec", "debug", f"--export={tmp_path}"]) == 0
    assert "identity" in capsys.readouterr().out
    assert formats.load_codec(tmp_path).identity() == formats.load_codec("debug").identity()
    t = np.arange(16000) / 32000
    sf.write(tmp_path / "in.wav", np.stack([np.sin(2 * np.pi * 220 * t), np.sin(2 * np.pi * 330 * t)], 1) / 4, 32000)
    assert formats.main(["codec", str(tmp_path), str(tmp_path / "in.wav"), str(tmp_path / "out.wav")]) == 0
    info = sf.info(tmp_path / "out.wav")
    assert (info.frames, info.channels, info.samplerate) == (16000, 2, 32000)   # a stereo file, side by side
    for argv in (["lm", "x", "y"], ["codec"], ["midi", "x"]):
        with pytest.raises(UserError, match="usage"):
            formats.main(argv)
