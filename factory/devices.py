"""Torch devices from the command line's `--device`: "auto" (CUDA, then Apple's MPS, then the CPU), "cpu", "cuda",
"cuda:N" or "mps". One place checks that the device exists, so every command says so in one line instead of failing
inside torch on its first tensor."""

from __future__ import annotations

from factory.config import ConfigError

DEFAULT_DEVICE = "auto"  # every command's --device default: the best device this machine has
DEVICE_HELP = "auto (CUDA, then Apple's MPS, then the CPU), cpu, cuda, cuda:N or mps"  # the names, for --help


def resolve_device(name: str | None = DEFAULT_DEVICE):
    """The torch.device for `name` (None: DEFAULT_DEVICE); ConfigError for an unknown or absent device."""
    import torch

    name = name or DEFAULT_DEVICE
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r} (auto, cpu, cuda, cuda:N, mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} requested but CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {name!r} requested but this machine has {torch.cuda.device_count()} GPU(s)"
            )
    elif device.type == "mps":
        if getattr(torch.backends, "mps", None) is None or not torch.backends.mps.is_available():
            raise ConfigError(f"device {name!r} requested but MPS is not available on this machine")
    elif device.type != "cpu":
        raise ConfigError(f"unsupported device {name!r} (auto, cpu, cuda, cuda:N, mps)")
    return device
