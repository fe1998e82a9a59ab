"""Embedding with the backbone body: pooling, padding, truncation, and any causal-LM family."""

import json

import numpy as np
import pytest
import torch

from bsharedrag.backbone import embed, load_backbone, pool, tokenize_for_embedding
from bsharedrag.devices import pick_compute_dtype

TEXTS = ["how big is the drawer?", "这款相机适合初学者吗？它的像素是多少", "a much longer product description " * 12]


def test_embedding_does_not_depend_on_padding_side_or_batch(tiny_backbone):
    tok = tiny_backbone.tokenizer
    side = tok.padding_side
    try:
        alone = embed(tiny_backbone, TEXTS, ("last", "mean"), batch_size=1)
        tok.padding_side = "left"
        left = embed(tiny_backbone, TEXTS, ("last", "mean"), batch_size=3)
        tok.padding_side = "right"
        right = embed(tiny_backbone, TEXTS, ("last", "mean"), batch_size=3)
    finally:
        tok.padding_side = side
    for p in ("last", "mean"):
        np.testing.assert_allclose(left[p], alone[p], atol=1e-5)
        np.testing.assert_allclose(right[p], alone[p], atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(alone[p], axis=1), 1.0, atol=1e-5)
    assert not np.allclose(alone["last"], alone["mean"])


def test_last_pooling_reads_the_appended_eos(tiny_backbone):
    ids = tokenize_for_embedding(tiny_backbone.tokenizer, ["hello"], 16)
    assert ids[0][-1] == tiny_backbone.tokenizer.eos_token_id
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]])
    pooled = pool(hidden, mask, "last")
    expected = torch.nn.functional.normalize(torch.stack([hidden[0, 3], hidden[1, 1]]), dim=-1)
    torch.testing.assert_close(pooled, expected)


def test_lm_head_is_never_computed_when_embedding(tiny_backbone):
    calls = []
    handle = tiny_backbone.model.get_output_embeddings().register_forward_hook(lambda *a: calls.append(1))
    try:
        embed(tiny_backbone, TEXTS[:2])
    finally:
        handle.remove()
    assert calls == []


def test_overlong_text_is_truncated_with_a_warning(tiny_backbone, tally):
    tally("bad inputs tried")
    with pytest.warns(UserWarning, match="1 of 2 texts .* truncated to 16 tokens"):
        out = embed(tiny_backbone, ["short", "word " * 100], max_length=16)
    assert np.isfinite(out["last"]).all()


def test_unknown_pooling_is_refused(tiny_backbone, tally):
    tally("bad inputs tried")
    with pytest.raises(ValueError, match="unknown pooling 'cls'"):
        embed(tiny_backbone, ["x"], ("cls",))


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_other_causal_lm_families_embed(family):
    bb = load_backbone(f"tiny-random-{family}", compute_dtype="float32")
    out = embed(bb, TEXTS, ("last",))["last"]
    assert out.shape == (3, 64) and np.isfinite(out).all()


def test_compute_dtype_request_wins_and_unknown_is_refused():
    assert pick_compute_dtype(torch.device("cpu"), "float32") == torch.float32
    assert pick_compute_dtype(torch.device("cpu"), "auto") in (torch.float32, torch.bfloat16)
    with pytest.raises(ValueError, match="compute_dtype 'fp8'"):
        pick_compute_dtype(torch.device("cpu"), "fp8")


def test_auto_dtype_is_measured_once_per_machine_and_read_back_after(tmp_path, monkeypatch):
    from bsharedrag import devices

    monkeypatch.setenv("BSHAREDRAG_CACHE", str(tmp_path))
    record = tmp_path / devices.DECISIONS
    record.write_text("{not json")  # a damaged record is measured again and rewritten
    devices._bf16_wins_on_cpu.cache_clear()
    try:
        first = devices.pick_compute_dtype(torch.device("cpu"), "auto")
        saved = json.loads(record.read_text())[devices._cpu_key()]
        assert saved["bf16_wins"] == (first == torch.bfloat16) and saved["fp32_tflops"] > 0
        # Another process (a fresh lru cache) reads the decision instead of measuring: here it could not measure.
        devices._bf16_wins_on_cpu.cache_clear()
        monkeypatch.setattr(devices, "measure_matmul_tflops", lambda *a, **k: pytest.fail("measured again"))
        record.write_text(json.dumps({devices._cpu_key(): {**saved, "bf16_wins": not saved["bf16_wins"]}}))
        assert devices.pick_compute_dtype(torch.device("cpu"), "auto") != first
    finally:
        devices._bf16_wins_on_cpu.cache_clear()


