"""Scale-out shown on Ray's own autoscaling test cluster: an ablation submitted as a Ray job
grows the cluster while its trials wait and the cluster shrinks back once idle; a worker node
lost mid-trial is replaced, its trial retried, then failed with a line naming the lost node,
and ``--resume`` completes the grid; fractional GPUs pack four trials onto one logical GPU
while a fifth waits, on a machine without CUDA.

The cluster is ``ray.cluster_utils.AutoscalingCluster``'s: Ray's fake multi-node provider
(``ray/autoscaler/_private/fake_multi_node``), whose worker nodes are raylets the head's
autoscaler starts on this machine. Its head and worker node types (resources, min and max
workers), ``max_workers`` and ``upscaling_speed`` are read from ``cluster/aws.yaml``, so the
YAML and this test cannot drift. What differs from the YAML, and why:

- ``idle_timeout_minutes`` is ``IDLE_TIMEOUT_MINUTES``, not the YAML's 10 minutes, so that the
  release is observed within the test;
- each node type's ``node_config`` (EC2 instance settings) is left out: the fake provider
  starts local raylets and reads none;
- CPU counts are not scaled down: nodes declare the YAML's CPUs as Ray's logical resources,
  while each trial trains with one thread (``torch_threads: 1``), since this machine may have
  two cores.

Two things of ``AutoscalingCluster`` are not used: its ``start()`` and ``shutdown()`` force-stop
every Ray process on the machine (another user's, this test session's own cluster), and its
config builds on an ``example.yaml`` that Ray's wheel does not ship.
``LoopbackAutoscalingCluster`` starts the head as ``start()`` does (``RAY_FAKE_CLUSTER=1``,
``AUTOSCALER_UPDATE_INTERVAL_S=1``, ``--autoscaling-config``), but on free ports, with its own
temp dir and token, and ends exactly the processes it started.

Every wait polls a condition with a deadline and fails saying what did not happen.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_TYPE
from ray.cluster_utils import AutoscalingCluster
from test_ablation import data_flags  # the same tiny data and teacher flags
from test_job_submit import own_port_flags

from orchestrator.ray_cluster import (
    API_SERVER_ENV,
    STARTUP_CONCURRENCY,
    STARTUP_CONCURRENCY_ENV,
    descendant_pids,
    free_port,
)

REPO = Path(__file__).resolve().parents[1]
AWS_YAML = REPO / "cluster" / "aws.yaml"
BIN = Path(sys.executable).parent
IDLE_TIMEOUT_MINUTES = 0.2
# Seconds without a raylet's heartbeat before the autoscaler takes its node for lost and
# replaces it (Ray's default is 30); long enough that a live raylet on two busy cores keeps
# its node.
HEARTBEAT_TIMEOUT_S = 10
POLL_S = 0.5
# Worker-node processes carry the id the fake provider gave their node in this variable.
NODE_ID_ENV = "RAY_OVERRIDE_NODE_ID_FOR_TESTING"


def wait_for(condition: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Poll ``condition`` every ``POLL_S`` until it returns something true, and return that;
    an exception from it counts as not yet (a store or API not up yet). AssertionError naming
    ``what`` (and the last exception) after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last: BaseException | None = None
    while True:
        try:
            value = condition()
        except Exception as error:  # not there yet: a missing store, a refused connection
            value, last = None, error
        if value:
            return value
        if time.monotonic() > deadline:
            detail = f" (last error: {type(last).__name__}: {last})" if last else ""
            raise AssertionError(f"{what}: not within {timeout_s:g} s{detail}")
        time.sleep(POLL_S)


def aws_cluster() -> dict[str, Any]:
    """cluster/aws.yaml's autoscaling settings: the head's resources, each worker node type's
    resources and min/max workers, the cluster's max_workers and upscaling_speed."""
    config = yaml.safe_load(AWS_YAML.read_text())
    head = config["head_node_type"]
    types = config["available_node_types"]
    return {
        "head_resources": dict(types[head]["resources"]),
        "worker_node_types": {
            name: {
                "resources": dict(spec["resources"]),
                "min_workers": spec.get("min_workers", 0),
                "max_workers": spec["max_workers"],
                "node_config": {},
            }
            for name, spec in types.items()
            if name != head
        },
        "max_workers": config["max_workers"],
        "upscaling_speed": config["upscaling_speed"],
    }


