"""One MLflow run per Tune trial, written by the Tune driver alone (a ``tune.Callback``),
nested under the ablation's own run (``tracking.summary_run_id``), which holds its reports.

Runs are found again by their ``conaclip.trial_id`` tag, so a restored ablation keeps logging
into the run its trial started instead of opening a second one: after ``--resume`` the
experiment still holds exactly one run per trial. Metric names never contain '@'.

Each reported checkpoint's per-query eval ranks (``eval_ranks.npz``, written by the training
loop) are logged as the run's artifact of that name, replaced at every eval, so the run's final
artifact belongs to its final metrics: the table's bootstrap intervals are computed from it.

A tracking server that goes away loses nothing: every write is queued in order and the queue
is written as soon as the store answers. Why a queue of our own: MLflow's client retries a
failed HTTP request itself (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, default 7, with exponential
backoff, about 4 minutes), but it does so inside the Tune driver's loop, which then schedules
nothing for minutes, and once its retries run out the exception ends ``Tuner.fit`` and with it
the ablation. Here each write is tried once with no client retries and a short timeout; what
fails stays queued and is retried every ``RETRY_EVERY_S`` while trials go on training. The
queue is part of the callback's Tune state (``get_state``) and, when the store is still away
when the ablation ends, of a spool file next to Tune's state, so ``--resume`` writes it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.result import (
    AUTO_RESULT_KEYS,
    DONE,
    EXPERIMENT_TAG,
    SHOULD_CHECKPOINT,
    TRIAL_ID,
)

from orchestrator import tracking

# Tune's own bookkeeping keys in a result (ray.tune.result), skipped when logging metrics.
TUNE_KEYS = frozenset((*AUTO_RESULT_KEYS, DONE, SHOULD_CHECKPOINT, EXPERIMENT_TAG, TRIAL_ID))
RETRY_EVERY_S = 2.0  # between attempts while the store does not answer
REQUEST_TIMEOUT_S = 10  # one HTTP request; a hung server must not stall Tune's loop long
FINAL_FLUSH_S = 600.0  # how long the ablation's end waits for a store that is away
# Overrides FINAL_FLUSH_S (seconds, >= 0) where the logger is built without ``final_flush_s``,
# as ``conaclip ablate`` builds it: an operator who knows the store is down for longer can end
# the ablation at once (0) and write the spool later with ``--resume``.
FINAL_FLUSH_ENV = "CONACLIP_MLFLOW_FINAL_FLUSH_S"
# MLflow error codes that say the request itself is wrong: retrying cannot help.
PERMANENT_CODES = frozenset(
    ("INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "BAD_REQUEST", "INVALID_STATE")
)
SPOOL_FILE = "pending.json"
# Beside the spool: per logger (``token``), the sequence number of the last write it made. Tune
# saves its final experiment state before ``on_experiment_end``, so a store that answers again
# during the end-of-run wait gets writes that state still lists as pending; a restored logger
# drops those instead of making them a second time.
WRITTEN_FILE = "written.json"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _single_attempt() -> Iterator[None]:
    """MLflow's HTTP client makes one attempt with a short timeout (it reads both variables
    at every request); the queue does the retrying. No effect on database URIs."""
    settings = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(REQUEST_TIMEOUT_S),
    }
    before = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def is_permanent(error: Exception) -> bool:
    """True when MLflow refused the write itself (bad value, already exists); False for what
    an outage raises (refused connection, timeout, 5xx, a locked database)."""
    from mlflow.exceptions import MlflowException

    return isinstance(error, MlflowException) and error.error_code in PERMANENT_CODES


def _read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; {} when it is missing or unreadable (a record that cannot
    be read only costs repeated writes, never lost ones)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _reason(error: Exception) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:200]}"


class MlflowTrialLogger(Callback):
    """Params, tags and every reported metric of each trial, plus its final status.

    Contract: every write a trial causes reaches the store in the order it happened, however
    long the store is away while the ablation runs (and up to ``final_wait_s()`` after its
    last trial); what is still unwritten then is kept in ``spool_dir/pending.json`` and in
    Tune's state and written by the next run of this callback (``--resume``). No store error
    reaches Tune, so an outage never ends the ablation.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        tags: dict[str, str],
        params_of: dict[str, dict[str, Any]],
        spool_dir: str | Path | None = None,
        final_flush_s: float | None = None,
    ) -> None:
        """params_of: pair-set name -> MLflow params shared by its trials (seed is added).
        spool_dir: where queued artifacts and the unwritten queue are kept (a temporary
        folder when None; the ablation passes one beside its Tune state).
        final_flush_s: seconds the ablation's end waits for a store that is away; None reads
        ``$CONACLIP_MLFLOW_FINAL_FLUSH_S`` when the ablation ends, else ``FINAL_FLUSH_S``."""
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.tags = dict(tags)
        self.params_of = params_of
        self.spool_dir = str(spool_dir) if spool_dir is not None else None
        self.final_flush_s = final_flush_s
        self._client = None
        self._experiment_id: str | None = None
        self._runs: dict[str, str] = {}
        self._parent: str | None = None
        self._trials: dict[str, dict[str, Any]] = {}  # trial id -> pair_set, seed, baseline
        self._pending: list[dict[str, Any]] = []  # writes not yet in the store, in order
        self._seq = 0
        self._written_seq = 0  # the last sequence number written (or refused) by the store
        self._recorded_seq = 0  # the last one kept in WRITTEN_FILE
        # Names this logger's writes in WRITTEN_FILE; pickled with it, so the logger Tune
        # restores for --resume reads its own record.
        self._token = uuid.uuid4().hex
        self._next_try = 0.0
        self._away_since: float | None = None
        self.say: Callable[[str], None] = _stderr

    # The client is rebuilt after unpickling (Tune stores callbacks with the experiment state).
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_client"] = None
        state["say"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A logger pickled before the written record existed has no token: it filters nothing.
        self.__dict__.update({"_written_seq": 0, "_recorded_seq": 0, "_token": None, **state})
        self.say = _stderr

    # Tune checkpoints this with its experiment state: a driver killed during an outage
    # leaves its queue there, and the restored callback writes it.
    def get_state(self) -> dict[str, Any]:
        return {"pending": list(self._pending), "trials": dict(self._trials), "seq": self._seq}

    def set_state(self, state: dict[str, Any]) -> None:
        self._merge(state.get("pending", []))
        self._trials.update(state.get("trials", {}))
        self._seq = max(self._seq, int(state.get("seq", 0)))

    def _merge(self, ops: list[dict[str, Any]]) -> None:
        """Add ``ops`` not already queued (by sequence number), keeping the order."""
        known = {op["seq"] for op in self._pending}
        self._pending = sorted(
            [*self._pending, *(op for op in ops if op["seq"] not in known)],
            key=lambda op: op["seq"],
        )

    @property
    def client(self):
        if self._client is None:
            # The client only once the experiment is known: a store away at this moment
            # raises here, and the next attempt asks again.
            experiment_id = tracking.get_or_create_experiment(self.tracking_uri, self.experiment)
            self._experiment_id = experiment_id
            self._client = tracking.client(self.tracking_uri)
        return self._client

    def _parent_run_id(self) -> str:
        if getattr(self, "_parent", None) is None:
            self.client  # noqa: B018  (creates the experiment first)
            self._parent = tracking.summary_run_id(self.tracking_uri, self.experiment)
        return self._parent

    def _run_id(self, trial_id: str) -> str:
        if trial_id in self._runs:
            return self._runs[trial_id]
        client = self.client
        existing = client.search_runs(
            [self._experiment_id],
            filter_string=f"tags.`conaclip.trial_id` = '{trial_id}'",
            max_results=1,
        )
        if existing:
            run_id = existing[0].info.run_id
        else:
            info = self._trials[trial_id]
            pair_set = info["pair_set"]
            tags = {
                **self.tags,
                tracking.PARENT_TAG: self._parent_run_id(),
                "conaclip.trial_id": trial_id,
                "conaclip.pair_set": pair_set,
                "conaclip.baseline": str(pair_set == info.get("baseline")).lower(),
                "conaclip.status": "RUNNING",
            }
            run = client.create_run(
                self._experiment_id, run_name=f"{pair_set} seed{info['seed']}", tags=tags
            )
            run_id = run.info.run_id
            from mlflow.entities import Param

            params = {**self.params_of[pair_set], "seed": info["seed"]}
            # One request for the ~36 settings of a trial, not one per parameter.
            client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
        self._runs[trial_id] = run_id
        return run_id

    # -- the queue ---------------------------------------------------------------------------

    def _enqueue(self, op: dict[str, Any]) -> None:
        self._seq += 1
        self._pending.append({**op, "seq": self._seq})
        self.flush()

    def flush(self, force: bool = False) -> bool:
        """Write queued operations in order until one fails; True when none is left.
        Between failed attempts it waits ``RETRY_EVERY_S`` unless ``force``."""
        if not self._pending:
            return True
        if not force and time.monotonic() < self._next_try:
            return False
        with _single_attempt():
            while self._pending:
                op = self._pending[0]
                try:
                    self._apply(op)
                except Exception as error:  # any store error; sorted below
                    if is_permanent(error):
                        self.say(f"MLflow refused {op['op']} of trial {op['trial']}: "
                                 f"{_reason(error)}; dropped")  # fmt: skip
                        self._pending.pop(0)
                        self._written_seq = max(self._written_seq, op["seq"])
                        continue
                    self._note_away(error)
                    self._record_written()
                    return False
                self._pending.pop(0)
                self._written_seq = max(self._written_seq, op["seq"])
        self._record_written()
        if self._away_since is not None:
            self.say(f"MLflow at {self.tracking_uri} answers again after "
                     f"{time.monotonic() - self._away_since:.0f} s; every held update is "
                     "written")  # fmt: skip
            self._away_since = None
        return True

    def _note_away(self, error: Exception) -> None:
        self._next_try = time.monotonic() + RETRY_EVERY_S
        if self._away_since is None:
            self._away_since = time.monotonic()
            self.say(f"MLflow at {self.tracking_uri} does not answer ({_reason(error)}); "
                     f"holding {len(self._pending)} update(s) and retrying every "
                     f"{RETRY_EVERY_S:.0f} s while trials go on")  # fmt: skip

    def _apply(self, op: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        run_id = self._run_id(op["trial"])
        client = self.client
        kind = op["op"]
        if kind == "start":
            client.update_run(run_id, status="RUNNING")
            client.set_tag(run_id, "conaclip.status", "RUNNING")
        elif kind == "metrics":
            metrics = [Metric(k, v, ts, step) for k, v, ts, step in op["metrics"]]
            client.log_batch(run_id, metrics=metrics)
        elif kind == "artifact":
            if Path(op["path"]).is_file():
                client.log_artifact(run_id, op["path"])
        elif kind == "finish":
            client.set_tag(run_id, "conaclip.status", op["status"])
            if op.get("error"):
                client.set_tag(run_id, "conaclip.error", op["error"][:4000])
            elif "conaclip.error" in client.get_run(run_id).data.tags:
                client.delete_tag(run_id, "conaclip.error")  # an earlier failure, now retried
            client.set_terminated(run_id, status=op["status"])
        else:
            raise ValueError(f"unknown queued operation {kind!r}")

    def _record_written(self) -> None:
        """Keeps ``_written_seq`` in WRITTEN_FILE (when the ablation gave a spool folder and
        something was written since the last record), atomically: a crash mid-write must not
        lose the record of earlier runs."""
        seq = self._written_seq
        token = self._token
        if self.spool_dir is None or token is None or seq <= self._recorded_seq:
            return
        path = self._spool() / WRITTEN_FILE
        record = _read_json(path)
        record[token] = max(int(record.get(token, 0)), seq)
        scratch = path.with_suffix(".tmp")
        scratch.write_text(json.dumps(record))
        scratch.replace(path)
        self._recorded_seq = seq

    def _spool(self) -> Path:
        if self.spool_dir is None:
            self.spool_dir = tempfile.mkdtemp(prefix="conaclip-mlflow-spool-")
        path = Path(self.spool_dir)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _keep_artifact(self, trial_id: str, source: Path) -> str:
        """A copy of ``source`` that outlives the checkpoint holding it (Train keeps only the
        newest two), so a queued upload still finds its file after a long outage."""
        target = self._spool() / trial_id / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        return str(target)

    # -- Tune's hooks ------------------------------------------------------------------------

    def setup(self, **info) -> None:
        """Picks up the queue an earlier run of this ablation could not write."""
        if self.spool_dir is None:
            return
        # Own writes Tune's saved state lists as pending but this logger made after saving it.
        written = int(_read_json(Path(self.spool_dir) / WRITTEN_FILE).get(self._token, 0))
        if written:
            self._pending = [op for op in self._pending if op["seq"] > written]
            self._written_seq = max(self._written_seq, written)
            self._recorded_seq = self._written_seq
            self._seq = max(self._seq, written)
        spooled = Path(self.spool_dir) / SPOOL_FILE
        if spooled.is_file():
            state = json.loads(spooled.read_text())
            self.set_state(state)
            spooled.unlink()
            self.say(f"MLflow: writing {len(self._pending)} update(s) held from an earlier run")
            self.flush(force=True)

    def on_step_begin(self, iteration, trials, **info) -> None:
        self.flush()

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        config = trial.config
        self._trials[trial.trial_id] = {
            "pair_set": config["pair_set"],
            "seed": config["seed"],
            "baseline": config.get("baseline"),
        }
        self._enqueue({"op": "start", "trial": trial.trial_id})

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        step = int(result.get("step", result.get("training_iteration", 0)))
        now = int(time.time() * 1000)
        metrics = [
            (key.replace("@", "_at_"), float(value), now, step)
            for key, value in result.items()
            if key not in TUNE_KEYS
            and isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(float(value))
        ]
        if metrics:
            self._enqueue({"op": "metrics", "trial": trial.trial_id, "metrics": metrics})
        self._log_ranks(trial.trial_id, result.get("checkpoint_path"))

    def _log_ranks(self, trial_id: str, checkpoint_path: Any) -> None:
        from trainers.distill import RANKS_FILE

        if not checkpoint_path:
            return
        # Train's storage is a local or shared filesystem path for every cluster we configure;
        # a URI storage would need its filesystem, and then the ranks are simply not logged.
        ranks = Path(str(checkpoint_path)) / RANKS_FILE
        if ranks.is_file():
            kept = self._keep_artifact(trial_id, ranks)
            self._enqueue({"op": "artifact", "trial": trial_id, "path": kept})

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._enqueue({"op": "finish", "trial": trial.trial_id, "status": "FINISHED"})

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        from orchestrator.trial import trial_error_reason

        where = getattr(trial, "error_file", None) or getattr(trial, "path", "")
        reason = trial_error_reason(trial)
        error = f"{reason} (details: {where})" if reason else f"see {where}"
        info = self._trials.get(trial.trial_id, {})
        # The one line an operator needs, printed when it happens, not only at the end.
        self.say(f"trial {info.get('pair_set', trial.trial_id)} seed {info.get('seed', '?')} "
                 f"FAILED: {error}")  # fmt: skip
        self._enqueue({"op": "finish", "trial": trial.trial_id, "status": "FAILED", "error": error})

    def final_wait_s(self) -> float:
        """``final_flush_s``, else ``$CONACLIP_MLFLOW_FINAL_FLUSH_S``, else ``FINAL_FLUSH_S``.
        Read when the ablation ends, not when the logger is built: Tune restores the logger
        pickled at the ablation's start, and the environment of the resuming run decides."""
        if self.final_flush_s is not None:
            return self.final_flush_s
        text = os.environ.get(FINAL_FLUSH_ENV, "").strip()
        if not text:
            return FINAL_FLUSH_S
        try:
            seconds = float(text)
        except ValueError:
            seconds = -1.0
        if not (math.isfinite(seconds) and seconds >= 0):
            # A typo must not cost the queue: fall back to the default wait and say so.
            self.say(f"{FINAL_FLUSH_ENV}={text!r} is not a number of seconds >= 0; waiting "
                     f"the default {FINAL_FLUSH_S:.0f} s")  # fmt: skip
            return FINAL_FLUSH_S
        return seconds

    def resume_command(self) -> str:
        """The command that writes the spool: with ``--out`` and ``--name`` when the spool is
        where the ablation keeps it (``<out>/tune/<experiment>.mlflow-spool``); the experiment
        names the ablation (or the race / greedy run whose rounds share it)."""
        if self.spool_dir is not None:
            spool = Path(self.spool_dir)
            if spool.parent.name == "tune" and spool.name == f"{self.experiment}.mlflow-spool":
                out = str(spool.parent.parent)
                return shlex.join(
                    ["conaclip", "ablate", "--resume", "--out", out, "--name", self.experiment]
                )
        return "conaclip ablate --resume"

    def on_experiment_end(self, trials, **info) -> None:
        """Waits up to ``final_wait_s()`` for the store; spools what it could not write and
        says where it is and which command writes it."""
        wait_s = self.final_wait_s()
        deadline = time.monotonic() + wait_s
        while not self.flush(force=True) and time.monotonic() < deadline:
            time.sleep(min(RETRY_EVERY_S, max(0.0, deadline - time.monotonic())))
        if self._pending:
            spooled = self._spool() / SPOOL_FILE
            spooled.write_text(json.dumps(self.get_state()))
            self.say(f"MLflow at {self.tracking_uri} still does not answer after "
                     f"{wait_s:.0f} s: {len(self._pending)} update(s) of "
                     f"{len({op['trial'] for op in self._pending})} trial(s) kept in "
                     f"{spooled}; once it answers, `{self.resume_command()}` writes "
                     "them")  # fmt: skip
