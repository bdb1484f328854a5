"""bench.py: each mode runs on tiny shapes in seconds and prints its table, ours beside the reference. A smoke test of
the benchmark's plumbing (same weights, same work, parsed rows), not a timing."""
import sys

import pytest
import torch

import bench
import demo
import env
import model as lm

torch.set_num_threads(1)
TINY = ["--size=debug", "--repeats=1", "--threads=1"]   # one thread: no barrier stalls on a shared machine


def run(capsys, *argv):
    assert bench.main(list(argv)) == 0
    return capsys.readouterr().out


def table(out):
    """The printed markdown table -> {first cell: {column: cell}}, and the notes above it."""
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells))
    notes = [line[2:] for line in out.splitlines() if line.startswith("- ")]
    return rows, notes


def number(cell):
    """'1.23k (1.1k-1.3k)' -> 1230.0"""
    value = cell.split()[0].rstrip("x%")
    scale = {"k": 1e3, "M": 1e6, "G": 1e9}.get(value[-1], 1)
    return float(value.rstrip("kMG")) * scale


def test_train_table_compares_the_same_update_with_transformers(capsys):
    out = run(capsys, "train", *TINY, "--batch_size=2", "--seconds=0.2", "--text_len=4")
    rows, notes = table(out)
    assert set(rows) == {"ours", "transformers", "ratio (transformers time / ours)"}
    # the same weights and batch: the first losses agree, so both did the same computation
    assert abs(number(rows["ours"]["first loss"]) - number(rows["transformers"]["first loss"])) < 1e-3
    for name in ("ours", "transformers"):
        assert abs(number(rows[name]["tokens/s"]) / number(rows[name]["frames/s"]) - 4) < 0.05   # 4 codebooks
        assert 0 < number(rows[name]["MFU"]) < 100
        assert number(rows[name]["peak memory"]) > 0
    assert number(rows["ratio (transformers time / ours)"]["update wall s"]) > 0
    assert any("REDUCED CPU SHAPES: batch 2 x 0.2 s" in n and "10 frames" in n for n in notes)
    assert any("load average" in n for n in notes)


def test_generate_table_reports_steps_and_real_time(capsys):
    out = run(capsys, "generate", *TINY, "--seconds=0.2", "--text_len=4")
    rows, notes = table(out)
    assert set(rows) == {"ours", "transformers", "ratio (transformers time / ours)"}
    for name in ("ours", "transformers"):
        steps, wall = number(rows[name]["steps/s"]), number(rows[name]["wall s"])
        assert abs(steps * wall - 13) < 0.1 * 13          # 10 frames + 3 delay steps
        assert abs(number(rows[name]["real time"]) - 0.2 / wall) < 0.05 * 0.2 / wall
    assert any("13 decode steps" in n and "CFG coef 3" in n for n in notes)


def test_codec_table_compares_identical_codecs(capsys):
    out = run(capsys, "codec", *TINY, "--seconds=0.1")
    rows, notes = table(out)
    assert set(rows) == {f"{w}: {name}" for w in ("encode", "decode")
                         for name in ("ours", "transformers", "ratio (transformers time / ours)")}
    assert any("codes equal to transformers': 100.00%" in n for n in notes)
    assert number(rows["encode: ours"]["real time"]) > 0


def test_data_table_sets_loaders_against_the_train_step(capsys, tmp_path):
    root = demo.make_demo_set(tmp_path / "demo", sizes={"train": 6, "valid": 1, "evaluate": 1, "generate": 1})
    out = run(capsys, "data", *TINY, "--batch_size=2", "--seconds=1", f"--dataset={root}",
              f"--cache_dir={tmp_path / 'cache'}", "--num_workers=0")
    rows, notes = table(out)
    need = number(rows["train step consumes (debug model, float32)"]["segments/s"])
    cached = number(rows["loader, token cache"]["segments/s"])
    assert need > 0 and cached > 0 and number(rows["loader, raw audio"]["segments/s"]) > 0
    headroom = next(n for n in notes if n.startswith("headroom: token cache"))
    assert abs(float(headroom.split()[3].rstrip("x,")) / (cached / need) - 1) < 0.05   # printed rates: 3 digits


def test_bad_options_are_one_line_errors(capsys, monkeypatch):
    for argv, message in [(["train", "--sise=small"], "did you mean --size?"),
                          (["train", "--size=huge"], "--size=huge: one of debug"),
                          (["train", "--batch_size=two"], "--batch_size=two: expected an integer"),
                          (["train", "--device=gpu"], "--device=gpu: not a torch device"),
                          (["fly"], "usage: python bench.py train|generate|codec|data")]:
        monkeypatch.setattr(sys, "argv", ["bench.py", *argv])
        with pytest.raises(SystemExit) as exit_:
            env.cli(bench.main)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1


def test_static_decode_path_computes_what_the_eager_path_does():
    """The two ways generate runs a step: eager over the cache's written prefix, and static shapes over the whole
    cache under a mask (what a compiled, CUDA-graph step gets, selected by model.compile_decode)."""
    torch.manual_seed(0)
    model = lm.MusicGenLM(lm.LMConfig(**{**bench.SIZES["debug"], "n_layers": 2})).eval()
    condition, mask = torch.randn(2, 5, 128), torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    with torch.no_grad():
        cache, _ = model._start_cache(condition, mask, torch.full((2, 4, 1), 256), 20)
        for position in range(1, 8):
            tokens, pos = torch.randint(0, 256, (2, 4, 1)), torch.tensor([position])
            static = model.decode_step(tokens, pos, cache)
            eager = model.decode_step(tokens, pos, cache, n_keys=position + 1)
            assert (static - eager).abs().max() < 1e-5
    eager = model.generate(condition, mask, 12, greedy=True)
    model.compiled_step = model.sample_step          # what compile_decode sets, uncompiled: the static path
    assert torch.equal(model.generate(condition, mask, 12, greedy=True), eager)
