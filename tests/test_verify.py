"""`factory verify`: a sound dataset passes; a flipped payload byte, a missing shard, a duplicated key and an orphan
shard are each reported, and the command exits 1 listing them."""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from factory.build import BuildConfig, build
from factory.cli import main
from factory.manifests import verify


@pytest.fixture(scope="module")
def built(tmp_path_factory, photos) -> Path:
    """A small bicubic dataset (3 shards of 4 pairs, 128 crops of two photos), built in-process (--actors 0)."""
    root = tmp_path_factory.mktemp("verify")
    hr = root / "hr"
    hr.mkdir()
    Image.fromarray(photos["astronaut"]).save(hr / "astronaut.png")
    Image.fromarray(photos["coffee"]).save(hr / "coffee.png")
    config = BuildConfig(
        hr=(str(hr),),
        model="bicubic",
        crop=128,
        stride=256,
        limit=12,
        shard_size=4,
        actors=0,
        progress=False,
        out=str(root / "shards"),
        manifests=str(root / "manifests"),
    )
    assert build(config).pairs == 12
    return root


@pytest.fixture
def dataset(built: Path, tmp_path: Path) -> Path:
    """A private copy of the built dataset to damage."""
    for name in ("shards", "manifests"):
        shutil.copytree(built / name, tmp_path / name)
    return tmp_path


def problems(root: Path) -> list[str]:
    return verify(root / "shards", root / "manifests").problems


def test_sound_dataset_passes(dataset: Path):
    report = verify(dataset / "shards", dataset / "manifests")
    assert report.ok, report.problems
    assert (report.datasets, report.shards, report.samples) == (["bicubic"], 3, 12)
    outcome = CliRunner().invoke(
        main, ["verify", str(dataset / "shards"), "--manifests", str(dataset / "manifests")]
    )
    assert outcome.exit_code == 0 and "ok" in outcome.output


def test_flipped_payload_byte_is_caught(dataset: Path):
    shard = dataset / "shards" / "bicubic" / "bicubic-000001.tar"
    with tarfile.open(shard) as tar:
        member = next(member for member in tar.getmembers() if member.name.endswith(".lr.png"))
    data = bytearray(shard.read_bytes())
    data[member.offset_data + member.size // 2] ^= 0x01  # one bit, inside a PNG payload
    shard.write_bytes(bytes(data))
    found = problems(dataset)
    assert any("lr payload sha256 differs" in problem for problem in found), found
    assert any("bicubic-000001.tar: sha256 differs" in problem for problem in found)
    outcome = CliRunner().invoke(
        main, ["verify", str(dataset / "shards"), "--manifests", str(dataset / "manifests")]
    )
    assert outcome.exit_code == 1 and "lr payload sha256 differs" in outcome.output


def test_missing_shard_is_caught(dataset: Path):
    (dataset / "shards" / "bicubic" / "bicubic-000002.tar").unlink()
    assert problems(dataset) == ["bicubic/bicubic-000002.parquet: missing shard bicubic/bicubic-000002.tar"]


def test_duplicated_key_is_caught(dataset: Path):
    path = dataset / "manifests" / "bicubic" / "bicubic-000000.parquet"
    table = pq.read_table(path)
    pq.write_table(pa.concat_tables([table, table.slice(0, 1)]), path)
    key = table["key"][0].as_py()
    assert f"bicubic: key {key} appears in 2 manifest rows" in problems(dataset)


def test_orphan_shard_is_caught(dataset: Path):
    folder = dataset / "shards" / "bicubic"
    shutil.copy(folder / "bicubic-000000.tar", folder / "bicubic-000007.tar")
    assert problems(dataset) == ["bicubic/bicubic-000007.tar: orphan shard (no manifest commits it)"]


def test_truncated_shard_is_caught(dataset: Path):
    shard = dataset / "shards" / "bicubic" / "bicubic-000000.tar"
    shard.write_bytes(shard.read_bytes()[:5000])
    found = problems(dataset)
    assert any("bicubic-000000.tar" in problem for problem in found), found
