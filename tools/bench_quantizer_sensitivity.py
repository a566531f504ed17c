"""Which single quantizer costs a model the most: each one switched off in turn, the rest on.

    python tools/bench_quantizer_sensitivity.py /tmp/real_models/ppocrv5_det.onnx \\
        --calib /tmp/real_bench/ppocrv5_det/calib.npy --heldout /tmp/real_bench/ppocrv5_det/heldout.npy \\
        --bits 8 --num-calib 48 --images 8 --input-size 640

RTN (the default initialisation) on the torch simulation, no ONNX export. For every activation and
weight quantizer it prints how many dB of output SQNR (all graph outputs flattened, against the
float model on the held-out inputs) the model gains when only that quantizer is off. A gain spread
thinly over many tensors means no single layer to keep at higher precision.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from onnxmodcap import pipeline
from onnxmodcap.config import QuantizeConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--calib", type=Path, required=True, help="calibration images or a .npy of model inputs")
    parser.add_argument("--heldout", type=Path, required=True, help=".npy of model inputs to score on")
    parser.add_argument("--bits", type=int, default=8)
    parser.add_argument("--num-calib", type=int, default=128)
    parser.add_argument("--images", type=int, default=8, help="held-out inputs scored")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--input-size", help="as quantize --input-size, for models with a dynamic image size")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()

    config = QuantizeConfig(bits=args.bits, method="rtn", num_calib=args.num_calib,
                                     batch_size=args.batch_size, preprocess={"input_size": args.input_size})
    sim = pipeline.simulate(args.model, args.calib, config, torch.device("cpu"))
    inputs = torch.from_numpy(np.load(args.heldout)[:args.images])

    def outputs() -> torch.Tensor:
        with torch.no_grad():
            batches = [sim.mirror(inputs[start:start + args.batch_size]) for start in range(0, len(inputs), args.batch_size)]
        return torch.cat([torch.cat([o.flatten(1) for o in batch], 1) for batch in batches]).double()

    with sim.mirror.quantization(False):
        reference = outputs()

    def sqnr() -> float:
        return float(10 * torch.log10(reference.square().mean() / (outputs() - reference).square().mean()))

    everything = sqnr()
    gains = []
    for kind, quantizers in (("activation", sim.quantizers.activations), ("weight", sim.quantizers.weights)):
        for tensor, quantizer in quantizers.items():
            quantizer.enabled = False
            gains.append((sqnr() - everything, kind, tensor))
            quantizer.enabled = True
    gains.sort(reverse=True)
    print(f"W{args.bits}A{args.bits} RTN, every quantizer on: SQNR {everything:.2f} dB on {len(inputs)} held-out inputs")
    print("| gain dB with only this quantizer off | kind | tensor |")
    print("|---:|---|---|")
    for gain, kind, tensor in gains[:args.top]:
        print(f"| {gain:+.2f} | {kind} | `{tensor}` |")


if __name__ == "__main__":
    main()
