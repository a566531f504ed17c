"""A zoo of small CNNs that keep the structure of well-known architectures.

The tests export these with torch's exporters (and build one paddle2onnx-style graph by hand) to check
the partitioner and the torch mirror against real exporter output. Widths are tiny so that the whole
zoo exports and runs in seconds; the block structure (shortcuts, concats, squeeze-excite, group and
depthwise convs, channel shuffle, resizes, layer norms) follows the original designs.

`ZooEntry.build()` returns a model with random weights, non-trivial BatchNorm/LayerNorm statistics,
in eval mode. Seed torch before calling it to get the same weights every time.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

NUM_CLASSES = 10


@dataclass(frozen=True)
class ZooEntry:
    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, int, int]  # (C, H, W)
    num_blocks: int
    expected_units: int | None


# ---------------------------------------------------------------------------------------------
# Shared pieces


def conv_bn(cin, cout, kernel, stride=1, groups=1, act=None, eps=1e-5) -> nn.Sequential:
    """Conv without bias, BatchNorm, optional activation (given as a class, e.g. nn.ReLU)."""
    layers = [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout, eps=eps),
    ]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


def make_divisible(value, divisor=8) -> int:
    """Round a channel count to a multiple of `divisor`, never dropping more than 10 %."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class SqueezeExcite(nn.Module):
    """GAP -> 1x1 conv -> act -> 1x1 conv -> gate -> scale the input."""

    def __init__(self, channels, squeeze, act=nn.ReLU, gate=nn.Hardsigmoid):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.act = act()
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.gate = gate()

    def forward(self, x):
        scale = F.adaptive_avg_pool2d(x, 1)
        scale = self.gate(self.fc2(self.act(self.fc1(scale))))
        return x * scale


