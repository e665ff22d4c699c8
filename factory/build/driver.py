"""The build's driver: plan, train a missing checkpoint, build every uncommitted shard, write rejects and the card.

    factory build --model vqvae2 --epoch 8 --out shards/          # the embedded default HR set, 256 crops
    factory build --hr DIV2K_train_HR/ --hr Flickr2K_HR/ --model vqvae2 --epoch 8 --out shards/
    factory build --hr DIV2K_train_HR/ --model realesrgan --degradation-config train_realesrnet_x4plus.yml

What a pair is, and how it is measured: `factory.build.worker`. The driver plans shard tasks (`factory.build.plan`),
skips the shards whose manifest already commits them under the same settings (resume; `factory.build.identity`),
and hands the rest to a pool of worker actors (`factory.build.pool`, the one place that calls Ray), or to one worker
in this process (`--actors 0`). Each worker writes a shard's tar under a temporary name and renames it, then its
manifest (also atomically), whose presence commits the shard. A shard whose actor dies is given to a fresh actor;
rewriting it is harmless because its name and bytes are determined by the plan. The card comes last
(`factory.build.card`).
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from factory.build.card import write_card
from factory.build.config import BuildConfig, reconstructs
from factory.build.identity import build_settings, committed, different_build_error, refusal
from factory.build.plan import BuildPlan, ShardTask, plan_build
from factory.build.pool import run_in_process, run_on_ray
from factory.build.result import BuildResult
from factory.build.worker import ShardSummary, ShardWorker, WorkerSettings
from factory.config import FactoryError
from factory.manifests import LOCK_NAME, REJECTS_NAME, read_commit, read_manifest, write_rejects
from factory.sources import SourceFile
from factory.storage import OutputLock, Storage

if TYPE_CHECKING:
    from factory.train import TrainConfig

log = logging.getLogger(__name__)

# Compressed size / raw pixel bytes, for --dry-run's estimate (measured on a real photo, FACTS.md).
_CODEC_RATIO = {"png": 0.32, "zst": 0.45}


def build(config: BuildConfig, worker_class: type[ShardWorker] = ShardWorker) -> BuildResult:
    """Plan, (train the checkpoint if missing,) build every uncommitted shard with `worker_class` workers, write
    the rejects and the card."""
    config.validate()
    # The embedded Ray runs here, so the device must exist here; a cluster's nodes may have what the driver lacks.
    if config.address is None:
        from factory.devices import resolve_device

        resolve_device(config.device)
    started = time.perf_counter()
    # What a run checks before it writes anything (training a missing checkpoint included), the dry run checks too;
    # before the plan, which reads every input's header.
    options = degradation_options(config)
    checkpoint = checkpoint_to_use(config)
    if config.classifier:
        from factory.classifier.labeler import Labeler

        Labeler.load(config.classifier)  # a wrong classifier is a one-line error before any work
    plan = plan_build(config)
    result = BuildResult(dataset=plan.dataset, plan=plan.describe(), rejects=list(plan.rejects))
    if config.dry_run:
        return _dry_run(config, plan, result, checkpoint, options)
    if plan.crops == 0:
        raise FactoryError(
            f"nothing could be built: all {plan.sources} inputs were rejected ({_reasons(plan.rejects)})"
        )
    checkpoint = ensure_checkpoint(config, list(plan.source_files))
    checkpoint_sha256 = None if checkpoint is None else _load_checkpoint(config, checkpoint)
    shards, manifests = Storage(config.out), Storage(config.manifests)
    identity = build_settings(config, checkpoint_sha256, options)
    with OutputLock(manifests, f"{plan.dataset}/{LOCK_NAME}", "build", f"dataset {plan.dataset}"):
        todo, earlier = _prepare_output(shards, manifests, plan, identity, result)
        settings = worker_settings(config, plan, checkpoint, identity, options)
        run = _run_shards(config, settings, todo, shards, manifests, plan.dataset, worker_class)
        result.built_shards = len(run.summaries)
        result.pairs = sum(int(commit.get("pairs", 0)) for commit in earlier.values())
        result.pairs += sum(summary.pairs for summary in run.summaries)
        result.output_bytes = sum(int(commit.get("shard_bytes", 0)) for commit in earlier.values())
        result.output_bytes += sum(summary.shard_bytes for summary in run.summaries)
        result.busy_seconds = run.busy_seconds
        result.pairs_per_second = run.pairs_per_second
        shard_rejects = [row for commit in earlier.values() for row in commit.get("rejects", [])]
        result.rejects = _unique_rejects(plan.rejects + shard_rejects + run.rejects)
        write_rejects(manifests, f"{plan.dataset}/{REJECTS_NAME}", result.rejects)
        if result.pairs == 0:
            raise FactoryError(
                f"nothing could be built: every input was rejected ({_reasons(result.rejects)})"
            )
        if todo and earlier:  # a resume: are this run's pairs labelled as the earlier ones?
            earlier_tasks = [task for task in plan.shards if task.index in earlier]
            result.labels_note = _labels_note(manifests, plan.dataset, earlier_tasks, todo)
        result.seconds = time.perf_counter() - started
        card = write_card(config, plan, manifests, checkpoint, checkpoint_sha256, options, result)
        result.delta_e_mean = (card.get("delta_e") or {}).get("mean")
    return result


def _prepare_output(
    shards: Storage, manifests: Storage, plan: BuildPlan, identity: dict[str, Any], result: BuildResult
) -> tuple[list[ShardTask], dict[int, dict]]:
    """Make the dataset's folders, sweep an interrupted build's temporaries, and split the plan: the shards still
    to build, and the commit records of those already committed by this build (resume; counted in
    `result.skipped_shards`). A shard committed by another build is an error (`identity.committed`)."""
    shards.make_dirs(plan.dataset)
    manifests.make_dirs(plan.dataset)
    removed = shards.remove_temporaries(plan.dataset) + manifests.remove_temporaries(plan.dataset)
    if removed:
        log.info("removed %d temporary file(s) of an interrupted build", removed)
    todo, earlier = [], {}
    for task in plan.shards:
        commit = committed(shards, manifests, plan.dataset, task, identity)
        if commit is None:
            todo.append(task)
        else:
            earlier[task.index] = commit
    result.skipped_shards = len(earlier)
    if earlier:
        log.warning(
            "%d of %d shards already committed; building the other %d",
            len(earlier),
            len(plan.shards),
            len(todo),
        )
    return todo, earlier


@dataclass
class ShardRun:
    """What this run's workers did."""

    summaries: list[ShardSummary] = field(default_factory=list)
    rejects: list[dict[str, str]] = field(default_factory=list)  # inputs that failed to decode in the workers
    busy_seconds: float = 0.0  # first shard started to last one finished, on the workers' clocks
    pairs_per_second: float = 0.0  # this run's pairs / wall time of the pool (start-up included)


