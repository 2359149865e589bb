"""The ``block`` gate kind: depth pruning, one gate per shape-preserving residual block.

A residual block ``y = f(x)`` whose output has its input's shape can be replaced by the identity
without touching anything around it, so removing it is a pure *depth* cut that timm and
transformers can rebuild from a config (fewer ``depths`` / ``num_hidden_layers``). The gated
block computes ``g * f(x) + (1 - g) * x``: ``g = 1`` is the original block bit for bit, ``g = 0``
is exactly the identity that physical removal gives, and any ``g`` in between is differentiable.
Gating the whole block output (not its residual branch) is what makes layer scale, drop path and
pre-norm irrelevant: whatever the block does inside, a closed gate is the removed block.

Blocks are found like diffusers finds its cache targets: containers at known attribute paths
(:data:`CONTAINER_PATTERNS`: ``layer1``..``layer4``, ``stages.i.blocks``, ``blocks``,
``encoder.layer``...), or a finder registered with :func:`register_block_finder` for layouts the
patterns miss. Children of a container are candidates; structural signs (a ``downsample``
module, ``has_skip=False``, a stride) drop the ones that change shape, and with an example batch
a shape-recording forward settles it. Gates are forward hooks, so the model stays a plain
timm / transformers model and :meth:`BlockSuperNet.remove` leaves it untouched.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from dipgo.errors import UnsupportedModelError
from dipgo.measure.macs import count_macs
from dipgo.supernets.gates import GateSlot, freeze

# (model, batch) -> the tensor the distortion compares (logits, pooled embedding...)
OutputFn = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]
# model -> candidate block paths, in forward order
BlockFinder = Callable[[nn.Module], list[str]]

CONTAINER_PATTERNS: tuple[str, ...] = (
    r"layer\d+",  # ResNet / ResNeXt / ResNeSt / Res2Net: layer1..layer4
    r"s\d+",  # RegNet: s1..s4 (RegStage, children b1, b2, ...)
    r"(stages|layers|levels|transformers|network)\.\d+\.blocks",  # ConvNeXt, MetaFormer, Swin, PiT, ...
    r"stages\.\d+",  # a stage that is itself a list of blocks (ResNetV2-like, LeViT...)
    r"blocks\.\d+",  # EfficientNet / MobileNet / MNASNet / GhostNet stages
    r"blocks",  # ViT / DeiT / BEiT / EVA / CaiT, MLP-Mixer / ResMLP, ConvMixer
    r"(.+\.)?encoder\.layers?",  # transformers encoders (BERT-like): encoder.layer.i
)
# Shown in errors: what discovery looked for, in words.
LOOKED_FOR = (
    "layer1..layerN, s1..sN, stages.i.blocks, layers.i.blocks, transformers.i.blocks, stages.i, "
    "blocks.i, blocks, encoder.layer"
)

# Small-width kwargs per architecture: the SuperNet tests run over all of them, the lead's
# scripts can reuse the list. Layer scale / zero-init are switched off so that random blocks are
# not near-identities (a removed block must change the output for the tests to mean something).
TIMM_COVERAGE: tuple[tuple[str, dict[str, Any]], ...] = (
    # ResNet family (BasicBlock, Bottleneck, deep stem, grouped, wide, SE, split attention)
    ("resnet18", dict(channels=(8, 16, 32, 64), stem_width=8, zero_init_last=False)),
    ("resnet50", dict(channels=(8, 16, 32, 64), stem_width=8, zero_init_last=False)),
    ("resnet26d", dict(channels=(8, 16, 32, 64), stem_width=8, zero_init_last=False)),
    ("resnext50_32x4d", dict(channels=(16, 32, 64, 128), stem_width=8, zero_init_last=False)),
    ("wide_resnet50_2", dict(channels=(8, 16, 32, 64), stem_width=8, zero_init_last=False)),
    ("seresnet18", dict(channels=(8, 16, 32, 64), stem_width=8, zero_init_last=False)),
    ("resnest14d", dict(channels=(8, 16, 32, 64), stem_width=8, layers=(2, 2, 1, 1), zero_init_last=False)),
    ("resnetv2_50", dict(channels=(8, 16, 32, 64), stem_chs=8)),
    ("regnetx_002", dict()),
    ("regnety_002", dict()),
    # ConvNeXt-like and other modern CNNs
    ("convnext_atto", dict(dims=(8, 16, 32, 64), depths=(2, 2, 2, 2), ls_init_value=1.0)),
    ("convnextv2_atto", dict(dims=(8, 16, 32, 64), depths=(2, 2, 2, 2), ls_init_value=1.0)),
    ("inception_next_atto", dict(dims=(8, 16, 32, 64), depths=(2, 2, 2, 2), ls_init_value=1.0)),
    ("mambaout_femto", dict(dims=(8, 16, 32, 64), depths=(2, 2, 2, 2))),
    ("starnet_s050", dict(base_dim=8, depths=(2, 2, 2, 2))),
    ("fastvit_t8", dict(embed_dims=(8, 16, 32, 64), layers=(2, 2, 2, 2), layer_scale_init_value=1.0)),
    ("fasternet_t0", dict(embed_dim=8, depths=(2, 2, 2, 2))),
    ("repvit_m0_9", dict(embed_dim=(8, 16, 32, 64), depth=(2, 2, 2, 2))),
    ("poolformer_s12", dict()),
    # inverted residuals (MobileNet / EfficientNet builders) and GhostNet
    ("efficientnet_b0", dict()),
    ("mobilenetv2_050", dict()),
    ("mobilenetv3_small_050", dict()),
    ("mnasnet_small", dict()),
    ("ghostnet_050", dict()),
    # plain vision transformers
    ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)),
    ("deit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)),
    ("deit_tiny_distilled_patch16_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)),
    ("beit_base_patch16_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, init_values=1.0)),
    ("eva02_tiny_patch14_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)),
    ("vit_relpos_small_patch16_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)),
    ("cait_xxs24_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, init_values=1.0)),
    ("xcit_nano_12_p16_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)),
    ("convit_tiny", dict(img_size=32, patch_size=8, embed_dim=32, depth=5, num_heads=2, local_up_to_layer=1)),
    # hierarchical transformers / MLPs
    ("swin_tiny_patch4_window7_224",
     dict(img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2))),
    ("swinv2_tiny_window8_256",
     dict(img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2))),
    ("pit_ti_224", dict(img_size=32, patch_size=4, stride=2, base_dims=(8, 8), depth=(2, 2), heads=(2, 4))),
    ("levit_128s", dict(img_size=32, embed_dim=(16, 32, 48), key_dim=8, depth=(2, 2, 2), num_heads=(2, 2, 2))),
    ("pvt_v2_b0", dict(embed_dims=(8, 16, 32, 64), num_heads=(1, 1, 2, 2), depths=(2, 2, 2, 2))),
    ("edgenext_xx_small", dict(dims=(8, 16, 32, 64), depths=(2, 2, 2, 2), heads=(1, 1, 1, 1))),
    ("davit_tiny", dict(embed_dims=(8, 16, 32, 64), depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 2))),
    ("twins_svt_small", dict(img_size=32, embed_dims=(8, 16, 32, 64), depths=(3, 3, 3, 3), num_heads=(1, 1, 2, 2),
                             wss=(2, 2, 2, 2))),
    ("gmlp_ti16_224", dict(img_size=32)),
)


class BlockShapeError(ValueError):
    """A gated block returned something other than a tensor of its input's shape."""


