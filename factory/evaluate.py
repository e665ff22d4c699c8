"""Evaluate an SR network on (LR, HR) folders: SR outputs as PNG, per-image PSNR / SSIM / LPIPS, and a summary.

    factory eval --model runs/finetune/model.pth --lr NTIRE2018/DIV2K_valid_LR_mild --hr DIV2K_valid_HR --out runs/eval

Metrics follow BasicSR's conventions (the SR papers' numbers), computed on the 8-bit SR image exactly as saved:
- PSNR: 10 log10(255^2 / MSE) in float64 over all channels (skimage's `peak_signal_noise_ratio`, data_range 255).
- SSIM: Wang et al. 2004 with an 11x11 Gaussian window (sigma 1.5), K1 0.01, K2 0.03, over the 'valid' region,
  averaged over channels (skimage's `structural_similarity` with gaussian_weights, sigma 1.5 and
  use_sample_covariance False).
- `--y-channel`: both on Y of ITU-R BT.601 YCbCr (Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255, float, not rounded),
  as BasicSR's `test_y_channel`; `--crop-border N` drops N pixels on each side first (BasicSR uses N = scale).
- LPIPS (Zhang et al. 2018, AlexNet variant) only from weights on disk (`--lpips-weights`): the lpips package's
  `LPIPS(net="alex").state_dict()` (AlexNet features + linear heads in one file). Without it the column is empty.

Pairing: an LR file pairs with the HR file whose name matches after removing the LR suffix: NTIRE 2018 Track 2-4
(DIV2K mild / difficult / wild: `0801x4m.png` -> `0801.png`), `_x4` / `x4` (DIV2K bicubic `0801x4.png`), `_LR`;
and HR suffixes `_HR` / `_GT`. NTIRE 2020 Real-World SR names its validation LR images like their ground truth
(`0801.png` in both folders): the same-name rule covers it, as it does any two folders with matching names.

Outputs (--out): `sr/<name>.png`, `metrics.csv` (one row per LR image; `reason` says why an image could not be
evaluated, e.g. an unreadable file or sizes that do not pair, and its metrics stay empty) and `summary.json` (the
means over the evaluated images, and the rejected ones). A bad image is recorded and the run goes on. A run writes
a complete set or nothing: everything goes to a hidden folder in --out first and replaces the earlier run's outputs
at the end, summary.json last, so a summary.json is only ever beside the sr/ and metrics.csv of its own run.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm import tqdm

from factory.config import FactoryError, error_line
from factory.devices import resolve_device
from factory.sources import find_images, load_rgb

logger = logging.getLogger(__name__)

# LR name suffixes, most specific first: NTIRE 2018 realistic tracks (x4m mild, x4d difficult, x4w wild), DIV2K
# bicubic (x4), BasicSR-style _x4 / _LR.
_LR_SUFFIX = re.compile(r"(?:[_-]?x\d+[mdw]?|[_-]lr(?:x\d+)?)$", re.IGNORECASE)
_HR_SUFFIX = re.compile(r"[_-](?:hr|gt)$", re.IGNORECASE)


@dataclass(frozen=True)
class EvalConfig:
    model: str  # SR weights (official layout or `factory finetune`'s model.pth)
    lr: str  # folder of LR inputs
    hr: str  # folder of ground-truth HR images
    out: str = "runs/eval"  # SR PNGs under out/sr/, metrics.csv, summary.json
    y_channel: bool = False  # metrics on BT.601 Y instead of RGB
    crop_border: int = 0  # pixels dropped on each side before the metrics
    lpips_weights: str | None = None  # LPIPS (alex) weights file; None: no LPIPS
    architecture: str | None = None  # expected architecture (checked against the weights), None: any
    device: str = "auto"  # factory.devices: auto (CUDA, then MPS, then the CPU), cpu, cuda, cuda:N, mps


@dataclass(frozen=True)
class ImagePair:
    name: str  # the HR file's stem: the SR output is saved as <name>.png
    lr: Path
    hr: Path


@dataclass(frozen=True)
class RejectedPair:
    name: str  # as in metrics.csv
    lr: Path
    reason: str  # one line


@dataclass
class EvalSummary:
    images: int  # evaluated (rejected ones aside)
    psnr: float  # means over the evaluated images
    ssim: float
    lpips: float | None  # None without LPIPS weights
    csv: Path
    outputs: Path
    rejected: list[RejectedPair] = field(default_factory=list)  # images that could not be evaluated


# --------------------------------------------------------------------------------------------------------------------
# Pairing
# --------------------------------------------------------------------------------------------------------------------


def _index(paths: list[Path], suffix: re.Pattern, role: str) -> dict[str, Path]:
    index: dict[str, Path] = {}
    for path in paths:
        stem = suffix.sub("", path.stem) or path.stem
        if stem in index:
            raise FactoryError(
                f"two {role} images match the name {stem!r}: {index[stem].name} and {path.name}"
            )
        index[stem] = path
    return index


def pair_folders(lr_folder: str | os.PathLike, hr_folder: str | os.PathLike) -> list[ImagePair]:
    """The (LR, HR) pairs of two folders by the naming rules above; every LR image must find its HR image."""
    lr_images, hr_images = find_images(lr_folder), find_images(hr_folder)
    if not lr_images:
        raise FactoryError(f"no images in {lr_folder}")
    hr_index = _index(hr_images, _HR_SUFFIX, "HR")
    pairs, unmatched = [], []
    for stem, path in sorted(_index(lr_images, _LR_SUFFIX, "LR").items()):
        hr = hr_index.get(stem) or hr_index.get(path.stem)
        if hr is None:
            unmatched.append(path.name)
        else:
            pairs.append(ImagePair(name=hr.stem, lr=path, hr=hr))
    if unmatched:
        raise FactoryError(
            f"{len(unmatched)} LR images without an HR image in {hr_folder}, e.g. {unmatched[0]}"
        )
    return pairs


# --------------------------------------------------------------------------------------------------------------------
# PSNR / SSIM (BasicSR's conventions)
# --------------------------------------------------------------------------------------------------------------------


def rgb_to_y(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) float64 BT.601 luma in [16, 235] (BasicSR's rgb2ycbcr(y_only=True), unrounded)."""
    return image.astype(np.float64) @ np.array([65.481, 128.553, 24.966]) / 255.0 + 16.0


