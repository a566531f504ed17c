"""Stage 1, prepare: load an ONNX file safely and turn it into a clean float graph.

Steps, in order: load (load.py: parse, check external-data paths, run the checker, read the weights,
large ones into a `Weights` dict), turn Constant nodes into initializers and remove
Identity/Dropout, infer shapes, record the statistics of every BatchNormalization that follows a
Conv and fold it into that Conv, simplify with onnxsim, and free a batch size the exporter fixed
(batch.py). The input file is only ever read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

from .batch import FixedBatch, fixed_batch, free_batch
from .load import load_model, source_digest
from .errors import UserError, first_line
from .preprocess import given_input_size
from .graph import UNKNOWN, consumers, produced_tensors, tensor_shapes
from .weights import Weights, add_initializer, detach_large, fits_in_protobuf, tensor_value, used_weights, with_values

FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
               onnx.TensorProto.BFLOAT16)


@dataclass(frozen=True)
class BatchNormStats:
    """Running statistics of a BatchNormalization that was folded into the Conv before it."""

    mean: np.ndarray
    var: np.ndarray
    scale: np.ndarray
    bias: np.ndarray
    epsilon: float


@dataclass
class PreparedModel:
    """A clean float graph plus the facts about it that later stages need.

    `bn_stats` is keyed by the output tensor name of the Conv that absorbed the BatchNormalization
    (that name is the former BatchNormalization output, so it survives simplification).
    """

    model: onnx.ModelProto  # large initializers are stubs: their values are in `weights`
    weights: Weights
    source: Path
    source_digest: str  # SHA-256 of the model file and its external-data files, in that order
    external_data: bool  # the source keeps its weights in external-data files
    batch: FixedBatch | None = None  # the batch size the source fixes (the prepared graph's is symbolic)
    bn_stats: dict[str, BatchNormStats] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def prepare(path: str | os.PathLike, simplify: bool = True, flags: Mapping[str, Any] | None = None) -> PreparedModel:
    """`flags`: the command line's preprocessing flags; their input size (or the model metadata's)
    fills a dynamic image size where the graph must run here."""
    source = Path(path)
    loaded = load_model(source)
    model, weights = loaded.model, loaded.weights
    notes: list[str] = []
    model = fold_constant_nodes(model, weights)
    check_weights_finite(model, weights)
    model = remove_passthrough_nodes(model)
    model = infer_shapes(model)
    model, bn_stats = fold_batchnorms(model, weights)
    if bn_stats:
        notes.append(f"folded {len(bn_stats)} BatchNormalization nodes into their Conv (statistics kept)")
    else:
        notes.append("no BatchNormalization after a Conv in the graph: BN statistics unavailable")
    if simplify:
        model, weights = simplify_or_keep(model, weights, notes)
    model = infer_shapes(model)
    batch = fixed_batch(model, given_input_size(model, flags or {}))
    if batch:
        model = infer_shapes(free_batch(model, weights, batch))
        notes.append(f"the model fixes its batch size at {batch.size}: prepared with a free batch size")
    if localize_batch_reads(model):
        notes.append("moved batch-size reads of the graph input next to where they are used")
        model = infer_shapes(model)
    name_nodes(model)
    missing = [name for name in bn_stats if name not in produced_tensors(model)]
    for name in missing:
        del bn_stats[name]
    if missing:
        notes.append(f"dropped BN statistics of {len(missing)} tensors that simplification removed")
    return PreparedModel(model=model, weights=used_weights(model, weights), source=source,
                         source_digest=source_digest([source] + loaded.data_files),
                         external_data=bool(loaded.data_files), batch=batch, bn_stats=bn_stats, notes=notes)


def check_weights_finite(model: onnx.ModelProto, weights: Weights) -> None:
    """NaN or Inf in a weight has no quantization grid: refuse it before calibration meets it."""
    for tensor in model.graph.initializer:
        if tensor.data_type not in FLOAT_TYPES:
            continue
        bad = int(np.count_nonzero(~np.isfinite(tensor_value(tensor, weights))))
        if bad:
            raise UserError(f"initializer {tensor.name!r} holds {bad} NaN or infinite values: "
                            "quantization needs finite weights")


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return shape_inference.infer_shapes(model, data_prop=True)
    except Exception as err:  # onnx raises several unrelated types for inconsistent graphs
        raise UserError(f"shape inference failed: {first_line(err)}") from err


def simplify_or_keep(model: onnx.ModelProto, weights: Weights, notes: list[str]) -> tuple[onnx.ModelProto, Weights]:
    """onnxsim when it succeeds and verifies; otherwise the unsimplified graph, with a note. onnxsim
    needs the whole model as one protobuf, so a model over 2 GB is not simplified."""
    import onnxsim

    if not fits_in_protobuf(model, weights):
        notes.append("not simplified: onnxsim cannot take a model over 2 GB")
        return model, weights
    try:
        simplified, verified = onnxsim.simplify(with_values(model, weights))
    except Exception as err:  # onnxsim surfaces C++ and ORT failures as arbitrary exceptions
        notes.append(f"onnxsim failed, continuing with the unsimplified graph: {first_line(err)}")
        return model, weights
    if not verified:
        notes.append("onnxsim result did not verify, continuing with the unsimplified graph")
        return model, weights
    notes.append("simplified with onnxsim")
    del simplified.metadata_props[:]  # onnxsim adds its own bookkeeping entries; keep the user's
    simplified.metadata_props.extend(model.metadata_props)
    simplified_weights: Weights = {}
    detach_large(simplified, simplified_weights)
    return simplified, simplified_weights


def reads_batch_only(node: onnx.NodeProto) -> bool:
    attrs = {a.name: a.i for a in node.attribute}
    return node.op_type == "Shape" and attrs.get("start", 0) == 0 and attrs.get("end") == 1


def shape_chain(start: onnx.NodeProto, users: dict[str, list[onnx.NodeProto]], constants: set[str]):
    """`start` and the nodes that compute only from its output and constants, in graph order."""
    chain, produced, frontier = [start], set(start.output), list(start.output)
    while frontier:
        for node in users.get(frontier.pop(), []):
            if all(node is not c for c in chain) and all(i in produced or i in constants or not i for i in node.input):
                chain.append(node)
                produced.update(node.output)
                frontier.extend(node.output)
    return chain, produced


def localize_batch_reads(model: onnx.ModelProto) -> int:
    """torch's dynamo exporter reads the batch size once, from the graph input, and carries it to the
    head: the input then stays alive across the whole network and no cut point exists. Each Shape
    that reads only the batch dimension moves, with the computation hanging on it, right before its
    first other consumer, and reads there the latest tensor with the same symbolic batch dimension."""
    shapes = tensor_shapes(model)
    constants = {t.name for t in model.graph.initializer}
    moved = 0
    for shape_node in [n for n in model.graph.node if reads_batch_only(n)]:
        batch = (shapes.get(shape_node.input[0]) or [None])[0]
        if not isinstance(batch, str) or batch == UNKNOWN:
            continue
        nodes = list(model.graph.node)
        chain, produced = shape_chain(shape_node, consumers(model), constants)
        in_chain = {id(n) for n in chain}
        users = [i for i, n in enumerate(nodes) if id(n) not in in_chain and any(t in produced for t in n.input)]
        if not users:
            continue
        first_use = min(users)
        candidates = [out for n in nodes[:first_use] if id(n) not in in_chain for out in n.output
                      if (shapes.get(out) or [None])[0] == batch]
        if not candidates or candidates[-1] == shape_node.input[0]:
            continue
        shape_node.input[0] = candidates[-1]
        rest = [n for n in nodes if id(n) not in in_chain]
        anchor = rest.index(nodes[first_use])
        del model.graph.node[:]
        model.graph.node.extend(rest[:anchor] + chain + rest[anchor:])
        moved += 1
    return moved


def name_nodes(model: onnx.ModelProto) -> None:
    """Give every node a unique, non-empty name: later stages address nodes by name."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        name = node.name or f"{node.op_type}_{i}"
        while name in seen:
            name = f"{name}_{i}"
        node.name = name
        seen.add(name)


