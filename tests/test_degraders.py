"""factory.degraders against references nobody here wrote: closed-form kernels (scipy.stats, scipy.special.j1),
scipy.ndimage's mirror correlation, Pillow's JPEG, the Poisson variance, the configured distributions over 10,000
parameter draws, and per-pair reproducibility."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import scipy.ndimage
import scipy.special
import scipy.stats
import torch
import torch.nn.functional as F
from PIL import Image

from factory.color import quantize
from factory.config import ConfigError
from factory.degraders import DEGRADER_NAMES, bsrgan, get_degrader, ops, pair_generator, realesrgan
from factory.degraders import kernels as K

DRAWS = 10_000


def reference_covariance(sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    """Σ with variance σx² along the direction θ and σy² across it, written out."""
    cos, sin = math.cos(theta), math.sin(theta)
    return np.array(
        [
            [sigma_x**2 * cos**2 + sigma_y**2 * sin**2, (sigma_x**2 - sigma_y**2) * sin * cos],
            [(sigma_x**2 - sigma_y**2) * sin * cos, sigma_x**2 * sin**2 + sigma_y**2 * cos**2],
        ]
    )


def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    axis = np.arange(size) - (size - 1) / 2
    return np.meshgrid(axis, axis, indexing="xy")  # x along columns, y along rows


def reference_quadratic(size: int, sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    x, y = grid(size)
    points = np.stack([x, y], axis=-1)
    return np.einsum(
        "...i,ij,...j->...", points, np.linalg.inv(reference_covariance(sigma_x, sigma_y, theta)), points
    )


ANISOTROPIC = [(1.0, 1.0, 0.0), (2.5, 0.7, 0.6), (0.8, 2.0, -2.1), (3.0, 1.2, math.pi / 2)]


# --------------------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("sigma_x", "sigma_y", "theta"), ANISOTROPIC)
def test_gaussian_is_the_normalised_bivariate_normal_density(sigma_x, sigma_y, theta):
    x, y = grid(21)
    density = scipy.stats.multivariate_normal(mean=[0, 0], cov=reference_covariance(sigma_x, sigma_y, theta))
    expected = density.pdf(np.stack([x, y], axis=-1))
    ours = K.gaussian(21, sigma_x, sigma_y, theta).numpy()
    np.testing.assert_allclose(ours, expected / expected.sum(), rtol=1e-9, atol=1e-15)
    assert ours.sum() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize(
    ("sigma_x", "sigma_y", "theta"), [(1.5, 1.0, 0.4), (2.0, 1.2, -1.0), (1.3, 2.2, 2.5)]
)
def test_gaussian_second_moments_are_the_covariance(sigma_x, sigma_y, theta):
    # A sampled Gaussian wide enough for its support keeps the continuous moments (Poisson summation).
    x, y = grid(41)
    kernel = K.gaussian(41, sigma_x, sigma_y, theta).numpy()
    moments = np.array([[(kernel * a * b).sum() for b in (x, y)] for a in (x, y)])
    np.testing.assert_allclose(moments, reference_covariance(sigma_x, sigma_y, theta), atol=1e-6)
    assert (kernel * x).sum() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(("sigma_x", "sigma_y", "theta"), ANISOTROPIC)
@pytest.mark.parametrize("beta", [0.5, 1.0, 2.7])
def test_generalized_gaussian_and_plateau_match_their_formulas(sigma_x, sigma_y, theta, beta):
    q = reference_quadratic(15, sigma_x, sigma_y, theta)
    generalized = np.exp(-0.5 * q**beta)
    plateau = 1.0 / (1.0 + q**beta)
    np.testing.assert_allclose(
        K.generalized_gaussian(15, sigma_x, sigma_y, theta, beta).numpy(),
        generalized / generalized.sum(),
        rtol=1e-9,
    )
    np.testing.assert_allclose(
        K.plateau(15, sigma_x, sigma_y, theta, beta).numpy(), plateau / plateau.sum(), rtol=1e-9
    )
    if beta == 1.0:
        np.testing.assert_allclose(
            K.generalized_gaussian(15, sigma_x, sigma_y, theta, 1.0), K.gaussian(15, sigma_x, sigma_y, theta)
        )


@pytest.mark.parametrize(("size", "cutoff"), [(7, math.pi / 3), (13, 2.0), (21, math.pi / 5), (21, math.pi)])
def test_sinc_is_the_circular_lowpass_formula(size, cutoff):
    x, y = grid(size)
    radius = np.hypot(x, y)
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = cutoff * scipy.special.j1(cutoff * radius) / (2 * np.pi * radius)
    expected[radius == 0] = cutoff**2 / (4 * np.pi)  # the limit of the formula at r = 0
    np.testing.assert_allclose(K.circular_lowpass(size, cutoff).numpy(), expected / expected.sum(), rtol=1e-9)


def test_bessel_j1_matches_scipy():
    z = torch.linspace(0.0, 80.0, 4001, dtype=torch.float64)
    np.testing.assert_allclose(K.bessel_j1(z).numpy(), scipy.special.j1(z.numpy()), rtol=0, atol=1e-14)


def test_bsrgan_kernels():
    # anisotropic_Gaussian(l1, l2, θ): eigenvalues l1, l2 of the covariance, the first along θ
    kernel = K.gaussian(41, math.sqrt(5.0), math.sqrt(1.5), 0.7).numpy()
    x, y = grid(41)
    moments = np.array([[(kernel * a * b).sum() for b in (x, y)] for a in (x, y)])
    values, vectors = np.linalg.eigh(moments)
    np.testing.assert_allclose(values, [1.5, 5.0], atol=1e-6)
    assert abs(vectors[:, 1] @ [math.cos(0.7), math.sin(0.7)]) == pytest.approx(1.0, abs=1e-9)
    shifted = K.shifted_gaussian(25, 1.1, 1.5).numpy()
    x, y = grid(25)
    assert (shifted * x).sum() == pytest.approx(1.5, abs=1e-6) and (shifted * y).sum() == pytest.approx(
        1.5, abs=1e-6
    )
    matlab = K.matlab_gaussian(9, 1.3).numpy()
    np.testing.assert_allclose(matlab, K.gaussian(9, 1.3, 1.3).numpy(), atol=1e-15)


# --------------------------------------------------------------------------------------------------------------------
# Image operations
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("height", "width", "size"), [(40, 33, 21), (9, 6, 21), (5, 12, 7), (1, 8, 3)])
def test_filter2d_is_scipy_mirror_correlation(height, width, size):
    image = torch.rand(1, 3, height, width, dtype=torch.float64)
    kernel = K.gaussian(size, 2.0, 0.8, 0.3)
    ours = ops.filter2d(image, kernel)[0].numpy()
    for channel in range(3):
        expected = scipy.ndimage.correlate(image[0, channel].numpy(), kernel.numpy(), mode="mirror")
        np.testing.assert_allclose(ours[channel], expected, atol=1e-12)


@pytest.mark.parametrize(
    ("height", "width", "size", "step"), [(40, 33, 21, 4), (9, 6, 21, 2), (30, 31, 25, 3)]
)
def test_filter2d_with_a_step_is_every_step_th_pixel_of_scipy_mirror_correlation(height, width, size, step):
    image = torch.rand(1, 3, height, width, dtype=torch.float64)
    kernel = K.shifted_gaussian(size, 1.7, 1.5)
    ours = ops.filter2d(image, kernel, step=step)[0].numpy()
    for channel in range(3):
        expected = scipy.ndimage.correlate(image[0, channel].numpy(), kernel.numpy(), mode="mirror")
        np.testing.assert_allclose(ours[channel], expected[::step, ::step], atol=1e-12)
    assert torch.equal(
        ops.filter2d(image, kernel, step=step), ops.filter2d(image, kernel)[..., ::step, ::step]
    )


@pytest.mark.parametrize("mode", ops.RESIZE_MODES)
def test_resize_gives_torch_interpolate_values_whatever_the_input_layout(mode):
    """ops.resize picks the faster memory layout per mode; the values must be those of F.interpolate on the plain
    contiguous image, bit for bit, or a pair's bytes would depend on the layout the previous step left."""
    generator = torch.Generator().manual_seed(7)
    for height, width, factor in ((97, 130, 1.37), (128, 128, 0.61), (64, 45, 0.3)):
        image = torch.rand(1, 3, height, width, generator=generator)
        corners = None if mode == "area" else False
        expected = F.interpolate(image, scale_factor=factor, mode=mode, align_corners=corners)
        for layout in (torch.contiguous_format, torch.channels_last):
            got = ops.resize(image.contiguous(memory_format=layout), mode, scale_factor=factor)
            assert torch.equal(got, expected)
        size = (height // 3 + 1, width // 2)
        expected = F.interpolate(image, size=size, mode=mode, align_corners=corners)
        assert torch.equal(
            ops.resize(image.contiguous(memory_format=torch.channels_last), mode, size=size), expected
        )


@pytest.mark.parametrize("quality", [30, 57, 95])
def test_jpeg_equals_pillow_round_trip(quality, photos):
    pixels = photos["astronaut"][100:260, 50:230]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    expected = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    image = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0).float() / 255.0
    ours = quantize(ops.jpeg(image, quality))[0].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(ours, expected)


