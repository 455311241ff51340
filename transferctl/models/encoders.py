"""Encoders: image batch (N, C, H, W) -> features (N, feature_dim). Each sets `feature_dim`."""

from __future__ import annotations

from typing import Annotated

import torch
import torchvision
from pydantic import Field, PositiveInt
from torch import nn

from transferctl.errors import ConfigError
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


# torchvision's ResNet attribute -> index of that layer in the resnet18 encoder below
_TORCHVISION_LAYERS = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}


def _from_torchvision(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A torchvision ResNet state dict (conv1.weight, layer1.0.bn1.weight, ..., fc.weight) renamed to the encoder's
    layers, without the ImageNet classifier (fc); a dict already in the encoder's names is returned as it is."""
    if "conv1.weight" not in state:
        return state
    renamed = {}
    for key, value in state.items():
        layer, _, rest = key.partition(".")
        if layer in _TORCHVISION_LAYERS:
            renamed[f"{_TORCHVISION_LAYERS[layer]}.{rest}"] = value
    return renamed


def _imagenet_resnet18(small_images: bool = True, **_: object) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet-1k weights (downloaded once into torch's hub cache, $TORCH_HOME)."""
    if small_images:
        raise ConfigError("model.weights: DEFAULT: torchvision's ImageNet weights are for the 7x7 stem; set model.small_images=false")
    return torchvision.models.ResNet18_Weights.DEFAULT.get_state_dict(progress=False)


@MODELS.register(published_weights=_imagenet_resnet18, adapt_weights=_from_torchvision)
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

