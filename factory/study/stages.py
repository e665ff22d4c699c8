"""What each kind of stage does: it calls the factory's own stage function in-process (train, build, label, stats,
finetune, evaluate, export, the report) with a config built from the stage's settings, and returns a small summary
for its record. Paths in the settings are as the config wrote them, or relative to the study folder (OUT) for what
the study makes (`photos:<group>` is OUT/photos/<group>).

The runner calls `run_stage`; nothing here knows about Ray, records or logs."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from factory.config import FactoryError
from factory.study.config import PHOTOS_PREFIX
from factory.study.graph import Stage

if TYPE_CHECKING:  # imported where used: a stage pays for torch only when it trains
    from factory.finetune import FinetuneConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageContext:
    out: Path  # the study folder
    device: str  # torch device for this stage ("cpu", "cuda"; resolved on the node that runs it)
    accelerated: bool  # the stage holds a GPU


def study_path(context: StageContext, path: str | None) -> str | None:
    """A config path as the stage functions take it: `photos:<group>` -> OUT/photos/<group>; others as given."""
    if path is None:
        return None
    if path.startswith(PHOTOS_PREFIX):
        return str(context.out / "photos" / path[len(PHOTOS_PREFIX) :])
    return path


def _inside(context: StageContext, relative: str) -> str:
    return str(context.out / relative)


def run_photos(stage: Stage, context: StageContext) -> dict[str, Any]:
    """Copy bundled scikit-image photos into OUT/photos/<group> (atomically: a temporary folder, then a rename)."""
    import skimage.data

    target = context.out / "photos" / stage.settings["group"]
    staging = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in stage.settings["files"]:
        source = Path(skimage.data.data_dir) / name
        if not source.is_file():
            raise FactoryError(
                f"photos.{stage.settings['group']}: {name} is not one of scikit-image's bundled files"
            )
        shutil.copyfile(source, staging / name)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    return {"photos": len(stage.settings["files"])}


def run_train(stage: Stage, context: StageContext) -> dict[str, Any]:
    from factory.train import TrainConfig, train

    settings = dict(stage.settings)
    config = TrainConfig(
        **{
            **settings,
            "data": tuple(study_path(context, item) for item in settings["data"]),
            "save_at": tuple(settings["save_at"]),
        },
        checkpoints=_inside(context, "checkpoints"),
        device=context.device,
        workers=2 if context.accelerated else 0,
        progress=False,
    )
    result = train(config)
    for line in result.summary_lines():
        log.info("%s", line)
    return {
        "checkpoints": [
            str(Path(path).relative_to(context.out)) for path in [*result.checkpoints, *result.existing]
        ],
        "final_loss": result.final_loss,
        "regimes": {str(k): v for k, v in result.regimes.items()},
    }


def _build_config(stage: Stage, context: StageContext):
    from factory.build import BuildConfig

    settings = stage.settings
    # the colour-shift datasets (Figures 10, 11): `factory build --model bicubic --target-delta-e X`
    colour_shift = {"target_delta_e": settings["target_delta_e"]} if "target_delta_e" in settings else {}
    return BuildConfig(
        hr=tuple(study_path(context, item) for item in settings["hr"]),
        model=settings["model"],
        epoch=settings["epoch"],
        degradation_config=settings["degradation_config"],
        checkpoints=_inside(context, "checkpoints"),
        train_missing=False,
        scale=settings["scale"],
        crop=settings["crop"],
        stride=settings["stride"],
        limit=settings["limit"],
        out=_inside(context, "shards"),
        manifests=_inside(context, "manifests"),
        name=settings["name"],
        shard_size=settings["shard_size"],
        codec=settings["codec"],
        seed=settings["seed"],
        actors=settings["actors"],
        device="cuda" if context.device.startswith("cuda") else "auto",
        progress=False,
        command=f"factory study: stage {stage.id}",
        **colour_shift,
    )


def run_build(stage: Stage, context: StageContext) -> dict[str, Any]:
    """`factory build` with the study's data settings; it resumes itself (committed shards are kept)."""
    from factory.build import build

    result = build(_build_config(stage, context))
    for line in result.summary_lines():
        log.info("%s", line)
    return {
        "dataset": result.dataset,
        "pairs": result.pairs,
        "built_shards": result.built_shards,
        "skipped_shards": result.skipped_shards,
        "delta_e_mean": result.delta_e_mean,
    }


