"""Starting or joining the Ray cluster a command runs on.

A local cluster gets its dashboard on 127.0.0.1 (a free port), and ``RAY_API_SERVER_ADDRESS``
points Ray's state API at it before any Ray process starts, so every process inherits it. Why:
Ray Train's placement-group cleaner asks the state API whether its controller is alive, and
without an address the state API follows ``/tmp/ray/ray_current_cluster``, which any earlier
``ray start`` on the machine leaves behind, pointing at a dead cluster once that one is gone.
Each TorchTrainer then waited 12 s at shutdown (the cleaner's stop timeout) for a GCS that
never answers: a third of a small trial's wall-clock on a laptop.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

from trainers.errors import InputError

API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"  # read by ray.dashboard.utils before RAY_ADDRESS
# The raylet warns ("N PYTHON worker processes have been started ... 4x the maximum expected
# startup concurrency") once live workers reach 4x this, which defaults to the node's CPUs. A
# trial on a 2-CPU laptop is 4 processes (trial actor, Train controller, its synchronization
# actor, one Train worker), so two trials at once trip it while nothing is wrong; the warning
# cannot be filtered, so local clusters start with a concurrency of at least 4.
STARTUP_CONCURRENCY_ENV = "RAY_worker_maximum_startup_concurrency"
STARTUP_CONCURRENCY = 4
# Ray Train starts a PreemptionWatcher actor per worker group (one more process per trial,
# polling the GCS every 5 s) to notice nodes a cloud is about to take away. A local cluster is
# this one machine: nothing can preempt it, so its trials start without one. Clusters joined
# with --address keep Ray's default; a user's own value wins everywhere.
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for Ray's own ports, never the defaults)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def descendant_pids(pid: int) -> list[int]:
    """PIDs of every process below ``pid``, read from /proc (Linux): what a `ray start` we
    launched spawned, so that we end exactly those and never anyone else's Ray."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def end_started(processes: Sequence[subprocess.Popen], known_pids: Iterable[int] = ()) -> None:
    """End `ray start --block` processes we launched, each in its own session: SIGTERM to its
    process group (newest first), up to 60 s to drain, then SIGKILL to whatever they spawned
    (``known_pids`` adds PIDs seen earlier). Nothing outside those processes is touched."""
    pids = sorted(set(known_pids) | {pid for p in processes for pid in descendant_pids(p.pid)})
    for process in reversed(processes):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def start_local_cluster(num_cpus: int | None = None, log_to_driver: bool = True) -> str:
    """Start a fresh local Ray cluster (never one recorded under /tmp/ray); returns its
    dashboard URL (127.0.0.1 only; token authentication stays as Ray configures it)."""
    import ray

    port = free_port()
    # Set only while the cluster starts: its processes keep them (workers inherit the raylet's
    # environment), while this process's children, e.g. a `ray job submit` to another
    # cluster, must not be redirected to this one.
    settings = {API_SERVER_ENV: f"http://127.0.0.1:{port}"}
    if STARTUP_CONCURRENCY_ENV not in os.environ:
        settings[STARTUP_CONCURRENCY_ENV] = str(max(STARTUP_CONCURRENCY, num_cpus or 0))
    if PREEMPTION_WATCHER_ENV not in os.environ:
        settings[PREEMPTION_WATCHER_ENV] = "0"
    previous = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    try:
        context = ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=port,
            log_to_driver=log_to_driver,
        )
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return f"http://{context.dashboard_url}"


def init_ray(address: str | None, log_to_driver: bool = True) -> str | None:
    """Join ``address`` or start a local cluster; returns the dashboard URL of a local one.

    With no address, a job started by ``ray job submit`` joins its cluster through the
    RAY_ADDRESS the job supervisor sets; anywhere else a fresh local cluster starts, never a
    stale one recorded under /tmp/ray by an earlier ``ray start``.
    """
    import ray

    if ray.is_initialized():
        return None
    if address is None and not os.environ.get("RAY_ADDRESS"):
        return start_local_cluster(log_to_driver=log_to_driver)
    try:
        ray.init(address=address, log_to_driver=log_to_driver)
    except ConnectionError as error:
        raise InputError(f"--address {address}: no Ray cluster there ({error})") from None
    return None
