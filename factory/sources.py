"""HR inputs: listing image files, decoding them to 8-bit RGB, the crop plan, and rejecting what cannot be used.

    from factory.sources import find_images, load_rgb
    for path in find_images("DIV2K_train_HR/"):
        y = load_rgb(path)            # (H, W, 3) uint8, EXIF orientation applied

Every way an input can fail (unreadable, empty, not an image, truncated, decompression bomb, unsupported pixel
format, smaller than the crop) raises `RejectedImage(reason, detail)`: the build records it in the rejects manifest
and goes on.

The crop plan is a regular grid, the one BasicSR's `extract_subimages` uses to prepare DF2K: along each axis, crops
start every `stride` pixels, and one more crop flush with the far edge covers the remainder. With crop 1024 and the
default stride 512 every DF2K image (DIV2K ~2040x1356, Flickr2K ~2040x1080 to 2040x1536) gives 3 x 2 = 6 crops:
3,450 images x 6 = 20,700, the paper's "approximately 20,000".
"""

from __future__ import annotations

import errno
import io
import logging
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from factory.config import FactoryError

log = logging.getLogger(__name__)

# Lower-case suffixes of the files `find_images` lists (compared case-insensitively: `IMG_0001.JPG` counts).
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm", ".gif"}
)


class RejectedImage(FactoryError):
    """An input image the factory cannot use. `reason` is a short machine-readable code (stored in the rejects
    manifest's `reason` column), `detail` the human-readable message."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # keep (reason, detail) across pickling (Ray sends exceptions between processes)
        return (RejectedImage, (self.reason, self.detail))


def is_image_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


@dataclass(frozen=True)
class ImageListing:
    """What `walk_images` found under a root, every path as it is under the root given (links not resolved)."""

    files: list[Path]  # image files, sorted by their POSIX path relative to the root
    skipped: list[tuple[Path, RejectedImage]]  # links and folders not listed, with why


def walk_images(root: str | os.PathLike) -> ImageListing:
    """Every image file under `root` (recursive, by extension, case-insensitive), sorted by path so that the same
    folder always gives the same order (the crop plan, and so the keys and shards, depend on it). Hidden files and
    folders (names starting with '.') are skipped. A missing root is a FactoryError.

    Links to folders are followed, but each real folder (device, inode) is listed once: a link back to a folder above
    it (`up -> ..`) would otherwise be walked until the path is too long, with every file listed again at each level.
    Such a link is skipped with a `symlink_loop` reject; a second path to a folder listed already is skipped quietly,
    as a file listed twice is kept once. A link that leads nowhere, whatever its name (it may have been a folder), is
    skipped with a `dangling_link` reject, or `symlink_loop` when it leads to itself (`self.png -> self.png`)."""
    root = Path(root)
    if not root.is_dir():
        raise FactoryError(f"not a folder of images: {root}")
    listing = ImageListing([], [])
    listed: set[tuple[int, int]] = set()
    pending: list[tuple[Path, tuple[tuple[int, int], ...]]] = [(root, ())]  # (folder, identities above it)
    while pending:
        folder, above = pending.pop()
        try:
            status = folder.stat()
            with os.scandir(folder) as scan:
                entries = sorted(scan, key=lambda entry: entry.name)
        except OSError as error:
            unreadable = RejectedImage("unreadable", f"cannot list {folder}: {error.strerror or error}")
            listing.skipped.append((folder, unreadable))
            continue
        identity = (status.st_dev, status.st_ino)
        if identity in above:
            target = os.path.realpath(folder)
            loop = RejectedImage("symlink_loop", f"{folder} links back to {target}, a folder that holds it")
            listing.skipped.append((folder, loop))
            continue
        if identity in listed:
            continue
        listed.add(identity)
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            broken = _broken_link(entry)
            if broken is not None:
                listing.skipped.append((Path(entry.path), broken))
            elif _is_folder(entry):
                subfolders.append(Path(entry.path))
            elif is_image_file(entry.name):
                listing.files.append(Path(entry.path))
        pending.extend((subfolder, (*above, identity)) for subfolder in reversed(subfolders))
    # Sort on the POSIX relative path so the order does not depend on the platform's separator.
    listing.files.sort(key=lambda path: path.relative_to(root).as_posix())
    return listing


def _is_folder(entry: os.DirEntry) -> bool:
    """A folder, or a link to one."""
    try:
        return entry.is_dir()
    except OSError:  # a link that turned into a loop since `_broken_link` looked
        return False


def _broken_link(entry: os.DirEntry) -> RejectedImage | None:
    """Why a link leads nowhere (its target is missing, or it leads back to itself); None for anything else."""
    if not entry.is_symlink():
        return None
    try:
        os.stat(entry.path)
    except OSError as error:
        if error.errno == errno.ELOOP:
            return RejectedImage("symlink_loop", f"{entry.path}: its links lead back to themselves")
        if error.errno == errno.ENOENT:
            return RejectedImage(
                "dangling_link", f"{entry.path} links to {os.readlink(entry.path)}, which is missing"
            )
        return RejectedImage("unreadable", f"cannot follow the link {entry.path}: {error.strerror or error}")
    return None


def find_images(root: str | os.PathLike) -> list[Path]:
    """The image files of `walk_images(root)`; each link or folder it skipped is logged as a warning."""
    listing = walk_images(root)
    for path, error in listing.skipped:
        log.warning("skipped %s: %s", path, error)
    return listing.files


def load_rgb(path: str | os.PathLike, max_pixels: int | None = None) -> np.ndarray:
    """Decode an image file to (H, W, 3) uint8 RGB, EXIF orientation applied. Raises RejectedImage."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise RejectedImage("unreadable", f"cannot read {path}: {error.strerror or error}") from None
    return decode_rgb(data, name=str(path), max_pixels=max_pixels)


