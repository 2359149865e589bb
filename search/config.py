"""Typed schemas for every config group, registered with Hydra's ConfigStore.

The YAML files in ``configs/`` are merged onto these dataclasses, so a typo'd key or a value of
the wrong type is refused at composition time (before any run directory exists) instead of
silently becoming a new key. Every group is one dataclass, used both as the schema
and at run time (:func:`config_of` builds it from the composed node; its ``__post_init__`` checks
the values). The pruner, finetune and top-level groups live here; ``search.distortion`` and
``search.cost`` are :mod:`dipgo.losses.config`'s classes and ``search.refine`` and
``supernet.sds`` are :mod:`dipgo.postprocess.settings`'s: torch-free modules beside the code that
uses them, so composing stays light. ``dipgo search --help`` lists the groups and their
options.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, TypeVar

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from dipgo.losses.config import CostConfig, DistortionConfig
from dipgo.postprocess.plan import SCHEDULE_SOLVERS
from dipgo.postprocess.settings import RefineConfig, SDSConfig

SCHEMA_NAME = "dipgo_schema"
T = TypeVar("T")


def config_of(cls: type[T], node: Any) -> T:
    """The run-time object of a config group: the very dataclass its schema is, built from the
    composed node (its ``__post_init__`` checks the values). A key the class lacks is an error,
    never silently dropped."""
    data = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})
    return cls(**data)


TAU_SCHEDULES: tuple[str, ...] = ("cosine", "linear", "exp")
PRUNER_INITS: tuple[str, ...] = ("all", "prior")


@dataclass
class PrunerConfig:
    """Hyper-parameters of :class:`PrunerNetwork` and of its Gumbel temperature schedule."""

    d_model: int = 64
    """Width of the slot queries and of the transformer across slots."""
    num_layers: int = 2
    """Transformer encoder layers; 0 turns the pruner into independent per-slot logits + MLP."""
    num_heads: int = 4
    """Attention heads; must divide ``d_model``."""
    dropout: float = 0.0
    """Dropout inside the transformer. 0 keeps the search deterministic given the seed."""
    init_keep_logit: float = 3.0
    """Initial logit gap keep-minus-close: every slot starts at p(keep) = sigmoid(this), i.e. the
    search starts from "compute everything", the original model, and closes gates from there."""
    init: str = "all"
    """Where the gates start. ``all``: every slot at p(keep) = sigmoid(``init_keep_logit``), the
    original model (DiP-GO). ``prior``: at the SuperNet's static prior for the target, if it has
    one (reuse: every block computed at K evenly spaced steps, K = target x steps, which is a
    K-step sampler on the searched timesteps): those slots start kept and the others closed, each
    at a gap of ``init_keep_logit``, so the pruner learns deviations from a schedule that already
    meets the budget. Kinds without a prior start at ``all``."""
    tau_start: float = 1.0
    """Gumbel-softmax temperature at step 0 (soft samples, exploratory gradients)."""
    tau_end: float = 0.1
    """Temperature at the last step (near-hard samples, faithful to the final SubNet)."""
    tau_schedule: str = "cosine"
    """How the temperature moves from ``tau_start`` to ``tau_end``: cosine, linear or exp."""
    budget_conditioned: bool = False
    """Add an embedding of the target budget to every query, so one trained pruner yields
    plans for a range of budgets; ``forward`` then requires ``budget``."""
    hard: bool = True
    """Straight-through gates: forward uses hard 0/1 decisions, backward the soft sample."""
    slot_logit_scale: float = 10.0
    """Multiplier of each slot's own free logit (added to the network's output). Adam moves every
    parameter by about ``lr`` per step, so a plain free logit could travel only ~2 units in 200
    steps at lr 1e-2, too little to close a gate that starts at +3; the multiplier (a
    re-parametrisation) lets each slot's decision move ~10x faster and independently of the
    others, while the shared network supplies structure across slots and the budget
    conditioning. 0 disables the free logits (network only)."""
    logit_l2: float = 1e-3
    """Weight of :meth:`PrunerNetwork.regularizer`, a small L2 penalty on the keep-minus-close
    logit gap that the search loop adds to its loss. Without it Adam drives logits to +-20,
    where sigmoid gradients vanish and the gates freeze before the budget is met; with it gaps
    settle around 5 to 7 (p ~ 0.995), decided yet still movable."""

    def __post_init__(self) -> None:
        if self.d_model < 1 or self.num_heads < 1 or self.d_model % self.num_heads != 0:
            raise ValueError(
                f"pruner.d_model must be a positive multiple of pruner.num_heads; "
                f"got d_model={self.d_model}, num_heads={self.num_heads}"
            )
        if self.num_layers < 0:
            raise ValueError(f"pruner.num_layers must be >= 0; got {self.num_layers}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"pruner.dropout must be in [0, 1); got {self.dropout}")
        if not (self.tau_start > 0 and self.tau_end > 0):
            raise ValueError(
                f"pruner.tau_start and pruner.tau_end must be > 0; got {self.tau_start}, {self.tau_end}"
            )
        if self.slot_logit_scale < 0 or self.logit_l2 < 0:
            raise ValueError(
                f"pruner.slot_logit_scale and pruner.logit_l2 must be >= 0; "
                f"got {self.slot_logit_scale}, {self.logit_l2}"
            )
        if self.init not in PRUNER_INITS:
            raise ValueError(f"pruner.init must be one of {', '.join(PRUNER_INITS)}; got {self.init!r}")
        if self.tau_schedule not in TAU_SCHEDULES:
            raise ValueError(
                f"pruner.tau_schedule must be one of {', '.join(TAU_SCHEDULES)}; got {self.tau_schedule!r}"
            )


@dataclass
class FinetuneConfig:
    """``search.finetune`` in the config."""

    enabled: bool = False
    """Fine-tune the SubNet after the search (block kind)."""
    steps: int = 100
    """Optimisation steps."""
    lr: float = 1e-4
    """AdamW learning rate (cosine decay)."""
    anneal_fraction: float = 0.5
    """Fraction of the steps over which the closed blocks fade from 1 to 0."""
    batch_size: int = 32


@dataclass
class ModelConfig:
    name: str = "digits_unet"  # reference name (digits_unet, digits_dit, ...), local folder, or hub id
    subfolder: str | None = None  # e.g. "unet" for a diffusers pipeline folder
    dtype: str = "float32"  # float32 | float16 | bfloat16 (the search itself runs in float32 on CPU)
    lora: str | None = None  # a LoRA to search with: peft adapter folder or diffusers LoRA .safetensors (dipgo.models.lora)
    lora_scale: float = 1.0  # strength of that LoRA (peft's scaling times this)
    lora_fuse: bool = True  # merge the LoRA into the weights (a plain model; the plan applies unfused too)


@dataclass
class SupernetConfig:
    kind: str = "reuse"  # gate kind: reuse (timestep feature reuse) | block | mask | joint (reuse + mask, one budget)
    granularity: str = "block"  # block | layer (finer: each resnet/attention or attn/MLP)
    mode: str = "auto"  # reuse mode: auto | output | residual
    num_steps: int = 50  # sampling steps the plan is searched for
    scheduler: str = "ddim"  # solver of the searched trajectory and of the full-model reference: ddim (eta 0) | dpmsolver++ (2M) | unipc (UniPC-2 + corrector) | euler
    guidance_scale: float = 1.0  # classifier-free guidance (1 = off)
    checkpointing: bool = False  # gradient checkpointing per sampling step (less memory, ~30% slower)
    truncate_steps: int | None = None  # truncated backprop through the unrolled trajectory
    forecast_order: int = 0  # a closed reuse slot: 0 copies its last output, 1 / 2 extrapolates it (TaylorSeer-style)
    step_gates: bool = False  # reuse: one extra gate per step that closes all its units (a whole skipped step is one decision)
    whole_step_skip: bool | None = None  # reuse: a fully closed step skips the call and forecasts the model output (null = where exact: UNets in output mode; true = DiTs too)
    cost: str = "macs"  # block kind: what search.target measures, macs (counted) | latency (per-block table measured on this device)
    pattern: str = "unstructured"  # mask kind: unstructured | 2:4 | 4:8 | block16 | block32 | rowblock16 | rowblock32 (block patterns run on the block-sparse kernels; rowblock keeps the same count per block-row)
    saliency: str = "wanda"  # mask kind: magnitude (|W|) | wanda (|W| * input-column norm on calibration data)
    cost_weighting: str = "params"  # mask kind: global sparsity weighted by params | macs (search.target is the kept density)
    strict_pattern: bool = False  # mask kind: refuse the run when a layer cannot hold the pattern (default: leave it dense)
    mask_temperature: float = 0.02  # mask kind: width of the sigmoid bridge from a layer's density to its mask (saliency-quantile units)
    reconstruct: bool = True  # mask kind: OBS layer-wise reconstruction of the kept weights on calibration inputs
    distill_steps: int = 100  # mask kind: steps distilling the kept weights towards the dense outputs (0 = off)
    distill_lr: float = 3e-4  # mask kind: Adam learning rate of that distillation
    sds: SDSConfig = field(default_factory=SDSConfig)  # mask kind: optional SDS step after the prune (dipgo.postprocess.sds)
    kinds: list[str] = field(default_factory=lambda: ["reuse", "mask"])  # joint kind: what is searched ([reuse, mask], [reuse] or [mask])
    mask_exclude: list[str] = field(default_factory=list)  # joint kind: extra regexes of module paths never masked
    mask_calib_items: int = 16  # joint kind: calibration noises whose trajectories give Wanda norms and OBS Hessians
    mask_allocation: str = "layer"  # joint kind: layer (a learned density per layer) | global (one learned density for all masked layers)
    mask_min_density: float = 0.05  # joint kind: smallest density a learned layer allocation may give a layer
    split_densities: list[float] = field(default_factory=list)  # joint kind: uniform densities measured against the learned allocation (1.0 = all budget to reuse)





@dataclass
class PlacementConfig:
    """Learned step placement before the pruner (``search.placement``; reuse kind only, with
    ``search.pruner.init=prior``): :mod:`dipgo.search.reuse_placement`."""

    enabled: bool = False
    """Learn where the start schedule's full steps go, on hard calibration trajectories."""
    iterations: int = 60
    """Policy-gradient steps."""
    samples: int = 8
    """Placements drawn and run per step (at least 2: each is judged against the others' mean)."""
    batch: int = 8
    """Calibration items each placement is run on (the first items of the pool)."""
    lr: float = 0.3
    """Adam learning rate of the per-step placement logits."""
    init_gap: float = 1.0
    """Starting logit of the evenly spaced schedule's steps (the others start at 0)."""

    def __post_init__(self) -> None:
        if self.iterations < 0 or self.samples < 2 or self.batch < 1:
            raise ValueError(f"search.placement needs iterations >= 0, samples >= 2 and batch >= 1; "
                             f"got {self.iterations}, {self.samples}, {self.batch}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"search.placement.lr must be a positive number; got {self.lr}")


@dataclass
class ScheduleConfig:
    """A learned solver schedule at the plan's MACs (``search.schedule``; reuse kind only):
    :mod:`dipgo.search.reuse_schedule`. The plan that samples the calibration batch closer to the
    full model wins: the forecast plan, or K full steps of ``solver`` at learned timesteps."""

    enabled: bool = False
    """Also learn a K-step solver schedule (K = the whole denoiser calls the budget pays for)."""
    solver: str = "unipc"
    """The multistep solver the schedule runs on (dpmsolver++ or unipc)."""
    batch: int = 8
    """Calibration items each schedule is run on (the first items of the pool)."""
    moves: list[int] = field(default_factory=lambda: [64, 32, 16, 8, 4])
    """Coordinate-descent step sizes, in training timesteps, largest first."""

    def __post_init__(self) -> None:
        if self.solver not in SCHEDULE_SOLVERS:
            raise ValueError(f"search.schedule.solver must be one of {', '.join(SCHEDULE_SOLVERS)}; got {self.solver!r}")
        if self.batch < 1 or not self.moves or any(int(m) < 1 for m in self.moves):
            raise ValueError(f"search.schedule needs batch >= 1 and positive moves; got {self.batch}, {self.moves}")


@dataclass
class SearchConfig:
    target: float = 0.25  # fraction of MACs to keep, in (0, 1]; 0.25 asks for a 4x MACs reduction
    target_range: list[float] | None = None  # budget-conditioned pruner: train on budgets drawn from [low, high]
    plan_targets: list[float] = field(default_factory=list)  # budget-conditioned pruner: also write plans/target_<t>.json for these
    lr: float = 0.01  # pruner learning rate (Adam)
    weight_decay: float = 0.0
    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    distortion: DistortionConfig = field(default_factory=DistortionConfig)
    cost: CostConfig = field(default_factory=CostConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


@dataclass
class DataConfig:
    kind: str = "diffusion"  # diffusion (noise + class labels) | prompts (noise + text embeddings, Stable Diffusion) | images | text
    batch_size: int = 8  # calibration batch per optimisation step
    pool_size: int = 64  # calibration pool (noises / images / sentences); outputs of the original model are cached per item
    steps_per_epoch: int = 25  # optimisation steps per Lightning epoch (bookkeeping only: batches depend on the global step)
    num_classes: int | None = None  # class-conditional denoisers: labels drawn from [0, num_classes); None = read from the model
    num_workers: int = 0
    max_length: int = 64  # text: tokens per calibration sentence (padded / truncated)
    prompts_file: str | None = None  # prompts: a text file, one prompt per line (every 4th held out for the report); None = dipgo's built-in prompts


@dataclass
class TrainerConfig:
    max_steps: int = 200  # optimisation steps of the pruner
    accelerator: str = "cpu"  # cpu | gpu | auto
    devices: Any = 1
    strategy: str = "auto"  # auto | ddp | ddp_spawn ...
    num_nodes: int = 1
    precision: str = "32-true"
    log_every_n_steps: int = 5
    gradient_clip_val: float | None = 1.0
    enable_progress_bar: bool = True
    checkpoint_every_n_steps: int = 25  # pruner checkpoints (for resume=) every this many steps


@dataclass
class LoggerConfig:
    wandb: bool = True  # log to Weights & Biases (offline unless configured)
    wandb_mode: str = "auto"  # auto (offline unless WANDB_MODE/WANDB_API_KEY say online) | offline | online | disabled
    project: str = "dipgo"
    entity: str | None = None
    group: str | None = None  # runs of one sweep share a group
    tags: list[str] = field(default_factory=list)
    csv: bool = True  # CSV metrics next to the run (always on by default)


@dataclass
class ReportConfig:
    num_samples: int = 100  # evaluation samples (same noise for full model, plan and baselines)
    eval_seed: int = 1234  # evaluation noise seed, distinct from the calibration pool
    latency_runs: int = 3  # timed runs per variant (median reported)
    latency_warmup: int = 1
    latency_batch: int = 16
    baselines: list[str] = field(default_factory=lambda: ["fewer_steps", "fewer_steps_ddim", "fewer_steps_dpmsolver++", "fewer_steps_unipc", "deepcache", "uniform", "static_per_block", "random", "taylorseer1", "taylorseer2", "teacache"])  # at the same MACs; DiTs also: first_block_cache, pyramid_attention_broadcast, faster_cache
    plots: bool = True
    # the FD proxy's judge: "auto" = the digits classifier for the shipped digits denoisers,
    # "digits" = also for your own denoiser of 1x16x16 digits (a separately trained model), "none"
    fd_judge: str = "auto"


@dataclass
class Config:
    seed: int = 0
    runs_root: str = "runs"  # run directories go to <runs_root>/<recipe>/<timestamp>/
    run_dir: str | None = None  # explicit run directory (must not exist yet)
    resume: str | None = None  # a run directory to continue from its last checkpoint
    recipe_name: str = "custom"  # set by the recipe; names the run folder
    model: ModelConfig = field(default_factory=ModelConfig)
    supernet: SupernetConfig = field(default_factory=SupernetConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    report: ReportConfig = field(default_factory=ReportConfig)


def register_configs() -> None:
    """Register the schema so ``configs/config.yaml`` can put it first in its defaults list."""
    cs = ConfigStore.instance()
    cs.store(name=SCHEMA_NAME, node=Config)
