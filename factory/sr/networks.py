"""Building the SR networks (presets), loading official weights and saving fine-tuned ones."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from factory.config import FactoryError, error_line
from factory.sr import ARCHITECTURES, PRESET_NAMES, check_architecture
from factory.sr.edsr import EDSR, is_edsr_state_dict, load_edsr
from factory.sr.edsr import PRESETS as EDSR_PRESETS
from factory.storage import Storage

# spandrel's architecture id -> ours
_SPANDREL_IDS = {"ESRGAN": "esrgan", "SwinIR": "swinir", "HAT": "hat"}

# Wrappers around the state dict: BasicSR's params_ema / params (EMA preferred), other trainers' state_dict, model,
# net_g, generator, and `network` in our own fine-tune checkpoints (checkpoints/iter_*.pt).
_WRAPPER_KEYS = ("params_ema", "params", "state_dict", "model", "net_g", "generator", "network")


@dataclass
class SRNetwork:
    """A network with what the trainer and evaluator need to know about it."""

    architecture: str  # one of ARCHITECTURES
    module: nn.Module  # x: (N, 3, h, w) in [0, 1] -> (N, 3, scale*h, scale*w)
    scale: int  # upscaling factor


# Official hyper-parameters ("paper": 001_classicalSR_DF2K_s64w8_SwinIR-M_x4, HAT_SRx4 / its ImageNet-pretrain
# variant) and a few-thousand-weight test size ("tiny"), as keyword arguments of spandrel's classes.
_TRANSFORMER_SHARED = dict(
    mlp_ratio=2.0, upscale=4, img_range=1.0, upsampler="pixelshuffle", resi_connection="1conv"
)
_HAT_SHARED = dict(compress_ratio=3, conv_scale=0.01, overlap_ratio=0.5)
_TRANSFORMER_PRESETS: dict[tuple[str, str], dict] = {
    ("swinir", "paper"): dict(img_size=64, window_size=8, embed_dim=180, depths=[6] * 6, num_heads=[6] * 6),
    ("swinir", "tiny"): dict(img_size=16, window_size=4, embed_dim=12, depths=[1], num_heads=[2]),
    ("hat", "paper"): dict(
        img_size=64,
        window_size=16,
        embed_dim=180,
        depths=[6] * 6,
        num_heads=[6] * 6,
        squeeze_factor=30,
        **_HAT_SHARED,
    ),
    ("hat", "tiny"): dict(
        img_size=16, window_size=4, embed_dim=12, depths=[1], num_heads=[2], squeeze_factor=4, **_HAT_SHARED
    ),
}


def _spandrel_presets(architecture: str, preset: str) -> nn.Module:
    """spandrel's own classes with the official hyper-parameters ("paper") or a tiny test size."""
    if architecture == "esrgan":
        from spandrel.architectures.ESRGAN import ESRGAN

        # ESRGAN x4 (RRDB_ESRGAN_x4.pth): 64 features, 23 RRDBs, growth 32.
        return (
            ESRGAN(num_filters=64, num_blocks=23, scale=4)
            if preset == "paper"
            else ESRGAN(num_filters=16, num_blocks=1, scale=4)
        )
    if architecture == "swinir":
        from spandrel.architectures.SwinIR import SwinIR

        return SwinIR(**_TRANSFORMER_PRESETS[("swinir", preset)], **_TRANSFORMER_SHARED)
    if architecture == "hat":
        from spandrel.architectures.HAT import HAT

        return HAT(**_TRANSFORMER_PRESETS[("hat", preset)], **_TRANSFORMER_SHARED)
    raise FactoryError(f"unknown architecture {architecture!r}; known: {', '.join(ARCHITECTURES)}")


def build_network(architecture: str, preset: str = "paper") -> SRNetwork:
    """A randomly initialised x4 network: `paper` = the official pre-trained models' shape, `tiny` = for tests."""
    check_architecture(architecture)
    if preset not in PRESET_NAMES:
        raise FactoryError(f"unknown preset {preset!r}; known: {', '.join(PRESET_NAMES)}")
    if architecture == "edsr":
        return SRNetwork("edsr", EDSR(EDSR_PRESETS[preset]), EDSR_PRESETS[preset].scale)
    # Round-trip through spandrel so a fresh network is exactly what loading its saved weights gives.
    return network_from_state_dict(_spandrel_presets(architecture, preset).state_dict(), architecture)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Weights from a .pth/.pt (torch.load with weights_only=True) or .safetensors file, unwrapped from the
    usual containers (`params_ema` preferred over `params`, as BasicSR's test scripts do)."""
    path = Path(path)
    if not path.is_file():
        raise FactoryError(f"no weights file at {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is the user's problem, said in one line
        raise FactoryError(
            f"cannot read weights from {path} (is it a .pth/.pt or .safetensors weights file?): "
            f"{type(error).__name__}: {error_line(error)}"
        ) from None
    for key in _WRAPPER_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise FactoryError(f"{path} does not hold a state dict of tensors")
    # DataParallel / DDP checkpoints prefix every key with "module."
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module.") :]: value for key, value in state.items()}
    return state


def network_from_state_dict(
    state_dict: dict[str, torch.Tensor], architecture: str | None = None
) -> SRNetwork:
    """The network these weights belong to (detected from the keys); `architecture` (if given) must match."""
    if is_edsr_state_dict(state_dict):
        found = SRNetwork("edsr", load_edsr(state_dict), 0)
        found.scale = found.module.config.scale
    else:
        import spandrel

        try:
            descriptor = spandrel.ModelLoader().load_from_state_dict(dict(state_dict))
        except Exception as error:  # noqa: BLE001 - spandrel raises several types for unknown layouts
            raise FactoryError(
                f"weights of an unsupported architecture ({type(error).__name__}: {str(error)[:160]})"
            ) from None
        name = _SPANDREL_IDS.get(descriptor.architecture.id)
        if name is None:
            raise FactoryError(
                f"weights are {descriptor.architecture.name}; supported: {', '.join(ARCHITECTURES)}"
            )
        found = SRNetwork(name, descriptor.model, descriptor.scale)
    if architecture is not None and found.architecture != architecture:
        raise FactoryError(f"--arch {architecture} but the weights are {found.architecture}")
    found.module.train()
    return found


def load_network(path: str | os.PathLike, architecture: str | None = None) -> SRNetwork:
    """Official (or our fine-tuned) weights from disk -> the network."""
    return network_from_state_dict(read_state_dict(path), architecture)


def save_atomic(payload: object, path: str | os.PathLike) -> Path:
    """torch.save `payload` so that readers see the old file or the whole new one (temporary name, then rename)."""
    path = Path(path)
    with Storage(path.parent).open_atomic(path.name) as stream:
        torch.save(payload, stream)
    return path


def save_weights(network: SRNetwork | nn.Module, path: str | os.PathLike) -> Path:
    """The bare state dict in the network's official key layout (what `load_network` and the official repos read),
    written atomically."""
    module = network.module if isinstance(network, SRNetwork) else network
    module = getattr(module, "module", module)  # unwrap DDP
    state = {key: value.detach().cpu().contiguous() for key, value in module.state_dict().items()}
    return save_atomic(state, path)
