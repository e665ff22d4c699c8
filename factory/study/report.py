"""The study's report: `OUT/report.md` and a self-contained `OUT/report.html`, figures in `OUT/report/`.

    from factory.study.report import write_report
    paths = write_report(Path("runs/study-smoke"))   # ReportPaths(markdown=..., html=...)

It reads the study folder's layout only (never the study's config classes), so it works on any folder laid out so:

    checkpoints/<model>/epoch-<E>.pt           reconstructor checkpoints (factory train)
    shards/<dataset>/, manifests/<dataset>/    datasets (factory build): <model>-ep<E>, bicubic, bicubic-de<X>, ...
    eval/<architecture>/<run>/<evalset>/       factory eval --out: metrics.csv, summary.json, sr/*.png; <run> is
                                               `pretrained` or the dataset a model was fine-tuned (or, for the
                                               colour-shift runs bicubic-de<X>, trained from scratch) on
    evalsets/<evalset>/hr/                     optional: the ground truth beside the SR crops
    study.json                                 optional: its `name` titles the report

What it holds:
- Tables 1 / 2 analogues: per architecture and evaluation set, PSNR / SSIM / LPIPS of every run, as its
  summary.json states them (the means of its metrics.csv; nothing is recomputed), the difference to `pretrained`,
  the best of each column marked;
- per dataset: pairs, mean / p95 ΔE, entropy H, the regime of its checkpoint (factory.stats), and the stats
  figures (Figure 8: H by epoch, Figure 9: ΔE by epoch, the checkpoints' regime, ΔE histograms, label shares);
- Figures 3 / 4 analogues: each model's reconstructions of the same LR images at every saved epoch;
- each dataset's mean ΔE and H against the metric gain of the model fine-tuned on it;
- Figures 10 / 11 analogues when bicubic-de<X> runs exist: the metrics against the dataset's mean ΔE;
- per architecture and evaluation set, one column of SR crops per run, on the same images.
Every file is written atomically: the figures into a temporary folder that replaces `report/`, then report.md
and report.html (temporary file, then os.replace).
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from factory.config import FactoryError, error_line
from factory.storage import Storage
from factory.study.document import (
    Cell,
    Document,
    FigureBlock,
    Heading,
    Paragraph,
    Table,
    to_html,
    to_markdown,
)

logger = logging.getLogger(__name__)

PRETRAINED = "pretrained"  # the run of the weights before fine-tuning
FIGURES = "report"  # the figure folder, beside report.md
COLOUR_SHIFT_RUN = re.compile(r"^bicubic-de(\d+(?:p\d+)?)$")  # bicubic-de3, bicubic-de1p5, bicubic-de0
STRIP_IMAGES = 3  # evaluation images in each SR strip
STRIP_CROP = 96  # side of the SR crops, in SR pixels
RECONSTRUCTION_IMAGES = 3  # LR images in each Figure 3 / 4 sheet
COLOUR_SHIFT_EXAMPLES = 2  # LR images per colour-shift dataset in the Figure 10 sheet
SHEET_COLUMN = 128  # the narrowest column of an image sheet, in pixels (its two title lines fit)


@dataclass(frozen=True)
class ReportPaths:
    markdown: Path
    html: Path


@dataclass(frozen=True)
class Metric:
    key: str  # summary.json / metrics.csv column
    label: str
    decimals: int
    higher_is_better: bool


METRICS = (
    Metric("psnr", "PSNR", 2, True),
    Metric("ssim", "SSIM", 4, True),
    Metric("lpips", "LPIPS", 4, False),
)


@dataclass(frozen=True)
class EvalRun:
    """One evaluation: OUT/eval/<architecture>/<run>/<evalset>/, as its summary.json records it."""

    architecture: str
    run: str
    evalset: str
    folder: Path
    values: dict[str, float | None]  # metric key -> mean over the evaluated images (None: not measured)
    images: int
    y_channel: bool
    crop_border: int


@dataclass(frozen=True)
class Found:
    """What the study folder holds, read once."""

    root: Path
    runs: list[EvalRun]
    incomplete: list[str]  # eval folders without a readable summary.json (relative paths)
    stats: object | None  # factory.stats.StatsReport of OUT/manifests, None without datasets


def natural_key(name: str) -> list:
    """vqvae2-ep4 before vqvae2-ep16: digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def run_order(run: str) -> tuple:
    """pretrained first, then the datasets in natural order."""
    return (run != PRETRAINED, natural_key(run))