def _start_time(pid: int) -> int | None:
    """The kernel's start tick of ``pid`` (field 22 of /proc/<pid>/stat), None when gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {key.decode(errors="replace"): value.decode(errors="replace") for key, value in pairs}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


class LoopbackAutoscalingCluster(AutoscalingCluster):
    """``AutoscalingCluster`` on free ports of this machine, with its own temp dir and auth
    token, ended by the PIDs it started (never ``ray stop``).

    ``start()`` runs ``ray start --head --block`` in a session of its own and returns once the
    dashboard answers; the head's autoscaler then starts and stops worker nodes as the fake
    provider does. ``shutdown()`` ends the head's process group and every process seen below
    it (``track()`` records them while the test runs; a PID is signalled only while it still
    has the start time it was recorded with)."""

    def __init__(
        self,
        root: Path,
        head_resources: dict[str, float],
        worker_node_types: dict[str, Any],
        **config_kwargs: Any,
    ) -> None:
        import ray._private.services as services

        self.root = root
        # Unix socket paths under the temp dir must stay short (about 100 bytes).
        self.temp_dir = Path(tempfile.mkdtemp(prefix="crs-", dir="/tmp"))
        self.node_ip = services.get_node_ip_address()
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.token = secrets.token_hex(32)
        self.head: subprocess.Popen | None = None
        self.seen: dict[int, int] = {}  # pid -> start tick
        self.env: dict[str, str] = {}
        super().__init__(dict(head_resources), worker_node_types, **config_kwargs)

    def _generate_config(
        self, head_resources, worker_node_types, autoscaler_v2=False, **config_kwargs
    ) -> dict[str, Any]:
        """The config ``AutoscalingCluster`` builds (worker types, the fake head type with no
        workers of its own), from the fake provider's settings instead of example.yaml; the
        provider is told the GCS address, which is not Ray's default port here."""
        assert not autoscaler_v2, "cluster/aws.yaml runs Ray's default autoscaler (v1)"
        config = {
            "cluster_name": "conaclip-fake",
            "max_workers": 8,
            "upscaling_speed": 1.0,
            "idle_timeout_minutes": 5,
            "provider": {
                "type": "fake_multinode",
                "use_node_id_as_ip": True,
                "disable_node_updaters": True,
                "disable_launch_config_check": True,
                "gcs_address": f"{self.node_ip}:{self.gcs_port}",
            },
            "available_node_types": {
                **copy.deepcopy(worker_node_types),
                FAKE_HEAD_NODE_TYPE: {
                    "resources": dict(head_resources),
                    "node_config": {},
                    "max_workers": 0,
                },
            },
            "head_node_type": FAKE_HEAD_NODE_TYPE,
            "auth": {},
            "docker": {},
            "file_mounts": {},
            "cluster_synced_files": [],
            "file_mounts_sync_continuously": False,
            "rsync_exclude": [],
            "rsync_filter": [],
            "initialization_commands": [],
            "setup_commands": [],
            "head_setup_commands": [],
            "worker_setup_commands": [],
            "head_start_ray_commands": [],
            "worker_start_ray_commands": [],
        }
        config.update(config_kwargs)
        return config

    def start(self, _system_config=None, override_env=None) -> None:
        token_file = self.root / "auth_token"
        token_file.write_text(self.token)
        token_file.chmod(0o600)
        config_file = self.root / "autoscaling.json"
        config_file.write_text(json.dumps(self._config))
        resources = dict(self._head_resources)
        command = [
            str(BIN / "ray"), "start", "--head", "--block",
            f"--autoscaling-config={config_file}", f"--temp-dir={self.temp_dir}",
            "--port", str(self.gcs_port),
            "--num-cpus", str(int(resources.pop("CPU", 0))),
            "--num-gpus", str(int(resources.pop("GPU", 0))),
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
            *own_port_flags(), "--disable-usage-stats",
        ]  # fmt: skip
        if resources:
            command.append(f"--resources={json.dumps(resources)}")
        self.env = {
            **os.environ,
            "PATH": f"{BIN}:{os.environ['PATH']}",
            "PYTHONUNBUFFERED": "1",
            # Token authentication, as on every cluster of cluster/: each process of this
            # cluster (worker nodes and the job's driver inherit the head's environment)
            # presents this token, and so does every client below.
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token_file),
            # What AutoscalingCluster.start sets.
            "RAY_FAKE_CLUSTER": "1",
            "AUTOSCALER_UPDATE_INTERVAL_S": "1",
            "AUTOSCALER_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_TIMEOUT_S),
            # The GCS notices a dead raylet after 5 missed checks; one a second, not every 3 s.
            "RAY_health_check_period_ms": "1000",
            # As orchestrator.ray_cluster sets for a local cluster: Train's placement-group
            # cleaner asks this cluster's state API, and the head, which has no CPUs, starts
            # its trial actors and Train controllers more than one at a time.
            API_SERVER_ENV: self.dashboard,
            STARTUP_CONCURRENCY_ENV: str(STARTUP_CONCURRENCY),
            **(override_env or {}),
        }
        log = (self.root / "head.log").open("w")
        self.head = subprocess.Popen(
            command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        wait_for(self._answers, 120, f"Ray dashboard at {self.dashboard} (see {log.name})")

    def _answers(self) -> bool:
        self.track()
        if self.head is not None and self.head.poll() is not None:
            raise AssertionError(f"ray start --head exited with {self.head.returncode}")
        return bool(self.nodes())

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def api(self, path: str) -> Any:
        request = urllib.request.Request(self.dashboard + path, headers=self.headers)
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def nodes(self) -> list[dict[str, Any]]:
        """Ray's state API: every node the GCS knows, dead ones included."""
        return self.api("/api/v0/nodes?detail=1&limit=1000")["data"]["result"]["result"]

    def placement_groups(self) -> list[dict[str, Any]]:
        return self.api("/api/v0/placement_groups?detail=1&limit=1000")["data"]["result"]["result"]

    def actors(self) -> list[dict[str, Any]]:
        """Ray's state API: every actor the GCS knows, dead ones included."""
        return self.api("/api/v0/actors?detail=1&limit=10000")["data"]["result"]["result"]

    def head_node_id(self) -> str:
        return next(n["node_id"] for n in self.nodes() if n["is_head_node"])

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard, headers=self.headers)

    def track(self) -> list[int]:
        """Record the processes now below the head; returns their PIDs."""
        assert self.head is not None
        pids = descendant_pids(self.head.pid)
        for pid in pids:
            started = _start_time(pid)
            if started is not None:
                self.seen.setdefault(pid, started)
        return pids

    def node_processes(self, node_id: str) -> list[int]:
        """This cluster's processes of worker node ``node_id``: its raylet, agents, workers."""
        return [pid for pid in self.track() if _environ(pid).get(NODE_ID_ENV) == node_id]

    def lose_node(self, node_id: str) -> list[int]:
        """SIGKILL every process of worker node ``node_id`` at once, as a machine that
        vanishes (a reclaimed spot instance) takes them; returns the PIDs."""
        pids = self.node_processes(node_id)
        assert pids, f"no process of node {node_id} found"
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return pids

    def worker_logs(self) -> str:
        """Every worker's stdout on every node of this cluster (they share the temp dir)."""
        return "".join(
            path.read_text(errors="replace")
            for path in sorted(self.temp_dir.glob("session_*/logs/worker-*.out"))
        )

    def shutdown(self) -> None:
        if self.head is None:
            return
        self.track()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.head.pid, signal.SIGTERM)
        try:  # nothing here needs a graceful stop: a short grace, then SIGKILL
            self.head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.head.pid, signal.SIGKILL)
            self.head.wait(timeout=30)
        for pid, started in self.seen.items():
            if _start_time(pid) == started:  # still the process we saw, not a reused PID
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.head = None
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@dataclass
class Sample:
    """What Ray's state API said at one moment."""

    at: float
    workers: dict[str, dict[str, Any]]  # alive worker nodes: id -> resources_total
    dead: set[str]
    pending: list[dict[str, float]]  # bundles of placement groups not placed yet
    placed: list[tuple[str, dict[str, float]]]  # (node id, bundle) of created groups


