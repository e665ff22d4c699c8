"""`realesrgan`: the second-order degradation of Real-ESRGAN (Wang et al. 2021), one pair at a time.

    degrader = get_degrader("realesrgan", load_options("train_realesrnet_x4plus.yml"))

Defaults are those of Real-ESRGAN `options/train_realesrnet_x4plus.yml`; the kernel draws follow
`realesrgan/data/realesrgan_dataset.py` and BasicSR `basicsr/data/degradations.py` (`random_mixed_kernels`,
`circular_lowpass_kernel`, the noise functions); the pipeline follows `feed_data` of
`realesrgan/models/realesrnet_model.py`:

    blur(k1) -> resize(up | down | keep) -> Gaussian | Poisson noise -> JPEG
    -> [blur(k2) with second_blur_prob] -> resize -> noise -> one of
       resize to H/scale + sinc -> JPEG   or   JPEG -> resize to H/scale + sinc        (each with probability 1/2)
    -> round to 8 bits

Where this differs from the reference, on purpose:
- every pair draws its own resize scale and mode, from its own generator (the reference shares them in a batch);
- JPEG is libjpeg at an integer quality drawn uniformly from the integers of `jpeg_range` (the reference's
  DiffJPEG takes a real quality and is a torch re-implementation of the codec);
- `gt_usm` (unsharp-mask the HR before degrading it, as RealESRNetModel does, True in the option file) is off by
  default: the factory stores the HR as it is, and an LR made from a sharpened HR would be sharper than its own HR.
  Set it (or load the option file, where it is True) to degrade a sharpened HR as the reference does.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
import yaml

from factory.config import ConfigError
from factory.degraders import ConfiguredDegrader, Degraded
from factory.degraders import kernels as K
from factory.degraders.ops import (
    RESIZE_MODES,
    Draws,
    degrade_pair_by_pair,
    filter2d,
    gaussian_noise,
    jpeg,
    poisson_noise,
    resize,
)

KERNEL_TYPES: tuple[str, ...] = (
    "iso",
    "aniso",
    "generalized_iso",
    "generalized_aniso",
    "plateau_iso",
    "plateau_aniso",
)
SMALLEST_KERNEL = 7  # realesrgan_dataset.py: kernel_range = [7, 9, ..., 21]
UPDOWN: tuple[str, ...] = ("up", "down", "keep")  # the order of resize_prob


@dataclasses.dataclass(frozen=True)
class RealESRGANConfig:
    """Every range of the pipeline, under the reference's own YAML keys (train_realesrnet_x4plus.yml)."""

    scale: int = 4  # LR = HR / scale
    gt_usm: bool = False  # sharpen the HR before degrading it (reference: True; see the module docstring)
    # first degradation (option file, top level)
    resize_prob: tuple[float, ...] = (0.2, 0.7, 0.1)  # up, down, keep
    resize_range: tuple[float, float] = (0.15, 1.5)  # down: U[lo, 1), up: U[1, hi)
    gaussian_noise_prob: float = 0.5  # else Poisson
    noise_range: tuple[float, float] = (1.0, 30.0)  # Gaussian σ, 8-bit levels
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple[float, float] = (30.0, 95.0)
    # second degradation
    second_blur_prob: float = 0.8
    resize_prob2: tuple[float, ...] = (0.3, 0.4, 0.3)
    resize_range2: tuple[float, float] = (0.3, 1.2)
    gaussian_noise_prob2: float = 0.5
    noise_range2: tuple[float, float] = (1.0, 25.0)
    poisson_scale_range2: tuple[float, float] = (0.05, 2.5)
    gray_noise_prob2: float = 0.4
    jpeg_range2: tuple[float, float] = (30.0, 95.0)
    # kernels (option file, datasets.train): sizes odd in [7, blur_kernel_size]
    blur_kernel_size: int = 21
    kernel_list: tuple[str, ...] = KERNEL_TYPES
    kernel_prob: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob: float = 0.1
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    betag_range: tuple[float, float] = (0.5, 4.0)  # generalized Gaussian β
    betap_range: tuple[float, float] = (1.0, 2.0)  # plateau β
    blur_kernel_size2: int = 21
    kernel_list2: tuple[str, ...] = KERNEL_TYPES
    kernel_prob2: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob2: float = 0.1
    blur_sigma2: tuple[float, float] = (0.2, 1.5)
    betag_range2: tuple[float, float] = (0.5, 4.0)
    betap_range2: tuple[float, float] = (1.0, 2.0)
    final_sinc_prob: float = 0.8

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, list):
                object.__setattr__(self, field.name, tuple(value))
        for names, weights in ((self.kernel_list, self.kernel_prob), (self.kernel_list2, self.kernel_prob2)):
            unknown = sorted(set(names) - set(KERNEL_TYPES))
            if unknown or len(names) != len(weights):
                raise ConfigError(
                    f"kernel_list {list(names)} / kernel_prob {list(weights)}: types {KERNEL_TYPES}"
                )
        if len(self.resize_prob) != 3 or len(self.resize_prob2) != 3:
            raise ConfigError("resize_prob and resize_prob2 need three weights: up, down, keep")
        if min(self.blur_kernel_size, self.blur_kernel_size2) < SMALLEST_KERNEL:
            raise ConfigError(f"blur_kernel_size must be at least {SMALLEST_KERNEL}")

    def kernels(self, round_: int) -> KernelRanges:
        """The blur options of the first (1) or second (2) round."""
        if round_ == 1:
            return KernelRanges(
                self.blur_kernel_size,
                self.kernel_list,
                self.kernel_prob,
                self.blur_sigma,
                self.betag_range,
                self.betap_range,
                self.sinc_prob,
            )
        return KernelRanges(
            self.blur_kernel_size2,
            self.kernel_list2,
            self.kernel_prob2,
            self.blur_sigma2,
            self.betag_range2,
            self.betap_range2,
            self.sinc_prob2,
        )

    def noise(self, round_: int) -> NoiseRanges:
        """The noise options of the first (1) or second (2) round."""
        if round_ == 1:
            return NoiseRanges(
                self.gaussian_noise_prob, self.noise_range, self.poisson_scale_range, self.gray_noise_prob
            )
        return NoiseRanges(
            self.gaussian_noise_prob2, self.noise_range2, self.poisson_scale_range2, self.gray_noise_prob2
        )


