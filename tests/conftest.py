"""Shared fixtures: small image folders made from the photos scikit-image ships (no downloads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# The colour photographs bundled with scikit-image (astronaut, coffee, chelsea, rocket, IHC, Hubble, retina).
SKIMAGE_COLOR_PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
)


def skimage_photo(name: str) -> np.ndarray:
    """One bundled photo as (H, W, 3) uint8."""
    import skimage.data

    loader = {
        "astronaut": skimage.data.astronaut,
        "coffee": skimage.data.coffee,
        "chelsea": skimage.data.chelsea,
        "rocket": skimage.data.rocket,
        "immunohistochemistry": skimage.data.immunohistochemistry,
        "hubble_deep_field": skimage.data.hubble_deep_field,
        "retina": skimage.data.retina,
    }[name]
    return np.ascontiguousarray(loader()[..., :3])


@pytest.fixture(autouse=True)
def _deterministic_torch():
    # Tests share two cores; one intra-op thread keeps timings stable and results reproducible.
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    """The bundled colour photos, by name, as (H, W, 3) uint8."""
    return {name: skimage_photo(name) for name in SKIMAGE_COLOR_PHOTOS}


@pytest.fixture
def photo_folder(tmp_path: Path, photos) -> Path:
    """A nested folder of the bundled colour photos (PNG and JPEG), like a small HR image set."""
    root = tmp_path / "photos"
    (root / "nested").mkdir(parents=True)
    for index, (name, image) in enumerate(photos.items()):
        target = root / ("nested" if index % 2 else "") / (f"{name}.png" if index % 3 else f"{name}.jpg")
        Image.fromarray(image).save(target, quality=95) if target.suffix == ".jpg" else Image.fromarray(
            image
        ).save(target)
    return root
