"""Train a reconstructor from scratch and keep it undertrained: checkpoints at chosen epochs (Section 3.2).

    factory train --model vqvae2 --data tiny-imagenet-200/train --epochs 64 --save-at 4,8,16,32,64 --epoch-size 45000

Model-agnostic: the engine only calls the registry's `loss(x)`; the model's own config decides everything else.

Data. Every image under the given folders (Tiny-ImageNet's `train/<wnid>/images/*.JPEG`, or any flat or nested
folder) or given as a file, listed and decoded by `factory.sources`. Each sample is one image, randomly cropped to
`image_size` (default: the model's native size from the paper) at its own scale when it is large enough, which keeps
the photos' own pixel statistics, or first upscaled with the project's bicubic so that its shorter side fits (as
Tiny-ImageNet's 64x64 images must be for the 256x256 models), then flipped left-right with probability 1/2. An
epoch is `epoch_size` samples (default: the number of images), drawn as consecutive random permutations of the
files, so "epoch 8" can mean the paper's amount of optimisation on a smaller folder. Unreadable files are replaced
by the next readable one and counted in a warning; a folder with no readable image is a one-line error.

Determinism and resume. The model is initialised from `seed`; epoch e's file order, crops and flips come from
(seed, e, position) and its loss noise (VAE / DDIM noise, MAE masks) from torch's RNG seeded with (seed, e). So an
epoch does not depend on the worker count or on earlier epochs having run in this process, and a run restarted
after an interruption resumes from its newest saved checkpoint (weights and optimiser state) and produces, on CPU,
the same checkpoints as an uninterrupted run. A checkpoint belongs to the same run when model, config, training
data fingerprint, seed and the training settings that change the result (batch size, learning rate, epoch size,
image size) all agree; a checkpoint folder holding another run's checkpoints is refused rather than overwritten.

Optimiser: AdamW at a constant rate, with the reference implementation's learning rate, betas and weight decay per
model (DEFAULT_OPTIMIZERS); warm-up and decay schedules are left out because the point is a model stopped early.
On CUDA the forward pass runs under bf16 autocast (weights and optimiser stay float32); on CPU everything is float32.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
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
from factory.color import bicubic_resize
from factory.config import ConfigError, FactoryError, config_to_dict
from factory.devices import resolve_device
from factory.models import build_model, get_spec, make_config
from factory.sources import RejectedImage, find_images, is_image_file, load_rgb

log = logging.getLogger(__name__)

PAPER_SAVE_AT: tuple[int, ...] = (4, 8, 16, 32, 64)  # the paper's checkpoint epochs (Section 3.2)
EVALUATION_STREAM = 2**32 - 1  # the "epoch" id of the fixed evaluation batch's random stream


@dataclass(frozen=True)
class OptimizerDefaults:
    lr: float  # learning rate
    betas: tuple[float, float]  # Adam's (beta_1, beta_2)
    weight_decay: float  # decoupled weight decay (AdamW)


DEFAULT_OPTIMIZERS: dict[str, OptimizerDefaults] = {
    "vqvae": OptimizerDefaults(2e-4, (0.9, 0.999), 0.0),  # van den Oord et al. 2017: Adam, 2e-4
    "vqvae2": OptimizerDefaults(3e-4, (0.9, 0.999), 0.0),  # rosinality train_vqvae.py: Adam, 3e-4
    "mae": OptimizerDefaults(1.5e-4, (0.9, 0.95), 0.05),  # MAE: AdamW, base lr 1.5e-4 (its rate at batch 256)
    "vae": OptimizerDefaults(5e-3, (0.9, 0.999), 0.0),  # AntixK configs/vae.yaml: Adam, LR 0.005
    "ddim": OptimizerDefaults(2e-5, (0.9, 0.999), 0.0),  # DDPM Appendix B: Adam, 2e-5 for 256x256 models
}


@dataclass(frozen=True)
class TrainConfig:
    model: str  # registry name: vqvae, vqvae2, mae, vae, ddim
    data: tuple[str, ...]  # image folders (searched recursively) and/or image files
    epochs: int = 64  # train up to this epoch
    save_at: tuple[int, ...] | None = (
        None  # epochs to checkpoint; None: the paper's 4,8,16,32,64 up to `epochs`, and `epochs`
    )
    epoch_size: int | None = None  # samples per epoch; None: the number of images found
    image_size: int | None = (
        None  # training crop side; None: the model's native size (64 VAE, 224 MAE, 256 others)
    )
    batch_size: int = 16  # images per optimiser step
    lr: float | None = None  # learning rate; None: the model's reference rate (DEFAULT_OPTIMIZERS)
    preset: str = "paper"  # model preset: "paper" (reference sizes) or "tiny" (tests)
    checkpoints: str = "checkpoints"  # checkpoint root: <checkpoints>/<model>/epoch-<E>.pt
    seed: int = 0  # initialisation, data order, crops and loss noise all derive from it
    device: str = "auto"  # "auto" (CUDA when present, else CPU), "cpu", "cuda", "cuda:N"
    workers: int = 2  # DataLoader worker processes decoding images (0: in the main process)
    bf16: bool = True  # bf16 autocast for the forward pass on CUDA (ignored on CPU)
    progress: bool = True  # show a tqdm progress bar


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
    files: int = 0  # training images found
    existing: list[Path] = field(
        default_factory=list
    )  # requested checkpoints that already existed (same run)

    def summary_lines(self) -> list[str]:
        lines = [f"wrote {path}" for path in self.checkpoints]
        lines += [f"kept {path} (already trained, same run)" for path in self.existing]
        start = f"resumed from epoch {self.start_epoch}" if self.start_epoch else "from scratch"
        lines.append(
            f"epochs {self.start_epoch}->{self.end_epoch} ({start}), {self.steps} steps, "
            f"loss {self.initial_loss:.4f} -> {self.final_loss:.4f}, {self.images_per_second:.1f} images/s"
        )
        if self.skipped_images:
            lines.append(f"skipped {self.skipped_images} unreadable image reads")
        return lines


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


def random_crop(image: np.ndarray, size: int, rng: np.random.Generator) -> torch.Tensor:
    """image: (H, W, 3) uint8 -> (3, size, size) float in [0, 1]: a random crop at the image's own scale, after a
    bicubic upscale when its shorter side is below `size`; flipped left-right with probability 1/2."""
    height, width = image.shape[:2]
    upscaled = None
    if min(height, width) < size:
        upscaled = torch.tensor(image).permute(2, 0, 1).float().div_(255)
        scale = size / min(height, width)
        height, width = max(size, round(height * scale)), max(size, round(width * scale))
        upscaled = bicubic_resize(upscaled[None], (height, width))[0]
    top = int(rng.integers(0, height - size + 1))
    left = int(rng.integers(0, width - size + 1))
    if upscaled is None:  # crop the 8-bit pixels first: a whole photo as floats is 4x its size, per sample
        crop = image[top : top + size, left : left + size]
        x = torch.tensor(crop).permute(2, 0, 1).float().div_(255)  # a copy: decoded arrays may be read-only
    else:
        x = upscaled[:, top : top + size, left : left + size]
    if rng.random() < 0.5:
        x = x.flip(-1)
    return x.contiguous()


class DecodedImages:
    """The most recently decoded training images of this process, up to `max_bytes` of pixels (least recently used
    out first). A small folder (the build's embedded default: 7 photos, ~16 MB) is then decoded once per epoch and
    worker instead of once per sample; a large one (Tiny-ImageNet) simply misses."""

    def __init__(self, max_bytes: int = 256 * 2**20) -> None:
        self.max_bytes, self.bytes = max_bytes, 0
        self.images: OrderedDict[str, np.ndarray] = OrderedDict()

    def load(self, path: Path) -> np.ndarray:
        key = str(path)
        if key in self.images:
            self.images.move_to_end(key)
            return self.images[key]
        image = load_rgb(path)
        if image.nbytes <= self.max_bytes:
            self.images[key] = image
            self.bytes += image.nbytes
            while self.bytes > self.max_bytes:
                self.bytes -= self.images.popitem(last=False)[1].nbytes
        return image


_DECODED = DecodedImages()  # one per process: each DataLoader worker fills its own


class EpochSamples(Dataset):
    """The samples of one epoch: position p -> (image (3, S, S) in [0, 1], files skipped to find a readable one)."""

    def __init__(self, files: Sequence[Path], order: np.ndarray, size: int, seed: int, epoch: int) -> None:
        self.files, self.order, self.size, self.seed, self.epoch = list(files), order, size, seed, epoch

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, int]:
        rng = np.random.default_rng([self.seed, self.epoch, 1, position])
        index = int(self.order[position])
        for skipped in range(len(self.files)):
            path = self.files[(index + skipped) % len(self.files)]
            try:
                image = _DECODED.load(path)
            except RejectedImage as error:
                log.debug("skipping unreadable training image: %s", error)
                continue
            return random_crop(image, self.size, rng), skipped
        raise FactoryError("no readable training image left")


# --------------------------------------------------------------------------------------------------------------------
# Run identity and resume
# --------------------------------------------------------------------------------------------------------------------


def _torch_seed(seed: int, *stream: int) -> int:
    """A 63-bit torch seed for one stream of (seed, ...): independent streams per epoch and purpose."""
    return int(np.random.SeedSequence([seed, *stream]).generate_state(1, np.uint64)[0] >> 1)


def _resolve_device(name: str) -> torch.device:
    """--device for training: auto picks CUDA or the CPU (training on MPS is not supported here)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = resolve_device(name)
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"unsupported device {name!r} for training (auto, cpu, cuda, cuda:N)")
    return device


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


