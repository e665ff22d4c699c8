"""The image operations the classical pipelines share, one pair at a time, every random number from that pair's
generator: blur, resize, Gaussian and Poisson noise, JPEG through a real codec.

Images here are (1, 3, H, W) float32 tensors in [0, 1] on any device; random numbers are drawn on the generator's
device and moved to the image's.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from factory.color import quantize

T = TypeVar("T")

RESIZE_MODES: tuple[str, ...] = ("area", "bilinear", "bicubic")  # Real-ESRGAN's `mode` choices; cv2's 3, 1, 2


class Draws:
    """Scalar draws from one pair's generator, in float64 (one `torch.rand` value per call)."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def unit(self) -> float:
        """U[0, 1)."""
        return float(
            torch.rand((), generator=self.generator, device=self.generator.device, dtype=torch.float64)
        )

    def uniform(self, low: float, high: float) -> float:
        """U[low, high) (a point when low == high)."""
        return low + (high - low) * self.unit()

    def chance(self, probability: float) -> bool:
        """True with `probability`."""
        return self.unit() < probability

    def integer(self, low: int, high: int) -> int:
        """Uniform integer in [low, high], both ends included (Python's `random.randint`)."""
        return min(high, low + int(self.unit() * (high - low + 1)))

    def choice(self, options: Sequence[T], weights: Sequence[float] | None = None) -> T:
        """One of `options`, by `weights` (normalised; uniform when None), as `random.choices(options, weights)`."""
        if weights is None:
            return options[min(len(options) - 1, int(self.unit() * len(options)))]
        total = float(sum(weights))
        point, running = self.unit() * total, 0.0
        for option, weight in zip(options, weights, strict=True):
            running += float(weight)
            if point < running:
                return option
        return options[-1]

    def permutation(self, count: int) -> list[int]:
        """A uniformly random order of range(count)."""
        return torch.randperm(count, generator=self.generator, device=self.generator.device).tolist()


def mirror_indices(length: int, pad: int, device: torch.device) -> torch.Tensor:
    """Indices of a row of `length` padded by `pad` on both sides with mirror reflection (edge not repeated: torch's
    "reflect", OpenCV's BORDER_REFLECT_101, scipy.ndimage's "mirror"), valid for any pad."""
    index = torch.arange(-pad, length + pad, device=device)
    if length == 1:
        return torch.zeros_like(index)
    period = 2 * (length - 1)
    index = index.remainder(period)
    return torch.where(index >= length, period - index, index)


