"""`bsrgan`: the shuffled degradation of BSRGAN (Zhang et al. 2021), one pair at a time.

    degrader = get_degrader("bsrgan", {"scale": 4})

Follows `degradation_bsrgan` of BSRGAN `utils/utils_blindsr.py` with its defaults (`add_blur`, `add_Gaussian_noise`
with noise levels 2..8, `add_JPEG_noise`, `fspecial_gaussian`, `anisotropic_Gaussian`):

    [x4 only, with scale2_prob: halve first (OpenCV resize or MATLAB bicubic, 1/2 each)]
    -> in a random order, with downsample2 kept before downsample3:
       blur, blur, downsample2 (resize by U[1, 2 sf) or Gaussian blur + nearest), downsample3 (resize to H / scale),
       Gaussian noise (colour, gray or cross-channel correlated), JPEG (with jpeg_prob)
    -> final JPEG

Included: everything of `degradation_bsrgan` except the processed camera-sensor noise (step 6). The released code
calls it only when an `isp_model` is passed and none is published, so the released pipeline never applies it;
it is left out rather than invented. Also not done: the final random crop (the factory crops before degrading).
Differences on purpose: OpenCV's resizes are torch's `F.interpolate` with the same kernels (bilinear, bicubic
a = -0.75; "area" is torch's adaptive average pooling, OpenCV's INTER_AREA for integer factors); MATLAB's
imresize is `color.bicubic_resize`; the shifted downsampling kernel is evaluated in closed form
(`kernels.shifted_gaussian`); JPEG is libjpeg as in the reference, through torchvision.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from factory.color import bicubic_resize
from factory.config import ConfigError
from factory.degraders import ConfiguredDegrader, Degraded
from factory.degraders import kernels as K
from factory.degraders.ops import RESIZE_MODES, Draws, degrade_pair_by_pair, filter2d, jpeg, resize

STEPS: tuple[str, ...] = (
    "blur1",
    "blur2",
    "downsample2",
    "downsample3",
    "noise",
    "jpeg",
)  # reference steps 0..5


@dataclasses.dataclass(frozen=True)
class BSRGANConfig:
    """The probabilities and ranges of `degradation_bsrgan` (utils_blindsr.py), with its defaults."""

    scale: int = 4  # sf
    scale2_prob: float = 0.25  # x4 only: halve before the shuffled steps
    jpeg_prob: float = 0.9  # the shuffled JPEG step; the final JPEG always runs
    downsample_resize_prob: float = 0.75  # downsample2: resize, else Gaussian blur + nearest
    noise_level_range: tuple[int, int] = (
        2,
        8,
    )  # add_Gaussian_noise(noise_level1, noise_level2), 8-bit levels
    jpeg_range: tuple[int, int] = (30, 95)  # add_JPEG_noise: random.randint(30, 95)

    def __post_init__(self) -> None:
        for name in ("noise_level_range", "jpeg_range"):
            value = getattr(self, name)
            object.__setattr__(self, name, tuple(int(v) for v in value))
        if self.scale < 1:
            raise ConfigError(f"scale must be >= 1, got {self.scale}")


# --------------------------------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------------------------------


def draw_blur(draws: Draws, sf: int) -> dict[str, Any]:
    """`add_blur`: with 1/2 an anisotropic Gaussian (variances l1, l2 ~ U[0, 4 + sf), θ ~ U[0, π)), else
    MATLAB's isotropic Gaussian (σ ~ U[0, 2 + 0.2 sf)); size 2 randint(2, 11) + 3."""
    if draws.chance(0.5):
        variances = (4.0 + sf) * draws.unit(), (4.0 + sf) * draws.unit()
        size = 2 * draws.integer(2, 11) + 3
        theta = math.pi * draws.unit()
        sigma_x, sigma_y = (math.sqrt(max(v, 1e-12)) for v in variances)
        return {"type": "aniso", "size": size, "sigma_x": sigma_x, "sigma_y": sigma_y, "theta": theta}
    size = 2 * draws.integer(2, 11) + 3
    sigma = (2.0 + 0.2 * sf) * draws.unit()
    return {"type": "iso", "size": size, "sigma_x": sigma, "sigma_y": sigma, "theta": 0.0}


