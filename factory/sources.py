"""HR inputs: listing image files, decoding them to 8-bit RGB, and rejecting what cannot be used.

    from factory.sources import find_images, load_rgb
    for path in find_images("DIV2K_train_HR/"):
        y = load_rgb(path)            # (H, W, 3) uint8, EXIF orientation applied

Every way an input can fail (unreadable, empty, not an image, truncated, decompression bomb, unsupported pixel
format) raises `RejectedImage(reason, detail)`: the build records it in the rejects manifest and goes on.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from factory.config import FactoryError

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


def find_images(root: str | os.PathLike) -> list[Path]:
    """Every image file under `root` (recursive, by extension, case-insensitive), sorted by path so that the same
    folder always gives the same order (the crop plan, and so the keys and shards, depend on it). Hidden files and
    folders (names starting with '.') are skipped. A missing root is a FactoryError."""
    root = Path(root)
    if not root.is_dir():
        raise FactoryError(f"not a folder of images: {root}")
    found = []
    for directory, subdirectories, files in os.walk(root, followlinks=True):
        subdirectories[:] = [name for name in subdirectories if not name.startswith(".")]
        for name in files:
            if not name.startswith(".") and is_image_file(name):
                found.append(Path(directory) / name)
    # Sort on the POSIX relative path so the order does not depend on the platform's separator.
    return sorted(found, key=lambda path: path.relative_to(root).as_posix())


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
                        "decompression_bomb", f"{name} is {width}x{height} = {width * height} pixels (limit {limit})"
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
        raise RejectedImage("unsupported_format", f"{name}: floating-point samples have no defined 8-bit range")
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
