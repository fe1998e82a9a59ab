"""The retrieval adapter: a LoRA on the shared backbone trained with InfoNCE over in-batch plus hard negatives.

Scales out unchanged under `accelerate launch`: every process's passage embeddings are gathered so that each query
is scored against the whole global batch, and GradCache splits a batch larger than memory into chunks.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.helpers import disable_input_dtype_casting
from transformers import get_linear_schedule_with_warmup

from . import adapters
from .artefacts import CHECKPOINT_FINGERPRINT, atomic_dir, atomic_write_json, resumable_checkpoint, sha256_json, \
    training_fingerprint
from .backbone import Backbone, FineTuning, body_pool, pad_rows, tokenize_for_embedding, \
    train_top_layers
from .devices import accelerator_for
from .progress import progress

RETRIEVAL_ADAPTER = "retrieval"
META = "retriever.json"
LENGTH_BUCKETS = 4  # forward passes per batch of training texts (see _encode)


@dataclass
class RetrieverSettings(FineTuning):
    """Every knob of retrieval-adapter training (03_retriever declares each as a parameter)."""

    lora_r: int = 16
    lora_alpha: int = 32
    target_modules: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                          "gate_proj", "up_proj", "down_proj"])
    lora_layers: int = 0  # LoRA on the top N decoder layers only (backprop stops below them); 0 puts it on all
    temperature: float = 0.05
    learning_rate: float = 2e-4
    warmup_ratio: float = 0.1
    steps: int = 100
    batch_size: int = 8  # questions per process per step
    n_negatives: int = 3  # negatives per question in its group (positive first)
    chunk_size: int = 0  # GradCache: texts per forward pass; 0 encodes the whole batch at once
    query_max_length: int = 64
    passage_max_length: int = 128
    pooling: str = "last"
    query_prefix: str = ""
    passage_prefix: str = ""
    save_every: int = 0  # steps between resumable checkpoints; 0 saves none
    seed: int = 0


class PooledEncoder(torch.nn.Module):
    """The backbone body plus pooling as one module, so DDP sees every forward pass."""

    def __init__(self, model: torch.nn.Module, pooling: str):
        super().__init__()
        self.model, self.pooling = model, pooling

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return body_pool(self.model, input_ids, attention_mask, (self.pooling,))[self.pooling]


def add_retrieval_adapter(backbone: Backbone, settings: RetrieverSettings) -> PeftModel:
    """Wrap the backbone with a fresh LoRA named `retrieval` (the base weights stay frozen)."""
    if isinstance(backbone.model, PeftModel):
        raise ValueError("the backbone already carries adapters; load a fresh backbone to train a new retrieval adapter")
    n_layers = backbone.model.config.get_text_config().num_hidden_layers
    top = list(range(max(0, n_layers - settings.lora_layers), n_layers)) if settings.lora_layers else None
    config = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=0.0,
                        target_modules=list(settings.target_modules), bias="none", layers_to_transform=top,
                        layers_pattern="layers" if top else None)
    torch.manual_seed(settings.seed)
    model = get_peft_model(backbone.model, config, adapter_name=RETRIEVAL_ADAPTER)
    backbone.model = model
    return model


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def infonce_loss(queries: torch.Tensor, passages: torch.Tensor, temperature: float, group_size: int) -> torch.Tensor:
    """Cross-entropy of each query against all passages; its positive is the first of its own group."""
    scores = queries @ passages.T / temperature
    labels = torch.arange(queries.shape[0], device=queries.device) * group_size
    return torch.nn.functional.cross_entropy(scores, labels)


def gather_keep_grad(x: torch.Tensor, accelerator: Accelerator) -> torch.Tensor:
    """All processes' rows, in process order; this process's own rows keep their autograd graph."""
    if accelerator.num_processes == 1:
        return x
    chunks = list(accelerator.gather(x.detach().contiguous()).split(x.shape[0]))
    chunks[accelerator.process_index] = x
    return torch.cat(chunks)


def global_batch(groups: list[dict], step: int, global_size: int, n_negatives: int, seed: int) -> list[tuple[str, list[str]]]:
    """The (query, [positive, negatives...]) groups of `step`, the same whatever the number of processes."""
    epoch, offset = divmod(step * global_size, len(groups))
    out = []
    while len(out) < global_size:
        order = np.random.default_rng([seed, epoch]).permutation(len(groups))
        for i in order[offset: offset + global_size - len(out)]:
            g = groups[i]
            rng = np.random.default_rng([seed, step, int(i)])
            positive = g["positives"][int(rng.integers(len(g["positives"])))]
            negatives = list(g["negatives"])
            if len(negatives) >= n_negatives:
                negatives = [negatives[j] for j in sorted(rng.choice(len(negatives), n_negatives, replace=False))]
            else:  # too few mined: repeat (a duplicate negative only adds a repeated term to the softmax)
                negatives = (negatives * n_negatives)[:n_negatives] if negatives else []
            if len(negatives) != n_negatives:
                raise ValueError(f"question {g['qid']} has no negatives; mine again with a larger min_negatives")
            out.append((g["query"], [positive] + negatives))
        epoch, offset = epoch + 1, 0
    return out


def _encode(encoder, tokenizer, rows: list[list[int]], device, buckets: int = LENGTH_BUCKETS) -> torch.Tensor:
    """Embed `rows` in their order, in `buckets` forward passes over length-sorted rows, each padded to its own
    longest row: a group mixes 40-token and 96-token passages, and a pad token costs as much as a real one."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    parts = []
    for bucket in np.array_split(np.array(order), min(buckets, len(rows))):
        ids, mask = pad_rows(tokenizer, [rows[i] for i in bucket])
        parts.append(encoder(ids.to(device), mask.to(device)))
    inverse = torch.empty(len(rows), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(rows))
    return torch.cat(parts)[inverse.to(parts[0].device)]


