"""cluster/: the `ray up` YAMLs, the KubeRay manifests and the runtime_env, checked offline.

The `ray up` files go through the same ``prepare_config`` + ``validate_config`` that ``ray up``
runs before it contacts a cloud (Ray's JSON schema plus its min/max-worker and head-type rules),
then through this project's own contract (CPU and GPU worker types, images that match the pinned
Ray, the project installed on every node type, token auth, a loopback-only dashboard). The
manifests are parsed and the fields the KubeRay operator needs are checked. No cloud call, no
credentials, no Kubernetes. Every check is also run on a broken copy, so each is known to fail.
"""

from __future__ import annotations

import copy
import re
import shlex
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args
from ray.runtime_env import RuntimeEnv

from search_spaces.presets import preset_names

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
RAY_UP_FILES = ("aws.yaml", "gcp.yaml")
RUNTIME_ENV = CLUSTER / "runtime_env.yaml"
RAYCLUSTER = CLUSTER / "kuberay" / "raycluster.yaml"
RAYJOB = CLUSTER / "kuberay" / "rayjob.yaml"
INSTALL_COMMAND = "pip install -q -c constraints.txt -e ."
WORKING_DIR_VAR = "RAY_RUNTIME_ENV_CREATE_WORKING_DIR"


class ConfigProblem(ValueError):
    """A cluster config breaks this project's contract; the message names the field."""


def _require(condition: object, message: str) -> None:
    if not condition:
        raise ConfigProblem(message)


def _get(mapping: Any, dotted: str) -> Any:
    """``mapping["a"]["b"]`` for ``"a.b"``; ConfigProblem naming the first missing key."""
    value = mapping
    walked = []
    for key in dotted.split("."):
        walked.append(key)
        _require(isinstance(value, dict) and key in value, f"missing {'.'.join(walked)}")
        value = value[key]
    return value


def _load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path}: expected a mapping"
    return data


def _pinned_ray_version() -> str:
    """The ray version constraints.txt pins: the version every config must name."""
    pins = dict(
        line.split("==", 1)
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.lstrip().startswith("#")
    )
    return pins["ray"].strip()


def _python_tag() -> str:
    """pyproject's minimum Python as Ray's image tags spell it: ">=3.11" -> "py311"."""
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    major, minor = re.fullmatch(r">=(\d+)\.(\d+)", requires).groups()
    return f"py{major}{minor}"


RAY_VERSION = _pinned_ray_version()
PYTHON_TAG = _python_tag()
CPU_IMAGE = f"rayproject/ray:{RAY_VERSION}-{PYTHON_TAG}"
GPU_IMAGE = f"{CPU_IMAGE}-gpu"


def test_pinned_ray_is_the_installed_ray() -> None:
    # The validator below is the installed Ray's: it only speaks for the pinned version.
    assert ray.__version__ == RAY_VERSION == "2.60.0"
    assert CPU_IMAGE == "rayproject/ray:2.60.0-py311"


# --- ray up -------------------------------------------------------------------------------


