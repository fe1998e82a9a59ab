"""Continual pre-training on tiny models and real documents: the mix, packing, training, merge, save and resume."""

import copy
import json

import numpy as np
import pytest
import torch
from bsharedrag import pretrain
from bsharedrag.backbone import load_backbone
from bsharedrag.lm import causal_lm_loss
from bsharedrag.pretrain import (
    PretrainSettings,
    backbone_for_run,
    build_text_mix,
    continue_pretraining,
    load_general_text,
    pack_blocks,
    pack_mix,
    perplexity,
    pretrained_backbone_path,
    save_pretrained_backbone,
    training_batch,
)


@pytest.fixture(scope="module")
def sets(small_epqa, small_ecomeval):
    return {"epqa": small_epqa, "ecomeval": small_ecomeval}


@pytest.fixture(scope="module")
def packed(sets, tiny_backbone):
    mix = build_text_mix(sets, "{title}: {text}", "pydoc", 0.1, seed=0)
    return pack_mix(mix, tiny_backbone.tokenizer, block_size=32, seed=0, max_eval_blocks=6)


def weights(bb):
    return {k: v.detach().clone() for k, v in bb.model.state_dict().items()}


@pytest.mark.parametrize("bos", [None, 2])
@pytest.mark.parametrize("block_size", [5, 16])
def test_packing_covers_every_token_once(bos, block_size):
    rng = np.random.default_rng(0)
    texts = [list(rng.integers(3, 1000, size=n)) for n in rng.integers(0, 30, size=20)]
    stream = [t for ids in texts for t in (*ids, 1)]
    blocks = pack_blocks(texts, block_size, eos_id=1, bos_id=bos, drop_last=False)
    body = [b[1:] if bos is not None else b for b in blocks]
    assert all(b[0] == bos for b in blocks) if bos is not None else True
    assert [t for b in body for t in b] == stream  # every token once, in order, EOS after each text
    assert all(len(b) == block_size for b in blocks[:-1]) and 0 < len(blocks[-1]) <= block_size
    full = pack_blocks(texts, block_size, eos_id=1, bos_id=bos)
    assert all(len(b) == block_size for b in full) and full == blocks[:len(full)]


def test_only_training_answers_enter_the_training_text(sets):
    secret = copy.deepcopy(sets)
    for ds in secret.values():  # mark every dev and test answer, keep the training ones as they are
        held = set(ds.queries.loc[ds.queries["split"] != "train", "qid"])
        ds.answers = {q: ([f"SECRET ANSWER {q}"] if q in held else a) for q, a in ds.answers.items()}
    mix = build_text_mix(secret, "{title}: {text}", "pydoc", 0.1, seed=0)
    every_text = [t for texts in (*mix.train.values(), *mix.heldout.values()) for t in texts]
    assert not [t for t in every_text if "SECRET ANSWER" in t]
    for name, ds in secret.items():
        train_answers = {a for q in ds.split("train")["qid"] for a in ds.answers.get(q, []) if a.strip()}
        assert train_answers and set(mix.train[f"{name} answers"]) == train_answers
        held = set(mix.heldout[name])
        assert held and not held & set(mix.train[f"{name} documents"])  # held-out documents are never trained on
        assert len(held) + len(mix.train[f"{name} documents"]) == len(ds.corpus)
    assert mix.heldout["general"] and not set(mix.heldout["general"]) & set(mix.train["general"])


def test_general_sources_and_a_clear_error_for_an_unknown_one(tmp_path, tally):
    assert len(load_general_text("pydoc")) > 500
    (tmp_path / "g.txt").write_text("first paragraph\nstill first\n\n\nsecond one\n")
    assert load_general_text(str(tmp_path / "g.txt")) == ["first paragraph\nstill first", "second one"]
    (tmp_path / "g.jsonl").write_text('{"text": "a"}\n\n{"text": "b", "id": 2}\n')
    assert load_general_text(str(tmp_path / "g.jsonl")) == ["a", "b"]
    tally("bad inputs tried", 3)
    with pytest.raises(ValueError, match=r"unknown general_source 'wikipedia'.*`pydoc`.*\.txt.*\.jsonl"):
        load_general_text("wikipedia")
    with pytest.raises(FileNotFoundError, match=r"general_source .*missing\.txt.*no file at .*pydoc"):
        load_general_text(str(tmp_path / "missing.txt"))
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: needs a JSON object with a \"text\" field"):
        load_general_text(str(tmp_path / "bad.jsonl"))


def test_general_blocks_come_at_the_ratio_and_the_same_whatever_the_split(packed):
    batches = [training_batch(packed, step, 8, 0.25, seed=0) for step in range(10)]
    general = {tuple(b.tolist()) for b in packed.general}
    share = np.mean([tuple(row.tolist()) in general for batch in batches for row in batch])
    assert share == pytest.approx(0.25)
    assert torch.equal(batches[3], training_batch(packed, 3, 8, 0.25, seed=0))
    assert not any(tuple(row.tolist()) in general for row in training_batch(packed, 0, 8, 0.0, seed=0))
    assert packed.domain.shape[1] == 32 and len(packed.domain) > 50


