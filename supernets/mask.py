"""The ``mask`` gate kind: learned per-layer sparsity under one global budget.

Every prunable ``nn.Linear`` / ``nn.Conv2d`` is one slot. The pruner's keep probability of a slot
is read as that layer's *density* ``d`` (1 - sparsity), and the differentiable bridge from ``d``
to a mask is a threshold on rank-normalised saliency (FCPTS's idea, in rank space so that one
temperature fits every layer):

    u = rank(saliency) / numel            # (out, in) in [0, 1): the weight's saliency quantile
    soft = sigmoid((u - (1 - d)) / T)     # keeps about d of the weights, differentiable in d
    mask = hard(u >= 1 - d) + soft - soft.detach()   # straight-through: forward = the real mask

So the threshold is the saliency quantile at ``1 - d``; ``sum(d_i * cost_i) / sum(cost_i)`` is
the global density (parameter- or MACs-weighted), and the search loop's cost controller drives
it to ``search.target`` exactly as it does for the other kinds. Saliency is ``|W|`` (magnitude)
or Wanda's ``|W| * ||X_j||`` with input-column norms from calibration data.

Patterns: ``unstructured`` (rank over the whole weight), ``block16`` / ``block32`` (rank over
summed block saliency, one decision per block, the layout the block-sparse kernels run),
``rowblock16`` / ``rowblock32`` (balanced row blocks: every block-row of ``b`` output rows keeps
the same number of its most salient column blocks, so each kernel thread gets the same work) and
``N:M`` (fixed density N/M per layer: the mask is the N most salient of every M inputs, so the
slot's density is a constant and the search has nothing to allocate there). A layer whose shape
cannot hold the pattern is refused with one sentence and left dense (or the whole run is refused
with ``strict_pattern``).
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from dipgo.supernets.gates import GateSlot

OutputFn = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]
PATTERNS: tuple[str, ...] = ("unstructured", "2:4", "4:8", "block16", "block32", "rowblock16", "rowblock32")
SALIENCIES: tuple[str, ...] = ("magnitude", "wanda")
DEFAULT_EXCLUDE: tuple[str, ...] = (r"(.*\.)?pooler(\..*)?", r"(.*\.)?(classifier|head|fc|lm_head)")


class PatternError(ValueError):
    """A sparsity pattern a layer (or the config) cannot hold."""


@dataclass(frozen=True)
class Pattern:
    """A parsed sparsity pattern: ``kind`` is unstructured | nm | block | rowblock."""

    name: str
    kind: str
    n: int = 0
    m: int = 0
    block: int = 0

    @property
    def fixed_density(self) -> float | None:
        return self.n / self.m if self.kind == "nm" else None

    @property
    def blocked(self) -> bool:
        """One decision per ``block x block`` tile (``block`` or ``rowblock``): masks come from block
        saliency before any OBS update, and the layer can run on the block-sparse kernel."""
        return self.kind in ("block", "rowblock")


def parse_pattern(name: str) -> Pattern:
    """``"unstructured"``, ``"N:M"`` (``2:4``, ``4:8``), ``"blockB"`` or ``"rowblockB"`` (B = 16, 32, 64)."""
    name = str(name).strip()
    if name == "unstructured":
        return Pattern(name, "unstructured")
    if (nm := re.fullmatch(r"(\d+):(\d+)", name)) and 0 < int(nm[1]) < int(nm[2]):
        return Pattern(name, "nm", n=int(nm[1]), m=int(nm[2]))
    if (bl := re.fullmatch(r"block(\d+)", name)) and int(bl[1]) in (16, 32, 64):
        return Pattern(name, "block", block=int(bl[1]))
    if (rb := re.fullmatch(r"rowblock(\d+)", name)) and int(rb[1]) in (16, 32, 64):
        return Pattern(name, "rowblock", block=int(rb[1]))
    raise PatternError(f"sparsity pattern {name!r} is not supported; accepted: unstructured, N:M with N < M "
                       f"(2:4, 4:8), block16, block32, block64, rowblock16, rowblock32, rowblock64")


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as ``(out, in)``: a conv's ``(out, in/groups * kh * kw)``."""
    w = module.weight
    return w if w.dim() == 2 else w.reshape(w.shape[0], -1)