def _run_shards(
    config: BuildConfig,
    settings: WorkerSettings,
    todo: list[ShardTask],
    shards: Storage,
    manifests: Storage,
    dataset: str,
    worker_class: type[ShardWorker],
) -> ShardRun:
    """Build the shards of `todo`, on Ray or (`--actors 0`) in this process."""
    run = ShardRun()

    def on_done(task: ShardTask, summary: ShardSummary) -> None:
        run.summaries.append(summary)
        run.rejects.extend(summary.rejects)

    started = time.perf_counter()
    try:
        if todo and config.actors == 0:
            run_in_process(config, settings, todo, on_done, worker_class)
        elif todo:
            run_on_ray(config, settings, todo, on_done, worker_class)
    except BaseException:
        # A worker cleans up after its own errors; this sweeps what the actors stopped mid-shard left (each shard
        # writes its tar, then its manifest, under temporary names). Committed shards are not touched.
        shards.remove_temporaries(dataset)
        manifests.remove_temporaries(dataset)
        raise
    seconds = time.perf_counter() - started
    if run.summaries:
        first = min(summary.started for summary in run.summaries)
        run.busy_seconds = max(summary.started + summary.seconds for summary in run.summaries) - first
        pairs = sum(summary.pairs for summary in run.summaries)
        run.pairs_per_second = pairs / seconds if pairs and seconds > 0 else 0.0
    return run


def worker_settings(
    config: BuildConfig,
    plan: BuildPlan,
    checkpoint: Path | None,
    identity: dict[str, Any],
    options: dict[str, Any],
) -> WorkerSettings:
    """What every worker gets: the build's options as plain values, and its identity to record in each commit."""
    return WorkerSettings(
        dataset=plan.dataset,
        model=config.model,
        checkpoint=None if checkpoint is None else str(checkpoint),
        epoch=config.epoch if reconstructs(config.model) else None,
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
        build_settings=identity,
        threads=config.threads,
        bf16=config.bf16,
        degradation_options=options,
    )