def test_training_lowers_heldout_domain_perplexity(packed, fresh):
    bb = fresh()
    before = perplexity(bb, packed.heldout["epqa"])
    # Full fine-tuning: on a random 64-dim model a LoRA moves the 262k-word output distribution too slowly to test.
    settings = PretrainSettings(method="full", block_size=32, general_ratio=0.25, learning_rate=3e-3, steps=12,
                                batch_size=4, warmup_ratio=0.0)
    out = continue_pretraining(bb, packed, settings)
    after = perplexity(bb, packed.heldout["epqa"])
    assert np.mean(out["losses"][-3:]) < np.mean(out["losses"][:3])
    assert after["perplexity"] < 0.7 * before["perplexity"]
    assert before["tokens"] == after["tokens"] > 100
    assert out["tokens"] == 12 * 4 * 32 and out["steps"] == 12 and out["method"] == "full"


def test_lora_merge_gives_a_plain_model_that_saves_and_loads_with_the_same_loss(packed, tmp_path, fresh):
    bb = fresh()
    original = weights(bb)
    settings = PretrainSettings(lora_r=4, block_size=32, learning_rate=1e-2, steps=4, batch_size=4)
    continue_pretraining(bb, packed, settings, merge=False)
    batch = packed.domain[:4]
    with torch.no_grad():
        with_adapter = float(causal_lm_loss(bb.model, batch, torch.ones_like(batch), batch))
        pretrain.merge_into_backbone(bb)
        merged = float(causal_lm_loss(bb.model, batch, torch.ones_like(batch), batch))
    assert type(bb.model).__name__ == "Gemma3ForCausalLM"
    assert not any("lora" in k for k in bb.model.state_dict())
    assert any(not torch.equal(v, original[k]) for k, v in bb.model.state_dict().items())
    target = save_pretrained_backbone(bb, tmp_path / "backbone", {"note": "test"})
    assert json.loads((target / "pretrain.json").read_text())["base_backbone"] == "tiny-random-gemma3"
    loaded = load_backbone(str(target), compute_dtype="float32")
    assert next(loaded.model.parameters()).dtype == torch.float32
    with torch.no_grad():
        reloaded = float(causal_lm_loss(loaded.model, batch, torch.ones_like(batch), batch))
    assert merged == pytest.approx(with_adapter, rel=1e-4)
    assert reloaded == pytest.approx(merged, rel=1e-6)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_resume_continues_at_the_saved_step_and_ends_with_the_weights_of_an_uninterrupted_run(
        packed, tmp_path, monkeypatch, method, tally, fresh):
    settings = PretrainSettings(method=method, lora_r=4, block_size=32, learning_rate=5e-3, steps=4, batch_size=2,
                                save_every=2)
    whole = fresh()
    continue_pretraining(whole, packed, settings, tmp_path / "whole")

    save = pretrain._save_checkpoint

    def save_then_crash(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt("killed after the first checkpoint")

    monkeypatch.setattr(pretrain, "_save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        continue_pretraining(fresh(), packed, settings, tmp_path / "cut")
    monkeypatch.undo()
    tally("faults injected")
    resumed = fresh()
    out = continue_pretraining(resumed, packed, settings, tmp_path / "cut")
    assert out["resumed_from"] == 2 and out["steps"] == 4
    want, got = weights(whole), weights(resumed)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=name)
    again = continue_pretraining(fresh(), packed, settings, tmp_path / "cut")  # a rerun finds the last step saved
    assert again["resumed_from"] == 4 and again["losses"] == out["losses"]


def test_backbone_for_run_points_at_this_runs_pretrained_backbone(tmp_path, tally):
    assert backbone_for_run("gemma3-270m", tmp_path, use_pretrained=False) == "gemma3-270m"
    tally("bad inputs tried")
    with pytest.raises(FileNotFoundError, match=r"01_pretrain/backbone.*run 01_pretrain first"):
        backbone_for_run("gemma3-270m", tmp_path, use_pretrained=True)
    path = pretrained_backbone_path(tmp_path)
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    assert backbone_for_run("gemma3-270m", tmp_path, use_pretrained=True) == str(tmp_path / "01_pretrain" / "backbone")


def test_a_checkpoint_of_other_settings_backbone_or_data_is_moved_aside_not_resumed(packed, tmp_path, fresh,
                                                                                      capsys, tally):
    settings = PretrainSettings(lora_r=4, block_size=32, steps=2, batch_size=2, save_every=2)
    first = continue_pretraining(fresh(), packed, settings, tmp_path / "ck")
    assert continue_pretraining(fresh(), packed, settings, tmp_path / "ck")["resumed_from"] == 2
    tally("runs resumed")
    fewer = pretrain.PackedMix(packed.domain[:-1], packed.general, packed.heldout, packed.counts)
    other = fresh()
    other.fingerprint = "another-backbone"
    changed = PretrainSettings(**{**settings.__dict__, "learning_rate": 1e-3})
    # Each run changes one thing from the run before it, whose checkpoint it finds.
    for label, bb, blocks, s in [("settings.learning_rate", fresh(), packed, changed),
                                 ("data", fresh(), fewer, changed), ("backbone", other, fewer, changed)]:
        out = continue_pretraining(bb, blocks, s, tmp_path / "ck")
        tally("faults injected")
        assert out["resumed_from"] == 0 and out["steps"] == 2, label
        assert f"starting fresh: the checkpoint at {tmp_path / 'ck' / 'latest'} was made with another {label};" \
            in capsys.readouterr().out
        assert (tmp_path / "ck" / "latest.stale" / "state.pt").is_file()
    assert first["steps"] == 2
