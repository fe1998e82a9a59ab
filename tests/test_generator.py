"""The generation adapter: prompts, training examples, answer-only SFT with trl, resume, and adapter switching on one
shared backbone (never merged)."""

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from bsharedrag.adapters import AdapterSwitch
from bsharedrag.artefacts import CHECKPOINT_FINGERPRINT
from bsharedrag.backbone import embed, load_backbone
from bsharedrag.generator import (
    GENERATION_ADAPTER,
    DecodeSettings,
    GeneratorSettings,
    answer_marker,
    attach_generation_adapter,
    batch_agreement,
    build_prompt,
    context_documents,
    decode_settings,
    generate,
    no_recomputation,
    save_generation_adapter,
    train_generation_adapter,
    training_examples,
)
from bsharedrag.lm import IGNORE, causal_lm_loss
from bsharedrag.retriever import (
    RetrieverSettings,
    add_retrieval_adapter,
    attach_retrieval_adapter,
    save_retrieval_adapter,
)
from transformers import TrainerCallback

TINY = GeneratorSettings(steps=2, batch_size=2, lora_r=4, learning_rate=1e-3, doc_max_tokens=16, answer_max_tokens=12)


def fresh():
    return load_backbone("tiny-random-gemma3", compute_dtype="float32")


def test_batch_agreement_decodes_the_same_prompts_at_each_batch_size_and_counts_shared_answers(tiny_backbone):
    prompts = ["Question: is it waterproof?\nAnswer:", "Question: how long?\nAnswer:", "Question: colour?\nAnswer:"]
    decode = DecodeSettings(max_new_tokens=4, batch_size=8)
    m = batch_agreement(lambda b: generate(tiny_backbone, prompts, replace(decode, batch_size=b)), (1, 2))
    for size in (1, 2):
        assert m["answers"][size] == generate(tiny_backbone, prompts, replace(decode, batch_size=size))
        assert m["seconds_per_answer"][size] > 0
    assert m["answers_n"] == 3 and m["same_as_first"][1] == 3
    assert m["same_as_first"][2] == sum(a == b for a, b in zip(m["answers"][1], m["answers"][2]))
    assert batch_agreement(lambda b: ["x", str(b)], (1, 2, 3))["same_as_first"] == {1: 2, 2: 1, 3: 1}
    with pytest.raises(ValueError, match=r"batch_sizes \(1, 0\)"):
        batch_agreement(lambda b: [], (1, 0))


def test_decode_settings_read_a_config_section_per_language_with_the_defaults_where_it_is_silent():
    section = {"max_new_tokens_en": 48, "max_new_tokens_zh": 96, "generation_batch_size": 16, "do_sample": True}
    assert decode_settings(section, "zh", seed=3) == DecodeSettings(max_new_tokens=96, do_sample=True, batch_size=16,
                                                                    seed=3)
    assert decode_settings(section, "en", batch_size=1) == DecodeSettings(max_new_tokens=48, do_sample=True,
                                                                          batch_size=1)
    assert decode_settings({}, "en") == DecodeSettings()
    with pytest.raises(ValueError, match="'fr'"):
        decode_settings(section, "fr")


def test_gold_documents_replace_the_lowest_ranked_retrieved_ones():
    assert context_documents(["a", "b", "c", "d"], ["x"], 3) == ["a", "b", "x"]
    assert context_documents(["a", "x", "c"], ["x", "y"], 3) == ["a", "x", "y"]
    assert context_documents(["a", "b"], [], 3) == ["a", "b"]
    assert context_documents(["a", "b", "x"], ["x", "y"], 3) == ["a", "y", "x"]
    # More gold documents than slots, and the retrieved ones already all gold: nothing is left to replace.
    assert context_documents(["g4", "g2", "a"], ["g1", "g2", "g3", "g4"], 3) == ["g4", "g2", "g1"]
    assert context_documents([], ["x"], 3) == ["x"]


def test_prompts_per_language_and_an_empty_question_is_refused(tiny_backbone):
    tok = tiny_backbone.tokenizer
    en = build_prompt("Is it waterproof?", ["A: waterproof to 10 m", "B: " + "long " * 100], "en", TINY, tok)
    assert en.startswith("Answer the question") and "[1] A: waterproof" in en and en.endswith("Answer:")
    assert len(tok(en.split("[2] ")[1].split("\n")[0])["input_ids"]) <= TINY.doc_max_tokens + 1  # cut to length
    zh = build_prompt("防水吗？", [], "zh", TINY, tok)
    assert "问题：防水吗？" in zh and "（无文档）" in zh
    assert answer_marker(TINY, "en") == "Question:" and answer_marker(TINY, "zh") == "问题："
    with pytest.raises(ValueError, match="empty"):
        build_prompt("   ", [], "en", TINY, tok)
    with pytest.raises(ValueError, match="'fr'"):
        build_prompt("q", [], "fr", TINY, tok)


