"""The compiled straight-through quantizer, QDrop mix and QDrop random bytes (onnxmodcap/fused.py)
against the op-by-op ones, at the tensor sizes where quantize uses them."""

import logging
from collections import Counter

import pytest
import torch

from onnxmodcap import fused
from onnxmodcap.quantizers import Grid, Quantizer, StraightThroughQuantize, fake_quantize, keep_mask, mixed
from onnxmodcap.tensor_cache import gather_rows

SHAPE = (8, 32, 64, 64)  # 2^20 values: the smallest size fused.FUSED_MIN_ELEMENTS takes


def activation_quantizer(grid: Grid, drop_prob: float, learned: bool) -> Quantizer:
    quantizer = Quantizer(grid)
    with torch.no_grad():
        quantizer.scale.fill_(0.05)
        quantizer.zero_point.fill_(0.0 if grid.fixed_zero else 3.0)
    quantizer.straight_through, quantizer.drop_prob = True, drop_prob
    quantizer.scale.requires_grad_(learned)
    return quantizer


def forward_backward(quantizer: Quantizer, x: torch.Tensor, upstream: torch.Tensor, input_grad: bool):
    """Output, gradient to x, gradient to the step size, and the autograd node that produced the output."""
    x = x.detach().clone().requires_grad_(input_grad)
    quantizer.scale.grad = None
    torch.manual_seed(1)  # the same QDrop mask for both quantizers
    out = quantizer(x)
    out.backward(upstream)
    return out.detach(), x.grad, quantizer.scale.grad, type(out.grad_fn).__name__


@pytest.mark.parametrize("grid,drop_prob,learned,input_grad,layout", [
    (Grid.unsigned(8), 0.5, False, True, torch.channels_last),
    (Grid.asymmetric(4), 0.5, True, True, torch.channels_last),
    (Grid.signed(4), 0.0, True, True, torch.contiguous_format),
    (Grid.asymmetric(2), 0.5, True, False, torch.channels_last),  # a unit's input: cached data, no gradient to x
])
def test_compiled_quantizer_gives_the_op_by_op_output_and_gradients(monkeypatch, grid, drop_prob, learned, input_grad, layout):
    torch.manual_seed(0)
    quantizer = activation_quantizer(grid, drop_prob, learned)
    x = (torch.randn(SHAPE) * 0.4).contiguous(memory_format=layout)  # some values clamp at every width
    upstream = torch.randn(SHAPE).contiguous(memory_format=layout)
    out, grad_x, grad_scale, node = forward_backward(quantizer, x, upstream, input_grad)
    assert node == "FusedStraightThroughQuantizeBackward"
    assert out.stride() == x.stride()
    monkeypatch.setattr(fused, "FUSED_MIN_ELEMENTS", x.numel() + 1)
    op_out, op_grad_x, op_grad_scale, op_node = forward_backward(quantizer, x, upstream, input_grad)
    assert op_node == "StraightThroughQuantizeBackward"
    assert torch.equal(out, op_out)
    if input_grad:
        assert torch.equal(grad_x, op_grad_x) and grad_x.stride() == x.stride()
    else:
        assert grad_x is None and op_grad_x is None
    if learned:  # the same float32 sum of a million terms in another order
        assert grad_scale.item() == pytest.approx(op_grad_scale.item(), rel=1e-4)
    else:
        assert grad_scale is None and op_grad_scale is None


@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
def test_compiled_qdrop_mix_takes_exactly_the_kept_elements(layout):
    torch.manual_seed(0)
    dropped, kept = (torch.randn(SHAPE).contiguous(memory_format=layout) for _ in range(2))
    keep = keep_mask(kept, 0.3)
    assert fused.applies(kept, keep)
    mix = mixed(dropped, kept, keep)
    assert mix.stride() == kept.stride()
    assert torch.equal(mix, torch.where(keep.boolean(), kept, dropped))
    assert 0.29 < keep.boolean().float().mean().item() < 0.31


