"""Compose a run config from ``configs/`` + command-line overrides, with one-sentence errors.

Hydra's own messages are multi-line and mention search paths; a user who typed
``serch.target=0.3`` wants to hear which key is unknown and which keys exist. Everything here
runs before a run directory is created, so a refused config never touches the disk.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from dipgo.errors import ConfigError
from dipgo.errors import one_of as _one_of
from dipgo.postprocess.plan import FORECAST_ORDERS, SCHEDULE_SOLVERS
from dipgo.search.config import Config, register_configs

CONFIG_MODULE = "dipgo.configs"
BASELINES: tuple[str, ...] = (
    "fewer_steps", "deepcache", "uniform", "static_per_block", "random",
    "first_block_cache", "pyramid_attention_broadcast", "faster_cache",
    "weight_norm", "drop_last",
    "taylorseer1", "taylorseer2", "teacache",
    "fewer_steps_ddim", "fewer_steps_dpmsolver++", "fewer_steps_unipc",
    "magnitude", "wanda", "owl", "sparsegpt",
)
SCHEDULERS: tuple[str, ...] = ("ddim", "dpmsolver++", "euler", "unipc")
FD_JUDGES: tuple[str, ...] = ("auto", "digits", "none")
"""``supernet.scheduler`` names: ``supernets.sampling.SCHEDULER_NAMES`` spelled out, because importing
the sampling table imports diffusers and composing must stay light (a test keeps the two equal)."""
GROUPS: tuple[str, ...] = ("model", "supernet", "search", "data", "trainer", "logger", "report", "recipe")
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
"""A recipe name: one folder name under ``runs_root`` (no separator, not ``.`` / ``..``)."""


def list_options(group: str) -> list[str]:
    """Names of the YAML options of a config group (``recipe`` -> ``["digits_unet_reuse", ...]``)."""
    root = resources.files(CONFIG_MODULE) / group
    if not root.is_dir():
        return []
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def compose_config(overrides: Sequence[str] = ()) -> tuple[DictConfig, dict[str, str]]:
    """Compose ``config.yaml`` with ``overrides``; return the config and the chosen group options.

    Raises :class:`ConfigError` with one sentence on any composition or type error.
    """
    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
            cfg = compose("config", overrides=_legacy_overrides(overrides), return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(explain_hydra_error(exc)) from None
    finally:
        GlobalHydra.instance().clear()
    choices = {k: v for k, v in cfg.hydra.runtime.choices.items() if not k.startswith("hydra")}
    with open_dict(cfg):
        del cfg["hydra"]
    validate_config(cfg)
    return cfg, choices


def validate_config(cfg: DictConfig) -> None:
    """Checks no type can express (ranges, enumerations); one sentence per problem."""
    from dipgo.search.tasks import available_tasks, get_task  # lazily: composing stays free of torch

    target = cfg.search.target
    if not 0.0 < target <= 1.0:
        raise ConfigError(
            f"search.target must be in (0, 1] (the fraction of MACs to keep, 0.25 = 4x fewer); got {target}"
        )
    _check_budgets(cfg)
    check_plain_name("recipe_name", cfg.recipe_name)
    _one_of("supernet.kind", cfg.supernet.kind, available_tasks())  # the kind names live in the task registry
    _one_of("supernet.granularity", cfg.supernet.granularity, ("block", "layer"))
    _one_of("supernet.mode", cfg.supernet.mode, ("auto", "output", "residual"))
    _one_of("supernet.scheduler", cfg.supernet.scheduler, SCHEDULERS)
    _one_of("supernet.forecast_order", cfg.supernet.forecast_order, FORECAST_ORDERS)
    _one_of("data.kind", cfg.data.kind, ("diffusion", "prompts", "images", "text"))
    _one_of("supernet.cost", cfg.supernet.cost, ("macs", "latency"))
    if cfg.search.placement.enabled and cfg.supernet.kind != "reuse":
        raise ConfigError(f"search.placement learns where a reuse plan's full steps go; "
                          f"supernet.kind={cfg.supernet.kind} has no steps (use supernet.kind=reuse or leave it off)")
    if cfg.search.schedule.enabled and cfg.supernet.kind != "reuse":
        raise ConfigError(f"search.schedule learns a diffusion sampler's timesteps; supernet.kind={cfg.supernet.kind} "
                          "has no sampler (use supernet.kind=reuse or leave it off)")
    _one_of("search.schedule.solver", cfg.search.schedule.solver, SCHEDULE_SOLVERS)
    _check_groups(cfg)
    get_task(cfg.supernet.kind, cfg).validate(cfg)  # what only this kind needs
    _one_of("logger.wandb_mode", cfg.logger.wandb_mode, ("auto", "offline", "online", "disabled"))
    _one_of("search.cost.mode", cfg.search.cost.mode, ("two_sided", "hinge"))
    _one_of("search.cost.controller", cfg.search.cost.controller, ("dual", "fixed"))
    _one_of("report.fd_judge", cfg.report.get("fd_judge", "auto"), FD_JUDGES)
    for name in cfg.report.baselines:
        _one_of("report.baselines entry", name, BASELINES)
    for key, value, low in (
        ("supernet.num_steps", cfg.supernet.num_steps, 2),
        ("trainer.max_steps", cfg.trainer.max_steps, 1),
        ("data.batch_size", cfg.data.batch_size, 1),
        ("data.pool_size", cfg.data.pool_size, 1),
        ("data.steps_per_epoch", cfg.data.steps_per_epoch, 1),
        ("report.num_samples", cfg.report.num_samples, 1),
        ("report.latency_runs", cfg.report.latency_runs, 1),
    ):
        if value < low:
            raise ConfigError(f"{key} must be at least {low}; got {value}")


def _check_groups(cfg: DictConfig) -> None:
    """Build every group whose dataclass checks its values (``__post_init__``) now, so a bad value
    is refused in one sentence before anything is written, not when the search reaches it."""
    from dipgo.losses.config import CostConfig, DistortionConfig
    from dipgo.postprocess.settings import RefineConfig, SDSConfig
    from dipgo.search.config import PlacementConfig, PrunerConfig, ScheduleConfig, config_of

    groups = (("search.pruner", PrunerConfig), ("search.distortion", DistortionConfig), ("search.cost", CostConfig),
              ("search.refine", RefineConfig), ("search.placement", PlacementConfig),
              ("search.schedule", ScheduleConfig), ("supernet.sds", SDSConfig))
    for key, cls in groups:
        node = OmegaConf.select(cfg, key)
        if node is None:
            continue
        try:
            config_of(cls, node)
        except ValueError as exc:
            raise ConfigError(_first_line(str(exc))) from None


def check_plain_name(key: str, value: object) -> None:
    """Refuse a name that would not stay one folder below ``runs_root`` (``../x``, ``a/b``, ``..``).

    Run folders are ``<runs_root>/<recipe_name>/<timestamp>``: only ``runs_root`` and an explicit
    ``run_dir`` say where files go, so a name must not be able to climb out of the root.
    """
    text = str(value)
    if not PLAIN_NAME.fullmatch(text) or ".." in text:
        raise ConfigError(f"{key}={text!r} must be a plain name (letters, digits, '.', '_', '-', no path separator "
                          "or '..'): it names a folder under runs_root; use run_dir=... to choose another place")


def _check_budgets(cfg: DictConfig) -> None:
    """The budget-conditioned pruner's training range and extra plan targets."""
    rng = cfg.search.get("target_range")
    if rng is not None and (len(rng) != 2 or not 0.0 < rng[0] < rng[1] <= 1.0):
        raise ConfigError(f"search.target_range must be [low, high] with 0 < low < high <= 1; got {list(rng)}")
    for t in cfg.search.get("plan_targets") or []:
        if not 0.0 < t <= 1.0:
            raise ConfigError(f"search.plan_targets entries must be in (0, 1]; got {t}")
    if (cfg.search.get("plan_targets") or rng is not None) and not cfg.search.pruner.budget_conditioned:
        raise ConfigError("search.target_range and search.plan_targets need search.pruner.budget_conditioned=true")


