"""Parametric RAG (Su et al. 2025): each document becomes its own small LoRA, trained on texts the backbone writes about
it (paraphrases, question-answer pairs), cached by document hash; the top-k documents' LoRAs are merged exactly
(peft `cat`: delta W = sum_i B_i A_i) into the backbone at answer time and removed afterwards."""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import random
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.helpers import disable_input_dtype_casting
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save, save_file

from .artefacts import atomic_dir, atomic_write_bytes, atomic_write_json, sha256_file
from .backbone import Backbone
from .data import RetrievalDataset
from .devices import autocast
from .evaluation import generation_questions
from .generator import DecodeSettings, GeneratorSettings, answer_marker, batch_agreement, build_prompt, cut_tokens, \
    decode_settings, generate, gold_documents
from .lm import IGNORE, causal_lm_nll
from .progress import progress

LANGS = ("en", "zh")
MODES = ("parametric", "parametric_docs")
META = "prag.json"  # written last into an adapter folder: an adapter without a readable one is absent
WEIGHTS = "adapter_model.safetensors"
HOLDER = "prag_holder"  # the adapter a bare backbone is wrapped with while PRAG works on it (peft needs one)
TRAINING = "prag_training"
INIT = "prag_init"
MERGED = "prag_merged"
NOT_IN_KEY = ("augment_batch_size",)  # settings that never change an adapter
AUGMENTATION_SETTINGS = ("paraphrases", "qa_pairs", "augment_max_new_tokens", "max_retries", "doc_max_tokens",
                         "augment_seed")  # what changes the texts the backbone writes about a document
# Bumped when the augmentation procedure changes, so that texts written by an earlier one are not reused.
# 2: questions the QA completion leaves unanswered are answered by a second prompt.
# 3: a written text is cut after the first occurrence of a repetition loop; one that opens with a loop is rejected.
AUGMENTATION_VERSION = 3

DOC_LABEL = {"en": "Document:", "zh": "文档："}
PARAPHRASE_ASKS = {
    "en": ("Rewrite the document in other words:", "Summarise the document in a few sentences:",
           "Explain the document in simple words:"),
    "zh": ("用其他的话改写这篇文档：", "用几句话总结这篇文档：", "用简单的话解释这篇文档："),
}
QA_ASK = {"en": "Questions and answers about the document:", "zh": "关于这篇文档的问题和回答："}
QUESTION = {"en": "Question:", "zh": "问题："}
ANSWER = {"en": "Answer:", "zh": "回答："}
QUESTION_LINE = {"en": re.compile(r"^\s*(?:question|q)\s*[:：]\s*(.*)$", re.IGNORECASE),
                 "zh": re.compile(r"^\s*(?:问题|问)\s*[:：]\s*(.*)$")}
ANSWER_LINE = {"en": re.compile(r"^\s*(?:answer|a)\s*[:：]\s*(.*)$", re.IGNORECASE),
               "zh": re.compile(r"^\s*(?:回答|答案|答)\s*[:：]\s*(.*)$")}
ANSWER_INLINE = {"en": re.compile(r"\s(?:answer)\s*:\s*", re.IGNORECASE),
                 "zh": re.compile(r"\s*(?:回答|答案)\s*[:：]\s*")}
LIST_MARK = re.compile(r"^\s*(?:[(（]?\d{1,2}[.、)）:：]|[-*•·])\s*")  # "1、", "2.", "(3)", "- " before a listed question
QUESTION_END = re.compile(r"[?？]\s*$")
# A span of 4+ characters written 3+ times in a row: greedy decoding of a small backbone often falls into one and stays
# there until the token cap ("声音很明显，声音很明显，…", "1. 1. 1. …"); a LoRA trained on it learns to repeat.
LOOP = re.compile(r"(\S.{3,}?)\1{2,}", re.DOTALL)
QA_TEXT = {"en": "{document}\nQuestion: {question}\nAnswer: {answer}",
           "zh": "{document}\n问题：{question}\n回答：{answer}"}


