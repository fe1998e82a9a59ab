"""Data layer: find, verify and load ePQA and EcomEval into one shape (corpus, queries, graded qrels, answers)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import sys
import urllib.request
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from . import paths
from .artefacts import atomic_write_bytes, sha256_file

OFFLINE_ENV = "BSHAREDRAG_OFFLINE"
SPLITS = ("train", "dev", "test")


class DataError(RuntimeError):
    """A data file that is missing, corrupted, or holds a record that cannot be read."""


@dataclass
class RetrievalDataset:
    """One data set in the project's shape; `qrels[qid][doc_id]` is a graded gain (0 = judged irrelevant)."""

    name: str
    lang: str
    corpus: pd.DataFrame  # doc_id, title, text, lang
    queries: pd.DataFrame  # qid, text (what retrievers and the generator are given), question, context, split
    qrels: dict[str, dict[str, int]]
    answers: dict[str, list[str]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # "file:line (why)" of records left out on purpose

    def split(self, name: str) -> pd.DataFrame:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; use one of {', '.join(SPLITS)}")
        return self.queries[self.queries["split"] == name].reset_index(drop=True)

    def passages(self, fmt: str = "{title}: {text}") -> list[str]:
        """The corpus as the strings a retriever sees, formatted from title and text."""
        return [fmt.format(title=t, text=x).strip() for t, x in zip(self.corpus["title"], self.corpus["text"])]


def sources() -> dict:
    return yaml.safe_load(paths.SOURCES.read_text(encoding="utf-8"))


def _source(name: str) -> dict:
    known = sources()
    if name not in known:
        raise DataError(f"unknown data set {name!r}; data/sources.yaml knows: {', '.join(known)}")
    return known[name]


def _download(url: str, target: Path, timeout: float = 30.0) -> None:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (addresses come from sources.yaml)
        atomic_write_bytes(target, response.read())


def fetch(name: str) -> Path:
    """Path of the verified file of data set `name`: data/raw, then the mirror, then a download into data/raw."""
    src = _source(name)
    raw = paths.DATA_RAW / src["file"]
    mirror = paths.data_mirror() / src["file"]
    for candidate in (raw, mirror):
        if candidate.is_file():
            digest = sha256_file(candidate)
            if digest != src["sha256"]:
                raise DataError(
                    f"{candidate} has sha256 {digest}, but data/sources.yaml expects {src['sha256']} for {name!r}: "
                    f"the file is corrupted or another version; delete it and run `make data` to fetch it again"
                )
            return candidate
    problem = f"{OFFLINE_ENV} is set" if os.environ.get(OFFLINE_ENV) else None
    if problem is None:
        try:
            _download(src["upstream"], raw)
        except Exception as exc:  # any network failure ends in the same advice
            problem = f"the download from {src['upstream']} failed ({type(exc).__name__}: {exc})"
    if problem is None:
        digest = sha256_file(raw)
        if digest == src["sha256"]:
            return raw
        raw.unlink()
        problem = f"the downloaded file had sha256 {digest}, expected {src['sha256']}"
    raise DataError(
        f"data set {name!r} ({src['file']}) is in neither {raw} nor the mirror {mirror}, and {problem}. "
        f"Put the file at {raw} (or point ${paths.MIRROR_ENV} at a folder holding {src['file']}); "
        f"its sha256 must be {src['sha256']}"
    )


def _doc_id(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def read_epqa(path: str | Path) -> RetrievalDataset:
    """ePQA: each row is (question, candidate sentence, label 0/1/2); candidates of a question share a product."""
    docs: dict[str, tuple[str, str]] = {}
    questions: dict[str, str] = {}
    products: dict[str, Counter] = {}
    qrels: dict[str, dict[str, int]] = {}
    answers: dict[str, list[str]] = {}
    skipped: list[str] = []
    try:
        content = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 at byte {exc.start} ({exc.reason}); re-save the file as UTF-8") from exc
    reader = csv.DictReader(io.StringIO(content, newline=""))
    for row in reader:
        line_no = reader.line_num
        try:
            qid, question, text = row["qid"].strip(), row["question"].strip(), row["candidate"].strip()
            label = int(row["label"])
            title = (row.get("title") or "").strip()
        except (KeyError, ValueError, AttributeError) as exc:
            raise DataError(f"{path}:{line_no}: broken ePQA record ({exc!r}); fix or remove the row") from exc
        if not qid or not question or label not in (0, 1, 2):
            raise DataError(
                f"{path}:{line_no}: ePQA record needs a qid, a question and a label in 0/1/2; "
                f"got qid={qid!r} label={label!r}; fix or remove the row"
            )
        if not text:  # the public file has one such row (qid 7870): nothing to retrieve, so it is skipped
            skipped.append(f"{path}:{line_no} (empty candidate)")
            continue
        doc_id = _doc_id(text)
        docs.setdefault(doc_id, (title, text))
        questions.setdefault(qid, question)
        products.setdefault(qid, Counter())[title] += 1
        qrels.setdefault(qid, {})[doc_id] = max(label, qrels.get(qid, {}).get(doc_id, 0))
        answer = (row.get("answer") or "").strip()
        if answer and label == 2:
            answers.setdefault(qid, []).append(answer)
    if skipped:
        warnings.warn(f"ePQA: skipped {len(skipped)} record(s) with no candidate text: {', '.join(skipped[:5])}")
    # The asker is on the product's page ("will this fit my 1993 wrangler?"): the product title is the question's context.
    contexts = {qid: titles.most_common(1)[0][0] for qid, titles in products.items()}
    return _assemble("epqa", "en", docs, questions, qrels, answers, skipped, contexts)


_ECOMEVAL_PROMPT = re.compile(r"商品介绍为：\s*(?P<docs>.*?)\s*问题为：\s*(?P<question>.*?)\s*你的回答为：", re.S)
# 154 of the authors' documents were rewritten to say that they hold nothing relevant to the question.
_ECOMEVAL_NOTHING = re.compile(r"(文档|文章|文本|内容)(中|里)?(并)?(没有|未|无)")


def read_ecomeval(path: str | Path) -> RetrievalDataset:
    """EcomEval RAG: JSON lines of an instruction (documents + question) and a reference answer."""
    docs: dict[str, tuple[str, str]] = {}
    questions: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    answers: dict[str, list[str]] = {}
    with open(path, "rb") as fh:
        for line_no, raw_line in enumerate(fh, start=1):
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{line_no}: not UTF-8 ({exc.reason}); re-save the file as UTF-8") from exc
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                match = _ECOMEVAL_PROMPT.search(record["instruction"])
                answer = record["answer"].strip()
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
                raise DataError(f"{path}:{line_no}: broken EcomEval record ({exc!r}); fix or remove the line") from exc
            if match is None or not match.group("question").strip():
                raise DataError(f"{path}:{line_no}: instruction holds no 商品介绍为/问题为 sections; fix or remove the line")
            qid = f"ecom-{line_no:04d}"
            questions[qid] = match.group("question").strip()
            answers[qid] = [answer] if answer else []
            qrels[qid] = {}
            for raw_doc in match.group("docs").split("\t"):
                raw_doc = raw_doc.strip()
                if not raw_doc:
                    continue
                title, _, text = raw_doc.partition(" : ")
                if not text:
                    title, text = "", title
                doc_id = _doc_id(raw_doc)
                docs.setdefault(doc_id, (title.strip(), text.strip()))
                qrels[qid][doc_id] = 0 if _ECOMEVAL_NOTHING.search(text) else 1
    return _assemble("ecomeval", "zh", docs, questions, qrels, answers)


def _assemble(name, lang, docs, questions, qrels, answers, skipped=(), contexts=None) -> RetrievalDataset:
    corpus = pd.DataFrame(
        [(doc_id, title, text, lang) for doc_id, (title, text) in docs.items()],
        columns=["doc_id", "title", "text", "lang"],
    )
    queries = pd.DataFrame(list(questions.items()), columns=["qid", "question"])
    queries["context"] = [(contexts or {}).get(qid, "") for qid in queries["qid"]]
    queries["text"] = queries["question"]
    queries["split"] = ""
    return RetrievalDataset(name, lang, corpus, queries, qrels, answers, list(skipped))


READERS = {"epqa": read_epqa, "ecomeval": read_ecomeval}


def assign_splits(queries: pd.DataFrame, seed: int, fractions: tuple[float, float, float]) -> pd.DataFrame:
    """Deterministic question-level train/dev/test split: a seeded permutation of the sorted question ids."""
    qids = sorted(queries["qid"])
    order = np.random.default_rng(seed).permutation(len(qids))
    n_train = int(round(fractions[0] * len(qids)))
    n_dev = int(round(fractions[1] * len(qids)))
    split_of = {}
    for rank, index in enumerate(order):
        split_of[qids[index]] = "train" if rank < n_train else "dev" if rank < n_train + n_dev else "test"
    out = queries.copy()
    out["split"] = out["qid"].map(split_of)
    return out


def subsample(ds: RetrievalDataset, max_questions: int, seed: int) -> RetrievalDataset:
    """Keep `max_questions` seeded questions and only the documents they judge (small runs and tests)."""
    if not max_questions or max_questions >= len(ds.queries):
        return ds
    keep = set(ds.queries.sample(n=max_questions, random_state=seed)["qid"])
    qrels = {q: r for q, r in ds.qrels.items() if q in keep}
    doc_ids = {d for r in qrels.values() for d in r}
    return RetrievalDataset(
        ds.name,
        ds.lang,
        ds.corpus[ds.corpus["doc_id"].isin(doc_ids)].reset_index(drop=True),
        ds.queries[ds.queries["qid"].isin(keep)].reset_index(drop=True),
        qrels,
        {q: a for q, a in ds.answers.items() if q in keep},
        ds.skipped,
    )


def load_dataset(
    name: str,
    seed: int = 0,
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
    max_questions: int = 0,
    path: str | Path | None = None,
    query_context: bool = False,
) -> RetrievalDataset:
    """Load data set `name` (from `path` if given, else the verified public file) with its question-level split.

    `query_context` puts a question's context before it in `queries["text"]`, the text every retriever and the
    generator are given: ePQA's product title (its questions are asked on the product's page and say "this");
    EcomEval's questions have none and stay as they are.
    """
    if name not in READERS:
        raise DataError(f"unknown data set {name!r}; known: {', '.join(READERS)}")
    ds = READERS[name](path or fetch(name))
    ds = subsample(ds, max_questions, seed)
    ds.queries = assign_splits(ds.queries, seed, tuple(split_fractions))
    if query_context:
        ds.queries["text"] = [query_text(q, c) for c, q in zip(ds.queries["context"], ds.queries["question"])]
    return ds


def query_text(question: str, context: str | None = None) -> str:
    """What a retriever is given for `question` asked in `context` (ePQA: its product's title): "context: question"."""
    return f"{context}: {question}" if context else question


def load_sets(common: dict, names: list[str] | None = None) -> dict[str, RetrievalDataset]:
    """The data sets `names` (default: all) of a resolved config's `common` section, loaded as that config says."""
    return {name: load_dataset(name, common["seed"], common["split_fractions"], common["max_questions"],
                               query_context=common["query_context"]) for name in names or common["datasets"]}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["fetch"]:
        print("usage: python -m bsharedrag.data fetch [NAME ...]", file=sys.stderr)
        return 2
    names = argv[1:] or list(sources())
    for name in names:
        try:
            print(f"{name}: {fetch(name)} (sha256 ok)")
        except DataError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())


def statistics(ds: RetrievalDataset, tokenizer, passage_format: str = "{title}: {text}") -> dict:
    """Counts, token lengths (by `tokenizer`) and judged labels per query of one data set."""
    doc_tokens = np.array([len(x) for x in tokenizer(ds.passages(passage_format))["input_ids"]])
    query_tokens = np.array([len(x) for x in tokenizer(list(ds.queries["text"]))["input_ids"]])
    labels = pd.Series([g for judged in ds.qrels.values() for g in judged.values()]).value_counts().sort_index()
    relevant = np.array([sum(g > 0 for g in ds.qrels.get(q, {}).values()) for q in ds.queries["qid"]])
    row = {"dataset": ds.name, "lang": ds.lang, "documents": len(ds.corpus), "questions": len(ds.queries)}
    row.update({f"{s} questions": int((ds.queries["split"] == s).sum()) for s in SPLITS})
    row.update({
        "doc tokens (median)": float(np.median(doc_tokens)), "doc tokens (p95)": float(np.percentile(doc_tokens, 95)),
        "query tokens (median)": float(np.median(query_tokens)),
        "judged per question": float(np.mean([len(ds.qrels.get(q, {})) for q in ds.queries["qid"]])),
        "relevant per question": float(relevant.mean()),
        "questions with no relevant doc": int((relevant == 0).sum()),
        "questions with an answer": int(sum(bool(ds.answers.get(q)) for q in ds.queries["qid"])),
        "records skipped": len(ds.skipped),
    })
    row.update({f"label {k} judgements": int(v) for k, v in labels.items()})
    return row