def colour_shift_target(run: str) -> float | None:
    """The target ΔE of a colour-shift run's dataset (bicubic-de1p5 -> 1.5), None for any other run."""
    match = COLOUR_SHIFT_RUN.match(run)
    return float(match.group(1).replace("p", ".")) if match else None


# --------------------------------------------------------------------------------------------------------------------
# Reading the folder
# --------------------------------------------------------------------------------------------------------------------


def _number_or_none(value) -> float | None:
    return None if value is None else float(value)


def read_eval_run(folder: Path, root: Path) -> EvalRun:
    """The EvalRun of one eval folder from its summary.json; FactoryError when it is unreadable."""
    try:
        summary = json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError) as error:
        raise FactoryError(
            f"{folder.relative_to(root)}: unreadable summary.json: {error_line(error)}"
        ) from None
    architecture, run, evalset = folder.relative_to(root / "eval").parts
    return EvalRun(
        architecture=architecture,
        run=run,
        evalset=evalset,
        folder=folder,
        values={metric.key: _number_or_none(summary.get(metric.key)) for metric in METRICS},
        images=int(summary.get("images", 0)),
        y_channel=bool(summary.get("y_channel", False)),
        crop_border=int(summary.get("crop_border", 0)),
    )


def read_eval_runs(root: Path) -> tuple[list[EvalRun], list[str]]:
    """Every finished evaluation under OUT/eval (summary.json is written last, so it marks a finished one), and the
    eval folders that have none (a run still going or killed)."""
    runs, incomplete = [], []
    for folder in sorted(path for path in (root / "eval").glob("*/*/*") if path.is_dir()):
        if not (folder / "summary.json").is_file():
            incomplete.append(str(folder.relative_to(root)))
            continue
        try:
            runs.append(read_eval_run(folder, root))
        except FactoryError as error:
            logger.warning("%s", error)
            incomplete.append(str(folder.relative_to(root)))
    return runs, incomplete


def read_stats(root: Path):
    """factory.stats of OUT/manifests (None when the study has no datasets yet)."""
    from factory.stats import compute_stats

    manifests = root / "manifests"
    if not manifests.is_dir() or not any(path.is_dir() for path in manifests.iterdir()):
        return None
    return compute_stats(manifests)


def study_title(root: Path) -> str:
    """'Study report: <name>' from study.json's `name` (or its folder's name)."""
    name = root.resolve().name
    try:
        recorded = json.loads((root / "study.json").read_text())
        if isinstance(recorded, dict) and isinstance(recorded.get("name"), str):
            name = recorded["name"]
    except (OSError, ValueError):
        pass  # optional: the folder's name
    return f"Study report: {name}"


def groups(runs: list[EvalRun]) -> dict[tuple[str, str], list[EvalRun]]:
    """(architecture, evalset) -> its runs, pretrained first."""
    grouped: dict[tuple[str, str], list[EvalRun]] = {}
    for run in runs:
        grouped.setdefault((run.architecture, run.evalset), []).append(run)
    return {key: sorted(value, key=lambda run: run_order(run.run)) for key, value in sorted(grouped.items())}


# --------------------------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------------------------


def format_value(value: float | None, decimals: int) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{decimals}f}"


def format_difference(value: float | None, decimals: int) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:+.{decimals}f}"