@dataclass
class PRAGSettings:
    """Every knob of Parametric RAG: the document LoRAs, their training and the backbone's self-augmentation."""

    lora_r: int = 2
    lora_alpha: int = 32
    target_modules: list = field(default_factory=lambda: ["gate_proj", "up_proj", "down_proj"])  # every layer
    learning_rate: float = 3e-4
    epochs: int = 1  # passes over a document's training texts
    paraphrases: int = 1  # rewrites the backbone writes per document
    qa_pairs: int = 2  # question-answer pairs the backbone writes per document
    augment_max_new_tokens: int = 64
    max_retries: int = 2  # extra, sampled attempts for an augmentation output that failed validation
    doc_max_tokens: int = 128  # each document is cut to this many tokens (prompts and training texts)
    train_max_tokens: int = 256  # each training text is cut to this many tokens
    augment_batch_size: int = 8
    # Sampled augmentation retries have their own seed (the first attempt is greedy), so that the texts the backbone
    # writes do not depend on the training seed and every training seed reuses them.
    augment_seed: int = 0
    train_batch_size: int = 0  # texts per optimisation step of a document's LoRA; 0 = all of its texts in one batch
    seed: int = 0  # the document LoRAs' shared initialisation and the order of their texts

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse a value that cannot work, naming it and the fix."""
        minimum = {"lora_r": 1, "epochs": 1, "paraphrases": 0, "qa_pairs": 0, "augment_max_new_tokens": 1,
                   "max_retries": 0, "doc_max_tokens": 1, "train_max_tokens": 2, "augment_batch_size": 1,
                   "augment_seed": 0, "train_batch_size": 0, "seed": 0}
        for name, low in minimum.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"PRAG setting {name}={value!r} is invalid; give an integer >= {low}")
        for name in ("lora_alpha", "learning_rate"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"PRAG setting {name}={value!r} is invalid; give a positive number")
        if isinstance(self.target_modules, str) or not self.target_modules or \
                not all(isinstance(m, str) and m for m in self.target_modules):
            raise ValueError(f"PRAG setting target_modules={self.target_modules!r} is invalid; give a non-empty list "
                             "of module names, e.g. ['gate_proj', 'up_proj', 'down_proj']")


def lora_config(settings: PRAGSettings) -> LoraConfig:
    """The LoRA of one document: feed-forward projections of every layer, no dropout."""
    return LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, target_modules=list(settings.target_modules),
                      lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")


def _check_lang(lang: str) -> None:
    if lang not in LANGS:
        raise ValueError(f"no Parametric RAG prompts for language {lang!r}; use one of {', '.join(LANGS)}")


# ---------------------------------------------------------------------------------------------------------------------
# Self-augmentation

def _labelled(document: str, lang: str) -> str:
    return f"{DOC_LABEL[lang]} {document}" if lang == "en" else f"{DOC_LABEL[lang]}{document}"


def paraphrase_prompt(document: str, slot: int, lang: str) -> str:
    """Completion-style prompt for the `slot`-th rewrite of `document` (each slot asks differently)."""
    asks = PARAPHRASE_ASKS[lang]
    ask = asks[slot % len(asks)]
    if slot >= len(asks):
        ask = f"{ask[:-1]} ({slot // len(asks) + 1}){ask[-1]}"
    return f"{_labelled(document, lang)}\n{ask}\n"


def qa_prompt(document: str, lang: str) -> str:
    """Completion-style prompt ending in the first question marker: the model writes Question/Answer lines."""
    return f"{_labelled(document, lang)}\n{QA_ASK[lang]}\n{QUESTION[lang]}"


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def _scaffolding(line: str, lang: str) -> bool:
    """Whether a line repeats the prompt's own scaffolding (a document label, an instruction, a bare marker)."""
    line = line.strip()
    asks = {_norm(a) for a in (*PARAPHRASE_ASKS[lang], QA_ASK[lang], QUESTION[lang], ANSWER[lang])}
    return line.startswith(DOC_LABEL[lang].strip()) or _norm(line) in asks


def cut_loop(text: str) -> str:
    """`text` up to the end of the first occurrence of its first repetition loop (all of it when it has none), or ""
    when it opens with the loop; only the written text is checked, so copying the prompt's own words stays allowed
    (unlike `no_repeat_ngram_size`)."""
    loop = LOOP.search(text)
    if loop is None:
        return text
    return text[:loop.start() + len(loop.group(1))].rstrip() if text[:loop.start()].strip() else ""


def clean_paraphrase(output: str, document: str, earlier: list[str], lang: str) -> tuple[str, str]:
    """(paraphrase, "") from a raw output, cut where the prompt scaffolding starts again and after the first occurrence
    of a repetition loop, or ("", why it is invalid)."""
    if not output.strip():
        return "", "empty"
    kept = []
    for line in output.strip().splitlines():
        if _scaffolding(line, lang):
            break
        kept.append(line)
    text = "\n".join(kept).strip()
    if not text:
        return "", "prompt scaffolding only"
    if not (text := cut_loop(text)):
        return "", "a repetition loop"
    if _norm(text) == _norm(document):
        return "", "a copy of the document"
    if _norm(text) in {_norm(e) for e in earlier}:
        return "", "a duplicate of an earlier paraphrase"
    return text, ""


def parse_qa(output: str, lang: str) -> tuple[list[dict], list[str]]:
    """Question/answer pairs in a completion of `qa_prompt` (which ends with the first question marker), and the
    questions it asked without answering them (a small model often lists questions: "1、…？\n2、…？")."""
    pairs, unanswered, question = [], [], None

    def ask(text: str) -> None:
        nonlocal question
        if question:
            unanswered.append(question)
        question = LIST_MARK.sub("", text).strip()

    for line in (QUESTION[lang] + output).splitlines():
        if line.strip().startswith(DOC_LABEL[lang].strip()):
            break  # the model went on to another document
        if (match := QUESTION_LINE[lang].match(line)):
            parts = ANSWER_INLINE[lang].split(match.group(1), maxsplit=1)
            ask(parts[0])
            if len(parts) == 2:  # "Question: ... Answer: ..." on one line
                pairs.append({"question": question, "answer": parts[1].strip()})
                question = None
        elif (match := ANSWER_LINE[lang].match(line)):
            if question is not None:
                pairs.append({"question": question, "answer": match.group(1).strip()})
                question = None
        elif QUESTION_END.search(line):
            ask(line)  # a listed question without the marker
    if question:
        unanswered.append(question)
    return pairs, unanswered


