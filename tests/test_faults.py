"""Fault injection: corrupt training shards, a killed Train worker, a booby-trapped checkpoint,
services on loopback. Each fault is built here for real."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from orchestrator.ray_cluster import descendant_pids, free_port
from trainers.distill import CHECKPOINT_FILE, train_loop_per_worker
from trainers.errors import InputError
from trainers.shards import iter_shard, write_shard


def good_samples(shapes, count: int) -> list[dict]:
    samples = []
    for raw in iter_shard(str(shapes.train_shards[0])):
        samples.append({k: v for k, v in raw.items() if k != "__url__"})
        if len(samples) == count:
            return samples
    raise AssertionError("not enough samples")


def test_training_skips_exactly_the_injected_bad_samples(tiny_shapes, tmp_path):
    samples = good_samples(tiny_shapes, 72)
    shards = tmp_path / "shards"
    shards.mkdir()
    # Shard A: 40 good, one corrupt JPEG, one sample without caption.
    corrupt = dict(samples[40], jpg=samples[40]["jpg"][:60] + b"\x00garbage")
    corrupt["__key__"] = "corrupt0"
    no_caption = {k: v for k, v in samples[41].items() if k != "txt"}
    no_caption["__key__"] = "nocaption"
    write_shard(shards / "a.tar", [*samples[:20], corrupt, *samples[20:40], no_caption])
    # Shard B: 30 good, then a sample cut off mid-file (a truncated tar).
    write_shard(shards / "b.tar", samples[42:72])
    data = (shards / "b.tar").read_bytes()
    last_member = data.rfind(b"ustar")  # header of the last member, cut inside it
    (shards / "b.tar").write_bytes(data[: last_member + 200])
    reports: list[dict] = []
    config = {
        "pairs": "inter_ss:infonce", "teacher": None, "student": "conaclip-student-xs",
        "train_shards": str(shards), "eval_shards": "", "steps": 9, "eval_every": 9,
        "batch_size": 8, "loader_workers": 0, "resampled": False, "out_dir": str(tmp_path / "o"),
    }  # fmt: skip
    train_loop_per_worker(config, lambda m, d: reports.append(m))
    # One pass: 40 + 29 good samples read (the 30th of B shares the broken member) = 69 in
    # 9 batches of 8 (the last holding 5); three bad ones injected, three counted.
    assert reports[-1]["step"] == 9
    assert reports[-1]["skipped_samples"] == 3


def test_booby_trapped_checkpoint_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    step_dir = tmp_path / "run" / "checkpoints" / "step_00000003"
    step_dir.mkdir(parents=True)
    torch.save({"student": Payload()}, step_dir / CHECKPOINT_FILE)
    config = {"pairs": "inter_ss:infonce", "teacher": None, "student": "conaclip-student-xs",
              "train_shards": "unused", "out_dir": str(tmp_path / "run")}  # fmt: skip
    with pytest.raises(InputError, match="refused, not a plain checkpoint"):
        train_loop_per_worker(config, lambda m, d: None)
    assert not marker.exists()


def _pids_with(title: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if title in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


@pytest.mark.integration
@pytest.mark.faults
def test_killed_train_worker_resumes_from_its_checkpoint(
    tiny_shapes, tiny_teacher, local_ray, tmp_path
):
    from orchestrator import tracking
    from orchestrator.cli import main

    out = tmp_path / "ablate"
    uri = f"sqlite:///{out}/mlruns.db"
    killed: list[int] = []

    def killer() -> None:
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            time.sleep(1)
            try:
                runs = tracking.runs_frame(uri, "kill-worker")
                reached = runs["metrics.step"].fillna(0).max()
            except Exception:  # the store, experiment or first metric is not there yet
                continue
            if reached < 10:
                continue
            for pid in _pids_with("RayTrainWorker"):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

    watcher = threading.Thread(target=killer, daemon=True)
    watcher.start()
    code = main([
        "ablate", "--pairs", "intra_ts:infonce,inter_ss:infonce", "--name", "kill-worker",
        "--out", str(out), "--steps", "40", "--eval-every", "5", "--batch-size", "8",
        "--student", "conaclip-student-xs", "--home", str(tmp_path / "home"),
        "--train-shards", str(tiny_shapes.out_dir / "train"),
        "--eval-shards", str(tiny_shapes.out_dir / "eval"),
        "--teacher-checkpoint", str(tiny_teacher.checkpoint),
    ])  # fmt: skip
    watcher.join(timeout=5)
    assert killed, "no Train worker was found to kill"
    assert code == 0
    runs = tracking.runs_frame(uri, "kill-worker")
    assert len(runs) == 1  # no second MLflow run for the restarted worker group
    assert runs.iloc[0]["tags.conaclip.status"] == "FINISHED"
    assert runs.iloc[0]["metrics.step"] == 40
    history = tracking.client(uri).get_metric_history(runs.iloc[0]["run_id"], "step")
    steps = [int(m.value) for m in sorted(history, key=lambda m: m.timestamp)]
    # Resumed from a checkpoint, not restarted: the reported steps never go back to 5.
    assert steps == sorted(steps) and steps[-1] == 40
    samples = tracking.client(uri).get_metric_history(runs.iloc[0]["run_id"], "samples_seen")
    assert max(m.value for m in samples) == 40 * 8


def _listening_addresses(port: int) -> set[str]:
    """Local addresses with a listening TCP socket on ``port`` (IPv4, from /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:
            octets = [str(int(address[i : i + 2], 16)) for i in range(6, -1, -2)]
            found.add(".".join(octets))
    return found


@pytest.mark.integration
@pytest.mark.faults
def test_ui_binds_loopback_and_ends_with_its_server(tmp_path):
    import mlflow

    db = tmp_path / "mlruns.db"
    mlflow.MlflowClient(f"sqlite:///{db}").search_experiments()  # creates the store
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "ui", "--out", str(tmp_path), "--port",
         str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 90
        while time.time() < deadline and not _listening_addresses(port):
            time.sleep(0.5)
        assert _listening_addresses(port) == {"127.0.0.1"}
        server = descendant_pids(process.pid)
        assert server, "mlflow server runs below the conaclip ui process"
        # SIGTERM to the command alone, as a service manager or `kill` sends it: the command
        # forwards it, and neither the server nor any of its workers outlives it.
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        assert not _listening_addresses(port)
        left = [
            pid
            for pid in server
            if Path(f"/proc/{pid}").exists()
            and "Z" not in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[:1]
        ]
        assert left == [], f"processes left behind: {left}"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
