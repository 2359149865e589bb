"""The ``reuse`` gate kind: timestep feature reuse across a diffusion trajectory (DiP-GO).

A denoiser is called once per sampling step. For every step ``s >= 1`` and every gated unit ``b``
(a UNet block, a transformer block, or a layer inside them) there is a keep probability
``g[s, b]``; the unit's output at step ``s`` is ``g * f_b(x) + (1 - g) * cache_b`` where
``cache_b`` is its (mixed) output at step ``s - 1``: DiP-GO's backup connection. Step 0 has no
gates. Slots are step-major: slot ``(s - 1) * B + b`` is ``"step{s}/{unit}"``.

Hard gates skip work: a reused unit is not executed, and units whose output is read only by
reused units are skipped too (the dependency cascade; see :func:`effective_grid`). Training uses
the same *effective* gate in its soft mix, so what the pruner optimises is exactly what the
SubNet later runs. Each unit's forward goes through a hook in diffusers' ``HookRegistry``
(:mod:`dipgo.supernets.hooks`), removed exactly, so the model stays a plain diffusers model.
"""

from __future__ import annotations

import copy
import dataclasses
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils.checkpoint import checkpoint

from dipgo.measure.macs import block_macs
from dipgo.models.io import null_class_for
from dipgo.supernets import forecast
from dipgo.supernets.adapters import ConsumerGraph, ReuseUnit, get_reuse_adapter
from dipgo.supernets.gates import STEP_BLOCK, GateSlot, freeze
from dipgo.supernets.hooks import ForwardHook, attach
from dipgo.supernets.sampling import (
    SCHEDULER_NAMES,
    LoopState,
    make_model_fn,
    make_scheduler,
    model_inputs,
    sample,
)


@dataclass
class ReuseConfig:
    """How a denoiser is turned into a reuse SuperNet.

    Attributes:
        num_steps: sampling steps of the trajectory the gates are searched for; a plan is only
            valid for this step count.
        granularity: ``"block"`` (UNet down/mid/up blocks, transformer blocks) or ``"layer"``
            (UNet resnets and attentions, transformer attn1/attn2/ff).
        mode: ``"output"`` (a reused unit returns its cached output), ``"residual"`` (it returns
            ``x + cached_delta``, FORA style, keeping this step's upstream work) or ``"auto"``
            (residual for transformer blocks and UNet attentions, output for UNet blocks/resnets).
        guidance_scale: classifier-free guidance scale; ``> 1`` batches cond and uncond in one call
            (the caches then hold both halves, and the cost counts both).
        scheduler: ``"ddim"``, ``"dpmsolver++"`` or ``"euler"``.
        scheduler_config: the model folder's scheduler config (beta schedule, prediction type);
            ``None`` uses diffusers' defaults.
        num_train_timesteps: used only when ``scheduler_config`` is ``None``.
        null_class: label of the unconditional half for class-conditional models; ``None`` reads
            it from the model (DiT: ``num_embeds_ada_norm``; UNet: ``num_class_embeds - 1``).
        checkpointing: recompute each step's denoiser call in the backward pass
            (``torch.utils.checkpoint``), bounding memory of the unrolled trajectory to about one
            step's activations plus the caches.
        truncate_steps: detach the latent, the caches and the solver state every ``k`` steps
            (truncated backprop through time); ``None`` backpropagates through all steps.
        forecast_order: what a closed unit returns: 0 = its output of the last computed step
            (DiP-GO's copy), 1 / 2 = a linear / quadratic extrapolation in the step index from its
            last computed steps (TaylorSeer-style, see :mod:`dipgo.supernets.forecast`). Soft
            training mixes with the same forecast, so the pruner learns which slots forecast well.
        step_gates: add one gate per step (after the ``(S-1) x B`` unit gates) that multiplies
            every unit gate of its step. A whole skipped step is then one decision instead of
            ``B`` independent ones that must all close at once, which is what lets the pruner find
            the cheap "skip the call" steps of :attr:`ReuseSuperNet.skips_whole_steps` on its
            own. Plans are still ``(S, B)`` compute grids.
        whole_step_skip: ``None`` decides from the model (:func:`skips_whole_steps`); ``True``
            also skips the call of a fully closed step on models whose head reads the timestep
            (DiTs) and returns the forecast model output (an approximation, not a replay of the
            units); ``False`` always runs the call.
    """

    num_steps: int = 50
    granularity: str = "block"
    mode: str = "auto"
    guidance_scale: float = 1.0
    scheduler: str = "ddim"
    scheduler_config: dict[str, Any] | None = None
    num_train_timesteps: int = 1000
    null_class: int | None = None
    checkpointing: bool = False
    truncate_steps: int | None = None
    forecast_order: int = 0
    step_gates: bool = False
    whole_step_skip: bool | None = None

    def __post_init__(self) -> None:
        forecast.check_order(self.forecast_order)
        if self.num_steps < 2:
            raise ValueError(f"num_steps must be at least 2 (step 0 is never gated), got {self.num_steps}")
        if self.scheduler not in SCHEDULER_NAMES:
            raise ValueError(f"unknown scheduler {self.scheduler!r}: expected one of {', '.join(SCHEDULER_NAMES)}")
        if self.truncate_steps is not None and self.truncate_steps < 1:
            raise ValueError(f"truncate_steps must be >= 1 or None, got {self.truncate_steps}")


