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

from .errors import UserError, first_line
from .metrics import OutputFidelity, class_scores, fidelity, output_kind
from .mirror import NetworkMirror
from .runtime import create_session, run_batched, session_provider
from .graph import dynamic_image_axes

PARITY_TOLERANCE = 1e-4  # max |ORT - simulation| relative to each output's range in the simulation
MIN_EXACT_IMAGES = 0.75  # share of parity images that must agree within PARITY_TOLERANCE
MIN_ARGMAX_AGREEMENT = 0.95
NOISE_PERTURBATION = 1e-5  # relative input perturbation that measures ONNX Runtime's own rounding noise
MAX_NOISE_RATIO = 2.0  # ||ORT - simulation|| may be at most this multiple of that noise
BATCH = 32
SECOND_SIZE_STEP = 32  # a dynamic image size is also checked this many pixels larger (a multiple of every stride)


@dataclass
class OutputParity:
    """ONNX Runtime against the simulation on one graph output; norms are relative to the output's
    range in the simulation, so outputs of any scale compare."""

    name: str
    max_abs_diff: float
    max_abs_diff_relative: float
    gap: float  # ||ORT - simulation||
    ort_noise: float  # ||ORT(perturbed input) - ORT||
    torch_noise: float  # ||simulation(other convolution order) - simulation||
    argmax_agreement: float | None  # on the class axis, where the output holds class scores
    torch_argmax_agreement: float | None  # of the simulation with itself across convolution orders
    top1_changes: int | None = None  # rows (images or positions) where ONNX Runtime's top-1 differs
    top1_changes_beyond_noise: int | None = None  # of those, the ones rounding noise cannot explain
    torch_top1_changes: int | None = None  # rows where another convolution order changes the simulation's top-1

    @property
    def noise_ratio(self) -> float:
        """The gap as a multiple of the larger noise (inf where a gap meets no noise at all)."""
        noise = max(self.ort_noise, self.torch_noise)
        if noise > 0:
            return self.gap / noise
        return 0.0 if self.gap == 0 else float("inf")

    @property
    def predictions_agree(self) -> bool:
        """Top-1 agrees on MIN_ARGMAX_AGREEMENT of the images (or positions), or rounding noise
        explains every change (`top1_changes_beyond_noise`), or ONNX Runtime changes top-1 on at
        most MAX_NOISE_RATIO times as many rows as another convolution order changes the
        simulation's own. A flip lands on a row by chance: the last rule catches a row that ONNX
        Runtime's order flips and torch's other order happens not to."""
        if self.argmax_agreement is None:
            return True
        return (self.argmax_agreement >= MIN_ARGMAX_AGREEMENT or self.top1_changes_beyond_noise == 0
                or self.top1_changes <= MAX_NOISE_RATIO * self.torch_top1_changes)

    def to_dict(self) -> dict:
        return {**asdict(self), "noise_ratio": self.noise_ratio}


@dataclass
class Parity:
    """The exported file against the simulation on one set of inputs, every output at once."""

    images: int
    input_shape: list[int]  # of one batch of parity inputs
    exact_images: float  # share of images whose every output agrees within PARITY_TOLERANCE
    outputs: list[OutputParity]

    @property
    def max_abs_diff_relative(self) -> float:
        return max(o.max_abs_diff_relative for o in self.outputs)

    @property
    def noise_ratio(self) -> float:
        return max(o.noise_ratio for o in self.outputs)

    @property
    def argmax_agreement(self) -> float | None:
        """The lowest over the outputs that hold class scores (None: no such output)."""
        return min((o.argmax_agreement for o in self.outputs if o.argmax_agreement is not None), default=None)

    @property
    def within_noise(self) -> bool:
        return self.exact_images >= MIN_EXACT_IMAGES or self.noise_ratio <= MAX_NOISE_RATIO

    @property
    def ok(self) -> bool:
        return self.within_noise and all(o.predictions_agree for o in self.outputs)

    def to_dict(self) -> dict:
        return {"images": self.images, "input_shape": self.input_shape, "exact_images": self.exact_images,
                "max_abs_diff_relative": self.max_abs_diff_relative, "noise_ratio": self.noise_ratio,
                "argmax_agreement": self.argmax_agreement, "parity_ok": self.ok,
                "outputs": [o.to_dict() for o in self.outputs]}

    def noise_text(self) -> str:
        if np.isinf(self.noise_ratio):  # neither perturbation moved an output: no noise to compare with
            return ("not comparable with rounding noise (neither a 1e-5 input nudge nor another convolution "
                    "order moved any output)")
        return f"{self.noise_ratio:.3g}x the rounding noise"

    def text(self) -> str:
        argmax = "" if self.argmax_agreement is None else f", argmax agreement {self.argmax_agreement:.1%}"
        return (f"{self.exact_images:.1%} of images within {PARITY_TOLERANCE:g} of the output range, max diff "
                f"{self.max_abs_diff_relative:.2e}{argmax}, {self.noise_text()}")

    def failures(self) -> list[str]:
        problems = []
        if not self.within_noise:
            problems.append(
                f"only {self.exact_images:.1%} of {self.images} images agree with the simulation within "
                f"{PARITY_TOLERANCE:g} of the output range (max diff {self.max_abs_diff_relative:.2e}) and the gap "
                f"is {self.noise_text()} (at most {MAX_NOISE_RATIO:g}x allowed)")
        for output in self.outputs:
            if not output.predictions_agree:
                problems.append(
                    f"argmax agreement of output {output.name!r} {output.argmax_agreement:.1%} (at least "
                    f"{MIN_ARGMAX_AGREEMENT:.0%} needed, or every top-1 change within rounding noise; "
                    f"{output.top1_changes_beyond_noise} of {output.top1_changes} are not, and another convolution "
                    f"order changes the simulation's own top-1 on only {output.torch_top1_changes})")
        return problems


