"""Fine-tune a pre-trained SR network (EDSR, ESRGAN, SwinIR, HAT) on the factory's pairs, streamed from the shards.

    factory finetune --arch hat --pretrained HAT_SRx4_ImageNet-pretrain.pth --shards shards/vqvae2-ep8 --iters 50000
    torchrun --nnodes 2 --nproc-per-node 8 ... "$(command -v factory)" finetune ...    (DDP: NCCL on GPU, gloo on CPU)

Loss. The paper (Sec. 4.2) fine-tunes the pre-trained models on the generated pairs and reports PSNR / SSIM / LPIPS, but
states no loss or schedule; the dataset is its only variable. The pre-trained EDSR, SwinIR (classical) and HAT were
trained with the pixel L1 loss alone, so L1 (the default) keeps their objective and changes only the data.
ESRGAN's generator was trained with L1, then perceptual (VGG19) + relativistic GAN losses; L1 fine-tuning pulls it
toward the PSNR-oriented RRDBNet, which fits the paper's large SSIM gain for ESRGAN (+0.127). `--loss esrgan
--vgg-weights PATH` fine-tunes with ESRGAN's own objective instead (factory/sr/losses.py): VGG19 weights from a file,
since nothing may be downloaded; it works for every --arch.

Optimiser: Adam (betas 0.9, 0.99), constant learning rate, as in BasicSR's fine-tuning configs. AMP: bfloat16
autocast on CUDA (no gradient scaler needed); full float32 on CPU.

Output (--out): `checkpoints/iter_NNNNNNN.pt` (network, optimiser, iteration; read back with weights_only=True, the
newest is resumed automatically), `log.jsonl` (loss and throughput), and `model.pth`, the fine-tuned weights in the
official key layout of the architecture (loadable by `factory eval`, spandrel and the official repositories).

With --manifests every pair read is checked against the manifest (payload sha256s, the shard's size in its commit
record): a partial, corrupt or stale shard stops the run with a one-line error naming it and the counts, unless
--allow-partial, which trains on what is there and logs one line of counts per epoch and reader.

One trainer per --out: rank 0 holds `<out>/_finetune.lock` (pid, host) for the whole run, a second trainer is refused
with the holder's pid, and the lock of a holder that died on this host is taken over. Under torchrun every rank ends
when its launcher does: torchrun starts each rank in a session of its own, so killing torchrun's process group alone
would leave the ranks training into --out beside a rerun.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import math
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path, PurePosixPath

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from factory.config import FactoryError, config_to_dict, error_line
from factory.shards import decode_image
from factory.sr import check_architecture
from factory.sr.losses import (
    ESRGANLossConfig,
    VGGFeatures,
    VGGStyleDiscriminator,
    discriminator_loss,
    generator_loss,
)
from factory.sr.networks import SRNetwork, build_network, load_network, save_atomic, save_weights
from factory.storage import OutputLock, Storage
from factory.stream import PairedPatches, iterate_pairs

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^iter_(\d+)\.pt$")
# Batches per rank and worker per epoch: long, as each epoch refills the shuffle buffer.
STEPS_PER_EPOCH = 1000
LOSSES: tuple[str, ...] = ("l1", "esrgan")
LOCK_NAME = "_finetune.lock"  # in --out, while a trainer writes there
MAX_DEFAULT_WORKERS = 4  # DataLoader workers per rank without --workers, however many cores there are
PR_SET_PDEATHSIG = 1  # prctl option, <linux/prctl.h>


@dataclass(frozen=True)
class FinetuneConfig:
    architecture: str = "edsr"  # edsr | esrgan | swinir | hat
    pretrained: str | None = None  # official (or our) weights; None: randomly initialised `preset`
    preset: str = "paper"  # network shape without --pretrained: paper (the official models') | tiny (tests)
    shards: tuple[str, ...] = ()  # one entry per dataset: a shard folder, a brace pattern or a URL list
    # mixing weight per entry of `shards` (None: one dataset)
    dataset_weights: tuple[float, ...] | None = None
    manifests: str | None = None  # manifest root: only committed shards are read, and `where` applies
    where: str | None = None  # SQL predicate over the manifest columns, e.g. "delta_e < 5"
    # with manifests, a partial, corrupt or stale shard is one line per epoch and reader instead of an error
    allow_partial: bool = False
    iterations: int = 10_000  # optimiser steps (every rank runs exactly this many)
    batch_size: int = 16  # patches per rank per step
    patch_size: int = 64  # LR patch side; the HR patch is scale x larger
    learning_rate: float = 1e-4  # Adam, constant
    patches_per_pair: int = 8  # random crops per decoded pair (decoding is the cost)
    workers: int | None = None  # DataLoader worker processes per rank; None: what cores and shards allow
    checkpoint_every: int = 1000  # iterations between checkpoints (and at the end)
    log_every: int = 50  # iterations between loss / throughput lines
    amp: bool = True  # bfloat16 autocast on CUDA
    resume: bool = True  # continue from the newest checkpoint in out/checkpoints
    seed: int = 0  # initialisation and data order
    out: str = "runs/finetune"  # output folder
    loss: str = (
        "l1"  # l1 (the pre-trained models' objective) | esrgan (L1 + VGG19 perceptual + relativistic GAN)
    )
    vgg_weights: str | None = None  # VGG19 weights for --loss esrgan (torchvision's vgg19 state dict)
    perceptual_layer: str = "conv5_4"  # VGG19 layer of the perceptual loss (ESRGAN: conv5_4, before its ReLU)


@dataclass
class FinetuneResult:
    weights: Path  # fine-tuned weights in the official key layout
    iterations: int  # total optimiser steps done (including resumed ones)
    final_loss: float  # mean objective of the last logging window, this rank (L1 with --loss l1)
    patches_per_second: float  # all ranks together, over this run
    rank: int = 0  # of the process that returns it
    history: list[dict] = field(default_factory=list)  # the log lines of this run


def _distributed_setup() -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun (WORLD_SIZE > 1) joins the process group: NCCL on GPU, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world_size, device


def saved_checkpoints(out: Path) -> dict[int, Path]:
    """A fine-tune's checkpoints under `out/checkpoints`: {iteration: path}."""
    folder = out / "checkpoints"
    found = {}
    for path in folder.glob("iter_*.pt") if folder.is_dir() else []:
        match = CHECKPOINT_PATTERN.match(path.name)
        if match:
            found[int(match.group(1))] = path
    return found


