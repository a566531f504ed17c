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

Deep networks at full resolution hold millions of activations per image, so nearly every image has
a flip somewhere, and flips spread through the later layers (measured on a 224x224 ResNet-50 at
W4A4: no image within 1e-4); so do low-bit networks whose values sit on rounding boundaries. For
them the gap between ONNX Runtime and the simulation is compared with two measures of rounding
noise: how far ONNX Runtime's outputs move when the input moves by a relative 1e-5, and how far the
simulation's own outputs move when torch sums its convolutions in another order (its own kernels
instead of oneDNN's or cuDNN's). The first is blind where the input quantizer's grid matches the
input's (8-bit images), the second catches every layer's flips. A gap within twice the larger
noise is the same kind of difference; a wrong export is far above it.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
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
NOISE_PERTURBATION = 1e-5  # relative input perturbation that measures ONNX Runtime's own rounding noise
MAX_NOISE_RATIO = 2.0  # ||ORT - simulation|| may be at most this multiple of that noise
BATCH = 32


@dataclass
class Validation:
    images: int
    held_out: bool
    provider: str
    max_abs_diff: float
    max_abs_diff_relative: float
    exact_images: float  # share of images whose outputs agree within PARITY_TOLERANCE
    gap: float  # ||ORT - simulation|| over all parity outputs
    ort_noise: float  # ||ORT(perturbed input) - ORT||
    torch_noise: float  # ||simulation(other convolution order) - simulation||
    argmax_agreement: float
    torch_argmax_agreement: float  # of the simulation with itself across convolution orders
    float_top1_agreement: float
    float_kl: float
    float_cosine: float

    @property
    def noise_ratio(self) -> float:
        """The gap as a multiple of the larger noise (inf where a gap meets no noise at all)."""
        noise = max(self.ort_noise, self.torch_noise)
        if noise > 0:
            return self.gap / noise
        return 0.0 if self.gap == 0 else float("inf")

    @property
    def within_noise(self) -> bool:
        return self.exact_images >= MIN_EXACT_IMAGES or self.noise_ratio <= MAX_NOISE_RATIO

    @property
    def predictions_agree(self) -> bool:
        """Top-1 agrees on MIN_ARGMAX_AGREEMENT of the images, or changes on at most MAX_NOISE_RATIO
        times as many as torch's own rounding noise changes (networks with near-tied logits)."""
        changed, changed_by_noise = 1 - self.argmax_agreement, 1 - self.torch_argmax_agreement
        return self.argmax_agreement >= MIN_ARGMAX_AGREEMENT or changed <= MAX_NOISE_RATIO * changed_by_noise

    @property
    def parity_ok(self) -> bool:
        return self.within_noise and self.predictions_agree

    def to_dict(self) -> dict:
        return {**asdict(self), "noise_ratio": self.noise_ratio, "parity_ok": self.parity_ok,
                "parity_tolerance": PARITY_TOLERANCE}

    def noise_text(self) -> str:
        if np.isinf(self.noise_ratio):  # neither perturbation moved an output: no noise to compare with
            return ("not comparable with rounding noise (neither a 1e-5 input nudge nor another convolution "
                    "order moved any output)")
        return f"{self.noise_ratio:.3g}x the rounding noise"

    def summary(self) -> str:
        held = "held-out images" if self.held_out else "calibration images (no held-out images left)"
        return (f"parity on {self.images} {held} ({self.provider}): {self.exact_images:.1%} of images "
                f"within {PARITY_TOLERANCE:g} of the output range, max diff {self.max_abs_diff_relative:.2e}, "
                f"argmax agreement {self.argmax_agreement:.1%}, {self.noise_text()}\n"
                f"fidelity to the float model: top-1 agreement {self.float_top1_agreement:.1%}, "
                f"KL {self.float_kl:.4f}, cosine {self.float_cosine:.4f}")


