"""Manifest queries: SQL over every pair manifest under a folder (all datasets at once), in a sandbox; `filter`
writes the matching pairs out as a new dataset.

    factory query "delta_e < 5 AND label = 'gaussian_noise'"
    factory query "SELECT dataset, avg(delta_e) FROM manifests GROUP BY dataset" --format csv

DuckDB sees one view, `manifests`, over exactly the files of `manifest_files(root)` (for an object-store root such as
`s3://bucket/manifests`: the same files read through pyarrow into memory first). Those files are the only
paths it may open: once the view exists, external access is switched off (with the manifest files as the allowed
paths) and the configuration is locked, so a query cannot read other files (`read_csv('/etc/passwd')`), write
(`COPY ... TO`), attach databases or install/load extensions. Only a single SELECT statement is accepted.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import duckdb
import pyarrow as pa
from tqdm import tqdm

from factory import __version__
from factory.config import FactoryError, error_line
from factory.corruption_names import CORRUPTIONS
from factory.diversity import labels_card
from factory.manifests import (
    CARD_NAME,
    PAIR_SCHEMA,
    PENDING_NAME,
    check_dataset_name,
    check_manifest_root,
    manifest_files,
    pair_manifest_paths,
    shard_stem,
    unreadable_manifests,
    write_manifest,
)
from factory.shards import HashingWriter, TarShardWriter, payload_extension, read_samples, row_json
from factory.storage import OutputLock, Storage

logger = logging.getLogger(__name__)

VIEW_NAME = "manifests"
OUTPUT_FORMATS: tuple[str, ...] = ("table", "csv", "json", "keys")

# The columns the `table` format shows for a predicate query; all columns are far too wide for a terminal.
SUMMARY_COLUMNS: tuple[str, ...] = (
    "dataset",
    "key",
    "model",
    "epoch",
    "delta_e",
    "psnr",
    "label",
    "label_prob",
)


def _quote_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _object_store_manifests(manifests_root: str) -> pa.Table:
    """Every pair manifest under an object-store root (`s3://bucket/manifests`), read through pyarrow's filesystem
    (the build's I/O layer) into one table: the sandboxed DuckDB below reads local files only."""
    from factory.manifests import read_manifest

    storage = Storage(manifests_root)
    try:
        tables = [read_manifest(storage, path) for path in pair_manifest_paths(storage)]
    except (OSError, pa.ArrowException) as error:
        raise FactoryError(f"cannot read the manifests under {manifests_root}: {error_line(error)}") from None
    return pa.concat_tables(tables) if tables else PAIR_SCHEMA.empty_table()


def connect(manifests_root: str | os.PathLike, skip_unreadable: bool = False) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the view `manifests` and no other access to the file system.

    An unreadable manifest (`unreadable_manifests`) is an error naming it; with `skip_unreadable` (commands whose
    answer still means something without it: query, stats) a warning naming it, and the view holds the others."""
    remote = "://" in os.fspath(manifests_root)
    files = []
    if not remote:
        check_manifest_root(manifests_root)
        left_out = unreadable_manifests(manifests_root)
        if left_out and not skip_unreadable:
            path, why = next(iter(left_out.items()))
            more = f" (and {len(left_out) - 1} more)" if len(left_out) > 1 else ""
            raise FactoryError(f"unreadable manifest {path}: {why}{more}")
        for path, why in left_out.items():
            logger.warning("left out the unreadable manifest %s: %s", path, why)
        files = [str(path.resolve()) for path in manifest_files(manifests_root) if path not in left_out]
    connection = duckdb.connect(
        ":memory:", config={"autoinstall_known_extensions": False, "autoload_known_extensions": False}
    )
    try:
        if remote:
            connection.register(VIEW_NAME, _object_store_manifests(os.fspath(manifests_root)))
        elif files:
            file_list = "[" + ", ".join(_quote_string(path) for path in files) + "]"
            # union_by_name: manifests written before an additive schema change still line up by column name; the
            # union with an empty table of today's schema gives the columns they lack (e.g. checkerboard) as nulls.
            connection.register("_pair_schema", PAIR_SCHEMA.empty_table())
            connection.execute(
                f"CREATE VIEW {VIEW_NAME} AS SELECT * FROM read_parquet({file_list}, union_by_name = true) "
                "UNION ALL BY NAME SELECT * FROM _pair_schema"
            )
            connection.execute(f"SET allowed_paths = {file_list}")
        else:
            connection.register(VIEW_NAME, PAIR_SCHEMA.empty_table())
        connection.execute("SET enable_external_access = false")
        connection.execute("SET lock_configuration = true")
    except duckdb.Error as error:
        connection.close()
        raise FactoryError(f"cannot open the manifests under {manifests_root}: {error_line(error)}") from None
    return connection


def is_full_query(expression: str) -> bool:
    """True for `SELECT ...` / `WITH ...` (a whole query), False for a predicate over the manifest columns."""
    words = expression.strip().lstrip("(").split(None, 1)
    return bool(words) and words[0].lower() in ("select", "with", "from")


def _single_select(connection: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Refuse anything but one SELECT statement (no COPY, ATTACH, SET, PRAGMA, INSTALL, several statements...)."""
    try:
        statements = connection.extract_statements(sql)
    except duckdb.Error as error:
        raise FactoryError(f"malformed query: {error_line(error)}") from None
    if len(statements) != 1:
        raise FactoryError(f"expected one query, got {len(statements)} statements")
    if statements[0].type != duckdb.StatementType.SELECT:
        raise FactoryError(f"{statements[0].type.name} is not allowed: only one SELECT query")


_LABEL_NAMED = re.compile(r"\blabel\b", re.IGNORECASE)
# `label = 'x'`, `label != 'x'`, `label IN ('x', 'y')`: the class names a predicate compares the label with.
_LABEL_COMPARED = re.compile(r"\blabel\s*(?:==?|!=|<>)\s*'((?:[^']|'')*)'", re.IGNORECASE)
_LABEL_IN = re.compile(r"\blabel\s+(?:not\s+)?in\s*\(([^)]*)\)", re.IGNORECASE)
_STRING_LITERAL = re.compile(r"'((?:[^']|'')*)'")


def _warn_about_labels(connection: duckdb.DuckDBPyConnection, expression: str) -> None:
    """A query naming `label` answers nothing, silently, when no pair is labelled yet or the class is misspelled:
    say so on stderr (a warning, since no rows may be the right answer)."""
    if not _LABEL_NAMED.search(expression):
        return
    named = _LABEL_COMPARED.findall(expression)
    for listed in _LABEL_IN.findall(expression):
        named += _STRING_LITERAL.findall(listed)
    unknown = sorted({name.replace("''", "'") for name in named} - set(CORRUPTIONS))
    if unknown:
        logger.warning(
            "label %s is not one of the %d degradation classes: %s",
            ", ".join(repr(name) for name in unknown),
            len(CORRUPTIONS),
            ", ".join(CORRUPTIONS),
        )
    try:
        labelled = connection.sql(f"SELECT count(label) FROM {VIEW_NAME}").fetchall()[0][0]
    except duckdb.Error:
        return  # the query itself reports what is wrong
    if labelled == 0:
        logger.warning("the query names `label` but no pair has one yet; label them with `factory label`")


def _run(connection: duckdb.DuckDBPyConnection, sql: str) -> pa.Table:
    _single_select(connection, sql)
    try:
        return connection.sql(sql).to_arrow_table()
    except duckdb.Error as error:
        raise FactoryError(f"query failed: {error_line(error)}") from None


def _as_pair_types(table: pa.Table) -> pa.Table:
    """Give columns that are manifest columns their PAIR_SCHEMA type (DuckDB may widen or re-type them)."""
    fields = []
    for field in table.schema:
        if field.name in PAIR_SCHEMA.names:
            fields.append(PAIR_SCHEMA.field(field.name).with_nullable(True))
        else:
            fields.append(field)
    return table.cast(pa.schema(fields))


_ORDER_TERM = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)(?:\s+(ASC|DESC))?\s*", re.IGNORECASE)


