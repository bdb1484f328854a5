"""Config files, --key=value, coercion, errors, signatures and run directories."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import env
import train
from env import UserError

ROOT = Path(__file__).resolve().parents[1]


def run_train(*args, cwd=ROOT, extra_env=None):
    e = dict(os.environ, **(extra_env or {}))
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, capture_output=True,
                          text=True, env=e, timeout=120)


def test_defaults_are_the_musicgen_small_recipe():
    c = train.Config()
    assert (c.lr, c.betas, c.weight_decay, c.lr_schedule, c.warmup, c.max_norm) == (1e-4, (0.9, 0.95), 0.1, "cosine", 4000, 1.0)
    assert (c.ema_decay, c.ema_every, c.segment_duration, c.batch_size, c.updates_per_epoch) == (0.99, 10, 30.0, 192, 2000)
    assert (c.cfg_dropout, c.word_dropout, c.top_k, c.cfg_coef) == (0.3, 0.3, 250, 3.0)
    assert (c.dim, c.n_layers, c.n_heads, c.n_q, c.card, c.pattern) == (1024, 24, 16, 4, 2048, "delay")
    # AudioCraft's musicgen_base_32khz: "uniform sampling all the way", its text augmentation, segments >= 80% real
    assert (c.sample_on_weight, c.sample_on_duration, c.min_segment_ratio) == (False, False, 0.8)
    assert (c.merge_text_p, c.drop_desc_p, c.keep_field_p, c.epochs, c.save_every) == (0.25, 0.5, 0.5, 500, 50)
    assert (c.generate_every, c.evaluate_every, c.log_every, c.seed, c.decay_matrices_only) == (25, 25, 10, 2036, False)


def test_base_config_spells_out_the_defaults_and_lists_every_difference_from_audiocraft():
    """config/base.py assigns only default values (the same signature as no file) and names each place where the
    defaults differ from AudioCraft's recipe on purpose."""
    assert train.config_signature(train.parse_args(["config/base.py"])) == train.config_signature(train.Config())
    text = (ROOT / "config/base.py").read_text()
    for difference in ("AdamW", "bfloat16", "cfg_dropout_per_batch", "train_on_padding", "generate_duration"):
        assert difference in text, difference


def test_files_apply_left_to_right_then_command_line(tmp_path):
    a = tmp_path / "a.py"
    a.write_text("import math\nbatch_size = 64\nlr = 3e-4\n_helper = 7\n")
    b = tmp_path / "b.py"
    b.write_text("batch_size = batch_size * 2\ndelays = [0, 0, 1, 1]\nn_q = len(delays)\n")
    cfg = train.parse_args([str(a), str(b), "--lr=1", "--compile=false"])
    assert cfg.batch_size == 128 and cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.delays == (0, 0, 1, 1) and cfg.n_q == 4 and cfg.compile is False


