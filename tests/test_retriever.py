"""Hard-negative mining and the retrieval adapter on tiny models and real questions."""

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from peft.helpers import disable_input_dtype_casting

from bsharedrag.backbone import load_backbone, tokenize_for_embedding
from bsharedrag.mining import MiningSettings, mine_hard_negatives, random_negatives
from bsharedrag.retriever import (RetrieverSettings, add_retrieval_adapter, attach_retrieval_adapter,
                                  global_batch, save_retrieval_adapter, train_retrieval_adapter, train_step,
                                  PooledEncoder, _encode)
from bsharedrag.systems import EncodeSettings, score_matrix


@pytest.fixture(scope="module")
def mined(small_epqa):
    train = small_epqa.queries
    scores = score_matrix(small_epqa, "bm25", train, EncodeSettings())
    return mine_hard_negatives(scores, small_epqa, train, MiningSettings(n_negatives=4, skip_top=1, max_rank=30))


def test_mined_negatives_exclude_positives_and_respect_the_margin(mined, small_epqa):
    groups, report = mined
    assert len(groups) == sum(any(g > 0 for g in small_epqa.qrels[q].values()) for q in small_epqa.queries["qid"])
    for g in groups:
        judged = small_epqa.qrels[g["qid"]]
        assert all(judged.get(d, 0) == 0 for d in g["negatives"])
        assert all(judged[p] == max(judged.values()) for p in g["positives"])
        assert 3 <= len(g["negatives"]) <= 4
    unfilled = report[report["filled"] == 0]
    assert (unfilled["negative_score_mean"] < unfilled["positive_score"] * 0.95 + 1e-6).all()
    # ePQA candidates of a question come from its own product: many hard negatives are its judged-0 candidates
    assert report["from_own_judged_set"].sum() > 0


def test_judged_negatives_come_first_and_are_judged_irrelevant(small_epqa):
    train = small_epqa.queries
    scores = score_matrix(small_epqa, "bm25", train, EncodeSettings())
    settings = MiningSettings(n_negatives=4, skip_top=1, max_rank=30, judged_negatives=True)
    groups, report = mine_hard_negatives(scores, small_epqa, train, settings)
    in_corpus = set(small_epqa.corpus["doc_id"])
    for g in groups:
        judged = small_epqa.qrels[g["qid"]]
        irrelevant = [d for d, gain in judged.items() if gain == 0 and d in in_corpus]
        taken = g["negatives"][:min(len(irrelevant), 4)]
        assert all(judged.get(d, -1) == 0 for d in taken), g["qid"]  # judged 0, not merely unjudged
        assert all(judged.get(d, 0) == 0 for d in g["negatives"])
    plain = mine_hard_negatives(scores, small_epqa, train, MiningSettings(n_negatives=4, skip_top=1, max_rank=30))[1]
    assert report["from_own_judged_set"].sum() > plain["from_own_judged_set"].sum()


def test_random_negatives_never_take_a_positive(small_epqa):
    groups = random_negatives(small_epqa, small_epqa.queries, 5, seed=1)
    for g in groups:
        assert len(g["negatives"]) == 5 and all(small_epqa.qrels[g["qid"]].get(d, 0) == 0 for d in g["negatives"])


def test_global_batch_is_the_same_split_across_processes(mined):
    groups, _ = mined
    whole = global_batch(groups, step=3, global_size=8, n_negatives=3, seed=0)
    assert len(whole) == 8 and all(len(docs) == 4 for _, docs in whole)
    assert whole == global_batch(groups, step=3, global_size=8, n_negatives=3, seed=0)
    assert whole != global_batch(groups, step=4, global_size=8, n_negatives=3, seed=0)


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_length_buckets_embed_each_row_as_if_it_were_alone_and_keep_the_order(pooling):
    bb = load_backbone("tiny-random-gemma3", compute_dtype="float32")
    rows = [list(range(5, 5 + n)) for n in (9, 3, 30, 3, 17, 1, 12)]
    encoder = PooledEncoder(bb.model, pooling)
    with torch.no_grad():
        bucketed = _encode(encoder, bb.tokenizer, rows, bb.device)
        alone = torch.cat([_encode(encoder, bb.tokenizer, [row], bb.device) for row in rows])
    torch.testing.assert_close(bucketed, alone, rtol=1e-4, atol=1e-5)


