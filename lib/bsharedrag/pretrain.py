"""Continual pre-training of the shared backbone on domain text (corpora + training answers) mixed with general text.

Texts are packed into full blocks; LoRA (merged into the weights afterwards) or full fine-tuning; held-out perplexity
before and after. Scales out unchanged under `accelerate launch` (see `main`).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.helpers import disable_input_dtype_casting
from transformers import PreTrainedTokenizerBase, get_linear_schedule_with_warmup

from . import paths
from .artefacts import CHECKPOINT_FINGERPRINT, atomic_dir, atomic_write_json, resumable_checkpoint, training_fingerprint
from .backbone import Backbone
from .devices import accelerator_for, autocast
from .lm import causal_lm_loss, causal_lm_nll
from .progress import progress

STEP = "01_pretrain"
PRETRAIN_ADAPTER = "pretrain"
META = "pretrain.json"
METHODS = ("lora", "full")
GENERAL = "general"


@dataclass
class PretrainSettings:
    """Every knob of continual pre-training (01_pretrain declares each as a parameter)."""

    method: str = "lora"  # lora (merged into the weights afterwards) or full
    lora_r: int = 16
    lora_alpha: int = 32
    block_size: int = 512  # tokens per packed training sequence
    general_ratio: float = 0.25  # share of training blocks that are general text
    learning_rate: float = 2e-4
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    steps: int = 200
    batch_size: int = 8  # blocks per process per step
    save_every: int = 0  # steps between resumable checkpoints; 0 saves none
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown pre-training method {self.method!r}; use one of {', '.join(METHODS)}")
        if not 0.0 <= self.general_ratio <= 1.0:
            raise ValueError(f"general_ratio {self.general_ratio!r} must lie in [0, 1] (a share of training blocks)")
        if self.block_size < 8:
            raise ValueError(f"block_size {self.block_size} is too small; use 128 or more")


# ---------------------------------------------------------------- the text mix

def load_general_text(source: str) -> list[str]:
    """General-domain paragraphs: `pydoc` (Python's bundled docs, always offline), a .txt or a .jsonl file."""
    if source == "pydoc":
        from pydoc_data.topics import topics

        # Keep prose paragraphs: not indented (code), mostly letters, at least a sentence long.
        raw = [p for key in sorted(topics) for p in re.split(r"\n\s*\n", topics[key])]
        return [" ".join(p.split()) for p in raw if p.strip() and not p[:1].isspace() and len(p.split()) >= 8
                and sum(c.isalpha() or c == " " for c in p) / len(p) > 0.85]
    path = Path(source) if Path(source).is_absolute() else paths.REPO_ROOT / source
    fix = ('set general_source to `pydoc` (built in), a .txt file of paragraphs separated by blank lines, '
           'or a .jsonl file with a "text" field on every line')
    if path.suffix not in (".txt", ".jsonl"):
        raise ValueError(f"unknown general_source {source!r}: {fix}")
    if not path.is_file():
        raise FileNotFoundError(f"general_source {source!r}: no file at {path}; {fix}")
    content = path.read_text(encoding="utf-8")
    if path.suffix == ".txt":
        return [p.strip() for p in re.split(r"\n\s*\n", content) if p.strip()]
    texts = []
    for line_no, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            texts.append(str(json.loads(line)["text"]).strip())
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{line_no}: needs a JSON object with a \"text\" field ({exc!r}); {fix}") from exc
    return [t for t in texts if t]


def heldout_split(keys: list[str], share: float, seed: int) -> set[str]:
    """A seeded `share` of `keys` (at least one when share > 0 and there are two or more), for perplexity only."""
    keys = sorted(set(keys))
    n = round(share * len(keys))
    if share > 0 and len(keys) > 1:
        n = min(max(n, 1), len(keys) - 1)
    order = np.random.default_rng(seed).permutation(len(keys))
    return {keys[i] for i in order[:n]}


@dataclass
class TextMix:
    """Training texts by source (`<set> documents`, `<set> answers`, `general`); held-out texts by set and general."""

    train: dict[str, list[str]] = field(default_factory=dict)
    heldout: dict[str, list[str]] = field(default_factory=dict)

    def domain(self) -> list[str]:
        return [t for source, texts in self.train.items() if source != GENERAL for t in texts]


