"""adapters.py and fine-tuning: low-rank adapters that start as the base and fold into it, freezing, activation
checkpointing, adapter checkpoints that name their base, and exact resume."""
import signal

import pytest
import torch

import adapters
import formats
import model as lm_lib
import train
from env import UserError
from test_train import TINY, final_weights, only_run_dir, run, wait_for_log
from test_train import dataset  # noqa: F401 (the shared demo set fixture)


def tiny_lm(seed=0, **overrides):
    torch.manual_seed(seed)
    settings = dict(dim=32, n_layers=2, n_heads=2, card=16, n_q=2, text_dim=8, conditioner="lut",
                    lut_tokenizer="bytes", lut_dim=8, cfg_dropout=0.0, word_dropout=0.0, **overrides)
    return lm_lib.build_lm(settings)


def batch(lm, B=2, T=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, lm.cfg.card, (B, lm.cfg.n_q, T), generator=g)
    return codes, ["a bright major tune", "slow low minor"]


def loss(lm, codes, texts):
    condition, mask = lm.conditioner(texts)
    return lm.compute_loss(codes, condition, mask)[0]


ALL = ("in_proj", "out_proj", "ffn", "heads", "emb", "cond")


def test_fresh_adapters_change_nothing_and_keep_the_base_names():
    lm = tiny_lm()
    codes, texts = batch(lm)
    names, before = set(lm.state_dict()), loss(lm, codes, texts)
    added = adapters.add(lm, rank=4, targets=ALL)
    assert set(lm.state_dict()) - set(added) == names          # base keys untouched, adapters are new keys
    assert all(".lora_" in k for k in added) and len(added) == 2 * (2 * 2 * 3 + 2 + 2 + 1)  # (a, b) per adapter
    assert torch.equal(loss(lm, codes, texts), before)         # B starts at zero


def test_only_the_adapters_and_train_also_change_in_an_update():
    lm = tiny_lm()
    adapters.add(lm, rank=4, targets=("in_proj", "out_proj", "ffn"), train_also=("linears",))
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-2)
    codes, texts = batch(lm)
    for _ in range(2):   # B moves in the first update, A (its gradient is B^T ...) in the second
        opt.zero_grad()
        loss(lm, codes, texts).backward()
        opt.step()
    changed = {k for k, v in lm.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".lora_" in k or k.startswith("linears.") for k in changed), sorted(changed)
    assert any(k.startswith("linears.") for k in changed) and any(".lora_" in k and k.endswith(".a") for k in changed)


@pytest.mark.parametrize("targets", [("in_proj", "out_proj"), ALL])
def test_merged_model_computes_what_the_adapted_one_does(targets):
    lm = tiny_lm(fuse="cross")
    adapters.add(lm, rank=4, alpha=8.0, targets=targets)
    with torch.no_grad():
        for k, p in lm.named_parameters():
            if ".lora_" in k:
                p.normal_(0, 0.1)   # a trained adapter: B nonzero
    codes, texts = batch(lm)
    lm.eval()
    condition, mask = lm.conditioner(texts)
    adapted = lm.compute_predictions(codes, condition, mask)[0]
    greedy = lm.generate(condition, mask, 6, greedy=True)
    names = {k for k in lm.state_dict() if ".lora_" not in k}
    adapters.merge(lm)
    assert set(lm.state_dict()) == names                      # a plain model again: AudioCraft's names only
    condition, mask = lm.conditioner(texts)
    merged = lm.compute_predictions(codes, condition, mask)[0]
    assert torch.allclose(adapted.nan_to_num(), merged.nan_to_num(), atol=1e-5)
    assert torch.equal(lm.generate(condition, mask, 6, greedy=True), greedy)


