"""Atomic folders survive a kill at any point: what a killed write left on disk is repaired by the next one; a
damaged JSON-lines artefact is named, line and all."""

import os

import pytest

from bsharedrag.artefacts import atomic_dir, atomic_write_jsonl, read_jsonl


def _folder(path, text):
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(text)
    return path


def test_a_kill_between_the_two_renames_leaves_the_old_copy_restored(tmp_path, tally):
    target = tmp_path / "idx"
    _folder(tmp_path / ".idx.old", "old")  # target renamed away, the new one not yet renamed in: then SIGKILL
    # its writer's pid is beyond any pid_max, so surely dead (a small pid such as 4242 can be a live kernel thread)
    _folder(tmp_path / ".idx.999999998-x1y2.tmp", "new, maybe half")
    tally("faults injected")
    with pytest.raises(RuntimeError), atomic_dir(target):
        raise RuntimeError("this write fails too")
    assert (target / "manifest.json").read_text() == "old"
    assert not (tmp_path / ".idx.old").exists()
    with atomic_dir(target) as staging:
        (staging / "manifest.json").write_text("new")
    assert (target / "manifest.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]
    tally("artefacts compared")


def test_a_kill_after_the_swap_leaves_no_old_copy_behind(tmp_path, tally):
    target = _folder(tmp_path / "idx", "new")
    _folder(tmp_path / ".idx.old", "old")
    tally("faults injected")
    with atomic_dir(target) as staging:
        (staging / "manifest.json").write_text("newer")
    assert (target / "manifest.json").read_text() == "newer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


def test_staging_folders_of_dead_writers_are_swept_and_others_kept(tmp_path, tally):
    target = _folder(tmp_path / "idx", "v1")
    dead = [_folder(tmp_path / ".idx.999999999-abc.tmp", "x"),  # pid beyond any pid_max: its writer is gone
            _folder(tmp_path / ".idx.k3j_9q2z.tmp", "x")]  # the name before writers were recorded
    live = _folder(tmp_path / f".idx.{os.getpid()}-live.tmp", "x")  # a writer of this target still at work
    other = _folder(tmp_path / ".idx.b.999999999-abc.tmp", "x")  # staging of the target `idx.b`, not ours
    tmp_file = tmp_path / ".idx.zz.tmp"
    tmp_file.write_text("x")  # a temporary file of atomic_write_bytes, not a staging folder
    tally("faults injected", len(dead))
    with atomic_dir(target) as staging:
        (staging / "manifest.json").write_text("v2")
    assert not any(p.exists() for p in dead)
    assert live.is_dir() and other.is_dir() and tmp_file.is_file()
    assert (target / "manifest.json").read_text() == "v2"


def test_json_lines_round_trip_and_a_damaged_line_is_named_with_the_fix(tmp_path, tally):
    rows = [{"qid": "q1", "answer": "两年保修"}, {"qid": "q2", "answer": "yes"}]
    path = atomic_write_jsonl(tmp_path / "rows.jsonl", rows)
    assert read_jsonl(path) == rows
    path.write_text(path.read_text(encoding="utf-8") + "\n" + '{"qid": "q3", "ans', encoding="utf-8")
    tally("bad inputs tried")
    with pytest.raises(ValueError, match=r"rows.jsonl:4: not a JSON line .*rerun the step that wrote it"):
        read_jsonl(path)
