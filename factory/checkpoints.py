"""Where reconstructor checkpoints live, how they are written (atomically) and loaded (safely), and fingerprints.

Layout: `<root>/<model>/epoch-<E>.pt`, e.g. `checkpoints/vqvae2/epoch-8.pt`.

A checkpoint is a plain dict that `torch.load(..., weights_only=True)` can read (tensors, numbers, strings, lists,
dicts: no pickled classes, so loading one cannot run code):

    format            CHECKPOINT_FORMAT
    model_name        registry name ("vqvae2")
    preset            the preset the config started from ("paper", "tiny")
    config            the model's Config as a plain dict (rebuilds the exact architecture)
    weights           model.state_dict()
    epoch, steps      completed epochs and optimiser steps
    data_fingerprint  `data_fingerprint(...)` of the training images
    seed              the training seed
    training          the training settings that define the run (batch size, lr, epoch size, image size, the
                      recipe, held-out count) and samples_seen (epoch x epoch size)
    regime            the reconstruction figures at this epoch on held-out LR images (factory.regime), or absent
    optimizer         optimiser state_dict (resume), or absent
    rng               torch RNG states (resume), or absent

    loaded = load_reconstructor("checkpoints/vqvae2/epoch-8.pt", model_name="vqvae2")
    x_hat = loaded.model.reconstruct(x)
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from factory.config import FactoryError, config_to_dict, error_line
from factory.storage import atomic_path

CHECKPOINT_FORMAT = "factory-checkpoint/1"
_EPOCH_FILE = re.compile(r"^epoch-(\d+)\.pt$")


@dataclass(frozen=True)
class LoadedCheckpoint:
    model: nn.Module  # the reconstructor with the checkpoint's weights, in eval mode, on the requested device
    model_name: str  # registry name
    preset: str  # preset the config started from
    config: Any  # the model's Config dataclass
    epoch: int  # completed training epochs
    steps: int  # optimiser steps taken
    sha256: str  # of the checkpoint file's bytes (recorded in every manifest row the build writes)
    data_fingerprint: str  # of the training data (see data_fingerprint)
    seed: int  # training seed
    path: Path  # where it was loaded from
    training: dict  # the training settings and samples seen (see the module docstring)
    regime: dict  # the regime figures measured when it was saved ({} for checkpoints that have none)


def checkpoint_path(root: str | os.PathLike, model_name: str, epoch: int) -> Path:
    """`<root>/<model_name>/epoch-<epoch>.pt`."""
    return Path(root) / model_name / f"epoch-{int(epoch)}.pt"


def saved_epochs(root: str | os.PathLike, model_name: str) -> dict[int, Path]:
    """The epochs with a checkpoint file under `<root>/<model_name>/`, epoch -> path (temporary files ignored)."""
    folder = Path(root) / model_name
    if not folder.is_dir():
        return {}
    found = {}
    for path in folder.iterdir():
        match = _EPOCH_FILE.match(path.name)
        if match and path.is_file():
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_fingerprint(root: str | os.PathLike, files: Iterable[str | os.PathLike]) -> str:
    """A sha256 over the sorted (path relative to `root`, size in bytes) of the training files.

    Names and sizes rather than contents: hashing 100,000 Tiny-ImageNet JPEGs at every start would cost more than a
    short training run, and a changed image almost always changes its compressed size. Relative paths keep the
    fingerprint stable when the folder is moved or copied (modification times would not be).
    """
    root = Path(root)
    entries = []
    for file in files:
        path = Path(file)
        try:
            relative = path.relative_to(root)
        except ValueError:  # a file given outside root keeps its own path
            relative = path
        entries.append((relative.as_posix(), path.stat().st_size))
    digest = hashlib.sha256()
    for name, size in sorted(entries):
        digest.update(f"{name}\0{size}\n".encode())
    return digest.hexdigest()


def _plain_config(config: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return config_to_dict(config)
    if isinstance(config, Mapping):
        return dict(config)
    raise TypeError(f"config must be a dataclass instance or a mapping, got {type(config).__name__}")


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model_name: str,
    preset: str,
    config: Any,
    model: nn.Module,
    epoch: int,
    steps: int,
    data_fingerprint: str,
    seed: int,
    optimizer: torch.optim.Optimizer | None = None,
    training: Mapping[str, Any] | None = None,
    rng: Mapping[str, torch.Tensor] | None = None,
    regime: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically: to a temporary file in the same folder, then `os.replace` onto `path`, so a
    reader (or a resumed run) never sees a half-written file. Returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "model_name": model_name,
        "preset": preset,
        "config": _plain_config(config),
        # Detached CPU copies: the file loads on any device and holds no autograd state.
        "weights": {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()},
        "epoch": int(epoch),
        "steps": int(steps),
        "data_fingerprint": str(data_fingerprint),
        "seed": int(seed),
        "training": dict(training or {}),
    }
    if optimizer is not None:
        payload["optimizer"] = optimizer.state_dict()
    if rng is not None:
        payload["rng"] = dict(rng)
    if regime is not None:
        payload["regime"] = dict(regime)
    return _write_payload(path, payload)


def _write_payload(path: Path, payload: dict[str, Any]) -> Path:
    """torch.save `payload` to a temporary file beside `path`, then rename it onto `path`."""
    with atomic_path(path) as temporary, open(temporary, "wb") as file:
        torch.save(payload, file)
        file.flush()
        os.fsync(file.fileno())  # the rename must not reach the disk before the bytes do
    return path


def read_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict[str, Any]:
    """The raw checkpoint dict, loaded with `weights_only=True` on CPU; a missing, unreadable or foreign file is a
    one-line FactoryError. `mmap=True` maps the tensors instead of reading them (cheap when only the metadata is
    wanted)."""
    path = Path(path)
    if not path.is_file():
        raise FactoryError(f"checkpoint not found: {path}")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != b"PK\x03\x04":  # torch.save writes a zip archive; anything else is not one of ours
        raise FactoryError(
            f"cannot read checkpoint {path}: not a torch.save file (corrupt or another format)"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # torch raises many types for truncated / foreign / unsafe files
        raise FactoryError(
            f"cannot read checkpoint {path} (corrupt, truncated or unsafe): {error_line(error)}"
        ) from None
    required = ("model_name", "preset", "config", "weights", "epoch", "steps", "data_fingerprint", "seed")
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise FactoryError(f"not a factory checkpoint ({CHECKPOINT_FORMAT}): {path}")
    missing = [key for key in required if key not in payload]
    if missing:
        raise FactoryError(f"checkpoint {path} lacks {', '.join(missing)}")
    return payload


def configs_equal(first: Any, second: Any) -> bool:
    """Two configs (dataclass instances or dicts) hold the same values, lists and tuples alike."""
    return _comparable(_plain_config(first)) == _comparable(_plain_config(second))


def _comparable(value: Any) -> Any:
    """Lists and tuples compare equal when their items do (JSON and dataclasses disagree on which they hold)."""
    if isinstance(value, (list, tuple)):
        return tuple(_comparable(item) for item in value)
    if isinstance(value, Mapping):
        return {key: _comparable(item) for key, item in value.items()}
    return value


def _config_difference(stored: Mapping[str, Any], requested: Mapping[str, Any]) -> str:
    keys = sorted(set(stored) | set(requested))
    parts = [
        f"{key}={stored.get(key)!r} vs {requested.get(key)!r}"
        for key in keys
        if _comparable(stored.get(key)) != _comparable(requested.get(key))
    ]
    return "; ".join(parts)


def load_reconstructor(
    path: str | os.PathLike,
    *,
    model_name: str | None = None,
    config: Any | None = None,
    device: str | torch.device = "cpu",
) -> LoadedCheckpoint:
    """Load a checkpoint safely and rebuild its reconstructor in eval mode on `device`.

    `model_name` / `config` (a Config dataclass or dict), when given, are what the caller expects: a checkpoint of
    another model or another config is refused with a one-line FactoryError naming both.
    """
    from factory.models import build_model, get_spec  # models import torch layers; keep this module light

    path = Path(path)
    payload = read_checkpoint(path)
    stored_name = payload["model_name"]
    if model_name is not None and stored_name != model_name:
        raise FactoryError(f"checkpoint {path} is of model {stored_name!r}, not the requested {model_name!r}")
    stored_config = dict(payload["config"])
    if config is not None:
        requested = _plain_config(config)
        if not configs_equal(requested, stored_config):
            raise FactoryError(
                f"checkpoint {path} has another {stored_name} config than requested "
                f"(checkpoint vs requested: {_config_difference(stored_config, requested)})"
            )
    spec = get_spec(stored_name)
    try:
        model = build_model(stored_name, config=stored_config)
        model.load_state_dict(payload["weights"], strict=True)
    except FactoryError:
        raise
    except (RuntimeError, TypeError, ValueError) as error:
        raise FactoryError(
            f"checkpoint {path} does not fit model {stored_name!r}: {error_line(error)}"
        ) from None
    model.to(device).eval()
    return LoadedCheckpoint(
        model=model,
        model_name=stored_name,
        preset=payload["preset"],
        config=spec.config_class(**stored_config),
        epoch=int(payload["epoch"]),
        steps=int(payload["steps"]),
        sha256=file_sha256(path),
        data_fingerprint=payload["data_fingerprint"],
        seed=int(payload["seed"]),
        path=path,
        training=dict(payload.get("training", {})),
        regime=dict(payload.get("regime", {})),
    )


def strip_checkpoint(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Write `source` without its optimiser and RNG state to `target`, atomically: the weights, the run's identity
    and its regime, a third of the size. Such a checkpoint loads as any other but is never resumed from
    (factory.train.resume); it is how the embedded default's checkpoints are shipped (factory.train's
    SHIPPED_CHECKPOINTS)."""
    payload = read_checkpoint(source)
    payload.pop("optimizer", None)
    payload.pop("rng", None)
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return _write_payload(target, payload)


# python -m factory.checkpoints strip SOURCE TARGET (README, "The embedded default")
if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m factory.checkpoints")
    parser.add_argument("action", choices=["strip"])
    parser.add_argument("source")
    parser.add_argument("target")
    arguments = parser.parse_args()
    print(f"wrote {strip_checkpoint(arguments.source, arguments.target)}")
