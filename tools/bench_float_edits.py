"""What one small edit of a float model costs in fidelity, on the real-model benchmark's data.

    python tools/bench_float_edits.py efficientnet_lite1.legacy --round /_blocks.0/_depthwise_conv/Conv
    python tools/bench_float_edits.py efficientnet_lite1.legacy --equalize 1 --quantize

Edits (each scored alone, in a float model written to --work):
- `--round NODE` (repeatable): the Conv's weights rounded to --bits per output channel (symmetric,
  max-abs scale), nothing else quantized. Prints the weights' own SQNR beside the model's: how much
  the network amplifies a perturbation of that size.
- `--equalize N`: the first N pairs of a Conv followed by Clip(0, bound) or Relu (and optionally a
  zero Pad) that feeds a depthwise Conv are equalised: each channel of the first Conv is scaled up by
  bound / (headroom x its calibration maximum), between 1 and --cap, and the depthwise Conv's channel
  divided by the same factor. Exact as long as no held-out value exceeds headroom x the calibration
  maximum; the fidelity of the edited float model says how far that holds. With --quantize the
  unedited and the edited model are quantized (onnxmodcap RTN at --bits, the benchmark's calibration
  tensors) and both files scored, to see what per-tensor activation quantization gains from it.

Fidelity is `bench_real_models.py`'s, against the unedited float model on the held-out inputs.
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

import bench_real_models as bench


def consumers_of(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    found: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            found.setdefault(name, []).append(node)
    return found


def attribute(node: onnx.NodeProto, name: str, default=None):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def constant_input(node: onnx.NodeProto, index: int, graph: onnx.GraphProto, initializers: dict) -> float | None:
    """Input `index` of `node` where it is an initializer or a Constant node's scalar, else None."""
    if len(node.input) <= index or not node.input[index]:
        return None
    name = node.input[index]
    if name in initializers:
        return float(numpy_helper.to_array(initializers[name]))
    producer = next((n for n in graph.node if name in n.output), None)
    if producer is not None and producer.op_type == "Constant":
        return float(numpy_helper.to_array(producer.attribute[0].t))
    return None


def positive_bound(node: onnx.NodeProto, graph: onnx.GraphProto, initializers: dict) -> tuple[bool, float | None]:
    """Whether `node` is Relu or a Clip from 0, and its upper bound (None for Relu)."""
    if node.op_type == "Relu":
        return True, None
    low = constant_input(node, 1, graph, initializers)
    low = attribute(node, "min") if low is None else low
    high = constant_input(node, 2, graph, initializers)
    return low == 0, attribute(node, "max") if high is None else high


def depthwise_pairs(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, onnx.NodeProto, onnx.NodeProto]]:
    """(Conv, its Clip/Relu, the depthwise Conv that alone reads it), in graph order."""
    graph, initializers = model.graph, {i.name: i for i in model.graph.initializer}
    readers = consumers_of(graph)
    pairs = []
    for first in graph.node:
        if first.op_type != "Conv" or first.input[1] not in initializers:
            continue
        activation = readers.get(first.output[0], [])
        if len(activation) != 1 or activation[0].op_type not in ("Clip", "Relu"):
            continue
        if not positive_bound(activation[0], graph, initializers)[0]:
            continue
        after = readers.get(activation[0].output[0], [])
        if len(after) == 1 and after[0].op_type == "Pad" and not constant_input(after[0], 2, graph, initializers):
            after = readers.get(after[0].output[0], [])  # zero padding scales with the channel
        if len(after) != 1 or after[0].op_type != "Conv" or after[0].input[1] not in initializers:
            continue
        weight = numpy_helper.to_array(initializers[after[0].input[1]])
        if attribute(after[0], "group", 1) == weight.shape[0] and weight.shape[1] == 1:
            pairs.append((first, activation[0], after[0]))
    return pairs


