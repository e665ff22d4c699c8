"""The degradation classifier of the paper's diversity analysis (Section 4.3.1): train it, label pairs with it, and
measure a dataset's degradation diversity (Eq. 2).

    factory classifier train --data photos/ --arch resnet18 --per-class 200 --epochs 5 --out classifier.safetensors
    factory label --classifier classifier.safetensors --dataset vqvae2-ep8

Training data. The paper uses a ResNet-152 trained on Tiny-ImageNet-C (15 corruption classes, 2,000 images each).
We synthesise the same kind of set from any image folder: random square crops (side drawn between the input size and
4x it, bicubic-resized to the input size: Tiny-ImageNet images are whole, downscaled photos), one of the 15
corruptions at a severity drawn uniformly from 1-5 (factory.corruptions, the published 64x64 parameters), then a
JPEG quality-85 round trip, because every Tiny-ImageNet-C file was stored that way (make_tinyimagenet_c.py).

Network. torchvision's ResNet (resnet152 as in the paper, resnet50, resnet18), `weights=None` (trained from scratch,
nothing downloaded), with the stem adapted to 64x64 inputs: the 7x7 stride-2 first convolution becomes 3x3 stride 1,
so the first layer sees every pixel at full resolution (noise, JPEG blocks and pixelation live at the pixel scale),
and the 2x max-pool is kept, so the stages run at 32, 16, 8 and 4 pixels and the cost stays near ImageNet ResNet at
128 pixels (dropping the pool as well would make CPU training 4x slower).

Large images. The classifier sees 64x64 inputs. A 256x256 LR image is cut into non-overlapping 64x64 tiles (plus
end-aligned tiles when a side is not a multiple of 64), each tile is classified, and the image's class
probabilities are the mean of its tiles'. Resizing the image to 64x64 instead would average away exactly what the
classifier has to see (noise, blocking, blur at the pixel scale) and relabel every pair as "clean-looking" blur.

Diversity. H = -sum_c P(c) log P(c) over the proportions of predicted classes (Eq. 2), in nats: `factory.diversity`
(torch-free, re-exported here).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn
from tqdm import tqdm

from factory.checkpoints import file_sha256
from factory.color import bicubic_resize
from factory.config import FactoryError, config_to_dict, error_line
from factory.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from factory.devices import resolve_device
from factory.diversity import degradation_entropy, labels_card  # re-exported: the classifier API names them
from factory.manifests import (
    CARD_NAME,
    LABEL_PROB_COLUMNS,
    LOCK_NAME,
    PAIR_SCHEMA,
    pair_manifest_paths,
    read_manifest,
    read_manifests,
)
from factory.shards import decode_image, read_samples
from factory.sources import RejectedImage, find_images, load_rgb
from factory.storage import OutputLock, Storage, atomic_path

logger = logging.getLogger(__name__)

ARCHITECTURES: tuple[str, ...] = ("resnet152", "resnet50", "resnet18")
CHECKPOINT_FORMAT = "factory-degradation-classifier/1"
STORAGE_JPEG_QUALITY = (
    85  # Tiny-ImageNet-C's files are JPEG quality 85 (make_tinyimagenet_c.py, `save(..., quality=85)`)
)
MAX_CROP_ZOOM = 4  # crops span 1x to 4x the input size before resizing
LABEL_COLUMNS: tuple[str, ...] = (
    "label",
    "label_prob",
    "classifier_sha256",
    *LABEL_PROB_COLUMNS,
)  # manifest columns


# --------------------------------------------------------------------------------------------------------------------
# Diversity entropy (Eq. 2)
# --------------------------------------------------------------------------------------------------------------------


def dataset_entropy(manifests_root: str | os.PathLike, dataset: str | None = None) -> float | None:
    """Eq. 2 over a dataset's manifest labels (nats); None when no pair is labelled yet."""
    labels = read_manifests(manifests_root, dataset).column("label").to_pylist()
    labelled = [label for label in labels if label is not None]
    return degradation_entropy(labelled) if labelled else None


# --------------------------------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------------------------------