def train_step(encoder, tokenizer, batch: list[tuple[str, list[str]]], doc_text: dict[str, str],
               settings: RetrieverSettings, accelerator: Accelerator, weight: float = 1.0,
               buckets: int = LENGTH_BUCKETS) -> float:
    """One optimisation step's forward and backward of `weight` x the loss (the caller steps the optimiser); returns
    the global loss, unweighted. `buckets`: forward passes per list of texts (see _encode)."""
    group = 1 + settings.n_negatives
    q_rows = tokenize_for_embedding(tokenizer, [settings.query_prefix + q for q, _ in batch], settings.query_max_length,
                                    warn=False)
    p_rows = tokenize_for_embedding(tokenizer, [settings.passage_prefix + doc_text[d] for _, docs in batch for d in docs],
                                    settings.passage_max_length, warn=False)  # cut to length by design
    world = accelerator.num_processes
    device = accelerator.device
    if not settings.chunk_size:
        q = _encode(encoder, tokenizer, q_rows, device, buckets)
        p = _encode(encoder, tokenizer, p_rows, device, buckets)
        loss = infonce_loss(gather_keep_grad(q, accelerator), gather_keep_grad(p, accelerator),
                            settings.temperature, group)
        accelerator.backward(loss * world * weight)  # DDP averages gradients over processes; the loss is already global
        return float(loss.detach())
    # GradCache: embed without a graph, take the loss gradient w.r.t. the embeddings, then re-embed chunk by
    # chunk with a graph and backpropagate those cached gradients (memory: one chunk, not the whole batch).
    chunks = [(q_rows[i:i + settings.chunk_size]) for i in range(0, len(q_rows), settings.chunk_size)]
    n_query_chunks = len(chunks)
    chunks += [(p_rows[i:i + settings.chunk_size]) for i in range(0, len(p_rows), settings.chunk_size)]
    with torch.no_grad():
        reps = [_encode(encoder, tokenizer, rows, device, buckets) for rows in chunks]
    q = torch.cat(reps[:n_query_chunks]).requires_grad_()
    p = torch.cat(reps[n_query_chunks:]).requires_grad_()
    loss = infonce_loss(gather_keep_grad(q, accelerator), gather_keep_grad(p, accelerator), settings.temperature, group)
    (loss * world * weight).backward()
    grads = list(q.grad.split([len(c) for c in chunks[:n_query_chunks]])) + \
        list(p.grad.split([len(c) for c in chunks[n_query_chunks:]]))
    for i, (rows, grad) in enumerate(zip(chunks, grads)):
        sync = contextlib.nullcontext() if i == len(chunks) - 1 else accelerator.no_sync(encoder)
        with sync:
            accelerator.backward((_encode(encoder, tokenizer, rows, device, buckets) * grad).sum())
    return float(loss.detach())


