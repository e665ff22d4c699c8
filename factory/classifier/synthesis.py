"""The classifier's training set: a Tiny-ImageNet-C-like corrupted set, synthesised from any image folder.

The paper uses a ResNet-152 trained on Tiny-ImageNet-C (15 corruption classes, 2,000 images each). We synthesise the
same kind of set: random square crops (side drawn between the input size and 4x it, bicubic-resized to the input
size: Tiny-ImageNet images are whole, downscaled photos), one of the 15 corruptions at a severity drawn uniformly
from 1-5 (factory.corruptions, the published 64x64 parameters), then a JPEG quality-85 round trip, because every
Tiny-ImageNet-C file was stored that way (make_tinyimagenet_c.py).
"""

from __future__ import annotations

import io
import logging
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from factory.color import bicubic_resize
from factory.config import FactoryError
from factory.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from factory.sources import RejectedImage, find_images, load_rgb

logger = logging.getLogger(__name__)

STORAGE_JPEG_QUALITY = (
    85  # Tiny-ImageNet-C's files are JPEG quality 85 (make_tinyimagenet_c.py, `save(..., quality=85)`)
)
MAX_CROP_ZOOM = 4  # crops span 1x to 4x the input size before resizing


@dataclass(frozen=True)
class CorruptedSet:
    images: np.ndarray  # (N, size, size, 3) uint8
    labels: np.ndarray  # (N,) int64, index into CORRUPTIONS
    severities: np.ndarray  # (N,) int64 in 1..5


def random_zoomed_crop(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random square crop of side in [size, min(H, W, 4 * size)] (log-uniform), bicubic-resized (the project's
    bicubic) to size x size. image: (H, W, 3) uint8 with both sides >= size -> (size, size, 3) uint8."""
    height, width = image.shape[:2]
    largest = min(height, width, MAX_CROP_ZOOM * size)
    side = int(round(math.exp(rng.uniform(math.log(size), math.log(largest))))) if largest > size else size
    top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
    crop = image[top : top + side, left : left + side]
    if side == size:
        return np.ascontiguousarray(crop)
    tensor = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)[None].float() / 255
    resized = bicubic_resize(tensor, (size, size))[0].permute(1, 2, 0).numpy()
    return np.clip(np.rint(resized * 255), 0, 255).astype(np.uint8)


def jpeg_round_trip(image: np.ndarray, quality: int) -> np.ndarray:
    """(H, W, 3) uint8 -> the same after saving as JPEG at `quality` (Pillow) and decoding."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB"))


def synthesise(
    sources: list[np.ndarray],
    per_class: int,
    size: int = 64,
    seed: int = 0,
    storage_jpeg_quality: int | None = STORAGE_JPEG_QUALITY,
    progress: bool = False,
) -> CorruptedSet:
    """`per_class` images for each of the 15 classes: a random crop of a random source, the class's corruption at a
    uniformly drawn severity, then (as Tiny-ImageNet-C) a JPEG round trip. sources: (H, W, 3) uint8 images with both
    sides >= size. Deterministic for `seed`."""
    usable = [image for image in sources if min(image.shape[:2]) >= size]
    if not usable:
        raise FactoryError(f"no source image is at least {size}x{size} pixels")
    rng = np.random.default_rng(seed)
    total = per_class * len(CORRUPTIONS)
    images = np.empty((total, size, size, 3), np.uint8)
    labels = np.repeat(np.arange(len(CORRUPTIONS)), per_class)
    severities = rng.integers(SEVERITIES[0], SEVERITIES[-1] + 1, size=total)
    for index in tqdm(range(total), desc="synthesising", disable=not progress, unit="image"):
        crop = random_zoomed_crop(usable[int(rng.integers(len(usable)))], size, rng)
        corrupted = corrupt(
            crop, CORRUPTIONS[labels[index]], int(severities[index]), seed=int(rng.integers(2**63))
        )
        images[index] = (
            corrupted if storage_jpeg_quality is None else jpeg_round_trip(corrupted, storage_jpeg_quality)
        )
    return CorruptedSet(images=images, labels=labels, severities=severities)


def load_sources(folder: str | os.PathLike, size: int) -> list[np.ndarray]:
    """Every decodable image under `folder` with both sides >= size (others are skipped with a warning)."""
    sources = []
    for path in find_images(folder):
        try:
            image = load_rgb(path)
        except RejectedImage as error:
            logger.warning("skipping %s: %s", path, error)
            continue
        if min(image.shape[:2]) < size:
            logger.warning("skipping %s: smaller than %dx%d", path, size, size)
            continue
        sources.append(image)
    if not sources:
        raise FactoryError(f"no usable image of at least {size}x{size} pixels under {folder}")
    return sources
