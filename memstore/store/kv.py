"""On-disk key/value memory: each chunk's per-layer keys (un-rotated) and values, per model.

One `.npy` file per (model, chunk id), shape (2, layers, kv_heads, tokens, head_dim), read
back memory-mapped: fp16, or int8 with a per-row (layer, head, token) scale kept as fp16 in
two extra int8 columns (head_dim + 2 bytes per row instead of 2 * head_dim). Chunk ids are
never reused, so a file can only ever belong to the chunk it was computed for. A byte
budget evicts the least recently used files.
"""
from __future__ import annotations

import os
import re
import socket
import threading
from pathlib import Path

import numpy as np

from memstore.errors import InvalidInputError
from memstore.settings import KV_BUDGET_GIB


def _model_dir_name(model_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", model_id)[:120]


KV_DTYPES = ("fp16", "int8")


def quantize_int8(kv: np.ndarray) -> np.ndarray:
    """(..., D) floats -> (..., D + 2) int8: absmax-scaled values, then the row's fp16 scale as 2 bytes."""
    x = np.asarray(kv, dtype=np.float32)
    scale = (np.abs(x).max(axis=-1, keepdims=True) / 127.0).astype(np.float16)
    safe = np.where(scale == 0, np.float16(1), scale).astype(np.float32)
    q = np.clip(np.rint(x / safe), -127, 127).astype(np.int8)
    return np.concatenate([q, scale.view(np.int8)], axis=-1)


def dequantize(stored: np.ndarray) -> np.ndarray:
    """What `get` returns: fp16 as stored, or int8 rows times their scale."""
    if stored.dtype != np.int8:
        return stored
    scale = np.ascontiguousarray(stored[..., -2:]).view(np.float16).astype(np.float32)
    return (stored[..., :-2].astype(np.float32) * scale).astype(np.float16)


def bytes_per_token(n_layers: int, n_kv_heads: int, head_dim: int, dtype: str = "fp16") -> int:
    row = 2 * head_dim if dtype == "fp16" else head_dim + 2
    return 2 * n_layers * n_kv_heads * row


class KVMemory:
    def __init__(self, root: Path, model_id: str, budget_bytes: int = int(KV_BUDGET_GIB * 2**30), dtype: str = "fp16"):
        if dtype not in KV_DTYPES:
            raise InvalidInputError(f"KV dtype must be one of {', '.join(KV_DTYPES)}, not {dtype!r}")
        self.dtype = dtype
        self.root = Path(root)
        self.dir = self.root / _model_dir_name(model_id)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.model_id = model_id
        self.budget_bytes = budget_bytes
        self._bytes: int | None = None  # the directory's size: listed once, then kept by put and evict,
        self._seen = -1  # while the directory's mtime is the one this process saw last

    def path(self, chunk_id: int) -> Path:
        return self.dir / f"{int(chunk_id)}.npy"

    def get(self, chunk_id: int) -> np.ndarray | None:
        path = self.path(chunk_id)
        try:
            kv = np.load(path, mmap_mode="r")
        except (FileNotFoundError, ValueError, OSError):
            return None
        try:
            os.utime(path)  # recently used: last to be evicted
        except FileNotFoundError:  # evicted by another writer since: the open mapping still reads whole
            pass
        return dequantize(kv)

    def put(self, chunk_id: int, kv: np.ndarray) -> np.ndarray:
        """Write atomically (temp file + rename), then evict down to the budget.

        Returns what `get` will return for it (int8 rounding included), so that an answer
        does not depend on whether its memory was just encoded or read back.
        """
        path = self.path(chunk_id)
        # a name of this writer's own: processes on several machines may encode the same chunk at once
        tmp = path.with_name(f".{path.stem}.{socket.gethostname()}.{os.getpid()}.{threading.get_ident()}.tmp.npy")
        data = quantize_int8(kv) if self.dtype == "int8" else np.ascontiguousarray(kv, dtype=np.float16)
        total = self.nbytes()
        try:
            total -= path.stat().st_size  # replaced
        except FileNotFoundError:
            pass
        np.save(tmp, data)
        os.replace(tmp, path)
        self._bytes = total + path.stat().st_size
        self._seen = self.dir.stat().st_mtime_ns
        if self._bytes > self.budget_bytes:
            self.evict()
        return dequantize(data)

    def evict(self) -> int:
        """Remove the least recently used files down to the budget (the one place the directory is listed
        after the first count, so what other processes wrote is counted again here)."""
        files = [(st.st_mtime, st.st_size, path) for path, st in self._entries()]
        total = sum(size for _, size, _ in files)
        removed = 0
        for _, size, path in sorted(files):
            if total <= self.budget_bytes:
                break
            path.unlink(missing_ok=True)  # another writer may have evicted it first
            total -= size
            removed += 1
        self._bytes, self._seen = total, self.dir.stat().st_mtime_ns
        return removed

    def nbytes(self) -> int:
        """Bytes held. The directory is listed only when something else changed it (another process,
        `drop_chunks`) since this object last did: otherwise one stat of the directory."""
        seen = self.dir.stat().st_mtime_ns
        if self._bytes is None or seen != self._seen:
            self._bytes = sum(st.st_size for _, st in self._entries())
            self._seen = seen
        return self._bytes

    def _entries(self) -> list[tuple[Path, os.stat_result]]:
        """Finished entries with their stat (temporary files start with a dot; one may vanish while listed)."""
        found = []
        for path in self.dir.glob("[0-9]*.npy"):
            try:
                found.append((path, path.stat()))
            except FileNotFoundError:  # evicted by another writer meanwhile
                pass
        return found


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
