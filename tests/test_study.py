"""`factory study`: the config's errors, the stage graph's states, resume after kill -9, a config change rerunning only
what is downstream of it, a dry run that writes nothing (local and loopback S3), a two-node Ray cluster that
loses a node mid-study, and a fine-tune on two DDP processes (torchrun, gloo) against the same one in one process.

    python -m pytest -q tests/test_study.py

Every study here is tiny (two bundled photos, 128 crops, a 1-epoch tiny VQ-VAE-2, tiny EDSR trained for a few
iterations). The report stage is the other half of the study (factory/study/report.py, tested in test_report.py);
the in-process studies here put a stand-in for it in place (`stand_in_report`) so that they test the runner, not the
report; the kill -9 test's killed run (a subprocess) writes the real one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")

from factory.config import ConfigError  # noqa: E402  (after the importorskip)
from factory.storage import Storage  # noqa: E402
from factory.study.config import load_study, study_from_dict  # noqa: E402
from factory.study.graph import build_graph, stage_states  # noqa: E402

pytest_plugins = ["moto_s3"]  # the moto_server and s3_bucket fixtures

ROOT = Path(__file__).resolve().parents[1]


def tiny_study(out: str | Path, finetune_iterations: int = 3) -> dict:
    return {
        "out": str(out),
        "photos": {"train": ["astronaut.png", "coffee.png"], "eval": ["chelsea.png"]},
        "data": {"hr": ["photos:train"], "crop": 128, "limit": 4, "shard_size": 2, "actors": 0},
        "reconstructors": [
            {
                "model": "vqvae2",
                "epochs": [1],
                "preset": "tiny",
                "epoch_size": 16,
                "image_size": 32,
                "batch_size": 8,
                "heldout": 1,
            },
        ],
        "classical": ["bicubic"],
        "architectures": [
            {
                "name": "edsr",
                "pretrained": {"dataset": "bicubic", "iterations": 4, "batch_size": 2, "patch_size": 16},
                "iterations": finetune_iterations,
                "batch_size": 2,
                "patch_size": 16,
                "checkpoint_every": 2,
            },
        ],
        "evalsets": [
            {
                "name": "cat",
                "make": {"hr": "photos:eval", "degrader": "bsrgan", "crop": 128, "limit": 2, "seed": 7},
            }
        ],
    }


def write_config(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


@dataclass(frozen=True)
class StandInReportPaths:
    markdown: Path


def stand_in_write_report(study_dir: Path) -> StandInReportPaths:
    """The report stage's contract (factory/study/report.py): read the study folder, write OUT/report.md. This one
    lists each eval's mean PSNR, read from its summary.json."""
    lines = ["| architecture | run | evalset | PSNR |", "|---|---|---|---|"]
    for summary in sorted(Path(study_dir).glob("eval/*/*/*/summary.json")):
        architecture, run, evalset = summary.parts[-4:-1]
        lines.append(
            f"| {architecture} | {run} | {evalset} | {json.loads(summary.read_text())['psnr']:.2f} |"
        )
    path = Path(study_dir) / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return StandInReportPaths(path)


@pytest.fixture(scope="module")
def stand_in_report():
    module = types.ModuleType("factory.study.report")
    module.write_report = stand_in_write_report
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "factory.study.report", module)
        yield


@pytest.fixture(scope="module")
def local_ray():
    """One embedded Ray (2 CPUs) for the in-process studies of this module: run_study keeps a Ray it finds."""
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, address="local")
    yield
    ray.shutdown()


def driver_runs(out: Path) -> list[list[str]]:
    """logs/study.log split into runs (each starts with a '=== study run' line)."""
    runs: list[list[str]] = []
    for line in (out / "logs" / "study.log").read_text().splitlines():
        if line.startswith("=== study run"):
            runs.append([])
        elif runs:
            runs[-1].append(line)
    return runs


def stages_with(lines: list[str], word: str) -> list[str]:
    """Stage ids of the driver lines `HH:MM:SS <word> <stage id> ...`."""
    pattern = re.compile(rf"^\d\d:\d\d:\d\d {word}\s+(\S+)")
    return [match.group(1) for line in lines if (match := pattern.match(line))]


