"""Manifest queries (factory/query.py) and `factory filter`.

References: query results are checked against a plain pyarrow filter (`pyarrow.dataset` + `pyarrow.compute`) over
the same Parquet files, written by nobody here; the sandbox is checked against DuckDB's own refusals.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pytest
from click.testing import CliRunner
from manifest_fixtures import PairSpec, make_dataset, sample_payloads

from factory.cli import main
from factory.config import FactoryError
from factory.diversity import degradation_entropy, labels_card
from factory.manifests import PAIR_SCHEMA, manifest_files, verify
from factory.query import format_table, query, select

LABELS = ("gaussian_noise", "jpeg_compression", "defocus_blur", "gaussian_noise", None)


@pytest.fixture(scope="module")
def built(tmp_path_factory, photos) -> dict:
    """Two datasets (two and three shards) with known delta_e and labels."""
    root = tmp_path_factory.mktemp("built")
    shards, manifests = root / "shards", root / "manifests"
    specs_a = [PairSpec(delta_e=0.5 * index, label=LABELS[index % 5]) for index in range(7)]
    specs_b = [PairSpec(delta_e=10.0 - index, label=LABELS[(index + 1) % 5]) for index in range(9)]
    rows_a = make_dataset(shards, manifests, "vqvae2-ep8", specs_a, photos, epoch=8)
    rows_b = make_dataset(shards, manifests, "mae-ep4", specs_b, photos, model="mae", epoch=4, codec="zst")
    return {"shards": shards, "manifests": manifests, "rows": rows_a + rows_b}


def pyarrow_reference(manifests: Path, expression: pc.Expression) -> pa.Table:
    dataset = ds.dataset(
        [str(path) for path in manifest_files(manifests)], schema=PAIR_SCHEMA, format="parquet"
    )
    return dataset.to_table(filter=expression)


def sorted_rows(table: pa.Table) -> list[dict]:
    return sorted(table.to_pylist(), key=lambda row: (row["dataset"], row["key"]))


@pytest.mark.parametrize(
    ("predicate", "expression"),
    [
        ("delta_e < 2", pc.field("delta_e") < 2),
        (
            "delta_e < 5 AND label = 'gaussian_noise'",
            (pc.field("delta_e") < 5) & (pc.field("label") == "gaussian_noise"),
        ),
        ("label IS NULL OR model = 'mae'", pc.field("label").is_null() | (pc.field("model") == "mae")),
        ("epoch >= 8", pc.field("epoch") >= 8),
    ],
)
def test_predicate_equals_pyarrow_filter(built, predicate, expression):
    result = select(built["manifests"], predicate)
    reference = pyarrow_reference(built["manifests"], expression)
    assert reference.num_rows > 0
    assert result.schema.names == PAIR_SCHEMA.names
    assert sorted_rows(result) == sorted_rows(reference)
    assert sorted_rows(query(built["manifests"], predicate)) == sorted_rows(reference)


def test_select_all_and_columns(built):
    everything = select(built["manifests"], None)
    assert everything.num_rows == len(built["rows"]) == 16
    some = select(built["manifests"], "dataset = 'mae-ep4'", columns=["key", "delta_e"])
    assert some.schema == pa.schema(
        [PAIR_SCHEMA.field("key").with_nullable(True), PAIR_SCHEMA.field("delta_e").with_nullable(True)]
    )
    assert sorted(some.column("key").to_pylist()) == sorted(
        row["key"] for row in built["rows"] if row["dataset"] == "mae-ep4"
    )


def test_aggregate_query_equals_pyarrow_group_by(built):
    result = query(
        built["manifests"],
        "SELECT dataset, avg(delta_e) AS mean, count(*) AS n FROM manifests GROUP BY dataset",
    )
    reference = (
        pyarrow_reference(built["manifests"], pc.scalar(True))
        .group_by("dataset")
        .aggregate([("delta_e", "mean"), ("delta_e", "count")])
    )
    expected = {row["dataset"]: (row["delta_e_mean"], row["delta_e_count"]) for row in reference.to_pylist()}
    got = {row["dataset"]: (row["mean"], row["n"]) for row in result.to_pylist()}
    assert got.keys() == expected.keys()
    for name, (mean, count) in expected.items():
        assert got[name][0] == pytest.approx(mean)
        assert got[name][1] == count


@pytest.mark.parametrize(
    "attack",
    [
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM read_csv_auto('/etc/passwd')",
        "SELECT * FROM read_text('/etc/passwd')",
        "SELECT * FROM read_blob('/etc/passwd')",
        "SELECT * FROM read_parquet('{outside}')",
        "SELECT * FROM glob('/etc/*')",
        "COPY (SELECT * FROM manifests) TO '{written}'",
        "ATTACH '{written}' AS other",
        "INSTALL httpfs",
        "LOAD httpfs",
        "SET enable_external_access = true",
        "SELECT 1; SELECT * FROM read_csv('/etc/passwd')",
        "key IN (SELECT column0 FROM read_csv('/etc/passwd'))",
        "true) UNION ALL SELECT * FROM read_csv('/etc/passwd') --",
    ],
)
def test_query_reaches_nothing_but_the_manifests(built, tmp_path, attack):
    # A Parquet file outside the manifest folder, with a secret in it: the query must not see it.
    outside = tmp_path / "outside.parquet"
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"secret": ["s3cr3t-value"]}), outside)
    written = tmp_path / "written.out"
    expression = attack.format(outside=outside, written=written)
    with pytest.raises(FactoryError) as raised:
        query(built["manifests"], expression)
    message = str(raised.value)
    assert "\n" not in message
    assert "root:" not in message and "s3cr3t" not in message  # nothing of /etc/passwd or the outside file
    assert not written.exists()


def test_malformed_query_is_one_line_error(built):
    runner = CliRunner()
    for expression in (
        "delta_e <",
        "SELEC * FROM manifests",
        "no_such_column > 1",
        "SELECT * FROM nothing_here",
    ):
        result = runner.invoke(main, ["query", expression, "--manifests", str(built["manifests"])])
        assert result.exit_code == 2, result.output
        assert result.output.startswith("error: ") and result.output.count("\n") == 1, result.output


def test_cli_formats(built):
    runner = CliRunner()
    base = ["query", "delta_e < 2", "--manifests", str(built["manifests"])]
    expected_keys = sorted(row["key"] for row in built["rows"] if row["delta_e"] < 2)

    keys = runner.invoke(main, [*base, "--format", "keys"])
    assert keys.exit_code == 0, keys.output
    assert sorted(keys.output.split()) == expected_keys

    lines = runner.invoke(main, [*base, "--format", "json"]).output.splitlines()
    assert sorted(json.loads(line)["key"] for line in lines) == expected_keys

    csv_text = runner.invoke(main, [*base, "--format", "csv"]).output.splitlines()
    assert csv_text[0].split(",") == PAIR_SCHEMA.names and len(csv_text) == len(expected_keys) + 1

    table = runner.invoke(main, base).output.splitlines()
    assert table[0].split()[:2] == ["dataset", "key"]
    assert table[-1].startswith(f"({len(expected_keys)} rows")

    aggregate = runner.invoke(
        main,
        [
            "query",
            "SELECT count(*) AS n FROM manifests",
            "--manifests",
            str(built["manifests"]),
            "--format",
            "csv",
        ],
    )
    assert aggregate.output == "n\n16\n"


def test_a_root_without_manifests_is_an_error_naming_what_it_holds(built, tmp_path):
    # Each of these answered nothing and exited 0, as if no pair matched.
    runner = CliRunner()
    dataset_folder = built["manifests"] / "mae-ep4"
    for root, said in (
        (tmp_path / "nonexistent", "no manifest folder at"),
        (tmp_path, "it is empty"),
        (dataset_folder, f"as one dataset's folder does; give its parent {built['manifests']}"),
        (built["shards"], "as a shard root does"),
    ):
        result = runner.invoke(main, ["query", "delta_e < 5", "--manifests", str(root), "--format", "keys"])
        assert result.exit_code == 2, result.output
        assert result.output.startswith("error: ") and result.output.count("\n") == 1, result.output
        assert said in result.output
        with pytest.raises(FactoryError, match=said):
            select(root, None)


def test_a_root_whose_datasets_hold_only_rejects_answers_no_rows(tmp_path):
    from factory.manifests import REJECTS_NAME, write_rejects
    from factory.storage import Storage

    write_rejects(Storage(tmp_path), f"all-rejected/{REJECTS_NAME}", [])
    assert select(tmp_path, "delta_e < 1").num_rows == 0
    assert format_table(select(tmp_path, None), "keys") == ""


def test_filter_copies_exactly_the_matching_pairs(built, tmp_path):
    from factory.filter import FilterConfig, filter_dataset

    predicate = "delta_e < 4.5 AND label IS NOT NULL"
    out_shards, out_manifests = tmp_path / "shards", tmp_path / "manifests"
    summary = filter_dataset(
        FilterConfig(
            where=predicate,
            shards_root=built["shards"],
            manifests_root=built["manifests"],
            out=out_shards,
            out_manifests=out_manifests,
            name="low-de",
            pairs_per_shard=3,
        )
    )
    expected = {
        (row["dataset"], row["key"]): row for row in built["rows"] if row["delta_e"] < 4.5 and row["label"]
    }
    assert summary.pairs == len(expected) == 8  # ceil(8 / 3) = 3 new shards

    new_rows = select(out_manifests, None).to_pylist()
    assert sorted(row["key"] for row in new_rows) == sorted(key for _, key in expected)
    assert {row["dataset"] for row in new_rows} == {"low-de"}
    originals = {}
    for path in sorted(built["shards"].glob("*/*.tar")):
        originals.update(sample_payloads(path))
    for row in new_rows:
        copied = sample_payloads(out_shards / row["shard"])[row["key"]]
        original = originals[row["key"]]
        # Payloads byte for byte; the json member is the new manifest row.
        assert {suffix: data for suffix, data in copied.items() if suffix != "json"} == {
            suffix: data for suffix, data in original.items() if suffix != "json"
        }
        assert json.loads(copied["json"]) == row
        parent_row = next(value for (_, key), value in expected.items() if key == row["key"])
        # Decision: key and every other column are the parent's; only dataset and shard change.
        assert {k: v for k, v in row.items() if k not in ("dataset", "shard")} == {
            k: v for k, v in parent_row.items() if k not in ("dataset", "shard")
        }
    # The new dataset passes the build engineer's verify (payload hashes, commit records, no orphan, no duplicate).
    report = verify(out_shards, out_manifests)
    assert report.ok, report.problems
    assert (report.datasets, report.shards, report.samples) == (["low-de"], 3, len(expected))
    card = json.loads((out_manifests / "low-de" / "_card.json").read_text())
    assert card["predicate"] == predicate
    assert card["parent_datasets"] == sorted({dataset for dataset, _ in expected})
    assert card["pairs"] == len(expected)
    labels = [
        row["label"] for row in new_rows
    ]  # the card's labels section describes the new dataset's own pairs
    assert card["labels"] == labels_card(labels, [row["classifier_sha256"] for row in new_rows])
    assert card["labels"]["entropy"] == pytest.approx(
        degradation_entropy([label for label in labels if label])
    )


def test_filter_is_reproducible_and_refuses_bad_requests(built, tmp_path):
    from factory.filter import FilterConfig, filter_dataset

    def run(target: Path, name: str = "mae-low", where: str = "model = 'mae' AND delta_e < 6"):
        return filter_dataset(
            FilterConfig(
                where=where,
                shards_root=built["shards"],
                manifests_root=built["manifests"],
                out=target / "s",
                out_manifests=target / "m",
                name=name,
            )
        )

    run(tmp_path / "one")
    run(tmp_path / "two")
    first = sorted((tmp_path / "one" / "s").rglob("*.tar"))
    second = sorted((tmp_path / "two" / "s").rglob("*.tar"))
    assert [path.read_bytes() for path in first] == [path.read_bytes() for path in second]

    with pytest.raises(FactoryError, match="already exists"):
        run(tmp_path / "one")
    with pytest.raises(FactoryError, match="no pairs match"):
        run(tmp_path / "three", where="delta_e > 1000")
    with pytest.raises(FactoryError, match="malformed|query failed"):
        run(tmp_path / "four", where="delta_e <")


def test_filter_of_a_damaged_parent_leaves_nothing(tmp_path, photos):
    from factory.filter import FilterConfig, filter_dataset

    shards, manifests = tmp_path / "shards", tmp_path / "manifests"
    make_dataset(
        shards, manifests, "broken", [PairSpec(float(index)) for index in range(6)], photos, pairs_per_shard=3
    )
    # Flip one byte inside an LR payload of the second parent shard: the first new shard is already written by then.
    shard = shards / "broken" / "broken-000001.tar"
    data = bytearray(shard.read_bytes())
    offset = data.index(b"IDAT", data.index(b"lr.png")) + 8
    data[offset] ^= 0xFF
    shard.write_bytes(bytes(data))
    config = FilterConfig(
        where="true",
        shards_root=shards,
        manifests_root=manifests,
        out=tmp_path / "out",
        out_manifests=tmp_path / "out-manifests",
        name="copy",
        pairs_per_shard=2,
    )
    with pytest.raises(FactoryError, match="does not match its manifest"):
        filter_dataset(config)
    assert not [path for path in (tmp_path / "out").rglob("*") if path.is_file()]
    assert not (tmp_path / "out-manifests").exists() or not any(
        (tmp_path / "out-manifests").rglob("*.parquet")
    )


def test_a_misspelled_label_class_is_said_on_stderr(built, caplog):
    # Both answered 0 rows and said nothing: a typo looked like "no such pair".
    for expression in ("label = 'gausian_noise'", "delta_e < 5 AND label IN ('fog', 'jpeg')"):
        caplog.clear()
        result = CliRunner().invoke(main, ["query", expression, "--manifests", str(built["manifests"])])
        assert result.exit_code == 0, result.output
        assert "is not one of the 15 degradation classes" in caplog.text
    caplog.clear()
    query(built["manifests"], "label = 'gaussian_noise' OR label IN ('fog', 'jpeg_compression')")
    assert "degradation classes" not in caplog.text and "no pair has one" not in caplog.text


def test_a_label_predicate_on_unlabelled_pairs_is_said_on_stderr(tmp_path, photos, caplog):
    manifests = tmp_path / "manifests"
    make_dataset(tmp_path / "shards", manifests, "bicubic", [PairSpec(0.5), PairSpec(1.5)], photos)
    assert select(manifests, "label = 'gaussian_noise'").num_rows == 0
    assert "no pair has one yet" in caplog.text
    caplog.clear()
    query(manifests, "SELECT count(*) FROM manifests WHERE label IS NOT NULL")
    assert "no pair has one yet" in caplog.text
    caplog.clear()
    query(manifests, "delta_e < 1")
    assert caplog.text == ""


def test_order_by_and_random_order_the_matching_rows(built):
    rows = [row for row in built["rows"] if row["delta_e"] < 8]
    worst_first = [
        row["key"] for row in sorted(rows, key=lambda row: (-row["delta_e"], row["dataset"], row["key"]))
    ]
    ordered = query(built["manifests"], "delta_e < 8", order_by="delta_e DESC")
    assert ordered.column("key").to_pylist() == worst_first
    assert (
        select(built["manifests"], "delta_e < 8", ["key"], limit=3, order_by=" delta_e  desc ")
        .column("key")
        .to_pylist()
        == worst_first[:3]
    )
    by_two = select(
        built["manifests"], None, ["dataset", "delta_e"], order_by="dataset, delta_e ASC"
    ).to_pylist()
    assert by_two == sorted(by_two, key=lambda row: (row["dataset"], row["delta_e"]))
    drawn = [
        select(built["manifests"], None, ["key"], random_seed=seed).column("key").to_pylist()
        for seed in (1, 1, 2)
    ]
    assert drawn[0] == drawn[1] != drawn[2]
    assert sorted(drawn[0]) == sorted(row["key"] for row in built["rows"])


@pytest.mark.parametrize(
    "order_by",
    ["delta_e; DROP TABLE x", "delta_e DESC NULLS FIRST", "random()", "no_such_column", "delta_e,"],
)
def test_order_by_takes_columns_and_nothing_else(built, order_by):
    with pytest.raises(FactoryError, match="--order-by"):
        select(built["manifests"], None, order_by=order_by)


def test_cli_order_by_random_and_keys(built, monkeypatch):
    import factory.query

    runner = CliRunner()
    base = ["query", "delta_e < 8", "--manifests", str(built["manifests"]), "--format", "keys"]
    worst = runner.invoke(main, [*base, "--order-by", "delta_e DESC"])
    assert worst.exit_code == 0, worst.output
    expected = sorted((row for row in built["rows"] if row["delta_e"] < 8), key=lambda row: -row["delta_e"])
    assert worst.output.split()[0] == expected[0]["key"]
    drawn = [runner.invoke(main, [*base, "--random", "--seed", seed]).output for seed in ("3", "3", "4")]
    assert drawn[0] == drawn[1] != drawn[2]
    both = runner.invoke(main, [*base, "--random", "--order-by", "delta_e"])
    assert both.exit_code == 2 and "not both" in both.output
    whole = runner.invoke(
        main, ["query", "SELECT key FROM manifests", "--manifests", str(built["manifests"]), "--random"]
    )
    assert whole.exit_code == 2 and "ORDER BY itself" in whole.output
    # --format keys reads the key column only (it read every column: 4.3 GiB for 1M rows against 557 MiB).
    statements = []
    run = factory.query._run
    monkeypatch.setattr(
        factory.query, "_run", lambda connection, sql: statements.append(sql) or run(connection, sql)
    )
    assert runner.invoke(main, base).exit_code == 0
    assert statements == ['SELECT "key" FROM manifests WHERE (delta_e < 8\n)']


@pytest.mark.parametrize(
    "attack",
    [
        "COPY (SELECT * FROM manifests) TO '/tmp/x.csv'",
        "ATTACH '/tmp/x.db' AS other",
        "copy manifests to 'x'",
    ],
)
def test_copy_and_attach_are_said_to_be_not_allowed(built, attack):
    # They were refused as "syntax error", which reads as a typo to fix.
    with pytest.raises(FactoryError, match=r"^(COPY|ATTACH) is not allowed"):
        query(built["manifests"], attack)
    with pytest.raises(FactoryError, match=r"^(COPY|ATTACH) is not allowed"):
        select(built["manifests"], attack)


def test_one_unreadable_manifest_is_named_and_the_others_answer(tmp_path, photos):
    shards, manifests = tmp_path / "shards", tmp_path / "manifests"
    good = make_dataset(shards, manifests, "good", [PairSpec(1.0), PairSpec(2.0)], photos)
    make_dataset(shards, manifests, "damaged", [PairSpec(3.0)], photos)
    (damaged,) = manifest_files(manifests, "damaged")
    damaged.write_bytes(damaged.read_bytes()[:100])
    result = CliRunner().invoke(
        main, ["query", "delta_e > 0", "--manifests", str(manifests), "--format", "keys"]
    )
    assert result.exit_code == 1
    assert sorted(result.stdout.split()) == sorted(row["key"] for row in good)
    assert str(damaged) in result.stderr and "unreadable" in result.stderr
    with pytest.raises(FactoryError, match=f"unreadable manifest {damaged}"):  # writers of new data refuse
        select(manifests, None)


def test_manifests_from_before_a_new_column_are_read_with_it_null(tmp_path, photos):
    """A dataset built before the checkerboard column existed still answers queries, stats and filters: the column
    is there, null for its pairs (DuckDB's UNION ALL BY NAME against today's schema)."""
    import pyarrow.parquet as pq

    shards, manifests = tmp_path / "shards", tmp_path / "manifests"
    make_dataset(
        shards, manifests, "old-ep8", [PairSpec(delta_e=1.0), PairSpec(delta_e=7.0)], photos, epoch=8
    )
    for path in manifest_files(manifests):
        table = pq.read_table(path)
        pq.write_table(
            table.drop_columns(["checkerboard"]).replace_schema_metadata(table.schema.metadata), path
        )
    assert "checkerboard" not in pq.read_schema(manifest_files(manifests)[0]).names
    everything = select(manifests, None)
    assert everything.num_rows == 2 and everything.column("checkerboard").null_count == 2
    assert select(manifests, "delta_e > 5 AND checkerboard IS NULL").num_rows == 1


# --- a derived dataset appears whole or not at all (#16 item 3) -------------------------------------------------------


@pytest.mark.parametrize(
    "module, killed_in, calls",
    [
        (
            "factory.filter",
            "row_json",
            3,
        ),  # mid-tar: the first new shard committed, the second half-written (a .tmp)
        ("factory.manifests", "write_manifest", 1),  # mid-manifests: one of three shards committed, no card
    ],
)
def test_a_filter_killed_mid_write_shows_nothing_and_its_rerun_finishes(
    built, tmp_path, module, killed_in, calls
):
    """kill -9 left .tmp files, orphan tars or a partial set of manifests without a card, which query and stats showed
    as a valid dataset, and a rerun was refused as "already exists"."""
    import shutil

    from manifest_fixtures import run_killed_mid_write

    from factory.stats import compute_stats

    shards, manifests = tmp_path / "shards", tmp_path / "manifests"  # the new dataset goes beside its parents
    shutil.copytree(built["shards"], shards)
    shutil.copytree(built["manifests"], manifests)
    request = ["filter", "--where", "delta_e < 4.5 AND label IS NOT NULL", "--shards", str(shards),
               "--manifests", str(manifests), "--name", "low", "--pairs-per-shard", "3"]  # fmt: skip
    arguments = [*request, "--out", str(shards)]
    run_killed_mid_write(module, killed_in, calls, arguments)
    assert list((manifests / "low").iterdir()), "the kill came before anything was written"
    parents = select(manifests, None)
    assert set(parents["dataset"].to_pylist()) == {"vqvae2-ep8", "mae-ep4"}
    assert parents.num_rows == len(built["rows"])
    assert "low" not in [dataset.dataset for dataset in compute_stats(manifests).datasets]
    report = verify(shards, manifests, "low")
    assert not report.ok and "not whole" in report.problems[0]

    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 0, result.output
    low = select(manifests, "dataset = 'low'")
    assert low.num_rows == 8
    assert verify(shards, manifests).ok
    assert not [path for path in [*shards.rglob(".*"), *manifests.rglob(".*")]]  # no temporary left
    assert sorted(path.name for path in (manifests / "low").iterdir()) == [
        "_card.json", "low-000000.parquet", "low-000001.parquet", "low-000002.parquet"
    ]  # fmt: skip
    # The same bytes as a filter that was never killed.
    clean = tmp_path / "clean"
    result = CliRunner().invoke(main, [*request, "--out", str(clean), "--out-manifests", str(clean / "m")])
    assert result.exit_code == 0, result.output
    assert [path.read_bytes() for path in sorted((shards / "low").glob("*.tar"))] == [
        path.read_bytes() for path in sorted((clean / "low").glob("*.tar"))
    ]


def test_a_live_filter_of_the_same_name_is_refused(built, tmp_path):
    import os
    import socket

    from factory.filter import FilterConfig, filter_dataset
    from factory.manifests import PENDING_NAME

    pending = tmp_path / "m" / "low" / PENDING_NAME
    pending.parent.mkdir(parents=True)
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": 0, "kind": "filter"}
    pending.write_text(json.dumps(holder))
    config = FilterConfig(
        "delta_e < 4.5", built["shards"], built["manifests"], tmp_path / "s", tmp_path / "m", "low"
    )
    with pytest.raises(FactoryError, match=f"another filter is writing dataset low \\(pid {os.getpid()}"):
        filter_dataset(config)
    assert os.listdir(pending.parent) == [PENDING_NAME]