# ----------------------------------------------------------------------------- cascade


def skips_whole_steps(model: nn.Module, modes: Sequence[str], override: bool | None = None) -> bool:
    """True when a step whose units are all closed needs no denoiser call at all.

    ``override`` (``ReuseConfig.whole_step_skip``, recorded in the plan) forces the answer;
    ``None`` decides as follows.

    UNet2DModel (unless its Fourier time embedding rescales the output by the timestep) and
    UNet2DConditionModel end in norm -> activation -> conv_out, which ignore the timestep; with
    every unit in output mode (its cache does not read today's input) the step's output is a
    function of the caches only. DiT-style heads are modulated by the timestep embedding and
    residual units add today's input, so those steps must still run the call.
    """
    if override is not None:
        return bool(override)
    name = type(model).__name__
    if name == "UNet2DModel":
        step_free_head = getattr(model.config, "time_embedding_type", "positional") != "fourier"
    else:
        step_free_head = name == "UNet2DConditionModel"
    return step_free_head and all(m == "output" for m in modes)


def whole_steps_rows(num_steps: int, target: float) -> set[int]:
    """The K = round(target x S) evenly spaced steps at which every unit computes in the
    "whole steps" schedule (a K-step sampler on the searched timesteps); step 0 is one."""
    return evenly_spaced_rows(num_steps, round(target * num_steps))


def evenly_spaced_rows(num_steps: int, k: int) -> set[int]:
    """``k`` evenly spaced steps of ``num_steps`` (clamped to ``[1, num_steps]``), step 0 first."""
    k = max(1, min(num_steps, k))
    return {round(i * num_steps / k) for i in range(k)}


def effective_grid(grid: torch.Tensor, graph: ConsumerGraph) -> torch.Tensor:
    """Keep probabilities after the dependency cascade, ``(S, B) -> (S, B)``.

    ``eff[s, b] = grid[s, b] * need[s, b]`` with ``need = 1 - prod_c (1 - eff[s, c])`` over the
    consumers ``c`` of ``b`` (1 when the output head or a residual unit always reads it). Units are
    in execution order, so one reverse pass settles every step at once. Differentiable; exact 0/1
    for hard grids.
    """
    grid = grid.to(torch.get_default_dtype()) if not grid.is_floating_point() else grid
    cols: list[torch.Tensor] = [grid[:, 0]] * grid.shape[1]  # placeholders, all overwritten
    for b in reversed(range(grid.shape[1])):
        if graph.always_needed[b]:
            cols[b] = grid[:, b]
            continue
        missed = torch.ones_like(grid[:, b])  # (S,) prob. that no consumer reads b
        for c in graph.consumers[b]:
            missed = missed * (1 - cols[c])
        cols[b] = grid[:, b] * (1 - missed)
    return torch.stack(cols, dim=1)


def cache_readers(rows: Sequence[Sequence[bool]], skip_whole: bool) -> list[tuple[bool, ...]]:
    """Per step and unit: will a *later* step read this unit's cache? ``(S, B)`` booleans.

    A cache (copy or forecast history) is read only where the unit is closed in a step that still
    calls the model: with ``skip_whole`` a fully closed step returns the forecast model output and
    reads no unit. A hard plan need not store, or update the history of, a unit nobody reads
    again; its outputs are the same and it saves the forecast's arithmetic and memory (the
    SubNet runs more than half of its steps as cheap skips, so this is wall-clock).
    """
    width = len(rows[0]) if rows else 0
    later = [False] * width
    readers: list[tuple[bool, ...]] = [()] * len(rows)
    for s in reversed(range(len(rows))):
        readers[s] = tuple(later)
        row = rows[s]
        if not (skip_whole and not any(row)):
            later = [w or not c for w, c in zip(later, row)]
    return readers


# ----------------------------------------------------------------------------- runtime


@dataclass
class _Residual:
    """Cache of a residual-mode unit: ``delta = unit(x) - x`` and the rest of a tuple output."""

    delta: torch.Tensor
    rest: tuple[Any, ...] | None  # None: the unit returns a bare tensor


@dataclass
class _Forecast:
    """Cache of a unit that forecasts (order >= 1): the history of its output (output mode) or of
    its residual ``unit(x) - x`` (residual mode), plus the rest of the last tuple output."""

    history: forecast.History
    rest: tuple[Any, ...] | None = None


@dataclass
class StepState:
    """What the wrapped units do during one denoiser call.

    Attributes:
        hard: 0/1 decisions, a closed unit is not executed; else soft mixing with ``gates``.
        compute: per unit, whether to run its forward at all (hard: the decision; soft: False only
            where the effective gate is exactly 0 and carries no gradient).
        gates: ``(B,)`` effective keep probabilities for the soft mix (``None`` when hard).
        caches: unit index -> cached output (output mode) or :class:`_Residual` at order 0, a
            :class:`_Forecast` at order >= 1; read and replaced in place during the call.
        step: the sampling step of this call (where a forecast extrapolates to).
        order: forecast order of closed units (0 = copy).
        keep: hard only, per unit: whether a later step reads its cache (:func:`cache_readers`);
            a computed unit with ``False`` drops its cache instead of updating it. ``None`` keeps
            every cache (the future rows are not known, e.g. TeaCache decides call by call).
    """

    hard: bool
    compute: Sequence[bool]
    gates: torch.Tensor | None = None
    caches: dict[int, Any] = field(default_factory=dict)
    step: int = 0
    order: int = 0
    keep: Sequence[bool] | None = None