def ramp_image() -> torch.Tensor:
    """(1, 3, 768, 768): every 8-bit value in every channel, so a Poisson image has 256 levels."""
    row = torch.arange(256, dtype=torch.float32) / 255.0
    tile = torch.stack([row.expand(256, 256), row.flip(0).expand(256, 256), row.expand(256, 256).T])
    return tile.repeat(1, 3, 3).unsqueeze(0)


@pytest.mark.parametrize("scale", [0.5, 1.5])
def test_poisson_noise_has_the_variance_the_scale_implies(scale):
    image = ramp_image()
    assert ops.poisson_levels(image) == 256.0
    noisy = ops.poisson_noise(image, scale, gray=False, generator=pair_generator(0, "poisson"))
    middle = (image > 0.3) & (image < 0.6)  # far from the clipping bounds
    measured = ((noisy - image)[middle] ** 2).mean().item()
    expected = (scale**2 * image[middle] / 256.0).mean().item()  # Var[s (P(v x) / v - x)] = s² x / v
    assert measured == pytest.approx(expected, rel=0.03)


def test_gray_poisson_noise_is_shared_by_the_channels_and_scaled_by_luma():
    image = ramp_image()
    noisy = ops.poisson_noise(image, 1.0, gray=True, generator=pair_generator(0, "gray"))
    noise = noisy - image
    middle = ((image > 0.3) & (image < 0.7)).all(dim=1, keepdim=True).expand_as(image)
    shared = noise[:, :1].expand_as(noise)
    assert torch.allclose(noise[middle], shared[middle], atol=1e-6)
    luma = (0.2989 * image[:, 0] + 0.587 * image[:, 1] + 0.114 * image[:, 2]).unsqueeze(1)
    levels = 2 ** math.ceil(math.log2(len(torch.unique((luma * 255).round()))))
    selected = middle[:, :1]
    expected = (((luma * 255).round() / 255)[selected] / levels).mean().item()
    assert (noise[:, :1][selected] ** 2).mean().item() == pytest.approx(expected, rel=0.03)