def fold_batchnorms(model: onnx.ModelProto, weights: Weights) -> tuple[onnx.ModelProto, dict[str, BatchNormStats]]:
    """Fold every BatchNormalization whose only producer is a Conv with constant weights.

    The Conv takes over the BatchNormalization's output name, so the statistics stay addressable
    by a tensor name that simplification keeps.
    """
    inits = {t.name: t for t in model.graph.initializer}
    producer = {out: node for node in model.graph.node for out in node.output}
    users = consumers(model)
    graph_outputs = {o.name for o in model.graph.output}
    stats: dict[str, BatchNormStats] = {}
    removed: set[int] = set()
    for bn in model.graph.node:
        conv = producer.get(bn.input[0])
        if not is_foldable(bn, conv, inits, users, graph_outputs):
            continue
        bn_stats = read_bn_stats(bn, inits, weights)
        if np.any(bn_stats.var + bn_stats.epsilon <= 0):
            raise UserError(f"BatchNormalization {bn.name or bn.output[0]!r} has a running variance below "
                            f"-epsilon ({bn_stats.var.min():g}): its output is undefined")
        weight = tensor_value(inits[conv.input[1]], weights).astype(np.float32)
        bias = (
            tensor_value(inits[conv.input[2]], weights).astype(np.float32)
            if len(conv.input) > 2 and conv.input[2]
            else np.zeros(weight.shape[0], np.float32)
        )
        factor = bn_stats.scale / np.sqrt(bn_stats.var + bn_stats.epsilon)
        folded_weight = weight * factor.reshape(-1, *([1] * (weight.ndim - 1)))
        folded_bias = (bias - bn_stats.mean) * factor + bn_stats.bias
        base = conv.name or bn.output[0]
        weight_name, bias_name = f"{base}.folded_weight", f"{base}.folded_bias"
        add_initializer(model, weights, weight_name, folded_weight.astype(np.float32))
        add_initializer(model, weights, bias_name, folded_bias.astype(np.float32))
        del conv.input[1:]
        conv.input.extend([weight_name, bias_name])
        conv.output[0] = bn.output[0]
        stats[bn.output[0]] = bn_stats
        removed.add(id(bn))
    kept = [n for n in model.graph.node if id(n) not in removed]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return remove_unused_initializers(model), stats


