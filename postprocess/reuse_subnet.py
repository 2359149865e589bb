"""Run a plain diffusers denoiser with a reuse Plan: closed blocks are really not executed.

:func:`install_plan` wraps the planned units of the model itself, so anything that calls the model
(a diffusers pipeline, dipgo's sampling loop, user code) gets the SubNet. It needs to know the
sampling step of each call: a forward pre-hook counts calls, starts a new trajectory whenever the
timestep goes up (or on ``handle.reset()``), and treats another call at the same timestep as
another pass of the same step (separate cond and uncond calls), with its own caches. Solvers
that call the denoiser at several timesteps per step (Heun) are not supported.
:func:`enable` installs a plan on a whole diffusers pipeline.

:class:`ReuseSubNet` bundles model + plan + scheduler settings and saves them as ``plan.json`` and
``subnet.json``; the weights stay the original model's (loaded from ``source``).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dipgo.errors import PlanError
from dipgo.files import read_json, write_json_atomic
from dipgo.models.io import null_class_for
from dipgo.postprocess.plan import Plan, ReusePayload
from dipgo.postprocess.reuse_plan import check_plan_fits
from dipgo.supernets import forecast
from dipgo.supernets.adapters import ConsumerGraph, get_reuse_adapter
from dipgo.supernets.reuse import ReuseHooks, StepState, cache_nbytes, effective_grid, skips_whole_steps
from dipgo.supernets.sampling import make_model_fn, make_scheduler, sample, scheduler_name

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


class ReusePlanHandle:
    """An installed plan: counts steps, skips closed units; ``remove()`` restores the model."""

    def __init__(self, model: nn.Module, plan: Plan, hooks: ReuseHooks, graph: ConsumerGraph,
                 forecast_order: int = 0, whole_step_skip: bool | None = None) -> None:
        self.model = model
        self.plan = plan
        self.forecast_order = forecast_order
        self.peak_cache_bytes = 0  # the most the caches / forecast histories held after a call
        self._hooks = hooks
        grid = torch.tensor(plan.compute, dtype=torch.float64)  # (S, B)
        self._compute: list[tuple[bool, ...]] = [tuple(r) for r in (effective_grid(grid, graph) > 0.5).tolist()]
        self._t_index = _timestep_index(model)
        self.step = -1
        self._last_t: float | None = None
        self._caches: dict[int, Any] = {}
        self._pre = model.register_forward_pre_hook(self._before_call, with_kwargs=True)
        hooks.on_remove(self._pre.remove)
        self._post = model.register_forward_hook(self._after_call)
        hooks.on_remove(self._post.remove)
        self._outputs: forecast.History | None = None  # the model output's history
        # Pipelines that call the denoiser more than once per step with the same timestep
        # (separate cond and uncond passes) get one cache set per call index ("branch").
        self._branch = 0
        self._branches: dict[int, tuple[dict[int, Any], forecast.History | None]] = {}
        if skips_whole_steps(model, [u.mode for u in hooks.runtime.units], whole_step_skip):
            self._patch_whole_step_skip()

    def _patch_whole_step_skip(self) -> None:
        """Skip the whole denoiser call at steps where every unit is closed.

        Such a step's output is a function of the units' caches only (see
        :func:`~dipgo.supernets.reuse.skips_whole_steps`), so the call returns the model output
        forecast from the computed steps at the plan's order (order 0: the previous call's output,
        bit-identical to replaying every unit), saving the stem, the time embedding, the head and
        the per-unit dispatch. The SuperNet's ``sample`` does exactly the same.
        """
        model, had_own = self.model, "forward" in self.model.__dict__
        inner = model.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            row = self._compute[self.step] if self.step >= 0 else None
            if self.step > 0 and row is not None and not any(row) and self._outputs is not None:
                return forecast.predict(self._outputs, self.step)
            out = inner(*args, **kwargs)
            self._outputs = (forecast.start(out, self.step, self.forecast_order) if self._outputs is None
                             else forecast.update(self._outputs, out, self.step))
            return out

        def restore() -> None:
            if had_own:
                model.forward = inner
            else:
                model.__dict__.pop("forward", None)

        model.forward = forward
        self._hooks.on_remove(restore)

    def reset(self) -> None:
        """Start a new trajectory at the next call (drop the caches)."""
        self.step, self._last_t, self._caches, self._outputs = -1, None, {}, None
        self._branch, self._branches = 0, {}
        self._hooks.runtime.state = None

    def _before_call(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        t = _timestep_value(args, kwargs, self._t_index)
        if self._last_t is None or t > self._last_t:
            self.reset()  # the timestep went up: a new trajectory begins
        self._branches[self._branch] = (self._caches, self._outputs)  # what the last call left
        if self.step >= 0 and t == self._last_t:
            self._branch += 1  # another call of the same step (e.g. the uncond pass): its own caches
        else:
            self.step, self._branch = self.step + 1, 0
        self._last_t = t
        self._caches, self._outputs = self._branches.get(self._branch, ({}, None))
        if self.step >= len(self._compute):
            raise PlanError(
                f"the plan was made for {len(self._compute)} sampling steps but the denoiser is being called "
                f"for step {self.step + 1} of one trajectory"
            )
        self._hooks.runtime.state = StepState(hard=True, compute=self._compute[self.step], caches=self._caches,
                                              step=self.step, order=self.forecast_order)

    def _after_call(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self.peak_cache_bytes = max(self.peak_cache_bytes, cache_nbytes(self._caches))

    def remove(self) -> None:
        """Original forwards back; the model is the plain diffusers model again."""
        self._hooks.remove()

    def __enter__(self) -> ReusePlanHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def install_plan(model: nn.Module, plan: Plan, num_steps: int | None = None,
                 scheduler: str | None = None) -> ReusePlanHandle:
    """Make ``model`` run ``plan`` on every call until ``handle.remove()``.

    The plan's :class:`~dipgo.postprocess.plan.ReusePayload` (``granularity``, ``mode``) rebuilds the
    gated units; the model class and block list must match the plan (``PlanError`` otherwise), and so
    must ``num_steps`` and ``scheduler`` (the sampler's short name) when given. Its ``forecast_order`` says what a closed unit returns (its last
    computed output, or an extrapolation from its computed steps); ``handle.peak_cache_bytes`` is
    the memory the caches took.
    """
    reuse = ReusePayload.from_meta(plan.meta or {})  # a reuse plan's payload, or a joint plan's reuse part
    adapter = get_reuse_adapter(model)
    granularity = reuse.granularity
    units = adapter.units(model, granularity, reuse.mode)
    check_plan_fits(plan, type(model).__name__, [u.name for u in units], num_steps, scheduler)
    if reuse.modes is not None and reuse.modes != [u.mode for u in units]:
        raise PlanError("plan reuse modes do not match the model's units: rebuild the plan with this dipgo")
    hooks = ReuseHooks(model, units)
    return ReusePlanHandle(model, plan, hooks, adapter.graph(model, units, granularity), reuse.forecast_order,
                           reuse.whole_step_skip)


def enable(pipe: Any, plan: Plan) -> ReusePlanHandle:
    """Install ``plan`` on a diffusers pipeline's denoiser (``pipe.unet`` or ``pipe.transformer``).

    The pipeline's scheduler must be the sampler the plan was searched on (``PlanError``
    otherwise, one sentence); the step count is checked when the pipeline runs (a plan for S
    steps refuses a trajectory longer than S). Returns the handle; ``handle.remove()`` restores
    the pipeline exactly.
    """
    denoiser = next((getattr(pipe, a) for a in ("unet", "transformer") if isinstance(getattr(pipe, a, None), nn.Module)),
                    None)
    if denoiser is None:
        raise PlanError(f"{type(pipe).__name__} has no unet or transformer to install a reuse plan on")
    name = scheduler_name(getattr(pipe, "scheduler", None))
    searched = (plan.meta or {}).get("scheduler")
    if searched and name != searched:
        given = name or type(getattr(pipe, "scheduler", None)).__name__
        raise PlanError(f"plan was searched on the {searched} sampler but the pipeline's scheduler is {given}: "
                        f"set pipe.scheduler to the {searched} scheduler or search a plan for {given}")
    return install_plan(denoiser, plan)


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
        """Final samples ``(B, C, H, W)`` from ``batch["noise"]`` with the plan installed."""
        null_class = self.null_class if self.null_class is not None else null_class_for(self.model)
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
