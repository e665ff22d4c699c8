"""The study as a graph of stages: what each stage is made from, what it needs, its fingerprint and its state.

    photos -> train -> build -> label -> stats -> report
                       build -> (pretrain ->) finetune -> eval -> report
    colour shift: build (bicubic shifted to a target ΔE) -> finetune (from scratch) -> eval -> report

The study folder (OUT) holds, besides each stage's outputs (their paths are in `Stage.outputs`):

    study.json               the resolved config (written first)
    stages/<stage-id>.json   one record per finished stage: fingerprint, settings, inputs, start/end, state
    logs/<stage-id>.log      one log per stage; logs/study.log: the driver's start/end lines

A stage's fingerprint hashes its kind, its settings and the fingerprints of the stages it needs, so it follows from
the config alone (a dry run computes it without running anything). A stage is done when its record exists, says
done and holds the same fingerprint; stale when a record exists with another one (the config changed upstream or
here); to run otherwise. A config change therefore reruns exactly the stages downstream of what changed."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from factory.config import FactoryError
from factory.storage import Storage
from factory.study.config import (
    FINETUNE_SETTINGS,
    ArchitectureConfig,
    PretrainConfig,
    StudyConfig,
    color_shift_dataset,
)

RECORDS = "stages"
LOGS = "logs"
STUDY_FILE = "study.json"
STATES = ("done", "stale", "to run")


@dataclass(frozen=True)
class Stage:
    id: str  # kind and names joined by '.', e.g. finetune.edsr.vqvae2-ep8 (also its record and log file names)
    kind: str  # photos, train, build, classifier, label, stats, evalset, pretrain, finetune, eval, report
    settings: dict[str, Any]  # what the stage is made from (JSON); the stage functions read only these
    needs: tuple[str, ...] = ()  # ids of the stages whose outputs it reads
    # paths under OUT it writes: removed before it reruns where it cannot resume
    outputs: tuple[str, ...] = ()
    resumable: bool = False  # its function resumes its own partial output (train, build, finetune)
    accelerated: bool = False  # wants a GPU where the cluster has one (train, fine-tune, eval)
    # model / epoch / dataset / architecture / run / evalset, for readers of the records (the report)
    names: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageState:
    stage: Stage
    fingerprint: str
    state: str  # one of STATES
    record: dict[str, Any] | None  # the stored record, if any


def _stage_id(*parts: str) -> str:
    return ".".join(parts)


def _photo_needs(paths: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    from factory.study.config import PHOTOS_PREFIX

    return tuple(
        _stage_id("photos", path[len(PHOTOS_PREFIX) :]) for path in paths if path.startswith(PHOTOS_PREFIX)
    )


def _photo_stages(config: StudyConfig) -> list[Stage]:
    return [
        Stage(
            _stage_id("photos", group),
            "photos",
            {"group": group, "files": list(files)},
            (),
            (f"photos/{group}",),
            names={"group": group},
        )
        for group, files in config.photos.items()
    ]


def _train_stages(config: StudyConfig) -> list[Stage]:
    data = config.data.training or config.data.hr
    stages = []
    for item in config.reconstructors:
        settings = {
            "model": item.model,
            "data": list(data),
            "epochs": max(item.epochs),
            "save_at": list(item.epochs),
            "preset": item.preset,
            "epoch_size": item.epoch_size,
            "image_size": item.image_size,
            "batch_size": item.batch_size,
            "lr": item.lr,
            "seed": item.seed,
            # the regime is measured at the build's LR size and scale, as `factory build` trains a checkpoint
            "regime_size": (config.data.crop or 1024) // config.data.scale,
            "regime_scale": config.data.scale,
            "heldout": item.heldout,
        }
        stages.append(
            Stage(
                _stage_id("train", item.model),
                "train",
                settings,
                _photo_needs(data),
                (f"checkpoints/{item.model}",),
                resumable=True,
                accelerated=True,
                names={"model": item.model},
            )
        )
    return stages


def _build_settings(config: StudyConfig, dataset: str, model: str, epoch: int | None) -> dict[str, Any]:
    data = config.data
    return {
        "name": dataset,
        "model": model,
        "epoch": epoch,
        "hr": list(data.hr),
        "crop": data.crop,
        "scale": data.scale,
        "stride": data.stride,
        "limit": data.limit,
        "shard_size": data.shard_size,
        "codec": data.codec,
        "seed": data.seed,
        "actors": data.actors,
        "degradation_config": config.degradation_configs.get(model),
    }


def _build_stages(config: StudyConfig) -> list[Stage]:
    stages = []
    hr_needs = _photo_needs(config.data.hr)
    made = [(item.model, epoch) for item in config.reconstructors for epoch in item.epochs]
    for model, epoch in [*made, *[(name, None) for name in config.classical]]:
        dataset = model if epoch is None else f"{model}-ep{epoch}"
        needs = hr_needs if epoch is None else (*hr_needs, _stage_id("train", model))
        stages.append(
            _build_stage(
                dataset,
                _build_settings(config, dataset, model, epoch),
                needs,
                {"dataset": dataset, "model": model, "epoch": epoch},
            )
        )
    if config.color_shift is not None:
        for target in config.color_shift.targets:
            dataset = color_shift_dataset(target)
            settings = _build_settings(config, dataset, "bicubic", None)
            if target > 0:  # 0: the unshifted bicubic pairs, the study's reference point
                settings["target_delta_e"] = target
            stages.append(
                _build_stage(
                    dataset,
                    settings,
                    hr_needs,
                    {"dataset": dataset, "model": "bicubic", "target_delta_e": target},
                )
            )
    return stages


def _build_stage(dataset: str, settings: dict[str, Any], needs: tuple[str, ...], names: dict) -> Stage:
    outputs = (f"shards/{dataset}", f"manifests/{dataset}")
    return Stage(_stage_id("build", dataset), "build", settings, needs, outputs, resumable=True, names=names)


def _label_stages(config: StudyConfig) -> list[Stage]:
    if config.classifier is None:
        return []
    stages = []
    if config.classifier.train is not None:
        train = config.classifier.train
        needs = _photo_needs([str(train.get("data", ""))])
        stages.append(Stage("classifier", "classifier", dict(train), needs, ("classifier",)))
        classifier, classifier_needs = "classifier/classifier.safetensors", ("classifier",)
    else:
        classifier, classifier_needs = config.classifier.path, ()
    for dataset in config.datasets:
        settings = {"dataset": dataset, "classifier": classifier}
        stages.append(
            Stage(
                _stage_id("label", dataset),
                "label",
                settings,
                (_stage_id("build", dataset), *classifier_needs),
                names={"dataset": dataset},
            )
        )
    return stages


def _settled(config: StudyConfig, dataset: str) -> str:
    """The stage after which a dataset's manifests are final (labelled when the study has a classifier; the
    colour-shift datasets are not labelled)."""
    labelled = config.classifier is not None and dataset in config.datasets
    return _stage_id("label" if labelled else "build", dataset)


def _stats_stage(config: StudyConfig) -> list[Stage]:
    if not config.datasets:
        return []
    needs = tuple(_settled(config, dataset) for dataset in config.datasets)
    return [Stage("stats", "stats", {"datasets": list(config.datasets)}, needs, ("stats",))]


def _evalset_stages(config: StudyConfig) -> list[Stage]:
    stages = []
    for item in config.evalsets:
        if item.make is None:
            continue
        settings = {
            "name": item.name,
            "hr": item.make.hr,
            "degrader": item.make.degrader,
            "crop": item.make.crop,
            "limit": item.make.limit,
            "seed": item.make.seed,
            "scale": config.data.scale,
            "degradation_config": config.degradation_configs.get(item.make.degrader),
        }
        stages.append(
            Stage(
                _stage_id("evalset", item.name),
                "evalset",
                settings,
                _photo_needs([item.make.hr]),
                (f"evalsets/{item.name}", f"evalset-work/{item.name}"),
                names={"evalset": item.name},
            )
        )
    return stages


def _finetune_settings(
    architecture: ArchitectureConfig, dataset: str, pretrained: str | None
) -> dict[str, Any]:
    settings = {name: getattr(architecture, name) for name in FINETUNE_SETTINGS}
    settings.update(architecture.overrides.get(dataset, {}))
    _one_process_unwritten(settings)
    return {
        "architecture": architecture.name,
        "dataset": dataset,
        "pretrained": pretrained,
        "preset": "paper",
        **settings,
    }


def _one_process_unwritten(settings: dict[str, Any]) -> None:
    """`processes` is in a fine-tune's settings (and so its fingerprint) only when it is not 1: a study made before
    the setting existed keeps its fine-tunes done."""
    if settings.get("processes") == 1:
        del settings["processes"]


def _sr_stages(config: StudyConfig) -> list[Stage]:
    """Pretraining (where configured), fine-tunes and their evals, for each architecture (Tables 1 and 2)."""
    stages = []
    for architecture in config.architectures:
        weights, weight_needs = architecture.pretrained, ()
        if isinstance(weights, PretrainConfig):
            stages.append(_pretrain_stage(config, architecture.name, weights))
            weights, weight_needs = f"pretrain/{architecture.name}/model.pth", (stages[-1].id,)
        evalsets = architecture.evalsets
        stages += _eval_stages(config, architecture.name, "pretrained", weights, weight_needs, evalsets)
        datasets = config.datasets if architecture.datasets == "all" else architecture.datasets
        for dataset in datasets:
            settings = _finetune_settings(architecture, dataset, weights)
            stages.append(_finetune_stage(config, settings, weight_needs))
            weights_here = f"finetune/{architecture.name}/{dataset}/model.pth"
            stages += _eval_stages(
                config, architecture.name, dataset, weights_here, (stages[-1].id,), evalsets
            )
    return stages


def _color_shift_stages(config: StudyConfig) -> list[Stage]:
    """Figures 10 and 11: the architecture trained from scratch on each shifted bicubic dataset, and its evals."""
    stages: list[Stage] = []
    shift = config.color_shift
    if shift is not None:
        for target in shift.targets:
            dataset = color_shift_dataset(target)
            settings = {
                "architecture": shift.architecture,
                "dataset": dataset,
                "pretrained": None,
                "preset": shift.preset,
                "iterations": shift.iterations,
                "batch_size": shift.batch_size,
                "patch_size": shift.patch_size,
                "learning_rate": shift.learning_rate,
                "where": None,
                "loss": "l1",
                "vgg_weights": None,
                "checkpoint_every": shift.checkpoint_every,
                "seed": shift.seed,
                "processes": shift.processes,
                "from_scratch": True,
            }
            _one_process_unwritten(settings)
            stages.append(_finetune_stage(config, settings, ()))
            weights_here = f"finetune/{shift.architecture}/{dataset}/model.pth"
            stages += _eval_stages(
                config, shift.architecture, dataset, weights_here, (stages[-1].id,), shift.evalsets
            )
    return stages


def _pretrain_stage(config: StudyConfig, architecture: str, pretrain: PretrainConfig) -> Stage:
    settings = {
        "architecture": architecture,
        "dataset": pretrain.dataset,
        "pretrained": None,
        "preset": pretrain.preset,
        "iterations": pretrain.iterations,
        "batch_size": pretrain.batch_size,
        "patch_size": pretrain.patch_size,
        "learning_rate": pretrain.learning_rate,
        "where": None,
        "loss": "l1",
        "vgg_weights": None,
        "checkpoint_every": pretrain.iterations,
        "seed": pretrain.seed,
        "out": f"pretrain/{architecture}",
    }
    return Stage(
        _stage_id("pretrain", architecture),
        "pretrain",
        settings,
        (_settled(config, pretrain.dataset),),
        (f"pretrain/{architecture}",),
        resumable=True,
        accelerated=True,
        names={"architecture": architecture, "dataset": pretrain.dataset},
    )


def _finetune_stage(config: StudyConfig, settings: dict[str, Any], weight_needs: tuple[str, ...]) -> Stage:
    architecture, dataset = settings["architecture"], settings["dataset"]
    settings = {**settings, "out": f"finetune/{architecture}/{dataset}"}
    return Stage(
        _stage_id("finetune", architecture, dataset),
        "finetune",
        settings,
        (_settled(config, dataset), *weight_needs),
        (settings["out"],),
        resumable=True,
        accelerated=True,
        names={
            "architecture": architecture,
            "dataset": dataset,
            "from_scratch": bool(settings.get("from_scratch")),
        },
    )


def _eval_stages(
    config: StudyConfig,
    architecture: str,
    run: str,
    weights: str | None,
    weight_needs: tuple[str, ...],
    evalsets: tuple[str, ...] | str,
) -> list[Stage]:
    if weights is None:
        return []  # an architecture without pretrained weights has no "pretrained" row
    stages = []
    for item in config.evalsets:
        if evalsets != "all" and item.name not in evalsets:
            continue
        made = item.make is not None
        settings = {
            "architecture": architecture,
            "run": run,
            "evalset": item.name,
            "model": weights,
            "lr": f"evalsets/{item.name}/lr" if made else item.lr,
            "hr": f"evalsets/{item.name}/hr" if made else item.hr,
            "in_study": made,  # lr and hr are under OUT
            "y_channel": item.y_channel,
            "crop_border": item.crop_border,
            "lpips_weights": config.lpips_weights,
            "out": f"eval/{architecture}/{run}/{item.name}",
        }
        needs = (*weight_needs, *([_stage_id("evalset", item.name)] if made else []))
        stages.append(
            Stage(
                _stage_id("eval", architecture, run, item.name),
                "eval",
                settings,
                needs,
                (settings["out"],),
                accelerated=True,
                names={"architecture": architecture, "run": run, "evalset": item.name},
            )
        )
    return stages


def build_graph(config: StudyConfig) -> list[Stage]:
    """Every stage of the study, each after the stages it needs (a topological order)."""
    stages = [
        *_photo_stages(config),
        *_train_stages(config),
        *_build_stages(config),
        *_label_stages(config),
        *_stats_stage(config),
        *_evalset_stages(config),
        *_sr_stages(config),
        *_color_shift_stages(config),
    ]
    if stages:
        stages.append(
            Stage(
                "report",
                "report",
                {},
                tuple(stage.id for stage in stages),
                ("report.md", "report.html", "report"),
            )
        )
    ids = [stage.id for stage in stages]
    if len(set(ids)) != len(ids):
        raise FactoryError(f"two stages share an id: {sorted({i for i in ids if ids.count(i) > 1})}")
    known: set[str] = set()
    for stage in stages:
        missing = [need for need in stage.needs if need not in known]
        if missing:  # a config refers to something no stage makes (caught by the config checks first)
            raise FactoryError(f"stage {stage.id} needs {missing}, which no stage makes")
        known.add(stage.id)
    return stages


def fingerprints(stages: list[Stage]) -> dict[str, str]:
    """Stage id -> sha256 of (kind, settings, the fingerprints of the stages it needs)."""
    result: dict[str, str] = {}
    for stage in stages:
        payload = {
            "kind": stage.kind,
            "settings": stage.settings,
            "needs": {need: result[need] for need in stage.needs},
        }
        result[stage.id] = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return result


def read_record(root: Storage, stage_id: str) -> dict[str, Any] | None:
    """The stage's stored record, or None (none yet, or unreadable: a record is written atomically, so an
    unreadable one was not written by us and is treated as absent)."""
    relative = f"{RECORDS}/{stage_id}.json"
    if not root.exists(relative):
        return None
    try:
        return json.loads(root.read_bytes(relative))
    except (ValueError, OSError):
        return None


def stage_states(stages: list[Stage], root: Storage) -> list[StageState]:
    """Each stage's state against the records under `root` (the study folder); reads only."""
    prints = fingerprints(stages)
    states = []
    for stage in stages:
        record = read_record(root, stage.id)
        if record is None:
            state = "to run"
        elif record.get("state") == "done" and record.get("fingerprint") == prints[stage.id]:
            state = "done"
        else:
            state = "stale"
        states.append(StageState(stage, prints[stage.id], state, record))
    return states


def upstream(stages: list[Stage], roots: set[str]) -> set[str]:
    """The ids of `roots` and of every stage they need, directly or not."""
    by_id = {stage.id: stage for stage in stages}
    found: set[str] = set()
    pending = list(roots)
    while pending:
        stage_id = pending.pop()
        if stage_id not in found:
            found.add(stage_id)
            pending += by_id[stage_id].needs
    return found
