"""Separate RAG's fine-tuned backbone copies: only the top layers train, a copy round-trips, its identity is its own."""

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from bsharedrag.artefacts import training_fingerprint
from bsharedrag.backbone import Backbone, embed, load_backbone, train_top_layers
from bsharedrag.encoders import BackboneEncoder
from bsharedrag.generator import (
    GENERATION_ADAPTER,
    DecodeSettings,
    GeneratorSettings,
    generate,
    train_generation_adapter,
    training_examples,
)
from bsharedrag.mining import random_negatives
from bsharedrag.retriever import RetrieverSettings, add_retrieval_adapter, train_retrieval_adapter
from bsharedrag.separate import WEIGHTS, copy_identity, load_copy, train_generation_copy, train_retrieval_copy
from bsharedrag.systems import EncodeSettings, _encoder
from safetensors import safe_open

TOP = "model.layers.1."  # the tiny backbone has two decoder layers; lora_layers=1 fine-tunes the upper one
RETRIEVER = RetrieverSettings(steps=2, batch_size=2, n_negatives=2, lora_layers=1, full_learning_rate=1e-3,
                              passage_max_length=32, query_max_length=16, save_every=2)
GENERATOR = GeneratorSettings(steps=2, batch_size=2, lora_layers=1, full_learning_rate=1e-3, doc_max_tokens=16,
                              answer_max_tokens=12, save_every=2)


_BASE = []


def fresh(other: bool = False) -> Backbone:
    """A new tiny backbone with the same base weights (`other`: different ones), without loading the tokenizer again."""
    if not _BASE:
        _BASE.append(load_backbone("tiny-random-gemma3", compute_dtype="float32"))
    base = _BASE[0]
    model = copy.deepcopy(base.model)
    if other:
        with torch.no_grad():
            model.get_input_embeddings().weight.mul_(2.0)
    return Backbone(base.name, model, base.tokenizer, base.device, base.dtype)


def state(bb) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in bb.model.state_dict().items()}


def changed(before: dict, bb) -> set[str]:
    return {k for k, v in bb.model.state_dict().items() if not torch.equal(v, before[k])}


def saved_keys(path) -> set[str]:
    with safe_open(str(path), "pt") as fh:
        return set(fh.keys())


@pytest.fixture(scope="module")
def retrieval_copy(tmp_path_factory, small_epqa):
    root = tmp_path_factory.mktemp("separate")
    groups = random_negatives(small_epqa, small_epqa.queries, 3, seed=0)[:4]
    doc_text = dict(zip(small_epqa.corpus["doc_id"], small_epqa.passages()))
    bb = fresh()
    before = state(bb)
    out = train_retrieval_copy(bb, groups, doc_text, RETRIEVER, root / "retrieval_copy", root / "ck")
    return root, bb, before, out, groups, doc_text


@pytest.fixture(scope="module")
def generation_copy(tmp_path_factory, small_ecomeval):
    root = tmp_path_factory.mktemp("separate_gen")
    bb = fresh()
    examples = training_examples(small_ecomeval, {}, GENERATOR, bb.tokenizer, "{title}: {text}")[:4]
    before = state(bb)
    out = train_generation_copy(bb, examples, GENERATOR, root / "generation_copy", root / "ck")
    return root, bb, before, out, examples


def test_a_retrieval_copy_trains_only_its_top_layers_and_round_trips(retrieval_copy):
    root, bb, before, out, groups, doc_text = retrieval_copy
    assert len(out["losses"]) == 2
    moved = changed(before, bb)
    assert moved and all(k.startswith(TOP) for k in moved)  # everything below the top layer is bitwise the same
    assert saved_keys(root / "retrieval_copy" / WEIGHTS) == {k for k in before if k.startswith(TOP)}
    loaded = fresh()
    settings = load_copy(loaded, root / "retrieval_copy", task="retrieval")
    assert settings.method == "full" and settings.lora_layers == 1
    assert not changed(state(bb), loaded)
    texts = ["is it waterproof?", "battery life of the charger"]
    np.testing.assert_array_equal(embed(bb, texts)["last"], embed(loaded, texts)["last"])
    # the checkpoint restores the trained layers: a rerun resumes at the last step and ends where the first ended
    resumed = fresh()
    again = train_retrieval_adapter(resumed, groups, doc_text, dataclasses.replace(RETRIEVER, method="full"),
                                    root / "ck")
    assert again["losses"] == out["losses"] and not changed(state(bb), resumed)