def build_network(arch: str, num_classes: int = len(CORRUPTIONS)) -> nn.Module:
    """A torchvision ResNet with random weights and the 64x64 stem (3x3 stride-1 first convolution, max-pool kept)."""
    if arch not in ARCHITECTURES:
        raise FactoryError(f"unknown classifier architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    network = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    network.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    return network


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """x: (N, 3, h, w) in [0, 1] -> centred on 0 in [-1, 1]. A fixed affine map, so absolute brightness and contrast
    (which several classes are about) stay visible to the network."""
    return x * 2 - 1


# --------------------------------------------------------------------------------------------------------------------
# Synthetic Tiny-ImageNet-C-like data
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CorruptedSet:
    images: np.ndarray  # (N, size, size, 3) uint8
    labels: np.ndarray  # (N,) int64, index into CORRUPTIONS
    severities: np.ndarray  # (N,) int64 in 1..5


def random_crop(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
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
        crop = random_crop(usable[int(rng.integers(len(usable)))], size, rng)
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


# --------------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------------


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
    device: str = "cpu"  # torch device
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


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, h, w, 3) uint8 -> (N, 3, h, w) float in [0, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


@torch.no_grad()
def _predict_batches(
    network: nn.Module, images: np.ndarray, device: torch.device, batch_size: int
) -> np.ndarray:
    """Class indices for (N, h, w, 3) uint8 images."""
    network.eval()
    predictions = []
    for start in range(0, len(images), batch_size):
        x = _to_tensor(images[start : start + batch_size]).to(device)
        predictions.append(network(_normalise(x)).argmax(dim=1).cpu().numpy())
    return np.concatenate(predictions) if predictions else np.empty(0, np.int64)


def train_classifier(config: ClassifierTrainConfig, sources: list[np.ndarray] | None = None) -> TrainResult:
    """Synthesise the set, train the network from scratch, evaluate on the held-out split, save everything.

    `sources` (decoded images) replaces reading `config.data` when given (tests)."""
    if config.arch not in ARCHITECTURES:
        raise FactoryError(
            f"unknown classifier architecture {config.arch!r}; known: {', '.join(ARCHITECTURES)}"
        )
    if config.per_class < 2 or config.epochs < 1 or config.size < 8 or not 0 < config.holdout_fraction < 1:
        raise FactoryError("need per_class >= 2, epochs >= 1, size >= 8 and 0 < holdout_fraction < 1")
    if config.batch_size < 1 or not config.learning_rate > 0 or config.weight_decay < 0:
        raise FactoryError("need batch_size >= 1, learning_rate > 0 and weight_decay >= 0")
    if config.threads is not None and config.threads < 1:
        raise FactoryError(f"--threads must be at least 1, got {config.threads}")
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
            x = _to_tensor(data.images[batch]).to(device)
            flip = torch.from_numpy(order_rng.random(len(batch)) < 0.5).to(device)
            x = torch.where(
                flip[:, None, None, None], x.flip(-1), x
            )  # corruptions are mirror-symmetric classes
            y = torch.from_numpy(data.labels[batch]).to(device)
            loss = F.cross_entropy(network(_normalise(x)), y)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            progress.set_postfix(loss=f"{loss.item():.3f}")

    predicted = _predict_batches(network, data.images[holdout_index], device, config.batch_size * 2)
    truth = data.labels[holdout_index]
    confusion = np.zeros((len(CORRUPTIONS), len(CORRUPTIONS)), np.int64)
    np.add.at(confusion, (truth, predicted), 1)
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
                "train_images": int(len(train_index)),
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


# --------------------------------------------------------------------------------------------------------------------
# Saving and loading
# --------------------------------------------------------------------------------------------------------------------


def save_classifier(network: nn.Module, config: ClassifierTrainConfig, accuracy: float, path: Path) -> None:
    """safetensors weights plus metadata (format, class names, arch, input size, accuracy, config), atomically."""
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "classes": json.dumps(list(CORRUPTIONS)),
        "arch": config.arch,
        "input_size": str(config.size),
        "holdout_accuracy": f"{accuracy:.6f}",
        "config": json.dumps(config_to_dict(config)),
    }
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in network.state_dict().items()}
    with atomic_path(path) as temporary:
        save_file(tensors, temporary, metadata=metadata)


# --------------------------------------------------------------------------------------------------------------------
# Labelling
# --------------------------------------------------------------------------------------------------------------------


