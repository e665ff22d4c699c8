"""Sources: listing, decoding every awkward input to 8-bit RGB, rejecting bad ones, and the crop plan."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from factory.config import FactoryError
from factory.sources import RejectedImage, find_images, load_rgb


def write_png16_rgb(path: Path, image: np.ndarray) -> None:
    """A 16-bit RGB PNG written from the PNG specification (Pillow cannot write 48-bit RGB): IHDR with bit depth 16
    and colour type 2, big-endian samples, filter byte 0 per row, zlib-compressed IDAT."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    height, width, _ = image.shape
    rows = b"".join(b"\x00" + image[row].astype(">u2").tobytes() for row in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    )


def write_awkward_inputs(folder: Path, image: np.ndarray) -> dict[str, str | None]:
    """Write one file per awkward and bad input, made from `image` ((H, W, 3) uint8, at least 256x256). Returns
    {relative file name: expected reject reason, or None for inputs that must decode}. `bomb.png` is only a bomb
    under a pixel limit below its size (the tests pass one); `small.png` only fails a crop larger than 64."""
    folder.mkdir(parents=True, exist_ok=True)
    picture = Image.fromarray(image)
    expected: dict[str, str | None] = {}

    picture.convert("L").save(folder / "grey.png")
    picture.convert("LA").save(folder / "grey_alpha.png")
    picture.convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(folder / "palette.png")
    rgba = picture.convert("RGBA")
    rgba.putalpha(200)
    rgba.save(folder / "rgba.png")
    Image.fromarray(image[..., 0].astype(np.uint16) * 257).save(folder / "grey16.png")
    write_png16_rgb(folder / "rgb16.png", image.astype(np.uint16) * 257)
    picture.convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation 6: the stored pixels must be turned 90 degrees clockwise to display
    picture.save(folder / "rotated.jpg", quality=95, exif=exif)
    picture.save(folder / "UPPER.JPG", quality=95)
    expected.update({name: None for name in ("grey.png", "grey_alpha.png", "palette.png", "rgba.png", "grey16.png",
                                             "rgb16.png", "cmyk.jpg", "rotated.jpg", "UPPER.JPG")})

    (folder / "empty.png").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not an image\n")
    whole = (folder / "rotated.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (folder / "unreadable.png").symlink_to(folder / "does-not-exist.png")  # unreadable even for root
    picture.resize((48, 48)).save(folder / "small.png")
    picture.save(folder / "bomb.png")
    expected.update({"empty.png": "empty", "text.jpg": "not_an_image", "truncated.jpg": "truncated",
                     "unreadable.png": "unreadable", "small.png": "too_small", "bomb.png": "decompression_bomb"})
    return expected


@pytest.fixture
def photo(photos) -> np.ndarray:
    return photos["astronaut"][:256, :320]  # not square, so a rotation shows in the shape


def test_find_images_is_recursive_sorted_and_case_insensitive(tmp_path: Path):
    for name in ("b/2.PNG", "a.jpg", "b/1.jpeg", "c/d/e.TIF", "notes.txt", ".hidden.png", ".cache/x.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    found = [path.relative_to(tmp_path).as_posix() for path in find_images(tmp_path)]
    assert found == ["a.jpg", "b/1.jpeg", "b/2.PNG", "c/d/e.TIF"]


def test_find_images_missing_folder_is_a_user_error(tmp_path: Path):
    with pytest.raises(FactoryError):
        find_images(tmp_path / "missing")


def test_awkward_inputs_decode_to_rgb8(tmp_path: Path, photo):
    write_awkward_inputs(tmp_path, photo)
    height, width, _ = photo.shape
    # References: the source pixels themselves, converted by the standard formulas (ITU-R 601 luma for grey).
    grey = np.asarray(Image.fromarray(photo).convert("L"))
    for name in ("grey.png", "grey16.png"):
        decoded = load_rgb(tmp_path / name)
        assert decoded.shape == (height, width, 3) and decoded.dtype == np.uint8
        assert np.array_equal(decoded[..., 0], decoded[..., 2])
    assert np.array_equal(load_rgb(tmp_path / "grey.png")[..., 0], grey)
    assert np.array_equal(load_rgb(tmp_path / "grey16.png")[..., 0], photo[..., 0])  # v * 257 / 257 = v exactly
    assert np.array_equal(load_rgb(tmp_path / "rgb16.png"), photo)
    # Alpha 200 over white: out = (c * 200 + 255 * 55) / 255 (Pillow's alpha_composite rounds).
    expected_rgba = (photo.astype(np.float64) * 200 + 255 * 55) / 255
    assert np.abs(load_rgb(tmp_path / "rgba.png") - expected_rgba).max() <= 1.0
    assert np.abs(load_rgb(tmp_path / "palette.png").astype(int) - photo).mean() < 12  # 64-colour palette
    assert np.abs(load_rgb(tmp_path / "cmyk.jpg").astype(int) - photo).mean() < 6
    assert np.abs(load_rgb(tmp_path / "UPPER.JPG").astype(int) - photo).mean() < 6
    rotated = load_rgb(tmp_path / "rotated.jpg")
    assert rotated.shape == (width, height, 3)
    assert np.abs(rotated.astype(int) - np.rot90(photo, k=-1)).mean() < 6  # displayed = stored turned clockwise


@pytest.mark.parametrize("name,reason", [("empty.png", "empty"), ("text.jpg", "not_an_image"),
                                         ("truncated.jpg", "truncated"), ("unreadable.png", "unreadable")])
def test_bad_inputs_are_rejected_with_a_reason(tmp_path: Path, photo, name, reason):
    write_awkward_inputs(tmp_path, photo)
    with pytest.raises(RejectedImage) as caught:
        load_rgb(tmp_path / name)
    assert caught.value.reason == reason and caught.value.detail
    assert isinstance(caught.value, FactoryError)


def test_decompression_bomb_is_rejected_before_decoding(tmp_path: Path, photo):
    write_awkward_inputs(tmp_path, photo)
    with pytest.raises(RejectedImage) as caught:
        load_rgb(tmp_path / "bomb.png", max_pixels=256 * 256)
    assert caught.value.reason == "decompression_bomb"
    assert load_rgb(tmp_path / "bomb.png").shape == photo.shape  # under Pillow's default limit it is fine


def test_rejected_image_survives_pickling():
    import pickle

    error = pickle.loads(pickle.dumps(RejectedImage("truncated", "a.jpg: cut short")))
    assert (error.reason, error.detail) == ("truncated", "a.jpg: cut short")
