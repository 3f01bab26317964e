"""MLflow set-up and queries: tracking URIs, experiments, runs -> pandas, summary artifacts.

Every function takes the tracking URI and builds its own ``MlflowClient``; nothing touches
``mlflow.set_tracking_uri`` (process-wide state). Run layout written by the ablation (one
experiment per ablation): params ``pairs`` (``PairSet.key()``), ``pair_set``, ``seed``,
``student``, ``teacher``, ``steps``, ``batch_size``; tags ``conaclip.preset``,
``conaclip.ablation_id``, ``conaclip.trial_id``, ``conaclip.pair_set``, ``conaclip.baseline``
("true" on baseline runs), ``conaclip.status``; metrics by training step. A run tagged
``conaclip.summary=true`` holds the experiment's table and heatmap and is never a trial.
"""

from __future__ import annotations

import contextlib
import json
import re
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import numpy as np
import pandas as pd

from orchestrator.scoped_env import scoped_env
from trainers.errors import InputError

if TYPE_CHECKING:
    from mlflow.entities import Experiment
    from mlflow.tracking import MlflowClient

SUMMARY_TAG = "conaclip.summary"
# MLflow 3 opens an experiment on its GenAI overview unless told it holds training runs.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# A view of the runs page stored on the experiment: MLflow's UI loads a shared view from the
# experiment tag mlflow.sharedViewState.<key> when its URL carries viewStateShareKey=<key>
# (what its "Share" button writes). Without it the runs page shows no metric column at all.
RUNS_VIEW_KEY = "conaclip-runs"
RUNS_VIEW_TAG = f"mlflow.sharedViewState.{RUNS_VIEW_KEY}"
RUNS_VIEW_PARAMS = ("pair_set", "seed")
RUNS_VIEW_METRICS = ("rsum", "t2i_R1", "i2t_R1", "mean_recall")
NOTE_TAG = "mlflow.note.content"  # the description the UI shows on the experiment page
PARENT_TAG = "mlflow.parentRunId"  # nests a trial's run under the ablation's run
# Per-query eval ranks a trial logs at its final evaluation (see read_eval_ranks).
EVAL_RANKS_ARTIFACT = "eval_ranks.npz"
ABLATION_TAG = "conaclip.ablation_id"
BASE_COLUMNS = ("run_id", "run_name", "experiment_id", "status", "start_time", "end_time")
# A race's design on its experiment: the table of a race reads its looks from there.
RACE_TAG = "conaclip.race"  # JSON: start_seeds, max_seeds, first_seed, spending, margin, metric
MARGIN_TAG = "conaclip.margin"  # the equivalence margin the last table used
# On the ablation's run: the teacher its students were distilled from, and its training data.
TEACHER_TAG = "conaclip.teacher"
TEACHER_DATA_TAG = "conaclip.teacher_trained_on"
# Database back ends MLflow accepts besides sqlite; they are checked by MLflow itself.
_DB_SCHEMES = ("postgresql", "mysql", "mssql")


def default_tracking_uri(out_dir: str | Path) -> str:
    """``sqlite:////abs/out/mlruns.db``: MLflow 3 refuses the plain file store."""
    return f"sqlite:///{(Path(out_dir).resolve() / 'mlruns.db').as_posix()}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, None for other URIs."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///"))


def check_tracking_uri(uri: str, *, must_exist: bool = False, timeout_s: float = 3.0) -> None:
    """One-line InputError when ``uri`` cannot work.

    http(s): the server must answer within ``timeout_s`` seconds (any HTTP status counts as
    an answer). sqlite: the database's directory must exist or be creatable; with
    ``must_exist`` (reading commands) the database file must already exist, since MLflow would
    otherwise create an empty one. Plain paths and ``file:`` are refused: MLflow 3 dropped the
    file store.
    """
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        _check_server(uri, timeout_s)
        return
    path = sqlite_path(uri)
    if path is not None:
        if must_exist and not path.is_file():
            raise InputError(
                f"--tracking-uri {uri}: no MLflow database at {path} (run conaclip ablate first, "
                "or pass the --out / --tracking-uri the ablation used)"
            )
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise InputError(
                f"--tracking-uri {uri}: cannot create {path.parent} ({error.strerror})"
            ) from None
        return
    if scheme.split("+")[0] in _DB_SCHEMES:
        return
    raise InputError(
        f"--tracking-uri {uri}: expected sqlite:///ABS/PATH/mlruns.db, http(s)://HOST:PORT or a "
        "database URL (MLflow 3 has no file store)"
    )