def test_training_examples_use_train_answers_only(small_ecomeval, tiny_backbone):
    ds = small_ecomeval
    retrieved = {q: list(ds.corpus["doc_id"][:3]) for q in ds.queries["qid"]}
    examples = training_examples(ds, retrieved, TINY, tiny_backbone.tokenizer, "{title}: {text}")
    train = set(ds.split("train")["qid"])
    assert examples and {e["qid"] for e in examples} <= train
    held_out = [a for q in ds.queries["qid"] if q not in train for a in ds.answers.get(q, [])]
    assert not any(e["completion"].strip() in held_out for e in examples)
    # gold documents are in every prompt (include_gold)
    text = dict(zip(ds.corpus["doc_id"], ds.passages()))
    e = examples[0]
    gold = [d for d, g in ds.qrels[e["qid"]].items() if g > 0]
    assert any(text[d][:20] in e["prompt"] for d in gold)


class Crash(TrainerCallback):
    """Stops training as a crash would, right after step `at` (whose checkpoint is saved)."""

    def __init__(self, at):
        self.at = at

    def on_save(self, args, state, control, **kwargs):
        if state.global_step >= self.at:
            raise KeyboardInterrupt("injected fault")


def _lora(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def test_answer_only_loss_training_and_resume_equal_an_uninterrupted_run(small_ecomeval, tmp_path, monkeypatch, tally):
    ds = small_ecomeval
    examples = training_examples(ds, {}, TINY, fresh().tokenizer, "{title}: {text}")[:8]
    settings = GeneratorSettings(**{**TINY.__dict__, "steps": 4, "save_every": 2})
    whole = fresh()
    out = train_generation_adapter(whole, examples, settings, tmp_path / "whole")
    assert out["steps"] == 4 and len(out["losses"]) == 4 and not out["resumed"]

    from bsharedrag import generator

    trainer_class = generator._answer_only_trainer()

    def crashing():
        class Crashing(trainer_class):
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                self.add_callback(Crash(2))
        return Crashing

    broken = fresh()
    monkeypatch.setattr(generator, "_answer_only_trainer", crashing)
    with pytest.raises(KeyboardInterrupt):
        train_generation_adapter(broken, examples, settings, tmp_path / "killed")
    tally("faults injected")
    monkeypatch.undo()
    # A kill while the Trainer wrote checkpoint-4 in place: weights there, trainer_state.json (written last) not yet.
    partial = tmp_path / "killed" / "checkpoint-4"
    shutil.copytree(tmp_path / "killed" / "checkpoint-2", partial)
    (partial / "trainer_state.json").unlink()
    tally("faults injected")
    resumed = fresh()
    again = train_generation_adapter(resumed, examples, settings, tmp_path / "killed")
    tally("runs resumed")
    assert again["resumed"] and again["steps"] == 4 and len(again["losses"]) == 4
    assert (partial / "trainer_state.json").is_file()  # rewritten whole by the resumed run
    a, b = _lora(whole.model), _lora(resumed.model)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    tally("artefacts compared")


def test_micro_batches_accumulate_to_the_whole_batch_s_step(small_ecomeval, tmp_path):
    examples = training_examples(small_ecomeval, {}, TINY, fresh().tokenizer, "{title}: {text}")[:8]
    whole, split = fresh(), fresh()
    at_once = GeneratorSettings(**{**TINY.__dict__, "batch_size": 4, "steps": 2})
    a = train_generation_adapter(whole, examples, at_once, tmp_path / "whole")
    b = train_generation_adapter(split, examples, replace(at_once, micro_batch_size=1), tmp_path / "split")
    # Prompts of different lengths: padded per pass, so the passes see other padding, and the loss is token-weighted.
    assert len({len(e["prompt"]) for e in examples[:4]}) > 1
    np.testing.assert_allclose(b["losses"], a["losses"], rtol=1e-5)
    x, y = _lora(whole.model), _lora(split.model)
    assert x.keys() == y.keys() and all(torch.allclose(x[k], y[k], atol=1e-6) for k in x)
    # At its default the setting is left out of the checkpoint fingerprint: checkpoints made before it still resume.
    saved = json.loads((tmp_path / "whole" / CHECKPOINT_FINGERPRINT).read_text())["settings"]
    assert "micro_batch_size" not in saved
    assert json.loads((tmp_path / "split" / CHECKPOINT_FINGERPRINT).read_text())["settings"]["micro_batch_size"] == 1
    with pytest.raises(ValueError, match=r"micro_batch_size = 3 must divide batch_size = 4 \(one of 1, 2, 4\)"):
        replace(at_once, micro_batch_size=3)


def test_sft_masks_the_prompt_and_the_loss_is_the_models_own(small_epqa):
    from bsharedrag.generator import _answer_only_trainer
    from datasets import Dataset
    from trl import SFTConfig

    bb = fresh()
    examples = training_examples(small_epqa, {}, TINY, bb.tokenizer, "{title}: {text}")[:4]
    from bsharedrag.generator import add_generation_adapter

    model = add_generation_adapter(bb, TINY)
    args = SFTConfig(output_dir="/tmp/unused-sft", use_cpu=True, report_to=[], completion_only_loss=True, max_length=None)
    data = Dataset.from_list([{"prompt": e["prompt"], "completion": e["completion"]} for e in examples])
    trainer = _answer_only_trainer()(model=model, args=args, train_dataset=data, processing_class=bb.tokenizer)
    # the collated batch, not the dataset row: trl 1.0 keeps a completion_mask there and builds labels in its collator
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    answer_ids = bb.tokenizer(examples[0]["completion"], add_special_tokens=False)["input_ids"]
    targets = [t for t in batch["labels"][0].tolist() if t != IGNORE]
    assert targets[-1] == bb.tokenizer.eos_token_id and len(targets) <= len(answer_ids) + 2
    ours = trainer.compute_loss(model, dict(batch))
    reference = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert float(ours) == pytest.approx(float(reference), rel=1e-4)
    assert float(causal_lm_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])) == pytest.approx(
        float(reference), rel=1e-4)


