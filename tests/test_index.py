"""faiss indexes with manifests, BM25, and the systems built from them on small real data."""

import json

import numpy as np
import pytest

from bsharedrag.artefacts import atomic_dir
from bsharedrag.bm25 import bm25_tokens, build_bm25, search_bm25
from bsharedrag.encoders import BackboneEncoder
from bsharedrag.index import (IndexMismatchError, build_dense_index, check_queries, load_dense_index, search_dense,
                              set_search_parameters)
from bsharedrag.metrics import evaluate_retrieval
from bsharedrag.systems import EncodeSettings, build_indexes, retrieve


def _vectors(n=50, dim=16, seed=0):
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat", "HNSW8"])
def test_dense_index_finds_each_vector_itself(tmp_path, factory):
    vectors, ids = _vectors(), [f"d{i}" for i in range(50)]
    build_dense_index(vectors, ids, {"encoder": "x", "corpus_hash": "h"}, tmp_path / "idx", factory)
    index, doc_ids, manifest = load_dense_index(tmp_path / "idx", expected={"encoder": "x", "corpus_hash": "h"})
    if factory.startswith("IVF"):
        set_search_parameters(index, nprobe=4)
    hits = search_dense(index, doc_ids, vectors[:5], k=3)
    assert [h[0][0] for h in hits] == ids[:5]
    assert manifest["factory"] == factory and manifest["dim"] == 16 and manifest["count"] == 50


def test_index_built_by_another_encoder_or_corpus_is_refused(tmp_path, tiny_backbone, tally):
    tally("bad inputs tried")
    enc = BackboneEncoder(tiny_backbone, "last")
    build_dense_index(_vectors(dim=64), [f"d{i}" for i in range(50)], {**enc.identity, "corpus_hash": "h1"}, tmp_path / "i")
    other = BackboneEncoder(tiny_backbone, "mean")
    with pytest.raises(IndexMismatchError, match=r"pooling: built with 'last', now 'mean'.*rerun 05_index"):
        load_dense_index(tmp_path / "i", expected={**other.identity, "corpus_hash": "h1"})
    with pytest.raises(IndexMismatchError, match="corpus_hash"):
        load_dense_index(tmp_path / "i", expected={**enc.identity, "corpus_hash": "h2"})
    with pytest.raises(IndexMismatchError, match="adapter: built with None, now 'retrieval'"):
        load_dense_index(tmp_path / "i", expected={**enc.identity, "adapter": "retrieval", "corpus_hash": "h1"})
    # the same weights named by another path (a moved run folder, a relative path) are the same encoder
    load_dense_index(tmp_path / "i", expected={**enc.identity, "backbone": "elsewhere/01_pretrain/backbone",
                                               "corpus_hash": "h1"})


def test_duplicate_doc_ids_are_refused(tmp_path, tally):
    tally("bad inputs tried")
    with pytest.raises(ValueError, match="doc ids repeat"):
        build_dense_index(_vectors(3), ["a", "b", "a"], {}, tmp_path / "i")


@pytest.mark.parametrize("queries, message", [([], "query list is empty"), (["ok", "  \n"], "query 1 is empty"),
                                               (["ok", b"\xff\xfe"], "query 1 is bytes, not text"),
                                               (["ok", "why? " * 820], "query 1 is 4100 characters long, over the "
                                                                      "limit of 4096")])
def test_empty_queries_are_refused(queries, message, tally):
    tally("bad inputs tried")
    with pytest.raises(ValueError, match=message):
        check_queries(queries)


def test_a_failed_rebuild_leaves_the_old_index_whole(tmp_path):
    target = tmp_path / "idx"
    build_dense_index(_vectors(), [f"d{i}" for i in range(50)], {"encoder": "old"}, target)
    before = (target / "manifest.json").read_text()
    with pytest.raises(RuntimeError), atomic_dir(target) as staging:
        (staging / "manifest.json").write_text("{}")
        raise RuntimeError("killed mid-build")
    assert (target / "manifest.json").read_text() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_bm25_tokenises_both_languages():
    assert bm25_tokens("The drawers are fitting", "en") == ["drawer", "fit"]
    assert "相机" in bm25_tokens("这款相机适合初学者", "zh")


def test_bm25_ranks_the_matching_document_first_and_handles_unmatched_queries(tmp_path):
    docs = ["the crisper drawer fits frigidaire fridges", "a red cotton t-shirt", "索尼相机 画质 很好"]
    build_bm25(docs, ["a", "b", "c"], "en", tmp_path / "bm25")
    hits = search_bm25(tmp_path / "bm25", ["does the drawer fit my fridge", "zzzz qqqq", "索尼相机"], k=2)
    assert hits[0][0][0] == "a" and hits[1] == [] and hits[2][0][0] == "c"


def test_systems_build_and_search_on_real_questions(tmp_path, small_epqa, tiny_backbone):
    settings = EncodeSettings(max_length=64, batch_size=32)
    costs = build_indexes(small_epqa, ["bm25", "backbone_last", "backbone_mean"], tmp_path, settings, tiny_backbone)
    assert list(costs["system"]) == ["bm25", "backbone_last", "backbone_mean"]
    manifest = json.loads((tmp_path / "epqa" / "backbone_mean" / "manifest.json").read_text())
    assert manifest["pooling"] == "mean" and manifest["count"] == len(small_epqa.corpus)
    queries = small_epqa.queries
    bm25_run = retrieve(small_epqa, "bm25", tmp_path, queries, settings, k=10)
    assert evaluate_retrieval(bm25_run, small_epqa.qrels)["hit@5"] > 0.5  # 30 questions over ~300 documents
    dense = retrieve(small_epqa, "backbone_last", tmp_path, queries, settings, k=10, backbone=tiny_backbone)
    assert all(len(r) == 10 for r in dense.values())
    with pytest.raises(IndexMismatchError, match="max_length"):
        retrieve(small_epqa, "backbone_last", tmp_path, queries, EncodeSettings(max_length=32), k=10,
                 backbone=tiny_backbone)