def held_in_bf16() -> Backbone:
    """A fresh tiny backbone holding its weights in bf16, as `load_backbone` does where bf16 is the compute dtype."""
    base = fresh()
    return Backbone(base.name, base.model.to(torch.bfloat16), base.tokenizer, base.device, torch.bfloat16)


def test_a_copy_serves_in_the_dtype_the_backbone_holds_its_weights_in(retrieval_copy):
    root, bb, *_ = retrieval_copy
    folder = root / "retrieval_copy"

    def weight_bytes(b: Backbone) -> int:
        return sum(p.numel() * p.element_size() for p in b.model.parameters())

    served = held_in_bf16()
    bare = weight_bytes(served)
    load_copy(served, folder, task="retrieval")
    assert {p.dtype for p in served.model.parameters()} == {torch.bfloat16} and weight_bytes(served) == bare
    trained = bb.model.state_dict()
    assert all(torch.equal(v, trained[k].to(torch.bfloat16)) for k, v in served.model.state_dict().items()
               if k.startswith(TOP))
    # As the copy embeds with its fp32 master layers under the same autocast: only the norms' rounding differs.
    master = held_in_bf16()
    load_copy(master, folder, master_weights=True)
    assert all(torch.equal(master.model.get_parameter(k), trained[k]) for k in saved_keys(folder / WEIGHTS))
    assert weight_bytes(master) > bare
    texts = ["is it waterproof?", "battery life of the charger"]
    a, b = embed(served, texts)["last"], embed(master, texts)["last"]
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() > 0.999
    # Close is not equal: the two servings name themselves apart in manifests and the embedding cache.
    named = {BackboneEncoder(b).identity["adapter"] for b in (served, master)}
    assert named == {f"{copy_identity(folder)}@bfloat16", f"{copy_identity(folder)}@float32"}


def test_07_builds_a_copys_index_again_when_the_copy_serves_in_another_dtype(retrieval_copy, small_epqa, capsys,
                                                                           monkeypatch):
    from bsharedrag import ablations
    from test_plots import fake_ablation

    root, *_ = retrieval_copy
    ab = fake_ablation(root.parent / "run07", {"epqa": small_epqa})
    monkeypatch.setattr(ablations, "generator_settings", lambda cfg: GeneratorSettings())  # only its top_k is read

    def served(master: bool) -> Backbone:
        bb = held_in_bf16()
        load_copy(bb, root / "retrieval_copy", master_weights=master)
        return bb

    manifest = ab.out_dir / "indexes" / "t" / "epqa" / "separate_backbones" / "manifest.json"
    ablations.retrieval_scores(ab, served(master=True), "separate_backbones", root, "t")
    assert json.loads(manifest.read_text())["adapter"].endswith("@float32")
    ablations.retrieval_scores(ab, served(master=True), "separate_backbones", root, "t")
    assert "building it again" not in capsys.readouterr().out  # a matching index is searched as saved
    found = ablations.retrieval_scores(ab, served(master=False), "separate_backbones", root, "t")
    assert "does not match the encoder in use (adapter: built with" in capsys.readouterr().out
    assert json.loads(manifest.read_text())["adapter"].endswith("@bfloat16")
    assert 0 <= found.scores["epqa"]["ndcg@5"] <= 1


