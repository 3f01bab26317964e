"""The distillation loop with an injected report, its checkpoints and resume, and the teacher
cache against a live teacher forward. Everything runs on real shards and real models."""

from __future__ import annotations

import math
import tarfile
import time

import numpy as np
import pytest
import torch

from trainers.distill import CHECKPOINT_FILE, RANKS_FILE, train_loop_per_worker
from trainers.errors import InputError
from trainers.evaluate import QueryRanks, metrics_from_ranks
from trainers.optim import gradient_norm, gradient_share_weights, warmup_cosine
from trainers.run_config import KD_TEMPERATURE, PairConfig, load_distill_config, parse_pairs

RECALL_KEYS = ("t2i_R1", "t2i_R5", "t2i_R10", "i2t_R1", "i2t_R5", "i2t_R10")


def base_config(shapes, teacher, out_dir, **overrides):
    config = {
        "pairs": "intra_ts:infonce,inter_ss:kl,intra_ss:sym_kl",
        "student": "conaclip-student-xs",
        "teacher": teacher.name,
        "teacher_checkpoint": str(teacher.checkpoint),
        "train_shards": str(shapes.out_dir / "train"),
        "eval_shards": str(shapes.out_dir / "eval"),
        "steps": 4,
        "eval_every": 2,
        "batch_size": 8,
        "loader_workers": 0,
        "out_dir": str(out_dir),
    }
    config.update(overrides)
    return config


class Recorder:
    def __init__(self):
        self.reports: list[tuple[dict, str | None]] = []

    def __call__(self, metrics, checkpoint_dir):
        self.reports.append((dict(metrics), checkpoint_dir))


def test_loop_reports_every_eval_with_metrics_and_checkpoints(tiny_shapes, tiny_teacher, tmp_path):
    recorder = Recorder()
    started = time.perf_counter()
    final = train_loop_per_worker(base_config(tiny_shapes, tiny_teacher, tmp_path), recorder)
    wall = time.perf_counter() - started
    assert [m["step"] for m, _ in recorder.reports] == [2, 4]
    assert [m["samples_seen"] for m, _ in recorder.reports] == [16, 32]
    for metrics, checkpoint_dir in recorder.reports:
        for key in (*RECALL_KEYS, "rsum", "mean_recall", "samples_per_s", "skipped_samples"):
            assert key in metrics, key
        for key in ("loss_intra_ts_infonce", "loss_inter_ss_kl", "loss_intra_ss_sym_kl"):
            assert math.isfinite(metrics[key]) and metrics[key] >= 0
        # rsum is the sum of the six recalls; mean_recall its mean (percent).
        assert metrics["rsum"] == pytest.approx(sum(metrics[k] for k in RECALL_KEYS))
        assert metrics["mean_recall"] == pytest.approx(metrics["rsum"] / 6)
        assert metrics["skipped_samples"] == 0
        state = torch.load(f"{checkpoint_dir}/{CHECKPOINT_FILE}", weights_only=True)
        assert state["step"] == metrics["step"]
    assert final["step"] == 4
    # The phase timers are disjoint slices of the run: they only grow, every phase was seen
    # by the second report, and together they fit inside the call's wall-clock.
    first, second = (m for m, _ in recorder.reports)
    phases = ("setup_s", "train_s", "eval_s", "checkpoint_s")
    assert all(second[p] >= first[p] >= 0 for p in phases)
    assert all(second[p] > 0 for p in phases)
    assert first["checkpoint_s"] == 0  # the first checkpoint is counted from the next report
    assert sum(second[p] for p in phases) <= wall


def test_total_loss_is_the_weighted_sum_of_pair_losses(tiny_shapes, tiny_teacher, tmp_path):
    recorder = Recorder()
    config = base_config(
        tiny_shapes,
        tiny_teacher,
        tmp_path,
        pairs="intra_ts:infonce*2,inter_ts:sd*0.5",
        steps=1,
        eval_every=1,
    )
    train_loop_per_worker(config, recorder)
    metrics = recorder.reports[0][0]
    expected = 2 * metrics["loss_intra_ts_infonce"] + 0.5 * metrics["loss_inter_ts_sd"]
    assert metrics["loss"] == pytest.approx(expected, rel=1e-5)


