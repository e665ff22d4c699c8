"""VanillaVAE (Kingma & Welling), the convolutional VAE of the paper's preliminary study (Section 3.2, 64x64 input).

The `paper` preset follows AntixK/PyTorch-VAE's `VanillaVAE` (models/vanilla_vae.py with configs/vae.yaml):
five stride-2 3x3 conv blocks (Conv-BatchNorm-LeakyReLU) with 32-64-128-256-512 channels take 64x64 to 2x2x512, two
linear heads give the posterior mean mu and log-variance of a 128-d latent, and a mirrored decoder (linear to 2x2x512,
five stride-2 transposed-conv blocks, a 3x3 conv, tanh) maps it back. Loss as there:

    L = MSE(x_hat, x) + kld_weight * KL(q(z|x) || N(0, I)),  KL = mean_n -1/2 sum_j (1 + log sigma_j^2 - mu_j^2 - sigma_j^2)

with kld_weight = 0.00025, the value configs/vae.yaml passes (there it stands for batch / dataset size). About 3.94 M
parameters. Images are mapped from [0, 1] to [-1, 1] inside the model (the tanh output range) and back.

Reconstruction decodes the posterior mean (no sampling noise, so the same input gives the same output) unless
`sample_posterior` is set, when z ~ q(z|x) is drawn from the caller's generator.

Other sizes: the VAE has fully connected heads, so it only takes its native `image_size` (64). A larger input is cut
into 64x64 tiles overlapping by `tile_overlap` pixels (the last row / column of tiles flush with the border), each is
reconstructed, and the tiles are blended with weights that ramp linearly over the overlap. This keeps the VAE's
degradation local, at its native scale, as in the paper's 64x64 experiment; resizing 256 -> 64 -> 256 would instead
add a 4x bicubic blur that is not the model's. An input smaller than a tile is reflect-padded (replicate-padded when
too small to reflect) to 64 and cropped back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from factory.models import TrainingRecipe


@dataclass(frozen=True)
class VAEConfig:
    image_size: int = 64  # native input side; must be divisible by 2 ** len(hidden_dims)
    hidden_dims: tuple[int, ...] = (32, 64, 128, 256, 512)  # stride-2 encoder widths; decoder mirrors
    latent_dim: int = 128  # dimension of z
    kld_weight: float = 0.00025  # weight of the KL term (AntixK configs/vae.yaml)
    tile_overlap: int = 16  # pixels two neighbouring 64x64 tiles share when reconstructing larger inputs
    tile_batch: int = 256  # tiles per forward pass in `reconstruct` (bounds memory on large inputs)
    sample_posterior: bool = False  # reconstruct from z ~ q(z|x) (generator-driven) instead of the mean mu

    def __post_init__(self) -> None:
        # Config dicts from checkpoints/JSON carry lists; keep the dataclass hashable and comparable.
        object.__setattr__(self, "hidden_dims", tuple(self.hidden_dims))
        if self.image_size % (2 ** len(self.hidden_dims)):
            raise ValueError(f"image_size {self.image_size} not divisible by 2**{len(self.hidden_dims)}")
        if not 0 <= self.tile_overlap < self.image_size:
            raise ValueError(f"tile_overlap must be in [0, {self.image_size}), got {self.tile_overlap}")


PRESETS = {
    "paper": VAEConfig(),
    "tiny": VAEConfig(hidden_dims=(8, 16, 32), latent_dim=16, tile_overlap=16),
}

# The reference training recipe: AntixK/PyTorch-VAE configs/vae.yaml: Adam at LR 0.005, weight decay 0, batch 64
# (`train_batch_size`), 64x64 images (`patch_size`); its data module flips at random, centre-crops and resizes to 64
# (Tiny-ImageNet's images already are 64x64). Left out: the per-epoch ExponentialLR (gamma 0.95).
RECIPE = TrainingRecipe(
    batch_size=64, lr=5e-3, pipeline="resize", crop="center", interpolation="bilinear", flip=True
)


def _down_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.LeakyReLU(),
    )


def _up_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1, output_padding=1),
        nn.BatchNorm2d(out_channels),
        nn.LeakyReLU(),
    )


def _ramp(length: int, overlap: int, device: torch.device) -> torch.Tensor:
    """1-D blending weight: rises linearly over `overlap` pixels at each end, 1 in between, never 0."""
    position = torch.arange(length, device=device, dtype=torch.float32) + 0.5
    if overlap == 0:
        return torch.ones(length, device=device)
    return torch.clamp(torch.minimum(position, length - position) / overlap, max=1.0)


def _tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Tile offsets covering [0, length): every `stride`, the last one flush with the end."""
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


