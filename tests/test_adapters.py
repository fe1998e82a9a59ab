"""A saved adapter attaches only to the backbone and tokenizer it was trained with, and only with whole weights."""

import json
import re

import pytest
from peft import PeftModel

from bsharedrag.retriever import RetrieverSettings, add_retrieval_adapter, attach_retrieval_adapter, \
    save_retrieval_adapter


@pytest.fixture
def saved(fresh, tmp_path):
    bb = fresh()
    add_retrieval_adapter(bb, RetrieverSettings(lora_r=4))
    return save_retrieval_adapter(bb, RetrieverSettings(lora_r=4), tmp_path / "adapter")


def test_an_adapter_saved_with_another_tokenizer_is_refused(saved, fresh, tally):
    meta = json.loads((saved / "retriever.json").read_text())
    (saved / "retriever.json").write_text(json.dumps({**meta, "tokenizer": "0123456789abcdef"}))
    tally("bad inputs tried")
    bb = fresh()
    with pytest.raises(ValueError, match=r"trained with tokenizer 0123456789abcdef.*retrain the adapter with "
                                         r"03_retriever"):
        attach_retrieval_adapter(bb, saved)
    assert not isinstance(bb.model, PeftModel)
    (saved / "retriever.json").write_text(json.dumps(meta))
    attach_retrieval_adapter(bb, saved)  # the tokenizer it was trained with: attached
    assert isinstance(bb.model, PeftModel)


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_truncated_or_missing_weights_file_names_the_file_and_the_step_that_rebuilds_it(saved, fresh, damage,
                                                                                           tally):
    weights = saved / "adapter_model.safetensors"
    if damage == "truncated":  # as a copy or a disk that ran out half way leaves it
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:
        weights.unlink()
    tally("bad inputs tried")
    bb = fresh()
    with pytest.raises(ValueError, match=rf"{re.escape(str(weights))}.*{damage}.*retrain the adapter with 03_retriever "
                                         r"\(python -m bsharedrag.run CONFIG --only 03 --resume RUN_ID\)"):
        attach_retrieval_adapter(bb, saved)
    assert not isinstance(bb.model, PeftModel)  # refused before the backbone was touched


def test_an_attached_adapter_serves_in_the_backbones_dtype_with_bit_identical_embeddings(tiny_backbone, tmp_path):
    import numpy as np
    import torch

    from bsharedrag.backbone import embed, load_backbone

    folder = tmp_path / "backbone"
    tiny_backbone.model.save_pretrained(folder)
    tiny_backbone.tokenizer.save_pretrained(folder)
    trained = load_backbone(str(folder), compute_dtype="float32")
    settings = RetrieverSettings(lora_r=4, lora_layers=0)
    add_retrieval_adapter(trained, settings)
    torch.manual_seed(0)
    for name, p in trained.model.named_parameters():
        if "lora_B" in name:  # a fresh LoRA's B is zero: give it something to add
            p.data.normal_(std=0.05)
    saved = save_retrieval_adapter(trained, settings, tmp_path / "adapter")

    served = load_backbone(str(folder), compute_dtype="bfloat16")
    attach_retrieval_adapter(served, saved)
    assert {p.dtype for n, p in served.model.named_parameters() if "lora_" in n} == {torch.bfloat16}
    peft_default = load_backbone(str(folder), compute_dtype="bfloat16")
    peft_default.model = PeftModel.from_pretrained(peft_default.model, str(saved), adapter_name="retrieval")
    assert {p.dtype for n, p in peft_default.model.named_parameters() if "lora_" in n} == {torch.float32}
    texts = ["is it waterproof?", "does the charger fit a 2019 model with the larger port?"]
    ours, theirs = embed(served, texts, ("mean",))["mean"], embed(peft_default, texts, ("mean",))["mean"]
    assert np.array_equal(ours, theirs)  # autocast runs the LoRA matmuls in bf16 either way
    untrained = embed(load_backbone(str(folder), compute_dtype="bfloat16"), texts, ("mean",))["mean"]
    assert not np.allclose(ours, untrained, atol=1e-3)  # the adapter does act
