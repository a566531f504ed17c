"""Mixed precision against uniform widths at the same weight size or bit operations, on the shipped models.

    python tools/bench_mixed_precision.py run --results mixed.jsonl \\
        --run resnet18:3:4:rtn --run resnet18:4:4:rtn --run mobilenetv2_x0_5:3:4:rtn:bops ...
    python tools/bench_mixed_precision.py render --results mixed.jsonl
    python tools/bench_mixed_precision.py units --model resnet18 --wbits 4 --abits 4 --method qdrop

A cell is MODEL:WBITS:ABITS:METHOD[:BUDGET] (MODEL: a stem in --models; BUDGET `bits`, the
default, or `bops`). For each cell and seed it quantizes the model with uniform widths (`--wbits
WBITS --abits ABITS`, first and last layers at 8 bits), measures the written model's average
weight bits and its bit operations per image (multiply-accumulates from ONNX shape inference x
weight bits x input activation bits), quantizes it again with `--mixed-precision` at that average
(rounded down to 4 decimals) or, for `bops`, at those bit operations (rounded down; activation
widths are then chosen too), with the same method and seed, and evaluates both on the whole test
set against the float model. One JSON line per cell and seed goes to --results;
cells already there are skipped. The times are of the quantize calls alone; the mixed one includes
the width search.

`units` puts `analyze`'s ranking of the reconstruction units (SQNR with only that unit quantized,
round to nearest) beside what reconstruction then does to each unit's output error (the quantize
report's unit losses before and after), with the rank correlation of the two orders.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

import onnxmodcap
from onnxmodcap.evaluate import evaluate
from onnxmodcap.graph import initializer_sizes, node_attributes

from benchgrid import markdown_table, parse_cell, read_records, run_cells


def average_weight_bits(result) -> float:
    """The written model's weight bits per quantized weight, from its plan and stored tensors."""
    sizes = initializer_sizes(onnx.load(result.output))
    weights = [(sizes[f"{w.tensor}_quantized"], w.bits) for w in result.report.plan.weights]
    return sum(size * bits for size, bits in weights) / sum(size for size, _ in weights)


def bit_operations(model_path: Path, plan) -> float:
    """Bit operations per image of a plan: multiply-accumulates counted from ONNX shape inference on
    the source model (Conv C_out x H x W x C_in/group x kernel, Gemm rows x N x K) x weight bits x
    input activation bits. Independent of onnxmodcap's own count, which runs the model."""
    model = onnx.shape_inference.infer_shapes(onnx.load(model_path))
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in (*model.graph.value_info, *model.graph.output)}
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    abits = {a.tensor: a.bits for a in plan.activations}
    total = 0.0
    for layer in plan.weights:
        node = nodes[layer.node]
        dims = shapes.get(node.output[0], [])[1:]
        if not dims or 0 in dims:
            raise ValueError(f"{node.name}: shape inference left the output's size unknown")
        outputs = float(np.prod(dims))
        if node.op_type == "Conv":
            _, inputs_per_group, *kernel = weights[node.input[1]]
            macs = outputs * inputs_per_group * float(np.prod(kernel))
        elif node.op_type == "Gemm" and node_attributes(node).get("transB"):
            macs = outputs * weights[node.input[1]][1]
        else:
            raise ValueError(f"{node.op_type} {node.name}: only Conv and Gemm (transB) are counted here")
        total += macs * layer.bits * abits[layer.input]
    return total


def measure(cell: dict, seed: int, args) -> dict:
    model = args.models / f"{cell['model']}.onnx"
    options = dict(method=cell["method"], seed=seed, num_calib=args.num_calib)
    record = {}
    with tempfile.TemporaryDirectory() as folder:
        for name in ("uniform", "mixed"):
            if name == "uniform":
                extra = {"wbits": int(cell["wbits"]), "abits": int(cell["abits"])}
            elif cell["budget"] == "bops":
                extra = {"abits": int(cell["abits"]), "mixed_precision": f"{math.floor(record['uniform_bops'])}BOPs"}
            else:
                extra = {"abits": int(cell["abits"]),
                         "mixed_precision": f"{math.floor(record['uniform_bits'] * 1e4) / 1e4:.4f}"}
            output = Path(folder) / f"{name}.onnx"
            started = time.monotonic()
            result = onnxmodcap.quantize(model, args.calib, output=output, **options, **extra)
            seconds = time.monotonic() - started
            evaluation = evaluate(str(output), str(args.data), reference_path=str(model))
            record |= {f"{name}_bits": average_weight_bits(result), f"{name}_bops": bit_operations(model, result.report.plan),
                       f"{name}_top1": evaluation.top1, f"{name}_agreement": evaluation.agreement,
                       f"{name}_kl": evaluation.kl, f"{name}_sqnr_db": result.validation.fidelity[0].sqnr_db,
                       f"{name}_seconds": round(seconds, 1)}
            if name == "mixed":
                record["widths"] = result.report.mixed_precision.widths
                record["activation_widths"] = result.report.mixed_precision.activation_widths
    return record


