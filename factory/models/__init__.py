"""The registry of undertrained image reconstructors, by the names the CLI uses.

Every reconstructor is an `nn.Module` with one shared interface, so that `train.py` and `build.py` never need to
know which model they hold:

    model = build_model("vqvae2", preset="tiny")
    loss, logs = model.loss(x)          # x: (N, 3, H, W) in [0, 1] at the model's native size; logs: dict[str, float]
    x_hat = model.reconstruct(x)        # x: (N, 3, H, W) in [0, 1], any size >= 16; x_hat: same shape, in [0, 1]
    x_hat = model.reconstruct(x, generator=g)  # models that sample (MAE masks, DDIM noise) draw from `g` only
    model.samples                       # True when reconstruct draws from its generator (recorded per pair)

Each model module holds a Config dataclass (one comment per field), the nn.Module taking that config, and
`PRESETS = {"paper": ..., "tiny": ...}`. The registry below is the one explicit list of them; modules are imported
on first use so that `factory --help` does not pay for every model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from factory.config import ConfigError, config_from_dict

if (
    TYPE_CHECKING
):  # torch only for the type hints: MODEL_NAMES feeds the CLI's choices without importing torch
    import torch
    from torch import nn

# The paper's epoch: "Tiny-ImageNet, which contained 45,000 images" (Section 3.2). `factory train` counts an epoch as
# this many samples whatever the folder holds, so "epoch 8" is the same amount of optimisation on any data.
PAPER_EPOCH_SIZE = 45_000


@dataclass(frozen=True)
class TrainingRecipe:
    """A model's reference training recipe, as its reference implementation runs it (each model module's RECIPE
    says where every value comes from). `factory train` uses it unless told otherwise."""

    batch_size: int  # images per optimiser step
    lr: float  # learning rate (constant: schedules are left out, the point is a model stopped early)
    betas: tuple[float, float] = (0.9, 0.999)  # Adam's (beta_1, beta_2)
    weight_decay: float = (
        0.0  # decoupled (AdamW); 0 makes AdamW exactly Adam. Not applied to biases and norms
    )
    # The input pipeline. "resize": the shorter side is resized to the native size with `interpolation` (so
    # Tiny-ImageNet's 64x64 images are upscaled 4x to 256), then cut to a square by `crop` ("center", or "random");
    # "random_resized": torchvision's RandomResizedCrop(native size, scale=`crop_scale`, ratio 3/4..4/3);
    # "crop": a random square at the image's own scale (upscaled first only when smaller), which keeps a photo's
    # pixel statistics (the build's embedded default).
    pipeline: str = "resize"  # "resize", "random_resized" or "crop"
    crop: str = "center"  # "center" or "random" (pipeline "resize" only)
    interpolation: str = "bilinear"  # "bilinear" or "bicubic": torchvision's Resize default is bilinear
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop's area fraction range
    flip: bool = False  # random horizontal flip with probability 1/2
    downscale: int = (
        1  # bicubic-downsample each image by this first (the build's scale: crops with LR statistics)
    )
    grad_clip: float | None = None  # clip the gradients' global norm to this (None: no clipping)


@dataclass(frozen=True)
class ModelSpec:
    name: str  # registry name, as on the command line
    config_class: type  # the model's Config dataclass
    model_class: type[nn.Module]  # constructed as model_class(config)
    presets: Mapping[str, Any]  # preset name -> Config instance ("paper", "tiny")
    native_size: int  # training / native input size from the paper (Section 3.2)
    recipe: TrainingRecipe  # the reference training recipe (the model module's RECIPE)

    def configure_optimizer(
        self, model: nn.Module, lr: float | None = None, recipe: TrainingRecipe | None = None
    ) -> torch.optim.AdamW:
        """The model's optimiser, as nanoGPT's model owns `configure_optimizers`: AdamW with the recipe's rate,
        betas and weight decay (`recipe`: this spec's RECIPE unless another is given, `lr` overriding its rate), the
        decay not applied to biases and norm weights (1-d parameters; timm's add_weight_decay, which MAE uses). With
        weight decay 0 this is exactly Adam."""
        import torch

        recipe = recipe or self.recipe
        decayed = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
        plain = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
        groups = [
            {"params": decayed, "weight_decay": recipe.weight_decay},
            {"params": plain, "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=recipe.lr if lr is None else lr, betas=recipe.betas)


def _vqvae() -> ModelSpec:
    from factory.models import vqvae

    return ModelSpec(
        "vqvae", vqvae.VQVAEConfig, vqvae.VQVAE, vqvae.PRESETS, native_size=256, recipe=vqvae.RECIPE
    )


def _vqvae2() -> ModelSpec:
    from factory.models import vqvae2

    return ModelSpec(
        "vqvae2", vqvae2.VQVAE2Config, vqvae2.VQVAE2, vqvae2.PRESETS, native_size=256, recipe=vqvae2.RECIPE
    )


def _mae() -> ModelSpec:
    from factory.models import mae

    return ModelSpec("mae", mae.MAEConfig, mae.MAE, mae.PRESETS, native_size=224, recipe=mae.RECIPE)


def _vae() -> ModelSpec:
    from factory.models import vae

    return ModelSpec("vae", vae.VAEConfig, vae.VAE, vae.PRESETS, native_size=64, recipe=vae.RECIPE)


def _ddim() -> ModelSpec:
    from factory.models import ddim

    return ModelSpec("ddim", ddim.DDIMConfig, ddim.DDIM, ddim.PRESETS, native_size=256, recipe=ddim.RECIPE)


_REGISTRY: dict[str, Callable[[], ModelSpec]] = {
    "vqvae": _vqvae,
    "vqvae2": _vqvae2,
    "mae": _mae,
    "vae": _vae,
    "ddim": _ddim,
}

MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    """The ModelSpec registered under `name`; an unknown name is a ConfigError listing the known ones."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}")
    return _REGISTRY[name]()


def make_config(name: str, preset: str = "paper", overrides: Mapping[str, Any] | None = None) -> Any:
    """The Config of model `name` from a preset, with optional field overrides (unknown fields are an error)."""
    spec = get_spec(name)
    if preset not in spec.presets:
        raise ConfigError(f"model {name!r} has no preset {preset!r}; presets: {', '.join(spec.presets)}")
    base = dataclasses.asdict(spec.presets[preset])
    base.update(overrides or {})
    return config_from_dict(spec.config_class, base)


def build_model(name: str, preset: str = "paper", config: Any | None = None) -> nn.Module:
    """A freshly initialised reconstructor: from `config` when given, else from the preset."""
    spec = get_spec(name)
    if config is None:
        config = make_config(name, preset)
    elif isinstance(config, Mapping):
        config = config_from_dict(spec.config_class, dict(config))
    return spec.model_class(config)
