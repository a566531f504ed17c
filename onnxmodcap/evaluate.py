"""Accuracy of a classifier on an image set, and its fidelity to a reference (float) model."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import onnxruntime as ort
from tqdm import tqdm

from .datasets import ImageSet, Skipped, open_images, prepared_batches
from .errors import UserError, first_line
from .preprocess import Preprocessing, resolve_preprocessing
from .runtime import PROVIDERS, create_session, session_provider

INPUT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


@dataclass(frozen=True)
class Classifier:
    """An ONNX Runtime session that maps an image batch to logits."""

    path: str
    session: ort.InferenceSession
    input_name: str
    input_shape: list[Any]
    input_type: type
    fixed_batch: int | None

    @property
    def provider(self) -> str:
        return session_provider(self.session)

    def preprocessing(self, flags: Mapping[str, Any]) -> Preprocessing:
        metadata = self.session.get_modelmeta().custom_metadata_map
        return resolve_preprocessing(self.input_shape, metadata, flags)

    def logits(self, inputs: np.ndarray) -> np.ndarray:
        """(B, classes) float64 logits; a model with a fixed batch size gets zero-padded chunks."""
        step = self.fixed_batch or len(inputs)
        outputs = [self.run(inputs[start:start + step], step) for start in range(0, len(inputs), step)]
        return np.concatenate(outputs).astype(np.float64)

    def run(self, chunk: np.ndarray, step: int) -> np.ndarray:
        count = len(chunk)
        if count < step:
            chunk = np.concatenate([chunk, np.zeros((step - count, *chunk.shape[1:]), chunk.dtype)])
        try:
            output = self.session.run(None, {self.input_name: chunk.astype(self.input_type)})[0]
        except Exception as err:  # onnxruntime raises its own exception types per failure kind
            raise UserError(f"{self.path}: ONNX Runtime failed on input {list(chunk.shape)}: {first_line(err)}") from None
        return output.reshape(len(chunk), -1)[:count]


def load_classifier(path: str, provider: str) -> Classifier:
    if not Path(path).is_file():
        raise UserError(f"{path}: no such file")
    try:
        session = create_session(str(path), provider)
    except UserError as err:
        raise UserError(f"{path}: {err}") from None
    model_input = session.get_inputs()[0]
    if model_input.type not in INPUT_TYPES:
        raise UserError(f"{path}: the model input is {model_input.type}; evaluate feeds float images")
    batch = model_input.shape[0]
    return Classifier(str(path), session, model_input.name, list(model_input.shape), INPUT_TYPES[model_input.type],
                      batch if isinstance(batch, int) and batch > 0 else None)


@dataclass(frozen=True)
class Evaluation:
    images: int
    provider: str
    top1: float | None  # fractions in [0, 1]; None where not applicable
    top5: float | None
    agreement: float | None  # top-1 agreement with the reference
    kl: float | None  # mean KL(softmax(reference) || softmax(model)), nats
    cosine: float | None  # mean cosine similarity of the logit vectors
    skipped: tuple[tuple[str, str], ...]  # (image, reason)

    def as_json(self) -> dict[str, Any]:
        keys = ("top1", "top5", "agreement", "kl", "cosine", "images", "provider")
        return {key: getattr(self, key) for key in keys}


class Totals:
    """Running sums over batches; fractions and means at the end."""

    def __init__(self, classes: int | None, has_reference: bool):
        self.classes, self.has_reference = classes, has_reference
        self.images = self.top1 = self.top5 = self.agreement = 0
        self.kl = self.cosine = 0.0

    def add(self, logits: np.ndarray, labels: np.ndarray | None, reference: np.ndarray | None) -> None:
        self.images += len(logits)
        if labels is not None:
            if self.classes > logits.shape[1]:
                raise UserError(f"the data has {self.classes} classes but the model outputs "
                                f"{logits.shape[1]} logits")
            ranked = np.argsort(-logits, axis=1, kind="stable")
            self.top1 += int((ranked[:, 0] == labels).sum())
            self.top5 += int((ranked[:, :5] == labels[:, None]).any(axis=1).sum())
        if reference is not None:
            if reference.shape != logits.shape:
                raise UserError(f"the reference model outputs {reference.shape[1]} values per image "
                                f"but the model outputs {logits.shape[1]}")
            self.agreement += int((reference.argmax(1) == logits.argmax(1)).sum())
            self.kl += float(kl_divergence(reference, logits).sum())
            self.cosine += float(cosine_similarity(reference, logits).sum())

    def evaluation(self, provider: str, logit_count: int, skipped: Skipped) -> Evaluation:
        labelled = self.classes is not None
        per_image = lambda total: total / self.images  # noqa: E731
        return Evaluation(
            images=self.images, provider=provider,
            top1=per_image(self.top1) if labelled else None,
            top5=per_image(self.top5) if labelled and logit_count >= 5 else None,
            agreement=per_image(self.agreement) if self.has_reference else None,
            kl=per_image(self.kl) if self.has_reference else None,
            cosine=per_image(self.cosine) if self.has_reference else None,
            skipped=tuple(skipped.entries))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def kl_divergence(reference: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Per image KL(softmax(reference) || softmax(logits))."""
    log_p, log_q = log_softmax(reference), log_softmax(logits)
    return (np.exp(log_p) * (log_p - log_q)).sum(axis=1)


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(norms, np.finfo(np.float64).tiny)


