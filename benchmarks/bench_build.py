"""Throughput and peak memory of `factory build`, measured on this machine (never asserted in tests).

    python benchmarks/bench_build.py default       # the README's command on a fresh folder (training included)
    python benchmarks/bench_build.py paper1024     # the `paper` VQ-VAE-2 over 20 crops of 1024x1024

`default` runs `factory build --model vqvae2 --epoch 8 --out shards/` in an empty folder, so the checkpoint is trained
first, exactly as on a fresh clone. `paper1024` upscales scikit-image's retina photo 2x (2822x2822, bicubic) and
builds 20 crops of 1024 (LR 256x256, the paper's setting) with a `paper`-preset VQ-VAE-2 checkpoint; its weights are
a seeded random initialisation, because throughput and memory do not depend on the weights and training the paper
model to epoch 8 does not fit a CPU benchmark. Peak memory is the largest total RSS of the whole process tree
(driver, Ray processes and actors), sampled every 0.2 s.

The figures of `python -m benchmarks` live here too (`efficiency`, `ray_scaling`, `peak_memory`); see their docstrings
for what each includes.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PAPER_CROP = 1024  # the paper's HR crop; LR 256x256 at scale 4 (Section 4.1)
PAPER_HR_SIDE = 2822  # retina (1411 px) upscaled 2x: 5 x 5 = 25 crops of 1024 on the default grid


def tree_rss(root: int) -> int:
    """Total resident memory in bytes of process `root` and all its descendants (Linux /proc)."""
    parents, rss = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as status:
                fields = dict(line.split(":", 1) for line in status if ":" in line)
        except OSError:
            continue
        parents[int(entry)] = int(fields["PPid"])
        rss[int(entry)] = int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier.extend(children)
    return sum(rss.get(pid, 0) for pid in tree)


def run_measured(command: list[str], cwd: Path, quiet: bool = False) -> tuple[float, int, int]:
    """Run `command`; returns (wall seconds, peak RSS of the process tree in bytes, exit status)."""
    started = time.perf_counter()
    output = subprocess.DEVNULL if quiet else None
    process = subprocess.Popen(command, cwd=cwd, stdout=output, stderr=output)
    peak = 0
    while process.poll() is None:
        peak = max(peak, tree_rss(process.pid))
        time.sleep(0.2)
    return time.perf_counter() - started, peak, process.returncode


def report(folder: Path, dataset: str, seconds: float, peak: int, status: int) -> None:
    card = json.loads((folder / "manifests" / dataset / "_card.json").read_text())
    pairs = card["counts"]["pairs"]
    print(
        json.dumps(
            {
                "dataset": dataset,
                "exit_status": status,
                "wall_seconds": round(seconds, 1),
                "pairs": pairs,
                "pairs_per_second_overall": round(pairs / seconds, 2),
                "peak_rss_mib": round(peak / 2**20),
                "delta_e_mean": card["delta_e"]["mean"],
                "psnr_mean": card["psnr"]["mean"],
                "ssim_mean": card["ssim"]["mean"],
            },
            indent=2,
        )
    )


def default(folder: Path) -> None:
    seconds, peak, status = run_measured(
        ["factory", "build", "--model", "vqvae2", "--epoch", "8", "--out", "shards/"], folder
    )
    report(folder, "vqvae2-ep8", seconds, peak, status)


def write_paper_inputs(folder: Path, images: int = 1, preset: str = "paper") -> tuple[Path, Path]:
    """`images` HR photos for 1024 crops (bundled photos upscaled to 2822 px, bicubic: 25 crops each) and a `preset` VQ-VAE-2 checkpoint at epoch 8 with seeded random weights (throughput and memory do not depend on
    the weights). Returns (HR folder, checkpoint root)."""
    import skimage.data
    import torch
    from PIL import Image

    from factory.checkpoints import checkpoint_path, save_checkpoint
    from factory.models import build_model, make_config

    hr = folder / "hr"
    hr.mkdir(parents=True, exist_ok=True)
    loaders = (skimage.data.retina, skimage.data.astronaut, skimage.data.coffee, skimage.data.chelsea)
    for index in range(images):
        loader = loaders[index % len(loaders)]
        photo = Image.fromarray(loader()[..., :3])
        side = PAPER_HR_SIDE - 2 * (index // len(loaders))  # another size: another image, not a copy
        # compress_level 1: these inputs are written in seconds; their decode cost is a real PNG's.
        photo.resize((side, side), Image.Resampling.BICUBIC).save(
            hr / f"{index:02d}_{loader.__name__}.png", compress_level=1
        )
    torch.manual_seed(0)
    config = make_config("vqvae2", preset)
    checkpoints = folder / "checkpoints"
    save_checkpoint(
        checkpoint_path(checkpoints, "vqvae2", 8),
        model_name="vqvae2",
        preset=preset,
        config=config,
        model=build_model("vqvae2", config=config),
        epoch=8,
        steps=0,
        data_fingerprint="random-init",
        seed=0,
    )
    return hr, checkpoints


def paper1024(folder: Path) -> None:
    write_paper_inputs(folder)
    command = [
        "factory",
        "build",
        "--hr",
        "hr",
        "--model",
        "vqvae2",
        "--epoch",
        "8",
        "--crop",
        "1024",
        "--limit",
        "20",
    ]
    command += ["--batch-size", "4", "--shard-size", "10", "--no-train", "--out", "shards/"]
    seconds, peak, status = run_measured(command, folder)
    report(folder, "vqvae2-ep8", seconds, peak, status)


# --------------------------------------------------------------------------------------------------------------------
# Figures of `python -m benchmarks` (each returns a plain dict; the suite turns it into table rows)
# --------------------------------------------------------------------------------------------------------------------


def _ray_session(num_cpus: int | None = None):
    """An embedded Ray for several builds (None when one is already up): its start-up, 2-3 s here, is paid once
    and kept out of every build's figure. Returns (ray module, start-up seconds, whether we started it)."""
    import ray

    if ray.is_initialized():
        return ray, 0.0, False
    started = time.perf_counter()
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
    return ray, time.perf_counter() - started, True


