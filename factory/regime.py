"""The regime of a reconstructor checkpoint: how far its reconstructions of LR images are from their input.

`factory train` measures it at every saved epoch, on held-out images cut to the LR size the build will use, and the
checkpoint stores it; the build copies it into the dataset card, `factory stats` shows it and `factory preview
--checkpoints` draws the reconstructions it summarises (the paper's Figure 3).

    images = regime_images(files, lr_size=256, scale=4)  # (N, 3, 256, 256) uint8, as the build makes its LR x
    regime = measure_regime(model, images)                # medians over the images: psnr, ssim, delta_e, ...

Figures (x = the LR input, x_deg = the model's reconstruction of it, both 8-bit as the build stores them):
- psnr, ssim: `factory.quality.image_quality` (skimage's definitions), the median over the images;
- delta_e: the paper's colour difference (mean CIEDE2000 per image, `factory.color.delta_e_uint8`), its median;
- checkerboard: `factory.quality.checkerboard_index`, its median (above CHECKERBOARD_THRESHOLD: a periodic pattern);
- delta_b: the mean of b*(x_deg) - b*(x) over all pixels (> 0: a yellow cast, < 0: blue);
- images: how many images were measured.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from factory.color import bicubic_resize, delta_e_uint8, quantize, rgb_to_lab
from factory.quality import checkerboard_index, image_quality
from factory.sources import load_rgb

REGIME_KEYS = ("psnr", "ssim", "delta_e", "checkerboard", "delta_b")


def lr_image(image: np.ndarray, lr_size: int, scale: int) -> torch.Tensor:
    """image: (H, W, 3) uint8 -> (3, lr_size, lr_size) uint8: the centre crop of side lr_size * scale, bicubic-
    downsampled by `scale` as the build makes x. An image smaller than that crop gives its largest centre square,
    resized to lr_size (a Tiny-ImageNet 64x64 image is then upscaled 4x, smoother than a build's LR)."""
    height, width = image.shape[:2]
    side = min(height, width, lr_size * scale)
    top, left = (height - side) // 2, (width - side) // 2
    crop = torch.tensor(
        image[top : top + side, left : left + side]
    )  # a copy: decoded arrays may be read-only
    x = crop.permute(2, 0, 1)[None].float() / 255
    return quantize(bicubic_resize(x, (lr_size, lr_size)))[0]


def regime_images(files: Sequence[str | os.PathLike], lr_size: int, scale: int = 4) -> torch.Tensor:
    """The LR images of `files` (see `lr_image`), (N, 3, lr_size, lr_size) uint8; unreadable files are skipped."""
    from factory.sources import RejectedImage

    images = []
    for path in files:
        try:
            images.append(lr_image(load_rgb(Path(path)), lr_size, scale))
        except RejectedImage:
            continue
    if not images:
        return torch.empty(0, 3, lr_size, lr_size, dtype=torch.uint8)
    return torch.stack(images)


@torch.no_grad()
def reconstruct_uint8(
    model: nn.Module,
    images: torch.Tensor,
    device: torch.device | str = "cpu",
    batch_size: int = 16,
    seed: int = 0,
) -> torch.Tensor:
    """images: (N, 3, h, w) uint8 -> the model's reconstructions, (N, 3, h, w) uint8, in eval mode (restored after).
    Models that sample draw from one generator seeded with `seed`, so a measurement is repeatable."""
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    outputs = []
    try:
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size].to(device).float() / 255
            outputs.append(quantize(model.reconstruct(x, generator=generator)).cpu())
    finally:
        model.train(was_training)
    return torch.cat(outputs) if outputs else images.clone()


def regime_of(reconstructed: torch.Tensor, images: torch.Tensor) -> dict[str, float]:
    """reconstructed, images: (N, 3, h, w) uint8 -> the regime figures (see the module docstring)."""
    psnr, ssim = image_quality(reconstructed, images)
    difference = delta_e_uint8(images, reconstructed)
    checkerboard = checkerboard_index(reconstructed, images)
    lab_in, lab_out = rgb_to_lab(images.double() / 255), rgb_to_lab(reconstructed.double() / 255)
    return {
        "psnr": round(float(psnr.median()), 4),
        "ssim": round(float(ssim.median()), 4),
        "delta_e": round(float(difference.mean.median()), 4),
        "checkerboard": round(float(checkerboard.median()), 4),
        "delta_b": round(float((lab_out[:, 2] - lab_in[:, 2]).mean()), 4),
        "images": len(images),
    }


def measure_regime(
    model: nn.Module, images: torch.Tensor, device: torch.device | str = "cpu", seed: int = 0
) -> dict[str, float]:
    """The regime figures of `model` on `images` ((N, 3, h, w) uint8, N >= 1)."""
    if len(images) == 0:
        raise ValueError("measure_regime needs at least one image")
    return regime_of(reconstruct_uint8(model, images, device, seed=seed), images)


def reconstructions_by_epoch(
    checkpoints: str | os.PathLike, model_name: str, images: torch.Tensor, device: str = "cpu", seed: int = 0
) -> list[tuple[int, dict, torch.Tensor]]:
    """The paper's Figure 3 material: for every saved epoch of `<checkpoints>/<model_name>/` in order, (epoch, its
    stored regime ({} if none), its reconstructions of `images` ((N, 3, h, w) uint8))."""
    from factory.checkpoints import load_reconstructor, saved_epochs
    from factory.config import FactoryError

    epochs = saved_epochs(checkpoints, model_name)
    if not epochs:
        raise FactoryError(
            f"no checkpoints under {Path(checkpoints) / model_name} (train them with `factory train --model "
            f"{model_name}`)"
        )
    columns = []
    for epoch, path in epochs.items():
        loaded = load_reconstructor(path, model_name=model_name, device=device)
        regime = dict(loaded.regime)
        columns.append((epoch, regime, reconstruct_uint8(loaded.model, images, device, seed=seed)))
    return columns
