"""python -m grids NAME [--dry_run] [--local] [--clear [--yes]] [--key=value ...] | --cancel | --tail SIG | --plot[=FILE]

The grid's status table; on a SLURM cluster, also submits its runs that are not queued, running or done
(--local: runs them here instead). --clear cancels and wipes the runs first, then launches them afresh.
--key=value adds an override to every run. --plot draws the training curves of its runs that have a history
to FILE (default curves_NAME.png; needs matplotlib) and launches nothing. See grids/__init__.py for grid files.
"""
import sys
from pathlib import Path

import env
import grids
from env import UserError

FLAGS = {"--dry_run", "--local", "--cancel", "--clear", "--yes"}
USAGE = ("usage: python -m grids NAME [--dry_run|--local|--cancel|--clear [--yes]|--tail SIG|--plot[=FILE]] "
         "[--key=value ...]")


def parse(argv):
    flags, extra, names, tail, plot = set(), {}, [], None, None
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in FLAGS:
            flags.add(arg[2:])
        elif arg == "--plot" or arg.startswith("--plot="):
            plot = arg.partition("=")[2] or True
        elif arg == "--tail" or arg.startswith("--tail="):
            tail = arg.partition("=")[2] or (args.pop(0) if args else "")
            if not tail:
                raise UserError("--tail needs a run signature: --tail SIG")
        elif arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if not eq:
                raise UserError(f'"{arg}" is neither a flag ({", ".join(sorted(FLAGS))}, --tail SIG) nor --key=value')
            extra[key] = value
        else:
            names.append(arg)
    if len(names) != 1 and not (tail and not names):
        raise UserError(f"expected one grid name, got {names or 'none'}; {USAGE}")
    actions = flags & {"local", "cancel", "clear"}
    if ("cancel" in actions and len(actions) > 1) or ((tail or plot) and actions) or (tail and plot):
        got = sorted(f"--{a}" for a in actions) + ["--tail"] * bool(tail) + ["--plot"] * bool(plot)
        raise UserError(f"--cancel, --tail and --plot go alone (got {', '.join(got)})")
    if plot and not names:
        raise UserError(f"--plot needs a grid name; {USAGE}")
    return (names[0] if names else None), flags, extra, tail, plot


def tail_run(name, extra, sig):
    """Follow a run of the grid (a signature prefix will do), or any run directory by its signature."""
    if name:
        runs = [r for r in grids.load(name, extra) if r.sig.startswith(sig)]
        if len(runs) != 1:
            raise UserError(f"--tail {sig}: {'no run' if not runs else 'several runs'} of grid {name} match")
        run = runs[0]
        going = lambda: grids.status([run])[0]["status"] in ("queued", "running")   # noqa: E731
        return grids.tail(run.dir, still_going=going)
    path = env.run_dir(sig)
    if not path.is_dir():
        raise UserError(f"--tail {sig}: no run directory {path}")
    return grids.tail(path, still_going=lambda: env.run_status(path)["status"] == "running")


def plot_grid(name, runs, out):
    """The curves of the grid's runs that have a history, to one PNG."""
    import loggers
    started = [r for r in runs if (r.dir / "history.jsonl").is_file()]
    if not started:
        raise UserError(f"--plot: no run of grid {name} has finished an epoch yet (no history.jsonl); plot it later")
    out = Path(out if isinstance(out, str) else f"curves_{Path(name).stem}.png")
    loggers.plot_runs([r.dir for r in started], out, title=f"grid {Path(name).stem}: {len(started)} of {len(runs)} runs")
    print(f"wrote {out} ({len(started)} of {len(runs)} runs; the others have no history yet)"
          if len(started) < len(runs) else f"wrote {out}")


def usage():
    names = sorted(f.stem for f in (grids.ROOT / "grids").glob("*.py") if not f.stem.startswith("_"))
    return f"{__doc__.strip()}\n\ngrids here: {', '.join(names)}"


def main(argv):
    name, flags, extra, sig, plot = parse(argv)
    if sig:
        tail_run(name, extra, sig)
        return 0
    runs = grids.load(name, extra)
    slurm = grids.slurm_available()
    rows = grids.status(runs)
    print(grids.table(name, runs, rows))
    print(f"(status from {'SLURM and ' if slurm else ''}the run directories)")
    if plot:
        plot_grid(name, runs, plot)
        return 0
    if "dry_run" in flags:
        if "clear" in flags:
            print(f"--clear would cancel and wipe {sum(r.dir.exists() for r in runs)} run director(ies)")
        if "local" in flags:
            grids.run_local(runs, rows, dry_run=True)
        elif "cancel" not in flags:
            grids.submit(name, runs, rows, dry_run=True)
        return 0
    if "cancel" in flags:
        if not slurm:
            raise UserError("--cancel: no SLURM here (sbatch/sinfo not found or not answering)")
        if not grids.cancel(runs, rows):
            print("nothing to cancel: no run of this grid is queued or running")
        return 0
    if "clear" in flags:
        wiped = [r for r in runs if r.dir.exists()]
        if wiped and sys.stdin.isatty() and "yes" not in flags:
            answer = input(f"cancel and wipe {len(wiped)} run(s) of grid {name} (checkpoints included)? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                return 1
        grids.clear(runs, rows)
        rows = grids.status(runs)
        if not slurm and "local" not in flags:
            return 0
    if "local" in flags:
        return 1 if grids.run_local(runs, rows) else 0
    if not slurm:
        print("no SLURM here: add --local to run them on this machine, --dry_run to see the sbatch scripts")
        return 0
    grids.submit(name, runs, rows)
    return 0


if __name__ == "__main__":
    env.cli(main, help=usage)
