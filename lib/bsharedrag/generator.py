"""The generation adapter: retrieval-augmented instruction tuning of a LoRA on the shared backbone (trl's SFTTrainer,
loss on the answer only), prompts per language, and deterministic decoding."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.helpers import disable_input_dtype_casting

from . import adapters
from .artefacts import ADDED_LATER_FIELD, CHECKPOINT_FINGERPRINT, atomic_write_json, resumable_checkpoint, \
    sha256_json, training_fingerprint
from .backbone import Backbone, FineTuning, train_top_layers
from .config import check_micro_batch
from .data import RetrievalDataset
from .devices import autocast
from .lm import causal_lm_nll
from .progress import progress

GENERATION_ADAPTER = "generation"
META = "generator.json"
PROMPT_EN = "Answer the question using the documents.\n\n{documents}\n\nQuestion: {question}\nAnswer:"
PROMPT_ZH = "请根据以下文档回答问题。\n\n{documents}\n\n问题：{question}\n回答："
CLOSED_BOOK_DOCS = {"en": "(no documents)", "zh": "（无文档）"}


@dataclass
class GeneratorSettings(FineTuning):
    """Every knob of generation-adapter training and decoding (04_generator declares each as a parameter)."""

    lora_r: int = 16
    lora_alpha: int = 32
    target_modules: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                          "gate_proj", "up_proj", "down_proj"])
    lora_layers: int = 0  # LoRA on the top N decoder layers only (backprop stops below them); 0 puts it on all
    learning_rate: float = 2e-4
    warmup_ratio: float = 0.1
    steps: int = 100
    batch_size: int = 4  # examples per process per step
    # Examples per forward-backward pass, accumulated to batch_size per step (less memory; the step's loss and gradient
    # stay the batch's, token-weighted); 0 passes the whole batch at once. Added later: see artefacts.ADDED_LATER_FIELD.
    micro_batch_size: int = field(default=0, metadata={ADDED_LATER_FIELD: True})
    top_k: int = 3  # documents in the prompt
    include_gold: bool = True  # training prompts always hold the question's gold documents where the set has them
    doc_max_tokens: int = 128  # each document is cut to this many tokens in the prompt
    answer_max_tokens: int = 128  # training answers are cut to this many tokens
    prompt_en: str = PROMPT_EN
    prompt_zh: str = PROMPT_ZH
    save_every: int = 0  # steps between resumable checkpoints; 0 saves none
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_micro_batch(self.batch_size, self.micro_batch_size)

    def template(self, lang: str) -> str:
        if lang not in ("en", "zh"):
            raise ValueError(f"no prompt template for language {lang!r}; the data sets are en or zh")
        return self.prompt_zh if lang == "zh" else self.prompt_en


@dataclass
class DecodeSettings:
    """How answers are decoded: greedy by default (deterministic), sampling as an option."""

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    batch_size: int = 8
    seed: int = 0


def decode_settings(section: dict, lang: str, seed: int = 0, batch_size: int | None = None) -> DecodeSettings:
    """How a 06_evaluate or 07_ablations config section decodes answers in `lang`: its `max_new_tokens_<lang>`,
    `do_sample` and `generation_batch_size` (`batch_size` overrides the last), DecodeSettings' defaults where absent."""
    if lang not in ("en", "zh"):
        raise ValueError(f"no answer length for language {lang!r}; the data sets are en or zh")
    default = DecodeSettings()
    return DecodeSettings(max_new_tokens=section.get(f"max_new_tokens_{lang}", default.max_new_tokens),
                          do_sample=section.get("do_sample", default.do_sample),
                          batch_size=batch_size or section.get("generation_batch_size", default.batch_size), seed=seed)


def gold_documents(ds: RetrievalDataset, qid: str) -> list[str]:
    """The question's judged-relevant documents, best graded first."""
    judged = ds.qrels.get(qid, {})
    return [d for d, g in sorted(judged.items(), key=lambda kv: -kv[1]) if g > 0]


def context_documents(ranked: list[str], gold: list[str], k: int) -> list[str]:
    """The top-k retrieved documents; gold documents missing from them replace the lowest-ranked non-gold ones."""
    chosen = list(ranked[:k])
    for doc in [d for d in gold[:k] if d not in chosen]:
        if len(chosen) < k:
            chosen.append(doc)
            continue
        replaceable = [i for i, d in enumerate(chosen) if d not in gold]
        if not replaceable:  # the k chosen are all gold already
            break
        chosen[replaceable[-1]] = doc
    return chosen