def tile_origins(length: int, tile: int) -> list[int]:
    """Start offsets of tiles covering [0, length): non-overlapping from 0, plus one end-aligned tile if the length is
    not a multiple of the tile (it overlaps its neighbour). length >= tile."""
    origins = list(range(0, length - tile + 1, tile))
    if origins[-1] + tile < length:
        origins.append(length - tile)
    return origins


class Labeler:
    """A trained degradation classifier, ready to label LR images of any size.

    labeler = Labeler.load("classifier.safetensors", device="cuda")
    labels, probabilities = labeler.predict(lr)     # lr: (N, 3, h, w) in [0, 1]
    """

    def __init__(self, network: nn.Module, classes: tuple[str, ...], input_size: int, arch: str, sha256: str):
        self.network = network.eval()
        self.classes = classes  # class names, in output order (CORRUPTIONS)
        self.input_size = input_size  # tile side in pixels
        self.arch = arch
        self.sha256 = sha256  # of the checkpoint file (manifest column classifier_sha256)
        self.device = next(network.parameters()).device

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> Labeler:
        """Load a classifier written by `train_classifier`. Raises FactoryError for a missing or foreign file."""
        path = Path(path)
        device = resolve_device(str(device))
        if not path.is_file():
            raise FactoryError(f"no classifier at {path}")
        try:
            with safe_open(str(path), framework="pt") as file:
                metadata = file.metadata() or {}
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as error:
            raise FactoryError(f"{path} is not a safetensors classifier: {error}") from None
        if metadata.get("format") != CHECKPOINT_FORMAT:
            raise FactoryError(
                f"{path} is not a factory degradation classifier (format {metadata.get('format')!r})"
            )
        classes = tuple(json.loads(metadata["classes"]))
        if classes != CORRUPTIONS:
            raise FactoryError(
                f"{path} predicts classes {classes}, not the 15 of factory.corruptions.CORRUPTIONS"
            )
        network = build_network(metadata["arch"], len(classes))
        try:
            network.load_state_dict(tensors)
        except RuntimeError as error:
            raise FactoryError(f"{path}: weights do not fit {metadata['arch']}: {error}") from None
        return cls(
            network.to(device), classes, int(metadata["input_size"]), metadata["arch"], file_sha256(path)
        )

    @torch.no_grad()
    def tile_probabilities(self, lr: torch.Tensor) -> torch.Tensor:
        """Per-tile class probabilities. lr: (N, 3, h, w) in [0, 1] -> (N, T, 15), T tiles per image (see
        `tile_origins`; images smaller than a tile are reflect-padded up to it, so no pixel is resampled)."""
        if lr.ndim != 4 or lr.shape[1] != 3:
            raise ValueError(f"expected (N, 3, h, w), got {tuple(lr.shape)}")
        tile = self.input_size
        lr = lr.to(self.device, torch.float32)
        height, width = lr.shape[-2:]
        if height < tile or width < tile:
            pad_height, pad_width = max(0, tile - height), max(0, tile - width)
            mode = "reflect" if pad_height < height and pad_width < width else "replicate"
            lr = F.pad(lr, (0, pad_width, 0, pad_height), mode=mode)
            height, width = lr.shape[-2:]
        tiles = torch.stack(
            [
                lr[:, :, top : top + tile, left : left + tile]
                for top in tile_origins(height, tile)
                for left in tile_origins(width, tile)
            ],
            dim=1,
        )  # (N, T, 3, tile, tile)
        count, tiles_per_image = tiles.shape[:2]
        logits = self.network(_normalise(tiles.flatten(0, 1)))
        return logits.softmax(dim=1).reshape(count, tiles_per_image, -1)

    @torch.no_grad()
    def predict(self, lr: torch.Tensor) -> tuple[list[str], torch.Tensor]:
        """lr: (N, 3, h, w) in [0, 1] -> (labels: N class names, probabilities: (N, 15) on the CPU), the image's
        probabilities being the mean over its tiles."""
        probabilities = self.tile_probabilities(lr).mean(dim=1).cpu()
        return [self.classes[index] for index in probabilities.argmax(dim=1).tolist()], probabilities

    def manifest_columns(self, labels: list[str], probabilities: torch.Tensor) -> dict[str, list]:
        """The manifest's label columns for a batch: label, label_prob, classifier_sha256 and p_<class>."""
        values = probabilities.float().numpy()
        columns: dict[str, list] = {
            "label": list(labels),
            "label_prob": [
                float(row[self.classes.index(label)]) for row, label in zip(values, labels, strict=True)
            ],
            "classifier_sha256": [self.sha256] * len(labels),
        }
        for index, name in enumerate(LABEL_PROB_COLUMNS):
            columns[name] = values[:, index].tolist()
        return columns