def test_unknown_targets_and_train_also_are_one_line():
    with pytest.raises(UserError, match=r"lora_targets=\['attn'\]: choose from in_proj"):
        adapters.add(tiny_lm(), rank=2, targets=("attn",))
    with pytest.raises(UserError, match=r"train_also=\['heads'\]: no parameter name contains 'heads'"):
        adapters.add(tiny_lm(), rank=2, train_also=("heads",))


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    grads = []
    for checkpointing in (False, True):
        lm = tiny_lm(dropout=0.0)
        cfg = train.Config(checkpointing=checkpointing)
        step = train.TrainStep(lm)
        train.parallelize(step, cfg, train.Dist())
        step.eval()   # no CFG dropout: the same descriptions both times
        codes, texts = batch(lm)
        ce, _ = step(codes, texts, torch.ones(2, codes.shape[-1], dtype=torch.bool))
        ce.backward()
        grads.append((ce.detach(), {k: p.grad.clone() for k, p in lm.named_parameters() if p.grad is not None}))
    (ce0, g0), (ce1, g1) = grads
    assert torch.equal(ce0, ce1) and g0.keys() == g1.keys() and len(g0) > 10
    for k in g0:
        torch.testing.assert_close(g0[k], g1[k], rtol=0, atol=1e-6)


# ---- adapter runs end to end

LORA = TINY + ["--lora_rank=4", "--lora_targets=in_proj,out_proj,ffn", "--epochs=2"]


@pytest.fixture()
def base(tmp_path):
    """An AudioCraft export of the tiny model's shape: the base the adapters fine-tune."""
    cfg = train.parse_args(TINY)
    torch.manual_seed(3)
    lm = lm_lib.build_lm(train.config_dict(cfg))
    return formats.export_audiocraft_lm(lm, train.lm_config(cfg), tmp_path / "base" / "state_dict.bin")


