"""What a run changes in the process, and restores when it ends: torch's random state, the CUDA
numerics flags that make one seed give one file, and the allocator's handling of freed memory."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .allocator import retained_memory

CUBLAS_WORKSPACE = "CUBLAS_WORKSPACE_CONFIG"


@contextmanager
def isolated_run(seed: int, device: torch.device) -> Iterator[None]:
    """The process state a run needs, for as long as it lasts."""
    with seeded(seed, device), exact_float32(device), retained_memory():
        yield


@contextmanager
def seeded(seed: int, device: torch.device):
    """torch's global random generators seeded with `seed` for the run, and restored afterwards."""
    cuda_devices = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        yield


@contextmanager
def exact_float32(device: torch.device):
    """On CUDA, while a run lasts: convolutions and matrix products in full float32, not TF32 (which
    torch's cuDNN convolutions use by default from Ampere on, rounding their inputs to 10-bit
    mantissas: far beyond the rounding noise that validation allows), and deterministic kernels, so
    that one seed gives one file. torch's settings and the environment are restored afterwards."""
    if device.type != "cuda":
        yield
        return
    workspace = os.environ.get(CUBLAS_WORKSPACE)
    os.environ.setdefault(CUBLAS_WORKSPACE, ":4096:8")  # cuBLAS's deterministic mode reads it
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (cudnn.allow_tf32, matmul.allow_tf32, cudnn.benchmark, torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled())
    cudnn.allow_tf32 = matmul.allow_tf32 = cudnn.benchmark = False
    # warn_only: the few ops without a deterministic CUDA backward (a reflect Pad) warn instead of failing
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        cudnn.allow_tf32, matmul.allow_tf32, cudnn.benchmark = saved[:3]
        torch.use_deterministic_algorithms(saved[3], warn_only=saved[4])
        if workspace is None:
            del os.environ[CUBLAS_WORKSPACE]
