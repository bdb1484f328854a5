"""codec.py: parity with transformers' EncodecModel (random weights, encodec_32khz config), the AudioCraft and
Hugging Face layouts, export, chunking, stereo, the debug codec, bad input.

    python -m pytest tests/test_codec.py -q --durations=5
"""
import copy
import json
import math
import re
import shutil

import pytest
import torch

import bench
import codec
import demo
import env
import formats
from codec import Codec, CodecConfig
from formats import export_audiocraft_codec, load_codec
from env import UserError

SR, HOP = 32000, 640
torch.set_num_threads(2)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """{pad_mode: transformers model} (the same weights), and the save_pretrained directory of both."""
    from transformers.models.encodec.modeling_encodec import EncodecConv1d
    reflect = bench.transformers_encodec(torch.device("cpu"), make_audio())   # codebooks filled, see there
    constant = copy.deepcopy(reflect)   # cheaper than a second init; HF reads pad_mode at each forward
    constant.config.pad_mode = "constant"
    for m in constant.modules():
        if isinstance(m, EncodecConv1d):
            m.pad_mode = "constant"
    directory = tmp_path_factory.mktemp("hf_encodec_32khz")
    reflect.save_pretrained(directory)
    return {"reflect": reflect, "constant": constant}, directory


def make_audio(samples=SR * 7 // 10 + 77):
    """[2, 1, S]: noise, and a decaying chord with harmonics."""
    g = torch.Generator().manual_seed(2)
    t = torch.arange(samples) / SR
    chord = sum(torch.sin(2 * math.pi * f * h * t) / h for f in (220.0, 277.2, 329.6) for h in (1, 2, 3))
    return torch.stack([0.3 * torch.randn(samples, generator=g), 0.2 * chord * torch.exp(-2 * t)])[:, None]


@pytest.mark.parametrize("pad_mode", ["reflect", "constant"])
def test_codes_and_audio_match_transformers_encodec(hf_models, pad_mode):
    models, directory = hf_models
    hf = models[pad_mode]
    ours = load_codec(directory, pad_mode=None if pad_mode == "reflect" else pad_mode)
    assert ours.cfg == CodecConfig.encodec_32khz(pad_mode)
    assert (ours.n_q, ours.card, ours.hop, ours.frame_rate) == (4, 2048, HOP, 50)
    wav = make_audio()
    with torch.no_grad():
        expected = hf.encode(wav, bandwidth=2.2).audio_codes[0]
        expected_wav = hf.decode(expected[None], [None]).audio_values
    assert all(expected[:, q].unique().numel() > 20 for q in range(4))   # the codebooks were really filled
    codes = ours.encode(wav)
    assert codes.shape == (2, 4, math.ceil(wav.shape[-1] / HOP)) and codes.dtype == torch.int64
    assert torch.equal(codes, expected)
    out = ours.decode(expected)
    assert out.shape == (2, 1, codes.shape[-1] * HOP)
    assert (out - expected_wav).abs().max() <= 1e-4 * expected_wav.abs().max()
    # forced into chunks of 20 frames (0.4 s), one item per pass. The math is the same; the float kernels on
    # shorter inputs round differently (~1e-6 relative), which could flip a code at a near-tie.
    ours.max_frames = 20
    assert (ours.encode(wav) == expected).float().mean() >= 0.99
    assert (ours.decode(expected) - out).abs().max() <= 1e-5 * out.abs().max()


def to_audiocraft_layout(hf, legacy):
    """transformers' EncodecModel state dict renamed to AudioCraft's (reference §5.4/§5.5)."""
    out = {}
    for key, value in hf.state_dict().items():
        m = re.match(r"quantizer\.layers\.(\d+)\.codebook\.(\w+)$", key)
        if m:
            out[f"quantizer.vq.layers.{m[1]}._codebook.{m[2]}"] = value
            continue
        side, _, i, rest = key.split(".", 3)
        layer = getattr(hf, side).layers[int(i)]
        if rest.startswith("lstm."):
            new = f"{side}.model.{i}.{rest}"
        elif rest.startswith("block."):
            _, j, _, tail = rest.split(".", 3)
            new = f"{side}.model.{i}.block.{j}.conv.conv.{tail}"
        else:
            wrap = "convtr.convtr" if type(layer).__name__ == "EncodecConvTranspose1d" else "conv.conv"
            new = f"{side}.model.{i}.{wrap}.{rest[len('conv.'):]}"
        if legacy:
            new = new.replace("parametrizations.weight.original0", "weight_g")
            new = new.replace("parametrizations.weight.original1", "weight_v")
        out[new] = value
    return out


XP_CFG = """
sample_rate: 32000
channels: 1
compression_model: encodec
encodec:
  autoencoder: seanet
  quantizer: rvq
  sample_rate: ${sample_rate}
  channels: ${channels}
  causal: false
  renormalize: false
seanet:
  dimension: 128
  channels: ${channels}
  causal: ${encodec.causal}
  n_filters: 64
  n_residual_layers: 1
  ratios: [8, 5, 4, 4]
  activation: ELU
  activation_params: {alpha: 1.0}
  norm: weight_norm
  norm_params: {}
  kernel_size: 7
  residual_kernel_size: 3
  last_kernel_size: 7
  dilation_base: 2
  pad_mode: constant
  true_skip: true
  compress: 2
  lstm: 2
  disable_norm_outer_blocks: 0
  decoder: {trim_right_ratio: 1.0, final_activation: null, final_activation_params: null}
  encoder: {}
rvq: {n_q: 4, q_dropout: false, bins: 2048, decay: 0.99, kmeans_init: true, kmeans_iters: 50,
      threshold_ema_dead_code: 2, orthogonal_reg_weight: 0.0, orthogonal_reg_active_codes_only: false}
"""


def assert_same_model(a, b):
    assert a.cfg == b.cfg
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.identity() == b.identity()


@pytest.mark.parametrize("legacy", [True, False], ids=["weight_g_v", "parametrizations"])
def test_audiocraft_file_loads_the_same_model_as_the_hf_directory(hf_models, tmp_path, monkeypatch, legacy):
    models, directory = hf_models
    state = to_audiocraft_layout(models["reflect"], legacy)
    assert len(state) == 116 and ("encoder.model.0.conv.conv.weight_g" in state) == legacy
    torch.save({"best_state": state, "xp.cfg": XP_CFG}, tmp_path / "compression_state_dict.bin")
    from_audiocraft = load_codec(tmp_path)          # the directory holding the file
    assert from_audiocraft.cfg.pad_mode == "constant" and not from_audiocraft.training
    assert not any(p.requires_grad for p in from_audiocraft.parameters())
    # the HF config says reflect; AudioCraft's xp.cfg says constant: the same model once that is matched
    assert_same_model(from_audiocraft, load_codec(directory, pad_mode="constant"))
    if legacy:
        monkeypatch.setenv("AUDIOCRAFT_REFERENCE_DIR", str(tmp_path.parent))
        env.reset()
        by_reference = load_codec(f"//reference/{tmp_path.name}/compression_state_dict.bin")
        assert by_reference.identity() == from_audiocraft.identity()


def test_export_writes_audiocraft_layout_that_loads_back_exactly(hf_models, tmp_path):
    models, directory = hf_models
    ours = load_codec(directory, pad_mode="constant")
    path = export_audiocraft_codec(ours, tmp_path)
    assert path == tmp_path / "compression_state_dict.bin" and sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    pkg = torch.load(path, weights_only=True)
    expected = to_audiocraft_layout(models["constant"], legacy=True)
    assert pkg["best_state"].keys() == expected.keys()
    assert all(pkg["best_state"][k].shape == v.shape for k, v in expected.items())
    assert formats.codec_config_from_xp(pkg["xp.cfg"], path) == ours.cfg
    assert_same_model(load_codec(path), ours)   # weight norm re-folds to the very same weights


def test_sharded_hf_directory_loads_the_same_codec(hf_models, tmp_path):
    from safetensors.torch import load_file, save_file
    _, directory = hf_models
    state = load_file(directory / "model.safetensors")
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in shards.items():
        save_file({n: state[n].contiguous() for n in part}, tmp_path / file)
    weight_map = {n: file for file, part in shards.items() for n in part}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    shutil.copy(directory / "config.json", tmp_path)
    assert load_codec(tmp_path).identity() == load_codec(directory).identity()


def test_chunked_encoding_gives_the_codes_of_whole_input_encoding():
    debug = load_codec("debug")
    g = torch.Generator().manual_seed(3)
    wav = 0.3 * torch.randn(2, 1, 3 * SR + 123, generator=g)
    debug.max_frames = 10 ** 6
    whole = debug.encode(wav)
    debug.max_frames = 50           # one item per pass, 1 s chunks with overlapping margins
    assert (debug.encode(wav) == whole).float().mean() >= 0.99   # float rounding only, see above
    assert torch.allclose(debug.decode(whole), load_codec("debug").decode(whole), atol=1e-5)


@pytest.mark.parametrize("pad_mode", ["constant", "reflect"])
def test_frames_are_samples_over_hop_rounded_up(pad_mode):
    debug = load_codec("debug", pad_mode=pad_mode)
    for samples in (1, HOP - 1, HOP, HOP + 1, 5 * HOP + 17):
        codes = debug.encode(0.1 * torch.ones(2, 1, samples))
        assert codes.shape == (2, 4, math.ceil(samples / HOP))
        assert debug.decode(codes).shape == (2, 1, codes.shape[-1] * HOP)


def test_stereo_codes_left_and_right_separately_with_interleaved_codebooks():
    mono, stereo = load_codec("debug"), load_codec("debug", stereo=True)
    assert (stereo.channels, stereo.n_q, stereo.card) == (2, 8, mono.card)
    g = torch.Generator().manual_seed(4)
    wav = 0.3 * torch.randn(2, 2, 2 * SR, generator=g)
    codes = stereo.encode(wav)
    left, right = mono.encode(wav[:, :1]), mono.encode(wav[:, 1:])
    assert torch.equal(codes[:, 0::2], left) and torch.equal(codes[:, 1::2], right)
    out = stereo.decode(codes)
    assert torch.allclose(out, torch.cat([mono.decode(left), mono.decode(right)], 1), atol=1e-6)
    assert stereo.identity() != mono.identity()


def test_identity_follows_config_and_weights():
    debug = load_codec("debug")
    assert debug.identity() == load_codec("debug").identity()
    assert debug.identity() != load_codec("debug", pad_mode="reflect").identity()
    cfg, state = demo.debug_codec_state()
    state = {k: v.clone() for k, v in state.items()}
    state["codebooks"][0, 0, 0] += 1e-3
    changed = Codec(cfg)
    changed.load_state_dict(state)
    assert changed.identity() != debug.identity()


def test_debug_codec_is_pinned_small_and_seeded():
    debug = load_codec("debug")
    assert (debug.sample_rate, debug.channels, debug.hop, debug.frame_rate, debug.n_q, debug.card) == \
        (32000, 1, 640, 50, 4, 256)
    assert sum(p.numel() for p in debug.parameters()) < 250_000
    # the same weights and codebooks on every machine: a token cache made anywhere stays valid
    assert debug.identity() == "a218d6bb4b751a39"


def test_debug_codes_tell_notes_and_timbres_apart():
    """A naive Bayes classifier over the debug codec's codes names which of 16 notes (8 pitches x sine/saw)
    is playing in new takes of different loudness and phase: the LM has something to learn from text."""
    debug = load_codec("debug")
    t = torch.arange(SR) / SR
    classes = [(midi, saw) for midi in (48, 55, 60, 64, 67, 72, 79, 84) for saw in (False, True)]
    g = torch.Generator().manual_seed(0)

    def takes(n):   # [n, classes, 4, frames]
        wav = []
        for _ in range(n):
            for midi, saw in classes:
                amp, phase = 0.2 + 0.6 * torch.rand(1, generator=g), torch.rand(1, generator=g)
                p = (440 * 2 ** ((midi - 69) / 12) * t + phase) % 1.0
                wav.append(amp * (2 * p - 1 if saw else torch.sin(2 * math.pi * p)))
        return debug.encode(torch.stack(wav)[:, None]).view(n, len(classes), 4, -1)

    train, test = takes(4), takes(2)
    score = 0
    for q in (0, 1):
        counts = torch.ones(len(classes), debug.card)
        for k in range(len(classes)):
            counts[k] += torch.bincount(train[:, k, q].flatten(), minlength=debug.card)
        score = score + (counts / counts.sum(1, keepdim=True)).log()[:, test[:, :, q]].sum(-1)
    accuracy = (score.argmax(0) == torch.arange(len(classes))).float().mean().item()
    assert accuracy >= 0.75   # chance: 1/16


def test_bad_audio_and_codes_are_user_errors():
    debug = load_codec("debug")
    cases = [
        (lambda: debug.encode(torch.zeros(1, 2, 1000)), "2 channel"),
        (lambda: debug.encode(torch.full((1, 1, 1000), float("nan"))), "NaN or infinite"),
        (lambda: debug.encode(torch.tensor([[[0.0, float("inf")]]])), "NaN or infinite"),
        (lambda: debug.encode(torch.zeros(1, 1, 0)), "empty"),
        (lambda: debug.encode(torch.zeros(1, 1000)), "[batch, channels, samples]"),
        (lambda: debug.encode(torch.zeros(1, 1, 1000, dtype=torch.int16)), "float"),
        (lambda: debug.encode(torch.zeros(1, 1, 1000), sample_rate=44100), "44100 Hz"),
        (lambda: debug.check_rate(16000), "resample"),
        (lambda: debug.decode(torch.zeros(1, 8, 10, dtype=torch.long)), "8 codebooks"),
        (lambda: debug.decode(torch.full((1, 4, 10), 256)), "out of range"),
        (lambda: debug.decode(torch.zeros(1, 4, 0, dtype=torch.long)), "empty"),
    ]
    for call, message in cases:
        with pytest.raises(UserError, match=re.escape(message)):
            call()
    debug.check_rate(32000)


def test_files_of_neither_layout_are_user_errors_naming_them(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a model")
    pointer = tmp_path / "pointer" / "compression_state_dict.bin"
    pointer.parent.mkdir()
    torch.save({"pretrained": "facebook/encodec_32khz", "exported": True}, pointer)
    other = tmp_path / "other.bin"
    torch.save({"model": {}}, other)
    (tmp_path / "empty").mkdir()
    cases = [(text, "neither"), (pointer.parent, "facebook/encodec_32khz"), (other, "best_state"),
             (tmp_path / "empty", "neither"), (tmp_path / "missing", "does not exist")]
    for path, message in cases:
        with pytest.raises(UserError, match=re.escape(message)) as e:
            load_codec(path)
        assert path.name in str(e.value)
