"""07_ablations: every variant of the paper trained and evaluated through the same library calls, on the run's
splits and step budget, one long-form row per (variant, data set, seed).

What a seed varies is training (initialisation, batch order): the data split and the evaluated questions stay the
run's. A component the run already trained (03's adapters, 04's adapter, on the run's backbone and seed) is reused;
any other (another seed, the original backbone, a Fully Shared LoRA) is trained here with 03's and 04's settings into
`07_ablations/components/`, saved as it finishes, and reused by a rerun.

Seeds: the first of `seeds` trains every row; the others only the rows named in `seed_variants` (all when empty).
Parametric RAG runs last in each seed and is compared with `bsharedrag@prag` and `base_rag@prag`: those systems'
answers scored on Parametric RAG's questions only, so that every generation claim compares the same questions.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from .artefacts import atomic_write_json, atomic_write_jsonl, read_jsonl, sha256_file, sha256_json
from .backbone import Backbone, load_backbone
from .config import identifying
from .data import RetrievalDataset
from .evaluation import evaluate_generation, evaluate_retrieval_systems, generation_questions
from .generator import (
    GENERATION_ADAPTER,
    DecodeSettings,
    attach_generation_adapter,
    save_generation_adapter,
    train_generation_adapter,
)
from .generator import settings_from_config as generator_settings
from .pretrain import backbone_for_run
from .retriever import save_retrieval_adapter, train_retrieval_adapter, trainable_parameters, training_data
from .retriever import settings_from_config as retriever_settings
from .separate import is_copy, load_copy, read_copy_meta, train_generation_copy, train_retrieval_copy
from .systems import EncodeSettings

VARIANTS = {
    "bsharedrag": "continually pre-trained backbone + retrieval LoRA (hard negatives) + generation LoRA, one backbone",
    "wo_cpt": "the same on the original backbone (no continual pre-training)",
    "wo_hard_negatives": "the retrieval LoRA trained with random instead of mined negatives (+ in-batch)",
    "separate_minilm": "Separate RAG: off-the-shelf MiniLM retriever + the generation LoRA",
    "separate_bm25": "Separate RAG: BM25 + the generation LoRA",
    "separate_backbones": "Separate RAG: two backbone copies, each with its top layers fine-tuned for its own task",
    "fully_shared": "Fully Shared RAG: ONE LoRA trained on lambda*L_ret + (1-lambda)*L_gen",
    "prag": "Parametric RAG: per-document LoRAs merged at answer time (parametric; parametric + documents)",
    "base_rag": "the backbone without adapters + the retrieval LoRA's documents (Parametric RAG's in-context peer)",
    "closed_book": "the generation LoRA without retrieval",
}
RETRIEVAL_COLUMNS = ("ndcg@5", "hit@3")
GENERATION_COLUMNS = ("bleu3", "rougeL", "bertscore_f1", "token_f1")
PRAG_MODES = ("parametric", "parametric_docs")
ON_PRAG_QUESTIONS = "@prag"  # suffix of a system's row scored on Parametric RAG's questions only
PRAG_PEERS = ("bsharedrag", "base_rag")
# rows that rank with bsharedrag's own retriever: a retrieval metric compared with them is bsharedrag against itself
BORROWED_RETRIEVER = ("base_rag", "prag_parametric", "prag_parametric_docs")


def check_variants(variants: list[str]) -> None:
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")


def has_own_retriever(variant: str) -> bool:
    """Whether a result row's retrieval metrics come from a retriever of its own (not bsharedrag's, not none)."""
    return variant not in BORROWED_RETRIEVER and variant != "closed_book" and ON_PRAG_QUESTIONS not in variant


def row_names(variants: list[str], lambdas: list[float]) -> list[str]:
    """The variant names of the rows the requested variants produce (fully_shared: one per lambda)."""
    names = []
    for v in variants:
        if v == "fully_shared":
            names += [f"fully_shared_{lam:g}" for lam in lambdas]
        elif v == "prag":
            names += [f"prag_{mode}" for mode in PRAG_MODES] + [f"{p}{ON_PRAG_QUESTIONS}" for p in PRAG_PEERS]
        else:
            names.append(v)
    return names


def check_seed_variants(seed_variants: list[str], variants: list[str], lambdas: list[float]) -> None:
    """Refuse a `seed_variants` entry that names no requested variant or row."""
    known = set(variants) | set(row_names(variants, lambdas))
    unknown = [v for v in seed_variants if v not in known]
    if unknown:
        raise ValueError(f"seed_variants {unknown} name no requested variant or row; use some of {sorted(known)} "
                         "(e.g. fully_shared_0.5 for one lambda)")


def runs_at_seed(name: str, seed: int, seeds: list[int], seed_variants: list[str]) -> bool:
    """Whether row `name` (a variant, or fully_shared_<lambda>) is trained at `seed`: the first seed trains every
    row, the other seeds only those in `seed_variants` (every row when it is empty)."""
    family = "fully_shared" if name.startswith("fully_shared_") else name
    return seed == seeds[0] or not seed_variants or name in seed_variants or family in seed_variants


def weights_mb(module) -> float:
    """Bytes of a module's parameters (what inference has to hold), in MiB."""
    return sum(p.numel() * p.element_size() for p in module.parameters()) / 2**20


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20


@dataclass
class Component:
    """A trained adapter: where it is saved, its trainable parameters and its training time."""

    path: Path
    trainable: int
    seconds: float


