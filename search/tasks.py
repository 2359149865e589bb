"""Look up a gate kind's search task, the built-in kinds registered first.

The protocol and the registry are in :mod:`dipgo.search.registry`; this module adds the import
of the built-in tasks (lazily: each pulls in its model libraries, diffusers, timm, transformers).
"""

from __future__ import annotations

from dipgo.search.registry import Task, lookup_task, registered_kinds


def get_task(kind: str) -> Task:
    _load_builtin_tasks()
    return lookup_task(kind)


def available_tasks() -> list[str]:
    _load_builtin_tasks()
    return registered_kinds()


def _load_builtin_tasks() -> None:
    from dipgo.search import block_task, joint_task, mask_task, reuse_task  # noqa: F401
