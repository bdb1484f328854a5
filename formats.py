"""Foreign formats: the files users hold and the files we hand them, read and written in one place.

Owns AudioCraft's LM `state_dict.bin` ({best_state, xp.cfg}: the released MusicGen files and our exports) and the
mapping of its xp.cfg onto our settings; Hugging Face transformers' MusicGen directories (MusicgenForConditional-
Generation, and the decoder alone: MusicgenForCausalLM), read and written, their config.json mapped onto our
settings; the codec's `compression_state_dict.bin` and Hugging Face EnCodec directories; our runs (config.json +
checkpoint.pt) as sources of weights for sampling (generate.py --run), for export and for continue_from. model.py
and codec.py compute, text.py reads T5 directories (a transformers MusicGen's text encoder too); everything else on
disk in a foreign layout is read and written here.

    python formats.py lm //reference/musicgen-small           # an LM file or directory (AudioCraft or transformers)
    python formats.py codec //reference/encodec_32khz         # a codec: summary and identity
    python formats.py codec debug in.wav out.wav              # encode + decode a file through a codec
    python formats.py codec PATH --export=out/                # a codec as AudioCraft's compression_state_dict.bin
    python formats.py codec SIG --export_hf=out/encodec        # a train_codec.py run as a transformers EnCodec
    python generate.py export SIG out/my-musicgen             # a run as AudioCraft files (export() below)
    python generate.py export --format=hf SIG out/my-musicgen # a run as a transformers MusicGen directory

In code: `load(run)` -> MusicGen (LM + codec + what they came with) for sampling; `export(run, out, format=)`;
`read_lm_state(source)` -> the LM weights continue_from names; `load_codec(path)`; `load_audiocraft_lm(path)`;
`read_hf_lm(directory)`, `load_hf(directory)`, `export_hf(musicgen, out)`.
"""
import json
import math
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml

import adapters
import codec as codec_lib
import env
import melody
import model as lm_lib
import text
from env import UserError, cli, load_tensors, parse_options, read_weights, resolve_path, write_atomic

LM_FILE = "state_dict.bin"
CODEC_FILE = "compression_state_dict.bin"
_CODEC_EXPECTED = f"; expected an AudioCraft {CODEC_FILE} or a Hugging Face EnCodec directory"  # unreadable files
T5_DIMS = {"t5-small": 512, "t5-base": 768, "t5-large": 1024, "t5-3b": 1024, "t5-11b": 1024}
TEXT_DIM_T5 = {512: "t5-small", 768: "t5-base", 1024: "t5-large"}
# AudioCraft's ChromaStemConditioner settings (its chroma2music.yaml, which MusicGen-melody was trained with): the
# chroma melody.py computes; its builder passes every key on, so an export writes exactly these
CHROMA_STEM = {"sample_rate": melody.CHROMA_RATE, "n_chroma": melody.N_CHROMA, "radix2_exp": 14, "argmax": True,
               "match_len_on_eval": False, "eval_wavs": None, "n_eval_wavs": 100, "cache_path": None}
# AudioCraft's MusicGen.set_generation_params defaults, for files that do not say otherwise
SAMPLING_DEFAULTS = {"cfg_coef": 3.0, "top_k": 250, "top_p": 0.0, "temperature": 1.0}


# ----------------------------------------------------------------------------------------------------------
# Shared: xp.cfg trees, state dicts

_REFERENCE = re.compile(r"\$\{([\w.]+)\}")   # OmegaConf's ${a.b}; resolvers (${oc.env:X}) are not followed


def lookup(tree, key, default=None, _hops=0):
    """Dotted `key` in a parsed YAML tree (AudioCraft's xp.cfg), following `${a.b}` references to other keys, as an
    unresolved xp.cfg dump holds them; `default` where a part is missing."""
    if _hops > 32:
        raise UserError(f"xp.cfg: ${{{key}}} refers back to itself (a loop of references)")
    node = tree
    for part in key.split("."):
        m = _REFERENCE.fullmatch(node) if isinstance(node, str) else None
        if m:
            node = lookup(tree, m[1], None, _hops + 1)
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    m = _REFERENCE.fullmatch(node) if isinstance(node, str) else None
    return lookup(tree, m[1], default, _hops + 1) if m else node


def _merge(tree, key, value):
    """Set dotted `key` in nested dict `tree`, merging dicts."""
    *parents, last = key.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    if isinstance(value, dict) and isinstance(tree.get(last), dict):
        for k, v in value.items():
            _merge(tree[last], k, v)
    else:
        tree[last] = list(value) if isinstance(value, tuple) else value


def clean_state_dict(state):
    """Drop wrappers' prefixes (torch.compile's _orig_mod., DDP's module.)."""
    out = {}
    for key, value in state.items():
        key = key.replace("._orig_mod.", ".")
        while key.startswith(("_orig_mod.", "module.")):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def check_state_dict(model, state, source):
    """Strict-load check with a readable error: counts and first names of missing and unexpected keys, shapes."""
    check_fit({k: v.shape for k, v in model.state_dict().items() if ".lora_" not in k or k in state}, state,
              source)   # adapters are never part of base weights