def randomize_norms(model: nn.Module) -> nn.Module:
    """Give every norm layer non-trivial statistics and affine parameters, so folding is tested."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.3, 0.3)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.3, 0.3)
            elif isinstance(module, nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.3, 0.3)
            elif isinstance(module, ConvNeXtBlock):
                module.layer_scale.uniform_(0.2, 1.0)
    return model


def ready(model: nn.Module) -> nn.Module:
    return randomize_norms(model).eval()


# ---------------------------------------------------------------------------------------------
# ResNet


def projection(cin, cout, stride):
    """1x1 conv + BN shortcut when the shape changes, else None (identity)."""
    if stride == 1 and cin == cout:
        return None
    return conv_bn(cin, cout, 1, stride)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, width, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.downsample = projection(cin, width, stride)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, width, stride):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.downsample = projection(cin, cout, stride)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, block, depths, base_width):
        super().__init__()
        self.conv1 = nn.Conv2d(3, base_width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(base_width)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = base_width
        stages = []
        for index, depth in enumerate(depths):
            width = base_width * 2**index
            blocks = []
            for b in range(depth):
                stride = 2 if index > 0 and b == 0 else 1
                blocks.append(block(cin, width, stride))
                cin = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, NUM_CLASSES)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_resnet18():
    return ready(ResNet(BasicBlock, [2, 2, 2, 2], base_width=8))


def build_resnet50():
    return ready(ResNet(Bottleneck, [3, 4, 6, 3], base_width=4))


# ---------------------------------------------------------------------------------------------
# MobileNetV2

# expansion t, output channels c, repeats n, first stride s (the paper's table)
MOBILENETV2_SETTINGS = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand_ratio):
        super().__init__()
        hidden = round(cin * expand_ratio)
        self.use_skip = stride == 1 and cin == cout
        layers = []
        if expand_ratio != 1:
            layers.append(conv_bn(cin, hidden, 1, act=nn.ReLU6))
        layers.append(conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6))
        layers.append(conv_bn(hidden, cout, 1))
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_skip else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, width=0.25, last_channels=1280):
        super().__init__()
        cin = make_divisible(32 * width)
        last = make_divisible(last_channels * width)
        # Stem stride 1 instead of 2 so that 32x32 inputs still end at 2x2.
        layers = [conv_bn(3, cin, 3, 1, act=nn.ReLU6)]
        for t, c, n, s in MOBILENETV2_SETTINGS:
            cout = make_divisible(c * width)
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        layers.append(conv_bn(cin, last, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, NUM_CLASSES))

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def build_mobilenetv2():
    return ready(MobileNetV2(width=0.25))


# ---------------------------------------------------------------------------------------------
# RegNetX


class XBlock(nn.Module):
    """1x1 -> 3x3 group conv -> 1x1, bottleneck ratio 1, projection shortcut on shape change."""

    def __init__(self, cin, cout, stride, group_width=8):
        super().__init__()
        self.a = conv_bn(cin, cout, 1, act=nn.ReLU)
        self.b = conv_bn(cout, cout, 3, stride, groups=cout // group_width, act=nn.ReLU)
        self.c = conv_bn(cout, cout, 1)
        self.proj = projection(cin, cout, stride)
        self.relu = nn.ReLU()

    def forward(self, x):
        shortcut = x if self.proj is None else self.proj(x)
        return self.relu(shortcut + self.c(self.b(self.a(x))))


class RegNetX(nn.Module):
    def __init__(self, widths, depths, stem_width=16):
        super().__init__()
        self.stem = conv_bn(3, stem_width, 3, 2, act=nn.ReLU)
        cin = stem_width
        stages = []
        for index, (width, depth) in enumerate(zip(widths, depths)):
            # First stage keeps the resolution so that 32x32 inputs end at 2x2, not 1x1.
            first_stride = 1 if index == 0 else 2
            blocks = []
            for b in range(depth):
                blocks.append(XBlock(cin, width, first_stride if b == 0 else 1))
                cin = width
            stages.append(nn.Sequential(*blocks))
        self.trunk = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, NUM_CLASSES)

    def forward(self, x):
        x = self.trunk(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


REGNETX_DEPTHS = [1, 1, 2, 2]


def build_regnetx():
    return ready(RegNetX(widths=[16, 32, 48, 96], depths=REGNETX_DEPTHS))


# ---------------------------------------------------------------------------------------------
# MobileNetV3

# input, kernel, expanded, output, squeeze-excite, activation, stride
MOBILENETV3_SETTINGS = [
    (16, 3, 16, 16, True, nn.ReLU, 2),
    (16, 3, 64, 24, False, nn.ReLU, 2),
    (24, 3, 72, 24, False, nn.ReLU, 1),
    (24, 5, 96, 40, True, nn.Hardswish, 2),
    (40, 5, 120, 40, True, nn.Hardswish, 1),
    (40, 5, 120, 48, True, nn.Hardswish, 1),
]


class MobileV3Block(nn.Module):
    def __init__(self, cin, kernel, expanded, cout, use_se, act, stride):
        super().__init__()
        self.use_skip = stride == 1 and cin == cout
        layers = []
        if expanded != cin:
            layers.append(conv_bn(cin, expanded, 1, act=act))
        layers.append(conv_bn(expanded, expanded, kernel, stride, groups=expanded, act=act))
        if use_se:
            layers.append(SqueezeExcite(expanded, make_divisible(expanded // 4)))
        layers.append(conv_bn(expanded, cout, 1))
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.block(x) if self.use_skip else self.block(x)


class MobileNetV3(nn.Module):
    def __init__(self, head_channels=288, hidden=128):
        super().__init__()
        layers = [conv_bn(3, 16, 3, 2, act=nn.Hardswish)]
        for setting in MOBILENETV3_SETTINGS:
            layers.append(MobileV3Block(*setting))
        last = MOBILENETV3_SETTINGS[-1][3]
        layers.append(conv_bn(last, head_channels, 1, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(head_channels, hidden),
            nn.Hardswish(),
            nn.Dropout(0.2),
            nn.Linear(hidden, NUM_CLASSES),
        )

    def forward(self, x):
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def build_mobilenetv3():
    return ready(MobileNetV3())


# ---------------------------------------------------------------------------------------------
# EfficientNet

# expand ratio, kernel, first stride, output channels, repeats
EFFICIENTNET_STAGES = [
    (1, 3, 1, 8, 1),
    (4, 3, 2, 16, 2),
    (4, 5, 2, 24, 2),
    (4, 3, 2, 32, 1),
]


class MBConv(nn.Module):
    def __init__(self, cin, cout, kernel, stride, expand_ratio):
        super().__init__()
        expanded = cin * expand_ratio
        self.use_skip = stride == 1 and cin == cout
        layers = []
        if expanded != cin:
            layers.append(conv_bn(cin, expanded, 1, act=nn.SiLU, eps=1e-3))
        layers.append(conv_bn(expanded, expanded, kernel, stride, groups=expanded, act=nn.SiLU, eps=1e-3))
        layers.append(SqueezeExcite(expanded, max(1, cin // 4), act=nn.SiLU, gate=nn.Sigmoid))
        layers.append(conv_bn(expanded, cout, 1, eps=1e-3))
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.block(x) if self.use_skip else self.block(x)


class EfficientNet(nn.Module):
    def __init__(self, stem_channels=16, head_channels=128):
        super().__init__()
        layers = [conv_bn(3, stem_channels, 3, 2, act=nn.SiLU, eps=1e-3)]
        cin = stem_channels
        for expand, kernel, stride, cout, repeats in EFFICIENTNET_STAGES:
            for i in range(repeats):
                layers.append(MBConv(cin, cout, kernel, stride if i == 0 else 1, expand))
                cin = cout
        layers.append(conv_bn(cin, head_channels, 1, act=nn.SiLU, eps=1e-3))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(head_channels, NUM_CLASSES))

    def forward(self, x):
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def build_efficientnet():
    return ready(EfficientNet())


# ---------------------------------------------------------------------------------------------
# ShuffleNetV2


def channel_shuffle(x, groups):
    batch, channels, height, width = x.size()
    x = x.view(batch, groups, channels // groups, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batch, -1, height, width)


class ShuffleUnit(nn.Module):
    """Stride 1: split channels in two, transform one half. Stride 2: two branches, both downsample."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        branch = cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                conv_bn(cin, cin, 3, stride, groups=cin),
                conv_bn(cin, branch, 1, act=nn.ReLU),
            )
        else:
            self.branch1 = None
        branch2_in = cin if stride > 1 else branch
        self.branch2 = nn.Sequential(
            conv_bn(branch2_in, branch, 1, act=nn.ReLU),
            conv_bn(branch, branch, 3, stride, groups=branch),
            conv_bn(branch, branch, 1, act=nn.ReLU),
        )

    def forward(self, x):
        if self.branch1 is None:
            kept, changed = x.chunk(2, dim=1)
            out = torch.cat((kept, self.branch2(changed)), 1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), 1)
        return channel_shuffle(out, 2)


