"""ΔE throughput: the project's CIEDE2000 (`factory.color`) against scikit-image on the same 256x256 pairs.

    python benchmarks/bench_color.py            # full run, prints pairs/s and the ratio
    python benchmarks/bench_color.py --quick    # fewer repeats

Both sides compute, for one pair of 8-bit images, sRGB -> CIELAB of each image and the per-pixel CIEDE2000 and its
mean: skimage with `rgb2lab` + `deltaE_ciede2000` (float64, its only precision), ours with `pixel_delta_e` (the same
`rgb_to_lab` + `ciede2000`) on uint8 input in float32 -- by the fused C kernel (`factory.native`, compiled on first
use) and by the torch path it falls back to without a C compiler (cache-sized pieces, table linearisation) -- and in
float64 from float input (torch path). The machine may be shared: medians, and both sides measured in the same run. One thread each
(`torch.set_num_threads(1)`; numpy here is single-threaded for these element-wise ops); the figure is the median over
repeats of the time per pair, in CPU time of the calling thread (`time.thread_time`: on a machine shared with other
jobs, time spent waiting for a core does not count; cache contention still does), skimage and ours interleaved.
The process first calls `color.tune_cpu_allocator()`, as a ΔE worker should (it helps ours by about a third and
skimage little; "allocator_tuned" in the result says whether it applied). On CUDA (when present) ours runs batched, 64 pairs per call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from factory import color


def make_pairs(count: int, size: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`count` (HR-like, LR-like) 8-bit pairs: crops of the bundled photos and a noisy, colour-cast copy."""
    import skimage.data

    rng = np.random.default_rng(seed)
    photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket()]
    first, second = [], []
    for index in range(count):
        photo = photos[index % len(photos)]
        top = rng.integers(0, photo.shape[0] - size + 1)
        left = rng.integers(0, photo.shape[1] - size + 1)
        crop = photo[top : top + size, left : left + size, :3].astype(np.int16)
        noisy = crop + rng.normal(0, 6, crop.shape) + rng.integers(-12, 13, 3)
        first.append(crop.astype(np.uint8))
        second.append(np.clip(noisy, 0, 255).astype(np.uint8))
    return np.stack(first), np.stack(second)


def elapsed_seconds(function) -> float:
    """CPU seconds of this thread: on a shared machine, time spent waiting for a core does not count."""
    start = time.thread_time()
    function()
    return time.thread_time() - start


def median_seconds(function, repeats: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(quick: bool = False) -> dict:
    """Pairs per second for skimage and ours (one thread each, same pairs), and ours on CUDA when present."""
    import skimage.color

    pair_count, repeats = (4, 3) if quick else (8, 9)
    first, second = make_pairs(pair_count)
    allocator_tuned = color.tune_cpu_allocator()  # as a ΔE worker process does (see its docstring)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:

        def skimage_all() -> list[float]:
            return [
                float(
                    skimage.color.deltaE_ciede2000(skimage.color.rgb2lab(a), skimage.color.rgb2lab(b)).mean()
                )
                for a, b in zip(first, second, strict=True)
            ]

        first_u8 = [torch.from_numpy(a).permute(2, 0, 1)[None].contiguous() for a in first]
        second_u8 = [torch.from_numpy(b).permute(2, 0, 1)[None].contiguous() for b in second]
        first_f64 = [a.double() / 255.0 for a in first_u8]
        second_f64 = [b.double() / 255.0 for b in second_u8]

        def ours(firsts, seconds) -> list[float]:
            return [color.pixel_delta_e(a, b).mean().item() for a, b in zip(firsts, seconds, strict=True)]

        def ours_torch_path(firsts, seconds) -> list[float]:  # the fallback without a C compiler
            return [
                color._chunked(color._fast_rgb_pair_ciede2000, a, b).mean().item()
                for a, b in zip(firsts, seconds, strict=True)
            ]

        reference = np.array(skimage_all())
        variants = {
            "float32_uint8": (
                ours,
                first_u8,
                second_u8,
            ),  # the fused C kernel (factory.native) when it builds
            "float32_uint8_torch": (ours_torch_path, first_u8, second_u8),
            "float64": (ours, first_f64, second_f64),
        }
        for function, firsts, seconds_ in variants.values():
            function(firsts, seconds_)  # warm-up (tables, allocator, the kernel's first-use compile)
        # Interleaved rounds: on a shared machine both sides see the same load; the ratio is the median per round.
        times: dict[str, list[float]] = {"skimage": [], **{name: [] for name in variants}}
        for _ in range(repeats):
            times["skimage"].append(elapsed_seconds(skimage_all))
            for name, (function, firsts, seconds_) in variants.items():
                times[name].append(
                    elapsed_seconds(
                        lambda function=function, firsts=firsts, seconds_=seconds_: function(firsts, seconds_)
                    )
                )
        result: dict = {
            "pairs": pair_count,
            "size": 256,
            "threads": 1,
            "repeats": repeats,
            "allocator_tuned": allocator_tuned,
        }
        result["skimage_pairs_per_s"] = pair_count / statistics.median(times["skimage"])
        from factory.native import ciede2000_u8_kernel

        result["fused_kernel"] = ciede2000_u8_kernel() is not None
        for name, (function, firsts, seconds_) in variants.items():
            result[f"ours_{name}_pairs_per_s"] = pair_count / statistics.median(times[name])
            result[f"ours_{name}_ratio"] = statistics.median(
                reference_time / our_time
                for reference_time, our_time in zip(times["skimage"], times[name], strict=True)
            )
            difference = np.abs(np.array(function(firsts, seconds_)) - reference).max()
            result[f"ours_{name}_max_abs_diff_of_means"] = float(difference)
    finally:
        torch.set_num_threads(threads)

    if torch.cuda.is_available():
        device = torch.device("cuda")
        batch = 64
        indices = [index % pair_count for index in range(batch)]
        first_gpu = torch.cat([first_u8[i] for i in indices]).to(device)
        second_gpu = torch.cat([second_u8[i] for i in indices]).to(device)

        def ours_gpu() -> None:
            color.pixel_delta_e(first_gpu, second_gpu).mean(dim=(1, 2)).cpu()

        ours_gpu()
        torch.cuda.synchronize()
        elapsed = median_seconds(ours_gpu, repeats)
        result["cuda_device"] = torch.cuda.get_device_name(device)
        result["ours_cuda_float32_pairs_per_s"] = batch / elapsed
        result["ours_cuda_ratio_vs_skimage_one_thread"] = (
            result["ours_cuda_float32_pairs_per_s"] / result["skimage_pairs_per_s"]
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer pairs and repeats")
    arguments = parser.parse_args()
    result = run(quick=arguments.quick)
    print(f"skimage (1 thread, float64):        {result['skimage_pairs_per_s']:8.1f} pairs/s")
    for name in ("float32_uint8", "float64"):
        print(
            f"ours    (1 thread, {name:13s}): {result[f'ours_{name}_pairs_per_s']:8.1f} pairs/s"
            f"  = {result[f'ours_{name}_ratio']:.2f}x skimage"
        )
    if "cuda_device" in result:
        print(
            f"ours    ({result['cuda_device']}, float32): {result['ours_cuda_float32_pairs_per_s']:8.1f} pairs/s"
            f"  = {result['ours_cuda_ratio_vs_skimage_one_thread']:.1f}x skimage on one CPU thread"
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
