"""Hard-negative mining: high-ranking documents of a baseline retriever that are not known to answer the question."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .artefacts import atomic_write_jsonl, atomic_write_text, read_jsonl
from .data import RetrievalDataset


@dataclass
class MiningSettings:
    """Which candidates count as hard negatives (see 02_mine_negatives for what each knob does)."""

    n_negatives: int = 7  # kept per question
    skip_top: int = 2  # the first ranks are skipped: unjudged documents there are often unlabelled positives
    max_rank: int = 50  # candidates come from ranks [skip_top, max_rank)
    relative_margin: float = 0.05  # keep a candidate only if it scores below (1 - margin) x the best positive
    filter_answers: bool = True  # drop candidates that contain a reference answer (likely false negatives)
    min_negatives: int = 3  # fill up to this many from the window (ignoring the margin), then at random
    judged_negatives: bool = False  # the question's own judged-irrelevant documents first (never false negatives)


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.lower()).strip()


def _threshold(best_positive: float, margin: float) -> float:
    return best_positive - margin * abs(best_positive)  # scores may be negative (cosine), so relative to |score|


def mine_hard_negatives(scores: np.ndarray, ds: RetrievalDataset, queries: pd.DataFrame, settings: MiningSettings,
                        seed: int = 0) -> tuple[list[dict], pd.DataFrame]:
    """One training group per question with a positive: its best-graded positives and its mined hard negatives.

    `scores` is queries x corpus (rows in `queries` order). Returns the groups and a per-question report.
    """
    rng = np.random.default_rng(seed)
    doc_ids = list(ds.corpus["doc_id"])
    position = {d: i for i, d in enumerate(doc_ids)}
    texts = [_norm(t) for t in ds.corpus["text"]]
    groups, report = [], []
    for row, (qid, query) in enumerate(zip(queries["qid"], queries["text"])):
        judged = ds.qrels.get(qid, {})
        best = max(judged.values(), default=0)
        if best <= 0:
            continue
        positives = [d for d, g in judged.items() if g == best and d in position]
        known_positive = {position[d] for d, g in judged.items() if g > 0 and d in position}
        answers = [_norm(a) for a in ds.answers.get(qid, []) if len(a.strip()) >= 8] if settings.filter_answers else []
        s = scores[row]
        threshold = _threshold(float(max(s[position[d]] for d in positives)), settings.relative_margin)
        def holds_no_answer(j: int) -> bool:
            return not any(a in texts[j] for a in answers)

        ranked = np.argsort(-s, kind="stable")
        window = [int(j) for j in ranked[settings.skip_top:settings.max_rank]
                  if j not in known_positive and holds_no_answer(j)]
        judged_irrelevant = {position[d] for d, g in judged.items() if g <= 0 and d in position} \
            if settings.judged_negatives else set()
        mined = [j for j in sorted(judged_irrelevant, key=lambda j: (-s[j], j))  # in rank order, as the window
                 if holds_no_answer(j)]
        mined = (mined + [j for j in window if s[j] < threshold and j not in judged_irrelevant])[: settings.n_negatives]
        filled = 0
        if len(mined) < settings.min_negatives:
            extra = [j for j in window if j not in mined][: settings.min_negatives - len(mined)]
            pool = [j for j in rng.permutation(len(doc_ids)) if j not in known_positive and j not in mined + extra]
            extra += [int(j) for j in pool[: settings.min_negatives - len(mined) - len(extra)]]
            mined, filled = mined + extra, len(extra)
        groups.append({"qid": qid, "query": query, "positives": positives,
                       "negatives": [doc_ids[j] for j in mined]})
        report.append({"qid": qid, "negatives": len(mined), "filled": filled,
                       "positive_score": float(max(s[position[d]] for d in positives)),
                       "negative_score_mean": float(np.mean([s[j] for j in mined])) if mined else np.nan,
                       "from_own_judged_set": sum(doc_ids[j] in judged for j in mined)})
    return groups, pd.DataFrame(report)


def random_negatives(ds: RetrievalDataset, queries: pd.DataFrame, n_negatives: int, seed: int = 0) -> list[dict]:
    """The control: the same groups with negatives drawn uniformly from the corpus (never a known positive)."""
    rng = np.random.default_rng(seed)
    doc_ids = list(ds.corpus["doc_id"])
    groups = []
    for qid, query in zip(queries["qid"], queries["text"]):
        judged = ds.qrels.get(qid, {})
        best = max(judged.values(), default=0)
        if best <= 0:
            continue
        negatives = []
        for j in rng.permutation(len(doc_ids)):
            if judged.get(doc_ids[j], 0) <= 0:
                negatives.append(doc_ids[j])
            if len(negatives) == n_negatives:
                break
        groups.append({"qid": qid, "query": query, "positives": [d for d, g in judged.items() if g == best],
                       "negatives": negatives})
    return groups


def save_groups(groups: list[dict], path: str | Path, settings: MiningSettings | None = None) -> Path:
    """JSON lines, one training group per line; the settings go beside it as <name>.settings.json."""
    path = Path(path)
    atomic_write_jsonl(path, groups)
    if settings is not None:
        atomic_write_text(path.with_suffix(".settings.json"), json.dumps(asdict(settings), indent=2))
    return path


def load_groups(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no training groups at {path}; run 02_mine_negatives first")
    return read_jsonl(path)


def summarise(report: pd.DataFrame, groups: list[dict], queries: pd.DataFrame) -> dict:
    """What was mined for one data set, as numbers for metrics.json."""
    mined = report["negatives"].sum()
    return {"questions": len(queries), "groups": len(groups), "negatives_per_group": float(report["negatives"].mean()),
            "filled_share": float(report["filled"].sum() / max(1, mined)),
            "own_judged_share": float(report["from_own_judged_set"].sum() / max(1, mined)),
            "positive_score_mean": float(report["positive_score"].mean()),
            "negative_score_mean": float(report["negative_score_mean"].mean())}
