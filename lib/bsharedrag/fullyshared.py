"""Fully Shared RAG: ONE LoRA on the backbone trained on lambda * L_retrieval + (1 - lambda) * L_generation, then
used both to embed (as the retrieval adapter) and to answer (as the generation adapter).

The paper's foil for BSharedRAG: a single set of trained weights has to serve both tasks, and the weight lambda
between the two losses has to be searched. Training reuses the retriever's loop (InfoNCE over in-batch plus hard
negatives, checkpoints, resume) with the answer-only generation loss of the same step added to the same LoRA.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from .artefacts import atomic_write_json, sha256_json
from .backbone import Backbone
from .config import check_micro_batch
from .generator import META as GENERATOR_META
from .generator import GeneratorSettings
from .lm import IGNORE, causal_lm_nll, target_count
from .retriever import RetrieverSettings, save_retrieval_adapter, train_retrieval_adapter


def check_lambda(lam: float) -> float:
    if not isinstance(lam, (int, float)) or not 0.0 <= float(lam) <= 1.0:
        raise ValueError(f"lambda {lam!r} must be a number in [0, 1] (the weight of the retrieval loss)")
    return float(lam)


def answer_batch(tokenizer, examples: list[dict], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt + completion (+ EOS) token ids, right-padded, with labels on the completion only (as SFTTrainer)."""
    rows, labels = [], []
    for e in examples:
        prompt = tokenizer(e["prompt"], add_special_tokens=True)["input_ids"]
        answer = tokenizer(e["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(prompt + answer)
        labels.append([IGNORE] * len(prompt) + answer)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    target = torch.tensor([lab + [IGNORE] * (width - len(lab)) for lab in labels], device=device)
    return ids, mask, target


def generation_loss(examples: list[dict], tokenizer, batch_size: int, weight: float, seed: int,
                    micro_batch_size: int = 0):
    """The `auxiliary` hook of the retriever's loop: each step, backpropagate `weight` x the answer-only loss of a
    seeded batch of (prompt, completion) examples, `micro_batch_size` of them per forward-backward pass (0: all at
    once; the gradient is the whole batch's either way), and return the unweighted loss."""
    if not examples:
        raise ValueError("no generation examples: 04_generator's examples.jsonl is empty; run 04 first")
    check_micro_batch(batch_size, micro_batch_size)

    def step_loss(step: int, model, accelerator) -> float:
        if weight <= 0:
            return float("nan")
        rng = np.random.default_rng([seed, step, 4])
        chosen = [examples[i] for i in rng.choice(len(examples), min(batch_size, len(examples)), replace=False)]
        width = micro_batch_size or len(chosen)
        batches = [answer_batch(tokenizer, chosen[i:i + width], accelerator.device)
                   for i in range(0, len(chosen), width)]
        targets = max(sum(target_count(labels) for _, _, labels in batches), 1)
        loss = 0.0
        for ids, mask, labels in batches:  # token-weighted: each pass's sum over the whole batch's target count
            with accelerator.autocast():  # the body is called directly, past the forward accelerate wraps
                total, _ = causal_lm_nll(model, ids, mask, labels)
            part = total / targets
            accelerator.backward(part * weight)
            loss += float(part.detach())
        return loss

    return step_loss


def train_fully_shared(backbone: Backbone, lam: float, groups: list[dict], doc_text: dict[str, str],
                       examples: list[dict], retriever: RetrieverSettings, generator: GeneratorSettings,
                       checkpoint_dir: str | Path | None = None) -> dict:
    """Train one LoRA (the retriever's LoRA settings and step budget) on lam * InfoNCE + (1 - lam) * answer loss."""
    lam = check_lambda(lam)
    return train_retrieval_adapter(
        backbone, groups, doc_text, retriever, checkpoint_dir, retrieval_weight=lam,
        auxiliary=generation_loss(examples, backbone.tokenizer, generator.batch_size, 1.0 - lam, retriever.seed,
                                  generator.micro_batch_size),
        auxiliary_data=sha256_json([examples, generator.batch_size]))


def save_fully_shared(backbone: Backbone, lam: float, retriever: RetrieverSettings, generator: GeneratorSettings,
                      target: str | Path, extra: dict | None = None) -> Path:
    """Save the one LoRA so that it attaches both as a retrieval adapter (retriever.json) and as a generation
    adapter (generator.json): the same weights serve both stages."""
    meta = {"fully_shared_lambda": lam, **(extra or {})}
    target = save_retrieval_adapter(backbone, retriever, target, meta)
    retrieval_meta = json.loads((Path(target) / "retriever.json").read_text())
    atomic_write_json(Path(target) / GENERATOR_META, {**meta, "settings": asdict(generator),
                                                       **{k: retrieval_meta[k] for k in
                                                          ("backbone", "backbone_fingerprint", "tokenizer")}})
    return target