SHUFFLENET_REPEATS = [2, 3, 2]


class ShuffleNetV2(nn.Module):
    def __init__(self, stage_channels=(32, 64, 128), stem_channels=16, last_channels=256):
        super().__init__()
        self.conv1 = conv_bn(3, stem_channels, 3, 1, act=nn.ReLU)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = stem_channels
        stages = []
        for repeats, cout in zip(SHUFFLENET_REPEATS, stage_channels):
            units = [ShuffleUnit(cin, cout, 2)]
            units += [ShuffleUnit(cout, cout, 1) for _ in range(repeats - 1)]
            stages.append(nn.Sequential(*units))
            cin = cout
        self.stage2, self.stage3, self.stage4 = stages
        self.conv5 = conv_bn(cin, last_channels, 1, act=nn.ReLU)
        self.fc = nn.Linear(last_channels, NUM_CLASSES)

    def forward(self, x):
        x = self.maxpool(self.conv1(x))
        x = self.conv5(self.stage4(self.stage3(self.stage2(x))))
        return self.fc(x.mean([2, 3]))


def build_shufflenetv2():
    return ready(ShuffleNetV2())


# ---------------------------------------------------------------------------------------------
# DenseNet


class DenseLayer(nn.Module):
    def __init__(self, cin, growth, bn_size):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, 1, 1, bias=False)
        self.relu = nn.ReLU()

    def forward(self, features: list[torch.Tensor]):
        x = torch.cat(features, 1)
        x = self.conv1(self.relu(self.norm1(x)))
        return self.conv2(self.relu(self.norm2(x)))


class DenseBlock(nn.Module):
    def __init__(self, num_layers, cin, growth, bn_size):
        super().__init__()
        self.layers = nn.ModuleList(
            DenseLayer(cin + i * growth, growth, bn_size) for i in range(num_layers)
        )

    def forward(self, x):
        features = [x]
        for layer in self.layers:
            features.append(layer(features))
        return torch.cat(features, 1)


