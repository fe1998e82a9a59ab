"""Retrieval metrics against hand computation and against trec_eval (pytrec_eval) on the same rankings."""

import math
import random

import pytest
import pytrec_eval

from bsharedrag.metrics import RETRIEVAL_METRICS, evaluate_retrieval, paired_comparison, per_query_retrieval


def test_hand_computed_example():
    gains = {"a": 2, "b": 1, "z": 1, "c": 0}
    m = per_query_retrieval(["c", "a", "d", "b"], gains)
    dcg3 = 2 / math.log2(3)
    idcg3 = 2 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4)
    assert m["hit@1"] == 0 and m["hit@3"] == 1
    assert m["ndcg@3"] == pytest.approx(dcg3 / idcg3)
    assert m["mrr@10"] == pytest.approx(1 / 2)
    assert m["recall@10"] == pytest.approx(2 / 3)


def test_agrees_with_trec_eval_on_random_graded_rankings():
    rng = random.Random(7)
    docs = [f"d{i}" for i in range(40)]
    qrels, run, scored_run = {}, {}, {}
    for q in range(60):
        judged = rng.sample(docs, 8)
        qrels[f"q{q}"] = {d: rng.choice([0, 0, 1, 2]) for d in judged}
        ranking = rng.sample(docs, 10)  # depth 10, so trec_eval's uncut reciprocal rank equals MRR@10
        run[f"q{q}"] = ranking
        scored_run[f"q{q}"] = {d: float(10 - i) for i, d in enumerate(ranking)}
    qrels = {q: j for q, j in qrels.items() if any(g > 0 for g in j.values())}
    run = {q: r for q, r in run.items() if q in qrels}
    ours = evaluate_retrieval(run, qrels)
    theirs = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.3,5,10", "recip_rank", "success.1,3,5", "recall.10"})
    per_q = theirs.evaluate({q: scored_run[q] for q in run})
    mean = lambda key: sum(v[key] for v in per_q.values()) / len(per_q)  # noqa: E731
    assert ours["hit@3"] == pytest.approx(mean("success_3"))
    assert ours["ndcg@5"] == pytest.approx(mean("ndcg_cut_5"))
    assert ours["ndcg@10"] == pytest.approx(mean("ndcg_cut_10"))
    assert ours["mrr@10"] == pytest.approx(mean("recip_rank"))
    assert ours["recall@10"] == pytest.approx(mean("recall_10"))
    assert ours["n_queries"] == len(run)


def test_queries_without_relevant_documents_are_left_out_and_counted():
    qrels = {"q1": {"a": 1}, "q2": {"b": 0}}
    out = evaluate_retrieval({"q1": ["a"], "q2": ["b"]}, qrels)
    assert out["n_queries"] == 1 and out["hit@1"] == 1.0
    assert set(RETRIEVAL_METRICS) <= set(out)
    with pytest.raises(ValueError, match="no query in the run has a relevant document"):
        evaluate_retrieval({"q2": ["b"]}, qrels)


def test_a_paired_comparison_tells_a_consistent_gap_from_noise(tally):
    import numpy as np

    rng = np.random.default_rng(0)
    base = {f"q{i}": float(v) for i, v in enumerate(rng.uniform(0, 1, 60))}
    ahead = {q: v + 0.2 + float(rng.normal(0, 0.05)) for q, v in base.items()}
    noisy = {q: v + float(rng.normal(0, 0.1)) for q, v in base.items()}
    gap = paired_comparison(ahead, base, resamples=2000)
    assert gap["difference"] == pytest.approx(np.mean([ahead[q] - base[q] for q in base]))
    assert 0.15 < gap["ci95_low"] < gap["difference"] < gap["ci95_high"] < 0.25 and gap["p_value"] < 0.001
    assert gap["a_wins"] == 60 and gap["n"] == 60
    noise = paired_comparison(noisy, base, resamples=2000)
    assert noise["ci95_low"] < 0 < noise["ci95_high"] and noise["p_value"] > 0.05
    same = paired_comparison(base, dict(base))
    assert same["difference"] == 0 and same["p_value"] == 1.0 and same["ties"] == 60
    with pytest.raises(ValueError, match="different queries"):
        paired_comparison(base, {**base, "extra": 1.0})
    from bsharedrag.metrics import per_query

    with pytest.raises(ValueError, match="unknown retrieval metric 'bleu3'"):
        per_query({"q0": ["d"]}, {"q0": {"d": 1}}, "bleu3")
    tally("bad inputs tried")
