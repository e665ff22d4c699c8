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
    assert resolve_device("auto").type in ("cuda", "mps", "cpu")
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        resolve_device("tpu")


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
