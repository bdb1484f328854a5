"""Helpers for tests/test_faults.py: training processes forked from a warm zygote, and faults injected into them.

A fresh `python train.py` spends ~6 s of CPU importing torch, torch._dynamo (AdamW imports it) and fitting the
debug codec before its first update. The tests start two dozen training processes, so they fork them from one
process that has done all that (multiprocessing's forkserver, with this module preloaded): each starts in a
fraction of a second and is still a separate process that a test can kill -9.

The faults are injected into the forked process before train.main runs, so the library needs no test hooks:
    slow_save=S     torch.save writes half a checkpoint, sleeps S, writes the rest; the rename to checkpoint.pt
                    waits S more (wide windows for kill -9 in the middle of a write and before the rename; each is
                    announced on stderr: "fault: writing a checkpoint", "fault: renaming to checkpoint.pt")
    fsize=N         files cannot grow past N bytes (RLIMIT_FSIZE, SIGXFSZ ignored): writes fail with EFBIG
    inf_grad=1,3    the gradient (not the loss) is infinite in those updates (0-based); inf_grad=1@1: on rank 1 only
    compile_eager=1 compile=True traces with dynamo but runs the graphs eagerly (no C++ build: seconds, not
                    minutes); train.main prints "dynamo: N graphs" when it returns
    slow=M.F:S      module M's function F (or M.Class.method) sleeps S seconds before each call (slow disks, codecs)
"""
import io
import multiprocessing
import multiprocessing.forkserver
import os
import signal
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ZYGOTE = "NANOMUSICGEN_TEST_ZYGOTE"


def _warm():
    """In the zygote: everything a training process loads before its first update, done once."""
    import torch
    torch.set_num_threads(1)
    import torch._dynamo  # noqa: F401 (torch.optim imports it on first use: ~2 s)
    import demo
    import train  # noqa: F401
    demo.debug_codec_state()  # cached per process: the children inherit it


if os.environ.get(ZYGOTE) == "1":
    _warm()