@dataclass
class Ablation:
    """One run's ablation study: its resolved config, data and the folders 07 reads and writes."""

    run_dir: Path
    cfg: dict
    sets: dict[str, RetrievalDataset]
    out_dir: Path
    questions: int  # test questions with an answer per data set for generation; 0 = all
    decode: dict[str, DecodeSettings]

    @property
    def common(self) -> dict:
        return self.cfg["common"]

    @property
    def run_seed(self) -> int:
        return self.common["seed"]

    def source(self, cpt: bool) -> str:
        return backbone_for_run(self.common["backbone"], self.run_dir, cpt and self.common["use_pretrained_backbone"])

    def is_run_backbone(self, cpt: bool) -> bool:
        return cpt or not self.common["use_pretrained_backbone"]

    @property
    def has_cpt(self) -> bool:
        """Whether the run continually pre-trained its backbone (01), i.e. `wo_cpt` is another model."""
        return bool(self.common["use_pretrained_backbone"])

    def load(self, cpt: bool) -> Backbone:
        return load_backbone(self.source(cpt), compute_dtype=self.common["compute_dtype"], seed=self.run_seed)

    def encode(self, adapter_root: Path | str = "") -> EncodeSettings:
        c = self.common
        factory = self.cfg.get("05_index", {}).get("index_factory", "Flat")  # indexes built here are built as 05's
        return EncodeSettings(c["query_prefix"], c["passage_prefix"], c["max_length"], c["batch_size"],
                              c["passage_format"], index_factory=factory, adapter_root=str(adapter_root),
                              cache_dir=str(self.run_dir / "cache" / "embeddings"))

    def component_dir(self, cpt: bool, seed: int) -> Path:
        return self.out_dir / "components" / ("cpt" if cpt else "original") / f"seed{seed}"

    def run_metrics(self, step: str) -> dict:
        path = self.run_dir / step / "metrics.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def examples(self) -> list[dict]:
        path = self.run_dir / "04_generator" / "examples.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: 07 trains generators on 04's examples; run 04 first")
        return read_jsonl(path)


def open_ablation(run_dir: str | Path, out_dir: str | Path, questions: int, decode: dict[str, DecodeSettings]) -> Ablation:
    from .config import load_config
    from .data import load_sets

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "resolved.yaml")
    c = cfg["common"]
    sets = load_sets(c)
    return Ablation(run_dir, cfg, sets, Path(out_dir), questions, decode)


# --- components: reused from the run where it trained them, else trained here --------------------------------------

def retrieval_adapter(ab: Ablation, cpt: bool, negatives: str, seed: int) -> Component:
    """The retrieval LoRA of `negatives` (hard | random) on the CPT or original backbone, trained with `seed`."""
    if ab.is_run_backbone(cpt) and seed == ab.run_seed:
        path = ab.run_dir / "03_retriever" / "adapters" / negatives
        made = ab.run_metrics("03_retriever").get("retriever", {}).get(negatives, {})
        if (path / "retriever.json").is_file():
            meta = json.loads((path / "retriever.json").read_text())
            return Component(path, meta["trainable_parameters"], made.get("seconds_this_session", float("nan")))
    path = ab.component_dir(cpt, seed) / "retrieval" / negatives
    if not (path / "retriever.json").is_file():
        bb = ab.load(cpt)
        settings = replace(retriever_settings(ab.cfg), seed=seed)
        groups, doc_text = training_data(ab.sets, ab.run_dir / "02_mine_negatives", negatives,
                                         ab.common["passage_format"])
        out = train_retrieval_adapter(bb, groups, doc_text, settings, path.parent / "checkpoints" / negatives)
        save_retrieval_adapter(bb, settings, path, {"variant": negatives, "trainable_parameters":
                                                    trainable_parameters(bb.model), "train_seconds": out["seconds"]})
    meta = json.loads((path / "retriever.json").read_text())
    return Component(path, meta["trainable_parameters"], meta["train_seconds"])


def generation_adapter(ab: Ablation, cpt: bool, seed: int) -> Component:
    """The generation LoRA on the CPT or original backbone, trained with `seed` on 04's training examples."""
    if ab.is_run_backbone(cpt) and seed == ab.run_seed:
        path = ab.run_dir / "04_generator" / "adapters" / GENERATION_ADAPTER
        made = ab.run_metrics("04_generator").get("generator", {})
        if (path / "generator.json").is_file():
            meta = json.loads((path / "generator.json").read_text())
            return Component(path, meta["trainable_parameters"], made.get("seconds_this_session", float("nan")))
    path = ab.component_dir(cpt, seed) / "generation"
    if not (path / "generator.json").is_file():
        bb = ab.load(cpt)
        settings = replace(generator_settings(ab.cfg), seed=seed)
        out = train_generation_adapter(bb, ab.examples(), settings, path.parent / "checkpoints" / "generation")
        save_generation_adapter(bb, settings, path, {"trainable_parameters": trainable_parameters(bb.model),
                                                     "train_seconds": out["seconds"]})
    meta = json.loads((path / "generator.json").read_text())
    return Component(path, meta["trainable_parameters"], meta["train_seconds"])


def fully_shared_adapter(ab: Ablation, lam: float, seed: int) -> Component:
    """One LoRA on the CPT backbone trained on lam * L_retrieval + (1 - lam) * L_generation (03's budget)."""
    from .fullyshared import save_fully_shared, train_fully_shared

    path = ab.out_dir / "components" / "fully_shared" / f"lambda{lam:g}" / f"seed{seed}" / "hard"
    if not (path / "generator.json").is_file():
        bb = ab.load(True)
        retriever, generator = replace(retriever_settings(ab.cfg), seed=seed), replace(generator_settings(ab.cfg),
                                                                                       seed=seed)
        groups, doc_text = training_data(ab.sets, ab.run_dir / "02_mine_negatives", "hard", ab.common["passage_format"])
        out = train_fully_shared(bb, lam, groups, doc_text, ab.examples(), retriever, generator,
                                 path.parent / "checkpoints")
        save_fully_shared(bb, lam, retriever, generator, path,
                          {"trainable_parameters": trainable_parameters(bb.model), "train_seconds": out["seconds"],
                           "retrieval_losses": out["losses"], "generation_losses": out["auxiliary_losses"]})
    meta = json.loads((path / "generator.json").read_text())
    return Component(path, meta["trainable_parameters"], meta["train_seconds"])