def transition(cin, cout):
    return nn.Sequential(
        nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, cout, 1, bias=False), nn.AvgPool2d(2, 2)
    )


DENSENET_BLOCKS = (2, 3, 2)


class DenseNet(nn.Module):
    def __init__(self, growth=8, init_features=16, bn_size=4):
        super().__init__()
        layers = [
            nn.Conv2d(3, init_features, 3, 1, 1, bias=False),
            nn.BatchNorm2d(init_features),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
        ]
        channels = init_features
        for index, num_layers in enumerate(DENSENET_BLOCKS):
            layers.append(DenseBlock(num_layers, channels, growth, bn_size))
            channels += num_layers * growth
            if index < len(DENSENET_BLOCKS) - 1:
                layers.append(transition(channels, channels // 2))
                channels //= 2
        layers.append(nn.BatchNorm2d(channels))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, NUM_CLASSES)

    def forward(self, x):
        x = F.relu(self.features(x))
        x = F.adaptive_avg_pool2d(x, 1)
        return self.classifier(torch.flatten(x, 1))


def build_densenet():
    return ready(DenseNet())


# ---------------------------------------------------------------------------------------------
# GoogLeNet


def basic_conv(cin, cout, kernel, stride=1):
    return conv_bn(cin, cout, kernel, stride, act=nn.ReLU, eps=1e-3)


class Inception(nn.Module):
    def __init__(self, cin, ch1, ch3_reduce, ch3, ch5_reduce, ch5, pool_proj):
        super().__init__()
        self.branch1 = basic_conv(cin, ch1, 1)
        self.branch2 = nn.Sequential(basic_conv(cin, ch3_reduce, 1), basic_conv(ch3_reduce, ch3, 3))
        self.branch3 = nn.Sequential(basic_conv(cin, ch5_reduce, 1), basic_conv(ch5_reduce, ch5, 5))
        self.branch4 = nn.Sequential(
            nn.MaxPool2d(3, 1, 1, ceil_mode=True), basic_conv(cin, pool_proj, 1)
        )

    def forward(self, x):
        branches = [self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)]
        return torch.cat(branches, 1)


class GoogLeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = basic_conv(3, 16, 3)
        self.maxpool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.inception3a = Inception(16, 8, 8, 12, 4, 4, 4)  # -> 28
        self.inception3b = Inception(28, 12, 12, 16, 4, 8, 8)  # -> 44
        self.maxpool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.inception4a = Inception(44, 16, 8, 16, 4, 8, 8)  # -> 48
        self.inception4b = Inception(48, 16, 12, 20, 4, 8, 8)  # -> 52
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(52, NUM_CLASSES)

    def forward(self, x):
        x = self.maxpool1(self.conv1(x))
        x = self.maxpool2(self.inception3b(self.inception3a(x)))
        x = self.inception4b(self.inception4a(x))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(self.dropout(x))


def build_googlenet():
    return ready(GoogLeNet())


# ---------------------------------------------------------------------------------------------
# SqueezeNet (no BatchNorm at all, like the original)


class Fire(nn.Module):
    def __init__(self, cin, squeeze, expand1x1, expand3x3):
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.expand1x1 = nn.Conv2d(squeeze, expand1x1, 1)
        self.expand3x3 = nn.Conv2d(squeeze, expand3x3, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.relu(self.squeeze(x))
        return torch.cat([self.relu(self.expand1x1(x)), self.relu(self.expand3x3(x))], 1)


class SqueezeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, 1, 1),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(16, 4, 8, 8),
            Fire(16, 4, 8, 8),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(16, 8, 16, 16),
            Fire(32, 8, 16, 16),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(32, 12, 24, 24),
            Fire(48, 16, 32, 32),
        )
        self.classifier = nn.Sequential(
            nn.Dropout(0.5), nn.Conv2d(64, NUM_CLASSES, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1)
        )

    def forward(self, x):
        return torch.flatten(self.classifier(self.features(x)), 1)


def build_squeezenet():
    return ready(SqueezeNet())


# ---------------------------------------------------------------------------------------------
# Segmentation encoder-decoder

SEGMENTATION_CLASSES = 5


