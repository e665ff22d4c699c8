"""--device: one check for every command (factory.devices), so an absent or unknown device is a one-line error
before any work, never a traceback from inside torch."""

import pytest
import torch
from click.testing import CliRunner

from factory.cli import main
from factory.config import ConfigError
from factory.devices import resolve_device

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")


def test_auto_and_cpu():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None) == resolve_device("auto")
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        resolve_device("tpu")


@pytest.mark.parametrize(
    "cuda, mps, expected",
    [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")],
)
def test_auto_prefers_cuda_then_mps_then_the_cpu(monkeypatch, cuda, mps, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert resolve_device("auto") == torch.device(expected)


def test_every_command_defaults_to_the_one_device_policy():
    """Every --device of the command line, and every config a command fills, defaults to factory.devices'."""
    import click

    from factory.classifier.relabel import LabelConfig
    from factory.classifier.training import ClassifierTrainConfig
    from factory.devices import DEFAULT_DEVICE
    from factory.evaluate import EvalConfig
    from factory.train import TrainConfig

    def commands(group: click.Group, prefix: str = ""):
        for name, command in group.commands.items():
            if isinstance(command, click.Group):
                yield from commands(command, f"{prefix}{name} ")
            else:
                yield f"{prefix}{name}", command

    defaults = {
        name: parameter.default
        for name, command in commands(main)
        for parameter in command.params
        if parameter.name == "device"
    }
    assert set(defaults) >= {"train", "build", "classifier train", "label", "preview", "eval"}
    assert set(defaults.values()) == {DEFAULT_DEVICE}, defaults
    configs = (TrainConfig, ClassifierTrainConfig, LabelConfig, EvalConfig)
    assert {config.__dataclass_fields__["device"].default for config in configs} == {DEFAULT_DEVICE}


@NO_CUDA
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_absent_cuda_is_a_config_error(name):
    with pytest.raises(ConfigError, match=f"device '{name}' requested but CUDA is not available"):
        resolve_device(name)


@NO_CUDA
@pytest.mark.parametrize(
    "command",
    [
        ["build", "--model", "bicubic", "--limit", "1", "--actors", "0"],
        ["label", "--classifier", "missing.safetensors"],
        ["classifier", "train", "--data", ".", "--arch", "resnet18"],
        ["eval", "--model", "missing.pth", "--lr", ".", "--hr", "."],
        ["train", "--model", "vqvae2", "--data", "."],
    ],
    ids=lambda command: command[0] if command[0] != "classifier" else "classifier-train",
)
def test_every_command_refuses_an_absent_device_in_one_line(tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)  # nothing is written: if it were, it would land here
    result = CliRunner().invoke(main, [*command, "--device", "cuda"])
    assert result.exit_code == 2, result.output
    assert "device 'cuda' requested but CUDA is not available" in result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    assert not any(tmp_path.iterdir())
