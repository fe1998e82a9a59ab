"""A run's result files kept in git: `bsharedrag archive outputs/<run_id>` copies its configuration, machine facts,
step times, every step's metrics.json and tables, 07's result rows and context, and `bsharedrag heldout`'s metrics into
docs/runs/<run_id>/ with the run's own layout. outputs/ holds weights, indexes and caches, and stays on the machine
that made them; an archived run can still be read (`bsharedrag results docs/runs/<run_id>`), gathered into 07
(`gather_runs`) and drawn again (`bsharedrag results ... --out DIR`) on any machine. Rankings, generated answers and
mined negatives are not kept: they are large, or carry text of the data sets, which are not ours to redistribute."""

from __future__ import annotations

import shutil
from pathlib import Path

from . import paths
from .artefacts import atomic_dir

ARCHIVE = paths.REPO_ROOT / "docs" / "runs"
KEPT = ("resolved.yaml", "env.txt", "timings.json", "*/metrics.json", "*/tables/*.md", "*/tables/*.tex",
        "07_ablations/results.jsonl", "07_ablations/context.json", "heldout/metrics_*.json")
MAX_FILE_BYTES = 1 << 20  # any kept file above this is not a summary: refuse rather than bloat the repository


def kept_files(run_dir: str | Path) -> list[Path]:
    """The files of `run_dir` an archive keeps, relative to it."""
    run_dir = paths.run_folder(run_dir, f"runs are under {paths.OUTPUTS}")
    files = sorted({p.relative_to(run_dir) for pattern in KEPT for p in run_dir.glob(pattern) if p.is_file()})
    too_big = [f"{f} ({(run_dir / f).stat().st_size:,} bytes)" for f in files
               if (run_dir / f).stat().st_size > MAX_FILE_BYTES]
    if too_big:
        raise ValueError(f"{', '.join(too_big)} in {run_dir} exceed the archive's {MAX_FILE_BYTES:,} bytes a file; "
                         "an archive keeps summaries only: find what wrote such a file before archiving")
    return files


def archive_run(run_dir: str | Path, to: str | Path = ARCHIVE) -> Path:
    """Copy `run_dir`'s kept files into `to/<run_id>/`, replacing an earlier archive of the run whole; returns it.
    A run still in progress can be archived and archived again when it ends."""
    run_dir = Path(run_dir)
    files = kept_files(run_dir)
    target = Path(to) / run_dir.name
    with atomic_dir(target) as staging:
        for f in files:
            (staging / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(run_dir / f, staging / f)
    return target


def find_run(run_id: str) -> Path:
    """A run by its id: outputs/<run_id> where this machine has it, else its archive docs/runs/<run_id>."""
    for root in (paths.OUTPUTS, ARCHIVE):
        if (root / run_id / "resolved.yaml").is_file():
            return root / run_id
    raise FileNotFoundError(f"run {run_id!r} is neither in {paths.OUTPUTS} nor archived in {ARCHIVE}; give the id of "
                            f"a run folder there (ls {paths.OUTPUTS} {ARCHIVE})")
