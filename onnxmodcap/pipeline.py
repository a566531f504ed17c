"""The whole job, `onnxmodcap quantize`, as one function: each pipeline stage in order.

model.onnx -> prepare -> partition -> plan -> mirror -> calibrate -> (modcap -> reconstruct) -> export -> validate
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .allocator import retained_memory
from .calibrate import CalibrationData, build_quantizers, collect_activation_stats, load_calibration
from .checkpoint import Checkpointer, quantizer_state, restore_quantizers, run_fingerprint
from .defaults import DEFAULT_METHOD, DEFAULT_MODCAP
from .errors import Interrupted, RunFailed, UserError, first_line
from .export import FORMATS, export_qdq
from .files import stage_model, write_atomically
from .mirror import NetworkMirror
from .ops import node_attributes
from .modcap import MODES as MODCAP_MODES
from .modcap import Schedule, choose_groups, data_capacities, data_free_capacities, default_pairs, merge_units, oscillation
from .partition import Unit, partition
from .plan import PlanOptions, QuantPlan, make_plan, read_overrides
from .plot import plot_unit_losses
from .prepare import PreparedModel, prepare
from .preprocess import Preprocessing, preprocessing_for_onnx
from .quantizers import INIT_METHODS, QuantizerSet
from .reconstruct import METHODS as RECONSTRUCTION_METHODS
from .reconstruct import (
    LOSS_IMAGES, PAPER_ITERS, PREDICTION_OBJECTIVES, PRESETS, RECONSTRUCTION_VERSION, Prediction,
    ReconstructionSettings, batchnorm_targets, method_defaults, network_defaults, prediction_objective, reconstruct,
    results_to_dicts, unit_errors,
)
from .runtime import check_input_accepted
from .shapes import dims, dynamic_image_axes, image_inputs
from .validate import Validation, require_parity, validate

log = logging.getLogger(__name__)

METHODS = ("rtn", *RECONSTRUCTION_METHODS)
CUBLAS_WORKSPACE = "CUBLAS_WORKSPACE_CONFIG"


@dataclass(frozen=True)
class QuantizeConfig:
    """Every option of `onnxmodcap quantize`; the CLI flags map one to one onto these fields."""

    output: str | None = None
    bits: int | None = 4
    wbits: int | None = None
    abits: int | None = None
    method: str = DEFAULT_METHOD
    preset: str = "auto"  # reconstruction settings: a key of reconstruct.PRESETS, or "auto" (see `resolve_preset`)
    iters: int | None = None  # reconstruction iterations per unit (overrides the preset)
    work_dir: str | None = None  # checkpoints; default .<output name>.work beside the output
    cache_mem: float = 4.0  # GiB of cached unit inputs/outputs kept in memory; the rest spills to work_dir
    resume: bool = False
    init: str = "lp"
    target: str = "ort"
    reduce_range: bool = False  # ORT target: 8-bit weights on 7 bits' range, for the faster int8 kernels
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
    dynamic_batch: bool = False  # a model that fixes its batch size is written with a dynamic one
    modcap: str | None = None  # off, data or free (None: DEFAULT_MODCAP when reconstructing, else off)
    modcap_k: int | None = None  # pairs merged (default: about one per four blocks)
    compare_granularity: bool = False  # also reconstruct without ModCap and report both
    round_lambda: float | None = None  # AdaRound's rounding loss weight (default: by network, see
    # reconstruct.network_defaults)
    round_lr: float | None = None  # Adam's rate on the rounding variables (default: by preset and method)
    pd_temperature: float | None = None  # pdquant (default: by network, as round_lambda)
    pd_lambda: float | None = None
    dc_lambda: float | None = None
    dc: bool = True
    preprocess: dict = field(default_factory=dict)  # input_size, resize, mean, std, scale, color, layout

    @property
    def granularity(self) -> str:
        """The ModCap mode this run uses."""
        if self.modcap is not None:
            return self.modcap
        return "off" if self.method == "rtn" else DEFAULT_MODCAP

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
    device = torch.device(config.device)
    with seeded(config.seed, device), exact_float32(device), retained_memory():
        return run_on(device, model_path, calib_path, config, output, started)


@contextmanager
def seeded(seed: int, device: torch.device):
    """torch's global random generators seeded with `seed` for the run, and restored afterwards."""
    cuda_devices = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        yield


