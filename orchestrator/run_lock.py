"""One running ablation per (--out, name): a second one started on the same pair is refused.

Two ablations sharing a name under one --out would share Tune's state, the Train runs'
checkpoint folders and one MLflow experiment, and each would count the other's trials as its
own. The lock is an advisory ``flock`` on ``<out>/tune/<name>.lock``: the kernel drops it when
its holder exits, however it exits (a killed ablation never leaves a stale lock behind), and
the file names the holder so the refusal can say who it is.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from trainers.errors import InputError


def lock_path(out_dir: str | Path, name: str) -> Path:
    return Path(out_dir).resolve() / "tune" / f"{name}.lock"


@contextlib.contextmanager
def exclusive_ablation(out_dir: str | Path, name: str) -> Iterator[Path]:
    """Hold the lock of ablation ``name`` under ``out_dir`` for the ``with`` block; an
    InputError (one line: the lock file, its holder, what to do) if another process holds it."""
    path = lock_path(out_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = path.open("a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise InputError(
                f"{path}: ablation {name} is already running under this --out ({holder}); "
                "wait for it to end, or pick another --name or --out"
            ) from None
        handle.seek(0)
        handle.truncate()
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {started}\n")
        handle.flush()
        yield path
    finally:
        handle.close()  # closing the only descriptor releases the flock