def mirror_pad(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Mirror padding by `pad` on all four sides (`mirror_indices`). x: (1, C, H, W) -> (1, C, H + 2 pad, W + 2 pad)."""
    if pad < x.shape[-2] and pad < x.shape[-1]:
        return F.pad(x, (pad, pad, pad, pad), mode="reflect")
    rows = mirror_indices(x.shape[-2], pad, x.device)
    return x.index_select(-2, rows).index_select(-1, mirror_indices(x.shape[-1], pad, x.device))


def fast_length(length: int) -> int:
    """The smallest length >= `length` with no prime factor above 11: a size pocketfft transforms fast."""
    candidate = max(1, length)
    while True:
        rest = candidate
        for prime in (2, 3, 5, 7, 11):
            while rest % prime == 0:
                rest //= prime
        if rest == 1:
            return candidate
        candidate += 1


def mirror_padded_into_zeros(x: torch.Tensor, pad: int, shape: tuple[int, int]) -> torch.Tensor:
    """`mirror_pad(x, pad)` at the top left of a zero buffer of `shape` (the FFT size): what `rfft2(mirror_pad(x,
    pad), s=shape)` transforms, written once instead of padded twice. x: (1, C, H, W) -> (1, C, *shape)."""
    height, width = x.shape[-2:]
    padded_height, padded_width = height + 2 * pad, width + 2 * pad
    out = x.new_empty((*x.shape[:-2], *shape))
    out[..., padded_height:, :] = 0.0
    out[..., :padded_height, padded_width:] = 0.0
    if pad >= height or pad >= width:  # reflection wraps more than once: by indices
        out[..., :padded_height, :padded_width] = mirror_pad(x, pad)
        return out
    band = out[..., pad : pad + height, :]
    band[..., pad : pad + width] = x
    band[..., :pad] = x[..., 1 : pad + 1].flip(-1)
    band[..., pad + width : padded_width] = x[..., width - pad - 1 : width - 1].flip(-1)
    out[..., :pad, :padded_width] = out[..., pad + 1 : 2 * pad + 1, :padded_width].flip(-2)
    out[..., pad + height : padded_height, :padded_width] = out[
        ..., height - 1 : height + pad - 1, :padded_width
    ].flip(-2)
    return out


def kernel_response(kernel: torch.Tensor, shape: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
    """The convolution response h(d) = k(pad - d) of a correlation kernel on a zero grid of `shape`: the kernel
    flipped, its centre tap at (0, 0) and the rest wrapped around the edges. kernel: (K, K) -> `shape`."""
    size = kernel.shape[-1]
    wrapped = torch.arange(-(size // 2), size - size // 2, device=like.device)
    response = like.new_zeros(shape)
    response[(wrapped % shape[0])[:, None], (wrapped % shape[1])[None, :]] = kernel.flip(0, 1).to(like)
    return response


def filter2d(x: torch.Tensor, kernel: torch.Tensor, step: int = 1) -> torch.Tensor:
    """Correlate every channel with `kernel` (K x K, K odd), mirror-padded to keep the size, as BasicSR `filter2D`
    (and, for BSRGAN's kernels, scipy.ndimage with mode "mirror"); with `step` > 1, only every step-th row and column
    of that (the `[..., ::step, ::step]` of it, computed for those rows alone).

    By FFT: mirror-pad by K // 2, multiply the spectra at a fast transform size (large enough that nothing wraps
    into the kept region), crop. The same sums as the direct correlation up to rounding, and on one core 2-5x
    faster than torch's depthwise conv2d at 1024². The inverse runs as its two passes (columns, then the rows that
    are kept), which gives irfft2's bits exactly and skips the rows the crop drops.
    x: (1, C, H, W) float -> (1, C, ceil(H / step), ceil(W / step)).
    """
    size, (height, width) = kernel.shape[-1], x.shape[-2:]
    pad = size // 2
    if size == 1:
        return (x * kernel.to(x)[0, 0])[..., ::step, ::step]
    shape = (fast_length(height + 2 * pad), fast_length(width + 2 * pad))
    spectrum = torch.fft.rfft2(mirror_padded_into_zeros(x, pad, shape))
    spectrum.mul_(torch.fft.rfft2(kernel_response(kernel, shape, x)))
    columns = torch.fft.ifft(spectrum, dim=-2)[..., pad : pad + height : step, :]
    rows = torch.fft.irfft(columns, n=shape[1], dim=-1)
    return rows[..., pad : pad + width : step].contiguous()


def resize(
    x: torch.Tensor, mode: str, size: tuple[int, int] | None = None, scale_factor: float | None = None
) -> torch.Tensor:
    """`F.interpolate` to `size`, or by `scale_factor` (the output is floor(H x factor) and the factor itself maps
    coordinates, as Real-ESRGAN calls it). No antialiasing, as in both references. x: (1, C, H, W) -> (1, C, h, w)."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    if size is not None and tuple(size) == tuple(x.shape[-2:]):
        return x
    if size is None and scale_factor == 1.0:
        return x
    if x.device.type == "cpu":
        # torch's CPU kernels give the same values in either memory layout, not at the same speed (1024², one
        # thread): bilinear runs ~2x faster channels-last, bicubic ~2x and area ~1.3x faster contiguous.
        x = x.contiguous(memory_format=torch.channels_last if mode == "bilinear" else torch.contiguous_format)
    corners = None if mode == "area" else False
    return F.interpolate(x, size=size, scale_factor=scale_factor, mode=mode, align_corners=corners)