@dataclass
class Recording:
    samples: list[Sample] = field(default_factory=list)

    def first_alive(self) -> dict[str, float]:
        """Worker node id -> when it was first seen alive."""
        first: dict[str, float] = {}
        for sample in self.samples:
            for node in sample.workers:
                first.setdefault(node, sample.at)
        return first

    def peak_workers(self) -> int:
        return max((len(s.workers) for s in self.samples), default=0)


def _bundles(group: dict[str, Any]) -> list[dict[str, Any]]:
    return group.get("bundles") or []


def sample(cluster: LoopbackAutoscalingCluster) -> Sample:
    nodes = cluster.nodes()
    groups = cluster.placement_groups()
    return Sample(
        at=time.time(),
        workers={
            n["node_id"]: n["resources_total"]
            for n in nodes
            if not n["is_head_node"] and n["state"] == "ALIVE"
        },
        dead={n["node_id"] for n in nodes if n["state"] == "DEAD"},
        pending=[
            b["unit_resources"]
            for g in groups
            if g["state"] in ("PENDING", "RESCHEDULING")
            for b in _bundles(g)
        ],
        placed=[
            (b.get("node_id") or "", b["unit_resources"])
            for g in groups
            if g["state"] == "CREATED"
            for b in _bundles(g)
        ],
    )


