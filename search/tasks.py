"""Look up a gate kind's search task, the built-in kinds registered first.

The protocol and the registry are in :mod:`dipgo.search.registry`; this module adds the import
of the built-in tasks (lazily: each pulls in its model libraries, diffusers, timm, transformers).
"""

from __future__ import annotations

from omegaconf import DictConfig

from dipgo.search.registry import Task, lookup_task, registered_kinds


def get_task(kind: str, cfg: DictConfig | None = None) -> Task:
    """The task of ``kind`` (the variant ``cfg`` selects, see :func:`dipgo.search.registry.register_task`)."""
    _load_builtin_tasks()
    return lookup_task(kind, cfg)


def available_tasks() -> list[str]:
    _load_builtin_tasks()
    return registered_kinds()


def _load_builtin_tasks() -> None:
    from dipgo.search import block_task, joint_block_task, joint_task, mask_task, reuse_task  # noqa: F401
