"""Typed schemas for every config group, registered with Hydra's ConfigStore.

The YAML files in ``configs/`` are merged onto these dataclasses, so a typo'd key or a value of
the wrong type is refused at composition time (before any run directory exists) instead of
silently becoming a new key. Each field's comment says what it does; ``dipgo search --help``
lists the groups and their options.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

SCHEMA_NAME = "dipgo_schema"


@dataclass
class ModelConfig:
    name: str = "digits_unet"  # reference name (digits_unet, digits_dit, ...), local folder, or hub id
    subfolder: str | None = None  # e.g. "unet" for a diffusers pipeline folder
    dtype: str = "float32"  # float32 | float16 | bfloat16 (the search itself runs in float32 on CPU)


@dataclass
class SdsSchema:
    """Mask kind, SDS (Sparse-Dense-Sparse): after the prune, re-activate the pruned weights, train the
    masked layers dense towards the dense outputs with an L1 pull of those weights to zero, prune again."""

    enabled: bool = False  # run SDS after dipgo's prune (the report then also lists dipgo_before_sds)
    steps: int = 100  # Adam steps of the re-dense training per round (>= 1)
    lr: float = 3e-4  # Adam learning rate of the re-dense training (cosine decay)
    l1: float = 0.3  # L1 pull of the previously pruned weights to zero, per step in learning-rate units (>= 0; 0 = off)
    rounds: int = 1  # dense-sparse rounds (>= 1)


@dataclass
class SupernetConfig:
    kind: str = "reuse"  # gate kind: reuse (timestep feature reuse) | block | mask | joint (reuse + mask, one budget)
    granularity: str = "block"  # block | layer (finer: each resnet/attention or attn/MLP)
    mode: str = "auto"  # reuse mode: auto | output | residual
    num_steps: int = 50  # sampling steps the plan is searched for
    scheduler: str = "ddim"  # ddim | dpmsolver++ | euler
    guidance_scale: float = 1.0  # classifier-free guidance (1 = off)
    checkpointing: bool = False  # gradient checkpointing per sampling step (less memory, ~30% slower)
    truncate_steps: int | None = None  # truncated backprop through the unrolled trajectory
    cost: str = "macs"  # block kind: what search.target measures, macs (counted) | latency (per-block table measured on this device)
    pattern: str = "unstructured"  # mask kind: unstructured | 2:4 | 4:8 | block16 | block32 | rowblock16 | rowblock32 (block patterns run on the block-sparse kernels; rowblock keeps the same count per block-row)
    saliency: str = "wanda"  # mask kind: magnitude (|W|) | wanda (|W| * input-column norm on calibration data)
    cost_weighting: str = "params"  # mask kind: global sparsity weighted by params | macs (search.target is the kept density)
    strict_pattern: bool = False  # mask kind: refuse the run when a layer cannot hold the pattern (default: leave it dense)
    mask_temperature: float = 0.02  # mask kind: width of the sigmoid bridge from a layer's density to its mask (saliency-quantile units)
    reconstruct: bool = True  # mask kind: OBS layer-wise reconstruction of the kept weights on calibration inputs
    distill_steps: int = 100  # mask kind: steps distilling the kept weights towards the dense outputs (0 = off)
    distill_lr: float = 3e-4  # mask kind: Adam learning rate of that distillation
    sds: SdsSchema = field(default_factory=SdsSchema)  # mask kind: optional SDS step after the prune (dipgo.postprocess.sds)
    kinds: list[str] = field(default_factory=lambda: ["reuse", "mask"])  # joint kind: what is searched ([reuse, mask], [reuse] or [mask])
    mask_exclude: list[str] = field(default_factory=list)  # joint kind: extra regexes of module paths never masked
    mask_calib_items: int = 16  # joint kind: calibration noises whose trajectories give Wanda norms and OBS Hessians
    mask_allocation: str = "layer"  # joint kind: layer (a learned density per layer) | global (one learned density for all masked layers)
    mask_min_density: float = 0.05  # joint kind: smallest density a learned layer allocation may give a layer
    split_densities: list[float] = field(default_factory=list)  # joint kind: uniform densities measured against the learned allocation (1.0 = all budget to reuse)


@dataclass
class PrunerSchema:
    d_model: int = 64  # width of the slot queries and the encoder
    num_layers: int = 2  # transformer encoder layers across slots
    num_heads: int = 4
    dropout: float = 0.0
    init_keep_logit: float = 3.0  # initial bias towards "compute everything"
    tau_start: float = 1.0  # Gumbel-softmax temperature at step 0
    tau_end: float = 0.1  # ... and at the last step
    tau_schedule: str = "cosine"  # cosine | linear | exp
    budget_conditioned: bool = False  # one pruner for a range of budgets
    hard: bool = True  # straight-through hard gates in the forward pass
    slot_logit_scale: float = 10.0  # scale of the per-slot free logits (lets slots leave the shared network's consensus)
    logit_l2: float = 0.001  # keeps logits finite so sigmoid gradients never vanish


@dataclass
class DistortionSchema:
    mse: float = 1.0  # MSE of the final sample / logits / embedding against the original model
    ssim: float = 0.0  # weight of 1 - SSIM (images)
    eps: float = 0.0  # per-step noise-prediction MSE (diffusion)
    kl: float = 0.0  # KL on logits (classifiers)
    cosine: float = 0.0  # 1 - cosine of embeddings (encoders)
    feature_mse: float = 0.0
    temperature: float = 1.0  # KL temperature
    data_range: float = 2.0  # image value range for SSIM ([-1, 1] -> 2)
    ssim_kernel: int = 11  # SSIM window (shrunk to fit small images)


@dataclass
class CostSchema:
    weight: float = 1.0  # initial weight of the cost penalty
    mode: str = "two_sided"  # two_sided (land on the target) | hinge (only stay under it)
    controller: str = "dual"  # dual (Lagrange-style multiplier) | fixed
    lr_lambda: float = 0.05  # step size of the multiplier
    lambda_max: float = 100.0
    lambda_min: float = 0.01
    tolerance: float = 0.005  # |log(expected/target)| counted as on target
    smoothing: float = 0.9  # EMA of the signed log ratio the controller reacts to
    delta: float = 0.01  # quadratic zone of the pseudo-Huber penalty (log-ratio units)


@dataclass
class RefineSchema:
    enabled: bool = True  # refine the extracted plan by measuring hard plans on calibration data
    max_evals: int = 150  # hard-plan evaluations of the local search
    batch: int = 16  # calibration items per evaluation
    seeds: list[str] = field(default_factory=lambda: ["uniform", "whole_steps", "weight_norm", "drop_last"])  # static plans also tried as starting points (each kind uses its own: reuse uniform/whole_steps, block weight_norm/drop_last)


@dataclass
class FinetuneSchema:
    enabled: bool = False  # block kind: distil the SubNet after the search, closed blocks faded out progressively (UPDP-style)
    steps: int = 100  # optimisation steps of the fine-tune
    lr: float = 1e-4  # AdamW learning rate (cosine decay)
    anneal_fraction: float = 0.5  # fraction of the steps over which closed blocks fade from 1 to 0
    batch_size: int = 32


@dataclass
class SearchConfig:
    target: float = 0.25  # fraction of MACs to keep, in (0, 1]; 0.25 asks for a 4x MACs reduction
    target_range: list[float] | None = None  # budget-conditioned pruner: train on budgets drawn from [low, high]
    plan_targets: list[float] = field(default_factory=list)  # budget-conditioned pruner: also write plans/target_<t>.json for these
    lr: float = 0.01  # pruner learning rate (Adam)
    weight_decay: float = 0.0
    pruner: PrunerSchema = field(default_factory=PrunerSchema)
    distortion: DistortionSchema = field(default_factory=DistortionSchema)
    cost: CostSchema = field(default_factory=CostSchema)
    refine: RefineSchema = field(default_factory=RefineSchema)
    finetune: FinetuneSchema = field(default_factory=FinetuneSchema)


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
    baselines: list[str] = field(default_factory=lambda: ["fewer_steps", "deepcache", "uniform", "static_per_block", "random"])  # at the same MACs; DiTs also: first_block_cache, pyramid_attention_broadcast, faster_cache
    plots: bool = True


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
