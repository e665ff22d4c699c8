"""Train a reconstructor from scratch and keep it undertrained: checkpoints at chosen epochs (Section 3.2).

    factory train --model vqvae2 --data tiny-imagenet-200/train --epochs 64 --save-at 4,8,16,32,64

Model-agnostic: the engine only calls the registry's `loss(x)`; the model's own config and training recipe
(`ModelSpec.recipe`, each model module's RECIPE with its sources) and its optimiser (`ModelSpec.configure_optimizer`)
decide everything else. `train` reads top to bottom: plan the run, resume, train each epoch, save.

An epoch is the paper's. The paper trains on "Tiny-ImageNet, which contained 45,000 images" (Section 3.2), so an
epoch is PAPER_EPOCH_SIZE = 45,000 samples whatever the folder holds, drawn as consecutive random permutations of its
files: "epoch 8" is 8 x 45,000 samples, ~2,800 steps at VQ-VAE-2's reference batch of 128, on any data. The batch
size, learning rate, optimiser and input pipeline are the model's reference recipe (for VQ-VAE-2: rosinality's
train_vqvae.py, batch 128, Adam 3e-4, Resize(256) + CenterCrop(256), so Tiny-ImageNet's 64x64 images are upscaled to
256). `epoch_size`, `batch_size`, `lr` and `image_size` override. A run that has to train says so first, in one
line: the steps, and a time estimate from a few timed steps.

Data. Every image under the given folders (Tiny-ImageNet's `train/<wnid>/images/*.JPEG`, or any flat or nested
folder) or given as a file, listed and decoded by `factory.sources`. Unreadable files are replaced by the next
readable one and counted in a warning; a folder with no readable image is a one-line error.

The regime. At every saved epoch the model reconstructs held-out images cut to the LR size the build will use
(`regime_size`, 256 = the paper's 1024 crops / 4; `factory.regime`), and the checkpoint stores PSNR, SSIM, ΔE, the
checkerboard index and the b* shift. The held-out images (up to `heldout`, one in ten of a folder of 10 or more) are
left out of training; a smaller folder is measured on its training images, and the checkpoint says which.

Determinism and resume. The model is initialised from `seed`; epoch e's file order, crops and flips come from
(seed, e, position) and its loss noise (VAE / DDIM noise, MAE masks) from torch's RNG seeded with (seed, e). So an
epoch does not depend on the worker count or on earlier epochs having run in this process, and a run restarted
after an interruption resumes from its newest saved checkpoint (weights and optimiser state) and produces, on CPU,
the same checkpoints as an uninterrupted run. A checkpoint belongs to the same run when model, config, training
data fingerprint, seed and the training settings that change the result (batch size, learning rate, epoch size,
image size, held-out split) all agree; a checkpoint folder holding another run's checkpoints is refused rather than
overwritten.

On CUDA the forward pass runs under bf16 autocast (weights and optimiser stay float32); on CPU everything is float32.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import math
import os
import shutil
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from factory.checkpoints import (
    checkpoint_path,
    configs_equal,
    data_fingerprint,
    read_checkpoint,
    save_checkpoint,
    saved_epochs,
)
from factory.color import bicubic_resize, downsample, quantize
from factory.config import ConfigError, FactoryError, config_to_dict
from factory.devices import resolve_device
from factory.models import PAPER_EPOCH_SIZE, ModelSpec, TrainingRecipe, build_model, get_spec, make_config
from factory.regime import measure_regime, regime_images
from factory.sources import RejectedImage, find_images, is_image_file, load_rgb
from factory.storage import atomic_path

log = logging.getLogger(__name__)

PAPER_SAVE_AT: tuple[int, ...] = (4, 8, 16, 32, 64)  # the paper's checkpoint epochs (Section 3.2)
EVALUATION_STREAM = 2**32 - 1  # the "epoch" id of the fixed evaluation batch's random stream
TIMED_STEPS = (
    2  # optimiser steps timed (after one warm-up step) for the estimate a run prints before it trains
)


@dataclass(frozen=True)
class TrainConfig:
    model: str  # registry name: vqvae, vqvae2, mae, vae, ddim
    data: tuple[str, ...]  # image folders (searched recursively) and/or image files
    epochs: int = 64  # train up to this epoch
    save_at: tuple[int, ...] | None = (
        None  # epochs to checkpoint; None: the paper's 4,8,16,32,64 up to `epochs`, and `epochs`
    )
    epoch_size: int | None = None  # samples per epoch; None: the paper's 45,000 (PAPER_EPOCH_SIZE)
    image_size: int | None = (
        None  # training crop side; None: the model's native size (64 VAE, 224 MAE, 256 others)
    )
    batch_size: int | None = None  # images per optimiser step; None: the model's reference batch (its RECIPE)
    lr: float | None = None  # learning rate; None: the model's reference rate (its RECIPE)
    preset: str = "paper"  # model preset: "paper" (reference sizes) or "tiny" (tests)
    checkpoints: str = "checkpoints"  # checkpoint root: <checkpoints>/<model>/epoch-<E>.pt
    seed: int = 0  # initialisation, data order, crops and loss noise all derive from it
    device: str = "auto"  # factory.devices: auto (CUDA, then MPS, then the CPU), cpu, cuda, cuda:N, mps
    workers: int = 2  # DataLoader worker processes decoding images (0: in the main process)
    bf16: bool = True  # bf16 autocast for the forward pass on CUDA (ignored on CPU)
    progress: bool = True  # show a tqdm progress bar
    regime_size: int = 256  # LR side the regime is measured at: the build's (1024 crops / 4)
    regime_scale: int = (
        4  # the build's scale: a held-out image's centre crop of regime_size * scale is downsampled
    )
    heldout: int = 64  # at most this many images held out of training to measure the regime on
    regime_data: tuple[str, ...] = ()  # measure the regime on these images instead (nothing is held out then)
    recipe: TrainingRecipe | None = None  # None: the model's reference recipe (ModelSpec.recipe)


@dataclass
class TrainResult:
    checkpoints: list[Path]  # checkpoint files written by this call, in epoch order
    start_epoch: int  # epoch the run started from (0: from scratch; else resumed from that checkpoint)
    end_epoch: int  # last epoch trained (== start_epoch when there was nothing left to do)
    steps: int  # optimiser steps taken in total (including those before a resume)
    initial_loss: float  # loss on a fixed evaluation batch before this call's training
    final_loss: float  # the same loss after it
    images_per_second: float  # training throughput of this call (0 when nothing was trained)
    skipped_images: int = 0  # unreadable images replaced by readable ones during this call
    files: int = 0  # training images found (held-out ones excluded)
    existing: list[Path] = field(
        default_factory=list
    )  # requested checkpoints that already existed (same run)
    regimes: dict[int, dict] = field(
        default_factory=dict
    )  # epoch -> regime figures of the checkpoints written

    def summary_lines(self) -> list[str]:
        lines = [f"wrote {path}" for path in self.checkpoints]
        lines += [f"kept {path} (already trained, same run)" for path in self.existing]
        start = f"resumed from epoch {self.start_epoch}" if self.start_epoch else "from scratch"
        lines.append(
            f"epochs {self.start_epoch}->{self.end_epoch} ({start}), {self.steps} steps, "
            f"loss {self.initial_loss:.4f} -> {self.final_loss:.4f}, {self.images_per_second:.1f} images/s"
        )
        for epoch, regime in sorted(self.regimes.items()):
            lines.append(f"epoch {epoch} regime: {format_regime(regime)}")
        if self.skipped_images:
            lines.append(f"skipped {self.skipped_images} unreadable image reads")
        return lines


def format_regime(regime: dict) -> str:
    """One line of a checkpoint's regime figures (factory.regime)."""
    if not regime.get("images"):
        return "not measured (no readable image to measure it on)"
    return (
        f"PSNR {regime['psnr']:.2f} dB, SSIM {regime['ssim']:.3f}, ΔE {regime['delta_e']:.2f}, "
        f"checkerboard {regime['checkerboard']:.2f}, Δb* {regime['delta_b']:+.2f} "
        f"({regime['images']} {regime.get('split', 'held-out')} images at {regime.get('size', '?')} px)"
    )