# ----------------------------------------------------------------------------- discovery

_FINDERS: dict[type, BlockFinder] = {}


def register_block_finder(*model_classes: type) -> Callable[[BlockFinder], BlockFinder]:
    """Decorator: ``fn(model) -> candidate block paths`` (in forward order) for ``model_classes``.

    For layouts :data:`CONTAINER_PATTERNS` does not reach, or families where some shape-keeping
    blocks must not be removed because the model's forward refers to them by index. Shape
    changers among the returned paths are still dropped by :func:`find_blocks`.
    """

    def decorator(fn: BlockFinder) -> BlockFinder:
        for cls in model_classes:
            _FINDERS[cls] = fn
        return fn

    return decorator


def _is_block_list(module: nn.Module) -> bool:
    """A container holds blocks when some child is a composite module and no child is a single
    layer with weights (a leaf Conv2d / Linear / norm). That tells EfficientNet's ``blocks.i``
    (inverted residuals) from ConvMixer's ``blocks.i`` (a conv, an activation, a norm), and lets a
    parameter-free leaf such as EfficientFormer's ``Flat`` sit between blocks."""
    children = list(module.children())
    composite = [any(True for _ in c.children()) for c in children]
    weighted_leaf = any(not comp and any(True for _ in c.parameters()) for c, comp in zip(children, composite))
    return any(composite) and not weighted_leaf


