"""The build's options (`BuildConfig`), checked in one place before anything runs, with what they imply: the dataset's
name and the HR crop side."""

from __future__ import annotations

from dataclasses import dataclass

from factory.config import FactoryError
from factory.manifests import check_dataset_name
from factory.models import MODEL_NAMES
from factory.shards import CODECS

BICUBIC = "bicubic"  # the degrader of the baseline dataset: x_deg = x
DEFAULT_CROP = 1024  # the paper's HR crop (Section 4.1)
EMBEDDED_DEFAULT_CROP = 256  # with the embedded default photos (300-1411 px) 1024 would leave almost nothing


def reconstructs(model: str) -> bool:
    """Whether degrader `model` is a reconstructor (a checkpoint at an epoch) rather than bicubic or a classical
    pipeline."""
    return model in MODEL_NAMES


def _name_number(value: float) -> str:
    """A number as dataset names write it: shortest form, '.' as 'p' (3 -> "3", 1.5 -> "1p5")."""
    return f"{float(value):g}".replace(".", "p")


@dataclass(frozen=True)
class BuildConfig:
    hr: tuple[
        str, ...
    ] = ()  # HR folders (recursive); none and no hr_list: scikit-image's bundled colour photos
    hr_list: tuple[str, ...] = ()  # files listing HR image paths, one a line
    model: str = "vqvae2"  # degrader: a reconstructor, or "bicubic" (x_deg = x), "realesrgan", "bsrgan"
    epoch: int | None = None  # reconstructors: the checkpoint's epoch (the paper's best: VQ-VAE-2 at 8)
    degradation_config: str | None = None  # YAML of the classical degrader's options (realesrgan, bsrgan)
    checkpoints: str = "checkpoints"  # checkpoint root: <checkpoints>/<model>/epoch-<E>.pt
    preset: str | None = (
        None  # model preset when the checkpoint must be trained first (None: train's default)
    )
    train_data: tuple[str, ...] = ()  # images to train a missing checkpoint on (none: the HR images)
    train_missing: bool = True  # train a missing checkpoint first (--no-train: refuse instead)
    # Embedded default: copy the checkpoint shipped with the package when it is the run this build would train
    # (factory.train.SHIPPED_CHECKPOINTS), instead of training it.
    shipped_checkpoint: bool = True
    scale: int = 4  # HR size / LR size
    crop: int | None = None  # HR crop side (None: 1024, or 256 with the embedded default)
    stride: int | None = None  # crop grid step (None: crop // 2, the plan that gives DF2K ~20,700 crops)
    limit: int | None = None  # build at most this many crops (the first ones of the plan)
    out: str = "shards"  # shard root (local folder or URI): <out>/<dataset>/<dataset>-NNNNNN.tar
    manifests: str = "manifests"  # manifest root: <manifests>/<dataset>/<dataset>-NNNNNN.parquet
    name: str | None = None  # dataset name (None: "<model>-ep<E>" for a reconstructor, else the degrader's)
    shard_size: int = 1000  # pairs per shard
    codec: str = "png"  # payload codec: "png" or "zst"
    batch_size: int = 8  # crops per device batch (the pairs' bytes do not depend on it)
    device: str = "auto"  # torch device of the workers: auto (cuda if present), cpu, cuda, mps
    actors: int | None = (
        None  # worker actors (None: one per GPU, or one per CPU; 0: in this process, without Ray)
    )
    address: str | None = None  # Ray cluster ("auto", "ray://host:10001"); None: an embedded local Ray
    num_cpus: int | None = None  # CPUs of the embedded Ray (None: all)
    bf16: bool = False  # the reconstructor's forward pass under bf16 autocast on CUDA (no effect elsewhere)
    threads: int | None = (
        None  # torch threads per worker (None: the cluster's CPUs / actors; a cluster: torch's)
    )
    seed: int = 0  # the build seed; each pair draws from a generator seeded from (seed, its key)
    max_pixels: int | None = None  # larger images are rejected as decompression bombs (None: Pillow's 89.5 M)
    color_correct: bool = False  # correct the degraded LR's colour towards the bicubic LR (colour module)
    color_shift: tuple[float, float, float] | None = None  # bicubic only: (ΔL*, Δa*, Δb*) added to every LR
    target_delta_e: float | None = None  # bicubic only: shift each LR in CIELAB to this mean ΔE (Fig. 10)
    classifier: str | None = None  # degradation classifier checkpoint that fills the label columns
    max_attempts: int = 3  # tries per shard before the build gives up (an actor death costs one)
    actor_timeout: float = 600.0  # seconds without any worker actor up before the build gives up
    dry_run: bool = False  # print the plan, write nothing
    progress: bool = True  # show a progress bar
    command: str = ""  # the command line, recorded in the dataset card

    @property
    def dataset_name(self) -> str:
        """--name, or "<model>-ep<E>" for a reconstructor, or the degrader's name ("bicubic", "realesrgan", ...),
        with "-de<X>" or "-lab<L>_<a>_<b>" for a colour-shifted bicubic build."""
        if self.name:
            return self.name
        if reconstructs(self.model):
            return f"{self.model}-ep{self.epoch}"
        if self.target_delta_e is not None:  # bicubic-de3, bicubic-de1p5
            return f"{self.model}-de{_name_number(self.target_delta_e)}"
        if self.color_shift is not None:  # bicubic-lab0_4_-2p5
            return f"{self.model}-lab" + "_".join(_name_number(component) for component in self.color_shift)
        return self.model

    @property
    def effective_crop(self) -> int:
        """--crop, or the paper's 1024 (256 with the embedded default photos)."""
        if self.crop is not None:
            return self.crop
        return DEFAULT_CROP if (self.hr or self.hr_list) else EMBEDDED_DEFAULT_CROP

    def validate(self) -> None:
        """The counts, the codec, the dataset name and the crop are in range: one-line errors before anything
        runs (the degrader's options and the checkpoint are checked by the build, which loads them)."""
        if self.codec not in CODECS:
            raise FactoryError(f"unknown codec {self.codec!r}; known: {', '.join(CODECS)}")
        for name, value in (
            ("--shard-size", self.shard_size),
            ("--batch-size", self.batch_size),
            ("--scale", self.scale),
        ):
            if value < 1:
                raise FactoryError(f"{name} must be at least 1, got {value}")
        for name, optional in (  # optional counts: None means the default
            ("--epoch", self.epoch),  # checkpoints are saved after whole epochs, the first after epoch 1
            ("--stride", self.stride),
            ("--limit", self.limit),
            ("--num-cpus", self.num_cpus),
            ("--threads", self.threads),
            ("--max-pixels", self.max_pixels),
        ):
            if optional is not None and optional < 1:
                raise FactoryError(f"{name} must be at least 1, got {optional}")
        if self.actors is not None and self.actors < 0:
            raise FactoryError(
                f"--actors must be at least 0 (0: build in this process, without Ray), got {self.actors}"
            )
        check_dataset_name(self.dataset_name)
        crop = self.effective_crop
        if crop < 16 or crop % self.scale:
            raise FactoryError(f"--crop {crop} must be at least 16 and a multiple of --scale {self.scale}")