def _trained_state(model: torch.nn.Module, method: str) -> dict[str, torch.Tensor]:
    """What training changes: the LoRA's tensors, or (method "full") the trained layers' own."""
    if method == "full":
        return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    return get_peft_model_state_dict(model, adapter_name=RETRIEVAL_ADAPTER)


def _restore_trained_state(model: torch.nn.Module, state: dict[str, torch.Tensor], method: str) -> None:
    if method == "lora":
        set_peft_model_state_dict(model, state, adapter_name=RETRIEVAL_ADAPTER)
        return
    unexpected = model.load_state_dict(state, strict=False).unexpected_keys
    if unexpected:
        raise ValueError(f"the checkpoint holds tensors this model lacks ({unexpected[:3]}); delete the checkpoint")


def _save_checkpoint(path: Path, model: torch.nn.Module, method: str, optimizer, scheduler, step: int,
                     losses: list[float], history: list[dict], auxiliary_losses: list[float],
                     fingerprint: dict) -> None:
    with atomic_dir(path) as staging:
        atomic_write_json(staging / CHECKPOINT_FINGERPRINT, fingerprint)
        torch.save({"adapter": _trained_state(model, method),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "step": step, "losses": losses, "history": history, "auxiliary_losses": auxiliary_losses},
                   staging / "state.pt")


def checkpoint_fingerprint(backbone: Backbone, groups: list[dict], doc_text: dict[str, str],
                           settings: RetrieverSettings, **extra) -> dict:
    """What a retriever checkpoint must match to be resumed: settings, backbone, tokenizer, groups and their texts."""
    named = sorted({d for g in groups for d in (*g["positives"], *g["negatives"])})
    data = sha256_json([groups, [(d, doc_text.get(d)) for d in named]])
    return training_fingerprint(settings, data, backbone=backbone.fingerprint,
                                tokenizer=backbone.tokenizer_fingerprint, **extra)


def train_retrieval_adapter(backbone: Backbone, groups: list[dict], doc_text: dict[str, str],
                            settings: RetrieverSettings, checkpoint_dir: str | Path | None = None,
                            validate=None, validate_every: int = 0, accelerator: Accelerator | None = None,
                            retrieval_weight: float = 1.0, auxiliary=None, auxiliary_data: str = "") -> dict:
    """Train the `retrieval` LoRA on `groups` for `settings.steps` steps; resumes from checkpoint_dir if one is there.

    With `settings.method` "full" the same loop fine-tunes the bare backbone's top `lora_layers` decoder layers
    instead, at `full_learning_rate` (see separate.py).

    A checkpoint made with other settings, backbone, tokenizer or training data is moved aside and training starts
    fresh. Returns the loss per step and the validation results `validate(step)` gave every `validate_every` steps.
    `auxiliary(step, model, accelerator)`, if given, backpropagates a second loss into the same LoRA each step and
    returns its value; the retrieval loss is then weighted by `retrieval_weight` (Fully Shared RAG's lambda), and
    `auxiliary_data` (a hash of what it trains on) joins the checkpoint's fingerprint.
    """
    if not groups:
        raise ValueError("no training groups: every question lacked a positive; check the split and the qrels")
    if accelerator is None:
        accelerator = accelerator_for(backbone.dtype, backbone.device)
    if settings.method == "full":
        model = train_top_layers(backbone, settings.lora_layers, RETRIEVAL_ADAPTER)
    elif isinstance(backbone.model, PeftModel):
        model = backbone.model
    else:
        model = add_retrieval_adapter(backbone, settings)
    model.train()
    encoder = PooledEncoder(model, settings.pooling)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.method_learning_rate, weight_decay=0.0)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(settings.warmup_ratio * settings.steps), settings.steps)
    # The scheduler stays out of prepare(): accelerate would step it once per process, decaying N times too fast.
    encoder, optimizer = accelerator.prepare(encoder, optimizer)
    start, losses, history, auxiliary_losses = 0, [], [], []
    latest = Path(checkpoint_dir) / "latest" if checkpoint_dir else None
    fingerprint = checkpoint_fingerprint(backbone, groups, doc_text, settings, retrieval_weight=retrieval_weight,
                                         auxiliary=auxiliary_data if auxiliary is not None else None)
    if latest is not None and accelerator.is_main_process:
        resumable_checkpoint(latest, fingerprint, accelerator.print)  # moves a stale checkpoint aside
    accelerator.wait_for_everyone()
    if latest is not None and (latest / "state.pt").is_file():
        state = torch.load(latest / "state.pt", weights_only=False)
        _restore_trained_state(model, state["adapter"], settings.method)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, losses, history = state["step"], state["losses"], state["history"]
        auxiliary_losses = state.get("auxiliary_losses", [])
        accelerator.print(f"resumed retriever training at step {start} from {latest}")
    global_size = settings.batch_size * accelerator.num_processes
    rank = accelerator.process_index
    began = time.perf_counter()
    # Every forward below runs under autocast, which casts a LoRA's input itself: peft's own cast to the fp32
    # adapter's dtype (undone at once by autocast) copies each activation twice more for the same values.
    with disable_input_dtype_casting(model):
        for step in progress(range(start, settings.steps), total=settings.steps - start, desc="retriever"):
            batch = global_batch(groups, step, global_size, settings.n_negatives, settings.seed)
            mine = batch[rank * settings.batch_size:(rank + 1) * settings.batch_size]
            if retrieval_weight > 0:
                losses.append(train_step(encoder, backbone.tokenizer, mine, doc_text, settings, accelerator,
                                         retrieval_weight))
            else:
                losses.append(float("nan"))
            if auxiliary is not None:
                auxiliary_losses.append(auxiliary(step, model, accelerator))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            if validate is not None and validate_every and (done % validate_every == 0 or done == settings.steps):
                model.eval()
                history.append({"step": done, **validate(done)})
                model.train()
            if latest is not None and settings.save_every and done % settings.save_every == 0 \
                    and accelerator.is_main_process:
                _save_checkpoint(latest, model, settings.method, optimizer, scheduler, done, losses, history,
                                 auxiliary_losses, fingerprint)
    model.eval()
    return {"losses": losses, "validation": history, "seconds": time.perf_counter() - began,
            "processes": accelerator.num_processes, "auxiliary_losses": auxiliary_losses}


