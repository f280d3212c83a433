"""What the machine can do, read from the operating system (no Triton, no torch at import): the CPU's model
and feature flags, the cores this process may use, the memory; and the precision ``auto`` resolves to.

The CPU classes, from the flags Linux reports in /proc/cpuinfo (best first):

* ``amx``: AMX tiles (``amx_bf16``): bf16 and int8 matrix products in hardware;
* ``avx512-bf16``: ``avx512_bf16`` (bf16 dot products), no AMX;
* ``avx512``: ``avx512f`` without bf16 units;
* ``avx2``: ``avx2`` and ``fma`` only;
* ``generic``: none of those (or flags unreadable: another OS, another architecture).

bf16 on a class without bf16 units (``avx512``, ``avx2``, ``generic``) is emulated: torch's bf16 image tower
ran at 0.8 img/s against 7.6 in fp32 on an AVX2 CPU. ``resolve_precision`` never picks it there.
"""
from __future__ import annotations

import os
from functools import cache
from pathlib import Path

CPU_CLASSES = ("amx", "avx512-bf16", "avx512", "avx2", "generic")
BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})
INT8_DOT_FLAGS = frozenset({"amx_int8", "avx512_vnni", "avx_vnni"})  # int8 dot products in one instruction
REPORTED_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
                  "amx_bf16", "amx_int8")


#: Where set (space-separated flags), replaces the flags of this machine's CPU: to see, or serve, what ``auto``
#: picks for another class; with ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS and ATEN_CPU_CAPABILITY (torch's own
#: kernels) held to that class's instructions, the kernels run as there too (an emulation, labelled as one by
#: ``mmfuse bench``).
FLAGS_ENV = "MMFUSE_CPU_FLAGS"
ISA_LIMITS_ENV = ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")


def cpu_model_and_flags(cpuinfo: str | Path | None = None) -> tuple[str | None, frozenset[str]]:
    """The CPU's model name and feature flags (None and an empty set where unreadable) from ``cpuinfo``, or
    from /proc/cpuinfo with the flags replaced by $MMFUSE_CPU_FLAGS where that is set."""
    model, flags = None, frozenset()
    try:
        for line in Path(cpuinfo or "/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model is None:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    if cpuinfo is None and os.environ.get(FLAGS_ENV, "").strip():
        flags = frozenset(os.environ[FLAGS_ENV].split())
    return model, flags


def emulation() -> dict[str, str]:
    """The settings that make this machine pass for another CPU ($MMFUSE_CPU_FLAGS, the ISA limits), where set."""
    return {k: os.environ[k] for k in (FLAGS_ENV, *ISA_LIMITS_ENV) if os.environ.get(k, "").strip()}


@cache
def this_cpu_flags() -> frozenset[str]:
    return cpu_model_and_flags()[1]


def cpu_class(flags: frozenset[str] | set[str]) -> str:
    if "amx_bf16" in flags:
        return "amx"
    if "avx512_bf16" in flags:
        return "avx512-bf16"
    if "avx512f" in flags:
        return "avx512"
    if "avx2" in flags:
        return "avx2"
    return "generic"


def has_bf16_units(flags: frozenset[str] | set[str]) -> bool:
    return bool(BF16_FLAGS & set(flags))


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota (a container's limit)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def memory_bytes() -> int | None:
    """Memory this process may use: MemTotal, capped by a cgroup v2 memory limit."""
    total = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            total = min(total or int(limit), int(limit))
    except (OSError, ValueError):
        pass
    return total


def resolve_precision(precision: str, instance_kind: str = "CPU", flags: frozenset[str] | None = None) -> str:
    """``auto`` -> fp16 on a GPU instance, bf16 on a CPU with bf16 units, fp32 otherwise; others unchanged."""
    if precision != "auto":
        return precision
    if instance_kind == "GPU":
        return "fp16"
    return "bf16" if has_bf16_units(this_cpu_flags() if flags is None else flags) else "fp32"
