"""Output folders on any pyarrow filesystem: a local path or a URI such as `s3://bucket/prefix`.

    storage = Storage("shards/")               # or Storage("s3://bucket/shards")
    with storage.open_atomic("bicubic/bicubic-000000.tar") as stream:
        stream.write(data)                     # readers see the old object or the whole new one, never a part

Commit protocol: write to a temporary name in the same folder, then move it onto the final name (`os.replace` on a
local disk, which is atomic; copy + delete on S3, where a PUT is atomic by itself and the temporary object only
shields readers from a failed upload). Everything the build writes goes through here.

`OutputLock`: one writer per output at a time (the build's dataset, the fine-tuner's --out).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pyarrow.fs as pafs

from factory.config import FactoryError

logger = logging.getLogger(__name__)

# Write errors that no retry can mend: a full disk or quota, a file too large, no permission, a read-only
# filesystem, a path through a regular file.
_HOPELESS_WRITE_ERRORS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EFBIG,
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOTDIR,
}
# Of those, what writing to an open file meets (a read error in a writer's block, EACCES, stays as it is).
_FULL_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


class StorageError(FactoryError):
    """A location that cannot be written (full disk, no permission, read-only, a path through a file): said in one
    line, and never retried, since retrying cannot help."""


@contextlib.contextmanager
def hopeless_writes_said(what: str, only_full: bool = False) -> Iterator[None]:
    """Turn a hopeless write error raised in the block into a one-line StorageError about `what` ("cannot write
    <what>: No space left on device"); with `only_full`, only the errors of writing to an open file."""
    try:
        yield
    except OSError as error:
        if getattr(error, "errno", None) not in (_FULL_ERRORS if only_full else _HOPELESS_WRITE_ERRORS):
            raise
        raise StorageError(f"cannot write {what}: {os.strerror(error.errno)}") from None


def make_local_dirs(folder: Path, what: str) -> None:
    """`mkdir -p folder` on the local disk; what cannot be made is a StorageError about `what`."""
    with hopeless_writes_said(what):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except FileExistsError:  # a regular file where a folder of the path should be
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)) from None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """A temporary local file name beside `path`, for writers that want a name rather than a stream (pyarrow,
    safetensors, matplotlib, a compiler); it becomes `path` when the block ends without an exception and is deleted
    otherwise. The result has the permissions of any new file (0666 less the umask): manifests, checkpoints and
    figures are meant to be shared, and both `tempfile.mkstemp` and safetensors (which recreates the file) would
    leave it owner-only."""
    path = Path(path)
    # `.name.XXXXXXXX.tmp`: the pattern remove_temporaries sweeps after a crash.
    temporary = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    make_local_dirs(path.parent, str(path))
    with hopeless_writes_said(str(path)):
        os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    shared_mode = os.stat(temporary).st_mode & 0o777  # what the umask made of 0666
    try:
        with hopeless_writes_said(str(path), only_full=True):
            yield str(temporary)
            os.chmod(temporary, shared_mode)
            os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _is_uri(location: str) -> bool:
    return "://" in location


