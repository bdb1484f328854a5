"""Bad input at every entry point: each row of tests/BAD_INPUTS.md is a test here.

Every case runs the real command line (train.py, data.py, generate.py, evaluate.py, metrics.py, python -m grids, env.py, formats.py, text.py)
in a process forked from a warm zygote (tests/_faults_util.py) and checks: the exit status; that the message names
the thing that is wrong and says what to do (one line); that nothing was written where nothing should be; and that
the message is the one the table shows. After changing a message on purpose, rewrite the table:

    python tests/test_bad_inputs.py --write

The security tests at the end: pickled code in a checkpoint is refused, never run; AudioCraft's checkpoint.th is
read only with --trust_checkpoint=True; paths in a manifest are only ever read.
"""
import argparse
import builtins
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
import _faults_util as fu  # noqa: E402
from _model_util import make_run  # noqa: E402
import data  # noqa: E402
import demo  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TABLE = Path(__file__).with_name("BAD_INPUTS.md")
TRAIN = [str(ROOT / "config/debug.py"), "--dim=32", "--n_layers=1", "--n_heads=2", "--lut_dim=32", "--segment_duration=1.0",
         "--batch_size=4", "--epochs=1", "--updates_per_epoch=1", "--generate_every=0", "--evaluate_every=0",
         "--num_workers=0"]

CODEC = ["--n_filters=2", "--dimension=8", "--lstm=0", "--card=16", "--adv=0", "--feat=0", "--epochs=1",
         "--updates_per_epoch=1", "--batch_size=2", "--num_workers=0", "--generate_every=0"]


class Evil:
    """Unpickling this calls open(marker, "w"): a stand-in for any code a pickle can run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


# ----------------------------------------------------------------------------------------------------------
# Files the cases are made of

def wav(path, seconds=0.5, sample_rate=32000, nan=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    x = torch.sin(torch.arange(int(seconds * sample_rate)) * 0.05) * 0.5
    if nan:
        import soundfile as sf
        x[10] = float("nan")
        sf.write(path, x.numpy(), sample_rate, subtype="FLOAT")
    else:
        data.save_audio(path, x, sample_rate)
    return path


def write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


def truncated_checkpoint(path):
    torch.save({"model": {"w": torch.zeros(1000)}}, path)
    path.write_bytes(path.read_bytes()[:1500])
    return path


def manifest_lines(*rows):
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def dataset(ctx, train_manifest, name="ds"):
    """<tmp>/ds with four splits; the train split's manifest is the bad one (the others are fine)."""
    root = ctx.tmp / name
    good = wav(root / "ok.wav")
    for split in data.SPLITS:
        body = train_manifest if split == "train" else manifest_lines(
            {"path": str(good), "duration": 0.5, "sample_rate": 32000})
        (root / split).mkdir(parents=True, exist_ok=True)
        if body is not None:
            write(root / split / "data.jsonl", body)
    return root


def small_t5_dir(ctx, weights=None, config='{"d_model": 8, "num_layers": 1, "num_heads": 2, "d_kv": 4, "d_ff": 8}'):
    d = ctx.tmp / "t5"
    write(d / "config.json", config)
    write(d / "spiece.model", b"not used before the weights")
    if weights:
        name, content = weights
        write(d / name, content)
    return d


@dataclass
class Ctx:
    tmp: Path                   # the case's own directory: nothing may appear in it unless the case writes
    data: Path                  # a small demo set and its token cache, shared by the cases

    def train(self, *extra, dataset=None):
        return "train.py", TRAIN + list(extra) + [f"--runs_dir={self.tmp / 'runs'}",
                                                  f"--dataset={dataset or self.data / 'demo'}",
                                                  f"--cache_dir={self.tmp / 'cache' if dataset else self.data / 'cache'}"]


    def train_codec(self, *extra, dataset=None):
        return "train_codec.py", CODEC + list(extra) + [f"--runs_dir={self.tmp / 'runs'}",
                                                         f"--dataset={dataset or self.data / 'demo'}"]


@dataclass
class Case:
    id: str
    entry: str                  # the command, as the table shows it
    bad: str                    # the bad input, in words
    make: callable              # Ctx -> (target, argv) or (target, argv, env): see _faults_util._child
    must: tuple = ()            # in the message: the thing's name and what to do (<tmp>, <data>: the directories)
    code: int = 2
    line: str = "error: "       # the message is the last output line starting so
    writes: bool = False        # the command may write files (else: nothing appears or changes under <tmp>)
    never: tuple = ()           # files (under <tmp>) that must not exist afterwards: a pickle's payload
    varies: tuple = ()          # (regex, placeholder): parts of the message that change from machine to machine

    def __str__(self):
        return self.id


# ----------------------------------------------------------------------------------------------------------
# The cases: one per row of BAD_INPUTS.md

def _file_config(ctx, text):
    return ctx.train(str(write(ctx.tmp / "my_config.py", text)))


def _hf_codec(ctx, config=None, weights=None):
    d = ctx.tmp / "hf_codec"
    d.mkdir()
    if config is not None:
        write(d / "config.json", config)
    if weights:
        write(d / weights, b"\0" * 64)
    return ctx.train(f"--codec={d}")


def _locked_run(ctx):
    """A run whose lock names a live process on this host (the test's own), as a training process leaves it."""
    import socket
    import time
    run = make_run(ctx.tmp / "runs")
    write(run / "lock", f"{os.getpid()} {socket.gethostname()} {int(time.time())}\n")
    return run


def _evil(ctx, name="evil.bin"):
    torch.save({"best_state": Evil(ctx.tmp / "PWNED")}, ctx.tmp / name)
    return ctx.tmp / name


def _audiocraft_th(ctx):
    torch.save({"best_state": {"model": {"emb.0.weight": torch.zeros(2, 2)}}, "xp.cfg": argparse.Namespace(lr=1e-4),
                "history": []}, ctx.tmp / "checkpoint.th")
    return ctx.tmp / "checkpoint.th"


def _resume_corrupt(ctx):
    import train
    target, argv = ctx.train()
    write(train.run_dir(train.parse_args(argv)) / "checkpoint.pt", b"PK\x03\x04 cut short")
    return target, argv


def _t5_pickle(ctx):
    d = small_t5_dir(ctx)
    _evil(ctx, "t5/pytorch_model.bin")
    return ctx.train("--conditioner=t5", f"--t5_path={d}")


def _other_model_checkpoint(ctx):
    torch.save({"model": {"emb.0.weight": torch.zeros(3, 3)}}, ctx.tmp / "other.pt")
    return ctx.train(f"--continue_from={ctx.tmp / 'other.pt'}")


def _hf_dir(ctx, drop=(), add=None, reshape=None, conditional=False, name="hf", **config):
    """A transformers MusicGen directory of a tiny random LM, written without transformers: config.json and
    model.safetensors under transformers' names (formats.to_transformers_state_dict). The decoder alone
    (MusicgenForCausalLM), or with conditional=True a MusicgenForConditionalGeneration whose 16-wide text encoder
    needs enc_to_dec_proj. drop / add / reshape spoil its weights, **config its decoder's config."""
    import formats
    import model as lm_lib
    from safetensors.torch import save_file
    torch.manual_seed(0)
    lm = lm_lib.MusicGenLM(lm_lib.LMConfig(dim=32, n_layers=1, n_heads=2, n_q=4, card=64, text_dim=16))
    prefix = "decoder." if conditional else ""
    weights = {prefix + k: v for k, v in formats.to_transformers_state_dict(lm.state_dict()).items()}
    if conditional:
        weights.update({"enc_to_dec_proj." + k: v for k, v in lm.conditioner.output_proj.state_dict().items()})
    for key in (drop,) if isinstance(drop, str) else drop:
        del weights[key]
    weights.update(add or {})
    for key, shape in (reshape or {}).items():
        weights[key] = torch.zeros(shape)
    decoder = {"model_type": "musicgen_decoder", "vocab_size": 64, "num_codebooks": 4, "hidden_size": 32,
               "num_hidden_layers": 1, "num_attention_heads": 2, "ffn_dim": 128, **config}
    if conditional:
        decoder = {"model_type": "musicgen", "decoder": decoder, "text_encoder": {"model_type": "t5", "d_model": 16},
                   "audio_encoder": {"model_type": "encodec"}}
    d = write(ctx.tmp / name / "config.json", json.dumps(decoder)).parent
    save_file({k: v.contiguous() for k, v in weights.items()}, str(d / "model.safetensors"))
    return d


