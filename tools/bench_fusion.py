"""Which kernels ONNX Runtime runs for a QDQ model, and its CPU latency next to the float model.

    python tools/bench_fusion.py models/resnet18.onnx models/resnet18.w8a8.onnx --threads 1

Prints the op types of ORT's optimized graph of the quantized model (QLinearConv/QGemm are its
int8 kernels; a Conv or Gemm left means a layer runs in float) and the median latency of both
models at batch 1 and 32 (CPU provider, fixed threads, after warm-up).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort


def session(path: Path, threads: int, optimized: Path | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def median_ms(sess: ort.InferenceSession, batch: int, runs: int, warmup: int) -> float:
    arg = sess.get_inputs()[0]
    shape = [batch if not isinstance(d, int) else d for d in arg.shape]
    feed = {arg.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    for _ in range(warmup):
        sess.run(None, feed)
    timings = []
    for _ in range(runs):
        started = time.perf_counter()
        sess.run(None, feed)
        timings.append((time.perf_counter() - started) * 1000)
    return statistics.median(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("float_model", type=Path)
    parser.add_argument("quantized_model", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        optimized = Path(folder) / "optimized.onnx"
        quantized = session(args.quantized_model, args.threads, optimized)
        kernels = Counter(n.op_type for n in onnx.load(optimized).graph.node)
    print(f"{args.quantized_model.name}: ORT {ort.__version__} optimized graph: "
          + ", ".join(f"{op} {count}" for op, count in kernels.most_common()))
    reference = session(args.float_model, args.threads)
    for batch in (1, 32):
        float_ms = median_ms(reference, batch, args.runs, args.warmup)
        quant_ms = median_ms(quantized, batch, args.runs, args.warmup)
        print(f"batch {batch}: float {float_ms:.3f} ms, quantized {quant_ms:.3f} ms, "
              f"ratio {quant_ms / float_ms:.2f}")


if __name__ == "__main__":
    main()
