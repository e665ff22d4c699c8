"""`factory filter`: a new dataset holding exactly the pairs a SQL predicate selects, whole or not at all.

    factory filter --where "delta_e < 5 AND label = 'gaussian_noise'" --out shards/ --name noisy-low

The pairs are selected and read through factory.query (the DuckDB read side) and written through the build's one
dataset writer (`factory.manifests.commit_shard`): the same tar conventions, reproducible bytes, each shard committed
by its manifest.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from factory import __version__
from factory.config import FactoryError
from factory.diversity import labels_card
from factory.manifests import CARD_NAME, PENDING_NAME, check_dataset_name, commit_shard, shard_stem
from factory.query import read_pairs, select, unique_pairs
from factory.shards import row_json
from factory.storage import OutputLock, Storage

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FilterConfig:
    where: str  # SQL predicate over the manifest columns, e.g. "delta_e < 5 AND label = 'gaussian_noise'"
    # where the parent datasets' shards live (the `shard` column is relative to it); a folder or storage URI
    shards_root: str | Path
    manifests_root: (
        str | Path
    )  # the parent datasets' manifest root, a folder or storage URI (all datasets there are searched)
    out: (
        str | Path
    )  # shard root of the new dataset: it goes to <out>/<name>/<name>-NNNNNN.tar (folder or URI)
    # manifest root of the new dataset (folder or URI); None: manifests_root, beside its parents
    out_manifests: str | Path | None = None
    # the new dataset's name; None: "<parent>-where-<sha256(where)[:8]>" (one parent only)
    name: str | None = None
    pairs_per_shard: int = 1000  # samples per new shard


@dataclass(frozen=True)
class FilterSummary:
    dataset: str
    pairs: int
    shards: list[str]  # shard paths relative to `out`
    parent_datasets: list[str]


def _default_name(parents: list[str], where: str) -> str:
    if len(parents) != 1:
        raise FactoryError(
            f"the matching pairs come from {len(parents)} datasets {parents}; give the new one a --name"
        )
    return f"{parents[0]}-where-{hashlib.sha256(where.encode()).hexdigest()[:8]}"


def filter_dataset(config: FilterConfig) -> FilterSummary:
    """Write a new dataset holding exactly the pairs matching `config.where`: whole or not at all.

    HR and LR payloads are copied byte for byte (no re-encoding). Each new row keeps its parent's `key` (it names
    the pair's source crop, so provenance stays traceable) and every other column; only `dataset` and `shard`
    change, and the sample's `json` member is the new row. Shards are written as the build writes them (same tar
    conventions, reproducible bytes), each atomically and committed by its manifest with a commit record (size,
    sha256) written after it; the dataset card (parents, predicate) comes last. `out` and `out_manifests` may be
    any factory.storage location (a local folder or e.g. s3://bucket/prefix).

    Whole or not at all: the new manifest folder holds PENDING_NAME (an OutputLock) from before the first file to
    after the card, and readers leave it out meanwhile (factory.manifests). An error deletes what was written; a
    run that died (kill -9) leaves the lock, and running the same filter again deletes what it left and starts over.
    """

    out_manifests = config.out_manifests if config.out_manifests is not None else config.manifests_root
    if config.pairs_per_shard < 1:
        raise FactoryError("pairs per shard must be at least 1")
    rows = select(config.manifests_root, config.where).to_pylist()
    if not rows:
        raise FactoryError(f"no pairs match {config.where!r} under {config.manifests_root}")
    rows = unique_pairs(rows)
    parents = sorted({row["dataset"] for row in rows})
    name = config.name if config.name is not None else _default_name(parents, config.where)
    check_dataset_name(name)
    shard_storage, manifest_storage = Storage(config.out), Storage(out_manifests)
    pending = f"{name}/{PENDING_NAME}"
    left_by_a_dead_run = manifest_storage.exists(pending)
    with OutputLock(manifest_storage, pending, "filter", f"dataset {name}"):
        _clear_or_refuse(shard_storage, manifest_storage, name, left_by_a_dead_run)
        try:
            shards = _write_filtered(config, shard_storage, manifest_storage, name, rows, parents)
        except BaseException:
            _remove_dataset_files(shard_storage, manifest_storage, name)
            raise
    logger.info("filter: %d pairs from %s -> %s (%d shards)", len(rows), parents, name, len(shards))
    return FilterSummary(dataset=name, pairs=len(rows), shards=shards, parent_datasets=parents)


def _dataset_files(shard_storage: Storage, manifest_storage: Storage, name: str) -> list[tuple[Storage, str]]:
    """Every file of dataset `name` in both folders but the pending lock, as (storage, relative path)."""
    return [
        (storage, f"{name}/{file}")
        for storage in (shard_storage, manifest_storage)
        for file in storage.list_files(name)
        if not (storage is manifest_storage and file == PENDING_NAME)
    ]


def _remove_dataset_files(shard_storage: Storage, manifest_storage: Storage, name: str) -> int:
    files = _dataset_files(shard_storage, manifest_storage, name)
    for storage, relative in files:
        storage.delete(relative)
    return len(files)


def _clear_or_refuse(
    shard_storage: Storage, manifest_storage: Storage, name: str, left_by_a_dead_run: bool
) -> None:
    """With the pending lock held: delete what a dead run of a filter left, or refuse a dataset that exists."""
    if left_by_a_dead_run:
        removed = _remove_dataset_files(shard_storage, manifest_storage, name)
        logger.warning("filter: removed %d file(s) of dataset %s that a run which died left", removed, name)
        return
    files = _dataset_files(shard_storage, manifest_storage, name)
    if files:
        storage, relative = files[0]
        raise FactoryError(
            f"dataset {name!r} already exists ({storage.uri(relative)}); choose another --name or remove it"
        )


def _write_filtered(
    config: FilterConfig,
    shard_storage: Storage,
    manifest_storage: Storage,
    name: str,
    rows: list[dict],
    parents: list[str],
) -> list[str]:
    """The new dataset's shards, each committed by its manifest (`commit_shard`), then its card; the shard paths."""
    record = {
        "planned": 0,  # set per shard: a filtered shard holds what was selected for it
        "filter_predicate": config.where,
        "parent_datasets": parents,
        "factory_version": __version__,
    }
    shards: list[str] = []
    pairs = read_pairs(config.shards_root, rows)
    first = next(pairs, None)
    with tqdm(total=len(rows), desc=f"filter -> {name}", unit="pair", disable=None) as progress:
        while first is not None:
            stem = shard_stem(name, len(shards))
            with commit_shard(shard_storage, manifest_storage, name, stem, record) as output:
                for row, members in itertools.chain(
                    [first], itertools.islice(pairs, config.pairs_per_shard - 1)
                ):
                    new_row = {**row, "dataset": name, "shard": output.shard}
                    copied = {extension: data for extension, data in members.items() if extension != "json"}
                    output.add(new_row, {**copied, "json": row_json(new_row)})
                    progress.update(1)
                output.record["planned"] = len(output.rows)
            shards.append(output.shard)
            first = next(pairs, None)
    card = {
        "dataset": name,
        "command": "filter",
        "parent_datasets": parents,
        "predicate": config.where,
        "pairs": len(rows),
        "shards": shards,
        "labels": labels_card([row["label"] for row in rows], [row["classifier_sha256"] for row in rows]),
        "config": {
            key: (str(value) if isinstance(value, Path) else value) for key, value in asdict(config).items()
        },
        "factory_version": __version__,
    }
    manifest_storage.write_bytes_atomic(
        f"{name}/{CARD_NAME}", (json.dumps(card, indent=2, sort_keys=True) + "\n").encode()
    )
    return shards