def build_text_mix(sets: dict, passage_format: str, general_source: str, heldout_share: float, seed: int) -> TextMix:
    """Domain text (every corpus, formatted, plus TRAIN-split answers) and general text, each minus a held-out share."""
    mix = TextMix()
    for name, ds in sets.items():
        held = heldout_split(list(ds.corpus["doc_id"]), heldout_share, seed)
        passages = dict(zip(ds.corpus["doc_id"], ds.passages(passage_format)))
        mix.train[f"{name} documents"] = [p for d, p in passages.items() if d not in held and p]
        mix.heldout[name] = [passages[d] for d in sorted(held) if passages[d]]
        # Only training questions' answers: dev and test answers would leak into what 04 and 06 measure.
        answers = [a.strip() for q in ds.split("train")["qid"] for a in ds.answers.get(q, []) if a.strip()]
        mix.train[f"{name} answers"] = list(dict.fromkeys(answers))
    general = list(dict.fromkeys(load_general_text(general_source)))  # pydoc repeats paragraphs across topics
    held = heldout_split([str(i) for i in range(len(general))], heldout_share, seed)
    mix.train[GENERAL] = [t for i, t in enumerate(general) if str(i) not in held]
    mix.heldout[GENERAL] = [t for i, t in enumerate(general) if str(i) in held]
    return mix