# --- evaluation through 05/06's calls -------------------------------------------------------------------------------

@dataclass
class Retrieved:
    """A retriever on the test split: metrics and rankings per data set, seconds per question, index size (MiB)."""

    scores: dict[str, dict]
    rankings: dict[str, dict[str, list[str]]]
    seconds: float
    index_mb: dict[str, float]


def _relative(ab: Ablation, path: Path) -> str:
    return str(path.relative_to(ab.run_dir)) if path.is_relative_to(ab.run_dir) else str(path)


def retrieval_scores(ab: Ablation, bb: Backbone | None, system: str, adapter_root: Path | None, tag: str) -> Retrieved:
    """`system` on the test split, with the size of the index it searched per data set.

    With `adapter_root` None the run's own index (05) is searched; otherwise the corpus is encoded with the adapter
    under `adapter_root` (shards cached by adapter) and indexed under 07 with 05's index_factory, again where 07's
    saved index no longer matches the encoder (a rerun under code that serves the weights otherwise).
    """
    from .systems import build_indexes, index_mismatch

    out_dir = ab.out_dir / "variants" / tag
    index_root = ab.run_dir / "05_index" / "indexes"
    encode = ab.encode(adapter_root or ab.run_dir / "03_retriever" / "adapters")
    if adapter_root is not None:
        index_root = ab.out_dir / "indexes" / tag
        for ds in ab.sets.values():
            diffs = index_mismatch(ds, system, index_root, encode, bb)
            if diffs:
                print(f"07's {system} index of {ds.name} ({tag}) does not match the encoder in use "
                      f"({'; '.join(diffs)}); building it again")
            if diffs is None or diffs:
                build_indexes(ds, [system], index_root, encode, bb)
    start = time.perf_counter()
    depth = max(10, generator_settings(ab.cfg).top_k)
    metrics = evaluate_retrieval_systems(ab.sets, [system], index_root, encode, depth, out_dir, "test", bb)
    seconds = (time.perf_counter() - start) / sum(len(ds.split("test")) for ds in ab.sets.values())
    rankings = {name: json.loads((out_dir / "runs" / name / f"{system}.json").read_text()) for name in ab.sets}
    index_mb = {name: folder_mb(index_root / name / system) for name in ab.sets}
    return Retrieved({name: by[system] for name, by in metrics.items()}, rankings, seconds, index_mb)


def generation_scores(ab: Ablation, bb: Backbone, generator_dir: Path, rankings: dict | None, tag: str,
                      system: str = "bsharedrag") -> dict:
    """{dataset: generation metrics} of the generation LoRA in `generator_dir` with the top documents of
    `rankings` (None: closed book); `system` base_rag answers with the bare backbone and the same prompts. Each
    carries `answers_file` (relative to the run) and `answers_system`: where its per-question answers are."""
    settings = load_copy(bb, generator_dir, GENERATION_ADAPTER) if is_copy(generator_dir) \
        else attach_generation_adapter(bb, generator_dir)
    system = "closed_book" if rankings is None else system
    out_dir = ab.out_dir / "variants" / tag
    found = evaluate_generation(ab.sets, [system], rankings or {}, bb, settings, ab.decode, ab.questions,
                                ab.common["passage_format"], out_dir, ab.run_seed)
    return {name: {**by[system], "answers_file": _relative(ab, out_dir / "generations" / f"{name}.jsonl"),
                   "answers_system": system} for name, by in found.items()}


def from_06(ab: Ablation, system: str, generation: Component) -> dict | None:
    """06's generation metrics of `system` where 06 computed exactly what 07 would: the run's generation adapter, the
    same questions and decoding (greedy), documents from the same retriever; None where anything differs."""
    s06 = ab.cfg.get("06_evaluate", {})
    same = (generation.path == ab.run_dir / "04_generator" / "adapters" / GENERATION_ADAPTER
            and s06.get("generation_questions") == ab.questions and not s06.get("do_sample")
            and all(s06.get(f"max_new_tokens_{lang}") == d.max_new_tokens and not d.do_sample
                    for lang, d in ab.decode.items())
            and system in s06.get("generation_systems", [])
            and (system == "closed_book" or s06.get("generation_retriever") == "bsharedrag"))
    found = ab.run_metrics("06_evaluate").get("generation", {}) if same else {}
    if not all(system in found.get(n, {}) for n in ab.sets):
        return None
    return {name: {**found[name][system], "answers_file": f"06_evaluate/generations/{name}.jsonl",
                   "answers_system": system} for name in ab.sets}


def saved_answers(ab: Ablation, row: dict) -> dict[str, str]:
    """{qid: answer} a result row's system saved (its `answers_file`); empty where there is none."""
    path = ab.run_dir / row["answers_file"] if row.get("answers_file") else None
    if path is None or not path.is_file():
        return {}
    return {r["qid"]: r["answer"] for r in read_jsonl(path) if r.get("system") == row.get("answers_system")}


def backbone_mb(bb: Backbone) -> float:
    """The backbone's own weights, without any adapter it carries."""
    return sum(p.numel() * p.element_size() for n, p in bb.model.named_parameters() if "lora_" not in n) / 2**20


def _rows(variant: str, seed: int, retrieval: Retrieved | None, generation: dict | None, costs: dict,
          lam: float | None = None) -> list[dict]:
    """One row per data set; its memory is the weights in `costs` plus the index that data set's retriever searched."""
    names = list((generation or (retrieval.scores if retrieval else {})).keys())
    rows = []
    for name in names:
        row = {"variant": variant, "dataset": name, "seed": seed, "lambda": lam}
        if retrieval:
            row.update({m: retrieval.scores[name].get(m) for m in RETRIEVAL_COLUMNS})
        if generation:
            g = generation[name]
            row.update({m: g.get(m) for m in GENERATION_COLUMNS})
            row["n_generation"] = g.get("n")
            row["bertscore_model"] = g.get("bertscore_model")
            row["answers_file"], row["answers_system"] = g.get("answers_file"), g.get("answers_system")
            gen_s = g.get("seconds_per_question", 0.0)
        else:
            gen_s = 0.0
        row.update(costs)
        row["inference_memory_mb"] = costs["inference_memory_mb"] + (retrieval.index_mb[name] if retrieval else 0.0)
        row["seconds_per_question"] = (retrieval.seconds if retrieval else 0.0) + gen_s
        rows.append(row)
    return rows


