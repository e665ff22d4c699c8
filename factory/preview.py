"""A contact sheet of pairs: look at what a predicate selects before training on it.

    factory preview --where "delta_e > 10" --order-by "delta_e DESC" --n 16 --out worst.png

One row per pair (the first `n` matching, in manifest order, or by `--order-by`, or `--random`): the HR crop
(downsampled to the display size when it is larger), the bicubic LR (`factory.color.downsample` of the HR, quantised
to 8 bits as the build does) and the degraded LR from the shard, both LR images enlarged with nearest-neighbour so
their pixels stay visible. Under each row: key, ΔE, label (with its probability) and dataset.

    factory preview --checkpoints checkpoints/ --model vqvae2 --out figure3.png

draws the paper's Figure 3 instead (`epoch_sheet`): one row per image, one column per saved epoch of the model's
checkpoints (titled with the regime `factory train` stored), then the input. It needs no build.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from factory.color import bicubic_resize, downsample
from factory.config import FactoryError
from factory.query import read_pairs, selected_rows
from factory.shards import decode_image, payload_extension
from factory.storage import Storage

DISPLAY_SIZE = (
    256  # LR images are enlarged by an integer factor up to about this many pixels (never past the HR)
)
MARGIN = 8  # pixels around and between the images
TEXT_HEIGHT = 22  # caption line height
FONT_SIZE = 14
BACKGROUND = (255, 255, 255)
COLUMN_TITLES = ("HR", "bicubic LR", "degraded LR")


@dataclass(frozen=True)
class PreviewConfig:
    shards_root: str | Path  # shard root (folder or storage URI)
    manifests_root: str | Path  # manifest root (folder or storage URI): every dataset under it is searched
    where: str | None  # SQL predicate over the manifest columns; None: all pairs
    count: int  # pairs to show (the first matching, in manifest order unless ordered below)
    out: Path  # the PNG to write
    order_by: str | None = None  # manifest columns to order by, e.g. "delta_e DESC" (`query.order_clause`)
    random_seed: int | None = None  # a random order drawn from this seed instead


@dataclass(frozen=True)
class PreviewCell:
    key: str
    top: int  # pixel row of the images of this pair in the sheet
    lefts: tuple[int, int, int]  # left edge of the HR, bicubic LR and degraded LR images
    height: int  # displayed image height and width (all three images of a row have this size)
    width: int
    zoom: int  # integer enlargement of the LR images


@dataclass(frozen=True)
class PreviewSummary:
    out: Path
    pairs: int
    cells: list[PreviewCell]


def _font(size: int) -> ImageFont.ImageFont:
    """DejaVu Sans from matplotlib's bundled fonts (it has 'Δ'); Pillow's default font otherwise."""
    try:
        from matplotlib import font_manager

        return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)
    except (ImportError, OSError):
        return ImageFont.load_default()


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float in [0, 1]."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).unsqueeze(0).float() / 255.0  # a writable copy


def _to_image(x: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) in [0, 1] -> (H, W, 3) uint8, rounded as an 8-bit file stores it."""
    return (x.clamp(0, 1) * 255.0).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()


