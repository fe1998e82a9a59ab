"""The runner end to end at scale=tiny: the chain, its metrics.json, resume with verification, and failures."""

import json
import os
import re
import shutil
import subprocess
import sys
import time

import psutil
import pytest
import yaml

from bsharedrag import paths, run
from bsharedrag.artefacts import sha256_file
from bsharedrag.metrics import RETRIEVAL_METRICS
from bsharedrag.systems import SYSTEMS


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    outputs = tmp_path_factory.mktemp("outputs")
    mp = pytest.MonkeyPatch()
    mp.setattr(paths, "OUTPUTS", outputs)
    try:
        assert run.main([str(paths.CONFIGS / "tiny.yaml")]) == 0
    finally:
        mp.undo()
    (run_dir,) = outputs.iterdir()
    return run_dir


def test_chain_writes_metrics_in_the_agreed_shape(tiny_run):
    assert (tiny_run / "resolved.yaml").is_file() and "torch" in (tiny_run / "env.txt").read_text()
    assert "cpu matmul flags: " in (tiny_run / "env.txt").read_text()
    assert re.search(r"matmul at start: bfloat16 [\d.]+, float32 [\d.]+ TFLOP/s", (tiny_run / "env.txt").read_text())
    assert tiny_run.name.endswith("-tiny") and (tiny_run / "06_evaluate.ipynb").is_file()
    metrics = json.loads((tiny_run / "06_evaluate" / "metrics.json").read_text())
    assert set(metrics["retrieval"]) == {"epqa", "ecomeval"}
    for dataset, by_system in metrics["retrieval"].items():
        assert set(by_system) == set(SYSTEMS)
        for system, values in by_system.items():
            assert set(RETRIEVAL_METRICS) <= set(values)
            assert all(0.0 <= values[m] <= 1.0 for m in RETRIEVAL_METRICS), (dataset, system)
            assert values["hit@1"] <= values["hit@3"] <= values["hit@5"]
    # BM25 on 40 real questions each: far above what a random ranking of ~400 documents would reach.
    assert metrics["retrieval"]["epqa"]["bm25"]["hit@5"] >= 0.4
    assert metrics["retrieval"]["ecomeval"]["bm25"]["hit@5"] >= 0.6
    mining = json.loads((tiny_run / "02_mine_negatives" / "metrics.json").read_text())["mining"]
    assert mining["epqa"]["groups"] > 20 and mining["epqa"]["negatives_per_group"] >= 3
    assert mining["epqa"]["own_judged_share"] > 0  # some hard negatives are the product's own irrelevant sentences
    first = json.loads((tiny_run / "02_mine_negatives" / "epqa_hard.jsonl").read_text().splitlines()[0])
    assert set(first) == {"qid", "query", "positives", "negatives"}
    index_metrics = json.loads((tiny_run / "05_index" / "metrics.json").read_text())
    assert index_metrics["datasets"]["epqa"]["questions"] == 40
    for name in ("retrieval_epqa.png", "retrieval_epqa.pdf"):
        assert (tiny_run / "06_evaluate" / "figures" / name).stat().st_size > 1000
    assert (tiny_run / "06_evaluate" / "tables" / "retrieval_ecomeval.tex").is_file()