def valid_qa(output: str, earlier: list[dict], lang: str) -> tuple[list[dict], list[str], str]:
    """The new, valid pairs in a raw output, the new questions it left unanswered, and, where there is neither, why.
    A question or answer is cut after the first occurrence of a repetition loop; a question that opens with a loop is
    dropped, an answer that opens with one leaves its question to be answered by a second prompt."""
    if not output.strip():
        return [], [], "empty"
    pairs, unanswered = parse_qa(output, lang)
    if not pairs and not unanswered:
        return [], [], "unparsable: no question"
    seen = {_norm(p["question"]) for p in earlier}
    good, open_questions, looped = [], [], False
    for pair in pairs + [{"question": q, "answer": None} for q in unanswered]:
        q, a = cut_loop(pair["question"]), pair["answer"] and cut_loop(pair["answer"])
        if pair["question"] and not q:
            looped = True
            continue
        if not q or _scaffolding(q, lang) or _norm(q) in seen:
            continue
        if a and not _scaffolding(a, lang):
            good.append({"question": q, "answer": a})
        else:
            open_questions.append(q)  # asked, but not answered (or answered with scaffolding or a loop): ask again
        seen.add(_norm(q))
    if not good and not open_questions:
        return [], [], "a repetition loop" if looped else "no new non-empty question"
    return good, open_questions, ""


def answer_prompt(document: str, question: str, lang: str) -> str:
    """Completion-style prompt ending in the answer marker after `question`: a QA training text without its answer."""
    return QA_TEXT[lang].format(document=_labelled(document, lang), question=question, answer="").rstrip()


def clean_answer(output: str, lang: str) -> tuple[str, str]:
    """(answer, "") from a completion of `answer_prompt`: its first line, cut after the first occurrence of a
    repetition loop; or ("", why it is invalid)."""
    line = next((ln.strip() for ln in output.splitlines() if ln.strip()), "")
    if not line:
        return "", "empty answer"
    if _scaffolding(line, lang) or QUESTION_LINE[lang].match(line):
        return "", "answer is prompt scaffolding"
    if (match := ANSWER_LINE[lang].match(line)):
        line = match.group(1).strip()
    if not line:
        return "", "empty answer"
    return (line, "") if (line := cut_loop(line)) else ("", "a repetition loop")


def augment_documents(backbone: Backbone, documents: list[str], lang: str, settings: PRAGSettings) -> list[dict]:
    """Paraphrases and question-answer pairs the bare backbone (no adapter active) writes about each document.

    Each document, cut to `doc_max_tokens`, gets `paraphrases` rewrite prompts (each asking differently) and one QA
    prompt whose completion may hold several pairs; the questions it asks without an answer get an answer prompt each
    (document, question, answer marker). Every stage of an attempt is one batched `generate` over all documents. The
    first attempt decodes greedily; an output that fails validation (empty, only the prompt's scaffolding, a copy of
    the document, a duplicate, a QA completion without a non-empty question, an empty answer, a text opening with a
    repetition loop) is asked again with seeded sampling (seed = settings.augment_seed + attempt), at most
    `max_retries` times; a loop later in a text is cut after its first occurrence. Every rejected output is kept in
    "rejected" (attempt, kind, reason, output), so the checks that cost retries can be counted (`rejection_tally`);
    what still fails after the last attempt is also in "failed" (kind, reason, last output), and the document trains on
    what it has: the document text is always a training text. Returns per document {"paraphrases", "qa", "attempts",
    "rejected", "failed", "lang"}.
    """
    _check_lang(lang)
    settings.validate()
    docs = [cut_tokens(backbone.tokenizer, d, settings.doc_max_tokens) for d in documents]
    out = [{"paraphrases": [], "qa": [], "attempts": 0, "rejected": [], "failed": [], "lang": lang} for _ in docs]
    open_slots = [list(range(settings.paraphrases)) for _ in docs]
    last_failure: dict[tuple[int, str, int], dict] = {}
    for attempt in range(settings.max_retries + 1):
        jobs = [(i, "paraphrase", s) for i, slots in enumerate(open_slots) for s in slots]
        jobs += [(i, "qa", 0) for i, record in enumerate(out) if len(record["qa"]) < settings.qa_pairs]
        if not jobs:
            break
        prompts = [paraphrase_prompt(docs[i], s, lang) if kind == "paraphrase" else qa_prompt(docs[i], lang)
                   for i, kind, s in jobs]
        decode = DecodeSettings(max_new_tokens=settings.augment_max_new_tokens, do_sample=attempt > 0,
                                batch_size=settings.augment_batch_size, seed=settings.augment_seed + attempt)
        failures, to_answer = {}, []
        for (i, kind, slot), output in zip(jobs, generate(backbone, prompts, decode, adapter=None)):
            record = out[i]
            record["attempts"] = attempt + 1
            if kind == "paraphrase":
                text, reason = clean_paraphrase(output, docs[i], record["paraphrases"], lang)
                if not reason:
                    record["paraphrases"].append(text)
                    open_slots[i].remove(slot)
            else:
                pairs, questions, reason = valid_qa(output, record["qa"], lang)
                record["qa"] += pairs[:settings.qa_pairs - len(record["qa"])]
                to_answer += [(i, q) for q in questions[:settings.qa_pairs - len(record["qa"])]]
            failures[(i, kind, slot)] = {"kind": kind, "reason": reason, "output": output}
        answers = generate(backbone, [answer_prompt(docs[i], q, lang) for i, q in to_answer], decode, adapter=None) \
            if to_answer else []
        for (i, question), output in zip(to_answer, answers):
            answer, reason = clean_answer(output, lang)
            if not reason:
                out[i]["qa"].append({"question": question, "answer": answer})
            elif not failures[(i, "qa", 0)]["reason"]:
                failures[(i, "qa", 0)].update(reason=reason, output=f"{failures[(i, 'qa', 0)]['output']}\n"
                                                                    f"[{question}] -> {output}")
        for (i, kind, slot), failure in failures.items():
            if kind == "qa" and not failure["reason"] and len(out[i]["qa"]) < settings.qa_pairs:
                failure["reason"] = f"{len(out[i]['qa'])} of {settings.qa_pairs} pairs"
            if failure["reason"]:
                out[i]["rejected"].append({"attempt": attempt, **failure})
                last_failure[(i, kind, slot)] = failure
            else:
                last_failure.pop((i, kind, slot), None)
    for (i, _, _), failure in sorted(last_failure.items()):
        out[i]["failed"].append(failure)
    return out


