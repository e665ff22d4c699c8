"""Shard payload codecs: encode ms, decode ms and bytes per pair, on a real photo at the build's sizes.

python -m benchmarks.bench_codecs
"""

from __future__ import annotations

import io
import statistics
import time

import numpy as np
from PIL import Image

from factory import shards


def _pair(hr_size: int, scale: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """A real (HR, LR) pair: the retina photo scikit-image ships, resized to hr_size, and its bicubic LR."""
    import skimage.data

    photo = Image.fromarray(skimage.data.retina()[..., :3])
    hr = photo.resize((hr_size, hr_size), Image.Resampling.BICUBIC)
    lr = hr.resize((hr_size // scale, hr_size // scale), Image.Resampling.BICUBIC)
    return np.asarray(hr), np.asarray(lr)


def _median_ms(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _pillow_png(image: np.ndarray, codec: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=shards.PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def run(quick: bool = False) -> dict:
    hr, lr = _pair(512 if quick else 1024)
    repeats = 3 if quick else 7
    results = {"hr_size": hr.shape[0]}
    # png1: the factory's png payload (shards.encode_png: one filter, zlib level 1, run-length matching); Pillow's
    # own encoder at levels 1 and 6 as the baselines; zst.
    variants = {
        "png1": ("png", 1),
        "pillow_png1": ("pillow", 1),
        "pillow_png6": ("pillow", 6),
        "zst": ("zst", None),
    }
    for label, (codec, level) in variants.items():
        saved = shards.PNG_COMPRESS_LEVEL
        if level is not None:
            shards.PNG_COMPRESS_LEVEL = level
        # "pillow": Pillow's own PNG encoder at the same level, the baseline of shards.encode_png.
        encode = _pillow_png if codec == "pillow" else shards.encode_image
        try:
            encoded = [encode(image, codec) for image in (hr, lr)]
            encode_ms = _median_ms(
                lambda encode=encode, codec=codec: [encode(image, codec) for image in (hr, lr)], repeats
            )
        finally:
            shards.PNG_COMPRESS_LEVEL = saved
        extension = shards.payload_extension("png" if codec == "pillow" else codec)
        decode_ms = _median_ms(
            lambda extension=extension, encoded=encoded: [
                shards.decode_image(f"x.{extension}", data) for data in encoded
            ],
            repeats,
        )
        raw = hr.nbytes + lr.nbytes
        results[label] = {
            "encode_ms_per_pair": round(encode_ms, 2),
            "decode_ms_per_pair": round(decode_ms, 2),
            "bytes_per_pair": sum(len(data) for data in encoded),
            "ratio_to_raw": round(sum(len(data) for data in encoded) / raw, 3),
        }
    return results


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
