"""Real pretrained models at their real resolution: onnxmodcap against ONNX Runtime's quantize_static.

The models and images come from `tools/real_models.py` (registry packages only). Every quantizer
calibrates on the same tensors and every quantized model is scored on the same held-out tensors
against the float model:
- classifiers (EfficientNet-Lite1, OpenNSFW, PP-OCRv5 orientation): top-1 agreement and KL;
- PP-OCRv5 detection: IoU of the probability map binarised at 0.3;
- PP-OCRv5 recognition: share of CTC-decoded strings identical to float's, per-position agreement.

Each quantizer runs as its own process under /usr/bin/time (wall seconds, peak RSS). Timing runs
must have the machine to themselves.

    python tools/bench_real_models.py tensors --models /tmp/real_models --out /tmp/real_bench
    python tools/bench_real_models.py run --models /tmp/real_models --out /tmp/real_bench \\
        --cell ppocrv5_rec:w8a8:rtn --cell ppocrv5_rec:w8a8:ort-minmax ...
    python tools/bench_real_models.py run ... --cell efficientnet_lite1.legacy:w4a8:qdrop --seed 0 1 2
    python tools/bench_real_models.py render --out /tmp/real_bench

A cell is MODEL:BITS:QUANTIZER with BITS w8a8, w4a8 or w4a4 and QUANTIZER an onnxmodcap method
(rtn, brecq, qdrop, pdquant), optionally followed by `+tensorrt` (--target), `+reduce-range`,
`+bias-correction`, `+no-bias-correction` or `+no-dc` (pdquant without distribution correction),
`/minmax` (--init), `@300` (--iters) and `%4.2` (--mixed-precision 4.2), in that order; or
ort-minmax / ort-percentile (ONNX Runtime's quantize_static); or
aimet-adaround, optionally `@N` (AdaRound steps per layer, AIMET's default 10000 without it), or
aimet-quantsim (AIMET's quantization simulation without AdaRound): AIMET-ONNX
in its own virtualenv (`tools/setup_peers.sh`, run by `tools/peer_aimet.py` under
$ONNXMODCAP_AIMET_PYTHON, default /tmp/peers/aimet/bin/python); or quark-preset, quark-cle or
quark-cle-minmax: AMD Quark's ONNX quantizer at W8A8 in its own virtualenv (`tools/peer_quark.py`
under $ONNXMODCAP_QUARK_PYTHON, default /tmp/peers/quark/bin/python; its docstring says what each
recipe sets). MODEL:float:noise scores no
quantizer: the float model on held-out inputs with Gaussian noise of one grey level added (not on a
text line's padding), the fidelity that the task metric tolerates on these inputs.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchgrid import markdown_table, parse_cell, read_records, run_cells

CALIB, PARITY, HELD_OUT = 128, 64, 256
DET_THRESHOLD = 0.3


@dataclass(frozen=True)
class RealModel:
    file: str
    task: str  # classes | det | rec
    calib: str  # an image folder or a .npy of ready inputs in the models folder
    heldout: str
    grey_level: float  # one step of 8-bit pixel values in the model's input units (after normalisation)
    flags: dict = field(default_factory=dict)  # onnxmodcap preprocessing flags
    batch_size: int = 32
    images: int = CALIB  # calibration images (the detector's pages are fewer and larger)
    # Text lines padded on the right with 0 (NCHW): input noise falls on the line, not on the padding,
    # which a deployment fills with exact zeros whatever the camera saw
    padded: bool = False


NSFW_FLAGS = {"layout": "nhwc", "color": "bgr", "resize": "256", "scale": "1", "mean": "104,117,123", "std": "1"}
MODELS = {
    "efficientnet_lite1.legacy": RealModel("efficientnet_lite1.legacy.onnx", "classes", "calib", "heldout",
                                           grey_level=1 / 128),
    "efficientnet_lite1.dynamo": RealModel("efficientnet_lite1.dynamo.onnx", "classes", "calib", "heldout",
                                           grey_level=1 / 128),
    "open_nsfw": RealModel("open_nsfw.onnx", "classes", "calib", "heldout", grey_level=1.0, flags=NSFW_FLAGS),
    "ppocrv5_cls": RealModel("ppocrv5_cls.onnx", "classes", "ocr_cls_calib.npy", "ocr_cls_heldout.npy",
                             grey_level=2 / 255, padded=True),
    "ppocrv5_rec": RealModel("ppocrv5_rec.onnx", "rec", "ocr_rec_calib.npy", "ocr_rec_heldout.npy",
                             grey_level=2 / 255, flags={"input_size": "48x320"}, padded=True),
    "ppocrv5_det": RealModel("ppocrv5_det.onnx", "det", "ocr_det_calib", "ocr_det_heldout",  # ImageNet std, averaged
                             grey_level=1 / (255 * 0.226), flags={"input_size": "640"}, batch_size=4, images=48),
}
BITS = {"w8a8": (8, 8), "w4a8": (4, 8), "w4a4": (4, 4), "w3a4": (3, 4)}
AIMET_PYTHON = os.environ.get("ONNXMODCAP_AIMET_PYTHON", "/tmp/peers/aimet/bin/python")
QUARK_PYTHON = os.environ.get("ONNXMODCAP_QUARK_PYTHON", "/tmp/peers/quark/bin/python")


def model_tensors(name: str, models: Path, out: Path) -> None:
    """calib.npy (calibration then parity images) and heldout.npy of one model, preprocessed once."""
    from onnxmodcap.calibrate import load_calibration
    from onnxmodcap.pipeline import graph_input_shape
    from onnxmodcap.preprocess import preprocessing_for_onnx
    import onnx

    spec = MODELS[name]
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    model = onnx.load(models / spec.file, load_external_data=False)
    for source, target, count in ((spec.calib, "calib.npy", spec.images + PARITY), (spec.heldout, "heldout.npy", HELD_OUT)):
        path = models / source
        if path.suffix == ".npy":
            arrays = np.load(path)[:count]
        else:
            arrays = load_calibration(path, preprocessing_for_onnx(model, spec.flags), graph_input_shape(model),
                                      None).inputs[:count]
        np.save(folder / target, arrays.astype(np.float32))
        print(f"{name}/{target}: {arrays.shape}")


def timed(command: list[str], env: dict) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run under /usr/bin/time: the result, wall seconds and peak RSS in MiB."""
    completed = subprocess.run(["/usr/bin/time", "-f", "%e %M", *command], capture_output=True, text=True, env=env)
    wall, rss_kib = completed.stderr.strip().splitlines()[-1].split()
    return completed, float(wall), int(rss_kib) / 1024


