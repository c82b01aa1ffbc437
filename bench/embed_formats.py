"""Embedding formats side by side in one run: speed and retrieval quality on the development set.

For each format (sentence-transformers in torch at the old batch of 64 and at 8, ONNX Runtime
float32, ONNX Runtime int8), the 48 development documents are added to a fresh store through
`Memory.add_text` (chunking, embedding, SQL and FAISS: what ingestion costs), then the same
sample of questions is searched (dense and the default hybrid) and scored as bench/retrieval.py
scores them (a hit: a chunk of the question's document whose span holds the answer's position).
Then the same 256 chunk texts are encoded by each format in turn, five rounds (the ratios to
quote: a one-shot ingest time drifts with the machine's load). Vectors are compared with torch's, chunk by chunk; and the torch-built store is searched once more
with the last format's query vectors (a store built before the format changed).

    python bench/embed_formats.py [--questions 2000] [--formats torch@64 torch@8 float32 int8]

Writes bench/results/embed_formats.json (after every format, so a killed run keeps what it did).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from machine import cpu_features, cpu_name  # noqa: E402
from retrieval import DATA, all_chunks, first_rank, load_avg, percentiles, questions_sample, rank_metrics  # noqa: E402

import memstore  # noqa: E402
from memstore.ingest.embed import Embedder  # noqa: E402

FORMATS = ("torch@64", "torch@8", "float32", "int8")


def parse(spec: str) -> tuple[str, int]:
    fmt, _, batch = spec.partition("@")
    return fmt, int(batch or 64)


def build(workdir: Path, spec: str, docs: list[dict]) -> tuple[memstore.Memory, dict]:
    fmt, batch = parse(spec)
    t = time.perf_counter()
    embedder = Embedder(fmt=fmt, batch_size=batch)
    load_s = time.perf_counter() - t
    mem = memstore.open(workdir / spec.replace("@", "-"))
    mem._embedder = embedder  # the format under test, not the process-wide default
    embedder.encode([d["text"][:500] for d in docs[:8]])  # warm-up: first-run allocations
    t, cpu = time.perf_counter(), time.process_time()
    for d in docs:
        mem.add_text(d["text"], source=d["doc_id"], title=d["title"])
    seconds, cpu_s = time.perf_counter() - t, time.process_time() - cpu
    chunks = mem.store.stats()["chunks"]
    return mem, {"format": embedder.format, "batch": batch if embedder.format == "torch" else embedder.onnx.batch,
                 "load_seconds": round(load_s, 2), "chunks": chunks, "ingest_seconds": round(seconds, 2),
                 "chunks_per_s": round(chunks / seconds, 1), "cores_used": round(cpu_s / seconds, 2)}


def score(mem: memstore.Memory, sample: list[dict]) -> dict:
    chunks = all_chunks(mem.store)
    ranks: dict[str, list] = {"dense": [], "hybrid": []}
    query_ms = []
    for q in sample:
        t = time.perf_counter()
        mem.embedder.encode([q["question"]])
        query_ms.append((time.perf_counter() - t) * 1000)
        doc, pos = q["doc_id"], q["answer_char"]
        hit = lambda i: chunks[i]["source"] == doc and chunks[i]["start"] <= pos < chunks[i]["end"]  # noqa: E731
        for mode in ranks:
            ids = [h.chunk_id for h in mem.search(q["question"], k=10, mode=mode)]
            ranks[mode].append(first_rank(ids, hit))
    return {"metrics": {mode: rank_metrics(r) for mode, r in ranks.items()},
            "query_embed_ms": percentiles(query_ms)}


def interleaved(embedders: dict, texts: list[str], rounds: int = 5) -> dict:
    """The same chunk texts encoded by each format in turn, `rounds` times: a slow spell of the
    machine hits every format alike, so the ratios hold where one-shot ingest times drift."""
    rates: dict[str, list[float]] = {spec: [] for spec in embedders}
    for _ in range(rounds):
        for spec, embedder in embedders.items():
            t = time.perf_counter()
            embedder.encode(texts)
            rates[spec].append(len(texts) / (time.perf_counter() - t))
    median = {spec: round(statistics.median(r), 1) for spec, r in rates.items()}
    first = next(iter(median.values()))
    return {"chunks": len(texts), "rounds": rounds, "median_chunks_per_s": median,
            "ratio_to_first": {spec: round(m / first, 2) for spec, m in median.items()},
            "chunks_per_s": {spec: [round(x, 1) for x in r] for spec, r in rates.items()}}


def agreement(mem: memstore.Memory, reference: memstore.Memory) -> dict:
    """Cosine between each chunk's vector and torch's for the same chunk text."""
    ours = {(c["source"], c["start"]): c["vector"] for c in all_chunks(mem.store).values()}
    theirs = {(c["source"], c["start"]): c["vector"] for c in all_chunks(reference.store).values()}
    cos = np.array([float(np.dot(v, theirs[k]))
                    for k, v in ours.items() if k in theirs])
    return {"chunks_compared": len(cos), "cosine_min": round(float(cos.min()), 6),
            "cosine_mean": round(float(cos.mean()), 6)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=2000)
    parser.add_argument("--formats", nargs="+", default=list(FORMATS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/embed_formats.json"))
    args = parser.parse_args()
    import torch

    docs = [json.loads(line) for line in open(f"{DATA}.docs.jsonl")]
    qas = [json.loads(line) for line in open(f"{DATA}.qas.jsonl")]
    sample = questions_sample(qas, args.questions, args.seed)
    report = {"benchmark": "embed_formats", "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
              "machine": {"cpu": cpu_name(), "cpu_features": cpu_features(), "cpus": os.cpu_count(),
                          "torch_threads": torch.get_num_threads()},
              "embedder": "all-MiniLM-L6-v2", "documents": len(docs), "questions": len(sample),
              "sample_seed": args.seed, "formats": {}}
    workdir = Path(tempfile.mkdtemp(prefix="embed-formats-"))
    reference = None
    mems: dict[str, memstore.Memory] = {}
    for spec in args.formats:
        mem, built = build(workdir, spec, docs)
        mems[spec] = mem
        row = {**built, **score(mem, sample), "load_avg": load_avg()}
        if spec.startswith("torch") and reference is None:
            reference = mem
        if reference is not None and reference is not mem:
            row["vectors_vs_torch"] = agreement(mem, reference)
        report["formats"][spec] = row
        print(spec, json.dumps({k: row[k] for k in ("chunks_per_s", "metrics", "query_embed_ms")}), flush=True)
        base = report["formats"][args.formats[0]]
        for other in report["formats"].values():
            other["speed_over_" + args.formats[0]] = round(other["chunks_per_s"] / base["chunks_per_s"], 2)
        save(report, args.out)
    report["interleaved"] = interleaved({spec: mems[spec].embedder for spec in args.formats},
                                        [c["text"] for c in all_chunks(mems[args.formats[0]].store).values()][:256])
    print("interleaved", json.dumps(report["interleaved"]["median_chunks_per_s"]), flush=True)
    save(report, args.out)
    last = args.formats[-1]
    if reference is not None and not last.startswith("torch"):  # a store built before, queried now
        reference._embedder = Embedder(fmt=parse(last)[0])
        report["torch_store_queried_with_" + last] = score(reference, sample)
        print("torch store,", last, "queries", json.dumps(report["torch_store_queried_with_" + last]), flush=True)
        save(report, args.out)


def save(report: dict, out: Path) -> None:
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(out)


if __name__ == "__main__":
    main()
