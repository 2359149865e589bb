"""The CPU kernel in ``csrc/block_sparse_linear.cpp``: built on first use, cached, called via ctypes.

The source uses no torch headers, so one ``g++`` call builds it in about two seconds (a
``torch.utils.cpp_extension`` build takes a minute).

ISA: the kernel has one register-tile shape per instruction set (see the source's header). The
build targets AVX-512 (``-march=x86-64-v4``) when the CPU has it, else AVX2 + FMA
(``-march=x86-64-v3``), else a portable build; ``DIPGO_KERNEL_ISA=avx2|avx512|portable`` overrides
the choice (e.g. to build and time the AVX2 path on an AVX-512 machine: that build has no
AVX-512 instruction in it). A requested ISA the CPU cannot run, or that the compiler cannot
target, is refused with one warning. The library reports the ISA it was compiled for and the
loader checks it.

The library is cached per source, flags, ISA, compiler and CPU (model name and feature flags are
in the key, so a build from another CPU is never loaded) under ``$DIPGO_KERNEL_CACHE`` or
``~/.cache/dipgo/kernels``. Without a compiler, or when the build fails, :func:`load` warns once and
returns ``None``: the op then computes with the pure-PyTorch path, and SubNet conversion keeps
layers dense (:mod:`dipgo.kernels.decide`). ``DIPGO_NATIVE_KERNELS=0`` forces that path (tests use
it to cover the fallback).

When the environment is read: :func:`load` reads ``DIPGO_KERNEL_ISA`` and ``DIPGO_NATIVE_KERNELS``
on every call, but a ``BlockSparseLinear`` resolves its kernel once, when it first runs (its
:class:`PreparedCall`), and again after :func:`reset`: set them before the run, or call
:func:`reset` after changing them.

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
ABI_VERSION = 4
FLAGS = ("-O3", "-ffp-contract=fast", "-fopenmp", "-fPIC", "-shared", "-std=c++17")
ISA_ENV = "DIPGO_KERNEL_ISA"
ISA_FLAGS = {
    "avx512": ("-march=x86-64-v4", "-mtune=native"),
    "avx2": ("-march=x86-64-v3", "-mtune=native"),
    "portable": (),
}
"""Target flags per ISA. ``x86-64-v3`` is AVX2 + FMA + BMI without any AVX-512; ``-v4`` adds AVX-512F/BW/DQ/VL."""
PREFETCHW_FLAG = "3dnowprefetch"
"""``/proc/cpuinfo``'s name for PREFETCHW. Where the CPU has it, the x86 builds add ``-mprfchw`` so
the kernel's prefetch of output lines asks for them with intent to write (Zen 4, AVX2 build, A/B
against a plain prefetch: +13 % at 128 tokens, +7 % at 256, 768->3072 at 90 %)."""
ISA_CODES = {0: "portable", 1: "avx2", 2: "avx512"}
"""What ``dipgo_bsl_isa()`` returns, by name."""
ISA_CPU_FLAGS = {"avx512": ("avx512f", "avx512bw", "avx512dq", "avx512vl"), "avx2": ("avx2", "fma"), "portable": ()}
"""``/proc/cpuinfo`` flags the CPU needs to run each build."""
ACT_CODES = {"none": 0, "relu": 1, "gelu": 2}


def _cache_bytes(index: int, default: int) -> int:
    """Size of cpu0's cache at sysfs ``index`` (2: L2, 3: L3) in bytes; ``default`` where unknown."""
    try:
        text = Path(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size").read_text().strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
        return int(text.rstrip("KM")) * scale
    except (OSError, ValueError):
        return default


L2_BYTES = _cache_bytes(2, 1 << 20)
"""One core's L2: a work item's rows of x should fit in it (measured on 3072->768 at 2048 tokens:
192-row chunks, 2.4 MB of x, ran 15 % slower than 60-row chunks)."""
L3_BYTES = _cache_bytes(3, 32 << 20)
"""Outputs over half of it are written with streaming stores (they would not stay cached for the
next layer; measured on 768->3072 at 2048 tokens, 25 MB of y: 7.5 -> 5.5 ms at 90 % sparsity)."""


class KernelUnavailable(RuntimeError):
    """The native kernel cannot be used here; the message is one sentence naming the reason."""


_generation = 0
"""Bumped by :func:`reset`: a :class:`PreparedCall` made before it is stale."""


class PreparedCall:
    """One layer's kernel call with the weight's arguments converted once.

    Why: a SubNet calls the same layer with the same weight every time, and on a 2-core Zen 4 the
    Python before the kernel cost about 170 us per call right after a dense layer (caches cold:
    every attribute, dict and ctypes conversion touched is a miss), on a kernel call of 0.8 ms
    (768->3072, 256 tokens, 90 % block sparsity). What stays per call is x, y, the row chunk, the
    thread count and the streaming decision. The call belongs to the tensors it was made from:
    :meth:`current` says whether those are still the layer's (same objects, same storage) and
    whether the kernel is still the loaded one (:func:`reset`).
    """

    __slots__ = ("kernel", "tensors", "ptrs", "generation", "in_features", "out_features", "block_rows", "bn",
                 "_weight_args")

    def __init__(self, kernel: NativeKernel, values: torch.Tensor, col_indices: torch.Tensor, row_ptr: torch.Tensor,
                 bias: torch.Tensor | None, activation: str, in_features: int) -> None:
        nnz, bk, bn = values.shape
        self.kernel = kernel
        self.tensors = (values, col_indices, row_ptr, bias)
        self.ptrs = tuple(0 if t is None else t.data_ptr() for t in self.tensors)
        self.generation = _generation
        self.in_features = in_features
        self.block_rows = row_ptr.numel() - 1
        self.bn = bn
        self.out_features = self.block_rows * bn
        self._weight_args = (values.data_ptr(), nnz, row_ptr.data_ptr(), col_indices.data_ptr(), self.out_features,
                             bn, bk, bias.data_ptr() if bias is not None else None, ACT_CODES[activation])

    def current(self, values: torch.Tensor, col_indices: torch.Tensor, row_ptr: torch.Tensor,
                bias: torch.Tensor | None) -> bool:
        t, p = self.tensors, self.ptrs
        return (self.generation == _generation and values is t[0] and col_indices is t[1] and row_ptr is t[2]
                and bias is t[3] and values.data_ptr() == p[0] and col_indices.data_ptr() == p[1]
                and row_ptr.data_ptr() == p[2] and (bias is None or bias.data_ptr() == p[3]))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``act(x @ W^T + b)`` for a float32 CPU ``x`` of shape (..., in_features)."""
        k, n = self.in_features, self.out_features
        if x.is_contiguous():  # no reshape / view: each is a tensor object, ~30 us with cold caches
            rows, ldx = x.numel() // k, k
            y = torch.empty(rows, n) if x.dim() == 2 else torch.empty((*x.shape[:-1], n))
        else:
            y = torch.empty((*x.shape[:-1], n))
            x = x.reshape(-1, k)
            if x.stride(1) != 1:
                x = x.contiguous()
            rows, ldx = x.shape[0], x.stride(0)
        kernel, threads = self.kernel, torch.get_num_threads()
        rc = kernel._forward(x.data_ptr(), rows, k, ldx, *self._weight_args, y.data_ptr(), n,
                             kernel.row_chunk(rows, self.block_rows, self.bn, threads, k), threads,
                             int(4 * rows * n > L3_BYTES // 2))
        if rc:
            kernel.raise_for(rc, self.bn, k, n, self._weight_args[1], self._weight_args[6])
        return y


class NativeKernel:
    """Typed handle on the loaded library."""

    def __init__(self, lib: ctypes.CDLL, path: Path, isa: str) -> None:
        self.path = path
        self.isa = isa
        self._forward = lib.dipgo_bsl_forward
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        self._forward.argtypes = [p, i64, i64, i64, p, i64, p, p, i64, i64, i64, p, i32, p, i64, i64, i32, i32]
        self._forward.restype = i32
        lib.dipgo_bsl_tile_rows.argtypes = [i32]
        lib.dipgo_bsl_tile_rows.restype = i32
        self.tile_rows = {bn: int(lib.dipgo_bsl_tile_rows(bn)) for bn in (16, 32, 64)}
        self._packs_chunks = lib.dipgo_bsl_packs_chunks
        self._packs_chunks.argtypes = [i64, i64, i64, i64, i64, i64, i64, i64, i32]
        self._packs_chunks.restype = i32
        self._chunks: dict[tuple[int, ...], int] = {}  # row_chunk per call shape: the per-call Python cost counts

    def row_chunk(self, rows: int, block_rows: int, bn: int, threads: int, in_features: int = 0) -> int:
        key = (rows, block_rows, bn, threads, in_features, L2_BYTES)
        chunk = self._chunks.get(key)
        if chunk is None:
            chunk = self._chunks[key] = self._row_chunk(rows, block_rows, bn, threads, in_features)
        return chunk

    def _row_chunk(self, rows: int, block_rows: int, bn: int, threads: int, in_features: int) -> int:
        """Rows of x per work item: large enough that each block row's weights (loaded once per
        item) are reused over many rows, small enough that the rows of x fit in 3/4 of an L2
        (every block row of a chunk reads them again) and that every thread gets several items."""
        mr = self.tile_rows[bn]
        fit = (3 * L2_BYTES // 4) // max(1, 4 * in_features)
        chunk = mr * max(1, min(192, fit) // mr)
        while chunk > mr and block_rows * -(-rows // chunk) < 4 * threads:
            chunk -= mr
        return chunk

    def packs_chunks(self, x: torch.Tensor, values: torch.Tensor, out_features: int) -> bool:
        """Whether :meth:`forward` on ``x`` (T, K) with these block values, at the current thread
        count, copies whole row chunks of x first (the loop for sparse weights and many tokens,
        see the source) rather than reading x in place."""
        rows, k = x.shape
        nnz, bk, bn = values.shape
        threads = torch.get_num_threads()
        chunk = self.row_chunk(rows, out_features // bn, bn, threads, k)
        return bool(self._packs_chunks(rows, k, x.stride(0), nnz, out_features, bn, bk, chunk, threads))

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
            out.data_ptr(), out.stride(0), self.row_chunk(rows, block_rows, bn, threads, k), threads,
            int(4 * rows * block_rows * bn > L3_BYTES // 2),
        )
        if rc:
            self.raise_for(rc, bn, k, block_rows * bn, nnz, bk)
        return out

    def prepare(self, values: torch.Tensor, col_indices: torch.Tensor, row_ptr: torch.Tensor,
                bias: torch.Tensor | None, activation: str, in_features: int) -> PreparedCall:
        """A :class:`PreparedCall` for this weight: contiguous float32 CPU ``values`` (nnz, bk, bn),
        int32 ``col_indices`` / ``row_ptr``, float32 ``bias`` or ``None``; the caller has checked them."""
        return PreparedCall(self, values, col_indices, row_ptr, bias, activation, in_features)

    @staticmethod
    def raise_for(rc: int, bn: int, k: int, n: int, nnz: int, bk: int) -> None:
        """The error for a nonzero return code of ``dipgo_bsl_forward``."""
        if rc == -1:
            raise ValueError(f"native block-sparse kernel refused block rows {bn}; accepted: 16, 32, 64.")
        if rc == -2:
            raise ValueError(
                f"block-sparse indices out of range for a ({n}, {k}) weight with blocks ({bn}, {bk}): "
                f"row_ptr must rise from 0 to {nnz} and col_indices lie in [0, {k // bk})."
            )
        raise RuntimeError(f"native block-sparse kernel returned {rc}.")


def _cpu_tag() -> str:
    """What a build depends on besides its flags: the CPU's model and feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("flags", "model name", "cpu family", "model\t"))]
        return " ".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (``/proc/cpuinfo``; empty where that file does not exist)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def has_avx512() -> bool:
    """Whether this CPU can run the AVX-512 build."""
    return cpu_can_run("avx512")