def quantize_command(name: str, bits: str, quantizer: str, models: Path, out: Path, output: Path,
                     seed: int = 0) -> list[str]:
    spec = MODELS[name]
    wbits, abits = BITS[bits]
    source, calib = models / spec.file, out / name / "calib.npy"
    if quantizer.startswith("ort-"):
        return [sys.executable, __file__, "ort", "--model", str(source), "--calib", str(calib), "--output", str(output),
                "--method", quantizer[4:], "--wbits", str(wbits), "--abits", str(abits), "--count", str(spec.images)]
    # a peer runs under its own interpreter and script: peers are no dependencies of onnxmodcap
    peer = [str(source), "--calib", str(calib), "--output", str(output), "--wbits", str(wbits), "--abits",
            str(abits), "--count", str(spec.images), "--batch-size", str(spec.batch_size),
            "--report", str(output.with_suffix(".json"))]
    if quantizer.startswith("quark-"):
        return [QUARK_PYTHON, str(Path(__file__).with_name("peer_quark.py")), "--model", *peer,
                "--recipe", quantizer[6:]]
    quantizer, _, budget = quantizer.partition("%")
    method, _, iters = quantizer.partition("@")
    if method in ("aimet-adaround", "aimet-quantsim"):
        command = [AIMET_PYTHON, str(Path(__file__).with_name("peer_aimet.py")), "--model", *peer]
        command += ["--no-adaround"] if method == "aimet-quantsim" else []
        return command + (["--iters", iters] if iters else [])
    method, _, init = method.partition("/")
    method, _, target = method.partition("+")
    command = [sys.executable, "-m", "onnxmodcap.cli", "quantize", str(source), "--calib", str(calib), "-o", str(output),
               "--wbits", str(wbits), "--abits", str(abits), "--method", method, "--num-calib", str(spec.images),
               "--batch-size", str(spec.batch_size), "--report", str(output.with_suffix(".json")), "--seed", str(seed)]
    command += ["--iters", iters] if iters else []
    modifiers = {"reduce-range": ["--reduce-range"], "bias-correction": ["--bias-correction"],
                 "no-bias-correction": ["--no-bias-correction"], "no-dc": ["--no-dc"]}
    command += modifiers.get(target, ["--target", target] if target else [])
    command += ["--init", init] if init else []
    command += ["--mixed-precision", budget] if budget else []
    if "input_size" in spec.flags:
        command += ["--input-size", spec.flags["input_size"]]
    return command


