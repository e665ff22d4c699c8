"""VQ-VAE (van den Oord, Vinyals and Kavukcuoglu, "Neural Discrete Representation Learning", NeurIPS 2017).

The `paper` preset follows the paper's ImageNet model (Sections 4.1-4.2): the encoder is two stride-2 4x4
convolutions followed by two residual blocks (ReLU, 3x3 conv, ReLU, 1x1 conv), "all having 256 hidden units"; the
decoder mirrors it with two residual blocks and two stride-2 4x4 transposed convolutions. A 256x256 input gives a
64x64 grid of latents. The codebook has K = 512 entries, as in the paper; the paper does not state the embedding
size D for ImageNet, so D = 64 is taken from the authors' Sonnet example (`vqvae_example`, 512 x 64). The codebook is
learnt by the paper's loss (Eq. 3), not by moving averages:

    L = -log p(x | z_q(x)) + || sg[z_e(x)] - e ||^2 + beta || z_e(x) - sg[e] ||^2,   beta = 0.25

with the reconstruction term (the negative log-likelihood) as mean squared error on images scaled to [-1, 1] (the
scaling rosinality's VQ-VAE-2 training uses; the paper does not say). Gradients pass the quantiser by the
straight-through estimator. `ema_decay` switches to the moving-average codebook of the paper's Appendix A.1
(VQ-VAE-2 uses that one).

This module also holds the pieces the VQ-VAE-2 shares: `VectorQuantizer`, `ResidualBlock` and
`reflect_pad_to_multiple`.

    model = build_model("vqvae", preset="paper")
    loss, logs = model.loss(x)      # x: (N, 3, 256, 256) in [0, 1]
    x_hat = model.reconstruct(x)    # x: (N, 3, H, W) in [0, 1], any H, W; padded to a multiple of 4 and cropped back
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as torch_distributed
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from factory.config import ConfigError
from factory.models import TrainingRecipe


@dataclass(frozen=True)
class VQVAEConfig:
    hidden_channels: int = (
        256  # channels of the strided convolutions and residual blocks ("256 hidden units")
    )
    residual_blocks: int = 2  # residual 3x3 blocks in the encoder and again in the decoder
    residual_channels: int = 256  # hidden channels inside each residual block (the paper: 256 everywhere)
    embedding_dim: int = 64  # D: size of each codebook vector (Sonnet's example; the paper does not say)
    codebook_size: int = 512  # K: number of codebook vectors (the paper's ImageNet model)
    commitment_weight: float = 0.25  # beta of Eq. 3: weight of the commitment loss
    ema_decay: float | None = None  # None: codebook learnt by Eq. 3; a float (0.99): moving-average codebook
    dead_code_threshold: float | None = None  # restart codes used less (moving-average codebook only; see
    # VectorQuantizer); None, as in the paper

    def __post_init__(self) -> None:
        for name in (
            "hidden_channels",
            "residual_blocks",
            "residual_channels",
            "embedding_dim",
            "codebook_size",
        ):
            if getattr(self, name) < (0 if name == "residual_blocks" else 1):
                raise ConfigError(f"VQVAEConfig.{name} must be positive, got {getattr(self, name)}")
        if self.dead_code_threshold is not None and self.ema_decay is None:
            raise ConfigError("VQVAEConfig.dead_code_threshold needs the moving-average codebook (ema_decay)")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"VQVAEConfig.ema_decay must be in (0, 1) or None, got {self.ema_decay}")


PRESETS = {
    "paper": VQVAEConfig(),
    # The paper's sizes with dead-code restarts: the build's embedded default trains this one (factory/train.py).
    "embedded": VQVAEConfig(ema_decay=0.99, dead_code_threshold=1.0),  # restarts need the moving averages
    "tiny": VQVAEConfig(
        hidden_channels=32, residual_blocks=1, residual_channels=16, embedding_dim=16, codebook_size=64
    ),
}

# The reference training recipe. van den Oord et al. 2017, Section 4.1: "ADAM optimiser with learning rate 2e-4 ...
# batch-size 128". The paper trains this model at 256x256 (Section 3.2); the input pipeline is the one the VQ-VAE-2
# reference uses for the same size (rosinality train_vqvae.py: Resize(256), CenterCrop(256), no flip), so
# Tiny-ImageNet's 64x64 images are upscaled 4x (bilinear).
RECIPE = TrainingRecipe(batch_size=128, lr=2e-4, pipeline="resize", crop="center", interpolation="bilinear")


def to_signed(x: Tensor) -> Tensor:
    """x: (N, 3, H, W) in [0, 1] -> the same in [-1, 1], the range the VQ models are trained on."""
    return x * 2.0 - 1.0


def to_unit(x: Tensor) -> Tensor:
    """x: (N, 3, H, W) in [-1, 1] (roughly) -> in [0, 1], clamped."""
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0)


def reflect_pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """x: (N, C, H, W) -> (N, C, H', W') with H', W' the next multiples of `multiple`, padded on the bottom and right.

    Reflection rather than zeros so that the padding looks like image content and does not leak a dark border
    into the reconstruction near the edge; callers crop back with `[..., :H, :W]`. Replicate padding is the
    fallback for inputs smaller than the padding (reflection cannot pad more than the size minus one)."""
    height, width = x.shape[-2:]
    pad_height, pad_width = -height % multiple, -width % multiple
    if pad_height == 0 and pad_width == 0:
        return x
    mode = "reflect" if pad_height < height and pad_width < width else "replicate"
    return F.pad(x, (0, pad_width, 0, pad_height), mode=mode)


class ResidualBlock(nn.Module):
    """x + Conv1x1(ReLU(Conv3x3(ReLU(x)))): the residual block of VQ-VAE (Section 4.1) and rosinality's VQ-VAE-2."""

    def __init__(self, channels: int, hidden_channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, hidden_channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden_channels, channels, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        # x: (N, C, H, W) -> (N, C, H, W)
        return x + self.body(x)


@dataclass
class Quantized:
    """The output of `VectorQuantizer`."""

    latents: Tensor  # (N, D, h, w): z_q, the nearest codebook vectors, with straight-through gradients to z_e
    codes: Tensor  # (N, h, w) int64: index k of the chosen codebook vector at each position
    loss: (
        Tensor  # scalar: beta * commitment loss (+ the codebook loss when the codebook is learnt by gradient)
    )
    perplexity: Tensor  # scalar: exp(entropy) of code usage in the batch (K means every code used equally)


class VectorQuantizer(nn.Module):
    """Nearest-neighbour quantisation of z_e(x) to a codebook e_1..e_K (VQ-VAE Section 3.1).

    The codebook is learnt either by gradient through the codebook term of Eq. 3 (`ema_decay=None`), or by
    exponential moving averages of the assigned encoder outputs (`ema_decay` a float, VQ-VAE Appendix A.1 and
    VQ-VAE-2 Section 3.1), with Laplace smoothing of the cluster sizes so that unused codes do not divide by zero.
    The moving averages are updated only when `update_codebook=True` is passed (the training loss does so), so
    that reconstruction never changes the model.

    `dead_code_threshold` (moving-average codebooks only; None in the references) restarts every code whose
    moving-average cluster size N_i has fallen below it at a random encoder output of the batch, the "random
    restarts" of Dhariwal et al. 2020 (Jukebox, Section 3.2) and lucidrains' `threshold_ema_dead_code`. Without it
    a codebook that starts far from the encoder's outputs (unit-normal codes of norm ~8 against outputs of norm ~1)
    collapses onto a handful of codes for thousands of steps (measured: 1 top and 2 bottom codes of 512 in use after
    120 steps of VQ-VAE-2 at batch 16), and the model can then pass only about one bit per latent position.
    """

    def __init__(
        self,
        codebook_size: int,
        embedding_dim: int,
        commitment_weight: float,
        ema_decay: float | None = None,
        dead_code_threshold: float | None = None,
    ) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.commitment_weight = commitment_weight
        self.ema_decay = ema_decay
        self.dead_code_threshold = dead_code_threshold
        self.epsilon = 1e-5  # Laplace smoothing of the moving-average cluster sizes
        if ema_decay is None:
            # Small uniform initialisation, as common VQ-VAE ports use (1 / K), learnt by the codebook loss.
            self.codebook = nn.Parameter(
                torch.empty(codebook_size, embedding_dim).uniform_(-1 / codebook_size, 1 / codebook_size)
            )
        else:
            # Moving-average codebook: buffers, not parameters (no gradient reaches them). Unit-normal start as in
            # Sonnet's VectorQuantizerEMA.
            codebook = torch.randn(codebook_size, embedding_dim)
            self.register_buffer("codebook", codebook)
            self.register_buffer("cluster_size", torch.ones(codebook_size))  # N_i of Appendix A.1
            self.register_buffer("codebook_sum", codebook.clone())  # m_i of Appendix A.1

    def forward(self, z: Tensor, update_codebook: bool = False) -> Quantized:
        # z: (N, D, h, w) encoder output z_e(x)
        with torch.autocast(device_type=z.device.type, enabled=False):
            # Distances and averages in float32: bf16 would pick wrong neighbours and round the averages away.
            z = z.float()
            height, width = z.shape[-2:]
            flat = rearrange(z, "n d h w -> (n h w) d")
            codebook = self.codebook.float()
            distances = (
                flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.t() + codebook.pow(2).sum(1)[None, :]
            )
            codes = distances.argmin(dim=1)
            one_hot = F.one_hot(codes, self.codebook_size).to(flat.dtype)
            if update_codebook and self.ema_decay is not None:
                self._update_moving_averages(flat.detach(), one_hot)
            quantized_flat = F.embedding(codes, self.codebook)
            commitment = F.mse_loss(flat, quantized_flat.detach())  # || z_e(x) - sg[e] ||^2
            loss = self.commitment_weight * commitment
            if self.ema_decay is None:
                loss = loss + F.mse_loss(quantized_flat, flat.detach())  # || sg[z_e(x)] - e ||^2
            # Straight-through: the forward value is e, the gradient w.r.t. z_e(x) is copied from z_q(x).
            quantized_flat = flat + (quantized_flat - flat).detach()
            usage = one_hot.mean(0)
            perplexity = torch.exp(-(usage * torch.log(usage + 1e-10)).sum())
        latents = rearrange(quantized_flat, "(n h w) d -> n d h w", h=height, w=width)
        return Quantized(latents, codes.view(-1, height, width), loss, perplexity)

    @torch.no_grad()
    def _update_moving_averages(self, flat: Tensor, one_hot: Tensor) -> None:
        # flat: (M, D) encoder outputs; one_hot: (M, K) their assignments
        counts = one_hot.sum(0)
        sums = one_hot.t() @ flat
        if torch_distributed.is_available() and torch_distributed.is_initialized():
            # Data-parallel training: every replica must apply the same update to keep the codebooks identical.
            torch_distributed.all_reduce(counts)
            torch_distributed.all_reduce(sums)
        self.cluster_size.mul_(self.ema_decay).add_(counts, alpha=1 - self.ema_decay)
        self.codebook_sum.mul_(self.ema_decay).add_(sums, alpha=1 - self.ema_decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.epsilon) / (total + self.codebook_size * self.epsilon) * total
        self.codebook.copy_(self.codebook_sum / smoothed[:, None])
        if self.dead_code_threshold is not None:
            self._restart_dead_codes(flat)

    @torch.no_grad()
    def _restart_dead_codes(self, flat: Tensor) -> None:
        # flat: (M, D) encoder outputs of this batch; dead codes move onto randomly drawn ones (torch's RNG, which
        # training seeds per epoch), their averages restarted as one fresh assignment.
        dead = self.cluster_size < self.dead_code_threshold
        count = int(dead.sum())
        if count == 0:
            return
        replacement = flat[torch.randint(len(flat), (count,), device=flat.device)]
        if torch_distributed.is_available() and torch_distributed.is_initialized():
            torch_distributed.broadcast(
                replacement, src=0
            )  # every replica restarts the same codes the same way
        self.codebook[dead] = replacement
        self.codebook_sum[dead] = replacement
        self.cluster_size[dead] = 1.0


class VQVAE(nn.Module):
    """VQ-VAE with one 4x-downsampled latent grid; see the module docstring."""

    # Two stride-2 convolutions: reconstruct pads inputs to a multiple of this, and training crops must be one.
    size_multiple = 4
    samples = False  # reconstruct is deterministic: it draws nothing from its generator

    def __init__(self, config: VQVAEConfig) -> None:
        super().__init__()
        self.config = config
        hidden = config.hidden_channels
        self.encoder = nn.Sequential(
            nn.Conv2d(3, hidden, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 4, stride=2, padding=1),
            *[ResidualBlock(hidden, config.residual_channels) for _ in range(config.residual_blocks)],
            nn.ReLU(),
            nn.Conv2d(hidden, config.embedding_dim, 1),  # to the codebook's dimension D
        )
        self.quantizer = VectorQuantizer(
            config.codebook_size,
            config.embedding_dim,
            config.commitment_weight,
            config.ema_decay,
            config.dead_code_threshold,
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(config.embedding_dim, hidden, 3, padding=1),
            *[ResidualBlock(hidden, config.residual_channels) for _ in range(config.residual_blocks)],
            nn.ReLU(),
            nn.ConvTranspose2d(hidden, hidden, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(hidden, 3, 4, stride=2, padding=1),
        )

    def encode(self, x: Tensor, update_codebook: bool = False) -> Quantized:
        """x: (N, 3, H, W) in [-1, 1], H and W multiples of 4 -> z_q(x): latents (N, D, H/4, W/4) and codes."""
        return self.quantizer(self.encoder(x), update_codebook=update_codebook)

    def decode(self, latents: Tensor) -> Tensor:
        """latents: (N, D, h, w) -> image (N, 3, 4h, 4w), roughly in [-1, 1]."""
        return self.decoder(latents)

    def loss(self, x: Tensor) -> tuple[Tensor, dict[str, float]]:
        """x: (N, 3, H, W) in [0, 1], H and W multiples of 4 -> (Eq. 3 as a scalar, logs)."""
        target = to_signed(x)
        quantized = self.encode(target, update_codebook=self.training)
        reconstruction = F.mse_loss(self.decode(quantized.latents).float(), target.float())
        total = reconstruction + quantized.loss
        logs = {
            "loss": total.item(),
            "reconstruction": reconstruction.item(),
            "latent": quantized.loss.item(),
            "perplexity": quantized.perplexity.item(),
        }
        return total, logs

    @torch.no_grad()
    def reconstruct(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """x: (N, 3, H, W) in [0, 1], any H, W -> x_hat: (N, 3, H, W) in [0, 1]. Deterministic; `generator` unused
        (nothing is sampled: the quantiser picks the nearest code)."""
        height, width = x.shape[-2:]
        padded = reflect_pad_to_multiple(to_signed(x), self.size_multiple)
        # Cast back: under a caller's bf16 autocast the decoder returns bf16, but x_hat keeps x's dtype.
        return to_unit(self.decode(self.encode(padded).latents)[..., :height, :width]).to(x.dtype)