def cut_tokens(tokenizer, text: str, n: int) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= n else tokenizer.decode(ids[:n]).strip()


def build_prompt(question: str, documents: list[str], lang: str, settings: GeneratorSettings, tokenizer) -> str:
    """The prompt for `question` with `documents` (already formatted passages) numbered in it."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"question {question!r} is empty; give text to answer")
    shown = "\n".join(f"[{i + 1}] {cut_tokens(tokenizer, d, settings.doc_max_tokens)}" for i, d in enumerate(documents))
    return settings.template(lang).format(documents=shown or CLOSED_BOOK_DOCS[lang], question=question.strip())


def answer_marker(settings: GeneratorSettings, lang: str) -> str:
    """Where the template starts a new question: decoded text is cut there (a base model may go on asking)."""
    template = settings.template(lang)
    return template[template.index("{documents}") + len("{documents}"):template.index("{question}")].strip()


def training_examples(ds: RetrievalDataset, retrieved: dict[str, list[str]], settings: GeneratorSettings,
                      tokenizer, passage_format: str) -> list[dict]:
    """One (prompt, completion) per training question with an answer: its retrieved (and gold) documents -> answer."""
    text = dict(zip(ds.corpus["doc_id"], ds.passages(passage_format)))
    out = []
    for qid, question in zip(ds.split("train")["qid"], ds.split("train")["text"]):
        answers = [a for a in ds.answers.get(qid, []) if a.strip()]
        if not answers:
            continue
        gold = gold_documents(ds, qid) if settings.include_gold else []
        docs = context_documents(retrieved.get(qid, []), gold, settings.top_k)
        completion = cut_tokens(tokenizer, answers[0].strip(), settings.answer_max_tokens)
        out.append({"qid": qid, "dataset": ds.name,
                    "prompt": build_prompt(question, [text[d] for d in docs], ds.lang, settings, tokenizer),
                    "completion": (" " if ds.lang == "en" else "") + completion})
    return out


def add_generation_adapter(backbone: Backbone, settings: GeneratorSettings) -> PeftModel:
    """Add a fresh LoRA named `generation` to the backbone (beside any adapter it carries); base weights stay frozen."""
    n_layers = backbone.model.config.get_text_config().num_hidden_layers
    top = list(range(max(0, n_layers - settings.lora_layers), n_layers)) if settings.lora_layers else None
    config = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=0.0, bias="none",
                        target_modules=list(settings.target_modules), task_type="CAUSAL_LM",
                        layers_to_transform=top, layers_pattern="layers" if top else None)
    torch.manual_seed(settings.seed)
    if isinstance(backbone.model, PeftModel):
        backbone.model.add_adapter(GENERATION_ADAPTER, config)
        backbone.model.set_adapter(GENERATION_ADAPTER)
    else:
        backbone.model = get_peft_model(backbone.model, config, adapter_name=GENERATION_ADAPTER)
    return backbone.model


def _answer_only_trainer():
    from trl import SFTTrainer

    class AnswerOnlySFTTrainer(SFTTrainer):
        """SFTTrainer whose loss runs the LM head on the answer tokens only (lm.causal_lm_nll), never on the prompt."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # The body is called directly, past the forward that accelerate wraps in autocast: enter it here.
            with self.accelerator.autocast():
                total, count = causal_lm_nll(model, inputs["input_ids"], inputs["attention_mask"], inputs["labels"])
            denominator = num_items_in_batch if num_items_in_batch is not None else count
            loss = total / torch.as_tensor(denominator, device=total.device).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # as SFTTrainer: DDP averages, the count is global
            return (loss, None) if return_outputs else loss

        def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
            if state_dict is None and not isinstance(self.model, PeftModel):  # full fine-tuning of the top layers
                state_dict = {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}
            super()._save(output_dir, state_dict)

        def _issue_warnings_after_load(self, load_result) -> None:
            # A full fine-tuning checkpoint holds the trained layers only: the frozen rest is missing by design.
            if isinstance(self.model, PeftModel) or load_result.unexpected_keys:
                super()._issue_warnings_after_load(load_result)

    return AnswerOnlySFTTrainer


