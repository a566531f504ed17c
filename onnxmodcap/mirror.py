"""Stage 4, mirror: torch modules that execute the prepared ONNX graph, one module per unit.

Initializers become torch tensors keyed by their ONNX names: the weights and biases of weighted
layers are `nn.Parameter`s (later stages quantize and learn them), every other constant is a buffer.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import onnx
import torch
from torch import nn

from .errors import UserError
from .graph import is_weighted, model_opset, node_attributes, weight_input_index
from .ops import OPS, Call
from .partition import Unit
from .prepare import PreparedModel
from .quantizers import QuantizerSet
from .weights import tensor_value


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


def as_tuple(result) -> tuple:
    """An op's or a unit's result as a tuple, whether it gave one tensor or several."""
    return result if isinstance(result, tuple) else (result,)


def module_key(prefix: str, name: str, index: int) -> str:
    """A ModuleDict/ParameterDict-safe key that stays readable."""
    return f"{prefix}{index}_{re.sub(r'[^0-9A-Za-z_]', '_', name)[-40:]}"


class UnitMirror(nn.Module):
    """Executes one unit's ONNX nodes with torch ops on mirrored initializers.

    With quantizers attached, weights and biases are fake-quantized where they are read, and every
    planned activation tensor is fake-quantized once, where it is produced or enters the unit, so all
    of its quantized consumers see the same values, as in the exported graph. Layers kept in float
    read the float value (in the export they read the tensor before its QuantizeLinear), and a unit
    returns float outputs: the next unit quantizes them as they enter.
    """

    def __init__(self, unit: Unit, prepared: PreparedModel):
        super().__init__()
        model = prepared.model
        self.unit = unit
        opset = model_opset(model)
        by_name = {n.name: n for n in model.graph.node}
        nodes = [by_name[name] for name in unit.nodes]
        initializers = {t.name: t for t in model.graph.initializer}
        self.weights = nn.ParameterDict()
        self.keys: dict[str, str] = {}
        constants = set(initializers)
        learnable = {name for n in nodes if is_weighted(n, constants) for name in n.input[1:]}
        self.layer_weights = {n.name: n.input[weight_input_index(n, constants)]
                              for n in nodes if is_weighted(n, constants)}
        for name in dict.fromkeys(i for n in nodes for i in n.input if i in initializers):
            self.add_constant(name, tensor_value(initializers[name], prepared.weights), name in learnable)
        self.calls = [
            (Call(n.name, n.op_type, node_attributes(n), opset, len(n.output)), list(n.input), list(n.output))
            for n in nodes
        ]
        self.weight_quantizers = nn.ModuleDict()
        self.bias_quantizers = nn.ModuleDict()
        self.activation_quantizers = nn.ModuleDict()
        self.quantizer_keys: dict[str, str] = {}
        self.float_layers: set[str] = set()
        self.observer: Callable[[str, torch.Tensor], None] | None = None

    def add_constant(self, name: str, array: np.ndarray, learnable: bool) -> None:
        key = module_key("c", name, len(self.keys))
        # Shares memory with a writable array (PreparedModel.weights): nothing writes into a mirrored
        # constant, and a large model then holds its weights once, not twice.
        tensor = torch.from_numpy(np.require(array, requirements="W"))
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
        """Take the quantizers of the tensors this unit reads (weights, biases) or produces
        (replacing any attached before)."""
        produced = {out for _, _, outs in self.calls for out in outs} | set(self.unit.inputs)
        for modules in (self.weight_quantizers, self.bias_quantizers, self.activation_quantizers):
            modules.clear()
        self.quantizer_keys.clear()
        self.float_layers = {node for node, weight in self.layer_weights.items() if weight not in quantizers.weights}
        groups = ((self.weight_quantizers, quantizers.weights, self.keys),
                  (self.bias_quantizers, quantizers.biases, self.keys),
                  (self.activation_quantizers, quantizers.activations, produced))
        for modules, by_tensor, mine in groups:
            for tensor, quantizer in by_tensor.items():
                if tensor in mine:
                    key = module_key("q", tensor, len(self.quantizer_keys))
                    modules[key] = quantizer
                    self.quantizer_keys[tensor] = key

    def quantizer_modules(self) -> list[nn.Module]:
        return [*self.weight_quantizers.values(), *self.bias_quantizers.values(),
                *self.activation_quantizers.values()]

    @contextmanager
    def quantization(self, enabled: bool) -> Iterator[None]:
        """Inside the block every quantizer of the unit is on (the simulated quantized unit) or off
        (the float unit); afterwards each is as it was."""
        with switched(self.quantizer_modules(), "enabled", enabled):
            yield

    @contextmanager
    def observing(self, observer: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
        """Inside the block `observer(tensor_name, value)` sees every tensor the unit produces."""
        with switched([self], "observer", observer):
            yield

    def input_quantizers(self) -> list[nn.Module | None]:
        """The activation quantizer of each unit input, in order (None where the input is not quantized)."""
        keys = [self.quantizer_keys.get(name) for name in self.unit.inputs]
        return [self.activation_quantizers[key] if key in self.activation_quantizers else None for key in keys]

    def reads_float_value(self, name: str) -> bool:
        """Whether the unit reads tensor `name` unquantized too: a layer kept in float reads it, or
        the unit gives it out."""
        return name in self.unit.outputs or any(call.name in self.float_layers and name in input_names
                                                for call, input_names, _ in self.calls)

    def quantized_weights(self) -> list[tuple[torch.Tensor, nn.Module]]:
        """(weight, its quantizer) for every quantized weight this unit reads."""
        return [(self.constant(name), self.weight_quantizers[key]) for name, key in self.quantizer_keys.items()
                if key in self.weight_quantizers]

    def read_constant(self, name: str) -> torch.Tensor:
        value = self.constant(name)
        key = self.quantizer_keys.get(name)
        if key is None:  # the common case of a float network; skips the ModuleDict lookups
            return value
        if key in self.weight_quantizers:
            return self.weight_quantizers[key](value)
        if key in self.bias_quantizers:
            return self.bias_quantizers[key](value)
        return value

    def produce(self, name: str, value: torch.Tensor, floats: dict[str, torch.Tensor]) -> torch.Tensor:
        """The value consumers read; the float value of a quantized tensor is kept in `floats`."""
        if self.observer is not None:
            self.observer(name, value)
        key = self.quantizer_keys.get(name)
        if key is None or key not in self.activation_quantizers:
            return value
        floats[name] = value
        return self.activation_quantizers[key](value)

    def forward(self, *inputs: torch.Tensor):
        floats: dict[str, torch.Tensor] = {}
        env = {name: self.produce(name, value, floats) for name, value in zip(self.unit.inputs, inputs)}
        for call, input_names, output_names in self.calls:
            source = floats if call.name in self.float_layers else {}
            args = [None if not n else source[n] if n in source else env[n] if n in env else self.read_constant(n)
                    for n in input_names]
            results = as_tuple(OPS[call.op_type](call, *args))
            env.update((name, self.produce(name, value, floats)) for name, value in zip(output_names, results))
        outputs = tuple(floats.get(name, env[name]) for name in self.unit.outputs)
        return outputs[0] if len(outputs) == 1 else outputs


class NetworkMirror(nn.Module):
    """The whole prepared graph as a sequence of unit mirrors."""

    def __init__(self, prepared: PreparedModel, units: list[Unit]):
        super().__init__()
        model = prepared.model
        check_supported(model)
        constants = {t.name for t in model.graph.initializer}
        self.input_names = [i.name for i in model.graph.input if i.name not in constants]
        self.output_names = [o.name for o in model.graph.output]
        self.units = nn.ModuleList(UnitMirror(unit, prepared) for unit in units)
        # what must stay alive after each unit: the later units' inputs and the graph outputs
        self.needed_after = [{name for later in units[index + 1:] for name in later.inputs} | set(self.output_names)
                             for index in range(len(units))]

    def live_after(self, index: int, env: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`env` without the tensors that no unit after unit `index` reads and no graph output is."""
        return {name: value for name, value in env.items() if name in self.needed_after[index]}

    def attach(self, quantizers: QuantizerSet) -> None:
        for unit in self.units:
            unit.attach(quantizers)

    def constants(self) -> dict[str, torch.Tensor]:
        """Every mirrored initializer, by its name in the ONNX graph."""
        return {name: unit.constant(name) for unit in self.units for name in unit.keys}

    def outputs(self, images: torch.Tensor, device: torch.device, batch_size: int = 64) -> list[np.ndarray]:
        """Every graph output on `images`, a batch at a time, without gradients."""
        batches = []
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                batches.append([o.cpu().numpy() for o in self(images[start:start + batch_size].to(device))])
        return [np.concatenate(outputs) for outputs in zip(*batches)]

    @contextmanager
    def quantization(self, enabled: bool) -> Iterator[None]:
        """Inside the block every quantizer is on (the simulated quantized model) or off (the float
        model); afterwards each is as it was."""
        with switched([q for unit in self.units for q in unit.quantizer_modules()], "enabled", enabled):
            yield

    @contextmanager
    def observing(self, observer: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
        """Inside the block `observer(tensor_name, value)` sees every tensor the units produce."""
        with switched(list(self.units), "observer", observer):
            yield

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        env = dict(zip(self.input_names, inputs))
        for index, mirror in enumerate(self.units):
            env.update(zip(mirror.unit.outputs, as_tuple(mirror(*(env[name] for name in mirror.unit.inputs)))))
            env = self.live_after(index, env)
        return tuple(env[name] for name in self.output_names)


@contextmanager
def switched(objects: list, attribute: str, value) -> Iterator[None]:
    """`attribute` set to `value` on every object inside the block, and each object's own value
    restored afterwards, also when the block fails."""
    saved = [getattr(obj, attribute) for obj in objects]
    for obj in objects:
        setattr(obj, attribute, value)
    try:
        yield
    finally:
        for obj, previous in zip(objects, saved):
            setattr(obj, attribute, previous)
