"""Training the classifier from scratch on a synthesised corrupted set (synthesis.py), then its held-out accuracy,
confusion matrix and metrics, written beside the checkpoint."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from factory.classifier.checkpoint import save_classifier
from factory.classifier.network import build_network, check_architecture, images_to_tensor, normalise
from factory.classifier.synthesis import STORAGE_JPEG_QUALITY, CorruptedSet, load_sources, synthesise
from factory.config import FactoryError, config_to_dict
from factory.corruptions import CORRUPTIONS
from factory.devices import resolve_device
from factory.storage import atomic_path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassifierTrainConfig:
    data: str  # folder of source images (any photos; random crops are corrupted)
    out: str = (
        "classifier.safetensors"  # checkpoint path; the confusion matrix goes beside it (.confusion.png)
    )
    arch: str = "resnet152"  # torchvision ResNet: resnet152 (the paper), resnet50, resnet18
    per_class: int = (
        2000  # synthetic images per class (Tiny-ImageNet-C has 2,000 per class in the paper's count)
    )
    size: int = 64  # input size in pixels (Tiny-ImageNet-C: 64)
    epochs: int = 10  # passes over the training split
    batch_size: int = 64
    learning_rate: float = 2e-3  # AdamW peak rate, one-cycle schedule
    weight_decay: float = 5e-4
    holdout_fraction: float = 0.2  # of each class, kept out of training for the accuracy and confusion matrix
    storage_jpeg_quality: int | None = STORAGE_JPEG_QUALITY  # JPEG round trip after corrupting (None: skip)
    seed: int = 0
    device: str = "auto"  # torch device (factory.devices: auto, cpu, cuda, cuda:N, mps)
    threads: int | None = None  # torch intra-op threads (None: torch's default)


@dataclass(frozen=True)
class TrainResult:
    checkpoint: Path  # the saved classifier
    figure: Path  # the confusion-matrix PNG
    metrics: Path  # JSON: accuracy, per-class accuracy, confusion counts, config
    accuracy: float  # held-out top-1 accuracy
    confusion: np.ndarray  # (15, 15) counts, rows = true class, columns = predicted
    most_confused: list[
        tuple[str, str, float]
    ]  # (true, predicted, fraction of the true class), largest first


def _split(
    labels: np.ndarray, holdout_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split: per class, a shuffled `holdout_fraction` (at least one) is held out."""
    train, holdout = [], []
    for class_index in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == class_index))
        count = max(1, int(round(len(members) * holdout_fraction)))
        holdout.append(members[:count])
        train.append(members[count:])
    return np.concatenate(train), np.concatenate(holdout)


@torch.no_grad()
def _predict_batches(
    network: nn.Module, images: np.ndarray, device: torch.device, batch_size: int
) -> np.ndarray:
    """Class indices for (N, h, w, 3) uint8 images."""
    network.eval()
    predictions = []
    for start in range(0, len(images), batch_size):
        x = images_to_tensor(images[start : start + batch_size]).to(device)
        predictions.append(network(normalise(x)).argmax(dim=1).cpu().numpy())
    return np.concatenate(predictions) if predictions else np.empty(0, np.int64)


def check_train_config(config: ClassifierTrainConfig) -> None:
    """A FactoryError for any setting training cannot run with, before anything is read or synthesised."""
    check_architecture(config.arch)
    if config.per_class < 2 or config.epochs < 1 or config.size < 8 or not 0 < config.holdout_fraction < 1:
        raise FactoryError("need per_class >= 2, epochs >= 1, size >= 8 and 0 < holdout_fraction < 1")
    if config.batch_size < 1 or not config.learning_rate > 0 or config.weight_decay < 0:
        raise FactoryError("need batch_size >= 1, learning_rate > 0 and weight_decay >= 0")
    if config.threads is not None and config.threads < 1:
        raise FactoryError(f"--threads must be at least 1, got {config.threads}")


def train_classifier(config: ClassifierTrainConfig, sources: list[np.ndarray] | None = None) -> TrainResult:
    """Synthesise the set, train the network from scratch, evaluate on the held-out split, save everything.

    `sources` (decoded images) replaces reading `config.data` when given (tests)."""
    check_train_config(config)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    if sources is None:
        sources = load_sources(config.data, config.size)
    data = synthesise(
        sources, config.per_class, config.size, config.seed, config.storage_jpeg_quality, progress=True
    )
    train_index, holdout_index = _split(
        data.labels, config.holdout_fraction, np.random.default_rng(config.seed + 1)
    )
    logger.info(
        "synthesised %d images: %d train, %d held out", len(data.labels), len(train_index), len(holdout_index)
    )
    network = build_network(config.arch).to(device)
    fit(network, data, train_index, config, device)
    predicted = _predict_batches(network, data.images[holdout_index], device, config.batch_size * 2)
    confusion = np.zeros((len(CORRUPTIONS), len(CORRUPTIONS)), np.int64)
    np.add.at(confusion, (data.labels[holdout_index], predicted), 1)
    return _save_results(network, config, confusion, train_images=len(train_index))


