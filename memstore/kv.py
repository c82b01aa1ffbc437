"""On-disk key/value memory: each chunk's per-layer keys (un-rotated) and values, per model.

One `.npy` file per (model, chunk id), shape (2, layers, kv_heads, tokens, head_dim), fp16,
read back memory-mapped. Chunk ids are never reused, so a file can only ever belong to the
chunk it was computed for. A byte budget evicts the least recently used files.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np


def _model_dir_name(model_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", model_id)[:120]


class KVMemory:
    def __init__(self, root: Path, model_id: str, budget_bytes: int = 4 << 30):
        self.root = Path(root)
        self.dir = self.root / _model_dir_name(model_id)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.model_id = model_id
        self.budget_bytes = budget_bytes

    def path(self, chunk_id: int) -> Path:
        return self.dir / f"{int(chunk_id)}.npy"

    def get(self, chunk_id: int) -> np.ndarray | None:
        path = self.path(chunk_id)
        try:
            kv = np.load(path, mmap_mode="r")
        except (FileNotFoundError, ValueError, OSError):
            return None
        os.utime(path)  # recently used: last to be evicted
        return kv

    def put(self, chunk_id: int, kv: np.ndarray) -> None:
        """Write atomically (temp file + rename), then evict down to the budget."""
        path = self.path(chunk_id)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, np.ascontiguousarray(kv, dtype=np.float16))
        os.replace(tmp, path)
        self.evict()

    def evict(self) -> int:
        files = [(p.stat().st_mtime, p.stat().st_size, p) for p in self.dir.glob("*.npy") if not p.name.endswith(".tmp.npy")]
        total = sum(size for _, size, _ in files)
        removed = 0
        for _, size, path in sorted(files):
            if total <= self.budget_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size
            removed += 1
        return removed

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.dir.glob("*.npy"))


def drop_chunks(root: Path, chunk_ids) -> int:
    """Remove the KV entries of these chunks for every model."""
    root = Path(root)
    if not root.exists():
        return 0
    removed = 0
    for model_dir in root.iterdir():
        for cid in chunk_ids:
            path = model_dir / f"{int(cid)}.npy"
            if path.exists():
                path.unlink()
                removed += 1
    return removed


def stored_chunk_ids(root: Path) -> set[int]:
    root = Path(root)
    if not root.exists():
        return set()
    return {int(p.stem) for p in root.glob("*/*.npy") if p.stem.isdigit()}
