"""Block SubNets: closed blocks physically removed, exported so that they reload without dipgo.

A ``block`` Plan names module paths (``stages.2.blocks.3``) and keeps or removes each. Removal
deep-copies the model and deletes the closed children from their containers; ``nn.Sequential`` /
``nn.ModuleList`` re-index themselves (``blocks.0,1,3`` become ``blocks.0,1,2``), so the result is a
regular timm / transformers model whose state dict has the layout a shallower model of the same
family would have. That is what makes export possible without pickles: timm rebuilds the model
from ``config.json`` with fewer ``depths`` (``layers``, ``depth``...) and loads the renumbered
weights; transformers does the same with a smaller ``num_hidden_layers``.

Export refuses, with one sentence, what a config cannot describe: families whose timm entrypoint
fixes its depth (EfficientNet's ``arch_def``, RegNet's ``model_cfg``, MLP-Mixer's ``num_blocks``...),
and kept blocks that the rebuilt model would construct differently (a Swin block with shifted
windows moved to an unshifted position). Every export is checked to reproduce the removed
model's output before anything is written.
"""

from __future__ import annotations

import copy
import os
import re
import tempfile
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dipgo.errors import PlanError, UnsupportedModelError
from dipgo.files import read_json, write_json_atomic
from dipgo.postprocess.plan import BlockPayload, Plan
from dipgo.supernets.block import (
    TIMM_COVERAGE,
    block_signatures,
    find_blocks,
    find_containers,
    synthetic_example,
)

if TYPE_CHECKING:
    from dipgo.supernets.block import BlockSuperNet

SUBNET_FILE = "dipgo_subnet.json"
SUBNET_FORMAT = "dipgo-block-subnet"
SUBNET_VERSION = 1
_SOURCE_KEYS = ("file", "source", "url", "hf_hub_id", "hf_hub_filename", "state_dict")


@dataclass(frozen=True)
class DepthArg:
    """How a timm family's constructor says how many blocks each container holds.

    Attributes:
        kwarg: the ``create_model`` keyword (``layers``, ``depths``, ``depth``...).
        scalar: one int for a single container (ViT ``depth=12``) rather than one per stage.
        extra: children of each container that are not counted by the kwarg (StarNet's stages
            start with their downsampling conv).
    """

    kwarg: str
    scalar: bool = False
    extra: int = 0


# timm model classes (matched along the MRO by name) whose entrypoints accept a depth override.
TIMM_DEPTH_ARGS: dict[str, DepthArg] = {
    "ResNet": DepthArg("layers"),
    "ResNetV2": DepthArg("layers"),
    "ConvNeXt": DepthArg("depths"),
    "MetaNeXt": DepthArg("depths"),
    "MambaOut": DepthArg("depths"),
    "StarNet": DepthArg("depths", extra=1),
    "FastVit": DepthArg("layers"),
    "FasterNet": DepthArg("depths"),
    "RepVit": DepthArg("depth"),
    "VisionTransformer": DepthArg("depth", scalar=True),
    "Beit": DepthArg("depth", scalar=True),
    "Eva": DepthArg("depth", scalar=True),
    "VisionTransformerRelPos": DepthArg("depth", scalar=True),
    "Cait": DepthArg("depth", scalar=True),
    "Xcit": DepthArg("depth", scalar=True),
    "ConVit": DepthArg("depth", scalar=True),
    "SwinTransformer": DepthArg("depths"),
    "SwinTransformerV2": DepthArg("depths"),
    "PoolingVisionTransformer": DepthArg("depth"),
    "Levit": DepthArg("depth"),
    "PyramidVisionTransformerV2": DepthArg("depths"),
    "EdgeNeXt": DepthArg("depths"),
    "DaVit": DepthArg("depths"),
    "Twins": DepthArg("depths"),
}

# Families the SuperNet covers but a config.json cannot rebuild shallower, and why.
TIMM_NO_EXPORT: dict[str, str] = {
    "EfficientNet": "timm builds it from the entrypoint's fixed arch_def (block_args), which create_model "
                    "kwargs cannot override",
    "MobileNetV3": "timm builds it from the entrypoint's fixed arch_def (block_args), which create_model "
                   "kwargs cannot override",
    "RegNet": "its stage depths come from the variant's RegNetCfg (model_cfg), which create_model kwargs "
              "cannot override per stage",
    "GhostNet": "its stages come from the entrypoint's fixed cfgs list",
    "MlpMixer": "the mixer / resmlp / gmlp entrypoints fix num_blocks (passing it again is refused)",
    "MetaFormer": "the poolformer / convformer / caformer entrypoints fix depths (passing it again is refused)",
}


