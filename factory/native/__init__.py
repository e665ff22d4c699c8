"""Fused CPU kernels in C, compiled on first use with the machine's C compiler and loaded with ctypes.

One kernel today: `ciede2000_u8`, per-pixel CIEDE2000 of two 8-bit sRGB images (ciede2000_u8.c). In torch's eager
mode the same chain is ~100 passes over image-sized temporaries; fused, it is one pass with the transcendental
functions vectorised by glibc's libmvec (see bench_color.py for the figures).

Compiled with `cc -O3 -march=native -ffast-math -fopenmp-simd` into a per-user cache folder ($FACTORY_CACHE, else
$XDG_CACHE_HOME/factory, else ~/.cache/factory), named by a hash of the source, the flags, the compiler and this CPU's
feature flags (so a shared home on machines of other CPUs never loads a library built for another instruction set);
written under a temporary name and renamed, so concurrent first uses (Ray actors) are safe. Without a C compiler, or
with FACTORY_NATIVE=0, `ciede2000_u8_kernel()` returns None and the callers keep their torch path: the results agree
to float32 rounding (tests/test_color.py checks both against skimage).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("ciede2000_u8.c")
FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp-simd", "-fPIC", "-shared")


def cache_folder() -> Path:
    if os.environ.get("FACTORY_CACHE"):
        return Path(os.environ["FACTORY_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "factory"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        return ""


def _compile(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    os.close(handle)
    try:
        subprocess.run(
            [compiler, *FLAGS, str(SOURCE), "-o", temporary, "-lm"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


@cache
def ciede2000_u8_kernel():
    """The compiled `ciede2000_u8(first, second, pixels, table, out)` as a ctypes function, or None (no compiler,
    a failed compile, not Linux/macOS, or FACTORY_NATIVE=0)."""
    if os.environ.get("FACTORY_NATIVE", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.info("no C compiler found: CIEDE2000 on CPU stays on its torch path")
        return None
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
        identity = hashlib.sha256(
            "\0".join([SOURCE.read_text(), " ".join(FLAGS), version, _cpu_flags()]).encode()
        ).hexdigest()[:16]
        library_path = cache_folder() / f"ciede2000_u8-{identity}.so"
        if not library_path.exists():
            _compile(compiler, library_path)
        library = ctypes.CDLL(str(library_path))
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", b"") or b""
        log.info(
            "could not build the fused CIEDE2000 kernel (%s %s): using the torch path", error, detail[-300:]
        )
        return None
    function = library.ciede2000_u8
    function.restype = None
    function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    return function
