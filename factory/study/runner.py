"""Run a study's stage graph on Ray: each stage a Ray task with the resources it needs, independent stages in
parallel, done stages skipped, a failed stage's downstream skipped, one record and one log per stage.

    factory study studies/smoke.yaml                 # embedded local Ray
    factory study studies/paper.yaml --address auto  # a cluster (OUT on storage every node sees)
    factory study studies/paper.yaml --dry-run       # the graph and each stage's state; writes nothing

Resources: train, pretrain, fine-tune and eval stages take one GPU where the cluster has GPUs (else one CPU; a
fine-tune with `processes: N` takes N, on one node, and runs under torchrun: factory/study/stages.py);
builds coordinate the build's own actor pool from a task that takes no CPU (`data.actors: 0`: the build runs in its
task, one CPU); the report runs on the driver, where the study folder is. A task whose node dies is retried by Ray
on another node (its stage function resumes or redoes its partial output); its record is written once, by the
driver, when a run of it has finished."""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
import shutil
import socket
import time
import traceback
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from factory.config import FactoryError, error_line
from factory.storage import OutputLock, Storage
from factory.study.config import StudyConfig
from factory.study.graph import (
    LOGS,
    RECORDS,
    STUDY_FILE,
    Stage,
    StageState,
    build_graph,
    stage_states,
    upstream,
)
from factory.study.stages import StageContext, run_stage

NODE_RETRIES = 3  # runs of a stage lost with their node (or worker process) before it counts as failed
DRIVER_LOG = "study.log"
LOCK_NAME = "_study.lock"  # OUT/_study.lock while a driver runs the study


@dataclass
class StageOutcome:
    stage_id: str
    state: str  # done | failed
    started: float  # epoch seconds
    finished: float
    node: str  # the Ray node id that ran it (or "driver")
    host: str
    result: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # one line, when failed


@dataclass
class StudyOutcome:
    done: list[str] = field(default_factory=list)  # stages run to completion by this run
    skipped_done: list[str] = field(default_factory=list)  # stages done before this run
    failed: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)  # not run: a stage they need failed

    @property
    def exit_status(self) -> int:
        """The number of failed stages, capped at 100 (0: all went well)."""
        return min(len(self.failed), 100)


def _now() -> str:
    return datetime.now().strftime("%H:%M:%S")


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds")


def _stage_device(policy: str, accelerated: bool) -> str:
    """The torch device a stage uses on the node that runs it: CUDA for an accelerated stage that holds a GPU."""
    if policy != "auto":
        return policy
    if not accelerated:
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def _stage_log(path: Path):
    """Everything the stage logs, prints or draws as progress goes to its log file (appended: reruns add to it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", buffering=1) as stream:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        level = root.level
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        try:
            with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
                yield stream
        finally:
            root.removeHandler(handler)
            root.setLevel(level)


def execute_stage(stage: Stage, out: str, device_policy: str, holds_gpu: bool) -> StageOutcome:
    """Run one stage where this process is (a Ray worker, or the driver), its output logged to logs/<id>.log."""
    try:
        import ray

        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "driver"
    except ImportError:
        node = "driver"
    started = time.time()
    outcome = StageOutcome(stage.id, "failed", started, started, node, socket.gethostname())
    with _stage_log(Path(out) / LOGS / f"{stage.id}.log") as stream:
        stream.write(
            f"=== {_iso(started)} {stage.id} starts on node {node} ({outcome.host}, pid {os.getpid()})\n"
        )
        try:
            device = _stage_device(device_policy, stage.accelerated and holds_gpu)
            outcome.result = run_stage(stage, StageContext(Path(out), device, holds_gpu))
            outcome.state = "done"
        except Exception as error:  # noqa: BLE001  (any failure of a stage is reported, the others go on)
            traceback.print_exc(file=stream)
            outcome.error = error_line(error)
        outcome.finished = time.time()
        stream.write(
            f"=== {_iso(outcome.finished)} {stage.id} {outcome.state}"
            f"{': ' + outcome.error if outcome.error else ''}\n"
        )
    return outcome


class Progress:
    """One line per stage start and end, with the live counts, on stdout and in logs/study.log."""

    def __init__(self, out: Path | None, total: int):
        self.path = None if out is None else out / LOGS / DRIVER_LOG
        self.total = total
        self.done = self.running = self.failed = 0

    def header(self) -> None:
        """Marks where a run starts in logs/study.log (a rerun appends to it)."""
        self._append(f"=== study run {_iso(time.time())} pid {os.getpid()} host {socket.gethostname()}")

    def _append(self, message: str) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as stream:
                stream.write(message + "\n")

    def line(self, text: str) -> None:
        counts = f"[done {self.done}, running {self.running}, failed {self.failed}, of {self.total}]"
        message = f"{_now()} {text}  {counts}"
        print(message, flush=True)
        self._append(message)


def print_graph(states: list[StageState]) -> None:
    """The dry run's output: each stage, its state and what it needs."""
    width = max((len(item.stage.id) for item in states), default=0)
    for item in states:
        needs = "every other stage" if item.stage.kind == "report" else ", ".join(item.stage.needs)
        print(f"{item.stage.id:<{width}}  {item.state:<6}{'  <- ' + needs if needs else ''}".rstrip())
    counts = {state: sum(item.state == state for item in states) for state in ("done", "stale", "to run")}
    print(f"{len(states)} stages: {counts['done']} done, {counts['stale']} stale, {counts['to run']} to run")