# Architectures of ``TIMM_COVERAGE`` whose SubNets cannot be exported (their family is in
# TIMM_NO_EXPORT); every other one is exported and reloaded by the tests.
SUPERNET_ONLY_COVERAGE: tuple[str, ...] = (
    "regnetx_002", "regnety_002", "efficientnet_b0", "mobilenetv2_050", "mobilenetv3_small_050", "mnasnet_small",
    "ghostnet_050", "poolformer_s12", "gmlp_ti16_224",
)
TIMM_EXPORT_COVERAGE: tuple[tuple[str, dict[str, Any]], ...] = tuple(
    (arch, kwargs) for arch, kwargs in TIMM_COVERAGE if arch not in SUPERNET_ONLY_COVERAGE
)

# ----------------------------------------------------------------------------- plans


def make_block_plan(supernet: BlockSuperNet, keep: Sequence[bool], target: float | None = None,
                    meta: dict[str, Any] | None = None) -> Plan:
    """A ``block`` Plan from a keep mask over ``supernet.blocks``, with the blocks' signatures in
    ``meta["block_signatures"]`` so that :func:`check_plan_matches` can tell resnet18 from resnet34."""
    if len(keep) != len(supernet.blocks):
        raise PlanError(f"keep mask has {len(keep)} entries for {len(supernet.blocks)} blocks")
    removed = sum(s.cost for s, k in zip(supernet.slots, keep) if not k)
    ratio = 1.0 - removed / supernet.full_cost()
    info = {**BlockPayload(block_signatures(supernet.model, supernet.blocks)).to_meta(), **(meta or {})}
    return Plan(kind="block", model=type(supernet.model).__name__, blocks=list(supernet.blocks),
                compute=[[bool(k) for k in keep]], target=float(ratio if target is None else target),
                cost_ratio=round(ratio, 6), meta=info)