BERT_CONFIG = '{"model_type": "bert"}'


def _continue_hf(ctx, **spoil):
    return ctx.train(f"--continue_from={_hf_dir(ctx, **spoil)}")


def _run(ctx, *options):
    """A run directory as train.py leaves it (config.json, checkpoint.pt) with random weights: TRAIN's settings."""
    import model as lm_lib
    import train
    config = {**train.config_dict(train.parse_args(TRAIN + list(options))), "signature": "cafef00d"}
    d = write(ctx.tmp / "run" / "config.json", json.dumps(config)).parent
    torch.save({"model": lm_lib.build_lm(config, with_t5=False).state_dict(), "config": config}, d / "checkpoint.pt")
    return d


def _run_with_config(ctx, config):
    d = ctx.tmp / "run"
    d.mkdir()
    torch.save({"model": {}, "config": {}}, d / "checkpoint.pt")
    write(d / "config.json", config)
    return d


def _grid(ctx, body):
    return "-m grids", [str(write(ctx.tmp / "mygrid.py", body))]


def _tokenize(ctx, rows, make_files=lambda ctx: None):
    make_files(ctx)
    m = write(ctx.tmp / "split" / "data.jsonl", manifest_lines(*rows))
    return "data.py", ["tokenize", str(m), str(ctx.tmp / "cache"), "--codec=debug", "--num_workers=0"]


def _row(ctx, name, **kw):
    return {"path": str(ctx.tmp / "audio" / name), "duration": 0.5, "sample_rate": 32000, **kw}


MISSING_REF = lambda ctx: {"AUDIOCRAFT_REFERENCE_DIR": str(ctx.tmp / "ref")}  # noqa: E731
EMPTY_REF = lambda ctx: {"AUDIOCRAFT_REFERENCE_DIR": str((ctx.tmp / "ref").mkdir() or ctx.tmp / "ref")}  # noqa: E731

