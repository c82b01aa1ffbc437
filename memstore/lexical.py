"""Lexical (BM25-style) search kept by the database itself, and rank fusion with dense search.

SQLite stores use an FTS5 table filled by triggers; PostgreSQL stores a generated tsvector
column with a GIN index (migration 0002), so the lexical index commits with the chunk rows.
A query is always reduced to its words and passed as bound parameters: quotes, operators
(AND, NEAR, *), SQL-looking text and any script are searched for as text, never parsed.
"""
from __future__ import annotations

import math
import re

from sqlalchemy import Connection, bindparam, text

WORD = re.compile(r"\w+", re.UNICODE)
MAX_TERMS = 64
PG_DF_CAP = 20_000  # PostgreSQL: document frequency is counted up to this many chunks per term
COMMON_DF = 5_000  # SQLite: a term in this many chunks is common (see _rare_terms)
RRF_K = 60
# Weighted fusion with this dense weight beat RRF on both benchmarks (bench/retrieval.py):
# newwiki hit@4 0.925 vs 0.907, needle chunk at rank 1 for 98% vs 44% of needles.
DEFAULT_ALPHA = 0.2


# Very common English words: each costs a scan of a huge posting list and adds almost no
# BM25 weight (100k chunks: lexical p50 263 ms with them, 46 ms without; bench/retrieval.py).
STOPWORDS = frozenset("""a about after all also an and any are as at be been before but by can could did do does
for from had has have he her him his how i if in into is it its just may me more most my no not of on one
or other our out over s she so some such than that the their them then there these they this those to up
was we were what when where which while who whom whose why will with would you your""".split())


def query_terms(query: str, phrases: bool = True) -> list[str]:
    """Distinct lowercased words of the query, in order, without stopwords (unless that leaves none),
    then each pair of neighbouring content words as a two-word phrase.

    A phrase scores like one more rare term where the query's words stand side by side, so the
    chunk that names "Ferdinand Vintersol" beats one that has "Ferdinand" and "Vintersol" apart.
    """
    sequence = [w.lower() for w in WORD.findall(query)]
    words = list(dict.fromkeys(sequence))
    content = [w for w in words if w not in STOPWORDS]
    if not content or not phrases:
        return (content or words)[:MAX_TERMS]
    pairs = [f"{a} {b}" for a, b in zip(sequence, sequence[1:]) if a not in STOPWORDS and b not in STOPWORDS]
    return (content + list(dict.fromkeys(pairs)))[:MAX_TERMS]


def search(conn: Connection, query: str, k: int, document_ids: list[int] | None = None,
           phrases: bool = True) -> list[tuple[int, float]]:
    """Top-k (chunk id, score) by lexical relevance, higher is better."""
    terms = query_terms(query, phrases)
    if not terms or (document_ids is not None and not document_ids):
        return []
    if conn.dialect.name == "sqlite":
        return _search_sqlite(conn, terms, k, document_ids)
    return _search_postgres(conn, terms, k, document_ids)


def _search_sqlite(conn, terms, k, document_ids):
    params = {"match": _fts_match(terms), "k": k}
    where = ""
    rare = _rare_terms(conn, terms)
    if rare:  # rank only the chunks that hold a rare term (bm25 still sums over every term)
        where += " AND +f.rowid IN (SELECT rowid FROM chunks_fts WHERE chunks_fts MATCH :rare)"
        params["rare"] = _fts_match(rare)
    if document_ids is not None:
        where += " AND +f.rowid IN (SELECT id FROM chunks WHERE document_id IN :doc_ids)"
        params["doc_ids"] = document_ids
    # `+rowid` keeps these filters out of FTS5's query plan: pushed down, FTS5 would run the whole
    # match, and bm25's term counts, once per allowed row (450 ms instead of 4 ms on 100k chunks)
    sql = text(f"SELECT f.rowid, bm25(chunks_fts) AS s FROM chunks_fts f WHERE chunks_fts MATCH :match {where} "
               "ORDER BY s LIMIT :k")
    if document_ids is not None:
        sql = sql.bindparams(bindparam("doc_ids", expanding=True))
    return [(int(i), -float(s)) for i, s in conn.execute(sql, params)]


def _fts_match(terms: list[str]) -> str:
    return " OR ".join('"' + t.replace('"', '""') + '"' for t in terms)


def _rare_terms(conn, terms: list[str]) -> list[str] | None:
    """The terms found in fewer than COMMON_DF chunks, or None when no term is that common (or all are).

    bm25 costs about a microsecond per matching chunk, and a common word matches tens of thousands
    of chunks in a large store. A chunk that holds none of the query's rarer terms seldom makes
    the top k, so only chunks holding one are ranked (bench/retrieval.py: on 100k chunks, lexical
    p50 15.7 ms instead of 22.4, same hit@k on 500 questions).
    """
    count = text("SELECT count(*) FROM (SELECT 1 FROM chunks_fts WHERE chunks_fts MATCH :t LIMIT :cap)")
    rare = [t for t in terms if conn.execute(count, {"t": _fts_match([t]), "cap": COMMON_DF}).scalar_one() < COMMON_DF]
    return rare if 0 < len(rare) < len(terms) else None