def _pattern_containers(model: nn.Module) -> list[str]:
    """Paths matching :data:`CONTAINER_PATTERNS` that hold blocks, innermost only."""
    regex = re.compile("|".join(f"(?:{p})" for p in CONTAINER_PATTERNS))
    found = [name for name, mod in model.named_modules() if name and regex.fullmatch(name) and _is_block_list(mod)]
    return [p for p in found if not any(q.startswith(p + ".") for q in found)]


def find_containers(model: nn.Module) -> list[str]:
    """Module paths of the containers whose children are the candidate blocks (registration order).

    Raises :class:`UnsupportedModelError` naming the class and what was looked for when there is none.
    """
    containers = _pattern_containers(model)
    if not containers:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no residual blocks the block gates know: looked for containers at "
            f"{LOOKED_FOR} (register a finder with @register_block_finder for other layouts)"
        )
    return containers


def _changes_shape(block: nn.Module) -> bool:
    """Structural signs that a child is no removable block (no example needed).

    No parameters (a reshape or pooling between blocks), a projection shortcut (``downsample`` /
    ``shortcut`` that is a real module), no skip at all (``has_skip`` / ``has_residual`` False,
    timm's inverted residuals) or a stride other than 1.
    """
    if not any(True for _ in block.parameters()):
        return True  # a reshape / pooling between blocks (nothing to remove)
    for attr in ("downsample", "shortcut"):
        value = getattr(block, attr, None)
        if isinstance(value, nn.Module) and not isinstance(value, nn.Identity) and len(list(value.parameters())) > 0:
            return True
    if getattr(block, "has_skip", True) is False or getattr(block, "has_residual", True) is False:
        return True
    stride = getattr(block, "stride", 1)
    return isinstance(stride, (int, tuple)) and any(s != 1 for s in (stride if isinstance(stride, tuple) else (stride,)))


def _structural_candidates(model: nn.Module) -> list[str]:
    """Children of :func:`find_containers` without structural signs of a shape change."""
    paths = []
    for container in find_containers(model):
        for name, child in model.get_submodule(container).named_children():
            if not _changes_shape(child):
                paths.append(f"{container}.{name}")
    return paths


def _twins_blocks(model: nn.Module) -> list[str]:
    """Twins applies its positional conv after block 0 of each stage (``if j == 0``): removing that
    block would move the conv, so it is no identity-equivalent removal."""
    return [p for p in _structural_candidates(model) if not p.endswith(".0")]


def _convit_blocks(model: nn.Module) -> list[str]:
    """ConViT concatenates the class token before block ``local_up_to_layer`` (by index): its GPSA
    blocks before it and that block itself must stay, or the token would enter at another depth."""
    first_free = int(getattr(model, "local_up_to_layer", 0)) + 1
    return [p for p in _structural_candidates(model) if int(p.rpartition(".")[2]) >= first_free]


# Built-in finders, by class name so that timm is not imported here; registrations win.
_BUILTIN_FINDERS: dict[str, BlockFinder] = {"Twins": _twins_blocks, "ConVit": _convit_blocks}


def _candidates(model: nn.Module) -> list[str]:
    for cls in type(model).__mro__:
        if cls in _FINDERS:
            return list(_FINDERS[cls](model))
        if cls.__name__ in _BUILTIN_FINDERS:
            return _BUILTIN_FINDERS[cls.__name__](model)
    return _structural_candidates(model)


