"""Run by test_distributed.py under `accelerate launch --cpu --num_processes 2`: one retriever step on a tiny model."""

import json
import sys

import torch
from accelerate import Accelerator

from bsharedrag.backbone import load_backbone, pad_rows, tokenize_for_embedding
from bsharedrag.data import load_dataset
from bsharedrag.mining import random_negatives
from bsharedrag.retriever import (PooledEncoder, RetrieverSettings, add_retrieval_adapter, gather_keep_grad,
                                  global_batch, train_step)

GLOBAL_BATCH = 4


def setup(n_processes: int):
    ds = load_dataset("epqa", seed=0, max_questions=30)
    groups = random_negatives(ds, ds.queries, 2, seed=0)
    doc_text = dict(zip(ds.corpus["doc_id"], ds.passages()))
    bb = load_backbone("tiny-random-gemma3", compute_dtype="float32", device="cpu")
    settings = RetrieverSettings(lora_r=4, batch_size=GLOBAL_BATCH // n_processes, n_negatives=2,
                                 passage_max_length=48, query_max_length=32)
    model = add_retrieval_adapter(bb, settings)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return bb, model, settings, global_batch(groups, 0, GLOBAL_BATCH, 2, 0), doc_text


def lora_grads(model) -> dict:
    return {n: p.grad.flatten()[:64].tolist() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def main(out_path: str) -> None:
    acc = Accelerator(cpu=True)
    bb, model, settings, batch, doc_text = setup(acc.num_processes)
    encoder = acc.prepare(PooledEncoder(model, "last"))
    per = settings.batch_size
    mine = batch[acc.process_index * per:(acc.process_index + 1) * per]
    # The gathered passages must be every process's passages, in process order.
    def encode(docs):
        rows = tokenize_for_embedding(bb.tokenizer, [doc_text[d] for d in docs], settings.passage_max_length)
        ids, mask = pad_rows(bb.tokenizer, rows)
        return encoder(ids, mask)
    with torch.no_grad():
        own = encode([d for _, docs in mine for d in docs])
        gathered = gather_keep_grad(own, acc)
        everyone = torch.cat([encode([d for _, docs in batch[r * per:(r + 1) * per] for d in docs])
                              for r in range(acc.num_processes)])
    loss = train_step(encoder, bb.tokenizer, mine, doc_text, settings, acc)
    if acc.is_main_process:
        json.dump({"processes": acc.num_processes, "gathered_rows": gathered.shape[0],
                   "gathered_matches": bool(torch.allclose(gathered, everyone, atol=1e-5)),
                   "negatives_per_process": [[d for _, docs in batch[r * per:(r + 1) * per] for d in docs[1:]]
                                             for r in range(acc.num_processes)],
                   "loss": loss, "grads": lora_grads(model)}, open(out_path, "w"))


if __name__ == "__main__":
    main(sys.argv[1])
