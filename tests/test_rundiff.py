import json

import pytest

from bsharedrag.cli import main
from bsharedrag.rundiff import diff_runs, quality_fields


def make_run(root, name, ndcg, bertscore, seconds, extra_row=False):
    run = root / name
    (run / "06_evaluate").mkdir(parents=True)
    (run / "07_ablations").mkdir()
    (run / "resolved.yaml").write_text("run: {name: demo}\n")
    (run / "06_evaluate" / "metrics.json").write_text(json.dumps({
        "retrieval": {"epqa": {"bsharedrag": {"ndcg@5": ndcg, "seconds": seconds}}},
        "efficiency": {"shared": {"peak_rss_mb": seconds * 10, "load_seconds": seconds}},
        "losses": [1.5, 0.7], "saved_to": str(run)}))
    rows = [{"variant": "bsharedrag", "dataset": "epqa", "seed": 0, "bertscore_f1": bertscore,
             "seconds_per_question": seconds, "inference_memory_mb": 500 + seconds}]
    if extra_row:
        rows.append({"variant": "closed_book", "dataset": "epqa", "seed": 0, "bertscore_f1": 0.5})
    (run / "07_ablations" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_times_memory_and_paths_are_left_out(tmp_path):
    fields = quality_fields(make_run(tmp_path, "a", 0.7, 0.9, 3.0))
    assert fields == {"06_evaluate/metrics.json/retrieval/epqa/bsharedrag/ndcg@5": 0.7,
                      "06_evaluate/metrics.json/losses/[0]": 1.5, "06_evaluate/metrics.json/losses/[1]": 0.7,
                      "07_ablations/results.jsonl/bsharedrag/epqa/seed 0/variant": "bsharedrag",
                      "07_ablations/results.jsonl/bsharedrag/epqa/seed 0/dataset": "epqa",
                      "07_ablations/results.jsonl/bsharedrag/epqa/seed 0/seed": 0,
                      "07_ablations/results.jsonl/bsharedrag/epqa/seed 0/bertscore_f1": 0.9}


def test_a_rerun_on_a_slower_machine_agrees(tmp_path, capsys):
    a = make_run(tmp_path, "a", 0.7, 0.9, 3.0)
    b = make_run(tmp_path, "b", 0.7, 0.9, 5.0)
    d = diff_runs(a, b)
    assert d.agree and d.same == 7 and d.close == 0
    assert main(["diff", str(a), str(b)]) == 0
    assert "7 quality fields in both runs: 7 equal, 0 within 0, 0 different" in capsys.readouterr().out


def test_tolerance_separates_float_noise_from_a_change(tmp_path, capsys):
    a = make_run(tmp_path, "a", 0.7, 0.9, 3.0)
    b = make_run(tmp_path, "b", 0.7, 0.9 + 4e-9, 3.0, extra_row=True)
    d = diff_runs(a, b)
    assert not d.agree and [k for k, *_ in d.different] == ["07_ablations/results.jsonl/bsharedrag/epqa/seed 0/bertscore_f1"]
    assert d.only_b and all(k.startswith("07_ablations/results.jsonl/closed_book/") for k in d.only_b)
    d = diff_runs(a, b, tolerance=1e-8)
    assert d.close == 1 and not d.different and d.largest_close == pytest.approx(4e-9)
    assert main(["diff", str(a), str(b), "--tolerance", "1e-8"]) == 1  # the extra row still differs
    out = capsys.readouterr().out
    assert "1 within 1e-08" in out and "only in the second run: 07_ablations/results.jsonl/closed_book" in out
    c = make_run(tmp_path, "c", 0.6, 0.9, 3.0)
    assert [(k.rsplit("/", 1)[1], x, y) for k, x, y in diff_runs(a, c, tolerance=1e-8).different] == \
        [("ndcg@5", 0.7, 0.6)]


def test_bad_input_is_named(tmp_path, capsys):
    a = make_run(tmp_path, "a", 0.7, 0.9, 3.0)
    with pytest.raises(ValueError, match="tolerance -1"):
        diff_runs(a, a, tolerance=-1)
    assert main(["diff", str(a), str(tmp_path / "nowhere")]) == 2
    assert "is not a run folder" in capsys.readouterr().err
    (a / "07_ablations" / "results.jsonl").write_text('{"dataset": "epqa"}\n')
    with pytest.raises(ValueError, match="row 1 has no 'variant'"):
        quality_fields(a)
