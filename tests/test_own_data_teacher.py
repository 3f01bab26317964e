"""A run on the user's own shards distils from the teacher trained on those shards, never from
the built-in data's; several candidates stop the run with the choices named; the teacher and
its data are named on the ablation's MLflow run. (The same path through the CLI, on shards
img2dataset wrote, is tests/test_img2dataset.py.)"""

from __future__ import annotations

import json
import shutil

import pytest

from orchestrator import tracking
from orchestrator.assets import resolve_run, teacher_provenance, teachers_trained_on
from orchestrator.config import Workspace
from trainers.errors import InputError
from trainers.run_config import DistillConfig
from trainers.teacher import RESULT_FILE


def _install(tiny_teacher, workspace: Workspace, tag: str, trained_on: str | None = None):
    """A copy of the real tiny teacher under ``workspace`` as a teacher of its own (its
    record optionally saying it was trained on other shards); returns its checkpoint."""
    target = workspace.teacher_dir / f"conaclip-teacher-{tag}"
    shutil.copytree(tiny_teacher.checkpoint.parent, target)
    if trained_on is not None:
        record = target / RESULT_FILE
        saved = json.loads(record.read_text())
        saved["config"]["train_shards"] = trained_on
        record.write_text(json.dumps(saved))
    return target / tiny_teacher.checkpoint.name


def test_a_run_on_own_shards_uses_the_teacher_of_those_shards(tiny_shapes, tiny_teacher, tmp_path):
    workspace = Workspace(home=tmp_path / "home")
    train, evals = str(tiny_shapes.out_dir / "train"), str(tiny_shapes.out_dir / "eval")
    cfg = DistillConfig(pairs="intra_ts:infonce", train_shards=train, eval_shards=evals)
    first = _install(tiny_teacher, workspace, "a")
    _install(tiny_teacher, workspace, "b", trained_on=evals)  # a teacher of other shards
    assert teachers_trained_on(workspace, train) == [first]
    # The same files named another way (a glob) are the same data.
    assert teachers_trained_on(workspace, f"{train}/*.tar") == [first]
    resolved = resolve_run(cfg, workspace, use_teacher_cache=False)
    assert resolved.teacher_checkpoint == str(first)
    assert not workspace.data_dir.exists()  # the built-in data set was never generated
    assert teacher_provenance(resolved) == (f"conaclip-teacher ({first})", train)

    second = _install(tiny_teacher, workspace, "c")
    with pytest.raises(InputError) as raised:
        resolve_run(cfg, workspace, use_teacher_cache=False)
    message = str(raised.value)
    assert "\n" not in message and "--teacher-checkpoint" in message
    assert str(first) in message and str(second) in message and train in message
    # A checkpoint named by the user is used as it is.
    chosen = cfg.model_copy(update={"teacher_checkpoint": str(second)})
    assert resolve_run(chosen, workspace, False).teacher_checkpoint == str(second)


def test_provenance_of_a_checkpoint_conaclip_did_not_train(tmp_path):
    weights = tmp_path / "open_clip_pytorch_model.bin"
    weights.write_bytes(b"")
    cfg = DistillConfig(pairs="intra_ts:infonce", teacher="ViT-B-32",
                        teacher_checkpoint=str(weights))  # fmt: skip
    name, trained_on = teacher_provenance(cfg)
    assert name == f"ViT-B-32 ({weights})"
    assert trained_on == "not trained by conaclip (the checkpoint's own pre-training)"


def test_the_ablation_run_names_its_teacher_and_data(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    tracking.get_or_create_experiment(uri, "own-data")
    tracking.record_teacher(uri, "own-data", "conaclip-teacher (/t/w.pt)", "/data/train")
    run = tracking.client(uri).get_run(tracking.summary_run_id(uri, "own-data"))
    assert run.data.tags[tracking.TEACHER_TAG] == "conaclip-teacher (/t/w.pt)"
    assert run.data.tags[tracking.TEACHER_DATA_TAG] == "/data/train"