@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat"])
def test_add_replace_delete_by_doc_id_equals_a_rebuild(tmp_path, factory):
    from bsharedrag.index import update_dense_index

    vectors, ids = _vectors(60), [f"d{i}" for i in range(60)]
    ident = {"encoder": "x", "corpus_hash": "before"}
    build_dense_index(vectors[:50], ids[:50], ident, tmp_path / "live", factory)
    replaced = _vectors(3, seed=9)
    upserts = {"d3": replaced[0], "d7": replaced[1], **{ids[i]: vectors[i] for i in range(50, 60)}}
    manifest = update_dense_index(tmp_path / "live", upserts, ["d0", "d10", "d20"], "after", {"encoder": "x"})
    assert manifest["count"] == 57 and manifest["corpus_hash"] == "after"
    final = {d: v for d, v in zip(ids, vectors) if d not in {"d0", "d10", "d20"}}
    final.update({"d3": replaced[0], "d7": replaced[1]})
    build_dense_index(np.stack(list(final.values())), list(final), {"encoder": "x", "corpus_hash": "after"},
                      tmp_path / "rebuilt", "Flat")
    live, live_docs, _ = load_dense_index(tmp_path / "live", expected={"encoder": "x", "corpus_hash": "after"})
    rebuilt, rebuilt_docs, _ = load_dense_index(tmp_path / "rebuilt")
    if factory.startswith("IVF"):
        set_search_parameters(live, nprobe=4)  # every list: exact
    queries = _vectors(20, seed=3)
    got, want = search_dense(live, live_docs, queries, 10), search_dense(rebuilt, rebuilt_docs, queries, 10)
    assert [[d for d, _ in row] for row in got] == [[d for d, _ in row] for row in want]
    np.testing.assert_allclose([[s for _, s in row] for row in got], [[s for _, s in row] for row in want], atol=1e-6)
    with pytest.raises(IndexMismatchError, match="corpus_hash"):
        load_dense_index(tmp_path / "live", expected={"corpus_hash": "before"})
    with pytest.raises(KeyError, match="d0"):
        update_dense_index(tmp_path / "live", {}, ["d0"], "again", {"encoder": "x"})


def _toy(docs):
    import pandas as pd

    from bsharedrag.data import RetrievalDataset

    corpus = pd.DataFrame([(d, t, x, "en") for d, t, x in docs], columns=["doc_id", "title", "text", "lang"])
    queries = pd.DataFrame({"qid": ["q1"], "text": ["drawer"], "split": ["test"]})
    return RetrievalDataset("toy", "en", corpus, queries, {"q1": {"a": 1}})


GOOD = [("a", "Drawer", "the crisper drawer fits"), ("b", "Shirt", "a red cotton t-shirt"),
        ("c", "", "索尼相机 画质")]


@pytest.mark.parametrize("bad, message", [
    (("d", "", ""), r"document 'd' is empty or whitespace-only.*rebuild the index with 05_index"),
    (("d", " \t", "\n  "), r"document 'd' is empty or whitespace-only"),
    (("d", "Title", b"\xff\xfe not utf-8"), r"document 'd': its text is bytes, not text.*decode it to str \(UTF-8\)"),
    (("a", "Again", "a second document a"), r"doc ids repeat \('a'\).*unique doc_id"),
])
def test_a_corpus_with_an_empty_non_text_or_repeated_document_is_refused_before_any_encoding(
        tmp_path, tiny_backbone, monkeypatch, bad, message, tally):
    settings = EncodeSettings(max_length=32)
    build_indexes(_toy(GOOD), ["bm25", "backbone_mean"], tmp_path, settings, tiny_backbone)
    before = {p: p.read_bytes() for p in sorted((tmp_path / "toy").rglob("*")) if p.is_file()}
    import bsharedrag.systems

    monkeypatch.setattr(bsharedrag.systems, "embed", lambda *a, **k: pytest.fail("encoded a refused corpus"))
    tally("bad inputs tried")
    with pytest.raises(ValueError, match=message):
        build_indexes(_toy(GOOD + [bad]), ["bm25", "backbone_mean"], tmp_path, settings, tiny_backbone)
    assert {p: p.read_bytes() for p in sorted((tmp_path / "toy").rglob("*")) if p.is_file()} == before
    tally("artefacts compared")


@pytest.mark.parametrize("passages, doc_ids, message", [
    (["one drawer", "two drawers"], ["a", "a"], r"doc ids repeat \('a'\)"),
    (["one drawer", "   "], ["a", "b"], r"document 'b' is empty or whitespace-only"),
    (["one drawer", b"two"], ["a", "b"], r"document 'b': its text is bytes"),
])
def test_bm25_refuses_repeated_ids_and_empty_or_non_text_passages(tmp_path, passages, doc_ids, message, tally):
    tally("bad inputs tried")
    with pytest.raises(ValueError, match=message):
        build_bm25(passages, doc_ids, "en", tmp_path / "bm25")
    assert not (tmp_path / "bm25").exists()