CASES = [
    # -- train.py: keys and values
    Case("config-unknown-key", "train.py", "a misspelt key on the command line",
         lambda c: c.train("--batchsize=32"), ('unknown key "batchsize"', 'did you mean "batch_size"')),
    Case("config-bad-value", "train.py", "a value of the wrong type", lambda c: c.train("--lr=fast"),
         ("lr='fast'", "is not a float")),
    Case("config-no-value", "train.py", "--key without =value", lambda c: c.train("--lr"),
         ('"--lr"', "must be --key=value")),
    Case("config-file-missing", "train.py", "a config file that does not exist",
         lambda c: c.train(str(c.tmp / "nope.py")), ("<tmp>/nope.py", "not found")),
    Case("config-file-raises", "train.py", "a config file whose code raises",
         lambda c: _file_config(c, "lr = 1 / 0\n"), ("<tmp>/my_config.py", "ZeroDivisionError")),
    Case("config-file-unknown-name", "train.py", "a config file assigning an unknown name",
         lambda c: _file_config(c, "batchsize = 32\n"), ("<tmp>/my_config.py", 'unknown key "batchsize"',
                                                          'did you mean "batch_size"', "must start with _")),
    Case("config-choice", "train.py", "a value outside the choices", lambda c: c.train("--pattern=diagonal"),
         ('pattern="diagonal"', "is not one of delay, parallel")),
    Case("config-range", "train.py", "a fraction above 1", lambda c: c.train("--max_skip_fraction=1.5"),
         ("max_skip_fraction=1.5", "between 0 and 1")),
    Case("config-batch-world", "train.py (WORLD_SIZE=3)", "a batch that does not split across the processes",
         lambda c: (*c.train(), {"WORLD_SIZE": "3"}), ("batch_size=4", "3 processes", "use a multiple of 3")),
    Case("config-delays", "train.py", "delays that do not match n_q", lambda c: c.train("--delays=[0,1]"),
         ("delays=[0, 1]", "n_q=4")),
    Case("config-from-sig", "train.py", "--from_sig of a run that does not exist",
         lambda c: c.train("--from_sig=deadbeef"), ("--from_sig=deadbeef", "<tmp>/runs/xps/deadbeef/config.json")),
    Case("config-codec-shape", "train.py", "n_q that the codec does not have", lambda c: c.train("--n_q=8"),
         ("codec demo has n_q=4", "n_q=8", "set them to match")),
    Case("config-zero-heads", "train.py", "zero attention heads", lambda c: c.train("--n_heads=0"),
         ("n_heads=0", "must be at least 1")),
    Case("config-zero-hidden", "train.py", "a feed-forward width of zero", lambda c: c.train("--hidden_scale=0"),
         ("hidden_scale=0", "must be at least 1")),
    Case("config-dropout", "train.py", "a dropout probability of 2", lambda c: c.train("--dropout=2"),
         ("dropout=2.0", "between 0 and 0.99")),
    Case("config-betas", "train.py", "one Adam beta instead of two", lambda c: c.train("--betas=[0.9]"),
         ("betas=[0.9]", "two numbers")),
    Case("config-huge-seed", "train.py", "a seed past 2**32", lambda c: c.train("--seed=99999999999999999999999"),
         ("seed=99999999999999999999999", "between 0 and 4294967295")),
    Case("config-inf-duration", "train.py", "an infinite segment", lambda c: c.train("--segment_duration=1e999"),
         ("segment_duration=inf", "between 0.01 and 3600")),
    Case("config-negative-workers", "train.py", "a negative number of loader workers",
         lambda c: c.train("--num_workers=-1"), ("num_workers=-1", "at least 0")),
    Case("config-negative-valid", "train.py", "a negative number of valid batches",
         lambda c: c.train("--valid_batches=-1"), ("valid_batches=-1", "at least 0")),
    Case("config-negative-save", "train.py", "a negative checkpoint interval", lambda c: c.train("--save_every=-1"),
         ("save_every=-1", "at least 0")),
    Case("config-zero-samples", "train.py", "a generate stage with no samples",
         lambda c: c.train("--generate_count=0"), ("generate_count=0", "at least 1")),
    Case("config-metric-unknown", "train.py", "a misspelt evaluate metric", lambda c: c.train("--metrics=fda"),
         ("'fda'", 'did you mean "fad"')),
    Case("config-metric-weights", "train.py", "fad in the evaluate stage without VGGish weights",
         lambda c: (*c.train("--metrics=fad", "--evaluate_every=1"), EMPTY_REF(c)),
         ("vggish-10086976.pth", "--vggish_path=PATH")),
    Case("config-wandb-mode", "train.py", "a W&B mode that does not exist",
         lambda c: c.train("--wandb=True", "--wandb_mode=onlin"), ("wandb_mode='onlin'", "online, offline")),
    Case("config-from-sig-corrupt", "train.py", "--from_sig of a run whose config.json is corrupt",
         lambda c: (write(c.tmp / "runs/xps/deadbeef/config.json", "{cut sh"), c.train("--from_sig=deadbeef"))[1],
         ("<tmp>/runs/xps/deadbeef/config.json", "not a readable run config"), writes=True),
    # -- codec paths and directories
    Case("codec-missing", "train.py --codec", "a codec file that does not exist",
         lambda c: c.train(f"--codec={c.tmp / 'nope.bin'}"), ("<tmp>/nope.bin", "does not exist")),
    Case("codec-not-torch", "train.py --codec", "a codec file that is not a torch file",
         lambda c: c.train(f"--codec={write(c.tmp / 'codec.bin', 'hello')}"),
         ("<tmp>/codec.bin", "compression_state_dict.bin")),
    Case("codec-pickle", "train.py --codec", "a codec file with pickled code",
         lambda c: c.train(f"--codec={_evil(c)}"), ("<tmp>/evil.bin: refused",), never=("PWNED",)),
    Case("codec-wrong-keys", "train.py --codec", "a torch file without best_state and xp.cfg",
         lambda c: (torch.save({"state": {}}, c.tmp / "codec.bin"), c.train(f"--codec={c.tmp / 'codec.bin'}"))[1],
         ("<tmp>/codec.bin", "needs keys best_state and xp.cfg")),
    Case("codec-hf-bad-json", "train.py --codec", "a Hugging Face directory whose config.json is not JSON",
         lambda c: _hf_codec(c, "{oops"), ("<tmp>/hf_codec/config.json", "not valid JSON")),
    Case("codec-hf-no-weights", "train.py --codec", "a Hugging Face directory without weights",
         lambda c: _hf_codec(c, '{"model_type": "encodec"}'), ("<tmp>/hf_codec", "no weights", "model.safetensors")),
    Case("codec-hf-other-model", "train.py --codec", "a Hugging Face directory of another model",
         lambda c: _hf_codec(c, '{"model_type": "t5"}', "model.safetensors"), ("<tmp>/hf_codec", "is not EnCodec")),
    Case("codec-empty-dir", "train.py --codec", "a directory holding no codec",
         lambda c: _hf_codec(c), ("<tmp>/hf_codec", "holds neither compression_state_dict.bin")),
    # -- T5 directories and tokenizers
    Case("t5-not-dir", "train.py --t5_path", "a T5 path that is a file",
         lambda c: c.train("--conditioner=t5", f"--t5_path={write(c.tmp / 't5.txt', 'x')}"),
         ("<tmp>/t5.txt", "not a directory", "spiece.model")),
    Case("t5-no-spiece", "train.py --t5_path", "a T5 directory without spiece.model",
         lambda c: c.train("--conditioner=t5", f"--t5_path={write(c.tmp / 't5' / 'config.json', '{}').parent}"),
         ("<tmp>/t5", "missing spiece.model")),
    Case("t5-no-weights", "train.py --t5_path", "a T5 directory without weights",
         lambda c: c.train("--conditioner=t5", f"--t5_path={small_t5_dir(c)}"), ("<tmp>/t5", "no weights")),
    Case("t5-bad-config", "train.py --t5_path", "a T5 directory whose config.json is not JSON",
         lambda c: c.train("--conditioner=t5", f"--t5_path={small_t5_dir(c, config='{oops')}"),
         ("<tmp>/t5", "config.json is not readable JSON")),
    Case("t5-corrupt-bin", "train.py --t5_path", "a T5 pytorch_model.bin cut short",
         lambda c: c.train("--conditioner=t5", f"--t5_path={small_t5_dir(c, ('pytorch_model.bin', b'PK cut'))}"),
         ("<tmp>/t5/pytorch_model.bin", "truncated, corrupt")),
    Case("t5-corrupt-safetensors", "train.py --t5_path", "a T5 model.safetensors that is not one",
         lambda c: c.train("--conditioner=t5", f"--t5_path={small_t5_dir(c, ('model.safetensors', b'garbage'))}"),
         ("<tmp>/t5/model.safetensors", "not a readable safetensors file")),
    Case("t5-pickle", "train.py --t5_path", "a T5 pytorch_model.bin with pickled code",
         _t5_pickle, ("<tmp>/t5/pytorch_model.bin", "refused", "nothing was run"), never=("PWNED",)),
    Case("lut-tokenizer-missing", "train.py --lut_tokenizer", "a sentencepiece model that does not exist",
         lambda c: c.train(f"--lut_tokenizer={c.tmp / 'nope.model'}"),
         ("<tmp>/nope.model", "not found", "python data.py tokenizer")),
    Case("lut-tiktoken-bad", "train.py --lut_tokenizer", "a tiktoken file with a bad line",
         lambda c: c.train("--lut_tokenizer=tiktoken:" + str(write(c.tmp / "bpe.tiktoken", "QQ== 0\nnot base64\n"))),
         ("<tmp>/bpe.tiktoken:2", "expected '<base64 token> <rank>'")),
    # -- //reference paths
    Case("reference-dir-missing", "train.py --codec=//reference/...", "a reference directory that does not exist",
         lambda c: (*c.train("--codec=//reference/encodec_32khz"), MISSING_REF(c)),
         ("//reference/encodec_32khz", "<tmp>/ref does not exist", "AUDIOCRAFT_REFERENCE_DIR")),
    Case("reference-file-missing", "train.py --t5_path=//reference/...", "a reference path that does not exist",
         lambda c: (*c.train("--conditioner=t5", "--t5_path=//reference/t5-base"), EMPTY_REF(c)),
         ("//reference/t5-base", "<tmp>/ref/t5-base, which does not exist")),
    # -- datasets and manifests
    Case("dataset-missing", "train.py --dataset", "a dataset directory that does not exist",
         lambda c: c.train(dataset=c.tmp / "nope"), ("<tmp>/nope", "is not a directory", "<split>/data.jsonl")),
    Case("dataset-no-split", "train.py --dataset", "a dataset without a train split",
         lambda c: c.train(dataset=(c.tmp / "ds").mkdir() or c.tmp / "ds"), ("<tmp>/ds", "no split 'train'")),
    Case("manifest-missing", "train.py --dataset", "a split directory without data.jsonl",
         lambda c: c.train(dataset=dataset(c, None)), ("<tmp>/ds/train", "no data.jsonl",
                                                       "python data.py manifest")),
    Case("manifest-not-json", "train.py --dataset", "a manifest line that is not JSON",
         lambda c: c.train(dataset=dataset(c, manifest_lines(_row(c, "a.wav"), "{oops"))),
         ("<tmp>/ds/train/data.jsonl line 2", "not JSON")),
    Case("manifest-missing-field", "train.py --dataset", "a manifest line without duration",
         lambda c: c.train(dataset=dataset(c, manifest_lines({"path": "a.wav", "sample_rate": 32000}))),
         ("<tmp>/ds/train/data.jsonl line 1", 'missing field "duration"')),
    Case("manifest-negative", "train.py --dataset", "a negative duration",
         lambda c: c.train(dataset=dataset(c, manifest_lines(_row(c, "a.wav", duration=-1)))),
         ("<tmp>/ds/train/data.jsonl line 1", "must be positive", "rebuild")),
    Case("manifest-not-object", "train.py --dataset", "a manifest line that is a list",
         lambda c: c.train(dataset=dataset(c, manifest_lines("[1, 2]"))),
         ("<tmp>/ds/train/data.jsonl line 1", "expected a JSON object")),
    Case("manifest-empty", "train.py --dataset", "an empty manifest",
         lambda c: c.train(dataset=dataset(c, "")), ("<tmp>/ds/train/data.jsonl", "lists no files")),
    Case("manifest-bad-gzip", "train.py --dataset", "data.jsonl.gz that is not gzip",
         lambda c: c.train(dataset=(write(dataset(c, None) / "train" / "data.jsonl.gz", b"plain"), c.tmp / "ds")[1]),
         ("<tmp>/ds/train/data.jsonl.gz", "cannot be read")),
    Case("manifest-reference", "train.py --dataset", "a manifest path under a missing //reference directory",
         lambda c: (*c.train(dataset=dataset(c, manifest_lines(
             {"path": "//reference/music/a.wav", "duration": 1, "sample_rate": 32000}))), MISSING_REF(c)),
         ("<tmp>/ds/train/data.jsonl line 1", "//reference/music/a.wav", "<tmp>/ref does not exist")),
    Case("manifest-all-unreadable", "train.py --dataset", "every file of a split missing",
         lambda c: c.train(dataset=dataset(c, manifest_lines(_row(c, "a.wav"), _row(c, "b.wav")))),
         ("2 of 2 files are unreadable", "max_skip_fraction", "fix them or rebuild the manifest"), writes=True,
         varies=((r"cache/[^ ]*/index", "cache/<codec>/train-<digest>/index"),)),
    # -- checkpoints: resume and continue_from
    Case("resume-corrupt", "train.py (rerun)", "a corrupt checkpoint.pt and no kept checkpoint",
         _resume_corrupt, ("<tmp>/runs/xps/<sig>/checkpoint.pt", "cannot resume from it", "--clear=True"),
         writes=True, varies=((r"xps/[0-9a-f]{8}/", "xps/<sig>/"),)),
    Case("continue-missing-sig", "train.py --continue_from", "a run signature that does not exist",
         lambda c: c.train("--continue_from=deadbeef"), ("continue_from=deadbeef", "no run deadbeef in <tmp>/runs/xps"),
         writes=True),
    Case("continue-truncated", "train.py --continue_from", "a checkpoint cut short",
         lambda c: c.train(f"--continue_from={truncated_checkpoint(c.tmp / 'cut.pt')}"),
         ("<tmp>/cut.pt", "truncated, corrupt or another format"), writes=True),
    Case("continue-pickle", "train.py --continue_from", "a checkpoint with pickled code",
         lambda c: c.train(f"--continue_from={_evil(c)}"), ("<tmp>/evil.bin", "refused", "nothing was run"),
         writes=True, never=("PWNED",)),
    Case("continue-audiocraft-th", "train.py --continue_from", "AudioCraft's training checkpoint.th (pickled config)",
         lambda c: c.train(f"--continue_from={_audiocraft_th(c)}"),
         ("<tmp>/checkpoint.th", "argparse.Namespace", "--trust_checkpoint=True"), writes=True),
    Case("continue-other-model", "train.py --continue_from", "a checkpoint of another model",
         _other_model_checkpoint, ("<tmp>/other.pt", "does not fit the model", "emb.0.weight (3, 3) vs model"),
         writes=True, varies=((r"\d+ missing \([^)]*\)", "<n> missing (<the model's keys>)"),)),
    Case("continue-hf-missing-key", "train.py --continue_from", "a transformers MusicGen directory lacking a weight",
         lambda c: _continue_hf(c, drop="model.decoder.layers.0.fc2.weight"),
         ("<tmp>/hf", "1 missing (model.decoder.layers.0.fc2.weight)"), writes=True),
    Case("continue-hf-no-projection", "train.py --continue_from",
         "a transformers MusicGen directory without the enc_to_dec_proj its config needs",
         lambda c: _continue_hf(c, drop=("enc_to_dec_proj.weight", "enc_to_dec_proj.bias"), conditional=True),
         ("<tmp>/hf", "2 missing (enc_to_dec_proj.weight, enc_to_dec_proj.bias)"), writes=True),
    Case("continue-hf-extra-key", "train.py --continue_from",
         "a transformers MusicGen directory with a weight its config has no place for",
         lambda c: _continue_hf(c, add={"model.decoder.layers.1.fc1.weight": torch.zeros(128, 32)}),
         ("<tmp>/hf", "1 unexpected (model.decoder.layers.1.fc1.weight)"), writes=True),
    Case("continue-hf-wrong-shape", "train.py --continue_from",
         "a transformers MusicGen directory with a misshapen weight",
         lambda c: _continue_hf(c, reshape={"lm_heads.0.weight": (63, 32)}),
         ("<tmp>/hf", "lm_heads.0.weight (63, 32) vs model (64, 32)"), writes=True),
    Case("continue-hf-config-mismatch", "train.py --continue_from",
         "a transformers MusicGen config.json whose num_codebooks (3) disagrees with its weights (4)",
         lambda c: _continue_hf(c, num_codebooks=3),
         ("<tmp>/hf", "2 unexpected", "model.decoder.embed_tokens.3.weight"), writes=True),
    Case("continue-hf-stereo", "train.py --continue_from", "a stereo transformers MusicGen (audio_channels=2)",
         lambda c: _continue_hf(c, audio_channels=2),
         ("<tmp>/hf/config.json", "audio_channels=2: stereo MusicGen is not supported"), writes=True),
    Case("continue-hf-no-weights", "train.py --continue_from", "a transformers MusicGen config.json without weights",
         lambda c: c.train(f"--continue_from={(_hf_dir(c) / 'model.safetensors').unlink() or c.tmp / 'hf'}"),
         ("<tmp>/hf", "no weights", "model.safetensors"), writes=True),
    Case("continue-neither-format", "train.py --continue_from", "a directory that is none of the formats it reads",
         lambda c: c.train(f"--continue_from={write(_hf_dir(c) / 'config.json', BERT_CONFIG).parent}"),
         ("<tmp>/hf", "not a run (checkpoint.pt), an AudioCraft export", "config.json of a 'bert' model"), writes=True),
    # -- audio files and sidecars: skipped with a warning (the data policy), not an error
    Case("audio-corrupt", "data.py manifest", "an audio file that is not audio",
         lambda c: ("data.py", ["manifest", str((write(c.tmp / "audio" / "bad.wav", b"RIFF garbage" * 10),
                                                 wav(c.tmp / "audio" / "ok.wav"))[1].parent), str(c.tmp / "m.jsonl")]),
         ("<tmp>/audio/bad.wav", "unreadable"), code=0, line="  skipped", writes=True),
    Case("audio-empty", "data.py manifest", "an empty audio file",
         lambda c: ("data.py", ["manifest", str(write(c.tmp / "audio" / "empty.flac", b"").parent),
                                str(c.tmp / "m.jsonl")]), ("<tmp>/audio/empty.flac", "empty file"),
         code=0, line="  skipped", writes=True),
    Case("audio-root-missing", "data.py manifest", "a folder that does not exist",
         lambda c: ("data.py", ["manifest", str(c.tmp / "nope"), str(c.tmp / "m.jsonl")]),
         ("<tmp>/nope", "is not a directory")),
    Case("audio-out-name", "data.py manifest", "an output name without .jsonl",
         lambda c: ("data.py", ["manifest", str((c.tmp / "a").mkdir() or c.tmp / "a"), str(c.tmp / "m.txt")]),
         ("<tmp>/m.txt", "must end with .jsonl")),
    Case("audio-missing", "data.py tokenize", "a manifest entry whose file is gone",
         lambda c: _tokenize(c, [_row(c, "gone.wav")]), ("<tmp>/audio/gone.wav", "missing"),
         code=0, line="  skipped", writes=True),
    Case("sidecar-not-json", "data.py tokenize", "a sidecar .json that is not JSON",
         lambda c: _tokenize(c, [_row(c, "a.wav")], lambda c: (wav(c.tmp / "audio" / "a.wav"),
                                                              write(c.tmp / "audio" / "a.json", "{oops"))),
         ("<tmp>/audio/a.wav", "sidecar <tmp>/audio/a.json is not JSON"), code=0, line="  skipped", writes=True),
    Case("audio-rate-changed", "data.py tokenize", "a file whose sample rate differs from the manifest",
         lambda c: _tokenize(c, [_row(c, "a.wav")], lambda c: wav(c.tmp / "audio" / "a.wav", sample_rate=16000)),
         ("<tmp>/audio/a.wav", "16000 Hz but the manifest says 32000 Hz", "rebuild the manifest"),
         code=0, line="  skipped", writes=True),
    Case("audio-nan", "data.py tokenize", "a float file with NaN samples",
         lambda c: _tokenize(c, [_row(c, "a.wav")], lambda c: wav(c.tmp / "audio" / "a.wav", nan=True)),
         ("<tmp>/audio/a.wav", "NaN or infinite samples"), code=0, line="  skipped", writes=True),
    Case("sidecar-description-dict", "data.py tokenize", "a sidecar description that is not text",
         lambda c: _tokenize(c, [_row(c, "a.wav")], lambda c: (wav(c.tmp / "audio" / "a.wav"), write(
             c.tmp / "audio" / "a.json", '{"description": {"en": "calm piano"}}'))),
         ("<tmp>/audio/a.wav", '"description" is dict', "expected a string or a list of strings"),
         code=0, line="  skipped", writes=True),
    Case("audio-fifo", "data.py manifest", "a FIFO named *.wav (reading it would block forever)",
         lambda c: ("data.py", ["manifest", str((wav(c.tmp / "audio" / "ok.wav"), os.mkfifo(c.tmp / "audio" / "p.wav"),
                                                 c.tmp / "audio")[2]), str(c.tmp / "m.jsonl")]),
         ("<tmp>/audio/p.wav", "not a regular file (a FIFO)"), code=0, line="  skipped", writes=True),
    Case("tokenize-no-codec", "data.py tokenize", "no --codec",
         lambda c: ("data.py", ["tokenize", str(c.tmp / "ds"), str(c.tmp / "cache")]), ("--codec is required",)),
    Case("tokenize-cuda-missing", "data.py tokenize", "--device=cuda on a machine without CUDA",
         lambda c: ("data.py", ["tokenize", str(c.tmp / "ds"), str(c.tmp / "cache"), "--codec=debug", "--device=cuda"],
                    {"CUDA_VISIBLE_DEVICES": ""}), ('device="cuda"', "CUDA is not available", "--device=cpu")),
    Case("tokenize-num-workers", "data.py tokenize", "a negative --num_workers",
         lambda c: ("data.py", ["tokenize", str(c.tmp / "ds"), str(c.tmp / "cache"), "--codec=debug",
                                "--num_workers=-1"]), ("--num_workers=-1", "must not be negative")),
    Case("tokenize-chunk-seconds", "data.py tokenize", "an infinite --chunk_seconds",
         lambda c: ("data.py", ["tokenize", str(c.tmp / "ds"), str(c.tmp / "cache"), "--codec=debug",
                                "--chunk_seconds=1e999"]), ("--chunk_seconds=inf", "positive number of seconds")),
    Case("data-unknown-option", "data.py manifest", "a misspelt option",
         lambda c: ("data.py", ["manifest", str(c.tmp), str(c.tmp / "m.jsonl"), "--worker=4"]),
         ('unknown key "worker"', 'did you mean "workers"')),
    Case("data-unknown-command", "data.py", "a command that does not exist",
         lambda c: ("data.py", ["tokenise", str(c.tmp)]), ("unknown command 'tokenise'", "python data.py --help")),
    Case("tokenize-codec-missing", "data.py tokenize", "a codec path that does not exist",
         lambda c: ("data.py", ["tokenize", str(dataset(c, manifest_lines(_row(c, "a.wav"))) / "train"),
                                str(c.tmp / "cache"), f"--codec={c.tmp / 'nope'}"]), ("<tmp>/nope", "does not exist")),
    # -- train_codec.py
    Case("codec-segment-hop", "train_codec.py", "a segment that is not a whole number of codec frames",
         lambda c: c.train_codec("--segment_duration=0.99"),
         ("segment_duration=0.99 s", "the codec's hop 640", "use a multiple of 0.02 s")),
    Case("codec-audio-short", "train_codec.py", "audio shorter than a training segment",
         lambda c: c.train_codec("--segment_duration=1.0", dataset=dataset(c, manifest_lines(
             {"path": str(wav(c.tmp / "short.wav", seconds=0.5)), "duration": 0.5, "sample_rate": 32000}))),
         ("every file is shorter than segment_duration=1.0 s", "0.50 s", "lower segment_duration")),
    Case("codec-unknown-key", "train_codec.py", "a misspelt key", lambda c: c.train_codec("--n_filter=4"),
         ('unknown key "n_filter"', 'did you mean "n_filters"')),
    # -- generate.py
    Case("generate-no-run", "generate.py", "no --run", lambda c: ("generate.py", ["--prompt=piano"]),
         ("--run is required",)),
    Case("generate-unknown-option", "generate.py", "a misspelt option",
         lambda c: ("generate.py", ["--run=x", "--temprature=1"]), ('unknown key "temprature"', 'did you mean "temperature"')),
    Case("generate-bad-number", "generate.py", "a duration that is not a number",
         lambda c: ("generate.py", ["--run=x", "--duration=ten"]), ("duration='ten'", "is not a float")),
    Case("generate-zero-duration", "generate.py", "a zero duration",
         lambda c: ("generate.py", ["--run=x", "--duration=0"]), ("--duration=0.0", "must be positive")),
    Case("generate-prompt-twice", "generate.py", "--prompt and --prompts together",
         lambda c: ("generate.py", ["--run=x", "--prompt=a", "--prompts=p.txt"]), ("--prompt or --prompts",)),
    Case("generate-out-format", "generate.py", "an output format it cannot write",
         lambda c: ("generate.py", ["--run=x", f"--out={c.tmp / 'x.mp3'}"]), ("<tmp>/x.mp3", ".wav or .flac")),
    Case("generate-top-p", "generate.py", "top_p above 1", lambda c: ("generate.py", ["--run=x", "--top_p=2"]),
         ("--top_p=2.0", "between 0 and 1")),
    Case("generate-positional", "generate.py", "an argument that is not --key=value",
         lambda c: ("generate.py", ["--run=x", "hello"]), ("got hello", "--key=value")),
    Case("generate-prompts-missing", "generate.py", "a prompts file that does not exist",
         lambda c: ("generate.py", ["--run=x", f"--prompts={c.tmp / 'p.txt'}"]),
         ("--prompts=<tmp>/p.txt", "cannot read")),
    Case("generate-no-run-dir", "generate.py", "a run signature that does not exist",
         lambda c: ("generate.py", ["--run=deadbeef", f"--runs_dir={c.tmp / 'runs'}", f"--out={c.tmp / 'o.wav'}"]),
         ("--run=deadbeef", "<tmp>/runs/xps", "--runs_dir")),
    Case("generate-truncated", "generate.py", "a checkpoint cut short",
         lambda c: ("generate.py", [f"--run={truncated_checkpoint(c.tmp / 'cut.pt')}", f"--out={c.tmp / 'o.wav'}"]),
         ("<tmp>/cut.pt", "not a readable checkpoint")),
    Case("generate-pickle", "generate.py", "a checkpoint with pickled code",
         lambda c: ("generate.py", [f"--run={_evil(c, 'evil.pt')}", f"--out={c.tmp / 'o.wav'}"]),
         ("<tmp>/evil.pt: refused",), never=("PWNED",)),
    Case("generate-reference", "generate.py", "//reference/... under a missing reference directory",
         lambda c: ("generate.py", ["--run=//reference/musicgen-small", f"--out={c.tmp / 'o.wav'}"], MISSING_REF(c)),
         ("//reference/musicgen-small", "<tmp>/ref does not exist")),
    Case("generate-out-is-directory", "generate.py", "--out=x.wav where x.wav is a directory",
         lambda c: ((c.tmp / "x.wav").mkdir(), ("generate.py", ["--run=x", f"--out={c.tmp / 'x.wav'}"]))[1],
         ("--out=<tmp>/x.wav", "is not a file", "choose another --out")),
    Case("generate-out-dir-is-file", "generate.py", "--out naming a directory that is a file",
         lambda c: ("generate.py", ["--run=x", f"--out={write(c.tmp / 'samples', 'x')}"]),
         ("<tmp>/samples is a file, not a directory",)),
    Case("generate-huge-seed", "generate.py", "a seed past 2**63 - 1",
         lambda c: ("generate.py", ["--run=x", "--seed=99999999999999999999"]),
         ("--seed=99999999999999999999", "between 0 and 9223372036854775807")),
    Case("generate-seed-prompts", "generate.py", "a seed whose row seeds pass 2**63 - 1",
         lambda c: ("generate.py", ["--run=x", "--prompts=" + str(write(c.tmp / "p.txt", "a\nb\n")),
                                    "--seed=9223372036854775807"]), ("seed + i", "at most 9223372036854775806")),
    Case("generate-cfg-nan", "generate.py", "cfg_coef=nan", lambda c: ("generate.py", ["--run=x", "--cfg_coef=nan"]),
         ("cfg_coef='nan'", "is not a float")),
    Case("generate-cfg-inf", "generate.py", "an infinite cfg_coef",
         lambda c: ("generate.py", ["--run=x", "--cfg_coef=1e999"]), ("--cfg_coef=inf", "finite")),
    Case("generate-temperature-inf", "generate.py", "an infinite temperature",
         lambda c: ("generate.py", ["--run=x", "--temperature=1e999"]), ("--temperature=inf", "finite")),
    Case("generate-headroom-nan", "generate.py", "headroom_db=nan",
         lambda c: ("generate.py", ["--run=x", "--headroom_db=nan"]), ("headroom_db='nan'", "is not a float")),
    Case("generate-headroom-inf", "generate.py", "an infinite headroom_db",
         lambda c: ("generate.py", ["--run=x", "--headroom_db=-1e999"]), ("--headroom_db=-inf", "finite number of dB")),
    Case("generate-device-meta", "generate.py", "a device that does not compute",
         lambda c: ("generate.py", ["--run=x", "--device=meta"]), ('device="meta"', "cpu, cuda or mps")),
    Case("generate-duration-memory", "generate.py", "a duration whose audio cannot fit in memory",
         lambda c: ("generate.py", [f"--run={make_run(c.tmp / 'runs')}", "--duration=1e7", f"--out={c.tmp / 'o.wav'}"]),
         ("--duration=1e+07 s", "GiB of host memory", "lower --duration"),
         varies=((r"[\d.e+]+ GiB are free", "<n> GiB are free"),)),
    Case("generate-melody-unreadable", "generate.py", "a melody file that is not audio",
         lambda c: ("generate.py", ["--run=x", f"--melody={write(c.tmp / 'tune.wav', b'not audio' * 20)}"]),
         ("--melody=<tmp>/tune.wav", "unreadable", "a melody is an audio file")),
    Case("generate-melody-short", "generate.py", "a melody shorter than one chroma window",
         lambda c: ("generate.py", ["--run=x", f"--melody={wav(c.tmp / 'tune.wav', 0.2)}"]),
         ("--melody=<tmp>/tune.wav", "0.20 s is too short", "at least 0.51 s")),
    Case("generate-melody-rate", "generate.py", "a melody at a rate too low to hold pitch",
         lambda c: ("generate.py", ["--run=x", f"--melody={wav(c.tmp / 'tune.wav', 1.0, 4000)}"]),
         ("--melody=<tmp>/tune.wav", "4000 Hz is too low", "at least 8000 Hz")),
    Case("generate-melody-text-model", "generate.py", "--melody for a model without a melody condition",
         lambda c: ("generate.py", [f"--run={make_run(c.tmp / 'runs')}", f"--melody={wav(c.tmp / 'tune.wav', 1.0)}",
                                    f"--out={c.tmp / 'o.wav'}"]),
         ("--melody=<tmp>/tune.wav", "has no melody (chroma) condition", "leave --melody out"),
         varies=((r"xps/[0-9a-f]{8}/", "xps/<sig>/"),)),
    Case("train-attribute-unknown", "train.py", "a text attribute that is not a sidecar field",
         lambda c: c.train("--attributes=colour"), ("attributes: 'colour' is not a sidecar field", "genre")),
    # -- grid files
    Case("grid-unknown", "python -m grids", "a grid that does not exist", lambda c: ("-m grids", ["nope"]),
         ("no grid 'nope'", "grids: debug")),
    Case("grid-syntax", "python -m grids", "a grid file with a syntax error",
         lambda c: _grid(c, "def explore(launcher)\n    pass\n"), ("<tmp>/mygrid.py:1", "SyntaxError")),
    Case("grid-no-explore", "python -m grids", "a grid file without explore()",
         lambda c: _grid(c, "x = 1\n"), ("<tmp>/mygrid.py", "no explore(launcher) function")),
    Case("grid-no-runs", "python -m grids", "explore() that adds no runs",
         lambda c: _grid(c, "def explore(launcher):\n    pass\n"), ("<tmp>/mygrid.py", "added no runs")),
    Case("grid-unknown-key", "python -m grids", "a run with a misspelt key",
         lambda c: _grid(c, "def explore(launcher):\n    launcher(batchsize=32)\n"),
         ("<tmp>/mygrid.py:2", 'unknown key "batchsize"', 'did you mean "batch_size"')),
    Case("grid-bad-value", "python -m grids", "a run with a value of the wrong type",
         lambda c: _grid(c, "def explore(launcher):\n    launcher(lr='fast')\n"),
         ("<tmp>/mygrid.py:2", "lr='fast' is not a float")),
    Case("grid-unknown-slurm", "python -m grids", "a misspelt SLURM setting",
         lambda c: _grid(c, "def explore(launcher):\n    launcher.slurm_(gpu=1)\n    launcher()\n"),
         ("<tmp>/mygrid.py:2", 'unknown SLURM setting "gpu"', 'did you mean "gpus"')),
    Case("grid-raises", "python -m grids", "a grid whose code raises",
         lambda c: _grid(c, "def explore(launcher):\n    launcher(lr=1 / 0)\n"),
         ("<tmp>/mygrid.py:2", "ZeroDivisionError")),
    Case("grid-plot-no-history", "python -m grids --plot", "--plot before any run of the grid has a history",
         lambda c: ("-m grids", [str(write(c.tmp / "mygrid.py", "def explore(launcher):\n    launcher.bind_('config/debug.py')\n"
                                           "    launcher()\n")), "--plot"], {"AUDIOCRAFT_DORA_DIR": str(c.tmp / "runs")}),
         ("--plot: no run of grid <tmp>/mygrid.py", "plot it later")),
    # -- team files (env.py)
    Case("team-missing", "env.py", "a team without a team file",
         lambda c: ("env.py", [], {"AUDIOCRAFT_TEAM": "nope"}), ("config/teams/nope.yaml not found", "create it")),
    Case("team-bad-yaml", "env.py", "a team file that is not YAML",
         lambda c: ("env.py", [], {"AUDIOCRAFT_CONFIG": str(write(c.tmp / "team.yaml", "a: [b"))}),
         ("<tmp>/team.yaml", "not valid YAML")),
    Case("team-bad-mapper", "env.py", "a dataset mapper that is not a regex",
         lambda c: ("env.py", [], {"AUDIOCRAFT_CONFIG": str(write(
             c.tmp / "team.yaml", "default:\n  dataset_mappers:\n    '[a': b\n"))}),
         ("<tmp>/team.yaml", "'[a' is not a valid regex")),
    Case("run-info-missing", "env.py info", "a run signature that does not exist",
         lambda c: ("env.py", ["info", "deadbeef"], {"AUDIOCRAFT_DORA_DIR": str(c.tmp / "runs")}),
         ("deadbeef", "<tmp>/runs/xps/deadbeef/config.json not found")),
    Case("plot-missing", "env.py plot", "a run signature that does not exist",
         lambda c: ("env.py", ["plot", "deadbeef", f"--out={c.tmp / 'c.png'}"], {"AUDIOCRAFT_DORA_DIR": str(c.tmp / "runs")}),
         ("<tmp>/runs/xps/deadbeef", "not a run directory", "give a run's signature or directory")),
    Case("plot-no-history", "env.py plot", "a run that has not finished an epoch",
         lambda c: (write(c.tmp / "runs" / "xps" / "abcd1234" / "config.json", "{}"),
                    ("env.py", ["plot", "abcd1234", f"--out={c.tmp / 'c.png'}"], {"AUDIOCRAFT_DORA_DIR": str(c.tmp / "runs")}))[1],
         ("<tmp>/runs/xps/abcd1234/history.jsonl not found", "plot it later")),
    # -- formats.py, generate.py export, data.py tokenizer, text.py
    Case("lm-missing", "formats.py lm", "an LM file that does not exist",
         lambda c: ("formats.py", ["lm", str(c.tmp / "state_dict.bin")]), ("<tmp>/state_dict.bin", "no such file")),
    Case("lm-wrong-keys", "formats.py lm", "a torch file that is not an AudioCraft LM",
         lambda c: (torch.save({"foo": 1}, c.tmp / "x.bin"), ("formats.py", ["lm", str(c.tmp / "x.bin")]))[1],
         ("<tmp>/x.bin", "needs 'best_state' and 'xp.cfg'")),
    Case("lm-pickle", "formats.py lm", "an LM file with pickled code",
         lambda c: ("formats.py", ["lm", str(_evil(c))]), ("<tmp>/evil.bin", "refused", "nothing was run"),
         never=("PWNED",)),
    Case("export-bad-config", "generate.py export", "a run whose config.json is not JSON",
         lambda c: ("generate.py", ["export", str(_run_with_config(c, "{oops")), str(c.tmp / "out")]),
         ("<tmp>/run/config.json", "not readable JSON", "remove it")),
    Case("export-format", "generate.py export", "a format it does not write",
         lambda c: ("generate.py", ["export", "--format=onnx", "RUN", str(c.tmp / "out")]),
         ("--format=onnx", "audiocraft, hf")),
    Case("export-hf-lut", "generate.py export --format=hf", "a run with the lookup-table conditioner",
         lambda c: ("generate.py", ["export", "--format=hf", str(_run(c)), str(c.tmp / "out")]),
         ("<tmp>/run/checkpoint.pt", "conditioner=lut", "--format=audiocraft")),
    Case("export-hf-no-t5", "generate.py export --format=hf", "a T5-conditioned run whose T5 directory is gone",
         lambda c: ("generate.py", ["export", "--format=hf", str(_run(c, "--conditioner=t5", f"--t5_path={c.tmp}/t5")),
                                    str(c.tmp / "out")]), ("<tmp>/t5", "--t5=PATH")),
    Case("export-hf-again", "generate.py export --format=hf", "a transformers MusicGen directory (already that format)",
         lambda c: ("generate.py", ["export", "--format=hf", str(_hf_dir(c)), str(c.tmp / "out")]),
         ("<tmp>/hf", "already a transformers MusicGen directory")),
    Case("generate-hf-decoder-alone", "generate.py", "a decoder alone (MusicgenForCausalLM) without --t5 / --codec",
         lambda c: ("generate.py", [f"--run={_hf_dir(c)}", f"--out={c.tmp / 'o.wav'}"]),
         ("<tmp>/hf", "MusicgenForCausalLM", "--t5=PATH and --codec=PATH")),
    Case("export-unknown-option", "generate.py export", "a misspelt option",
         lambda c: ("generate.py", ["export", "RUN", "OUT", "--codc=x"]), ('unknown key "codc"', '"codec"')),
    Case("tokenizer-vocab", "data.py tokenizer", "a vocabulary size that is not a number",
         lambda c: ("data.py", ["tokenizer", "m.jsonl", "out.model", "--vocab_size=many"]),
         ("vocab_size='many'", "is not an int")),
    Case("tokenizer-moved", "text.py tokenizer", "the command that moved to data.py",
         lambda c: ("text.py", ["tokenizer", "m.jsonl", "out.model"]), ("moved", "python data.py tokenizer")),
    # -- metrics.py
    Case("metrics-unknown", "metrics.py", "a misspelt metric", lambda c: ("metrics.py", ["fda", "ref", "gen"]),
         ("'fda'", 'did you mean "fad"', "choose from")),
    Case("metrics-no-dir", "metrics.py", "a folder of generated audio that does not exist",
         lambda c: ("metrics.py", ["clap", str(c.tmp / "gen")]), ("<tmp>/gen", "not a directory")),
    Case("metrics-weights-missing", "metrics.py", "no VGGish weights in the reference directory",
         lambda c: ("metrics.py", ["fad", str(wav(c.tmp / "refs" / "a.wav").parent),
                                   str(wav(c.tmp / "gen" / "a.wav").parent)], EMPTY_REF(c)),
         ("//reference/fad/vggish-10086976.pth", "vggish-10086976.pth", "--vggish=PATH")),
    Case("metrics-no-prompt", "metrics.py", "clap on generated audio without a .json prompt",
         lambda c: ("metrics.py", ["clap", str(wav(c.tmp / "gen" / "a.wav").parent)]),
         ("<tmp>/gen/a.json", "clap needs", '"prompt"')),
    Case("metrics-unpaired", "metrics.py", "kld with a generated file that has no reference of the same name",
         lambda c: ("metrics.py", ["kld", str(wav(c.tmp / "refs" / "a.wav").parent),
                                   str(wav(c.tmp / "gen" / "b.wav").parent)]),
         ("no b.* in <tmp>/refs", "<tmp>/gen/b.wav")),
    # -- evaluate.py
    Case("evaluate-no-run-dir", "evaluate.py", "a run signature that does not exist",
         lambda c: ("evaluate.py", ["--run=deadbeef", f"--runs_dir={c.tmp / 'runs'}", f"--dataset={c.data / 'demo'}",
                                    f"--out={c.tmp / 'eval'}"]), ("--run=deadbeef", "<tmp>/runs/xps", "--runs_dir")),
    Case("evaluate-metric-unknown", "evaluate.py", "a misspelt metric",
         lambda c: ("evaluate.py", ["--run=x", "--dataset=d", "--metrics=fad,chroma_cs"]),
         ("'chroma_cs'", 'did you mean "chroma_cos"', "choose from")),
    Case("evaluate-no-dataset", "evaluate.py", "neither --dataset nor --manifest",
         lambda c: ("evaluate.py", ["--run=x"]), ("--dataset=DIR", "--manifest=FILE")),
    Case("evaluate-no-split", "evaluate.py", "a dataset without the evaluate split",
         lambda c: ("evaluate.py", [f"--run={make_run(c.tmp / 'runs')}", "--dataset=" + str(write(
             c.tmp / "ds" / "train" / "data.jsonl", "").parents[1]), f"--out={c.tmp / 'eval'}"]),
         ("has no split 'evaluate'", "<tmp>/ds/evaluate/data.jsonl", "--split")),
    Case("evaluate-manifest-missing", "evaluate.py", "a manifest that does not exist",
         lambda c: ("evaluate.py", [f"--run={make_run(c.tmp / 'runs')}", f"--manifest={c.tmp / 'test.jsonl'}"]),
         ("<tmp>/test.jsonl", "does not exist")),
    Case("evaluate-weights-missing", "evaluate.py", "fad without VGGish weights in the reference directory",
         lambda c: ("evaluate.py", [f"--run={make_run(c.tmp / 'runs')}", f"--dataset={c.data / 'demo'}", "--metrics=fad",
                                    f"--out={c.tmp / 'eval'}"], EMPTY_REF(c)),
         ("//reference/fad/vggish-10086976.pth", "vggish-10086976.pth", "--vggish=PATH")),
    Case("evaluate-run-in-use", "evaluate.py", "a run that a training process holds (its lock)",
         lambda c: ("evaluate.py", [f"--run={_locked_run(c)}", f"--dataset={c.data / 'demo'}", f"--out={c.tmp / 'eval'}"]),
         ("in use by process", "history", "--history=False"),
         varies=((r"process \d+ on \S+ \(since [^;]+;", "process <pid> on <host> (since <time>;"),
                 (r"xps/[0-9a-f]{8}", "xps/<sig>"))),
]