# --------------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------------


def list_training_images(data: Sequence[str | os.PathLike]) -> tuple[list[Path], str]:
    """The image files of every folder (recursive, sorted) or file given, and the data fingerprint of them all."""
    if not data:
        raise ConfigError("no training data given (--data)")
    files: list[Path] = []
    parts: list[str] = []
    for item in data:
        path = Path(item)
        if path.is_dir():
            found = find_images(path)
            if not found:
                raise FactoryError(
                    f"no image files under {path} (looked for common image extensions, recursively)"
                )
            files += found
            parts.append(data_fingerprint(path, found))
        elif path.is_file() and is_image_file(path):
            files.append(path)
            parts.append(data_fingerprint(path.parent, [path]))
        elif path.exists():
            raise FactoryError(f"not an image file or folder: {path}")
        else:
            raise FactoryError(f"training data not found: {path}")
    fingerprint = parts[0] if len(parts) == 1 else hashlib.sha256("\n".join(parts).encode()).hexdigest()
    return files, fingerprint


def split_heldout(files: Sequence[Path], heldout: int) -> tuple[list[Path], list[Path]]:
    """(training files, held-out files): up to `heldout` files, one in ten at most, evenly spaced through the sorted
    listing (so every Tiny-ImageNet class can be among them); none from a folder of fewer than 10 images."""
    count = min(heldout, len(files) // 10)
    if count < 1:
        return list(files), []
    picked = set(np.linspace(0, len(files) - 1, count).round().astype(int).tolist())
    return [f for i, f in enumerate(files) if i not in picked], [files[i] for i in sorted(picked)]


def first_readable(files: Sequence[Path]) -> int:
    """Index of the first file that decodes; a set with none is a one-line FactoryError."""
    reasons: dict[str, int] = {}
    for index, path in enumerate(files):
        try:
            load_rgb(path)
            return index
        except RejectedImage as error:
            reasons[error.reason] = reasons.get(error.reason, 0) + 1
    summary = ", ".join(f"{count} {reason}" for reason, count in sorted(reasons.items()))
    raise FactoryError(f"no usable image among {len(files)} training files ({summary})")


def epoch_order(count: int, epoch_size: int, seed: int, epoch: int) -> np.ndarray:
    """File indices for one epoch: consecutive random permutations of range(count), cut to epoch_size."""
    rng = np.random.default_rng([seed, epoch, 0])
    repeats = math.ceil(epoch_size / count)
    return np.concatenate([rng.permutation(count) for _ in range(repeats)])[:epoch_size]


def _resize(x: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """x: (3, H, W) in [0, 1] -> (3, h, w), antialiased when shrinking (as Pillow and torchvision's Resize are)."""
    if tuple(x.shape[-2:]) == size:
        return x
    if interpolation == "bicubic":
        return bicubic_resize(x[None], size)[0]
    return F.interpolate(x[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0].clamp(
        0, 1
    )


def _random_resized_box(
    height: int, width: int, scale: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """(top, left, h, w): torchvision's RandomResizedCrop.get_params (area fraction in `scale`, aspect ratio
    log-uniform in 3/4..4/3, 10 tries, then the centre crop of the clamped ratio), drawn from `rng`."""
    area = height * width
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ratio = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    ratio = width / height
    if ratio < 3 / 4:
        w, h = width, round(width / (3 / 4))
    elif ratio > 4 / 3:
        h, w = height, round(height * (4 / 3))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def random_crop_origin(height: int, width: int, size: int, rng: np.random.Generator) -> tuple[int, int]:
    """(top, left) of a size x size square drawn uniformly inside a height x width image, at the image's own scale
    (nothing is resized: unlike factory.classifier.synthesis.random_zoomed_crop)."""
    return int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))


def prepare_sample(
    image: np.ndarray, size: int, recipe: TrainingRecipe, rng: np.random.Generator
) -> torch.Tensor:
    """image: (H, W, 3) uint8 -> (3, size, size) float in [0, 1], through the recipe's input pipeline: "resize"
    (shorter side to `size`, then a centre or random square), "random_resized" (RandomResizedCrop) or "crop" (a
    random square at the image's own scale), then a horizontal flip with probability 1/2 when the recipe flips."""
    x = torch.tensor(image).permute(2, 0, 1)  # a copy: decoded arrays may be read-only
    height, width = x.shape[-2:]
    if recipe.pipeline == "crop" and min(height, width) >= size:
        top, left = random_crop_origin(height, width, size, rng)
        x = (
            x[:, top : top + size, left : left + size].float() / 255
        )  # crop the 8-bit pixels first: far smaller
    elif recipe.pipeline == "random_resized":
        top, left, h, w = _random_resized_box(height, width, recipe.crop_scale, rng)
        x = _resize(x[:, top : top + h, left : left + w].float() / 255, (size, size), recipe.interpolation)
    else:
        scale = size / min(height, width)
        height, width = max(size, round(height * scale)), max(size, round(width * scale))
        x = _resize(x.float() / 255, (height, width), recipe.interpolation)
        if recipe.crop == "random" or recipe.pipeline == "crop":
            top, left = random_crop_origin(height, width, size, rng)
        else:
            top, left = (height - size) // 2, (width - size) // 2
        x = x[:, top : top + size, left : left + size]
    if recipe.flip and rng.random() < 0.5:
        x = x.flip(-1)
    return x.contiguous()


class DecodedImages:
    """The most recently decoded training images of this process, up to `max_bytes` of pixels (least recently used
    out first). A small folder (the build's embedded default: 7 photos, ~16 MB) is then decoded once per epoch and
    worker instead of once per sample; a large one (Tiny-ImageNet) simply misses."""

    def __init__(self, max_bytes: int = 256 * 2**20) -> None:
        self.max_bytes, self.bytes = max_bytes, 0
        self.images: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()

    def load(self, path: Path, downscale: int = 1) -> np.ndarray:
        """The decoded image, bicubic-downsampled by `downscale` as the build makes its LR images (cached as such)."""
        key = (str(path), downscale)
        if key in self.images:
            self.images.move_to_end(key)
            return self.images[key]
        image = load_rgb(path)
        if downscale > 1:
            x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255
            image = quantize(downsample(x, downscale))[0].permute(1, 2, 0).numpy()
        if image.nbytes <= self.max_bytes:
            self.images[key] = image
            self.bytes += image.nbytes
            while self.bytes > self.max_bytes:
                self.bytes -= self.images.popitem(last=False)[1].nbytes
        return image


_DECODED = DecodedImages()  # one per process: each DataLoader worker fills its own


class EpochSamples(Dataset):
    """The samples of one epoch: position p -> (image (3, S, S) in [0, 1], files skipped to find a readable one)."""

    def __init__(
        self,
        files: Sequence[Path],
        order: np.ndarray,
        size: int,
        recipe: TrainingRecipe,
        seed: int,
        epoch: int,
    ) -> None:
        self.files, self.order, self.size, self.recipe = list(files), order, size, recipe
        self.seed, self.epoch = seed, epoch

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, int]:
        rng = np.random.default_rng([self.seed, self.epoch, 1, position])
        index = int(self.order[position])
        for skipped in range(len(self.files)):
            path = self.files[(index + skipped) % len(self.files)]
            try:
                image = _DECODED.load(path, self.recipe.downscale)
            except RejectedImage as error:
                log.debug("skipping unreadable training image: %s", error)
                continue
            return prepare_sample(image, self.size, self.recipe, rng), skipped
        raise FactoryError("no readable training image left")


# --------------------------------------------------------------------------------------------------------------------
# Run identity and resume
# --------------------------------------------------------------------------------------------------------------------


def _torch_seed(seed: int, *stream: int) -> int:
    """A 63-bit torch seed for one stream of (seed, ...): independent streams per epoch and purpose."""
    return int(np.random.SeedSequence([seed, *stream]).generate_state(1, np.uint64)[0] >> 1)


def resolve_save_at(config: TrainConfig) -> tuple[int, ...]:
    """The epochs to checkpoint, validated against `epochs`."""
    if config.epochs < 1:
        raise ConfigError(f"--epochs must be at least 1, got {config.epochs}")
    if config.save_at is None:
        return tuple(sorted({epoch for epoch in PAPER_SAVE_AT if epoch <= config.epochs} | {config.epochs}))
    if not config.save_at:
        raise ConfigError("--save-at is empty: give at least one epoch to checkpoint")
    beyond = [epoch for epoch in config.save_at if epoch > config.epochs]
    if beyond:
        raise ConfigError(f"--save-at {','.join(map(str, beyond))} is beyond --epochs {config.epochs}")
    if min(config.save_at) < 1:
        raise ConfigError(f"--save-at epochs must be >= 1, got {min(config.save_at)}")
    return tuple(sorted(set(config.save_at)))


def _run_difference(payload: dict[str, Any], run: dict[str, Any]) -> str:
    """'' when checkpoint `payload` belongs to `run`, else what differs (checkpoint vs this run)."""
    differences = []
    if payload["model_name"] != run["model_name"]:
        differences.append(f"model {payload['model_name']} vs {run['model_name']}")
    if not configs_equal(payload["config"], run["config"]):
        differences.append(f"preset/config {payload['preset']} vs {run['preset']}")
    if payload["data_fingerprint"] != run["data_fingerprint"]:
        differences.append("training data differ")
    if payload["seed"] != run["seed"]:
        differences.append(f"seed {payload['seed']} vs {run['seed']}")
    stored = payload.get("training", {})
    for key, value in run["training"].items():
        if stored.get(key) != value:
            differences.append(f"{key} {stored.get(key)} vs {value}")
    return ", ".join(differences)


# --------------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------------


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(
        device_type=device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda"
    )


def evaluation_loss(
    model: nn.Module, batch: torch.Tensor, seed: int, device: torch.device, bf16: bool
) -> float:
    """The training loss on a fixed batch, with fixed loss noise, without changing the model or any RNG stream:
    train-mode forward (the loss the optimiser sees) with buffers (BatchNorm statistics, codebook averages) restored."""
    buffers = [buffer.detach().clone() for buffer in model.buffers()]
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad(), _autocast(device, bf16):
        torch.manual_seed(_torch_seed(seed, 2**31))
        loss, _ = model.loss(batch.to(device))
        value = float(loss)
    with torch.no_grad():
        for buffer, saved in zip(model.buffers(), buffers, strict=True):
            buffer.copy_(saved)
    return value


def _loader(samples: EpochSamples, batch_size: int, workers: int, device: torch.device) -> DataLoader:
    return DataLoader(
        samples,
        batch_size=batch_size,
        shuffle=False,  # the order is already the epoch's permutation
        num_workers=workers,
        pin_memory=device.type == "cuda",
        drop_last=False,
    )


def _validate(config: TrainConfig) -> None:
    if config.batch_size is not None and config.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {config.batch_size}")
    if config.epoch_size is not None and config.epoch_size < 1:
        raise ConfigError(f"--epoch-size must be at least 1, got {config.epoch_size}")
    if config.image_size is not None and config.image_size < 16:
        raise ConfigError(f"--image-size must be at least 16, got {config.image_size}")
    if config.lr is not None and not config.lr > 0:
        raise ConfigError(f"--lr must be positive, got {config.lr}")
    if config.workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {config.workers}")
    if config.regime_size < 16 or config.regime_scale < 1 or config.heldout < 0:
        raise ConfigError(
            f"--regime-size must be >= 16, --regime-scale >= 1 and --heldout >= 0 "
            f"(got {config.regime_size}, {config.regime_scale}, {config.heldout})"
        )


@dataclass
class TrainPlan:
    """What `train` will do, settled before the checkpoint folder is touched."""

    spec: ModelSpec
    model_config: Any
    recipe: TrainingRecipe  # TrainConfig.recipe, else the model's reference recipe (batch and lr: see below)
    files: list[Path]  # training files (held-out ones excluded)
    heldout: list[Path]  # files the regime is measured on
    regime_split: str  # "held-out", "given" (--regime-data) or "training" (a folder too small to hold out)
    fingerprint: str
    save_at: tuple[int, ...]
    device: torch.device
    image_size: int
    batch_size: int
    lr: float
    epoch_size: int
    run: dict[str, Any]  # the run's identity, stored in every checkpoint and compared on resume


def plan_run(config: TrainConfig) -> TrainPlan:
    """Check the request and settle every setting (recipe defaults, held-out split, the run's identity)."""
    _validate(config)
    spec = get_spec(config.model)
    save_at = resolve_save_at(config)
    device = resolve_device(config.device)
    image_size = config.image_size or spec.native_size
    fields = {f.name for f in dataclasses.fields(spec.config_class)}
    # Models with a fixed input size (VAE) are built for the crop size.
    overrides = {"image_size": image_size} if "image_size" in fields and config.image_size is not None else {}
    model_config = make_config(config.model, config.preset, overrides)
    files, fingerprint = list_training_images(config.data)
    if config.regime_data:
        heldout, _ = list_training_images(config.regime_data)
        split = "given"
    else:
        files, heldout = split_heldout(files, config.heldout)
        split = "held-out" if heldout else "training"
        heldout = heldout or files[: max(1, config.heldout)]
    first_readable(files)
    recipe = config.recipe or spec.recipe
    batch_size = config.batch_size or recipe.batch_size
    lr = config.lr if config.lr is not None else recipe.lr
    epoch_size = config.epoch_size or PAPER_EPOCH_SIZE
    run = {
        "model_name": config.model,
        "preset": config.preset,
        "config": config_to_dict(model_config),
        "data_fingerprint": fingerprint,
        "seed": config.seed,
        # The settings that change the result; epochs, save_at, device and workers do not.
        "training": {
            "batch_size": batch_size,
            "lr": lr,
            "epoch_size": epoch_size,
            "image_size": image_size,
            "heldout": len(heldout) if split == "held-out" else 0,
            "recipe": config_to_dict(recipe),
        },
    }
    return TrainPlan(
        spec,
        model_config,
        recipe,
        files,
        heldout,
        split,
        fingerprint,
        save_at,
        device,
        image_size,
        batch_size,
        lr,
        epoch_size,
        run,
    )


def _existing_checkpoints(config: TrainConfig, plan: TrainPlan) -> dict[int, Path]:
    """The run's checkpoints already on disk; another run's is a one-line FactoryError."""
    existing = {}
    for epoch, path in saved_epochs(config.checkpoints, config.model).items():
        difference = _run_difference(read_checkpoint(path, mmap=True), plan.run)
        if difference:
            raise FactoryError(
                f"{path} is from another training run ({difference}); use another --checkpoints folder or remove it"
            )
        existing[epoch] = path
    return existing


def _train_step(model, optimizer, x: torch.Tensor, plan: TrainPlan, bf16: bool) -> float:
    with _autocast(plan.device, bf16):
        loss, _ = model.loss(x.to(plan.device, non_blocking=True))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if plan.recipe.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), plan.recipe.grad_clip)
    optimizer.step()
    return loss.item()