def _get(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def check_plan_matches(model: nn.Module, plan: Plan) -> None:
    """Raise :class:`PlanError` unless ``plan`` was made for this architecture.

    Checks the kind, the model class, that every planned path exists and, block by block, the
    signatures stored in ``plan.meta["block_signatures"]`` (class, parameter count, blocks in the
    container); a plan without signatures must list exactly the blocks :func:`find_blocks` finds.
    The error names the first block that does not match.
    """
    cls = type(model).__name__
    if plan.kind != "block":
        raise PlanError(f"this is a {plan.kind!r} plan; removing blocks needs a 'block' plan")
    if plan.model != cls:
        raise PlanError(f"the plan was searched on a {plan.model}, not on this {cls}: search a plan for this model")
    if len(plan.compute) != 1:
        raise PlanError(f"a block plan has one row of keep decisions, this one has {len(plan.compute)}")
    for path in plan.blocks:
        if _get(model, path) is None:
            raise PlanError(f"plan block {path!r} does not exist in this {cls}: the plan is for another architecture")
    signatures = BlockPayload.from_meta(plan.meta).signatures
    if signatures:
        _check_signatures(model, plan.blocks, signatures)
    else:
        _check_block_list(model, plan.blocks)


def _check_signatures(model: nn.Module, blocks: list[str], signatures: dict[str, Any]) -> None:
    current = block_signatures(model, blocks)
    for path in blocks:
        want, got = list(signatures.get(path, [])), current[path]
        if want != got:
            raise PlanError(
                f"plan block {path!r} does not match this {type(model).__name__}: the plan was made for "
                f"[class, parameters, blocks in its container] = {want}, this model has {got}"
            )


def _check_block_list(model: nn.Module, blocks: list[str]) -> None:
    found = find_blocks(model)
    for i, path in enumerate(blocks):
        if i >= len(found) or found[i] != path:
            here = found[i] if i < len(found) else "nothing"
            raise PlanError(
                f"plan block {path!r} (number {i}) does not match this {type(model).__name__}, whose block "
                f"number {i} is {here!r}: the plan is for another architecture"
            )
    if len(found) > len(blocks):
        raise PlanError(
            f"this {type(model).__name__} has {len(found)} removable blocks, the plan only {len(blocks)} "
            f"(first unplanned: {found[len(blocks)]!r}): the plan is for another architecture"
        )


# ----------------------------------------------------------------------------- removal


def closed_blocks(plan: Plan) -> list[str]:
    """Paths the plan removes, in plan order."""
    return [b for b, keep in zip(plan.blocks, plan.compute[0]) if not keep]


def _strip_dipgo_hooks(model: nn.Module) -> None:
    """Drop forward hooks that a live SuperNet left on the deep-copied modules.

    ``copy.deepcopy`` copies a module's hook dictionaries; the copy must be a plain model, so the
    gating hooks (functions defined in ``dipgo``) are removed from it. torch has no public API to
    list hooks, hence the private dictionaries.
    """
    for module in model.modules():
        hooks = module._forward_hooks
        for key in [k for k, fn in hooks.items() if getattr(fn, "__module__", "").startswith("dipgo.")]:
            del hooks[key]
            module._forward_hooks_with_kwargs.pop(key, None)


def _renumbered(names: list[str], removed: set[str]) -> dict[str, str]:
    """``old name -> new name`` for the kept children of one container.

    Numbered children (``0``, ``1``... or ``b1``, ``b2``...) are renumbered densely from the first
    number, so the layout is the one a shallower model would have; other names stay.
    """
    out: dict[str, str] = {}
    counters: dict[str, int] = {}
    for name in names:
        match = re.fullmatch(r"(\D*)(\d+)", name)
        if match is None:
            if name not in removed:
                out[name] = name
            continue
        prefix = match.group(1)
        counters.setdefault(prefix, int(match.group(2)))
        if name not in removed:
            out[name] = f"{prefix}{counters[prefix]}"
            counters[prefix] += 1
    return out


def _group_by_parent(paths: Sequence[str]) -> dict[str, set[str]]:
    groups: dict[str, set[str]] = {}
    for path in paths:
        parent, _, name = path.rpartition(".")
        groups.setdefault(parent, set()).add(name)
    return groups


def block_renames(model: nn.Module, removed: Sequence[str]) -> dict[str, str]:
    """``old path -> new path`` of every kept block in a container that loses blocks."""
    out: dict[str, str] = {}
    for parent, names in _group_by_parent(removed).items():
        children = list(model.get_submodule(parent)._modules)
        for old, new in _renumbered(children, names).items():
            out[f"{parent}.{old}"] = f"{parent}.{new}"
    return out


def _delete_children(container: nn.Module, names: set[str]) -> None:
    """Delete children and renumber the rest (``nn.Sequential`` / ``nn.ModuleList`` do it
    themselves; other containers, e.g. RegNet's ``RegStage`` with ``b1, b2...``, get the same)."""
    if isinstance(container, (nn.Sequential, nn.ModuleList)):
        for idx in sorted((int(n) for n in names), reverse=True):
            del container[idx]
        return
    mapping = _renumbered(list(container._modules), names)
    container._modules = OrderedDict((mapping[n], m) for n, m in container._modules.items() if n in mapping)


def _sync_transformers_config(model: nn.Module, removed: Sequence[str]) -> None:
    """Keep a transformers config true to the layers left: ``num_hidden_layers``, per-layer
    ``layer_types`` and the layers' ``layer_idx`` (used by caches) follow the removal."""
    config = getattr(model, "config", None)
    parents = {p.rpartition(".")[0] for p in removed}
    layer_lists = [p for p in parents if re.fullmatch(r"(.+\.)?encoder\.layers?", p)]
    if config is None or not hasattr(config, "num_hidden_layers") or len(layer_lists) != 1:
        return
    parent = layer_lists[0]
    gone = {int(p.rpartition(".")[2]) for p in removed if p.rpartition(".")[0] == parent}
    layers = model.get_submodule(parent)
    types = getattr(config, "layer_types", None)
    if isinstance(types, list) and len(types) == config.num_hidden_layers:
        config.layer_types = [t for i, t in enumerate(types) if i not in gone]
    config.num_hidden_layers = len(layers)
    for i, layer in enumerate(layers):
        for sub in layer.modules():
            if isinstance(getattr(sub, "layer_idx", None), int):
                sub.layer_idx = i


def remove_blocks(model: nn.Module, plan: Plan) -> nn.Module:
    """A deep copy of ``model`` without the blocks ``plan`` closes (the model itself is untouched).

    Containers are re-indexed (``blocks.0,1,3`` -> ``blocks.0,1,2``), a transformers config gets
    the new ``num_hidden_layers``; the result is a regular timm / transformers model object. The
    plan is checked against the model first (:func:`check_plan_matches`).
    """
    check_plan_matches(model, plan)
    removed = closed_blocks(plan)
    new = copy.deepcopy(model)
    _strip_dipgo_hooks(new)
    for parent, names in _group_by_parent(removed).items():
        _delete_children(new.get_submodule(parent), names)
    _sync_transformers_config(new, removed)
    return new


# ----------------------------------------------------------------------------- export


def _library(model: nn.Module, source: dict[str, Any]) -> str:
    library = source.get("library") or type(model).__module__.partition(".")[0]
    if library not in ("timm", "transformers"):
        raise UnsupportedModelError(
            f"cannot export a {type(model).__name__} from {library!r}: block SubNets are exported for timm and "
            "transformers models (use remove_blocks(model, plan) in Python for others)"
        )
    return library


def timm_depth_arg(model: nn.Module) -> DepthArg:
    """The depth kwarg of a timm model's family, or :class:`UnsupportedModelError` saying why not."""
    for cls in type(model).__mro__:
        if cls.__name__ in TIMM_DEPTH_ARGS:
            return TIMM_DEPTH_ARGS[cls.__name__]
        if cls.__name__ in TIMM_NO_EXPORT:
            raise UnsupportedModelError(
                f"cannot export a block SubNet of timm's {cls.__name__}: {TIMM_NO_EXPORT[cls.__name__]}, so no "
                "config.json can describe the removed blocks; use remove_blocks(model, plan) in Python, or a "
                "family whose depth is a create_model kwarg"
            )
    raise UnsupportedModelError(
        f"cannot export a block SubNet of timm's {type(model).__name__}: no depth kwarg is known for it "
        f"(known: {', '.join(sorted(TIMM_DEPTH_ARGS))}); add it to TIMM_DEPTH_ARGS if its entrypoint accepts one"
    )


def _new_depth(original: nn.Module, removed_model: nn.Module, arg: DepthArg) -> int | list[int]:
    """The kwarg value describing the removed model: blocks left per container."""
    containers = find_containers(original)
    depths = [len(removed_model.get_submodule(c)._modules) - arg.extra for c in containers]
    if arg.scalar and len(depths) != 1:
        raise PlanError(f"{type(original).__name__}'s {arg.kwarg} is one number but {len(depths)} containers were found")
    return depths[0] if arg.scalar else depths


def _timm_build_args(original: nn.Module, source: dict[str, Any], arg: DepthArg,
                     depth: int | list[int]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``(architecture, create_model kwargs, pretrained_cfg)`` rebuilding the shallower model."""
    pcfg = dict(source.get("pretrained_cfg") or getattr(original, "pretrained_cfg", None) or {})
    arch = source.get("architecture") or pcfg.get("architecture")
    if not arch:
        raise PlanError(
            f"cannot export this {type(original).__name__}: its timm architecture name is unknown; pass "
            "source={'library': 'timm', 'architecture': <timm model name>, 'model_args': {...}}"
        )
    kwargs = {**getattr(original, "_model_args", {}), **(source.get("model_args") or {}), arg.kwarg: depth}
    return arch, kwargs, _pretrained_cfg_fields(pcfg)


def _pretrained_cfg_fields(pcfg: dict[str, Any]) -> dict[str, Any]:
    """The preprocessing part of a pretrained config (input size, mean, std...), without where the
    original weights came from (the export is their new source) and without keys timm does not know."""
    from dataclasses import fields

    from timm.models import PretrainedCfg

    known = {f.name for f in fields(PretrainedCfg)}
    return {k: v for k, v in pcfg.items() if k in known and k not in _SOURCE_KEYS}


def _create_timm(arch: str, kwargs: dict[str, Any], pcfg: dict[str, Any], arg: DepthArg) -> nn.Module:
    import timm

    try:
        return timm.create_model(arch, pretrained=False, pretrained_cfg=pcfg or None, **kwargs).eval()
    except TypeError as exc:
        if "multiple values" in str(exc):
            raise UnsupportedModelError(
                f"cannot export a block SubNet of timm's {arch}: its entrypoint fixes {arg.kwarg}= (create_model "
                "refuses it as a kwarg), so no config.json can describe the removed blocks"
            ) from None
        raise PlanError(f"timm cannot rebuild {arch} with {arg.kwarg}={kwargs[arg.kwarg]}: {exc}") from None
    except (RuntimeError, ValueError, AssertionError, IndexError) as exc:
        raise PlanError(f"timm cannot rebuild {arch} with {arg.kwarg}={kwargs[arg.kwarg]}: {exc}") from None


def _shape(t: torch.Tensor | None) -> str:
    return "absent" if t is None else str(tuple(t.shape))


def _check_state_layout(fresh: nn.Module, removed_model: nn.Module, label: str) -> None:
    """Same keys and shapes, or the first difference (kept blocks that are not interchangeable)."""
    want, have = fresh.state_dict(), removed_model.state_dict()
    for key in list(want) + [k for k in have if k not in want]:
        a, b = want.get(key), have.get(key)
        if a is None or b is None or a.shape != b.shape:
            raise PlanError(
                f"{label} has {key} {_shape(a)} but the kept blocks give {_shape(b)}: the kept blocks are not "
                "interchangeable at their new positions; close other blocks (e.g. the last ones of a stage)"
            )


def _plain_attrs(module: nn.Module) -> dict[str, Any]:
    """Constructor-made settings of a block and its submodules: plain attributes (ints, flags,
    tuples...) and buffers. Dropout / drop-path rates are left out (they do nothing in eval and
    depend on depth through stochastic-depth schedules)."""
    out: dict[str, Any] = {}
    for name, sub in module.named_modules():
        for key, value in vars(sub).items():
            if key.startswith("_") or key == "training" or "drop" in key or key == "p":
                continue
            if isinstance(value, (bool, int, float, str, tuple, type(None))):
                out[f"{name}.{key}" if name else key] = value
        for key, buf in sub.named_buffers(recurse=False):
            out[f"{name}.{key}" if name else key] = buf
    return out


def _same_setting(a: Any, b: Any) -> bool:
    """Equal plain values; tensors equal when their shapes agree (a shape mismatch is a cache built
    lazily for the last input, e.g. ConViT's ``rel_indices``, not a constructor setting)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape != b.shape or torch.equal(a, b)
    return bool(a == b) if not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor) else False


def _shown(value: Any) -> str:
    return "a different tensor" if isinstance(value, torch.Tensor) else repr(value)


def _check_same_blocks(fresh: nn.Module, removed_model: nn.Module, containers: list[str], label: str) -> None:
    """Every kept block equals the one timm builds at its new position, attribute by attribute."""
    for parent in containers:
        for name, block in removed_model.get_submodule(parent).named_children():
            want, have = _plain_attrs(fresh.get_submodule(f"{parent}.{name}")), _plain_attrs(block)
            for key, value in want.items():
                if not _same_setting(value, have.get(key)):
                    raise PlanError(
                        f"{label} builds {parent}.{name} with {key}={_shown(value)}, but the kept block moved there "
                        f"has {_shown(have.get(key))}: the kept blocks are not interchangeable at their new "
                        "positions (e.g. Swin alternates shifted windows); close other blocks (e.g. whole pairs, "
                        "or the last ones)"
                    )


def _check_same_output(fresh: nn.Module, removed_model: nn.Module, label: str) -> None:
    """The rebuilt model reproduces the removed model on a synthetic input."""
    example = synthetic_example(removed_model)
    if example is None:
        return
    batch, fn = example
    with torch.no_grad():
        a, b = fn(fresh, batch), fn(removed_model, batch)
    if not torch.allclose(a, b, rtol=1e-4, atol=1e-5):
        raise PlanError(f"{label} does not reproduce the SubNet's output (max difference {(a - b).abs().max():.3g})")


def _export_timm(original: nn.Module, removed_model: nn.Module, source: dict[str, Any], out: Path) -> dict[str, Any]:
    """Rebuild the shallower model with timm, load the kept weights, save in timm's hub format."""
    from timm.models import save_for_hf

    arg = timm_depth_arg(original)
    depth = _new_depth(original, removed_model, arg)
    arch, kwargs, pcfg = _timm_build_args(original, source, arg, depth)
    fresh = _create_timm(arch, kwargs, pcfg, arg)
    label = f"timm's {arch} with {arg.kwarg}={depth}"
    _check_state_layout(fresh, removed_model, label)
    fresh.load_state_dict(removed_model.state_dict(), strict=True)
    _check_same_blocks(fresh, removed_model, find_containers(original), label)
    _check_same_output(fresh, removed_model, label)
    try:
        save_for_hf(fresh, str(out), safe_serialization=True)
    except ValueError as exc:  # a model arg that JSON cannot hold
        raise PlanError(f"cannot write timm's config.json for {arch}: {exc}") from None
    return {"architecture": arch, "depth": {arg.kwarg: depth}, "model_args": kwargs,
            "reload": "timm.create_model('local-dir:<this folder>', pretrained=True)"}


def _export_transformers(removed_model: nn.Module, out: Path) -> dict[str, Any]:
    removed_model.save_pretrained(str(out), safe_serialization=True)
    return {"architecture": type(removed_model).__name__,
            "depth": {"num_hidden_layers": removed_model.config.num_hidden_layers},
            "reload": "transformers.AutoModel.from_pretrained('<this folder>')"}


def _jsonable(value: Any) -> Any:
    """Source metadata as JSON: tuples as lists, anything else unknown as its string."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


def export_block_subnet(model: nn.Module, plan: Plan, out_dir: str | Path, source: dict[str, Any]) -> Path:
    """Write the SubNet so that it reloads with timm / transformers alone; returns ``out_dir``.

    timm: ``model.safetensors`` + ``config.json`` in timm's hub format (architecture, ``model_args``
    with the new depth, ``pretrained_cfg``), loadable by ``timm.create_model('local-dir:<out_dir>',
    pretrained=True)``. transformers: ``save_pretrained`` with the smaller ``num_hidden_layers``.
    Both: ``plan.json`` and ``dipgo_subnet.json`` (source, kept / removed blocks, renames). Files are
    written to a temporary folder first, so a refused export leaves ``out_dir`` as it was.
    ``source``: ``{"library": "timm", "architecture": ..., "model_args": {...}}`` or
    ``{"library": "transformers"}``; timm fields default to the model's own ``pretrained_cfg`` and
    recorded ``create_model`` kwargs.
    """
    library = _library(model, source)
    removed_model = remove_blocks(model, plan).to("cpu").float().eval()  # saved as timm / transformers load it
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.") as tmp:
        staging = Path(tmp)
        if library == "timm":
            info = _export_timm(model, removed_model, source, staging)
        else:
            info = _export_transformers(removed_model, staging)
        plan.save(staging / "plan.json")
        write_json_atomic(staging / SUBNET_FILE, _summary(model, plan, library, info, source))
        out_dir.mkdir(parents=True, exist_ok=True)
        for file in staging.iterdir():
            os.replace(file, out_dir / file.name)
    return out_dir


def _summary(model: nn.Module, plan: Plan, library: str, info: dict[str, Any], source: dict[str, Any]) -> dict[str, Any]:
    removed = closed_blocks(plan)
    return {
        "format": SUBNET_FORMAT,
        "version": SUBNET_VERSION,
        "library": library,
        "model_class": type(model).__name__,
        **_jsonable(info),
        "source": _jsonable(source),
        "kept_blocks": [b for b in plan.blocks if b not in removed],
        "removed_blocks": removed,
        "renamed": block_renames(model, removed),
        "plan": {"target": plan.target, "cost_ratio": plan.cost_ratio, "num_removed": len(removed)},
    }


def load_block_subnet(out_dir: str | Path) -> nn.Module:
    """Reload an exported SubNet with timm / transformers only (eval mode); no dipgo class in it."""
    out_dir = Path(out_dir)
    info = read_json(out_dir / SUBNET_FILE, "a dipgo_subnet.json written by export_block_subnet")
    if info.get("format") != SUBNET_FORMAT:
        raise PlanError(f"{out_dir / SUBNET_FILE} is not a block SubNet summary (format {info.get('format')!r})")
    if info["library"] == "timm":
        import timm

        return timm.create_model(f"local-dir:{out_dir}", pretrained=True).eval()
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(out_dir))
    names = getattr(config, "architectures", None) or ["AutoModel"]
    cls = getattr(transformers, names[0], transformers.AutoModel)
    return cls.from_pretrained(str(out_dir)).eval()