def channel_maxima(model: onnx.ModelProto, tensors: list[str], inputs: np.ndarray) -> dict[str, np.ndarray]:
    """Each tensor's maximum per channel (axis 1) over `inputs`."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in tensors)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    maxima = {name: None for name in tensors}
    for start in range(0, len(inputs), 16):
        values = session.run(tensors, {session.get_inputs()[0].name: inputs[start:start + 16]})
        for name, value in zip(tensors, values):
            batch = value.max(axis=tuple(a for a in range(value.ndim) if a != 1))
            maxima[name] = batch if maxima[name] is None else np.maximum(maxima[name], batch)
    return maxima


def set_initializer(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    target = next(i for i in model.graph.initializer if i.name == name)
    target.CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))


def array(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == name))


def equalized(model: onnx.ModelProto, pairs: list, calib: np.ndarray, headroom: float, cap: float) -> onnx.ModelProto:
    maxima = channel_maxima(model, [activation.output[0] for _, activation, _ in pairs], calib)
    edited = onnx.ModelProto()
    edited.CopyFrom(model)
    initializers = {i.name: i for i in model.graph.initializer}
    for first, activation, depthwise in pairs:
        high = maxima[activation.output[0]]
        bound = positive_bound(activation, model.graph, initializers)[1]
        bound = high.max() if bound is None else bound
        scale = np.where(high > 0, np.clip(bound / (headroom * np.maximum(high, 1e-12)), 1.0, cap), 1.0)
        set_initializer(edited, first.input[1], array(model, first.input[1]) * scale[:, None, None, None])
        if len(first.input) > 2:
            set_initializer(edited, first.input[2], array(model, first.input[2]) * scale)
        set_initializer(edited, depthwise.input[1], array(model, depthwise.input[1]) / scale[:, None, None, None])
        print(f"equalised {first.name} -> {depthwise.name}: factors median {np.median(scale):.2f}, "
              f"max {scale.max():.2f}")
    return edited


def rounded(model: onnx.ModelProto, nodes: list[str], bits: int) -> onnx.ModelProto:
    edited = onnx.ModelProto()
    edited.CopyFrom(model)
    for name in nodes:
        node = next(n for n in model.graph.node if n.name == name)
        weight = array(model, node.input[1])
        qmax = 2 ** (bits - 1) - 1
        scale = np.abs(weight).reshape(len(weight), -1).max(1).reshape(-1, *[1] * (weight.ndim - 1)) / qmax
        scale = np.where(scale == 0, 1.0, scale)
        values = np.clip(np.round(weight / scale), -qmax - 1, qmax) * scale
        sqnr = 10 * np.log10((weight.astype(np.float64) ** 2).sum() / ((weight - values) ** 2).sum())
        print(f"{name}: weights rounded to {bits} bits per channel, SQNR of the weights {sqnr:.1f} dB")
        set_initializer(edited, node.input[1], values)
    return edited


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(bench.MODELS))
    parser.add_argument("--models", type=Path, default=Path("/tmp/real_models"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/real_bench"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/float_edits"))
    parser.add_argument("--round", action="append", default=[], metavar="NODE")
    parser.add_argument("--bits", type=int, choices=(4, 8), default=8, help="weight bits; --quantize: W and A")
    parser.add_argument("--equalize", type=int, default=0, metavar="N")
    parser.add_argument("--headroom", type=float, default=1.5)
    parser.add_argument("--cap", type=float, default=8.0)
    parser.add_argument("--quantize", action="store_true")
    args = parser.parse_args()

    if args.quantize and not args.equalize:
        parser.error("--quantize compares an equalised model with the unedited one: give --equalize N")
    spec = bench.MODELS[args.model]
    model = onnx.load(args.models / spec.file)
    unknown = sorted(set(args.round) - {node.name for node in model.graph.node})
    if unknown:
        parser.error(f"no node called {', '.join(unknown)} in {spec.file}")
    calib = np.load(args.out / args.model / "calib.npy")
    args.work.mkdir(parents=True, exist_ok=True)
    for index, node in enumerate(args.round):
        path = args.work / f"rounded{index}.onnx"
        onnx.save(rounded(model, [node], args.bits), path)
        print(f"{node} rounded: {bench.score_file(args, args.model, path)}", flush=True)
    if not args.equalize:
        return
    pairs = depthwise_pairs(model)[:args.equalize]
    path = args.work / "equalized.onnx"
    onnx.save(equalized(model, pairs, calib, args.headroom, args.cap), path)
    label = f"{len(pairs)} pairs equalised"
    print(f"{label}: {bench.score_file(args, args.model, path)}", flush=True)
    if args.quantize:
        for label, source in (("unedited", args.models / spec.file), (label, path)):
            output = args.work / f"{source.stem}.rtn.onnx"
            command = bench.quantize_command(args.model, f"w{args.bits}a{args.bits}", "rtn", args.models, args.out,
                                             output)
            command[command.index(str(args.models / spec.file))] = str(source)
            done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if done.returncode:
                raise SystemExit(f"quantize failed on {source}:\n{done.stderr[-2000:]}")
            print(f"{label}, RTN W{args.bits}A{args.bits}: {bench.score_file(args, args.model, output)}", flush=True)


if __name__ == "__main__":
    main()