def estimate_seconds_per_step(
    model: nn.Module, optimizer, batch: torch.Tensor, plan: TrainPlan, bf16: bool
) -> float:
    """Seconds per optimiser step, timed on copies of the model and optimiser (the run itself is untouched): one
    warm-up step, then the mean of TIMED_STEPS."""
    model_copy = copy.deepcopy(model)
    optimizer_copy = plan.spec.configure_optimizer(model_copy, plan.lr, plan.recipe)
    # A deep copy: load_state_dict keeps the very tensors it is given, and the timed steps would update the run's
    # own Adam moments in place.
    optimizer_copy.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    devices = [plan.device] if plan.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        _train_step(model_copy, optimizer_copy, batch, plan, bf16)
        started = time.perf_counter()
        for _ in range(TIMED_STEPS):
            _train_step(model_copy, optimizer_copy, batch, plan, bf16)
        if plan.device.type == "cuda":
            torch.cuda.synchronize(plan.device)
    return (time.perf_counter() - started) / TIMED_STEPS


def _duration(seconds: float) -> str:
    minutes = seconds / 60
    if minutes < 1:
        return f"{seconds:.0f} s"
    if minutes < 120:
        return f"{minutes:.0f} min"
    return f"{minutes / 60:.1f} h"


def announce(
    config: TrainConfig, plan: TrainPlan, start_epoch: int, end_epoch: int, seconds_per_step: float
) -> str:
    """The one line a run prints before it trains: what it will do and how long that should take."""
    steps = (end_epoch - start_epoch) * math.ceil(plan.epoch_size / plan.batch_size)
    line = (
        f"training {config.model} ({config.preset}) epochs {start_epoch + 1}-{end_epoch}: {steps:,} steps of "
        f"{plan.batch_size} ({plan.epoch_size:,} samples an epoch, lr {plan.lr:g}), about "
        f"{_duration(steps * seconds_per_step)} on {plan.device.type} ({seconds_per_step:.2f} s a step, "
        f"{TIMED_STEPS} timed)"
    )
    log.warning(line)
    return line