def adapter_identity(adapter_dir: str | Path) -> str:
    """`retrieval:<sha256 of the adapter weights>`: what index manifests record as the adapter."""
    return adapters.adapter_identity(adapter_dir, RETRIEVAL_ADAPTER)


def save_retrieval_adapter(backbone: Backbone, settings: RetrieverSettings, target: str | Path, extra: dict | None = None) -> Path:
    """Save the LoRA alone (a few MB) with retriever.json: its settings and the backbone it was trained on."""
    return adapters.save_adapter(backbone, RETRIEVAL_ADAPTER, target, META, {"settings": asdict(settings), **(extra or {})})


def attach_retrieval_adapter(backbone: Backbone, adapter_dir: str | Path, name: str = RETRIEVAL_ADAPTER) -> RetrieverSettings:
    """Attach a saved retrieval LoRA to `backbone` as adapter `name` and activate it; refuses one of another backbone."""
    meta = adapters.attach_adapter(backbone, adapter_dir, name, META, "03_retriever")
    return RetrieverSettings(**meta["settings"])


def make_validator(backbone: Backbone, sets: dict, settings: RetrieverSettings, passage_format: str,
                   distractors: int = 500, seed: int = 0):
    """A `validate(step)` for training: dev questions of each set against their judged documents plus distractors."""
    from .backbone import embed
    from .metrics import evaluate_retrieval

    probes = {}
    for name, ds in sets.items():
        dev = ds.split("dev")
        judged = {d for q in dev["qid"] for d in ds.qrels.get(q, {})}
        others = ds.corpus[~ds.corpus["doc_id"].isin(judged)]
        extra = others.sample(n=min(distractors, len(others)), random_state=seed)["doc_id"]
        keep = ds.corpus[ds.corpus["doc_id"].isin(judged | set(extra))]
        texts = [passage_format.format(title=t, text=x) for t, x in zip(keep["title"], keep["text"])]
        probes[name] = (dev, list(keep["doc_id"]), texts, ds.qrels)

    def validate(step: int) -> dict:
        out = {}
        for name, (dev, doc_ids, texts, qrels) in probes.items():
            q = embed(backbone, list(dev["text"]), (settings.pooling,), settings.query_prefix,
                      settings.query_max_length, desc=f"dev {name} queries")[settings.pooling]
            p = embed(backbone, texts, (settings.pooling,), settings.passage_prefix, settings.passage_max_length,
                      desc=f"dev {name} passages")[settings.pooling]
            top = np.argsort(-(q @ p.T), axis=1)[:, :10]
            ranking = {qid: [doc_ids[j] for j in row] for qid, row in zip(dev["qid"], top)}
            scores = evaluate_retrieval(ranking, qrels)
            out[f"{name}_ndcg@5"], out[f"{name}_hit@3"] = scores["ndcg@5"], scores["hit@3"]
        return out

    return validate


