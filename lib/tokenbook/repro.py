"""Seeding and determinism.

``seed_everything(seed)`` seeds Python, NumPy and torch (all devices); ``loader_generator(seed)`` and
``worker_init_fn`` make DataLoader shuffling and worker augmentation reproducible; ``set_deterministic(True)``
turns on ``torch.use_deterministic_algorithms`` and disables cuDNN autotuning. ``repro_settings()`` returns the
state for the results' metadata. The same seed gives identical tables on the same CPU machine (tested).
"""
from __future__ import annotations

import os
from pathlib import Path
import random
from typing import Any, Optional

import numpy as np
import torch

__all__ = ["seed_everything", "set_deterministic", "loader_generator", "worker_init_fn", "repro_settings", "cpu_model"]

_STATE: dict = {"seed": None, "deterministic": False}


def seed_everything(seed: int, rank: int = 0) -> int:
    """Seed python, numpy and torch (CPU and CUDA) with ``seed + rank``; return the seed used."""
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    s = seed + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)
    _STATE["seed"] = seed
    return s


def set_deterministic(enabled: bool = True, warn_only: bool = True) -> None:
    """Deterministic kernels (``torch.use_deterministic_algorithms``), cuDNN autotuning off.

    ``CUBLAS_WORKSPACE_CONFIG`` must be set before CUDA initialises (``run_all.sh`` exports it); it is set here
    too when CUDA is not initialised yet.
    """
    if enabled and not torch.cuda.is_initialized():
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
    torch.backends.cudnn.benchmark = not enabled
    torch.backends.cudnn.deterministic = enabled
    _STATE["deterministic"] = enabled


def loader_generator(seed: int) -> torch.Generator:
    """A seeded generator for ``DataLoader(generator=...)`` (controls shuffling and worker base seeds)."""
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def worker_init_fn(worker_id: int) -> None:
    """Seed python/numpy in a DataLoader worker from torch's per-worker seed."""
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def repro_settings() -> dict:
    """What the metadata records about determinism."""
    return {
        "seed": _STATE["seed"],
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "num_threads": torch.get_num_threads(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "PYTHONHASHSEED": os.environ.get("PYTHONHASHSEED"),
        "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }


def seed_from_env(default: int = 0) -> int:
    """``TOKENBOOK_SEED`` from the environment, else ``default``."""
    v: Optional[str] = os.environ.get("TOKENBOOK_SEED")
    return int(v) if v else default


def cpu_model() -> dict:
    """CPU model name and the SIMD instruction sets that decide float kernels (float results differ across CPUs)."""
    out: dict[str, Any] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, val = line.partition(":")
        key = key.strip()
        if key == "model name" and "cpu_model" not in out:
            out["cpu_model"] = val.strip()
        elif key in ("flags", "Features") and "cpu_isa" not in out:
            flags = set(val.split())
            wanted = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile",
                      "asimd", "sve", "bf16")
            out["cpu_isa"] = [f for f in wanted if f in flags]
    return out
