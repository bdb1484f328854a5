"""Helpers for the tests: the transformers reference, a generation loop without cache or batching (test_model.py),
and a run directory as train.py leaves it (test_generate.py, test_bad_inputs.py)."""
import json
from dataclasses import fields
from pathlib import Path

import torch

import model as lm


def tiny_config(**overrides):
    base = dict(dim=64, n_layers=2, n_heads=4, card=48, text_dim=16, cfg_dropout=0.3)
    base.update(overrides)
    return lm.LMConfig(**base)


def random_condition(B=2, L=5, dim=64, seed=0):
    """condition [B, L, dim] zeroed where masked (as conditioners return it), mask [B, L] with padding in row 1."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1:, L // 2 + 1:] = False
    return torch.randn(B, L, dim, generator=g) * mask[..., None], mask


# AudioCraft -> transformers names (transformers' convert_musicgen_transformers.py), applied to key segments
HF_NAMES = {"cross_attention": "encoder_attn", "linear1": "fc1", "linear2": "fc2", "norm1": "self_attn_layer_norm",
            "norm_cross": "encoder_attn_layer_norm", "norm2": "final_layer_norm"}


def to_transformers_state_dict(state):
    """Our (AudioCraft) LM state dict -> MusicgenForCausalLM's; the text projection is not part of it."""
    out = {}
    for key, value in state.items():
        if key.startswith("condition_provider."):
            continue
        parts = key.split(".")
        if parts[0] == "emb":
            parts[0] = "model.decoder.embed_tokens"
        elif parts[0] == "transformer":
            parts[0] = "model.decoder"
        elif parts[0] == "out_norm":
            parts[0] = "model.decoder.layer_norm"
        elif parts[0] == "linears":
            parts[0] = "lm_heads"
        parts = [HF_NAMES.get(p, p) for p in parts]
        if parts[-1] == "in_proj_weight":   # fused rows Q | K | V
            for name, w in zip(("q", "k", "v"), value.chunk(3)):
                out[".".join(parts[:-1] + [f"{name}_proj", "weight"])] = w
        else:
            out[".".join(parts)] = value
    return out


def transformers_reference(model):
    from transformers import MusicgenDecoderConfig, MusicgenForCausalLM
    c = model.cfg
    hf_cfg = MusicgenDecoderConfig(
        vocab_size=c.card, num_codebooks=c.n_q, hidden_size=c.dim, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, ffn_dim=c.hidden_scale * c.dim, activation_function="gelu",
        pad_token_id=c.card, bos_token_id=c.card, dropout=0.0, attn_implementation="eager")
    hf = MusicgenForCausalLM(hf_cfg).eval()
    hf.load_state_dict(to_transformers_state_dict(model.state_dict()), strict=True)
    gc = hf.generation_config
    gc.decoder_start_token_id = gc.pad_token_id = c.card
    gc.num_return_sequences = 1
    return hf


def transformers_cache():
    """generate()'s keyword for an explicit two-part cache (self- and cross-attention), in the spelling of the
    installed transformers: 5.24 renamed `past_key_values` to `cache` (and rejects the old name in generate)."""
    import inspect
    from transformers import DynamicCache, EncoderDecoderCache, MusicgenForCausalLM
    name = "cache" if "cache" in inspect.signature(MusicgenForCausalLM.forward).parameters else "past_key_values"
    return {name: EncoderDecoderCache(DynamicCache(), DynamicCache())}


@torch.no_grad()
def generate_by_recompute(model, condition, mask, n_frames, cfg_coef, prompt=None):
    """Greedy generation the slow way: the layout walked in Python, the whole sequence recomputed at each step,
    conditional and null-condition logits from separate calls."""
    c = model.cfg
    layout = lm.pattern_layout(c.pattern, c.n_q, n_frames, c.delays)
    B = condition.shape[0]
    codes = torch.full((B, c.n_q, n_frames), -1, dtype=torch.long)
    T0 = 0 if prompt is None else prompt.shape[-1]
    if T0:
        codes[..., :T0] = prompt
    sequence = torch.full((B, c.n_q, len(layout)), c.card, dtype=torch.long)
    start = min(s for s, coords in enumerate(layout) if any(t == T0 for t, _ in coords))
    for s in range(start):
        for t, q in layout[s]:
            sequence[:, q, s] = codes[:, q, t]
    null, null_mask = torch.zeros_like(condition), torch.zeros_like(mask)
    for s in range(start, len(layout)):
        logits = model(sequence[..., :s], condition, mask)[:, :, -1]
        if cfg_coef != 1.0:
            uncond = model(sequence[..., :s], null, null_mask)[:, :, -1]
            logits = uncond + cfg_coef * (logits - uncond)
        best = logits.argmax(-1)
        for t, q in layout[s]:
            if t < n_frames:
                codes[:, q, t] = torch.where(codes[:, q, t] == -1, best[:, q], codes[:, q, t])
                sequence[:, q, s] = codes[:, q, t]
    return codes


# config/debug.py shrunk: a 0.5 s context (25 frames) so that a 0.8 s piece needs a second window
TINY_RUN = [str(Path(__file__).resolve().parents[1] / "config/debug.py"), "--dim=32", "--n_layers=2", "--n_heads=2", "--lut_dim=32", "--segment_duration=0.5"]


def make_run(runs, args=TINY_RUN, seed=0):
    """A run directory as train.py leaves it (config.json, checkpoint.pt with model, ema and best_state), with
    random weights; best_state differs from the live weights so that using the wrong one shows."""
    import text
    import train
    cfg = train.parse_args(list(args))
    sig = train.config_signature(cfg)
    d = runs / "xps" / sig
    d.mkdir(parents=True)
    config = {**train.config_dict(cfg), "signature": sig}
    (d / "config.json").write_text(json.dumps(config))
    torch.manual_seed(seed)
    lm_cfg = lm.LMConfig(**{f.name: getattr(cfg, f.name) for f in fields(lm.LMConfig) if hasattr(cfg, f.name)})
    cond = None  # T5's trained part is its projection: model.ProjectedCondition has the same state
    if cfg.conditioner == "lut":
        cond = text.build_conditioner("lut", cfg.dim, lut_tokenizer=cfg.lut_tokenizer, lut_dim=cfg.lut_dim,
                                      lut_layers=cfg.lut_layers)
    live = lm.MusicGenLM(lm_cfg, cond).state_dict()
    best = {k: v + 0.05 * torch.randn_like(v) for k, v in live.items() if v.is_floating_point()}
    torch.save({"model": live, "best_state": best, "ema": {"state": live, "count": 1.0}, "config": config},
               d / "checkpoint.pt")
    return d
