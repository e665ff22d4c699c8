"""The build: HR crops -> (degraded LR, HR) pairs in WebDataset shards with Parquet manifests, on Ray actors.

    factory build --model vqvae2 --epoch 8 --out shards/          # the embedded default HR set, 256 crops
    factory build --hr DIV2K_train_HR/ --hr Flickr2K_HR/ --model vqvae2 --epoch 8 --out shards/
    factory build --hr DIV2K_train_HR/ --model realesrgan --degradation-config train_realesrnet_x4plus.yml

Pipeline per crop y (the paper, Section 3.1 and 4.1): x = bicubic downsample of y by `scale` (colour module),
quantised to 8 bits as the stored bicubic LR would be; x_deg = G(x) with the undertrained reconstructor G (or x itself
for `--model bicubic`), quantised to 8 bits as stored; `--model realesrgan` / `bsrgan` degrade y itself instead
(`factory.degraders`), every pair from its own generator; then, on the device, the paper's ΔE (CIEDE2000 between
bicubic(y) as stored, i.e. x, and x_deg), and PSNR / SSIM of x_deg against x (torch ports of skimage's definitions, see
`factory.quality.image_quality`). Everything is measured on the stored 8-bit pixels, so a manifest row equals what skimage
computes on the pair read back from the shard.

Structure: the driver plans shard tasks (a shard = a fixed list of crops; `factory.plan`), skips the shards whose
manifest already commits them (resume), and hands the rest to a pool of `factory.worker.ShardWorker` actors
(`run_shards` here, the one place that calls Ray). A worker loads the model once and turns whole shards into a tar and its manifest, returning
only a small summary. The tar is written to a temporary name and renamed; then its manifest (also atomically), whose
presence commits the shard. A shard whose actor dies is given to a fresh actor; rewriting it is harmless because its
name and bytes are determined by the plan.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from factory import __version__
from factory.config import FactoryError
from factory.diversity import labels_card
from factory.manifests import CARD_NAME, LOCK_NAME, REJECTS_NAME, read_commit, read_manifest, write_rejects
from factory.plan import BuildPlan, ShardTask, build_fingerprint, effective_crop, plan_build, reconstructs
from factory.quality import image_quality
from factory.shards import row_json
from factory.sources import SourceFile, list_sources
from factory.storage import OutputLock, Storage
from factory.worker import ShardSummary, ShardWorker, WorkerSettings

__all__ = ["BuildConfig", "BuildResult", "build", "plan_build", "image_quality", "row_json", "ShardWorker"]

log = logging.getLogger(__name__)

CRASH_ONCE_ENVIRONMENT = (
    "FACTORY_TEST_CRASH_ONCE"  # tests: path of a marker; the first worker to see it absent dies
)
# tests: seconds every shard waits before it starts (so that a short build outlasts the start-up of every actor)
SHARD_DELAY_ENVIRONMENT = "FACTORY_TEST_SHARD_DELAY"
# Compressed size / raw pixel bytes, for --dry-run's estimate (measured on a real photo, FACTS.md).
_CODEC_RATIO = {"png": 0.32, "zst": 0.45}


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
    classifier: str | None = None  # degradation classifier checkpoint that fills the label columns
    max_attempts: int = 3  # tries per shard before the build gives up (an actor death costs one)
    actor_timeout: float = 600.0  # seconds without any worker actor up before the build gives up
    dry_run: bool = False  # print the plan, write nothing
    progress: bool = True  # show a progress bar
    command: str = ""  # the command line, recorded in the dataset card


# --------------------------------------------------------------------------------------------------------------------
# Running shards on Ray (the one place that calls Ray)
# --------------------------------------------------------------------------------------------------------------------


# Ray 2.60 turns token authentication on for every new local cluster (RAY_AUTH_MODE unset) and then says so with a
# warning on every start (ray/_private/authentication/authentication_token_setup.py, _warn_token_auth_enabled). The
# embedded cluster keeps Ray's default, token authentication, and drops that one notice. Setting RAY_AUTH_MODE=token
# (Ray's own way to silence it) is not enough from inside a process that has imported ray: Ray caches its config at
# import, so the driver would stay "disabled" while the GCS it starts demands a token, and the build fails.
RAY_TOKEN_LOGGER = "ray._private.authentication.authentication_token_setup"
RAY_TOKEN_NOTICE = "Token authentication is enabled for this Ray cluster"


class _WithoutTokenNotice(logging.Filter):
    """Drops Ray's "Token authentication is enabled" notice and lets every other record through."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(RAY_TOKEN_NOTICE)


