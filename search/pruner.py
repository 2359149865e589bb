"""The pruner network: learnable queries, one per gate slot, mapped to keep/close logits.

DiP-GO does not learn each gate as an independent free parameter. It plugs a small *pruner
network* next to the frozen SuperNet: every gate gets a learnable query, a transformer lets the
queries exchange information (so the decision for block 3 at step 12 can depend on what was
decided for its neighbours), and a head turns each query into two-way logits. Gradients from the
distortion and cost losses flow into this network only; the wrapped model stays frozen.

This module generalises that design to every gate kind:

* queries are indexed by :class:`~dipgo.supernets.gates.GateSlot` order (logits ``(N, 2)``),
* ``reuse`` searches pass ``grid=(S, B)`` so the queries are factorised as step embedding +
  block embedding + a per-slot residual: neighbouring steps share parameters and information,
* a ``slot_kind_embedding`` and a cost feature let one pruner serve a joint search of several
  kinds, where slots of very different nature and price sit in one sequence,
* an optional budget embedding lets one trained pruner produce plans for a range of budgets,
* each slot also owns a scaled free logit added to the network's output: with Adam, shared
  network parameters alone tend to move every gate together (and kill the features that tell
  slots apart), while the free logits let each decision move independently and fast
  (``PrunerConfig.slot_logit_scale``); :meth:`PrunerNetwork.regularizer` keeps logits from
  saturating (``PrunerConfig.logit_l2``).

The sampled gates use a straight-through Gumbel-softmax (:func:`gumbel_gates`): the forward
pass sees hard 0/1 decisions, exactly the SubNet that post-processing will build, while the
backward pass uses the gradient of the relaxed sample.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from einops import rearrange
from torch import Tensor, nn

from dipgo.search.config import TAU_SCHEDULES, PrunerConfig
from dipgo.supernets.gates import GATE_KINDS, STEP_BLOCK, GateSlot

# Index 0 of the last logit axis means "close / reuse", index 1 means "compute / keep".
CLOSE, KEEP = 0, 1


def _check_grid(slots: Sequence[GateSlot], grid: tuple[int, int]) -> None:
    """Reject a grid that does not describe the slots in step-major order.

    A wrong grid would silently tie unrelated slots to the same step/block embedding, so we
    check the contract: ``N == S * B``, one step value per row, one block per column.
    """
    steps, blocks = grid
    # A joint search appends other kinds' slots after the reuse grid: the grid covers the
    # leading reuse slots, the rest get free queries.
    leading = _grid_slots(slots)
    if steps < 1 or blocks < 1 or steps * blocks != leading:
        raise ValueError(
            f"pruner grid (steps={steps}, blocks={blocks}) must multiply to the number of slots "
            f"({leading} reuse slots of {len(slots)})"
        )
    for s in range(steps):
        row = slots[s * blocks : (s + 1) * blocks]
        if len({slot.step for slot in row}) != 1:
            raise ValueError(
                f"pruner grid expects slots in step-major order, but row {s} mixes steps "
                f"{sorted({str(slot.step) for slot in row})}"
            )
        for b, slot in enumerate(row):
            if slot.block != slots[b].block:
                raise ValueError(
                    f"pruner grid expects the same block order in every step; slot {slot.name!r} "
                    f"has block {slot.block!r} where {slots[b].block!r} was expected"
                )


def _grid_slots(slots: Sequence[GateSlot]) -> int:
    """How many leading slots are reuse unit gates (step gates and other kinds follow them)."""
    return next((i for i, s in enumerate(slots) if s.kind != "reuse" or s.block == STEP_BLOCK), len(slots))


def _step_rows(slots: Sequence[GateSlot], grid: tuple[int, int]) -> Tensor:
    """For each slot after the grid: the grid row of its step if it is a step gate, else -1."""
    blocks = grid[1]
    rows = {slots[r * blocks].step: r for r in range(grid[0])}
    extra = slots[grid[0] * blocks:]
    return torch.tensor([rows.get(s.step, -1) if s.block == STEP_BLOCK else -1 for s in extra], dtype=torch.long)


def _kind_index(slots: Sequence[GateSlot]) -> Tensor:
    """Slot kinds as indices into ``GATE_KINDS``."""
    unknown = sorted({s.kind for s in slots} - set(GATE_KINDS))
    if unknown:
        raise ValueError(f"unknown gate kind(s) {unknown}; accepted: {', '.join(GATE_KINDS)}")
    return torch.tensor([GATE_KINDS.index(s.kind) for s in slots], dtype=torch.long)  # (N,)


def _cost_feature(slots: Sequence[GateSlot]) -> Tensor:
    """Log of each slot's cost relative to the mean slot cost, ``(N, 1)``.

    Scale-free (MACs of a UNet and of a toy MLP give the same feature range) and 0 for an
    average slot, so the feature only nudges the queries.
    """
    cost = torch.tensor([max(float(s.cost), 0.0) for s in slots], dtype=torch.float32)  # (N,)
    mean = cost.mean()
    if mean <= 0:
        return torch.zeros(len(slots), 1)
    return rearrange(torch.log((cost + 1e-3 * mean) / mean), "n -> n 1")  # (N, 1)


class PrunerNetwork(nn.Module):
    """Maps learnable per-slot queries to two-way gate logits ``(N, 2)``.

    Args:
        slots: the SuperNet's gate slots; their order is the order of the output logits.
        config: network and temperature hyper-parameters.
        grid: ``(S, B)`` for ``reuse`` gates laid out step-major (the first ``S * B`` slots); the
            queries are then ``step_embedding[s] + block_embedding[b] + slot_residual[s*B + b]``, so
            that what is learnt for one step transfers to its neighbours. Slots after the grid (a
            joint search's other kinds) get free queries. ``None``: one free query per slot.
    """

    def __init__(
        self,
        slots: Sequence[GateSlot],
        config: PrunerConfig,
        grid: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if len(slots) == 0:
            raise ValueError("the pruner needs at least one gate slot; the SuperNet has none")
        if grid is not None:
            _check_grid(slots, grid)
        self.slots = list(slots)
        self.config = config
        self.grid = grid
        d = config.d_model
        self._build_queries(len(slots), d, grid)
        if grid is not None:
            # step gates (a reuse SuperNet's per-step slots) share their step's embedding
            self.register_buffer("extra_step_row", _step_rows(slots, grid), persistent=False)  # (N - S*B,)
        self.slot_kind_embedding = nn.Embedding(len(GATE_KINDS), d)
        nn.init.normal_(self.slot_kind_embedding.weight, std=0.02)
        self.register_buffer("kind_index", _kind_index(slots), persistent=False)  # (N,)
        self.cost_embedding = nn.Linear(1, d)
        nn.init.zeros_(self.cost_embedding.bias)  # an average-cost slot gets no offset
        self.register_buffer("cost_feature", _cost_feature(slots), persistent=False)  # (N, 1)
        self.budget_embedding = self._build_budget_embedding(d) if config.budget_conditioned else None
        self.encoder = self._build_encoder(config)
        self.head = self._build_head(d, config.init_keep_logit)
        self.slot_logit = nn.Parameter(torch.zeros(len(slots)))  # (N,), scaled by slot_logit_scale

    @property
    def num_slots(self) -> int:
        return len(self.slots)

    def _build_queries(self, n: int, d: int, grid: tuple[int, int] | None) -> None:
        """Learnable queries: free ``(N, D)`` or factorised step + block + residual."""
        if grid is None:
            # Unit scale (as nn.Embedding): the queries are what tells slots apart; tiny queries
            # would be drowned by the shared attention output and every slot would collapse
            # to the same logits.
            self.queries = nn.Parameter(torch.randn(n, d))  # (N, D)
            return
        steps, blocks = grid
        # joint searches: the slots after the grid (another gate kind) get free queries
        self.extra_queries = nn.Parameter(torch.randn(n - steps * blocks, d)) if n > steps * blocks else None
        # Each half of unit variance, so step + block has unit scale like free queries.
        self.step_embedding = nn.Parameter(torch.randn(steps, d) * 0.5**0.5)  # (S, D)
        self.block_embedding = nn.Parameter(torch.randn(blocks, d) * 0.5**0.5)  # (B, D)
        # Starts at zero: slots begin fully tied to their step and block, and only become
        # individual where the losses ask for it.
        self.slot_residual = nn.Parameter(torch.zeros(n, d))  # (N, D)

    @staticmethod
    def _build_budget_embedding(d: int) -> nn.Module:
        """MLP on ``[budget, log budget]``: log spreads the small budgets apart."""
        return nn.Sequential(nn.Linear(2, d), nn.GELU(), nn.Linear(d, d))

    @staticmethod
    def _build_encoder(config: PrunerConfig) -> nn.Module:
        if config.num_layers == 0:
            return nn.Identity()
        layer = nn.TransformerEncoderLayer(
            d_model=config.d_model,
            nhead=config.num_heads,
            dim_feedforward=4 * config.d_model,
            dropout=config.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        # norm_first layers have no final norm of their own; the head starts with one.
        return nn.TransformerEncoder(layer, num_layers=config.num_layers, enable_nested_tensor=False)

    @staticmethod
    def _build_head(d: int, init_keep_logit: float) -> nn.Sequential:
        """LayerNorm -> MLP -> two logits, initialised to "compute everything".

        The last layer's weight is zero and its bias is ``[0, init_keep_logit]``, so every slot
        starts at p(keep) = sigmoid(init_keep_logit) whatever the queries are: the search
        begins at the original model. Its weight still receives gradients on the first step
        (the hidden activations are not zero), so learning starts immediately.
        """
        last = nn.Linear(d, 2)
        nn.init.zeros_(last.weight)
        with torch.no_grad():
            last.bias.copy_(torch.tensor([0.0, init_keep_logit]))
        return nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.GELU(), last)

    def slot_queries(self) -> Tensor:
        """The per-slot queries before the budget and the transformer, ``(N, D)``."""
        if self.grid is None:
            q = self.queries  # (N, D)
        else:
            grid_q = rearrange(self.step_embedding, "s d -> s 1 d") + rearrange(
                self.block_embedding, "b d -> 1 b d"
            )  # (S, B, D)
            q = rearrange(grid_q, "s b d -> (s b) d")  # (S*B, D)
            if self.extra_queries is not None:
                rows = self.extra_step_row  # (E,), -1 = not a step gate
                step_q = self.step_embedding[rows.clamp(min=0)] * (rows >= 0).unsqueeze(-1)  # (E, D)
                q = torch.cat([q, self.extra_queries + step_q], dim=0)  # (N, D)
            q = q + self.slot_residual  # (N, D)
        return q + self.slot_kind_embedding(self.kind_index) + self.cost_embedding(self.cost_feature)

    def _budget_vector(self, budget: Tensor | float | None, like: Tensor) -> Tensor:
        """Embedding of the target budget, ``(D,)``; validates the value."""
        if budget is None:
            raise ValueError("this pruner is budget-conditioned: call it with the target budget in (0, 1]")
        b = torch.as_tensor(budget, dtype=like.dtype, device=like.device).reshape(-1)
        if b.numel() != 1 or not (0.0 < float(b) <= 1.0):
            raise ValueError(f"pruner budget must be one number in (0, 1]; got {budget!r}")
        features = torch.cat([b, torch.log(b)])  # (2,)
        return self.budget_embedding(features)  # (D,)

    def forward(self, budget: Tensor | float | None = None) -> Tensor:
        """Two-way gate logits ``(N, 2)``: index 0 = close/reuse, index 1 = compute/keep.

        ``budget`` (target kept-cost ratio in (0, 1]) is required when the pruner is
        budget-conditioned and ignored otherwise.
        """
        q = self.slot_queries()  # (N, D)
        if self.budget_embedding is not None:
            q = q + self._budget_vector(budget, q)  # (N, D) + (D,)
        h = self.encoder(rearrange(q, "n d -> 1 n d"))  # (1, N, D)
        logits = self.head(rearrange(h, "1 n d -> n d"))  # (N, 2)
        free = self.config.slot_logit_scale * self.slot_logit  # (N,)
        return logits + torch.stack([torch.zeros_like(free), free], dim=-1)  # (N, 2)

    @torch.no_grad()
    def start_at(self, keep: Tensor) -> None:
        """Start each slot decided: kept slots at a keep-minus-close gap of ``+init_keep_logit``,
        the others at ``-init_keep_logit`` (``keep``: ``(N,)`` booleans), through the free slot
        logits. The network's head starts at ``+init_keep_logit`` everywhere, so a closed slot's
        free logit starts at ``-2 * init_keep_logit / slot_logit_scale``."""
        keep = torch.as_tensor(keep, dtype=torch.bool).reshape(-1)
        if keep.numel() != self.num_slots:
            raise ValueError(f"start_at needs one keep value per slot ({self.num_slots}); got {keep.numel()}")
        if self.config.slot_logit_scale <= 0:
            raise ValueError("pruner.init=prior needs the free slot logits (pruner.slot_logit_scale > 0)")
        gap = -2.0 * self.config.init_keep_logit / self.config.slot_logit_scale
        self.slot_logit.copy_(torch.where(keep, 0.0, gap).to(self.slot_logit))

    def regularizer(self, logits: Tensor) -> Tensor:
        """``logit_l2 * logit_penalty(logits)``: add it to the search loss (see ``PrunerConfig``)."""
        return self.config.logit_l2 * logit_penalty(logits)


def keep_probs(logits: Tensor) -> Tensor:
    """p(keep) per slot, ``(N,)``, from two-way logits ``(N, 2)``.

    The deterministic, low-variance gate values: use them for the expected cost and for
    post-processing (ranking slots), while the distortion sees sampled gates.
    """
    return torch.softmax(logits, dim=-1)[..., KEEP]  # (N,)


def logit_penalty(logits: Tensor) -> Tensor:
    """Mean squared keep-minus-close logit gap, a scalar: keeps gates decided but not frozen."""
    gap = logits[..., KEEP] - logits[..., CLOSE]  # (N,)
    return gap.pow(2).mean()


def gumbel_gates(
    logits: Tensor,
    tau: float,
    hard: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Sample keep values ``(N,)`` with a (straight-through) Gumbel-softmax.

    With ``hard=True`` the forward value is exactly 0.0 or 1.0, so the SuperNet computes the
    very SubNet the sample describes (no "half-computed" blocks the real SubNet cannot
    reproduce); the backward pass uses the gradient of the soft sample
    ``softmax((logits + g) / tau)[:, 1]``. With ``hard=False`` the soft sample itself is returned.

    The Gumbel noise is drawn with ``torch.rand(..., generator=generator)`` instead of
    ``F.gumbel_softmax`` (which takes no generator): the search loop seeds a generator from
    ``(seed, global_step)`` so a resumed run draws exactly the same gates.
    """
    if logits.ndim != 2 or logits.shape[-1] != 2:
        raise ValueError(f"gumbel_gates expects logits of shape (N, 2); got {tuple(logits.shape)}")
    if tau <= 0:
        raise ValueError(f"Gumbel temperature must be > 0; got {tau}")
    device = generator.device if generator is not None else logits.device
    # float32 noise whatever the logits' dtype: in bf16, 1 - 1e-7 rounds to 1 and log(0) = -inf.
    u = torch.rand(logits.shape, generator=generator, device=device, dtype=torch.float32)  # (N, 2)
    u = u.clamp(min=torch.finfo(torch.float32).tiny, max=1.0 - 1e-7)
    noise = -torch.log(-torch.log(u)).to(logits.device)  # Gumbel(0, 1), (N, 2)
    soft32 = torch.softmax((logits.float() + noise) / tau, dim=-1)[:, KEEP]  # (N,)
    soft = soft32.to(logits.dtype)
    if not hard:
        return soft
    hard_keep = (soft32 > 0.5).to(soft.dtype)  # argmax of the two noisy logits, (N,)
    return hard_keep - soft.detach() + soft  # value of hard, gradient of soft


def temperature(step: int, total_steps: int, config: PrunerConfig) -> float:
    """Gumbel temperature at ``step`` of ``total_steps``: ``tau_start`` at 0, ``tau_end`` at the end.

    Annealing moves the relaxed samples from soft (informative gradients for every slot)
    to near-hard (the gradient describes the SubNet that will actually be built). Steps past
    the end keep ``tau_end``.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1; got {total_steps}")
    t = min(max(step / total_steps, 0.0), 1.0)
    start, end = config.tau_start, config.tau_end
    if config.tau_schedule == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))
    if config.tau_schedule == "linear":
        return start + (end - start) * t
    if config.tau_schedule == "exp":
        return start * (end / start) ** t
    raise ValueError(
        f"pruner.tau_schedule must be one of {', '.join(TAU_SCHEDULES)}; got {config.tau_schedule!r}"
    )
