"""One sampling loop for every diffusion denoiser dipgo touches.

The full model, the reuse SuperNet (soft and hard gates), the installed SubNet and the baselines
(fewer steps, another scheduler) all run through :func:`sample`, so a difference between their
outputs can only come from the denoiser calls, never from two slightly different loops.

The loop is plain PyTorch: no ``inference_mode`` inside, so the SuperNet can backpropagate through
the whole trajectory into its gates. Classifier-free guidance batches the unconditional and the
conditional half into one denoiser call (``[uncond, cond]``, diffusers' order), which is also what
the reuse caches and the MACs count assume.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from torch import nn

# (x (B', C, H, W), t (B',), conditioning kwargs) -> raw denoiser output (B', C_out, H, W)
ModelFn = Callable[[torch.Tensor, torch.Tensor, dict[str, Any]], torch.Tensor]

# Short name -> (class, settings forced over the model folder's config). The multistep solvers are
# pinned to the variants the papers and diffusers pipelines recommend for guided sampling, so a
# folder whose config names another order cannot silently change what "dpmsolver++" means:
# DPM-Solver++(2M) and UniPC's second-order predictor with its corrector (UniC, bh2) on.
_SCHEDULERS: dict[str, tuple[type, dict[str, Any]]] = {
    "ddim": (DDIMScheduler, {}),
    "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "euler": (EulerDiscreteScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {"solver_order": 2, "solver_type": "bh2", "predict_x0": True,
                                        "disable_corrector": []}),
}
SCHEDULER_NAMES: tuple[str, ...] = tuple(_SCHEDULERS)

# Solvers that can run an arbitrary decreasing list of timesteps: they step between the sigmas of
# consecutive entries (DDIM's step assumes evenly spaced timesteps, Euler's sigma grid is its own).
SCHEDULE_SOLVERS: tuple[str, ...] = ("dpmsolver++", "unipc")

# Conditioning keys of a batch that are passed to the denoiser (everything else is ignored).
COND_KEYS: tuple[str, ...] = ("class_labels", "encoder_hidden_states", "added_cond_kwargs")


def scheduler_name(scheduler: Any) -> str | None:
    """The short name of a diffusers scheduler instance (``ddim``, ``dpmsolver++``, ``unipc``,
    ``euler``), or ``None`` for a class dipgo does not search with. A :func:`pinned_scheduler` is
    named after its solver."""
    kind = type(scheduler)
    if hasattr(kind, "pinned_timesteps"):  # a pinned_scheduler's class: the solver it subclasses
        kind = kind.__mro__[1]
    return next((name for name, (cls, _) in _SCHEDULERS.items() if kind is cls), None)


def make_scheduler(name: str, base_config: Mapping[str, Any] | None = None, num_train_timesteps: int = 1000):
    """Build a fresh scheduler by short name.

    ``base_config`` is the model folder's ``scheduler_config.json`` (any diffusers scheduler's
    config: the beta schedule and prediction type carry over between scheduler classes); without
    it the diffusers defaults with ``num_train_timesteps`` are used. DDIM runs with eta 0 (the loop
    never passes eta), ``dpmsolver++`` is DPM-Solver++(2M) (multistep, second order) and ``unipc``
    is UniPC-2 with its corrector (bh2, data prediction), diffusers' defaults for guided sampling.
    """
    if name not in _SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}: expected one of {', '.join(SCHEDULER_NAMES)}")
    cls, overrides = _SCHEDULERS[name]
    if base_config is not None:
        return cls.from_config(dict(base_config), **overrides)
    return cls(num_train_timesteps=num_train_timesteps, **overrides)


def check_timesteps(timesteps: Sequence[int], num_train_timesteps: int) -> list[int]:
    """``timesteps`` as ints, refused (``ValueError``, one sentence) unless strictly decreasing in
    ``[0, num_train_timesteps)``: a solver schedule runs from noise towards the data."""
    ts = [int(t) for t in timesteps]
    if not ts or any(a <= b for a, b in zip(ts, ts[1:])) or ts[0] >= num_train_timesteps or ts[-1] < 0:
        raise ValueError(f"a solver schedule must be strictly decreasing timesteps in [0, {num_train_timesteps}), "
                         f"got {ts}")
    return ts


def set_exact_timesteps(scheduler: Any, timesteps: Sequence[int]) -> None:
    """Make a multistep solver (:data:`SCHEDULE_SOLVERS`) run exactly ``timesteps``.

    Does what diffusers' ``DPMSolverMultistepScheduler.set_timesteps(timesteps=...)`` does (the
    sigma of each timestep from the training ``alphas_cumprod``, then the final sigma the config
    asks for), for UniPC too, whose ``set_timesteps`` has no such argument in the diffusers dipgo
    pins. Karras / exponential / beta sigma spacings would rewrite the timesteps, so they are refused.
    """
    name = scheduler_name(scheduler)
    if name not in SCHEDULE_SOLVERS:
        raise ValueError(f"a solver schedule runs on {' or '.join(SCHEDULE_SOLVERS)}, not {name or type(scheduler).__name__}")
    cfg = scheduler.config
    spaced = [k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_flow_sigmas",
                          "use_lu_lambdas") if cfg.get(k)]
    if spaced:
        raise ValueError(f"a solver schedule sets its own timesteps; the scheduler config's {spaced[0]} would "
                         "override them: turn it off")
    ts = check_timesteps(timesteps, cfg.num_train_timesteps)
    scheduler.set_timesteps(len(ts))
    _install_timesteps(scheduler, ts)


def _install_timesteps(scheduler: Any, timesteps: list[int]) -> None:
    """Overwrite the timesteps and sigmas ``set_timesteps(len(timesteps))`` just computed."""
    alphas = scheduler.alphas_cumprod.to(torch.float32)  # float32, as diffusers computes them
    all_sigmas = ((1 - alphas) / alphas) ** 0.5  # (num_train_timesteps,)
    sigmas = all_sigmas[torch.tensor(timesteps)]
    zero = scheduler.config.final_sigmas_type == "zero"
    last = torch.zeros(1) if zero else all_sigmas[:1]
    scheduler.sigmas = torch.cat([sigmas, last]).to(torch.float32)
    scheduler.timesteps = torch.tensor(timesteps, dtype=torch.int64)
    scheduler.num_inference_steps = len(timesteps)


def pinned_scheduler(name: str, timesteps: Sequence[int], base_config: Mapping[str, Any] | None = None,
                     accept_steps: Sequence[int] = ()) -> Any:
    """A solver whose ``set_timesteps`` always installs ``timesteps`` (for diffusers pipelines,
    which call ``scheduler.set_timesteps(num_inference_steps)`` themselves).

    ``num_inference_steps`` must be ``len(timesteps)`` or one of ``accept_steps`` (the reference's
    step count a plan was searched against); anything else is refused in one sentence, so a
    pipeline asked for another step count never silently runs the pinned schedule.
    """
    ts = list(timesteps)
    base = make_scheduler(name, base_config)
    allowed = sorted({len(ts), *accept_steps})
    cls = type(base)

    def set_timesteps(self: Any, num_inference_steps: int | None = None, device: Any = None, **kwargs: Any) -> None:
        if num_inference_steps is not None and num_inference_steps not in allowed:
            raise ValueError(f"this scheduler runs a pinned {len(ts)}-step schedule searched for "
                             f"{' or '.join(map(str, allowed))} steps, but {num_inference_steps} steps were asked")
        cls.set_timesteps(self, len(ts), device=device)
        _install_timesteps(self, ts)

    set_exact_timesteps(base, ts)  # refuses other solvers, bad timesteps and sigma spacings up front
    pinned = type(f"Pinned{cls.__name__}", (cls,), {"set_timesteps": set_timesteps, "pinned_timesteps": tuple(ts)})
    return pinned.from_config(base.config)


def make_model_fn(model: nn.Module) -> ModelFn:
    """Adapt a diffusers denoiser to the loop's ``(x, t, cond) -> output`` convention.

    The timestep is passed by keyword because its position differs between classes
    (``UNet2DModel(sample, timestep)`` but ``PixArtTransformer2DModel(hidden_states,
    encoder_hidden_states, timestep)``).
    """

    def model_fn(x: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        out = model(x, timestep=t, **cond, return_dict=False)
        return out[0] if isinstance(out, (tuple, list)) else out

    return model_fn


def conditioning(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The denoiser kwargs of a batch (conditional half only)."""
    return {k: batch[k] for k in COND_KEYS if batch.get(k) is not None}