def cpu_can_run(isa: str) -> bool:
    """Whether this CPU has every feature the ``isa`` build uses."""
    if isa != "portable" and platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return set(ISA_CPU_FLAGS[isa]) <= cpu_flags()


def native_isa() -> str:
    """The best ISA this CPU runs: ``avx512``, ``avx2`` or ``portable``."""
    return next(isa for isa in ("avx512", "avx2", "portable") if cpu_can_run(isa))


def requested_isa() -> str:
    """``$DIPGO_KERNEL_ISA`` (``auto`` or unset: :func:`native_isa`). Raises :class:`KernelUnavailable`
    for an unknown name or an ISA this CPU cannot run."""
    raw = os.environ.get(ISA_ENV, "").strip().lower()
    if raw in ("", "auto", "native"):
        return native_isa()
    if raw not in ISA_FLAGS:
        raise KernelUnavailable(
            f"{ISA_ENV}={raw!r} is not an ISA the kernel has; accepted: auto, {', '.join(ISA_FLAGS)}."
        )
    if not cpu_can_run(raw):
        missing = sorted(set(ISA_CPU_FLAGS[raw]) - cpu_flags()) or [platform.machine()]
        raise KernelUnavailable(f"{ISA_ENV}={raw} needs CPU features this CPU lacks ({', '.join(missing)}).")
    return raw


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


