"""The options of a run: `QuantizeConfig`, their choices and defaults, and `check_options`, the one
place that refuses a bad combination before any work starts.

Torch-free (like recipes.py), so that `onnxmodcap --help` shows these defaults without loading torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import UserError
from .recipes import METHODS as RECONSTRUCTION_METHODS
from .recipes import PRESETS

METHODS = ("rtn", *RECONSTRUCTION_METHODS)
# The method and ModCap mode used when none is given: the combination that measured best on the
# shipped models (docs/benchmarks/modcap.md).
DEFAULT_METHOD = "qdrop"
DEFAULT_MODCAP = "off"
MODCAP_MODES = ("off", "data", "free")
PRESET_CHOICES = ("auto", *PRESETS)
INIT_METHODS = ("lp", "minmax", "percentile")
TARGETS = ("ort", "tensorrt")
PROVIDER_CHOICES = ("auto", "cpu", "cuda")  # ONNX Runtime's provider for validation and evaluation
FORMATS = ("qdq", "native")
MIN_BITS, MAX_BITS = 2, 8
END_BITS = 8  # the first and last weighted layers, unless --no-keep-ends
QUANTIZED_OP_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul")  # the layers whose weights get quantized
DEFAULT_BITS = 4
DEFAULT_BATCH_SIZE = 32
DEFAULT_CACHE_GIB = 4.0
MIXED_PRECISION_WIDTHS = (2, 3, 4, 6, 8)  # the widths --mixed-precision chooses from
SIZE_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}
OPERATION_UNITS = {"bops": 1, "kbops": 1e3, "mbops": 1e6, "gbops": 1e9, "tbops": 1e12}  # bit operations per image
DEFAULT_NUM_CALIB = 1024  # calibration images used when --num-calib is not given (all, up to this)


@dataclass(frozen=True)
class QuantizeConfig:
    """Every option of `onnxmodcap quantize`; the CLI flags map one to one onto these fields."""

    output: str | None = None
    bits: int | None = DEFAULT_BITS
    wbits: int | None = None
    abits: int | None = None
    method: str = DEFAULT_METHOD
    preset: str = "auto"  # reconstruction settings: a key of recipes.PRESETS, or "auto" (see `resolve_preset`)
    iters: int | None = None  # reconstruction iterations per unit (overrides the preset)
    work_dir: str | None = None  # checkpoints; default .<output name>.work beside the output
    cache_mem: float = DEFAULT_CACHE_GIB  # GiB of cached unit inputs/outputs kept in memory; the rest spills
    resume: bool = False
    init: str = "lp"
    bias_correction: bool | None = None  # correct each layer's mean shift (bias_correction.py); None: with rtn only
    target: str = "ort"
    reduce_range: bool = False  # ORT target: 8-bit weights on 7 bits' range, for the faster int8 kernels
    format: str = "qdq"
    keep_ends: bool = True
    exclude: tuple[str, ...] = ()  # regexes of node names kept in float
    exclude_op_types: tuple[str, ...] = ()  # op types whose nodes are kept in float
    overrides: str | None = None
    num_calib: int | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    report: str | None = None
    device: str = "cpu"
    provider: str = "auto"
    seed: int = 0
    dynamic_batch: bool = False  # a model that fixes its batch size is written with a dynamic one
    modcap: str | None = None  # off, data or free (None: DEFAULT_MODCAP when reconstructing, else off)
    modcap_k: int | None = None  # pairs merged (default: about one per four blocks)
    compare_granularity: bool = False  # also reconstruct without ModCap and report both
    round_lambda: float | None = None  # AdaRound's rounding loss weight (default: recipes.network_defaults)
    round_lr: float | None = None  # Adam's rate on the rounding variables (default: by preset and method)
    pd_temperature: float | None = None  # pdquant (default: by network, as round_lambda)
    pd_lambda: float | None = None
    dc_lambda: float | None = None
    dc: bool = True
    mixed_precision: str | None = None  # a budget: average weight bits ("4.5"), a size ("3MB") or bit operations ("20GBOPs")
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


def check_options(config: QuantizeConfig) -> None:
    """One clear error for the first option, or combination of options, that cannot work."""
    check_choice("method", config.method, METHODS)
    check_choice("preset", config.preset, PRESET_CHOICES)
    check_choice("--modcap", config.granularity, MODCAP_MODES)
    check_choice("initialisation", config.init, INIT_METHODS)
    check_choice("target", config.target, TARGETS)
    check_choice("format", config.format, FORMATS)
    check_choice("provider", config.provider, PROVIDER_CHOICES)
    if config.weight_bits is None or config.activation_bits is None:
        raise UserError("give --bits, or both --wbits and --abits")
    check_bits(config.weight_bits, "weight bits")
    check_bits(config.activation_bits, "activation bits")
    for op_type in config.exclude_op_types:
        check_choice("--exclude-op-types value", op_type, QUANTIZED_OP_TYPES)
    for pattern in config.exclude:
        try:
            re.compile(pattern)
        except re.error as err:
            raise UserError(f"--exclude-nodes {pattern!r} is not a valid regex ({err})") from None
    if config.mixed_precision is not None:
        parse_budget(config.mixed_precision)
    if config.cache_mem < 0:
        raise UserError(f"--cache-mem must not be negative, got {config.cache_mem}")
    for name in ("modcap_k", "iters", "batch_size", "num_calib"):
        check_at_least_one(name, getattr(config, name))
    if config.modcap not in (None, "off") and config.method == "rtn":
        raise UserError("--modcap groups units for reconstruction: use it with --method brecq, qdrop or pdquant")
    if config.compare_granularity and config.granularity == "off":
        raise UserError("--compare-granularity compares against ModCap: give --modcap data or free")
    for name in ("round_lambda", "round_lr", "pd_temperature", "pd_lambda", "dc_lambda"):
        value = getattr(config, name)
        if value is not None and value <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if config.format == "native" and config.target == "tensorrt":
        raise UserError("--format native is for ONNX Runtime; TensorRT needs --format qdq")
    if config.reduce_range and config.target == "tensorrt":
        raise UserError("--reduce-range is for ONNX Runtime's int8 kernels; TensorRT takes full-range weights")
    if config.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda requested but torch sees no CUDA device")


@dataclass(frozen=True)
class Budget:
    text: str  # as given
    average_bits: float | None = None
    size_bytes: float | None = None
    bit_operations: float | None = None  # per image

    def value(self, parameters: int) -> float:
        """The budget in its own measure: weight bits for `parameters` quantized weights, or bit operations."""
        if self.bit_operations is not None:
            return self.bit_operations
        return self.average_bits * parameters if self.average_bits is not None else self.size_bytes * 8


def parse_budget(text: str) -> Budget:
    """`4.5` (average weight bits, 2 to 8), a size with its unit (`3MB`, `2.5 MiB`, `800kB`), or bit
    operations per image (`20GBOPs`)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not match:
        raise UserError(f"--mixed-precision {text!r}: give average weight bits (e.g. 4.5), a weight size with "
                        "its unit (e.g. 3MB) or bit operations per image (e.g. 20GBOPs)")
    value, unit = float(match.group(1)), match.group(2).lower()
    if not unit:
        if not 2 <= value <= 8:
            raise UserError(f"--mixed-precision {text}: average weight bits must be between 2 and 8; for a size, "
                            "give its unit (e.g. 3MB)")
        return Budget(text, average_bits=value)
    if unit in SIZE_UNITS:
        return Budget(text, size_bytes=value * SIZE_UNITS[unit])
    operations_unit = unit if unit.endswith("s") else unit + "s"  # GBOP or GBOPs
    if operations_unit in OPERATION_UNITS:
        return Budget(text, bit_operations=value * OPERATION_UNITS[operations_unit])
    raise UserError(f"--mixed-precision {text!r}: unknown unit {match.group(2)!r}: use B, kB, MB, GB, KiB, MiB or "
                    "GiB for a weight size, BOPs, kBOPs, MBOPs, GBOPs or TBOPs for bit operations per image")


def check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"unknown {what} {value!r}: choose {', '.join(choices)}")


def check_bits(bits: int, what: str) -> None:
    if not MIN_BITS <= bits <= MAX_BITS:
        raise UserError(f"{what} must be between {MIN_BITS} and {MAX_BITS}, got {bits}")


def check_at_least_one(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
