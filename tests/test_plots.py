"""07's analysis: ablation summaries, tables and figures (plots.py) on a small synthetic long-form results frame,
and the parts of ablations.py that decide what is compared (directions, replicates, seeds, skipped variants, Parametric
RAG's rows kept as they finish and scored against the same questions) on fakes of the trained components."""

import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from bsharedrag import ablations, plots
from bsharedrag.ablations import Ablation, Component, Retrieved
from bsharedrag.generator import DecodeSettings, GeneratorSettings
from bsharedrag.prag import ParametricRAG
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


def test_lambda_curve_shows_the_spread_of_a_point_whose_neighbours_ran_once():
    rows = make_results()
    rows = rows[(rows["variant"] != "fully_shared_0.8") | (rows["seed"] == 0)]  # 0.2 at three seeds, 0.8 at one
    curve = plots.lambda_curve(plots.summarise(rows, METRICS), "epqa", ("bleu3",), "mixed seeds")
    ax = curve.axes[0]  # the band joins no two points: 0.2's neighbour 0.8 has no spread
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 1 and [seg[0][0] for seg in bars[0].lines[2][0].get_segments()] == [0.2]


def test_lambda_curve_needs_lambda_rows():
    summary = plots.summarise(make_results().drop(columns="lambda"), METRICS)
    with pytest.raises(ValueError, match="lambda"):
        plots.lambda_curve(summary, "epqa", ("bleu3",), "no lambda")


# --- ablations.py: what is compared with what --------------------------------------------------------------------------

def test_summarise_treats_each_run_and_seed_as_a_replicate():
    first, second = make_results(seeds=(0,)), make_results(seeds=(0,))  # two runs, each with its own seed 0
    gathered = pd.concat([first.assign(run="a"), second.assign(run="b", bleu3=second["bleu3"] + 0.1)],
                         ignore_index=True)
    summary = plots.summarise(gathered, METRICS)
    assert (summary["seeds"] == 2).all()
    row = summary.set_index(["variant", "dataset"]).loc[("bsharedrag", "epqa")]
    values = gathered[(gathered["variant"] == "bsharedrag") & (gathered["dataset"] == "epqa")]["bleu3"]
    assert row["bleu3_std"] == pytest.approx(np.std(values, ddof=1))
    with pytest.raises(ValueError, match=r"run, seed"):  # the same run gathered twice
        plots.summarise(pd.concat([gathered, gathered.iloc[:1]]), METRICS)
    with pytest.raises(ValueError, match="more than once"):
        ablations.gather(["outputs/a", "elsewhere/a"])


