"""Encoders: image batch (N, C, H, W) -> features (N, feature_dim). Each sets `feature_dim`."""

from __future__ import annotations

from typing import Annotated

import torchvision
from pydantic import Field, PositiveInt
from torch import nn

from transferctl.registry import MODELS


class Encoder(nn.Sequential):
    def __init__(self, *layers: nn.Module, feature_dim: int):
        super().__init__(*layers)
        self.feature_dim = feature_dim


@MODELS.register()
def mlp(in_channels: int, image_size: int, hidden_dim: PositiveInt = 128) -> Encoder:
    """The classic 784-128 network: one hidden ReLU layer on the flattened image."""
    return Encoder(
        nn.Flatten(),
        nn.Linear(in_channels * image_size * image_size, hidden_dim),
        nn.ReLU(inplace=True),
        feature_dim=hidden_dim,
    )


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


@MODELS.register()
def cnn(
    in_channels: int,
    widths: Annotated[tuple[PositiveInt, ...], Field(min_length=1, max_length=6)] = (32, 64, 128),
    convs_per_stage: PositiveInt = 1,
) -> Encoder:
    """A small VGG-style conv net for 28-32 px images: conv stages with max-pooling, then global average pooling."""
    layers: list[nn.Module] = []
    cin = in_channels
    for stage, width in enumerate(widths):
        for _ in range(convs_per_stage):
            layers += _conv_bn(cin, width)
            cin = width
        if stage < len(widths) - 1:
            layers.append(nn.MaxPool2d(2))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return Encoder(*layers, feature_dim=cin)


@MODELS.register()
def resnet18(in_channels: int, small_images: bool = True) -> Encoder:
    """torchvision's ResNet-18 without its classifier; `small_images` uses a 3x3 stride-1 stem and no max-pool (for 28-64 px)."""
    net = torchvision.models.resnet18(weights=None)
    if small_images:
        net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    body = [net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4]
    return Encoder(*body, nn.AdaptiveAvgPool2d(1), nn.Flatten(), feature_dim=net.fc.in_features)