def pattern_refusal(path: str, module: nn.Module, pattern: Pattern) -> str | None:
    """``None`` if the layer can hold ``pattern``, else one sentence saying why not."""
    out_f, in_f = weight_matrix(module).shape
    what = f"layer {path} ({type(module).__name__}, weight {out_f}x{in_f})"
    if pattern.kind == "nm" and in_f % pattern.m:
        return f"{what}: pattern {pattern.name} needs an input dim divisible by {pattern.m}; left dense"
    if pattern.blocked:
        b = pattern.block
        if b > out_f or b > in_f:
            return f"{what}: block {b}x{b} is larger than the weight; left dense"
        if out_f % b or in_f % b:
            return f"{what}: pattern {pattern.name} needs both dims divisible by {b}; left dense"
        if not isinstance(module, nn.Linear):
            return f"{what}: block patterns run on the Linear kernel only; left dense"
    return None


def block_saliency(saliency: torch.Tensor, block: int) -> torch.Tensor:
    """Summed saliency per ``block x block`` tile: ``(out/b, in/b)``."""
    o, i = saliency.shape
    return saliency.float().reshape(o // block, block, i // block, block).sum(dim=(1, 3))


def _quantiles(s: torch.Tensor) -> torch.Tensor:
    """Rank of every entry of ``s`` over the whole tensor, divided by its size: ``[0, 1)``."""
    flat = s.flatten()
    ranks = torch.empty_like(flat)
    ranks[flat.argsort()] = torch.arange(flat.numel(), dtype=flat.dtype)
    return (ranks / flat.numel()).reshape(s.shape)


def rowblock_ranks(block_sal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r, q)`` of block saliency ``(R, C)``: ``r`` the rank of each block within its block-row
    (``0..C-1``, ascending), ``q`` in ``(0, 1)`` its rank among the blocks of equal ``r`` in the other
    block-rows (a tie-break that only orders blocks, never changes a row's count)."""
    rows, cols = block_sal.shape
    vals, idx = block_sal.sort(dim=1, stable=True)  # (R, C) ascending within each block-row
    across = torch.empty_like(vals)
    order = vals.argsort(dim=0, stable=True)  # (R, C): per within-row rank, rows by saliency
    across.scatter_(0, order, torch.arange(rows, dtype=vals.dtype)[:, None].expand(rows, cols).contiguous())
    r = torch.empty_like(vals).scatter_(1, idx, torch.arange(cols, dtype=vals.dtype)[None, :].expand(rows, cols).contiguous())
    q = torch.empty_like(vals).scatter_(1, idx, (across + 0.5) / rows)
    return r, q


def rank_scores(saliency: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Saliency quantiles ``u`` in ``[0, 1)`` of the weight's shape (per block for block patterns).

    ``rowblock``: ``u = (r + q) / C`` with ``r`` the block's rank within its block-row of ``C``
    column blocks and ``q`` in ``(0, 1)`` a tie-break across block-rows, so ``u >= 1 - k / C`` keeps
    exactly the top ``k`` blocks of every block-row, while a density between two multiples of
    ``1 / C`` adds the next block in only some rows: the kept fraction still tracks ``d`` finely,
    and the sigmoid bridge sees closely spaced ``u`` (a useful gradient in ``d``).
    """
    s = saliency.float()
    if pattern.kind == "rowblock":
        r, q = rowblock_ranks(block_saliency(s, pattern.block))
        u = (r + q) / r.shape[1]  # (O/b, I/b)
    elif pattern.kind == "block":
        u = _quantiles(block_saliency(s, pattern.block))  # (O/b, I/b)
    else:
        return _quantiles(s)
    return u.repeat_interleave(pattern.block, 0).repeat_interleave(pattern.block, 1)


def rowblock_count(density: float, in_features: int, block: int) -> int:
    """Column blocks every block-row keeps: ``round(density * in/b)`` clamped to ``[1, in/b]``."""
    cols = in_features // block
    return min(max(round(float(density) * cols), 1), cols)


def rowblock_mask(score: torch.Tensor, density: float, block: int) -> torch.Tensor:
    """Bool mask ``(out, in)`` keeping the same :func:`rowblock_count` most salient blocks in every block-row."""
    r, _ = rowblock_ranks(block_saliency(score, block))
    k = rowblock_count(density, score.shape[1], block)
    keep = r >= r.shape[1] - k  # (O/b, I/b)
    return keep.repeat_interleave(block, 0).repeat_interleave(block, 1)


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool mask keeping the ``n`` highest scores of every ``m`` consecutive inputs of each row."""
    o, i = score.shape
    groups = score.reshape(o, i // m, m)
    top = groups.topk(n, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
    return mask.reshape(o, i)


def density_mask(score: torch.Tensor, density: float, pattern: Pattern) -> torch.Tensor:
    """Hard bool mask at ``density`` from raw saliency ``score`` ``(out, in)`` under ``pattern``.

    Keeps the ``round(density * n)`` most salient of the ``n`` weights (blocks): the threshold sits
    half a rank below ``1 - density``, so a plan density rounded to a few decimals (plans store 6)
    still keeps the whole number of units the plan counted.
    """
    if pattern.kind == "nm":
        return nm_mask(score, pattern.n, pattern.m)
    if pattern.kind == "rowblock":
        return rowblock_mask(score, density, pattern.block)
    u = rank_scores(score, pattern)
    n = score.numel() // (pattern.block * pattern.block) if pattern.kind == "block" else score.numel()
    return u >= 1.0 - density - 0.5 / n


def is_valid_nm(mask: torch.Tensor, n: int, m: int) -> bool:
    """At most ``n`` kept of every ``m`` consecutive inputs in each row."""
    o, i = mask.shape
    return bool((mask.reshape(o, i // m, m).sum(-1) <= n).all())


def find_prunable(model: nn.Module, exclude: tuple[str, ...] = DEFAULT_EXCLUDE) -> list[str]:
    """Module paths of every ``nn.Linear`` / ``nn.Conv2d`` not matched by ``exclude`` (registration order)."""
    regex = re.compile("|".join(f"(?:{p})" for p in exclude)) if exclude else None
    return [name for name, mod in model.named_modules()
            if isinstance(mod, (nn.Linear, nn.Conv2d)) and not (regex and regex.fullmatch(name))]


@torch.no_grad()
def input_norms(model: nn.Module, layers: list[str], batches: list[dict[str, torch.Tensor]],
                output_fn: OutputFn) -> dict[str, torch.Tensor]:
    """``||X_j||_2`` per input column of each layer over all calibration tokens (Wanda's activation norm).

    Conv layers: per input channel, repeated over the kernel positions (the unfolded columns).
    Padding tokens are included, as Wanda does on its calibration text.
    """
    sq: dict[str, torch.Tensor] = {}

    def hook_for(path: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().float()
            if isinstance(module, nn.Conv2d):
                v = x.pow(2).sum(dim=(0, 2, 3))  # (C_in,)
                v = v.repeat_interleave(module.weight[0, 0].numel())
            else:
                v = x.reshape(-1, x.shape[-1]).pow(2).sum(0)  # (in,)
            sq[path] = sq.get(path, 0) + v

        return hook

    handles = [model.get_submodule(p).register_forward_pre_hook(hook_for(p)) for p in layers]
    try:
        for batch in batches:
            output_fn(model, batch)
    finally:
        for h in handles:
            h.remove()
    return {p: sq[p].sqrt() for p in layers if p in sq}


def saliency_of(module: nn.Module, kind: str, norm: torch.Tensor | None) -> torch.Tensor:
    """``|W|`` or ``|W| * ||X_j||`` as ``(out, in)``."""
    w = weight_matrix(module).detach().float().abs()
    if kind == "wanda":
        if norm is None:
            raise ValueError("wanda saliency needs calibration input norms for every layer")
        return w * norm.to(w)[None, :]
    return w


def layer_costs(model: nn.Module, layers: list[str], example: dict[str, torch.Tensor], output_fn: OutputFn,
                weighting: str) -> list[float]:
    """Per-layer cost: parameter count of the weight, or MACs per batch element (weight x positions)."""
    if weighting == "params":
        return [float(weight_matrix(model.get_submodule(p)).numel()) for p in layers]
    positions: dict[str, int] = {}

    def hook_for(path: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            positions[path] = output[0].numel() // output.shape[-1 if isinstance(module, nn.Linear) else 1]

        return hook

    handles = [model.get_submodule(p).register_forward_hook(hook_for(p)) for p in layers]
    try:
        with torch.no_grad():
            output_fn(model, {k: v[:1] for k, v in example.items()})
    finally:
        for h in handles:
            h.remove()
    return [float(weight_matrix(model.get_submodule(p)).numel() * positions.get(p, 0)) for p in layers]


@dataclass
class MaskGateConfig:
    """How the mask gates are built.

    Attributes:
        pattern: unstructured | 2:4 | 4:8 | block16 | block32 | rowblock16 | rowblock32.
        saliency: magnitude (``|W|``) | wanda (``|W| * ||X_j||`` from calibration inputs).
        cost_weighting: params | macs: what the global sparsity averages over.
        strict_pattern: refuse the whole run when a layer cannot hold the pattern (else leave it dense).
        temperature: width of the sigmoid bridge in saliency-quantile units.
        min_density: smallest density a layer may get (keeps every layer alive).
        exclude: regexes of module paths never pruned (pooler, classifier heads).
    """

    pattern: str = "unstructured"
    saliency: str = "wanda"
    cost_weighting: str = "params"
    strict_pattern: bool = False
    temperature: float = 0.02
    min_density: float = 0.05
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE


_INSTALLED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


class MaskSuperNet:
    """A frozen model whose prunable layers compute with a soft, density-controlled mask.

    ``gate_mode = "soft"``: the search loop feeds keep probabilities (densities) directly instead
    of Gumbel samples, since a density is a continuous quantity, not an on/off decision.
    """

    kind = "mask"
    gate_mode = "soft"

    def __init__(self, model: nn.Module, layers: list[str], costs: list[float], saliency: dict[str, torch.Tensor],
                 pattern: Pattern, config: MaskGateConfig, output_fn: OutputFn,
                 refused: dict[str, str], norms: dict[str, torch.Tensor] | None = None) -> None:
        if model in _INSTALLED:
            raise RuntimeError(f"{type(model).__name__} already has mask gates: call remove() on that SuperNet first")
        self.model, self.layers, self.output_fn = model, list(layers), output_fn
        self.pattern, self.config, self.refused = pattern, config, dict(refused)
        self.saliency = saliency  # path -> (out, in) raw saliency
        self.norms = norms or {}
        self.slots = [GateSlot(name=p, kind="mask", block=p, cost=float(c)) for p, c in zip(layers, costs)]
        self._costs = torch.tensor(costs, dtype=torch.float64)  # (N,)
        # (N,) the density a layer's pattern fixes (N:M), -1 where it is learned: public, the joint
        # searches fit and floor only the learned ones
        self.fixed_densities = torch.tensor([self.fixed_density(p) if self.fixed_density(p) is not None else -1.0
                                             for p in layers], dtype=torch.float64)
        self._rank = {p: rank_scores(saliency[p], pattern) for p in layers
                      if p not in refused and pattern.kind != "nm"}
        self._nm = {p: nm_mask(saliency[p], pattern.n, pattern.m) for p in layers
                    if p not in refused and pattern.kind == "nm"}
        self._gates: torch.Tensor | None = None
        self._grads = [(q, q.requires_grad) for q in model.parameters()]
        self._modes = [(m, m.training) for m in model.modules()]
        model.requires_grad_(False).eval()
        self._handles: list[RemovableHandle] = [
            model.get_submodule(p).register_forward_hook(self._hook(i, p)) for i, p in enumerate(self.layers)
        ]
        _INSTALLED.add(model)

    def fixed_density(self, path: str) -> float | None:
        """1.0 for a refused layer, N/M for N:M, ``None`` where the search decides."""
        if path in self.refused:
            return 1.0
        return self.pattern.fixed_density

    def effective(self, gates: torch.Tensor) -> torch.Tensor:
        """``(N,)`` densities: the gates where learned, the fixed ones elsewhere."""
        fixed = self.fixed_densities.to(gates)
        return torch.where(fixed >= 0, fixed, gates)

    def soft_mask(self, path: str, density: torch.Tensor) -> torch.Tensor:
        """Straight-through mask ``(out, in)``: forward hard at ``density``, gradient of the sigmoid bridge."""
        if path in self._nm:
            return self._nm[path].float()
        u = self._rank[path].to(density.device)
        thr = 1.0 - density
        soft = torch.sigmoid((u - thr) / self.config.temperature)
        hard = (u >= thr).to(soft.dtype)
        return hard + soft - soft.detach()

    def _hook(self, idx: int, path: str) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> Any:
            if self._gates is None or path in self.refused:
                return None
            m = self.soft_mask(path, self._gates[idx])
            w = module.weight * m.reshape(module.weight.shape).to(module.weight)
            if isinstance(module, nn.Conv2d):
                return module._conv_forward(args[0], w, module.bias)
            return F.linear(args[0], w, module.bias)

        return hook

    def full_cost(self) -> float:
        """Total cost of the prunable layers (parameters or MACs per element)."""
        return float(self._costs.sum())

    def expected_cost(self, gates: torch.Tensor) -> torch.Tensor:
        """Global density ``sum(d_i c_i) / sum(c_i)``, differentiable in ``gates``."""
        self._check(gates)
        return (self.effective(gates) * self._costs.to(gates)).sum() / self._costs.sum().to(gates)

    def reference(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {"output": self.output_fn(self.model, batch)}

    def set_densities(self, densities: torch.Tensor | None) -> None:
        """Make the hooked layers compute with these ``(N,)`` effective densities until changed
        (``None``: the dense weights). A joint SuperNet sets them around its structural gates."""
        self._gates = densities

    def gated(self, batch: dict[str, torch.Tensor], gates: torch.Tensor) -> dict[str, torch.Tensor]:
        self._check(gates)
        self.set_densities(self.effective(gates.clamp(min=self.config.min_density, max=1.0)))
        try:
            return {"output": self.output_fn(self.model, batch)}
        finally:
            self.set_densities(None)

    def _check(self, gates: torch.Tensor) -> None:
        if gates.shape != (len(self.layers),):
            raise ValueError(f"gates must have shape ({len(self.layers)},) (one per layer), got {tuple(gates.shape)}")

    def remove(self) -> nn.Module:
        """Remove the hooks and restore the model's flags; returns the (unchanged) model."""
        for h in self._handles:
            h.remove()
        self._handles = []
        if self.model in _INSTALLED:
            for q, flag in self._grads:
                q.requires_grad_(flag)
            for m, flag in self._modes:
                m.training = flag
            _INSTALLED.discard(self.model)
        return self.model


def check_layers(model: nn.Module, layers: list[str], pattern: Pattern, strict: bool) -> dict[str, str]:
    """``{path: refusal sentence}`` for layers that cannot hold ``pattern``; raise when ``strict``."""
    refused = {}
    for p in layers:
        msg = pattern_refusal(p, model.get_submodule(p), pattern)
        if msg is not None:
            if strict:
                raise PatternError(msg.replace("; left dense", "") + " (strict_pattern=true refuses the run)")
            refused[p] = msg
    return refused


def apply_mask_gates(model: nn.Module, example: dict[str, torch.Tensor], output_fn: OutputFn,
                     config: MaskGateConfig | None = None,
                     calibration: list[dict[str, torch.Tensor]] | None = None) -> MaskSuperNet:
    """Wrap ``model`` into a :class:`MaskSuperNet` (frozen, eval mode, hooks installed).

    ``example``: one batch ``output_fn`` accepts (MACs per element); ``calibration``: batches for
    Wanda's input norms (default: ``[example]``).
    """
    config = config or MaskGateConfig()
    pattern = parse_pattern(config.pattern)
    if config.saliency not in SALIENCIES:
        raise ValueError(f"saliency {config.saliency!r} is not supported; accepted: {', '.join(SALIENCIES)}")
    if config.cost_weighting not in ("params", "macs"):
        raise ValueError(f"cost_weighting {config.cost_weighting!r} is not supported; accepted: params, macs")
    layers = find_prunable(model, tuple(config.exclude))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Linear or Conv2d layer to prune")
    refused = check_layers(model, layers, pattern, config.strict_pattern)
    was_training = model.training
    model.eval()
    norms = input_norms(model, layers, calibration or [example], output_fn)
    layers = [p for p in layers if p in norms]  # only layers the forward reaches
    costs = layer_costs(model, layers, example, output_fn, config.cost_weighting)
    model.train(was_training)
    saliency = {p: saliency_of(model.get_submodule(p), config.saliency, norms.get(p)) for p in layers}
    return MaskSuperNet(model, layers, costs, saliency, pattern, config, output_fn,
                        {p: m for p, m in refused.items() if p in layers}, norms)
