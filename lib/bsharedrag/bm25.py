"""BM25 baseline with bm25s: Snowball-stemmed English tokens, jieba tokens for Chinese."""

from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from pathlib import Path

import numpy as np

# Where JAX is installed, importing bm25s runs a JAX top-k to probe it, and JAX's first op on a GPU reserves 75% of the
# card for itself: 60 of an H100's 80 GB, out of PyTorch's reach, for the rest of the process. JAX then takes memory
# as it needs it instead. A value the user set wins.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
import bm25s  # noqa: E402

from .artefacts import atomic_dir, sha256_texts
from .index import IndexMismatchError, check_documents, check_queries

_WORD = re.compile(r"(?u)\b\w\w+\b")
_CJK = re.compile(r"[\u3400-\u9fff]")


@lru_cache(maxsize=1)
def _english():
    import Stemmer

    return Stemmer.Stemmer("english"), set(bm25s.stopwords.STOPWORDS_EN)


def bm25_tokens(text: str, lang: str) -> list[str]:
    """Lower-cased tokens: jieba words for Chinese (any CJK in the text), stemmed non-stopwords for English."""
    text = text.lower()
    if lang == "zh" or _CJK.search(text):
        import jieba

        return [w for w in jieba.lcut(text) if w.strip() and (_CJK.search(w) or _WORD.fullmatch(w) or w.isalnum())]
    stemmer, stop = _english()
    return stemmer.stemWords([w for w in _WORD.findall(text) if w not in stop])


def build_bm25(passages: list[str], doc_ids: list[str], lang: str, target: str | Path) -> Path:
    """Index `passages` with BM25 and save the index, the doc ids and a manifest into `target`, atomically.

    Refuses repeated doc ids and empty, whitespace-only or non-text passages (see index.check_documents).
    """
    check_documents(doc_ids, passages)
    retriever = bm25s.BM25()
    retriever.index([bm25_tokens(p, lang) for p in passages], show_progress=False)
    manifest = {"kind": "bm25", "lang": lang, "corpus_hash": sha256_texts(doc_ids + passages), "count": len(doc_ids)}
    with atomic_dir(target) as staging:
        retriever.save(str(staging), show_progress=False)
        (staging / "doc_ids.json").write_text(json.dumps(doc_ids))
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return Path(target)


def search_bm25(index_dir: str | Path, queries: list[str], k: int, corpus_hash: str | None = None) -> list[list[tuple[str, float]]]:
    """Top-k (doc_id, score) per query from a saved BM25 index, refusing one built on another corpus."""
    index_dir = Path(index_dir)
    manifest = json.loads((index_dir / "manifest.json").read_text())
    if corpus_hash is not None and manifest["corpus_hash"] != corpus_hash:
        raise IndexMismatchError(
            f"BM25 index {index_dir} was built on another corpus (hash {manifest['corpus_hash'][:12]} vs "
            f"{corpus_hash[:12]} now); rebuild it by rerunning 05_index"
        )
    check_queries(queries)
    doc_ids = json.loads((index_dir / "doc_ids.json").read_text())
    retriever = bm25s.BM25.load(str(index_dir), show_progress=False)
    k = min(k, len(doc_ids))
    vocab = retriever.vocab_dict
    # A query whose words are all stopwords or unseen in the corpus matches nothing: it gets an empty ranking.
    tokens = [[t for t in bm25_tokens(q, manifest["lang"]) if t in vocab] for q in queries]
    results: list[list[tuple[str, float]]] = [[] for _ in queries]
    rows = [i for i, row in enumerate(tokens) if row]
    if rows:
        ids, scores = retriever.retrieve([tokens[i] for i in rows], k=k, show_progress=False)
        for i, id_row, score_row in zip(rows, ids, scores):
            results[i] = [(doc_ids[j], float(s)) for j, s in zip(id_row, score_row) if s > 0]
    return results


def bm25_score_matrix(passages: list[str], queries: list[str], lang: str) -> np.ndarray:
    """BM25 score of every passage for every query (queries x passages), from an in-memory index."""
    retriever = bm25s.BM25()
    retriever.index([bm25_tokens(p, lang) for p in passages], show_progress=False)
    vocab = retriever.vocab_dict
    out = np.zeros((len(queries), len(passages)), dtype=np.float32)
    for i, q in enumerate(queries):
        tokens = [t for t in bm25_tokens(q, lang) if t in vocab]
        if tokens:
            out[i] = retriever.get_scores(tokens)
    return out
