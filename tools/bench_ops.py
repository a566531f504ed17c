"""Costs of the elementwise torch operations that shaped the fused reconstruction nodes in
`onnxmodcap/quantizers.py` (one thread; mean of 300 calls after 5 warm-up calls):

    OMP_NUM_THREADS=1 python tools/bench_ops.py

Figures and their reading: BENCHMARKS.md, "Reconstruction iteration cost".
"""

import time

import torch

torch.set_num_threads(1)


def ms(action, calls=300):
    """Mean milliseconds per call of `action`."""
    for _ in range(5):
        action()
    started = time.perf_counter()
    for _ in range(calls):
        action()
    return (time.perf_counter() - started) / calls * 1e3


small = torch.randn(32, 16, 14, 14)  # 100k values
large = torch.randn(32, 32, 14, 14)  # 200k values
weight = torch.rand(64, 64, 3, 3)  # 37k values
print(f"compare {ms(lambda: small >= 0.1):.3f} ms, multiply {ms(lambda: small * small):.3f} ms (100k)")
print(f"rand_like {ms(lambda: torch.rand_like(large)):.3f} ms (200k)")
print(f"pow {ms(lambda: weight.pow(6.3)):.3f} ms, exp(log) {ms(lambda: torch.log(weight).mul_(6.3).exp_()):.3f} ms (37k)")
for fused in (False, True):
    weights = torch.nn.Parameter(torch.randn(128, 128, 3, 3))
    weights.grad = torch.randn_like(weights)
    optimizer = torch.optim.Adam([weights], lr=1e-3, fused=fused)
    print(f"Adam fused={fused} {ms(optimizer.step, 200):.3f} ms (147k)")
