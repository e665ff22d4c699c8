"""Run one torchrun per node on a Ray cluster's GPU nodes: the streaming fine-tune on the cluster that built the data.

    python deploy/torchrun_on_ray.py --nodes 2 --gpus-per-node 1 -- \\
        factory finetune --arch edsr --shards s3://factory-datasets/shards --manifests s3://factory-datasets/manifests

Ray only places the processes: a STRICT_SPREAD placement group reserves `--gpus-per-node` GPUs on each of `--nodes`
different nodes (the autoscaler adds GPU nodes if it must), and one Ray task per bundle runs
`torchrun --nnodes N --node-rank i --nproc-per-node P --master-addr <node 0> ...` there. Inside, the trainer is
plain PyTorch DDP exactly as under a hand-started torchrun (Ray sets CUDA_VISIBLE_DEVICES to the reserved GPUs); the
consumer never imports Ray. The exit status is the first non-zero torchrun status, else 0.
"""

from __future__ import annotations

import argparse
import logging
import socket
import subprocess
import sys

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

log = logging.getLogger("torchrun_on_ray")


def rendezvous_address() -> tuple[str, int]:
    """This node's IP and a port free on it, for torchrun's static rendezvous (node rank 0 listens there)."""
    with socket.socket() as probe:
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    return ray.util.get_node_ip_address(), port


def run_torchrun(torchrun_arguments: list[str], command: list[str]) -> int:
    """torchrun on this node; returns its exit status (its output goes to the Ray driver's log)."""
    # the command runs as given (`factory finetune ...`, `python train.py ...`); the study's single-node launch
    # (factory/study/stages.py) builds its torchrun line with the same function
    from factory.finetune import torchrun_command

    return subprocess.run(torchrun_command(torchrun_arguments, command), check=False).returncode


def launch(
    command: list[str],
    *,
    nodes: int,
    gpus_per_node: int,
    nproc_per_node: int,
    cpus_per_node: float,
    timeout_s: float,
) -> int:
    bundle = {"CPU": cpus_per_node, **({"GPU": gpus_per_node} if gpus_per_node else {})}
    group = placement_group([dict(bundle) for _ in range(nodes)], strategy="STRICT_SPREAD")
    try:
        ready, _ = ray.wait([group.ready()], timeout=timeout_s)
        if not ready:
            log.error("could not reserve %d nodes with %s within %.0f s", nodes, bundle, timeout_s)
            return 1

        def on_bundle(index: int, function):
            return function.options(
                num_cpus=cpus_per_node,
                num_gpus=gpus_per_node,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    group, placement_group_bundle_index=index
                ),
            )

        address, port = ray.get(on_bundle(0, ray.remote(rendezvous_address)).remote())
        log.info("rendezvous at %s:%d, %d nodes x %d processes", address, port, nodes, nproc_per_node)
        runs = [
            on_bundle(index, ray.remote(run_torchrun)).remote(
                [
                    f"--nnodes={nodes}",
                    f"--node-rank={index}",
                    f"--nproc-per-node={nproc_per_node}",
                    f"--master-addr={address}",
                    f"--master-port={port}",
                ],
                command,
            )
            for index in range(nodes)
        ]
        statuses = ray.get(runs)
        return next((status for status in statuses if status != 0), 0)
    finally:
        remove_placement_group(group)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", default="auto", help="Ray cluster address (default: auto).")
    parser.add_argument("--nodes", type=int, required=True, help="Number of nodes (torchrun --nnodes).")
    parser.add_argument("--gpus-per-node", type=int, default=1, help="GPUs reserved per node (0: CPU, gloo).")
    parser.add_argument(
        "--nproc-per-node",
        type=int,
        default=None,
        help="Processes per node (default: --gpus-per-node, or 1).",
    )
    parser.add_argument("--cpus-per-node", type=float, default=1, help="CPUs reserved per node.")
    parser.add_argument(
        "--timeout", type=float, default=1800, help="Seconds to wait for the nodes (autoscaling)."
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the training command.")
    arguments = parser.parse_args(argv)
    command = arguments.command[1:] if arguments.command[:1] == ["--"] else arguments.command
    if not command:
        parser.error("give the training command after --")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ray.init(address=arguments.address)
    return launch(
        command,
        nodes=arguments.nodes,
        gpus_per_node=arguments.gpus_per_node,
        nproc_per_node=arguments.nproc_per_node or max(arguments.gpus_per_node, 1),
        cpus_per_node=arguments.cpus_per_node,
        timeout_s=arguments.timeout,
    )


if __name__ == "__main__":
    sys.exit(main())
