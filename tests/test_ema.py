"""The student's exponential moving average (ema_decay): torch's AveragedModel by hand, in the
bare loop (what it evaluates, what the checkpoint keeps, resume) and in the export. No Ray."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_distill import Recorder, base_config  # the same tiny run settings
from torch import nn

from trainers import distill
from trainers.distill import CHECKPOINT_FILE, RANKS_FILE, student_ema, train_loop_per_worker
from trainers.errors import InputError
from trainers.eval_cache import load_eval_set_cached
from trainers.evaluate import evaluate_retrieval
from trainers.export import EMA_STATE, load_student_checkpoint, student_state
from trainers.models import build_student
from trainers.run_config import load_distill_config

DECAY = 0.5


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(2))
        # Like open_clip's causal attention mask: a constant buffer with -inf entries.
        self.register_buffer("mask", torch.tensor([0.0, float("-inf")]), persistent=False)


def test_the_average_is_the_ema_recursion_by_hand():
    model = Tiny()
    ema = student_ema(model, DECAY)
    seen = []
    for value in (1.0, 3.0, 7.0):
        with torch.no_grad():
            model.weight.fill_(value)
        ema.update_parameters(model)
        seen.append(ema.module.weight[0].item())
    # First update copies the model (1); then 0.5 x 1 + 0.5 x 3 = 2; 0.5 x 2 + 0.5 x 7 = 4.5.
    assert seen == [1.0, 2.0, 4.5]
    # The mask stays -inf: a foreach lerp would make it -inf + w x NaN = NaN.
    assert ema.module.mask.tolist() == [0.0, float("-inf")]
    assert int(ema.n_averaged) == 3


def test_ema_decay_is_off_by_default_and_must_lie_in_0_1():
    assert load_distill_config({}).ema_decay is None
    for bad in (0, 1, 1.5, -0.1):
        with pytest.raises(InputError, match="ema_decay"):
            load_distill_config({"ema_decay": bad})


def _recording_steps(monkeypatch) -> list[dict[str, torch.Tensor]]:
    """The student's state after every optimizer step of the runs that follow."""
    trajectory: list[dict[str, torch.Tensor]] = []
    original = distill.DistillationRun._train_step

    def spy(self, batch):
        losses = original(self, batch)
        trajectory.append({k: v.detach().clone() for k, v in self.student.state_dict().items()})
        return losses

    monkeypatch.setattr(distill.DistillationRun, "_train_step", spy)
    return trajectory


def _by_hand(trajectory: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """e_1 = theta_1, e_k = DECAY x e_(k-1) + (1 - DECAY) x theta_k, tensor by tensor."""
    average = dict(trajectory[0])
    for state in trajectory[1:]:
        average = {k: DECAY * average[k] + (1 - DECAY) * state[k] for k in average}
    return average


def _assert_states_equal(actual, expected) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=0, atol=1e-6, msg=key)


def test_a_run_evaluates_and_checkpoints_the_average(
    tiny_shapes, tiny_teacher, tmp_path, monkeypatch
):
    trajectory = _recording_steps(monkeypatch)
    recorder = Recorder()
    config = base_config(tiny_shapes, tiny_teacher, tmp_path, steps=3, eval_every=3)
    train_loop_per_worker({**config, "ema_decay": DECAY, "lr": 1e-2}, recorder)
    ((metrics, checkpoint),) = recorder.reports
    state = torch.load(f"{checkpoint}/{CHECKPOINT_FILE}", weights_only=True)
    assert len(trajectory) == 3 and state["ema_updates"] == 3
    _assert_states_equal(state[EMA_STATE], _by_hand(trajectory))
    # The checkpoint still trains on from the student itself, which the average is not.
    _assert_states_equal(state["student"], trajectory[-1])
    assert not torch.equal(
        state[EMA_STATE]["clip.logit_scale"], state["student"]["clip.logit_scale"]
    )
    # The reported recalls and the eval ranks are the average's: scoring the exported weights
    # (load_student_checkpoint prefers them) on the same eval set gives them again.
    exported = load_student_checkpoint(f"{checkpoint}/{CHECKPOINT_FILE}", "conaclip-student-xs")
    _assert_states_equal(exported.state_dict(), state[EMA_STATE])
    _, loaded = build_student("conaclip-student-xs", teacher_embed_dim=None)
    eval_set = load_eval_set_cached(
        str(tiny_shapes.out_dir / "eval"), loaded.preprocess_eval, loaded.tokenizer, None
    )
    ranks: dict[str, torch.Tensor] = {}
    again = evaluate_retrieval(
        lambda x: exported.clip.encode_image(x, normalize=True),
        lambda t: exported.clip.encode_text(t, normalize=True),
        eval_set.images,
        eval_set.tokens,
        eval_set.text_to_image,
        ranks_out=ranks,
        fold_size=1000,
    )
    assert again["rsum"] == pytest.approx(metrics["rsum"], abs=1e-9)
    with np.load(f"{checkpoint}/{RANKS_FILE}") as saved:
        for name, value in ranks.items():
            assert np.array_equal(saved[name], value.numpy()), name


class _Crash(RuntimeError):
    pass


def _crash_at_first_report(metrics, checkpoint_dir):
    raise _Crash  # the step's checkpoint is on disk by now, as when a worker dies after it


def test_resume_carries_on_the_same_average(tiny_shapes, tiny_teacher, tmp_path, monkeypatch):
    trajectory = _recording_steps(monkeypatch)
    config = base_config(tiny_shapes, tiny_teacher, tmp_path, steps=4, eval_every=2)
    config |= {"ema_decay": DECAY, "lr": 1e-2}
    with pytest.raises(_Crash):
        train_loop_per_worker(config, _crash_at_first_report)
    assert len(trajectory) == 2
    recorder = Recorder()
    train_loop_per_worker(config, recorder)  # resumes from the step-2 checkpoint
    assert [m["step"] for m, _ in recorder.reports] == [4] and len(trajectory) == 4
    state = torch.load(f"{recorder.reports[-1][1]}/{CHECKPOINT_FILE}", weights_only=True)
    # One average over all four steps, as a run that never stopped keeps it: the resumed run
    # went on from the saved average (a fresh one would restart at theta_3).
    assert state["ema_updates"] == 4
    _assert_states_equal(state[EMA_STATE], _by_hand(trajectory))
    restarted = _by_hand(trajectory[2:])
    assert not torch.allclose(
        state[EMA_STATE]["clip.logit_scale"], restarted["clip.logit_scale"], atol=1e-7
    )


def test_export_prefers_the_average_and_falls_back_to_the_student(tmp_path):
    trained, _ = build_student("conaclip-student-xs", teacher_embed_dim=None)
    average, _ = build_student("conaclip-student-xs", teacher_embed_dim=None)
    with torch.no_grad():
        average.clip.logit_scale.fill_(1.5)
        trained.clip.logit_scale.fill_(0.5)
    plain = {"student": trained.state_dict()}
    assert student_state(plain) is plain["student"]
    with_ema = {**plain, EMA_STATE: average.state_dict()}
    assert student_state(with_ema) is with_ema[EMA_STATE]
    for state, expected in ((plain, 0.5), (with_ema, 1.5)):
        path = tmp_path / f"{expected}.pt"
        torch.save(state, path)
        loaded = load_student_checkpoint(path, "conaclip-student-xs")
        assert loaded.clip.logit_scale.item() == expected
