"""The whole job, `onnxmodcap quantize`, as one function: each pipeline stage in order.

model.onnx -> prepare -> partition -> plan -> mirror -> calibrate -> (modcap -> reconstruct) -> bias correction
    -> export -> validate
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .bias_correction import BiasCorrection, correct_biases
from .calibrate import CalibrationData, build_quantizers, collect_activation_stats, load_calibration
from .checkpoint import Checkpointer, quantizer_state, restore_quantizers, run_fingerprint
from .config import QuantizeConfig, check_options, parse_budget
from .errors import Interrupted, RunFailed, UserError, first_line
from .export import export_qdq
from .files import check_writable_folder, stage_model, write_atomically
from .graph import dims, dynamic_image_axes, has_depthwise_conv, image_inputs
from .losses import LOSS_IMAGES, unit_errors
from .mirror import NetworkMirror
from .mixed_precision import SEARCH_IMAGES, MixedPrecision, choose_widths
from .modcap import Schedule, choose_groups, data_capacities, data_free_capacities, default_pairs, merge_units, oscillation
from .partition import Unit, partition
from .pdquant import PREDICTION_OBJECTIVES, distribution_correction, prediction_inputs, prediction_objective
from .plan import PlanOptions, QuantPlan, make_plan, read_overrides
from .plot import plot_unit_losses
from .prepare import PreparedModel, prepare
from .preprocess import Preprocessing, preprocessing_for_onnx
from .quantizers import QuantizerSet
from .recipes import RECONSTRUCTION_VERSION, reconstruction_settings, resolve_preset
from .reconstruct import reconstruct
from .report import CalibrationSummary, ReconstructionReport, RunReport, UnitLosses
from .run_state import isolated_run
from .runtime import check_input_accepted
from .tensor_cache import TensorCache
from .validate import Validation, require_parity, validate

log = logging.getLogger(__name__)


@dataclass
class QuantizeResult:
    output: Path
    report: RunReport
    validation: Validation


def quantize(model: str | os.PathLike, calib: str | os.PathLike, **options) -> QuantizeResult:
    """Quantize `model` with calibration data `calib`; keyword options as in QuantizeConfig."""
    unknown = set(options) - set(QuantizeConfig.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown options: {', '.join(sorted(unknown))}")
    return run(Path(model), Path(calib), QuantizeConfig(**{name: plain(name, value) for name, value in options.items()}))


def plain(name: str, value):
    """An option as QuantizeConfig keeps it: a path as a string, a list (or one string) of patterns
    or op types as a tuple."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if name in ("exclude", "exclude_op_types"):
        return (value,) if isinstance(value, str) else tuple(value)
    return value


@dataclass
class RunContext:
    """What every stage of one run shares: where it reads and writes, its options (with the preset
    resolved once calibration has measured the model), and the time each stage took."""

    model_path: Path
    calib_path: Path
    config: QuantizeConfig
    output: Path
    device: torch.device
    started: float = field(default_factory=time.monotonic)
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str):
        """Add the wall time of the block to stage_seconds[name]."""
        started = time.monotonic()
        try:
            yield
        finally:
            self.stage_seconds[name] = round(self.stage_seconds.get(name, 0.0) + time.monotonic() - started, 2)


BIAS_CORRECTION_AFTER_RECONSTRUCTION = (
    "--bias-correction after reconstruction lowered fidelity on every real model measured (PP-OCRv5 "
    "recogniser W8A8 QDrop: 2.0 % of strings identical to float against 89.1 % without; docs/methods.md)")


