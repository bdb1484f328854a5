"""The Hugging Face transformers MusicGen format, both directions (formats.py): a MusicgenForConditionalGeneration
directory (sharded or not) and a decoder alone (MusicgenForCausalLM) load with transformers' logits; `generate.py
export --format=hf` writes what MusicgenForConditionalGeneration.from_pretrained, AutoProcessor and the text-to-audio
pipeline load, with our logits and our greedy tokens; HF -> fine-tune -> AudioCraft -> HF keeps every logit. All with
random weights built from configs shaped like the public ones: nothing is downloaded.

    python -m pytest tests/test_hf.py -q --durations=5
"""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import formats
import generate
import model as lm_lib
import text
from env import UserError
from test_generate import make_run as make_generate_run
from test_text import train_spiece

ROOT = Path(__file__).resolve().parents[1]
CARD, K, DIM, TEXT_DIM = 64, 4, 64, 32
PROMPTS = ["rock guitar with drums and bass", "calm piano"]   # different lengths: the second row is padded
TOL = 1e-5

transformers = pytest.importorskip("transformers")


def musicgen_config(spiece_size):
    """musicgen-small's config shrunk: a T5 text encoder (relu, as t5-base), EnCodec at 32 kHz / 50 frames/s with 4
    codebooks of 64 (1.2 kbps: transformers counts 6 bits per code), a 2-layer decoder."""
    from transformers import EncodecConfig, MusicgenConfig, MusicgenDecoderConfig, T5Config
    return MusicgenConfig(
        text_encoder=T5Config(vocab_size=spiece_size + 100, d_model=TEXT_DIM, d_kv=8, num_heads=4, d_ff=48,
                              num_layers=2, relative_attention_num_buckets=16, relative_attention_max_distance=20,
                              feed_forward_proj="relu", dropout_rate=0.0),
        audio_encoder=EncodecConfig(sampling_rate=32000, audio_channels=1, upsampling_ratios=[8, 5, 4, 4],
                                    num_filters=4, hidden_size=16, num_lstm_layers=1, codebook_size=CARD,
                                    target_bandwidths=[1.2], use_causal_conv=False, normalize=False,
                                    use_conv_shortcut=False, norm_type="weight_norm", pad_mode="constant"),
        decoder=MusicgenDecoderConfig(vocab_size=CARD, num_codebooks=K, hidden_size=DIM, num_hidden_layers=2,
                                      num_attention_heads=4, ffn_dim=4 * DIM, pad_token_id=CARD, bos_token_id=CARD,
                                      dropout=0.0))


