"""Block discovery for the ``reuse`` gate kind: which modules of a denoiser get a reuse gate.

Like diffusers' cache hooks, blocks are found by known attribute names (``down_blocks``,
``mid_block``, ``up_blocks``, ``transformer_blocks``, ``blocks``); classes that need more (their
own null class, another block layout) register an adapter with
``@register_reuse_adapter(ModelClass)``. An adapter answers three questions:

* which *units* (module paths) carry a gate, at ``"block"`` or ``"layer"`` granularity, and
  whether a reused unit replays its whole output (``"output"``) or its residual
  ``block(x) - x`` on the current input (``"residual"``);
* who consumes each unit's output (:class:`ConsumerGraph`), so that work consumed only by reused
  units is skipped too (the dependency cascade that finds DeepCache's shallow branch);
* nothing else: costs come from ``dipgo.measure.macs`` and the loop from ``supernets.sampling``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from dipgo.errors import UnsupportedModelError

BLOCK_ATTRIBUTES: tuple[str, ...] = ("down_blocks", "mid_block", "up_blocks", "transformer_blocks", "blocks")
GRANULARITIES: tuple[str, ...] = ("block", "layer")
MODES: tuple[str, ...] = ("auto", "output", "residual")


@dataclass(frozen=True)
class ReuseUnit:
    """One gated module.

    Attributes:
        name: module path inside the model (``"up_blocks.1"``), the plan's column name.
        module: the module itself (its ``forward`` is what gets wrapped).
        mode: ``"output"`` (a reused unit returns its cached output) or ``"residual"`` (it
            returns ``x + cached_delta`` with ``cached_delta = unit(x') - x'`` from the step it
            was last computed, so upstream work of this step is kept).
    """

    name: str
    module: nn.Module
    mode: str


@dataclass(frozen=True)
class ConsumerGraph:
    """Who reads each unit's output, in unit order.

    Attributes:
        consumers: for unit ``b``, the indices of the units that read its output; every consumer
            index is larger than ``b`` (units are listed in execution order), so effective gates
            are computed in one reverse pass.
        always_needed: ``True`` when something that always runs (the output head) or a unit in
            residual mode (which reads its input even when reused) needs the output every step.
    """

    consumers: tuple[tuple[int, ...], ...]
    always_needed: tuple[bool, ...]

    def __post_init__(self) -> None:
        for b, cons in enumerate(self.consumers):
            if any(c <= b for c in cons):
                raise ValueError(f"consumer graph is not in execution order at unit {b}: {cons}")

    @classmethod
    def independent(cls, n: int) -> ConsumerGraph:
        """Every unit needed every step: no cascade."""
        return cls(consumers=((),) * n, always_needed=(True,) * n)

    @classmethod
    def chain(cls, n: int) -> ConsumerGraph:
        """Unit ``b`` feeds unit ``b + 1``; the last one feeds the head."""
        return cls(consumers=tuple((b + 1,) if b + 1 < n else () for b in range(n)),
                   always_needed=tuple(b == n - 1 for b in range(n)))


class ReuseAdapter:
    """How one family of denoisers exposes its blocks. Subclass and register for new families."""

    def units(self, model: nn.Module, granularity: str, mode: str) -> list[ReuseUnit]:
        raise NotImplementedError

    def graph(self, model: nn.Module, units: list[ReuseUnit], granularity: str) -> ConsumerGraph:
        raise NotImplementedError


def _module_list(model: nn.Module, attr: str) -> nn.ModuleList | None:
    value = getattr(model, attr, None)
    return value if isinstance(value, nn.ModuleList) and len(value) > 0 else None


def _check(granularity: str, mode: str) -> None:
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}: expected one of {', '.join(GRANULARITIES)}")
    if mode not in MODES:
        raise ValueError(f"unknown reuse mode {mode!r}: expected one of {', '.join(MODES)}")


class UNetAdapter(ReuseAdapter):
    """diffusers UNets: ``down_blocks``, optional ``mid_block``, ``up_blocks``.

    Block granularity reuses whole block outputs (down blocks return ``(hidden, res_samples)``, whose
    shapes differ from their input, so ``mode="residual"`` is refused). Layer granularity gates every
    resnet (output mode: a resnet may change the channel count) and every attention (residual mode
    under ``"auto"``: attentions keep the shape, so replaying ``attn(x') - x'`` on today's ``x``
    keeps the work of the layers before it). Layers have no cascade: inside a block the skip
    tensors of a reused layer's input are still read by the up path, so "every layer is needed" is
    the exact, simple rule (costs are never underestimated).
    """

    def _blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        blocks = [(f"down_blocks.{i}", b) for i, b in enumerate(model.down_blocks)]
        if getattr(model, "mid_block", None) is not None:
            blocks.append(("mid_block", model.mid_block))
        blocks += [(f"up_blocks.{j}", b) for j, b in enumerate(model.up_blocks)]
        return blocks

    def units(self, model: nn.Module, granularity: str, mode: str) -> list[ReuseUnit]:
        _check(granularity, mode)
        if granularity == "block":
            if mode == "residual":
                raise ValueError(
                    "mode='residual' needs blocks that keep their input's shape; UNet blocks change it "
                    "(down blocks also return skip tensors): use mode='output' or 'auto'"
                )
            return [ReuseUnit(name, block, "output") for name, block in self._blocks(model)]
        units: list[ReuseUnit] = []
        for name, block in self._blocks(model):
            for kind in ("resnets", "attentions"):
                for k, layer in enumerate(getattr(block, kind, None) or []):
                    if layer is None:  # UNetMidBlock2D keeps None for disabled attention
                        continue
                    unit_mode = mode if mode != "auto" else ("residual" if kind == "attentions" else "output")
                    units.append(ReuseUnit(f"{name}.{kind}.{k}", layer, unit_mode))
        return sorted(units, key=lambda u: _execution_key(u.name))

    def graph(self, model: nn.Module, units: list[ReuseUnit], granularity: str) -> ConsumerGraph:
        if granularity == "layer":
            return ConsumerGraph.independent(len(units))
        return unet_block_graph(model)


def _execution_key(name: str) -> tuple[int, int, int]:
    """Order layer names as a UNet runs them: down, mid, up; inside a block ``resnets.k`` runs
    before ``attentions.k``, which runs before ``resnets.k+1`` (the mid block too)."""
    parts = name.split(".")
    stage = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}[parts[0]]
    block = int(parts[1]) if stage != 1 else 0
    kind, k = parts[-2], int(parts[-1])
    return (stage, block, 2 * k + (1 if kind == "attentions" else 0))


def unet_block_graph(model: nn.Module) -> ConsumerGraph:
    """Consumers of each UNet block, from the block structure.

    Hidden states flow down -> mid -> up in a chain. Skip tensors: ``conv_in`` gives one, each down
    block adds ``len(resnets)`` plus one per downsampler; each up block pops ``len(resnets)`` from
    the end of that stack, so a down block's output is also read by the up blocks that pop its
    skip tensors. The last up block feeds the output head (always needed).
    """
    n_down, has_mid, n_up = len(model.down_blocks), model.mid_block is not None, len(model.up_blocks)
    n = n_down + int(has_mid) + n_up
    consumers: list[set[int]] = [{b + 1} if b + 1 < n else set() for b in range(n)]
    owners: list[int | None] = [None]  # conv_in's sample
    for i, down in enumerate(model.down_blocks):
        owners += [i] * (len(down.resnets) + len(getattr(down, "downsamplers", None) or []))
    up_offset = n_down + int(has_mid)
    for j, up in enumerate(model.up_blocks):
        k = len(up.resnets)
        popped, owners = owners[-k:], owners[:-k]
        for owner in popped:
            if owner is not None:
                consumers[owner].add(up_offset + j)
    return ConsumerGraph(consumers=tuple(tuple(sorted(c)) for c in consumers),
                         always_needed=tuple(b == n - 1 for b in range(n)))


class TransformerAdapter(ReuseAdapter):
    """Denoisers made of a list of transformer blocks (DiT, PixArt, ...), found under ``attr``.

    Block granularity: ``"residual"`` (the default under ``"auto"``, FORA / Learning-to-Cache
    style; every block stays needed, no cascade) or ``"output"`` (a reused block returns its whole
    cached output; the chain cascade then skips the blocks before it that nobody reads).
    Layer granularity gates each block's ``attn1`` / ``attn2`` / ``ff`` submodules in output mode:
    they read a normalised copy of the hidden states and their result is added back by the block,
    so reusing their output is FORA's attention/MLP caching; no cascade.
    """

    SUBLAYERS: tuple[str, ...] = ("attn1", "attn2", "ff")

    def __init__(self, attr: str = "transformer_blocks") -> None:
        self.attr = attr

    def units(self, model: nn.Module, granularity: str, mode: str) -> list[ReuseUnit]:
        _check(granularity, mode)
        blocks = getattr(model, self.attr)
        if granularity == "block":
            block_mode = "residual" if mode == "auto" else mode
            return [ReuseUnit(f"{self.attr}.{i}", b, block_mode) for i, b in enumerate(blocks)]
        if mode == "residual":
            raise ValueError(
                "layer granularity on transformer blocks reuses attention/MLP outputs (they are not residual "
                "functions of their input): use mode='output' or 'auto'"
            )
        units = [
            ReuseUnit(f"{self.attr}.{i}.{sub}", getattr(b, sub), "output")
            for i, b in enumerate(blocks) for sub in self.SUBLAYERS if isinstance(getattr(b, sub, None), nn.Module)
        ]
        if not units:
            raise UnsupportedModelError(
                f"{type(model).__name__}'s {self.attr} have none of the submodules {', '.join(self.SUBLAYERS)}: "
                "use granularity='block'"
            )
        return units

    def graph(self, model: nn.Module, units: list[ReuseUnit], granularity: str) -> ConsumerGraph:
        if granularity == "block" and all(u.mode == "output" for u in units):
            return ConsumerGraph.chain(len(units))
        return ConsumerGraph.independent(len(units))


_REGISTRY: dict[type, ReuseAdapter] = {}


def register_reuse_adapter(*model_classes: type) -> Callable[[type[ReuseAdapter]], type[ReuseAdapter]]:
    """Class decorator: use this adapter (instantiated without arguments) for ``model_classes``."""

    def decorator(adapter_cls: type[ReuseAdapter]) -> type[ReuseAdapter]:
        for cls in model_classes:
            _REGISTRY[cls] = adapter_cls()
        return adapter_cls

    return decorator


_builtin_registered = False


def _register_diffusers() -> None:
    """Register the diffusers classes we test against, once (imports are local: diffusers is heavy).

    User registrations win: built-ins never overwrite a class that already has an adapter.
    """
    global _builtin_registered
    if _builtin_registered:
        return
    from diffusers import DiTTransformer2DModel, UNet2DConditionModel, UNet2DModel

    builtins = {UNet2DModel: UNetAdapter, UNet2DConditionModel: UNetAdapter, DiTTransformer2DModel: TransformerAdapter}
    for cls, adapter_cls in builtins.items():
        _REGISTRY.setdefault(cls, adapter_cls())
    _builtin_registered = True


def get_reuse_adapter(model: nn.Module) -> ReuseAdapter:
    """The registered adapter for the model's class (or a base class), else one found by attribute names."""
    _register_diffusers()
    for cls in type(model).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    if _module_list(model, "down_blocks") is not None and _module_list(model, "up_blocks") is not None:
        return UNetAdapter()
    for attr in ("transformer_blocks", "blocks"):
        if _module_list(model, attr) is not None:
            return TransformerAdapter(attr)
    raise UnsupportedModelError(
        f"{type(model).__name__} has no blocks the reuse gates know: looked for the attributes "
        f"{', '.join(BLOCK_ATTRIBUTES)} (register an adapter with @register_reuse_adapter for other layouts)"
    )
