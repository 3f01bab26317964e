"""The MLflow UI's page of an ablation's runs, rendered by headless Chromium to a PNG.

Starts a real ``mlflow server`` on 127.0.0.1 (a free port, one worker) on the ablation's
SQLite store, waits until it answers, lets Debian's ``chromium`` render the experiment's page
(``conaclip ui`` prints the same link), and ends the server's whole process
group. Not part of CI (it needs ``apt install chromium``).

    python benchmarks/mlflow_screenshot.py --out runs/demo --png docs/mlflow-runs.png
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from orchestrator import tracking
from orchestrator.mlflow_ui import runs_page_url
from orchestrator.ray_cluster import free_port


def wait_until_up(url: str, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"{url}/health", timeout=2) as answer,
        ):
            if answer.status == 200:
                return
        time.sleep(0.5)
    sys.exit(f"mlflow server at {url} did not answer within {timeout_s:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="the ablation's --out")
    parser.add_argument("--experiment", help="default: the newest ablation in the store")
    parser.add_argument("--png", type=Path, default=Path("docs/mlflow-runs.png"))
    parser.add_argument("--size", default="1600,1000", help="window WIDTH,HEIGHT in pixels")
    parser.add_argument("--render-ms", type=int, default=20000, help="time the page gets to load")
    args = parser.parse_args()

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        sys.exit("chromium not found: apt install chromium")
    database = (args.out / "mlruns.db").resolve()
    if not database.is_file():
        sys.exit(f"{database}: no MLflow store (run the ablation first)")
    uri = f"sqlite:///{database}"
    experiment = tracking.find_experiment(uri, args.experiment)
    tracking.set_runs_view(uri, experiment.experiment_id)  # as `conaclip ui` does
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_up(base, 120)
        args.png.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--window-size={args.size}", f"--virtual-time-budget={args.render_ms}",
             f"--screenshot={args.png.resolve()}", runs_page_url(base, experiment.experiment_id)],
            check=True, timeout=300, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    size = args.png.stat().st_size
    print(f"wrote {args.png} ({size} bytes): experiment {experiment.name} at {base}")


if __name__ == "__main__":
    main()