def ort_quantize(args) -> None:
    """ONNX Runtime's quantize_static in QDQ format, per-channel weights (QInt4 for 4-bit)."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    import onnx
    import onnxruntime as ort

    inputs = np.load(args.calib)[:args.count]
    name = ort.InferenceSession(args.model, providers=["CPUExecutionProvider"]).get_inputs()[0].name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{name: inputs[i:i + 1]} for i in range(len(inputs))])

        def get_next(self):
            return next(self.batches, None)

    prepared = Path(args.output).with_suffix(".pre.onnx")
    model = onnx.load(args.model)
    if model.opset_import[0].version < 13:  # per-channel DequantizeLinear needs opset 13; quantize_static
        model = onnx.version_converter.convert_version(model, 13)  # writes it anyway and the model fails to load
    onnx.save(model, prepared)
    quant_pre_process(str(prepared), str(prepared), skip_symbolic_shape=True)
    types = {8: QuantType.QInt8, 4: QuantType.QInt4}
    with histograms_in_chunks(PERCENTILE_CHUNK):
        quantize_static(str(prepared), args.output, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        weight_type=types[args.wbits], activation_type=types[args.abits],
                        calibrate_method={"minmax": CalibrationMethod.MinMax,
                                          "percentile": CalibrationMethod.Percentile}[args.method])
    prepared.unlink()


PERCENTILE_CHUNK = 16  # calibration inputs per histogram update of ONNX Runtime's Percentile calibrator


@contextlib.contextmanager
def histograms_in_chunks(chunk: int):
    """ONNX Runtime's HistogramCalibrater keeps every calibration input's intermediate outputs before
    it builds the histograms (over 22 GB for the recogniser's 128 lines). Within this block it reads
    `chunk` inputs at a time and adds each chunk to its histograms, which its collector merges;
    MinMax is unaffected."""
    from onnxruntime.quantization.calibrate import HistogramCalibrater

    collect_all = HistogramCalibrater.collect_data

    class Listed:
        def __init__(self, items):
            self.items = iter(items)

        def get_next(self):
            return next(self.items, None)

    def collect_in_chunks(self, reader):
        inputs = iter(reader.get_next, None)
        while part := list(itertools.islice(inputs, chunk)):
            collect_all(self, Listed(part))

    HistogramCalibrater.collect_data = collect_in_chunks
    try:
        yield
    finally:
        HistogramCalibrater.collect_data = collect_all


def outputs_of(model: Path, inputs: np.ndarray, batch: int) -> np.ndarray:
    import onnxruntime as ort

    from onnxmodcap.runtime import run_batched

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return run_batched(session, inputs, batch)[0].astype(np.float64)


def scores(task: str, reference: np.ndarray, quantized: np.ndarray, stable: np.ndarray | None = None) -> dict:
    """The task's fidelity of `quantized` to `reference` (float outputs on the held-out inputs).
    `stable` marks the inputs whose float answer survives input noise (`noise_stable`); classifiers
    and the recogniser also report their agreement on those inputs alone."""
    from onnxmodcap.metrics import FidelityTotals, output_kind

    totals = FidelityTotals("output", output_kind(reference))
    totals.add(reference, quantized)
    fidelity = totals.result()
    result = {"sqnr_db": round(fidelity.sqnr_db, 2), "cosine": round(fidelity.cosine, 5)}
    if task == "det":
        a, b = reference > DET_THRESHOLD, quantized > DET_THRESHOLD
        return result | {"iou": float((a & b).sum() / max((a | b).sum(), 1))}
    same = answers(task, reference) == answers(task, quantized)
    if task == "classes":
        result |= {"top1_agreement": fidelity.top1_agreement, "kl": fidelity.kl}
    else:
        result["position_agreement"] = float((reference.argmax(-1) == quantized.argmax(-1)).mean())
        result["strings_identical"] = float(same.mean())
    if stable is not None:
        result |= {"stable_inputs": int(stable.sum()), "stable_agreement": float(same[stable].mean())}
    return result


def answers(task: str, outputs: np.ndarray) -> np.ndarray:
    """What each input's output says: a classifier's top-1 class, the recogniser's decoded string."""
    if task == "classes":
        return outputs.reshape(len(outputs), -1).argmax(1)
    return np.array([" ".join(map(str, ctc(labels))) for labels in outputs.argmax(-1)])


def ctc(labels: np.ndarray) -> tuple[int, ...]:
    """Greedy CTC: collapse repeats, drop the blank (class 0)."""
    collapsed = [label for k, label in enumerate(labels) if k == 0 or label != labels[k - 1]]
    return tuple(int(label) for label in collapsed if label != 0)


def onnxmodcap_method(quantizer: str) -> bool:
    return not quantizer.startswith(("ort-", "aimet-", "quark-")) and quantizer != "noise"


def output_path(out: Path, name: str, bits: str, quantizer: str, seed: int = 0) -> Path:
    """Where a cell's model goes; a seed other than 0 gets its own file."""
    stem = f"{bits}.{quantizer.replace('@', '_').replace('/', '_')}" + (f".seed{seed}" if seed else "")
    return out / name / f"{stem}.onnx"


def heldout_inputs(out: Path, name: str, noise: float = 0.0) -> np.ndarray:
    """The model's held-out inputs, with Gaussian noise of standard deviation `noise` grey levels
    added (seed 0; the same pattern scaled for every level), not on a text line's padding columns."""
    spec = MODELS[name]
    heldout = np.load(out / name / "heldout.npy")
    if not noise:
        return heldout
    pattern = np.random.default_rng(0).normal(0, spec.grey_level, heldout.shape).astype(np.float32)
    if spec.padded:
        pattern *= np.any(heldout != 0, axis=(1, 2), keepdims=True)
    return heldout + np.float32(noise) * pattern


@functools.cache
def float_reference(models: Path, out: Path, name: str) -> tuple[np.ndarray, np.ndarray | None]:
    """The float model's outputs on the held-out inputs, and which inputs are noise-stable: those
    whose float answer (top-1 class, decoded string) is the same with one grey level of input noise.
    Agreement on the other inputs says little, since the float model itself changes its answer there."""
    spec = MODELS[name]
    model = models / spec.file
    reference = outputs_of(model, heldout_inputs(out, name), spec.batch_size)
    if spec.task == "det":
        return reference, None
    noisy = outputs_of(model, heldout_inputs(out, name, noise=1.0), spec.batch_size)
    return reference, answers(spec.task, reference) == answers(spec.task, noisy)


def score_file(args, name: str, output: Path, noise: float = 0.0) -> dict:
    """The fidelity of model `output` on the held-out inputs (with `noise` grey levels of input noise)
    to the float model on the clean inputs."""
    spec = MODELS[name]
    reference, stable = float_reference(args.models, args.out, name)
    quantized = outputs_of(output, heldout_inputs(args.out, name, noise), spec.batch_size)
    return scores(spec.task, reference, quantized, stable)


def rescore(args) -> None:
    """Score the written models of every recorded cell again (after a change to the metrics). Only a
    cell's latest record is scored again: the file on disk is the latest run's."""
    path = args.out / "results.jsonl"
    records = [json.loads(line) for line in open(path)]
    latest = {record_key(r): r for r in records}.values()
    for record in latest:
        output = output_path(args.out, record["model"], record["bits"], record["quantizer"], record.get("seed", 0))
        if record["model"] not in (args.model or MODELS) or "error" in record:
            continue
        if record["quantizer"] == "noise":
            record |= score_file(args, record["model"], args.models / MODELS[record["model"]].file, noise=1.0)
        elif output.exists():
            record |= score_file(args, record["model"], output)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def noise_cell(args, name: str) -> dict:
    """The float model's fidelity to itself when every held-out input gets Gaussian noise of one grey
    level (seed 0): what the task metric tolerates on these inputs."""
    return {"wall_s": 0, "peak_rss_mib": 0, **score_file(args, name, args.models / MODELS[name].file, noise=1.0)}


def quantize_cell(args, name: str, bits: str, quantizer: str, seed: int) -> dict:
    output = output_path(args.out, name, bits, quantizer, seed)
    command = quantize_command(name, bits, quantizer, args.models, args.out, output, seed)
    completed, wall, rss = timed(command, {**os.environ, "TQDM_DISABLE": "1"})
    record = {"wall_s": wall, "peak_rss_mib": round(rss)}
    if completed.returncode != 0:
        errors = [line for line in completed.stderr.splitlines() if line.startswith(("error:", "Traceback"))]
        return record | {"error": (errors or completed.stderr.strip().splitlines()[-2:-1] or ["?"])[-1][:300]}
    try:
        return record | score_file(args, name, output)
    except Exception as error:  # a peer's model that ONNX Runtime cannot load or run
        return record | {"error": f"the written model does not run in ONNX Runtime: {str(error).splitlines()[0][:250]}"}


def run(args) -> None:
    """Measure every cell again (the latest record of a cell is the one rendered)."""
    def measure(cell: dict, seed: int) -> dict:
        if cell["quantizer"] == "noise":
            return noise_cell(args, cell["model"])
        return quantize_cell(args, cell["model"], cell["bits"], cell["quantizer"], seed)

    cells = [parse_cell(text, ("model", "bits", "quantizer")) for text in args.cell]
    for cell in cells:
        if any(args.seed) and not onnxmodcap_method(cell["quantizer"]):
            sys.exit(f"error: {cell['quantizer']}: --seed applies to onnxmodcap's methods only")
    run_cells(cells, args.seed, args.out / "results.jsonl", measure)


def record_key(record: dict) -> tuple:
    """A cell and seed: the latest record of each is the one rendered and rescored."""
    return record["model"], record["bits"], record["quantizer"], record.get("seed", 0)


def render(args) -> None:
    records = read_records([args.out / "results.jsonl"], failed=True)
    latest = {record_key(r): r for r in records}
    rows = []
    for (model, bits, quantizer, seed), r in sorted(latest.items()):
        quantizer += f" seed {seed}" if seed else ""
        if "error" in r:
            fidelity, sqnr = f"failed: {r['error']}", ""
        elif "top1_agreement" in r:
            fidelity, sqnr = f"top-1 agreement {100 * r['top1_agreement']:.1f} %, KL {r['kl']:.4f}", r["sqnr_db"]
        elif "iou" in r:
            fidelity, sqnr = f"IoU@{DET_THRESHOLD} {100 * r['iou']:.1f} %", r["sqnr_db"]
        else:
            fidelity = (f"strings identical {100 * r['strings_identical']:.1f} %, positions "
                        f"{100 * r['position_agreement']:.2f} %")
            sqnr = r["sqnr_db"]
        stable = f"{100 * r['stable_agreement']:.1f} % of {r['stable_inputs']}" if "stable_agreement" in r else ""
        if quantizer == "noise":
            rows.append([model, "float", "input noise of one grey level", fidelity, "", sqnr, "", ""])
        else:
            rows.append([model, bits.upper(), quantizer, fidelity, stable, sqnr, f"{r['wall_s']:.0f}",
                         r["peak_rss_mib"]])
    table = markdown_table(["model", "W/A", "quantizer", "fidelity to float", "same answer on noise-stable inputs",
                            "SQNR dB", "wall s", "peak RSS MiB"], rows, numeric=[False] * 4 + [True] * 4)
    print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    tensors = commands.add_parser("tensors", help="preprocess each model's calibration and held-out inputs")
    cells = commands.add_parser("run", help="quantize and score cells")
    table = commands.add_parser("render", help="print the results as a markdown table")
    again = commands.add_parser("rescore", help="score the recorded cells' models again")
    for sub in (tensors, cells, again):
        sub.add_argument("--models", type=Path, default=Path("/tmp/real_models"))
    for sub in (tensors, cells, table, again):
        sub.add_argument("--out", type=Path, default=Path("/tmp/real_bench"))
    for sub in (tensors, again):
        sub.add_argument("--model", action="append", choices=sorted(MODELS), help="default: every model")
    cells.add_argument("--cell", action="append", required=True, help="MODEL:BITS:QUANTIZER (repeatable)")
    cells.add_argument("--seed", type=int, nargs="+", default=[0],
                       help="onnxmodcap's --seed, each cell once per seed (default: 0); a seed other than 0 "
                            "writes BITS.QUANTIZER.seedN.onnx")
    ort_run = commands.add_parser("ort", help=argparse.SUPPRESS)
    for flag in ("--model", "--calib", "--output", "--method"):
        ort_run.add_argument(flag, required=True)
    for flag in ("--wbits", "--abits", "--count"):
        ort_run.add_argument(flag, type=int, required=True)
    args = parser.parse_args()
    if args.command == "tensors":
        for name in args.model or sorted(MODELS):
            model_tensors(name, args.models, args.out)
    elif args.command == "run":
        run(args)
    elif args.command == "render":
        render(args)
    elif args.command == "rescore":
        rescore(args)
    else:
        ort_quantize(args)


if __name__ == "__main__":
    main()
