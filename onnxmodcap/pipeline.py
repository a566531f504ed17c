"""The whole job, `onnxmodcap quantize`, as one function: each pipeline stage in order.

model.onnx -> prepare -> partition -> plan -> mirror -> calibrate -> (reconstruct) -> export -> validate
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from .calibrate import CalibrationData, build_quantizers, collect_activation_stats, load_calibration
from .checkpoint import Checkpointer, run_fingerprint
from .errors import Interrupted, UserError
from .export import FORMATS, export_qdq
from .mirror import NetworkMirror
from .partition import Unit, partition
from .plan import PlanOptions, QuantPlan, make_plan, read_overrides
from .plot import plot_unit_losses
from .prepare import PreparedModel, prepare
from .preprocess import Preprocessing, preprocessing_for_onnx
from .quantizers import INIT_METHODS, QuantizerSet
from .reconstruct import METHODS as RECONSTRUCTION_METHODS
from .reconstruct import PRESETS, ReconstructionSettings, reconstruct, results_to_dicts
from .validate import Validation, require_parity, validate

METHODS = ("rtn", *RECONSTRUCTION_METHODS)


@dataclass(frozen=True)
class QuantizeConfig:
    """Every option of `onnxmodcap quantize`; the CLI flags map one to one onto these fields."""

    output: str | None = None
    bits: int | None = 4
    wbits: int | None = None
    abits: int | None = None
    method: str = "rtn"
    preset: str = "paper"  # reconstruction settings: "paper" (published defaults) or "fast"
    iters: int | None = None  # reconstruction iterations per unit (overrides the preset)
    work_dir: str | None = None  # checkpoints; default .<output name>.work beside the output
    cache_mem: float = 4.0  # GiB of cached unit inputs/outputs kept in memory; the rest spills to work_dir
    resume: bool = False
    init: str = "lp"
    target: str = "ort"
    format: str = "qdq"
    keep_ends: bool = True
    exclude: tuple[str, ...] = ()
    overrides: str | None = None
    num_calib: int | None = None
    batch_size: int = 32
    report: str | None = None
    device: str = "cpu"
    provider: str = "auto"
    seed: int = 0
    preprocess: dict = field(default_factory=dict)  # input_size, resize, mean, std, scale, color, layout

    @property
    def weight_bits(self) -> int:
        return self.wbits if self.wbits is not None else self.bits

    @property
    def activation_bits(self) -> int:
        return self.abits if self.abits is not None else self.bits


@dataclass
class QuantizeResult:
    output: Path
    report: dict
    validation: Validation


def quantize(model: str | os.PathLike, calib: str | os.PathLike, **options) -> QuantizeResult:
    """Quantize `model` with calibration data `calib`; keyword options as in QuantizeConfig."""
    unknown = set(options) - set(QuantizeConfig.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown options: {', '.join(sorted(unknown))}")
    return run(Path(model), Path(calib), QuantizeConfig(**options))


def run(model_path: Path, calib_path: Path, config: QuantizeConfig) -> QuantizeResult:
    started = time.monotonic()
    check_options(config)
    output = output_path(model_path, config)
    torch.manual_seed(config.seed)
    device = torch.device(config.device)

    sim = simulate(model_path, calib_path, config, device)
    prepared, units, plan, mirror, quantizers, data = (sim.prepared, sim.units, sim.plan, sim.mirror,
                                                       sim.quantizers, sim.data)
    units_report = []
    checkpointer = None
    if config.method != "rtn":
        checkpointer = Checkpointer(work_folder(output, config), run_fingerprint(
            model_path.read_bytes(), data.inputs.tobytes(), json.dumps(result_affecting(config)).encode()),
            note=lambda message: tqdm.write(message, file=sys.stderr))
        try:
            units_report = results_to_dicts(reconstruct(
                mirror, quantizers, data.inputs, reconstruction_settings(config), device, config.seed,
                cache_folder=checkpointer.folder / "cache", cache_budget=int(config.cache_mem * (1 << 30)),
                checkpointer=checkpointer, resume=config.resume))
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted; finished units are checkpointed in {checkpointer.folder}: "
                              "run the same command with --resume to continue") from None

    exported = export_qdq(prepared.model, mirror, quantizers, config.format, config.target, {
        "method": config.method, "preset": config.preset, "iters": config.iters, "wbits": config.weight_bits,
        "abits": config.activation_bits, "init": config.init, "calibration_images": len(data.inputs),
        "seed": config.seed,
    })
    serialized = exported.SerializeToString()
    validation = validate(serialized, str(model_path), mirror, data.parity, data.parity_held_out, device,
                          config.provider)
    require_parity(validation)
    write_atomically(output, serialized)
    if checkpointer:
        checkpointer.remove()
    report = {
        "model": str(model_path), "output": str(output), "config": asdict(config),
        "preprocessing": asdict(sim.preprocessing), "notes": prepared.notes,
        "units": [u.to_dict() for u in units], "plan": plan.to_dict(),
        "calibration": {"images": len(data.inputs), "skipped": data.skipped},
        "reconstruction": units_report,
        "validation": validation.to_dict(), "seconds": round(time.monotonic() - started, 2),
    }
    if config.report:
        write_atomically(Path(config.report), json.dumps(report, indent=2).encode())
        if units_report:
            plot_unit_losses(units_report, Path(config.report).with_suffix(".png"),
                             f"{model_path.name} {config.method} W{config.weight_bits}A{config.activation_bits}")
    return QuantizeResult(output, report, validation)


@dataclass
class Simulation:
    """Everything up to reconstruction: the float graph, its units and plan, and the calibrated
    quantized mirror."""

    prepared: PreparedModel
    units: list[Unit]
    plan: QuantPlan
    mirror: NetworkMirror
    quantizers: QuantizerSet
    data: CalibrationData
    preprocessing: Preprocessing


def simulate(model_path: Path, calib_path: Path, config: QuantizeConfig, device: torch.device) -> Simulation:
    """prepare -> partition -> plan -> mirror -> calibrate: the quantized model before reconstruction."""
    prepared = prepare(model_path)
    units = partition(prepared.model)
    plan = make_plan(prepared.model, PlanOptions(
        wbits=config.weight_bits, abits=config.activation_bits, target=config.target,
        keep_ends=config.keep_ends, exclude=config.exclude,
        overrides=read_overrides(config.overrides) if config.overrides else {},
    ))
    mirror = NetworkMirror(prepared.model, units).eval().to(device)
    preprocessing = preprocessing_for_onnx(prepared.model, config.preprocess)
    data = load_calibration(calib_path, preprocessing, graph_input_shape(prepared.model), config.num_calib)
    stats = collect_activation_stats(mirror, plan, data.inputs, config.batch_size, device, config.seed)
    quantizers = build_quantizers(mirror, plan, stats, config.init)
    mirror.attach(quantizers)
    mirror.to(device)
    return Simulation(prepared, units, plan, mirror, quantizers, data, preprocessing)


def work_folder(output: Path, config: QuantizeConfig) -> Path:
    return Path(config.work_dir) if config.work_dir else output.with_name(f".{output.name}.work")


def result_affecting(config: QuantizeConfig) -> dict:
    """The options that change the output file (not where it goes or how it is checked)."""
    ignored = {"output", "report", "work_dir", "resume", "provider", "cache_mem"}
    return {key: value for key, value in asdict(config).items() if key not in ignored}


def reconstruction_settings(config: QuantizeConfig) -> ReconstructionSettings:
    chosen = {**PRESETS[config.preset], "method": config.method, "batch_size": config.batch_size}
    if config.iters is not None:
        chosen["iters"] = config.iters
    return ReconstructionSettings(**chosen)


def check_options(config: QuantizeConfig) -> None:
    if config.method not in METHODS:
        raise UserError(f"unknown method {config.method!r}: choose {', '.join(METHODS)}")
    if config.preset not in PRESETS:
        raise UserError(f"unknown preset {config.preset!r}: choose {', '.join(PRESETS)}")
    if config.cache_mem < 0:
        raise UserError(f"--cache-mem must not be negative, got {config.cache_mem}")
    if config.iters is not None and config.iters < 1:
        raise UserError(f"--iters must be at least 1, got {config.iters}")
    if config.init not in INIT_METHODS:
        raise UserError(f"unknown initialisation {config.init!r}: choose {', '.join(INIT_METHODS)}")
    if config.format not in FORMATS:
        raise UserError(f"unknown format {config.format!r}: choose {' or '.join(FORMATS)}")
    if config.format == "native" and config.target == "tensorrt":
        raise UserError("--format native is for ONNX Runtime; TensorRT needs --format qdq")
    if config.weight_bits is None or config.activation_bits is None:
        raise UserError("give --bits, or both --wbits and --abits")
    if config.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {config.batch_size}")
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda requested but torch sees no CUDA device")


def output_path(model_path: Path, config: QuantizeConfig) -> Path:
    output = Path(config.output) if config.output else \
        model_path.with_name(f"{model_path.stem}.w{config.weight_bits}a{config.activation_bits}.onnx")
    if output.exists() and model_path.exists() and output.resolve() == model_path.resolve():
        raise UserError(f"the output path is the input model: {output}")
    folder = output.parent
    if not folder.is_dir():
        raise UserError(f"output folder does not exist: {folder}")
    if not os.access(folder, os.W_OK):
        raise UserError(f"output folder is not writable: {folder}")
    return output


def graph_input_shape(model) -> tuple:
    constants = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in constants]
    if len(inputs) != 1:
        raise UserError(f"the model has {len(inputs)} graph inputs; quantization needs exactly one image input")
    return tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in inputs[0].type.tensor_type.shape.dim)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomically(path: Path, content: bytes) -> None:
    """Write to a temporary file in the same folder, then rename: never a half-written file."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(content)
        os.chmod(temporary, 0o666 & ~current_umask())  # mkstemp creates 0600; give the usual mode
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
