"""Manifest queries: SQL over every pair manifest under a folder (all datasets at once), in a sandbox; the rows and
pairs they select (`select`, `read_pairs`), which `factory filter` (factory.filter), preview, export and the
streaming consumer read.

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
from pathlib import Path

import duckdb
import pyarrow as pa

from factory.config import FactoryError, error_line
from factory.corruption_names import CORRUPTIONS
from factory.manifests import (
    PAIR_SCHEMA,
    check_manifest_root,
    manifest_files,
    pair_manifest_paths,
    unreadable_manifests,
)
from factory.shards import payload_extension, read_samples
from factory.storage import Storage

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


def selected_rows(
    manifests_root, where: str | None, count: int, order_by: str | None = None, random_seed: int | None = None
) -> list[dict]:
    """The first `count` manifest rows matching `where`, in the order asked (preview and export); none matching is a
    one-line FactoryError."""
    rows = select(manifests_root, where, limit=count, order_by=order_by, random_seed=random_seed).to_pylist()
    if not rows:
        raise FactoryError(f"no pairs match {where!r} under {manifests_root}")
    return rows
