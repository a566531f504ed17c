"""retained_memory leaves an allocator that the user tuned through the environment alone. Its effect,
freed activation memory reused without the kernel zero-filling it again, is measured by
tools/bench_reconstruct.py (kernel share and page faults per unit, docs/benchmarks/reconstruct.md): a
test on a few large tensors in a fresh process faulted or not depending on where the kernel placed
the heap, so it could not assert it reliably."""

import pytest

from onnxmodcap.allocator import glibc_malloc, retained_memory


@pytest.mark.parametrize("variable", ["MALLOC_ARENA_MAX", "GLIBC_TUNABLES", "LD_PRELOAD"])
def test_an_allocator_tuned_through_the_environment_is_left_alone(monkeypatch, variable):
    monkeypatch.setenv(variable, "1")
    assert glibc_malloc() is None
    with retained_memory():  # a no-op then
        pass
