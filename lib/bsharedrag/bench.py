"""Encoding benchmark: backbone + retrieval adapter throughput against the machine's measured matmul limits and
against sentence-transformers encoding the same model in the same run; query latency (encode + search); with a run
whose 02 is done, the retriever's training step with its texts in length buckets against one padded pass, and
without peft's LoRA input casts against with them, paired (with --compile also torch.compile'd against eager).

    python -m bsharedrag.bench [--run outputs/RUN_ID] [--docs 512] [--queries 50] [--train-steps 6] [--compile]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from . import paths
from .artefacts import atomic_write_json
from .backbone import body_of, embed, load_backbone, prepare_default_backbone, tokenize_for_embedding
from .config import load_config
from .data import load_dataset
from .devices import accelerator_for, dtype_name, measure_matmul_tflops, pick_compute_dtype, pick_device
from .index import build_dense_index, load_dense_index, search_dense
from . import retriever
from .retriever import RetrieverSettings, add_retrieval_adapter, attach_retrieval_adapter, save_retrieval_adapter
from .pretrain import backbone_for_run
from .steps import versions


def body_flops_per_token(model: torch.nn.Module, mean_tokens: float) -> float:
    """2 x the body's matmul weights, plus attention scores and mixing (4 x layers x attention width x context)."""
    config = model.config.get_text_config()
    weights = sum(p.numel() for n, p in model.get_decoder().named_parameters()
                  if p.dim() == 2 and "embed" not in n and "lora_" not in n)
    width = config.num_attention_heads * getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
    return 2 * weights + 4 * config.num_hidden_layers * width * mean_tokens / 2  # causal: half the context on average


def _sentence_transformer(folder: Path, adapter: Path, max_length: int, pooling: str, dtype: torch.dtype):
    from sentence_transformers import SentenceTransformer, models

    body = models.Transformer(str(folder), max_seq_length=max_length, model_args={"dtype": dtype})
    mode = {"last": "lasttoken", "mean": "mean"}[pooling]
    st = SentenceTransformer(modules=[body, models.Pooling(body.get_embedding_dimension(), pooling_mode=mode),
                                      models.Normalize()], device="cpu")
    st.load_adapter(str(adapter))
    return st


def _time_sentence_transformer(st, texts: list[str], max_length: int, batch_size: int) -> tuple[float, int]:
    st.encode(texts[:batch_size], batch_size=batch_size)  # warm-up
    start = time.perf_counter()
    st.encode(texts, batch_size=batch_size, convert_to_numpy=True)
    seconds = time.perf_counter() - start
    return seconds, sum(min(len(x), max_length) for x in st.tokenizer(texts)["input_ids"])