@contextmanager
def exact_float32(device: torch.device):
    """On CUDA, while a run lasts: convolutions and matrix products in full float32, not TF32 (which
    torch's cuDNN convolutions use by default from Ampere on, rounding their inputs to 10-bit
    mantissas: far beyond the rounding noise that validation allows), and deterministic kernels, so
    that one seed gives one file. torch's settings and the environment are restored afterwards."""
    if device.type != "cuda":
        yield
        return
    workspace = os.environ.get(CUBLAS_WORKSPACE)
    os.environ.setdefault(CUBLAS_WORKSPACE, ":4096:8")  # cuBLAS's deterministic mode reads it
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (cudnn.allow_tf32, matmul.allow_tf32, cudnn.benchmark, torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled())
    cudnn.allow_tf32 = matmul.allow_tf32 = cudnn.benchmark = False
    # warn_only: the few ops without a deterministic CUDA backward (a reflect Pad) warn instead of failing
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        cudnn.allow_tf32, matmul.allow_tf32, cudnn.benchmark = saved[:3]
        torch.use_deterministic_algorithms(saved[3], warn_only=saved[4])
        if workspace is None:
            del os.environ[CUBLAS_WORKSPACE]


@contextmanager
def timed(stages: dict[str, float], name: str):
    """Add the wall time of the block to stages[name], in seconds."""
    started = time.monotonic()
    try:
        yield
    finally:
        stages[name] = round(stages.get(name, 0.0) + time.monotonic() - started, 2)


