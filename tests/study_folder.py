"""Test helper for the report tests: a small study folder in the layout `factory study` writes, made by the
factory's own functions (no hand-written numbers):

    checkpoints/vqvae2/epoch-{1,2}.pt     tiny VQ-VAE-2, perturbed random weights, their regime measured for real
    shards/, manifests/                   factory.build (in-process): bicubic, vqvae2-ep1, vqvae2-ep2, and the
                                          colour-shift datasets bicubic-de0 (unshifted) and bicubic-de2
    evalsets/tiny/lr, hr                  bicubic LR of crops of two photos the datasets do not use
    eval/edsr/<run>/tiny/                 factory.evaluate.evaluate of tiny EDSR weights, one set per run (the weights
                                          differ by seed: the report reads numbers, it does not judge them)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sr_pairs import bicubic_lr, crops

from factory.build import BuildConfig, build
from factory.evaluate import EvalConfig, evaluate

FINETUNED_RUNS = ("pretrained", "bicubic", "vqvae2-ep1", "vqvae2-ep2")
COLOUR_SHIFT_RUNS = ("bicubic-de0", "bicubic-de2")
EVALSET = "tiny"


def write_checkpoints(root: Path, photos: dict[str, np.ndarray]) -> None:
    """checkpoints/vqvae2/epoch-1.pt and epoch-2.pt: tiny VQ-VAE-2 moved off its initialisation (an untrained one
    reconstructs a flat image), the second further, each with its regime measured on LR images of a photo."""
    from factory.checkpoints import checkpoint_path, save_checkpoint
    from factory.models import build_model, make_config
    from factory.regime import lr_image, measure_regime

    images = torch.stack([lr_image(photos["astronaut"], 32, 4)])
    torch.manual_seed(0)
    config = make_config("vqvae2", "tiny")
    model = build_model("vqvae2", config=config)
    for epoch in (1, 2):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.01 * torch.randn_like(parameter))
        save_checkpoint(
            checkpoint_path(root / "checkpoints", "vqvae2", epoch),
            model_name="vqvae2",
            preset="tiny",
            config=config,
            model=model,
            epoch=epoch,
            steps=epoch,
            data_fingerprint="test",
            seed=0,
            regime=measure_regime(model, images),
        )


def write_datasets(root: Path, hr_folder: Path) -> None:
    """The datasets, built by factory.build in this process (no Ray)."""
    common = dict(
        hr=(str(hr_folder),),
        crop=128,
        stride=256,
        limit=4,
        shard_size=4,
        out=str(root / "shards"),
        manifests=str(root / "manifests"),
        checkpoints=str(root / "checkpoints"),
        train_missing=False,
        actors=0,
        progress=False,
    )
    build(BuildConfig(model="bicubic", **common))
    for epoch in (1, 2):
        build(BuildConfig(model="vqvae2", epoch=epoch, **common))
    build(BuildConfig(model="bicubic", name="bicubic-de0", **common))
    build(BuildConfig(model="bicubic", target_delta_e=2.0, **common))


def write_evalset(root: Path, photos: dict[str, np.ndarray]) -> tuple[Path, Path]:
    """evalsets/tiny/{lr,hr}: 64x64 HR crops of two photos and their bicubic x4 LR."""
    lr_folder, hr_folder = root / "evalsets" / EVALSET / "lr", root / "evalsets" / EVALSET / "hr"
    lr_folder.mkdir(parents=True)
    hr_folder.mkdir(parents=True)
    pairs = crops({"rocket": photos["rocket"], "coffee": photos["coffee"]}, size=64, per_photo=2)
    for index, (_, hr) in enumerate(pairs):
        Image.fromarray(hr).save(hr_folder / f"{index:04d}.png")
        Image.fromarray(bicubic_lr(hr, 4)).save(lr_folder / f"{index:04d}.png")
    return lr_folder, hr_folder


def lpips_weights(folder: Path) -> Path | None:
    """LPIPS (alex) weights from the lpips package: its published linear heads on a random AlexNet (pnet_rand: no
    download), as tests/test_evaluate.py makes them; None without the package."""
    try:
        import lpips
    except ImportError:
        return None
    path = folder / "lpips_alex.pth"
    torch.save(lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False).state_dict(), path)
    return path


def write_evals(root: Path, lr_folder: Path, hr_folder: Path) -> None:
    """eval/edsr/<run>/tiny/ for every run, by factory.evaluate on tiny EDSR weights seeded per run."""
    from factory.sr import build_network, save_weights

    lpips = lpips_weights(root)
    for seed, run in enumerate((*FINETUNED_RUNS, *COLOUR_SHIFT_RUNS)):
        torch.manual_seed(seed)
        weights = save_weights(build_network("edsr", "tiny"), root / "weights" / f"{run}.pth")
        evaluate(
            EvalConfig(
                model=str(weights),
                lr=str(lr_folder),
                hr=str(hr_folder),
                out=str(root / "eval" / "edsr" / run / EVALSET),
                y_channel=True,
                crop_border=4,
                lpips_weights=None if lpips is None else str(lpips),
                device="cpu",
            )
        )


def make_study(root: Path, photos: dict[str, np.ndarray]) -> Path:
    """The whole folder under `root`; returns it."""
    hr_folder = root / "hr"
    hr_folder.mkdir(parents=True)
    for name in ("astronaut", "chelsea"):
        Image.fromarray(photos[name]).save(hr_folder / f"{name}.png")
    write_checkpoints(root, photos)
    write_datasets(root, hr_folder)
    write_evals(root, *write_evalset(root, photos))
    return root
