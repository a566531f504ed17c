"""Reconstruction (BRECQ, QDrop): loss goes down, export parity holds, runs are deterministic, and a
run that is interrupted, killed, runs out of disk or crashes inside a unit resumes to the identical file."""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import stat
import subprocess
import sys
import time

from pathlib import Path

import onnx
import pytest
import torch

import onnxmodcap
from onnxmodcap import pipeline, quantizers, reconstruct
from onnxmodcap.losses import measure_loss, output_error
from onnxmodcap.checkpoint import quantizer_state
from onnxmodcap.config import QuantizeConfig
from onnxmodcap.graph import has_depthwise_conv
from onnxmodcap.recipes import ReconstructionSettings, reconstruction_settings, resolve_preset
from onnxmodcap.run_state import exact_float32
from onnxmodcap.pdquant import FloatRest, float_predictions, prediction_inputs
from onnxmodcap.mirror import as_tuple
from onnxmodcap.reconstruct import float_counterparts, start_training, step_costs, training_loss
from onnxmodcap.tensor_cache import CachedTensor, TensorCache, TensorStream, UnitData

ITERS = 30
LEARNING_ITERS = 120  # enough for AdaRound's rounding to settle before it is hardened


@pytest.fixture()
def resnet(exported_model):
    path, _ = exported_model("resnet18", "legacy")
    return path


