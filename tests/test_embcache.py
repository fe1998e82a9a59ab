"""Encoded corpus shards are saved as they finish and reused by a later or resumed step; a damaged one is redone."""

import numpy as np
import pytest

from bsharedrag import embcache, encoders
from bsharedrag.embcache import encode_cached
from bsharedrag.encoders import BackboneEncoder


def test_shards_are_reused_and_a_damaged_one_is_encoded_again(tmp_path, monkeypatch, tally):
    monkeypatch.setattr(embcache, "SHARD", 4)
    calls = []

    def encode(texts):
        calls.append(len(texts))
        return np.array([[len(t), i] for i, t in enumerate(texts)], dtype=np.float32)

    texts = [f"document {i}" for i in range(10)]
    first, counts = encode_cached(encode, texts, {"encoder": "x"}, tmp_path), {}
    assert calls == [4, 4, 2]
    again = encode_cached(encode, texts, {"encoder": "x"}, tmp_path, counts)
    assert calls == [4, 4, 2] and counts == {"reused": 3, "encoded": 0} and np.array_equal(first, again)
    shard = sorted((tmp_path).rglob("*.npy"))[0]
    shard.write_bytes(b"truncated")  # as a kill during a non-atomic write would leave it
    tally("bad inputs tried")
    counts = {}
    redone = encode_cached(encode, texts, {"encoder": "x"}, tmp_path, counts)
    assert counts == {"reused": 2, "encoded": 1} and np.array_equal(first, redone)
    tally("artefacts compared")
    encode_cached(encode, texts, {"encoder": "y"}, tmp_path)  # another encoder never reads these shards
    assert calls[-3:] == [4, 4, 2]


def test_backbone_encoder_reuses_its_passage_shards(tiny_backbone, tmp_path):
    enc = BackboneEncoder(tiny_backbone, "mean", max_length=32, cache_dir=str(tmp_path))
    texts = [f"passage number {i} about a phone" for i in range(7)]
    first = enc.encode_passages(texts)
    assert len(list(tmp_path.rglob("*.npy"))) == 1
    assert np.allclose(enc.encode_passages(texts), first)
    assert np.allclose(BackboneEncoder(tiny_backbone, "mean", max_length=32).encode_passages(texts), first, atol=1e-5)


def test_the_same_weights_loaded_from_another_path_reuse_the_shards(tiny_backbone, tmp_path, monkeypatch):
    texts = [f"passage number {i} about a phone" for i in range(5)]
    BackboneEncoder(tiny_backbone, "mean", max_length=32, cache_dir=str(tmp_path)).encode_passages(texts)
    monkeypatch.setattr(tiny_backbone, "name", "/elsewhere/the-same-backbone")
    moved = BackboneEncoder(tiny_backbone, "mean", max_length=32, cache_dir=str(tmp_path))
    monkeypatch.setattr(encoders, "embed", lambda *a, **k: pytest.fail("the cached shard was encoded again"))
    assert moved.encode_passages(texts).shape[0] == 5


def test_a_cached_shard_of_nans_or_of_another_width_is_encoded_again(tmp_path, monkeypatch, tally):
    monkeypatch.setattr(embcache, "SHARD", 4)

    def encode(texts):
        return np.array([[len(t), i, 1.0] for i, t in enumerate(texts)], dtype=np.float32)

    texts = [f"document {i}" for i in range(10)]
    first = encode_cached(encode, texts, {"encoder": "x"}, tmp_path)
    shards = sorted(tmp_path.rglob("*.npy"))
    np.save(shards[0], np.full((4, 3), np.nan, dtype=np.float32))  # right shape, no numbers
    np.save(shards[1], np.ones((4, 5), dtype=np.float32))  # right rows, another encoder's width
    tally("bad inputs tried", 2)
    for dim in (3, None):  # told the width, or taking it from the first shard
        counts = {}
        again = encode_cached(encode, texts, {"encoder": "x"}, tmp_path, counts, dim=dim)
        assert np.array_equal(again, first) and np.isfinite(again).all()
        tally("artefacts compared")
        if dim == 3:
            assert counts == {"reused": 1, "encoded": 2}
            # the last shard wrong: caught by the width of the first
            np.save(shards[2], np.ones((2, 7), dtype=np.float32))
    assert counts == {"reused": 2, "encoded": 1}
