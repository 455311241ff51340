"""Encoders: a batch of model inputs -> pooled features (N, feature_dim), and feature maps at their stages.

The contract (plugins follow it too): an encoder is an `nn.Module` whose forward returns (N, feature_dim) and
which has a `feature_dim` attribute. One that dense heads (segmentation decoders, image decoders) can build on
also has `stage_channels` (the channels of each stage's map, shallow to deep) and `feature_maps(x)`, which
returns those maps, each at its stage's resolution. `Encoder` gives both to any stack of layers.
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
import torchvision
from pydantic import Field, PositiveInt
from torch import nn

from transferctl.errors import ConfigError
from transferctl.registry import MODELS


class Encoder(nn.Sequential):
    """Layers applied in order. The output of the layer at each of `stage_ends` is that stage's feature map;
    weight names are the layers' indices, as they always were, so saved weights keep loading."""

    def __init__(self, *layers: nn.Module, feature_dim: int, stage_ends: tuple[int, ...] = (), stage_channels: tuple[int, ...] = ()):
        super().__init__(*layers)
        self.feature_dim = feature_dim
        self.stage_ends, self.stage_channels = tuple(stage_ends), tuple(stage_channels)

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The feature map at the end of every stage, shallow to deep."""
        maps = []
        for index, layer in enumerate(self):
            if len(maps) == len(self.stage_ends):
                break
            x = layer(x)
            if index in self.stage_ends:
                maps.append(x)
        return maps


def as_checkpoint_input(x: torch.Tensor, channels: int, size: int | None, interpolation: str = "bilinear") -> torch.Tensor:
    """Normalized images (N, C, H, W) as a pretrained image model takes them: grey ones as three equal channels for a
    three-channel model, resized to its `size` square on the device (antialiased when shrunk), inside the model so
    exports do the same."""
    if x.shape[1] == 1 and channels == 3:
        x = x.expand(-1, 3, -1, -1)
    if size and tuple(x.shape[-2:]) != (size, size):
        shrink = x.shape[-1] > size or x.shape[-2] > size
        x = F.interpolate(x, size=(size, size), mode=interpolation, antialias=shrink and interpolation != "nearest")
    return x


@MODELS.register(modality="image", channels_last=False)  # channels-last would only add a copy before Flatten
def mlp(in_channels: int, image_size: int, hidden_dim: PositiveInt = 128) -> Encoder:
    """The classic 784-128 network: one hidden ReLU layer on the flattened image."""
    return Encoder(
        nn.Flatten(),
        nn.Linear(in_channels * image_size * image_size, hidden_dim),
        nn.ReLU(inplace=True),
        feature_dim=hidden_dim,
    )


def conv_bn_relu(cin: int, cout: int, dilation: int = 1) -> list[nn.Module]:
    """A 3x3 conv (padded to keep the size), batch norm and ReLU: the block of the cnn encoder and the U-Net head."""
    return [nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


@MODELS.register(modality=("image", "audio"), gives=("feature_maps",))  # audio: on the one-channel log-mel image
def cnn(
    in_channels: int,
    widths: Annotated[tuple[PositiveInt, ...], Field(min_length=1, max_length=6)] = (32, 64, 128),
    convs_per_stage: PositiveInt = 1,
) -> Encoder:
    """A small VGG-style conv net for 28-32 px images: conv stages with max-pooling, then global average pooling."""
    layers: list[nn.Module] = []
    ends: list[int] = []
    cin = in_channels
    for stage, width in enumerate(widths):
        for _ in range(convs_per_stage):
            layers += conv_bn_relu(cin, width)
            cin = width
        ends.append(len(layers) - 1)  # the stage's map: full resolution, then halved by each pooling after it
        if stage < len(widths) - 1:
            layers.append(nn.MaxPool2d(2))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return Encoder(*layers, feature_dim=cin, stage_ends=tuple(ends), stage_channels=tuple(widths))


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


@MODELS.register(
    modality=("image", "audio"), gives=("feature_maps",), published_weights=_imagenet_resnet18, adapt_weights=_from_torchvision
)
def resnet18(in_channels: int, small_images: bool = True) -> Encoder:
    """torchvision's ResNet-18 without its classifier; `small_images` uses a 3x3 stride-1 stem and no max-pool (for 28-64 px)."""
    net = torchvision.models.resnet18(weights=None)
    if small_images:
        net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    body = [net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4]
    stages = (4, 5, 6, 7)  # layer1 to layer4: strides 1, 2, 4, 8 with small_images, else 4, 8, 16, 32
    return Encoder(
        *body, nn.AdaptiveAvgPool2d(1), nn.Flatten(), feature_dim=net.fc.in_features, stage_ends=stages, stage_channels=(64, 128, 256, 512)
    )
