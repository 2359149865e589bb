"""Run a plain diffusers denoiser with a reuse Plan: closed blocks are really not executed.

:func:`install_plan` puts the plan into the model itself, as hooks in diffusers' own
``HookRegistry`` (:mod:`dipgo.supernets.hooks`), so anything that calls the model (a diffusers
pipeline, dipgo's sampling loop, user code) gets the SubNet, and diffusers' other hooks compose.
Each call needs its sampling step and its *pass* (cond / uncond, when a pipeline makes separate
calls); the handle takes them from, in this order:

1. ``handle.step(i)``, called by a hand-written loop before the denoiser calls of step ``i``;
2. the pipeline's ``cache_context(name, step_index=i, num_inference_steps=n)`` (Wan, CogVideoX,
   Flux...): the name keys the pass, so ``"cond"`` and ``"uncond"`` keep separate caches;
3. the pipeline's scheduler (:func:`enable`): the step is the timestep's index in
   ``scheduler.timesteps``, and the step count is checked before the first closed block runs;
4. otherwise the timestep: a new trajectory starts when it goes up (or on ``handle.reset()``).

Without a context name, further calls at the same step are further passes (separate cond and
uncond calls), each with its own caches. A trajectory with another step count than the plan's is
refused with both numbers, or runs the plan resampled to it when asked (``resample=True``).
Solvers that evaluate the denoiser at several timesteps per step (Heun, KDPM2) are refused.

:class:`ReuseSubNet` bundles model + plan + scheduler settings and saves them as ``plan.json`` and
``subnet.json``; the weights stay the original model's (loaded from ``source``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.hooks import ModelHook
from diffusers.hooks.hooks import BaseState, CacheContext, StateManager
from torch import nn

from dipgo.errors import PlanError
from dipgo.files import read_json, write_json_atomic
from dipgo.models.io import null_class_for
from dipgo.postprocess.plan import Plan, ReusePayload
from dipgo.postprocess.reuse_plan import check_plan_fits, resample_grid
from dipgo.supernets import forecast
from dipgo.supernets.adapters import ConsumerGraph, get_reuse_adapter
from dipgo.supernets.hooks import attach
from dipgo.supernets.reuse import (
    ReuseHooks,
    StepState,
    cache_nbytes,
    cache_readers,
    effective_grid,
    skips_whole_steps,
)
from dipgo.supernets.sampling import make_model_fn, make_scheduler, pinned_scheduler, sample, scheduler_name

SUBNET_FORMAT = "dipgo.reuse_subnet"
SUBNET_VERSION = 1


def _timestep_index(model: nn.Module) -> int | None:
    """Position of ``timestep`` among the forward's positional parameters (``None`` if absent)."""
    params = [p for p in inspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = [p.name for p in params]
    return names.index("timestep") if "timestep" in names else None


def _timestep_value(args: tuple[Any, ...], kwargs: dict[str, Any], index: int | None) -> float:
    t = kwargs.get("timestep")
    if t is None and index is not None and len(args) > index:
        t = args[index]
    if t is None:
        raise PlanError("the denoiser was called without a timestep, so the plan cannot tell the sampling step")
    return float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t)


class _PlanHook(ModelHook):
    """The denoiser's registry hook: before a call, which step and pass; the call; after it, memory.

    Stateful in diffusers' sense: a pipeline's ``cache_context`` sets :attr:`contexts`'s context
    (dipgo reads the name and step index), and ``maybe_free_model_hooks`` at the end of a pipeline
    call resets the trajectory through :meth:`reset_state`.
    """

    _is_stateful = True

    def __init__(self, handle: ReusePlanHandle) -> None:
        super().__init__()
        self.handle = handle
        self.contexts = StateManager(BaseState)

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        self.handle._before_call(args, kwargs, self.contexts._context)
        return args, kwargs

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return self.handle._forward(self.fn_ref.original_forward, args, kwargs)

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        self.handle._after_call()
        return output

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.handle.reset()
        return module