def rejection_tally(augmentations: list[dict]) -> dict[str, int]:
    """How many outputs each check rejected, by attempt: {"attempt 0 (greedy): qa: 1 of 2 pairs": n, ...}, most
    frequent first. Augmentations saved before rejections were recorded count as none."""
    counts = collections.Counter(
        f"attempt {r['attempt']} ({'greedy' if r['attempt'] == 0 else 'sampled'}): {r['kind']}: {r['reason']}"
        for a in augmentations for r in a.get("rejected", []))
    return dict(counts.most_common())


# ---------------------------------------------------------------------------------------------------------------------
# Adapters on the shared backbone, put back as they were

@contextlib.contextmanager
def lora_session(backbone: Backbone, settings: PRAGSettings) -> Iterator[PeftModel]:
    """The backbone as a PeftModel for PRAG's temporary adapters; on exit it is exactly as it was.

    Adapters added inside are deleted, the active adapter, each parameter's `requires_grad` and the train/eval mode are
    restored; a bare model is wrapped (with a placeholder adapter, as peft cannot hold none) and unwrapped again. The
    caller's random stream is left alone too (every new LoRA draws its A from it).
    """
    devices = [backbone.device] if backbone.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        bare = not isinstance(backbone.model, PeftModel)
        if bare:
            backbone.model = get_peft_model(backbone.model, lora_config(settings), adapter_name=HOLDER)
        model = backbone.model
        before, active, training = list(model.peft_config), model.active_adapter, model.training
        grads = {n: p.requires_grad for n, p in model.named_parameters()}
        wrapped = {id(m) for m in model.modules() if isinstance(m, BaseTunerLayer)}
        targeted = list(getattr(model.base_model, "targeted_module_names", []))
        try:
            yield model
        finally:
            if model.active_adapter != active:
                model.set_adapter(active)  # first, so that peft does not warn about deleting the active adapter
            for name in [n for n in model.peft_config if n not in before]:
                model.delete_adapter(name)
            if bare:
                backbone.model = model.unload()
                backbone.model.train(training)
            else:
                _unwrap_new_layers(model, wrapped)
                if hasattr(model.base_model, "targeted_module_names"):
                    model.base_model.targeted_module_names = targeted
                for n, p in model.named_parameters():
                    p.requires_grad_(grads.get(n, p.requires_grad))
                model.train(training)
    if not bare and list(model.peft_config) != before:
        raise RuntimeError(f"PRAG left adapters {list(model.peft_config)} on the backbone, which had {before}")


