"""The retrieval systems compared in 05/06, by name: how each builds its index and how each searches it."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .artefacts import sha256_texts
from .backbone import Backbone, embed
from .bm25 import bm25_score_matrix, build_bm25, search_bm25
from .data import RetrievalDataset
from .encoders import BackboneEncoder, MiniLMEncoder
from .index import (build_dense_index, check_documents, check_queries, load_dense_index, manifest_diffs, read_manifest,
                    search_dense, to_gpus)
from .retriever import RETRIEVAL_ADAPTER, adapter_identity, attach_retrieval_adapter
from .separate import load_copy

BASELINES = ("bm25", "minilm", "backbone_last", "backbone_mean")
ADAPTED = {"bsharedrag": "hard", "bsharedrag_random_negatives": "random"}  # system -> adapter trained by 03
SYSTEMS = BASELINES + tuple(ADAPTED)  # what 05 and 06 build and evaluate
COPIES = {"separate_backbones": "retrieval_copy"}  # system -> Separate RAG's retrieval copy (separate.py), for 07


@dataclass
class EncodeSettings:
    """How backbone systems embed text; the same values must be used to build and to search."""

    query_prefix: str = ""
    passage_prefix: str = ""
    max_length: int = 512
    batch_size: int = 16
    passage_format: str = "{title}: {text}"
    index_factory: str = "Flat"
    adapter_root: str = ""  # 03_retriever/adapters of the run, for the adapted systems
    cache_dir: str = ""  # encoded passage shards of adapted systems are kept here and reused (by a resume, by 05)


def check_systems(systems: list[str]) -> None:
    unknown = [s for s in systems if s not in SYSTEMS and s not in COPIES]
    if unknown:
        raise ValueError(f"unknown retrieval system(s) {unknown}; known: {', '.join(SYSTEMS + tuple(COPIES))}")


def _encoder(system: str, backbone: Backbone | None, s: EncodeSettings):
    if system == "minilm":
        return MiniLMEncoder()
    if backbone is None:
        raise ValueError(f"system {system!r} needs a loaded backbone")
    if system in ADAPTED:
        if not s.adapter_root:
            raise ValueError(f"system {system!r} needs the adapters of 03_retriever (EncodeSettings.adapter_root)")
        folder = Path(s.adapter_root) / ADAPTED[system]
        trained = attach_retrieval_adapter(backbone, folder, name=system)
        # Pooling and prefixes are the ones the adapter was trained with.
        return BackboneEncoder(backbone, trained.pooling, trained.query_prefix, trained.passage_prefix, s.max_length,
                               s.batch_size, adapter=system, adapter_id=adapter_identity(folder),
                               cache_dir=s.cache_dir or None)
    if system in COPIES:
        if not s.adapter_root:
            raise ValueError(f"system {system!r} needs the folder holding its {COPIES[system]} "
                             "(EncodeSettings.adapter_root)")
        # The copy's own layers are the encoder (loaded into `backbone`; a no-op when it holds them already), so its
        # identity names the copy; pooling and prefixes are the ones it was trained with.
        trained = load_copy(backbone, Path(s.adapter_root) / COPIES[system], task=RETRIEVAL_ADAPTER)
        return BackboneEncoder(backbone, trained.pooling, trained.query_prefix, trained.passage_prefix, s.max_length,
                               s.batch_size, cache_dir=s.cache_dir or None)
    return BackboneEncoder(backbone, system.split("_", 1)[1], s.query_prefix, s.passage_prefix, s.max_length,
                           s.batch_size)


def corpus_hash(ds: RetrievalDataset, passage_format: str) -> str:
    return sha256_texts(list(ds.corpus["doc_id"]) + ds.passages(passage_format))


def index_manifest(encoder, chash: str) -> dict:
    """What a dense index of the corpus with hash `chash` built by `encoder` records in its manifest, and what a
    manifest must hold for `encoder` to search that index."""
    return {**encoder.identity, "corpus_hash": chash}


def build_indexes(ds: RetrievalDataset, systems: list[str], out_dir: str | Path, settings: EncodeSettings,
                  backbone: Backbone | None = None) -> pd.DataFrame:
    """Build and save one index per system under out_dir/<dataset>/<system>; returns a row of costs per system.

    A corpus with repeated doc ids or an empty, whitespace-only or non-text document is refused before anything is
    encoded or written (see index.check_documents); indexes saved earlier stay as they were.
    """
    check_systems(systems)
    check_documents(list(ds.corpus["doc_id"]), list(ds.corpus["text"]), list(ds.corpus["title"]))
    passages = ds.passages(settings.passage_format)
    doc_ids = list(ds.corpus["doc_id"])
    chash = corpus_hash(ds, settings.passage_format)
    rows = []
    if "bm25" in systems:
        start = time.perf_counter()
        build_bm25(passages, doc_ids, ds.lang, Path(out_dir) / ds.name / "bm25")
        rows.append({"system": "bm25", "docs": len(doc_ids), "seconds": time.perf_counter() - start})
    if "minilm" in systems:
        start = time.perf_counter()
        enc = MiniLMEncoder()
        vectors = enc.encode_passages(passages)
        build_dense_index(vectors, doc_ids, index_manifest(enc, chash),
                          Path(out_dir) / ds.name / "minilm", settings.index_factory)
        rows.append({"system": "minilm", "docs": len(doc_ids), "seconds": time.perf_counter() - start})
    poolings = tuple(s.split("_", 1)[1] for s in systems if s.startswith("backbone_"))
    if poolings:
        start = time.perf_counter()
        # One forward pass over the corpus serves every pooling.
        with BackboneEncoder(backbone)._active():
            vectors = embed(backbone, passages, poolings, settings.passage_prefix, settings.max_length,
                            settings.batch_size, desc=f"{ds.name} passages")
        seconds = (time.perf_counter() - start) / len(poolings)
        for pooling in poolings:
            enc = _encoder(f"backbone_{pooling}", backbone, settings)
            build_dense_index(vectors[pooling], doc_ids, index_manifest(enc, chash),
                              Path(out_dir) / ds.name / f"backbone_{pooling}", settings.index_factory)
            rows.append({"system": f"backbone_{pooling}", "docs": len(doc_ids), "seconds": seconds})
    for system in [s for s in systems if s in ADAPTED or s in COPIES]:
        start = time.perf_counter()
        enc = _encoder(system, backbone, settings)
        build_dense_index(enc.encode_passages(passages), doc_ids, index_manifest(enc, chash),
                          Path(out_dir) / ds.name / system, settings.index_factory)
        rows.append({"system": system, "docs": len(doc_ids), "seconds": time.perf_counter() - start})
    return pd.DataFrame(rows)


def index_mismatch(ds: RetrievalDataset, system: str, index_root: str | Path, settings: EncodeSettings,
                   backbone: Backbone | None = None) -> list[str] | None:
    """Why `retrieve` would refuse dense system `system`'s saved index of `ds` under `index_root`: the manifest fields
    that differ from the encoder in use and the corpus ([] when none do), or None when no index is saved there."""
    index_dir = Path(index_root) / ds.name / system
    if not (index_dir / "manifest.json").is_file():
        return None
    enc = _encoder(system, backbone, settings)
    return manifest_diffs(read_manifest(index_dir), index_manifest(enc, corpus_hash(ds, settings.passage_format)))


def retrieve(ds: RetrievalDataset, system: str, index_root: str | Path, queries: pd.DataFrame,
             settings: EncodeSettings, k: int = 100, backbone: Backbone | None = None) -> dict[str, list[str]]:
    """Rank the corpus for each query with `system`'s saved index: {qid: [doc_id, ...]} best first."""
    check_systems([system])
    texts = list(queries["text"])
    check_queries(texts)
    index_dir = Path(index_root) / ds.name / system
    chash = corpus_hash(ds, settings.passage_format)
    if system == "bm25":
        hits = search_bm25(index_dir, texts, k, corpus_hash=chash)
    else:
        enc = _encoder(system, backbone, settings)
        index, doc_of, _ = load_dense_index(index_dir, expected=index_manifest(enc, chash))
        hits = search_dense(to_gpus(index), doc_of, enc.encode_queries(texts), k)
    return {qid: [doc for doc, _ in row] for qid, row in zip(queries["qid"], hits)}


def score_matrix(ds: RetrievalDataset, system: str, queries: pd.DataFrame, settings: EncodeSettings,
                 backbone: Backbone | None = None) -> np.ndarray:
    """Scores of every corpus document for every query (queries x corpus) under `system`, without a saved index."""
    check_systems([system])
    passages = ds.passages(settings.passage_format)
    texts = list(queries["text"])
    check_queries(texts)
    if system == "bm25":
        return bm25_score_matrix(passages, texts, ds.lang)
    enc = _encoder(system, backbone, settings)
    return enc.encode_queries(texts) @ enc.encode_passages(passages).T
