"""Every op of the mirror's table against ONNX Runtime, on one-node (or few-node) graphs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from onnxmodcap.errors import UserError
from onnxmodcap.inspect_model import inspect_model
from onnxmodcap.ops import OPS, Call

RNG = np.random.default_rng(0)
TOLERANCE = 1e-5


def const(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def weights(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def graph_model(nodes, input_shape, initializers=(), opset=17, input_name="x", output_name="y"):
    graph = helper.make_graph(
        nodes, "case",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, None)],
        initializer=list(initializers),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)  # fills the output type the checker asks for


def one_op(op_type, input_shape, inits=(), attrs=None, opset=17, extra_inputs=()):
    """x plus the named initializers (or '' for an omitted optional input) feed a single node."""
    names = ["x", *extra_inputs]
    node = helper.make_node(op_type, names, ["y"], **(attrs or {}))
    return graph_model([node], input_shape, inits, opset)


def conv_case(attrs, weight_shape=(4, 3, 3, 3), input_shape=(2, 3, 11, 10), bias=True):
    inits = [const("w", weights(*weight_shape))] + ([const("b", weights(weight_shape[0]))] if bias else [])
    return one_op("Conv", input_shape, inits, attrs, extra_inputs=[i.name for i in inits])


def conv_transpose_case(attrs, weight_shape=(4, 3, 3, 3), input_shape=(2, 4, 5, 6)):
    inits = [const("w", weights(*weight_shape)), const("b", weights(weight_shape[1] * attrs.get("group", 1)))]
    return one_op("ConvTranspose", input_shape, inits, attrs, extra_inputs=["w", "b"])


def resize_case(attrs, scales=None, sizes=None, input_shape=(2, 3, 7, 5), opset=13):
    inits = [const("roi", np.array([], np.float32))]
    inputs = ["roi"]
    if scales is not None:
        inits.append(const("scales", np.array(scales, np.float32)))
        inputs.append("scales")
    else:
        inits.append(const("sizes", np.array(sizes, np.int64)))
        inputs += ["", "sizes"]
    return one_op("Resize", input_shape, inits, attrs, opset, inputs)


# Most cases fix their first dimension, which prepare frees as a batch and proves in ONNX Runtime.
# Where the op ties that axis to a constant or moves it (Concat with a constant, Gemm's transA,
# Unsqueeze at 0), no batch can be freed, so those inputs name it ("N"); the check feeds 2.
CASES = {
    "conv_asymmetric_pads": conv_case({"pads": [0, 1, 2, 0]}),
    "conv_same_upper_stride2": conv_case({"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    "conv_same_lower_stride2": conv_case({"auto_pad": "SAME_LOWER", "strides": [2, 2]}),
    "conv_valid_dilated": conv_case({"auto_pad": "VALID", "dilations": [2, 1]}),
    "conv_groups_no_bias": conv_case({"group": 3, "pads": [1, 1, 1, 1]}, (6, 1, 3, 3), bias=False),
    "conv_1d": conv_case({"pads": [1, 2]}, (4, 3, 3), (2, 3, 9)),
    "conv_transpose_stride2_output_padding": conv_transpose_case(
        {"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]}),
    "conv_transpose_asymmetric_pads": conv_transpose_case({"strides": [2, 1], "pads": [0, 1, 2, 0]}),
    "conv_transpose_groups_dilated": conv_transpose_case({"group": 2, "dilations": [2, 2]}, (4, 2, 3, 3)),
    "conv_transpose_output_shape": conv_transpose_case({"strides": [2, 2], "output_shape": [10, 12]}),
    "gemm_transB_alpha_beta": one_op("Gemm", (2, 5), [const("b", weights(7, 5)), const("c", weights(7))],
                                     {"transB": 1, "alpha": 0.5, "beta": 2.0}, extra_inputs=["b", "c"]),
    "gemm_transA": one_op("Gemm", ("N", 5), [const("b", weights(2, 7))], {"transA": 1}, extra_inputs=["b"]),
    "matmul_3d": one_op("MatMul", (2, 4, 6), [const("w", weights(6, 3))], extra_inputs=["w"]),
    "batchnorm": one_op("BatchNormalization", (2, 3, 4, 4),
                        [const("s", weights(3)), const("b", weights(3)), const("m", weights(3)),
                         const("v", np.abs(weights(3)) + 0.5)], {"epsilon": 1e-3}, extra_inputs=["s", "b", "m", "v"]),
    "layernorm": one_op("LayerNormalization", (2, 5, 6), [const("s", weights(6)), const("b", weights(6))],
                        {"axis": -1, "epsilon": 1e-5}, extra_inputs=["s", "b"]),
    "relu": one_op("Relu", (2, 3, 4)),
    "leaky_relu": one_op("LeakyRelu", (2, 3, 4), attrs={"alpha": 0.2}),
    "prelu": one_op("PRelu", (2, 3, 4, 4), [const("slope", weights(3, 1, 1))], extra_inputs=["slope"]),
    "clip_inputs": one_op("Clip", (2, 3, 4), [const("lo", np.array(-0.5, np.float32)), const("hi", np.array(0.7, np.float32))],
                          extra_inputs=["lo", "hi"]),
    "clip_max_only": one_op("Clip", (2, 3, 4), [const("hi", np.array(0.7, np.float32))], extra_inputs=["", "hi"]),
    "clip_attrs_opset6": one_op("Clip", (2, 3, 4), attrs={"min": 0.0, "max": 6.0}, opset=6),
    "sigmoid": one_op("Sigmoid", (2, 3, 4)),
    "hard_sigmoid": one_op("HardSigmoid", (2, 3, 4), attrs={"alpha": 1 / 6, "beta": 0.5}),
    "hard_swish": one_op("HardSwish", (2, 3, 4)),
    "tanh": one_op("Tanh", (2, 3, 4)),
    "erf": one_op("Erf", (2, 3, 4)),
    "gelu_opset20": one_op("Gelu", (2, 3, 4), opset=20),
    "softmax_opset13": one_op("Softmax", (2, 3, 4), attrs={"axis": 1}),
    "softmax_opset11_coerced": one_op("Softmax", (2, 3, 4), attrs={"axis": 1}, opset=11),
    "add_broadcast": one_op("Add", (2, 3, 4), [const("b", weights(4))], extra_inputs=["b"]),
    "sub": one_op("Sub", (2, 3, 4), [const("b", weights(3, 1))], extra_inputs=["b"]),
    "mul": one_op("Mul", (2, 3, 4), [const("b", weights(1, 3, 1))], extra_inputs=["b"]),
    "div": one_op("Div", (2, 3, 4), [const("b", np.abs(weights(4)) + 1)], extra_inputs=["b"]),
    "pow": one_op("Pow", (2, 3, 4), [const("e", np.array(2.0, np.float32))], extra_inputs=["e"]),
    "sqrt_of_abs": graph_model([helper.make_node("Abs", ["x"], ["a"]), helper.make_node("Sqrt", ["a"], ["y"])], (2, 3)),
    "concat": one_op("Concat", ("N", 3, 4), [const("b", weights(2, 2, 4))], {"axis": 1}, extra_inputs=["b"]),
    "split_equal_then_sub": graph_model(
        [helper.make_node("Split", ["x"], ["a", "b"], axis=1), helper.make_node("Sub", ["a", "b"], ["y"])], (2, 6, 3)),
    "split_sizes_opset13": graph_model(
        [helper.make_node("Split", ["x", "s"], ["a", "b"], axis=2),
         helper.make_node("Concat", ["b", "a"], ["y"], axis=2)], (2, 3, 7), [const("s", np.array([2, 5], np.int64))]),
    "slice_negative_step": one_op("Slice", (2, 6, 8),
                                  [const("st", np.array([-1, 1], np.int64)), const("en", np.array([-100, 7], np.int64)),
                                   const("ax", np.array([2, 1], np.int64)), const("sp", np.array([-2, 3], np.int64))],
                                  extra_inputs=["st", "en", "ax", "sp"]),
    "slice_opset9_attrs": one_op("Slice", (2, 6, 8), attrs={"starts": [1, 0], "ends": [1000, -2], "axes": [1, 2]}, opset=9),
    "reshape_zero_and_minus_one": one_op("Reshape", (2, 3, 4, 5), [const("s", np.array([0, -1, 5], np.int64))],
                                         extra_inputs=["s"]),
    "flatten_axis2": one_op("Flatten", (2, 3, 4, 5), attrs={"axis": 2}),
    "transpose": one_op("Transpose", (2, 3, 4, 5), attrs={"perm": [0, 2, 3, 1]}),
    "squeeze_unsqueeze": graph_model(
        [helper.make_node("Unsqueeze", ["x", "a"], ["u"]), helper.make_node("Squeeze", ["u", "b"], ["y"])],
        ("N", 1, 4), [const("a", np.array([-1, 0], np.int64)), const("b", np.array([2], np.int64))]),
    "unsqueeze_opset11_attrs": one_op("Unsqueeze", (2, 3), attrs={"axes": [1]}, opset=11),
    "gather_negative_indices": one_op("Gather", (2, 5, 3), [const("i", np.array([[-1, 0], [2, 2]], np.int64))],
                                      {"axis": 1}, extra_inputs=["i"]),
    "global_average_pool": one_op("GlobalAveragePool", (2, 3, 5, 6)),
    "average_pool_ceil_exclude_pad": one_op("AveragePool", (2, 3, 9, 8),
                                            attrs={"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1}),
    "average_pool_include_pad": one_op("AveragePool", (2, 3, 9, 8),
                                       attrs={"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1],
                                              "count_include_pad": 1}),
    "average_pool_asymmetric_pads": one_op("AveragePool", (2, 3, 9, 8),
                                           attrs={"kernel_shape": [2, 2], "strides": [2, 2], "pads": [0, 0, 1, 1]}),
    "max_pool_ceil_pads": one_op("MaxPool", (2, 3, 9, 8),
                                 attrs={"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1}),
    "max_pool_same_upper": one_op("MaxPool", (2, 3, 9, 8),
                                  attrs={"kernel_shape": [2, 2], "strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    "max_pool_dilated": one_op("MaxPool", (2, 3, 9, 8), attrs={"kernel_shape": [2, 2], "dilations": [2, 2]}),
    "reduce_mean_opset18": one_op("ReduceMean", (2, 3, 4, 5), [const("a", np.array([2, 3], np.int64))],
                                  {"keepdims": 0}, opset=18, extra_inputs=["a"]),
    "reduce_mean_opset13": one_op("ReduceMean", (2, 3, 4, 5), attrs={"axes": [-1], "keepdims": 1}, opset=13),
    "pad_reflect": one_op("Pad", (2, 3, 5, 6), [const("p", np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64))],
                          {"mode": "reflect"}, extra_inputs=["p"]),
    "pad_edge": one_op("Pad", (2, 3, 5, 6), [const("p", np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64))],
                       {"mode": "edge"}, extra_inputs=["p"]),
    "pad_constant_value": one_op("Pad", (2, 3, 5, 6), [const("p", np.array([0, 1, 1, 0, 0, 0, 2, -1], np.int64)),
                                                       const("v", np.array(0.5, np.float32))], extra_inputs=["p", "v"]),
    "resize_nearest_half_pixel_x2": resize_case({"mode": "nearest"}, scales=[1, 1, 2, 2]),
    "resize_nearest_asymmetric_floor": resize_case(
        {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}, scales=[1, 1, 2, 3]),
    "resize_nearest_sizes_odd_ratio": resize_case({"mode": "nearest"}, sizes=[2, 3, 12, 9]),
    "resize_linear_half_pixel": resize_case({"mode": "linear"}, scales=[1, 1, 2, 2]),
    "resize_linear_align_corners": resize_case(
        {"mode": "linear", "coordinate_transformation_mode": "align_corners"}, sizes=[2, 3, 13, 4]),
    "resize_linear_pytorch_half_pixel_down": resize_case(
        {"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"}, scales=[1, 1, 0.5, 0.6]),
    "resize_opset10_scales": graph_model([helper.make_node("Resize", ["x", "s"], ["y"], mode="nearest")],
                                         (2, 3, 4, 5), [const("s", np.array([1, 1, 2, 2], np.float32))], opset=10),
    "shape_chain_flatten": graph_model(
        [helper.make_node("Shape", ["x"], ["shape"]),
         helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
         helper.make_node("Unsqueeze", ["batch", "axes"], ["batch1"]),
         helper.make_node("Concat", ["batch1", "minus_one"], ["target"], axis=0),
         helper.make_node("Reshape", ["x", "target"], ["y"])],
        ("N", 3, 4, 4),
        [const("zero", np.array(0, np.int64)), const("axes", np.array([0], np.int64)),
         const("minus_one", np.array([-1], np.int64))]),
    "expand_and_cast": graph_model(
        [helper.make_node("Expand", ["x", "s"], ["e"]), helper.make_node("Cast", ["e"], ["y"], to=TensorProto.FLOAT)],
        (2, 1, 4), [const("s", np.array([3, 1], np.int64))]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_op_matches_onnxruntime(case, tmp_path):
    path = tmp_path / f"{case}.onnx"
    onnx.save(CASES[case], path)
    inspection = inspect_model(path, verify=True)
    assert inspection.unsupported == {}
    assert inspection.mirror_max_rel_err <= TOLERANCE


def test_unsupported_op_is_named_with_a_node(tmp_path):
    model = graph_model([helper.make_node("Relu", ["x"], ["r"], name="act"),
                         helper.make_node("Hardmax", ["r"], ["y"], name="pick")], (2, 3))
    onnx.save(model, tmp_path / "m.onnx")
    inspection = inspect_model(tmp_path / "m.onnx", verify=True)
    assert inspection.unsupported == {"Hardmax": "pick"}
    assert inspection.mirror_max_rel_err is None


def test_resize_cubic_is_refused_clearly(tmp_path):
    onnx.save(resize_case({"mode": "cubic"}, scales=[1, 1, 2, 2]), tmp_path / "m.onnx")
    with pytest.raises(UserError, match=r"^Resize node 'Resize_0': mode 'cubic' with coordinate"):
        inspect_model(tmp_path / "m.onnx", verify=True)


def test_shape_values_live_on_the_device_of_the_tensor_they_describe():
    """On CUDA a Shape result meets constants (Gather indices, Concat parts) that live on the GPU."""
    described = torch.empty(2, 3, device="meta")
    assert OPS["Shape"](Call("s", "Shape", {}, 17, 1), described).device == described.device