class SegNetHead(nn.Module):
    """Three strided encoder convs, three decoder stages that upsample in three different ways
    (transposed conv, nearest resize, bilinear resize) and concat the matching encoder skip."""

    def __init__(self):
        super().__init__()
        self.enc1 = conv_bn(3, 8, 3, 1, act=nn.ReLU)  # 32x32
        self.enc2 = conv_bn(8, 16, 3, 2, act=nn.ReLU)  # 16x16
        self.enc3 = conv_bn(16, 32, 3, 2, act=nn.ReLU)  # 8x8
        self.bottom = conv_bn(32, 32, 3, 2, act=nn.ReLU)  # 4x4
        self.up1 = nn.ConvTranspose2d(32, 32, 2, stride=2)
        self.dec1 = conv_bn(32 + 32, 16, 3, act=nn.ReLU)
        self.dec2 = conv_bn(16 + 16, 8, 3, act=nn.ReLU)
        self.dec3 = conv_bn(8 + 8, 8, 3, act=nn.ReLU)
        self.classifier = nn.Conv2d(8, SEGMENTATION_CLASSES, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        x = self.bottom(e3)
        x = self.dec1(torch.cat([self.up1(x), e3], 1))
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        x = self.dec2(torch.cat([x, e2], 1))
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        x = self.dec3(torch.cat([x, e1], 1))
        return self.classifier(x)


def build_segnet_head():
    return ready(SegNetHead())


# ---------------------------------------------------------------------------------------------
# ConvNeXt


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels of an NCHW tensor, done channels-last."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.layer_scale = nn.Parameter(torch.full((dim,), 1e-6))

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        y = (y * self.layer_scale).permute(0, 3, 1, 2)
        return x + y


CONVNEXT_DEPTHS = [2, 2]


class ConvNeXt(nn.Module):
    def __init__(self, dims=(16, 32)):
        super().__init__()
        layers = [nn.Conv2d(3, dims[0], 4, stride=4), LayerNorm2d(dims[0], eps=1e-6)]
        for index, (dim, depth) in enumerate(zip(dims, CONVNEXT_DEPTHS)):
            if index > 0:
                previous = dims[index - 1]
                layers += [LayerNorm2d(previous, eps=1e-6), nn.Conv2d(previous, dim, 2, stride=2)]
            layers += [ConvNeXtBlock(dim) for _ in range(depth)]
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            LayerNorm2d(dims[-1], eps=1e-6), nn.Flatten(1), nn.Linear(dims[-1], NUM_CLASSES)
        )

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)))


def build_convnext():
    return ready(ConvNeXt())


# ---------------------------------------------------------------------------------------------
# A detector-shaped graph: dynamic height and width, an FPN neck, two outputs


class TinyFPN(nn.Module):
    """Four stride-2 stages; an FPN top-down path (nearest upsampling x2, lateral 1x1 convs, Concat,
    a fusing conv) down to 1/4 resolution; a per-pixel probability map there (like DBNet's) and
    class scores from the deepest stage. Any input size that is a multiple of 16 works."""

    def __init__(self, classes=5):
        super().__init__()
        self.stage1 = conv_bn(3, 8, 3, stride=2, act=nn.ReLU)
        self.stage2 = nn.Sequential(conv_bn(8, 16, 3, stride=2, act=nn.ReLU), conv_bn(16, 16, 3, act=nn.ReLU))
        self.stage3 = nn.Sequential(conv_bn(16, 32, 3, stride=2, act=nn.ReLU), conv_bn(32, 32, 3, act=nn.ReLU))
        self.stage4 = nn.Sequential(conv_bn(32, 32, 3, stride=2, act=nn.ReLU), conv_bn(32, 32, 3, act=nn.ReLU))
        self.lateral = nn.ModuleList([nn.Conv2d(16, 16, 1), nn.Conv2d(32, 16, 1), nn.Conv2d(32, 16, 1)])
        self.fuse = nn.ModuleList([conv_bn(32, 16, 3, act=nn.ReLU), conv_bn(32, 16, 3, act=nn.ReLU)])
        self.head = nn.Sequential(conv_bn(16, 16, 3, act=nn.ReLU), nn.Conv2d(16, 1, 1))
        self.classifier = nn.Linear(32, classes)

    def forward(self, x):
        c2 = self.stage2(self.stage1(x))
        c3 = self.stage3(c2)
        c4 = self.stage4(c3)
        top = self.lateral[2](c4)
        for lateral, fuse, feature in ((self.lateral[1], self.fuse[1], c3), (self.lateral[0], self.fuse[0], c2)):
            top = fuse(torch.cat([F.interpolate(top, scale_factor=2.0, mode="nearest"), lateral(feature)], dim=1))
        scores = self.classifier(F.adaptive_avg_pool2d(c4, 1).flatten(1))
        return torch.sigmoid(self.head(top)), scores


