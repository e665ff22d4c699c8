"""Training-patch throughput per core: PairedPatches on shards against a BasicSR-style paired-folder loader.

    python -m benchmarks.bench_stream            (python -m benchmarks.bench_stream --quick for a short run)

The same pairs both ways: 480x480 HR sub-images (the size BasicSR cuts DIV2K into for training) of real photos and
their bicubic x4 LR (120x120). The baseline is BasicSR's PairedImageDataset as it works on folders of PNGs: for
every patch, decode the HR and the LR file, random-crop 64 / 256, flip / rotate, convert both to float tensors.
PairedPatches reads the same pairs from tar shards (png and zst codecs) and cuts `patches_per_pair` crops from
each decoded pair. One process, one torch thread, no DataLoader workers: patches/s of one core. The shards have
manifests, as a build writes them: with them the consumer checks each payload against its sha256 as it reads it
(`stream_zst_ppp16` and the rest); `stream_zst_ppp16_no_manifests` reads the same shards without that check.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from factory.color import downsample
from factory.manifests import write_manifest
from factory.shards import encode_image, payload_extension
from factory.storage import Storage
from factory.stream import PairedPatches, crop_patches, to_tensor

HR_SIZE = 480
SCALE = 4
PATCH = 64


def _photos() -> list[np.ndarray]:
    import skimage.data

    loaders = (
        skimage.data.retina,
        skimage.data.hubble_deep_field,
        skimage.data.astronaut,
        skimage.data.rocket,
        skimage.data.coffee,
        skimage.data.immunohistochemistry,
    )
    return [np.ascontiguousarray(loader()[..., :3]) for loader in loaders]


def make_pairs(count: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """`count` (key, HR 480x480, LR 120x120) pairs: 480 sub-images on a grid over the photos (repeated if needed)."""
    subimages = []
    for photo in _photos():
        height, width = photo.shape[:2]
        for top in range(0, height - HR_SIZE + 1, HR_SIZE // 2):
            for left in range(0, width - HR_SIZE + 1, HR_SIZE // 2):
                subimages.append(photo[top : top + HR_SIZE, left : left + HR_SIZE])
    pairs = []
    for index in range(count):
        hr = np.ascontiguousarray(subimages[index % len(subimages)])
        x = torch.from_numpy(hr).permute(2, 0, 1)[None].float() / 255
        lr = (downsample(x, SCALE)[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        pairs.append((f"pair{index:05d}", hr, lr))
    return pairs


def write_folders(pairs, root: Path) -> None:
    """BasicSR layout: <root>/hr/<key>.png and <root>/lr/<key>.png, PNG compression 3 as BasicSR's
    extract_subimages.py writes its DIV2K sub-images."""
    for folder in ("hr", "lr"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for key, hr, lr in pairs:
        Image.fromarray(hr).save(root / "hr" / f"{key}.png", compress_level=3)
        Image.fromarray(lr).save(root / "lr" / f"{key}.png", compress_level=3)


def _row(key: str, shard: str, codec: str, hr: bytes, lr: bytes) -> dict:
    """A manifest row with the payload columns right (what the consumer checks) and placeholders elsewhere."""
    return {
        "key": key,
        "dataset": "bench",
        "model": "bicubic",
        "source": f"{key}.png",
        "source_root": "skimage-data",
        "source_sha256": "0" * 64,
        "crop_top": 0,
        "crop_left": 0,
        "crop_height": HR_SIZE,
        "crop_width": HR_SIZE,
        "scale": SCALE,
        "delta_e": 0.0,
        "delta_e_p95": 0.0,
        "psnr": 100.0,
        "ssim": 1.0,
        "color_corrected": False,
        "shard": shard,
        "codec": codec,
        "hr_bytes": len(hr),
        "lr_bytes": len(lr),
        "hr_sha256": hashlib.sha256(hr).hexdigest(),
        "lr_sha256": hashlib.sha256(lr).hexdigest(),
        "seed": 0,
        "factory_version": "bench",
    }


def write_shards(pairs, root: Path, codec: str, per_shard: int = 16) -> tuple[Path, Path]:
    """Shards `<root>/shards-<codec>/bench/bench-NNNNNN.tar` and their manifests under `<root>/manifests-<codec>`:
    (the dataset's shard folder, the manifest root)."""
    extension = payload_extension(codec)
    folder = root / f"shards-{codec}" / "bench"
    manifests = Storage(root / f"manifests-{codec}")
    folder.mkdir(parents=True)
    for start in range(0, len(pairs), per_shard):
        stem = f"bench-{start // per_shard:06d}"
        rows = []
        with tarfile.open(folder / f"{stem}.tar", "w") as archive:
            for key, hr, lr in pairs[start : start + per_shard]:
                hr_payload, lr_payload = encode_image(hr, codec), encode_image(lr, codec)
                rows.append(_row(key, f"bench/{stem}.tar", codec, hr_payload, lr_payload))
                for name, data in (
                    (f"{key}.hr.{extension}", hr_payload),
                    (f"{key}.lr.{extension}", lr_payload),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
        data = (folder / f"{stem}.tar").read_bytes()
        commit = {
            "shard": f"bench/{stem}.tar",
            "shard_bytes": len(data),
            "shard_sha256": hashlib.sha256(data).hexdigest(),
            "pairs": len(rows),
        }
        write_manifest(manifests, f"bench/{stem}.parquet", rows, commit)
    return folder, root / f"manifests-{codec}"


def _rates(patches: int, wall_start: float, cpu_start: float) -> tuple[float, float]:
    """(patches per CPU second of this process = per core, patches per wall second)."""
    return patches / (time.process_time() - cpu_start), patches / (time.perf_counter() - wall_start)


def basicsr_style(root: Path, keys: list[str], patches: int, seed: int = 0) -> tuple[float, float]:
    """(per-core, wall) patches/s of the baseline: per patch, decode both PNGs, random crop, augment, to tensors."""
    generator = np.random.default_rng(seed)
    start, cpu_start = time.perf_counter(), time.process_time()
    for index in range(patches):
        key = keys[index % len(keys)]
        with Image.open(root / "hr" / f"{key}.png") as image:
            hr = np.asarray(image.convert("RGB"))
        with Image.open(root / "lr" / f"{key}.png") as image:
            lr = np.asarray(image.convert("RGB"))
        (patch,) = crop_patches(
            lr, hr, key, patch_size=PATCH, scale=SCALE, count=1, augment=True, generator=generator
        )
        to_tensor(np.ascontiguousarray(patch.lr)), to_tensor(np.ascontiguousarray(patch.hr))
    return _rates(patches, start, cpu_start)


def paired_patches(
    folder: Path, manifests: Path | None, patches: int, patches_per_pair: int
) -> tuple[float, float]:
    dataset = PairedPatches(
        str(folder),
        manifests=manifests,
        patch_size=PATCH,
        scale=SCALE,
        patches_per_pair=patches_per_pair,
        shuffle=256,
        epoch_length=patches,
        rank=0,
        world_size=1,
    )
    start, cpu_start = time.perf_counter(), time.process_time()
    count = sum(1 for _ in dataset)
    return _rates(count, start, cpu_start)


def run(quick: bool = False) -> dict:
    torch.set_num_threads(1)
    pairs = make_pairs(16 if quick else 64)
    baseline_patches = 64 if quick else 256
    # The shuffle buffer (256 patches) reads ahead once per epoch: epochs several times its size show the steady state.
    stream_patches = {1: 512 if quick else 1024, 16: 1024 if quick else 4096}
    results: dict = {"hr_size": HR_SIZE, "patch_size": PATCH, "pairs": len(pairs)}
    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary)
        write_folders(pairs, root)
        shards = {codec: write_shards(pairs, root, codec) for codec in ("png", "zst")}
        keys = [key for key, _, _ in pairs]
        basicsr_style(root, keys, 8)  # warm the file cache and imports
        rates = {"basicsr_folders": basicsr_style(root, keys, baseline_patches)}
        for codec in ("png", "zst"):
            for per_pair in (1, 16):
                rates[f"stream_{codec}_ppp{per_pair}"] = paired_patches(
                    *shards[codec], stream_patches[per_pair], per_pair
                )
        rates["stream_zst_ppp16_no_manifests"] = paired_patches(
            shards["zst"][0], None, stream_patches[16], 16
        )
    # Per core = per CPU second of this one-thread process: fair on a machine other jobs share; wall rates beside.
    for name, (per_core, wall) in rates.items():
        results[f"{name}_patches_per_core_s"] = round(per_core, 1)
        results[f"{name}_patches_per_wall_s"] = round(wall, 1)
    baseline = rates["basicsr_folders"][0]
    for name in (
        "stream_zst_ppp16",
        "stream_png_ppp16",
        "stream_zst_ppp1",
        "stream_png_ppp1",
        "stream_zst_ppp16_no_manifests",
    ):
        results[f"speedup_{name}"] = round(rates[name][0] / baseline, 2)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer pairs and patches")
    arguments = parser.parse_args()
    print(json.dumps(run(quick=arguments.quick), indent=2))
