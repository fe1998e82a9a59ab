"""What a config's training and encoding cost at its scale, measured before the weights are at hand: a random-initialised
model of a named backbone's shape runs the library's own continual pre-training step (01), retriever step (GradCache
included), generator step (trl), Fully Shared RAG step (07: both on one LoRA) and corpus encoding with the config's
batch sizes and lengths, timed and set against the device's matmul limit measured in the same run. Speed does not depend
on the weights' values, so these are the real backbone's step times. A stage that runs out of device memory is reported
so, and the others still run.

    python -m bsharedrag.scalebench [--config configs/paper.yaml] [--shape qwen2.5-7b] [--steps 3] [--docs 512]
                                    [--stages pretrain,retriever,generator,fully_shared,encoding]

Texts are random words cut to the config's token lengths, so every sequence is as long as the config allows (the
upper bound of the real data's cost). The vocabulary is the default tokenizer's (262k rows: the LM head, which runs on
answer tokens only, costs a little more than Qwen's 152k would).
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from peft import PeftModel

from . import paths
from .artefacts import atomic_write_json
from .backbone import Backbone, embed, load_tokenizer, prepare_default_backbone
from .bench import body_flops_per_token
from .config import load_config
from .devices import dtype_name, measure_matmul_tflops, pick_compute_dtype, pick_device
from .generator import settings_from_config as generator_settings
from .fullyshared import train_fully_shared
from .generator import train_generation_adapter
from .pretrain import PackedMix, continue_pretraining, leading_bos, pack_blocks
from .pretrain import settings_from_config as pretrain_settings
from .retriever import settings_from_config as retriever_settings
from .retriever import train_retrieval_adapter
from .steps import versions

SHAPES = {  # the published configs' sizes (config.json of each model)
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, rope_theta=1e6, tie_word_embeddings=False),
    "llama-3.2-3b": dict(model_type="llama", hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "tiny": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1),
}
WORDS = ("price battery size colour cable charger screen warranty delivery return strap lid handle motor speed water "
         "bottle kettle fabric zip pocket laptop phone case glass steel plastic wood light lamp bulb fan filter "
         "blade button switch plug power volume sound noise weight height width length").split()


def random_backbone(shape: str, device: torch.device, dtype: torch.dtype) -> Backbone:
    """A model of `shape` with random weights, built on `device` in `dtype`, over the default tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; use one of {', '.join(SHAPES)}")
    tokenizer = load_tokenizer(prepare_default_backbone())
    sizes = dict(SHAPES[shape])
    config = AutoConfig.for_model(sizes.pop("model_type"), **sizes, vocab_size=len(tokenizer),
                                  max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return Backbone(f"random-{shape}", model.eval(), tokenizer, device, dtype, fingerprint=f"random-{shape}")


def texts_of(tokenizer, n_texts: int, n_tokens: int, seed: int) -> list[str]:
    """`n_texts` texts of random words, each cut to `n_tokens` tokens (without special tokens)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_texts):
        ids = tokenizer(" ".join(rng.choice(WORDS, 2 * n_tokens)), add_special_tokens=False)["input_ids"]
        out.append(tokenizer.decode(ids[:n_tokens]))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device: torch.device) -> float | None:
    """The most memory tensors held on the device since the stage began (weights included)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _bare(bb: Backbone) -> None:
    """The backbone without the LoRA a stage attached (also after a stage that ran out of memory)."""
    if isinstance(bb.model, PeftModel):
        bb.model = bb.model.unload()


SMALLER = {  # what takes a stage's memory down, per stage
    "pretrain": "01_pretrain.train_batch_size or block_size (a smaller step: this changes the training)",
    "retriever": "03_retriever.chunk_size (GradCache's texts per pass: exact, the same step)",
    "generator": "04_generator.micro_batch_size (examples per pass, gradients accumulated: the same step)",
    "fully_shared": "03_retriever.chunk_size and 04_generator.micro_batch_size (both exact)",
    "encoding": "common.batch_size (texts per forward pass)",
}


def _measured(name: str, bb: Backbone, stage: Callable[[], dict]) -> dict:
    """`stage()`'s figures, or {"out_of_memory": True, ...} and a line naming the peak when it ran out of device
    memory: the other stages still run, so one call says which of a config's batch settings fit the card."""
    try:
        return stage()
    except torch.OutOfMemoryError as err:
        peak = _peak_gb(bb.device)
        held = "" if peak is None else (f" ({peak:.0f} GiB held at the peak, of "
                                        f"{torch.cuda.get_device_properties(bb.device).total_memory / 2**30:.0f})")
        print(f"{name}: out of device memory{held}; lower {SMALLER[name]}", flush=True)
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        return {"out_of_memory": True, "peak_memory_gb": peak, "error": first_line}
    finally:
        _bare(bb)
        gc.collect()
        if bb.device.type == "cuda":
            torch.cuda.empty_cache()


def time_pretrain(bb: Backbone, settings, steps: int) -> dict:
    """Seconds per step of the config's continual pre-training step (01: a LoRA on every linear layer, the LM loss on
    every position of packed blocks), one warm-up step first."""
    _reset_peak(bb.device)
    texts = texts_of(bb.tokenizer, settings.batch_size * (steps + 2), settings.block_size, 6)
    blocks = torch.tensor(pack_blocks(bb.tokenizer(texts, add_special_tokens=False)["input_ids"], settings.block_size,
                                      bb.tokenizer.eos_token_id, leading_bos(bb.tokenizer)), dtype=torch.long)
    packed = PackedMix(domain=blocks, general=blocks, heldout={}, counts=pd.DataFrame())
    seconds, out = _timed_steps(bb, lambda n: continue_pretraining(
        bb, packed, replace(settings, steps=n, save_every=0), merge=False), steps)
    return {"seconds_per_step": seconds,
            "tokens_per_step": float(settings.batch_size * settings.block_size),
            "mean_tokens": float(settings.block_size), "losses": out["losses"], "peak_memory_gb": _peak_gb(bb.device)}


def retrieval_inputs(bb: Backbone, settings) -> tuple[list[dict], dict[str, str], dict]:
    """Groups of a query, its positive and `n_negatives` negatives, each text as long as `settings` allow, for four
    steps' worth of batches; with the tokens a step encodes ({"tokens_per_step", "mean_tokens"} of its passages)."""
    n_groups = settings.batch_size * 4
    per = 1 + settings.n_negatives
    queries = texts_of(bb.tokenizer, n_groups, settings.query_max_length, 1)
    passages = texts_of(bb.tokenizer, n_groups * per, settings.passage_max_length, 2)
    doc_text = {f"d{i}": t for i, t in enumerate(passages)}
    groups = [{"qid": f"q{i}", "query": q, "positives": [f"d{i * per}"],
               "negatives": [f"d{i * per + j}" for j in range(1, per)]} for i, q in enumerate(queries)]
    q_tokens = np.mean([len(bb.tokenizer(settings.query_prefix + q)["input_ids"]) for q in queries[:8]])
    p_tokens = np.mean([min(len(bb.tokenizer(settings.passage_prefix + p)["input_ids"]), settings.passage_max_length)
                        for p in passages[:8]])
    tokens = settings.batch_size * (min(q_tokens, settings.query_max_length) + per * p_tokens)
    return groups, doc_text, {"tokens_per_step": float(tokens), "mean_tokens": float(p_tokens)}


def generation_examples(bb: Backbone, settings, n: int) -> tuple[list[dict], dict]:
    """`n` (prompt, completion) examples of the longest prompt and answer `settings` allow, with the tokens a step
    trains on ({"tokens_per_step", "answer_tokens_per_step", "mean_tokens"})."""
    prompt_tokens = settings.top_k * settings.doc_max_tokens + 64
    prompts = texts_of(bb.tokenizer, n, prompt_tokens, 3)
    answers = texts_of(bb.tokenizer, n, settings.answer_max_tokens, 4)
    examples = [{"prompt": p + "\nAnswer:", "completion": " " + a} for p, a in zip(prompts, answers)]
    return examples, {
        "tokens_per_step": float(settings.batch_size * (prompt_tokens + 3 + settings.answer_max_tokens + 1)),
        "answer_tokens_per_step": float(settings.batch_size * (settings.answer_max_tokens + 1)),
        "mean_tokens": float(prompt_tokens + settings.answer_max_tokens)}


def _timed_steps(bb: Backbone, train: Callable[[int], dict], steps: int) -> tuple[float, dict]:
    """Seconds per step of `train(steps)` after `train(1)` as a warm-up (its LoRA removed again), and its output."""
    train(1)
    _bare(bb)
    _sync(bb.device)
    began = time.perf_counter()
    out = train(steps)
    _sync(bb.device)
    return (time.perf_counter() - began) / steps, out


def time_retriever(bb: Backbone, settings, steps: int) -> dict:
    """Seconds per step of the config's retriever step (one warm-up step first), and its tokens per step."""
    _reset_peak(bb.device)
    groups, doc_text, tokens = retrieval_inputs(bb, settings)
    seconds, out = _timed_steps(bb, lambda n: train_retrieval_adapter(
        bb, groups, doc_text, replace(settings, steps=n, save_every=0)), steps)
    return {"seconds_per_step": seconds, **tokens, "losses": out["losses"], "gradcache": settings.chunk_size > 0,
            "peak_memory_gb": _peak_gb(bb.device)}


def time_generator(bb: Backbone, settings, steps: int) -> dict:
    """Seconds per step of the config's generator step (trl, answer-only loss), its first step included."""
    _reset_peak(bb.device)
    examples, tokens = generation_examples(bb, settings, settings.batch_size * (steps + 1))
    with tempfile.TemporaryDirectory() as ckpt:
        _sync(bb.device)
        out = train_generation_adapter(bb, examples, replace(settings, steps=steps + 1, save_every=0), ckpt)
        _sync(bb.device)
    return {"seconds_per_step": out["seconds"] / (steps + 1), "steps_timed": steps + 1, **tokens,
            "losses": out["losses"], "peak_memory_gb": _peak_gb(bb.device)}


def time_fully_shared(bb: Backbone, retrieval, generation, steps: int, lam: float = 0.5) -> dict:
    """Seconds per step of Fully Shared RAG's step (07: the retriever's step and the generator's answer loss on one
    LoRA, each backpropagated in turn; one warm-up step first), and the tokens of both parts."""
    _reset_peak(bb.device)
    groups, doc_text, r_tokens = retrieval_inputs(bb, retrieval)
    examples, g_tokens = generation_examples(bb, generation, generation.batch_size * 4)
    seconds, out = _timed_steps(bb, lambda n: train_fully_shared(
        bb, lam, groups, doc_text, examples, replace(retrieval, steps=n, save_every=0), generation), steps)
    return {"seconds_per_step": seconds, "lambda": lam, "retrieval": r_tokens, "generation": g_tokens,
            "losses": out["losses"], "peak_memory_gb": _peak_gb(bb.device)}


def time_encoding(bb: Backbone, n_docs: int, max_length: int, batch_size: int) -> dict:
    """Corpus-encoding tokens per second through the body (last-token pooling), one warm-up batch first."""
    _reset_peak(bb.device)
    texts = texts_of(bb.tokenizer, n_docs, max_length, 5)
    with warnings.catch_warnings():  # every text is cut to max_length on purpose
        warnings.filterwarnings("ignore", message=".*exceed max_length.*")
        embed(bb, texts[:batch_size], ("last",), max_length=max_length, batch_size=batch_size)
        _sync(bb.device)
        began = time.perf_counter()
        embed(bb, texts, ("last",), max_length=max_length, batch_size=batch_size)
        _sync(bb.device)
        seconds = time.perf_counter() - began
    return {"seconds": seconds, "tokens": n_docs * max_length, "tokens_per_s": n_docs * max_length / seconds,
            "mean_tokens": float(max_length), "peak_memory_gb": _peak_gb(bb.device)}


def _gib(part: dict) -> str:
    return "n/a GiB" if part.get("peak_memory_gb") is None else f"{part['peak_memory_gb']:.1f} GiB"


STAGES = ("pretrain", "retriever", "generator", "fully_shared", "encoding")


def run(config: Path, shape: str, steps: int, n_docs: int, device: str | None = None,
        compute_dtype: str | None = None, stages: tuple[str, ...] = STAGES) -> dict:
    cfg = load_config(config)
    dev = pick_device(device)
    dtype = pick_compute_dtype(dev, compute_dtype or cfg["common"]["compute_dtype"])
    peak = measure_matmul_tflops(dtype, dev, n=8192 if dev.type == "cuda" else 1024, seconds=1.0)
    figures = {"config": str(config), "shape": shape, "device": str(dev), "dtype": dtype_name(dtype),
               "matmul_tflops": peak, "versions": versions()}
    if dev.type == "cuda":
        figures["gpu"] = torch.cuda.get_device_name(dev)
    bb = random_backbone(shape, dev, dtype)
    body = sum(p.numel() for n, p in bb.model.get_decoder().named_parameters() if "embed" not in n)
    figures["body_parameters"] = body
    print(f"{shape}: {body / 1e9:.2f}B body parameters on {dev} in {figures['dtype']}; matmul {peak:.1f} TFLOP/s",
          flush=True)

    def training(name: str, part: dict, budget: int, extra_flops: Callable[[dict], float]) -> None:
        """Forward + backward (3 x the forward's FLOPs; GradCache's extra no-grad forward is not useful work)."""
        figures[name] = part
        if part.get("out_of_memory"):
            return
        flops = 3 * body_flops_per_token(bb.model, part["mean_tokens"]) * part["tokens_per_step"] + extra_flops(part)
        part["tflops"] = flops / part["seconds_per_step"] / 1e12
        part["share_of_matmul_limit"] = part["tflops"] / peak
        part["paper_steps"] = budget
        part["hours_for_paper_steps"] = part["seconds_per_step"] * budget / 3600
        print(f"{name}: {part['seconds_per_step']:.2f} s/step, {part['tokens_per_step']:.0f} tokens/step, "
              f"{part['tflops']:.0f} TFLOP/s ({part['share_of_matmul_limit']:.0%} of the matmul limit), "
              f"{part['hours_for_paper_steps']:.2f} h for {budget} steps, {_gib(part)} at the peak", flush=True)

    def head_flops(tokens: float) -> float:  # the LM head's forward and backward on `tokens` target tokens
        return 6 * bb.model.config.hidden_size * bb.model.config.vocab_size * tokens

    # each stage trains its own LoRA on the bare backbone, as its notebook does
    if "pretrain" in stages:
        pretraining = pretrain_settings(cfg)
        training("pretrain", _measured("pretrain", bb, lambda: time_pretrain(bb, pretraining, steps)),
                 pretraining.steps, lambda part: head_flops(part["tokens_per_step"]))
    if "retriever" in stages:
        retrieval = retriever_settings(cfg)
        training("retriever", _measured("retriever", bb, lambda: time_retriever(bb, retrieval, steps)),
                 retrieval.steps, lambda part: 0.0)
    if "generator" in stages:
        generation = generator_settings(cfg)
        training("generator", _measured("generator", bb, lambda: time_generator(bb, generation, steps)),
                 generation.steps, lambda part: head_flops(part["answer_tokens_per_step"]))
    if "fully_shared" in stages:
        retrieval, generation = retriever_settings(cfg), generator_settings(cfg)
        part = _measured("fully_shared", bb, lambda: time_fully_shared(bb, retrieval, generation, steps))
        if not part.get("out_of_memory"):  # both parts' tokens; the attention term is linear in the mean length,
            r, g = part["retrieval"], part["generation"]  # so the token-weighted mean gives both parts' FLOPs exactly
            total = r["tokens_per_step"] + g["tokens_per_step"]
            part.update(tokens_per_step=total,
                        mean_tokens=(r["tokens_per_step"] * r["mean_tokens"] + g["tokens_per_step"] * g["mean_tokens"])
                        / total)
        training("fully_shared", part, retrieval.steps,
                 lambda part: head_flops(part["generation"]["answer_tokens_per_step"]))
    if "encoding" not in stages:
        return figures
    part = _measured("encoding", bb, lambda: time_encoding(bb, n_docs, cfg["common"]["max_length"],
                                                             cfg["common"]["batch_size"]))
    figures["encoding"] = part
    if not part.get("out_of_memory"):
        part["tflops"] = body_flops_per_token(bb.model, part["mean_tokens"]) * part["tokens_per_s"] / 1e12
        part["share_of_matmul_limit"] = part["tflops"] / peak
        part["seconds_per_million_tokens"] = 1e6 / part["tokens_per_s"]
        print(f"encoding: {part['tokens_per_s']:,.0f} tokens/s at {cfg['common']['max_length']} tokens, "
              f"{part['tflops']:.0f} TFLOP/s ({part['share_of_matmul_limit']:.0%}), "
              f"{part['seconds_per_million_tokens']:.1f} s per million tokens, {_gib(part)} at the peak", flush=True)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bsharedrag.scalebench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=paths.CONFIGS / "paper.yaml")
    parser.add_argument("--shape", default="qwen2.5-7b", choices=sorted(SHAPES))
    parser.add_argument("--steps", type=int, default=3, help="timed steps of each training loop (after a warm-up)")
    parser.add_argument("--docs", type=int, default=512, help="texts encoded at the config's max_length")
    parser.add_argument("--device", help="cuda, cuda:1 or cpu (default: CUDA when present)")
    parser.add_argument("--compute-dtype", choices=["auto", "bfloat16", "float16", "float32"],
                        help="instead of the config's compute_dtype")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"comma-separated, of {', '.join(STAGES)} (default: all)")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.docs < 1:
        parser.error(f"--steps {args.steps} and --docs {args.docs} must be at least 1")
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    unknown = sorted(set(stages) - set(STAGES))
    if unknown or not stages:
        parser.error(f"--stages {args.stages!r}: name one or more of {', '.join(STAGES)}")
    figures = run(args.config, args.shape, args.steps, args.docs, args.device, args.compute_dtype, stages)
    if args.out:
        atomic_write_json(args.out, figures)
        print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
