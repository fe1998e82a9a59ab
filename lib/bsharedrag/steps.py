"""What every notebook's setup does: open its step folder in the run, seed everything, print versions."""

from __future__ import annotations

import platform
import random
import subprocess
import time
import warnings
from pathlib import Path

import numpy as np

from . import paths


def git_sha(short: bool = True) -> str:
    args = ["git", "rev-parse", "--short", "HEAD"] if short else ["git", "rev-parse", "HEAD"]
    try:
        out = subprocess.run(args, cwd=paths.REPO_ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "nogit"
    except (OSError, subprocess.SubprocessError):
        return "nogit"


def _dirty() -> str:
    """The mark "-dirty" when tracked files differ from HEAD: figures made then came from code no commit holds."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=paths.REPO_ROOT,
                             capture_output=True, text=True, timeout=10)
        return "-dirty" if out.returncode == 0 and out.stdout.strip() else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def new_run_id(name: str) -> str:
    """Timestamp to the second + short git SHA (marked "-dirty" as in versions()) + config name."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{git_sha()}{_dirty()}-{name}"


def open_step(run_dir: str, step: str) -> Path:
    """The step's own output folder inside the run; a notebook opened by hand gets a fresh `interactive` run."""
    if not run_dir:
        run_dir = str(paths.OUTPUTS / new_run_id("interactive"))
        warnings.warn(f"no run_dir given (the runner sets it); writing to {run_dir}", stacklevel=2)
    step_dir = Path(run_dir) / step
    step_dir.mkdir(parents=True, exist_ok=True)
    return step_dir


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def versions() -> dict[str, str]:
    """Versions of the packages whose behaviour the numbers depend on."""
    import importlib.metadata as md

    out = {"python": platform.python_version(), "machine": platform.machine(), "git": git_sha() + _dirty()}
    for pkg in ("bsharedrag", "torch", "transformers", "peft", "trl", "accelerate", "faiss-cpu", "faiss-gpu",
                "sentence-transformers", "bm25s", "papermill"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
