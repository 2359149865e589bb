"""A registry of gate kinds: how to build the SuperNet, its data, its plan and its report.

The search loop is the same for every gate kind; what differs (wrapping the model, calibration
data, turning probabilities into a plan, measuring the SubNet) lives behind this small
interface, one implementation per kind, looked up by ``supernet.kind``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from dipgo.postprocess.plan import Plan
from dipgo.supernets.gates import SuperNet


class Task(Protocol):
    """Everything kind-specific about a search."""

    kind: str

    def build(self, loaded: Any, cfg: DictConfig) -> SuperNet:
        """Wrap the loaded model into a SuperNet (raises a one-sentence error if unsupported)."""
        ...

    def datamodule(self, loaded: Any, supernet: SuperNet, cfg: DictConfig) -> pl.LightningDataModule:
        """Calibration data for the search."""
        ...

    def extract_plan(self, probs: torch.Tensor, supernet: SuperNet, cfg: DictConfig) -> Plan:
        """Hard decisions meeting the budget from the learned keep probabilities ``(N,)``."""
        ...

    def evaluate(
        self, loaded: Any, supernet: SuperNet, plan: Plan, cfg: DictConfig, run_dir: Path
    ) -> tuple[dict[str, Any], dict[str, Path]]:
        """Measure the SubNet against the full model (and baselines); return report + plot paths."""
        ...

    def summary_lines(self, report: dict[str, Any]) -> list[str]:
        """A few human-readable lines for the end of ``dipgo search``."""
        ...


def load_configured_model(cfg: DictConfig) -> Any:
    """Load ``cfg.model`` (name, folder or hub id, optional subfolder) through dipgo's registry."""
    from dipgo.models.registry import load_model

    return load_model(cfg.model.name, **({"subfolder": cfg.model.subfolder} if cfg.model.subfolder else {}))


_TASKS: dict[str, Callable[[], Task]] = {}


def register_task(kind: str) -> Callable[[Callable[[], Task]], Callable[[], Task]]:
    def deco(factory: Callable[[], Task]) -> Callable[[], Task]:
        _TASKS[kind] = factory
        return factory

    return deco


def get_task(kind: str) -> Task:
    _load_builtin_tasks()
    if kind not in _TASKS:
        raise ValueError(f"gate kind {kind!r} has no search task yet; available: {', '.join(sorted(_TASKS))}")
    return _TASKS[kind]()


def available_tasks() -> list[str]:
    _load_builtin_tasks()
    return sorted(_TASKS)


def _load_builtin_tasks() -> None:
    # Imported lazily: each task pulls in its model libraries (diffusers, timm, transformers).
    from dipgo.search import block_task, joint_task, mask_task, reuse_task  # noqa: F401
