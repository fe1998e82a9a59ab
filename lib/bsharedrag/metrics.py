"""Retrieval metrics with graded gains: Hit@k, nDCG@k, MRR@10, Recall@10."""

from __future__ import annotations

import math

import numpy as np

RETRIEVAL_METRICS = ("hit@1", "hit@3", "hit@5", "ndcg@3", "ndcg@5", "ndcg@10", "mrr@10", "recall@10")


def hit_at_k(ranking: list[str], gains: dict[str, int], k: int) -> float:
    return float(any(gains.get(d, 0) > 0 for d in ranking[:k]))


def ndcg_at_k(ranking: list[str], gains: dict[str, int], k: int) -> float:
    """Linear graded gain over log2(rank + 1), normalised by the ideal ordering of all judged documents."""
    dcg = sum(gains.get(d, 0) / math.log2(rank + 2) for rank, d in enumerate(ranking[:k]))
    ideal = sorted((g for g in gains.values() if g > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(rank + 2) for rank, g in enumerate(ideal))
    return dcg / idcg if idcg else 0.0


def mrr_at_k(ranking: list[str], gains: dict[str, int], k: int = 10) -> float:
    for rank, d in enumerate(ranking[:k], start=1):
        if gains.get(d, 0) > 0:
            return 1.0 / rank
    return 0.0


def recall_at_k(ranking: list[str], gains: dict[str, int], k: int = 10) -> float:
    relevant = {d for d, g in gains.items() if g > 0}
    return len(relevant.intersection(ranking[:k])) / len(relevant) if relevant else 0.0


def per_query_retrieval(ranking: list[str], gains: dict[str, int]) -> dict[str, float]:
    return {
        "hit@1": hit_at_k(ranking, gains, 1), "hit@3": hit_at_k(ranking, gains, 3), "hit@5": hit_at_k(ranking, gains, 5),
        "ndcg@3": ndcg_at_k(ranking, gains, 3), "ndcg@5": ndcg_at_k(ranking, gains, 5),
        "ndcg@10": ndcg_at_k(ranking, gains, 10), "mrr@10": mrr_at_k(ranking, gains, 10),
        "recall@10": recall_at_k(ranking, gains, 10),
    }


def evaluate_retrieval(run: dict[str, list[str]], qrels: dict[str, dict[str, int]]) -> dict[str, float]:
    """Mean of each metric over the queries of `run` that have at least one relevant document in `qrels`.

    Queries without a relevant document cannot score and are left out; `n_queries` says how many counted.
    """
    scored = [per_query_retrieval(ranking, qrels[qid]) for qid, ranking in run.items()
              if any(g > 0 for g in qrels.get(qid, {}).values())]
    if not scored:
        raise ValueError("no query in the run has a relevant document in qrels: nothing to evaluate")
    out = {m: float(np.mean([s[m] for s in scored])) for m in RETRIEVAL_METRICS}
    out["n_queries"] = len(scored)
    return out