def train_variant(backbone: Backbone, groups: list[dict], doc_text: dict[str, str], settings: RetrieverSettings,
                  step_dir: str | Path, variant: str, validate=None, validate_every: int = 0) -> dict:
    """Train one retrieval adapter (resuming from its checkpoint) and save it to step_dir/adapters/<variant>."""
    step_dir = Path(step_dir)
    out = train_retrieval_adapter(backbone, groups, doc_text, settings, step_dir / "checkpoints" / variant,
                                  validate, validate_every)
    trainable = trainable_parameters(backbone.model)
    save_retrieval_adapter(backbone, settings, step_dir / "adapters" / variant,
                           {"variant": variant, "train_groups": len(groups), "trainable_parameters": trainable})
    return {"steps": len(out["losses"]), "final_loss": float(np.mean(out["losses"][-10:])),
            "seconds_this_session": out["seconds"], "trainable_parameters": trainable,
            "train_groups": len(groups), "losses": out["losses"], "validation": out["validation"]}


def training_data(sets: dict, mined_dir: str | Path, variant: str, passage_format: str) -> tuple[list[dict], dict[str, str]]:
    """02's training groups of `variant` over all data sets, and the text of every document they may name."""
    from .mining import load_groups

    doc_text = {d: p for ds in sets.values() for d, p in zip(ds.corpus["doc_id"], ds.passages(passage_format))}
    groups = [g for name in sets for g in load_groups(Path(mined_dir) / f"{name}_{variant}.jsonl")]
    return groups, doc_text


def settings_from_config(cfg: dict) -> RetrieverSettings:
    """The retriever settings a resolved config asks for (its `03_retriever` section and the common prefixes)."""
    section, common = cfg["03_retriever"], cfg["common"]
    return RetrieverSettings(
        lora_r=section["lora_r"], lora_alpha=section["lora_alpha"], lora_layers=section["lora_layers"],
        temperature=section["temperature"], learning_rate=section["learning_rate"],
        warmup_ratio=section["warmup_ratio"], steps=section["train_steps"], batch_size=section["train_batch_size"],
        n_negatives=section["train_negatives"], chunk_size=section["chunk_size"],
        query_max_length=section["query_max_length"], passage_max_length=section["passage_max_length"],
        pooling=section["pooling"], query_prefix=common["query_prefix"], passage_prefix=common["passage_prefix"],
        save_every=section["save_every"], seed=common["seed"])


def main(argv: list[str] | None = None) -> int:
    """Train a run's retrieval adapter outside the notebook, e.g. on several GPUs:

    accelerate launch --multi_gpu --num_processes 8 -m bsharedrag.retriever --run outputs/RUN_ID --variant hard
    """
    import argparse

    from .backbone import load_backbone
    from .config import load_config
    from .data import load_sets

    parser = argparse.ArgumentParser(prog="python -m bsharedrag.retriever", description=main.__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a run folder whose 02_mine_negatives is complete")
    parser.add_argument("--variant", choices=["hard", "random"], default="hard")
    args = parser.parse_args(argv)
    cfg = load_config(args.run / "resolved.yaml")
    common, settings = cfg["common"], settings_from_config(cfg)
    sets = load_sets(common)
    groups, doc_text = training_data(sets, args.run / "02_mine_negatives", args.variant, common["passage_format"])
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    bb = load_backbone(common["backbone"], device=str(accelerator.device), compute_dtype=common["compute_dtype"],
                       seed=common["seed"])
    step_dir = args.run / "03_retriever"
    out = train_retrieval_adapter(bb, groups, doc_text, settings, step_dir / "checkpoints" / args.variant,
                                  accelerator=accelerator)
    if accelerator.is_main_process:
        save_retrieval_adapter(bb, settings, step_dir / "adapters" / args.variant,
                               {"variant": args.variant, "train_groups": len(groups),
                                "trainable_parameters": trainable_parameters(bb.model)})
        print(f"{args.variant}: {len(out['losses'])} steps on {out['processes']} process(es), "
              f"final loss {np.mean(out['losses'][-10:]):.3f}; adapter in {step_dir / 'adapters' / args.variant}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