def load_saved_config(path: str | Path) -> DictConfig:
    """A run's saved ``config.yaml``, upgraded from older dipgo layouts so it merges onto today's schema
    (``supernet.sds`` was a boolean before it became a group)."""
    saved = OmegaConf.load(path)
    sds = OmegaConf.select(saved, "supernet.sds")
    if isinstance(sds, bool):
        saved.supernet.sds = {"enabled": sds}
    return saved


def _legacy_overrides(overrides: Sequence[str]) -> list[str]:
    """``supernet.sds=true|false`` (the old boolean) -> ``supernet.sds.enabled=...``."""
    out = []
    for o in overrides:
        m = re.fullmatch(r"(\+{0,2}supernet\.sds)=(true|false|True|False)", o.strip())
        out.append(f"{m[1]}.enabled={m[2].lower()}" if m else o)
    return out


def explain_hydra_error(exc: BaseException) -> str:
    """Turn a Hydra/OmegaConf exception into one sentence naming the key and what is accepted."""
    msg = str(exc)
    missing = re.search(r"Could not find '([^/']+)/([^']+)'", msg)
    if isinstance(exc, MissingConfigException) and missing:
        group, name = missing.groups()
        options = ", ".join(list_options(group)) or "none"
        return f"unknown {group} {name!r}; available {group} options: {options}"
    unknown = re.search(r"Could not override '([^']+)'", msg)
    if unknown:
        key = unknown.group(1)
        return f"unknown config key {key!r}; {_accepted_keys(key)}"
    if isinstance(exc, OverrideParseException):
        bad = re.search(r"Error parsing override '([^']*)'", msg)
        what = bad.group(1) if bad else msg.splitlines()[0]
        return f"cannot parse override {what!r}; write key=value (e.g. search.target=0.3) or group=option (e.g. recipe=digits_unet_reuse)"
    merging = re.search(r"Error merging override (\S+)", msg)
    cause = exc.__cause__ or exc.__context__
    if merging and cause is not None:
        key, _, value = merging.group(1).partition("=")
        return f"{key}={value!r} is invalid: {_first_line(str(cause))}"
    return _first_line(msg)


def _first_line(msg: str) -> str:
    return msg.strip().splitlines()[0] if msg.strip() else "invalid config"


def _accepted_keys(dotted: str) -> str:
    """List the keys accepted at the parent of ``dotted`` in the schema."""
    node: object = Config
    walked: list[str] = []
    for part in dotted.split(".")[:-1]:
        fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        if part not in fields:
            break  # the unknown part is this one: list the keys of the level above it
        default = fields[part].default_factory  # type: ignore[misc]
        node = default() if callable(default) else None
        walked.append(part)
    if not dataclasses.is_dataclass(node):
        return "see `dipgo search --help` for the config groups"
    where = ".".join(walked) or "the top level"
    names = ", ".join(f.name for f in dataclasses.fields(node))
    return f"keys accepted under {where}: {names}"


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
