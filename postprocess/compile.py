"""Regional ``torch.compile`` of the blocks a reuse plan gates, and what compilation costs per step.

Compiling the whole denoiser of a SubNet gives dynamo dipgo's per-step decisions to trace (which
block computes, which replays its cache): Python state it guards on, so it breaks the graph at the
hooks and recompiles as the step pattern changes (what DeepCache #26 and diffusers' caches report).
Regional compilation, which diffusers recommends for repeated blocks, avoids that: each block's
own computation is compiled (``fullgraph`` when it can be), and dipgo's decisions stay in eager
Python between the compiled blocks. The order matters: :func:`compile_blocks` replaces each
block's ``forward`` *before* :func:`~dipgo.postprocess.reuse_subnet.install_plan` registers its
hooks, so the hooks call the compiled forward when a block computes and skip it when it replays.

:func:`compile_stats` reads dynamo's counters around a run: graphs compiled, graph breaks (with
their reasons), recompilations, and how many compiled graphs each sampling step entered; ``dipgo
bench --compile`` prints them for the full model and the SubNet.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dipgo.errors import PlanError
from dipgo.supernets.adapters import get_reuse_adapter
from dipgo.supernets.hooks import HOOK_PREFIX


class CompiledBlocks:
    """The blocks of a model whose ``forward`` was replaced by a compiled one; ``remove()`` undoes it."""

    def __init__(self, model: nn.Module, names: Sequence[str], **compile_kwargs: Any) -> None:
        self.names = list(names)
        self.calls = 0  # compiled-block calls since the last reset_calls(): one graph each without breaks
        self._restore: list[Callable[[], None]] = []
        for name in self.names:
            self._restore.append(self._compile(model, name, compile_kwargs))

    def _compile(self, model: nn.Module, name: str, compile_kwargs: dict[str, Any]) -> Callable[[], None]:
        module = model.get_submodule(name)
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None and any(h.startswith(HOOK_PREFIX) for h in getattr(registry, "hooks", {})):
            raise PlanError(
                f"{name} already carries a dipgo hook: compile the blocks before installing the plan "
                "(compile_blocks(model) first, then install_plan), or dynamo would trace dipgo's per-step decisions."
            )
        had_own, own = "forward" in module.__dict__, module.__dict__.get("forward")
        compiled = torch.compile(module.forward, **compile_kwargs)

        def forward(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return compiled(*args, **kwargs)

        module.forward = forward

        def restore() -> None:
            if module.__dict__.get("forward") is not forward:
                raise RuntimeError(f"the forward of {name} was replaced after compile_blocks: remove that first")
            if had_own:
                module.forward = own
            else:
                del module.forward

        return restore

    def remove(self) -> None:
        """Give every block its eager forward back (after the plan's hooks are removed)."""
        while self._restore:
            self._restore.pop()()

    def __enter__(self) -> CompiledBlocks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def compile_blocks(model: nn.Module, names: Sequence[str] | None = None, *, fullgraph: bool = True,
                   dynamic: bool | None = False, **compile_kwargs: Any) -> CompiledBlocks:
    """Compile the reuse units of ``model`` (or the blocks ``names``) in place, one region each.

    ``fullgraph=True`` makes a graph break inside a block an error at its first call, so a run that
    finishes had none; pass ``fullgraph=False`` for a block that cannot be traced whole.
    """
    if names is None:
        names = [u.name for u in get_reuse_adapter(model).units(model, "block", "auto")]
    return CompiledBlocks(model, names, fullgraph=fullgraph, dynamic=dynamic, **compile_kwargs)


@dataclass
class CompileStats:
    """What dynamo did during one run (its counters read before and after it)."""

    graphs: int  # graphs dynamo compiled (recompilations after a failed guard count again; 0 in a steady state)
    graph_breaks: int
    break_reasons: list[str] = field(default_factory=list)  # "<count>x <first line of the reason>"
    compiled_calls_per_step: float | None = None  # regional: compiled blocks entered per sampling step

    def to_dict(self) -> dict[str, Any]:
        return {"graphs": self.graphs, "graph_breaks": self.graph_breaks,
                "break_reasons": self.break_reasons, "compiled_calls_per_step": self.compiled_calls_per_step}


def _snapshot() -> tuple[int, Counter[str]]:
    from torch._dynamo.utils import counters

    return int(counters["stats"].get("unique_graphs", 0)), Counter(counters["graph_break"])


@contextmanager
def compile_stats(steps: int, blocks: CompiledBlocks | None = None) -> Iterator[list[CompileStats]]:
    """Yields a list that holds the :class:`CompileStats` of the enclosed run once it ends."""
    out: list[CompileStats] = []
    graphs0, breaks0 = _snapshot()
    if blocks is not None:
        blocks.calls = 0
    yield out
    graphs1, breaks1 = _snapshot()
    new_breaks = breaks1 - breaks0
    reasons = [f"{n}x {r.strip().splitlines()[0]}" for r, n in new_breaks.most_common(5)]
    out.append(CompileStats(graphs=graphs1 - graphs0,
                            graph_breaks=int(sum(new_breaks.values())), break_reasons=reasons,
                            compiled_calls_per_step=None if blocks is None else blocks.calls / max(steps, 1)))
