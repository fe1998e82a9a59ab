"""Layered YAML configs: base <- scale <- experiment, deep-merged and validated before any work starts."""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any

import yaml

from . import paths

BASE = "base.yaml"
EXTENDS = "extends"


class ConfigError(ValueError):
    """A config that cannot run: unknown key, wrong type, value out of range, or a missing file."""


def deep_merge(base: dict, override: dict) -> dict:
    """Dicts merge key by key; lists and scalars in `override` replace those in `base`."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; configs live in {paths.CONFIGS}")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level, not {type(data).__name__}")
    return data


def _layers(path: Path, seen: tuple[Path, ...] = ()) -> list[dict]:
    """The chain of files from base.yaml to `path`, each resolved relative to the file that extends it."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config files extend each other in a loop: {' -> '.join(str(p) for p in seen + (path,))}")
    data = _read(path)
    parent = data.pop(EXTENDS, None)
    if parent is None:
        return [data]
    return _layers((path.parent / parent), seen + (path,)) + [data]


def closest(name: str, known: list[str] | tuple[str, ...] | set[str]) -> str:
    """' did you mean `x`?' when a known name is close to `name`, else ''."""
    match = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.5)
    return f"; did you mean `{match[0]}`?" if match else ""


def _check_against(value: Any, reference: Any, where: str) -> None:
    """Every key must exist in base.yaml and keep its type (None in base.yaml admits anything)."""
    if isinstance(reference, dict):
        if not isinstance(value, dict):
            raise ConfigError(f"`{where}` must be a mapping, got {value!r}")
        for key, sub in value.items():
            if key not in reference:
                raise ConfigError(
                    f"unknown config key `{where + '.' if where else ''}{key}`{closest(str(key), list(reference))} "
                    f"(every known key is listed, with a comment, in configs/{BASE})"
                )
            _check_against(sub, reference[key], f"{where}.{key}" if where else str(key))
        return
    if reference is None or value is None:
        return
    ok_types: tuple[type, ...] = (type(reference),)
    if isinstance(reference, float):
        ok_types = (float, int)
    if isinstance(value, bool) and not isinstance(reference, bool):
        ok_types = ()
    if not isinstance(value, ok_types):
        raise ConfigError(
            f"`{where}` = {value!r} is a {type(value).__name__}, but configs/{BASE} declares it as "
            f"{type(reference).__name__} (default {reference!r})"
        )


def _choices() -> dict[str, tuple]:
    """The named values each key admits, from the modules that own the names (imported here, not at the top: config
    stays light for everything that does not validate)."""
    from .ablations import VARIANTS
    from .backbone import FINE_TUNING_METHODS, POOLINGS
    from .data import sources
    from .evaluation import GENERATION_SYSTEMS
    from .systems import BASELINES, SYSTEMS

    return {"common.datasets": tuple(sources()), "01_pretrain.method": FINE_TUNING_METHODS,
            "02_mine_negatives.mining_retriever": BASELINES, "03_retriever.variants": ("hard", "random"),
            "03_retriever.pooling": POOLINGS, "04_generator.retriever_system": SYSTEMS, "05_index.systems": SYSTEMS,
            "06_evaluate.systems": SYSTEMS, "06_evaluate.generation_systems": GENERATION_SYSTEMS,
            "06_evaluate.generation_retriever": SYSTEMS, "07_ablations.variants": tuple(VARIANTS)}


# Numbers that must be positive, and shares / weights that must lie in [0, 1].
POSITIVE = {"learning_rate", "prag_learning_rate", "separate_learning_rate", "temperature", "train_steps",
            "train_batch_size", "lora_r", "lora_alpha", "prag_lora_r", "block_size", "eval_batch_size",
            "generation_batch_size"}
UNIT_INTERVAL = {"general_ratio", "heldout_share", "warmup_ratio", "relative_margin", "lambdas"}


def _check_choices_and_numbers(cfg: dict) -> None:
    for where, allowed in _choices().items():
        section, key = where.split(".")
        value = cfg.get(section, {}).get(key)
        for item in value if isinstance(value, list) else [value]:
            if item is not None and item not in allowed:
                raise ConfigError(f"`{where}` names {item!r}{closest(str(item), list(allowed))}; "
                                  f"known: {', '.join(map(str, allowed))}")
    for section, values in cfg.items():
        if not isinstance(values, dict):
            continue
        for key, value in values.items():
            numbers = value if isinstance(value, list) else [value]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers):
                continue
            if key in POSITIVE and any(v <= 0 for v in numbers):
                raise ConfigError(f"`{section}.{key}` = {value!r} must be > 0")
            if key in UNIT_INTERVAL and any(not 0 <= v <= 1 for v in numbers):
                raise ConfigError(f"`{section}.{key}` = {value!r} must lie between 0 and 1")


