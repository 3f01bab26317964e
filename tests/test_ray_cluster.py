"""The local cluster's state API answers for this cluster (Ray Train's placement-group cleaner
depends on it; a stale /tmp/ray record cost 12 s per TorchTrainer before), on 127.0.0.1, and
its workers carry the settings the cluster started with."""

from __future__ import annotations

import os
import time
from urllib.parse import urlparse

import pytest

from orchestrator.ray_cluster import API_SERVER_ENV, PREEMPTION_WATCHER_ENV


@pytest.mark.integration
def test_state_api_in_a_worker_finds_this_clusters_actor(local_ray):
    ray = local_ray

    @ray.remote(num_cpus=0)
    class Probe:
        def ping(self) -> int:
            return 1

    @ray.remote(num_cpus=0)
    def actor_state(actor_id: str) -> tuple[str, float, str | None, str | None]:
        import os
        import time

        from ray.util.state import get_actor

        started = time.perf_counter()
        state = get_actor(actor_id, timeout=10)
        seconds = time.perf_counter() - started
        found = state.state if state else "NOT FOUND"
        env = os.environ
        return found, seconds, env.get(API_SERVER_ENV), env.get(PREEMPTION_WATCHER_ENV)

    probe = Probe.remote()
    assert ray.get(probe.ping.remote()) == 1
    started = time.perf_counter()
    state, seconds, api_server, watcher = ray.get(actor_state.remote(probe._actor_id.hex()))
    assert state == "ALIVE"
    # Reaching a dead GCS instead times out after 40 s; a live dashboard answers at once.
    assert seconds < 10 and time.perf_counter() - started < 30
    assert urlparse(api_server).hostname == "127.0.0.1"
    # Only the cluster's processes carry it: a `ray job submit` from here is not redirected.
    assert API_SERVER_ENV not in os.environ
    # A local cluster's trials start no preemption watcher (Ray Train reads this in the trial
    # actor, a worker like this one); a user's own setting would have been kept.
    assert watcher == os.environ.get(PREEMPTION_WATCHER_ENV, "0")
    ray.kill(probe)
