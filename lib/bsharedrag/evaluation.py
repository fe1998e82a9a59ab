"""Evaluate on a split: retrieval systems (rank, save the rankings, score them) and generation systems (answer,
save the answers, score them against the references)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd

from .artefacts import atomic_write_json, atomic_write_jsonl, read_jsonl
from .backbone import Backbone
from .data import RetrievalDataset
from .generator import (
    GENERATION_ADAPTER,
    DecodeSettings,
    GeneratorSettings,
    answer_marker,
    build_prompt,
    generate,
    gold_documents,
)
from .metrics import evaluate_retrieval, paired_comparison, per_query
from .systems import ADAPTED, EncodeSettings, retrieve


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


GENERATION_SYSTEMS = ("closed_book", "base_rag", "bsharedrag", "bsharedrag_gold_docs")
# system -> (adapter that answers, where its documents come from)
GENERATION_SETUPS = {"closed_book": (GENERATION_ADAPTER, "none"), "base_rag": (None, "retrieved"),
                     "bsharedrag": (GENERATION_ADAPTER, "retrieved"),
                     "bsharedrag_gold_docs": (GENERATION_ADAPTER, "gold")}


def check_generation_systems(systems: list[str]) -> None:
    unknown = [s for s in systems if s not in GENERATION_SETUPS]
    if unknown:
        raise ValueError(f"unknown generation system(s) {unknown}; known: {', '.join(GENERATION_SYSTEMS)}")


def generation_questions(ds: RetrievalDataset, n: int, seed: int, split: str = "test") -> pd.DataFrame:
    """The `split` questions that have a reference answer; a seeded subsample of n of them if n > 0."""
    queries = ds.split(split)
    queries = queries[[bool([a for a in ds.answers.get(q, []) if a.strip()]) for q in queries["qid"]]]
    if 0 < n < len(queries):
        queries = queries.sample(n=n, random_state=seed).sort_index()
    return queries.reset_index(drop=True)


def evaluate_generation(sets: dict[str, RetrievalDataset], systems: list[str], rankings: dict[str, dict[str, list[str]]],
                        backbone: Backbone, generator: GeneratorSettings, decode: dict[str, DecodeSettings],
                        n_questions: int, passage_format: str, out_dir: str | Path, seed: int = 0) -> dict:
    """{dataset: {system: {bleu3, rougeL, bertscore_f1, token_f1, n, ...}}} on the test questions with an answer.

    `rankings[dataset][qid]` are the retriever's documents, best first; `decode[lang]` how answers are decoded.
    Every answer is saved with its prompt's documents in out_dir/generations/<dataset>.jsonl.
    """
    from .genmetrics import default_bertscorer, generation_metrics

    check_generation_systems(systems)
    results: dict[str, dict] = {}
    for name, ds in sets.items():
        queries = generation_questions(ds, n_questions, seed)
        text = dict(zip(ds.corpus["doc_id"], ds.passages(passage_format)))
        references = [[a for a in ds.answers[q] if a.strip()] for q in queries["qid"]]
        rows, results[name] = [], {}
        for system in systems:
            adapter, source = GENERATION_SETUPS[system]
            docs = [[] if source == "none" else
                    gold_documents(ds, q)[:generator.top_k] if source == "gold" else
                    rankings[name][q][:generator.top_k] for q in queries["qid"]]
            prompts = [build_prompt(question, [text[d] for d in found], ds.lang, generator, backbone.tokenizer)
                       for question, found in zip(queries["text"], docs)]
            start = time.perf_counter()
            answers = generate(backbone, prompts, decode[ds.lang], adapter, stop=answer_marker(generator, ds.lang))
            seconds = time.perf_counter() - start
            scores = generation_metrics(answers, references, ds.lang, default_bertscorer(ds.lang))
            results[name][system] = {**scores, "seconds_per_question": seconds / max(len(prompts), 1)}
            rows += [{"qid": q, "question": question, "system": system, "documents": found, "answer": answer,
                      "references": refs}
                     for q, question, found, answer, refs in zip(queries["qid"], queries["text"], docs, answers,
                                                                 references)]
        atomic_write_jsonl(Path(out_dir) / "generations" / f"{name}.jsonl", rows)
    return results


def side_by_side(generations_file: str | Path, n: int = 3, seed: int = 0) -> pd.DataFrame:
    """A few questions with every system's answer next to the reference (from a saved generations file)."""
    rows = read_jsonl(generations_file)
    frame = pd.DataFrame(rows)
    table = frame.pivot_table(index=["qid", "question"], columns="system", values="answer", aggfunc="first")
    table["reference"] = [next(r["references"][0] for r in rows if r["qid"] == qid) for qid, _ in table.index]
    return table.sample(n=min(n, len(table)), random_state=seed).reset_index(level=0, drop=True)


