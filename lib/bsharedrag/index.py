"""Dense faiss indexes saved with a manifest, and a search that refuses an index built by another encoder or corpus."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np

from .artefacts import atomic_dir

# Manifest fields that must equal the encoder now in use; anything else (counts, timings) is informative only.
# The manifest also records the backbone's name, but a name is not an identity: a run folder copied elsewhere, or
# named by a relative path, loads the same weights (`backbone_fingerprint` and `tokenizer` say which they are).
IDENTITY_FIELDS = ("encoder", "backbone_fingerprint", "tokenizer", "adapter", "pooling", "prefix", "max_length", "dim",
                   "corpus_hash")
MAX_QUERY_CHARS = 4096  # a query this long is a pasted document, not a question; embedding cuts it to max_length anyway


class IndexMismatchError(RuntimeError):
    """The saved index was built for another backbone, adapter, pooling, tokenizer or corpus."""


def check_queries(queries: list[str]) -> None:
    """Refuse an empty query list, and non-text, empty, whitespace-only or overlong queries, naming the first."""
    if len(queries) == 0:
        raise ValueError("the query list is empty: give at least one query (check the split and max_questions)")
    for i, q in enumerate(queries):
        if not isinstance(q, str):
            raise ValueError(f"query {i} is {type(q).__name__}, not text ({q!r:.60}); decode it to str (UTF-8) first")
        if not q.strip():
            raise ValueError(f"query {i} is empty or whitespace-only ({q!r}); drop it or give text to search for")
        if len(q) > MAX_QUERY_CHARS:
            raise ValueError(f"query {i} is {len(q)} characters long, over the limit of {MAX_QUERY_CHARS} "
                             f"({q[:40]!r}...); shorten it to the question itself")


def check_doc_ids(doc_ids: list[str]) -> None:
    """Refuse doc ids that repeat, naming the first few: search results and qrels refer to documents by id."""
    seen, repeated = set(), []
    for d in doc_ids:
        if d in seen and d not in repeated:
            repeated.append(d)
        seen.add(d)
    if repeated:
        raise ValueError(f"doc ids repeat ({', '.join(map(repr, repeated[:5]))}); every document needs a unique "
                         f"doc_id: merge or rename the duplicates in the data file, then rebuild the index with "
                         f"05_index")


def check_documents(doc_ids: list[str], texts: list, titles: list | None = None) -> None:
    """Refuse a corpus to index with repeated doc ids, or a document whose title or text is not `str` or which has no
    text at all (empty or whitespace-only), naming the document.

    Such a corpus is refused before anything is encoded, never indexed with the bad documents skipped: a skipped
    document would silently change the corpus (and its hash) that qrels, mining and the saved indexes refer to.
    """
    check_doc_ids(doc_ids)
    for i, (doc_id, text) in enumerate(zip(doc_ids, texts)):
        title = titles[i] if titles is not None else ""
        for part, value in (("title", title), ("text", text)):
            if not isinstance(value, str):
                raise ValueError(f"document {doc_id!r}: its {part} is {type(value).__name__}, not text "
                                 f"({value!r:.60}); decode it to str (UTF-8) where the corpus is read, then "
                                 f"rebuild the index")
        if not (title.strip() or text.strip()):
            raise ValueError(f"document {doc_id!r} is empty or whitespace-only ({text!r:.60}); drop it from the "
                             f"corpus or give it text, then rebuild the index with 05_index")


def build_dense_index(embeddings: np.ndarray, doc_ids: list[str], manifest: dict, target: str | Path,
                      factory: str = "Flat") -> Path:
    """Index L2-normalised `embeddings` by inner product with faiss `factory` and save it with its manifest."""
    if len(doc_ids) != len(embeddings):
        raise ValueError(f"{len(doc_ids)} doc ids for {len(embeddings)} embeddings")
    check_doc_ids(doc_ids)
    vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
    # Every document gets a stable int64 id, so it can be deleted or replaced without a rebuild. IVF indexes keep
    # ids themselves; others need the IDMap2 wrapper (which must not wrap IVF: its removal would misnumber them).
    spec = factory if "IVF" in factory else f"IDMap2,{factory}"
    index = faiss.index_factory(vectors.shape[1], spec, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        index.train(vectors)
    index.add_with_ids(vectors, np.arange(len(doc_ids), dtype=np.int64))
    manifest = {**manifest, "dim": int(vectors.shape[1]), "factory": factory, "count": len(doc_ids)}
    _save(index, dict(zip(doc_ids, range(len(doc_ids)))), manifest, target)
    return Path(target)


def _save(index: faiss.Index, ids: dict[str, int], manifest: dict, target: str | Path) -> None:
    with atomic_dir(target) as staging:
        faiss.write_index(index, str(staging / "index.faiss"))
        (staging / "doc_ids.json").write_text(json.dumps(ids))
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))


def update_dense_index(index_dir: str | Path, upserts: dict[str, np.ndarray], deletes: list[str], corpus_hash: str,
                       expected: dict) -> dict:
    """Delete, replace and add documents by doc_id in a saved index (no rebuild); the result searches like a rebuild.

    `upserts` maps doc_id to its new embedding (added, or replacing the old one); `corpus_hash` is the corpus's hash
    after the change. Returns the new manifest. HNSW cannot delete: rebuild it instead.
    """
    index, doc_of, manifest = load_dense_index(index_dir, expected=expected)
    ids = {doc: i for i, doc in doc_of.items()}
    missing = [d for d in deletes if d not in ids]
    if missing:
        raise KeyError(f"cannot delete doc ids that the index does not hold: {missing[:5]}")
    gone = [ids.pop(d) for d in list(deletes) + [d for d in upserts if d in ids]]
    if gone:
        if "HNSW" in manifest["factory"]:
            raise ValueError(f"faiss {manifest['factory']} cannot delete documents; rebuild the index with 05_index")
        index.remove_ids(np.array(gone, dtype=np.int64))
    if upserts:
        start = max(doc_of, default=-1) + 1  # ids in use before this change; deleted ones may be reused
        new = {d: start + k for k, d in enumerate(upserts)}
        vectors = np.ascontiguousarray(np.stack(list(upserts.values())), dtype=np.float32)
        index.add_with_ids(vectors, np.array(list(new.values()), dtype=np.int64))
        ids.update(new)
    manifest = {**manifest, "corpus_hash": corpus_hash, "count": int(index.ntotal)}
    _save(index, ids, manifest, index_dir)
    return manifest


def read_manifest(index_dir: str | Path) -> dict:
    path = Path(index_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"no index at {index_dir} (manifest.json missing); build it with 05_index")
    return json.loads(path.read_text())


def manifest_diffs(built: dict, expected: dict) -> list[str]:
    """Every identity field where a saved index's manifest `built` differs from `expected`, with both values."""
    return [f"{key}: built with {built.get(key)!r}, now {expected[key]!r}"
            for key in IDENTITY_FIELDS if key in expected and built.get(key) != expected[key]]


