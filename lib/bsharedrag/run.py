"""The runner: resolve a config, open outputs/<run_id>/, execute the numbered notebooks with papermill in order.

    python -m bsharedrag.run configs/demo.yaml [--only 05,06]
    python -m bsharedrag.run --resume RUN_ID [--only 06]
    python -m bsharedrag.run configs/ablations.yaml --reuse RUN_ID   # a new run on another run's unchanged steps
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import papermill
import yaml

from . import paths
from .artefacts import atomic_write_json, atomic_write_text, sha256_file
from .config import ConfigError, identifying, load_config, notebook_parameters
from .progress import BATCH_ENV
from .steps import new_run_id, versions

COMPLETE = ".complete.json"  # written by the runner into a step folder once its notebook ran through


def available_notebooks() -> dict[str, Path]:
    return {p.stem: p for p in sorted(paths.NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))}


def declared_parameters(notebook: Path) -> set[str]:
    return set(papermill.inspect_notebook(str(notebook)))


def plan(cfg: dict, only: list[str] | None) -> list[tuple[str, Path]]:
    """The notebooks to run, in order: those the config lists that exist here, filtered by --only prefixes."""
    have = available_notebooks()
    wanted = cfg["run"]["notebooks"]
    chosen = [(stem, have[stem]) for stem in have if stem in wanted]
    if only:
        bad = [o for o in only if not any(stem.startswith(o) for stem, _ in chosen)]
        if bad:
            raise ConfigError(f"--only {','.join(bad)} names no notebook of this run; have: {', '.join(s for s, _ in chosen)}")
        chosen = [(stem, nb) for stem, nb in chosen if any(stem.startswith(o) for o in only)]
    return chosen


def _params_hash(step: str, params: dict) -> str:
    return hashlib.sha256(json.dumps(identifying(step, params), sort_keys=True, default=str).encode()).hexdigest()[:16]


def _digests(folder: Path, prefix: str = "") -> dict[str, str]:
    return {prefix + str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != COMPLETE and not p.name.startswith(".")}


def _upstream(step_dir: Path) -> dict[str, str]:
    """The files of the run's earlier steps (by number), which this step may have read."""
    out: dict[str, str] = {}
    for folder in sorted(step_dir.parent.glob("[0-9][0-9]_*")):
        if folder.is_dir() and folder.name[:2] < step_dir.name[:2]:
            out.update(_digests(folder, f"{folder.name}/"))
    return out


def mark_complete(step_dir: Path, params: dict) -> None:
    """Record the sha256 of every file the step wrote and of every earlier step's file it may have read, so that a
    resume verifies the step rather than trusting that its files exist."""
    atomic_write_json(step_dir / COMPLETE, {"params": _params_hash(step_dir.name, params),
                                            "files": _digests(step_dir), "upstream": _upstream(step_dir)})


def is_complete(step_dir: Path, params: dict) -> tuple[bool, str]:
    """Whether the step's artefacts are all there and unchanged, and its inputs too; if not, why."""
    marker = step_dir / COMPLETE
    if not marker.is_file():
        return False, "never finished"
    record = json.loads(marker.read_text())
    if record.get("params") != _params_hash(step_dir.name, params):
        return False, "its parameters changed"
    for rel, digest in record["files"].items():
        path = step_dir / rel
        if not path.is_file():
            return False, f"{rel} is missing"
        if sha256_file(path) != digest:
            return False, f"{rel} changed since it was written"
    now = _upstream(step_dir)
    for rel, digest in record.get("upstream", {}).items():
        if now.get(rel) != digest:
            return False, f"its input {rel} changed since it ran"
    return True, "complete"


def write_env(run_dir: Path) -> None:
    from .devices import machine_facts, matmul_now  # torch only when a run starts, not for --dry-run's imports

    freeze = subprocess.run([sys.executable, "-m", "pip", "freeze"], capture_output=True, text=True).stdout
    lines = [f"{k}: {v}" for k, v in versions().items()]
    lines += [f"platform: {platform.platform()}", f"processor: {platform.processor()}", f"cpus: {os.cpu_count()}"]
    lines += [f"{k}: {v}" for k, v in machine_facts().items()] + [f"matmul at start: {matmul_now()}"]
    lines += ["", "# pip freeze", freeze]
    atomic_write_text(run_dir / "env.txt", "\n".join(lines))