def run_on(device: torch.device, model_path: Path, calib_path: Path, config: QuantizeConfig, output: Path,
           started: float) -> QuantizeResult:
    stages: dict[str, float] = {}
    with timed(stages, "calibration"):
        sim = simulate(model_path, calib_path, config, device)
    if config.method != "rtn":
        config = replace(config, preset=resolve_preset(config, sim.activation_elements))
    prepared, units, plan, mirror, quantizers, data = (sim.prepared, sim.units, sim.plan, sim.mirror,
                                                       sim.quantizers, sim.data)
    reconstruction: dict = {}
    checkpointer = None
    if config.method != "rtn":
        checkpointer = Checkpointer(work_folder(output, config), run_fingerprint(
            RECONSTRUCTION_VERSION.encode(), prepared.source_digest.encode(), data.inputs.tobytes(),
            json.dumps(result_affecting(config)).encode()))
        try:
            checkpointer.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create the work folder {checkpointer.folder}: {err.strerror}") from None
        resume_hint = f"finished units are checkpointed in {checkpointer.folder}: run the same command with --resume"
        try:
            with timed(stages, "reconstruction"):
                reconstruction, mirror = reconstruct_all(sim, config, device, checkpointer)
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted; {resume_hint} to continue") from None
        except UserError as err:
            raise RunFailed(f"{err}; {resume_hint} once that is fixed") from None
        except Exception as err:
            raise RunFailed(f"reconstruction failed ({type(err).__name__}: {first_line(err)}); {resume_hint} "
                            "to continue") from err

    with timed(stages, "export"):
        exported, weights = export_qdq(prepared, mirror, quantizers, config.format, config.target, {
            "method": config.method, "preset": config.preset, "iters": config.iters,
            "wbits": config.weight_bits, "abits": config.activation_bits, "modcap": config.granularity,
            "init": config.init, "calibration_images": len(data.inputs), "seed": config.seed,
        }, dynamic_batch=config.dynamic_batch)
    with stage_model(exported, weights, output, external_data=prepared.external_data) as staged:
        with timed(stages, "validation"):
            validation = validate(str(staged.path), str(model_path), mirror, data.parity, data.parity_held_out,
                                  device, config.provider)
        require_parity(validation)
        staged.commit()
    if checkpointer:
        checkpointer.remove()
    report = {
        "model": str(model_path), "output": str(output), "config": asdict(config),
        "preprocessing": asdict(sim.preprocessing), "notes": prepared.notes,
        "units": [u.to_dict() for u in units], "plan": plan.to_dict(),
        "calibration": {"images": len(data.inputs), "skipped": data.skipped},
        **reconstruction,
        "validation": validation.to_dict(), "seconds": round(time.monotonic() - started, 2), "stage_seconds": stages,
    }
    if config.report:
        write_atomically(Path(config.report), json.dumps(report, indent=2).encode())
        if reconstruction:
            plot_unit_losses(reconstruction["unit_losses"], Path(config.report).with_suffix(".png"),
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
    activation_elements: int  # quantized activation values per image


def simulate(model_path: Path, calib_path: Path, config: QuantizeConfig, device: torch.device) -> Simulation:
    """prepare -> partition -> plan -> mirror -> calibrate: the quantized model before reconstruction."""
    prepared = prepare(model_path, flags=config.preprocess)
    units = partition(prepared.model)
    plan = make_plan(prepared.model, PlanOptions(
        wbits=config.weight_bits, abits=config.activation_bits, target=config.target,
        reduce_range=config.reduce_range, keep_ends=config.keep_ends, exclude=config.exclude,
        overrides=read_overrides(config.overrides) if config.overrides else {},
    ))
    mirror = NetworkMirror(prepared, units).eval().to(device)
    preprocessing = preprocessing_for_onnx(prepared.model, config.preprocess)
    input_shape = graph_input_shape(prepared.model)
    data = load_calibration(calib_path, preprocessing, input_shape, config.num_calib)
    if dynamic_image_axes(list(input_shape)):
        check_input_accepted(str(model_path), data.inputs[:1])
    stats = collect_activation_stats(mirror, plan, data.inputs, config.batch_size, device, config.seed)
    quantizers = build_quantizers(mirror, plan, stats, config.init)
    mirror.attach(quantizers)
    mirror.to(device)
    return Simulation(prepared, units, plan, mirror, quantizers, data, preprocessing,
                      sum(s.elements_per_image for s in stats.values()))


def reconstruct_all(sim: Simulation, config: QuantizeConfig, device: torch.device,
                    checkpointer: Checkpointer) -> tuple[dict, NetworkMirror]:
    """Reconstruct with the configured method and granularity; with --compare-granularity, also
    without ModCap (after the main run, from the same initial quantizers). Returns the report's
    reconstruction sections and the mirror whose units were reconstructed."""
    settings = reconstruction_settings(config, sim.prepared.model)
    loss_images = sim.data.inputs[:LOSS_IMAGES]
    losses = {"units": [u.name for u in sim.units], "before": unit_errors(sim.mirror, loss_images, device)}
    schedule = modcap_schedule(sim, config, device)
    units = merge_units(sim.prepared.model, sim.units, schedule) if schedule else sim.units
    mirror = sim.mirror
    if schedule:
        mirror = NetworkMirror(sim.prepared, units).eval().to(device)
        mirror.attach(sim.quantizers)
    initial_state = quantizer_state(sim.quantizers)

    objective = None
    if config.method == "pdquant":
        float_mirror = NetworkMirror(sim.prepared, sim.units).eval().to(device)
        objective = prediction_objective(float_mirror, sim.data.inputs[:LOSS_IMAGES], device)

    def run_reconstruction(on: NetworkMirror, saving: Checkpointer | None, resume: bool, cache: Path) -> list[dict]:
        prediction = pdquant_inputs(sim, on, device, objective) if objective else None
        return results_to_dicts(reconstruct(
            on, sim.quantizers, sim.data.inputs, settings, device, config.seed, cache_folder=cache,
            cache_budget=int(config.cache_mem * (1 << 30)), checkpointer=saving, resume=resume,
            prediction=prediction))

    report: dict = {"reconstruction_settings": {"preset": config.preset, **asdict(settings)}}
    if config.method == "pdquant":
        report["distribution_correction"] = distribution_correction(sim.prepared, settings)
        log.info("distribution correction %s", report["distribution_correction"])
        report["prediction_difference"] = {"objective": objective, "description": PREDICTION_OBJECTIVES[objective]}
        log.info("prediction difference: %s", PREDICTION_OBJECTIVES[objective])
    report["reconstruction"] = run_reconstruction(mirror, checkpointer, config.resume, checkpointer.folder / "cache")
    losses["after"] = unit_errors(sim.mirror, loss_images, device)
    losses["oscillation"] = oscillation(losses["after"])
    if schedule:
        report["modcap"] = {**schedule.to_dict(), "schedule": schedule.text()}
        losses["groups"] = schedule.groups
    if schedule and config.compare_granularity:
        final_state = quantizer_state(sim.quantizers)
        restore_quantizers(sim.quantizers, initial_state)
        report["reconstruction_without_modcap"] = run_reconstruction(sim.mirror, None, False,
                                                                     checkpointer.folder / "compare-cache")
        losses["after_without_modcap"] = unit_errors(sim.mirror, loss_images, device)
        losses["oscillation_without_modcap"] = oscillation(losses["after_without_modcap"])
        restore_quantizers(sim.quantizers, final_state)
    report["unit_losses"] = losses
    return report, mirror


def distribution_correction(prepared: PreparedModel, settings: ReconstructionSettings) -> str:
    if not settings.dc:
        return "off (--no-dc)"
    if not prepared.bn_stats:
        return ("skipped: the graph has no BatchNormalization statistics (BN was folded before export), "
                "so PD-Quant runs without it")
    return f"on: {len(prepared.bn_stats)} BatchNormalization statistics recorded by prepare"


def modcap_schedule(sim: Simulation, config: QuantizeConfig, device: torch.device) -> Schedule | None:
    if config.granularity == "off":
        return None
    if config.granularity == "data":
        capacities = data_capacities(sim.mirror, sim.data.inputs, device)
    else:
        capacities = data_free_capacities(sim.prepared.model, sim.units, sim.plan)
    return choose_groups(config.granularity, sim.units, capacities, config.modcap_k or default_pairs(sim.units))


def pdquant_inputs(sim: Simulation, mirror: NetworkMirror, device: torch.device, objective: str) -> Prediction:
    float_mirror = NetworkMirror(sim.prepared, [u.unit for u in mirror.units]).eval().to(device)
    return Prediction(float_mirror, batchnorm_targets(sim.prepared.bn_stats), objective)


def work_folder(output: Path, config: QuantizeConfig) -> Path:
    return Path(config.work_dir) if config.work_dir else output.with_name(f".{output.name}.work")


def result_affecting(config: QuantizeConfig) -> dict:
    """The options that change the output file (not where it goes or how it is checked)."""
    ignored = {"output", "report", "work_dir", "resume", "provider", "cache_mem"}
    return {key: value for key, value in asdict(config).items() if key not in ignored}


# Quantized activation values per image above which `--preset auto` on a CPU takes the quick preset:
# the shipped 28x28 networks have 0.06-0.10 million, OpenNSFW (224x224) 8.8 million and
# EfficientNet-Lite1 (240x240) 10.7 million, where the fast preset's 1 000 iterations per unit take
# about an hour on 2 cores (benchmarks_reconstruct.md).
LARGE_ACTIVATIONS = 1_000_000


def resolve_preset(config: QuantizeConfig, activation_elements: int) -> str:
    """`auto` is the published recipe on a GPU. On a CPU, where 20 000 iterations per unit take
    hours even for a small network, it is the fast preset, or the quick one for a network whose
    activations are large; the note says which and why."""
    if config.preset != "auto":
        return config.preset
    if config.device.startswith("cuda"):
        preset, reason = "paper", config.device
    else:
        preset = "quick" if activation_elements > LARGE_ACTIVATIONS else "fast"
        reason = f"cpu, {activation_elements / 1e6:.1f} million activation values per image"
    iters = config.iters or PRESETS[preset].get("iters", PAPER_ITERS)
    log.info("--preset auto chose %s (%s): %d iterations per unit", preset, reason, iters)
    return preset


def reconstruction_settings(config: QuantizeConfig, model) -> ReconstructionSettings:
    chosen = {**method_defaults(config.method), **PRESETS[config.preset], "method": config.method,
              "batch_size": config.batch_size, "dc": config.dc, **network_defaults(has_depthwise_conv(model))}
    given = {"iters": config.iters, "round_lambda": config.round_lambda, "weight_lr": config.round_lr,
             "pd_temperature": config.pd_temperature, "pd_lambda": config.pd_lambda, "dc_lambda": config.dc_lambda}
    chosen.update({key: value for key, value in given.items() if value is not None})
    return ReconstructionSettings(**chosen)


def has_depthwise_conv(model) -> bool:
    """A Conv with one input channel per group: the MobileNet family."""
    shapes = {t.name: t.dims for t in model.graph.initializer}
    return any(node.op_type == "Conv" and node.input[1] in shapes and shapes[node.input[1]][1] == 1
               and node_attributes(node).get("group", 1) > 1 for node in model.graph.node)


def check_options(config: QuantizeConfig) -> None:
    if config.method not in METHODS:
        raise UserError(f"unknown method {config.method!r}: choose {', '.join(METHODS)}")
    if config.preset not in ("auto", *PRESETS):
        raise UserError(f"unknown preset {config.preset!r}: choose auto, {', '.join(PRESETS)}")
    if config.cache_mem < 0:
        raise UserError(f"--cache-mem must not be negative, got {config.cache_mem}")
    if config.granularity not in MODCAP_MODES:
        raise UserError(f"unknown --modcap {config.modcap!r}: choose {', '.join(MODCAP_MODES)}")
    if config.modcap_k is not None and config.modcap_k < 1:
        raise UserError(f"--modcap-k must be at least 1, got {config.modcap_k}")
    if config.modcap not in (None, "off") and config.method == "rtn":
        raise UserError("--modcap groups units for reconstruction: use it with --method brecq, qdrop or pdquant")
    if config.compare_granularity and config.granularity == "off":
        raise UserError("--compare-granularity compares against ModCap: give --modcap data or free")
    for name in ("round_lambda", "round_lr", "pd_temperature", "pd_lambda", "dc_lambda"):
        value = getattr(config, name)
        if value is not None and value <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if config.iters is not None and config.iters < 1:
        raise UserError(f"--iters must be at least 1, got {config.iters}")
    if config.init not in INIT_METHODS:
        raise UserError(f"unknown initialisation {config.init!r}: choose {', '.join(INIT_METHODS)}")
    if config.format not in FORMATS:
        raise UserError(f"unknown format {config.format!r}: choose {' or '.join(FORMATS)}")
    if config.format == "native" and config.target == "tensorrt":
        raise UserError("--format native is for ONNX Runtime; TensorRT needs --format qdq")
    if config.reduce_range and config.target == "tensorrt":
        raise UserError("--reduce-range is for ONNX Runtime's int8 kernels; TensorRT takes full-range weights")
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
    try:
        tempfile.TemporaryFile(dir=folder).close()  # os.access says yes to root on a read-only mount
    except OSError as err:
        raise UserError(f"output folder is not writable: {folder} ({err.strerror})") from None
    return output


def graph_input_shape(model) -> tuple:
    inputs = image_inputs(model)
    if len(inputs) != 1:
        raise UserError(f"the model has {len(inputs)} graph inputs; quantization needs exactly one image input")
    return tuple(dims(inputs[0]))
