"""Test helper for the stream / fine-tune / eval tests: bicubic (LR, HR) pairs written as shards + manifests in the
on-disk layout of `factory build`, from the photos scikit-image ships."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from manifest_fixtures import write_shard

from factory.color import downsample


def bicubic_lr(hr: np.ndarray, scale: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (H // scale, W // scale, 3) uint8 with the project's bicubic."""
    x = torch.from_numpy(hr).permute(2, 0, 1)[None].float() / 255
    return (downsample(x, scale)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def crops(photos: dict[str, np.ndarray], size: int, per_photo: int) -> list[tuple[str, np.ndarray]]:
    """Deterministic HR crops (key, (size, size, 3) uint8) from the photos: a grid, row by row."""
    result = []
    for name, photo in sorted(photos.items()):
        height, width = photo.shape[:2]
        tops = np.linspace(0, height - size, per_photo).astype(int)
        lefts = np.linspace(0, width - size, per_photo).astype(int)[::-1]
        for index, (top, left) in enumerate(zip(tops, lefts, strict=True)):
            result.append(
                (
                    f"{name.replace('_', '')}{index:03d}",
                    np.ascontiguousarray(photo[top : top + size, left : left + size]),
                )
            )
    return result


def write_pairs(
    shards_root: Path,
    manifests_root: Path,
    pairs: list[tuple[str, np.ndarray]],
    *,
    dataset: str = "bicubic",
    scale: int = 4,
    per_shard: int = 4,
    codec: str = "zst",
) -> list[Path]:
    """Shards <shards_root>/<dataset>/<dataset>-NNNNNN.tar and one manifest per shard; returns the shard paths.
    Rows get a `label` cycling over three classes and `delta_e` = index / 10, so predicates have something to pick."""
    paths = []
    for shard_index, start in enumerate(range(0, len(pairs), per_shard)):
        samples = []
        for index, (key, hr) in enumerate(pairs[start : start + per_shard], start):
            row = {
                "key": key,
                "dataset": dataset,
                "model": "bicubic",
                "source": f"{key}.png",
                "source_root": "test",
                "source_sha256": hashlib.sha256(hr.tobytes()).hexdigest(),
                "crop_top": 0,
                "crop_left": 0,
                "crop_height": hr.shape[0],
                "crop_width": hr.shape[1],
                "scale": scale,
                "delta_e": index / 10,
                "delta_e_p95": index / 5,
                "psnr": 100.0,
                "ssim": 1.0,
                "color_corrected": False,
                "seed": 0,
                "factory_version": "test",
                "label": ("gaussian_noise", "defocus_blur", "jpeg_compression")[index % 3],
            }
            samples.append((row, hr, bicubic_lr(hr, scale)))
        (row, *_) = write_shard(shards_root, manifests_root, dataset, shard_index, samples, codec)
        paths.append(shards_root / row["shard"])
    return paths