def last_complete_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest `checkpoint-N` the Trainer finished writing; ones a kill cut short (no readable trainer_state.json,
    which the Trainer writes last) are removed, so they are neither resumed nor mistaken for complete later."""
    complete = []
    for folder in checkpoint_dir.glob("checkpoint-*"):
        try:
            json.loads((folder / "trainer_state.json").read_text())
            complete.append(folder)
        except (OSError, ValueError):
            print(f"removing {folder}: its save was cut short (no readable trainer_state.json)")
            shutil.rmtree(folder, ignore_errors=True)
    steps = {int(f.name.rsplit("-", 1)[1]): f for f in complete if f.name.rsplit("-", 1)[1].isdigit()}
    return steps[max(steps)] if steps else None


def no_recomputation(config_class) -> dict:
    """The trainer setting that turns activation recomputation off, by the name this transformers gives it
    (`gradient_checkpointing` in transformers 5.17, `activation_checkpointing` in 5.25; pyproject allows both)."""
    names = {f.name for f in fields(config_class)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": False}


def train_generation_adapter(backbone: Backbone, examples: list[dict], settings: GeneratorSettings,
                             checkpoint_dir: str | Path) -> dict:
    """Train the `generation` LoRA with trl's SFTTrainer (loss on the answer only); resumes from its last checkpoint.

    With `settings.method` "full" the trainer fine-tunes the bare backbone's top `lora_layers` decoder layers instead,
    at `full_learning_rate`, and its checkpoints hold those layers only (see separate.py).

    Checkpoints made with other settings, backbone, tokenizer or examples are moved aside and training starts fresh.
    """
    from datasets import Dataset
    from trl import SFTConfig

    if not examples:
        raise ValueError("no training examples: no training question has a reference answer; check the data set")
    checkpoint_dir = Path(checkpoint_dir)
    # The Trainer owns the checkpoint-N folders, so the fingerprint lies beside them, in their output_dir.
    fingerprint = training_fingerprint(settings, sha256_json(examples), backbone=backbone.fingerprint,
                                       tokenizer=backbone.tokenizer_fingerprint)
    resumable_checkpoint(checkpoint_dir, fingerprint)
    atomic_write_json(checkpoint_dir / CHECKPOINT_FINGERPRINT, fingerprint)
    if settings.method == "full":
        model = train_top_layers(backbone, settings.lora_layers, GENERATION_ADAPTER)
    else:
        model = add_generation_adapter(backbone, settings)
    bf16 = backbone.dtype == torch.bfloat16
    args = SFTConfig(
        output_dir=str(checkpoint_dir), max_steps=settings.steps,
        per_device_train_batch_size=settings.micro_batch_size or settings.batch_size,
        gradient_accumulation_steps=check_micro_batch(settings.batch_size, settings.micro_batch_size),
        learning_rate=settings.method_learning_rate, lr_scheduler_type="linear",
        warmup_steps=math.ceil(settings.warmup_ratio * settings.steps), weight_decay=0.0, logging_steps=1,
        save_strategy="steps" if settings.save_every else "no", save_steps=settings.save_every or 500,
        save_total_limit=1, report_to=[], seed=settings.seed, data_seed=settings.seed, bf16=bf16,
        fp16=backbone.dtype == torch.float16, use_cpu=backbone.device.type == "cpu", completion_only_loss=True,
        max_length=None, dataloader_num_workers=0, disable_tqdm=False,
        **no_recomputation(SFTConfig),  # recomputing the forward costs a third more time; memory is not short here
    )
    data = Dataset.from_list([{"prompt": e["prompt"], "completion": e["completion"]} for e in examples])
    trainer = _answer_only_trainer()(model=model, args=args, train_dataset=data, processing_class=backbone.tokenizer)
    resume = last_complete_checkpoint(checkpoint_dir) if settings.save_every else None
    began = time.perf_counter()
    with disable_input_dtype_casting(model):  # autocast casts a LoRA's input itself (retriever.py says why)
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    model.eval()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    return {"losses": losses, "seconds": time.perf_counter() - began, "resumed": resume is not None,
            "steps": trainer.state.global_step}


def save_generation_adapter(backbone: Backbone, settings: GeneratorSettings, target: str | Path,
                            extra: dict | None = None) -> Path:
    """Save the generation LoRA alone with generator.json (its settings and the backbone it was trained on)."""
    return adapters.save_adapter(backbone, GENERATION_ADAPTER, target, META, {"settings": asdict(settings), **(extra or {})})


def attach_generation_adapter(backbone: Backbone, adapter_dir: str | Path,
                              name: str = GENERATION_ADAPTER) -> GeneratorSettings:
    """Attach a saved generation LoRA to `backbone` as adapter `name`; refuses one trained on another backbone."""
    meta = adapters.attach_adapter(backbone, adapter_dir, name, META, "04_generator")
    return GeneratorSettings(**meta["settings"])


def active_adapter(backbone: Backbone, name: str | None):
    """A context in which the shared backbone runs with adapter `name` only, or with none (name None).

    A Separate RAG copy (backbone.fine_tuned) plays its task's adapter with its own weights.
    """
    model = backbone.model
    tuned = backbone.fine_tuned
    if tuned is not None and not isinstance(model, PeftModel):
        if name != tuned["task"]:
            raise ValueError(f"the backbone holds the fine-tuned {tuned['task']} copy {tuned['identity']}, which "
                             f"cannot run as {name or 'the bare backbone'!r}; load a fresh backbone for that")
        return contextlib.nullcontext()
    if name is None:
        return model.disable_adapter() if isinstance(model, PeftModel) else contextlib.nullcontext()
    if not isinstance(model, PeftModel) or name not in model.peft_config:
        raise ValueError(f"adapter {name!r} is not attached to the backbone")
    if model.active_adapter != name:
        model.set_adapter(name)
    return contextlib.nullcontext()


def generate(backbone: Backbone, prompts: list[str], decode: DecodeSettings, adapter: str | list | None = None,
             stop: str = "") -> list[str]:
    """Answers to `prompts` with adapter `adapter` (None: the bare backbone), batched by length, left-padded.

    A list gives each prompt its own adapter (None: the bare backbone) and still decodes them together: each row of a
    batch goes through its adapter alone (peft's `adapter_names`).
    Greedy decoding gives the same answers on every run; with `decode.do_sample`, sampling is seeded per batch.
    Text from `stop` on (the template's next-question marker) is cut.
    """
    if isinstance(adapter, list):
        _check_per_prompt_adapters(backbone, adapter, len(prompts))
        if len(set(adapter)) <= 1:  # one adapter for every prompt: the plain path
            adapter = adapter[0] if adapter else None
    per_prompt = isinstance(adapter, list)
    tok = backbone.tokenizer
    side, tok.padding_side = tok.padding_side, "left"
    encoded = [tok(p, add_special_tokens=True)["input_ids"] for p in prompts]
    order = np.argsort([-len(row) for row in encoded], kind="stable")
    out: list[str] = [""] * len(prompts)
    starts = range(0, len(order), decode.batch_size)
    model = backbone.model
    label = "per-prompt adapters" if per_prompt else adapter or "base"
    try:
        # An adapter trained in this process (04's preview, 07) or merged from document LoRAs (PRAG) is fp32: under
        # autocast, peft's cast of its input to fp32 is undone at once (retriever.py's training loop says more).
        with (contextlib.nullcontext() if per_prompt else active_adapter(backbone, adapter)), torch.inference_mode(), \
                autocast(backbone.device, backbone.dtype), disable_input_dtype_casting(model):
            for b, start in enumerate(progress(starts, total=len(starts), desc=f"generate ({label})")):
                rows = order[start:start + decode.batch_size]
                batch = tok.pad({"input_ids": [encoded[i] for i in rows]}, return_tensors="pt").to(backbone.device)
                sampling = {"do_sample": True, "temperature": decode.temperature, "top_p": decode.top_p} \
                    if decode.do_sample else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
                if decode.do_sample:
                    torch.manual_seed(decode.seed + b)
                if per_prompt:
                    sampling["adapter_names"] = [adapter[i] or BASE_ROW for i in rows]
                new = model.generate(**batch, max_new_tokens=decode.max_new_tokens, pad_token_id=tok.pad_token_id,
                                     **sampling)[:, batch["input_ids"].shape[1]:]
                for i, row in zip(rows, new):
                    text = tok.decode(row, skip_special_tokens=True)
                    out[i] = (text.split(stop)[0] if stop else text).strip()
    finally:
        tok.padding_side = side
    return out


BASE_ROW = "__base__"  # peft's name for a row of a mixed batch that runs without adapter


def _check_per_prompt_adapters(backbone: Backbone, adapters: list, n_prompts: int) -> None:
    if len(adapters) != n_prompts:
        raise ValueError(f"{len(adapters)} adapters for {n_prompts} prompts; give one adapter (or None) per prompt")
    attached = backbone.model.peft_config if isinstance(backbone.model, PeftModel) else {}
    missing = sorted({a for a in adapters if a is not None and a not in attached})
    if missing:
        raise ValueError(f"adapters {missing} are not attached to the backbone; attach them before generating")


def settings_from_config(cfg: dict) -> GeneratorSettings:
    """The generator settings a resolved config asks for (its `04_generator` section and the common seed)."""
    s = cfg["04_generator"]
    return GeneratorSettings(
        lora_r=s["lora_r"], lora_alpha=s["lora_alpha"], lora_layers=s["lora_layers"], learning_rate=s["learning_rate"],
        warmup_ratio=s["warmup_ratio"], steps=s["train_steps"], batch_size=s["train_batch_size"], top_k=s["top_k"],
        micro_batch_size=s["micro_batch_size"], include_gold=s["include_gold"], doc_max_tokens=s["doc_max_tokens"],
        answer_max_tokens=s["answer_max_tokens"], prompt_en=s["prompt_en"], prompt_zh=s["prompt_zh"],
        save_every=s["save_every"], seed=cfg["common"]["seed"])


def batch_agreement(answers_at: Callable[[int], list[str]], batch_sizes: tuple[int, ...] = (1, 16)) -> dict:
    """The same questions answered at each of `batch_sizes` (`answers_at(batch_size)` answers them all), timed in the
    same run: how many answers each batch size shares with the first. Greedy decoding is deterministic for one batch
    size, but a batch's padding and shape change the matmuls' rounding, and in bf16 that can tip a greedy choice.
    Returns {"answers": {size: [...]}, "seconds_per_answer": {size: s}, "same_as_first": {size: n}, "answers_n": n}."""
    if not batch_sizes or any(not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise ValueError(f"batch_sizes {batch_sizes!r} are invalid; give positive integers, e.g. (1, 16)")
    answers, seconds = {}, {}
    for size in batch_sizes:
        began = time.perf_counter()
        answers[size] = answers_at(size)
        seconds[size] = (time.perf_counter() - began) / max(len(answers[size]), 1)
    first = answers[batch_sizes[0]]
    return {"answers_n": len(first), "answers": answers, "seconds_per_answer": seconds,
            "same_as_first": {size: sum(a == b for a, b in zip(first, got)) for size, got in answers.items()}}


def main(argv: list[str] | None = None) -> int:
    """Print how many of the default backbone's greedy answers to the demo's prompts (test questions with their gold
    documents, the demo's decoding) stay the same when the prompts are decoded one at a time and batched, in each
    compute dtype asked for."""
    import argparse

    from . import paths
    from .backbone import load_backbone
    from .config import load_config
    from .data import load_sets
    from .evaluation import generation_questions

    parser = argparse.ArgumentParser(prog="python -m bsharedrag.generator", description=main.__doc__)
    parser.add_argument("--questions", type=int, default=16, help="test questions with an answer per data set")
    parser.add_argument("--datasets", nargs="+", default=["ecomeval", "epqa"])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], help="compute dtypes to compare")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=None,
                        help="the first is the reference (default: 1 and the demo's generation_batch_size)")
    args = parser.parse_args(argv)
    demo = load_config(paths.CONFIGS / "demo.yaml")
    sizes = tuple(args.batch_sizes or (1, demo["07_ablations"]["generation_batch_size"]))
    gen = settings_from_config(demo)
    for dtype in args.dtypes:
        bb = load_backbone(compute_dtype=dtype)
        for name, ds in load_sets(demo["common"], args.datasets).items():
            queries = generation_questions(ds, args.questions, 0)
            text = dict(zip(ds.corpus["doc_id"], ds.passages(demo["common"]["passage_format"])))
            prompts = [build_prompt(q, [text[d] for d in gold_documents(ds, qid)[:gen.top_k]], ds.lang, gen,
                                    bb.tokenizer) for q, qid in zip(queries["text"], queries["qid"])]
            decode = decode_settings(demo["07_ablations"], ds.lang)
            m = batch_agreement(lambda b: generate(bb, prompts, replace(decode, batch_size=b)), sizes)
            timing = ", ".join(f"batch {b}: {s:.2f} s a prompt" for b, s in m["seconds_per_answer"].items())
            same = ", ".join(f"batch {b}: {n} of {m['answers_n']}" for b, n in m["same_as_first"].items()
                             if b != sizes[0])
            print(f"{name}, {bb.dtype} (the bare backbone, up to {decode.max_new_tokens} new tokens): the same "
                  f"answer as at batch {sizes[0]} for {same}; {timing}", flush=True)
        del bb
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
