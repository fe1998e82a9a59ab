"""The repository's shape: what must be tracked, stripped and consistent for a fresh clone to work."""

import ast
import json
import subprocess

import papermill
import yaml

from bsharedrag import paths


def test_library_is_tracked_and_not_ignored():
    tracked = subprocess.run(["git", "ls-files", "lib/bsharedrag/__init__.py"], cwd=paths.REPO_ROOT,
                             capture_output=True, text=True).stdout.strip()
    ignored = subprocess.run(["git", "check-ignore", "-q", "lib/bsharedrag/__init__.py"], cwd=paths.REPO_ROOT)
    assert tracked == "lib/bsharedrag/__init__.py"
    assert ignored.returncode == 1


def test_notebooks_are_stripped():
    for nb in paths.NOTEBOOKS.glob("*.ipynb"):
        cells = json.loads(nb.read_text())["cells"]
        assert not any(c.get("outputs") or c.get("execution_count") for c in cells if c["cell_type"] == "code"), nb


def test_notebook_defaults_equal_base_config():
    """A notebook opened by hand in JupyterLab behaves like a run of base.yaml."""
    base = yaml.safe_load((paths.CONFIGS / "base.yaml").read_text())
    for nb in sorted(paths.NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")):
        declared = papermill.inspect_notebook(str(nb))
        expected = {**base["common"], **(base.get(nb.stem) or {})}
        for name, spec in declared.items():
            if name == "run_dir":
                continue
            assert name in expected, f"{nb.stem} declares `{name}`, which configs/base.yaml does not list"
            assert ast.literal_eval(spec["default"]) == expected[name], f"{nb.stem}.{name} default differs from base.yaml"
        for name in base.get(nb.stem) or {}:
            assert name in declared, f"base.yaml sets `{nb.stem}.{name}`, which the notebook does not declare"


def test_data_files_are_not_committed():
    tracked = subprocess.run(["git", "ls-files"], cwd=paths.REPO_ROOT, capture_output=True, text=True).stdout.split()
    assert not [t for t in tracked if t.startswith("data/raw/") or t.endswith((".csv", ".safetensors", ".gguf"))]


def test_versions_and_run_ids_mark_a_tree_that_differs_from_its_commit(tmp_path, monkeypatch):
    from bsharedrag import steps

    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run(git + ["init", "-q"], check=True)
    (tmp_path / "a.py").write_text("x = 1\n")
    subprocess.run(git + ["add", "a.py"], check=True)
    subprocess.run(git + ["commit", "-qm", "a"], check=True)
    monkeypatch.setattr(paths, "REPO_ROOT", tmp_path)
    sha = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    (tmp_path / "new.txt").write_text("untracked files do not count\n")
    assert steps.versions()["git"] == sha
    assert steps.new_run_id("demo").endswith(f"-{sha}-demo")
    (tmp_path / "a.py").write_text("x = 2\n")
    assert steps.versions()["git"] == f"{sha}-dirty"
    assert steps.new_run_id("demo").endswith(f"-{sha}-dirty-demo")  # a run id never claims a commit it did not run
