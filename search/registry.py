"""The registry of gate kinds as search tasks: the protocol a kind implements and its lookup.

The search loop is the same for every gate kind; what differs (wrapping the model, calibration
data, turning probabilities into a plan, writing the SubNet) lives behind this small interface,
one implementation per kind, looked up by ``supernet.kind``. Measuring and describing the
SubNet is the report's part (:mod:`dipgo.report.registry`), one floor up.

This module imports no task: the tasks import it to register themselves, and
:func:`dipgo.search.tasks.get_task` imports the built-in ones, so the arrows stay one-way.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from dipgo.models.registry import LoadedModel
from dipgo.postprocess.plan import Plan
from dipgo.supernets.gates import SuperNet


class Task(Protocol):
    """Everything kind-specific about a search, up to the plan and its exported SubNet."""

    kind: str

    def build(self, loaded: LoadedModel, cfg: DictConfig) -> SuperNet:
        """Wrap the loaded model into a SuperNet (raises a one-sentence error if unsupported)."""
        ...

    def datamodule(self, loaded: LoadedModel, supernet: SuperNet, cfg: DictConfig) -> pl.LightningDataModule:
        """Calibration data for the search."""
        ...

    def extract_plan(self, probs: torch.Tensor, supernet: SuperNet, cfg: DictConfig) -> Plan:
        """Hard decisions meeting the budget from the learned keep probabilities ``(N,)``."""
        ...

    def export(self, cfg: DictConfig, plan: Plan, out: Path) -> Path:
        """Write the SubNet of a saved plan to ``out`` (``dipgo export``); returns its folder."""
        ...


_TASKS: dict[str, Callable[[], Task]] = {}


def register_task(kind: str) -> Callable[[Callable[[], Task]], Callable[[], Task]]:
    """Class decorator: ``@register_task("reuse")`` makes ``supernet.kind=reuse`` use the class."""

    def deco(factory: Callable[[], Task]) -> Callable[[], Task]:
        _TASKS[kind] = factory
        return factory

    return deco


def lookup_task(kind: str) -> Task:
    """A fresh task of a registered kind (a one-sentence error naming the registered ones)."""
    if kind not in _TASKS:
        raise ValueError(f"gate kind {kind!r} has no search task yet; available: {', '.join(sorted(_TASKS))}")
    return _TASKS[kind]()


def registered_kinds() -> list[str]:
    return sorted(_TASKS)
