"""Evaluate retrieval systems on a split: rank, save the rankings, score them."""

from __future__ import annotations

from pathlib import Path

from .artefacts import atomic_write_json
from .backbone import Backbone
from .data import RetrievalDataset
from .metrics import evaluate_retrieval
from .systems import EncodeSettings, retrieve


def evaluate_retrieval_systems(sets: dict[str, RetrievalDataset], systems: list[str], index_root: str | Path,
                               settings: EncodeSettings, depth: int, out_dir: str | Path, split: str = "test",
                               backbone: Backbone | None = None) -> dict:
    """{dataset: {system: {metric: value}}} on `split`; each ranking is saved as out_dir/runs/<dataset>/<system>.json."""
    results: dict[str, dict] = {}
    for name, ds in sets.items():
        queries = ds.split(split)
        results[name] = {}
        for system in systems:
            ranking = retrieve(ds, system, index_root, queries, settings, depth, backbone)
            atomic_write_json(Path(out_dir) / "runs" / name / f"{system}.json", ranking)
            results[name][system] = evaluate_retrieval(ranking, ds.qrels)
    return results
