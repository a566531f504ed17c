"""Stage 4, mirror: torch modules that execute the prepared ONNX graph, one module per unit.

Initializers become torch tensors keyed by their ONNX names: the weights and biases of weighted
layers are `nn.Parameter`s (later stages quantize and learn them), every other constant is a buffer.
"""

from __future__ import annotations

import re
from typing import Callable

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from .errors import UserError
from .ops import OPS, Call, node_attributes
from .partition import Unit, is_weighted
from .quantizers import QuantizerSet


def default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def unsupported_ops(model: onnx.ModelProto) -> dict[str, str]:
    """Op types the mirror cannot execute, each with the name of one node that uses it."""
    missing: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type not in OPS or node.domain not in ("", "ai.onnx"):
            missing.setdefault(node.op_type, node.name)
    return missing


def unsupported_message(missing: dict[str, str]) -> str:
    listed = ", ".join(f"{op} (node {name!r})" for op, name in sorted(missing.items()))
    return f"unsupported ops: {listed}"


def check_supported(model: onnx.ModelProto) -> None:
    missing = unsupported_ops(model)
    if missing:
        raise UserError(unsupported_message(missing))


def module_key(prefix: str, name: str, index: int) -> str:
    """A ModuleDict/ParameterDict-safe key that stays readable."""
    return f"{prefix}{index}_{re.sub(r'[^0-9A-Za-z_]', '_', name)[-40:]}"


class UnitMirror(nn.Module):
    """Executes one unit's ONNX nodes with torch ops on mirrored initializers.

    With quantizers attached, weights and biases are fake-quantized where they are read, and every
    planned activation tensor is fake-quantized once, where it is produced (or, for a graph input,
    where it enters), so all of its consumers see the same quantized values, as in the exported graph.
    """

    def __init__(self, unit: Unit, model: onnx.ModelProto, graph_inputs: set[str]):
        super().__init__()
        self.unit = unit
        self.graph_inputs = graph_inputs & set(unit.inputs)
        opset = default_opset(model)
        by_name = {n.name: n for n in model.graph.node}
        nodes = [by_name[name] for name in unit.nodes]
        initializers = {t.name: t for t in model.graph.initializer}
        self.weights = nn.ParameterDict()
        self.keys: dict[str, str] = {}
        learnable = {name for n in nodes if is_weighted(n, set(initializers)) for name in n.input[1:]}
        for name in dict.fromkeys(i for n in nodes for i in n.input if i in initializers):
            self.add_constant(name, numpy_helper.to_array(initializers[name]), name in learnable)
        self.calls = [
            (Call(n.name, n.op_type, node_attributes(n), opset, len(n.output)), list(n.input), list(n.output))
            for n in nodes
        ]
        self.weight_quantizers = nn.ModuleDict()
        self.bias_quantizers = nn.ModuleDict()
        self.activation_quantizers = nn.ModuleDict()
        self.quantizer_keys: dict[str, str] = {}
        self.observer: Callable[[str, torch.Tensor], None] | None = None

    def add_constant(self, name: str, array: np.ndarray, learnable: bool) -> None:
        key = module_key("c", name, len(self.keys))
        tensor = torch.from_numpy(np.array(array, copy=True))
        if learnable:
            self.weights[key] = nn.Parameter(tensor, requires_grad=False)
        else:
            self.register_buffer(key, tensor)
        self.keys[name] = key

    def constant(self, name: str) -> torch.Tensor:
        """The mirrored initializer called `name` in the ONNX graph."""
        key = self.keys[name]
        return self.weights[key] if key in self.weights else getattr(self, key)

    def attach(self, quantizers: QuantizerSet) -> None:
        """Take the quantizers of the tensors this unit reads (weights, biases) or produces."""
        produced = {out for _, _, outs in self.calls for out in outs} | self.graph_inputs
        groups = ((self.weight_quantizers, quantizers.weights, self.keys),
                  (self.bias_quantizers, quantizers.biases, self.keys),
                  (self.activation_quantizers, quantizers.activations, produced))
        for modules, by_tensor, mine in groups:
            for tensor, quantizer in by_tensor.items():
                if tensor in mine:
                    key = module_key("q", tensor, len(self.quantizer_keys))
                    modules[key] = quantizer
                    self.quantizer_keys[tensor] = key

    def read_constant(self, name: str) -> torch.Tensor:
        value = self.constant(name)
        key = self.quantizer_keys.get(name)
        if key in self.weight_quantizers:
            return self.weight_quantizers[key](value)
        if key in self.bias_quantizers:
            return self.bias_quantizers[key](value)
        return value

    def produce(self, name: str, value: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer(name, value)
        key = self.quantizer_keys.get(name)
        return self.activation_quantizers[key](value) if key in self.activation_quantizers else value

    def forward(self, *inputs: torch.Tensor):
        env = {name: self.produce(name, value) if name in self.graph_inputs else value
               for name, value in zip(self.unit.inputs, inputs)}
        for call, input_names, output_names in self.calls:
            args = [None if not n else env[n] if n in env else self.read_constant(n) for n in input_names]
            result = OPS[call.op_type](call, *args)
            results = result if isinstance(result, tuple) else (result,)
            env.update((name, self.produce(name, value)) for name, value in zip(output_names, results))
        outputs = tuple(env[name] for name in self.unit.outputs)
        return outputs[0] if len(outputs) == 1 else outputs


class NetworkMirror(nn.Module):
    """The whole prepared graph as a sequence of unit mirrors."""

    def __init__(self, model: onnx.ModelProto, units: list[Unit]):
        super().__init__()
        check_supported(model)
        constants = {t.name for t in model.graph.initializer}
        self.input_names = [i.name for i in model.graph.input if i.name not in constants]
        self.output_names = [o.name for o in model.graph.output]
        self.units = nn.ModuleList(UnitMirror(unit, model, set(self.input_names)) for unit in units)

    def attach(self, quantizers: QuantizerSet) -> None:
        for unit in self.units:
            unit.attach(quantizers)

    def observe(self, observer: Callable[[str, torch.Tensor], None] | None) -> None:
        """Call `observer(tensor_name, value)` for every tensor the units produce (None: stop)."""
        for unit in self.units:
            unit.observer = observer

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        env = dict(zip(self.input_names, inputs))
        for mirror in self.units:
            result = mirror(*(env[name] for name in mirror.unit.inputs))
            results = result if isinstance(result, tuple) else (result,)
            env.update(zip(mirror.unit.outputs, results))
        return tuple(env[name] for name in self.output_names)
