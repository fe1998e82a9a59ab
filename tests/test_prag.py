"""Parametric RAG: the exact `cat` merge of document LoRAs, the document-adapter cache (reuse, new keys, kills), the
backbone left as it was after answering, the augmentation parser with retries, and the one shared initialisation."""

import copy
import json
from dataclasses import replace

import pytest
import torch
from bsharedrag import prag
from bsharedrag.artefacts import sha256_file
from bsharedrag.backbone import Backbone, load_backbone
from bsharedrag.generator import DecodeSettings, GeneratorSettings, generate
from bsharedrag.prag import (
    META,
    WEIGHTS,
    DocumentAdapterCache,
    ParametricRAG,
    PRAGSettings,
    augment_documents,
    make_init_state,
    merged_document_sets,
    parse_qa,
    rejection_tally,
    train_document_adapter,
    training_texts,
)
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

TINY = PRAGSettings(learning_rate=1e-2, paraphrases=1, qa_pairs=1, augment_max_new_tokens=6, max_retries=1,
                    doc_max_tokens=24, train_max_tokens=48)
DOCS = [("d1", "The kettle boils a litre of water in three minutes and switches itself off."),
        ("d2", "Returns are accepted within 30 days of delivery with the original receipt."),
        ("d3", "The blender has five speeds and a pulse button for crushing ice.")]
IDS = torch.tensor([[2, 651, 7083, 35000, 1589, 236761, 506, 2360]])


@pytest.fixture(scope="module")
def bare():
    """A bare tiny backbone, and an untouched copy of its model to compare with."""
    bb = load_backbone("tiny-random-gemma3", compute_dtype="float32")
    return bb, copy.deepcopy(bb.model)


@pytest.fixture(scope="module")
def trained(bare, tmp_path_factory):
    cache = DocumentAdapterCache(tmp_path_factory.mktemp("prag"), bare[0], TINY)
    assert cache.ensure(DOCS, "en")["encoded"] == 3
    return cache


def logits(model, adapter=None):
    with torch.no_grad():
        if isinstance(model, PeftModel) and adapter is None:
            with model.disable_adapter():
                return model(input_ids=IDS).logits
        if adapter is not None:
            model.set_adapter(adapter)
        return model(input_ids=IDS).logits


def test_settings_are_validated():
    with pytest.raises(ValueError, match="lora_r=0"):
        PRAGSettings(lora_r=0)
    with pytest.raises(ValueError, match="learning_rate=-1"):
        PRAGSettings(learning_rate=-1)
    with pytest.raises(ValueError, match="target_modules"):
        PRAGSettings(target_modules=[])