def draw_noise(draws: Draws, levels: Sequence[int]) -> dict[str, Any]:
    """`add_Gaussian_noise`: level randint(lo, hi); colour (p 0.4), gray (p 0.4), or correlated across channels
    (p 0.2) with covariance |L² Uᵀ D U|, L = hi / 255, D = diag(U[0, 1)³), U = orth(U[0, 1)^(3x3))."""
    level = draws.integer(levels[0], levels[1])
    draw = draws.unit()
    if draw > 0.6:
        return {"kind": "color", "level": level, "covariance": None}
    if draw < 0.4:
        return {"kind": "gray", "level": level, "covariance": None}
    diagonal = torch.diag(torch.tensor([draws.unit() for _ in range(3)], dtype=torch.float64))
    matrix = torch.tensor([[draws.unit() for _ in range(3)] for _ in range(3)], dtype=torch.float64)
    basis = torch.linalg.svd(matrix).U  # scipy.linalg.orth: the left singular vectors
    covariance = ((levels[1] / 255.0) ** 2 * basis.T @ diagonal @ basis).abs()
    return {"kind": "correlated", "level": level, "covariance": covariance.tolist()}


def draw_downsample(draws: Draws, sf: int, resize_prob: float) -> dict[str, Any]:
    """downsample2: resize by 1 / U[1, 2 sf) (p `resize_prob`), else a 25-tap Gaussian (σ ~ U[0.1, 0.6 sf))
    centred on each sf x sf block and nearest subsampling."""
    if draws.chance(resize_prob):
        return {
            "method": "resize",
            "factor": draws.uniform(1.0, 2.0 * sf),
            "mode": draws.choice(RESIZE_MODES),
        }
    return {"method": "blur_nearest", "sigma": draws.uniform(0.1, 0.6 * sf)}


def draw_order(draws: Draws) -> list[str]:
    """A random order of the steps, then downsample2 and downsample3 swapped if 3 came first."""
    order = [STEPS[index] for index in draws.permutation(len(STEPS))]
    first, second = order.index("downsample2"), order.index("downsample3")
    if first > second:
        order[first], order[second] = order[second], order[first]
    return order


def draw_parameters(config: BSRGANConfig, generator: torch.Generator) -> dict[str, Any]:
    """Everything one pair draws, in a fixed order, as its JSON-able record (no image needed)."""
    draws, c = Draws(generator), config
    halve = None
    if c.scale == 4 and draws.chance(c.scale2_prob):
        halve = (
            {"method": "resize", "mode": draws.choice(RESIZE_MODES)}
            if draws.chance(0.5)
            else {"method": "matlab"}
        )
    sf = 2 if halve else c.scale
    order = draw_order(draws)
    jpeg_step = draws.integer(*c.jpeg_range) if draws.chance(c.jpeg_prob) else None
    steps = {
        "blur1": draw_blur(draws, sf),
        "blur2": draw_blur(draws, sf),
        "downsample2": draw_downsample(draws, sf, c.downsample_resize_prob),
        "downsample3": {"mode": draws.choice(RESIZE_MODES)},
        "noise": draw_noise(draws, c.noise_level_range),
        "jpeg": {"quality": jpeg_step},
    }
    final = {"jpeg_quality": draws.integer(*c.jpeg_range)}
    return {"degrader": "bsrgan", "halve": halve, "sf": sf, "order": order, "steps": steps, "final": final}


# --------------------------------------------------------------------------------------------------------------------
# Applying a record to one image
# --------------------------------------------------------------------------------------------------------------------


def blur_kernel(record: Mapping[str, Any]) -> torch.Tensor:
    """The (K, K) kernel of an `add_blur` record."""
    if record["type"] == "iso":
        return K.matlab_gaussian(record["size"], record["sigma_x"])
    return K.gaussian(record["size"], record["sigma_x"], record["sigma_y"], record["theta"])


def add_noise(x: torch.Tensor, record: Mapping[str, Any], generator: torch.Generator) -> torch.Tensor:
    """`add_Gaussian_noise` as drawn; correlated noise is z · sqrt(S) Vᵀ with (U, S, Vᵀ) the SVD of the covariance,
    as numpy's `multivariate_normal` samples it. x: (1, 3, H, W) -> (1, 3, H, W) in [0, 1]."""
    height, width = x.shape[-2:]
    device = generator.device
    if record["kind"] == "correlated":
        _, singular, vh = torch.linalg.svd(torch.tensor(record["covariance"], dtype=torch.float64))
        factor = (singular.sqrt()[:, None] * vh).to(device=device, dtype=torch.float32)
        normal = torch.randn((height * width, 3), generator=generator, device=device, dtype=torch.float32)
        noise = (normal @ factor).T.reshape(1, 3, height, width)
    else:
        channels = 3 if record["kind"] == "color" else 1
        shape = (1, channels, height, width)
        noise = torch.randn(shape, generator=generator, device=device, dtype=torch.float32) * (
            record["level"] / 255.0
        )
    return (x + noise.to(x)).clamp(0.0, 1.0)


