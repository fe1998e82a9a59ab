"""Fully Shared RAG: one LoRA trained on lambda * L_retrieval + (1 - lambda) * L_generation, serving both stages."""

import numpy as np
import pytest
import torch
from bsharedrag.backbone import load_backbone
from bsharedrag.fullyshared import answer_batch, check_lambda, save_fully_shared, train_fully_shared
from bsharedrag.generator import GeneratorSettings, attach_generation_adapter
from bsharedrag.lm import IGNORE
from bsharedrag.retriever import (
    RetrieverSettings,
    add_retrieval_adapter,
    attach_retrieval_adapter,
    train_retrieval_adapter,
)
from peft import get_peft_model_state_dict

RETRIEVER = RetrieverSettings(steps=2, batch_size=2, n_negatives=1, lora_r=4, learning_rate=1e-2, warmup_ratio=0.0,
                              query_max_length=16, passage_max_length=24)
GENERATOR = GeneratorSettings(batch_size=2)
DOCS = {f"d{i}": f"product {i}: a {['red', 'blue', 'green', 'black', 'white'][i % 5]} case, size {i}" for i in range(8)}
GROUPS = [{"qid": f"q{i}", "query": f"which case has size {i}?", "positives": [f"d{i}"], "negatives": [f"d{(i + 3) % 8}"]}
          for i in range(4)]
EXAMPLES = [{"prompt": f"Documents: {DOCS[f'd{i}']}\nQuestion: size of case {i}?\nAnswer:", "completion": f" size {i}"}
            for i in range(4)]


def fresh():
    return load_backbone("tiny-random-gemma3", compute_dtype="float32")


def lora(backbone):
    return {k: v.clone() for k, v in get_peft_model_state_dict(backbone.model, adapter_name="retrieval").items()}


def test_lambda_one_is_the_retriever_alone_and_lambda_zero_trains_on_answers_only():
    alone = fresh()
    train_retrieval_adapter(alone, GROUPS, DOCS, RETRIEVER)
    one = fresh()
    out_one = train_fully_shared(one, 1.0, GROUPS, DOCS, EXAMPLES, RETRIEVER, GENERATOR)
    for k, v in lora(alone).items():
        torch.testing.assert_close(lora(one)[k], v, atol=1e-6, rtol=0)
    assert all(np.isnan(out_one["auxiliary_losses"]))  # weight 0: the generation loss is not even computed

    zero = fresh()
    out_zero = train_fully_shared(zero, 0.0, GROUPS, DOCS, EXAMPLES, RETRIEVER, GENERATOR)
    assert all(np.isnan(out_zero["losses"])) and all(np.isfinite(out_zero["auxiliary_losses"]))
    assert any(not torch.allclose(lora(zero)[k], v) for k, v in lora(alone).items())


def test_the_joint_gradient_is_the_weighted_sum_of_both_losses():
    """One step at lambda = 0.3 moves the LoRA as 0.3 x the retrieval gradient + 0.7 x the generation gradient
    (SGD with no momentum makes the update linear in the gradient)."""
    settings = RetrieverSettings(**{**RETRIEVER.__dict__, "steps": 1})

    def one_step(lam):
        bb = fresh()
        original = torch.optim.AdamW
        torch.optim.AdamW = lambda params, lr, weight_decay: torch.optim.SGD(params, lr=lr)
        try:
            train_fully_shared(bb, lam, GROUPS, DOCS, EXAMPLES, settings, GENERATOR)
        finally:
            torch.optim.AdamW = original
        return lora(bb)

    init = fresh()
    add_retrieval_adapter(init, settings)
    start = lora(init)
    ret, gen, mix = one_step(1.0), one_step(0.0), one_step(0.3)
    for k in start:
        expected = start[k] + 0.3 * (ret[k] - start[k]) + 0.7 * (gen[k] - start[k])
        torch.testing.assert_close(mix[k], expected, atol=1e-6, rtol=1e-4)


def test_the_answer_loss_in_micro_batches_is_the_whole_batch_s():
    """Answers of different lengths: the whole batch's loss weighs every answer token alike, and so must the passes."""
    examples = [{**e, "completion": e["completion"] + ", in red" * i} for i, e in enumerate(EXAMPLES)]
    whole, split = fresh(), fresh()
    train_fully_shared(whole, 0.3, GROUPS, DOCS, examples, RETRIEVER, GeneratorSettings(batch_size=4))
    out = train_fully_shared(split, 0.3, GROUPS, DOCS, examples, RETRIEVER,
                             GeneratorSettings(batch_size=4, micro_batch_size=1))
    assert all(np.isfinite(out["auxiliary_losses"]))
    for k, v in lora(whole).items():
        torch.testing.assert_close(lora(split)[k], v, atol=2e-5, rtol=1e-4)  # Adam magnifies float noise


def test_the_one_lora_attaches_as_both_adapters(tmp_path):
    bb = fresh()
    train_fully_shared(bb, 0.5, GROUPS, DOCS, EXAMPLES, RETRIEVER, GENERATOR)
    save_fully_shared(bb, 0.5, RETRIEVER, GENERATOR, tmp_path / "shared", {"trainable_parameters": 1})
    other = fresh()
    assert attach_retrieval_adapter(other, tmp_path / "shared", "bsharedrag").pooling == RETRIEVER.pooling
    assert attach_generation_adapter(other, tmp_path / "shared").top_k == GENERATOR.top_k
    weights = {name: get_peft_model_state_dict(other.model, adapter_name=name) for name in ("bsharedrag", "generation")}
    for k, v in weights["bsharedrag"].items():
        assert torch.equal(v, weights["generation"][k])


def test_answer_batches_mask_the_prompt_and_lambda_is_checked():
    tok = fresh().tokenizer
    ids, mask, labels = answer_batch(tok, EXAMPLES[:2], "cpu")
    assert ids.shape == labels.shape == mask.shape
    for example, row, lab, m in zip(EXAMPLES, ids, labels, mask):
        target = row[lab != IGNORE].tolist()
        assert target[-1] == tok.eos_token_id and tok.decode(target[:-1]).strip().startswith("size")
        assert int(m.sum()) == len(target) + len(tok(example["prompt"])["input_ids"])  # padding is masked
    for bad in (-0.1, 1.5, "half"):
        with pytest.raises(ValueError, match="lambda"):
            check_lambda(bad)
