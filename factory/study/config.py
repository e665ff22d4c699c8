"""The study config: one YAML file naming the data, the degraders, the classifier, the SR architectures, the
evaluation sets, the optional colour-shift study and the output folder (studies/smoke.yaml, studies/paper.yaml).

Every section is a frozen dataclass built by `config_from_dict`, so an unknown or misspelt key is a one-line
ConfigError naming the known ones. Paths are kept as written (relative ones are relative to the working directory,
as on the command line), except `photos:<group>`, which names a folder of bundled photos the study copies into
OUT/photos/<group> (the smoke study's data; see `PhotoGroups`)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from factory.config import ConfigError, FactoryError, config_from_dict

PHOTOS_PREFIX = "photos:"  # a path "photos:<group>" is OUT/photos/<group>, made by the study's photos stage
CLASSICAL_DEGRADERS = ("bicubic", "realesrgan", "bsrgan")
NAME_PATTERN = re.compile(
    r"^[A-Za-z0-9][A-Za-z0-9_-]*$"
)  # stage ids join names with '.', so none may hold one


def _name(value: str, what: str) -> str:
    if not isinstance(value, str) or not NAME_PATTERN.match(value):
        raise ConfigError(
            f"{what} {value!r}: use letters, digits, '-' and '_' only (it names folders and stages)"
        )
    return value


def _rates(config: Any, what: str, *names: str) -> None:
    """Float settings as numbers: YAML 1.1 (PyYAML) reads `1e-4` (no dot) as a string, which is taken here as the
    number it spells; anything else that is not a number is a ConfigError."""
    for name in names:
        value = getattr(config, name)
        if value is None or (isinstance(value, int | float) and not isinstance(value, bool)):
            continue
        try:
            object.__setattr__(config, name, float(value))
        except (TypeError, ValueError):
            raise ConfigError(f"{what}.{name}: {value!r} is not a number") from None


def _processes(value: Any, what: str) -> None:
    """A fine-tune's DDP process count: a whole number >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what}.processes: {value!r} is not a whole number >= 1")


def _paths(value: Any, what: str) -> tuple[str, ...]:
    """A path or a list of them, as a tuple of strings."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(item, str) and item for item in items):
        raise ConfigError(f"{what}: give a path or a list of paths")
    return tuple(items)


@dataclass(frozen=True)
class DataConfig:
    hr: tuple[str, ...]  # HR folders the datasets are cut from (`factory build --hr`)
    training: tuple[str, ...] = ()  # images the reconstructors train on (`factory train --data`); () = hr
    crop: int | None = None  # HR crop side (None: the build's default, 1024)
    scale: int = 4  # HR side / LR side
    stride: int | None = None  # crop grid step (None: crop // 2)
    limit: int | None = None  # at most this many crops per dataset (None: all)
    shard_size: int = 1000  # pairs per shard
    codec: str = "png"  # shard payload codec
    seed: int = 0  # the build seed (every dataset's pairs draw from it)
    # build actors (None: one per CPU or GPU of the cluster; 0: in the stage's process)
    actors: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "hr", _paths(self.hr, "data.hr"))
        object.__setattr__(self, "training", _paths(self.training, "data.training") if self.training else ())


@dataclass(frozen=True)
class ReconstructorConfig:
    model: str  # registry name: vqvae, vqvae2, mae, vae, ddim
    epochs: tuple[int, ...]  # checkpoints to build datasets from (the paper: 4, 8, 16, 32, 64)
    preset: str = "paper"  # model preset (tiny: tests and the smoke study)
    epoch_size: int | None = None  # samples per epoch (None: the paper's 45,000)
    image_size: int | None = None  # training crop side (None: the model's native size)
    batch_size: int | None = None  # None: the model's reference batch
    lr: float | None = None  # None: the model's reference rate
    heldout: int = 64  # at most this many training images held out to measure the regime on
    seed: int = 0

    def __post_init__(self):
        epochs = (self.epochs,) if isinstance(self.epochs, int) else tuple(self.epochs)
        if not epochs or not all(isinstance(epoch, int) and epoch >= 1 for epoch in epochs):
            raise ConfigError(f"reconstructor {self.model}: epochs must be whole numbers >= 1")
        object.__setattr__(self, "epochs", tuple(sorted(set(epochs))))
        _name(self.model, "reconstructor model")
        _rates(self, f"reconstructor {self.model}", "lr")


@dataclass(frozen=True)
class ClassifierConfig:
    path: str | None = None  # an existing classifier checkpoint (safetensors); or train one:
    # ClassifierTrainConfig fields (data, arch, per_class, epochs, size, ...)
    train: dict[str, Any] | None = None

    def __post_init__(self):
        if (self.path is None) == (self.train is None):
            raise ConfigError("classifier: give either path (an existing checkpoint) or train (its settings)")
        if self.train is not None and not isinstance(self.train, dict):
            raise ConfigError("classifier.train: give the training settings as a mapping")
        if self.train is not None and "out" in self.train:
            raise ConfigError(
                "classifier.train.out: the study writes it to OUT/classifier/classifier.safetensors"
            )


@dataclass(frozen=True)
class PretrainConfig:
    """SR weights trained from scratch on one of the study's datasets (the smoke study has no official weights)."""

    dataset: str = "bicubic"  # a dataset of the study
    iterations: int = 100
    batch_size: int = 8
    patch_size: int = 32
    learning_rate: float = 2e-4
    preset: str = "tiny"
    seed: int = 0

    def __post_init__(self):
        _rates(self, "pretrained", "learning_rate")