class ReusePlanHandle:
    """An installed plan: tracks step and pass, skips closed units; ``remove()`` restores the model.

    Attributes:
        current_step: the sampling step of the last call (``-1`` before the first).
        peak_cache_bytes: the most the caches / forecast histories held after a call.
    """

    def __init__(self, model: nn.Module, plan: Plan, hooks: ReuseHooks, graph: ConsumerGraph,
                 forecast_order: int = 0, whole_step_skip: bool | None = None, scheduler: Any = None,
                 resample: bool = False) -> None:
        self.model = model
        self.plan = plan
        self.forecast_order = forecast_order
        self.resample = resample
        self.peak_cache_bytes = 0
        self._hooks = hooks
        self._graph = graph
        self._grids: dict[int, list[tuple[bool, ...]]] = {}
        self._compute = self._grid(len(plan.compute))
        self._scheduler = scheduler
        self._t_index = _timestep_index(model)
        self._skip_whole = skips_whole_steps(model, [u.mode for u in hooks.runtime.units], whole_step_skip)
        self._explicit: int | None = None
        self._readers: list[tuple[bool, ...]] = []
        self._ran = False
        self.reset()
        hooks.on_remove(attach(model, "reuse_plan", _PlanHook(self)))

    # -- where a call is
    def step(self, index: int) -> None:
        """Tell the plan that the next denoiser calls belong to sampling step ``index`` (0-based).

        For hand-written loops (and second passes a pipeline makes at other timesteps); once
        called, the handle uses these indices instead of the pipeline's or the timestep's, until
        ``reset()``. Calling it with 0 starts a new trajectory.
        """
        if index < 0 or index >= len(self._compute):
            raise PlanError(f"step {index} is outside the plan's {len(self._compute)} sampling steps (0 to "
                            f"{len(self._compute) - 1})")
        if index == 0:
            self.reset()
        self._explicit = index

    def reset(self) -> None:
        """Start a new trajectory at the next call (drop the caches and any explicit step)."""
        self.current_step, self._last_t, self._explicit = -1, None, None
        self._caches: dict[int, Any] = {}
        self._outputs: forecast.History | None = None  # the model output's history (whole-step skips)
        self._pass: Hashable = 0
        self._seen: list[Hashable] = []  # the passes called at the current step
        self._passes: dict[Hashable, tuple[dict[int, Any], forecast.History | None]] = {}
        self._hooks.runtime.state = None

    def _grid(self, num_steps: int) -> list[tuple[bool, ...]]:
        """The effective compute rows for a trajectory of ``num_steps`` (the plan's, or resampled)."""
        if num_steps not in self._grids:
            rows = resample_grid(self.plan.compute, num_steps)
            grid = torch.tensor(rows, dtype=torch.float64)
            self._grids[num_steps] = [tuple(r) for r in (effective_grid(grid, self._graph) > 0.5).tolist()]
        return list(self._grids[num_steps])  # a copy: subclasses may rewrite rows call by call

    def _check_length(self, num_steps: int) -> None:
        planned = len(self.plan.compute)
        if num_steps == planned:
            return
        if self.resample:
            self._compute = self._grid(num_steps)
        else:
            raise PlanError(
                f"the plan was searched for {planned} sampling steps but this trajectory has {num_steps}: run "
                f"{planned} steps (num_inference_steps={planned}) or install with resample=True to stretch the plan"
            )

    def _scheduler_step(self, t: float) -> int | None:
        """The timestep's index in the pipeline scheduler's ``timesteps`` (``None`` if it is not there)."""
        timesteps = getattr(self._scheduler, "timesteps", None)
        if timesteps is None:
            return None
        hits = (torch.as_tensor(timesteps).to(torch.float64) == t).nonzero()
        return int(hits[0, 0]) if len(hits) else None

    def _locate(self, t: float, context: CacheContext | None) -> tuple[int | None, int | None]:
        """``(step, steps in the trajectory)`` from the most explicit source; ``(None, None)``: use the timestep."""
        if self._explicit is not None:
            return self._explicit, None
        if context is not None and context.step_index is not None:
            return context.step_index, context.num_inference_steps
        if self._scheduler is not None:
            step = self._scheduler_step(t)
            if step is not None:
                return step, len(self._scheduler.timesteps)
        return None, None

    def _before_call(self, args: tuple[Any, ...], kwargs: dict[str, Any], context: CacheContext | None) -> None:
        t = _timestep_value(args, kwargs, self._t_index)
        step, total = self._locate(t, context)
        name = context.name if context is not None else None
        if step is None:  # the timestep rule: up = a new trajectory, equal = another pass
            step = 0 if self._last_t is None or t > self._last_t else (
                self.current_step if t == self._last_t else self.current_step + 1)
        self._passes[self._pass] = (self._caches, self._outputs)  # what the last call left
        if step < self.current_step or (step == self.current_step and name is not None and name in self._seen):
            explicit = self._explicit
            self.reset()  # back to an earlier step, or the same named pass again: a new trajectory
            self._explicit = explicit
        if step != self.current_step:
            self._seen = []
        self._pass = name if name is not None else len(self._seen)  # unnamed passes: 0, 1, ... per step
        self._seen.append(self._pass)
        if self.current_step < 0:  # the first call of a trajectory: which grid
            self._compute = self._grid(len(self.plan.compute))
            if total is not None:
                self._check_length(total)
            self._readers = cache_readers(self._compute, self._skip_whole)
        self.current_step, self._last_t = step, t
        self._caches, self._outputs = self._passes.get(self._pass, ({}, None))
        if step >= len(self._compute):
            raise PlanError(
                f"the plan was made for {len(self._compute)} sampling steps but the denoiser is being called "
                f"for step {step + 1} of one trajectory"
            )
        self._hooks.runtime.state = StepState(hard=True, compute=self._compute[step], caches=self._caches,
                                              step=step, order=self.forecast_order, keep=self._readers[step])

    def _forward(self, inner: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The denoiser call; with whole-step skips, a step whose units are all closed is not called.

        Such a step's output is a function of the units' caches only (see
        :func:`~dipgo.supernets.reuse.skips_whole_steps`), so the call returns the model output
        forecast from the computed steps at the plan's order (order 0: the previous call's output,
        bit-identical to replaying every unit), saving the stem, the time embedding, the head and
        the per-unit dispatch. The SuperNet's ``sample`` does exactly the same.
        """
        self._ran = True
        if not self._skip_whole:
            return inner(*args, **kwargs)
        step = self.current_step
        if step > 0 and not any(self._compute[step]) and self._outputs is not None:
            self._ran = False  # no unit ran: the caches are as the last call left them
            return forecast.predict(self._outputs, step)
        out = inner(*args, **kwargs)
        self._outputs = (forecast.start(out, step, self.forecast_order) if self._outputs is None
                         else forecast.update(self._outputs, out, step))
        return out

    def _after_call(self) -> None:
        if self._ran:  # a skipped call changed no cache (and counting them is a tenth of a skip's time)
            held = cache_nbytes(self._caches) + (self._outputs.nbytes() if self._outputs is not None else 0)
            self.peak_cache_bytes = max(self.peak_cache_bytes, held)

    def remove(self) -> None:
        """Original forwards back; the model is the plain diffusers model again."""
        self._hooks.remove()

    def __enter__(self) -> ReusePlanHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def install_plan(model: nn.Module, plan: Plan, num_steps: int | None = None, scheduler: str | Any | None = None,
                 resample: bool = False) -> ReusePlanHandle:
    """Make ``model`` run ``plan`` on every call until ``handle.remove()``.

    The plan's :class:`~dipgo.postprocess.plan.ReusePayload` (``granularity``, ``mode``) rebuilds the
    gated units; the model class and block list must match the plan (``PlanError`` otherwise), and so
    must ``num_steps`` and ``scheduler`` when given: the sampler's short name, or a diffusers
    scheduler object, whose ``timesteps`` then give each call's step (see the module docstring).
    ``resample=True`` runs the plan stretched to a trajectory with another step count instead of
    refusing it. Its ``forecast_order`` says what a closed unit returns (its last computed
    output, or an extrapolation from its computed steps); ``handle.peak_cache_bytes`` is the
    memory the caches took.
    """
    reuse = ReusePayload.from_meta(plan.meta or {})  # a reuse plan's payload, or a joint plan's reuse part
    if reuse.schedule is not None:
        raise PlanError(f"this plan is a solver schedule ({len(reuse.schedule.timesteps)} {reuse.schedule.scheduler} steps "
                        "at learned timesteps): it changes the sampler, not the denoiser, so run it with "
                        "dipgo.enable(pipe, plan), ReuseSubNet.sample or schedule_scheduler(plan)")
    scheduler_obj = None if scheduler is None or isinstance(scheduler, str) else scheduler
    if scheduler_obj is not None:
        _refuse_multi_evaluation(scheduler_obj)
    adapter = get_reuse_adapter(model)
    granularity = reuse.granularity
    units = adapter.units(model, granularity, reuse.mode)
    sampler = scheduler if isinstance(scheduler, str) else scheduler_name(scheduler_obj)
    check_plan_fits(plan, type(model).__name__, [u.name for u in units], None if resample else num_steps, sampler)
    if reuse.modes is not None and reuse.modes != [u.mode for u in units]:
        raise PlanError("plan reuse modes do not match the model's units: rebuild the plan with this dipgo")
    hooks = ReuseHooks(model, units)
    return ReusePlanHandle(model, plan, hooks, adapter.graph(model, units, granularity), reuse.forecast_order,
                           reuse.whole_step_skip, scheduler=scheduler_obj, resample=resample)


def _refuse_multi_evaluation(scheduler: Any) -> None:
    """Heun-like solvers call the denoiser at two timesteps per step; plans are searched on one call per step."""
    order = int(getattr(scheduler, "order", 1) or 1)
    if order > 1:
        name = type(scheduler).__name__
        raise PlanError(
            f"{name} evaluates the denoiser {order} times per step at different timesteps, but reuse plans are "
            f"searched on one evaluation per step: use DDIM, DPM-Solver++ or UniPC (what the plan was searched on)"
        )


def schedule_scheduler(plan: Plan, scheduler_config: Mapping[str, Any] | None = None) -> Any:
    """The diffusers scheduler that runs a solver-schedule plan: its solver, pinned to the plan's
    timesteps whatever ``set_timesteps`` is asked (the plan's step count or its reference's; any
    other count is refused). ``scheduler_config``: the model folder's (beta schedule, prediction type)."""
    schedule = ReusePayload.from_meta(plan.meta or {}).schedule
    if schedule is None:
        raise PlanError("this plan is not a solver schedule: install it with install_plan or dipgo.enable")
    return pinned_scheduler(schedule.scheduler, schedule.timesteps, scheduler_config,
                            accept_steps=[schedule.reference_steps])