def run(model_path: Path, calib_path: Path, config: QuantizeConfig) -> QuantizeResult:
    check_options(config)
    if config.bias_correction and config.method != "rtn":
        log.warning(BIAS_CORRECTION_AFTER_RECONSTRUCTION)
    context = RunContext(model_path, calib_path, config, output_path(model_path, config), torch.device(config.device))
    with isolated_run(config.seed, context.device):
        with context.stage("calibration"):
            sim = simulate(model_path, calib_path, config, context.device)
        if config.method != "rtn":
            context.config = replace(config, preset=resolve_preset(config, sim.activation_elements))
        reconstruction, mirror, checkpointer = reconstruct_stage(context, sim)
        bias_correction = bias_correction_stage(context, sim, mirror)
        validation = export_and_validate(context, sim, mirror)
        if checkpointer:
            checkpointer.remove()
    report = RunReport(
        str(model_path), str(context.output), context.config, sim.preprocessing, sim.prepared.notes, sim.units,
        sim.plan, CalibrationSummary(len(sim.data.inputs), sim.data.skipped), reconstruction, validation,
        round(time.monotonic() - context.started, 2), context.stage_seconds, sim.mixed_precision, bias_correction)
    write_report(report)
    return QuantizeResult(context.output, report, validation)


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
    activation_elements: int  # quantized activation values per image
    mixed_precision: MixedPrecision | None = None  # the widths --mixed-precision chose


def simulate(model_path: Path, calib_path: Path, config: QuantizeConfig, device: torch.device) -> Simulation:
    """prepare -> partition -> plan -> mirror -> calibrate: the quantized model before reconstruction."""
    check_options(config)
    prepared = prepare(model_path, flags=config.preprocess)
    units = partition(prepared.model)
    options = PlanOptions(
        wbits=config.weight_bits, abits=config.activation_bits, target=config.target,
        reduce_range=config.reduce_range, keep_ends=config.keep_ends, exclude=config.exclude,
        exclude_op_types=config.exclude_op_types,
        overrides=read_overrides(config.overrides) if config.overrides else {},
    )
    plan = make_plan(prepared.model, options)
    mirror = NetworkMirror(prepared, units).eval().to(device)
    preprocessing = preprocessing_for_onnx(prepared.model, config.preprocess)
    input_shape = graph_input_shape(prepared.model)
    data = load_calibration(calib_path, preprocessing, input_shape, config.num_calib)
    if dynamic_image_axes(list(input_shape)):
        check_input_accepted(str(model_path), data.inputs[:1])
    stats = collect_activation_stats(mirror, plan, data.inputs, config.batch_size, device, config.seed)
    quantizers = build_quantizers(mirror, plan, stats, config.init)
    mirror.attach(quantizers)
    mixed = None
    if config.mixed_precision:
        mixed = choose_widths(parse_budget(config.mixed_precision), plan, mirror, quantizers, stats,
                              data.inputs[:SEARCH_IMAGES], prepared.model, config.init, device)
        options = replace(options, overrides={**options.overrides, **mixed.overrides(plan)})
        plan = make_plan(prepared.model, options)
        missing = replace(plan, activations=[a for a in plan.activations if a.tensor not in stats])
        if missing.activations:  # outputs of Convs now left with 8-bit inputs, which ONNX Runtime fuses
            with mirror.quantization(False):
                stats |= collect_activation_stats(mirror, missing, data.inputs, config.batch_size, device, config.seed)
        quantizers = build_quantizers(mirror, plan, stats, config.init)
        mirror.attach(quantizers)
    mirror.to(device)
    return Simulation(prepared, units, plan, mirror, quantizers, data, preprocessing,
                      sum(stats[a.tensor].elements_per_image for a in plan.activations), mixed)


def reconstruct_stage(context: RunContext, sim: Simulation) \
        -> tuple[ReconstructionReport | None, NetworkMirror, Checkpointer | None]:
    """Reconstruction with checkpoints, turning any failure into a message that says how to resume.
    Returns the report section, the mirror whose units were reconstructed, and the checkpointer
    (None with rtn, which has nothing to reconstruct)."""
    config = context.config
    if config.method == "rtn":
        return None, sim.mirror, None
    checkpointer = Checkpointer(work_folder(context.output, config), run_fingerprint(
        RECONSTRUCTION_VERSION.encode(), sim.prepared.source_digest.encode(), sim.data.inputs.tobytes(),
        json.dumps(result_affecting(config)).encode()))
    try:
        checkpointer.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the work folder {checkpointer.folder}: {err.strerror}") from None
    resume_hint = f"finished units are checkpointed in {checkpointer.folder}: run the same command with --resume"
    try:
        with context.stage("reconstruction"):
            reconstruction, mirror = reconstruct_all(sim, config, context.device, checkpointer)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; {resume_hint} to continue") from None
    except UserError as err:
        raise RunFailed(f"{err}; {resume_hint} once that is fixed") from None
    except Exception as err:
        raise RunFailed(f"reconstruction failed ({type(err).__name__}: {first_line(err)}); {resume_hint} "
                        "to continue") from err
    return reconstruction, mirror, checkpointer


