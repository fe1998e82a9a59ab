"""The CUDA paths of training, encoding, decoding, Parametric RAG and faiss on a tiny model; skipped without a GPU.

On a GPU the backbone runs in bf16 (fp16 where bf16 is missing) under autocast with fp32 trainable weights, trl's
trainer takes the bf16 branch, accelerate places the model, and faiss-gpu shards the index. CPU tests cover the logic;
these check that the same calls run on CUDA and agree with the CPU within the precision of the compute dtype.
Synthetic texts: the data mirror need not be on the GPU machine.
"""

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

DOCS = {f"d{i}": text for i, text in enumerate([
    "The kettle boils a litre of water in three minutes and switches itself off.",
    "Returns are accepted within 30 days of delivery with the original receipt.",
    "The blender has five speeds and a pulse button for crushing ice.",
    "This backpack holds a 15-inch laptop and has a waterproof bottom.",
    "The charger delivers 65 watts over USB-C and folds its plug away.",
    "These headphones cancel noise and last 30 hours on one charge.",
    "The pan is non-stick, oven-safe to 260 degrees and fits induction hobs.",
    "The lamp dims in five steps and its arm turns 180 degrees.",
])}
QUESTIONS = ["how long does the kettle take?", "can I return it after a month?", "does it crush ice?",
             "will my laptop fit?", "how many watts?", "how long does the battery last?", "induction?", "does it dim?"]


def cuda_backbone(seed: int = 0):
    from bsharedrag.backbone import load_backbone

    bb = load_backbone("tiny-random-gemma3", device="cuda", seed=seed)
    assert bb.device.type == "cuda"
    assert bb.dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    return bb


def cpu_backbone(seed: int = 0):
    from bsharedrag.backbone import load_backbone

    return load_backbone("tiny-random-gemma3", device="cpu", compute_dtype="float32", seed=seed)


def groups() -> list[dict]:
    ids = list(DOCS)
    return [{"qid": f"q{i}", "query": q, "positives": [ids[i]], "negatives": [d for d in ids if d != ids[i]][:4]}
            for i, q in enumerate(QUESTIONS)]


def tiny_prag_settings():
    """Parametric RAG's settings at the tiny model's size: one paraphrase and one QA pair, a few tokens each."""
    from bsharedrag.prag import PRAGSettings

    return PRAGSettings(learning_rate=1e-2, paraphrases=1, qa_pairs=1, augment_max_new_tokens=6, max_retries=1,
                        doc_max_tokens=24, train_max_tokens=48)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_retrieval_adapter_trains_on_cuda_and_embeds_as_on_the_cpu(tmp_path):
    from bsharedrag.backbone import embed
    from bsharedrag.index import build_dense_index, load_dense_index, search_dense
    from bsharedrag.retriever import RetrieverSettings, attach_retrieval_adapter, save_retrieval_adapter, \
        train_retrieval_adapter

    settings = RetrieverSettings(lora_r=8, steps=30, batch_size=4, n_negatives=2, learning_rate=1e-2,
                                 passage_max_length=48, query_max_length=32, pooling="mean", save_every=10)
    bb = cuda_backbone()
    out = train_retrieval_adapter(bb, groups(), DOCS, settings, checkpoint_dir=tmp_path / "ckpt")
    losses = np.array(out["losses"])
    assert len(losses) == 30 and np.isfinite(losses).all() and losses[-5:].mean() < losses[:5].mean()
    trainable = [p for p in bb.model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 and p.is_cuda for p in trainable)  # fp32 master weights
    target = save_retrieval_adapter(bb, settings, tmp_path / "adapter")

    texts = list(DOCS.values())
    on_gpu = embed(bb, texts, ("mean",))["mean"]
    cpu = cpu_backbone()
    attach_retrieval_adapter(cpu, target)  # the adapter trained on CUDA loads on the CPU, same backbone fingerprint
    on_cpu = embed(cpu, texts, ("mean",))["mean"]
    assert cosine_rows(on_gpu, on_cpu).min() > 0.99, cosine_rows(on_gpu, on_cpu)

    build_dense_index(on_gpu, list(DOCS), {"backbone": bb.fingerprint}, tmp_path / "index")
    index, doc_of, _ = load_dense_index(tmp_path / "index", {"backbone": bb.fingerprint})
    queries = embed(bb, QUESTIONS, ("mean",))["mean"]
    top = [hits[0][0] for hits in search_dense(index, doc_of, queries, 1)]
    assert sum(t == d for t, d in zip(top, DOCS)) >= 6, top  # trained on exactly these pairs


