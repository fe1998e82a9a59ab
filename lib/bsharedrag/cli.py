"""The `bsharedrag` command: `bsharedrag ask RUN_DIR "question"` answers from a finished run."""

from __future__ import annotations

import argparse
import sys
import warnings


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
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        return ask(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"bsharedrag ask: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
