"""Every path the project uses, rooted at this package's own file, never at the working directory."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = REPO_ROOT / "configs"
NOTEBOOKS = REPO_ROOT / "notebooks"
OUTPUTS = Path(os.environ.get("BSHAREDRAG_OUTPUTS") or REPO_ROOT / "outputs")  # runs; override to put them elsewhere
DATA = REPO_ROOT / "data"
DATA_RAW = DATA / "raw"
SOURCES = DATA / "sources.yaml"

MIRROR_ENV = "BSHAREDRAG_DATA_MIRROR"
CACHE_ENV = "BSHAREDRAG_CACHE"


def run_folder(run_dir: str | Path, hint: str = "give outputs/<run_id>") -> Path:
    """`run_dir` as a Path where it holds a run (its resolved.yaml); otherwise FileNotFoundError naming it and `hint`."""
    run_dir = Path(run_dir)
    if not (run_dir / "resolved.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no resolved.yaml); {hint}")
    return run_dir


def data_mirror() -> Path:
    """The local mirror of public data: $BSHAREDRAG_DATA_MIRROR, else ../shared/data beside the checkout."""
    return Path(os.environ.get(MIRROR_ENV) or REPO_ROOT.parent / "shared" / "data")


def cache_dir() -> Path:
    """Where converted weights live between runs: $BSHAREDRAG_CACHE, else ~/.cache/bsharedrag."""
    path = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "bsharedrag")
    path.mkdir(parents=True, exist_ok=True)
    return path
