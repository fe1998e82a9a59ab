"""A finished run's retrievers on every question of the full data set that the run never trained, mined or validated
on (its test split plus every question its `max_questions` subsample left out), over the full corpus.

At demo scale the test split holds ~75 ePQA questions, too few for a paired test to tell apart retrievers a few
hundredths of nDCG apart; the held-out set of the same run holds ~650. Its corpus is the whole data set's, so the
figures are lower than 06's and are compared only with each other."""

from __future__ import annotations

from pathlib import Path

from . import paths
from .artefacts import atomic_write_json
from .backbone import load_backbone
from .config import load_config
from .data import RetrievalDataset, load_dataset, load_sets
from .evaluation import evaluate_retrieval_systems, paired_rows, paired_table, saved_ranking
from .metrics import RETRIEVAL_METRICS, check_retrieval_metric, per_query
from .pipeline import run_backbone
from .systems import ADAPTED, BASELINES, EncodeSettings, build_indexes

HELDOUT = "heldout"  # the folder inside the run


def heldout_set(common: dict, name: str) -> tuple[RetrievalDataset, dict]:
    """Data set `name` in full, its queries cut to the ones the run with this `common` section never saw (all marked
    "test", and in column "origin" whether the run's test split holds them: "run_test" or "outside_subsample"), and
    counts: {"questions", "run_test", "outside_subsample", "run_seen"}.

    Seen are the run's train questions (02 mines them, 03 trains on them, 01 reads their answers) and its dev
    questions (03 validates on them, and they picked the demo's settings). The corpus is the full one.
    """
    run = load_sets(common, [name])[name]
    seen = set(run.queries.loc[run.queries["split"] != "test", "qid"])
    run_test = set(run.queries.loc[run.queries["split"] == "test", "qid"])
    full = load_dataset(name, common["seed"], common["split_fractions"], 0, query_context=common["query_context"])
    queries = full.queries[~full.queries["qid"].isin(seen)].copy()
    queries["split"] = "test"
    queries["origin"] = ["run_test" if q in run_test else "outside_subsample" for q in queries["qid"]]
    full.queries = queries.reset_index(drop=True)
    return full, {"questions": len(queries), "run_test": len(run_test), "outside_subsample": len(queries) - len(run_test),
                  "run_seen": len(seen)}


def evaluate_heldout(run_dir: str | Path, dataset: str = "epqa", systems: list[str] | None = None,
                     metric: str = "ndcg@5", resamples: int = 10_000) -> dict:
    """Index the full corpus of `dataset` with each of `systems` (default: the run's 06 systems) as the run built them
    (its backbone, 03's adapters, its encoding settings), rank the held-out questions, score them and test each
    trained retriever against every other system (`evaluation.paired_rows`, as 06 does), on all of them and on each origin
    apart (the run's test split, whose documents the run's corpus held, and the questions outside its subsample).

    Writes run_dir/heldout/: indexes/<dataset>/, runs/<dataset>/ (rankings), metrics_<dataset>.json and
    tables/{retrieval,paired}_<dataset>.md/.tex, as 06 names them; the encoded passages go to the run's embedding
    cache, so a rerun encodes nothing again. Returns the metrics.
    """
    from . import plots

    run_dir = paths.run_folder(run_dir)
    cfg = load_config(run_dir / "resolved.yaml")
    common = cfg["common"]
    if dataset not in common["datasets"]:
        raise ValueError(f"data set {dataset!r} is not part of run {run_dir.name}; it has {common['datasets']}")
    systems = list(systems or cfg.get("06_evaluate", {}).get("systems", []))
    unknown = [s for s in systems if s not in BASELINES and s not in ADAPTED]
    if unknown or not systems:
        raise ValueError(f"held-out systems {unknown or systems} are not retrievers this can rebuild; choose from "
                         f"{', '.join(BASELINES + tuple(ADAPTED))}")
    adapters = run_dir / "03_retriever" / "adapters"
    missing = [s for s in systems if s in ADAPTED and not (adapters / ADAPTED[s]).is_dir()]
    if missing:
        raise FileNotFoundError(f"no 03_retriever adapter for {missing} under {adapters}; run 03 first or leave them out")
    check_retrieval_metric(metric)
    ds, counts = heldout_set(common, dataset)
    out = run_dir / HELDOUT
    settings = EncodeSettings(common["query_prefix"], common["passage_prefix"], common["max_length"],
                              common["batch_size"], common["passage_format"], adapter_root=str(adapters),
                              cache_dir=str(run_dir / "cache" / "embeddings"))
    bb = None
    if any(s not in ("bm25", "minilm") for s in systems):
        bb = load_backbone(run_backbone(run_dir, cfg), compute_dtype=common["compute_dtype"], seed=common["seed"])
    costs = build_indexes(ds, systems, out / "indexes", settings, bb)
    depth = cfg.get("06_evaluate", {}).get("retrieval_depth", 100)
    retrieval = evaluate_retrieval_systems({dataset: ds}, systems, out / "indexes", settings, depth, out, "test", bb)
    scores = {s: per_query(saved_ranking(out, dataset, s), ds.qrels, metric) for s in systems}
    paired = paired_rows(scores, metric, resamples)
    origin = dict(zip(ds.queries["qid"], ds.queries["origin"]))
    by_origin = {}
    for where in ("run_test", "outside_subsample"):
        kept = {s: {q: v for q, v in scores[s].items() if origin[q] == where} for s in systems}
        if len(kept[systems[0]]) >= 2:  # a run on the full data set has no question outside its subsample
            by_origin[where] = paired_rows(kept, metric, resamples)
    metrics = {"dataset": dataset, "corpus_documents": len(ds.corpus), **counts, "metric": metric,
               "retrieval": retrieval[dataset], "paired": paired, "paired_by_origin": by_origin,
               "index_seconds": dict(zip(costs["system"], costs["seconds"]))}
    table = plots.metrics_table(retrieval[dataset], RETRIEVAL_METRICS)
    n = retrieval[dataset][systems[0]]["n_queries"]
    plots.save_table(table, out / "tables" / f"retrieval_{dataset}",
                     f"Retrieval on the {counts['questions']} {dataset} questions run {run_dir.name} never trained or "
                     f"validated on ({n} with a relevant document), full corpus of {len(ds.corpus)} documents")
    if paired:
        plots.save_table(paired_table(paired), out / "tables" / f"paired_{dataset}",
                         f"Paired test of {metric} on the same held-out questions, a - b over {paired[0]['n']}")
    atomic_write_json(out / f"metrics_{dataset}.json", metrics)
    return metrics

