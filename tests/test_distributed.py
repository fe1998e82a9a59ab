"""The retriever's multi-process path: two CPU processes under `accelerate launch` equal one process on the same batch."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from accelerate import Accelerator

HERE = Path(__file__).parent


def test_two_processes_gather_each_others_negatives_and_match_one_process(tmp_path):
    out = tmp_path / "two.json"
    # `accelerate launch --cpu` starts one process unless MPI is set up; `--multi_gpu` starts two torchrun workers,
    # which Accelerator(cpu=True) joins over gloo on a machine without GPUs.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
           str(HERE / "distributed_retriever.py"), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**__import__("os").environ,
                                                                                "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads(out.read_text())
    assert two["processes"] == 2
    assert two["gathered_rows"] == 4 * 3  # 4 questions x (1 positive + 2 negatives), from both processes
    assert two["gathered_matches"]
    assert all(two["negatives_per_process"]) and set(two["negatives_per_process"][0]) != set(two["negatives_per_process"][1])

    sys.path.insert(0, str(HERE))
    import distributed_retriever as dr
    from bsharedrag.retriever import PooledEncoder, train_step

    bb, model, settings, batch, doc_text = dr.setup(1)
    loss = train_step(PooledEncoder(model, "last"), bb.tokenizer, batch, doc_text, settings, Accelerator(cpu=True))
    assert two["loss"] == pytest.approx(loss, rel=1e-4)
    one = dr.lora_grads(model)
    assert set(one) == set(two["grads"])
    for name in one:  # DDP's averaged gradient equals the one-process gradient of the global batch
        a, b = np.array(two["grads"][name]), np.array(one[name])
        assert np.linalg.norm(a - b) <= 1e-3 * max(np.linalg.norm(b), 1e-8), name
