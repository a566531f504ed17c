import json
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from onnxmodcap.cli import main

MODELS = Path(__file__).parents[1] / "models"
TEST_SET = MODELS / "fashion_mnist_test.npz"
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def evaluate(*args):
    return CliRunner().invoke(main, ["evaluate", *map(str, args)])


def run_onnx(path, inputs):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: inputs})[0].astype(np.float64)


def log_softmax(logits):
    shifted = logits - logits.max(1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(1, keepdims=True))


def export_tiny_model(path, channels=3, classes=4, dynamic_batch=True):
    """A small BN conv net on fixed 32x32 input."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(channels, 8, 3, stride=2, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, classes)).eval()
    torch.onnx.export(model, torch.zeros(1, channels, 32, 32), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None)
    return path


@pytest.fixture(scope="module")
def rgb_model(tmp_path_factory):
    return export_tiny_model(tmp_path_factory.mktemp("rgb") / "tiny_rgb.onnx")


# (class folder, file name, size (width, height), Pillow mode)
PHOTOS = [("cat", "wide.jpg", (80, 50), "RGB"), ("cat", "small.png", (33, 21), "RGB"),
          ("dog", "grey.png", (64, 64), "L"), ("dog", "alpha.png", (40, 41), "RGBA"),
          ("owl", "tall.jpeg", (30, 90), "RGB"), ("owl", "big.JPG", (300, 200), "RGB")]


def write_photos(root, photos=PHOTOS):
    rng = np.random.default_rng(1)
    for folder, name, (width, height), mode in photos:
        (root / folder).mkdir(parents=True, exist_ok=True)
        channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
        pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8).squeeze()
        Image.fromarray(pixels, mode).save(root / folder / name)
    return root


def torchvision_style_input(path, size=32):
    """Resize the shorter side to `size` (bilinear), centre-crop, ImageNet-normalise, CHW."""
    image = Image.open(path).convert("RGB")
    width, height = image.size
    scale = size / min(width, height)
    image = image.resize((size, int(height * scale)) if width <= height else (int(width * scale), size),
                         Image.Resampling.BILINEAR)
    left, top = round((image.width - size) / 2), round((image.height - size) / 2)
    pixels = np.asarray(image.crop((left, top, left + size, top + size)), np.float32) / 255
    return ((pixels - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)


def test_shipped_data_slice_matches_a_direct_computation():
    model, reference = MODELS / "regnetx.onnx", MODELS / "resnet18.onnx"
    result = evaluate(model, "--data", TEST_SET, "--reference", reference, "--limit", 400,
                      "--batch-size", 100, "--provider", "cpu", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)

    data = np.load(TEST_SET)
    picked = [i * 10000 // 400 for i in range(400)]
    images, labels = data["images"][picked], data["labels"][picked]
    inputs = ((images.astype(np.float32) / 255 - 0.2860) / 0.3530)[:, None]
    logits, reference_logits = run_onnx(model, inputs), run_onnx(reference, inputs)
    top5 = np.argsort(-logits, axis=1)[:, :5]
    log_p, log_q = log_softmax(reference_logits), log_softmax(logits)
    cosine = (logits * reference_logits).sum(1) / np.linalg.norm(logits, axis=1) / np.linalg.norm(reference_logits, axis=1)

    assert report["images"] == 400 and report["provider"] == "cpu"
    assert report["top1"] == np.mean(logits.argmax(1) == labels)
    assert report["top5"] == np.mean((top5 == labels[:, None]).any(1))
    assert report["agreement"] == np.mean(logits.argmax(1) == reference_logits.argmax(1))
    assert report["kl"] == pytest.approx(np.mean((np.exp(log_p) * (log_p - log_q)).sum(1)), rel=1e-4)
    assert report["cosine"] == pytest.approx(cosine.mean(), rel=1e-6)


def test_model_cards_accuracy_is_what_evaluate_measures():
    """Each card row `| file.onnx | ... | top-1 | top-5 |` is reproduced on the full test set."""
    rows = re.findall(r"^\| `(\w+\.onnx)` \|.*\| ([\d.]+) % \| ([\d.]+) % \|$",
                      (MODELS / "README.md").read_text(), flags=re.M)
    assert len(rows) == 3
    for name, top1, top5 in rows:
        result = evaluate(MODELS / name, "--data", TEST_SET, "--batch-size", 500, "--provider", "cpu")
        assert result.exit_code == 0, result.output
        assert f"top-1: {top1} %" in result.stdout and f"top-5: {top5} %" in result.stdout, (name, result.stdout)


def test_rgb_model_on_an_image_folder_of_mixed_photos(tmp_path, rgb_model):
    folder = write_photos(tmp_path / "photos")
    result = evaluate(rgb_model, "--data", folder, "--json", "--provider", "cpu")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)

    files = sorted((folder / cls / name for cls, name, _, _ in PHOTOS), key=lambda p: (p.parent.name, p.name))
    labels = np.array([{"cat": 0, "dog": 1, "owl": 2}[p.parent.name] for p in files])
    logits = run_onnx(rgb_model, np.stack([torchvision_style_input(p) for p in files]))
    assert report["images"] == 6
    assert report["top1"] == np.mean(logits.argmax(1) == labels)
    assert report["top5"] is None  # only 4 logits
    assert report["agreement"] is None and report["kl"] is None and report["cosine"] is None
    assert "preprocessing: rgb 32x32, shorter side resized to 32 then centre crop" in result.stderr


def test_model_with_a_fixed_batch_of_one_gives_the_same_report(tmp_path, rgb_model):
    folder = write_photos(tmp_path / "photos")
    fixed = export_tiny_model(tmp_path / "fixed.onnx", dynamic_batch=False)
    reports = [evaluate(model, "--data", folder, "--batch-size", 4, "--json", "--provider", "cpu").stdout
               for model in (rgb_model, fixed)]
    assert json.loads(reports[0]) == json.loads(reports[1])


def test_human_readable_report_with_reference(tmp_path, rgb_model):
    folder = write_photos(tmp_path / "photos")
    result = evaluate(rgb_model, "--data", folder, "--reference", rgb_model, "--provider", "cpu", "--batch-size", 2)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == "images: 6"
    assert "top-1 agreement with reference: 100.00 %" in result.stdout
    assert "mean KL(reference || model): 0.000000" in result.stdout
    assert "mean cosine similarity of logits: 1.000000" in result.stdout
    assert result.stderr.splitlines()[0] == "provider: cpu"
    assert len(result.stderr.splitlines()) == 3  # provider, preprocessing, data: once, whatever the batch count


def test_a_corrupt_image_among_many_is_named_and_counted(tmp_path, rgb_model):
    folder = write_photos(tmp_path / "photos")
    broken = folder / "dog" / "broken.jpg"
    broken.write_bytes(b"this is not a jpeg")
    result = evaluate(rgb_model, "--data", folder, "--json", "--provider", "cpu")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["images"] == 6
    assert f"warning: skipped {broken}: cannot identify image file" in result.stderr
    assert "warning: skipped 1 of 7 images that could not be read or converted" in result.stderr


def one_error_line(result, message):
    """Exit code 2, nothing on stdout, and stderr is one line starting `error: <message>`."""
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), result.stderr


def test_empty_folder(tmp_path, rgb_model):
    one_error_line(evaluate(rgb_model, "--data", tmp_path), f"{tmp_path} has no images (")


def test_nothing_readable(tmp_path, rgb_model):
    (tmp_path / "only.png").write_bytes(b"\x89PNG broken")
    one_error_line(evaluate(rgb_model, "--data", tmp_path, "--reference", rgb_model),
                   f"no usable image in {tmp_path}: all 1 skipped (first: {tmp_path / 'only.png'}: cannot identify image file")


def test_image_that_cannot_become_the_model_channels(tmp_path):
    grey_model = export_tiny_model(tmp_path / "grey.onnx", channels=1)
    Image.new("LAB", (32, 32)).save(tmp_path / "lab.tif")
    one_error_line(evaluate(grey_model, "--data", tmp_path, "--reference", grey_model),
                   f"no usable image in {tmp_path}: all 1 skipped (first: {tmp_path / 'lab.tif'}: "
                   "a LAB image cannot become 1-channel grey)")


def test_model_whose_channels_no_image_can_become(tmp_path):
    model = export_tiny_model(tmp_path / "four.onnx", channels=4)
    write_photos(tmp_path / "photos")
    one_error_line(evaluate(model, "--data", tmp_path / "photos"),
                   "the model input ['batch', 4, 32, 32] has 4 channels: images can only become 1 (grey) "
                   "or 3 (RGB/BGR) channels")


def test_more_class_folders_than_logits(tmp_path, rgb_model):
    write_photos(tmp_path, [(f"class{i}", "a.png", (32, 32), "RGB") for i in range(5)])
    one_error_line(evaluate(rgb_model, "--data", tmp_path), "the data has 5 classes but the model outputs 4 logits")


def test_unlabelled_data_needs_a_reference(tmp_path, rgb_model):
    write_photos(tmp_path, [(".", "a.png", (32, 32), "RGB")])
    one_error_line(evaluate(rgb_model, "--data", tmp_path),
                   f"{tmp_path} is unlabelled: pass --reference to compare with a float model")


def test_missing_model_and_wrong_reference(tmp_path, rgb_model):
    write_photos(tmp_path / "photos")
    one_error_line(evaluate(tmp_path / "none.onnx", "--data", tmp_path / "photos"), f"{tmp_path / 'none.onnx'}: no such file")
    five = export_tiny_model(tmp_path / "five.onnx", classes=5)
    one_error_line(evaluate(rgb_model, "--data", tmp_path / "photos", "--reference", five),
                   "the reference model's outputs per image are 5 but the model's are 4")