@dataclass
class Validation:
    held_out: bool
    provider: str
    parity: Parity
    fidelity: list[OutputFidelity]  # to the float model, per output
    # a model with a dynamic image size: parity at a second size, or why it was not checked
    second_size: Parity | None = None
    second_size_skipped: str | None = None

    @property
    def images(self) -> int:
        return self.parity.images

    @property
    def parity_ok(self) -> bool:
        return self.parity.ok and (self.second_size is None or self.second_size.ok)

    @property
    def classes(self) -> OutputFidelity | None:
        """The fidelity of the first output that holds class scores."""
        return next((f for f in self.fidelity if f.top1_agreement is not None), None)

    def to_dict(self) -> dict:
        """The parity at the main size at the top level, as before multi-output models, then every
        output's parity and fidelity."""
        classes = self.classes
        return {
            "images": self.images, "held_out": self.held_out, "provider": self.provider,
            **{key: value for key, value in self.parity.to_dict().items() if key != "outputs"},
            "parity_ok": self.parity_ok, "parity_tolerance": PARITY_TOLERANCE,
            "float_top1_agreement": classes.top1_agreement if classes else None,
            "float_kl": classes.kl if classes else None,
            "float_cosine": self.fidelity[0].cosine,
            "outputs": [{**parity.to_dict(), "fidelity": fidelity.to_dict()}
                        for parity, fidelity in zip(self.parity.outputs, self.fidelity)],
            "second_size": self.second_size.to_dict() if self.second_size else None,
            "second_size_skipped": self.second_size_skipped,
        }

    def summary(self) -> str:
        held = "held-out images" if self.held_out else "calibration images (no held-out images left)"
        lines = [f"parity on {self.images} {held} ({self.provider}): {self.parity.text()}"]
        if self.second_size:
            lines.append(f"parity at a second input size {shape_text(self.second_size.input_shape)}: "
                         f"{self.second_size.text()}")
        elif self.second_size_skipped:
            lines.append(f"parity at a second input size not checked: {self.second_size_skipped}")
        if len(self.fidelity) == 1:
            lines.append(f"fidelity to the float model: {self.fidelity[0].text()}")
        else:
            lines += ["fidelity to the float model, per output:"] + [f"  {f.text()}" for f in self.fidelity]
        return "\n".join(lines)


def validate(exported: str, float_model: str, mirror: NetworkMirror, inputs: np.ndarray, held_out: bool,
             device: torch.device, provider: str = "auto") -> Validation:
    """Parity and fidelity; with a dynamic image size, parity at a second size too. One session at a
    time: a large model's float and quantized sessions need not coexist."""
    float_session = create_session(float_model, provider)
    names = [o.name for o in float_session.get_outputs()]
    float_outputs = run_batched(float_session, inputs, BATCH)
    kinds = [output_kind(output) for output in float_outputs]
    axes = dynamic_image_axes(float_session.get_inputs()[0].shape)
    larger, skipped = (second_size_inputs(inputs, axes), None) if axes else (None, None)
    if larger is not None:
        try:
            run_batched(float_session, larger[:1], BATCH)
        except Exception as err:  # onnxruntime raises its own exception types per failure kind
            larger, skipped = None, f"the source model does not run on input {list(larger.shape[1:])}: {first_line(err)}"
    del float_session
    session = create_session(exported, provider)
    parity, ort_outputs = check_parity(session, mirror, inputs, names, kinds, device)
    return Validation(held_out=held_out, provider=session_provider(session), parity=parity,
                      fidelity=fidelity(names, float_outputs, ort_outputs),
                      second_size=check_parity(session, mirror, larger, names, kinds, device)[0]
                      if larger is not None else None,
                      second_size_skipped=skipped)