def test_chain_generation_metrics_and_the_ask_command(tiny_run):
    from bsharedrag.evaluation import GENERATION_SYSTEMS
    from bsharedrag.genmetrics import GENERATION_METRICS

    metrics = json.loads((tiny_run / "06_evaluate" / "metrics.json").read_text())
    for dataset in ("epqa", "ecomeval"):
        by_system = metrics["generation"][dataset]
        assert set(by_system) == set(GENERATION_SYSTEMS)
        for system, values in by_system.items():
            assert all(0.0 <= values[m] <= 1.0 for m in GENERATION_METRICS), (dataset, system)
            assert values["n"] == 3 and values["bertscore_model"]
        rows = [json.loads(line) for line in
                (tiny_run / "06_evaluate" / "generations" / f"{dataset}.jsonl").read_text().splitlines()]
        assert len(rows) == 3 * len(GENERATION_SYSTEMS)
        ranking = json.loads((tiny_run / "06_evaluate" / "runs" / dataset / "bsharedrag.json").read_text())
        for row in rows:  # each system saw the documents it is defined by
            if row["system"] in ("base_rag", "bsharedrag"):
                assert row["documents"] == ranking[row["qid"]][:len(row["documents"])] and row["documents"]
            if row["system"] == "closed_book":
                assert row["documents"] == []
    assert (tiny_run / "04_generator" / "adapters" / "generation" / "adapter_model.safetensors").is_file()
    assert (tiny_run / "06_evaluate" / "tables" / "generation_ecomeval.md").is_file()
    asked = subprocess.run([sys.executable, "-m", "bsharedrag.cli", "ask", str(tiny_run), "is it waterproof?",
                            "--max-new-tokens", "4", "--context", "Rain Jacket"], capture_output=True, text=True,
                           timeout=300)
    assert asked.returncode == 0, asked.stderr[-2000:]
    assert "documents used (epqa" in asked.stdout and "[3] " in asked.stdout and "adapter switches" in asked.stderr
    assert "asked as: Rain Jacket: is it waterproof?" in asked.stderr  # as the run's ePQA questions were
    empty = subprocess.run([sys.executable, "-m", "bsharedrag.cli", "ask", str(tiny_run), "  "],
                           capture_output=True, text=True, timeout=300)
    assert empty.returncode == 2 and "empty or whitespace-only" in empty.stderr


def test_chain_ablations_rows_figures_and_tables(tiny_run):
    """07 at tiny scale: every configured variant has a row per data set, Fully Shared RAG one per lambda,
    Parametric RAG both modes on the asked data set; figures as PNG + PDF, the table as Markdown + LaTeX."""
    rows = [json.loads(line) for line in (tiny_run / "07_ablations" / "results.jsonl").read_text().splitlines()]
    variants = {(r["variant"], r["dataset"]) for r in rows}
    for variant in ("bsharedrag", "wo_hard_negatives", "separate_bm25", "separate_backbones", "fully_shared_0.5",
                    "base_rag", "closed_book"):
        assert {(variant, "epqa"), (variant, "ecomeval")} <= variants, variant
    assert {("prag_parametric", "ecomeval"), ("prag_parametric_docs", "ecomeval")} <= variants
    by = {(r["variant"], r["dataset"]): r for r in rows}
    shared, separate = by[("bsharedrag", "epqa")], by[("separate_backbones", "epqa")]
    # Separate RAG (b) trains two copies' top layers: more trainable weights, two backbones, a retriever of its own.
    assert separate["trainable_parameters"] > 2 * shared["trainable_parameters"]
    assert separate["inference_memory_mb"] > 1.5 * shared["inference_memory_mb"] and 0 <= separate["ndcg@5"] <= 1
    assert (tiny_run / "07_ablations" / "components" / "separate" / "seed0" / "retrieval_copy" / "copy.json").is_file()
    assert by[("closed_book", "epqa")].get("ndcg@5") is None and 0 <= by[("fully_shared_0.5", "epqa")]["ndcg@5"] <= 1
    assert by[("prag_parametric", "ecomeval")]["documents_encoded"] + by[("prag_parametric", "ecomeval")][
        "documents_reused"] > 0
    rejected = json.loads((tiny_run / "07_ablations" / "variants" / "prag" / "seed0" /
                           "ecomeval_augmentation_rejections.json").read_text())  # which checks cost retries
    assert all(why.startswith("attempt ") and n > 0 for why, n in rejected.items())
    for r in rows:
        assert r["n_generation"] > 0 and r["trainable_parameters"] > 0 and r["seconds_per_question"] > 0, r
    metrics = json.loads((tiny_run / "07_ablations" / "metrics.json").read_text())
    assert metrics["ablations"]["bsharedrag"]["epqa"]["seeds"] == 1 and metrics["directions"]
    for stem in ("ablations_generation_ecomeval", "lambda_epqa", "quality_memory_ecomeval"):
        for ext in ("png", "pdf"):
            assert (tiny_run / "07_ablations" / "figures" / f"{stem}.{ext}").stat().st_size > 1000
    assert "\\pm" not in (tiny_run / "07_ablations" / "tables" / "ablations.tex").read_text()  # one seed: no spread
    assert "separate_backbones" in (tiny_run / "07_ablations" / "tables" / "ablations.md").read_text()


