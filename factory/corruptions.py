"""The 15 corruptions of Tiny-ImageNet-C (Hendrycks & Dietterich 2019), the degradation classes of the paper's
diversity analysis (Section 4.3.1).

    from factory.corruptions import CORRUPTIONS, corrupt
    y = corrupt(x, "motion_blur", severity=3, seed=7)   # x, y: (H, W, 3) uint8

Parameters. Every severity table below is the 64x64 Tiny-ImageNet-C one, read from the authors' generator
hendrycks/robustness, file ImageNet-C/create_c/make_tinyimagenet_c.py (commit 7a64e6a); they differ from the
224x224 ImageNet-C tables in make_imagenet_c.py. The code is ours: that script needs OpenCV, ImageMagick (Wand) and
NumPy < 2, and the `imagecorruptions` package is broken on NumPy 2 / scikit-image 0.26 (FACTS.md). Where the
reference calls a library we do not have we reimplement the operation (OpenCV's filter2D / GaussianBlur /
warpAffine, ImageMagick's MotionBlurImage); each function says how.

Other sizes. The tables are for 64x64 images. At any other size the parameters keep their *pixel* meaning (noise
strength, blur radii, shuffle distance, elastic displacement and affine jitter in pixels, JPEG quality), so that a
64x64 tile of a corrupted large image looks like a corrupted Tiny-ImageNet-C image, which is what the classifier sees
when it labels a large image tile by tile. The exceptions are defined relative to the image by the reference itself:
zoom_blur (zoom factors about the image centre: tiles far from the centre get longer streaks), pixelate (a
resize factor), contrast (per-channel image means) and fog (a plasma fractal made at the next power of two >= the
larger side, so its blobs keep their 64x64 frequency only at 64x64).

Determinism. All randomness comes from one `numpy.random.Generator` seeded with `seed`; the global RNG is never
used, so the same (image, name, severity, seed) always gives the same bytes.

Output rounding. The reference writes its float result with `np.uint8(...)` (truncation) and then stores the
Tiny-ImageNet-C files as JPEG quality 85; `corrupt` rounds to nearest and stores nothing. The classifier's data
synthesis (factory/classifier/synthesis.py) adds the JPEG-85 storage step to match the published set.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import numpy as np
import scipy.ndimage as ndimage
import skimage.color
import skimage.filters
import torch
import torch.nn.functional as F
from PIL import Image

from factory.corruption_names import CORRUPTIONS  # re-exported: the API names them here

SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
MINIMUM_SIDE = 8  # smaller images leave glass_blur nothing to shuffle and pixelate nothing to average

# ---------------------------------------------------------------------------------------------------------------
# Severity tables, index = severity - 1. Source for all of them: hendrycks/robustness,
# ImageNet-C/create_c/make_tinyimagenet_c.py (the 64x64 Tiny-ImageNet-C generator), the `c = [...]` line of the
# function of the same name.
# ---------------------------------------------------------------------------------------------------------------
GAUSSIAN_NOISE_SIGMA = (0.04, 0.08, 0.12, 0.15, 0.18)  # std of additive noise on [0, 1] pixels
SHOT_NOISE_PHOTONS = (250, 100, 50, 30, 15)  # Poisson rate per unit intensity (fewer photons = noisier)
IMPULSE_NOISE_AMOUNT = (0.01, 0.02, 0.05, 0.08, 0.14)  # fraction of samples set to 0 or 1 (salt and pepper)
DEFOCUS_BLUR = ((0.5, 0.6), (1, 0.1), (1.5, 0.1), (2.5, 0.01), (3, 0.1))  # (disk radius px, anti-alias sigma)
# (sigma, max shift px, passes)
GLASS_BLUR = ((0.1, 1, 1), (0.5, 1, 1), (0.6, 1, 2), (0.7, 2, 1), (0.9, 2, 2))
MOTION_BLUR = ((10, 1), (10, 1.5), (10, 2), (10, 2.5), (12, 3))  # ImageMagick (radius, sigma), px
ZOOM_BLUR_MAX = (1.06, 1.11, 1.16, 1.21, 1.26)  # zoom factors 1, 1.01, ... below this bound are averaged
SNOW = (  # (mean, std, zoom, threshold, blur radius, blur sigma, image weight)
    (0.1, 0.2, 1, 0.6, 8, 3, 0.8),
    (0.1, 0.2, 1, 0.5, 10, 4, 0.8),
    (0.15, 0.3, 1.75, 0.55, 10, 4, 0.7),
    (0.25, 0.3, 2.25, 0.6, 12, 6, 0.65),
    (0.3, 0.3, 1.25, 0.65, 14, 12, 0.6),
)
FROST = ((1, 0.3), (0.9, 0.4), (0.8, 0.45), (0.75, 0.5), (0.7, 0.55))  # (image weight, frost weight)
FOG = ((0.4, 3), (0.7, 3), (1, 2.5), (1.5, 2), (2, 1.75))  # (fog strength, plasma fractal decay)
BRIGHTNESS = (0.1, 0.2, 0.3, 0.4, 0.5)  # added to HSV value
CONTRAST = (0.4, 0.3, 0.2, 0.1, 0.05)  # factor on the deviation from the per-channel mean
_IMSIZE = 64  # the reference writes the elastic parameters as multiples of the 64-pixel image size
ELASTIC = (  # (displacement scale px, displacement smoothing sigma px, affine jitter px)
    (_IMSIZE * 0, _IMSIZE * 0, _IMSIZE * 0.08),
    (_IMSIZE * 0.05, _IMSIZE * 0.3, _IMSIZE * 0.06),
    (_IMSIZE * 0.1, _IMSIZE * 0.08, _IMSIZE * 0.06),
    (_IMSIZE * 0.1, _IMSIZE * 0.03, _IMSIZE * 0.03),
    (_IMSIZE * 0.16, _IMSIZE * 0.03, _IMSIZE * 0.02),
)
PIXELATE = (0.9, 0.8, 0.7, 0.6, 0.5)  # box-downsampling factor before box-upsampling back
JPEG_QUALITY = (65, 58, 50, 40, 25)  # Pillow JPEG quality

Image01 = np.ndarray  # (H, W, 3) float64 in [0, 1]


# --- helpers ----------------------------------------------------------------------------------------------------


def _gaussian_kernel_1d(size: int, sigma: float) -> np.ndarray:
    """OpenCV's getGaussianKernel(size, sigma) for sigma > 0: sampled exp(-d^2 / 2 sigma^2), normalised."""
    distance = np.arange(size) - (size - 1) / 2
    kernel = np.exp(-(distance**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def _disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """The reference's anti-aliased disk: a binary disk on a 17x17 grid (or (2r+1)^2 above r = 8), normalised, then
    a 3x3 (5x5 above r = 8) Gaussian of sigma `alias_blur` (OpenCV GaussianBlur). The all-zero border is trimmed;
    the kernel is symmetric, so its centre stays in the middle."""
    half = 8 if radius <= 8 else int(radius)
    grid = np.arange(-half, half + 1)
    x, y = np.meshgrid(grid, grid)
    disk = ((x**2 + y**2) <= radius**2).astype(np.float64)
    disk /= disk.sum()
    smoothing = _gaussian_kernel_1d(3 if radius <= 8 else 5, alias_blur)
    disk = ndimage.correlate1d(disk, smoothing, axis=0, mode="mirror")
    disk = ndimage.correlate1d(disk, smoothing, axis=1, mode="mirror")
    rows = np.flatnonzero(disk.sum(axis=1) > 1e-12)
    trim = min(rows[0], disk.shape[0] - 1 - rows[-1])
    return disk[trim : disk.shape[0] - trim, trim : disk.shape[1] - trim]


def _motion_blur(image: np.ndarray, radius: float, sigma: float, angle_degrees: float) -> np.ndarray:
    """ImageMagick's MotionBlurImage as a line-kernel convolution. image: (H, W, C) float.

    ImageMagick takes width = 2 * ceil(radius) + 1 taps with weights exp(-i^2 / 2 sigma^2), i = 0 .. width - 1
    (a one-sided half Gaussian), normalised, and tap i reads the pixel at offset (round(i cos a), round(i sin a))
    along the angle a; pixels outside the image repeat the edge (its default virtual-pixel method). We sum the
    shifted, edge-padded image with those weights: one vectorised slice per tap."""
    width = 2 * math.ceil(radius) + 1
    taps = np.arange(width)
    weights = np.exp(-(taps.astype(np.float64) ** 2) / (2 * sigma**2))
    weights /= weights.sum()
    angle = math.radians(angle_degrees)
    offsets_x = np.ceil(taps * math.cos(angle) - 0.5).astype(int)  # ImageMagick rounds with ceil(v - 0.5)
    offsets_y = np.ceil(taps * math.sin(angle) - 0.5).astype(int)
    height, width_pixels = image.shape[:2]
    pad = width
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    result = np.zeros_like(image, dtype=np.float64)
    for weight, offset_x, offset_y in zip(weights, offsets_x, offsets_y, strict=True):
        if weight < 1e-12:  # far taps of a small sigma contribute nothing
            continue
        top, left = pad + offset_y, pad + offset_x
        result += weight * padded[top : top + height, left : left + width_pixels]
    return result


def _clipped_zoom(image: np.ndarray, zoom: float) -> np.ndarray:
    """Zoom into the centre by `zoom` (bilinear, scipy.ndimage.zoom order 1 as in the reference) and cut back to the
    input size. image: (H, W, C)."""
    height, width = image.shape[:2]
    crop_height, crop_width = math.ceil(height / zoom), math.ceil(width / zoom)
    top, left = (height - crop_height) // 2, (width - crop_width) // 2
    zoomed = ndimage.zoom(image[top : top + crop_height, left : left + crop_width], (zoom, zoom, 1), order=1)
    trim_top, trim_left = (zoomed.shape[0] - height) // 2, (zoomed.shape[1] - width) // 2
    return zoomed[trim_top : trim_top + height, trim_left : trim_left + width]


def _plasma_fractal(size: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """A (size, size) diamond-square height map in [0, 1] (size a power of two), periodic like the reference's.

    Each pass halves the step: square step (cell centres = mean of 4 corners), then diamond step (edge midpoints =
    mean of their 2 corners and 2 centres), each plus uniform jitter. As in the reference the jitter of a pass is
    amplitude * U(-amplitude, amplitude) with amplitude 100 divided by `decay` per pass, so a larger decay gives a
    smoother fog."""
    height_map = np.zeros((size, size))
    step, amplitude = size, 100.0
    while step >= 2:
        half = step // 2
        corners = height_map[0::step, 0::step]
        square_sum = corners + np.roll(corners, -1, axis=0)
        square_sum = square_sum + np.roll(square_sum, -1, axis=1)
        height_map[half::step, half::step] = square_sum / 4 + amplitude * rng.uniform(
            -amplitude, amplitude, square_sum.shape
        )
        centres = height_map[half::step, half::step]
        # Midpoints of horizontal edges (rows 0::step, columns half::step): left/right corners, centres above/below.
        row_sum = corners + np.roll(corners, -1, axis=1) + centres + np.roll(centres, 1, axis=0)
        jitter = amplitude * rng.uniform(-amplitude, amplitude, row_sum.shape)
        height_map[0::step, half::step] = row_sum / 4 + jitter
        # Midpoints of vertical edges (rows half::step, columns 0::step): upper/lower corners, centres left/right.
        column_sum = corners + np.roll(corners, -1, axis=0) + centres + np.roll(centres, 1, axis=1)
        height_map[half::step, 0::step] = column_sum / 4 + amplitude * rng.uniform(
            -amplitude, amplitude, column_sum.shape
        )
        step = half
        amplitude /= decay
    height_map -= height_map.min()
    return height_map / height_map.max()


def _smooth_noise(height: int, width: int, cell: int, rng: np.random.Generator) -> np.ndarray:
    """Value noise: uniform random values on a grid of `cell`-pixel cells, bicubically interpolated to (H, W)."""
    grid_height, grid_width = height // cell + 2, width // cell + 2
    grid = torch.from_numpy(rng.random((1, 1, grid_height, grid_width)))
    upsampled = F.interpolate(grid, scale_factor=cell, mode="bicubic", align_corners=False)[0, 0].numpy()
    # A random phase, so that grid lines do not always sit on the same pixels.
    top, left = rng.integers(0, cell, size=2)
    return np.clip(upsampled[top : top + height, left : left + width], 0, 1)


def _frost_texture(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A procedural frost layer, (H, W, 3) in [0, 255], standing in for the reference's six frost photographs (not
    redistributable here; the reference resizes them by 0.3 and takes a random 64x64 crop).

    Ice on glass is a web of thin bright crystal filaments over a milky haze, cold white-blue. Filaments: ridged
    value noise, (1 - |2 n - 1|)^8 is bright only where a smooth random field n crosses its middle, which traces
    thin branching curves; four octaves (cells of 24, 12, 6 and 3 pixels, weights 1, 0.7, 0.5, 0.35) give crystals
    of several sizes. Haze: value noise with 32-pixel cells. The mix is scaled to a mean near 0.45 with filaments
    reaching 1, close to the brightness of the reference photographs, and tinted (0.82, 0.9, 1.0)."""
    filaments = np.zeros((height, width))
    for cell, weight in ((24, 1.0), (12, 0.7), (6, 0.5), (3, 0.35)):
        noise = _smooth_noise(height, width, cell, rng)
        filaments += weight * (1 - np.abs(2 * noise - 1)) ** 8
    filaments /= 1.0 + 0.7 + 0.5 + 0.35
    filaments = np.clip(filaments / max(np.quantile(filaments, 0.995), 1e-6), 0, 1)
    haze = _smooth_noise(height, width, 32, rng)
    layer = np.clip(0.25 + 0.25 * haze + 0.6 * filaments, 0, 1)
    tint = np.array([0.82, 0.9, 1.0])
    return layer[..., None] * tint * 255.0


def _rgb_to_grey(image: Image01) -> np.ndarray:
    """OpenCV's COLOR_RGB2GRAY weights (ITU-R BT.601), as the reference uses for snow. (H, W, 3) -> (H, W)."""
    return image @ np.array([0.299, 0.587, 0.114])


# --- the corruptions: (H, W, 3) float in [0, 1] -> same, unclipped unless stated ---------------------------------


def _gaussian_noise(x: Image01, severity: int, rng: np.random.Generator) -> Image01:
    return x + rng.normal(scale=GAUSSIAN_NOISE_SIGMA[severity - 1], size=x.shape)


def _shot_noise(x: Image01, severity: int, rng: np.random.Generator) -> Image01:
    photons = SHOT_NOISE_PHOTONS[severity - 1]
    return rng.poisson(x * photons) / photons


def _impulse_noise(x: Image01, severity: int, rng: np.random.Generator) -> Image01:
    # skimage.util.random_noise(mode="s&p", amount=a): each sample (channels independently) is replaced with
    # probability a, by 1 or 0 with equal odds.
    replaced = rng.random(x.shape) < IMPULSE_NOISE_AMOUNT[severity - 1]
    salt = rng.random(x.shape) < 0.5
    return np.where(replaced, salt.astype(np.float64), x)


def _defocus_blur(x: Image01, severity: int, rng: np.random.Generator) -> Image01:
    radius, alias_blur = DEFOCUS_BLUR[severity - 1]
    kernel = _disk_kernel(radius, alias_blur)
    # OpenCV filter2D per channel with its default border (reflect-101 = scipy's "mirror").
    return ndimage.correlate(x, kernel[..., None], mode="mirror")


def _glass_blur(x: Image01, severity: int, rng: np.random.Generator) -> Image01:
    sigma, max_shift, passes = GLASS_BLUR[severity - 1]
    height, width = x.shape[:2]
    blurred = skimage.filters.gaussian(x, sigma=sigma, channel_axis=-1)
    # The reference means to swap each pixel (scanned bottom-right to top-left, inside a `max_shift` margin) with
    # one at a random offset in [-max_shift, max_shift), but its `a[p], a[q] = a[q], a[p]` on NumPy views copies
    # instead: pixel p takes q's *current* value and q keeps it. That is the operation that made Tiny-ImageNet-C, so
    # we reproduce it: a sequential gather (a later pixel may read one already overwritten), run on an array of
    # source indices (plain integers, cheap) with all offsets drawn at once; one gather moves the pixels at the end.
    rows = np.arange(height - max_shift, max_shift, -1)
    columns = np.arange(width - max_shift, max_shift, -1)
    positions = (rows[:, None] * width + columns[None, :]).ravel()
    source = list(range(height * width))
    for _ in range(passes):
        # (dx, dy), as in the reference.
        offsets = rng.integers(-max_shift, max_shift, size=(positions.size, 2))
        partners = positions + offsets[:, 1] * width + offsets[:, 0]
        for here, there in zip(positions.tolist(), partners.tolist(), strict=True):
            source[here] = source[there]
    shuffled = blurred.reshape(height * width, -1)[np.asarray(source)].reshape(x.shape)
    return skimage.filters.gaussian(shuffled, sigma=sigma, channel_axis=-1)


def _motion_blur_corruption(x: Image01, severity: int, rng: np.random.Generator) -> Image01:
    radius, sigma = MOTION_BLUR[severity - 1]
    return _motion_blur(x, radius, sigma, rng.uniform(-45, 45))


def _zoom_blur(x: Image01, severity: int, rng: np.random.Generator) -> Image01:
    # np.arange(1, bound, 0.01) in the reference; integer steps avoid float drift in the count.
    zooms = 1 + np.arange(round((ZOOM_BLUR_MAX[severity - 1] - 1) / 0.01)) / 100
    total = x.copy()
    for zoom in zooms:
        total += _clipped_zoom(x, zoom)
    return total / (len(zooms) + 1)


def _snow(x: Image01, severity: int, rng: np.random.Generator) -> Image01:
    mean, std, zoom, threshold, blur_radius, blur_sigma, image_weight = SNOW[severity - 1]
    height, width = x.shape[:2]
    flakes = rng.normal(loc=mean, scale=std, size=(height, width, 1))
    flakes = _clipped_zoom(flakes, zoom)
    flakes[flakes < threshold] = 0
    # The reference passes the layer through an 8-bit PNG.
    flakes = np.round(np.clip(flakes, 0, 1) * 255) / 255
    flakes = _motion_blur(flakes, blur_radius, blur_sigma, rng.uniform(-135, -45))
    whitened = np.maximum(x, _rgb_to_grey(x)[..., None] * 1.5 + 0.5)
    x = image_weight * x + (1 - image_weight) * whitened
    return x + flakes + np.rot90(flakes, k=2)


def _frost(x: Image01, severity: int, rng: np.random.Generator) -> Image01:
    image_weight, frost_weight = FROST[severity - 1]
    frost = _frost_texture(x.shape[0], x.shape[1], rng)
    return (image_weight * x * 255 + frost_weight * frost) / 255


def _fog(x: Image01, severity: int, rng: np.random.Generator) -> Image01:
    strength, decay = FOG[severity - 1]
    height, width = x.shape[:2]
    size = 1 << max(6, math.ceil(math.log2(max(height, width))))  # the reference's 64 at 64x64
    peak = x.max()
    fog = _plasma_fractal(size, decay, rng)[:height, :width, None]
    return (x + strength * fog) * peak / (peak + strength)


def _brightness(x: Image01, severity: int, rng: np.random.Generator) -> Image01:
    hsv = skimage.color.rgb2hsv(x)
    hsv[..., 2] = np.clip(hsv[..., 2] + BRIGHTNESS[severity - 1], 0, 1)
    return skimage.color.hsv2rgb(hsv)


def _contrast(x: Image01, severity: int, rng: np.random.Generator) -> Image01:
    means = x.mean(axis=(0, 1), keepdims=True)
    return (x - means) * CONTRAST[severity - 1] + means


def _elastic_transform(x: Image01, severity: int, rng: np.random.Generator) -> Image01:
    scale, smoothing, jitter = ELASTIC[severity - 1]
    height, width, channels = x.shape
    # 1. A random affine map: three points around the centre, each moved by U(-jitter, jitter) px. The reference
    #    fits it with cv2.getAffineTransform and applies it with cv2.warpAffine (bilinear, reflect-101 border),
    #    which samples the source at the inverse map of every output pixel.
    centre = np.array([width // 2, height // 2], dtype=np.float64)  # (x, y)
    half = min(height, width) // 3
    source_points = np.array([centre + half, [centre[0] + half, centre[1] - half], centre - half])
    target_points = source_points + rng.uniform(-jitter, jitter, size=source_points.shape)
    # forward: (2, 3), target = forward @ [x, y, 1].
    forward = np.linalg.solve(np.c_[source_points, np.ones(3)], target_points).T
    inverse = np.linalg.inv(np.vstack([forward, [0, 0, 1]]))
    grid_y, grid_x = np.mgrid[0:height, 0:width].astype(np.float64)
    source_x = inverse[0, 0] * grid_x + inverse[0, 1] * grid_y + inverse[0, 2]
    source_y = inverse[1, 0] * grid_x + inverse[1, 1] * grid_y + inverse[1, 2]
    x = _sample(x, source_y, source_x, mode="mirror")
    # 2. A smooth random displacement field: U(-1, 1) per pixel, Gaussian-smoothed (sigma `smoothing`, reflect,
    #    truncate 3, as skimage.filters.gaussian in the reference), times `scale` px; bilinear resampling, reflect.
    displacement_x, displacement_y = (
        ndimage.gaussian_filter(rng.uniform(-1, 1, (height, width)), smoothing, mode="reflect", truncate=3)
        for _ in range(2)
    )
    return _sample(x, grid_y + scale * displacement_y, grid_x + scale * displacement_x, mode="reflect")


def _sample(x: Image01, rows: np.ndarray, columns: np.ndarray, mode: str) -> Image01:
    """Bilinear resampling of every channel at (rows, columns), each (H, W): scipy.ndimage.map_coordinates order 1."""
    channels = x.shape[2]
    coordinates = np.stack(
        [
            np.broadcast_to(rows[..., None], x.shape),
            np.broadcast_to(columns[..., None], x.shape),
            np.broadcast_to(np.arange(channels, dtype=np.float64), x.shape),
        ]
    )
    return ndimage.map_coordinates(x, coordinates, order=1, mode=mode)


def _pixelate(x: Image01, severity: int, rng: np.random.Generator) -> Image01:
    factor = PIXELATE[severity - 1]
    height, width = x.shape[:2]
    image = Image.fromarray(_to_uint8(x))  # the reference pixelates the 8-bit PIL image
    small = image.resize((max(1, int(width * factor)), max(1, int(height * factor))), Image.Resampling.BOX)
    return np.asarray(small.resize((width, height), Image.Resampling.BOX), dtype=np.float64) / 255


def _jpeg_compression(x: Image01, severity: int, rng: np.random.Generator) -> Image01:
    buffer = io.BytesIO()
    Image.fromarray(_to_uint8(x)).save(buffer, format="JPEG", quality=JPEG_QUALITY[severity - 1])
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB"), dtype=np.float64) / 255


_FUNCTIONS: dict[str, Callable[[Image01, int, np.random.Generator], Image01]] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "defocus_blur": _defocus_blur,
    "glass_blur": _glass_blur,
    "motion_blur": _motion_blur_corruption,
    "zoom_blur": _zoom_blur,
    "snow": _snow,
    "frost": _frost,
    "fog": _fog,
    "brightness": _brightness,
    "contrast": _contrast,
    "elastic_transform": _elastic_transform,
    "pixelate": _pixelate,
    "jpeg_compression": _jpeg_compression,
}
assert tuple(_FUNCTIONS) == CORRUPTIONS  # one list of names, in the published order


def _to_uint8(x: Image01) -> np.ndarray:
    return np.clip(np.rint(x * 255), 0, 255).astype(np.uint8)


def corrupt(image: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """Apply corruption `name` at `severity` (1-5) to image: (H, W, 3) uint8 -> (H, W, 3) uint8.

    Deterministic for `seed`. Raises ValueError for an unknown name or severity, or a malformed or tiny image."""
    if name not in _FUNCTIONS:
        raise ValueError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    if min(image.shape[:2]) < MINIMUM_SIDE:
        raise ValueError(f"image sides must be at least {MINIMUM_SIDE} pixels, got {image.shape[:2]}")
    rng = np.random.default_rng(seed)
    result = _FUNCTIONS[name](image.astype(np.float64) / 255, severity, rng)
    return _to_uint8(result)
