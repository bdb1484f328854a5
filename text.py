"""Text conditioning: descriptions -> (condition [B, L, D], mask [B, L]) for the LM's cross-attention.

Owns a port of the T5 encoder that loads Hugging Face T5 directories (t5-*, t5 v1.1, flan-t5: `config.json`,
safetensors or bin weights, `spiece.model`) with a sentencepiece tokenizer giving `T5Tokenizer`'s ids;
AudioCraft's T5 conditioner (frozen T5 + trained `output_proj`, word dropout, empty descriptions fully masked);
and a lookup-table conditioner with its own tokenizer for training from scratch without T5. model.build_lm builds
the conditioner a config names (build_conditioner); SETTINGS holds the conditioning keys and their defaults.

    python text.py words:4096 "lofi piano, rain" "80s synth pop"                  # how a tokenizer spec splits text
    python data.py tokenizer data/train/data.jsonl lut.model --vocab_size=4000   # sentencepiece on a manifest's text
    python train.py config/base.py --conditioner=lut --lut_tokenizer=lut.model   # then train with it

T5 stays frozen and outside the module tree: not in `parameters()`, `state_dict()`, the optimizer or EMA; it
moves to the device of `output_proj` on the first call there, and runs in `t5_dtype` whatever autocast says.
"""
import base64
import io
import json
import math
import random
import re
import zlib
from collections import OrderedDict
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from env import UserError, cli, parse_options, read_weights, resolve_path, write_atomic

T5_DTYPES = ("float32", "bfloat16")  # float16 overflows in T5's feed-forward
# The conditioning keys of train.py's Config, with its defaults: model.build_lm fills a missing key from here
SETTINGS = {"conditioner": "t5", "t5_path": "//reference/t5-base", "t5_dtype": "float32", "word_dropout": 0.3,
            "text_max_length": 0, "lut_tokenizer": "bytes", "lut_dim": 256, "lut_layers": 0}


# ----------------------------------------------------------------------------------------------------------
# Tokenizers

# T5Tokenizer matches these strings inside the text before sentencepiece sees it (its added tokens).
T5_SPECIAL = re.compile(r"(</s>|<pad>|<unk>|<extra_id_(?:\d|[1-9]\d)>)")
T5_EXTRA_IDS = 100
# tiktoken BPE files do not record their split pattern: cl100k's, or GPT-2's for r50k/p50k/gpt2 files.
CL100K_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
                  r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
R50K_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


