"""Sources: listing, decoding every awkward input to 8-bit RGB, rejecting bad ones, and the crop plan."""

from __future__ import annotations

import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from factory.config import FactoryError
from factory.sources import (
    SKIMAGE_COLOR_FILES,
    RejectedImage,
    crop_boxes,
    find_images,
    grid_positions,
    list_sources,
    load_rgb,
    probe_image,
)


def write_png16_rgb(path: Path, image: np.ndarray) -> None:
    """A 16-bit RGB PNG written from the PNG specification (Pillow cannot write 48-bit RGB): IHDR with bit depth 16
    and colour type 2, big-endian samples, filter byte 0 per row, zlib-compressed IDAT."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
        )

    height, width, _ = image.shape
    rows = b"".join(b"\x00" + image[row].astype(">u2").tobytes() for row in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def write_awkward_inputs(folder: Path, image: np.ndarray) -> dict[str, str | None]:
    """Write one file per awkward and bad input, made from `image` ((H, W, 3) uint8, at least 256x256). Returns
    {relative file name: expected reject reason, or None for inputs that must decode}. `bomb.png` is only a bomb
    (4x the pixels of the others) under a pixel limit below its size (the tests pass one); `small.png` only fails a crop larger than 64."""
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
    expected.update(
        {
            name: None
            for name in (
                "grey.png",
                "grey_alpha.png",
                "palette.png",
                "rgba.png",
                "grey16.png",
                "rgb16.png",
                "cmyk.jpg",
                "rotated.jpg",
                "UPPER.JPG",
            )
        }
    )

    (folder / "empty.png").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not an image\n")
    whole = (folder / "rotated.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (folder / "unreadable.png").symlink_to(folder / "does-not-exist.png")  # unreadable even for root
    picture.resize((48, 48)).save(folder / "small.png")
    Image.fromarray(np.tile(image, (2, 2, 1))).save(folder / "bomb.png")  # 4x the pixels of the others
    expected.update(
        {
            "empty.png": "empty",
            "text.jpg": "not_an_image",
            "truncated.jpg": "truncated",
            "unreadable.png": "dangling_link",  # listed (the build's reason); read directly, it is "unreadable"
            "small.png": "too_small",
            "bomb.png": "decompression_bomb",
        }
    )
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
    assert np.array_equal(
        load_rgb(tmp_path / "grey16.png")[..., 0], photo[..., 0]
    )  # v * 257 / 257 = v exactly
    assert np.array_equal(load_rgb(tmp_path / "rgb16.png"), photo)
    # Alpha 200 over white: out = (c * 200 + 255 * 55) / 255 (Pillow's alpha_composite rounds).
    expected_rgba = (photo.astype(np.float64) * 200 + 255 * 55) / 255
    assert np.abs(load_rgb(tmp_path / "rgba.png") - expected_rgba).max() <= 1.0
    assert np.abs(load_rgb(tmp_path / "palette.png").astype(int) - photo).mean() < 12  # 64-colour palette
    assert np.abs(load_rgb(tmp_path / "cmyk.jpg").astype(int) - photo).mean() < 6
    assert np.abs(load_rgb(tmp_path / "UPPER.JPG").astype(int) - photo).mean() < 6
    rotated = load_rgb(tmp_path / "rotated.jpg")
    assert rotated.shape == (width, height, 3)
    assert (
        np.abs(rotated.astype(int) - np.rot90(photo, k=-1)).mean() < 6
    )  # displayed = stored turned clockwise


@pytest.mark.parametrize(
    "name,reason",
    [
        ("empty.png", "empty"),
        ("text.jpg", "not_an_image"),
        ("truncated.jpg", "truncated"),
        ("unreadable.png", "unreadable"),
    ],
)
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
    assert load_rgb(tmp_path / "bomb.png").shape == (
        2 * photo.shape[0],
        2 * photo.shape[1],
        3,
    )  # fine by default


def test_rejected_image_survives_pickling():
    import pickle

    error = pickle.loads(pickle.dumps(RejectedImage("truncated", "a.jpg: cut short")))
    assert (error.reason, error.detail) == ("truncated", "a.jpg: cut short")


def basicsr_positions(length: int, crop: int, step: int) -> list[int]:
    """BasicSR's `extract_subimages` (scripts/data_preparation/extract_subimages.py) with thresh_size 0, the usual
    DF2K preparation: `np.arange(0, length - crop + 1, step)`, plus `length - crop` if more than 0 pixels remain."""
    space = np.arange(0, length - crop + 1, step)
    if length - (space[-1] + crop) > 0:
        space = np.append(space, length - crop)
    return space.tolist()


@pytest.mark.parametrize("length", [256, 300, 451, 1080, 1356, 1411, 2040])
@pytest.mark.parametrize("crop,stride", [(256, 128), (256, 256), (1024, 512)])
def test_grid_positions_follow_basicsr(length, crop, stride):
    if length < crop:
        assert grid_positions(length, crop, stride) == []
    else:
        assert grid_positions(length, crop, stride) == basicsr_positions(length, crop, stride)


def test_df2k_plan_gives_about_20000_crops():
    # DF2K = DIV2K train (800 images, typically 2040x1356 or 1356x2040) + Flickr2K (2,650, typically 2040x1080..1536).
    assert len(crop_boxes(1356, 2040, 1024, 512)) == 6
    assert len(crop_boxes(2040, 1356, 1024, 512)) == 6
    assert len(crop_boxes(1080, 2040, 1024, 512)) == 6
    assert len(crop_boxes(1536, 2040, 1024, 512)) == 6
    assert 3450 * 6 == 20700  # "approximately 20,000" (paper, Section 4.1)


def test_probe_reports_the_displayed_size(tmp_path: Path, photo):
    write_awkward_inputs(tmp_path, photo)
    assert probe_image(tmp_path / "rotated.jpg") == (photo.shape[1], photo.shape[0])  # EXIF 6 swaps the sides
    assert probe_image(tmp_path / "grey.png") == photo.shape[:2]
    for name, reason in [
        ("empty.png", "empty"),
        ("text.jpg", "not_an_image"),
        ("unreadable.png", "unreadable"),
    ]:
        with pytest.raises(RejectedImage) as caught:
            probe_image(tmp_path / name)
        assert caught.value.reason == reason
    with pytest.raises(RejectedImage) as caught:
        probe_image(tmp_path / "bomb.png", max_pixels=100_000)
    assert caught.value.reason == "decompression_bomb"


def test_list_sources_default_and_lists(tmp_path: Path, photo_folder: Path):
    default = list_sources().files
    assert [source.relative for source in default] == list(SKIMAGE_COLOR_FILES)
    assert all(Path(source.path).is_file() and source.root == "skimage-data" for source in default)
    listing = tmp_path / "list.txt"
    listing.write_text("# HR files\nphotos/astronaut.jpg\n\nphotos/nested/coffee.png\n")
    from_list = list_sources((), (str(listing),)).files
    assert [source.relative for source in from_list] == ["photos/astronaut.jpg", "photos/nested/coffee.png"]
    from_folder = list_sources((str(photo_folder),)).files
    assert [source.relative for source in from_folder] == [
        p.relative_to(photo_folder).as_posix() for p in find_images(photo_folder)
    ]
    assert len(list_sources((str(photo_folder), str(photo_folder))).files) == len(
        from_folder
    )  # listed twice, kept once


def _folder_with_a_photo(folder: Path, photo: np.ndarray) -> Path:
    (folder / "a").mkdir(parents=True)
    (folder / "b").mkdir()
    Image.fromarray(photo).save(folder / "a" / "x.png")
    return folder


def test_links_back_up_the_tree_are_listed_once_not_walked_forever(tmp_path: Path, photo):
    # Two links to the root: followed blindly, every level doubles the walk (the issue saw 6.7 GB after 120 s).
    root = _folder_with_a_photo(tmp_path / "d", photo)
    (root / "a" / "up").symlink_to("..")
    (root / "b" / "up").symlink_to("..")
    script = f"from factory.sources import find_images; print(len(find_images({str(root)!r})))"
    finished = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert finished.returncode == 0, finished.stderr
    listing = list_sources((str(root),))
    assert [source.relative for source in listing.files] == ["a/x.png"]
    assert sorted((source.relative, error.reason) for source, error in listing.rejects) == [
        ("a/up", "symlink_loop"),
        ("b/up", "symlink_loop"),
    ]


def test_a_directory_cycle_is_listed_once_under_the_path_given(tmp_path: Path, photo):
    root = _folder_with_a_photo(tmp_path / "d", photo)
    (root / "a" / "loop").symlink_to(root / "b")
    (root / "b" / "back").symlink_to(root / "a")
    listing = list_sources((str(root),))
    assert [source.relative for source in listing.files] == ["a/x.png"]
    assert listing.files[0].path == str((root / "a" / "x.png").resolve())
    assert [(source.relative, error.reason) for source, error in listing.rejects] == [
        ("a/loop/back", "symlink_loop")
    ]
    assert [path.relative_to(root).as_posix() for path in find_images(root)] == ["a/x.png"]


def test_self_referencing_and_dangling_links_are_rejects(tmp_path: Path, photo):
    root = _folder_with_a_photo(tmp_path / "d", photo)
    (root / "self.png").symlink_to("self.png")  # it raised RuntimeError: Symlink loop
    (root / "gone").symlink_to(tmp_path / "unmounted")  # a folder of photos, perhaps: not silently ignored
    listing = list_sources((str(root),))
    assert [source.relative for source in listing.files] == ["a/x.png"]
    assert sorted((source.relative, error.reason) for source, error in listing.rejects) == [
        ("gone", "dangling_link"),
        ("self.png", "symlink_loop"),
    ]
    with pytest.raises(RejectedImage) as caught:  # named in an --hr-list, it is found when read
        probe_image(root / "self.png")
    assert caught.value.reason == "symlink_loop"


def test_dry_run_records_a_loop_as_a_reject(tmp_path: Path, photo):
    from factory.build import BuildConfig, build

    root = _folder_with_a_photo(tmp_path / "d", photo)
    (root / "a" / "up").symlink_to("..")
    (root / "self.png").symlink_to("self.png")
    result = build(BuildConfig(hr=(str(root),), model="bicubic", crop=64, dry_run=True, progress=False))
    assert result.plan["sources"] == 1
    assert sorted((row["source"], row["reason"]) for row in result.rejects) == [
        ("a/up", "symlink_loop"),
        ("self.png", "symlink_loop"),
    ]
