"""Colour core against references nobody here wrote: scikit-image (`rgb2lab`, `deltaE_ciede2000`), the 34 published
CIEDE2000 test pairs of Sharma, Wu & Dalal (2005), and torch's/Pillow's bicubic."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import skimage.color
import torch
from PIL import Image

from factory import color

# The 34 test pairs published by Sharma, Wu & Dalal (2005), Table 1 (L1, a1, b1, L2, a2, b2, dE00), kept in the repo
# so that the test runs on any clone.
SHARMA_CSV = Path(__file__).resolve().parent / "data" / "ciede2000_sharma2005.csv"


def to_tensor(image: np.ndarray, dtype=torch.float64) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) in [0, 1]."""
    return torch.from_numpy(image).permute(2, 0, 1)[None].to(dtype) / 255.0


def to_numpy(x: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) -> (H, W, 3) float64."""
    return x[0].permute(1, 2, 0).detach().double().numpy()


def sharma_pairs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with SHARMA_CSV.open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 34
    lab1 = torch.tensor([[float(r[k]) for k in ("L1", "a1", "b1")] for r in rows], dtype=torch.float64)
    lab2 = torch.tensor([[float(r[k]) for k in ("L2", "a2", "b2")] for r in rows], dtype=torch.float64)
    expected = torch.tensor([float(r["dE00"]) for r in rows], dtype=torch.float64)
    return lab1, lab2, expected


# --- CIEDE2000 -------------------------------------------------------------------------------------------------------


def run_ciede2000(lab1: torch.Tensor, lab2: torch.Tensor, differentiable: bool) -> torch.Tensor:
    """Through the differentiable path (inputs need a gradient) or the fast no-gradient path."""
    if differentiable:
        return color.ciede2000(lab1.clone().requires_grad_(), lab2.clone().requires_grad_()).detach()
    return color.ciede2000(lab1, lab2)


@pytest.mark.parametrize("differentiable", [False, True])
@pytest.mark.parametrize("swap", [False, True])
def test_ciede2000_matches_sharma_2005_pairs(swap, differentiable):
    # Reference: Sharma, Wu & Dalal (2005), Table 1; pairs 7-16 are the hue discontinuities. CIEDE2000 is symmetric.
    lab1, lab2, expected = sharma_pairs()
    if swap:
        lab1, lab2 = lab2, lab1
    got = run_ciede2000(lab1[:, :, None], lab2[:, :, None], differentiable)[:, 0]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("differentiable", [False, True])
def test_ciede2000_sharma_pairs_in_float32(differentiable):
    lab1, lab2, expected = sharma_pairs()
    got = run_ciede2000(lab1.float()[:, :, None], lab2.float()[:, :, None], differentiable)[:, 0]
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=2e-4)


@pytest.mark.parametrize("differentiable", [False, True])
def test_ciede2000_matches_skimage_on_random_lab(differentiable):
    # Reference: skimage.color.deltaE_ciede2000, with gray colours and exactly opposite hues mixed in.
    generator = torch.Generator().manual_seed(1)
    lab1 = torch.rand(2, 3, 64, 64, generator=generator, dtype=torch.float64) * torch.tensor(
        [100, 200, 200]
    ).view(1, 3, 1, 1) - torch.tensor([0, 100, 100]).view(1, 3, 1, 1)
    lab2 = lab1 + torch.randn(lab1.shape, generator=generator, dtype=torch.float64) * 8
    lab1[:, 1:, :4] = 0  # zero chroma
    lab2[:, 1:, :2] = 0
    # Exactly opposite hues on the axes, where skimage's atan2 gives |h2' - h1'| = 180° exactly (elsewhere its
    # rounding decides which side of the discontinuity a computed-opposite pair falls on).
    lab1[:, 1, 8, :] = 2.5 + lab1[:, 1, 8, :].abs()
    lab1[:, 2, 8, :] = 0.0
    lab2[:, 1:, 8, :] = -lab1[:, 1:, 8, :]
    lab1[:, 1, 9, :] = 0.0
    lab1[:, 2, 9, :] = 2.5 + lab1[:, 2, 9, :].abs()
    lab2[:, 1:, 9, :] = -lab1[:, 1:, 9, :]
    got = run_ciede2000(lab1, lab2, differentiable)
    expected = skimage.color.deltaE_ciede2000(
        lab1.permute(0, 2, 3, 1).numpy(), lab2.permute(0, 2, 3, 1).numpy(), channel_axis=-1
    )
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-4)


def test_ciede2000_gradients_are_finite_at_zero_chroma_and_identical_colours():
    lab1 = torch.tensor(
        [[50.0, 0.0, 0.0], [50.0, 10.0, -5.0], [30.0, 0.0, 0.0], [70.0, 2.5, 0.0]], dtype=torch.float64
    )
    lab2 = torch.tensor(
        [[50.0, 0.0, 0.0], [50.0, 10.0, -5.0], [40.0, -1.0, 2.0], [70.0, -2.5, 0.0]], dtype=torch.float64
    )
    lab1 = lab1[:, :, None].requires_grad_()
    lab2 = lab2[:, :, None].requires_grad_()
    color.ciede2000(lab1, lab2).sum().backward()
    assert torch.isfinite(lab1.grad).all() and torch.isfinite(lab2.grad).all()
    # Away from the guarded points the gradient is the true one (central differences).
    chromatic1 = torch.tensor([[[30.0], [5.0], [-3.0]]], dtype=torch.float64, requires_grad=True)
    chromatic2 = torch.tensor([[[40.0], [-1.0], [2.0]]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(color.ciede2000, (chromatic1, chromatic2))


# --- sRGB -> LAB -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("differentiable", [False, True])
def test_rgb_to_lab_matches_skimage_on_random_images(differentiable):
    generator = torch.Generator().manual_seed(2)
    rgb = torch.rand(1, 3, 48, 40, generator=generator, dtype=torch.float64)
    rgb[..., :3] = 0.0  # black, and values below the sRGB linear threshold
    rgb[..., 3:6] = 0.02
    rgb[..., 6:9] = 0.04045  # at the sRGB threshold
    expected = skimage.color.rgb2lab(to_numpy(rgb))
    rgb.requires_grad_(differentiable)
    np.testing.assert_allclose(to_numpy(color.rgb_to_lab(rgb)), expected, rtol=0, atol=1e-4)
    got32 = color.rgb_to_lab(rgb.detach().float().requires_grad_(differentiable))
    assert got32.dtype == torch.float32
    np.testing.assert_allclose(to_numpy(got32), expected, rtol=0, atol=2e-3)


def test_rgb_to_lab_and_ciede2000_match_skimage_on_photos(photos):
    # Reference: skimage on the photos it ships; LR-size crops keep the test fast.
    names = ("astronaut", "coffee", "chelsea")
    for name in names:
        image = photos[name][:128, :128]
        shifted = np.clip(image.astype(np.int16) + np.array([12, -7, 20]), 0, 255).astype(np.uint8)
        lab1, lab2 = color.rgb_to_lab(to_tensor(image)), color.rgb_to_lab(to_tensor(shifted))
        expected1, expected2 = skimage.color.rgb2lab(image), skimage.color.rgb2lab(shifted)
        np.testing.assert_allclose(to_numpy(lab1), expected1, rtol=0, atol=1e-4)
        np.testing.assert_allclose(
            color.ciede2000(lab1, lab2)[0].numpy(),
            skimage.color.deltaE_ciede2000(expected1, expected2),
            atol=1e-4,
        )


def test_rgb_to_lab_accepts_uint8_like_skimage(photos):
    # The uint8 path linearises through a 256-entry table; every 8-bit level appears in the test image.
    levels = np.arange(256, dtype=np.uint8)
    image = np.concatenate(
        [photos["rocket"][:64, :64], np.stack([levels, levels[::-1], levels], -1)[:64][None].repeat(4, 0)]
    )
    got = color.rgb_to_lab(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None])
    assert got.dtype == torch.float32
    np.testing.assert_allclose(to_numpy(got), skimage.color.rgb2lab(image), rtol=0, atol=2e-3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.uint8])
def test_pixel_delta_e_matches_skimage_across_pieces(photos, dtype):
    # 150 x 130 pixels span two of the fast path's pieces; reference: skimage rgb2lab + deltaE_ciede2000.
    first, second = photos["coffee"][:150, :130], photos["chelsea"][:150, :130]
    if dtype == torch.uint8:
        inputs = [
            torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None] for image in (first, second)
        ]
        tolerance = 2e-3  # float32 arithmetic
    else:
        inputs = [to_tensor(image) for image in (first, second)]
        tolerance = 1e-4
    got = color.pixel_delta_e(*inputs)
    expected = skimage.color.deltaE_ciede2000(skimage.color.rgb2lab(first), skimage.color.rgb2lab(second))
    assert got.shape == (1, 150, 130)
    np.testing.assert_allclose(got[0].double().numpy(), expected, rtol=0, atol=tolerance)


def test_lab_to_rgb_inverts_rgb_to_lab():
    rgb = torch.rand(1, 3, 16, 16, dtype=torch.float64)
    torch.testing.assert_close(color.lab_to_rgb(color.rgb_to_lab(rgb)), rgb, rtol=0, atol=1e-6)
    lab = color.rgb_to_lab(rgb)
    np.testing.assert_allclose(
        to_numpy(color.lab_to_rgb(lab)), skimage.color.lab2rgb(to_numpy(lab)), atol=1e-6
    )


# --- bicubic and the paper's protocol --------------------------------------------------------------------------------


def test_bicubic_resize_agrees_with_pillow_bicubic(photos):
    # Reference: Pillow's BICUBIC (antialiased, a = -0.5) on the same photo. Pillow rounds and clamps to 8 bits
    # between its horizontal and vertical passes, so single pixels differ by up to ~2 levels; on average < 0.5.
    image = photos["astronaut"][:256, :256]
    ours = color.bicubic_resize(to_tensor(image, torch.float32), (64, 64))
    pillow = np.asarray(Image.fromarray(image).resize((64, 64), Image.BICUBIC)).astype(np.float64)
    difference = np.abs(to_numpy(ours) * 255 - pillow)
    assert difference.max() <= 2.5 and difference.mean() < 0.5
    assert ours.min() >= 0 and ours.max() <= 1


def test_downsample_sizes_and_errors():
    x = torch.rand(2, 3, 33, 50)
    assert color.downsample(x, 4).shape == (2, 3, 8, 12)
    with pytest.raises(ValueError, match="scale"):
        color.downsample(x, 0)
    with pytest.raises(ValueError, match="smaller"):
        color.downsample(x, 64)


def test_delta_e_matches_skimage_on_the_bicubic_downsampled_hr(photos):
    # Reference: skimage rgb2lab + deltaE_ciede2000 applied to the same bicubic-downsampled HR and the LR.
    hr_image = photos["coffee"][:192, :192]
    hr = to_tensor(hr_image)
    lr = (color.downsample(hr, 3) * torch.tensor([1.05, 0.97, 0.9]).view(1, 3, 1, 1)).clamp(0, 1)
    lr = lr + 0.02 * torch.randn_like(lr)
    lr = lr.clamp(0, 1)
    result = color.delta_e(torch.cat([hr, hr]), torch.cat([lr, color.downsample(hr, 3)]))
    reference = to_numpy(color.bicubic_resize(hr, lr.shape[-2:]))
    per_pixel = skimage.color.deltaE_ciede2000(
        skimage.color.rgb2lab(reference), skimage.color.rgb2lab(to_numpy(lr))
    )
    assert result.mean.shape == result.p95.shape == (2,)
    assert abs(result.mean[0].item() - per_pixel.mean()) < 1e-3
    assert abs(result.p95[0].item() - np.percentile(per_pixel, 95)) < 1e-3
    assert result.mean[1].item() < 1e-9  # the bicubic LR itself has no colour difference


def test_delta_e_uint8_matches_skimage_on_the_stored_pair(photos):
    # Reference: skimage on (8-bit bicubic HR, 8-bit LR), i.e. what a reader of the stored pair recomputes.
    hr_image = photos["astronaut"][:256, :256]
    hr = torch.from_numpy(hr_image).permute(2, 0, 1)[None].contiguous()
    lr = color.quantize(color.shift_lab(color.downsample(hr.float() / 255, 4), 1.0, 3.0, -2.0))
    result = color.delta_e_uint8(hr, lr)
    reference = color.quantize(color.bicubic_resize(hr.float() / 255, (64, 64)))[0].permute(1, 2, 0).numpy()
    per_pixel = skimage.color.deltaE_ciede2000(
        skimage.color.rgb2lab(reference), skimage.color.rgb2lab(lr[0].permute(1, 2, 0).numpy())
    )
    assert abs(result.mean.item() - per_pixel.mean()) < 1e-3
    assert abs(result.p95.item() - np.percentile(per_pixel, 95)) < 1e-3
    with pytest.raises(ValueError, match="uint8"):
        color.delta_e_uint8(hr.float(), lr)


def test_delta_e_gradients_flow():
    hr = torch.rand(1, 3, 32, 32, dtype=torch.float64)
    lr = color.downsample(hr, 2).detach().clone()
    lr[..., :4, :] = 0.5  # identical-free region and a gray patch
    lr.requires_grad_()
    color.delta_e(hr, lr).mean.sum().backward()
    assert torch.isfinite(lr.grad).all() and lr.grad.abs().sum() > 0


def test_delta_e_rejects_mismatched_batches():
    with pytest.raises(ValueError, match="batch"):
        color.delta_e(torch.rand(2, 3, 8, 8), torch.rand(1, 3, 4, 4))


# --- colour shift and colour correction ------------------------------------------------------------------------------


def test_shift_lab_moves_lab_by_the_requested_offset():
    rgb = torch.full((1, 3, 4, 4), 0.5, dtype=torch.float64)  # mid grey: the shifted colour stays in gamut
    shifted = color.shift_lab(rgb, 2.0, 5.0, -4.0)
    difference = color.rgb_to_lab(shifted) - color.rgb_to_lab(rgb)
    torch.testing.assert_close(difference[0, :, 0, 0], torch.tensor([2.0, 5.0, -4.0], dtype=torch.float64))


@pytest.mark.parametrize("target", [2.0, 8.0])
def test_find_shift_for_target_reaches_the_target_on_a_photo(photos, target):
    # Reference: skimage's ΔE of the shifted photo against the original, within 2% of the requested mean.
    image = to_tensor(photos["chelsea"][:96, :96])
    shift = color.find_shift_for_target(image, target, direction=(1.0, 1.0, -1.0))
    shifted = color.shift_lab(image, shift.lightness, shift.a, shift.b)
    measured = skimage.color.deltaE_ciede2000(
        skimage.color.rgb2lab(to_numpy(shifted)), skimage.color.rgb2lab(to_numpy(image))
    )
    assert abs(measured.mean() - target) <= 0.02 * target
    assert shift.lightness > 0 and shift.b < 0  # along the requested direction


def test_find_shift_for_target_rejects_bad_targets():
    with pytest.raises(ValueError, match="positive"):
        color.find_shift_for_target(torch.rand(1, 3, 8, 8), 0.0)


CORRECTION_NOISE = 0.01  # Gaussian noise sigma added to the shifted LR (the degradation to keep)
RESIDUAL_SIGMA = 1.0  # the high-frequency residual is image minus its Gaussian blur with this sigma


@pytest.mark.parametrize("method", color.CORRECTION_METHODS)
def test_color_correct_removes_the_shift_and_keeps_the_noise(photos, method):
    generator = torch.Generator().manual_seed(3)
    for name in ("astronaut", "coffee"):
        reference = color.downsample(to_tensor(photos[name][:384, :384], torch.float32), 3)  # bicubic LR
        degraded = color.shift_lab(reference, 4.0, 10.0, -8.0)
        degraded = (degraded + CORRECTION_NOISE * torch.randn(degraded.shape, generator=generator)).clamp(
            0, 1
        )
        corrected = color.color_correct(degraded, reference, method=method)
        before = color.delta_e(reference, degraded).mean.item()
        after = color.delta_e(reference, corrected).mean.item()
        kept = (
            color.high_frequency_energy(corrected, RESIDUAL_SIGMA)
            / color.high_frequency_energy(degraded, RESIDUAL_SIGMA)
        ).item()
        assert after <= 0.3 * before, (name, before, after)
        assert kept >= 0.9, (name, kept)


def test_color_correct_leaves_an_unshifted_image_nearly_unchanged(photos):
    reference = color.downsample(to_tensor(photos["rocket"][:256, :256], torch.float32), 4)
    assert color.delta_e(reference, color.color_correct(reference, reference)).mean.item() < 0.05


def test_color_correct_rejects_mismatched_sizes_and_methods():
    with pytest.raises(ValueError, match="shape"):
        color.color_correct(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 9))
    with pytest.raises(ValueError, match="method"):
        color.color_correct(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8), method="magic")


@pytest.mark.parametrize("native", ["1", "0"])
def test_8bit_pixel_delta_e_fused_kernel_and_torch_path_match_skimage(photos, native, monkeypatch):
    """Both CPU paths for 8-bit input (the fused C kernel of factory.native, and the torch path it falls back to)
    against skimage rgb2lab + deltaE_ciede2000: photos, random colours, and all 256 grays (zero chroma) against
    random colours and against themselves (ΔE 0)."""
    from factory import native as native_module

    monkeypatch.setenv("FACTORY_NATIVE", native)
    native_module.ciede2000_u8_kernel.cache_clear()
    try:
        kernel = native_module.ciede2000_u8_kernel()
        if native == "1" and shutil.which("cc"):
            assert kernel is not None, "a C compiler is present but the fused kernel did not build"
        if native == "0":
            assert kernel is None
        rng = np.random.default_rng(7)
        grays = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2).repeat(4, axis=0)
        cases = [
            (photos["coffee"][:96, :128], photos["astronaut"][:96, :128]),
            (
                rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
                rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
            ),
            (grays, rng.integers(0, 256, grays.shape, dtype=np.uint8)),
            (grays, grays),
        ]
        for first, second in cases:
            inputs = [
                torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)[None] for x in (first, second)
            ]
            got = color.pixel_delta_e(*inputs)[0].double().numpy()
            expected = skimage.color.deltaE_ciede2000(
                skimage.color.rgb2lab(first), skimage.color.rgb2lab(second)
            )
            # float32 arithmetic; random colours include near-opposite hues, where ΔE00 itself jumps (Sharma's note).
            assert np.percentile(np.abs(got - expected), 99.9) < 2e-3
            assert np.abs(got - expected).max() < 0.1
            assert abs(got.mean() - expected.mean()) < 1e-4
    finally:
        native_module.ciede2000_u8_kernel.cache_clear()