def test_a_copy_names_its_own_weights_in_manifests_and_the_embedding_cache(retrieval_copy):
    root, bb, *_ = retrieval_copy
    base = BackboneEncoder(fresh()).identity
    copy = _encoder("separate_backbones", fresh(), EncodeSettings(adapter_root=str(root))).identity
    assert copy["adapter"] == f"{copy_identity(root / 'retrieval_copy')}@float32"
    assert copy["adapter"].startswith("retrieval-copy:")
    assert copy["backbone_fingerprint"] == base["backbone_fingerprint"] and base["adapter"] is None
    assert BackboneEncoder(bb).identity["adapter"] == copy["adapter"]  # the trained backbone, as saved
    unsaved = fresh()
    train_top_layers(unsaved, 1, "retrieval")
    with pytest.raises(ValueError, match="not saved yet.*save_copy"):
        BackboneEncoder(unsaved).identity


def test_a_copy_is_refused_on_another_backbone_task_or_damaged_file(retrieval_copy, tmp_path, tally):
    root = retrieval_copy[0]
    folder = root / "retrieval_copy"
    with pytest.raises(ValueError, match=r"made from backbone .*fingerprint .* load that backbone or fine-tune"):
        load_copy(fresh(other=True), folder)
    with pytest.raises(ValueError, match="fine-tuned for retrieval, not generation"):
        load_copy(fresh(), folder, task="generation")
    adapted = fresh()
    add_retrieval_adapter(adapted, RetrieverSettings(lora_r=2))
    with pytest.raises(ValueError, match="already carries adapters"):
        load_copy(adapted, folder)
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for f in folder.iterdir():
        (damaged / f.name).write_bytes(f.read_bytes())
    (damaged / WEIGHTS).write_bytes((folder / WEIGHTS).read_bytes()[:-100])
    untouched = fresh()
    before = state(untouched)
    with pytest.raises(ValueError, match="missing, truncated or damaged"):
        load_copy(untouched, damaged)
    assert not changed(before, untouched) and untouched.fine_tuned is None
    tally("faults injected", 4)


def test_a_generation_copy_trains_its_top_layers_answers_as_the_generator_and_round_trips(generation_copy):
    root, bb, before, out, examples = generation_copy
    assert out["steps"] == 2
    moved = changed(before, bb)
    assert moved and all(k.startswith(TOP) for k in moved)
    checkpoint = root / "ck" / "checkpoint-2" / "model.safetensors"
    assert saved_keys(checkpoint) == {k for k in before if k.startswith(TOP)}  # the trained layers only
    prompts = [e["prompt"] for e in examples[:2]]
    decode = DecodeSettings(max_new_tokens=6, batch_size=2)
    answers = generate(bb, prompts, decode, GENERATION_ADAPTER)
    loaded = fresh()
    settings = load_copy(loaded, root / "generation_copy")
    assert settings.method == "full" and generate(loaded, prompts, decode, GENERATION_ADAPTER) == answers
    with pytest.raises(ValueError, match="generation copy .* cannot run as 'the bare backbone'"):
        generate(loaded, prompts, decode, None)
    resumed = fresh()
    again = train_generation_adapter(resumed, examples, dataclasses.replace(GENERATOR, method="full"), root / "ck")
    assert again["resumed"] and not changed(state(bb), resumed)


def test_the_method_decides_the_learning_rate_and_what_a_checkpoint_fingerprint_holds():
    lora, full = RetrieverSettings(), RetrieverSettings(method="full")
    assert lora.method_learning_rate == lora.learning_rate and full.method_learning_rate == full.full_learning_rate
    # LoRA checkpoints saved before `method` existed still match; a full one is not keyed by LoRA-only knobs
    assert {"method", "full_learning_rate"}.isdisjoint(training_fingerprint(lora, "d")["settings"])
    assert "lora_r" not in training_fingerprint(full, "d")["settings"]
    assert training_fingerprint(full, "d")["settings"]["method"] == "full"
    with pytest.raises(ValueError, match="unknown fine-tuning method 'partial'"):
        GeneratorSettings(method="partial")
