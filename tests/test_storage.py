"""Atomic writes: readers see the old file or the whole new one, failures leave nothing behind, and outputs get the
permissions of any new file (0666 less the umask) rather than mkstemp's owner-only 0600."""

import errno
import os
import shutil
import stat
import subprocess

import pyarrow as pa
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from factory.checkpoints import save_checkpoint
from factory.manifests import write_table_atomic
from factory.storage import OutputLock, Storage, StorageError, atomic_path


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


# --- what cannot be written is said in one line (#16 item 2) ----------------------------------------------------------


def test_a_folder_under_a_regular_file_is_a_one_line_storage_error(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    storage = Storage(tmp_path / "file" / "out")
    with pytest.raises(StorageError, match=r"cannot write .*file/out/ds: Not a directory$"):
        storage.make_dirs("ds")
    with pytest.raises(StorageError, match="Not a directory"):
        storage.write_bytes_atomic("ds/a.bin", b"x")
    with (
        pytest.raises(StorageError, match="Not a directory"),
        OutputLock(storage, "ds/_build.lock", "build", "ds"),
    ):
        pass
    with pytest.raises(StorageError, match="Not a directory"), atomic_path(tmp_path / "file" / "a.parquet"):
        pass


@pytest.fixture
def immutable_folder(tmp_path):
    """A folder not even root may write into (`chattr +i`: root ignores chmod); skipped where chattr cannot."""
    folder = tmp_path / "locked"
    folder.mkdir()
    if (
        not shutil.which("chattr")
        or subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode
    ):
        pytest.skip("chattr +i is not available here")
    yield folder
    subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_an_immutable_folder_is_a_one_line_storage_error(immutable_folder):
    storage = Storage(immutable_folder)
    with pytest.raises(StorageError, match="Operation not permitted"):
        storage.make_dirs("dataset")
    with pytest.raises(StorageError, match="Operation not permitted"):
        storage.write_bytes_atomic("a.bin", b"x")
    with (
        pytest.raises(StorageError, match="Operation not permitted"),
        OutputLock(storage, "_build.lock", "b", "t"),
    ):
        pass
    assert os.listdir(immutable_folder) == []


class FullDisk:
    """A write stream on a disk that fills after `room` bytes (errno ENOSPC, as a real one raises)."""

    def __init__(self, stream, room: int):
        self.stream, self.room = stream, room

    def write(self, data: bytes) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.stream.write(data)


def test_a_full_disk_mid_write_is_one_line_and_leaves_the_old_file(tmp_path):
    storage = Storage(tmp_path)
    storage.write_bytes_atomic("d/a.bin", b"committed")
    with pytest.raises(StorageError, match=r"cannot write .*d/a.bin: No space left on device$"):
        with storage.open_atomic("d/a.bin") as stream:
            FullDisk(stream, room=4).write(b"too much for the disk")
    with (
        pytest.raises(StorageError, match="No space left on device"),
        atomic_path(tmp_path / "d" / "b") as temporary,
    ):
        with open(temporary, "wb") as file:
            FullDisk(file, room=0).write(b"x")
    assert os.listdir(tmp_path / "d") == ["a.bin"] and storage.read_bytes("d/a.bin") == b"committed"
    # Not every OSError is the storage's: one that retrying or the user can mend keeps its type.
    with pytest.raises(ConnectionResetError), storage.open_atomic("d/c.bin"):
        raise ConnectionResetError(errno.ECONNRESET, "reset")
    assert os.listdir(tmp_path / "d") == ["a.bin"]


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 64 KiB disk (tmpfs); skipped where this process may not mount one."""
    folder = tmp_path / "tmpfs"
    folder.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_a_real_full_disk_is_one_line_and_leaves_no_temporary(small_tmpfs):
    storage = Storage(small_tmpfs)
    storage.write_bytes_atomic("d/small.bin", b"fits")
    with pytest.raises(StorageError, match="No space left on device"):
        storage.write_bytes_atomic("d/large.bin", bytes(1 << 20))
    assert os.listdir(small_tmpfs / "d") == ["small.bin"]