def run(args) -> None:
    cells = [parse_cell(text, ("model", "wbits", "abits", "method", "budget"), {"budget": "bits"}) for text in args.run]
    run_cells(cells, args.seeds, args.results, lambda cell, seed: measure(cell, seed, args),
              key=lambda r: (r["model"], r["wbits"], r["abits"], r["method"], r.get("budget", "bits"), r["seed"]))


def render(args) -> None:
    groups: dict[tuple, list[dict]] = {}
    for record in read_records(args.results):
        key = (record["model"], record["wbits"], record["abits"], record["method"], record.get("budget", "bits"))
        groups.setdefault(key, []).append(record)
    rows = []
    for (model, wbits, abits, method, budget), records in sorted(groups.items()):
        mean = lambda field: statistics.fmean(r[field] for r in records)  # noqa: E731
        if budget == "bops":
            sizes = f"{mean('uniform_bops') / 1e6:.1f} / {mean('mixed_bops') / 1e6:.1f} MBOPs"
        else:
            sizes = f"{mean('uniform_bits'):.3f} / {mean('mixed_bits'):.3f} bits"
        rows.append([model, f"W{wbits}A{abits}", method, len(records), sizes,
                     f"{100 * mean('uniform_top1'):.2f}", f"{100 * mean('mixed_top1'):.2f}",
                     f"{100 * (mean('mixed_top1') - mean('uniform_top1')):+.2f}",
                     f"{100 * mean('uniform_agreement'):.2f}", f"{100 * mean('mixed_agreement'):.2f}",
                     f"{mean('uniform_sqnr_db'):.1f} / {mean('mixed_sqnr_db'):.1f}",
                     f"{mean('uniform_seconds'):.0f} / {mean('mixed_seconds'):.0f}"])
    print(markdown_table(["model", "uniform W/A", "method", "seeds", "budget uniform / mixed", "uniform top-1 %",
                          "mixed top-1 %", "Δ", "uniform agreement %", "mixed agreement %", "SQNR dB uniform / mixed",
                          "quantize s uniform / mixed"], rows, numeric=[False] * 3 + [True] + [False] + [True] * 7))


def ranks(values: list[float]) -> np.ndarray:
    return np.argsort(np.argsort(values)).astype(float)


def units(args) -> None:
    model = args.models / f"{args.model}.onnx"
    widths = dict(wbits=args.wbits, abits=args.abits, seed=0)
    analysis = onnxmodcap.analyze(model, args.calib, **widths)
    sensitivity = {s.part.name: s.only[0].sqnr_db for s in analysis.ranked("unit")}
    with tempfile.TemporaryDirectory() as folder:
        result = onnxmodcap.quantize(model, args.calib, method=args.method, modcap="off",
                                     output=Path(folder) / "q.onnx", **widths)
    losses = result.report.reconstruction.unit_losses
    names = losses.units
    order = {name: rank for rank, name in enumerate(sorted(names, key=sensitivity.get), 1)}
    rows = [[name, order[name], f"{sensitivity[name]:.1f}", f"{before:.4g}", f"{after:.4g}", f"{before / after:.2f}x"]
            for name, before, after in zip(names, losses.before, losses.after)]
    print(markdown_table(["unit", "analyze rank", "SQNR only this unit (dB)", "unit loss before", "after",
                          "reduced by"], rows, numeric=[False] + [True] * 5))
    before_ranks = ranks([-b for b in losses.before])
    reduction_ranks = ranks([-(b / a) for b, a in zip(losses.before, losses.after)])
    analyze_ranks = np.array([order[name] for name in names], float)
    print(f"\nSpearman correlation of analyze's rank with the loss-before rank: "
          f"{np.corrcoef(analyze_ranks, before_ranks)[0, 1]:.2f}; with the reduction rank: "
          f"{np.corrcoef(analyze_ranks, reduction_ranks)[0, 1]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    runner = commands.add_parser("run")
    runner.add_argument("--run", action="append", required=True, help="MODEL:WBITS:ABITS:METHOD (repeatable)")
    runner.add_argument("--results", type=Path, required=True)
    runner.add_argument("--seeds", type=int, nargs="+", default=[0])
    runner.add_argument("--num-calib", type=int, default=None)
    runner.add_argument("--models", type=Path, default=Path("models"))
    runner.add_argument("--calib", type=Path, default=Path("models/calib"))
    runner.add_argument("--data", type=Path, default=Path("models/fashion_mnist_test.npz"))
    table = commands.add_parser("render")
    table.add_argument("--results", type=Path, nargs="+", required=True)
    compared = commands.add_parser("units")
    compared.add_argument("--model", required=True)
    compared.add_argument("--wbits", type=int, default=4)
    compared.add_argument("--abits", type=int, default=4)
    compared.add_argument("--method", default="qdrop")
    compared.add_argument("--models", type=Path, default=Path("models"))
    compared.add_argument("--calib", type=Path, default=Path("models/calib"))
    args = parser.parse_args()
    {"run": run, "render": render, "units": units}[args.command](args)


if __name__ == "__main__":
    main()