def decode_rgb(data: bytes, name: str = "<bytes>", max_pixels: int | None = None) -> np.ndarray:
    """Image file bytes -> (H, W, 3) uint8 RGB, EXIF orientation applied. Raises RejectedImage.

    `max_pixels` bounds width x height before any pixel is decoded (default: Pillow's `Image.MAX_IMAGE_PIXELS`,
    89.5 M); a larger image is a decompression bomb. Conversions: grey and grey+alpha are replicated to RGB;
    palette images are expanded; alpha is composited over white (transparent pixels carry arbitrary colour
    underneath, and white is what a viewer shows); 16-bit samples are rounded to 8 bits (value / 257); CMYK is
    converted with Pillow's formula (no ICC colour management)."""
    if not data:
        raise RejectedImage("empty", f"{name} is an empty file")
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x its limit; for a factory any image over the limit is a reject.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if limit is not None and width * height > limit:
                    raise RejectedImage(
                        "decompression_bomb",
                        f"{name} is {width}x{height} = {width * height} pixels (limit {limit})",
                    )
                image.load()
                image = ImageOps.exif_transpose(image)
                return to_rgb8(image, name)
    except RejectedImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise RejectedImage("decompression_bomb", f"{name}: {error}") from None
    except UnidentifiedImageError:
        raise RejectedImage("not_an_image", f"{name} is not an image Pillow can identify") from None
    except OSError as error:
        message = str(error)
        reason = "truncated" if "truncated" in message or "broken data stream" in message else "corrupt"
        raise RejectedImage(reason, f"{name}: {message}") from None
    except (ValueError, SyntaxError, EOFError, IndexError, struct.error) as error:
        # Pillow's plugins raise these on malformed headers and chunks.
        raise RejectedImage("corrupt", f"{name}: {type(error).__name__}: {error}") from None


def to_rgb8(image: Image.Image, name: str = "<image>") -> np.ndarray:
    """A loaded PIL image in any common mode -> (H, W, 3) uint8 RGB (see `decode_rgb` for the conversions)."""
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grey (Pillow reads 16-bit grey PNG/TIFF as I;16 or I): round to 8 bits, then replicate.
        values = np.asarray(image).astype(np.float64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise RejectedImage("unsupported_format", f"{name}: 32-bit integer samples outside 0..65535")
        grey = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=2))
    if mode == "F":
        raise RejectedImage(
            "unsupported_format", f"{name}: floating-point samples have no defined 8-bit range"
        )
    if mode == "P":
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    array = np.asarray(image.convert("RGB"))
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise RejectedImage("unsupported_format", f"{name}: mode {mode} did not convert to 8-bit RGB")
    return np.ascontiguousarray(array)


# EXIF orientations (5-8) that transpose the image: its displayed height and width are the stored ones swapped.
_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})

# The embedded default HR set: scikit-image's bundled colour photographs (all at least 300 px on their short side,
# at most 1411 px), so that `factory build` runs anywhere without data. Paths are inside `skimage.data.data_dir`.
SKIMAGE_ROOT_LABEL = "skimage-data"
SKIMAGE_COLOR_FILES = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "retina.jpg",
    "rocket.jpg",
)


