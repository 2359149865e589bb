"""LoRA adapters on a loaded model, so the search and the plans run on the model users deploy.

A reuse plan gates whole blocks and never looks inside them, so it applies unchanged to a model
with a peft LoRA adapter in its attention or MLP layers, loaded or fused (tests/test_lora.py).
What this module adds is the loading for ``model.lora=<path>`` in a config, in the two formats
users have on disk:

* a **peft folder** (``adapter_config.json`` + ``adapter_model.safetensors``, what peft's
  ``save_pretrained`` writes): injected with ``peft.inject_adapter_in_model``, which works on
  any ``nn.Module`` (also the digits UNet2DModel and DiT, which have no diffusers LoRA loader);
* a **diffusers LoRA file** (``pytorch_lora_weights.safetensors`` from ``save_lora_weights``, or
  a folder holding one): loaded with the model's own ``load_lora_adapter``, which converts the
  key layouts diffusers knows (kohya, the older ``lora.down`` names).

``fuse=True`` (the default) merges the update into the base weights and removes the adapter
wrappers, so the searched model is a plain module again: same outputs up to rounding, no extra
matmuls in the cost tables, and nothing peft-specific in a checkpoint or an exported SubNet.
peft is imported only here, only when a LoRA is asked for.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from dipgo.errors import ModelLoadError

ADAPTER = "dipgo_lora"
_DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"


@dataclass(frozen=True)
class LoraInfo:
    """What was applied, for the run log and the report."""

    source: str
    format: str  # "peft" | "diffusers"
    layers: int  # adapted layers
    scale: float
    fused: bool

    def describe(self) -> str:
        state = "fused into the weights" if self.fused else "loaded as an adapter"
        return f"LoRA {self.source} ({self.format} format, {self.layers} layers, scale {self.scale:g}, {state})"


def apply_lora(model: nn.Module, source: str | Path, scale: float = 1.0, fuse: bool = True) -> LoraInfo:
    """Apply the LoRA at ``source`` to ``model`` in place (see the module docstring for formats).

    Raises:
        ModelLoadError: no such path, a folder in neither format, weights for layers the model
            does not have, or peft not installed; one sentence each.
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model.lora={str(source)!r}: no such file or folder.")
    _require_peft()
    if path.is_dir() and (path / "adapter_config.json").is_file():
        fmt = "peft"
        _load_peft_folder(model, path)
    elif (path.is_file() and path.suffix == ".safetensors") or (path / _DIFFUSERS_FILE).is_file():
        fmt = "diffusers"
        _load_diffusers_file(model, path)
    else:
        raise ModelLoadError(
            f"model.lora={str(source)!r} is neither a peft adapter folder (adapter_config.json) nor a diffusers "
            f"LoRA file (*.safetensors, or a folder with {_DIFFUSERS_FILE})."
        )
    layers = _lora_layers(model)
    if not layers:
        raise ModelLoadError(f"model.lora={str(source)!r} adapted no layer of the {type(model).__name__}.")
    for layer in layers:
        layer.set_scale(ADAPTER, scale)
    if fuse:
        for layer in layers:
            layer.merge(adapter_names=[ADAPTER])
        _unwrap(model)
        for attr in ("peft_config", "_hf_peft_config_loaded"):  # diffusers' bookkeeping of loaded adapters
            if attr in model.__dict__:
                delattr(model, attr)
    return LoraInfo(source=str(source), format=fmt, layers=len(layers), scale=float(scale), fused=fuse)


def _require_peft() -> None:
    try:
        import peft  # noqa: F401
    except ImportError as e:
        raise ModelLoadError(f"model.lora needs the peft package ({e}); install it with `pip install peft`.") from None


def _load_peft_folder(model: nn.Module, folder: Path) -> None:
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    config = LoraConfig.from_pretrained(str(folder))
    weights = _read_weights(folder)
    try:
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    except ValueError as e:  # peft: "Target modules ... not found in the base model"
        raise ModelLoadError(f"model.lora={str(folder)!r} does not fit the {type(model).__name__}: {_first_line(e)}") from None
    result = set_peft_model_state_dict(model, weights, adapter_name=ADAPTER)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise ModelLoadError(
            f"model.lora={str(folder)!r} holds {len(unexpected)} weights the adapted model has no place for "
            f"(first: {unexpected[0]!r})."
        )


def _read_weights(folder: Path) -> dict[str, Any]:
    st = folder / "adapter_model.safetensors"
    if st.is_file():
        from safetensors.torch import load_file

        return load_file(str(st))
    bin_file = folder / "adapter_model.bin"
    if bin_file.is_file():
        import torch

        return torch.load(str(bin_file), map_location="cpu", weights_only=True)
    raise ModelLoadError(f"model.lora={str(folder)!r} has adapter_config.json but no adapter_model.safetensors or .bin.")


def _load_diffusers_file(model: nn.Module, path: Path) -> None:
    loader = getattr(model, "load_lora_adapter", None)
    if loader is None:
        raise ModelLoadError(
            f"model.lora={str(path)!r} is a diffusers LoRA file, but {type(model).__name__} has no diffusers LoRA "
            "loader; save the adapter as a peft folder (adapter_config.json + adapter_model.safetensors) instead."
        )
    from safetensors import safe_open

    file = path if path.is_file() else path / _DIFFUSERS_FILE
    with safe_open(str(file), framework="pt") as f:
        keys = list(f.keys())
    prefixes = {k.split(".", 1)[0] for k in keys}
    prefix = next((p for p in ("unet", "transformer") if p in prefixes), None)
    try:
        loader(str(file), prefix=prefix, adapter_name=ADAPTER)
    except (ValueError, KeyError, RuntimeError) as e:
        raise ModelLoadError(f"model.lora={str(path)!r} does not fit the {type(model).__name__}: {_first_line(e)}") from None


def _lora_layers(model: nn.Module) -> list[Any]:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A]


def _unwrap(model: nn.Module) -> None:
    """Replace each (merged) adapter wrapper by its base layer: a plain module again."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer) and name:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0].rstrip(".") + "." if text else type(e).__name__ + "."


def lora_summary(info: LoraInfo | None) -> dict[str, Any] | None:
    """The JSON form recorded in a run's report (None when no LoRA was applied)."""
    return None if info is None else asdict(info)
