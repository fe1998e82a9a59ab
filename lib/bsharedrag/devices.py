"""Device and compute-dtype choice by measurement, and the machine's matmul limit that benchmarks compare against."""

from __future__ import annotations

import contextlib
import functools
import json
import platform
import time
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    """"bfloat16" for torch.bfloat16: the name configs, manifests and figures use (a key of DTYPES)."""
    return str(dtype).removeprefix("torch.")


def accelerator_for(dtype: torch.dtype, device: torch.device):
    """An accelerate Accelerator on `device` whose mixed precision is the compute dtype (fp32: none)."""
    from accelerate import Accelerator

    mixed = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")
    return Accelerator(mixed_precision=mixed, cpu=device.type == "cpu")


def pick_device(requested: str | None = None) -> torch.device:
    """CUDA when present, else CPU; `requested` ("cpu", "cuda:1") wins."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def measure_matmul_tflops(dtype: torch.dtype, device: str | torch.device = "cpu", n: int = 1024, seconds: float = 0.5) -> float:
    """Dense n x n matmul throughput in TFLOP/s for `dtype` on `device`, measured now."""
    device = torch.device(device)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    reps, start = 0, time.perf_counter()
    while True:
        a @ b
        reps += 1
        sync()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds or reps >= 1000:
            return 2 * n**3 * reps / elapsed / 1e12


def _cpu_key() -> str:
    """What the bf16-or-fp32 decision depends on: the processor, the torch build and the thread count."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model} | torch {torch.__version__} | {torch.get_num_threads()} threads"


MATMUL_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_fp16")


def machine_facts() -> dict[str, str]:
    """What tells two runs' machines apart: the CPU, its matmul instruction sets, and the boot (the same boot id is the
    same machine since it started; a seed reproduces exactly only on the same machine and backbone)."""
    facts = {"cpu": _cpu_key().split(" | ")[0]}
    with contextlib.suppress(OSError):
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
        present = [f for f in MATMUL_FLAGS if f in flags]
        facts["cpu matmul flags"] = " ".join(present) if present else "none of " + " ".join(MATMUL_FLAGS)
    with contextlib.suppress(OSError):
        facts["boot id"] = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return facts


def matmul_now(device: torch.device | None = None, seconds: float = 0.5) -> str:
    """This machine's matmul throughput at this moment, for a run's env.txt: on a shared host it moves (the same boot
    read bf16 0.39 and 1.53 TFLOP/s hours apart), and a run's timings only compare against what it could do then.
    512-square: a CPU without bf16 units takes ~0.3 s for one such bf16 matmul, seconds for a 1024-square one."""
    device = device or pick_device()
    dtypes = [torch.bfloat16, torch.float32] if device.type == "cpu" else [torch.bfloat16, torch.float16, torch.float32]
    figures = ", ".join(f"{dtype_name(d)} {measure_matmul_tflops(d, device, 512, seconds):.3f}"
                        for d in dtypes)
    return f"{figures} TFLOP/s on {device} (512x512, {torch.get_num_threads()} threads)"


DECISIONS = "compute_dtype.json"  # in paths.cache_dir(): one measured decision per processor, torch and threads


@functools.lru_cache(maxsize=None)
def _bf16_wins_on_cpu() -> bool:
    # Many CPUs (AVX2-only ones among them) run bf16 matmuls hundreds of times slower than fp32: ask the hardware,
    # once per machine. A short measurement repeated in every process flipped under load (a run's 04 in bf16, its
    # 05 in fp32), so the decision is measured carefully once and recorded; every later process reads it.
    from . import paths
    from .artefacts import atomic_write_json

    record_path = paths.cache_dir() / DECISIONS
    key = _cpu_key()
    try:
        decisions = json.loads(record_path.read_text())
        if not isinstance(decisions, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError):
        decisions = {}  # none yet, or unreadable: measure again and rewrite it
    known = decisions.get(key)
    if isinstance(known, dict) and isinstance(known.get("bf16_wins"), bool):
        return known["bf16_wins"]
    fp32 = bf16 = 0.0
    for _ in range(3):  # interleaved, best of three: a busy neighbour slows one round, not the best one
        fp32 = max(fp32, measure_matmul_tflops(torch.float32, "cpu", n=512, seconds=0.1))
        bf16 = max(bf16, measure_matmul_tflops(torch.bfloat16, "cpu", n=512, seconds=0.1))
    wins = bf16 > 1.2 * fp32
    decisions[key] = {"bf16_wins": wins, "fp32_tflops": round(fp32, 4), "bf16_tflops": round(bf16, 4)}
    with contextlib.suppress(OSError):  # a read-only cache still gets this process's decision
        atomic_write_json(record_path, decisions)
    return wins


def pick_compute_dtype(device: torch.device, requested: str = "auto") -> torch.dtype:
    """bf16 where the hardware runs it faster than fp32, else fp32; `requested` wins. On CPU the answer is measured once
    per processor, torch build and thread count, and recorded in the cache folder (compute_dtype.json)."""
    if requested != "auto":
        if requested not in DTYPES:
            raise ValueError(f"compute_dtype {requested!r} is unknown; use auto, {', '.join(DTYPES)}")
        return DTYPES[requested]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if _bf16_wins_on_cpu() else torch.float32


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for `dtype` below fp32; a no-op context in fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def main() -> None:
    """Print this machine's measured matmul limits (the figures benchmarks compare against)."""
    device = pick_device()
    threads = torch.get_num_threads()
    print(f"device {device}, torch threads {threads}")
    for name, dtype in DTYPES.items():
        if device.type == "cpu" and dtype == torch.float16:
            continue
        print(f"{name:>9}: {measure_matmul_tflops(dtype, device, n=1024, seconds=1.0):.4f} TFLOP/s (1024x1024 matmul)")
    print(f"compute_dtype auto -> {pick_compute_dtype(device, 'auto')}")


if __name__ == "__main__":
    main()
