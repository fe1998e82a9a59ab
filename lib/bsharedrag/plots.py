"""Paper-ready figures (PNG + PDF) and tables (Markdown + LaTeX) from metrics dicts."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .artefacts import atomic_write_text


def metrics_table(by_system: dict[str, dict[str, float]], metrics: tuple[str, ...]) -> pd.DataFrame:
    """Systems as rows, metrics as columns."""
    return pd.DataFrame({s: {m: v.get(m, np.nan) for m in metrics} for s, v in by_system.items()}).T


def save_figure(fig: plt.Figure, stem: str | Path) -> list[Path]:
    """Write `stem`.png and `stem`.pdf (written whole; a partial figure is never left)."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for ext in ("png", "pdf"):
        path = stem.with_suffix(f".{ext}")
        tmp = path.with_name(f".{path.name}.tmp")
        fig.savefig(tmp, format=ext, dpi=150, bbox_inches="tight")
        tmp.replace(path)
        out.append(path)
    return out


def colours(n: int) -> list:
    """n distinct colours: tab10's up to 10, tab20's beyond (tab10 repeats its first colours past 10 bars)."""
    return [plt.get_cmap("tab10" if n <= 10 else "tab20")(i % 20) for i in range(n)]


def grouped_bars(table: pd.DataFrame, title: str, ylabel: str = "score") -> plt.Figure:
    """One group of bars per metric (columns), one bar per system (rows)."""
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * table.shape[1] * max(1, table.shape[0]) / 2), 3.6))
    width = 0.8 / max(1, table.shape[0])
    x = np.arange(table.shape[1])
    palette = colours(table.shape[0])
    for i, (system, row) in enumerate(table.iterrows()):
        ax.bar(x + (i - (table.shape[0] - 1) / 2) * width, row.values, width, label=system, color=palette[i])
    ax.set_xticks(x, table.columns)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=min(4, table.shape[0]), loc="upper left", bbox_to_anchor=(0, -0.12))
    ax.grid(axis="y", alpha=0.3)
    return fig


def save_table(table: pd.DataFrame, stem: str | Path, caption: str = "", digits: int = 3) -> list[Path]:
    """Write `stem`.md and `stem`.tex."""
    stem = Path(stem)
    md = table.to_markdown(floatfmt=f".{digits}f")
    tex = table.to_latex(float_format=lambda v: f"{v:.{digits}f}", caption=caption or None)
    return [atomic_write_text(stem.with_suffix(".md"), (f"{caption}\n\n" if caption else "") + md + "\n"),
            atomic_write_text(stem.with_suffix(".tex"), tex)]


