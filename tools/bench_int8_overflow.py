"""Whether ONNX Runtime's CPU int8 Conv kernels on this machine overflow, by weight storage and range.

    python tools/bench_int8_overflow.py

For each activation type, weight storage and largest weight integer it builds one QDQ Conv (16
channels, 3x3, every input at one constant value, the first two taps of every filter at the largest
weight), runs it in ONNX Runtime's CPU provider with all graph optimizations (DequantizeLinear ->
Conv -> QuantizeLinear fused into QLinearConv) and with none (the Q/DQ arithmetic as written), and
prints how many output steps apart the two land. On x86 CPUs without VNNI the u8 x s8 kernel adds
pairs of products in int16, so a pair above 32767 saturates. The u8 x u8 kernel (uint8 weights,
zero point 128) and the depthwise kernels widen every product to 32 bits. This is why export.py
stores ORT-target weights wider than 64 in uint8 outside depthwise Convs. On a CPU with VNNI no row
is more than 1 step apart (the fused kernel rounds its float requantization differently).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

INPUT_SCALE, OUTPUT_SCALE = 0.01, 0.05
CHANNELS = 16
# weight type, zero point, Conv group
STORAGE = {"int8": (np.int8, 0, 1), "uint8, zero point 128": (np.uint8, 128, 1),
           "int8, depthwise": (np.int8, 0, CHANNELS)}


def conv_model(activation_type, storage: str, weight_bound: int) -> bytes:
    weight_type, weight_zero, group = STORAGE[storage]
    outputs = CHANNELS if group > 1 else 32
    weights = np.random.default_rng(0).integers(-weight_bound, weight_bound + 1, (outputs, CHANNELS // group, 3, 3))
    weights[:, :, 0, :2] = weight_bound
    constants = {"x_scale": np.array(INPUT_SCALE, np.float32), "x_zero": np.array(0, activation_type),
                 "w": (weights + weight_zero).astype(weight_type), "w_scale": np.full(outputs, 0.001, np.float32),
                 "w_zero": np.full(outputs, weight_zero, weight_type),
                 "y_scale": np.array(OUTPUT_SCALE, np.float32), "y_zero": np.array(0, activation_type)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["x_q"]),
             helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_dq"]),
             helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zero"], ["w_dq"], axis=0),
             helper.make_node("Conv", ["x_dq", "w_dq"], ["y"], pads=[1, 1, 1, 1], group=group),
             helper.make_node("QuantizeLinear", ["y", "y_scale", "y_zero"], ["y_q"]),
             helper.make_node("DequantizeLinear", ["y_q", "y_scale", "y_zero"], ["out"])]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, CHANNELS, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(value, name) for name, value in constants.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9).SerializeToString()


def steps_apart(model: bytes, value: float) -> float:
    inputs = {"x": np.full((4, CHANNELS, 8, 8), value, np.float32)}
    outputs = []
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        outputs.append(ort.InferenceSession(model, options, providers=["CPUExecutionProvider"]).run(None, inputs)[0])
    return float(np.abs(outputs[0] - outputs[1]).max() / OUTPUT_SCALE)


def main() -> None:
    print(f"onnxruntime {ort.__version__}, CPUExecutionProvider\n")
    print("| activations | input value (integer) | weights | largest weight | fused Conv, output steps from the Q/DQ "
          "arithmetic |")
    print("|---|---|---|---:|---:|")
    for activation_type, values in ((np.uint8, (2.55, 1.5)), (np.int8, (1.27, 0.07))):
        for value in values:
            for storage in STORAGE:
                for bound in (127, 65, 64):
                    steps = steps_apart(conv_model(activation_type, storage, bound), value)
                    print(f"| {activation_type.__name__} | {value} ({round(value / INPUT_SCALE)}) | {storage} | {bound} | "
                          f"{steps:.0f} |")


if __name__ == "__main__":
    main()
