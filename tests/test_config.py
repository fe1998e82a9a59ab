import pytest
import yaml

from bsharedrag import paths
from bsharedrag.config import ConfigError, deep_merge, load_config, notebook_parameters


def write(tmp_path, name, body):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(body))
    return path


def test_deep_merge_merges_dicts_and_replaces_lists():
    merged = deep_merge({"a": {"x": 1, "y": [1, 2]}, "b": 1}, {"a": {"y": [3]}, "c": 2})
    assert merged == {"a": {"x": 1, "y": [3]}, "b": 1, "c": 2}


def test_layers_resolve_base_then_scale_then_experiment(tmp_path):
    exp = write(tmp_path, "exp.yaml", {"extends": str(paths.CONFIGS / "tiny.yaml"), "common": {"seed": 3}})
    cfg = load_config(exp)
    assert cfg["common"]["seed"] == 3  # experiment
    assert cfg["common"]["backbone"] == "tiny-random-gemma3"  # scale
    assert cfg["05_index"]["index_factory"] == "Flat"  # base


def test_unknown_key_is_refused_with_the_closest_name(tmp_path, tally):
    tally("bad inputs tried")
    path = write(tmp_path, "bad.yaml", {"extends": str(paths.CONFIGS / "base.yaml"), "common": {"max_lenght": 3}})
    with pytest.raises(ConfigError, match=r"common\.max_lenght.*did you mean `max_length`"):
        load_config(path)


@pytest.mark.parametrize("override, message", [
    ({"common": {"max_length": "long"}}, "declares it as int"),
    ({"common": {"split_fractions": [0.5, 0.5, 0.5]}}, "summing to 1"),
    ({"common": {"compute_dtype": "fp8"}}, "compute_dtype"),
    ({"run": {"timeout_s": 0}}, "timeout_s"),
    ({"05_index": {"systems": "bm25"}}, "declares it as list"),
    ({"03_retriever": {"pooling": "meen"}}, "did you mean `mean`"),
    ({"05_index": {"systems": ["bm25", "splade"]}}, "names 'splade'"),
    ({"07_ablations": {"variants": ["fully_shard"]}}, "did you mean `fully_shared`"),
    ({"07_ablations": {"lambdas": [0.5, 1.5]}}, "between 0 and 1"),
    ({"03_retriever": {"learning_rate": 0}}, "must be > 0"),
    ({"04_generator": {"train_batch_size": 4, "micro_batch_size": 3}}, r"micro_batch_size` = 3 must divide .*1, 2, 4"),
])
def test_bad_values_are_refused_before_any_work(override, message, tally):
    tally("bad inputs tried")
    with pytest.raises(ConfigError, match=message):
        load_config("tiny.yaml", overrides=override)


def test_extends_loop_is_reported(tmp_path, tally):
    tally("bad inputs tried")
    write(tmp_path, "a.yaml", {"extends": "b.yaml"})
    write(tmp_path, "b.yaml", {"extends": "a.yaml"})
    with pytest.raises(ConfigError, match="loop"):
        load_config(tmp_path / "a.yaml")


def test_notebook_parameter_unknown_to_the_notebook_names_notebook_and_closest(tally):
    tally("bad inputs tried")
    cfg = load_config("tiny.yaml")
    declared = {"seed", "systems"} | set(cfg["06_evaluate"])
    cfg["06_evaluate"]["retrieval_dept"] = 5
    with pytest.raises(ConfigError, match=r"`retrieval_dept` in 06_evaluate; did you mean `retrieval_depth`"):
        notebook_parameters(cfg, "06_evaluate", declared, "/tmp/run")


def test_notebook_gets_only_the_common_keys_it_declares():
    cfg = load_config("tiny.yaml")
    params = notebook_parameters(cfg, "06_evaluate", {"seed", "systems"} | set(cfg["06_evaluate"]), "/tmp/run")
    assert params["run_dir"] == "/tmp/run" and params["seed"] == 0 and "backbone" not in params


@pytest.mark.parametrize("name", ["paper.yaml", "paper_80gb.yaml"])
def test_paper_config_resolves_and_dry_runs_on_cpu(name, tmp_path, monkeypatch, capsys):
    from bsharedrag import paths, run

    monkeypatch.setattr(paths, "OUTPUTS", tmp_path)
    assert run.main([str(paths.CONFIGS / name), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "backbone Qwen/Qwen2.5-7B" in out and "nothing was run" in out
    for step in ("01_pretrain", "03_retriever", "04_generator", "06_evaluate"):
        assert f"[dry-run] {step}: " in out
    assert list(tmp_path.iterdir()) == []  # no run folder, no weights loaded


def test_the_80gb_config_changes_only_how_the_batches_pass_through_memory():
    paper, small = load_config("paper.yaml"), load_config("paper_80gb.yaml")
    assert (small["03_retriever"]["chunk_size"], small["04_generator"]["micro_batch_size"]) == (32, 4)
    for cfg in (paper, small):  # exact settings: what differs is not a result parameter
        cfg["run"].pop("name"), cfg["03_retriever"].pop("chunk_size"), cfg["04_generator"].pop("micro_batch_size")
    assert small == paper
