"""Writing files so that a reader never sees half of one: write beside the target, then rename.

A failed write (full disk, read-only folder) becomes one error line naming the file, and leaves
neither the target nor a temporary file behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import numpy_helper

from .errors import UserError
from .weights import Weights, fits_in_protobuf, is_stub, with_values

ALIGN_BYTES = 1 << 20  # tensors this large start at a multiple of ALIGNMENT in the data file,
ALIGNMENT = 1 << 16  # so that ONNX Runtime can map them instead of copying them


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_writable_folder(path: Path, what: str) -> None:
    """Refuse, before any work, a file whose folder is missing or not writable."""
    folder = path.parent
    if not folder.is_dir():
        raise UserError(f"{what} folder does not exist: {folder}")
    try:
        tempfile.TemporaryFile(dir=folder).close()  # os.access says yes to root on a read-only mount
    except OSError as err:
        raise UserError(f"{what} folder is not writable: {folder} ({err.strerror})") from None


def write_error(path: Path, err: OSError) -> UserError:
    return UserError(f"cannot write {path}: {err.strerror or err}")


def write_atomically(path: Path, content: bytes, private: bool = False) -> None:
    """Write `content` to `path` through a temporary file in the same folder and a rename.
    `private` keeps mkstemp's 0600 mode; otherwise the file gets the usual mode for the umask."""
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise write_error(path, err) from None
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(content)
        if not private:
            os.chmod(temporary, 0o666 & ~current_umask())
        os.replace(temporary, path)
    except BaseException as err:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise write_error(path, err) from None
        raise


@dataclass
class StagedModel:
    """A model saved in a private temporary folder beside its final path, ready to be checked and
    then moved into place (with its external-data file, if it has one). Leaving the `with` block
    removes whatever was not committed."""

    path: Path
    output: Path

    def __enter__(self) -> StagedModel:
        return self

    def __exit__(self, *exc) -> None:
        self.discard()

    @property
    def folder(self) -> Path:
        return self.path.parent

    def files(self) -> list[Path]:
        """The model last, so that it never appears before its external data."""
        data = sorted(p for p in self.folder.iterdir() if p != self.path)
        return data + [self.path]

    def commit(self) -> None:
        try:
            for staged in self.files():
                os.replace(staged, self.output.parent / staged.name)
        except OSError as err:
            raise write_error(self.output, err) from None
        finally:
            self.discard()

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def stage_model(model: onnx.ModelProto, weights: Weights, output: Path, external_data: bool = False) -> StagedModel:
    """Save `model`, its stubs filled from `weights`, under the name of `output` in a new temporary
    folder beside it. With `external_data` (the source model had it), or when the model is over
    2 GB, the stubs' values go to `<output name>.data`."""
    try:
        folder = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    except OSError as err:
        raise write_error(output, err) from None
    staged = StagedModel(folder / output.name, output)
    try:
        if external_data or not fits_in_protobuf(model, weights):
            save_with_external_data(model, weights, staged.path, f"{output.name}.data")
        else:
            staged.path.write_bytes(with_values(model, weights).SerializeToString())
    except BaseException as err:
        staged.discard()
        if isinstance(err, OSError):
            raise write_error(output, err) from None
        raise
    return staged


def save_with_external_data(model: onnx.ModelProto, weights: Weights, path: Path, location: str) -> None:
    """Write the stubs' values one by one into `location` beside `path`, then the graph that points
    at them: no protobuf ever holds them all."""
    saved = onnx.ModelProto()
    saved.CopyFrom(model)
    with open(path.parent / location, "wb") as stream:
        for tensor in saved.graph.initializer:
            if not is_stub(tensor):
                continue
            data = numpy_helper.from_array(weights[tensor.name]).raw_data
            if len(data) >= ALIGN_BYTES:
                stream.write(bytes(-stream.tell() % ALIGNMENT))
            del tensor.external_data[:]
            for key, value in (("location", location), ("offset", stream.tell()), ("length", len(data))):
                tensor.external_data.add(key=key, value=str(value))
            stream.write(data)
    path.write_bytes(saved.SerializeToString())
