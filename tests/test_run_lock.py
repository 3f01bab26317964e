"""Two ablations on one --out and name: the second is refused in one line, before it starts
anything; a killed holder leaves no stale lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from orchestrator.cli import main
from orchestrator.run_lock import exclusive_ablation, lock_path
from trainers.errors import InputError


def test_second_ablation_with_the_same_name_is_refused(tmp_path, capsys):
    out = tmp_path / "runs"
    with exclusive_ablation(out, "shared"):
        code = main(["ablate", "--preset", "smoke", "--out", str(out), "--name", "shared"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == [
        f"conaclip: error: {lock_path(out, 'shared')}: ablation shared is already running "
        f"under this --out (pid {os.getpid()} on {os.uname().nodename}, since "
        + err[0].split(", since ", 1)[1]
    ]
    # Nothing was started: no MLflow store, no Tune state beside the lock file.
    assert sorted(p.name for p in out.rglob("*")) == ["shared.lock", "tune"]


def test_another_name_on_the_same_out_is_not_blocked(tmp_path):
    with exclusive_ablation(tmp_path, "one"), exclusive_ablation(tmp_path, "two") as second:
        assert second == lock_path(tmp_path, "two")
    with exclusive_ablation(tmp_path, "one"):  # released when the block ended
        pass


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from orchestrator.run_lock import exclusive_ablation\n"
         f"with exclusive_ablation({str(tmp_path)!r}, 'x'):\n"
         "    print('held', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True, cwd=os.getcwd(),
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        refused = pytest.raises(InputError, match=rf"pid {holder.pid} on ")
        with refused, exclusive_ablation(tmp_path, "x"):
            pass
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        deadline = time.time() + 10
        while True:
            try:
                with exclusive_ablation(tmp_path, "x"):
                    break
            except InputError:
                assert time.time() < deadline, "the killed holder's lock was never released"
                time.sleep(0.1)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
