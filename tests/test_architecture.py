"""The parts and which way they depend: pyproject.toml's [tool.importlinter] contracts, run by `lint-imports`.

    python -m pytest -q tests/test_architecture.py

Both tests analyse a checkout given on PYTHONPATH, never whichever `factory` happens to be installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """Run `lint-imports` on the `factory` package and pyproject.toml under `root`."""
    scripts = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    command = shutil.which("lint-imports", path=scripts)
    assert command, "lint-imports is not installed: pip install -e '.[test]'"
    # COLUMNS: the report is wrapped to the terminal's width, and a contract's name must stay on one line.
    path = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    environment = {**os.environ, "PYTHONPATH": path, "COLUMNS": "200"}
    return subprocess.run(
        [command, "--no-cache"], cwd=root, env=environment, capture_output=True, text=True, timeout=300
    )


def test_contracts_are_kept():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_a_model_that_imports_ray_breaks_a_contract(tmp_path):
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copytree(
        ROOT / "factory", tmp_path / "factory", ignore=shutil.ignore_patterns("__pycache__", "*.so")
    )
    model = tmp_path / "factory" / "models" / "vqvae.py"
    model.write_text(model.read_text() + "\nimport ray  # a model must not know Ray\n")

    result = lint_imports(tmp_path)

    assert result.returncode == 1, result.stdout + result.stderr
    assert "Models never import Ray" in result.stdout
    assert "factory.models.vqvae -> ray" in result.stdout


def test_the_command_line_imports_no_torch_and_takes_its_choices_from_the_registries():
    """`factory --help` pays for no torch, numpy or Pillow: the choices are the registries' torch-free names."""
    code = (
        "import sys, factory.cli; "
        "print(sorted(name for name in ('torch', 'numpy', 'PIL') if name in sys.modules))"
    )
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr

    from factory import classifier, sr
    from factory.cli import main
    from factory.codec_names import CODECS
    from factory.degraders import DEGRADER_NAMES
    from factory.models import MODEL_NAMES

    def choices(command: str, option: str) -> tuple[str, ...]:
        group = main
        for name in command.split():
            group = group.commands[name]
        (parameter,) = [parameter for parameter in group.params if parameter.name == option]
        return tuple(parameter.type.choices)

    assert choices("build", "model") == (*MODEL_NAMES, *DEGRADER_NAMES)
    assert choices("build", "codec") == tuple(CODECS)
    assert choices("classifier train", "arch") == classifier.ARCHITECTURES
    assert choices("eval", "architecture") == choices("finetune", "architecture") == sr.ARCHITECTURES
    assert choices("finetune", "preset") == sr.PRESET_NAMES


def test_every_registered_name_builds():
    """The torch-free names and what they name agree: each classifier and SR architecture and each codec exists."""
    import numpy as np

    from factory import classifier, sr
    from factory.classifier.network import build_network as build_classifier
    from factory.codec_names import CODECS
    from factory.config import FactoryError
    from factory.shards import decode_image, encode_image
    from factory.sr.networks import build_network as build_sr_network

    assert [type(build_classifier(arch)).__name__ for arch in classifier.ARCHITECTURES] == ["ResNet"] * 3
    for architecture in sr.ARCHITECTURES:
        assert build_sr_network(architecture, "tiny").architecture == architecture
    image = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
    for codec, extension in CODECS.items():
        assert np.array_equal(decode_image(f"lr.{extension}", encode_image(image, codec)), image)
    with pytest.raises(FactoryError, match="unknown classifier architecture 'resnet34'"):
        build_classifier("resnet34")


def test_the_build_config_importing_the_pool_breaks_the_build_layers(tmp_path):
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copytree(
        ROOT / "factory", tmp_path / "factory", ignore=shutil.ignore_patterns("__pycache__", "*.so")
    )
    config = tmp_path / "factory" / "build" / "config.py"
    config.write_text(
        config.read_text() + "\nimport factory.build.pool  # the options must not know the pool\n"
    )

    result = lint_imports(tmp_path)

    assert result.returncode == 1, result.stdout + result.stderr
    assert "The build's parts in layers" in result.stdout
    assert "factory.build.config -> factory.build.pool" in result.stdout