def check_parity(session, mirror: NetworkMirror, inputs: np.ndarray, names: list[str], kinds: list[str],
                 device: torch.device) -> tuple[Parity, list[np.ndarray]]:
    """The parity of the session's outputs with the simulation's, and the session's outputs."""
    noise = np.random.default_rng(0).standard_normal(inputs.shape).astype(np.float32) * NOISE_PERTURBATION
    try:
        ort_outputs = run_batched(session, inputs, BATCH)
        perturbed_outputs = run_batched(session, inputs * (1 + noise), BATCH)
    except Exception as err:  # onnxruntime raises its own exception types per failure kind
        raise UserError(f"the written model fails in ONNX Runtime on input {list(inputs.shape[1:])}: "
                        f"{first_line(err)}; nothing was written") from None
    batches = [inputs[start:start + BATCH] for start in range(0, len(inputs), BATCH)]
    sim_outputs = simulated_outputs(mirror, batches, device)
    with other_convolution_order(device):
        reordered_outputs = simulated_outputs(mirror, batches, device)
    outputs, exact = [], np.ones(len(inputs), bool)
    flat = lambda x: x.reshape(len(x), -1)  # noqa: E731
    for name, kind, ort_out, perturbed, sim, reordered in zip(names, kinds, ort_outputs, perturbed_outputs,
                                                              sim_outputs, reordered_outputs):
        scale = float(sim.max() - sim.min()) or 1.0
        per_image = np.abs(flat(ort_out) - flat(sim)).max(axis=1)
        exact &= per_image <= PARITY_TOLERANCE * scale
        classes = kind != "tensor"
        outputs.append(OutputParity(
            name=name, max_abs_diff=float(per_image.max()), max_abs_diff_relative=float(per_image.max()) / scale,
            gap=float(np.linalg.norm(ort_out - sim)) / scale,
            ort_noise=float(np.linalg.norm(perturbed - ort_out)) / scale,
            torch_noise=float(np.linalg.norm(reordered - sim)) / scale,
            argmax_agreement=agreement(ort_out, sim, kind) if classes else None,
            torch_argmax_agreement=agreement(reordered, sim, kind) if classes else None,
            **(top1_changes(ort_out, sim, perturbed, reordered, kind) if classes else {})))
    return Parity(images=len(inputs), input_shape=list(inputs.shape[1:]), exact_images=float(exact.mean()),
                  outputs=outputs), ort_outputs


def second_size_inputs(inputs: np.ndarray, axes: list[int]) -> np.ndarray:
    """The parity inputs, SECOND_SIZE_STEP larger along each dynamic axis (edges repeated)."""
    widths = [(0, SECOND_SIZE_STEP if axis in axes else 0) for axis in range(inputs.ndim)]
    return np.pad(inputs, widths, mode="edge")


def shape_text(shape: list[int]) -> str:
    return "x".join(str(dim) for dim in shape)


def simulated_outputs(mirror: NetworkMirror, batches: list[np.ndarray], device: torch.device) -> list[np.ndarray]:
    """Every output of the simulation, batches concatenated."""
    with torch.no_grad():
        results = [[output.float().cpu().numpy() for output in mirror(torch.from_numpy(batch).to(device))]
                   for batch in batches]
    return [np.concatenate(outputs) for outputs in zip(*results)]


@contextmanager
def other_convolution_order(device: torch.device):
    """Torch's own convolution kernels instead of oneDNN's (CPU) or cuDNN's (CUDA): the same float32
    arithmetic, summed in another order, as ONNX Runtime's kernels sum it in yet another."""
    backend = torch.backends.cudnn if device.type == "cuda" else torch.backends.mkldnn
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's mkldnn.flags warns about TF32 on Intel GPUs
        with backend.flags(enabled=False):
            yield


def agreement(a: np.ndarray, b: np.ndarray, kind: str) -> float:
    return float((class_scores(a, kind).argmax(axis=1) == class_scores(b, kind).argmax(axis=1)).mean())


def top1_changes(ort_out: np.ndarray, sim: np.ndarray, perturbed: np.ndarray, reordered: np.ndarray,
                 kind: str) -> dict[str, int]:
    """Rows where ONNX Runtime's top class differs from the simulation's, and how many of them
    rounding noise cannot explain. Noise that moves every score of a row by at most `a` changes
    the lead of one class over another by at most 2a; a change is explained when the simulation
    ranks its top class ahead of ONNX Runtime's by at most MAX_NOISE_RATIO x 2a, with `a` the
    larger of the two noises measured on that row (another convolution order in torch, a 1e-5
    nudge of the input in ONNX Runtime). Also the rows where that other order changes the
    simulation's own top class."""
    ort_scores, sim_scores, reordered_scores = (class_scores(x, kind) for x in (ort_out, sim, reordered))
    noise = np.maximum(np.abs(reordered_scores - sim_scores).max(axis=1),
                       np.abs(class_scores(perturbed, kind) - ort_scores).max(axis=1))
    rows = np.arange(len(sim_scores))
    ours, theirs = sim_scores.argmax(axis=1), ort_scores.argmax(axis=1)
    changed = ours != theirs
    lead = sim_scores[rows, ours] - sim_scores[rows, theirs]
    return {"top1_changes": int(changed.sum()),
            "top1_changes_beyond_noise": int((changed & (lead > MAX_NOISE_RATIO * 2 * noise)).sum()),
            "torch_top1_changes": int((reordered_scores.argmax(axis=1) != ours).sum())}


def require_parity(validation: Validation) -> None:
    failures = validation.parity.failures()
    if validation.second_size:
        failures += [f"at input {shape_text(validation.second_size.input_shape)}: {failure}"
                     for failure in validation.second_size.failures()]
    if failures:
        raise UserError(f"parity check failed: {'; '.join(failures)}; nothing was written")
