"""07's report from its result rows, one run's or several gathered: the results table (Markdown and LaTeX), the
paper's directions and BSharedRAG against each Fully Shared lambda, and the figures (grouped bars with error bars, the
lambda curve, quality against memory; PNG and PDF). 07 writes it into its step folder; `bsharedrag results RUN
[RUN ...] --out DIR` writes the same from any runs, archived ones included (`bsharedrag.archive`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from . import plots
from .ablations import GENERATION_COLUMNS, RETRIEVAL_COLUMNS, directions, lambda_verdicts, table_columns


@dataclass
class Report:
    summary: pd.DataFrame  # plots.summarise: one row per (variant, data set), mean and std over replicates
    metrics: list[str]
    costs: list[str]
    directions: pd.DataFrame  # ablations.directions
    lambda_verdicts: pd.DataFrame  # ablations.lambda_verdicts (empty without bsharedrag and a Fully Shared row)
    figures: dict  # file stem -> matplotlib figure, in the order drawn


def write_report(results: pd.DataFrame, out_dir: str | Path, title: str, quality_metric: str = "rougeL") -> Report:
    """Write `tables/ablations`, `tables/directions` and `figures/*` under `out_dir` from 07's result rows."""
    out_dir = Path(out_dir)
    metrics, costs = table_columns(results)
    if quality_metric not in metrics:
        raise ValueError(f"quality_metric {quality_metric!r} is not among these rows' metrics {metrics}; pick one "
                         "of them")
    summary = plots.summarise(results, metrics + costs)
    plots.save_results_table(summary, metrics + costs, out_dir / "tables" / "ablations", title)
    figures = {}
    for name in sorted(results["dataset"].unique()):
        for group, chosen in (("retrieval", RETRIEVAL_COLUMNS), ("generation", GENERATION_COLUMNS)):
            chosen = [m for m in chosen if m in metrics]
            figures[f"ablations_{group}_{name}"] = plots.grouped_bars_with_errors(
                summary, chosen, name, f"{group} on the {name} test split")
        if results["lambda"].notna().any():
            figures[f"lambda_{name}"] = plots.lambda_curve(
                summary, name, [m for m in ("ndcg@5", "bleu3", "rougeL") if m in metrics],
                f"Fully Shared RAG on {name}: the weight lambda of the retrieval loss")
        systems = [v for v in summary.loc[summary["dataset"] == name, "variant"] if "@" not in v]  # one point each
        figures[f"quality_memory_{name}"] = plots.quality_memory_scatter(
            summary, name, quality_metric, f"{quality_metric} against memory on {name}", systems)
    for stem, fig in figures.items():
        plots.save_figure(fig, out_dir / "figures" / stem)
    claims = directions(results)
    plots.save_table(claims.set_index(["claim", "dataset", "metric"]), out_dir / "tables" / "directions",
                     "The paper's directions on these rows")
    if not (each := lambda_verdicts(results)).empty:
        plots.save_table(each, out_dir / "tables" / "lambda_verdicts",
                         "BSharedRAG against each Fully Shared lambda: verdict and margin")
    return Report(summary, metrics, costs, claims, each, figures)