@dataclass
class Adversary:
    """What --loss esrgan adds: the frozen VGG19 features, the discriminator and its optimiser."""

    vgg: VGGFeatures
    discriminator: nn.Module  # VGGStyleDiscriminator, DDP-wrapped under torchrun
    module: VGGStyleDiscriminator  # the unwrapped discriminator (what checkpoints hold)
    optimizer: torch.optim.Optimizer
    weights: ESRGANLossConfig


def _save_checkpoint(
    out: Path,
    iteration: int,
    network: SRNetwork,
    optimizer: torch.optim.Optimizer,
    config: FinetuneConfig,
    adversary: Adversary | None,
) -> Path:
    """Atomic: a crash mid-write leaves the previous checkpoints as they were."""
    state = {
        "network": {key: value.detach().cpu() for key, value in network.module.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "iteration": iteration,
        "architecture": network.architecture,
        "config": config_to_dict(config),
    }
    if adversary is not None:
        state["discriminator"] = {
            key: value.detach().cpu() for key, value in adversary.module.state_dict().items()
        }
        state["discriminator_optimizer"] = adversary.optimizer.state_dict()
    return save_atomic(state, out / "checkpoints" / f"iter_{iteration:07d}.pt")


def _adversary(config: FinetuneConfig, device: torch.device) -> Adversary:
    vgg = VGGFeatures.from_file(config.vgg_weights, config.perceptual_layer).to(device)
    discriminator = VGGStyleDiscriminator().to(device).train()
    optimizer = torch.optim.Adam(discriminator.parameters(), lr=config.learning_rate, betas=(0.9, 0.99))
    return Adversary(
        vgg,
        discriminator,
        discriminator,
        optimizer,
        ESRGANLossConfig(perceptual_layer=config.perceptual_layer),
    )


def _one_thread(worker: int) -> None:
    """DataLoader workers decode and crop in NumPy; torch threads there would only compete with the trainer's."""
    torch.set_num_threads(1)


def _check(config: FinetuneConfig) -> None:
    check_architecture(config.architecture)
    if not config.shards:
        raise FactoryError("give --shards (a shard folder or pattern, one per dataset)")
    if config.dataset_weights is not None and len(config.dataset_weights) != len(config.shards):
        raise FactoryError(
            f"{len(config.dataset_weights)} dataset weights for {len(config.shards)} --shards entries"
        )
    for name in (
        "iterations",
        "batch_size",
        "patch_size",
        "checkpoint_every",
        "log_every",
        "patches_per_pair",
    ):
        if getattr(config, name) < 1:
            raise FactoryError(f"{name} must be >= 1")
    if config.workers is not None and config.workers < 0:
        raise FactoryError("workers must be >= 0")
    if config.learning_rate <= 0:
        raise FactoryError("the learning rate must be positive")
    if config.loss not in LOSSES:
        raise FactoryError(f"unknown --loss {config.loss!r}; known: {', '.join(LOSSES)}")
    if config.loss == "esrgan" and not config.vgg_weights:
        raise FactoryError(
            "--loss esrgan needs --vgg-weights (torchvision's vgg19 weights file; nothing is downloaded)"
        )


# --------------------------------------------------------------------------------------------------------------------
# One trainer per output folder
# --------------------------------------------------------------------------------------------------------------------


def _set_parent_death_signal(signal_number: int) -> bool:
    """Ask Linux to send `signal_number` to this process when its parent exits (prctl PR_SET_PDEATHSIG); False where
    that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, signal_number, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1)
    os.kill(os.getpid(), signal.SIGTERM)


def _exit_with_launcher() -> None:
    """End this rank when its launcher ends: the kernel's parent-death signal on Linux, elsewhere a daemon thread
    that polls the parent. SIGTERM's default action ends the process; the lock it leaves is taken over by the next
    trainer, and checkpoints are written atomically. (Should the launcher die while this process still imports torch,
    before this runs, the rank is not stopped.)"""
    parent = os.getppid()
    if not _set_parent_death_signal(signal.SIGTERM):
        threading.Thread(target=_watch_parent, args=(parent,), name="watch-launcher", daemon=True).start()
    if os.getppid() != parent:  # died between the two calls: no signal will come
        os.kill(os.getpid(), signal.SIGTERM)


@contextlib.contextmanager
def _one_trainer(out: Path, rank: int, world_size: int) -> Iterator[None]:
    """Rank 0 holds `<out>/_finetune.lock` for the run. Every rank learns whether it got it, so that all stop with the
    same one-line refusal rather than the others waiting for rank 0 in their first collective."""
    with contextlib.ExitStack() as stack:
        refusal = ""
        if rank == 0:
            try:
                stack.enter_context(OutputLock(Storage(out), LOCK_NAME, "trainer", str(out)))
            except FactoryError as error:
                refusal = str(error)
        if world_size > 1:
            shared = [refusal]
            dist.broadcast_object_list(shared, src=0)
            refusal = shared[0]
        if refusal:
            raise FactoryError(refusal)
        yield


# --------------------------------------------------------------------------------------------------------------------
# The stream, checked before training
# --------------------------------------------------------------------------------------------------------------------


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def default_workers(shard_counts: Sequence[int], world_size: int) -> int:
    """DataLoader workers per rank without --workers. No more than the cores this process may use (its affinity: what
    a scheduler or taskset granted) shared by the ranks on this machine, one core each left to training: more make
    torch warn of a freeze. No more readers (ranks x workers) than any dataset has shards: more make readers share
    shards. At most MAX_DEFAULT_WORKERS."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    ranks_here = max(int(os.environ.get("LOCAL_WORLD_SIZE", 1)), 1)
    by_cores = cores // ranks_here - 1
    by_shards = min(shard_counts) // world_size
    return max(0, min(MAX_DEFAULT_WORKERS, by_cores, by_shards))


def _check_readers(dataset: PairedPatches, config: FinetuneConfig, world_size: int, workers: int) -> None:
    """Every reader (rank x DataLoader worker) needs a pair of each dataset; one without any would stop its rank
    mid-run, and the other ranks with it. Counted with manifests only: without, pairs are known as they are read."""
    if dataset.selected_pairs is None:
        return
    readers = world_size * max(workers, 1)
    for index, shards in enumerate(dataset.shard_keys):
        pairs = sum(len(keys) for keys in shards.values())  # type: ignore[arg-type]
        if pairs < readers:
            of_dataset = f" of dataset {index}" if len(dataset.shard_keys) > 1 else ""
            where = f" (--where {config.where!r})" if config.where else ""
            per_rank = _count(workers, "worker") if workers else "1 reader"
            raise FactoryError(
                f"the manifests select {_count(pairs, 'pair')}{of_dataset}{where} for {readers} readers "
                f"({_count(world_size, 'rank')} x {per_rank}), and every reader needs one; select more pairs or "
                "give fewer --workers"
            )


def _check_patch_size(dataset: PairedPatches, patch_size: int) -> None:
    """A patch larger than the LR images leaves every reader without a crop, which the workers would find out one
    warning per pair before failing. A factory dataset has one crop size, so the first pair of each dataset folder
    speaks for all of it (a pair of another size is still skipped, with a warning, as it is read)."""
    for shards in dataset.shard_keys:
        first_of_folder: dict[PurePosixPath, str] = {}
        for url in sorted(shards):
            first_of_folder.setdefault(PurePosixPath(url).parent, url)
        for url in first_of_folder.values():
            with contextlib.closing(iterate_pairs(url, shards[url])) as pairs:
                first = next(pairs, None)
            if first is None:
                continue  # an empty or unreadable shard: its warning came from iterate_pairs
            key, fields = first
            try:
                height, width = decode_image(*fields["lr"]).shape[:2]
            except (ValueError, OSError):
                continue  # a corrupt payload is skipped with a warning while training
            if min(height, width) < patch_size:
                raise FactoryError(
                    f"--patch-size {patch_size} is larger than the LR images of {url} ({height}x{width}, e.g. "
                    f"{key}); give --patch-size {min(height, width)} or less"
                )


def _stream(config: FinetuneConfig, scale: int, world_size: int) -> tuple[PairedPatches, int]:
    """This rank's patch stream and its number of DataLoader workers, checked before any training."""
    # One reader's epoch here; scaled by the readers below, as the workers depend on the shards the selection kept.
    steps = min(STEPS_PER_EPOCH, config.iterations)
    dataset = PairedPatches(
        list(config.shards),  # with weights: one entry per dataset; without: the shards of one dataset
        weights=list(config.dataset_weights) if config.dataset_weights is not None else None,
        patch_size=config.patch_size,
        scale=scale,
        manifests=config.manifests,
        where=config.where,
        patches_per_pair=config.patches_per_pair,
        seed=config.seed,
        epoch_length=config.batch_size * steps,
        allow_partial=config.allow_partial,
    )
    workers = config.workers
    if workers is None:
        workers = default_workers([len(shards) for shards in dataset.shard_keys], world_size)
        logger.info("%s per rank (cores and shards allow no more)", _count(workers, "DataLoader worker"))
    _check_readers(dataset, config, world_size, workers)
    _check_patch_size(dataset, config.patch_size)
    # A fixed number of patches per rank and epoch, a whole number of batches per worker: every rank runs the same
    # number of steps, whatever its shards hold.
    dataset.epoch_length = config.batch_size * max(workers, 1) * steps
    return dataset, workers


# --------------------------------------------------------------------------------------------------------------------
# Resuming
# --------------------------------------------------------------------------------------------------------------------


def _check_not_past(out: Path, config: FinetuneConfig) -> None:
    """A run already at --iters has nothing to train: said before anything is loaded, and nothing is written (the
    weights were written with the last checkpoint)."""
    found = saved_checkpoints(out) if config.resume else {}
    if not found or max(found) < config.iterations:
        return
    done = max(found)
    relation = f", past --iters {config.iterations}" if done > config.iterations else f" of --iters {done}"
    raise FactoryError(
        f"{out} is already at iteration {done}{relation}: nothing to train, nothing written; give --iters above "
        f"{done} to train on, or --no-resume to start over"
    )


def _option(name: str, value: object) -> str:
    return f"no --{name}" if value is None else f"--{name} {value}"


def _network_difference(state: dict, network: SRNetwork, config: FinetuneConfig) -> str:
    """What makes a checkpoint's network another than this run's: an option that changed, else the first weight
    that differs."""
    saved = state.get("config") or {}
    names = ["pretrained"] + (
        ["preset"] if saved.get("pretrained") is None and config.pretrained is None else []
    )
    for name in names:
        if name in saved and saved[name] != getattr(config, name):
            return f"it was trained with {_option(name, saved[name])}, this run has {_option(name, getattr(config, name))}"
    ours, theirs = network.module.state_dict(), state["network"]
    for key in sorted(set(ours) | set(theirs)):
        if key not in theirs:
            return f"it has no {key}"
        if key not in ours:
            return f"it has {key}, which this network lacks"
        if theirs[key].shape != ours[key].shape:
            return f"{key} is {tuple(theirs[key].shape)} there, {tuple(ours[key].shape)} here"
    return "its weights do not load into this network"


def _resume(
    out: Path,
    config: FinetuneConfig,
    network: SRNetwork,
    optimizer: torch.optim.Optimizer,
    adversary: Adversary | None,
    device: torch.device,
) -> int:
    """Load the newest checkpoint (weights_only) into network, optimizer and discriminator; returns its iteration
    (0: none). An L1 checkpoint resumed with --loss esrgan starts a fresh discriminator: ESRGAN's own recipe (a
    PSNR-oriented pre-training, then the GAN stage)."""
    found = saved_checkpoints(out)
    if not found:
        return 0
    path = found[max(found)]
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # noqa: BLE001 - an unreadable checkpoint is reported in one line
        raise FactoryError(f"cannot read checkpoint {path}: {error_line(error)}") from None
    if state.get("architecture") != network.architecture:
        raise FactoryError(f"{path} is a {state.get('architecture')} checkpoint, not {network.architecture}")
    try:
        network.module.load_state_dict(state["network"])
    except RuntimeError:  # missing, unexpected or differently shaped weights
        raise FactoryError(
            f"{path} holds another network than this run's: {_network_difference(state, network, config)}; "
            "resume with its settings, or give another --out (or --no-resume)"
        ) from None
    optimizer.load_state_dict(state["optimizer"])
    if adversary is not None and "discriminator" in state:
        adversary.module.load_state_dict(state["discriminator"])
        adversary.optimizer.load_state_dict(state["discriminator_optimizer"])
    logger.info("resumed from %s (iteration %d)", path, state["iteration"])
    return int(state["iteration"])


# --------------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class _Trainer:
    """What the training loop works with."""

    config: FinetuneConfig
    out: Path
    rank: int
    world_size: int
    device: torch.device
    network: SRNetwork
    model: nn.Module  # network.module, DDP-wrapped under torchrun
    optimizer: torch.optim.Optimizer
    adversary: Adversary | None
    dataset: PairedPatches
    loader: DataLoader


# --------------------------------------------------------------------------------------------------------------------
# The same run as a command line (torchrun starts each rank as a process of its own)
# --------------------------------------------------------------------------------------------------------------------

# FinetuneConfig field -> its `factory finetune` option. A flag option (no value) is written when the field differs
# from its default; `perceptual_layer` has no option and must keep its default.
FINETUNE_OPTIONS: dict[str, str] = {
    "architecture": "--arch",
    "pretrained": "--pretrained",
    "preset": "--preset",
    "shards": "--shards",
    "dataset_weights": "--weights",
    "manifests": "--manifests",
    "where": "--where",
    "allow_partial": "--allow-partial",
    "iterations": "--iters",
    "batch_size": "--batch-size",
    "patch_size": "--patch-size",
    "learning_rate": "--lr",
    "patches_per_pair": "--patches-per-pair",
    "workers": "--workers",
    "checkpoint_every": "--checkpoint-every",
    "log_every": "--log-every",
    "amp": "--no-amp",
    "resume": "--no-resume",
    "seed": "--seed",
    "out": "--out",
    "loss": "--loss",
    "vgg_weights": "--vgg-weights",
}
# on/off options: present when the field is not its default
FLAG_OPTIONS = ("allow_partial", "amp", "resume")


def finetune_arguments(config: FinetuneConfig) -> list[str]:
    """The `factory finetune` arguments that rebuild `config` (a list, for subprocess: nothing is parsed by a shell).
    Floats are written with repr, which reads back to the same float."""
    arguments: list[str] = []
    for item in fields(FinetuneConfig):
        value = getattr(config, item.name)
        option = FINETUNE_OPTIONS.get(item.name)
        if option is None:
            if value != item.default:
                raise FactoryError(f"finetune: {item.name}={value!r} has no command-line option (torchrun)")
            continue
        if item.name in FLAG_OPTIONS:
            arguments += [option] if value != item.default else []
        elif item.name == "shards":
            arguments += [part for shard in value for part in (option, str(shard))]
        elif item.name == "dataset_weights":
            arguments += [] if value is None else [option, ",".join(repr(float(weight)) for weight in value)]
        elif value is not None:
            arguments += [option, repr(value) if isinstance(value, float) else str(value)]
    return arguments


def torchrun_command(launcher_options: list[str], command: list[str]) -> list[str]:
    """torchrun (this interpreter's torch.distributed.run) with its options, running `command` as given in each
    rank (--no-python: `factory finetune ...` or `python -m ...`, not a script for torchrun's Python)."""
    return [sys.executable, "-m", "torch.distributed.run", *launcher_options, "--no-python", *command]


def single_node_finetune_command(config: FinetuneConfig, processes: int) -> list[str]:
    """`factory finetune` as `processes` DDP ranks on this machine (torchrun --standalone: a rendezvous on a free
    local port, so several such runs can share a node). The ranks run this interpreter's `-m factory.cli`, not a
    `factory` script found on PATH, so they import the same factory as the caller."""
    return torchrun_command(
        ["--standalone", f"--nproc-per-node={processes}"],
        # -v: rank 0's loss lines reach the caller's log, as they do from an in-process run
        [sys.executable, "-m", "factory.cli", "-v", "finetune", *finetune_arguments(config)],
    )


def finetune(config: FinetuneConfig) -> FinetuneResult:
    """Fine-tune on streamed patches (L1, or ESRGAN's objective); every rank runs the same number of steps."""
    _check(config)
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a rank started by torchrun
        _exit_with_launcher()
    rank, world_size, device = _distributed_setup()
    out = Path(config.out)
    try:
        with _one_trainer(out, rank, world_size):
            _check_not_past(out, config)
            trainer, start = _prepare(config, out, rank, world_size, device)
            return _train(trainer, start)
    finally:
        if world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _prepare(
    config: FinetuneConfig, out: Path, rank: int, world_size: int, device: torch.device
) -> tuple[_Trainer, int]:
    """The checked stream, the network (the same initial weights on every rank; DDP also broadcasts rank 0's), its
    optimiser and the adversary of --loss esrgan, resumed from the newest checkpoint: (trainer, its iteration)."""
    torch.manual_seed(config.seed)
    if config.pretrained:
        network = load_network(config.pretrained, config.architecture)
    else:
        network = build_network(config.architecture, config.preset)
    dataset, workers = _stream(config, network.scale, world_size)
    network.module.to(device).train()
    parameters = [parameter for parameter in network.module.parameters() if parameter.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=config.learning_rate, betas=(0.9, 0.99))
    adversary = _adversary(config, device) if config.loss == "esrgan" else None
    start = _resume(out, config, network, optimizer, adversary, device) if config.resume else 0
    model = network.module
    if world_size > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=device_ids)
        if adversary is not None:
            adversary.discriminator = DistributedDataParallel(adversary.module, device_ids=device_ids)
    loader = DataLoader(
        dataset,
        batch_size=config.batch_size,
        num_workers=workers,
        drop_last=True,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        worker_init_fn=_one_thread,
    )
    trainer = _Trainer(
        config, out, rank, world_size, device, network, model, optimizer, adversary, dataset, loader
    )
    return trainer, start