# ----------------------------------------------------------------------------------------------------------
# Running a case and the table

def make_data(root):
    demo.make_demo_set(root / "demo", seed=0, sizes={"train": 4, "valid": 2, "evaluate": 2, "generate": 2})
    return root


def _snapshot(root):
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def provoke(case, tmp, data_dir):
    """Run the case's command -> (exit status, the message as the table shows it, whole output, files changed)."""
    ctx = Ctx(tmp, data_dir)
    tmp.mkdir(parents=True, exist_ok=True)
    made = case.make(ctx)
    target, argv, env = made if len(made) == 3 else (*made, {})
    before = _snapshot(tmp)
    proc = fu.Training(argv, tmp.parent / f"{tmp.name}.out", extra_env=env, target=target)
    code = proc.wait(120)
    out = proc.output()
    after = _snapshot(tmp)
    changed = sorted(k for k in after.keys() | before.keys() if after.get(k) != before.get(k))
    lines = [line for line in out.splitlines() if line.startswith(case.line)]
    message = show(lines[-1], ctx) if lines else None
    for pattern, placeholder in case.varies:
        message = message and re.sub(pattern, placeholder, message)
    return code, message, out, changed


def show(text, ctx):
    """Machine-specific directories as placeholders."""
    for path, name in ((ctx.tmp, "<tmp>"), (ctx.data, "<data>"), (ROOT, "<repo>")):
        text = text.replace(str(path), name)
    return text


