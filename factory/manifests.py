"""The one Parquet schema of the factory, and how manifests are laid out, written and read.

Layout (all datasets side by side under one manifest root, default `manifests/`):

    <root>/<dataset>/<dataset>-NNNNNN.parquet   one per shard, written after the shard: its presence commits it
    <root>/<dataset>/_rejects.parquet           inputs that could not be built, with the reason (REJECT_SCHEMA)
    <root>/<dataset>/_card.json                 the dataset card (command, config, plan, checkpoint, summary)

Names starting with "_" are not pair manifests; pyarrow's dataset API skips them by default, and
`manifest_files` skips them too.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from factory.corruptions import CORRUPTIONS

LABEL_PROB_COLUMNS: tuple[str, ...] = tuple(f"p_{name}" for name in CORRUPTIONS)

# One row per (degraded LR, HR) pair. Every pair is traceable: what it came from (source*, crop_*), what made it
# (model, epoch, preset, checkpoint_sha256, seed, factory_version), where it lives (shard, payload sizes and sha256s)
# and what it is like (delta_e*, psnr, ssim, label*).
PAIR_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),  # stable, unique: the WebDataset __key__ (no '.')
        pa.field("dataset", pa.string(), nullable=False),  # default "<model>-ep<E>", or --name
        pa.field("model", pa.string(), nullable=False),  # registry name, or "bicubic"
        pa.field("epoch", pa.int32()),  # training epoch of the checkpoint; null for bicubic
        pa.field("preset", pa.string()),  # model preset; null for bicubic
        pa.field("checkpoint_sha256", pa.string()),  # null for bicubic
        pa.field("source", pa.string(), nullable=False),  # path relative to its HR root
        pa.field("source_root", pa.string(), nullable=False),  # the HR root as given (or "skimage-data")
        pa.field("source_sha256", pa.string(), nullable=False),  # of the source file's bytes
        pa.field("crop_top", pa.int32(), nullable=False),  # crop box in the decoded (EXIF-oriented) source
        pa.field("crop_left", pa.int32(), nullable=False),
        pa.field("crop_height", pa.int32(), nullable=False),
        pa.field("crop_width", pa.int32(), nullable=False),
        pa.field("scale", pa.int32(), nullable=False),  # HR size / LR size
        pa.field("delta_e", pa.float64(), nullable=False),  # mean CIEDE2000, bicubic(HR) vs degraded LR (paper 4.3.2)
        pa.field("delta_e_p95", pa.float64(), nullable=False),  # 95th percentile of the per-pixel CIEDE2000
        pa.field("psnr", pa.float64(), nullable=False),  # degraded LR against bicubic LR, dB (inf -> 100 for bicubic)
        pa.field("ssim", pa.float64(), nullable=False),  # degraded LR against bicubic LR
        pa.field("color_corrected", pa.bool_(), nullable=False),  # --color-correct applied to the degraded LR
        pa.field("shard", pa.string(), nullable=False),  # shard path relative to the shard root
        pa.field("codec", pa.string(), nullable=False),  # "png" or "zst"
        pa.field("hr_bytes", pa.int64(), nullable=False),  # payload sizes and sha256s, as stored in the shard
        pa.field("lr_bytes", pa.int64(), nullable=False),
        pa.field("hr_sha256", pa.string(), nullable=False),
        pa.field("lr_sha256", pa.string(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),  # the build seed (sampling models draw from it per pair)
        pa.field("factory_version", pa.string(), nullable=False),
        pa.field("label", pa.string()),  # degradation class (one of CORRUPTIONS); null until labelled
        pa.field("label_prob", pa.float32()),  # probability of `label`
        pa.field("classifier_sha256", pa.string()),  # which classifier labelled the pair
        *[pa.field(name, pa.float32()) for name in LABEL_PROB_COLUMNS],  # the 15 class probabilities
    ]
)

REJECT_SCHEMA = pa.schema(
    [
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),  # path relative to its HR root
        pa.field("source_root", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),  # short machine-readable cause, e.g. "too_small"
        pa.field("detail", pa.string(), nullable=False),  # the human-readable message
    ]
)

REJECTS_NAME = "_rejects.parquet"
CARD_NAME = "_card.json"


def dataset_dir(root: str | os.PathLike, dataset: str) -> Path:
    return Path(root) / dataset


def manifest_files(root: str | os.PathLike, dataset: str | None = None) -> list[Path]:
    """The pair manifests under `root` (all datasets, or one), sorted; rejects and cards are not included."""
    root = Path(root)
    pattern = f"{dataset}/*.parquet" if dataset else "*/*.parquet"
    return sorted(path for path in root.glob(pattern) if not path.name.startswith(("_", ".")))


def write_table_atomic(table: pa.Table, path: str | os.PathLike) -> None:
    """Write `table` to `path` so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        pq.write_table(table, temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def rows_to_table(rows: list[dict], schema: pa.Schema = PAIR_SCHEMA) -> pa.Table:
    """Rows (dicts) to a table of exactly `schema`: missing nullable columns become null, extra keys are an error."""
    names = set(schema.names)
    for row in rows:
        extra = set(row) - names
        if extra:
            raise ValueError(f"manifest row has columns not in the schema: {sorted(extra)}")
    columns = {name: [row.get(name) for row in rows] for name in schema.names}
    return pa.Table.from_pydict(columns, schema=schema)


def read_manifests(root: str | os.PathLike, dataset: str | None = None) -> pa.Table:
    """All pair rows under `root` (all datasets, or one) as one table of PAIR_SCHEMA."""
    files = manifest_files(root, dataset)
    if not files:
        return PAIR_SCHEMA.empty_table()
    return pa.concat_tables([pq.read_table(path, schema=PAIR_SCHEMA) for path in files])
