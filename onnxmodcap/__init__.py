"""onnxmodcap: post-training quantization of ONNX vision CNNs with block reconstruction."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("onnxmodcap")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"


def __getattr__(name: str):
    # `onnxmodcap.quantize(...)` and `onnxmodcap.analyze(...)` without importing torch for
    # `onnxmodcap --version`.
    if name == "quantize":
        from .pipeline import quantize

        return quantize
    if name == "analyze":
        from .sensitivity import analyze

        return analyze
    raise AttributeError(f"module 'onnxmodcap' has no attribute {name!r}")
