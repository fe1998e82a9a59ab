"""07_ablations: every variant of the paper trained and evaluated through the same library calls, on the run's
splits and step budget, one long-form row per (variant, data set, seed).

What a seed varies is training (initialisation, batch order): the data split and the evaluated questions stay the
run's. A component the run already trained (03's adapters, 04's adapter, on the run's backbone and seed) is reused;
any other (another seed, the original backbone, a Fully Shared LoRA) is trained here with 03's and 04's settings into
`07_ablations/components/`, saved as it finishes, and reused by a rerun.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from .artefacts import atomic_write_json
from .backbone import Backbone, load_backbone
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
from .systems import EncodeSettings

VARIANTS = {
    "bsharedrag": "continually pre-trained backbone + retrieval LoRA (hard negatives) + generation LoRA, one backbone",
    "wo_cpt": "the same on the original backbone (no continual pre-training)",
    "wo_hard_negatives": "the retrieval LoRA trained with random instead of mined negatives (+ in-batch)",
    "separate_minilm": "Separate RAG: off-the-shelf MiniLM retriever + the generation LoRA",
    "separate_bm25": "Separate RAG: BM25 + the generation LoRA",
    "separate_backbones": "Separate RAG: two backbone copies, one per task (its own LoRA each)",
    "fully_shared": "Fully Shared RAG: ONE LoRA trained on lambda*L_ret + (1-lambda)*L_gen",
    "prag": "Parametric RAG: per-document LoRAs merged at answer time (parametric; parametric + documents)",
    "base_rag": "the backbone without adapters + the retrieval LoRA's documents (Parametric RAG's in-context peer)",
    "closed_book": "the generation LoRA without retrieval",
}
RETRIEVAL_COLUMNS = ("ndcg@5", "hit@3")
GENERATION_COLUMNS = ("bleu3", "rougeL", "bertscore_f1", "token_f1")


def check_variants(variants: list[str]) -> None:
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")


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

    def load(self, cpt: bool) -> Backbone:
        return load_backbone(self.source(cpt), compute_dtype=self.common["compute_dtype"], seed=self.run_seed)

    def encode(self, adapter_root: Path | str = "") -> EncodeSettings:
        c = self.common
        return EncodeSettings(c["query_prefix"], c["passage_prefix"], c["max_length"], c["batch_size"],
                              c["passage_format"], adapter_root=str(adapter_root),
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
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def open_ablation(run_dir: str | Path, out_dir: str | Path, questions: int, decode: dict[str, DecodeSettings]) -> Ablation:
    from .config import load_config
    from .data import load_dataset

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "resolved.yaml")
    c = cfg["common"]
    sets = {name: load_dataset(name, c["seed"], c["split_fractions"], c["max_questions"]) for name in c["datasets"]}
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

def retrieval_scores(ab: Ablation, bb: Backbone | None, system: str, adapter_root: Path | None,
                     tag: str) -> tuple[dict, dict, float]:
    """({dataset: metrics}, {dataset: {qid: ranking}}, seconds per question) of `system` on the test split.

    With `adapter_root` None the run's own index (05) is searched; otherwise the corpus is encoded with the adapter
    under `adapter_root` (shards cached by adapter) and indexed under 07.
    """
    from .systems import build_indexes

    out_dir = ab.out_dir / "variants" / tag
    index_root = ab.run_dir / "05_index" / "indexes"
    encode = ab.encode(adapter_root or ab.run_dir / "03_retriever" / "adapters")
    if adapter_root is not None:
        index_root = ab.out_dir / "indexes" / tag
        for ds in ab.sets.values():
            if not (index_root / ds.name / system / "manifest.json").is_file():
                build_indexes(ds, [system], index_root, encode, bb)
    start = time.perf_counter()
    depth = max(10, generator_settings(ab.cfg).top_k)
    metrics = evaluate_retrieval_systems(ab.sets, [system], index_root, encode, depth, out_dir, "test", bb)
    seconds = (time.perf_counter() - start) / sum(len(ds.split("test")) for ds in ab.sets.values())
    rankings = {name: json.loads((out_dir / "runs" / name / f"{system}.json").read_text()) for name in ab.sets}
    return {name: by[system] for name, by in metrics.items()}, rankings, seconds


def generation_scores(ab: Ablation, bb: Backbone, generator_dir: Path, rankings: dict | None, tag: str,
                      system: str = "bsharedrag") -> dict:
    """{dataset: generation metrics} of the generation LoRA in `generator_dir` with the top documents of
    `rankings` (None: closed book); `system` base_rag answers with the bare backbone and the same prompts."""
    settings = attach_generation_adapter(bb, generator_dir)
    system = "closed_book" if rankings is None else system
    return {name: by[system] for name, by in evaluate_generation(
        ab.sets, [system], rankings or {}, bb, settings, ab.decode, ab.questions, ab.common["passage_format"],
        ab.out_dir / "variants" / tag, ab.run_seed).items()}


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
    return {name: found[name][system] for name in ab.sets} if all(system in found.get(n, {}) for n in ab.sets) else None


def backbone_mb(bb: Backbone) -> float:
    """The backbone's own weights, without any adapter it carries."""
    return sum(p.numel() * p.element_size() for n, p in bb.model.named_parameters() if "lora_" not in n) / 2**20


