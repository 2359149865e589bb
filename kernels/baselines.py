"""The dense fp32 linear paths torch offers on a CPU: the bar every kernel speed-up is quoted against.

``F.linear`` runs MKL's sgemm (on AMD CPUs MKL may take its AVX2 path even where AVX-512 exists);
oneDNN (``torch.ops.mkldnn._linear_pointwise``, what inductor's CPU backend calls) picks its own
ISA from the CPU and is often faster. A speed-up over MKL alone would flatter the kernel, so
benchmarks and the kernel-or-dense decision (:mod:`dipgo.kernels.decide`) time both and compare
against the faster one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

DenseFn = Callable[[], torch.Tensor]


def onednn_available() -> bool:
    """Whether this torch build has oneDNN's fused linear op."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


def dense_paths(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> dict[str, DenseFn]:
    """``{"mkl": ..., "onednn": ...}``: zero-argument calls of ``x @ weight^T + bias`` on each
    dense path this torch has (oneDNN only where available and only for float32)."""
    paths: dict[str, DenseFn] = {"mkl": lambda: F.linear(x, weight, bias)}
    if onednn_available() and x.dtype == torch.float32:
        def onednn() -> torch.Tensor:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")

        try:
            with torch.inference_mode():
                onednn()
            paths["onednn"] = onednn
        except RuntimeError:
            pass  # a build whose oneDNN refuses this shape or layout: MKL alone is the bar
    return paths