@contextlib.contextmanager
def recording(cluster: LoopbackAutoscalingCluster) -> Iterator[Recording]:
    """Samples of nodes and placement groups every ``POLL_S`` while the block runs."""
    record, stop = Recording(), threading.Event()

    def poll() -> None:
        while not stop.is_set():
            with contextlib.suppress(Exception):  # a busy dashboard: the next poll answers
                record.samples.append(sample(cluster))
                cluster.track()
            stop.wait(POLL_S)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield record
    finally:
        stop.set()
        thread.join(timeout=30)
    with contextlib.suppress(Exception):
        record.samples.append(sample(cluster))


@dataclass
class JobResult:
    status: str
    logs: str


def submit(cluster: LoopbackAutoscalingCluster, argv: list[str]) -> str:
    """Submit ``argv`` as a Ray job through Ray's job-submission client.

    No ``working_dir``: this checkout is installed in the environment every node here runs
    (``tests/test_job_submit.py`` covers ``--working-dir .``), and the fake nodes share one
    session directory, so the first node whose runtime-env agent drops its unpacked copy of
    the package deletes every node's copy, the job driver's working directory among them."""
    client = cluster.client()
    # The head's job agent comes up a little after the dashboard.
    return wait_for(
        lambda: client.submit_job(entrypoint=shlex.join(argv)),
        120,
        "job submission (the head's job agent)",
    )


def finish(cluster: LoopbackAutoscalingCluster, job: str, timeout_s: float) -> JobResult:
    """The job's terminal status and logs; AssertionError with the log's tail (after stopping
    the job) when it does not end within ``timeout_s``."""
    from ray.job_submission import JobStatus

    client = cluster.client()
    try:
        status = wait_for(
            lambda: (s := client.get_job_status(job)).is_terminal() and s, timeout_s, f"job {job}"
        )
    except AssertionError as late:
        with contextlib.suppress(Exception):
            client.stop_job(job)
        raise AssertionError(f"{late}\n{client.get_job_logs(job)[-6000:]}") from None
    return JobResult(JobStatus(status).value, client.get_job_logs(job))


def run_job(cluster: LoopbackAutoscalingCluster, argv: list[str], timeout_s: float) -> JobResult:
    return finish(cluster, submit(cluster, argv), timeout_s)


@pytest.fixture(scope="module")
def aws_fake_cluster(tmp_path_factory):
    """cluster/aws.yaml's node types on Ray's autoscaling test cluster, for this module."""
    settings = aws_cluster()
    cluster = LoopbackAutoscalingCluster(
        tmp_path_factory.mktemp("aws-fake"),
        settings["head_resources"],
        settings["worker_node_types"],
        max_workers=settings["max_workers"],
        upscaling_speed=settings["upscaling_speed"],
        idle_timeout_minutes=IDLE_TIMEOUT_MINUTES,
    )
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.shutdown()


def _alive_workers(cluster: LoopbackAutoscalingCluster) -> list[str]:
    return [
        n["node_id"] for n in cluster.nodes() if not n["is_head_node"] and n["state"] == "ALIVE"
    ]


def _wait_released(cluster: LoopbackAutoscalingCluster, what: str) -> None:
    wait_for(
        lambda: not _alive_workers(cluster),
        IDLE_TIMEOUT_MINUTES * 60 + 60,
        f"{what}: worker nodes released after the idle timeout",
    )


def assert_trial_drivers_on_head(cluster: LoopbackAutoscalingCluster) -> None:
    """Every Tune trial actor (``ImplicitFunc``) and Train controller the cluster ever ran
    sat on the head, every Train worker on a worker node (``TRIAL_DRIVER_RESOURCES``)."""
    head = cluster.head_node_id()
    nodes_of: dict[str, set[str]] = {}
    for actor in cluster.actors():
        nodes_of.setdefault(actor["class_name"], set()).add(actor["node_id"])
    assert nodes_of.get("ImplicitFunc") == {head}, nodes_of
    assert nodes_of.get("TrainController") == {head}, nodes_of
    assert nodes_of.get("RayTrainWorker") and head not in nodes_of["RayTrainWorker"], nodes_of


