"""Degraders: every way the factory turns an HR crop into its LR image, behind one interface.

    from factory.degraders import get_degrader, pair_generator
    degrader = get_degrader("realesrgan", {"jpeg_range": [50, 95]})   # options: the reference's YAML keys
    degrader = get_degrader("mae", {"checkpoint": "checkpoints/mae/epoch-8.pt"}, device="cuda")  # a reconstructor
    generators = [pair_generator(seed, key) for key in keys]          # one generator per pair
    lr, parameters = degrader.degrade(hr, generators)                  # hr: (N, 3, H, W) in [0, 1]
    degrader.flat_columns(parameters[0])                               # kernel_sigma, noise_level, jpeg_quality

The names: `bicubic`, `realesrgan`, `bsrgan` (`DEGRADER_NAMES`), and every reconstructor of `factory.models`
(`MODEL_NAMES`), which degrades as x = bicubic(y) stored as 8 bits, then G(x) (`reconstructor.py`). A degrader
draws everything for pair i from `generators[i]` alone, in a fixed order, so a pair's LR bytes and its parameter
record do not depend on which other pairs share its batch. Both name tuples are torch-free (the CLI's choices); the
modules behind the names are imported on first use.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, Protocol

from factory.config import ConfigError, config_from_dict, error_line
from factory.models import MODEL_NAMES

if TYPE_CHECKING:
    import torch

# The record's values users filter on, flat manifest columns beside the whole record (see each degrader's
# `flat_columns`); None where a pair drew no such value.
FLAT_COLUMNS: tuple[str, ...] = ("kernel_sigma", "noise_level", "jpeg_quality")


class Degraded(NamedTuple):
    """What `Degrader.degrade` returns; unpacks as `lr, parameters`."""

    lr: torch.Tensor  # (N, 3, H / scale, W / scale) float in [0, 1], on the device of the HR
    parameters: list[dict[str, Any]]  # one JSON-able record per pair: everything that pair drew


class ConfiguredDegrader:
    """What the degraders configured by one dataclass (`config_class`, with a `scale` field) share: they are built
    from an options mapping (the registry's, or --degradation-config's), and their scale is their config's."""

    config_class: ClassVar[type]
    config: Any

    @classmethod
    def from_options(cls, options: Mapping[str, Any]):
        return cls(config_from_dict(cls.config_class, dict(options)))

    @property
    def scale(self) -> int:
        return self.config.scale


class Degrader(Protocol):
    """An HR -> LR map with its own randomness, drawn per pair."""

    name: str
    scale: int

    def degrade(
        self,
        hr: torch.Tensor,
        generators: Sequence[torch.Generator],
        bicubic_lr: torch.Tensor | None = None,
    ) -> Degraded:
        """hr: (N, 3, H, W) float in [0, 1] (or uint8) on any device, H and W multiples of `scale`; one generator
        per pair. bicubic_lr: (N, 3, H / scale, W / scale) uint8, the quantised bicubic LR of `hr` when the caller
        has it already (the build does, for ΔE): `bicubic` and the reconstructors start from it instead of
        computing it again; the classical pipelines degrade the HR and ignore it."""
        ...

    def flat_columns(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """The FLAT_COLUMNS values of one pair's record (None where it drew none)."""
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


def get_degrader(
    name: str, options: Mapping[str, Any] | None = None, device: str | torch.device = "cpu"
) -> Degrader:
    """The degrader registered under `name`, built from `options` (its config's keys; unknown keys are an error).
    A reconstructor's options name its checkpoint (`reconstructor.ReconstructorConfig`); it is loaded onto `device`.
    The other degraders run on the device of the images they are given."""
    if name in MODEL_NAMES:
        from factory.degraders.reconstructor import ReconstructorDegrader

        return ReconstructorDegrader.load(name, dict(options or {}), device)
    if name not in _REGISTRY:
        known = ", ".join((*DEGRADER_NAMES, *MODEL_NAMES))
        raise ConfigError(f"unknown degrader {name!r}; known degraders: {known}")
    return _REGISTRY[name](dict(options or {}))


def load_options(name: str, path: str | os.PathLike) -> dict[str, Any]:
    """The options of degrader `name` from a YAML file (`--degradation-config`): for `realesrgan` a flat mapping
    or a whole Real-ESRGAN training option file (`realesrgan.load_options`), for the others a flat mapping of their
    config's keys. Reconstructors take none: a checkpoint fixes them."""
    if name in MODEL_NAMES:
        raise ConfigError(
            f"{name} is a reconstructor: its checkpoint fixes it, it takes no degradation options"
        )
    import yaml

    from factory.degraders.realesrgan import load_options as realesrgan_options

    try:
        if name == "realesrgan":
            return realesrgan_options(path)
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"cannot read the degradation options {path}: {error_line(error)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of options")
    return data


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