def build_fpn():
    return ready(TinyFPN())


def export_dynamic_size(model, path, input_shape=(3, 32, 32), opset=17):
    """Legacy exporter with dynamic batch, height and width, and two outputs."""
    example = torch.randn(EXAMPLE_BATCH, *input_shape)
    axes = {"input": {0: "batch", 2: "height", 3: "width"}, "probability": {0: "batch", 2: "map_height", 3: "map_width"},
            "scores": {0: "batch"}}
    with _quiet():
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=opset, input_names=["input"],
                          output_names=["probability", "scores"], dynamic_axes=axes)
    return path


# ---------------------------------------------------------------------------------------------
# Registry

CIFAR = (3, 32, 32)


def _entries():
    mobilenetv2_blocks = sum(n for _, _, n, _ in MOBILENETV2_SETTINGS)
    regnetx_blocks = sum(REGNETX_DEPTHS)
    return [
        # stem + 8 basic blocks + classifier
        ZooEntry("resnet18", build_resnet18, CIFAR, 8, 1 + 8 + 1),
        # stem + 16 bottlenecks + classifier
        ZooEntry("resnet50", build_resnet50, CIFAR, 16, 1 + 16 + 1),
        # stem + 17 inverted residuals + last 1x1 conv + classifier
        ZooEntry("mobilenetv2", build_mobilenetv2, CIFAR, mobilenetv2_blocks, 1 + mobilenetv2_blocks + 2),
        # stem + one unit per X block + classifier
        ZooEntry("regnetx", build_regnetx, CIFAR, regnetx_blocks, regnetx_blocks + 2),
        ZooEntry("mobilenetv3", build_mobilenetv3, CIFAR, len(MOBILENETV3_SETTINGS), None),
        ZooEntry("efficientnet", build_efficientnet, CIFAR, sum(s[-1] for s in EFFICIENTNET_STAGES), None),
        ZooEntry("shufflenetv2", build_shufflenetv2, CIFAR, sum(SHUFFLENET_REPEATS), None),
        ZooEntry("densenet", build_densenet, CIFAR, len(DENSENET_BLOCKS), None),
        ZooEntry("googlenet", build_googlenet, CIFAR, 4, None),  # 3a, 3b, 4a, 4b
        ZooEntry("squeezenet", build_squeezenet, CIFAR, 6, None),  # fire modules
        ZooEntry("segnet_head", build_segnet_head, CIFAR, 3, None),  # decoder stages
        ZooEntry("convnext", build_convnext, CIFAR, sum(CONVNEXT_DEPTHS), None),
    ]


ZOO: dict[str, ZooEntry] = {entry.name: entry for entry in _entries()}


def make_model(name: str, seed: int = 0) -> nn.Module:
    """Build a zoo model with the weights every test sees (seeded like the conftest fixture)."""
    torch.manual_seed(seed)
    return ZOO[name].build()


# ---------------------------------------------------------------------------------------------
# Export helpers

EXAMPLE_BATCH = 2


@contextlib.contextmanager
def _quiet():
    """Hide the exporters' prints, warnings and torch.onnx log lines (that logger writes to the real
    stderr through its own handler); show the hidden text on stderr if the export fails."""
    log = io.StringIO()
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            warnings.simplefilter("ignore")
            yield
    except Exception:
        sys.stderr.write(log.getvalue())
        raise
    finally:
        logger.setLevel(level)


def export_legacy(model, path, input_shape, opset=17, keep_bn=False):
    """TorchScript-based exporter. By default BN is folded into the convs; keep_bn keeps the
    BatchNormalization nodes (no constant folding, training mode preserved)."""
    example = torch.randn(EXAMPLE_BATCH, *input_shape)
    training = torch.onnx.TrainingMode.PRESERVE if keep_bn else torch.onnx.TrainingMode.EVAL
    with _quiet():
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            training=training,
            do_constant_folding=not keep_bn,
        )
    return path