# --- the variants ----------------------------------------------------------------------------------------------------

def skipped_variants(ab: Ablation, variants: list[str]) -> dict[str, str]:
    """The requested variants this run cannot measure, each with why and the fix."""
    skipped = {}
    if "wo_cpt" in variants and not ab.has_cpt:
        skipped["wo_cpt"] = ("this run has no continual pre-training (common.use_pretrained_backbone: false), so w/o "
                             "CPT would be bsharedrag itself; set use_pretrained_backbone: true (01 then pre-trains) "
                             "to measure it")
    return skipped


def adapted_variant(ab: Ablation, variant: str, seed: int, cpt: bool, negatives: str) -> list[dict]:
    """bsharedrag / wo_cpt / wo_hard_negatives: a retrieval LoRA and the generation LoRA on one backbone."""
    if not cpt and not ab.has_cpt:
        raise ValueError(f"{variant}: {skipped_variants(ab, ['wo_cpt'])['wo_cpt']}")
    retrieval = retrieval_adapter(ab, cpt, negatives, seed)
    generation = generation_adapter(ab, cpt, seed)
    bb = ab.load(cpt)
    reuse = retrieval.path.parent == ab.run_dir / "03_retriever" / "adapters"
    system = "bsharedrag" if negatives == "hard" else "bsharedrag_random_negatives"
    tag = f"{variant}/seed{seed}"
    found = retrieval_scores(ab, bb, system, None if reuse else retrieval.path.parent, tag)
    answers = (reuse and negatives == "hard" and from_06(ab, "bsharedrag", generation)) or \
        generation_scores(ab, bb, generation.path, found.rankings, tag)
    costs = {"trainable_parameters": retrieval.trainable + generation.trainable,
             "inference_memory_mb": backbone_mb(bb) + folder_mb(retrieval.path) + folder_mb(generation.path),
             "training_seconds": retrieval.seconds + generation.seconds}
    return _rows(variant, seed, found, answers, costs)


def separate_retriever_variant(ab: Ablation, variant: str, seed: int) -> list[dict]:
    """separate_minilm / separate_bm25: an off-the-shelf retriever (05's index) next to the generation LoRA."""
    from .encoders import _minilm

    system = variant.split("_", 1)[1]
    generation = generation_adapter(ab, True, seed)
    bb = ab.load(True)
    found = retrieval_scores(ab, None if system == "bm25" else bb, system, None, f"{variant}/seed{seed}")
    answers = generation_scores(ab, bb, generation.path, found.rankings, f"{variant}/seed{seed}")
    retriever_mb = weights_mb(_minilm(None)) if system == "minilm" else 0.0  # BM25: its index is all it holds
    costs = {"trainable_parameters": generation.trainable, "training_seconds": generation.seconds,
             "inference_memory_mb": backbone_mb(bb) + folder_mb(generation.path) + retriever_mb}
    return _rows(variant, seed, found, answers, costs)


def separate_backbones_variant(ab: Ablation, seed: int, learning_rate: float) -> list[dict]:
    """Separate RAG (b): two backbone copies, each with its top `lora_layers` layers fully fine-tuned for its own task
    (03's mined groups and 04's examples, their step budgets), held side by side at inference."""
    root = ab.out_dir / "components" / "separate" / f"seed{seed}"
    if not is_copy(root / "retrieval_copy"):
        groups, doc_text = training_data(ab.sets, ab.run_dir / "02_mine_negatives", "hard", ab.common["passage_format"])
        train_retrieval_copy(ab.load(True), groups, doc_text,
                             replace(retriever_settings(ab.cfg), seed=seed, full_learning_rate=learning_rate),
                             root / "retrieval_copy", root / "checkpoints" / "retrieval")
    if not is_copy(root / "generation_copy"):
        train_generation_copy(ab.load(True), ab.examples(),
                              replace(generator_settings(ab.cfg), seed=seed, full_learning_rate=learning_rate),
                              root / "generation_copy", root / "checkpoints" / "generation")
    metas = [read_copy_meta(root / c) for c in ("retrieval_copy", "generation_copy")]
    retriever_bb, generator_bb = ab.load(True), ab.load(True)  # two backbones in memory
    tag = f"separate_backbones/seed{seed}"
    found = retrieval_scores(ab, retriever_bb, "separate_backbones", root, tag)
    answers = generation_scores(ab, generator_bb, root / "generation_copy", found.rankings, tag)
    costs = {"trainable_parameters": sum(m["trainable_parameters"] for m in metas),
             "training_seconds": sum(m["train_seconds"] for m in metas),
             "inference_memory_mb": backbone_mb(retriever_bb) + backbone_mb(generator_bb)}
    return _rows("separate_backbones", seed, found, answers, costs)


def fully_shared_variant(ab: Ablation, lam: float, seed: int) -> list[dict]:
    """One LoRA for both stages, trained on lam * L_retrieval + (1 - lam) * L_generation."""
    adapter = fully_shared_adapter(ab, lam, seed)
    bb = ab.load(True)
    tag = f"fully_shared/lambda{lam:g}/seed{seed}"
    found = retrieval_scores(ab, bb, "bsharedrag", adapter.path.parent, tag)
    answers = generation_scores(ab, bb, adapter.path, found.rankings, tag)
    costs = {"trainable_parameters": adapter.trainable, "training_seconds": adapter.seconds,
             "inference_memory_mb": backbone_mb(bb) + folder_mb(adapter.path)}
    return _rows(f"fully_shared_{lam:g}", seed, found, answers, costs, lam)


