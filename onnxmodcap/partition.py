"""Stage 2, partition: cut the prepared graph into reconstruction units.

A cut point is a position in the node order where exactly one tensor is alive: everything before
it reaches everything after it through that tensor alone. The nodes between two cut points form a
segment. Residual, concat and other multi-path structures (ResNet blocks, inverted residuals with
a skip, inception, dense blocks) are single segments; plain chains are one segment per node.
Segments are then grouped into units:

- the stem is the first weighted layer with what follows it up to the next weighted layer;
- the head is the last weighted layer with everything after it, plus the activation-free nodes
  (pooling, flatten) right before it;
- in between, a unit closes after a multi-path segment with weighted layers (a block), or after a
  weighted layer with no activation before the next weighted layer (a linear bottleneck output,
  as in MobileNetV2); a gating segment ending in Mul (squeeze-excite) stays inside its block;
- nodes without weights join the unit before them; chains of more than three weighted layers
  that nothing closes are cut into units of two.

Detectors and text recognisers hold several tensors alive over long stretches (an FPN keeps each
backbone stage's output until the neck reads it), so single-tensor cut points can be dozens of
layers apart. A segment with more than MAX_UNIT_LAYERS weighted layers is therefore cut again
where one tensor is alive besides those carried on: tensors whose next use lies beyond the next
two weighted layers, which the unit after the cut reads from earlier units (it then has several
inputs, the one before it several outputs). A group with more than MAX_UNIT_LAYERS weighted layers
that nothing closes (a backbone of plain and squeeze-excite layers) is cut into units of two
weighted segments, never in front of a squeeze-excite gate.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import onnx

from .graph import is_weighted, weight_input_index

ACTIVATION_OPS = {
    "Relu", "Clip", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Erf",
    "Gelu", "Elu", "Selu", "Softplus", "Mish", "Max", "Min",
}
CHAIN_SPLIT_ABOVE = 3
CHAIN_PIECE = 2
MAX_UNIT_LAYERS = 6  # more weighted layers than this in one segment or group: cut it again
CARRIED_AFTER_LAYERS = 2  # a tensor next used beyond this many more weighted layers is carried past a cut
MAX_CUT_TENSORS = 4  # at most this many tensors cross a cut inside a large segment


@dataclass
class Unit:
    """A reconstruction unit: a contiguous run of nodes between single-tensor cut points."""

    index: int
    name: str
    nodes: list[str]
    inputs: list[str]
    outputs: list[str]
    layers: list[str]
    group_size: int = 1  # partition units reconstructed together in this one (a ModCap group)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Segment:
    nodes: list[onnx.NodeProto]
    layers: int  # weighted layers
    branching: bool
    has_activation: bool

    @property
    def weighted(self) -> bool:
        return self.layers > 0

    @property
    def is_block(self) -> bool:
        return self.weighted and self.branching and self.nodes[-1].op_type != "Mul"

    @property
    def is_single_layer(self) -> bool:
        return self.weighted and not self.branching

    @property
    def is_gate(self) -> bool:
        """A squeeze-excite branch and the Mul that applies it: it belongs to the layers before it."""
        return self.weighted and self.branching and self.nodes[-1].op_type == "Mul"


def float_layers(model: onnx.ModelProto, quantized_weights) -> set[str]:
    """Weighted nodes whose weight is not quantized: they read their inputs in float."""
    constants = {t.name for t in model.graph.initializer}
    return {n.name for n in model.graph.node
            if is_weighted(n, constants) and n.input[weight_input_index(n, constants)] not in quantized_weights}


def partition(model: onnx.ModelProto) -> list[Unit]:
    constants = {t.name for t in model.graph.initializer}
    segments = split_at_cut_points(model, constants)
    groups = group_segments(segments)
    return [make_unit(i, name, nodes, model, constants) for i, (name, nodes) in enumerate(groups)]


def split_at_cut_points(model: onnx.ModelProto, constants: set[str]) -> list[Segment]:
    nodes = list(model.graph.node)
    lifetimes = Lifetimes(model, constants)
    alive = {name for name, at in lifetimes.produced.items() if at < 0 and name in lifetimes.last_use}
    segments, start = [], 0
    for i, node in enumerate(nodes):
        alive |= {out for out in node.output if out and lifetimes.last_use.get(out, -1) > i}
        alive -= {name for name in node.input if lifetimes.last_use.get(name) == i}
        if len(alive) == 1 and i < len(nodes) - 1:
            segments.append(make_segment(nodes[start:i + 1], constants))
            start = i + 1
    segments.append(make_segment(nodes[start:], constants))
    return [piece for segment in segments for piece in split_large_segment(segment, nodes, lifetimes, constants)]


class Lifetimes:
    """Where each tensor is produced and used, in node order (graph outputs: used at the end)."""

    def __init__(self, model: onnx.ModelProto, constants: set[str]):
        nodes = list(model.graph.node)
        self.produced = {i.name: -1 for i in model.graph.input if i.name not in constants}
        self.uses: dict[str, list[int]] = {}
        for i, node in enumerate(nodes):
            self.produced.update({out: i for out in node.output if out})
            for name in node.input:
                if name and name not in constants:
                    self.uses.setdefault(name, []).append(i)
        for output in model.graph.output:
            self.uses.setdefault(output.name, []).append(len(nodes))
        self.last_use = {name: uses[-1] for name, uses in self.uses.items()}
        self.weighted = [i for i, node in enumerate(nodes) if is_weighted(node, constants)]

    def alive_after(self, i: int) -> set[str]:
        return {name for name, at in self.produced.items() if at <= i < self.last_use.get(name, -1)}

    def carried(self, alive: set[str], i: int) -> set[str]:
        """Those of `alive` (the tensors alive after node i) whose next use lies beyond the next
        CARRIED_AFTER_LAYERS weighted layers."""
        later = [k for k in self.weighted if k > i]
        horizon = later[CARRIED_AFTER_LAYERS - 1] if len(later) >= CARRIED_AFTER_LAYERS else math.inf
        return {name for name in alive if min(k for k in self.uses[name] if k > i) > horizon}


def split_large_segment(segment: Segment, nodes: list[onnx.NodeProto], lifetimes: Lifetimes,
                        constants: set[str]) -> list[Segment]:
    """A segment with more than MAX_UNIT_LAYERS weighted layers, cut where one tensor is alive
    besides those carried on (at most MAX_CUT_TENSORS in all)."""
    if segment.layers <= MAX_UNIT_LAYERS:
        return [segment]
    first = next(i for i, node in enumerate(nodes) if node is segment.nodes[0])
    pieces, start = [], 0
    for offset in range(len(segment.nodes) - 1):
        alive = lifetimes.alive_after(first + offset)
        if len(alive) <= MAX_CUT_TENSORS and len(alive - lifetimes.carried(alive, first + offset)) == 1:
            pieces.append(make_segment(segment.nodes[start:offset + 1], constants))
            start = offset + 1
    pieces.append(make_segment(segment.nodes[start:], constants))
    return pieces


def make_segment(nodes: list[onnx.NodeProto], constants: set[str]) -> Segment:
    uses: dict[str, int] = {}
    for node in nodes:
        for name in set(node.input):
            if name and name not in constants:
                uses[name] = uses.get(name, 0) + 1
    return Segment(
        nodes=nodes,
        layers=sum(is_weighted(n, constants) for n in nodes),
        branching=any(count > 1 for count in uses.values()),
        has_activation=any(n.op_type in ACTIVATION_OPS for n in nodes),
    )


def group_segments(segments: list[Segment]) -> list[tuple[str, list[onnx.NodeProto]]]:
    weighted = [i for i, s in enumerate(segments) if s.weighted]
    if not weighted:
        return [("graph", [n for s in segments for n in s.nodes])]
    first, last = weighted[0], weighted[-1]
    head_start = last
    if segments[last].is_single_layer:
        while head_start - 1 > first and not segments[head_start - 1].weighted \
                and not segments[head_start - 1].has_activation:
            head_start -= 1
    else:
        head_start = len(segments)
    stem_end = first + 1
    if segments[first].is_single_layer and first != last:
        while stem_end < head_start and not segments[stem_end].weighted:
            stem_end += 1
    else:
        stem_end = 0

    closes = [s.is_block or (s.is_single_layer and is_linear_output(segments, i, head_start))
              for i, s in enumerate(segments)]
    groups: list[list[int]] = [list(range(stem_end))] if stem_end else []
    current: list[int] = []
    for i in range(stem_end, head_start):
        if segments[i].weighted and current and closes[last_weighted(segments, current)]:
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    if head_start < len(segments):
        groups.append(list(range(head_start, len(segments))))
    groups = merge_weightless(groups, segments)
    groups = [piece for group in groups for piece in split_long_chain(group, segments)]
    return [(unit_name(k, len(groups), stem_end > 0, head_start < len(segments)),
             [n for i in group for n in segments[i].nodes]) for k, group in enumerate(groups)]


def last_weighted(segments: list[Segment], group: list[int]) -> int:
    return next((i for i in reversed(group) if segments[i].weighted), group[-1])


def merge_weightless(groups: list[list[int]], segments: list[Segment]) -> list[list[int]]:
    """A group without weighted layers joins the next group (the last one joins the previous)."""
    merged: list[list[int]] = []
    pending: list[int] = []
    for group in groups:
        if any(segments[i].weighted for i in group):
            merged.append(pending + group)
            pending = []
        else:
            pending += group
    if pending:
        if merged:
            merged[-1] += pending
        else:
            merged.append(pending)
    return merged


def is_linear_output(segments: list[Segment], i: int, end: int) -> bool:
    """True when no activation follows segment i before the next weighted segment."""
    for segment in segments[i + 1:end]:
        if segment.weighted:
            return segment.nodes[0].op_type not in ACTIVATION_OPS
        if segment.has_activation:
            return False
    return True


def split_long_chain(group: list[int], segments: list[Segment]) -> list[list[int]]:
    """A chain of more than CHAIN_SPLIT_ABOVE single layers, or a group of more than MAX_UNIT_LAYERS
    weighted layers, in pieces of CHAIN_PIECE weighted segments; a gate stays with the layers before it."""
    weighted = [i for i in group if segments[i].weighted]
    branching = any(segments[i].branching for i in weighted)
    if len(weighted) <= CHAIN_SPLIT_ABOVE or (branching and sum(segments[i].layers for i in group) <= MAX_UNIT_LAYERS):
        return [group]
    pieces: list[list[int]] = [[]]
    count = 0
    for i in group:
        starts_layer = segments[i].weighted and not segments[i].is_gate
        if starts_layer and count == CHAIN_PIECE:
            pieces.append([])
            count = 0
        pieces[-1].append(i)
        count += starts_layer
    return pieces


def unit_name(k: int, count: int, has_stem: bool, has_head: bool) -> str:
    if has_stem and k == 0:
        return "stem"
    if has_head and k == count - 1:
        return "head"
    return f"block{k if has_stem else k + 1}"


def make_unit(index: int, name: str, nodes: list[onnx.NodeProto], model: onnx.ModelProto,
              constants: set[str], group_size: int = 1) -> Unit:
    produced = {out for n in nodes for out in n.output if out}
    inside = {n.name for n in nodes}
    used_after = {o.name for o in model.graph.output}
    for node in model.graph.node:
        if node.name not in inside:
            used_after.update(node.input)
    inputs: list[str] = []
    for node in nodes:
        for name_ in node.input:
            if name_ and name_ not in constants and name_ not in produced and name_ not in inputs:
                inputs.append(name_)
    outputs = [out for n in nodes for out in n.output if out and out in used_after]
    return Unit(
        index=index,
        name=name,
        nodes=[n.name for n in nodes],
        inputs=inputs,
        outputs=outputs,
        layers=[n.name for n in nodes if is_weighted(n, constants)],
        group_size=group_size,
    )
