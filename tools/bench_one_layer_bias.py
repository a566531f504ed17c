"""One layer's weights rounded, everything else float: what that costs at the model's output, and
what correcting the layer's bias for the mean shift of its output gives back.

The experiment behind onnxmodcap's bias correction (docs/benchmarks/real_models.md, "Bias
correction"). The layer's weights are rounded per output channel, symmetric, to `--bits`; its
output's per-channel mean shift is measured on the calibration inputs and subtracted from its bias;
both models run in ONNX Runtime's CPU provider on the held-out inputs against the float model.

    python tools/bench_one_layer_bias.py REAL_MODELS/efficientnet_lite1.legacy.onnx \\
        --calib REAL_BENCH/efficientnet_lite1.legacy/calib.npy \\
        --heldout REAL_BENCH/efficientnet_lite1.legacy/heldout.npy --node /_blocks.0/_depthwise_conv/Conv
"""

from __future__ import annotations

import argparse

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from onnxmodcap.metrics import fidelity

BATCH = 16


def outputs(model: onnx.ModelProto, inputs: np.ndarray, extra: str | None = None) -> list[np.ndarray]:
    """The model's first output (and the tensor `extra`) on `inputs`, BATCH at a time."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    names = [probe.graph.output[0].name]
    if extra:
        probe.graph.output.append(onnx.ValueInfoProto(name=extra))
        names.append(extra)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0].name
    runs = [session.run(names, {feed: inputs[i:i + BATCH]}) for i in range(0, len(inputs), BATCH)]
    return [np.concatenate(parts).astype(np.float64) for parts in zip(*runs)]


def rounded_per_channel(weights: np.ndarray, bits: int) -> np.ndarray:
    largest = 2 ** (bits - 1) - 1
    step = np.maximum(np.abs(weights).reshape(len(weights), -1).max(1), 1e-12) / largest
    step = step.reshape(-1, *[1] * (weights.ndim - 1))
    return (np.clip(np.round(weights / step), -largest - 1, largest) * step).astype(weights.dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--calib", required=True, help=".npy of model inputs the shift is measured on")
    parser.add_argument("--heldout", required=True, help=".npy of model inputs the result is scored on")
    parser.add_argument("--node", required=True, help="name of the Conv whose weights are rounded")
    parser.add_argument("--bits", type=int, default=8)
    parser.add_argument("--count", type=int, default=128, help="inputs used of each file")
    args = parser.parse_args()

    model = onnx.load(args.model)
    node = next((n for n in model.graph.node if n.name == args.node), None)
    if node is None or node.op_type != "Conv" or len(node.input) < 3:
        raise SystemExit(f"no Conv with a bias named {args.node!r} in {args.model}")
    calib, heldout = np.load(args.calib)[:args.count], np.load(args.heldout)[:args.count]
    constants = {t.name: t for t in model.graph.initializer}
    weight, bias = (numpy_helper.to_array(constants[name]) for name in node.input[1:3])

    _, float_layer = outputs(model, calib, node.output[0])
    float_heldout = outputs(model, heldout)[0]
    constants[node.input[1]].CopyFrom(numpy_helper.from_array(rounded_per_channel(weight, args.bits), node.input[1]))
    _, rounded_layer = outputs(model, calib, node.output[0])
    shift = (rounded_layer - float_layer).mean(axis=(0, 2, 3))
    spread = float_layer.std(axis=(0, 2, 3))
    results = {"rounded": outputs(model, heldout)[0]}
    constants[node.input[2]].CopyFrom(numpy_helper.from_array((bias - shift).astype(bias.dtype), node.input[2]))
    results["rounded, bias corrected"] = outputs(model, heldout)[0]

    print(f"{args.node}: weights rounded to {args.bits} bits per channel; largest mean shift "
          f"{(np.abs(shift) / np.maximum(spread, 1e-12)).max():.3f} of its channel's spread "
          f"({len(calib)} calibration inputs)")
    for name, result in results.items():
        score = fidelity(["output"], [float_heldout], [result])[0]
        print(f"  {name}: output SQNR {score.sqnr_db:.2f} dB, top-1 agreement "
              f"{100 * score.top1_agreement:.1f} % on {len(heldout)} held-out inputs")


if __name__ == "__main__":
    main()