def test_amp_runs_the_step_in_bfloat16_on_cpu_too(tiny_shapes, tiny_teacher, tmp_path):
    # Same init, same first batch: the first step's loss differs only by bfloat16 rounding,
    # so an autocast that was silently skipped on CPU would give exactly the float32 loss.
    losses = {}
    for amp in (False, True):
        recorder = Recorder()
        config = base_config(
            tiny_shapes, tiny_teacher, tmp_path / str(amp), steps=1, eval_every=1, amp=amp
        )
        train_loop_per_worker(config, recorder)
        losses[amp] = recorder.reports[0][0]["loss"]
    assert losses[True] != losses[False]
    assert losses[True] == pytest.approx(losses[False], rel=0.02)


def test_auto_weight_is_off_in_warm_up_then_a_gradient_share(tiny_shapes, tiny_teacher, tmp_path):
    recorder = Recorder()
    config = base_config(
        tiny_shapes, tiny_teacher, tmp_path, pairs="intra_ts:infonce*2,inter_ts:sym_kl*auto",
        steps=6, eval_every=2, warmup_steps=2, balance_steps=2, balance_share=0.5,
    )  # fmt: skip
    train_loop_per_worker(config, recorder)
    weights = [m["weight_inter_ts_sym_kl"] for m, _ in recorder.reports]
    # Measured on steps 2 and 3 (0-based step counter at the start of each step): the report
    # at step 2 still has the pair off, the later ones its fixed, measured weight.
    assert weights[0] == 0.0
    assert weights[1] > 0 and weights[2] == weights[1]
    assert all(m["weight_intra_ts_infonce"] == 2.0 for m, _ in recorder.reports)
    # What ran is what was reported: the total is the weighted sum with the reported weights.
    last = recorder.reports[-1][0]
    expected = 2 * last["loss_intra_ts_infonce"] + weights[-1] * last["loss_inter_ts_sym_kl"]
    assert last["loss"] == pytest.approx(expected, rel=1e-5)
    # The default distillation temperature of sym_kl, and the learnable one of infonce.
    assert last["temperature_inter_ts_sym_kl"] == KD_TEMPERATURE
    assert last["temperature_intra_ts_infonce"] == pytest.approx(1 / last["logit_scale"])
    # The weight survives resume: the checkpoint carries it.
    state = torch.load(f"{recorder.reports[-1][1]}/{CHECKPOINT_FILE}", weights_only=True)
    assert state["weights"]["inter_ts:sym_kl"] == weights[-1] and state["weights_resolved"]


def test_bare_runs_report_progress_between_evals(tiny_shapes, tiny_teacher, tmp_path):
    ticks = []
    config = base_config(tiny_shapes, tiny_teacher, tmp_path, steps=7, eval_every=7)
    train_loop_per_worker(config, Recorder(), progress=lambda *tick: ticks.append(tick))
    # Every PROGRESS_EVERY (5) steps and at the last step: (step, steps, samples/s, loss).
    assert [(step, total) for step, total, _, _ in ticks] == [(5, 7), (7, 7)]
    assert all(rate > 0 and math.isfinite(loss) for _, _, rate, loss in ticks)


def test_gradient_norm_and_share_weights_by_hand():
    w = torch.tensor([3.0, 4.0], requires_grad=True)
    v = torch.tensor([1.0], requires_grad=True)
    # d/dw of 0.5*|w|^2 is w -> norm 5; v is not reached and counts as zero.
    assert gradient_norm(0.5 * (w * w).sum(), [w, v]).item() == pytest.approx(5.0)
    # d/d(w, v) of 2*w0 + 2*v0 -> (2, 0, 2) -> norm sqrt(8).
    assert gradient_norm(2 * w[0] + 2 * v[0], [w, v]).item() == pytest.approx(8**0.5)
    # Sums over 4 steps: fixed 40 (mean 10), pair a 8 (mean 2), pair b 0 (no gradient).
    weights = gradient_share_weights({"fixed": 40.0, "a": 8.0, "b": 0.0}, share=0.5)
    assert weights == {"a": pytest.approx(0.5 * 10 / 2), "b": 0.0}


def test_pair_temperatures_resolve_to_their_strategy_defaults():
    pairs = (
        "intra_ts:infonce,inter_ss:kl,inter_ts:sym_kl@0.1,intra_ts:sd,inter_ss:infonce@learnable"
    )
    cfg = load_distill_config({"pairs": pairs, "kd_temperature": 0.3})
    got = {p.pair: cfg.temperature_of(p) for p in cfg.pairs}
    assert got == {"intra_ts:infonce": "learnable", "inter_ss:kl": 0.3, "inter_ts:sym_kl": 0.1,
                   "intra_ts:sd": None, "inter_ss:infonce": "learnable"}  # fmt: skip