def run_benchmark(run_dir: Path | None, n_docs: int, n_queries: int, max_length: int = 128, batch_size: int = 32,
                  seed: int = 0, compiled: bool = False) -> dict:
    figures: dict = {"versions": versions(), "torch_threads": torch.get_num_threads()}
    common = load_config(Path(run_dir) / "resolved.yaml")["common"] if run_dir else {}
    compute = pick_compute_dtype(pick_device("cpu"), common.get("compute_dtype", "auto"))
    # The limit is the best of a few square sizes, the same sizes for both dtypes. Where bf16 is not the compute
    # dtype it can run hundreds of times slower than fp32 (AVX2-only CPUs): its limit is still measured, on small sizes.
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        sizes = (512, 1024, 2048) if dtype in (compute, torch.float32) else (256, 512)
        figures[f"{name}_tflops"] = max(measure_matmul_tflops(dtype, "cpu", n=n, seconds=1.0) for n in sizes)

    ds = load_dataset("epqa", seed, query_context=common.get("query_context", True))
    passages = [p for p in ds.passages()]
    rng = np.random.default_rng(seed)
    texts = [passages[i] for i in rng.choice(len(passages), n_docs, replace=False)]
    source = str(prepare_default_backbone())
    if run_dir:  # the backbone the run's adapter was trained on (01's, where the run continually pre-trained)
        source = backbone_for_run(str(source), run_dir, common["use_pretrained_backbone"])
    bb = load_backbone(source, compute_dtype=dtype_name(compute))
    adapter = run_dir / "03_retriever" / "adapters" / "hard" if run_dir else None
    if adapter is not None and adapter.is_dir():
        settings = attach_retrieval_adapter(bb, adapter)
    else:  # no trained adapter at hand: a fresh one costs the same to run
        settings = RetrieverSettings()
        add_retrieval_adapter(bb, settings)
        adapter = paths.cache_dir() / "bench-adapter"
        save_retrieval_adapter(bb, settings, adapter)
    pooling = settings.pooling
    texts = [settings.passage_prefix + t for t in texts]  # as the adapter was trained; every encoder below gets these
    figures.update({"adapter": str(adapter), "pooling": pooling})
    figures["compute_dtype"] = str(bb.dtype)
    tokens = sum(len(r) for r in tokenize_for_embedding(bb.tokenizer, texts, max_length, warn=False))
    flops = body_flops_per_token(bb.model, tokens / n_docs)
    embed(bb, texts[:batch_size], (pooling,), max_length=max_length, batch_size=batch_size)  # warm-up
    start = time.perf_counter()
    ours = embed(bb, texts, (pooling,), max_length=max_length, batch_size=batch_size, desc="bench")[pooling]
    seconds = time.perf_counter() - start
    figures.update({"docs": n_docs, "tokens": tokens, "gflops_per_token": flops / 1e9, "ours_seconds": seconds,
                    "ours_tokens_per_s": tokens / seconds, "ours_tflops": tokens / seconds * flops / 1e12})
    figures["ours_share_of_fp32_limit"] = figures["ours_tflops"] / figures["fp32_tflops"]
    figures["ours_share_of_bf16_limit"] = figures["ours_tflops"] / figures["bf16_tflops"]
    compute_name = "bf16" if bb.dtype == torch.bfloat16 else "fp32"
    figures["ours_share_of_compute_limit"] = figures["ours_tflops"] / figures[f"{compute_name}_tflops"]
    # The same texts through the body with the adapter disabled: what the unmerged LoRA (kept so that one backbone
    # serves every adapter) costs on top of the backbone.
    with bb.model.disable_adapter():
        start = time.perf_counter()
        embed(bb, texts, (pooling,), max_length=max_length, batch_size=batch_size, desc="bench, adapter disabled")
        figures["body_alone_seconds"] = time.perf_counter() - start
    figures["adapter_share_of_time"] = 1 - figures["body_alone_seconds"] / seconds

    # sentence-transformers runs the same model and adapter with its weights in fp32 (its default) and, where it is
    # the compute dtype, in bf16 (elsewhere bf16 would only time the hardware's slow path).
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))[:2 if compute_name == "bf16" else 1]:
        st = _sentence_transformer(Path(source), adapter, max_length, pooling, dtype)
        st_seconds, st_tokens = _time_sentence_transformer(st, texts, max_length, batch_size)
        figures.update({f"st_{name}_seconds": st_seconds, f"st_{name}_tokens_per_s": st_tokens / st_seconds,
                        f"ours_over_st_{name}_speed": (tokens / seconds) / (st_tokens / st_seconds)})
        del st

    build_dense_index(ours, [f"d{i}" for i in range(n_docs)], {"encoder": "bench"}, paths.cache_dir() / "bench-index")
    index, doc_of, _ = load_dense_index(paths.cache_dir() / "bench-index")
    latencies = []
    for q in list(ds.split("test")["text"])[:n_queries]:
        start = time.perf_counter()
        search_dense(index, doc_of, embed(bb, [settings.query_prefix + q], (pooling,), max_length=max_length,
                                          desc="query")[pooling], 10)
        latencies.append(time.perf_counter() - start)
    figures.update({"query_latency_p50_ms": 1000 * float(np.percentile(latencies, 50)),
                    "query_latency_p95_ms": 1000 * float(np.percentile(latencies, 95)), "queries": len(latencies)})
    if compiled:  # last, as nn.Module.compile changes the body in place for everything after it
        body = body_of(bb.model)
        body.compile(dynamic=True)
        start = time.perf_counter()
        embed(bb, texts[:2 * batch_size], (pooling,), max_length=max_length, batch_size=batch_size, desc="compile")
        figures["compile_seconds"] = time.perf_counter() - start
        start = time.perf_counter()
        fused = embed(bb, texts, (pooling,), max_length=max_length, batch_size=batch_size, desc="bench, compiled")[pooling]
        figures["compiled_seconds"] = time.perf_counter() - start
        figures["compiled_tokens_per_s"] = tokens / figures["compiled_seconds"]
        figures["compiled_share_of_compute_limit"] = figures["compiled_tokens_per_s"] * flops / 1e12 / \
            figures[f"{compute_name}_tflops"]
        figures["compiled_min_cosine_to_eager"] = float((fused * ours).sum(axis=1).min())
    return figures


