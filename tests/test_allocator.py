"""retained_memory: freed activation-sized blocks are reused without the kernel zero-filling them again,
and glibc's behaviour returns afterwards."""

import resource

import pytest
import torch

from onnxmodcap.allocator import glibc_malloc, retained_memory

PAGES = (64 << 20) // 4096  # one 64 MiB tensor, above glibc's largest mmap threshold (32 MiB)


def page_faults_of_a_64_mib_tensor() -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensor = torch.ones(64 << 18)  # written, so every page is touched
    del tensor
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(glibc_malloc() is None, reason="glibc's malloc only (Linux, not tuned through the environment)")
def test_freed_memory_is_reused_inside_and_handed_back_after():
    with retained_memory():
        page_faults_of_a_64_mib_tensor()  # the heap grows once
        assert page_faults_of_a_64_mib_tensor() < PAGES // 10
    assert page_faults_of_a_64_mib_tensor() > PAGES // 2  # mapped afresh, as glibc does by default


@pytest.mark.parametrize("variable", ["MALLOC_ARENA_MAX", "GLIBC_TUNABLES", "LD_PRELOAD"])
def test_an_allocator_tuned_through_the_environment_is_left_alone(monkeypatch, variable):
    monkeypatch.setenv(variable, "1")
    assert glibc_malloc() is None
