"""Every performance figure of the factory side by side in one run, one table, against the targets of issue 9.

    python -m benchmarks --quick                      # ~6-8 min on 2 CPU cores
    python -m benchmarks --json bench.json            # full run; raw figures of every module into bench.json
    python -m benchmarks --only build_efficiency      # one section (names: see SECTIONS)
    python -m benchmarks --only degraders             # realesrgan, bsrgan vs their numpy reference and bicubic (#18)
    python -m benchmarks --gpu --json gpu.json        # on a GPU machine: adds the GPU sections (benchmarks/gpu.sh)

Each section calls a benchmark module that also runs on its own (`python -m benchmarks.bench_color`, ...); each
figure is a median over repeats inside that module (bench_degraders: a total over the same pairs, whose costs vary
too much between pairs for a median), and every ratio compares two things measured in the same run.
The header describes the machine (cores, CPU model, device, library versions) and the load average before and
after, since these machines may be shared while measuring.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass

from benchmarks import bench_build, bench_codecs, bench_color, bench_degraders, bench_stream


@dataclass
class Figure:
    """One row of the table."""

    name: str  # the figure's name (issue 9)
    variant: str  # what distinguishes rows of one figure ("png", "zst", ...), or ""
    measured: float | None  # None: the section failed (see detail)
    unit: str  # "x", "pairs/s", "ms", ...
    target: str  # e.g. ">= 5", or "" when the figure has no target
    holds: bool | None  # None when there is no target or no measurement
    detail: str  # what was compared, in a few words


def figure(
    name: str,
    measured: float,
    unit: str,
    *,
    variant: str = "",
    at_least: float | None = None,
    at_most: float | None = None,
    detail: str = "",
) -> Figure:
    if at_least is not None:
        target, holds = f">= {at_least:g}", measured >= at_least
    elif at_most is not None:
        target, holds = f"<= {at_most:g}", measured <= at_most
    else:
        target, holds = "", None
    return Figure(name, variant, float(measured), unit, target, holds, detail)


# --------------------------------------------------------------------------------------------------------------------
# Sections: each runs one module and turns its result into rows (rows, raw result)
# --------------------------------------------------------------------------------------------------------------------


def colour(quick: bool) -> tuple[list[Figure], dict]:
    result = bench_color.run(quick=quick)
    rows = [
        figure(
            "ciede2000_speedup_vs_skimage",
            result["ours_float32_uint8_ratio"],
            "x",
            at_least=5,
            detail=f"256x256 pairs, 1 thread, CPU time: ours {result['ours_float32_uint8_pairs_per_s']:.0f} "
            f"vs skimage {result['skimage_pairs_per_s']:.0f} pairs/s",
        )
    ]
    if "cuda_device" in result:
        rows.append(
            figure(
                "ciede2000_speedup_vs_skimage",
                result["ours_cuda_ratio_vs_skimage_one_thread"],
                "x",
                variant="cuda",
                detail=f"{result['cuda_device']}, batches of 64: {result['ours_cuda_float32_pairs_per_s']:.0f} "
                f"pairs/s vs skimage on 1 CPU thread",
            )
        )
    return rows, result


def build_efficiency(quick: bool) -> tuple[list[Figure], dict]:
    result = bench_build.efficiency(quick=quick)
    rows = [
        figure(
            "build_efficiency",
            result[codec]["efficiency"],
            "x",
            variant=codec,
            at_least=0.8,
            detail=f"paper VQ-VAE-2, LR 256, batch 8, 1 actor x 1 thread: build "
            f"{result[codec]['build_pairs_per_s']:.2f} vs forward {result['forward_pairs_per_s']:.2f} pairs/s",
        )
        for codec in ("png", "zst")
    ]
    return rows, result


def stream(quick: bool) -> tuple[list[Figure], dict]:
    result = bench_stream.run(quick=quick)
    rows = []
    for codec in ("png", "zst"):
        name = f"stream_{codec}_ppp16"
        rows.append(
            figure(
                "stream_speedup_vs_png_folder",
                result[f"speedup_{name}"],
                "x",
                variant=f"{codec} shards",
                at_least=5,
                detail=f"patch 64, 16 patches per pair, 1 thread, vs BasicSR-style folders "
                f"{result['basicsr_folders_patches_per_core_s']:.0f}/s",
            )
        )
        rows.append(
            figure(
                "stream_patches_per_core_s",
                result[f"{name}_patches_per_core_s"],
                "patches/s",
                variant=f"{codec} shards",
                at_least=1000,
                detail="patch 64, 16 patches per pair, per CPU second of one thread",
            )
        )
    checked = (
        result["stream_zst_ppp16_patches_per_core_s"]
        / result["stream_zst_ppp16_no_manifests_patches_per_core_s"]
    )
    rows.append(
        figure(
            "stream_checked_vs_unchecked",
            round(checked, 2),
            "x",
            variant="zst shards",
            at_least=0.9,
            detail="patch 64, 16 patches per pair: every payload's sha256 checked against its manifest, vs no manifests",
        )
    )
    return rows, result


def ray_scaling(quick: bool) -> tuple[list[Figure], dict]:
    result = bench_build.ray_scaling(quick=quick)
    detail = (
        f"paper VQ-VAE-2, 1024 crops, png, 1 thread per actor: {result['two_actors_pairs_per_s']:.2f} vs "
        f"{result['one_actor_pairs_per_s']:.2f} pairs/s"
    )
    return [figure("ray_scaling_2_vs_1", result["ratio"], "x", at_least=1.6, detail=detail)], result


def codecs(quick: bool) -> tuple[list[Figure], dict]:
    # Always at the build's sizes (1024 HR + 256 LR per pair): the figures are only comparable there, and a run
    # takes a few seconds.
    result = bench_codecs.run(quick=False)
    rows = []
    labels = {
        "png1": "png, ours, level 1",
        "pillow_png1": "png, Pillow, level 1",
        "pillow_png6": "png, Pillow, level 6",
        "zst": "zst",
    }
    for variant, label in labels.items():
        values = result[variant]
        rows.append(figure("codecs_encode_ms", values["encode_ms_per_pair"], "ms", variant=label))
        rows.append(figure("codecs_decode_ms", values["decode_ms_per_pair"], "ms", variant=label))
        rows.append(
            figure(
                "codecs_bytes_per_pair",
                values["bytes_per_pair"],
                "bytes",
                variant=label,
                detail=f"{values['ratio_to_raw']:.2f} of raw; 1024 HR + 256 LR, retina photo",
            )
        )
    return rows, result


def peak_memory(quick: bool) -> tuple[list[Figure], dict]:
    result = bench_build.peak_memory(quick=quick)
    detail = (
        f"process tree, bicubic, crop 128, 1 actor: {result['peak_mib_1000']:.0f} vs "
        f"{result['peak_mib_100']:.0f} MiB"
    )
    return [figure("peak_memory_100_vs_1000", result["ratio"], "x", at_most=1.1, detail=detail)], result


def degrader_rows(result: dict) -> list[Figure]:
    """The classical degraders' rows of a `bench_degraders.run` result: each against the per-image numpy reference
    (issue 18: >= 5x) and against bicubic, the I/O floor (>= 0.8), then the pairs/s behind them."""
    size, floor = result["hr_size"], result["bicubic_pairs_per_core_s"]
    rows = []
    for name in ("realesrgan", "bsrgan"):
        pairs, numpy_pairs = result[f"{name}_pairs_per_core_s"], result[f"{name}_numpy_pairs_per_core_s"]
        rows.append(
            figure(
                "classical_vs_numpy_reference",
                result[f"{name}_vs_numpy"],
                "x",
                variant=name,
                at_least=5,
                detail=f"{size}² HR, 1 thread, CPU time, same draws: {pairs:.2f} vs {numpy_pairs:.2f} pairs/s",
            )
        )
        rows.append(
            figure(
                "classical_vs_bicubic",
                result[f"{name}_vs_bicubic"],
                "x",
                variant=name,
                at_least=0.8,
                detail=f"{size}² HR, 1 thread, CPU time: {pairs:.2f} vs bicubic {floor:.1f} pairs/s",
            )
        )
    return rows


def degraders(quick: bool) -> tuple[list[Figure], dict]:
    # Always the 16 pairs (~70 s on 2 shared cores): a pair's cost varies several-fold with its draws, so 4 pairs
    # are another mix whose ratios are not comparable (here 4.1x / 3.7x for 4 pairs, 5.5x / 5.9x for the 16).
    result = bench_degraders.run(quick=False)
    return degrader_rows(result), result


def gpu_sections(quick: bool) -> tuple[list[Figure], dict]:
    from benchmarks import bench_gpu

    return bench_gpu.figures(quick=quick)


SECTIONS: dict[str, Callable[[bool], tuple[list[Figure], dict]]] = {
    "colour": colour,
    "codecs": codecs,
    "stream": stream,
    "build_efficiency": build_efficiency,
    "ray_scaling": ray_scaling,
    "peak_memory": peak_memory,
    # Last: it tunes this process's allocator as a CPU build worker does (factory.color.tune_cpu_allocator), which
    # would otherwise carry over into the in-process sections after it.
    "degraders": degraders,
}
GPU_SECTIONS = {"gpu": gpu_sections}
# These share one embedded Ray, started once and kept out of their figures.
RAY_SECTIONS = ("build_efficiency", "ray_scaling")


# --------------------------------------------------------------------------------------------------------------------
# The machine, the table
# --------------------------------------------------------------------------------------------------------------------


def machine() -> dict:
    import numpy
    import pyarrow
    import ray
    import skimage
    import torch

    model = "unknown"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or model
    memory = None
    try:
        with open("/proc/meminfo") as meminfo:
            kib = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal"))
            memory = round(kib / 2**20, 1)
    except (OSError, StopIteration):
        pass
    device = "CPU only (no GPU)"
    if torch.cuda.is_available():
        device = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return {
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": model,
        "memory_gib": memory,
        "device": device,
        "load_average_before": [round(value, 2) for value in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "skimage": skimage.__version__,
        "ray": ray.__version__,
        "pyarrow": pyarrow.__version__,
    }


def format_header(described: dict) -> str:
    versions = ", ".join(
        f"{name} {described[name]}" for name in ("python", "torch", "numpy", "skimage", "ray", "pyarrow")
    )
    lines = [
        f"machine: {described['cores']} cores ({described['usable_cores']} usable), {described['cpu_model']}, "
        f"{described['memory_gib']} GiB; device: {described['device']}",
        f"versions: {versions}",
        f"load average (1, 5, 15 min) before: {described['load_average_before']}"
        + (f", after: {described['load_average_after']}" if "load_average_after" in described else ""),
    ]
    return "\n".join(lines)


def format_table(rows: list[Figure]) -> str:
    """A Markdown table (it goes into the README as printed)."""
    lines = ["| figure | measured | target | holds | detail |", "|---|---|---|---|---|"]
    for row in rows:
        name = f"{row.name} ({row.variant})" if row.variant else row.name
        if row.measured is None:
            measured = "failed"
        elif row.unit == "x":
            measured = f"{row.measured:.2f}x"
        elif abs(row.measured) >= 1000:
            measured = f"{row.measured:,.0f} {row.unit}"
        else:
            measured = f"{row.measured:.3g} {row.unit}"
        holds = "" if row.holds is None else ("yes" if row.holds else "no")
        lines.append(f"| {name} | {measured} | {row.target} | {holds} | {row.detail} |")
    return "\n".join(lines)


def run_sections(names: list[str], quick: bool) -> tuple[list[Figure], dict, dict]:
    """Run the sections in order; a section that fails becomes one 'failed' row (the others still run)."""
    rows: list[Figure] = []
    raw: dict = {}
    seconds: dict = {}
    ray_module = None
    for name in names:
        section = {**SECTIONS, **GPU_SECTIONS}[name]
        if name in RAY_SECTIONS and ray_module is None:
            # Started once for both Ray sections and kept out of their figures (they report its start-up time).
            ray_module, ray_seconds, _ = bench_build._ray_session()
            raw["ray_start_seconds"] = round(ray_seconds, 2)
        if name not in RAY_SECTIONS and ray_module is not None:
            ray_module.shutdown()  # the next sections start their own processes; leave them the cores
            ray_module = None
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        try:
            section_rows, raw[name] = section(quick)
        except Exception as error:  # one broken section must not cost the other figures of a long run
            traceback.print_exc()
            section_rows = [Figure(name, "", None, "", "", None, f"{type(error).__name__}: {error}")]
            raw[name] = {"error": f"{type(error).__name__}: {error}"}
        seconds[name] = round(time.perf_counter() - started, 1)
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {seconds[name]} s", file=sys.stderr, flush=True)
        rows.extend(section_rows)
    if ray_module is not None:
        ray_module.shutdown()
    return rows, raw, seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="fewer pairs and repeats (under 10 min on 2 cores)"
    )
    parser.add_argument(
        "--json", dest="json_path", default=None, help="also write every raw figure to this file"
    )
    parser.add_argument(
        "--only", nargs="+", default=None, choices=[*SECTIONS, *GPU_SECTIONS], help="run these sections only"
    )
    parser.add_argument("--gpu", action="store_true", help="add the GPU sections (bench_gpu; needs CUDA)")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    names = arguments.only or [*SECTIONS, *(GPU_SECTIONS if arguments.gpu else ())]
    described = machine()
    started = time.perf_counter()
    rows, raw, seconds = run_sections(names, arguments.quick)
    described["load_average_after"] = [round(value, 2) for value in os.getloadavg()]
    total = time.perf_counter() - started
    print(format_header(described))
    print(f"command: python -m benchmarks {' '.join(sys.argv[1:] if argv is None else argv)}".rstrip())
    print(f"total: {total:.0f} s ({', '.join(f'{name} {value:.0f} s' for name, value in seconds.items())})")
    print()
    print(format_table(rows))
    if arguments.json_path:
        payload = {
            "machine": described,
            "quick": arguments.quick,
            "seconds": seconds,
            "figures": [asdict(row) for row in rows],
            "raw": raw,
        }
        with open(arguments.json_path, "w") as file:
            json.dump(payload, file, indent=2, default=str)
