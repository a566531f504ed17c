"""What the real-model benchmark's metrics tolerate, and on which inputs quantized models disagree.

    python tools/bench_noise_floor.py efficientnet_lite1.legacy --files w8a8.rtn w8a8.qdrop w4a8.qdrop

Two tables for one classifier or the recogniser, on `bench_real_models.py`'s held-out inputs:
- Floor: the float model with Gaussian noise of each `--levels` standard deviation added to its
  inputs (in grey levels of 8-bit pixels; 0.29 is the error of storing the input as 8-bit pixels
  once more; seed 0, so level 1 is the benchmark's noise row; none on a text line's padding),
  scored against the float model on the clean inputs like a quantized model: agreement (top-1,
  identical strings) and SQNR.
- Margins: the held-out inputs split by how decided the float model is: the top-1 probability minus
  the second's (the recogniser: the smallest such margin over a line's positions, since one flipped
  position changes the string). For each `--files` model (BITS.QUANTIZER, a file the benchmark
  wrote), its agreement with float in each bin.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import bench_real_models as bench
from benchgrid import markdown_table
from onnxmodcap.metrics import as_logits, log_softmax

MARGIN_BINS = (0.0, 0.05, 0.2, 0.5, 1.0)


def floor_rows(args, spec: bench.RealModel, reference: np.ndarray) -> list[list]:
    rows = []
    for level in args.levels:
        outputs = bench.outputs_of(args.models / spec.file, bench.heldout_inputs(args.out, args.model, level),
                                   spec.batch_size)
        score = bench.scores(spec.task, reference, outputs)
        rows.append([f"{level:g}", f"{100 * agreement(spec.task, score):.1f} %", f"{score['sqnr_db']:.2f}"])
        print(rows[-1], flush=True)
    return rows


def agreement(task: str, score: dict) -> float:
    return score["top1_agreement"] if task == "classes" else score["strings_identical"]


def margins(task: str, reference: np.ndarray) -> np.ndarray:
    """Per input: top-1 probability minus the second's (the recogniser: the smallest over positions)."""
    rows = reference.reshape(-1, reference.shape[-1])
    probabilities = np.exp(log_softmax(as_logits(rows)))
    top2 = np.sort(probabilities, axis=1)[:, -2:]
    margin = (top2[:, 1] - top2[:, 0]).reshape(reference.shape[:-1])
    return margin if task == "classes" else margin.min(axis=1)


def written_file(args, name: str) -> Path:
    """A model the benchmark wrote, named BITS.QUANTIZER (BITS.QUANTIZER.seedN for another seed)."""
    return args.out / args.model / f"{name}.onnx"


def margin_rows(args, spec: bench.RealModel, reference: np.ndarray) -> list[list]:
    margin = margins(spec.task, reference)
    bins = np.digitize(margin, MARGIN_BINS[1:-1])
    expected = bench.answers(spec.task, reference)
    heldout = bench.heldout_inputs(args.out, args.model)
    agree = {name: bench.answers(spec.task, bench.outputs_of(written_file(args, name), heldout, spec.batch_size))
             == expected for name in args.files}
    rows = []
    for index, (low, high) in enumerate(zip(MARGIN_BINS, MARGIN_BINS[1:])):
        inside = bins == index
        cells = [f"{100 * agree[name][inside].mean():.1f} %" if inside.any() else "-" for name in args.files]
        rows.append([f"{low:g}-{high:g}", int(inside.sum()), *cells])
    rows.append(["all", len(margin), *(f"{100 * agree[name].mean():.1f} %" for name in args.files)])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(name for name, spec in bench.MODELS.items() if spec.task != "det"))
    parser.add_argument("--models", type=Path, default=Path("/tmp/real_models"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/real_bench"))
    parser.add_argument("--levels", type=float, nargs="+", default=[0.1, 0.29, 0.5, 1.0, 2.0],
                        help="noise standard deviations in grey levels")
    parser.add_argument("--files", nargs="*", default=[], metavar="BITS.QUANTIZER")
    args = parser.parse_args()

    spec = bench.MODELS[args.model]
    missing = [name for name in args.files if not written_file(args, name).exists()]
    if missing:
        parser.error(f"no {', '.join(missing)} in {args.out / args.model}: run its benchmark cell first")
    reference, _ = bench.float_reference(args.models, args.out, args.model)
    print(markdown_table(["noise (grey levels)", "agreement", "SQNR dB"], floor_rows(args, spec, reference)))
    if args.files:
        print(markdown_table(["float top-1 margin", "inputs", *args.files], margin_rows(args, spec, reference)))


if __name__ == "__main__":
    main()
