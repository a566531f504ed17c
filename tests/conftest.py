import os

import numpy as np
import pytest
import torch

import zoo  # tools/zoo.py: pytest puts tools/ on the import path (pyproject.toml)

TORCH_EXPORTERS = ("legacy", "legacy_bn", "dynamo", "dynamo_static")
EXPORTERS = TORCH_EXPORTERS + ("paddle",)


def pytest_configure(config):
    """Under pytest-xdist (`-n`), each worker takes its share of the cores, in torch, in ONNX Runtime
    (which follows torch's thread count) and in the CLI processes it starts: threads that spin on
    cores the other workers use make every test several times slower. OMP_NUM_THREADS, when set,
    is left as it is."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, len(os.sched_getaffinity(0)) // workers)
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", choices=("cpu", "cuda"),
                     help="the --device of the quantize runs in the parity, determinism and resume tests "
                          "(default cpu; CI has no GPU)")


@pytest.fixture(scope="session")
def device(request):
    chosen = request.config.getoption("--device")
    if chosen == "cuda" and not torch.cuda.is_available():
        pytest.exit("--device cuda: torch sees no CUDA device", returncode=4)
    return chosen


def export_zoo_model(name, exporter, folder):
    """Build zoo model `name` (seeded) and export it; returns (path, ZooEntry or None for paddle)."""
    if exporter == "paddle":
        return zoo.build_paddle_style_model(folder / "paddle_mobilenetv3.onnx"), None
    if exporter not in TORCH_EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}, expected one of {EXPORTERS}")
    entry = zoo.ZOO[name]
    torch.manual_seed(0)
    model = entry.build()
    path = folder / f"{name}.{exporter}.onnx"
    if exporter == "legacy":
        zoo.export_legacy(model, path, entry.input_shape)
    elif exporter == "legacy_bn":
        zoo.export_legacy(model, path, entry.input_shape, keep_bn=True)
    else:
        zoo.export_dynamo(model, path, entry.input_shape, static_batch=exporter == "dynamo_static")
    return path, entry


@pytest.fixture(scope="session")
def exported_model(tmp_path_factory):
    """Factory: exported_model(name, exporter) -> (path, ZooEntry | None).

    exporter is one of 'legacy', 'legacy_bn', 'dynamo' (dynamic batch), 'dynamo_static' (the
    exporter's default: batch 1), 'paddle' (for 'paddle' the name is ignored). Each model is built and exported once per session."""
    folder = tmp_path_factory.mktemp("zoo")
    cache = {}

    def get(name, exporter):
        key = ("paddle", "paddle") if exporter == "paddle" else (name, exporter)
        if key not in cache:
            cache[key] = export_zoo_model(name, exporter, folder)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def calib(tmp_path_factory):
    """A .npy file of 160 seeded random 3x32x32 tensors: calibration data for the zoo models."""
    path = tmp_path_factory.mktemp("calib") / "inputs.npy"
    np.save(path, np.random.default_rng(0).standard_normal((160, 3, 32, 32)).astype(np.float32))
    return path