def check_kernel(name: str) -> None:
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec(name)
    except NoSuchKernel:
        raise ConfigError(
            f"Jupyter kernel {name!r} is not installed; run `make setup` (or "
            f"`python -m ipykernel install --sys-prefix --name {name}`)"
        ) from None


def prepare(cfg: dict, run_dir: Path, only: list[str] | None = None) -> tuple[list[tuple[str, Path]], dict]:
    """Plan the notebooks and check every one's parameters and the kernel before any work starts."""
    steps = plan(cfg, only)
    params = {stem: notebook_parameters(cfg, stem, declared_parameters(nb), str(run_dir)) for stem, nb in steps}
    check_kernel(cfg["run"]["kernel"])
    return steps, params


def log_execution(run_dir: Path, stem: str, status: str, started: float, resumed: bool) -> float:
    """Append one execution of step `stem` to the run's executions.jsonl; returns its seconds."""
    # timings.json keeps each step's latest execution; this log keeps every one, so a step resumed after a failure or
    # a stop (07 reuses its finished rows) still shows what its earlier executions cost.
    seconds = round(time.perf_counter() - started, 1)
    line = {"step": stem, "status": status, "seconds": seconds, "resumed": resumed,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with open(run_dir / "executions.jsonl", "a", encoding="utf-8") as log:
        log.write(json.dumps(line) + "\n")
    return seconds


def _link_tree(source: Path, target: Path) -> None:
    # Hard links: the continually pre-trained backbone alone is a gigabyte. Safe because every artefact is written to a
    # staging name and renamed (artefacts.atomic_write_*, the staging folders), never rewritten in place.
    shutil.copytree(source, target, copy_function=_link_or_copy, dirs_exist_ok=True)


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # a file system without hard links (some network and FAT mounts): a copy costs space, not results
        shutil.copy2(source, target)


def reuse_steps(source: Path, run_dir: Path, steps: list[tuple[str, Path]], params: dict) -> list[str]:
    """Link into the new `run_dir` the leading steps of `source` that are complete and verified there and whose
    parameters equal this run's (run_dir aside), plus the run's caches; the first step that differs ends the reuse,
    since every later step may have read it. Returns the steps reused."""
    reused = []
    for stem, _ in steps:
        done, why = is_complete(source / stem, {**params[stem], "run_dir": str(source)})
        if not done:
            print(f"[run] {stem}: not reused from {source.name} ({why}); it and the steps after it run here", flush=True)
            break
        _link_tree(source / stem, run_dir / stem)
        mark_complete(run_dir / stem, params[stem])
        reused.append(stem)
        print(f"[run] {stem}: reused from {source.name} (hard links, verified)", flush=True)
    if reused and (source / "cache").is_dir():  # encoded passage shards and document LoRAs, keyed by what made them
        _link_tree(source / "cache", run_dir / "cache")
    return reused


def execute(cfg: dict, run_dir: Path, only: list[str] | None = None, resume: bool = False) -> int:
    """Run the planned notebooks; stop at the first failure and print the executed notebook's path."""
    steps, params = prepare(cfg, run_dir, only)
    for name in cfg["run"]["notebooks"]:
        if name not in available_notebooks():
            print(f"[run] {name}: not in this repository yet; skipped", flush=True)
    os.environ[BATCH_ENV] = "1"
    timings_path = run_dir / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    for stem, notebook in steps:
        step_dir = run_dir / stem
        if resume:  # after a rerun step, the next ones rerun if any file they may have read came out different
            done, why = is_complete(step_dir, params[stem])
            if done:
                print(f"[run] {stem}: complete and verified; skipped", flush=True)
                continue
            print(f"[run] {stem}: rerun ({why})", flush=True)
        step_dir.mkdir(parents=True, exist_ok=True)
        (step_dir / COMPLETE).unlink(missing_ok=True)
        executed = run_dir / f"{stem}.ipynb"
        print(f"[run] {stem}: executing -> {executed}", flush=True)
        started = time.perf_counter()
        try:
            papermill.execute_notebook(
                str(notebook), str(executed), parameters=params[stem], kernel_name=cfg["run"]["kernel"],
                cwd=str(paths.NOTEBOOKS), log_output=True, progress_bar=False,
                execution_timeout=cfg["run"]["timeout_s"],
            )
        except Exception as exc:  # papermill raises its own error for a failing cell; anything else stops too
            log_execution(run_dir, stem, "failed", started, resume)
            print(f"[run] {stem} FAILED: {type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}",
                  file=sys.stderr, flush=True)
            print(f"[run] the failing cell is marked in {executed}", file=sys.stderr, flush=True)
            print(f"[run] fix it, then: python -m bsharedrag.run --resume {run_dir.name}", file=sys.stderr, flush=True)
            return 1
        mark_complete(step_dir, params[stem])
        timings[stem] = log_execution(run_dir, stem, "done", started, resume)
        atomic_write_json(run_dir / "timings.json", timings)
        print(f"[run] {stem}: done in {timings[stem]:.0f}s", flush=True)
    print(f"[run] done: {run_dir} ({sum(timings.values()):.0f}s of notebook time in this run)", flush=True)
    return 0


def start_run(config: str | Path, only: list[str] | None = None) -> tuple[dict, Path]:
    """Resolve and check `config`, then create a new run folder with resolved.yaml and env.txt (never reused)."""
    cfg = load_config(config)
    run_dir = paths.OUTPUTS / new_run_id(cfg["run"]["name"])
    prepare(cfg, run_dir, only)
    run_dir.mkdir(parents=True, exist_ok=False)
    atomic_write_text(run_dir / "resolved.yaml", yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
    write_env(run_dir)
    return cfg, run_dir


def dry_run(config: str | Path, only: list[str] | None = None) -> int:
    """Everything a run checks before it starts (config, notebooks, their parameters, kernel), and the plan; no folder
    is created and nothing is executed."""
    cfg = load_config(config)
    run_dir = paths.OUTPUTS / new_run_id(cfg["run"]["name"])
    steps, params = prepare(cfg, run_dir, only)
    print(f"[dry-run] {config}: resolved and checked; backbone {cfg['common']['backbone']}, "
          f"data sets {cfg['common']['datasets']}, compute dtype {cfg['common']['compute_dtype']}")
    for stem, _ in steps:
        shown = {k: v for k, v in params[stem].items() if k != "run_dir"}
        print(f"[dry-run] {stem}: {json.dumps(shown, ensure_ascii=False, default=str)}")
    print(f"[dry-run] would write to {run_dir}; nothing was run")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bsharedrag.run", description=__doc__.split("\n")[0])
    parser.add_argument("config", nargs="?", help="a YAML under configs/ (extends base.yaml)")
    parser.add_argument("--only", help="comma-separated notebook prefixes to run, e.g. 05,06")
    parser.add_argument("--resume", metavar="RUN_ID", help="continue outputs/RUN_ID: skip verified steps")
    parser.add_argument("--reuse", metavar="RUN_ID",
                        help="with a config: start the new run on outputs/RUN_ID's verified steps whose parameters "
                             "are unchanged (hard links), e.g. make ablations after make demo")
    parser.add_argument("--dry-run", action="store_true",
                        help="resolve and check the config, plan the notebooks and their parameters; run nothing")
    args = parser.parse_args(argv)
    only = [o.strip() for o in args.only.split(",") if o.strip()] if args.only else None
    try:
        if args.resume:
            run_dir = paths.OUTPUTS / args.resume
            if not (run_dir / "resolved.yaml").is_file():
                raise ConfigError(f"no run to resume at {run_dir} (resolved.yaml missing); runs: ls {paths.OUTPUTS}")
            if args.config:
                print("[run] --resume uses the run's own resolved.yaml; the config argument is ignored", flush=True)
            cfg = load_config(run_dir / "resolved.yaml")
            return execute(cfg, run_dir, only, resume=True)
        if not args.config:
            parser.error("give a config (e.g. configs/demo.yaml) or --resume RUN_ID")
        if args.dry_run:
            return dry_run(args.config, only)
        if args.reuse and only:
            parser.error("--reuse takes every step of the plan (it reuses what it can); leave out --only")
        source = paths.OUTPUTS / args.reuse if args.reuse else None
        if source and not (source / "resolved.yaml").is_file():
            raise ConfigError(f"--reuse {args.reuse}: no run at {source} (resolved.yaml missing); runs: ls {paths.OUTPUTS}")
        cfg, run_dir = start_run(args.config, only)
        print(f"[run] run folder: {run_dir}", flush=True)
        if source:
            steps, params = prepare(cfg, run_dir)
            reuse_steps(source, run_dir, steps, params)
        return execute(cfg, run_dir, only, resume=bool(args.reuse))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