def order_clause(order_by: str) -> str:
    """`--order-by` ("delta_e DESC", "label, delta_e DESC") as SQL: manifest columns, each optionally followed by
    ASC or DESC, and nothing else (it is pasted into the query, so no other SQL gets through)."""
    terms = []
    for term in order_by.split(","):
        match = _ORDER_TERM.fullmatch(term)
        if match is None or match.group(1) not in PAIR_SCHEMA.names:
            raise FactoryError(
                f"--order-by {order_by!r}: give manifest columns, each optionally followed by ASC or DESC "
                "(e.g. 'delta_e DESC')"
            )
        terms.append(f"{_quote_identifier(match.group(1))} {(match.group(2) or 'ASC').upper()}")
    return ", ".join(terms)


def _refuse_statement(connection: duckdb.DuckDBPyConnection, predicate: str) -> None:
    """A predicate that is a statement of its own (`COPY ... TO`, `ATTACH`, `INSTALL`) is refused by name; inside
    `WHERE (...)` it would only be a syntax error."""
    try:
        statements = connection.extract_statements(predicate)
    except duckdb.Error:
        return  # not a statement: a predicate (or a malformed one, which the query reports)
    if any(statement.type != duckdb.StatementType.SELECT for statement in statements):
        word = predicate.split(None, 1)[0].upper()
        raise FactoryError(
            f"{word} is not allowed: give a predicate over the manifest columns, or one SELECT"
        )