def test_generation_adapter_trains_with_trl_in_the_cuda_dtype_and_decodes(tmp_path):
    from bsharedrag.generator import DecodeSettings, GeneratorSettings, attach_generation_adapter, generate, \
        save_generation_adapter, train_generation_adapter
    from bsharedrag.lm import causal_lm_loss

    settings = GeneratorSettings(steps=12, batch_size=4, lora_r=8, learning_rate=1e-2, save_every=6)
    examples = [{"prompt": f"{text}\nQuestion: {q}\nAnswer:", "completion": " " + text.split(" ", 3)[-1]}
                for text, q in zip(DOCS.values(), QUESTIONS)]
    bb = cuda_backbone()
    out = train_generation_adapter(bb, examples, settings, tmp_path / "ckpt")
    assert out["steps"] == 12 and np.isfinite(out["losses"]).all() and out["losses"][-1] < out["losses"][0]
    save_generation_adapter(bb, settings, tmp_path / "generation")
    answers = generate(bb, [e["prompt"] for e in examples], DecodeSettings(max_new_tokens=6, batch_size=3),
                       "generation")
    assert len(answers) == len(examples) and all(isinstance(a, str) for a in answers)

    cpu = cpu_backbone()
    attach_generation_adapter(cpu, tmp_path / "generation")
    cpu.model.set_adapter("generation")
    ids = cpu.tokenizer([examples[0]["prompt"] + examples[0]["completion"]], return_tensors="pt")
    with torch.no_grad():
        on_cpu = float(causal_lm_loss(cpu.model, ids["input_ids"], ids["attention_mask"], ids["input_ids"]))
        bb.model.set_adapter("generation")
        with torch.autocast("cuda", dtype=bb.dtype):
            on_gpu = float(causal_lm_loss(bb.model, ids["input_ids"].cuda(), ids["attention_mask"].cuda(),
                                          ids["input_ids"].cuda()))
    assert abs(on_gpu - on_cpu) < 0.02 * on_cpu, (on_gpu, on_cpu)


def test_fully_shared_lora_takes_both_losses_on_cuda(tmp_path):
    from bsharedrag.fullyshared import train_fully_shared
    from bsharedrag.generator import GeneratorSettings
    from bsharedrag.retriever import RetrieverSettings

    examples = [{"prompt": f"{text}\nQuestion: {q}\nAnswer:", "completion": " yes"}
                for text, q in zip(DOCS.values(), QUESTIONS)]
    out = train_fully_shared(cuda_backbone(), 0.5, groups(), DOCS, examples,
                             RetrieverSettings(lora_r=4, steps=4, batch_size=4, n_negatives=2, learning_rate=1e-3,
                                               passage_max_length=48, query_max_length=32),
                             GeneratorSettings(batch_size=2), tmp_path / "ckpt")
    assert len(out["losses"]) == 4 and np.isfinite(out["losses"]).all()