def test_gaussian_noise_has_its_sigma():
    image = torch.full((1, 3, 200, 200), 0.5)
    noise = ops.gaussian_noise(image, 12.0, gray=False, generator=pair_generator(0, "g")) - image
    assert noise.std().item() == pytest.approx(12.0 / 255.0, rel=0.02)
    gray = ops.gaussian_noise(image, 12.0, gray=True, generator=pair_generator(0, "g")) - image
    assert torch.equal(gray[:, 0], gray[:, 2])


# --------------------------------------------------------------------------------------------------------------------
# Parameter distributions over 10,000 draws (parameters only, no images)
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def realesrgan_records() -> list[dict]:
    generator = pair_generator(7, "realesrgan-statistics")
    config = realesrgan.RealESRGANConfig()
    return [realesrgan.draw_parameters(config, generator) for _ in range(DRAWS)]


@pytest.fixture(scope="module")
def bsrgan_records() -> list[dict]:
    generator = pair_generator(7, "bsrgan-statistics")
    config = bsrgan.BSRGANConfig()
    return [bsrgan.draw_parameters(config, generator) for _ in range(DRAWS)]


def assert_frequencies(values: list, expected: dict, points: float = 0.02) -> None:
    counts = Counter(values)
    assert set(counts) <= set(expected), f"unexpected values {set(counts) - set(expected)}"
    for value, probability in expected.items():
        assert counts[value] / len(values) == pytest.approx(probability, abs=points), value


