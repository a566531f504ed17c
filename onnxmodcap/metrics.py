"""How close a model's outputs are to a reference model's (the float model), output by output.

Every output gets metrics that hold for any tensor: SQNR (signal-to-quantization-noise ratio, dB),
the mean cosine similarity of each image's output, and the relative L2 error. An output that holds
class scores also gets top-1 agreement and KL(softmax(reference) || softmax(output)) on its class
axis. `output_kind` decides from the reference output:
- `classes`: (N, C) with C >= 2, or (N, C, 1, ..., 1); the class axis is 1;
- `sequence`: (N, T, C) whose values along the last axis are probabilities (a softmax, such as a
  CTC text recogniser's); agreement and KL are per position;
- `tensor`: anything else (a detector's probability map, boxes, features): no class metrics.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

KINDS = ("classes", "sequence", "tensor")
PROBABILITY_TOLERANCE = 1e-3  # how far from 1 a softmax's sum may be
# Probabilities below this count as this in KL: a quantized softmax output holds exact zeros, and
# log(0) would let one negligible class dominate the divergence.
PROBABILITY_FLOOR = 1e-6


@dataclass(frozen=True)
class OutputFidelity:
    name: str
    kind: str  # one of KINDS
    sqnr_db: float
    cosine: float
    relative_l2: float
    top1_agreement: float | None  # classes: of images; sequence: of positions; tensor: None
    kl: float | None  # mean per image (classes) or per position (sequence), nats

    def to_dict(self) -> dict:
        return asdict(self)

    def text(self) -> str:
        classes = (f", top-1 agreement {self.top1_agreement:.1%}, KL {self.kl:.4f}"
                   if self.top1_agreement is not None else "")
        per = {"classes": "class scores", "sequence": "class scores per position", "tensor": "tensor"}[self.kind]
        return (f"{self.name} ({per}): SQNR {self.sqnr_db:.1f} dB, cosine {self.cosine:.4f}, "
                f"relative L2 {self.relative_l2:.4f}{classes}")


def output_kind(reference: np.ndarray) -> str:
    if reference.ndim >= 2 and reference.shape[1] >= 2 and all(d == 1 for d in reference.shape[2:]):
        return "classes"
    if reference.ndim == 3 and reference.shape[2] >= 2 and holds_probabilities(reference, axis=2):
        return "sequence"
    return "tensor"


def class_scores(values: np.ndarray, kind: str) -> np.ndarray:
    """(rows, classes): one row per image (classes) or per position (sequence)."""
    return values.reshape(len(values), -1) if kind == "classes" else values.reshape(-1, values.shape[-1])


class FidelityTotals:
    """Running sums of one output's metrics over batches; `result` gives the means."""

    def __init__(self, name: str, kind: str):
        self.name, self.kind = name, kind
        self.images = self.rows = self.agreeing_rows = 0
        self.signal = self.noise = self.cosine = self.kl = 0.0

    def add(self, reference: np.ndarray, actual: np.ndarray) -> None:
        reference, actual = reference.astype(np.float64), actual.astype(np.float64)
        flat_reference, flat_actual = reference.reshape(len(reference), -1), actual.reshape(len(actual), -1)
        self.images += len(reference)
        self.signal += float((flat_reference ** 2).sum())
        self.noise += float(((flat_actual - flat_reference) ** 2).sum())
        self.cosine += float(cosine_similarity(flat_reference, flat_actual).sum())
        if self.kind != "tensor":
            want, got = class_scores(reference, self.kind), class_scores(actual, self.kind)
            self.rows += len(want)
            self.agreeing_rows += int((want.argmax(axis=1) == got.argmax(axis=1)).sum())
            self.kl += float(kl_divergence(want, got).sum())

    def result(self) -> OutputFidelity:
        tiny = np.finfo(np.float64).tiny
        classes = self.kind != "tensor" and self.rows > 0
        return OutputFidelity(
            name=self.name, kind=self.kind,
            sqnr_db=float(10 * (np.log10(max(self.signal, tiny)) - np.log10(max(self.noise, tiny)))),  # finite at zero noise
            cosine=self.cosine / max(self.images, 1),
            relative_l2=float(np.sqrt(self.noise / max(self.signal, tiny))),
            top1_agreement=self.agreeing_rows / self.rows if classes else None,
            kl=self.kl / self.rows if classes else None)


def fidelity(names: list[str], reference: list[np.ndarray], actual: list[np.ndarray]) -> list[OutputFidelity]:
    """Every output's fidelity at once."""
    results = []
    for name, want, got in zip(names, reference, actual):
        totals = FidelityTotals(name, output_kind(want))
        totals.add(want, got)
        results.append(totals.result())
    return results


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def kl_divergence(reference: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Per row KL(softmax(reference) || softmax(logits)). Rows that already are probabilities (a
    softmax output) are taken as log-probabilities first (floored at PROBABILITY_FLOOR), so the
    softmax is not applied twice."""
    log_p, log_q = log_softmax(as_logits(reference)), log_softmax(as_logits(logits))
    return (np.exp(log_p) * (log_p - log_q)).sum(axis=1)


def as_logits(rows: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(rows, PROBABILITY_FLOOR)) if holds_probabilities(rows, axis=1) else rows


def holds_probabilities(values: np.ndarray, axis: int) -> bool:
    """Whether every slice along `axis` is a probability distribution (a softmax's output)."""
    return bool(values.size) and values.min() >= 0 and np.abs(values.sum(axis=axis) - 1).max() <= PROBABILITY_TOLERANCE


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(norms, np.finfo(np.float64).tiny)