def clipped_sum(x: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
    """clamp(x + fresh, 0, 1), into `fresh` when it has x's shape (it is a temporary of the caller's). Addition
    commutes exactly, so the bits are those of `(x + fresh).clamp(0, 1)`. x: (1, C, H, W), fresh: x's shape or
    (1, 1, H, W) -> (1, C, H, W)."""
    if fresh.shape == x.shape:
        return fresh.add_(x).clamp_(0.0, 1.0)
    return (x + fresh).clamp_(0.0, 1.0)


def gaussian_noise(x: torch.Tensor, sigma: float, gray: bool, generator: torch.Generator) -> torch.Tensor:
    """x + N(0, (σ/255)²), one draw per pixel shared by the channels when `gray`; clipped to [0, 1].

    BasicSR `random_add_gaussian_noise_pt` (σ in 8-bit levels). x: (1, C, H, W) -> (1, C, H, W).
    """
    shape = (1, 1 if gray else x.shape[1], x.shape[-2], x.shape[-1])
    noise = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
    return clipped_sum(x, noise.to(x).mul_(sigma / 255.0))


def luma(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma (torchvision's `rgb_to_grayscale`): (1, 3, H, W) -> (1, 1, H, W)."""
    red, green, blue = x.unbind(dim=1)
    return (0.2989 * red + 0.587 * green + 0.114 * blue).unsqueeze(1)


def poisson_levels(x8: torch.Tensor) -> float:
    """2^ceil(log2(number of distinct 8-bit values in the image)): the photon count of a full-scale pixel.
    x8: an image already rounded to multiples of 1/255."""
    return poisson_levels_of_counts(x8.mul(255.0).round())


def poisson_levels_of_counts(levels8: torch.Tensor) -> float:
    """`poisson_levels` of the same image given as its 8-bit levels, integers 0-255 (any dtype)."""
    distinct = int((torch.bincount(levels8.flatten().to(torch.int64), minlength=256) > 0).sum())
    return float(2 ** math.ceil(math.log2(distinct)))


def poisson_noise(x: torch.Tensor, scale: float, gray: bool, generator: torch.Generator) -> torch.Tensor:
    """Shot noise: x + scale (Poisson(v x8) / v - x8), x8 the image rounded to 8 bits (its luma when `gray`) and v
    `poisson_levels(x8)`; clipped to [0, 1]. Var = scale² x8 / v per pixel.

    BasicSR `random_add_poisson_noise_pt`. x: (1, 3, H, W) -> (1, 3, H, W).
    """
    source = luma(x) if gray else x
    levels8 = (source * 255.0).round_().clamp_(0, 255)
    levels = poisson_levels_of_counts(levels8)
    rounded = levels8.div_(255.0)
    rates = (rounded * levels).to(device=generator.device, dtype=torch.float32)
    counts = torch.poisson(rates, generator=generator).to(x)
    return clipped_sum(x, counts.div_(levels).sub_(rounded).mul_(scale))


def jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    """JPEG round trip at integer `quality` through libjpeg (Pillow's save and open, its default 4:2:0 chroma
    subsampling) of the 8-bit image `color.quantize` makes. torchvision's encode/decode_jpeg give the same bytes
    but are deprecated from torchvision 0.29.

    x: (1, 3, H, W) float in [0, 1] -> (1, 3, H, W) float, multiples of 1/255, on x's device (laid out channels
    last, as the decoder writes it).
    """
    pixels = quantize(x[0]).permute(1, 2, 0).contiguous().cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=int(quality))
    with Image.open(buffer) as decoded:
        array = np.array(decoded if decoded.mode == "RGB" else decoded.convert("RGB"))
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).to(x.device, torch.float32).div_(255.0)


def as_float_images(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """Check an HR batch and return it as float32 in [0, 1]. hr: (N, 3, H, W) uint8 or float, H, W multiples of
    `scale`."""
    if hr.ndim != 4 or hr.shape[1] != 3:
        raise ValueError(f"expected HR images (N, 3, H, W), got shape {tuple(hr.shape)}")
    if hr.shape[-2] % scale or hr.shape[-1] % scale:
        raise ValueError(f"HR size {tuple(hr.shape[-2:])} is not a multiple of the scale {scale}")
    return hr.to(torch.float32) / 255.0 if hr.dtype == torch.uint8 else hr.to(torch.float32)


def degrade_pair_by_pair(hr: torch.Tensor, generators: Sequence[torch.Generator], scale: int, draw, apply):
    """The classical pipelines' batch: each pair draws its record from its own generator (`draw(generator)`), then
    is degraded alone (`apply(image (1, 3, H, W), record, generator)`), so that its bytes do not depend on the batch.
    hr: (N, 3, H, W) -> (LR (N, 3, H / scale, W / scale), the N records)."""
    images = as_float_images(hr, scale)
    if len(generators) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(generators)} generators")
    records = [draw(generator) for generator in generators]
    lrs = [
        apply(images[index : index + 1], record, generator)
        for index, (record, generator) in enumerate(zip(records, generators, strict=True))
    ]
    return torch.cat(lrs), records
