import gzip
import importlib.util
from pathlib import Path

import click
import numpy as np
import onnx
import pytest
import torch

from onnxmodcap.preprocess import METADATA_KEY, preprocessing_for_onnx

TOOL = Path(__file__).parents[1] / "tools" / "fashion_mnist.py"
spec = importlib.util.spec_from_file_location("fashion_mnist", TOOL)
fashion_mnist = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fashion_mnist)


def idx_bytes(array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def test_idx_files_are_read_plain_or_gzipped(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "plain").write_bytes(idx_bytes(images))
    (tmp_path / "packed.gz").write_bytes(gzip.compress(idx_bytes(images)))
    np.testing.assert_array_equal(fashion_mnist.read_idx(tmp_path / "plain"), images)
    np.testing.assert_array_equal(fashion_mnist.read_idx(tmp_path / "packed.gz"), images)
    (tmp_path / "floats").write_bytes(b"\0\0\x0d\x01" + (1).to_bytes(4, "big") + b"\0" * 4)
    with pytest.raises(click.ClickException, match="is not an unsigned-byte IDX file"):
        fashion_mnist.read_idx(tmp_path / "floats")


def test_missing_package_is_named(monkeypatch, tmp_path):
    monkeypatch.setattr(fashion_mnist, "DATA_DIR", tmp_path)
    with pytest.raises(click.ClickException, match="install it with `apt-get install dataset-fashion-mnist`"):
        fashion_mnist.load_split("train")


@pytest.mark.parametrize("arch", sorted(fashion_mnist.ARCHITECTURES))
def test_export_keeps_batchnorm_dynamic_batch_and_preprocessing(arch, tmp_path):
    torch.manual_seed(0)
    model = fashion_mnist.ARCHITECTURES[arch]()
    path = tmp_path / f"{arch}.onnx"
    fashion_mnist.export(model, path)
    proto = onnx.load(str(path))
    assert proto.opset_import[0].version == 17
    assert any(node.op_type == "BatchNormalization" for node in proto.graph.node)
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [entry.key for entry in proto.metadata_props] == [METADATA_KEY]
    assert preprocessing_for_onnx(proto, {}) == fashion_mnist.PREPROCESSING
