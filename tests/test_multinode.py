"""Multi-node behaviour on one machine: a Ray head and two "GPU" worker nodes (`ray.cluster_utils.Cluster`).

    python -m pytest -q tests/test_multinode.py

The worker nodes advertise one logical GPU each (Ray resources are bookkeeping: no CUDA is needed), so the build
starts one `num_gpus=1` reconstructor actor per node, as on a real GPU cluster, and the actors fall back to the CPU
(`--device auto`). The build runs as `factory build --address <head>` in a subprocess, like a RayJob's entrypoint.
Which node built which shard comes from Ray's state API: every shard is one `ShardWorker.build_shard` task, and
its task record carries the node it ran on. Shards go to a local folder, standing in for shared storage (all nodes
are on this machine); the same code path on S3 is tested in test_s3.py.

One cluster serves the whole module (starting a node takes seconds); tests leave it with two worker nodes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ray = pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[1]
DATASET = "bicubic"
BUILD_OPTIONS = ["--model", "bicubic", "--crop", "128", "--shard-size", "2", "--no-progress"]
TASK_NAME = "WorkerHost.build_shard"  # factory.build.pool: the actor around each worker


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    # The head runs the driver only (as in deploy/: CPU 0 on a real head; 1 here for Ray's own bookkeeping tasks);
    # the dashboard serves the state API that tells which node ran each shard.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": True})
    for _ in range(2):
        cluster.add_node(num_cpus=1, num_gpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def gpu_nodes(cluster) -> list:
    """The worker nodes (every one added here has a logical GPU), in a stable order."""
    return sorted(cluster.worker_nodes, key=lambda node: node.node_id)


def planned_keys(photo_folder: Path, limit: int, crop: int = 128, shard_size: int = 2) -> list[str]:
    """The pair keys the build plans for these options (the build's own deterministic planner)."""
    from factory.build import BuildConfig
    from factory.build.plan import plan_build

    plan = plan_build(
        BuildConfig(model="bicubic", hr=(str(photo_folder),), crop=crop, limit=limit, shard_size=shard_size)
    )
    return [crop.key for task in plan.shards for crop in task.crops]


def start_build(
    cluster,
    photo_folder: Path,
    out: Path,
    limit: int,
    options: list[str] = (),
    shard_delay: float | None = None,
) -> subprocess.Popen:
    # With a shard delay the CLI runs under tests/faults.py, which hands the build a worker that waits per shard.
    faults = [str(ROOT / "tests" / "faults.py"), "--shard-delay", str(shard_delay)] if shard_delay else []
    command = [
        sys.executable, *(faults or ["-m", "factory.cli"]), "build", *BUILD_OPTIONS, *options, "--limit", str(limit),
        "--hr", str(photo_folder), "--out", str(out / "shards"), "--manifests", str(out / "manifests"),
        "--address", cluster.address,
    ]  # fmt: skip
    return subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ),
    )


def finish(process: subprocess.Popen, timeout: float = 120) -> str:
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        pytest.fail(f"the build did not finish within {timeout:.0f} s:\n{output[-3000:]}")
    assert process.returncode == 0, output[-3000:]
    return output


def committed_manifests(out: Path) -> list[Path]:
    return sorted((out / "manifests" / DATASET).glob(f"{DATASET}-*.parquet"))


def wait_for_first_commit(process: subprocess.Popen, out: Path, timeout: float = 120) -> None:
    """Return once the build has committed its first shard (its manifest exists): the build is then mid-way."""
    deadline = time.monotonic() + timeout
    while not committed_manifests(out):
        assert process.poll() is None, process.communicate()[0][-3000:]
        assert time.monotonic() < deadline, f"no shard committed within {timeout:.0f} s"
        time.sleep(0.05)


