"""RTN baselines: float vs ONNX Runtime's quantize_static vs `onnxmodcap quantize` (RTN), accuracy,
quantization time, ONNX Runtime CPU latency and the int8 kernels ONNX Runtime fuses.

For every model:
- float top-1 on the test set;
- ONNX Runtime `quantize_static` (after its recommended `quant_pre_process`): QDQ format, per-channel
  symmetric weights, asymmetric QUInt8 activations (ORT's advice for x86 CPUs), MinMax and Percentile
  calibration, at W8A8, W4A8 (QInt4 weights) and W4A4 (QUInt4 activations); in the 4-bit variants the
  first and last weighted layers keep 8-bit weights (and activations), as `onnxmodcap quantize` does;
  a variant that ORT rejects is recorded as unsupported with its first error line;
- this package's RTN path at W8A8, W4A8, W4A4 (`target="ort"`, `format="qdq"`);
- latency (median of interleaved timed runs after warm-up) of the float, ORT W8A8 (MinMax) and our
  W8A8 model in ORT CPU with a fixed intra-op thread count, batch 1 and 32;
- the op types in ORT's optimized graph (SessionOptions.optimized_model_filepath) of those three
  models, and for our W8A8 model which weighted layers did not become int8 kernels and why.

The results replace the section "RTN baselines (issue 4)" of the markdown file (--out).

    OMP_NUM_THREADS=1 python tools/bench_rtn.py
    python tools/bench_rtn.py --models models/resnet18.onnx --limit 2000 --out /tmp/bench.md
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import platform
import re
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

import onnxmodcap
from onnxmodcap.datasets import Skipped, open_images, prepared_batches
from onnxmodcap.errors import first_line
from onnxmodcap.evaluate import evaluate
from onnxmodcap.preprocess import preprocessing_for_onnx

from benchgrid import cpu_model

REPO = Path(__file__).resolve().parent.parent
SECTION = "## RTN baselines (issue 4)"
DEFAULT_MODELS = ("models/resnet18.onnx", "models/mobilenetv2_x0_5.onnx", "models/regnetx*.onnx")
WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# ops that ORT's QDQ propagation lets a QuantizeLinear move across (Relu/Clip are fused into the Q)
Q_PASSTHROUGH = ("Relu", "Clip", "MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze")
INT8_KERNELS = ("QLinearConv", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat", "ConvInteger", "MatMulInteger",
                "DynamicQuantizeMatMul")
CALIB_BATCH = 64


@dataclass(frozen=True)
class OrtVariant:
    label: str
    method: str  # MinMax | Percentile
    wbits: int
    abits: int


ORT_VARIANTS = (
    OrtVariant("ORT MinMax", "MinMax", 8, 8),
    OrtVariant("ORT Percentile", "Percentile", 8, 8),
    OrtVariant("ORT MinMax", "MinMax", 4, 8),
    OrtVariant("ORT Percentile", "Percentile", 4, 8),
    OrtVariant("ORT MinMax", "MinMax", 4, 4),
)
RTN_BITS = ((8, 8), (4, 8), (4, 4))


@dataclass
class Row:
    method: str
    wbits: int | None
    abits: int | None
    top1: float | None = None
    agreement: float | None = None
    seconds: float | None = None
    note: str = ""
    failure: str = ""  # why there is no top-1: unsupported by ORT, or a failure of ours
    path: str | None = None


@dataclass
class ModelResult:
    model: str
    rows: list[Row] = field(default_factory=list)
    latency: dict = field(default_factory=dict)  # label -> {batch: {median_ms, p10_ms, p90_ms, runs}}
    kernels: dict = field(default_factory=dict)  # label -> Counter of op types in the optimized graph
    unfused: list = field(default_factory=list)  # (node, op, reason) of our W8A8 model
    weighted: int = 0
    other_cores: float | None = None  # other processes' CPU use during the latency runs, in cores
    calib_images: int = 0
    images: int = 0


# ---------------------------------------------------------------- CPU use of other processes


class CpuMeter:
    """Busy CPU time of the whole machine minus this process's own, over wall time: how many cores
    other processes kept busy meanwhile (Linux /proc/stat; None elsewhere)."""

    def __init__(self):
        self.start = self.sample()

    @staticmethod
    def sample():
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError, IndexError):
            return None
        busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # minus idle, iowait
        own = sum(getattr(resource.getrusage(who), attr) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                  for attr in ("ru_utime", "ru_stime"))
        return busy / os.sysconf("SC_CLK_TCK"), own, time.monotonic()

    def other_cores(self) -> float | None:
        end = self.sample()
        if self.start is None or end is None or end[2] <= self.start[2]:
            return None
        return max(0.0, ((end[0] - self.start[0]) - (end[1] - self.start[1])) / (end[2] - self.start[2]))


# ---------------------------------------------------------------- ONNX Runtime quantize_static


class Reader(CalibrationDataReader):
    def __init__(self, input_name: str, batches: list[np.ndarray]):
        self.input_name, self.batches = input_name, batches
        self.rewind()

    def get_next(self):
        batch = next(self.iterator, None)
        return None if batch is None else {self.input_name: batch}

    def rewind(self):
        self.iterator = iter(self.batches)


def calibration_batches(model_path: Path, calib: Path, num_calib: int) -> list[np.ndarray]:
    """The calibration images that `onnxmodcap quantize` reads (the first `num_calib` of the set spread
    evenly), through the model's own preprocessing."""
    preprocessing = preprocessing_for_onnx(onnx.load(str(model_path), load_external_data=False), {})
    images = open_images(calib).spread(num_calib)
    skipped = Skipped()
    batches = [batch.inputs for batch in prepared_batches(images, preprocessing, CALIB_BATCH, skipped)]
    if skipped.entries:
        print(f"  calibration: {len(skipped)} images skipped (first: {skipped.entries[0]})", file=sys.stderr)
    return batches


