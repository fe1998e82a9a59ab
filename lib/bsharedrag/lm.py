"""Causal-LM loss on the positions that have a target only: the 262k-word LM head never runs on prompt or padding."""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from .backbone import body_of

IGNORE = -100  # label of a position that is not a target (prompt, padding), as in transformers
HEAD_CHUNK = 256  # target positions per LM-head call: bounds the logits held at once to HEAD_CHUNK x vocabulary


def _chunk_nll(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = head(hidden).float()
    if softcap:  # Gemma-style final-logit soft-capping, as the model's own forward applies it
        logits = torch.tanh(logits / softcap) * softcap
    return torch.nn.functional.cross_entropy(logits, targets, reduction="sum")


def target_count(labels: torch.Tensor) -> int:
    """The positions causal_lm_nll sums over: `labels` is aligned with the inputs, so position 0's label has no
    position before it to predict it."""
    return int((labels[:, 1:] != IGNORE).sum())


def causal_lm_nll(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token negative log-likelihood over the positions whose label is not IGNORE, and their count.

    `labels` is aligned with `input_ids` (the model shifts it, as transformers does). The body runs once; the LM head
    runs only on the hidden states that predict a target, in chunks recomputed in backward, so the logits of a long
    sequence over a large vocabulary are never all in memory.
    """
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    hidden = body_of(model)(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE
    hidden, targets = hidden[:, :-1][keep], targets[keep]
    head = model.get_output_embeddings()
    softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.shape[0], HEAD_CHUNK):
        piece = slice(start, start + HEAD_CHUNK)
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_nll, head, hidden[piece], targets[piece], softcap, use_reentrant=False)
        else:
            total = total + _chunk_nll(head, hidden[piece], targets[piece], softcap)
    return total, int(targets.shape[0])


def causal_lm_loss(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the target positions (what `model(..., labels=labels).loss` gives)."""
    total, count = causal_lm_nll(model, input_ids, attention_mask, labels)
    if count == 0:
        raise ValueError("no target tokens in the batch: every label is IGNORE (-100); check the answer masking")
    return total / count