def reconstruct_all(sim: Simulation, config: QuantizeConfig, device: torch.device,
                    checkpointer: Checkpointer) -> tuple[ReconstructionReport, NetworkMirror]:
    """Reconstruct with the configured method and granularity; with --compare-granularity, also
    without ModCap (after the main run, from the same initial quantizers). Returns the report's
    reconstruction sections and the mirror whose units were reconstructed."""
    settings = reconstruction_settings(config, has_depthwise_conv(sim.prepared.model))
    loss_images = sim.data.inputs[:LOSS_IMAGES]
    losses = UnitLosses([u.name for u in sim.units], unit_errors(sim.mirror, loss_images, device, config.batch_size))
    schedule = modcap_schedule(sim, config, device)
    mirror = sim.mirror
    if schedule:
        mirror = NetworkMirror(sim.prepared, merge_units(sim.prepared.model, sim.units, schedule)).eval().to(device)
        mirror.attach(sim.quantizers)
    initial_state = quantizer_state(sim.quantizers)

    objective = None
    if config.method == "pdquant":
        float_mirror = NetworkMirror(sim.prepared, sim.units).eval().to(device)
        objective = prediction_objective(float_mirror, loss_images[:config.batch_size], device)

    def run_reconstruction(on: NetworkMirror, saving: Checkpointer | None, resume: bool, cache: Path):
        prediction = prediction_inputs(sim.prepared, on, device, objective) if objective else None
        return reconstruct(on, sim.quantizers, sim.data.inputs, settings, device, config.seed, cache_folder=cache,
                           cache_budget=int(config.cache_mem * (1 << 30)), checkpointer=saving, resume=resume,
                           prediction=prediction)

    report = ReconstructionReport({"preset": config.preset, **asdict(settings)}, [], losses)
    if objective:
        report.distribution_correction = distribution_correction(sim.prepared, settings)
        log.info("distribution correction %s", report.distribution_correction)
        report.prediction_difference = {"objective": objective, "description": PREDICTION_OBJECTIVES[objective]}
        log.info("prediction difference: %s", PREDICTION_OBJECTIVES[objective])
    report.units = run_reconstruction(mirror, checkpointer, config.resume, checkpointer.folder / "cache")
    losses.after = unit_errors(sim.mirror, loss_images, device, config.batch_size)
    losses.oscillation = oscillation(losses.after)
    if schedule:
        report.modcap = {**schedule.to_dict(), "schedule": schedule.text()}
        losses.groups = schedule.groups
    if schedule and config.compare_granularity:
        final_state = quantizer_state(sim.quantizers)
        restore_quantizers(sim.quantizers, initial_state)
        report.units_without_modcap = run_reconstruction(sim.mirror, None, False, checkpointer.folder / "compare-cache")
        losses.after_without_modcap = unit_errors(sim.mirror, loss_images, device, config.batch_size)
        losses.oscillation_without_modcap = oscillation(losses.after_without_modcap)
        restore_quantizers(sim.quantizers, final_state)
    return report, mirror


def modcap_schedule(sim: Simulation, config: QuantizeConfig, device: torch.device) -> Schedule | None:
    if config.granularity == "off":
        return None
    if config.granularity == "data":
        capacities = data_capacities(sim.mirror, sim.data.inputs, device)
    else:
        capacities = data_free_capacities(sim.prepared.model, sim.units, sim.plan)
    return choose_groups(config.granularity, sim.units, capacities, config.modcap_k or default_pairs(sim.units))