def _train_epoch(
    model, optimizer, plan: TrainPlan, config: TrainConfig, epoch: int, end_epoch: int
) -> tuple[int, int]:
    """One epoch of optimiser steps -> (steps taken, unreadable images skipped)."""
    torch.manual_seed(_torch_seed(config.seed, epoch))
    order = epoch_order(len(plan.files), plan.epoch_size, config.seed, epoch)
    samples = EpochSamples(plan.files, order, plan.image_size, plan.recipe, config.seed, epoch)
    bar = tqdm(
        total=len(samples),
        desc=f"{config.model} epoch {epoch}/{end_epoch}",
        unit="img",
        disable=not config.progress,
        leave=False,
    )
    steps, skipped_epoch, started = 0, 0, time.perf_counter()
    for batch, skipped in _loader(samples, plan.batch_size, config.workers, plan.device):
        value = _train_step(model, optimizer, batch, plan, config.bf16)
        steps += 1
        if not math.isfinite(value):
            raise FactoryError(
                f"{config.model} training diverged (loss {value}) at epoch {epoch}; try a lower --lr"
            )
        skipped_epoch += int(skipped.sum())
        bar.update(len(batch))
        elapsed = time.perf_counter() - started
        bar.set_postfix(loss=f"{value:.4f}", img_per_s=f"{bar.n / max(elapsed, 1e-9):.1f}")
    bar.close()
    if skipped_epoch:
        log.warning("epoch %d: skipped %d unreadable training image reads", epoch, skipped_epoch)
    return steps, skipped_epoch