def _unwrap_new_layers(model: PeftModel, wrapped: set[int]) -> None:
    """Put back the plain modules that peft wrapped for PRAG's adapters alone: peft's delete_adapter leaves the (now
    empty) LoRA wrapper in place, which would rename the base weights (`.weight` -> `.base_layer.weight`)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer) and id(module) not in wrapped and \
                not any(getattr(module, attr) for attr in module.adapter_layer_names):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())


def make_init_state(backbone: Backbone, settings: PRAGSettings) -> dict[str, torch.Tensor]:
    """A seeded fresh LoRA's weights (peft's init: A random, B zero): where every document adapter starts."""
    with lora_session(backbone, settings) as model:
        torch.manual_seed(settings.seed)
        model.add_adapter(INIT, lora_config(settings))
        return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model, adapter_name=INIT).items()}


def training_texts(document: str, augmentation: dict) -> list[str]:
    """The document itself, its paraphrases, and the document followed by each question and answer."""
    template = QA_TEXT[augmentation.get("lang", "en")]
    return [document, *augmentation.get("paraphrases", []),
            *(template.format(document=document, **qa) for qa in augmentation.get("qa", []))]


def text_batch(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token-id rows right-padded into (ids, attention mask, labels); padding is masked and never a target."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, IGNORE))
    return ids, mask, labels


def train_document_adapter(backbone: Backbone, doc_text: str, augmentation: dict, settings: PRAGSettings,
                           init_state: dict[str, torch.Tensor]) -> dict:
    """Train one document's LoRA from `init_state` on its training texts (causal-LM loss, AdamW).

    Each step takes `train_batch_size` texts (0: all of them) as one right-padded batch; its loss is the mean over the
    batch's real tokens, so padding changes nothing and a batch of one is the per-text step. Returns {"state": the
    LoRA state dict (peft's saved keys, on CPU), "stats": steps, seconds, tokens, texts, losses}; the backbone is left
    as it was.
    """
    began = time.perf_counter()
    document = cut_tokens(backbone.tokenizer, doc_text, settings.doc_max_tokens)
    rows = [ids[:settings.train_max_tokens] for ids in
            backbone.tokenizer(training_texts(document, augmentation), add_special_tokens=True)["input_ids"]]
    rows = [r for r in rows if len(r) >= 2]  # one token predicts nothing
    if not rows:
        raise ValueError(f"document {doc_text[:40]!r} gives no training text of two tokens or more; give a non-empty "
                         "document")
    per_step = settings.train_batch_size or len(rows)
    pad_id = backbone.tokenizer.pad_token_id if backbone.tokenizer.pad_token_id is not None else 0
    order = random.Random(settings.seed)
    losses, tokens = [], 0
    with lora_session(backbone, settings) as model, torch.enable_grad():
        model.add_adapter(TRAINING, lora_config(settings))
        loaded = set_peft_model_state_dict(model, init_state, adapter_name=TRAINING)
        if loaded.unexpected_keys:
            raise ValueError(f"the init state does not fit this LoRA ({loaded.unexpected_keys[:2]}...); it was made "
                             "for other settings or another architecture")
        model.set_adapter(TRAINING)  # peft: the active adapter alone is trainable
        params = [p for n, p in model.named_parameters() if f".{TRAINING}." in n]
        optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=0.0)
        with disable_input_dtype_casting(model):  # autocast casts a LoRA's input itself (retriever.py says why)
            for _ in range(settings.epochs):
                shuffled = order.sample(range(len(rows)), len(rows))
                for start in range(0, len(shuffled), per_step):
                    ids, mask, labels = text_batch([rows[i] for i in shuffled[start:start + per_step]], pad_id,
                                                   backbone.device)
                    with autocast(backbone.device, backbone.dtype):
                        total, count = causal_lm_nll(model, ids, mask, labels)
                    loss = total / count
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    losses.append(loss.item())
                    tokens += count
        state = get_peft_model_state_dict(model, adapter_name=TRAINING)
        state = {k: v.detach().cpu().clone() for k, v in state.items()}
    return {"state": state, "stats": {"steps": len(losses), "seconds": time.perf_counter() - began, "tokens": tokens,
                                      "texts": len(rows), "losses": losses}}


@contextlib.contextmanager
def merged_document_sets(backbone: Backbone, sets: list[list[Path]], settings: PRAGSettings) -> Iterator[list]:
    """Each set's document LoRAs loaded and merged exactly into one adapter (peft `cat`); yields the merges' names, one
    per set (None for an empty set), for a batch whose every question answers with its own documents (`generate` with
    one adapter per prompt). A set's documents are loaded, merged and dropped before the next set's are loaded (a
    document two sets share is loaded twice): every adapter peft adds walks every module of every adapter the model
    holds, so holding a batch's ~40 documents at once cost more than the loads saved. All is removed after.

    `cat` concatenates the ranks (A_i scaled by its weight 1.0 and its own alpha/r), so the merged delta is exactly
    sum_i scale * B_i A_i. For one document peft merges by `linear` instead (sqrt(scale) on A and on B), also exact.
    """
    with lora_session(backbone, settings) as model:
        distinct = [s for s in dict.fromkeys(tuple(s) for s in sets) if s]
        loaded = {folder: f"prag_doc_{i}" for i, folder in enumerate(dict.fromkeys(f for s in distinct for f in s))}
        merged = {s: f"{MERGED}_{i}" for i, s in enumerate(distinct)}
        taken = [n for n in (*loaded.values(), *merged.values()) if n in model.peft_config]
        if taken:
            raise ValueError(f"the backbone already carries adapters {taken}; PRAG needs these names free")
        for s, name in merged.items():
            for folder in dict.fromkeys(s):
                model.load_adapter(str(folder), adapter_name=loaded[folder], torch_device=str(backbone.device))
            # add_weighted_adapter silently does nothing when the name exists: it was checked free above
            model.add_weighted_adapter([loaded[f] for f in s], weights=[1.0] * len(s), adapter_name=name,
                                       combination_type="cat")
            for folder in dict.fromkeys(s):
                model.delete_adapter(loaded[folder])
        yield [merged.get(tuple(s)) for s in sets]


# ---------------------------------------------------------------------------------------------------------------------
# The cache of document adapters

def _sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


class DocumentAdapterCache:
    """Document LoRAs on disk, keyed by sha256 of (document, backbone fingerprint and compute dtype, settings, shared
    init, augmentation key).

    Layout of `cache_dir`: `init-<spec>.safetensors` (the one initialisation every adapter of these LoRA shapes and
    seed starts from, written once), `augmentations/<key>.json`, `adapters/<key>/` (a peft adapter folder with
    augmentation.json and prag.json, written atomically; a folder without a readable prag.json is absent).
    """

    def __init__(self, cache_dir: str | Path, backbone: Backbone, settings: PRAGSettings):
        settings.validate()
        self.dir, self.backbone, self.settings = Path(cache_dir), backbone, settings
        text = backbone.model.config.get_text_config()
        spec = {"model_type": text.model_type, "lora_r": settings.lora_r, "seed": settings.seed,
                "target_modules": sorted(settings.target_modules),
                **{k: getattr(text, k, None) for k in ("hidden_size", "intermediate_size", "num_hidden_layers")}}
        self.init_path = self.dir / f"init-{_sha256_json(spec)[:12]}.safetensors"
        if not self.init_path.is_file():
            state = make_init_state(backbone, settings)
            atomic_write_bytes(self.init_path, save(state, metadata={"spec": json.dumps(spec, sort_keys=True)}))
        self.init_hash = sha256_file(self.init_path)
        self.init_state = load_file(self.init_path)

    def key(self, doc_text: str, lang: str) -> str:
        """sha256 of everything that changes the document's adapter."""
        tuned = {k: v for k, v in asdict(self.settings).items() if k not in NOT_IN_KEY and k != "augment_seed"}
        return _sha256_json({"document": doc_text, "lang": lang, "backbone": self.backbone.fingerprint,
                             "compute_dtype": str(self.backbone.dtype), "settings": tuned, "init": self.init_hash,
                             "augmentation": self.augmentation_key(doc_text, lang)})

    def augmentation_key(self, doc_text: str, lang: str) -> str:
        """sha256 of everything that changes what the backbone writes about the document (not the training seed)."""
        used = {k: getattr(self.settings, k) for k in AUGMENTATION_SETTINGS}
        if not self.settings.max_retries:
            del used["augment_seed"]  # greedy decoding only: the seed draws nothing
        return _sha256_json({"document": doc_text, "lang": lang, "backbone": self.backbone.fingerprint,
                             "compute_dtype": str(self.backbone.dtype), "settings": used,
                             "procedure": AUGMENTATION_VERSION})

    def adapter_dir(self, doc_text: str, lang: str) -> Path:
        return self.dir / "adapters" / self.key(doc_text, lang)

    def is_cached(self, doc_text: str, lang: str) -> bool:
        """Whether a complete adapter for the document is on disk (prag.json readable, with its key, and weights)."""
        folder = self.adapter_dir(doc_text, lang)
        meta = _read_json(folder / META)
        return bool(meta) and meta.get("key") == folder.name and (folder / WEIGHTS).is_file() and \
            (folder / "adapter_config.json").is_file()

    def adapter_parameters(self) -> int:
        """Trainable parameters of one document's LoRA."""
        return sum(t.numel() for t in self.init_state.values())

    def adapter_mb(self) -> float:
        """Size of one document's LoRA weights in MB."""
        return sum(t.numel() * t.element_size() for t in self.init_state.values()) / 2**20

    def encoding_cost(self, docs: list[tuple[str, str]], lang: str) -> dict:
        """What turning the distinct documents of `docs` into LoRAs cost, whenever each was trained (read from each
        adapter's prag.json): {"documents", "augment_seconds", "train_seconds", "seconds"}."""
        texts = {self.key(text, lang): text for _, text in docs}
        augment = train = 0.0
        for key, text in texts.items():
            meta = _read_json(self.dir / "adapters" / key / META) if self.is_cached(text, lang) else None
            if meta is None:
                raise ValueError(f"no document adapter {key[:12]} for {text[:40]!r} in {self.dir}; train it first "
                                 "(ensure)")
            augment += meta["stats"].get("augment_seconds", float("nan"))
            train += meta["stats"]["seconds"]
        return {"documents": len(texts), "augment_seconds": augment, "train_seconds": train,
                "seconds": augment + train}

    def augmentations(self, docs: list[tuple[str, str]], lang: str) -> list[dict]:
        """The saved self-augmentation of each distinct document of `docs` (doc_id, text) that has an adapter."""
        texts = {self.key(text, lang): text for _, text in docs}
        saved = [_read_json(self.dir / "adapters" / key / "augmentation.json") for key, text in texts.items()
                 if self.is_cached(text, lang)]
        return [a for a in saved if a]

    def get_or_train(self, doc_id: str, doc_text: str, lang: str) -> Path:
        """The document's adapter folder, trained first if it is not cached."""
        self.ensure([(doc_id, doc_text)], lang)
        return self.adapter_dir(doc_text, lang)

    def ensure(self, docs: list[tuple[str, str]], lang: str) -> dict:
        """Train the adapters of `docs` (doc_id, text) not cached yet: one batched augmentation, then one LoRA each.

        Returns {"encoded": adapters trained now, "reused": documents already cached, "augment_seconds",
        "train_seconds"} of this call; `encoding_cost` gives what every document cost, whenever it was trained.
        """
        _check_lang(lang)
        unique: dict[str, tuple[str, str]] = {}
        for doc_id, text in docs:
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"document {doc_id!r} has no text; drop it or give its passage")
            unique.setdefault(self.key(text, lang), (doc_id, text))
        missing = [(key, doc_id, text) for key, (doc_id, text) in unique.items() if not self.is_cached(text, lang)]
        augmentations = {key: self._cached_augmentation(text, lang) for key, _, text in missing}
        to_write = [(key, doc_id, text) for key, doc_id, text in missing if augmentations[key] is None]
        began = time.perf_counter()
        if to_write:
            written = augment_documents(self.backbone, [text for _, _, text in to_write], lang, self.settings)
            share = (time.perf_counter() - began) / len(to_write)  # one batched generate: each document's share
            for (key, doc_id, text), augmentation in zip(to_write, written):
                augmentations[key] = {"augmentation": augmentation, "seconds": share}
                atomic_write_json(self.dir / "augmentations" / f"{self.augmentation_key(text, lang)}.json",
                                  {"doc_id": doc_id, "key": self.augmentation_key(text, lang),
                                   "augmentation": augmentation, "seconds": share})
        augment_seconds, began = time.perf_counter() - began, time.perf_counter()
        if missing:
            with lora_session(self.backbone, self.settings):  # a bare backbone is wrapped once for all documents
                for key, doc_id, text in progress(missing, total=len(missing), desc="prag: document adapters"):
                    made = augmentations[key]
                    trained = train_document_adapter(self.backbone, text, made["augmentation"], self.settings,
                                                     self.init_state)
                    trained["stats"]["augment_seconds"] = made["seconds"]
                    self._save(key, doc_id, lang, trained, made["augmentation"])
        return {"encoded": len(missing), "reused": len(unique) - len(missing), "augment_seconds": augment_seconds,
                "train_seconds": time.perf_counter() - began}

    def _cached_augmentation(self, doc_text: str, lang: str) -> dict | None:
        """{"augmentation", "seconds" (its share of the batched generate that wrote it)}, or None if not saved."""
        key = self.augmentation_key(doc_text, lang)
        saved = _read_json(self.dir / "augmentations" / f"{key}.json")
        if not saved or saved.get("key") != key:
            return None
        return {"augmentation": saved["augmentation"], "seconds": saved.get("seconds", float("nan"))}

    def _save(self, key: str, doc_id: str, lang: str, trained: dict, augmentation: dict) -> Path:
        target = self.dir / "adapters" / key
        with atomic_dir(target) as staging:
            save_file(trained["state"], str(staging / WEIGHTS), metadata={"format": "pt"})
            lora_config(self.settings).save_pretrained(str(staging))
            atomic_write_json(staging / "augmentation.json", augmentation)
            atomic_write_json(staging / META, {
                "doc_id": doc_id, "key": key, "lang": lang, "stats": trained["stats"], "init": self.init_hash,
                "settings": asdict(self.settings), "backbone": self.backbone.name,
                "backbone_fingerprint": self.backbone.fingerprint})
        return target