def weighted_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [node for node in model.graph.node if node.op_type in WEIGHTED]


def ends_overrides(model: onnx.ModelProto, variant: OrtVariant) -> dict:
    """TensorQuantOverrides that keep the first and last weighted layers at 8 bits."""
    overrides = {}
    constants = {tensor.name for tensor in model.graph.initializer}
    nodes = weighted_nodes(model)
    for node in {id(n): n for n in (nodes[0], nodes[-1])}.values():
        weight = next((name for name in node.input[1:2] if name in constants), None)
        if variant.wbits < 8 and weight:
            overrides[weight] = [{"quant_type": QuantType.QInt8}]
        if variant.abits < 8 and node.input[0] not in constants:
            overrides[node.input[0]] = [{"quant_type": QuantType.QUInt8}]
    return overrides


def ort_quantize(prepared: Path, batches: list[np.ndarray], variant: OrtVariant, output: Path) -> None:
    model = onnx.load(str(prepared))
    overrides = ends_overrides(model, variant)
    with contextlib.redirect_stdout(sys.stderr):  # the histogram calibrators print their progress
        quantize_static(
            str(prepared), str(output), Reader(model.graph.input[0].name, batches),
            quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=False,
            activation_type=QuantType.QUInt8 if variant.abits == 8 else QuantType.QUInt4,
            weight_type=QuantType.QInt8 if variant.wbits == 8 else QuantType.QInt4,
            calibrate_method=getattr(CalibrationMethod, variant.method),
            extra_options={"TensorQuantOverrides": overrides} if overrides else None,
        )


# ---------------------------------------------------------------- latency and fused kernels