@pytest.mark.parametrize("method", ["brecq", "qdrop"])
def test_reconstruction_lowers_unit_losses_and_exports_with_parity(resnet, calib, tmp_path, device, method):
    report = tmp_path / "report.json"
    result = onnxmodcap.quantize(resnet, calib, wbits=2, abits=4, method=method, modcap="off", iters=LEARNING_ITERS,
                                 num_calib=96, output=str(tmp_path / "q.onnx"), report=str(report), device=device)
    units = result.report.to_dict()["reconstruction"]
    assert [u["name"] for u in units] == [u["name"] for u in result.report.to_dict()["units"]]
    assert all(u["iterations"] == LEARNING_ITERS for u in units)
    improved = [u["loss_after"] < u["loss_before"] for u in units[1:-1]]  # the 2-bit blocks
    assert sum(improved) >= len(improved) - 1
    assert result.validation.parity_ok and result.validation.held_out
    assert not (tmp_path / ".q.onnx.work").exists()
    assert json.loads(report.read_text())["reconstruction"] == units
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_default_preset_is_the_fast_one_on_a_cpu_and_says_so(resnet, calib, tmp_path):
    report = tmp_path / "r.json"
    done = subprocess.run([sys.executable, "-m", "onnxmodcap.cli", "quantize", str(resnet), "--calib", str(calib),
                           "--method", "brecq", "--modcap", "off", "--iters", "3", "--num-calib", "64",
                           "-o", str(tmp_path / "q.onnx"), "--report", str(report)],
                          capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    assert done.returncode == 0, done.stderr
    [note] = [line for line in done.stderr.splitlines() if line.startswith("note: --preset auto")]
    assert re.fullmatch(r"note: --preset auto chose fast \(cpu, 0\.\d million activation values per image\): "
                        r"3 iterations per unit", note), note
    [timing] = [line for line in done.stdout.splitlines() if line.startswith("time: ")]
    assert [part.split()[0] for part in timing[len("time: "):].split(" (total")[0].split(", ")] == [
        "calibration", "reconstruction", "export", "validation"]
    settings = json.loads(report.read_text())["reconstruction_settings"]
    assert (settings["preset"], settings["iters"], settings["pd_batch_size"], settings["weight_lr"]) == ("fast", 3, 8, 0.02)


@pytest.mark.parametrize("device, elements, preset", [
    ("cpu", 250_000, "fast"), ("cpu", 12_000_000, "quick"), ("cuda", 12_000_000, "paper")])
def test_auto_preset_is_paper_on_cuda_and_quick_on_a_cpu_for_large_activations(device, elements, preset):
    assert resolve_preset(QuantizeConfig(device=device), elements) == preset


@pytest.mark.parametrize("method, preset, weight_lr", [
    ("brecq", "paper", 1e-3), ("qdrop", "paper", 1e-3), ("pdquant", "paper", 3e-3),
    ("brecq", "fast", 2e-2), ("qdrop", "fast", 2e-2), ("pdquant", "fast", 2e-2), ("qdrop", "quick", 0.1)])
def test_rounding_learning_rate_is_the_published_one_scaled_so_iterations_times_rate_stays_as_published(
        resnet, method, preset, weight_lr):
    config = QuantizeConfig(method=method, preset=preset)
    assert reconstruction_settings(config, has_depthwise_conv(onnx.load(resnet))).weight_lr == weight_lr


@pytest.mark.parametrize("preset", ["paper", "fast"])
def test_round_lr_overrides_the_preset_and_method_rate(resnet, preset):
    config = QuantizeConfig(method="pdquant", preset=preset, round_lr=5e-3)
    assert reconstruction_settings(config, has_depthwise_conv(onnx.load(resnet))).weight_lr == 5e-3


def test_step_costs_time_every_unit_and_leave_quantizers_weights_and_random_state_as_they_were(resnet, calib, device):
    sim = pipeline.simulate(Path(resnet), Path(calib), QuantizeConfig(num_calib=64, abits=4), torch.device(device))
    before = quantizer_state(sim.quantizers)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    costs = step_costs(sim.mirror, sim.data.inputs[:32], ReconstructionSettings(), torch.device(device))
    assert torch.equal(torch.rand(3), expected)
    assert len(costs) == len(sim.mirror.units) and all(cost > 0 for cost in costs)
    after = quantizer_state(sim.quantizers)
    assert after.keys() == before.keys() and all(torch.equal(after[name], before[name]) for name in before)
    for unit in sim.mirror.units:
        for quantizer in unit.activation_quantizers.values():
            assert not quantizer.straight_through and quantizer.drop_prob == 0
            assert not quantizer.scale.requires_grad and quantizer.scale.grad is None
        for weight, quantizer in unit.quantized_weights():
            assert not weight.requires_grad and weight.grad is None
            assert quantizer.alpha is None and quantizer.soft_rounding is None


def test_step_costs_of_pdquant_time_the_steps_that_carry_images_to_the_outputs(resnet, calib, tmp_path, device,
                                                                                monkeypatch):
    """Every pd_interval-th PD-Quant step runs the float rest of the network: the probe times it
    (twice per unit, the faster counting) and weighs it in, and still leaves everything as it was."""
    device = torch.device(device)
    sim = pipeline.simulate(Path(resnet), Path(calib), QuantizeConfig(num_calib=64, method="pdquant"), device)
    prediction = prediction_inputs(sim.prepared, sim.mirror, device, "kl")
    settings = ReconstructionSettings(method="pdquant", pd_batch_size=8, pd_interval=4)
    carried = []
    run_rest = FloatRest.__call__

    def counted(rest, outputs, picks):
        carried.append(len(picks))
        return run_rest(rest, outputs, picks)

    monkeypatch.setattr(FloatRest, "__call__", counted)
    with TensorCache(1 << 30, tmp_path) as cache:
        predicted = float_predictions(prediction, sim.data.inputs[:32], cache, device, 32)
        before = quantizer_state(sim.quantizers)
        costs = step_costs(sim.mirror, sim.data.inputs[:32], settings, device, prediction, predicted)
    assert len(costs) == len(sim.mirror.units) and all(cost > 0 for cost in costs)
    assert carried == [8] * (2 * len(sim.mirror.units))
    after = quantizer_state(sim.quantizers)
    assert all(torch.equal(after[name], before[name]) for name in before)


def test_same_seed_gives_identical_files_in_memory_or_spilled_to_disk(resnet, calib, tmp_path, device):
    outputs = []
    for name, cache_mem in (("a.onnx", 4.0), ("b.onnx", 0.0)):
        result = onnxmodcap.quantize(resnet, calib, bits=4, method="qdrop", iters=ITERS, num_calib=96,
                                     output=str(tmp_path / name), seed=3, cache_mem=cache_mem, device=device)
        outputs.append(result.output.read_bytes())
    assert outputs[0] == outputs[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "b.onnx"]


def test_a_cuda_run_computes_in_full_float32_with_deterministic_kernels_and_restores_torch(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul

    def settings():
        return cudnn.allow_tf32, matmul.allow_tf32, cudnn.benchmark, torch.are_deterministic_algorithms_enabled()

    before = settings()
    with exact_float32(torch.device("cpu")):
        assert settings() == before
    with exact_float32(torch.device("cuda")):
        assert settings() == (False, False, False, True)
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert settings() == before


def quantize_command(model, calib, output, work, device, *extra):
    return [sys.executable, "-m", "onnxmodcap.cli", "quantize", str(model), "--calib", str(calib), "--bits", "4",
            "--method", "qdrop", "--iters", "150", "--num-calib", "96", "-o", str(output), "--work-dir", str(work),
            "--device", device, *extra]


def wait_for_checkpoint(work, units, process, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        index = work / "state.json"
        if index.exists() and json.loads(index.read_text())["completed"] >= units:
            return
        assert process.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


@pytest.fixture(scope="module")
def uninterrupted(exported_model, calib, tmp_path_factory, device):
    resnet, _ = exported_model("resnet18", "legacy")
    folder = tmp_path_factory.mktemp("whole")
    output = folder / "whole.onnx"
    subprocess.run(quantize_command(resnet, calib, output, folder / "work", device), check=True, capture_output=True)
    return output.read_bytes()


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_run_resumes_to_the_identical_file(resnet, calib, tmp_path, device, uninterrupted, how):
    output, work, log = tmp_path / "q.onnx", tmp_path / "work", tmp_path / "stderr.txt"
    before = resnet.read_bytes()
    with open(log, "w") as stream:  # a file, not a pipe: progress bars would fill a pipe nobody reads yet
        # A shell's background job (`.ci/run &`) ignores SIGINT, and so would its children: let this one take it.
        process = subprocess.Popen(quantize_command(resnet, calib, output, work, device), stderr=stream, text=True,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        wait_for_checkpoint(work, 3, process)
        os.kill(process.pid, how)
        process.wait(timeout=120)
    stderr = log.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stderr.txt", "work"]
    assert resnet.read_bytes() == before
    if how == signal.SIGINT:
        assert process.returncode == 130
        assert stderr.strip().splitlines()[-1] == (
            f"error: interrupted; finished units are checkpointed in {work}: "
            "run the same command with --resume to continue")
    resumed = subprocess.run(quantize_command(resnet, calib, output, work, device, "--resume"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after unit " in resumed.stderr
    assert output.read_bytes() == uninterrupted
    assert not work.exists()


def test_corrupted_checkpoint_is_discarded(resnet, calib, tmp_path, device, uninterrupted):
    output, work = tmp_path / "q.onnx", tmp_path / "work"
    process = subprocess.Popen(quantize_command(resnet, calib, output, work, device), stderr=subprocess.DEVNULL)
    wait_for_checkpoint(work, 2, process)
    process.kill()
    process.wait()
    state = work / "state.pt"
    state.write_bytes(state.read_bytes()[:-100] + b"\0" * 100)
    resumed = subprocess.run(quantize_command(resnet, calib, output, work, device, "--resume"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"checkpoint in {work} is corrupted (hash mismatch): discarded" in resumed.stderr
    assert output.read_bytes() == uninterrupted


def file_size_limit(limit):
    """A full disk, as the OS reports it: writes past `limit` bytes fail with EFBIG."""
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of killing the process
    return apply


def test_full_disk_during_checkpoints_then_resume_finishes(resnet, calib, tmp_path, device, uninterrupted):
    output, work = tmp_path / "q.onnx", tmp_path / "work"
    before = resnet.read_bytes()
    full = subprocess.run(quantize_command(resnet, calib, output, work, device), capture_output=True, text=True,
                          preexec_fn=file_size_limit(400_000))
    assert full.returncode == 1
    assert full.stderr.strip().splitlines()[-1] == (
        f"error: cannot write {work / 'state.pt'}: File too large; finished units are checkpointed in {work}: "
        "run the same command with --resume once that is fixed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]
    assert sorted(p.name for p in work.iterdir()) == ["state.json", "state.pt"]
    assert resnet.read_bytes() == before
    resumed = subprocess.run(quantize_command(resnet, calib, output, work, device, "--resume"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after unit " in resumed.stderr
    assert output.read_bytes() == uninterrupted


def test_full_disk_while_writing_the_model_leaves_nothing(resnet, calib, tmp_path):
    output = tmp_path / "q.onnx"
    command = [sys.executable, "-m", "onnxmodcap.cli", "quantize", str(resnet), "--calib", str(calib),
               "--method", "rtn", "--num-calib", "96", "-o", str(output)]
    full = subprocess.run(command, capture_output=True, text=True, preexec_fn=file_size_limit(100_000))
    assert full.returncode == 2
    assert full.stderr.strip().splitlines()[-1] == f"error: cannot write {output}: File too large"
    assert list(tmp_path.iterdir()) == []


CRASH_IN_THIRD_UNIT = """
import sys
from onnxmodcap import reconstruct
from onnxmodcap.cli import main
original, calls = reconstruct.reconstruct_unit, []
def crash(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
        raise RuntimeError("simulated crash")
    return original(*args, **kwargs)
reconstruct.reconstruct_unit = crash
main(sys.argv[1:])
"""


def test_crash_inside_a_unit_then_resume_finishes(resnet, calib, tmp_path, device, uninterrupted):
    output, work = tmp_path / "q.onnx", tmp_path / "work"
    command = quantize_command(resnet, calib, output, work, device)
    crashed = subprocess.run([sys.executable, "-c", CRASH_IN_THIRD_UNIT, *command[3:]], capture_output=True, text=True)
    assert crashed.returncode == 1, crashed.stderr
    assert crashed.stderr.strip().splitlines()[-1] == (
        f"error: reconstruction failed (RuntimeError: simulated crash); finished units are checkpointed in {work}: "
        "run the same command with --resume to continue")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]
    assert json.loads((work / "state.json").read_text())["completed"] == 2
    assert stat.S_IMODE(work.stat().st_mode) == 0o700
    assert stat.S_IMODE((work / "state.pt").stat().st_mode) == 0o600
    resumed = subprocess.run(quantize_command(resnet, calib, output, work, device, "--resume"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after unit 2 " in resumed.stderr
    assert output.read_bytes() == uninterrupted


def observed_unit_input(sim, unit, quantized: bool) -> torch.Tensor:
    """The value of `unit`'s input on 64 calibration images, in the quantized or the float model."""
    seen = {}
    with sim.mirror.observing(lambda name, value: seen.setdefault(name, value)), sim.mirror.quantization(quantized):
        with torch.no_grad():
            sim.mirror(torch.from_numpy(sim.data.inputs[:64]))
    return seen[unit.unit.inputs[0]]


def test_qdrop_unit_input_is_the_quantized_input_quantized_or_the_float_input(resnet, calib):
    """QDrop as published: each element entering a unit is Q(x_q), the quantized model's input
    quantized, or x_fp, the float model's input; never x_q unquantized nor Q(x_fp)."""
    config = QuantizeConfig(bits=4, method="qdrop", modcap="off", num_calib=96)
    sim = pipeline.simulate(Path(resnet), Path(calib), config, torch.device("cpu"))
    unit = sim.mirror.units[1]
    [quantizer] = unit.input_quantizers()
    assert quantizer.grid.bits == 4
    x_fp, x_q = observed_unit_input(sim, unit, False), observed_unit_input(sim, unit, True)
    with torch.no_grad(), unit.quantization(False):
        target = unit(x_fp)
    data = UnitData([CachedTensor(x_q)], [CachedTensor(x_fp)], [CachedTensor(target)], [CachedTensor(target)])
    settings = ReconstructionSettings(method="qdrop", batch_size=64)
    start_training(unit, settings)
    generator = torch.Generator().manual_seed(0)
    picks = torch.randint(0, 64, (64,), generator=torch.Generator().set_state(generator.get_state()))
    entering = []
    hook = quantizer.register_forward_hook(lambda module, args, output: entering.append(output.detach()))
    try:
        training_loss(unit, data, settings, torch.device("cpu"), generator, [], None, predicts=False)
    finally:
        hook.remove()
    quantizer.drop_prob = 0.0
    with torch.no_grad():
        quantized_q = quantizer(x_q[picks])
    [entered] = entering
    from_quantized, from_float = entered == quantized_q, entered == x_fp[picks]
    assert torch.all(from_quantized | from_float)
    only_quantized, only_float = (from_quantized & ~from_float).sum(), (from_float & ~from_quantized).sum()
    assert 0.45 < only_quantized / (only_quantized + only_float) < 0.55


def test_unit_loss_measured_in_batches_equals_the_loss_of_one_batch(resnet, calib):
    config = QuantizeConfig(bits=4, method="brecq", modcap="off", num_calib=96)
    sim = pipeline.simulate(Path(resnet), Path(calib), config, torch.device("cpu"))
    unit = sim.mirror.units[1]
    x_fp, x_q = observed_unit_input(sim, unit, False), observed_unit_input(sim, unit, True)
    with torch.no_grad():
        with unit.quantization(False):
            target = unit(x_fp)
        whole = float(output_error(unit(x_q), [target]))
    batched = measure_loss(unit, [CachedTensor(x_q)], [CachedTensor(target)], torch.device("cpu"), batch_size=24)
    assert whole > 0
    assert batched == pytest.approx(whole, rel=1e-5)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_output_error_gives_autograd_values_and_gradients_bit_for_bit(layout):
    generator = torch.Generator().manual_seed(0)
    output = torch.randn(4, 8, 5, 6, generator=generator).contiguous(memory_format=layout).requires_grad_(True)
    target = torch.randn(4, 8, 5, 6, generator=generator).contiguous(memory_format=layout).requires_grad_(True)
    expected = ((output - target) ** 2).sum(1).mean()
    expected_grads = torch.autograd.grad(expected, (output, target))
    loss = output_error(output, [target])
    grads = torch.autograd.grad(loss, (output, target))
    assert torch.equal(loss, expected)
    assert all(torch.equal(got, want) for got, want in zip(grads, expected_grads))


@pytest.mark.parametrize("budget", [1 << 30, 0], ids=["in memory", "spilled"])
def test_graph_inputs_are_stored_once_for_both_streams_and_released_once(resnet, calib, tmp_path, budget):
    config = QuantizeConfig(bits=4, method="qdrop", modcap="off", num_calib=64)
    sim = pipeline.simulate(Path(resnet), Path(calib), config, torch.device("cpu"))
    images = torch.from_numpy(sim.data.inputs)
    with TensorCache(budget, tmp_path / "cache") as cache:
        graph_inputs = cache.store_graph_inputs({sim.mirror.input_names[0]: images})
        float_stream = TensorStream(sim.mirror, cache, graph_inputs, 32)
        quantized_stream = TensorStream(sim.mirror, cache, graph_inputs, 32)
        stem = sim.mirror.units[0]
        assert float_stream.inputs_of(stem)[0] is quantized_stream.inputs_of(stem)[0]
        assert cache.used == (images.numel() * 4 if budget else 0)
        assert torch.equal(float_stream.inputs_of(stem)[0][torch.arange(3)], images[:3])
        for index in range(2):  # the second advance releases what the first retired
            for stream, quantized in ((float_stream, False), (quantized_stream, True)):
                stream.advance(index, sim.mirror.units[index], quantized, torch.device("cpu"))
        assert graph_inputs[sim.mirror.input_names[0]].data is None
        outputs = [t for stream in (float_stream, quantized_stream) for t in (*stream.tensors.values(), *stream.retired)]
        assert cache.used == (sum(t.data.numel() * 4 for t in outputs) if budget else 0)
        assert len(list((tmp_path / "cache").glob("*.npy"))) == (0 if budget else len(outputs))


def test_a_step_mixes_a_units_float_input_unless_it_is_the_graph_input_both_networks_read(resnet, calib,
                                                                                           monkeypatch):
    config = QuantizeConfig(bits=4, method="qdrop", modcap="off", num_calib=64)
    sim = pipeline.simulate(Path(resnet), Path(calib), config, torch.device("cpu"))
    stem, block = sim.mirror.units[:2]
    assert block.unit.inputs == stem.unit.outputs
    images = CachedTensor(torch.from_numpy(sim.data.inputs[:32]))
    with stem.quantization(False), block.quantization(False), torch.no_grad():
        stem_output = CachedTensor(as_tuple(stem(images.data))[0])
        block_output = CachedTensor(as_tuple(block(stem_output.data))[0])
    mixes = []
    monkeypatch.setattr(reconstruct, "mixed", lambda *args: mixes.append(args[1].shape) or quantizers.mixed(*args))
    for unit, held, target in ((stem, images, stem_output), (block, stem_output, block_output)):
        float_inputs = float_counterparts(sim.mirror, unit, [held])
        assert (float_inputs[0] is held) == (unit is stem)
        training = start_training(unit, ReconstructionSettings(method="qdrop"))
        training_loss(unit, UnitData([held], float_inputs, [target], [target]), ReconstructionSettings(method="qdrop"),
                      torch.device("cpu"), torch.Generator().manual_seed(0), training.weights, None, False)
    assert mixes == [stem_output.data.shape]
