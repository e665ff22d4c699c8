"""A reconstructor at an epoch as a degrader: x = bicubic(y) stored as 8 bits, then x_deg = G(x) (the paper, 3.1).

    degrader = get_degrader("mae", {"checkpoint": "checkpoints/mae/epoch-8.pt"}, device="cuda")

Every pair is reconstructed on its own, as a batch of one:
- a model that samples (`model.samples`: MAE's masks, DDIM's `encoding="noise"`, a VAE decoding a posterior sample)
  must draw from that pair's generator, and none of the models can take one generator per sample (each draws the
  noise of its whole input with one `torch.rand` / `torch.randn`);
- a deterministic model (VQ-VAE, VQ-VAE-2, DDIM inversion, the VAE's mean) still gives other last bits in a batch
  of 8 than in a batch of 1 (the kernels sum in another order for another shape: measured up to 1.5e-7 on the CPU
  for the tiny VQ-VAE-2), and at 8 bits that flips some pixels by one level.
So a pair's bytes do not depend on --batch-size, which only sets how many crops go through the worker's stages at
once. Cost: none measured on the CPU (paper VQ-VAE-2 at 256, one thread: 4.2-4.4 pairs/s batched, 5.0-5.8 one by
one); on a GPU a batch of one may leave the device partly idle for the small models (not measured here).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from factory.color import downsample, quantize
from factory.config import config_from_dict
from factory.degraders import Degraded


@dataclasses.dataclass(frozen=True)
class ReconstructorConfig:
    checkpoint: str  # the checkpoint file (<checkpoints>/<model>/epoch-<E>.pt)
    scale: int = 4  # LR = HR / scale: the bicubic downsampling before G
    bf16: bool = False  # G's forward pass under bf16 autocast on CUDA (faster; other bytes than float32)


class ReconstructorDegrader:
    """HR -> x = quantize(bicubic(HR)) -> G(x), unrounded; the record names the checkpoint and what G drew."""

    def __init__(self, name: str, config: ReconstructorConfig, loaded: Any, device: torch.device) -> None:
        self.name = name
        self.config = config
        self.model = loaded.model
        self.device = device
        # What every record holds: which G made the pair (the manifest's epoch / preset / checkpoint columns).
        self.identity = {
            "degrader": name,
            "checkpoint_sha256": loaded.sha256,
            "epoch": int(loaded.epoch),
            "preset": loaded.preset,
        }

    @classmethod
    def load(
        cls, name: str, options: Mapping[str, Any], device: str | torch.device = "cpu"
    ) -> ReconstructorDegrader:
        """Load `options["checkpoint"]`, which must be of model `name`, onto `device`."""
        from factory.checkpoints import load_reconstructor

        config = config_from_dict(ReconstructorConfig, dict(options))
        device = torch.device(device)
        loaded = load_reconstructor(config.checkpoint, model_name=name, device=device)
        return cls(name, config, loaded, device)

    @property
    def scale(self) -> int:
        return self.config.scale

    @property
    def autocast(self) -> bool:
        # bf16 on CUDA only: CPU autocast would be slower here, and the CPU build stays float32 and exact.
        return self.config.bf16 and self.device.type == "cuda"

    def degrade(
        self,
        hr: torch.Tensor,
        generators: Sequence[torch.Generator],
        bicubic_lr: torch.Tensor | None = None,
    ) -> Degraded:
        """hr: (N, 3, H, W) in [0, 1] (or uint8); bicubic_lr: its quantised bicubic LR (N, 3, H / s, W / s) uint8,
        computed here when not given -> G(x) (N, 3, H / s, W / s) float in [0, 1], unrounded."""
        if len(generators) != hr.shape[0]:
            raise ValueError(f"{hr.shape[0]} images but {len(generators)} generators")
        if bicubic_lr is None:
            images = hr.to(torch.float32) / 255.0 if hr.dtype == torch.uint8 else hr.to(torch.float32)
            bicubic_lr = quantize(downsample(images, self.scale))
        x = bicubic_lr.to(self.device).float() / 255.0
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            # One pair at a time, each from its own generator (see the module docstring).
            parts = [
                self.model.reconstruct(x[index : index + 1], generator=generator)
                for index, generator in enumerate(generators)
            ]
        degraded = torch.cat(parts)
        records = [self.record(generator) for generator in generators]
        return Degraded(degraded.float().clamp(0, 1), records)

    def record(self, generator: torch.Generator) -> dict[str, Any]:
        """A pair's record: the checkpoint, and the seed of its generator when G drew from it (else None)."""
        seed = generator.initial_seed() if self.model.samples else None
        return {**self.identity, "bf16": self.autocast, "generator_seed": seed}

    def flat_columns(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """A reconstructor draws no blur kernel, noise level or JPEG quality."""
        return {"kernel_sigma": None, "noise_level": None, "jpeg_quality": None}