def cpu_session(path: Path, threads: int, optimized: Path | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_inputs(model_path: Path, data: Path, count: int) -> np.ndarray:
    preprocessing = preprocessing_for_onnx(onnx.load(str(model_path), load_external_data=False), {})
    images = open_images(data)
    images = type(images)(images.path, images.samples[:count], images.classes, images.pixels)
    return np.concatenate([b.inputs for b in prepared_batches(images, preprocessing, count, Skipped())])


def latency(models: dict[str, Path], inputs: np.ndarray, threads: int, batches: tuple[int, ...], runs: int,
            warmup: int) -> dict:
    """Median time per run; the models take turns run by run so that background load hits all alike."""
    sessions = {label: cpu_session(path, threads) for label, path in models.items()}
    results = {label: {} for label in models}
    for batch in batches:
        feed = np.ascontiguousarray(inputs[:batch])
        feeds = {label: {s.get_inputs()[0].name: feed} for label, s in sessions.items()}
        for label, session in sessions.items():
            for _ in range(warmup):
                session.run(None, feeds[label])
        times = {label: [] for label in models}
        for _ in range(runs):
            for label, session in sessions.items():
                start = time.perf_counter()
                session.run(None, feeds[label])
                times[label].append(time.perf_counter() - start)
        for label, values in times.items():
            ms = np.asarray(values) * 1e3
            results[label][batch] = {"median_ms": float(np.median(ms)), "p10_ms": float(np.percentile(ms, 10)),
                                     "p90_ms": float(np.percentile(ms, 90)), "runs": runs}
    return results


def optimized_ops(path: Path, workdir: Path, threads: int) -> tuple[Counter, onnx.ModelProto]:
    target = workdir / f"{path.stem}.ort_optimized.onnx"
    cpu_session(path, threads, target)
    optimized = onnx.load(str(target))
    return Counter(node.op_type for node in optimized.graph.node), optimized


def unfused_layers(qdq_path: Path, optimized: onnx.ModelProto) -> tuple[int, list[tuple[str, str, str]]]:
    """Weighted layers of the QDQ model that ORT did not turn into an int8 kernel, with the Q/DQ
    pattern around them that explains it."""
    model = onnx.load(str(qdq_path))
    fused = {re.sub(r"_token_\d+$", "", node.name) for node in optimized.graph.node if node.op_type in INT8_KERNELS}
    producers = {out: node for node in model.graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {value.name for value in model.graph.output}
    nodes = weighted_nodes(model)
    unfused = []
    for node in nodes:
        if node.name in fused:
            continue
        reason = blocker(node, producers, consumers, outputs)
        if reason.startswith("float bias on Gemm"):
            reason += {True: "; with that bias as int32 behind a DequantizeLinear ORT forms QGemm (checked)",
                       False: "; an int32 DequantizeLinear bias does not make ORT fuse it either (checked)",
                       None: ""}[gemm_fuses_with_int32_bias(model, node, producers)]
        unfused.append((node.name, node.op_type, reason))
    return len(nodes), unfused


def gemm_fuses_with_int32_bias(model: onnx.ModelProto, node: onnx.NodeProto, producers) -> bool | None:
    """Whether ORT turns the Gemm into QGemm once its float bias is written as int32 (on the grid of
    input scale x weight scale) behind a DequantizeLinear; None where the scales are not constants."""
    constants = {tensor.name: tensor for tensor in model.graph.initializer}
    try:
        x_scale = onnx.numpy_helper.to_array(constants[producers[node.input[0]].input[1]]).astype(np.float32)
        w_scale = onnx.numpy_helper.to_array(constants[producers[node.input[1]].input[1]]).astype(np.float32)
        bias = onnx.numpy_helper.to_array(constants[node.input[2]]).astype(np.float32)
    except KeyError:
        return None
    scale = np.broadcast_to(x_scale * w_scale, bias.shape).astype(np.float32)
    if np.any(scale == 0):
        return None
    trial = onnx.ModelProto.FromString(model.SerializeToString())
    name = f"{node.input[2]}_bench_int32"
    trial.graph.initializer.extend([
        onnx.numpy_helper.from_array(np.round(bias / scale).astype(np.int32), f"{name}_quantized"),
        onnx.numpy_helper.from_array(scale, f"{name}_scale"),
        onnx.numpy_helper.from_array(np.zeros(bias.shape, np.int32), f"{name}_zero_point")])
    trial.graph.node.insert(0, onnx.helper.make_node(
        "DequantizeLinear", [f"{name}_quantized", f"{name}_scale", f"{name}_zero_point"], [name], axis=0))
    target = next(n for n in trial.graph.node if n.name == node.name)
    target.input[2] = name
    with tempfile.TemporaryDirectory() as folder:
        source, optimized = Path(folder) / "trial.onnx", Path(folder) / "trial.opt.onnx"
        onnx.save(trial, str(source))
        try:
            cpu_session(source, 1, optimized)
        except Exception:  # ORT rejecting the trial graph: no conclusion
            return None
        return any(n.op_type in INT8_KERNELS and re.sub(r"_token_\d+$", "", n.name) == node.name
                   for n in onnx.load(str(optimized)).graph.node)


def blocker(node, producers, consumers, outputs) -> str:
    def dq(name):
        return name in producers and producers[name].op_type == "DequantizeLinear"

    if not dq(node.input[0]):
        return "activation input not quantized (no DequantizeLinear)"
    if len(node.input) > 1 and not dq(node.input[1]):
        return "weight not behind DequantizeLinear"
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] and not dq(node.input[2]):
        return "float bias on Gemm (no int32 DequantizeLinear bias)"
    if node.op_type in ("Gemm", "MatMul"):
        return "unknown: pattern DQ -> Gemm/MatMul looks fusable"
    tensor, path = node.output[0], []
    while True:
        if tensor in outputs:
            return "output is a graph output, not quantized" + (f" (after {' -> '.join(path)})" if path else "")
        users = consumers.get(tensor, [])
        if len(users) != 1:
            kinds = ", ".join(sorted(u.op_type for u in users))
            return f"output{' after ' + ' -> '.join(path) if path else ''} has {len(users)} consumers ({kinds})"
        user = users[0]
        if user.op_type == "QuantizeLinear":
            return "unknown: pattern DQ -> op -> Q looks fusable"
        if user.op_type not in Q_PASSTHROUGH:
            via = f" via {' -> '.join(path)}" if path else ""
            return f"output goes to a float {user.op_type}{via} (no QuantizeLinear on the output)"
        path.append(user.op_type)
        tensor = user.output[0]


# ---------------------------------------------------------------- one model


def bench_model(model_path: Path, args, workdir: Path) -> ModelResult:
    stem = model_path.stem
    result = ModelResult(str(model_path))
    data, limit = str(args.data), args.limit

    def score(row: Row, path: Path) -> None:
        try:
            evaluation = evaluate(str(path), data, reference_path=str(model_path), provider="cpu", limit=limit)
        except Exception as err:  # an ORT load or run failure of a quantized file is a result, not a crash
            row.failure = "ORT cannot run the quantized model: " + first_line(err).replace(f"{path}: ", "")
            return
        row.top1, row.agreement = evaluation.top1, evaluation.agreement

    print(f"[{stem}] float", file=sys.stderr)
    float_row = Row("float", None, None)
    evaluation = evaluate(str(model_path), data, provider="cpu", limit=limit)
    float_row.top1 = evaluation.top1
    images = evaluation.images
    result.rows.append(float_row)

    # ONNX Runtime quantize_static; the image reading and pre-processing time is added to every variant
    started = time.perf_counter()
    batches = calibration_batches(model_path, args.calib, args.num_calib)
    result.calib_images = sum(len(b) for b in batches)
    prepared = workdir / f"{stem}.ort_pre.onnx"
    quant_pre_process(str(model_path), str(prepared))
    shared = time.perf_counter() - started
    ort_w8a8 = None
    for variant in ORT_VARIANTS:
        print(f"[{stem}] {variant.label} W{variant.wbits}A{variant.abits}", file=sys.stderr)
        row = Row(variant.label, variant.wbits, variant.abits)
        output = workdir / f"{stem}.ort_{variant.method.lower()}_w{variant.wbits}a{variant.abits}.onnx"
        started = time.perf_counter()
        try:
            ort_quantize(prepared, batches, variant, output)
        except Exception as err:  # quantize_static raises many exception types
            row.failure = f"quantize_static fails: {first_line(err)}"
            result.rows.append(row)
            continue
        row.seconds = shared + time.perf_counter() - started
        row.path = str(output)
        if variant.wbits < 8 or variant.abits < 8:
            row.note = "ends 8-bit"
        score(row, output)
        if row.top1 is not None and (variant.method, variant.wbits, variant.abits) == ("MinMax", 8, 8):
            ort_w8a8 = output
        result.rows.append(row)

    ours_w8a8 = None
    for wbits, abits in RTN_BITS:
        print(f"[{stem}] onnxmodcap RTN W{wbits}A{abits}", file=sys.stderr)
        row = Row("onnxmodcap RTN", wbits, abits)
        output = workdir / f"{stem}.rtn_w{wbits}a{abits}.onnx"
        started = time.perf_counter()
        try:
            quantized = onnxmodcap.quantize(str(model_path), str(args.calib), wbits=wbits, abits=abits,
                                            method="rtn", output=str(output), target="ort", format="qdq",
                                            num_calib=args.num_calib)
        except Exception as err:  # a failure of our own pipeline is reported, the benchmark goes on
            row.failure = f"onnxmodcap.quantize fails: {type(err).__name__}: {first_line(err)}"
            result.rows.append(row)
            continue
        row.seconds = time.perf_counter() - started
        row.path = str(output)
        if wbits < 8 or abits < 8:
            row.note = "ends 8-bit"
        if not quantized.validation.parity_ok:
            row.note = (row.note + "; " if row.note else "") + "parity check failed"
        score(row, output)
        if (wbits, abits) == (8, 8) and row.top1 is not None:
            ours_w8a8 = output
        result.rows.append(row)

    timed = {"float": model_path}
    if ort_w8a8:
        timed["ORT MinMax W8A8"] = ort_w8a8
    if ours_w8a8:
        timed["onnxmodcap RTN W8A8"] = ours_w8a8
    print(f"[{stem}] latency ({', '.join(timed)})", file=sys.stderr)
    inputs = test_inputs(model_path, args.data, max(args.batches))
    meter = CpuMeter()
    result.latency = latency(timed, inputs, args.threads, tuple(args.batches), args.runs, args.warmup)
    result.other_cores = meter.other_cores()
    for row in result.rows:  # the W4A8 graphs too, to show which kernels 4-bit weights get
        if (row.wbits, row.abits) == (4, 8) and row.method in ("ORT MinMax", "onnxmodcap RTN") and row.top1 is not None:
            timed.setdefault(f"{row.method} W4A8", Path(row.path))
    for label, path in timed.items():
        ops, optimized = optimized_ops(path, workdir, args.threads)
        result.kernels[label] = ops
        if label == "onnxmodcap RTN W8A8":
            result.weighted, result.unfused = unfused_layers(path, optimized)
    result.images = images
    return result


# ---------------------------------------------------------------- markdown


def pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def model_markdown(result: ModelResult, args) -> list[str]:
    float_top1 = result.rows[0].top1
    lines = [f"### {Path(result.model).name}", "",
             f"Test set: {result.images} images; calibration: {result.calib_images} images.", "",
             "| method | W/A | top-1 % | Δ top-1 (points) | top-1 agreement with float % | quantize time (s) | note |",
             "|---|---|---:|---:|---:|---:|---|"]
    failures = []
    for row in result.rows:
        bits = "float" if row.wbits is None else f"W{row.wbits}A{row.abits}"
        delta = "" if row.top1 is None or row.wbits is None else f"{100 * (row.top1 - float_top1):+.2f}"
        seconds = "" if row.seconds is None else f"{row.seconds:.1f}"
        note = row.note
        if row.failure:
            failures.append(f"{row.method} {bits}: {row.failure}")
            kind = "failed" if row.method.startswith("onnxmodcap") else "unsupported"
            note = "; ".join(filter(None, [note, f"{kind} [{len(failures)}]"]))
        lines.append(f"| {row.method} | {bits} | {pct(row.top1)} | {delta} | {pct(row.agreement)} | {seconds} | "
                     f"{note} |")
    if failures:
        lines.append("")
        lines += [f"[{i}] {text}" + ("  " if i < len(failures) else "") for i, text in enumerate(failures, 1)]
    lines += ["", f"ONNX Runtime CPU latency, intra-op threads {args.threads}, median of {args.runs} runs "
              f"after {args.warmup} warm-up runs (p10–p90 in brackets):", "",
              "| model | " + " | ".join(f"batch {b} (ms)" for b in args.batches) + " | fused int8 kernels | "
              "float Conv/Gemm left | DequantizeLinear left |",
              "|---|" + "---:|" * len(args.batches) + "---|---:|---:|"]
    for label, per_batch in result.latency.items():
        ops = result.kernels.get(label, Counter())
        fused = ", ".join(f"{ops[k]} {k}" for k in sorted(ops) if k.startswith("QLinear") or k in INT8_KERNELS)
        float_layers = sum(ops[k] for k in ("Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul"))
        timings = " | ".join(f"{v['median_ms']:.3f} ({v['p10_ms']:.3f}–{v['p90_ms']:.3f})"
                             for v in per_batch.values())
        lines.append(f"| {label} | {timings} | {fused or 'none'} | {float_layers} | {ops['DequantizeLinear']} |")
    if result.other_cores is not None:
        lines += ["", f"Other processes kept {result.other_cores:.2f} of the machine's cores busy during the "
                  "latency runs."]
    if result.kernels:
        lines += ["", "Op types in ORT's optimized graphs:", ""]
        for label, ops in result.kernels.items():
            lines.append(f"- {label}: " + ", ".join(f"{name} {count}" for name, count in sorted(ops.items())))
    if result.weighted:
        lines += ["", f"onnxmodcap RTN W8A8: {result.weighted - len(result.unfused)} of {result.weighted} weighted "
                  "layers run as int8 kernels in ONNX Runtime."]
        reasons = Counter(reason for _, _, reason in result.unfused)
        for reason, count in reasons.most_common():
            names = [name for name, _, r in result.unfused if r == reason]
            shown = ", ".join(f"`{n}`" for n in names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
            lines.append(f"- {count} not fused: {reason} — {shown}")
    return lines


def summary_markdown(results: list[ModelResult]) -> list[str]:
    lines = ["### Summary", "", "| model | float top-1 % | RTN W8A8 top-1 % | Δ (points) | within 0.5 points | "
             "ORT MinMax W8A8 top-1 % | RTN W8A8 / float latency, batch 1 | batch 32 | "
             "RTN W8A8 / ORT W8A8 latency, batch 1 | batch 32 | RTN W8A8 layers fused |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---|"]
    for result in results:
        rows = {(r.method, r.wbits, r.abits): r for r in result.rows}
        flt, ours, theirs = rows[("float", None, None)], rows.get(("onnxmodcap RTN", 8, 8)), \
            rows.get(("ORT MinMax", 8, 8))
        delta = None if ours is None or ours.top1 is None else 100 * (ours.top1 - flt.top1)
        held = "–" if delta is None else ("yes" if abs(delta) <= 0.5 else "**no**")

        def ratio(a, b, batch):
            lat = result.latency
            if a not in lat or b not in lat:
                return "–"
            return f"{lat[a][batch]['median_ms'] / lat[b][batch]['median_ms']:.2f}x"

        batches = list(next(iter(result.latency.values()), {}).keys())
        b1, b2 = (batches + [None, None])[:2]
        fused = f"{result.weighted - len(result.unfused)}/{result.weighted}" if result.weighted else "–"
        lines.append(f"| {Path(result.model).name} | {pct(flt.top1)} | {pct(ours.top1 if ours else None)} | "
                     f"{'–' if delta is None else f'{delta:+.2f}'} | {held} | "
                     f"{pct(theirs.top1 if theirs else None)} | "
                     f"{ratio('onnxmodcap RTN W8A8', 'float', b1)} | {ratio('onnxmodcap RTN W8A8', 'float', b2)} | "
                     f"{ratio('onnxmodcap RTN W8A8', 'ORT MinMax W8A8', b1)} | "
                     f"{ratio('onnxmodcap RTN W8A8', 'ORT MinMax W8A8', b2)} | {fused} |")
    return lines


def machine_facts() -> dict:
    cpu = cpu_model(unknown=platform.processor() or platform.machine())
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "onnxmodcap"], cwd=REPO, capture_output=True,
                               text=True, check=True).stdout.split("\n")
        changed = sorted(line[3:] for line in dirty if line.strip())
        if changed:
            commit += f", with uncommitted changes to {', '.join(changed)}"
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    import torch  # already loaded by onnxmodcap.quantize

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "ort": ort.__version__,
            "onnx": onnx.__version__, "torch": torch.__version__, "onnxmodcap": onnxmodcap.__version__,
            "commit": commit}