def select(
    manifests_root: str | os.PathLike,
    where: str | None,
    columns: Sequence[str] | None = None,
    limit: int | None = None,
    order_by: str | None = None,
    random_seed: int | None = None,
    skip_unreadable: bool = False,
) -> pa.Table:
    """The manifest rows (all datasets) matching the SQL predicate `where` (None: all rows), in manifest order.

    `columns`: manifest columns to return (None: all of PAIR_SCHEMA). Columns keep their PAIR_SCHEMA types.
    `limit`: at most this many rows (the first in the order asked for).
    `order_by`: rows in this order instead (`order_clause`), ties by dataset and key.
    `random_seed`: rows in a random order drawn from this seed instead (the same seed, the same order: it hashes
    each pair's dataset and key, so it does not depend on how the manifests are split into files).
    `skip_unreadable`: leave out unreadable manifests with a warning instead of failing (`connect`).
    """
    if where is not None and not where.strip():
        where = None
    if where is not None and is_full_query(where):
        raise FactoryError('--where takes a predicate (e.g. "delta_e < 5"), not a whole SELECT query')
    if order_by is not None and random_seed is not None:
        raise FactoryError("give --order-by or --random, not both")
    if columns is None:
        columns = PAIR_SCHEMA.names
    unknown = [name for name in columns if name not in PAIR_SCHEMA.names]
    if unknown:
        raise FactoryError(f"unknown manifest column(s) {unknown}")
    column_list = ", ".join(_quote_identifier(name) for name in columns)
    sql = f"SELECT {column_list} FROM {VIEW_NAME}"
    if where is not None:
        # The newline ends a trailing `--` comment in the predicate so the parenthesis still closes it.
        sql += f" WHERE ({where}\n)"
    if order_by is not None:
        sql += f" ORDER BY {order_clause(order_by)}, dataset, key"
    elif random_seed is not None:
        sql += f" ORDER BY hash(dataset, key, {int(random_seed)}), dataset, key"
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    connection = connect(manifests_root, skip_unreadable)
    try:
        if where is not None:
            _refuse_statement(connection, where)
            _warn_about_labels(connection, where)
        return _as_pair_types(_run(connection, sql))
    finally:
        connection.close()