def assert_uniform(values: list[float], low: float, high: float) -> None:
    """In [low, high] and not distinguishable from U[low, high] (Kolmogorov-Smirnov)."""
    array = np.asarray(values, dtype=np.float64)
    assert array.min() >= low and array.max() <= high
    assert scipy.stats.kstest(array, "uniform", args=(low, high - low)).pvalue > 1e-4


@pytest.mark.parametrize("round_", ["first", "second"])
def test_realesrgan_kernel_types_sizes_and_ranges(realesrgan_records, round_):
    config = realesrgan.RealESRGANConfig()
    sigma = config.blur_sigma if round_ == "first" else config.blur_sigma2
    kernels = [r["first"]["blur"] for r in realesrgan_records]
    if round_ == "second":
        assert_frequencies(
            [r["second"]["blur"] is not None for r in realesrgan_records], {True: 0.8, False: 0.2}
        )
        kernels = [r["second"]["blur"] for r in realesrgan_records if r["second"]["blur"] is not None]
    expected = {kind: 0.9 * p for kind, p in zip(config.kernel_list, config.kernel_prob, strict=True)}
    assert_frequencies([k["type"] for k in kernels], {**expected, "sinc": 0.1})
    assert_frequencies([k["size"] for k in kernels], {size: 1 / 8 for size in range(7, 22, 2)})
    gaussians = [k for k in kernels if k["type"] != "sinc"]
    assert_uniform([k["sigma_x"] for k in gaussians], *sigma)
    anisotropic = [k for k in gaussians if k["type"].endswith("aniso")]
    assert_uniform([k["sigma_y"] for k in anisotropic], *sigma)
    assert_uniform([k["theta"] for k in anisotropic], -math.pi, math.pi)
    assert all(
        k["sigma_y"] == k["sigma_x"] and k["theta"] == 0 for k in gaussians if not k["type"].endswith("aniso")
    )
    generalized = [k["beta"] for k in gaussians if k["type"].startswith("generalized")]
    assert_uniform([b for b in generalized if b < 1], config.betag_range[0], 1.0)
    assert_uniform([b for b in generalized if b >= 1], 1.0, config.betag_range[1])
    plateau = [k["beta"] for k in gaussians if k["type"].startswith("plateau")]
    assert (
        min(plateau) >= 1.0 and max(plateau) <= 2.0
    )  # U[1, 1) half the time (the reference's own quirk), else U[1, 2)
    sincs = [k for k in kernels if k["type"] == "sinc"]
    assert_uniform([k["omega_c"] for k in sincs if k["size"] < 13], math.pi / 3, math.pi)
    assert_uniform([k["omega_c"] for k in sincs if k["size"] >= 13], math.pi / 5, math.pi)