def command_line() -> str:
    env = " ".join(f"{key}={os.environ[key]}" for key in ("OMP_NUM_THREADS",) if key in os.environ)
    script = os.path.relpath(sys.argv[0], Path.cwd()) if Path(sys.argv[0]).exists() else sys.argv[0]
    return " ".join(filter(None, [env, "python", shlex.quote(script), *map(shlex.quote, sys.argv[1:])]))


def section(results: list[ModelResult], args, facts: dict, load: dict, wall: float) -> str:
    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    lines = [SECTION, "",
             "Produced by (from the repository root, in the project's virtualenv):", "", "```",
             command_line(), "```", "",
             f"- date: {date}; total run time {wall / 60:.1f} min",
             f"- machine: {facts['cpu']}, {facts['cores']} logical cores; load average "
             f"{load['start'][0]:.2f} at the start, {load['end'][0]:.2f} at the end; other processes kept "
             + (f"{load['other_cores']:.2f}" if load['other_cores'] is not None else "an unknown number of")
             + " cores busy on average over the whole run",
             f"- software: onnxruntime {facts['ort']} (CPUExecutionProvider), onnx {facts['onnx']}, "
             f"torch {facts['torch']}, Python {facts['python']}, onnxmodcap {facts['onnxmodcap']} "
             f"(commit {facts['commit']})",
             f"- data: `{args.data}` (top-1 over "
             + ("all images" if args.limit is None else f"{args.limit} images spread over the set")
             + f"), calibration `{args.calib}` (at most {args.num_calib} images, the same for both quantizers)",
             "- ORT quantize_static: `quant_pre_process` first (shape inference, Conv+BN fusion), then QDQ "
             "format, per-channel symmetric weights (QInt8, or QInt4 for W4), asymmetric activations (QUInt8, "
             "or QUInt4 for A4), reduce_range off, default calibration settings (Percentile: 99.999); W4 "
             "variants keep the first and last weighted layers at 8 bits through TensorQuantOverrides. Its "
             "time includes reading the calibration images and `quant_pre_process`.",
             "- onnxmodcap RTN: `onnxmodcap.quantize(model, calib, wbits=W, abits=A, method='rtn', "
             "target='ort', format='qdq')`, default Lp scale initialisation, first and last weighted layers "
             "8-bit; its time is the whole call (reading images, calibration, export, parity validation).",
             "- top-1 agreement: share of test images where the quantized model's top-1 class equals the float "
             "model's.", ""]
    lines += summary_markdown(results) + [""]
    for result in results:
        lines += model_markdown(result, args) + [""]
    lines += interpretation(results)
    return "\n".join(lines).rstrip() + "\n"