def test_a_seed_repeated_in_another_run_on_the_same_inputs_and_machine_is_one_replicate(tmp_path):
    def run(name: str, key: str, boot: str, rows: list[dict]) -> Path:
        (tmp_path / name / "07_ablations").mkdir(parents=True)
        (tmp_path / name / "07_ablations" / "context.json").write_text(json.dumps({"key": key}))
        (tmp_path / name / "env.txt").write_text(f"cpu: x\nboot id: {boot}\n")
        (tmp_path / name / "07_ablations" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return tmp_path / name

    def row(variant: str, seed: int, ndcg: float) -> dict:
        return {"variant": variant, "dataset": "epqa", "seed": seed, "ndcg@5": ndcg, "bleu3": 0.3, "rougeL": 0.4}

    # run a: bsharedrag at seeds 1-2; run b repeats bsharedrag at seed 1 (a hair off) and adds wo_hard_negatives at
    # seeds 1-2 on the same inputs and boot; run c has the same inputs on another boot; run d has neither file
    a = run("a", "k" * 64, "boot-one", [row("bsharedrag", 1, 0.70), row("bsharedrag", 2, 0.60)])
    b = run("b", "k" * 64, "boot-one", [row("bsharedrag", 1, 0.70 + 1e-9), row("wo_hard_negatives", 1, 0.65),
                                        row("wo_hard_negatives", 2, 0.50)])
    c = run("c", "k" * 64, "boot-two", [row("bsharedrag", 1, 0.10)])
    (tmp_path / "d" / "07_ablations").mkdir(parents=True)
    (tmp_path / "d" / "07_ablations" / "results.jsonl").write_text(json.dumps(row("bsharedrag", 1, 0.9)) + "\n")
    assert ablations.replicate_context(a) == ablations.replicate_context(b) != ablations.replicate_context(c)
    assert ablations.replicate_context(tmp_path / "d") == "d"
    gathered = ablations.gather([a, b])
    assert plots.repeats(gathered, METRICS) == (1, pytest.approx(1e-9))
    summary = plots.summarise(gathered, METRICS).set_index(["variant", "dataset"])
    assert summary.loc[("bsharedrag", "epqa"), "seeds"] == 2  # seed 1 measured twice counts once
    assert summary.loc[("bsharedrag", "epqa"), "ndcg@5_mean"] == pytest.approx(0.65)
    with pytest.raises(ValueError, match=r"run, seed"):  # one run's rows twice are a mistake, not a repeat
        plots.summarise(pd.concat([gathered, gathered.iloc[:1]]), METRICS)
    claim = ablations.directions(gathered).set_index(["claim", "metric"]).loc[("hard negatives help", "ndcg@5")]
    assert claim["replicates"] == 2 and claim["margin"] == pytest.approx(0.075)  # paired across runs a and b
    elsewhere = plots.summarise(ablations.gather([a, c, tmp_path / "d"]), METRICS).set_index(["variant", "dataset"])
    assert elsewhere.loc[("bsharedrag", "epqa"), "seeds"] == 4  # another boot, or no context: replicates of their own


def results_frame(rows: dict[str, list[dict]]) -> pd.DataFrame:
    """{variant: one dict of metrics per seed} as a long-form results frame on one data set."""
    return pd.DataFrame([{"variant": v, "dataset": "ecomeval", "seed": seed, "lambda": np.nan, **metrics}
                         for v, per_seed in rows.items() for seed, metrics in enumerate(per_seed)])


def verdicts(claims: pd.DataFrame) -> dict[tuple[str, str], str]:
    return {(c, m): v for c, m, v in zip(claims["claim"], claims["metric"], claims["verdict"])}


def test_directions_compare_only_what_differs_and_call_an_equal_mean_a_tie():
    results = results_frame({
        "bsharedrag": [{"ndcg@5": 0.5, "bleu3": 0.30, "rougeL": 0.40}],
        "base_rag": [{"ndcg@5": 0.5, "bleu3": 0.20, "rougeL": 0.40}],  # bsharedrag's retriever: the same nDCG
        "wo_hard_negatives": [{"ndcg@5": 0.45, "bleu3": 0.30, "rougeL": 0.35}],
        "prag_parametric_docs": [{"ndcg@5": 0.5, "bleu3": 0.25, "rougeL": 0.30}],
        "bsharedrag@prag": [{"ndcg@5": np.nan, "bleu3": 0.20, "rougeL": 0.25}],  # bsharedrag on PRAG's questions
        "fully_shared_0.25": [{"ndcg@5": 0.40, "bleu3": 0.10, "rougeL": 0.45}],
        "fully_shared_0.75": [{"ndcg@5": 0.55, "bleu3": 0.20, "rougeL": 0.20}],
    })
    claims = ablations.directions(results)
    got = verdicts(claims)
    assert ("generation LoRA >= bare backbone, same documents", "ndcg@5") not in got  # a margin of 0 by construction
    assert not any(c.startswith("BSharedRAG >= Parametric RAG") and m == "ndcg@5" for c, m in got)
    assert got[("hard negatives help", "ndcg@5")] == "holds"
    assert got[("hard negatives help", "bleu3")] == "tie" and got[("generation LoRA >= bare backbone, same "
                                                                   "documents", "rougeL")] == "tie"
    assert not claims.loc[claims["verdict"] == "tie", "holds"].any()
    # Parametric RAG is compared with bsharedrag on its own questions (0.20), not on all of them (0.30)
    prag = claims[claims["claim"] == "BSharedRAG >= Parametric RAG (+ documents), same questions"].set_index("metric")
    assert prag.loc["bleu3", "ours"] == "bsharedrag@prag" and prag.loc["bleu3", "verdict"] == "fails"
    best = claims[claims["claim"] == "shared backbone >= fully shared (best lambda)"].set_index("metric")
    assert best.loc["ndcg@5", "other"] == "fully_shared_0.75" and best.loc["rougeL", "other"] == "fully_shared_0.25"


def test_lambda_verdicts_set_bsharedrag_against_every_lambda_not_only_the_best_per_metric():
    results = results_frame({
        "bsharedrag": [{"ndcg@5": 0.50, "bleu3": 0.30, "rougeL": 0.40},
                       {"ndcg@5": 0.52, "bleu3": 0.32, "rougeL": 0.42}],
        "fully_shared_0.25": [{"ndcg@5": 0.40, "bleu3": 0.10, "rougeL": 0.45}],  # seed 0 only: paired at seed 0
        "fully_shared_0.75": [{"ndcg@5": 0.55, "bleu3": 0.20, "rougeL": 0.20},
                              {"ndcg@5": 0.49, "bleu3": 0.22, "rougeL": 0.22}],
    })
    table = ablations.lambda_verdicts(results)
    assert list(table.index) == ["lambda 0.25", "lambda 0.75"]
    assert list(table.columns) == ["ecomeval ndcg@5", "ecomeval bleu3", "ecomeval rougeL", "replicates"]
    assert table.loc["lambda 0.25", "ecomeval ndcg@5"] == "holds +0.100"
    assert table.loc["lambda 0.25", "ecomeval rougeL"] == "fails -0.050" and table.loc["lambda 0.25", "replicates"] == 1
    # means 0.51 vs 0.52, spread max(std) = 0.042: a tie, where the best-lambda row would name 0.75 alone
    assert table.loc["lambda 0.75", "ecomeval ndcg@5"] == "tie -0.010" and table.loc["lambda 0.75", "replicates"] == 2
    best = ablations.directions(results).set_index(["claim", "metric"])
    assert best.loc[("shared backbone >= fully shared (best lambda)", "rougeL"), "other"] == "fully_shared_0.25"
    assert ablations.lambda_verdicts(results[~results["variant"].str.startswith("fully")]).empty


def test_directions_call_a_margin_within_the_seed_spread_a_tie():
    results = results_frame({
        "bsharedrag": [{"ndcg@5": n, "bleu3": b, "rougeL": 0.4} for n, b in ((0.5, 0.30), (0.6, 0.31), (0.4, 0.29))],
        "wo_hard_negatives": [{"ndcg@5": n, "bleu3": b, "rougeL": 0.4}
                              for n, b in ((0.45, 0.20), (0.55, 0.21), (0.35, 0.19))],
    })
    claims = ablations.directions(results).set_index("metric")
    assert claims.loc["ndcg@5", "margin"] == pytest.approx(0.05) and claims.loc["ndcg@5", "spread"] == pytest.approx(0.1)
    assert claims.loc["ndcg@5", "verdict"] == "tie" and claims.loc["bleu3", "verdict"] == "holds"
    assert (claims["replicates"] == 3).all()


def test_directions_set_a_row_trained_at_one_seed_against_ours_at_that_seed():
    # bsharedrag at seeds 0-2 (a headline row), wo_cpt at seed 0 only: the claim is decided at seed 0, where
    # wo_cpt was measured (0.73 > 0.69), not against bsharedrag's mean over seeds wo_cpt never ran (0.65 < 0.69).
    results = results_frame({
        "bsharedrag": [{"ndcg@5": n, "bleu3": 0.3, "rougeL": 0.4} for n in (0.73, 0.62, 0.60)],
        "wo_cpt": [{"ndcg@5": 0.69, "bleu3": 0.2, "rougeL": 0.4}],
        "fully_shared_0.5": [{"ndcg@5": n, "bleu3": 0.2, "rougeL": 0.4} for n in (0.68, 0.67, 0.64)],
    })
    claims = ablations.directions(results).set_index(["claim", "metric"])
    cpt = claims.loc[("continual pre-training helps", "ndcg@5")]
    assert cpt["ours_mean"] == pytest.approx(0.73) and cpt["replicates"] == 1 and cpt["verdict"] == "holds"
    shared = claims.loc[("shared backbone >= fully shared (best lambda)", "ndcg@5")]
    assert shared["replicates"] == 3 and shared["ours_mean"] == pytest.approx(0.65)  # all three seeds, paired
    # gathered runs each have their own seed 0: (run, seed) is the replicate, so two runs' seed 0 do not pair up
    other_run = results_frame({"bsharedrag": [{"ndcg@5": 0.5, "bleu3": 0.3, "rougeL": 0.4}]}).assign(run="b")
    gathered = pd.concat([results.assign(run="a"), other_run], ignore_index=True)
    cpt = ablations.directions(gathered).set_index(["claim", "metric"]).loc[("continual pre-training helps", "ndcg@5")]
    assert cpt["ours_mean"] == pytest.approx(0.73) and cpt["replicates"] == 1


def fake_ablation(tmp_path: Path, sets: dict, cpt: bool = True, factory: str = "Flat") -> Ablation:
    common = {"seed": 0, "backbone": "tiny-random-gemma3", "use_pretrained_backbone": cpt, "compute_dtype": "float32",
              "query_prefix": "", "passage_prefix": "", "max_length": 64, "batch_size": 4,
              "passage_format": "{title}: {text}"}
    return Ablation(tmp_path, {"common": common, "05_index": {"index_factory": factory}}, sets,
                    tmp_path / "07_ablations", 5, {"en": DecodeSettings(), "zh": DecodeSettings()})


def test_07_builds_indexes_with_05s_factory_and_counts_each_index_in_memory(tmp_path):
    assert fake_ablation(tmp_path, {}, factory="HNSW32").encode(tmp_path).index_factory == "HNSW32"
    found = Retrieved({"epqa": {"ndcg@5": 0.5, "hit@3": 0.7}, "ecomeval": {"ndcg@5": 0.6, "hit@3": 0.8}}, {}, 0.2,
                      {"epqa": 3.0, "ecomeval": 1.0})
    rows = ablations._rows("wo_hard_negatives", 0, found, None,
                           {"trainable_parameters": 1, "training_seconds": 1.0, "inference_memory_mb": 500.0})
    assert {r["dataset"]: r["inference_memory_mb"] for r in rows} == {"epqa": 503.0, "ecomeval": 501.0}


def test_07_sets_aside_rows_and_components_made_from_other_inputs_or_settings(tmp_path, capsys, tally):
    ab = fake_ablation(tmp_path, {})
    adapter = tmp_path / "03_retriever" / "adapters" / "hard" / "adapter_model.safetensors"
    adapter.parent.mkdir(parents=True)
    adapter.write_bytes(b"weights v1")
    context = ablations.ablation_context(ab, {"separate_learning_rate": 5e-5})
    assert ablations.set_aside_if_stale(ab, context) is None  # nothing made yet
    (ab.out_dir / "components" / "x").mkdir(parents=True)
    (ab.out_dir / "results.jsonl").write_text('{"variant": "bsharedrag"}\n')
    assert ablations.set_aside_if_stale(ab, ablations.ablation_context(ab, {"separate_learning_rate": 5e-5})) is None
    assert (ab.out_dir / "results.jsonl").is_file()  # same inputs and settings: a resume reuses what was made
    adapter.write_bytes(b"weights v2")  # 03 retrained its adapter
    why = ablations.set_aside_if_stale(ab, ablations.ablation_context(ab, {"separate_learning_rate": 5e-5}))
    assert "03_retriever/adapters/hard/adapter_model.safetensors" in why
    (aside,) = ab.out_dir.glob("stale-*")
    assert (aside / "results.jsonl").is_file() and (aside / "components" / "x").is_dir()  # moved, not deleted
    assert not (ab.out_dir / "results.jsonl").exists() and "set aside" in capsys.readouterr().out
    (ab.out_dir / "results.jsonl").write_text("{}\n")
    assert "settings changed" in ablations.set_aside_if_stale(ab, ablations.ablation_context(
        ab, {"separate_learning_rate": 1e-4}))
    tally("artefacts compared", 2)


def test_seed_variants_choose_the_rows_trained_at_every_seed_and_wo_cpt_needs_cpt(tmp_path, monkeypatch, capsys):
    seeds, chosen = [0, 1, 2], ["bsharedrag", "fully_shared_0.5"]
    assert ablations.runs_at_seed("wo_cpt", 0, seeds, chosen) and not ablations.runs_at_seed("wo_cpt", 1, seeds, chosen)
    assert ablations.runs_at_seed("fully_shared_0.5", 2, seeds, chosen)
    assert not ablations.runs_at_seed("fully_shared_0.25", 2, seeds, chosen)
    assert ablations.runs_at_seed("fully_shared_0.25", 1, seeds, ["fully_shared"])
    assert ablations.runs_at_seed("closed_book", 2, seeds, [])  # none named: every row at every seed
    with pytest.raises(ValueError, match="fully_shared_0.3"):
        ablations.check_seed_variants(["fully_shared_0.3"], ["bsharedrag", "fully_shared"], [0.25, 0.5])

    ab = fake_ablation(tmp_path, {}, cpt=False)
    with pytest.raises(ValueError, match="use_pretrained_backbone"):
        ablations.adapted_variant(ab, "wo_cpt", 0, False, "hard")  # refused before anything loads
    calls = []

    def fake(name):
        return lambda *a: calls.append((name, *a[1:])) or [{"variant": name, "dataset": "epqa", "seed": a[-1]}]

    monkeypatch.setattr(ablations, "adapted_variant", lambda ab_, v, seed, cpt, neg: fake(v)(ab_, seed))
    monkeypatch.setattr(ablations, "fully_shared_variant",
                        lambda ab_, lam, seed: calls.append(("fully_shared", lam, seed))
                        or [{"variant": f"fully_shared_{lam:g}", "dataset": "epqa", "seed": seed}])
    monkeypatch.setattr(ablations, "closed_book_variant", lambda ab_, seed: fake("closed_book")(ab_, seed))
    ab.out_dir.mkdir(parents=True)
    (ab.out_dir / "results.jsonl").write_text(json.dumps({"variant": "wo_cpt", "dataset": "epqa", "seed": 0}) + "\n")
    frame = ablations.run_variants(ab, ["bsharedrag", "wo_cpt", "fully_shared", "closed_book"], [0, 1], [0.25, 0.5],
                                   seed_variants=chosen)
    assert sorted(calls) == sorted([("bsharedrag", 0), ("bsharedrag", 1), ("fully_shared", 0.25, 0),
                                    ("fully_shared", 0.5, 0), ("fully_shared", 0.5, 1), ("closed_book", 0)])
    assert "wo_cpt" not in set(frame["variant"])  # nor the stale row an older run scored on the CPT model
    assert "skipping wo_cpt" in capsys.readouterr().out


class FakeCache:
    """Document adapters that were all trained earlier: 1 s of augmentation and 2 s of training each."""

    def __init__(self, cache_dir, backbone, settings):
        self.settings = settings

    def ensure(self, docs, lang):
        return {"encoded": 0, "reused": len({t for _, t in docs}), "augment_seconds": 0.0, "train_seconds": 0.0}

    def encoding_cost(self, docs, lang):
        n = len({t for _, t in docs})
        return {"documents": n, "augment_seconds": 1.0 * n, "train_seconds": 2.0 * n, "seconds": 3.0 * n}

    def augmentations(self, docs, lang):
        return [{"rejected": [{"attempt": 0, "kind": "qa", "reason": "1 of 2 pairs"}]} for _ in {t for _, t in docs}]

    def adapter_parameters(self):
        return 50

    def adapter_mb(self):
        return 0.25


class FakeRAG(ParametricRAG):  # the real cost figures (held_adapter_mb), a fake answering
    calls: list[str] = []
    fail: set[str] = set()

    def __init__(self, backbone, cache, generator_settings, decode):
        self.backbone, self.cache, self.generator_settings, self.decode = backbone, cache, generator_settings, decode

    def answer_many(self, questions, docs, lang, mode):
        FakeRAG.calls.append(mode)
        if mode in FakeRAG.fail:
            raise RuntimeError("killed while answering")
        return {"answers": ["an answer"] * len(questions)}


def test_parametric_rag_rows_are_kept_as_they_finish_and_compared_on_the_same_questions(tmp_path, monkeypatch,
                                                                                      small_ecomeval):
    import torch
    from bsharedrag import genmetrics, prag
    from bsharedrag.evaluation import generation_questions

    ds = small_ecomeval
    ab = fake_ablation(tmp_path, {"ecomeval": ds})
    test_qids = list(generation_questions(ds, 0, 0)["qid"])
    top3 = list(ds.corpus["doc_id"][:3])
    answers = tmp_path / "06_evaluate" / "generations" / "ecomeval.jsonl"
    answers.parent.mkdir(parents=True)
    answers.write_text("".join(json.dumps({"qid": q, "system": s, "answer": f"{s} says"}) + "\n"
                               for s in ("bsharedrag", "base_rag") for q in test_qids))

    def saved_row(variant, bleu3):
        return [{"variant": variant, "dataset": "ecomeval", "seed": 0, "lambda": None, "ndcg@5": 0.5, "bleu3": bleu3,
                 "rougeL": 0.2, "bertscore_f1": 0.3, "token_f1": 0.4, "n_generation": 5, "trainable_parameters": 7,
                 "training_seconds": 1.0, "inference_memory_mb": 9.0, "seconds_per_question": 0.5,
                 "answers_file": "06_evaluate/generations/ecomeval.jsonl", "answers_system": variant}]

    bb = type("FakeBackbone", (), {"model": torch.nn.Linear(4, 4), "held_dtype": torch.float32})()
    monkeypatch.setattr(ablations, "adapted_variant", lambda *a: saved_row("bsharedrag", 0.9))
    monkeypatch.setattr(ablations, "base_rag_variant", lambda *a: saved_row("base_rag", 0.8))
    monkeypatch.setattr(ablations, "retrieval_adapter", lambda *a: Component(tmp_path / "retrieval", 100, 2.0))
    monkeypatch.setattr(ablations.Ablation, "load", lambda self, cpt: bb)
    monkeypatch.setattr(ablations, "generator_settings", lambda cfg: GeneratorSettings())
    monkeypatch.setattr(ablations, "retrieval_scores", lambda *a: Retrieved(
        {"ecomeval": {}}, {"ecomeval": {q: top3 for q in ds.split("test")["qid"]}}, 0.01, {"ecomeval": 1.5}))
    monkeypatch.setattr(prag, "DocumentAdapterCache", FakeCache)
    monkeypatch.setattr(prag, "ParametricRAG", FakeRAG)
    monkeypatch.setattr(genmetrics, "default_bertscorer", lambda lang: None)
    monkeypatch.setattr(genmetrics, "generation_metrics", lambda predictions, references, lang, scorer: {
        "bleu3": len({p for p in predictions}) / 10, "rougeL": 0.2, "bertscore_f1": 0.3, "token_f1": 0.4,
        "n": len(predictions), "bertscore_model": "fake"})

    def run():
        return ablations.run_variants(ab, ["bsharedrag", "prag", "base_rag"], [0], [], None, ["ecomeval"], 3)

    FakeRAG.calls, FakeRAG.fail = [], {"parametric_docs"}
    with pytest.raises(RuntimeError, match="killed"):
        run()
    kept = [json.loads(line)["variant"] for line in (ab.out_dir / "results.jsonl").read_text().splitlines()]
    assert kept == ["bsharedrag", "base_rag", "prag_parametric"]  # the finished mode survived the failure
    FakeRAG.calls, FakeRAG.fail = [], set()
    frame = run().set_index("variant")
    assert FakeRAG.calls == ["parametric_docs"]  # the rerun answers only what is missing

    row = frame.loc["prag_parametric"]
    assert row["n_generation"] == 3 and pd.isna(row["ndcg@5"])  # no retrieval metrics copied from bsharedrag
    assert row["documents_encoded"] == 3 and row["documents_reused"] == 3  # all trained earlier, all counted
    assert row["trainable_parameters"] == 100 + 3 * 50 and row["document_lora_parameters"] == 50
    assert row["document_encoding_seconds"] == 9.0 and row["training_seconds"] == 2.0 + 9.0
    # the 3 questions answer in one batch: their 3 merges (rank 3 x 2, in the fp32 backbone's dtype) are held
    # together, and one question's 3 document LoRAs while its merge is made
    assert row["inference_memory_mb"] == pytest.approx(ablations.backbone_mb(bb) + 1.5 + 3 * 3 * 50 * 4 / 2**20
                                                       + 3 * 0.25)
    rejected = json.loads((ab.out_dir / "variants" / "prag" / "seed0" / "ecomeval_augmentation_rejections.json")
                          .read_text())
    assert rejected == {"attempt 0 (greedy): qa: 1 of 2 pairs": 3}  # one per distinct document
    for peer in ("bsharedrag@prag", "base_rag@prag"):
        assert frame.loc[peer, "n_generation"] == 3 and frame.loc[peer, "scored_from"] == "its saved answers"
    assert frame.loc["bsharedrag@prag", "trainable_parameters"] == 7  # the costs are the system's own
    claims = ablations.directions(frame.reset_index())
    assert set(claims.loc[claims["claim"].str.contains("Parametric RAG"), "ours"]) == {"bsharedrag@prag"}


def test_more_than_ten_variants_get_distinct_colours():
    from bsharedrag.plots import colours

    assert len(set(colours(12))) == 12 and len(set(colours(10))) == 10  # tab10 alone repeats from the 11th bar