# ---------------------------------------------------------------------------------------------------------------------
# Answering

class ParametricRAG:
    """Answers questions with their top-k documents' LoRAs merged into the backbone (and, in parametric_docs mode,
    the documents in the prompt as well)."""

    def __init__(self, backbone: Backbone, cache: DocumentAdapterCache, generator_settings: GeneratorSettings,
                 decode: DecodeSettings):
        if cache.backbone.fingerprint != backbone.fingerprint:
            raise ValueError(f"the adapter cache was made for backbone {cache.backbone.name} "
                             f"({cache.backbone.fingerprint}), not {backbone.name} ({backbone.fingerprint}); give "
                             "ParametricRAG the cache of this backbone")
        self.backbone, self.cache, self.generator_settings, self.decode = backbone, cache, generator_settings, decode

    def held_adapter_mb(self, n_questions: int) -> float:
        """MB of document LoRAs held at most while a batch of `n_questions` (at most `decode.batch_size`) is merged
        (`merged_document_sets`): each question's `cat` merge, whose rank is its top_k documents' ranks summed, in the
        dtype the backbone holds its weights in (peft builds it so), and the one question's top_k documents loaded for
        the merge being made (in their saved dtype)."""
        k, merges = self.generator_settings.top_k, min(self.decode.batch_size, n_questions)
        held = self.backbone.held_dtype.itemsize
        return merges * k * self.cache.adapter_parameters() * held / 2**20 + k * self.cache.adapter_mb()

    def answer(self, question: str, doc_ids_texts: list[tuple[str, str]], lang: str,
               mode: str = "parametric") -> dict:
        """One question's answer, its latency and the cost figures (see answer_many)."""
        out = self.answer_many([question], [doc_ids_texts], lang, mode)
        return {"answer": out["answers"][0], "latency_s": out["latency_s"][0], **out["cost"]}

    def answer_many(self, questions: list[str], docs_per_question: list[list[tuple[str, str]]], lang: str,
                    mode: str = "parametric") -> dict:
        """Answers to `questions`, each with its own documents' merged LoRA, `decode.batch_size` questions decoded
        together (`generate` with one adapter per prompt: each row goes through its own merge alone).

        Missing document adapters are trained first (cache.ensure). Returns {"answers", "latency_s" (per question: the
        seconds its batch took to load, merge, generate and unload), "cost": {"encoded", "reused", "augment_seconds",
        "train_seconds", "answer_seconds"}}.
        """
        if mode not in MODES:
            raise ValueError(f"unknown Parametric RAG mode {mode!r}; use one of {', '.join(MODES)}")
        if len(questions) != len(docs_per_question):
            raise ValueError(f"{len(questions)} questions but {len(docs_per_question)} document lists; give one list "
                             "per question")
        cost = self.cache.ensure([d for docs in docs_per_question for d in docs], lang)
        keys = [sorted({self.cache.key(text, lang) for _, text in docs}) for docs in docs_per_question]
        order = sorted(range(len(questions)), key=lambda q: keys[q])  # questions with the same documents share a merge
        answers, latency = [""] * len(questions), [0.0] * len(questions)
        stop = answer_marker(self.generator_settings, lang)
        tok = self.backbone.tokenizer
        began = time.perf_counter()
        with lora_session(self.backbone, self.cache.settings):  # a bare backbone is wrapped once for all batches
            for first in range(0, len(order), self.decode.batch_size):
                start, members = time.perf_counter(), order[first:first + self.decode.batch_size]
                prompts = [build_prompt(questions[q], [t for _, t in docs_per_question[q]]
                                        if mode == "parametric_docs" else [], lang, self.generator_settings, tok)
                           for q in members]
                folders = [[self.cache.dir / "adapters" / key for key in keys[q]] for q in members]
                with merged_document_sets(self.backbone, folders, self.cache.settings) as names:
                    outputs = generate(self.backbone, prompts, self.decode, adapter=names, stop=stop)
                for q, text in zip(members, outputs):
                    answers[q], latency[q] = text, time.perf_counter() - start
        return {"answers": answers, "latency_s": latency,
                "cost": {**cost, "answer_seconds": time.perf_counter() - began}}