def check_fit(expected, state, source):
    """expected {name: shape} against state {name: tensor}, in the file's own names: one UserError line naming the
    count and first names of missing and unexpected keys and of shape mismatches."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(expected[k])}" for k in expected
              if k in state and tuple(state[k].shape) != tuple(expected[k])]
    if missing or unexpected or shapes:
        def first(names, sep=", "):
            return sep.join(names[:3]) + (sep + "..." if len(names) > 3 else "")
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({first(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({first(unexpected)})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches ({first(shapes, '; ')})")
        raise UserError(f"{source}: checkpoint does not fit the model built from its config: " + "; ".join(parts))


def _parse_xp(xp, source):
    xp = yaml.safe_load(xp) if isinstance(xp, str) else xp
    if not isinstance(xp, dict):
        raise UserError(f"{source}: xp.cfg is not a YAML mapping")
    return xp


# ----------------------------------------------------------------------------------------------------------
# AudioCraft LM: state_dict.bin = {'best_state': flat LM state dict, 'xp.cfg': YAML text}

def audiocraft_differences(cfg, conditioner="t5", chroma_stems="", segment_duration=None):
    """What AudioCraft computes differently from us for a model with these settings, one sentence each: an export
    records them in xp.cfg (nanomusicgen.audiocraft_differences) and generate.py export prints them, so that nobody
    compares the two and concludes that one is broken."""
    out = []
    if cfg.mask_memory and cfg.fuse != "sum":
        out.append("mask_memory=True: this model masks padded text positions, which AudioCraft cannot do: there its "
                   "logits equal ours for one prompt at a time, but differ on the padded rows of a batch of prompts "
                   "of different lengths")
    if cfg.fuse == "sum":
        out.append("fuse=sum: this model adds the masked mean of the text condition to every step, where AudioCraft's "
                   "sum fuser adds the condition position by position (and needs it as long as the music)")
    if conditioner == "lut":
        out.append("conditioner=lut: AudioCraft conditions released-style models on T5 and tokenizes lookup-table "
                   "text its own way, so only nanomusicgen follows this model's prompts")
    if cfg.chroma_fuse and not chroma_stems:
        out.append("chroma_stems='': this model learned the chroma of the full mix; AudioCraft's ChromaStemConditioner "
                   "always removes drums and bass first (Demucs), so there it follows a melody through other chroma")
    if cfg.chroma_fuse and segment_duration is not None and segment_duration <= 18:
        out.append(f"segment_duration={segment_duration:g}: AudioCraft reads a context of 30 s from this export (its "
                   f"extend_stride must be shorter), so its melody condition spans the chroma of 30 s, not of "
                   f"{segment_duration:g} s as here")
    return out


def xp_config(cfg, extra=None):
    """The xp.cfg AudioCraft's builders read (get_lm_model, get_conditioner_provider, MusicGen.get_pretrained).
    Keys we add that AudioCraft does not know live under `nanomusicgen` (its builders ignore them)."""
    delays = list(lm_lib.pattern_delays(cfg.pattern, cfg.n_q, cfg.delays))
    n_q = cfg.n_q
    xp = {
        "device": "cpu",
        "dtype": "float32",
        "autocast": False,
        "sample_rate": 32000,
        "channels": 1,
        "compression_model_checkpoint": "//pretrained/facebook/encodec_32khz",
        "efficient_attention_backend": "torch",
        "lm_model": "transformer_lm",
        "dataset": {"segment_duration": 30.0},
        "codebooks_pattern": {
            "modeling": cfg.pattern,
            "delay": {"delays": delays if cfg.pattern == "delay" else list(range(n_q)),
                      "flatten_first": 0, "empty_initial": 0},
            "unroll": {"flattening": list(range(n_q)), "delays": delays if cfg.pattern == "unroll" else [0] * n_q},
            "musiclm": {"group_by": 2},
            "coarse_first": {"delays": delays if cfg.pattern == "coarse_first" else [0] * (n_q - 1)},
        },
        "transformer_lm": {
            "dim": cfg.dim, "num_heads": cfg.n_heads, "num_layers": cfg.n_layers, "hidden_scale": cfg.hidden_scale,
            "n_q": n_q, "card": cfg.card, "dropout": float(cfg.dropout), "emb_lr": None, "activation": "gelu",
            "norm_first": True, "bias_ff": False, "bias_attn": False, "bias_proj": False, "past_context": None,
            "causal": True, "custom": False, "memory_efficient": True, "attention_as_float32": False,
            "layer_scale": None, "positional_embedding": "sin", "max_period": float(cfg.max_period), "xpos": False,
            "checkpointing": "none", "weight_init": "gaussian", "depthwise_init": "current", "zero_bias_init": True,
            "norm": "layer_norm", "cross_attention": cfg.fuse == "cross", "qk_layer_norm": False,
            "qk_layer_norm_cross": False, "attention_dropout": None, "kv_repeat": 1, "two_step_cfg": False,
        },
        "classifier_free_guidance": {"training_dropout": float(cfg.cfg_dropout), "inference_coef": 3.0},
        "attribute_dropout": {},
        "fuser": {"cross_attention_pos_emb": False, "cross_attention_pos_emb_scale": 1,
                  "sum": [], "prepend": [], "cross": [], "input_interpolate": []},
        "conditioners": {},
        "nanomusicgen": {"text_dim": cfg.text_dim, "mask_memory": cfg.mask_memory,
                         "cfg_dropout_per_batch": cfg.cfg_dropout_per_batch,
                         "audiocraft_differences": audiocraft_differences(cfg)},
    }
    fuses = lm_lib.condition_fuses(cfg)
    xp["transformer_lm"]["cross_attention"] = "cross" in fuses.values()
    if lm_lib.MELODY in fuses:     # first, as AudioCraft's chroma2music.yaml has it (the fuser applies text first)
        xp["conditioners"][lm_lib.MELODY] = {"model": "chroma_stem", "chroma_stem": dict(CHROMA_STEM)}
    for name, fuse in fuses.items():
        xp["fuser"][fuse].append(name)
        if name != lm_lib.MELODY:
            xp["conditioners"][name] = {"model": "t5", "t5": {
                "name": TEXT_DIM_T5.get(cfg.text_dim, "t5-base"), "finetune": False, "word_dropout": 0.3,
                "normalize_text": False}}
    dropout = lm_lib.attribute_dropout(cfg)
    if dropout:   # AudioCraft's layout: per condition type, and its args
        xp["attribute_dropout"] = {"args": {"active_on_eval": False},
                                   "text": {n: p for n, p in dropout.items() if n != lm_lib.MELODY},
                                   "wav": {n: p for n, p in dropout.items() if n == lm_lib.MELODY}}
        xp["nanomusicgen"]["attribute_dropout_per_batch"] = cfg.attribute_dropout_per_batch
    for key, value in (extra or {}).items():
        _merge(xp, key, value)
    return xp


def export_audiocraft_lm(model, cfg, path, extra=None):
    """Write <path>/state_dict.bin (or `path` itself when it names a .bin file) that AudioCraft's
    MusicGen.get_pretrained / load_lm_model read. extra: keys to add or override in xp.cfg, dotted or nested
    (e.g. {'conditioners.description.t5.name': 't5-large', 'dataset.segment_duration': 10}). Returns the file."""
    path = Path(os.path.expanduser(str(path)))
    if path.suffix != ".bin":
        path.mkdir(parents=True, exist_ok=True)
        path = path / LM_FILE
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    state = {k: v.detach().cpu().contiguous() for k, v in clean_state_dict(model.state_dict()).items()}
    pkg = {"best_state": state, "xp.cfg": yaml.safe_dump(xp_config(cfg, extra), sort_keys=False),
           "version": "nanomusicgen", "exported": True}
    write_atomic(path, lambda f: torch.save(pkg, f))
    return path


def xp_conditions(xp, source):
    """{condition name: fuse} from xp.cfg's conditioners and fuser, in AudioCraft's fuser order (text conditions in
    the conditioners' order, then the melody); what our model cannot compute is a UserError."""
    conds = {k: v for k, v in (lookup(xp, "conditioners") or {}).items() if k != "args"}
    kinds = {name: lookup(xp, f"conditioners.{name}.model") for name in conds}
    unknown = sorted(n for n, k in kinds.items() if k not in ("t5", "lut", "chroma_stem")
                     or (k == "chroma_stem") != (n == lm_lib.MELODY))
    if unknown or "description" not in conds:
        raise UserError(f"{source}: conditioners {', '.join(f'{n} ({kinds[n]})' for n in unknown) or 'without description'}"
                        f" not supported: nanomusicgen conditions on text (t5, lut: description and other attributes) and "
                        f"on a melody (chroma_stem, as {lm_lib.MELODY}), not on style or CLAP conditioners")
    for key in ("input_interpolate", "ignore"):
        if lookup(xp, f"fuser.{key}"):
            raise UserError(f"{source}: fuser.{key}={lookup(xp, f'fuser.{key}')} is not supported (prepend, cross, sum)")
    fuses = {}
    for name in conds:
        found = [m for m in lm_lib.FUSES if name in (lookup(xp, f"fuser.{m}") or [])]
        allowed = lm_lib.CHROMA_FUSES if name == lm_lib.MELODY else lm_lib.FUSES
        if len(found) != 1 or found[0] not in allowed:
            raise UserError(f"{source}: fuser must put {name!r} in exactly one of {', '.join(allowed)}")
        fuses[name] = found[0]
    if kinds.get(lm_lib.MELODY):
        for key, want in CHROMA_STEM.items():
            got = lookup(xp, f"conditioners.{lm_lib.MELODY}.chroma_stem.{key}", want)
            if key in ("sample_rate", "n_chroma", "radix2_exp", "argmax") and got != want:
                raise UserError(f"{source}: conditioners.{lm_lib.MELODY}.chroma_stem.{key}={got} is not supported "
                                f"(melody.py computes MusicGen-melody's chroma: {want})")
    texts = [n for n in conds if n != lm_lib.MELODY]
    order = ["description"] + [n for n in texts if n != "description"]
    if texts != order and any(sum(fuses[n] == f for n in texts) > 1 for f in ("prepend", "cross")):
        raise UserError(f"{source}: conditioners list {texts[0]!r} before description and share its fuse: nanomusicgen "
                        f"fuses the description first")
    return {n: fuses[n] for n in order + [n for n in conds if n == lm_lib.MELODY]}


def xp_attribute_dropout(xp, conditions):
    """attribute_dropout's NAME:P entries from xp.cfg's attribute_dropout {text: {...}, wav: {...}} (its args
    left out), for the conditions the model has."""
    out = []
    for kind in ("text", "wav"):
        for name, p in (lookup(xp, f"attribute_dropout.{kind}") or {}).items():
            if name in conditions and float(p) > 0:
                out.append(f"{name}:{float(p):g}")
    return tuple(out)


def lm_config_from_xp(xp, state=None, source="xp.cfg"):
    """LMConfig from AudioCraft's xp.cfg; features our model does not implement are a UserError."""
    if lookup(xp, "lm_model", "transformer_lm") != "transformer_lm":
        raise UserError(f"{source}: lm_model={lookup(xp, 'lm_model')} is not supported (only transformer_lm)")
    if not isinstance(lookup(xp, "transformer_lm"), dict):
        raise UserError(f"{source}: no transformer_lm section: not an AudioCraft LM checkpoint")
    required = ("dim", "num_heads", "num_layers", "n_q", "card")
    missing = [k for k in required if lookup(xp, f"transformer_lm.{k}") is None]
    if missing:
        raise UserError(f"{source}: xp.cfg lacks transformer_lm.{', transformer_lm.'.join(missing)}")
    expected = {"norm_first": True, "bias_ff": False, "bias_attn": False, "bias_proj": False, "causal": True,
                "activation": "gelu", "norm": "layer_norm", "positional_embedding": "sin", "layer_scale": None,
                "qk_layer_norm": False, "qk_layer_norm_cross": False, "kv_repeat": 1, "past_context": None}
    for key, want in expected.items():
        got = lookup(xp, f"transformer_lm.{key}", want)
        if got != want:
            raise UserError(f"{source}: transformer_lm.{key}={got} is not supported (MusicGen's LM has {want})")
    if lookup(xp, "transformer_lm.positional_scale", 1.0) != 1.0:
        raise UserError(f"{source}: transformer_lm.positional_scale is not supported")
    conditions = xp_conditions(xp, source)
    if lookup(xp, "fuser.cross_attention_pos_emb", False):
        raise UserError(f"{source}: fuser.cross_attention_pos_emb=true is not supported")
    pattern = lookup(xp, "codebooks_pattern.modeling", "parallel")
    n_q = int(lookup(xp, "transformer_lm.n_q"))
    delays = ()
    if pattern in ("delay", "unroll", "coarse_first"):
        delays = tuple(lookup(xp, f"codebooks_pattern.{pattern}.delays") or ())
        if delays == lm_lib.pattern_delays(pattern, n_q, ()):
            delays = ()        # the default, spelled as LMConfig's default
    if pattern == "delay" and (lookup(xp, "codebooks_pattern.delay.flatten_first", 0)
                               or lookup(xp, "codebooks_pattern.delay.empty_initial", 0)):
        raise UserError(f"{source}: codebooks_pattern.delay flatten_first / empty_initial are not supported")
    flattening = lookup(xp, "codebooks_pattern.unroll.flattening")
    if pattern == "unroll" and flattening is not None and list(flattening) != list(range(n_q)):
        raise UserError(f"{source}: codebooks_pattern.unroll.flattening={flattening} not supported (only range(n_q))")
    if pattern == "musiclm" and lookup(xp, "codebooks_pattern.musiclm.group_by", 2) != 2:
        raise UserError(f"{source}: codebooks_pattern.musiclm.group_by must be 2")
    text_dim = lookup(xp, "nanomusicgen.text_dim")
    proj = (state or {}).get("condition_provider.conditioners.description.output_proj.weight")
    if text_dim is None and proj is not None:
        text_dim = proj.shape[1]
    if text_dim is None:
        model_type = lookup(xp, "conditioners.description.model")
        if model_type == "t5":
            text_dim = T5_DIMS.get(str(lookup(xp, "conditioners.description.t5.name")).split("/")[-1], 768)
        else:
            text_dim = lookup(xp, f"conditioners.description.{model_type}.dim", 768)
    cfg = lm_lib.LMConfig(
        dim=int(lookup(xp, "transformer_lm.dim")), n_layers=int(lookup(xp, "transformer_lm.num_layers")),
        n_heads=int(lookup(xp, "transformer_lm.num_heads")),
        hidden_scale=int(lookup(xp, "transformer_lm.hidden_scale", 4)), n_q=n_q,
        card=int(lookup(xp, "transformer_lm.card")),
        pattern=pattern, delays=delays, text_dim=int(text_dim), fuse=conditions["description"],
        attributes=tuple(f"{n}:{f}" for n, f in conditions.items() if n not in ("description", lm_lib.MELODY)),
        chroma_fuse=conditions.get(lm_lib.MELODY, ""),
        attribute_dropout=xp_attribute_dropout(xp, conditions),
        attribute_dropout_per_batch=bool(lookup(xp, "nanomusicgen.attribute_dropout_per_batch", False)),
        mask_memory=bool(lookup(xp, "nanomusicgen.mask_memory", False)),
        dropout=float(lookup(xp, "transformer_lm.dropout", 0.0) or 0.0),
        cfg_dropout=float(lookup(xp, "classifier_free_guidance.training_dropout", 0.3)),
        cfg_dropout_per_batch=bool(lookup(xp, "nanomusicgen.cfg_dropout_per_batch", False)),
        max_period=float(lookup(xp, "transformer_lm.max_period", 10000.0)))
    if cfg.pattern not in lm_lib.PATTERNS:
        raise UserError(f"{source}: codebooks_pattern.modeling={cfg.pattern} is not one of "
                        f"{', '.join(lm_lib.PATTERNS)}")
    return cfg


def lm_settings_from_xp(xp, path, state=None, t5=None):
    """Our settings (build_lm's: LMConfig's fields and the conditioning keys) from an xp.cfg. T5 comes from
    //reference/<the name in xp.cfg>, or `t5`; our lookup-table exports carry their conditioner's settings (and its
    tokenizer file, beside state_dict.bin)."""
    settings = asdict(lm_config_from_xp(xp, state, str(path)))
    kind = lookup(xp, "conditioners.description.model")
    ours = lookup(xp, "nanomusicgen.conditioner") or {}
    if kind not in ("t5", "lut") or (kind == "lut" and not ours):
        raise UserError(f"{path}: text conditioner {kind!r} is not supported (T5, or the lookup table of a "
                        f"nanomusicgen export)")
    for name in lm_lib.condition_fuses(lm_lib.lm_config(settings)):
        same = [lookup(xp, f"conditioners.{n}.model") for n in (name, "description")] + \
            [lookup(xp, f"conditioners.{n}.t5.name") for n in (name, "description")]
        if name not in ("description", lm_lib.MELODY) and (same[0] != same[1] or same[2] != same[3]):
            raise UserError(f"{path}: conditioner {name} is not of description's kind: nanomusicgen builds every text "
                            f"condition of a model alike")
    # the melody's chroma: of the song without drums and bass (AudioCraft always takes it so), unless our export
    # says it learned the full mix; one segment's chroma frames (the melody condition's length)
    settings["chroma_stems"] = str(lookup(xp, "nanomusicgen.chroma_stems", melody.DEMUCS_WEIGHTS) or "")
    settings["segment_duration"] = float(lookup(xp, "nanomusicgen.segment_duration")
                                         or lookup(xp, "dataset.segment_duration", 30.0))
    settings.update({k: ours[k] for k in text.SETTINGS if k in ours and k != "t5_path"})  # paths are the machine's
    settings["conditioner"] = kind
    if kind == "t5":
        name = str(lookup(xp, "conditioners.description.t5.name", "t5-base")).split("/")[-1]
        settings["t5_path"] = t5 or f"//reference/{name}"
    elif text.tokenizer_file(settings.get("lut_tokenizer", "bytes")) is not None:
        spec = settings["lut_tokenizer"]
        prefix = "tiktoken:" if spec.startswith("tiktoken:") else ""
        settings["lut_tokenizer"] = prefix + str(Path(path).parent / spec[len(prefix):])
    return settings


def read_audiocraft_lm(path, map_location="cpu"):
    """-> (package dict, file path). Accepts a directory holding state_dict.bin, a file, or //reference/..."""
    path = resolve_path(path)
    if path.is_dir():
        path = path / LM_FILE
    if not path.is_file():
        raise UserError(f"{path}: no such file (expected an AudioCraft LM state_dict.bin or a directory holding one)")
    pkg = load_tensors(path, mmap=True, map_location=map_location)
    if not isinstance(pkg, dict) or "best_state" not in pkg or "xp.cfg" not in pkg:
        keys = sorted(pkg)[:6] if isinstance(pkg, dict) else type(pkg).__name__
        raise UserError(f"{path}: not an AudioCraft LM state_dict.bin (needs 'best_state' and 'xp.cfg', has {keys})")
    return pkg, path


def _check_t5(settings, with_t5):
    """Where T5 is looked for, checked before anything is built, naming the option that changes it."""
    settings = text.conditioning(settings)
    if with_t5 and settings["conditioner"] == "t5":
        try:
            text.t5_directory(settings["t5_path"])
        except UserError as e:
            raise UserError(f"{e} (pass --t5=PATH to a Hugging Face T5 directory)") from None


def _build_and_load(settings, state, source, with_t5):
    """build_lm without initialising, then the file's tensors (as float32) as its parameters, checked strictly."""
    _check_t5(settings, with_t5)
    model = lm_lib.build_lm(settings, with_t5=with_t5, meta=True)
    check_state_dict(model, state, source)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, assign=True)
    return model.eval()