class Tokenizer:
    """Text -> ids ending with EOS, so an empty text is one token (as T5Tokenizer does).

    spec: `bytes` (UTF-8 bytes: the default, any text, nothing to load), `words[:N]` (each word hashed into N bins,
    default 4096, nothing to load: what a small model learns from fastest, the debug recipe's), a sentencepiece
    `.model` file (T5's own kind; `python data.py tokenizer` trains one on a data set's descriptions) or
    `tiktoken:<local BPE file>` (an existing GPT-style vocabulary such as cl100k_base.tiktoken).
    t5=True also maps T5's special strings (`</s>`, `<extra_id_0>`, ...) inside the text, as T5Tokenizer does.
    max_length > 0 truncates longer texts to that many ids (EOS kept last) and counts them in `truncated`."""

    def __init__(self, spec, max_length=0, t5=False):
        self.spec, self.max_length, self.truncated = str(spec), max_length, 0
        if self.spec == "bytes":
            self.pad_id, self.eos_id, self.vocab_size = 0, 1, 258
            self._encode = lambda text: [b + 2 for b in text.encode("utf-8")]
        elif self.spec == "words" or self.spec.startswith("words:"):
            # AudioCraft's whitespace tokenizer idea: each lower-cased word hashed into one of N bins. A word is
            # one token, which a small model learns far faster than spelling it out in bytes.
            bins = int(self.spec.partition(":")[2] or 4096)
            self.pad_id, self.eos_id, self.vocab_size = 0, 1, bins + 2
            self._encode = lambda text: [2 + zlib.crc32(w.encode("utf-8")) % bins
                                         for w in re.findall(r"\w+", text.lower())]
        elif self.spec.startswith("tiktoken:"):
            enc = load_tiktoken(self.spec[len("tiktoken:"):])
            self.pad_id, self.eos_id, self.vocab_size = enc.n_vocab, enc.n_vocab + 1, enc.n_vocab + 2
            self._encode = enc.encode_ordinary
        else:
            self.sp = load_sentencepiece(self.spec)
            n = self.sp.get_piece_size()
            # Models trained without <pad> or </s> (ours have both, at T5's ids 0 and 1) get ids past the vocab.
            self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else n
            self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else max(n, self.pad_id + 1)
            self.vocab_size = max(n, self.pad_id + 1, self.eos_id + 1) + (T5_EXTRA_IDS if t5 else 0)
            self._encode = self._encode_t5 if t5 else self.sp.encode

    def _encode_t5(self, text):
        ids, n = [], self.sp.get_piece_size()
        for i, part in enumerate(T5_SPECIAL.split(text)):
            if i % 2 == 0:
                ids += self.sp.encode(part) if part else []
            elif part.startswith("<extra_id_"):  # sentinels follow the vocabulary in reverse order
                ids.append(n + T5_EXTRA_IDS - 1 - int(part[len("<extra_id_"):-1]))
            else:
                ids.append(self.sp.piece_to_id(part))
        return ids

    def encode(self, text):
        ids = self._encode(text) + [self.eos_id]
        if self.max_length and len(ids) > self.max_length:
            self.truncated += 1
            if self.truncated & (self.truncated - 1) == 0:  # 1, 2, 4, 8...: visible, never a flood
                print(f"text: a description of {len(ids)} tokens was truncated to max_length={self.max_length} "
                      f"({self.truncated} truncated so far): {text[:60]!r}...", flush=True)
            ids = ids[:self.max_length - 1] + [self.eos_id]
        return ids

    def __call__(self, texts):
        """Pads to the longest: ids [B, L] int64, valid [B, L] bool (True on real tokens, EOS included)."""
        rows = [self.encode(t) for t in texts]
        length = max((len(r) for r in rows), default=1)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)  # ids: [B, L] int64
        valid = torch.zeros(len(rows), length, dtype=torch.bool)               # valid: [B, L] bool
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            valid[i, :len(r)] = True
        return ids, valid


def tokenizer_file(spec):
    """The file a tokenizer spec reads (a sentencepiece model or a tiktoken BPE file), or None (bytes, words)."""
    spec = str(spec)
    if spec in ("bytes", "words") or spec.startswith("words:"):
        return None
    return spec[len("tiktoken:"):] if spec.startswith("tiktoken:") else spec


def load_sentencepiece(path):
    import sentencepiece as spm
    file = resolve_path(path)
    if not file.is_file():
        raise UserError(f"sentencepiece model {path} not found (train one with: python data.py tokenizer "
                        f"MANIFEST OUT.model --vocab_size=N)")
    try:
        return spm.SentencePieceProcessor(model_file=str(file))
    except (RuntimeError, OSError) as e:
        raise UserError(f"{file}: not a sentencepiece model ({str(e).splitlines()[0]})") from None


def load_tiktoken(path):
    """A tiktoken Encoding from a local BPE file (lines of `<base64 token> <rank>`); nothing is downloaded."""
    import tiktoken
    file = resolve_path(path)
    if not file.is_file():
        raise UserError(f"tiktoken BPE file {path} not found (tiktoken:<path> needs a local .tiktoken file)")
    ranks = {}
    for n, line in enumerate(file.read_bytes().splitlines(), 1):
        try:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise UserError(f"{file}:{n}: expected '<base64 token> <rank>', got {line[:60]!r}") from None
    if not ranks:
        raise UserError(f"{file}: empty tiktoken BPE file")
    gpt2 = any(s in file.name for s in ("r50k", "p50k", "gpt2"))
    return tiktoken.Encoding(file.stem, pat_str=R50K_PATTERN if gpt2 else CL100K_PATTERN,
                             mergeable_ranks=ranks, special_tokens={})