# The fine-tune settings an architecture sets for all its datasets, and `overrides` per dataset.
FINETUNE_SETTINGS = (
    "iterations",
    "batch_size",
    "patch_size",
    "learning_rate",
    "where",
    "loss",
    "vgg_weights",
    "checkpoint_every",
    "seed",
    "processes",
)


@dataclass(frozen=True)
class ArchitectureConfig:
    name: str  # edsr | esrgan | swinir | hat
    # official weights (a path), or a pretraining run (a mapping)
    pretrained: str | PretrainConfig | None = None
    datasets: tuple[str, ...] | str = "all"  # datasets to fine-tune on: "all" or a list of dataset names
    iterations: int = 10_000
    batch_size: int = 16
    patch_size: int = 64
    learning_rate: float = 1e-4
    where: str | None = None  # SQL predicate over the manifest columns (`factory finetune --where`)
    loss: str = "l1"
    vgg_weights: str | None = None  # with loss: esrgan
    checkpoint_every: int = 1000
    seed: int = 0
    # DDP processes of each fine-tune, on one node: N > 1 runs `torchrun --standalone --nproc-per-node N` in the
    # stage's Ray task, which holds N GPUs (N CPUs on a cluster without GPUs). Several nodes for one fine-tune are
    # not offered (deploy/torchrun_on_ray.py does that by hand); N above the largest node's GPUs is refused.
    processes: int = 1
    # per dataset, fine-tune settings that differ from the ones above, e.g. {bicubic: {iterations: 20000}}
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    evalsets: tuple[str, ...] | str = "all"  # evaluation sets of this architecture's runs

    def __post_init__(self):
        _name(self.name, "architecture")
        _rates(self, f"architectures.{self.name}", "learning_rate")
        _processes(self.processes, f"architectures.{self.name}")
        tunable = set(FINETUNE_SETTINGS)
        for dataset, settings in (self.overrides or {}).items():
            unknown = sorted(set(settings) - tunable) if isinstance(settings, dict) else ["(not a mapping)"]
            if unknown:
                raise ConfigError(
                    f"architectures.{self.name}.overrides.{dataset}: unknown setting(s) {unknown}; "
                    f"known: {sorted(tunable)}"
                )
            if "processes" in settings:
                _processes(settings["processes"], f"architectures.{self.name}.overrides.{dataset}")
        if isinstance(self.pretrained, dict):
            object.__setattr__(self, "pretrained", config_from_dict(PretrainConfig, self.pretrained))
        if self.datasets != "all":
            object.__setattr__(
                self, "datasets", tuple(_paths(self.datasets, f"architectures.{self.name}.datasets"))
            )


@dataclass(frozen=True)
class MadeEvalSet:
    """An evaluation set the study makes: HR crops of `hr` degraded by a classical pipeline with a fixed seed."""

    hr: str  # HR folder (not one the datasets are cut from)
    degrader: str = "bsrgan"  # realesrgan | bsrgan | bicubic
    crop: int = 256  # HR crop side
    limit: int | None = None  # at most this many crops
    seed: int = 0