def test_parametric_rag_trains_merges_and_answers_on_cuda(tmp_path):
    from bsharedrag.generator import DecodeSettings, GeneratorSettings
    from bsharedrag.prag import DocumentAdapterCache, ParametricRAG

    settings = tiny_prag_settings()
    bb = cuda_backbone()
    before = {n: p.detach().clone() for n, p in bb.model.named_parameters()}
    cache = DocumentAdapterCache(tmp_path, bb, settings)
    docs = list(DOCS.items())[:3]
    assert cache.ensure(docs, "en")["encoded"] == 3
    rag = ParametricRAG(bb, cache, GeneratorSettings(doc_max_tokens=16), DecodeSettings(max_new_tokens=4))
    for mode in ("parametric", "parametric_docs"):
        out = rag.answer(QUESTIONS[0], docs[:2], "en", mode)
        assert isinstance(out["answer"], str) and out["latency_s"] > 0
    after = dict(bb.model.named_parameters())
    assert set(after) == set(before) and all(torch.equal(after[n], before[n]) for n in before)  # removed after


def test_a_batch_of_questions_each_with_its_own_document_merge_runs_on_cuda_as_each_alone(tmp_path):
    """The batched answering path: one forward over rows that each go through a different merged LoRA (peft's
    adapter_names), in the CUDA compute dtype, gives each row what its merge alone gives."""
    from peft import PeftModel

    from bsharedrag.generator import DecodeSettings, GeneratorSettings
    from bsharedrag.prag import DocumentAdapterCache, ParametricRAG, merged_document_sets

    settings = tiny_prag_settings()
    bb = cuda_backbone()
    cache = DocumentAdapterCache(tmp_path, bb, settings)
    docs = list(DOCS.items())[:3]
    cache.ensure(docs, "en")
    ids = bb.tokenizer([QUESTIONS[0]], return_tensors="pt")["input_ids"].cuda()
    sets = [[cache.adapter_dir(t, "en") for _, t in docs[:2]], [], [cache.adapter_dir(docs[2][1], "en")]]
    with merged_document_sets(bb, sets, settings) as names, torch.no_grad():
        assert bb.model.peft_config[names[0]].r == 2 * settings.lora_r  # cat: the two documents' ranks side by side
        mixed = bb.model(input_ids=ids.repeat(3, 1), adapter_names=[n or "__base__" for n in names]).logits.float()
        alone = []
        for name in names:
            if name is None:
                with bb.model.disable_adapter():
                    alone.append(bb.model(input_ids=ids).logits[0].float())
            else:
                bb.model.set_adapter(name)
                alone.append(bb.model(input_ids=ids).logits[0].float())
    scale = max(float(a.abs().max()) for a in alone)
    for row, expected in zip(mixed, alone):  # bf16 products of another batch shape may round apart, no further
        assert float((row - expected).abs().max()) < 0.02 * scale, float((row - expected).abs().max())
    assert float((alone[0] - alone[2]).abs().max()) > 0.05 * scale  # the merges differ, so the check can tell
    assert not isinstance(bb.model, PeftModel)

    questions = QUESTIONS[:3]
    per_question = [docs[:2], docs[1:], docs[2:]]
    for mode in ("parametric", "parametric_docs"):
        answers = {b: ParametricRAG(bb, cache, GeneratorSettings(doc_max_tokens=16),
                                    DecodeSettings(max_new_tokens=4, batch_size=b)).answer_many(
                                        questions, per_question, "en", mode)["answers"] for b in (1, 3)}
        assert all(len(a) == 3 and all(isinstance(x, str) for x in a) for a in answers.values())


def test_faiss_gpu_shards_search_as_the_cpu_index_does(tmp_path):
    import faiss

    from bsharedrag.index import build_dense_index, load_dense_index, search_dense, to_gpus

    if not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() == 0:
        pytest.skip("faiss without GPU support (faiss-cpu); install faiss-gpu")
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((5000, 64)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"doc{i}" for i in range(len(vectors))]
    build_dense_index(vectors, ids, {}, tmp_path / "index")
    index, doc_of, _ = load_dense_index(tmp_path / "index")
    queries = vectors[:50] + 0.1 * rng.standard_normal((50, 64)).astype(np.float32)
    on_cpu = search_dense(index, doc_of, queries, 10)
    on_gpu = search_dense(to_gpus(index), doc_of, queries, 10)
    assert [[d for d, _ in row] for row in on_gpu] == [[d for d, _ in row] for row in on_cpu]