def randomize(hf, seed=0):
    """Random norm gains and biases (a missing or misplaced one cannot pass) and codebooks (config-built EnCodec's are
    all zero: every code would be 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5 if name.endswith("weight") else
                        0.1 * torch.randn(p.shape, generator=g))
        for layer in hf.audio_encoder.quantizer.layers:
            layer.codebook.embed.copy_(torch.randn(layer.codebook.embed.shape, generator=g))
    return hf


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """(directory, model): MusicgenForConditionalGeneration.save_pretrained of a random tiny MusicGen, with its
    tokenizer's spiece.model and a generation_config like the released ones' (top_k 250, guidance 3, 30 s)."""
    from transformers import MusicgenForConditionalGeneration
    d = tmp_path_factory.mktemp("musicgen-tiny")
    n = train_spiece(d)
    torch.manual_seed(0)
    hf = randomize(MusicgenForConditionalGeneration(musicgen_config(n)).eval())
    gc = hf.generation_config
    gc.decoder_start_token_id = gc.pad_token_id = gc.bos_token_id = CARD
    gc.do_sample, gc.top_k, gc.guidance_scale, gc.max_length = True, 250, 3.0, 1500 + K
    hf.save_pretrained(d)
    assert hf.audio_encoder.quantizer.layers.__len__() == K
    return d, hf


def tokens(texts, tokenizer):
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    return enc.input_ids, enc.attention_mask


def random_sequence(B, T, seed=0):
    """Pattern steps [B, K, S] of random codes in the delay layout, step 0 the start token (= CARD)."""
    codes = torch.randint(0, CARD, (B, K, T), generator=torch.Generator().manual_seed(seed))
    return lm_lib.build_sequence(codes, lm_lib.pattern_tables("delay", K, tuple(range(K)), T, False), CARD)


@torch.no_grad()
def ours_logits(mg, texts, sequence):
    return mg.lm(sequence, *mg.lm.conditioner(texts))                         # [B, K, S, card]


@torch.no_grad()
def transformers_logits(hf, tokenizer, texts, sequence):
    ids, mask = tokens(texts, tokenizer)
    logits = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=sequence.reshape(-1, sequence.shape[-1])).logits
    return logits.reshape(sequence.shape[0], K, *logits.shape[1:])          # [B*K, S, card] -> [B, K, S, card]


# ---- import: a transformers directory as --run, --t5, continue_from

def test_musicgen_directory_loads_with_transformers_logits(hf_dir):
    from transformers import T5Tokenizer
    d, hf = hf_dir
    mg = formats.load(str(d))
    assert mg.weights == "transformers" and mg.source == d / "config.json"
    assert (mg.lm_cfg.dim, mg.lm_cfg.text_dim, mg.lm_cfg.n_q, mg.lm_cfg.card, mg.lm_cfg.mask_memory) == (
        DIM, TEXT_DIM, K, CARD, True)
    assert mg.defaults == {"cfg_coef": 3.0, "top_k": 250, "top_p": 0.0, "temperature": 1.0}
    assert mg.max_duration == 30.0 and (mg.codec.n_q, mg.codec.card, mg.codec.frame_rate) == (K, CARD, 50)
    tokenizer = T5Tokenizer.from_pretrained(str(d))
    ids, mask = tokens(PROMPTS, tokenizer)
    our_ids, our_valid = mg.lm.conditioner.t5.tokenizer(PROMPTS)
    assert torch.equal(ids, our_ids) and torch.equal(mask.bool(), our_valid)
    sequence = random_sequence(2, 20)
    want = transformers_logits(hf, tokenizer, PROMPTS, sequence)
    got = ours_logits(mg, PROMPTS, sequence)
    assert (got - want).abs().max() <= TOL                                    # the padded row included
    # the codec is its EnCodec: the same audio from the same codes
    codes = torch.randint(0, CARD, (1, K, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        audio = hf.audio_encoder.decode(codes[None], [None]).audio_values
    assert (mg.codec.decode(codes) - audio).abs().max() <= 1e-4 * audio.abs().max()


def test_generate_samples_a_musicgen_directory(hf_dir, tmp_path):
    import soundfile as sf
    d, _ = hf_dir
    out = tmp_path / "piano.wav"
    assert generate.main([f"--run={d}", "--prompt=calm piano", "--duration=0.2", f"--out={out}", "--seed=1"]) == 0
    assert sf.info(out).frames == 10 * 640 and json.loads(out.with_suffix(".json").read_text())["source"] == str(
        d / "config.json")


def test_t5_option_takes_the_text_encoder_of_a_musicgen_directory(hf_dir):
    d, hf = hf_dir
    t5, tokenizer = text.load_t5(d)
    ids, valid = tokenizer(PROMPTS)
    with torch.no_grad():
        want = hf.text_encoder(input_ids=ids, attention_mask=valid.long()).last_hidden_state
        got = t5(ids, valid)
    assert (got - want)[valid].abs().max() <= TOL


def test_sharded_and_decoder_only_directories_hold_the_same_weights(hf_dir, tmp_path):
    d, hf = hf_dir
    state, path = formats.read_lm_state(str(d))
    assert path == d and set(state) == set(lm_lib.build_lm(formats.read_hf_lm(d)[0], with_t5=False).state_dict())
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    sharded, _ = formats.read_lm_state(str(tmp_path / "sharded" / "config.json"))   # its config.json names it too
    assert sharded.keys() == state.keys() and all(torch.equal(sharded[k], v) for k, v in state.items())
    # the decoder alone: no text projection (it takes states already projected): ours is the identity
    hf.decoder.save_pretrained(tmp_path / "decoder")
    alone, _ = formats.read_lm_state(str(tmp_path / "decoder"))
    proj = "condition_provider.conditioners.description.output_proj."
    assert torch.equal(alone[proj + "weight"], torch.eye(DIM)) and not alone[proj + "bias"].any()
    assert all(torch.equal(alone[k], v) for k, v in state.items() if not k.startswith(proj))
    mg = formats.load_hf(tmp_path / "decoder", codec=str(d), with_t5=False)
    assert mg.lm_cfg.text_dim == DIM
    states = torch.randn(2, 5, DIM, generator=torch.Generator().manual_seed(3))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    sequence = random_sequence(2, 12)
    with torch.no_grad():
        want = hf.decoder(input_ids=sequence.reshape(-1, sequence.shape[-1]), encoder_hidden_states=states,
                          encoder_attention_mask=mask).logits.reshape(2, K, -1, CARD)
        got = mg.lm(sequence, *mg.lm.conditioner(states, mask.bool()))
    assert (got - want).abs().max() <= TOL
    with pytest.raises(UserError, match=r"a decoder alone \(MusicgenForCausalLM\) holds no text encoder and no codec: "
                                        r"pass --t5=PATH and --codec=PATH"):
        formats.load(str(tmp_path / "decoder"))
    with pytest.raises(UserError, match=r"takes text states as wide as itself \(64\), --t5=.* gives 32"):
        formats.load(str(tmp_path / "decoder"), t5=str(d), codec=str(d))


def test_musicgen_directory_exports_to_audiocraft_files(hf_dir, tmp_path, capsys):
    d, _ = hf_dir
    assert generate.main(["export", str(d), str(tmp_path / "audiocraft")]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: ")]
    assert [n.split(":")[1].strip() for n in notes] == ["mask_memory=True"]   # AudioCraft attends to padding
    lm, cfg = formats.load_audiocraft_lm(tmp_path / "audiocraft")
    state, _ = formats.read_lm_state(str(d))
    assert cfg.mask_memory and all(torch.equal(lm.state_dict()[k], v) for k, v in state.items())
    assert formats.load_codec(tmp_path / "audiocraft").identity() == formats.load_codec(d).identity()


# ---- export: a run as a transformers MusicGen directory

def make_run(runs, t5_path, mask_memory=True, seed=0, **overrides):
    """A run as train.py leaves it (test_generate.make_run: random weights, norms included), T5-conditioned."""
    args = ["config/debug.py", f"--dim={DIM}", "--n_layers=2", "--n_heads=4", f"--n_q={K}", f"--card={CARD}",
            "--conditioner=t5", f"--t5_path={t5_path}", f"--text_dim={TEXT_DIM}", f"--mask_memory={mask_memory}",
            f"--codec={t5_path}", "--segment_duration=0.4", "--top_k=250"]
    return make_generate_run(runs, args + [f"--{k}={v}" for k, v in overrides.items()], seed)


@torch.no_grad()
def greedy_tokens(hf, processor, texts, frames):
    """transformers' greedy generation with guidance 3 -> the codes [B, K, frames] it hands its EnCodec."""
    seen = []
    decode = hf.audio_encoder.decode
    hf.audio_encoder.decode = lambda codes, *a, **kw: seen.append(codes[0]) or decode(codes, *a, **kw)
    try:
        audio = hf.generate(**processor(text=texts, padding=True, return_tensors="pt"), do_sample=False,
                            guidance_scale=3.0, max_length=frames + K)
    finally:
        hf.audio_encoder.decode = decode
    return seen[0], audio