def run_classifier(stage: Stage, context: StageContext) -> dict[str, Any]:
    from factory.classifier.training import ClassifierTrainConfig, train_classifier
    from factory.config import config_from_dict

    settings = {**stage.settings, "data": study_path(context, str(stage.settings.get("data", "")))}
    settings.setdefault("device", "cuda" if context.device.startswith("cuda") else "cpu")
    out = context.out / "classifier" / "classifier.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = train_classifier(config_from_dict(ClassifierTrainConfig, {**settings, "out": str(out)}))
    return {"checkpoint": str(result.checkpoint.relative_to(context.out)), "accuracy": result.accuracy}


def run_label(stage: Stage, context: StageContext) -> dict[str, Any]:
    from factory.classifier.relabel import LabelConfig, label_dataset

    classifier = stage.settings["classifier"]
    if classifier == "classifier/classifier.safetensors":  # the study's own
        classifier = _inside(context, classifier)
    config = LabelConfig(
        classifier=classifier,
        shards=_inside(context, "shards"),
        manifests=_inside(context, "manifests"),
        dataset=stage.settings["dataset"],
        device="cuda" if context.device.startswith("cuda") else "cpu",
    )
    result = label_dataset(config)
    return {"pairs": result.pairs, "entropy": result.entropy.get(stage.settings["dataset"])}


def run_stats(stage: Stage, context: StageContext) -> dict[str, Any]:
    """`factory stats --json --plots`: OUT/stats/stats.json and the figures beside it."""
    from factory.stats import StatsConfig, dataset_stats

    folder = context.out / "stats"
    report = dataset_stats(StatsConfig(manifests_root=context.out / "manifests", plots=folder / "figures"))
    temporary = folder / ".stats.json.tmp"
    temporary.write_text(report.to_json())
    os.replace(temporary, folder / "stats.json")
    return {"datasets": len(report.datasets), "figures": len(report.figures)}


def run_evalset(stage: Stage, context: StageContext) -> dict[str, Any]:
    """An evaluation set made here: the HR folder cut into crops and degraded by a classical pipeline with a fixed
    seed (`factory build`), then exported as PNG folders (`factory export`): OUT/evalsets/<name>/lr and /hr."""
    from factory.build import BuildConfig, build
    from factory.export import ExportConfig, export_basicsr

    settings = stage.settings
    name = settings["name"]
    work = context.out / "evalset-work" / name
    shutil.rmtree(work, ignore_errors=True)  # made whole each time: a few crops
    build(
        BuildConfig(
            hr=(study_path(context, settings["hr"]),),
            model=settings["degrader"],
            degradation_config=settings["degradation_config"],
            scale=settings["scale"],
            crop=settings["crop"],
            limit=settings["limit"],
            seed=settings["seed"],
            out=str(work / "shards"),
            manifests=str(work / "manifests"),
            name=f"evalset-{name}",
            actors=0,
            progress=False,
            command=f"factory study: stage {stage.id}",
        )
    )
    target = context.out / "evalsets" / name
    shutil.rmtree(target, ignore_errors=True)
    summary = export_basicsr(
        ExportConfig(
            shards_root=str(work / "shards"), manifests_root=str(work / "manifests"), where=None, out=target
        )
    )
    return {"pairs": summary.pairs}


def _finetune_done(out: Path, iterations: int) -> bool:
    """A run that reached its iterations (its weights are written before its last checkpoint)."""
    from factory.finetune import saved_checkpoints

    return (out / "model.pth").is_file() and max(saved_checkpoints(out), default=0) >= iterations