def _step(trainer: _Trainer, batch: dict, iteration: int) -> tuple[torch.Tensor, dict[str, float]]:
    """One optimisation step (and the discriminator's, with --loss esrgan): (objective, its parts)."""
    config, device, adversary = trainer.config, trainer.device, trainer.adversary
    use_amp = config.amp and device.type == "cuda"
    lr = batch["lr"].to(device, non_blocking=True)  # (B, 3, p, p)
    hr = batch["hr"].to(device, non_blocking=True)  # (B, 3, scale*p, scale*p)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
        sr = trainer.model(lr).float()
        if adversary is None:
            loss = F.l1_loss(sr, hr)
            parts = {"l1": loss.item()}
        else:
            loss, parts = generator_loss(sr, hr, adversary.vgg, adversary.discriminator, adversary.weights)
    if not math.isfinite(loss.item()):
        raise FactoryError(f"the loss is {loss.item()} at iteration {iteration}; lower --lr")
    trainer.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    trainer.optimizer.step()
    if adversary is not None:
        # The generator step also left gradients on the discriminator: cleared before its own step.
        adversary.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            discriminator_loss_value = discriminator_loss(sr, hr, adversary.discriminator)
        discriminator_loss_value.backward()
        adversary.optimizer.step()
        parts["discriminator"] = discriminator_loss_value.item()
    return loss, parts