def test_results_prints_07s_table_and_directions_from_a_finished_or_stopped_run(tiny_run, tmp_path, capsys, tally):
    from bsharedrag import cli

    assert cli.main(["results", str(tiny_run)]) == 0
    out = capsys.readouterr().out
    shared = json.loads((tiny_run / "07_ablations" / "metrics.json").read_text())["ablations"]["bsharedrag"]["epqa"]
    assert f"{shared['ndcg@5']:.3f}" in out and "separate_backbones" in out and "hard negatives help" in out
    assert "| lambda 0.5 " in out and re.search(r"over \d+ comparisons: holds \d+", out)  # each lambda apart
    assert (tiny_run / "07_ablations" / "tables" / "lambda_verdicts.md").is_file()
    stopped = tmp_path / "stopped-run" / "07_ablations"  # 07 stopped after its first rows: they are still readable
    stopped.mkdir(parents=True)
    lines = (tiny_run / "07_ablations" / "results.jsonl").read_text().splitlines()
    (stopped / "results.jsonl").write_text("\n".join(lines[:2]) + "\n")
    assert cli.main(["results", str(stopped.parent)]) == 0
    out = capsys.readouterr().out
    assert "so far: 2 " in out and "separate_backbones" not in out
    assert cli.main(["results", str(tmp_path)]) == 2
    assert "run 07_ablations in" in capsys.readouterr().err
    assert cli.main(["results", str(tiny_run), str(stopped.parent)]) == 0  # gathered: the stopped run's 2 rows join
    out = capsys.readouterr().out
    assert f"so far: {len(lines) + 2} " in out and "runs gathered" in out and "hard negatives help" in out
    assert cli.main(["results", str(tiny_run), str(tiny_run)]) == 2
    assert "more than once" in capsys.readouterr().err
    assert cli.main(["results", str(tiny_run), "--rows", "bsharedrag", "separate_bm25"]) == 0  # the claims they name
    out = capsys.readouterr().out
    assert "separate retriever (BM25)" in out and "hard negatives help" not in out and "separate_backbones" not in out
    assert cli.main(["results", str(tiny_run), "--rows", "bsharedrag", "fully_shared_0.9"]) == 2
    assert "--rows ['fully_shared_0.9']: no such 07 row" in capsys.readouterr().err
    tally("bad inputs tried", 3)


def test_an_archived_run_reads_gathers_and_draws_as_the_run_does(tiny_run, tmp_path, capsys, monkeypatch, tally):
    """The archive keeps the summaries, never weights, indexes, rankings or answers, and is enough for `results`,
    its tables and figures, and 07's gather_runs on a machine without the run."""
    from bsharedrag import archive, cli

    assert cli.main(["archive", str(tiny_run), "--to", str(tmp_path / "runs")]) == 0
    archived = tmp_path / "runs" / tiny_run.name
    kept = {str(p.relative_to(archived)) for p in archived.rglob("*") if p.is_file()}
    assert {"resolved.yaml", "env.txt", "timings.json", "06_evaluate/metrics.json", "07_ablations/results.jsonl",
            "07_ablations/context.json", "07_ablations/tables/ablations.md"} <= kept
    summaries = (".json", ".md", ".tex", ".txt", ".yaml")
    assert {f for f in kept if not f.endswith(summaries)} == {"07_ablations/results.jsonl"}
    capsys.readouterr()
    assert cli.main(["results", str(tiny_run)]) == 0
    original = capsys.readouterr().out
    assert cli.main(["results", str(archived), "--out", str(tmp_path / "report")]) == 0
    assert capsys.readouterr().out.startswith(original)
    drawn = {p.name for p in (tmp_path / "report" / "figures").iterdir()}
    assert drawn == {p.name for p in (tiny_run / "07_ablations" / "figures").iterdir()}
    for table in ("ablations.md", "directions.md"):  # the same rows (07 orders them by its variants list, the
        # archive by results.jsonl); only the caption names where they came from
        again = (tmp_path / "report" / "tables" / table).read_text().splitlines()[1:]
        assert sorted(again) == sorted((tiny_run / "07_ablations" / "tables" / table).read_text().splitlines()[1:])

    monkeypatch.setattr(archive, "ARCHIVE", tmp_path / "runs")  # a machine that never had the run
    monkeypatch.setattr(paths, "OUTPUTS", tmp_path / "no-outputs")
    assert archive.find_run(tiny_run.name) == archived
    with pytest.raises(FileNotFoundError, match="neither in"):
        archive.find_run("20260101-000000-abc1234-demo")
    assert cli.main(["archive", str(tmp_path / "report")]) == 2
    assert "no resolved.yaml" in capsys.readouterr().err
    monkeypatch.setattr(archive, "MAX_FILE_BYTES", 100)
    assert cli.main(["archive", str(tiny_run), "--to", str(tmp_path / "small")]) == 2
    assert "exceed" in capsys.readouterr().err and not (tmp_path / "small" / tiny_run.name).exists()
    tally("bad inputs tried", 3)


