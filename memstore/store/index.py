"""FAISS vector index keyed by chunk id, with an atomic, self-describing file format.

Exact inner product (IndexFlatIP) for small stores, HNSW above a size threshold.
HNSW cannot remove vectors, so removed ids become tombstones that searches skip;
the store rebuilds the index from SQL when tombstones pile up.
"""
from __future__ import annotations

import json
import os
import struct
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from memstore.errors import IndexCorruptError, InvalidInputError

MAGIC = b"MEMSTORE-FAISS\x01"
EXACT, HNSW = "flat", "hnsw"


@dataclass
class IndexConfig:
    kind: str = "auto"  # "auto", "flat" or "hnsw"
    # exact search grows with the vectors: past about this many, HNSW answers faster at the same recall (bench/results/store.json)
    hnsw_threshold: int = 25_000
    hnsw_m: int = 32
    ef_construction: int = 100
    ef_search: int = 128  # recall@10 near 1 at 1M clustered vectors (bench/results/store.json)

    def kind_for(self, n: int) -> str:
        if self.kind != "auto":
            return self.kind
        return HNSW if n >= self.hnsw_threshold else EXACT


@dataclass
class VectorIndex:
    dim: int
    kind: str = EXACT
    config: IndexConfig = field(default_factory=IndexConfig)
    tombstones: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.kind not in (EXACT, HNSW):
            raise InvalidInputError(f"unknown index kind {self.kind!r}; use 'flat' or 'hnsw'")
        self.faiss = faiss.IndexIDMap2(self._base())

    def _base(self) -> faiss.Index:
        if self.kind == EXACT:
            return faiss.IndexFlatIP(self.dim)
        base = faiss.IndexHNSWFlat(self.dim, self.config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        base.hnsw.efConstruction = self.config.ef_construction
        base.hnsw.efSearch = self.config.ef_search
        return base

    @property
    def size(self) -> int:
        """Number of live vectors."""
        return self.faiss.ntotal - len(self.tombstones)

    def ids(self) -> np.ndarray:
        all_ids = faiss.vector_to_array(self.faiss.id_map)
        if not self.tombstones:
            return all_ids
        return all_ids[~np.isin(all_ids, np.fromiter(self.tombstones, np.int64))]

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        assert vectors.shape == (len(ids), self.dim), f"vectors {vectors.shape}, expected ({len(ids)}, {self.dim})"
        if len(ids) == 0:
            return
        if self.tombstones.intersection(ids.tolist()):
            raise ValueError("cannot re-add a removed id to an HNSW index; rebuild it")
        self.faiss.add_with_ids(vectors, ids)

    def remove(self, ids: np.ndarray) -> None:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return
        if self.kind == EXACT:
            self.faiss.remove_ids(faiss.IDSelectorBatch(ids))
        else:
            present = np.isin(ids, faiss.vector_to_array(self.faiss.id_map))
            self.tombstones.update(ids[present].tolist())

    def vectors(self, ids: list[int]) -> dict[int, np.ndarray]:
        """The stored vectors of those ids that the index holds (live ones)."""
        out = {}
        for i in ids:
            if i in self.tombstones:
                continue
            try:
                out[i] = self.faiss.reconstruct(int(i))
            except RuntimeError:  # not in the index
                continue
        return out

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None):
        """Top-k by inner product. Returns (scores, ids), both (n_queries, k); missing hits have id -1."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if len(queries) == 1:  # one query gains nothing from threads, and loses a lot on a busy machine
            with _omp_threads(1):
                return self._search(queries, k, allowed)
        return self._search(queries, k, allowed)

    def _search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None):
        selectors = []  # faiss keeps raw pointers: hold the Python objects until the search is done
        if allowed is not None:
            selectors.append(faiss.IDSelectorBatch(np.ascontiguousarray(allowed, dtype=np.int64)))
        if self.tombstones:
            dead = faiss.IDSelectorBatch(np.fromiter(self.tombstones, np.int64))
            selectors += [dead, faiss.IDSelectorNot(dead)]
        sel = None
        if allowed is not None and self.tombstones:
            sel = faiss.IDSelectorAnd(selectors[0], selectors[-1])
            selectors.append(sel)
        elif selectors:
            sel = selectors[-1]
        if self.kind == HNSW:
            # a filter hides part of the graph: widen the search in proportion (recall holds up)
            kept = 1.0 if allowed is None else max(len(allowed) / max(1, self.faiss.ntotal), 1 / 16)
            params = faiss.SearchParametersHNSW(efSearch=max(int(self.config.ef_search / kept), k))
            if sel is not None:
                params.sel = sel
        else:
            params = faiss.SearchParameters(sel=sel) if sel is not None else None
        k_eff = max(1, min(k, self.faiss.ntotal))
        scores, ids = self.faiss.search(queries, k_eff, params=params)
        return scores, ids

    def save(self, path: Path, generation: int) -> None:
        """Write to a temporary file, fsync, then rename over `path`: a crash leaves the old file whole."""
        header = json.dumps(
            {"generation": generation, "dim": self.dim, "kind": self.kind,
             "tombstones": sorted(self.tombstones), "config": self.config.__dict__}
        ).encode()
        blob = faiss.serialize_index(self.faiss)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(MAGIC + struct.pack("<Q", len(header)) + header)
            f.write(memoryview(blob))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)

    @classmethod
    def load(cls, path: Path) -> tuple[VectorIndex, int]:
        """Read an index file; returns the index and the store generation it was saved at."""
        try:
            data = path.read_bytes()
            if not data.startswith(MAGIC):
                raise ValueError("bad magic bytes")
            (n,) = struct.unpack_from("<Q", data, len(MAGIC))
            start = len(MAGIC) + 8
            header = json.loads(data[start:start + n])
            index = cls.__new__(cls)
            index.dim, index.kind = header["dim"], header["kind"]
            index.config = IndexConfig(**header["config"])
            index.tombstones = set(header["tombstones"])
            index.faiss = faiss.deserialize_index(np.frombuffer(data, np.uint8, offset=start + n))
            if not isinstance(index.faiss, faiss.IndexIDMap2):
                index.faiss = faiss.downcast_index(index.faiss)
            if index.faiss.d != index.dim:
                raise ValueError(f"dimension {index.faiss.d} != header {index.dim}")
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, struct.error) as e:
            raise IndexCorruptError(
                f"cannot read index file {path} ({e}); run `memstore check --repair` to rebuild it from SQL"
            ) from e
        return index, header["generation"]


@contextmanager
def _omp_threads(n: int):
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
