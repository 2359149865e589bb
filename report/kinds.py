"""Look up a gate kind's reporter, the built-in kinds registered first (see :mod:`dipgo.report.registry`)."""

from __future__ import annotations

from dipgo.report.registry import Reporter, lookup_reporter


def get_reporter(kind: str, variant: str | None = None) -> Reporter:
    """The reporter of ``kind`` (and of the search task's ``variant``, e.g. joint's ``block_mask``)."""
    _load_builtin_reporters()
    return lookup_reporter(kind, variant)


def _load_builtin_reporters() -> None:
    # Imported lazily, like the tasks: each pulls in its model libraries.
    from dipgo.report import block_eval, joint_eval, mask_eval, reuse_eval  # noqa: F401
