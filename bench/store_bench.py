"""Store benchmark: add throughput, top-10 search latency and HNSW recall at 10k-1M vectors.

For each size, random 384-d unit vectors are added to a real store (SQLite + FAISS) as
documents of 1,000 chunks, with an exact (flat) index; the HNSW index is then built from
the vectors kept in SQL, as `memstore check --repair` or an automatic switch would. Search
latency is one query at a time: through the whole store (FAISS + the SQL fetch of the
chunk rows) and for the FAISS index alone. Recall@10 of HNSW is measured against exact.

Two kinds of random vectors: `gaussian` (isotropic, the literal benchmark; nearest
neighbours are barely nearer than anything else, the worst case for any ANN index) and
`clustered` (points around 2,000 random centres, closer to real sentence embeddings).

    python bench/store_bench.py --sizes 10000 100000 1000000 --out bench/results/store.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from memstore.store import ChunkIn, DocumentIn, MemoryStore
from memstore.store.index import IndexConfig

DIM = 384
DOC_CHUNKS = 1000
QUERIES = 300


def make_vectors(kind: str, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "gaussian":
        v = rng.standard_normal((n, DIM), dtype=np.float32)
    else:
        centres = np.random.default_rng(12345).standard_normal((2000, DIM), dtype=np.float32)
        v = centres[rng.integers(0, len(centres), n)] + 0.35 * rng.standard_normal((n, DIM), dtype=np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v


def fill_store(store: MemoryStore, vectors: np.ndarray) -> float:
    """Add vectors as documents of DOC_CHUNKS chunks; returns seconds."""
    start = time.perf_counter()
    for d, lo in enumerate(range(0, len(vectors), DOC_CHUNKS)):
        block = vectors[lo:lo + DOC_CHUNKS]
        chunks = [ChunkIn(i, 10 * i, 10 * i + 10, f"doc {d} chunk {i}", 4) for i in range(len(block))]
        doc = DocumentIn(f"doc{d}.txt", f"h{d}", 1, 1.0, 10 * len(block))
        store.add_document(doc, chunks, block)
    store.save_index()
    return time.perf_counter() - start


def percentiles(ms: list[float]) -> dict:
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p95_ms": round(float(np.percentile(ms, 95)), 3)}


def time_queries(fn, queries: np.ndarray) -> dict:
    for q in queries[:10]:
        fn(q)  # warm-up
    ms = []
    for q in queries:
        t = time.perf_counter()
        fn(q)
        ms.append((time.perf_counter() - t) * 1000)
    return percentiles(ms)


def recall_at_10(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx_ids, exact_ids)]))


def bench_size(kind: str, n: int, config: IndexConfig, workdir: Path) -> dict:
    vectors = make_vectors(kind, n, seed=n)
    queries = make_vectors(kind, QUERIES, seed=7)
    exact_cfg = IndexConfig(kind="flat")
    with MemoryStore(workdir / f"{kind}-{n}", index_config=exact_cfg) as store:
        store.require_embedder("random-384", DIM)
        store.checkpoint_seconds = 3600  # one save at the end, as `memstore ingest` does
        add_s = fill_store(store, vectors)
        result = {"dataset": kind, "n": n, "store_add_s": round(add_s, 2),
                  "store_add_vectors_per_s": round(n / add_s)}

        flat = store.index
        result["exact"] = {
            "store_search": time_queries(lambda q: store.search(q, k=10), queries),
            "index_search": time_queries(lambda q: flat.search(q, 10), queries),
        }
        _, exact_ids = flat.search(queries, 10)

        t = time.perf_counter()
        store.index_config = IndexConfig(kind="hnsw", hnsw_m=config.hnsw_m,
                                         ef_construction=config.ef_construction, ef_search=config.ef_search)
        store.rebuild_index()
        build_s = time.perf_counter() - t
        hnsw = store.index
        assert hnsw.kind == "hnsw"
        _, approx_ids = hnsw.search(queries, 10)
        result["hnsw"] = {
            "params": {"M": config.hnsw_m, "efConstruction": config.ef_construction, "efSearch": config.ef_search},
            "build_from_sql_s": round(build_s, 2), "build_vectors_per_s": round(n / build_s),
            "recall_at_10": round(recall_at_10(approx_ids, exact_ids), 4),
            "store_search": time_queries(lambda q: store.search(q, k=10), queries),
            "index_search": time_queries(lambda q: hnsw.search(q, 10), queries),
        }
        store._dirty = False  # keep the flat file; nothing else to save
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--datasets", nargs="+", default=["clustered", "gaussian"])
    parser.add_argument("--out", type=Path, default=Path("bench/results/store.json"))
    parser.add_argument("--workdir", type=Path, default=None, help="Where the stores go (default: a temp dir).")
    args = parser.parse_args()
    config = IndexConfig()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="store-bench-"))
    runs = [bench_size(kind, n, config, workdir) for n in args.sizes for kind in args.datasets]
    if args.out.exists():  # keep runs of other sizes/datasets from earlier invocations
        fresh = {(r["dataset"], r["n"]) for r in runs}
        runs = [r for r in json.loads(args.out.read_text())["runs"] if (r["dataset"], r["n"]) not in fresh] + runs
        runs.sort(key=lambda r: (r["dataset"], r["n"]))
    report = {
        "benchmark": "store_bench", "date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "faiss": faiss.__version__, "faiss_threads": faiss.omp_get_max_threads(),
        "dim": DIM, "queries": QUERIES, "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
