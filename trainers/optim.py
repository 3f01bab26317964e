"""The optimiser, its schedule and the fair-cell weights of one distillation run.

Pure functions of a model, a step or a few numbers: ``adamw`` (open_clip's parameter groups),
``warmup_cosine`` (the learning-rate factor per step), ``gradient_norm`` and
``gradient_share_weights`` (the two halves of the fair-cell rule: measure each loss's gradient
norm, then weight an auto pair so its gradient is ``share`` x the fixed pairs'). The loop that
calls them is ``trainers.distill``; keeping them here lets them be tested by hand, without a run.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from trainers.models import DistillStudent


def adamw(model: DistillStudent, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW without decay on gains, biases, embeddings and the logit scale (as open_clip)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exclude = param.ndim < 2 or "bn" in name or "ln" in name or "logit_scale" in name
        (no_decay if exclude else decay).append(param)
    groups = [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
    ]
    # fused: one kernel over all parameters instead of a loop of small ones per tensor (the
    # token embedding dominates the teacher's parameters), same update rule.
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6, fused=True)


def warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    """The ``LambdaLR`` factor: linear warm-up over ``warmup`` steps, then a cosine to 0 at
    ``total`` (held at 0 after it)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def gradient_norm(loss: Tensor, params: list[Tensor]) -> Tensor:
    """L2 norm (0-dim float32, detached) of d loss / d params over all ``params`` together;
    parameters the loss does not reach count as zero. The graph is kept for the real step."""
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    squares = [g.detach().float().pow(2).sum() for g in grads if g is not None]
    return torch.stack(squares).sum().sqrt() if squares else torch.zeros(())


def gradient_share_weights(norm_sums: dict[str, float], share: float) -> dict[str, float]:
    """The fair-cell weights: ``norm_sums`` holds gradient norms summed over the same measuring
    steps for ``"fixed"`` (the weighted sum of the fixed-weight pairs) and for each auto pair;
    each auto pair gets ``share x fixed / its own`` (the step count cancels), so its weighted
    gradient is ``share`` x the fixed pairs'. A pair whose gradient was zero gets weight 0."""
    fixed = norm_sums["fixed"]
    return {
        name: (share * fixed / norm if norm > 0 else 0.0)
        for name, norm in norm_sums.items()
        if name != "fixed"
    }
