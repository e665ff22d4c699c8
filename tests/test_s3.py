"""Object storage: the build, verify and the streaming consumer against a real S3 API on loopback (moto's server).

python -m pytest -q tests/test_s3.py
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from factory.config import FactoryError
from factory.storage import Storage

if TYPE_CHECKING:
    from moto_s3 import S3Bucket

pytest_plugins = ["moto_s3"]  # the moto_server and s3_bucket fixtures


def test_storage_round_trip_through_loopback_s3(s3_bucket: S3Bucket):
    # factory.storage.Storage on an s3:// URI (pyarrow's S3 filesystem, configured only by the AWS_* environment):
    # what it writes atomically, lists and reads back is what boto3, an independent client, sees in the bucket.
    storage = Storage(s3_bucket.uri("x"))
    assert not storage.is_local and storage.uri("a/blob.bin") == s3_bucket.uri("x", "a", "blob.bin")

    payload = bytes(range(256)) * 4096  # 1 MiB, one multipart upload part
    storage.write_bytes_atomic("a/blob.bin", payload)
    table = pa.table({"key": ["a", "b"], "delta_e": [1.5, 2.5]})
    with storage.open_atomic("a/table.parquet") as stream:
        pq.write_table(table, stream)
    with pytest.raises(RuntimeError), storage.open_atomic("a/never.bin") as stream:
        stream.write(b"half")
        raise RuntimeError("a writer that fails leaves nothing behind")

    # No temporary and no failed write is left; the keys ending in "/" are the empty folder markers that pyarrow's
    # create_dir (Storage.make_dirs) puts on S3.
    objects = [key for key in s3_bucket.keys("x/") if not key.endswith("/")]
    assert objects == ["x/a/blob.bin", "x/a/table.parquet"]
    assert storage.list_dirs() == ["a"] and storage.list_files("a") == ["blob.bin", "table.parquet"]
    assert storage.exists("a/blob.bin") and not storage.exists("a/never.bin")
    assert storage.size("a/blob.bin") == len(payload) and storage.read_bytes("a/blob.bin") == payload
    with storage.open_input("a/table.parquet") as handle:
        assert pq.read_table(handle).equals(table)

    import boto3

    body = boto3.client("s3").get_object(Bucket=s3_bucket.name, Key="x/a/table.parquet")["Body"].read()
    assert pq.read_table(io.BytesIO(body)).equals(table)


# --- the factory on S3 ---------------------------------------------------------------------------------------------

BUILD_ARGUMENTS = ["--model", "bicubic", "--crop", "128", "--limit", "10", "--shard-size", "4"]
DATASET = "bicubic"  # the default dataset name of --model bicubic


def run_factory(*arguments: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """The installed CLI in a subprocess (it inherits the AWS_* variables the s3_bucket fixture set)."""
    return subprocess.run(
        [sys.executable, "-m", "factory.cli", *arguments],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def build_into(hr: Path, out: str, manifests: str, *extra: str) -> subprocess.CompletedProcess:
    result = run_factory(
        "build",
        *BUILD_ARGUMENTS,
        "--hr",
        str(hr),
        "--out",
        out,
        "--manifests",
        manifests,
        "--num-cpus",
        "2",
        "--no-progress",
        *extra,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def read_s3_table(uri: str) -> pa.Table:
    filesystem, path = pafs.FileSystem.from_uri(uri)
    with filesystem.open_input_file(path) as handle:
        return pq.read_table(handle)


def s3_etags(bucket: S3Bucket, prefix: str) -> dict[str, str]:
    import boto3

    client = boto3.client("s3")
    return {key: client.head_object(Bucket=bucket.name, Key=key)["ETag"] for key in bucket.keys(prefix)}


def find_window(image: np.ndarray, window: np.ndarray) -> list[tuple[int, int]]:
    """Every (top, left) where `window` (h, w, 3) equals a crop of `image` (H, W, 3)."""
    height, width = window.shape[:2]
    return [
        (top, left)
        for top in range(image.shape[0] - height + 1)
        for left in range(image.shape[1] - width + 1)
        if np.array_equal(image[top : top + height, left : left + width], window)
    ]


def test_build_verify_resume_and_stream_on_s3(s3_bucket: S3Bucket, photo_folder: Path):
    out, manifests = s3_bucket.uri("shards"), s3_bucket.uri("manifests")
    build_into(photo_folder, out, manifests)

    # Layout: one manifest per shard, written after it (the commit marker), no temporary objects left behind.
    shard_keys = [key for key in s3_bucket.keys("shards/") if key.endswith(".tar")]
    manifest_keys = [key for key in s3_bucket.keys("manifests/") if key.endswith(".parquet")]
    assert shard_keys == [f"shards/{DATASET}/{DATASET}-{index:06d}.tar" for index in range(3)]  # 10 pairs / 4
    assert sorted(key for key in manifest_keys if not key.rsplit("/", 1)[1].startswith("_")) == [
        f"manifests/{DATASET}/{DATASET}-{index:06d}.parquet" for index in range(3)
    ]
    assert f"manifests/{DATASET}/_card.json" in s3_bucket.keys("manifests/")
    assert not [key for key in s3_bucket.keys() if key.endswith(".tmp")]

    rows = pa.concat_tables(
        [
            read_s3_table(s3_bucket.uri(key))
            for key in manifest_keys
            if not key.rsplit("/", 1)[1].startswith("_")
        ]
    )
    manifest_pair_keys = rows.column("key").to_pylist()
    assert len(manifest_pair_keys) == len(set(manifest_pair_keys)) == 10

    # A crash between a shard and its manifest leaves a shard without a manifest: uncommitted. Rerunning the same
    # command rebuilds exactly that shard (byte-identical: reproducible tars) and leaves the committed ones alone.
    import boto3

    before = s3_etags(s3_bucket, "shards/")
    lost = f"manifests/{DATASET}/{DATASET}-000001.parquet"
    boto3.client("s3").delete_object(Bucket=s3_bucket.name, Key=lost)
    untouched = s3_etags(s3_bucket, "manifests/")
    build_into(photo_folder, out, manifests, "--actors", "0")  # in-process this time: no second Ray start-up
    assert lost in s3_bucket.keys("manifests/")
    after = s3_etags(s3_bucket, "manifests/")
    for key in untouched:
        if key.endswith(".parquet") and not key.rsplit("/", 1)[1].startswith("_"):
            assert after[key] == untouched[key], f"{key} was rewritten though it was committed"
    assert s3_etags(s3_bucket, "shards/") == before
    # verify reads every shard and manifest back from S3: sizes, sha256s, keys, no orphans, no duplicates.
    verified = run_factory("verify", out, "--manifests", manifests)
    assert verified.returncode == 0, verified.stdout + verified.stderr

    # The consumer streams every committed pair straight from S3, exactly once per epoch (one patch per pair).
    from factory.shards import decode_image
    from factory.stream import PairedPatches

    dataset = PairedPatches(
        f"{out}/{DATASET}", patch_size=8, scale=4, patches_per_pair=1, augment=False, shuffle=0
    )
    patches = list(dataset)
    assert sorted(patch["key"] for patch in patches) == sorted(manifest_pair_keys)
    # The shard root (no dataset named) stands for the shards of every dataset in it.
    from factory.stream import expand_urls

    assert expand_urls(out) == expand_urls(f"{out}/{DATASET}") == [s3_bucket.uri(key) for key in shard_keys]
    # Also from forked DataLoader workers (pyarrow's S3 client was first used in this parent process).
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=None, num_workers=2)
    assert sorted(patch["key"] for patch in loader) == sorted(manifest_pair_keys)

    # The streamed bytes are the stored ones: each patch is an aligned window of the pair as boto3 (an independent
    # client) downloads it, LR at (top, left) and HR at (scale * top, scale * left).
    client = boto3.client("s3")
    stored: dict[str, dict[str, np.ndarray]] = {}
    for key in shard_keys:
        body = client.get_object(Bucket=s3_bucket.name, Key=key)["Body"].read()
        with tarfile.open(fileobj=io.BytesIO(body)) as archive:
            for member in archive.getmembers():
                sample, _, field = member.name.partition(".")
                if field.startswith(("hr.", "lr.")):
                    image = decode_image(member.name, archive.extractfile(member).read())
                    stored.setdefault(sample, {})[field[:2]] = image
    for patch in patches:
        lr = (patch["lr"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        hr = (patch["hr"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        pair = stored[patch["key"]]
        positions = find_window(pair["lr"], lr)
        assert any(
            np.array_equal(hr, pair["hr"][4 * top : 4 * top + hr.shape[0], 4 * left : 4 * left + hr.shape[1]])
            for top, left in positions
        ), f"patch of {patch['key']} is not an aligned window of the stored pair"


def test_dry_run_writes_nothing_to_s3(s3_bucket: S3Bucket, photo_folder: Path):
    # The plan only: no shard, manifest, lock, card or folder marker appears in the bucket (the local case is in
    # test_build.py).
    out, manifests = s3_bucket.uri("shards"), s3_bucket.uri("manifests")
    result = run_factory(
        "build",
        *BUILD_ARGUMENTS,
        "--hr",
        str(photo_folder),
        "--out",
        out,
        "--manifests",
        manifests,
        "--dry-run",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dry run" in result.stdout
    assert s3_bucket.keys() == []


def test_query_and_stream_where_over_s3_manifests(s3_bucket: S3Bucket, photo_folder: Path):
    # Every manifest reader goes through factory.query: the CLI's query and the consumer's where= on s3:// roots.
    out, manifests = s3_bucket.uri("shards"), s3_bucket.uri("manifests")
    build_into(photo_folder, out, manifests, "--actors", "0")  # in-process: the Ray path is tested above
    pair_manifests = [
        key for key in s3_bucket.keys("manifests/") if key.endswith(".parquet") and "/_" not in key
    ]
    rows = pa.concat_tables([read_s3_table(s3_bucket.uri(key)) for key in pair_manifests]).to_pylist()
    # A bicubic build has ΔE 0 everywhere (x_deg is x), so the predicate selects on the crop grid.
    threshold = max(row["crop_left"] for row in rows)
    expected = sorted(row["key"] for row in rows if row["crop_left"] < threshold)
    assert 0 < len(expected) < len(rows)

    queried = run_factory("query", f"crop_left < {threshold!r}", "--manifests", manifests, "--format", "keys")
    assert queried.returncode == 0, queried.stderr[-3000:]
    assert sorted(queried.stdout.split()) == expected
    # filter writes the selection as a new dataset beside the first, in the bucket; verify reads both back.
    filtered = run_factory(
        "filter", "--where", f"crop_left < {threshold!r}", "--shards", out, "--manifests", manifests,
        "--out", out, "--name", "low-delta-e",
    )  # fmt: skip
    assert filtered.returncode == 0, filtered.stderr[-3000:]
    new_manifests = [
        key
        for key in s3_bucket.keys("manifests/low-delta-e/")
        if key.endswith(".parquet") and "/_" not in key
    ]
    assert sum(read_s3_table(s3_bucket.uri(key)).num_rows for key in new_manifests) == len(expected)
    verified = run_factory("verify", out, "--manifests", manifests)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    # The sandbox holds for object-store roots too: no file access from a query.
    escaped = run_factory("query", "SELECT * FROM read_csv('/etc/passwd')", "--manifests", manifests)
    assert escaped.returncode == 2 and "disabled" in escaped.stderr

    from factory.stream import PairedPatches

    dataset = PairedPatches(
        f"{out}/{DATASET}", manifests=manifests, where=f"crop_left < {threshold!r}", patch_size=8, scale=4,
        patches_per_pair=1, augment=False, shuffle=0,
    )  # fmt: skip
    assert sorted(patch["key"] for patch in dataset) == expected


def test_filter_refuses_a_dataset_that_exists_on_s3(s3_bucket: S3Bucket, photo_folder: Path, tmp_path: Path):
    """#17 item 2: the "already exists" check of `filter` on an object store, where a dataset is a key prefix and
    not a folder (in process: the parents are a local build, the new dataset goes to the bucket)."""
    from factory.build import BuildConfig, build
    from factory.filter import FilterConfig, filter_dataset

    local = BuildConfig(
        hr=(str(photo_folder),), model="bicubic", crop=64, stride=256, limit=4, shard_size=2, actors=0,
        out=str(tmp_path / "shards"), manifests=str(tmp_path / "manifests"), progress=False,
    )  # fmt: skip
    build(local)
    out, manifests = s3_bucket.uri("shards"), s3_bucket.uri("manifests")
    config = FilterConfig(
        where="crop_top >= 0", shards_root=local.out, manifests_root=local.manifests, out=out,
        out_manifests=manifests, name="copy", pairs_per_shard=3,
    )  # fmt: skip
    assert filter_dataset(config).pairs == 4
    written = s3_bucket.keys()
    assert "shards/copy/copy-000001.tar" in written and "manifests/copy/_card.json" in written
    with pytest.raises(FactoryError, match=r"^dataset 'copy' already exists \(s3://"):
        filter_dataset(config)
    assert s3_bucket.keys() == written  # refused before it wrote or deleted anything


def test_stats_over_s3_manifests_equal_the_same_manifests_on_disk(
    s3_bucket: S3Bucket, photos, tmp_path: Path
):
    """`factory stats --manifests s3://...` said "no manifest folder" while query, verify, label and preview worked
    there (#16 item 5). The same manifest root, uploaded with boto3 (an independent client), gives the same
    statistics as on disk: pairs, ΔE, rejects (a rejects manifest), derived (a filter's card) and the checkpoint
    regime (a build's card); and the figures."""
    import json

    import boto3
    from manifest_fixtures import PairSpec, make_dataset

    from factory.filter import FilterConfig, filter_dataset

    shards, manifests = tmp_path / "shards", tmp_path / "manifests"
    make_dataset(
        shards, manifests, "vqvae2-ep4", [PairSpec(1.0), PairSpec(2.0), PairSpec(6.0)], photos, epoch=4
    )
    make_dataset(shards, manifests, "vqvae2-ep8", [PairSpec(3.0), PairSpec(5.0)], photos, epoch=8, rejects=2)
    regime = {"psnr": 24.0, "ssim": 0.6, "delta_e": 4.0, "checkerboard": 1.5, "images": 7}
    (manifests / "vqvae2-ep8" / "_card.json").write_text(json.dumps({"checkpoint": {"regime": regime}}))
    filter_dataset(
        FilterConfig(
            where="delta_e > 4", shards_root=shards, manifests_root=manifests, out=shards, name="high-delta-e"
        )
    )
    client = boto3.client("s3")
    for path in sorted(manifests.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), s3_bucket.name, f"manifests/{path.relative_to(manifests)}")

    on_disk = run_factory("stats", "--manifests", str(manifests), "--json")
    on_s3 = run_factory(
        "stats", "--manifests", s3_bucket.uri("manifests"), "--json", "--plots", str(tmp_path / "f")
    )
    assert on_disk.returncode == 0 and on_s3.returncode == 0, on_disk.stderr[-2000:] + on_s3.stderr[-2000:]
    local, remote = json.loads(on_disk.stdout), json.loads(on_s3.stdout)
    assert remote["datasets"] == local["datasets"] and remote["curves"] == local["curves"]
    by_name = {item["dataset"]: item for item in remote["datasets"]}
    assert sorted(by_name) == ["high-delta-e", "vqvae2-ep4", "vqvae2-ep8"]
    assert by_name["vqvae2-ep8"]["rejects"] == 2 and by_name["vqvae2-ep8"]["regime"] == regime
    assert by_name["high-delta-e"]["derived"] and by_name["high-delta-e"]["pairs"] == 2  # ΔE 6 and 5
    assert {Path(figure).name for figure in remote["figures"]} >= {
        "delta_e_histogram.png",
        "regime_vs_epoch.png",
    }
    # An object-store root with no manifests is a one-line error, as a local one is.
    empty = run_factory("stats", "--manifests", s3_bucket.uri("nothing-here"))
    assert empty.returncode == 2 and empty.stderr.strip().startswith("error: no datasets under s3://")
