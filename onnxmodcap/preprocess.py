"""Image -> model input: the one preprocessing path that calibration and evaluation share.

Settings come from three places, the first that gives a value winning: command-line flags, the
model's `onnxmodcap.preprocess` metadata (a JSON object with the keys of `Preprocessing`), and
defaults read from the model's input shape (channels 1 -> grey, 3 -> RGB with the ImageNet
mean/std; spatial size from the shape).

An image is converted to the model's colour space, its shorter side resized to `resize`
(bilinear), its centre cropped to `input_size`, its pixels multiplied by `scale`, then
normalised per channel as (x - mean) / std, and laid out as CHW or HWC.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from .errors import UserError
from .graph import dims, image_inputs

METADATA_KEY = "onnxmodcap.preprocess"
COLORS = ("rgb", "bgr", "grey")
LAYOUTS = ("nchw", "nhwc")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    input_size: tuple[int, int]  # (height, width) of the model input
    resize: int  # the image's shorter side is resized to this before the centre crop
    scale: float  # 0..255 pixel values are multiplied by this first
    mean: tuple[float, ...]  # per channel, in the model's channel order, after scaling
    std: tuple[float, ...]
    color: str  # rgb | bgr | grey
    layout: str  # nchw | nhwc

    @property
    def channels(self) -> int:
        return 1 if self.color == "grey" else 3

    def describe(self) -> str:
        height, width = self.input_size
        numbers = lambda values: ",".join(f"{v:g}" for v in values)  # noqa: E731
        scale = "1/255" if abs(self.scale * 255 - 1) < 1e-12 else f"{self.scale:g}"
        return (f"{self.color} {height}x{width}, shorter side resized to {self.resize} then centre crop, "
                f"scale {scale}, mean {numbers(self.mean)}, std {numbers(self.std)}, {self.layout.upper()}")

    def metadata_json(self) -> str:
        """The value for the model's `onnxmodcap.preprocess` metadata entry."""
        return json.dumps(asdict(self))

    def image_to_array(self, image: Image.Image) -> np.ndarray:
        """One image as a float32 (C, H, W) or (H, W, C) array. Raises ValueError when the image's
        mode cannot be converted to the model's colour space."""
        target = "L" if self.color == "grey" else "RGB"
        try:
            image = image.convert(target)
        except ValueError:
            raise ValueError(f"a {image.mode} image cannot become {self.channels}-channel "
                             f"{self.color}") from None
        image = center_crop(resize_shorter_side(image, self.resize), self.input_size)
        pixels = np.asarray(image, dtype=np.float32)
        pixels = pixels[..., None] if self.color == "grey" else pixels
        pixels = pixels[..., ::-1] if self.color == "bgr" else pixels
        mean = np.asarray(self.mean, np.float32)
        std = np.asarray(self.std, np.float32)
        pixels = (pixels * np.float32(self.scale) - mean) / std
        return np.ascontiguousarray(pixels.transpose(2, 0, 1) if self.layout == "nchw" else pixels)


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    short, long = min(width, height), max(width, height)
    if short == size:
        return image
    long = int(size * long / short)
    new_size = (size, long) if width <= height else (long, size)
    return image.resize(new_size, Image.Resampling.BILINEAR)


def center_crop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    width, height = image.size
    crop_height, crop_width = size
    top = int(round((height - crop_height) / 2))
    left = int(round((width - crop_width) / 2))
    if (top, left, crop_height, crop_width) == (0, 0, height, width):
        return image
    return image.crop((left, top, left + crop_width, top + crop_height))


# ---------------------------------------------------------------- resolving the settings


def resolve_preprocessing(input_shape: Sequence[Any], metadata: Mapping[str, str],
                          flags: Mapping[str, Any]) -> Preprocessing:
    """Preprocessing for a model with `input_shape` (ints for fixed dims, anything else for
    dynamic ones) and metadata props `metadata`; `flags` holds command-line values (None: unset)."""
    shape = [dim if isinstance(dim, int) and dim > 0 else None for dim in input_shape]
    if len(shape) != 4:
        raise UserError(f"the model input has shape {list(input_shape)}: expected an image batch "
                        "with 4 dimensions (NCHW or NHWC)")
    chosen = {**read_metadata(metadata), **{key: value for key, value in flags.items() if value is not None}}

    def where(key: str) -> str:
        return f"--{key.replace('_', '-')}" if flags.get(key) is not None else f"model metadata {METADATA_KEY} {key}"

    layout = parse_choice(chosen["layout"], LAYOUTS, where("layout")) if "layout" in chosen else guess_layout(shape)
    channels, *spatial = (shape[1], shape[2], shape[3]) if layout == "nchw" else (shape[3], shape[1], shape[2])
    color = (parse_choice(chosen["color"], COLORS, where("color")) if "color" in chosen
             else color_for_channels(channels, input_shape))
    check_channels(color, channels, where("color"))
    input_size = parse_size(chosen["input_size"], where("input_size")) if "input_size" in chosen else None
    input_size = check_input_size(input_size, spatial, input_shape)
    resize = parse_int(chosen["resize"], where("resize")) if "resize" in chosen else max(input_size)
    if resize < max(input_size):
        raise UserError(f"{where('resize')} {resize} is smaller than the input size "
                        f"{input_size[0]}x{input_size[1]}: the centre crop would not fit")
    count = 1 if color == "grey" else 3
    default_mean, default_std = default_statistics(color)
    mean = parse_floats(chosen.get("mean", default_mean), count, where("mean"))
    std = parse_floats(chosen.get("std", default_std), count, where("std"))
    if any(value == 0 for value in std):
        raise UserError(f"{where('std')} must not contain 0")
    scale = parse_scale(chosen["scale"], where("scale")) if "scale" in chosen else 1 / 255
    return Preprocessing(input_size, resize, scale, mean, std, color, layout)