def _build(folder: Path, hr: Path, checkpoints: Path, name: str, **options):
    """`factory build` in this process (the same `factory.build.build` the CLI calls), into `folder`."""
    from factory.build import BuildConfig, build

    options = {"crop": PAPER_CROP, **options}
    config = BuildConfig(
        hr=(str(hr),),
        model="vqvae2",
        epoch=8,
        checkpoints=str(checkpoints),
        train_missing=False,
        out=str(folder / "shards"),
        manifests=str(folder / "manifests"),
        name=name,
        progress=False,
        **options,
    )
    return build(config)


def lr_batch(hr: Path, batch: int, crop: int = PAPER_CROP, scale: int = 4):
    """`batch` crops of the build's grid over the first HR photo, as the worker feeds the model:
    x = quantize(bicubic(y)) / 255, (batch, 3, crop / scale, crop / scale) float32."""
    import numpy as np
    import torch
    from PIL import Image

    from factory.color import downsample, quantize

    image = np.asarray(Image.open(sorted(hr.iterdir())[0]).convert("RGB"))
    steps = range(0, image.shape[0] - crop + 1, crop // 2)
    grid = [(top, left) for top in steps for left in steps]
    boxes = [grid[index % len(grid)] for index in range(batch)]  # repeated when the photo has fewer crops
    y8 = torch.from_numpy(np.stack([image[t : t + crop, s : s + crop] for t, s in boxes])).permute(0, 3, 1, 2)
    return quantize(downsample(y8.float() / 255.0, scale)).float() / 255.0


def forward_pairs_per_second(
    checkpoint: Path, x, repeats: int, device: str = "cpu", bf16: bool = False
) -> float:
    """Pairs/s of the reconstructor's forward pass alone, called as the worker calls it (loaded with
    `load_reconstructor`, inference mode, a seeded generator, `.float().clamp(0, 1)`): median over `repeats` batches
    after one warm-up batch. x: (B, 3, h, w) in [0, 1]."""
    import torch

    from factory.checkpoints import load_reconstructor

    model = load_reconstructor(checkpoint, model_name="vqvae2", device=device).model
    x = x.to(device)
    times = []
    with (
        torch.inference_mode(),
        torch.autocast(device, dtype=torch.bfloat16, enabled=bf16 and device == "cuda"),
    ):
        for _ in range(repeats + 1):
            generator = torch.Generator(device=device).manual_seed(0)
            started = time.perf_counter()
            model.reconstruct(x, generator=generator).float().clamp(0, 1).cpu()
            times.append(time.perf_counter() - started)
    return x.shape[0] / statistics.median(times[1:])


def efficiency(quick: bool = False, codecs: tuple[str, ...] = ("png", "zst")) -> dict:
    """build_efficiency: `factory build`'s pairs/s over the forward pass's pairs/s alone (1.0 = every other cost
    hidden), `paper` VQ-VAE-2, 1024 crops (LR 256x256), batch 8 (the build's default), one shard, CPU.

    One worker actor with one torch thread, on the embedded Ray of this machine; the forward pass alone runs here
    with one torch thread too. The worker's other cores are free for what the build does beside the model (its
    payload encoders), as a GPU node's CPUs are. End-to-end = pairs / the pool's busy time (first shard started to
    last shard committed, on the worker): it includes source decoding, crop, bicubic, the model, ΔE, PSNR/SSIM,
    encoding, hashing, tar and manifest writes and the driver's scheduling between shards; it excludes Ray start-up,
    the actor's start and checkpoint load, planning and the dataset card (reported beside: `build_wall_pairs_per_s`,
    the whole `build()` call with actor start-up and checkpoint load, Ray already up). Rounds interleave the two
    measurements (the machine may be shared); the figure is the median of the per-round ratios."""
    import torch

    from factory.checkpoints import checkpoint_path

    # One shard of 12 batches: the worker overlaps batches within a shard, and only the first batch's decoding and
    # the last one's finishing stay exposed (a real build's 1,000-pair shards amortise both; with 6 batches they
    # cost ~0.05 of the figure: measured 0.78-0.81 at 48 crops against 0.83-0.93 at 96). --quick: fewer rounds.
    crops, rounds, forward_batches = (96, 3, 3) if quick else (96, 5, 5)
    batch = 8
    threads = torch.get_num_threads()
    ray, ray_seconds, started_ray = _ray_session()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-efficiency-") as temporary:
            folder = Path(temporary)
            hr, checkpoints = write_paper_inputs(folder, images=-(-crops // 25))  # 25 crops per photo
            checkpoint = checkpoint_path(checkpoints, "vqvae2", 8)
            x = lr_batch(hr, batch)
            torch.set_num_threads(1)
            forward: list[float] = []
            builds: dict[str, list[float]] = {codec: [] for codec in codecs}
            walls: dict[str, list[float]] = {codec: [] for codec in codecs}
            ratios: dict[str, list[float]] = {codec: [] for codec in codecs}
            for round_index in range(rounds):
                forward.append(forward_pairs_per_second(checkpoint, x, forward_batches))
                for codec in codecs:
                    started = time.perf_counter()
                    result = _build(
                        folder,
                        hr,
                        checkpoints,
                        f"eff-{codec}-{round_index}",
                        limit=crops,
                        codec=codec,
                        batch_size=batch,
                        shard_size=crops,
                        actors=1,
                        threads=1,
                        device="cpu",
                    )
                    walls[codec].append(result.pairs / (time.perf_counter() - started))
                    builds[codec].append(result.pairs / result.busy_seconds)
                    ratios[codec].append(builds[codec][-1] / forward[-1])
    finally:
        torch.set_num_threads(threads)
        if started_ray:
            ray.shutdown()
    results: dict = {
        "model": "vqvae2 paper",
        "crop": PAPER_CROP,
        "lr_size": PAPER_CROP // 4,
        "batch": batch,
        "crops_per_build": crops,
        "rounds": rounds,
        "worker": "1 Ray actor, 1 torch thread, CPU",
        "ray_start_seconds": round(ray_seconds, 2),
        "forward_pairs_per_s": round(statistics.median(forward), 3),
    }
    for codec in codecs:
        results[codec] = {
            "efficiency": round(statistics.median(ratios[codec]), 3),
            "build_pairs_per_s": round(statistics.median(builds[codec]), 3),
            "build_wall_pairs_per_s": round(statistics.median(walls[codec]), 3),
        }
    return results


def ray_scaling(quick: bool = False) -> dict:
    """ray_scaling_2_vs_1: build pairs/s with two worker actors over one, each with one torch thread (a fair split of
    this machine's 2 cores), the `paper` VQ-VAE-2 at 1024 crops, batch 8, png, shards of 8 crops (2+ per actor).
    Pairs/s over the pool's busy time (see `efficiency`); Ray is started once, before. Median of per-round ratios."""
    crops, rounds = (32, 3) if quick else (48, 5)
    ray, ray_seconds, started_ray = _ray_session()
    rates: dict[int, list[float]] = {1: [], 2: []}
    ratios = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-scaling-") as temporary:
            folder = Path(temporary)
            hr, checkpoints = write_paper_inputs(folder, images=2)
            for round_index in range(rounds):
                for actors in (1, 2):
                    result = _build(
                        folder,
                        hr,
                        checkpoints,
                        f"scale-{actors}-{round_index}",
                        limit=crops,
                        codec="png",
                        batch_size=8,
                        shard_size=8,
                        actors=actors,
                        threads=1,
                        device="cpu",
                    )
                    rates[actors].append(result.pairs / result.busy_seconds)
                ratios.append(rates[2][-1] / rates[1][-1])
    finally:
        if started_ray:
            ray.shutdown()
    return {
        "model": "vqvae2 paper",
        "crops": crops,
        "rounds": rounds,
        "ray_start_seconds": round(ray_seconds, 2),
        "one_actor_pairs_per_s": round(statistics.median(rates[1]), 3),
        "two_actors_pairs_per_s": round(statistics.median(rates[2]), 3),
        "ratio": round(statistics.median(ratios), 3),
    }


def write_small_photos(folder: Path, side: int = 2048) -> Path:
    """Four bundled photos upscaled to side x side PNGs: 4 x (side / 128)^2 = 1,024 crops of 128 at stride 128."""
    import skimage.data
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for loader in (skimage.data.retina, skimage.data.astronaut, skimage.data.coffee, skimage.data.chelsea):
        photo = Image.fromarray(loader()[..., :3])
        photo.resize((side, side), Image.Resampling.BICUBIC).save(folder / f"{loader.__name__}.png")
    return folder


def peak_memory(quick: bool = False, counts: tuple[int, ...] = (100, 1000)) -> dict:
    """peak_memory_100_vs_1000: peak RSS of the whole `factory build` process tree (driver, Ray's processes, the
    actor) at 100 and at 1,000 pairs: `--model bicubic --crop 128 --stride 128`, one actor, one shard (the default
    1,000 pairs per shard, so a shard's rows are what could grow). A subprocess per build, Ray start-up included
    (peak memory is the whole command's); median over repeats."""
    repeats = 2 if quick else 3
    peaks: dict[int, list[int]] = {count: [] for count in counts}
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as temporary:
        folder = Path(temporary)
        hr = write_small_photos(folder / "hr")
        for repeat in range(repeats):
            for count in counts:
                name = f"mem-{count}-{repeat}"
                command = ["factory", "build", "--hr", str(hr), "--model", "bicubic", "--crop", "128"]
                command += ["--stride", "128", "--limit", str(count), "--actors", "1", "--name", name]
                command += ["--out", "shards", "--manifests", "manifests", "--no-progress"]
                _, peak, status = run_measured(command, folder, quiet=True)
                if status != 0:
                    raise RuntimeError(f"{' '.join(command)} exited with {status}")
                peaks[count].append(peak)
    medians = {count: statistics.median(values) for count, values in peaks.items()}
    first, last = counts[0], counts[-1]
    return {
        "repeats": repeats,
        **{f"peak_mib_{count}": round(medians[count] / 2**20, 1) for count in counts},
        "ratio": round(medians[last] / medians[first], 3),
    }


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "default"
    with tempfile.TemporaryDirectory(prefix=f"bench-build-{which}-") as temporary:
        {"default": default, "paper1024": paper1024}[which](Path(temporary))