@pytest.mark.parametrize("mask_memory", [True, False])
def test_export_hf_loads_in_transformers_and_its_pipeline_with_our_logits_and_greedy_tokens(hf_dir, tmp_path, capsys,
                                                                                             mask_memory):
    from transformers import AutoProcessor, MusicgenForConditionalGeneration
    d, _ = hf_dir
    run = make_run(tmp_path / "runs", d, mask_memory)
    out = tmp_path / "hf"
    assert generate.main(["export", "--format=hf", str(run), str(out)]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: ")]
    assert [n.split(":")[1].strip() for n in notes] == ([] if mask_memory else ["mask_memory=False"])
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]
    mg = formats.load(str(run))
    hf = MusicgenForConditionalGeneration.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    assert torch.equal(processor(text=PROMPTS, padding=True, return_tensors="pt").input_ids,
                       mg.lm.conditioner.t5.tokenizer(PROMPTS)[0])
    gc = hf.generation_config
    assert (gc.do_sample, gc.top_k, gc.guidance_scale, gc.max_length) == (True, 250, 3.0, 20 + K)
    texts = PROMPTS if mask_memory else PROMPTS[:1]    # unmasked: one prompt at a time agrees (the note says so)
    sequence = random_sequence(len(texts), 16)
    got, want = ours_logits(mg, texts, sequence), transformers_logits(hf, processor.tokenizer, texts, sequence)
    assert (got - want).abs().max() <= TOL
    # greedy generation: token for token, and the same audio from them
    frames = 15
    codes, audio = greedy_tokens(hf, processor, texts, frames)
    with torch.no_grad():
        ours = mg.lm.generate(*mg.lm.conditioner(texts), frames, cfg_coef=3.0, greedy=True)
    assert codes.shape == (len(texts), K, frames) and torch.equal(codes, ours)
    assert (mg.codec.decode(ours) - audio).abs().max() <= 1e-4 * audio.abs().max()
    # transformers' text-to-audio pipeline runs it too: greedy, one prompt, 12 new steps (frames + delays)
    if mask_memory:
        from transformers import pipeline
        piped = pipeline("text-to-audio", model=str(out))(PROMPTS[1], forward_params={"do_sample": False,
                                                                                       "max_new_tokens": 12})
        with torch.no_grad():
            codes = mg.lm.generate(*mg.lm.conditioner(PROMPTS[1:]), 12 + 1 - K, cfg_coef=3.0, greedy=True)
            wav = mg.codec.decode(codes)[0, 0]
        assert piped["sampling_rate"] == 32000 and piped["audio"].shape[-1] == wav.shape[-1]
        assert (torch.from_numpy(piped["audio"]).reshape(-1) - wav).abs().max() <= 1e-4 * wav.abs().max()
    # and it comes back into nanomusicgen as it went out
    back = formats.load(str(out))
    training_only = {k: getattr(mg.lm_cfg, k) for k in ("mask_memory", "cfg_dropout", "cfg_dropout_per_batch")}
    assert dataclasses.replace(back.lm_cfg, **training_only) == mg.lm_cfg and back.lm_cfg.mask_memory
    assert back.max_duration == mg.max_duration and back.signature == mg.signature and back.defaults == mg.defaults
    assert (ours_logits(back, texts, sequence) - got).abs().max() <= TOL


