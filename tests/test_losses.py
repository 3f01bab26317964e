"""interaction_loss against an independent numpy reading of docs/method.md, plus gradient rules."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainers.graph import STRATEGIES, valid_pairs
from trainers.losses import interaction_loss

# docs/method.md's table, written out again here on purpose (not imported from trainers.graph).
EDGES = {
    "intra_ts": [("SI", "TI"), ("ST", "TT")],
    "intra_ss": [("SI", "SI"), ("ST", "ST")],
    "inter_ts": [("SI", "TT"), ("ST", "TI")],
    "inter_ss": [("SI", "ST")],
}
PARTNERS = {
    "intra_ts": [(("SI", "TI"), ("ST", "TT"))],
    "intra_ss": [(("SI", "SI"), ("ST", "ST"))],
    "inter_ts": [(("SI", "TT"), ("ST", "TI"))],
    "inter_ss": [],
}
TEACHER = {"SI": "TI", "ST": "TT", "TI": "TI", "TT": "TT"}
# docs/method.md, "The Sym partner's orientation": only inter_ts has two readings; image_first
# compares S = sim(SI, TT) with sim(TI, ST) = Sp^T.
TRANSPOSE_PARTNER = {"image_first": {"inter_ts"}, "as_written": set()}


def np_sim(e, x, y):
    n = e[x].shape[0]
    return np.array(
        [
            [sum(e[x][i, k] * e[y][j, k] for k in range(e[x].shape[1])) for j in range(n)]
            for i in range(n)
        ]
    )


def np_ce(m):
    n = m.shape[0]
    total = 0.0
    for i in range(n):
        total += -(m[i, i] - np.log(np.sum(np.exp(m[i]))))
    return total / n


def np_softmax(row):
    z = np.exp(row - row.max())
    return z / z.sum()


def np_row_kl(a, b):
    total = 0.0
    for i in range(a.shape[0]):
        p, q = np_softmax(a[i]), np_softmax(b[i])
        total += sum(p[j] * (np.log(p[j]) - np.log(q[j])) for j in range(len(p)))
    return total / a.shape[0]


def reference(e, lt, st, t, orientation="image_first"):
    if st in ("sym_sd", "sym_kl"):
        values = []
        for edge, partner in PARTNERS[lt]:
            s, sp = np_sim(e, *edge), np_sim(e, *partner)
            if lt in TRANSPOSE_PARTNER[orientation]:
                sp = sp.T
            if st == "sym_sd":
                values.append(np.mean((s - sp) ** 2))
            else:
                values.append(0.5 * (np_row_kl(sp / t, s / t) + np_row_kl(s / t, sp / t)))
        return float(np.mean(values))
    values = []
    for x, y in EDGES[lt]:
        s = np_sim(e, x, y)
        s_star = np_sim(e, TEACHER[x], TEACHER[y])
        if st == "infonce":
            values.append(0.5 * (np_ce(s / t) + np_ce(s.T / t)))
        elif st == "fd":
            values.append(np.mean([np.sum((e[x][i] - e[y][i]) ** 2) for i in range(len(e[x]))]))
        elif st == "sd":
            values.append(np.mean((s - s_star) ** 2))
        elif st == "kl":
            values.append(0.5 * (np_row_kl(s_star / t, s / t) + np_row_kl(s_star.T / t, s.T / t)))
    return float(np.mean(values))


def make_embeddings(n=5, d=4, seed=0, dtype=torch.float64, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for node in ("TI", "TT", "SI", "ST"):
        x = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)
        out[node] = x.requires_grad_(requires_grad)
    return out


@pytest.mark.parametrize(("learning_type", "strategy"), valid_pairs())
@pytest.mark.parametrize("temperature", [0.07, 1.0])
def test_value_matches_independent_reference(learning_type, strategy, temperature):
    emb = make_embeddings(seed=valid_pairs().index((learning_type, strategy)))
    ref = reference({k: v.numpy() for k, v in emb.items()}, learning_type, strategy, temperature)
    got = interaction_loss(emb, learning_type, strategy, temperature)
    assert got.dim() == 0
    assert got.item() == pytest.approx(ref, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("orientation", ["image_first", "as_written"])
@pytest.mark.parametrize("strategy", ["sym_sd", "sym_kl"])
def test_sym_orientations_match_the_reference(strategy, orientation):
    emb = make_embeddings(n=6, seed=11)
    ref = reference({k: v.numpy() for k, v in emb.items()}, "inter_ts", strategy, 0.5, orientation)
    got = interaction_loss(emb, "inter_ts", strategy, 0.5, orientation=orientation)
    assert got.item() == pytest.approx(ref, rel=1e-6, abs=1e-9)


def _student_equals_teacher(n=6, d=4, seed=3):
    emb = make_embeddings(n=n, d=d, seed=seed, dtype=torch.float64)
    emb["SI"] = emb["TI"].clone().requires_grad_(True)
    emb["ST"] = emb["TT"].clone().requires_grad_(True)
    return emb


# Strategies that distil (compare with the teacher): a student equal to its teacher must sit at
# the loss's minimum, so distilling it does not move it (docs/method.md's invariant).
@pytest.mark.parametrize(
    ("learning_type", "strategy"),
    [("intra_ts", "sd"), ("intra_ts", "kl"), ("inter_ts", "sd"), ("inter_ts", "kl"),
     ("inter_ts", "sym_sd"), ("inter_ts", "sym_kl"), ("intra_ts", "fd")],
)  # fmt: skip
def test_a_student_equal_to_its_teacher_is_at_the_minimum(learning_type, strategy):
    emb = _student_equals_teacher()
    loss = interaction_loss(emb, learning_type, strategy, 0.5)
    loss.backward()
    # Every such loss is >= 0 (squares, KL), so 0 is its minimum; the gradient vanishes there.
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    for node in ("SI", "ST"):
        if emb[node].grad is not None:
            assert emb[node].grad.abs().max().item() < 1e-10, node


@pytest.mark.parametrize("strategy", ["sym_sd", "sym_kl"])
def test_the_as_written_inter_ts_reading_breaks_the_invariant(strategy):
    # as_written compares sim(TI, TT) with its transpose, which differ for a generic teacher:
    # the loss is positive and pushes a perfect student away from its teacher.
    emb = _student_equals_teacher()
    loss = interaction_loss(emb, "inter_ts", strategy, 0.5, orientation="as_written")
    loss.backward()
    assert loss.item() > 1e-3
    assert emb["SI"].grad.abs().max().item() > 1e-3


def test_unknown_orientation_is_refused():
    with pytest.raises(ValueError, match=r"sym_orientation 'sideways'.*image_first, as_written"):
        interaction_loss(make_embeddings(), "inter_ts", "sym_sd", 0.5, orientation="sideways")


def test_hand_computed_fd_and_sd():
    # Two orthogonal unit vectors; student image = teacher image, student text swapped.
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    emb = {
        "TI": torch.stack([e1, e2]),
        "TT": torch.stack([e1, e2]),
        "SI": torch.stack([e1, e2]),
        "ST": torch.stack([e2, e1]),
    }
    # intra_ts fd: SI-TI = 0 on both rows; ST-TT = |e2-e1|^2 = 2 on both rows -> mean(0, 2) = 1.
    assert interaction_loss(emb, "intra_ts", "fd", 1.0).item() == pytest.approx(1.0)
    # inter_ss sd: S = SI ST^T = [[0,1],[1,0]], S* = TI TT^T = I -> every entry differs by 1.
    assert interaction_loss(emb, "inter_ss", "sd", 1.0).item() == pytest.approx(1.0)
    # inter_ss infonce at t=1: each row is [0,1] or [1,0] with target on the 0 -> log(1+e).
    expected = -np.log(1.0 / (1.0 + np.e))
    assert interaction_loss(emb, "inter_ss", "infonce", 1.0).item() == pytest.approx(expected)


@pytest.mark.parametrize(("learning_type", "strategy"), valid_pairs())
def test_teacher_never_gets_gradient_and_students_do(learning_type, strategy):
    emb = make_embeddings(dtype=torch.float32, requires_grad=True)
    loss = interaction_loss(emb, learning_type, strategy, 0.1)
    loss.backward()
    assert emb["TI"].grad is None and emb["TT"].grad is None
    for node in ("SI", "ST"):
        used = any(node in edge for edge in EDGES[learning_type])
        if used:
            assert emb[node].grad is not None and emb[node].grad.abs().sum() > 0, node


@pytest.mark.parametrize("strategy", ["sym_sd", "sym_kl"])
@pytest.mark.parametrize("learning_type", ["intra_ts", "intra_ss", "inter_ts"])
def test_sym_strategies_send_gradient_to_both_student_sides(learning_type, strategy):
    emb = make_embeddings(dtype=torch.float64, requires_grad=True)
    interaction_loss(emb, learning_type, strategy, 0.5).backward()
    assert emb["SI"].grad.abs().sum() > 0
    assert emb["ST"].grad.abs().sum() > 0


def test_learnable_temperature_tensor_gets_gradient_and_equals_float():
    emb = make_embeddings(dtype=torch.float32)
    t = torch.tensor(0.2, requires_grad=True)
    loss = interaction_loss(emb, "inter_ss", "infonce", t)
    loss.backward()
    assert t.grad is not None and t.grad.item() != 0.0
    assert loss.item() == pytest.approx(
        interaction_loss(emb, "inter_ss", "infonce", 0.2).item(), rel=1e-6
    )


@pytest.mark.parametrize(("learning_type", "strategy"), valid_pairs())
def test_float32_agrees_with_float64(learning_type, strategy):
    e64 = make_embeddings(n=8, d=16, seed=3)
    e32 = {k: v.float() for k, v in e64.items()}
    v64 = interaction_loss(e64, learning_type, strategy, 0.1)
    v32 = interaction_loss(e32, learning_type, strategy, 0.1)
    assert v32.dtype == torch.float32 and v64.dtype == torch.float64
    assert v32.item() == pytest.approx(v64.item(), rel=1e-4, abs=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("learning_type", "strategy"), valid_pairs())
def test_cuda_agrees_with_cpu(learning_type, strategy):
    emb = make_embeddings(n=8, d=16, seed=4)
    cpu = interaction_loss(emb, learning_type, strategy, 0.1).item()
    gpu = interaction_loss({k: v.cuda() for k, v in emb.items()}, learning_type, strategy, 0.1)
    assert gpu.item() == pytest.approx(cpu, rel=1e-9)


def test_invalid_pair_error_names_pair_and_valid_strategies():
    emb = make_embeddings()
    with pytest.raises(ValueError, match=r"intra_ss:infonce.*sd, kl, sym_sd, sym_kl"):
        interaction_loss(emb, "intra_ss", "infonce", 0.1)
    with pytest.raises(ValueError, match=r"inter_ss:sym_kl.*infonce, fd, sd, kl"):
        interaction_loss(emb, "inter_ss", "sym_kl", 0.1)
    with pytest.raises(ValueError, match="expected one of infonce, fd"):
        interaction_loss(emb, "inter_ss", "crd", 0.1)


def test_missing_or_mismatched_embeddings_are_reported():
    emb = make_embeddings()
    del emb["TT"]
    with pytest.raises(ValueError, match="missing TT"):
        interaction_loss(emb, "intra_ts", "infonce", 0.1)
    emb = make_embeddings()
    emb["SI"] = emb["SI"][:3]
    with pytest.raises(ValueError, match="one N"):
        interaction_loss(emb, "inter_ss", "infonce", 0.1)


def test_every_registered_strategy_is_reachable_through_a_valid_pair():
    assert {st for _, st in valid_pairs()} == set(STRATEGIES)
