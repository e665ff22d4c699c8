"""The report's own figures (the stats figures come from factory.stats, the image sheets from factory.preview):
metrics against the colour shift (Figures 10 / 11), dataset properties against the metric gain, and the image
material the sheets are drawn from (reconstructions by epoch, SR crops)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

FIGURE_DPI = 110


@dataclass(frozen=True)
class Point:
    x: float
    y: float
    label: str  # the run or dataset it stands for


@dataclass(frozen=True)
class Panel:
    xlabel: str
    ylabel: str
    points: list[Point]


def save_figure(figure: Figure, path: Path) -> Path:
    """PNG at FIGURE_DPI (the caller writes into a temporary folder that is published whole)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=FIGURE_DPI)
    path.write_bytes(buffer.getvalue())
    return path


def panels_figure(panels: Sequence[Panel], title: str, columns: int, connect: bool) -> Figure:
    """A grid of scatter panels, each point labelled; `connect` joins the points in x order (a curve over ΔE)."""
    rows = -(-len(panels) // columns)
    figure = Figure(figsize=(4.2 * columns, 3.3 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False)
    for axis, panel in zip(axes.flat, panels, strict=False):
        ordered = sorted(panel.points, key=lambda point: point.x)
        xs, ys = [point.x for point in ordered], [point.y for point in ordered]
        axis.plot(xs, ys, marker="o", linestyle="-" if connect else "none", color="tab:blue")
        for point in ordered:
            axis.annotate(
                point.label, (point.x, point.y), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
        axis.set_xlabel(panel.xlabel)
        axis.set_ylabel(panel.ylabel)
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(panels) :]:
        axis.set_visible(False)
    figure.suptitle(title)
    return figure


def centre_crop(image: np.ndarray, side: int) -> np.ndarray:
    """image: (H, W, 3) -> its centre (side, side, 3) crop (smaller when the image is)."""
    height, width = image.shape[:2]
    side = min(side, height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return image[top : top + side, left : left + side]


def as_batch(images: Sequence[np.ndarray]) -> torch.Tensor:
    """(H, W, 3) uint8 images of one size -> (N, 3, H, W) uint8, the layout factory.preview.epoch_sheet takes."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