# --------------------------------------------------------------------------------------------------------------------
# Relabelling an existing dataset
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelConfig:
    classifier: str  # classifier checkpoint (safetensors from `factory classifier train`)
    shards: str = "shards"  # shard root: <shards>/<dataset>/<dataset>-NNNNNN.tar
    manifests: str = "manifests"  # manifest root: <manifests>/<dataset>/<dataset>-NNNNNN.parquet
    dataset: str | None = None  # one dataset, or every dataset under the manifest root
    batch_size: int = 64  # LR images per classifier call
    device: str = "cpu"


@dataclass(frozen=True)
class LabelResult:
    pairs: int  # pairs labelled
    manifests: int  # manifest files rewritten
    entropy: dict[str, float]  # per dataset, Eq. 2 in nats
    counts: dict[str, dict[str, int]]  # per dataset, pairs per predicted class


def _read_lr_images(shards: Storage, shard: str, keys: set[str]) -> dict[str, np.ndarray]:
    """The LR images of `keys` from one WebDataset tar, streamed (never extracted): {key: (h, w, 3) uint8}."""
    images: dict[str, np.ndarray] = {}
    try:
        with shards.open_input(shard) as stream:
            for sample in read_samples(stream):
                if sample.key not in keys:
                    continue
                for field, data in sample.members.items():
                    if field.startswith("lr."):
                        images[sample.key] = decode_image(field, data)
    except FileNotFoundError:
        raise FactoryError(f"shard {shards.uri(shard)} is missing") from None
    except (OSError, tarfile.TarError, ValueError) as error:
        raise FactoryError(f"cannot read shard {shards.uri(shard)}: {error}") from None
    return images


def label_dataset(config: LabelConfig) -> LabelResult:
    """(Re)label every pair of a dataset by rewriting only its Parquet manifests (then its card's `labels` section),
    one file at a time, each atomically (temporary name, then rename: `Storage.open_atomic`), keeping each
    manifest's commit record (its Parquet metadata) so `factory verify` still holds. Shards are only read; their
    `json` members keep the labels of the build (the manifests are authoritative). If interrupted, each manifest is
    wholly old or wholly new (`classifier_sha256` tells which). Each dataset's build lock is held meanwhile: a
    dataset that a build is still writing is refused, naming the build."""
    if config.batch_size < 1:
        raise FactoryError(f"--batch-size must be at least 1, got {config.batch_size}")
    resolve_device(config.device)  # an absent device is said before any manifest is read
    shards, manifests = Storage(config.shards), Storage(config.manifests)
    paths = pair_manifest_paths(manifests, config.dataset)
    if not paths:
        where = manifests.uri(config.dataset or "")
        raise FactoryError(f"no pair manifests under {where}")
    labeler = Labeler.load(config.classifier, config.device)
    with contextlib.ExitStack() as locks:
        # The build's lock, per dataset: labelling while a build still writes would leave the pairs it adds
        # unlabelled, and a build started meanwhile is refused.
        for dataset in sorted({path.partition("/")[0] for path in paths}):
            locks.enter_context(
                OutputLock(manifests, f"{dataset}/{LOCK_NAME}", "label", f"dataset {dataset}")
            )
        paths = pair_manifest_paths(manifests, config.dataset)  # as they are now that no build writes them
        # Every manifest readable before any is rewritten: a corrupt one is said, and nothing is half-relabelled.
        metadata = {path: _manifest_metadata(manifests, path) for path in paths}
        counts = _relabel(config, labeler, shards, manifests, paths, metadata)
        for dataset, labels in counts.items():
            _update_card_labels(manifests, dataset, labels, labeler.sha256)
    return LabelResult(
        pairs=sum(sum(labels.values()) for labels in counts.values()),
        manifests=len(paths),
        entropy={name: degradation_entropy(counter) for name, counter in counts.items()},
        counts={name: dict(counter) for name, counter in counts.items()},
    )