def _rows(variant: str, seed: int, retrieval: dict | None, generation: dict | None, costs: dict,
          lam: float | None = None) -> list[dict]:
    names = list((generation or retrieval).keys())
    rows = []
    for name in names:
        row = {"variant": variant, "dataset": name, "seed": seed, "lambda": lam}
        if retrieval:
            row.update({m: retrieval[name].get(m) for m in RETRIEVAL_COLUMNS})
        if generation:
            g = generation[name]
            row.update({m: g.get(m) for m in GENERATION_COLUMNS})
            row["n_generation"] = g.get("n")
            row["bertscore_model"] = g.get("bertscore_model")
            gen_s = g.get("seconds_per_question", 0.0)
        else:
            gen_s = 0.0
        row.update({k: v for k, v in costs.items() if k != "retrieve_s"})
        row["seconds_per_question"] = costs.get("retrieve_s", 0.0) + gen_s
        rows.append(row)
    return rows


# --- the variants ----------------------------------------------------------------------------------------------------

def adapted_variant(ab: Ablation, variant: str, seed: int, cpt: bool, negatives: str) -> list[dict]:
    """bsharedrag / wo_cpt / wo_hard_negatives: a retrieval LoRA and the generation LoRA on one backbone."""
    retrieval = retrieval_adapter(ab, cpt, negatives, seed)
    generation = generation_adapter(ab, cpt, seed)
    bb = ab.load(cpt)
    reuse = retrieval.path.parent == ab.run_dir / "03_retriever" / "adapters"
    system = "bsharedrag" if negatives == "hard" else "bsharedrag_random_negatives"
    tag = f"{variant}/seed{seed}"
    scores, rankings, retrieve_s = retrieval_scores(ab, bb, system, None if reuse else retrieval.path.parent, tag)
    answers = (reuse and negatives == "hard" and from_06(ab, "bsharedrag", generation)) or \
        generation_scores(ab, bb, generation.path, rankings, tag)
    costs = {"trainable_parameters": retrieval.trainable + generation.trainable,
             "inference_memory_mb": backbone_mb(bb) + folder_mb(retrieval.path) + folder_mb(generation.path),
             "training_seconds": retrieval.seconds + generation.seconds, "retrieve_s": retrieve_s}
    return _rows(variant, seed, scores, answers, costs)