# ----------------------------------------------------------------------------------------------------------
# T5 encoder (Hugging Face weights)

@dataclass
class T5Config:
    """The fields of a Hugging Face T5 `config.json` the encoder needs (defaults: t5-small's)."""
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"   # t5-*: relu; t5 v1.1 / flan-t5: gated-gelu (tanh approximation)


ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu, "swish": F.silu}


def ff_activation(feed_forward_proj):
    """(activation, gated) from T5's `feed_forward_proj`; Hugging Face reads "gated-gelu" as the tanh GELU."""
    gated = feed_forward_proj.startswith("gated-")
    name = "gelu_new" if feed_forward_proj == "gated-gelu" else feed_forward_proj.split("-")[-1]
    if name not in ACTIVATIONS:
        raise UserError(f"T5 config feed_forward_proj={feed_forward_proj!r}: unsupported activation "
                        f"(expected one of {sorted(ACTIVATIONS)}, optionally gated-)")
    return ACTIVATIONS[name], gated


class RMSNorm(nn.Module):
    """T5's layer norm: scale only, no mean subtracted, statistics in float32 whatever the weights' dtype."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps)).to(self.weight.dtype)


class T5Block(nn.Module):
    def __init__(self, c: T5Config):
        super().__init__()
        inner = c.num_heads * c.d_kv
        self.n_heads = c.num_heads
        self.attn_norm = RMSNorm(c.d_model, c.layer_norm_epsilon)
        self.q = nn.Linear(c.d_model, inner, bias=False)
        self.k = nn.Linear(c.d_model, inner, bias=False)
        self.v = nn.Linear(c.d_model, inner, bias=False)
        self.o = nn.Linear(inner, c.d_model, bias=False)
        self.ff_norm = RMSNorm(c.d_model, c.layer_norm_epsilon)
        self.act, self.gated = ff_activation(c.feed_forward_proj)
        if self.gated:
            self.wi_0 = nn.Linear(c.d_model, c.d_ff, bias=False)
            self.wi_1 = nn.Linear(c.d_model, c.d_ff, bias=False)
        else:
            self.wi = nn.Linear(c.d_model, c.d_ff, bias=False)
        self.wo = nn.Linear(c.d_ff, c.d_model, bias=False)

    def forward(self, x, bias):  # x: [B, L, D]; bias: [B, H, L, L] relative positions + padding, added to scores
        B, L, _ = x.shape
        h = self.attn_norm(x)
        q, k, v = (p(h).view(B, L, self.n_heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        # T5 has no 1/sqrt(d_kv): its training folded that scale into q.
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)  # a: [B, H, L, d_kv]
        x = x + self.o(a.transpose(1, 2).reshape(B, L, -1))
        h = self.ff_norm(x)
        h = self.act(self.wi_0(h)) * self.wi_1(h) if self.gated else self.act(self.wi(h))
        return x + self.wo(h)


def relative_position_bucket(relative, num_buckets, max_distance):
    """T5's bidirectional buckets for `key - query` offsets: one half of the buckets for keys after the query;
    within a half, exact offsets below a quarter of the buckets, then logarithmic bins up to max_distance (all
    farther offsets share the last). Float operations in Hugging Face's order, so bin edges agree exactly."""
    half = num_buckets // 2
    bucket = (relative > 0).long() * half
    distance = relative.abs()
    exact = half // 2
    log_bin = exact + (torch.log(distance.clamp(min=exact).float() / exact) / math.log(max_distance / exact)
                       * (half - exact)).long()
    return bucket + torch.where(distance < exact, distance, log_bin.clamp(max=half - 1))


