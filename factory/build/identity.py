"""The build's identity: which settings make two builds of a dataset the same build, their digest, and whether a
committed shard belongs to this build (resume) or to another one (refused)."""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from factory.build.config import BuildConfig, reconstructs
from factory.build.plan import ShardTask
from factory.config import FactoryError
from factory.manifests import read_commit
from factory.storage import Storage

log = logging.getLogger(__name__)


def build_settings(
    config: BuildConfig, checkpoint_sha256: str | None, degradation_options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What makes two builds of a dataset the same build (every setting the shards' bytes depend on). Each commit
    record keeps them, so a refused resume can say which setting differs. Not the batch size, the actors or the
    shard size: every pair draws from its own generator, so its bytes do not depend on them."""
    classifier = None
    if config.classifier:
        from factory.checkpoints import file_sha256

        classifier = file_sha256(config.classifier)
    settings = {
        "dataset": config.dataset_name,
        "model": config.model,
        "epoch": config.epoch if reconstructs(config.model) else None,
        "checkpoint_sha256": checkpoint_sha256,
        "scale": config.scale,
        "crop": config.effective_crop,
        "codec": config.codec,
        "seed": config.seed,
        "color_correct": config.color_correct,
        "classifier_sha256": classifier,
    }
    if config.bf16:  # only when set, so the fingerprints of existing float32 builds stay as they were
        settings["bf16"] = True
    if degradation_options:  # likewise: only when --degradation-config gives any
        settings["degradation_options"] = degradation_options
    return settings


def build_fingerprint(settings: dict[str, Any]) -> str:
    """The digest of a build's settings (`build_settings`): with the shard's `plan_sha256` it decides whether a
    committed shard belongs to this build."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def what_differs(commit: dict, settings: dict[str, Any]) -> str:
    """The settings a committed shard was built with that differ from this build's, said for the user."""
    before = commit.get("build_settings")
    if not isinstance(before, dict):  # commit records older than build_settings hold only the digest
        return "other inputs or settings"
    names = sorted(name for name in set(before) | set(settings) if before.get(name) != settings.get(name))
    said = ", ".join(f"{name} {before.get(name)!r} -> {settings.get(name)!r}" for name in names)
    if names == ["classifier_sha256"]:
        said += "; to (re)label a built dataset, run `factory label --classifier ...` instead"
    if "batch_size" in names and "batch_size" not in settings:
        said += (
            "; that dataset was built before pairs drew per key, when its bytes depended on the batch size"
        )
    return said


def refusal(commit: dict, task: ShardTask, settings: dict[str, Any]) -> str | None:
    """Why committed shard `task` (its commit record) belongs to a different build, or None when it is this one's."""
    if commit.get("build_fingerprint") != build_fingerprint(settings):
        return what_differs(commit, settings)
    if commit.get("plan_sha256") != task.plan_sha256:
        planned = commit.get("planned")
        if isinstance(planned, int) and planned < len(
            task.crops
        ):  # the inputs grew past a partial last shard
            return (
                f"other inputs: the committed shard holds {planned} planned crops and this plan puts "
                f"{len(task.crops)} in it, as when inputs are added after a build whose last shard was partial"
            )
        return "other inputs (the shard's crops differ)"
    return None


def different_build_error(
    dataset: str, task: ShardTask, why: str, shards: Storage, manifests: Storage
) -> str:
    return (
        f"dataset {dataset} already holds shard {task.stem} from a different build ({why}); "
        f"use --name for a new dataset, or delete {manifests.uri(dataset)} and {shards.uri(dataset)}"
    )


def committed(
    shards: Storage, manifests: Storage, dataset: str, task: ShardTask, settings: dict[str, Any]
) -> dict | None:
    """The commit record of `task` when its manifest is present and matches the shard on disk (size), the plan
    (digest of its crops) and the build settings; None when the shard must be (re)built. A manifest of another
    plan or other settings is an error: the dataset was built by a different command."""
    commit = read_commit(manifests, f"{dataset}/{task.stem}.parquet")
    if commit is None:
        return None
    why = refusal(commit, task, settings)
    if why is not None:
        raise FactoryError(different_build_error(dataset, task, why, shards, manifests))
    if shards.size(commit["shard"]) != commit.get("shard_bytes"):
        log.warning("shard %s does not match its manifest; rebuilding it", task.stem)
        return None
    return commit