def validated_ray_up(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` does before any cloud call: fill defaults, merge commands, validate."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def check_ray_up(config: dict[str, Any]) -> None:
    """Ray's validator, then this project's contract for a cluster launcher config."""
    prepared = validated_ray_up(config)
    head_type = prepared["head_node_type"]
    workers = {n: t for n, t in prepared["available_node_types"].items() if n != head_type}
    gpu_types = [n for n, t in workers.items() if t["resources"].get("GPU", 0) >= 1]
    cpu_types = [n for n, t in workers.items() if "GPU" not in t["resources"]]
    _require(gpu_types and cpu_types, "available_node_types: needs a CPU and a GPU worker type")

    for name in workers:
        raw = config["available_node_types"][name]
        _require(
            "min_workers" in raw and "max_workers" in raw,
            f"available_node_types.{name}: min_workers and max_workers must be explicit",
        )
        _require(
            0 <= raw["min_workers"] <= raw["max_workers"] and raw["max_workers"] >= 1,
            f"available_node_types.{name}: expected 0 <= min_workers <= max_workers, max >= 1",
        )
    total = sum(t["max_workers"] for t in workers.values())
    _require(
        total <= prepared["max_workers"],
        "max_workers: smaller than the sum of the worker types' max_workers",
    )

    docker = _get(prepared, "docker")
    head_image = docker.get("head_image", docker.get("image"))
    _require(head_image == CPU_IMAGE, f"docker.image: expected {CPU_IMAGE}, got {head_image}")
    for name, node_type in workers.items():
        image = (
            node_type.get("docker", {}).get("worker_image")
            or docker.get("worker_image")
            or docker.get("image")
        )
        expected = GPU_IMAGE if name in gpu_types else CPU_IMAGE
        _require(image == expected, f"{name}: image {image}, expected {expected}")

    # A node type's own worker_setup_commands replace the merged global list (Ray's updater).
    setups = {head_type: prepared["head_setup_commands"]}
    setups |= {
        n: t.get("worker_setup_commands", prepared["worker_setup_commands"])
        for n, t in workers.items()
    }
    for name, commands in setups.items():
        _require(
            any(INSTALL_COMMAND in command for command in commands),
            f"{name}: no setup command installs the project ({INSTALL_COMMAND})",
        )

    _require(
        any(remote.endswith(".ray/auth_token") for remote in prepared["file_mounts"]),
        "file_mounts: the Ray auth token is not mounted on the nodes",
    )
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        _require(
            "RAY_AUTH_MODE=token" in " ".join(prepared[key]),
            f"{key}: Ray must start with RAY_AUTH_MODE=token",
        )
    _require(
        "--dashboard-host=127.0.0.1" in " ".join(prepared["head_start_ray_commands"]),
        "head_start_ray_commands: the dashboard must listen on 127.0.0.1",
    )


@pytest.mark.parametrize("name", RAY_UP_FILES)
def test_ray_up_config_passes_rays_validator_and_our_contract(name: str) -> None:
    config = _load(CLUSTER / name)
    check_ray_up(config)
    prepared = validated_ray_up(config)
    # prepare_config gives the head max_workers 0: it never scales out.
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0
    assert prepared["available_node_types"]["gpu_worker"]["resources"]["GPU"] == 1


@pytest.mark.parametrize("name", RAY_UP_FILES)
def test_ray_up_config_never_binds_all_interfaces(name: str) -> None:
    assert "0.0.0.0" not in (CLUSTER / name).read_text()


def _parent(config: Any, path: str) -> tuple[Any, str | int]:
    """The container holding ``path``'s last part: dots separate keys, digits index lists."""
    parts: list[str | int] = [
        int(p) if p.isdigit() else p for p in re.findall(r"nvidia\.com/gpu|[^.]+", path)
    ]
    target = config
    for part in parts[:-1]:
        target = target[part]
    return target, parts[-1]


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(config: dict[str, Any]) -> None:
        target, last = _parent(config, path)
        target[last] = value

    return mutate


def _delete(path: str) -> Callable[[dict[str, Any]], None]:
    def mutate(config: dict[str, Any]) -> None:
        target, last = _parent(config, path)
        del target[last]

    return mutate


def _rename(path: str, new_key: str) -> Callable[[dict[str, Any]], None]:
    def mutate(config: dict[str, Any]) -> None:
        target, last = _parent(config, path)
        target[new_key] = target.pop(last)

    return mutate


def _drop_token_mount(config: dict[str, Any]) -> None:
    config["file_mounts"] = {
        remote: local
        for remote, local in config["file_mounts"].items()
        if not remote.endswith("auth_token")
    }


RAY_UP_BREAKAGES = {
    # Ray's own schema and rules:
    "resources removed": (_delete("available_node_types.gpu_worker.resources"), "resources"),
    "typo in a key": (
        _rename("available_node_types.cpu_worker.min_workers", "min_worker"),
        "min_worker",
    ),
    "unknown head type": (_set("head_node_type", "nope"), "head_node_type"),
    "min above max": (_set("available_node_types.cpu_worker.min_workers", 99), "max_workers"),
    # this project's contract:
    "no GPU type": (_delete("available_node_types.gpu_worker"), "GPU worker type"),
    "CPU image on GPU": (
        _set("available_node_types.gpu_worker.docker.worker_image", CPU_IMAGE),
        "gpu_worker: image",
    ),
    "other Ray image": (_set("docker.image", "rayproject/ray:2.59.0-py311"), "docker.image"),
    "GPU type not installed": (
        _set("available_node_types.gpu_worker.worker_setup_commands", []),
        "gpu_worker: no setup command",
    ),
    "no implicit max": (_delete("available_node_types.cpu_worker.max_workers"), "explicit"),
    "token not mounted": (_drop_token_mount, "auth token"),
    "global max too small": (_set("max_workers", 4), "sum of the worker types"),
    "auth off": (
        _set("worker_start_ray_commands", ["ray start --address=$RAY_HEAD_IP:6379"]),
        "RAY_AUTH_MODE",
    ),
}


@pytest.mark.parametrize("name", RAY_UP_FILES)
@pytest.mark.parametrize("breakage", sorted(RAY_UP_BREAKAGES))
def test_ray_up_check_rejects_a_broken_copy(name: str, breakage: str) -> None:
    mutate, message = RAY_UP_BREAKAGES[breakage]
    config = _load(CLUSTER / name)
    mutate(config)
    with pytest.raises((jsonschema.ValidationError, ValueError), match=re.escape(message)):
        check_ray_up(config)


# --- runtime_env ----------------------------------------------------------------------------


def check_runtime_env(data: dict[str, Any]) -> RuntimeEnv:
    """Ray's own RuntimeEnv validation plus: only fields Ray knows (Ray merely warns on others)."""
    unknown = set(data) - RuntimeEnv.known_fields
    _require(not unknown, f"runtime_env: unknown fields {sorted(unknown)}")
    return RuntimeEnv(**data)


def test_runtime_env_is_a_valid_ray_runtime_env() -> None:
    data = _load(RUNTIME_ENV)
    env = check_runtime_env(data)
    assert env.working_dir_uri() == data["working_dir"]
    assert env.pip_config()["packages"] == data["pip"]
    # A RayJob has no local checkout: the working_dir must be a remote .zip.
    url = urlparse(data["working_dir"])
    assert url.scheme == "https" and url.path.endswith(".zip")


def test_runtime_env_installs_this_checkout_with_the_pins() -> None:
    # pip expands ${VAR} in requirement lines; Ray sets only the working_dir's variable. With the
    # working_dir at this checkout the lines must name constraints.txt and an installable project.
    node_env = {WORKING_DIR_VAR: str(ROOT)}
    lines = [
        re.sub(r"\$\{(\w+)\}", lambda m: node_env[m.group(1)], line)
        for line in _load(RUNTIME_ENV)["pip"]
    ]
    assert f"-c {ROOT}/constraints.txt" in lines and (ROOT / "constraints.txt").is_file()
    assert str(ROOT) in lines and (ROOT / "pyproject.toml").is_file()


def test_runtime_env_with_local_working_dir_as_ray_job_submit_builds_it() -> None:
    # `ray job submit --runtime-env cluster/runtime_env.yaml --working-dir .`
    merged = parse_runtime_env_args(runtime_env=str(RUNTIME_ENV), working_dir=".")
    env = check_runtime_env(merged)
    assert env.working_dir_uri() == "."
    assert env.pip_config()["packages"] == _load(RUNTIME_ENV)["pip"]


@pytest.mark.parametrize(
    "broken",
    [
        {"pip": {"packages": ["s3fs"], "pip_chek": True}},
        {"env_vars": {"PYTHONUNBUFFERED": 1}},
        {"working_dir": "ftp://host/conaclip.zip"},
        {"workingdir": "."},
        {"conda": ["python=3.11"]},
    ],
    ids=["pip field typo", "env var not a string", "bad URI", "unknown field", "pip and conda"],
)
def test_runtime_env_check_rejects_a_broken_copy(broken: dict[str, Any]) -> None:
    data = {**_load(RUNTIME_ENV), **broken}
    with pytest.raises((TypeError, ValueError)):
        check_runtime_env(data)


# --- KubeRay --------------------------------------------------------------------------------


def check_manifest(doc: dict[str, Any], kind: str) -> None:
    """The fields every KubeRay custom resource needs before the operator looks at spec."""
    _require(doc.get("apiVersion") == "ray.io/v1", "apiVersion: expected ray.io/v1")
    _require(doc.get("kind") == kind, f"kind: expected {kind}")
    name = _get(doc, "metadata.name")
    _require(isinstance(name, str) and name, "metadata.name: expected a non-empty string")


def _containers(group: dict[str, Any], where: str) -> list[dict[str, Any]]:
    containers = _get(group, "template.spec.containers")
    _require(isinstance(containers, list) and containers, f"{where}: no containers")
    for container in containers:
        _require(container.get("name") and container.get("image"), f"{where}: name and image")
    mounts = {m["name"] for c in containers for m in c.get("volumeMounts", [])}
    volumes = {v["name"] for v in group["template"]["spec"].get("volumes", [])}
    _require(mounts <= volumes, f"{where}: volumeMounts without a volume: {mounts - volumes}")
    return containers


def check_raycluster_spec(spec: dict[str, Any]) -> None:
    """What the KubeRay operator needs to run an autoscaled CPU + GPU conaclip cluster."""
    _require(_get(spec, "rayVersion") == RAY_VERSION, f"rayVersion: expected {RAY_VERSION}")
    _require(_get(spec, "enableInTreeAutoscaling") is True, "enableInTreeAutoscaling: not true")
    _require(_get(spec, "authOptions.mode") == "token", "authOptions.mode: expected token")

    head = _get(spec, "headGroupSpec")
    params = _get(head, "rayStartParams")
    _require(all(isinstance(v, str) for v in params.values()), "rayStartParams: strings only")
    # The dashboard listens on the pod IP for the operator; only a ClusterIP Service keeps it
    # inside the Kubernetes cluster.
    _require(
        head.get("serviceType", "ClusterIP") == "ClusterIP",
        "headGroupSpec.serviceType: expected ClusterIP (use kubectl port-forward from outside)",
    )
    for container in _containers(head, "headGroupSpec"):
        _require(container["image"] == CPU_IMAGE, f"headGroupSpec: expected image {CPU_IMAGE}")

    groups = _get(spec, "workerGroupSpecs")
    names = {group.get("groupName") for group in groups}
    _require({"cpu", "gpu"} <= names, "workerGroupSpecs: needs groups named cpu and gpu")
    for group in groups:
        where = f"workerGroupSpecs[{group.get('groupName')}]"
        low, high = _get(group, "minReplicas"), _get(group, "maxReplicas")
        replicas = group.get("replicas", low)
        _require(
            all(isinstance(n, int) for n in (low, high, replicas))
            and 0 <= low <= replicas <= high
            and high >= 1,
            f"{where}: expected 0 <= minReplicas <= replicas <= maxReplicas, maxReplicas >= 1",
        )
        for container in _containers(group, where):
            requests = _get(container, "resources.requests")
            limits = _get(container, "resources.limits")
            for resource in ("cpu", "memory"):
                _require(resource in requests and resource in limits, f"{where}: {resource}")
            gpus = limits.get("nvidia.com/gpu")
            is_gpu_group = group["groupName"] == "gpu"
            if is_gpu_group:
                _require(
                    gpus is not None
                    and int(gpus) >= 1
                    and str(requests.get("nvidia.com/gpu")) == str(gpus),
                    f"{where}: must request and limit nvidia.com/gpu >= 1",
                )
            else:
                _require(gpus is None, f"{where}: a CPU group asks for nvidia.com/gpu")
            expected = GPU_IMAGE if is_gpu_group else CPU_IMAGE
            _require(container["image"] == expected, f"{where}: expected image {expected}")


def check_rayjob(doc: dict[str, Any], runtime_env: dict[str, Any]) -> None:
    check_manifest(doc, "RayJob")
    spec = _get(doc, "spec")
    entrypoint = _get(spec, "entrypoint")
    _require(entrypoint.startswith("conaclip ablate "), "entrypoint: must run conaclip ablate")
    tokens = shlex.split(entrypoint)
    preset = tokens[tokens.index("--preset") + 1] if "--preset" in tokens else None
    _require(preset in preset_names(), f"entrypoint: --preset {preset} is not a preset")
    for token in tokens:
        if "{" in token:
            _require(f"'{token}'" in entrypoint, f"entrypoint: quote {token} (brace expansion)")

    env_text = _get(spec, "runtimeEnvYAML")
    env = yaml.safe_load(env_text)
    _require(isinstance(env, dict), "runtimeEnvYAML: expected a YAML mapping")
    check_runtime_env(env)
    for key in ("working_dir", "pip"):
        _require(env.get(key) == runtime_env.get(key), f"runtimeEnvYAML.{key}: differs")
    if "${" in env_text:
        # K8sJobMode hands the runtime env to a shell inside double quotes.
        _require(spec.get("submissionMode") == "HTTPMode", "submissionMode: expected HTTPMode")

    _require(spec.get("shutdownAfterJobFinishes") is True, "shutdownAfterJobFinishes: not true")
    ttl = _get(spec, "ttlSecondsAfterFinished")
    _require(isinstance(ttl, int) and ttl > 0, "ttlSecondsAfterFinished: expected seconds > 0")
    check_raycluster_spec(_get(spec, "rayClusterSpec"))


def test_raycluster_manifest() -> None:
    doc = _load(RAYCLUSTER)
    check_manifest(doc, "RayCluster")
    check_raycluster_spec(doc["spec"])
    gpu = next(g for g in doc["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu")
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_rayjob_manifest() -> None:
    check_rayjob(_load(RAYJOB), _load(RUNTIME_ENV))


def test_rayjob_runs_the_same_cluster_as_raycluster() -> None:
    assert _load(RAYJOB)["spec"]["rayClusterSpec"] == _load(RAYCLUSTER)["spec"]


RAYCLUSTER_BREAKAGES = {
    "apiVersion": (_set("apiVersion", "ray.io/v1alpha1"), "apiVersion"),
    "name": (_delete("metadata.name"), "metadata.name"),
    "autoscaling": (_delete("spec.enableInTreeAutoscaling"), "enableInTreeAutoscaling"),
    "auth": (_delete("spec.authOptions"), "authOptions"),
    "rayVersion": (_set("spec.rayVersion", "2.59.0"), "rayVersion"),
    "exposed head": (_set("spec.headGroupSpec.serviceType", "LoadBalancer"), "ClusterIP"),
    "head containers": (
        _delete("spec.headGroupSpec.template.spec.containers"),
        "missing template.spec.containers",
    ),
    "min above max": (_set("spec.workerGroupSpecs.0.minReplicas", 9), "minReplicas"),
    "max missing": (_delete("spec.workerGroupSpecs.1.maxReplicas"), "maxReplicas"),
    "gpu request": (
        _delete(
            "spec.workerGroupSpecs.1.template.spec.containers.0.resources.requests.nvidia.com/gpu"
        ),
        "nvidia.com/gpu",
    ),
    "gpu image": (
        _set("spec.workerGroupSpecs.1.template.spec.containers.0.image", CPU_IMAGE),
        "expected image",
    ),
    "head image tag": (
        _set("spec.headGroupSpec.template.spec.containers.0.image", "rayproject/ray:2.60.0-py310"),
        "headGroupSpec: expected image",
    ),
    "cpu limits": (
        _delete("spec.workerGroupSpecs.0.template.spec.containers.0.resources.limits"),
        "resources.limits",
    ),
    "volume": (_delete("spec.workerGroupSpecs.0.template.spec.volumes"), "volumeMounts"),
}


@pytest.mark.parametrize("breakage", sorted(RAYCLUSTER_BREAKAGES))
def test_raycluster_check_rejects_a_broken_copy(breakage: str) -> None:
    mutate, message = RAYCLUSTER_BREAKAGES[breakage]
    doc = _load(RAYCLUSTER)
    mutate(doc)
    with pytest.raises(ConfigProblem, match=re.escape(message)):
        check_manifest(doc, "RayCluster")
        check_raycluster_spec(doc["spec"])


def _unquote_braces(doc: dict[str, Any]) -> None:
    doc["spec"]["entrypoint"] = doc["spec"]["entrypoint"].replace("'", "")


def _other_pip(doc: dict[str, Any]) -> None:
    env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
    env["pip"] = env["pip"][:-1]
    doc["spec"]["runtimeEnvYAML"] = yaml.safe_dump(env)


RAYJOB_BREAKAGES = {
    "kind": (_set("kind", "RayCluster"), "kind"),
    "entrypoint": (_set("spec.entrypoint", "python -m orchestrator.cli ablate"), "entrypoint"),
    "preset": (_set("spec.entrypoint", "conaclip ablate --preset nope"), "--preset nope"),
    "braces unquoted": (_unquote_braces, "quote"),
    "pip differs": (_other_pip, "runtimeEnvYAML.pip"),
    "runtime env not YAML": (_set("spec.runtimeEnvYAML", "- a list"), "runtimeEnvYAML"),
    "K8sJobMode": (_delete("spec.submissionMode"), "HTTPMode"),
    "shutdown": (_set("spec.shutdownAfterJobFinishes", False), "shutdownAfterJobFinishes"),
    "ttl": (_delete("spec.ttlSecondsAfterFinished"), "ttlSecondsAfterFinished"),
    "cluster spec": (_delete("spec.rayClusterSpec"), "rayClusterSpec"),
    "gpu group": (_delete("spec.rayClusterSpec.workerGroupSpecs.1"), "cpu and gpu"),
}


@pytest.mark.parametrize("breakage", sorted(RAYJOB_BREAKAGES))
def test_rayjob_check_rejects_a_broken_copy(breakage: str) -> None:
    mutate, message = RAYJOB_BREAKAGES[breakage]
    doc = _load(RAYJOB)
    mutate(doc)
    with pytest.raises(ConfigProblem, match=re.escape(message)):
        check_rayjob(doc, _load(RUNTIME_ENV))
