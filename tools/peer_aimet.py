"""AIMET-ONNX AdaRound as a peer quantizer, for the `aimet-adaround` cells of tools/bench_real_models.py.

Runs under the peer virtualenv of tools/setup_peers.sh (AIMET is never a dependency of onnxmodcap):

    /tmp/peers/aimet/bin/python tools/peer_aimet.py --model M.onnx --calib calib.npy --output out.onnx \\
        --wbits 4 --abits 8 --count 128 --batch-size 32 [--iters 10000] [--threads 1] [--report out.json]

AIMET's own recipe, with its defaults wherever the benchmark fixes nothing:
1. QuantizationSimModel with weights at --wbits and activations at --abits and the default config
   (the alias "default", which is AIMET's per-channel config: symmetric per-channel weights for Conv,
   ConvTranspose, Gemm, MatMul and PRelu, asymmetric per-tensor activations, biases left float)
   and the default quant scheme (min-max);
2. apply_adaround over the first --count calibration images in batches of --batch-size, --iters
   optimisation steps per layer (AIMET's default when omitted; each step takes up to 32 samples of
   one batch, the batches in turn); it freezes the rounded weights' encodings. Skipped with
   --no-adaround (AIMET's plain quantization simulation, weights rounded to nearest);
3. compute_encodings on the same batches for the activations;
4. to_onnx_qdq: QuantizeLinear/DequantizeLinear, the weights stored as integers ahead of a
   per-channel DequantizeLinear (INT4 at 4 bits, for which AIMET raises the opset to 21), the
   activations as uint8/uint4 QDQ pairs.

The written file is then loaded in plain onnxruntime without and with graph optimisations, and its
outputs compared with the sim's. onnxruntime 1.32's extended-level QDQ rewrites do not all handle
4-bit activations: a uint4 tensor fed straight into a MaxPool fails to load (exit with `error:`),
and elsewhere results can move far from the sim's (the shipped RegNetX at W4A4).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import tempfile
import time
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort


def batches(path: str, count: int, batch_size: int, input_name: str) -> list[dict[str, np.ndarray]]:
    """The first `count` calibration inputs as AIMET's input format: one {input: array} per batch."""
    inputs = np.load(path)[:count].astype(np.float32)
    return [{input_name: inputs[i:i + batch_size]} for i in range(0, len(inputs), batch_size)]


def adaround_defaults() -> dict:
    """AdaRound's settings that 2.42's apply_adaround does not expose, read from the installed package."""
    from aimet_onnx import apply_adaround
    from aimet_onnx.adaround import adaround_loss, adaround_optimizer

    return {"default_iterations": inspect.signature(apply_adaround).parameters["num_iterations"].default,
            "samples_per_step": adaround_optimizer.BATCH_SIZE, "reg_param": adaround_loss._REG_PARAM,
            "beta_range": adaround_loss._BETA_RANGE, "warm_start": adaround_loss._WARM_START,
            "optimizer": "torch.optim.Adam, lr 1e-3 (torch default)"}


def quantizer_summary(sim) -> dict:
    """How the sim's enabled quantizers came out: counts by kind, bit width, symmetry and granularity."""
    summary = Counter()
    for kind, names in (("param", set(sim.param_names)), ("activation", set(sim.activation_names))):
        for name in names:
            quantizer = sim.qc_quantize_op_dict.get(name)
            if quantizer is not None and quantizer.enabled:
                granularity = "per-channel" if quantizer.quant_info.usePerChannelMode else "per-tensor"
                symmetry = "symmetric" if quantizer.use_symmetric_encodings else "asymmetric"
                summary[f"{kind} {quantizer.bitwidth}-bit {symmetry} {granularity}"] += 1
    return dict(sorted(summary.items()))


def written_summary(qdq: onnx.ModelProto, path: str) -> dict:
    """The QDQ file's opset, Q/DQ node counts and integer initializers (weights and zero points) by type."""
    integers = Counter(onnx.TensorProto.DataType.Name(t.data_type) for t in qdq.graph.initializer
                       if t.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT64))
    return {"path": path, "opset": next(o.version for o in qdq.opset_import if o.domain in ("", "ai.onnx")),
            "qdq_nodes": dict(Counter(node.op_type for node in qdq.graph.node if "Linear" in node.op_type)),
            "integer_initializers": dict(integers)}


def save(report: dict, path: str | None) -> None:
    if path:
        with open(path, "w") as stream:
            json.dump(report, stream, indent=1)


