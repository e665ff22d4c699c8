"""How far a reconstruction is from its input: PSNR, SSIM and the checkerboard index (the regime of a checkpoint).

    psnr, ssim = image_quality(x_deg_u8, x_u8)     # (N, 3, h, w) uint8 each -> (N,), (N,)
    index = checkerboard_index(x_deg, x)           # (N, 3, h, w) float in [0, 1] -> (N,)

The checkerboard index. An undertrained decoder whose upsampling is a stride-2 transposed convolution (VQ-VAE,
VQ-VAE-2, the DDIM U-Net) paints a pattern that repeats every 2, 4 or 8 pixels: in the spectrum, sharp peaks on the
lattice of frequencies (k / 8, l / 8) cycles per pixel, (π, π) among them (Odena et al., "Deconvolution and
Checkerboard Artifacts", Distill 2016). A photo has a smooth spectrum there, and so do the degradations the paper is
after (blur, noise, ringing, colour shifts): blur lowers the whole neighbourhood, noise raises it, neither makes a
peak. So the index measures peakiness, not energy:

    peak(I)  = mean over the lattice points f != 0 of (power per bin in the 3x3 bins around f
               / power per bin in the ring of bins at Chebyshev distance 2..3 around f)
    index    = peak(x_deg) / peak(x)

A mean of per-point ratios, so that one strong peak counts however many quiet points there are; on the luminance, mean
removed, under a Hann window (so image borders make no peaks of their own). A faithful reconstruction gives 1, a
blurred or noisy one 0.7-1.3, a +-8 grey-level period-2 or period-4 grid over a photo 4.4 and above (measured in
tests/test_quality.py on the bundled photos at 64 and 256 px). CHECKERBOARD_THRESHOLD = 2 sits between them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# A reconstruction whose index exceeds this carries a periodic upsampling pattern. Measured in tests/test_quality.py:
# clean, blurred and noisy photos 0.7-1.3; a +-8 grey-level period-2 or period-4 grid over a photo 4.4 and above.
CHECKERBOARD_THRESHOLD = 2.0
LATTICE_PERIOD = (
    8  # the lattice (k/8, l/8) holds the period-2, 4 and 8 patterns of two and three 2x upsamplings
)


def image_quality(degraded: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PSNR and SSIM of `degraded` against `reference`, both (N, 3, h, w) uint8 tensors, computed in float64 on
    their device (float32 on MPS, which has no float64) -> (psnr (N,), ssim (N,)).

    The definitions of skimage's `peak_signal_noise_ratio(reference, degraded, data_range=255)` (an infinite PSNR,
    identical images, is stored as 100 dB) and `structural_similarity(..., channel_axis=2, data_range=255)` with its
    defaults: 7x7 uniform window, K1 = 0.01, K2 = 0.03, sample covariance, mean over the windows that fit inside the
    image (skimage filters the whole image and crops 3 pixels off each border, which leaves exactly these windows),
    then over the channels."""
    dtype = torch.float32 if degraded.device.type == "mps" else torch.float64  # MPS has no float64
    a = degraded.to(dtype)
    b = reference.to(dtype)
    mse = (a - b).pow(2).flatten(1).mean(dim=1)
    psnr = torch.where(
        mse > 0, 10.0 * torch.log10(255.0**2 / mse.clamp_min(1e-12)), torch.full_like(mse, 100.0)
    )
    window = 7
    if min(a.shape[-2:]) < window:
        raise ValueError(f"SSIM needs images of at least {window}x{window}, got {tuple(a.shape[-2:])}")
    count = window * window
    covariance_norm = count / (count - 1)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def pooled_mean(t):
        return F.avg_pool2d(t, window, stride=1)

    mean_filter, sa, sb = pooled_mean, a, b  # the filter, and the tensors the window sums are taken over
    if dtype == torch.float64:
        # 8-bit pixels: every window sum of pixels or of their products is an integer below 2^22, and so is every
        # partial sum of a 7-wide row or column: exact in float32, in any order. So the window sums are taken in
        # float32 by seven shifted slices per axis and only then divided by the count in float64, which gives
        # avg_pool2d's float64 means bit for bit, in avg_pool2d's memory layout (which decides the order of the
        # SSIM mean below). Measured: PSNR + SSIM of 8 pairs of 256 in 89 ms, against 226 ms with float64 cumulative
        # sums and more with avg_pool2d. tests/test_build.py checks the equality.
        def window_sum(t):
            for dim in (-1, -2):
                size = t.shape[dim] - window + 1
                total = t.narrow(dim, 0, size).clone()
                for offset in range(1, window):
                    total += t.narrow(dim, offset, size)
                t = total
            return t

        def summed_mean(t):
            channels_last = not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
            layout = torch.channels_last if channels_last else torch.contiguous_format
            return (window_sum(t).double() / count).contiguous(memory_format=layout)

        mean_filter = summed_mean
        sa, sb = degraded.float(), reference.float()  # 8-bit values and their products (<= 65,025): exact

    mean_a, mean_b = mean_filter(sa), mean_filter(sb)
    var_a = covariance_norm * (mean_filter(sa * sa) - mean_a * mean_a)
    var_b = covariance_norm * (mean_filter(sb * sb) - mean_b * mean_b)
    cov = covariance_norm * (mean_filter(sa * sb) - mean_a * mean_b)
    ssim_map = ((2 * mean_a * mean_b + c1) * (2 * cov + c2)) / (
        (mean_a**2 + mean_b**2 + c1) * (var_a + var_b + c2)
    )
    ssim = ssim_map.flatten(2).mean(dim=2).mean(dim=1)
    return psnr, ssim