def _dry_run(
    config: BuildConfig,
    plan: BuildPlan,
    result: BuildResult,
    checkpoint: Path | None,
    options: dict[str, Any],
) -> BuildResult:
    """The plan, the estimates, which checkpoint the build would use or train first, and whether the real run
    would be refused because the dataset holds another build's shards."""
    import torch

    result.estimated_bytes = _estimate_bytes(plan, config)
    gpus = torch.cuda.device_count() if config.device != "cpu" else 0
    result.actors = (
        config.actors if config.actors is not None else (gpus or config.num_cpus or os.cpu_count() or 1)
    )
    checkpoint_sha256 = None
    if checkpoint is None:
        degrades = "the LR is not degraded" if config.model == "bicubic" else "it degrades the HR itself"
        result.checkpoint_plan = f"none ({config.model}: {degrades})"
    elif checkpoint.is_file():
        checkpoint_sha256 = _load_checkpoint(config, checkpoint)
        result.checkpoint_plan = f"{checkpoint} (sha256 {checkpoint_sha256[:12]})"
    else:
        _, shipped = _training_for(config, plan.source_files)
        result.checkpoint_plan = (
            f"{checkpoint} is missing: copied first from the one shipped with factory for this run ({shipped})"
            if shipped is not None
            else f"{checkpoint} is missing: {config.model} is trained to epoch {config.epoch} first"
        )
    if checkpoint is None or checkpoint_sha256 is not None:  # a checkpoint still to train has no digest yet
        result.refusal = _refusal(config, plan, build_settings(config, checkpoint_sha256, options))
    return result


def _refusal(config: BuildConfig, plan: BuildPlan, identity: dict[str, Any]) -> str | None:
    """What the real run would refuse with: the first shard of the plan that another build committed."""
    manifests = Storage(config.manifests)
    for task in plan.shards:
        commit = read_commit(manifests, f"{plan.dataset}/{task.stem}.parquet")
        why = None if commit is None else refusal(commit, task, identity)
        if why is not None:
            return different_build_error(plan.dataset, task, why, Storage(config.out), manifests)
    return None


def checkpoint_to_use(config: BuildConfig) -> Path | None:
    """The checkpoint file of `--model/--epoch`, there or to be trained (None for the degraders that are not
    reconstructors). A missing checkpoint under --no-train is a one-line error."""
    if not reconstructs(config.model):
        return None
    from factory.checkpoints import checkpoint_path

    path = checkpoint_path(config.checkpoints, config.model, config.epoch)
    if not path.is_file() and not config.train_missing:
        raise FactoryError(f"checkpoint {path} not found (train it with `factory train`, or drop --no-train)")
    return path


def ensure_checkpoint(config: BuildConfig, sources: list[SourceFile]) -> Path | None:
    """The checkpoint file of `--model/--epoch`; when missing (and not --no-train) it is trained first, or, for the
    embedded default, copied from the checkpoint shipped with the package for the same run."""
    path = checkpoint_to_use(config)
    if path is None or path.is_file():
        return path
    from factory.train import copy_shipped_checkpoint, train

    training, shipped = _training_for(config, sources)
    if shipped is not None:
        log.warning(
            "checkpoint %s not found: copying the one shipped with factory for this run (%s epoch %d of the "
            "embedded default's recipe; --no-shipped-checkpoint trains it here)",
            path,
            config.model,
            config.epoch,
        )
        copy_shipped_checkpoint(shipped, training)
    else:
        log.warning(
            "checkpoint %s not found: training %s to epoch %d first", path, config.model, config.epoch
        )
        train(training)
    if not path.is_file():
        raise FactoryError(f"training finished but {path} was not written")
    return path


def _training_for(config: BuildConfig, sources: Sequence[SourceFile]) -> tuple[TrainConfig, Path | None]:
    """The training run that writes a missing checkpoint, and the shipped checkpoint of that run (embedded default
    only, unless --no-shipped-checkpoint), or None."""
    from factory.train import shipped_checkpoint, training_for_build

    embedded_default = not (config.hr or config.hr_list or config.train_data)
    training = training_for_build(
        model=config.model,
        epoch=config.epoch,
        checkpoints=config.checkpoints,
        data=config.train_data or tuple(source.path for source in sources),
        preset=config.preset,
        seed=config.seed,
        embedded_default_lr_size=config.effective_crop // config.scale if embedded_default else None,
        progress=config.progress,
    )
    use_shipped = embedded_default and config.shipped_checkpoint
    return training, shipped_checkpoint(training) if use_shipped else None


def _estimate_bytes(plan: BuildPlan, config: BuildConfig) -> int:
    raw = plan.crop * plan.crop * 3
    per_pair = raw * (1 + 1 / config.scale**2) * _CODEC_RATIO[config.codec] + 4 * 512 + 1200  # headers, json
    return int(plan.crops * per_pair)