def _open_audiocraft_lm(path, with_t5, t5=None, map_location="cpu"):
    """-> (model in eval mode, settings, xp.cfg as a dict, file)."""
    pkg, path = read_audiocraft_lm(path, map_location)
    xp = _parse_xp(pkg["xp.cfg"], path)
    state = clean_state_dict(pkg["best_state"])
    settings = lm_settings_from_xp(xp, path, state, t5)
    return _build_and_load(settings, state, str(path), with_t5), settings, xp, path


def load_audiocraft_lm(path, *, with_t5=False, t5=None, map_location="cpu"):
    """AudioCraft `state_dict.bin` (released MusicGen or our export) -> (model in eval mode, LMConfig). Its text
    conditioner is the one xp.cfg names; with_t5=False leaves a frozen T5 out (ProjectedCondition: the projection
    after it, all its trained weights), with_t5=True loads T5 from //reference/<its name> or `t5`."""
    model, _, _, _ = _open_audiocraft_lm(path, with_t5, t5, map_location)
    return model, model.cfg


# ----------------------------------------------------------------------------------------------------------
# Hugging Face transformers' MusicGen, both directions. MusicgenForConditionalGeneration.save_pretrained writes
# config.json (sub-configs `decoder`, `text_encoder` (T5), `audio_encoder` (EnCodec)) and model.safetensors (sharded
# or not: decoder.*, enc_to_dec_proj.*, text_encoder.*, audio_encoder.*); MusicgenForCausalLM, the decoder alone,
# a `musicgen_decoder` config.json and model.decoder.*, lm_heads.*. The decoder is AudioCraft's LM renamed
# (transformers' convert_musicgen_transformers.py), q/k/v apart where we fuse in_proj_weight. What it computes fixes
# some of our settings: it masks padded text positions in cross-attention (our mask_memory=True), knows only the
# delay pattern (delays 0..n_q-1) and sinusoidal positions of period 10000, and conditions through cross-attention.

HF_CONFIG, HF_GENERATION, HF_WEIGHTS = "config.json", "generation_config.json", "model.safetensors"
HF_TYPES = {"musicgen": "MusicgenForConditionalGeneration", "musicgen_decoder": "MusicgenForCausalLM"}
HF_ROOTS = {"emb": "model.decoder.embed_tokens", "transformer": "model.decoder", "out_norm": "model.decoder.layer_norm",
            "linears": "lm_heads"}   # the first segment of our key
HF_NAMES = {"cross_attention": "encoder_attn", "linear1": "fc1", "linear2": "fc2", "norm1": "self_attn_layer_norm",
            "norm_cross": "encoder_attn_layer_norm", "norm2": "final_layer_norm"}   # the other segments
TEXT_PROJ = "condition_provider.conditioners.description.output_proj."   # transformers: enc_to_dec_proj.
# MusicgenDecoderConfig's defaults, for the keys a config.json leaves out
HF_DECODER_DEFAULTS = {"vocab_size": 2048, "num_hidden_layers": 24, "ffn_dim": 4096, "num_attention_heads": 16,
                       "hidden_size": 1024, "dropout": 0.1, "num_codebooks": 4, "audio_channels": 1,
                       "activation_function": "gelu", "scale_embedding": False, "cross_attention_hidden_size": None}


def transformers_names(key):
    """Our LM key -> its names in MusicgenForCausalLM: three for a fused in_proj_weight (its rows Q | K | V), none
    for the text projection (MusicgenForConditionalGeneration's enc_to_dec_proj)."""
    if key.startswith("condition_provider."):
        return []
    first, *rest = key.split(".")
    parts = [HF_ROOTS.get(first, first)] + [HF_NAMES.get(p, p) for p in rest]
    if parts[-1] == "in_proj_weight":
        return [".".join(parts[:-1] + [f"{n}_proj", "weight"]) for n in "qkv"]
    return [".".join(parts)]


def to_transformers_state_dict(state):
    """Our LM state dict -> MusicgenForCausalLM's (the text projection left out); q, k and v are copies, not views
    of in_proj_weight, so the result can be saved as it is."""
    out = {}
    for key, value in state.items():
        names = transformers_names(key)
        pieces = [p.clone() for p in value.chunk(3)] if len(names) == 3 else [value]
        out.update(zip(names, pieces))
    return out


def read_hf_config(directory):
    """config.json of a transformers MusicGen directory -> (model_type: musicgen | musicgen_decoder, the config)."""
    file = Path(directory) / HF_CONFIG
    config = _read_json(file, "a transformers config")
    kind = config.get("model_type")
    if kind == "musicgen_melody":
        raise UserError(f"{file}: MusicGen-melody (chroma conditioning) is not supported: nanomusicgen conditions "
                        f"on text only")
    if kind not in HF_TYPES:
        raise UserError(f"{file}: model_type {kind!r} is not a transformers MusicGen ({', '.join(HF_TYPES)})")
    return kind, config