def best_text(values: list[float | None], metric: Metric) -> str | None:
    """The best value of a column as shown (rows showing it are all marked); None when the column is empty."""
    present = [value for value in values if value is not None and math.isfinite(value)]
    if not present:
        return None
    best = max(present) if metric.higher_is_better else min(present)
    return format_value(best, metric.decimals)


def results_table(runs: list[EvalRun]) -> Table:
    """Table 1 / 2 analogue of one (architecture, evalset): a row per run, each metric and its difference to the
    pretrained run, the best of each metric marked."""
    pretrained = next((run for run in runs if run.run == PRETRAINED), None)
    header = ["run"]
    for metric in METRICS:
        header += [metric.label, f"Δ{metric.label}"]
    header.append("images")
    bests = {metric.key: best_text([run.values[metric.key] for run in runs], metric) for metric in METRICS}
    rows = []
    for run in runs:
        row = [Cell(run.run)]
        for metric in METRICS:
            value = run.values[metric.key]
            text = format_value(value, metric.decimals)
            row.append(Cell(text, best=text == bests[metric.key] and text != "-"))
            base = None if pretrained is None else pretrained.values[metric.key]
            difference = None if value is None or base is None or run is pretrained else value - base
            row.append(Cell(format_difference(difference, metric.decimals)))
        row.append(Cell(str(run.images)))
        rows.append(row)
    first = runs[0]
    channel = "Y channel" if first.y_channel else "RGB"
    caption = (
        f"{first.architecture} on {first.evalset} ({channel}, crop border {first.crop_border}): means over the "
        f"images, from each run's summary.json; Δ against {PRETRAINED}; best of each metric in bold"
    )
    return Table(header, rows, caption)


def dataset_table(stats) -> Table:
    """Per dataset: pairs, ΔE, entropy H and the regime of the checkpoint that made it (its card)."""
    header = ["dataset", "model", "epoch", "pairs", "mean ΔE", "p95 ΔE", "H (nats)"]
    header += ["ckpt PSNR", "ckpt SSIM", "ckpt ΔE", "ckpt checkerboard"]
    rows = []
    for item in sorted(stats.datasets, key=lambda item: natural_key(item.dataset)):
        regime = item.regime or {}
        rows.append(
            [
                Cell(item.dataset),
                Cell(item.model or "-"),
                Cell("-" if item.epoch is None else str(item.epoch)),
                Cell(str(item.pairs)),
                Cell(format_value(item.delta_e_mean, 3)),
                Cell(format_value(item.delta_e_p95, 3)),
                Cell(format_value(item.entropy, 3)),
                *(
                    Cell(format_value(regime.get(key), 4))
                    for key in ("psnr", "ssim", "delta_e", "checkerboard")
                ),
            ]
        )
    caption = (
        "ΔE: CIEDE2000 of bicubic(HR) vs LR, the pairs' means (mean and 95th percentile over pairs); H: entropy of "
        "the degradation labels (paper Eq. 2); ckpt: the checkpoint's regime on held-out LR images, from the card"
    )
    return Table(header, rows, caption)


def colour_shift_table(runs: list[EvalRun], stats) -> Table:
    """The colour-shift runs of one (architecture, evalset): target ΔE, the dataset's measured mean ΔE, metrics."""
    measured = _dataset_delta_e(stats)
    header = ["run", "target ΔE", "dataset mean ΔE", *(metric.label for metric in METRICS)]
    bests = {metric.key: best_text([run.values[metric.key] for run in runs], metric) for metric in METRICS}
    rows = []
    for run in sorted(runs, key=lambda run: colour_shift_target(run.run)):
        cells = [Cell(run.run), Cell(format_value(colour_shift_target(run.run), 2))]
        cells.append(Cell(format_value(measured.get(run.run), 3)))
        for metric in METRICS:
            text = format_value(run.values[metric.key], metric.decimals)
            cells.append(Cell(text, best=text == bests[metric.key] and text != "-"))
        rows.append(cells)
    first = runs[0]
    caption = f"{first.architecture} trained from scratch on each colour-shift dataset, evaluated on {first.evalset}"
    return Table(header, rows, caption)


