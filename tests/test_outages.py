"""Outages an ablation must come through, each made for real: resources held by someone else,
a Train worker killed by the kernel's OOM killer, a tracking server that goes away and comes
back (mid-ablation, during the end-of-run wait, or only after the ablation, for ``--resume``
to write what was kept). Every test runs a real ablation on a real local Ray cluster and reads
MLflow after it."""

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


def _wait_for_step(uri: str, experiment: str, step: int, timeout_s: float = 300) -> None:
    """Until some run of ``experiment`` has logged ``metrics.step >= step`` (or the timeout)."""
    from orchestrator import tracking

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        time.sleep(0.5)
        try:
            reached = tracking.runs_frame(uri, experiment)["metrics.step"].fillna(0).max()
        except Exception:  # no experiment or no metric yet
            continue
        if reached >= step:
            return


def _ablate_beside(watcher, join_s: float, capsys, *args) -> tuple[int, str]:
    """``_ablate(*args)`` while ``watcher`` (a function) runs in a thread that is then joined
    for at most ``join_s``; (exit code, stderr), with stderr's MLflow lines shown."""
    thread = threading.Thread(target=watcher, daemon=True)
    thread.start()
    code = _ablate(*args)
    thread.join(timeout=join_s)
    err = capsys.readouterr().err
    print("\n".join(line for line in err.splitlines() if "MLflow" in line), file=sys.__stderr__)
    return code, err


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
    # Bounded: one start attempt of 15 s plus the trial's start-up (tens of seconds on a loaded
    # 2-core machine), not Ray's unlimited retries of 60 s each (the 19-minute hang). A
    # functional bound, far from any speed claim.
    assert failed_at[0] - started < 15 + 225
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
        _wait_for_step(server.uri, name, 5)
        server.stop()
        outage.append(time.time())
        time.sleep(20)  # several reports long: trial 1 has 25 steps to go, 5 per report
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
        server.stop()


def _trial_runs(uri: str, experiment: str) -> dict[str, str]:
    """Tune trial id -> MLflow run id, for the trial runs the store holds now."""
    from orchestrator import tracking

    runs = tracking.runs_frame(uri, experiment)
    if runs.empty:
        return {}
    return dict(zip(runs["tags.conaclip.trial_id"], runs["run_id"], strict=True))


def _ledger(uri: str, experiment: str) -> dict[str, tuple]:
    """Per trial run, everything a repeated write would change: MLflow status and end time
    (``set_terminated`` stamps it anew), tags, each metric's history with timestamps, and the
    artifact listing with sizes."""
    from orchestrator import tracking

    client = tracking.client(uri)
    ledger = {}
    for trial_id, run_id in _trial_runs(uri, experiment).items():
        run = client.get_run(run_id)
        history = {
            key: sorted(
                (m.step, m.timestamp, m.value) for m in client.get_metric_history(run_id, key)
            )
            for key in run.data.metrics
        }
        artifacts = sorted((a.path, a.file_size) for a in client.list_artifacts(run_id))
        ledger[trial_id] = (
            run.info.status,
            run.info.end_time,
            dict(run.data.tags),
            history,
            artifacts,
        )
    return ledger