def psnr(image: np.ndarray, reference: np.ndarray, data_range: float = 255.0) -> float:
    """PSNR in dB, float64 over every value; inf for identical images."""
    mse = np.mean((image.astype(np.float64) - reference.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else float(10 * np.log10(data_range**2 / mse))


# Side of SSIM's Gaussian window: the smallest image (after --crop-border) SSIM is defined on.
SSIM_WINDOW = 11


def _gaussian_window(size: int = SSIM_WINDOW, sigma: float = 1.5) -> torch.Tensor:
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    window = torch.exp(-(offsets**2) / (2 * sigma**2))
    return window / window.sum()


def ssim(image: np.ndarray, reference: np.ndarray, data_range: float = 255.0) -> float:
    """SSIM of (H, W) or (H, W, C) images: Gaussian 11x11 window (sigma 1.5), valid region, mean over channels."""
    x = torch.from_numpy(np.asarray(image, dtype=np.float64))
    y = torch.from_numpy(np.asarray(reference, dtype=np.float64))
    if x.ndim == 2:
        x, y = x[..., None], y[..., None]
    x, y = x.permute(2, 0, 1)[:, None], y.permute(2, 0, 1)[:, None]  # (C, 1, H, W): channels as a batch
    window = _gaussian_window()
    horizontal, vertical = window.view(1, 1, 1, -1), window.view(1, 1, -1, 1)

    def blur(z: torch.Tensor) -> torch.Tensor:  # separable Gaussian, 'valid' (no padding)
        return F.conv2d(F.conv2d(z, horizontal), vertical)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    covariance = blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * covariance + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    return float(ssim_map.mean(dim=(1, 2, 3)).mean())


def image_metrics(
    sr: np.ndarray, hr: np.ndarray, *, y_channel: bool = False, crop_border: int = 0
) -> tuple[float, float]:
    """(PSNR, SSIM) of an (H, W, 3) uint8 SR image against its HR image."""
    height, width = sr.shape[:2]
    if min(height, width) - 2 * crop_border < SSIM_WINDOW:
        raise FactoryError(
            f"a {height}x{width} image with --crop-border {crop_border} leaves "
            f"{max(0, height - 2 * crop_border)}x{max(0, width - 2 * crop_border)} pixels; SSIM needs at least "
            f"{SSIM_WINDOW}x{SSIM_WINDOW}"
        )
    if crop_border:
        sr, hr = (
            sr[crop_border:-crop_border, crop_border:-crop_border],
            hr[crop_border:-crop_border, crop_border:-crop_border],
        )
    if y_channel:
        sr, hr = rgb_to_y(sr), rgb_to_y(hr)
    return psnr(sr, hr), ssim(sr, hr)


# --------------------------------------------------------------------------------------------------------------------
# LPIPS (AlexNet), weights from disk only
# --------------------------------------------------------------------------------------------------------------------

_ALEX_LAYERS = ((0, 2), (2, 5), (5, 8), (8, 10), (10, 12))  # AlexNet feature slices ending at relu1..relu5
_ALEX_CHANNELS = (64, 192, 384, 256, 256)


class LPIPS(nn.Module):
    """d(x, y) = sum_l mean_hw || w_l * (f_l(x) / |f_l(x)| - f_l(y) / |f_l(y)|) ||^2 over AlexNet relu1..relu5."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import alexnet

        self.features = alexnet(weights=None).features[:12]
        self.linear = nn.ModuleList(nn.Conv2d(channels, 1, 1, bias=False) for channels in _ALEX_CHANNELS)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> LPIPS:
        """From the lpips package's `LPIPS(net="alex")` state dict (keys `net.sliceK.I.*`, `linK.model.1.weight`)."""
        from factory.sr.networks import read_state_dict

        state = read_state_dict(path)
        renamed = {}
        for key, value in state.items():
            feature = re.match(r"^net\.slice\d\.(\d+)\.(weight|bias)$", key)
            linear = re.match(r"^lin(\d)\.model\.1\.weight$", key)
            if feature:
                renamed[f"features.{feature.group(1)}.{feature.group(2)}"] = value
            elif linear:
                renamed[f"linear.{linear.group(1)}.weight"] = value
            elif key.startswith("features."):
                renamed[key] = value  # torchvision AlexNet names
        model = cls()
        missing = sorted(set(model.state_dict()) - set(renamed) - {"shift", "scale"})
        if missing:
            raise FactoryError(f"{path} is not an LPIPS-alex state dict (missing {missing[:3]}...)")
        model.load_state_dict(renamed, strict=False)
        return model.eval()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x, y: (N, 3, H, W) in [0, 1] -> (N,) distances."""
        x = ((x * 2 - 1) - self.shift) / self.scale
        y = ((y * 2 - 1) - self.shift) / self.scale
        total = torch.zeros(x.shape[0], device=x.device)
        for (start, end), linear in zip(_ALEX_LAYERS, self.linear, strict=True):
            x, y = self.features[start:end](x), self.features[start:end](y)
            normalised_x = x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            normalised_y = y / (y.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            total = total + linear((normalised_x - normalised_y) ** 2).mean(dim=(1, 2, 3))
        return total


# --------------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------------


def _to_tensor(image: np.ndarray, device: torch.device) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float in [0, 1]."""
    return torch.from_numpy(np.array(image, copy=True)).to(device).permute(2, 0, 1)[None].float() / 255


def super_resolve(module: nn.Module, lr: np.ndarray, device: torch.device) -> np.ndarray:
    """(h, w, 3) uint8 -> (scale*h, scale*w, 3) uint8, rounded as an 8-bit PNG stores it."""
    with torch.no_grad():
        sr = module(_to_tensor(lr, device))[0].clamp(0, 1)
    return (sr.permute(1, 2, 0) * 255).round().to(torch.uint8).cpu().numpy()


# What makes one pair unusable, not the run: an unreadable or corrupt file (sources.RejectedImage, a FactoryError),
# sizes that do not pair or leave too little for SSIM (FactoryError), an image the network cannot take (RuntimeError,
# running out of memory included).
_IMAGE_ERRORS = (FactoryError, OSError, ValueError, RuntimeError)
_STAGING_PREFIX, _STAGING_SUFFIX = ".eval-", ".tmp"


def _measure(
    pair: ImagePair,
    module: nn.Module,
    scale: int,
    lpips: LPIPS | None,
    config: EvalConfig,
    device: torch.device,
    sr_folder: Path,
) -> dict[str, float | None]:
    """PSNR / SSIM (/ LPIPS) of one pair; its SR image is saved once they are taken."""
    lr, hr = load_rgb(pair.lr), load_rgb(pair.hr)
    sr = super_resolve(module, lr, device)
    excess = (hr.shape[0] - sr.shape[0], hr.shape[1] - sr.shape[1])
    if not all(0 <= pixels < scale for pixels in excess):
        raise FactoryError(f"{pair.lr.name} x{scale} is {sr.shape[:2]}, {pair.hr.name} is {hr.shape[:2]}")
    # HR not a multiple of the scale: cropped, as BasicSR's mod-crop does.
    hr = hr[: sr.shape[0], : sr.shape[1]]
    value_psnr, value_ssim = image_metrics(sr, hr, y_channel=config.y_channel, crop_border=config.crop_border)
    value_lpips = None
    if lpips is not None:
        border = config.crop_border or None
        crop = (slice(border, -border if border else None),) * 2
        with torch.no_grad():
            value_lpips = float(lpips(_to_tensor(sr[crop], device), _to_tensor(hr[crop], device))[0])
    Image.fromarray(sr).save(sr_folder / f"{pair.name}.png", format="PNG")
    return {"psnr": value_psnr, "ssim": value_ssim, "lpips": value_lpips}


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A hidden folder in `out` the run writes into, removed however the run ends (the outputs moved out of it by
    `_publish` first). One left by a killed run is removed here."""
    out.mkdir(parents=True, exist_ok=True)
    for leftover in out.glob(f"{_STAGING_PREFIX}*{_STAGING_SUFFIX}"):
        shutil.rmtree(leftover, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, suffix=_STAGING_SUFFIX, dir=out))
    try:
        (staging / "sr").mkdir()
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish(staging: Path, out: Path) -> None:
    """Replace an earlier run's outputs by this run's. summary.json goes first and comes back last: should the run
    die in between, no summary.json stands beside outputs that are not its own."""
    (out / "summary.json").unlink(missing_ok=True)
    if (out / "sr").exists():
        os.replace(out / "sr", staging / "sr.earlier")  # removed with the staging folder
    os.replace(staging / "sr", out / "sr")
    os.replace(staging / "metrics.csv", out / "metrics.csv")
    os.replace(staging / "summary.json", out / "summary.json")


def _write_records(rows: list[dict], card: dict, folder: Path) -> None:
    """metrics.csv (one row per LR image, empty metrics for a rejected one) and summary.json."""
    with open(folder / "metrics.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["name", "psnr", "ssim", "lpips", "reason"])
        writer.writeheader()
        for row in rows:
            writer.writerow({key: "" if value is None else value for key, value in row.items()})
    (folder / "summary.json").write_text(json.dumps(card, indent=2) + "\n")


def evaluate(config: EvalConfig) -> EvalSummary:
    from factory.sr.networks import load_network

    if config.crop_border < 0:
        raise FactoryError("--crop-border must be >= 0")
    device = resolve_device(config.device)
    # The weights before the folders: a wrong --model fails before a large folder is walked.
    network = load_network(config.model, config.architecture)
    pairs = pair_folders(config.lr, config.hr)
    module = network.module.to(device).eval()
    lpips = None
    if config.lpips_weights:
        lpips = LPIPS.from_file(config.lpips_weights).to(device)
    else:
        logger.warning("no --lpips-weights: the lpips column stays empty")
    out = Path(config.out)
    with _staging(out) as staging:
        rows, rejected = [], []
        for pair in tqdm(pairs, desc="eval", unit="image"):
            row = {"name": pair.name, "psnr": None, "ssim": None, "lpips": None, "reason": ""}
            try:
                row.update(_measure(pair, module, network.scale, lpips, config, device, staging / "sr"))
            except _IMAGE_ERRORS as error:
                row["reason"] = error_line(error)
                rejected.append(RejectedPair(pair.name, pair.lr, row["reason"]))
                logger.warning("rejected %s: %s", pair.lr.name, row["reason"])
            rows.append(row)
        evaluated = [row for row in rows if not row["reason"]]
        if not evaluated:
            raise FactoryError(
                f"none of the {len(rows)} images could be evaluated; {rejected[0].lr.name}: {rejected[0].reason}"
            )
        summary = EvalSummary(
            images=len(evaluated),
            psnr=float(np.mean([row["psnr"] for row in evaluated])),
            ssim=float(np.mean([row["ssim"] for row in evaluated])),
            lpips=float(np.mean([row["lpips"] for row in evaluated])) if lpips is not None else None,
            csv=out / "metrics.csv",
            outputs=out / "sr",
            rejected=rejected,
        )
        card = {
            "model": str(config.model),
            "architecture": network.architecture,
            "scale": network.scale,
            "lr": str(config.lr),
            "hr": str(config.hr),
            "y_channel": config.y_channel,
            "crop_border": config.crop_border,
            "images": summary.images,
            "psnr": summary.psnr,
            "ssim": summary.ssim,
            "lpips": summary.lpips,
            "rejected": [
                {"name": image.name, "lr": image.lr.name, "reason": image.reason} for image in rejected
            ],
        }
        _write_records(rows, card, staging)
        _publish(staging, out)
    return summary