def query(
    manifests_root: str | os.PathLike,
    expression: str,
    columns: Sequence[str] | None = None,
    order_by: str | None = None,
    random_seed: int | None = None,
    skip_unreadable: bool = False,
) -> pa.Table:
    """A SQL predicate over the manifest columns (all rows matching; the other arguments as in `select`), or a full
    SELECT over the view `manifests` (aggregates, joins of the view with itself, ...)."""
    if not expression.strip():
        raise FactoryError("empty query")
    if not is_full_query(expression):
        return select(
            manifests_root,
            expression,
            columns,
            order_by=order_by,
            random_seed=random_seed,
            skip_unreadable=skip_unreadable,
        )
    if order_by is not None or random_seed is not None:
        raise FactoryError(
            "--order-by and --random order a predicate's rows; a whole query says ORDER BY itself"
        )
    connection = connect(manifests_root, skip_unreadable)
    try:
        _warn_about_labels(connection, expression)
        return _run(connection, expression)
    finally:
        connection.close()


def _cell_text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def format_table(table: pa.Table, fmt: str, summary: bool = False) -> str:
    """The query result as text: `table` (aligned columns), `csv`, `json` (JSON Lines) or `keys` (one key a line).

    summary: for `table`, show only SUMMARY_COLUMNS (a predicate query returns all ~50 manifest columns).
    """
    if fmt not in OUTPUT_FORMATS:
        raise FactoryError(f"unknown format {fmt!r}; known: {', '.join(OUTPUT_FORMATS)}")
    rows = table.to_pylist()
    if fmt == "keys":
        if "key" not in table.column_names:
            raise FactoryError("--format keys needs a result with a 'key' column")
        return "".join(f"{row['key']}\n" for row in rows)
    if fmt == "json":
        # default=str: dates/decimals from aggregate queries; NaN stays JSON's usual extension (NaN).
        return "".join(json.dumps(row, default=str) + "\n" for row in rows)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(table.column_names)
        for row in rows:
            writer.writerow(["" if value is None else value for value in row.values()])
        return buffer.getvalue()
    names = table.column_names
    hidden = 0
    if summary and len(names) > len(SUMMARY_COLUMNS):
        shown = [name for name in SUMMARY_COLUMNS if name in names]
        hidden = len(names) - len(shown)
        names = shown
    cells = [[_cell_text(row[name]) for name in names] for row in rows]
    widths = [max([len(name)] + [len(line[index]) for line in cells]) for index, name in enumerate(names)]
    lines = ["  ".join(name.ljust(width) for name, width in zip(names, widths, strict=True)).rstrip()]
    lines += [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in cells
    ]
    footer = f"({table.num_rows} row{'s' if table.num_rows != 1 else ''}"
    footer += f"; {hidden} more columns with --format csv or json)" if hidden else ")"
    return "\n".join(lines + [footer]) + "\n"


# --- filter: a new dataset holding exactly the matching pairs ---------------------------------------------------


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


def read_pairs(shards_root: str | Path, rows: list[dict]) -> Iterator[tuple[dict, dict[str, bytes]]]:
    """(manifest row, {member extension: bytes}) for each given manifest row, in shard order then member order.

    Streams: each shard is read once, sequentially, and only one sample is held at a time. Payloads are checked
    against the manifest's sha256, so a damaged shard is never copied or shown silently (FactoryError), nor is a
    shard that lacks a pair its manifest lists (raised once that shard has been read)."""
    storage = Storage(shards_root)
    by_shard: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_shard.setdefault(row["shard"], {})[row["key"]] = row
    for shard in sorted(by_shard):
        wanted = by_shard[shard]
        seen: set[str] = set()
        try:
            with storage.open_input(shard) as handle:
                for sample in read_samples(handle):
                    row = wanted.get(sample.key)
                    if row is None:
                        continue
                    for side in ("hr", "lr"):
                        payload = sample.members.get(f"{side}.{payload_extension(row['codec'])}")
                        if payload is None or hashlib.sha256(payload).hexdigest() != row[f"{side}_sha256"]:
                            raise FactoryError(
                                f"shard {shard}: the {side} payload of {sample.key!r} does not match its manifest"
                            )
                    seen.add(sample.key)
                    yield row, sample.members
        except (OSError, tarfile.TarError, ValueError, EOFError) as error:
            raise FactoryError(f"cannot read shard {storage.uri(shard)}: {error_line(error)}") from None
        missing = sorted(set(wanted) - seen)
        if missing:
            raise FactoryError(
                f"shard {shard} lacks {len(missing)} pair(s) its manifest lists, e.g. {missing[0]!r}"
            )