class SchedulePlanHandle:
    """A solver-schedule plan enabled on a pipeline: ``remove()`` puts the pipeline's scheduler back."""

    def __init__(self, pipe: Any, plan: Plan) -> None:
        self.plan, self._pipe, self._original = plan, pipe, pipe.scheduler
        pipe.scheduler = schedule_scheduler(plan, dict(pipe.scheduler.config))
        self.peak_cache_bytes = 0  # nothing is cached: every call is the whole model

    def remove(self) -> None:
        self._pipe.scheduler = self._original

    def __enter__(self) -> SchedulePlanHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def enable(pipe: Any, plan: Plan | str | Path, resample: bool = False) -> ReusePlanHandle | SchedulePlanHandle:
    """Install ``plan`` (a Plan, or the path of a ``plan.json``) on a diffusers pipeline's
    denoiser (``pipe.unet`` or ``pipe.transformer``); also ``dipgo.enable``.

    The pipeline's scheduler must be the sampler the plan was searched on (``PlanError``
    otherwise, one sentence), and its ``timesteps`` give each call's step, so a pipeline run with
    another ``num_inference_steps`` is refused with both numbers (or, with ``resample=True``,
    runs the plan stretched to it). Pipelines with a second denoiser (Wan 2.2's
    ``transformer_2``) and Heun-like solvers are refused. Returns the handle;
    ``handle.remove()`` restores the pipeline exactly.

    A solver-schedule plan (``meta.solver_schedule``) replaces the pipeline's scheduler by its
    solver pinned to the learned timesteps (:func:`schedule_scheduler`), built from the pipeline
    scheduler's config, which must be the reference sampler the plan was searched against; run
    the pipeline with the reference's ``num_inference_steps`` (or the schedule's).
    """
    if not isinstance(plan, Plan):
        plan = Plan.load(plan)
    if plan.kind != "reuse":
        raise PlanError(f"enable installs reuse plans on a pipeline; this plan is {plan.kind!r}")
    denoiser = next((getattr(pipe, a) for a in ("unet", "transformer") if isinstance(getattr(pipe, a, None), nn.Module)),
                    None)
    if denoiser is None:
        raise PlanError(f"{type(pipe).__name__} has no unet or transformer to install a reuse plan on")
    if isinstance(getattr(pipe, "transformer_2", None), nn.Module):
        raise PlanError(f"{type(pipe).__name__} has a second denoiser (transformer_2) that takes over part of the "
                        "steps; a reuse plan covers one denoiser's trajectory: set pipe.transformer_2 to None")
    sched = getattr(pipe, "scheduler", None)
    name = scheduler_name(sched)
    schedule = ReusePayload.from_meta(plan.meta or {}).schedule
    searched = schedule.reference_scheduler if schedule is not None else (plan.meta or {}).get("scheduler")
    if searched and name != searched:
        given = name or type(sched).__name__
        raise PlanError(f"plan was searched on the {searched} sampler but the pipeline's scheduler is {given}: "
                        f"set pipe.scheduler to the {searched} scheduler or search a plan for {given}")
    if schedule is not None:
        if sched is None:
            raise PlanError(f"{type(pipe).__name__} has no scheduler to run the plan's solver schedule with")
        return SchedulePlanHandle(pipe, plan)
    if sched is None:
        return install_plan(denoiser, plan, resample=resample)
    return install_plan(denoiser, plan, scheduler=sched, resample=resample)