def _search_postgres(conn, terms, k, document_ids):
    """BM25-like: sum over query terms of idf(term) * ts_rank(tsv, term), length-normalized."""
    n = conn.execute(text("SELECT count(*) FROM chunks")).scalar_one() or 1
    weights, params = [], {}
    for i, term in enumerate(terms):
        params[f"t{i}"] = term
        df = conn.execute(text(
            f"SELECT count(*) FROM (SELECT 1 FROM chunks WHERE tsv @@ phraseto_tsquery('english', :t) "
            f"LIMIT {PG_DF_CAP}) s"), {"t": term}).scalar_one()
        if df:
            weights.append((i, math.log(1 + (n - df + 0.5) / (df + 0.5))))
    if not weights:
        return []
    any_term = " || ".join(f"phraseto_tsquery('english', :t{i})" for i, _ in weights)
    score = " + ".join(f"{w:.6f} * ts_rank(tsv, phraseto_tsquery('english', :t{i}), 1)" for i, w in weights)
    where = "AND document_id IN :doc_ids" if document_ids is not None else ""
    sql = text(f"SELECT id, {score} AS s FROM chunks WHERE tsv @@ ({any_term}) {where} ORDER BY s DESC LIMIT :k")
    params["k"] = k
    if document_ids is not None:
        params["doc_ids"] = document_ids
        sql = sql.bindparams(bindparam("doc_ids", expanding=True))
    return [(int(i), float(s)) for i, s in conn.execute(sql, params)]


def integrity_error(conn: Connection) -> str | None:
    """None when the lexical index matches the chunk rows, else what is wrong."""
    if conn.dialect.name == "sqlite":
        try:
            conn.execute(text("INSERT INTO chunks_fts(chunks_fts, rank) VALUES ('integrity-check', 1)"))
        except Exception as e:  # FTS5 reports corruption as a generic database error
            return f"lexical index does not match the chunks ({e.__class__.__name__})"
        return None
    missing = conn.execute(text("SELECT count(*) FROM chunks WHERE tsv IS NULL")).scalar_one()
    return f"{missing} chunks lack a tsvector" if missing else None


def rebuild(conn: Connection) -> None:
    if conn.dialect.name == "sqlite":
        conn.execute(text("INSERT INTO chunks_fts(chunks_fts) VALUES ('rebuild')"))


def reciprocal_rank_fusion(*rankings: list[tuple[int, float]], k: int = RRF_K) -> list[tuple[int, float]]:
    """Fuse ranked lists of (id, score): each list adds 1 / (k + rank) to an id's score."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, (item, _) in enumerate(ranking, 1):
            fused[item] = fused.get(item, 0.0) + 1.0 / (k + rank)
    return sorted(fused.items(), key=lambda kv: -kv[1])


def weighted_fusion(dense: list[tuple[int, float]], lexical: list[tuple[int, float]],
                    alpha: float = DEFAULT_ALPHA) -> list[tuple[int, float]]:
    """alpha * min-max-normalized dense score + (1 - alpha) * normalized lexical score."""
    def normalized(ranking):
        if not ranking:
            return {}
        scores = [s for _, s in ranking]
        lo, hi = min(scores), max(scores)
        return {i: (s - lo) / (hi - lo) if hi > lo else 1.0 for i, s in ranking}

    d, lx = normalized(dense), normalized(lexical)
    fused = {i: alpha * d.get(i, 0.0) + (1 - alpha) * lx.get(i, 0.0) for i in d.keys() | lx.keys()}
    return sorted(fused.items(), key=lambda kv: -kv[1])


def rerank_fusion(rerank: list[tuple[int, float]], lexical: list[tuple[int, float]],
                  weight: float) -> list[tuple[int, float]]:
    """weight * min-max-normalized re-ranker score + (1 - weight) * lexical score / its maximum.

    Over the re-ranked candidates only; a candidate without a lexical score counts 0. Dividing
    the lexical score by its maximum, not min-max, keeps how far a lexical winner stands out:
    a rare name matched exactly (a needle) stays on top unless the re-ranker disagrees a lot.
    """
    if not rerank:
        return []
    scores = [s for _, s in rerank]
    lo, hi = min(scores), max(scores)
    candidates = {i for i, _ in rerank}
    lex = {i: max(s, 0.0) for i, s in lexical if i in candidates}
    top = max(lex.values(), default=0.0) or 1.0
    fused = {i: weight * ((s - lo) / (hi - lo) if hi > lo else 1.0) + (1 - weight) * lex.get(i, 0.0) / top
             for i, s in rerank}
    return sorted(fused.items(), key=lambda kv: -kv[1])