def read_table():
    """{id: (entry, bad input, exit status, message)} from BAD_INPUTS.md."""
    rows = {}
    for line in TABLE.read_text().splitlines():
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) == 5 and cells[0].startswith("`"):
            message = cells[4][3:-3] if cells[4].startswith("`` ") and cells[4].endswith(" ``") else cells[4]
            rows[cells[0].strip("`")] = (cells[1], cells[2], cells[3], message)
    return rows


def write_table(results):
    head = TABLE.read_text().split("\n| id |")[0] if TABLE.exists() else "# Bad input\n"
    lines = [head.rstrip() + "\n", "| id | entry point | bad input | exit | what the user sees |",
             "| --- | --- | --- | --- | --- |"]
    for case in CASES:
        code, message = results[case.id]
        cell = (message or "(no message)").replace("|", "\\|")
        lines.append(f"| `{case.id}` | {case.entry} | {case.bad} | {code} | `` {cell} `` |")
    TABLE.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def shared_data(tmp_path_factory):
    fu.context()
    yield make_data(tmp_path_factory.mktemp("bad_inputs_data"))
    fu.kill_leftovers()


@pytest.mark.parametrize("case", CASES, ids=str)
def test_bad_input(case, tmp_path, shared_data):
    code, message, out, changed = provoke(case, tmp_path / "case", shared_data)
    assert code == case.code, out
    assert "Traceback" not in out, out
    assert message is not None, f"no line starting {case.line!r}:\n{out}"
    for part in case.must:
        assert part in message, f"{part!r} not in {message!r}"
    assert case.writes or not changed, f"wrote {changed}"
    for name in case.never:
        assert not (tmp_path / "case" / name).exists(), f"{name} exists: the pickle's code ran"
    row = read_table().get(case.id)
    assert row is not None, f"{case.id} is not in {TABLE.name}: python tests/test_bad_inputs.py --write"
    assert (row[2], row[3]) == (str(code), message), (f"{TABLE.name} is out of date for {case.id}: python "
                                                      f"tests/test_bad_inputs.py --write")