def _inject(fault):
    import torch
    import train
    for item in filter(None, (fault or "").split(";")):
        name, _, value = item.partition("=")
        if name == "slow_save":
            delay, real_save, real_replace = float(value), torch.save, os.replace

            def slow_save(obj, f, *args, **kw):
                buf = io.BytesIO()
                real_save(obj, buf, *args, **kw)
                blob = buf.getvalue()
                print("fault: writing a checkpoint", file=sys.stderr, flush=True)
                f.write(blob[:len(blob) // 2])
                f.flush()
                time.sleep(delay)
                f.write(blob[len(blob) // 2:])

            def slow_replace(src, dst, *args, **kw):
                if str(dst).endswith("checkpoint.pt"):
                    print("fault: renaming to checkpoint.pt", file=sys.stderr, flush=True)
                    time.sleep(delay)
                return real_replace(src, dst, *args, **kw)

            torch.save, os.replace = slow_save, slow_replace
        elif name == "fsize":
            import resource
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (int(value), int(value)))
        elif name == "slow":
            import importlib
            where, _, delay = value.rpartition(":")
            module, *attrs = where.split(".")
            owner = importlib.import_module(module)
            for a in attrs[:-1]:
                owner = getattr(owner, a)
            real = getattr(owner, attrs[-1])

            def slowed(*args, _real=real, _delay=float(delay), **kw):
                time.sleep(_delay)
                return _real(*args, **kw)

            setattr(owner, attrs[-1], slowed)
        elif name == "inf_grad":
            value, _, only_rank = value.partition("@")
            if only_rank and os.environ.get("RANK", "0") != only_rank:
                continue
            bad, real_loss, calls = {int(v) for v in value.split(",")}, train.forward_loss, [0]

            class InfGrad(torch.autograd.Function):
                @staticmethod
                def forward(ctx, x):
                    return x.clone()

                @staticmethod
                def backward(ctx, grad):
                    return grad * float("inf")

            def forward_loss(step, batch, *args, **kw):  # training calls (with grad) count the updates
                ce, ce_q, n = real_loss(step, batch, *args, **kw)
                if torch.is_grad_enabled():
                    calls[0] += 1
                    if calls[0] - 1 in bad:
                        ce = InfGrad.apply(ce)
                return ce, ce_q, n

            train.forward_loss = forward_loss
        elif name == "compile_eager":
            real_compile, real_main, real_torch_compile = torch.nn.Module.compile, train.main, torch.compile
            torch.nn.Module.compile = lambda self, *a, **kw: real_compile(self, *a, **{**kw, "backend": "eager"})
            torch.compile = lambda fn=None, mode=None, **kw: real_torch_compile(fn, **{**kw, "backend": "eager"})

            def main(argv):
                code = real_main(argv)
                from torch._dynamo.utils import counters
                print(f"dynamo: {counters['stats']['unique_graphs']} graphs", flush=True)
                return code

            train.main = main
        else:
            raise ValueError(f"unknown fault {name!r}")


def _child(target, argv, log, environ, fault):
    """Body of a forked process, stdout and stderr in `log`. target "train": train.main(argv) as `python train.py`
    runs it (faults patch the imported modules); a file name: that script as __main__; "-m NAME": a module's
    __main__ (the real command lines, for their exit status and messages)."""
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(ROOT)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    code = 1
    try:
        import runpy
        import env
        env.reset()
        _inject(fault)
        if target == "train":
            import train
            try:
                code = train.main(argv)
            except env.UserError as e:  # what train.py's __main__ block does
                print(f"error: {e}", file=sys.stderr)
                code = 2
        elif target.startswith("-m "):
            sys.argv = [target[3:]] + list(argv)
            runpy.run_module(target[3:], run_name="__main__", alter_sys=True)
            code = 0
        else:
            sys.argv = [str(ROOT / target)] + list(argv)
            runpy.run_path(str(ROOT / target), run_name="__main__")
            code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


_context = None


def context():
    """multiprocessing's forkserver with this module preloaded (and warm), started once per test session."""
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        # pytest too: each child imports its parent's __main__ (pytest's) before running
        _context.set_forkserver_preload([Path(__file__).stem, "pytest"])
        # Python 3.11's forkserver ignores the parent's sys.path when it preloads: PYTHONPATH finds this module.
        saved = {k: os.environ.get(k) for k in (ZYGOTE, "OMP_NUM_THREADS", "PYTHONPATH")}
        paths = [str(ROOT), str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]
        os.environ.update({ZYGOTE: "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, paths))})
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return _context


class Training:
    """One forked `python train.py ...` process (or another command line: target, see _child); its stdout and stderr
    go to `log`."""

    def __init__(self, argv, log, extra_env=None, fault=None, target="train"):
        environ = {k: v for k, v in os.environ.items()
                   if not k.startswith(("AUDIOCRAFT_", "SLURM_")) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        environ.update(OMP_NUM_THREADS="1", **(extra_env or {}))
        self.log = Path(log)
        self.started = time.time()
        self.proc = context().Process(target=_child, args=(target, list(argv), str(log), environ, fault), daemon=False)
        self.proc.start()
        _started.append(self)

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc.is_alive()

    def signal(self, signum):
        os.kill(self.proc.pid, signum)

    def wait(self, timeout=120):
        self.proc.join(timeout)
        if self.proc.exitcode is None:
            self.proc.kill()
            self.proc.join(10)
            raise AssertionError(f"training did not end within {timeout} s: {self.output()[-3000:]}")
        return self.proc.exitcode

    def output(self):
        return self.log.read_text() if self.log.exists() else ""


_started = []


def kill_leftovers():
    """SIGKILL every process a failed test left running (or stopped)."""
    for t in _started:
        if t.proc.exitcode is None and t.proc.is_alive():
            t.proc.kill()
            t.proc.join(10)
    _started.clear()


def wait_until(predicate, proc=None, timeout=60, poll=0.005, what="condition"):
    """Poll until predicate() is true; fail if `proc` (a Training) ends first or time runs out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc is not None and not proc.alive():
            if predicate():
                return
            raise AssertionError(f"training ended (exit {proc.proc.exitcode}) before {what}: {proc.output()[-3000:]}")
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")
