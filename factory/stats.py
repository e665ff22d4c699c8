"""Dataset statistics and figures from the manifests (no shard is opened).

    factory stats --manifests manifests/ --plots figures/

Per dataset: pairs, colour difference ΔE (mean, median, 95th percentile over the pairs' mean ΔE), the histogram of
degradation labels, the degradation entropy H (paper Eq. 2) and the rejected inputs. Figures (PNG):

    delta_e_histogram.png    ΔE histogram, one panel per dataset
    delta_e_vs_epoch.png     mean ΔE against training epoch, one line per model (paper Figure 9)
    entropy_vs_epoch.png     entropy H against training epoch, one line per model (paper Figure 8)
    label_distribution.png   share of each degradation class, per dataset
    regime_vs_epoch.png      the checkpoints' regime (PSNR, SSIM, ΔE, checkerboard index on held-out LR images, as
                             `factory train` measured it and the card records it) against epoch, one line per model

Per dataset it also gives the medians of the pairs' PSNR, SSIM and checkerboard index (degraded LR against bicubic
LR) and the regime of the checkpoint that made them (from `_card.json`).

The per-epoch figures pool the pairs of every dataset with the same (model, epoch, colour correction) and leave out
datasets made by `factory filter` (their card names parent datasets): a filtered subset is not another epoch.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from matplotlib.figure import Figure

from factory.config import FactoryError, error_line
from factory.corruption_names import CORRUPTIONS
from factory.diversity import degradation_entropy
from factory.manifests import (
    CARD_NAME,
    REJECTS_NAME,
    check_manifest_root,
    dataset_folders,
    is_readable_dataset,
)
from factory.query import select
from factory.storage import Storage

logger = logging.getLogger(__name__)

STATS_COLUMNS = (
    "dataset",
    "model",
    "epoch",
    "color_corrected",
    "delta_e",
    "psnr",
    "ssim",
    "checkerboard",
    "label",
)
REGIME_PANELS = (  # (regime key, axis label) of regime_vs_epoch.png
    ("psnr", "PSNR (dB)"),
    ("ssim", "SSIM"),
    ("delta_e", "mean ΔE (CIEDE2000)"),
    ("checkerboard", "checkerboard index"),
)
FIGURE_NAMES = {
    "delta_e_histogram": "delta_e_histogram.png",
    "delta_e_vs_epoch": "delta_e_vs_epoch.png",
    "entropy_vs_epoch": "entropy_vs_epoch.png",
    "label_distribution": "label_distribution.png",
    "regime_vs_epoch": "regime_vs_epoch.png",
}
FIGURE_DPI = 120
HISTOGRAM_MIN_WIDTH = 6.0  # inches: the ΔE histogram's title (4.7 in at the default font) and a margin


@dataclass(frozen=True)
class StatsConfig:
    manifests_root: str | os.PathLike  # every dataset under it is described; a folder or a URI
    plots: Path | None = None  # folder for the PNG figures; None: no figures


@dataclass(frozen=True)
class DatasetStats:
    dataset: str
    model: str | None  # the dataset's model ("mixed" if its pairs come from several)
    epoch: int | None  # the checkpoint epoch (None for bicubic or mixed)
    derived: bool  # made by `factory filter` from parent datasets
    pairs: int
    delta_e_mean: float | None  # over the pairs' mean ΔE (None when the dataset has no pairs)
    delta_e_median: float | None
    delta_e_p95: float | None  # 95th percentile, numpy's linear interpolation
    labels: dict[str, int]  # pairs per degradation class, in CORRUPTIONS order, zeros included
    unlabelled: int  # pairs without a label yet
    entropy: float | None  # H over the labelled pairs (paper Eq. 2); None without labels or classifier
    rejects: int  # inputs recorded in _rejects.parquet
    psnr_median: float | None = None  # medians over the pairs, degraded LR against bicubic LR
    ssim_median: float | None = None
    checkerboard_median: float | None = None  # None: pairs from before the index was recorded
    regime: dict | None = None  # the card's checkpoint regime (factory.regime figures), None when absent


@dataclass(frozen=True)
class EpochPoint:
    epoch: int
    pairs: int
    delta_e_mean: float
    entropy: float | None


@dataclass(frozen=True)
class StatsReport:
    datasets: list[DatasetStats]
    curves: dict[str, list[EpochPoint]]  # series name ("vqvae2", "mae (colour-corrected)") -> points by epoch
    figures: list[Path] = field(default_factory=list)

    def to_json(self) -> str:
        payload = {
            "datasets": [asdict(item) for item in self.datasets],
            "curves": {name: [asdict(point) for point in points] for name, points in self.curves.items()},
            "figures": [str(path) for path in self.figures],
        }
        return json.dumps(payload, indent=2) + "\n"

    def to_text(self) -> str:
        header = (
            "dataset",
            "model",
            "epoch",
            "pairs",
            "dE mean",
            "dE median",
            "dE p95",
            "PSNR",
            "SSIM",
            "ckb",
            "H",
            "rejects",
            "top labels",
        )
        lines = [header]
        for item in self.datasets:
            labelled = sum(item.labels.values())
            top = sorted(item.labels.items(), key=lambda pair: -pair[1])[:3]
            top_text = ", ".join(f"{name} {count / labelled:.0%}" for name, count in top if count) or "-"
            lines.append(
                (
                    item.dataset,
                    item.model or "-",
                    "-" if item.epoch is None else str(item.epoch),
                    str(item.pairs),
                    _number(item.delta_e_mean),
                    _number(item.delta_e_median),
                    _number(item.delta_e_p95),
                    _number(item.psnr_median),
                    _number(item.ssim_median),
                    _number(item.checkerboard_median),
                    _number(item.entropy),
                    str(item.rejects),
                    top_text,
                )
            )
        widths = [max(len(line[index]) for line in lines) for index in range(len(header))]
        text = "\n".join(
            "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
            for line in lines
        )
        text += (
            "\n(PSNR, SSIM, ckb: medians over the pairs, degraded LR vs bicubic LR; ckb: checkerboard index)"
        )
        for item in self.datasets:
            if item.regime and item.regime.get("images"):
                figures = ", ".join(f"{label} {item.regime[key]:.3f}" for key, label in REGIME_PANELS)
                text += f"\n{item.dataset}: checkpoint regime at epoch {item.epoch}: {figures}"
        for path in self.figures:
            text += f"\nwrote {path}"
        return text + "\n"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def entropy_of(counts: Mapping[str, int]) -> float | None:
    """H of a label histogram (paper Eq. 2, nats, the classifier's definition); None when nothing is labelled."""
    if sum(counts.values()) == 0:
        return None
    return float(degradation_entropy(counts))


def _dataset_names(root: str, storage: Storage) -> list[str]:
    """The datasets readers read under `root`: a local folder must be a manifest root (`check_manifest_root` says
    what it holds otherwise); an object-store root is listed through `storage`."""
    if storage.is_local:
        check_manifest_root(root)
        return [folder.name for folder in dataset_folders(root)]
    return [name for name in storage.list_dirs() if is_readable_dataset(storage, name)]


def _card(storage: Storage, dataset: str) -> dict:
    """A dataset's card ({} when it has none; an unreadable one is named in a warning)."""
    relative = f"{dataset}/{CARD_NAME}"
    if not storage.exists(relative):
        return {}
    try:
        card = json.loads(storage.read_bytes(relative))
    except (OSError, ValueError):
        logger.warning("unreadable dataset card %s", storage.uri(relative))
        return {}
    return card if isinstance(card, dict) else {}


def _is_derived(card: dict) -> bool:
    return bool(card.get("parent_datasets"))


def _card_regime(card: dict) -> dict | None:
    """The regime of the checkpoint that made a dataset, as its card records it (None: no card or no regime)."""
    return (card.get("checkpoint") or {}).get("regime")


def _median(values: Sequence[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return float(np.median(present)) if present else None


def _rejects(storage: Storage, dataset: str) -> int:
    """Rows of the dataset's rejects manifest; 0 when it has none, or an unreadable one (`unreadable_manifests`
    names it)."""
    relative = f"{dataset}/{REJECTS_NAME}"
    try:
        if not storage.exists(relative):
            return 0
        with storage.open_input(relative) as handle:
            return pq.read_metadata(handle).num_rows
    except (OSError, pa.ArrowException) as error:
        logger.warning(
            "left out the unreadable rejects manifest %s: %s", storage.uri(relative), error_line(error)
        )
        return 0


def _label_counts(labels: Sequence[str | None]) -> tuple[dict[str, int], int]:
    counts = dict.fromkeys(CORRUPTIONS, 0)
    unlabelled = 0
    for label in labels:
        if label is None:
            unlabelled += 1
        elif label in counts:
            counts[label] += 1
        else:
            raise FactoryError(
                f"manifest label {label!r} is not one of the {len(CORRUPTIONS)} degradation classes"
            )
    return counts, unlabelled


def _single(values: list, mixed):
    distinct = set(values)
    return values[0] if len(distinct) == 1 else mixed


def _series_name(model: str, color_corrected: bool) -> str:
    return f"{model} (colour-corrected)" if color_corrected else model


def compute_stats(manifests_root: str | os.PathLike) -> StatsReport:
    """Statistics of every dataset under `manifests_root` (a folder or a URI; datasets with only rejects
    included)."""
    root = os.fspath(manifests_root)
    storage = Storage(root)
    dataset_names = _dataset_names(root, storage)
    table = select(root, None, columns=list(STATS_COLUMNS), skip_unreadable=True)
    rows = table.to_pydict()
    by_dataset: dict[str, list[int]] = {}
    for index, name in enumerate(rows["dataset"]):
        by_dataset.setdefault(name, []).append(index)
    names = sorted(set(by_dataset) | set(dataset_names))

    datasets: list[DatasetStats] = []
    derived_names: set[str] = set()
    for name in names:
        indices = by_dataset.get(name, [])
        delta_e = np.array([rows["delta_e"][index] for index in indices], dtype=np.float64)
        counts, unlabelled = _label_counts([rows["label"][index] for index in indices])
        models = [rows["model"][index] for index in indices]
        epochs = [rows["epoch"][index] for index in indices]
        card = _card(storage, name)
        derived = _is_derived(card)
        if derived:
            derived_names.add(name)
        datasets.append(
            DatasetStats(
                dataset=name,
                model=_single(models, "mixed") if models else None,
                epoch=_single(epochs, None) if epochs else None,
                derived=derived,
                pairs=len(indices),
                delta_e_mean=float(delta_e.mean()) if len(delta_e) else None,
                delta_e_median=float(np.median(delta_e)) if len(delta_e) else None,
                delta_e_p95=float(np.percentile(delta_e, 95)) if len(delta_e) else None,
                labels=counts,
                unlabelled=unlabelled,
                entropy=entropy_of(counts),
                rejects=_rejects(storage, name),
                psnr_median=_median([rows["psnr"][index] for index in indices]),
                ssim_median=_median([rows["ssim"][index] for index in indices]),
                checkerboard_median=_median([rows["checkerboard"][index] for index in indices]),
                regime=_card_regime(card),
            )
        )

    # Per-epoch curves: pool the pairs of all non-derived datasets per (model, colour correction, epoch).
    pooled: dict[tuple[str, int], tuple[list[float], list[str | None]]] = {}
    for index, name in enumerate(rows["dataset"]):
        epoch = rows["epoch"][index]
        if name in derived_names or epoch is None:
            continue
        series = _series_name(rows["model"][index], bool(rows["color_corrected"][index]))
        values, labels = pooled.setdefault((series, epoch), ([], []))
        values.append(rows["delta_e"][index])
        labels.append(rows["label"][index])
    curves: dict[str, list[EpochPoint]] = {}
    for (series, epoch), (values, labels) in sorted(pooled.items()):
        counts, _ = _label_counts(labels)
        curves.setdefault(series, []).append(
            EpochPoint(
                epoch=epoch,
                pairs=len(values),
                delta_e_mean=float(np.mean(values)),
                entropy=entropy_of(counts),
            )
        )
    return StatsReport(datasets=datasets, curves=curves)


# --- figures ---------------------------------------------------------------------------------------------------


def delta_e_histogram_figure(values: Mapping[str, np.ndarray], bins: int | Sequence[float] = 30) -> Figure:
    """One panel per dataset: histogram of the pairs' mean ΔE, with shared bin edges so panels compare."""
    names = [name for name in values if len(values[name])]
    if isinstance(bins, int):
        upper = max(float(np.max(values[name])) for name in names)
        edges = np.linspace(0.0, upper if upper > 0 else 1.0, bins + 1)
    else:
        edges = np.asarray(bins, dtype=np.float64)
    columns = min(3, len(names))
    rows = math.ceil(len(names) / columns)
    # At least HISTOGRAM_MIN_WIDTH: one panel alone (4 in) was narrower than the figure's title, cut on both sides.
    figure = Figure(figsize=(max(4.0 * columns, HISTOGRAM_MIN_WIDTH), 2.8 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False, sharex=True)
    for panel, name in zip(axes.flat, names, strict=False):
        data = np.asarray(values[name], dtype=np.float64)
        panel.hist(data, bins=edges, color="tab:blue", edgecolor="white")
        panel.axvline(
            float(np.mean(data)), color="tab:red", linestyle="--", label=f"mean {np.mean(data):.2f}"
        )
        panel.set_title(name, fontsize=10)
        panel.set_xlabel("ΔE (CIEDE2000, mean per pair)")
        panel.set_ylabel("pairs")
        panel.legend(fontsize=8)
    for panel in list(axes.flat)[len(names) :]:
        panel.set_visible(False)
    figure.suptitle("Colour difference between bicubic(HR) and degraded LR")
    return figure


def epoch_figure(
    curves: Mapping[str, Sequence[tuple[int, float]]],
    ylabel: str,
    title: str,
    references: Mapping[str, float] | None = None,
) -> Figure:
    """One line per model: value against training epoch (log2 axis: the paper's epochs are 4, 8, ..., 64).

    references: horizontal lines for epoch-less datasets (e.g. the bicubic baseline)."""
    figure = Figure(figsize=(6.0, 4.0), layout="constrained")
    axis = figure.subplots()
    epochs: set[int] = set()
    for name, points in curves.items():
        ordered = sorted(points)
        axis.plot([epoch for epoch, _ in ordered], [value for _, value in ordered], marker="o", label=name)
        epochs.update(epoch for epoch, _ in ordered)
    for name, value in (references or {}).items():
        axis.axhline(value, color="grey", linestyle="--", label=name)
    if epochs and min(epochs) > 0:
        axis.set_xscale("log", base=2)
    axis.set_xticks(sorted(epochs), [str(epoch) for epoch in sorted(epochs)])
    axis.set_xlabel("training epoch of the reconstructor")
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    return figure


def regime_figure(regimes: Mapping[str, Sequence[tuple[int, dict]]]) -> Figure:
    """Four panels (PSNR, SSIM, ΔE, checkerboard index): each model's checkpoint regime against its epoch."""
    figure = Figure(figsize=(10.0, 6.5), layout="constrained")
    axes = figure.subplots(2, 2)
    epochs = sorted({epoch for points in regimes.values() for epoch, _ in points})
    for panel, (key, label) in zip(axes.flat, REGIME_PANELS, strict=True):
        for name, points in regimes.items():
            ordered = sorted(points, key=lambda point: point[0])
            panel.plot([e for e, _ in ordered], [r[key] for _, r in ordered], marker="o", label=name)
        if epochs and min(epochs) > 0:
            panel.set_xscale("log", base=2)
        panel.set_xticks(epochs, [str(epoch) for epoch in epochs])
        panel.set_xlabel("training epoch of the reconstructor")
        panel.set_ylabel(label)
        panel.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    figure.suptitle("Regime of the checkpoints: reconstruction of held-out LR images (cf. paper Fig. 3)")
    return figure


def label_distribution_figure(counts: Mapping[str, Mapping[str, int]]) -> Figure:
    """Heat map: rows are datasets, columns the degradation classes, cells the share of the dataset's labelled pairs."""
    names = list(counts)
    shares = np.zeros((len(names), len(CORRUPTIONS)))
    for row, name in enumerate(names):
        total = sum(counts[name].values())
        if total:
            shares[row] = [counts[name].get(label, 0) / total for label in CORRUPTIONS]
    figure = Figure(figsize=(9.0, 1.2 + 0.45 * len(names)), layout="constrained")
    axis = figure.subplots()
    image = axis.imshow(shares, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    axis.set_xticks(range(len(CORRUPTIONS)), list(CORRUPTIONS), rotation=45, ha="right", fontsize=8)
    axis.set_yticks(range(len(names)), names, fontsize=8)
    for row in range(len(names)):
        for column in range(len(CORRUPTIONS)):
            if shares[row, column] >= 0.005:
                colour = "black" if shares[row, column] > 0.6 else "white"
                axis.text(
                    column,
                    row,
                    f"{shares[row, column]:.0%}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color=colour,
                )
    figure.colorbar(image, ax=axis, label="share of labelled pairs")
    axis.set_title("Degradation classes per dataset")
    return figure


def _save(figure: Figure, path: Path) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=FIGURE_DPI)
    Storage(path.parent).write_bytes_atomic(path.name, buffer.getvalue())
    return path


def write_figures(report: StatsReport, manifests_root: str | os.PathLike, folder: Path) -> list[Path]:
    """The four figures, as far as the data allows (no labels: no label or entropy figure); returns the paths."""
    written: list[Path] = []
    values = {
        name: np.asarray(array, dtype=np.float64)
        for name, array in _delta_e_by_dataset(manifests_root).items()
    }
    if any(len(array) for array in values.values()):
        written.append(_save(delta_e_histogram_figure(values), folder / FIGURE_NAMES["delta_e_histogram"]))
    baselines = {
        f"{item.dataset} (no epoch)": item.delta_e_mean
        for item in report.datasets
        if item.epoch is None and item.delta_e_mean is not None and not item.derived and item.model != "mixed"
    }
    if report.curves:
        delta_e_curves = {
            name: [(p.epoch, p.delta_e_mean) for p in points] for name, points in report.curves.items()
        }
        figure = epoch_figure(
            delta_e_curves, "mean ΔE (CIEDE2000)", "Colour difference by epoch (cf. paper Fig. 9)", baselines
        )
        written.append(_save(figure, folder / FIGURE_NAMES["delta_e_vs_epoch"]))
        entropy_curves = {
            name: [(p.epoch, p.entropy) for p in points if p.entropy is not None]
            for name, points in report.curves.items()
        }
        entropy_curves = {name: points for name, points in entropy_curves.items() if points}
        if entropy_curves:
            figure = epoch_figure(
                entropy_curves, "entropy H (nats)", "Degradation diversity by epoch (cf. paper Fig. 8)"
            )
            written.append(_save(figure, folder / FIGURE_NAMES["entropy_vs_epoch"]))
        else:
            logger.warning("no entropy figure: no labelled pairs (or no classifier entropy) yet")
    regimes: dict[str, dict[int, dict]] = {}
    for item in report.datasets:
        if item.regime and item.regime.get("images") and item.epoch is not None and not item.derived:
            regimes.setdefault(item.model or item.dataset, {})[item.epoch] = item.regime
    if regimes:
        curves = {name: sorted(points.items()) for name, points in regimes.items()}
        written.append(_save(regime_figure(curves), folder / FIGURE_NAMES["regime_vs_epoch"]))
    labelled = {item.dataset: item.labels for item in report.datasets if sum(item.labels.values())}
    if labelled:
        written.append(
            _save(label_distribution_figure(labelled), folder / FIGURE_NAMES["label_distribution"])
        )
    else:
        logger.warning("no label figure: no labelled pairs yet (run the classifier)")
    return written


def _delta_e_by_dataset(manifests_root: str | os.PathLike) -> dict[str, list[float]]:
    table = select(manifests_root, None, columns=["dataset", "delta_e"], skip_unreadable=True).to_pydict()
    values: dict[str, list[float]] = {}
    for name, value in zip(table["dataset"], table["delta_e"], strict=True):
        values.setdefault(name, []).append(value)
    return dict(sorted(values.items()))


def dataset_stats(config: StatsConfig) -> StatsReport:
    """`factory stats`: the statistics, and the figures when `config.plots` is set."""
    if config.plots is not None and Path(config.plots).exists() and not Path(config.plots).is_dir():
        raise FactoryError(f"--plots {config.plots} is a file; give a folder for the figures")
    report = compute_stats(config.manifests_root)
    if not report.datasets:
        raise FactoryError(f"no datasets under {config.manifests_root}")
    if config.plots is None:
        return report
    figures = write_figures(report, config.manifests_root, Path(config.plots))
    return StatsReport(datasets=report.datasets, curves=report.curves, figures=figures)
