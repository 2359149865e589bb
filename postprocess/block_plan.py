"""Block plans: which residual blocks to remove so the kept cost meets the budget.

The learned plan and every baseline go through the same :func:`fill_budget`: blocks are closed in
an order of increasing importance until the kept cost is at or under the target, then closed
blocks are re-opened, most important first, wherever the slack still allows it. Only the order
differs: learned keep probabilities (dipgo), weight norms (the classic magnitude criterion),
position (drop the last blocks, the "shallower model" baseline) or chance (random). Comparing
them at the same budget with the same procedure isolates what the pruner learned.

Costs are whatever the SuperNet's slots carry: counted MACs, or measured latency per block when
the search targets latency; ``full`` is the whole model's cost in the same unit, so the kept
ratio is ``(full - removed) / full``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dipgo.errors import PlanError
from dipgo.postprocess.plan import Plan

if TYPE_CHECKING:
    from dipgo.supernets.block import BlockSuperNet

BLOCK_BASELINES: tuple[str, ...] = ("weight_norm", "drop_last", "random")


def kept_ratio(keep: Sequence[bool], costs: Sequence[float], full: float) -> float:
    """Kept-cost ratio of a keep mask: ``(full - sum of closed costs) / full``."""
    removed = sum(c for k, c in zip(keep, costs, strict=True) if not k)
    return (full - removed) / full


def check_block_reachable(costs: Sequence[float], full: float, target: float) -> None:
    """Refuse a target below what removing every gateable block gives, naming the floor."""
    floor = kept_ratio([False] * len(costs), costs, full)
    if target < floor - 1e-9:
        raise PlanError(
            f"target {target:g} is unreachable: removing all {len(costs)} removable blocks still keeps "
            f"{floor:.3f} of the cost (stem, head and shape-changing blocks stay); the smallest reachable target is {floor:.3f}"
        )


def fill_budget(importance: Sequence[float], costs: Sequence[float], full: float, target: float) -> list[bool]:
    """Keep mask meeting ``kept_ratio <= target``: close least important first, then re-open.

    Ties in importance are broken by position (earlier blocks first), so the result is
    deterministic. Raises :class:`PlanError` when the target is unreachable.
    """
    check_block_reachable(costs, full, target)
    order = sorted(range(len(costs)), key=lambda i: (importance[i], i))  # least important first
    keep = [True] * len(costs)
    for i in order:
        if kept_ratio(keep, costs, full) <= target + 1e-12:
            break
        keep[i] = False
    for i in reversed(order):  # most important closed block first
        if not keep[i]:
            keep[i] = True
            if kept_ratio(keep, costs, full) > target + 1e-12:
                keep[i] = False
    return keep


def extract_block_plan(probs: torch.Tensor, supernet: BlockSuperNet, target: float, meta: dict[str, Any] | None = None) -> Plan:
    """The learned plan: blocks with the lowest keep probability go first."""
    from dipgo.postprocess.block_subnet import make_block_plan

    keep = fill_budget(probs.tolist(), [s.cost for s in supernet.slots], supernet.full_cost(), target)
    info = {"keep_probs": [round(float(p), 4) for p in probs], "selection": "dipgo", **(meta or {})}
    return make_block_plan(supernet, keep, target, info)


def weight_norm_importance(model: nn.Module, blocks: Sequence[str]) -> list[float]:
    """L2 norm of each block's weights divided by the square root of their count (RMS).

    The per-element RMS rather than the raw norm, so that big blocks do not look important just
    for being big: the classic magnitude criterion of depth-pruning papers.
    """
    out = []
    for path in blocks:
        params = [p.detach().float() for p in model.get_submodule(path).parameters() if p.dim() > 1]
        if not params:
            out.append(0.0)
            continue
        flat = torch.cat([p.flatten() for p in params])
        out.append(float(flat.norm() / flat.numel() ** 0.5))
    return out


def baseline_block_plan(name: str, supernet: BlockSuperNet, target: float, seed: int = 0) -> Plan:
    """A baseline plan at the same budget: ``weight_norm``, ``drop_last`` or ``random``."""
    blocks = supernet.blocks
    n = len(blocks)
    if name == "weight_norm":
        importance = weight_norm_importance(supernet.model, blocks)
    elif name == "drop_last":
        importance = [float(-i) for i in range(n)]  # the last block is the least "important"
    elif name == "random":
        importance = torch.rand(n, generator=torch.Generator().manual_seed(seed)).tolist()
    else:
        raise ValueError(f"unknown block baseline {name!r}; accepted: {', '.join(BLOCK_BASELINES)}")
    from dipgo.postprocess.block_subnet import make_block_plan

    keep = fill_budget(importance, [s.cost for s in supernet.slots], supernet.full_cost(), target)
    return make_block_plan(supernet, keep, target, {"selection": name})


def _refill(keep: list[bool], importance: Sequence[float], costs: Sequence[float], full: float, target: float) -> list[bool]:
    """Re-open closed blocks, most important first, while the budget holds."""
    keep = list(keep)
    for i in sorted((i for i, k in enumerate(keep) if not k), key=lambda i: -importance[i]):
        keep[i] = True
        if kept_ratio(keep, costs, full) > target + 1e-12:
            keep[i] = False
    return keep


def refine_block_keep(
    seeds: dict[str, list[bool]], importance: Sequence[float], costs: Sequence[float], full: float, target: float,
    score: Callable[[list[bool]], float], max_evals: int = 100,
) -> tuple[list[bool], dict[str, Any]]:
    """Best seed by measured ``score`` (lower is better), then swap search within the budget.

    A move re-opens one closed block and closes one open block (most promising pairs first, by
    the learned importance); the first move that lowers the score is kept, then any slack is
    re-filled, until no swap helps or ``max_evals`` plans were measured. With a handful of blocks
    this visits every neighbour, so the plan is a local optimum of the *hard* objective, which the
    straight-through relaxation of the search only approximates.
    """
    seed_scores = {name: score(k) for name, k in seeds.items()}
    start = min(seed_scores, key=seed_scores.get)
    keep, best = list(seeds[start]), seed_scores[start]
    evals, accepted, improved = len(seeds), 0, True
    while improved and evals < max_evals:
        improved = False
        closed = sorted((i for i, k in enumerate(keep) if not k), key=lambda i: -importance[i])
        opened = sorted((i for i, k in enumerate(keep) if k), key=lambda i: importance[i])
        for i in closed:
            for j in opened:
                cand = list(keep)
                cand[i], cand[j] = True, False
                if kept_ratio(cand, costs, full) > target + 1e-12:
                    continue
                cand = _refill(cand, importance, costs, full, target)
                evals += 1
                value = score(cand)
                if value < best:
                    keep, best, improved = cand, value, True
                    accepted += 1
                    break
                if evals >= max_evals:
                    break
            if improved or evals >= max_evals:
                break
    info = {"seed_scores": {k: float(f"{v:.6g}") for k, v in seed_scores.items()}, "start": start,
            "final_score": float(f"{best:.6g}"), "evaluations": evals, "accepted_moves": accepted}
    return keep, info
