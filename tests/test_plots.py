"""Ablation summaries, tables and figures (plots.py) on a small synthetic long-form results frame."""

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from bsharedrag import plots
from matplotlib.collections import PolyCollection
from matplotlib.container import ErrorbarContainer

METRICS = ("ndcg@5", "bleu3", "rougeL")
VARIANTS = ("bsharedrag", "wo_cpt", "fully_shared_0.2", "fully_shared_0.8", "prag_parametric")


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def make_results(seeds=(0, 1, 2)) -> pd.DataFrame:
    rng = np.random.default_rng(7)
    rows = []
    for v, variant in enumerate(VARIANTS):
        for dataset in ("epqa", "ecomeval"):
            for seed in seeds:
                retrieves = variant != "prag_parametric"
                lam = float(variant.rsplit("_", 1)[1]) if variant.startswith("fully_shared") else np.nan
                rows.append({"variant": variant, "dataset": dataset, "seed": seed,
                             "ndcg@5": 0.5 + 0.05 * v + rng.normal(0, 0.02) if retrieves else np.nan,
                             "bleu3": 0.2 + 0.03 * v + rng.normal(0, 0.01),
                             "rougeL": 0.3 + 0.02 * v + rng.normal(0, 0.01),
                             "trainable_parameters": 1000 * (v + 1), "inference_memory_mb": 500.0 + 100 * v,
                             "seconds_per_question": 0.1 + rng.random(), "training_seconds": 60.0 * (v + 1),
                             "lambda": lam})
    return pd.DataFrame(rows)


def has_error_bars(fig) -> bool:
    return any(isinstance(c, ErrorbarContainer) and c.has_yerr for ax in fig.axes for c in ax.containers)


def assert_saved(paths):
    assert sorted(p.suffix for p in paths) == [".pdf", ".png"]
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)


def test_summarise_matches_numpy_mean_and_sample_std():
    results = make_results()
    summary = plots.summarise(results, METRICS)
    assert len(summary) == len(VARIANTS) * 2
    assert (summary["seeds"] == 3).all()
    row = summary[(summary["variant"] == "wo_cpt") & (summary["dataset"] == "ecomeval")].iloc[0]
    raw = results[(results["variant"] == "wo_cpt") & (results["dataset"] == "ecomeval")]
    for m in METRICS:
        values = raw[m].to_numpy()
        assert row[f"{m}_mean"] == pytest.approx(values.sum() / 3)
        assert row[f"{m}_std"] == pytest.approx(np.sqrt(((values - values.mean()) ** 2).sum() / 2))
    prag = summary[summary["variant"] == "prag_parametric"]
    assert prag["ndcg@5_mean"].isna().all() and prag["ndcg@5_std"].isna().all()
    assert summary.set_index(["variant", "dataset"]).loc[("fully_shared_0.8", "epqa"), "lambda"] == 0.8
    assert summary.set_index(["variant", "dataset"]).loc[("bsharedrag", "epqa"), "inference_memory_mb"] == 500.0


def test_summarise_refuses_duplicate_seeds_and_missing_metrics():
    results = make_results()
    with pytest.raises(ValueError, match="more than one row"):
        plots.summarise(pd.concat([results, results.iloc[:1]]), METRICS)
    with pytest.raises(ValueError, match="token_f1"):
        plots.summarise(results, ("token_f1",))


def test_results_table_strings_and_order():
    summary = plots.summarise(make_results(), METRICS)
    order = ["prag_parametric", "bsharedrag", "wo_cpt"]
    table = plots.results_table(summary, METRICS, "epqa", variants=order)
    assert list(table.index) == order and list(table.columns) == list(METRICS)
    row = summary[(summary["variant"] == "bsharedrag") & (summary["dataset"] == "epqa")].iloc[0]
    assert table.loc["bsharedrag", "bleu3"] == f"{row['bleu3_mean']:.3f} ± {row['bleu3_std']:.3f}"
    assert table.loc["prag_parametric", "ndcg@5"] == "–"
    with pytest.raises(ValueError, match="nope"):
        plots.results_table(summary, METRICS, "epqa", variants=["nope"])
    with pytest.raises(ValueError, match="no rows for dataset"):
        plots.results_table(summary, METRICS, "msmarco")


