"""The report's registry: how each gate kind's SubNet is measured, timed and summarised.

The top stage of a search: after the search task (:mod:`dipgo.search.registry`) has built the
SuperNet and extracted the plan, the reporter of the same kind measures the SubNet against the
full model and the baselines, writes the plots, and turns a report back into a few lines;
``dipgo bench`` times a saved plan. Keyed by the same ``kind`` as the tasks, looked up by
:func:`dipgo.report.kinds.get_reporter` from the entry points (``search/run.py``,
``dipgo/commands.py``), so that no search or lower-floor module imports the report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from omegaconf import DictConfig

from dipgo.models.registry import LoadedModel
from dipgo.postprocess.plan import Plan
from dipgo.supernets.gates import SuperNet


class Reporter(Protocol):
    """Everything kind-specific about measuring and describing a SubNet."""

    kind: str

    def evaluate(self, loaded: LoadedModel, supernet: SuperNet, plan: Plan, cfg: DictConfig,
                 run_dir: Path) -> tuple[dict[str, Any], dict[str, Path]]:
        """Measure the SubNet against the full model (and baselines); return report + plot paths."""
        ...

    def summary_lines(self, report: dict[str, Any]) -> list[str]:
        """A few human-readable lines for the end of ``dipgo search`` and ``dipgo report``."""
        ...

    def bench(self, cfg: DictConfig, plan: Plan, *, runs: int, warmup: int, batch: int,
              threads: int | None) -> dict[str, Any]:
        """Time a saved plan's SubNet against its full model (``dipgo bench``); JSON-able."""
        ...

    def bench_lines(self, result: dict[str, Any]) -> list[str]:
        """A few human lines for ``dipgo bench``."""
        ...


_REPORTERS: dict[tuple[str, str | None], Callable[[], Reporter]] = {}


def register_reporter(kind: str, variant: str | None = None
                      ) -> Callable[[Callable[[], Reporter]], Callable[[], Reporter]]:
    """Class decorator: ``@register_reporter("reuse")`` measures ``kind=reuse`` plans with the class;
    ``variant`` names a task variant of the kind (the search task's ``variant``; a saved report
    carries it as ``joint_variant``)."""

    def deco(factory: Callable[[], Reporter]) -> Callable[[], Reporter]:
        _REPORTERS[(kind, variant)] = factory
        return factory

    return deco


@dataclass(frozen=True)
class FunctionReporter:
    """A reporter made of a kind's module functions: most kinds need no class of their own."""

    kind: str
    evaluate: Callable[..., tuple[dict[str, Any], dict[str, Path]]]
    summary_lines: Callable[[dict[str, Any]], list[str]]
    bench: Callable[..., dict[str, Any]]
    bench_lines: Callable[[dict[str, Any]], list[str]]


def register_functions(kind: str, *, evaluate: Callable[..., tuple[dict[str, Any], dict[str, Path]]],
                       summary_lines: Callable[[dict[str, Any]], list[str]], bench: Callable[..., dict[str, Any]],
                       bench_lines: Callable[[dict[str, Any]], list[str]]) -> None:
    """Register ``kind``'s reporter from its functions (the signatures of :class:`Reporter`'s methods)."""
    reporter = FunctionReporter(kind, evaluate, summary_lines, bench, bench_lines)
    register_reporter(kind)(lambda: reporter)


def lookup_reporter(kind: str, variant: str | None = None) -> Reporter:
    if (kind, variant) not in _REPORTERS:
        known = ", ".join(sorted(k if v is None else f"{k} ({v})" for k, v in _REPORTERS))
        raise ValueError(f"gate kind {kind!r}{f' ({variant})' if variant else ''} has no report yet; available: {known}")
    return _REPORTERS[(kind, variant)]()
