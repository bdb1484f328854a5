"""text.py: T5 port and tokenizer against Hugging Face transformers (random weights), the conditioners'
contract (masking, word dropout, cache, hidden T5), the LUT conditioner and the tokenizer-training CLI."""
import base64
import copy
import gzip
import io
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

import text
from env import UserError

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(2)

WORDS = ("rock pop jazz drums guitar piano bass calm happy energetic melody synth bpm the a of with and slow fast "
         "upbeat electronic ambient orchestral strings violin cello vocals female male café naïve música Ünïcödé "
         "日本 音楽 lo-fi hip-hop 80s 120 3/4 C# minor major, chill. heavy! soft? (live) 'acoustic' \"remix\"").split()
RARE = "🎸 🥁 👍🏽 Ω ж ǅ ﬁ ｆｕｌｌ ＡＢＣ e\u0301 x\u00a0y a\u200bb 한국어 עברית ٣٤ ½ ① ™ 𝄞".split(" ")


def sentences(n, seed, words=WORDS, max_words=12):
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(1, max_words))) for _ in range(n)]


def train_spiece(directory, vocab_size=150):
    """A T5-style sentencepiece model (<pad> 0, </s> 1, <unk> 2) written as directory/spiece.model."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences(400, 0)), model_writer=buf,
                                   vocab_size=vocab_size, model_type="unigram", pad_id=0, eos_id=1, unk_id=2,
                                   bos_id=-1, hard_vocab_limit=False, minloglevel=2)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "spiece.model").write_bytes(buf.getvalue())
    return spm.SentencePieceProcessor(model_proto=buf.getvalue()).get_piece_size()


def hf_t5(feed_forward_proj, vocab_size, seed=0):
    from transformers import T5Config, T5EncoderModel
    torch.manual_seed(seed)
    # max_distance 20 puts the longer test sequences into the logarithmic buckets and the shared last bucket.
    config = T5Config(vocab_size=vocab_size, d_model=64, d_kv=16, num_heads=4, d_ff=96, num_layers=3,
                      relative_attention_num_buckets=16, relative_attention_max_distance=20,
                      feed_forward_proj=feed_forward_proj, dropout_rate=0.0)
    model = T5EncoderModel(config).eval()
    with torch.no_grad():  # random norm gains, so a missing or misplaced norm weight cannot pass
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def t5_dirs(tmp_path_factory):
    """{feed_forward_proj: (directory, HF model)}: a saved random T5 with a trained spiece.model."""
    out = {}
    for ff in ("relu", "gated-gelu"):
        d = tmp_path_factory.mktemp(ff)
        n = train_spiece(d)
        model = hf_t5(ff, n + 100)
        model.save_pretrained(d)
        out[ff] = (d, model)
    return out


@pytest.fixture(scope="module")
def hf_tokenizer(t5_dirs):
    from transformers import T5Tokenizer
    return T5Tokenizer.from_pretrained(str(t5_dirs["relu"][0]))


@pytest.mark.parametrize("ff", ["relu", "gated-gelu"])
def test_t5_encoder_matches_transformers(t5_dirs, ff):
    directory, ref = t5_dirs[ff]
    ours, _ = text.load_t5(str(directory))
    assert not any(p.requires_grad for p in ours.parameters())
    g = torch.Generator().manual_seed(1)
    lengths = [45, 30, 7, 1]  # 45 > max_distance: offsets past it share the last bucket
    ids = torch.randint(3, ref.config.vocab_size, (len(lengths), max(lengths)), generator=g)
    valid = torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]
    ids[~valid] = 0
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=valid.long()).last_hidden_state
        got = ours(ids, valid)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() < 1e-5


def test_t5_loads_bin_and_sharded_checkpoints_alike(t5_dirs, tmp_path):
    directory, ref = t5_dirs["gated-gelu"]
    single, _ = text.load_t5(str(directory))
    sharded_dir = tmp_path / "sharded"
    ref.save_pretrained(sharded_dir, max_shard_size="20KB")
    assert (sharded_dir / "model.safetensors.index.json").is_file()
    # A full T5 checkpoint in the old format: the embedding under encoder.embed_tokens, a decoder to skip.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    state = {k.replace("shared.", "encoder.embed_tokens."): v for k, v in ref.state_dict().items()}
    state["decoder.block.0.layer.0.SelfAttention.q.weight"] = torch.zeros(3, 3)
    torch.save(state, bin_dir / "pytorch_model.bin")
    for d in (sharded_dir, bin_dir):
        for name in ("config.json", "spiece.model"):
            (d / name).write_bytes((directory / name).read_bytes())
        other, _ = text.load_t5(str(d))
        for (name, a), b in zip(single.state_dict().items(), other.state_dict().values()):
            assert torch.equal(a, b), (d.name, name)


def parity_strings():
    """A few hundred strings: empty, whitespace, unicode unseen in training, numbers, specials, long ones."""
    fixed = ["", " ", "   ", "\t\n", "rock", "  rock   pop  ", "rock\tpop\njazz\r\n", "ROCK Pop", "ｆｕｌｌｗｉｄｔｈ ＡＢＣ",
             "café naïve", "e\u0301 vs é", "日本語の音楽", "🎸🥁 guitar", "120bpm 3.5 1,000 2024-01-01 ½", "a" * 300,
             "x\u00a0y a\u200bb", "ﬁne ligature", "\u3000wide space\u3000", "\x00\x01ctrl", "drums!!!...???",
             "<extra_id_0> rock", "rock</s>pop", "<unk>", "x<pad>y", "<extra_id_99> <extra_id_100> <EXTRA_ID_1>",
             " ".join(WORDS) * 3]
    mixed = sentences(150, 7, words=WORDS + RARE, max_words=20)
    long = sentences(30, 8, max_words=200)
    numbers = [str(random.Random(i).randint(0, 10 ** 9)) + " bpm" for i in range(30)]
    return fixed + mixed + long + numbers


def test_tokenizer_matches_t5tokenizer(t5_dirs, hf_tokenizer):
    _, tok = text.load_t5(str(t5_dirs["relu"][0]))
    strings = parity_strings()
    assert len(strings) > 200
    mismatches = [(s, tok.encode(s), ids) for s, ids in zip(strings, hf_tokenizer(strings)["input_ids"])
                  if tok.encode(s) != ids]
    assert not mismatches, mismatches[:3]
    assert any(2 in tok.encode(s) for s in RARE)  # unknown characters were part of the test
    # Batches: padded to the longest with <pad>, mask on real tokens; truncation keeps EOS last.
    batch = ["calm piano", "", "heavy rock with drums and guitar"]
    ids, valid = tok(batch)
    ref = hf_tokenizer(batch, padding=True, return_tensors="pt")
    assert torch.equal(ids, ref["input_ids"]) and torch.equal(valid, ref["attention_mask"].bool())
    short = text.Tokenizer(t5_dirs["relu"][0] / "spiece.model", max_length=5, t5=True)
    ref = hf_tokenizer(strings[:60], truncation=True, max_length=5)["input_ids"]
    assert [short.encode(s) for s in strings[:60]] == ref


def make_conditioner(t5_dirs, ff="relu", output_dim=24, **kw):
    torch.manual_seed(0)
    return text.T5Conditioner(str(t5_dirs[ff][0]), output_dim, **kw)


def test_t5_conditioner_matches_transformers_and_zeroes_padding(t5_dirs, hf_tokenizer):
    cond = make_conditioner(t5_dirs, "gated-gelu").eval()
    ref = t5_dirs["gated-gelu"][1]
    batch = ["heavy rock with drums and guitar, 120 bpm", "", "calm piano", None]
    out, mask = cond(batch)
    tokens = hf_tokenizer(["" if t is None else t for t in batch], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = ref(**tokens).last_hidden_state
    expected_mask = tokens["attention_mask"].bool() & torch.tensor([True, False, True, False])[:, None]
    assert torch.equal(mask, expected_mask)
    expected = cond.output_proj(hidden) * expected_mask[..., None]
    assert out.shape == (4, tokens["input_ids"].shape[1], 24)
    assert (out - expected).abs().max() < 1e-5
    assert out[1].abs().max() == 0 and out[3].abs().max() == 0 and out[2, mask[2].sum():].abs().max() == 0
    # A batch of null descriptions (CFG's unconditional half): one fully masked zero position per row.
    out, mask = cond([None, ""])
    assert out.shape == (2, 1, 24) and not mask.any() and out.abs().max() == 0


def test_t5_is_hidden_from_the_module_tree_and_only_output_proj_trains(t5_dirs):
    cond = make_conditioner(t5_dirs).train()
    assert set(cond.state_dict()) == {"output_proj.weight", "output_proj.bias"}
    assert [n for n, _ in cond.named_parameters()] == ["output_proj.weight", "output_proj.bias"]
    assert [n for n, _ in cond.named_modules()] == ["", "output_proj"]
    out, mask = cond(["calm piano", "fast drums"])
    out.sum().backward()
    assert cond.output_proj.weight.grad.abs().sum() > 0
    assert not any(p.requires_grad or p.grad is not None for p in cond.t5.model.parameters())
    twin = copy.deepcopy(cond)  # an EMA copy: own projection, the same frozen T5
    assert twin.t5 is cond.t5 and twin.output_proj.weight is not cond.output_proj.weight
    cond.to(torch.device("cpu"))  # follows the projection's device lazily; a no-op here
    assert cond(["calm piano"])[0].device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_t5_follows_the_conditioner_to_the_gpu(t5_dirs):
    cond = make_conditioner(t5_dirs).eval()
    cpu, mask = cond(["calm piano", None])
    cond.to("cuda")
    gpu, gmask = cond(["calm piano", None])
    assert gpu.device.type == "cuda" and cond.t5.model.embed_tokens.weight.device.type == "cuda"
    assert torch.equal(gmask.cpu(), mask) and (gpu.cpu() - cpu).abs().max() < 1e-4


def test_word_dropout_applies_in_training_only_and_follows_python_random():
    words = [f"w{i}" for i in range(2000)]
    description = " ".join(words)
    assert text.prepare_texts([description], 0.3, training=False) == [description]
    random.seed(5)
    kept = text.prepare_texts([description], 0.3, training=True)[0].split(" ")
    assert 0.65 < len(kept) / len(words) < 0.75
    assert kept == [w for w in words if w in set(kept)]  # order kept, nothing invented
    random.seed(5)
    assert text.prepare_texts([description], 0.3, training=True)[0].split(" ") == kept
    assert text.prepare_texts(["a b c", None, ""], 1.0, training=True) == ["", "", ""]


def test_word_dropout_in_the_conditioner(t5_dirs):
    cond = make_conditioner(t5_dirs, word_dropout=1.0)
    out, mask = cond.train()(["calm piano", "fast drums"])
    assert not mask.any() and out.abs().max() == 0  # every word dropped: an empty description
    out, mask = cond.eval()(["calm piano", "fast drums"])
    assert mask.all(dim=1).any() and out.abs().max() > 0
    cond.word_dropout = 0.5
    random.seed(0)
    out, mask = cond.train()(["one two three four five six seven eight"] * 4)
    random.seed(0)
    dropped = text.prepare_texts(["one two three four five six seven eight"] * 4, 0.5, training=True)
    assert len(set(dropped)) > 1
    expected, expected_mask = cond.eval()(dropped)
    assert torch.equal(mask, expected_mask) and (out - expected).abs().max() < 1e-5


def test_encoder_outputs_are_cached_bounded_and_bypassed_by_word_dropout(t5_dirs):
    cond = make_conditioner(t5_dirs, cache_size=2).eval()
    first, _ = cond(["calm piano", "fast drums with bass"])
    calls = cond.t5.calls
    again, _ = cond(["fast drums with bass", "calm piano"])  # other order, other padding: from the cache
    assert cond.t5.calls == calls and (again[0, :first.shape[1]] - first[1]).abs().max() < 1e-6
    fresh = make_conditioner(t5_dirs, cache_size=0).eval()
    alone, _ = fresh(["calm piano"])  # the cached row equals a computation of the text alone
    assert (alone[0] - first[0, :alone.shape[1]]).abs().max() < 1e-5 and fresh.t5.cache == {}
    cond(["a third text"])
    assert list(cond.t5.cache) == ["calm piano", "a third text"]  # LRU: the least recently used went out
    cond.word_dropout = 0.5
    cond.train()
    random.seed(1)
    cond(["one two three four five six seven eight nine ten"] * 3)
    assert all(len(k.split()) != 9 for k in cond.t5.cache)
    assert set(cond.t5.cache) <= {"calm piano", "a third text", "one two three four five six seven eight nine ten"}


def test_bfloat16_t5_is_close_and_autocast_does_not_change_float32_t5(t5_dirs):
    batch = ["heavy rock with drums and guitar", "calm piano"]
    cond = make_conditioner(t5_dirs, "gated-gelu", cache_size=0).eval()
    reference, mask = cond(batch)
    half = make_conditioner(t5_dirs, "gated-gelu", dtype="bfloat16", cache_size=0).eval()
    assert half.t5.model.embed_tokens.weight.dtype == torch.bfloat16
    out, half_mask = half(batch)
    assert out.dtype == torch.float32 and torch.equal(mask, half_mask)
    assert (out - reference).norm() / reference.norm() < 3e-2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rows = cond.t5.encode(batch, [False, False], torch.device("cpu"))
    plain = cond.t5.encode(batch, [False, False], torch.device("cpu"))
    assert rows[0].dtype == torch.float32 and all(torch.equal(a, b) for a, b in zip(rows, plain))


def test_bad_t5_directories_and_descriptions_are_user_errors(t5_dirs, tmp_path):
    good = t5_dirs["relu"][0]
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    for name in ("config.json", "spiece.model"):
        (no_weights / name).write_bytes((good / name).read_bytes())
    with pytest.raises(UserError, match="no weights"):
        text.load_t5(str(no_weights))
    no_spiece = tmp_path / "no_spiece"
    no_spiece.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_spiece / name).write_bytes((good / name).read_bytes())
    with pytest.raises(UserError, match="missing spiece.model"):
        text.load_t5(str(no_spiece))
    with pytest.raises(UserError, match="not a directory"):
        text.load_t5(str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="t5_dtype"):
        text.load_t5(str(good), dtype="float16")
    cond = make_conditioner(t5_dirs)
    with pytest.raises(UserError, match="description 1 is a int"):
        cond(["calm piano", 3])
    with pytest.raises(UserError, match="list of strings"):
        cond("calm piano")
    with pytest.raises(UserError, match="'t5' or 'lut'"):
        text.build_conditioner({"conditioner": "clap"}, 16)


def test_too_long_description_is_truncated_and_counted(t5_dirs, capsys):
    cond = text.build_conditioner({"conditioner": "t5", "t5_path": str(t5_dirs["relu"][0]), "t5_dtype": "float32",
                                   "word_dropout": 0.3, "text_max_length": 8}, 16).eval()
    long = " ".join(sentences(1, 3, max_words=300))
    out, mask = cond([long, "calm"])
    assert out.shape[1] == 8 and mask[0].all() and mask[1].sum() < 8
    cond([long + " again", long + " and again"])
    assert cond.t5.tokenizer.truncated == 3
    log = capsys.readouterr().out
    assert "truncated to max_length=8 (1 truncated so far)" in log and "(2 truncated so far)" in log


def write_bpe(path):
    """A tiny tiktoken BPE file: the 256 bytes, then a few merges."""
    ranks = {bytes([b]): b for b in range(256)}
    for merge in (b"ro", b"ck", b"rock", b" r", b"pi", b"an", b"ano"):
        ranks[merge] = len(ranks)
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))


@pytest.mark.parametrize("spec,layers", [("bytes", 0), ("spm", 2), ("tiktoken", 1)])
def test_lut_conditioner_masks_padding_and_empty_descriptions(spec, layers, t5_dirs, tmp_path):
    if spec == "spm":
        spec = str(t5_dirs["relu"][0] / "spiece.model")
    elif spec == "tiktoken":
        write_bpe(tmp_path / "tiny.tiktoken")
        spec = f"tiktoken:{tmp_path / 'tiny.tiktoken'}"
    torch.manual_seed(0)
    lut = text.build_conditioner({"conditioner": "lut", "lut_tokenizer": spec, "lut_dim": 64, "lut_layers": layers,
                                  "word_dropout": 0.0}, 32).eval()
    assert "output_proj.bias" in lut.state_dict() and lut.output_proj.in_features == 64
    out, mask = lut(["rock piano", "", "a much longer description of calm piano music", None])
    assert out.shape[:2] == mask.shape and out.shape[2] == 32 and torch.isfinite(out).all()
    assert not mask[1].any() and not mask[3].any() and out[1].abs().max() == 0 and out[3].abs().max() == 0
    assert mask[0].sum() < mask[2].sum() and out[0, mask[0].sum():].abs().max() == 0
    alone, alone_mask = lut(["rock piano"])  # padding is masked: batch company changes nothing
    n = alone_mask[0].sum()
    assert (alone[0, :n] - out[0, :n]).abs().max() < 1e-5 and n == mask[0].sum()
    lut.train()
    out, mask = lut(["rock piano", "calm"])
    out.sum().backward()
    assert lut.embed.weight.grad.abs().sum() > 0 and len(lut.layers) == layers
    assert all(layer.linear1.weight.grad.abs().sum() > 0 for layer in lut.layers)


def test_lut_tokenizer_specs():
    tok = text.Tokenizer("bytes", max_length=4)
    assert tok.encode("é") == [0xC3 + 2, 0xA9 + 2, tok.eos_id] and tok.encode("") == [tok.eos_id]
    assert tok.encode("abcdef") == [ord("a") + 2, ord("b") + 2, ord("c") + 2, tok.eos_id] and tok.truncated == 1
    with pytest.raises(UserError, match="not found"):
        text.Tokenizer("missing.model")
    with pytest.raises(UserError, match="not found"):
        text.Tokenizer("tiktoken:missing.tiktoken")


def write_manifest(root, with_text=True):
    """An AudioCraft manifest (jsonl.gz) with sidecar .json files next to the (absent) audio."""
    lines = []
    for i, s in enumerate(sentences(60, 11)):
        audio = root / f"track{i}.wav"
        lines.append(json.dumps({"path": str(audio), "duration": 30.0, "sample_rate": 32000}))
        if with_text:
            info = {"description": s, "genre": "Rock", "moods": ["calm", "happy"], "bpm": "120", "key": "",
                    "title": "", "artist": "", "name": "", "instrument": "piano"}
            audio.with_suffix(".json").write_text(json.dumps(info))
    manifest = root / "data.jsonl.gz"
    with gzip.open(manifest, "wt") as f:
        f.write("\n".join(lines) + "\n")
    return manifest


def test_tokenizer_cli_trains_on_a_manifest_and_feeds_the_lut(tmp_path, capsys):
    import data
    manifest = write_manifest(tmp_path)
    out = tmp_path / "lut.model"
    assert data.main(["tokenizer", str(manifest), str(out), "--vocab_size=200"]) == 0
    assert "read 60/60 manifest entries, 60 with text" in capsys.readouterr().out
    sp = spm.SentencePieceProcessor(model_file=str(out))
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2)
    corpus = data.manifest_texts(manifest)  # descriptions, and metadata the way augmentation merges it
    assert "bpm: 120. genre: rock. moods: calm, happy. instrument: piano" in corpus and sentences(1, 11)[0] in corpus
    lut = text.LUTConditioner(str(out), 16, dim=32)
    assert lut.tokenizer.vocab_size == sp.get_piece_size()
    assert lut(["genre: rock. calm piano"])[1].all()


def test_tokenizer_cli_fails_clearly_on_a_manifest_without_text(tmp_path):
    import data
    manifest = write_manifest(tmp_path, with_text=False)
    out = tmp_path / "lut.model"
    r = subprocess.run([sys.executable, str(ROOT / "data.py"), "tokenizer", str(manifest), str(out),
                        "--vocab_size=80"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 2 and not out.exists()
    assert r.stderr.startswith("error: manifest") and "none of its 60 entries has text" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    with pytest.raises(UserError, match="vocab_size='x' is not an int"):
        data.main(["tokenizer", str(manifest), str(out), "--vocab_size=x"])
    with pytest.raises(UserError, match="vocab_size=4: too small"):
        data.main(["tokenizer", str(write_manifest(tmp_path)), str(out), "--vocab_size=4"])
    with pytest.raises(UserError, match="moved to data.py: python data.py tokenizer"):
        text.main(["tokenizer", str(manifest), str(out)])


def test_text_command_shows_how_a_spec_splits_descriptions(capsys):
    assert text.main(["words:64", "Lofi piano, rain", ""]) == 0
    out = capsys.readouterr().out.splitlines()
    tok = text.Tokenizer("words:64")
    assert out == [f"'Lofi piano, rain': 4 ids {tok.encode('lofi piano rain')}", f"'': 1 ids [{tok.eos_id}]",
                   f"vocabulary 66, pad {tok.pad_id}, eos {tok.eos_id}"]
    with pytest.raises(UserError, match="missing arguments"):
        text.main(["bytes"])


def test_words_tokenizer_hashes_each_word_to_one_stable_token():
    from text import Tokenizer
    tok = Tokenizer("words:64")
    a, b = tok.encode("Bright SQUARE lead, fast."), tok.encode("bright square lead fast")
    assert a == b and len(a) == 5 and a[-1] == tok.eos_id  # case and punctuation do not matter; EOS last
    assert all(2 <= i < 66 for i in a[:-1]) and tok.vocab_size == 66
    assert tok.encode("") == [tok.eos_id]
    assert Tokenizer("words").vocab_size == 4098
    assert tok.encode("square") != tok.encode("sine")
