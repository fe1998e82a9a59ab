"""Atomic artefact writes, content hashes and the per-step `record()` of metrics."""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write to a temporary name beside `path` and rename, so readers see the old or the new file, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True) + "\n")


def atomic_write_jsonl(path: str | Path, rows: Any) -> Path:
    """One JSON object a line (mined groups, training examples, answers, 07's rows), all written or none."""
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: str | Path) -> list:
    """The rows of a JSON-lines file this package wrote; blank lines are skipped. A line that does not parse names
    the file and the line, so an edited or damaged artefact is not mistaken for a bug."""
    rows = []
    for line_no, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{line_no}: not a JSON line ({err.msg}); the file was edited or damaged: "
                             "restore it, or delete it and rerun the step that wrote it") from None
    return rows


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_texts(items: list[str]) -> str:
    """Order-sensitive hash of a list of strings (doc ids and texts of a corpus, say)."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(item.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hash of a JSON-serialisable object (training groups, examples), independent of key order."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8")).hexdigest()


CHECKPOINT_FINGERPRINT = "fingerprint.json"
RESUME_NEUTRAL = ("save_every",)  # settings that change when a checkpoint is written, not what training computes


# Metadata key of a settings field added after checkpoints existed, whose default computes what training computed
# before it: at its default the field is left out of the fingerprint, so those checkpoints still resume.
ADDED_LATER_FIELD = "added_later"


def training_fingerprint(settings: Any, data: str, **identity: str) -> dict:
    """What a training checkpoint must match to be resumed: the settings dataclass, a hash of the training data, and
    the identity of what is trained (backbone=..., tokenizer=...)."""
    left_out = set(RESUME_NEUTRAL) | set(getattr(settings, "inert", ()))  # `inert`: what its method ignores
    left_out |= {f.name for f in dataclasses.fields(settings)
                 if f.metadata.get(ADDED_LATER_FIELD) and getattr(settings, f.name) == f.default}
    kept = {k: v for k, v in dataclasses.asdict(settings).items() if k not in left_out}
    return json.loads(json.dumps({"settings": kept, "data": data, **identity}, sort_keys=True, default=str))


def _differences(saved: dict, now: dict) -> list[str]:
    names = [f"settings.{k}" for k in sorted(set(saved.get("settings", {})) | set(now["settings"]))
             if saved.get("settings", {}).get(k) != now["settings"].get(k)]
    return names + [k for k in sorted(set(saved) | set(now)) if k != "settings" and saved.get(k) != now.get(k)]


def resumable_checkpoint(folder: str | Path, fingerprint: dict, say: Callable[[str], None] = print) -> bool:
    """True when `folder` holds a checkpoint saved with `fingerprint`; one saved with anything else (or with no
    fingerprint) is moved aside to `<folder>.stale`, with one line saying why training starts fresh."""
    folder = Path(folder)
    if not folder.is_dir() or not any(folder.iterdir()):
        return False
    try:
        saved = json.loads((folder / CHECKPOINT_FINGERPRINT).read_text())
    except (OSError, ValueError):
        saved = None
    if saved == fingerprint:
        return True
    why = "records no fingerprint" if not isinstance(saved, dict) else \
        f"was made with another {', '.join(_differences(saved, fingerprint))}"
    stale = folder.with_name(f"{folder.name}.stale")
    shutil.rmtree(stale, ignore_errors=True)
    os.replace(folder, stale)
    say(f"starting fresh: the checkpoint at {folder} {why}; moved it to {stale}")
    return False


def record(metrics: dict, step_dir: str | Path) -> dict:
    """Write `step_dir/metrics.json` atomically and return the metrics so a notebook cell shows them."""
    atomic_write_json(Path(step_dir) / "metrics.json", metrics)
    return metrics


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def _recover(target: Path) -> None:
    """Undo what a kill inside an earlier atomic_dir of `target` left: restore its `.old`, sweep dead stagings."""
    old = target.with_name(f".{target.name}.old")
    if old.is_dir():
        if target.exists():  # killed after the swap, before the clean-up: the old copy is garbage
            shutil.rmtree(old, ignore_errors=True)
        else:  # killed between the two renames: the old copy is the last complete one
            os.replace(old, target)
    prefix = f".{target.name}."
    for entry in target.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        middle = entry.name[len(prefix):-len(".tmp")]
        if not entry.is_dir() or "." in middle:  # a file (atomic_write_*), or the staging of another target
            continue
        pid = middle.split("-", 1)[0]
        if not (pid.isdigit() and _pid_alive(int(pid))):  # its writer is gone; a live writer keeps its folder
            shutil.rmtree(entry, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a staging folder beside `target`; on success it replaces `target` whole, on failure it is removed.

    Entering first repairs what a kill (SIGKILL, power loss) inside an earlier call left: a missing `target` is
    restored from its `.old` copy, and staging folders whose writer process is gone are removed.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _recover(target)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.{os.getpid()}-", suffix=".tmp"))
    try:
        yield staging
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
