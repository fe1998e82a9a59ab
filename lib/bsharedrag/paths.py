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


def data_mirror() -> Path:
    """The local mirror of public data: $BSHAREDRAG_DATA_MIRROR, else ../shared/data beside the checkout."""
    return Path(os.environ.get(MIRROR_ENV) or REPO_ROOT.parent / "shared" / "data")


def cache_dir() -> Path:
    """Where converted weights live between runs: $BSHAREDRAG_CACHE, else ~/.cache/bsharedrag."""
    path = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "bsharedrag")
    path.mkdir(parents=True, exist_ok=True)
    return path
