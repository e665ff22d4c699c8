"""The dataset card (`_card.json`): how a dataset was made and what it holds, rebuilt from all its committed
manifests after each build."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from factory import __version__
from factory.build.config import BuildConfig, reconstructs
from factory.build.plan import BuildPlan
from factory.build.result import BuildResult
from factory.diversity import labels_card
from factory.manifests import CARD_NAME, REJECTS_NAME, read_manifest
from factory.storage import Storage


def checkpoint_card(path: Path, sha256: str | None) -> dict[str, Any]:
    """The card's `checkpoint` section: which checkpoint made the pairs, how it was trained (samples seen, steps,
    batch, learning rate, recipe, data fingerprint) and the regime `factory train` measured when it saved it."""
    from factory.checkpoints import read_checkpoint

    payload = read_checkpoint(path, mmap=True)
    return {
        "path": str(path),
        "sha256": sha256,
        "model": payload["model_name"],
        "preset": payload["preset"],
        "epoch": int(payload["epoch"]),
        "steps": int(payload["steps"]),
        "data_fingerprint": payload["data_fingerprint"],
        "seed": int(payload["seed"]),
        "training": payload.get("training", {}),
        "regime": payload.get("regime"),  # None: a checkpoint from before regimes were measured
    }


def _card_table(plan: BuildPlan, manifests: Storage):
    """The columns the card summarises, from every committed manifest of the plan (None when none is)."""
    import pyarrow as pa

    columns = []
    for task in plan.shards:
        relative = f"{plan.dataset}/{task.stem}.parquet"
        if manifests.exists(relative):
            columns.append(
                read_manifest(manifests, relative).select(
                    ["delta_e", "delta_e_p95", "psnr", "ssim", "checkerboard", "label", "classifier_sha256"]
                )
            )
    return pa.concat_tables(columns) if columns else None


def _column_stats(table, name: str) -> dict[str, float] | None:
    """Mean and 5 / 50 / 95 % quantiles of one column (None when it holds nothing)."""
    import pyarrow.compute as pc

    if table is None or table.num_rows == 0 or table[name].null_count == table.num_rows:
        return None
    values = table[name]
    quantiles = pc.quantile(values, q=[0.05, 0.5, 0.95]).to_pylist()
    return {"mean": pc.mean(values).as_py(), "p05": quantiles[0], "median": quantiles[1], "p95": quantiles[2]}


def degradation_card(config: BuildConfig, options: dict[str, Any]) -> dict[str, Any] | None:
    """The card's `degradation` section for bicubic and the classical pipelines: the options given
    (--degradation-config) and the whole configuration they made; None for a reconstructor (see `checkpoint`)."""
    if reconstructs(config.model):
        return None
    from factory.degraders import get_degrader

    degrader = get_degrader(config.model, {**options, "scale": config.scale})
    return {
        "degrader": config.model,
        "config_file": config.degradation_config,
        "options": options,
        "config": asdict(degrader.config),
        "columns": "each pair's record of what it drew is the manifest's `degradation` (JSON); kernel_sigma, "
        "noise_level and jpeg_quality repeat a few of its values (see the degrader's flat_columns)",
    }


def write_card(
    config: BuildConfig,
    plan: BuildPlan,
    manifests: Storage,
    checkpoint: Path | None,
    checkpoint_sha256: str | None,
    options: dict[str, Any],
    result: BuildResult,
) -> dict[str, Any]:
    """Write `_card.json`: how the dataset was made and what it holds, rebuilt from all its committed manifests;
    returns it."""
    table = _card_table(plan, manifests)
    reasons = Counter(row["reason"] for row in result.rejects)
    card = {
        "dataset": plan.dataset,
        "factory_version": __version__,
        "command": config.command,
        "config": asdict(config),
        "plan": plan.describe(),
        "crop_plan": "regular grid: crops every `stride` px along each axis plus one flush with the far edge",
        "pipeline": {
            "hr": "8-bit RGB crop of the EXIF-oriented source",
            "lr": "the degrader's LR, quantised to 8 bits: bicubic (factory.color.downsample) of the HR by `scale`, "
            "quantised to 8 bits, then the reconstructor (bicubic: unchanged); or the classical pipeline "
            "(realesrgan, bsrgan) applied to the HR; every pair draws from a generator seeded by (seed, key)",
            "delta_e": "factory.color.delta_e_uint8(hr, lr): CIEDE2000 of bicubic(HR) stored as 8 bits vs LR, "
            "per-image mean (paper 4.3.2; 0 for the bicubic dataset)",
            "psnr_ssim": "degraded LR vs bicubic LR, torch ports of skimage's definitions (data_range 255)",
        },
        "checkpoint": None if checkpoint is None else checkpoint_card(checkpoint, checkpoint_sha256),
        "degradation": degradation_card(config, options),
        "counts": {
            "pairs": result.pairs,
            "shards": len(plan.shards),
            "rejects": len(result.rejects),
            "rejects_by_reason": dict(sorted(reasons.items())),
            "output_bytes": result.output_bytes,
        },
        **{
            name: _column_stats(table, name)
            for name in ("delta_e", "delta_e_p95", "psnr", "ssim", "checkerboard")
        },
        # Class counts and diversity entropy H (Eq. 2) of the labels; None without --classifier (`factory label`
        # fills it in later).
        "labels": None
        if table is None
        else labels_card(table["label"].to_pylist(), table["classifier_sha256"].to_pylist()),
        "rejects_file": REJECTS_NAME,
    }
    manifests.write_bytes_atomic(
        f"{plan.dataset}/{CARD_NAME}", json.dumps(card, indent=2, sort_keys=True, default=str).encode()
    )
    return card
