"""Blur kernels as closed-form functions of their parameters: (K, K) float64 tensors that sum to 1.

The definitions are those of BasicSR `basicsr/data/degradations.py` (Real-ESRGAN's kernels) and BSRGAN
`utils/utils_blindsr.py` (`fspecial_gaussian`, `anisotropic_Gaussian`, the shifted kernel of its downsampling):

- Gaussian:             k(p) ∝ exp(-q(p) / 2)
- generalized Gaussian: k(p) ∝ exp(-q(p)^β / 2)
- plateau:              k(p) ∝ 1 / (1 + q(p)^β)
- circular low-pass:    k(r) ∝ ω_c J1(ω_c r) / (2π r), with the limit ω_c² / (4π) at r = 0

with q(p) = pᵀ Σ⁻¹ p, Σ = R(θ) diag(σx², σy²) R(θ)ᵀ, p = (x, y) the offset from the centre pixel, x along columns
and y along rows. Each kernel is normalised to sum 1 over its K x K support (K odd).
"""

from __future__ import annotations

import math

import torch


def offsets(kernel_size: int, centre: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) offsets of every tap from `centre` (default: the middle tap). Both (K, K) float64; x varies along
    columns, y along rows."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel size must be odd and positive, got {kernel_size}")
    middle = (kernel_size - 1) / 2 if centre is None else centre
    axis = torch.arange(kernel_size, dtype=torch.float64) - middle
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    return x, y


def covariance(sigma_x: float, sigma_y: float, theta: float) -> torch.Tensor:
    """Σ = R(θ) diag(σx², σy²) R(θ)ᵀ: (2, 2) float64, σx along the direction θ (radians) from the x axis."""
    cos, sin = math.cos(theta), math.sin(theta)
    rotation = torch.tensor([[cos, -sin], [sin, cos]], dtype=torch.float64)
    scales = torch.diag(torch.tensor([sigma_x**2, sigma_y**2], dtype=torch.float64))
    return rotation @ scales @ rotation.T


def quadratic_form(kernel_size: int, sigma_x: float, sigma_y: float, theta: float) -> torch.Tensor:
    """q(p) = pᵀ Σ⁻¹ p at every tap: (K, K) float64."""
    x, y = offsets(kernel_size)
    inverse = torch.linalg.inv(covariance(sigma_x, sigma_y, theta))
    return inverse[0, 0] * x * x + (inverse[0, 1] + inverse[1, 0]) * x * y + inverse[1, 1] * y * y


def _normalised(kernel: torch.Tensor) -> torch.Tensor:
    return kernel / kernel.sum()


def gaussian(kernel_size: int, sigma_x: float, sigma_y: float, theta: float = 0.0) -> torch.Tensor:
    """Bivariate Gaussian (isotropic when σx = σy): (K, K). BasicSR `bivariate_Gaussian`."""
    return _normalised(torch.exp(-0.5 * quadratic_form(kernel_size, sigma_x, sigma_y, theta)))


def generalized_gaussian(
    kernel_size: int, sigma_x: float, sigma_y: float, theta: float, beta: float
) -> torch.Tensor:
    """Generalized Gaussian, shape β (β = 1: Gaussian): (K, K). BasicSR `bivariate_generalized_Gaussian`."""
    return _normalised(torch.exp(-0.5 * quadratic_form(kernel_size, sigma_x, sigma_y, theta).pow(beta)))


def plateau(kernel_size: int, sigma_x: float, sigma_y: float, theta: float, beta: float) -> torch.Tensor:
    """Plateau-shaped kernel 1 / (1 + q^β): (K, K). BasicSR `bivariate_plateau`."""
    return _normalised(1.0 / (1.0 + quadratic_form(kernel_size, sigma_x, sigma_y, theta).pow(beta)))


def bessel_j1(z: torch.Tensor, points: int = 256) -> torch.Tensor:
    """Bessel function of the first kind, order 1, from Bessel's integral J1(z) = 1/(2π) ∫ cos(τ - z sin τ) dτ
    over one period, by the trapezoid rule (exact to float64 rounding for |z| < ~150 with 256 points: the integrand
    is smooth and periodic). torch's `special.bessel_j1` is only good to ~5e-7. z: any shape, float64."""
    tau = torch.arange(points, dtype=torch.float64) * (2 * math.pi / points)
    return torch.cos(tau - z.unsqueeze(-1) * torch.sin(tau)).mean(dim=-1)


def circular_lowpass(kernel_size: int, cutoff: float) -> torch.Tensor:
    """The ideal circular low-pass filter ("sinc") with cutoff ω_c (radians, π is Nyquist), sampled on K x K taps:
    ω_c J1(ω_c r) / (2π r). BasicSR `circular_lowpass_kernel`."""
    x, y = offsets(kernel_size)
    radius = torch.sqrt(x * x + y * y)
    safe = torch.where(radius > 0, radius, torch.ones_like(radius))
    kernel = cutoff * bessel_j1(cutoff * safe) / (2 * math.pi * safe)
    kernel = torch.where(radius > 0, kernel, torch.full_like(kernel, cutoff**2 / (4 * math.pi)))
    return _normalised(kernel)


def matlab_gaussian(kernel_size: int, sigma: float) -> torch.Tensor:
    """MATLAB's fspecial('gaussian'): an isotropic Gaussian whose taps below eps x its peak are zeroed: (K, K).
    BSRGAN `fspecial_gaussian`."""
    x, y = offsets(kernel_size)
    kernel = torch.exp(-(x * x + y * y) / (2 * max(sigma, 1e-12) ** 2))
    kernel = torch.where(kernel < torch.finfo(torch.float64).eps * kernel.max(), 0.0, kernel)
    return _normalised(kernel)


def shifted_gaussian(kernel_size: int, sigma: float, shift: float) -> torch.Tensor:
    """An isotropic Gaussian centred `shift` taps right of and below the middle tap: (K, K).

    BSRGAN's downsampling blur (`fspecial_gaussian` then `shift_pixel(k, sf)`, applied by `ndimage.convolve`)
    centres each kept pixel of a [0::sf] subsampling on its sf x sf block; as a correlation that is the Gaussian
    moved by (sf - 1) / 2. Evaluated in closed form here, where the reference interpolates the sampled kernel
    bilinearly, so the two differ by that interpolation error.
    """
    x, y = offsets(kernel_size, centre=(kernel_size - 1) / 2 + shift)
    return _normalised(torch.exp(-(x * x + y * y) / (2 * max(sigma, 1e-12) ** 2)))
