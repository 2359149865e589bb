"""Mask SubNets: prune by a plan (OBS reconstruction + distillation), run on kernels, export, reload.

:func:`prune_with_plan` turns a mask plan into pruned weights on a copy of the model: block
patterns take their masks from block saliency, unstructured and N:M choose them jointly with the
OBS update (:mod:`dipgo.postprocess.reconstruct`); then optionally the kept weights are distilled
towards the dense model's outputs; optionally SDS follows (re-dense with a sparse regulariser,
prune again: :mod:`dipgo.postprocess.sds`). :func:`to_kernels` swaps every masked ``nn.Linear`` that, timed on this machine
(:func:`dipgo.kernels.decide.decide_layer`), runs faster as a :class:`dipgo.kernels.BlockSparseLinear`
than on the fastest dense path, leaving the others dense with zeros.
:func:`export_mask_subnet` writes ``model.safetensors`` (kernel layers in their block-CSR
layout) + ``mask_subnet.json`` (+ the transformers ``config.json``); :func:`load_mask_subnet`
rebuilds it without pickle.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dipgo.errors import PlanError
from dipgo.files import write_bytes_atomic, write_json_atomic
from dipgo.postprocess.plan import MaskPayload, Plan
from dipgo.postprocess.reconstruct import prune_once
from dipgo.supernets.mask import parse_pattern, weight_matrix

OutputFn = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]
SUBNET_FILE = "mask_subnet.json"
WEIGHTS_FILE = "model.safetensors"


def prune_with_plan(model: nn.Module, plan: Plan, saliency: dict[str, torch.Tensor],
                    batches: list[dict[str, torch.Tensor]], output_fn: OutputFn, *, reconstruct: bool = True,
                    distill_steps: int = 0, distill_lr: float = 1e-4, sds: Any = None,
                    norms: dict[str, torch.Tensor] | None = None,
                    stages: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A pruned copy of ``model`` following ``plan``; returns ``(model, keep masks)``.

    ``sds``: an :class:`dipgo.postprocess.sds.SDSConfig` (or ``cfg.supernet.sds``); when enabled,
    the first prune is followed by SDS's re-dense and second prune (:mod:`dipgo.postprocess.sds`),
    with Wanda saliency re-computed from ``norms`` (the supernet's input norms). ``stages``: a dict
    that receives ``"before_sds"``: ``(first-prune model, its masks)`` when SDS ran.
    """
    if plan.kind != "mask":
        raise PlanError(f"prune_with_plan needs a mask plan, got kind={plan.kind!r}")
    conf = None
    if sds is not None:
        from dipgo.postprocess.sds import SDSConfig

        conf = SDSConfig.from_config(sds)
        conf = conf if conf.enabled else None
    refs = None
    if distill_steps > 0 or conf is not None:
        with torch.no_grad():
            refs = [output_fn(model, b) for b in batches]
    pruned, masks = prune_once(model, plan, saliency, batches, output_fn, refs, reconstruct=reconstruct,
                               distill_steps=distill_steps, distill_lr=distill_lr)
    if conf is None or not masks:
        return pruned, masks
    from dipgo.postprocess.sds import sds_prune

    if stages is not None:
        stages["before_sds"] = (pruned, masks)
    return sds_prune(model, pruned, masks, plan, batches, output_fn, conf, references=refs, norms=norms,
                     reconstruct=reconstruct, distill_steps=distill_steps, distill_lr=distill_lr)


