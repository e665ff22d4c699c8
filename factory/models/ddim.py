"""DDIM (Song et al., 2021) on a DDPM U-Net (Ho et al., 2020), the diffusion model of the paper's preliminary study.

The `paper` preset is the U-Net of DDPM's 256x256 models (LSUN / CelebA-HQ, `diffusion_tf/models/unet.py`, the same
network as `diffusers`' UNet2DModel in google/ddpm-ema-church-256): base width 128, channel multipliers
(1, 1, 2, 2, 4, 4) over six resolutions 256 -> 8, two residual blocks per resolution, single-head self-attention at
16x16 (level 4) and in the middle, GroupNorm(32), SiLU, sinusoidal timestep embedding through a 512-d MLP, dropout 0.
About 113.7 M parameters (DDPM reports 114 M).

Training (DDPM's L_simple): t ~ U{0..T-1}, e ~ N(0, I), x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) e, loss =
|| e - e_theta(x_t, t) ||^2, with T = 1000 and the linear schedule beta_t from 1e-4 to 0.02. Images are mapped from
[0, 1] to [-1, 1] inside the model.

Reconstruction (`encoding="noise"`, the default): the input is noised to x_t ~ q(x_t | x_0) at t = noise_strength * T
with the caller's generator, then denoised back to t = 0 with the deterministic DDIM updates over the
`sampling_steps` timesteps tau = 0, T/S, 2T/S, ... (S = 100 as in the paper; the reverse process runs the last
noise_strength * S of them). Why: the paper attributes DDIM's failure to "instability in noise removal during the
reverse process" (Section 3.2), so the reverse process must be handed real noise to remove. `encoding="inversion"`
(x_T by running the DDIM update forwards, eta = 0, then decoding) is kept for comparison but is not the paper's
regime: with an undertrained e_theta the inversion and the decoding nearly cancel, so the output is close to the input
(measured: 38 dB, SSIM 0.99 at epoch 4 in the fidelity report), the opposite of the paper's Figure 3. Predicted x_0 is
clipped to [-1, 1] at every step (DDPM's clip_denoised) so an undertrained model cannot diverge numerically.

Sizes: the U-Net downsamples by 2 ** (levels - 1) (32 for the paper preset); other sizes are reflect-padded up to a
multiple of it (replicate-padded when too small to reflect) and cropped back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from factory.models import TrainingRecipe


@dataclass(frozen=True)
class DDIMConfig:
    image_size: int = 256  # native training size (Section 3.2); the U-Net itself takes any padded size
    channels: int = 128  # base width of the U-Net
    channel_multipliers: tuple[int, ...] = (
        1,
        1,
        2,
        2,
        4,
        4,
    )  # width per resolution level, level 0 = full size
    res_blocks: int = 2  # residual blocks per level on the way down (one more on the way up, as in DDPM)
    attention_levels: tuple[int, ...] = (4,)  # levels with self-attention (4 = 16x16 at 256 input)
    dropout: float = 0.0  # inside residual blocks (DDPM: 0.0 for its 256x256 models)
    norm_groups: int = 32  # GroupNorm groups; must divide every width
    train_steps: int = 1000  # T, diffusion steps of the forward process
    beta_start: float = 1e-4  # beta_1 of the linear schedule (DDPM)
    beta_end: float = 0.02  # beta_T of the linear schedule (DDPM)
    sampling_steps: int = 100  # S, DDIM steps for reconstruction (paper: 100); must divide train_steps
    encoding: str = (
        "noise"  # how reconstruct encodes x_0: "noise" (q(x_t|x_0)) or "inversion" (deterministic)
    )
    noise_strength: float = 0.5  # for encoding="noise": start at t = noise_strength * T
    clip_denoised: bool = True  # clip the predicted x_0 to [-1, 1] at each DDIM step

    def __post_init__(self) -> None:
        # Config dicts from checkpoints/JSON carry lists; keep the dataclass hashable and comparable.
        object.__setattr__(self, "channel_multipliers", tuple(self.channel_multipliers))
        object.__setattr__(self, "attention_levels", tuple(self.attention_levels))
        if self.encoding not in ("inversion", "noise"):
            raise ValueError(f"encoding must be 'inversion' or 'noise', got {self.encoding!r}")
        if self.train_steps % self.sampling_steps:
            raise ValueError(
                f"sampling_steps {self.sampling_steps} must divide train_steps {self.train_steps}"
            )
        if not 0 < self.noise_strength <= 1:
            raise ValueError(f"noise_strength must be in (0, 1], got {self.noise_strength}")


PRESETS = {
    "paper": DDIMConfig(),
    # Seconds on a CPU: four levels (downsampling 8), attention at the lowest; 10 DDIM steps instead of 100.
    "tiny": DDIMConfig(
        image_size=64,
        channels=16,
        channel_multipliers=(1, 2, 2, 2),
        res_blocks=1,
        attention_levels=(3,),
        norm_groups=8,
        sampling_steps=10,
    ),
}

# The reference training recipe: DDPM (Ho et al. 2020, Appendix B) for its 256x256 models, which DDIM reuses
# (ermongroup/ddim trains with the same settings): Adam at 2e-5, batch 64, random horizontal flips, images resized
# to 256 (Tiny-ImageNet's 64x64 upscaled 4x), gradients clipped to norm 1. Left out: the 5,000-step warm-up and the
# EMA of the weights (decay 0.9999), whose averaged copy would lag the undertrained model the paper samples from.
RECIPE = TrainingRecipe(
    batch_size=64,
    lr=2e-5,
    pipeline="resize",
    crop="center",
    interpolation="bilinear",
    flip=True,
    grad_clip=1.0,
)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """t: (N,) integer timesteps -> (N, dim) sinusoidal embedding (Transformer / DDPM `get_timestep_embedding`)."""
    half = dim // 2
    frequencies = torch.exp(
        -math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1)
    )
    angles = t.float()[:, None] * frequencies[None, :]
    embedding = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return F.pad(embedding, (0, dim % 2))


class ResidualBlock(nn.Module):
    def __init__(
        self, in_channels: int, out_channels: int, time_dim: int, dropout: float, groups: int
    ) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_projection = nn.Linear(time_dim, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(
            self.conv2.weight
        )  # each block starts as the identity (DDPM's zero-initialised output conv)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        """x: (N, C_in, H, W), time: (N, time_dim) -> (N, C_out, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_projection(F.silu(time))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over all positions, with a residual connection (DDPM's AttnBlock)."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) -> same."""
        n, c, h, w = x.shape
        q, k, v = (
            self.qkv(self.norm(x)).reshape(n, 3, c, h * w).transpose(-1, -2).unbind(1)
        )  # each (N, HW, C)
        attended = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v
        return x + self.out(attended.transpose(-1, -2).reshape(n, c, h, w))


class UNet(nn.Module):
    """e_theta(x_t, t): x_t (N, 3, H, W), t (N,) -> predicted noise (N, 3, H, W); H, W divisible by 2**(levels-1)."""

    def __init__(self, config: DDIMConfig) -> None:
        super().__init__()
        base, groups = config.channels, config.norm_groups
        self.time_dim = 4 * base
        self.time_mlp = nn.Sequential(
            nn.Linear(base, self.time_dim), nn.SiLU(), nn.Linear(self.time_dim, self.time_dim)
        )
        self.input_conv = nn.Conv2d(3, base, 3, padding=1)
        widths = [base * multiplier for multiplier in config.channel_multipliers]
        levels = len(widths)

        def res(in_channels: int, out_channels: int) -> ResidualBlock:
            return ResidualBlock(in_channels, out_channels, self.time_dim, config.dropout, groups)

        # Down path: record the width of every feature map that the up path will concatenate.
        self.down = nn.ModuleList()
        skip_widths = [base]
        width = base
        for level, level_width in enumerate(widths):
            for _ in range(config.res_blocks):
                attention = (
                    AttentionBlock(level_width, groups) if level in config.attention_levels else nn.Identity()
                )
                self.down.append(nn.ModuleList([res(width, level_width), attention]))
                width = level_width
                skip_widths.append(width)
            if level < levels - 1:
                self.down.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
                skip_widths.append(width)
        self.middle = nn.ModuleList([res(width, width), AttentionBlock(width, groups), res(width, width)])
        self.up = nn.ModuleList()
        for level in reversed(range(levels)):
            for _ in range(config.res_blocks + 1):
                attention = (
                    AttentionBlock(widths[level], groups)
                    if level in config.attention_levels
                    else nn.Identity()
                )
                self.up.append(nn.ModuleList([res(width + skip_widths.pop(), widths[level]), attention]))
                width = widths[level]
            if level > 0:
                self.up.append(
                    nn.Sequential(
                        nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(width, width, 3, padding=1)
                    )
                )
        self.output = nn.Sequential(nn.GroupNorm(groups, width), nn.SiLU(), nn.Conv2d(width, 3, 3, padding=1))
        nn.init.zeros_(self.output[-1].weight)
        nn.init.zeros_(self.output[-1].bias)
        self.base = base

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        time = self.time_mlp(timestep_embedding(t, self.base))
        h = self.input_conv(x)
        skips = [h]
        for block in self.down:
            if isinstance(block, nn.ModuleList):
                h = block[1](block[0](h, time))
            else:  # stride-2 downsampling conv
                h = block(h)
            skips.append(h)
        h = self.middle[2](self.middle[1](self.middle[0](h, time)), time)
        for block in self.up:
            if isinstance(block, nn.ModuleList):
                h = block[1](block[0](torch.cat([h, skips.pop()], dim=1), time))
            else:  # nearest upsampling + conv
                h = block(h)
        return self.output(h)


class DDIM(nn.Module):
    @property
    def samples(self) -> bool:
        """Whether reconstruct draws from its generator: only the SDEdit-style `encoding="noise"`."""
        return self.config.encoding == "noise"

    def __init__(self, config: DDIMConfig) -> None:
        super().__init__()
        self.config = config
        self.unet = UNet(config)
        self.size_multiple = 2 ** (len(config.channel_multipliers) - 1)
        betas = torch.linspace(config.beta_start, config.beta_end, config.train_steps, dtype=torch.float64)
        # abar_t = prod_{s <= t} (1 - beta_s); derived from the config, so not stored in checkpoints.
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, dim=0).float(), persistent=False)

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """x: (N, 3, H, W) in [0, 1], H and W divisible by the U-Net's downsampling factor. DDPM's L_simple; t and e
        come from torch's global RNG (seeded by the training engine)."""
        x0 = x * 2 - 1
        t = torch.randint(0, self.config.train_steps, (x.shape[0],), device=x.device)
        noise = torch.randn_like(x0)
        abar = self.alphas_cumprod[t][:, None, None, None]
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        loss = F.mse_loss(self.unet(x_t, t).float(), noise)
        return loss, {"mse": loss.item()}

    def _abar(self, t: int) -> torch.Tensor:
        """abar_t, with abar_{-1} = 1 (the clean image)."""
        return self.alphas_cumprod[t] if t >= 0 else torch.ones((), device=self.alphas_cumprod.device)

    def _ddim_step(self, x: torch.Tensor, t_model: int, t_from: int, t_to: int) -> torch.Tensor:
        """One deterministic DDIM update (eta = 0) from level t_from to t_to, with e_theta evaluated at t_model:
        x_0' = (x - sqrt(1 - abar_from) e) / sqrt(abar_from);  x' = sqrt(abar_to) x_0' + sqrt(1 - abar_to) e."""
        t = torch.full((x.shape[0],), max(t_model, 0), device=x.device, dtype=torch.long)
        epsilon = self.unet(x, t).float()
        abar_from, abar_to = self._abar(t_from), self._abar(t_to)
        x0 = (x - (1 - abar_from).sqrt() * epsilon) / abar_from.sqrt()
        if self.config.clip_denoised:
            x0 = x0.clamp(-1, 1)
        return abar_to.sqrt() * x0 + (1 - abar_to).sqrt() * epsilon

    def timesteps(self) -> list[int]:
        """tau: the S sampling timesteps 0, T/S, ..., T - T/S (DDIM's uniform skip)."""
        stride = self.config.train_steps // self.config.sampling_steps
        return list(range(0, self.config.train_steps, stride))

    def invert(self, x0: torch.Tensor) -> torch.Tensor:
        """x0: (N, 3, H, W) in [-1, 1] -> x_T by DDIM inversion: the DDIM update run from abar = 1 up to tau_{S-1},
        with e_theta taken at the level the step starts from (tau_{i-1}; t = 0 for the first step)."""
        tau = self.timesteps()
        x = x0
        for i, t_to in enumerate(tau):
            t_from = tau[i - 1] if i > 0 else -1
            x = self._ddim_step(x, t_model=t_from, t_from=t_from, t_to=t_to)
        return x

    def sample(self, x: torch.Tensor, start: int | None = None) -> torch.Tensor:
        """x: (N, 3, H, W) at level tau[start] (default: the last, ~T) -> x_0 in [-1, 1] by DDIM (eta = 0)."""
        tau = self.timesteps()
        start = len(tau) - 1 if start is None else start
        for i in range(start, -1, -1):
            x = self._ddim_step(x, t_model=tau[i], t_from=tau[i], t_to=tau[i - 1] if i > 0 else -1)
        return x.clamp(-1, 1)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x: (N, 3, H, W) in [0, 1], any size -> x_hat: (N, 3, H, W) in [0, 1]. `generator` draws the noise of
        encoding="noise"; inversion is deterministic."""
        height, width = x.shape[-2:]
        multiple = self.size_multiple
        pad_bottom, pad_right = (-height) % multiple, (-width) % multiple
        if pad_bottom or pad_right:
            mode = "reflect" if pad_bottom < height and pad_right < width else "replicate"
            x = F.pad(x, (0, pad_right, 0, pad_bottom), mode=mode)
        x0 = x.float() * 2 - 1  # float32 DDIM updates even for bf16 input
        if self.config.encoding == "inversion":
            x_hat = self.sample(self.invert(x0))
        else:
            tau = self.timesteps()
            start = min(len(tau) - 1, round(self.config.noise_strength * len(tau)) - 1)
            start = max(start, 0)
            device = generator.device if generator is not None else x0.device
            noise = torch.randn(x0.shape, generator=generator, device=device).to(x0.device)
            abar = self._abar(tau[start])
            x_hat = self.sample(abar.sqrt() * x0 + (1 - abar).sqrt() * noise, start=start)
        # The DDIM arithmetic stays float32 (only e_theta runs under a caller's autocast); return x's dtype.
        return ((x_hat + 1) / 2)[:, :, :height, :width].clamp(0, 1).to(x.dtype)
