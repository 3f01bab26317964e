"""One live line for an ablation in the terminal, in place of Tune's per-trial tables.

A ``tune.Callback`` in the driver: trials done / running / pending, failures, the best pair set
so far by its last reported metric, and an ETA from the finished trials' mean duration and the
trials Tune runs at once. On a terminal the line is rewritten in place; into a file or a pipe
it is one line per change, so logs stay readable. ``conaclip ablate --tune-output`` brings back
Tune's own tables instead.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from ray.tune import Callback


def format_eta(seconds: float | None) -> str:
    """``"4 min 05 s"``, ``"38 s"``, or ``"?"`` when unknown."""
    if seconds is None:
        return "?"
    seconds = max(0, round(seconds))
    minutes, rest = divmod(seconds, 60)
    return f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"


class LiveView(Callback):
    """The status line of an ablation of ``total`` trials at ``concurrency`` at once."""

    def __init__(
        self, total: int, concurrency: int, metric: str = "rsum", stream: TextIO | None = None
    ) -> None:
        self.total = total
        self.concurrency = max(1, concurrency)
        self.metric = metric
        self.stream = stream
        self._started: dict[str, float] = {}
        self._durations: list[float] = []
        self._done = 0
        self._failed = 0
        self._best: tuple[float, str] | None = None
        self._last_line = ""

    # Tune pickles callbacks with its experiment state; the stream is this process's.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["stream"] = None
        return state

    @property
    def _out(self) -> TextIO:
        return self.stream or sys.stderr

    def line(self, now: float | None = None) -> str:
        """The status text as it stands (also what tests read)."""
        now = time.monotonic() if now is None else now
        running = len(self._started)
        pending = max(0, self.total - self._done - self._failed - running)
        parts = [f"trials {self._done}/{self.total} done", f"{running} running",
                 f"{pending} pending"]  # fmt: skip
        if self._failed:
            parts.append(f"{self._failed} failed")
        if self._best is not None:
            parts.append(f"best {self.metric} {self._best[0]:.2f} ({self._best[1]})")
        parts.append(f"ETA {format_eta(self.eta(now))}")
        return "ablation: " + ", ".join(parts)

    def eta(self, now: float) -> float | None:
        """Seconds left: trials not finished x the mean finished duration / concurrency, less
        what the running ones have already spent. None before any trial finished."""
        if not self._durations:
            return None
        mean = sum(self._durations) / len(self._durations)
        left = self.total - self._done - self._failed
        spent = sum(min(now - start, mean) for start in self._started.values())
        return max(0.0, (left * mean - spent) / self.concurrency)

    def _show(self) -> None:
        text = self.line()
        if text == self._last_line:
            return
        self._last_line = text
        out = self._out
        if out.isatty():
            out.write("\r\033[K" + text)
        else:
            out.write(text + "\n")
        out.flush()

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._started[trial.trial_id] = time.monotonic()
        self._show()

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        value = result.get(self.metric)
        if isinstance(value, int | float) and (self._best is None or value > self._best[0]):
            self._best = (float(value), str(trial.config.get("pair_set", trial.trial_id)))
            self._show()

    def _end(self, trial, failed: bool) -> None:
        started = self._started.pop(trial.trial_id, None)
        if failed:
            self._failed += 1
        else:
            self._done += 1
            if started is not None:
                self._durations.append(time.monotonic() - started)
        self._show()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._end(trial, failed=False)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._end(trial, failed=True)

    def on_experiment_end(self, trials, **info) -> None:
        if self._out.isatty() and self._last_line:
            self._out.write("\n")
            self._out.flush()
