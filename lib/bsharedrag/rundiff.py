"""Whether two runs agree: `bsharedrag diff RUN_A RUN_B` sets every quality figure of one run beside the other's:
each step's metrics.json, 07's result rows and `bsharedrag heldout`'s metrics, field by field, leaving out what the
machine decides (times, memory, throughput) and where the run wrote its files. Made for the question a rerun asks
(another commit, another machine, a fresh checkout): did anything but the clock move? Archived runs (docs/runs/) are
read as well as outputs/."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from . import paths
from .artefacts import read_jsonl

METRICS = ("*/metrics.json", "heldout/metrics_*.json")
ROWS = "07_ablations/results.jsonl"
# a field whose name says it measures the machine, or names a file or a resumed step, is no quality figure
COST = re.compile(r"(seconds|_s|_ms|_mb|memory|rss|latency)(_|$)|^(saved_to|answers_file|resumed)$")


def _leaves(value, path: tuple[str, ...] = ()):
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, (*path, str(key)))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _leaves(item, (*path, f"[{i}]"))
    else:
        yield path, value


def _row_key(row: dict, number: int, where: Path) -> str:
    try:
        return f"{row['variant']}/{row['dataset']}/seed {row.get('seed')}"
    except KeyError as err:
        raise ValueError(f"{where} row {number} has no {err.args[0]!r}: it is not a 07 result row") from None


def quality_fields(run_dir: str | Path) -> dict[str, object]:
    """Every quality figure of a run, by a path that names its file and its place in it."""
    run_dir = paths.run_folder(run_dir, "give outputs/<run_id> or docs/runs/<run_id>")
    fields: dict[str, object] = {}

    def add(prefix: str, value) -> None:
        for path, leaf in _leaves(value):
            if not any(COST.search(part) for part in path):
                fields["/".join((prefix, *path))] = leaf

    for pattern in METRICS:
        for f in sorted(run_dir.glob(pattern)):
            add(str(f.relative_to(run_dir)), json.loads(f.read_text()))
    rows = run_dir / ROWS
    if rows.is_file():
        for number, row in enumerate(read_jsonl(rows), 1):
            add(f"{ROWS}/{_row_key(row, number, rows)}", row)
    return fields


def _equal(a, b, tolerance: float) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, (int, float)) \
            or not isinstance(b, (int, float)):
        return a == b
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= tolerance


@dataclass
class RunDiff:
    same: int = 0  # equal to the last digit
    close: int = 0  # numbers apart by no more than the tolerance
    different: list[tuple[str, object, object]] = field(default_factory=list)
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    largest_close: float = 0.0  # the largest gap among the close ones

    @property
    def agree(self) -> bool:
        return not (self.different or self.only_a or self.only_b)


def diff_runs(run_a: str | Path, run_b: str | Path, tolerance: float = 0.0) -> RunDiff:
    """Compare two runs' quality figures; numbers within `tolerance` (absolute) count as close, not different."""
    if tolerance < 0 or math.isnan(tolerance):
        raise ValueError(f"tolerance {tolerance!r} must be a number >= 0 (0: equal to the last digit)")
    a, b = quality_fields(run_a), quality_fields(run_b)
    out = RunDiff(only_a=sorted(set(a) - set(b)), only_b=sorted(set(b) - set(a)))
    for key in sorted(set(a) & set(b)):
        x, y = a[key], b[key]
        if _equal(x, y, 0.0):
            out.same += 1
        elif _equal(x, y, tolerance):
            out.close += 1
            out.largest_close = max(out.largest_close, abs(x - y))
        else:
            out.different.append((key, x, y))
    return out


def describe(d: RunDiff, tolerance: float, show: int) -> str:
    """The lines `bsharedrag diff` prints."""
    total = d.same + d.close + len(d.different)
    lines = [f"{total} quality fields in both runs: {d.same} equal, {d.close} within {tolerance:g}"
             + (f" (at most {d.largest_close:.2g} apart)" if d.close else "") + f", {len(d.different)} different; "
             f"{len(d.only_a)} only in the first run, {len(d.only_b)} only in the second"]
    for key, x, y in d.different[:show]:
        gap = f" ({y - x:+.3g})" if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (x, y)) else ""
        lines.append(f"  {key}: {x!r} vs {y!r}{gap}")
    for name, keys in (("only in the first run", d.only_a), ("only in the second run", d.only_b)):
        lines += [f"  {name}: {k}" for k in keys[:show]]
    hidden = max(len(d.different) - show, 0) + max(len(d.only_a) - show, 0) + max(len(d.only_b) - show, 0)
    if hidden:
        lines.append(f"  ... and {hidden} more (--show N)")
    return "\n".join(lines)