def separate_retriever_variant(ab: Ablation, variant: str, seed: int) -> list[dict]:
    """separate_minilm / separate_bm25: an off-the-shelf retriever next to the generation LoRA."""
    from .encoders import _minilm

    system = variant.split("_", 1)[1]
    generation = generation_adapter(ab, True, seed)
    bb = ab.load(True)
    scores, rankings, retrieve_s = retrieval_scores(ab, None if system == "bm25" else bb, system, None,
                                                    f"{variant}/seed{seed}")
    answers = generation_scores(ab, bb, generation.path, rankings, f"{variant}/seed{seed}")
    retriever_mb = (weights_mb(_minilm(None)) if system == "minilm" else
                    max(folder_mb(ab.run_dir / "05_index" / "indexes" / n / "bm25") for n in ab.sets))
    costs = {"trainable_parameters": generation.trainable, "training_seconds": generation.seconds,
             "inference_memory_mb": backbone_mb(bb) + folder_mb(generation.path) + retriever_mb,
             "retrieve_s": retrieve_s}
    return _rows(variant, seed, scores, answers, costs)


def separate_backbones_variant(ab: Ablation, seed: int, shared_rows: list[dict]) -> list[dict]:
    """Separate RAG with two backbone copies, each carrying its own LoRA: the same weights compute the same
    embeddings and answers as the shared backbone (06's efficiency check asserts the answers are identical), so the
    quality columns are bsharedrag's; what differs is the second backbone in memory."""
    bb = ab.load(True)
    rows = []
    for row in shared_rows:
        rows.append({**row, "variant": "separate_backbones", "inference_memory_mb": row["inference_memory_mb"]
                     + backbone_mb(bb)})
    return rows


def fully_shared_variant(ab: Ablation, lam: float, seed: int) -> list[dict]:
    """One LoRA for both stages, trained on lam * L_retrieval + (1 - lam) * L_generation."""
    adapter = fully_shared_adapter(ab, lam, seed)
    bb = ab.load(True)
    tag = f"fully_shared/lambda{lam:g}/seed{seed}"
    scores, rankings, retrieve_s = retrieval_scores(ab, bb, "bsharedrag", adapter.path.parent, tag)
    answers = generation_scores(ab, bb, adapter.path, rankings, tag)
    costs = {"trainable_parameters": adapter.trainable, "training_seconds": adapter.seconds,
             "inference_memory_mb": backbone_mb(bb) + folder_mb(adapter.path), "retrieve_s": retrieve_s}
    return _rows(f"fully_shared_{lam:g}", seed, scores, answers, costs, lam)


def base_rag_variant(ab: Ablation, seed: int) -> list[dict]:
    """The CPT backbone with no adapter answering from the retrieval LoRA's documents (06's `base_rag`)."""
    retrieval = retrieval_adapter(ab, True, "hard", seed)
    generation = generation_adapter(ab, True, seed)  # only for its prompt settings; base_rag answers without it
    bb = ab.load(True)
    reuse = retrieval.path.parent == ab.run_dir / "03_retriever" / "adapters"
    tag = f"base_rag/seed{seed}"
    scores, rankings, retrieve_s = retrieval_scores(ab, bb, "bsharedrag", None if reuse else retrieval.path.parent, tag)
    answers = (reuse and from_06(ab, "base_rag", generation)) or \
        generation_scores(ab, bb, generation.path, rankings, tag, system="base_rag")
    costs = {"trainable_parameters": retrieval.trainable, "training_seconds": retrieval.seconds,
             "inference_memory_mb": backbone_mb(bb) + folder_mb(retrieval.path), "retrieve_s": retrieve_s}
    return _rows("base_rag", seed, scores, answers, costs)


def closed_book_variant(ab: Ablation, seed: int) -> list[dict]:
    generation = generation_adapter(ab, True, seed)
    bb = ab.load(True)
    answers = from_06(ab, "closed_book", generation) or \
        generation_scores(ab, bb, generation.path, None, f"closed_book/seed{seed}")
    costs = {"trainable_parameters": generation.trainable, "training_seconds": generation.seconds,
             "inference_memory_mb": backbone_mb(bb) + folder_mb(generation.path)}
    return _rows("closed_book", seed, None, answers, costs)


