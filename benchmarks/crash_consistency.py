"""Crash consistency: kill -9 a command at random moments, rerun it, and count the pairs lost, duplicated, mismatched.

    python -m benchmarks.crash_consistency --n 20                       # build, label, filter, export
    python -m benchmarks.crash_consistency --n 20 --commands build-ray  # the build on an embedded Ray

For each command a small dataset is made from scikit-image's bundled photos (bicubic, crop 128 every 128 px, 4 pairs a
shard: 48 pairs in 12 shards). First the command runs uninterrupted on a fresh copy of its inputs: that run's outputs
are the reference, and its duration and write window (from the first change under its outputs to its exit, polled
every 10 ms) are measured. Then, N times: a fresh copy of the inputs, the real CLI command in its own process group,
SIGKILL to the whole group at a random moment, then the same command again to completion, then the checks. When the
kill comes (`--spread`):

- `first-write` (default): after the trial's own first write, plus a delay drawn uniformly over the reference run's
  write window (its length). Start-up (imports: seconds, varying with the load) is left out, so short commands
  (filter, export: under a second of writing) are still hit mid-write;
- `writes`: a delay from the start drawn uniformly over the reference run's write window (first write to exit);
- `whole`: a delay from the start drawn uniformly over the reference run's whole duration.

The checks:

- `factory verify` on the dataset (build, label, filter), or for an export the folder compared file by file;
- a scan of the outputs with pyarrow and Python's tarfile, independent of the factory's readers: every manifest row
  against its tar member (size and sha256 of both payloads), every row and payload against the reference run's.

Counted per command: kills that landed mid-write (the outputs after the kill were neither as before the run nor as
after the reference run), pairs lost (in the reference, not in the output), duplicated (a key in more than one row or
tar sample), mismatched (row or payload bytes differ from the reference, or a row does not match its tar member),
leftovers (temporaries and lock files after the rerun), failed verifies and failed reruns. The target is zero of each.
The delays come from `--seed`, so a run can be repeated.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

DATASET = "bicubic"  # the build's default name for --model bicubic
FILTERED = "crash-filtered"
BUILD_OPTIONS = [
    "--model",
    "bicubic",
    "--crop",
    "128",
    "--stride",
    "128",
    "--shard-size",
    "4",
    "--no-progress",
]
COMMANDS = ("build", "label", "filter", "export", "build-ray")
DEFAULT_COMMANDS = ("build", "label", "filter", "export")
POLL_S = 0.01
RUN_TIMEOUT_S = 600


@dataclass(frozen=True)
class Scenario:
    name: str
    arguments: list[str]  # after `factory`, with {work} standing for the trial folder
    from_base: bool  # starts from a copy of the built base dataset (else from the HR photos alone)
    outputs: tuple[
        str, ...
    ]  # glob patterns of what the command writes in the trial folder (folders or files)
    dataset: str | None  # the dataset to verify and scan; None: an export folder


def scenarios() -> dict[str, Scenario]:
    build = ["build", "--hr", "{work}/hr", "--out", "{work}/shards", "--manifests", "{work}/manifests"]
    shards_and_manifests = ["--shards", "{work}/shards", "--manifests", "{work}/manifests"]
    return {
        "build": Scenario(
            "build", [*build, *BUILD_OPTIONS, "--actors", "0"], False, ("shards", "manifests"), DATASET
        ),
        "build-ray": Scenario(
            "build-ray",
            [*build, *BUILD_OPTIONS, "--actors", "1", "--num-cpus", "1"],
            False,
            ("shards", "manifests"),
            DATASET,
        ),
        "label": Scenario(
            "label",
            ["label", "--classifier", "{work}/classifier.safetensors", *shards_and_manifests],
            True,
            ("manifests",),
            DATASET,
        ),
        "filter": Scenario(
            "filter",
            ["filter", "--where", "delta_e >= 0", *shards_and_manifests, "--out", "{work}/shards"]
            + ["--name", FILTERED, "--pairs-per-shard", "3"],
            True,
            ("shards", "manifests"),
            FILTERED,
        ),
        "export": Scenario(
            "export",
            ["export", *shards_and_manifests, "--out", "{work}/export"],
            True,
            (
                "export",
                ".export.*.tmp",
            ),  # the export writes a temporary folder beside its --out, then renames it
            None,
        ),
    }


# --- inputs ---------------------------------------------------------------------------------------------------------


def write_photos(folder: Path) -> None:
    """The HR folder: three bundled photos of scikit-image (512x512, 400x600, 300x451: 48 crops of 128 on the
    build's grid), one as JPEG in a sub-folder."""
    import skimage.data

    (folder / "nested").mkdir(parents=True)
    Image.fromarray(skimage.data.astronaut()).save(folder / "astronaut.png")
    Image.fromarray(skimage.data.coffee()).save(folder / "nested" / "coffee.jpg", quality=95)
    Image.fromarray(skimage.data.chelsea()).save(folder / "chelsea.png")


def write_classifier(path: Path) -> None:
    """An untrained resnet18 at 16x16, seeded: its labels are arbitrary but the same on every run, which is all a
    crash test needs."""
    import torch

    from factory.classifier.checkpoint import save_classifier
    from factory.classifier.network import build_network
    from factory.classifier.training import ClassifierTrainConfig

    torch.manual_seed(0)
    save_classifier(
        build_network("resnet18"), ClassifierTrainConfig(data="", arch="resnet18", size=16), 0.0, path
    )


def make_base(base: Path) -> None:
    """HR photos, a classifier and, built from them, the dataset that label, filter and export start from."""
    write_photos(base / "hr")
    write_classifier(base / "classifier.safetensors")
    arguments = [a.replace("{work}", str(base)) for a in scenarios()["build"].arguments]
    finished = subprocess.run(
        factory_command(arguments), capture_output=True, text=True, timeout=RUN_TIMEOUT_S
    )
    if finished.returncode != 0:
        raise RuntimeError(f"the base build failed: {finished.stderr[-2000:]}")


def fresh_trial(base: Path, work: Path, scenario: Scenario) -> None:
    """`work` as the command finds it: the base dataset (or the HR photos and classifier alone, for a build)."""
    shutil.rmtree(work, ignore_errors=True)
    if scenario.from_base:
        shutil.copytree(base, work)
    else:
        work.mkdir(parents=True)
        shutil.copytree(base / "hr", work / "hr")


def factory_command(arguments: list[str]) -> list[str]:
    return [sys.executable, "-m", "factory.cli", *arguments]


# --- running and killing --------------------------------------------------------------------------------------------


def output_files(work: Path, outputs: tuple[str, ...]) -> list[Path]:
    """Every file under the folders (or files) that the patterns `outputs` name in `work`, sorted."""
    files = []
    for pattern in outputs:
        for top in work.glob(pattern):
            files += [top] if top.is_file() else [path for path in top.rglob("*") if path.is_file()]
    return sorted(files)


def tree_state(work: Path, outputs: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every output file: enough to see that something was written."""
    state = {}
    try:
        for path in output_files(work, outputs):
            stat = path.stat()
            state[str(path.relative_to(work))] = (stat.st_size, stat.st_mtime_ns)
    except FileNotFoundError:  # a file or folder replaced while we looked: something is being written
        state["(changing)"] = (0, 0)
    return state


def file_digests(work: Path, outputs: tuple[str, ...]) -> dict[str, str]:
    """sha256 of every output file, by path relative to `work` (taken when nothing runs)."""
    return {
        str(path.relative_to(work)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in output_files(work, outputs)
    }


@dataclass(frozen=True)
class Timing:
    duration_s: float  # start to exit
    first_write_s: float  # start to the first change under the outputs


def run_measured(command: list[str], work: Path, outputs: tuple[str, ...]) -> Timing:
    """Run the command to completion, noting when its outputs first change."""
    before = tree_state(work, outputs)
    start = time.monotonic()
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors, start_new_session=True)
        first_write = None
        while process.poll() is None:
            if first_write is None and tree_state(work, outputs) != before:
                first_write = time.monotonic() - start
            time.sleep(POLL_S)
        duration = time.monotonic() - start
        if process.returncode != 0:
            errors.seek(0)
            raise RuntimeError(f"{' '.join(command)} failed: {errors.read().decode()[-2000:]}")
    return Timing(duration_s=duration, first_write_s=duration if first_write is None else first_write)


def run_and_kill(command: list[str], delay_s: float, work: Path, outputs: tuple[str, ...] | None) -> bool:
    """Start the command in its own process group and SIGKILL the group `delay_s` after its start or, given
    `outputs`, after its first write there; whether it was still running then (False: it had finished by itself)."""
    before = tree_state(work, outputs) if outputs is not None else None
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    while before is not None and process.poll() is None and tree_state(work, outputs) == before:
        time.sleep(POLL_S / 5)  # the start-up (seconds under load) is left out: the delay counts from here
    deadline = time.monotonic() + delay_s
    while time.monotonic() < deadline and process.poll() is None:
        time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))
    running = process.poll() is None
    try:
        os.killpg(process.pid, signal.SIGKILL)  # the driver and whatever it started (Ray's processes, actors)
    except ProcessLookupError:
        pass
    process.wait()
    return running


# --- scanning the outputs -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairScan:
    """The pairs an output holds, read with pyarrow and tarfile."""

    rows: dict[str, list[dict]]  # key -> its manifest rows (more than one: duplicated)
    payloads: dict[str, list[tuple[str, str]]]  # key -> (hr sha256, lr sha256) of each copy stored
    inconsistent: set[str]  # keys whose row does not match its stored payloads


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tar_samples(path: Path) -> dict[str, dict[str, bytes]]:
    """Members of one tar by sample key (the name up to the first '.'), as Python's tarfile reads them."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as archive:
        for member in archive:
            if member.isfile():
                key, _, extension = member.name.partition(".")
                samples.setdefault(key, {})[extension] = archive.extractfile(member).read()
    return samples


def scan_dataset(work: Path, dataset: str) -> PairScan:
    rows: dict[str, list[dict]] = {}
    for path in sorted((work / "manifests" / dataset).glob("*.parquet")):
        if not path.name.startswith(("_", ".")):
            for row in pq.read_table(path).to_pylist():
                rows.setdefault(row["key"], []).append(row)
    payloads: dict[str, list[tuple[str, str]]] = {}
    stored: dict[tuple[str, str], dict[str, bytes]] = {}  # (shard path, key) -> members
    for path in sorted((work / "shards" / dataset).glob("*.tar")):
        if path.name.startswith("."):
            continue
        for key, members in _tar_samples(path).items():
            hr = next((data for name, data in members.items() if name.startswith("hr.")), b"")
            lr = next((data for name, data in members.items() if name.startswith("lr.")), b"")
            payloads.setdefault(key, []).append((_sha(hr), _sha(lr)))
            stored[(f"{dataset}/{path.name}", key)] = {"hr": hr, "lr": lr}
    inconsistent = set()
    for key, copies in rows.items():
        for row in copies:
            members = stored.get((row["shard"], key))
            if members is None or any(
                len(members[side]) != row[f"{side}_bytes"] or _sha(members[side]) != row[f"{side}_sha256"]
                for side in ("hr", "lr")
            ):
                inconsistent.add(key)
    return PairScan(rows=rows, payloads=payloads, inconsistent=inconsistent)


def scan_export(work: Path) -> PairScan:
    folder = work / "export"
    rows: dict[str, list[dict]] = {}
    if (folder / "manifest.parquet").is_file():
        for row in pq.read_table(folder / "manifest.parquet").to_pylist():
            rows.setdefault(row["key"], []).append(row)
    payloads: dict[str, list[tuple[str, str]]] = {}
    for path in sorted((folder / "hr").glob("*.png")) if (folder / "hr").is_dir() else []:
        lr = folder / "lr" / path.name
        payloads.setdefault(path.stem, []).append(
            (_sha(path.read_bytes()), _sha(lr.read_bytes()) if lr.is_file() else "")
        )
    meta = folder / "meta_info.txt"
    for line, count in Counter(meta.read_text().splitlines() if meta.is_file() else []).items():
        if count > 1:  # a pair listed twice for the trainer is a duplicate too
            payloads.setdefault(line.partition(".png")[0], []).append(("", ""))
    inconsistent = {
        key
        for key, copies in rows.items()
        for row in copies
        if payloads.get(key, [("", "")])[0] != (row["hr_sha256"], row["lr_sha256"])
    }
    return PairScan(rows=rows, payloads=payloads, inconsistent=inconsistent)


@dataclass(frozen=True)
class PairCounts:
    lost: int
    duplicated: int
    mismatched: int


def compare(scan: PairScan, reference: PairScan) -> PairCounts:
    """Pairs of the reference missing from `scan`, stored more than once, or differing from the reference (row or
    payload bytes) or from their own tar member."""
    lost = sum(1 for key in reference.rows if key not in scan.rows or key not in scan.payloads)
    duplicated = sum(len(copies) - 1 for copies in scan.rows.values()) + sum(
        len(copies) - 1 for copies in scan.payloads.values()
    )
    mismatched = 0
    for key, copies in scan.rows.items():
        expected = reference.rows.get(key)
        differs = expected is None or any(row != expected[0] for row in copies)
        differs |= scan.payloads.get(key, [None])[0] != reference.payloads.get(key, [None])[0]
        mismatched += differs or key in scan.inconsistent
    mismatched += sum(1 for key in scan.payloads if key not in scan.rows)  # stored, but in no manifest row
    return PairCounts(lost=lost, duplicated=duplicated, mismatched=mismatched)


def leftovers(work: Path) -> list[str]:
    """Temporaries of interrupted writes and lock files left after the rerun."""
    found = []
    for path in work.rglob("*"):
        name = path.name
        if (name.startswith(".") and name.endswith(".tmp")) or name in ("_build.lock", "_pending.lock"):
            found.append(str(path.relative_to(work)))
    return sorted(found)


def verified(work: Path, scenario: Scenario, reference_files: dict[str, str]) -> bool:
    """`factory verify` on the dataset; for an export, its folder equal file by file to the reference run's."""
    if scenario.dataset is None:
        return file_digests(work, scenario.outputs) == reference_files
    command = factory_command(
        [
            "verify",
            str(work / "shards"),
            "--manifests",
            str(work / "manifests"),
            "--dataset",
            scenario.dataset,
        ]
    )
    return subprocess.run(command, capture_output=True, timeout=RUN_TIMEOUT_S).returncode == 0


# --- the loop -------------------------------------------------------------------------------------------------------


@dataclass
class ScenarioResult:
    command: str
    kills: int = 0
    mid_write: int = 0  # kills after which the outputs were neither as before nor as after a whole run
    finished_first: int = 0  # kills that came after the command had exited by itself
    lost: int = 0
    duplicated: int = 0
    mismatched: int = 0
    leftovers: int = 0
    verify_failures: int = 0
    rerun_failures: int = 0
    duration_s: float = 0.0  # of one uninterrupted run
    write_window_s: tuple[float, float] = (0.0, 0.0)  # where the kills were drawn from
    wall_s: float = 0.0  # the whole scenario: reference, kills, reruns, checks
    problems: list[str] = field(default_factory=list)  # one line per trial that missed the target


def rerun(command: list[str]) -> tuple[bool, str]:
    """The same command to completion. A refusal because the output already exists (the killed run had finished
    writing: a filter or an export refuses to overwrite) counts as done; the checks then judge the output."""
    finished = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    done = finished.returncode == 0 or "already exists" in finished.stderr
    return done, finished.stderr.strip().splitlines()[-1] if finished.stderr.strip() else ""


def run_scenario(
    scenario: Scenario, base: Path, work: Path, kills: int, spread: str, seed: int
) -> ScenarioResult:
    started = time.monotonic()
    command = factory_command([a.replace("{work}", str(work)) for a in scenario.arguments])
    fresh_trial(base, work, scenario)
    initial = file_digests(work, scenario.outputs)
    timing = run_measured(command, work, scenario.outputs)
    reference_files = file_digests(work, scenario.outputs)
    scan = scan_dataset if scenario.dataset else (lambda folder, _: scan_export(folder))
    reference = scan(work, scenario.dataset)
    windows = {
        "first-write": (
            0.0,
            timing.duration_s - timing.first_write_s,
        ),  # counted from the trial's first write
        "writes": (timing.first_write_s, timing.duration_s),
        "whole": (0.0, timing.duration_s),
    }
    window = windows[spread]
    result = ScenarioResult(scenario.name, duration_s=timing.duration_s, write_window_s=window)
    draw = random.Random(f"{seed}-{scenario.name}")
    for trial in range(kills):
        delay = draw.uniform(*window)
        fresh_trial(base, work, scenario)
        running = run_and_kill(command, delay, work, scenario.outputs if spread == "first-write" else None)
        after_kill = file_digests(work, scenario.outputs)
        result.kills += 1
        result.finished_first += not running
        result.mid_write += after_kill not in (initial, reference_files)
        done, last_line = rerun(command)
        counts = compare(scan(work, scenario.dataset), reference)
        left = leftovers(work)
        ok = verified(work, scenario, reference_files)
        result.lost += counts.lost
        result.duplicated += counts.duplicated
        result.mismatched += counts.mismatched
        result.leftovers += len(left)
        result.verify_failures += not ok
        result.rerun_failures += not done
        if not done or not ok or left or counts != PairCounts(0, 0, 0):
            result.problems.append(
                f"trial {trial} (kill at {delay:.2f} s): rerun {'ok' if done else 'failed: ' + last_line}, "
                f"verify {'ok' if ok else 'failed'}, {asdict(counts)}, leftovers {left}"
            )
    result.wall_s = time.monotonic() - started
    return result


def run_all(commands: list[str], kills: int, work_root: Path, spread: str = "first-write", seed: int = 0):
    """Every scenario named in `commands`, `kills` kill points each; the results in that order."""
    base = work_root / "base"
    make_base(base)
    table = scenarios()
    return [run_scenario(table[name], base, work_root / "trial", kills, spread, seed) for name in commands]


def markdown_table(results: list[ScenarioResult]) -> str:
    lines = [
        "| command | N | mid-write | lost | duplicated | mismatched | leftovers | verify failed | run (s) | wall (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for item in results:
        lines.append(
            f"| {item.command} | {item.kills} | {item.mid_write} | {item.lost} | {item.duplicated} | "
            f"{item.mismatched} | {item.leftovers} | {item.verify_failures} | {item.duration_s:.1f} | "
            f"{item.wall_s:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20, help="kill points per command (default 20)")
    parser.add_argument("--commands", nargs="+", choices=COMMANDS, default=list(DEFAULT_COMMANDS))
    parser.add_argument(
        "--spread",
        choices=("first-write", "writes", "whole"),
        default="first-write",
        help="where kills are drawn (module docstring)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder [default: a temporary one]")
    arguments = parser.parse_args(argv)
    if arguments.n < 1:
        parser.error("--n must be at least 1")
    with tempfile.TemporaryDirectory(prefix="crash-") as scratch:
        work_root = arguments.work or Path(scratch)
        results = run_all(arguments.commands, arguments.n, work_root, arguments.spread, arguments.seed)
    print(markdown_table(results))
    for item in results:
        print(
            f"{item.command}: kills drawn over {item.write_window_s[0]:.2f}-{item.write_window_s[1]:.2f} s; "
            f"{item.finished_first} came after the command had exited; {item.rerun_failures} rerun(s) failed"
        )
        for problem in item.problems:
            print(f"  {problem}")
    if arguments.json:
        arguments.json.write_text(json.dumps([asdict(item) for item in results], indent=2) + "\n")
    missed = any(item.problems for item in results)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