def _spec(*argv: str):
    from orchestrator.ablate_cli import build_spec
    from orchestrator.cli import build_parser

    return build_spec(build_parser().parse_args(["ablate", "--preset", "smoke", *argv]))[0]


def test_an_explicit_max_concurrent_trials_is_honoured_as_given(monkeypatch):
    import ray

    from orchestrator.ablation import max_concurrent

    # An autoscaling cluster before its first worker node: the head holds no CPU.
    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 0.0, "memory": 2.0**30})
    assert max_concurrent(_spec("--max-concurrent-trials", "3")) == 3
    assert max_concurrent(_spec()) == 1  # unset: what the free resources hold, at least one
    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 4.0})
    assert max_concurrent(_spec()) == 4
    assert max_concurrent(_spec("--max-concurrent-trials", "2")) == 2


def _unreachable_worker(node_id: str):
    """A Train worker's health-check failure as Ray Train builds it when the worker's node
    vanished: its message names the worker (with its node_id), the poll met a broken link."""
    from ray.exceptions import ActorUnavailableError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    info = (f"A worker health check failed.\nWorker info: Worker(\n  metadata=ActorMetadata(\n"
            f"    hostname='h',\n    node_id='{node_id}',\n  ),\n)")  # fmt: skip
    link = ActorUnavailableError("RpcError: recvmsg:Connection reset by peer", b"\x01" * 16)
    return WorkerHealthCheckFailedError(info, link)


def test_a_worker_lost_with_its_node_is_named_with_the_node_ray_declared_dead(monkeypatch):
    import ray
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    from orchestrator import trial

    node = "f" * 51 + "00003"
    unreachable = _unreachable_worker(node)
    dead = {"NodeID": node, "Alive": False, "DeathReasonMessage": "health check failed"}
    table = [{"NodeID": "0" * 56, "Alive": True}, dead]
    monkeypatch.setattr(ray, "nodes", lambda: table)
    error = WorkerGroupError("rank 0 failed", {0: unreachable})
    assert trial.failure_line(error, trial.ScalingSpec()) == (
        f"worker rank 0 lost with its node: node {node} died (health check failed)"
    )
    # The node alive after the wait: the line says what the health check met.
    dead.update(Alive=True)
    monkeypatch.setattr(trial, "NODE_DEATH_WAIT_S", 0.0)
    assert trial.lost_node_line(unreachable) is None
    assert trial.failure_line(error, trial.ScalingSpec()) == (
        "worker rank 0 failed its health check: ActorUnavailableError: The actor "
        f"{'01' * 16} is unavailable: RpcError: recvmsg:Connection reset by peer. The task may "
        "or may not have been executed on the actor."
    )

    # Failures that say for themselves what happened never ask the GCS.
    def no_lookup():
        raise AssertionError("asked the GCS")

    monkeypatch.setattr(ray, "nodes", no_lookup)
    died = WorkerHealthCheckFailedError(
        "A worker health check failed.",
        RuntimeError("The actor died because its node has died. Node Id: ab\n\tthe actor's "
                     "node was terminated expectedly: Terminated by autoscaler."),
    )  # fmt: skip
    assert trial.lost_node_line(died) == (
        "The actor died because its node has died. Node Id: ab; the actor's node was "
        "terminated expectedly: Terminated by autoscaler."
    )
    killed = WorkerHealthCheckFailedError("A worker health check failed.", RuntimeError("exit"))
    assert trial.lost_node_line(killed) is None
    assert trial.lost_node_line(RuntimeError(f"node_id='{node}'")) is None
    # A trial actor that died with its node (not on the head) says so too.
    assert trial.error_reason(RuntimeError("The actor died because its node has died.")) == (
        "the trial's own actor died with its node: The actor died because its node has died."
    )


def test_gpu_packing_benchmark_refuses_without_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: the benchmark would measure, not refuse")
    out = tmp_path / "gpu_packing.json"
    # Run as a user runs it, on this machine's real (absent) CUDA.
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_packing.py"), "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert not out.exists()  # no figure without a GPU
    assert "no CUDA device" in done.stderr


GPU_TRIALS = 5


