"""Cost of one reconstruction iteration per unit, against one float forward+backward of the same unit.

    python tools/bench_reconstruct.py models/resnet18.onnx --calib models/calib --bits 4 --method qdrop

For every unit, at the same batch size, it times (median of --steps after --warmup):
- float: the unit without quantizers, forward, output-error loss, backward to the float weights;
- iteration: one reconstruction step as `onnxmodcap quantize --method ...` runs it (QDrop mixing,
  AdaRound soft rounding and rounding loss, LSQ step sizes, Adam updates; with pdquant also the
  prediction difference, --pd-batch-size images carried through the rest of the float network, in
  every timed iteration: the fast preset adds it to every fourth one, see `reconstruct.PRESETS`).
The two take turns step by step. It prints a markdown table with the ratio iteration / float.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from onnxmodcap.pipeline import QuantizeConfig, pdquant_inputs, simulate
from onnxmodcap.reconstruct import (PRESETS, FloatRest, ReconstructionSettings, TensorCache, TensorStream, UnitData,
                                    float_predictions, output_error, start_training, training_loss)


def median_ms(actions, steps: int, warmup: int) -> list[float]:
    """Median wall time of each action; the actions take turns, so that a change in the machine's
    speed during the measurement affects them alike."""
    timings = [[] for _ in actions]
    for step in range(warmup + steps):
        for action, measured in zip(actions, timings):
            started = time.perf_counter()
            action()
            if step >= warmup:
                measured.append((time.perf_counter() - started) * 1000)
    return [statistics.median(measured) for measured in timings]


def float_step(unit, batch, targets):
    """One forward+backward of the float unit, gradients to its weights (and biases)."""

    def step():
        unit.set_quantization(False)
        for parameter in unit.weights.values():
            parameter.requires_grad_(True)
            parameter.grad = None
        output_error(unit(*batch), targets).backward()
        for parameter in unit.weights.values():
            parameter.requires_grad_(False)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--calib", type=Path, required=True)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--method", choices=["brecq", "qdrop", "pdquant"], default="qdrop")
    parser.add_argument("--pd-batch-size", type=int, default=PRESETS["fast"]["pd_batch_size"],
                        help="pdquant: images carried to the logits (default: the fast preset's)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = QuantizeConfig(bits=args.bits, method=args.method, batch_size=args.batch_size, num_calib=256)
    cpu = torch.device("cpu")
    sim = simulate(args.model, args.calib, config, cpu)
    settings = ReconstructionSettings(method=args.method, batch_size=args.batch_size, pd_batch_size=args.pd_batch_size)
    generator = torch.Generator().manual_seed(0)
    cache = TensorCache(budget=1 << 40, folder=Path("unused"))  # everything stays in memory
    stream = TensorStream(sim.mirror, cache, {sim.mirror.input_names[0]: torch.from_numpy(sim.data.inputs)})
    if args.method == "pdquant":
        prediction = pdquant_inputs(sim, sim.mirror, cpu, "kl")
        predicted = float_predictions(prediction, sim.data.inputs, cache, cpu)
    print(f"{args.model.name}, W{args.bits}A{args.bits}, {args.method}, batch {args.batch_size}, "
          f"{args.threads} threads, torch {torch.__version__}\n")
    print("| unit | float fwd+bwd (ms) | reconstruction iteration (ms) | ratio |")
    print("|---|---|---|---|")
    ratios = []
    for index, unit in enumerate(sim.mirror.units):
        inputs = stream.inputs_of(unit)
        outputs = stream.advance(index, unit, quantized=False, device=cpu)
        batch = [t[:args.batch_size] for t in inputs]
        targets = [t[:args.batch_size] for t in outputs]
        rest = FloatRest(prediction.float_mirror, index, stream, predicted, cpu) if args.method == "pdquant" else None
        data = UnitData(inputs, inputs, outputs, outputs, rest=rest)
        training = start_training(unit, settings)

        def iteration():
            unit.set_quantization(True)
            training.step(training_loss(unit, data, settings, cpu, generator, training.weights,
                                        beta=10.0 if training.weights else None, predicts=rest is not None))

        float_ms, iteration_ms = median_ms([float_step(unit, batch, targets), iteration], args.steps, args.warmup)
        training.finish()
        ratios.append(iteration_ms / float_ms)
        print(f"| {unit.unit.name} | {float_ms:.2f} | {iteration_ms:.2f} | {ratios[-1]:.2f} |")
    print(f"\nmedian ratio {statistics.median(ratios):.2f}, max {max(ratios):.2f}")


if __name__ == "__main__":
    main()