def _hidden_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _split_output(unit: ReuseUnit, out: Any, x: torch.Tensor) -> tuple[torch.Tensor, tuple[Any, ...] | None]:
    """``(hidden, rest)`` of a residual unit's output, checking the shape contract."""
    hidden, rest = (out[0], tuple(out[1:])) if isinstance(out, tuple) else (out, None)
    if not isinstance(hidden, torch.Tensor) or hidden.shape != x.shape:
        got = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise ValueError(
            f"mode='residual' needs {unit.name} to keep its input's shape {tuple(x.shape)}, got {got}: "
            "use mode='output'"
        )
    return hidden, rest


def _join(hidden: torch.Tensor, rest: tuple[Any, ...] | None) -> Any:
    return hidden if rest is None else (hidden, *rest)


def _mix(g: torch.Tensor, new: Any, old: Any) -> Any:
    """``g * new + (1 - g) * old`` over every tensor of two same-structured outputs."""
    if isinstance(new, torch.Tensor):  # the common case: skip flattening
        return g * new + (1 - g) * old
    new_leaves, spec = pytree.tree_flatten(new)
    old_leaves, _ = pytree.tree_flatten(old)
    mixed = [
        g * n + (1 - g) * o if isinstance(n, torch.Tensor) else n for n, o in zip(new_leaves, old_leaves)
    ]
    return pytree.tree_unflatten(mixed, spec)