def mining_figure(report: pd.DataFrame, title: str) -> plt.Figure:
    """Negatives kept per question, and the retriever's score of each question's positive against its negatives."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    counts = report["negatives"].value_counts().sort_index()
    left.bar(counts.index.astype(str), counts.values)
    left.set_xlabel("hard negatives kept")
    left.set_ylabel("questions")
    right.hist(report["positive_score"], bins=30, alpha=0.6, label="best positive")
    right.hist(report["negative_score_mean"].dropna(), bins=30, alpha=0.6, label="mean of its negatives")
    right.set_xlabel("retriever score")
    right.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def loss_curves(results: dict[str, dict], title: str = "retrieval adapter: InfoNCE loss") -> plt.Figure:
    """Training loss per step (and a moving average) for each variant."""
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for variant, r in results.items():
        losses = np.asarray(r["losses"])
        window = max(1, len(losses) // 10)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(losses, alpha=0.25)
        ax.plot(np.arange(window - 1, len(losses)), smooth, label=variant, color=ax.lines[-1].get_color())
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


# --- ablations (07): replicates summarised as mean ± sample std ----------------------------------------------------

COST_COLUMNS = ("trainable_parameters", "training_seconds", "documents_encoded", "document_encoding_seconds",
                "inference_memory_mb", "seconds_per_question")
PLUS_MINUS = "±"
MISSING = "–"


def _require(frame: pd.DataFrame, columns, what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} lacks column(s) {missing}; it has {list(frame.columns)}")


def replicate_key(results: pd.DataFrame) -> list[str]:
    """The columns that tell one replicate of a (variant, data set) row from another: (context, seed) where the rows
    carry a `context` (runs gathered by ablations.gather: one run's seed 1 and another's made from the same inputs,
    settings and machine are one replicate measured twice), (run, seed) where they carry only a `run` (each run has
    its own seed 0), else the seed."""
    owner = next((c for c in ("context", "run") if c in results.columns), None)
    return [c for c in (owner, "seed") if c is not None and c in results.columns]


def repeats(results: pd.DataFrame, metrics: tuple[str, ...] | list[str]) -> tuple[int, float]:
    """How many replicates (replicate_key) were measured more than once, and the largest difference between two
    measurements of one, over `metrics` (0.0 where they agree to the last digit)."""
    groups = results.groupby(["variant", "dataset", *replicate_key(results)], sort=False, dropna=False)
    sizes = groups.size()
    if not (sizes > 1).any():
        return 0, 0.0
    spread = (groups[list(metrics)].max() - groups[list(metrics)].min()).max().max()
    return int((sizes > 1).sum()), 0.0 if pd.isna(spread) else float(spread)


def summarise(results: pd.DataFrame, metrics: tuple[str, ...] | list[str]) -> pd.DataFrame:
    """Mean and sample std over replicates of each metric per (variant, dataset), with mean costs and `lambda` carried.

    A replicate is what replicate_key says: (context, seed), (run, seed), or a seed; `seeds` counts them. Rows of one
    (context, seed) replicate are its repeats and are averaged first, so a seed measured in two runs counts once.
    """
    metrics = list(metrics)
    _require(results, ["variant", "dataset", "seed", *metrics], "results")
    per_run = ["variant", "dataset", *(["run"] if "run" in results.columns else []), "seed"]
    repeated = results.duplicated(per_run, keep=False)
    if repeated.any():
        rows = results.loc[repeated, per_run].drop_duplicates().to_records(index=False).tolist()
        raise ValueError(f"results has more than one row for ({', '.join(per_run)}) {rows}; keep one per replicate "
                         "(a run gathered twice?)")
    key = ["variant", "dataset", *replicate_key(results)]
    carried = [c for c in (*COST_COLUMNS, "lambda") if c in results.columns and c not in metrics]
    results = results.groupby(key, sort=False, dropna=False)[metrics + carried].mean().reset_index()
    groups = results.groupby(["variant", "dataset"], sort=False)
    summary = groups.size().rename("seeds").to_frame()
    for m in metrics:
        values = groups[m].agg(["mean", "std"])  # std is the sample std (ddof=1): NaN for a single seed
        summary[f"{m}_mean"], summary[f"{m}_std"] = values["mean"], values["std"]
    for c in (c for c in COST_COLUMNS if c in results.columns):
        summary[c] = groups[c].mean()
    if "lambda" in results.columns:
        distinct = groups["lambda"].nunique()
        if (distinct > 1).any():
            raise ValueError(f"`lambda` differs between seeds of {distinct[distinct > 1].index.tolist()}; "
                             "give each lambda its own variant name")
        summary["lambda"] = groups["lambda"].first()  # first non-NaN value, NaN where the variant has none
    return summary.reset_index()


def _rows(summary: pd.DataFrame, dataset: str, variants: list[str] | tuple[str, ...] | None) -> pd.DataFrame:
    """The summary rows of `dataset`, indexed by variant, in the order given (default: the order they appear)."""
    _require(summary, ["variant", "dataset", "seeds"], "summary (from summarise())")
    rows = summary[summary["dataset"] == dataset].set_index("variant")
    if rows.empty:
        raise ValueError(f"no rows for dataset {dataset!r}; the summary has {sorted(summary['dataset'].unique())}")
    if variants is None:
        return rows
    unknown = [v for v in variants if v not in rows.index]
    if unknown:
        raise ValueError(f"variant(s) {unknown} have no rows for dataset {dataset!r}; it has {list(rows.index)}")
    return rows.loc[list(variants)]


def _mean_std(rows: pd.DataFrame, metric: str) -> tuple[np.ndarray, np.ndarray]:
    _require(rows, [f"{metric}_mean", f"{metric}_std"], f"summary (summarise() was not given {metric!r}?)")
    return rows[f"{metric}_mean"].to_numpy(float), rows[f"{metric}_std"].to_numpy(float)


def _mean_pm_std(mean: float, std: float, digits: int) -> str:
    if not np.isfinite(mean):
        return MISSING
    return f"{mean:.{digits}f}" + (f" {PLUS_MINUS} {std:.{digits}f}" if np.isfinite(std) else "")


def results_table(summary: pd.DataFrame, metrics: tuple[str, ...] | list[str], dataset: str,
                  variants: list[str] | tuple[str, ...] | None = None, digits: int = 3) -> pd.DataFrame:
    """Variants as rows, metrics as columns, cells "mean ± std" ("mean" for one seed, "–" where not measured)."""
    rows = _rows(summary, dataset, variants)
    table = pd.DataFrame(index=rows.index, columns=list(metrics), dtype=object)
    for m in metrics:
        mean, std = _mean_std(rows, m)
        table[m] = [_mean_pm_std(a, s, digits) for a, s in zip(mean, std)]
    table.columns.name = None
    return table


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(char, char) for char in text)


def save_results_table(summary: pd.DataFrame, metrics: tuple[str, ...] | list[str], stem: str | Path,
                       caption: str = "", variants: list[str] | tuple[str, ...] | None = None,
                       digits: int = 3) -> list[Path]:
    """Write `stem`.md (one section per dataset) and `stem`.tex (one booktabs table, a column group per dataset)."""
    stem = Path(stem)
    datasets = list(dict.fromkeys(summary["dataset"]))
    tables = {d: results_table(summary, metrics, d, variants, digits) for d in datasets}
    seeds = sorted(set(summary["seeds"].astype(int)))
    note = (f"mean {PLUS_MINUS} sample std over {'/'.join(map(str, seeds))} replicates (run, seed)" if max(seeds) > 1
            else "one seed")
    md = [f"{caption}\n" if caption else "", f"_{note}; {MISSING} where the variant does not produce the metric._\n"]
    md += [f"## {d}\n\n{t.to_markdown()}\n" for d, t in tables.items()]

    wide = pd.concat(tables, axis=1)  # columns (dataset, metric); a variant missing from one dataset gets NaN
    wide = wide.map(lambda cell: _latex_escape(cell).replace(PLUS_MINUS, r"$\pm$").replace(MISSING, "--")
                    if isinstance(cell, str) else "--")
    wide.index = [_latex_escape(str(v)) for v in wide.index]
    wide.columns = pd.MultiIndex.from_tuples([(_latex_escape(d), _latex_escape(m)) for d, m in wide.columns])
    tex_caption = f"{caption} ({note})".replace(PLUS_MINUS, r"$\pm$") if caption else None  # caption kept as LaTeX
    tex = wide.to_latex(caption=tex_caption, column_format="l" + "c" * wide.shape[1], multicolumn_format="c",
                        escape=False)
    return [atomic_write_text(stem.with_suffix(".md"), "\n".join(part for part in md if part)),
            atomic_write_text(stem.with_suffix(".tex"), tex)]


def grouped_bars_with_errors(summary: pd.DataFrame, metrics: tuple[str, ...] | list[str], dataset: str, title: str,
                             variants: list[str] | tuple[str, ...] | None = None, ylabel: str = "score") -> plt.Figure:
    """One group of bars per metric, one bar per variant, error bars = sample std over seeds (none for one seed)."""
    rows = _rows(summary, dataset, variants)
    metrics = list(metrics)
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(metrics) * max(1, len(rows))), 3.6))
    width = 0.8 / max(1, len(rows))
    x = np.arange(len(metrics))
    stats = {m: _mean_std(rows, m) for m in metrics}
    palette = colours(len(rows))
    for i, variant in enumerate(rows.index):
        mean = np.array([stats[m][0][i] for m in metrics])
        std = np.array([stats[m][1][i] for m in metrics])
        at = x + (i - (len(rows) - 1) / 2) * width
        ax.bar(at, np.nan_to_num(mean), width, label=variant, color=palette[i])  # a metric it lacks: no bar
        has = np.isfinite(mean) & np.isfinite(std)
        if has.any():
            ax.errorbar(at[has], mean[has], yerr=std[has], fmt="none", ecolor="black", elinewidth=1, capsize=2)
    ax.set_xticks(x, metrics)
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=min(4, len(rows)), loc="upper left", bbox_to_anchor=(0, -0.12))
    ax.grid(axis="y", alpha=0.3)
    return fig


def lambda_curve(summary: pd.DataFrame, dataset: str, metrics: tuple[str, ...] | list[str], title: str,
                 reference: str = "bsharedrag") -> plt.Figure:
    """Fully Shared RAG's metrics against its retrieval-loss weight lambda (std band), `reference` as dashed lines."""
    rows = _rows(summary, dataset, None)
    if "lambda" not in rows.columns or rows["lambda"].isna().all():
        raise ValueError(f"no rows with a `lambda` for dataset {dataset!r}; give the fully-shared rows of the results "
                         "a `lambda` column before summarise()")
    curve = rows[rows["lambda"].notna()].sort_values("lambda")
    lam = curve["lambda"].to_numpy(float)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for m in metrics:
        mean, std = _mean_std(curve, m)
        (line,) = ax.plot(lam, mean, marker="o", label=m)
        has = np.isfinite(mean) & np.isfinite(std)
        if has.any():
            ax.fill_between(lam, np.where(has, mean - std, mean), np.where(has, mean + std, mean), where=has,
                            color=line.get_color(), alpha=0.2, linewidth=0)
            # A band spans only neighbours that both have a spread; with lambdas at unequal seed counts the bar
            # still shows it on a point whose neighbours are single runs.
            ax.errorbar(lam[has], mean[has], yerr=std[has], fmt="none", ecolor=line.get_color(), capsize=3)
        if reference in rows.index:
            ref = float(rows.loc[reference, f"{m}_mean"])
            if np.isfinite(ref):
                ax.axhline(ref, linestyle="--", color=line.get_color(), alpha=0.8, label=f"{reference} ({m})")
    ax.set_xlabel("λ (weight of the retrieval loss)")
    ax.set_ylabel("score")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(alpha=0.3)
    return fig