def load_options(path: str | Path) -> dict[str, Any]:
    """The pipeline's options from a YAML file: a flat mapping of `RealESRGANConfig` keys, or a whole Real-ESRGAN
    training option file (its top level and `datasets: train:` are read, the rest configures training)."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of options")
    if "datasets" not in data:
        return data
    known = {field.name for field in dataclasses.fields(RealESRGANConfig)}
    train = (data.get("datasets") or {}).get("train") or {}
    merged = {**data, **train}
    return {key: value for key, value in merged.items() if key in known}


# --------------------------------------------------------------------------------------------------------------------
# Parameters: everything a pair draws, before any image is touched
# --------------------------------------------------------------------------------------------------------------------


def draw_beta(draws: Draws, beta_range: Sequence[float]) -> float:
    """β: U[lo, 1) or U[1, hi) with probability 1/2 each (BasicSR `random_bivariate_generalized_Gaussian`)."""
    if draws.chance(0.5):
        return draws.uniform(beta_range[0], 1.0)
    return draws.uniform(1.0, beta_range[1])


class KernelRanges(NamedTuple):
    """The blur options of one round (`blur_kernel_size`, `kernel_list`, ... or their *2 twins)."""

    largest: int
    kernel_list: Sequence[str]
    kernel_prob: Sequence[float]
    sigma: Sequence[float]
    betag: Sequence[float]
    betap: Sequence[float]
    sinc_prob: float


class NoiseRanges(NamedTuple):
    """The noise options of one round (`gaussian_noise_prob`, `noise_range`, ... or their *2 twins)."""

    gaussian_prob: float
    sigma: Sequence[float]
    poisson_scale: Sequence[float]
    gray_prob: float


def draw_kernel(draws: Draws, ranges: KernelRanges) -> dict[str, Any]:
    """A blur kernel's record: size odd in [7, largest], then a sinc (ω_c U[π/3, π) below 13 taps, U[π/5, π)
    otherwise) with `sinc_prob`, else a type of `kernel_list` (realesrgan_dataset.py, `random_mixed_kernels`)."""
    size = draws.choice(range(SMALLEST_KERNEL, ranges.largest + 1, 2))
    record = {"type": "sinc", "size": size, "sigma_x": None, "sigma_y": None, "theta": None, "beta": None}
    if draws.chance(ranges.sinc_prob):
        low = math.pi / 3 if size < 13 else math.pi / 5
        return {**record, "omega_c": draws.uniform(low, math.pi)}
    kind = draws.choice(ranges.kernel_list, ranges.kernel_prob)
    sigma_x = draws.uniform(*ranges.sigma)
    sigma_y, theta = sigma_x, 0.0
    if kind.endswith("aniso"):
        sigma_y, theta = draws.uniform(*ranges.sigma), draws.uniform(-math.pi, math.pi)
    beta = None
    if kind.startswith("generalized"):
        beta = draw_beta(draws, ranges.betag)
    elif kind.startswith("plateau"):
        beta = draw_beta(draws, ranges.betap)
    shape = {"sigma_x": sigma_x, "sigma_y": sigma_y, "theta": theta, "beta": beta, "omega_c": None}
    return {**record, "type": kind, **shape}


def draw_final_sinc(draws: Draws, largest: int, probability: float) -> dict[str, Any] | None:
    """The final sinc's record with `final_sinc_prob` (size odd in [7, largest], ω_c U[π/3, π)), else None."""
    if not draws.chance(probability):
        return None
    size = draws.choice(range(SMALLEST_KERNEL, largest + 1, 2))
    omega_c = draws.uniform(math.pi / 3, math.pi)
    return {
        "type": "sinc",
        "size": size,
        "sigma_x": None,
        "sigma_y": None,
        "theta": None,
        "beta": None,
        "omega_c": omega_c,
    }


