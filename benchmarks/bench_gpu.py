"""GPU figures: build pairs/s per GPU (the `paper` VQ-VAE-2, 1024 crops, bf16) and the streaming consumer feeding
a HAT fine-tune step (GPU busy fraction). `benchmarks/gpu.sh` runs them on a lent GPU machine, through
`python -m benchmarks --only colour gpu` (the colour section adds its CUDA row there).

    python -m benchmarks.bench_gpu                  # on a GPU
    python -m benchmarks.bench_gpu --device cpu     # a smoke run of the same code on the CPU (tiny sizes)

Build: `factory build` in this process on the embedded Ray (one actor per GPU, the node's CPUs shared out among
them), png and zst, against the forward pass alone on the same GPU, batch and precision; pairs/s over the pool's
busy time (see bench_build.efficiency), divided by the GPU count = per GPU.
Fine-tune: `factory.finetune.finetune` (HAT `paper` shape, random weights, L1, bf16 autocast, batch 16 of 64x64 LR
patches, DataLoader workers) on the png dataset just built, against the same step on tensors already on the GPU:
busy fraction = steady fine-tune patches/s (its log windows after the first) / step-alone patches/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import bench_build


def build_per_gpu(folder: Path, quick: bool, device: str) -> dict:
    """Build pairs/s per GPU for both codecs and the forward pass alone (see the module docstring)."""
    from factory.checkpoints import checkpoint_path

    on_gpu = device == "cuda"
    # The CPU smoke keeps the code path and shrinks the work: tiny preset, 256 crops, a few pairs.
    preset, crop = ("paper", bench_build.PAPER_CROP) if on_gpu else ("tiny", 256)
    crops = (192 if quick else 384) if on_gpu else 16
    batch = 32 if on_gpu else 4
    # 25 crops of 1024 per photo; shards of crops / 2 hold several batches, which the worker overlaps.
    images = -(-crops // 25)
    hr, checkpoints = bench_build.write_paper_inputs(folder, images=images, preset=preset)
    x = bench_build.lr_batch(hr, batch, crop=crop)
    forward = bench_build.forward_pairs_per_second(
        checkpoint_path(checkpoints, "vqvae2", 8), x, repeats=10 if on_gpu else 2, device=device, bf16=True
    )
    gpus = max(1, torch.cuda.device_count()) if on_gpu else 1
    results: dict = {"preset": preset, "crop": crop, "batch": batch, "crops": crops, "gpus": gpus}
    results["forward_pairs_per_s_per_gpu"] = round(forward, 2)
    ray, ray_seconds, started = bench_build._ray_session()
    try:
        results["ray_start_seconds"] = round(ray_seconds, 2)
        for codec in ("png", "zst"):
            started_build = time.perf_counter()
            result = bench_build._build(
                folder,
                hr,
                checkpoints,
                f"gpu-{codec}",
                crop=crop,
                limit=crops,
                codec=codec,
                batch_size=batch,
                shard_size=crops // 2,
                device=device,
                bf16=True,
                actors=None if on_gpu else 1,
            )
            per_gpu = result.pairs / result.busy_seconds / gpus
            results[codec] = {
                "build_pairs_per_s_per_gpu": round(per_gpu, 2),
                "build_wall_pairs_per_s": round(result.pairs / (time.perf_counter() - started_build), 2),
                "efficiency": round(per_gpu / forward, 3),
                "shards": str(folder / "shards" / f"gpu-{codec}"),
            }
    finally:
        if started:
            ray.shutdown()
    return results


def finetune_busy(folder: Path, shards: str, quick: bool, device: str) -> dict:
    """GPU busy fraction of `factory finetune` fed by the streaming consumer (see the module docstring)."""
    import torch.nn.functional as F

    from factory.finetune import FinetuneConfig, finetune
    from factory.sr.networks import build_network

    on_gpu = device == "cuda"
    preset, batch, patch = ("paper", 16, 64) if on_gpu else ("tiny", 4, 16)
    iterations = (90 if quick else 240) if on_gpu else 6
    log_every = iterations // 3
    # The step alone: the same network, loss, optimiser and autocast on tensors already on the device.
    torch.manual_seed(0)
    network = build_network("hat", preset)
    module = network.module.to(device).train()
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-4, betas=(0.9, 0.99))
    lr = torch.rand(batch, 3, patch, patch, device=device)
    hr = torch.rand(batch, 3, patch * network.scale, patch * network.scale, device=device)
    times = []
    for _ in range(12 if on_gpu else 3):
        started = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=on_gpu):
            loss = F.l1_loss(module(lr).float(), hr)
        loss.item()  # finetune() reads the loss every step too (a sync)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if on_gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    step_rate = batch / statistics.median(times[2:])
    del module, optimizer
    config = FinetuneConfig(
        architecture="hat",
        preset=preset,
        shards=(shards,),
        iterations=iterations,
        batch_size=batch,
        patch_size=patch,
        workers=min(8, max(1, (os.cpu_count() or 2) - 2)) if on_gpu else 0,
        log_every=log_every,
        checkpoint_every=iterations,
        resume=False,
        out=str(folder / "finetune"),
    )
    result = finetune(config)
    steady = statistics.median(line["patches_per_second"] for line in result.history[1:])
    return {
        "preset": preset,
        "batch": batch,
        "patch": patch,
        "iterations": iterations,
        "workers": config.workers,
        "step_alone_patches_per_s": round(step_rate, 1),
        "finetune_patches_per_s": round(steady, 1),
        "busy_fraction": round(steady / step_rate, 3),
    }


def run(quick: bool = False, device: str | None = None) -> dict:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as temporary:
        folder = Path(temporary)
        build = build_per_gpu(folder, quick, device)
        busy = finetune_busy(folder, build["png"]["shards"], quick, device)
    return {"device": device, "build": build, "finetune": busy}


def figures(quick: bool = False, device: str | None = None):
    """Rows for `python -m benchmarks --gpu` (targets: none are set for the GPU yet; the figures are recorded)."""
    from benchmarks.suite import figure

    result = run(quick=quick, device=device)
    build, busy = result["build"], result["finetune"]
    rows = []
    for codec in ("png", "zst"):
        rows.append(
            figure(
                "gpu_build_pairs_per_s_per_gpu",
                build[codec]["build_pairs_per_s_per_gpu"],
                "pairs/s",
                variant=f"{codec}, {result['device']}",
                detail=f"{build['preset']} VQ-VAE-2, crop {build['crop']}, batch {build['batch']}, bf16; forward "
                f"alone {build['forward_pairs_per_s_per_gpu']:.0f}/s (efficiency {build[codec]['efficiency']:.2f})",
            )
        )
    rows.append(
        figure(
            "gpu_finetune_busy_fraction",
            busy["busy_fraction"],
            "x",
            variant=f"HAT {busy['preset']}, {result['device']}",
            detail=f"batch {busy['batch']} x {busy['patch']}px, {busy['workers']} loader workers: "
            f"{busy['finetune_patches_per_s']:.0f} vs step alone {busy['step_alone_patches_per_s']:.0f} patches/s",
        )
    )
    return rows, result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer pairs and steps")
    parser.add_argument("--device", default=None, help="cuda (default when present) or cpu (a smoke run)")
    arguments = parser.parse_args()
    print(json.dumps(run(quick=arguments.quick, device=arguments.device), indent=2))