# ---------------------------------------------------------------------------------------------------------------------
# Measuring the self-augmentation and the answering

def answer_benchmark(backbone: Backbone, ds: RetrievalDataset, n_questions: int, cache_dir: str | Path,
                     decode: DecodeSettings, settings: PRAGSettings | None = None) -> dict:
    """Parametric RAG on `n_questions` test questions of `ds` with an answer, each with the LoRAs of up to top_k of its
    judged-relevant documents (trained into `cache_dir` first, reused after), answered in both modes one question at
    a time and `decode.batch_size` together, timed in the same run. Returns per mode the seconds per question of each
    and how many answers the two share; with "documents", "encoded" (trained by this call) and the MB of document
    LoRAs held at each batch size (`held_adapter_mb_batch_<b>`)."""
    gen = GeneratorSettings()
    queries = generation_questions(ds, n_questions, 0)
    text = dict(zip(ds.corpus["doc_id"], ds.passages("{title}: {text}")))
    docs = [[(d, text[d]) for d in gold_documents(ds, q)[:gen.top_k]] for q in queries["qid"]]
    cache = DocumentAdapterCache(cache_dir, backbone, settings or PRAGSettings())
    made = cache.ensure([d for row in docs for d in row], ds.lang)
    out = {"questions": len(queries), "documents": made["encoded"] + made["reused"], "encoded": made["encoded"]}
    for batch in (1, decode.batch_size):
        rag = ParametricRAG(backbone, cache, gen, replace(decode, batch_size=batch))
        out[f"held_adapter_mb_batch_{batch}"] = rag.held_adapter_mb(len(queries))
    for mode in MODES:
        m = batch_agreement(lambda b: ParametricRAG(backbone, cache, gen, replace(decode, batch_size=b)).answer_many(
            list(queries["text"]), docs, ds.lang, mode)["answers"], (1, decode.batch_size))
        for batch, seconds in m["seconds_per_answer"].items():
            out[f"{mode}_s_per_question_batch_{batch}"] = seconds
        out[f"{mode}_same_answers"] = m["same_as_first"][decode.batch_size]
    return out


