"""The data-free ModCap schedule of torchvision-shaped ResNet-18, ResNet-50 and MobileNetV2 graphs,
next to the schedules the MRECG code hard-codes (docs/methods.md, "ModCap", compares them).

    python tools/modcap_schedules.py [--bits 4]

The networks are the test zoo's builders (tools/zoo.py) at torchvision widths (ResNet base width
64; MobileNetV2 x1.0 and x0.5), exported with torch's TorchScript exporter at 32x32. Block
capacities depend only on the weight shapes and strides, so the input size does not change them.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import zoo
from onnxmodcap.inspect_model import inspect_model

PUBLISHED = {
    "ResNet-18": ("1, 2, (3, 3), (4, 4), 5, 6, 7, 8", lambda: zoo.ResNet(zoo.BasicBlock, [2, 2, 2, 2], 64)),
    "ResNet-50": ("1, 2, 3, (4, 4), 5, 6, (7, 7, 7), 8, 9, 10, (11, 11), 12, 13, 14",
                  lambda: zoo.ResNet(zoo.Bottleneck, [3, 4, 6, 3], 64)),
    "MobileNetV2 x1.0": ("– (published for x0.5 only)", lambda: zoo.MobileNetV2(width=1.0)),
    "MobileNetV2 x0.5": ("1, 2, (3, 3), 4, (5, 5), 6, (7, 7, 7), (8, 8, 8), 9, (10, 10), 11",
                         lambda: zoo.MobileNetV2(width=0.5)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, default=4)
    args = parser.parse_args()
    print("| network | blocks | data-free schedule (default k) | merged | MRECG's hard-coded schedule |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for name, (published, build) in PUBLISHED.items():
            torch.manual_seed(0)
            path = Path(folder) / "model.onnx"
            zoo.export_legacy(zoo.ready(build()), path, (3, 32, 32))
            schedule = inspect_model(path, modcap="free", bits=args.bits).schedule
            blocks = sum(1 for c in schedule.capacities if c is not None)
            merged = ", ".join("+".join(g) for g in schedule.merged())
            print(f"| {name} | {blocks} | {schedule.text()} | {merged} | {published} |")


if __name__ == "__main__":
    main()