def _hf_settings(kind, config, directory, t5=None):
    """build_lm's settings from a transformers MusicGen config (transformers' defaults where it is silent)."""
    source = f"{Path(directory) / HF_CONFIG}"
    where = "decoder." if kind == "musicgen" else ""
    if kind == "musicgen" and not isinstance(config.get("decoder"), dict):
        raise UserError(f"{source}: no `decoder` section: not a MusicgenForConditionalGeneration config")
    d = {**HF_DECODER_DEFAULTS, **(config["decoder"] if kind == "musicgen" else config)}
    if d["audio_channels"] != 1:
        raise UserError(f"{source}: {where}audio_channels={d['audio_channels']}: stereo MusicGen is not supported "
                        f"(mono only)")
    for key, want in (("activation_function", "gelu"), ("scale_embedding", False)):
        if d[key] != want:
            raise UserError(f"{source}: {where}{key}={d[key]!r} is not supported (MusicGen's LM has {want!r})")
    if d["ffn_dim"] % d["hidden_size"]:
        raise UserError(f"{source}: {where}ffn_dim={d['ffn_dim']} is not a multiple of hidden_size={d['hidden_size']}")
    text_dim = d["hidden_size"]   # a decoder alone takes text states already projected to its width
    if kind == "musicgen":
        for part, want in (("text_encoder", "t5"), ("audio_encoder", "encodec")):
            got = (config.get(part) or {}).get("model_type") if isinstance(config.get(part), dict) else None
            if got != want:
                raise UserError(f"{source}: {part} is {got!r}, not {want!r}: only T5-conditioned MusicGen with "
                                f"EnCodec is supported")
        text_dim = int(config["text_encoder"].get("d_model", 512))
        if text_dim != d["hidden_size"] and d["cross_attention_hidden_size"] is not None:
            raise UserError(f"{source}: decoder.cross_attention_hidden_size is set (no enc_to_dec_proj) but the text "
                            f"encoder's width {text_dim} differs from hidden_size {d['hidden_size']}")
    return {"dim": d["hidden_size"], "n_layers": d["num_hidden_layers"], "n_heads": d["num_attention_heads"],
            "hidden_scale": d["ffn_dim"] // d["hidden_size"], "n_q": d["num_codebooks"], "card": d["vocab_size"],
            "pattern": "delay", "delays": (), "text_dim": text_dim, "fuse": "cross", "mask_memory": True,
            "dropout": float(d["dropout"]), "max_period": 10000.0, "conditioner": "t5",
            "t5_path": t5 or (str(directory) if kind == "musicgen" else "")}


