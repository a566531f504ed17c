"""Accuracy of a classifier on an image set, and its fidelity to a reference (float) model, per output."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import onnxruntime as ort

from .datasets import ImageSet, Skipped, open_images, prepared_batches
from .errors import UserError, first_line
from .metrics import FidelityTotals, OutputFidelity, output_kind
from .preprocess import Preprocessing, resolve_preprocessing
from .progress import progress_bar
from .runtime import PROVIDERS, create_session, run_batched, session_provider

INPUT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


@dataclass(frozen=True)
class Classifier:
    """An ONNX Runtime session that maps an image batch to logits."""

    path: str
    session: ort.InferenceSession
    input_shape: list[Any]
    input_type: type

    @property
    def provider(self) -> str:
        return session_provider(self.session)

    def preprocessing(self, flags: Mapping[str, Any]) -> Preprocessing:
        metadata = self.session.get_modelmeta().custom_metadata_map
        return resolve_preprocessing(self.input_shape, metadata, flags)

    @property
    def output_names(self) -> list[str]:
        return [output.name for output in self.session.get_outputs()]

    def outputs(self, inputs: np.ndarray) -> list[np.ndarray]:
        """Every output, float64, fed at the batch size the model accepts."""
        try:
            outputs = run_batched(self.session, inputs.astype(self.input_type), len(inputs))
        except Exception as err:  # onnxruntime raises its own exception types per failure kind
            raise UserError(f"{self.path}: ONNX Runtime failed on input {list(inputs.shape)}: {first_line(err)}") from None
        return [output.astype(np.float64) for output in outputs]


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
    return Classifier(str(path), session, list(model_input.shape), INPUT_TYPES[model_input.type])


@dataclass(frozen=True)
class Evaluation:
    images: int
    provider: str
    top1: float | None  # fractions in [0, 1]; None where not applicable
    top5: float | None
    agreement: float | None  # top-1 agreement of the first output with the reference's
    kl: float | None  # mean KL(softmax(reference) || softmax(model)) of the first output, nats
    cosine: float | None  # mean cosine similarity of the first output
    skipped: tuple[tuple[str, str], ...]  # (image, reason)
    outputs: tuple[OutputFidelity, ...] = ()  # with a reference: every output's fidelity

    def as_json(self) -> dict[str, Any]:
        keys = ("top1", "top5", "agreement", "kl", "cosine", "images", "provider")
        return {**{key: getattr(self, key) for key in keys}, "outputs": [o.to_dict() for o in self.outputs]}


class Totals:
    """Running sums over batches; fractions and means at the end."""

    def __init__(self, classes: int | None, names: list[str]):
        self.classes, self.names = classes, names
        self.images = self.top1 = self.top5 = 0
        self.fidelity: list[FidelityTotals] = []

    def add(self, outputs: list[np.ndarray], labels: np.ndarray | None,
            reference: list[np.ndarray] | None) -> None:
        self.images += len(outputs[0])
        if labels is not None:
            self.add_labels(outputs[0], labels)
        if reference is not None:
            if not self.fidelity:  # what each output holds, read from the reference's first batch
                self.fidelity = [FidelityTotals(name, output_kind(values)) for name, values in zip(self.names, reference)]
            if [r.shape for r in reference] != [o.shape for o in outputs]:
                raise UserError(f"the reference model's outputs per image are {shapes_text(reference)} but the "
                                f"model's are {shapes_text(outputs)}")
            for totals, want, got in zip(self.fidelity, reference, outputs):
                totals.add(want, got)

    def add_labels(self, output: np.ndarray, labels: np.ndarray) -> None:
        if output_kind(output) != "classes":
            raise UserError(f"the model's first output has shape {list(output.shape[1:])} per image, not class "
                            "scores: labelled data cannot be scored; compare with a float model (--reference)")
        logits = output.reshape(len(output), -1)
        if self.classes > logits.shape[1]:
            raise UserError(f"the data has {self.classes} classes but the model outputs {logits.shape[1]} logits")
        ranked = np.argsort(-logits, axis=1, kind="stable")
        self.top1 += int((ranked[:, 0] == labels).sum())
        self.top5 += int((ranked[:, :5] == labels[:, None]).any(axis=1).sum())

    def evaluation(self, provider: str, logit_count: int, skipped: Skipped) -> Evaluation:
        labelled = self.classes is not None
        outputs = tuple(totals.result() for totals in self.fidelity)
        first = outputs[0] if outputs else None
        return Evaluation(
            images=self.images, provider=provider,
            top1=self.top1 / self.images if labelled else None,
            top5=self.top5 / self.images if labelled and logit_count >= 5 else None,
            agreement=first.top1_agreement if first else None,
            kl=first.kl if first else None,
            cosine=first.cosine if first else None,
            skipped=tuple(skipped.entries), outputs=outputs)


def shapes_text(outputs: list[np.ndarray]) -> str:
    """`5` or `1x32x32, 10`: the shape of one image's share of each output."""
    return ", ".join("x".join(str(d) for d in output.shape[1:]) or "scalar" for output in outputs)


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
    totals = Totals(len(images.classes) if images.labelled else None, model.output_names)
    skipped = Skipped()
    logit_count = 0
    # disable=None: the bar shows only on a terminal, and only for runs longer than two seconds
    with progress_bar(total=len(images.samples), unit="img", disable=None if progress else True, delay=2,
                      leave=False) as bar:
        for batch in prepared_batches(images, preprocessing, batch_size, skipped):
            outputs = model.outputs(batch.inputs)
            logit_count = outputs[0][0].size
            first_batch = totals.images == 0
            totals.add(outputs, batch.labels, reference.outputs(batch.inputs) if reference else None)
            if first_batch:
                started()
            bar.update(totals.images + len(skipped) - bar.n)
    if totals.images == 0:
        first_name, first_reason = skipped.entries[0]
        raise UserError(f"no usable image in {images.path}: all {len(skipped)} skipped "
                        f"(first: {first_name}: {first_reason})")
    return totals.evaluation(model.provider, logit_count, skipped)
