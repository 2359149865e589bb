"""The CPU kernel in ``csrc/block_sparse_linear.cpp``: built on first use, cached, called via ctypes.

The source uses no torch headers, so one ``g++`` call builds it in about two seconds (a
``torch.utils.cpp_extension`` build takes a minute). The library is cached per source, compiler and
CPU (it is built with ``-march=native``) under ``$DIPGO_KERNEL_CACHE`` or
``~/.cache/dipgo/kernels``. Without a compiler, or when the build fails, :func:`load` warns once and
returns ``None``; callers then use the pure-PyTorch path. ``DIPGO_NATIVE_KERNELS=0`` forces that
path (tests use it to cover the fallback).

OpenMP: the library links ``libgomp.so.1``; torch has already loaded its own copy under that name,
so both share one runtime and one thread pool. The thread count is passed per call
(``torch.get_num_threads()``), never set globally.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "block_sparse_linear.cpp"
ABI_VERSION = 1
FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-fPIC", "-shared", "-std=c++17")
ACT_CODES = {"none": 0, "relu": 1, "gelu": 2}


class NativeKernel:
    """Typed handle on the loaded library."""

    def __init__(self, lib: ctypes.CDLL, path: Path) -> None:
        self.path = path
        self._forward = lib.dipgo_bsl_forward
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        self._forward.argtypes = [p, i64, i64, i64, p, i64, p, p, i64, i64, i64, p, i32, p, i64, i64, i32]
        self._forward.restype = i32
        lib.dipgo_bsl_tile_rows.argtypes = [i32]
        lib.dipgo_bsl_tile_rows.restype = i32
        self.tile_rows = {bn: int(lib.dipgo_bsl_tile_rows(bn)) for bn in (16, 32, 64)}

    def row_chunk(self, rows: int, block_rows: int, bn: int, threads: int) -> int:
        """Rows of x per work item: large enough that each block row's weights (loaded once per
        item) are reused over many rows, small enough to leave every thread several items."""
        mr = self.tile_rows[bn]
        chunk = mr * max(1, 192 // mr)
        while chunk > mr and block_rows * -(-rows // chunk) < 4 * threads:
            chunk -= mr
        return chunk

    def forward(
        self,
        x: torch.Tensor,  # (T, K) float32, unit stride in K
        values: torch.Tensor,  # (nnz, bk, bn) float32 contiguous
        col_indices: torch.Tensor,  # (nnz,) int32
        row_ptr: torch.Tensor,  # (N / bn + 1,) int32
        bias: torch.Tensor | None,  # (N,) float32 or None
        activation: str,
        out: torch.Tensor,  # (T, N) float32, unit stride in N
    ) -> torch.Tensor:
        rows, k = x.shape
        nnz, bk, bn = values.shape
        block_rows = row_ptr.numel() - 1
        threads = torch.get_num_threads()
        rc = self._forward(
            x.data_ptr(), rows, k, x.stride(0), values.data_ptr(), nnz, row_ptr.data_ptr(), col_indices.data_ptr(),
            block_rows * bn, bn, bk, bias.data_ptr() if bias is not None else None, ACT_CODES[activation],
            out.data_ptr(), out.stride(0), self.row_chunk(rows, block_rows, bn, threads), threads,
        )
        if rc == -1:
            raise ValueError(f"native block-sparse kernel refused block rows {bn}; accepted: 16, 32, 64.")
        if rc == -2:
            raise ValueError(
                f"block-sparse indices out of range for a ({block_rows * bn}, {k}) weight with blocks ({bn}, {bk}): "
                f"row_ptr must rise from 0 to {nnz} and col_indices lie in [0, {k // bk})."
            )
        return out


def _cpu_tag() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("flags", "model name"))]
        return " ".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


@functools.cache
def has_avx512() -> bool:
    """Whether this CPU has AVX-512F (the kernel's 16-float vectors are then one register)."""
    try:
        return any(ln.startswith("flags") and " avx512f" in ln for ln in Path("/proc/cpuinfo").read_text().splitlines())
    except OSError:
        return False


def compiler_available() -> bool:
    """Cheap check (no build): could :func:`load` produce a kernel?"""
    return not disabled() and _compiler() is not None


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def _cache_dir() -> Path:
    root = os.environ.get("DIPGO_KERNEL_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "dipgo" / "kernels"


def _compiler_version(cxx: str) -> str:
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def build(cxx: str, cache_dir: Path) -> Path:
    """Compile the library into ``cache_dir`` (atomically; concurrent builds are harmless) and return its path."""
    key = hashlib.sha256(
        "\n".join([SOURCE.read_text(), " ".join(FLAGS), _compiler_version(cxx), _cpu_tag()]).encode()
    ).hexdigest()[:16]
    target = cache_dir / f"block_sparse_linear_{key}.so"
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".so.tmp")
    os.close(fd)
    try:
        proc = subprocess.run(
            [cxx, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=300
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{cxx} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def disabled() -> bool:
    return os.environ.get("DIPGO_NATIVE_KERNELS", "1").strip().lower() in ("0", "false", "no", "off")


@functools.cache
def _load_cached() -> NativeKernel | None:
    cxx = _compiler()
    if cxx is None:
        warnings.warn(
            "dipgo.kernels: no C++ compiler found (set CXX or install g++); block-sparse layers run on the "
            "slower pure-PyTorch path.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    try:
        path = build(cxx, _cache_dir())
        lib = ctypes.CDLL(str(path))
        if lib.dipgo_bsl_abi_version() != ABI_VERSION:
            raise RuntimeError(f"{path} has ABI {lib.dipgo_bsl_abi_version()}, expected {ABI_VERSION}")
        return NativeKernel(lib, path)
    except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as exc:
        warnings.warn(
            f"dipgo.kernels: could not build the native CPU kernel ({exc}); block-sparse layers run on the "
            "slower pure-PyTorch path.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def load() -> NativeKernel | None:
    """The native kernel, or ``None`` (warned once) when it cannot be built or is disabled."""
    if disabled():
        return None
    return _load_cached()


def available() -> bool:
    return load() is not None
