"""The build: HR crops -> (degraded LR, HR) pairs in WebDataset shards with Parquet manifests, on Ray actors.

    factory build --model vqvae2 --epoch 8 --out shards/          # the embedded default HR set, 256 crops
    factory build --hr DIV2K_train_HR/ --hr Flickr2K_HR/ --model vqvae2 --epoch 8 --out shards/

Pipeline per crop y (the paper, Section 3.1 and 4.1): x = bicubic downsample of y by `scale` (colour module),
quantised to 8 bits as the stored bicubic LR would be; x_deg = G(x) with the undertrained reconstructor G (or x itself
for `--model bicubic`), quantised to 8 bits as stored; then, on the device, the paper's ΔE (CIEDE2000 between
bicubic(y) and x_deg), and PSNR / SSIM of x_deg against x (torch ports of skimage's definitions, see
`image_quality`). Everything is measured on the stored 8-bit pixels, so a manifest row equals what skimage
computes on the pair read back from the shard.

Structure: the driver plans shard tasks (a shard = a fixed list of crops; `plan_build`), skips the shards whose
manifest already commits them (resume), and hands the rest to a pool of `ShardWorker` actors (`run_shards`, the one
place that calls Ray). A worker loads the model once and turns whole shards into a tar and its manifest, returning
only a small summary. The tar is written to a temporary name and renamed; then its manifest (also atomically), whose
presence commits the shard. A shard whose actor dies is given to a fresh actor; rewriting it is harmless because its
name and bytes are determined by the plan.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from factory import __version__
from factory.config import FactoryError
from factory.manifests import (
    CARD_NAME,
    LOCK_NAME,
    REJECTS_NAME,
    read_commit,
    read_manifest,
    shard_stem,
    write_manifest,
    write_rejects,
)
from factory.sources import (
    RejectedImage,
    SourceFile,
    crop_boxes,
    decode_rgb,
    list_sources,
    probe_image,
)
from factory.storage import Storage

log = logging.getLogger(__name__)

BICUBIC = "bicubic"  # the model name of the baseline dataset: x_deg = x
DEFAULT_CROP = 1024  # the paper's HR crop (Section 4.1)
EMBEDDED_DEFAULT_CROP = 256  # with the embedded default photos (300-1411 px) 1024 would leave almost nothing
CRASH_ONCE_ENVIRONMENT = (
    "FACTORY_TEST_CRASH_ONCE"  # tests: path of a marker; the first worker to see it absent dies
)
_DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
# Compressed size / raw pixel bytes, for --dry-run's estimate (measured on a real photo, FACTS.md).
_CODEC_RATIO = {"png": 0.32, "zst": 0.45}


@dataclass(frozen=True)
class BuildConfig:
    hr: tuple[
        str, ...
    ] = ()  # HR folders (recursive); none and no hr_list: scikit-image's bundled colour photos
    hr_list: tuple[str, ...] = ()  # files listing HR image paths, one a line
    model: str = "vqvae2"  # reconstructor registry name, or "bicubic" (x_deg = x, no checkpoint)
    epoch: int = 8  # training epoch of the checkpoint (the paper's best dataset: VQ-VAE-2 at epoch 8)
    checkpoints: str = "checkpoints"  # checkpoint root: <checkpoints>/<model>/epoch-<E>.pt
    preset: str | None = (
        None  # model preset when the checkpoint must be trained first (None: train's default)
    )
    train_data: tuple[str, ...] = ()  # images to train a missing checkpoint on (none: the HR images)
    train_missing: bool = True  # train a missing checkpoint first (--no-train: refuse instead)
    scale: int = 4  # HR size / LR size
    crop: int | None = None  # HR crop side (None: 1024, or 256 with the embedded default)
    stride: int | None = None  # crop grid step (None: crop // 2, the plan that gives DF2K ~20,700 crops)
    limit: int | None = None  # build at most this many crops (the first ones of the plan)
    out: str = "shards"  # shard root (local folder or URI): <out>/<dataset>/<dataset>-NNNNNN.tar
    manifests: str = "manifests"  # manifest root: <manifests>/<dataset>/<dataset>-NNNNNN.parquet
    name: str | None = None  # dataset name (None: "<model>-ep<E>", or "bicubic")
    shard_size: int = 1000  # pairs per shard
    codec: str = "png"  # payload codec: "png" or "zst"
    batch_size: int = 8  # crops per device batch
    device: str = "auto"  # torch device of the workers: auto (cuda if present), cpu, cuda, mps
    actors: int | None = (
        None  # worker actors (None: one per GPU, or one per CPU; 0: in this process, without Ray)
    )
    address: str | None = None  # Ray cluster ("auto", "ray://host:10001"); None: an embedded local Ray
    num_cpus: int | None = None  # CPUs of the embedded Ray (None: all)
    seed: int = 0  # the build seed; sampling models draw from a generator seeded from (seed, keys)
    max_pixels: int | None = None  # larger images are rejected as decompression bombs (None: Pillow's 89.5 M)
    color_correct: bool = False  # correct the degraded LR's colour towards the bicubic LR (colour module)
    classifier: str | None = None  # degradation classifier checkpoint that fills the label columns
    max_attempts: int = 3  # tries per shard before the build gives up (an actor death costs one)
    actor_timeout: float = 600.0  # seconds without any worker actor up before the build gives up
    dry_run: bool = False  # print the plan, write nothing
    progress: bool = True  # show a progress bar
    command: str = ""  # the command line, recorded in the dataset card


# --------------------------------------------------------------------------------------------------------------------
# Plan
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedCrop:
    key: str  # the pair's key: stable (derived from the dataset, the source and the crop box), unique, no '.'
    source: int  # index into ShardTask.sources
    top: int
    left: int


@dataclass(frozen=True)
class ShardTask:
    index: int  # shard number (NNNNNN)
    stem: str  # "<dataset>-NNNNNN"
    sources: tuple[SourceFile, ...]  # the source files its crops come from
    crops: tuple[PlannedCrop, ...]  # in order

    @property
    def plan_sha256(self) -> str:
        """A digest of what this shard holds: a committed shard with another digest belongs to another plan."""
        digest = hashlib.sha256()
        for crop in self.crops:
            source = self.sources[crop.source]
            digest.update(f"{crop.key}\0{source.root}\0{source.relative}\0{crop.top}\0{crop.left}\n".encode())
        return digest.hexdigest()


@dataclass
class BuildPlan:
    dataset: str
    crop: int
    stride: int
    sources: int  # input files found
    images: int  # input files that give at least one crop
    crops: int  # planned pairs
    shards: list[ShardTask]
    rejects: list[dict[str, str]]  # REJECT_SCHEMA rows found while planning

    def describe(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "plan": "grid",
            "crop": self.crop,
            "stride": self.stride,
            "sources": self.sources,
            "images": self.images,
            "crops": self.crops,
            "shards": len(self.shards),
            "rejected_while_planning": len(self.rejects),
        }


def dataset_name(config: BuildConfig) -> str:
    name = config.name or (BICUBIC if config.model == BICUBIC else f"{config.model}-ep{config.epoch}")
    if not _DATASET_NAME.match(name):
        raise FactoryError(f"invalid dataset name {name!r}: use letters, digits, '-' and '_' (no '.' or '/')")
    return name


def effective_crop(config: BuildConfig) -> int:
    if config.crop is not None:
        return config.crop
    return DEFAULT_CROP if (config.hr or config.hr_list) else EMBEDDED_DEFAULT_CROP


def pair_key(dataset: str, source: SourceFile, top: int, left: int) -> str:
    """`<dataset>-<file stem>-<8 hex of the source's identity>-<top>-<left>`: readable, stable across machines (it
    uses the root's folder name, not its absolute path), and free of '.' (WebDataset's key separator)."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(source.relative).stem)[:40] or "image"
    identity = f"{Path(source.root).name}/{source.relative}"
    return f"{dataset}-{stem}-{hashlib.sha256(identity.encode()).hexdigest()[:8]}-{top:05d}-{left:05d}"