@pytest.mark.integration
def test_fractional_gpus_pack_four_trials_on_one_logical_gpu_while_a_fifth_waits(
    tiny_shapes, tiny_teacher, tmp_path
):
    """A head that declares one logical GPU (``--num-gpus 1`` on a machine without CUDA) and
    eight CPUs, no worker node types; five trials of ``--gpus-per-worker 0.25`` that hold
    their GPU share and train on CPU (``device: cpu``), all five started at once
    (``--max-concurrent-trials 5``), so that Ray's scheduler, not conaclip, decides who waits.
    Asserted: Ray placed four trials' GPU shares at once, the whole GPU and never more, while
    the fifth trial's share waited in a pending placement group, placed only once one of the
    four had been given back; each trial's Train worker held the GPU ids Ray handed it
    (``ray.get_gpu_ids()``: the cluster's one GPU) and ``CUDA_VISIBLE_DEVICES`` named the
    same; every trial finished and is in MLflow once."""
    from orchestrator import tracking

    root = tmp_path / "cluster"
    root.mkdir()
    cluster = LoopbackAutoscalingCluster(root, {"CPU": 8, "GPU": 1}, {})
    out, name = tmp_path / "ablate", "gpu-packing"
    settings = tmp_path / "trial.yaml"
    settings.write_text("device: cpu\ntorch_threads: 1\n")
    argv = ["conaclip", "ablate", "--pairs", "intra_ts:infonce", "--seeds", str(GPU_TRIALS),
            "--name", name, "--out", str(out), "--address", "auto",
            *data_flags(tiny_shapes, tiny_teacher, tmp_path / "home"), "--no-teacher-cache",
            "--config", str(settings), "--student", "conaclip-student-xs", "--steps", "6",
            "--eval-every", "6", "--batch-size", "8", "--cpus-per-worker", "1",
            "--gpus-per-worker", "0.25", "--max-concurrent-trials", str(GPU_TRIALS)]  # fmt: skip
    try:
        cluster.start()
        with recording(cluster) as record:
            job = run_job(cluster, argv, timeout_s=420)
        logs = cluster.worker_logs()
    finally:
        cluster.shutdown()
    assert job.status == "SUCCEEDED", job.logs[-6000:]

    shares = [
        (
            [b["GPU"] for _, b in s.placed if b.get("GPU")],
            [b["GPU"] for b in s.pending if b.get("GPU")],
        )
        for s in record.samples
    ]
    assert max(len(held) for held, _ in shares) == 4, shares
    assert max(sum(held) for held, _ in shares) == pytest.approx(1.0)
    # Ray held the fifth back: its share waited while four held the whole GPU ...
    waited = [i for i, (held, waiting) in enumerate(shares) if len(held) == 4 and waiting]
    assert waited, shares
    assert all(waiting == [0.25] for _, waiting in (shares[i] for i in waited)), shares
    # ... and it ran (below) with never more than four shares placed: only once one of the
    # four had given its share back.

    runs = tracking.runs_frame(f"sqlite:///{out}/mlruns.db", name)
    assert sorted(runs["params.seed"].astype(int)) == list(range(GPU_TRIALS))
    assert set(runs["tags.conaclip.status"]) == {"FINISHED"}
    assert set(runs["params.gpus_per_worker"]) == {"0.25"}
    assert set(runs["params.device"]) == {"cpu"}

    held = {
        run: (json.loads(ids), visible)
        for run, ids, visible in re.findall(
            r"Train worker rank 0 of run trial-(\S+) holds GPU ids (\[[^\]]*\]) "
            r"\(CUDA_VISIBLE_DEVICES=([^)]*)\) and trains on cpu",
            logs,
        )
    }
    assert set(held) == set(runs["tags.conaclip.trial_id"]), (held, logs[-4000:])
    assert all(value == (["0"], "0") for value in held.values()), held