def checkpoint_regime(model: nn.Module, plan: TrainPlan, config: TrainConfig, images: torch.Tensor) -> dict:
    """The regime figures stored with a checkpoint: factory.regime's, plus where and how they were measured."""
    figures = measure_regime(model, images, plan.device, seed=config.seed) if len(images) else {"images": 0}
    return {**figures, "split": plan.regime_split, "size": config.regime_size, "scale": config.regime_scale}


@dataclass(frozen=True)
class ResumePoint:
    epoch: int  # the epoch the run continues from (0: from scratch)
    steps: int  # optimiser steps taken up to it


@dataclass(frozen=True)
class LossProbe:
    """A fixed batch (its own random stream, which no real epoch reaches), to measure the loss before and after."""

    batch: torch.Tensor  # (B, 3, S, S) in [0, 1], B the run's batch size, S its image size
    seed: int  # the loss noise's seed (evaluation_loss)

    @classmethod
    def for_run(cls, config: TrainConfig, plan: TrainPlan) -> LossProbe:
        order = epoch_order(len(plan.files), plan.batch_size, config.seed, EVALUATION_STREAM)
        samples = EpochSamples(
            plan.files, order, plan.image_size, plan.recipe, config.seed, EVALUATION_STREAM
        )
        return cls(torch.stack([samples[position][0] for position in range(len(samples))]), config.seed)

    def loss(self, model: nn.Module, plan: TrainPlan, bf16: bool) -> float:
        return evaluation_loss(model, self.batch, self.seed, plan.device, bf16)