def _finetune_config(stage: Stage, context: StageContext) -> FinetuneConfig:
    """The stage's settings as `factory finetune`'s config (paths under OUT made absolute)."""
    from factory.finetune import FinetuneConfig

    settings = stage.settings
    pretrained = settings["pretrained"]
    if pretrained is not None and pretrained.startswith(("pretrain/", "finetune/")):
        pretrained = _inside(context, pretrained)
    return FinetuneConfig(
        architecture=settings["architecture"],
        pretrained=pretrained,
        preset=settings["preset"],
        shards=(_inside(context, f"shards/{settings['dataset']}"),),
        manifests=_inside(context, "manifests"),
        where=settings["where"],
        iterations=settings["iterations"],
        batch_size=settings["batch_size"],
        patch_size=settings["patch_size"],
        learning_rate=settings["learning_rate"],
        checkpoint_every=settings["checkpoint_every"],
        loss=settings["loss"],
        vgg_weights=settings["vgg_weights"],
        seed=settings["seed"],
        out=str(context.out / settings["out"]),
        workers=None if context.accelerated else 0,
        log_every=max(1, min(50, settings["iterations"] // 4)),
    )


def run_finetune(stage: Stage, context: StageContext) -> dict[str, Any]:
    """`factory finetune` on one dataset (also the pretraining and the colour-shift runs from scratch); it resumes
    from its newest checkpoint. One process runs it here; `processes: N` > 1 runs it under torchrun (DDP)."""
    settings = stage.settings
    out = context.out / settings["out"]
    processes = settings.get("processes", 1)
    if _finetune_done(out, settings["iterations"]):
        log.info("%s already reached iteration %d; its weights stand", out, settings["iterations"])
        return {
            "weights": f"{settings['out']}/model.pth",
            "iterations": settings["iterations"],
            "processes": processes,
        }
    config = _finetune_config(stage, context)
    if processes > 1:
        return _finetune_under_torchrun(config, processes, context)
    from factory.finetune import finetune

    result = finetune(config)
    return {
        "weights": str(result.weights.relative_to(context.out)),
        "iterations": result.iterations,
        "processes": 1,
        "final_loss": result.final_loss,
        "patches_per_second": result.patches_per_second,
    }


def _finetune_under_torchrun(config: FinetuneConfig, processes: int, context: StageContext) -> dict[str, Any]:
    """`torchrun --standalone --nproc-per-node N ... factory finetune` in a subprocess of this stage's task (which
    holds the node's N GPUs, or N CPUs: gloo), its output into the stage's log; a non-zero exit fails the stage.
    A rank that fails ends torchrun with its status. If this task's worker dies, Ray ends its child processes,
    torchrun among them, and the ranks end with torchrun (factory/finetune.py); the retried task resumes from the
    newest checkpoint (tests/test_study.py kills the worker to show it)."""
    import subprocess
    import sys

    from factory.finetune import single_node_finetune_command

    command = single_node_finetune_command(config, processes)
    log.info("%d processes: %s", processes, " ".join(command))
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    ) as launcher:
        rank_error = (
            ""  # the first rank's one-line refusal (`factory` prints "error: ..."), for the driver's line
        )
        for line in launcher.stdout:  # into the stage's log as it comes (stdout is the log here)
            sys.stdout.write(line)
            if not rank_error and line.startswith("error: "):
                rank_error = line.strip()[len("error: ") :]
        status = launcher.wait()
    out = Path(config.out)
    if status != 0:
        raise FactoryError(
            f"torchrun ({processes} processes) exited with status {status}"
            + (f": {rank_error}" if rank_error else "; see the log")
        )
    if not _finetune_done(out, config.iterations):
        raise FactoryError(
            f"torchrun exited with 0 but {out} holds no model.pth at {config.iterations} iterations"
        )
    lines = (out / "log.jsonl").read_text().splitlines()
    return {
        "weights": str((out / "model.pth").relative_to(context.out)),
        "iterations": config.iterations,
        "processes": processes,
        "final_loss": json.loads(lines[-1])["loss"] if lines else float("nan"),
    }


def run_eval(stage: Stage, context: StageContext) -> dict[str, Any]:
    from factory.evaluate import EvalConfig, evaluate

    settings = stage.settings
    model = settings["model"]
    if model.startswith(("pretrain/", "finetune/")):
        model = _inside(context, model)
    lr, hr = settings["lr"], settings["hr"]
    if settings["in_study"]:
        lr, hr = _inside(context, lr), _inside(context, hr)
    config = EvalConfig(
        model=model,
        lr=lr,
        hr=hr,
        out=_inside(context, settings["out"]),
        y_channel=settings["y_channel"],
        crop_border=settings["crop_border"],
        lpips_weights=settings["lpips_weights"],
        architecture=settings["architecture"],
        device=context.device,
    )
    summary = evaluate(config)
    return {"images": summary.images, "psnr": summary.psnr, "ssim": summary.ssim, "lpips": summary.lpips}


def run_report(stage: Stage, context: StageContext) -> dict[str, Any]:
    from factory.study.report import write_report

    paths = write_report(context.out)
    return {name: str(Path(value).relative_to(context.out)) for name, value in vars(paths).items()}


STAGE_FUNCTIONS: dict[str, Callable[[Stage, StageContext], dict[str, Any]]] = {
    "photos": run_photos,
    "train": run_train,
    "build": run_build,
    "classifier": run_classifier,
    "label": run_label,
    "stats": run_stats,
    "evalset": run_evalset,
    "pretrain": run_finetune,
    "finetune": run_finetune,
    "eval": run_eval,
    "report": run_report,
}


def run_stage(stage: Stage, context: StageContext) -> dict[str, Any]:
    """Run one stage; returns the summary its record keeps."""
    return STAGE_FUNCTIONS[stage.kind](stage, context)