def _dataset_delta_e(stats) -> dict[str, float]:
    if stats is None:
        return {}
    return {item.dataset: item.delta_e_mean for item in stats.datasets if item.delta_e_mean is not None}


# --------------------------------------------------------------------------------------------------------------------
# Sections: each appends its blocks to the document and writes its figures into `figures` (the temporary folder)
# --------------------------------------------------------------------------------------------------------------------


def _figure_path(name: str) -> str:
    return f"{FIGURES}/{name}"


def _slug(*parts: str) -> str:
    return "-".join(re.sub(r"[^A-Za-z0-9_.-]+", "_", part) for part in parts)


def results_section(found: Found, document: Document) -> None:
    """Tables 1 / 2: every (architecture, evalset) with runs other than the colour-shift ones."""
    document.blocks.append(Heading(1, "SR results (Tables 1 and 2)"))
    tables = 0
    for runs in groups(found.runs).values():
        finetuned = [run for run in runs if colour_shift_target(run.run) is None]
        if finetuned:
            document.blocks.append(results_table(finetuned))
            tables += 1
    if not tables:
        document.blocks.append(
            Paragraph("No finished evaluation yet (no eval/<architecture>/<run>/<evalset>/summary.json).")
        )


STATS_CAPTIONS = {
    "entropy_vs_epoch": "Figure 8 analogue: degradation entropy H against the reconstructor's training epoch",
    "delta_e_vs_epoch": "Figure 9 analogue: mean ΔE against the reconstructor's training epoch",
    "regime_vs_epoch": "The checkpoints' regime (reconstruction of held-out LR images) against epoch",
    "delta_e_histogram": "ΔE of the pairs, per dataset",
    "label_distribution": "Degradation classes per dataset",
}


def datasets_section(found: Found, document: Document, figures: Path) -> None:
    """Per-dataset table and the stats figures (factory.stats.write_figures)."""
    from factory.stats import FIGURE_NAMES, write_figures

    document.blocks.append(Heading(1, "Datasets"))
    if found.stats is None:
        document.blocks.append(Paragraph("No datasets yet (no manifests/<dataset>/)."))
        return
    document.blocks.append(dataset_table(found.stats))
    written = {path.name for path in write_figures(found.stats, found.root / "manifests", figures)}
    for key, caption in STATS_CAPTIONS.items():
        if FIGURE_NAMES[key] in written:
            document.blocks.append(FigureBlock(_figure_path(FIGURE_NAMES[key]), caption))


def pair_images(root: Path, where: str | None, count: int, member: str) -> list[tuple[dict, np.ndarray]]:
    """(manifest row, decoded `member` image ("hr" or "lr"), (H, W, 3) uint8) of the first `count` pairs matching
    `where` under OUT/manifests, read from OUT/shards (checked against the manifest's sha256)."""
    from factory.query import read_pairs, select
    from factory.shards import decode_image, payload_extension

    rows = select(root / "manifests", where, limit=count, skip_unreadable=True).to_pylist()
    images = []
    for row, members in read_pairs(root / "shards", rows):
        name = f"{member}.{payload_extension(row['codec'])}"
        images.append((row, decode_image(name, members[name])))
    return images