def _manifest_metadata(manifests: Storage, path: str) -> dict:
    """A pair manifest's Parquet key-value metadata (its commit record); an unreadable file is a one-line error."""
    try:
        with manifests.open_input(path) as handle:
            return pq.read_schema(handle).metadata
    except (OSError, pa.ArrowException) as error:
        raise FactoryError(f"unreadable manifest {manifests.uri(path)}: {error_line(error)}") from None


def _relabel(
    config: LabelConfig,
    labeler: Labeler,
    shards: Storage,
    manifests: Storage,
    paths: list[str],
    metadata: dict,
) -> dict[str, Counter]:
    """Rewrite each manifest's label columns, one file at a time, atomically; pairs per label, per dataset."""
    counts: dict[str, Counter] = {}
    for path in tqdm(paths, desc="labelling", unit="manifest"):
        try:
            table = read_manifest(manifests, path)
        except (OSError, pa.ArrowException) as error:
            raise FactoryError(f"unreadable manifest {manifests.uri(path)}: {error_line(error)}") from None
        rows = table.select(["key", "shard", "dataset"]).to_pylist()
        new_columns: dict[str, list] = {name: [None] * len(rows) for name in LABEL_COLUMNS}
        for shard in sorted({row["shard"] for row in rows}):
            indices = [index for index, row in enumerate(rows) if row["shard"] == shard]
            keys = [rows[index]["key"] for index in indices]
            images = _read_lr_images(shards, shard, set(keys))
            missing = [key for key in keys if key not in images]
            if missing:
                raise FactoryError(
                    f"{manifests.uri(path)}: shard {shard} has no LR image for {len(missing)} key(s), e.g. {missing[0]}"
                )
            for start in range(0, len(indices), config.batch_size):
                batch = indices[start : start + config.batch_size]
                labels, probabilities = _predict_any_sizes(
                    labeler, [images[rows[index]["key"]] for index in batch]
                )
                for name, values in labeler.manifest_columns(labels, probabilities).items():
                    for index, value in zip(batch, values, strict=True):
                        new_columns[name][index] = value
        for name, values in new_columns.items():
            field = PAIR_SCHEMA.field(name)
            table = table.set_column(table.schema.get_field_index(name), field, pa.array(values, field.type))
        table = table.replace_schema_metadata(metadata[path])
        with manifests.open_atomic(path) as stream:
            pq.write_table(table, stream)
        for row, label in zip(rows, new_columns["label"], strict=True):
            counts.setdefault(row["dataset"], Counter())[label] += 1
    return counts


def _update_card_labels(manifests: Storage, dataset: str, labels: Counter, classifier_sha256: str) -> None:
    """Rewrite the `labels` section of the dataset's card (`_card.json`, beside its manifests) atomically, from the
    labels just written to every one of its manifests; a dataset without a card gets none."""
    card_path = f"{dataset}/{CARD_NAME}"
    if not manifests.exists(card_path):
        return
    card = json.loads(manifests.read_bytes(card_path))
    card["labels"] = labels_card(labels.elements(), [classifier_sha256])
    manifests.write_bytes_atomic(card_path, json.dumps(card, indent=2, sort_keys=True, default=str).encode())


def _predict_any_sizes(labeler: Labeler, images: list[np.ndarray]) -> tuple[list[str], torch.Tensor]:
    """`Labeler.predict` over (h, w, 3) uint8 images that may differ in size: one call per distinct size, results in
    input order."""
    by_size: dict[tuple[int, int], list[int]] = {}
    for index, image in enumerate(images):
        by_size.setdefault(image.shape[:2], []).append(index)
    labels: list[str] = [""] * len(images)
    probabilities = torch.empty(len(images), len(labeler.classes))
    for indices in by_size.values():
        batch = _to_tensor(np.stack([images[index] for index in indices]))
        batch_labels, batch_probabilities = labeler.predict(batch)
        for position, index in enumerate(indices):
            labels[index] = batch_labels[position]
            probabilities[index] = batch_probabilities[position]
    return labels, probabilities
