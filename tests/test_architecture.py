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