@pytest.mark.integration
@pytest.mark.faults
def test_tracking_server_away_past_the_ablation_end_is_spooled_and_resume_writes_it_once(
    tiny_shapes, tiny_teacher, local_ray, tmp_path, capsys, monkeypatch
):
    """The server goes away mid-ablation and is still away when the last trial ends: the
    ablation ends (after a short end-of-run wait), keeps what it could not write in its spool
    and says where and which command writes it; with the server back on the same port and
    store, ``--resume`` writes all of it, and a second ``--resume`` writes nothing again."""
    import json

    from orchestrator import table, tracking
    from orchestrator.mlflow_logger import FINAL_FLUSH_ENV, SPOOL_FILE

    # The end of the ablation waits 2 s for the store instead of the default 600 s.
    monkeypatch.setenv(FINAL_FLUSH_ENV, "2")
    server = MlflowServer(tmp_path)
    server.start()
    out, name = (tmp_path / "ablate").resolve(), "spooled"
    stopped: list[float] = []

    def take_it_away() -> None:
        # Away once the first trial's first report is in the store: with one trial at a
        # time, the second trial then runs wholly inside the outage.
        _wait_for_step(server.uri, name, 5)
        server.stop()
        stopped.append(time.time())

    try:
        code, err = _ablate_beside(take_it_away, 60, capsys, out, name, tiny_shapes, tiny_teacher,
                                   tmp_path / "home", "--tracking-uri", server.uri,
                                   "--max-concurrent-trials", "1")  # fmt: skip
        assert code == 0  # every trial trained; only their records wait
        assert stopped, "the server was never taken away"
        assert server.process is not None and server.process.poll() is not None

        spool = out / "tune" / f"{name}.mlflow-spool"
        state = json.loads((spool / SPOOL_FILE).read_text())
        pending = state["pending"]
        by_trial: dict[str, list[dict]] = {}
        for op in pending:
            by_trial.setdefault(op["trial"], []).append(op)
        # Both trials have their end waiting at least; the one that ran wholly inside the
        # outage has every write waiting, in order.
        assert len(by_trial) == 2
        assert all(ops[-1] == {**ops[-1], "op": "finish", "status": "FINISHED"}
                   for ops in by_trial.values())  # fmt: skip
        inside = [ops for ops in by_trial.values() if ops[0]["op"] == "start"]
        assert len(inside) == 1
        assert [op["op"] for op in inside[0]] == [
            "start", "metrics", "artifact", "metrics", "artifact", "finish"
        ]  # fmt: skip
        for op in pending:
            if op["op"] == "artifact":  # a copy in the spool, not in a checkpoint Train prunes
                assert Path(op["path"]).is_file() and spool in Path(op["path"]).parents
        lines = [line for line in err.splitlines() if "still does not answer" in line]
        assert lines == [
            f"MLflow at {server.uri} still does not answer after 2 s: {len(pending)} update(s) "
            f"of 2 trial(s) kept in {spool / SPOOL_FILE}; once it answers, "
            f"`conaclip ablate --resume --out {out} --name {name}` writes them"
        ]

        server.start()  # the same port and backend store
        before = _trial_runs(server.uri, name)
        assert len(before) == 1  # the second trial's run was never created
        client = tracking.client(server.uri)
        for trial_id, ops in by_trial.items():
            spooled = [step for op in ops if op["op"] == "metrics"
                       for key, _, _, step in op["metrics"] if key == "step"]  # fmt: skip
            stored = []
            if trial_id in before:
                stored = [int(m.step) for m in client.get_metric_history(before[trial_id], "step")]
            # Each report is either in the store or in the spool, never both, never neither.
            assert sorted(stored + spooled) == [5, 10]

        assert _resume(out, name) == 0
        err = capsys.readouterr().err
        print("\n".join(line for line in err.splitlines() if "MLflow" in line),
              file=sys.__stderr__)  # fmt: skip
        assert f"MLflow: writing {len(pending)} update(s) held from an earlier run" in err
        assert "does not answer" not in err
        assert not (spool / SPOOL_FILE).exists()

        runs = tracking.runs_frame(server.uri, name)
        assert len(runs) == 2
        assert set(runs["tags.conaclip.status"]) == {"FINISHED"}
        assert set(runs["status"]) == {"FINISHED"}
        for run_id in runs["run_id"]:
            history = client.get_metric_history(run_id, "step")
            assert sorted(int(m.value) for m in history) == [5, 10]  # every report, once
            assert sorted(m.step for m in client.get_metric_history(run_id, "rsum")) == [5, 10]
            ranks = tracking.read_eval_ranks(server.uri, run_id)
            assert ranks is not None and len(ranks["t2i_rank"]) > 0
        selection = table.selection_table(runs, ranks=table.load_ranks(server.uri, runs))
        assert sorted(selection["pair_set"]) == ["inter_ss:infonce", "intra_ts:infonce"]
        assert list(selection["seeds"]) == [1, 1]
        assert selection["rsum_mean"].notna().all()

        ledger = _ledger(server.uri, name)
        assert _resume(out, name) == 0
        err = capsys.readouterr().err
        assert "held from an earlier run" not in err and "MLflow at" not in err
        assert not (spool / SPOOL_FILE).exists()
        assert _ledger(server.uri, name) == ledger  # nothing written twice
    finally:
        server.stop()