def preprocessing_for_onnx(model, flags: Mapping[str, Any]) -> Preprocessing:
    """`resolve_preprocessing` for an onnx.ModelProto (calibration reads the model with onnx,
    evaluation with ONNX Runtime): its first graph input that is not an initializer."""
    shape = dims(image_inputs(model)[0])
    metadata = {entry.key: entry.value for entry in model.metadata_props}
    return resolve_preprocessing(shape, metadata, flags)


def given_input_size(model, flags: Mapping[str, Any]) -> tuple[int, int] | None:
    """The input size from `flags` (the command line) or the model's metadata, if either gives one."""
    if flags.get("input_size") is not None:
        return parse_size(flags["input_size"], "--input-size")
    metadata = read_metadata({entry.key: entry.value for entry in model.metadata_props})
    return parse_size(metadata["input_size"], f"model metadata {METADATA_KEY} input_size") \
        if "input_size" in metadata else None


def read_metadata(metadata: Mapping[str, str]) -> dict[str, Any]:
    if METADATA_KEY not in metadata:
        return {}
    try:
        values = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as err:
        raise UserError(f"model metadata {METADATA_KEY} is not valid JSON: {err}") from None
    if not isinstance(values, dict):
        raise UserError(f"model metadata {METADATA_KEY} must be a JSON object")
    unknown = sorted(set(values) - set(Preprocessing.__dataclass_fields__))
    if unknown:
        raise UserError(f"model metadata {METADATA_KEY} has unknown keys: {', '.join(unknown)}")
    return values


def default_statistics(color: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Grey: plain [0, 1] pixels; colour: the ImageNet statistics most exported CNNs were trained with."""
    if color == "grey":
        return (0.0,), (1.0,)
    order = slice(None, None, -1) if color == "bgr" else slice(None)
    return IMAGENET_MEAN[order], IMAGENET_STD[order]


def guess_layout(shape: list[int | None]) -> str:
    """NHWC only when the last dim looks like channels and the second does not."""
    if shape[3] in (1, 3) and shape[1] not in (1, 3):
        return "nhwc"
    return "nchw"


def color_for_channels(channels: int | None, input_shape: Sequence[Any]) -> str:
    if channels == 1:
        return "grey"
    if channels == 3:
        return "rgb"
    if channels is None:
        raise UserError(f"the model input {list(input_shape)} has a dynamic channel count: pass --color")
    raise UserError(f"the model input {list(input_shape)} has {channels} channels: images can only "
                    "become 1 (grey) or 3 (RGB/BGR) channels")


def check_channels(color: str, channels: int | None, where: str) -> None:
    wanted = 1 if color == "grey" else 3
    if channels is not None and channels != wanted:
        raise UserError(f"{where} {color} gives {wanted} channel{'s' * (wanted > 1)} but the model "
                        f"input has {channels}")


def missing_input_size(input_shape: Sequence[Any]) -> UserError:
    """The error for a model whose image size is dynamic when no --input-size gives it."""
    return UserError(f"the model input {list(input_shape)} has a dynamic image size: pass --input-size")


def check_input_size(size: tuple[int, int] | None, spatial: list[int | None],
                     input_shape: Sequence[Any]) -> tuple[int, int]:
    fixed = tuple(spatial) if None not in spatial else None
    if size is None:
        if fixed is None:
            raise missing_input_size(input_shape)
        return fixed
    if fixed is not None and size != fixed:
        raise UserError(f"--input-size {size[0]}x{size[1]} does not match the model's fixed input "
                        f"{fixed[0]}x{fixed[1]}")
    return size


# ---------------------------------------------------------------- parsing one value (flag or metadata)


def parse_choice(value: Any, choices: Sequence[str], where: str) -> str:
    text = str(value).lower().replace("gray", "grey")
    if text not in choices:
        raise UserError(f"{where}: {value!r} is not one of {', '.join(choices)}")
    return text


def parse_int(value: Any, where: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: {value!r} is not a whole number") from None
    if number <= 0 or number != float(value):
        raise UserError(f"{where}: {value!r} is not a positive whole number")
    return number


def parse_size(value: Any, where: str) -> tuple[int, int]:
    """`224`, `224x192` (height x width), 224 or [224, 192]."""
    parts = value if isinstance(value, (list, tuple)) else str(value).lower().split("x")
    if len(parts) == 1:
        parts = [parts[0], parts[0]]
    if len(parts) != 2:
        raise UserError(f"{where}: {value!r} is not a size (N or HxW)")
    return parse_int(parts[0], where), parse_int(parts[1], where)


def parse_floats(value: Any, count: int, where: str) -> tuple[float, ...]:
    """A number or comma-separated numbers (or a JSON list); one number is used for every channel."""
    parts = value if isinstance(value, (list, tuple)) else str(value).split(",")
    try:
        numbers = tuple(float(part) for part in parts)
    except (TypeError, ValueError):
        raise UserError(f"{where}: {value!r} is not a list of numbers") from None
    if len(numbers) == 1:
        return numbers * count
    if len(numbers) != count:
        raise UserError(f"{where}: {len(numbers)} values for a {count}-channel input")
    return numbers


def parse_scale(value: Any, where: str) -> float:
    """A number or a fraction such as `1/255`."""
    try:
        scale = float(Fraction(str(value).strip()))
    except (ValueError, ZeroDivisionError):
        raise UserError(f"{where}: {value!r} is not a number or fraction like 1/255") from None
    if scale <= 0:
        raise UserError(f"{where} must be positive")
    return scale