def test_an_adapter_checkpoint_holds_the_adapters_names_its_base_and_refuses_a_changed_one(tmp_path, dataset,  # noqa: F811
                                                                                           base):
    args = LORA + [f"--continue_from={base}", "--updates_per_epoch=400", "--log_every=20"]
    proc = run(args, tmp_path, dataset, wait=False)
    wait_for_log(tmp_path, "epoch 1 step 20/400", proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == train.EXIT_REQUEUE
    ckpt = final_weights(tmp_path)
    assert ckpt["base"]["source"] == str(base) and len(ckpt["base"]["hash"]) == 32
    assert ckpt["model"] and all(".lora_" in k for k in ckpt["model"]), sorted(ckpt["model"])[:4]
    assert set(ckpt["ema"]["state"]) == set(ckpt["model"]) == set(ckpt["optimizer"]["state"])
    size = (only_run_dir(tmp_path) / "checkpoint.pt").stat().st_size
    assert size < base.stat().st_size, "adapters, their EMA and moments: smaller than the base weights alone"
    pkg = torch.load(base, weights_only=True)    # the base changes under the adapters: refused, nothing trains
    pkg["best_state"]["out_norm.weight"] = pkg["best_state"]["out_norm.weight"] + 1
    torch.save(pkg, base)
    bad = run(args, tmp_path, dataset)
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert "the base weights changed since the adapters were trained on them" in bad.stderr, bad.stderr


def test_an_adapter_run_resumes_exactly(tmp_path, dataset, base):  # noqa: F811
    args = LORA + [f"--continue_from={base}", "--updates_per_epoch=4"]
    straight = run(args, tmp_path / "a", dataset)
    assert straight.returncode == 0, straight.stdout + straight.stderr
    proc = run(args, tmp_path / "b", dataset, wait=False)
    wait_for_log(tmp_path / "b", "epoch 1 step 2/4", proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == train.EXIT_REQUEUE
    resumed = run(args, tmp_path / "b", dataset)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    for part in ("model", "best_state"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k}"
    for k in a["ema"]["state"]:
        assert torch.equal(a["ema"]["state"][k], b["ema"]["state"][k])


def test_kept_copies_can_be_weights_only_and_bounded(tmp_path, dataset):  # noqa: F811
    r = run(TINY + ["--epochs=3", "--updates_per_epoch=2", "--keep_last=2", "--keep_weights_only=True"], tmp_path,
            dataset)
    assert r.returncode == 0, r.stdout + r.stderr
    d = only_run_dir(tmp_path)
    assert sorted(p.name for p in d.glob("checkpoint_*.pt")) == ["checkpoint_2.pt", "checkpoint_3.pt"]
    kept = torch.load(d / "checkpoint_3.pt", weights_only=True)
    assert kept["weights_only"] and "optimizer" not in kept and kept["model"] and kept["best_state"]
    assert "optimizer" in torch.load(d / "checkpoint.pt", weights_only=True)   # the resume point stays complete


def test_adapters_train_under_fsdp_and_ddp_with_two_processes(tmp_path, dataset, base):  # noqa: F811
    from test_train import run_two
    for parallel in ("fsdp", "ddp"):
        args = LORA + [f"--continue_from={base}", f"--parallel={parallel}", "--epochs=1", "--updates_per_epoch=2",
                       "--generate_every=1", "--generate_duration=0.2"]
        procs, outs = run_two(args, tmp_path / parallel, dataset)
        assert [p.returncode for p in procs] == [0, 0], outs
        ckpt = final_weights(tmp_path / parallel)
        assert all(".lora_" in k for k in ckpt["model"]) and [r["stage"] for r in ckpt["history"]] == \
            ["train", "valid", "generate"] and "error" not in ckpt["history"][-1], ckpt["history"]


def test_an_adapter_run_samples_and_exports_merged_and_exports_its_adapters_alone(tmp_path, dataset, base):  # noqa: F811
    """generate.py --run on an adapter run folds the adapters into the base it names; the AudioCraft export is that
    merged model (it loads with formats.load_audiocraft_lm: the same logits); --format=adapters writes them alone."""
    import subprocess
    import sys
    from test_train import ROOT
    r = run(LORA + [f"--continue_from={base}", "--epochs=1", "--lr=3e-2"], tmp_path / "runs", dataset)
    assert r.returncode == 0, r.stdout + r.stderr
    d = only_run_dir(tmp_path / "runs")
    mg = formats.load(str(d))
    assert set(mg.lm.state_dict()) == set(formats.read_lm_state(str(base))[0])   # merged: the base's names only
    base_weights = formats.read_lm_state(str(base))[0]
    assert not torch.equal(mg.lm.state_dict()["transformer.layers.0.linear1.weight"],
                           base_weights["transformer.layers.0.linear1.weight"])   # the adapters moved it
    for fmt, name in (("audiocraft", "state_dict.bin"), ("adapters", "adapters.pt")):
        e = subprocess.run([sys.executable, str(ROOT / "generate.py"), "export", str(d), str(tmp_path / fmt),
                            f"--format={fmt}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert e.returncode == 0 and (tmp_path / fmt / name).is_file(), e.stdout + e.stderr
    exported = formats.load_audiocraft_lm(tmp_path / "audiocraft" / "state_dict.bin")[0]
    cond = torch.randn(2, 3, exported.cfg.dim)
    codes = torch.randint(0, exported.cfg.card, (2, exported.cfg.n_q, 9))
    mask = torch.ones(2, 3, dtype=torch.bool)
    mg.lm.eval()
    assert torch.allclose(exported.compute_predictions(codes, cond, mask)[0].nan_to_num(),
                          mg.lm.compute_predictions(codes, cond, mask)[0].nan_to_num(), atol=1e-5)
    pkg = torch.load(tmp_path / "adapters" / "adapters.pt", weights_only=True)
    assert pkg["base"]["source"] == str(base) and all(".lora_" in k for k in pkg["adapters"])
    assert (tmp_path / "adapters" / "adapters.pt").stat().st_size < base.stat().st_size
