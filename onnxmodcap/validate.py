"""Stage 8, validate: the exported file in ONNX Runtime against the torch simulation (parity) and
against the float model (fidelity).

Parity is judged per image. Torch and ONNX Runtime sum convolutions, poolings and normalisations in
different orders, so a float value that lies within about 1e-7 of a rounding boundary can land on
the neighbouring grid point in one of them; that one-step flip then shows in the outputs of that
image. Images without such a flip agree to float precision. Where ONNX Runtime fuses a Conv into an
int8 kernel it requantizes the integer sum with its own multiplier, which flips a few more values
(measured: up to 11 % of images at W8A8 on the shipped RegNetX). A wrong export (a different grid,
scale, rounding or bias) changes every image, so parity requires most images to agree within
PARITY_TOLERANCE and the predictions to agree.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from .errors import UserError
from .evaluate import cosine_similarity, kl_divergence
from .mirror import NetworkMirror
from .runtime import create_session, session_provider

PARITY_TOLERANCE = 1e-4  # max |ORT - simulation| relative to the simulation's output range
MIN_EXACT_IMAGES = 0.75  # share of parity images that must agree within PARITY_TOLERANCE
MIN_ARGMAX_AGREEMENT = 0.95
BATCH = 32


@dataclass
class Validation:
    images: int
    held_out: bool
    provider: str
    max_abs_diff: float
    max_abs_diff_relative: float
    exact_images: float  # share of images whose outputs agree within PARITY_TOLERANCE
    argmax_agreement: float
    float_top1_agreement: float
    float_kl: float
    float_cosine: float

    @property
    def parity_ok(self) -> bool:
        return self.exact_images >= MIN_EXACT_IMAGES and self.argmax_agreement >= MIN_ARGMAX_AGREEMENT

    def to_dict(self) -> dict:
        return {**asdict(self), "parity_ok": self.parity_ok, "parity_tolerance": PARITY_TOLERANCE}

    def summary(self) -> str:
        held = "held-out" if self.held_out else "calibration (no held-out images left)"
        return (f"parity on {self.images} {held} images ({self.provider}): {self.exact_images:.1%} of images "
                f"within {PARITY_TOLERANCE:g} of the output range, max diff {self.max_abs_diff_relative:.2e}, "
                f"argmax agreement {self.argmax_agreement:.1%}\n"
                f"fidelity to the float model: top-1 agreement {self.float_top1_agreement:.1%}, "
                f"KL {self.float_kl:.4f}, cosine {self.float_cosine:.4f}")


def validate(exported: str, float_model: str, mirror: NetworkMirror, inputs: np.ndarray, held_out: bool,
             device: torch.device, provider: str = "auto") -> Validation:
    quantized = create_session(exported, provider)
    reference = create_session(float_model, provider)
    name = quantized.get_inputs()[0].name
    ort_out, sim_out, float_out = [], [], []
    with torch.no_grad():
        for start in range(0, len(inputs), BATCH):
            batch = inputs[start:start + BATCH]
            ort_out.append(quantized.run(None, {name: batch})[0])
            float_out.append(reference.run(None, {reference.get_inputs()[0].name: batch})[0])
            sim_out.append(mirror(torch.from_numpy(batch).to(device))[0].float().cpu().numpy())
    ort_logits, sim_logits, float_logits = (np.concatenate(x) for x in (ort_out, sim_out, float_out))
    output_range = float(sim_logits.max() - sim_logits.min()) or 1.0
    flat = lambda x: x.reshape(len(x), -1)  # noqa: E731
    per_image = np.abs(flat(ort_logits) - flat(sim_logits)).max(axis=1)
    return Validation(
        images=len(inputs), held_out=held_out, provider=session_provider(quantized),
        max_abs_diff=float(per_image.max()), max_abs_diff_relative=float(per_image.max()) / output_range,
        exact_images=float((per_image <= PARITY_TOLERANCE * output_range).mean()),
        argmax_agreement=agreement(ort_logits, sim_logits),
        float_top1_agreement=agreement(ort_logits, float_logits),
        float_kl=float(kl_divergence(flat(float_logits), flat(ort_logits)).mean()),
        float_cosine=float(cosine_similarity(flat(float_logits), flat(ort_logits)).mean()),
    )


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(axis=1) == b.argmax(axis=1)).mean())


def require_parity(validation: Validation) -> None:
    if not validation.parity_ok:
        raise UserError(
            f"parity check failed: only {validation.exact_images:.1%} of {validation.images} images agree with the "
            f"simulation within {PARITY_TOLERANCE:g} of the output range (max diff {validation.max_abs_diff_relative:.2e}), "
            f"argmax agreement {validation.argmax_agreement:.1%}; nothing was written")
