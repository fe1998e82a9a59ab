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


def _usable(vectors: np.ndarray, rows: int, dim: int | None) -> bool:
    """A cached shard is reused only if it holds `rows` finite vectors of `dim` values (any dim when None)."""
    return (vectors.ndim == 2 and vectors.shape[0] == rows and (dim is None or vectors.shape[1] == dim)
            and np.issubdtype(vectors.dtype, np.floating) and bool(np.isfinite(vectors).all()))


def encode_cached(encode: Callable[[list[str]], np.ndarray], texts: list[str], identity: dict,
                  cache_dir: str | Path | None, counts: dict | None = None, dim: int | None = None) -> np.ndarray:
    """`encode(texts)`, shard by shard, each shard saved atomically under cache_dir/<identity>/ and reused when there.

    A cached shard with the wrong number of rows, non-finite values (NaN, inf) or another width than `dim` (when not
    given: the width of the first shard of this call) is encoded again. `counts`, if given, is filled with
    {"reused": shards, "encoded": shards}.
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
                if _usable(vectors, len(chunk), dim):
                    out.append(vectors)
                    dim = vectors.shape[1]
                    counts["reused"] += 1
                    continue
            except (OSError, ValueError):
                pass  # a damaged shard is encoded again
        vectors = np.asarray(encode(chunk), dtype=np.float32)
        dim = vectors.shape[1] if dim is None and vectors.ndim == 2 else dim
        buffer = io.BytesIO()
        np.save(buffer, vectors)
        atomic_write_bytes(path, buffer.getvalue())
        out.append(vectors)
        counts["encoded"] += 1
    if not out:
        return encode(texts)
    return np.concatenate(out)
