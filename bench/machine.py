"""What the benchmarks say about the machine they ran on. Importing it changes nothing (unlike
longctx.py, which holds torch to one thread for its own runs)."""
from __future__ import annotations

import platform
from pathlib import Path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_features() -> list[str]:
    """Which of FEATURES this CPU has (/proc/cpuinfo): what decides the fast formats and kernels."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return [f for f in FEATURES if f in flags]
    except OSError:
        pass
    return []