def fit(
    network: nn.Module,
    data: CorruptedSet,
    train_index: np.ndarray,
    config: ClassifierTrainConfig,
    device: torch.device,
) -> None:
    """Train `network` in place on `data.images[train_index]`: AdamW under a one-cycle schedule, random
    horizontal flips, batches in an order drawn from (seed + 2)."""
    optimiser = torch.optim.AdamW(
        network.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    steps_per_epoch = math.ceil(len(train_index) / config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=config.learning_rate, total_steps=steps_per_epoch * config.epochs
    )
    order_rng = np.random.default_rng(config.seed + 2)
    for epoch in range(config.epochs):
        network.train()
        order = order_rng.permutation(train_index)
        progress = tqdm(range(0, len(order), config.batch_size), desc=f"epoch {epoch + 1}/{config.epochs}")
        for start in progress:
            batch = order[start : start + config.batch_size]
            x = images_to_tensor(data.images[batch]).to(device)  # (B, 3, size, size)
            flip = torch.from_numpy(order_rng.random(len(batch)) < 0.5).to(device)
            x = torch.where(
                flip[:, None, None, None], x.flip(-1), x
            )  # corruptions are mirror-symmetric classes
            y = torch.from_numpy(data.labels[batch]).to(device)
            loss = F.cross_entropy(network(normalise(x)), y)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            progress.set_postfix(loss=f"{loss.item():.3f}")


def _save_results(
    network: nn.Module, config: ClassifierTrainConfig, confusion: np.ndarray, train_images: int
) -> TrainResult:
    """The checkpoint, the confusion-matrix figure and the metrics JSON, each written atomically."""
    accuracy = float(np.trace(confusion) / confusion.sum())
    out = Path(config.out)
    save_classifier(network, config, accuracy, out)
    figure = out.with_suffix(".confusion.png")
    save_confusion_figure(confusion, figure, title=f"{config.arch}, held-out accuracy {accuracy:.1%}")
    most_confused = _most_confused(confusion)
    metrics = out.with_suffix(".metrics.json")
    _write_text_atomic(
        metrics,
        json.dumps(
            {
                "accuracy": accuracy,
                "chance": 1 / len(CORRUPTIONS),
                "holdout_images": int(confusion.sum()),
                "train_images": int(train_images),
                "classes": list(CORRUPTIONS),
                "per_class_accuracy": dict(
                    zip(CORRUPTIONS, (np.diag(confusion) / confusion.sum(axis=1)).tolist(), strict=True)
                ),
                "confusion": confusion.tolist(),
                "most_confused": most_confused[:10],
                "config": config_to_dict(config),
            },
            indent=2,
        ),
    )
    return TrainResult(out, figure, metrics, accuracy, confusion, most_confused)


def _most_confused(confusion: np.ndarray) -> list[tuple[str, str, float]]:
    """Off-diagonal cells as (true, predicted, fraction of the true class's held-out images), largest first."""
    fractions = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    pairs = [
        (CORRUPTIONS[true], CORRUPTIONS[guess], float(fractions[true, guess]))
        for true in range(len(CORRUPTIONS))
        for guess in range(len(CORRUPTIONS))
        if true != guess and confusion[true, guess]
    ]
    return sorted(pairs, key=lambda pair: -pair[2])


def save_confusion_figure(confusion: np.ndarray, path: Path, title: str) -> None:
    """A row-normalised confusion matrix (rows: true class, columns: predicted) as a PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    fractions = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    figure, axes = plt.subplots(figsize=(9, 8))
    shown = axes.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    axes.set_xticks(range(len(CORRUPTIONS)), CORRUPTIONS, rotation=60, ha="right")
    axes.set_yticks(range(len(CORRUPTIONS)), CORRUPTIONS)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    for true in range(len(CORRUPTIONS)):
        for guess in range(len(CORRUPTIONS)):
            if confusion[true, guess]:
                colour = "white" if fractions[true, guess] > 0.5 else "black"
                axes.text(
                    guess,
                    true,
                    f"{fractions[true, guess]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color=colour,
                )
    figure.colorbar(shown, ax=axes, fraction=0.046)
    figure.tight_layout()
    try:
        with atomic_path(path) as temporary:
            figure.savefig(temporary, dpi=120, format="png")
    finally:
        plt.close(figure)


def _write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as temporary:
        Path(temporary).write_text(text, encoding="utf-8")
