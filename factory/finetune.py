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
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from factory.config import FactoryError, config_to_dict, error_line
from factory.sr import ARCHITECTURES, SRNetwork, build_network, load_network, save_atomic, save_weights
from factory.sr.losses import (
    ESRGANLossConfig,
    VGGFeatures,
    VGGStyleDiscriminator,
    discriminator_loss,
    generator_loss,
)
from factory.stream import PairedPatches

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^iter_(\d+)\.pt$")
# Batches per rank and worker per epoch: long, as each epoch refills the shuffle buffer.
STEPS_PER_EPOCH = 1000
LOSSES: tuple[str, ...] = ("l1", "esrgan")


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
    iterations: int = 10_000  # optimiser steps (every rank runs exactly this many)
    batch_size: int = 16  # patches per rank per step
    patch_size: int = 64  # LR patch side; the HR patch is scale x larger
    learning_rate: float = 1e-4  # Adam, constant
    patches_per_pair: int = 8  # random crops per decoded pair (decoding is the cost)
    workers: int = 4  # DataLoader worker processes per rank
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


def _checkpoints(out: Path) -> dict[int, Path]:
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
    if config.architecture not in ARCHITECTURES:
        raise FactoryError(f"unknown --arch {config.architecture!r}; known: {', '.join(ARCHITECTURES)}")
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
    if config.learning_rate <= 0:
        raise FactoryError("the learning rate must be positive")
    if config.loss not in LOSSES:
        raise FactoryError(f"unknown --loss {config.loss!r}; known: {', '.join(LOSSES)}")
    if config.loss == "esrgan" and not config.vgg_weights:
        raise FactoryError(
            "--loss esrgan needs --vgg-weights (torchvision's vgg19 weights file; nothing is downloaded)"
        )


def _resume(
    out: Path,
    network: SRNetwork,
    optimizer: torch.optim.Optimizer,
    adversary: Adversary | None,
    device: torch.device,
) -> int:
    """Load the newest checkpoint (weights_only) into network, optimizer and discriminator; returns its iteration
    (0: none). An L1 checkpoint resumed with --loss esrgan starts a fresh discriminator: ESRGAN's own recipe (a
    PSNR-oriented pre-training, then the GAN stage)."""
    found = _checkpoints(out)
    if not found:
        return 0
    iteration = max(found)
    try:
        state = torch.load(found[iteration], map_location=device, weights_only=True)
    except Exception as error:  # noqa: BLE001 - an unreadable checkpoint is reported in one line
        raise FactoryError(f"cannot read checkpoint {found[iteration]}: {error_line(error)}") from None
    if state.get("architecture") != network.architecture:
        raise FactoryError(
            f"{found[iteration]} is a {state.get('architecture')} checkpoint, not {network.architecture}"
        )
    network.module.load_state_dict(state["network"])
    optimizer.load_state_dict(state["optimizer"])
    if adversary is not None and "discriminator" in state:
        adversary.module.load_state_dict(state["discriminator"])
        adversary.optimizer.load_state_dict(state["discriminator_optimizer"])
    logger.info("resumed from %s (iteration %d)", found[iteration], iteration)
    return int(state["iteration"])


