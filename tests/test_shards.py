"""Shards: codecs, reproducible tar writing, and reading back with our reader and with plain WebDataset."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
import zstandard

from factory.shards import (
    TAR_MTIME,
    HashingWriter,
    TarShardWriter,
    decode_image,
    encode_image,
    payload_extension,
    read_samples,
    validate_key,
)


@pytest.fixture
def images(photos) -> list[np.ndarray]:
    return [photos["astronaut"][:64, :96], photos["coffee"][:64, :96], photos["chelsea"][:32, :48]]


def write_shard(path: Path, images: list[np.ndarray], codec: str) -> str:
    """A shard of one sample per image (hr = the image, lr = its top-left quarter); returns the streamed sha256."""
    extension = payload_extension(codec)
    with open(path, "wb") as raw:
        stream = HashingWriter(raw)
        writer = TarShardWriter(stream)
        for index, image in enumerate(images):
            lr = np.ascontiguousarray(image[: image.shape[0] // 2, : image.shape[1] // 2])
            members = {
                f"hr.{extension}": encode_image(image, codec),
                f"lr.{extension}": encode_image(lr, codec),
                "json": json.dumps({"key": f"sample-{index:03d}"}).encode(),
            }
            writer.add_sample(f"sample-{index:03d}", members)
        writer.close()
    return stream.hexdigest()


@pytest.mark.parametrize("codec", ["png", "zst"])
def test_codec_round_trip_is_lossless(images, codec):
    for image in images:
        assert np.array_equal(
            decode_image(f"hr.{payload_extension(codec)}", encode_image(image, codec)), image
        )


def test_shard_bytes_are_reproducible_and_hashed_while_streaming(tmp_path: Path, images):
    first, second = tmp_path / "a.tar", tmp_path / "b.tar"
    digest = write_shard(first, images, "png")
    write_shard(second, images, "png")
    assert first.read_bytes() == second.read_bytes()
    assert digest == hashlib.sha256(first.read_bytes()).hexdigest()
    with tarfile.open(first) as tar:  # fixed header fields, members of a sample in sorted order
        members = tar.getmembers()
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in members} == {(TAR_MTIME, 0, 0, "", "")}
        assert [m.name for m in members[:3]] == ["sample-000.hr.png", "sample-000.json", "sample-000.lr.png"]


def test_plain_webdataset_reads_png_shards(tmp_path: Path, images):
    write_shard(tmp_path / "s.tar", images, "png")
    samples = list(wds.WebDataset(str(tmp_path / "s.tar"), shardshuffle=False).decode("rgb8"))
    assert [sample["__key__"] for sample in samples] == ["sample-000", "sample-001", "sample-002"]
    for sample, image in zip(samples, images, strict=True):
        assert np.array_equal(sample["hr.png"], image)
        assert sample["json"]["key"] == sample["__key__"]


def test_documented_zst_decoder_works_with_plain_webdataset(tmp_path: Path, images):
    write_shard(tmp_path / "s.tar", images, "zst")
    # The one-line decoder from factory/shards.py's docstring.
    dataset = wds.WebDataset(str(tmp_path / "s.tar"), shardshuffle=False).decode(
        lambda key, data: (
            np.load(io.BytesIO(zstandard.decompress(data))) if key.endswith(".npy.zst") else None
        )
    )
    for sample, image in zip(dataset, images, strict=True):
        assert np.array_equal(sample["hr.npy.zst"], image)


def test_read_samples_groups_members_and_splits_duplicates(tmp_path: Path, images):
    path = tmp_path / "s.tar"
    write_shard(path, images, "png")
    with open(path, "rb") as handle:
        samples = list(read_samples(handle))
    assert [sample.key for sample in samples] == ["sample-000", "sample-001", "sample-002"]
    assert set(samples[0].members) == {"hr.png", "lr.png", "json"}
    # The same sample written twice in a row reads as two samples with one key (so verify can report it).
    with open(tmp_path / "twice.tar", "wb") as raw:
        writer = TarShardWriter(raw)
        writer.add_sample("a", {"json": b"{}"})
        writer.add_sample("a", {"json": b"{}"})
        writer.close()
    with open(tmp_path / "twice.tar", "rb") as handle:
        assert [sample.key for sample in read_samples(handle)] == ["a", "a"]


def test_read_samples_groups_members_as_webdataset_does(tmp_path: Path):
    """The reference is webdataset's own tar reader (`wds.WebDataset`, no decoding): the same samples, keys (a
    folder in a member name belongs to the key), fields and bytes, for a tar written by plain tarfile."""
    path = tmp_path / "foreign.tar"
    members = [("dir/a.hr.png", b"A-hr"), ("dir/a.lr.png", b"A-lr"), ("dir/a.json", b"{}")]
    members += [("b.hr.npy.zst", b"B-hr"), ("b.lr.npy.zst", b"B-lr"), ("c.lr.png", b"C-lr")]
    with tarfile.open(path, "w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    with open(path, "rb") as handle:
        ours = [(sample.key, sample.members) for sample in read_samples(handle)]
    theirs = [
        (sample["__key__"], {name: data for name, data in sample.items() if not name.startswith("__")})
        for sample in wds.WebDataset(str(path), shardshuffle=False)
    ]
    assert ours == theirs
    assert [key for key, _ in ours] == ["dir/a", "b", "c"]


def test_read_samples_selects_and_keeps_what_came_before_a_cut(tmp_path: Path, images):
    path = tmp_path / "s.tar"
    write_shard(path, images, "png")
    with tarfile.open(path) as archive:  # cut inside the third sample's LR payload
        cut = next(member.offset_data for member in archive if member.name == "sample-002.lr.png") + 10
    path.write_bytes(path.read_bytes()[:cut])
    ended: list[BaseException] = []
    with open(path, "rb") as handle:
        samples = list(
            read_samples(handle, keys={"sample-000", "sample-002"}, kinds=("hr", "lr"), on_end=ended.append)
        )
    # sample-001 is skipped (not read), the json members are left out, and sample-002 keeps the HR that arrived whole.
    assert [(sample.key, sorted(sample.members)) for sample in samples] == [
        ("sample-000", ["hr.png", "lr.png"]),
        ("sample-002", ["hr.png"]),
    ]
    assert len(ended) == 1 and isinstance(ended[0], (tarfile.TarError, OSError, EOFError))


def test_truncated_shard_raises(tmp_path: Path, images):
    path = tmp_path / "s.tar"
    write_shard(path, images, "png")
    path.write_bytes(path.read_bytes()[:3000])
    with open(path, "rb") as handle, pytest.raises((tarfile.TarError, OSError, EOFError)):
        list(read_samples(handle))


@pytest.mark.parametrize("key", ["", "a.b", "a/b", "clé"])
def test_invalid_keys_are_refused(key):
    with pytest.raises(ValueError):
        validate_key(key)


def test_encode_png_is_a_standard_png_with_the_same_pixels(photos):
    """shards.encode_png (our writer: Up filter, zlib Z_RLE) against the reference reader, Pillow: its verify()
    checks every chunk's CRC, and the decoded pixels equal the input for photos, odd sizes and a 1x1 image."""
    import io

    from PIL import Image

    from factory.shards import encode_png

    rng = np.random.default_rng(3)
    images = [
        photos["astronaut"],
        photos["coffee"][:37, :53],
        rng.integers(0, 256, (1, 1, 3), dtype=np.uint8),
    ]
    for image in images:
        data = encode_png(image)
        with Image.open(io.BytesIO(data)) as checked:
            checked.verify()
        with Image.open(io.BytesIO(data)) as decoded:
            assert decoded.format == "PNG" and decoded.mode == "RGB"
            np.testing.assert_array_equal(np.asarray(decoded), image)
        assert encode_png(image) == data  # deterministic bytes: rebuilt shards stay byte-identical