def train(config: TrainConfig) -> TrainResult:
    """Train `config.model` up to `config.epochs`, writing a checkpoint at each `save_at` epoch (resuming a run)."""
    plan = plan_run(config)  # everything that can be wrong is checked before the checkpoint folder is touched
    existing = _existing_checkpoints(config, plan)
    missing = [epoch for epoch in plan.save_at if epoch not in existing]
    model, optimizer = build_model_and_optimizer(config, plan)
    start = resume(config, existing, missing, model, optimizer)
    end_epoch = max(missing) if missing else start.epoch

    probe = LossProbe.for_run(config, plan)
    initial_loss = probe.loss(model, plan, config.bf16)
    regime_inputs = regime_images(plan.heldout, config.regime_size, config.regime_scale) if missing else None
    if end_epoch > start.epoch:
        seconds = estimate_seconds_per_step(model, optimizer, probe.batch, plan, config.bf16)
        announce(config, plan, start.epoch, end_epoch, seconds)

    result = TrainResult(
        [], start.epoch, end_epoch, start.steps, initial_loss, initial_loss, 0.0, files=len(plan.files)
    )
    train_seconds = 0.0
    model.train()
    for epoch in range(start.epoch + 1, end_epoch + 1):
        started = time.perf_counter()
        epoch_steps, skipped = _train_epoch(model, optimizer, plan, config, epoch, end_epoch)
        train_seconds += time.perf_counter() - started
        result.steps += epoch_steps
        result.skipped_images += skipped
        if epoch in missing:
            save_epoch(config, plan, model, optimizer, epoch, result, regime_inputs)

    result.final_loss = probe.loss(model, plan, config.bf16)
    trained_images = (end_epoch - start.epoch) * plan.epoch_size
    result.images_per_second = trained_images / train_seconds if train_seconds else 0.0
    result.existing = [existing[epoch] for epoch in plan.save_at if epoch in existing]
    return result