@dataclass(frozen=True)
class EvalSetConfig:
    name: str
    lr: str | None = None  # LR folder of an existing set (NTIRE 2018 Track 3, NTIRE 2020 Track 2) ...
    hr: str | None = None  # ... and its HR folder
    make: MadeEvalSet | None = None  # or make one (written to OUT/evalsets/<name>/lr and /hr)
    y_channel: bool = True  # metrics on BT.601 Y (the paper's protocol)
    crop_border: int = 4  # pixels dropped on each side (the paper's protocol: the scale)

    def __post_init__(self):
        _name(self.name, "evaluation set")
        if isinstance(self.make, dict):
            object.__setattr__(self, "make", config_from_dict(MadeEvalSet, self.make))
        if (self.make is None) == (self.lr is None or self.hr is None) or (
            self.make and (self.lr or self.hr)
        ):
            raise ConfigError(f"evaluation set {self.name}: give either lr and hr folders, or make")


@dataclass(frozen=True)
class ColorShiftConfig:
    # target mean ΔE of each bicubic dataset (0: unshifted; the paper: nine values)
    targets: tuple[float, ...]
    # evaluation sets of these runs (the paper: Set14, B100, Manga109)
    evalsets: tuple[str, ...] | str = "all"
    architecture: str = "swinir"  # trained from scratch on each
    preset: str = "paper"  # its shape
    iterations: int = 10_000
    batch_size: int = 16
    patch_size: int = 64
    learning_rate: float = 2e-4
    checkpoint_every: int = 1000
    seed: int = 0
    processes: int = 1  # DDP processes of each run, on one node (as architectures' `processes`)

    def __post_init__(self):
        targets = tuple(float(target) for target in self.targets)
        if not targets or not all(math.isfinite(target) and target >= 0 for target in targets):
            raise ConfigError("color_shift.targets: give target ΔE values >= 0 (0: bicubic, no shift)")
        object.__setattr__(self, "targets", targets)
        _name(self.architecture, "color_shift.architecture")
        _processes(self.processes, "color_shift")
        _rates(self, "color_shift", "learning_rate")


def color_shift_dataset(target: float) -> str:
    """The dataset name `factory build --target-delta-e X` gets in the study: bicubic-de<X>, '.' written 'p'."""
    return f"bicubic-de{target:g}".replace(".", "p")


@dataclass(frozen=True)
class StudyConfig:
    out: str  # the study folder (layout: factory/study/graph.py)
    data: DataConfig
    reconstructors: tuple[ReconstructorConfig, ...] = ()
    classical: tuple[str, ...] = ("bicubic",)  # classical degraders to build datasets with
    degradation_configs: dict[str, str] = field(default_factory=dict)  # degrader -> its options YAML
    classifier: ClassifierConfig | None = None
    architectures: tuple[ArchitectureConfig, ...] = ()
    evalsets: tuple[EvalSetConfig, ...] = ()
    color_shift: ColorShiftConfig | None = None
    photos: dict[str, tuple[str, ...]] = field(default_factory=dict)  # group -> bundled photo file names
    # torch device of train, fine-tune and eval stages (auto: CUDA where the node has one)
    device: str = "auto"
    lpips_weights: str | None = None  # LPIPS (alex) weights for the evals; None: no LPIPS column

    @property
    def datasets(self) -> tuple[str, ...]:
        """The study's datasets, as `factory build` names them (colour-shift ones aside)."""
        made = [f"{item.model}-ep{epoch}" for item in self.reconstructors for epoch in item.epochs]
        return tuple(made + list(self.classical))