def _power_spectrum(x: torch.Tensor) -> torch.Tensor:
    """x: (N, 3, H, W) in [0, 1] -> (N, H, W) power of the windowed, mean-removed luminance (float64)."""
    luminance = x.double().mul(
        torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64, device=x.device)[:, None, None]
    )
    luminance = luminance.sum(dim=1)
    luminance = luminance - luminance.mean(dim=(-2, -1), keepdim=True)
    height, width = luminance.shape[-2:]
    window = torch.outer(
        torch.hann_window(height, periodic=False, dtype=torch.float64, device=x.device),
        torch.hann_window(width, periodic=False, dtype=torch.float64, device=x.device),
    )
    return torch.fft.fft2(luminance * window).abs().pow(2)


def _lattice_peakiness(power: torch.Tensor) -> torch.Tensor:
    """power: (N, H, W) -> (N,): power in the 3x3 bins at the lattice points over the ring around them, per bin."""
    height, width = power.shape[-2:]
    # The spectrum is periodic: pad circularly so that neighbourhoods of points near the edges wrap around.
    padded = F.pad(power[:, None], (3, 3, 3, 3), mode="circular")[:, 0]
    ratios = []
    rows = sorted({round(k * height / LATTICE_PERIOD) % height for k in range(LATTICE_PERIOD)})
    cols = sorted({round(k * width / LATTICE_PERIOD) % width for k in range(LATTICE_PERIOD)})
    for u in rows:
        for v in cols:
            if u == 0 and v == 0:
                continue  # the mean (removed) and the lowest frequencies: a photo's own energy, not a pattern
            block = padded[:, u : u + 7, v : v + 7]  # 7x7 centred on (u, v)
            core = block[:, 2:5, 2:5].sum(dim=(-2, -1)) / 9
            ring = (block.sum(dim=(-2, -1)) - block[:, 1:6, 1:6].sum(dim=(-2, -1))) / 24
            ratios.append(core / ring.clamp_min(1e-30))
    return torch.stack(ratios, dim=1).mean(dim=1)


def checkerboard_index(degraded: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """degraded, reference: (N, 3, H, W) in [0, 1] (float, or uint8 scaled by 1/255), H, W >= 16 -> (N,) index;
    see the module docstring. ~1: no periodic pattern beyond the input's own; above CHECKERBOARD_THRESHOLD: one."""
    if degraded.shape != reference.shape:
        raise ValueError(f"shapes differ: {tuple(degraded.shape)} vs {tuple(reference.shape)}")
    if min(degraded.shape[-2:]) < 16:
        raise ValueError(
            f"the checkerboard index needs images of at least 16x16, got {tuple(degraded.shape[-2:])}"
        )
    if not degraded.is_floating_point():
        degraded, reference = degraded.double() / 255, reference.double() / 255
    return _lattice_peakiness(_power_spectrum(degraded)) / _lattice_peakiness(
        _power_spectrum(reference)
    ).clamp_min(1e-30)
