"""A real S3 API on loopback for tests: moto's server mode in a subprocess, and a bucket per test.

    pytest_plugins = ["moto_s3"]   (in a test module; then take `s3_bucket` as an argument)

The fixture starts `python tests/moto_s3.py --port PORT` (moto.server on 127.0.0.1, a free port), waits until it
answers, points AWS_ENDPOINT_URL / AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_DEFAULT_REGION at it for the test
and every subprocess it starts (the CLI, Ray workers), creates a fresh bucket with boto3 and removes it afterwards.

Why a wrapper instead of `python -m moto.server`: moto 5.2's S3 serializer names the CompleteMultipartUpload reply's
root element `CompleteMultipartUploadResponse`; real S3 answers `<CompleteMultipartUploadResult>` (AWS S3 API
reference, CompleteMultipartUpload, "Response Syntax"), and pyarrow >= 15 rejects any other root as an error embedded
in a 200 reply (arrow/cpp/src/arrow/filesystem/s3fs.cc, CompleteMultipartUploadWithErrorFixup). pyarrow writes every
output stream as a multipart upload, so without the fix no pyarrow write to moto succeeds. The wrapper renames that
one root element and changes nothing else.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

MOTO_STARTUP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class S3Bucket:
    endpoint_url: str  # http://127.0.0.1:PORT, also in AWS_ENDPOINT_URL
    name: str  # the bucket (>= 3 characters, S3's rule)

    def uri(self, *parts: str) -> str:
        """s3://<bucket>/<parts joined by '/'>."""
        return "/".join([f"s3://{self.name}", *parts])

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under `prefix`, sorted (boto3, independent of the code under test)."""
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint_url)
        keys: list[str] = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix):
            keys.extend(item["Key"] for item in page.get("Contents", []))
        return sorted(keys)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_until_answering(url: str, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto server exited with status {process.returncode} before answering")
        try:
            with urllib.request.urlopen(f"{url}/moto-api/", timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"moto server at {url} did not answer within {timeout_s:.0f} s")


@pytest.fixture(scope="module")
def moto_server() -> Iterator[str]:
    """The endpoint URL of a moto S3 server on loopback, for the whole test module."""
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_answering(url, process, MOTO_STARTUP_TIMEOUT_S)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def s3_bucket(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Bucket]:
    """A fresh, empty bucket on the loopback server; AWS_* variables point the test and its subprocesses at it."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never wait on the EC2 metadata service
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)

    import boto3

    bucket = S3Bucket(endpoint_url=moto_server, name=f"factory-test-{uuid.uuid4().hex[:12]}")
    client = boto3.client("s3", endpoint_url=moto_server)
    client.create_bucket(Bucket=bucket.name)
    yield bucket
    for key in bucket.keys():
        client.delete_object(Bucket=bucket.name, Key=key)
    client.delete_bucket(Bucket=bucket.name)


def _serve(port: int) -> None:
    """Run moto's server on 127.0.0.1:port with S3's CompleteMultipartUpload root element as real S3 names it."""
    from moto.core.serialize import S3Serializer
    from moto.server import main as moto_main

    original = S3Serializer._serialized_result_to_response

    def with_real_root(self, resp, result, shape, serialized_result):
        resp = original(self, resp, result, shape, serialized_result)
        if self.operation_model.name == "CompleteMultipartUpload" and isinstance(resp.get("body"), str):
            resp["body"] = resp["body"].replace(
                "CompleteMultipartUploadResponse", "CompleteMultipartUploadResult"
            )
        return resp

    S3Serializer._serialized_result_to_response = with_real_root
    moto_main(["-H", "127.0.0.1", "-p", str(port)])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="moto's S3 server on loopback, for the tests")
    parser.add_argument("--port", type=int, required=True)
    _serve(parser.parse_args().port)
