"""Progress that suits where the code runs: a tqdm bar in JupyterLab, plain log lines in batch (papermill) runs."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
BATCH_ENV = "BSHAREDRAG_BATCH"  # set by the runner for the notebooks it executes


def progress(items: Iterable[T], total: int | None = None, desc: str = "", every: float = 0.1) -> Iterator[T]:
    """Yield `items`, reporting progress as a bar interactively or as a line per `every` of the total in batch runs."""
    if not os.environ.get(BATCH_ENV):
        from tqdm.auto import tqdm

        yield from tqdm(items, total=total, desc=desc)
        return
    total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)
    start, next_report = time.perf_counter(), every
    for done, item in enumerate(items, start=1):
        yield item
        if total and (done / total >= next_report or done == total):
            print(f"{desc}: {done}/{total} ({time.perf_counter() - start:.1f}s)", file=sys.stderr, flush=True)
            next_report += every
