"""Stage 5b, modcap: choose which adjacent units to reconstruct jointly (ModCap / MRECG).

Reconstruction loss oscillates from unit to unit where neighbouring modules differ in capacity.
Each block gets a capacity, adjacent blocks a differential |log c(k+1) - log c(k)|, and the k pairs
with the largest differentials are merged; a chain of chosen pairs becomes one group, of at most
three units. The stem and the head are never merged (the published schedules exclude them).

- data-free capacity: for each quantized weighted layer, parameter count x weight bits, times
  STRIDE_DISCOUNT for every halving of resolution the layer makes;
- data-dependent capacity: the squared output error of the unit, float unit on float input versus
  the initialised quantized unit on the quantized input, on a mini-batch (a larger error means
  less capacity; only the differential matters).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np
import onnx
import torch

from .mirror import NetworkMirror
from .graph import initializer_sizes, node_attributes
from .partition import Unit, make_unit
from .plan import QuantPlan
from .losses import unit_errors

STRIDE_DISCOUNT = 0.5
MAX_GROUP = 3
CAPACITY_BATCH = 64


@dataclass
class Schedule:
    """The capacities of the units, the differentials of adjacent blocks and the merged groups
    (lists of unit indices in order; every unit is in exactly one group)."""

    mode: str
    names: list[str]
    capacities: list[float | None]  # None: stem and head, which are not compared
    differentials: list[float | None]  # between unit i and i + 1
    groups: list[list[int]]

    def merged(self) -> list[list[str]]:
        return [[self.names[i] for i in group] for group in self.groups if len(group) > 1]

    def to_dict(self) -> dict:
        return {**asdict(self), "merged": self.merged()}

    def text(self) -> str:
        """The schedule in the notation of the MRECG code: groups numbered in order from the stem
        to the head, a merged group's number repeated once per unit inside parentheses."""
        return ", ".join(str(number) if len(group) == 1 else "(" + ", ".join([str(number)] * len(group)) + ")"
                         for number, group in enumerate(self.groups, start=1))


def default_pairs(units: list[Unit]) -> int:
    """About one merge per four blocks: 2 for ResNet-18's 8 blocks, 4 for ResNet-50's 16."""
    return max(1, round(len(comparable(units)) / 4))


def comparable(units: list[Unit]) -> list[int]:
    return [i for i, unit in enumerate(units) if unit.name not in ("stem", "head")]


def data_free_capacities(model: onnx.ModelProto, units: list[Unit], plan: QuantPlan) -> list[float | None]:
    sizes = initializer_sizes(model)
    nodes = {node.name: node for node in model.graph.node}
    bits = {w.node: w.bits for w in plan.weights}
    capacities: list[float | None] = [None] * len(units)
    for i in comparable(units):
        total = 0.0
        for layer in units[i].layers:
            if layer not in bits:
                continue
            node = nodes[layer]
            params = sum(sizes.get(name, 0) for name in node.input[1:])
            strides = node_attributes(node).get("strides", [1])
            total += params * bits[layer] * STRIDE_DISCOUNT ** math.log2(max(strides))
        capacities[i] = total or None
    return capacities


def data_capacities(mirror: NetworkMirror, inputs: np.ndarray, device: torch.device) -> list[float | None]:
    errors = unit_errors(mirror, inputs[:CAPACITY_BATCH], device)
    keep = set(comparable([unit.unit for unit in mirror.units]))
    return [error if i in keep and error > 0 else None for i, error in enumerate(errors)]


def choose_groups(mode: str, units: list[Unit], capacities: list[float | None], pairs: int) -> Schedule:
    differentials: list[float | None] = [
        abs(math.log(b) - math.log(a)) if a and b else None for a, b in zip(capacities, capacities[1:])]
    ranked = sorted((i for i, d in enumerate(differentials) if d is not None), key=lambda i: (-differentials[i], i))
    group_of = list(range(len(units)))  # each unit's group leader
    chosen = 0
    for i in ranked:
        if chosen == pairs:
            break
        merged = [u for u in range(len(units)) if group_of[u] in (group_of[i], group_of[i + 1])]
        if len(merged) > MAX_GROUP:
            continue
        for u in merged:
            group_of[u] = group_of[i]
        chosen += 1
    groups: list[list[int]] = []
    for u in range(len(units)):
        if groups and group_of[groups[-1][0]] == group_of[u]:
            groups[-1].append(u)
        else:
            groups.append([u])
    return Schedule(mode, [u.name for u in units], capacities, differentials, groups)


def merge_units(model: onnx.ModelProto, units: list[Unit], schedule: Schedule) -> list[Unit]:
    """One unit per group: the group's nodes in order, named like 'block3+block4'."""
    nodes = {node.name: node for node in model.graph.node}
    constants = {t.name for t in model.graph.initializer}
    merged = []
    for index, group in enumerate(schedule.groups):
        if len(group) == 1:
            merged.append(replace(units[group[0]], index=index))
            continue
        group_nodes = [nodes[name] for i in group for name in units[i].nodes]
        merged.append(make_unit(index, "+".join(units[i].name for i in group), group_nodes, model, constants,
                                group_size=len(group)))
    return merged


def total_variation(losses: list[float]) -> float:
    return sum(abs(b - a) for a, b in zip(losses, losses[1:]))


def oscillation(losses: list[float]) -> float:
    """Total variation of the loss sequence relative to its sum: 0 for a flat sequence; large when
    losses jump up and down from unit to unit."""
    total = sum(losses)
    return total_variation(losses) / total if total else 0.0