class T5Encoder(nn.Module):
    """The encoder stack of Hugging Face's T5EncoderModel: ids [B, L], valid [B, L] -> hidden [B, L, d_model]."""

    def __init__(self, c: T5Config):
        super().__init__()
        self.config = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.d_model)
        self.relative_attention_bias = nn.Embedding(c.relative_attention_num_buckets, c.num_heads)  # shared by all layers
        self.blocks = nn.ModuleList(T5Block(c) for _ in range(c.num_layers))
        self.final_layer_norm = RMSNorm(c.d_model, c.layer_norm_epsilon)

    def forward(self, ids, valid):
        x = self.embed_tokens(ids)  # x: [B, L, D]
        pos = torch.arange(ids.shape[1], device=ids.device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.config.relative_attention_num_buckets,
                                           self.config.relative_attention_max_distance)  # [L, L]
        bias = self.relative_attention_bias(buckets).permute(2, 0, 1)[None]  # bias: [1, H, L, L]
        bias = bias.masked_fill(~valid[:, None, None, :], torch.finfo(bias.dtype).min)  # [B, H, L, L]
        for block in self.blocks:
            x = block(x, bias)
        return self.final_layer_norm(x)


def hf_key(name):
    """Our T5Encoder parameter name -> its name in a Hugging Face T5 checkpoint."""
    if name == "relative_attention_bias.weight":
        return "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    m = re.fullmatch(r"blocks\.(\d+)\.(\w+)\.weight", name)
    if not m:
        return "encoder." + name
    i, part = m.groups()
    part = {"attn_norm": "layer.0.layer_norm", "ff_norm": "layer.1.layer_norm"}.get(part) or (
        f"layer.0.SelfAttention.{part}" if part in ("q", "k", "v", "o") else f"layer.1.DenseReluDense.{part}")
    return f"encoder.block.{i}.{part}.weight"


def t5_directory(path):
    directory = resolve_path(path)
    if not directory.is_dir():
        raise UserError(f"T5 path {path} is not a directory (expected a Hugging Face T5 directory with "
                        f"config.json, weights and spiece.model, e.g. //reference/t5-base)")
    for name in ("config.json", "spiece.model"):
        if not (directory / name).is_file():
            raise UserError(f"T5 directory {directory}: missing {name} (copy it from the Hugging Face model, "
                            f"e.g. t5-base)")
    return directory


def t5_config(path):
    """(the T5's config.json as a dict, the prefix of its weights' names) of a Hugging Face T5 directory, or of a
    transformers MusicGen directory, whose T5 is its text encoder: config.json's `text_encoder`, `text_encoder.*`."""
    directory = t5_directory(path)
    try:
        raw = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"T5 directory {directory}: config.json is not readable JSON ({e}): copy it from the "
                        f"Hugging Face model") from None
    if isinstance(raw, dict) and isinstance(raw.get("text_encoder"), dict):
        raw, prefix = raw["text_encoder"], "text_encoder."
        if raw.get("model_type", "t5") != "t5":
            raise UserError(f"{directory}/config.json: text_encoder is a {raw.get('model_type')!r} model, not T5")
        return raw, prefix
    if not isinstance(raw, dict):
        raise UserError(f"T5 directory {directory}: config.json holds a {type(raw).__name__}, not a T5 config")
    return raw, ""


def load_t5(path, dtype="float32", max_length=0):
    """(T5Encoder frozen in eval mode on the CPU, its Tokenizer) from a Hugging Face T5 directory or //reference/,
    or the text encoder of a transformers MusicGen directory."""
    if dtype not in T5_DTYPES:
        raise UserError(f"t5_dtype={dtype!r}: expected one of {list(T5_DTYPES)} (T5 overflows in float16)")
    directory = t5_directory(path)
    raw, prefix = t5_config(directory)
    config = T5Config(**{f.name: raw[f.name] for f in fields(T5Config) if f.name in raw})
    with torch.device("meta"):  # no random init: every tensor comes from the file
        model = T5Encoder(config)
    wanted = {name: hf_key(name) for name in model.state_dict()}
    found = read_weights(directory, [prefix + k for k in [*wanted.values(), "shared.weight"]], "T5 directory")
    found = {k[len(prefix):]: v for k, v in found.items()}
    found.setdefault("encoder.embed_tokens.weight", found.get("shared.weight"))  # tied: often stored once
    state = {}
    for name, param in model.state_dict().items():
        tensor = found.get(wanted[name])
        if tensor is None:
            raise UserError(f"T5 directory {directory}: weights lack {prefix}{wanted[name]} (not a T5 checkpoint?)")
        if tensor.shape != param.shape:
            raise UserError(f"T5 directory {directory}: {prefix}{wanted[name]} has shape {list(tensor.shape)}, "
                            f"config.json implies {list(param.shape)}")
        state[name] = tensor.to(getattr(torch, dtype))
    model.load_state_dict(state, assign=True)
    model.eval().requires_grad_(False)
    return model, Tokenizer(directory / "spiece.model", max_length=max_length, t5=True)