@dataclass(frozen=True)
class SourceFile:
    """One HR input file."""

    path: str  # absolute, links resolved (a looping link stays as it is), read by the build's actors
    root: str  # the HR root as given on the command line (manifest `source_root`), or "skimage-data"
    relative: str  # POSIX path relative to `root` (manifest `source`)


@dataclass
class SourceListing:
    """What `list_sources` found: the files to plan, and what was skipped while listing (the build records it)."""

    files: list[SourceFile]
    rejects: list[tuple[SourceFile, RejectedImage]]  # links and folders not listed (`walk_images`), with why


def list_sources(roots: tuple[str, ...] = (), list_files: tuple[str, ...] = ()) -> SourceListing:
    """The HR files of every `--hr` root (recursive, sorted) and every `--hr-list` file (one path per line, relative
    to the list's folder unless absolute; blank lines and '#' comments skipped), in the order given. Without either,
    the embedded default (scikit-image's colour photos). A file listed twice is kept once (the first time)."""
    sources: list[SourceFile] = []
    rejects: list[tuple[SourceFile, RejectedImage]] = []
    for root in roots:
        walked = walk_images(root)
        for path in walked.files:
            sources.append(SourceFile(os.path.realpath(path), str(root), path.relative_to(root).as_posix()))
        for path, error in walked.skipped:
            skipped = SourceFile(os.path.realpath(path), str(root), path.relative_to(root).as_posix())
            rejects.append((skipped, error))
    for list_file in list_files:
        listing = Path(list_file)
        try:
            lines = listing.read_text().splitlines()
        except OSError as error:
            raise FactoryError(f"cannot read --hr-list {listing}: {error.strerror or error}") from None
        for line in lines:
            entry = line.strip()
            if not entry or entry.startswith("#"):
                continue
            path = Path(entry) if Path(entry).is_absolute() else listing.parent / entry
            sources.append(SourceFile(os.path.realpath(path), str(list_file), entry))
    if not roots and not list_files:
        import skimage.data

        for name in SKIMAGE_COLOR_FILES:
            sources.append(SourceFile(os.path.join(skimage.data.data_dir, name), SKIMAGE_ROOT_LABEL, name))
    unique: dict[str, SourceFile] = {}
    for source in sources:
        unique.setdefault(source.path, source)
    return SourceListing(list(unique.values()), rejects)


def probe_image(path: str | os.PathLike, max_pixels: int | None = None) -> tuple[int, int]:
    """(height, width) of an image as displayed (EXIF orientation applied), read from its header only. Raises
    RejectedImage for files that are unreadable, empty, not images, or over the pixel limit; a truncated body is
    only found when decoding (`load_rgb`)."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise RejectedImage("empty", f"{path} is an empty file")
    except OSError as error:
        reason = "symlink_loop" if error.errno == errno.ELOOP else "unreadable"  # `self.png -> self.png`
        raise RejectedImage(reason, f"cannot read {path}: {error.strerror or error}") from None
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                orientation = image.getexif().get(0x0112, 1)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise RejectedImage("decompression_bomb", f"{path}: {error}") from None
    except UnidentifiedImageError:
        raise RejectedImage("not_an_image", f"{path} is not an image Pillow can identify") from None
    except OSError as error:
        raise RejectedImage("unreadable", f"cannot read {path}: {error.strerror or error}") from None
    except (ValueError, SyntaxError, EOFError, IndexError, struct.error) as error:
        raise RejectedImage("corrupt", f"{path}: {type(error).__name__}: {error}") from None
    if limit is not None and width * height > limit:
        raise RejectedImage(
            "decompression_bomb", f"{path} is {width}x{height} = {width * height} pixels (limit {limit})"
        )
    if orientation in _TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    return height, width


def grid_positions(length: int, crop: int, stride: int) -> list[int]:
    """Start offsets of the crops along one axis: 0, stride, 2 stride, ... while a crop fits, then one crop flush
    with the far edge if any pixels are left over (BasicSR's extract_subimages with thresh_size 0)."""
    if crop > length:
        return []
    positions = list(range(0, length - crop + 1, stride))
    if positions[-1] + crop < length:
        positions.append(length - crop)
    return positions


def crop_boxes(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int]]:
    """(top, left) of every crop of an image, row by row. [] when the image is smaller than the crop."""
    return [
        (top, left)
        for top in grid_positions(height, crop, stride)
        for left in grid_positions(width, crop, stride)
    ]