def leading_bos(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The BOS id if the tokenizer starts every text with one (Gemma, Llama), else None (Qwen)."""
    first = tokenizer("a", add_special_tokens=True)["input_ids"][:1]
    return first[0] if first and first[0] == tokenizer.bos_token_id else None


def pack_blocks(token_lists: list[list[int]], block_size: int, eos_id: int, bos_id: int | None = None,
                drop_last: bool = True) -> list[list[int]]:
    """Concatenate the texts with EOS after each and cut the stream into `block_size`-token blocks.

    With `bos_id`, each block starts with BOS (models like Gemma degrade badly without it) and carries
    block_size - 1 stream tokens. Every stream token lands in exactly one block; `drop_last` drops the short tail.
    """
    stream = np.fromiter((t for ids in token_lists for t in (*ids, eos_id)), dtype=np.int64)
    width = block_size - (bos_id is not None)
    n_full = len(stream) // width
    cuts = [stream[i * width:(i + 1) * width] for i in range(n_full)]
    if not drop_last and len(stream) > n_full * width:
        cuts.append(stream[n_full * width:])
    head = [bos_id] if bos_id is not None else []
    return [head + cut.tolist() for cut in cuts]


@dataclass
class PackedMix:
    """Training blocks (domain, general) and held-out blocks per source, with the counts behind them."""

    domain: torch.Tensor  # [n, block_size]
    general: torch.Tensor  # [m, block_size]
    heldout: dict[str, list[list[int]]]
    counts: pd.DataFrame


def pack_mix(mix: TextMix, tokenizer: PreTrainedTokenizerBase, block_size: int, seed: int,
             max_eval_blocks: int = 0) -> PackedMix:
    """Tokenise the mix and pack it: shuffled training texts into full blocks, held-out texts into at most
    `max_eval_blocks` blocks per source (0 keeps all)."""
    bos, eos = leading_bos(tokenizer), tokenizer.eos_token_id

    def tokens(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

    counts: dict[str, dict] = {}
    pools: dict[str, list[list[int]]] = {"domain": [], GENERAL: []}
    for source, texts in mix.train.items():
        ids = tokens(texts)
        pools[GENERAL if source == GENERAL else "domain"] += ids
        counts[source] = {"train texts": len(texts), "train tokens": sum(map(len, ids))}
    blocks = {}
    for tag, (pool, ids) in enumerate(pools.items()):
        order = np.random.default_rng([seed, tag]).permutation(len(ids))  # so blocks mix sources and documents
        packed = pack_blocks([ids[i] for i in order], block_size, eos, bos)
        blocks[pool] = torch.tensor(packed, dtype=torch.long).reshape(len(packed), block_size)
    heldout = {}
    for tag, (source, texts) in enumerate(mix.heldout.items(), start=len(pools)):
        ids = tokens(texts)
        order = np.random.default_rng([seed, tag]).permutation(len(ids))  # so the evaluated blocks are a random sample
        packed = pack_blocks([ids[i] for i in order], block_size, eos, bos, drop_last=False)
        heldout[source] = packed[:max_eval_blocks] if max_eval_blocks else packed
        row = counts.setdefault(source if source == GENERAL else f"{source} documents", {})
        row.update({"held-out texts": len(texts), "held-out tokens": sum(map(len, ids)),
                    "evaluated tokens": sum(len(b) - (bos is not None) for b in heldout[source])})
    table = pd.DataFrame(counts).T.fillna(0).astype(int)
    return PackedMix(blocks["domain"], blocks[GENERAL], heldout, table)


def _pool_pick(pool: torch.Tensor, n: int, seed: int, tag: int) -> torch.Tensor:
    """The n-th block drawn from `pool`: a fresh seeded permutation per pass over it."""
    epoch, offset = divmod(n, len(pool))
    return pool[int(np.random.default_rng([seed, tag, epoch]).permutation(len(pool))[offset])]


def training_batch(packed: PackedMix, step: int, global_size: int, general_ratio: float, seed: int) -> torch.Tensor:
    """The blocks of `step` (the same whatever the number of processes): general ones spread evenly at the ratio."""
    if general_ratio > 0 and len(packed.general) == 0:
        raise ValueError("general_ratio > 0 but the general text gave no training block; use a larger general_source")
    if general_ratio < 1 and len(packed.domain) == 0:
        raise ValueError("the domain text gave no training block; lower block_size or add data sets")
    rows = []
    for i in range(step * global_size, (step + 1) * global_size):
        general_before = math.floor(i * general_ratio + 1e-9)  # block i is general iff this count rises at i + 1
        if math.floor((i + 1) * general_ratio + 1e-9) > general_before:
            rows.append(_pool_pick(packed.general, general_before, seed, 1))
        else:
            rows.append(_pool_pick(packed.domain, i - general_before, seed, 0))
    return torch.stack(rows)


# ---------------------------------------------------------------- perplexity

def perplexity(backbone: Backbone, blocks: list[list[int]], batch_size: int = 8, desc: str = "perplexity") -> dict:
    """exp(mean next-token NLL) over `blocks` (no gradient), with the NLL and the number of predicted tokens."""
    if not blocks:
        raise ValueError("no held-out blocks to measure perplexity on; raise heldout_share")
    model, total, count = backbone.model, 0.0, 0
    was_training = model.training
    model.eval()
    by_length: dict[int, list[list[int]]] = {}
    for block in blocks:
        by_length.setdefault(len(block), []).append(block)
    batches = [rows[i:i + batch_size] for rows in by_length.values() for i in range(0, len(rows), batch_size)]
    with torch.inference_mode(), autocast(backbone.device, backbone.dtype):
        for rows in progress(batches, total=len(batches), desc=desc):
            ids = torch.tensor(rows, dtype=torch.long, device=backbone.device)
            nll, n = causal_lm_nll(model, ids, torch.ones_like(ids), ids)
            total, count = total + float(nll), count + n
    model.train(was_training)
    if count == 0:
        raise ValueError("the held-out blocks hold no token to predict; raise heldout_share or eval_blocks")
    return {"perplexity": math.exp(total / count), "nll": total / count, "tokens": count}


def heldout_perplexities(backbone: Backbone, heldout: dict[str, list[list[int]]], batch_size: int = 8) -> dict:
    """Perplexity on each held-out source: {source: perplexity}."""
    return {source: perplexity(backbone, blocks, batch_size, f"perplexity {source}")["perplexity"]
            for source, blocks in heldout.items()}


# ---------------------------------------------------------------- training

class LanguageModelLoss(torch.nn.Module):
    """The model plus its LM loss on packed blocks (every position a target) as one module, so DDP sees forward."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return causal_lm_loss(self.model, input_ids, torch.ones_like(input_ids), input_ids)


def prepare_model(backbone: Backbone, settings: PretrainSettings) -> torch.nn.Module:
    """A fresh `pretrain` LoRA on every linear projection (lora), or every weight made trainable (full)."""
    if isinstance(backbone.model, PeftModel):
        raise TypeError("the backbone already carries adapters; load a fresh backbone to pre-train it")
    torch.manual_seed(settings.seed)
    if settings.method == "full":
        backbone.model.requires_grad_(True)
        return backbone.model
    config = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=0.0,
                        target_modules="all-linear", bias="none")
    backbone.model = get_peft_model(backbone.model, config, adapter_name=PRETRAIN_ADAPTER)
    return backbone.model


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _weights(model: torch.nn.Module) -> dict:
    if isinstance(model, PeftModel):
        return get_peft_model_state_dict(model, adapter_name=PRETRAIN_ADAPTER)
    return model.state_dict()