def _quiet_token_notice() -> None:
    token_logger = logging.getLogger(RAY_TOKEN_LOGGER)
    if not any(isinstance(item, _WithoutTokenNotice) for item in token_logger.filters):
        token_logger.addFilter(_WithoutTokenNotice())


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
            _quiet_token_notice()
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
                        log.warning("shard %s failed (%s); retrying", task.stem, _last_line(cause))
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


def _last_line(error: BaseException) -> str:
    """A Ray task error's message ends with the exception the task raised: its last line says what went wrong."""
    text = str(error).strip()
    return text.splitlines()[-1] if text else type(error).__name__


def _requeue(
    queue: deque, task: ShardTask, attempts: Counter, max_attempts: int, error: BaseException
) -> None:
    if attempts[task.index] >= max_attempts:
        raise FactoryError(
            f"shard {task.stem} failed {attempts[task.index]} times; last error: {_last_line(error)}"
        )
    queue.appendleft(task)


# --------------------------------------------------------------------------------------------------------------------
# Locking, resume, checkpoint, card
# --------------------------------------------------------------------------------------------------------------------


def build_settings(
    config: BuildConfig,
    dataset: str,
    crop: int,
    checkpoint_sha256: str | None,
    degradation_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What makes two builds of a dataset the same build (every setting the shards' bytes depend on). Each commit
    record keeps them, so a refused resume can say which setting differs. Not the batch size, the actors or the
    shard size: every pair draws from its own generator, so its bytes do not depend on them."""
    classifier = None
    if config.classifier:
        from factory.checkpoints import file_sha256

        classifier = file_sha256(config.classifier)
    settings = {
        "dataset": dataset,
        "model": config.model,
        "epoch": config.epoch if reconstructs(config.model) else None,
        "checkpoint_sha256": checkpoint_sha256,
        "scale": config.scale,
        "crop": crop,
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


def _what_differs(commit: dict, settings: dict[str, Any]) -> str:
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


def committed(
    shards: Storage, manifests: Storage, dataset: str, task: ShardTask, settings: dict[str, Any]
) -> dict | None:
    """The commit record of `task` when its manifest is present and matches the shard on disk (size), the plan
    (digest of its crops) and the build settings; None when the shard must be (re)built. A manifest of another
    plan or other settings is an error: the dataset was built by a different command."""
    commit = read_commit(manifests, f"{dataset}/{task.stem}.parquet")
    if commit is None:
        return None
    if commit.get("build_fingerprint") != build_fingerprint(settings):
        difference = _what_differs(commit, settings)
    elif commit.get("plan_sha256") != task.plan_sha256:
        difference = "other inputs (the shard's crops differ)"
    else:
        difference = None
    if difference is not None:
        raise FactoryError(
            f"dataset {dataset} already holds shard {task.stem} from a different build ({difference}); "
            f"use --name for a new dataset, or delete {manifests.uri(dataset)} and {shards.uri(dataset)}"
        )
    if shards.size(commit["shard"]) != commit.get("shard_bytes"):
        log.warning("shard %s does not match its manifest; rebuilding it", task.stem)
        return None
    return commit


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
    """The checkpoint file of `--model/--epoch`; trains it first when missing (unless --no-train)."""
    path = checkpoint_to_use(config)
    if path is None or path.is_file():
        return path
    log.warning("checkpoint %s not found: training %s to epoch %d first", path, config.model, config.epoch)
    from factory.train import train_for_build

    embedded_default = not (config.hr or config.hr_list or config.train_data)
    train_for_build(
        model=config.model,
        epoch=config.epoch,
        checkpoints=config.checkpoints,
        data=config.train_data or tuple(source.path for source in sources),
        preset=config.preset,
        seed=config.seed,
        embedded_default_lr_size=effective_crop(config) // config.scale if embedded_default else None,
        progress=config.progress,
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
    pairs_per_second: float = 0.0  # this run's pairs / wall time of the worker pool (Ray start-up included)
    # From the first shard started to the last one finished, on the workers' clocks: the pool's wall time without Ray
    # start-up and model loading (benchmarks divide by it; one host's clock, or synchronised nodes).
    busy_seconds: float = 0.0
    delta_e_mean: float | None = None
    estimated_bytes: int | None = None  # dry run only
    actors: int | None = None  # dry run only
    checkpoint_plan: str | None = None  # dry run only: the checkpoint used, or that it is trained first
    # A resume onto a labelled dataset: whether this run's pairs are labelled too (None: no such resume).
    labels_note: str | None = None

    def summary_lines(self) -> list[str]:
        if self.estimated_bytes is not None:
            plan = self.plan
            return [
                f"dry run: dataset {self.dataset}",
                f"  sources {plan['sources']}, usable images {plan['images']}, rejected {len(self.rejects)}",
                f"  crops {plan['crops']} of {plan['crop']}x{plan['crop']} (grid, stride {plan['stride']}), "
                f"shards {plan['shards']}, actors {self.actors}",
                f"  checkpoint {self.checkpoint_plan}",
                f"  estimated output {self.estimated_bytes / 1e6:,.1f} MB",
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
            *([f"  {self.labels_note}"] if self.labels_note else []),
        ]


def _estimate_bytes(plan: BuildPlan, config: BuildConfig) -> int:
    raw = plan.crop * plan.crop * 3
    per_pair = raw * (1 + 1 / config.scale**2) * _CODEC_RATIO[config.codec] + 4 * 512 + 1200  # headers, json
    return int(plan.crops * per_pair)


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


def _write_card(
    config: BuildConfig,
    plan: BuildPlan,
    manifests: Storage,
    checkpoint: Path | None,
    checkpoint_sha256: str | None,
    options: dict[str, Any],
    result: BuildResult,
) -> None:
    """`_card.json`: how the dataset was made and what it holds, rebuilt from all its committed manifests."""
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


# --------------------------------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------------------------------


def check_counts(config: BuildConfig) -> None:
    """The counts and the codec are in range: one-line errors before anything runs."""
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
    for name, value in (  # optional counts: None means the default
        ("--epoch", config.epoch),  # checkpoints are saved after whole epochs, the first after epoch 1
        ("--stride", config.stride),
        ("--limit", config.limit),
        ("--num-cpus", config.num_cpus),
        ("--threads", config.threads),
        ("--max-pixels", config.max_pixels),
    ):
        if value is not None and value < 1:
            raise FactoryError(f"{name} must be at least 1, got {value}")
    if config.actors is not None and config.actors < 0:
        raise FactoryError(
            f"--actors must be at least 0 (0: build in this process, without Ray), got {config.actors}"
        )


def degradation_options(config: BuildConfig) -> dict[str, Any]:
    """The classical degrader's options from --degradation-config ({} without one), checked by building the
    degrader here: an unknown degrader, a bad option, or an --epoch that does not fit --model is a one-line error
    before any work. The scale comes from --scale (a file may repeat it, not contradict it)."""
    from factory.degraders import DEGRADER_NAMES, get_degrader, load_options

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
    scale = options.pop("scale", config.scale)
    if scale != config.scale:
        raise FactoryError(f"{config.degradation_config} sets scale {scale!r} but --scale is {config.scale}")
    get_degrader(config.model, {**options, "scale": config.scale})
    return options


def _uncommitted(
    shards: Storage, manifests: Storage, plan: BuildPlan, settings: dict[str, Any], result: BuildResult
) -> tuple[list[ShardTask], list[dict[str, str]]]:
    """The shards still to build, and the rejects the committed ones recorded; counts the committed ones in
    `result.skipped_shards` (resume)."""
    todo, shard_rejects = [], []
    for task in plan.shards:
        commit = committed(shards, manifests, plan.dataset, task, settings)
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
    return todo, shard_rejects


def worker_settings(
    config: BuildConfig,
    plan: BuildPlan,
    checkpoint: Path | None,
    settings_of_build: dict[str, Any],
    options: dict[str, Any],
) -> WorkerSettings:
    """What every worker gets: the build's options as plain values, and its settings to record in each commit."""
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
        build_settings=settings_of_build,
        threads=config.threads,
        bf16=config.bf16,
        degradation_options=options,
        crash_marker=os.environ.get(CRASH_ONCE_ENVIRONMENT),
        shard_delay=float(os.environ.get(SHARD_DELAY_ENVIRONMENT) or 0.0),
    )


def build(config: BuildConfig) -> BuildResult:
    """Plan, (train the checkpoint if missing,) build every uncommitted shard, write rejects and the card."""
    check_counts(config)
    # The embedded Ray runs here, so the device must exist here; a cluster's nodes may have what the driver lacks.
    if config.address is None:
        from factory.devices import resolve_device

        resolve_device(config.device)
    started = time.perf_counter()
    # What a run checks before it writes anything (training a missing checkpoint included), the dry run checks too;
    # before the plan, which reads every input's header.
    options = degradation_options(config)
    checkpoint = checkpoint_to_use(config)
    _check_labels_and_colour(config)
    plan = plan_build(config)
    result = BuildResult(dataset=plan.dataset, plan=plan.describe(), rejects=list(plan.rejects))
    if config.dry_run:
        return _dry_run(config, plan, result, checkpoint)
    if plan.crops == 0:
        raise FactoryError(
            f"nothing could be built: all {plan.sources} inputs were rejected ({_reasons(plan.rejects)})"
        )

    checkpoint = ensure_checkpoint(config, list_sources(config.hr, config.hr_list).files)
    checkpoint_sha256 = None if checkpoint is None else _load_checkpoint(config, checkpoint)
    shards, manifests = Storage(config.out), Storage(config.manifests)
    settings_of_build = build_settings(config, plan.dataset, plan.crop, checkpoint_sha256, options)
    with OutputLock(manifests, f"{plan.dataset}/{LOCK_NAME}", "build", f"dataset {plan.dataset}"):
        shards.make_dirs(plan.dataset)
        manifests.make_dirs(plan.dataset)
        removed = shards.remove_temporaries(plan.dataset) + manifests.remove_temporaries(plan.dataset)
        if removed:
            log.info("removed %d temporary file(s) of an interrupted build", removed)
        todo, shard_rejects = _uncommitted(shards, manifests, plan, settings_of_build, result)
        settings = worker_settings(config, plan, checkpoint, settings_of_build, options)
        built_pairs = 0
        run_started = time.perf_counter()
        shard_spans: list[tuple[float, float]] = []  # (started, finished) of each shard, epoch seconds

        def on_done(summary: ShardSummary) -> None:
            nonlocal built_pairs
            built_pairs += summary.pairs
            shard_spans.append((summary.started, summary.started + summary.seconds))
            result.built_shards += 1
            shard_rejects.extend(summary.rejects)

        try:
            if todo and config.actors == 0:
                run_in_process(config, settings, todo, on_done)
            elif todo:
                run_shards(config, settings, todo, sum(len(task.crops) for task in todo), on_done)
        except BaseException:
            # A worker cleans up after its own errors; this sweeps what the actors stopped mid-shard left (each shard
            # writes its tar, then its manifest, under temporary names). Committed shards are not touched.
            shards.remove_temporaries(plan.dataset)
            manifests.remove_temporaries(plan.dataset)
            raise
        run_seconds = time.perf_counter() - run_started
        if shard_spans:
            result.busy_seconds = max(end for _, end in shard_spans) - min(start for start, _ in shard_spans)
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
        if todo and len(todo) < len(
            plan.shards
        ):  # a resume: are this run's pairs labelled as the earlier ones?
            earlier = [task for task in plan.shards if task not in todo]
            result.labels_note = _labels_note(manifests, plan.dataset, earlier, todo)
        _write_card(config, plan, manifests, checkpoint, checkpoint_sha256, options, result)
        card = json.loads(manifests.read_bytes(f"{plan.dataset}/{CARD_NAME}"))
        result.delta_e_mean = (card.get("delta_e") or {}).get("mean")
    return result


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


def _check_labels_and_colour(config: BuildConfig) -> None:
    """The classifier loads and colour correction exists: one-line errors before any work."""
    if config.classifier:
        from factory.classifier import Labeler

        Labeler.load(config.classifier)
    if config.color_correct:
        import factory.color

        if not hasattr(factory.color, "color_correct"):
            raise FactoryError("--color-correct needs factory.color.color_correct, which this version lacks")


def _load_checkpoint(config: BuildConfig, checkpoint: Path) -> str:
    """Load the checkpoint once here, on the CPU, so that a wrong or corrupt one is a one-line error before any
    actor starts; its sha256."""
    from factory.checkpoints import load_reconstructor

    return load_reconstructor(checkpoint, model_name=config.model).sha256


def _dry_run(
    config: BuildConfig, plan: BuildPlan, result: BuildResult, checkpoint: Path | None
) -> BuildResult:
    """The plan, the estimates, and which checkpoint the build would use or train first."""
    import torch

    result.estimated_bytes = _estimate_bytes(plan, config)
    gpus = torch.cuda.device_count() if config.device != "cpu" else 0
    result.actors = (
        config.actors if config.actors is not None else (gpus or config.num_cpus or os.cpu_count() or 1)
    )
    if checkpoint is None:
        degrades = "the LR is not degraded" if config.model == "bicubic" else "it degrades the HR itself"
        result.checkpoint_plan = f"none ({config.model}: {degrades})"
    elif checkpoint.is_file():
        result.checkpoint_plan = f"{checkpoint} (sha256 {_load_checkpoint(config, checkpoint)[:12]})"
    else:
        result.checkpoint_plan = (
            f"{checkpoint} is missing: {config.model} is trained to epoch {config.epoch} first"
        )
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
