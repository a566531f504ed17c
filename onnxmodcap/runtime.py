"""ONNX Runtime sessions with an explicit execution provider (CUDA when it loads, else CPU)."""

from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import onnxruntime as ort
import torch

from .config import PROVIDER_CHOICES, check_choice
from .errors import UserError, first_line

# A TensorRT-target model keeps full-range int8 weights. ONNX Runtime's CPU int8 kernels on x86
# without VNNI saturate on those (export.py), so such a model runs with its Q/DQ as written:
# the arithmetic TensorRT's int8 kernels carry out exactly.
TENSORRT_NOTE = ("the model targets TensorRT; ONNX Runtime runs its Q/DQ as written, without fusing them "
                 "into its CPU int8 kernels")
log = logging.getLogger(__name__)
QUANTIZATION_METADATA_KEY = "onnxmodcap.quantization"  # how onnxmodcap quantized a model (export.py)
PROVIDERS = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
# The CUDA provider computes float32 convolutions in TF32 unless told otherwise; the simulation does
# not (run_state.exact_float32), and TF32's 10-bit mantissas would move activations across their grid.
PROVIDER_OPTIONS = {"cuda": {"use_tf32": "0"}, "cpu": {}}


def create_session(model: str | bytes, provider: str = "auto") -> ort.InferenceSession:
    """Open `model` (a path or serialized bytes) on the requested provider.

    `auto` takes CUDA when onnxruntime can load it and falls back to CPU; the provider that
    actually runs is `session_provider(session)`.
    """
    check_choice("provider", provider, PROVIDER_CHOICES)
    available = ort.get_available_providers()
    if provider == "cuda" and PROVIDERS["cuda"] not in available:
        raise UserError("--provider cuda requested but onnxruntime has no CUDA execution provider here")
    wanted = ["cpu"] if provider == "cpu" else ["cuda", "cpu"]
    options = session_options(log_severity=3)
    # A CUDA provider that fails to load logs an error before falling back; the fallback is reported
    # by session_provider instead.
    ort.set_default_logger_severity(4)
    tensorrt = targets_tensorrt(model)
    if tensorrt:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    try:
        loadable = [name for name in wanted if PROVIDERS[name] in available]
        session = ort.InferenceSession(model, options, providers=[PROVIDERS[name] for name in loadable],
                                       provider_options=[PROVIDER_OPTIONS[name] for name in loadable])
        if tensorrt and session_provider(session) == "cpu":
            log.info(TENSORRT_NOTE)
    except Exception as err:  # onnxruntime raises its own exception types per failure kind
        message = first_line(err)
        raise UserError(f"ONNX Runtime cannot load the model: {message}") from err
    finally:
        ort.set_default_logger_severity(2)
    if provider == "cuda" and session_provider(session) != "cuda":
        raise UserError("--provider cuda requested but the CUDA execution provider failed to load")
    return session


def session_options(log_severity: int) -> ort.SessionOptions:
    """Session options with as many intra-op threads as torch uses (OMP_NUM_THREADS or
    torch.set_num_threads; by default the cores), so that a run held to N threads holds ONNX
    Runtime to them too."""
    options = ort.SessionOptions()
    options.log_severity_level = log_severity
    options.intra_op_num_threads = torch.get_num_threads()
    return options


def targets_tensorrt(model: str | bytes) -> bool:
    """Whether onnxmodcap quantized the model for TensorRT (its metadata says so). Read before any
    session is built: ONNX Runtime's full optimization can fail to load such a model at opset 21
    and later (int8 Q/DQ around MaxPool, see export.py), the level it will not run at anyway."""
    try:
        proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(model, load_external_data=False)
    except Exception:  # not a readable model: ONNX Runtime's own load error says why
        return False
    written = {p.key: p.value for p in proto.metadata_props}.get(QUANTIZATION_METADATA_KEY)
    try:
        return json.loads(written).get("target") == "tensorrt" if written else False
    except (ValueError, AttributeError):
        return False


def session_provider(session: ort.InferenceSession) -> str:
    """The short name (`cuda` or `cpu`) of the provider that runs the session's nodes first."""
    return "cuda" if session.get_providers()[0] == PROVIDERS["cuda"] else "cpu"


def fixed_batch_size(session: ort.InferenceSession) -> int | None:
    """The batch size the model's (first) input fixes, or None where it is dynamic."""
    batch = session.get_inputs()[0].shape[0]
    return batch if isinstance(batch, int) and batch > 0 else None


def run_batched(session: ort.InferenceSession, inputs: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Every output of `session` on `inputs`, fed `batch_size` images at a time, or as many as a
    fixed batch size takes (the last chunk padded with zeros, whose outputs are dropped)."""
    name = session.get_inputs()[0].name
    fixed = fixed_batch_size(session)
    step = fixed or batch_size
    results = []
    for start in range(0, len(inputs), step):
        chunk = inputs[start:start + step]
        count = len(chunk)
        if fixed and count < fixed:
            chunk = np.concatenate([chunk, np.zeros((fixed - count, *chunk.shape[1:]), chunk.dtype)])
        results.append([output[:count] for output in session.run(None, {name: chunk})])
    return [np.concatenate(outputs) for outputs in zip(*results)]


def check_input_accepted(model: str, inputs: np.ndarray) -> None:
    """Run `model` on `inputs` in ONNX Runtime's CPU provider; a model that rejects their shape is
    the user's choice of --input-size, not a fault of the tool."""
    session = create_session(model, "cpu")
    try:
        session.run(None, {session.get_inputs()[0].name: inputs})
    except Exception as err:  # onnxruntime raises its own exception types per failure kind
        raise UserError(f"the model does not run on input {list(inputs.shape[1:])} (--input-size): "
                        f"{first_line(err)}") from None
