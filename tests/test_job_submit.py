"""`ray job submit --working-dir . -- conaclip ablate ...` against a real head started with
`ray start --head` on free loopback ports; the head is ended by its own process group and PIDs,
never `ray stop`."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from orchestrator.ray_cluster import descendant_pids, end_started, free_port

REPO = Path(__file__).resolve().parents[1]


def own_port_flags() -> list[str]:
    """`ray start --head` flags giving each of the head's other listeners a free port of its
    own: another Ray cluster on this machine (the test session's, or a user's) holds the
    defaults, and a clash silently disables the job agent."""
    flags = ["--ray-client-server-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port",
             "--node-manager-port", "--object-manager-port"]  # fmt: skip
    return [item for flag in flags for item in (flag, str(free_port()))]


def _wait_for_dashboard(url: str, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url + "/api/version", timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answered (401 when the token is required)
        except OSError:
            time.sleep(1)
    raise AssertionError(f"Ray dashboard at {url} did not come up in {timeout_s} s")


@pytest.mark.integration
def test_ray_job_submit_runs_an_ablation(tiny_shapes, tiny_teacher, tmp_path):
    from orchestrator import tracking

    bin_dir = Path(sys.executable).parent
    # Token authentication on, with this test's own token: the head, the submitting client and
    # the job's driver (which inherits the head's environment) all present it.
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONUNBUFFERED": "1",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}  # fmt: skip
    dashboard = f"http://127.0.0.1:{free_port()}"
    head = subprocess.Popen(
        [str(bin_dir / "ray"), "start", "--head", "--block", "--port", str(free_port()),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", dashboard.rsplit(":", 1)[1],
         "--num-cpus", "2", *own_port_flags(), "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    started: list[int] = []
    try:
        _wait_for_dashboard(dashboard, 120)
        started = descendant_pids(head.pid)
        out = tmp_path / "ablate"
        deadline = time.time() + 180
        while True:  # the head's job agent comes up a little after the dashboard
            job = subprocess.run(
                [str(bin_dir / "ray"), "job", "submit", "--address", dashboard,
                 "--working-dir", str(REPO), "--",
                 "conaclip", "ablate", "--pairs", "intra_ts:infonce;intra_ts:sd",
                 "--student", "conaclip-student-xs", "--steps", "6", "--eval-every", "3",
                 "--batch-size", "16", "--name", "job-smoke",
                 "--out", str(out),
                 "--address", "auto", "--home", str(tmp_path / "home"),
                 "--train-shards", str(tiny_shapes.out_dir / "train"),
                 "--eval-shards", str(tiny_shapes.out_dir / "eval"),
                 "--teacher-checkpoint", str(tiny_teacher.checkpoint)],
                env=env, capture_output=True, text=True, timeout=420,
            )  # fmt: skip
            if "No available agent" not in job.stderr + job.stdout or time.time() > deadline:
                break
            time.sleep(2)
        assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]
        assert "succeeded" in job.stdout
        # Without the token the same head refuses a client.
        refused = subprocess.run(
            [str(bin_dir / "ray"), "job", "list", "--address", dashboard],
            env={k: v for k, v in env.items() if not k.startswith("RAY_AUTH")},
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert refused.returncode != 0
        runs = tracking.runs_frame(f"sqlite:///{out}/mlruns.db", "job-smoke")
        assert sorted(runs["params.pair_set"]) == ["intra_ts:infonce", "intra_ts:sd"]
        assert set(runs["tags.conaclip.status"]) == {"FINISHED"}
    finally:
        end_started([head], known_pids=started)
