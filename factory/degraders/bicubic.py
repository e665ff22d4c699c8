"""`bicubic`: the project's bicubic downsampling (`color.downsample`) as a degrader; it draws nothing."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from factory.color import downsample
from factory.degraders import ConfiguredDegrader, Degraded


@dataclasses.dataclass(frozen=True)
class BicubicConfig:
    scale: int = 4  # LR = HR / scale


@dataclasses.dataclass(frozen=True)
class BicubicDegrader(ConfiguredDegrader):
    """HR -> antialiased bicubic LR; its record is only its name and scale."""

    config_class: ClassVar[type] = BicubicConfig
    config: BicubicConfig = BicubicConfig()
    name: str = "bicubic"

    def degrade(
        self,
        hr: torch.Tensor,
        generators: Sequence[torch.Generator],
        bicubic_lr: torch.Tensor | None = None,
    ) -> Degraded:
        """hr: (N, 3, H, W) in [0, 1] (or uint8) -> (N, 3, H / scale, W / scale), unrounded; or `bicubic_lr`
        (N, 3, H / scale, W / scale) uint8 as floats, when the caller has it already."""
        record = {"degrader": "bicubic", "scale": self.scale}
        records = [dict(record) for _ in range(hr.shape[0])]
        if bicubic_lr is not None:
            return Degraded(bicubic_lr.to(torch.float32) / 255.0, records)
        images = hr.to(torch.float32) / 255.0 if hr.dtype == torch.uint8 else hr
        return Degraded(downsample(images, self.scale), records)

    def flat_columns(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Bicubic draws nothing: no kernel σ, noise or JPEG."""
        return {"kernel_sigma": None, "noise_level": None, "jpeg_quality": None}