def test_realesrgan_resize_noise_jpeg_and_final_draws(realesrgan_records):
    config = realesrgan.RealESRGANConfig()
    for round_, weights, scales, sigma, poisson in (
        ("first", config.resize_prob, config.resize_range, config.noise_range, config.poisson_scale_range),
        (
            "second",
            config.resize_prob2,
            config.resize_range2,
            config.noise_range2,
            config.poisson_scale_range2,
        ),
    ):
        resizes = [r[round_]["resize"] for r in realesrgan_records]
        assert_frequencies(
            [z["direction"] for z in resizes], dict(zip(("up", "down", "keep"), weights, strict=True))
        )
        assert_frequencies(
            [z["mode"] for z in resizes], {mode: 1 / 3 for mode in ("area", "bilinear", "bicubic")}
        )
        assert_uniform([z["scale"] for z in resizes if z["direction"] == "up"], 1.0, scales[1])
        assert_uniform([z["scale"] for z in resizes if z["direction"] == "down"], scales[0], 1.0)
        noises = [r[round_]["noise"] for r in realesrgan_records]
        assert_frequencies([n["kind"] for n in noises], {"gaussian": 0.5, "poisson": 0.5})
        assert_frequencies([n["gray"] for n in noises], {True: 0.4, False: 0.6})
        assert_uniform([n["sigma"] for n in noises if n["kind"] == "gaussian"], *sigma)
        assert_uniform([n["scale"] for n in noises if n["kind"] == "poisson"], *poisson)
    for qualities in ([r["first"]["jpeg_quality"] for r in realesrgan_records],
                      [r["final"]["jpeg_quality"] for r in realesrgan_records]):  # fmt: skip
        assert_frequencies(qualities, {q: 1 / 66 for q in range(30, 96)}, points=0.01)
    finals = [r["final"] for r in realesrgan_records]
    assert_frequencies(
        [f["order"] for f in finals], {"jpeg_then_resize_sinc": 0.5, "resize_sinc_then_jpeg": 0.5}
    )
    assert_frequencies([f["sinc"] is not None for f in finals], {True: 0.8, False: 0.2})
    assert_uniform([f["sinc"]["omega_c"] for f in finals if f["sinc"]], math.pi / 3, math.pi)
    json.dumps(realesrgan_records[:100])  # JSON-able


def test_bsrgan_draws(bsrgan_records):
    assert_frequencies([r["halve"] is not None for r in bsrgan_records], {True: 0.25, False: 0.75})
    assert all(r["sf"] == (2 if r["halve"] else 4) for r in bsrgan_records)
    orders = [r["order"] for r in bsrgan_records]
    assert all(o.index("downsample2") < o.index("downsample3") for o in orders)
    assert_frequencies([o.index("noise") for o in orders], {i: 1 / 6 for i in range(6)})
    assert_frequencies([o.index("jpeg") < o.index("blur1") for o in orders], {True: 0.5, False: 0.5})
    steps = [r["steps"] for r in bsrgan_records]
    assert_frequencies([s["jpeg"]["quality"] is not None for s in steps], {True: 0.9, False: 0.1})
    assert_frequencies(
        [r["final"]["jpeg_quality"] for r in bsrgan_records], {q: 1 / 66 for q in range(30, 96)}, 0.01
    )
    assert_frequencies([s["noise"]["kind"] for s in steps], {"color": 0.4, "gray": 0.4, "correlated": 0.2})
    assert_frequencies([s["noise"]["level"] for s in steps], {level: 1 / 7 for level in range(2, 9)})
    blurs = [s[name] for s in steps for name in ("blur1", "blur2")]
    assert_frequencies([b["type"] for b in blurs], {"aniso": 0.5, "iso": 0.5})
    assert_frequencies([b["size"] for b in blurs], {size: 1 / 10 for size in range(7, 26, 2)})
    full = [(r["steps"], r["sf"]) for r in bsrgan_records if r["sf"] == 4]
    assert_uniform([s["blur1"]["sigma_x"] for s, _ in full if s["blur1"]["type"] == "iso"], 0.0, 2.8)
    assert_uniform([s["blur1"]["sigma_x"] ** 2 for s, _ in full if s["blur1"]["type"] == "aniso"], 0.0, 8.0)
    assert_uniform([s["blur1"]["theta"] for s, _ in full if s["blur1"]["type"] == "aniso"], 0.0, math.pi)
    downs = [s["downsample2"] for s, _ in full]
    assert_frequencies([d["method"] for d in downs], {"resize": 0.75, "blur_nearest": 0.25})
    assert_uniform([d["factor"] for d in downs if d["method"] == "resize"], 1.0, 8.0)
    assert_uniform([d["sigma"] for d in downs if d["method"] == "blur_nearest"], 0.1, 2.4)
    json.dumps(bsrgan_records[:100])


