"""Fuzzing the two loaders that read files from anywhere: the ONNX loader (`prepare`) and the
calibration image reader. Any input must give a result or a UserError (one clean error line), never
another exception.

The default run tries FUZZ_EXAMPLES inputs per strategy; `ONNXMODCAP_FUZZ_EXAMPLES=N pytest
tests/test_fuzz.py` runs a longer campaign (docs/benchmarks/reliability.md records the last one).
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from onnxmodcap.calibrate import read_images
from onnxmodcap.errors import UserError
from onnxmodcap.prepare import prepare
from onnxmodcap.preprocess import Preprocessing

FUZZ_EXAMPLES = int(os.environ.get("ONNXMODCAP_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
                derandomize="ONNXMODCAP_FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def seed_model() -> bytes:
    """A small valid model with the parts a loader must walk: BN to fold, a Constant, metadata."""
    rng = np.random.default_rng(0)
    initializers = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
                    *(numpy_helper.from_array(rng.random(4).astype(np.float32) + 0.5, name)
                      for name in ("gamma", "beta", "mean", "var"))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["b"]),
             helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.float32(0.5), "k")),
             helper.make_node("Mul", ["b", "k"], ["m"]),
             helper.make_node("Relu", ["m"], ["y"])]
    graph = helper.make_graph(nodes, "seed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    helper.set_model_props(model, {"onnxmodcap.preprocess": '{"input_size": [8, 8]}'})
    return model.SerializeToString()


def seed_images() -> list[bytes]:
    pixels = np.random.default_rng(0).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    encoded = []
    for fmt in ("PNG", "JPEG", "BMP", "TIFF", "WEBP"):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, fmt)
        encoded.append(buffer.getvalue())
    return encoded


def mutated(seeds: list[bytes]):
    """A seed with a few bytes overwritten, and sometimes cut short or extended."""
    @st.composite
    def build(draw):
        data = bytearray(draw(st.sampled_from(seeds)))
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        if draw(st.booleans()):
            data = data[:draw(st.integers(1, len(data)))] + draw(st.binary(max_size=16))
        return bytes(data)
    return build()


MODEL_BYTES = st.one_of(st.binary(max_size=512), mutated([seed_model()]))
IMAGE_BYTES = st.one_of(st.binary(max_size=512), mutated(seed_images()))
PREPROCESSING = Preprocessing(input_size=(8, 8), resize=8, scale=1 / 255, mean=(0.5,) * 3, std=(0.25,) * 3,
                              color="rgb", layout="nchw")


def outcome(err: UserError) -> str:
    """The kind of refusal, without the file name, for hypothesis' statistics."""
    return " ".join(word for word in str(err).split()[:4] if "/" not in word)


def test_seeds_are_valid():
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "seed.onnx"
        path.write_bytes(seed_model())
        assert len(prepare(path).bn_stats) == 1
        for index, image in enumerate(seed_images()):
            (Path(folder) / f"{index}.img.png").write_bytes(image)
        arrays, skipped = read_images(Path(folder), PREPROCESSING, 10)
        assert arrays.shape == (5, 3, 8, 8) and len(skipped) == 0


@FUZZ
@given(MODEL_BYTES)
def test_onnx_loader_gives_a_model_or_one_clean_error(data):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        path.write_bytes(data)
        try:
            prepared = prepare(path)
        except UserError as err:
            event(f"refused: {outcome(err)}")
            return
        event("loaded")
        assert isinstance(prepared.model, onnx.ModelProto)


@FUZZ
@given(IMAGE_BYTES, st.sampled_from([".png", ".jpg", ".bmp", ".tif", ".webp"]))
def test_image_reader_gives_an_array_or_one_clean_error(data, suffix):
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / f"image{suffix}").write_bytes(data)
        try:
            arrays, skipped = read_images(Path(folder), PREPROCESSING, 1)
        except UserError as err:
            event(f"refused: {outcome(err)}")
            return
        event("read")
        assert arrays.shape == (1, 3, 8, 8) and np.all(np.isfinite(arrays)) and len(skipped) == 0