def records(out: Path) -> dict[str, dict]:
    return {path.stem: json.loads(path.read_text()) for path in sorted((out / "stages").glob("*.json"))}


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory, local_ray, stand_in_report) -> Path:
    """A tiny study run to the end (report included), in-process on the module's Ray."""
    from factory.study.runner import run_study

    out = tmp_path_factory.mktemp("finished") / "study"
    outcome = run_study(study_from_dict(tiny_study(out)))
    assert outcome.failed == [] and outcome.blocked == []
    return out


def copy_study(source: Path, tmp_path: Path) -> Path:
    out = tmp_path / "study"
    shutil.copytree(source, out)
    return out


# --------------------------------------------------------------------------------------------------------------------
# Config and graph
# --------------------------------------------------------------------------------------------------------------------


def test_config_errors_are_one_line(tmp_path):
    values = tiny_study(tmp_path / "out")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['epohcs'\]"):
        study_from_dict({**values, "reconstructors": [{"model": "vqvae2", "epohcs": [1]}]})
    with pytest.raises(ConfigError, match="no dataset 'vqvae-ep9'"):
        study_from_dict({**values, "architectures": [{"name": "edsr", "datasets": ["vqvae-ep9"]}]})
    with pytest.raises(ConfigError, match=r"learning_rate: 'fast' is not a number"):
        study_from_dict({**values, "architectures": [{"name": "edsr", "learning_rate": "fast"}]})
    # YAML 1.1 reads 1e-4 as a string; the config takes the number it spells
    architecture = yaml.safe_load("name: edsr\nlearning_rate: 1e-4")
    assert architecture["learning_rate"] == "1e-4"
    parsed = study_from_dict({**values, "architectures": [architecture]})
    assert parsed.architectures[0].learning_rate == 1e-4
    with pytest.raises(ConfigError, match="no such photo group"):
        study_from_dict({**values, "data": {"hr": ["photos:nope"]}})
    config = write_config(tmp_path / "bad.yaml", {**values, "shards": "x"})
    run = subprocess.run(
        [sys.executable, "-m", "factory.cli", "study", str(config), "--dry-run"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and "unknown key(s) ['shards']" in run.stderr


def test_shipped_configs_parse_into_the_papers_graph():
    paper = load_study(ROOT / "studies" / "paper.yaml")
    ids = {stage.id for stage in build_graph(paper)}
    # 5 reconstructors x 5 epochs + 3 classical = 28 datasets; HAT on each, EDSR/ESRGAN/SwinIR on the VQ-VAE-2 ones
    assert len(paper.datasets) == 28
    assert sum(stage_id.startswith("finetune.hat.") for stage_id in ids) == 28
    for architecture in ("edsr", "esrgan", "swinir"):
        assert {i for i in ids if i.startswith(f"finetune.{architecture}.vqvae2")} == {
            f"finetune.{architecture}.vqvae2-ep{epoch}" for epoch in (4, 8, 16, 32, 64)
        }
    assert sum(stage_id.startswith("build.bicubic-de") for stage_id in ids) == 9
    protocol = {item.name: (item.y_channel, item.crop_border) for item in paper.evalsets}
    assert protocol["ntire2018-t3"] == protocol["ntire2020-t2"] == (True, 4)
    assert {i for i in ids if i.startswith("eval.hat.vqvae2-ep8.")} == {
        "eval.hat.vqvae2-ep8.ntire2018-t3",
        "eval.hat.vqvae2-ep8.ntire2020-t2",
    }
    assert {i for i in ids if i.startswith("eval.swinir.bicubic-de8.")} == {
        "eval.swinir.bicubic-de8.set14",
        "eval.swinir.bicubic-de8.b100",
        "eval.swinir.bicubic-de8.manga109",
    }
    smoke = load_study(ROOT / "studies" / "smoke.yaml")
    assert "report" in {stage.id for stage in build_graph(smoke)}


def test_a_config_change_makes_exactly_its_downstream_stale(tmp_path):
    """Graph only: records as a finished run leaves them, then one setting changed at each level."""
    from factory.study.graph import fingerprints

    values = tiny_study(tmp_path / "study")
    root = Storage(tmp_path / "study")
    stages = build_graph(study_from_dict(values))
    for stage_id, fingerprint in fingerprints(stages).items():
        record = {"stage": stage_id, "state": "done", "fingerprint": fingerprint}
        root.write_bytes_atomic(f"stages/{stage_id}.json", json.dumps(record).encode())

    def stale(changed: dict) -> set[str]:
        states = stage_states(build_graph(study_from_dict(changed)), root)
        return {item.stage.id for item in states if item.state != "done"}

    assert stale(values) == set()
    changed = json.loads(json.dumps(values))
    changed["architectures"][0]["overrides"] = {"vqvae2-ep1": {"where": "delta_e < 5"}}
    assert stale(changed) == {"finetune.edsr.vqvae2-ep1", "eval.edsr.vqvae2-ep1.cat", "report"}
    changed = json.loads(json.dumps(values))
    changed["reconstructors"][0]["epoch_size"] = 32  # the checkpoint, its dataset and all that follows it
    assert stale(changed) == {
        "train.vqvae2",
        "build.vqvae2-ep1",
        "stats",
        "finetune.edsr.vqvae2-ep1",
        "eval.edsr.vqvae2-ep1.cat",
        "report",
    }
    changed = json.loads(json.dumps(values))
    changed["evalsets"][0]["crop_border"] = 0  # every eval, nothing trained
    assert stale(changed) == {stage.id for stage in stages if stage.kind == "eval"} | {"report"}


def test_only_selects_the_named_stages_and_what_they_need(tmp_path):
    from factory.config import FactoryError
    from factory.study.runner import select

    stages = build_graph(study_from_dict(tiny_study(tmp_path / "study")))
    chosen = {stage.id for stage in select(stages, ["eval.edsr.bicubic.*"])}
    assert chosen == {
        "photos.train",
        "photos.eval",
        "build.bicubic",
        "pretrain.edsr",
        "finetune.edsr.bicubic",
        "evalset.cat",
        "eval.edsr.bicubic.cat",
    }
    with pytest.raises(FactoryError, match="--only nope: no such stage"):
        select(stages, ["nope"])


def test_a_second_driver_on_the_same_study_folder_is_refused(tmp_path):
    from factory.config import FactoryError
    from factory.storage import OutputLock
    from factory.study.runner import LOCK_NAME, run_study

    out = tmp_path / "study"
    out.mkdir()
    with OutputLock(Storage(out), LOCK_NAME, "study", "a study"):  # a driver that is running (this process)
        with pytest.raises(
            FactoryError, match=rf"another study is writing the study in {out} \(pid {os.getpid()}"
        ):
            run_study(study_from_dict(tiny_study(out)))
    assert sorted(path.name for path in out.iterdir()) == []  # refused before anything was written


# --------------------------------------------------------------------------------------------------------------------
# Resume, config change, dry run
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_kill_9_then_rerun_finishes_without_redoing_done_stages(tmp_path, local_ray):
    from factory.study.runner import run_study

    out = tmp_path / "study"
    config = write_config(tmp_path / "study.yaml", tiny_study(out, finetune_iterations=40))
    command = [sys.executable, "-m", "factory.cli", "study", str(config), "--num-cpus", "2"]
    # A session of its own, so that kill -9 takes the driver and the embedded Ray it started, as a crash would.
    process = subprocess.Popen(
        command, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            done = (
                [r for r in records(out).values() if r["state"] == "done"]
                if (out / "stages").is_dir()
                else []
            )
            if any(
                r["kind"] == "build" for r in done
            ):  # photos, train and a build done; later stages under way
                break
            time.sleep(0.2)
        assert process.poll() is None, "the study ended before it could be killed"
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    done_before = {stage for stage, record in records(out).items() if record["state"] == "done"}
    assert done_before and "eval.edsr.bicubic.cat" not in done_before

    outcome = run_study(load_study(config))

    assert outcome.failed == [] and set(outcome.skipped_done) == done_before
    assert not done_before & set(outcome.done)
    expected = {stage.id for stage in build_graph(load_study(config))}
    assert set(records(out)) == expected and all(r["state"] == "done" for r in records(out).values())
    killed_run, rerun = driver_runs(out)
    assert (
        set(stages_with(rerun, "skip")) == done_before
    )  # counted in the log: each done stage skipped once ...
    assert not done_before & set(stages_with(rerun, "start"))  # ... and none started again
    assert set(stages_with(rerun, "start")) == expected - done_before
    assert set(stages_with(killed_run, "done")) == done_before


@pytest.mark.slow
def test_changing_one_finetune_setting_reruns_only_it_its_evals_and_the_report(
    finished_study, tmp_path, local_ray, stand_in_report
):
    from factory.study.runner import run_study

    out = copy_study(finished_study, tmp_path)
    values = tiny_study(out)
    values["architectures"][0]["overrides"] = {"bicubic": {"iterations": 5}}
    before = records(out)

    outcome = run_study(study_from_dict(values))

    rerun = {"finetune.edsr.bicubic", "eval.edsr.bicubic.cat", "report"}
    assert set(outcome.done) == rerun and outcome.failed == []
    assert set(outcome.skipped_done) == set(before) - rerun
    after = records(out)
    assert after["finetune.edsr.bicubic"]["result"]["iterations"] == 5
    for stage in set(before) - rerun:
        assert after[stage] == before[stage]  # untouched records: those stages were not run again
    assert set(stages_with(driver_runs(out)[-1], "start")) == rerun
    # the report read the new eval
    summary = json.loads((out / "eval/edsr/bicubic/cat/summary.json").read_text())
    assert f"| edsr | bicubic | cat | {summary['psnr']:.2f} |" in (out / "report.md").read_text()


@pytest.mark.slow
def test_a_failed_stage_is_reported_the_others_go_on_and_downstream_is_not_run(
    tmp_path, local_ray, stand_in_report, capsys
):
    from factory.study.runner import run_study

    values = tiny_study(tmp_path / "study")
    values["reconstructors"] = []
    values["evalsets"][0]["make"]["hr"] = str(tmp_path / "no-such-folder")

    outcome = run_study(study_from_dict(values))

    assert outcome.failed == ["evalset.cat"] and outcome.exit_status == 1
    assert set(outcome.blocked) == {"eval.edsr.pretrained.cat", "eval.edsr.bicubic.cat", "report"}
    assert {"build.bicubic", "pretrain.edsr", "finetune.edsr.bicubic", "stats"} <= set(outcome.done)
    log_path = tmp_path / "study" / "logs" / "evalset.cat.log"
    failed_line = [line for line in capsys.readouterr().out.splitlines() if "FAILED evalset.cat" in line]
    assert (
        len(failed_line) == 1
        and "not a folder of images" in failed_line[0]
        and str(log_path) in failed_line[0]
    )
    assert "Traceback" in log_path.read_text()  # the log has the whole story, the driver line one sentence
    assert records(tmp_path / "study")["evalset.cat"]["state"] == "failed"


@pytest.mark.slow
def test_colour_shift_study_builds_shifted_bicubic_datasets_and_trains_from_scratch(
    tmp_path, local_ray, stand_in_report
):
    from factory.study.runner import run_study

    values = tiny_study(tmp_path / "study")
    values.update(reconstructors=[], classical=[], architectures=[])
    values["color_shift"] = {
        "targets": [0, 3],
        "architecture": "swinir",
        "preset": "tiny",
        "iterations": 2,
        "batch_size": 2,
        "patch_size": 16,
        "checkpoint_every": 2,
    }

    outcome = run_study(study_from_dict(values))

    assert outcome.failed == []
    out = tmp_path / "study"
    # target 0 is the unshifted bicubic reference; 3 is met on the stored 8-bit LR (the build's own card)
    for dataset, target in (("bicubic-de0", 0.0), ("bicubic-de3", 3.0)):
        card = json.loads((out / "manifests" / dataset / "_card.json").read_text())
        assert card["delta_e"]["mean"] == pytest.approx(target, abs=0.05)
        record = records(out)[f"finetune.swinir.{dataset}"]
        assert record["settings"]["pretrained"] is None and record["names"]["from_scratch"] is True
        assert (out / "eval" / "swinir" / dataset / "cat" / "metrics.csv").is_file()


def tree(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in folder.rglob("*")
    }


@pytest.mark.slow
def test_dry_run_writes_nothing_and_shows_states(finished_study, tmp_path, capfd):
    out = copy_study(finished_study, tmp_path)
    values = tiny_study(out)
    values["architectures"][0]["overrides"] = {"bicubic": {"learning_rate": 1.0e-5}}
    config = write_config(tmp_path / "changed.yaml", values)
    before = tree(out)
    run = subprocess.run(
        [sys.executable, "-m", "factory.cli", "study", str(config), "--dry-run"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr
    assert tree(out) == before
    states = dict(re.findall(r"^(\S+)\s+(done|stale|to run)", run.stdout, re.MULTILINE))
    assert {stage for stage, state in states.items() if state == "stale"} == {
        "finetune.edsr.bicubic",
        "eval.edsr.bicubic.cat",
        "report",
    }
    assert {state for stage, state in states.items()} == {"done", "stale"}
    fresh = tmp_path / "fresh"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "factory.cli",
            "study",
            str(write_config(tmp_path / "fresh.yaml", tiny_study(fresh))),
            "--dry-run",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert run.returncode == 0 and not fresh.exists()
    assert "14 stages: 0 done, 0 stale, 14 to run" in run.stdout


@pytest.mark.slow
def test_dry_run_on_loopback_s3_reads_records_and_writes_nothing(finished_study, s3_bucket):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_bucket.endpoint_url)
    for path in (finished_study / "stages").glob("*.json"):  # a study whose records live on S3
        client.put_object(Bucket=s3_bucket.name, Key=f"study/stages/{path.name}", Body=path.read_bytes())
    keys = s3_bucket.keys()
    values = tiny_study(s3_bucket.uri("study"))
    states = {
        item.stage.id: item.state
        for item in stage_states(build_graph(study_from_dict(values)), Storage(s3_bucket.uri("study")))
    }
    assert set(states.values()) == {"done"}
    values["data"]["limit"] = 6  # every dataset changes: everything downstream of the builds goes stale
    config = write_config(Path(os.environ.get("TMPDIR", "/tmp")) / f"s3-{s3_bucket.name}.yaml", values)
    run = subprocess.run(
        [sys.executable, "-m", "factory.cli", "study", str(config), "--dry-run"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    config.unlink()
    assert run.returncode == 0, run.stderr
    shown = dict(re.findall(r"^(\S+)\s+(done|stale|to run)", run.stdout, re.MULTILINE))
    assert (
        shown["photos.train"] == "done" and shown["build.bicubic"] == "stale" and shown["report"] == "stale"
    )
    assert s3_bucket.keys() == keys  # nothing written


# --------------------------------------------------------------------------------------------------------------------
# Two nodes, one lost mid-study
# --------------------------------------------------------------------------------------------------------------------


def running_on(out: Path, node_id: str) -> set[str]:
    """Stages whose log says a run started on `node_id` and that have no record yet."""
    running = set()
    for path in (out / "logs").glob("*.log"):
        if f"on node {node_id} " in path.read_text() and not (out / "stages" / f"{path.stem}.json").exists():
            running.add(path.stem)
    return running


@pytest.mark.slow
def test_two_node_cluster_spreads_stages_and_survives_a_lost_node(tmp_path, stand_in_report):
    from ray.cluster_utils import Cluster

    from factory.study.runner import run_study

    if ray.is_initialized():
        ray.shutdown()  # the module's local Ray: this test runs on a cluster of its own
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    worker = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    out = tmp_path / "study"
    config = study_from_dict(tiny_study(out, finetune_iterations=300))
    result = {}
    try:
        ray.init(address=cluster.address)
        thread = threading.Thread(target=lambda: result.update(outcome=run_study(config)))
        thread.start()
        removed_during: set[str] = set()
        deadline = time.monotonic() + 400
        while thread.is_alive() and time.monotonic() < deadline and not removed_during:
            finished_on_worker = (out / "stages").is_dir() and any(
                r["node"] == worker.node_id for r in records(out).values()
            )
            busy = running_on(out, worker.node_id) if (out / "logs").is_dir() else set()
            if finished_on_worker and busy:
                cluster.remove_node(worker)  # the node and every process on it are gone
                removed_during = busy
            time.sleep(0.1)
        thread.join(timeout=600)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert removed_during, "no stage was running on the worker node to lose"
    outcome = result["outcome"]
    assert outcome.failed == [] and outcome.blocked == []
    expected = {stage.id for stage in build_graph(config)}
    final = records(out)
    assert set(final) == expected and all(record["state"] == "done" for record in final.values())
    nodes = {record["node"] for record in final.values()}
    assert worker.node_id in nodes and len(nodes - {"driver"}) == 2  # spread across both nodes
    for stage in removed_during:
        assert final[stage]["node"] != worker.node_id  # lost with the node, run again on the head
    done_lines = stages_with(driver_runs(out)[-1], "done")
    assert sorted(done_lines) == sorted(expected)  # every stage done exactly once


# --------------------------------------------------------------------------------------------------------------------
# A fine-tune on several processes (DDP under torchrun, in the stage's Ray task)
# --------------------------------------------------------------------------------------------------------------------


def test_processes_setting_is_checked_and_one_process_keeps_the_fingerprints(tmp_path):
    values = tiny_study(tmp_path / "out")
    for bad in (0, "two", 1.5, True):
        with pytest.raises(ConfigError, match=r"processes: .* is not a whole number >= 1"):
            study_from_dict({**values, "architectures": [{"name": "edsr", "processes": bad}]})
    with pytest.raises(ConfigError, match=r"overrides\.bicubic\.processes: 0 is not a whole number"):
        study_from_dict(
            {**values, "architectures": [{"name": "edsr", "overrides": {"bicubic": {"processes": 0}}}]}
        )

    def prints(architecture_changes: dict) -> dict[str, str]:
        changed = tiny_study(tmp_path / "out")
        changed["architectures"][0].update(architecture_changes)
        stages = build_graph(study_from_dict(changed))
        return {item.stage.id: item.fingerprint for item in stage_states(stages, Storage(tmp_path / "out"))}

    default = prints({})
    assert prints({"processes": 1}) == default  # a study made before the setting keeps its fine-tunes done
    two = prints({"overrides": {"bicubic": {"processes": 2}}})
    assert {stage for stage in default if two[stage] != default[stage]} == {
        "finetune.edsr.bicubic",
        "eval.edsr.bicubic.cat",
        "report",
    }


def test_processes_beyond_the_largest_node_are_refused_in_one_line(tmp_path, local_ray, stand_in_report):
    from factory.config import FactoryError
    from factory.study.runner import run_study

    values = tiny_study(tmp_path / "study")
    values["architectures"][0]["processes"] = 3  # the module's Ray has one node, 2 CPUs, no GPU
    with pytest.raises(FactoryError) as refusal:
        run_study(study_from_dict(values))
    message = str(refusal.value)
    assert "\n" not in message
    assert message.startswith(
        "finetune.edsr.vqvae2-ep1: processes 3 > the 2 CPUs of the cluster's largest node"
    )
    assert not (tmp_path / "study" / "stages").exists()  # refused before any stage ran


def finetune_trace(run: Path) -> dict:
    """What a fine-tune delivered: its log lines' iterations and the checkpoints' iterations (read back)."""
    from factory.finetune import CHECKPOINT_PATTERN

    checkpoints = sorted(
        path for path in (run / "checkpoints").iterdir() if CHECKPOINT_PATTERN.match(path.name)
    )
    return {
        "logged": [json.loads(line)["iteration"] for line in (run / "log.jsonl").read_text().splitlines()],
        "checkpoints": [path.name for path in checkpoints],
        "saved": [torch_load(path)["iteration"] for path in checkpoints],
    }


def torch_load(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_a_two_process_finetune_runs_under_torchrun_and_delivers_what_one_process_does(
    tmp_path, local_ray, stand_in_report
):
    from factory.sr.networks import load_network
    from factory.study.runner import run_study

    values = tiny_study(tmp_path / "study", finetune_iterations=4)
    values["reconstructors"] = []
    values["architectures"][0]["processes"] = 2  # gloo on the module's 2 CPUs
    out = tmp_path / "study"

    outcome = run_study(study_from_dict(values))

    assert outcome.failed == [] and outcome.blocked == []
    record = records(out)["finetune.edsr.bicubic"]
    assert record["settings"]["processes"] == 2 and record["result"]["processes"] == 2
    assert record["result"]["iterations"] == 4
    run = out / "finetune" / "edsr" / "bicubic"
    assert load_network(run / "model.pth", "edsr").scale == 4
    log = (out / "logs" / "finetune.edsr.bicubic.log").read_text()
    assert "torch.distributed.run --standalone --nproc-per-node=2 --no-python" in log  # ran under torchrun
    assert "INFO factory.finetune: iteration 4  loss" in log  # rank 0's lines reach the stage's log
    assert (out / "eval" / "edsr" / "bicubic" / "cat" / "metrics.csv").is_file()
    two_processes = finetune_trace(run)
    assert two_processes == {
        "logged": [1, 2, 3, 4],
        "checkpoints": ["iter_0000002.pt", "iter_0000004.pt"],
        "saved": [2, 4],
    }

    values["architectures"][0]["processes"] = 1  # the same settings in one process, in the stage's task
    outcome = run_study(study_from_dict(values))

    assert set(outcome.done) == {"finetune.edsr.bicubic", "eval.edsr.bicubic.cat", "report"}
    record = records(out)["finetune.edsr.bicubic"]
    assert "processes" not in record["settings"] and record["result"]["processes"] == 1
    assert finetune_trace(run) == two_processes
    assert "torch.distributed.run" not in log_since_last_start(out / "logs" / "finetune.edsr.bicubic.log")


def log_since_last_start(path: Path) -> str:
    """A stage log's last run (each starts with a '=== <time> <stage> starts on node ...' line)."""
    return path.read_text().rsplit(" starts on node ", 1)[-1]


@pytest.mark.slow  # ~20 s on two busy cores: torchrun and two ranks start
def test_a_failing_torchrun_fails_its_stage_with_the_ranks_error_in_the_log(tmp_path):
    from factory.study.runner import execute_stage

    values = tiny_study(tmp_path / "study")
    values["architectures"][0]["processes"] = 2
    stage = next(s for s in build_graph(study_from_dict(values)) if s.id == "finetune.edsr.bicubic")
    # nothing upstream ran: no pretrained weights, no shards; the ranks refuse in one line and torchrun exits 1

    outcome = execute_stage(stage, str(tmp_path / "study"), "cpu", False)

    assert outcome.state == "failed"
    weights = tmp_path / "study" / "pretrain" / "edsr" / "model.pth"
    assert outcome.error == f"torchrun (2 processes) exited with status 1: no weights file at {weights}"
    log = (tmp_path / "study" / "logs" / "finetune.edsr.bicubic.log").read_text()
    assert "--nproc-per-node=2" in log and "pretrain/edsr/model.pth" in log
    assert "ChildFailedError" in log  # torchrun's own report of the failed ranks, after theirs


def processes_mentioning(text: str) -> dict[int, str]:
    """pid -> command line of this machine's live processes whose command line holds `text` (a tmp_path: ours)."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if entry.name.isdigit() and text in command and state != "Z":
            found[int(entry.name)] = command
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_killing_the_stage_worker_ends_torchrun_and_its_ranks_and_the_retry_resumes(
    tmp_path, local_ray, stand_in_report
):
    from factory.study.runner import run_study

    out = tmp_path / "study"
    values = tiny_study(out, finetune_iterations=60)
    values["reconstructors"] = []
    values["architectures"][0].update(processes=2, checkpoint_every=10)
    run_folder = out / "finetune" / "edsr" / "bicubic"
    seen: dict[str, object] = {}

    def kill_the_worker_after_the_first_checkpoint() -> None:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and not list(run_folder.glob("checkpoints/iter_*.pt")):
            time.sleep(0.2)
        ours = processes_mentioning(str(run_folder))  # torchrun and its two ranks
        launcher = [pid for pid, command in ours.items() if "torch.distributed.run" in command]
        if len(ours) != 3 or len(launcher) != 1:
            seen["found"] = ours
            return
        worker = int(Path(f"/proc/{launcher[0]}/stat").read_text().rsplit(")", 1)[1].split()[1])
        seen["killed"] = set(ours)
        os.kill(worker, signal.SIGKILL)  # the Ray worker running the stage, as when its process dies
        time.sleep(10)
        seen["alive"] = set(processes_mentioning(str(run_folder))) & set(ours)

    killer = threading.Thread(target=kill_the_worker_after_the_first_checkpoint, daemon=True)
    killer.start()
    outcome = run_study(study_from_dict(values))
    killer.join(timeout=60)

    assert "killed" in seen, f"torchrun and two ranks not found: {seen.get('found')}"
    assert seen["alive"] == set()  # Ray ends the worker's children (torchrun); the ranks end with torchrun
    assert outcome.failed == [] and outcome.done.count("finetune.edsr.bicubic") == 1
    record = records(out)["finetune.edsr.bicubic"]
    assert record["result"]["iterations"] == 60 and record["result"]["processes"] == 2
    log = (out / "logs" / "finetune.edsr.bicubic.log").read_text()
    assert log.count(" starts on node ") == 2  # Ray ran the task again ...
    assert re.search(r"resumed from \S+iter_00000\d0\.pt", log)  # ... and it went on from a checkpoint