@pytest.mark.parametrize("overrides, message", [
    ({"pattern": "parallel"}, "pattern=parallel .*knows only the delay pattern"),
    ({"delays": "[0,0,1,1]"}, r"delays \[0, 0, 1, 1\]\): .*delays 0..3"),
    ({"fuse": "prepend"}, "fuse=prepend: .*cross-attention only"),
    ({"text_dim": DIM}, "text_dim equals dim .*no text projection"),
    ({"text_dim": 48}, "d_model=32, but the model's text projection takes text_dim=48: pass the T5 .*--t5=PATH"),
])
def test_export_hf_refuses_what_transformers_cannot_express_in_one_line(hf_dir, tmp_path, overrides, message):
    run = make_run(tmp_path / "runs", hf_dir[0], **overrides)
    with pytest.raises(UserError, match=message) as e:
        formats.export(str(run), tmp_path / "out", format="hf")
    assert "\n" not in str(e.value) and not list(tmp_path.glob("*out*"))


def test_export_hf_needs_an_empty_directory(hf_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="out already exists and is not an empty directory"):
        formats.export(str(make_run(tmp_path / "runs", hf_dir[0])), tmp_path / "out", format="hf")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]


# ---- the round trip: transformers -> fine-tune here -> AudioCraft -> transformers

