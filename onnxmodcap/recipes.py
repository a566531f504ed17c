"""Reconstruction recipes: the published settings of BRECQ, QDrop and PD-Quant, the presets that
shorten them for a CPU, and how a run's options become one `ReconstructionSettings`.

Torch-free, so that the command line can show these defaults without loading torch.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import QuantizeConfig

log = logging.getLogger(__name__)

METHODS = ("brecq", "qdrop", "pdquant")
PAPER_ITERS, PAPER_WEIGHT_LR, PAPER_CORRECTION_STEPS, PAPER_CORRECTION_LR = 20000, 1e-3, 500, 1e-3
FAST_ITERS = 1000
QUICK_ITERS = 200
# Part of every checkpoint's fingerprint: a checkpoint written by reconstruction code that trains
# differently (another version) is discarded instead of resumed. Raise it with such a change.
RECONSTRUCTION_VERSION = "2"


@dataclass(frozen=True)
class ReconstructionSettings:
    """Published defaults (BRECQ/QDrop): 20k iterations of batch 32 per unit, AdaRound with lambda
    by network (0.01 for ResNet/RegNet, 0.1 for MobileNet-like, see `network_defaults`) and beta
    20 -> 2 after a 20 % warm-up, Adam 1e-3 on the rounding variables (PD-Quant's code: 3e-3, see
    `method_defaults`) and 4e-5 with cosine decay on the activation step sizes, QDrop probability
    0.5 (per unit; lower inside ModCap groups, see `drop_probability`). PD-Quant: lambda_r 0.1,
    temperature and lambda_c by network (T 4, lambda_c 0.02 for ResNet/RegNet; T 1, lambda_c
    0.005 for MobileNet-like), distribution correction with Adam 1e-3 for 500 steps
    (`correction_steps`)."""

    method: str = "qdrop"
    iters: int = PAPER_ITERS
    batch_size: int = 32
    weight_lr: float = PAPER_WEIGHT_LR
    act_lr: float = 4e-5
    round_lambda: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    drop_prob: float = 0.5
    pd_temperature: float = 4.0
    pd_lambda: float = 0.1
    pd_batch_size: int | None = None  # images of each batch carried to the logits (None: all)
    pd_interval: int = 1  # the prediction difference joins every pd_interval-th iteration, weighted x pd_interval
    dc_lambda: float = 0.02
    dc: bool = True

    @property
    def drops(self) -> bool:
        return self.method in ("qdrop", "pdquant")

    @property
    def correction_steps(self) -> int:
        """Distribution correction takes the published 500 steps for 20 000 iterations, and the same
        share of fewer iterations: a fixed 500 (or 50) steps would cost more than the reconstruction
        itself at the fast preset's 1 000 iterations."""
        return max(1, round(self.iters * PAPER_CORRECTION_STEPS / PAPER_ITERS))

    @property
    def correction_lr(self) -> float:
        """Scaled so that steps x learning rate, the farthest Adam can move an input, stays as published."""
        return PAPER_CORRECTION_LR * PAPER_CORRECTION_STEPS / self.correction_steps


PRESETS = {
    "paper": {},
    # Measured on the shipped models (docs/benchmarks/modcap.md): "The whole grid" for the accuracy
    # it keeps, "PD-Quant's prediction difference runs on 8 images every fourth iteration" for
    # pd_batch_size and pd_interval, and "The fast preset needs a rounding rate of 2e-2" for the
    # rounding variables' learning rate, raised so that iterations x rate stays as published
    # (20 000 x 1e-3): at 1e-3, 1 000 iterations leave the rounding far from settled.
    "fast": {"iters": FAST_ITERS, "weight_lr": PAPER_WEIGHT_LR * PAPER_ITERS / FAST_ITERS, "pd_batch_size": 8, "pd_interval": 4},
    # For a CPU and real resolution, where 1 000 iterations per unit of a 224x224 network take an
    # hour or more on 2 cores: docs/benchmarks/reconstruct.md, "EfficientNet-Lite1 W4A8 side by
    # side", for the time and the fidelity it keeps.
    "quick": {"iters": QUICK_ITERS, "weight_lr": PAPER_WEIGHT_LR * PAPER_ITERS / QUICK_ITERS, "pd_batch_size": 8,
              "pd_interval": 4},
}


def method_defaults(method: str) -> dict:
    """PD-Quant's published code trains the rounding variables with Adam at 3e-3; BRECQ's and QDrop's at 1e-3."""
    return {"weight_lr": 3e-3} if method == "pdquant" else {}


def network_defaults(depthwise: bool) -> dict:
    """The published settings that depend on the network. MobileNet-like networks (depthwise
    convolutions) weight AdaRound's rounding loss 0.1 (QDrop's MobileNetV2 recipe; its MNASNet one
    uses 0.2) and use PD-Quant's T = 1 and lambda_c = 0.005; ResNet/RegNet keep the
    ReconstructionSettings defaults: rounding loss 0.01, T = 4 and lambda_c = 0.02."""
    return {"round_lambda": 0.1, "pd_temperature": 1.0, "dc_lambda": 0.005} if depthwise else {}


def drop_probability(settings: ReconstructionSettings, group_size: int) -> float:
    """QDrop's probability for one unit. A ModCap group of n units drops with 1 - (1 - p)^(1/n) at
    each site, so that an element stays quantized across the whole group as often as across one
    unit (p = 0.5: 0.29 in a group of two, 0.21 in a group of three). With p itself at every site
    of a three-unit group, the group's output error at 2-bit activations ended well above
    unit-by-unit reconstruction, and far apart from seed to seed (docs/benchmarks/modcap.md, "QDrop
    drops less inside a ModCap group")."""
    if not settings.drops:
        return 0.0
    return 1.0 - (1.0 - settings.drop_prob) ** (1.0 / group_size)


def rounding_beta(step: int, settings: ReconstructionSettings) -> float | None:
    """None during the warm-up (no rounding loss), then beta annealed from beta_start to beta_end."""
    warmup = int(settings.warmup * settings.iters)
    if step < warmup:
        return None
    fraction = (step - warmup) / max(1, settings.iters - warmup)
    return settings.beta_end + 0.5 * (settings.beta_start - settings.beta_end) * (1 + math.cos(math.pi * fraction))


# Quantized activation values per image above which `--preset auto` on a CPU takes the quick preset:
# the shipped 28x28 networks have 0.06-0.10 million, OpenNSFW (224x224) 8.8 million and
# EfficientNet-Lite1 (240x240) 10.7 million (docs/benchmarks/reconstruct.md, "Activation values per
# image"), where the quick preset's 200 iterations per unit already take 11 minutes on 2 cores.
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


def reconstruction_settings(config: QuantizeConfig, depthwise: bool) -> ReconstructionSettings:
    chosen = {**method_defaults(config.method), **PRESETS[config.preset], "method": config.method,
              "batch_size": config.batch_size, "dc": config.dc, **network_defaults(depthwise)}
    given = {"iters": config.iters, "round_lambda": config.round_lambda, "weight_lr": config.round_lr,
             "pd_temperature": config.pd_temperature, "pd_lambda": config.pd_lambda, "dc_lambda": config.dc_lambda}
    chosen.update({key: value for key, value in given.items() if value is not None})
    return ReconstructionSettings(**chosen)