def _loader(samples: EpochSamples, config: TrainConfig, device: torch.device) -> DataLoader:
    return DataLoader(
        samples,
        batch_size=config.batch_size,
        shuffle=False,  # the order is already the epoch's permutation
        num_workers=config.workers,
        pin_memory=device.type == "cuda",
        drop_last=False,
    )


def _validate(config: TrainConfig) -> None:
    if config.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {config.batch_size}")
    if config.epoch_size is not None and config.epoch_size < 1:
        raise ConfigError(f"--epoch-size must be at least 1, got {config.epoch_size}")
    if config.image_size is not None and config.image_size < 16:
        raise ConfigError(f"--image-size must be at least 16, got {config.image_size}")
    if config.lr is not None and not config.lr > 0:
        raise ConfigError(f"--lr must be positive, got {config.lr}")
    if config.workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {config.workers}")


def train(config: TrainConfig) -> TrainResult:
    """Train `config.model` up to `config.epochs`, writing a checkpoint at each `save_at` epoch (resuming a run)."""
    # Everything that can be wrong with the request is checked before the checkpoint folder is touched.
    _validate(config)
    spec = get_spec(config.model)
    save_at = resolve_save_at(config)
    device = _resolve_device(config.device)
    image_size = config.image_size or spec.native_size
    overrides = {}
    if (
        "image_size" in {f.name for f in dataclasses.fields(spec.config_class)}
        and config.image_size is not None
    ):
        overrides["image_size"] = (
            image_size  # models with a fixed input size (VAE) are built for the crop size
        )
    model_config = make_config(config.model, config.preset, overrides)
    files, fingerprint = list_training_images(config.data)
    first_readable(files)
    epoch_size = config.epoch_size or len(files)
    defaults = DEFAULT_OPTIMIZERS[config.model]
    lr = config.lr if config.lr is not None else defaults.lr
    run = {
        "model_name": config.model,
        "preset": config.preset,
        "config": config_to_dict(model_config),
        "data_fingerprint": fingerprint,
        "seed": config.seed,
        # The settings that change the result; epochs, save_at, device and workers do not.
        "training": {
            "batch_size": config.batch_size,
            "lr": lr,
            "epoch_size": epoch_size,
            "image_size": image_size,
        },
    }

    existing = {}
    for epoch, path in saved_epochs(config.checkpoints, config.model).items():
        difference = _run_difference(read_checkpoint(path, mmap=True), run)
        if difference:
            raise FactoryError(
                f"{path} is from another training run ({difference}); use another --checkpoints folder or remove it"
            )
        existing[epoch] = path
    missing = [epoch for epoch in save_at if epoch not in existing]

    torch.manual_seed(config.seed)
    model = build_model(config.model, config=model_config).to(device)
    multiple = getattr(model, "size_multiple", 1)  # the VAE is built for the crop size itself
    if image_size % multiple:
        raise ConfigError(
            f"--image-size {image_size} must be a multiple of {multiple} for {config.model} "
            f"(e.g. {image_size - image_size % multiple or multiple})"
        )
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=lr, betas=defaults.betas, weight_decay=defaults.weight_decay
    )
    start_epoch, steps = 0, 0
    resumable = [
        epoch for epoch in existing if epoch <= config.epochs and (not missing or epoch < min(missing))
    ]
    if resumable:
        start_epoch = max(resumable)
        payload = read_checkpoint(existing[start_epoch])
        model.load_state_dict(payload["weights"])
        if "optimizer" in payload:
            optimizer.load_state_dict(payload["optimizer"])
        steps = int(payload["steps"])
        log.info(
            "resuming %s from %s (epoch %d, %d steps)",
            config.model,
            existing[start_epoch],
            start_epoch,
            steps,
        )
    end_epoch = max(missing) if missing else start_epoch

    # A fixed batch (its own stream, no real epoch reaches it) to measure the loss before and after.
    order = epoch_order(len(files), config.batch_size, config.seed, EVALUATION_STREAM)
    evaluation = EpochSamples(files, order, image_size, config.seed, EVALUATION_STREAM)
    evaluation_batch = torch.stack([evaluation[position][0] for position in range(len(evaluation))])
    initial_loss = evaluation_loss(model, evaluation_batch, config.seed, device, config.bf16)

    written: list[Path] = []
    skipped_total, trained_images, train_seconds = 0, 0, 0.0
    model.train()
    for epoch in range(start_epoch + 1, end_epoch + 1):
        torch.manual_seed(_torch_seed(config.seed, epoch))
        order = epoch_order(len(files), epoch_size, config.seed, epoch)
        samples = EpochSamples(files, order, image_size, config.seed, epoch)
        bar = tqdm(
            total=len(samples),
            desc=f"{config.model} epoch {epoch}/{end_epoch}",
            unit="img",
            disable=not config.progress,
            leave=False,
        )
        skipped_epoch = 0
        started = time.perf_counter()
        for batch, skipped in _loader(samples, config, device):
            x = batch.to(device, non_blocking=True)
            with _autocast(device, config.bf16):
                loss, logs = model.loss(x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            value = loss.item()
            if not math.isfinite(value):
                raise FactoryError(
                    f"{config.model} training diverged (loss {value}) at epoch {epoch}, step {steps}; try a lower --lr"
                )
            skipped_epoch += int(skipped.sum())
            bar.update(len(batch))
            elapsed = time.perf_counter() - started
            bar.set_postfix(loss=f"{value:.4f}", img_per_s=f"{bar.n / max(elapsed, 1e-9):.1f}")
        bar.close()
        train_seconds += time.perf_counter() - started
        trained_images += len(samples)
        if skipped_epoch:
            log.warning("epoch %d: skipped %d unreadable training image reads", epoch, skipped_epoch)
        skipped_total += skipped_epoch
        if epoch in missing:
            path = save_checkpoint(
                checkpoint_path(config.checkpoints, config.model, epoch),
                model_name=config.model,
                preset=config.preset,
                config=model_config,
                model=model,
                epoch=epoch,
                steps=steps,
                data_fingerprint=fingerprint,
                seed=config.seed,
                optimizer=optimizer,
                training=run["training"],
            )
            written.append(path)
            log.info("saved %s", path)

    final_loss = evaluation_loss(model, evaluation_batch, config.seed, device, config.bf16)
    return TrainResult(
        checkpoints=written,
        start_epoch=start_epoch,
        end_epoch=end_epoch,
        steps=steps,
        initial_loss=initial_loss,
        final_loss=final_loss,
        images_per_second=trained_images / train_seconds if train_seconds else 0.0,
        skipped_images=skipped_total,
        files=len(files),
        existing=[existing[epoch] for epoch in save_at if epoch in existing],
    )


# How `factory build` trains a missing checkpoint when it runs on its embedded default (scikit-image's 7 bundled
# photos, 256 crops, LR 64x64) and the user gave no training data. "Epoch E" cannot mean E passes over 7 photos there:
# that is E optimiser steps, and the model would reconstruct nothing (measured: PSNR 10.7 dB against x). The paper's
# epoch 8 is 8 passes over Tiny-ImageNet's 100,000 images, tens of thousands of steps, which a 2-core CPU cannot do
# inside the README command's 5 minutes. So the embedded default trains on crops of the size it reconstructs (its LR
# size, 64), 40 steps of 16 an epoch, at 1e-3 instead of the reference 3e-4: measured here for VQ-VAE-2 `paper`, epoch
# 8 = 320 steps in ~110 s and x_deg at 21.6 dB against x (3e-4: 16.4 dB) -- undertrained, with the image's structure.
# Only the fully convolutional VQ-VAEs train at any size; the other models keep their defaults (native size and rate).
EMBEDDED_DEFAULT_STEPS_PER_EPOCH = 40
EMBEDDED_DEFAULT_LR = 1e-3
EMBEDDED_DEFAULT_RECIPE_MODELS = ("vqvae", "vqvae2")


def train_for_build(
    *,
    model: str,
    epoch: int,
    checkpoints: str | os.PathLike,
    data: Sequence[str | os.PathLike],
    preset: str | None = None,
    seed: int = 0,
    embedded_default_lr_size: int | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train the checkpoint a build needs (`<checkpoints>/<model>/epoch-<epoch>.pt`).

    With the default settings (the model's native size, an epoch = the images found, the reference learning rate),
    or, when `embedded_default_lr_size` is given (the build's embedded default, LR images of that side), with the
    embedded default's recipe above (VQ-VAE and VQ-VAE-2 only)."""
    recipe: dict[str, Any] = {}
    if embedded_default_lr_size is not None and model in EMBEDDED_DEFAULT_RECIPE_MODELS:
        batch_size = TrainConfig.batch_size
        recipe = {
            # Whole crops for VQ-VAE (a multiple of 4) and VQ-VAE-2 (of 8): an LR side such as 50 (--crop 200)
            # trains on 48.
            "image_size": max(16, embedded_default_lr_size - embedded_default_lr_size % 8),
            "epoch_size": EMBEDDED_DEFAULT_STEPS_PER_EPOCH * batch_size,
            "lr": EMBEDDED_DEFAULT_LR,
        }
    config = TrainConfig(
        model=model,
        data=tuple(str(item) for item in data),
        epochs=epoch,
        save_at=(epoch,),
        preset=preset or "paper",
        checkpoints=str(checkpoints),
        seed=seed,
        progress=progress,
        **recipe,
    )
    return train(config)
