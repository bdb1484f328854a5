"""MusicGen 32 kHz small, medium and large: AudioCraft's musicgen_base_32khz grid in our terms.

    python -m grids musicgen_base_32khz --dry_run                       # the three runs, their sbatch scripts
    python -m grids musicgen_base_32khz --dataset=/data/music_32khz     # submit them on your dataset

As AudioCraft: small on 32 GPUs, medium on 64, large on 96 (8 per node; the global batch of 192 is then 6,
3 and 2 per GPU), medium and large sharded (FSDP). config/large.py already carries the large run's lower
dropouts and clipping. `parallel` is an infrastructure key: switching it keeps the run's signature.
"""


def explore(launcher):
    launcher.bind_("config/base.py")
    launcher.slurm_(gpus=32, mem_per_gpu=40, time=4320)
    launcher()                                               # small
    sharded = launcher.bind(parallel="fsdp")
    sharded.slurm(gpus=64)("config/medium.py")
    sharded.slurm(gpus=96)("config/large.py")
