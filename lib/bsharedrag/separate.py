"""Separate RAG: two independently fine-tuned backbone copies, one per task (the paper's Separate RAG (b)).

Each copy fine-tunes the top `lora_layers` decoder layers (all when 0) of its own backbone with the training loop,
data, step budget and learning-rate schedule of the LoRA it stands in for (03's retriever, 04's generator): what
differs from BSharedRAG is only separate fine-tuned weights per task instead of one frozen backbone and two LoRAs.
A copy is saved as its trained layers alone and loaded onto the base backbone it was made from.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .artefacts import atomic_dir, atomic_write_json, sha256_file
from .backbone import Backbone, top_layer_parameters
from .devices import dtype_name
from .generator import GENERATION_ADAPTER, GeneratorSettings, train_generation_adapter
from .retriever import RETRIEVAL_ADAPTER, RetrieverSettings, train_retrieval_adapter

META = "copy.json"
WEIGHTS = "layers.safetensors"
MADE_BY = {RETRIEVAL_ADAPTER: "separate.train_retrieval_copy", GENERATION_ADAPTER: "separate.train_generation_copy"}


def train_retrieval_copy(backbone: Backbone, groups: list[dict], doc_text: dict[str, str],
                         settings: RetrieverSettings, target: str | Path, checkpoint_dir: str | Path | None = None,
                         extra: dict | None = None) -> dict:
    """Fine-tune a fresh backbone's top layers for retrieval (03's InfoNCE loop) and save the copy to `target`."""
    settings = replace(settings, method="full")
    out = train_retrieval_adapter(backbone, groups, doc_text, settings, checkpoint_dir)
    save_copy(backbone, settings, target, {"train_seconds": out["seconds"], "losses": out["losses"], **(extra or {})})
    return out


def train_generation_copy(backbone: Backbone, examples: list[dict], settings: GeneratorSettings,
                          target: str | Path, checkpoint_dir: str | Path, extra: dict | None = None) -> dict:
    """Fine-tune a fresh backbone's top layers for generation (04's answer-only SFT) and save the copy to `target`."""
    settings = replace(settings, method="full")
    out = train_generation_adapter(backbone, examples, settings, checkpoint_dir)
    save_copy(backbone, settings, target, {"train_seconds": out["seconds"], "losses": out["losses"], **(extra or {})})
    return out


def save_copy(backbone: Backbone, settings: RetrieverSettings | GeneratorSettings, target: str | Path,
              extra: dict | None = None) -> Path:
    """Save the fine-tuned layers alone (safetensors) with copy.json: task, settings, the base backbone and sha256."""
    tuned = backbone.fine_tuned
    if tuned is None or settings.method != "full":
        raise ValueError(f"the backbone {backbone.name} holds no fine-tuned copy; train one with "
                         "train_retrieval_copy or train_generation_copy")
    layers = top_layer_parameters(backbone.model, settings.lora_layers)
    tensors = {name: p.detach().cpu().contiguous() for name, p in layers.items()}
    with atomic_dir(target) as staging:
        save_file(tensors, str(staging / WEIGHTS))
        sha = sha256_file(staging / WEIGHTS)
        atomic_write_json(staging / META, {
            **(extra or {}), "task": tuned["task"], "settings": asdict(settings), "weights_sha256": sha,
            "trainable_parameters": sum(t.numel() for t in tensors.values()), "backbone": backbone.name,
            "backbone_fingerprint": backbone.fingerprint, "tokenizer": backbone.tokenizer_fingerprint})
    backbone.fine_tuned = {"task": tuned["task"], "identity": _identity(tuned["task"], sha),
                           "dtype": dtype_name(next(iter(tensors.values())).dtype)}
    return Path(target)


def is_copy(folder: str | Path) -> bool:
    """Whether `folder` holds a saved copy (rather than a LoRA adapter)."""
    return (Path(folder) / META).is_file()


def read_copy_meta(copy_dir: str | Path) -> dict:
    copy_dir = Path(copy_dir)
    if not is_copy(copy_dir):
        raise FileNotFoundError(f"no fine-tuned copy at {copy_dir} ({META} missing); train one with "
                                "separate.train_retrieval_copy or separate.train_generation_copy")
    return json.loads((copy_dir / META).read_text())


def copy_identity(copy_dir: str | Path) -> str:
    """`<task>-copy:<sha256 of its layers>`: what index manifests and the embedding cache record for the copy."""
    meta = read_copy_meta(copy_dir)
    return _identity(meta["task"], meta["weights_sha256"])


def _identity(task: str, sha: str) -> str:
    return f"{task}-copy:{sha[:16]}"


def load_copy(backbone: Backbone, copy_dir: str | Path, task: str | None = None,
              master_weights: bool = False) -> RetrieverSettings | GeneratorSettings:
    """Load a saved copy's layers into `backbone`, the base it was made from, in the dtype the backbone holds its
    weights in (with `master_weights`, in their fp32 master weights: what it did before 3282b11, for comparison), and
    return its training settings.

    Refuses a copy of another task, backbone or tokenizer, or whose layers file does not match its sha256, before it
    touches the backbone; loading the copy the backbone already holds again changes nothing.
    """
    meta = read_copy_meta(copy_dir)
    made_by = MADE_BY[meta["task"]]
    if task is not None and meta["task"] != task:
        raise ValueError(f"the copy at {copy_dir} was fine-tuned for {meta['task']}, not {task}; give the {task} "
                         f"copy's folder or train one with {MADE_BY[task]}")
    if meta["backbone_fingerprint"] != backbone.fingerprint:
        raise ValueError(
            f"the copy at {copy_dir} was made from backbone {meta['backbone']} (fingerprint "
            f"{meta['backbone_fingerprint']}), but the loaded backbone is {backbone.name} ({backbone.fingerprint}); "
            f"load that backbone or fine-tune the copy again with {made_by}")
    if meta["tokenizer"] != backbone.tokenizer_fingerprint:
        raise ValueError(f"the copy at {copy_dir} was made with tokenizer {meta['tokenizer']}, but {backbone.name} "
                         f"now loads tokenizer {backbone.tokenizer_fingerprint}; load the tokenizer it was made with "
                         f"or fine-tune the copy again with {made_by}")
    settings_type = RetrieverSettings if meta["task"] == RETRIEVAL_ADAPTER else GeneratorSettings
    identity = _identity(meta["task"], meta["weights_sha256"])
    if backbone.fine_tuned is not None and backbone.fine_tuned["identity"] == identity:
        return settings_type(**meta["settings"])
    if hasattr(backbone.model, "peft_config") or backbone.fine_tuned is not None:
        raise ValueError(f"the backbone {backbone.name} already carries adapters or another fine-tuned copy; load a "
                         f"fresh backbone to load the copy at {copy_dir}")
    weights = Path(copy_dir) / WEIGHTS
    found = sha256_file(weights) if weights.is_file() else "nothing"
    if found != meta["weights_sha256"]:
        raise ValueError(f"the copy's layers {weights} hash to {found}, not the {meta['weights_sha256']} its {META} "
                         f"records: the file is missing, truncated or damaged; delete {copy_dir} and fine-tune the "
                         f"copy again with {made_by}")
    tensors = load_file(str(weights))
    unknown = sorted(set(tensors) - set(backbone.model.state_dict()))
    if unknown:
        raise ValueError(f"the copy at {copy_dir} holds tensors {backbone.name} lacks ({unknown[:3]}); fine-tune "
                         f"the copy again with {made_by}")
    # The copy serves in the dtype the backbone holds its weights in (bf16 where that is the compute dtype), as an
    # attached adapter does. Its fp32 master weights would double the copy's memory against the shared backbone's,
    # and under autocast every matmul sees bf16 weights either way (cast at each forward).
    held = torch.float32 if master_weights else backbone.held_dtype
    for name, tensor in tensors.items():
        param = backbone.model.get_parameter(name)
        param.data = tensor.to(device=param.device, dtype=held)
    backbone.model.eval()
    backbone.fine_tuned = {"task": meta["task"], "identity": identity, "dtype": dtype_name(held)}
    return settings_type(**meta["settings"])


def main(argv: list[str] | None = None) -> int:
    """Serve a run's Separate RAG generation copy both ways in one process, in the dtype the backbone holds its weights
    in and with its fp32 master layers, and print the weights' MB, seconds a question and how many greedy answers the
    two share, on test questions with their gold documents at the run's 07 decoding."""
    import argparse

    from .ablations import backbone_mb
    from .backbone import load_backbone
    from .config import load_config
    from .data import load_sets
    from .evaluation import generation_questions
    from .generator import build_prompt, decode_settings, generate, gold_documents
    from .pipeline import run_backbone

    parser = argparse.ArgumentParser(prog="python -m bsharedrag.separate", description=main.__doc__)
    parser.add_argument("run_dir", help="outputs/<run_id> whose 07 trained separate_backbones")
    parser.add_argument("--seed", type=int, default=0, help="the training seed of the copy")
    parser.add_argument("--questions", type=int, default=30, help="test questions with an answer per data set")
    args = parser.parse_args(argv)
    run = Path(args.run_dir)
    folder = run / "07_ablations" / "components" / "separate" / f"seed{args.seed}" / "generation_copy"
    read_copy_meta(folder)  # refuses a run without the copy (an archived run keeps no weights) before any loading
    cfg = load_config(run / "resolved.yaml")
    served = {}
    for master in (False, True):
        bb = load_backbone(run_backbone(run, cfg), compute_dtype=cfg["common"]["compute_dtype"])
        served["fp32 master layers" if master else "held dtype"] = (bb, load_copy(bb, folder, GENERATION_ADAPTER,
                                                                                    master_weights=master))
    for name, (bb, _) in served.items():
        print(f"{name}: weights {backbone_mb(bb):.0f} MB ({', '.join(sorted({str(p.dtype) for p in bb.model.parameters()}))})")
    bb, settings = served["held dtype"]  # the same copy both ways: one set of prompts
    for ds_name, ds in load_sets(cfg["common"]).items():
        queries = generation_questions(ds, args.questions, 0)
        text = dict(zip(ds.corpus["doc_id"], ds.passages(cfg["common"]["passage_format"])))
        prompts = [build_prompt(q, [text[d] for d in gold_documents(ds, qid)[:settings.top_k]], ds.lang, settings,
                                bb.tokenizer) for q, qid in zip(queries["text"], queries["qid"])]
        decode = decode_settings(cfg["07_ablations"], ds.lang)
        seconds, answers = {name: [] for name in served}, {}
        for order in (list(served), list(served)[::-1]):  # both orders: the machine drifts less within a pair
            for name in order:
                began = time.perf_counter()
                answers[name] = generate(served[name][0], prompts, decode, GENERATION_ADAPTER)
                seconds[name].append((time.perf_counter() - began) / len(prompts))
        first, second = answers.values()
        print(f"{ds_name}, {len(first)} test questions with their gold documents: " +
              ", ".join(f"{name} {min(s):.3f} s a question" for name, s in seconds.items()) +
              f"; the same answer for {sum(a == b for a, b in zip(first, second))} of {len(first)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