def isa_flags(isa: str) -> tuple[str, ...]:
    """Compiler flags for the ``isa`` build on this CPU."""
    extra = ("-mprfchw",) if isa != "portable" and PREFETCHW_FLAG in cpu_flags() else ()
    return (*ISA_FLAGS[isa], *extra)


def build_key(cxx: str, isa: str) -> str:
    """Digest of everything the library depends on: source, flags, ISA, compiler, CPU."""
    parts = [SOURCE.read_text(), " ".join(FLAGS), isa, " ".join(isa_flags(isa)), _compiler_version(cxx), _cpu_tag()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def build(cxx: str, cache_dir: Path, isa: str | None = None) -> Path:
    """Compile the library for ``isa`` (default: :func:`requested_isa`) into ``cache_dir``
    (atomically; concurrent builds are harmless) and return its path."""
    isa = requested_isa() if isa is None else isa
    target = cache_dir / f"block_sparse_linear_{isa}_{build_key(cxx, isa)}.so"
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".so.tmp")
    os.close(fd)
    try:
        proc = subprocess.run(
            [cxx, *FLAGS, *isa_flags(isa), str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=300
        )
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
            raise RuntimeError(f"{cxx} could not build the {isa} kernel ({last.strip()})")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def disabled() -> bool:
    return os.environ.get("DIPGO_NATIVE_KERNELS", "1").strip().lower() in ("0", "false", "no", "off")


def _warn(reason: str) -> None:
    warnings.warn(
        f"dipgo.kernels: {reason.rstrip('.')}; the native CPU kernel is off, so SubNets keep their layers "
        "dense (a direct call of the op computes with the slower pure-PyTorch path).",
        RuntimeWarning,
        stacklevel=4,
    )


def open_kernel(cxx: str, cache_dir: Path, isa: str) -> NativeKernel:
    """Build (or reuse) and load the ``isa`` library; raises on any failure."""
    path = build(cxx, cache_dir, isa)
    lib = ctypes.CDLL(str(path))
    if lib.dipgo_bsl_abi_version() != ABI_VERSION:
        raise RuntimeError(f"{path} has ABI {lib.dipgo_bsl_abi_version()}, expected {ABI_VERSION}")
    built = ISA_CODES.get(lib.dipgo_bsl_isa(), "unknown")
    if built != isa:
        raise RuntimeError(f"{cxx} was asked for {isa} code but produced {built} code")
    return NativeKernel(lib, path, isa)


@functools.cache
def _load_cached(isa: str | None = None) -> NativeKernel | None:
    """One load per ISA and process (a failure is warned about once, then remembered)."""
    cxx = _compiler()
    if cxx is None:
        _warn(f"no C++ compiler found ({os.environ.get('CXX', 'g++')}; set CXX or install g++)")
        return None
    try:
        return open_kernel(cxx, _cache_dir(), requested_isa() if isa is None else isa)
    except KernelUnavailable as exc:
        _warn(str(exc))
    except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as exc:
        _warn(f"could not build the native CPU kernel: {exc}")
    return None


def load() -> NativeKernel | None:
    """The native kernel for the requested ISA, or ``None`` (warned once) when it cannot be
    built, the ISA is refused, or the kernel is disabled. Called on every eager kernel call, so
    it costs one cache lookup per setting of the two environment variables."""
    return _load_for(os.environ.get("DIPGO_NATIVE_KERNELS"), os.environ.get(ISA_ENV))


@functools.cache
def _load_for(disable_env: str | None, isa_env: str | None) -> NativeKernel | None:
    """:func:`load` for one value of ``DIPGO_NATIVE_KERNELS`` and ``DIPGO_KERNEL_ISA``."""
    if disabled():
        return None
    try:
        isa = requested_isa()
    except KernelUnavailable as exc:
        return _refused(str(exc))
    return _load_cached(isa)


@functools.cache
def _refused(reason: str) -> None:
    _warn(reason)
    return None


def reset() -> None:
    """Forget every loaded kernel and remembered failure (tests that change the compiler, the
    cache folder or the environment call this). Layers re-resolve their kernel after it."""
    global _generation
    _generation += 1
    _load_for.cache_clear()
    _load_cached.cache_clear()
    _refused.cache_clear()


def available() -> bool:
    return load() is not None
