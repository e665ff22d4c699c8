"""Faults the build tests inject from outside the package: worker subclasses handed to `factory.build.build`
(`worker_class`), and a command line that runs the CLI with one, for builds in a subprocess:

    python tests/faults.py --shard-delay 1.0 build --model bicubic ...     # every shard waits a second first

Each subclass is made inside a function, so that Ray ships it to the actors by value (its module is not importable
there)."""

from __future__ import annotations

import functools
import os
import sys
import time
from pathlib import Path

from factory.build.worker import ShardWorker


def crash_once_worker(marker: Path) -> type[ShardWorker]:
    """A worker that dies like a killed process (os._exit), mid-shard, the first time any worker has written a
    batch of samples: the first to find `marker` absent creates it and dies."""

    class CrashOnceWorker(ShardWorker):
        def _write(self, output, pairs) -> None:
            super()._write(output, pairs)
            if not marker.exists():
                marker.write_text(str(os.getpid()))
                os._exit(1)

    return CrashOnceWorker


def slow_worker(seconds: float) -> type[ShardWorker]:
    """A worker whose every shard waits `seconds` before it starts (so that a short build outlasts the start-up of
    every actor)."""

    class SlowWorker(ShardWorker):
        def build_shard(self, task):
            time.sleep(seconds)
            return super().build_shard(task)

    return SlowWorker


def main(arguments: list[str]) -> None:
    """`--shard-delay SECONDS <factory command line>`: the CLI, its builds run with `slow_worker(SECONDS)`."""
    import factory.build
    from factory.cli import main as factory_main

    if arguments[:1] != ["--shard-delay"]:
        raise SystemExit("usage: faults.py --shard-delay SECONDS <factory arguments>")
    factory.build.build = functools.partial(
        factory.build.build, worker_class=slow_worker(float(arguments[1]))
    )
    factory_main(arguments[2:])


if __name__ == "__main__":
    main(sys.argv[1:])