def pair_views(hr: np.ndarray, lr: np.ndarray, scale: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The three images of a row at one display size: (HR shown, bicubic LR enlarged, degraded LR enlarged, zoom).

    hr: (H, W, 3) uint8, lr: (H / scale, W / scale, 3) uint8. The LR images are enlarged by the integer `zoom` (nearest
    neighbour) to about DISPLAY_SIZE pixels; when zoom >= scale it is a multiple of scale, so a small HR is enlarged
    by the integer zoom / scale, and a large HR (zoom < scale) is downsampled with the project's bicubic.
    """
    lr_height, lr_width = lr.shape[:2]
    zoom = max(1, DISPLAY_SIZE // max(lr_height, lr_width))
    if zoom >= scale:
        zoom -= zoom % scale
    hr_tensor = _to_tensor(hr)
    bicubic = _to_image(downsample(hr_tensor, scale))
    if bicubic.shape != lr.shape:
        raise FactoryError(
            f"LR is {lr.shape[:2]} but the HR {hr.shape[:2]} at scale {scale} gives {bicubic.shape[:2]}"
        )

    def enlarge(image: np.ndarray, factor: int) -> np.ndarray:
        return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)

    if zoom >= scale:
        shown_hr = enlarge(hr, zoom // scale)
    else:
        shown_hr = _to_image(bicubic_resize(hr_tensor, (lr_height * zoom, lr_width * zoom)))
    return shown_hr, enlarge(bicubic, zoom), enlarge(lr, zoom), zoom


def _caption(row: dict) -> str:
    label = row.get("label")
    label_text = "unlabelled" if label is None else f"{label} ({row['label_prob']:.2f})"
    return f"{row['key']}   ΔE {row['delta_e']:.2f}   {label_text}   {row['dataset']}"


def _check_out(out: Path) -> str:
    """The image format `out`'s extension names; a folder or an unknown extension is a one-line error."""
    if out.is_dir():
        raise FactoryError(f"--out {out} is a folder; give the sheet's file name, e.g. {out / 'preview.png'}")
    image_format = Image.registered_extensions().get(out.suffix.lower())
    if image_format is None:
        raise FactoryError(f"--out {out}: name the sheet with an image extension (.png, .jpg, .webp)")
    if not out.parent.is_dir():  # making the folder would hide a typo in the path
        raise FactoryError(f"--out {out}: no folder {out.parent}")
    return image_format


def _save_sheet(sheet: Image.Image, out: Path, image_format: str) -> None:
    buffer = io.BytesIO()
    # PNG keeps the pixels being judged; another extension is the user's choice of a smaller, lossy sheet.
    sheet.save(buffer, format=image_format, **({"compress_level": 6} if image_format == "PNG" else {}))
    Storage(out.parent).write_bytes_atomic(out.name, buffer.getvalue())


def epoch_sheet(columns: list[tuple[str, torch.Tensor]], out: Path, zoom: int = 1) -> Path:
    """The paper's Figure 3 layout: one row per image, one column per (title, images (N, 3, h, w) uint8), all
    columns holding the same N images (e.g. each saved epoch's reconstructions, then the input), enlarged by the
    integer `zoom` (nearest neighbour, so pixels stay visible)."""
    out = Path(out)
    image_format = _check_out(out)
    count, height, width = (
        columns[0][1].shape[0],
        columns[0][1].shape[-2] * zoom,
        columns[0][1].shape[-1] * zoom,
    )
    font = _font(FONT_SIZE)
    title_height = 2 * TEXT_HEIGHT + MARGIN
    sheet = Image.new(
        "RGB",
        (MARGIN + len(columns) * (width + MARGIN), title_height + count * (height + MARGIN) + MARGIN),
        BACKGROUND,
    )
    draw = ImageDraw.Draw(sheet)
    for column, (title, images) in enumerate(columns):
        left = MARGIN + column * (width + MARGIN)
        for line, text in enumerate(title.split("\n")[:2]):
            draw.text((left, MARGIN // 2 + line * TEXT_HEIGHT), text, fill=(0, 0, 0), font=font)
        for row in range(count):
            array = images[row].permute(1, 2, 0).numpy()
            array = np.repeat(np.repeat(array, zoom, axis=0), zoom, axis=1)
            sheet.paste(Image.fromarray(array), (left, title_height + row * (height + MARGIN)))
    _save_sheet(sheet, out, image_format)
    return out


def make_preview(config: PreviewConfig) -> PreviewSummary:
    """Write the contact sheet of the first `config.count` pairs matching `config.where`, in the order asked."""
    if config.count < 1:
        raise FactoryError("--n must be at least 1")
    out = Path(config.out)
    image_format = _check_out(out)
    rows = selected_rows(
        config.manifests_root, config.where, config.count, config.order_by, config.random_seed
    )
    order = {(row["dataset"], row["key"]): index for index, row in enumerate(rows)}
    by_index: dict[int, tuple[dict, tuple[np.ndarray, np.ndarray, np.ndarray, int]]] = {}
    for row, members in read_pairs(config.shards_root, rows):
        extension = payload_extension(row["codec"])
        try:
            hr = decode_image(f"hr.{extension}", members[f"hr.{extension}"])
            lr = decode_image(f"lr.{extension}", members[f"lr.{extension}"])
        except ValueError as error:
            raise FactoryError(f"{row['shard']}: {row['key']}: {error}") from None
        by_index[order[(row["dataset"], row["key"])]] = (row, pair_views(hr, lr, row["scale"]))
    views = [by_index[index] for index in range(len(rows))]  # back in the order selected

    font, title_font = _font(FONT_SIZE), _font(FONT_SIZE + 2)
    cell_width = max(view[0].shape[1] for _, view in views)
    title_height = TEXT_HEIGHT + MARGIN
    height = title_height + sum(view[0].shape[0] + TEXT_HEIGHT + MARGIN for _, view in views) + MARGIN
    captions = [_caption(row) for row, _ in views]
    caption_width = max(int(math.ceil(font.getlength(text))) for text in captions)
    width = max(MARGIN + 3 * (cell_width + MARGIN), caption_width + 2 * MARGIN)
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    lefts = tuple(MARGIN + column * (cell_width + MARGIN) for column in range(3))
    for left, title in zip(lefts, COLUMN_TITLES, strict=True):
        draw.text((left, MARGIN // 2), title, fill=(0, 0, 0), font=title_font)
    cells: list[PreviewCell] = []
    top = title_height
    for row, (shown_hr, bicubic, degraded, zoom) in views:
        for left, image in zip(lefts, (shown_hr, bicubic, degraded), strict=True):
            sheet.paste(Image.fromarray(image), (left, top))
        image_height, image_width = degraded.shape[:2]
        cells.append(PreviewCell(row["key"], top, lefts, image_height, image_width, zoom))
        draw.text((MARGIN, top + image_height + 3), _caption(row), fill=(0, 0, 0), font=font)
        top += image_height + TEXT_HEIGHT + MARGIN

    _save_sheet(sheet, out, image_format)
    return PreviewSummary(out=out, pairs=len(rows), cells=cells)