@pytest.mark.integration
def test_ablation_job_adds_nodes_while_trials_wait_and_releases_them_when_idle(
    aws_fake_cluster, tiny_shapes, tiny_teacher, tmp_path, capsys
):
    """The smoke grid (3 trials) as a Ray job on a head with no CPUs: each trial reserves half
    a cpu_worker, so the grid needs two. Asserted: worker nodes were added only after trials
    were waiting for them, only of the CPU type (the trials ask for no GPU), two of them (the
    autoscaler packs two trials a node); trial actors and Train controllers ran on the head,
    Train workers on the added nodes; every trial finished and is in MLflow exactly once;
    `conaclip table` and `conaclip best` read the result; each node went away once it had been
    idle for the idle timeout, and not before."""
    from orchestrator import tracking
    from orchestrator.cli import main

    cluster = aws_fake_cluster
    cpu_node = aws_cluster()["worker_node_types"]["cpu_worker"]["resources"]
    out, name = tmp_path / "ablate", "scale-out"
    settings = tmp_path / "trial.yaml"
    settings.write_text("torch_threads: 1\n")
    argv = ["conaclip", "ablate", "--preset", "smoke", "--name", name, "--out", str(out),
            "--address", "auto", *data_flags(tiny_shapes, tiny_teacher, tmp_path / "home"),
            "--no-teacher-cache", "--config", str(settings),
            "--cpus-per-worker", str(cpu_node["CPU"] / 2),
            "--max-concurrent-trials", "3"]  # fmt: skip
    assert not _alive_workers(cluster), "the cluster starts with no worker node"
    with recording(cluster) as record:
        job = run_job(cluster, argv, timeout_s=480)
        assert job.status == "SUCCEEDED", job.logs[-6000:]
        _wait_released(cluster, "after the ablation")
    released = time.time()

    added = record.first_alive()
    assert len(added) == 2 == record.peak_workers(), added
    for node, seen in added.items():
        # Trials were waiting (placement groups asking for CPUs) before the node came up.
        assert any(
            s.at < seen and any(b.get("CPU", 0) >= cpu_node["CPU"] / 2 for b in s.pending)
            for s in record.samples
        ), f"node {node} came up with no trial waiting"
        resources = next(s.workers[node] for s in record.samples if node in s.workers)
        assert resources.get("CPU") == cpu_node["CPU"] and not resources.get("GPU"), resources
    for node in added:
        busy = [s.at for s in record.samples if any(n == node for n, _ in s.placed)]
        gone = [s.at for s in record.samples if node in s.dead]
        assert busy, f"no trial ever ran on node {node}"
        assert gone and gone[0] <= released, f"node {node} was not released"
        # Released no earlier than the idle timeout after its last trial let go of it.
        assert gone[0] - busy[-1] >= IDLE_TIMEOUT_MINUTES * 60, (node, busy[-1], gone[0])
    assert_trial_drivers_on_head(cluster)

    uri = f"sqlite:///{out}/mlruns.db"
    runs = tracking.runs_frame(uri, name)
    names = ["baseline", "baseline+inter_ts:sym_kl", "baseline+intra_ts:sd"]
    assert sorted(runs["params.pair_set"]) == names  # each exactly once
    assert set(runs["tags.conaclip.status"]) == {"FINISHED"}
    assert (runs["metrics.step"] == 6).all()

    capsys.readouterr()
    assert main(["table", "--out", str(out), "--experiment", name]) == 0
    table_text = capsys.readouterr().out
    assert all(pair_set in table_text for pair_set in names)
    assert main(["best", "--out", str(out), "--experiment", name]) == 0
    assert capsys.readouterr().out.startswith("best pair set by rsum: ")


def _train_workers(cluster: LoopbackAutoscalingCluster) -> dict[int, str]:
    """PID -> worker node id of every Ray Train worker process of this cluster."""
    return {
        pid: _environ(pid).get(NODE_ID_ENV, "")
        for pid in cluster.track()
        if "RayTrainWorker" in _cmdline(pid)
    }


def _run_step(uri: str, name: str, run_id: str | None = None) -> tuple[str, float] | None:
    """(run id, step reached) of ``run_id``, else of the run furthest along; None before any."""
    from orchestrator import tracking

    runs = tracking.runs_frame(uri, name)
    if runs.empty or "metrics.step" not in runs:
        return None
    if run_id is not None:
        runs = runs[runs["run_id"] == run_id]
    best = runs.sort_values("metrics.step").iloc[-1]
    return str(best["run_id"]), float(best["metrics.step"])


