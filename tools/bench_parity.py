"""How validation's parity rule sees models whose rounding flips many images: the gap between ONNX
Runtime and the simulation against the two rounding noises it is compared with.

    OMP_NUM_THREADS=2 python tools/bench_parity.py [--out /tmp/bench_parity] [--case regnetx ...]

Cases (all by default):
- regnetx: the shipped RegNetX at W2A4 after 200 BRECQ iterations per unit, seed 2, all shipped
  calibration images (the parity images are calibration images);
- resnet50: the 224x224 ResNet-50 of tools/bench_load.py, RTN W4A4, 64 of 128 of its JPEG images
  for calibration, the other 64 for parity;
- chain: tools/bench_large_model.py's plain chain of 40 convolutions 1024 -> 1024 (no residuals, no
  BN; 1.5 GB of weights), RTN W4A4 with min-max initialisation, 64 of 128 random tensors;
- zoo (not in the default run): every architecture of the test zoo (tools/zoo.py, 3x32x32, legacy
  export) at W8A8, W4A8, W4A4 and W2A4, as `qdq` for ONNX Runtime, `qdq` for TensorRT and `native`:
  RTN, 96 random calibration tensors and 64 held-out ones, as tests/test_quantize.py quantizes them.
  12 architectures x 12 = 144 rows; the strict column says whether every image agrees within 1e-4 with the same top-1.

Each case runs `onnxmodcap.quantize` as a user would; a parity failure is printed as its error
line. The last lines printed are a markdown table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import onnxmodcap
from onnxmodcap.errors import UserError

import bench_large_model
import bench_load
import zoo

SHIPPED = Path(__file__).resolve().parent.parent / "models"


def regnetx(out: Path) -> tuple[Path, Path, dict]:
    return SHIPPED / "regnetx.onnx", SHIPPED / "calib", {"wbits": 2, "abits": 4, "method": "brecq", "modcap": "off",
                                                         "iters": 200, "seed": 2}


def resnet50(out: Path) -> tuple[Path, Path, dict]:
    model = out / "resnet50.onnx"
    zoo.export_legacy(bench_load.build_resnet50(), model, bench_load.INPUT_SHAPE, opset=17, keep_bn=True)
    bench_load.write_images(out / "resnet50_calib", 128)
    return model, out / "resnet50_calib", {"bits": 4, "method": "rtn", "num_calib": 64}


def chain(out: Path) -> tuple[Path, Path, dict]:
    model = out / "chain.onnx"
    bench_large_model.write_model(model, width=1024, layers=40)
    calib = out / "chain_calib.npy"
    side = bench_large_model.SIDE
    np.save(calib, np.random.default_rng(0).standard_normal((128, 3, side, side)).astype(np.float32))
    return model, calib, {"bits": 4, "method": "rtn", "init": "minmax", "num_calib": 64}


def zoo_grid(out: Path) -> list[tuple[str, Path, Path, dict]]:
    calib = out / "zoo_calib.npy"
    np.save(calib, np.random.default_rng(0).standard_normal((160, 3, 32, 32)).astype(np.float32))
    cases = []
    for name, entry in sorted(zoo.ZOO.items()):
        model = out / f"{name}.onnx"
        zoo.export_legacy(zoo.make_model(name), model, entry.input_shape)
        for wbits, abits in ZOO_BITS:
            for target, fmt in ZOO_FORMATS:
                options = {"wbits": wbits, "abits": abits, "target": target, "format": fmt, "method": "rtn",
                           "num_calib": 96}
                cases.append((f"{name} W{wbits}A{abits} {target} {fmt}", model, calib, options))
    return cases


CASES = {"regnetx": regnetx, "resnet50": resnet50, "chain": chain}
ZOO_BITS = [(8, 8), (4, 8), (4, 4), (2, 4)]
ZOO_FORMATS = [("ort", "qdq"), ("tensorrt", "qdq"), ("ort", "native")]


def measure(label: str, model: Path, calib: Path, options: dict, out: Path) -> str:
    started = time.monotonic()
    shown = {k: v for k, v in options.items() if k not in ("target", "format")}  # the zoo's label names both
    try:
        output = out / f"{label.replace(' ', '.')}.quant.onnx"
        v = onnxmodcap.quantize(model, calib, output=str(output), **options).validation
    except UserError as err:
        return f"| {label} | {shown} | error: {err} ||||||||||| {time.monotonic() - started:.0f} |"
    logits = v.parity.outputs[0]  # the zoo's classifiers have one output; norms relative to its range
    strict = v.parity.exact_images == 1.0 and logits.argmax_agreement == 1.0
    return (f"| {label} | {shown} | {v.parity.exact_images:.1%} | {logits.max_abs_diff_relative:.2e} | {logits.gap:.3g} "
            f"| {logits.ort_noise:.3g} | {logits.torch_noise:.3g} | {logits.noise_ratio:.3g} | {logits.argmax_agreement:.1%} "
            f"| {logits.torch_argmax_agreement:.1%} | {logits.top1_changes_beyond_noise} of {logits.top1_changes} "
            f"| {'yes' if strict else 'no'} | {'ok' if v.parity_ok else 'FAILED'} "
            f"| {time.monotonic() - started:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_parity"), help="folder for every file")
    parser.add_argument("--case", action="append", choices=sorted([*CASES, "zoo"]),
                        help="case to run (repeatable; default all but zoo)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.case or list(CASES):
        cases = zoo_grid(args.out) if name == "zoo" else [(name, *CASES[name](args.out))]
        rows += [measure(*case, args.out) for case in cases]
    print("| case | options | images within 1e-4 | max diff | gap | ort_noise | torch_noise | noise ratio "
          "| argmax agreement | torch argmax agreement | top-1 changes beyond noise | strict | parity | wall s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