def build_model_and_optimizer(
    config: TrainConfig, plan: TrainPlan
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The model, initialised from `config.seed` and on the run's device, and its optimiser (the model spec's)."""
    torch.manual_seed(config.seed)
    model = build_model(config.model, config=plan.model_config).to(plan.device)
    multiple = getattr(model, "size_multiple", 1)  # the VAE is built for the crop size itself
    if plan.image_size % multiple:
        raise ConfigError(
            f"--image-size {plan.image_size} must be a multiple of {multiple} for {config.model} "
            f"(e.g. {plan.image_size - plan.image_size % multiple or multiple})"
        )
    return model, plan.spec.configure_optimizer(model, plan.lr, plan.recipe)


def resume(
    config: TrainConfig,
    existing: dict[int, Path],
    missing: list[int],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
) -> ResumePoint:
    """Load the newest saved checkpoint below the first missing one into `model` and `optimizer`, if any."""
    resumable = [e for e in existing if e <= config.epochs and (not missing or e < min(missing))]
    for epoch in sorted(resumable, reverse=True):
        payload = read_checkpoint(existing[epoch])
        if "optimizer" in payload:
            break
        # A checkpoint without optimiser state (one shipped with the package) is a result, not a resume point:
        # continuing from it with fresh Adam moments would give another run than an uninterrupted one.
        log.info("%s holds no optimiser state: not resuming from it", existing[epoch])
    else:
        return ResumePoint(0, 0)
    model.load_state_dict(payload["weights"])
    optimizer.load_state_dict(payload["optimizer"])
    steps = int(payload["steps"])
    log.info("resuming %s from %s (epoch %d, %d steps)", config.model, existing[epoch], epoch, steps)
    return ResumePoint(epoch, steps)


def save_epoch(
    config: TrainConfig,
    plan: TrainPlan,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    result: TrainResult,
    regime_inputs: torch.Tensor,
) -> None:
    """Measure the regime, write epoch `epoch`'s checkpoint and record both in `result`."""
    regime = checkpoint_regime(model, plan, config, regime_inputs)
    path = save_checkpoint(
        checkpoint_path(config.checkpoints, config.model, epoch),
        model_name=config.model,
        preset=config.preset,
        config=plan.model_config,
        model=model,
        epoch=epoch,
        steps=result.steps,
        data_fingerprint=plan.fingerprint,
        seed=config.seed,
        optimizer=optimizer,
        training={**plan.run["training"], "samples_seen": epoch * plan.epoch_size},
        regime=regime,
    )
    result.checkpoints.append(path)
    result.regimes[epoch] = regime
    log.info("saved %s (%s)", path, format_regime(regime))