def _save_checkpoint(path: Path, model, optimizer, scheduler, step: int, losses: list[float], seconds: float,
                     fingerprint: dict) -> None:
    with atomic_dir(path) as staging:
        atomic_write_json(staging / CHECKPOINT_FINGERPRINT, fingerprint)
        torch.save({"weights": _weights(model), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "step": step, "losses": losses, "seconds": seconds},
                   staging / "state.pt")


def checkpoint_fingerprint(backbone: Backbone, packed: PackedMix, settings: PretrainSettings) -> dict:
    """What a pre-training checkpoint must match to be resumed: settings, backbone, tokenizer and the packed blocks."""
    digest = hashlib.sha256()
    for blocks in (packed.domain, packed.general):
        digest.update(str(tuple(blocks.shape)).encode())
        digest.update(blocks.contiguous().numpy().tobytes())
    return training_fingerprint(settings, digest.hexdigest(), backbone=backbone.fingerprint,
                                tokenizer=backbone.tokenizer_fingerprint)


def merge_into_backbone(backbone: Backbone) -> None:
    """Fold the `pretrain` LoRA into the weights: the backbone becomes a plain model again (no-op after full)."""
    if isinstance(backbone.model, PeftModel):
        backbone.model = backbone.model.merge_and_unload()
    backbone.model.requires_grad_(False)
    backbone.model.eval()


