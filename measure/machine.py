"""What a timing was measured on: CPU model, SIMD flags, threads and package versions.

Speed differs between CPUs (AVX-512 or only AVX2, core count) and between torch releases, so
every figure dipgo writes carries this record next to it.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_bf16",
              "avx512_vnni", "amx_tile")


def cpu_model() -> str:
    """``model name`` of ``/proc/cpuinfo`` (``platform.processor()`` where that file does not exist)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cpu_numbers() -> dict[str, str]:
    """``cpu family`` and ``model`` (the number: Zen 3 and Zen 4 share the model name "AMD EPYC")."""
    out: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("cpu family", "model") and key not in out:
                out[key] = value.strip()
    except OSError:
        pass
    return out


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_record() -> dict[str, Any]:
    """The record written beside every timing."""
    flags = _flags()
    numbers = _cpu_numbers()
    return {
        "cpu": cpu_model(),
        "cpu_family": numbers.get("cpu family"),
        "cpu_model_number": numbers.get("model"),
        "simd_flags": [f for f in SIMD_FLAGS if f in flags],
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "aten_cpu_capability_env": os.environ.get("ATEN_CPU_CAPABILITY"),
        "logical_cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": _version("diffusers"),
        "transformers": _version("transformers"),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
