"""Reference models (digits denoisers and classifiers, MiniLM) and loaders for any model.

``load_model("digits_unet")`` (or a folder, or a hub id) returns a ``LoadedModel`` with
``.model``, ``.kind``, ``.scheduler``, ``.tokenizer`` and ``.extra``.
"""

from dipgo.errors import ModelLoadError
from dipgo.models.digits import digits_tensors, sample_digits, to_unit_range
from dipgo.models.registry import (
    REFERENCE_DIR,
    LoadedModel,
    digits_classifier_features,
    load_digits_classifier,
    load_minilm,
    load_model,
    mean_pooled_embeddings,
    register_model,
    registered_names,
)

__all__ = [
    "REFERENCE_DIR",
    "LoadedModel",
    "ModelLoadError",
    "digits_classifier_features",
    "digits_tensors",
    "load_digits_classifier",
    "load_minilm",
    "load_model",
    "mean_pooled_embeddings",
    "register_model",
    "registered_names",
    "sample_digits",
    "to_unit_range",
]
