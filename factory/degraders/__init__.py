"""Degraders: every way the factory turns an HR crop into its LR image, behind one interface.

    from factory.degraders import get_degrader, pair_generator
    degrader = get_degrader("realesrgan", {"jpeg_range": [50, 95]})   # options: the reference's YAML keys
    generators = [pair_generator(seed, key) for key in keys]          # one generator per pair
    lr, parameters = degrader.degrade(hr, generators)                  # hr: (N, 3, H, W) in [0, 1]

A degrader draws everything for pair i from `generators[i]` alone, in a fixed order, so a pair's LR bytes and its
parameter record do not depend on which other pairs share its batch. `DEGRADER_NAMES` is torch-free (the CLI's
choices); the modules behind the names are imported on first use.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from factory.config import ConfigError

if TYPE_CHECKING:
    import torch


class Degraded(NamedTuple):
    """What `Degrader.degrade` returns; unpacks as `lr, parameters`."""

    lr: torch.Tensor  # (N, 3, H / scale, W / scale) float in [0, 1], on the device of the HR
    parameters: list[dict[str, Any]]  # one JSON-able record per pair: everything that pair drew


class Degrader(Protocol):
    """An HR -> LR map with its own randomness, drawn per pair."""

    name: str
    scale: int

    def degrade(self, hr: torch.Tensor, generators: Sequence[torch.Generator]) -> Degraded:
        """hr: (N, 3, H, W) float in [0, 1] on any device, H and W multiples of `scale`; one generator per pair."""
        ...


def _bicubic(options: Mapping[str, Any]) -> Degrader:
    from factory.degraders.bicubic import BicubicDegrader

    return BicubicDegrader.from_options(options)


def _realesrgan(options: Mapping[str, Any]) -> Degrader:
    from factory.degraders.realesrgan import RealESRGANDegrader

    return RealESRGANDegrader.from_options(options)


def _bsrgan(options: Mapping[str, Any]) -> Degrader:
    from factory.degraders.bsrgan import BSRGANDegrader

    return BSRGANDegrader.from_options(options)


_REGISTRY: dict[str, Callable[[Mapping[str, Any]], Degrader]] = {
    "bicubic": _bicubic,
    "realesrgan": _realesrgan,
    "bsrgan": _bsrgan,
}

DEGRADER_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def get_degrader(name: str, options: Mapping[str, Any] | None = None) -> Degrader:
    """The degrader registered under `name`, built from `options` (its config's keys; unknown keys are an error)."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown degrader {name!r}; known degraders: {', '.join(DEGRADER_NAMES)}")
    return _REGISTRY[name](dict(options or {}))


def pair_seed(seed: int, key: str) -> int:
    """A 63-bit seed from (build seed, pair key): the first 8 bytes of sha256("<seed>/<key>")."""
    digest = hashlib.sha256(f"{int(seed)}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def pair_generator(seed: int, key: str, device: str | torch.device = "cpu") -> torch.Generator:
    """The generator pair `key` of a build seeded `seed` draws everything from (see `pair_seed`)."""
    import torch

    generator = torch.Generator(device=device)
    generator.manual_seed(pair_seed(seed, key))
    return generator