def sample_lr_images(root: Path, count: int):
    """The bicubic LR x of the first `count` pairs of the first dataset, (N, 3, h, w) uint8, exactly as the build
    makes x from their HR crops (factory.regime.lr_image); None when no dataset has pairs."""
    from factory.regime import lr_image
    from factory.study.report_figures import as_batch

    pairs = pair_images(root, None, count, "hr")
    if not pairs:
        return None
    return as_batch(
        [
            lr_image(hr, hr.shape[0] // row["scale"], row["scale"]).permute(1, 2, 0).numpy()
            for row, hr in pairs
        ]
    )


def zoom_for(side: int) -> int:
    """The integer enlargement that makes a sheet column at least SHEET_COLUMN pixels wide (room for its title)."""
    return max(1, math.ceil(SHEET_COLUMN / side))


def reconstructions_section(root: Path, document: Document, figures: Path) -> None:
    """Figures 3 / 4: per reconstructor with checkpoints, its reconstructions of the same LR images by epoch."""
    from factory.checkpoints import saved_epochs
    from factory.models import MODEL_NAMES
    from factory.preview import epoch_sheet
    from factory.regime import reconstructions_by_epoch

    models = [name for name in MODEL_NAMES if saved_epochs(root / "checkpoints", name)]
    if not models:
        return
    document.blocks.append(Heading(1, "Reconstructions by epoch (Figures 3 and 4)"))
    try:
        images = sample_lr_images(root, RECONSTRUCTION_IMAGES)
    except FactoryError as error:
        document.blocks.append(Paragraph(f"Not drawn: no readable pairs to reconstruct ({error})."))
        return
    if images is None:
        document.blocks.append(Paragraph("Not drawn: no dataset has pairs to take LR images from yet."))
        return
    for model in models:
        columns = []
        for epoch, regime, reconstructed in reconstructions_by_epoch(root / "checkpoints", model, images):
            summary = f"PSNR {regime['psnr']:.1f} ΔE {regime['delta_e']:.1f}" if regime.get("psnr") else ""
            columns.append((f"epoch {epoch}\n{summary}", reconstructed))
        columns.append(("input x\n(bicubic LR)", images))
        name = f"reconstructions-{_slug(model)}.png"
        epoch_sheet(columns, figures / name, zoom=zoom_for(images.shape[-1]))
        caption = f"{model}: reconstructions of the same LR images at each saved epoch, then the input"
        document.blocks.append(FigureBlock(_figure_path(name), caption))


def gain_section(found: Found, document: Document, figures: Path) -> None:
    """Each dataset's mean ΔE and entropy H against the gain of the model fine-tuned on it over the pretrained."""
    from factory.study.report_figures import Panel, Point, panels_figure, save_figure

    if found.stats is None:
        return
    properties = {item.dataset: item for item in found.stats.datasets}
    blocks: list[FigureBlock] = []
    for (architecture, evalset), runs in groups(found.runs).items():
        pretrained = next((run for run in runs if run.run == PRETRAINED), None)
        tuned = [run for run in runs if run.run in properties and colour_shift_target(run.run) is None]
        if pretrained is None or not tuned:
            continue
        panels = []
        for attribute, label in (
            ("delta_e_mean", "dataset mean ΔE"),
            ("entropy", "dataset entropy H (nats)"),
        ):
            for metric in METRICS:
                points = [
                    Point(
                        getattr(properties[run.run], attribute),
                        run.values[metric.key] - pretrained.values[metric.key],
                        run.run,
                    )
                    for run in tuned
                    if getattr(properties[run.run], attribute) is not None
                    and run.values[metric.key] is not None
                    and pretrained.values[metric.key] is not None
                ]
                if points:
                    panels.append(Panel(label, f"Δ{metric.label} over {PRETRAINED}", points))
        if not panels:
            continue
        name = f"gain-{_slug(architecture, evalset)}.png"
        title = f"{architecture} on {evalset}: dataset properties against the metric gain"
        save_figure(panels_figure(panels, title, columns=min(3, len(panels)), connect=False), figures / name)
        blocks.append(FigureBlock(_figure_path(name), title))
    if blocks:
        document.blocks.append(Heading(1, "Dataset properties against the metric gain"))
        document.blocks += blocks


def colour_shift_section(found: Found, document: Document, figures: Path) -> None:
    """Figures 10 / 11: the colour-shift runs' metrics against their dataset's mean ΔE (the target where the
    dataset's manifests are absent)."""
    from factory.study.report_figures import Panel, Point, panels_figure, save_figure

    measured = _dataset_delta_e(found.stats)
    blocks: list = []
    for (architecture, evalset), runs in groups(found.runs).items():
        shifted = [run for run in runs if colour_shift_target(run.run) is not None]
        if not shifted:
            continue
        blocks.append(colour_shift_table(shifted, found.stats))
        panels = []
        for metric in METRICS:
            points = [
                Point(measured.get(run.run, colour_shift_target(run.run)), run.values[metric.key], run.run)
                for run in shifted
                if run.values[metric.key] is not None
            ]
            if points:
                panels.append(Panel("dataset mean ΔE", metric.label, points))
        name = f"colour-shift-{_slug(architecture, evalset)}.png"
        title = (
            f"Figure 11 analogue: {architecture} on {evalset} against the colour difference of its dataset"
        )
        save_figure(panels_figure(panels, title, columns=len(panels), connect=True), figures / name)
        blocks.append(FigureBlock(_figure_path(name), title))
    examples = colour_shift_examples(found, figures)
    if examples is not None:
        blocks.insert(0, examples)
    if blocks:
        document.blocks.append(Heading(1, "Colour difference (Figures 10 and 11)"))
        document.blocks += blocks


def colour_shift_examples(found: Found, figures: Path) -> FigureBlock | None:
    """Figure 10: the LR images of the same pairs in every colour-shift dataset, titled with its mean ΔE."""
    from factory.preview import epoch_sheet
    from factory.study.report_figures import as_batch

    if found.stats is None:
        return None
    datasets = sorted(
        (
            item
            for item in found.stats.datasets
            if colour_shift_target(item.dataset) is not None and item.pairs
        ),
        key=lambda item: colour_shift_target(item.dataset),
    )
    columns = []
    for (
        item
    ) in datasets:  # the name matched COLOUR_SHIFT_RUN: letters, digits and '-' only, safe in the predicate
        pairs = pair_images(found.root, f"dataset = '{item.dataset}'", COLOUR_SHIFT_EXAMPLES, "lr")
        columns.append((f"{item.dataset}\nΔE {format_value(item.delta_e_mean, 2)}", [lr for _, lr in pairs]))
    if not columns or len({len(images) for _, images in columns}) != 1:
        return None
    sides = {image.shape for _, images in columns for image in images}
    if len(sides) != 1:  # datasets of other crops: no common sheet
        return None
    name = "colour-shift-examples.png"
    sheet = [(title, as_batch(images)) for title, images in columns]
    epoch_sheet(sheet, figures / name, zoom=zoom_for(sheet[0][1].shape[-1]))
    caption = (
        "Figure 10 analogue: the same pairs' LR in each colour-shift dataset, with the dataset's mean ΔE"
    )
    return FigureBlock(_figure_path(name), caption)


def _hr_image(root: Path, evalset: str, name: str):
    """The ground truth `name` of an evaluation set made by the study (OUT/evalsets/<evalset>/hr), or None."""
    from factory.sources import RejectedImage, load_rgb

    for path in sorted((root / "evalsets" / evalset / "hr").glob(f"{name}.*")):
        try:
            return load_rgb(path)
        except RejectedImage:
            return None
    return None


def strip_columns(root: Path, runs: list[EvalRun]) -> list[tuple[str, object]]:
    """(title, (N, 3, s, s) uint8) per run: centre crops of the same SR images (the first STRIP_IMAGES names
    every run has), then the ground truth where the study made the evaluation set."""
    from factory.sources import RejectedImage, load_rgb
    from factory.study.report_figures import as_batch, centre_crop

    shared = set.intersection(*({path.stem for path in (run.folder / "sr").glob("*.png")} for run in runs))
    names = sorted(shared, key=natural_key)[:STRIP_IMAGES]
    if not names:
        return []
    columns = []
    try:
        for run in runs:
            crops = [centre_crop(load_rgb(run.folder / "sr" / f"{name}.png"), STRIP_CROP) for name in names]
            columns.append((run.run, crops))
    except RejectedImage as error:
        logger.warning("no SR strip for %s/%s: %s", runs[0].architecture, runs[0].evalset, error)
        return []
    truths = [_hr_image(root, runs[0].evalset, name) for name in names]
    if all(truth is not None for truth in truths):
        columns.append(("HR", [centre_crop(truth, STRIP_CROP) for truth in truths]))
    side = min(crop.shape[0] for _, crops in columns for crop in crops)
    width = min(crop.shape[1] for _, crops in columns for crop in crops)
    return [(title, as_batch([crop[:side, :width] for crop in crops])) for title, crops in columns]


def strips_section(found: Found, document: Document, figures: Path) -> None:
    """Per (architecture, evalset): one column of SR crops per run, the same images in every column."""
    from factory.preview import epoch_sheet

    blocks = []
    for (architecture, evalset), runs in groups(found.runs).items():
        columns = strip_columns(found.root, runs)
        if not columns:
            continue
        name = f"sr-crops-{_slug(architecture, evalset)}.png"
        epoch_sheet(columns, figures / name, zoom=zoom_for(columns[0][1].shape[-1]))
        caption = f"{architecture} on {evalset}: centre crops of the same SR images, one column per run"
        blocks.append(FigureBlock(_figure_path(name), caption))
    if blocks:
        document.blocks.append(Heading(1, "SR crops"))
        document.blocks += blocks


# --------------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------------


def build_document(found: Found, figures: Path) -> Document:
    """Every section, in reading order; figures go into `figures`."""
    document = Document(study_title(found.root))
    document.blocks.append(
        Paragraph(
            f"Read from {found.root.resolve()}: {len(found.runs)} finished evaluations, "
            f"{0 if found.stats is None else len(found.stats.datasets)} datasets. The SR numbers are each run's "
            "summary.json (the means of its metrics.csv), never recomputed."
        )
    )
    results_section(found, document)
    datasets_section(found, document, figures)
    reconstructions_section(found.root, document, figures)
    gain_section(found, document, figures)
    colour_shift_section(found, document, figures)
    strips_section(found, document, figures)
    if found.incomplete:
        document.blocks.append(Heading(1, "Not finished"))
        document.blocks.append(
            Paragraph("Evaluations without a summary.json yet: " + ", ".join(found.incomplete) + ".")
        )
    return document


def _publish_figures(staging: Path, root: Path) -> None:
    """Replace OUT/report/ by the freshly drawn figures in one rename (the old folder is moved aside first)."""
    target = root / FIGURES
    if target.exists():
        aside = Path(tempfile.mkdtemp(prefix=".report-old-", dir=root))
        target.replace(aside / FIGURES)
        staging.replace(target)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        staging.replace(target)


def write_report(study_dir: Path) -> ReportPaths:
    """Write OUT/report.md, OUT/report.html and OUT/report/ from the study folder `study_dir` (see the module
    docstring for what they hold). FactoryError when the folder does not exist."""
    root = Path(study_dir)
    if not root.is_dir():
        raise FactoryError(f"no study folder {root}")
    for leftover in root.glob(".report-*"):  # a killed run's temporary folders
        shutil.rmtree(leftover, ignore_errors=True)
    runs, incomplete = read_eval_runs(root)
    found = Found(root=root, runs=runs, incomplete=incomplete, stats=read_stats(root))
    staging = Path(tempfile.mkdtemp(prefix=".report-new-", dir=root))
    try:
        document = build_document(found, staging)
        _publish_figures(staging, root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    storage = Storage(root)
    storage.write_bytes_atomic("report.md", to_markdown(document).encode("utf-8"))
    storage.write_bytes_atomic("report.html", to_html(document, root).encode("utf-8"))
    return ReportPaths(markdown=root / "report.md", html=root / "report.html")