def test_fingerprint_tells_weights_apart():
    a = load_backbone("tiny-random-gemma3", compute_dtype="float32", seed=0)
    b = load_backbone("tiny-random-gemma3", compute_dtype="float32", seed=1)
    assert a.fingerprint != b.fingerprint and a.tokenizer_fingerprint == b.tokenizer_fingerprint


def test_fingerprint_is_the_same_whichever_way_the_folder_is_named(tmp_path, monkeypatch):
    saved = tmp_path / "backbone"
    load_backbone("tiny-random-gemma3", compute_dtype="float32").model.save_pretrained(saved)
    load_backbone("tiny-random-gemma3", compute_dtype="float32").tokenizer.save_pretrained(saved)
    absolute = load_backbone(str(saved), compute_dtype="float32")
    monkeypatch.chdir(tmp_path)
    relative = load_backbone("backbone", compute_dtype="float32")
    assert absolute.fingerprint == relative.fingerprint  # `bsharedrag ask outputs/<run>` meets 03's adapter


def test_a_tokenizer_is_read_once_per_process_until_its_files_change(tmp_path):
    import os

    from bsharedrag.backbone import load_tokenizer

    first = load_backbone("tiny-random-gemma3", compute_dtype="float32")
    assert load_backbone("tiny-random-gemma3", compute_dtype="float32").tokenizer is first.tokenizer  # 07: a dozen loads
    saved = tmp_path / "tokenizer"
    first.tokenizer.save_pretrained(saved)
    again = load_tokenizer(saved)
    assert again is not first.tokenizer and load_tokenizer(saved) is again
    config = saved / "tokenizer_config.json"
    os.utime(config, ns=(config.stat().st_atime_ns, config.stat().st_mtime_ns + 10**9))
    assert load_tokenizer(saved) is not again  # a rewritten tokenizer is read anew


def test_bf16_compute_holds_bf16_weights_with_the_fp32_fingerprint_and_fp32_adapters(tmp_path):
    from bsharedrag.retriever import RetrieverSettings, add_retrieval_adapter

    saved = tmp_path / "backbone"
    load_backbone("tiny-random-gemma3", compute_dtype="float32").model.save_pretrained(saved)
    load_backbone("tiny-random-gemma3", compute_dtype="float32").tokenizer.save_pretrained(saved)
    fp32 = load_backbone(str(saved), compute_dtype="float32")
    held = load_backbone(str(saved), compute_dtype="bfloat16")
    master = load_backbone(str(saved), compute_dtype="bfloat16", weights_dtype="float32")
    assert {p.dtype for p in held.model.parameters()} == {torch.bfloat16}  # no re-cast per forward pass
    assert {p.dtype for p in master.model.parameters()} == {torch.float32}
    assert fp32.fingerprint == held.fingerprint == master.fingerprint  # adapters move between the two
    model = add_retrieval_adapter(held, RetrieverSettings(lora_layers=0))
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    with pytest.raises(ValueError, match="weights_dtype 'half'"):
        load_backbone("tiny-random-gemma3", weights_dtype="half")


def test_lm_head_gets_a_dense_input_when_generation_keeps_the_last_positions(tiny_backbone):
    # The last-position view keeps the whole sequence's strides, and CPU F.linear copies the whole head weight for it.
    model, seen = tiny_backbone.model, []
    handle = model.get_output_embeddings().register_forward_hook(lambda mod, args, out: seen.append(args[0].stride()))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    try:
        with torch.inference_mode():
            kept = model(input_ids=ids, logits_to_keep=1).logits
            full = model(input_ids=ids).logits
    finally:
        handle.remove()
    assert seen[0] == (model.config.hidden_size, model.config.hidden_size, 1)
    torch.testing.assert_close(kept[:, -1], full[:, -1])