def continue_pretraining(backbone: Backbone, packed: PackedMix, settings: PretrainSettings,
                         checkpoint_dir: str | Path | None = None, accelerator: Accelerator | None = None,
                         merge: bool = True) -> dict:
    """Train on `packed` for `settings.steps` steps, resuming from checkpoint_dir/latest if there; merge a LoRA after.

    A checkpoint made with other settings, backbone, tokenizer or training blocks is moved aside and training starts
    fresh. Returns the loss per step, seconds (all sessions), tokens trained on, trainable parameters, the resumed step.
    """
    if accelerator is None:
        accelerator = accelerator_for(backbone.dtype, backbone.device)
    fingerprint = checkpoint_fingerprint(backbone, packed, settings)
    model = prepare_model(backbone, settings)
    model.train()
    trainable = trainable_parameters(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.learning_rate,
                                  weight_decay=0.0)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(settings.warmup_ratio * settings.steps),
                                                settings.steps)
    # The scheduler stays unprepared: accelerate's wrapper would step it once per process at every step.
    lm, optimizer = accelerator.prepare(LanguageModelLoss(model), optimizer)
    start, losses, seconds = 0, [], 0.0
    latest = Path(checkpoint_dir) / "latest" if checkpoint_dir else None
    if latest is not None and accelerator.is_main_process:
        resumable_checkpoint(latest, fingerprint, accelerator.print)  # moves a stale checkpoint aside
    accelerator.wait_for_everyone()
    if latest is not None and (latest / "state.pt").is_file():
        state = torch.load(latest / "state.pt", weights_only=False)
        if isinstance(model, PeftModel):
            set_peft_model_state_dict(model, state["weights"], adapter_name=PRETRAIN_ADAPTER)
        else:
            model.load_state_dict(state["weights"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, losses, seconds = state["step"], state["losses"], state["seconds"]
        accelerator.print(f"resumed pre-training at step {start} from {latest}")
    global_size = settings.batch_size * accelerator.num_processes
    rank = accelerator.process_index
    began = time.perf_counter() - seconds
    with disable_input_dtype_casting(model):  # autocast casts a LoRA's input itself (retriever.py says why)
        for step in progress(range(start, settings.steps), total=settings.steps - start, desc="pre-training"):
            batch = training_batch(packed, step, global_size, settings.general_ratio, settings.seed)
            loss = lm(batch[rank * settings.batch_size:(rank + 1) * settings.batch_size].to(accelerator.device))
            accelerator.backward(loss)
            if settings.max_grad_norm:
                accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                            settings.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(accelerator.reduce(loss.detach(), reduction="mean")))
            done = step + 1
            if latest is not None and settings.save_every and (done % settings.save_every == 0 or done == settings.steps):
                if accelerator.is_main_process:
                    _save_checkpoint(latest, model, optimizer, scheduler, done, losses, time.perf_counter() - began,
                                     fingerprint)
                accelerator.wait_for_everyone()
    if merge:
        merge_into_backbone(backbone)
    else:
        model.eval()
    return {"losses": losses, "steps": len(losses), "seconds": time.perf_counter() - began,
            "tokens": len(losses) * global_size * settings.block_size, "trainable_parameters": trainable,
            "method": settings.method, "general_ratio": settings.general_ratio, "resumed_from": start,
            "processes": accelerator.num_processes}


# ---------------------------------------------------------------- the saved backbone

def save_pretrained_backbone(backbone: Backbone, target: str | Path, extra: dict | None = None) -> Path:
    """Save the adapted backbone as a standalone Hugging Face folder (float32 safetensors + tokenizer + pretrain.json)."""
    if isinstance(backbone.model, PeftModel):
        raise TypeError("the backbone still carries the pretrain LoRA; call merge_into_backbone first")
    backbone.model.to(torch.float32)
    with atomic_dir(target) as staging:
        backbone.model.save_pretrained(str(staging))
        backbone.tokenizer.save_pretrained(str(staging))
        atomic_write_json(staging / META, {"base_backbone": backbone.name, "base_fingerprint": backbone.fingerprint,
                                           **(extra or {})})
    return Path(target)


def pretrained_backbone_path(run_dir: str | Path) -> Path:
    """Where 01_pretrain saves the run's adapted backbone."""
    return Path(run_dir) / STEP / "backbone"


def backbone_for_run(backbone: str, run_dir: str | Path, use_pretrained: bool) -> str:
    """What later steps pass to load_backbone: this run's 01_pretrain backbone if `use_pretrained`, else `backbone`."""
    if not use_pretrained:
        return backbone
    if not run_dir:
        raise FileNotFoundError("use_pretrained_backbone is true but no run_dir is given; run the notebooks through "
                                "`python -m bsharedrag.run`, which runs 01_pretrain first")
    path = pretrained_backbone_path(run_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"use_pretrained_backbone is true but {path} holds no saved backbone: run 01_pretrain "
                                f"first (python -m bsharedrag.run --resume {Path(run_dir).name} --only 01), "
                                f"or set use_pretrained_backbone: false")
    return str(path)


def settings_from_config(cfg: dict) -> PretrainSettings:
    """The pre-training settings a resolved config asks for (its `01_pretrain` section and the common seed)."""
    section = cfg[STEP]
    return PretrainSettings(
        method=section["method"], lora_r=section["lora_r"], lora_alpha=section["lora_alpha"],
        block_size=section["block_size"], general_ratio=section["general_ratio"],
        learning_rate=section["learning_rate"], warmup_ratio=section["warmup_ratio"],
        max_grad_norm=section["max_grad_norm"], steps=section["train_steps"], batch_size=section["train_batch_size"],
        save_every=section["save_every"], seed=cfg["common"]["seed"])


def main(argv: list[str] | None = None) -> int:
    """Continually pre-train a run's backbone outside the notebook, e.g. on several GPUs:

    accelerate launch --multi_gpu --num_processes 8 -m bsharedrag.pretrain --run outputs/RUN_ID
    """
    import argparse

    from .backbone import load_backbone
    from .config import load_config
    from .data import load_sets

    parser = argparse.ArgumentParser(prog="python -m bsharedrag.pretrain", description=main.__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a run folder (holds resolved.yaml)")
    args = parser.parse_args(argv)
    cfg = load_config(args.run / "resolved.yaml")
    common, section, settings = cfg["common"], cfg[STEP], settings_from_config(cfg)
    sets = load_sets(common)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    bb = load_backbone(common["backbone"], device=str(accelerator.device), compute_dtype=common["compute_dtype"],
                       seed=common["seed"], weights_dtype="float32")  # the merge updates the weights themselves
    mix = build_text_mix(sets, common["passage_format"], section["general_source"], section["heldout_share"],
                         common["seed"])
    packed = pack_mix(mix, bb.tokenizer, settings.block_size, common["seed"], section["eval_blocks"])
    step_dir = args.run / STEP
    out = continue_pretraining(bb, packed, settings, step_dir / "checkpoints" / "mixed", accelerator=accelerator)
    if accelerator.is_main_process:
        save_pretrained_backbone(bb, pretrained_backbone_path(args.run), {"settings": asdict(settings)})
        print(f"{out['steps']} steps on {out['processes']} process(es), final loss {np.mean(out['losses'][-10:]):.3f}; "
              f"backbone in {pretrained_backbone_path(args.run)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