def base_rag_variant(ab: Ablation, seed: int) -> list[dict]:
    """The CPT backbone with no adapter answering from the retrieval LoRA's documents (06's `base_rag`)."""
    retrieval = retrieval_adapter(ab, True, "hard", seed)
    generation = generation_adapter(ab, True, seed)  # only for its prompt settings; base_rag answers without it
    bb = ab.load(True)
    reuse = retrieval.path.parent == ab.run_dir / "03_retriever" / "adapters"
    tag = f"base_rag/seed{seed}"
    found = retrieval_scores(ab, bb, "bsharedrag", None if reuse else retrieval.path.parent, tag)
    answers = (reuse and from_06(ab, "base_rag", generation)) or \
        generation_scores(ab, bb, generation.path, found.rankings, tag, system="base_rag")
    costs = {"trainable_parameters": retrieval.trainable, "training_seconds": retrieval.seconds,
             "inference_memory_mb": backbone_mb(bb) + folder_mb(retrieval.path)}
    return _rows("base_rag", seed, found, answers, costs)


def closed_book_variant(ab: Ablation, seed: int) -> list[dict]:
    generation = generation_adapter(ab, True, seed)
    bb = ab.load(True)
    answers = from_06(ab, "closed_book", generation) or \
        generation_scores(ab, bb, generation.path, None, f"closed_book/seed{seed}")
    costs = {"trainable_parameters": generation.trainable, "training_seconds": generation.seconds,
             "inference_memory_mb": backbone_mb(bb) + folder_mb(generation.path)}
    return _rows("closed_book", seed, None, answers, costs)


def on_prag_questions(ab: Ablation, bb: Backbone, source: dict, queries: pd.DataFrame, references: list[list[str]],
                      rankings: dict, n_questions: int) -> dict:
    """`source` (a bsharedrag or base_rag row) scored on Parametric RAG's questions only: from the answers it saved
    where they cover those questions, else answered here with the same retriever's documents and decoding."""
    from .genmetrics import default_bertscorer, generation_metrics

    name, seed, system = source["dataset"], source["seed"], source["variant"]
    ds = ab.sets[name]
    saved = saved_answers(ab, source)
    if all(q in saved for q in queries["qid"]):
        scores = generation_metrics([saved[q] for q in queries["qid"]], references, ds.lang,
                                    default_bertscorer(ds.lang))
        answers_file, how = source["answers_file"], "its saved answers"
    else:
        generation = generation_adapter(ab, True, seed)
        subset = replace(ab, sets={name: ds}, questions=n_questions)  # generation_questions picks PRAG's questions
        scores = generation_scores(subset, bb, generation.path, rankings, f"{system}{ON_PRAG_QUESTIONS}/seed{seed}",
                                   system=system)[name]
        answers_file, how = scores["answers_file"], "answered here"
    costs = ("trainable_parameters", "training_seconds", "inference_memory_mb", "seconds_per_question")
    return {"variant": f"{system}{ON_PRAG_QUESTIONS}", "dataset": name, "seed": seed, "lambda": None,
            **{m: scores[m] for m in GENERATION_COLUMNS}, "n_generation": scores["n"],
            "bertscore_model": scores["bertscore_model"], **{c: source.get(c) for c in costs},
            "answers_file": answers_file, "answers_system": system, "scored_from": how}


def prag_variant(ab: Ablation, seed: int, settings, datasets: list[str], n_questions: int, results: list[dict],
                 keep: Callable[[list[dict]], list[dict]]) -> None:
    """Parametric RAG on the CPT backbone with the bsharedrag retriever's top-k documents, in both modes, then this
    seed's bsharedrag and base_rag rows scored on the same questions; each row is kept as it finishes.

    Document LoRAs are cached by document hash in the run's cache/prag, so other questions, modes, reruns and (their
    self-augmented texts) other seeds reuse them. The cost columns count every document LoRA the questions use,
    whenever it was trained (its prag.json): the retrieval LoRA plus per-document LoRAs in `trainable_parameters`,
    the retrieval LoRA's training plus document encoding (self-augmentation + LoRA training) in `training_seconds`.
    """
    from .genmetrics import default_bertscorer, generation_metrics
    from .prag import DocumentAdapterCache, ParametricRAG, PRAGSettings, rejection_tally

    unknown = [n for n in datasets if n not in ab.sets]
    if unknown:
        raise ValueError(f"prag_datasets {unknown} are not data sets of this run; use some of {list(ab.sets)}")

    def row_of(variant: str, name: str) -> dict | None:
        return next((r for r in results if (r["variant"], r["dataset"], r["seed"]) == (variant, name, seed)), None)

    wanted = [f"prag_{m}" for m in PRAG_MODES] + [f"{p}{ON_PRAG_QUESTIONS}" for p in PRAG_PEERS]
    todo = [n for n in datasets if any(row_of(v, n) is None for v in wanted)]
    if not todo:
        return
    retrieval = retrieval_adapter(ab, True, "hard", seed)
    bb = ab.load(True)
    gen = generator_settings(ab.cfg)
    tag = f"prag/seed{seed}"
    reuse = retrieval.path.parent == ab.run_dir / "03_retriever" / "adapters"
    found = retrieval_scores(ab, bb, "bsharedrag", None if reuse else retrieval.path.parent, tag)
    cache = DocumentAdapterCache(ab.run_dir / "cache" / "prag", bb, replace(settings or PRAGSettings(), seed=seed))
    for name in todo:
        ds = ab.sets[name]
        queries = generation_questions(ds, n_questions, ab.run_seed)
        text = dict(zip(ds.corpus["doc_id"], ds.passages(ab.common["passage_format"])))
        docs = [[(d, text[d]) for d in found.rankings[name][q][:gen.top_k]] for q in queries["qid"]]
        references = [[a for a in ds.answers[q] if a.strip()] for q in queries["qid"]]
        used = [d for row in docs for d in row]
        made = cache.ensure(used, ds.lang)
        spent = cache.encoding_cost(used, ds.lang)
        rejected = rejection_tally(cache.augmentations(used, ds.lang))
        atomic_write_json(ab.out_dir / "variants" / tag / f"{name}_augmentation_rejections.json", rejected)
        print(f"{name}: self-augmentation outputs rejected, by attempt and check: {rejected or 'none recorded'}")
        rag = ParametricRAG(bb, cache, gen, ab.decode[ds.lang])
        costs = {"trainable_parameters": retrieval.trainable + spent["documents"] * cache.adapter_parameters(),
                 "document_lora_parameters": cache.adapter_parameters(),
                 "training_seconds": retrieval.seconds + spent["seconds"],
                 "documents_encoded": spent["documents"], "documents_reused": made["reused"],
                 "document_encoding_seconds": spent["seconds"],
                 "inference_memory_mb": backbone_mb(bb) + folder_mb(retrieval.path) + found.index_mb[name]
                 + rag.held_adapter_mb(len(queries))}
        for mode in PRAG_MODES:
            if row_of(f"prag_{mode}", name) is not None:
                continue
            start = time.perf_counter()
            answers = rag.answer_many(list(queries["text"]), docs, ds.lang, mode)["answers"]
            answer_s = (time.perf_counter() - start) / max(len(queries), 1)
            scores = generation_metrics(answers, references, ds.lang, default_bertscorer(ds.lang))
            path = ab.out_dir / "variants" / tag / f"{name}_{mode}.json"
            atomic_write_json(path, [{"qid": q, "answer": a, "documents": [d for d, _ in row], "references": refs}
                                     for q, a, row, refs in zip(queries["qid"], answers, docs, references)])
            keep([{"variant": f"prag_{mode}", "dataset": name, "seed": seed, "lambda": None,
                   **{m: scores[m] for m in GENERATION_COLUMNS}, "n_generation": scores["n"],
                   "bertscore_model": scores["bertscore_model"], **costs,
                   "seconds_per_question": found.seconds + answer_s, "answers_file": _relative(ab, path)}])
        for peer in PRAG_PEERS:
            source = row_of(peer, name)
            if source is not None and row_of(f"{peer}{ON_PRAG_QUESTIONS}", name) is None:
                keep([on_prag_questions(ab, bb, source, queries, references, found.rankings, n_questions)])


