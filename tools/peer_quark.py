"""AMD Quark (ONNX) as a peer quantizer, for the `quark-*` cells of tools/bench_real_models.py.

Runs under the peer virtualenv of tools/setup_peers.sh (Quark is never a dependency of onnxmodcap):

    /tmp/peers/quark/bin/python tools/peer_quark.py --model M.onnx --calib calib.npy --output out.onnx \\
        --recipe cle --count 128 --batch-size 32 [--report out.json]

Quark's ONNX quantizer (quark.onnx.ModelQuantizer, built on ONNX Runtime's quantize_static) at 8-bit
weights and activations, QDQ format. Its ONNX configurations have no 4-bit integer type, so only
W8A8 runs. Three recipes:
- `preset`: Quark's own A8W8_QCONFIG as shipped: symmetric int8 activations and weights, both per
  tensor, Percentile calibration.
- `cle`: uint8 asymmetric activations (Percentile, as in the preset), symmetric int8 weights per
  output channel, and Quark's CLE (cross-layer equalisation) and bias correction algorithms with
  their defaults;
- `cle-minmax`: `cle` with MinMax calibration (activations and weights) instead of Percentile.
A model below opset 13 is converted to opset 13 first, as for ONNX Runtime's `quantize_static` in
bench_real_models.py (Quark refuses per-channel QDQ below it). Graph outputs that the source model
does not have are removed from the written file (see `drop_extra_outputs`), and the report says
how many.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import onnx
import onnxruntime as ort

from peer_aimet import batches


class Batches:
    """The first `count` calibration inputs, `batch_size` at a time, as ONNX Runtime's
    CalibrationDataReader: the batches peer_aimet.py gives AIMET."""

    def __init__(self, path: str, count: int, batch_size: int, input_name: str):
        self.items = batches(path, count, batch_size, input_name)
        self.rewind()

    def get_next(self):
        return next(self.iterator, None)

    def rewind(self):
        self.iterator = iter(self.items)


def recipe_config(name: str):
    from quark.onnx import A8W8_QCONFIG, BiasCorrectionConfig, CLEConfig, QConfig
    from quark.onnx.quantization.config.spec import CalibMethod, Int8Spec, QLayerConfig, QuantGranularity, UInt8Spec

    if name == "preset":
        return A8W8_QCONFIG
    calibration = CalibMethod.MinMax if name == "cle-minmax" else CalibMethod.Percentile
    layers = QLayerConfig(activation=UInt8Spec(calibration_method=calibration),
                          weight=Int8Spec(quant_granularity=QuantGranularity.Channel, calibration_method=calibration))
    return QConfig(global_config=layers, algo_config=[CLEConfig(), BiasCorrectionConfig()],
                   extra_options=dict(A8W8_QCONFIG.extra_options))


def drop_extra_outputs(written: onnx.ModelProto, source: onnx.ModelProto) -> int:
    """Remove the graph outputs the source model does not have; how many there were. Quark 0.13's
    bias correction leaves every intermediate tensor it measured as a graph output (80 on
    EfficientNet-Lite1), and ONNX Runtime then keeps all of them: 20 GB at batch 32."""
    wanted = {output.name for output in source.graph.output}
    extra = [output for output in written.graph.output if output.name not in wanted]
    for output in extra:
        written.graph.output.remove(output)
    return len(extra)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag in ("--model", "--calib", "--output"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--recipe", choices=("preset", "cle", "cle-minmax"), required=True)
    parser.add_argument("--wbits", type=int, default=8)
    parser.add_argument("--abits", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--report", help="also write what was done as JSON here")
    args = parser.parse_args()
    if (args.wbits, args.abits) != (8, 8):
        raise SystemExit(f"error: Quark's ONNX configurations have no {min(args.wbits, args.abits)}-bit integer "
                         "type; only --wbits 8 --abits 8 runs")

    import quark
    from quark.onnx import ModelQuantizer

    start = time.perf_counter()
    source = onnx.load(args.model)
    input_name = source.graph.input[0].name
    config = recipe_config(args.recipe)
    with tempfile.TemporaryDirectory() as scratch:
        model = args.model
        if source.opset_import[0].version < 13:  # Quark refuses per-channel QDQ below opset 13
            model = os.path.join(scratch, "opset13.onnx")
            onnx.save(onnx.version_converter.convert_version(source, 13), model)
        ModelQuantizer(config).quantize_model(model, args.output,
                                              Batches(args.calib, args.count, args.batch_size, input_name))
    seconds = time.perf_counter() - start
    written = onnx.load(args.output)
    extra_outputs = drop_extra_outputs(written, source)
    if extra_outputs:
        onnx.save(written, args.output)
    report = {"versions": {"amd-quark": quark.__version__, "onnxruntime": ort.__version__},
              "recipe": args.recipe, "config": str(config), "seconds": round(seconds, 1),
              "threads": os.environ.get("OMP_NUM_THREADS", "default"),
              "extra_outputs_removed": extra_outputs,
              "qdq_nodes": sum(node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in written.graph.node)}
    print(json.dumps(report, indent=1))
    if args.report:
        with open(args.report, "w") as stream:
            json.dump(report, stream, indent=1)


if __name__ == "__main__":
    main()