def test_auto_weight_needs_a_fixed_reference_and_parses():
    assert parse_pairs("inter_ss:kl*auto@learnable") == [
        PairConfig(pair="inter_ss:kl", weight="auto", temperature="learnable")
    ]
    with pytest.raises(InputError, match="at least one pair needs a numeric weight"):
        load_distill_config({"pairs": "intra_ts:infonce*auto,inter_ss:kl*auto"})
    with pytest.raises(InputError, match="sym_orientation"):
        load_distill_config({"sym_orientation": "sideways"})


def test_each_eval_leaves_its_per_query_ranks(tiny_shapes, tiny_teacher, tmp_path):
    recorder = Recorder()
    train_loop_per_worker(base_config(tiny_shapes, tiny_teacher, tmp_path), recorder)
    for metrics, checkpoint_dir in recorder.reports:
        with np.load(f"{checkpoint_dir}/{RANKS_FILE}") as ranks:
            assert set(ranks.files) == {
                "t2i_rank", "t2i_ties", "i2t_rank", "i2t_ties", "i2t_own", "text_to_image"
            }  # fmt: skip
            assert ranks["t2i_rank"].shape == ranks["text_to_image"].shape
            assert ranks["t2i_ties"].shape == ranks["t2i_rank"].shape
            assert ranks["i2t_ties"].shape == ranks["i2t_own"].shape == ranks["i2t_rank"].shape
            assert ranks["i2t_own"].min() >= 1 and ranks["t2i_ties"].min() >= 0
            assert ranks["i2t_rank"].shape == (int(ranks["text_to_image"].max()) + 1,)
            again = metrics_from_ranks(QueryRanks.from_arrays(ranks))
        # The ranks are exactly what the reported recalls were computed from.
        for key in (*RECALL_KEYS, "rsum"):
            assert again[key] == pytest.approx(metrics[key]), key


def test_eval_folds_rank_each_query_within_its_fold(tiny_shapes, tiny_teacher, tmp_path):
    # 60 eval images with 5 captions each in folds of 20: a caption meets 20 images, an image
    # 100 captions, so no count can reach past its fold.
    recorder = Recorder()
    config = base_config(tiny_shapes, tiny_teacher, tmp_path, steps=1, eval_every=1)
    train_loop_per_worker({**config, "eval_fold_size": 20}, recorder)
    with np.load(f"{recorder.reports[0][1]}/{RANKS_FILE}") as ranks:
        assert (ranks["t2i_rank"] + ranks["t2i_ties"]).max() <= 19
        assert (ranks["i2t_rank"] + ranks["i2t_ties"] + ranks["i2t_own"]).max() <= 100
        again = metrics_from_ranks(QueryRanks.from_arrays(ranks))
    assert again["rsum"] == pytest.approx(recorder.reports[0][0]["rsum"])


def test_eval_folds_that_do_not_split_the_eval_set_fail_before_training(
    tiny_shapes, tiny_teacher, tmp_path
):
    recorder = Recorder()
    config = base_config(tiny_shapes, tiny_teacher, tmp_path, eval_fold_size=50)
    with pytest.raises(
        InputError, match=r"^eval_fold_size: expected an eval set of a multiple of 50 images "
        r"\(or at most 50\).*got 60 images"
    ):  # fmt: skip
        train_loop_per_worker(config, recorder)
    assert recorder.reports == [] and not (tmp_path / "checkpoints").exists()


def test_resume_continues_from_the_last_checkpoint(tiny_shapes, tiny_teacher, tmp_path):
    first = Recorder()
    train_loop_per_worker(base_config(tiny_shapes, tiny_teacher, tmp_path, steps=4), first)
    # Same run directory, longer schedule: the run resumes at step 4 instead of starting over.
    second = Recorder()
    config = base_config(tiny_shapes, tiny_teacher, tmp_path, steps=6)
    final = train_loop_per_worker(config, second)
    assert [m["step"] for m, _ in second.reports] == [6]
    assert final["samples_seen"] == 6 * 8
    saved = torch.load(f"{first.reports[-1][1]}/{CHECKPOINT_FILE}", weights_only=True)
    resumed = torch.load(f"{second.reports[-1][1]}/{CHECKPOINT_FILE}", weights_only=True)
    assert saved["step"] == 4 and resumed["step"] == 6
    # Progress was kept: the optimiser continued (AdamW step counts add up), not restarted.
    step_counts = {int(s["step"]) for s in resumed["optimizer"]["state"].values()}
    assert step_counts == {6}