def main(argv: list[str] | None = None) -> int:
    """Print what the bare default backbone's self-augmentation yields on the first documents of each data set, and
    with --answers, how fast Parametric RAG answers one question at a time and batched."""
    import argparse

    from . import paths
    from .backbone import load_backbone
    from .config import load_config
    from .data import load_sets

    parser = argparse.ArgumentParser(prog="python -m bsharedrag.prag", description=main.__doc__)
    parser.add_argument("--docs", type=int, default=8, help="documents per data set (the first of the demo's corpus); "
                                                            "0: none")
    parser.add_argument("--answers", type=int, default=0, help="test questions per data set to answer with their "
                        "judged documents' LoRAs (cached in $BSHAREDRAG_CACHE/prag-bench), one at a time and batched "
                        "as the demo's 07 decodes")
    parser.add_argument("--datasets", nargs="+", default=["ecomeval", "epqa"])
    args = parser.parse_args(argv)
    bb, settings = load_backbone(), PRAGSettings()
    demo = load_config(paths.CONFIGS / "demo.yaml")
    for name, ds in load_sets(demo["common"], args.datasets).items():  # the demo's questions and corpus
        docs = list(ds.passages(demo["common"]["passage_format"]))[:args.docs]
        if docs:
            began = time.perf_counter()
            out = augment_documents(bb, docs, ds.lang, settings)
            seconds = time.perf_counter() - began
            print(f"{name}: {len(docs)} documents, {seconds / len(docs):.1f} s a document; QA pairs "
                  f"{sum(len(o['qa']) for o in out)} of {len(docs) * settings.qa_pairs}, paraphrases "
                  f"{sum(len(o['paraphrases']) for o in out)} of {len(docs) * settings.paraphrases}, failures "
                  f"{[(f['kind'], f['reason']) for o in out for f in o['failed']]}, attempts "
                  f"{[o['attempts'] for o in out]}")
            texts = [t for o in out for t in (*o["paraphrases"], *(x for qa in o["qa"] for x in qa.values()))]
            print(f"  texts holding a repetition loop: {sum(bool(LOOP.search(t)) for t in texts)} of {len(texts)}")
            for why, n in rejection_tally(out).items():
                print(f"  rejected {n:3d}  {why}")
        if args.answers:
            decode = decode_settings(demo["07_ablations"], ds.lang)
            m = answer_benchmark(bb, ds, args.answers, paths.cache_dir() / "prag-bench", decode, settings)
            print(f"{name}: Parametric RAG on {m['questions']} test questions, {m['documents']} document LoRAs "
                  f"({m['encoded']} trained now), up to {decode.max_new_tokens} new tokens; document LoRAs held at "
                  f"most: {m['held_adapter_mb_batch_1']:.1f} MB one question at a time, "
                  f"{m[f'held_adapter_mb_batch_{decode.batch_size}']:.1f} MB {decode.batch_size} together")
            for mode in MODES:
                one = m[f"{mode}_s_per_question_batch_1"]
                batched = m[f"{mode}_s_per_question_batch_{decode.batch_size}"]
                print(f"  {mode}: one question at a time {one:.2f} s a question, {decode.batch_size} together "
                      f"{batched:.2f} s ({one / batched:.1f}x); the same answer for {m[f'{mode}_same_answers']} of "
                      f"{m['questions']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
