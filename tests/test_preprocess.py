import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from onnxmodcap.errors import UserError
from onnxmodcap.preprocess import (IMAGENET_MEAN, IMAGENET_STD, METADATA_KEY, preprocessing_for_onnx,
                                   resolve_preprocessing)

NO_FLAGS = {}


def metadata(**values):
    return {METADATA_KEY: json.dumps(values)}


def test_defaults_come_from_the_input_shape():
    grey = resolve_preprocessing(["batch", 1, 28, 28], {}, NO_FLAGS)
    assert (grey.color, grey.layout, grey.input_size, grey.resize) == ("grey", "nchw", (28, 28), 28)
    assert (grey.mean, grey.std, grey.scale) == ((0.0,), (1.0,), 1 / 255)
    rgb = resolve_preprocessing([1, 224, 224, 3], {}, NO_FLAGS)
    assert (rgb.color, rgb.layout, rgb.input_size) == ("rgb", "nhwc", (224, 224))
    assert (rgb.mean, rgb.std) == (IMAGENET_MEAN, IMAGENET_STD)


def test_flags_override_metadata_which_overrides_shape_defaults():
    props = metadata(mean=[0.5], std=[0.25], scale=1.0, resize=32)
    from_metadata = resolve_preprocessing(["N", 1, 28, 28], props, NO_FLAGS)
    assert (from_metadata.mean, from_metadata.std, from_metadata.scale, from_metadata.resize) == ((0.5,), (0.25,), 1.0, 32)
    flags = {"mean": "0.1", "scale": "1/255", "resize": None, "std": None}
    from_flags = resolve_preprocessing(["N", 1, 28, 28], props, flags)
    assert (from_flags.mean, from_flags.std, from_flags.scale, from_flags.resize) == ((0.1,), (0.25,), 1 / 255, 32)


def test_bgr_defaults_reverse_the_imagenet_statistics_and_dynamic_sizes_take_the_flag():
    bgr = resolve_preprocessing(["N", 3, "H", "W"], {}, {"color": "bgr", "input_size": "224x192", "resize": "256"})
    assert (bgr.mean, bgr.std) == (IMAGENET_MEAN[::-1], IMAGENET_STD[::-1])
    assert (bgr.input_size, bgr.resize) == ((224, 192), 256)


@pytest.mark.parametrize("shape, props, flags, message", [
    (["N", 4, 32, 32], {}, NO_FLAGS,
     "the model input ['N', 4, 32, 32] has 4 channels: images can only become 1 (grey) or 3 (RGB/BGR) channels"),
    (["N", 3, "H", "W"], {}, NO_FLAGS, "the model input ['N', 3, 'H', 'W'] has a dynamic image size: pass --input-size"),
    (["N", 3, 32, 32], {}, {"color": "grey"}, "--color grey gives 1 channel but the model input has 3"),
    (["N", 3, 32, 32], {}, {"input_size": "28"}, "--input-size 28x28 does not match the model's fixed input 32x32"),
    (["N", 3, 32, 32], {}, {"mean": "1,2"}, "--mean: 2 values for a 3-channel input"),
    (["N", 3, 32, 32], {}, {"resize": "16"}, "--resize 16 is smaller than the input size 32x32: the centre crop would not fit"),
    (["N", 3, 32, 32], {}, {"scale": "one"}, "--scale: 'one' is not a number or fraction like 1/255"),
    (["N", 1, 28, 28], {METADATA_KEY: "{"}, NO_FLAGS, "model metadata onnxmodcap.preprocess is not valid JSON"),
    (["N", 1, 28, 28], metadata(gamma=2), NO_FLAGS, "model metadata onnxmodcap.preprocess has unknown keys: gamma"),
    (["N", 1, 28, 28], metadata(color="rgb"), NO_FLAGS,
     "model metadata onnxmodcap.preprocess color rgb gives 3 channels but the model input has 1"),
    (["N", 784], {}, NO_FLAGS, "the model input has shape ['N', 784]: expected an image batch with 4 dimensions"),
])
def test_impossible_settings_are_one_line_errors(shape, props, flags, message):
    with pytest.raises(UserError) as caught:
        resolve_preprocessing(shape, props, flags)
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


def test_image_is_resized_on_the_shorter_side_then_centre_cropped_and_normalised():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (60, 40, 3), dtype=np.uint8))  # 40 wide, 60 high
    prep = resolve_preprocessing(["N", 3, 16, 16], {}, {"resize": "20", "mean": "0.5", "std": "0.25", "color": "bgr"})
    expected = np.asarray(image.resize((20, 30), Image.Resampling.BILINEAR), np.float32)[7:23, 2:18]
    expected = ((expected[..., ::-1] / 255 - 0.5) / 0.25).transpose(2, 0, 1)
    np.testing.assert_allclose(prep.image_to_array(image), expected, rtol=1e-6, atol=1e-6)


def test_nhwc_grey_layout_and_unconvertible_mode():
    prep = resolve_preprocessing(["N", 8, 8, 1], {}, NO_FLAGS)
    array = prep.image_to_array(Image.new("RGB", (8, 8), (255, 255, 255)))
    assert array.shape == (8, 8, 1) and np.allclose(array, 1.0)
    with pytest.raises(ValueError, match="a LAB image cannot become 1-channel grey"):
        prep.image_to_array(Image.new("LAB", (8, 8)))


def test_onnx_model_gives_the_same_settings_as_its_shape_and_metadata():
    graph = helper.make_graph([helper.make_node("Relu", ["image"], ["out"])], "g",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 28, 28])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 1, 28, 28])])
    model = helper.make_model(graph)
    onnx.helper.set_model_props(model, metadata(mean=[0.286], std=[0.353]))
    expected = resolve_preprocessing(["N", 1, 28, 28], metadata(mean=[0.286], std=[0.353]), NO_FLAGS)
    assert preprocessing_for_onnx(model, NO_FLAGS) == expected
    assert preprocessing_for_onnx(model, {"std": "1"}).std == (1.0,)
