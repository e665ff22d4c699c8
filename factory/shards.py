"""WebDataset shards: payload codecs (and, with the build, writing, reading and atomic commit).

A sample is `__key__`, `hr.<ext>`, `lr.<ext>` and `json` (its manifest row). Two codecs:

- `png`: `hr.png` / `lr.png`, 8-bit RGB; any WebDataset reader decodes it (`.decode("rgb8")`).
- `zst`: `hr.npy.zst` / `lr.npy.zst`, the (H, W, 3) uint8 array saved with `numpy.save` and compressed with
  zstandard; several times faster to decode than PNG, somewhat larger. With plain webdataset, decode it with
  `wds.WebDataset(urls).decode(lambda key, data: np.load(io.BytesIO(zstandard.decompress(data))) if key.endswith(".npy.zst") else None)`.
"""

from __future__ import annotations

import io

import numpy as np
import zstandard
from PIL import Image

CODECS: dict[str, str] = {"png": "png", "zst": "npy.zst"}  # codec name -> payload extension

PNG_COMPRESS_LEVEL = 1  # measured: level 1 encodes ~4.5x faster than 6 for ~20% more bytes (FACTS.md)
ZSTD_LEVEL = 3


def payload_extension(codec: str) -> str:
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; known: {', '.join(CODECS)}")
    return CODECS[codec]


def encode_image(image: np.ndarray, codec: str) -> bytes:
    """(H, W, 3) uint8 -> payload bytes of `codec`."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    if codec == "png":
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        return buffer.getvalue()
    if codec == "zst":
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(image), allow_pickle=False)
        return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(buffer.getvalue())
    raise ValueError(f"unknown codec {codec!r}; known: {', '.join(CODECS)}")


def decode_image(name: str, data: bytes) -> np.ndarray:
    """Payload bytes -> (H, W, 3) uint8, by the member name's extension (`hr.png`, `lr.npy.zst`, ...)."""
    if name.endswith(".npy.zst"):
        array = np.load(io.BytesIO(zstandard.ZstdDecompressor().decompress(data)), allow_pickle=False)
    elif name.endswith(".png"):
        with Image.open(io.BytesIO(data)) as image:
            array = np.asarray(image.convert("RGB"))
    else:
        raise ValueError(f"not an image payload: {name!r}")
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"payload {name!r} is not an (H, W, 3) uint8 image: {array.shape} {array.dtype}")
    return array