def test_save_results_table_writes_markdown_and_latex(tmp_path):
    summary = plots.summarise(make_results(), METRICS)
    paths = plots.save_results_table(summary, METRICS, tmp_path / "tables" / "ablations", "Ablations")
    md, tex = (p.read_text() for p in paths)
    assert [p.suffix for p in paths] == [".md", ".tex"]
    assert "## epqa" in md and "## ecomeval" in md and "±" in md and "wo_cpt" in md
    assert r"\pm" in tex and "±" not in tex and r"\toprule" in tex and r"\bottomrule" in tex
    assert r"\caption{Ablations" in tex and "epqa" in tex and "ecomeval" in tex
    for variant in VARIANTS:  # underscores are escaped so the table compiles
        assert variant.replace("_", r"\_") in tex


def test_figures_are_saved_as_png_and_pdf(tmp_path):
    summary = plots.summarise(make_results(), METRICS)
    bars = plots.grouped_bars_with_errors(summary, METRICS, "epqa", "ablations: epqa")
    assert has_error_bars(bars) and bars.axes[0].get_ylim()[0] == 0
    assert_saved(plots.save_figure(bars, tmp_path / "bars"))

    curve = plots.lambda_curve(summary, "epqa", ("bleu3", "rougeL"), "fully shared: lambda")
    ax = curve.axes[0]
    assert [list(line.get_xdata()) for line in ax.lines[:1]] == [[0.2, 0.8]]
    labels = [line.get_label() for line in ax.lines]
    assert "bsharedrag (bleu3)" in labels and "bsharedrag (rougeL)" in labels
    assert any(isinstance(c, PolyCollection) for c in ax.collections)  # std band
    assert_saved(plots.save_figure(curve, tmp_path / "lambda"))

    scatter = plots.quality_memory_scatter(summary, "epqa", "ndcg@5", "quality vs memory")
    texts = {t.get_text() for t in scatter.axes[0].texts}
    assert texts == set(VARIANTS) - {"prag_parametric"}  # no ndcg@5 for the variant that does not retrieve
    assert has_error_bars(scatter)
    assert_saved(plots.save_figure(scatter, tmp_path / "scatter"))


def test_one_seed_gives_no_error_bars_and_no_plus_minus(tmp_path):
    summary = plots.summarise(make_results(seeds=(0,)), METRICS)
    assert (summary["seeds"] == 1).all() and summary["bleu3_std"].isna().all()
    table = plots.results_table(summary, METRICS, "ecomeval")
    assert not table.apply(lambda col: col.str.contains("±")).any().any()
    md, tex = (p.read_text() for p in plots.save_results_table(summary, METRICS, tmp_path / "one"))
    assert "± " not in md.split("\n", 1)[1] and r"\pm" not in tex
    assert not has_error_bars(plots.grouped_bars_with_errors(summary, METRICS, "epqa", "one seed"))
    assert not has_error_bars(plots.quality_memory_scatter(summary, "epqa", "bleu3", "one seed"))
    curve = plots.lambda_curve(summary, "epqa", ("bleu3",), "one seed")
    assert not any(isinstance(c, PolyCollection) for c in curve.axes[0].collections)
    assert_saved(plots.save_figure(curve, tmp_path / "lambda_one"))


def test_lambda_curve_needs_lambda_rows():
    summary = plots.summarise(make_results().drop(columns="lambda"), METRICS)
    with pytest.raises(ValueError, match="lambda"):
        plots.lambda_curve(summary, "epqa", ("bleu3",), "no lambda")
