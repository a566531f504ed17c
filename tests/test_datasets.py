import numpy as np
import pytest
from PIL import Image

from onnxmodcap.datasets import Skipped, open_images, prepared_batches
from onnxmodcap.errors import UserError
from onnxmodcap.preprocess import resolve_preprocessing

GREY_8x8 = resolve_preprocessing(["N", 1, 8, 8], {}, {"scale": "1", "mean": "0", "std": "1"})


def write_image(path, value, size=(8, 8), mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)


def test_image_folder_classes_follow_sorted_folder_names(tmp_path):
    for folder, value in [("zebra", 30), ("ant", 10), ("mole", 20)]:
        write_image(tmp_path / folder / "b.png", value)
        write_image(tmp_path / folder / "a.jpg", value)
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    write_image(tmp_path / "ant" / ".hidden" / "c.png", 10)
    write_image(tmp_path / "zebra" / "deeper" / "c.png", 30)
    images = open_images(tmp_path)
    assert images.classes == ["ant", "mole", "zebra"]
    assert [(s.source.name, s.label) for s in images.samples] == [
        ("a.jpg", 0), ("b.png", 0), ("a.jpg", 1), ("b.png", 1), ("a.jpg", 2), ("b.png", 2), ("c.png", 2)]
    batches = list(prepared_batches(images, GREY_8x8, 4, Skipped()))
    assert [len(b.inputs) for b in batches] == [4, 3]
    assert batches[0].labels.tolist() == [0, 0, 1, 1]
    assert batches[0].inputs[2, 0, 0, 0] == 20


def test_unlabelled_folder_and_evenly_spread_limit(tmp_path):
    for index in range(10):
        write_image(tmp_path / f"{index}.png", index)
    images = open_images(tmp_path)
    assert not images.labelled
    assert [s.source.name for s in images.spread(4).samples] == ["0.png", "2.png", "5.png", "7.png"]


def test_compact_file(tmp_path):
    pixels = np.arange(3 * 8 * 8, dtype=np.uint8).reshape(3, 8, 8)
    np.savez_compressed(tmp_path / "set.npz", images=pixels, labels=np.array([2, 0, 1]), classes=np.array(["a", "b", "c"]))
    images = open_images(tmp_path / "set.npz")
    assert images.classes == ["a", "b", "c"]
    (batch,) = prepared_batches(images, GREY_8x8, 8, Skipped())
    assert batch.labels.tolist() == [2, 0, 1]
    np.testing.assert_array_equal(batch.inputs[:, 0], pixels.astype(np.float32))


def test_unreadable_images_are_skipped_and_named(tmp_path):
    write_image(tmp_path / "good.png", 5)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    write_image(tmp_path / "lab.tif", (0, 0, 0), mode="LAB")  # LAB cannot become grey
    skipped = Skipped()
    (batch,) = prepared_batches(open_images(tmp_path), GREY_8x8, 8, skipped)
    assert len(batch.inputs) == 1
    assert [name.rsplit("/", 1)[1] for name, _ in skipped.entries] == ["broken.jpg", "lab.tif"]
    assert skipped.entries[1][1] == "a LAB image cannot become 1-channel grey"


@pytest.mark.parametrize("make, message", [
    (lambda root: root, "{root} has no images (.bmp, .jpeg, .jpg, .pgm, .png, .ppm, .tif, .tiff, .webp)"),
    (lambda root: (root / "cat").mkdir() or root, "{root} has 1 class folders but no images in them"),
    (lambda root: root / "missing", "{root}/missing: no such file or folder"),
    (lambda root: (root / "x.npz").write_bytes(b"nope") and root / "x.npz", "{root}/x.npz is not a readable .npz image file"),
    (lambda root: (root / "x.csv").write_text("1,2") and root / "x.csv", "{root}/x.csv: expected an image folder or a .npz file"),
])
def test_unusable_data_is_one_error_line(tmp_path, make, message):
    with pytest.raises(UserError) as caught:
        open_images(make(tmp_path))
    assert str(caught.value).startswith(message.format(root=tmp_path))


def test_mixed_folder_is_rejected(tmp_path):
    write_image(tmp_path / "loose.png", 1)
    write_image(tmp_path / "cat" / "a.png", 1)
    with pytest.raises(UserError, match="holds both images and subfolders"):
        open_images(tmp_path)


def test_compact_file_with_bad_arrays(tmp_path):
    np.savez(tmp_path / "rgba.npz", images=np.zeros((2, 4, 4, 4), np.uint8))
    with pytest.raises(UserError, match=r"`images` is uint8 \(2, 4, 4, 4\); expected uint8"):
        open_images(tmp_path / "rgba.npz")
    np.savez(tmp_path / "labels.npz", images=np.zeros((2, 4, 4), np.uint8), labels=np.array([0, 3]), classes=np.array(["a", "b"]))
    with pytest.raises(UserError, match="label 3 has no entry in `classes` \\(2 names\\)"):
        open_images(tmp_path / "labels.npz")