def is_foldable(bn, conv, inits, users, graph_outputs) -> bool:
    return (
        bn.op_type == "BatchNormalization"
        and len([o for o in bn.output if o]) == 1
        and conv is not None
        and conv.op_type == "Conv"
        and len(users.get(conv.output[0], [])) == 1
        and conv.output[0] not in graph_outputs
        and conv.input[1] in inits
        and (len(conv.input) < 3 or not conv.input[2] or conv.input[2] in inits)
        and all(name in inits for name in bn.input[1:5])
        and not any(a.name == "training_mode" and a.i for a in bn.attribute)
    )


def read_bn_stats(bn: onnx.NodeProto, inits, weights: Weights) -> BatchNormStats:
    scale, bias, mean, var = (tensor_value(inits[n], weights).astype(np.float32) for n in bn.input[1:5])
    epsilon = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
    return BatchNormStats(mean=mean, var=var, scale=scale, bias=bias, epsilon=float(epsilon))


def remove_unused_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    used = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return model


def fold_constant_nodes(model: onnx.ModelProto, weights: Weights) -> onnx.ModelProto:
    """Constant nodes become initializers (paddle2onnx supplies weights this way)."""
    graph_outputs = {o.name for o in model.graph.output}
    kept = []
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] not in graph_outputs:
            add_initializer(model, weights, node.output[0], constant_node_value(node))
        else:
            kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return model


def constant_node_value(node: onnx.NodeProto) -> np.ndarray:
    if len(node.attribute) != 1:
        raise UserError(f"Constant node {node.name or node.output[0]!r} must have exactly one value attribute, "
                        f"it has {len(node.attribute)}")
    attr = node.attribute[0]
    content = onnx.helper.get_attribute_value(attr)
    if attr.name == "value":
        return numpy_helper.to_array(content)
    if attr.name in ("value_float", "value_floats"):
        return np.asarray(content, np.float32)
    if attr.name in ("value_int", "value_ints"):
        return np.asarray(content, np.int64)
    raise UserError(f"Constant node {node.name!r} uses unsupported attribute {attr.name!r}")


def remove_passthrough_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop Identity and inference-mode Dropout by rewiring their consumers to their input."""
    graph_outputs = {o.name for o in model.graph.output}
    rename: dict[str, str] = {}
    kept = []
    for node in model.graph.node:
        passthrough = node.op_type == "Identity" or (
            node.op_type == "Dropout" and (len(node.output) < 2 or not node.output[1])
        )
        if passthrough and node.output[0] not in graph_outputs:
            rename[node.output[0]] = rename.get(node.input[0], node.input[0])
        else:
            kept.append(node)
    for node in kept:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return remove_unused_initializers(model)