def _check_server(uri: str, timeout_s: float) -> None:
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s):
            return
    except urllib.error.HTTPError:
        return  # the server answered, even if not with 200
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        raise InputError(f"MLflow server at {uri} is not reachable: {reason}") from None


def client(tracking_uri: str) -> MlflowClient:
    """An ``MlflowClient`` bound to ``tracking_uri`` (mlflow is imported here, on first use)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def safe_name(name: str) -> str:
    """``name`` as one folder name (an experiment's artifacts, its reports): each run of
    characters other than ASCII letters, digits, ``.``, ``_`` and ``-`` becomes ``_``, with
    ``_`` stripped from both ends, and "experiment" if nothing is left."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "experiment"


def get_or_create_experiment(
    tracking_uri: str,
    name: str,
    artifact_location: str | Path | None = None,
    description: str | None = None,
) -> str:
    """Id of the experiment ``name``, created if missing, tagged as holding training runs (so
    MLflow's UI opens it on its runs) and, with ``description``, carrying that text as its
    description. With a sqlite store the artifacts go beside the database
    (``<db dir>/mlartifacts/<name>``) unless ``artifact_location`` says otherwise: MLflow's own
    default is ``./mlruns`` under whatever directory the process runs in.
    """
    mlflow_client = client(tracking_uri)
    existing = mlflow_client.get_experiment_by_name(name)
    if existing is not None:
        experiment_id = existing.experiment_id
    else:
        db = sqlite_path(tracking_uri)
        if artifact_location is None and db is not None:
            artifact_location = db.parent / "mlartifacts" / safe_name(name)
        location = Path(artifact_location).resolve().as_uri() if artifact_location else None
        experiment_id = mlflow_client.create_experiment(
            name, artifact_location=location, tags=EXPERIMENT_KIND
        )
    if description:
        mlflow_client.set_experiment_tag(experiment_id, NOTE_TAG, description)
    set_runs_view(tracking_uri, experiment_id)
    return experiment_id


def runs_view_state(metric: str = "rsum") -> dict[str, Any]:
    """The runs page as conaclip users read it: pair set, seed and the recall metrics as
    columns, best ``metric`` first. Column keys are the UI's own (``metrics.`rsum```)."""
    columns = [f"params.`{p}`" for p in RUNS_VIEW_PARAMS]
    columns += [f"metrics.`{m}`" for m in dict.fromkeys((metric, *RUNS_VIEW_METRICS))]
    return {
        "selectedColumns": columns,
        "orderByKey": f"metrics.`{metric}`",
        "orderByAsc": False,
    }


def set_runs_view(tracking_uri: str, experiment_id: str, metric: str = "rsum") -> None:
    """Store ``runs_view_state`` on the experiment (tag ``RUNS_VIEW_TAG``), which the link of
    ``orchestrator.mlflow_ui.runs_page_url`` opens."""
    client(tracking_uri).set_experiment_tag(
        experiment_id, RUNS_VIEW_TAG, json.dumps(runs_view_state(metric))
    )


def _is_conaclip(mlflow_client: MlflowClient, experiment_id: str) -> bool:
    runs = mlflow_client.search_runs(
        [experiment_id], filter_string=f"tags.`{ABLATION_TAG}` LIKE '%'", max_results=1
    )
    return bool(runs)


def find_experiment(tracking_uri: str, name: str | None = None) -> Experiment:
    """The experiment called ``name``; for None the most recently created experiment that has
    a run tagged ``conaclip.ablation_id``. InputError naming the known experiments otherwise."""
    mlflow_client = client(tracking_uri)
    experiments = mlflow_client.search_experiments(order_by=["creation_time DESC"])
    if name is not None:
        for experiment in experiments:
            if experiment.name == name:
                return experiment
    else:
        for experiment in experiments:
            if _is_conaclip(mlflow_client, experiment.experiment_id):
                return experiment
    known = sorted(e.name for e in experiments if e.name != "Default")
    wanted = f"experiment {name!r} not found" if name else "no conaclip experiment"
    listing = f"known experiments: {', '.join(known)}" if known else "it has no experiments"
    raise InputError(f"{wanted} in {tracking_uri}; {listing}")


def _row(run: Any) -> dict[str, Any]:
    info, data = run.info, run.data
    row: dict[str, Any] = {
        "run_id": info.run_id,
        "run_name": info.run_name,
        "experiment_id": info.experiment_id,
        "status": info.status,
        "start_time": pd.to_datetime(info.start_time, unit="ms", utc=True),
        "end_time": pd.to_datetime(info.end_time, unit="ms", utc=True) if info.end_time else pd.NaT,
    }
    row.update({f"params.{k}": v for k, v in data.params.items()})
    row.update({f"tags.{k}": v for k, v in data.tags.items() if not k.startswith("mlflow.")})
    row.update({f"metrics.{k}": v for k, v in data.metrics.items()})
    return row


def runs_frame(tracking_uri: str, experiment: str | None = None) -> pd.DataFrame:
    """One row per run of the experiment (see ``find_experiment``), summary runs left out.

    Columns: ``run_id, run_name, experiment_id, status`` (MLflow's run status), ``start_time,
    end_time`` (UTC), then ``params.<name>``, ``tags.<name>`` (MLflow's own ``mlflow.*`` tags
    left out) and ``metrics.<name>``: each metric's latest logged value. Parameters and tags
    are strings, metrics floats. ``frame.attrs`` holds ``experiment``, ``experiment_id`` and
    ``tracking_uri``. Rows are ordered by start time.
    """
    found = find_experiment(tracking_uri, experiment)
    mlflow_client = client(tracking_uri)
    rows: list[dict[str, Any]] = []
    token = None
    while True:
        page = mlflow_client.search_runs(
            [found.experiment_id], max_results=1000, page_token=token, order_by=["start_time ASC"]
        )
        rows.extend(_row(r) for r in page if r.data.tags.get(SUMMARY_TAG) != "true")
        token = page.token
        if not token:
            break
    frame = pd.DataFrame(rows, columns=None if rows else list(BASE_COLUMNS))
    frame.attrs.update(
        experiment=found.name,
        experiment_id=found.experiment_id,
        tracking_uri=tracking_uri,
        experiment_tags={k: v for k, v in found.tags.items() if k.startswith("conaclip.")},
    )
    return frame


def record_race(tracking_uri: str, experiment: str, settings: Any) -> None:
    """Store a race's settings (``RaceSettings``) on its experiment, or check them against
    the ones stored: a race resumed with other looks, spending or margin would test its
    earlier rounds against boundaries they were not taken under (InputError naming both)."""
    keys = ("start_seeds", "max_seeds", "first_seed", "spending", "margin", "metric")
    wanted = {key: getattr(settings, key) for key in keys}
    found = find_experiment(tracking_uri, experiment)
    stored = found.tags.get(RACE_TAG)
    if stored is not None:
        earlier = json.loads(stored)
        if earlier != wanted:
            differ = ", ".join(f"{k} {earlier.get(k)} (now {v})" for k, v in wanted.items()
                               if earlier.get(k) != v)  # fmt: skip
            raise InputError(
                f"experiment {experiment}: this race was planned with {differ}; its looks "
                "cannot change once it has run: race under another --name"
            )
        return
    client(tracking_uri).set_experiment_tag(found.experiment_id, RACE_TAG, json.dumps(wanted))


def race_of(runs: pd.DataFrame) -> dict[str, Any] | None:
    """The race settings stored on the experiment of ``runs`` (``runs_frame`` output), None
    for a plain grid."""
    stored = runs.attrs.get("experiment_tags", {}).get(RACE_TAG)
    return None if stored is None else json.loads(stored)


def record_margin(tracking_uri: str, experiment: str, margin: float) -> None:
    """The equivalence margin of the experiment's last table, beside the table it made."""
    found = find_experiment(tracking_uri, experiment)
    client(tracking_uri).set_experiment_tag(found.experiment_id, MARGIN_TAG, repr(float(margin)))
    run_id = summary_run_id(tracking_uri, experiment)
    client(tracking_uri).set_tag(run_id, MARGIN_TAG, repr(float(margin)))


def record_teacher(tracking_uri: str, experiment: str, teacher: str, trained_on: str) -> None:
    """Name the ablation's teacher (``name (checkpoint)``) and the data it was trained on on
    the ablation's own run, beside its table."""
    run_id = summary_run_id(tracking_uri, experiment)
    mlflow_client = client(tracking_uri)
    mlflow_client.set_tag(run_id, TEACHER_TAG, teacher)
    mlflow_client.set_tag(run_id, TEACHER_DATA_TAG, trained_on)


def summary_run_id(tracking_uri: str, experiment: str) -> str:
    """The ablation's own run (tagged ``conaclip.summary=true``), created when missing: the
    parent every trial's run is nested under, holding the table, heatmap and recipe."""
    found = find_experiment(tracking_uri, experiment)
    mlflow_client = client(tracking_uri)
    runs = mlflow_client.search_runs(
        [found.experiment_id], filter_string=f"tags.`{SUMMARY_TAG}` = 'true'", max_results=1
    )
    if runs:
        return runs[0].info.run_id
    run = mlflow_client.create_run(
        found.experiment_id,
        run_name=f"{experiment} (ablation)",
        tags={SUMMARY_TAG: "true", ABLATION_TAG: experiment},
    )
    mlflow_client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def log_summary_artifact(tracking_uri: str, experiment: str, path: str | Path) -> str:
    """Log the file ``path`` (table, heatmap) to the experiment's summary run; returns its id.
    A file of the same name replaces the earlier one."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: artifact file not found")
    run_id = summary_run_id(tracking_uri, experiment)
    client(tracking_uri).log_artifact(run_id, str(path))
    return run_id


def _no_progress_bar() -> contextlib.AbstractContextManager[None]:
    # MLflow draws a tqdm bar per download: one per run would bury the table's output.
    return scoped_env("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def read_eval_ranks(
    tracking_uri: str, run_id: str, artifact: str = EVAL_RANKS_ARTIFACT
) -> dict[str, np.ndarray] | None:
    """The run's eval-ranks artifact as ``{name: array}``, None when the run has none.

    The file (``eval_ranks.npz`` at the artifact root) holds int64 arrays ``t2i_rank``
    (N_txt), ``i2t_rank`` (N_img) and ``text_to_image`` (N_txt image ids); see
    ``orchestrator.stats.check_ranks`` for their meaning. Arrays are read into memory and the
    downloaded copy is deleted. A listed but unreadable file is an InputError naming the run.
    """
    folder, _, name = artifact.rpartition("/")
    mlflow_client = client(tracking_uri)
    listed = {Path(a.path).name for a in mlflow_client.list_artifacts(run_id, folder or None)}
    if name not in listed:
        return None
    with tempfile.TemporaryDirectory(prefix="conaclip-ranks-") as tmp, _no_progress_bar():
        local = mlflow_client.download_artifacts(run_id, artifact, tmp)
        try:
            # allow_pickle=False: an artifact is data, never code.
            with np.load(local, allow_pickle=False) as archive:
                return {key: np.asarray(archive[key]) for key in archive.files}
        except (OSError, ValueError, zipfile.BadZipFile) as error:
            raise InputError(f"run {run_id}: {artifact} is not a readable .npz ({error})") from None
