"""model.py: patterns, AudioCraft weight layout, parity with transformers' MusicGen, loss, generation, checkpoints.

    python -m pytest tests/test_model.py -q --durations=5
"""
import math

import pytest
import torch
import torch.nn.functional as F

import model as lm
from env import UserError
from _model_util import generate_by_recompute, make_model, random_codes, random_condition, tiny_config
from bench import transformers_cache, transformers_reference


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: one thread is fastest, and on a shared, busy machine two threads made single
    steps 100x slower (OpenMP waiting on a descheduled sibling). Pinned, so results do not depend on it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


PATTERN_CASES = [("delay", ()), ("delay", (0, 0, 1, 1)), ("delay", (0, 2, 2, 5)), ("parallel", ()), ("unroll", ()),
                 ("unroll", (0, 1, 1, 3)), ("coarse_first", ()), ("coarse_first", (0, 1, 2)), ("musiclm", ())]


# ---- codebook patterns

def test_delay_pattern_matches_audiocraft_example():
    # AudioCraft's documented T=6, K=4 training sequence (codes numbered 10*q + t) and prediction mask
    codes = (torch.arange(4)[:, None] * 10 + torch.arange(6)[None, :])[None]
    tables = lm.pattern_tables("delay", 4, (0, 1, 2, 3), 6, True)
    S = 99
    expected = torch.tensor([[S, 0, 1, 2, 3, 4, 5],
                             [S, S, 10, 11, 12, 13, 14],
                             [S, S, S, 20, 21, 22, 23],
                             [S, S, S, S, 30, 31, 32]])
    assert torch.equal(lm.build_sequence(codes, tables, S)[0], expected)
    assert tables.out_mask.sum(1).tolist() == [6, 5, 4, 3]
    full = lm.pattern_tables("delay", 4, (0, 1, 2, 3), 6, False)
    assert full.S == 6 + 4     # generation runs over T + max_delay + 1 steps


@pytest.mark.parametrize("pattern,delays", PATTERN_CASES)
def test_pattern_round_trip(pattern, delays):
    for T in (1, 2, 5, 11):
        codes = random_codes(2, 4, T, 50, seed=T)
        full = lm.pattern_tables(pattern, 4, lm.pattern_delays(pattern, 4, delays), T, False)
        sequence = lm.build_sequence(codes, full, 99)
        assert (sequence[..., 0] == 99).all()                      # step 0: the all-special start
        assert (sequence != 99).sum() == codes.numel()            # every code placed exactly once
        assert torch.equal(lm.revert_sequence(sequence, full, -1), codes)
        valid = lm.pattern_tables(pattern, 4, lm.pattern_delays(pattern, 4, delays), T, True)
        back = lm.revert_sequence(lm.build_sequence(codes, valid, 99), valid, -1)
        present = back != -1
        assert torch.equal(back[present], codes[present])


@pytest.mark.parametrize("pattern,delays", PATTERN_CASES)
def test_each_output_predicts_the_next_step(pattern, delays):
    # the logits reverted for code (t, q) come from output s, and code (t, q) sits at input step s + 1:
    # predicted from inputs 0..s only, never from itself
    T = 7
    codes = random_codes(1, 4, T, 50)
    tables = lm.pattern_tables(pattern, 4, lm.pattern_delays(pattern, 4, delays), T, True)
    sequence = lm.build_sequence(codes, tables, 99)[0]                       # [K, S]
    position = torch.arange(tables.S, dtype=torch.float32)
    fake = position[None, None, :, None].expand(1, 4, -1, 1)                 # "logits" = output position
    s, mask = lm.revert_logits(fake.contiguous(), tables)
    s = s[0, ..., 0]
    assert mask.any()
    for q in range(4):
        for t in range(T):
            if mask[q, t]:
                assert sequence[q, int(s[q, t]) + 1] == codes[0, q, t]
            else:
                assert math.isnan(s[q, t])