def test_cat_merge_equals_each_documents_scaled_BA_added_by_hand(bare, trained):
    bb, untouched = bare
    folders = [trained.adapter_dir(text, "en") for _, text in DOCS[:2]]
    with merged_document_sets(bb, [folders], TINY) as (name,):
        assert bb.model.peft_config[name].r == 2 * TINY.lora_r
        merged = logits(bb.model, name)
    by_hand = copy.deepcopy(untouched)
    weights = dict(by_hand.named_parameters())
    scale = TINY.lora_alpha / TINY.lora_r
    with torch.no_grad():
        for folder in folders:
            state = load_file(folder / WEIGHTS)
            for key, a in state.items():
                if ".lora_A." in key:
                    b = state[key.replace(".lora_A.", ".lora_B.")]
                    weights[key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")] += scale * b @ a
    assert torch.allclose(merged, logits(by_hand), atol=1e-5)
    assert (merged - logits(untouched)).abs().max() > 1e-3  # the adapters do change the model
    assert not isinstance(bb.model, PeftModel)  # the bare backbone was wrapped for the merge and unwrapped after


def test_merged_document_loras_serve_in_the_backbones_dtype(bare, trained):
    # peft loads each document's LoRA in fp32 but builds the merge in the base layers' dtype: answering in bf16 casts
    # no LoRA input to fp32 and back (what adapters.attach_adapter avoids by loading in the backbone's dtype).
    bb, untouched = bare
    held = Backbone(bb.name, copy.deepcopy(untouched).to(torch.bfloat16), bb.tokenizer, bb.device, torch.bfloat16)
    folders = [trained.adapter_dir(text, "en") for _, text in DOCS[:2]]
    with merged_document_sets(held, [folders], TINY) as (name,):
        assert {p.dtype for n, p in held.model.named_parameters() if f".{name}." in n} == {torch.bfloat16}


def test_each_row_of_a_batch_goes_through_its_own_documents_merge_alone(bare, trained):
    bb = bare[0]
    two, one = [trained.adapter_dir(t, "en") for _, t in DOCS[:2]], [trained.adapter_dir(DOCS[2][1], "en")]
    with merged_document_sets(bb, [two, [], one, two[::-1], two], TINY) as names:
        assert names[0] == names[4] != names[2] and names[1] is None and names[3] not in (None, *names[:3])
        assert sorted(bb.model.peft_config) == sorted(["prag_holder", *{n for n in names if n}])  # documents dropped
        with torch.no_grad():
            mixed = bb.model(input_ids=IDS.repeat(len(names), 1), adapter_names=[n or "__base__" for n in names]).logits
        alone = [logits(bb.model, n)[0] for n in names]
        with pytest.raises(ValueError, match="2 adapters for 1 prompts"):
            generate(bb, ["Hi"], DecodeSettings(max_new_tokens=1), adapter=names[:2])
        with pytest.raises(ValueError, match="'nowhere'"):
            generate(bb, ["Hi", "Ho"], DecodeSettings(max_new_tokens=1), adapter=[names[0], "nowhere"])
    for row, expected in zip(mixed, alone):
        assert torch.allclose(row, expected, atol=1e-5)
    assert (alone[0] - alone[2]).abs().max() > 1e-3 and torch.allclose(alone[0], alone[3], atol=1e-5)
    assert not isinstance(bb.model, PeftModel)


def test_a_second_ensure_trains_nothing_and_changes_give_new_keys(bare, trained, monkeypatch):
    bb = bare[0]
    files = {p: (p.stat().st_mtime_ns, sha256_file(p)) for p in (trained.dir / "adapters").rglob("*") if p.is_file()}
    again = trained.ensure(DOCS, "en")
    assert again["encoded"] == 0 and again["reused"] == 3
    assert {p: (p.stat().st_mtime_ns, sha256_file(p)) for p in files} == files
    assert trained.get_or_train("d1", DOCS[0][1], "en") == trained.adapter_dir(DOCS[0][1], "en")
    meta = json.loads((trained.adapter_dir(DOCS[0][1], "en") / META).read_text())
    assert meta["doc_id"] == "d1" and meta["stats"]["steps"] >= 1 and meta["stats"]["tokens"] > 0

    changed = DOCS[0][1] + " It comes in blue."
    assert trained.key(changed, "en") != trained.key(DOCS[0][1], "en")
    assert trained.key(DOCS[0][1], "zh") != trained.key(DOCS[0][1], "en")
    elsewhere = DocumentAdapterCache(trained.dir, replace(bb, fingerprint="another-backbone"), TINY)
    assert elsewhere.key(DOCS[0][1], "en") != trained.key(DOCS[0][1], "en")
    augmented = []
    real = prag.augment_documents
    monkeypatch.setattr(prag, "augment_documents", lambda *a: augmented.append(a[1]) or real(*a))
    slower = DocumentAdapterCache(trained.dir, bb, replace(TINY, learning_rate=1e-3))
    assert slower.key(DOCS[0][1], "en") != trained.key(DOCS[0][1], "en")
    assert slower.ensure(DOCS[:1], "en")["encoded"] == 1 and augmented == []  # its augmentation is reused
    assert trained.ensure([("d1", changed)], "en")["encoded"] == 1 and augmented == [[changed]]


def test_an_adapter_folder_without_complete_metadata_is_retrained(bare, tmp_path, monkeypatch):
    cache = DocumentAdapterCache(tmp_path, bare[0], replace(TINY, max_retries=0))
    doc_id, text = DOCS[0]
    folder = cache.adapter_dir(text, "en")

    def killed(path, obj):
        raise KeyboardInterrupt("killed while writing prag.json")

    real = prag.atomic_write_json
    monkeypatch.setattr(prag, "atomic_write_json", lambda path, obj: (killed if path.name == META else real)(path, obj))
    with pytest.raises(KeyboardInterrupt):
        cache.ensure([(doc_id, text)], "en")
    monkeypatch.undo()
    assert not folder.exists() and not cache.is_cached(text, "en")  # the staged folder never became the adapter
    assert cache.ensure([(doc_id, text)], "en")["encoded"] == 1 and cache.is_cached(text, "en")

    (folder / META).unlink()  # a folder a kill left without its metadata (copied by hand, say)
    assert not cache.is_cached(text, "en")
    assert cache.ensure([(doc_id, text)], "en")["encoded"] == 1 and cache.ensure([(doc_id, text)], "en")["reused"] == 1
    meta = (folder / META).read_text()
    (folder / META).write_text(meta[:len(meta) // 2])  # a half-written one
    assert not cache.is_cached(text, "en") and cache.ensure([(doc_id, text)], "en")["encoded"] == 1
    assert json.loads((folder / META).read_text())["key"] == folder.name


def test_answering_leaves_the_backbone_and_its_adapters_as_they_were(bare, trained, monkeypatch):
    bb, untouched = bare
    shared = Backbone(bb.name, copy.deepcopy(untouched), bb.tokenizer, bb.device, bb.dtype)
    assert shared.fingerprint == bb.fingerprint
    shared.model = get_peft_model(shared.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), "retrieval")
    # the generation adapter shares two of PRAG's target modules; up_proj is wrapped by PRAG alone
    generation = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"], task_type="CAUSAL_LM")
    shared.model.add_adapter("generation", generation)
    with torch.no_grad():
        for name, p in shared.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    shared.model.set_adapter("generation")
    before = {"adapters": list(shared.model.peft_config), "active": shared.model.active_adapter,
              "grad": {n: p.requires_grad for n, p in shared.model.named_parameters()}}
    outputs = {a: logits(shared.model, a) for a in ("retrieval", "generation")}
    shared.model.set_adapter("generation")

    calls = []
    real = prag.generate
    monkeypatch.setattr(prag, "generate", lambda bb_, prompts, *a, **k: calls.append(len(prompts)) or real(bb_, prompts,
                                                                                                         *a, **k))
    rng = torch.random.get_rng_state()
    questions = ["How long does it take to boil?", "Can I return it?", "What about ice?"]
    docs = [DOCS[:2], DOCS[1::-1], DOCS[2:]]  # the first two share their documents, and their merge
    for backbone, modes in ((shared, ("parametric", "parametric_docs")), (bb, ("parametric",))):
        for batch, expected in ((8, [3]), (2, [2, 1])):
            rag = ParametricRAG(backbone, trained, GeneratorSettings(doc_max_tokens=16),
                                DecodeSettings(max_new_tokens=3, batch_size=batch))
            for mode in modes:
                calls.clear()
                out = rag.answer_many(questions, docs, "en", mode)
                assert calls == expected and len(out["answers"]) == 3
                assert all(isinstance(a, str) for a in out["answers"])
                assert len(out["latency_s"]) == 3 and out["cost"]["encoded"] == 0 and out["cost"]["reused"] == 3
            assert rag.held_adapter_mb(3) == pytest.approx((min(batch, 3) + 1) * 3 * trained.adapter_mb())  # fp32
        one = rag.answer(questions[0], DOCS[:1], "en", "parametric")
        assert isinstance(one["answer"], str) and one["latency_s"] > 0
    with pytest.raises(ValueError, match="'closed'"):
        rag.answer(questions[0], DOCS[:1], "en", "closed")

    assert torch.equal(torch.random.get_rng_state(), rng)  # PRAG's throwaway LoRA inits drew from a forked stream
    assert list(shared.model.peft_config) == before["adapters"] and shared.model.active_adapter == before["active"]
    assert {n: p.requires_grad for n, p in shared.model.named_parameters()} == before["grad"]
    for adapter, expected in outputs.items():
        assert torch.equal(logits(shared.model, adapter), expected)
    base = logits(untouched)
    assert torch.equal(logits(shared.model), base)
    assert not isinstance(bb.model, PeftModel) and torch.equal(logits(bb.model), base)


def test_augmentation_validates_outputs_retries_by_sampling_and_records_failures(bare, monkeypatch, tally):
    settings = PRAGSettings(paraphrases=1, qa_pairs=2, max_retries=2, augment_seed=5, seed=9)
    docs = ["Alpha kettle boils water.", "Beta blender crushes ice.", "Gamma toaster browns bread."]
    script = {  # (document, kind) -> output per attempt
        ("Alpha", "para"): ["A kettle that heats water."],
        ("Alpha", "qa"): [" What does it boil?\nAnswer: Water.\nQuestion: Which kettle?\nAnswer: Alpha."],
        ("Beta", "para"): ["   ", "A blender for ice."],
        ("Beta", "qa"): [" What does it crush?\n", " Which brand?\n", " Which brand?\nAnswer: Beta."],
        ("Gamma", "para"): ["Gamma toaster browns bread.", "Document: Gamma", "\nRewrite the document in other words:"],
        ("Gamma", "qa"): ["\nDocument: Gamma", "Question:\nAnswer: bread", ""],
    }
    answers = {("What does it crush?", 0): " Ice.\nQuestion: What else?", ("Which brand?", 1): "\n \n"}
    calls = []

    def fake_generate(backbone, prompts, decode, adapter=None, stop=""):
        calls.append((len(prompts), decode.do_sample, decode.seed, decode.max_new_tokens, adapter))
        attempt = decode.seed - settings.augment_seed
        outputs = []
        for p in prompts:
            if p.endswith("Answer:"):  # a question the QA completion left unanswered
                outputs.append(answers[(p.splitlines()[-2].removeprefix("Question: "), attempt)])
            else:
                outputs.append(script[(p.split()[1], "qa" if p.endswith("Question:") else "para")][attempt])
        return outputs

    monkeypatch.setattr(prag, "generate", fake_generate)
    alpha, beta, gamma = augment_documents(bare[0], docs, "en", settings)
    # each attempt: one batch of paraphrase and QA prompts, then one of answer prompts where questions were unanswered
    assert calls == [(6, False, 5, 64, None), (1, False, 5, 64, None), (4, True, 6, 64, None), (1, True, 6, 64, None),
                     (3, True, 7, 64, None)]
    assert alpha == {"paraphrases": ["A kettle that heats water."], "lang": "en", "attempts": 1, "failed": [],
                     "rejected": [],
                     "qa": [{"question": "What does it boil?", "answer": "Water."},
                            {"question": "Which kettle?", "answer": "Alpha."}]}
    assert beta["paraphrases"] == ["A blender for ice."] and beta["attempts"] == 3 and beta["failed"] == []
    # every rejected output is kept with its attempt, not only the last failure
    assert [(r["attempt"], r["kind"], r["reason"]) for r in beta["rejected"]] == [
        (0, "paraphrase", "empty"), (0, "qa", "1 of 2 pairs"), (1, "qa", "empty answer")]
    assert beta["rejected"][0]["output"] == "   "
    assert beta["qa"] == [{"question": "What does it crush?", "answer": "Ice."},
                          {"question": "Which brand?", "answer": "Beta."}]
    assert gamma["paraphrases"] == [] and gamma["qa"] == [] and gamma["attempts"] == 3
    assert {(f["kind"], f["reason"]) for f in gamma["failed"]} == {
        ("paraphrase", "prompt scaffolding only"), ("qa", "empty")}
    assert [(r["attempt"], r["kind"]) for r in gamma["rejected"]] == [
        (a, k) for a in range(3) for k in ("paraphrase", "qa")]
    assert [r for r in gamma["rejected"] if r["attempt"] == 2] == [{"attempt": 2, **f} for f in gamma["failed"]]
    assert gamma["rejected"][0]["reason"] == "a copy of the document"
    tallied = rejection_tally([alpha, beta, gamma, {"paraphrases": [], "qa": []}])  # the last: saved before tallies
    assert sum(tallied.values()) == 9 and tallied["attempt 0 (greedy): paraphrase: empty"] == 1
    assert tallied["attempt 1 (sampled): qa: empty answer"] == 1
    tally("augmentation outputs rejected", sum(tallied.values()))

    assert parse_qa("什么颜色？\n回答：蓝色。\n问题：多重？\n答案：2公斤\n文档：下一篇", "zh") == (
        [{"question": "什么颜色？", "answer": "蓝色。"}, {"question": "多重？", "answer": "2公斤"}], [])
    assert prag.clean_paraphrase("Same text.", "same  text.", [], "en") == ("", "a copy of the document")
    zh = {"lang": "zh", "paraphrases": ["改写"], "qa": [{"question": "问", "answer": "答"}]}
    assert training_texts("文档", zh) == ["文档", "改写", "文档\n问题：问\n回答：答"]


def test_listed_questions_without_answers_are_kept_and_answered_by_a_second_prompt():
    # Gemma 270M answers the Chinese QA prompt with a numbered list of questions and no answer line.
    listed = "1、这款相机适合初学者吗？\n2、它有几种颜色？\n回答：三种。\n这款相机很好用\n(3) 电池能用多久？"
    pairs, unanswered = parse_qa(listed, "zh")
    assert pairs == [{"question": "它有几种颜色？", "answer": "三种。"}]
    assert unanswered == ["这款相机适合初学者吗？", "电池能用多久？"]
    good, questions, reason = prag.valid_qa(listed, [{"question": "电池能用多久？", "answer": "一天"}], "zh")
    assert (good, questions, reason) == (pairs, ["这款相机适合初学者吗？"], "")
    assert prag.valid_qa("\n这款相机很好用。", [], "zh") == ([], [], "unparsable: no question")
    assert prag.answer_prompt("文档内容", "它有几种颜色？", "zh") == "文档：文档内容\n问题：它有几种颜色？\n回答："
    assert prag.answer_prompt("Text.", "Which?", "en") == "Document: Text.\nQuestion: Which?\nAnswer:"
    assert prag.clean_answer("\n 适合，操作简单。\n问题：别的？", "zh") == ("适合，操作简单。", "")
    assert prag.clean_answer("问题：别的？", "zh") == ("", "answer is prompt scaffolding")
    assert prag.clean_answer("  \n", "en") == ("", "empty answer")


def test_every_document_adapter_starts_from_the_one_saved_init(bare, trained):
    bb = bare[0]
    stamp = (trained.init_path.stat().st_mtime_ns, trained.init_hash)
    again = DocumentAdapterCache(trained.dir, bb, replace(TINY, learning_rate=1e-3, epochs=2))
    assert again.init_path == trained.init_path and (again.init_path.stat().st_mtime_ns, again.init_hash) == stamp
    reseeded = DocumentAdapterCache(trained.dir, bb, replace(TINY, seed=1))
    assert reseeded.init_path != trained.init_path  # another seed, another init (beside, not over, the first)
    assert len(list(trained.dir.glob("init-*.safetensors"))) == 2
    metas = [json.loads((trained.adapter_dir(t, "en") / META).read_text()) for _, t in DOCS]
    assert {m["init"] for m in metas} == {trained.init_hash}

    # with a vanishing learning rate a trained adapter is its starting point: it must be the saved init
    still = replace(TINY, learning_rate=1e-12)
    starts = [train_document_adapter(bb, t, {"lang": "en"}, still, trained.init_state)["state"] for _, t in DOCS[:2]]
    fresh = make_init_state(bb, replace(TINY, seed=1))
    a_keys = [k for k in trained.init_state if ".lora_A." in k]
    assert a_keys and all(torch.allclose(s[k], trained.init_state[k], atol=1e-8) for s in starts for k in a_keys)
    assert not any(torch.allclose(fresh[k], trained.init_state[k]) for k in a_keys)
    assert not isinstance(bb.model, PeftModel)


def test_keys_hold_the_compute_dtype_and_other_training_seeds_reuse_the_augmentation(bare, trained, monkeypatch):
    bb = bare[0]
    text = DOCS[0][1]
    bf16 = DocumentAdapterCache(trained.dir, replace(bb, dtype=torch.bfloat16), TINY)
    assert bf16.key(text, "en") != trained.key(text, "en")
    assert bf16.augmentation_key(text, "en") != trained.augmentation_key(text, "en")

    reseeded = DocumentAdapterCache(trained.dir, bb, replace(TINY, seed=1))
    assert reseeded.augmentation_key(text, "en") == trained.augmentation_key(text, "en")
    assert reseeded.key(text, "en") != trained.key(text, "en")  # another init and text order: another adapter
    augmented = []
    real = prag.augment_documents
    monkeypatch.setattr(prag, "augment_documents", lambda *a: augmented.append(a[1]) or real(*a))
    assert reseeded.ensure(DOCS, "en")["encoded"] == 3 and augmented == []  # the greedy texts are reused

    # the sampled retries have their own seed: it counts where there are retries, and only there
    resampled = DocumentAdapterCache(trained.dir, bb, replace(TINY, augment_seed=3))
    assert resampled.augmentation_key(text, "en") != trained.augmentation_key(text, "en")
    greedy = [DocumentAdapterCache(trained.dir, bb, replace(TINY, max_retries=0, augment_seed=s)) for s in (0, 3)]
    assert greedy[0].augmentation_key(text, "en") == greedy[1].augmentation_key(text, "en")
    assert greedy[0].key(text, "en") == greedy[1].key(text, "en")


def test_one_padded_batch_per_step_gives_the_token_mean_of_the_per_text_losses(bare, trained, monkeypatch):
    bb = bare[0]
    augmentation = {"lang": "en", "paraphrases": ["A kettle."],
                    "qa": [{"question": "How long does it take?", "answer": "Three minutes, then it switches off."}]}
    still = replace(TINY, learning_rate=1e-12)  # every step's loss is the loss at the shared init
    calls = []
    real = prag.causal_lm_nll

    def recorded(model, ids, mask, labels):
        total, count = real(model, ids, mask, labels)
        calls.append((float(total.detach()), count, tuple(ids.shape)))
        return total, count

    monkeypatch.setattr(prag, "causal_lm_nll", recorded)
    one = train_document_adapter(bb, DOCS[0][1], augmentation, replace(still, train_batch_size=1), trained.init_state)
    per_text, calls[:] = list(calls), []
    batched = train_document_adapter(bb, DOCS[0][1], augmentation, still, trained.init_state)
    assert one["stats"]["steps"] == 3 and batched["stats"]["steps"] == 1 and calls[0][2][0] == 3
    assert len({shape[1] for _, _, shape in per_text}) == 3  # three lengths: the batch is padded
    assert batched["stats"]["tokens"] == one["stats"]["tokens"] == sum(count for _, count, _ in per_text)
    expected = sum(total for total, _, _ in per_text) / sum(count for _, count, _ in per_text)
    assert batched["stats"]["losses"][0] == pytest.approx(expected, rel=1e-4)  # padding is never a target
    assert not isinstance(bb.model, PeftModel)


def test_encoding_cost_counts_every_used_adapter_whenever_it_was_trained(bare, trained):
    metas = [json.loads((trained.adapter_dir(t, "en") / META).read_text()) for _, t in DOCS]
    cost = trained.encoding_cost(DOCS + DOCS[:1], "en")  # a document used twice is one adapter
    assert cost["documents"] == 3
    assert cost["train_seconds"] == pytest.approx(sum(m["stats"]["seconds"] for m in metas))
    assert cost["augment_seconds"] == pytest.approx(sum(m["stats"]["augment_seconds"] for m in metas))
    assert cost["augment_seconds"] > 0 and cost["seconds"] == pytest.approx(cost["train_seconds"]
                                                                           + cost["augment_seconds"])
    assert trained.ensure(DOCS, "en")["encoded"] == 0  # a later call trains nothing but reports the same cost
    assert trained.encoding_cost(DOCS, "en") == cost
    with pytest.raises(ValueError, match="train it first"):
        trained.encoding_cost([("d9", "A document nobody encoded.")], "en")


def test_repetition_loops_are_cut_after_their_first_occurrence_and_a_text_opening_with_one_is_rejected():
    # what Gemma 270M writes greedily about EcomEval documents (run 20261203-100809-99f7f48-prag's cache)
    looped = "它在调节亮度时会发出声音，声音很明显，声音很明显，声音很明显，声音很明显，声音很"
    assert prag.cut_loop(looped) == "它在调节亮度时会发出声音，声音很明显"
    assert prag.cut_loop("A kettle. It boils water.") == "A kettle. It boils water."
    assert prag.cut_loop("Version 2016.04.01.01.01.01.01.01") == "Version 2016.04.01.01"
    assert prag.clean_paraphrase("1. 1. 1. 1. 1. 1. 1. 1. 1. 1.", "Doc.", [], "en") == ("", "a repetition loop")
    assert prag.clean_paraphrase(f"{looped}\n文档：下一篇", "文档", [], "zh") == (prag.cut_loop(looped), "")
    # the prompt's words may be copied: only the written text is checked, and copying once is no loop
    assert prag.clean_paraphrase("Alpha kettle: boils water fast.", "Alpha kettle boils water.", [], "en")[1] == ""
    good, questions, reason = prag.valid_qa(
        "我正在骑行，我正在骑行，我正在骑行，我正在骑行\n回答：好。\n问题：有几种颜色？\n回答：三种颜色，三种颜色，三种颜色，三种颜色", [], "zh")
    assert (good, questions, reason) == ([], ["有几种颜色？"], "")  # a looping question dropped, a looping answer asked again
    assert prag.valid_qa("哪个好，哪个好，哪个好，哪个好\n回答：都好。", [], "zh") == ([], [], "a repetition loop")
    assert prag.valid_qa(f"{looped}？\n回答：是的。", [], "zh")[0] == [{"question": prag.cut_loop(looped), "answer": "是的。"}]
    assert prag.clean_answer("ipad没有，所以问题是，ipad没有，所以问题是，ipad没有，所以问题是，", "zh") == ("", "a repetition loop")
    assert prag.clean_answer("有蓝牙5.2，有蓝牙5.2，有蓝牙5.2，有蓝牙5.2", "zh") == ("", "a repetition loop")
    assert prag.clean_answer("支持，支持蓝牙5.2，支持蓝牙5.2，支持蓝牙5.2", "zh") == ("支持，支持蓝牙5.2", "")


def test_the_answer_benchmark_times_both_batchings_on_judged_documents_and_reuses_their_loras(bare, small_ecomeval,
                                                                                            tmp_path):
    decode = DecodeSettings(max_new_tokens=2, batch_size=2)
    first = prag.answer_benchmark(bare[0], small_ecomeval, 2, tmp_path, decode, TINY)
    assert first["questions"] == 2 and first["documents"] == first["encoded"] > 0
    for mode in prag.MODES:
        assert first[f"{mode}_s_per_question_batch_1"] > 0 and first[f"{mode}_s_per_question_batch_2"] > 0
        assert 0 <= first[f"{mode}_same_answers"] <= 2
    assert first["held_adapter_mb_batch_2"] == pytest.approx(3 / 2 * first["held_adapter_mb_batch_1"])  # fp32
    again = prag.answer_benchmark(bare[0], small_ecomeval, 2, tmp_path, decode, TINY)
    assert again["encoded"] == 0 and again["documents"] == first["documents"]  # the cache's LoRAs, not retrained
