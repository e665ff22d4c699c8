"""The one Parquet schema of the factory, and how manifests are laid out, written and read.

Layout (all datasets side by side under one manifest root, default `manifests/`):

    <root>/<dataset>/<dataset>-NNNNNN.parquet   one per shard, written after the shard: its presence commits it
    <root>/<dataset>/_rejects.parquet           inputs that could not be built, with the reason (REJECT_SCHEMA)
    <root>/<dataset>/_card.json                 the dataset card (command, config, plan, checkpoint, summary)

Names starting with "_" are not pair manifests; pyarrow's dataset API skips them by default, and
`manifest_files` skips them too.

A derived dataset (`factory filter`) appears whole or not at all: while it is written its folder holds
`_pending.lock` (PENDING_NAME, an OutputLock), taken before its first file and released after its card, written
last. Readers leave a dataset whose folder holds it out, so a run that died (kill -9) leaves nothing they show; the
next run of the same filter takes the lock over and deletes what the dead one left. `is_pair_manifest` and
`is_readable_dataset` are the one rule for which files are read as manifests, local or on any pyarrow filesystem.

Each pair manifest also carries, in its Parquet key-value metadata under `factory.commit`, the commit record of its
shard (JSON: shard path, byte size and sha256 of the tar, the number of planned crops, a digest of the crop plan and
of the build settings, and the inputs rejected while building that shard). `factory build` reads it to skip
committed shards on a rerun; `verify` (`factory verify`) checks every shard against it and its rows.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from factory.config import FactoryError, error_line
from factory.corruption_names import CORRUPTIONS
from factory.storage import Storage, atomic_path

LABEL_PROB_COLUMNS: tuple[str, ...] = tuple(f"p_{name}" for name in CORRUPTIONS)

# One row per (degraded LR, HR) pair. Every pair is traceable: what it came from (source*, crop_*), what made it
# (model, epoch, preset, checkpoint_sha256, seed, degradation, factory_version), where it lives (shard, payload sizes
# and sha256s) and what it is like (delta_e*, psnr, ssim, checkerboard, label*).
PAIR_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),  # stable, unique: the WebDataset __key__ (no '.')
        pa.field("dataset", pa.string(), nullable=False),  # default "<model>-ep<E>", or --name
        pa.field(
            "model", pa.string(), nullable=False
        ),  # degrader: a reconstructor, bicubic, realesrgan, bsrgan
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
        pa.field(
            "delta_e", pa.float64(), nullable=False
        ),  # mean CIEDE2000, bicubic(HR) vs degraded LR (paper 4.3.2)
        pa.field("delta_e_p95", pa.float64(), nullable=False),  # 95th percentile of the per-pixel CIEDE2000
        pa.field(
            "psnr", pa.float64(), nullable=False
        ),  # degraded LR against bicubic LR, dB (inf -> 100 for bicubic)
        pa.field("ssim", pa.float64(), nullable=False),  # degraded LR against bicubic LR
        # factory.quality.checkerboard_index of degraded vs bicubic LR (~1: no periodic pattern; null: older builds)
        pa.field("checkerboard", pa.float64()),
        pa.field("color_corrected", pa.bool_(), nullable=False),  # --color-correct applied to the degraded LR
        pa.field("shard", pa.string(), nullable=False),  # shard path relative to the shard root
        pa.field("codec", pa.string(), nullable=False),  # "png" or "zst"
        pa.field("hr_bytes", pa.int64(), nullable=False),  # payload sizes and sha256s, as stored in the shard
        pa.field("lr_bytes", pa.int64(), nullable=False),
        pa.field("hr_sha256", pa.string(), nullable=False),
        pa.field("lr_sha256", pa.string(), nullable=False),
        pa.field(
            "seed", pa.int64(), nullable=False
        ),  # the build seed (each pair draws from a generator seeded by (seed, key))
        # Everything the pair's degrader drew, as JSON (factory.degraders; query it with json_extract); null in
        # manifests written before degraders. A reconstructor's names its checkpoint, epoch and generator seed.
        pa.field("degradation", pa.string()),
        # A few of its values, flat, to filter on (null where the pair drew none). realesrgan: the first round's
        # blur σ_x (null for a sinc kernel), Gaussian σ in 8-bit levels (null for Poisson noise) and JPEG quality;
        # bsrgan: the first blur's σ_x, the noise level in 8-bit levels and the final JPEG's quality.
        pa.field("kernel_sigma", pa.float64()),
        pa.field("noise_level", pa.float64()),
        pa.field("jpeg_quality", pa.int32()),
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
LOCK_NAME = "_build.lock"
PENDING_NAME = (
    "_pending.lock"  # a derived dataset not yet whole: readers leave its folder out (module docstring)
)
COMMIT_METADATA_KEY = (
    b"factory.commit"  # Parquet key-value metadata of a pair manifest: its shard's commit record
)


_DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def check_dataset_name(name: str) -> None:
    """A dataset name is a folder and a key prefix: letters, digits, '-' and '_', first a letter or digit (so no
    '.', which WebDataset splits keys at, no '/', and no '_' or '.' start, which readers skip)."""
    if not _DATASET_NAME.fullmatch(name):
        raise FactoryError(
            f"invalid dataset name {name!r}: use letters, digits, '-' and '_' (first a letter or digit)"
        )


def dataset_dir(root: str | os.PathLike, dataset: str) -> Path:
    return Path(root) / dataset


def is_pair_manifest(name: str) -> bool:
    """Whether a file name in a dataset folder is a pair manifest (not rejects, a card, a lock or a temporary)."""
    return name.endswith(".parquet") and not name.startswith(("_", "."))


def is_readable_dataset(storage: Storage, dataset: str) -> bool:
    """Whether readers read dataset folder `dataset` of `storage` (a factory.storage.Storage): not a hidden or
    `_` name, and not a derived dataset still being written (PENDING_NAME)."""
    return not dataset.startswith(("_", ".")) and not storage.exists(f"{dataset}/{PENDING_NAME}")


def pair_manifest_paths(storage: Storage, dataset: str | None = None) -> list[str]:
    """`<dataset>/<file>` of the pair manifests in `storage` (all readable datasets, or one), sorted: the rule of
    `manifest_files` on any pyarrow filesystem."""
    datasets = [dataset] if dataset else storage.list_dirs()
    return [
        f"{name}/{file}"
        for name in datasets
        if is_readable_dataset(storage, name)
        for file in storage.list_files(name)
        if is_pair_manifest(file)
    ]


def dataset_folders(root: str | os.PathLike) -> list[Path]:
    """The dataset folders of a local manifest root that readers read (`is_readable_dataset`), sorted."""
    storage = Storage(root)
    return [Path(root) / name for name in storage.list_dirs() if is_readable_dataset(storage, name)]


def manifest_files(root: str | os.PathLike, dataset: str | None = None) -> list[Path]:
    """The pair manifests under a local `root` (all datasets, or one), sorted; rejects and cards are not included,
    nor is a derived dataset still being written (PENDING_NAME): `pair_manifest_paths` as local paths."""
    return [Path(root) / relative for relative in pair_manifest_paths(Storage(root), dataset)]


def check_manifest_root(root: str | os.PathLike) -> None:
    """Refuse a local folder that is not a manifest root, since a query over it would answer nothing, silently. A
    manifest root holds dataset folders, each with pair manifests, a rejects manifest or a card; the error says what
    `root` holds instead (one dataset's folder, a shard root, something else)."""
    root = Path(root)
    if not root.is_dir():
        raise FactoryError(f"no manifest folder at {root}")
    folders = dataset_folders(root)
    if manifest_files(root) or any(
        (folder / REJECTS_NAME).is_file() or (folder / CARD_NAME).is_file() for folder in folders
    ):
        return
    raise FactoryError(f"no manifests under {root}: {_what_it_holds(root, folders)}")


def _what_it_holds(root: Path, folders: list[Path]) -> str:
    own = [path for path in root.glob("*.parquet") if not path.name.startswith(("_", "."))]
    if own:
        return f"it holds {len(own)} pair manifest(s) itself, as one dataset's folder does; give its parent {root.parent}"
    shards = [path for folder in folders for path in folder.glob("*.tar")]
    if shards:
        return f"its folders hold {len(shards)} .tar shard(s), as a shard root does; give the manifest root"
    names = sorted(path.name for path in root.iterdir())
    if not names:
        return "it is empty"
    more = f" and {len(names) - 5} more" if len(names) > 5 else ""
    return f"it holds {', '.join(names[:5])}{more}"


def unreadable_manifests(root: str | os.PathLike) -> dict[Path, str]:
    """The manifest files under a local `root` (pair manifests and rejects) whose Parquet footer cannot be read, with
    why. Readers leave them out and carry on with the others: one damaged file must not hide every dataset."""
    problems = {}
    rejects = [folder / REJECTS_NAME for folder in dataset_folders(root) if (folder / REJECTS_NAME).is_file()]
    for path in [*manifest_files(root), *rejects]:
        try:
            pq.read_metadata(path)
        except (OSError, pa.ArrowException) as error:
            problems[path] = error_line(error)
    return problems


def write_table_atomic(table: pa.Table, path: str | os.PathLike) -> None:
    """Write `table` to `path` so that readers see the old file or the whole new one, never a part."""
    with atomic_path(path) as temporary:
        pq.write_table(table, temporary)


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


# --------------------------------------------------------------------------------------------------------------------
# Commit records and verification (any pyarrow filesystem, through factory.storage)
# --------------------------------------------------------------------------------------------------------------------


def shard_stem(dataset: str, index: int) -> str:
    """`<dataset>-NNNNNN`: the shared name of a shard (`.tar`) and its manifest (`.parquet`)."""
    return f"{dataset}-{index:06d}"


def write_manifest(storage, relative: str, rows: list[dict], commit: dict[str, Any]) -> None:
    """Write one shard's pair manifest atomically to `relative` in `storage` (a factory.storage.Storage), with its
    commit record in the file's metadata. Written after the shard: its presence commits the shard."""
    table = rows_to_table(rows)
    metadata = dict(table.schema.metadata or {})
    metadata[COMMIT_METADATA_KEY] = json.dumps(commit, sort_keys=True).encode()
    table = table.replace_schema_metadata(metadata)
    with storage.open_atomic(relative) as stream:
        pq.write_table(table, stream)


class ShardOutput:
    """One shard being written (`commit_shard`): `add` writes a sample to its tar and keeps its manifest row;
    `record` is its commit record so far, which the writer may complete until the block ends."""

    def __init__(self, shard: str, writer, stream, record: dict[str, Any]):
        self.shard = shard  # path of the tar relative to the shard root
        self.rows: list[dict] = []
        self.record = record
        self._writer, self._stream = writer, stream

    def add(self, row: dict, members: dict[str, bytes]) -> None:
        """Write sample `row["key"]` (`members`: extension -> bytes) and keep `row` for the manifest."""
        self._writer.add_sample(row["key"], members)
        self.rows.append(row)


@contextlib.contextmanager
def commit_shard(
    shard_storage: Storage, manifest_storage: Storage, dataset: str, stem: str, record: dict[str, Any]
) -> Iterator[ShardOutput]:
    """Write shard `<dataset>/<stem>.tar` and commit it: the one way a dataset is written (the build's workers and
    `factory filter`). Samples go into the tar under a temporary name, through a reproducible tar writer, hashed as
    they stream; when the block ends without an error the tar takes its name, then its manifest is written with the
    commit record in its metadata (`record` completed with the shard's path, size, sha256 and pair count), and its
    presence commits the shard. An error leaves neither (nor a temporary)."""
    from factory.shards import HashingWriter, TarShardWriter

    shard = f"{dataset}/{stem}.tar"
    with shard_storage.open_atomic(shard) as raw:
        stream = HashingWriter(raw)
        with TarShardWriter(stream) as writer:
            output = ShardOutput(shard, writer, stream, dict(record))
            yield output
    output.record.update(
        shard=shard, shard_bytes=stream.size, shard_sha256=stream.hexdigest(), pairs=len(output.rows)
    )
    write_manifest(manifest_storage, f"{dataset}/{stem}.parquet", output.rows, output.record)


def write_rejects(storage, relative: str, rows: list[dict]) -> None:
    """The rejects manifest (REJECT_SCHEMA), atomically."""
    table = rows_to_table(rows, REJECT_SCHEMA)
    with storage.open_atomic(relative) as stream:
        pq.write_table(table, stream)


def read_commit(storage, relative: str) -> dict[str, Any] | None:
    """The commit record of a pair manifest, or None when the file is missing, unreadable or has none."""
    if not storage.exists(relative):
        return None
    try:
        with storage.open_input(relative) as handle:
            metadata = pq.read_schema(handle).metadata or {}
        return json.loads(metadata[COMMIT_METADATA_KEY])
    except (OSError, KeyError, ValueError, pa.ArrowException):
        return None


def read_manifest(storage, relative: str) -> pa.Table:
    """One pair manifest from `storage` as a table of PAIR_SCHEMA."""
    with storage.open_input(relative) as handle:
        return pq.read_table(handle, schema=PAIR_SCHEMA)


@dataclass
class VerifyReport:
    """What `verify` found: checked counts and one line per problem (empty when the datasets are sound)."""

    datasets: list[str] = field(default_factory=list)
    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _payload_problems(where: str, members: dict[str, bytes], row: dict[str, Any]) -> list[str]:
    """Does a sample agree with its manifest row (members present, sizes, sha256s, the json member)?"""
    from factory.shards import payload_extension

    problems = []
    try:
        extension = payload_extension(row["codec"])
    except ValueError:
        return [f"{where}: manifest row has unknown codec {row['codec']!r}"]
    expected = {f"hr.{extension}", f"lr.{extension}", "json"}
    if set(members) != expected:
        problems.append(f"{where}: members {sorted(members)}, expected {sorted(expected)}")
    for side in ("hr", "lr"):
        data = members.get(f"{side}.{extension}")
        if data is None:
            continue
        if len(data) != row[f"{side}_bytes"]:
            problems.append(
                f"{where}: {side} payload is {len(data)} bytes, manifest says {row[f'{side}_bytes']}"
            )
        elif hashlib.sha256(data).hexdigest() != row[f"{side}_sha256"]:
            problems.append(f"{where}: {side} payload sha256 differs from the manifest")
    if "json" in members:
        try:
            stored = json.loads(members["json"])
            if stored.get("key") != row["key"] or stored.get("hr_sha256") != row["hr_sha256"]:
                problems.append(f"{where}: json member does not match the manifest row")
        except ValueError:
            problems.append(f"{where}: json member is not valid JSON")
    return problems


def verify_dataset(shard_storage, manifest_storage, dataset: str, report: VerifyReport) -> None:
    """Check one dataset: every manifest has its shard and every shard its manifest; each shard is readable, has the
    size and sha256 of its commit record, and holds exactly its manifest's samples, each agreeing with its row; no key
    appears twice in the dataset."""
    from factory.shards import read_samples

    report.datasets.append(dataset)
    if not is_readable_dataset(manifest_storage, dataset):
        report.problems.append(
            f"dataset {dataset}: not whole ({PENDING_NAME}): a filter is writing it, or one died writing it; "
            "run the filter again"
        )
        return
    manifests = {
        path.rpartition("/")[2][: -len(".parquet")] for path in pair_manifest_paths(manifest_storage, dataset)
    }
    shards = {name[: -len(".tar")] for name in shard_storage.list_files(dataset) if name.endswith(".tar")}
    shards = {name for name in shards if not name.startswith(".")}
    for stem in sorted(shards - manifests):
        report.problems.append(f"{dataset}/{stem}.tar: orphan shard (no manifest commits it)")
    for stem in sorted(manifests - shards):
        report.problems.append(f"{dataset}/{stem}.parquet: missing shard {dataset}/{stem}.tar")
    key_counts: Counter[str] = Counter()
    for stem in sorted(manifests & shards):
        shard = f"{dataset}/{stem}.tar"
        report.shards += 1
        try:
            table = read_manifest(manifest_storage, f"{dataset}/{stem}.parquet")
        except (OSError, ValueError, pa.ArrowException) as error:
            report.problems.append(f"{dataset}/{stem}.parquet: unreadable manifest: {error}")
            continue
        commit = read_commit(manifest_storage, f"{dataset}/{stem}.parquet") or {}
        rows = table.to_pylist()
        key_counts.update(row["key"] for row in rows)
        by_key: dict[str, dict] = {}
        for row in rows:
            if row["shard"] != shard:
                report.problems.append(f"{shard}: manifest row {row['key']} names shard {row['shard']}")
            if row["dataset"] != dataset:
                report.problems.append(f"{shard}: manifest row {row['key']} is of dataset {row['dataset']}")
            by_key.setdefault(row["key"], row)
        size = shard_storage.size(shard)
        if commit.get("shard_bytes") is not None and size != commit["shard_bytes"]:
            report.problems.append(f"{shard}: {size} bytes, its commit record says {commit['shard_bytes']}")
        digest = hashlib.sha256()
        seen: Counter[str] = Counter()
        try:
            with shard_storage.open_input(shard) as handle:
                hashing = _HashingReader(handle, digest)
                for sample in read_samples(hashing):
                    report.samples += 1
                    seen[sample.key] += 1
                    row = by_key.get(sample.key)
                    if row is None:
                        report.problems.append(f"{shard}: sample {sample.key} is not in its manifest")
                        continue
                    report.problems.extend(_payload_problems(f"{shard}: {sample.key}", sample.members, row))
                hashing.drain()
        except (OSError, tarfile.TarError, ValueError, EOFError) as error:
            report.problems.append(f"{shard}: unreadable shard: {error}")
            continue
        if commit.get("shard_sha256") and digest.hexdigest() != commit["shard_sha256"]:
            report.problems.append(f"{shard}: sha256 differs from its commit record")
        for key, count in sorted(seen.items()):
            if count > 1:
                report.problems.append(f"{shard}: sample {key} appears {count} times")
        for key in sorted(set(by_key) - set(seen)):
            report.problems.append(f"{shard}: manifest row {key} has no sample in the shard")
    for key, count in sorted(key_counts.items()):
        if count > 1:
            report.problems.append(f"{dataset}: key {key} appears in {count} manifest rows")


class _HashingReader:
    """A read-only stream that hashes what passes through it (the whole shard is hashed in the same single pass
    that reads its samples)."""

    def __init__(self, stream, digest):
        self.stream = stream
        self.digest = digest

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.digest.update(data)
        return data

    def drain(self) -> None:
        """Hash whatever the tar reader did not need (end-of-archive padding)."""
        while self.read(1 << 20):
            pass


def verify(
    shards_root: str | os.PathLike, manifests_root: str | os.PathLike, dataset: str | None = None
) -> VerifyReport:
    """Verify one dataset, or every dataset found under either root (see `verify_dataset`)."""
    shard_storage, manifest_storage = Storage(shards_root), Storage(manifests_root)
    report = VerifyReport()
    if dataset is not None:
        names = [dataset]
    else:
        names = sorted(set(shard_storage.list_dirs()) | set(manifest_storage.list_dirs()))
        names = [name for name in names if not name.startswith((".", "_"))]
    if not names:
        report.problems.append(f"no datasets under {shards_root} or {manifests_root}")
    for name in names:
        if not shard_storage.list_files(name) and not manifest_storage.list_files(name):
            report.problems.append(f"dataset {name}: nothing found under {shards_root} or {manifests_root}")
            continue
        verify_dataset(shard_storage, manifest_storage, name, report)
    return report
