"""The crash-consistency benchmark (`python -m benchmarks.crash_consistency`, #16 item 8): its counters see what they
count on a damaged copy of a real build, and the whole loop at 2 kill points per command finds nothing lost,
duplicated or mismatched, so that the script cannot rot.

The scan reads the outputs with pyarrow and Python's tarfile, not with the factory's own readers.
"""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import pytest

from benchmarks.crash_consistency import (
    DATASET,
    DEFAULT_COMMANDS,
    PairCounts,
    compare,
    leftovers,
    make_base,
    run_all,
    scan_dataset,
)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """The benchmark's base: the bundled photos built with the real CLI (48 pairs in 12 shards)."""
    folder = tmp_path_factory.mktemp("crash") / "base"
    make_base(folder)
    return folder


def damaged_copy(base: Path, target: Path) -> Path:
    shutil.copytree(base, target)
    return target


def test_an_intact_build_counts_nothing(base: Path):
    reference = scan_dataset(base, DATASET)
    assert len(reference.rows) == 48 and not reference.inconsistent
    assert compare(reference, reference) == PairCounts(lost=0, duplicated=0, mismatched=0)
    assert leftovers(base) == []


def test_a_missing_shard_and_manifest_is_counted_lost(base: Path, tmp_path: Path):
    reference = scan_dataset(base, DATASET)
    work = damaged_copy(base, tmp_path / "work")
    (work / "shards" / DATASET / f"{DATASET}-000003.tar").unlink()
    (work / "manifests" / DATASET / f"{DATASET}-000003.parquet").unlink()
    assert compare(scan_dataset(work, DATASET), reference) == PairCounts(lost=4, duplicated=0, mismatched=0)


def test_a_manifest_committed_twice_is_counted_duplicated(base: Path, tmp_path: Path):
    reference = scan_dataset(base, DATASET)
    work = damaged_copy(base, tmp_path / "work")
    folder = work / "manifests" / DATASET
    shutil.copy(folder / f"{DATASET}-000000.parquet", folder / f"{DATASET}-copy.parquet")
    (folder / f".{DATASET}-000001.parquet.0123abcd.tmp").write_bytes(b"half a file")
    assert compare(scan_dataset(work, DATASET), reference) == PairCounts(lost=0, duplicated=4, mismatched=0)
    assert leftovers(work) == [f"manifests/{DATASET}/.{DATASET}-000001.parquet.0123abcd.tmp"]


def test_a_changed_payload_is_counted_mismatched(base: Path, tmp_path: Path):
    """One LR payload rewritten with one byte flipped (the tar stays well-formed): its row no longer matches it."""
    reference = scan_dataset(base, DATASET)
    work = damaged_copy(base, tmp_path / "work")
    shard = work / "shards" / DATASET / f"{DATASET}-000002.tar"
    with tarfile.open(shard) as archive:
        members = [(member, archive.extractfile(member).read()) for member in archive]
    rewritten = io.BytesIO()
    with tarfile.open(fileobj=rewritten, mode="w") as archive:
        flipped = False
        for member, data in members:
            if not flipped and ".lr." in member.name:
                data, flipped = data[:-1] + bytes([data[-1] ^ 0xFF]), True
            archive.addfile(member, io.BytesIO(data))
    shard.write_bytes(rewritten.getvalue())
    assert compare(scan_dataset(work, DATASET), reference) == PairCounts(lost=0, duplicated=0, mismatched=1)


@pytest.mark.slow  # ~7 min on two busy cores: every command starts a Python (and torch) ~6 times
def test_two_kills_per_command_lose_duplicate_and_mismatch_nothing(tmp_path: Path):
    results = run_all(list(DEFAULT_COMMANDS), kills=2, work_root=tmp_path)
    assert [result.command for result in results] == list(DEFAULT_COMMANDS)
    for result in results:
        assert result.kills == 2 and result.duration_s > 0, result
        assert result.problems == [], result.problems
        failures = (result.lost, result.duplicated, result.mismatched, result.leftovers)
        assert failures + (result.verify_failures, result.rerun_failures) == (0,) * 6, result
