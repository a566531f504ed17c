"""Image sources for calibration and evaluation, read lazily, one image at a time.

Three forms:
- a labelled folder (torchvision ImageFolder): one subfolder per class, class index = sorted
  subfolder name order, images anywhere below a class folder;
- an unlabelled folder: image files directly inside it;
- a compact labelled file (.npz): `images` uint8 (N, H, W) or (N, H, W, 3), optional `labels`
  (N,) integers and `classes` (names), as `models/fashion_mnist_test.npz`.

Images that cannot be read or converted are skipped and recorded; callers warn about them.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from .errors import UserError, first_line
from .preprocess import Preprocessing

# torchvision's ImageFolder extensions
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"})
# What Pillow raises for unreadable, truncated or unconvertible files.
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


@dataclass(frozen=True)
class Sample:
    source: Path | int  # an image file, or an index into the compact file's arrays
    label: int | None


@dataclass(frozen=True)
class ImageSet:
    path: Path
    samples: list[Sample]
    classes: list[str] | None  # None: unlabelled
    pixels: np.ndarray | None = field(default=None, repr=False)  # the compact file's images

    @property
    def labelled(self) -> bool:
        return self.classes is not None

    def name(self, sample: Sample) -> str:
        return str(sample.source) if isinstance(sample.source, Path) else f"{self.path}[{sample.source}]"

    def load(self, sample: Sample) -> Image.Image:
        if isinstance(sample.source, Path):
            with Image.open(sample.source) as image:
                image.load()
                return image
        return Image.fromarray(self.pixels[sample.source])

    def spread(self, limit: int | None) -> ImageSet:
        """At most `limit` samples spread evenly over the set, so that a class-sorted folder
        still yields every class."""
        if limit is None or limit >= len(self.samples):
            return self
        picked = [self.samples[i * len(self.samples) // limit] for i in range(limit)]
        return ImageSet(self.path, picked, self.classes, self.pixels)


def open_images(path: str | os.PathLike) -> ImageSet:
    """The image set at `path`: a labelled folder, an unlabelled folder or a compact .npz file."""
    path = Path(path)
    if path.is_file():
        return open_compact(path)
    if not path.is_dir():
        raise UserError(f"{path}: no such file or folder")
    class_folders = sorted(entry for entry in path.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    loose_images = image_files(path)
    if class_folders and loose_images:
        raise UserError(f"{path} holds both images and subfolders: put every image in a class "
                        "subfolder (labelled) or all images directly in the folder (unlabelled)")
    if class_folders:
        return open_image_folder(path, class_folders)
    if not loose_images:
        raise UserError(f"{path} has no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return ImageSet(path, [Sample(file, None) for file in loose_images], None)


def image_files(folder: Path, recursive: bool = False) -> list[Path]:
    entries = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(entry for entry in entries
                  if entry.is_file() and entry.suffix.lower() in IMAGE_EXTENSIONS
                  and not any(part.startswith(".") for part in entry.relative_to(folder).parts))


def open_image_folder(path: Path, class_folders: list[Path]) -> ImageSet:
    samples = [Sample(file, index) for index, folder in enumerate(class_folders)
               for file in image_files(folder, recursive=True)]
    if not samples:
        raise UserError(f"{path} has {len(class_folders)} class folders but no images in them")
    return ImageSet(path, samples, [folder.name for folder in class_folders])


def open_compact(path: Path) -> ImageSet:
    if path.suffix.lower() != ".npz":
        raise UserError(f"{path}: expected an image folder or a .npz file")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise UserError(f"{path} is not a readable .npz image file ({err})") from None
    images = arrays.get("images")
    if images is None:
        raise UserError(f"{path} has no `images` array (found: {', '.join(arrays) or 'nothing'})")
    if images.dtype != np.uint8 or not (images.ndim == 3 or (images.ndim == 4 and images.shape[3] in (1, 3))):
        raise UserError(f"{path}: `images` is {images.dtype} {images.shape}; expected uint8 (N, H, W), "
                        "(N, H, W, 1) or (N, H, W, 3)")
    if len(images) == 0:
        raise UserError(f"{path} has no images")
    images = images[..., 0] if images.ndim == 4 and images.shape[3] == 1 else images
    labels, classes = compact_labels(path, arrays, len(images))
    samples = [Sample(index, None if labels is None else int(labels[index])) for index in range(len(images))]
    return ImageSet(path, samples, classes, images)


def compact_labels(path: Path, arrays: dict, count: int) -> tuple[np.ndarray | None, list[str] | None]:
    labels = arrays.get("labels")
    if labels is None:
        return None, None
    if labels.shape != (count,) or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise UserError(f"{path}: `labels` must hold {count} non-negative integers, one per image")
    classes = arrays.get("classes")
    names = [str(name) for name in classes] if classes is not None else [str(i) for i in range(labels.max() + 1)]
    if labels.max() >= len(names):
        raise UserError(f"{path}: label {labels.max()} has no entry in `classes` ({len(names)} names)")
    return labels, names


# ---------------------------------------------------------------- prepared batches


@dataclass(frozen=True)
class Batch:
    inputs: np.ndarray  # (B, C, H, W) or (B, H, W, C) float32
    labels: np.ndarray | None  # (B,) int64


@dataclass
class Skipped:
    """The images that could not be used, with the reason, in reading order."""

    entries: list[tuple[str, str]] = field(default_factory=list)

    def add(self, name: str, error: Exception) -> None:
        reason = first_line(error)
        self.entries.append((name, reason))

    def __len__(self) -> int:
        return len(self.entries)


def prepared_batches(images: ImageSet, preprocessing: Preprocessing, batch_size: int,
                     skipped: Skipped) -> Iterator[Batch]:
    """Model-ready batches in the set's order; images that fail are recorded in `skipped`.
    Decoding runs in a thread pool (Pillow releases the GIL while decoding and resizing).

    Pillow warns, in several lines, about images from 89 megapixels and refuses them from 179 (a
    DecompressionBombError, reported as a skipped file); in between is a large photo, used
    silently. The decoding threads see the warning filters of the process, so the filter that
    silences it is set here, in the calling thread, around the pool, and removed afterwards."""

    def prepare(sample: Sample) -> np.ndarray | Exception:
        try:
            return preprocessing.image_to_array(images.load(sample))
        except IMAGE_ERRORS as err:
            return err

    with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
        for start in range(0, len(images.samples), batch_size):
            chunk = images.samples[start:start + batch_size]
            arrays, labels = [], []
            for sample, result in zip(chunk, pool.map(prepare, chunk)):
                if isinstance(result, Exception):
                    skipped.add(images.name(sample), result)
                else:
                    arrays.append(result)
                    labels.append(sample.label)
            if arrays:
                yield Batch(np.stack(arrays), np.asarray(labels, np.int64) if images.labelled else None)
