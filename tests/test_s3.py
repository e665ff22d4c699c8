"""Object storage: the build, verify and the streaming consumer against a real S3 API on loopback (moto's server).

python -m pytest -q tests/test_s3.py
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

if TYPE_CHECKING:
    from moto_s3 import S3Bucket

pytest_plugins = ["moto_s3"]  # the moto_server and s3_bucket fixtures


def test_pyarrow_round_trip_through_loopback_s3(s3_bucket: S3Bucket):
    # The I/O layer the factory relies on: pyarrow's S3 filesystem from an s3:// URI, configured only by the
    # AWS_* environment, writes, lists and reads objects that boto3 (an independent client) then sees.
    filesystem, root = pafs.FileSystem.from_uri(s3_bucket.uri("x"))
    assert isinstance(filesystem, pafs.S3FileSystem)
    assert root == f"{s3_bucket.name}/x"

    payload = bytes(range(256)) * 4096  # 1 MiB, one multipart upload part
    with filesystem.open_output_stream(f"{root}/blob.bin") as stream:
        stream.write(payload)
    table = pa.table({"key": ["a", "b"], "delta_e": [1.5, 2.5]})
    pq.write_table(table, f"{root}/table.parquet", filesystem=filesystem)

    assert s3_bucket.keys("x/") == ["x/blob.bin", "x/table.parquet"]
    listed = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
    assert {info.path: info.size for info in listed}[f"{root}/blob.bin"] == len(payload)
    with filesystem.open_input_stream(f"{root}/blob.bin") as stream:
        assert stream.read() == payload
    assert pq.read_table(f"{root}/table.parquet", filesystem=filesystem).equals(table)

    import boto3

    body = boto3.client("s3").get_object(Bucket=s3_bucket.name, Key="x/table.parquet")["Body"].read()
    assert pq.read_table(io.BytesIO(body)).equals(table)