def time_train_steps(run_dir: Path, steps: int, compiled: bool = False) -> dict:
    """Seconds of the retriever's training step (forward + backward, the run's 03 settings, its mined `hard` groups),
    three ways on the same batches in rotating order: as 03 trains (texts in `retriever.LENGTH_BUCKETS` length
    buckets, peft's LoRA input casts off under autocast), in one padded pass, and with peft's input casts on. The
    medians of the per-step ratios are the figures (the machine drifts less within a step); the casts must leave the
    loss unchanged to the last bit. `compiled` adds a fourth arm, 03's step through torch.compile (the same weights),
    after two steps of compiling that are timed apart: what compiling costs against what it saves a step."""
    from peft.helpers import disable_input_dtype_casting

    from .data import load_sets

    cfg = load_config(Path(run_dir) / "resolved.yaml")
    common, settings = cfg["common"], retriever.settings_from_config(cfg)
    groups, doc_text = retriever.training_data(load_sets(common), Path(run_dir) / "02_mine_negatives", "hard",
                                               common["passage_format"])
    bb = load_backbone(backbone_for_run(common["backbone"], run_dir, common["use_pretrained_backbone"]),
                       compute_dtype=common["compute_dtype"], seed=common["seed"])
    model = add_retrieval_adapter(bb, settings)
    model.train()
    accelerator = accelerator_for(bb.dtype, bb.device)
    encoder = accelerator.prepare(retriever.PooledEncoder(model, settings.pooling))
    arms = {"bucketed": (encoder, retriever.LENGTH_BUCKETS, False), "one_pass": (encoder, 1, False),
            "peft_casts": (encoder, retriever.LENGTH_BUCKETS, True)}
    figures: dict = {}
    if compiled:  # a wrapper: the eager arms keep running the same module uncompiled
        arms["compiled"] = (torch.compile(encoder, dynamic=True), retriever.LENGTH_BUCKETS, False)
        start = time.perf_counter()
        with disable_input_dtype_casting(model):
            for warm in range(2):  # batches the timed steps do not use; the second catches a recompilation
                batch = retriever.global_batch(groups, steps + warm, settings.batch_size, settings.n_negatives,
                                               settings.seed)
                retriever.train_step(arms["compiled"][0], bb.tokenizer, batch, doc_text, settings, accelerator)
                model.zero_grad(set_to_none=True)
        figures["train_compile_seconds"] = time.perf_counter() - start
    seconds: dict[str, list[float]] = {name: [] for name in arms}
    losses: dict[str, list[float]] = {name: [] for name in arms}
    for step in range(steps):
        batch = retriever.global_batch(groups, step, settings.batch_size, settings.n_negatives, settings.seed)
        names = list(arms)
        for name in names[step % len(names):] + names[:step % len(names)]:
            module, buckets, casts = arms[name]
            with disable_input_dtype_casting(model, active=not casts):
                start = time.perf_counter()
                losses[name].append(retriever.train_step(module, bb.tokenizer, batch, doc_text, settings,
                                                         accelerator, buckets=buckets))
                seconds[name].append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
    s = {name: np.array(v) for name, v in seconds.items()}
    figures.update({"train_steps": steps, "train_buckets": retriever.LENGTH_BUCKETS,
                    "train_step_one_pass_s": float(np.median(s["one_pass"])),
                    "train_step_bucketed_s": float(np.median(s["bucketed"])),
                    "train_step_bucketed_over_one_pass": float(np.median(s["bucketed"] / s["one_pass"])),
                    "train_step_peft_casts_s": float(np.median(s["peft_casts"])),
                    "train_step_without_over_with_peft_casts": float(np.median(s["bucketed"] / s["peft_casts"])),
                    "train_step_peft_casts_same_loss": losses["bucketed"] == losses["peft_casts"]})
    if compiled:
        figures.update({"train_step_compiled_s": float(np.median(s["compiled"])),
                        "train_step_compiled_over_eager": float(np.median(s["compiled"] / s["bucketed"])),
                        "train_step_compiled_max_loss_difference":
                            float(np.max(np.abs(np.array(losses["compiled"]) - np.array(losses["bucketed"]))))})
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bsharedrag.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, help="a run folder whose 03_retriever/adapters/hard to benchmark")
    parser.add_argument("--docs", type=int, default=512)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--train-steps", type=int, default=6, help="paired retriever training steps (needs --run); 0 skips")
    parser.add_argument("--compile", action="store_true",
                        help="also time the encoding and (with --run) the training step torch.compile'd")
    args = parser.parse_args(argv)
    figures = run_benchmark(args.run, args.docs, args.queries, compiled=args.compile)
    if args.run and args.train_steps:
        figures.update(time_train_steps(args.run, args.train_steps, compiled=args.compile))
    out = paths.OUTPUTS / "bench" / f"{time.strftime('%Y%m%d-%H%M%S')}.json"
    atomic_write_json(out, figures)
    print(f"matmul limit (measured now): fp32 {figures['fp32_tflops']:.3f} TFLOP/s, bf16 {figures['bf16_tflops']:.4f} TFLOP/s")
    print(f"backbone body: {figures['gflops_per_token']:.3f} GFLOP/token; compute dtype {figures['compute_dtype']}")
    print(f"ours (embed, {figures['docs']} ePQA passages, {figures['tokens']} tokens): "
          f"{figures['ours_tokens_per_s']:.0f} tokens/s = {figures['ours_tflops']:.3f} TFLOP/s = "
          f"{100 * figures['ours_share_of_fp32_limit']:.0f}% of the fp32 limit, "
          f"{100 * figures['ours_share_of_bf16_limit']:.0f}% of the bf16 limit "
          f"({100 * figures['ours_share_of_compute_limit']:.0f}% of the compute dtype's)")
    print(f"the same texts with the adapter disabled: {figures['tokens'] / figures['body_alone_seconds']:.0f} tokens/s; the unmerged "
          f"adapter is {100 * figures['adapter_share_of_time']:.0f}% of the encoding time")
    for name in [n for n in ("fp32", "bf16") if f"st_{n}_tokens_per_s" in figures]:
        print(f"sentence-transformers, same model + adapter, {name} weights: {figures[f'st_{name}_tokens_per_s']:.0f} "
              f"tokens/s; ours / theirs = {figures[f'ours_over_st_{name}_speed']:.2f}x")
    print(f"query latency (encode + exact search over {figures['docs']} docs): "
          f"p50 {figures['query_latency_p50_ms']:.0f} ms, p95 {figures['query_latency_p95_ms']:.0f} ms")
    if "compiled_seconds" in figures:
        print(f"the same, body torch.compile'd: {figures['compiled_tokens_per_s']:.0f} tokens/s = "
              f"{100 * figures['compiled_share_of_compute_limit']:.0f}% of the compute dtype's limit, after "
              f"{figures['compile_seconds']:.0f} s compiling; lowest cosine to the eager embeddings "
              f"{figures['compiled_min_cosine_to_eager']:.5f}")
    if "train_step_bucketed_s" in figures:
        print(f"retriever training step ({figures['train_steps']} paired, the run's 03 settings): one padded pass "
              f"{figures['train_step_one_pass_s']:.2f} s, {figures['train_buckets']} length buckets "
              f"{figures['train_step_bucketed_s']:.2f} s; bucketed / one pass = "
              f"{figures['train_step_bucketed_over_one_pass']:.2f} (median of the pairs)")
        print(f"the same bucketed step with peft's LoRA input casts on: {figures['train_step_peft_casts_s']:.2f} s; "
              f"without / with = {figures['train_step_without_over_with_peft_casts']:.2f} (median of the pairs), "
              f"losses {'identical' if figures['train_step_peft_casts_same_loss'] else 'DIFFERENT'}")
    if "train_step_compiled_s" in figures:
        saved = figures["train_step_bucketed_s"] - figures["train_step_compiled_s"]
        print(f"the same bucketed step torch.compile'd: {figures['train_step_compiled_s']:.2f} s; compiled / eager = "
              f"{figures['train_step_compiled_over_eager']:.2f} (median of the pairs), after "
              f"{figures['train_compile_seconds']:.0f} s compiling"
              + (f", repaid after ~{figures['train_compile_seconds'] / saved:.0f} steps" if saved > 0 else "")
              + f"; losses differ by at most {figures['train_step_compiled_max_loss_difference']:.1e}")
    print(f"figures written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