# ----------------------------------------------------------------------------------------------------------
# Conditioners

def prepare_texts(descriptions, word_dropout, training):
    """None -> "" (AudioCraft's null description); word dropout in training: each space-separated word is kept
    when python's `random.random() >= p` (the trainer checkpoints that generator's state)."""
    if not isinstance(descriptions, (list, tuple)):
        raise UserError(f"descriptions must be a list of strings or None, got {type(descriptions).__name__}")
    texts = []
    for i, d in enumerate(descriptions):
        if d is not None and not isinstance(d, str):
            raise UserError(f"description {i} is a {type(d).__name__} ({d!r:.60}), expected a string or None")
        texts.append(d or "")
    if training and word_dropout > 0:
        texts = [" ".join(w for w in t.split(" ") if random.random() >= word_dropout) for t in texts]
    return texts


class FrozenT5:
    """The frozen encoder, its tokenizer and its output cache. Kept out of nn.Module attributes so the encoder
    stays out of the conditioner's module tree; deep copies (an EMA copy of the model) share it."""

    def __init__(self, path, dtype, max_length, cache_size):
        self.model, self.tokenizer = load_t5(path, dtype, max_length)
        self.dtype = getattr(torch, dtype)
        self.cache, self.cache_size = OrderedDict(), cache_size  # text -> hidden [L_i, d_model] (LRU order)
        self.calls = 0  # encoder forward passes, for tests and benchmarks

    def __deepcopy__(self, memo):
        return self

    def encode(self, texts, cacheable, device):
        """One hidden [L_i, d_model] per non-empty text (None for ""); cached when cacheable[i]."""
        if self.model.embed_tokens.weight.device != device:
            self.model.to(device)
            self.cache.clear()
        out, todo = [None] * len(texts), {}
        for i, text in enumerate(texts):
            if text and cacheable[i] and text in self.cache:
                self.cache.move_to_end(text)
                out[i] = self.cache[text]
            elif text:
                todo.setdefault(text, []).append(i)
        if todo:
            ids, valid = self.tokenizer(list(todo))
            lengths = valid.sum(1).tolist()
            ids, valid = to_device(ids, device), to_device(valid, device)
            # Its own precision: the trainer's autocast must not turn T5 to float16 (AudioCraft does the same).
            with torch.no_grad(), torch.autocast(device.type, enabled=False):
                hidden = self.model(ids, valid)  # hidden: [N, L, d_model]
            self.calls += 1
            for j, (text, rows) in enumerate(todo.items()):
                h = hidden[j, :lengths[j]].clone()  # clone: a view would keep the whole batch alive in the cache
                for i in rows:
                    out[i] = h
                if self.cache_size > 0 and any(cacheable[i] for i in rows):
                    self.cache[text] = h
                    if len(self.cache) > self.cache_size:
                        self.cache.popitem(last=False)
        return out


