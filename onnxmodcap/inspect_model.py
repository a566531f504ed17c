"""`onnxmodcap inspect`: the units of a model, and optionally the mirror's parity with ONNX Runtime."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import onnx
import torch

from .errors import UserError, first_line
from .mirror import NetworkMirror, unsupported_ops
from .modcap import Schedule, choose_groups, data_free_capacities, default_pairs
from .partition import Unit, partition
from .config import check_at_least_one, check_bits
from .plan import PlanOptions, make_plan
from .prepare import PreparedModel, prepare
from .preprocess import given_input_size, missing_input_size
from .runtime import create_session, session_provider
from .graph import dims, dynamic_image_axes, image_inputs, initializer_sizes, tensor_shapes

VERIFY_BATCH = 2


@dataclass
class Inspection:
    prepared: PreparedModel
    units: list[Unit]
    unsupported: dict[str, str]
    mirror_max_rel_err: float | None = None
    provider: str | None = None
    schedule: Schedule | None = None

    def to_dict(self) -> dict:
        shapes = tensor_shapes(self.prepared.model)
        sizes = initializer_sizes(self.prepared.model)
        modules = []
        for unit in self.units:
            entry = unit.to_dict()
            entry["params"] = unit_parameter_count(unit, self.prepared.model, sizes)
            entry["input_shapes"] = [shapes.get(name) for name in unit.inputs]
            entry["output_shapes"] = [shapes.get(name) for name in unit.outputs]
            modules.append(entry)
        result = {
            "model": str(self.prepared.source),
            "modules": modules,
            "unsupported_ops": sorted(self.unsupported),
            "notes": self.prepared.notes,
        }
        if self.schedule is not None:
            result["modcap"] = {**self.schedule.to_dict(), "schedule": self.schedule.text()}
        if self.mirror_max_rel_err is not None:
            result["mirror_max_rel_err"] = self.mirror_max_rel_err
            result["provider"] = self.provider
        return result


def inspect_model(path: str | os.PathLike, verify: bool = False, seed: int = 0, modcap: str = "off",
                  modcap_k: int | None = None, bits: int = 4, input_size: str | None = None) -> Inspection:
    """`input_size` (N or HxW, as --input-size) is needed where the model's image size is dynamic."""
    prepared = prepare(path, flags={"input_size": input_size})
    size = given_input_size(prepared.model, {"input_size": input_size})
    input_dims = dims(image_inputs(prepared.model)[0])
    if size is None and dynamic_image_axes(input_dims):
        raise missing_input_size(input_dims)
    units = partition(prepared.model)
    inspection = Inspection(prepared, units, unsupported_ops(prepared.model))
    if verify and not inspection.unsupported:
        inspection.mirror_max_rel_err, inspection.provider = verify_mirror(prepared, units, seed, size)
    if modcap == "free":
        inspection.schedule = data_free_schedule(prepared, units, modcap_k, bits)
    return inspection


def data_free_schedule(prepared: PreparedModel, units: list[Unit], pairs: int | None, bits: int) -> Schedule:
    """The schedule `quantize --modcap free --bits BITS` uses (first and last layers at 8 bits)."""
    check_bits(bits, "--bits")
    check_at_least_one("modcap_k", pairs)
    plan = make_plan(prepared.model, PlanOptions(wbits=bits, abits=bits))
    capacities = data_free_capacities(prepared.model, units, plan)
    return choose_groups("free", units, capacities, pairs or default_pairs(units))


def verify_mirror(prepared: PreparedModel, units: list[Unit], seed: int,
                  input_size: tuple[int, int] | None) -> tuple[float, str]:
    """Run ORT on the original file and the mirror on the prepared graph with the same inputs."""
    mirror = NetworkMirror(prepared, units).eval()
    session = create_session(str(prepared.source))
    rng = np.random.default_rng(seed)
    feeds = {i.name: random_input(i, rng, input_size) for i in session.get_inputs()}
    try:
        expected = session.run(None, feeds)
    except Exception as err:  # onnxruntime raises its own exception types per failure kind
        shapes = ", ".join(str(list(feed.shape)) for feed in feeds.values())
        raise UserError(f"the model does not run on input {shapes}: {first_line(err)}") from None
    with torch.no_grad():
        actual = mirror(*(torch.from_numpy(feeds[name]) for name in mirror.input_names))
    return max_relative_error(actual, expected), session_provider(session)


def random_input(arg, rng: np.random.Generator, input_size: tuple[int, int] | None) -> np.ndarray:
    """A random input for `arg`: VERIFY_BATCH images where the batch is dynamic, the image size
    `input_size` where it is."""
    if arg.type != "tensor(float)":
        raise UserError(f"graph input {arg.name!r} has type {arg.type}; only float inputs are supported")
    sizes = iter(input_size or ())
    dims = []
    for axis, dim in enumerate(arg.shape):
        if isinstance(dim, int) and dim > 0:
            dims.append(dim)
        elif axis == 0:
            dims.append(VERIFY_BATCH)
        else:
            dims.append(next(sizes))
    return rng.standard_normal(dims).astype(np.float32)


def max_relative_error(actual, expected) -> float:
    worst = 0.0
    for torch_out, ort_out in zip(actual, expected):
        scale = float(np.abs(ort_out).max()) or 1.0
        worst = max(worst, float(np.abs(torch_out.numpy() - ort_out).max()) / scale)
    return worst


def unit_parameter_count(unit: Unit, model: onnx.ModelProto, sizes: dict[str, int]) -> int:
    layers = set(unit.layers)
    return sum(sizes.get(name, 0) for node in model.graph.node if node.name in layers for name in node.input[1:])


def format_table(report: dict) -> str:
    rows = [("#", "unit", "layers", "params", "inputs", "outputs")]
    for i, module in enumerate(report["modules"]):
        rows.append((str(i), module["name"], str(len(module["layers"])), f"{module['params']:,}",
                     " ".join(shape_text(s) for s in module["input_shapes"]),
                     " ".join(shape_text(s) for s in module["output_shapes"])))
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines += [f"note: {note}" for note in report["notes"]]
    if report["unsupported_ops"]:
        lines.append(f"unsupported ops: {', '.join(report['unsupported_ops'])}")
    if "modcap" in report:
        lines += modcap_lines(report["modcap"])
    if "mirror_max_rel_err" in report:
        lines.append(f"mirror_max_rel_err: {report['mirror_max_rel_err']:.3g} "
                     f"(ONNX Runtime provider: {report['provider']})")
    return "\n".join(lines)


def modcap_lines(schedule: dict) -> list[str]:
    rows = [("unit", "capacity", "differential to next")]
    for name, capacity, differential in zip(schedule["names"], schedule["capacities"],
                                            [*schedule["differentials"], None]):
        rows.append((name, "-" if capacity is None else f"{capacity:.4g}",
                     "-" if differential is None else f"{differential:.3f}"))
    widths = [max(len(row[c]) for row in rows) for c in range(3)]
    lines = ["", f"ModCap ({schedule['mode']}): capacities and adjacent differentials |log c(k+1) - log c(k)|"]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    merged = ", ".join("+".join(group) for group in schedule["merged"]) or "none"
    lines += [f"reconstructed jointly: {merged}", f"schedule (units from stem to head): {schedule['schedule']}"]
    return lines


def shape_text(shape) -> str:
    return "?" if shape is None else "x".join(str(d) for d in shape)
