"""Load test: quantize a torchvision-shaped ResNet-50 at 224x224 with 1024 calibration images and
measure the peak resident memory and wall time of `onnxmodcap quantize`.

    OMP_NUM_THREADS=2 python tools/bench_load.py [--out /tmp/bench_load] [--images 1024] [--iters 20] [--modcap data]
                                                 [--device cpu|cuda]

The network is the test zoo's bottleneck ResNet (tools/zoo.py) at width 64 with the ImageNet stem
(7x7 stride-2 conv, BN, ReLU, 3x3 stride-2 max pool) and 1000 classes, random weights (seed 0),
exported with torch's TorchScript exporter (opset 17) with its BatchNormalization nodes kept. The
calibration images are smooth random colour fields saved as JPEG files of 224 to 320 pixels a side.
Everything goes under --out; the quantize log is --out/quantize.log. The last line printed is a
markdown table row.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

import zoo

INPUT_SHAPE = (3, 224, 224)


def build_resnet50() -> nn.Module:
    """torchvision's ResNet-50 layout: the zoo's ResNet with the ImageNet stem and 1000 classes."""
    torch.manual_seed(0)
    model = zoo.ResNet(zoo.Bottleneck, [3, 4, 6, 3], base_width=64)
    model.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    model.fc = nn.Linear(2048, 1000)
    return zoo.ready(model)


def write_images(folder: Path, count: int, seed: int = 0) -> None:
    """Smooth random colour fields: a coarse random grid upsampled bicubically, JPEG-encoded."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        width, height = rng.integers(224, 321, size=2)
        coarse = rng.integers(0, 256, size=(rng.integers(2, 9), rng.integers(2, 9), 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((int(width), int(height)), Image.BICUBIC)
        image.save(folder / f"{index:04d}.jpg", quality=90)


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def run_measured(command: list[str], log: Path, work_dir: Path) -> tuple[int, float, float, int]:
    """Run `command`; return its exit code, wall seconds, peak RSS (GiB) and the largest size the
    work folder (checkpoints and spilled cache) reached, polled every two seconds."""
    largest = 0
    done = threading.Event()

    def poll() -> None:
        nonlocal largest
        while not done.wait(2.0):
            try:
                largest = max(largest, folder_bytes(work_dir))
            except FileNotFoundError:  # a file vanished while walking the folder
                pass

    watcher = threading.Thread(target=poll, daemon=True)
    started = time.monotonic()
    with log.open("w") as stream:
        watcher.start()
        code = subprocess.run(command, check=False, stdout=stream, stderr=subprocess.STDOUT).returncode
    seconds = time.monotonic() - started
    done.set()
    watcher.join()
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB on Linux
    return code, seconds, peak_gib, largest


def run_quantize(command: list[str], out: Path, work_dir: Path, report_path: Path) -> tuple[int, float, float, int, str]:
    """Print and run a `quantize` command, logging to out/quantize.log; return what run_measured
    returns plus the report's parity line, or the log's last line (the error) when it failed."""
    print(" ".join(command), f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})", flush=True)
    code, seconds, peak_gib, work_bytes = run_measured(command, out / "quantize.log", work_dir)
    if code == 0:
        outcome = parity_line(json.loads(report_path.read_text())["validation"])
    else:  # no report; the log's last line says why
        outcome = (out / "quantize.log").read_text().strip().splitlines()[-1]
    return code, seconds, peak_gib, work_bytes, outcome


def parity_line(validation: dict) -> str:
    return (f"parity_ok={validation['parity_ok']}: {validation['exact_images']:.1%} of {validation['images']} images "
            f"within {validation['parity_tolerance']:g} ({validation['provider']}), max relative diff "
            f"{validation['max_abs_diff_relative']:.2e}, {validation['noise_ratio']:.3g}x the rounding noise, "
            f"argmax agreement {validation['argmax_agreement']:.1%}; "
            f"float top-1 agreement {validation['float_top1_agreement']:.1%}, cosine {validation['float_cosine']:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_load"), help="folder for every file")
    parser.add_argument("--images", type=int, default=1024, help="calibration images")
    parser.add_argument("--iters", type=int, default=20, help="reconstruction iterations per unit")
    parser.add_argument("--method", default="brecq")
    parser.add_argument("--modcap", default="data",
                        help="data (the default here): merged groups are the largest units, the worst case for memory")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--cache-mem", type=float, help="passed to quantize (default: its own, 4 GiB)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="passed to quantize")
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    model_path = args.out / "resnet50.onnx"
    model = build_resnet50()
    parameters = sum(p.numel() for p in model.parameters())
    zoo.export_legacy(model, model_path, INPUT_SHAPE, opset=17, keep_bn=True)
    calib = args.out / "calib"
    write_images(calib, args.images)

    work_dir, report_path = args.out / "work", args.out / "report.json"
    command = [sys.executable, "-m", "onnxmodcap.cli", "quantize", str(model_path), "--device", args.device,
               "--calib", str(calib), "--bits", str(args.bits), "--num-calib", str(args.images),
               "--method", args.method, "--modcap", args.modcap, "--iters", str(args.iters),
               "-o", str(args.out / "resnet50.quant.onnx"), "--report", str(report_path), "--work-dir", str(work_dir)]
    if args.cache_mem is not None:
        command += ["--cache-mem", str(args.cache_mem)]
    code, seconds, peak_gib, work_bytes, outcome = run_quantize(command, args.out, work_dir, report_path)
    print("| model MB | parameters | images | iters | peak RSS GiB | wall s | exit | work folder peak MB "
          "| parity (report validation) or error |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    print(f"| {model_path.stat().st_size / 1e6:.1f} | {parameters:,} | {args.images} | {args.iters} | {peak_gib:.2f} "
          f"| {seconds:.0f} | {code} | {work_bytes / 1e6:.0f} | {outcome} |")


if __name__ == "__main__":
    main()
