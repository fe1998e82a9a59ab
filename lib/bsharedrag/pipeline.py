"""One-process BSharedRAG: one backbone loaded once, the retrieval and generation adapters attached by name and
switched per stage (never merged), the run's index searched, and answers generated from what was retrieved."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import faiss

from . import paths
from .adapters import AdapterSwitch
from .backbone import Backbone, load_backbone
from .config import load_config
from .data import RetrievalDataset, load_sets
from .encoders import BackboneEncoder
from .generator import (
    GENERATION_ADAPTER,
    DecodeSettings,
    GeneratorSettings,
    answer_marker,
    attach_generation_adapter,
    build_prompt,
    decode_settings,
    generate,
)
from .index import check_queries, load_dense_index, search_dense, to_gpus
from .retriever import RETRIEVAL_ADAPTER, adapter_identity, attach_retrieval_adapter
from .systems import corpus_hash, index_manifest

RETRIEVER_SYSTEM = "bsharedrag"  # the index 05 built with the hard-negative retrieval adapter
RETRIEVER_VARIANT = "hard"


def run_backbone(run_dir: str | Path, cfg: dict) -> str:
    """The backbone a run's later steps use: 01_pretrain's output when the config says so, else `common.backbone`."""
    from .pretrain import backbone_for_run

    common = cfg["common"]
    return backbone_for_run(common["backbone"], run_dir, common.get("use_pretrained_backbone", False))


@dataclass
class BSharedRAG:
    """Retrieve with the `retrieval` adapter, answer with the `generation` adapter, on one shared backbone."""

    backbone: Backbone
    encoder: BackboneEncoder
    index: faiss.Index
    doc_of: dict[int, str]
    dataset: RetrievalDataset
    generator: GeneratorSettings
    decode: DecodeSettings
    passage_format: str = "{title}: {text}"
    generation_backbone: Backbone | None = None  # only for the two-backbone comparison; None: the shared one
    switches: int = 0
    _text: dict[str, str] = field(default_factory=dict, repr=False)
    _switches: dict[int, AdapterSwitch] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.generation_backbone = self.generation_backbone or self.backbone
        self._text = dict(zip(self.dataset.corpus["doc_id"], self.dataset.passages(self.passage_format)))

    @classmethod
    def from_run(cls, run_dir: str | Path, dataset: str | None = None, device: str | None = None,
                 decode: DecodeSettings | None = None, shared: bool = True) -> BSharedRAG:
        """Load a finished run: its backbone once, 03's hard-negative retrieval adapter, 04's generation adapter and
        05's `bsharedrag` index of `dataset` (default: the run's first data set), each checked against the others.

        `shared=False` loads a second copy of the backbone for the generation adapter: the same work done by two
        separately loaded models, which the efficiency comparison measures against.
        """
        run_dir = paths.run_folder(run_dir)
        cfg = load_config(run_dir / "resolved.yaml")
        common = cfg["common"]
        name = dataset or common["datasets"][0]
        if name not in common["datasets"]:
            raise ValueError(f"data set {name!r} is not part of run {run_dir.name}; it has {common['datasets']}")
        ds = load_sets(common, [name])[name]
        bb = load_backbone(run_backbone(run_dir, cfg), device=device, compute_dtype=common["compute_dtype"],
                           seed=common["seed"])
        retrieval_dir = run_dir / "03_retriever" / "adapters" / RETRIEVER_VARIANT
        trained = attach_retrieval_adapter(bb, retrieval_dir, RETRIEVAL_ADAPTER)
        gen_bb = bb if shared else load_backbone(run_backbone(run_dir, cfg), device=device,
                                                 compute_dtype=common["compute_dtype"], seed=common["seed"])
        generator = attach_generation_adapter(gen_bb, run_dir / "04_generator" / "adapters" / GENERATION_ADAPTER)
        encoder = BackboneEncoder(bb, trained.pooling, trained.query_prefix, trained.passage_prefix,
                                  common["max_length"], common["batch_size"], adapter=RETRIEVAL_ADAPTER,
                                  adapter_id=adapter_identity(retrieval_dir))
        expected = index_manifest(encoder, corpus_hash(ds, common["passage_format"]))
        index, doc_of, _ = load_dense_index(run_dir / "05_index" / "indexes" / name / RETRIEVER_SYSTEM, expected)
        decode = decode or decode_settings(cfg.get("06_evaluate", {}), ds.lang, common["seed"], batch_size=1)
        return cls(bb, encoder, to_gpus(index), doc_of, ds, generator, decode, common["passage_format"],
                   None if shared else gen_bb)

    def switch(self, adapter: str) -> None:
        """Make `adapter` the active one (what each stage does first); counted, and cheap: no weights move."""
        side = self.backbone if adapter == RETRIEVAL_ADAPTER else self.generation_backbone
        if id(side.model) not in self._switches:
            self._switches[id(side.model)] = AdapterSwitch(side.model)
        self._switches[id(side.model)](adapter)
        self.switches += 1

    def retrieve(self, question: str, k: int | None = None) -> list[dict]:
        """The top-k documents for `question`: [{doc_id, score, text}], best first."""
        check_queries([question])
        self.switch(RETRIEVAL_ADAPTER)
        hits = search_dense(self.index, self.doc_of, self.encoder.encode_queries([question]), k or self.generator.top_k)
        return [{"doc_id": d, "score": s, "text": self._text[d]} for d, s in hits[0]]

    def generate(self, question: str, documents: list[str]) -> str:
        """The answer to `question` from `documents` (passage texts) with the generation adapter."""
        lang = self.dataset.lang
        prompt = build_prompt(question, documents, lang, self.generator, self.backbone.tokenizer)
        self.switch(GENERATION_ADAPTER)
        return generate(self.generation_backbone, [prompt], self.decode, GENERATION_ADAPTER,
                        stop=answer_marker(self.generator, lang))[0]

    def answer(self, question: str, k: int | None = None) -> dict:
        """Retrieve, then generate: {"answer", "documents", "seconds": {"retrieve", "generate"}}."""
        start = time.perf_counter()
        docs = self.retrieve(question, k)
        middle = time.perf_counter()
        text = self.generate(question, [d["text"] for d in docs])
        return {"answer": text, "documents": docs,
                "seconds": {"retrieve": middle - start, "generate": time.perf_counter() - middle}}
