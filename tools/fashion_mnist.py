"""Fashion-MNIST: read the Debian IDX files, train the three shipped classifiers, export them.

The nets follow the torchvision architectures that published PTQ tables use (ResNet-18,
MobileNetV2 x0.5, RegNetX), adapted to 28x28 grey input and sized so that one trains in under
half an hour on one CPU thread. BatchNormalization stays in the exported graphs.

    python tools/fashion_mnist.py train resnet18 --out models/
    python tools/fashion_mnist.py data --out models/
"""

from __future__ import annotations

import gzip
import math
import os
import sys
import time
from pathlib import Path

import click
import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from onnxmodcap.preprocess import METADATA_KEY, Preprocessing

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
# Training-set pixel statistics on the [0, 1] scale, rounded; used in training and in the
# preprocessing metadata so that the ONNX file and the net agree exactly.
MEAN, STD = 0.2860, 0.3530


# ---------------------------------------------------------------- IDX files

def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped) as a uint8 array of the shape its header states."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise click.ClickException(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def find_idx(stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (DATA_DIR / name).is_file():
            return DATA_DIR / name
    raise click.ClickException(
        f"Fashion-MNIST not found ({DATA_DIR / stem}[.gz]): "
        "install it with `apt-get install dataset-fashion-mnist`")


def load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) uint8 of the `train` or `t10k` split."""
    images = read_idx(find_idx(f"{split}-images-idx3-ubyte"))
    labels = read_idx(find_idx(f"{split}-labels-idx1-ubyte"))
    return images, labels


# ---------------------------------------------------------------- architectures

def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout)]


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: two 3x3 convs, identity or 1x1-conv shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(*conv_bn(cin, cout, 3, stride), nn.ReLU(inplace=True),
                                  *conv_bn(cout, cout, 3))
        needs_projection = stride != 1 or cin != cout
        self.shortcut = nn.Sequential(*conv_bn(cin, cout, 1, stride)) if needs_projection else nn.Identity()

    def forward(self, x):
        return F.relu(self.body(x) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 layout (BasicBlock x [2, 2, 2, 2]); the 7x7 stride-2 stem conv becomes 3x3
    stride 1 and the 3x3 stride-2 max-pool stays, so the stages run at 14, 7, 4 and 2 pixels."""

    def __init__(self, width: int = 16, classes: int = 10):
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width]
        layers = [*conv_bn(1, width, 3), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
        cin = width
        for stage, cout in enumerate(widths):
            for index in range(2):
                layers.append(BasicBlock(cin, cout, 2 if stage > 0 and index == 0 else 1))
                cin = cout
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


def make_divisible(value: float, divisor: int = 8) -> int:
    """torchvision's channel rounding: nearest multiple of `divisor`, never below 90 % of `value`."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear project; residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int):
        super().__init__()
        hidden = cin * expansion
        layers = [] if expansion == 1 else [*conv_bn(cin, hidden, 1), nn.ReLU6(inplace=True)]
        layers += [*conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6(inplace=True),
                   *conv_bn(hidden, cout, 1)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (torchvision's settings and channel rounding, width multiplier 0.5, 1280-wide
    last conv) with a 3x3 stride-2 stem on one channel. The 160-channel stage keeps stride 1 so
    the last feature maps are 2x2 rather than 1x1 on 28x28 input."""

    # expansion t, channels c, repeats n, stride s (torchvision's table, sixth stride relaxed)
    SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                (6, 96, 3, 1), (6, 160, 3, 1), (6, 320, 1, 1)]

    def __init__(self, width_mult: float = 0.5, classes: int = 10, last_channel: int = 1280):
        super().__init__()
        cin = make_divisible(32 * width_mult)
        layers = [*conv_bn(1, cin, 3, 2), nn.ReLU6(inplace=True)]
        for expansion, channels, repeats, stride in self.SETTINGS:
            cout = make_divisible(channels * width_mult)
            for index in range(repeats):
                layers.append(InvertedResidual(cin, cout, stride if index == 0 else 1, expansion))
                cin = cout
        layers += [*conv_bn(cin, last_channel, 1), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last_channel, classes))

    def forward(self, x):
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


