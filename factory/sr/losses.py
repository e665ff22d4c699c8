"""ESRGAN's training objective (Wang et al. 2018), for `factory finetune --loss esrgan`.

    L_G = lambda_pixel * L1(G(x), y) + L_percep + lambda_gan * L_G^Ra

- L_percep: L1 between VGG19 features *before* the activation (conv5_4 in the paper) of G(x) and y, inputs
  normalised with the ImageNet mean / std. The VGG19 weights come from a file (torchvision's `vgg19-dcbb9e9d.pth`,
  keys `features.N.*`); nothing is downloaded.
- L^Ra: the relativistic average GAN: D_Ra(a, b) = sigmoid(C(a) - mean C(b)); the generator is trained so real
  images look less real than fakes on average and fakes more real than reals, the discriminator the other way.
- Weights as ESRGAN / BasicSR's train_ESRGAN_x4: lambda_pixel 1e-2, perceptual 1, lambda_gan 5e-3.

The discriminator is BasicSR's VGG-style one (conv + BN + LeakyReLU, five stride-2 stages, two linear layers) with
an adaptive average pool before the linear layers, so it takes any HR patch size (BasicSR fixes it at 128 or 256).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from factory.config import FactoryError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VGG19_LAYOUT = (
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    512,
    "M",
)


@dataclass(frozen=True)
class ESRGANLossConfig:
    pixel_weight: float = 1e-2  # lambda for L1(G(x), y)
    perceptual_weight: float = 1.0  # weight of the VGG feature L1
    gan_weight: float = 5e-3  # lambda for the relativistic GAN loss
    perceptual_layer: str = "conv5_4"  # VGG19 layer (before its ReLU) the features are taken at
    discriminator_features: int = 64  # channels of the discriminator's first stage


def vgg19_conv_indices() -> dict[str, int]:
    """'conv1_1' -> index in torchvision's vgg19().features (conv5_4 -> 34)."""
    names, block, conv, index = {}, 1, 0, 0
    for entry in VGG19_LAYOUT:
        if entry == "M":
            block, conv, index = block + 1, 0, index + 1
        else:
            conv += 1
            names[f"conv{block}_{conv}"] = index
            index += 2  # the conv and its ReLU
    return names


class VGGFeatures(nn.Module):
    """VGG19 `features` up to and including `layer` (the conv, not its ReLU), frozen. x: (N, 3, H, W) in [0, 1]."""

    def __init__(self, layer: str = "conv5_4") -> None:
        super().__init__()
        indices = vgg19_conv_indices()
        if layer not in indices:
            raise FactoryError(f"unknown VGG19 layer {layer!r}; known: {', '.join(indices)}")
        modules: list[nn.Module] = []
        channels = 3
        for entry in VGG19_LAYOUT:
            if entry == "M":
                modules.append(nn.MaxPool2d(2, 2))
            else:
                modules += [nn.Conv2d(channels, int(entry), 3, padding=1), nn.ReLU(inplace=True)]
                channels = int(entry)
        self.features = nn.Sequential(*modules[: indices[layer] + 1])
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.requires_grad_(False)

    @classmethod
    def from_file(cls, path: str | os.PathLike, layer: str = "conv5_4") -> VGGFeatures:
        from factory.sr.networks import read_state_dict

        state = read_state_dict(path)
        model = cls(layer)
        needed = {
            key: value for key, value in state.items() if re.match(r"^features\.\d+\.(weight|bias)$", key)
        }
        wanted = {f"features.{key}" for key in model.features.state_dict()}
        missing = sorted(wanted - set(needed))
        if missing:
            raise FactoryError(f"{path} is not a VGG19 state dict (missing {missing[:2]}...)")
        model.features.load_state_dict({key[len("features.") :]: needed[key] for key in wanted})
        return model.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features((x - self.mean) / self.std)


class VGGStyleDiscriminator(nn.Module):
    """x: (N, 3, H, W) in [0, 1], H, W >= 32 -> (N, 1) raw scores C(x)."""

    def __init__(self, features: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, features, 3, 1, 1), nn.LeakyReLU(0.2, inplace=True)]
        channels = features
        for stage, width in enumerate((features, features * 2, features * 4, features * 8, features * 8)):
            if stage > 0:
                layers += [
                    nn.Conv2d(channels, width, 3, 1, 1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.LeakyReLU(0.2, True),
                ]
            layers += [
                nn.Conv2d(width, width, 4, 2, 1, bias=False),
                nn.BatchNorm2d(width),
                nn.LeakyReLU(0.2, True),
            ]
            channels = width
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(4))
        self.head = nn.Sequential(nn.Linear(channels * 16, 100), nn.LeakyReLU(0.2, True), nn.Linear(100, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).flatten(1))


def relativistic_loss(scores: torch.Tensor, reference: torch.Tensor, target_real: bool) -> torch.Tensor:
    """BCE of D_Ra(a, b) = sigmoid(C(a) - mean C(b)) against 1 (real) or 0 (fake)."""
    logits = scores - reference.mean()
    target = torch.ones_like(logits) if target_real else torch.zeros_like(logits)
    return F.binary_cross_entropy_with_logits(logits, target)


def generator_loss(
    sr: torch.Tensor, hr: torch.Tensor, vgg: VGGFeatures, discriminator: nn.Module, config: ESRGANLossConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """L_G for sr, hr: (N, 3, H, W) in [0, 1]; the discriminator's weights get no gradient from it."""
    pixel = F.l1_loss(sr, hr)
    perceptual = F.l1_loss(vgg(sr), vgg(hr).detach())
    real_scores = discriminator(hr).detach()
    fake_scores = discriminator(sr)
    adversarial = (
        relativistic_loss(real_scores, fake_scores, target_real=False)
        + relativistic_loss(fake_scores, real_scores, target_real=True)
    ) / 2
    total = (
        config.pixel_weight * pixel + config.perceptual_weight * perceptual + config.gan_weight * adversarial
    )
    return total, {"l1": pixel.item(), "perceptual": perceptual.item(), "gan": adversarial.item()}


def discriminator_loss(sr: torch.Tensor, hr: torch.Tensor, discriminator: nn.Module) -> torch.Tensor:
    """L_D^Ra: reals relatively more real than fakes, fakes relatively less real than reals (sr is detached)."""
    real_scores = discriminator(hr)
    fake_scores = discriminator(sr.detach())
    return (
        relativistic_loss(real_scores, fake_scores, target_real=True)
        + relativistic_loss(fake_scores, real_scores, target_real=False)
    ) / 2
