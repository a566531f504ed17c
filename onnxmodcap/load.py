"""Reading an ONNX file safely: parse it, refuse external data outside the model's folder and
custom-domain ops, run the checker, and read the weights with large ones kept outside the
ModelProto (a `Weights` dict, see weights.py), so that models over 2 GB load too. The file is only
ever read."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from .errors import UserError, first_line
from .weights import Weights, detach_large

STANDARD_DOMAINS = ("", "ai.onnx")


@dataclass
class LoadedModel:
    """A checked model as read from disk."""

    model: onnx.ModelProto  # large initializers are stubs: their values are in `weights`
    weights: Weights
    data_files: list[Path]  # the external-data files it names


def load_model(path: Path) -> LoadedModel:
    """Parse, validate external data locations, run the checker and read the weights. Nothing here
    holds the whole model as one protobuf, so models over 2 GB load too."""
    if not path.exists():
        raise UserError(f"model file not found: {path}")
    if not path.is_file():
        raise UserError(f"model path is not a file: {path}")
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError) as err:
        raise UserError(f"not an ONNX model (cannot parse protobuf): {path}") from err
    if not model.HasField("graph") or not model.graph.node:
        raise UserError(f"not an ONNX model (no graph nodes): {path}")
    data_files = check_external_data_paths(model, path.parent)
    check_ops_known(model, path)
    try:
        onnx.checker.check_model(str(path))  # from the file: a ModelProto over 2 GB cannot be passed
    except onnx.checker.ValidationError as err:
        raise UserError(f"invalid ONNX model {path}: {first_line(err)}") from err
    except UnicodeDecodeError as err:  # the checker's message quotes a name that is not UTF-8
        raise UserError(f"invalid ONNX model {path}: a name or string is not valid UTF-8") from err
    # Loading in place copies nothing, so it works above 2 GB; the large values then leave the graph.
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
    except ValueError as err:  # an offset or length beyond the end of the file
        raise UserError(f"invalid ONNX model {path}: {first_line(err)}") from None
    weights: Weights = {}
    decode = partial(decode_tensor, path=path)
    detach_large(model, weights, decode)
    initializers = {t.name for t in model.graph.initializer}
    for tensor in all_tensors(model):
        if tensor.name not in initializers:  # detach_large decoded those
            decode(tensor)
    return LoadedModel(model, weights, data_files)


def decode_tensor(tensor: onnx.TensorProto, path: Path) -> np.ndarray:
    """The checker accepts tensors with an unknown data type or a data size that does not match
    their shape; later stages would fail on them with no hint of which tensor is broken."""
    try:
        return numpy_helper.to_array(tensor)
    except Exception as err:  # onnx raises KeyError, ValueError or TypeError depending on the defect
        raise UserError(f"invalid ONNX model {path}: tensor {tensor.name!r} cannot be decoded "
                        f"({type(err).__name__}: {first_line(err)})") from None


def source_digest(files: list[Path]) -> str:
    """What a checkpoint must match: the model file and its external-data files."""
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as stream:
            while chunk := stream.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def all_tensors(model: onnx.ModelProto):
    """Every TensorProto that can carry external data: initializers and tensor attributes."""
    yield from graph_tensors(model.graph)


def graph_tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from graph_tensors(attr.g)
            for subgraph in attr.graphs:
                yield from graph_tensors(subgraph)


def check_external_data_paths(model: onnx.ModelProto, model_dir: Path) -> list[Path]:
    """Refuse external-data locations that are absolute or resolve outside the model's folder;
    return the files named, in a fixed order."""
    root = model_dir.resolve()
    files = set()
    for tensor in all_tensors(model):
        if not onnx.external_data_helper.uses_external_data(tensor):
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (root / location).resolve()
        if Path(location).is_absolute() or not target.is_relative_to(root):
            raise UserError(
                f"external data of tensor {tensor.name!r} points outside the model folder: {location}"
            )
        if not target.is_file():
            raise UserError(f"external data file of tensor {tensor.name!r} not found: {location}")
        files.add(model_dir / location)
    return sorted(files)


def check_ops_known(model: onnx.ModelProto, path: Path) -> None:
    """Custom-domain ops cannot be checked, simplified or mirrored: name them all at once."""
    custom = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain not in STANDARD_DOMAINS})
    if custom:
        raise UserError(f"custom-domain ops are not supported in {path}: {', '.join(custom)}")
