"""Cost of one reconstruction iteration per unit, against one float forward+backward of the same unit.

    python tools/bench_reconstruct.py models/resnet18.onnx --calib models/calib --wbits 4 --abits 8 --method qdrop

For every unit, at the same batch size, it times (median of --steps after --warmup):
- float: the unit without quantizers, forward, output-error loss, backward to the float weights;
- iteration: one reconstruction step as `onnxmodcap quantize --method ...` runs it (QDrop mixing,
  AdaRound soft rounding and rounding loss, LSQ step sizes, Adam updates; with pdquant also the
  prediction difference, --pd-batch-size images carried through the rest of the float network, in
  every timed iteration: the fast preset adds it to every fourth one, see `recipes.PRESETS`).
The two take turns step by step. It prints a markdown table with the ratio iteration / float.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from onnxmodcap.allocator import retained_memory
from onnxmodcap.config import QuantizeConfig
from onnxmodcap.pipeline import simulate
from onnxmodcap.losses import output_error
from onnxmodcap.pdquant import FloatRest, float_predictions, prediction_inputs
from onnxmodcap.recipes import PRESETS, ReconstructionSettings
from onnxmodcap.reconstruct import float_counterparts, start_training, training_loss
from onnxmodcap.tensor_cache import TensorCache, TensorStream, UnitData


@dataclass
class Timing:
    """One action's median wall time, and over all its timed runs the share of the process's CPU
    time spent in the kernel and the minor page faults per second (getrusage counts every thread)."""

    ms: float
    kernel_share: float
    faults_per_s: float


def measure(actions, steps: int, warmup: int) -> list[Timing]:
    """The actions take turns, so that a change in the machine's speed affects them alike."""
    walls = [[] for _ in actions]
    user, system, faults = [0.0] * len(actions), [0.0] * len(actions), [0] * len(actions)
    for step in range(warmup + steps):
        for index, action in enumerate(actions):
            before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            action()
            wall, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF)
            if step >= warmup:
                walls[index].append(wall)
                user[index] += after.ru_utime - before.ru_utime
                system[index] += after.ru_stime - before.ru_stime
                faults[index] += after.ru_minflt - before.ru_minflt
    return [Timing(statistics.median(w) * 1000, s / max(u + s, 1e-9), f / sum(w))
            for w, u, s, f in zip(walls, user, system, faults)]


def float_step(unit, batch, targets):
    """One forward+backward of the float unit, gradients to its weights (and biases)."""

    def step():
        for parameter in unit.weights.values():
            parameter.requires_grad_(True)
            parameter.grad = None
        with unit.quantization(False):
            output_error(unit(*batch), targets).backward()
        for parameter in unit.weights.values():
            parameter.requires_grad_(False)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--calib", type=Path, required=True)
    parser.add_argument("--bits", type=int, default=4, help="weights and activations, unless --wbits/--abits")
    parser.add_argument("--wbits", type=int)
    parser.add_argument("--abits", type=int)
    parser.add_argument("--method", choices=["brecq", "qdrop", "pdquant"], default="qdrop")
    parser.add_argument("--pd-batch-size", type=int, default=PRESETS["fast"]["pd_batch_size"],
                        help="pdquant: images carried to the logits (default: the fast preset's)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-calib", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--units", type=lambda text: text.split(","), help="only these units (comma-separated names)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="profile the iteration of the N slowest units and print the operator tables")
    parser.add_argument("--release-memory", action="store_true",
                        help="leave glibc's malloc as it is (freed blocks go back to the kernel), as before retained_memory")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.release_memory:
        run(args)
    else:
        with retained_memory():
            run(args)


def run(args) -> None:

    config = QuantizeConfig(bits=args.bits, wbits=args.wbits, abits=args.abits, method=args.method,
                            batch_size=args.batch_size, num_calib=args.num_calib)
    cpu = torch.device("cpu")
    sim = simulate(args.model, args.calib, config, cpu)
    settings = ReconstructionSettings(method=args.method, batch_size=args.batch_size, pd_batch_size=args.pd_batch_size)
    generator = torch.Generator().manual_seed(0)
    cache = TensorCache(budget=1 << 40, folder=Path("unused"))  # everything stays in memory
    images = cache.store_graph_inputs({sim.mirror.input_names[0]: torch.from_numpy(sim.data.inputs)})
    stream = TensorStream(sim.mirror, cache, images, args.batch_size)
    if args.method == "pdquant":
        prediction = prediction_inputs(sim.prepared, sim.mirror, cpu, "kl")
        predicted = float_predictions(prediction, sim.data.inputs, cache, cpu, args.batch_size)
    print(f"{args.model.name}, W{config.weight_bits}A{config.activation_bits}, {args.method}, batch {args.batch_size}, "
          f"{args.threads} threads, torch {torch.__version__}\n")
    print("| unit | float fwd+bwd (ms) | iteration (ms) | ratio | kernel share | minor faults/s |")
    print("|---|---:|---:|---:|---:|---:|")
    ratios, iterations = [], {}
    for index, unit in enumerate(sim.mirror.units):
        inputs = stream.inputs_of(unit)
        outputs = stream.advance(index, unit, quantized=False, device=cpu)
        if args.units and unit.unit.name not in args.units:
            continue
        batch = [t[:args.batch_size] for t in inputs]
        targets = [t[:args.batch_size] for t in outputs]
        rest = FloatRest(prediction.float_mirror, index, stream.tensors, predicted, cpu) if args.method == "pdquant" else None
        data = UnitData(inputs, float_counterparts(sim.mirror, unit, inputs), outputs, outputs, rest=rest)
        training = start_training(unit, settings)

        def iteration():
            training.step(training_loss(unit, data, settings, cpu, generator, training.weights,
                                        beta=10.0 if training.weights else None, predicts=rest is not None))

        float_timing, iteration_timing = measure([float_step(unit, batch, targets), iteration], args.steps, args.warmup)
        if args.profile:
            iterations[unit.unit.name] = (iteration_timing.ms, profile(iteration))
        training.finish()
        ratios.append(iteration_timing.ms / float_timing.ms)
        print(f"| {unit.unit.name} | {float_timing.ms:.1f} | {iteration_timing.ms:.1f} | {ratios[-1]:.2f} | "
              f"{100 * iteration_timing.kernel_share:.0f} % | {iteration_timing.faults_per_s:,.0f} |", flush=True)
    print(f"\nmedian ratio {statistics.median(ratios):.2f}, max {max(ratios):.2f}")
    for name, (ms, table) in sorted(iterations.items(), key=lambda item: -item[1][0])[:args.profile]:
        print(f"\n### {name}: one iteration, {ms:.0f} ms\n\n```\n{table}\n```")


def profile(action, runs: int = 3) -> str:
    """torch.profiler's table of the operators of `runs` calls, by self CPU time."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        for _ in range(runs):
            action()
    return profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)

if __name__ == "__main__":
    main()