def test_delay_training_mask_has_t_minus_delay_targets():
    T = 9
    for delays in ((0, 1, 2, 3), (0, 0, 1, 1)):
        model = make_model(delays=delays)
        cond, mask = random_condition()
        logits, pred_mask = model.compute_predictions(random_codes(2, 4, T, 48), cond, mask)
        assert pred_mask.shape == (2, 4, T) and logits.shape == (2, 4, T, 48)
        assert pred_mask.sum(-1)[0].tolist() == [T - d for d in delays]
        assert torch.equal(pred_mask[:, :, :T - max(delays)], torch.ones(2, 4, T - max(delays), dtype=torch.bool))
        assert torch.isnan(logits[~pred_mask]).all() and torch.isfinite(logits[pred_mask]).all()


# ---- AudioCraft layout and init

def test_state_dict_matches_musicgen_small():
    with torch.device("meta"):
        model = lm.MusicGenLM(lm.LMConfig())
    sd = model.state_dict()
    assert len(sd) == 300 and lm.num_params(model) == 420_371_456
    shapes = {"condition_provider.conditioners.description.output_proj.weight": (1024, 768),
              "condition_provider.conditioners.description.output_proj.bias": (1024,),
              "emb.3.weight": (2049, 1024), "transformer.layers.23.self_attn.in_proj_weight": (3072, 1024),
              "transformer.layers.0.self_attn.out_proj.weight": (1024, 1024),
              "transformer.layers.0.linear1.weight": (4096, 1024), "transformer.layers.0.linear2.weight": (1024, 4096),
              "transformer.layers.5.cross_attention.in_proj_weight": (3072, 1024),
              "transformer.layers.5.cross_attention.out_proj.weight": (1024, 1024),
              "transformer.layers.5.norm_cross.bias": (1024,), "out_norm.weight": (1024,),
              "linears.0.weight": (2048, 1024)}
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key
    assert list(sd)[:2] == list(shapes)[:2]          # AudioCraft's order: conditioner first
    for d, L, n in ((1536, 48, 1_838_737_920), (2048, 48, 3_256_956_928)):
        assert L * (16 * d * d + 6 * d) + 4 * 2049 * d + 4 * 2048 * d + 2 * d + 768 * d + d == n
    with torch.device("meta"):
        prepend = lm.MusicGenLM(lm.LMConfig(n_layers=2, fuse="prepend"))
    assert not any("cross" in k for k in prepend.state_dict())


def test_init_follows_audiocraft():
    torch.manual_seed(0)
    model = lm.MusicGenLM(lm.LMConfig(dim=256, n_layers=2, n_heads=4, card=1024, text_dim=32))
    d = 256
    def close(w, std):   # truncating at 3 std shrinks the std by 1.3%
        assert abs(w.std().item() / (0.987 * std) - 1) < 0.05 and w.abs().max().item() <= 3 * std * 1.0001
    close(model.emb[0].weight, d ** -0.5)
    close(model.linears[1].weight, d ** -0.5)
    close(model.transformer.layers[0].linear1.weight, d ** -0.5 / math.sqrt(2))
    close(model.transformer.layers[1].linear2.weight, (4 * d) ** -0.5 / math.sqrt(4))
    close(model.transformer.layers[1].cross_attention.out_proj.weight, d ** -0.5 / math.sqrt(4))
    w = model.transformer.layers[0].self_attn.in_proj_weight      # nn.Linear's default uniform, untouched
    assert w.abs().max().item() <= d ** -0.5 and abs(w.std().item() / (d ** -0.5 / math.sqrt(3)) - 1) < 0.05


# ---- parity with transformers' MusicgenForCausalLM

def test_logits_match_transformers():
    model = make_model()
    hf = transformers_reference(model)
    T = 12
    codes = random_codes(2, 4, T, 48)
    cond, mask = random_condition()
    tables = model._tables(T, True, "cpu")
    sequence = lm.build_sequence(codes, tables, 48)
    with torch.no_grad():
        ours = model(sequence, cond, mask)
        theirs = hf(input_ids=sequence.reshape(-1, tables.S), encoder_hidden_states=cond).logits
        theirs = theirs.view(2, 4, tables.S, 48)
        assert (ours - theirs).abs().max() < 1e-5
        aligned, pred_mask = model.compute_predictions(codes, cond, mask)
    for q in range(4):   # code (t, q) is predicted by the output at t + q
        assert torch.allclose(aligned[:, q, :T - q], theirs[:, q, q:T], atol=1e-5, rtol=0)


