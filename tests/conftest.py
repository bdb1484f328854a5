"""Make the project's top-level modules importable and keep every test away from the user's environment."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _fresh_environment(monkeypatch):
    """No AUDIOCRAFT_* or SLURM variable of the machine leaks into a test; env's cache is reset around each."""
    import env
    for key in list(os.environ):
        if key.startswith(("AUDIOCRAFT_", "SLURM_")) or key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
            monkeypatch.delenv(key)
    env.reset()
    yield
    env.reset()