class ReuseRuntime:
    """The shared state behind the wrapped forwards.

    ``state is None`` means pass-through: every unit runs its original forward, so the wrapped
    model is bit-identical to the plain one (the reference path uses that).
    """

    def __init__(self, units: Sequence[ReuseUnit]) -> None:
        self.units = list(units)
        self.state: StepState | None = None

    def call(self, idx: int, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        state = self.state
        if state is None:
            return forward(*args, **kwargs)
        unit, prev = self.units[idx], state.caches.get(idx)
        if state.keep is not None and state.compute[idx] and not state.keep[idx]:
            state.caches.pop(idx, None)  # computed, and no later step reads it: nothing to remember
            return forward(*args, **kwargs)
        if prev is None or (state.hard and state.compute[idx]):
            if state.order > 0:
                return self._compute_forecast(state, idx, unit, prev, forward, args, kwargs)
            return self._compute(state, idx, unit, forward, args, kwargs)
        if not state.compute[idx]:
            if state.order > 0:
                return self._forecast(state, unit, prev, args, kwargs)
            return self._replay(unit, prev, args, kwargs)
        out = forward(*args, **kwargs)
        if state.order > 0:
            return self._soft_forecast(state, idx, unit, prev, out, args, kwargs)
        return self._soft(state, idx, unit, prev, out, args, kwargs)

    @staticmethod
    def _compute(state: StepState, idx: int, unit: ReuseUnit, forward: Callable[..., Any],
                 args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run the unit and remember it; the output is returned untouched (bit-exact)."""
        out = forward(*args, **kwargs)
        if unit.mode == "output":
            state.caches[idx] = out
        else:
            x = _hidden_input(args, kwargs)
            hidden, rest = _split_output(unit, out, x)
            state.caches[idx] = _Residual(hidden - x, rest)
        return out

    @staticmethod
    def _replay(unit: ReuseUnit, prev: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A closed unit: the cached output, or today's input plus the cached residual."""
        if unit.mode == "output":
            return prev
        return _join(_hidden_input(args, kwargs) + prev.delta, prev.rest)

    @staticmethod
    def _soft(state: StepState, idx: int, unit: ReuseUnit, prev: Any, out: Any,
              args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The backup connection: ``g * f(x) + (1 - g) * cache`` (on the residual in residual mode)."""
        g = state.gates[idx]
        if unit.mode == "output":
            state.caches[idx] = _mix(g, out, prev)
            return state.caches[idx]
        x = _hidden_input(args, kwargs)
        hidden, rest = _split_output(unit, out, x)
        # mix in output space so that g == 1 returns f(x) bit-exactly; same delta mathematically
        mixed = g * hidden + (1 - g) * (x + prev.delta)
        state.caches[idx] = _Residual(mixed - x, rest)
        return _join(mixed, rest)

    # -- forecasting (order >= 1): the cache is a history of computed steps, see forecast.py
    @staticmethod
    def _tracked(unit: ReuseUnit, out: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
                 ) -> tuple[Any, tuple[Any, ...] | None]:
        """``(what the history extrapolates, rest)``: the output, or the residual and tuple tail."""
        if unit.mode == "output":
            return out, None
        x = _hidden_input(args, kwargs)
        hidden, rest = _split_output(unit, out, x)
        return hidden - x, rest

    def _compute_forecast(self, state: StepState, idx: int, unit: ReuseUnit, prev: _Forecast | None,
                          forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run the unit and add the step to its history; the output is returned untouched."""
        out = forward(*args, **kwargs)
        value, rest = self._tracked(unit, out, args, kwargs)
        history = (forecast.start(value, state.step, state.order) if prev is None
                   else forecast.update(prev.history, value, state.step))
        state.caches[idx] = _Forecast(history, rest)
        return out

    @staticmethod
    def _forecast(state: StepState, unit: ReuseUnit, prev: _Forecast,
                  args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A closed unit: its extrapolated output (or today's input plus the extrapolated residual)."""
        value = forecast.predict(prev.history, state.step)
        if unit.mode == "output":
            return value
        return _join(_hidden_input(args, kwargs) + value, prev.rest)

    def _soft_forecast(self, state: StepState, idx: int, unit: ReuseUnit, prev: _Forecast, out: Any,
                       args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """``g * f(x) + (1 - g) * forecast``; the history takes the computed value with weight ``g``."""
        g = state.gates[idx]
        predicted = forecast.predict(prev.history, state.step)
        value, rest = self._tracked(unit, out, args, kwargs)
        state.caches[idx] = _Forecast(forecast.update(prev.history, value, state.step, g), rest)
        if unit.mode == "output":
            return _mix(g, out, predicted)
        hidden, x = out[0] if isinstance(out, tuple) else out, _hidden_input(args, kwargs)
        return _join(g * hidden + (1 - g) * (x + predicted), rest)


def cache_nbytes(caches: Mapping[int, Any]) -> int:
    """Bytes of tensors held by a runtime's caches (copies, residuals or forecast histories)."""
    total = 0
    for entry in caches.values():
        if isinstance(entry, _Forecast):
            total += entry.history.nbytes()
            entry = entry.rest
        elif isinstance(entry, _Residual):
            total += entry.delta.numel() * entry.delta.element_size()
            entry = entry.rest
        total += sum(x.numel() * x.element_size() for x in pytree.tree_leaves(entry) if isinstance(x, torch.Tensor))
    return total


_INSTALLED: weakref.WeakKeyDictionary[nn.Module, ReuseHooks] = weakref.WeakKeyDictionary()


def _unit_forward(runtime: ReuseRuntime, idx: int) -> Callable[[Callable[..., Any], tuple[Any, ...], dict[str, Any]], Any]:
    def forward(original: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return runtime.call(idx, original, args, kwargs)

    return forward


class ReuseHooks:
    """The wrapped forwards of a model's reuse units and their runtime; one per model at a time."""

    def __init__(self, model: nn.Module, units: Sequence[ReuseUnit]) -> None:
        if model in _INSTALLED:
            raise RuntimeError(
                f"{type(model).__name__} already has reuse gates installed: call remove_reuse(model) first"
            )
        self.model = model
        self.runtime = ReuseRuntime(units)
        self._patches = [attach(u.module, "reuse_unit", ForwardHook(_unit_forward(self.runtime, i)))
                         for i, u in enumerate(units)]
        self._extra_removers: list[Callable[[], None]] = []
        _INSTALLED[model] = self

    def on_remove(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` when the hooks are removed (restore flags, drop a pre-hook...)."""
        self._extra_removers.append(fn)

    def remove(self) -> None:
        if _INSTALLED.get(self.model) is not self:
            return
        for remove in reversed(self._patches):
            remove()
        for fn in reversed(self._extra_removers):
            fn()
        self.runtime.state = None
        del _INSTALLED[self.model]


def remove_reuse(model: nn.Module) -> None:
    """Undo :func:`apply_reuse` (or ``install_plan``): original forwards, flags and modes back."""
    hooks = _INSTALLED.get(model)
    if hooks is None:
        raise ValueError(f"{type(model).__name__} has no reuse gates installed")
    hooks.remove()


# ----------------------------------------------------------------------------- SuperNet


def _tree_detach(tree: Any) -> Any:
    return pytree.tree_map(lambda v: v.detach() if isinstance(v, torch.Tensor) else v, tree)


def _detach_entry(entry: Any) -> Any:
    if isinstance(entry, _Forecast):
        return _Forecast(forecast.detach(entry.history), _tree_detach(entry.rest))
    if isinstance(entry, _Residual):
        return _Residual(entry.delta.detach(), _tree_detach(entry.rest))
    return _tree_detach(entry)


def _detach_caches(caches: dict[int, Any]) -> dict[int, Any]:
    return {k: _detach_entry(v) for k, v in caches.items()}


@dataclass
class _Trajectory:
    """Per-run bookkeeping: current step and the caches carried between steps."""

    rows: torch.Tensor | None  # (S, B) effective gates (soft) or None (hard)
    compute: list[list[bool]]  # (S, B) run the unit's forward?
    hard: bool
    order: int = 0
    step: int = 0
    caches: dict[int, Any] = field(default_factory=dict)
    outputs: forecast.History | None = None  # the model output's history, for whole-step skips


@dataclass(frozen=True, eq=False)
class _Snapshot:
    """A hard run just before one step's denoiser call: the loop and the units' caches."""

    loop: LoopState
    caches: dict[int, Any]
    outputs: forecast.History | None


@dataclass(frozen=True, eq=False)
class Trace:
    """One hard trajectory of one batch, with its state before every step.

    A plan search scores thousands of plans that differ from the last one in a slot or two; a
    plan whose effective rows first differ from a trace's at step k resumes from ``states[k]``
    (:meth:`ReuseSuperNet.trace`) and runs only steps k..S-1, with the same result as a full run.
    """

    compute: tuple[tuple[bool, ...], ...]  # (S, B) effective compute rows
    order: int
    noise: torch.Tensor  # the batch's noise: a trace only resumes runs of this very batch
    states: tuple[_Snapshot, ...]  # (S,) state before step s
    final: torch.Tensor  # (B, C, H, W)

    def shared_steps(self, compute: Sequence[Sequence[bool]]) -> int:
        """How many leading steps a plan with these effective rows runs exactly like this trace."""
        for s, (mine, theirs) in enumerate(zip(self.compute, compute)):
            if tuple(mine) != tuple(theirs):
                return s
        return len(self.compute)

    def nbytes(self) -> int:
        """Bytes of the distinct tensors the trace keeps alive (shared ones counted once)."""
        seen: dict[int, int] = {}
        for snap in self.states:
            for t in _tensors((snap.loop.x, snap.loop.eps, snap.caches, snap.outputs)):
                seen.setdefault(t.data_ptr(), t.numel() * t.element_size())
        return sum(seen.values()) + self.final.numel() * self.final.element_size()


def _tensors(tree: Any) -> list[torch.Tensor]:
    """Tensor leaves of nested tuples / lists / dicts / dataclasses (caches and histories)."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        return [t for f in dataclasses.fields(tree) for t in _tensors(getattr(tree, f.name))]
    if isinstance(tree, Mapping):
        return [t for v in tree.values() for t in _tensors(v)]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in _tensors(v)]
    return []


class ReuseSuperNet:
    """A frozen denoiser plus reuse gates over ``(num_steps - 1) x num_units`` slots.

    Implements dipgo's SuperNet protocol (``slots``, ``full_cost``, ``expected_cost``,
    ``reference``, ``gated``) and adds ``sample`` for hard 0/1 grids (closed units really skipped).
    Owns no parameters: gates come from the pruner.
    """

    kind = "reuse"

    def __init__(self, model: nn.Module, config: ReuseConfig, units: Sequence[ReuseUnit],
                 graph: ConsumerGraph, unit_macs: Sequence[float], call_macs: float) -> None:
        self.model = model
        self.config = config
        self.units = list(units)
        self.graph = graph
        self.null_class = config.null_class if config.null_class is not None else null_class_for(model)
        self._unit_macs = torch.tensor(list(unit_macs), dtype=torch.float64)  # (B,)
        self._call_macs = float(call_macs)
        self._dense_call_macs = float(call_macs)  # the denominator of every ratio, even in a view
        restore = freeze(model)
        self._hooks = ReuseHooks(model, self.units)
        self._hooks.on_remove(restore)
        self._model_fn = make_model_fn(model)
        self._skips_whole_steps = skips_whole_steps(model, [u.mode for u in self.units], config.whole_step_skip)
        self.slots = self._make_slots()
        # learned full steps per target (dipgo.search.reuse_placement), used by prior_keep
        self.placed_rows: dict[float, list[int]] = {}
        self.placement: Any = None  # its record (a dipgo.search.reuse_placement.Placement), for the plan's meta

    # -- shape of the search space
    @property
    def num_steps(self) -> int:
        return self.config.num_steps

    @property
    def block_names(self) -> list[str]:
        return [u.name for u in self.units]

    @property
    def modes(self) -> list[str]:
        return [u.mode for u in self.units]

    @property
    def grid_shape(self) -> tuple[int, int]:
        return (self.num_steps - 1, len(self.units))

    @property
    def model_class(self) -> str:
        return type(self.model).__name__

    @property
    def skips_whole_steps(self) -> bool:
        """True when a step with every unit closed does not call the model at all.

        For a UNet (step-independent head, output-mode units) such a step's output depends on
        the units' caches only, so the stem, time embedding and head are dead work: the step
        returns the model output forecast from the computed steps instead (copied at order 0,
        which is bit-identical to replaying every unit). It then costs no MACs, which is what
        makes "every N-th step full" cost exactly 1/N. DiT heads read the timestep and residual
        units read today's input, so DiTs still run the call (see :func:`skips_whole_steps`).
        """
        return self._skips_whole_steps

    def _make_slots(self) -> list[GateSlot]:
        width = max(2, len(str(self.num_steps - 1)))
        units = [
            GateSlot(name=f"step{s:0{width}d}/{u.name}", kind="reuse", block=u.name, cost=float(m), step=s)
            for s in range(1, self.num_steps)
            for u, m in zip(self.units, self._unit_macs.tolist())
        ]
        if not self.config.step_gates:
            return units
        steps = [GateSlot(name=f"step{s:0{width}d}/{STEP_BLOCK}", kind="reuse", block=STEP_BLOCK,
                          cost=self._call_macs, step=s) for s in range(1, self.num_steps)]
        return units + steps

    def whole_steps_rows(self, target: float) -> set[int]:
        """The steps of this SuperNet's whole-steps schedule (see :func:`whole_steps_rows`)."""
        return whole_steps_rows(self.num_steps, target)

    def prior_keep(self, target: float) -> torch.Tensor:
        """``(N,)`` slot keep decisions of the start schedule at ``target`` (step gates, if any,
        open: the unit gates carry the schedule); the pruner's ``init=prior`` start.

        The learned placement of that target (:attr:`placed_rows`, set by
        :mod:`dipgo.search.reuse_placement`) if there is one, else :meth:`evenly_spaced_start`."""
        rows = set(self.placed_rows.get(float(target), ())) or self.evenly_spaced_start(target)
        keep = [s.step in rows for s in self.slots[: self.grid_shape[0] * self.grid_shape[1]]]
        keep += [True] * (len(self.slots) - len(keep))
        return torch.tensor(keep)

    def evenly_spaced_start(self, target: float) -> set[int]:
        """The full steps of the largest evenly spaced schedule that stays within the budget, give
        or take less than a quarter of one step's share of the MACs (what a DiT's skipped steps pay
        for the embedding and head): 17 of 50 steps at 0.35 on the UNet (34 %, not round(17.5) = 18
        steps at 36 %), 10 of 50 at 0.20 on the DiT (20.2 %). From a start above the budget the
        cost controller closes slots from the first step on, and the pruner spends its steps
        repairing the start (measured, pruner-only runs: the UNet at 0.35 gets 42.8 dB from 18
        steps and 50.8 dB from 17; docs/RESULTS.md)."""
        slack = 0.25 / self.num_steps
        k = len(self.whole_steps_rows(target)) + 1
        rows = evenly_spaced_rows(self.num_steps, k)
        while k > 1 and self.plan_cost(self._rows_grid(rows)) - target >= slack:
            k -= 1
            rows = evenly_spaced_rows(self.num_steps, k)
        return rows

    def _rows_grid(self, rows: set[int]) -> list[list[bool]]:
        return [[s in rows] * len(self.units) for s in range(self.num_steps)]

    def gate_grid(self, gates: torch.Tensor) -> torch.Tensor:
        """``(N,)`` slot-ordered gates (or an ``(S-1, B)`` grid) -> ``(S, B)`` grid with row 0 = 1.

        With step gates the unit gates of step ``s`` are multiplied by that step's gate, so a
        closed step closes all its units whatever their own gates say.
        """
        if gates.ndim == 2:
            body = gates
        else:
            n = self.grid_shape[0] * self.grid_shape[1]
            body = gates[:n].reshape(self.grid_shape)
            if self.config.step_gates:
                body = body * gates[n:n + self.grid_shape[0]].reshape(-1, 1)
        return torch.cat([torch.ones_like(body[:1]), body], dim=0)

    def effective(self, grid: torch.Tensor) -> torch.Tensor:
        """Cascade-aware keep probabilities of an ``(S, B)`` grid (see :func:`effective_grid`)."""
        return effective_grid(grid, self.graph)

    # -- costs
    @property
    def unit_macs(self) -> list[float]:
        """MACs of one call of each gated unit (one sample, both CFG halves), in unit order."""
        return self._unit_macs.tolist()

    @property
    def always_paid_macs(self) -> float:
        """MACs of one call outside the gated units (stem, time embedding, head...)."""
        return self._call_macs - float(self._unit_macs.sum())

    def full_cost(self) -> float:
        """MACs of the whole trajectory for one sample (both CFG halves when guidance is on)."""
        return self.num_steps * self._dense_call_macs

    def with_macs(self, unit_macs: Sequence[float], call_macs: float) -> ReuseSuperNet:
        """A view sharing model, hooks and slots, whose units and calls cost ``unit_macs`` /
        ``call_macs`` (e.g. fewer after weight sparsity), with ratios still relative to the dense
        trajectory. Plan extraction and refinement run unchanged on the view, so a joint search
        spends the budget that the sparsity left for reuse."""
        view = copy.copy(self)
        view._unit_macs = torch.tensor(list(unit_macs), dtype=torch.float64)
        view._call_macs = float(call_macs)
        return view

    def paid_steps(self, eff: torch.Tensor) -> torch.Tensor:
        """How many steps pay the MACs outside the units, for ``(..., S, B)`` effective grids.

        Every step, unless the model :attr:`skips_whole_steps`: then a step pays with the
        probability that any of its units computes, ``1 - prod_b (1 - eff[s, b])`` (exact, 0 or
        1, for hard grids, and differentiable for soft ones). Returns shape ``(...)``.
        """
        if not self.skips_whole_steps:
            return torch.full(eff.shape[:-2], float(eff.shape[-2]), dtype=eff.dtype, device=eff.device)
        active = 1 - torch.prod(1 - eff[..., 1:, :], dim=-1)  # (..., S-1)
        return 1 + active.sum(dim=-1)

    def expected_cost(self, gates: torch.Tensor) -> torch.Tensor:
        """Differentiable kept-cost ratio in [0, 1] of ``(N,)`` keep probabilities, cascade included."""
        eff = self.effective(self.gate_grid(gates))  # (S, B)
        weights = (self._unit_macs / self.full_cost()).to(eff)  # (B,)
        base = self.paid_steps(eff) * self.always_paid_macs / self.full_cost()
        return base + (eff * weights).sum()

    def plan_cost(self, compute_grid: Any) -> float:
        """Kept-cost ratio of a hard ``(S, B)`` grid (``True`` = compute), cascade included."""
        grid = torch.as_tensor(compute_grid, dtype=torch.float64)
        if grid.shape != (self.num_steps, len(self.units)):
            raise ValueError(f"compute grid must have shape {(self.num_steps, len(self.units))}, got {tuple(grid.shape)}")
        if not bool(grid[0].all()):
            raise ValueError("step 0 must compute every unit (there is nothing to reuse yet)")
        eff = (self.effective(grid) > 0.5).to(torch.float64)
        total = float(self.paid_steps(eff)) * self.always_paid_macs + float((eff * self._unit_macs).sum())
        return total / self.full_cost()

    def step_macs(self, row: Sequence[bool]) -> float:
        """MACs of one step (not step 0) with a hard row of decisions, cascade included."""
        eff = (self.effective(torch.as_tensor([list(row)], dtype=torch.float64))[0] > 0.5).to(torch.float64)
        if self.skips_whole_steps and not bool(eff.any()):
            return 0.0
        return self.always_paid_macs + float((eff * self._unit_macs).sum())

    # -- trajectories
    def reference(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The plain model's trajectory (the wrapped forwards pass through untouched)."""
        with torch.no_grad():
            final, eps = self._sample(batch, None)
        return {"output": final, "eps": eps}

    def sample_schedule(self, batch: Mapping[str, Any], solver: str, timesteps: Sequence[int]) -> torch.Tensor:
        """The plain model sampled by ``solver`` at exactly ``timesteps`` (a solver schedule, one
        full call each), with this SuperNet's guidance: the final sample ``(B, C, H, W)``."""
        cfg = self.config
        scheduler = make_scheduler(solver, cfg.scheduler_config, cfg.num_train_timesteps)
        with torch.no_grad():
            final, _ = sample(self._model_fn, scheduler, batch, len(timesteps), cfg.guidance_scale,
                              null_class=self.null_class, timesteps=timesteps)
        return final

    def gated(self, batch: Mapping[str, Any], gates: torch.Tensor) -> dict[str, torch.Tensor]:
        """Trajectory with soft keep probabilities ``(N,)``; differentiable in ``gates``."""
        rows = self.effective(self.gate_grid(gates))  # (S, B)
        run_all = rows.requires_grad and torch.is_grad_enabled()
        compute = (rows > 0).tolist() if not run_all else [[True] * rows.shape[1]] * rows.shape[0]
        run = _Trajectory(rows=rows, compute=compute, hard=False, order=self.config.forecast_order)
        final, eps = self._sample(batch, run)
        return {"output": final, "eps": eps}

    def sample(self, batch: Mapping[str, Any], compute_grid: Any = None,
               return_dict: bool = False, forecast_order: int | None = None) -> torch.Tensor | dict[str, torch.Tensor]:
        """Hard-gated trajectory: closed and cascade-skipped units are not executed at all.

        ``compute_grid``: ``(S, B)`` booleans (``True`` = compute), ``None`` = all computed.
        ``forecast_order`` overrides the config's (baselines compare copy and forecast on one
        SuperNet). Returns the final sample ``(B, C, H, W)``, or ``{"output", "eps"}`` with
        ``return_dict``.
        """
        order = self.config.forecast_order if forecast_order is None else forecast.check_order(forecast_order)
        shape = (self.num_steps, len(self.units))
        grid = torch.ones(shape) if compute_grid is None else torch.as_tensor(compute_grid).to(torch.float32)
        compute = (self.effective(grid) > 0.5).tolist()
        with torch.no_grad():
            final, eps = self._sample(batch, _Trajectory(rows=None, compute=compute, hard=True, order=order))
        return {"output": final, "eps": eps} if return_dict else final

    def trace(self, batch: Mapping[str, Any], compute_grid: Any, base: Trace | None = None) -> Trace:
        """:meth:`sample` of a hard plan, kept step by step; ``trace.final`` is the sample.

        With ``base`` (a trace of the same batch), the steps the two plans run alike are not run
        again: the run resumes from ``base``'s state at the first step whose effective row differs,
        and shares the earlier states with it. A plan search moving one slot at a time (the
        refinement) so runs about half the steps per plan on average.
        """
        order = self.config.forecast_order
        grid = torch.as_tensor(compute_grid).to(torch.float32)
        compute = tuple(tuple(row) for row in (self.effective(grid) > 0.5).tolist())
        if base is not None and (base.noise is not batch["noise"] or base.order != order
                                 or len(base.compute) != len(compute)):
            base = None  # another batch or another runtime: nothing to share
        k = 0 if base is None else base.shared_steps(compute)
        if base is not None and k == len(compute):
            return base
        run = _Trajectory(rows=None, compute=[list(r) for r in compute], hard=True, order=order)
        states: list[_Snapshot] = list(base.states[:k]) if base is not None else []
        resume = None
        if base is not None and k > 0:
            snap = base.states[k]
            run.caches, run.outputs, resume = snap.caches, snap.outputs, snap.loop

        def on_state(loop: LoopState) -> None:
            if loop.step >= len(states):  # the resumed step's own state is recorded once
                states.append(_Snapshot(loop, run.caches, run.outputs))

        with torch.no_grad():
            final, _ = self._sample(batch, run, resume=resume, on_state=on_state)
        return Trace(compute, order, batch["noise"], tuple(states), final)

    def _sample(self, batch: Mapping[str, Any], run: _Trajectory | None, resume: LoopState | None = None,
                on_state: Callable[[LoopState], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        scheduler = make_scheduler(cfg.scheduler, cfg.scheduler_config, cfg.num_train_timesteps)
        model_fn = self._model_fn if run is None else self._gated_fn(run)
        on_step = None if run is None else self._on_step(run)
        return sample(model_fn, scheduler, batch, cfg.num_steps, cfg.guidance_scale,
                      null_class=self.null_class, on_step=on_step, truncate_steps=cfg.truncate_steps,
                      resume=resume, on_state=on_state)

    def _on_step(self, run: _Trajectory) -> Callable[[int], None]:
        k = self.config.truncate_steps

        def on_step(i: int) -> None:
            run.step = i
            if k and i > 0 and i % k == 0:
                run.caches = _detach_caches(run.caches)
                run.outputs = None if run.outputs is None else forecast.detach(run.outputs)

        return on_step

    def _gated_fn(self, run: _Trajectory) -> Callable[[torch.Tensor, torch.Tensor, dict[str, Any]], torch.Tensor]:
        whole = self.skips_whole_steps

        def model_fn(x: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
            if whole and run.outputs is not None and not any(run.compute[run.step]):
                return forecast.predict(run.outputs, run.step)  # nothing computes: no call at all
            gates = None if run.rows is None else run.rows[run.step]  # (B,)
            args = (x, t, cond, run.caches, gates, tuple(run.compute[run.step]), run.hard, run.step, run.order)
            if self.config.checkpointing and torch.is_grad_enabled():
                out, run.caches = checkpoint(self._step, *args, use_reentrant=False)
            else:
                out, run.caches = self._step(*args)
            return self._track_output(run, out) if whole else out

        return model_fn

    @staticmethod
    def _track_output(run: _Trajectory, out: torch.Tensor) -> torch.Tensor:
        """Add a computed step to the output history; soft rows mix in the whole-step forecast.

        A soft row is "called" with probability ``m = 1 - prod_b (1 - g_b)`` (the same as
        :meth:`paid_steps` charges), so its output is ``m * out + (1 - m) * forecast``: exactly
        the hard behaviour when the gates are 0 or 1.
        """
        if run.outputs is None:
            run.outputs = forecast.start(out, run.step, run.order)
            return out
        if run.hard or run.rows is None:
            run.outputs = forecast.update(run.outputs, out, run.step)
            return out
        m = 1 - torch.prod(1 - run.rows[run.step])
        predicted = forecast.predict(run.outputs, run.step)
        run.outputs = forecast.update(run.outputs, out, run.step, m.to(out.dtype))
        return m.to(out.dtype) * out + (1 - m.to(out.dtype)) * predicted

    def _step(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, Any], caches: dict[int, Any],
              gates: torch.Tensor | None, compute: tuple[bool, ...], hard: bool, step: int = 0,
              order: int = 0) -> tuple[torch.Tensor, dict[int, Any]]:
        """One denoiser call as a pure function of its inputs (so checkpoint can replay it)."""
        runtime = self._hooks.runtime
        state = StepState(hard=hard, compute=compute, gates=gates, caches=dict(caches), step=step, order=order)
        previous, runtime.state = runtime.state, state
        try:
            out = self._model_fn(x, t, cond)
        finally:
            runtime.state = previous
        return out, state.caches

    def remove(self) -> None:
        """Restore the model exactly (forwards, requires_grad, train/eval flags)."""
        self._hooks.remove()


def _example_call(batch: Mapping[str, Any], config: ReuseConfig, null_class: int | None
                  ) -> tuple[torch.Tensor, dict[str, Any]]:
    """One denoiser call's inputs for a single sample (both CFG halves), for counting MACs."""
    one = {k: _first_item(v) for k, v in batch.items()}
    copies, cond = model_inputs(one, config.guidance_scale, null_class)
    x = torch.cat([one["noise"]] * copies)  # (copies, C, H, W)
    t = torch.full((copies,), config.num_train_timesteps // 2, device=x.device, dtype=torch.long)
    return x, {"timestep": t, **cond}


def _first_item(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value[:1]
    if isinstance(value, Mapping):
        return {k: _first_item(v) for k, v in value.items()}
    return value


def apply_reuse(model: nn.Module, config: ReuseConfig | None = None,
                example_batch: Mapping[str, Any] | None = None) -> ReuseSuperNet:
    """Wrap ``model``'s blocks with reuse gates; ``remove_reuse(model)`` undoes it.

    ``example_batch`` fixes the sample shape (and conditioning) the costs are counted at; its
    first element is used (costs are per sample). The model is frozen and put in eval mode.
    """
    config = config or ReuseConfig()
    if example_batch is None or "noise" not in example_batch:
        raise ValueError("apply_reuse needs an example batch with a 'noise' tensor (B, C, H, W) to count MACs")
    adapter = get_reuse_adapter(model)
    units = adapter.units(model, config.granularity, config.mode)
    graph = adapter.graph(model, units, config.granularity)
    null_class = config.null_class if config.null_class is not None else null_class_for(model)
    x, kwargs = _example_call(example_batch, config, null_class)
    total, per_unit = block_macs(model, [u.name for u in units], x, return_dict=False, **kwargs)
    return ReuseSuperNet(model, config, units, graph, [per_unit[u.name] for u in units], total)
