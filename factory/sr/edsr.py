"""EDSR (Lim et al., 2017), with the parameter names of the official EDSR-PyTorch checkpoints.

Official layout (`edsr_x4-4f62e9ef.pt`, `edsr_baseline_x4-6b446fab.pt`): `sub_mean`, `head.0`, `body.<i>.body.{0,2}`,
`body.<n_resblocks>` (the conv after the residual blocks), `tail.0.<2k>` (upsampler convs), `tail.1`, `add_mean`.
BasicSR's EDSR (`EDSR_Lx4_f256b32_DIV2K_official-76ee1c8f.pth`) names the same weights `conv_first`, `body.<i>.conv1/2`,
`conv_after_body`, `upsample.<2k>`, `conv_last` and keeps the mean as a constant: `from_basicsr_keys` renames them.
Both were trained on inputs in [0, 255] with the DIV2K mean subtracted; this module takes and returns [0, 1].
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

DIV2K_RGB_MEAN = (0.4488, 0.4371, 0.4040)  # the mean both official trainings subtract (EDSR-PyTorch, BasicSR)
RGB_RANGE = 255.0  # both official trainings work in [0, 255]


@dataclass(frozen=True)
class EDSRConfig:
    scale: int = 4  # upscaling factor: 2, 3 or 4 (8 = three x2 stages)
    features: int = 64  # n_feats: 64 for EDSR-baseline, 256 for the paper's EDSR
    residual_blocks: int = 16  # n_resblocks: 16 baseline, 32 paper
    residual_scale: float = 1.0  # res_scale: 1.0 baseline, 0.1 for the 256-feature model (training stability)


PRESETS: dict[str, EDSRConfig] = {
    "paper": EDSRConfig(
        scale=4, features=256, residual_blocks=32, residual_scale=0.1
    ),  # EDSR x4 of the paper
    "baseline": EDSRConfig(scale=4, features=64, residual_blocks=16, residual_scale=1.0),
    "tiny": EDSRConfig(scale=4, features=16, residual_blocks=2, residual_scale=1.0),  # tests
}


class MeanShift(nn.Conv2d):
    """A fixed 1x1 conv adding (sign=+1) or subtracting (sign=-1) the DIV2K mean in [0, 255], as in EDSR-PyTorch."""

    def __init__(self, sign: int) -> None:
        super().__init__(3, 3, kernel_size=1)
        self.weight.data.copy_(torch.eye(3).view(3, 3, 1, 1))
        self.bias.data.copy_(sign * RGB_RANGE * torch.tensor(DIV2K_RGB_MEAN))
        for parameter in self.parameters():
            parameter.requires_grad = False


class ResidualBlock(nn.Module):
    """conv-ReLU-conv, scaled, plus the input (no batch norm: EDSR's point)."""

    def __init__(self, features: int, residual_scale: float) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(features, features, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(features, features, 3, padding=1),
        )
        self.residual_scale = residual_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) * self.residual_scale


def upsampler(scale: int, features: int) -> nn.Sequential:
    """conv + PixelShuffle stages: log2(scale) x2 stages, or one x3 stage (EDSR-PyTorch's Upsampler)."""
    layers: list[nn.Module] = []
    if scale & (scale - 1) == 0:
        for _ in range(int(math.log2(scale))):
            layers += [nn.Conv2d(features, 4 * features, 3, padding=1), nn.PixelShuffle(2)]
    elif scale == 3:
        layers += [nn.Conv2d(features, 9 * features, 3, padding=1), nn.PixelShuffle(3)]
    else:
        raise ValueError(f"EDSR supports scales 2^n and 3, not {scale}")
    return nn.Sequential(*layers)


class EDSR(nn.Module):
    def __init__(self, config: EDSRConfig) -> None:
        super().__init__()
        self.config = config
        self.sub_mean = MeanShift(-1)
        self.head = nn.Sequential(nn.Conv2d(3, config.features, 3, padding=1))
        blocks: list[nn.Module] = [
            ResidualBlock(config.features, config.residual_scale) for _ in range(config.residual_blocks)
        ]
        blocks.append(nn.Conv2d(config.features, config.features, 3, padding=1))
        self.body = nn.Sequential(*blocks)
        self.tail = nn.Sequential(
            upsampler(config.scale, config.features), nn.Conv2d(config.features, 3, 3, padding=1)
        )
        self.add_mean = MeanShift(+1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 3, h, w) in [0, 1] -> (N, 3, scale*h, scale*w), about [0, 1] (not clamped: training sees the raw output)."""
        x = self.sub_mean(x * RGB_RANGE)
        x = self.head(x)
        x = x + self.body(x)
        return self.add_mean(self.tail(x)) / RGB_RANGE


_BASICSR_RENAMES = (
    (r"^conv_first\.", "head.0."),
    (r"^body\.(\d+)\.conv1\.", r"body.\1.body.0."),
    (r"^body\.(\d+)\.conv2\.", r"body.\1.body.2."),
    (r"^upsample\.(\d+)\.", r"tail.0.\1."),
    (r"^conv_last\.", "tail.1."),
)


def is_edsr_state_dict(state_dict: dict[str, torch.Tensor]) -> bool:
    """True for EDSR-PyTorch and BasicSR EDSR key layouts."""
    official = (
        "head.0.weight" in state_dict
        and "body.0.body.0.weight" in state_dict
        and "tail.1.weight" in state_dict
    )
    basicsr = (
        "conv_first.weight" in state_dict
        and "body.0.conv1.weight" in state_dict
        and "conv_after_body.weight" in state_dict
    )
    return official or basicsr


def from_basicsr_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BasicSR EDSR keys -> EDSR-PyTorch keys (the mean shifts are added by the module: same DIV2K mean)."""
    if "head.0.weight" in state_dict:
        return dict(state_dict)
    blocks = len({key.split(".")[1] for key in state_dict if re.match(r"^body\.\d+\.conv1\.weight$", key)})
    renamed: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new_key = key.replace("conv_after_body.", f"body.{blocks}.")
        for pattern, replacement in _BASICSR_RENAMES:
            new_key = re.sub(pattern, replacement, new_key)
        renamed[new_key] = value
    return renamed


def config_from_state_dict(state_dict: dict[str, torch.Tensor]) -> EDSRConfig:
    """Infer the EDSR shape from official-layout weights. res_scale is not stored: the official models use 0.1 for
    the 256-feature EDSR and 1.0 below (EDSR-PyTorch's `--res_scale`, BasicSR's EDSR_L config)."""
    features = state_dict["head.0.weight"].shape[0]
    blocks = len({key.split(".")[1] for key in state_dict if re.match(r"^body\.\d+\.body\.0\.weight$", key)})
    scale = 1
    for key, value in state_dict.items():
        if re.match(r"^tail\.0\.\d+\.weight$", key):
            scale *= math.isqrt(value.shape[0] // features)
    return EDSRConfig(
        scale=scale, features=features, residual_blocks=blocks, residual_scale=0.1 if features >= 256 else 1.0
    )


def load_edsr(state_dict: dict[str, torch.Tensor]) -> EDSR:
    """An EDSR with these weights (EDSR-PyTorch or BasicSR layout); missing mean shifts take the DIV2K mean."""
    state_dict = from_basicsr_keys(state_dict)
    model = EDSR(config_from_state_dict(state_dict))
    expected = model.state_dict()
    for key in ("sub_mean.weight", "sub_mean.bias", "add_mean.weight", "add_mean.bias"):
        state_dict.setdefault(key, expected[key])
    model.load_state_dict(state_dict, strict=True)
    return model
