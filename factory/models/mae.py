"""Masked autoencoder (He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022).

The `paper` preset is facebookresearch/mae's `mae_vit_base_patch16_dec512d8b`: a ViT-Base/16 encoder (768-d, 12
blocks, 12 heads) and a 512-d decoder of 8 blocks with 16 heads, MLP ratio 4, LayerNorm eps 1e-6, fixed 2D sin-cos
position embeddings, a class token, a learnt mask token, inputs normalised with the ImageNet mean and standard
deviation (MAE's data pipeline). It has 111,655,680 trainable parameters; the reference counts 111,907,840 because
it also stores its fixed position embeddings as (frozen) parameters, which are buffers here.

Choices for the factory (our paper, Section 3.2, Figures 3-4):
- Whole image. The paper configures MAE "to reconstruct the entire image instead of only the masked regions": the
  training loss is the mean squared error over ALL patches (MAE's default averages over the masked ones only), and
  `reconstruct` returns the decoder's prediction for every patch, visible ones included.
- Masking stays on at reconstruction (`reconstruct_mask_ratio`, default 0.75 like training). Figures 3-4 show
  early-epoch MAE outputs that "deviate significantly" from the input and "sparse degradations": what a decoder
  filling in masked patches produces; with nothing masked the model would be run off its training distribution.
  The mask is drawn from `generator`, so a seed reproduces it; without one, a generator seeded with 0 is used, so
  `reconstruct` is a pure function of its input.
- Pixel loss (`norm_pix_loss=False`). MAE's per-patch normalised targets help representation learning, but then
  the decoder predicts patches without their mean and variance, which for a masked patch are unknown: turning the
  prediction back into pixels would need the input's own patch statistics, hiding exactly the colour errors the
  paper measures (Figure 9). MAE's own visualisation models are trained on plain pixels for the same reason. When
  the option is on, `reconstruct` borrows the input's patch statistics, as MAE's demo does.
- Any input size. The input is reflection-padded to a multiple of the patch size and the fixed sin-cos position
  embeddings are computed for that patch grid (e.g. 16x16 patches for a 256x256 LR image, 4x4 for 64x64), then
  the output is cropped back. Because the embeddings are a fixed function of the integer patch position, this is
  exact rather than an interpolation (MAE interpolates its embeddings when fine-tuning at other sizes), pixels keep
  the native scale the model was trained at, and no resampling filter adds its own blur or ringing to the LR image
  (as resizing to 224 and back would). Tiling with 224 tiles was not chosen: a 64x64 input is smaller than a tile.

    model = build_model("mae", preset="paper")
    loss, logs = model.loss(x)                      # x: (N, 3, 224, 224) in [0, 1]
    x_hat = model.reconstruct(x, generator=torch.Generator().manual_seed(seed))   # any H, W
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from factory.config import ConfigError
from factory.models import TrainingRecipe
from factory.models.vqvae import reflect_pad_to_multiple

# MAE normalises its inputs (and pixel targets) with the ImageNet statistics (torchvision's Normalize).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class MAEConfig:
    patch_size: int = 16  # p: side of the square patches, in pixels
    encoder_dim: int = 768  # width of the encoder (ViT-Base)
    encoder_depth: int = 12  # transformer blocks in the encoder
    encoder_heads: int = 12  # attention heads per encoder block
    decoder_dim: int = 512  # width of the lightweight decoder
    decoder_depth: int = 8  # transformer blocks in the decoder
    decoder_heads: int = 16  # attention heads per decoder block
    mlp_ratio: float = 4.0  # hidden width of each block's MLP, as a multiple of the block's width
    mask_ratio: float = 0.75  # fraction of patches removed during training (MAE's 75%)
    reconstruct_mask_ratio: float = 0.75  # fraction removed by `reconstruct` (see the module docstring)
    norm_pix_loss: bool = False  # per-patch normalised pixel targets (off: the factory needs plain pixels)

    def __post_init__(self) -> None:
        for name in (
            "patch_size",
            "encoder_dim",
            "encoder_depth",
            "encoder_heads",
            "decoder_dim",
            "decoder_heads",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"MAEConfig.{name} must be positive, got {getattr(self, name)}")
        for dim, heads, part in (
            (self.encoder_dim, self.encoder_heads, "encoder"),
            (self.decoder_dim, self.decoder_heads, "decoder"),
        ):
            if dim % heads or dim % 4:
                raise ConfigError(
                    f"MAEConfig.{part}_dim ({dim}) must be divisible by 4 and by {part}_heads ({heads})"
                )
        for name in ("mask_ratio", "reconstruct_mask_ratio"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"MAEConfig.{name} must be in [0, 1), got {getattr(self, name)}")


PRESETS = {
    "paper": MAEConfig(),
    "tiny": MAEConfig(
        patch_size=8,
        encoder_dim=64,
        encoder_depth=2,
        encoder_heads=4,
        decoder_dim=32,
        decoder_depth=1,
        decoder_heads=4,
    ),
}

# The reference training recipe: facebookresearch/mae main_pretrain.py with the README's pre-training settings, on one
# GPU: batch 64 per GPU, AdamW betas (0.9, 0.95), weight decay 0.05 (not on biases and norms, timm's
# add_weight_decay), lr = blr * batch / 256 with blr 1.5e-4 (so 3.75e-5), RandomResizedCrop(224, scale=(0.2, 1.0),
# bicubic) + RandomHorizontalFlip. Left out: the 40-epoch warm-up and cosine decay (a run stopped at epoch 4-64 is
# the point here; every model trains at a constant rate).
RECIPE = TrainingRecipe(
    batch_size=64,
    lr=1.5e-4 * 64 / 256,
    betas=(0.9, 0.95),
    weight_decay=0.05,
    pipeline="random_resized",
    interpolation="bicubic",
    crop_scale=(0.2, 1.0),
    flip=True,
)


def sincos_position_embedding(dim: int, grid_height: int, grid_width: int) -> Tensor:
    """The fixed 2D sin-cos embedding of MAE (`get_2d_sincos_pos_embed`) for a grid_height x grid_width patch grid.

    Returns (grid_height * grid_width, dim), patches in row-major order. The first half of each vector encodes the
    patch's column, the second half its row; each half is [sin(pos * omega), cos(pos * omega)] with
    omega_i = 1 / 10000^(i / (dim / 4)), i = 0 .. dim/4 - 1 (the Transformer's embedding, per axis)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, columns = torch.meshgrid(
        torch.arange(grid_height, dtype=torch.float64),
        torch.arange(grid_width, dtype=torch.float64),
        indexing="ij",
    )

    def encode(positions: Tensor) -> Tensor:
        angles = positions.reshape(-1, 1) * omega[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(columns), encode(rows)], dim=1).float()


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (as timm's ViT, so parameter counts match)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.projection = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        # x: (N, L, dim) -> (N, L, dim)
        query, key, value = rearrange(self.qkv(x), "n l (three h d) -> three n h l d", three=3, h=self.heads)
        attended = F.scaled_dot_product_attention(query, key, value)
        return self.projection(rearrange(attended, "n h l d -> n l (h d)"))


class TransformerBlock(nn.Module):
    """Pre-norm ViT block: x + Attention(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.attention_norm = nn.LayerNorm(dim, eps=1e-6)
        self.attention = Attention(dim, heads)
        self.mlp_norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        # x: (N, L, dim) -> (N, L, dim)
        x = x + self.attention(self.attention_norm(x))
        return x + self.mlp(self.mlp_norm(x))


@dataclass
class MaskedTokens:
    """The output of `MAE.encode`."""

    latent: Tensor  # (N, 1 + kept, encoder_dim): class token and the visible patches, encoded
    mask: Tensor  # (N, L) float: 1 where the patch was removed, 0 where it was visible
    restore: Tensor  # (N, L) int64: the permutation that puts [visible, removed] back in patch order
    grid: tuple[int, int]  # (L_h, L_w): the patch grid, L = L_h * L_w


class MAE(nn.Module):
    """Masked autoencoder reconstructing the whole image; see the module docstring."""

    samples = True  # reconstruct draws its mask from the generator

    def __init__(self, config: MAEConfig) -> None:
        super().__init__()
        self.config = config
        patch = config.patch_size
        self.size_multiple = patch  # training crops must be whole patches (only reconstruct pads)
        self.patch_embedding = nn.Conv2d(3, config.encoder_dim, patch, stride=patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, config.encoder_dim))
        self.encoder_blocks = nn.ModuleList(
            TransformerBlock(config.encoder_dim, config.encoder_heads, config.mlp_ratio)
            for _ in range(config.encoder_depth)
        )
        self.encoder_norm = nn.LayerNorm(config.encoder_dim, eps=1e-6)
        self.decoder_embedding = nn.Linear(config.encoder_dim, config.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.decoder_dim))
        self.decoder_blocks = nn.ModuleList(
            TransformerBlock(config.decoder_dim, config.decoder_heads, config.mlp_ratio)
            for _ in range(config.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(config.decoder_dim, eps=1e-6)
        self.decoder_prediction = nn.Linear(config.decoder_dim, patch * patch * 3)
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self._initialise()

    def _initialise(self) -> None:
        # MAE's initialisation: Xavier-uniform linears (and the patch projection seen as a linear), zero biases,
        # N(0, 0.02) class and mask tokens; LayerNorms keep PyTorch's ones and zeros.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.view(self.config.encoder_dim, -1))
        nn.init.normal_(self.class_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def patchify(self, images: Tensor) -> Tensor:
        """images: (N, 3, H, W), H and W multiples of p -> patches (N, L, p*p*3), row-major patch order."""
        p = self.config.patch_size
        return rearrange(images, "n c (h p) (w q) -> n (h w) (p q c)", p=p, q=p)

    def unpatchify(self, patches: Tensor, grid: tuple[int, int]) -> Tensor:
        """patches: (N, L_h * L_w, p*p*3) -> images (N, 3, L_h * p, L_w * p)."""
        p = self.config.patch_size
        return rearrange(patches, "n (h w) (p q c) -> n c (h p) (w q)", h=grid[0], w=grid[1], p=p, q=p, c=3)

    def _position_embedding(self, dim: int, grid: tuple[int, int], like: Tensor) -> Tensor:
        # (1, L, dim) on like's device and dtype; cheap next to the transformer, so computed per call for any grid.
        return sincos_position_embedding(dim, *grid).to(device=like.device, dtype=like.dtype)[None]

    def encode(
        self, images: Tensor, mask_ratio: float, generator: torch.Generator | None = None
    ) -> MaskedTokens:
        """images: (N, 3, H, W) normalised, H and W multiples of p -> encoded visible patches and the mask.

        Removes a random `mask_ratio` of the patches per image (uniform noise, argsort: MAE's per-sample shuffling),
        drawing the noise from `generator` (the global generator when None)."""
        tokens = self.patch_embedding(images)
        grid = (tokens.shape[-2], tokens.shape[-1])
        tokens = rearrange(tokens, "n d h w -> n (h w) d")
        tokens = tokens + self._position_embedding(self.config.encoder_dim, grid, tokens)
        count, length, dim = tokens.shape
        # At least one visible patch, so the output depends on the input even for a one-patch image.
        kept = max(1, int(length * (1 - mask_ratio)))
        noise_device = generator.device if generator is not None else tokens.device
        noise = torch.rand(count, length, generator=generator, device=noise_device).to(tokens.device)
        order = noise.argsort(dim=1)  # ascending: the `kept` patches with the smallest noise stay visible
        restore = order.argsort(dim=1)
        visible = torch.gather(tokens, 1, order[:, :kept, None].expand(-1, -1, dim))
        mask = torch.ones(count, length, device=tokens.device)
        mask[:, :kept] = 0
        mask = torch.gather(mask, 1, restore)
        # The class token's position embedding is zero in MAE, so it is added as it is.
        x = torch.cat([self.class_token.expand(count, -1, -1), visible], dim=1)
        for block in self.encoder_blocks:
            x = block(x)
        return MaskedTokens(latent=self.encoder_norm(x), mask=mask, restore=restore, grid=grid)

    def decode(self, encoded: MaskedTokens) -> Tensor:
        """Encoded visible patches -> predicted patches (N, L, p*p*3) for EVERY patch, normalised pixels."""
        x = self.decoder_embedding(encoded.latent)
        count, length = encoded.restore.shape
        mask_tokens = self.mask_token.expand(count, length + 1 - x.shape[1], -1)
        patches = torch.cat([x[:, 1:], mask_tokens], dim=1)  # [visible, removed] order
        patches = torch.gather(
            patches, 1, encoded.restore[..., None].expand(-1, -1, x.shape[2])
        )  # patch order
        patches = patches + self._position_embedding(self.config.decoder_dim, encoded.grid, patches)
        x = torch.cat([x[:, :1], patches], dim=1)
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_prediction(self.decoder_norm(x))[:, 1:]  # drop the class token

    def _normalise(self, x: Tensor) -> Tensor:
        # x: (N, 3, H, W) in [0, 1] -> ImageNet-normalised
        return (x - self.pixel_mean) / self.pixel_std

    @staticmethod
    def _patch_statistics(patches: Tensor) -> tuple[Tensor, Tensor]:
        # patches: (N, L, P) -> per-patch mean and standard deviation (N, L, 1), MAE's norm_pix_loss definition
        return patches.mean(dim=-1, keepdim=True), (patches.var(dim=-1, keepdim=True) + 1e-6).sqrt()

    def loss(self, x: Tensor) -> tuple[Tensor, dict[str, float]]:
        """x: (N, 3, H, W) in [0, 1], H and W multiples of p -> (mean squared error over all patches, logs)."""
        images = self._normalise(x)
        encoded = self.encode(images, self.config.mask_ratio)
        prediction = self.decode(encoded).float()
        target = self.patchify(images).float()
        if self.config.norm_pix_loss:
            mean, std = self._patch_statistics(target)
            target = (target - mean) / std
        per_patch = (prediction - target).pow(2).mean(dim=-1)  # (N, L)
        total = per_patch.mean()  # every patch: the paper reconstructs the entire image
        mask = encoded.mask
        logs = {
            "loss": total.item(),
            "masked": ((per_patch * mask).sum() / mask.sum().clamp(min=1)).item(),
            "visible": ((per_patch * (1 - mask)).sum() / (1 - mask).sum().clamp(min=1)).item(),
        }
        return total, logs

    @torch.no_grad()
    def reconstruct(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """x: (N, 3, H, W) in [0, 1], any H, W -> x_hat: (N, 3, H, W) in [0, 1], the decoder's prediction for every
        patch with `reconstruct_mask_ratio` of them masked, the mask drawn from `generator` (seed 0 when None)."""
        if generator is None:
            generator = torch.Generator(device=x.device).manual_seed(0)
        height, width = x.shape[-2:]
        images = self._normalise(reflect_pad_to_multiple(x, self.config.patch_size))
        encoded = self.encode(images, self.config.reconstruct_mask_ratio, generator)
        prediction = self.decode(encoded).to(images.dtype)
        if self.config.norm_pix_loss:
            mean, std = self._patch_statistics(self.patchify(images))
            prediction = prediction * std + mean
        output = self.unpatchify(prediction, encoded.grid) * self.pixel_std + self.pixel_mean
        return output[..., :height, :width].clamp(0.0, 1.0).to(x.dtype)