def check_runs(path: str, model: onnx.ModelProto, probe: np.ndarray, simulated: np.ndarray, threads: int) -> dict:
    """Load the written file in plain onnxruntime, check its input and output names against the float model's
    and compare its outputs on `probe` with AIMET's sim's: equal without graph optimisations, close with the
    default ones (which fuse QDQ into integer kernels). Exits with `error:` when onnxruntime refuses it."""
    want = ([i.name for i in model.graph.input], [o.name for o in model.graph.output])
    gaps = {}
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        options.intra_op_num_threads = threads
        try:
            session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        except Exception as error:  # e.g. 4-bit activations before a MaxPool at the extended level
            sys.exit(f"error: onnxruntime {level.name} cannot load {path}: {error}")
        names = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
        assert names == want, f"the QDQ model's inputs/outputs {names} differ from the float model's {want}"
        output = session.run(None, {want[0][0]: probe})[0]
        gaps[level.name] = float(np.abs(output - simulated).max() / max(np.abs(simulated).max(), 1e-12))
    return {"output_shape": list(output.shape), "max_gap_to_sim_relative": gaps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag in ("--model", "--calib", "--output"):
        parser.add_argument(flag, required=True)
    for flag in ("--wbits", "--abits", "--count"):
        parser.add_argument(flag, type=int, required=True)
    parser.add_argument("--iters", type=int, help="AdaRound steps per layer (default: AIMET's own)")
    parser.add_argument("--no-adaround", action="store_true", help="round weights to nearest instead")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 0)),
                        help="torch and onnxruntime threads (default: $OMP_NUM_THREADS, else their own defaults)")
    parser.add_argument("--report", help="also write what was done as JSON here")
    args = parser.parse_args()

    import torch
    import aimet_onnx
    from aimet_onnx import QuantizationSimModel, apply_adaround

    start = time.perf_counter()
    model = onnx.load(args.model)
    input_name = model.graph.input[0].name
    data = batches(args.calib, args.count, args.batch_size, input_name)
    types = {4: "int4", 8: "int8", 16: "int16"}
    if args.threads:  # onnxruntime ignores OMP_NUM_THREADS: the sim's sessions get it as an option
        torch.set_num_threads(args.threads)
    sim_options = {"intra_op_num_threads": args.threads} if args.threads else None
    iterations = {} if args.iters is None else {"num_iterations": args.iters}
    with tempfile.TemporaryDirectory() as scratch:
        sim = QuantizationSimModel(model, param_type=types[args.wbits], activation_type=types[args.abits],
                                   path=scratch, session_options_kwargs=sim_options)
        built = time.perf_counter()
        if not args.no_adaround:
            apply_adaround(sim, data, **iterations)
        rounded = time.perf_counter()
        sim.compute_encodings(data)
        qdq = sim.to_onnx_qdq(prequantize_constants=True)
        probe = data[0][input_name][:4]
        simulated = sim.session.run(None, {input_name: probe})[0]
    onnx.save(qdq, args.output)
    done = time.perf_counter()

    adaround = None
    if not args.no_adaround:
        adaround = adaround_defaults()
        adaround |= {"iterations": adaround["default_iterations"] if args.iters is None else args.iters,
                     "batches": len(data), "batch_size": args.batch_size,
                     "images": sum(len(batch[input_name]) for batch in data)}
    scheme = inspect.signature(QuantizationSimModel.__init__).parameters["quant_scheme"].default
    report = {
        "versions": {"aimet-onnx": aimet_onnx.__version__, "torch": torch.__version__,
                     "onnxruntime": ort.__version__},
        "calls": ["QuantizationSimModel(param_type, activation_type)",
                  *([] if args.no_adaround else ["apply_adaround"]), "compute_encodings",
                  "to_onnx_qdq(prequantize_constants=True)"],
        "quantsim": {"quant_scheme": f"{scheme.name} (default)", "config_file": "default (per-channel)",
                     "quantizers": quantizer_summary(sim)},
        "adaround": adaround,
        "written": written_summary(qdq, args.output),
        "seconds": {"sim": round(built - start, 1), "adaround": round(rounded - built, 1),
                    "encodings_export": round(done - rounded, 1), "total": round(done - start, 1)},
        "threads": args.threads or "default",
    }
    for key, value in report.items():
        print(f"{key}: {value}", flush=True)
    save(report, args.report)  # first without the check, which may exit
    report["onnxruntime"] = check_runs(args.output, model, probe, simulated, args.threads)
    print(f"onnxruntime: {report['onnxruntime']}")
    save(report, args.report)


if __name__ == "__main__":
    main()