def to_device(t, device):
    """A CPU tensor on `device` without a host sync: a pageable copy to a GPU waits for the whole queue, a pinned one
    with non_blocking does not (the training step must not stall on its text)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def pad_rows(rows, width, device, dtype):
    """Rows [L_i, width] (None: an empty description) -> x [B, L, width] zero-padded, mask [B, L] (L >= 1)."""
    empty = torch.zeros(1, width, device=device, dtype=dtype)
    x = nn.utils.rnn.pad_sequence([empty if r is None else r for r in rows], batch_first=True)  # x: [B, L, width]
    lengths = torch.tensor([0 if r is None else r.shape[0] for r in rows])
    mask = torch.arange(x.shape[1])[None] < lengths[:, None]  # mask: [B, L] bool
    return x, to_device(mask, device)


class T5Conditioner(nn.Module):
    """AudioCraft's T5Conditioner: frozen T5 -> output_proj (trained, with bias) -> padded positions zeroed.

    forward(descriptions: list[str | None]) -> (condition [B, L, output_dim], mask [B, L] bool). An empty or
    None description (or one word dropout emptied) gives an all-False mask row and a zero condition row."""

    def __init__(self, path, output_dim, word_dropout=0.0, dtype="float32", max_length=0, cache_size=1024, t5=None):
        super().__init__()
        # not a Module: invisible to parameters(); several text conditions of one model share one (t5)
        self.t5 = t5 if t5 is not None else FrozenT5(path, dtype, max_length, cache_size)
        self.word_dropout = word_dropout
        self.output_proj = nn.Linear(self.t5.model.config.d_model, output_dim)

    def forward(self, descriptions):
        originals = prepare_texts(descriptions, 0.0, False)
        texts = prepare_texts(originals, self.word_dropout, self.training)
        device = self.output_proj.weight.device
        # A text word dropout changed is a one-off: computing it must not evict the texts that repeat.
        rows = self.t5.encode(texts, [t == o for t, o in zip(texts, originals)], device)
        hidden, mask = pad_rows(rows, self.output_proj.in_features, device, self.t5.dtype)
        condition = self.output_proj(hidden.to(self.output_proj.weight.dtype))  # condition: [B, L, output_dim]
        return torch.where(mask[..., None], condition, 0.0), mask


def sin_embedding(positions, dim, max_period=10000.0):
    """Sinusoidal positions, AudioCraft's create_sin_embedding: cat(cos, sin), frequency exponent i / (half - 1). The
    LM's (model.py) and the lookup-table encoder's. positions [...] -> [..., dim] float32 (an odd dim: a zero last)."""
    half = dim // 2
    exponent = torch.arange(half, device=positions.device, dtype=torch.float32) / max(half - 1, 1)
    phase = positions.float()[..., None] / (torch.full([], float(max_period), device=positions.device) ** exponent)
    emb = torch.cat([torch.cos(phase), torch.sin(phase)], -1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class LUTConditioner(nn.Module):
    """A trainable text encoder for training from scratch: token embeddings + sinusoidal positions, optionally a few
    bidirectional transformer layers (padding masked), then output_proj; same forward contract as T5Conditioner.

    tokenizer: a Tokenizer spec: bytes, words:N, a sentencepiece .model (python data.py tokenizer) or tiktoken:FILE."""

    def __init__(self, tokenizer, output_dim, dim=256, n_layers=0, word_dropout=0.0, max_length=256):
        super().__init__()
        self.tokenizer = Tokenizer(tokenizer, max_length=max_length)
        self.word_dropout = word_dropout
        self.embed = nn.Embedding(self.tokenizer.vocab_size, dim)
        n_heads = dim // 64 if dim % 64 == 0 else 1  # heads of 64, as in the LM
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, n_heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=True) for _ in range(n_layers))
        self.norm = nn.LayerNorm(dim) if n_layers else nn.Identity()  # pre-norm layers leave the output unnormalised
        self.output_proj = nn.Linear(dim, output_dim)

    def forward(self, descriptions):
        texts = prepare_texts(descriptions, self.word_dropout, self.training)
        device = self.embed.weight.device
        ids, valid = self.tokenizer(texts)
        ids, valid = to_device(ids, device), to_device(valid, device)  # [B, L]
        positions = sin_embedding(torch.arange(ids.shape[1], device=device), self.embed.embedding_dim)
        x = self.embed(ids) + positions  # x: [B, L, dim]
        for layer in self.layers:
            # Empty texts still hold their EOS, so no row is all padding (which would give NaN attention).
            x = layer(x, src_key_padding_mask=~valid)
        mask = valid & to_device(torch.tensor([t != "" for t in texts]), device)[:, None]  # mask: [B, L] bool
        condition = self.output_proj(self.norm(x))  # condition: [B, L, output_dim]
        return torch.where(mask[..., None], condition, 0.0), mask


def conditioning(settings):
    """The conditioning keys of a dict of settings (train.py's Config, a config.json), defaults filled in."""
    return {k: settings.get(k, default) for k, default in SETTINGS.items()}


def build_conditioner(settings, output_dim):
    """The conditioner `settings` names (train.py's conditioning keys, a dict; a missing key takes SETTINGS'):
    conditioner='t5' (frozen T5, AudioCraft's) or 'lut' (trained from scratch). model.build_lm calls it."""
    return build_conditioners(settings, output_dim, ["description"])["description"]


def build_conditioners(settings, output_dim, names):
    """{name: conditioner} for a model's text conditions (description and its other attributes), each of the kind
    `settings` names with its own output_proj (and lookup table), as AudioCraft builds one per attribute; T5
    conditioners share one frozen T5."""
    s = conditioning(settings)
    if s["conditioner"] == "t5":
        shared = None
        out = {}
        for name in names:
            out[name] = T5Conditioner(s["t5_path"], output_dim, word_dropout=s["word_dropout"], dtype=s["t5_dtype"],
                                      max_length=s["text_max_length"], t5=shared)
            shared = out[name].t5
        return out
    if s["conditioner"] == "lut":
        return {name: LUTConditioner(s["lut_tokenizer"], output_dim, dim=s["lut_dim"], n_layers=s["lut_layers"],
                                     word_dropout=s["word_dropout"], max_length=s["text_max_length"])
                for name in names}
    raise UserError(f"conditioner={s['conditioner']!r}: expected 't5' or 'lut'")


# ----------------------------------------------------------------------------------------------------------
# Training a sentencepiece tokenizer (python data.py tokenizer: on a manifest's descriptions)

def train_sentencepiece(texts, out, vocab_size):
    """A sentencepiece unigram model with T5's special ids (<pad> 0, </s> 1, <unk> 2) on `texts`, written to `out`."""
    import sentencepiece as spm
    print(f"training sentencepiece (unigram, vocab {vocab_size}) on {len(texts)} texts, "
          f"{sum(map(len, texts))} characters", flush=True)
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=buf, vocab_size=vocab_size, model_type="unigram",
            pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2)
    except RuntimeError as e:
        raise UserError(f"sentencepiece failed with vocab_size={vocab_size}: {str(e).splitlines()[-1]}") from None
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, lambda f: f.write(buf.getvalue()))
    n = spm.SentencePieceProcessor(model_file=str(out)).get_piece_size()
    print(f"wrote {out} ({n} pieces); use it with --conditioner=lut --lut_tokenizer={out}")


USAGE = 'python text.py SPEC "a description" ...  (SPEC: bytes, words:N, a sentencepiece .model, tiktoken:FILE)'


def main(argv):
    """Show how a tokenizer spec (lut_tokenizer) splits descriptions: their ids, EOS last."""
    if argv[:1] == ["tokenizer"]:  # the command that trains one reads manifests, which are data.py's
        raise UserError("the tokenizer command moved to data.py: python data.py tokenizer MANIFEST OUT.model "
                        "--vocab_size=N")
    (spec, *texts), o = parse_options(argv, {"max_length": 0}, usage=USAGE, positionals=(2, 1000))
    tokenizer = Tokenizer(spec, max_length=o["max_length"])
    for description in texts:
        ids = tokenizer.encode(description)
        print(f"{description!r}: {len(ids)} ids {ids}")
    print(f"vocabulary {tokenizer.vocab_size}, pad {tokenizer.pad_id}, eos {tokenizer.eos_id}")
    return 0


if __name__ == "__main__":
    cli(main)