def read_hf_lm(directory, t5=None):
    """A transformers MusicGen directory -> (build_lm's settings, the LM's state dict with our names, config.json),
    checked against the model its config describes: missing, unexpected and misshapen weights are named as the file
    names them. A decoder alone, or a model whose text encoder is as wide as the decoder, has no enc_to_dec_proj:
    its text projection is the identity."""
    directory = Path(directory)
    kind, config = read_hf_config(directory)
    settings = _hf_settings(kind, config, directory, t5)
    try:
        model = lm_lib.build_lm(settings, with_t5=False, meta=True)
    except UserError as e:
        raise UserError(f"{directory / HF_CONFIG}: {e}") from None
    prefix = "decoder." if kind == "musicgen" else ""
    projected = kind == "musicgen" and settings["text_dim"] != settings["dim"]
    names, expected = {}, {}       # our key -> the file's names; the file's name -> shape
    for key, tensor in model.state_dict().items():
        names[key] = [prefix + n for n in transformers_names(key)]
        if projected and key.startswith(TEXT_PROJ):
            names[key] = ["enc_to_dec_proj." + key[len(TEXT_PROJ):]]
        for name in names[key]:
            expected[name] = (tensor.shape[0] // len(names[key]), *tensor.shape[1:])
    # the text encoder's and the codec's weights are read by text.load_t5 and load_codec
    weights = read_weights(directory, lambda k: not k.startswith(("text_encoder.", "audio_encoder.")),
                           "transformers MusicGen directory")
    check_fit(expected, weights, str(directory))
    state = {key: torch.cat([weights[n] for n in ns]) for key, ns in names.items() if ns}
    if not projected:
        dim = settings["dim"]
        state[TEXT_PROJ + "weight"], state[TEXT_PROJ + "bias"] = torch.eye(dim), torch.zeros(dim)
    return settings, state, config


def hf_differences(cfg, text_max_length=0):
    """What transformers' MusicGen computes differently from us for a model with these settings (export prints them
    and records them in config.json's nanomusicgen section)."""
    out = []
    if not cfg.mask_memory:
        out.append("mask_memory=False: transformers' MusicGen masks padded text positions, which this model never "
                   "did: its logits equal ours for one prompt at a time (or prompts of one length) but differ on the "
                   "padded rows of a batch of prompts of different lengths")
    if text_max_length:
        out.append(f"text_max_length={text_max_length}: nanomusicgen truncates longer descriptions, transformers' "
                   f"processor only when called with truncation=True (tokenizer_config.json's model_max_length)")
    return out


def _hf_refusal(mg):
    """Why this model cannot be written as a transformers MusicGen, or None."""
    cfg, codec, cond = mg.lm_cfg, mg.codec, mg.conditioner
    if len(mg.lm.fuses) > 1:
        return (f"conditions {', '.join(mg.lm.fuses)}: transformers' MusicGen conditions on a description only; "
                f"export --format=audiocraft instead")
    if cond["conditioner"] != "t5":
        return (f"conditioner={cond['conditioner']}: transformers' MusicGen conditions on T5 only, so a lookup-table "
                f"conditioner cannot be expressed there; export --format=audiocraft instead")
    if cfg.pattern != "delay" or mg.lm.delays != tuple(range(cfg.n_q)):
        return (f"pattern={cfg.pattern} (delays {list(mg.lm.delays)}): transformers' MusicGen knows only the delay "
                f"pattern with delays 0..{cfg.n_q - 1}")
    if cfg.fuse != "cross":
        return f"fuse={cfg.fuse}: transformers' MusicGen conditions through cross-attention only"
    if cfg.max_period != 10000:
        return f"max_period={cfg.max_period:g}: transformers' MusicGen has sinusoidal positions of period 10000 only"
    if codec.stereo or codec.cfg.lstm == 0 or codec.card & (codec.card - 1):
        return (f"codec {mg.codec_source} (stereo={codec.stereo}, lstm={codec.cfg.lstm}, card={codec.card}): "
                f"transformers' EnCodec needs a mono codec with an LSTM and a power-of-two codebook size")
    proj = mg.lm.conditioner.output_proj
    if cfg.text_dim == cfg.dim and not (torch.equal(proj.weight, torch.eye(cfg.dim)) and not proj.bias.any()):
        return (f"text_dim equals dim ({cfg.dim}): transformers' MusicGen then has no text projection "
                f"(enc_to_dec_proj), so this model's trained output_proj cannot be expressed there")
    return None


def _hf_tokenizer_files(t5_dir, max_length):
    """{file name: bytes} of the T5 tokenizer that MusicgenProcessor / AutoTokenizer load: the T5 directory's own
    files, and a T5Tokenizer config where it has none."""
    files = {name: (t5_dir / name).read_bytes() for name in ("spiece.model", "tokenizer_config.json",
                                                              "special_tokens_map.json", "tokenizer.json")
             if (t5_dir / name).is_file()}
    files.setdefault("tokenizer_config.json", json.dumps({
        "tokenizer_class": "T5Tokenizer", "model_max_length": max_length or 512, "extra_ids": text.T5_EXTRA_IDS,
        "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}, indent=2).encode())
    return files


def export_hf(mg, out, t5=None):
    """MusicGen (a run, an AudioCraft export) -> the directory MusicgenForConditionalGeneration.from_pretrained and
    transformers' text-to-audio pipeline load: config.json, model.safetensors (decoder, enc_to_dec_proj, the T5 as
    text_encoder, the codec as audio_encoder), generation_config.json (its sampling settings and context), the T5's
    tokenizer files and the EnCodec feature extractor's config. The T5 comes from the model's t5_path, or `t5`.
    Written into a temporary directory beside `out` and renamed: no half-written export. -> (files, differences)."""
    out = Path(os.path.expanduser(str(out)))
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not an empty directory: pick another directory or remove it")
    reason = _hf_refusal(mg)
    if reason:
        raise UserError(f"{mg.source}: cannot be written as a transformers MusicGen: {reason}")
    cfg, codec, lm = mg.lm_cfg, mg.codec, mg.lm
    t5_path = t5 or mg.conditioner["t5_path"]
    _check_t5({"conditioner": "t5", "t5_path": t5_path}, True)
    t5_raw, _ = text.t5_config(t5_path)
    if int(t5_raw.get("d_model", 512)) != cfg.text_dim:
        raise UserError(f"T5 {t5_path}: d_model={t5_raw.get('d_model', 512)}, but the model's text projection takes "
                        f"text_dim={cfg.text_dim}: pass the T5 it was trained with (--t5=PATH)")
    t5_model, _ = text.load_t5(t5_path)
    frames = mg.window
    tensors = {"decoder." + k: v for k, v in to_transformers_state_dict(lm.state_dict()).items()}
    if cfg.text_dim != cfg.dim:
        tensors.update({"enc_to_dec_proj." + k: v for k, v in lm.conditioner.output_proj.state_dict().items()})
    for name, v in t5_model.state_dict().items():   # the input embedding is T5's `shared`, tied to embed_tokens
        tensors["text_encoder." + ("shared.weight" if name == "embed_tokens.weight" else text.hf_key(name))] = v
    tensors.update({"audio_encoder." + k: v for k, v in codec_hf_state(codec).items()})
    differences = hf_differences(cfg, mg.conditioner["text_max_length"])
    decoder = {"model_type": "musicgen_decoder", "vocab_size": cfg.card, "num_codebooks": cfg.n_q,
               "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
               "ffn_dim": cfg.hidden_scale * cfg.dim, "activation_function": "gelu", "dropout": cfg.dropout,
               "attention_dropout": cfg.dropout, "activation_dropout": cfg.dropout, "layerdrop": 0.0,
               "max_position_embeddings": max(2048, frames + cfg.n_q), "scale_embedding": False,
               "audio_channels": 1, "pad_token_id": cfg.card, "bos_token_id": cfg.card, "eos_token_id": None,
               "tie_word_embeddings": False, "initializer_factor": 0.02, "use_cache": True}
    config = {"architectures": [HF_TYPES["musicgen"]], "model_type": "musicgen", "is_encoder_decoder": True,
              "decoder": decoder, "audio_encoder": codec_hf_config(codec.cfg), "initializer_factor": 0.02,
              "text_encoder": {**{k: v for k, v in t5_raw.items() if k != "architectures"}, "model_type": "t5"},
              "nanomusicgen": {"signature": mg.signature, "weights": mg.weights, "source": str(mg.source),
                               "codec": mg.codec_source, "segment_duration": mg.max_duration,
                               "conditioner": {**mg.conditioner, "t5_path": str(t5_path)},
                               "transformers_differences": differences}}
    d = mg.defaults
    generation = {"_from_model_config": False, "bos_token_id": cfg.card, "pad_token_id": cfg.card,
                  "decoder_start_token_id": cfg.card, "do_sample": d["temperature"] > 0,
                  "guidance_scale": d["cfg_coef"], "max_length": frames + cfg.n_q,   # the start step and the delays
                  "top_k": 0 if d["top_p"] > 0 else d["top_k"]}                     # top_p wins, as in AudioCraft
    if d["top_p"] > 0:
        generation["top_p"] = d["top_p"]
    if d["temperature"] > 0:
        generation["temperature"] = d["temperature"]
    features = {"feature_extractor_type": "EncodecFeatureExtractor", "feature_size": codec.channels,
                "sampling_rate": codec.sample_rate, "padding_side": "left", "padding_value": 0.0,
                "return_attention_mask": True, "chunk_length_s": None, "overlap": None,
                "processor_class": "MusicgenProcessor"}
    files = {HF_CONFIG: json.dumps(config, indent=2).encode(), HF_GENERATION: json.dumps(generation, indent=2).encode(),
             "preprocessor_config.json": json.dumps(features, indent=2).encode(),
             **_hf_tokenizer_files(text.t5_directory(t5_path), mg.conditioner["text_max_length"])}
    from safetensors.torch import save_file
    stage = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(stage / HF_WEIGHTS),
                  metadata={"format": "pt"})
        for name, content in files.items():
            (stage / name).write_bytes(content)
        if out.exists():
            out.rmdir()
        os.replace(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return sorted(out.iterdir()), differences


# ----------------------------------------------------------------------------------------------------------
# Codec: AudioCraft's compression_state_dict.bin and Hugging Face EnCodec -> our keys, weight norm folded

def _codec_key(key):
    """Map an AudioCraft or HF key onto ours; None for state we do not keep (EMA statistics)."""
    m = re.match(r"quantizer\.(?:vq\.)?layers\.(\d+)\._?codebook\.(\w+)$", key)
    if m:
        return f"codebooks.{m[1]}" if m[2] == "embed" else None
    key = re.sub(r"^(encoder|decoder)\.(model|layers)\.", r"\1.", key)
    key = key.replace("conv.conv.", "").replace("convtr.convtr.", "").replace("conv.", "")
    return key.replace("parametrizations.weight.original0", "weight_g").replace(
        "parametrizations.weight.original1", "weight_v")


def _load_codec_weights(codec, state, source):
    """Fold weight norm (weight = g * v / |v|, norm over all dims but 0) and load into `codec`, strictly."""
    named = {_codec_key(k): v for k, v in state.items()}
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


def codec_config_from_xp(xp_cfg, source):
    """CodecConfig from an AudioCraft xp.cfg (YAML text or dict). Missing keys take SEANet's defaults."""
    try:
        xp = yaml.safe_load(xp_cfg) if isinstance(xp_cfg, str) else dict(xp_cfg)
    except (TypeError, ValueError, yaml.YAMLError) as e:
        raise UserError(f"{source}: xp.cfg is not YAML ({type(e).__name__}): not a compression model file") from None
    if not isinstance(lookup(xp, "seanet"), dict) or not isinstance(lookup(xp, "rvq"), dict):
        raise UserError(f"{source}: xp.cfg lacks the EnCodec settings (seanet, rvq): not a compression model file")

    def get(key, default):
        return lookup(xp, key, default)
    if get("compression_model", "encodec") != "encodec" or get("encodec.autoencoder", "seanet") != "seanet":
        raise UserError(f"{source}: only EnCodec (seanet + rvq) compression models are supported")
    if get("encodec.renormalize", False):
        raise UserError(f"{source}: renormalize=True codecs need per-item scales, which the LM cannot use")
    decoder = get("seanet.decoder", None) or {}
    if get("seanet.encoder", None) or set(decoder) - {"trim_right_ratio", "final_activation",
                                                      "final_activation_params"}:
        raise UserError(f"{source}: separate encoder/decoder seanet overrides are not supported")
    if get("seanet.activation", "ELU") != "ELU" or get("seanet.activation_params.alpha", 1.0) != 1.0 \
            or get("seanet.decoder.final_activation", None):
        raise UserError(f"{source}: only ELU(alpha=1) activations and no final activation are supported")
    if get("seanet.norm", "none") not in ("weight_norm", "none"):
        raise UserError(f"{source}: norm {get('seanet.norm', 'none')!r} is not supported (weight_norm or none)")
    return codec_lib.CodecConfig(
        sample_rate=int(get("encodec.sample_rate", get("sample_rate", 32000))),
        channels=int(get("seanet.channels", get("encodec.channels", get("channels", 1)))),
        n_filters=get("seanet.n_filters", 32), ratios=tuple(get("seanet.ratios", (8, 5, 4, 2))),
        dimension=get("seanet.dimension", 128), n_residual_layers=get("seanet.n_residual_layers", 3),
        kernel_size=get("seanet.kernel_size", 7), residual_kernel_size=get("seanet.residual_kernel_size", 3),
        last_kernel_size=get("seanet.last_kernel_size", 7), dilation_base=get("seanet.dilation_base", 2),
        compress=get("seanet.compress", 2), lstm=get("seanet.lstm", 0), causal=bool(get("seanet.causal", False)),
        pad_mode=get("seanet.pad_mode", "reflect"), true_skip=bool(get("seanet.true_skip", True)),
        norm=get("seanet.norm", "none"), disable_norm_outer_blocks=get("seanet.disable_norm_outer_blocks", 0),
        trim_right_ratio=float(get("seanet.decoder.trim_right_ratio", 1.0)), n_q=get("rvq.n_q", 8),
        card=get("rvq.bins", 1024))


def codec_config_from_hf(c, source, n_codebooks):
    """CodecConfig from a Hugging Face EncodecConfig dict. Missing keys take transformers' defaults."""
    if c.get("normalize", False) or c.get("chunk_length_s") is not None:
        raise UserError(f"{source}: normalize/chunk_length_s (e.g. encodec_48khz) are not supported")
    if c.get("norm_type", "weight_norm") != "weight_norm":
        raise UserError(f"{source}: norm_type {c['norm_type']!r} is not supported (weight_norm only)")
    dim = c.get("hidden_size", 128)
    if c.get("codebook_dim") not in (None, dim):
        raise UserError(f"{source}: codebook_dim {c['codebook_dim']} != hidden_size {dim} is not supported")
    return codec_lib.CodecConfig(
        sample_rate=c.get("sampling_rate", 24000), channels=c.get("audio_channels", 1),
        n_filters=c.get("num_filters", 32), ratios=tuple(c.get("upsampling_ratios", (8, 5, 4, 2))),
        dimension=dim, n_residual_layers=c.get("num_residual_layers", 1),
        kernel_size=c.get("kernel_size", 7), residual_kernel_size=c.get("residual_kernel_size", 3),
        last_kernel_size=c.get("last_kernel_size", 7), dilation_base=c.get("dilation_growth_rate", 2),
        compress=c.get("compress", 2), lstm=c.get("num_lstm_layers", 2), causal=c.get("use_causal_conv", True),
        pad_mode=c.get("pad_mode", "reflect"), true_skip=not c.get("use_conv_shortcut", True),
        trim_right_ratio=c.get("trim_right_ratio", 1.0), n_q=n_codebooks, card=c.get("codebook_size", 1024))


def _read_audiocraft_codec(path):
    pkg = load_tensors(path, expected=_CODEC_EXPECTED)
    if not isinstance(pkg, dict):
        raise UserError(f"{path}: not an AudioCraft {CODEC_FILE} (no best_state/xp.cfg)")
    if "pretrained" in pkg:
        raise UserError(f"{path}: points to the pretrained model {pkg['pretrained']!r} instead of holding weights; "
                        f"download that Hugging Face directory and pass its path")
    if "best_state" not in pkg or "xp.cfg" not in pkg:
        raise UserError(f"{path}: not an AudioCraft {CODEC_FILE} (needs keys best_state and xp.cfg, "
                        f"has {sorted(pkg)[:5]})")
    state = pkg["best_state"]
    if isinstance(state, dict) and isinstance(state.get("model"), dict):   # a solver checkpoint's best_state
        state = state["model"]
    if not isinstance(state, dict):
        raise UserError(f"{path}: best_state is a {type(state).__name__}, not a state dict")
    return codec_config_from_xp(pkg["xp.cfg"], path), state


def _read_hf_codec(directory):
    try:
        c = json.loads((directory / "config.json").read_text())
    except ValueError as e:
        raise UserError(f"{directory}/config.json: not valid JSON ({e})") from None
    prefix = ""
    if "audio_encoder" in c:   # a MusicGen directory: its EnCodec lives under audio_encoder.
        c, prefix = c["audio_encoder"], "audio_encoder."
    if c.get("model_type", "encodec") != "encodec":
        raise UserError(f"{directory}/config.json: model_type {c.get('model_type')!r} is not EnCodec")
    weights = read_weights(directory, lambda k: k.startswith(prefix), "Hugging Face directory", _CODEC_EXPECTED)
    state = {k[len(prefix):]: v for k, v in weights.items()}
    n_codebooks = len({k for k in state if re.match(r"quantizer\.layers\.\d+\.codebook\.embed$", k)})
    if not n_codebooks:
        raise UserError(f"{directory}: its weights hold no quantizer.layers.N.codebook.embed: not an EnCodec")
    return codec_config_from_hf(c, directory, n_codebooks), state


def _read_codec_run(directory):
    """(config, weights) of a train_codec.py run: the latest EMA weights it validated, weight norm already folded."""
    ckpt = load_tensors(directory / "checkpoint.pt", mmap=True, expected=_CODEC_EXPECTED)
    if not isinstance(ckpt, dict) or "codec_config" not in ckpt:
        raise UserError(f"{directory}: its checkpoint.pt is not a codec's (train.py trains LMs; train_codec.py codecs)")
    if ckpt.get("best_state") is None:
        raise UserError(f"{directory}: the codec run has not finished an epoch yet: no weights to tokenize with")
    return codec_lib.CodecConfig(**ckpt["codec_config"]), ckpt["best_state"]


def load_codec(path, stereo=False, pad_mode=None, n_q=None):
    """A frozen Codec (eval, no grad) from an AudioCraft file or directory holding one, a Hugging Face
    directory, a train_codec.py run (its directory, or its signature under the team's runs directory), a
    //reference/... path, "demo" (the demo's trained codec, shipped in assets/) or "debug". pad_mode/n_q override
    the file's (AudioCraft inference used constant padding where the HF config says reflect; n_q keeps the first
    codebooks)."""
    if str(path) in ("demo", "debug"):
        import demo   # the fixtures import this module: imported here, not above
        if str(path) == "demo" and not demo.DEMO_CODEC.is_file():
            raise UserError(f"codec demo: {demo.DEMO_CODEC} is missing: make it again with `python demo.py codec`")
        path = demo.DEMO_CODEC if str(path) == "demo" else path
    if str(path) == "debug":
        cfg, state = demo.debug_codec_state()
        source = "debug"
    else:
        p = resolve_path(path)
        if not p.exists() and re.fullmatch(r"[0-9a-f]{8}", str(path)):   # a train_codec.py signature
            p = env.run_dir(str(path))
        if not p.exists():
            raise UserError(f"codec {path}: {p} does not exist")
        if p.is_dir() and (p / CODEC_FILE).exists():
            p = p / CODEC_FILE
        elif p.name == "config.json" or p.suffix == ".safetensors":   # a file of an HF directory
            p = p.parent
        if p.is_dir() and (p / "checkpoint.pt").exists():
            cfg, state = _read_codec_run(p)
        elif p.is_dir() and (p / "config.json").exists():
            cfg, state = _read_hf_codec(p)
        elif p.is_file():
            cfg, state = _read_audiocraft_codec(p)
        else:
            raise UserError(f"codec {path}: {p} holds neither {CODEC_FILE}, a Hugging Face config.json nor a "
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
    codec = _load_codec_weights(codec_lib.Codec(cfg, stereo=stereo), state, source)
    return codec.eval().requires_grad_(False)


def codec_xp_cfg(cfg):
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


def codec_audiocraft_state(codec, weight_norm_all=False):
    """Our codec's weights in AudioCraft's EncodecModel layout, weight norm as legacy weight_g / weight_v (on every
    convolution with weight_norm_all: transformers' EnCodec has it on all)."""
    state = {}
    for side in ("encoder", "decoder"):
        for name, m in getattr(codec, side).named_modules():
            if isinstance(m, codec_lib.LSTM):
                for k, v in m.lstm.state_dict().items():
                    state[f"{side}.model.{name}.lstm.{k}"] = v.detach().float().cpu().clone()
            elif isinstance(m, (codec_lib.Conv, codec_lib.ConvTr)):
                wrap = "convtr.convtr" if isinstance(m, codec_lib.ConvTr) else "conv.conv"
                prefix = f"{side}.model.{name}.{wrap}."
                w = m.weight.detach().float().cpu()
                if m.normed or weight_norm_all:
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


def codec_hf_config(cfg):
    """transformers' EncodecConfig (a dict) for our CodecConfig: codec_config_from_hf's inverse. The number of
    codebooks is the bandwidth: transformers uses floor(1000 bandwidth / (frame rate x log2 card)) of them."""
    frame_rate = math.ceil(cfg.sample_rate / math.prod(cfg.ratios))
    bits = frame_rate * int(math.log2(cfg.card))
    bandwidth = cfg.n_q * bits / 1000
    if int(1000 * bandwidth // bits) != cfg.n_q:   # a float rounding below n_q: half a codebook more
        bandwidth = (cfg.n_q + 0.5) * bits / 1000
    return {"model_type": "encodec", "sampling_rate": cfg.sample_rate, "audio_channels": cfg.channels,
            "num_filters": cfg.n_filters, "upsampling_ratios": list(cfg.ratios), "hidden_size": cfg.dimension,
            "codebook_dim": cfg.dimension, "num_residual_layers": cfg.n_residual_layers,
            "kernel_size": cfg.kernel_size, "residual_kernel_size": cfg.residual_kernel_size,
            "last_kernel_size": cfg.last_kernel_size, "dilation_growth_rate": cfg.dilation_base,
            "compress": cfg.compress, "num_lstm_layers": cfg.lstm, "use_causal_conv": cfg.causal,
            "pad_mode": cfg.pad_mode, "use_conv_shortcut": not cfg.true_skip, "trim_right_ratio": cfg.trim_right_ratio,
            "codebook_size": cfg.card, "target_bandwidths": [bandwidth], "normalize": False, "chunk_length_s": None,
            "overlap": None, "norm_type": "weight_norm"}


def codec_hf_state(codec):
    """Our codec's weights in transformers' EncodecModel layout (encoder.layers.N..., weight norm on every
    convolution as parametrizations.weight.original0 / original1, quantizer.layers.Q.codebook.*)."""
    state = {}
    for key, value in codec_audiocraft_state(codec, weight_norm_all=True).items():
        key = re.sub(r"^(encoder|decoder)\.model\.", r"\1.layers.", key)
        key = re.sub(r"^quantizer\.vq\.layers\.(\d+)\._codebook\.", r"quantizer.layers.\1.codebook.", key)
        key = key.replace("conv.conv.", "conv.").replace("convtr.convtr.", "conv.")
        state[key.replace("weight_g", "parametrizations.weight.original0").replace(
            "weight_v", "parametrizations.weight.original1")] = value
    return state


def export_audiocraft_codec(codec, path):
    """Write `codec` as AudioCraft's compression_state_dict.bin ({best_state, xp.cfg}); `path` is the file or
    a directory for it. Written atomically."""
    path = Path(path)
    if path.is_dir():
        path = path / CODEC_FILE
    pkg = {"best_state": codec_audiocraft_state(codec), "xp.cfg": yaml.safe_dump(codec_xp_cfg(codec.cfg)),
           "version": "nanomusicgen", "exported": True}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: torch.save(pkg, f))
    return path


def export_hf_codec(codec, directory):
    """Write `codec` as a transformers EnCodec directory (config.json + model.safetensors) that
    EncodecModel.from_pretrained loads. Written atomically, file by file."""
    from safetensors.torch import save as save_safetensors
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"architectures": ["EncodecModel"], **codec_hf_config(codec.cfg)}, indent=2) + "\n"
    blob = save_safetensors({k: v.contiguous() for k, v in codec_hf_state(codec).items()}, metadata={"format": "pt"})
    write_atomic(directory / "model.safetensors", lambda f: f.write(blob))
    write_atomic(directory / "config.json", lambda f: f.write(text.encode()))
    return directory


# ----------------------------------------------------------------------------------------------------------
# Runs (config.json + checkpoint.pt), AudioCraft exports and transformers MusicGen directories, loaded for sampling

@dataclass
class MusicGen:
    """What sampling needs: the LM (its text conditioner inside), the codec, and what the weights came with."""
    lm: lm_lib.MusicGenLM
    lm_cfg: lm_lib.LMConfig
    codec: codec_lib.Codec
    max_duration: float     # seconds of one generation window: the segment duration the model was trained on
    defaults: dict          # the sampling settings of the run or export (cfg_coef, top_k, top_p, temperature)
    conditioner: dict       # the text.SETTINGS keys: how to rebuild the text conditioner
    source: Path            # the checkpoint.pt, state_dict.bin or transformers config.json the weights came from
    weights: str            # best_state | ema | model (a run without a valid stage yet) | export | transformers
    codec_source: str
    signature: str = ""

    @property
    def window(self):       # frames per generation window
        return max(1, int(round(self.max_duration * self.codec.frame_rate)))


def find_run(run, runs_dir=None, option="--run"):
    """A run signature (under runs_dir, else the team's runs directory), a run directory, a checkpoint file, an
    AudioCraft export directory or file, a transformers MusicGen directory (or its config.json or weights), or
    //reference/... -> the file: checkpoint.pt, state_dict.bin of an export, or config.json of a transformers
    MusicGen. `option` names the setting in errors (--run, continue_from)."""
    name = str(run)
    if name.startswith("//") or "/" in name or os.sep in name or Path(name).expanduser().exists():
        path = resolve_path(name)
        if not path.exists():
            raise UserError(f"{option}={name}: {path} does not exist")
    else:
        path = env.run_dir(name, runs_dir)
        if not path.is_dir():
            raise UserError(f"{option}={name}: no run {name} in {path.parent} and no such path (give a run signature, "
                            f"a run directory, an AudioCraft export or a transformers MusicGen directory; --runs_dir "
                            f"sets where runs live)")
    if path.is_file() and (path.name == HF_CONFIG or ".safetensors" in path.name) and _hf_model_type(path.parent):
        return path.parent / HF_CONFIG
    if path.is_dir():
        for file in (LM_FILE, "checkpoint.pt"):
            if (path / file).is_file():
                return path / file
        if _hf_model_type(path):
            return path / HF_CONFIG
        raise UserError(f"{option}={name}: {path} is not a run (checkpoint.pt), an AudioCraft export (state_dict.bin) "
                        f"or a transformers MusicGen directory (config.json + model.safetensors): it holds "
                        f"{_what_is_in(path)}")
    return path


def _hf_model_type(directory):
    """config.json's model_type when it names a MusicGen of transformers (musicgen_melody too: refused when read),
    else None."""
    try:
        config = json.loads((directory / HF_CONFIG).read_text())
    except (OSError, ValueError):
        return None
    kind = config.get("model_type") if isinstance(config, dict) else None
    return kind if kind in (*HF_TYPES, "musicgen_melody") else None


def _what_is_in(directory):
    """What a directory that is none of the formats holds, in a few words."""
    names = sorted(p.name for p in directory.iterdir())
    if not names:
        return "nothing"
    found = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    try:
        config = json.loads((directory / HF_CONFIG).read_text())
    except (OSError, ValueError):
        return found
    if isinstance(config, dict) and "signature" in config:
        return f"{found} (a run's config.json without checkpoint.pt: no checkpoint saved yet?)"
    if isinstance(config, dict) and config.get("model_type"):
        return f"{found} (config.json of a {config['model_type']!r} model)"
    return found


def _codec_for(path, lm_cfg, n_q=None):
    try:
        codec = load_codec(path, n_q=n_q)
    except UserError as e:
        raise UserError(f"{e} (pass --codec=PATH to use another codec)") from None
    if (codec.n_q, codec.card) != (lm_cfg.n_q, lm_cfg.card):
        raise UserError(f"codec {path} has n_q={codec.n_q}, card={codec.card} but the LM has n_q={lm_cfg.n_q}, "
                        f"card={lm_cfg.card}: pass the codec the model was trained with (--codec=PATH)")
    return codec


def _read_json(file, what="a JSON object", advice=""):
    """A JSON file holding an object -> dict; one line naming the file otherwise (then `advice`)."""
    advice = f": {advice}" if advice else ""
    try:
        value = json.loads(Path(file).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{file}: not readable JSON ({e}){advice}") from None
    if not isinstance(value, dict):
        raise UserError(f"{file}: holds a {type(value).__name__}, not {what}{advice}")
    return value


def _run_config(ckpt_path, ckpt):
    """The run's settings: config.json beside the checkpoint, else the copy inside it."""
    config_file, inside = ckpt_path.parent / "config.json", ckpt.get("config")
    if not config_file.is_file():
        if not isinstance(inside, dict):
            raise UserError(f"{ckpt_path}: no config.json beside it and no `config` inside")
        return inside
    advice = f"restore it, or remove it to use the copy inside {ckpt_path.name}" if isinstance(inside, dict) else \
        "restore it"
    return _read_json(config_file, "a run config", advice)


def load_run(ckpt_path, t5=None, codec=None, with_t5=True):
    """A run's checkpoint -> MusicGen with its best EMA state (else its EMA, else its live weights)."""
    ckpt = load_tensors(ckpt_path, mmap=True)   # mapped: the optimizer state is never read
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise UserError(f"{ckpt_path}: not a nanomusicgen checkpoint (no `model` state)")
    cfg = _run_config(ckpt_path, ckpt)
    settings = {**cfg, "t5_path": t5} if t5 else cfg
    state, weights = ckpt["model"], "model"
    ema = (ckpt.get("ema") or {}).get("state")
    if ckpt.get("best_state"):
        state, weights = {**state, **ckpt["best_state"]}, "best_state"
    elif ema:
        state, weights = {**state, **ema}, "ema"
    if ckpt.get("base") is not None:   # an adapter run: its base, then what trained, folded into one plain model
        lm = _load_adapter_run(settings, ckpt["base"], state, str(ckpt_path), with_t5)
    else:
        lm = _build_and_load(settings, state, str(ckpt_path), with_t5)
    codec_path = codec or cfg.get("codec", "//reference/encodec_32khz")
    defaults = {k: cfg.get(k, v) for k, v in SAMPLING_DEFAULTS.items()}
    return MusicGen(lm, lm.cfg, _codec_for(codec_path, lm.cfg), float(cfg.get("segment_duration", 30.0)),
                    defaults, text.conditioning(settings), ckpt_path, weights, str(codec_path),
                    cfg.get("signature", ""))


def adapter_base(base, settings):
    """The base weights an adapter run was trained on, from the file it continued from, checked against the content
    hash its checkpoint recorded (train.py and load_run). -> state dict."""
    source, path = read_lm_state(base["source"], settings.get("runs_dir") or None, settings.get("trust_checkpoint"))
    got = adapters.state_hash(source)
    if got != base["hash"]:
        raise UserError(f"{path}: the base weights changed since the adapters were trained on them (content hash "
                        f"{got}, expected {base['hash']}): restore that file, or start afresh (--clear=True)")
    return source


def _load_adapter_run(settings, base, state, source, with_t5):
    """An adapter run's model: the base (its file, or the seeded initial weights, each checked against base["hash"]),
    its adapters and what else trained from `state`, then merged: a plain model that samples at full speed."""
    _check_t5(settings, with_t5)
    torch.manual_seed(int(settings.get("seed", 0)))   # a base of seeded initial weights is rebuilt exactly
    model = lm_lib.build_lm(settings, with_t5=with_t5)
    if base["source"]:
        weights = adapter_base(base, settings)
    else:
        weights = model.state_dict()
        if adapters.state_hash(weights) != base["hash"]:
            raise UserError(f"{source}: the seeded initial weights are not the base its adapters were trained on "
                            f"(the model code or seed changed)")
    adapters.apply(model, settings)
    check_state_dict(model, weights, source)
    model.load_state_dict({**weights, **state}, strict=False)
    unknown = sorted(set(state) - set(model.state_dict()))
    missing = sorted(k for k in model.state_dict() if ".lora_" in k and k not in state)
    if unknown or missing:
        raise UserError(f"{source}: its adapters do not fit the model its config builds ({(unknown or missing)[0]}): "
                        f"lora_* settings changed?")
    return adapters.merge(model).float().eval()


def export_adapters(path, out):
    """An adapter run's adapters alone (and what else trained), with its lora settings and the base they need ->
    out/adapters.pt (megabytes, not the base's gigabytes). -> the file."""
    ckpt = load_tensors(path, mmap=True)
    if not isinstance(ckpt, dict) or ckpt.get("base") is None:
        raise UserError(f"{path}: not an adapter run (lora_rank=0): export the whole model instead")
    cfg = _run_config(path, ckpt)
    state = {**ckpt["model"], **(ckpt.get("best_state") or {})}
    keys = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "freeze_base", "train_also")
    pkg = {"adapters": {k: v.detach().cpu().contiguous() for k, v in state.items()}, "base": ckpt["base"],
           "lora": {k: cfg.get(k) for k in keys}, "config": cfg}
    out = Path(os.path.expanduser(str(out)))
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "adapters.pt", lambda f: torch.save(pkg, f))
    return out / "adapters.pt"


def load_export(path, t5=None, codec=None, with_t5=True):
    """An AudioCraft state_dict.bin (released MusicGen or our export) -> MusicGen. The codec is the
    compression_state_dict.bin beside it unless --codec says otherwise."""
    lm, settings, xp, path = _open_audiocraft_lm(path, with_t5, t5)
    codec_path = codec or path.parent / CODEC_FILE
    if codec is None and not codec_path.is_file():
        raise UserError(f"{path.parent}: no {CODEC_FILE} beside state_dict.bin: pass --codec=PATH "
                        f"(e.g. //reference/encodec_32khz)")
    defaults = {"cfg_coef": lookup(xp, "classifier_free_guidance.inference_coef", 3.0),
                "top_k": lookup(xp, "generate.lm.top_k", 250), "top_p": lookup(xp, "generate.lm.top_p", 0.0),
                "temperature": lookup(xp, "generate.lm.temp", 1.0)}
    return MusicGen(lm, lm.cfg, _codec_for(codec_path, lm.cfg),
                    float(lookup(xp, "nanomusicgen.segment_duration") or lookup(xp, "dataset.segment_duration", 30.0)),
                    defaults, text.conditioning(settings), path, "export", str(codec_path),
                    str(lookup(xp, "nanomusicgen.signature", "")))


def load_hf(directory, t5=None, codec=None, with_t5=True):
    """A transformers MusicGen directory -> MusicGen. Its T5 (text_encoder) conditions it and its EnCodec
    (audio_encoder) decodes, unless --t5 / --codec say otherwise; generation_config.json gives the sampling settings
    (AudioCraft's where it is silent) and the context (max_length steps: frames + n_q). A decoder alone
    (MusicgenForCausalLM) holds neither: it needs both options, and a T5 as wide as the decoder (it has no text
    projection)."""
    directory = Path(directory)
    settings, state, config = read_hf_lm(directory, t5)
    if config["model_type"] == "musicgen_decoder":
        need = [f"--{k}=PATH" for k, v in (("t5", t5 if with_t5 else ""), ("codec", codec)) if v is None]
        if need:
            raise UserError(f"{directory}: a decoder alone (MusicgenForCausalLM) holds no text encoder and no codec: "
                            f"pass {' and '.join(need)}, or use the MusicgenForConditionalGeneration directory")
        d_model = int(text.t5_config(t5)[0].get("d_model", 512)) if with_t5 else settings["dim"]
        if d_model != settings["dim"]:
            raise UserError(f"{directory}: a decoder alone takes text states as wide as itself ({settings['dim']}), "
                            f"--t5={t5} gives {d_model} (its text projection is in the MusicgenForConditionalGeneration"
                            f" directory: use that one)")
    lm = _build_and_load(settings, state, str(directory), with_t5)
    generation = _read_json(directory / HF_GENERATION) if (directory / HF_GENERATION).is_file() else {}
    codec_path = codec or directory
    # transformers' EnCodec holds the codebooks of its highest bandwidth; the decoder uses its first num_codebooks
    codec_model = _codec_for(codec_path, lm.cfg, None if codec else lm.cfg.n_q)
    guidance, top_p = generation.get("guidance_scale"), generation.get("top_p", 1.0)
    defaults = {"cfg_coef": SAMPLING_DEFAULTS["cfg_coef"] if guidance is None else guidance,
                "top_k": generation.get("top_k", SAMPLING_DEFAULTS["top_k"]),
                "top_p": 0.0 if top_p >= 1.0 else top_p,           # transformers' off is 1.0, ours 0.0
                "temperature": generation.get("temperature", 1.0) if generation.get("do_sample", True) else 0.0}
    ours = config.get("nanomusicgen") if isinstance(config.get("nanomusicgen"), dict) else {}
    seconds = ours.get("segment_duration") or (
        (generation["max_length"] - lm.cfg.n_q) / codec_model.frame_rate if generation.get("max_length") else 30.0)
    return MusicGen(lm, lm.cfg, codec_model, float(seconds), defaults, text.conditioning(settings),
                    directory / HF_CONFIG, "transformers", str(codec_path), str(ours.get("signature", "")))


def load(run, runs_dir=None, t5=None, codec=None, device="cpu"):
    """--run (signature, run directory, checkpoint file, AudioCraft export, transformers MusicGen directory,
    //reference/...) -> MusicGen on device."""
    path = find_run(run, runs_dir)
    if path.name == HF_CONFIG:
        mg = load_hf(path.parent, t5, codec)
    else:
        mg = load_export(path, t5, codec) if path.name == LM_FILE else load_run(path, t5, codec)
    mg.lm.to(device)
    mg.codec.to(device)
    return mg


# generate.py export's options (env.parse_options schema)
EXPORT_OPTIONS = {"runs_dir": (str, None), "codec": (str, None), "format": "audiocraft", "t5": (str, None)}
EXPORT_FORMATS = ("audiocraft", "hf", "adapters")


def export(run, out_dir, runs_dir=None, codec=None, format="audiocraft", t5=None):
    """A run's best EMA state (or a model held in the other format) -> out_dir in `format`. audiocraft:
    out_dir/state_dict.bin (AudioCraft's layout with xp.cfg) and out_dir/compression_state_dict.bin (its codec); a
    lookup-table conditioner's tokenizer file goes beside them; needs no T5: only the trained projection after it is
    part of the weights. hf: a transformers MusicGen directory (export_hf), T5 included: the run's t5_path or `t5`.
    -> (MusicGen, files written, differences: what AudioCraft / transformers compute differently for this model,
    also recorded in xp.cfg / config.json)."""
    if format not in EXPORT_FORMATS:
        raise UserError(f"--format={format}: expected one of {', '.join(EXPORT_FORMATS)}")
    path = find_run(run, runs_dir)
    source = {LM_FILE: "audiocraft", HF_CONFIG: "hf"}.get(path.name, "run")
    if format == "adapters":
        if source != "run":
            raise UserError(f"--format=adapters: {path} is not a run (only an adapter run has adapters to export)")
        return None, [export_adapters(path, out_dir)], []
    if source == format:
        held = "an AudioCraft export" if format == "audiocraft" else "a transformers MusicGen directory"
        raise UserError(f"{path.parent} is already {held}: nothing to export")
    out = Path(os.path.expanduser(str(out_dir)))
    if (out / LM_FILE).exists() or (out / CODEC_FILE).exists() or (out / HF_CONFIG).exists():
        raise UserError(f"{out} already holds an export: pick another directory or remove it first")
    if source == "run":
        mg = load_run(path, codec=codec, with_t5=False)
    elif source == "audiocraft":
        mg = load_export(path, t5, codec, with_t5=False)
    else:
        mg = load_hf(path.parent, t5, codec, with_t5=False)
    if format == "hf":
        return (mg, *export_hf(mg, out, t5))
    cond = dict(mg.conditioner)
    stems = mg.lm.melody.stems if mg.lm.melody is not None else ""
    differences = audiocraft_differences(mg.lm_cfg, cond["conditioner"], stems, mg.max_duration)
    texts = [n for n in mg.lm.fuses if n != lm_lib.MELODY]
    extra = {
        "sample_rate": mg.codec.sample_rate, "channels": mg.codec.channels,
        # AudioCraft's max_duration (one generation window); its MusicGen asserts that its default extend_stride
        # (18 s) is shorter, so shorter contexts say 30 s there and keep the true one for us
        "dataset.segment_duration": mg.max_duration if mg.max_duration > 18 else 30.0,
        "classifier_free_guidance.inference_coef": mg.defaults["cfg_coef"],
        "generate.lm": {"use_sampling": True, "temp": mg.defaults["temperature"], "top_k": mg.defaults["top_k"],
                        "top_p": mg.defaults["top_p"]},
        "nanomusicgen": {"signature": mg.signature, "weights": mg.weights, "codec": mg.codec_source,
                         "segment_duration": mg.max_duration, "audiocraft_differences": differences},
    }
    if mg.lm.melody is not None:
        extra["nanomusicgen"]["chroma_stems"] = stems
    tokenizer_file = None
    if cond["conditioner"] == "t5":   # AudioCraft knows t5-* and google/flan-t5-* by name
        name = Path(str(cond["t5_path"])).name
        if name in T5_DIMS or name.startswith("flan-t5-"):
            for text_name in texts:
                extra[f"conditioners.{text_name}.t5.name"] = ("google/" if name.startswith("flan") else "") + name
    else:
        lut = mg.lm.conditioner
        for text_name in texts:
            extra[f"conditioners.{text_name}"] = {"model": "lut", "lut": {
                "n_bins": lut.tokenizer.vocab_size, "dim": cond["lut_dim"], "tokenizer": "noop",
                "pad_idx": lut.tokenizer.pad_id}}
        spec = str(cond["lut_tokenizer"])
        if text.tokenizer_file(spec) is not None:
            prefix = "tiktoken:" if spec.startswith("tiktoken:") else ""
            tokenizer_file = resolve_path(text.tokenizer_file(spec))
            cond["lut_tokenizer"] = prefix + "lut_tokenizer" + tokenizer_file.suffix
    extra["nanomusicgen"]["conditioner"] = cond
    out.mkdir(parents=True, exist_ok=True)
    written = [export_audiocraft_lm(mg.lm, mg.lm_cfg, out, extra)]
    written.append(export_audiocraft_codec(mg.codec, out / CODEC_FILE))
    if tokenizer_file is not None:
        written.append(Path(shutil.copyfile(tokenizer_file, out / cond["lut_tokenizer"].split(":")[-1])))
    return mg, written, differences


# ----------------------------------------------------------------------------------------------------------
# continue_from: the LM weights of another run or of a released model

CONTINUE_HINT = ("; AudioCraft's training checkpoint.th pickles its config: if you trust this file, add "
                 "--trust_checkpoint=True (or use its exported state_dict.bin)")


def _unpickle(path):
    """torch.load with pickles allowed: for AudioCraft's training checkpoint.th, from a source the user trusts."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as e:  # the pickle names a class from a package not installed
        raise UserError(f"{path}: unpickling it needs the module {e.name!r}: pip install "
                        f"{str(e.name).split('.')[0]}") from None
    except Exception as e:
        raise UserError(env.load_error(path, e)) from None


def read_lm_state(source, runs_dir=None, trust=False):
    """continue_from -> (flat LM state dict with our key names, the file it came from). source: an AudioCraft
    state_dict.bin (released or exported), AudioCraft's training checkpoint.th (best_state.model or
    fsdp_best_state; it pickles its config, so only with trust=True), one of our checkpoint files (its best_state,
    else its model), a run directory, a run signature (under runs_dir), a transformers MusicGen directory (its
    decoder and enc_to_dec_proj; a decoder alone has an identity text projection: read_hf_lm), or //reference/...
    Tensors only, never code, unless trust."""
    path = find_run(source, runs_dir, option="continue_from")
    if path.name == HF_CONFIG:
        return read_hf_lm(path.parent)[1], path.parent
    pkg = _unpickle(path) if trust else load_tensors(path, hint=CONTINUE_HINT)
    pkg = pkg if isinstance(pkg, dict) else {}
    state = pkg.get("fsdp_best_state") or pkg.get("best_state") or pkg.get("model")
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # AudioCraft training checkpoints nest the LM as best_state.model
    if isinstance(state, dict) and isinstance(pkg.get("model"), dict) and state is not pkg["model"]:
        # one of ours: the best state holds what trains, the model the rest
        state = {**clean_state_dict(pkg["model"]), **clean_state_dict(state)}
    if not isinstance(state, dict):
        raise UserError(f"continue_from={source}: {path} holds neither `best_state` nor `model`")
    return clean_state_dict(state), path


# ----------------------------------------------------------------------------------------------------------
# Command line

USAGE = ("python formats.py lm PATH | python formats.py codec PATH [IN.wav OUT.wav] [--export=OUT] "
         "[--export_hf=OUT_DIR]")


def _round_trip(codec, path, wav_in, wav_out):
    """Encode and decode an audio file through a codec (a stereo file through a mono codec: each side)."""
    import soundfile as sf
    try:
        wav, sr = sf.read(wav_in, dtype="float32", always_2d=True)   # [S, C]
    except Exception as e:
        raise UserError(f"{wav_in}: cannot read audio ({e})") from None
    codec.check_rate(sr)
    if wav.shape[1] == 2 and codec.channels == 1:
        codec = load_codec(path, stereo=True)
    codes = codec.encode(torch.from_numpy(wav.T.copy())[None])
    sf.write(wav_out, codec.decode(codes)[0, :, :wav.shape[0]].T.numpy(), sr)
    print(f"{wav_in}: {codes.shape[-1]} frames x {codes.shape[1]} codebooks -> {wav_out}")


def main(argv):
    (kind, path, *wavs), o = parse_options(argv, {"export": (str, None), "export_hf": (str, None)}, usage=USAGE,
                                           positionals=(2, 4))
    if kind != "codec" and o["export_hf"] is not None:
        raise UserError(f"--export_hf writes a codec: python formats.py codec PATH --export_hf=OUT_DIR")
    if kind == "lm" and not wavs and o["export"] is None and _hf_model_type(resolve_path(path)):
        settings, state, config = read_hf_lm(resolve_path(path))
        model = _build_and_load(settings, state, str(path), with_t5=False)
        print(f"{path}: transformers {HF_TYPES[config['model_type']]}\n{lm_lib.summary(model)}")
        for line in (config.get("nanomusicgen") or {}).get("transformers_differences", []):   # as exported
            print(f"note: {line}")
    elif kind == "lm" and not wavs and o["export"] is None:
        model, _, xp, file = _open_audiocraft_lm(path, with_t5=False)
        print(f"{file}: {lm_lib.summary(model)}")
        print(f"conditioner: {lookup(xp, 'conditioners.description.model')}, context "
              f"{lookup(xp, 'dataset.segment_duration', 30.0)} s")
        for line in lookup(xp, "nanomusicgen.audiocraft_differences") or []:
            print(f"note: {line}")
    elif kind == "codec" and len(wavs) in (0, 2):
        codec = load_codec(path)
        c = codec.cfg
        print(f"codec {path}: {c.sample_rate} Hz, {codec.channels} ch, hop {codec.hop}, {codec.frame_rate:g} "
              f"frames/s, n_q {codec.n_q}, card {codec.card}, pad_mode {c.pad_mode}, "
              f"{lm_lib.num_params(codec) / 1e6:.1f}M params, identity {codec.identity()}")
        if o["export"] is not None:
            print(f"wrote {export_audiocraft_codec(codec, o['export'])}")
        if o["export_hf"] is not None:
            print(f"wrote {export_hf_codec(codec, o['export_hf'])}")
        if wavs:
            _round_trip(codec, path, *wavs)
    else:
        raise UserError(f"usage: {USAGE}")
    return 0


if __name__ == "__main__":
    cli(main)