def unconditional(batch: Mapping[str, Any], null_class: int | None,
                  negative: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Denoiser kwargs of the unconditional CFG half.

    Class labels become ``null_class``. Text embeddings come from ``negative["encoder_hidden_states"]``
    or the batch's ``negative_encoder_hidden_states``, else zeros (the usual "empty prompt"
    stand-in for random-weight and calibration setups). SDXL's ``added_cond_kwargs`` come from
    ``negative["added_cond_kwargs"]`` / ``negative_added_cond_kwargs``, else keep their
    micro-conditioning (``time_ids``) with zeroed ``text_embeds``.
    """
    negative = negative or {}
    batch = {**batch, **{f"negative_{k}": v for k, v in negative.items()}}
    cond = conditioning(batch)
    uncond: dict[str, Any] = {}
    if "class_labels" in cond:
        if null_class is None:
            raise ValueError(
                "guidance_scale > 1 with class labels needs a null class: pass null_class "
                "(a UNet2DModel with num_class_embeds=K+1 uses label K)"
            )
        uncond["class_labels"] = torch.full_like(cond["class_labels"], null_class)
    if "encoder_hidden_states" in cond:
        neg = batch.get("negative_encoder_hidden_states")
        uncond["encoder_hidden_states"] = neg if neg is not None else torch.zeros_like(cond["encoder_hidden_states"])
    if "added_cond_kwargs" in cond:
        neg = batch.get("negative_added_cond_kwargs")
        if neg is None:
            neg = {k: torch.zeros_like(v) if k == "text_embeds" else v for k, v in cond["added_cond_kwargs"].items()}
        uncond["added_cond_kwargs"] = dict(neg)
    return uncond


def _cat_halves(a: Any, b: Any) -> Any:
    """Concatenate two conditioning values along the batch dim (dicts per key, non-tensors kept)."""
    if isinstance(a, Mapping):
        return {k: _cat_halves(a[k], b[k]) for k in a}
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b])
    return a


def model_inputs(
    batch: Mapping[str, Any], guidance_scale: float, null_class: int | None,
    negative: Mapping[str, Any] | None = None,
) -> tuple[int, dict[str, Any]]:
    """``(copies, cond)``: how many copies of the latent one call takes (2 with CFG) and its kwargs."""
    cond = conditioning(batch)
    if guidance_scale <= 1.0:
        return 1, cond
    uncond = unconditional(batch, null_class, negative)
    return 2, {k: _cat_halves(uncond[k], cond[k]) for k in cond}


def guided_eps(out: torch.Tensor, latent_channels: int, copies: int, guidance_scale: float) -> torch.Tensor:
    """Model output -> the eps the scheduler steps with.

    Learned-sigma models (``out_channels == 2 * in_channels``, DiT) return ``[eps, variance]``: the
    deterministic samplers use eps only. With CFG: ``uncond + s * (cond - uncond)``.
    """
    if out.shape[1] == 2 * latent_channels:
        out = out[:, :latent_channels]
    if copies == 1:
        return out
    uncond, cond = out.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


def _detach_scheduler_state(scheduler: Any) -> None:
    """Cut the graph through every tensor a multistep solver remembers (truncated backprop).

    DPM-Solver++ keeps its last model outputs; UniPC also keeps ``last_sample`` (the sample its
    corrector revisits at the next step), so detaching only the latent and ``model_outputs`` would
    let gradients leak back past the cut. Rather than list each solver's fields, every tensor
    attribute (or list / tuple of tensors) that carries a graph is detached.
    """
    for name, value in list(vars(scheduler).items()):
        if isinstance(value, torch.Tensor) and value.requires_grad:
            setattr(scheduler, name, value.detach())
        elif isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) and v.requires_grad for v in value):
            detached = [v.detach() if isinstance(v, torch.Tensor) else v for v in value]
            setattr(scheduler, name, type(value)(detached))


def _step_kwargs(scheduler: Any) -> dict[str, Any]:
    """``return_dict=False`` plus DDIM's eta=0 where the scheduler takes it."""
    params = inspect.signature(scheduler.step).parameters
    return {"return_dict": False, **({"eta": 0.0} if "eta" in params else {})}