class XBlock(nn.Module):
    """RegNetX block: 1x1 conv, 3x3 group conv (fixed group width), 1x1 conv, residual."""

    def __init__(self, cin: int, cout: int, stride: int, group_width: int):
        super().__init__()
        self.body = nn.Sequential(*conv_bn(cin, cout, 1), nn.ReLU(inplace=True),
                                  *conv_bn(cout, cout, 3, stride, groups=cout // group_width),
                                  nn.ReLU(inplace=True), *conv_bn(cout, cout, 1))
        needs_projection = stride != 1 or cin != cout
        self.shortcut = nn.Sequential(*conv_bn(cin, cout, 1, stride)) if needs_projection else nn.Identity()

    def forward(self, x):
        return F.relu(self.body(x) + self.shortcut(x))


class RegNetX(nn.Module):
    """RegNetX (bottleneck ratio 1, torchvision's 3x3 stride-2 stem) with RegNetX-200MF's depths
    and group width 8, stage widths (24, 48, 96, 192) instead of (24, 56, 152, 368), and a
    stride-1 first stage so the stages run at 14, 7, 4 and 2 pixels on 28x28 input."""

    def __init__(self, depths=(1, 1, 4, 7), widths=(24, 48, 96, 192), group_width: int = 8,
                 stem: int = 32, classes: int = 10):
        super().__init__()
        layers = [*conv_bn(1, stem, 3, 2), nn.ReLU(inplace=True)]
        cin = stem
        for stage, (depth, cout) in enumerate(zip(depths, widths)):
            for index in range(depth):
                layers.append(XBlock(cin, cout, 2 if stage > 0 and index == 0 else 1, group_width))
                cin = cout
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


# ---------------------------------------------------------------- training

ARCHITECTURES = {
    "resnet18": ResNet18,
    "mobilenetv2_x0_5": MobileNetV2,
    "regnetx": RegNetX,
}
# Per-architecture recipe; MobileNetV2 gets torchvision's lighter weight decay.
RECIPES = {
    "resnet18": {"epochs": 10, "lr": 0.1, "weight_decay": 5e-4},
    "mobilenetv2_x0_5": {"epochs": 11, "lr": 0.1, "weight_decay": 4e-5},
    "regnetx": {"epochs": 15, "lr": 0.1, "weight_decay": 5e-4},
}
BATCH, PAD = 128, 2


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float (N, 1, 28, 28), channels-last, as the ONNX metadata describes."""
    x = (images.float().unsqueeze(1) / 255 - MEAN) / STD
    return x.contiguous(memory_format=torch.channels_last)


def augment(padded: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random 28x28 crop out of the PAD-padded images and a random horizontal flip."""
    count = padded.shape[0]
    offsets = torch.randint(0, 2 * PAD + 1, (count, 2), generator=generator)
    rows = offsets[:, :1] + torch.arange(28)
    cols = offsets[:, 1:] + torch.arange(28)
    crops = padded[torch.arange(count)[:, None, None], rows[:, :, None], cols[:, None, :]]
    flip = torch.rand(count, generator=generator) < 0.5
    return torch.where(flip[:, None, None], crops.flip(-1), crops)


def train_epoch(model, optimizer, schedule, padded, labels, generator) -> tuple[float, float]:
    model.train()
    order = torch.randperm(len(labels), generator=generator)
    total_loss, correct = 0.0, 0
    for start in range(0, len(order), BATCH):
        index = order[start:start + BATCH]
        logits = model(normalize(augment(padded[index], generator)))
        loss = F.cross_entropy(logits, labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        total_loss += loss.item() * len(index)
        correct += (logits.argmax(1) == labels[index]).sum().item()
    return total_loss / len(order), correct / len(order)


@torch.no_grad()
def accuracy(model, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    correct = sum((model(normalize(images[i:i + 500])).argmax(1) == labels[i:i + 500]).sum().item()
                  for i in range(0, len(labels), 500))
    return correct / len(labels)


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv/linear weights only, not on BN parameters and biases."""
    decayed = [p for p in model.parameters() if p.ndim > 1]
    plain = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decayed, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def train(arch: str, epochs: int, seed: int, log) -> nn.Module:
    recipe = RECIPES[arch]
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train_images, train_labels = (torch.from_numpy(a.copy()) for a in load_split("train"))
    test_images, test_labels = (torch.from_numpy(a.copy()) for a in load_split("t10k"))
    padded = F.pad(train_images, (PAD, PAD, PAD, PAD))
    labels = train_labels.long()
    model = ARCHITECTURES[arch]().to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(decay_groups(model, recipe["weight_decay"]), lr=recipe["lr"],
                                momentum=0.9, nesterov=True)
    steps = epochs * math.ceil(len(labels) / BATCH)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, recipe["lr"], total_steps=steps)
    log(f"{arch}: {sum(p.numel() for p in model.parameters())} parameters, {epochs} epochs, seed {seed}, "
        f"{torch.get_num_threads()} threads, batch {BATCH}, peak lr {recipe['lr']}, "
        f"weight decay {recipe['weight_decay']}")
    started = time.time()
    for epoch in range(epochs):
        loss, train_acc = train_epoch(model, optimizer, schedule, padded, labels, generator)
        log(f"{arch} epoch {epoch + 1}/{epochs}: loss {loss:.4f} train {100 * train_acc:.2f} % "
            f"({(time.time() - started) / 60:.1f} min)")
    # A sanity check only: the published figures come from `onnxmodcap evaluate` on the ONNX file.
    log(f"{arch}: trained in {(time.time() - started) / 60:.1f} min; torch test top-1 "
        f"{100 * accuracy(model, test_images, test_labels.long()):.2f} %")
    return model


# ---------------------------------------------------------------- export

PREPROCESSING = Preprocessing(input_size=(28, 28), resize=28, scale=1 / 255, mean=(MEAN,), std=(STD,),
                              color="grey", layout="nchw")


def export(model: nn.Module, path: Path) -> None:
    """Legacy exporter in PRESERVE mode without constant folding, so BatchNormalization nodes
    (and their running statistics) stay in the graph; dynamic batch; preprocessing metadata."""
    import onnx
    model = model.eval().to(memory_format=torch.contiguous_format)
    torch.onnx.export(model, torch.zeros(2, 1, 28, 28), str(path), dynamo=False, opset_version=17,
                      training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, PREPROCESSING.metadata_json()
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def verify_export(model: nn.Module, path: Path, log) -> None:
    """The exported graph keeps its BN nodes and ONNX Runtime matches torch on test images."""
    import onnx
    import onnxruntime as ort
    graph = onnx.load(str(path)).graph
    batchnorms = sum(node.op_type == "BatchNormalization" for node in graph.node)
    if batchnorms == 0:
        raise click.ClickException(f"{path}: the export lost its BatchNormalization nodes")
    images, _ = load_split("t10k")
    x = normalize(torch.from_numpy(images[:64].copy())).contiguous()
    with torch.no_grad():
        expected = model.eval()(x).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x.numpy()})[0]
    difference = float(np.abs(got - expected).max())
    if difference > 1e-3:
        raise click.ClickException(f"{path}: ONNX Runtime differs from torch by {difference:g}")
    log(f"{path}: {batchnorms} BatchNormalization nodes, max |ORT - torch| = {difference:.2e}")


# ---------------------------------------------------------------- commands

def log(message: str) -> None:
    click.echo(f"[{time.strftime('%H:%M:%S')}] {message}")
    sys.stdout.flush()


@click.group()
def main():
    """Train and export the Fashion-MNIST models, write the shipped data."""


@main.command("train")
@click.argument("arch", type=click.Choice(sorted(ARCHITECTURES)))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("models"))
@click.option("--epochs", type=int, default=None, help="Default: the recipe's.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=os.cpu_count(), show_default=True,
              help="torch CPU threads (the shipped models were trained with 1).")
def train_command(arch: str, out: Path, epochs: int | None, seed: int, threads: int):
    """Train ARCH and export it to OUT/ARCH.onnx."""
    torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    model = train(arch, epochs or RECIPES[arch]["epochs"], seed, log)
    path = out / f"{arch}.onnx"
    export(model, path)
    verify_export(model, path, log)


@main.command("data")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("models"))
@click.option("--calib-count", type=int, default=1024, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def data_command(out: Path, calib_count: int, seed: int):
    """Write OUT/calib/ (training images as PNG) and OUT/fashion_mnist_test.npz (test set)."""
    from PIL import Image
    train_images, _ = load_split("train")
    calib = out / "calib"
    calib.mkdir(parents=True, exist_ok=True)
    chosen = np.sort(np.random.default_rng(seed).choice(len(train_images), calib_count, replace=False))
    for index in chosen:
        Image.fromarray(train_images[index]).save(calib / f"train_{index:05d}.png")
    test_images, test_labels = load_split("t10k")
    np.savez_compressed(out / "fashion_mnist_test.npz", images=test_images,
                        labels=test_labels, classes=np.array(CLASSES))
    log(f"wrote {calib_count} PNGs to {calib} and {len(test_labels)} test images to "
        f"{out / 'fashion_mnist_test.npz'}")


if __name__ == "__main__":
    main()