def test_finished_run_resumed_trains_no_more_and_reports_its_end_again(
    tiny_shapes, tiny_teacher, tmp_path
):
    """A trial restored after its last checkpoint (its driver died before Tune recorded it as
    done) must still end with a result: the same step, no more training, the same recall
    (the same weights evaluated on the same eval set)."""
    config = base_config(tiny_shapes, tiny_teacher, tmp_path, steps=2, eval_every=2)
    first = Recorder()
    train_loop_per_worker(config, first)
    again = Recorder()
    final = train_loop_per_worker(config, again)
    ((metrics, checkpoint),) = again.reports
    before = first.reports[-1][0]
    assert (metrics["step"], metrics["samples_seen"]) == (2, before["samples_seen"])
    assert metrics["rsum"] == pytest.approx(before["rsum"], abs=1e-9)
    assert metrics["loss"] == pytest.approx(before["loss"])
    assert metrics["train_s"] == 0.0  # no training step ran
    state = torch.load(f"{checkpoint}/{CHECKPOINT_FILE}", weights_only=True)
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {2}
    assert final["step"] == 2


def test_invalid_pair_fails_before_any_work(tmp_path):
    with pytest.raises(InputError, match=r"intra_ss:fd.*valid strategies for intra_ss: sd, kl"):
        train_loop_per_worker({"pairs": "intra_ss:fd", "out_dir": str(tmp_path)}, Recorder())
    assert not (tmp_path / "checkpoints").exists()


def test_config_errors_are_one_line_and_name_the_field():
    with pytest.raises(InputError) as error:
        load_distill_config({"steps": -3, "bogus": 1}, source="run.yaml")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("run.yaml: ")
    assert "steps: Input should be greater than 0" in message
    assert "bogus: unknown field" in message


def test_teacher_pairs_without_teacher_are_refused():
    with pytest.raises(InputError, match="need a teacher"):
        load_distill_config({"pairs": "intra_ts:sd", "teacher": None})


def test_warmup_cosine_schedule_values():
    factor = warmup_cosine(warmup=4, total=12)
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(4) == pytest.approx(1.0)
    assert factor(8) == pytest.approx(0.5)  # half-way through the 8 cosine steps
    assert factor(12) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.integration  # builds the teacher cache with Ray tasks
def test_cached_teacher_embeddings_equal_a_live_forward(
    tiny_shapes, tiny_teacher, tmp_path, local_ray
):
    from trainers.models import load_model
    from trainers.shards import iter_samples
    from trainers.teacher_cache import build_teacher_cache, cache_shards

    train = str(tiny_shapes.out_dir / "train")
    calls: list[tuple[int, int]] = []
    manifest = build_teacher_cache(
        tiny_teacher.name,
        str(tiny_teacher.checkpoint),
        train,
        tmp_path / "cache",
        progress=lambda done, total: calls.append((done, total)),
    )
    assert manifest.samples == 600 and manifest.skipped == 0
    # A build shows its bar at 0 before the first of its 3 shards is done, then one per shard.
    assert calls == [(0, 3), (1, 3), (2, 3), (3, 3)]
    # Written as the data shards are: ustar headers (no pax header per member), fixed mtime.
    with tarfile.open(tmp_path / "cache" / manifest.cache_shards[0]) as tar:
        members = tar.getmembers()
    assert len(members) == 5 * 200
    assert {m.mtime for m in members} == {0} and not any(m.pax_headers for m in members)
    teacher = load_model(tiny_teacher.name, tiny_teacher.checkpoint)
    teacher.model.eval()
    shards = cache_shards(tmp_path / "cache", train, teacher)
    samples = [s for s in iter_samples(shards[:1], ("teacher_image.npy", "teacher_text.npy"))]
    assert len(samples) == 200
    picked = samples[::40]
    images = torch.stack([teacher.preprocess_eval(s.image) for s in picked])
    tokens = teacher.tokenizer([s.captions[0] for s in picked])
    with torch.no_grad():
        live_image = teacher.model.encode_image(images, normalize=True)
        live_text = teacher.model.encode_text(tokens, normalize=True)
    cached_image = torch.from_numpy(np.stack([s.arrays["teacher_image.npy"] for s in picked]))
    cached_text = torch.from_numpy(np.stack([s.arrays["teacher_text.npy"] for s in picked]))
    torch.testing.assert_close(cached_image, live_image, atol=1e-5, rtol=0)
    torch.testing.assert_close(cached_text, live_text, atol=1e-5, rtol=0)
    # A second build with the same teacher and shards reuses the cache (same manifest file).
    mtime = (tmp_path / "cache" / "manifest.json").stat().st_mtime_ns
    calls.clear()
    build_teacher_cache(
        tiny_teacher.name,
        str(tiny_teacher.checkpoint),
        train,
        tmp_path / "cache",
        progress=lambda done, total: calls.append((done, total)),
    )
    assert (tmp_path / "cache" / "manifest.json").stat().st_mtime_ns == mtime
    assert calls == []  # a reused cache reports no progress, so the CLI draws no bar


