"""What a run reports: typed objects that the pipeline fills stage by stage, the CLI prints, plot.py
draws and `--report` writes as JSON (`to_dict()`, the file's format)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .bias_correction import BiasCorrection
from .config import QuantizeConfig
from .mixed_precision import MixedPrecision
from .partition import Unit
from .plan import QuantPlan
from .preprocess import Preprocessing
from .reconstruct import UnitResult
from .validate import Validation


@dataclass
class UnitLosses:
    """Every unit's output error across the network (float unit on float input against quantized
    unit on quantized input), before and after reconstruction; with ModCap, the merged groups (unit
    indices) and, with --compare-granularity, the errors after reconstruction without ModCap."""

    units: list[str]
    before: list[float]
    after: list[float] = field(default_factory=list)
    oscillation: float = 0.0
    groups: list[list[int]] | None = None
    after_without_modcap: list[float] | None = None
    oscillation_without_modcap: float | None = None

    def to_dict(self) -> dict:
        return {key: value for key, value in asdict(self).items() if value is not None}


@dataclass
class ReconstructionReport:
    settings: dict  # the preset and every ReconstructionSettings field
    units: list[UnitResult]
    unit_losses: UnitLosses
    distribution_correction: str | None = None  # pdquant
    prediction_difference: dict | None = None  # pdquant: the objective and its description
    modcap: dict | None = None  # the ModCap schedule
    units_without_modcap: list[UnitResult] | None = None  # --compare-granularity

    def to_dict(self) -> dict:
        sections = {
            "reconstruction_settings": self.settings,
            "distribution_correction": self.distribution_correction,
            "prediction_difference": self.prediction_difference,
            "reconstruction": [asdict(unit) for unit in self.units],
            "modcap": self.modcap,
            "reconstruction_without_modcap": None if self.units_without_modcap is None else
            [asdict(unit) for unit in self.units_without_modcap],
            "unit_losses": self.unit_losses.to_dict(),
        }
        return {key: value for key, value in sections.items() if value is not None}


@dataclass
class CalibrationSummary:
    images: int
    skipped: list[tuple[str, str]]  # (image, why it could not be used)


@dataclass
class RunReport:
    model: str
    output: str
    config: QuantizeConfig
    preprocessing: Preprocessing
    notes: list[str]
    units: list[Unit]
    plan: QuantPlan
    calibration: CalibrationSummary
    reconstruction: ReconstructionReport | None
    validation: Validation
    seconds: float
    stage_seconds: dict[str, float]
    mixed_precision: MixedPrecision | None = None
    bias_correction: BiasCorrection | None = None

    def to_dict(self) -> dict:
        return {
            "model": self.model, "output": self.output, "config": asdict(self.config),
            "preprocessing": asdict(self.preprocessing), "notes": self.notes,
            "units": [unit.to_dict() for unit in self.units], "plan": self.plan.to_dict(),
            "calibration": asdict(self.calibration),
            **(self.reconstruction.to_dict() if self.reconstruction else {}),
            "validation": self.validation.to_dict(), "seconds": self.seconds, "stage_seconds": self.stage_seconds,
            **({"mixed_precision": self.mixed_precision.to_dict()} if self.mixed_precision else {}),
            **({"bias_correction": self.bias_correction.to_dict()} if self.bias_correction else {}),
        }