@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
def test_a_units_input_picked_mixed_and_quantized_in_one_loop_is_the_quantized_mix(layout):
    """What Quantizer.mixed_input gives is what a step computed before it: the picked rows of the
    quantized and float inputs mixed under a mask, then quantized by the input quantizer sharing
    that mask; the step size gets the same gradient."""
    torch.manual_seed(0)
    quantizer = activation_quantizer(Grid.asymmetric(4), 0.5, learned=True)
    quantized, floats = ((torch.randn(12, 32, 64, 64) * 0.4).contiguous(memory_format=layout) for _ in range(2))
    picks = torch.tensor([7, 0, 11, 7, 3, 5, 2, 9])  # 8 rows: 2^20 values
    upstream = torch.randn(8, 32, 64, 64).contiguous(memory_format=layout)

    torch.manual_seed(1)
    quantizer.scale.grad = None
    fused_input = quantizer.mixed_input(quantized, floats, picks)
    fused_input.backward(upstream)
    fused_grad = quantizer.scale.grad.clone()

    torch.manual_seed(1)
    quantizer.scale.grad = None
    kept = gather_rows(quantized, picks)
    keep = keep_mask(kept, 0.5)
    quantizer.shared_keep = keep
    stepwise = quantizer(mixed(gather_rows(floats, picks), kept, keep))
    stepwise.backward(upstream)

    assert type(fused_input.grad_fn).__name__ == "FusedMixedInputQuantizeBackward"
    assert fused_input.stride() == stepwise.stride()
    assert torch.equal(fused_input, stepwise)
    assert fused_grad.item() == pytest.approx(quantizer.scale.grad.item(), rel=1e-4)
    # kept elements: the quantized input on the grid; dropped ones: the float input
    kept_mask = keep.boolean()
    on_grid = fake_quantize(kept, quantizer.scale.detach(), quantizer.zero_point, quantizer.grid)
    assert torch.equal(fused_input[kept_mask], on_grid[kept_mask])
    assert torch.equal(fused_input[~kept_mask], gather_rows(floats, picks)[~kept_mask])


def reference_word(index: int, seeds: tuple[int, int]) -> int:
    """random_words' word `index` in Python integers (unsigned 32-bit arithmetic), as int32."""
    def lowbias32(v: int) -> int:
        v = ((v ^ (v >> 16)) * 0x7FEB352D) & 0xFFFFFFFF
        v = ((v ^ (v >> 15)) * 0x846CA68B) & 0xFFFFFFFF
        return v ^ (v >> 16)
    word = lowbias32(lowbias32((index + seeds[0]) & 0xFFFFFFFF) ^ (seeds[1] & 0xFFFFFFFF))
    return word - (1 << 32) if word >> 31 else word


@pytest.mark.parametrize("count", [fused.RANDOM_BYTES_MIN + 1, 4 * fused.FUSED_MIN_ELEMENTS + 3])
def test_random_bytes_are_the_hash_of_their_index_compiled_or_not(count):
    seeds = (2**31 - 3, -5)  # the first seed wraps past 2**31 within the words
    seeds_tensor = torch.tensor(seeds, dtype=torch.int32)
    assert fused.random_words(40, seeds_tensor).tolist() == [reference_word(i, seeds) for i in range(40)]
    assert fused.available()
    op_by_op = fused.random_words((count + 3) // 4, seeds_tensor).view(torch.uint8)[:count]
    assert torch.equal(fused.random_bytes(count, seeds_tensor), op_by_op)  # compiled at these sizes


def test_random_bytes_are_uniform_and_masks_of_nearby_seeds_are_unrelated():
    seeds = torch.tensor([1000, 7], dtype=torch.int32)
    first = fused.random_bytes(1 << 22, seeds)
    counts = torch.bincount(first.long(), minlength=256).double()
    expected = first.numel() / 256
    assert ((counts - expected) ** 2 / expected).sum().item() < 330  # chi-squared, 255 degrees of freedom: p < 0.001
    # (seed + 1, same second seed) gives the words shifted by one; a new second seed breaks that up
    for other, shift in (([1001, 7], 0), ([1000, 8], 0), ([1001, 8], 4)):
        second = fused.random_bytes(1 << 22, torch.tensor(other, dtype=torch.int32))
        agreement = (first[shift:] < 128).eq(second[:second.numel() - shift] < 128).float().mean().item()
        assert abs(agreement - 0.5) < 0.002


def test_rows_carried_without_drop_keep_every_element_in_the_batch_layout():
    """PD-Quant's carried images are appended to the batch with a mask that keeps all of them; the
    longer mask keeps the batch's layout, so the kernels still take it."""
    batch = torch.randn(SHAPE).contiguous(memory_format=torch.channels_last)
    keep = keep_mask(batch, 0.5)
    longer = keep.keeping_all_of(3)
    carried = torch.cat((batch, batch[:3]))
    assert torch.equal(longer.boolean()[:len(batch)], keep.boolean()) and bool(longer.boolean()[len(batch):].all())
    assert fused.applies(carried, longer)


def test_a_shared_mask_in_another_layout_runs_op_by_op():
    quantizer = activation_quantizer(Grid.unsigned(8), 0.5, False)
    x = torch.randn(SHAPE).contiguous(memory_format=torch.channels_last)
    quantizer.shared_keep = keep_mask(torch.empty(SHAPE), 0.5)  # drawn in NCHW
    assert type(quantizer(x.requires_grad_(True)).grad_fn).__name__ == "StraightThroughQuantizeBackward"


def test_without_a_compiler_the_quantizers_run_op_by_op_and_say_so(monkeypatch, caplog):
    def no_compiler(kernel):
        raise RuntimeError("Compiler: cc is not found")

    monkeypatch.setattr(fused, "compiled", no_compiler)
    fused.available.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="onnxmodcap"):
            quantizer = activation_quantizer(Grid.unsigned(8), 0.5, False)
            out = quantizer(torch.randn(SHAPE).requires_grad_(True))
        assert type(out.grad_fn).__name__ == "StraightThroughQuantizeBackward"
        assert [record.getMessage() for record in caplog.records] == [
            "torch.compile cannot build CPU kernels here (RuntimeError: Compiler: cc is not found); the activation "
            "quantizers and QDrop's random bytes run op by op, which makes reconstruction at real resolution slower"]
    finally:
        fused.available.cache_clear()