def bias_correction_stage(context: RunContext, sim: Simulation, mirror: NetworkMirror) -> BiasCorrection | None:
    """--bias-correction (by default with rtn only): correct the biases of the final quantized
    mirror, whose rounding is settled, before export. Tensors past --cache-mem spill to the work folder."""
    config = context.config
    if not (config.method == "rtn" if config.bias_correction is None else config.bias_correction):
        return None
    folder = work_folder(context.output, config)
    made_here = not folder.exists()  # rtn has no checkpoints: a spill is what would make the folder
    cache = TensorCache(int(config.cache_mem * (1 << 30)), folder / "bias-cache")
    try:
        with context.stage("bias correction"), cache:
            correction = correct_biases(mirror, sim.plan, sim.data.inputs, config.batch_size, context.device, cache)
    except OSError as err:  # the spill files: a full disk or a folder that cannot be written
        raise UserError(f"bias correction cannot spill its tensors to {cache.folder}: {err.strerror or err}; "
                        "free space there, choose another --work-dir or raise --cache-mem") from None
    if made_here:
        with suppress(OSError):
            folder.rmdir()
    log.info("bias correction: %d layers on %d images", len(correction.layers), correction.images)
    return correction


def export_and_validate(context: RunContext, sim: Simulation, mirror: NetworkMirror) -> Validation:
    """Write the QDQ model beside its destination, check it against the simulation in ONNX Runtime,
    and only then move it into place: a model that fails parity is never left at the output path."""
    config = context.config
    with context.stage("export"):
        exported, weights = export_qdq(sim.prepared, mirror, sim.quantizers, config.format, config.target, {
            "method": config.method, "preset": config.preset, "iters": config.iters,
            "wbits": config.weight_bits, "abits": config.activation_bits, "modcap": config.granularity,
            "init": config.init, "calibration_images": len(sim.data.inputs), "seed": config.seed,
            **({"mixed_precision": sim.mixed_precision.to_dict()} if sim.mixed_precision else {}),
        }, dynamic_batch=config.dynamic_batch)
    with stage_model(exported, weights, context.output, external_data=sim.prepared.external_data) as staged:
        with context.stage("validation"):
            validation = validate(str(staged.path), str(context.model_path), mirror, sim.data.parity,
                                  sim.data.parity_held_out, context.device, config.provider)
        require_parity(validation)
        staged.commit()
    return validation


def write_report(report: RunReport) -> None:
    """--report: the JSON report, and after reconstruction a PNG of the unit losses beside it."""
    config = report.config
    if not config.report:
        return
    write_atomically(Path(config.report), json.dumps(report.to_dict(), indent=2).encode())
    if report.reconstruction:
        plot_unit_losses(report.reconstruction.unit_losses, Path(config.report).with_suffix(".png"),
                         f"{Path(report.model).name} {config.method} W{config.weight_bits}A{config.activation_bits}")


def work_folder(output: Path, config: QuantizeConfig) -> Path:
    return Path(config.work_dir) if config.work_dir else output.with_name(f".{output.name}.work")


def result_affecting(config: QuantizeConfig) -> dict:
    """The options that change the output file (not where it goes or how it is checked)."""
    ignored = {"output", "report", "work_dir", "resume", "provider", "cache_mem"}
    return {key: value for key, value in asdict(config).items() if key not in ignored}


def output_path(model_path: Path, config: QuantizeConfig) -> Path:
    output = Path(config.output) if config.output else \
        model_path.with_name(f"{model_path.stem}.w{config.weight_bits}a{config.activation_bits}.onnx")
    if output.exists() and model_path.exists() and output.resolve() == model_path.resolve():
        raise UserError(f"the output path is the input model: {output}")
    check_writable_folder(output, "output")
    if config.report:
        check_writable_folder(Path(config.report), "report")
    return output


def graph_input_shape(model) -> tuple:
    inputs = image_inputs(model)
    if len(inputs) != 1:
        raise UserError(f"the model has {len(inputs)} graph inputs; quantization needs exactly one image input")
    return tuple(dims(inputs[0]))

