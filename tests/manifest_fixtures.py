"""Small datasets on disk for the manifest tests: WebDataset shards plus Parquet manifests in the factory's layout.

Images are crops of scikit-image's bundled photos; the manifest values (delta_e, label, ...) are whatever the test
passes, so the tests can hand-compute what queries and statistics must give.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from factory.corruptions import CORRUPTIONS
from factory.manifests import (
    LABEL_PROB_COLUMNS,
    REJECTS_NAME,
    rows_to_table,
    shard_stem,
    write_manifest,
    write_rejects,
)
from factory.shards import HashingWriter, TarShardWriter, encode_image, payload_extension, row_json
from factory.storage import Storage

HR_SIZE = 32
SCALE = 4


@dataclass(frozen=True)
class PairSpec:
    """What a test decides about one pair; everything else in the row is filled in plausibly."""

    delta_e: float
    label: str | None = None
    label_prob: float | None = None


def _row(dataset: str, model: str, epoch: int | None, index: int, spec: PairSpec) -> dict:
    row = {
        "key": f"{dataset}-{index:06d}",
        "dataset": dataset,
        "model": model,
        "epoch": epoch,
        "preset": None if epoch is None else "tiny",
        "checkpoint_sha256": None
        if epoch is None
        else hashlib.sha256(f"{model}{epoch}".encode()).hexdigest(),
        "source": f"photo_{index % 6}.png",
        "source_root": "skimage-data",
        "source_sha256": hashlib.sha256(str(index % 6).encode()).hexdigest(),
        "crop_top": 8 * (index % 5),
        "crop_left": 8 * (index % 7),
        "crop_height": HR_SIZE,
        "crop_width": HR_SIZE,
        "scale": SCALE,
        "delta_e": spec.delta_e,
        "delta_e_p95": spec.delta_e * 2.0,
        "psnr": 30.0 - spec.delta_e,
        "ssim": 0.9,
        "color_corrected": False,
        "seed": 0,
        "factory_version": "0.1.0",
    }
    if spec.label is not None:
        probability = spec.label_prob if spec.label_prob is not None else 0.9
        row["label"] = spec.label
        row["label_prob"] = probability
        row["classifier_sha256"] = "0" * 64
        rest = (1.0 - probability) / (len(CORRUPTIONS) - 1)
        for name, column in zip(CORRUPTIONS, LABEL_PROB_COLUMNS, strict=True):
            row[column] = probability if name == spec.label else rest
    return row


def write_shard(
    shards_root: Path,
    manifests_root: Path,
    dataset: str,
    shard_index: int,
    samples: list[tuple[dict, np.ndarray, np.ndarray]],
    codec: str = "png",
) -> list[dict]:
    """One shard of (row, hr, lr) samples, written with the build's tar writer and committed by a manifest with the
    build's commit record (so `factory verify` accepts it). The payload columns (shard, codec, sizes, sha256s) are
    filled in here; returns the rows as the manifest reads back (float32 columns rounded)."""
    shard = f"{dataset}/{shard_stem(dataset, shard_index)}.tar"
    extension = payload_extension(codec)
    rows = []
    with Storage(shards_root).open_atomic(shard) as raw:
        stream = HashingWriter(raw)
        writer = TarShardWriter(stream)
        for row, hr, lr in samples:
            hr_payload, lr_payload = encode_image(hr, codec), encode_image(lr, codec)
            row = {
                **row,
                "shard": shard,
                "codec": codec,
                "hr_bytes": len(hr_payload),
                "lr_bytes": len(lr_payload),
                "hr_sha256": hashlib.sha256(hr_payload).hexdigest(),
                "lr_sha256": hashlib.sha256(lr_payload).hexdigest(),
            }
            row = rows_to_table([row]).to_pylist()[0]
            writer.add_sample(
                row["key"],
                {f"hr.{extension}": hr_payload, f"lr.{extension}": lr_payload, "json": row_json(row)},
            )
            rows.append(row)
        writer.close()
    commit = {
        "shard": shard,
        "shard_bytes": stream.size,
        "shard_sha256": stream.hexdigest(),
        "pairs": len(rows),
    }
    write_manifest(
        Storage(manifests_root), f"{dataset}/{shard_stem(dataset, shard_index)}.parquet", rows, commit
    )
    return rows


def make_dataset(
    shards_root: Path,
    manifests_root: Path,
    dataset: str,
    specs: list[PairSpec],
    photos: dict,
    model: str = "vqvae2",
    epoch: int | None = 8,
    codec: str = "png",
    pairs_per_shard: int = 4,
    rejects: int = 0,
) -> list[dict]:
    """Write `dataset` (shards + one manifest per shard + optional rejects); return its manifest rows (all columns).
    HR: 32x32 crops of the photos; LR: every 4th pixel plus noise."""
    generator = np.random.default_rng(len(dataset) + len(specs))
    names = sorted(photos)
    rows: list[dict] = []
    for shard_index, start in enumerate(range(0, len(specs), pairs_per_shard)):
        samples = []
        for index in range(start, min(start + pairs_per_shard, len(specs))):
            photo = photos[names[index % len(names)]]
            top, left = 8 * (index % 5), 8 * (index % 7)
            hr = np.ascontiguousarray(photo[top : top + HR_SIZE, left : left + HR_SIZE])
            noise = generator.integers(-20, 21, size=(HR_SIZE // SCALE, HR_SIZE // SCALE, 3))
            lr = np.clip(hr[::SCALE, ::SCALE].astype(int) + noise, 0, 255).astype(np.uint8)
            samples.append((_row(dataset, model, epoch, index, specs[index]), hr, lr))
        rows += write_shard(shards_root, manifests_root, dataset, shard_index, samples, codec)
    if rejects:
        reject_rows = [
            {
                "dataset": dataset,
                "source": f"bad_{index}.png",
                "source_root": "hr",
                "reason": "too_small",
                "detail": "smaller than the crop",
            }
            for index in range(rejects)
        ]
        write_rejects(Storage(manifests_root), f"{dataset}/{REJECTS_NAME}", reject_rows)
    return rows


def sample_payloads(shard_path: Path) -> dict[str, dict[str, bytes]]:
    """key -> {member suffix: bytes} of every sample in a shard (stdlib tarfile, no webdataset decoding)."""
    import tarfile

    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(shard_path) as archive:
        for member in archive.getmembers():
            key, _, suffix = member.name.partition(".")
            samples.setdefault(key, {})[suffix] = archive.extractfile(member).read()
    return samples


def decode_png(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


# Runs `factory ARGS` in a child process that SIGKILLs itself, like `kill -9`, when `MODULE.NAME` (a function the
# command calls, patched from here) is called for the (CALLS + 1)-th time: argv is MODULE NAME CALLS ARGS...
KILLED_MID_WRITE = """
import importlib, os, signal, sys
from factory.cli import main

module_name, name, calls = sys.argv[1], sys.argv[2], int(sys.argv[3])
module = importlib.import_module(module_name)
original, count = getattr(module, name), 0

def killing(*args, **kwargs):
    global count
    count += 1
    if count > calls:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)

setattr(module, name, killing)
main(sys.argv[4:], prog_name="factory")
"""


def run_killed_mid_write(module: str, name: str, calls: int, arguments: list[str]) -> None:
    """Run `factory arguments` until the (calls + 1)-th call of `module.name` kills it (see KILLED_MID_WRITE)."""
    import signal
    import subprocess
    import sys

    command = [sys.executable, "-c", KILLED_MID_WRITE, module, name, str(calls), *arguments]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert finished.returncode == -signal.SIGKILL, finished.stderr[-2000:]