@dataclass(frozen=True)
class LoopState:
    """The sampling loop just before step ``step``'s denoiser call: enough to resume it there.

    ``scheduler`` is a private copy (a multistep solver remembers its last outputs); ``eps`` the
    guided outputs of the steps before. Tensors are shared, never written in place by the loop.
    """

    step: int
    x: torch.Tensor  # (B, C, H, W)
    scheduler: Any
    eps: tuple[torch.Tensor, ...]


def sample(
    model_fn: ModelFn,
    scheduler: Any,
    batch: Mapping[str, Any],
    num_steps: int,
    guidance_scale: float = 1.0,
    *,
    null_class: int | None = None,
    negative: Mapping[str, Any] | None = None,
    on_step: Callable[[int], None] | None = None,
    truncate_steps: int | None = None,
    resume: LoopState | None = None,
    on_state: Callable[[LoopState], None] | None = None,
    timesteps: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the whole trajectory from ``batch["noise"]``; returns ``(final, eps_stack)``.

    ``final`` is the last sample ``(B, C, H, W)``; ``eps_stack`` the guided model outputs of every
    step ``(S, B, C, H, W)``. ``on_step(i)`` runs before the i-th denoiser call (the reuse runtime
    uses it to know the step). ``truncate_steps=k`` detaches the latent and the solver state every k
    steps (truncated backprop). ``null_class`` / ``negative`` (``{"encoder_hidden_states": ...,
    "added_cond_kwargs": ...}``) define the unconditional half (see :func:`unconditional`).
    Differentiable: nothing here disables autograd.

    ``on_state(state)`` receives a :class:`LoopState` before each step's denoiser call (before
    ``on_step``); ``resume=state`` continues a run of the same batch from that step instead of
    from the noise, with a copy of the state's scheduler (``scheduler`` is then not used). Runs
    that share their first k steps (a plan search that changes one late slot) need not redo them.

    ``timesteps`` runs exactly those timesteps (a solver schedule, :func:`set_exact_timesteps`;
    ``num_steps`` must be their count) instead of the scheduler's own spacing.
    """
    noise = batch["noise"]  # (B, C, H, W)
    copies, cond = model_inputs(batch, guidance_scale, null_class, negative)
    if timesteps is not None and len(timesteps) != num_steps:
        raise ValueError(f"num_steps={num_steps} but the solver schedule has {len(timesteps)} timesteps")
    if resume is None:
        if timesteps is None:
            scheduler.set_timesteps(num_steps, device=noise.device)
        else:
            set_exact_timesteps(scheduler, timesteps)
        x, eps_list, first = noise * scheduler.init_noise_sigma, [], 0
    else:
        scheduler = copy.deepcopy(resume.scheduler)  # the stored state stays reusable
        x, eps_list, first = resume.x, list(resume.eps), resume.step
    step_kwargs = _step_kwargs(scheduler)
    for i, t in enumerate(scheduler.timesteps):
        if i < first:
            continue
        if truncate_steps and i > 0 and i % truncate_steps == 0:
            x = x.detach()
            _detach_scheduler_state(scheduler)
        if on_state is not None:
            on_state(LoopState(i, x, copy.deepcopy(scheduler), tuple(eps_list)))
        if on_step is not None:
            on_step(i)
        x_in = scheduler.scale_model_input(x, t)
        x_in = torch.cat([x_in] * copies) if copies > 1 else x_in  # (copies*B, C, H, W)
        t_in = t.reshape(1).expand(x_in.shape[0])  # (copies*B,)
        eps = guided_eps(model_fn(x_in, t_in, cond), noise.shape[1], copies, guidance_scale)
        eps_list.append(eps)
        x = scheduler.step(eps, t, x, **step_kwargs)[0].to(noise.dtype)
    return x, torch.stack(eps_list)
