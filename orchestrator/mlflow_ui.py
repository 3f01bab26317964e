"""The MLflow UI as a child process: the ``mlflow server`` command, the page of an experiment's
runs, and serving until this process is told to stop."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

from orchestrator.tracking import RUNS_VIEW_KEY


def server_command(tracking_uri: str, host: str, port: int) -> list[str]:
    """``mlflow server`` on ``tracking_uri`` bound to ``host:port``, run by this interpreter
    with one worker."""
    return [
        sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri,
        "--host", host, "--port", str(port), "--workers", "1",
    ]  # fmt: skip


def runs_page_url(base: str, experiment_id: str) -> str:
    """The UI page listing an experiment's runs, in the view ``tracking.set_runs_view`` stored
    on it (pair set, seed and recall columns, best rsum first). MLflow 3's UI opens every
    experiment in its GenAI view (traces) unless told ``workflowType=machine_learning``, and
    remembers the choice in the browser; the experiment's kind tag alone does not switch it.
    The share key is read on the ``/runs`` page only (a bare experiment link drops it)."""
    return (
        f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
        f"&viewStateShareKey={RUNS_VIEW_KEY}"
    )


def serve_until_signalled(command: list[str], grace_s: float = 10.0) -> int:
    """Run a server ``command`` until it exits or this process gets SIGINT/SIGTERM, then end
    it with everything it started. The server gets a process group of its own, so its workers
    (mlflow server forks several) are ended with it instead of outliving the command."""
    process = subprocess.Popen(command, env=os.environ.copy(), start_new_session=True)

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _end_group(process.pid, grace_s)
    # A server ended by our forwarded signal finished as asked.
    return 0 if code in (-signal.SIGINT, -signal.SIGTERM) else code


def _end_group(pgid: int, grace_s: float) -> None:
    """SIGTERM whatever is left of the process group ``pgid``, SIGKILL it after ``grace_s``."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            os.killpg(pgid, 0)  # raises ProcessLookupError once the group is empty
            time.sleep(0.1)
        os.killpg(pgid, signal.SIGKILL)
