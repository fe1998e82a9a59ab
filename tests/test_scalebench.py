"""The scale benchmark's plumbing on a tiny shape and the tiny config (its figures come from a GPU: README)."""

import json

import pytest

from bsharedrag import paths, scalebench


def test_scalebench_times_each_stage_against_the_matmul_limit(tmp_path):
    out = tmp_path / "figures.json"
    assert scalebench.main(["--config", str(paths.CONFIGS / "tiny.yaml"), "--shape", "tiny", "--steps", "1",
                            "--docs", "4", "--device", "cpu", "--compute-dtype", "float32",  # as the other tests:
                            "--out", str(out)]) == 0  # accelerate keeps the first mixed precision of a process
    figures = json.loads(out.read_text())
    assert figures["shape"] == "tiny" and figures["dtype"] == "float32" and figures["matmul_tflops"] > 0
    for stage in ("pretrain", "retriever", "generator", "fully_shared"):
        part = figures[stage]
        assert part["seconds_per_step"] > 0 and part["tokens_per_step"] > 0 and 0 < part["share_of_matmul_limit"] < 1
    assert figures["encoding"]["tokens_per_s"] > 0 and 0 < figures["encoding"]["share_of_matmul_limit"] < 1
    full = 4 * (64 + 3 * 128)  # tiny.yaml: 4 questions x (1 + 2) passages, each text as long as allowed
    assert 0.9 * full <= figures["retriever"]["tokens_per_step"] <= full
    assert figures["retriever"]["paper_steps"] == 6 and figures["generator"]["paper_steps"] == 3
    assert figures["pretrain"]["tokens_per_step"] == 4 * 32 and figures["pretrain"]["paper_steps"] == 4  # tiny.yaml
    shared = figures["fully_shared"]  # both parts' tokens, at the retriever's step budget
    assert shared["tokens_per_step"] == shared["retrieval"]["tokens_per_step"] + shared["generation"]["tokens_per_step"]
    assert shared["paper_steps"] == 6 and shared["lambda"] == 0.5


def test_scalebench_runs_only_the_stages_asked_for(tmp_path):
    out = tmp_path / "figures.json"
    assert scalebench.main(["--config", str(paths.CONFIGS / "tiny.yaml"), "--shape", "tiny", "--steps", "1",
                            "--device", "cpu", "--compute-dtype", "float32", "--stages", "pretrain",
                            "--out", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["pretrain"]["seconds_per_step"] > 0 and not {"retriever", "generator", "fully_shared", "encoding"} & set(figures)


def test_scalebench_refuses_an_unknown_shape_and_empty_work():
    with pytest.raises(ValueError, match="unknown shape 'gpt-5'"):
        scalebench.random_backbone("gpt-5", None, None)
    with pytest.raises(SystemExit):
        scalebench.main(["--steps", "0"])
    with pytest.raises(SystemExit):
        scalebench.main(["--stages", "retriever,rerank"])


def test_a_stage_that_runs_out_of_device_memory_is_named_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    import torch

    def too_big(bb, settings, steps):
        from peft import LoraConfig, get_peft_model

        bb.model = get_peft_model(bb.model, LoraConfig(r=2, target_modules=["q_proj"]))  # the stage had wrapped it
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(scalebench, "time_generator", too_big)
    out = tmp_path / "figures.json"
    assert scalebench.main(["--config", str(paths.CONFIGS / "tiny.yaml"), "--shape", "tiny", "--steps", "1",
                            "--docs", "4", "--device", "cpu", "--compute-dtype", "float32", "--out", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["generator"] == {"out_of_memory": True, "peak_memory_gb": None,
                                    "error": "CUDA out of memory. Tried to allocate 2.00 GiB"}
    assert figures["retriever"]["seconds_per_step"] > 0 and figures["encoding"]["tokens_per_s"] > 0
    assert "generator: out of device memory; lower 04_generator.micro_batch_size" in capsys.readouterr().out