@pytest.mark.parametrize("cfg_coef", [3.0, 1.0])
def test_greedy_generation_matches_transformers(cfg_coef):
    model = make_model()
    hf = transformers_reference(model)
    cond, mask = random_condition()
    n = 10
    ours = model.generate(cond, mask, n, cfg_coef=cfg_coef, greedy=True)
    memory = torch.cat([cond, torch.zeros_like(cond)]) if cfg_coef != 1.0 else cond
    # transformers 5 pitfalls: its default attention mask hides the all-pad start step (pad = start token), and
    # its default cache is one plain cache shared by self- and cross-attention: pass both explicitly
    with torch.no_grad():
        theirs = hf.generate(input_ids=torch.full((8, 1), 48), attention_mask=torch.ones(8, 1, dtype=torch.long),
                             encoder_hidden_states=memory, guidance_scale=cfg_coef if cfg_coef != 1.0 else None,
                             do_sample=False, max_length=n + 4,
                             **transformers_cache())
    assert theirs.shape == ours.shape == (2, 4, n)
    assert torch.equal(ours, theirs)


# ---- generation

@pytest.mark.parametrize("overrides,prompt_len", [
    ({}, 3),
    ({"mask_memory": True}, 0),
    ({"fuse": "prepend", "mask_memory": True}, 2),
    ({"fuse": "prepend"}, 0),
    ({"fuse": "sum"}, 1),
    ({"pattern": "unroll"}, 2),
    ({"pattern": "coarse_first", "delays": (0, 1, 1)}, 0),
    ({"delays": (0, 0, 1, 1)}, 2),
])
def test_cached_generation_matches_recompute(overrides, prompt_len):
    model = make_model(**overrides)
    cond, mask = random_condition()
    n = 7
    prompt = random_codes(2, 4, prompt_len, 48) if prompt_len else None
    ours = model.generate(cond, mask, n, cfg_coef=3.0, greedy=True, prompt=prompt)
    slow = generate_by_recompute(model, cond, mask, n, 3.0, prompt)
    assert torch.equal(ours, slow)
    if prompt is not None:
        assert torch.equal(ours[..., :prompt_len], prompt)
    unconditional = model.generate(None, None, n, greedy=True, prompt=prompt)
    assert unconditional.shape == (1 if prompt is None else 2, 4, n)


def test_sampling_rules():
    model = make_model()
    cond, mask = random_condition()
    greedy = model.generate(cond, mask, 8, greedy=True)
    assert torch.equal(model.generate(cond, mask, 8, top_k=1), greedy)
    assert torch.equal(model.generate(cond, mask, 8, top_p=1e-6, top_k=0), greedy)
    a = model.generate(cond, mask, 8, generator=torch.Generator().manual_seed(3))
    b = model.generate(cond, mask, 8, generator=torch.Generator().manual_seed(3))
    c = model.generate(cond, mask, 8, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the sampler itself: top-k keeps the k most likely, in proportion
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 3.0]).expand(20000, 5)
    g = torch.Generator().manual_seed(0)
    drawn = lm.sample_next(logits, top_k=3, generator=g)
    freq = torch.bincount(drawn, minlength=5).float() / len(drawn)
    want = torch.softmax(torch.tensor([2.0, 1.0, 3.0]), 0)
    assert freq[2] == 0 and freq[3] == 0
    assert torch.allclose(freq[[0, 1, 4]], want, atol=0.015)
    drawn = lm.sample_next(logits, top_p=0.7, generator=g)      # the top two cover 0.665 + 0.245 > 0.7
    assert set(drawn.unique().tolist()) == {0, 4}


# ---- loss