def export_dynamo(model, path, input_shape, opset=18, static_batch=False):
    """torch.export-based exporter (opset 18) with a dynamic batch dimension, or, with `static_batch`,
    as the exporter does by default: batch 1, folded into the graph's constants."""
    example = torch.randn(1 if static_batch else EXAMPLE_BATCH, *input_shape)
    dynamic = {} if static_batch else {"dynamic_shapes": ({0: torch.export.Dim("batch", min=1, max=4096)},)}
    with _quiet():
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=True,
            opset_version=opset,
            input_names=["input"],
            output_names=["output"],
            external_data=False,
            verbose=False,
            **dynamic,
        )
    return path


# ---------------------------------------------------------------------------------------------
# A paddle2onnx-style graph, built by hand (no torch)

PADDLE_INPUT_SHAPE = (3, 32, 32)
# Three inverted-residual blocks (stem and head are not counted):
#   block 1: depthwise 3x3 -> SE -> project, residual Add
#   block 2: expand -> depthwise 3x3 stride 2 -> project, no residual
#   block 3: expand -> depthwise 3x3 -> SE -> project, residual Add
PADDLE_NUM_BLOCKS = 3
# HardSwish only exists from opset 14 on, so this is the lowest opset that holds the graph.
PADDLE_OPSET = 14


