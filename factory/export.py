"""Export pairs as plain PNG folders for trainers that read paired image folders (BasicSR, Real-ESRGAN).

    factory export --format basicsr --where "delta_e < 5" --out export/low-de

Layout written to OUT (created whole, atomically: it appears complete or not at all):

    hr/<key>.png             the HR crop (ground truth, "gt")
    lr/<key>.png             the degraded LR ("lq"), same file name as its HR
    meta_info.txt            BasicSR PairedImageDataset `meta_info_file`: one line per pair, "<key>.png (H,W,3)"
                             (the GT name and shape; BasicSR takes the text before the first space and finds the LQ
                             under the same base name, `filename_tmpl` '{}')
    meta_info_pairs.txt      Real-ESRGAN RealESRGANPairedDataset `meta_info`: "<gt path>, <lq path>" per line,
                             relative to dataroot_gt / dataroot_lq
    basicsr_dataset.yml      a ready `datasets:` entry for a BasicSR options file (paths absolute)
    manifest.parquet         the exported pairs' manifest rows (provenance, ΔE, labels)

PNG payloads are copied byte for byte; zst payloads are decoded and written as PNG (lossless, so pixels are equal).
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from factory.config import FactoryError
from factory.manifests import rows_to_table
from factory.query import read_pairs, selected_rows, unique_pairs
from factory.shards import decode_image, encode_image, payload_extension
from factory.storage import hopeless_writes_said, make_local_dirs, pid_alive

logger = logging.getLogger(__name__)

EXPORT_FORMATS = ("basicsr",)
BASICSR_META_INFO = "meta_info.txt"
REALESRGAN_META_INFO = "meta_info_pairs.txt"
BASICSR_OPTIONS = "basicsr_dataset.yml"


@dataclass(frozen=True)
class ExportConfig:
    shards_root: str | Path  # shard root (folder or storage URI)
    manifests_root: str | Path  # manifest root (folder or storage URI): every dataset under it is searched
    where: str | None  # SQL predicate over the manifest columns; None: all pairs
    out: Path  # folder to create (must not exist, or be empty)
    export_format: str = "basicsr"  # the only layout so far
    count: int | None = None  # export the first this many matching pairs (None: all)
    order_by: str | None = None  # manifest columns to order by, e.g. "delta_e DESC" (`query.order_clause`)
    random_seed: int | None = None  # a random order drawn from this seed instead


@dataclass(frozen=True)
class ExportSummary:
    out: Path
    pairs: int
    meta_info_files: list[str]


def _png(row: dict, side: str, members: dict[str, bytes]) -> tuple[bytes, tuple[int, int, int]]:
    """The payload as PNG bytes and its (H, W, 3) shape."""
    extension = payload_extension(row["codec"])
    data = members[f"{side}.{extension}"]
    try:
        image = decode_image(f"{side}.{extension}", data)
    except ValueError as error:
        raise FactoryError(f"{row['shard']}: {row['key']}: {error}") from None
    return (data if row["codec"] == "png" else encode_image(image, "png")), image.shape


def _prepare_out(out: Path) -> Path:
    """A temporary folder beside `out` (same filesystem, so the final rename is atomic), named with this process's
    id: `.<out>.<pid>.XXXXXXXX.tmp`. Those of exports that died (kill -9) are deleted first."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FactoryError(f"{out} already exists and is not an empty folder")
    make_local_dirs(out.parent, str(out))
    with hopeless_writes_said(str(out)):
        for leftover in out.parent.glob(f".{glob.escape(out.name)}.*.tmp"):
            pid = leftover.name[len(out.name) + 2 :].partition(".")[0]
            if leftover.is_dir() and pid.isdigit() and not pid_alive(int(pid)):
                logger.warning("removing %s, left by an export that died", leftover)
                shutil.rmtree(leftover, ignore_errors=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".tmp", dir=out.parent))


def export_basicsr(config: ExportConfig) -> ExportSummary:
    """Write the pairs matching `config.where` as BasicSR / Real-ESRGAN paired folders (see the module docstring)."""
    if config.export_format not in EXPORT_FORMATS:
        raise FactoryError(
            f"unknown export format {config.export_format!r}; known: {', '.join(EXPORT_FORMATS)}"
        )
    rows = selected_rows(
        config.manifests_root, config.where, config.count, config.order_by, config.random_seed
    )
    rows = unique_pairs(rows)  # a filtered dataset and its parent hold the same pairs: each is exported once
    out = Path(config.out).absolute()
    temporary = _prepare_out(out)
    try:
        with hopeless_writes_said(str(out), only_full=True):  # a full disk: one line
            (temporary / "hr").mkdir()
            (temporary / "lr").mkdir()
            shapes: dict[str, tuple[int, int, int]] = {}
            exported: list[dict] = []
            for row, members in read_pairs(config.shards_root, rows):
                name = f"{row['key']}.png"
                hr_png, hr_shape = _png(row, "hr", members)
                lr_png, _ = _png(row, "lr", members)
                (temporary / "hr" / name).write_bytes(hr_png)
                (temporary / "lr" / name).write_bytes(lr_png)
                shapes[name] = hr_shape
                exported.append(row)
            names = sorted(shapes)
            (temporary / BASICSR_META_INFO).write_text(
                "".join(f"{name} ({','.join(str(size) for size in shapes[name])})\n" for name in names)
            )
            (temporary / REALESRGAN_META_INFO).write_text("".join(f"{name}, {name}\n" for name in names))
            scales = {row["scale"] for row in exported}
            options = {
                "name": out.name,
                "type": "PairedImageDataset",
                "dataroot_gt": str(out / "hr"),
                "dataroot_lq": str(out / "lr"),
                "meta_info_file": str(out / BASICSR_META_INFO),
                "filename_tmpl": "{}",
                "io_backend": {"type": "disk"},
            }
            if len(scales) == 1:
                options["scale"] = scales.pop()
            header = "# A `datasets: train:` entry for BasicSR (add gt_size, use_hflip, ... for training).\n"
            (temporary / BASICSR_OPTIONS).write_text(header + yaml.safe_dump(options, sort_keys=False))
            pq.write_table(rows_to_table(exported), temporary / "manifest.parquet")
            if out.exists():
                out.rmdir()  # empty (checked above); os.replace onto a folder needs it gone on some systems
            os.replace(temporary, out)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return ExportSummary(out=out, pairs=len(rows), meta_info_files=[BASICSR_META_INFO, REALESRGAN_META_INFO])