def test_bsrgan_correlated_noise_has_its_covariance():
    covariance = [[4e-4, 1e-4, 2e-4], [1e-4, 3e-4, 1e-4], [2e-4, 1e-4, 5e-4]]
    image = torch.full((1, 3, 300, 300), 0.5)
    record = {"kind": "correlated", "level": 8, "covariance": covariance}
    noise = bsrgan.add_noise(image, record, pair_generator(0, "correlated")) - image
    np.testing.assert_allclose(np.cov(noise[0].reshape(3, -1).numpy()), covariance, atol=1.5e-5)


# --------------------------------------------------------------------------------------------------------------------
# The degraders: shapes, per-pair reproducibility, options
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hr_batch(photos) -> torch.Tensor:
    """(8, 3, 128, 128) crops of the bundled photos in [0, 1]."""
    crops = []
    for index in range(8):
        photo = photos[("astronaut", "coffee", "chelsea", "rocket")[index % 4]]
        top, left = 40 + 17 * index, 60 + 23 * index
        crops.append(torch.from_numpy(photo[top : top + 128, left : left + 128].copy()).permute(2, 0, 1))
    return torch.stack(crops).float() / 255.0


@pytest.mark.parametrize("name", DEGRADER_NAMES)
def test_degraders_give_lr_at_hr_over_scale_and_json_records(name, hr_batch):
    degrader = get_degrader(name)
    keys = [f"pair-{index}" for index in range(8)]
    lr, records = degrader.degrade(hr_batch, [pair_generator(3, key) for key in keys])
    assert lr.shape == (8, 3, 32, 32) and lr.dtype == torch.float32
    assert lr.min() >= 0 and lr.max() <= 1
    assert len(records) == 8 and json.loads(json.dumps(records)) == records
    if name != "bicubic":
        assert torch.equal(lr, quantize(lr).float() / 255.0)  # already 8-bit


@pytest.mark.parametrize("name", ["realesrgan", "bsrgan"])
def test_a_pair_is_the_same_alone_and_in_a_batch_of_8(name, hr_batch):
    degrader = get_degrader(name)
    keys = [f"pair-{index}" for index in range(8)]
    batch, batch_records = degrader.degrade(hr_batch, [pair_generator(11, key) for key in keys])
    for index in (0, 5):
        alone, alone_records = degrader.degrade(
            hr_batch[index : index + 1], [pair_generator(11, keys[index])]
        )
        assert torch.equal(quantize(alone[0]), quantize(batch[index]))
        assert alone_records[0] == batch_records[index]
    reordered, _ = degrader.degrade(hr_batch.flip(0), [pair_generator(11, key) for key in reversed(keys)])
    assert torch.equal(quantize(reordered.flip(0)), quantize(batch))


@pytest.mark.parametrize("name", ["realesrgan", "bsrgan"])
def test_same_seed_same_bytes_other_seed_other_bytes(name, hr_batch):
    degrader = get_degrader(name)
    first, _ = degrader.degrade(hr_batch[:3], [pair_generator(5, f"k{i}") for i in range(3)])
    again, _ = degrader.degrade(hr_batch[:3], [pair_generator(5, f"k{i}") for i in range(3)])
    other, _ = degrader.degrade(hr_batch[:3], [pair_generator(6, f"k{i}") for i in range(3)])
    assert torch.equal(quantize(first), quantize(again))
    assert not torch.equal(quantize(first), quantize(other))


def test_pair_generator_depends_on_seed_and_key():
    draw = lambda seed, key: torch.rand(4, generator=pair_generator(seed, key))  # noqa: E731
    assert torch.equal(draw(1, "a"), draw(1, "a"))
    assert not torch.equal(draw(1, "a"), draw(1, "b")) and not torch.equal(draw(1, "a"), draw(2, "a"))