def test_peft_input_casts_off_under_autocast_change_no_bit(small_epqa):
    # 01, 03, 04 and PRAG train with peft's LoRA input casts off: under autocast they only copy a bf16 activation to
    # the fp32 adapter's dtype and back, so the embeddings and every gradient must come out the same to the last bit.
    bb = load_backbone("tiny-random-gemma3", compute_dtype="bfloat16")
    model = add_retrieval_adapter(bb, RetrieverSettings(lora_r=4))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    lora = [p for n, p in model.named_parameters() if "lora_A" in n]
    assert lora[0].dtype == torch.float32 and bb.held_dtype == torch.bfloat16  # so peft's casts do run when on
    rows = tokenize_for_embedding(bb.tokenizer, small_epqa.passages()[:6], 48, warn=False)
    model.train()
    outcome = []
    for casts in (True, False):
        with disable_input_dtype_casting(model, active=not casts), torch.autocast("cpu", dtype=torch.bfloat16):
            embeddings = _encode(PooledEncoder(model, "mean"), bb.tokenizer, rows, bb.device)
        embeddings.float().pow(2).sum().backward()
        outcome.append((embeddings.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
        model.zero_grad(set_to_none=True)
    (with_casts, grads_with), (without, grads_without) = outcome
    assert torch.equal(with_casts, without)
    assert grads_with.keys() == grads_without.keys() and all(torch.equal(grads_with[n], grads_without[n])
                                                             for n in grads_with)


def _grads(small_epqa, mined, chunk_size):
    bb = load_backbone("tiny-random-gemma3", compute_dtype="float32")
    settings = RetrieverSettings(lora_r=4, batch_size=4, n_negatives=2, chunk_size=chunk_size,
                                 passage_max_length=48, query_max_length=32)
    model = add_retrieval_adapter(bb, settings)
    torch.manual_seed(0)
    for name, p in model.named_parameters():  # LoRA B starts at zero; give it values so every gradient is non-zero
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    doc_text = dict(zip(small_epqa.corpus["doc_id"], small_epqa.passages()))
    batch = global_batch(mined[0], 0, 4, 2, 0)
    acc = Accelerator(cpu=True)
    loss = train_step(PooledEncoder(model, "last"), bb.tokenizer, batch, doc_text, settings, acc)
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_gradcache_gives_the_gradients_of_the_whole_batch(small_epqa, mined):
    loss_full, full = _grads(small_epqa, mined, 0)
    loss_gc, cached = _grads(small_epqa, mined, 3)
    assert loss_full == pytest.approx(loss_gc, rel=1e-5)
    for name in full:
        # chunks pad differently, so compare whole tensors: a wrong GradCache is off by O(1), not by rounding
        assert (cached[name] - full[name]).norm() <= 1e-3 * full[name].norm(), name


def test_training_lowers_the_loss_and_the_adapter_round_trips(tmp_path, small_epqa, mined):
    bb = load_backbone("tiny-random-gemma3", compute_dtype="float32")
    settings = RetrieverSettings(lora_r=4, steps=12, batch_size=4, n_negatives=2, learning_rate=5e-3,
                                 passage_max_length=48, query_max_length=32, save_every=6)
    doc_text = dict(zip(small_epqa.corpus["doc_id"], small_epqa.passages()))
    out = train_retrieval_adapter(bb, mined[0][:4], doc_text, settings, checkpoint_dir=tmp_path / "ckpt")
    assert len(out["losses"]) == 12 and np.mean(out["losses"][-3:]) < np.mean(out["losses"][:3])
    assert (tmp_path / "ckpt" / "latest" / "state.pt").is_file()
    target = save_retrieval_adapter(bb, settings, tmp_path / "adapter")
    assert (target / "adapter_model.safetensors").stat().st_size < 5_000_000
    fresh = load_backbone("tiny-random-gemma3", compute_dtype="float32")
    attach_retrieval_adapter(fresh, target)
    from bsharedrag.backbone import embed
    a = embed(bb, ["is it waterproof?"])["last"]
    b = embed(fresh, ["is it waterproof?"])["last"]
    np.testing.assert_allclose(a, b, atol=1e-5)
    other = load_backbone("tiny-random-gemma3", compute_dtype="float32", seed=5)
    with pytest.raises(ValueError, match="was trained on backbone .* retrain the adapter"):
        attach_retrieval_adapter(other, target)


def test_a_checkpoint_of_other_settings_or_groups_is_moved_aside_not_resumed(tmp_path, small_epqa, mined, capsys,
                                                                              tally):
    settings = RetrieverSettings(lora_r=4, steps=2, batch_size=2, n_negatives=2, passage_max_length=32,
                                 query_max_length=16, save_every=2)
    doc_text = dict(zip(small_epqa.corpus["doc_id"], small_epqa.passages()))
    groups = mined[0][:4]
    ck = tmp_path / "ckpt"
    first = train_retrieval_adapter(load_backbone("tiny-random-gemma3", compute_dtype="float32"), groups, doc_text,
                                    settings, checkpoint_dir=ck)
    again = train_retrieval_adapter(load_backbone("tiny-random-gemma3", compute_dtype="float32"), groups, doc_text,
                                    settings, checkpoint_dir=ck)
    assert again["losses"] == first["losses"] and "resumed retriever training at step 2" in capsys.readouterr().out
    tally("runs resumed")
    changed = RetrieverSettings(**{**settings.__dict__, "temperature": 0.1})
    # Each run changes one thing from the run before it, whose checkpoint it finds.
    for label, g, s in [("settings.temperature", groups, changed), ("data", mined[0][1:5], changed)]:
        out = train_retrieval_adapter(load_backbone("tiny-random-gemma3", compute_dtype="float32"), g, doc_text, s,
                                      checkpoint_dir=ck)
        tally("faults injected")
        said = capsys.readouterr().out
        assert f"was made with another {label};" in said and "resumed" not in said, label
        assert len(out["losses"]) == 2 and (ck / "latest.stale" / "state.pt").is_file()
