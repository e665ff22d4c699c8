"""`factory label`: (re)label an existing dataset with a trained classifier by rewriting its manifests.

A manifest rewriter, kept here rather than beside manifests.py's writers: it runs the classifier (torch, the
Labeler), and the Data layer (manifests.py) may import neither; what it writes goes through manifests.py's schema,
reader and file rule (`pair_manifest_paths`), and Storage's atomic writes.
"""

from __future__ import annotations

import contextlib
import json
import os
import tarfile
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from factory.classifier.labeler import Labeler
from factory.classifier.network import images_to_tensor
from factory.config import FactoryError, error_line
from factory.devices import resolve_device
from factory.diversity import degradation_entropy, labels_card
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
from factory.storage import OutputLock, Storage

LABEL_COLUMNS: tuple[str, ...] = (
    "label",
    "label_prob",
    "classifier_sha256",
    *LABEL_PROB_COLUMNS,
)  # manifest columns


def dataset_entropy(manifests_root: str | os.PathLike, dataset: str | None = None) -> float | None:
    """Eq. 2 over a dataset's manifest labels (nats); None when no pair is labelled yet."""
    labels = read_manifests(manifests_root, dataset).column("label").to_pylist()
    labelled = [label for label in labels if label is not None]
    return degradation_entropy(labelled) if labelled else None


@dataclass(frozen=True)
class LabelConfig:
    classifier: str  # classifier checkpoint (safetensors from `factory classifier train`)
    shards: str = "shards"  # shard root: <shards>/<dataset>/<dataset>-NNNNNN.tar
    manifests: str = "manifests"  # manifest root: <manifests>/<dataset>/<dataset>-NNNNNN.parquet
    dataset: str | None = None  # one dataset, or every dataset under the manifest root
    batch_size: int = 64  # LR images per classifier call
    device: str = "auto"  # torch device (factory.devices: auto, cpu, cuda, cuda:N, mps)


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
        batch = images_to_tensor(np.stack([images[index] for index in indices]))
        batch_labels, batch_probabilities = labeler.predict(batch)
        for position, index in enumerate(indices):
            labels[index] = batch_labels[position]
            probabilities[index] = batch_probabilities[position]
    return labels, probabilities