def check_micro_batch(batch: int, micro: int, batch_name: str = "batch_size",
                      micro_name: str = "micro_batch_size") -> int:
    """The passes a step's `batch` examples take when `micro` go through at a time (0: all at once)."""
    if isinstance(micro, bool) or not isinstance(micro, int) or micro < 0 or (micro and batch % micro):
        fits = [d for d in range(1, batch + 1) if batch % d == 0]
        raise ConfigError(f"{micro_name} = {micro!r} must divide {batch_name} = {batch!r} (one of "
                          f"{', '.join(map(str, fits))}), or be 0 to pass the whole batch at once")
    return batch // micro if micro else 1


def _check_ranges(cfg: dict) -> None:
    _check_choices_and_numbers(cfg)
    common = cfg.get("common", {})
    fractions = common.get("split_fractions", [0.7, 0.1, 0.2])
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ConfigError(f"`common.split_fractions` = {fractions!r} must be three non-negative numbers summing to 1")
    for key in ("seed", "max_questions"):
        if common.get(key, 0) < 0:
            raise ConfigError(f"`common.{key}` = {common[key]!r} must be >= 0")
    for key in ("max_length", "batch_size"):
        if common.get(key, 1) < 1:
            raise ConfigError(f"`common.{key}` = {common[key]!r} must be >= 1")
    if common.get("compute_dtype", "auto") not in ("auto", "float32", "bfloat16", "float16"):
        raise ConfigError(
            f"`common.compute_dtype` = {common['compute_dtype']!r}; use one of auto, float32, bfloat16, float16"
        )
    generator = cfg.get("04_generator", {})
    check_micro_batch(generator.get("train_batch_size", 1), generator.get("micro_batch_size", 0),
                      "`04_generator.train_batch_size`", "`04_generator.micro_batch_size`")
    if cfg.get("run", {}).get("timeout_s", 1) <= 0:
        raise ConfigError(f"`run.timeout_s` = {cfg['run']['timeout_s']!r} must be > 0")


def load_config(path: str | Path, overrides: dict | None = None) -> dict:
    """Resolve `path` (which may `extends:` another file, down to base.yaml), apply overrides, validate."""
    path = Path(path)
    if not path.is_absolute() and not path.exists():
        path = paths.CONFIGS / path
    layers = _layers(path)
    reference = _read(paths.CONFIGS / BASE)
    reference.pop(EXTENDS, None)
    cfg: dict = {}
    for layer in layers:
        cfg = deep_merge(cfg, layer)
    if overrides:
        cfg = deep_merge(cfg, overrides)
    _check_against(cfg, reference, "")
    cfg = deep_merge(reference, cfg)
    _check_ranges(cfg)
    return cfg


# Parameters added after runs of this repository existed, each with the value at which its step computes what it
# computed before the parameter existed. At that value a parameter is left out of what identifies a step's work (the
# runner's parameter hash, 07's context key), so steps run before it was added still verify, `--reuse` and pair.
ADDED_LATER = {"04_generator": {"micro_batch_size": 0}}


def identifying(section: str, values: dict) -> dict:
    """`values` (a config section, or a notebook's parameters) less the later-added parameters at their old value."""
    later = {**ADDED_LATER.get("common", {}), **ADDED_LATER.get(section, {})}
    return {k: v for k, v in values.items() if not (k in later and type(v) is type(later[k]) and v == later[k])}


def notebook_parameters(cfg: dict, notebook: str, declared: set[str], run_dir: str) -> dict:
    """The flat parameters papermill injects into `notebook`: the common keys it declares, its own section, run_dir."""
    section = cfg.get(notebook) or {}
    for key in section:
        if key not in declared:
            raise ConfigError(
                f"unknown parameter `{key}` in {notebook}{closest(key, declared)} "
                f"(the notebook's `parameters` cell declares: {', '.join(sorted(declared))})"
            )
    params = {key: value for key, value in cfg.get("common", {}).items() if key in declared}
    params.update(section)
    params["run_dir"] = run_dir
    return params
