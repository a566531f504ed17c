"""A model over 2 GB: quantize a chain of wide convolutions stored with external data and measure
the peak resident memory and wall time of `onnxmodcap quantize`.

    OMP_NUM_THREADS=2 python tools/bench_large_model.py [--out /tmp/bench_large] [--width 2048] [--layers 15] [--iters 5] [--init lp]

The graph: Conv 3->W (3x3), then --layers Conv W->W (3x3, ReLU after each; 151 MB of float weights
each at the default width 2048), global average pool and Gemm W->1000, on 3x4x4 inputs. Weights are random
(He-scaled, seed 0) and written to `large.onnx.data` directly, since no protobuf can hold them.
Calibration data is --images random tensors in a .npy file. Everything goes under --out; the
quantize log is --out/quantize.log. The last line printed is a markdown table row.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from bench_load import run_quantize

SIDE, CLASSES = 4, 1000


def external_tensor(name: str, array: np.ndarray, stream, location: str) -> TensorProto:
    """Append `array` to the open data file and return the initializer that points at it."""
    array = array.astype(np.float32)
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=array.shape)
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", stream.tell()), ("length", array.nbytes)):
        tensor.external_data.add(key=key, value=str(value))
    stream.write(array.tobytes())
    return tensor


def write_model(path: Path, width: int, layers: int) -> None:
    rng = np.random.default_rng(0)
    location = f"{path.name}.data"
    nodes, initializers, current = [], [], "x"
    with open(path.parent / location, "wb") as stream:
        for index in range(layers + 1):
            channels = 3 if index == 0 else width
            weight = rng.standard_normal((width, channels, 3, 3), dtype=np.float32) * np.sqrt(2 / (channels * 9))
            initializers.append(external_tensor(f"conv{index}.weight", weight, stream, location))
            nodes += [helper.make_node("Conv", [current, f"conv{index}.weight"], [f"conv{index}"],
                                       name=f"conv{index}", pads=[1, 1, 1, 1]),
                      helper.make_node("Relu", [f"conv{index}"], [f"relu{index}"], name=f"relu{index}")]
            current = f"relu{index}"
        fc = rng.standard_normal((CLASSES, width), dtype=np.float32) / np.sqrt(width)
        initializers.append(external_tensor("fc.weight", fc, stream, location))
    nodes += [helper.make_node("GlobalAveragePool", [current], ["pooled"], name="pool"),
              helper.make_node("Flatten", ["pooled"], ["features"], name="flatten"),
              helper.make_node("Gemm", ["features", "fc.weight"], ["logits"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "large_chain",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, SIDE, SIDE])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])],
                              initializers)
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_large"), help="folder for every file")
    parser.add_argument("--width", type=int, default=2048, help="channels of the convolutions")
    parser.add_argument("--layers", type=int, default=15, help="width->width convolutions (15 at 2048: 2.27 GB)")
    parser.add_argument("--images", type=int, default=64, help="calibration tensors")
    parser.add_argument("--iters", type=int, default=5, help="reconstruction iterations per unit")
    parser.add_argument("--method", default="brecq")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--init", default="lp", help="quantizer initialisation (lp takes minutes per layer here)")
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    model_path = args.out / "large.onnx"
    write_model(model_path, args.width, args.layers)
    calib = args.out / "inputs.npy"
    np.save(calib, np.random.default_rng(1).standard_normal((args.images, 3, SIDE, SIDE)).astype(np.float32))
    model_bytes = model_path.stat().st_size + (args.out / "large.onnx.data").stat().st_size

    work_dir, report_path = args.out / "work", args.out / "report.json"
    command = [str(Path(sys.executable).with_name("onnxmodcap")), "quantize", str(model_path),
               "--calib", str(calib), "--bits", str(args.bits), "--num-calib", str(args.images),
               "--method", args.method, "--iters", str(args.iters), "--init", args.init, "-o", str(args.out / "large.quant.onnx"),
               "--report", str(report_path), "--work-dir", str(work_dir)]
    code, seconds, peak_gib, work_bytes, outcome = run_quantize(command, args.out, work_dir, report_path)
    if code == 0:
        written = sum(p.stat().st_size for p in args.out.glob("large.quant.onnx*"))
        outcome = f"output {written / 1e9:.2f} GB; {outcome}"
    print("| model GB | width | layers | images | method | iters | peak RSS GiB | wall s | exit | work folder peak MB "
          "| output and parity (report validation) or error |")
    print("|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|")
    print(f"| {model_bytes / 1e9:.2f} | {args.width} | {args.layers + 2} | {args.images} | {args.method} | {args.iters} "
          f"| {peak_gib:.2f} | {seconds:.0f} | {code} | {work_bytes / 1e6:.0f} | {outcome} |")


if __name__ == "__main__":
    main()