# How the build's embedded default (scikit-image's 7 bundled photos, 256 crops, LR 64x64) gets a missing checkpoint
# when the user gave no training data. The paper's epoch 8 (360,000 samples, ~2,800 steps of 128 at 256x256: ~50
# CPU-hours for VQ-VAE-2) does not fit a first command, so the embedded default is a calibrated recipe instead, and
# says so (README, the card's checkpoint.training). Its VQ-VAE-2 epoch 8 ships with the package (SHIPPED_CHECKPOINTS,
# below): training it takes ~12 min on 2 cores.
# - 64x64 crops of the photos at the LR scale (bicubic x4, as the build makes its LR images), flipped, batch 64,
#   Adam at 3e-4 (the reference's rate; its batch is 128);
# - an "epoch" of EMBEDDED_DEFAULT_STEPS_PER_EPOCH steps (epoch 8: 480 steps, 30,720 samples);
# - the `embedded` preset of VQ-VAE and VQ-VAE-2: the paper's sizes with dead-code restarts. Without them the
#   reference's codebooks collapse onto one or two codes for the whole short run (measured: PSNR 21 dB, SSIM 0.49,
#   blocky images under a checkerboard), which is not the regime of the paper's Figures 3-5.
# Measured on the pairs of `factory build --model vqvae2 --epoch 8` (README, "The embedded default"): of the recipes
# tried, the one closest to issue #14's band (batch 16 at 1e-3 gave a checkerboard index of 2.7-3.2; this one 2.4).
EMBEDDED_DEFAULT_STEPS_PER_EPOCH = 60
EMBEDDED_DEFAULT_RECIPE = TrainingRecipe(batch_size=64, lr=3e-4, pipeline="crop", flip=True, downscale=4)
EMBEDDED_DEFAULT_PRESET = "embedded"
EMBEDDED_DEFAULT_RECIPE_MODELS = ("vqvae", "vqvae2")


def training_for_build(
    *,
    model: str,
    epoch: int,
    checkpoints: str | os.PathLike,
    data: Sequence[str | os.PathLike],
    preset: str | None = None,
    seed: int = 0,
    embedded_default_lr_size: int | None = None,
    progress: bool = True,
) -> TrainConfig:
    """The training run that writes the checkpoint a build needs (`<checkpoints>/<model>/epoch-<epoch>.pt`).

    With `factory train`'s defaults (the paper's epoch, the model's reference recipe; the regime measured at the
    build's LR size, 256), or, when `embedded_default_lr_size` is given (the build's embedded default, LR images of
    that side), with the embedded default's calibrated recipe above (VQ-VAE and VQ-VAE-2; the others keep theirs)."""
    settings: dict[str, Any] = {}
    if embedded_default_lr_size is not None:
        settings["regime_size"] = embedded_default_lr_size
    if embedded_default_lr_size is not None and model in EMBEDDED_DEFAULT_RECIPE_MODELS:
        settings.update(
            # Whole crops for VQ-VAE (a multiple of 4) and VQ-VAE-2 (of 8): an LR side such as 50 (--crop 200)
            # trains on 48.
            image_size=max(16, embedded_default_lr_size - embedded_default_lr_size % 8),
            epoch_size=EMBEDDED_DEFAULT_STEPS_PER_EPOCH * EMBEDDED_DEFAULT_RECIPE.batch_size,
            recipe=EMBEDDED_DEFAULT_RECIPE,  # its batch and rate too
        )
        preset = preset or EMBEDDED_DEFAULT_PRESET
    return TrainConfig(
        model=model,
        data=tuple(str(item) for item in data),
        epochs=epoch,
        save_at=(epoch,),
        preset=preset or "paper",
        checkpoints=str(checkpoints),
        seed=seed,
        progress=progress,
        **settings,
    )


# The embedded default's checkpoints ship with the package, as a checkpoint root (<model>/epoch-<E>.pt: the weights,
# the run's identity and its regime; no optimiser state, which would triple the size, so they are never resumed
# from). A first `factory build` then takes seconds on any CPU and gives the same pairs on every machine, where
# training there took minutes and gave pairs that vary with the CPU's floating point. README ("The embedded
# default") has the command that wrote them; `factory build --no-shipped-checkpoint` trains the same run instead.
SHIPPED_CHECKPOINTS = Path(__file__).parent / "models" / "embedded"


def shipped_checkpoint(config: TrainConfig) -> Path | None:
    """The checkpoint shipped with the package that `config`'s run writes at epoch `config.epochs`: one whose run
    identity (model, config, data fingerprint, seed, recipe: what a resume compares) is this run's, or None."""
    shipped = checkpoint_path(SHIPPED_CHECKPOINTS, config.model, config.epochs)
    if not shipped.is_file():
        return None
    difference = _run_difference(read_checkpoint(shipped, mmap=True), plan_run(config).run)
    if difference:
        log.info("the shipped %s/%s is of another run (%s)", config.model, shipped.name, difference)
        return None
    return shipped


def copy_shipped_checkpoint(shipped: Path, config: TrainConfig) -> Path:
    """Copy `shipped` (from `shipped_checkpoint(config)`) to where `config`'s run writes it, atomically."""
    target = checkpoint_path(config.checkpoints, config.model, config.epochs)
    with atomic_path(target) as temporary:
        shutil.copyfile(shipped, temporary)
    return target