def test_a_run_with_every_activation_quantizer_compiled_is_exact_and_repeatable(exported_model, calib, tmp_path, monkeypatch):
    """PD-Quant (QDrop's mix, shared input masks, images carried on without drop) with the compiled
    kernels on every activation and unit input, as on a real-resolution model: the export keeps
    parity, a second run gives the identical file, and the unit losses end where the op-by-op
    run's end."""
    import onnxmodcap

    path, _ = exported_model("resnet18", "legacy")

    def run(name):
        return onnxmodcap.quantize(path, calib, bits=4, method="pdquant", iters=30, num_calib=96, seed=3,
                                   output=str(tmp_path / name), device="cpu")

    calls = Counter()

    def counted(node):
        apply = node.apply
        monkeypatch.setattr(node, "apply", lambda *args: calls.update([node.__name__]) or apply(*args))

    counted(fused.FusedStraightThroughQuantize)
    counted(fused.FusedMixedInputQuantize)
    counted(StraightThroughQuantize)
    monkeypatch.setattr(fused, "FUSED_MIN_ELEMENTS", 1)
    first, second = run("a.onnx"), run("b.onnx")
    assert calls["FusedStraightThroughQuantize"] > 0 and calls["StraightThroughQuantize"] == 0
    assert calls["FusedMixedInputQuantize"] > 0
    monkeypatch.setattr(fused, "FUSED_MIN_ELEMENTS", 1 << 62)
    op_by_op = run("c.onnx")
    assert first.validation.parity_ok
    assert first.output.read_bytes() == second.output.read_bytes()
    losses = [[unit.loss_after for unit in result.report.reconstruction.units] for result in (first, op_by_op)]
    assert losses[0] == pytest.approx(losses[1], rel=0.1)


def test_unit_inputs_in_one_loop_write_the_file_of_the_separate_passes(exported_model, calib, tmp_path, monkeypatch):
    """QDrop at W4A8 (no step size learned) with every unit input picked, mixed and quantized in
    one loop writes the very file that gathering, mixing and quantizing in separate passes writes:
    the same inputs, masks and generator draws."""
    import onnxmodcap

    path, _ = exported_model("resnet18", "legacy")
    monkeypatch.setattr(fused, "FUSED_MIN_ELEMENTS", 1)
    calls = Counter()
    apply = fused.FusedMixedInputQuantize.apply
    monkeypatch.setattr(fused.FusedMixedInputQuantize, "apply",
                        lambda *args: calls.update(["loop"]) or apply(*args))

    def run(name):
        return onnxmodcap.quantize(path, calib, wbits=4, abits=8, method="qdrop", iters=20, num_calib=64, seed=5,
                                   output=str(tmp_path / name), device="cpu")

    one_loop = run("loop.onnx")
    assert calls["loop"] > 0
    monkeypatch.setattr(Quantizer, "mixed_input", lambda self, quantized, floats, picks: None)
    separate = run("separate.onnx")
    assert one_loop.output.read_bytes() == separate.output.read_bytes()
