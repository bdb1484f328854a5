"""Helpers for the tests: small configs and conditions, and a generation loop without cache or batching
(test_model.py); a run directory as train.py leaves it (test_generate.py, test_bad_inputs.py). The transformers
reference lives in bench.py (transformers_reference, transformers_cache), the AudioCraft -> transformers names in
formats.py."""
import json
from pathlib import Path

import torch

import model as lm


def tiny_config(**overrides):
    base = dict(dim=64, n_layers=2, n_heads=4, card=48, text_dim=16, cfg_dropout=0.3)
    base.update(overrides)
    return lm.LMConfig(**base)


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return lm.MusicGenLM(tiny_config(**overrides)).eval()


def random_codes(B, K, T, card, seed=1):
    return torch.randint(0, card, (B, K, T), generator=torch.Generator().manual_seed(seed))


def random_condition(B=2, L=5, dim=64, seed=0):
    """condition [B, L, dim] zeroed where masked (as conditioners return it), mask [B, L] with padding in row 1."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1:, L // 2 + 1:] = False
    return torch.randn(B, L, dim, generator=g) * mask[..., None], mask


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
TINY_RUN = [str(Path(__file__).resolve().parents[1] / "config/debug.py"), "--dim=32", "--n_layers=2", "--n_heads=2",
            "--lut_dim=32", "--segment_duration=0.5"]


def make_run(runs, args=TINY_RUN, seed=0):
    """A run directory as train.py leaves it (config.json, checkpoint.pt with model, ema and best_state), with
    random weights; best_state differs from the live weights so that using the wrong one shows."""
    import train
    cfg = train.parse_args(list(args))
    sig = train.config_signature(cfg)
    d = runs / "xps" / sig
    d.mkdir(parents=True)
    config = {**train.config_dict(cfg), "signature": sig}
    (d / "config.json").write_text(json.dumps(config))
    torch.manual_seed(seed)
    # T5's trained part is its projection: with_t5=False (model.ProjectedCondition) has the same state
    live = lm.build_lm(config, with_t5=False).state_dict()
    best = {k: v + 0.05 * torch.randn_like(v) for k, v in live.items() if v.is_floating_point()}
    torch.save({"model": live, "best_state": best, "ema": {"state": live, "count": 1.0}, "config": config},
               d / "checkpoint.pt")
    return d