def quality_memory_scatter(summary: pd.DataFrame, dataset: str, quality_metric: str, title: str,
                           variants: list[str] | tuple[str, ...] | None = None) -> plt.Figure:
    """Quality (mean, error bar = std) against inference memory, one labelled point per variant."""
    rows = _rows(summary, dataset, variants)
    _require(rows, ["inference_memory_mb"], "summary (results had no `inference_memory_mb`?)")
    mean, std = _mean_std(rows, quality_metric)
    memory = rows["inference_memory_mb"].to_numpy(float)
    shown = np.isfinite(mean) & np.isfinite(memory)
    if not shown.any():
        raise ValueError(f"no variant of {dataset!r} has both `inference_memory_mb` and {quality_metric!r}")
    fig, ax = plt.subplots(figsize=(6, 4))
    palette = colours(int(shown.sum()))
    for i, (variant, x, y, s) in enumerate(zip(rows.index[shown], memory[shown], mean[shown], std[shown])):
        point = ax.scatter([x], [y], zorder=3, color=palette[i])
        if np.isfinite(s):
            ax.errorbar([x], [y], yerr=[s], fmt="none", ecolor=point.get_facecolor()[0], capsize=3)
        ax.annotate(variant, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("inference memory (MB)")
    ax.set_ylabel(quality_metric)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.margins(0.15)
    return fig
