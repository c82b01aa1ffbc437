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