def _family(variant: str) -> str:
    if variant.startswith("fully_shared_"):
        return "fully_shared"
    if variant.startswith("prag_") or ON_PRAG_QUESTIONS in variant:
        return "prag"
    return variant


CONTEXT = "context.json"
# What 07 reads of the steps before it: a change in any of these makes its saved rows and components stale.
INPUT_GLOBS = ("02_mine_negatives/*.jsonl", "03_retriever/adapters/*/adapter_model.safetensors",
               "04_generator/adapters/*/adapter_model.safetensors", "04_generator/examples.jsonl",
               "05_index/indexes/*/*/manifest.json", "06_evaluate/metrics.json")


def ablation_context(ab: Ablation, settings: dict) -> dict:
    """What every saved row and component of 07 depends on: the run's config of 01-06, 07's own settings other than
    which rows to produce, and the sha256 of each input file 07 reads."""
    config = {k: identifying(k, v) for k, v in ab.cfg.items() if k[:2].isdigit() and k[:2] < "07" or k == "common"}
    inputs = {str(p.relative_to(ab.run_dir)): sha256_file(p)
              for pattern in INPUT_GLOBS for p in sorted(ab.run_dir.glob(pattern))}
    decode = {lang: d.__dict__ for lang, d in ab.decode.items()}
    key = sha256_json({"config": config, "settings": settings, "decode": decode, "questions": ab.questions,
                       "inputs": inputs})
    return {"key": key, "inputs": inputs, "settings": settings}


def set_aside_if_stale(ab: Ablation, context: dict) -> str | None:
    """Move 07's saved rows and components aside when they were made under another context (nothing is deleted);
    returns why, or None when they are current (or there are none)."""
    path = ab.out_dir / CONTEXT
    saved = json.loads(path.read_text()) if path.is_file() else None
    made = [p for p in (ab.out_dir / n for n in ("results.jsonl", "components", "variants", "indexes")) if p.exists()]
    why = None
    if made and saved is None:
        why = f"they carry no {CONTEXT}"
    elif made and saved["key"] != context["key"]:
        changed = sorted({*saved["inputs"], *context["inputs"]} - {k for k in context["inputs"]
                                                                   if saved["inputs"].get(k) == context["inputs"][k]})
        why = f"inputs changed: {', '.join(changed[:5])}" if changed else "the run's config or 07's settings changed"
    if why:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = next(p for p in (ab.out_dir / f"stale-{stamp}-{n}" for n in range(1000)) if not p.exists())
        aside.mkdir()
        for p in made:
            os.replace(p, aside / p.name)
        print(f"07's earlier rows and components were set aside in {aside.name}/ ({why}); they are made again")
    atomic_write_json(path, context)
    return why


