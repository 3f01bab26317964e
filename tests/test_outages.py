"""Outages an ablation must come through, each made for real: resources held by someone else,
a Train worker killed by the kernel's OOM killer, a tracking server that goes away and comes
back. Every test runs a real ablation on a real local Ray cluster and reads MLflow after it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from orchestrator.ray_cluster import free_port


def _ablate(out: Path, name: str, shapes, teacher, home: Path, *extra: str) -> int:
    from orchestrator.cli import main

    return main([
        "ablate", "--pairs", "inter_ss:infonce;intra_ts:infonce", "--name", name,
        "--out", str(out), "--steps", "10", "--eval-every", "5", "--batch-size", "8",
        "--student", "conaclip-student-xs", "--home", str(home),
        "--train-shards", str(shapes.out_dir / "train"),
        "--eval-shards", str(shapes.out_dir / "eval"),
        "--teacher-checkpoint", str(teacher.checkpoint), *extra,
    ])  # fmt: skip


def _resume(out: Path, name: str) -> int:
    from orchestrator.cli import main

    return main(["ablate", "--resume", "--out", str(out), "--name", name])


def _statuses(uri: str, experiment: str) -> dict[str, str]:
    from orchestrator import tracking

    try:
        runs = tracking.runs_frame(uri, experiment)
    except Exception:  # the store or the experiment is not there yet
        return {}
    if "tags.conaclip.status" not in runs:
        return {}
    return dict(zip(runs["tags.conaclip.pair_set"], runs["tags.conaclip.status"], strict=True))


@pytest.mark.integration
@pytest.mark.faults
def test_trial_without_resources_fails_within_its_bound_and_resume_retries_it(
    tiny_shapes, tiny_teacher, local_ray, tmp_path, capsys
):
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from orchestrator import tracking

    out, name = tmp_path / "ablate", "no-resources"
    uri = tracking.default_tracking_uri(out)
    # Something else holds both CPUs of the 2-CPU test cluster, as a placement group left
    # reserved by a killed trial did: the first trial's worker group cannot be placed. (No
    # teacher cache: building it runs Ray tasks that would wait for those CPUs too.)
    hog = placement_group([{"CPU": 2}], name="hog")
    ray.get(hog.ready(), timeout=60)
    config = tmp_path / "bound.yaml"
    config.write_text("start_timeout_s: 15\n")
    failed_at: list[float] = []

    def free_once_failed() -> None:
        deadline = time.time() + 300
        while time.time() < deadline and not failed_at:
            time.sleep(0.5)
            if "FAILED" in _statuses(uri, name).values():
                failed_at.append(time.time())
        remove_placement_group(hog)  # the other trial must now get its CPU and go on

    watcher = threading.Thread(target=free_once_failed, daemon=True)
    started = time.time()
    watcher.start()
    try:
        code = _ablate(out, name, tiny_shapes, tiny_teacher, tmp_path / "home",
                       "--config", str(config), "--no-teacher-cache")  # fmt: skip
    finally:
        watcher.join(timeout=310)
    err = capsys.readouterr().err
    assert code == 1
    assert failed_at, "no trial was recorded FAILED"
    # Bounded: 15 s of waiting plus the trial's start-up, never Ray's unlimited retries.
    assert failed_at[0] - started < 15 + 60
    lines = [line for line in err.splitlines() if "FAILED: no resources" in line]
    print("\n".join(lines), file=sys.__stderr__)
    assert len(lines) == 1
    line = lines[0]
    assert line.startswith("trial inter_ss:infonce seed 0 FAILED: no resources within 15 s")
    assert "asked for 1 worker(s) x {CPU 1}" in line
    assert "the cluster has {CPU 2," in line and "with {" in line
    assert "held by placement group hog (CPU 2)" in line

    runs = tracking.runs_frame(uri, name).set_index("tags.conaclip.pair_set")
    assert runs.loc["inter_ss:infonce", "tags.conaclip.status"] == "FAILED"
    assert runs.loc["inter_ss:infonce", "status"] == "FAILED"
    error = runs.loc["inter_ss:infonce", "tags.conaclip.error"]
    assert error.startswith("no resources within 15 s") and "placement group hog" in error
    assert runs.loc["intra_ts:infonce", "tags.conaclip.status"] == "FINISHED"
    assert runs.loc["intra_ts:infonce", "metrics.step"] == 10

    assert _resume(out, name) == 0
    runs = tracking.runs_frame(uri, name).set_index("tags.conaclip.pair_set")
    assert len(runs) == 2  # the retried trial logs into its own run again
    assert set(runs["tags.conaclip.status"]) == {"FINISHED"}
    assert runs.loc["inter_ss:infonce", "metrics.step"] == 10
    assert "tags.conaclip.error" not in runs or runs["tags.conaclip.error"].isna().all()


class MlflowServer:
    """A real `mlflow server --workers 1` on 127.0.0.1: stopped and started again on the same
    port and the same backend store, as a restarted tracking service is."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        mlflow = Path(sys.executable).with_name("mlflow")
        self.process = subprocess.Popen(
            [str(mlflow), "server", "--workers", "1", "--host", "127.0.0.1",
             "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
             "--artifacts-destination", str(self.root / "artifacts")],
            stdout=subprocess.DEVNULL, stderr=(self.root / "server.log").open("a"),
            start_new_session=True,
        )  # fmt: skip
        # A loaded 2-CPU machine takes minutes to start `mlflow server`; that is outage too.
        deadline = time.time() + 400
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        raise AssertionError(f"mlflow server did not answer on {self.uri}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


@pytest.mark.integration
@pytest.mark.faults
def test_tracking_server_outage_mid_ablation_loses_no_metric(
    tiny_shapes, tiny_teacher, local_ray, tmp_path, capsys
):
    from orchestrator import table, tracking

    server = MlflowServer(tmp_path)
    server.start()
    out, name = tmp_path / "ablate", "outage"
    outage: list[float] = []  # when the server went away, when it answered again

    def take_it_away() -> None:
        deadline = time.time() + 300
        while time.time() < deadline:
            time.sleep(0.5)
            try:
                runs = tracking.runs_frame(server.uri, name)
                reached = runs["metrics.step"].fillna(0).max()
            except Exception:  # no experiment or no metric yet
                continue
            if reached >= 5:
                break
        server.stop()
        outage.append(time.time())
        time.sleep(30)
        server.start()
        outage.append(time.time())

    watcher = threading.Thread(target=take_it_away, daemon=True)
    watcher.start()
    try:
        code = _ablate(out, name, tiny_shapes, tiny_teacher, tmp_path / "home",
                       "--tracking-uri", server.uri, "--steps", "30",
                       "--max-concurrent-trials", "1")  # fmt: skip
        watcher.join(timeout=420)
        err = capsys.readouterr().err
        print("\n".join(line for line in err.splitlines() if "MLflow" in line),
              file=sys.__stderr__)  # fmt: skip
        assert code == 0
        assert len(outage) == 2, "the server was never taken away"
        assert "does not answer" in err and "answers again after" in err

        runs = tracking.runs_frame(server.uri, name)
        assert len(runs) == 2
        assert set(runs["tags.conaclip.status"]) == {"FINISHED"}
        client = tracking.client(server.uri)
        during = 0
        for run_id in runs["run_id"]:
            history = client.get_metric_history(run_id, "step")
            # Every report of every trial, each once: 5, 10, ..., 30.
            assert sorted(int(m.value) for m in history) == [5, 10, 15, 20, 25, 30]
            during += sum(outage[0] * 1000 <= m.timestamp <= outage[1] * 1000 for m in history)
            assert tracking.read_eval_ranks(server.uri, run_id) is not None
        assert during > 0, "no report fell inside the outage; the test proved nothing"
        selection = table.selection_table(runs, ranks=table.load_ranks(server.uri, runs))
        assert sorted(selection["pair_set"]) == ["inter_ss:infonce", "intra_ts:infonce"]
        assert list(selection["seeds"]) == [1, 1]
        assert selection["rsum_mean"].notna().all()
    finally:
        watcher.join(timeout=60)
        server.stop()


MEMORY_CGROUPS = Path("/sys/fs/cgroup/memory")  # cgroup v1 memory controller


def _cluster_pids_with(title: str) -> list[int]:
    """PIDs below this test process (its own Ray cluster) whose command line holds ``title``;
    never another cluster's processes on the same machine."""
    from orchestrator.ray_cluster import descendant_pids

    found = []
    for pid in descendant_pids(os.getpid()):
        try:
            if title in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                found.append(pid)
        except OSError:
            continue
    return found


def _first_run(uri: str, experiment: str) -> dict:
    """The first trial's run as a row dict with its non-missing values ({} before it exists)."""
    from orchestrator import tracking

    try:
        runs = tracking.runs_frame(uri, experiment)
    except Exception:  # the store or the experiment is not there yet
        return {}
    return {} if runs.empty else runs.iloc[0].dropna().to_dict()


@pytest.mark.integration
@pytest.mark.faults
def test_oom_killed_trial_is_failed_with_its_reason_and_frees_its_resources(
    tiny_shapes, tiny_teacher, local_ray, tmp_path, capsys
):
    """The kernel's OOM killer, for real: the first trial's Train worker (and its data-loader
    processes) run in a memory cgroup of 8 MiB, so their next allocations get them
    OOM-killed; ``max_failures: 0``, so that kill fails the trial (with the default 1, Ray
    Train restarts the worker group from its checkpoint, outside the cgroup, and it finishes).
    The worker is confined after its first report, so the kill hits training, not start-up
    (which Ray Train retries as a controller failure).
    A cgroup, not Ray's memory monitor: the monitor compares the whole machine's memory with
    its threshold, which other processes on a shared machine move."""
    import ray

    from orchestrator import tracking

    cgroup = MEMORY_CGROUPS / f"conaclip-oom-{os.getpid()}"
    try:
        cgroup.mkdir()
        (cgroup / "memory.limit_in_bytes").write_text(str(8 * 2**20))
    except OSError as error:
        pytest.skip(f"needs a writable cgroup-v1 memory controller ({error.strerror})")
    out, name = tmp_path / "ablate", "oom"
    uri = tracking.default_tracking_uri(out)
    # Each trial's worker takes both CPUs: the second trial runs only if the first one's
    # placement group was released after its OOM kill.
    config = tmp_path / "whole-cluster.yaml"
    config.write_text("cpus_per_worker: 2\nmax_failures: 0\n")
    moved: list[int] = []
    stop = threading.Event()

    def oom_kills() -> int:
        lines = (cgroup / "memory.oom_control").read_text().splitlines()
        return int(dict(line.split() for line in lines).get("oom_kill", "0"))

    def confine_first_trial() -> None:
        while not stop.is_set() and "metrics.step" not in _first_run(uri, name):
            time.sleep(0.2)
        # Until the first kill: after it, the first trial has failed and the next one runs free.
        while not stop.is_set() and oom_kills() == 0:
            for pid in _cluster_pids_with("RayTrainWorker"):
                if pid not in moved:
                    try:
                        (cgroup / "cgroup.procs").write_text(str(pid))
                    except OSError:  # gone already
                        continue
                    moved.append(pid)
            time.sleep(0.2)

    watcher = threading.Thread(target=confine_first_trial, daemon=True)
    watcher.start()
    try:
        code = _ablate(out, name, tiny_shapes, tiny_teacher, tmp_path / "home",
                       "--config", str(config), "--steps", "20")  # fmt: skip
        stop.set()
        watcher.join(timeout=10)
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if " FAILED: " in line]
        print("\n".join(lines), file=sys.__stderr__)
        assert moved
        assert oom_kills() >= 1, "the kernel did not OOM-kill the confined worker"
        assert code == 1
        assert len(lines) == 1 and lines[0].startswith("trial inter_ss:infonce seed 0 FAILED: ")
        assert "OOM killer" in lines[0]

        runs = tracking.runs_frame(uri, name).set_index("tags.conaclip.pair_set")
        assert runs.loc["inter_ss:infonce", "tags.conaclip.status"] == "FAILED"
        assert "OOM killer" in runs.loc["inter_ss:infonce", "tags.conaclip.error"]
        assert runs.loc["intra_ts:infonce", "tags.conaclip.status"] == "FINISHED"
        assert runs.loc["intra_ts:infonce", "metrics.step"] == 20
        held = [pg for pg in ray.util.placement_group_table().values() if pg["state"] == "CREATED"]
        assert held == []

        assert _resume(out, name) == 0
        runs = tracking.runs_frame(uri, name).set_index("tags.conaclip.pair_set")
        assert len(runs) == 2
        assert set(runs["tags.conaclip.status"]) == {"FINISHED"}
        assert runs.loc["inter_ss:infonce", "metrics.step"] == 20
    finally:
        stop.set()
        deadline = time.time() + 60
        while (cgroup / "cgroup.procs").read_text().strip() and time.time() < deadline:
            time.sleep(0.5)
        cgroup.rmdir()