class VAE(nn.Module):
    @property
    def samples(self) -> bool:
        """Whether reconstruct draws from its generator: only when decoding a posterior sample."""
        return self.config.sample_posterior

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        dims = config.hidden_dims
        self.bottleneck_size = config.image_size // 2 ** len(dims)  # 2 for the paper preset
        flat = dims[-1] * self.bottleneck_size**2
        self.encoder = nn.Sequential(*[_down_block(i, o) for i, o in zip((3, *dims[:-1]), dims, strict=True)])
        self.to_mean = nn.Linear(flat, config.latent_dim)
        self.to_log_variance = nn.Linear(flat, config.latent_dim)
        self.decoder_input = nn.Linear(config.latent_dim, flat)
        reversed_dims = dims[::-1]
        self.decoder = nn.Sequential(
            *[_up_block(i, o) for i, o in zip(reversed_dims[:-1], reversed_dims[1:], strict=True)]
        )
        self.final_layer = nn.Sequential(
            _up_block(dims[0], dims[0]),
            nn.Conv2d(dims[0], 3, kernel_size=3, padding=1),
            nn.Tanh(),
        )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (N, 3, S, S) in [0, 1], S = image_size -> mu, log sigma^2: (N, latent_dim)."""
        features = self.encoder(x * 2 - 1).flatten(1)
        return self.to_mean(features), self.to_log_variance(features)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: (N, latent_dim) -> (N, 3, S, S) in [0, 1]."""
        side = self.bottleneck_size
        features = self.decoder_input(z).view(-1, self.config.hidden_dims[-1], side, side)
        return (self.final_layer(self.decoder(features)) + 1) / 2

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """x: (N, 3, S, S) in [0, 1] at the native size. Reparameterised z = mu + sigma * e, e ~ N(0, I) (torch's
        global RNG, seeded by the training engine)."""
        mean, log_variance = self.encode(x)
        z = mean + torch.exp(0.5 * log_variance) * torch.randn_like(mean)
        x_hat = self.decode(z)
        # MSE in the model's [-1, 1] space, as AntixK computes it (= 4 x MSE in [0, 1]).
        reconstruction = F.mse_loss(x_hat.float() * 2 - 1, x.float() * 2 - 1)
        mean, log_variance = (
            mean.float(),
            log_variance.float(),
        )  # the KL sum in float32 even under bf16 autocast
        kld = torch.mean(-0.5 * torch.sum(1 + log_variance - mean**2 - log_variance.exp(), dim=1))
        total = reconstruction + self.config.kld_weight * kld
        return total, {"reconstruction": reconstruction.item(), "kld": kld.item()}

    def _reconstruct_tiles(self, tiles: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """tiles: (M, 3, S, S) in [0, 1] -> same, decoded from mu (or a posterior sample)."""
        outputs = []
        for chunk in tiles.split(self.config.tile_batch):
            mean, log_variance = self.encode(chunk)
            z = mean
            if self.config.sample_posterior:
                # On the generator's device (as MAE and DDIM draw): a CPU generator then serves a model anywhere.
                device = generator.device if generator is not None else mean.device
                noise = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype).to(
                    mean.device
                )
                z = mean + torch.exp(0.5 * log_variance) * noise
            outputs.append(self.decode(z))
        return torch.cat(outputs)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x: (N, 3, H, W) in [0, 1], any size -> x_hat: (N, 3, H, W) in [0, 1], by overlapping 64x64 tiles."""
        tile = self.config.image_size
        height, width = x.shape[-2:]
        pad_bottom, pad_right = max(0, tile - height), max(0, tile - width)
        if pad_bottom or pad_right:
            mode = "reflect" if pad_bottom < height and pad_right < width else "replicate"
            x = F.pad(x, (0, pad_right, 0, pad_bottom), mode=mode)
        padded_height, padded_width = x.shape[-2:]
        stride = tile - self.config.tile_overlap
        rows = _tile_starts(padded_height, tile, stride)
        columns = _tile_starts(padded_width, tile, stride)
        # (N, 3, H, W) -> (N * tiles, 3, S, S), tile-major within each image.
        tiles = torch.stack([x[:, :, r : r + tile, c : c + tile] for r in rows for c in columns], dim=1)
        count = tiles.shape[1]
        decoded = self._reconstruct_tiles(tiles.flatten(0, 1), generator).view(
            x.shape[0], count, 3, tile, tile
        )
        ramp = _ramp(tile, self.config.tile_overlap, x.device)
        weight = (ramp[:, None] * ramp[None, :]).to(decoded.dtype)  # (S, S)
        total = torch.zeros_like(x)
        weights = torch.zeros_like(x[:, :1])
        index = 0
        for r in rows:
            for c in columns:
                total[:, :, r : r + tile, c : c + tile] += decoded[:, index] * weight
                weights[:, :, r : r + tile, c : c + tile] += weight
                index += 1
        # x's dtype even under a caller's bf16 autocast
        return (total / weights)[:, :, :height, :width].clamp(0, 1).to(x.dtype)