def test_every_row_of_the_table_is_a_case():
    assert list(read_table()) == [c.id for c in CASES]


# ----------------------------------------------------------------------------------------------------------
# Security


def test_trusted_audiocraft_checkpoint_th_continues_from_its_weights(tmp_path, shared_data):
    import model as lm_lib
    import train
    ctx = Ctx(tmp_path, shared_data)
    target, argv = ctx.train("--lr=0", "--trust_checkpoint=True")
    cfg = train.parse_args(argv)
    torch.manual_seed(3)
    source = {k: v.half() for k, v in lm_lib.build_lm(train.config_dict(cfg)).state_dict().items()}  # AudioCraft: fp16
    # AudioCraft's solver checkpoint: its config pickled as an object (a DictConfig there; any class will do)
    torch.save({"best_state": {"model": source}, "xp.cfg": argparse.Namespace(lr=1e-4), "model": {}, "history": []},
               tmp_path / "checkpoint.th")
    proc = fu.Training(argv + [f"--continue_from={tmp_path / 'checkpoint.th'}"], tmp_path / "out.txt", target=target)
    assert proc.wait() == 0, proc.output()
    assert f"continuing from the weights in {tmp_path / 'checkpoint.th'}" in proc.output()
    (run,) = (tmp_path / "runs" / "xps").iterdir()
    final = train.load_checkpoint(run / "checkpoint.pt")["model"]
    for k, v in source.items():
        assert torch.equal(final[k], v.float()), k