class _ShardOutput:
    """One new shard, written sample by sample through the build's tar writer to a temporary name; `close` moves
    it onto its final name, `abandon` deletes the temporary."""

    def __init__(self, storage: Storage, shard: str):
        self.shard = shard
        self._target = storage.open_atomic(shard)
        self.stream = HashingWriter(self._target.__enter__())
        self.writer = TarShardWriter(self.stream)
        self.rows: list[dict] = []

    def close(self) -> None:
        self.writer.close()
        self._target.__exit__(None, None, None)

    def abandon(self, error: BaseException) -> None:
        self.writer.abandon()  # before its file goes, or tarfile writes to it when collected
        self._target.__exit__(type(error), error, error.__traceback__)


def unique_pairs(rows: list[dict]) -> list[dict]:
    """One row per pair key, in order. A filtered dataset repeats its parents' keys with the same bytes (filter copies
    them), so rows of one key with equal HR and LR sha256s are one pair, met again: the first row (manifest order,
    datasets sorted by name, so usually the parent) stands for it. Rows of one key with other bytes are different
    pairs under one name, which no exported folder or new dataset can hold: an error."""
    kept: dict[str, dict] = {}
    for row in rows:
        first = kept.setdefault(row["key"], row)
        if (first["hr_sha256"], first["lr_sha256"]) != (row["hr_sha256"], row["lr_sha256"]):
            raise FactoryError(
                f"pair key {row['key']!r} holds different images in datasets {first['dataset']!r} and "
                f"{row['dataset']!r}; narrow --where to one of them"
            )
    return list(kept.values())


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
    """The new dataset's tars, then their manifests (which commit them), then its card; the new shard paths."""
    finished: list[_ShardOutput] = []
    current: _ShardOutput | None = None
    progress = tqdm(total=len(rows), desc=f"filter -> {name}", unit="pair", disable=None)
    try:
        for row, members in read_pairs(config.shards_root, rows):
            if current is None:
                current = _ShardOutput(shard_storage, f"{name}/{shard_stem(name, len(finished))}.tar")
            new_row = {**row, "dataset": name, "shard": current.shard}
            copied = {extension: data for extension, data in members.items() if extension != "json"}
            current.writer.add_sample(row["key"], {**copied, "json": row_json(new_row)})
            current.rows.append(new_row)
            progress.update(1)
            if len(current.rows) == config.pairs_per_shard:
                current.close()
                finished.append(current)
                current = None
        if current is not None:
            current.close()
            finished.append(current)
            current = None
    except BaseException as error:
        if current is not None:
            current.abandon(error)
        raise
    finally:
        progress.close()
    for output in finished:
        record = {
            "shard": output.shard,
            "shard_bytes": output.stream.size,
            "shard_sha256": output.stream.hexdigest(),
            "pairs": len(output.rows),
            "planned": len(output.rows),
            "filter_predicate": config.where,
            "parent_datasets": parents,
            "factory_version": __version__,
        }
        stem = output.shard.rsplit("/", 1)[1][: -len(".tar")]
        write_manifest(manifest_storage, f"{name}/{stem}.parquet", output.rows, record)
    shards = [output.shard for output in finished]
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


def selected_rows(
    manifests_root, where: str | None, count: int, order_by: str | None = None, random_seed: int | None = None
) -> list[dict]:
    """The first `count` manifest rows matching `where`, in the order asked (preview and export); none matching is a
    one-line FactoryError."""
    rows = select(manifests_root, where, limit=count, order_by=order_by, random_seed=random_seed).to_pylist()
    if not rows:
        raise FactoryError(f"no pairs match {where!r} under {manifests_root}")
    return rows