def draw_resize(draws: Draws, weights: Sequence[float], scale_range: Sequence[float]) -> dict[str, Any]:
    """Up (U[1, hi)), down (U[lo, 1)) or keep, by `weights`; mode uniform over area, bilinear, bicubic."""
    direction = draws.choice(UPDOWN, weights)
    scale = 1.0
    if direction == "up":
        scale = draws.uniform(1.0, scale_range[1])
    elif direction == "down":
        scale = draws.uniform(scale_range[0], 1.0)
    return {"direction": direction, "scale": scale, "mode": draws.choice(RESIZE_MODES)}


def draw_noise(draws: Draws, ranges: NoiseRanges) -> dict[str, Any]:
    """Gaussian (σ U[noise_range)) with `gaussian_noise_prob`, else Poisson (scale U[poisson_scale_range)); gray
    with `gray_noise_prob` (BasicSR `random_add_gaussian_noise_pt`, `random_add_poisson_noise_pt`)."""
    if draws.chance(ranges.gaussian_prob):
        record = {"kind": "gaussian", "sigma": draws.uniform(*ranges.sigma), "scale": None}
    else:
        record = {"kind": "poisson", "sigma": None, "scale": draws.uniform(*ranges.poisson_scale)}
    return {**record, "gray": draws.chance(ranges.gray_prob)}


def draw_quality(draws: Draws, quality_range: Sequence[float]) -> int:
    """A JPEG quality, uniform over the integers of `quality_range`."""
    return draws.integer(math.ceil(quality_range[0]), math.floor(quality_range[1]))


def draw_parameters(config: RealESRGANConfig, generator: torch.Generator) -> dict[str, Any]:
    """Everything one pair draws, in a fixed order, as its JSON-able record (no image needed)."""
    draws, c = Draws(generator), config
    kernel1, kernel2 = draw_kernel(draws, c.kernels(1)), draw_kernel(draws, c.kernels(2))
    final_sinc = draw_final_sinc(draws, max(c.blur_kernel_size, c.blur_kernel_size2), c.final_sinc_prob)
    first = {
        "blur": kernel1,
        "resize": draw_resize(draws, c.resize_prob, c.resize_range),
        "noise": draw_noise(draws, c.noise(1)),
        "jpeg_quality": draw_quality(draws, c.jpeg_range),
    }
    second_blur = draws.chance(c.second_blur_prob)
    second = {
        "blur": kernel2 if second_blur else None,
        "resize": draw_resize(draws, c.resize_prob2, c.resize_range2),
        "noise": draw_noise(draws, c.noise(2)),
    }
    jpeg_first = draws.chance(0.5)
    final = {
        "order": "jpeg_then_resize_sinc" if jpeg_first else "resize_sinc_then_jpeg",
        "mode": draws.choice(RESIZE_MODES),
        "sinc": final_sinc,
        "jpeg_quality": draw_quality(draws, c.jpeg_range2),
    }
    return {"degrader": "realesrgan", "gt_usm": c.gt_usm, "first": first, "second": second, "final": final}


# --------------------------------------------------------------------------------------------------------------------
# Applying a record to one image
# --------------------------------------------------------------------------------------------------------------------


def kernel_from_record(record: Mapping[str, Any]) -> torch.Tensor:
    """The (K, K) float64 kernel a record describes."""
    kind, size = record["type"], record["size"]
    if kind == "sinc":
        return K.circular_lowpass(size, record["omega_c"])
    sigma_x, sigma_y, theta = record["sigma_x"], record["sigma_y"], record["theta"]
    if kind in ("iso", "aniso"):
        return K.gaussian(size, sigma_x, sigma_y, theta)
    if kind.startswith("generalized"):
        return K.generalized_gaussian(size, sigma_x, sigma_y, theta, record["beta"])
    return K.plateau(size, sigma_x, sigma_y, theta, record["beta"])