def test_manifest_paths_are_only_read_never_run_or_written(tmp_path, shared_data):
    root = tmp_path / "ds"
    markers = [tmp_path / f"ran{i}" for i in range(4)]
    outside = wav(tmp_path / "elsewhere" / "far.wav", seconds=1.2)
    odd = [f"$(touch {markers[0]}).wav", f"`touch {markers[1]}`.wav", f"x; touch {markers[2]}.wav",
           f"| touch {markers[3]} #.wav", "../" * 8 + str(outside)[1:],  # climbs out of the dataset: read, fine
           "~/no-such-nanomusicgen-file.wav"]
    good = [wav(root / "train" / f"{i}.wav", seconds=1.2) for i in range(2)]
    rows = [{"path": p, "duration": 1.2, "sample_rate": 32000} for p in odd + [str(g) for g in good]]
    dataset(Ctx(tmp_path, shared_data), manifest_lines(*rows))
    watched = {k: v for k, v in _snapshot(tmp_path).items()}
    proc = fu.Training(TRAIN + [f"--runs_dir={tmp_path / 'runs'}", f"--dataset={root}", f"--cache_dir={tmp_path / 'cache'}",
                                "--max_skip_fraction=0.9", "--updates_per_epoch=2"],
                       tmp_path / "out.txt", target="train.py")
    assert proc.wait() == 0, proc.output()
    assert not [m for m in markers if m.exists()]
    after = _snapshot(tmp_path)
    assert {k: after.get(k) for k in watched} == watched  # nothing outside the run and cache directories changed
    new = {k.split("/")[0] for k in after.keys() - watched.keys()}
    assert new <= {"runs", "cache", "out.txt"}, new
    # the file outside the dataset was read (its codes are cached); the odd names were looked for and skipped
    (index,) = (tmp_path / "cache").rglob("train-*/index.0.jsonl")
    read = {Path(r["path"]).name: "error" not in r for r in map(json.loads, index.read_text().splitlines())}
    assert read["far.wav"] and read["0.wav"] and read["1.wav"] and sum(read.values()) == 3
    assert "skipped 5" in proc.output()


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_bad_inputs.py --write   (runs every case, rewrites BAD_INPUTS.md)")
    with tempfile.TemporaryDirectory() as d:
        shared = make_data(Path(d) / "data")
        results = {}
        for case in CASES:
            code, message, _, _ = provoke(case, Path(d) / case.id / "case", shared)
            results[case.id] = (code, message)
            print(f"{case.id}: {code} {message}")
    write_table(results)
    print(f"wrote {TABLE}")
