"""Classical degraders: pairs per CPU-second of one core at 1024x1024 HR, against a per-image numpy reference.

    python -m benchmarks.bench_degraders            # 16 pairs each, prints a table and the JSON result
    python -m benchmarks.bench_degraders --quick    # 4 pairs each
    python -m benchmarks.bench_degraders --hashes pairs.json   # also the sha256 of every pair's 8-bit LR

A speed change must not change a pair's bytes: `--hashes` at two commits gives two files that must be equal.

`realesrgan` and `bsrgan` (factory.degraders, torch on the CPU, one intra-op thread) against a straightforward
per-image implementation of the same draws in numpy, scipy.ndimage and Pillow (the records come from the same
`draw_parameters`; blur by `ndimage.correlate`, resizes by Pillow in float, noise by numpy, JPEG by Pillow), in the
style of BasicSR's and BSRGAN's numpy paths but without OpenCV, which this environment lacks. `bicubic` (the
project's antialiased bicubic, no randomness) is the floor. Every side degrades the same 1024 crops under the same
keys, one pair per call. The figure is pairs per CPU-second of the calling thread (`time.thread_time`), since the
machine may be shared; each pipeline's cost varies a lot between pairs (a pair may be upscaled 1.5x before its
first noise and JPEG), so the figure is the total over the same pairs, not a median.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import scipy.ndimage
import torch
from PIL import Image

from factory.color import quantize, tune_cpu_allocator
from factory.degraders import bsrgan, get_degrader, pair_generator, pair_seed, realesrgan

HR_SIZE = 1024
SEED = 2024
PIL_FILTERS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX,
}


def hr_crops(count: int, size: int = HR_SIZE) -> torch.Tensor:
    """`count` size x size HR images in [0, 1] (count, 3, size, size): the bundled photos scikit-image ships,
    resized, and flipped in turn."""
    import skimage.data

    photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket()]
    images = []
    for index in range(count):
        photo = Image.fromarray(photos[index % 4][..., :3]).resize((size, size), Image.Resampling.BICUBIC)
        array = np.asarray(photo)[:, :: (-1 if index // 4 % 2 else 1)]
        images.append(torch.from_numpy(array.copy()).permute(2, 0, 1))
    return torch.stack(images).float() / 255.0


# --------------------------------------------------------------------------------------------------------------------
# The per-image numpy reference: (H, W, 3) float32 in [0, 1]
# --------------------------------------------------------------------------------------------------------------------


def np_blur(image: np.ndarray, kernel: torch.Tensor) -> np.ndarray:
    return scipy.ndimage.correlate(image, kernel.numpy().astype(np.float32)[:, :, None], mode="mirror")


def np_resize(image: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    """Pillow's float resize per channel to size = (height, width)."""
    if (image.shape[0], image.shape[1]) == tuple(size):
        return image
    channels = [
        np.asarray(Image.fromarray(image[:, :, c]).resize((size[1], size[0]), PIL_FILTERS[mode]))
        for c in range(3)
    ]
    return np.stack(channels, axis=-1)


def np_gaussian(image: np.ndarray, sigma: float, gray: bool, rng: np.random.Generator) -> np.ndarray:
    shape = (*image.shape[:2], 1 if gray else 3)
    return np.clip(image + rng.standard_normal(shape, dtype=np.float32) * (sigma / 255.0), 0.0, 1.0)


def np_poisson(image: np.ndarray, scale: float, gray: bool, rng: np.random.Generator) -> np.ndarray:
    source = image @ np.array([0.2989, 0.587, 0.114], dtype=np.float32) if gray else image
    rounded = np.clip(np.round(source * 255.0), 0, 255) / 255.0
    levels = 2 ** np.ceil(np.log2(len(np.unique(rounded))))
    noise = rng.poisson(rounded * levels) / levels - rounded
    noise = noise[:, :, None] if gray else noise
    return np.clip(image + scale * noise.astype(np.float32), 0.0, 1.0)


def np_jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)).save(
        buffer, "JPEG", quality=quality
    )
    return np.asarray(Image.open(buffer).convert("RGB"), dtype=np.float32) / 255.0


