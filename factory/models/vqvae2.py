"""VQ-VAE-2 (Razavi, van den Oord and Vinyals, "Generating Diverse High-Fidelity Images with VQ-VAE-2", NeurIPS 2019).

The `paper` preset has the sizes and structure of rosinality/vq-vae-2-pytorch (`vqvae.py`, the implementation the
paper's reproductions use): 128 channels, 2 residual blocks of 32 hidden channels per stack, codebooks of 512
vectors of dimension 64 updated by moving averages with decay 0.99, and the latent loss weighted 0.25. Two levels:

    bottom encoder: x (3, H, W) -> 4x down -> (128, H/4, W/4)
    top encoder:    -> 2x down -> (128, H/8, W/8) -> 1x1 conv -> quantise -> z_top (64, H/8, W/8)
    top decoder:    z_top -> 2x up (64, H/4, W/4), concatenated with the bottom features -> 1x1 conv -> quantise
                    -> z_bottom (64, H/4, W/4)
    decoder:        [2x up(z_top), z_bottom] (128, H/4, W/4) -> 4x up -> x_hat (3, H, W)

Training loss (rosinality's `train_vqvae.py`): mean squared error on images scaled to [-1, 1], plus 0.25 times the
commitment losses of both levels; gradients pass each quantiser by the straight-through estimator. With these
sizes the model has 1,388,867 trainable parameters, plus 2 x 512 x 64 codebook vectors held as buffers.

    model = build_model("vqvae2", preset="paper")
    loss, logs = model.loss(x)      # x: (N, 3, 256, 256) in [0, 1]
    x_hat = model.reconstruct(x)    # x: (N, 3, H, W) in [0, 1], any H, W; padded to a multiple of 8 and cropped back
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from factory.config import ConfigError
from factory.models import TrainingRecipe
from factory.models.vqvae import (
    Quantized,
    ResidualBlock,
    VectorQuantizer,
    reflect_pad_to_multiple,
    to_signed,
    to_unit,
)


@dataclass(frozen=True)
class VQVAE2Config:
    channels: int = 128  # channels of the encoders and decoders (rosinality: `channel`)
    residual_blocks: int = 2  # residual blocks in each encoder and decoder stack (`n_res_block`)
    residual_channels: int = 32  # hidden channels inside each residual block (`n_res_channel`)
    embedding_dim: int = 64  # D: size of each codebook vector, both levels (`embed_dim`)
    codebook_size: int = 512  # K: vectors per codebook, both levels (`n_embed`)
    ema_decay: float = 0.99  # gamma of the moving-average codebook update (`decay`)
    latent_loss_weight: float = 0.25  # beta: weight of the commitment losses against the reconstruction loss
    dead_code_threshold: float | None = None  # restart codes whose moving-average use falls below this (see
    # factory.models.vqvae.VectorQuantizer); None, as in rosinality's reference

    def __post_init__(self) -> None:
        for name in ("channels", "residual_channels", "embedding_dim", "codebook_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"VQVAE2Config.{name} must be positive, got {getattr(self, name)}")
        if self.channels % 2:
            raise ConfigError(
                f"VQVAE2Config.channels must be even (the first convolution has half), got {self.channels}"
            )
        if self.residual_blocks < 0:
            raise ConfigError(f"VQVAE2Config.residual_blocks must be >= 0, got {self.residual_blocks}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"VQVAE2Config.ema_decay must be in (0, 1), got {self.ema_decay}")


PRESETS = {
    "paper": VQVAE2Config(),
    # The paper's sizes with dead-code restarts: the build's embedded default trains this one (factory/train.py).
    "embedded": VQVAE2Config(dead_code_threshold=1.0),
    "tiny": VQVAE2Config(
        channels=32, residual_blocks=1, residual_channels=8, embedding_dim=16, codebook_size=64
    ),
}

# The reference training recipe: rosinality/vq-vae-2-pytorch train_vqvae.py. Batch 128 (`128 // n_gpu` per GPU),
# Adam at 3e-4 (`--lr`, the default `--sched` None: constant), transforms Resize(256) + CenterCrop(256) (torchvision's
# bilinear; Tiny-ImageNet's 64x64 images are upscaled 4x), no flip, normalised to [-1, 1] (done in `loss`).
RECIPE = TrainingRecipe(batch_size=128, lr=3e-4, pipeline="resize", crop="center", interpolation="bilinear")


def _residual_stack(channels: int, residual_blocks: int, residual_channels: int) -> list[nn.Module]:
    # The residual blocks end without an activation; a ReLU closes the stack.
    return [*[ResidualBlock(channels, residual_channels) for _ in range(residual_blocks)], nn.ReLU()]


def _encoder(in_channels: int, config: VQVAE2Config, downsampling: int) -> nn.Sequential:
    """(N, in_channels, H, W) -> (N, channels, H / downsampling, W / downsampling), downsampling 2 or 4."""
    half = config.channels // 2
    if downsampling == 4:
        layers = [
            nn.Conv2d(in_channels, half, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(half, config.channels, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(config.channels, config.channels, 3, padding=1),
        ]
    else:
        layers = [
            nn.Conv2d(in_channels, half, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(half, config.channels, 3, padding=1),
        ]
    return nn.Sequential(
        *layers, *_residual_stack(config.channels, config.residual_blocks, config.residual_channels)
    )


def _decoder(in_channels: int, out_channels: int, config: VQVAE2Config, upsampling: int) -> nn.Sequential:
    """(N, in_channels, h, w) -> (N, out_channels, h * upsampling, w * upsampling), upsampling 2 or 4."""
    half = config.channels // 2
    layers = [
        nn.Conv2d(in_channels, config.channels, 3, padding=1),
        *_residual_stack(config.channels, config.residual_blocks, config.residual_channels),
    ]
    if upsampling == 4:
        layers += [
            nn.ConvTranspose2d(config.channels, half, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(half, out_channels, 4, stride=2, padding=1),
        ]
    else:
        layers.append(nn.ConvTranspose2d(config.channels, out_channels, 4, stride=2, padding=1))
    return nn.Sequential(*layers)


@dataclass
class HierarchicalLatents:
    """The output of `VQVAE2.encode`: both quantised levels."""

    top: Quantized  # latents (N, D, H/8, W/8): global structure
    bottom: Quantized  # latents (N, D, H/4, W/4): local detail, conditioned on the top level


class VQVAE2(nn.Module):
    """Two-level VQ-VAE-2; see the module docstring."""

    # The top level is 8x smaller than the input: reconstruct pads inputs to a multiple of this, and training
    # crops must be one.
    size_multiple = 8
    samples = False  # reconstruct is deterministic: it draws nothing from its generator

    def __init__(self, config: VQVAE2Config) -> None:
        super().__init__()
        self.config = config
        dim = config.embedding_dim
        self.bottom_encoder = _encoder(3, config, downsampling=4)
        self.top_encoder = _encoder(config.channels, config, downsampling=2)
        self.top_to_codebook = nn.Conv2d(config.channels, dim, 1)
        self.top_quantizer = VectorQuantizer(
            config.codebook_size, dim, config.latent_loss_weight, config.ema_decay, config.dead_code_threshold
        )
        self.top_decoder = _decoder(dim, dim, config, upsampling=2)
        self.bottom_to_codebook = nn.Conv2d(dim + config.channels, dim, 1)
        self.bottom_quantizer = VectorQuantizer(
            config.codebook_size, dim, config.latent_loss_weight, config.ema_decay, config.dead_code_threshold
        )
        self.upsample_top = nn.ConvTranspose2d(dim, dim, 4, stride=2, padding=1)
        self.decoder = _decoder(2 * dim, 3, config, upsampling=4)

    def encode(self, x: Tensor, update_codebook: bool = False) -> HierarchicalLatents:
        """x: (N, 3, H, W) in [-1, 1], H and W multiples of 8 -> quantised top and bottom latents."""
        bottom_features = self.bottom_encoder(x)
        top_features = self.top_encoder(bottom_features)
        top = self.top_quantizer(self.top_to_codebook(top_features), update_codebook=update_codebook)
        # The bottom level sees the decoded top level, so it only has to encode what the top level missed.
        conditioned = torch.cat([self.top_decoder(top.latents), bottom_features], dim=1)
        bottom = self.bottom_quantizer(self.bottom_to_codebook(conditioned), update_codebook=update_codebook)
        return HierarchicalLatents(top=top, bottom=bottom)

    def decode(self, top_latents: Tensor, bottom_latents: Tensor) -> Tensor:
        """top_latents: (N, D, h, w), bottom_latents: (N, D, 2h, 2w) -> image (N, 3, 8h, 8w), roughly in [-1, 1]."""
        return self.decoder(torch.cat([self.upsample_top(top_latents), bottom_latents], dim=1))

    def loss(self, x: Tensor) -> tuple[Tensor, dict[str, float]]:
        """x: (N, 3, H, W) in [0, 1], H and W multiples of 8 -> (reconstruction + 0.25 * latent loss, logs)."""
        target = to_signed(x)
        latents = self.encode(target, update_codebook=self.training)
        output = self.decode(latents.top.latents, latents.bottom.latents)
        reconstruction = F.mse_loss(output.float(), target.float())
        latent = latents.top.loss + latents.bottom.loss  # each already weighted by latent_loss_weight
        total = reconstruction + latent
        logs = {
            "loss": total.item(),
            "reconstruction": reconstruction.item(),
            "latent": latent.item(),
            "perplexity_top": latents.top.perplexity.item(),
            "perplexity_bottom": latents.bottom.perplexity.item(),
        }
        return total, logs

    @torch.no_grad()
    def reconstruct(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """x: (N, 3, H, W) in [0, 1], any H, W -> x_hat: (N, 3, H, W) in [0, 1]. Deterministic; `generator` unused
        (nothing is sampled: each quantiser picks the nearest code)."""
        height, width = x.shape[-2:]
        padded = reflect_pad_to_multiple(to_signed(x), self.size_multiple)
        latents = self.encode(padded)
        output = self.decode(latents.top.latents, latents.bottom.latents)[..., :height, :width]
        return to_unit(output).to(x.dtype)  # x's dtype even under a caller's bf16 autocast
