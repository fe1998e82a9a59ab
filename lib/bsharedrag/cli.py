"""The `bsharedrag` command: `bsharedrag ask RUN_DIR "question"` answers from a finished run; `bsharedrag compare
RUN_DIR A B [--b-run OTHER]` tests whether two retrievers of its 06 (or of two runs on one split) differ; `bsharedrag
heldout RUN_DIR` scores its retrievers on every question it never trained on; `bsharedrag results RUN_DIR [RUN_DIR ...]`
prints 07's table and the paper's directions so far, over one run or several gathered (and with `--out DIR` writes its
tables and figures); `bsharedrag archive RUN_DIR` keeps a run's result files in git under docs/runs/; `bsharedrag
diff RUN_A RUN_B` says whether two runs' quality figures agree."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path


def ask(args: argparse.Namespace) -> int:
    from .data import query_text
    from .generator import DecodeSettings
    from .pipeline import BSharedRAG

    decode = DecodeSettings(max_new_tokens=args.max_new_tokens, batch_size=1) if args.max_new_tokens else None
    rag = BSharedRAG.from_run(args.run_dir, dataset=args.dataset, decode=decode)
    question = query_text(args.question, args.context)
    if args.context:
        print(f"-- asked as: {question}", file=sys.stderr)
    out = rag.answer(question, k=args.k)
    print(out["answer"])
    print(f"\n-- documents used ({rag.dataset.name}, retrieval adapter, top {len(out['documents'])}):")
    for rank, doc in enumerate(out["documents"], 1):
        print(f"[{rank}] {doc['doc_id']}  score {doc['score']:.3f}  {doc['text'][:200]}")
    print(f"-- retrieve {out['seconds']['retrieve']:.2f} s, generate {out['seconds']['generate']:.2f} s, "
          f"{rag.switches} adapter switches", file=sys.stderr)
    return 0


def compare(args: argparse.Namespace) -> int:
    from .evaluation import compare_saved_rankings

    r = compare_saved_rankings(args.run_dir, args.dataset, args.a, args.b, args.metric, args.resamples, args.b_run,
                               args.heldout)
    p = f"{r['p_value']:.3f}" if r["p_value"] >= 0.001 else "< 0.001"
    print(f"{r['dataset']} {r['split']} {r['metric']} over {r['n']} questions: {r['a']} {r['mean_a']:.3f} vs {r['b']} "
          f"{r['mean_b']:.3f}; difference {r['difference']:+.3f}, 95% bootstrap interval [{r['ci95_low']:+.3f}, "
          f"{r['ci95_high']:+.3f}], paired permutation p {p}; {r['a']} better on {r['a_wins']}, "
          f"{r['b']} on {r['b_wins']}, tied on {r['ties']}")
    return 0


def heldout(args: argparse.Namespace) -> int:
    from .heldout import evaluate_heldout

    m = evaluate_heldout(args.run_dir, args.dataset, args.systems, args.metric, args.resamples)
    print(f"{m['dataset']}: {m['questions']} questions the run never trained or validated on ({m['run_test']} of its "
          f"test split, {m['outside_subsample']} outside its subsample), full corpus of {m['corpus_documents']} "
          f"documents")
    for system, r in m["retrieval"].items():
        print(f"  {system:<28} nDCG@5 {r['ndcg@5']:.3f}  Hit@3 {r['hit@3']:.3f}  MRR@10 {r['mrr@10']:.3f}  "
              f"({r['n_queries']} questions with a relevant document)")
    for r in m["paired"]:
        p = f"{r['p_value']:.3f}" if r["p_value"] >= 0.001 else "< 0.001"
        print(f"  {r['a']} - {r['b']}: {m['metric']} {r['difference']:+.3f}, 95% interval [{r['ci95_low']:+.3f}, "
              f"{r['ci95_high']:+.3f}], p {p}, won {r['a_wins']} / {r['b_wins']} / tied {r['ties']}")
    for where, rows in m["paired_by_origin"].items():
        for r in rows:
            print(f"  {where} only ({r['n']}): {r['a']} - {r['b']} {r['difference']:+.3f}, 95% interval "
                  f"[{r['ci95_low']:+.3f}, {r['ci95_high']:+.3f}] ({r['mean_a']:.3f} vs {r['mean_b']:.3f})")
    print(f"  written to {Path(args.run_dir) / 'heldout'} (metrics_{m['dataset']}.json, tables/)")
    return 0


def results(args: argparse.Namespace) -> int:
    from . import plots
    from .ablations import directions, gather, lambda_verdicts, table_columns

    frame = gather(args.run_dir)
    if args.rows:
        absent = sorted(set(args.rows) - set(frame["variant"]))
        if absent:
            have = sorted(frame["variant"].unique())
            raise ValueError(f"--rows {absent}: no such 07 row in these runs; they have {have}")
        frame = frame[frame["variant"].isin(args.rows)].reset_index(drop=True)
    names = ", ".join(Path(run).name for run in args.run_dir)
    if args.out:
        from .report import write_report

        report = write_report(frame, args.out, f"Ablations gathered from {names}", args.quality_metric)
        metrics, costs, summary = report.metrics, report.costs, report.summary
        claims, each = report.directions, report.lambda_verdicts
    else:
        metrics, costs = table_columns(frame)
        summary, claims, each = plots.summarise(frame, metrics + costs), directions(frame), lambda_verdicts(frame)
    print(f"07 rows of {names} so far: {len(frame)} (variant, data set, run, seed); written as each finishes, so "
          "this reads a run still in progress or stopped")
    if len(args.run_dir) > 1:
        measured_again, spread = plots.repeats(frame, metrics)
        print("runs gathered: a replicate is a (context, seed) pair, the context being 07's inputs and settings on one "
              "machine's boot, and the directions set each row against BSharedRAG on the replicates both have; "
              f"replicates measured in more than one run: {measured_again} (averaged; the largest difference between "
              f"two measurements: {spread:.2g})")
    for name in sorted(frame["dataset"].unique()):
        print(f"\n{name}\n\n" + plots.results_table(summary, metrics + costs, name).to_markdown())
    if not claims.empty:
        print("\nthe paper's directions\n\n" + claims.drop(columns="holds").round(3).to_markdown(index=False))
    if not each.empty:
        cells = each.drop(columns="replicates").stack().str.split().str[0].value_counts()
        print("\nBSharedRAG against each Fully Shared lambda (verdict, margin), nothing picked on the test "
              "questions\n\n" + each.to_markdown() + f"\n\nover {int(cells.sum())} comparisons: holds "
              f"{cells.get('holds', 0)}, ties {cells.get('tie', 0)}, fails {cells.get('fails', 0)}")
    if args.out:
        print(f"\ntables and figures written under {args.out} (tables/, figures/)")
    return 0


def archive(args: argparse.Namespace) -> int:
    from .archive import ARCHIVE, archive_run

    target = archive_run(args.run_dir, args.to or ARCHIVE)
    files = [p for p in target.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    print(f"{len(files)} files ({size / 1024:.0f} kB) of {args.run_dir} archived in {target}; commit them, then read "
          f"the run anywhere: bsharedrag results {target}")
    return 0


def diff(args: argparse.Namespace) -> int:
    from .rundiff import describe, diff_runs

    d = diff_runs(args.run_a, args.run_b, args.tolerance)
    print(describe(d, args.tolerance, args.show))
    return 0 if d.agree else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bsharedrag", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ask", help="answer a question with a finished run (retrieve, then generate)")
    p.add_argument("run_dir", help="outputs/<run_id> with 03_retriever, 04_generator and 05_index done")
    p.add_argument("question")
    p.add_argument("--dataset", help="whose corpus and index to search (default: the run's first data set)")
    p.add_argument("--context", help="where the question is asked, put before it as the run's data were (ePQA: the "
                   "product's title, e.g. --context 'Smittybilt Cargo Net')")
    p.add_argument("--k", type=int, help="documents to retrieve (default: what the generator was trained with)")
    p.add_argument("--max-new-tokens", type=int, default=0, help="answer length cap (default: the run's 06 setting)")
    p = sub.add_parser("compare", help="paired test of two retrieval systems on a finished run's test rankings (06)")
    p.add_argument("run_dir", help="outputs/<run_id> with 06_evaluate done")
    p.add_argument("a", help="a retrieval system of 06, e.g. bsharedrag")
    p.add_argument("b", help="the system to compare with, e.g. minilm")
    p.add_argument("--b-run", help="take system b from this other run (outputs/<run_id>, same data settings), e.g. "
                   "bsharedrag trained at another step budget")
    p.add_argument("--heldout", action="store_true", help="the rankings `bsharedrag heldout` saved (every question "
                   "the run never saw, full corpus) instead of 06's test rankings; run heldout on both runs first")
    p.add_argument("--dataset", default="epqa", help="epqa or ecomeval (default: epqa)")
    p.add_argument("--metric", default="ndcg@5", help="a per-question retrieval metric (default: ndcg@5)")
    p.add_argument("--resamples", type=int, default=10_000, help="bootstrap and permutation resamples")
    p = sub.add_parser("heldout", help="a run's retrievers on every question it never trained or validated on, over "
                       "the full corpus: enough questions for a paired test to separate close systems")
    p.add_argument("run_dir", help="outputs/<run_id> with 03_retriever done (for the trained retrievers)")
    p.add_argument("--dataset", default="epqa", help="epqa or ecomeval (default: epqa)")
    p.add_argument("--systems", nargs="+", help="retrieval systems (default: the run's 06 systems)")
    p.add_argument("--metric", default="ndcg@5", help="the paired tests' per-question metric (default: ndcg@5)")
    p.add_argument("--resamples", type=int, default=10_000, help="bootstrap and permutation resamples")
    p = sub.add_parser("results", help="07's results table and the paper's directions from a run's results.jsonl, "
                       "also while 07 is running or after it stopped")
    p.add_argument("run_dir", nargs="+", help="outputs/<run_id> whose 07_ablations wrote results.jsonl; several "
                   "runs (e.g. one per seed) are gathered into one comparison, as 07's gather_runs does; archived "
                   "runs (docs/runs/<run_id>) too")
    p.add_argument("--rows", nargs="+", help="only these 07 rows (e.g. bsharedrag fully_shared_0.3), so the directions "
                   "compare what they name: fully_shared's best lambda is then chosen among these")
    p.add_argument("--out", help="also write 07's tables (Markdown, LaTeX) and figures (PNG, PDF) of these rows here")
    p.add_argument("--quality-metric", default="rougeL", help="the quality axis of the quality-versus-memory figure "
                   "(default: rougeL)")
    p = sub.add_parser("archive", help="keep a run's result files (config, machine, times, metrics, tables, 07's rows) "
                       "in git under docs/runs/<run_id>, so they outlive the run's machine")
    p.add_argument("run_dir", help="outputs/<run_id>")
    p.add_argument("--to", help="archive folder (default: docs/runs of this checkout)")
    p = sub.add_parser("diff", help="whether two runs agree: every quality figure of their metrics.json files and 07's "
                       "rows side by side, times and memory left out; exit status 1 where any differs")
    p.add_argument("run_a", help="outputs/<run_id> or docs/runs/<run_id>")
    p.add_argument("run_b", help="the run to set beside it, e.g. the same config on another machine or commit")
    p.add_argument("--tolerance", type=float, default=0.0, help="numbers at most this far apart count as close, not "
                   "different (default 0: equal to the last digit)")
    p.add_argument("--show", type=int, default=30, help="differing fields listed (default 30)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        return {"ask": ask, "compare": compare, "heldout": heldout, "results": results,
                "archive": archive, "diff": diff}[args.command](args)
    except (FileNotFoundError, ValueError) as err:
        print(f"bsharedrag {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
