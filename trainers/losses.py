"""The six supervision strategies of docs/method.md and ``interaction_loss``.

Definitions (docs/method.md, "The six strategies"), for an edge e = (X, Y) with row i of every
matrix belonging to sample i of X: S = X Y^T, S* = the same with each student node replaced by
its teacher node, Sp = the partner edge's matrix. CE(M) is the mean over rows of the
cross-entropy of row i against class i; rowKL(A || B) is the mean over rows of
KL(softmax(A_i) || softmax(B_i)), natural log, no t^2 factor. Which edges and partners a learning
type has, and which pairs are valid, lives in ``trainers.graph``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from trainers.graph import (
    DEFAULT_SYM_ORIENTATION,
    STRATEGIES,
    TEACHER_NODES,
    Edge,
    check_pair,
    learning_type_spec,
    nodes_needed,
    partner_transposed,
    strategy_spec,
    teacher_counterpart,
)

Nodes = Mapping[str, Tensor]
Temperature = float | Tensor


def _sim(nodes: Nodes, edge: Edge) -> Tensor:
    return nodes[edge[0]] @ nodes[edge[1]].T


def cross_entropy_diagonal(logits: Tensor) -> Tensor:
    """CE(M): mean over rows i of -log softmax(M_i)[i]."""
    targets = torch.arange(logits.shape[0], device=logits.device)
    return F.cross_entropy(logits, targets)


def row_kl(a: Tensor, b: Tensor) -> Tensor:
    """rowKL(A || B): mean over rows of KL(softmax(A_i) || softmax(B_i)), natural log."""
    return F.kl_div(
        F.log_softmax(b, dim=1), F.log_softmax(a, dim=1), log_target=True, reduction="batchmean"
    )


def _infonce(nodes: Nodes, edge: Edge, t: Temperature) -> Tensor:
    s = _sim(nodes, edge) / t
    return 0.5 * (cross_entropy_diagonal(s) + cross_entropy_diagonal(s.T))


def _fd(nodes: Nodes, edge: Edge, t: Temperature) -> Tensor:
    return (nodes[edge[0]] - nodes[edge[1]]).pow(2).sum(dim=1).mean()


def _sd(nodes: Nodes, edge: Edge, t: Temperature) -> Tensor:
    return (_sim(nodes, edge) - _sim(nodes, teacher_counterpart(edge))).pow(2).mean()


def _kl(nodes: Nodes, edge: Edge, t: Temperature) -> Tensor:
    s = _sim(nodes, edge) / t
    s_teacher = _sim(nodes, teacher_counterpart(edge)) / t
    return 0.5 * (row_kl(s_teacher, s) + row_kl(s_teacher.T, s.T))


def _partner_sim(nodes: Nodes, partner: Edge, transposed: bool) -> Tensor:
    sim = _sim(nodes, partner)
    return sim.T if transposed else sim


def _sym_sd(nodes: Nodes, edge: Edge, partner: Edge, transposed: bool, t: Temperature) -> Tensor:
    return (_sim(nodes, edge) - _partner_sim(nodes, partner, transposed)).pow(2).mean()


def _sym_kl(nodes: Nodes, edge: Edge, partner: Edge, transposed: bool, t: Temperature) -> Tensor:
    s = _sim(nodes, edge) / t
    s_partner = _partner_sim(nodes, partner, transposed) / t
    return 0.5 * (row_kl(s_partner, s) + row_kl(s, s_partner))


# One function per strategy: (nodes, edge, t) or, for Sym strategies,
# (nodes, edge, partner, transposed, t).
EDGE_LOSSES: dict[str, Callable[..., Tensor]] = {
    "infonce": _infonce,
    "fd": _fd,
    "sd": _sd,
    "kl": _kl,
    "sym_sd": _sym_sd,
    "sym_kl": _sym_kl,
}
if set(EDGE_LOSSES) != set(STRATEGIES):  # a strategy registered in graph.py without a loss
    raise RuntimeError(f"losses for {sorted(set(STRATEGIES) ^ set(EDGE_LOSSES))} are missing")


def _checked_nodes(emb: Mapping[str, Tensor], learning_type: str, strategy: str) -> dict:
    needed = nodes_needed(learning_type, strategy)
    missing = [node for node in needed if node not in emb]
    if missing:
        raise ValueError(
            f"{learning_type}:{strategy} needs embeddings {', '.join(needed)}; "
            f"missing {', '.join(missing)}"
        )
    batch_sizes = {emb[node].shape[0] for node in needed}
    if len(batch_sizes) != 1 or any(emb[node].dim() != 2 for node in needed):
        shapes = {node: tuple(emb[node].shape) for node in needed}
        raise ValueError(
            f"{learning_type}:{strategy} needs N x d embeddings of one N, got {shapes}"
        )
    # Teacher tensors never carry gradient, whatever the caller passed.
    return {node: emb[node].detach() if node in TEACHER_NODES else emb[node] for node in needed}


def interaction_loss(
    emb: Mapping[str, Tensor],
    learning_type: str,
    strategy: str,
    temperature: Temperature,
    orientation: str = DEFAULT_SYM_ORIENTATION,
) -> Tensor:
    """Loss of one (learning type, strategy) pair, exactly as docs/method.md defines it.

    emb: keys "TI", "TT", "SI", "ST" (only the nodes this pair reads are required), each N x d,
    L2-normalised, one width where an edge compares features directly (students already mapped
    to the teacher's width on teacher-student edges). Teacher entries are detached here.
    temperature: a float or a 0-dim tensor (learnable: gradient flows into it); read only by
    infonce, kl and sym_kl. orientation: how Sym strategies read the partner matrix
    (``trainers.graph.PARTNER_TRANSPOSED``; it matters for inter_ts only).
    Returns a 0-dim tensor: the strategy averaged over the type's edges (Sym strategies: over
    its partner pairs, each counted once). Raises ValueError (InputError) for an invalid or
    unknown pair, naming the pair and the valid strategies for the learning type.
    """
    check_pair(learning_type, strategy)
    nodes = _checked_nodes(emb, learning_type, strategy)
    kind = learning_type_spec(learning_type)
    loss_fn = EDGE_LOSSES[strategy]
    if strategy_spec(strategy).needs_partner:
        transposed = partner_transposed(learning_type, orientation)
        terms = [
            loss_fn(nodes, edge, partner, transposed, temperature)
            for edge, partner in kind.partners
        ]
    else:
        terms = [loss_fn(nodes, edge, temperature) for edge in kind.edges]
    return torch.stack(terms).mean()