def check_exactly_once(out: Path, expected_keys: list[str]) -> None:
    """`factory verify` passes and the manifests hold every planned pair exactly once."""
    verified = subprocess.run(
        [sys.executable, "-m", "factory.cli", "verify", str(out / "shards"), "--manifests", str(out / "manifests")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert verified.returncode == 0, verified.stdout + verified.stderr
    keys = [key for path in committed_manifests(out) for key in pq.read_table(path).column("key").to_pylist()]
    assert Counter(keys) == Counter(expected_keys)  # no pair lost, none twice
    shards = sorted((out / "shards" / DATASET).glob("*.tar"))
    assert [path.stem for path in shards] == [path.stem for path in committed_manifests(out)]


def shard_task_records(job_ids_before: set[str], expected_finished: int, timeout: float = 30) -> list:
    """The state API's records of the build's shard tasks (of jobs started after `job_ids_before` was taken).
    Task events reach the state API about once a second, so wait until the expected number have finished."""
    from ray.util.state import list_tasks

    deadline = time.monotonic() + timeout
    while True:
        records = [
            record
            for record in list_tasks(
                filters=[("func_or_class_name", "=", TASK_NAME)], detail=True, limit=10_000
            )
            if record.job_id not in job_ids_before
        ]
        finished = [record for record in records if record.state == "FINISHED"]
        if len(finished) >= expected_finished or time.monotonic() > deadline:
            return records
        time.sleep(0.5)


def job_ids() -> set[str]:
    from ray.util.state import list_tasks

    return {
        record.job_id for record in list_tasks(filters=[("func_or_class_name", "=", TASK_NAME)], limit=10_000)
    }


def test_shards_spread_over_the_gpu_nodes(cluster, photo_folder: Path, tmp_path: Path):
    workers = {node.node_id for node in gpu_nodes(cluster)}
    assert len(workers) == 2
    before = job_ids()
    # Shards of 4 pairs that each take at least a second (tests/faults.py), so that the queue outlasts the
    # start-up of the second actor however fast the machine: the build gives shards only to actors that are up.
    options = ["--crop", "256", "--shard-size", "4"]
    output = finish(start_build(cluster, photo_folder, tmp_path, limit=32, options=options, shard_delay=1.0))
    assert "8 shards (8 built" in output
    check_exactly_once(tmp_path, planned_keys(photo_folder, limit=32, crop=256, shard_size=4))

    records = shard_task_records(before, expected_finished=8)
    finished = [record for record in records if record.state == "FINISHED"]
    # One task per shard, no retries, and each GPU node built some: the actors (num_gpus=1) sit one per node.
    assert len(finished) == 8
    by_node = Counter(record.node_id for record in finished)
    assert set(by_node) == workers, f"shards per node: {dict(by_node)}"
    assert cluster.head_node.node_id not in by_node


def test_losing_a_node_mid_build_keeps_every_pair_exactly_once(cluster, photo_folder: Path, tmp_path: Path):
    before = job_ids()
    limit = 24  # 12 shards: the first commit comes well before the last
    process = start_build(cluster, photo_folder, tmp_path, limit=limit)
    wait_for_first_commit(process, tmp_path)
    lost = gpu_nodes(cluster)[0]
    cluster.remove_node(lost)  # SIGTERM to the node's raylet and its workers, as when a VM or pod goes away
    # The autoscaler (or KubeRay) replaces the node; the build's replacement actor lands on it.
    cluster.add_node(num_cpus=1, num_gpus=1)
    output = finish(process)

    assert "actor died" in output, "the node loss did not reach the build"
    assert f"{limit} pairs in 12 shards" in output
    check_exactly_once(tmp_path, planned_keys(photo_folder, limit=limit))
    records = shard_task_records(before, expected_finished=12)
    finished = [record for record in records if record.state == "FINISHED"]
    assert (
        len(finished) == 12
    )  # every shard finished exactly once; the lost node's shard was redone elsewhere
    assert len(gpu_nodes(cluster)) == 2


TORCHRUN_PROBE = """
import json, os, sys
import torch, torch.distributed as dist
dist.init_process_group("gloo")
value = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(value)
record = {name: os.environ.get(name) for name in ("RANK", "WORLD_SIZE", "GROUP_RANK", "LOCAL_RANK", "CUDA_VISIBLE_DEVICES")}
record["sum"] = value.item()
with open(os.path.join(sys.argv[1], f"rank-{dist.get_rank()}.json"), "w") as file:
    json.dump(record, file)
dist.destroy_process_group()
"""


def test_torchrun_on_ray_runs_one_torchrun_per_gpu_node(cluster, tmp_path: Path):
    # deploy/torchrun_on_ray.py: the fine-tune's launcher on a Ray cluster. Two nodes x one process, gloo.
    probe = tmp_path / "probe.py"
    probe.write_text(TORCHRUN_PROBE)
    launched = subprocess.run(
        [
            sys.executable, str(ROOT / "deploy" / "torchrun_on_ray.py"), "--address", cluster.address,
            "--nodes", "2", "--gpus-per-node", "1", "--cpus-per-node", "1", "--timeout", "60",
            "--", sys.executable, str(probe), str(tmp_path),
        ],
        capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert launched.returncode == 0, launched.stdout[-2000:] + launched.stderr[-3000:]
    records = [json.loads(path.read_text()) for path in sorted(tmp_path.glob("rank-*.json"))]
    assert sorted(record["RANK"] for record in records) == ["0", "1"]
    assert {record["WORLD_SIZE"] for record in records} == {"2"}
    assert sorted(record["GROUP_RANK"] for record in records) == ["0", "1"]  # one torchrun per node
    assert {record["sum"] for record in records} == {3.0}  # 1 + 2: the all-reduce crossed the two nodes
    # Ray handed each torchrun the GPU it reserved on its node.
    assert all(record["CUDA_VISIBLE_DEVICES"] is not None for record in records)


def test_torchrun_on_ray_gives_up_when_the_nodes_are_not_there(cluster, tmp_path: Path):
    # Three distinct GPU nodes cannot be reserved on a cluster of two: a clear message and exit status 1 once
    # --timeout has passed (on a real cluster the autoscaler would add nodes within it).
    launched = subprocess.run(
        [
            sys.executable, str(ROOT / "deploy" / "torchrun_on_ray.py"), "--address", cluster.address,
            "--nodes", "3", "--gpus-per-node", "1", "--timeout", "3", "--", "true",
        ],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert launched.returncode == 1
    assert "could not reserve 3 nodes" in launched.stderr


def test_losing_a_node_for_good_finishes_on_the_nodes_left(cluster, photo_folder: Path, tmp_path: Path):
    # No replacement this time: the build's replacement actor (num_gpus=1) fits nowhere while the surviving actor
    # holds the last GPU, so the build must carry on with the actor it has (it once waited forever here).
    process = start_build(cluster, photo_folder, tmp_path, limit=24)
    wait_for_first_commit(process, tmp_path)
    cluster.remove_node(gpu_nodes(cluster)[0])
    try:
        output = finish(process, timeout=120)
        assert "actor died" in output, "the node loss did not reach the build"
        check_exactly_once(tmp_path, planned_keys(photo_folder, limit=24))
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
        cluster.add_node(num_cpus=1, num_gpus=1)  # leave the module's cluster as it was