def interpretation(results: list[ModelResult]) -> list[str]:
    lines = ["### Reading the figures", ""]
    for result in results:
        rows = {(r.method, r.wbits, r.abits): r for r in result.rows}
        flt, ours = rows[("float", None, None)], rows.get(("onnxmodcap RTN", 8, 8))
        name = Path(result.model).name
        if ours is None or ours.top1 is None:
            lines.append(f"- {name}: no RTN W8A8 result.")
            continue
        delta = 100 * (ours.top1 - flt.top1)
        verdict = "holds" if abs(delta) <= 0.5 else "does **not** hold"
        text = (f"- {name}: RTN W8A8 is {delta:+.2f} points from float, so the acceptance criterion "
                f"(within 0.5 points) {verdict}.")
        lat = result.latency
        if "onnxmodcap RTN W8A8" in lat and "float" in lat:
            def ratios(label):
                return "/".join(f"{lat[label][b]['median_ms'] / lat['float'][b]['median_ms']:.2f}x"
                                for b in lat[label])
            batches = "/".join(str(b) for b in lat["float"])
            text += f" Latency of our W8A8 model relative to float at batch {batches}: {ratios('onnxmodcap RTN W8A8')}"
            if "ORT MinMax W8A8" in lat:
                text += f" (ORT's own W8A8: {ratios('ORT MinMax W8A8')})"
            text += "."
        if result.weighted:
            fused = result.weighted - len(result.unfused)
            text += (f" ORT fuses {fused} of its {result.weighted} weighted layers into int8 kernels"
                     + ("." if not result.unfused else
                        "; the others run as float kernels behind a DequantizeLinear of their weights that ORT "
                        "executes on every run (main cause: "
                        f"{Counter(r for _, _, r in result.unfused).most_common(1)[0][0]})."))
        lines.append(text)
    if any(result.unfused for result in results):
        lines += ["", "ONNX Runtime forms an int8 kernel (QLinearConv) only from DequantizeLinear -> Conv -> "
                  "QuantizeLinear; a Relu or Clip in between is folded into the QuantizeLinear and a QuantizeLinear "
                  "behind a MaxPool is moved in front of it. `onnxmodcap quantize --target ort` quantizes only the "
                  "inputs of weighted layers, so a Conv whose output feeds a residual Add or a GlobalAveragePool "
                  "keeps a float output and ORT runs it as a float Conv, dequantizing its int8 weights on every "
                  "run" + ("; a Gemm with a float bias stays float too" if any(
                      r.startswith("float bias on Gemm") for result in results for _, _, r in result.unfused)
                      else "") + ". ORT's own quantize_static also "
                  "quantizes the Add and pooling tensors and writes int32 biases, which gives QLinearAdd, "
                  "QLinearGlobalAveragePool, QGemm and an all-int8 graph. So our Q/DQ placement keeps ORT's int8 "
                  "fusion only for the layers counted as fused above, not for the whole network."]
    lines += ["", "The W4 rows compare accuracy (their latency is not measured); the op types of both W4A8 models "
              "in ORT's optimized graph are listed per model: ORT's QInt4 weights are stored as INT4, ours in an "
              "int8 container holding the 4-bit grid."]
    return lines


