"""Where memstore keeps what it fetches or converts once: $MEMSTORE_CACHE, default ~/.cache/memstore."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("MEMSTORE_CACHE") or Path.home() / ".cache" / "memstore"
    return Path(root).expanduser()


def models_dir() -> Path:
    """Converted generators and unpacked embedders: cache_dir() / "models"."""
    return cache_dir() / "models"
