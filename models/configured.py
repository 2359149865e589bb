"""The configured model: ``cfg.model`` loaded through the registry, and where it came from.

Every command that starts from a config (search, bench, export) loads the model the same way;
the exporter also needs to say where the model came from so the SubNet reloads without dipgo.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from dipgo.errors import ModelLoadError
from dipgo.models.registry import REFERENCE_DIR, LoadedModel, load_model


def load_configured_model(cfg: DictConfig) -> LoadedModel:
    """Load ``cfg.model`` (name, folder or hub id, optional subfolder) through dipgo's registry,
    with ``cfg.model.lora`` applied when one is named (``extra["lora"]`` says what was applied)."""
    loaded = load_model(cfg.model.name, **({"subfolder": cfg.model.subfolder} if cfg.model.subfolder else {}))
    source = cfg.model.get("lora")
    if source:
        from dipgo.models.lora import apply_lora

        fuse = bool(cfg.model.get("lora_fuse", True))
        if not fuse and not loaded.kind.startswith("diffusion"):
            raise ModelLoadError(
                f"model.lora_fuse=false is for diffusion denoisers only; a {loaded.kind}'s SubNet is exported as "
                "plain weights, so its LoRA must be fused (model.lora_fuse=true)."
            )
        loaded.extra["lora"] = apply_lora(loaded.model, source, scale=float(cfg.model.get("lora_scale", 1.0)), fuse=fuse)
    return loaded


def model_source(loaded: LoadedModel) -> dict[str, Any]:
    """Where the model came from, in the form the exporter needs to rebuild it without dipgo."""
    if loaded.kind == "encoder":
        return {"library": "transformers", "source": loaded.source}
    folder = Path(loaded.source)
    if not folder.is_dir():
        folder = REFERENCE_DIR / loaded.source
    cfg_file = folder / "config.json"
    if cfg_file.is_file():
        cfg = json.loads(cfg_file.read_text())
        return {"library": "timm", "architecture": cfg["architecture"], "model_args": cfg.get("model_args", {}),
                "pretrained_cfg": cfg.get("pretrained_cfg", {}), "source": loaded.source}
    pcfg = dict(getattr(loaded.model, "pretrained_cfg", {}) or {})
    return {"library": "timm", "architecture": pcfg.get("architecture", loaded.source),
            "model_args": {"num_classes": getattr(loaded.model, "num_classes", 1000)}, "pretrained_cfg": pcfg,
            "source": loaded.source}