def select(stages: list[Stage], patterns: list[str] | None) -> list[Stage]:
    """The stages `--only` names (ids or shell patterns such as 'eval.*') and every stage they need."""
    if not patterns:
        return stages
    named = {stage.id for stage in stages for pattern in patterns if fnmatch.fnmatchcase(stage.id, pattern)}
    unmatched = [
        pattern for pattern in patterns if not any(fnmatch.fnmatchcase(stage.id, pattern) for stage in stages)
    ]
    if unmatched:
        raise FactoryError(
            f"--only {' '.join(unmatched)}: no such stage; see `factory study CONFIG --dry-run`"
        )
    keep = upstream(stages, named)
    return [stage for stage in stages if stage.id in keep]


def _write_record(
    root: Storage, stage: Stage, fingerprint: str, needs: dict[str, str], outcome: StageOutcome
):
    record = {
        "stage": stage.id,
        "kind": stage.kind,
        "state": outcome.state,
        "fingerprint": fingerprint,
        "settings": stage.settings,
        "inputs": needs,
        "names": stage.names,
        "outputs": list(stage.outputs),
        "started": _iso(outcome.started),
        "finished": _iso(outcome.finished),
        "seconds": round(outcome.finished - outcome.started, 3),
        "node": outcome.node,
        "host": outcome.host,
        "log": f"{LOGS}/{stage.id}.log",
        "result": outcome.result,
        "error": outcome.error,
    }
    root.write_bytes_atomic(f"{RECORDS}/{stage.id}.json", (json.dumps(record, indent=2) + "\n").encode())


def _clear_outputs(out: Path, stage: Stage, state: str) -> None:
    """Before a stage reruns: a stale stage's outputs were made from other settings, and a stage that cannot resume
    starts from nothing; a resumable one keeps its partial output."""
    if state != "stale" and stage.resumable:
        return
    for relative in stage.outputs:
        path = out / relative
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    Storage(out).delete(f"{RECORDS}/{stage.id}.json")


def _processes(stage: Stage) -> int:
    """DDP processes of a fine-tune stage (`processes`), 1 for every other stage."""
    return stage.settings.get("processes", 1) if stage.kind == "finetune" else 1


def _task_options(stage: Stage, gpus: bool) -> dict[str, Any]:
    processes = _processes(stage)
    if stage.accelerated and gpus:
        resources = {"num_cpus": 1, "num_gpus": processes}  # a task's resources are on one node
    elif processes > 1:
        resources = {"num_cpus": processes}  # gloo ranks, one CPU each
    elif stage.kind == "build" and stage.settings.get("actors") != 0:
        resources = {"num_cpus": 0}  # it coordinates the build's actor pool, which holds the CPUs or GPUs
    else:
        resources = {"num_cpus": 1}
    return {**resources, "max_retries": NODE_RETRIES, "retry_exceptions": False}


def run_study(
    config: StudyConfig,
    address: str | None = None,
    dry_run: bool = False,
    only: list[str] | None = None,
    num_cpus: int | None = None,
) -> StudyOutcome:
    """Run (or, with dry_run, show) the study; returns what was done, skipped and failed."""
    stages = build_graph(config)
    root = Storage(config.out)
    chosen = select(stages, only)
    states = [item for item in stage_states(stages, root) if item.stage in chosen]
    if dry_run:
        print_graph(states)
        return StudyOutcome(skipped_done=[item.stage.id for item in states if item.state == "done"])
    if not root.is_local:
        raise FactoryError(
            f"{config.out}: a study runs in a folder every node sees (local or shared); an s3:// "
            "study folder can be shown with --dry-run only (train, finetune and eval write files)"
        )
    out = Path(root.base)
    root.make_dirs()
    # One driver per study folder: a second one would run the same stages into the same outputs.
    with OutputLock(root, LOCK_NAME, "study", f"the study in {config.out}"):
        root.write_bytes_atomic(STUDY_FILE, (json.dumps(_config_json(config), indent=2) + "\n").encode())
        from factory.build.pool import connect_ray

        ray, started_here = connect_ray(address, num_cpus)
        try:
            return _run_graph(ray, config, out, states)
        finally:
            if started_here:
                ray.shutdown()