@pytest.mark.integration  # builds the teacher cache with Ray tasks
def test_stale_cache_is_refused(tiny_shapes, tiny_teacher, tmp_path, local_ray):
    from trainers.models import load_model
    from trainers.teacher_cache import build_teacher_cache, cache_shards

    train = str(tiny_shapes.out_dir / "train")
    build_teacher_cache(tiny_teacher.name, str(tiny_teacher.checkpoint), train, tmp_path / "c")
    other_teacher = load_model(tiny_teacher.name)  # same architecture, other (random) weights
    with pytest.raises(InputError, match="built for another teacher"):
        cache_shards(tmp_path / "c", train, other_teacher)


@pytest.mark.integration  # builds the teacher cache with Ray tasks
def test_loop_trains_from_the_cache_without_a_teacher_forward(
    tiny_shapes, tiny_teacher, tmp_path, local_ray, monkeypatch
):
    from trainers import distill
    from trainers.teacher_cache import build_teacher_cache

    train = str(tiny_shapes.out_dir / "train")
    build_teacher_cache(tiny_teacher.name, str(tiny_teacher.checkpoint), train, tmp_path / "c")
    calls = []
    original = distill.DistillationRun._teacher_embeddings

    def spy(self, batch, images, tokens):
        calls.append(sorted(k for k in batch if k.startswith("teacher_")))
        return original(self, batch, images, tokens)

    monkeypatch.setattr(distill.DistillationRun, "_teacher_embeddings", spy)
    recorder = Recorder()
    config = base_config(
        tiny_shapes,
        tiny_teacher,
        tmp_path / "run",
        pairs="intra_ts:sd",
        teacher_cache=str(tmp_path / "c"),
        steps=2,
        eval_every=2,
    )
    train_loop_per_worker(config, recorder)
    assert calls == [["teacher_image", "teacher_text"]] * 2
    assert recorder.reports[-1][0]["loss_intra_ts_sd"] > 0


def test_process_started_unix_brackets_a_fresh_process():
    """A child process's own start time lies between just before and just after its spawn."""
    import subprocess
    import sys
    import time

    before = time.time()
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import time, sys; sys.path.insert(0, '.');"
         "from trainers.distill import process_started_unix;"
         "print(process_started_unix(), time.time())"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    spawned = time.time()
    started, now = map(float, child.communicate(timeout=120)[0].split())
    # /proc counts in clock ticks (1/100 s here) and boot time in whole seconds.
    assert before - 1.01 <= started <= spawned + 0.02
    assert started < now


def test_teacher_hash_follows_the_model_config_behind_the_name(tmp_path):
    """A cached teacher is reused only for the same architecture and initial temperature: the
    same name with an edited config (a new release of the built-in teacher) trains anew."""
    import json
    import tarfile

    import open_clip

    from trainers.models import CONFIG_DIR
    from trainers.teacher import config_hash, teacher_config

    for split in ("train", "eval"):
        (tmp_path / split).mkdir()
        with tarfile.open(tmp_path / split / "00000.tar", "w"):
            pass
    base = json.loads((CONFIG_DIR / "conaclip-teacher.json").read_text())
    cfg = teacher_config(str(tmp_path / "train"), str(tmp_path / "eval"), name="hash-probe")
    hashes = []
    for scale in (2.6593, 3.4012, None):
        config = dict(base)
        if scale is None:
            config.pop("init_logit_scale", None)
        else:
            config["init_logit_scale"] = scale
        registry = tmp_path / f"registry-{len(hashes)}"
        registry.mkdir()
        (registry / "hash-probe.json").write_text(json.dumps(config))
        open_clip.add_model_config(registry)
        hashes.append(config_hash(cfg))
    assert len(set(hashes)) == 3
    assert config_hash(cfg) == hashes[-1]  # stable for one config
    # What the teacher's report scores is not what it learns: the same weights, the same hash.
    assert cfg.eval_max_images == 1000
    for scored in (None, 5000):
        assert config_hash(cfg.model_copy(update={"eval_max_images": scored})) == hashes[-1]
