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
    variant: str | None  # None for a kind's default task; else the name its reporter is registered under

    def validate(self, cfg: DictConfig) -> None:
        """Refuse (:class:`~dipgo.errors.ConfigError`, one sentence) what only this kind checks;
        called by :func:`dipgo.search.compose.validate_config` before anything runs."""
        ...

    def build(self, loaded: LoadedModel, cfg: DictConfig) -> SuperNet:
        """Wrap the loaded model into a SuperNet (raises a one-sentence error if unsupported)."""
        ...

    def datamodule(self, loaded: LoadedModel, supernet: SuperNet, cfg: DictConfig) -> pl.LightningDataModule:
        """Calibration data for the search."""
        ...

    # Optional: ``prepare(supernet, cfg)``, run by the search (not by reports or benches that
    # rebuild the SuperNet) before the pruner trains; the reuse kind learns its placement there.

    def extract_plan(self, probs: torch.Tensor, supernet: SuperNet, cfg: DictConfig) -> Plan:
        """Hard decisions meeting the budget from the learned keep probabilities ``(N,)``."""
        ...

    def export(self, cfg: DictConfig, plan: Plan, out: Path) -> Path:
        """Write the SubNet of a saved plan to ``out`` (``dipgo export``); returns its folder."""
        ...


_TASKS: dict[str, Callable[[], Task]] = {}  # the default task of each kind
_VARIANTS: dict[str, list[tuple[Callable[[DictConfig], bool], Callable[[], Task]]]] = {}


def register_task(kind: str, *, when: Callable[[DictConfig], bool] | None = None
                  ) -> Callable[[Callable[[], Task]], Callable[[], Task]]:
    """Class decorator: ``@register_task("reuse")`` makes ``supernet.kind=reuse`` use the class.

    ``when``: the class is a variant of ``kind``, used for the configs it accepts (the joint kind:
    block + mask for classifiers and encoders beside the default reuse + mask for denoisers), so
    one kind name covers model families whose searches differ, dispatched here and nowhere else.
    """

    def deco(factory: Callable[[], Task]) -> Callable[[], Task]:
        if when is None:
            _TASKS[kind] = factory
        else:
            _VARIANTS.setdefault(kind, []).append((when, factory))
        return factory

    return deco


def lookup_task(kind: str, cfg: DictConfig | None = None) -> Task:
    """A fresh task of a registered kind: the first variant whose ``when(cfg)`` holds, else the
    default (a one-sentence error naming the registered kinds)."""
    if cfg is not None:
        for when, factory in _VARIANTS.get(kind, []):
            if when(cfg):
                return factory()
    if kind not in _TASKS:
        raise ValueError(f"gate kind {kind!r} has no search task yet; available: {', '.join(sorted(_TASKS))}")
    return _TASKS[kind]()


def registered_kinds() -> list[str]:
    return sorted(_TASKS)