def check_manifest(built: dict, expected: dict, where: str | Path) -> None:
    """Raise IndexMismatchError naming every identity field where the saved index differs from `expected`."""
    diffs = manifest_diffs(built, expected)
    if diffs:
        raise IndexMismatchError(
            f"the index at {where} does not match the encoder in use ({'; '.join(diffs)}). "
            f"Rebuild it with the current encoder: rerun 05_index (python -m bsharedrag.run CONFIG --only 05 --resume RUN_ID)"
        )


def load_dense_index(index_dir: str | Path, expected: dict | None = None) -> tuple[faiss.Index, dict[int, str], dict]:
    """Load a saved index, its int64 id -> doc_id map and its manifest, after checking the manifest against `expected`."""
    manifest = read_manifest(index_dir)
    if expected is not None:
        check_manifest(manifest, expected, index_dir)
    index = faiss.read_index(str(Path(index_dir) / "index.faiss"))
    ids = json.loads((Path(index_dir) / "doc_ids.json").read_text())
    return index, {i: doc for doc, i in ids.items()}, manifest


def search_dense(index: faiss.Index, doc_of: dict[int, str], query_embeddings: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
    """Top-k (doc_id, inner product) per query."""
    k = min(k, index.ntotal)
    scores, ids = index.search(np.ascontiguousarray(query_embeddings, dtype=np.float32), k)
    return [[(doc_of[int(j)], float(s)) for j, s in zip(id_row, score_row) if j >= 0]
            for id_row, score_row in zip(ids, scores)]


def set_search_parameters(index: faiss.Index, **params: float) -> faiss.Index:
    """Search-time knobs through any wrapper (nprobe for IVF, efSearch for HNSW), e.g. nprobe=16."""
    space = faiss.ParameterSpace()
    for name, value in params.items():
        space.set_index_parameter(index, name, value)
    return index


def to_gpus(index: faiss.Index) -> faiss.Index:
    """The index sharded over every visible GPU (faiss-gpu); unchanged where faiss sees no GPU."""
    n_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if n_gpus == 0:
        return index
    options = faiss.GpuMultipleClonerOptions()
    options.shard = True  # each GPU holds 1/n of the vectors; results are merged
    return faiss.index_cpu_to_all_gpus(index, co=options)
