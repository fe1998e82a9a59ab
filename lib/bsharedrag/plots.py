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


def grouped_bars(table: pd.DataFrame, title: str, ylabel: str = "score") -> plt.Figure:
    """One group of bars per metric (columns), one bar per system (rows)."""
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * table.shape[1] * max(1, table.shape[0]) / 2), 3.6))
    width = 0.8 / max(1, table.shape[0])
    x = np.arange(table.shape[1])
    for i, (system, row) in enumerate(table.iterrows()):
        ax.bar(x + (i - (table.shape[0] - 1) / 2) * width, row.values, width, label=system)
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
