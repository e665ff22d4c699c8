"""deploy/: the Ray cluster-launcher config, the KubeRay manifests and the Dockerfile carry what Ray and KubeRay need.

    python -m pytest -q tests/test_deploy.py

The launcher config is checked with Ray's own validator (ray.autoscaler's `prepare_config` + `validate_config`, i.e.
ray-schema.json, the check `ray up` runs first). KubeRay's CRDs are not on this machine, so the manifests are checked
against the field names of KubeRay's ray.io/v1 API reference (RayCluster: headGroupSpec, workerGroupSpecs with
groupName / replicas / minReplicas / maxReplicas; RayJob: entrypoint, rayClusterSpec, shutdownAfterJobFinishes) and
Kubernetes' rules for extended resources (a GPU request must equal its limit). `docker build` cannot run here.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
LAUNCHER_CONFIG = DEPLOY / "ray-cluster.yaml"
RAYCLUSTER = DEPLOY / "kuberay" / "raycluster.yaml"
RAYJOB = DEPLOY / "kuberay" / "rayjob.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"


def load_yaml(path: Path) -> dict:
    with path.open() as file:
        documents = list(yaml.safe_load_all(file))
    assert len(documents) == 1, f"{path.name}: expected one YAML document"
    return documents[0]


def dockerfile_args() -> dict[str, str]:
    """ARG NAME=value defaults of the Dockerfile."""
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(), flags=re.MULTILINE))


def project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def image_tag() -> str:
    # The one image every YAML runs; its tag is the package version.
    return f"registry.example.com/factory:{project_version()}"


# --- Ray cluster launcher (`ray up`) ---


def test_launcher_config_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(load_yaml(LAUNCHER_CONFIG))
    validate_config(config)  # raises on any schema violation


def test_launcher_config_has_a_head_and_an_autoscaled_gpu_worker_type():
    config = load_yaml(LAUNCHER_CONFIG)
    node_types = config["available_node_types"]
    assert config["head_node_type"] in node_types
    workers = {name: spec for name, spec in node_types.items() if name != config["head_node_type"]}
    gpu_workers = {
        name: spec for name, spec in workers.items() if spec.get("resources", {}).get("GPU", 0) >= 1
    }
    assert gpu_workers, "no worker type advertises a GPU"
    for spec in gpu_workers.values():
        # Autoscaling bounds: scale from min_workers up to max_workers, never past the cluster-wide bound.
        assert 0 <= spec["min_workers"] < spec["max_workers"] <= config["max_workers"]
        assert spec["node_config"]["InstanceType"]
    # The head runs only the driver: no actor may land on it.
    assert node_types[config["head_node_type"]]["resources"].get("CPU") == 0


def test_launcher_config_runs_the_pinned_image_and_setup_commands():
    config = load_yaml(LAUNCHER_CONFIG)
    assert config["docker"]["image"] == image_tag()
    assert config["docker"]["container_name"]
    setup = " ".join(config["setup_commands"])
    pins = dockerfile_args()
    # The setup commands check, on every node, that the image carries the versions this config was written for.
    assert pins["RAY_VERSION"] in setup and pins["TORCH_VERSION"] in setup
    assert any("ray start --head" in command for command in config["head_start_ray_commands"])
    assert any(
        "ray start --address=$RAY_HEAD_IP:6379" in command for command in config["worker_start_ray_commands"]
    )


# --- KubeRay ---


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def gpu_count(container: dict) -> int:
    resources = container.get("resources", {})
    limit = int(resources.get("limits", {}).get("nvidia.com/gpu", 0))
    request = resources.get("requests", {}).get("nvidia.com/gpu")
    # Kubernetes: an extended resource's request, when given, must equal its limit.
    assert request is None or int(request) == limit, f"{container['name']}: GPU request != limit"
    return limit


def check_raycluster_spec(spec: dict) -> None:
    pins = dockerfile_args()
    assert spec["rayVersion"] == pins["RAY_VERSION"]
    assert spec["enableInTreeAutoscaling"] is True

    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert all(isinstance(value, str) for value in head["rayStartParams"].values()), (
        "rayStartParams are strings"
    )
    (head_container,) = containers(head["template"])
    assert head_container["image"] == image_tag()
    assert gpu_count(head_container) == 0
    ports = {port["name"]: port["containerPort"] for port in head_container["ports"]}
    assert ports == {"gcs-server": 6379, "dashboard": 8265, "client": 10001}

    groups = spec["workerGroupSpecs"]
    assert len({group["groupName"] for group in groups}) == len(groups)
    gpu_groups = [group for group in groups if any(gpu_count(c) >= 1 for c in containers(group["template"]))]
    assert gpu_groups, "no worker group asks for nvidia.com/gpu"
    for group in gpu_groups:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["minReplicas"] < group["maxReplicas"], "a GPU group that cannot scale"
        for container in containers(group["template"]):
            assert container["image"] == image_tag()
            assert all(isinstance(value, str) for value in group["rayStartParams"].values())
    # Every pod gets the S3 credentials its part of the build writes with.
    for template in [head["template"], *[group["template"] for group in groups]]:
        for container in containers(template):
            assert {"secretRef": {"name": "factory-s3"}} in container["envFrom"]
        mounted = {mount["name"] for container in containers(template) for mount in container["volumeMounts"]}
        assert mounted <= {volume["name"] for volume in template["spec"]["volumes"]}


def test_raycluster_has_a_head_and_an_autoscaled_gpu_worker_group():
    manifest = load_yaml(RAYCLUSTER)
    assert manifest["apiVersion"] == "ray.io/v1"
    assert manifest["kind"] == "RayCluster"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", manifest["metadata"]["name"])  # a DNS-1123 label
    check_raycluster_spec(manifest["spec"])


def test_rayjob_runs_the_build_on_the_same_cluster_spec():
    manifest = load_yaml(RAYJOB)
    assert manifest["apiVersion"] == "ray.io/v1"
    assert manifest["kind"] == "RayJob"
    spec = manifest["spec"]
    check_raycluster_spec(spec["rayClusterSpec"])
    # One cluster definition: the one-shot RayJob builds on exactly the long-lived RayCluster's spec.
    assert spec["rayClusterSpec"] == load_yaml(RAYCLUSTER)["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["submissionMode"] in {"K8sJobMode", "HTTPMode"}


def entrypoint_arguments() -> list[str]:
    return shlex.split(load_yaml(RAYJOB)["spec"]["entrypoint"])


def option_values(arguments: list[str], name: str) -> list[str]:
    return [arguments[index + 1] for index, argument in enumerate(arguments) if argument == name]


def test_rayjob_entrypoint_builds_into_s3_on_the_running_cluster():
    arguments = entrypoint_arguments()
    assert arguments[:2] == ["factory", "build"]
    assert option_values(arguments, "--address") == ["auto"]
    (out,) = option_values(arguments, "--out")
    (manifests,) = option_values(arguments, "--manifests")
    assert out.startswith("s3://") and manifests.startswith("s3://")
    assert out.split("/")[2] == manifests.split("/")[2], "shards and manifests in one bucket"
    assert out != manifests


def test_rayjob_entrypoint_options_exist_in_the_build_command():
    from factory.cli import main

    build = main.commands["build"]
    known = {option for parameter in build.params for option in [*parameter.opts, *parameter.secondary_opts]}
    used = {argument for argument in entrypoint_arguments()[2:] if argument.startswith("--")}
    assert used <= known, f"options the build does not have: {sorted(used - known)}"


# --- Dockerfile (cannot be built here: no Docker daemon; checked as text) ---


def test_dockerfile_pins_torch_and_ray_together_on_a_matching_cuda_runtime():
    text = DOCKERFILE.read_text()
    pins = dockerfile_args()
    (base,) = re.findall(r"^FROM (\S+)$", text, flags=re.MULTILINE)
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-(?:cudnn-)?runtime-ubuntu\d+\.\d+", base)
    assert match, f"not a CUDA runtime base: {base}"
    # The torch wheels' CUDA (the index's cuXYZ) must be the base image's major.minor.
    assert pins["TORCH_INDEX_URL"].endswith(f"/cu{match.group(1)}{match.group(2)}")
    assert "torch==$TORCH_VERSION" in text and "torchvision==$TORCHVISION_VERSION" in text
    assert '"ray[default]==$RAY_VERSION"' in text
    assert re.search(r"^RUN pip install \.", text, flags=re.MULTILINE), "the project itself is installed"
    # CPU actors compile the fused ΔE kernel at run time (factory/native): the image carries a C compiler and headers.
    assert re.search(r"\bgcc libc6-dev\b", text), "no C compiler in the image"


def test_dockerfile_copies_only_what_exists_and_is_not_ignored():
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for line in re.findall(r"^COPY (.+)$", DOCKERFILE.read_text(), flags=re.MULTILINE):
        *sources, _destination = line.split()
        for source in sources:
            assert (ROOT / source).exists(), f"COPY source missing: {source}"
            assert source.split("/")[0] not in ignored, f"COPY source excluded by .dockerignore: {source}"


def test_every_yaml_and_readme_reference_points_at_a_real_file():
    readme = (DEPLOY / "README.md").read_text()
    for path in re.findall(r"\bdeploy/[\w./-]+\.(?:yaml|py|md)\b|\bdeploy/Dockerfile\b", readme):
        assert (ROOT / path).exists(), f"deploy/README.md mentions a missing file: {path}"
    assert "docker build" in readme and "cannot run" in readme


@pytest.mark.slow  # ~15 s on two busy cores: torchrun starts twice
def test_torchrun_on_ray_runs_the_command_in_each_rank_and_passes_on_its_status(capfd):
    """deploy/torchrun_on_ray.py's per-node step (run_torchrun, which builds its line with the study's
    factory.finetune.torchrun_command): torch's own launcher starts the ranks with RANK / WORLD_SIZE set, and a rank's
    exit status comes back. The placement group around it needs a multi-node cluster and is not run here."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("torchrun_on_ray", DEPLOY / "torchrun_on_ray.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    rank_line = "import os; print('rank', os.environ['RANK'], 'of', os.environ['WORLD_SIZE'], flush=True)"

    assert (
        launcher.run_torchrun(["--standalone", "--nproc-per-node=2"], [sys.executable, "-c", rank_line]) == 0
    )
    assert sorted(line for line in capfd.readouterr().out.splitlines() if line.startswith("rank")) == [
        "rank 0 of 2",
        "rank 1 of 2",
    ]
    assert (
        launcher.run_torchrun(["--standalone", "--nproc-per-node=1"], [sys.executable, "-c", "exit(3)"]) == 1
    )
