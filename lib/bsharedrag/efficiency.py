"""Efficiency of the shared pipeline against two separately loaded backbones doing the same work: peak memory,
per-question latency (retrieve, switch, generate), and the cost of one adapter switch. Each side runs in its own
process so that its peak memory is its own.

    python -m bsharedrag.efficiency --run outputs/RUN_ID [--questions 4] [--max-new-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS: resident now; VmHWM: resident peak since the last reset), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_hwm() -> bool:
    # Loading passes through transient copies (file pages plus the converted tensors) that serving never holds again;
    # Linux >= 4.0 restarts the resident peak at the current RSS when "5" is written here.
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def switch_cost_ms(rag, repeats: int = 200) -> float:
    """Median wall time of one adapter switch (retrieval <-> generation) on the shared backbone, in milliseconds."""
    from .generator import GENERATION_ADAPTER
    from .retriever import RETRIEVAL_ADAPTER

    times = []
    for i in range(repeats):
        start = time.perf_counter()
        rag.switch(RETRIEVAL_ADAPTER if i % 2 else GENERATION_ADAPTER)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measure(run_dir: str, mode: str, dataset: str | None, n_questions: int, max_new_tokens: int) -> dict:
    """Answer the first n test questions with one (`shared`) or two (`separate`) backbones; time and weigh it."""
    # Every library both sides need is imported before the baseline reading, so the figures above it are the
    # backbones, adapters, index and activations alone.
    import faiss  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from .evaluation import generation_questions
    from .generator import DecodeSettings
    from .pipeline import BSharedRAG

    base = _status_mb("VmRSS")
    start = time.perf_counter()
    rag = BSharedRAG.from_run(run_dir, dataset=dataset, shared=mode == "shared",
                              decode=DecodeSettings(max_new_tokens=max_new_tokens, batch_size=1))
    load_s = time.perf_counter() - start
    loaded, load_peak = _status_mb("VmRSS"), _status_mb("VmHWM")
    reset = _reset_hwm()
    questions = list(generation_questions(rag.dataset, n_questions, seed=0)["text"])
    rag.answer(questions[0])  # warm-up: first calls allocate caches
    per_question, answers = [], []
    for q in questions:
        out = rag.answer(q)
        per_question.append(out["seconds"])
        answers.append(out["answer"])
    serving = _status_mb("VmHWM")  # without the reset it still holds the load's transient copies
    figures = {"mode": mode, "questions": len(questions), "max_new_tokens": max_new_tokens,
               "load_seconds": load_s, "rss_before_load_mb": base, "rss_after_load_mb": loaded,
               # VmHWM, not ru_maxrss: ru_maxrss survives fork + exec, so a child of a 4 GB notebook kernel reports 4 GB
               "peak_rss_with_load_mb": max(load_peak, serving), "peak_rss_mb": serving,
               "serving_peak_measured": reset,
               "retrieve_s": statistics.median(s["retrieve"] for s in per_question),
               "generate_s": statistics.median(s["generate"] for s in per_question),
               "question_s": statistics.median(s["retrieve"] + s["generate"] for s in per_question),
               "answers": answers}
    figures["model_memory_mb"] = figures["peak_rss_mb"] - base
    if mode == "shared":
        figures["switch_ms"] = switch_cost_ms(rag)
    return figures


def compare(run_dir: str | Path, dataset: str | None = None, n_questions: int = 4, max_new_tokens: int = 32) -> dict:
    """Both sides, each in a fresh process, and their ratios (shared / separate)."""
    out = {}
    for mode in ("shared", "separate"):
        with tempfile.NamedTemporaryFile(suffix=".json") as fh:
            cmd = [sys.executable, "-m", "bsharedrag.efficiency", "--run", str(run_dir), "--mode", mode,
                   "--questions", str(n_questions), "--max-new-tokens", str(max_new_tokens), "--json", fh.name]
            if dataset:
                cmd += ["--dataset", dataset]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"efficiency measurement ({mode}) failed:\n{done.stderr[-3000:]}")
            out[mode] = json.loads(Path(fh.name).read_text())
    shared, separate = out["shared"], out["separate"]
    out["ratios"] = {"peak_rss": shared["peak_rss_mb"] / separate["peak_rss_mb"],
                     "model_memory": shared["model_memory_mb"] / separate["model_memory_mb"],
                     "peak_rss_with_load": shared["peak_rss_with_load_mb"] / separate["peak_rss_with_load_mb"],
                     "question_latency": shared["question_s"] / separate["question_s"]}
    out["same_answers"] = shared["answers"] == separate["answers"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bsharedrag.efficiency", description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="outputs/<run_id> with 03, 04 and 05 done")
    parser.add_argument("--dataset", help="data set whose test questions are asked (default: the run's first)")
    parser.add_argument("--questions", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--mode", choices=["shared", "separate"], help="measure one side only (used by compare)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    if args.mode:
        figures = measure(args.run, args.mode, args.dataset, args.questions, args.max_new_tokens)
    else:
        figures = compare(args.run, args.dataset, args.questions, args.max_new_tokens)
    text = json.dumps(figures, indent=2, ensure_ascii=False)
    if args.json:
        Path(args.json).write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
