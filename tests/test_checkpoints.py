"""Checkpoint layout, atomic saving, safe loading and refusal of mismatched checkpoints (tiny VAE)."""

from __future__ import annotations

import hashlib
import zipfile

import pytest
import torch

from factory.checkpoints import (
    checkpoint_path,
    data_fingerprint,
    file_sha256,
    load_reconstructor,
    read_checkpoint,
    save_checkpoint,
    saved_epochs,
)
from factory.config import FactoryError
from factory.models import build_model, make_config


@pytest.fixture
def saved(tmp_path):
    model = build_model("vae", "tiny")
    path = checkpoint_path(tmp_path / "checkpoints", "vae", 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.loss(torch.rand(2, 3, 64, 64))[0].backward()
    optimizer.step()
    save_checkpoint(
        path,
        model_name="vae",
        preset="tiny",
        config=model.config,
        model=model,
        epoch=3,
        steps=12,
        data_fingerprint="f" * 64,
        seed=7,
        optimizer=optimizer,
        training={"batch_size": 2},
    )
    return model, path


def test_layout_and_saved_epochs(tmp_path):
    assert checkpoint_path(tmp_path, "vqvae2", 8) == tmp_path / "vqvae2" / "epoch-8.pt"
    (tmp_path / "vae").mkdir()
    for name in ("epoch-2.pt", "epoch-10.pt", ".epoch-4.pt.abc.tmp", "notes.txt"):
        (tmp_path / "vae" / name).write_bytes(b"x")
    assert list(saved_epochs(tmp_path, "vae")) == [2, 10]
    assert saved_epochs(tmp_path, "mae") == {}


def test_round_trip_reproduces_reconstruction(saved):
    model, path = saved
    loaded = load_reconstructor(path, model_name="vae", config=make_config("vae", "tiny"))
    assert (loaded.model_name, loaded.preset, loaded.epoch, loaded.steps, loaded.seed) == (
        "vae",
        "tiny",
        3,
        12,
        7,
    )
    assert loaded.data_fingerprint == "f" * 64
    assert not loaded.model.training
    # Reference for the digest: hashlib over the whole file at once.
    assert loaded.sha256 == file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    x = torch.rand(1, 3, 96, 80)
    assert torch.equal(loaded.model.reconstruct(x), model.eval().reconstruct(x))
    raw = read_checkpoint(path)
    assert raw["training"] == {"batch_size": 2} and "optimizer" in raw
    # Only the final file is left: the temporary one was renamed onto it.
    assert [p.name for p in path.parent.iterdir()] == ["epoch-3.pt"]


def test_config_given_as_dict_with_lists_matches(saved):
    _, path = saved
    config = {**make_config("vae", "tiny").__dict__}
    config["hidden_dims"] = list(config["hidden_dims"])
    assert load_reconstructor(path, config=config).epoch == 3


def test_other_model_is_refused_naming_both(saved):
    _, path = saved
    with pytest.raises(FactoryError, match=r"model 'vae', not the requested 'ddim'") as error:
        load_reconstructor(path, model_name="ddim")
    assert "\n" not in str(error.value)


def test_other_config_is_refused_naming_both(saved):
    _, path = saved
    with pytest.raises(FactoryError, match=r"latent_dim=16 vs 128") as error:
        load_reconstructor(path, config=make_config("vae", "paper"))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("damage", ["missing", "garbage", "truncated", "pickle"])
def test_bad_files_are_one_line_errors(saved, tmp_path, damage):
    _, path = saved
    target = tmp_path / "bad.pt"
    if damage == "garbage":
        target.write_bytes(b"not a checkpoint at all")
    elif damage == "truncated":
        target.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "pickle":
        # A zip that torch would unpickle into an arbitrary class: weights_only must refuse it.
        torch.save({"format": "factory-checkpoint/1", "evil": zipfile.ZipInfo("x")}, target)
    with pytest.raises(FactoryError) as error:
        load_reconstructor(target)
    assert "\n" not in str(error.value) and str(target) in str(error.value)


def test_data_fingerprint_depends_on_names_and_sizes(tmp_path):
    (tmp_path / "a.png").write_bytes(b"12")
    (tmp_path / "b.png").write_bytes(b"345")
    files = [tmp_path / "a.png", tmp_path / "b.png"]
    first = data_fingerprint(tmp_path, files)
    assert first == data_fingerprint(tmp_path, files[::-1])  # order-free
    (tmp_path / "b.png").write_bytes(b"3456")
    assert data_fingerprint(tmp_path, files) != first
