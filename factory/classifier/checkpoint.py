"""The classifier's checkpoint: safetensors weights plus metadata (format, class names, arch, input size, held-out
accuracy, training config), written atomically and read back with every check a foreign file fails."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from factory.checkpoints import file_sha256
from factory.classifier.network import build_network
from factory.config import FactoryError, config_to_dict
from factory.corruptions import CORRUPTIONS
from factory.storage import atomic_path

if TYPE_CHECKING:
    from factory.classifier.training import ClassifierTrainConfig

CHECKPOINT_FORMAT = "factory-degradation-classifier/1"


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


@dataclass(frozen=True)
class SavedClassifier:
    network: nn.Module  # on the CPU, with the saved weights
    classes: tuple[str, ...]  # class names in output order (CORRUPTIONS)
    input_size: int  # tile side in pixels
    arch: str
    sha256: str  # of the checkpoint file


def load_classifier(path: str | os.PathLike) -> SavedClassifier:
    """Read a checkpoint written by `save_classifier`. Raises FactoryError for a missing or foreign file."""
    path = Path(path)
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
    return SavedClassifier(network, classes, int(metadata["input_size"]), metadata["arch"], file_sha256(path))