def unsharp_mask(x: torch.Tensor, weight: float = 0.5, threshold: float = 10.0) -> torch.Tensor:
    """BasicSR `USMSharp` (radius 50: a 51-tap Gaussian of σ 8, OpenCV's σ for that size): sharpen where the
    high-pass exceeds `threshold` 8-bit levels, blended by a blurred mask. x: (1, 3, H, W) -> (1, 3, H, W)."""
    kernel = K.gaussian(51, 8.0, 8.0)
    residual = x - filter2d(x, kernel)
    mask = filter2d((residual.abs() * 255.0 > threshold).to(x.dtype), kernel)
    sharp = (x + weight * residual).clamp(0.0, 1.0)
    return mask * sharp + (1.0 - mask) * x


def add_noise(x: torch.Tensor, record: Mapping[str, Any], generator: torch.Generator) -> torch.Tensor:
    """The noise a record describes, drawn from `generator`. x: (1, 3, H, W) -> (1, 3, H, W) in [0, 1]."""
    if record["kind"] == "gaussian":
        return gaussian_noise(x, record["sigma"], record["gray"], generator)
    return poisson_noise(x, record["scale"], record["gray"], generator)


def resize_and_sinc(x: torch.Tensor, final: Mapping[str, Any], size: tuple[int, int]) -> torch.Tensor:
    """Resize to the LR size, then the final sinc (if drawn). x: (1, 3, h, w) -> (1, 3, H / scale, W / scale)."""
    x = resize(x, final["mode"], size=size)
    return x if final["sinc"] is None else filter2d(x, kernel_from_record(final["sinc"]))


def degrade_one(
    x: torch.Tensor, record: Mapping[str, Any], scale: int, generator: torch.Generator
) -> torch.Tensor:
    """Apply a pair's record to its HR image (noise from `generator`, which has drawn the record).

    x: (1, 3, H, W) float32 in [0, 1] -> (1, 3, H / scale, W / scale), multiples of 1/255.
    """
    height, width = x.shape[-2:]
    if record["gt_usm"]:
        x = unsharp_mask(x)
    first, second, final = record["first"], record["second"], record["final"]
    x = filter2d(x, kernel_from_record(first["blur"]))
    x = resize(x, first["resize"]["mode"], scale_factor=first["resize"]["scale"])
    x = add_noise(x, first["noise"], generator)
    x = jpeg(x, first["jpeg_quality"])
    if second["blur"] is not None:
        x = filter2d(x, kernel_from_record(second["blur"]))
    factor = second["resize"]["scale"]
    x = resize(x, second["resize"]["mode"], size=(int(height / scale * factor), int(width / scale * factor)))
    x = add_noise(x, second["noise"], generator)
    size = (height // scale, width // scale)
    if final["order"] == "resize_sinc_then_jpeg":
        x = jpeg(
            resize_and_sinc(x, final, size), final["jpeg_quality"]
        )  # jpeg clamps to [0, 1] as it quantises
    else:
        x = resize_and_sinc(jpeg(x, final["jpeg_quality"]), final, size)
    return (x * 255.0).round().clamp(0.0, 255.0) / 255.0


@dataclasses.dataclass(frozen=True)
class RealESRGANDegrader(ConfiguredDegrader):
    """The `realesrgan` degrader: `draw_parameters` then `degrade_one`, pair by pair."""

    config_class: ClassVar[type] = RealESRGANConfig
    config: RealESRGANConfig = RealESRGANConfig()
    name: str = "realesrgan"

    def degrade(
        self,
        hr: torch.Tensor,
        generators: Sequence[torch.Generator],
        bicubic_lr: torch.Tensor | None = None,
    ) -> Degraded:
        """hr: (N, 3, H, W) in [0, 1] (or uint8) -> LR (N, 3, H / scale, W / scale) and one record per pair.
        `bicubic_lr` is not used: this pipeline degrades the HR itself."""
        lrs, records = degrade_pair_by_pair(
            hr,
            generators,
            self.scale,
            lambda generator: draw_parameters(self.config, generator),
            lambda image, record, generator: degrade_one(image, record, self.scale, generator),
        )
        return Degraded(lrs, records)

    def flat_columns(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """The first round's values: the first blur's σ_x (None for a sinc kernel), the first noise's Gaussian σ in
        8-bit levels (None for Poisson noise), the first JPEG's quality."""
        first = record["first"]
        sigma = first["noise"]["sigma"] if first["noise"]["kind"] == "gaussian" else None
        return {
            "kernel_sigma": first["blur"]["sigma_x"],
            "noise_level": sigma,
            "jpeg_quality": first["jpeg_quality"],
        }
