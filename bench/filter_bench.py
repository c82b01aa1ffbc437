"""Filtered search cost against store size: does a search restricted to a few documents cost the
same in a 1k-chunk store as in a 100k-chunk one?

Random 384-d unit vectors in documents of 10 chunks (100 to 10,000 documents), each with a path
and a `team` in its metadata; five documents form the team the filters select. Per store size,
side by side in one run: the documents matching a filter found the way memstore did before (every
document read and tested in Python, each time) and now (narrowed in SQL, tested exactly, kept
until the next write), then whole dense and hybrid searches with the filter, first call (nothing
kept) and repeated.

    python bench/filter_bench.py --sizes 1000 100000 --out bench/results/filters.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from sqlalchemy import select

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_name  # noqa: E402

from memstore.store import ChunkIn, DocumentIn, MemoryStore  # noqa: E402
from memstore.store.schema import Document  # noqa: E402
from memstore.store.search import _filter_predicate  # noqa: E402

DIM = 384
DOC_CHUNKS = 10
FILTERS = {"path": {"path": "docs/team-small/*"}, "meta": {"meta.team": "small"}}
REPEATS = 50


def fill(store: MemoryStore, n_chunks: int, rng: np.random.Generator) -> None:
    vectors = rng.standard_normal((n_chunks, DIM), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    n_docs = n_chunks // DOC_CHUNKS
    for d in range(n_docs):
        team = "small" if d % (n_docs // 5) == 0 else f"t{d % 10}"
        folder = "team-small" if team == "small" else f"team{d % 10}"
        chunks = [ChunkIn(i, 10 * i, 10 * i + 10, f"doc {d} chunk {i} about topic {(d * 7 + i) % 97}", 6)
                  for i in range(DOC_CHUNKS)]
        doc = DocumentIn(f"docs/{folder}/doc{d}.txt", f"h{d}", 1, 1.0, 10 * DOC_CHUNKS, meta={"team": team})
        store.add_document(doc, chunks, vectors[d * DOC_CHUNKS:(d + 1) * DOC_CHUNKS])
    store.save_index()


def python_over_all_documents(store: MemoryStore, filters: dict) -> list[int]:
    """What document_ids_matching did before: read every document, test each in Python."""
    predicates = [_filter_predicate(k, v) for k, v in filters.items()]
    with store.engine.connect() as conn:
        rows = conn.execute(select(Document.id, Document.source, Document.meta)).all()
    return [r.id for r in rows if all(p(r) for p in predicates)]


def median_ms(fn, repeats: int = REPEATS) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return round(statistics.median(times), 3)


def bench(n_chunks: int, workdir: Path) -> dict:
    rng = np.random.default_rng(n_chunks)
    query = rng.standard_normal(DIM).astype(np.float32)
    query /= np.linalg.norm(query)
    with MemoryStore(workdir / f"s{n_chunks}") as store:
        store.require_embedder("random-384", DIM)
        store.checkpoint_seconds = 3600
        t = time.perf_counter()
        fill(store, n_chunks, rng)
        row = {"chunks": n_chunks, "documents": n_chunks // DOC_CHUNKS, "fill_s": round(time.perf_counter() - t, 1)}

        def cold(fn):
            def run():
                store._filter_cache.clear()
                return fn()
            return run

        for name, filters in FILTERS.items():
            want = python_over_all_documents(store, filters)
            assert sorted(store.document_ids_matching(filters)) == sorted(want) and len(want) == 5
            row[name] = {
                "match_before_ms": median_ms(lambda f=filters: python_over_all_documents(store, f)),
                "match_now_first_ms": median_ms(cold(lambda f=filters: store.document_ids_matching(f))),
                "match_now_repeat_ms": median_ms(lambda f=filters: store.document_ids_matching(f)),
                "dense_search_first_ms": median_ms(cold(lambda f=filters: store.search(query, k=5, filters=f))),
                "dense_search_repeat_ms": median_ms(lambda f=filters: store.search(query, k=5, filters=f)),
                "hybrid_search_repeat_ms": median_ms(
                    lambda f=filters: store.search(query, k=5, filters=f, query="topic chunk 42")),
            }
        row["unfiltered_dense_ms"] = median_ms(lambda: store.search(query, k=5))
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 100_000])
    parser.add_argument("--out", type=Path, default=Path("bench/results/filters.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="filter-bench-") as tmp:
        rows = [bench(n, Path(tmp)) for n in args.sizes]
    report = {"benchmark": "filter_bench", "cpu": cpu_name(), "date": time.strftime("%Y-%m-%d %H:%M"),
              "doc_chunks": DOC_CHUNKS, "repeats": REPEATS, "filters": FILTERS, "runs": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
