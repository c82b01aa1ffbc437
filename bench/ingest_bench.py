"""Ingest benchmark: the full pipeline on the Debian sqlite3-doc HTML vs the embedder alone.

    python bench/ingest_bench.py                       # fetch sqlite3-doc into bench/data/, full run
    python bench/ingest_bench.py --corpus DIR --limit 50
    python bench/ingest_bench.py --corpus DIR --limit 60 --peer   # and LlamaIndex's IngestionPipeline

One run measures, on the same corpus and the same Embedder object:
1. `memstore.open(tmp).ingest(corpus, glob="*.html")`: files/s, chunks/s, tokens/s, with the
   time inside embedder.encode / store.add_document / save_index counted on the side;
2. loading + chunking alone (ingest.loaders.load + Chunker, no embedding, no store);
3. the embedder alone on exactly the chunk texts the pipeline stored (read back from SQL),
   after a warm-up, in one encode() call;
and writes bench/results/ingest.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import memstore  # noqa: E402
from memstore.ingest.chunking import Chunker, ChunkerConfig  # noqa: E402
from memstore.ingest.embed import DEFAULT_EMBEDDER, load_embedder, resolve_embedder_path  # noqa: E402
from memstore.ingest.loaders import LoadError, load  # noqa: E402
from memstore.ingest.pipeline import discover  # noqa: E402

HERE = Path(__file__).resolve().parent
GLOB = "*.html"


# ---- corpus -----------------------------------------------------------------------------------

def html_root(root: Path) -> Path:
    """The deepest folder that holds every .html file under `root`."""
    files = [str(p) for p in root.rglob(GLOB)]
    if not files:
        sys.exit(f"no {GLOB} files under {root}")
    common = Path(os.path.commonpath(files))
    return common if common.is_dir() else common.parent


def fetch_corpus(cache: Path) -> Path:
    """`apt-get download sqlite3-doc` into `cache` and extract it with `dpkg-deb -x`."""
    cache.mkdir(parents=True, exist_ok=True)
    root = cache / "sqlite3-doc"
    if not root.exists():
        debs = sorted(cache.glob("sqlite3-doc_*.deb"))
        if not debs:
            subprocess.run(["apt-get", "download", "sqlite3-doc"], cwd=cache, check=True)
            debs = sorted(cache.glob("sqlite3-doc_*.deb"))
        tmp = cache / "sqlite3-doc.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(tmp)], check=True)
        tmp.rename(root)
    return html_root(root)


def limited_copy(corpus: Path, files: list[Path], n: int, dest: Path) -> Path:
    """Copy the first n files (in ingest order) into dest, keeping relative paths and mtimes."""
    for f in files[:n]:
        target = dest / f.relative_to(corpus)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, target)
    return dest


# ---- timing helpers ---------------------------------------------------------------------------

class Timed:
    """Wraps a callable, summing its wall time and counting calls (and items, for lists)."""

    def __init__(self, fn):
        self.fn, self.seconds, self.cpu, self.calls, self.items = fn, 0.0, 0.0, 0, 0

    def __call__(self, *args, **kwargs):
        t, c = time.perf_counter(), time.process_time()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t
            self.cpu += time.process_time() - c
            self.calls += 1
            if args and isinstance(args[0], list):
                self.items += len(args[0])

    def report(self) -> dict:
        out = {"seconds": round(self.seconds, 3), "cpu_seconds": round(self.cpu, 3), "calls": self.calls}
        if self.items:
            out["items"] = self.items
            out["mean_items_per_call"] = round(self.items / max(1, self.calls), 1)
        return out


def rates(seconds: float, files: int | None, chunks: int, tokens: int) -> dict:
    s = max(seconds, 1e-9)
    out = {"seconds": round(seconds, 3)}
    if files is not None:
        out["files_per_s"] = round(files / s, 2)
    out["chunks_per_s"] = round(chunks / s, 2)
    out["tokens_per_s"] = round(tokens / s, 1)
    return out


def phase(fn, *args):
    """Run fn(*args); returns (result, {wall, process cpu seconds, load average before/after}).

    The machine may be shared: cpu_seconds / wall shows how many cores this process got."""
    load0, t, c = os.getloadavg()[0], time.perf_counter(), time.process_time()
    out = fn(*args)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    return out, {"wall_seconds": round(wall, 3), "cpu_seconds": round(cpu, 3),
                 "cores_used": round(cpu / max(wall, 1e-9), 2),
                 "loadavg_1min": [round(load0, 2), round(os.getloadavg()[0], 2)]}


def pct(values: list[int], q: float) -> int:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


# ---- the three measurements --------------------------------------------------------------------

def run_pipeline(emb, corpus: Path, store_dir: Path, size: int, overlap: int) -> dict:
    encode = Timed(emb.encode)
    emb.encode = encode  # instance attribute: the pipeline's calls go through the timer
    try:
        mem = memstore.open(store_dir)
        assert mem.embedder is emb, "memstore.open did not reuse the cached embedder"
        add_doc = mem.store.add_document = Timed(mem.store.add_document)
        save = mem.store.save_index = Timed(mem.store.save_index)
        t = time.perf_counter()
        summary = mem.ingest(corpus, glob=GLOB, chunk_size=size, overlap=overlap, progress=False)
        wall = time.perf_counter() - t
        mem.close()
    finally:
        del emb.encode
    other = wall - encode.seconds - add_doc.seconds - save.seconds
    return {
        "summary": summary,
        "wall_seconds": round(wall, 3),
        **{k: v for k, v in rates(wall, summary["files_ingested"], summary["chunks_added"],
                                  summary["tokens_added"]).items() if k != "seconds"},
        "time_in": {
            "embedder_encode": encode.report(),
            "store_add_document": add_doc.report(),
            "store_save_index": save.report(),
            "other (discover, stat, hash, load, chunk, SQL lookups)": round(other, 3),
        },
    }


def run_load_chunk(emb, files: list[Path], size: int, overlap: int) -> dict:
    config = ChunkerConfig(size, overlap).validate(emb.max_tokens)
    load_s = chunk_s = 0.0
    chunks = tokens = 0
    per_file: dict[str, int] = {}
    errors = []
    for path in files:
        t0 = time.perf_counter()
        try:
            loaded = load(path)
        except LoadError as e:
            errors.append({"path": str(path), "reason": str(e)})
            continue
        blocks = list(loaded.blocks)  # html is parsed eagerly; text/markdown lazily
        t1 = time.perf_counter()
        out = list(Chunker(emb.tokenizer, config).chunks(blocks))
        t2 = time.perf_counter()
        load_s += t1 - t0
        chunk_s += t2 - t1
        chunks += len(out)
        tokens += sum(c.token_count for c in out)
        per_file[str(path)] = len(out)
    return {
        "files": len(files), "chunks": chunks, "tokens": tokens, "errors": errors,
        "load_seconds": round(load_s, 3), "chunk_seconds": round(chunk_s, 3),
        **rates(load_s + chunk_s, len(files), chunks, tokens),
    }, per_file


def run_peer(emb, files: list[Path], size: int, overlap: int, stock: bool) -> dict:
    """LlamaIndex's IngestionPipeline on the same work: the same files' text (read by memstore's
    loaders, timed apart, as LlamaIndex's core has no HTML reader), its SentenceSplitter at the
    same chunk size and overlap in the same tokenizer's tokens, nodes kept in its in-memory
    SimpleVectorStore (memstore writes SQLite + FAISS, durably). The embedder: with `stock`, the
    same model as LlamaIndex runs it (llama-index-embeddings-huggingface: sentence-transformers in
    torch, its default batch); else memstore's own embedder object, so only the pipelines differ."""
    from llama_index.core import Document
    from llama_index.core.embeddings import BaseEmbedding
    from llama_index.core.ingestion import IngestionPipeline
    from llama_index.core.node_parser import SentenceSplitter
    from llama_index.core.vector_stores import SimpleVectorStore

    class SameEmbedder(BaseEmbedding):
        def _get_query_embedding(self, query: str) -> list[float]:
            return emb.encode([query])[0].tolist()

        async def _aget_query_embedding(self, query: str) -> list[float]:
            return self._get_query_embedding(query)

        def _get_text_embedding(self, text: str) -> list[float]:
            return emb.encode([text])[0].tolist()

        def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
            return emb.encode(texts).tolist()

    t = time.perf_counter()
    docs = []
    for path in files:
        try:
            docs.append(Document(text="".join(b.text for b in load(path).blocks), metadata={"source": str(path)}))
        except LoadError:
            continue
    load_s = time.perf_counter() - t
    tokenize = lambda text: emb.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    if stock:
        from llama_index.embeddings.huggingface import HuggingFaceEmbedding

        embed_model = HuggingFaceEmbedding(model_name=str(resolve_embedder_path(emb.name)), device="cpu")
        embedder = {"embedder": "llama-index-embeddings-huggingface " + _version("llama-index-embeddings-huggingface"),
                    "embed_batch_size": embed_model.embed_batch_size}
    else:
        embed_model = SameEmbedder(model_name=emb.name, embed_batch_size=emb.batch_size)
        embedder = {"embedder": f"memstore's ({emb.format})", "embed_batch_size": emb.batch_size}
    pipeline = IngestionPipeline(
        transformations=[SentenceSplitter(chunk_size=size, chunk_overlap=overlap, tokenizer=tokenize), embed_model],
        vector_store=SimpleVectorStore())
    t = time.perf_counter()
    nodes = pipeline.run(documents=docs)
    run_s = time.perf_counter() - t
    tokens = sum(len(tokenize(n.get_content())) for n in nodes)
    return {"library": "llama-index-core " + _version("llama-index-core"), **embedder,
            "documents": len(docs), "nodes": len(nodes), "load_seconds_memstore_loaders": round(load_s, 3),
            "pipeline_seconds": round(run_s, 3),
            **{k: v for k, v in rates(load_s + run_s, len(docs), len(nodes), tokens).items()}}


def _version(dist: str) -> str:
    import importlib.metadata

    return importlib.metadata.version(dist)


def run_raw(emb, texts: list[str], tokens: int, warmup: int) -> dict:
    for _ in range(2):
        emb.encode(texts[:warmup])
    encode = Timed(emb.encode)
    assert len(encode(texts)) == len(texts)
    return {"chunks": len(texts), "tokens": tokens, "batch_size": emb.batch_size,
            "warmup_chunks": min(warmup, len(texts)), **rates(encode.seconds, None, len(texts), tokens),
            "cpu_seconds": round(encode.cpu, 3), "chunks_per_cpu_s": round(len(texts) / max(encode.cpu, 1e-9), 3)}


def store_stats(store_dir: Path, size: int, per_file_chunker: dict[str, int]) -> tuple[dict, list[str], int]:
    con = sqlite3.connect(store_dir / "memstore.db")
    rows = con.execute("SELECT text, token_count FROM chunks ORDER BY id").fetchall()
    per_doc = dict(con.execute(
        "SELECT d.source, count(c.id) FROM documents d LEFT JOIN chunks c ON c.document_id = d.id "
        "GROUP BY d.id").fetchall())
    con.close()
    texts = [r[0] for r in rows]
    toks = [r[1] for r in rows]
    dupes = Counter(texts)
    counts = sorted(per_doc.items(), key=lambda kv: -kv[1])
    mismatch = {k: (per_doc.get(k), v) for k, v in per_file_chunker.items() if per_doc.get(k, 0) != v}
    stats = {
        "documents": len(per_doc),
        "chunks": len(texts),
        "chunk_tokens": {"min": min(toks), "p50": pct(toks, 0.5), "mean": round(statistics.mean(toks), 1),
                         "p95": pct(toks, 0.95), "max": max(toks), "over_chunk_size": sum(t > size for t in toks),
                         "under_16": sum(t < 16 for t in toks)},
        "chunk_chars": {"p50": pct([len(t) for t in texts], 0.5), "max": max(len(t) for t in texts)},
        "chunks_per_document": {"min": counts[-1][1], "p50": pct([c for _, c in counts], 0.5), "max": counts[0][1],
                                "largest": [{"path": p, "chunks": c} for p, c in counts[:5]],
                                "documents_with_1_chunk": sum(c == 1 for _, c in counts)},
        "duplicate_texts": {"distinct": len(dupes), "duplicated_chunks": len(texts) - len(dupes),
                            "most_common": [{"count": n, "text": t[:120]} for t, n in dupes.most_common(5) if n > 1]},
        "chunker_vs_store_mismatches": {k: {"store": a, "chunker_alone": b} for k, (a, b) in list(mismatch.items())[:10]},
        "store_bytes": {p.name: p.stat().st_size for p in store_dir.iterdir() if p.is_file()},
    }
    return stats, texts, sum(toks)


# ---- main --------------------------------------------------------------------------------------

def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"nproc": len(os.sched_getaffinity(0)), "cpu_count": os.cpu_count(), "cpu": model,
            "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
            "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TOKENIZERS_PARALLELISM")
                    if k in os.environ}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", type=Path, help="folder holding the sqlite3-doc html (default: fetch into --cache)")
    ap.add_argument("--cache", type=Path, default=HERE / "data", help="where the .deb is downloaded and extracted")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "ingest.json")
    ap.add_argument("--limit", type=int, help="ingest only the first N files (a quick try)")
    ap.add_argument("--chunk-size", type=int, default=200)
    ap.add_argument("--overlap", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=128, help="chunks encoded (twice) before the raw timing")
    ap.add_argument("--peer", action="store_true", help="also run LlamaIndex's IngestionPipeline on the same work")
    args = ap.parse_args()

    corpus = html_root(args.corpus.resolve()) if args.corpus else fetch_corpus(args.cache.resolve())
    source = corpus
    work = Path(tempfile.mkdtemp(prefix="ingest-bench-"))
    try:
        files, *_ = discover([corpus], GLOB)
        if args.limit:
            corpus = limited_copy(corpus, files, args.limit, work / "corpus")
            files, *_ = discover([corpus], GLOB)
        print(f"corpus {corpus}: {len(files)} files", flush=True)

        t = time.perf_counter()
        emb = load_embedder(DEFAULT_EMBEDDER)  # the cache entry memstore.open uses
        load_embedder_s = time.perf_counter() - t
        emb.encode(["warm-up sentence"] * 8)

        print("pipeline ...", flush=True)
        store_dir = work / "store"
        pipeline, pipeline["contention"] = phase(run_pipeline, emb, corpus, store_dir, args.chunk_size, args.overlap)
        print(json.dumps({k: v for k, v in pipeline.items() if k != "summary"}), flush=True)

        print("load + chunk alone ...", flush=True)
        (load_chunk, per_file), contention = phase(run_load_chunk, emb, files, args.chunk_size, args.overlap)
        load_chunk["contention"] = contention
        print(json.dumps(load_chunk), flush=True)

        stats, texts, tokens = store_stats(store_dir, args.chunk_size, per_file)
        print(f"raw embedder on {len(texts)} chunks ...", flush=True)
        raw, contention = phase(run_raw, emb, texts, tokens, args.warmup)
        raw["contention"] = contention  # includes the warm-up
        print(json.dumps(raw), flush=True)

        peers = {}
        for name, stock in (("peer_llama_index", False), ("peer_llama_index_stock_embedder", True)):
            if not args.peer:
                break
            print(f"LlamaIndex IngestionPipeline on the same files ({name}) ...", flush=True)
            peer, contention = phase(run_peer, emb, files, args.chunk_size, args.overlap, stock)
            peer["contention"] = contention
            peers[name] = peer
            peer["memstore_chunks_per_s_over_peer"] = round(pipeline["chunks_per_s"] / peer["chunks_per_s"], 3)
            peer["memstore_tokens_per_s_over_peer"] = round(pipeline["tokens_per_s"] / peer["tokens_per_s"], 3)
            print(json.dumps(peer), flush=True)

        encode_s = pipeline["time_in"]["embedder_encode"]["seconds"]
        wall = pipeline["wall_seconds"]
        result = {
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": machine(),
            "embedder": {"name": emb.name, "dim": emb.dim, "max_tokens": emb.max_tokens,
                         "batch_size": emb.batch_size, "format": emb.format, "load_seconds": round(load_embedder_s, 2)},
            "corpus": {"root": str(source), "ingested_from": str(corpus), "glob": GLOB,
                       "limit": args.limit, "files": len(files),
                       "bytes": sum(f.stat().st_size for f in files)},
            "chunker": {"size": args.chunk_size, "overlap": args.overlap},
            "pipeline": pipeline,
            "load_and_chunk_alone": load_chunk,
            "raw_embedder": raw,
            "ratio_pipeline_to_raw_chunks_per_s": round(pipeline["chunks_per_s"] / raw["chunks_per_s"], 3),
            "target_ratio": 0.9,
            # chunks per process-cpu-second, pipeline / raw: steadier than wall time on a shared machine
            "ratio_cpu_basis": round(pipeline["summary"]["chunks_added"] / pipeline["contention"]["cpu_seconds"]
                                     / raw["chunks_per_cpu_s"], 3),
            "breakdown_share_of_pipeline_wall": {
                "embedder_encode": round(encode_s / wall, 3),
                "load_and_chunk (measured alone)": round((load_chunk["load_seconds"] + load_chunk["chunk_seconds"]) / wall, 3),
                "store_add_document": round(pipeline["time_in"]["store_add_document"]["seconds"] / wall, 3),
                "store_save_index": round(pipeline["time_in"]["store_save_index"]["seconds"] / wall, 3),
                "encode_in_pipeline_vs_raw_seconds": round(encode_s / max(raw["seconds"], 1e-9), 3),
            },
            "store": stats,
        }
        result.update(peers)
        if peers:
            result["peer_target"] = "memstore ingest throughput >= 2x LlamaIndex's on the same work (issue 19)"
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"ratio {result['ratio_pipeline_to_raw_chunks_per_s']}  "
              f"breakdown {json.dumps(result['breakdown_share_of_pipeline_wall'])}\nwrote {args.out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