@dataclass
class ReuseSubNet:
    """A denoiser with a reuse plan and the sampler settings it was searched with.

    Attributes:
        model: the original diffusers model (weights are not copied).
        plan: the hard reuse plan.
        scheduler: short scheduler name (``"ddim"``, ``"dpmsolver++"``, ``"euler"``).
        scheduler_config: the model folder's scheduler config, or ``None`` for defaults.
        guidance_scale: CFG scale used when sampling.
        null_class: unconditional class label (``None``: read from the model).
        source: where the weights come from (hub id or folder), recorded for reloading.
    """

    model: nn.Module
    plan: Plan
    scheduler: str = "ddim"
    scheduler_config: dict[str, Any] | None = None
    guidance_scale: float = 1.0
    null_class: int | None = None
    source: str | None = None

    def install(self) -> ReusePlanHandle:
        return install_plan(self.model, self.plan, self.plan.num_steps, self.scheduler)

    def sample(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Final samples ``(B, C, H, W)`` from ``batch["noise"]`` with the plan installed (a
        solver-schedule plan: the plain model, sampled at the plan's timesteps)."""
        null_class = self.null_class if self.null_class is not None else null_class_for(self.model)
        schedule = self.plan.payload.schedule
        if schedule is not None:
            scheduler = make_scheduler(schedule.scheduler, self.scheduler_config)
            with torch.no_grad():
                final, _ = sample(make_model_fn(self.model), scheduler, batch, len(schedule.timesteps),
                                  self.guidance_scale, null_class=null_class, timesteps=schedule.timesteps)
            return final
        scheduler = make_scheduler(self.scheduler, self.scheduler_config)
        with self.install(), torch.no_grad():
            final, _ = sample(make_model_fn(self.model), scheduler, batch, self.plan.num_steps,
                              self.guidance_scale, null_class=null_class)
        return final

    def save(self, directory: str | Path) -> Path:
        """Write ``plan.json`` and ``subnet.json`` (atomic); returns the folder."""
        directory = Path(directory)
        self.plan.save(directory / "plan.json")
        write_json_atomic(directory / "subnet.json", {
            "format": SUBNET_FORMAT,
            "version": SUBNET_VERSION,
            "model_class": type(self.model).__name__,
            "source": self.source,
            "scheduler": self.scheduler,
            "scheduler_config": self.scheduler_config,
            "guidance_scale": self.guidance_scale,
            "null_class": self.null_class,
        })
        return directory

    @classmethod
    def load(cls, directory: str | Path, model: nn.Module) -> ReuseSubNet:
        """Rebuild from a folder written by :meth:`save` around ``model`` (the original weights)."""
        directory = Path(directory)
        plan = Plan.load(directory / "plan.json")
        config = _read_subnet_config(directory / "subnet.json")
        if config["model_class"] != type(model).__name__:
            raise PlanError(f"subnet was saved for {config['model_class']} but the model is {type(model).__name__}")
        return cls(model=model, plan=plan, scheduler=config["scheduler"], scheduler_config=config["scheduler_config"],
                   guidance_scale=config["guidance_scale"], null_class=config["null_class"],
                   source=config.get("source"))


def load_subnet(directory: str | Path) -> ReuseSubNet:
    """Reload an exported SubNet folder, weights included, from the ``source`` it records.

    The folder holds the plan and sampler settings only; the weights come from the model source
    (a dipgo reference name, a local diffusers folder or a hub id) through dipgo's loader.
    """
    from dipgo.models.registry import load_model

    config = _read_subnet_config(Path(directory) / "subnet.json")
    if not config.get("source"):
        raise PlanError(f"{directory} records no model source: load it with ReuseSubNet.load(directory, model)")
    return ReuseSubNet.load(directory, load_model(config["source"]).model)


def _read_subnet_config(path: Path) -> dict[str, Any]:
    data = read_json(path, "a subnet.json written by ReuseSubNet.save")
    if data.get("format") != SUBNET_FORMAT or data.get("version", 0) > SUBNET_VERSION:
        raise PlanError(f"{path} is not a reuse subnet config this dipgo can read (format {data.get('format')!r})")
    return data