def block_sparsity(mask: torch.Tensor, block: tuple[int, int]) -> float:
    """Share of ``block``-sized blocks of a keep mask that hold no kept weight."""
    o, i = mask.shape
    bn, bk = block
    kept = mask.reshape(o // bn, bn, i // bk, bk).any(dim=3).any(dim=1)
    return 1.0 - float(kept.float().mean())


MIN_BLOCK_SPARSITY = 0.2
"""Below this share of empty blocks a layer stays dense untimed: whatever the kernel gains on a
near-dense pattern has nothing to do with the sparsity, and an unstructured mask (almost no empty
32x32 block) would otherwise claim it."""


FUSABLE_ACTIVATIONS = (("dense", "intermediate_act_fn"), ("fc1", "act"))
"""(Linear attribute, activation attribute) pairs of one parent module whose forward applies the
activation right after the Linear: transformers' ``*Intermediate`` blocks (BERT, RoBERTa, ...) and
timm's ``Mlp``. A pair is only fused after the parent is checked to compute the same with it."""


def activation_kind(act: nn.Module) -> str | None:
    """``relu`` or ``gelu`` (exact, erf) when ``act`` computes one of them elementwise, else ``None``."""
    import torch.nn.functional as F

    probe = torch.linspace(-8.0, 8.0, 257)
    try:
        with torch.no_grad():
            out = act(probe)
    except Exception:  # noqa: BLE001 - anything that is not a plain elementwise module is not fused
        return None
    for name, ref in (("relu", F.relu(probe)), ("gelu", F.gelu(probe))):
        if isinstance(out, torch.Tensor) and out.shape == probe.shape and torch.allclose(out, ref, rtol=1e-5, atol=1e-6):
            return name
    return None


def _fusable(model: nn.Module, path: str) -> tuple[nn.Module, str, str] | None:
    """``(parent, activation attribute, kind)`` when the activation after Linear ``path`` can be fused."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    for lin, act_attr in FUSABLE_ACTIVATIONS:
        act = getattr(parent, act_attr, None) if name == lin else None
        if not isinstance(act, nn.Module) or isinstance(act, nn.Identity):
            continue
        uses = sum(m is act for _, m in model.named_modules(remove_duplicate=False))
        kind = activation_kind(act) if uses == 1 else None  # a shared module would lose it elsewhere too
        if kind is not None:
            return parent, act_attr, kind
    return None


def _fuse(model: nn.Module, path: str, new: nn.Module, parent: nn.Module, act_attr: str) -> bool:
    """Put ``new`` (its activation fused) at ``path`` and an identity at ``parent.act_attr``, if the
    parent then computes what it computed before on a probe input; otherwise change nothing."""
    old_linear, old_act = model.get_submodule(path), getattr(parent, act_attr)
    probe = torch.randn(3, old_linear.in_features, generator=torch.Generator().manual_seed(0))
    try:
        with torch.inference_mode():
            before = parent(probe)
            model.set_submodule(path, new)
            setattr(parent, act_attr, nn.Identity())
            after = parent(probe)
        same = (isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor)
                and after.shape == before.shape and torch.allclose(after, before, rtol=1e-4, atol=1e-5))
    except Exception:  # noqa: BLE001 - a parent that needs other inputs: not fused
        same = False
    if not same:
        model.set_submodule(path, old_linear)
        setattr(parent, act_attr, old_act)
    return same


def to_kernels(model: nn.Module, masks: dict[str, torch.Tensor], block: tuple[int, int] = (32, 32), *,
               tokens: int = 256, device: str = "cpu", force: bool = False,
               min_block_sparsity: float = MIN_BLOCK_SPARSITY, timer: Any = None,
               use_cache: bool = True, fuse_activations: bool = True) -> dict[str, dict[str, Any]]:
    """Swap masked Linears for ``BlockSparseLinear`` where it is measured faster; in place.

    A layer converts when at least ``min_block_sparsity`` of its blocks are empty and, timed at
    ``tokens`` rows per call on this machine, the kernel beats the fastest dense path
    (:func:`dipgo.kernels.decide.decide_layer`; ``timer`` and ``use_cache`` are passed on).
    ``force`` skips both checks. With ``fuse_activations``, a ReLU / GELU that the parent module
    applies right after the Linear (:data:`FUSABLE_ACTIVATIONS`) moves into the kernel's epilogue:
    the timing compares the fused kernel with dense + torch's activation, and the parent's
    activation becomes an identity (measured on MiniLM: its erf GELU is 10 % of the SubNet's time).
    Returns ``{path: {"converted": bool, "block_sparsity": s, "reason": ..., "ratio": dense /
    kernel time or None, "dense_path": ..., "fused_activation": kind or None}}``.
    """
    from dipgo.kernels import BlockSparseLinear
    from dipgo.kernels.decide import decide_layer

    report: dict[str, dict[str, Any]] = {}
    for path, mask in masks.items():
        mod = model.get_submodule(path)
        if not isinstance(mod, nn.Linear):
            report[path] = {"converted": False, "reason": "not a Linear"}
            continue
        o, i = mask.shape
        if o % block[0] or i % block[1] or block[0] > o or block[1] > i:
            report[path] = {"converted": False, "reason": f"shape {o}x{i} does not tile into {block}"}
            continue
        s = block_sparsity(mask, block)
        if not force and s < min_block_sparsity:
            report[path] = {"converted": False, "block_sparsity": round(s, 4), "ratio": None,
                            "reason": f"only {s:.0%} of the blocks are empty (< {min_block_sparsity:.0%}): dense"}
            continue
        fusable = _fusable(model, path) if fuse_activations else None
        act = fusable[2] if fusable else "none"
        new = BlockSparseLinear.from_dense(mod, mask.bool(), block=block, activation=act)
        entry: dict[str, Any] = {"block_sparsity": round(s, 4), "ratio": None}
        if force:
            use, entry["reason"] = True, "forced"
        elif not str(device).startswith("cpu"):
            use, entry["reason"] = False, f"kernel decisions are measured on the CPU only, not {device}: dense"
        else:
            choice = decide_layer(new.weight, new.bias, tokens, timer=timer, use_cache=use_cache, activation=act)
            use = choice.kernel
            entry.update(ratio=choice.ratio, dense_path=choice.dense_path, times_ms=choice.times_ms,
                         reason=choice.reason)
        fused = None
        if use and fusable:
            parent, act_attr, _ = fusable
            if _fuse(model, path, new, parent, act_attr):
                fused = act
            else:  # the parent did not check out: decide again for the kernel without the epilogue
                new = BlockSparseLinear.from_dense(mod, mask.bool(), block=block)
                if not force:
                    choice = decide_layer(new.weight, new.bias, tokens, timer=timer, use_cache=use_cache)
                    use = choice.kernel
                    entry.update(ratio=choice.ratio, dense_path=choice.dense_path, times_ms=choice.times_ms,
                                 reason=choice.reason)
        if use and fused is None:
            model.set_submodule(path, new)
        report[path] = {"converted": use, **entry, "fused_activation": fused}
    return report


def conversion_lines(report: dict[str, dict[str, Any]]) -> list[str]:
    """One line per layer: what :func:`to_kernels` chose and the measured ratio."""
    lines = []
    for path, r in report.items():
        ratio = "-" if r.get("ratio") is None else f"{r['ratio']:.2f}x"
        fused = f"; {r['fused_activation']} fused" if r.get("fused_activation") else ""
        lines.append(f"  {path}: {'kernel' if r['converted'] else 'dense '} {ratio:>6}  "
                     f"({r.get('reason', '')}; {r.get('block_sparsity', 0):.0%} blocks empty{fused})")
    return lines


def export_mask_subnet(model: nn.Module, plan: Plan, out: str | Path, source: dict[str, Any] | None = None) -> Path:
    """Write the SubNet: ``model.safetensors`` + ``mask_subnet.json`` (+ ``config.json`` for transformers)."""
    from safetensors.torch import save

    from dipgo.kernels import BlockSparseLinear

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    kernels = {name: mod.config() for name, mod in model.named_modules() if isinstance(mod, BlockSparseLinear)}
    fused = fused_activations(model)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    write_bytes_atomic(out / WEIGHTS_FILE, save(state))
    if hasattr(model, "config") and hasattr(model.config, "save_pretrained"):
        model.config.save_pretrained(str(out))
    write_json_atomic(out / SUBNET_FILE, {"format": "dipgo.mask_subnet", "version": 1, "source": source or {},
                                         "model_class": type(model).__name__, "kernel_layers": kernels,
                                         "fused_activations": fused, "plan": plan.to_dict()})
    return out


def load_mask_subnet(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Rebuild an exported SubNet. ``model``: an instance of the same architecture (weights are
    replaced); default: a transformers ``AutoModel`` built from the saved ``config.json``."""
    from safetensors.torch import load_file

    from dipgo.kernels import BlockSparseLinear, BlockSparseWeight

    path = Path(path)
    meta_file = path / SUBNET_FILE
    if not meta_file.is_file():
        raise PlanError(f"nothing at {meta_file}: expected a folder written by export_mask_subnet")
    meta = json.loads(meta_file.read_text())
    if model is None:
        if not (path / "config.json").is_file():
            raise PlanError(f"{path} holds no config.json; pass model= (an instance of {meta['model_class']})")
        from transformers import AutoConfig, AutoModel

        model = AutoModel.from_config(AutoConfig.from_pretrained(str(path)))
    state = load_file(str(path / WEIGHTS_FILE))
    for name, cfg in meta["kernel_layers"].items():
        tensors = {k: state[f"{name}.{k}"] for k in ("values", "col_indices", "row_ptr")}
        weight = BlockSparseWeight.from_tensors(tensors, cfg)
        model.set_submodule(name, BlockSparseLinear(weight, state.get(f"{name}.bias"), cfg.get("activation", "none")))
    for parent_path, act_attr in meta.get("fused_activations", {}).items():  # now inside the kernel layer
        setattr(model.get_submodule(parent_path), act_attr, nn.Identity())
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)


def fused_activations(model: nn.Module) -> dict[str, str]:
    """``{parent path: activation attribute}`` of every activation :func:`to_kernels` moved into a
    kernel layer (the parent's attribute is an identity now; a reload must make it one again)."""
    from dipgo.kernels import BlockSparseLinear

    out = {}
    for path, mod in model.named_modules():
        if not isinstance(mod, BlockSparseLinear) or mod.activation == "none":
            continue
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        for lin, act_attr in FUSABLE_ACTIVATIONS:
            if name == lin and isinstance(getattr(parent, act_attr, None), nn.Identity):
                out[parent_path] = act_attr
    return out


def masked_density(model: nn.Module, layers: list[str]) -> float:
    """Parameter-weighted share of nonzero weights among ``layers`` of a dense (unconverted) model."""
    nz = total = 0
    for p in layers:
        w = weight_matrix(model.get_submodule(p))
        nz += int((w != 0).sum())
        total += w.numel()
    return nz / max(total, 1)


def kernel_block(plan: Plan) -> tuple[int, int]:
    """The block-sparse kernels' block shape for a mask plan: its pattern's block, else 32x32."""
    p = parse_pattern(MaskPayload.from_meta(plan.meta).pattern)
    return (p.block, p.block) if p.kind in ("block", "rowblock") else (32, 32)