@pytest.mark.parametrize("arg, expected", [
    ("--lr=1", 1.0), ("--lr=3e-4", 3e-4), ("--batch_size=64", 64), ("--batch_size=1e3", 1000),
    ("--compile=True", True), ("--compile=false", False), ("--compile=0", False),
    ("--delays=[0,1,2,3]", (0, 1, 2, 3)), ("--delays=0,1,2,3", (0, 1, 2, 3)), ("--dataset=/data/x", "/data/x"),
])
def test_command_line_values_are_coerced_to_the_field_type(arg, expected):
    key = arg[2:].split("=")[0]
    value = getattr(train.parse_args(["--batch_size=192", arg]), key)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("arg, message", [
    ("--lr=abc", "lr='abc' is not a float"),
    ("--batch_size=1.5", "batch_size='1.5' is not an int"),
    ("--compile=maybe", "compile='maybe' is not a bool"),
    ("--delays=zz", "delays='zz' is not a list"),
    ("--batchsize=32", 'unknown key "batchsize" (did you mean "batch_size"?)'),
    ("--lr", '"--lr" must be --key=value'),
    ("--pattern=diagonal", 'pattern="diagonal" is not one of'),
    ("--dim=100", "dim=100 is not a multiple of n_heads=16"),
])
def test_bad_command_line_is_a_one_line_error(arg, message):
    with pytest.raises(UserError, match=None) as e:
        train.parse_args([arg])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_unknown_key_in_a_file_names_the_file_and_suggests(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("batchsize = 32\n")
    with pytest.raises(UserError) as e:
        train.parse_args([str(f)])
    assert str(e.value).startswith(f'{f}: unknown key "batchsize" (did you mean "batch_size"?)')


def test_wrong_type_in_a_file_and_broken_files(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("batch_size = 1.5\n")
    with pytest.raises(UserError, match=r"x.py: batch_size=1.5 is not an int"):
        train.parse_args([str(f)])
    f.write_text("lr = 1 +\n")
    with pytest.raises(UserError, match=r"x.py: SyntaxError"):
        train.parse_args([str(f)])
    with pytest.raises(UserError, match=r"nope.py: config file not found"):
        train.parse_args([str(tmp_path / "nope.py")])


def test_batch_must_divide_across_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    with pytest.raises(UserError, match=r"batch_size=12 does not divide across 8 processes"):
        train.parse_args(["--batch_size=12"])
    assert train.parse_args(["--batch_size=16"]).batch_size == 16
    with pytest.raises(UserError, match=r"grad_accum=3 does not divide the per-process batch 2"):
        train.parse_args(["--batch_size=16", "--grad_accum=3"])


def test_bad_input_exits_2_and_writes_nothing(tmp_path):
    r = run_train("--batchsize=3", f"--runs_dir={tmp_path}")
    assert r.returncode == 2
    assert r.stderr.strip() == 'error: command line: unknown key "batchsize" (did you mean "batch_size"?)'
    assert list(tmp_path.iterdir()) == []


def test_signature_ignores_order_defaults_and_infrastructure_keys():
    a = train.parse_args(["--lr=3e-4", "--batch_size=64"])
    b = train.parse_args(["--batch_size=64", "--lr=0.0003", "--num_workers=9", "--compile=True",
                          "--device=cpu", "--log_every=1", "--runs_dir=/elsewhere", "--seed=2036"])
    assert train.config_signature(a) == train.config_signature(b)
    assert train.config_signature(train.Config()) == train.config_signature(train.parse_args(["config/base.py"]))
    assert len(train.config_signature(a)) == 8


@pytest.mark.parametrize("override", ["--lr=2e-4", "--dim=512", "--cfg_dropout=0.2", "--delays=[0,1,1,2]",
                                      "--dataset=/x", "--seed=1", "--dtype=float16", "--label=try2"])
def test_any_recipe_key_changes_the_signature(override):
    assert train.config_signature(train.parse_args([override])) != train.config_signature(train.Config())


def test_signature_is_stable_across_processes():
    code = ("import train; print(train.config_signature(train.parse_args(['--lr=3e-4', '--delays=[0,1,2,3]', "
            "'--dataset=/d'])))")
    outs = {subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                           env=dict(os.environ, PYTHONHASHSEED=str(seed))).stdout.strip() for seed in (1, 2)}
    here = train.config_signature(train.parse_args(["--lr=3e-4", "--delays=[0,1,2,3]", "--dataset=/d"]))
    assert outs == {here}


def test_print_config_shows_signature_and_run_dir_and_writes_nothing(tmp_path):
    r = run_train("config/base.py", "--lr=2e-4", f"--runs_dir={tmp_path}", "--print_config=True")
    assert r.returncode == 0, r.stderr
    sig = train.config_signature(train.parse_args(["--lr=2e-4"]))
    assert f"signature: {sig}" in r.stdout and str(tmp_path / "xps" / sig) in r.stdout
    assert "lr" in r.stdout and list(tmp_path.iterdir()) == []


def test_from_sig_starts_from_that_runs_config(tmp_path):
    base = train.parse_args(["--lr=2e-4", "--dim=512", f"--runs_dir={tmp_path}"])
    sig = train.config_signature(base)
    d = tmp_path / "xps" / sig
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(train.config_dict(base)))
    cfg = train.parse_args([f"--from_sig={sig}", f"--runs_dir={tmp_path}", "--n_layers=2"])
    assert (cfg.lr, cfg.dim, cfg.n_layers) == (2e-4, 512, 2)
    with pytest.raises(UserError, match=r"--from_sig=deadbeef: no run config at"):
        train.parse_args(["--from_sig=deadbeef", f"--runs_dir={tmp_path}"])


def test_help_lists_every_key_with_its_default_and_marks_infrastructure(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0 and not list(tmp_path.iterdir()), r.stderr
    listed = dict(line.strip().lstrip("*").split(" ", 1)[0].split("=", 1)
                  for line in r.stdout.splitlines() if line.strip().lstrip("*").startswith("--"))
    assert set(listed) == {f"--{f}" for f in train.FIELDS}
    assert listed["--lr"] == "1e-4" and listed["--batch_size"] == "192"
    assert "   *--num_workers=2" in r.stdout and "    --lr=1e-4" in r.stdout
    assert "cosine | linear | constant" in r.stdout