def saved_ranking(out_dir: str | Path, dataset: str, system: str) -> dict[str, list[str]]:
    """The test ranking of `system` on `dataset` that `evaluate_retrieval_systems` saved under out_dir/runs."""
    folder = Path(out_dir) / "runs" / dataset
    path = folder / f"{system}.json"
    if not path.is_file():
        saved = sorted(f.stem for f in folder.glob("*.json")) if folder.is_dir() else []
        raise FileNotFoundError(f"no saved {dataset} ranking of {system!r} at {path}; 06 saved: "
                                f"{', '.join(saved) or 'none (has 06_evaluate run on this data set?)'}")
    return json.loads(path.read_text(encoding="utf-8"))


def paired_tests(out_dir: str | Path, sets: dict[str, RetrievalDataset], systems: list[str], metric: str = "ndcg@5",
                 resamples: int = 10_000) -> dict[str, list[dict]]:
    """{dataset: [row]}: each trained retriever of `systems` against every other system, per question on the
    rankings saved under out_dir/runs (`metrics.paired_comparison`: is a gap a difference on this many questions?)."""
    return {name: paired_rows({s: per_query(saved_ranking(out_dir, name, s), ds.qrels, metric) for s in systems},
                              metric, resamples)
            for name, ds in sets.items()}


def paired_rows(scores: dict[str, dict[str, float]], metric: str, resamples: int = 10_000) -> list[dict]:
    """Each trained retriever of `scores` ({system: {qid: score}}, in the order given) against every other system,
    each pair once: [{"a", "b", "metric", **metrics.paired_comparison}]."""
    systems = list(scores)
    return [{"a": a, "b": b, "metric": metric, **paired_comparison(scores[a], scores[b], resamples)}
            for i, a in enumerate(systems) if a in ADAPTED
            for j, b in enumerate(systems) if b != a and (b not in ADAPTED or j > i)]


def paired_table(rows: list[dict]) -> pd.DataFrame:
    """`paired_tests` rows of one data set as a table indexed by (a, b), the questions won in one text column."""
    table = pd.DataFrame(rows).set_index(["a", "b"])
    table["won a / b / tied"] = [f"{r['a_wins']} / {r['b_wins']} / {r['ties']}" for r in rows]
    return table[["mean_a", "mean_b", "difference", "ci95_low", "ci95_high", "p_value", "won a / b / tied"]]


def compare_saved_rankings(run_dir: str | Path, dataset: str, system_a: str, system_b: str, metric: str = "ndcg@5",
                           resamples: int = 10_000, run_dir_b: str | Path | None = None, heldout: bool = False) -> dict:
    """`metrics.paired_comparison` of two systems' test rankings that 06 saved, on the run's own split: both from
    run_dir, or system_b from run_dir_b (e.g. the same variant trained at another setting), which must have split
    `dataset` into the same test questions with the same judgements. With `heldout`, the rankings `bsharedrag
    heldout` saved instead, over every question the run never saw (hundreds, where the test split holds ~75)."""
    import yaml

    from .data import load_sets
    from .heldout import HELDOUT, heldout_set

    def common(run: Path) -> dict:
        return yaml.safe_load((run / "resolved.yaml").read_text(encoding="utf-8"))["common"]

    def judged(run: Path) -> dict:
        if heldout:
            return heldout_set(common(run), dataset)[0].qrels
        return load_sets(common(run), [dataset])[dataset].qrels

    run_dir = Path(run_dir)
    run_dir_b = Path(run_dir_b) if run_dir_b is not None else run_dir
    qrels = judged(run_dir)
    names = (system_a, system_b)
    split = "held-out" if heldout else "test"
    if run_dir_b != run_dir:
        if judged(run_dir_b) != qrels:
            a, b = common(run_dir), common(run_dir_b)
            differ = [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted({*a, *b}) if a.get(k) != b.get(k)]
            raise ValueError(f"{run_dir.name} and {run_dir_b.name} have different {dataset} {split} questions or "
                             f"judgements (common settings that differ: {'; '.join(differ) or 'none'}); compare runs "
                             "made with the same data settings")
        names = (f"{system_a} ({run_dir.name})", f"{system_b} ({run_dir_b.name})")
    folder = HELDOUT if heldout else "06_evaluate"
    runs = [saved_ranking(d / folder, dataset, s) for d, s in ((run_dir, system_a), (run_dir_b, system_b))]
    out = paired_comparison(per_query(runs[0], qrels, metric), per_query(runs[1], qrels, metric), resamples=resamples)
    return {"dataset": dataset, "split": split, "metric": metric, "a": names[0], "b": names[1], **out}