def np_noise(image: np.ndarray, record: Mapping[str, Any], rng: np.random.Generator) -> np.ndarray:
    if record["kind"] == "gaussian":
        return np_gaussian(image, record["sigma"], record["gray"], rng)
    return np_poisson(image, record["scale"], record["gray"], rng)


def np_realesrgan(
    image: np.ndarray, record: Mapping[str, Any], scale: int, rng: np.random.Generator
) -> np.ndarray:
    """Real-ESRGAN's pipeline on one image, as `realesrgan.degrade_one` does it."""
    height, width = image.shape[:2]
    first, second, final = record["first"], record["second"], record["final"]
    image = np_blur(image, realesrgan.kernel_from_record(first["blur"]))
    factor = first["resize"]["scale"]
    image = np_resize(image, (int(height * factor), int(width * factor)), first["resize"]["mode"])
    image = np_jpeg(np_noise(image, first["noise"], rng), first["jpeg_quality"])
    if second["blur"] is not None:
        image = np_blur(image, realesrgan.kernel_from_record(second["blur"]))
    factor = second["resize"]["scale"]
    size = (int(height / scale * factor), int(width / scale * factor))
    image = np_noise(np_resize(image, size, second["resize"]["mode"]), second["noise"], rng)

    def resize_sinc(x: np.ndarray) -> np.ndarray:
        x = np_resize(x, (height // scale, width // scale), final["mode"])
        return x if final["sinc"] is None else np_blur(x, realesrgan.kernel_from_record(final["sinc"]))

    if final["order"] == "resize_sinc_then_jpeg":
        return np_jpeg(resize_sinc(image), final["jpeg_quality"])
    return resize_sinc(np_jpeg(image, final["jpeg_quality"]))


def np_bsrgan(image: np.ndarray, record: Mapping[str, Any], rng: np.random.Generator) -> np.ndarray:
    """BSRGAN's pipeline on one image, as `bsrgan.degrade_one` does it (MATLAB halving as Pillow bicubic)."""
    if record["halve"] is not None:
        mode = record["halve"].get("mode") or "bicubic"
        image = np.clip(np_resize(image, (image.shape[0] // 2, image.shape[1] // 2), mode), 0.0, 1.0)
    sf, steps = record["sf"], record["steps"]
    before = image.shape[:2]
    for step in record["order"]:
        if step in ("blur1", "blur2"):
            image = np_blur(image, bsrgan.blur_kernel(steps[step]))
        elif step == "downsample2":
            before, down = image.shape[:2], steps[step]
            if down["method"] == "resize":
                size = (int(before[0] / down["factor"]), int(before[1] / down["factor"]))
                image = np_resize(image, size, down["mode"])
            else:
                kernel = bsrgan.K.shifted_gaussian(25, down["sigma"], (sf - 1) / 2)
                image = np_blur(image, kernel)[::sf, ::sf]
            image = np.clip(image, 0.0, 1.0)
        elif step == "downsample3":
            image = np.clip(
                np_resize(image, (before[0] // sf, before[1] // sf), steps[step]["mode"]), 0.0, 1.0
            )
        elif step == "noise":
            shape = (*image.shape[:2], 1 if steps[step]["kind"] == "gray" else 3)
            noise = rng.standard_normal(shape, dtype=np.float32) * (steps[step]["level"] / 255.0)
            image = np.clip(image + noise, 0.0, 1.0)  # the correlated kind costs the same as colour
        elif steps["jpeg"]["quality"] is not None:
            image = np_jpeg(image, steps["jpeg"]["quality"])
    return np_jpeg(image, record["final"]["jpeg_quality"])


# --------------------------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------------------------


def cpu_seconds(function: Callable[[], object]) -> float:
    """CPU seconds of this thread: time spent waiting for a core on a shared machine does not count."""
    start = time.thread_time()
    function()
    return time.thread_time() - start


def ours(name: str, hr: torch.Tensor, keys: list[str]) -> Callable[[], None]:
    degrader = get_degrader(name)

    def work() -> None:
        for index, key in enumerate(keys):
            degrader.degrade(hr[index : index + 1], [pair_generator(SEED, key)])

    return work


def reference(name: str, hr: torch.Tensor, keys: list[str]) -> Callable[[], None]:
    """The numpy side: the same records (drawn as ours draws them), applied per image in numpy."""
    images = [image.permute(1, 2, 0).numpy().copy() for image in hr]

    def work() -> None:
        for image, key in zip(images, keys, strict=True):
            generator, rng = pair_generator(SEED, key), np.random.default_rng(pair_seed(SEED, key))
            if name == "realesrgan":
                np_realesrgan(
                    image, realesrgan.draw_parameters(realesrgan.RealESRGANConfig(), generator), 4, rng
                )
            else:
                np_bsrgan(image, bsrgan.draw_parameters(bsrgan.BSRGANConfig(), generator), rng)

    return work


def pair_hashes(quick: bool = False) -> dict[str, str]:
    """sha256 of the 8-bit LR of every pair the benchmark times, by "degrader/key"."""
    count = 4 if quick else 16
    hr, keys = hr_crops(count), [f"bench/{index}" for index in range(count)]
    hashes = {}
    for name in ("realesrgan", "bsrgan"):
        degrader = get_degrader(name)
        for index, key in enumerate(keys):
            lr, _ = degrader.degrade(hr[index : index + 1], [pair_generator(SEED, key)])
            hashes[f"{name}/{key}"] = hashlib.sha256(quantize(lr).numpy().tobytes()).hexdigest()
    return hashes


def run(quick: bool = False, hr_size: int = HR_SIZE) -> dict:
    """Pairs per CPU-second of one thread, for ours, the numpy reference and bicubic, on the same pairs (HR
    `hr_size` square; the figures are defined at 1024, smaller sizes only check the harness)."""
    count = 4 if quick else 16
    # As a CPU build worker does (ShardWorker): freed memory stays in the process, for both sides alike.
    allocator_tuned = tune_cpu_allocator()
    hr = hr_crops(count, hr_size)
    keys = [f"bench/{index}" for index in range(count)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ours("bicubic", hr[:1], keys[:1])()  # warm-up
        result: dict[str, Any] = {
            "hr_size": hr_size,
            "pairs": count,
            "threads": 1,
            "allocator_tuned": allocator_tuned,
        }
        result["bicubic_pairs_per_core_s"] = count / cpu_seconds(ours("bicubic", hr, keys))
        for name in ("realesrgan", "bsrgan"):
            result[f"{name}_pairs_per_core_s"] = count / cpu_seconds(ours(name, hr, keys))
            result[f"{name}_numpy_pairs_per_core_s"] = count / cpu_seconds(reference(name, hr, keys))
            result[f"{name}_vs_numpy"] = (
                result[f"{name}_pairs_per_core_s"] / result[f"{name}_numpy_pairs_per_core_s"]
            )
            result[f"{name}_vs_bicubic"] = (
                result[f"{name}_pairs_per_core_s"] / result["bicubic_pairs_per_core_s"]
            )
    finally:
        torch.set_num_threads(threads)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 pairs per side instead of 16")
    parser.add_argument(
        "--hashes", default=None, help="also write the sha256 of every pair's 8-bit LR to this file"
    )
    arguments = parser.parse_args()
    result = run(quick=arguments.quick)
    print(f"pairs per CPU-second, one thread, {HR_SIZE}x{HR_SIZE} HR -> {HR_SIZE // 4}x{HR_SIZE // 4} LR:")
    print(f"  bicubic (floor)      {result['bicubic_pairs_per_core_s']:8.2f}")
    for name in ("realesrgan", "bsrgan"):
        print(
            f"  {name:<10} torch     {result[f'{name}_pairs_per_core_s']:8.2f}   "
            f"numpy reference {result[f'{name}_numpy_pairs_per_core_s']:6.2f}   "
            f"{result[f'{name}_vs_numpy']:.2f}x numpy, {result[f'{name}_vs_bicubic']:.3f} of bicubic"
        )
    print(json.dumps(result, indent=2))
    if arguments.hashes:
        with open(arguments.hashes, "w") as file:
            json.dump(pair_hashes(quick=arguments.quick), file, indent=0, sort_keys=True)


if __name__ == "__main__":
    main()