def test_shared_pipeline_against_two_separately_loaded_backbones(tiny_run):
    from bsharedrag.efficiency import compare

    out = compare(tiny_run, n_questions=1, max_new_tokens=4)
    assert out["same_answers"]  # greedy decoding: one shared backbone answers exactly like two separate ones
    assert out["shared"]["switch_ms"] < 50 and out["shared"]["questions"] == 1
    assert set(out["ratios"]) == {"peak_rss", "model_memory", "peak_rss_with_load", "question_latency"}


def test_bench_times_the_run_s_training_step_bucketed_and_in_one_pass(tiny_run):
    # A process of its own, as `make bench` runs it: accelerate keeps one mixed-precision state per process, and the
    # tiny run's compute dtype ("auto") may differ from the fp32 Accelerators earlier tests made here.
    code = (f"import json; from bsharedrag.bench import time_train_steps; "
            f"print(json.dumps(time_train_steps({str(tiny_run)!r}, 2)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["train_step_one_pass_s"] > 0 and figures["train_step_bucketed_s"] > 0
    assert figures["train_step_bucketed_over_one_pass"] > 0 and figures["train_steps"] == 2
    assert figures["train_step_without_over_with_peft_casts"] > 0 and figures["train_step_peft_casts_same_loss"]


def test_rankings_saved_by_06_reproduce_its_metrics(tiny_run):
    from bsharedrag.data import load_dataset
    from bsharedrag.metrics import evaluate_retrieval

    metrics = json.loads((tiny_run / "06_evaluate" / "metrics.json").read_text())
    cfg = yaml.safe_load((tiny_run / "resolved.yaml").read_text())["common"]
    ds = load_dataset("epqa", cfg["seed"], cfg["split_fractions"], cfg["max_questions"])
    ranking = json.loads((tiny_run / "06_evaluate" / "runs" / "epqa" / "bm25.json").read_text())
    assert evaluate_retrieval(ranking, ds.qrels) == pytest.approx(metrics["retrieval"]["epqa"]["bm25"])


def test_compare_tests_two_of_06s_saved_rankings_on_the_runs_split(tiny_run, capsys, tally):
    from bsharedrag import cli
    from bsharedrag.evaluation import compare_saved_rankings

    metrics = json.loads((tiny_run / "06_evaluate" / "metrics.json").read_text())["retrieval"]["ecomeval"]
    r = compare_saved_rankings(tiny_run, "ecomeval", "bsharedrag", "bm25", "hit@3", resamples=500)
    assert r["mean_a"] == pytest.approx(metrics["bsharedrag"]["hit@3"]) and r["n"] == metrics["bm25"]["n_queries"]
    assert r["mean_b"] == pytest.approx(metrics["bm25"]["hit@3"]) and r["a_wins"] + r["b_wins"] + r["ties"] == r["n"]
    # 06 tests each trained retriever against every other system (nDCG@5), each pair once, with the same numbers.
    paired = json.loads((tiny_run / "06_evaluate" / "metrics.json").read_text())["paired"]["epqa"]
    assert {(row["a"], row["b"]) for row in paired} == {("bsharedrag", s) for s in SYSTEMS if s != "bsharedrag"} | {
        ("bsharedrag_random_negatives", s) for s in SYSTEMS if not s.startswith("bsharedrag")}
    row = next(row for row in paired if (row["a"], row["b"]) == ("bsharedrag", "minilm"))
    again = compare_saved_rankings(tiny_run, "epqa", "bsharedrag", "minilm")
    assert all(row[k] == pytest.approx(again[k]) for k in ("n", "difference", "ci95_low", "ci95_high", "p_value"))
    assert (tiny_run / "06_evaluate" / "tables" / "paired_epqa.md").is_file()
    assert cli.main(["compare", str(tiny_run), "bsharedrag", "bm25", "--resamples", "500"]) == 0
    assert "epqa test ndcg@5 over" in capsys.readouterr().out
    assert cli.main(["compare", str(tiny_run), "bsharedrag", "colbert"]) == 2
    assert "no saved epqa ranking of 'colbert'" in capsys.readouterr().err
    tally("bad inputs tried")


def test_compare_takes_system_b_from_another_run_on_the_same_split_and_refuses_another_split(tiny_run, tmp_path,
                                                                                              capsys, tally):
    from bsharedrag import cli
    from bsharedrag.evaluation import compare_saved_rankings

    other = tmp_path / "other-run"  # another run's 06 on the same split: its rankings, its resolved config
    shutil.copytree(tiny_run / "06_evaluate" / "runs", other / "06_evaluate" / "runs")
    shutil.copy(tiny_run / "resolved.yaml", other / "resolved.yaml")
    within = compare_saved_rankings(tiny_run, "epqa", "bsharedrag", "bsharedrag_random_negatives", resamples=500)
    across = compare_saved_rankings(tiny_run, "epqa", "bsharedrag", "bsharedrag_random_negatives", resamples=500,
                                    run_dir_b=other)
    assert all(across[k] == pytest.approx(within[k]) for k in ("n", "mean_a", "mean_b", "difference", "p_value"))
    assert across["b"] == "bsharedrag_random_negatives (other-run)"
    assert cli.main(["compare", str(tiny_run), "bsharedrag", "bsharedrag", "--b-run", str(other),
                     "--resamples", "500"]) == 0
    assert "difference +0.000" in capsys.readouterr().out
    cfg = yaml.safe_load((other / "resolved.yaml").read_text())
    cfg["common"]["seed"] += 1  # another split of the same data
    (other / "resolved.yaml").write_text(yaml.safe_dump(cfg))
    assert cli.main(["compare", str(tiny_run), "bsharedrag", "bsharedrag", "--b-run", str(other)]) == 2
    err = capsys.readouterr().err
    assert "different epqa test questions" in err and "seed: 0 vs 1" in err
    tally("bad inputs tried")


def test_heldout_scores_the_runs_retrievers_on_every_question_it_never_trained_on(tiny_run, capsys, tally):
    from bsharedrag import cli
    from bsharedrag.data import load_dataset, load_sets
    from bsharedrag.evaluation import compare_saved_rankings
    from bsharedrag.heldout import evaluate_heldout, heldout_set

    common = yaml.safe_load((tiny_run / "resolved.yaml").read_text())["common"]
    ds, counts = heldout_set(common, "ecomeval")
    run_ds = load_sets(common, ["ecomeval"])["ecomeval"]
    seen = set(run_ds.queries.loc[run_ds.queries["split"] != "test", "qid"])
    full = load_dataset("ecomeval")
    held = set(ds.queries["qid"])
    assert held == set(full.queries["qid"]) - seen and set(run_ds.split("test")["qid"]) <= held
    assert counts == {"questions": len(held), "run_test": len(run_ds.split("test")),
                      "outside_subsample": len(full.queries) - len(run_ds.queries), "run_seen": len(seen)}
    assert len(ds.corpus) == len(full.corpus) > len(run_ds.corpus) and set(ds.queries["split"]) == {"test"}
    m = evaluate_heldout(tiny_run, "ecomeval", ["bsharedrag", "bm25"], "hit@3", resamples=200)
    assert m["retrieval"]["bm25"]["n_queries"] == m["paired"][0]["n"] > 5 * m["run_test"] > 0
    assert (m["paired"][0]["a"], m["paired"][0]["b"]) == ("bsharedrag", "bm25")
    assert m["paired"][0]["mean_a"] == pytest.approx(m["retrieval"]["bsharedrag"]["hit@3"])
    split = m["paired_by_origin"]  # the same questions, by whether the run's test split holds them
    assert split["run_test"][0]["n"] + split["outside_subsample"][0]["n"] == m["paired"][0]["n"]
    assert split["run_test"][0]["n"] <= m["run_test"] and set(ds.queries["origin"]) == {"run_test", "outside_subsample"}
    written = json.loads((tiny_run / "heldout" / "metrics_ecomeval.json").read_text())
    assert written["paired"] == m["paired"]
    again = compare_saved_rankings(tiny_run, "ecomeval", "bsharedrag", "bm25", "hit@3", resamples=200, heldout=True)
    assert again["split"] == "held-out" and all(again[k] == pytest.approx(m["paired"][0][k])
                                                for k in ("n", "mean_a", "mean_b", "difference", "p_value"))
    assert cli.main(["compare", str(tiny_run), "bsharedrag", "bm25", "--dataset", "ecomeval", "--heldout",
                     "--resamples", "200"]) == 0
    assert "ecomeval held-out ndcg@5 over" in capsys.readouterr().out
    assert all((tiny_run / "heldout" / "tables" / f"{t}_ecomeval.md").is_file() for t in ("retrieval", "paired"))
    assert cli.main(["heldout", str(tiny_run), "--dataset", "ecomeval", "--systems", "bm25"]) == 0
    assert "questions the run never trained or validated on" in capsys.readouterr().out
    assert cli.main(["heldout", str(tiny_run), "--systems", "colbert"]) == 2
    assert "'colbert'" in capsys.readouterr().err and not (tiny_run / "heldout" / "metrics_epqa.json").exists()
    tally("bad inputs tried")


def test_resume_skips_verified_steps_and_reruns_a_tampered_one(tiny_run, monkeypatch, capsys, tally):
    monkeypatch.setattr(paths, "OUTPUTS", tiny_run.parent)
    assert run.main(["--resume", tiny_run.name]) == 0
    out = capsys.readouterr().out
    assert "02_mine_negatives: complete and verified; skipped" in out
    assert "05_index: complete and verified; skipped" in out and "06_evaluate: complete and verified" in out
    # A changed input upstream (here a file of 02) reruns the steps after it, even when --only skips 02 itself.
    report = tiny_run / "02_mine_negatives" / "epqa_report.csv"
    report.write_text(report.read_text() + "\n")
    assert run.main(["--resume", tiny_run.name, "--only", "05"]) == 0
    out = capsys.readouterr().out
    assert "05_index: rerun (its input 02_mine_negatives/epqa_report.csv changed since it ran)" in out
    # A step's own file changed after it was written reruns that step (02 and 05 are the cheap ones to rerun).
    report.write_text("tampered")
    assert run.main(["--resume", tiny_run.name, "--only", "02"]) == 0
    out = capsys.readouterr().out
    assert "02_mine_negatives: rerun (epqa_report.csv changed since it was written)" in out
    assert report.read_text() != "tampered"
    # timings.json holds each step's latest execution; executions.jsonl keeps every one (a resumed 07 keeps its cost)
    executions = [json.loads(line) for line in (tiny_run / "executions.jsonl").read_text().splitlines()]
    reruns = [e for e in executions if e["resumed"]]
    assert [e["step"] for e in reruns][-2:] == ["05_index", "02_mine_negatives"]
    assert all(e["status"] == "done" for e in reruns) and len({e["step"] for e in executions}) >= 7
    timings = json.loads((tiny_run / "timings.json").read_text())
    assert timings["02_mine_negatives"] == reruns[-1]["seconds"]
    tally("runs resumed", 3)


def test_a_new_run_reuses_another_run_s_unchanged_steps_by_hard_link(tiny_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(paths, "OUTPUTS", tiny_run.parent)
    cfg = tmp_path / "reuse.yaml"
    cfg.write_text(yaml.safe_dump({"extends": str(paths.CONFIGS / "tiny.yaml"),
                                   "run": {"name": "reuse", "notebooks": ["02_mine_negatives", "03_retriever", "05_index"]},
                                   "05_index": {"systems": ["bm25"]}}))
    # Earlier tests tamper with the shared run's 02 (the resume test), which leaves its 03 stale; bring it up to date
    # so what follows tests reuse, not the order the tests ran in.
    assert run.main(["--resume", tiny_run.name, "--only", "02,03"]) == 0
    capsys.readouterr()
    marker = tiny_run / "03_retriever" / run.COMPLETE
    before = marker.read_text()
    assert run.main([str(cfg), "--reuse", "no-such-run"]) == 2
    assert "--reuse no-such-run: no run at" in capsys.readouterr().err
    assert run.main([str(cfg), "--reuse", tiny_run.name]) == 0
    out = capsys.readouterr().out
    (new,) = [p for p in tiny_run.parent.iterdir() if p.name.endswith("-reuse")]
    for step in ("02_mine_negatives", "03_retriever"):
        assert f"{step}: reused from {tiny_run.name}" in out and f"{step}: complete and verified; skipped" in out
    assert "05_index: not reused" in out and "(its parameters changed)" in out and "05_index: executing" in out
    adapter = "03_retriever/adapters/hard/adapter_model.safetensors"
    assert (new / adapter).stat().st_ino == (tiny_run / adapter).stat().st_ino  # linked, not copied
    assert (new / "05_index" / "indexes" / "epqa" / "bm25" / "manifest.json").is_file()
    assert not (new / "05_index" / "indexes" / "epqa" / "bsharedrag").exists()
    # the source run is untouched: its marker, and its files as the marker recorded them
    assert marker.read_text() == before
    recorded = json.loads(before)["files"]
    assert all(sha256_file(tiny_run / "03_retriever" / rel) == digest for rel, digest in recorded.items())


def test_a_parameter_added_later_at_its_old_value_keeps_steps_made_before_it_complete(tmp_path):
    step = tmp_path / "run" / "04_generator"
    step.mkdir(parents=True)
    (step / "adapter.bin").write_bytes(b"weights")
    before = {"train_batch_size": 4, "run_dir": "x"}  # the parameters of a run made before micro_batch_size existed
    run.mark_complete(step, before)
    assert run.is_complete(step, {**before, "micro_batch_size": 0}) == (True, "complete")
    assert run.is_complete(step, {**before, "micro_batch_size": 2}) == (False, "its parameters changed")
    assert run.is_complete(step.parent / "03_retriever", {**before, "micro_batch_size": 0})[0] is False


def test_reuse_copies_where_the_file_system_refuses_hard_links(tmp_path, monkeypatch):
    source = tmp_path / "source"
    (source / "sub").mkdir(parents=True)
    (source / "sub" / "a.bin").write_bytes(b"abc")
    monkeypatch.setattr(run.os, "link", lambda *a: (_ for _ in ()).throw(OSError(18, "Invalid cross-device link")))
    run._link_tree(source, tmp_path / "target")
    copied = tmp_path / "target" / "sub" / "a.bin"
    assert copied.read_bytes() == b"abc" and copied.stat().st_ino != (source / "sub" / "a.bin").stat().st_ino


def test_unknown_notebook_parameter_stops_before_any_run_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(paths, "OUTPUTS", tmp_path / "outputs")
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump({"extends": str(paths.CONFIGS / "tiny.yaml"), "06_evaluate": {"systems_x": [1]}}))
    assert run.main([str(cfg)]) == 2
    assert "unknown config key `06_evaluate.systems_x`" in capsys.readouterr().err
    assert not (tmp_path / "outputs").exists()


def test_a_failing_notebook_stops_the_chain_and_names_the_executed_copy(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(paths, "OUTPUTS", tmp_path)
    cfg = tmp_path / "broken.yaml"
    cfg.write_text(yaml.safe_dump({"extends": str(paths.CONFIGS / "tiny.yaml"),
                                   "run": {"notebooks": ["05_index", "06_evaluate"]},
                                   "common": {"datasets": ["ecomeval"]},
                                   "05_index": {"systems": ["bm25", "backbone_mean"], "index_factory": "NoSuchIndex"}}))
    assert run.main([str(cfg)]) == 1
    err = capsys.readouterr().err
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert f"the failing cell is marked in {run_dir / '05_index.ipynb'}" in err
    assert "NoSuchIndex" in err  # faiss refuses the factory string inside the notebook
    assert not (run_dir / "06_evaluate.ipynb").exists()
    (failed,) = [json.loads(line) for line in (run_dir / "executions.jsonl").read_text().splitlines()]
    assert failed["step"] == "05_index" and failed["status"] == "failed" and failed["seconds"] > 0


def _start(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bsharedrag.run", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def _kill_when(runner: subprocess.Popen, outputs, marker: str) -> None:
    """SIGKILL the runner and its kernel at once, as in a crash, as soon as `marker` exists in the run folder."""
    deadline = time.monotonic() + 600
    while not list(outputs.glob(f"*/{marker}")):
        assert runner.poll() is None, f"the run ended before {marker} appeared"
        assert time.monotonic() < deadline, f"{marker} never appeared"
        time.sleep(0.05)
    root = psutil.Process(runner.pid)
    for proc in [root] + root.children(recursive=True):
        proc.kill()
    runner.wait()


def test_sigkill_in_training_and_in_indexing_then_resume_ends_with_an_uninterrupted_runs_metrics(tiny_run, tmp_path,
                                                                                                  tally):
    outputs = tmp_path / "outputs"
    env = {**os.environ, "BSHAREDRAG_OUTPUTS": str(outputs)}
    # The retrieval chain only: 01 and 04 do not change retrieval at this scale (tiny uses the base backbone), and
    # the generator's own kill-and-resume test is in test_generator.py.
    config = tmp_path / "faults.yaml"
    config.write_text(yaml.safe_dump({"extends": str(paths.CONFIGS / "tiny.yaml"),
                                      "run": {"notebooks": ["02_mine_negatives", "03_retriever", "05_index",
                                                            "06_evaluate"]},
                                      "06_evaluate": {"generation_systems": []}}))
    # First fault: killed while training, after the retriever's first checkpoint.
    _kill_when(_start([str(config)], env), outputs, "03_retriever/checkpoints/hard/latest/state.pt")
    tally("faults injected")
    (run_dir,) = outputs.iterdir()
    # Second fault: the resumed run is killed again while it builds the indexes.
    _kill_when(_start(["--resume", run_dir.name], env), outputs, "05_index/indexes/epqa/bm25/manifest.json")
    tally("faults injected")
    tally("runs resumed")
    assert "resumed retriever training at step 3" in (run_dir / "03_retriever.ipynb").read_text()
    assert not (run_dir / "06_evaluate" / "metrics.json").exists()
    resumed = subprocess.run([sys.executable, "-m", "bsharedrag.run", "--resume", run_dir.name], env=env,
                             capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    tally("runs resumed")
    for step in ("02_mine_negatives", "03_retriever"):
        assert f"{step}: complete and verified; skipped" in resumed.stdout
    for name in ("03_retriever/adapters/hard/adapter_model.safetensors", "05_index/indexes/epqa/bsharedrag/index.faiss"):
        assert (run_dir / name).is_file()
    want = json.loads((tiny_run / "06_evaluate" / "metrics.json").read_text())
    got = json.loads((run_dir / "06_evaluate" / "metrics.json").read_text())
    for dataset, by_system in want["retrieval"].items():
        for system, values in by_system.items():
            assert got["retrieval"][dataset][system] == pytest.approx(values, rel=1e-5), (dataset, system)
            tally("artefacts compared")
