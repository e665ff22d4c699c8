"""Throughput and peak memory of `factory build`, measured on this machine (never asserted in tests).

    python benchmarks/bench_build.py default       # the README's command on a fresh folder (training included)
    python benchmarks/bench_build.py paper1024     # the `paper` VQ-VAE-2 over 20 crops of 1024x1024

`default` runs `factory build --model vqvae2 --epoch 8 --out shards/` in an empty folder, so the checkpoint is trained
first, exactly as on a fresh clone. `paper1024` upscales scikit-image's retina photo 2x (2822x2822, bicubic) and
builds 20 crops of 1024 (LR 256x256, the paper's setting) with a `paper`-preset VQ-VAE-2 checkpoint; its weights are
a seeded random initialisation, because throughput and memory do not depend on the weights and training the paper
model to epoch 8 does not fit a CPU benchmark. Peak memory is the largest total RSS of the whole process tree
(driver, Ray processes and actors), sampled every 0.2 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


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


def run_measured(command: list[str], cwd: Path) -> tuple[float, int, int]:
    """Run `command`; returns (wall seconds, peak RSS of the process tree in bytes, exit status)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd)
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


def paper1024(folder: Path) -> None:
    import skimage.data
    import torch
    from PIL import Image

    from factory.checkpoints import checkpoint_path, save_checkpoint
    from factory.models import build_model, make_config

    (folder / "hr").mkdir()
    retina = Image.fromarray(skimage.data.retina()[..., :3])
    retina.resize((2822, 2822), Image.Resampling.BICUBIC).save(folder / "hr" / "retina_x2.png")
    torch.manual_seed(0)
    config = make_config("vqvae2", "paper")
    save_checkpoint(
        checkpoint_path(folder / "checkpoints", "vqvae2", 8),
        model_name="vqvae2",
        preset="paper",
        config=config,
        model=build_model("vqvae2", config=config),
        epoch=8,
        steps=0,
        data_fingerprint="random-init",
        seed=0,
    )
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


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "default"
    with tempfile.TemporaryDirectory(prefix=f"bench-build-{which}-") as temporary:
        {"default": default, "paper1024": paper1024}[which](Path(temporary))