def validate(exported: str, float_model: str, mirror: NetworkMirror, inputs: np.ndarray, held_out: bool,
             device: torch.device, provider: str = "auto") -> Validation:
    noise = np.random.default_rng(0).standard_normal(inputs.shape).astype(np.float32) * NOISE_PERTURBATION
    starts = range(0, len(inputs), BATCH)
    batches = [inputs[start:start + BATCH] for start in starts]
    perturbed = [inputs[start:start + BATCH] * (1 + noise[start:start + BATCH]) for start in starts]
    (float_logits,), _ = session_outputs(float_model, provider, batches)
    (ort_logits, perturbed_logits), used_provider = session_outputs(exported, provider, batches, perturbed)
    sim_logits = simulated_outputs(mirror, batches, device)
    with other_convolution_order(device):
        reordered_logits = simulated_outputs(mirror, batches, device)
    output_range = float(sim_logits.max() - sim_logits.min()) or 1.0
    flat = lambda x: x.reshape(len(x), -1)  # noqa: E731
    per_image = np.abs(flat(ort_logits) - flat(sim_logits)).max(axis=1)
    return Validation(
        images=len(inputs), held_out=held_out, provider=used_provider,
        max_abs_diff=float(per_image.max()), max_abs_diff_relative=float(per_image.max()) / output_range,
        exact_images=float((per_image <= PARITY_TOLERANCE * output_range).mean()),
        gap=float(np.linalg.norm(ort_logits - sim_logits)),
        ort_noise=float(np.linalg.norm(perturbed_logits - ort_logits)),
        torch_noise=float(np.linalg.norm(reordered_logits - sim_logits)),
        argmax_agreement=agreement(ort_logits, sim_logits),
        torch_argmax_agreement=agreement(reordered_logits, sim_logits),
        float_top1_agreement=agreement(ort_logits, float_logits),
        float_kl=float(kl_divergence(flat(float_logits), flat(ort_logits)).mean()),
        float_cosine=float(cosine_similarity(flat(float_logits), flat(ort_logits)).mean()),
    )


def simulated_outputs(mirror: NetworkMirror, batches: list[np.ndarray], device: torch.device) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([mirror(torch.from_numpy(batch).to(device))[0].float().cpu().numpy() for batch in batches])


@contextmanager
def other_convolution_order(device: torch.device):
    """Torch's own convolution kernels instead of oneDNN's (CPU) or cuDNN's (CUDA): the same float32
    arithmetic, summed in another order, as ONNX Runtime's kernels sum it in yet another."""
    backend = torch.backends.cudnn if device.type == "cuda" else torch.backends.mkldnn
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's mkldnn.flags warns about TF32 on Intel GPUs
        with backend.flags(enabled=False):
            yield


def session_outputs(model: str, provider: str, *input_sets: list[np.ndarray]) -> tuple[list[np.ndarray], str]:
    """The first output of `model` for each list of batches, and the provider that ran. One session
    at a time, released on return: a large model's float and quantized sessions need not coexist."""
    session = create_session(model, provider)
    name = session.get_inputs()[0].name
    outputs = [np.concatenate([session.run(None, {name: batch})[0] for batch in batches]) for batches in input_sets]
    return outputs, session_provider(session)


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(axis=1) == b.argmax(axis=1)).mean())


def require_parity(validation: Validation) -> None:
    failures = []
    if not validation.within_noise:
        failures.append(
            f"only {validation.exact_images:.1%} of {validation.images} images agree with the simulation within "
            f"{PARITY_TOLERANCE:g} of the output range (max diff {validation.max_abs_diff_relative:.2e}) and the gap "
            f"is {validation.noise_text()} (at most {MAX_NOISE_RATIO:g}x allowed)")
    if not validation.predictions_agree:
        failures.append(
            f"argmax agreement {validation.argmax_agreement:.1%} of {validation.images} images (at least "
            f"{MIN_ARGMAX_AGREEMENT:.0%} needed, or at most {MAX_NOISE_RATIO:g}x the "
            f"{1 - validation.torch_argmax_agreement:.1%} of top-1 changes torch's own rounding noise makes)")
    if failures:
        raise UserError(f"parity check failed: {'; '.join(failures)}; nothing was written")
