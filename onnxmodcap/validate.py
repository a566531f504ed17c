"""Stage 8, validate: the exported file in ONNX Runtime against the torch simulation (parity) and
against the float model (fidelity)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from .errors import UserError
from .evaluate import cosine_similarity, kl_divergence
from .mirror import NetworkMirror
from .runtime import create_session, session_provider

PARITY_TOLERANCE = 1e-4  # max |ORT - simulation| relative to the simulation's output range
BATCH = 32


@dataclass
class Validation:
    images: int
    held_out: bool
    provider: str
    max_abs_diff: float
    max_abs_diff_relative: float
    argmax_agreement: float
    float_top1_agreement: float
    float_kl: float
    float_cosine: float

    @property
    def parity_ok(self) -> bool:
        return self.max_abs_diff_relative <= PARITY_TOLERANCE and self.argmax_agreement == 1.0

    def to_dict(self) -> dict:
        return {**asdict(self), "parity_ok": self.parity_ok, "parity_tolerance": PARITY_TOLERANCE}


def validate(exported: bytes, float_model: str, mirror: NetworkMirror, inputs: np.ndarray, held_out: bool,
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
    diff = float(np.abs(ort_logits - sim_logits).max())
    output_range = float(sim_logits.max() - sim_logits.min()) or 1.0
    flat = lambda x: x.reshape(len(x), -1)  # noqa: E731
    return Validation(
        images=len(inputs), held_out=held_out, provider=session_provider(quantized),
        max_abs_diff=diff, max_abs_diff_relative=diff / output_range,
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
            f"parity check failed: ONNX Runtime differs from the simulation by {validation.max_abs_diff_relative:.2e} "
            f"of the output range (tolerance {PARITY_TOLERANCE:g}), argmax agreement "
            f"{validation.argmax_agreement:.1%}; nothing was written")