def _section(cls, values: Any, what: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{what}: expected a mapping, got {type(values).__name__}")
    return config_from_dict(cls, values)


def _sections(cls, values: Any, what: str) -> tuple:
    if values is None:
        return ()
    if not isinstance(values, list):
        raise ConfigError(f"{what}: expected a list")
    return tuple(_section(cls, item, f"{what}[{index}]") for index, item in enumerate(values))


def study_from_dict(values: dict[str, Any]) -> StudyConfig:
    """Parse and check a study config (the YAML's top-level mapping)."""
    if not isinstance(values, dict):
        raise ConfigError("a study config is a mapping of sections")
    known = {item.name for item in fields(StudyConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"study config: unknown key(s) {unknown}; known: {sorted(known)}")
    if "out" not in values or "data" not in values:
        raise ConfigError("study config: 'out' (the study folder) and 'data' are required")
    classical = tuple(values.get("classical") or ())
    for name in classical:
        if name not in CLASSICAL_DEGRADERS:
            raise ConfigError(f"classical degrader {name!r}: known: {', '.join(CLASSICAL_DEGRADERS)}")
    photos = values.get("photos") or {}
    if not isinstance(photos, dict):
        raise ConfigError("photos: give a mapping of group name -> bundled photo file names")
    config = StudyConfig(
        out=str(values["out"]),
        data=_section(DataConfig, values["data"], "data"),
        reconstructors=_sections(ReconstructorConfig, values.get("reconstructors"), "reconstructors"),
        classical=classical,
        degradation_configs=dict(values.get("degradation_configs") or {}),
        classifier=None
        if values.get("classifier") is None
        else _section(ClassifierConfig, values["classifier"], "classifier"),
        architectures=_sections(ArchitectureConfig, values.get("architectures"), "architectures"),
        evalsets=_sections(EvalSetConfig, values.get("evalsets"), "evalsets"),
        color_shift=None
        if values.get("color_shift") is None
        else _section(ColorShiftConfig, values["color_shift"], "color_shift"),
        photos={
            _name(group, "photo group"): _paths(names, f"photos.{group}") for group, names in photos.items()
        },
        device=str(values.get("device", "auto")),
        lpips_weights=values.get("lpips_weights"),
    )
    _check_references(config)
    return config


def _check_references(config: StudyConfig) -> None:
    """Names that point elsewhere in the config (datasets, photo groups) must exist, and names must be unique."""
    datasets = config.datasets
    if len(set(datasets)) != len(datasets):
        raise ConfigError(
            f"datasets named twice: {sorted({name for name in datasets if datasets.count(name) > 1})}"
        )
    for what, names in (
        ("architecture", [item.name for item in config.architectures]),
        ("evaluation set", [item.name for item in config.evalsets]),
    ):
        if len(set(names)) != len(names):
            raise ConfigError(f"an {what} is named twice: {names}")
    for architecture in config.architectures:
        wanted = () if architecture.datasets == "all" else architecture.datasets
        pretrain = architecture.pretrained
        if isinstance(pretrain, PretrainConfig):
            wanted = (*wanted, pretrain.dataset)
        for name in wanted:
            if name not in datasets:
                raise ConfigError(
                    f"architecture {architecture.name}: no dataset {name!r}; the study's: {datasets}"
                )
        for name in architecture.overrides:
            if name not in datasets:
                raise ConfigError(f"architectures.{architecture.name}.overrides: no dataset {name!r}")
    evalsets = [item.name for item in config.evalsets]
    chosen = [(f"architectures.{item.name}", item.evalsets) for item in config.architectures]
    if config.color_shift is not None:
        chosen.append(("color_shift", config.color_shift.evalsets))
    for what, names in chosen:
        for name in () if names == "all" else names:
            if name not in evalsets:
                raise ConfigError(f"{what}.evalsets: no evaluation set {name!r}; the config's: {evalsets}")
    if config.architectures and not config.evalsets:
        raise ConfigError("architectures are fine-tuned but no evalsets are given to evaluate them on")
    for path in _all_paths(config):
        if path.startswith(PHOTOS_PREFIX) and path[len(PHOTOS_PREFIX) :] not in config.photos:
            raise ConfigError(f"{path}: no such photo group; the config's: {sorted(config.photos)}")


def _all_paths(config: StudyConfig) -> list[str]:
    paths = [*config.data.hr, *config.data.training]
    paths += [item.make.hr for item in config.evalsets if item.make is not None]
    if config.classifier is not None and config.classifier.train is not None:
        paths.append(str(config.classifier.train.get("data", "")))
    return paths


def load_study(path: str | Path) -> StudyConfig:
    """Read and parse a study config file (YAML, safe loader: no tags, nothing executed)."""
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text())
    except OSError as error:
        raise FactoryError(f"cannot read study config {path}: {error.strerror or error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
    return study_from_dict(values)