def default_output(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``model(batch["images"])``: logits of a timm classifier."""
    if "images" not in batch:
        raise ValueError(
            f"the default output_fn runs model(batch['images']) (a classifier), but the batch has the keys "
            f"{', '.join(sorted(batch))}: pass output_fn=(model, batch) -> tensor for other models"
        )
    return model(batch["images"])


def _first_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The hidden state a block reads: its first positional tensor, else ``hidden_states`` / ``x``."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for key in ("hidden_states", "x"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key]
    return None


def _hidden_output(output: Any) -> torch.Tensor | None:
    """The hidden state a block returns: the tensor itself or the first element of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def _record_shapes(model: nn.Module, paths: list[str], example: dict[str, torch.Tensor],
                   output_fn: OutputFn) -> dict[str, tuple[int, bool]]:
    """Run the example once; for every candidate called: ``(call order, output shape == input shape)``."""
    seen: dict[str, tuple[int, bool]] = {}

    def hook_for(path: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            x, y = _first_input(args, kwargs), _hidden_output(output)
            keeps = x is not None and y is not None and x.shape == y.shape
            if path not in seen:
                seen[path] = (len(seen), keeps)

        return hook

    handles = [model.get_submodule(p).register_forward_hook(hook_for(p), with_kwargs=True) for p in paths]
    try:
        with torch.no_grad():
            output_fn(model, example)
    finally:
        for h in handles:
            h.remove()
    return seen


def synthetic_example(model: nn.Module) -> tuple[dict[str, torch.Tensor], OutputFn] | None:
    """A one-element batch the model accepts, when its library says what that is.

    timm: an image of the model's current input size (``get_model_input_config``, which knows a
    ViT built with ``img_size=32``); transformers: 8 token ids. ``None`` for other models.
    """
    gen = torch.Generator().manual_seed(0)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    if hasattr(model, "pretrained_cfg") and type(model).__module__.startswith("timm."):
        from timm.models import get_model_input_config

        c, h, w = get_model_input_config(model)["input_size"]
        return {"images": torch.randn(1, c, h, w, generator=gen).to(device, dtype)}, default_output
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab, int) and type(model).__module__.startswith("transformers."):
        ids = torch.randint(0, vocab, (1, 8), generator=gen).to(device)
        return {"input_ids": ids}, lambda m, b: _hidden_output(m(input_ids=b["input_ids"], return_dict=False))
    return None


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for a probing forward (batch norm on one sample, no dropout), flags restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in modes:
            m.training = flag


def find_blocks(model: nn.Module, example: dict[str, torch.Tensor] | None = None,
                output_fn: OutputFn | None = None) -> list[str]:
    """Module paths of the residual blocks that keep their input's shape, in forward order.

    Candidates are the children of :func:`find_containers` minus those with structural signs of a
    shape change (projection shortcut, no skip, stride, no weights). They are then run once on
    ``example`` (one batch ``output_fn`` accepts; for timm and transformers models without one, a
    synthetic batch from :func:`synthetic_example`): blocks whose output shape differs from their
    input's, or that the forward never reaches, are dropped, and the order is the order of calls.
    Raises :class:`UnsupportedModelError` naming the class and what was looked for.
    """
    paths = _candidates(model)
    if example is None and (synthetic := synthetic_example(model)) is not None:
        example, output_fn = synthetic
    if example is not None:
        with _eval_mode(model):
            seen = _record_shapes(model, paths, example, output_fn or default_output)
        paths = sorted((p for p in paths if p in seen and seen[p][1]), key=lambda p: seen[p][0])
    if not paths:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no residual block that keeps its input's shape: looked for containers at "
            f"{LOOKED_FOR} and kept none of their children"
        )
    return paths


def block_signatures(model: nn.Module, blocks: Iterable[str]) -> dict[str, list[Any]]:
    """``{path: [class name, parameter count, blocks in its container]}``.

    Stored in a Plan's meta so that a plan applied to another architecture of the same class
    (resnet18's plan on a resnet34) is refused at the first block that differs.
    """
    out: dict[str, list[Any]] = {}
    for path in blocks:
        block = model.get_submodule(path)
        parent = model.get_submodule(path.rpartition(".")[0])
        out[path] = [type(block).__name__, sum(p.numel() for p in block.parameters()), len(list(parent.children()))]
    return out


# ----------------------------------------------------------------------------- SuperNet


def _mix(g: torch.Tensor, x: torch.Tensor, output: Any, path: str) -> Any:
    """``g * f(x) + (1 - g) * x`` on the hidden state; other tuple elements pass through.

    Written as a blend rather than ``x + g * (f(x) - x)`` so that ``g = 1`` returns ``f(x)`` and
    ``g = 0`` returns ``x`` exactly (no rounding from the subtraction).
    """
    hidden = _hidden_output(output)
    if hidden is None or hidden.shape != x.shape:
        got = tuple(hidden.shape) if hidden is not None else type(output).__name__
        raise BlockShapeError(f"gated block {path} must keep its input's shape {tuple(x.shape)}, got {got}")
    g = g.to(hidden)  # the hidden state's dtype and device
    mixed = g * hidden + (1 - g) * x
    return mixed if isinstance(output, torch.Tensor) else (mixed, *output[1:])


def _batch_size(batch: dict[str, torch.Tensor]) -> int:
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    raise ValueError("the example batch holds no tensor with a batch dimension")


_INSTALLED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