@pytest.mark.integration
@pytest.mark.faults
def test_lost_worker_node_is_replaced_its_trial_retried_then_failed_and_resume_completes(
    aws_fake_cluster, tiny_shapes, tiny_teacher, tmp_path
):
    """Two trials, one at a time, each holding a whole cpu_worker; the first trial's node is
    lost mid-training, and then the node its retry runs on. Asserted: after the first loss the
    autoscaler brings up a new node and the trial is retried there (Train's ``max_failures``
    is 1) from its checkpoint; after the second the trial ends FAILED with a line naming the
    node Ray declared dead, while the other trial finishes; ``conaclip ablate --resume`` then
    finishes the failed trial, and MLflow holds one FINISHED run per (pair set, seed), the
    failed trial's the same run as before, its steps never going back; no trial actor or
    Train controller was lost with a node (they run on the head)."""
    from orchestrator import tracking

    cluster = aws_fake_cluster
    cpu_node = aws_cluster()["worker_node_types"]["cpu_worker"]["resources"]
    out, name, steps = tmp_path / "ablate", "node-loss", 30
    uri = f"sqlite:///{out}/mlruns.db"
    settings = tmp_path / "trial.yaml"
    settings.write_text("torch_threads: 1\n")
    argv = ["conaclip", "ablate", "--pairs", "intra_ts:infonce;intra_ts:sd", "--name", name,
            "--out", str(out), "--address", "auto",
            *data_flags(tiny_shapes, tiny_teacher, tmp_path / "home"), "--no-teacher-cache",
            "--config", str(settings), "--student", "conaclip-student-xs",
            "--steps", str(steps), "--eval-every", "5", "--batch-size", "8",
            "--cpus-per-worker", str(cpu_node["CPU"]), "--max-concurrent-trials", "1"]  # fmt: skip
    lost: list[str] = []
    with recording(cluster) as record:
        job = submit(cluster, argv)
        # The first trial has a checkpoint (one per report, every 5 steps).
        victim, _ = wait_for(
            lambda: (r := _run_step(uri, name)) and r[1] >= 5 and r, 300, "a trial at step 5"
        )
        workers = wait_for(lambda: _train_workers(cluster), 60, "the trial's Train worker")
        assert len(set(workers.values())) == 1, workers  # one trial at a time
        lost.append(next(iter(workers.values())))
        cluster.lose_node(lost[0])
        reached = _run_step(uri, name, victim)[1]
        # Retried on a node the autoscaler brought up for it, reporting beyond the loss.
        wait_for(
            lambda: (
                _run_step(uri, name, victim)[1] > reached
                and set(_train_workers(cluster).values()) - set(lost)
            ),
            300,
            f"the lost node's trial retried on a new node and reporting past step {reached:g}",
        )
        (retry_node,) = set(_train_workers(cluster).values()) - set(lost)
        lost.append(retry_node)
        cluster.lose_node(retry_node)
        first = finish(cluster, job, timeout_s=420)
    runs = tracking.runs_frame(uri, name)
    failed = runs[runs["run_id"] == victim].iloc[0]
    assert first.status == "FAILED", first.logs[-6000:]  # exit 1: a trial failed
    assert failed["tags.conaclip.status"] == "FAILED"
    other = runs[runs["run_id"] != victim]
    assert list(other["tags.conaclip.status"]) == ["FINISHED"]
    reason = re.search(rf"FAILED {re.escape(failed['params.pair_set'])} seed 0: (.+)", first.logs)
    assert reason, first.logs[-6000:]
    # The line names what happened: the retry's worker went with its node, which Ray declared
    # dead; MLflow's run holds the same line.
    assert f"worker rank 0 lost with its node: node {retry_node} died (" in reason.group(1), (
        reason.group(1)
    )
    assert failed["tags.conaclip.error"].startswith(reason.group(1).split("; details in")[0])

    alive_after = record.first_alive()
    for node in lost:
        assert any(node in s.dead for s in record.samples), f"Ray never marked {node} dead"
    replacements = [n for n in alive_after if n not in lost]
    assert replacements, "no node replaced the lost ones"

    resumed = run_job(cluster, ["conaclip", "ablate", "--resume", "--out", str(out),
                                "--name", name, "--address", "auto"], timeout_s=420)  # fmt: skip
    assert resumed.status == "SUCCEEDED", resumed.logs[-6000:]
    runs = tracking.runs_frame(uri, name)
    assert sorted(runs["params.pair_set"]) == ["intra_ts:infonce", "intra_ts:sd"]
    assert set(runs["tags.conaclip.status"]) == {"FINISHED"}
    assert (runs["metrics.step"] == steps).all()
    assert victim in set(runs["run_id"])  # the same run, finished by --resume
    history = tracking.client(uri).get_metric_history(victim, "step")
    reported = [int(m.value) for m in sorted(history, key=lambda m: m.timestamp)]
    # Each retry and the resume went on from a checkpoint: the steps never go back.
    assert reported == sorted(reported) and reported[-1] == steps, reported
    # No lost node took a trial actor or a Train controller with it: they ran on the head.
    assert_trial_drivers_on_head(cluster)
