"""The classifier's network and its input conventions.

torchvision's ResNet (resnet152 as in the paper, resnet50, resnet18), `weights=None` (trained from scratch, nothing
downloaded), with the stem adapted to 64x64 inputs: the 7x7 stride-2 first convolution becomes 3x3 stride 1, so the
first layer sees every pixel at full resolution (noise, JPEG blocks and pixelation live at the pixel scale), and the
2x max-pool is kept, so the stages run at 32, 16, 8 and 4 pixels and the cost stays near ImageNet ResNet at 128
pixels (dropping the pool as well would make CPU training 4x slower).
"""

from __future__ import annotations

import numpy as np
import torch
import torchvision
from torch import nn

from factory.classifier import ARCHITECTURES
from factory.config import FactoryError
from factory.corruptions import CORRUPTIONS


def check_architecture(arch: str) -> None:
    """A FactoryError naming the known architectures unless `arch` is one of them."""
    if arch not in ARCHITECTURES:
        raise FactoryError(f"unknown classifier architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")


def build_network(arch: str, num_classes: int = len(CORRUPTIONS)) -> nn.Module:
    """A torchvision ResNet with random weights and the 64x64 stem (3x3 stride-1 first convolution, max-pool kept)."""
    check_architecture(arch)
    network = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    network.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    return network


def normalise(x: torch.Tensor) -> torch.Tensor:
    """x: (N, 3, h, w) in [0, 1] -> centred on 0 in [-1, 1]. A fixed affine map, so absolute brightness and contrast
    (which several classes are about) stay visible to the network."""
    return x * 2 - 1


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, h, w, 3) uint8 -> (N, 3, h, w) float in [0, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
