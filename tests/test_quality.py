"""The checkerboard index (factory.quality): it must flag the periodic pattern of an undertrained stride-2
transposed-convolution decoder and nothing else. References: the pattern's definition (Odena et al., Distill 2016:
period-2 and period-4 grids from stride-2 upsampling) built synthetically here, over scikit-image's bundled photos."""

from __future__ import annotations

import pytest
import torch

from factory.color import downsample, gaussian_blur, quantize
from factory.quality import CHECKERBOARD_THRESHOLD, checkerboard_index

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def photo_crop(photos, name: str, size: int) -> torch.Tensor:
    """A (1, 3, size, size) crop in [0, 1]: the photo's top-left 256 square, downsampled to `size` as a build's LR."""
    x = torch.tensor(photos[name][:256, :256]).permute(2, 0, 1)[None].float() / 255
    return downsample(x, 256 // size) if size < 256 else x


def grid(size: int, period: int, amplitude: float) -> torch.Tensor:
    """A +-amplitude pattern repeating every `period` pixels along both axes (period 2: the (pi, pi) checkerboard)."""
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    cell = period // 2
    return (((rows // cell + cols // cell) % 2) * 2 - 1).float() * amplitude


def stored(x: torch.Tensor) -> torch.Tensor:
    return quantize(x)  # uint8, as the build stores both images


@pytest.mark.parametrize("size", [64, 256])
@pytest.mark.parametrize("name", PHOTOS)
def test_clean_blurred_and_noisy_photos_stay_below_the_threshold(photos, name, size):
    x = photo_crop(photos, name, size)
    assert float(checkerboard_index(stored(x), stored(x))) == pytest.approx(1.0)
    blurred = gaussian_blur(x, 1.5)
    noisy = x + 0.03 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    for degraded in (blurred, noisy):
        assert float(checkerboard_index(stored(degraded), stored(x))) < CHECKERBOARD_THRESHOLD


@pytest.mark.parametrize("size", [64, 256])
@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize("period", [2, 4])
def test_a_checkerboard_over_a_photo_is_flagged(photos, name, size, period):
    x = photo_crop(photos, name, size)
    pattern = grid(
        size, period, 8 / 255
    )  # +-8 grey levels, the strength of the pattern we measured on our builds
    assert float(checkerboard_index(stored(x + pattern), stored(x))) > CHECKERBOARD_THRESHOLD
    # Over a blurred photo too: blur lowers the photo's own high frequencies, the pattern stands out more.
    blurred = gaussian_blur(x, 1.5)
    assert float(checkerboard_index(stored(blurred + pattern), stored(x))) > CHECKERBOARD_THRESHOLD


def test_index_is_per_image_and_rejects_bad_shapes(photos):
    x = torch.cat([photo_crop(photos, name, 64) for name in PHOTOS[:2]])
    degraded = x.clone()
    degraded[1] += grid(64, 2, 8 / 255)
    index = checkerboard_index(stored(degraded), stored(x))
    assert index.shape == (2,) and index[0] == pytest.approx(1.0) and index[1] > CHECKERBOARD_THRESHOLD
    with pytest.raises(ValueError, match="shapes differ"):
        checkerboard_index(x, x[:, :, :32])
    with pytest.raises(ValueError, match="at least 16x16"):
        checkerboard_index(x[..., :8, :8], x[..., :8, :8])