def test_loss_ignores_masked_positions():
    model = make_model()
    cond, mask = random_condition()
    T = 10
    codes = random_codes(2, 4, T, 48)
    ce, ce_q = model.compute_loss(codes, cond, mask)
    # AudioCraft's formula from the aligned predictions
    logits, pred_mask = model.compute_predictions(codes, cond, mask)
    want = torch.stack([F.cross_entropy(logits[:, q][pred_mask[:, q]], codes[:, q][pred_mask[:, q]])
                        for q in range(4)])
    assert torch.allclose(ce_q, want, atol=1e-5) and torch.allclose(ce, want.mean(), atol=1e-5)
    # codes (t >= T - q, q) are no target (and no input): changing them changes nothing
    changed = codes.clone()
    for q in range(1, 4):
        changed[:, q, T - q:] = (changed[:, q, T - q:] + 7) % 48
    assert torch.equal(model.compute_loss(changed, cond, mask)[1], ce_q)
    changed[:, 2, 0] = (changed[:, 2, 0] + 1) % 48                      # a real target: the loss moves
    assert not torch.equal(model.compute_loss(changed, cond, mask)[1], ce_q)
    # padded frames: neither inputs nor targets
    valid = torch.ones(2, T, dtype=torch.bool)
    valid[1, 6:] = False
    ce_v, ce_qv = model.compute_loss(codes, cond, mask, valid)
    padded = codes.clone()
    padded[1, :, 6:] = 3
    assert torch.equal(model.compute_loss(padded, cond, mask, valid)[1], ce_qv)
    special = torch.where(valid[:, None], codes, 48)
    logits, pred_mask = model.compute_predictions(special, cond, mask)
    keep = pred_mask & valid[:, None]
    want = torch.stack([F.cross_entropy(logits[:, q][keep[:, q]], codes[:, q][keep[:, q]]) for q in range(4)])
    assert torch.allclose(ce_qv, want, atol=1e-5)