def degradation_options(config: BuildConfig) -> dict[str, Any]:
    """The classical degrader's options from --degradation-config and --color-shift / --target-delta-e ({} without
    them), checked by building the degrader here: an unknown degrader, a bad option, or an --epoch that does not fit
    --model is a one-line error before any work. The scale comes from --scale (a file may repeat it, not contradict it)."""
    from factory.degraders import DEGRADER_NAMES, get_degrader, load_options

    shift = color_shift_options(config)
    if reconstructs(config.model):
        if config.epoch is None:
            raise FactoryError(
                f"--model {config.model} is a reconstructor: give --epoch, its checkpoint's epoch"
            )
        if config.degradation_config:
            load_options(config.model, config.degradation_config)  # the error says why it takes none
        return {}
    if config.model not in DEGRADER_NAMES:
        get_degrader(config.model)  # the error lists every degrader
    if config.epoch is not None:
        raise FactoryError(f"--epoch is for reconstructors; {config.model} has no checkpoint")
    options = load_options(config.model, config.degradation_config) if config.degradation_config else {}
    options.update(shift)
    scale = options.pop("scale", config.scale)
    if scale != config.scale:
        raise FactoryError(f"{config.degradation_config} sets scale {scale!r} but --scale is {config.scale}")
    get_degrader(config.model, {**options, "scale": config.scale})
    return options


def color_shift_options(config: BuildConfig) -> dict[str, Any]:
    """--color-shift / --target-delta-e as the bicubic degrader's options ({} without them); a one-line error when
    both are given or the degrader does not make its LR by bicubic downsampling alone."""
    if config.color_shift is None and config.target_delta_e is None:
        return {}
    if config.color_shift is not None and config.target_delta_e is not None:
        raise FactoryError("--color-shift and --target-delta-e are mutually exclusive: give one")
    if config.model != "bicubic":
        raise FactoryError(
            f"--color-shift and --target-delta-e shift the bicubic LR: only --model bicubic takes them, "
            f"not {config.model}"
        )
    if config.color_correct:
        raise FactoryError(
            "--color-correct would remove the colour shift that --color-shift / --target-delta-e add"
        )
    if config.color_shift is not None:
        return {"color_shift": [float(component) for component in config.color_shift]}
    return {"target_delta_e": float(config.target_delta_e)}


def _labels_note(
    manifests: Storage, dataset: str, earlier: list[ShardTask], built: list[ShardTask]
) -> str | None:
    """After a resume: are this run's pairs labelled as the earlier ones are? (`factory label` relabels a dataset's
    manifests after its build, and a resume under the same settings adds pairs without labels.) None when the earlier
    pairs have no labels; logged as a warning when the new ones lack them."""

    def label_state(tasks: list[ShardTask]) -> tuple[int, int, set[str]]:
        """(pairs, labelled pairs, classifier sha256s) of the committed manifests of `tasks`."""
        pairs = labelled = 0
        found: set[str] = set()
        for task in tasks:
            relative = f"{dataset}/{task.stem}.parquet"
            if not manifests.exists(relative):
                continue
            table = read_manifest(manifests, relative).select(["label", "classifier_sha256"])
            pairs += table.num_rows
            labelled += table.num_rows - table["label"].null_count
            found |= {value for value in table["classifier_sha256"].to_pylist() if value}
        return pairs, labelled, found

    _, labelled_before, before = label_state(earlier)
    if not labelled_before:
        return None
    pairs_now, labelled_now, now = label_state(built)
    named = ", ".join(sorted(sha256[:12] for sha256 in before))
    if labelled_now < pairs_now:
        note = (
            f"labels: {pairs_now - labelled_now} of the {pairs_now} pairs this run added are not labelled, while "
            f"{labelled_before} earlier pairs are (classifier {named}); label them with "
            f"`factory label --classifier <file> --dataset {dataset}`"
        )
        log.warning("%s", note)
        return note
    if now != before:
        return (
            f"labels: the {pairs_now} pairs this run added are labelled by classifier "
            f"{', '.join(sorted(sha256[:12] for sha256 in now))}, the earlier ones by {named}"
        )
    return f"labels: the {pairs_now} pairs this run added are labelled too (classifier {named})"


def _load_checkpoint(config: BuildConfig, checkpoint: Path) -> str:
    """Load the checkpoint once here, on the CPU, so that a wrong or corrupt one is a one-line error before any
    actor starts; its sha256."""
    from factory.checkpoints import load_reconstructor

    return load_reconstructor(checkpoint, model_name=config.model).sha256


def _unique_rejects(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """One reject row per (root, source), first reason kept, sorted: a source split over two shards fails in both."""
    unique: dict[tuple[str, str], dict[str, str]] = {}
    for row in rows:
        unique.setdefault((row["source_root"], row["source"]), row)
    return [unique[key] for key in sorted(unique)]


def _reasons(rejects: list[dict[str, str]]) -> str:
    counts = Counter(row["reason"] for row in rejects)
    return ", ".join(f"{count} {reason}" for reason, count in sorted(counts.items())) or "no inputs"
