"""Pruner network: initial state, shapes, Gumbel gates, temperature, and a real optimisation."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch

from dipgo.losses.cost import CostConfig, CostController
from dipgo.search.pruner import (
    PrunerConfig,
    PrunerNetwork,
    gumbel_gates,
    keep_probs,
    logit_penalty,
    temperature,
)
from dipgo.supernets.gates import GateSlot

SMALL = PrunerConfig(d_model=16, num_layers=1, num_heads=2)


def block_slots(n: int, costs: list[float] | None = None) -> list[GateSlot]:
    costs = costs if costs is not None else [1.0 + i for i in range(n)]
    return [GateSlot(f"blocks.{i}", "block", f"blocks.{i}", costs[i]) for i in range(n)]


def reuse_slots(steps: int, blocks: int) -> list[GateSlot]:
    """Step-major reuse slots, as a diffusion SuperNet lays them out."""
    return [
        GateSlot(f"step{s:02d}/blocks.{b}", "reuse", f"blocks.{b}", 10.0 * (b + 1), step=s)
        for s in range(steps)
        for b in range(blocks)
    ]


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny ops run faster on one thread than fighting for the shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- construction and initial state ---------------------------------------------------------


@pytest.mark.parametrize("init_logit", [3.0, 0.0, -1.0])
def test_initial_keep_probs_compute_everything(init_logit: float) -> None:
    torch.manual_seed(0)
    config = PrunerConfig(d_model=16, num_layers=1, num_heads=2, init_keep_logit=init_logit)
    for pruner in (
        PrunerNetwork(block_slots(7), config),
        PrunerNetwork(reuse_slots(4, 3), config, grid=(4, 3)),
    ):
        p = keep_probs(pruner())
        expected = torch.full_like(p, 1.0 / (1.0 + math.exp(-init_logit)))
        torch.testing.assert_close(p, expected, atol=1e-6, rtol=0)


def test_logit_shapes_grid_and_mixed_kinds() -> None:
    assert PrunerNetwork(block_slots(5), SMALL)().shape == (5, 2)
    assert PrunerNetwork(reuse_slots(6, 4), SMALL, grid=(6, 4))().shape == (24, 2)
    mixed = block_slots(3) + [GateSlot("fc.weight", "mask", "fc", 5.0)] + reuse_slots(1, 2)
    pruner = PrunerNetwork(mixed, SMALL)
    assert pruner().shape == (6, 2)
    assert pruner.kind_index.tolist() == [1, 1, 1, 2, 0, 0]  # block, mask, reuse in GATE_KINDS


def test_grid_queries_share_step_and_block_embeddings() -> None:
    pruner = PrunerNetwork(reuse_slots(3, 2), SMALL, grid=(3, 2))
    names = {name for name, _ in pruner.named_parameters()}
    assert {"step_embedding", "block_embedding", "slot_residual"} <= names
    assert "queries" not in names
    q = pruner.slot_queries()  # slot_residual starts at zero: slots (s, b) = step s + block b
    diff_01 = q[0] - q[1]  # step 0: block 0 - block 1
    diff_21 = q[4] - q[5]  # step 2: block 0 - block 1
    torch.testing.assert_close(diff_01, diff_21)


def test_grid_and_slot_errors() -> None:
    with pytest.raises(ValueError, match="multiply to the number of slots"):
        PrunerNetwork(reuse_slots(3, 2), SMALL, grid=(2, 2))
    shuffled = reuse_slots(2, 2)
    shuffled[1], shuffled[2] = shuffled[2], shuffled[1]  # block-major instead of step-major
    with pytest.raises(ValueError, match="step-major"):
        PrunerNetwork(shuffled, SMALL, grid=(2, 2))
    with pytest.raises(ValueError, match="unknown gate kind"):
        PrunerNetwork([GateSlot("x", "channel", "x", 1.0)], SMALL)
    with pytest.raises(ValueError, match="at least one gate slot"):
        PrunerNetwork([], SMALL)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="multiple of pruner.num_heads"):
        PrunerConfig(d_model=10, num_heads=4)
    with pytest.raises(ValueError, match="tau_schedule"):
        PrunerConfig(tau_schedule="step")
    with pytest.raises(ValueError, match="tau_start"):
        PrunerConfig(tau_end=0.0)


# --- budget conditioning ---------------------------------------------------------------------


def test_budget_conditioned_outputs_depend_on_budget() -> None:
    torch.manual_seed(0)
    config = PrunerConfig(d_model=16, num_layers=1, num_heads=2, budget_conditioned=True)
    pruner = PrunerNetwork(block_slots(6), config)
    # At init the zero head hides everything ("compute everything" for every budget) ...
    torch.testing.assert_close(pruner(0.3), pruner(0.8))
    # ... once the head has learnt anything, the budget reaches the logits.
    torch.nn.init.normal_(pruner.head[-1].weight, std=0.5)
    assert not torch.allclose(pruner(0.3), pruner(0.8))
    assert not torch.allclose(pruner(torch.tensor(0.3)), pruner(torch.tensor(0.31)))
    with pytest.raises(ValueError, match="budget-conditioned"):
        pruner()
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        pruner(1.5)


def test_unconditioned_pruner_ignores_budget() -> None:
    pruner = PrunerNetwork(block_slots(4), SMALL)
    torch.nn.init.normal_(pruner.head[-1].weight, std=0.5)
    torch.testing.assert_close(pruner(0.2), pruner())


# --- Gumbel gates ----------------------------------------------------------------------------


def test_hard_gumbel_gates_are_binary_with_gradients() -> None:
    logits = torch.randn(50, 2, requires_grad=True)
    gates = gumbel_gates(logits, tau=0.5, hard=True, generator=torch.Generator().manual_seed(0))
    assert gates.shape == (50,)
    assert set(gates.unique().tolist()) <= {0.0, 1.0}
    (gates * torch.arange(50.0)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_soft_gumbel_gates_in_unit_interval() -> None:
    logits = torch.randn(30, 2)
    gates = gumbel_gates(logits, tau=1.0, hard=False, generator=torch.Generator().manual_seed(0))
    assert ((gates > 0) & (gates < 1)).all()


def test_gumbel_gates_follow_the_generator() -> None:
    logits = torch.zeros(64, 2)  # p(keep) = 0.5: the noise alone decides

    def draw(seed: int) -> torch.Tensor:
        return gumbel_gates(logits, 1.0, True, torch.Generator().manual_seed(seed))

    torch.testing.assert_close(draw(7), draw(7))
    assert not torch.equal(draw(7), draw(8))


def test_hard_gates_are_unbiased_samples_of_keep_probs() -> None:
    """Gumbel-max: E[hard gate] = p(keep), whatever the temperature."""
    p = torch.tensor([0.05, 0.3, 0.5, 0.8, 0.97])
    logits = torch.stack([torch.zeros(5), torch.log(p / (1 - p))], dim=-1)  # (5, 2)
    logits_many = logits.repeat(4000, 1)  # (20000, 2)
    gates = gumbel_gates(logits_many, 0.3, True, torch.Generator().manual_seed(0))
    torch.testing.assert_close(gates.reshape(4000, 5).mean(0), p, atol=0.025, rtol=0)
    torch.testing.assert_close(keep_probs(logits), p)


def test_gumbel_gates_reject_bad_input() -> None:
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        gumbel_gates(torch.zeros(4), 1.0)
    with pytest.raises(ValueError, match="temperature"):
        gumbel_gates(torch.zeros(4, 2), 0.0)


# --- temperature -----------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["cosine", "linear", "exp"])
def test_temperature_schedule_endpoints_and_monotone(schedule: str) -> None:
    config = PrunerConfig(tau_start=2.0, tau_end=0.2, tau_schedule=schedule)
    taus = [temperature(step, 100, config) for step in range(101)]
    assert taus[0] == pytest.approx(2.0)
    assert taus[-1] == pytest.approx(0.2)
    assert all(a >= b for a, b in zip(taus, taus[1:]))
    assert temperature(150, 100, config) == pytest.approx(0.2)  # past the end: stays at tau_end
    with pytest.raises(ValueError, match="total_steps"):
        temperature(0, 0, config)


# --- a real optimisation ---------------------------------------------------------------------


def toy_problem(n: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Unequal costs in [1, 3]; 5 important slots (importance >= 0.6), the rest <= 0.1.

    The important slots also have the best importance/cost ratios and fit the 0.4 budget
    together (cost <= 15 of ~40), so the optimum keeps all of them.
    """
    g = torch.Generator().manual_seed(seed)
    cost = 1.0 + 2.0 * torch.rand(n, generator=g)  # (N,)
    importance = 0.1 * torch.rand(n, generator=g)  # (N,)
    importance[:5] = torch.tensor([1.0, 0.9, 0.8, 0.7, 0.6])
    perm = torch.randperm(n, generator=g)
    return cost[perm], importance[perm]