def test_loss_is_finite_when_a_codebook_has_no_target():
    model = make_model()
    model.train()
    cond, mask = random_condition()
    ce, ce_q = model.compute_loss(random_codes(2, 4, 2, 48), cond, mask)    # T=2: codebooks 2, 3 have none
    ce.backward()
    assert torch.isfinite(ce) and ce_q[2:].eq(0).all() and ce_q[:2].gt(0).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_training_reduces_loss():
    model = make_model(dim=32, n_heads=2, card=16)
    model.train()
    cond, mask = random_condition(dim=32)
    codes = random_codes(2, 4, 12, 16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(25):
        ce, _ = model.compute_loss(codes, cond, mask)
        first = first if first is not None else ce.item()
        opt.zero_grad()
        ce.backward()
        opt.step()
    assert ce.item() < 0.5 * first


@pytest.mark.parametrize("fuse", ["cross", "prepend"])
def test_flops_per_token_matches_counted_flops(fuse):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    model = make_model(fuse=fuse, dim=128, n_heads=4, card=256)
    model.train()
    states, mask = random_condition(L=6, dim=16)
    T = 24
    codes = random_codes(2, 4, T, 256)
    # the math backend spells attention as matmuls, which the counter sees
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        cond, mask = model.conditioner(states, mask)
        model.compute_loss(codes, cond, mask)[0].backward()
    S = T + 1
    predicted = lm.flops_per_token(model.cfg, S, 6) * 2 * S
    assert abs(counter.get_total_flops() / predicted - 1) < 0.01


def test_memory_mask_ignores_padding():
    cond, mask = random_condition(B=1, L=3)
    padded = torch.cat([cond, torch.zeros(1, 4, 64)], 1)
    padded_mask = torch.cat([mask, torch.zeros(1, 4, dtype=torch.bool)], 1)
    codes = random_codes(1, 4, 6, 48)
    for overrides, same in (({"mask_memory": True}, True), ({"fuse": "sum"}, True), ({}, False)):
        model = make_model(**overrides)
        a, m = model.compute_predictions(codes, cond, mask)
        b, _ = model.compute_predictions(codes, padded, padded_mask)
        # AudioCraft (mask_memory=False) attends to zero rows: padding dilutes attention
        assert torch.allclose(a[m], b[m], atol=1e-5) == same, overrides


# ---- CFG dropout

def test_cfg_dropout():
    model = make_model(cfg_dropout=0.5)
    texts = [f"song {i}" for i in range(4000)]
    assert model.cfg_dropout(texts) == texts                            # eval: identity
    model.train()
    torch.manual_seed(0)
    out = model.cfg_dropout(texts)
    torch.manual_seed(0)
    assert model.cfg_dropout(texts) == out                              # the run's RNG reproduces it
    dropped = sum(t is None for t in out) / len(out)
    assert 0.45 < dropped < 0.55
    assert all(t is None or t == s for t, s in zip(out, texts))
    per_batch = make_model(cfg_dropout=0.5, cfg_dropout_per_batch=True).train()
    outcomes = {tuple(t is None for t in per_batch.cfg_dropout(texts[:8])) for _ in range(40)}
    assert outcomes == {(True,) * 8, (False,) * 8}


# ---- settings -> model

def test_build_lm_defaults_are_train_configs():
    """build_lm fills a missing key from LMConfig and text.SETTINGS: they must be train.Config's defaults."""
    import dataclasses
    import formats
    import text
    import train
    config = dataclasses.asdict(train.Config())
    defaults = {**dataclasses.asdict(lm.LMConfig()), **text.SETTINGS}
    assert set(defaults) - set(config) == {"max_period"}                    # no Config key: AudioCraft's 10000
    assert {k: config[k] for k in defaults if k in config} == {k: v for k, v in defaults.items() if k in config}
    assert {k: config[k] for k in formats.SAMPLING_DEFAULTS} == formats.SAMPLING_DEFAULTS


def test_build_lm_builds_the_conditioner_the_settings_name(tmp_path):
    import text
    small = {"dim": 64, "n_layers": 1, "n_heads": 4, "card": 48, "text_dim": 16, "delays": [0, 1, 2, 3]}
    torch.manual_seed(0)
    lut = lm.build_lm({**small, "conditioner": "lut", "lut_tokenizer": "words:32", "lut_dim": 16, "epochs": 3})
    assert isinstance(lut.conditioner, text.LUTConditioner) and lut.cfg == tiny_config(n_layers=1, delays=(0, 1, 2, 3))
    assert lut.conditioner.tokenizer.vocab_size == 34 and lut.conditioner.word_dropout == 0.3   # Config's default
    torch.manual_seed(0)   # the same seed, the same weights as assembling it by hand
    by_hand = lm.MusicGenLM(lut.cfg, text.build_conditioner({"conditioner": "lut", "lut_tokenizer": "words:32",
                                                             "lut_dim": 16}, 64))
    assert all(torch.equal(v, by_hand.state_dict()[k]) for k, v in lut.state_dict().items())
    projected = lm.build_lm(small, with_t5=False, meta=True)               # conditioner t5, T5 left out
    assert isinstance(projected.conditioner, lm.ProjectedCondition)
    assert all(p.is_meta for p in projected.parameters())
    with pytest.raises(UserError, match="T5 path .*nope is not a directory"):
        lm.build_lm({**small, "t5_path": str(tmp_path / "nope")})
    with pytest.raises(UserError, match="pattern"):
        lm.build_lm({**small, "pattern": "zigzag"}, with_t5=False)


# ---- bad input

def test_bad_inputs_are_clear_errors():
    model = make_model()
    cond, mask = random_condition()
    codes = random_codes(2, 4, 6, 48)
    cases = [
        (lambda: model.compute_loss(codes.index_fill(2, torch.tensor([4]), 49), cond, mask), r"outside \[0, 48\]"),
        (lambda: model.compute_loss(codes - 1, cond, mask), r"values in \[-1"),
        (lambda: model.compute_predictions(codes[:, :3], cond, mask), "3 codebooks .* n_q=4"),
        (lambda: model.compute_loss(codes.float(), cond, mask), "integer tensor"),
        (lambda: model.compute_loss(codes, torch.zeros(2, 5, 16), mask), "width 16 .* dim is 64 .*conditioner"),
        (lambda: model.compute_loss(codes, cond, mask[:, :3]), "condition_mask"),
        (lambda: model.compute_loss(codes, cond[:1], mask[:1]), "batch 1"),
        (lambda: model.compute_loss(codes, cond, mask, torch.ones(2, 5, dtype=torch.bool)), "valid"),
        (lambda: model.generate(cond, mask, 5, prompt=codes), "must exceed the prompt's 6 frames"),
        (lambda: model.generate(cond, mask, 9, prompt=codes[:, :2]), "prompt: 2 codebooks"),
        (lambda: model.generate(cond, mask, 9, prompt=torch.full((2, 4, 2), 48)), "prompt: values"),
        (lambda: lm.MusicGenLM(tiny_config(pattern="zigzag")), "pattern"),
        (lambda: lm.MusicGenLM(tiny_config(delays=(0, 1))), "2 entries"),
    ]
    for call, message in cases:
        with pytest.raises(UserError, match=message):
            call()