class Storage:
    """A folder (`location`: local path or filesystem URI) and relative paths below it, using '/' separators."""

    def __init__(self, location: str | os.PathLike):
        location = os.fspath(location)
        self.location = location
        try:
            if _is_uri(location):
                self.filesystem, self.base = pafs.FileSystem.from_uri(location)
            else:
                self.filesystem, self.base = pafs.LocalFileSystem(), os.path.abspath(location)
        except Exception as error:  # pyarrow raises ArrowInvalid / OSError for unknown schemes and bad URIs
            raise FactoryError(f"cannot open storage {location!r}: {error}") from None
        self.base = self.base.rstrip("/") or "/"
        self.is_local = isinstance(self.filesystem, pafs.LocalFileSystem)

    def __repr__(self) -> str:
        return f"Storage({self.location!r})"

    def path(self, relative: str = "") -> str:
        """The filesystem path of `relative` (what pyarrow calls it)."""
        return f"{self.base}/{relative}" if relative else self.base

    def uri(self, relative: str = "") -> str:
        """A location a reader can open: a local path, or `scheme://...` for remote filesystems."""
        if self.is_local:
            return self.path(relative)
        return f"{self.filesystem.type_name}://{self.path(relative)}"

    def make_dirs(self, relative: str = "") -> None:
        with hopeless_writes_said(self.uri(relative)):
            self.filesystem.create_dir(self.path(relative), recursive=True)

    def info(self, relative: str) -> pafs.FileInfo:
        return self.filesystem.get_file_info(self.path(relative))

    def exists(self, relative: str) -> bool:
        return self.info(relative).type == pafs.FileType.File

    def size(self, relative: str) -> int | None:
        """Size in bytes of a file, or None when there is none."""
        info = self.info(relative)
        return info.size if info.type == pafs.FileType.File else None

    def _list(self, relative: str, kind: pafs.FileType) -> list[str]:
        if self.info(relative).type != pafs.FileType.Directory:
            return []
        selector = pafs.FileSelector(self.path(relative), recursive=False)
        return sorted(
            entry.base_name for entry in self.filesystem.get_file_info(selector) if entry.type == kind
        )

    def list_files(self, relative: str = "") -> list[str]:
        """Names (not paths) of the files directly in folder `relative`, sorted; [] when the folder is missing."""
        return self._list(relative, pafs.FileType.File)

    def list_dirs(self, relative: str = "") -> list[str]:
        """Names of the sub-folders of `relative`, sorted; [] when the folder is missing."""
        return self._list(relative, pafs.FileType.Directory)

    def read_bytes(self, relative: str) -> bytes:
        with self.filesystem.open_input_stream(self.path(relative)) as stream:
            return stream.read()

    def open_stream(self, relative: str) -> BinaryIO:
        """A readable file object for one front-to-back pass (read ahead on object stores; caller closes it)."""
        return self.filesystem.open_input_stream(self.path(relative))

    def open_input(self, relative: str) -> BinaryIO:
        """A readable, seekable file object (caller closes it)."""
        return self.filesystem.open_input_file(self.path(relative))

    def delete(self, relative: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.filesystem.delete_file(self.path(relative))

    @contextlib.contextmanager
    def open_atomic(self, relative: str) -> Iterator[BinaryIO]:
        """A writable stream whose bytes appear at `relative` only when the block ends without an exception."""
        folder, _, name = relative.rpartition("/")
        self.make_dirs(folder)
        temporary = f"{folder + '/' if folder else ''}.{name}.{secrets.token_hex(4)}.tmp"
        with hopeless_writes_said(self.uri(relative)):
            stream = self.filesystem.open_output_stream(self.path(temporary))
        try:
            # A hopeless error while the caller writes (a full disk) is said about `relative`, in one line.
            with hopeless_writes_said(self.uri(relative), only_full=True):
                yield stream
                stream.close()
                if self.is_local:
                    os.replace(self.path(temporary), self.path(relative))
                else:
                    self.filesystem.move(self.path(temporary), self.path(relative))
        except BaseException:
            with contextlib.suppress(Exception):
                stream.close()
            self.delete(temporary)
            raise

    def write_bytes_atomic(self, relative: str, data: bytes) -> None:
        with self.open_atomic(relative) as stream:
            stream.write(data)

    def remove_temporaries(self, relative: str) -> int:
        """Delete leftover temporary files (`.name.XXXX.tmp`) of interrupted writes in folder `relative`."""
        leftovers = [
            name for name in self.list_files(relative) if name.startswith(".") and name.endswith(".tmp")
        ]
        for name in leftovers:
            self.delete(f"{relative}/{name}" if relative else name)
        return len(leftovers)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host. A zombie does not: its process ended, but a parent that is gone left
    it to PID 1, which in a container may never reap it, and os.kill(pid, 0) still finds it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, under another user
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc (not Linux): os.kill's answer stands


class OutputLock:
    """A lock file (pid, host, start time) that refuses a second writer of one output while the first runs: the
    build's `<manifests>/<dataset>/_build.lock`, the fine-tuner's `<out>/_finetune.lock`. A lock left by a dead
    process on this host is taken over; on object stores (no atomic create) it is advisory.

    storage, relative: where the lock file goes. kind, target: what the refusal names, e.g. "build" and
    "dataset bicubic" ("another build is writing dataset bicubic (pid 1234 on host)"); the record keeps `kind`, so
    that another kind of writer taking the same lock (`factory label` takes the build's) is told "a build is ...".
    """

    def __init__(self, storage: Storage, relative: str, kind: str, target: str):
        self.storage = storage
        self.relative = relative
        self.kind, self.target = kind, target
        self.record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "kind": kind}

    def __enter__(self) -> OutputLock:
        self.storage.make_dirs(self.relative.rpartition("/")[0])
        for _ in range(3):
            if self._create():
                return self
            holder = self._holder()
            if holder is None:
                continue  # released (or unreadable) between our attempts
            same_host = holder.get("host") == self.record["host"]
            if same_host and isinstance(holder.get("pid"), int) and not pid_alive(holder["pid"]):
                logger.warning(
                    "taking over the lock of a %s that is no longer running (pid %s)",
                    self.kind,
                    holder["pid"],
                )
                self.storage.delete(self.relative)
                continue
            # The holder's kind, when it wrote one (a label refused by a running build names the build).
            holder_kind = holder.get("kind", self.kind)
            who = f"another {self.kind}" if holder_kind == self.kind else f"a {holder_kind}"
            raise FactoryError(
                f"{who} is writing {self.target} (pid {holder.get('pid')} on "
                f"{holder.get('host')}); wait for it, or delete {self.storage.uri(self.relative)} if it is gone"
            )
        raise FactoryError(f"could not take the lock {self.storage.uri(self.relative)}")

    def _create(self) -> bool:
        """Write the lock file unless one exists: O_EXCL on a local disk (atomic), a check then a PUT elsewhere."""
        payload = json.dumps(self.record).encode()
        if not self.storage.is_local:
            if self.storage.exists(self.relative):
                return False
            self.storage.write_bytes_atomic(self.relative, payload)
            return True
        path = self.storage.path(self.relative)
        try:
            with hopeless_writes_said(path):
                handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            with hopeless_writes_said(path), os.fdopen(handle, "wb") as file:
                file.write(payload)
        except BaseException:
            os.unlink(path)  # a lock file without its record would refuse every later writer
            raise
        return True

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.storage.read_bytes(self.relative))
        except (OSError, ValueError):
            return None

    def __exit__(self, *exc_info) -> None:
        holder = self._holder()
        if holder and holder.get("pid") == self.record["pid"] and holder.get("host") == self.record["host"]:
            self.storage.delete(self.relative)
