"""Two tiny CPU runs of config/debug.py at two learning rates: the launcher end to end, on a laptop or a cluster.

    python -m grids debug --local              # here, one after the other
    python -m grids debug                      # on SLURM: one CPU each, ten minutes
    python -m grids debug --epochs=1 --dry_run # every run with an extra override; the sbatch scripts
"""


def explore(launcher):
    launcher.bind_("config/debug.py")
    launcher.slurm_(gpus=0, cpus=1, mem=2, time=10, signal_seconds=30)
    for lr in (1e-3, 3e-3):
        launcher(lr=lr)