def finetune(config: FinetuneConfig) -> FinetuneResult:
    """Fine-tune on streamed patches (L1, or ESRGAN's objective); every rank runs the same number of steps."""
    _check(config)
    rank, world_size, device = _distributed_setup()
    out = Path(config.out)
    try:
        # The same initial weights on every rank (DDP also broadcasts rank 0's).
        torch.manual_seed(config.seed)
        if config.pretrained:
            network = load_network(config.pretrained, config.architecture)
        else:
            network = build_network(config.architecture, config.preset)
        network.module.to(device).train()
        parameters = [parameter for parameter in network.module.parameters() if parameter.requires_grad]
        optimizer = torch.optim.Adam(parameters, lr=config.learning_rate, betas=(0.9, 0.99))
        adversary = _adversary(config, device) if config.loss == "esrgan" else None
        start = _resume(out, network, optimizer, adversary, device) if config.resume else 0
        if start >= config.iterations:
            logger.info("already at iteration %d of %d", start, config.iterations)
        model = network.module
        if world_size > 1:
            device_ids = [device.index] if device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=device_ids)
            if adversary is not None:
                adversary.discriminator = DistributedDataParallel(adversary.module, device_ids=device_ids)

        workers = max(config.workers, 0)
        readers = max(workers, 1)
        dataset = PairedPatches(
            list(config.shards),  # with weights: one entry per dataset; without: the shards of one dataset
            weights=list(config.dataset_weights) if config.dataset_weights is not None else None,
            patch_size=config.patch_size,
            scale=network.scale,
            manifests=config.manifests,
            where=config.where,
            patches_per_pair=config.patches_per_pair,
            seed=config.seed,
            # A fixed number of patches per rank and epoch, a whole number of batches per worker: every rank runs
            # the same number of steps, whatever its shards hold.
            epoch_length=config.batch_size * readers * min(STEPS_PER_EPOCH, config.iterations),
        )
        loader = DataLoader(
            dataset,
            batch_size=config.batch_size,
            num_workers=workers,
            drop_last=True,
            pin_memory=device.type == "cuda",
            persistent_workers=False,
            worker_init_fn=_one_thread,
        )
        use_amp = config.amp and device.type == "cuda"
        history: list[dict] = []
        log_path = out / "log.jsonl"
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
        iteration = start
        window: dict[str, float] = {}
        window_steps, window_start = 0, time.perf_counter()
        run_start, run_patches = time.perf_counter(), 0
        progress = tqdm(total=config.iterations, initial=start, disable=rank != 0, desc="finetune", unit="it")
        while iteration < config.iterations:
            dataset.set_epoch(iteration)  # a different data order after every epoch and after a resume
            for batch in loader:
                lr = batch["lr"].to(device, non_blocking=True)  # (B, 3, p, p)
                hr = batch["hr"].to(device, non_blocking=True)  # (B, 3, scale*p, scale*p)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    sr = model(lr).float()
                    if adversary is None:
                        loss = F.l1_loss(sr, hr)
                        parts = {"l1": loss.item()}
                    else:
                        loss, parts = generator_loss(
                            sr, hr, adversary.vgg, adversary.discriminator, adversary.weights
                        )
                if not math.isfinite(loss.item()):
                    raise FactoryError(f"the loss is {loss.item()} at iteration {iteration + 1}; lower --lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if adversary is not None:
                    # The generator step also left gradients on the discriminator: cleared before its own step.
                    adversary.optimizer.zero_grad(set_to_none=True)
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                        discriminator_loss_value = discriminator_loss(sr, hr, adversary.discriminator)
                    discriminator_loss_value.backward()
                    adversary.optimizer.step()
                    parts["discriminator"] = discriminator_loss_value.item()
                iteration += 1
                progress.update(1)
                for name, value in {"loss": loss.item(), **parts}.items():
                    window[name] = window.get(name, 0.0) + value
                window_steps += 1
                run_patches += lr.shape[0] * world_size
                if iteration % config.log_every == 0 or iteration == config.iterations:
                    elapsed = time.perf_counter() - window_start
                    line = {
                        "iteration": iteration,
                        **{name: total / window_steps for name, total in window.items()},
                        "patches_per_second": window_steps * lr.shape[0] * world_size / max(elapsed, 1e-9),
                    }
                    history.append(line)
                    progress.set_postfix(
                        loss=f"{line['loss']:.4f}", patches_per_s=f"{line['patches_per_second']:.0f}"
                    )
                    if rank == 0:
                        logger.info(
                            "iteration %d  loss %.5f  L1 %.5f  %.1f patches/s",
                            iteration,
                            line["loss"],
                            line["l1"],
                            line["patches_per_second"],
                        )
                        with open(log_path, "a") as log:
                            log.write(json.dumps(line) + "\n")
                    window, window_steps, window_start = {}, 0, time.perf_counter()
                if rank == 0 and (iteration % config.checkpoint_every == 0 or iteration == config.iterations):
                    _save_checkpoint(out, iteration, network, optimizer, config, adversary)
                if iteration >= config.iterations:
                    break
        progress.close()
        weights = out / "model.pth"
        if rank == 0:
            save_weights(network, weights)
        if world_size > 1:
            dist.barrier()  # every rank returns after the weights exist
        elapsed = time.perf_counter() - run_start
        return FinetuneResult(
            weights=weights,
            iterations=iteration,
            final_loss=history[-1]["loss"] if history else float("nan"),
            patches_per_second=run_patches / max(elapsed, 1e-9),
            rank=rank,
            history=history,
        )
    finally:
        if world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