def test_round_trip_hf_finetune_audiocraft_hf_keeps_every_logit(hf_dir, tmp_path):
    import demo
    from transformers import AutoProcessor, MusicgenForConditionalGeneration
    d, hf = hf_dir
    demo.make_demo_set(tmp_path / "demo", seed=0, sizes={"train": 4, "valid": 2, "evaluate": 2, "generate": 2})
    args = ["config/debug.py", f"--dim={DIM}", "--n_layers=2", "--n_heads=4", f"--n_q={K}", f"--card={CARD}",
            "--conditioner=t5", f"--t5_path={d}", f"--text_dim={TEXT_DIM}", f"--codec={d}", "--mask_memory=True",
            f"--continue_from={d}", "--segment_duration=1.0", "--batch_size=4", "--epochs=1", "--updates_per_epoch=3",
            "--ema_every=1", "--generate_every=0", "--evaluate_every=0", "--num_workers=0",
            f"--runs_dir={tmp_path / 'runs'}", f"--dataset={tmp_path / 'demo'}", f"--cache_dir={tmp_path / 'cache'}"]
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"continuing from the weights in {d}" in r.stdout
    (run,) = (tmp_path / "runs" / "xps").iterdir()
    start, _ = formats.read_lm_state(str(d))
    tuned = formats.load(str(run))
    state = tuned.lm.state_dict()
    moved = [(state[k] - v).norm() / v.norm() for k, v in start.items() if v.norm() > 0]
    assert 0 < max(moved) < 0.2          # fine-tuned: moved, and from the transformers weights, not from scratch
    # AudioCraft's files, read back by load_audiocraft_lm: the same weights
    formats.export(str(run), tmp_path / "audiocraft")
    audiocraft, _ = formats.load_audiocraft_lm(tmp_path / "audiocraft")
    assert all(torch.equal(audiocraft.state_dict()[k], v) for k, v in state.items())
    # and from them a transformers directory again (the T5 from the first one)
    assert generate.main(["export", "--format=hf", str(tmp_path / "audiocraft"), str(tmp_path / "hf"),
                          f"--t5={d}"]) == 0
    back, _ = formats.read_lm_state(str(tmp_path / "hf"))
    assert back.keys() == state.keys() and all(torch.equal(back[k], v) for k, v in state.items())
    again = MusicgenForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    sequence = random_sequence(2, 16)
    ours = ours_logits(tuned, PROMPTS, sequence)
    t5, tokenizer = text.load_t5(d)
    ids, valid = tokenizer(PROMPTS)
    with torch.no_grad():
        from_audiocraft = audiocraft(sequence, *audiocraft.conditioner(t5(ids, valid), valid))
    assert (from_audiocraft - ours).abs().max() <= TOL
    assert (transformers_logits(again, processor.tokenizer, PROMPTS, sequence) - ours).abs().max() <= TOL
    # what the fine-tuning changed shows in transformers as it does here
    assert (transformers_logits(hf, processor.tokenizer, PROMPTS, sequence) - ours).abs().max() > 1e-3