def knapsack_relaxation(cost: torch.Tensor, importance: torch.Tensor, target: float) -> float:
    """Least normalised distortion any keep vector in [0, 1]^N with the target cost can reach.

    The toy's distortion is linear, so this is a fractional knapsack: keep slots greedily by
    importance per unit cost until the budget is spent.
    """
    budget = target * float(cost.sum())
    kept = 0.0
    for i in torch.argsort(importance / cost, descending=True).tolist():
        take = min(1.0, budget / float(cost[i]))
        kept += take * float(importance[i])
        budget -= take * float(cost[i])
        if budget <= 0:
            break
    return 1.0 - kept / float(importance.sum())


def round_to_budget(p: torch.Tensor, cost: torch.Tensor, target: float) -> torch.Tensor:
    """Hard 0/1 plan: keep slots by descending keep probability while they fit the budget."""
    keep = torch.zeros_like(p)
    budget = target * float(cost.sum())
    for i in torch.argsort(p, descending=True).tolist():
        if float(cost[i]) <= budget:
            keep[i] = 1.0
            budget -= float(cost[i])
    return keep


def search_toy(
    cost: torch.Tensor,
    importance: torch.Tensor,
    slots: list[GateSlot],
    grid: tuple[int, int] | None,
    target: float = 0.4,
    steps: int = 200,
) -> torch.Tensor:
    """The search loop in miniature: distortion on sampled hard gates, cost on keep probs."""
    torch.manual_seed(0)
    config = PrunerConfig()  # the defaults the search ships with
    pruner = PrunerNetwork(slots, config, grid=grid)
    opt = torch.optim.Adam(pruner.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    controller = CostController(CostConfig())
    for step in range(steps):
        logits = pruner()  # (N, 2)
        generator = torch.Generator().manual_seed(step)
        gates = gumbel_gates(logits, temperature(step, steps, config), config.hard, generator)
        distortion = (importance * (1 - gates)).sum() / importance.sum()
        expected = (cost * keep_probs(logits)).sum() / cost.sum()
        loss = distortion + controller.loss(expected, target) + pruner.regularizer(logits)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        controller.update(expected.item(), target)
    with torch.no_grad():
        return keep_probs(pruner())


@pytest.mark.parametrize("layout", ["blocks", "grid"])
def test_pruner_learns_budget_and_importance(layout: str, one_thread: None) -> None:
    cost, importance = toy_problem()
    if layout == "blocks":
        slots, grid = block_slots(20, cost.tolist()), None
    else:
        slots, grid = reuse_slots(5, 4), (5, 4)
        slots = [GateSlot(s.name, s.kind, s.block, float(c), s.step) for s, c in zip(slots, cost)]
    p = search_toy(cost, importance, slots, grid)
    expected = float((cost * p).sum() / cost.sum())
    # Late in the search the keep probabilities saturate to 0/1, so the expected cost becomes the
    # cost of a set of slots and can rest up to one slot's share away from the target. Measured on
    # 12 toy seeds x 2 layouts: 0.3999-0.4014, except seed 0 with MKL on its AVX2 path (blocks:
    # 0.4250, one slot of cost 1.0 of 40 over). A controller that did not work would be far off.
    one_slot = float(cost.max() / cost.sum())
    assert abs(expected - 0.4) <= one_slot, f"expected cost {expected:.4f} is more than one slot ({one_slot:.3f}) from 0.4"
    top = torch.argsort(importance, descending=True)[:5]
    assert (p[top] > 0.5).all(), f"important slots were closed: {p[top].tolist()}"
    # Rounded the way post-processing does, the plan is close to the relaxed optimum, a lower
    # bound no 0/1 plan reaches (distortion is normalised to [0, 1]; the unimportant slots
    # differ by < 0.02 each, so their exact order is noise-level).
    keep = round_to_budget(p, cost, 0.4)
    reached = float((importance * (1 - keep)).sum() / importance.sum())
    best = knapsack_relaxation(cost, importance, 0.4)
    assert reached <= best + 0.05, f"distortion {reached:.4f} is far above the optimum {best:.4f}"


def test_logit_penalty_is_mean_squared_gap() -> None:
    logits = torch.tensor([[0.0, 3.0], [1.0, -1.0]])
    assert logit_penalty(logits).item() == pytest.approx((9.0 + 4.0) / 2)