def run_variants(ab: Ablation, variants: list[str], seeds: list[int], lambdas: list[float], prag_settings=None,
                 prag_datasets: list[str] | None = None, prag_questions: int = 0,
                 seed_variants: list[str] | None = None, separate_learning_rate: float = 5e-5) -> pd.DataFrame:
    """Every requested row at every seed it runs at (`runs_at_seed`; fully shared: every lambda), saved to
    results.jsonl as it finishes (Parametric RAG: per data set and mode), so a failure loses only the row in progress.

    `prag_questions` is the number of test questions with an answer Parametric RAG answers per data set (0: all).
    """
    check_variants(variants)
    if not seeds:
        raise ValueError("seeds is empty; give at least one training seed, e.g. [0]")
    seed_variants = list(seed_variants or [])
    check_seed_variants(seed_variants, variants, lambdas)
    skipped = skipped_variants(ab, variants)
    for variant, why in skipped.items():
        print(f"skipping {variant}: {why}")
    set_aside_if_stale(ab, ablation_context(ab, {
        "prag": prag_settings.__dict__ if prag_settings is not None else None, "prag_datasets": prag_datasets,
        "prag_questions": prag_questions, "separate_learning_rate": separate_learning_rate}))
    results_path = ab.out_dir / "results.jsonl"
    done = read_jsonl(results_path) if results_path.is_file() else []
    rows = [r for r in done if r["variant"] not in skipped]  # never keep a skipped variant's row from an older run

    def have(variant: str, seed: int) -> list[dict]:
        return [r for r in rows if r["variant"] == variant and r["seed"] == seed]

    def keep(new: list[dict]) -> list[dict]:
        rows.extend(new)
        atomic_write_jsonl(results_path, rows)
        return new

    todo = [v for v in variants if v not in skipped]
    todo = [v for v in todo if v != "prag"] + [v for v in todo if v == "prag"]  # prag last: its peers come first
    for seed in seeds:
        def at(name: str) -> bool:
            return runs_at_seed(name, seed, seeds, seed_variants)

        shared = have("bsharedrag", seed)
        if not shared and any(v in todo and at(v) for v in ("bsharedrag", "prag")):
            shared = keep(adapted_variant(ab, "bsharedrag", seed, True, "hard"))
        for variant in todo:
            if variant == "bsharedrag":
                continue
            if variant == "fully_shared":
                for lam in lambdas:
                    if at(f"fully_shared_{lam:g}") and not have(f"fully_shared_{lam:g}", seed):
                        keep(fully_shared_variant(ab, lam, seed))
                continue
            if not at(variant):
                continue
            if variant == "prag":
                prag_variant(ab, seed, prag_settings, prag_datasets or list(ab.sets), prag_questions, rows, keep)
                continue
            if have(variant, seed):
                continue
            if variant == "wo_cpt":
                keep(adapted_variant(ab, variant, seed, False, "hard"))
            elif variant == "wo_hard_negatives":
                keep(adapted_variant(ab, variant, seed, True, "random"))
            elif variant in ("separate_minilm", "separate_bm25"):
                keep(separate_retriever_variant(ab, variant, seed))
            elif variant == "separate_backbones":
                keep(separate_backbones_variant(ab, seed, separate_learning_rate))
            elif variant == "closed_book":
                keep(closed_book_variant(ab, seed))
            elif variant == "base_rag":
                keep(base_rag_variant(ab, seed))
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    order = {v: i for i, v in enumerate(["bsharedrag"] + [v for v in variants if v != "bsharedrag"])}
    frame["_order"] = [order.get(_family(v), 99) for v in frame["variant"]]
    return frame.sort_values(["_order", "variant", "dataset", "seed"]).drop(columns="_order").reset_index(drop=True)


def replicate_context(run_dir: str | Path) -> str:
    """Which runs' rows at one seed are one replicate measured again: 07's context key (ablation_context: the run's
    01-06 config and inputs, 07's settings) on the same boot of the same machine (env.txt's boot id: a seed reproduces
    to the last digit there, not on another machine; README, "The grid's headline rows at further seeds"). The run's
    own name where 07 or the run wrote neither."""
    run_dir = Path(run_dir)
    context, env = run_dir / "07_ablations" / CONTEXT, run_dir / "env.txt"
    boot = next((line.split(":", 1)[1].strip() for line in env.read_text().splitlines() if line.startswith("boot id:")),
                "") if env.is_file() else ""
    if not (context.is_file() and boot):
        return run_dir.name
    return f"{json.loads(context.read_text())['key'][:16]}@{boot[:8]}"


def gather(run_dirs: list[str | Path]) -> pd.DataFrame:
    """The results of 07 in several runs (e.g. one per seed or per backbone) in one long-form frame with `run` and
    `context` columns: (context, seed) is what tells replicates apart (replicate_context), so every run has its own
    seed 0 unless it repeats another's inputs and settings on the same machine, where its rows are repeats."""
    names = [Path(run).name for run in run_dirs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"run(s) {twice} are listed more than once in gather_runs; list each run once")
    frames = []
    for run in run_dirs:
        path = Path(run) / "07_ablations" / "results.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run 07_ablations in {run} first")
        frame = pd.DataFrame(read_jsonl(path))
        frames.append(frame.assign(run=Path(run).name, context=replicate_context(run)))
    return pd.concat(frames, ignore_index=True)


def table_columns(results: pd.DataFrame) -> tuple[list[str], list[str]]:
    """The quality metrics and the costs `results` holds, in the order 07's tables show them."""
    from .plots import COST_COLUMNS

    return ([m for m in (*RETRIEVAL_COLUMNS, *GENERATION_COLUMNS) if m in results],
            [c for c in COST_COLUMNS if c in results])


CLAIMS = (  # the paper's directions: (claim, the side expected to be at least as good, the other side)
    ("shared backbone >= separate retriever (MiniLM)", "bsharedrag", "separate_minilm"),
    ("shared backbone >= separate retriever (BM25)", "bsharedrag", "separate_bm25"),
    ("shared backbone >= separate fine-tuned backbones", "bsharedrag", "separate_backbones"),
    ("shared backbone >= fully shared (best lambda)", "bsharedrag", "fully_shared"),
    ("continual pre-training helps", "bsharedrag", "wo_cpt"),
    ("hard negatives help", "bsharedrag", "wo_hard_negatives"),
    ("retrieval helps", "bsharedrag", "closed_book"),
    ("generation LoRA >= bare backbone, same documents", "bsharedrag", "base_rag"),
    ("BSharedRAG >= Parametric RAG (+ documents), same questions", f"bsharedrag{ON_PRAG_QUESTIONS}",
     "prag_parametric_docs"),
    ("BSharedRAG >= Parametric RAG (parametric only), same questions", f"bsharedrag{ON_PRAG_QUESTIONS}",
     "prag_parametric"),
    ("document LoRAs add to in-context documents, same questions", "prag_parametric_docs",
     f"base_rag{ON_PRAG_QUESTIONS}"),
)
DIRECTION_COLUMNS = ("claim", "dataset", "metric", "ours", "other", "ours_mean", "other_mean", "margin", "spread",
                     "replicates", "verdict", "holds")


