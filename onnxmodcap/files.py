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

from .errors import UserError

EXTERNAL_TENSOR_BYTES = 1024  # tensors at least this large go to the external-data file


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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


def stage_model(model: onnx.ModelProto, output: Path, external_data: bool = False) -> StagedModel:
    """Save `model` under the name of `output` in a new temporary folder beside it. With
    `external_data` (the source model had it), its weights go to `<output name>.data`."""
    try:
        folder = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    except OSError as err:
        raise write_error(output, err) from None
    staged = StagedModel(folder / output.name, output)
    try:
        if external_data:
            onnx.save_model(model, str(staged.path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=f"{output.name}.data", size_threshold=EXTERNAL_TENSOR_BYTES)
        else:
            staged.path.write_bytes(model.SerializeToString())
    except BaseException as err:
        staged.discard()
        if isinstance(err, OSError):
            raise write_error(output, err) from None
        raise
    return staged