def prag_variant(ab: Ablation, seed: int, settings, datasets: list[str], n_questions: int,
                 shared_rows: list[dict]) -> list[dict]:
    """Parametric RAG on the CPT backbone with the bsharedrag retriever's top-k documents, in both modes.

    Document LoRAs are cached by document hash in the run's cache/prag, so other questions, modes and reruns reuse
    them; the offline cost of encoding documents is reported next to the quality.
    """
    from .genmetrics import default_bertscorer, generation_metrics
    from .prag import DocumentAdapterCache, ParametricRAG

    retrieval = retrieval_adapter(ab, True, "hard", seed)
    bb = ab.load(True)
    gen = generator_settings(ab.cfg)
    tag = f"prag/seed{seed}"
    reuse = retrieval.path.parent == ab.run_dir / "03_retriever" / "adapters"
    _, rankings, retrieve_s = retrieval_scores(ab, bb, "bsharedrag", None if reuse else retrieval.path.parent, tag)
    retrieval_of = {(r["dataset"]): r for r in shared_rows if r["seed"] == seed}
    cache = DocumentAdapterCache(ab.run_dir / "cache" / "prag", bb, replace(settings, seed=seed))
    rows = []
    for name in datasets:
        ds = ab.sets[name]
        queries = generation_questions(ds, n_questions, ab.run_seed)
        text = dict(zip(ds.corpus["doc_id"], ds.passages(ab.common["passage_format"])))
        docs = [[(d, text[d]) for d in rankings[name][q][:gen.top_k]] for q in queries["qid"]]
        references = [[a for a in ds.answers[q] if a.strip()] for q in queries["qid"]]
        start = time.perf_counter()
        encoded = cache.ensure([d for row in docs for d in row], ds.lang)
        encode_s = time.perf_counter() - start
        rag = ParametricRAG(bb, cache, gen, ab.decode[ds.lang])
        for mode in ("parametric", "parametric_docs"):
            start = time.perf_counter()
            out = rag.answer_many(list(queries["text"]), docs, ds.lang, mode)
            answer_s = (time.perf_counter() - start) / max(len(queries), 1)
            answers = out["answers"] if isinstance(out, dict) else out
            scores = generation_metrics(answers, references, ds.lang, default_bertscorer(ds.lang))
            atomic_write_json(ab.out_dir / "variants" / tag / f"{name}_{mode}.json",
                              [{"qid": q, "answer": a, "documents": [d for d, _ in row], "references": refs}
                               for q, a, row, refs in zip(queries["qid"], answers, docs, references)])
            shared = retrieval_of.get(name, {})
            rows.append({"variant": f"prag_{mode}", "dataset": name, "seed": seed, "lambda": None,
                         **{m: shared.get(m) for m in RETRIEVAL_COLUMNS},
                         **{m: scores[m] for m in GENERATION_COLUMNS}, "n_generation": scores["n"],
                         "bertscore_model": scores["bertscore_model"],
                         "trainable_parameters": cache.adapter_parameters(),
                         "inference_memory_mb": backbone_mb(bb) + folder_mb(retrieval.path)
                         + gen.top_k * cache.adapter_mb(),
                         "training_seconds": retrieval.seconds, "seconds_per_question": retrieve_s + answer_s,
                         "documents_encoded": encoded["encoded"], "documents_reused": encoded["reused"],
                         "document_encoding_seconds": encode_s})
    return rows


