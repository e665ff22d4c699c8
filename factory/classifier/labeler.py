"""The Labeler: a trained classifier, ready to label LR images of any size.

Large images. The classifier sees 64x64 inputs. A 256x256 LR image is cut into non-overlapping 64x64 tiles (plus
end-aligned tiles when a side is not a multiple of 64), each tile is classified, and the image's class
probabilities are the mean of its tiles'. Resizing the image to 64x64 instead would average away exactly what the
classifier has to see (noise, blocking, blur at the pixel scale) and relabel every pair as "clean-looking" blur.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from factory.classifier.checkpoint import load_classifier
from factory.classifier.network import normalise
from factory.devices import resolve_device
from factory.manifests import LABEL_PROB_COLUMNS


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
        """Load a classifier written by `train_classifier` onto `device` (a name factory.devices resolves). Raises
        FactoryError for a missing or foreign file, or an absent device."""
        device = resolve_device(str(device))
        saved = load_classifier(path)
        return cls(saved.network.to(device), saved.classes, saved.input_size, saved.arch, saved.sha256)

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
        logits = self.network(normalise(tiles.flatten(0, 1)))
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
