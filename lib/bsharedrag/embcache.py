"""Encoded corpus shards cached on disk by encoder identity and text: a killed step, a resumed run, or a later step
that needs the same embeddings reuses every finished shard instead of encoding it again."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .artefacts import atomic_write_bytes, sha256_texts

SHARD = 512  # texts per cached shard: what a kill can cost at most


def encode_cached(encode: Callable[[list[str]], np.ndarray], texts: list[str], identity: dict,
                  cache_dir: str | Path | None, counts: dict | None = None) -> np.ndarray:
    """`encode(texts)`, shard by shard, each shard saved atomically under cache_dir/<identity>/ and reused when there.

    `counts`, if given, is filled with {"reused": shards, "encoded": shards}.
    """
    counts = counts if counts is not None else {}
    counts.setdefault("reused", 0)
    counts.setdefault("encoded", 0)
    if not cache_dir:
        counts["encoded"] += 1
        return encode(texts)
    key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
    folder = Path(cache_dir) / key
    out = []
    for start in range(0, len(texts), SHARD):
        chunk = texts[start:start + SHARD]
        path = folder / f"{sha256_texts(chunk)[:32]}.npy"
        if path.is_file():
            try:
                vectors = np.load(path)
                if vectors.shape[0] == len(chunk):
                    out.append(vectors)
                    counts["reused"] += 1
                    continue
            except (OSError, ValueError):
                pass  # a damaged shard is encoded again
        vectors = np.asarray(encode(chunk), dtype=np.float32)
        buffer = io.BytesIO()
        np.save(buffer, vectors)
        atomic_write_bytes(path, buffer.getvalue())
        out.append(vectors)
        counts["encoded"] += 1
    if not out:
        return encode(texts)
    return np.concatenate(out)