def test_adapters_switch_on_one_backbone_exactly_as_if_each_were_alone(small_ecomeval, tmp_path):
    ds = small_ecomeval
    tok = fresh().tokenizer
    examples = training_examples(ds, {}, TINY, tok, "{title}: {text}")[:4]
    gen_bb = fresh()
    train_generation_adapter(gen_bb, examples, TINY, tmp_path / "ck")
    save_generation_adapter(gen_bb, TINY, tmp_path / "generation")
    ret_bb = fresh()
    add_retrieval_adapter(ret_bb, RetrieverSettings(lora_r=4))
    with torch.no_grad():  # a retrieval adapter that is not the identity
        for name, p in ret_bb.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    save_retrieval_adapter(ret_bb, RetrieverSettings(lora_r=4), tmp_path / "retrieval")

    prompts = [e["prompt"] for e in examples[:3]]
    decode = DecodeSettings(max_new_tokens=5, batch_size=2)
    alone_gen = generate(gen_bb, prompts, decode, GENERATION_ADAPTER)
    alone_emb = embed(ret_bb, prompts)["last"]

    shared = fresh()
    attach_retrieval_adapter(shared, tmp_path / "retrieval", "retrieval")
    attach_generation_adapter(shared, tmp_path / "generation")
    for _ in range(2):  # back and forth: nothing is merged, nothing drifts
        shared.model.set_adapter("retrieval")
        assert np.allclose(embed(shared, prompts)["last"], alone_emb, atol=1e-5)
        assert generate(shared, prompts, decode, GENERATION_ADAPTER) == alone_gen
    switch = AdapterSwitch(shared.model)  # the pipeline's fast switch gives the same outputs
    for _ in range(2):
        switch("retrieval")
        assert shared.model.active_adapter == "retrieval"
        assert np.allclose(embed(shared, prompts)["last"], alone_emb, atol=1e-5)
        switch(GENERATION_ADAPTER)
        assert generate(shared, prompts, decode, GENERATION_ADAPTER) == alone_gen
    with pytest.raises(ValueError, match="not attached"):
        switch("nope")
    base = generate(shared, prompts, decode, None)
    assert base == generate(fresh(), prompts, decode, None)  # adapters off: the untouched backbone

    other = load_backbone("tiny-random-gemma3", compute_dtype="float32", seed=1)
    with pytest.raises(ValueError, match="trained on backbone"):
        attach_generation_adapter(other, tmp_path / "generation")
    with pytest.raises(FileNotFoundError, match="04_generator"):
        attach_generation_adapter(other, tmp_path / "nowhere")


def test_checkpoints_of_other_examples_or_settings_are_moved_aside_not_resumed(small_ecomeval, tmp_path, capsys,
                                                                                 tally):
    examples = training_examples(small_ecomeval, {}, TINY, fresh().tokenizer, "{title}: {text}")[:4]
    settings = GeneratorSettings(**{**TINY.__dict__, "steps": 2, "save_every": 2})
    ck = tmp_path / "ck"
    train_generation_adapter(fresh(), examples, settings, ck)
    assert train_generation_adapter(fresh(), examples, settings, ck)["resumed"]
    tally("runs resumed")
    for label, e, s in [("data", examples[1:], settings),
                        ("settings.lora_r", examples[1:], GeneratorSettings(**{**settings.__dict__, "lora_r": 2}))]:
        capsys.readouterr()
        out = train_generation_adapter(fresh(), e, s, ck)
        tally("faults injected")
        assert not out["resumed"] and out["steps"] == 2, label
        assert f"checkpoint at {ck} was made with another {label};" in capsys.readouterr().out
        assert list((tmp_path / "ck.stale").glob("checkpoint-2"))


def test_recomputation_is_turned_off_by_the_name_this_transformers_gives_it(tmp_path):
    from dataclasses import dataclass

    from trl import SFTConfig

    @dataclass
    class Older:  # transformers 5.17's TrainingArguments (seen on the GPU machine) had only the old name
        gradient_checkpointing: bool = False

    assert no_recomputation(Older) == {"gradient_checkpointing": False}
    installed = no_recomputation(SFTConfig)  # the installed version takes its own name
    assert SFTConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, **installed)