def _log_line(
    trainer: _Trainer, iteration: int, window: dict[str, float], steps: int, patches: int, seconds: float
) -> dict:
    """The mean of each loss over the last `steps` iterations and the throughput of all ranks; rank 0 logs it and
    appends it to log.jsonl."""
    line = {
        "iteration": iteration,
        **{name: total / steps for name, total in window.items()},
        "patches_per_second": patches / max(seconds, 1e-9),
    }
    if trainer.rank == 0:
        logger.info(
            "iteration %d  loss %.5f  L1 %.5f  %.1f patches/s",
            iteration,
            line["loss"],
            line["l1"],
            line["patches_per_second"],
        )
        with open(trainer.out / "log.jsonl", "a") as log:
            log.write(json.dumps(line) + "\n")
    return line


def _batches(loader: DataLoader) -> Iterator[dict]:
    """The loader's batches; the stream's refusal (a partial shard) raised in a DataLoader worker arrives wrapped
    in the worker's traceback, and is passed on as its own one line."""
    try:
        yield from loader
    except FactoryError as error:
        original = str(error).rstrip().splitlines()[-1]
        raise FactoryError(original.split("FactoryError: ", 1)[-1]) from None


def _train(trainer: _Trainer, start: int) -> FinetuneResult:
    """Steps from `start` to --iters; checkpoints on rank 0, then the weights (before the last checkpoint, so that
    a run whose last checkpoint exists has its model.pth)."""
    config, rank = trainer.config, trainer.rank
    if rank == 0:
        trainer.out.mkdir(parents=True, exist_ok=True)
    history: list[dict] = []
    iteration = start
    window: dict[str, float] = {}
    window_steps, window_patches, window_start = 0, 0, time.perf_counter()
    run_start, run_patches = time.perf_counter(), 0
    progress = tqdm(total=config.iterations, initial=start, disable=rank != 0, desc="finetune", unit="it")
    steps_per_epoch = len(trainer.dataset) // (config.batch_size * max(trainer.loader.num_workers, 1))
    while iteration < config.iterations:
        # Epoch k goes on where epoch k - 1 stopped in the run of passes over the pairs; a run resumed from a
        # checkpoint at a whole epoch goes on exactly where it was.
        trainer.dataset.set_epoch(iteration // steps_per_epoch)
        for batch in _batches(trainer.loader):
            loss, parts = _step(trainer, batch, iteration + 1)
            iteration += 1
            progress.update(1)
            for name, value in {"loss": loss.item(), **parts}.items():
                window[name] = window.get(name, 0.0) + value
            patches = batch["lr"].shape[0] * trainer.world_size
            window_steps += 1
            window_patches += patches
            run_patches += patches
            if iteration % config.log_every == 0 or iteration == config.iterations:
                seconds = time.perf_counter() - window_start
                line = _log_line(trainer, iteration, window, window_steps, window_patches, seconds)
                history.append(line)
                progress.set_postfix(
                    loss=f"{line['loss']:.4f}", patches_per_s=f"{line['patches_per_second']:.0f}"
                )
                window, window_steps, window_patches, window_start = {}, 0, 0, time.perf_counter()
            if rank == 0 and iteration % config.checkpoint_every == 0 and iteration < config.iterations:
                _save_checkpoint(
                    trainer.out, iteration, trainer.network, trainer.optimizer, config, trainer.adversary
                )
            if iteration >= config.iterations:
                break
    progress.close()
    weights = trainer.out / "model.pth"
    if rank == 0:
        save_weights(trainer.network, weights)
        _save_checkpoint(
            trainer.out, iteration, trainer.network, trainer.optimizer, config, trainer.adversary
        )
    if trainer.world_size > 1:
        dist.barrier()  # every rank returns after the weights exist
    return FinetuneResult(
        weights=weights,
        iterations=iteration,
        final_loss=history[-1]["loss"] if history else float("nan"),
        patches_per_second=run_patches / max(time.perf_counter() - run_start, 1e-9),
        rank=rank,
        history=history,
    )
