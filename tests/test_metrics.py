"""Per-output fidelity: which outputs hold class scores, and metrics that hold for any tensor."""

from __future__ import annotations

import numpy as np
import pytest

from onnxmodcap.metrics import PROBABILITY_FLOOR, FidelityTotals, fidelity, kl_divergence, output_kind

RNG = np.random.default_rng(0)


def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


@pytest.mark.parametrize("values, kind", [
    (RNG.standard_normal((4, 10)), "classes"),
    (RNG.standard_normal((4, 10, 1, 1)), "classes"),
    (RNG.uniform(size=(4, 1, 16, 16)), "tensor"),  # a detector's probability map
    (softmax(RNG.standard_normal((4, 40, 30))), "sequence"),  # a CTC recogniser's softmax
    (RNG.standard_normal((4, 40, 30)), "tensor"),  # the same shape without a softmax
    (RNG.standard_normal((4, 84, 8)), "tensor"),  # boxes and scores on axis 1 (YOLO-like)
])
def test_output_kind(values, kind):
    assert output_kind(values) == kind


def test_metrics_of_a_tensor_output():
    reference = RNG.standard_normal((6, 1, 8, 8))
    noisy = reference + 0.1 * RNG.standard_normal(reference.shape)
    [result] = fidelity(["map"], [reference], [noisy])
    noise = ((noisy - reference) ** 2).sum()
    assert result.kind == "tensor" and result.top1_agreement is None and result.kl is None
    assert result.sqnr_db == pytest.approx(10 * np.log10((reference ** 2).sum() / noise))
    assert result.relative_l2 == pytest.approx(np.sqrt(noise / (reference ** 2).sum()))
    flat_r, flat_n = reference.reshape(6, -1), noisy.reshape(6, -1)
    cosines = (flat_r * flat_n).sum(1) / np.linalg.norm(flat_r, axis=1) / np.linalg.norm(flat_n, axis=1)
    assert result.cosine == pytest.approx(cosines.mean())


def test_sequence_agreement_is_per_position_and_batches_add_up():
    reference = softmax(RNG.standard_normal((8, 5, 7)) * 3)
    changed = reference.copy()
    changed[0, 0] = np.roll(changed[0, 0], 1)  # one position's argmax moves (almost surely)
    totals = FidelityTotals("text", "sequence")
    totals.add(reference[:3], changed[:3])
    totals.add(reference[3:], changed[3:])
    batched = totals.result()
    [whole] = fidelity(["text"], [reference], [changed])
    expected = (reference.argmax(-1) == changed.argmax(-1)).mean()
    assert batched.top1_agreement == whole.top1_agreement == pytest.approx(expected) and expected == 39 / 40
    assert batched.kl == pytest.approx(whole.kl) and batched.sqnr_db == pytest.approx(whole.sqnr_db)


def test_kl_of_probabilities_with_exact_zeros_stays_finite():
    """A quantized softmax output holds exact zeros; they count as PROBABILITY_FLOOR, not log(0)."""
    reference = np.array([[0.98, 0.019, 0.001]])
    quantized = np.array([[0.98, 0.02, 0.0]])
    floored = np.maximum(quantized, PROBABILITY_FLOOR)
    expected = (reference * (np.log(reference) - np.log(floored / floored.sum()))).sum()
    assert kl_divergence(reference, quantized)[0] == pytest.approx(expected, rel=1e-6)
    assert kl_divergence(reference, quantized)[0] < 0.01