def _config_json(config: StudyConfig) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(config), default=str))


def _check_processes(ray, stages: list[Stage], gpus: bool) -> None:
    """A fine-tune's `processes` must fit on one node (its N GPUs, or N CPUs without GPUs): one Ray task holds them
    all, and a task wanting more than any node has would wait forever. Several nodes per fine-tune are not offered."""
    resource = "GPU" if gpus else "CPU"
    largest = max(
        (node["Resources"].get(resource, 0) for node in ray.nodes() if node.get("Alive")), default=0
    )
    for stage in stages:
        if _processes(stage) > largest:
            raise FactoryError(
                f"{stage.id}: processes {_processes(stage)} > the {largest:g} {resource}s of the cluster's largest "
                "node (a fine-tune runs on one node)"
            )


def _run_graph(ray, config: StudyConfig, out: Path, states: list[StageState]) -> StudyOutcome:
    root = Storage(out)
    prints = {item.stage.id: item.fingerprint for item in states}
    gpus = ray.cluster_resources().get("GPU", 0) > 0
    _check_processes(ray, [item.stage for item in states if item.state != "done"], gpus)
    outcome = StudyOutcome()
    progress = Progress(out, len(states))
    progress.header()
    finished: set[str] = set()
    for item in states:
        if item.state == "done":
            finished.add(item.stage.id)
            outcome.skipped_done.append(item.stage.id)
            progress.done += 1
            progress.line(f"skip   {item.stage.id} (done)")
    remote = ray.remote(execute_stage)
    pending = [item for item in states if item.state != "done"]
    running: dict[Any, StageState] = {}
    stopped: set[str] = set()  # failed, or blocked by a failure
    while pending or running:
        for item in list(pending):
            stage = item.stage
            if any(need in stopped for need in stage.needs):
                pending.remove(item)
                stopped.add(stage.id)
                outcome.blocked.append(stage.id)
                progress.line(f"skip   {stage.id} (a stage it needs failed)")
            elif all(need in finished for need in stage.needs):
                pending.remove(item)
                _clear_outputs(out, stage, item.state)
                progress.running += 1
                progress.line(f"start  {stage.id}")
                if stage.kind == "report":  # on the driver, where the study folder is
                    result = execute_stage(stage, str(out), config.device, False)
                    _finish(root, progress, outcome, finished, stopped, item, prints, result)
                    continue
                options = _task_options(stage, gpus)
                reference = remote.options(**options).remote(
                    stage, str(out), config.device, options.get("num_gpus", 0) > 0
                )
                running[reference] = item
        if not running:
            if pending and not any(all(need in finished for need in item.stage.needs) for item in pending):
                waiting = ", ".join(item.stage.id for item in pending)
                raise FactoryError(f"stages wait for stages that are not part of this run: {waiting}")
            continue
        ready, _ = ray.wait(list(running), num_returns=1)
        for reference in ready:
            item = running.pop(reference)
            try:
                result = ray.get(reference)
            except Exception as error:  # noqa: BLE001  (a task lost NODE_RETRIES times: its node or process died)
                now = time.time()
                result = StageOutcome(item.stage.id, "failed", now, now, "?", "?", error=error_line(error))
            _finish(root, progress, outcome, finished, stopped, item, prints, result)
    return outcome


def _finish(
    root: Storage,
    progress: Progress,
    outcome: StudyOutcome,
    finished: set[str],
    stopped: set[str],
    item: StageState,
    prints: dict[str, str],
    result: StageOutcome,
) -> None:
    stage = item.stage
    _write_record(root, stage, prints[stage.id], {need: prints[need] for need in stage.needs}, result)
    progress.running -= 1
    seconds = result.finished - result.started
    if result.state == "done":
        finished.add(stage.id)
        outcome.done.append(stage.id)
        progress.done += 1
        progress.line(f"done   {stage.id} ({seconds:.1f} s)")
    else:
        stopped.add(stage.id)
        outcome.failed.append(stage.id)
        progress.failed += 1
        log_path = Path(root.base) / LOGS / f"{stage.id}.log"
        progress.line(f"FAILED {stage.id} ({seconds:.1f} s): {result.error}; log: {log_path}")