def blur_nearest(x: torch.Tensor, sigma: float, sf: int) -> torch.Tensor:
    """downsample2's second branch: a 25-tap Gaussian centred on each sf x sf block, then every sf-th pixel.
    x: (1, 3, H, W) -> (1, 3, ceil(H / sf), ceil(W / sf))."""
    kernel = K.shifted_gaussian(25, sigma, (sf - 1) / 2)
    return filter2d(x, kernel, step=sf)


def halve(x: torch.Tensor, record: Mapping[str, Any]) -> torch.Tensor:
    """The x4 pipeline's first halving. x: (1, 3, H, W) -> (1, 3, H // 2, W // 2)."""
    size = (x.shape[-2] // 2, x.shape[-1] // 2)
    if record["method"] == "matlab":
        return bicubic_resize(x, size)
    return resize(x, record["mode"], size=size).clamp(0.0, 1.0)


def degrade_one(x: torch.Tensor, record: Mapping[str, Any], generator: torch.Generator) -> torch.Tensor:
    """Apply a pair's record to its HR image (noise from `generator`, which has drawn the record).

    x: (1, 3, H, W) float32 in [0, 1] -> (1, 3, H / scale, W / scale), multiples of 1/255.
    """
    if record["halve"] is not None:
        x = halve(x, record["halve"])
    sf, steps = record["sf"], record["steps"]
    before = tuple(x.shape[-2:])  # the size downsample3 divides by sf (set when downsample2 runs)
    for step in record["order"]:
        if step in ("blur1", "blur2"):
            x = filter2d(x, blur_kernel(steps[step]))
        elif step == "downsample2":
            before, down = tuple(x.shape[-2:]), steps[step]
            if down["method"] == "resize":
                size = (int(before[0] / down["factor"]), int(before[1] / down["factor"]))
                x = resize(x, down["mode"], size=size)
            else:
                x = blur_nearest(x, down["sigma"], sf)
            x = x.clamp(0.0, 1.0)
        elif step == "downsample3":
            x = resize(x, steps[step]["mode"], size=(int(before[0] / sf), int(before[1] / sf))).clamp(
                0.0, 1.0
            )
        elif step == "noise":
            x = add_noise(x, steps[step], generator)
        elif steps["jpeg"]["quality"] is not None:
            x = jpeg(x, steps["jpeg"]["quality"])
    return jpeg(x, record["final"]["jpeg_quality"])


@dataclasses.dataclass(frozen=True)
class BSRGANDegrader(ConfiguredDegrader):
    """The `bsrgan` degrader: `draw_parameters` then `degrade_one`, pair by pair."""

    config_class: ClassVar[type] = BSRGANConfig
    config: BSRGANConfig = BSRGANConfig()
    name: str = "bsrgan"

    def degrade(
        self,
        hr: torch.Tensor,
        generators: Sequence[torch.Generator],
        bicubic_lr: torch.Tensor | None = None,
    ) -> Degraded:
        """hr: (N, 3, H, W) in [0, 1] (or uint8) -> LR (N, 3, H / scale, W / scale) and one record per pair.
        `bicubic_lr` is not used: this pipeline degrades the HR itself."""
        lrs, records = degrade_pair_by_pair(
            hr, generators, self.scale, lambda generator: draw_parameters(self.config, generator), degrade_one
        )
        return Degraded(lrs, records)

    def flat_columns(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """The first blur's σ_x, the Gaussian noise level in 8-bit levels, the final JPEG's quality (the one JPEG
        every pair gets)."""
        steps = record["steps"]
        return {
            "kernel_sigma": steps["blur1"]["sigma_x"],
            "noise_level": float(steps["noise"]["level"]),
            "jpeg_quality": record["final"]["jpeg_quality"],
        }