def _saved_pending(tune_run: Path) -> list[dict]:
    """The MLflow logger's queue as Tune's newest saved callback state lists it."""
    import pickle

    newest = max(tune_run.glob("callback-states-*.pkl"), key=lambda p: p.stat().st_mtime)
    states = pickle.loads(newest.read_bytes())
    return [
        op for state in states.values() if state and "pending" in state for op in state["pending"]
    ]


@pytest.mark.integration
@pytest.mark.faults
def test_tracking_server_back_during_the_end_wait_resume_writes_nothing_again(
    tiny_shapes, tiny_teacher, local_ray, tmp_path, capsys, monkeypatch
):
    """The server is away when the last trial ends and answers during the end-of-run wait:
    Tune saved its state (the logger's queue with it) before that wait, so the state still
    lists what the wait then wrote; ``--resume`` must not write it a second time."""
    from orchestrator import tracking
    from orchestrator.mlflow_logger import FINAL_FLUSH_ENV, SPOOL_FILE

    monkeypatch.setenv(FINAL_FLUSH_ENV, "400")  # covers a slow `mlflow server` start
    server = MlflowServer(tmp_path)
    server.start()
    out, name = (tmp_path / "ablate").resolve(), "back-at-end"
    restarted: list[float] = []

    def away_until_the_last_report() -> None:
        _wait_for_step(server.uri, name, 5)
        server.stop()
        # Back once Tune has the trial's last report (10 steps, a report every 5); a bound of
        # its own, since a loaded machine takes minutes for those 5 steps.
        deadline = time.time() + 600
        while time.time() < deadline:
            reports = sum(len(path.read_text().splitlines())
                          for path in (out / "tune" / name).glob("*/result.json"))  # fmt: skip
            if reports >= 2:
                break
            time.sleep(0.2)
        server.start()
        restarted.append(time.time())

    try:
        code, err = _ablate_beside(away_until_the_last_report, 720, capsys, out, name,
                                   tiny_shapes, tiny_teacher, tmp_path / "home",
                                   "--tracking-uri", server.uri, "--pairs",
                                   "inter_ss:infonce")  # fmt: skip
        assert code == 0
        assert restarted, "the server was never taken away and back"
        assert "does not answer" in err and "answers again after" in err
        assert "still does not answer" not in err
        spool = out / "tune" / f"{name}.mlflow-spool"
        assert not (spool / SPOOL_FILE).exists()
        stale = _saved_pending(out / "tune" / name)
        assert stale, "Tune's saved state lists nothing pending; the test proved nothing"
        assert stale[-1]["op"] == "finish"

        client = tracking.client(server.uri)
        runs = tracking.runs_frame(server.uri, name)
        assert len(runs) == 1 and set(runs["tags.conaclip.status"]) == {"FINISHED"}
        (run_id,) = runs["run_id"]
        assert sorted(int(m.value) for m in client.get_metric_history(run_id, "step")) == [5, 10]
        assert tracking.read_eval_ranks(server.uri, run_id) is not None

        ledger = _ledger(server.uri, name)
        assert _resume(out, name) == 0
        err = capsys.readouterr().err
        assert "held from an earlier run" not in err and "MLflow at" not in err
        assert _ledger(server.uri, name) == ledger  # nothing written twice
    finally:
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
    (which Ray Train retries as a controller failure). That report is seen through MLflow, a
    second or so late, so the trial trains 14 reports past it: at 20 steps (3 after the first
    report, about 2 s) a busy machine could finish the trial first, and the kill then landed on
    the next trial's start-up, which Ray retried outside the cgroup (CI saw exit code 0).
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
                       "--config", str(config), "--steps", "150", "--eval-every", "10")  # fmt: skip
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
        assert runs.loc["intra_ts:infonce", "metrics.step"] == 150
        held = [pg for pg in ray.util.placement_group_table().values() if pg["state"] == "CREATED"]
        assert held == []

        assert _resume(out, name) == 0
        runs = tracking.runs_frame(uri, name).set_index("tags.conaclip.pair_set")
        assert len(runs) == 2
        assert set(runs["tags.conaclip.status"]) == {"FINISHED"}
        assert runs.loc["inter_ss:infonce", "metrics.step"] == 150
    finally:
        stop.set()
        deadline = time.time() + 60
        while (cgroup / "cgroup.procs").read_text().strip() and time.time() < deadline:
            time.sleep(0.5)
        cgroup.rmdir()