def _replicates(results: pd.DataFrame) -> pd.Series:
    """What tells one replicate of a row from another (plots.replicate_key); without it, every row is its own
    replicate and nothing pairs."""
    from .plots import replicate_key

    keys = replicate_key(results)
    if not keys or results.empty:  # (agg over no rows gives a frame, not a series)
        return pd.Series(results.index.astype(str), index=results.index)
    return results[keys].astype(str).agg("/".join, axis=1)


def _side(values: pd.Series, variant: str) -> dict | None:
    if values.empty:
        return None
    std = values.std()
    return {"variant": variant, "mean": float(values.mean()), "std": 0.0 if pd.isna(std) else float(std),
            "n": int(values.shape[0])}


def _matched(keyed: pd.DataFrame, ours: str, other: str, dataset: str, metric: str) -> tuple[dict | None, dict | None]:
    """Both sides' mean, std and count over the replicates they share (a paired comparison); over all of each
    side's replicates where they share none. A row trained at seed 0 only is thus set against our seed 0, not
    against our mean over seeds it never ran. `keyed` holds a `_replicate` column (see _replicates)."""
    def values(variant: str) -> pd.Series:
        rows = keyed[(keyed["variant"] == variant) & (keyed["dataset"] == dataset)]
        return rows.groupby("_replicate")[metric].mean().dropna()

    mine, theirs = values(ours), values(other)
    common = mine.index.intersection(theirs.index)
    if len(common):
        mine, theirs = mine[common], theirs[common]
    return _side(mine, ours), _side(theirs, other)


def directions(results: pd.DataFrame, metrics: tuple[str, ...] = ("ndcg@5", "bleu3", "rougeL"),
               each_lambda: bool = False) -> pd.DataFrame:
    """Per claim, data set and metric: our side's mean over replicates against the other's (Fully Shared: its best
    lambda, or with `each_lambda` one row per lambda), with a verdict.

    The two sides are compared on the replicates ((run, seed), or seed) they share, so a row trained at one seed
    meets ours at that seed. `margin` is ours minus theirs; a margin within `spread` (the larger sample std over
    replicates of the two sides; 0 with one replicate each) is a `tie`, not a direction held. Retrieval metrics are
    compared only where both sides rank with a retriever of their own (base_rag and Parametric RAG reuse
    bsharedrag's: their margin would be 0).
    """
    metrics = [m for m in metrics if m in results.columns]
    variants = list(results["variant"].unique())
    keyed = results.assign(_replicate=_replicates(results))
    out = []
    for claim, ours, other in CLAIMS:
        candidates = [v for v in variants if v.startswith("fully_shared_")] if other == "fully_shared" else [other]
        for dataset in sorted(results["dataset"].unique()):
            for metric in metrics:
                if metric in RETRIEVAL_COLUMNS and not (has_own_retriever(ours) and has_own_retriever(other)):
                    continue
                pairs = [_matched(keyed, ours, v, dataset, metric) for v in candidates]
                pairs = [(mine, theirs) for mine, theirs in pairs if mine is not None and theirs is not None]
                if not pairs:
                    continue
                if not (each_lambda and other == "fully_shared"):
                    pairs = [max(pairs, key=lambda pair: pair[1]["mean"])]
                for mine, theirs in pairs:
                    margin, spread = mine["mean"] - theirs["mean"], max(mine["std"], theirs["std"])
                    verdict = "tie" if abs(margin) <= spread + 1e-12 else "holds" if margin > 0 else "fails"
                    out.append({"claim": claim, "dataset": dataset, "metric": metric, "ours": ours,
                                "other": theirs["variant"], "ours_mean": mine["mean"], "other_mean": theirs["mean"],
                                "margin": margin, "spread": spread, "replicates": min(mine["n"], theirs["n"]),
                                "verdict": verdict, "holds": verdict == "holds"})
    return pd.DataFrame(out, columns=list(DIRECTION_COLUMNS))


def lambda_verdicts(results: pd.DataFrame, metrics: tuple[str, ...] = ("ndcg@5", "bleu3", "rougeL")) -> pd.DataFrame:
    """BSharedRAG against every Fully Shared lambda apart, as `directions` compares two rows: one row per lambda, one
    column per (data set, metric), cells "holds +0.036" (verdict, margin), and the replicates the lambda shares with
    BSharedRAG. Nothing is picked on the test questions, unlike the best lambda per metric of `directions`, whose
    maximum over several noisy means favours Fully Shared RAG. Empty without a bsharedrag row or a lambda."""
    claims = directions(results, metrics, each_lambda=True)
    claims = claims[claims["ours"].eq("bsharedrag") & claims["other"].str.startswith("fully_shared_")]
    if claims.empty:
        return pd.DataFrame()
    cells = claims.assign(cell=[f"{v} {m:+.3f}" for v, m in zip(claims["verdict"], claims["margin"])])
    table = cells.pivot(index="other", columns=["dataset", "metric"], values="cell")
    order = sorted(table.columns, key=lambda c: (c[0], list(metrics).index(c[1])))  # data sets, then metrics as given
    table = table[order].set_axis([f"{dataset} {metric}" for dataset, metric in order], axis=1)
    table["replicates"] = claims.groupby("other")["replicates"].min()
    table.index = [f"lambda {float(v.removeprefix('fully_shared_')):g}" for v in table.index]
    return table.sort_index()