class BlockSuperNet:
    """A frozen model with one gate per shape-preserving residual block (SuperNet protocol).

    ``gated`` stores the gates for the duration of one ``output_fn`` call; the hooks read them and
    blend each block's output with its input. Outside that call the hooks pass through, so
    ``reference`` is the plain model. Owns no parameters.
    """

    kind = "block"

    def __init__(self, model: nn.Module, blocks: list[str], costs: list[float], full: float,
                 output_fn: OutputFn, restore: Callable[[], None] | None = None) -> None:
        if model in _INSTALLED:
            raise RuntimeError(f"{type(model).__name__} already has block gates: call remove() on that SuperNet first")
        self.model = model
        self.blocks = list(blocks)
        self.output_fn = output_fn
        self.slots = [GateSlot(name=b, kind="block", block=b, cost=float(c), step=None) for b, c in zip(blocks, costs)]
        self._costs = torch.tensor(costs, dtype=torch.float64)  # (N,)
        self._full = float(full)
        self._gates: torch.Tensor | None = None
        self._restore = restore or freeze(model)
        self._handles: list[RemovableHandle] = [
            model.get_submodule(b).register_forward_hook(self._hook(i, b), with_kwargs=True)
            for i, b in enumerate(self.blocks)
        ]
        _INSTALLED.add(model)

    def _hook(self, idx: int, path: str) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
            if self._gates is None:
                return None  # pass through: the original output object, untouched
            x = _first_input(args, kwargs)
            if x is None:
                raise BlockShapeError(f"gated block {path} was called without a tensor input")
            return _mix(self._gates[idx], x, output, path)

        return hook

    # -- costs
    def full_cost(self) -> float:
        """Cost of the whole model per batch element (MACs, or whatever :meth:`set_costs` gave)."""
        return self._full

    def expected_cost(self, gates: torch.Tensor) -> torch.Tensor:
        """Differentiable kept-cost ratio ``1 - sum((1 - g_i) cost_i) / full`` of ``(N,)`` keep probs."""
        self._check(gates)
        removed = ((1 - gates) * self._costs.to(gates)).sum()
        return 1 - removed / self._full

    def set_costs(self, costs: list[float], full: float) -> None:
        """Replace the per-block costs (e.g. measured latency per block) and the full model's cost."""
        if len(costs) != len(self.blocks):
            raise ValueError(f"expected {len(self.blocks)} block costs, got {len(costs)}")
        if full <= 0:
            raise ValueError(f"the full model's cost must be positive, got {full}")
        self._costs = torch.tensor([float(c) for c in costs], dtype=torch.float64)
        self._full = float(full)
        self.slots = [replace(s, cost=float(c)) for s, c in zip(self.slots, costs)]

    # -- outputs
    def reference(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"output": output_fn(model, batch)}`` of the original model, without grad."""
        with torch.no_grad():
            return {"output": self.output_fn(self.model, batch)}

    def gated(self, batch: dict[str, torch.Tensor], gates: torch.Tensor) -> dict[str, torch.Tensor]:
        """Same output with block ``i`` computing ``g_i f(x) + (1 - g_i) x``; differentiable in ``gates``."""
        self._check(gates)
        self._gates = gates
        try:
            return {"output": self.output_fn(self.model, batch)}
        finally:
            self._gates = None

    def _check(self, gates: torch.Tensor) -> None:
        if gates.shape != (len(self.blocks),):
            raise ValueError(f"gates must have shape ({len(self.blocks)},) (one per block), got {tuple(gates.shape)}")

    def remove(self) -> nn.Module:
        """Remove the hooks and restore the model's flags; returns the original model."""
        for h in self._handles:
            h.remove()
        self._handles = []
        if self.model in _INSTALLED:
            self._restore()
            _INSTALLED.discard(self.model)
        return self.model


def apply_block_gates(model: nn.Module, example: dict[str, torch.Tensor],
                      output_fn: OutputFn | None = None) -> BlockSuperNet:
    """Wrap ``model`` into a :class:`BlockSuperNet` (frozen, eval mode, hooks installed).

    ``example``: one calibration batch (batch size 1 is enough) used to find the shape-preserving
    blocks and to count MACs per block and per model (``dipgo.measure.macs``), per batch element.
    ``output_fn(model, batch)``: the tensor the distortion compares; default ``model(batch["images"])``.
    """
    if model in _INSTALLED:
        raise RuntimeError(f"{type(model).__name__} already has block gates: call remove() on that SuperNet first")
    output_fn = output_fn or default_output
    restore = freeze(model)  # frozen first: the FLOP counter's module tracker trips on leaf inputs that need grad
    try:
        blocks = find_blocks(model, example, output_fn)
        total, per_module = count_macs(lambda: output_fn(model, example))
    except BaseException:
        restore()
        raise
    n = _batch_size(example)
    costs = [per_module.get(b, 0.0) / n for b in blocks]
    return BlockSuperNet(model, blocks, costs, total / n, output_fn, restore)