REFERENCE_OPTIONS = """\
scale: 4
gt_usm: True
resize_prob: [0.2, 0.7, 0.1]
resize_range: [0.15, 1.5]
gaussian_noise_prob: 0.5
noise_range: [1, 30]
poisson_scale_range: [0.05, 3]
gray_noise_prob: 0.4
jpeg_range: [30, 95]
second_blur_prob: 0.8
resize_prob2: [0.3, 0.4, 0.3]
resize_range2: [0.3, 1.2]
gaussian_noise_prob2: 0.5
noise_range2: [1, 25]
poisson_scale_range2: [0.05, 2.5]
gray_noise_prob2: 0.4
jpeg_range2: [30, 95]
gt_size: 256
queue_size: 180
datasets:
  train:
    name: DF2K+OST
    type: RealESRGANDataset
    blur_kernel_size: 21
    kernel_list: ['iso', 'aniso', 'generalized_iso', 'generalized_aniso', 'plateau_iso', 'plateau_aniso']
    kernel_prob: [0.45, 0.25, 0.12, 0.03, 0.12, 0.03]
    sinc_prob: 0.1
    blur_sigma: [0.2, 3]
    betag_range: [0.5, 4]
    betap_range: [1, 2]
    blur_kernel_size2: 21
    kernel_list2: ['iso', 'aniso', 'generalized_iso', 'generalized_aniso', 'plateau_iso', 'plateau_aniso']
    kernel_prob2: [0.45, 0.25, 0.12, 0.03, 0.12, 0.03]
    sinc_prob2: 0.1
    blur_sigma2: [0.2, 1.5]
    betag_range2: [0.5, 4]
    betap_range2: [1, 2]
    final_sinc_prob: 0.8
    gt_size: 256
network_g:
  type: RRDBNet
"""


def test_reference_option_file_gives_the_defaults(tmp_path, hr_batch):
    path = tmp_path / "train_realesrnet_x4plus.yml"
    path.write_text(REFERENCE_OPTIONS)
    degrader = get_degrader("realesrgan", realesrgan.load_options(path))
    assert degrader.config == realesrgan.RealESRGANConfig(gt_usm=True)
    lr, records = degrader.degrade(hr_batch[:1], [pair_generator(0, "usm")])
    assert lr.shape == (1, 3, 32, 32) and records[0]["gt_usm"] is True
    flat = tmp_path / "flat.yml"
    flat.write_text("jpeg_range2: [60, 95]\nsecond_blur_prob: 0.5\n")
    assert get_degrader("realesrgan", realesrgan.load_options(flat)).config.jpeg_range2 == (60, 95)
    flat.write_text("jpeg_rnage: [60, 95]\n")
    with pytest.raises(ConfigError, match="jpeg_rnage"):
        get_degrader("realesrgan", realesrgan.load_options(flat))
    with pytest.raises(ConfigError, match="known degraders"):
        get_degrader("esrgan")


def test_degrader_names_import_without_torch():
    code = "import sys, factory.degraders as d; assert 'torch' not in sys.modules; print(','.join(d.DEGRADER_NAMES))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "bicubic,realesrgan,bsrgan"


def test_uint8_hr_is_the_same_as_its_float(hr_batch):
    degrader = get_degrader("bsrgan")
    as_uint8 = quantize(hr_batch[:2])
    from_uint8, _ = degrader.degrade(as_uint8, [pair_generator(1, "u0"), pair_generator(1, "u1")])
    from_float, _ = degrader.degrade(
        as_uint8.float() / 255.0, [pair_generator(1, "u0"), pair_generator(1, "u1")]
    )
    assert torch.equal(from_uint8, from_float)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["realesrgan", "bsrgan"])
def test_on_cuda_records_match_the_cpu_and_pairs_are_independent_of_the_batch(name, hr_batch):
    degrader, hr = get_degrader(name), hr_batch.cuda()
    keys = [f"pair-{index}" for index in range(8)]
    batch, records = degrader.degrade(hr, [pair_generator(11, key) for key in keys])
    alone, _ = degrader.degrade(hr[3:4], [pair_generator(11, keys[3])])
    assert batch.device.type == "cuda" and torch.equal(quantize(alone[0]), quantize(batch[3]))
    on_cpu, cpu_records = degrader.degrade(hr_batch, [pair_generator(11, key) for key in keys])
    assert records == cpu_records  # parameters and noise come from the same CPU generators
    assert (batch.cpu() - on_cpu).abs().mean() < 2 / 255  # the devices' FFTs and resizes round differently
