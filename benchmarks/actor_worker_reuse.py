"""Does a new actor start in one of the worker processes Ray pre-starts?

Why it matters for trial start-up: every `TorchTrainer.fit` creates a Train controller and its
worker as new actors, and each boots a Python process (Ray, then torch and open_clip). Ray
keeps idle pre-started workers for tasks; if actors took them too, a
`worker_process_setup_hook` could import the training stack before a trial asks. This starts a
local cluster (2 CPUs, dashboard off), lists the idle workers (`ray::IDLE`) before each of
``--actors`` actor creations and reports whether the new actor's PID was one of them and how
long its first call took. With ``--job-env`` the job's runtime environment and the actor's
carry the same env vars (what Train's controller and worker carry), so a pool keyed by runtime
environment would match.

    python benchmarks/actor_worker_reuse.py --actors 4
    python benchmarks/actor_worker_reuse.py --actors 4 --job-env
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time

import ray

ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def idle_workers() -> set[int]:
    """PIDs of this machine's idle Ray workers (their process title is ``ray::IDLE``)."""
    listing = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return {int(line.split()[0]) for line in listing.splitlines()[1:] if "ray::IDLE" in line}


@ray.remote(num_cpus=0)
class Probe:
    def pid(self) -> int:
        return os.getpid()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--actors", type=int, default=4)
    parser.add_argument("--job-env", action="store_true",
                        help="job and actors share the runtime environment's env vars")  # fmt: skip
    args = parser.parse_args()
    runtime_env = {"env_vars": ENV} if args.job_env else None
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env=runtime_env)
    try:
        time.sleep(6)  # let the raylet pre-start its workers
        reused = 0
        for number in range(1, args.actors + 1):
            before = idle_workers()
            started = time.time()
            options = {"runtime_env": runtime_env} if runtime_env else {}
            actor = Probe.options(**options).remote()
            pid = ray.get(actor.pid.remote())
            seconds = time.time() - started
            reused += pid in before
            print(f"actor {number}: pid {pid}, {len(before)} idle workers before, "
                  f"{'a pre-started worker' if pid in before else 'a new process'}, "
                  f"first call after {seconds:.2f} s")  # fmt: skip
            ray.kill(actor)
            time.sleep(3)
        print(f"{reused} of {args.actors} actors started in a pre-started worker")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