def run_variants(ab: Ablation, variants: list[str], seeds: list[int], lambdas: list[float], prag_settings=None,
                 prag_datasets: list[str] | None = None, prag_questions: int = 0) -> pd.DataFrame:
    """Every requested variant for every seed (fully shared: every lambda); rows saved as each variant finishes."""
    check_variants(variants)
    results_path = ab.out_dir / "results.jsonl"
    done = [json.loads(line) for line in results_path.read_text().splitlines()] if results_path.is_file() else []
    rows = list(done)

    def have(variant: str, seed: int) -> list[dict]:
        return [r for r in rows if r["variant"] == variant and r["seed"] == seed]

    def keep(new: list[dict]) -> list[dict]:
        rows.extend(new)
        from .artefacts import atomic_write_text

        atomic_write_text(results_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        return new

    for seed in seeds:
        shared = have("bsharedrag", seed)
        if not shared and ({"bsharedrag", "separate_backbones", "prag"} & set(variants)):
            shared = keep(adapted_variant(ab, "bsharedrag", seed, True, "hard"))
        for variant in variants:
            if variant in ("bsharedrag",):
                continue
            if variant == "fully_shared":
                for lam in lambdas:
                    if not have(f"fully_shared_{lam:g}", seed):
                        keep(fully_shared_variant(ab, lam, seed))
                continue
            if variant == "prag":
                if not have("prag_parametric", seed):
                    keep(prag_variant(ab, seed, prag_settings, prag_datasets or list(ab.sets), prag_questions, shared))
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
                keep(separate_backbones_variant(ab, seed, shared))
            elif variant == "closed_book":
                keep(closed_book_variant(ab, seed))
            elif variant == "base_rag":
                keep(base_rag_variant(ab, seed))
    frame = pd.DataFrame(rows)
    order = {v: i for i, v in enumerate(["bsharedrag"] + [v for v in variants if v != "bsharedrag"])}
    family = {"fully_shared_": "fully_shared", "prag_": "prag"}
    frame["_order"] = [order.get(next((f for p, f in family.items() if v.startswith(p)), v), 99)
                       for v in frame["variant"]]
    return frame.sort_values(["_order", "variant", "dataset", "seed"]).drop(columns="_order").reset_index(drop=True)


def gather(run_dirs: list[str | Path]) -> pd.DataFrame:
    """The results of 07 in several runs (e.g. one per seed or per backbone) in one long-form frame."""
    frames = []
    for run in run_dirs:
        path = Path(run) / "07_ablations" / "results.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run 07_ablations in {run} first")
        frame = pd.DataFrame([json.loads(line) for line in path.read_text().splitlines() if line.strip()])
        frames.append(frame.assign(run=Path(run).name))
    return pd.concat(frames, ignore_index=True)


CLAIMS = (  # the paper's directions: (claim, BSharedRAG's side, the other side)
    ("shared backbone >= separate retriever (MiniLM)", "bsharedrag", "separate_minilm"),
    ("shared backbone >= separate retriever (BM25)", "bsharedrag", "separate_bm25"),
    ("shared backbone >= fully shared (best lambda)", "bsharedrag", "fully_shared"),
    ("continual pre-training helps", "bsharedrag", "wo_cpt"),
    ("hard negatives help", "bsharedrag", "wo_hard_negatives"),
    ("retrieval helps", "bsharedrag", "closed_book"),
    ("BSharedRAG >= Parametric RAG (+ documents)", "bsharedrag", "prag_parametric_docs"),
    ("generation LoRA >= bare backbone, same documents", "bsharedrag", "base_rag"),
)


def directions(results: pd.DataFrame, metrics: tuple[str, ...] = ("ndcg@5", "bleu3", "rougeL")) -> pd.DataFrame:
    """Per data set and metric, whether each of the paper's directions holds here (means over seeds; the fully
    shared side is its best lambda); `margin` is BSharedRAG minus the other side."""
    means = results.groupby(["variant", "dataset"])[list(metrics)].mean(numeric_only=True)
    out = []
    for claim, ours, other in CLAIMS:
        for dataset in sorted(results["dataset"].unique()):
            for metric in metrics:
                if (ours, dataset) not in means.index:
                    continue
                if other == "fully_shared":
                    sides = [v for v in means.index.get_level_values(0).unique() if v.startswith("fully_shared_")]
                    values = [means.loc[(v, dataset), metric] for v in sides if (v, dataset) in means.index]
                    values = [v for v in values if pd.notna(v)]
                    theirs = max(values) if values else float("nan")
                elif (other, dataset) in means.index:
                    theirs = means.loc[(other, dataset), metric]
                else:
                    continue
                mine = means.loc[(ours, dataset), metric]
                if pd.isna(mine) or pd.isna(theirs):
                    continue
                out.append({"claim": claim, "dataset": dataset, "metric": metric, "bsharedrag": float(mine),
                            "other": float(theirs), "margin": float(mine - theirs), "holds": bool(mine >= theirs)})
    return pd.DataFrame(out)
