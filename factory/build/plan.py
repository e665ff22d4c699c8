"""The build's plan: which crops of which HR files go into which shard, with their keys (deterministic).

A shard is a fixed list of crops; the plan depends only on the inputs and the options (never on the cluster), so a
rerun finds the same shards, keys and order, and a committed shard can be recognised by the digest of its crops.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from factory.build.config import BuildConfig
from factory.config import FactoryError
from factory.manifests import shard_stem
from factory.sources import RejectedImage, SourceFile, crop_boxes, list_sources, probe_image

log = logging.getLogger(__name__)


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
    source_files: tuple[SourceFile, ...] = ()  # every input file found (a missing checkpoint trains on them)

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


def pair_key(dataset: str, source: SourceFile, top: int, left: int) -> str:
    """`<dataset>-<file stem>-<8 hex of the source's identity>-<top>-<left>`: readable, stable across machines (it
    uses the root's folder name, not its absolute path), and free of '.' (WebDataset's key separator)."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(source.relative).stem)[:40] or "image"
    identity = f"{Path(source.root).name}/{source.relative}"
    return f"{dataset}-{stem}-{hashlib.sha256(identity.encode()).hexdigest()[:8]}-{top:05d}-{left:05d}"


def reject_row(dataset: str, source: SourceFile, error: RejectedImage) -> dict[str, str]:
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
    dataset, crop = config.dataset_name, config.effective_crop
    stride = config.stride or max(1, crop // 2)
    if config.crop is None and not (config.hr or config.hr_list):
        log.warning(
            "no --hr given: building from scikit-image's bundled colour photos with %dx%d crops", crop, crop
        )
    listing = list_sources(config.hr, config.hr_list)
    sources = listing.files
    if not sources:
        raise FactoryError(f"no image files found under {', '.join(config.hr + config.hr_list)}")
    rejects = [reject_row(dataset, source, error) for source, error in listing.rejects]
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
            rejects.append(reject_row(dataset, source, error))
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
    return BuildPlan(dataset, crop, stride, len(sources), images, crops, shards, rejects, tuple(sources))
