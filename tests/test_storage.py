"""Atomic writes: readers see the old file or the whole new one, failures leave nothing behind, and outputs get the
permissions of any new file (0666 less the umask) rather than mkstemp's owner-only 0600."""

import os
import stat

import pyarrow as pa
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from factory.checkpoints import save_checkpoint
from factory.manifests import write_table_atomic
from factory.storage import Storage, atomic_path


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_path_publishes_only_on_success(tmp_path):
    target = tmp_path / "out" / "table.parquet"
    with atomic_path(target) as temporary:
        assert not target.exists()
        with open(temporary, "w") as file:
            file.write("new")
    assert target.read_text() == "new"

    with pytest.raises(RuntimeError), atomic_path(target) as temporary:
        with open(temporary, "w") as file:
            file.write("half")
        raise RuntimeError("writer died")
    assert target.read_text() == "new"  # the old file survives
    assert sorted(os.listdir(target.parent)) == ["table.parquet"]  # and no temporary is left


def test_an_interrupted_write_leaves_a_temporary_storage_sweeps(tmp_path):
    # A SIGKILL skips the cleanup: what it leaves must be a name remove_temporaries recognises.
    with atomic_path(tmp_path / "a.bin") as temporary:
        name = os.path.basename(temporary)
    assert name.startswith(".a.bin.") and name.endswith(".tmp")
    (tmp_path / name).write_bytes(b"partial")
    assert Storage(tmp_path).remove_temporaries("") == 1
    assert sorted(os.listdir(tmp_path)) == ["a.bin"]


def test_manifests_checkpoints_and_safetensors_are_readable_by_others(tmp_path, umask_022):
    table_path = tmp_path / "manifests" / "d" / "d-000000.parquet"
    write_table_atomic(pa.table({"key": ["a"]}), table_path)
    checkpoint = save_checkpoint(
        tmp_path / "model.pt",
        model_name="linear",
        preset="tiny",
        config={},
        model=nn.Linear(2, 2),
        epoch=1,
        steps=1,
        data_fingerprint="x",
        seed=0,
    )
    weights = tmp_path / "weights.safetensors"
    with atomic_path(weights) as temporary:
        save_file({"w": torch.zeros(2)}, temporary)  # safetensors recreates the file owner-only
    assert mode(table_path) == mode(checkpoint) == mode(weights) == 0o644