def write_section(path: Path, text: str) -> None:
    """Replace the section (up to the next heading of the same level) or append it."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(old):
        new = pattern.sub(lambda _: text + "\n", old, count=1).rstrip() + "\n"
    else:
        new = old.rstrip() + "\n\n" + text
    path.write_text(new)


# ---------------------------------------------------------------- main


def default_models() -> list[str]:
    found = []
    for pattern in DEFAULT_MODELS:
        found += sorted(str(p.relative_to(REPO)) for p in REPO.glob(pattern))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=None,
                        help="ONNX models (default: the shipped ones found in models/)")
    parser.add_argument("--calib", type=Path, default=Path("models/calib"), help="calibration images")
    parser.add_argument("--data", type=Path, default=Path("models/fashion_mnist_test.npz"), help="labelled test set")
    parser.add_argument("--limit", type=int, default=None, help="test images (default: all)")
    parser.add_argument("--num-calib", type=int, default=1024, help="calibration images (default 1024)")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/shipped_models.md"), help="markdown file to update")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op threads for the latency runs")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="latency batch sizes")
    parser.add_argument("--runs", type=int, default=200, help="timed runs per model and batch size")
    parser.add_argument("--warmup", type=int, default=20, help="warm-up runs per model and batch size")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the quantized models here (default: a temporary folder)")
    args = parser.parse_args()
    models = args.models or default_models()
    if not models:
        parser.error("no models given and none found in models/")
    missing = [m for m in models if not Path(m).is_file()]
    if missing:
        parser.error(f"no such model: {', '.join(missing)}")
    args.models = models
    logging.getLogger().setLevel(logging.ERROR)  # quantize_static logs its advice at WARNING
    ort.set_default_logger_severity(3)

    started, meter = time.perf_counter(), CpuMeter()
    load = {"start": os.getloadavg()}
    facts = machine_facts()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_rtn.") as temporary:
        workdir = args.workdir or Path(temporary)
        workdir.mkdir(parents=True, exist_ok=True)
        for model in models:
            results.append(bench_model(Path(model), args, workdir))
    load["end"], load["other_cores"] = os.getloadavg(), meter.other_cores()
    wall = time.perf_counter() - started
    text = section(results, args, facts, load, wall)
    write_section(args.out, text)
    if args.json:
        raw = {"facts": facts, "load": load, "wall_s": wall, "command": command_line(),
               "results": [{**vars(r), "rows": [vars(row) for row in r.rows],
                            "kernels": {k: dict(v) for k, v in r.kernels.items()}} for r in results]}
        args.json.write_text(json.dumps(raw, indent=2, default=str))
    print(text)


if __name__ == "__main__":
    main()