class _PaddleGraphBuilder:
    """Collects nodes named like paddle2onnx does ("p2o.Conv.0"), with weights in Constant nodes."""

    def __init__(self, seed=0):
        self.rng = np.random.default_rng(seed)
        self.nodes = []
        self.op_counts = {}
        self.layer_counts = {}

    def node(self, op, inputs, output=None, **attrs):
        index = self.op_counts.get(op, 0)
        self.op_counts[op] = index + 1
        name = f"p2o.{op}.{index}"
        output = output or f"{name}.tmp_0"
        self.nodes.append(helper.make_node(op, inputs, [output], name=name, **attrs))
        return output

    def layer_name(self, kind):
        """Paddle names tensors per layer kind: conv2d_0, conv2d_1, batch_norm_0, ..."""
        index = self.layer_counts.get(kind, 0)
        self.layer_counts[kind] = index + 1
        return f"{kind}_{index}"

    def constant(self, array, output):
        tensor = numpy_helper.from_array(np.asarray(array), name=output)
        return self.node("Constant", [], output, value=tensor)

    def random(self, shape, scale):
        return self.rng.normal(0.0, scale, shape).astype(np.float32)

    def uniform(self, low, high, size):
        return self.rng.uniform(low, high, size).astype(np.float32)

    def activation(self, x, act):
        if act is None:
            return x
        op = {"hardswish": "HardSwish", "relu": "Relu"}[act]
        return self.node(op, [x], f"{self.layer_name(act)}.tmp_0")

    def conv_bn(self, x, cin, cout, kernel, stride=1, groups=1, act=None):
        conv = self.layer_name("conv2d")
        fan_in = cin // groups * kernel * kernel
        weight = self.random((cout, cin // groups, kernel, kernel), math.sqrt(2 / fan_in))
        weight = self.constant(weight, f"{conv}.w_0")
        x = self.node(
            "Conv", [x, weight], f"{conv}.tmp_0",
            kernel_shape=[kernel, kernel], strides=[stride, stride], pads=[kernel // 2] * 4,
            dilations=[1, 1], group=groups,
        )
        bn = self.layer_name("batch_norm")
        scale = self.constant(self.uniform(0.5, 1.5, cout), f"{bn}.w_0")
        bias = self.constant(self.uniform(-0.3, 0.3, cout), f"{bn}.b_0")
        mean = self.constant(self.uniform(-0.3, 0.3, cout), f"{bn}.w_1")
        var = self.constant(self.uniform(0.5, 2.0, cout), f"{bn}.w_2")
        x = self.node(
            "BatchNormalization", [x, scale, bias, mean, var], f"{bn}.tmp_2", epsilon=1e-5, momentum=0.9
        )
        return self.activation(x, act)

    def squeeze_excite(self, x, channels, squeeze):
        pooled = self.node("GlobalAveragePool", [x], f"{self.layer_name('pool2d')}.tmp_0")
        s = self.conv_with_bias(pooled, channels, squeeze)
        s = self.activation(s, "relu")
        s = self.conv_with_bias(s, squeeze, channels)
        s = self.node("HardSigmoid", [s], f"{self.layer_name('hardsigmoid')}.tmp_0", alpha=1 / 6, beta=0.5)
        return self.node("Mul", [x, s], f"{self.layer_name('elementwise_mul')}.tmp_0")

    def conv_with_bias(self, x, cin, cout):
        conv = self.layer_name("conv2d")
        weight = self.constant(self.random((cout, cin, 1, 1), math.sqrt(1 / cin)), f"{conv}.w_0")
        bias = self.constant(self.uniform(-0.1, 0.1, cout), f"{conv}.b_0")
        return self.node(
            "Conv", [x, weight, bias], f"{conv}.tmp_1",
            kernel_shape=[1, 1], strides=[1, 1], pads=[0, 0, 0, 0], dilations=[1, 1], group=1,
        )

    def add(self, a, b):
        return self.node("Add", [a, b], f"{self.layer_name('elementwise_add')}.tmp_0")

    def flatten_batch(self, x):
        """paddle2onnx's flatten: Reshape to [N, -1] with N read from Shape -> Slice."""
        shape = self.node("Shape", [x])
        starts = self.constant(np.array([0], np.int64), "p2o.helper.constant.0")
        ends = self.constant(np.array([1], np.int64), "p2o.helper.constant.1")
        axes = self.constant(np.array([0], np.int64), "p2o.helper.constant.2")
        batch = self.node("Slice", [shape, starts, ends, axes])
        rest = self.constant(np.array([-1], np.int64), "p2o.helper.constant.3")
        target = self.node("Concat", [batch, rest], axis=0)
        return self.node("Reshape", [x, target], f"{self.layer_name('flatten')}.tmp_0")

    def linear(self, x, cin, cout):
        layer = self.layer_name("linear")
        weight = self.constant(self.random((cin, cout), math.sqrt(1 / cin)), f"{layer}.w_0")
        bias = self.constant(self.uniform(-0.1, 0.1, cout), f"{layer}.b_0")
        x = self.node("MatMul", [x, weight], f"{layer}.tmp_0")
        return self.node("Add", [x, bias], f"{layer}.tmp_1")


def build_paddle_style_model(path):
    """Write a small MobileNetV3-like graph shaped like paddle2onnx output to `path`.

    Input 'x' [N, 3, 32, 32], output [N, 10]; PADDLE_NUM_BLOCKS inverted-residual blocks between a
    stem conv and a head conv + GAP + MatMul/Add classifier. Returns the path."""
    g = _PaddleGraphBuilder()
    x = g.conv_bn("x", 3, 8, 3, stride=2, act="hardswish")  # stem, 16x16

    block = g.conv_bn(x, 8, 8, 3, groups=8, act="relu")
    block = g.squeeze_excite(block, 8, 8)
    block = g.conv_bn(block, 8, 8, 1)
    x = g.add(x, block)

    x = g.conv_bn(x, 8, 24, 1, act="hardswish")
    x = g.conv_bn(x, 24, 24, 3, stride=2, groups=24, act="hardswish")  # 8x8
    x = g.conv_bn(x, 24, 16, 1)

    block = g.conv_bn(x, 16, 48, 1, act="hardswish")
    block = g.conv_bn(block, 48, 48, 3, groups=48, act="hardswish")
    block = g.squeeze_excite(block, 48, 16)
    block = g.conv_bn(block, 48, 16, 1)
    x = g.add(x, block)

    x = g.conv_bn(x, 16, 64, 1, act="hardswish")  # head
    x = g.node("GlobalAveragePool", [x], f"{g.layer_name('pool2d')}.tmp_0")
    x = g.flatten_batch(x)
    logits = g.linear(x, 64, NUM_CLASSES)

    batch = "p2o.DynamicDimension.0"
    graph = helper.make_graph(
        g.nodes,
        "paddle_mobilenetv3",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, *PADDLE_INPUT_SHAPE])],
        [helper.make_tensor_value_info(logits, TensorProto.FLOAT, [batch, NUM_CLASSES])],
    )
    model = helper.make_model(
        graph,
        producer_name="PaddlePaddle",
        opset_imports=[helper.make_opsetid("", PADDLE_OPSET)],
        ir_version=8,
    )
    onnx.checker.check_model(model)
    onnx.save(model, str(Path(path)))
    return path
