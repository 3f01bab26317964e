"""One MLflow run per Tune trial, written by the Tune driver alone (a ``tune.Callback``),
nested under the ablation's own run (``tracking.summary_run_id``), which holds its reports.

Runs are found again by their ``conaclip.trial_id`` tag, so a restored ablation keeps logging
into the run its trial started instead of opening a second one: after ``--resume`` the
experiment still holds exactly one run per trial. Metric names never contain '@'.

Each reported checkpoint's per-query eval ranks (``eval_ranks.npz``, written by the training
loop) are logged as the run's artifact of that name, replaced at every eval, so the run's final
artifact belongs to its final metrics: the table's bootstrap intervals are computed from it.
"""

from __future__ import annotations

import math
import time
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


class MlflowTrialLogger(Callback):
    """Params, tags and every reported metric of each trial, plus its final status."""

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        tags: dict[str, str],
        params_of: dict[str, dict[str, Any]],
    ) -> None:
        """params_of: pair-set name -> MLflow params shared by its trials (seed is added)."""
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.tags = dict(tags)
        self.params_of = params_of
        self._client = None
        self._experiment_id: str | None = None
        self._runs: dict[str, str] = {}
        self._parent: str | None = None

    # The client is rebuilt after unpickling (Tune stores callbacks with the experiment state).
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_client"] = None
        return state

    @property
    def client(self):
        if self._client is None:
            self._client = tracking.client(self.tracking_uri)
            self._experiment_id = tracking.get_or_create_experiment(
                self.tracking_uri, self.experiment
            )
        return self._client

    def _parent_run_id(self) -> str:
        if getattr(self, "_parent", None) is None:
            self.client  # noqa: B018  (creates the experiment first)
            self._parent = tracking.summary_run_id(self.tracking_uri, self.experiment)
        return self._parent

    def _run_id(self, trial) -> str:
        if trial.trial_id in self._runs:
            return self._runs[trial.trial_id]
        client = self.client
        existing = client.search_runs(
            [self._experiment_id],
            filter_string=f"tags.`conaclip.trial_id` = '{trial.trial_id}'",
            max_results=1,
        )
        if existing:
            run_id = existing[0].info.run_id
            client.update_run(run_id, status="RUNNING")
        else:
            config = trial.config
            pair_set = config["pair_set"]
            tags = {
                **self.tags,
                tracking.PARENT_TAG: self._parent_run_id(),
                "conaclip.trial_id": trial.trial_id,
                "conaclip.pair_set": pair_set,
                "conaclip.baseline": str(pair_set == config.get("baseline")).lower(),
                "conaclip.status": "RUNNING",
            }
            run = client.create_run(
                self._experiment_id, run_name=f"{pair_set} seed{config['seed']}", tags=tags
            )
            run_id = run.info.run_id
            params = {**self.params_of[pair_set], "seed": config["seed"]}
            for key, value in params.items():
                client.log_param(run_id, key, value)
        self._runs[trial.trial_id] = run_id
        return run_id

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._run_id(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        from mlflow.entities import Metric

        run_id = self._run_id(trial)
        step = int(result.get("step", result.get("training_iteration", 0)))
        now = int(time.time() * 1000)
        metrics = [
            Metric(key.replace("@", "_at_"), float(value), now, step)
            for key, value in result.items()
            if key not in TUNE_KEYS
            and isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(float(value))
        ]
        if metrics:
            self.client.log_batch(run_id, metrics=metrics)
        self._log_ranks(run_id, result.get("checkpoint_path"))

    def _log_ranks(self, run_id: str, checkpoint_path: Any) -> None:
        from trainers.distill import RANKS_FILE

        if not checkpoint_path:
            return
        # Train's storage is a local or shared filesystem path for every cluster we configure;
        # a URI storage would need its filesystem, and then the ranks are simply not logged.
        ranks = Path(str(checkpoint_path)) / RANKS_FILE
        if ranks.is_file():
            self.client.log_artifact(run_id, str(ranks))

    def _finish(self, trial, status: str, error: str | None = None) -> None:
        run_id = self._run_id(trial)
        client = self.client
        client.set_tag(run_id, "conaclip.status", status)
        if error:
            client.set_tag(run_id, "conaclip.error", error[:4000])
        client.set_terminated(run_id, status=status)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._finish(trial, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        where = getattr(trial, "error_file", None) or getattr(trial, "path", "")
        self._finish(trial, "FAILED", error=f"see {where}")
