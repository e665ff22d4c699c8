"""The build's worker: turns whole shards into a tar and its manifest (a Ray actor; a plain class, so tests and a
debugger can run it in-process with `--actors 0`).

Per crop y (the paper, Sections 3.1 and 4.1): x = the colour module's bicubic of y by `scale`, stored as 8 bits;
x_deg = the degrader's LR of y (`factory.degraders`: x itself for `bicubic`, G(x) for a reconstructor, the
classical pipelines from y), drawn from the pair's own generator (seeded by the build seed and the pair's key) and
stored as 8 bits; then, on the device, ΔE (CIEDE2000 of x = bicubic(y) vs x_deg), PSNR / SSIM and the checkerboard
index of x_deg against x (`factory.quality`), all on the stored 8-bit pixels so that a row equals skimage on the
pair read back. The degrader's record of what the pair drew goes into the row's `degradation` column.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from factory import __version__
from factory.build.config import BICUBIC, reconstructs
from factory.build.identity import build_fingerprint
from factory.build.plan import PlannedCrop, ShardTask, reject_row
from factory.devices import resolve_device
from factory.manifests import ShardOutput, commit_shard, rows_to_table
from factory.quality import checkerboard_index, image_quality
from factory.shards import row_json
from factory.sources import RejectedImage, SourceFile, decode_rgb
from factory.storage import Storage

# --------------------------------------------------------------------------------------------------------------------
# The worker
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSettings:
    """What a worker needs to build shards (plain values: Ray sends it to every actor)."""

    dataset: str  # dataset name: folder and key prefix
    model: str  # degrader name: a reconstructor, "bicubic" (x_deg = x), "realesrgan" or "bsrgan"
    checkpoint: str | None  # reconstructor checkpoint file (None for the other degraders)
    epoch: int | None  # the checkpoint's epoch, recorded per row (None for the other degraders)
    scale: int  # HR size / LR size
    crop: int  # HR crop side
    codec: str  # payload codec: "png" or "zst"
    batch_size: int  # crops per device batch (a pair's bytes do not depend on it)
    device: str  # torch device: "auto" (cuda, then mps, then cpu), "cpu", "cuda", ...
    seed: int  # the build seed: pair k draws from factory.degraders.pair_generator(seed, k)
    color_correct: bool  # apply factory.color.color_correct to x_deg
    classifier: str | None  # degradation classifier checkpoint that fills the label columns
    out: str  # shard root (folder or URI)
    manifests: str  # manifest root (folder or URI)
    max_pixels: int | None  # decompression-bomb limit (None: Pillow's)
    build_settings: (
        dict  # factory.build.identity.build_settings: recorded with their digest in each commit record
    )
    threads: int | None  # torch intra-op threads and payload encoders (None: torch's default, one encoder)
    bf16: bool = False  # the reconstructor under bf16 autocast on CUDA (faster; other bytes than float32)
    degradation_options: dict | None = None  # the classical degrader's options (--degradation-config)


@dataclass
class ShardSummary:
    """What a worker returns for a shard: small, never pixels."""

    index: int  # shard number
    stem: str  # "<dataset>-NNNNNN"
    pairs: int  # pairs written
    rejects: list[dict[str, str]]  # sources that failed to decode (REJECT_SCHEMA rows)
    shard_bytes: int  # size of the tar
    seconds: float  # wall time of the shard
    started: float  # when the worker started it, epoch seconds (time.time)
    delta_e_sum: float  # sum of the pairs' ΔE (for running means)


def degrader_options(settings: WorkerSettings) -> dict[str, Any]:
    """What `factory.degraders.get_degrader` takes for this build: a reconstructor's checkpoint, or the classical
    degrader's options, at the build's scale."""
    if reconstructs(settings.model):
        return {"checkpoint": settings.checkpoint, "scale": settings.scale, "bf16": settings.bf16}
    return {**(settings.degradation_options or {}), "scale": settings.scale}


class ShardWorker:
    """Loads the reconstructor (and classifier) once, then turns whole shards into a tar and a manifest."""

    def __init__(self, settings: WorkerSettings):
        import torch

        self.settings = settings
        if settings.threads:
            torch.set_num_threads(settings.threads)
        self.device = resolve_device(settings.device)
        if self.device.type == "cpu":
            from factory.color import tune_cpu_allocator

            tune_cpu_allocator()  # the colour module's advice for processes that compute many ΔE on the CPU
        self.shards = Storage(settings.out)
        self.manifests = Storage(settings.manifests)
        from factory.degraders import get_degrader

        self.degrader = get_degrader(settings.model, degrader_options(settings), self.device)
        self.labeler = None
        if settings.classifier:
            from factory.classifier.labeler import Labeler

            self.labeler = Labeler.load(settings.classifier, device=self.device)
        encoders = settings.threads or 1
        if settings.threads is None and self.device.type == "cuda":  # on a cluster node: its CPUs per GPU
            encoders = (os.cpu_count() or 1) // max(1, torch.cuda.device_count())
        self.encoders = ThreadPoolExecutor(max_workers=max(1, encoders))
        self.finisher = ThreadPoolExecutor(max_workers=1)  # stage 2 of build_shard's pipeline
        # pyarrow imports pandas on its first table (~0.5 s): pay it at start-up, not in the first shard.
        rows_to_table([])
        self.ready = True

    def ping(self) -> bool:
        return self.ready

    # -- one shard -----------------------------------------------------------------------------------------------

    def build_shard(self, task: ShardTask) -> ShardSummary:
        started, started_epoch = time.perf_counter(), time.time()
        settings = self.settings
        rejects: list[dict[str, str]] = []  # filled while the shard is written
        record = {
            "planned": len(task.crops),
            "plan_sha256": task.plan_sha256,
            "build_fingerprint": build_fingerprint(settings.build_settings),
            "build_settings": settings.build_settings,
            "rejects": rejects,
            "factory_version": __version__,
        }
        with commit_shard(self.shards, self.manifests, settings.dataset, task.stem, record) as output:
            # A three-stage pipeline: while the model degrades batch k (this thread), batch k + 1 is decoded, cropped
            # and downsampled on a prefetch thread and batch k - 1 is measured, encoded and hashed on the `finisher`
            # thread. Samples are still written here, in plan order, so the shard's bytes do not depend on the
            # overlap.
            pending = None
            for batch, y8, x8 in _prefetched(self._downsampled(self._batches(task, rejects))):
                degraded = self._degrade(batch, y8, x8)
                finishing = self.finisher.submit(self._finish, batch, output.shard, *degraded)
                if pending is not None:
                    self._write(output, pending.result())
                pending = finishing
            if pending is not None:
                self._write(output, pending.result())
        return ShardSummary(
            index=task.index,
            stem=task.stem,
            pairs=len(output.rows),
            rejects=rejects,
            shard_bytes=output.record["shard_bytes"],
            seconds=time.perf_counter() - started,
            started=started_epoch,
            delta_e_sum=float(sum(row["delta_e"] for row in output.rows)),
        )

    def _write(self, output: ShardOutput, pairs: list[tuple[dict[str, Any], dict[str, bytes]]]) -> None:
        for row, members in pairs:
            output.add(row, members)

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
                    reject_row(
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
            rejects.append(reject_row(self.settings.dataset, source, error))
            return None, ""
        return image, hashlib.sha256(data).hexdigest()

    def _downsampled(self, batches):
        """Stage 0 (on the prefetch thread, with decoding): yield (batch, y8, x8): y8 = the batch's crops y on the
        device, (B, 3, crop, crop) uint8; x8 = their bicubic LR, (B, 3, crop / s, crop / s) uint8, as stored."""
        import torch

        for batch in batches:
            with torch.inference_mode():  # thread-local: this runs on the prefetch thread
                # One crop at a time: a whole batch as floats (100 MB for 8 crops of 1024) streams through the
                # caches the model shares. Measured per 8 crops of 1024: 187 ms batched, 86 ms this way; same bits.
                crops = [self._crop8(item[3]) for item in batch]
                x8 = torch.cat([self._bicubic_lr8(y8) for y8 in crops])
            yield batch, torch.cat(crops), x8

    def _crop8(self, crop: np.ndarray):
        """(H, W, 3) uint8 crop y -> (1, 3, H, W) uint8 on the device. The crop is made (3, H, W) contiguous while
        still 8-bit: a float copy of the channels-last view is a strided pass over 4x the bytes."""
        import torch

        # The (3, H, W) copy is made by numpy: decoded crops may be read-only, which torch.from_numpy warns about.
        return torch.from_numpy(np.ascontiguousarray(crop.transpose(2, 0, 1)))[None].to(self.device)

    def _bicubic_lr8(self, y8):
        """(1, 3, H, W) uint8 crop y -> (1, 3, H / scale, W / scale) uint8 bicubic LR x, as stored."""
        from factory.color import downsample, quantize

        return quantize(downsample(y8.float().div_(255.0), self.settings.scale))

    def _degrade(self, batch, y8, x8):
        """One device batch, stage 1: y8 (B, 3, H, W), x8 (B, 3, h, w) uint8 -> (x8, degraded8, corrected,
        records), degraded8 = the degrader's LR (x8 for bicubic), (B, 3, h, w) uint8, as stored; one parameter
        record per pair."""
        import torch

        from factory.color import quantize
        from factory.degraders import pair_generator

        settings = self.settings
        # On the CPU whatever the device: a pair then draws the same numbers on every machine (the models and the
        # pipelines draw on the generator's device and move the numbers to the image's).
        generators = [pair_generator(settings.seed, crop.key) for crop, _, _, _ in batch]
        with torch.inference_mode():
            degraded, records = self.degrader.degrade(y8, generators, bicubic_lr=x8)
            # x_deg = x (bicubic without a colour shift, its only options): nothing to correct
            if settings.model == BICUBIC and not settings.degradation_options:
                return x8, x8, False, records
            degraded = degraded.float().clamp(0, 1)
            corrected = False
            if settings.color_correct:
                from factory.color import color_correct

                degraded = color_correct(degraded, x8.float() / 255.0).clamp(0, 1)
                corrected = True
            # Contiguous: a pipeline's LR may come channels-last (JPEG through Pillow), and SSIM's reduction order
            # follows the layout, so a batch of one and a batch of eight would measure other last bits.
            return x8, quantize(degraded).contiguous(), corrected, records

    def _measure(self, x8, degraded8) -> list[dict[str, Any]]:
        """x8, degraded8: (B, 3, h, w) uint8 -> each pair's measured columns: ΔE, PSNR, SSIM, checkerboard index
        and (with --classifier) the label columns. Pair by pair: a reduction over a batch tensor may add in another
        order (SSIM's last bits differed between batches of 1 and 8 on the CPU), and a row must not depend on which
        pairs share its batch."""
        import torch

        from factory.color import delta_e_uint8

        values: dict[str, list] = {
            name: [] for name in ("delta_e", "delta_e_p95", "psnr", "ssim", "checkerboard")
        }
        labels: list[dict[str, Any]] = []
        with torch.inference_mode():  # thread-local: stage 1's does not cover this thread
            for index in range(x8.shape[0]):
                x, degraded = x8[index : index + 1], degraded8[index : index + 1]
                # The paper's ΔE on what is stored: quantize(bicubic(y)) = x8 against x_deg8 (0 for bicubic).
                # Given x8 (already at the LR size), delta_e_uint8 skips its own bicubic of y: x8 is computed once.
                difference = delta_e_uint8(x, degraded)
                psnr, ssim = image_quality(degraded, x)
                values["delta_e"].append(difference.mean.double())
                values["delta_e_p95"].append(difference.p95.double())
                values["psnr"].append(psnr.double())
                values["ssim"].append(ssim.double())
                values["checkerboard"].append(checkerboard_index(degraded, x).double())
                if self.labeler is not None:  # label columns: label, label_prob, classifier_sha256, p_<class>
                    columns = self.labeler.manifest_columns(*self.labeler.predict(degraded.float() / 255.0))
                    labels.append({name: column[0] for name, column in columns.items()})
            # One transfer per column, not one per pair and column: each is a wait on the device.
            lists = {name: torch.cat(tensors).cpu().tolist() for name, tensors in values.items()}
        rows = [{name: column[index] for name, column in lists.items()} for index in range(x8.shape[0])]
        if labels:  # with --classifier
            for row, label in zip(rows, labels, strict=True):
                row.update(label)
        return rows

    def _finish(self, batch, shard_path: str, x8, degraded8, corrected: bool, records: list[dict[str, Any]]):
        """One device batch, stage 2 (on the finisher thread): measure, encode, hash -> [(manifest row, tar members)]."""
        from factory.shards import encode_image, payload_extension

        settings = self.settings
        measured = self._measure(x8, degraded8)
        lr_images = degraded8.permute(0, 2, 3, 1).cpu().numpy()
        extension = payload_extension(settings.codec)
        images = [np.ascontiguousarray(item[3]) for item in batch] + [
            np.ascontiguousarray(lr) for lr in lr_images
        ]
        # PNG/zstd encoding releases the GIL: on a GPU node it runs on the node's spare cores, in parallel.
        encoded = list(self.encoders.map(lambda image: encode_image(image, settings.codec), images))
        pairs = []
        for index, (crop, source, source_sha256, _) in enumerate(batch):
            hr, lr = encoded[index], encoded[len(batch) + index]
            record = records[index]
            row = {
                "key": crop.key,
                "dataset": settings.dataset,
                "model": settings.model,
                "epoch": settings.epoch,
                "preset": record.get("preset"),  # a reconstructor's record names its checkpoint
                "checkpoint_sha256": record.get("checkpoint_sha256"),
                "source": source.relative,
                "source_root": source.root,
                "source_sha256": source_sha256,
                "crop_top": crop.top,
                "crop_left": crop.left,
                "crop_height": settings.crop,
                "crop_width": settings.crop,
                "scale": settings.scale,
                "color_corrected": corrected,
                "shard": shard_path,
                "codec": settings.codec,
                "hr_bytes": len(hr),
                "lr_bytes": len(lr),
                "hr_sha256": hashlib.sha256(hr).hexdigest(),
                "lr_sha256": hashlib.sha256(lr).hexdigest(),
                "seed": settings.seed,
                "degradation": json.dumps(record, sort_keys=True),
                **self.degrader.flat_columns(record),
                "factory_version": __version__,
                **measured[index],
            }
            members = {f"hr.{extension}": hr, f"lr.{extension}": lr, "json": row_json(row)}
            pairs.append((row, members))
        return pairs


def _prefetched(iterator: Iterator, depth: int = 1) -> Iterator:
    """Iterate `iterator` on a background thread, `depth` items ahead (decoding sources releases the GIL); its
    exceptions are raised here, in order."""
    items: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in iterator:
                while not stop.is_set():
                    try:
                        items.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            items.put((done, None))
        except BaseException as error:  # handed to the consumer, which re-raises it
            items.put((done, error))

    thread = threading.Thread(target=produce, name="shard-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = items.get()
            if error is not None:
                raise error
            if item is done:
                return
            yield item
    finally:
        stop.set()  # the consumer stopped early (an error downstream): let the producer end
        thread.join(timeout=5)
