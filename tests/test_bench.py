"""bench.py: each mode runs on tiny shapes in seconds and prints its table, ours beside the reference. A smoke test of
the benchmark's plumbing (same weights, same work, parsed rows), not a timing."""
import sys
import time

import pytest
import torch

import bench
import demo
import env
import model as lm
import quantize

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
                          (["generate", "--quantize=int3"], "--quantize=int3: one of int8, int4"),
                          (["generate", "--quantize=int8,int4"], "--quantize=int8,int4: one of int8, int4"),
                          (["train", "--size=small,medium"], "--size=small,medium: one of debug"),
                          (["memory", "--size=small,huge"], "--size=small,huge: one of debug, small, medium, large "
                                                            "(a comma list)"),
                          (["suite", "--parts=train,gpu"], "--parts=train,gpu: a comma list of checks, train"),
                          (["fly"], "usage: python bench.py train|generate|codec|data|quality|memory|suite")]:
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
        cache, _ = model._start_cache(model._conditions(condition, mask), torch.full((2, 4, 1), 256), 20)
        for position in range(1, 8):
            tokens, pos = torch.randint(0, 256, (2, 4, 1)), torch.tensor([position])
            static = model.decode_step(tokens, pos, cache)
            eager = model.decode_step(tokens, pos, cache, n_keys=position + 1)
            assert (static - eager).abs().max() < 1e-5
    eager = model.generate(condition, mask, 12, greedy=True)
    model.compiled_step = model.sample_step          # what compile_decode sets, uncompiled: the static path
    assert torch.equal(model.generate(condition, mask, 12, greedy=True), eager)


def test_generate_with_quantized_weights_reports_fewer_bytes(capsys):
    out = run(capsys, "generate", *TINY, "--seconds=0.2", "--text_len=4", "--quantize=int8")
    rows, notes = table(out)
    assert set(rows) == {"ours", "transformers", "ratio (transformers time / ours)"}
    quantized = next(n for n in notes if n.startswith("ours: weights quantized to int8"))
    read = number(quantized.split(", ")[1].split("B read")[0])
    # int8 weights with float32 scales: a quarter of the float model's bytes, and a little more
    assert 0.25 < read / quantize.weight_bytes(lm.build_lm(bench.SIZES["debug"], with_t5=False)) < 0.27


def test_quality_table_compares_float_and_quantized_greedy_decoding(capsys):
    out = run(capsys, "quality", *TINY, "--seconds=0.4", "--text_len=4")
    rows, notes = table(out)
    assert set(rows) == {"float32", "bfloat16 (not quantized)", "int8", "int4 (groups of 32)"}
    size = {name: number(row["bytes per step"].rstrip("B")) for name, row in rows.items()}
    assert abs(size["float32"] / size["bfloat16 (not quantized)"] - 2) < 0.01 and size["int8"] < size["float32"] / 3.5
    for name in ("bfloat16 (not quantized)", "int8", "int4 (groups of 32)"):
        assert 0 < number(rows[name]["greedy agreement"]) <= 100
        assert 0 < number(rows[name]["top-1 (teacher-forced)"]) <= 100
    assert number(rows["int8"]["max logits error per step"]) < number(rows["int4 (groups of 32)"][
        "max logits error per step"])


def test_memory_table_extrapolates_and_checks_against_a_full_shape(capsys):
    """On a CPU: fits over 2-4 layers at the full width and segment, evaluated at the size's layers, which --check
    measures too (the debug model has 4: the check pins the plumbing; BENCHMARKS.md has the small model's)."""
    out = run(capsys, "memory", "--size=debug", "--threads=1", "--seconds=4", "--check")
    rows = [line.strip("|").split("|") for line in out.splitlines() if line.startswith("| debug")]
    peaks = {cells[1].strip(): float(cells[5]) for cells in rows}
    assert list(peaks) == list(bench.MEMORY_SETUPS)
    full, ckpt, adapted = peaks.values()
    assert full > ckpt > adapted > 0
    for cells in rows:
        fit = float(cells[7].split("fit within ")[1].split("%")[0])
        off = float(cells[7].split("GiB (")[1].split("%")[0])
        assert fit < 1 and abs(off) < 1    # the fit against the measured full shape
        assert float(cells[6]) > float(cells[5])   # EMA on the device: 4 more bytes per trained parameter


def test_suite_runs_every_part_at_reduced_shapes_on_a_cpu(capsys, tmp_path):
    """The GPU suite's code, end to end at CPU shapes: every part leaves its rows, no check fails, and --out holds
    the table that was printed."""
    out = run(capsys, "suite", "--device=cpu", "--threads=1", f"--out={tmp_path / 'suite.md'}")
    text = out[out.index("**bench suite**"):]
    assert text.strip() == (tmp_path / "suite.md").read_text().strip()
    lines = [line for line in text.splitlines() if line.startswith("| ")][1:]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert {r[0] for r in rows} == set(bench.SUITE_PARTS)
    assert not [r for r in rows if "FAILED" in r[6] or "skipped" in r[6]], rows
    checks = [r for r in rows if r[0] == "checks"]
    assert len(checks) == 5 and all(r[6].startswith("ok") for r in checks if r[5] != "0")
    assert any(r[1].startswith("first loss") and r[6] == "ok" for r in rows)
    assert "Seconds per part: checks" in text


def test_suite_keeps_the_table_when_a_part_fails_or_runs_out_of_time(capsys, monkeypatch):
    def broken(a, ctx, add):
        raise RuntimeError("the codec broke")

    def slow(a, ctx, add):
        add(["loader", "a row before the time ran out", "1", "", "", "", ""])
        time.sleep(30)

    monkeypatch.setattr(bench, "suite_codec", broken)
    monkeypatch.setattr(bench, "suite_loader", slow)
    t0 = time.time()
    out = run(capsys, "suite", "--device=cpu", "--parts=codec,loader,memory", "--budget=11")
    assert time.time() - t0 < 25
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("| ")]
    results = {(r[0], r[1]): r[6] for r in rows[1:]}
    assert results[("codec", "")] .startswith("FAILED after 0 s: RuntimeError: the codec broke")
    assert results[("loader", "a row before the time ran out")] == ""
    assert "TimeBox: time box of" in results[("loader", "")]
    assert results[("memory", "")].startswith("skipped: the budget of 11 s is spent")
