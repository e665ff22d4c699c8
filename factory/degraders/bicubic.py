"""`bicubic`: the project's bicubic downsampling (`color.downsample`) as a degrader; it draws nothing.

With a colour shift it makes the LR of the paper's colour-difference study (Section 4.3.2, Figures 10 and 11): the
bicubic LR moved in CIELAB, either by a fixed (ΔL*, Δa*, Δb*) (`color_shift`) or, for each pair, along
`shift_direction` by the magnitude whose mean CIEDE2000 to the bicubic LR is `target_delta_e` (`find_shift_for_target`
on that pair's LR). The paper reports each dataset's mean ΔE, not its shifts; calibrating per pair makes the dataset's
mean ΔE the target whatever its images, and each pair's record keeps the shift it got.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from factory.color import downsample, find_shift_for_target, pixel_delta_e, quantize, shift_lab
from factory.degraders import ConfiguredDegrader, Degraded


def _lab_triple(value: Any, name: str) -> tuple[float, float, float]:
    """A (ΔL*, Δa*, Δb*) from a tuple or a YAML/JSON list; ValueError names the option when it is not 3 finite
    numbers."""
    try:
        triple = tuple(float(component) for component in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be three numbers (ΔL*, Δa*, Δb*), got {value!r}") from None
    if len(triple) != 3 or not all(math.isfinite(component) for component in triple):
        raise ValueError(f"{name} must be three finite numbers (ΔL*, Δa*, Δb*), got {value!r}")
    return triple  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class BicubicConfig:
    scale: int = 4  # LR = HR / scale
    color_shift: tuple[float, float, float] | None = None  # (ΔL*, Δa*, Δb*) added to every LR in CIELAB
    target_delta_e: float | None = None  # shift each LR along shift_direction until its mean ΔE is this
    shift_direction: tuple[float, float, float] = (0.0, 1.0, 1.0)  # for target_delta_e: a warm cast, L* kept

    def __post_init__(self) -> None:
        if self.color_shift is not None and self.target_delta_e is not None:
            raise ValueError("give color_shift or target_delta_e, not both")
        if self.color_shift is not None:
            object.__setattr__(self, "color_shift", _lab_triple(self.color_shift, "color_shift"))
        direction = _lab_triple(self.shift_direction, "shift_direction")
        if not any(direction):
            raise ValueError("shift_direction must not be zero")
        object.__setattr__(self, "shift_direction", direction)
        if self.target_delta_e is not None:
            target = float(self.target_delta_e)
            if not (math.isfinite(target) and target > 0):
                raise ValueError(f"target_delta_e must be a positive number, got {self.target_delta_e!r}")
            object.__setattr__(self, "target_delta_e", target)


@dataclasses.dataclass(frozen=True)
class BicubicDegrader(ConfiguredDegrader):
    """HR -> antialiased bicubic LR, optionally shifted in CIELAB; its record is its name, scale and any shift."""

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
        (N, 3, H / scale, W / scale) uint8 as floats, when the caller has it already; then shifted if configured."""
        if bicubic_lr is not None:
            lr = bicubic_lr.to(torch.float32) / 255.0
        else:
            images = hr.to(torch.float32) / 255.0 if hr.dtype == torch.uint8 else hr
            lr = downsample(images, self.scale)
        record = {"degrader": "bicubic", "scale": self.scale}
        if self.config.color_shift is not None:
            shifted = shift_lab(lr, *self.config.color_shift)
            records = [{**record, "color_shift": list(self.config.color_shift)} for _ in range(lr.shape[0])]
            return Degraded(shifted, records)
        if self.config.target_delta_e is not None:
            return self._shift_to_target(lr, record)
        return Degraded(lr, [dict(record) for _ in range(lr.shape[0])])

    def _shift_to_target(self, lr: torch.Tensor, record: dict[str, Any]) -> Degraded:
        """lr: (N, 3, h, w) in [0, 1] -> each image shifted along the direction to the target mean ΔE."""
        shifted, records = [], []
        for image in lr:
            shift = self._stored_shift(image[None])
            shifted.append(shift_lab(image[None], *shift))
            records.append(
                {**record, "color_shift": list(shift), "target_delta_e": self.config.target_delta_e}
            )
        return Degraded(torch.cat(shifted), records)

    def _stored_shift(self, image: torch.Tensor) -> tuple[float, float, float]:
        """image: (1, 3, h, w) in [0, 1] -> the (ΔL*, Δa*, Δb*) whose shifted image, stored as 8 bits, is at the
        target mean ΔE from `image`. `find_shift_for_target` calibrates the float image; rounding to 8 bits then
        adds ~2% ΔE (rounding noise adds to a colour difference more than it cancels), so the magnitude is
        corrected by a few secant steps on the stored image's ΔE (each step a 0.1% relative tolerance)."""
        target = self.config.target_delta_e
        found = find_shift_for_target(image, target, direction=self.config.shift_direction)
        shift = (found.lightness, found.a, found.b)

        def stored_delta_e(scale: float) -> float:
            stored = quantize(shift_lab(image, *(scale * component for component in shift)))
            return pixel_delta_e(quantize(image), stored).mean().item()

        previous, previous_delta_e = 1.0, stored_delta_e(1.0)
        scale = target / previous_delta_e
        for _ in range(4):
            current_delta_e = stored_delta_e(scale)
            if abs(current_delta_e - target) <= 1e-3 * target or current_delta_e == previous_delta_e:
                break
            slope = (current_delta_e - previous_delta_e) / (scale - previous)
            previous, previous_delta_e = scale, current_delta_e
            scale += (target - current_delta_e) / slope
        return (scale * shift[0], scale * shift[1], scale * shift[2])

    def flat_columns(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Bicubic draws nothing: no kernel σ, noise or JPEG."""
        return {"kernel_sigma": None, "noise_level": None, "jpeg_quality": None}
