"""Named LoRA adapters on the one shared backbone: save one alone with its metadata, attach it by name, check it."""

from __future__ import annotations

import json
from pathlib import Path

from peft import PeftModel
from safetensors import SafetensorError, safe_open

from .artefacts import atomic_dir, atomic_write_json, sha256_file
from .backbone import Backbone

WEIGHTS = "adapter_model.safetensors"


def save_adapter(backbone: Backbone, name: str, target: str | Path, meta_file: str, meta: dict) -> Path:
    """Save adapter `name` alone (a few MB) into `target` with `meta_file`: `meta` plus the backbone it was trained on."""
    model = backbone.model
    if not isinstance(model, PeftModel) or name not in model.peft_config:
        raise ValueError(f"the backbone carries no adapter named {name!r}")
    with atomic_dir(target) as staging:
        model.save_pretrained(str(staging), selected_adapters=[name])
        # peft writes a non-default adapter into a sub-folder of its name; keep one flat folder per adapter.
        nested = staging / name
        if nested.is_dir():
            for item in nested.iterdir():
                item.rename(staging / item.name)
            nested.rmdir()
        atomic_write_json(staging / meta_file, {**meta, "backbone": backbone.name,
                                                "backbone_fingerprint": backbone.fingerprint,
                                                "tokenizer": backbone.tokenizer_fingerprint})
    return Path(target)


def read_meta(adapter_dir: str | Path, meta_file: str, made_by: str) -> dict:
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / meta_file).is_file():
        raise FileNotFoundError(f"no adapter at {adapter_dir} ({meta_file} missing); train one with {made_by}")
    return json.loads((adapter_dir / meta_file).read_text())


def check_weights(adapter_dir: str | Path, made_by: str) -> None:
    """Refuse an adapter whose weights file is missing, truncated or damaged, naming it and the step rebuilding it."""
    weights = Path(adapter_dir) / WEIGHTS
    try:
        with safe_open(str(weights), "pt") as fh:  # checks the header and that the data covers the whole file
            fh.keys()
    except (OSError, SafetensorError) as exc:
        raise ValueError(
            f"the adapter weights {weights} cannot be read ({exc}): the file is missing, truncated or damaged. "
            f"Delete {adapter_dir} and retrain the adapter with {made_by} "
            f"(python -m bsharedrag.run CONFIG --only {made_by[:2]} --resume RUN_ID)"
        ) from exc


def attach_adapter(backbone: Backbone, adapter_dir: str | Path, name: str, meta_file: str, made_by: str) -> dict:
    """Attach a saved adapter to `backbone` under `name` (replacing one of that name) and make it the active one.

    Refuses an adapter trained on another backbone or tokenizer, or whose weights file is unreadable, before it
    touches the backbone; returns its metadata.
    """
    meta = read_meta(adapter_dir, meta_file, made_by)
    if meta["backbone_fingerprint"] != backbone.fingerprint:
        raise ValueError(
            f"the adapter at {adapter_dir} was trained on backbone {meta['backbone']} (fingerprint "
            f"{meta['backbone_fingerprint']}), but the loaded backbone is {backbone.name} ({backbone.fingerprint}); "
            f"load that backbone or retrain the adapter with {made_by}"
        )
    if meta.get("tokenizer", backbone.tokenizer_fingerprint) != backbone.tokenizer_fingerprint:
        raise ValueError(
            f"the adapter at {adapter_dir} was trained with tokenizer {meta['tokenizer']}, but {backbone.name} now "
            f"loads tokenizer {backbone.tokenizer_fingerprint}; load the tokenizer it was trained with or retrain "
            f"the adapter with {made_by}"
        )
    check_weights(adapter_dir, made_by)
    # An attached adapter serves: its weights take the base layers' dtype (bf16 where the backbone holds bf16). Under
    # the autocast every forward here runs in, the LoRA matmuls see bf16 either way, so the output is bit-identical,
    # and peft's default (fp32 adapter weights) only adds a cast of every LoRA input: ~11% of corpus encoding.
    if isinstance(backbone.model, PeftModel):
        if name in backbone.model.peft_config:
            backbone.model.delete_adapter(name)
        backbone.model.load_adapter(str(adapter_dir), adapter_name=name, autocast_adapter_dtype=False)
    else:
        backbone.model = PeftModel.from_pretrained(backbone.model, str(adapter_dir), adapter_name=name,
                                                   autocast_adapter_dtype=False)
    backbone.model.set_adapter(name)
    backbone.model.eval()
    return meta


def adapter_identity(adapter_dir: str | Path, kind: str) -> str:
    """`<kind>:<sha256 of the adapter weights>`: what manifests record as the adapter."""
    return f"{kind}:{sha256_file(Path(adapter_dir) / WEIGHTS)[:16]}"


class AdapterSwitch:
    """Makes one adapter of a PeftModel the active one, for inference: what `PeftModel.set_adapter` does, without
    walking every module of the model (861 on Gemma 270M) and without toggling `requires_grad` on every LoRA weight,
    which together cost several milliseconds per switch. Training code keeps using `set_adapter`."""

    def __init__(self, model: PeftModel):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.model = model
        self.layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        # peft keeps a layer's active adapters in `_active_adapter` (read by its forward); where a peft version does
        # not, fall back to the layer's own set_adapter.
        self.direct = all(hasattr(layer, "_active_adapter") for layer in self.layers)

    def __call__(self, name: str) -> None:
        if name not in self.model.peft_config:
            raise ValueError(f"adapter {name!r} is not attached; attached: {', '.join(self.model.peft_config)}")
        active = [name]
        for layer in self.layers:
            if self.direct:
                layer._active_adapter = active
            else:
                layer.set_adapter(name)
        self.model.active_adapter = name  # as PeftModel.set_adapter: the wrapper and its tuner both record it
        self.model.base_model.active_adapter = name