def evaluate(model_path: str, data_path: str, *, reference_path: str | None = None,
             flags: Mapping[str, Any] | None = None, batch_size: int = 64, limit: int | None = None,
             provider: str = "auto", progress: bool = False,
             note: Callable[[str], None] = lambda message: None) -> Evaluation:
    """Run the model (and the reference) over the image set; `flags` are preprocessing overrides.
    `note` receives one-line facts (provider, preprocessing, data) once the first batch has run,
    so that input that fails at once gives nothing but its error."""
    model = load_classifier(model_path, provider)
    reference = load_classifier(reference_path, provider) if reference_path else None
    preprocessing = model.preprocessing(flags or {})
    images = open_images(data_path).spread(limit)
    if not images.labelled and reference is None:
        raise UserError(f"{data_path} is unlabelled: pass --reference to compare with a float model "
                        "(without labels or a reference there is nothing to measure)")
    facts = [provider_note(model.provider, provider),
             f"preprocessing: {preprocessing.describe()}",
             f"data: {len(images.samples)} images, "
             + (f"{len(images.classes)} classes" if images.labelled else "unlabelled")]
    return run(model, reference, images, preprocessing, batch_size, progress,
               lambda: [note(fact) for fact in facts])


def provider_note(used: str, requested: str) -> str:
    if used == "cpu" and requested == "auto" and PROVIDERS["cuda"] in ort.get_available_providers():
        return "provider: cpu (the CUDA execution provider did not load)"
    return f"provider: {used}"


def run(model: Classifier, reference: Classifier | None, images: ImageSet, preprocessing: Preprocessing,
        batch_size: int, progress: bool, started: Callable[[], Any]) -> Evaluation:
    totals = Totals(len(images.classes) if images.labelled else None, reference is not None)
    skipped = Skipped()
    logit_count = 0
    # disable=None: the bar shows only on a terminal, and only for runs longer than two seconds
    with tqdm(total=len(images.samples), unit="img", disable=None if progress else True, delay=2,
              leave=False, file=sys.stderr) as bar:
        for batch in prepared_batches(images, preprocessing, batch_size, skipped):
            logits = model.logits(batch.inputs)
            logit_count = logits.shape[1]
            first_batch = totals.images == 0
            totals.add(logits, batch.labels, reference.logits(batch.inputs) if reference else None)
            if first_batch:
                started()
            bar.update(totals.images + len(skipped) - bar.n)
    if totals.images == 0:
        first_name, first_reason = skipped.entries[0]
        raise UserError(f"no usable image in {images.path}: all {len(skipped)} skipped "
                        f"(first: {first_name}: {first_reason})")
    return totals.evaluation(model.provider, logit_count, skipped)