def _reject_row(dataset: str, source: SourceFile, error: RejectedImage) -> dict[str, str]:
    return {
        "dataset": dataset,
        "source": source.relative,
        "source_root": source.root,
        "reason": error.reason,
        "detail": error.detail,
    }


def plan_build(config: BuildConfig) -> BuildPlan:
    """List the sources, read each one's header, and cut the crop grid into shards of `shard_size` crops.
    Deterministic: the same inputs and options give the same shards, keys and order."""
    dataset = dataset_name(config)
    crop = effective_crop(config)
    stride = config.stride or max(1, crop // 2)
    if crop < 16 or crop % config.scale:
        raise FactoryError(f"--crop {crop} must be at least 16 and a multiple of --scale {config.scale}")
    if config.crop is None and not (config.hr or config.hr_list):
        log.warning(
            "no --hr given: building from scikit-image's bundled colour photos with %dx%d crops", crop, crop
        )
    sources = list_sources(config.hr, config.hr_list)
    if not sources:
        raise FactoryError(f"no image files found under {', '.join(config.hr + config.hr_list)}")
    rejects: list[dict[str, str]] = []
    shards: list[ShardTask] = []
    pending_sources: list[SourceFile] = []
    pending_crops: list[PlannedCrop] = []
    seen_keys: set[str] = set()
    images = crops = 0

    def close_shard() -> None:
        index = len(shards)
        shards.append(
            ShardTask(index, shard_stem(dataset, index), tuple(pending_sources), tuple(pending_crops))
        )
        pending_sources.clear()
        pending_crops.clear()

    for source in sources:
        if config.limit is not None and crops >= config.limit:
            break
        try:
            height, width = probe_image(source.path, config.max_pixels)
            boxes = crop_boxes(height, width, crop, stride)
            if not boxes:
                raise RejectedImage(
                    "too_small", f"{source.relative} is {width}x{height}, smaller than the crop {crop}"
                )
        except RejectedImage as error:
            rejects.append(_reject_row(dataset, source, error))
            continue
        images += 1
        for top, left in boxes:
            if config.limit is not None and crops >= config.limit:
                break
            if not pending_sources or pending_sources[-1] is not source:
                pending_sources.append(source)
            key = pair_key(dataset, source, top, left)
            if key in seen_keys:
                raise FactoryError(f"two inputs give the same key {key}: {source.root}/{source.relative}")
            seen_keys.add(key)
            pending_crops.append(PlannedCrop(key, len(pending_sources) - 1, top, left))
            crops += 1
            if len(pending_crops) == config.shard_size:
                close_shard()
    if pending_crops:
        close_shard()
    return BuildPlan(dataset, crop, stride, len(sources), images, crops, shards, rejects)


# --------------------------------------------------------------------------------------------------------------------
# Quality metrics on the device
# --------------------------------------------------------------------------------------------------------------------


def image_quality(degraded, reference):
    """PSNR and SSIM of `degraded` against `reference`, both (N, 3, h, w) uint8 tensors, computed in float64 on
    their device (float32 on MPS, which has no float64) -> (psnr (N,), ssim (N,)).

    The definitions of skimage's `peak_signal_noise_ratio(reference, degraded, data_range=255)` (an infinite PSNR,
    identical images, is stored as 100 dB) and `structural_similarity(..., channel_axis=2, data_range=255)` with its
    defaults: 7x7 uniform window, K1 = 0.01, K2 = 0.03, sample covariance, mean over the windows that fit inside the
    image (skimage filters the whole image and crops 3 pixels off each border, which leaves exactly these windows),
    then over the channels."""
    import torch
    import torch.nn.functional as F

    dtype = torch.float32 if degraded.device.type == "mps" else torch.float64  # MPS has no float64
    a = degraded.to(dtype)
    b = reference.to(dtype)
    mse = (a - b).pow(2).flatten(1).mean(dim=1)
    psnr = torch.where(
        mse > 0, 10.0 * torch.log10(255.0**2 / mse.clamp_min(1e-12)), torch.full_like(mse, 100.0)
    )
    window = 7
    if min(a.shape[-2:]) < window:
        raise ValueError(f"SSIM needs images of at least {window}x{window}, got {tuple(a.shape[-2:])}")
    count = window * window
    covariance_norm = count / (count - 1)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def mean_filter(t):
        return F.avg_pool2d(t, window, stride=1)

    mean_a, mean_b = mean_filter(a), mean_filter(b)
    var_a = covariance_norm * (mean_filter(a * a) - mean_a * mean_a)
    var_b = covariance_norm * (mean_filter(b * b) - mean_b * mean_b)
    cov = covariance_norm * (mean_filter(a * b) - mean_a * mean_b)
    ssim_map = ((2 * mean_a * mean_b + c1) * (2 * cov + c2)) / (
        (mean_a**2 + mean_b**2 + c1) * (var_a + var_b + c2)
    )
    ssim = ssim_map.flatten(2).mean(dim=2).mean(dim=1)
    return psnr, ssim


# --------------------------------------------------------------------------------------------------------------------
# The worker (a Ray actor; a plain class, so tests and a debugger can run it in-process)
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSettings:
    dataset: str
    model: str  # registry name or "bicubic"
    checkpoint: str | None  # checkpoint file (None for bicubic)
    epoch: int | None
    scale: int
    crop: int
    codec: str
    batch_size: int
    device: str  # "auto", "cpu", "cuda", ...
    seed: int
    color_correct: bool
    classifier: str | None
    out: str  # shard root location
    manifests: str  # manifest root location
    max_pixels: int | None
    build_fingerprint: str
    threads: int | None  # torch intra-op threads (None: leave torch's default)
    crash_marker: str | None  # tests only: see CRASH_ONCE_ENVIRONMENT


@dataclass
class ShardSummary:
    index: int
    stem: str
    pairs: int
    rejects: list[dict[str, str]]
    shard_bytes: int
    seconds: float
    delta_e_sum: float
    skipped: bool = False  # already committed (resume)


def resolve_device(name: str) -> str:
    import torch

    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pair_seed(seed: int, keys: list[str]) -> int:
    """The generator seed of a batch: from the build seed and the batch's keys, so a pair's draw depends only on
    the command (not on which actor ran it, or when)."""
    digest = hashlib.sha256(f"{seed}\0".encode() + "\0".join(keys).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class ShardWorker:
    """Loads the reconstructor (and classifier) once, then turns whole shards into a tar and a manifest."""

    def __init__(self, settings: WorkerSettings):
        import torch

        self.settings = settings
        if settings.threads:
            torch.set_num_threads(settings.threads)
        self.device = torch.device(resolve_device(settings.device))
        self.shards = Storage(settings.out)
        self.manifests = Storage(settings.manifests)
        self.model = None
        self.preset: str | None = None
        self.checkpoint_sha256: str | None = None
        if settings.model != BICUBIC:
            from factory.checkpoints import load_reconstructor

            loaded = load_reconstructor(settings.checkpoint, model_name=settings.model, device=self.device)
            self.model, self.preset, self.checkpoint_sha256 = loaded.model, loaded.preset, loaded.sha256
        self.labeler = None
        if settings.classifier:
            from factory.classifier import Labeler

            self.labeler = Labeler.load(settings.classifier, device=self.device)
        encoders = settings.threads or 1
        if settings.threads is None and self.device.type == "cuda":  # on a cluster node: its CPUs per GPU
            encoders = (os.cpu_count() or 1) // max(1, torch.cuda.device_count())
        self.encoders = ThreadPoolExecutor(max_workers=max(1, encoders))
        self.ready = True

    def ping(self) -> bool:
        return self.ready

    # -- one shard -----------------------------------------------------------------------------------------------

    def build_shard(self, task: ShardTask) -> ShardSummary:
        from factory.shards import HashingWriter, TarShardWriter

        started = time.perf_counter()
        settings = self.settings
        shard_path = f"{settings.dataset}/{task.stem}.tar"
        rows: list[dict[str, Any]] = []
        rejects: list[dict[str, str]] = []
        with self.shards.open_atomic(shard_path) as raw:
            stream = HashingWriter(raw)
            writer = TarShardWriter(stream)
            for batch in self._batches(task, rejects):
                for row, members in self._make_pairs(batch, shard_path):
                    writer.add_sample(row["key"], members)
                    rows.append(row)
                self._maybe_crash()
            writer.close()
        commit = {
            "shard": shard_path,
            "shard_bytes": stream.size,
            "shard_sha256": stream.hexdigest(),
            "pairs": len(rows),
            "planned": len(task.crops),
            "plan_sha256": task.plan_sha256,
            "build_fingerprint": settings.build_fingerprint,
            "rejects": rejects,
            "factory_version": __version__,
        }
        write_manifest(self.manifests, f"{settings.dataset}/{task.stem}.parquet", rows, commit)
        return ShardSummary(
            index=task.index,
            stem=task.stem,
            pairs=len(rows),
            rejects=rejects,
            shard_bytes=stream.size,
            seconds=time.perf_counter() - started,
            delta_e_sum=float(sum(row["delta_e"] for row in rows)),
        )

    def _maybe_crash(self) -> None:
        """Tests only: die like a killed process, mid-shard, the first time any worker gets here."""
        marker = self.settings.crash_marker
        if marker and not os.path.exists(marker):
            Path(marker).write_text(str(os.getpid()))
            os._exit(1)

    def _batches(self, task: ShardTask, rejects: list[dict[str, str]]):
        """Yield lists of (PlannedCrop, source, source_sha256, y (crop, crop, 3) uint8) of at most batch_size,
        decoding each source once; a source that fails to decode is recorded in `rejects` and its crops skipped."""
        settings = self.settings
        batch: list[tuple[PlannedCrop, SourceFile, str, np.ndarray]] = []
        current: tuple[int, np.ndarray | None, str] = (-1, None, "")
        for crop in task.crops:
            if crop.source != current[0]:
                source = task.sources[crop.source]
                current = (crop.source, *self._decode(source, rejects))
            image, source_sha256 = current[1], current[2]
            if image is None:
                continue
            source = task.sources[crop.source]
            y = image[crop.top : crop.top + settings.crop, crop.left : crop.left + settings.crop]
            if y.shape[:2] != (settings.crop, settings.crop):
                rejects.append(
                    _reject_row(
                        settings.dataset,
                        source,
                        RejectedImage("changed", f"{source.relative} no longer fits the planned crops"),
                    )
                )
                current = (crop.source, None, "")
                continue
            batch.append((crop, source, source_sha256, y))
            if len(batch) == settings.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def _decode(self, source: SourceFile, rejects: list[dict[str, str]]) -> tuple[np.ndarray | None, str]:
        try:
            try:
                data = Path(source.path).read_bytes()
            except OSError as error:
                raise RejectedImage(
                    "unreadable", f"cannot read {source.relative}: {error.strerror or error}"
                ) from None
            image = decode_rgb(data, name=source.relative, max_pixels=self.settings.max_pixels)
        except RejectedImage as error:
            rejects.append(_reject_row(self.settings.dataset, source, error))
            return None, ""
        return image, hashlib.sha256(data).hexdigest()

    def _make_pairs(self, batch, shard_path: str):
        """One device batch: downsample, degrade, measure; yield (manifest row, tar members) per pair."""
        import torch

        from factory.color import delta_e, downsample
        from factory.shards import encode_image, payload_extension

        settings = self.settings
        keys = [crop.key for crop, _, _, _ in batch]
        with torch.inference_mode():
            # y: (B, 3, crop, crop) uint8 -> x: (B, 3, crop / s, crop / s), the bicubic LR, stored as 8 bits.
            y8 = torch.from_numpy(np.stack([item[3] for item in batch])).to(self.device).permute(0, 3, 1, 2)
            x8 = quantize(downsample(y8.float() / 255.0, settings.scale))
            corrected = False
            if self.model is None:
                degraded8 = x8
            else:
                x = x8.float() / 255.0
                generator = torch.Generator(device=self.device).manual_seed(pair_seed(settings.seed, keys))
                degraded = self.model.reconstruct(x, generator=generator).float().clamp(0, 1)
                if settings.color_correct:
                    from factory.color import color_correct

                    degraded = color_correct(degraded, x).clamp(0, 1)
                    corrected = True
                degraded8 = quantize(degraded)
            difference = delta_e(y8, degraded8)  # the paper's ΔE: bicubic(HR) vs the stored degraded LR
            psnr, ssim = image_quality(degraded8, x8)
            labels = None
            if self.labeler is not None:  # label columns: label, label_prob, classifier_sha256, p_<class>
                labels = self.labeler.manifest_columns(*self.labeler.predict(degraded8.float() / 255.0))
            lr_images = degraded8.permute(0, 2, 3, 1).cpu().numpy()
            means = difference.mean.double().cpu().tolist()
            p95s = difference.p95.double().cpu().tolist()
            psnrs, ssims = psnr.cpu().tolist(), ssim.cpu().tolist()
        extension = payload_extension(settings.codec)
        images = [np.ascontiguousarray(item[3]) for item in batch] + [np.ascontiguousarray(lr) for lr in lr_images]
        # PNG/zstd encoding releases the GIL: on a GPU node it runs on the node's spare cores, in parallel.
        encoded = list(self.encoders.map(lambda image: encode_image(image, settings.codec), images))
        for index, (crop, source, source_sha256, _) in enumerate(batch):
            hr, lr = encoded[index], encoded[len(batch) + index]
            row = {
                "key": crop.key,
                "dataset": settings.dataset,
                "model": settings.model,
                "epoch": settings.epoch,
                "preset": self.preset,
                "checkpoint_sha256": self.checkpoint_sha256,
                "source": source.relative,
                "source_root": source.root,
                "source_sha256": source_sha256,
                "crop_top": crop.top,
                "crop_left": crop.left,
                "crop_height": settings.crop,
                "crop_width": settings.crop,
                "scale": settings.scale,
                "delta_e": means[index],
                "delta_e_p95": p95s[index],
                "psnr": psnrs[index],
                "ssim": ssims[index],
                "color_corrected": corrected,
                "shard": shard_path,
                "codec": settings.codec,
                "hr_bytes": len(hr),
                "lr_bytes": len(lr),
                "hr_sha256": hashlib.sha256(hr).hexdigest(),
                "lr_sha256": hashlib.sha256(lr).hexdigest(),
                "seed": settings.seed,
                "factory_version": __version__,
            }
            if labels is not None:
                row.update({name: values[index] for name, values in labels.items()})
            members = {f"hr.{extension}": hr, f"lr.{extension}": lr, "json": row_json(row)}
            yield row, members


def quantize(image):
    """(N, 3, H, W) float in [0, 1] -> uint8, rounded to nearest (as an 8-bit image file stores it)."""
    import torch

    return (image.clamp(0, 1) * 255.0).round().to(torch.uint8)


def row_json(row: dict[str, Any]) -> bytes:
    """The `json` member of a sample: its manifest row, UTF-8, keys sorted (so the bytes are reproducible)."""
    return json.dumps(row, sort_keys=True, allow_nan=False).encode("utf-8")


# --------------------------------------------------------------------------------------------------------------------
# Running shards on Ray (the one place that calls Ray)
# --------------------------------------------------------------------------------------------------------------------


def _ray_cluster(config: BuildConfig):
    """Connect to `--address`, or start an embedded local Ray; returns (ray module, whether we started it)."""
    import ray

    if ray.is_initialized():
        return ray, False
    runtime_env = {"env_vars": {"PYTHONWARNINGS": "ignore::DeprecationWarning"}}
    try:
        if config.address:
            ray.init(address=config.address, logging_level=logging.WARNING, runtime_env=runtime_env)
        else:
            # address="local": always a new embedded cluster. Plain ray.init() would silently join any cluster
            # this machine has running (`ray start`, another build's test cluster), with its resources and fate.
            ray.init(
                address="local",
                num_cpus=config.num_cpus,
                include_dashboard=False,
                logging_level=logging.WARNING,
                log_to_driver=True,
                runtime_env=runtime_env,
            )
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise FactoryError(f"cannot start or reach Ray ({config.address or 'local'}): {error}") from None
    return ray, True


def run_shards(
    config: BuildConfig, settings: WorkerSettings, tasks: list[ShardTask], total_pairs: int, on_done
):
    """Run `tasks` on a pool of ShardWorker actors; `on_done(summary)` is called as each shard commits.

    Scheduling: a shard goes only to an actor that is up (it answered `ping`, so its model is loaded) and idle; each
    actor holds one shard at a time (a shard is large enough to keep a device busy). An actor that dies
    (RayActorError: its process or node is gone) is killed for good, its shard goes back to the front of the queue for
    the actors that are up, and a replacement is requested; if the cluster cannot host the replacement (its node is
    gone for good) the build carries on with the actors it has. A shard that fails `max_attempts` times, or a pool
    with no actor up for `actor_timeout` seconds, stops the build with the error."""
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
    from tqdm import tqdm

    ray, started_here = _ray_cluster(config)
    try:
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        cpus = max(1, int(resources.get("CPU", 1)))
        use_gpus = gpus > 0 and settings.device != "cpu"
        # CPU-only: one single-threaded actor per CPU. Measured here: with other work on the cores, two torch threads
        # in one actor ran 4x slower than one (OpenMP threads spin while they wait for each other).
        count = config.actors or (gpus if use_gpus else cpus)
        if not use_gpus and count > cpus:
            log.warning("--actors %d is more than the cluster's %d CPUs; using %d", count, cpus, cpus)
            count = cpus
        count = min(count, len(tasks))
        threads = settings.threads or (None if config.address else max(1, cpus // count))
        settings = WorkerSettings(**{**asdict(settings), "threads": threads})
        options = {"num_cpus": 1, "num_gpus": 1 if use_gpus else 0, "max_restarts": 0, "max_task_retries": 0}
        remote_worker = ray.remote(ShardWorker).options(**options)
        log.info("starting %d %s actor(s)", count, "GPU" if use_gpus else "CPU")
        starting: dict[Any, Any] = {}  # ping reference -> actor not yet up

        def start_actor() -> None:
            actor = remote_worker.remote(settings)
            starting[actor.ping.remote()] = actor

        for _ in range(count):
            start_actor()
        idle: deque = deque()  # actors that are up and hold no shard
        queue = deque(tasks)
        attempts: Counter[int] = Counter()
        in_flight: dict[Any, tuple[Any, ShardTask]] = {}
        start_failures: list[str] = []
        last_up = time.monotonic()  # when an actor was last seen up (for actor_timeout)
        bar = tqdm(total=total_pairs, unit="pair", disable=not config.progress, dynamic_ncols=True)
        done_shards = 0
        bar.set_postfix_str(f"shards 0/{len(tasks)}")
        try:
            while queue or in_flight:
                while idle and queue:
                    actor, task = idle.popleft(), queue.popleft()
                    attempts[task.index] += 1
                    in_flight[actor.build_shard.remote(task)] = (actor, task)
                if idle or in_flight:
                    last_up = time.monotonic()
                elif time.monotonic() - last_up > config.actor_timeout:
                    detail = f"; last error: {start_failures[-1]}" if start_failures else ""
                    raise FactoryError(
                        f"no worker actor could start within {config.actor_timeout:.0f} s "
                        f"({'1 GPU' if use_gpus else '1 CPU'} each){detail}"
                    )
                ready, _ = ray.wait([*in_flight, *starting], num_returns=1, timeout=1.0)
                for reference in ready:
                    if reference in starting:
                        actor = starting.pop(reference)
                        try:
                            ray.get(reference, timeout=0)
                        except (RayActorError, GetTimeoutError) as error:
                            message = _actor_error_message(error)
                            if message.startswith("FactoryError: "):
                                raise FactoryError(message.removeprefix("FactoryError: ")) from None
                            start_failures.append(message)
                            log.warning("a worker actor failed to start: %s", message)
                            ray.kill(actor, no_restart=True)
                            if len(start_failures) >= config.max_attempts * max(1, count):
                                raise FactoryError(
                                    f"worker actors keep failing to start: {message}"
                                ) from None
                            start_actor()
                            continue
                        idle.append(actor)
                        continue
                    actor, task = in_flight.pop(reference)
                    try:
                        summary = ray.get(reference)
                    except RayActorError as error:
                        log.warning(
                            "actor died on shard %s (%s); retrying it", task.stem, _actor_error_message(error)
                        )
                        ray.kill(actor, no_restart=True)
                        start_actor()
                        _requeue(queue, task, attempts, config.max_attempts, error)
                        continue
                    except RayTaskError as error:
                        cause = error.cause if hasattr(error, "cause") else error
                        if isinstance(cause, FactoryError):
                            raise FactoryError(f"shard {task.stem}: {cause}") from None
                        log.warning("shard %s failed (%s); retrying", task.stem, _first_line(cause))
                        idle.append(actor)
                        _requeue(queue, task, attempts, config.max_attempts, cause)
                        continue
                    idle.append(actor)
                    done_shards += 1
                    bar.update(len(task.crops))  # planned crops done (a rejected source's included)
                    bar.set_postfix_str(f"shards {done_shards}/{len(tasks)}")
                    on_done(summary)
        finally:
            bar.close()
            for actor in [*idle, *starting.values(), *(actor for actor, _ in in_flight.values())]:
                ray.kill(actor, no_restart=True)
    finally:
        if started_here:
            ray.shutdown()


def _actor_error_message(error: BaseException) -> str:
    """The useful line of a Ray actor error: the exception raised in the actor's __init__, if that is what killed it."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if line.startswith(("FactoryError: ", "factory.config.FactoryError: ")):
            return "FactoryError: " + line.split("FactoryError: ", 1)[1]
    for line in reversed(lines):
        if "Error" in line.split(":", 1)[0]:
            return line
    return lines[0] if lines else type(error).__name__


def run_in_process(config: BuildConfig, settings: WorkerSettings, tasks: list[ShardTask], on_done) -> None:
    """`--actors 0`: one ShardWorker in this process, no Ray (debugging, tiny builds, tests of what follows)."""
    from tqdm import tqdm

    worker = ShardWorker(settings)
    with tqdm(total=sum(len(task.crops) for task in tasks), unit="pair", disable=not config.progress) as bar:
        for task in tasks:
            on_done(worker.build_shard(task))
            bar.update(len(task.crops))


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[-1] if text else type(error).__name__


def _requeue(
    queue: deque, task: ShardTask, attempts: Counter, max_attempts: int, error: BaseException
) -> None:
    if attempts[task.index] >= max_attempts:
        raise FactoryError(
            f"shard {task.stem} failed {attempts[task.index]} times; last error: {_first_line(error)}"
        )
    queue.appendleft(task)


# --------------------------------------------------------------------------------------------------------------------
# Locking, resume, checkpoint, card
# --------------------------------------------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DatasetLock:
    """`<manifests>/<dataset>/_build.lock`: refuses a second build into a dataset while one runs. A lock left by a
    dead process on this host is taken over; on object stores (no atomic create) it is advisory."""

    def __init__(self, storage: Storage, dataset: str):
        self.storage = storage
        self.relative = f"{dataset}/{LOCK_NAME}"
        self.record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}

    def __enter__(self) -> DatasetLock:
        self.storage.make_dirs(self.relative.rpartition("/")[0])
        payload = json.dumps(self.record).encode()
        for _ in range(3):
            if self.storage.is_local:
                try:
                    handle = os.open(
                        self.storage.path(self.relative), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644
                    )
                except FileExistsError:
                    pass
                else:
                    with os.fdopen(handle, "wb") as file:
                        file.write(payload)
                    return self
            elif not self.storage.exists(self.relative):
                self.storage.write_bytes_atomic(self.relative, payload)
                return self
            holder = self._holder()
            if holder is None:
                continue  # released (or unreadable) between our attempts
            same_host = holder.get("host") == self.record["host"]
            if same_host and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"]):
                log.warning(
                    "taking over the lock of a build that is no longer running (pid %s)", holder["pid"]
                )
                self.storage.delete(self.relative)
                continue
            raise FactoryError(
                f"another build is writing dataset {self.relative.split('/')[0]} (pid {holder.get('pid')} on "
                f"{holder.get('host')}); wait for it, or delete {self.storage.uri(self.relative)} if it is gone"
            )
        raise FactoryError(f"could not take the lock {self.storage.uri(self.relative)}")

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.storage.read_bytes(self.relative))
        except (OSError, ValueError):
            return None

    def __exit__(self, *exc_info) -> None:
        holder = self._holder()
        if holder and holder.get("pid") == self.record["pid"] and holder.get("host") == self.record["host"]:
            self.storage.delete(self.relative)


def build_fingerprint(config: BuildConfig, dataset: str, crop: int, checkpoint_sha256: str | None) -> str:
    """What makes two builds of a dataset the same build: a committed shard of another fingerprint is not reused."""
    classifier = None
    if config.classifier:
        from factory.checkpoints import file_sha256

        classifier = file_sha256(config.classifier)
    settings = {
        "dataset": dataset,
        "model": config.model,
        "epoch": None if config.model == BICUBIC else config.epoch,
        "checkpoint_sha256": checkpoint_sha256,
        "scale": config.scale,
        "crop": crop,
        "codec": config.codec,
        "seed": config.seed,
        "batch_size": config.batch_size,
        "color_correct": config.color_correct,
        "classifier_sha256": classifier,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def committed(
    shards: Storage, manifests: Storage, dataset: str, task: ShardTask, fingerprint: str
) -> dict | None:
    """The commit record of `task` when its manifest is present and matches the shard on disk (size), the plan
    (digest of its crops) and the build settings; None when the shard must be (re)built. A manifest of another
    plan or other settings is an error: the dataset was built by a different command."""
    commit = read_commit(manifests, f"{dataset}/{task.stem}.parquet")
    if commit is None:
        return None
    if commit.get("build_fingerprint") != fingerprint or commit.get("plan_sha256") != task.plan_sha256:
        raise FactoryError(
            f"dataset {dataset} already holds shard {task.stem} from a different build (other inputs or settings); "
            f"use --name for a new dataset, or delete {manifests.uri(dataset)} and {shards.uri(dataset)}"
        )
    if shards.size(commit["shard"]) != commit.get("shard_bytes"):
        log.warning("shard %s does not match its manifest; rebuilding it", task.stem)
        return None
    return commit


def ensure_checkpoint(config: BuildConfig, sources: list[SourceFile]) -> Path | None:
    """The checkpoint file of `--model/--epoch`; trains it first when missing (unless --no-train)."""
    if config.model == BICUBIC:
        return None
    from factory.checkpoints import checkpoint_path
    from factory.models import get_spec

    get_spec(config.model)  # an unknown model is a one-line error before anything else
    path = checkpoint_path(config.checkpoints, config.model, config.epoch)
    if path.is_file():
        return path
    if not config.train_missing:
        raise FactoryError(f"checkpoint {path} not found (train it with `factory train`, or drop --no-train)")
    log.warning("checkpoint %s not found: training %s to epoch %d first", path, config.model, config.epoch)
    from factory.train import train_for_build

    train_for_build(
        model=config.model,
        epoch=config.epoch,
        checkpoints=config.checkpoints,
        data=config.train_data or tuple(source.path for source in sources),
        preset=config.preset,
        seed=config.seed,
    )
    if not path.is_file():
        raise FactoryError(f"training finished but {path} was not written")
    return path


@dataclass
class BuildResult:
    dataset: str
    plan: dict[str, Any]
    pairs: int = 0  # pairs in the dataset (all shards, this run's and earlier ones)
    built_shards: int = 0  # shards written by this run
    skipped_shards: int = 0  # shards already committed
    rejects: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    output_bytes: int = 0  # shard bytes of the dataset
    pairs_per_second: float = 0.0  # this run's pairs / wall time
    delta_e_mean: float | None = None
    estimated_bytes: int | None = None  # dry run only
    actors: int | None = None  # dry run only

    def summary_lines(self) -> list[str]:
        if self.estimated_bytes is not None:
            plan = self.plan
            return [
                f"dry run: dataset {self.dataset}",
                f"  sources {plan['sources']}, usable images {plan['images']}, rejected {len(self.rejects)}",
                f"  crops {plan['crops']} of {plan['crop']}x{plan['crop']} (grid, stride {plan['stride']}), "
                f"shards {plan['shards']}, actors {self.actors}",
                f"  estimated output {self.estimated_bytes / 1e9:.2f} GB",
            ]
        reasons = Counter(row["reason"] for row in self.rejects)
        rejected = ", ".join(f"{count} {reason}" for reason, count in sorted(reasons.items())) or "none"
        delta = "n/a" if self.delta_e_mean is None else f"{self.delta_e_mean:.3f}"
        return [
            f"dataset {self.dataset}: {self.pairs} pairs in {self.built_shards + self.skipped_shards} shards "
            f"({self.built_shards} built, {self.skipped_shards} already committed)",
            f"  rejected inputs: {len(self.rejects)} ({rejected})",
            f"  {self.seconds:.1f} s, {self.pairs_per_second:.2f} pairs/s, {self.output_bytes / 1e6:.1f} MB of shards, "
            f"mean delta_e {delta}",
        ]


def _estimate_bytes(plan: BuildPlan, config: BuildConfig) -> int:
    raw = plan.crop * plan.crop * 3
    per_pair = raw * (1 + 1 / config.scale**2) * _CODEC_RATIO[config.codec] + 4 * 512 + 1200  # headers, json
    return int(plan.crops * per_pair)


def _write_card(
    config: BuildConfig,
    plan: BuildPlan,
    shards: Storage,
    manifests: Storage,
    checkpoint: Path | None,
    checkpoint_sha256: str | None,
    rejects: list[dict[str, str]],
    result: BuildResult,
) -> None:
    """`_card.json`: how the dataset was made and what it holds, rebuilt from all its committed manifests."""
    import pyarrow as pa
    import pyarrow.compute as pc

    columns = []
    for task in plan.shards:
        relative = f"{plan.dataset}/{task.stem}.parquet"
        if manifests.exists(relative):
            columns.append(
                read_manifest(manifests, relative).select(["delta_e", "delta_e_p95", "psnr", "ssim"])
            )
    table = pa.concat_tables(columns) if columns else None

    def stats(name: str) -> dict[str, float] | None:
        if table is None or table.num_rows == 0:
            return None
        values = table[name]
        quantiles = pc.quantile(values, q=[0.05, 0.5, 0.95]).to_pylist()
        return {
            "mean": pc.mean(values).as_py(),
            "p05": quantiles[0],
            "median": quantiles[1],
            "p95": quantiles[2],
        }

    reasons = Counter(row["reason"] for row in rejects)
    card = {
        "dataset": plan.dataset,
        "factory_version": __version__,
        "command": config.command,
        "config": asdict(config),
        "plan": plan.describe(),
        "crop_plan": "regular grid: crops every `stride` px along each axis plus one flush with the far edge",
        "pipeline": {
            "hr": "8-bit RGB crop of the EXIF-oriented source",
            "lr": "bicubic (factory.color.downsample) of the HR by `scale`, quantised to 8 bits, then degraded by the "
            "model (bicubic: unchanged), quantised to 8 bits",
            "delta_e": "factory.color.delta_e(hr, lr): CIEDE2000 of bicubic(HR) vs LR, per-image mean (paper 4.3.2)",
            "psnr_ssim": "degraded LR vs bicubic LR, torch ports of skimage's definitions (data_range 255)",
        },
        "checkpoint": None
        if checkpoint is None
        else {
            "path": str(checkpoint),
            "sha256": checkpoint_sha256,
            "model": config.model,
            "epoch": config.epoch,
        },
        "counts": {
            "pairs": result.pairs,
            "shards": len(plan.shards),
            "rejects": len(rejects),
            "rejects_by_reason": dict(sorted(reasons.items())),
            "output_bytes": result.output_bytes,
        },
        "delta_e": stats("delta_e"),
        "delta_e_p95": stats("delta_e_p95"),
        "psnr": stats("psnr"),
        "ssim": stats("ssim"),
        "rejects_file": REJECTS_NAME,
    }
    manifests.write_bytes_atomic(
        f"{plan.dataset}/{CARD_NAME}", json.dumps(card, indent=2, sort_keys=True, default=str).encode()
    )


# --------------------------------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------------------------------


def build(config: BuildConfig) -> BuildResult:
    """Plan, (train the checkpoint if missing,) build every uncommitted shard, write rejects and the card."""
    from factory.shards import CODECS

    if config.codec not in CODECS:
        raise FactoryError(f"unknown codec {config.codec!r}; known: {', '.join(CODECS)}")
    for name, value in (
        ("--shard-size", config.shard_size),
        ("--batch-size", config.batch_size),
        ("--scale", config.scale),
    ):
        if value < 1:
            raise FactoryError(f"{name} must be at least 1, got {value}")
    started = time.perf_counter()
    plan = plan_build(config)
    result = BuildResult(dataset=plan.dataset, plan=plan.describe(), rejects=list(plan.rejects))
    if config.dry_run:
        import torch

        result.estimated_bytes = _estimate_bytes(plan, config)
        gpus = torch.cuda.device_count() if config.device != "cpu" else 0
        result.actors = (
            config.actors if config.actors is not None else (gpus or config.num_cpus or os.cpu_count() or 1)
        )
        return result
    if plan.crops == 0:
        raise FactoryError(
            f"nothing could be built: all {plan.sources} inputs were rejected ({_reasons(plan.rejects)})"
        )

    all_sources = list_sources(config.hr, config.hr_list)
    checkpoint = ensure_checkpoint(config, all_sources)
    checkpoint_sha256 = None
    if checkpoint is not None:
        from factory.checkpoints import load_reconstructor

        # Load once here, on the CPU: a wrong or corrupt checkpoint is a one-line error before any actor starts.
        checkpoint_sha256 = load_reconstructor(checkpoint, model_name=config.model).sha256
    if config.classifier:
        from factory.classifier import Labeler

        Labeler.load(config.classifier)
    if config.color_correct:
        import factory.color

        if not hasattr(factory.color, "color_correct"):
            raise FactoryError("--color-correct needs factory.color.color_correct, which this version lacks")
    shards, manifests = Storage(config.out), Storage(config.manifests)
    fingerprint = build_fingerprint(config, plan.dataset, plan.crop, checkpoint_sha256)
    with DatasetLock(manifests, plan.dataset):
        shards.make_dirs(plan.dataset)
        manifests.make_dirs(plan.dataset)
        removed = shards.remove_temporaries(plan.dataset) + manifests.remove_temporaries(plan.dataset)
        if removed:
            log.info("removed %d temporary file(s) of an interrupted build", removed)
        todo, shard_rejects = [], []
        for task in plan.shards:
            commit = committed(shards, manifests, plan.dataset, task, fingerprint)
            if commit is None:
                todo.append(task)
            else:
                result.skipped_shards += 1
                shard_rejects.extend(commit.get("rejects", []))
        if result.skipped_shards:
            log.warning(
                "%d of %d shards already committed; building the other %d",
                result.skipped_shards,
                len(plan.shards),
                len(todo),
            )
        settings = WorkerSettings(
            dataset=plan.dataset,
            model=config.model,
            checkpoint=None if checkpoint is None else str(checkpoint),
            epoch=None if config.model == BICUBIC else config.epoch,
            scale=config.scale,
            crop=plan.crop,
            codec=config.codec,
            batch_size=config.batch_size,
            device=config.device,
            seed=config.seed,
            color_correct=config.color_correct,
            classifier=config.classifier,
            out=config.out,
            manifests=config.manifests,
            max_pixels=config.max_pixels,
            build_fingerprint=fingerprint,
            threads=None,
            crash_marker=os.environ.get(CRASH_ONCE_ENVIRONMENT),
        )
        built_pairs = 0
        run_started = time.perf_counter()

        def on_done(summary: ShardSummary) -> None:
            nonlocal built_pairs
            built_pairs += summary.pairs
            result.built_shards += 1
            shard_rejects.extend(summary.rejects)

        if todo and config.actors == 0:
            run_in_process(config, settings, todo, on_done)
        elif todo:
            run_shards(config, settings, todo, sum(len(task.crops) for task in todo), on_done)
        run_seconds = time.perf_counter() - run_started
        # Totals from what is committed now (this run's shards and earlier ones).
        for task in plan.shards:
            commit = read_commit(manifests, f"{plan.dataset}/{task.stem}.parquet") or {}
            result.pairs += int(commit.get("pairs", 0))
            result.output_bytes += int(commit.get("shard_bytes", 0))
        result.rejects = _unique_rejects(plan.rejects + shard_rejects)
        write_rejects(manifests, f"{plan.dataset}/{REJECTS_NAME}", result.rejects)
        result.seconds = time.perf_counter() - started
        result.pairs_per_second = built_pairs / run_seconds if built_pairs and run_seconds > 0 else 0.0
        if result.pairs == 0:
            raise FactoryError(
                f"nothing could be built: every input was rejected ({_reasons(result.rejects)})"
            )
        _write_card(config, plan, shards, manifests, checkpoint, checkpoint_sha256, result.rejects, result)
        card = json.loads(manifests.read_bytes(f"{plan.dataset}/{CARD_NAME}"))
        result.delta_e_mean = (card.get("delta_e") or {}).get("mean")
    return result


def _unique_rejects(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """One reject row per (root, source), first reason kept, sorted: a source split over two shards fails in both."""
    unique: dict[tuple[str, str], dict[str, str]] = {}
    for row in rows:
        unique.setdefault((row["source_root"], row["source"]), row)
    return [unique[key] for key in sorted(unique)]


def _reasons(rejects: list[dict[str, str]]) -> str:
    counts = Counter(row["reason"] for row in rejects)
    return ", ".join(f"{count} {reason}" for reason, count in sorted(counts.items())) or "no inputs"
