"""Lexical (BM25-style) search kept by the database itself, and rank fusion with dense search.

SQLite stores use an FTS5 table filled by triggers; PostgreSQL stores a generated tsvector
column with a GIN index (migration 0002), so the lexical index commits with the chunk rows.
A query is always reduced to its words and passed as bound parameters: quotes, operators
(AND, NEAR, *), SQL-looking text and any script are searched for as text, never parsed.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Connection, bindparam, text

from memstore.settings import FUSION_DENSE_WEIGHT, WEIGHTED_FUSION_DENSE_WEIGHT

WORD = re.compile(r"\w+", re.UNICODE)
MAX_TERMS = 64
PG_DF_CAP = 20_000  # PostgreSQL: document frequency is counted up to this many chunks per term
COMMON_DF = 5_000  # SQLite: a term in this many chunks is common (see _rare_terms)
RARE_COUNT = 20  # a query word in at most this many chunks is rare (see rare_words)
SOLE_HOLDERS = 2  # a query word in at most this many chunks points at one place (see sole_holders)
RRF_K = 60
DEFAULT_ALPHA = WEIGHTED_FUSION_DENSE_WEIGHT
FULL_ALPHA = FUSION_DENSE_WEIGHT


# Very common English words: each costs a scan of a huge posting list and adds almost no
# BM25 weight: leaving them out makes lexical search several times faster at 100k chunks (bench/retrieval.py).
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


@dataclass
class LexicalQuery:
    """A query reduced to its terms, with how many chunks hold each (counted up to a cap)."""

    terms: list[str]
    counts: dict[str, int]
    total: int  # chunks in the store (PostgreSQL's idf weights); 0 on SQLite, whose bm25 has its own


def prepare(conn: Connection, query: str, phrases: bool = True,
            total_chunks: Callable[[Connection], int] | None = None) -> LexicalQuery:
    """The query's terms with their chunk counts. total_chunks(conn): the store's chunk count
    (PostgreSQL's bm25 needs it), kept by the caller between writes; counted here if not given."""
    terms = query_terms(query, phrases)
    if conn.dialect.name == "sqlite":
        counts = {t: _count(conn, _fts_match([t]), COMMON_DF) for t in terms}
        return LexicalQuery(terms, counts, 0)
    counts = {t: conn.execute(text(f"SELECT count(*) FROM (SELECT 1 FROM chunks WHERE {_PG_TERM.format(0)} "
                                   f"LIMIT {PG_DF_CAP}) s"), {"t0": t}).scalar_one() for t in terms}
    count = total_chunks or (lambda c: c.execute(text("SELECT count(*) FROM chunks")).scalar_one())
    total = count(conn) if any(counts.values()) else 0
    return LexicalQuery(terms, counts, total)


def search(conn: Connection, query: str | LexicalQuery, k: int, document_ids: list[int] | None = None,
           phrases: bool = True) -> list[tuple[int, float]]:
    """Top-k (chunk id, score) by lexical relevance, higher is better."""
    q = query if isinstance(query, LexicalQuery) else prepare(conn, query, phrases)
    if not any(q.counts.values()) or (document_ids is not None and not document_ids):
        return []
    if conn.dialect.name == "sqlite":
        return _search_sqlite(conn, q, k, document_ids)
    return _search_postgres(conn, q, k, document_ids)


def scores(conn: Connection, q: LexicalQuery, ids: list[int]) -> dict[int, float]:
    """The lexical score of each of these chunks, as `search` would give it; 0 where no term matches."""
    out = dict.fromkeys(ids, 0.0)
    if not ids or not any(q.counts.values()):
        return out
    if conn.dialect.name == "sqlite":
        return sqlite_scores(conn, q.terms, ids)
    score, where, params = _pg_score(q)
    sql = text(f"SELECT id, {score} FROM chunks WHERE id IN :ids AND {where}")
    out.update((int(i), float(s)) for i, s in conn.execute(sql.bindparams(bindparam("ids", expanding=True)),
                                                             {**params, "ids": ids}))
    return out


def sqlite_scores(conn: Connection, terms: list[str], ids: list[int]) -> dict[int, float]:
    """SQLite's `scores`, from the query's terms alone: FTS5's bm25 needs no counts of ours, so
    this can run before (or while) the lexical query is prepared."""
    out = dict.fromkeys(ids, 0.0)
    if not ids or not terms:
        return out
    # `+rowid`: FTS5 runs the match once and the rows are filtered after it; pushed down, it would
    # run it once per id, an order of magnitude slower even on a small store
    sql = text("SELECT rowid, bm25(chunks_fts) FROM chunks_fts WHERE chunks_fts MATCH :match AND +rowid IN :ids")
    rows = conn.execute(sql.bindparams(bindparam("ids", expanding=True)), {"match": _fts_match(terms), "ids": ids})
    out.update((int(i), -float(s)) for i, s in rows)
    return out


def rare_words(q: LexicalQuery) -> list[str]:
    """The query's single words found in at least one and at most RARE_COUNT chunks: names, codes, rare nouns."""
    return [t for t in q.terms if " " not in t and 0 < q.counts.get(t, 0) <= RARE_COUNT]


def holding_all(conn: Connection, terms: list[str], ids: list[int]) -> set[int]:
    """Those of `ids` whose chunk holds every one of `terms` (as the lexical index reads them: stemmed)."""
    if not terms or not ids:
        return set()
    if conn.dialect.name == "sqlite":
        sql = text("SELECT rowid FROM chunks_fts WHERE chunks_fts MATCH :all AND +rowid IN :ids")
        params = {"all": _fts_match(terms, "AND"), "ids": ids}
    else:
        sql = text("SELECT id FROM chunks WHERE id IN :ids AND "
                   + " AND ".join(_PG_TERM.format(i) for i in range(len(terms))))
        params = {"ids": ids, **{f"t{i}": t for i, t in enumerate(terms)}}
    return {int(i) for i in conn.execute(sql.bindparams(bindparam("ids", expanding=True)), params).scalars()}


def named_words(text: str) -> set[str]:
    """The words of `text` that name something, lowercased: with a digit or an underscore, or with a
    capital letter where a sentence does not begin (a number, a code, a name)."""
    named, end = set(), None  # end: where the previous word ended (None before the first)
    for match in WORD.finditer(text):
        word, gap = match.group(), text[end:match.start()].rstrip() if end is not None else ""
        starts_sentence = end is None or gap[-1:] in (".", "?", "!", ":")
        if any(c.isdigit() or c == "_" for c in word) or (any(c.isupper() for c in word) and not starts_sentence):
            named.add(word.lower())
        end = match.end()
    return named


def sole_holders(conn: Connection, q: LexicalQuery, named: set[str],
                 document_ids: list[int] | None = None) -> set[int]:
    """The chunks that hold the rarest of the query's `named` words (see named_words), where at most
    SOLE_HOLDERS chunks of the store do: a number, code or name that points at one place (a
    sentence in the overlap of two neighbouring chunks is in both). Among document_ids' chunks,
    where given. A rare ordinary word ("cautious") points nowhere in particular: on the dev set,
    promoting its holders cost MRR (bench/results/retrieval.json)."""
    count, term = min(((n, t) for t, n in q.counts.items() if t in named and n > 0), default=(0, None))
    if term is None or count > SOLE_HOLDERS:
        return set()
    if conn.dialect.name == "sqlite":
        ids = list(conn.execute(text("SELECT rowid FROM chunks_fts WHERE chunks_fts MATCH :t"),
                                {"t": _fts_match([term])}).scalars())
    else:
        ids = list(conn.execute(text(f"SELECT id FROM chunks WHERE {_PG_TERM.format(0)}"), {"t0": term}).scalars())
    if document_ids is not None and ids:
        sql = text("SELECT id FROM chunks WHERE id IN :ids AND document_id IN :docs").bindparams(
            bindparam("ids", expanding=True), bindparam("docs", expanding=True))
        ids = list(conn.execute(sql, {"ids": ids, "docs": document_ids}).scalars())
    return {int(i) for i in ids}


def _count(conn, match: str, cap: int) -> int:
    sql = text("SELECT count(*) FROM (SELECT 1 FROM chunks_fts WHERE chunks_fts MATCH :t LIMIT :cap)")
    return conn.execute(sql, {"t": match, "cap": cap}).scalar_one()


def _search_sqlite(conn, q: LexicalQuery, k, document_ids):
    params = {"match": _fts_match(q.terms), "k": k}
    where = ""
    rare = _rare_terms(q)
    if rare:  # rank only the chunks that hold a rare term (bm25 still sums over every term)
        where += " AND +f.rowid IN (SELECT rowid FROM chunks_fts WHERE chunks_fts MATCH :rare)"
        params["rare"] = _fts_match(rare)
    if document_ids is not None:
        where += " AND +f.rowid IN (SELECT id FROM chunks WHERE document_id IN :doc_ids)"
        params["doc_ids"] = document_ids
    # `+rowid` keeps these filters out of FTS5's query plan: pushed down, FTS5 would run the whole
    # match, and bm25's term counts, once per allowed row: two orders of magnitude slower at 100k chunks
    sql = text(f"SELECT f.rowid, bm25(chunks_fts) AS s FROM chunks_fts f WHERE chunks_fts MATCH :match {where} "
               "ORDER BY s LIMIT :k")
    if document_ids is not None:
        sql = sql.bindparams(bindparam("doc_ids", expanding=True))
    return [(int(i), -float(s)) for i, s in conn.execute(sql, params)]


def _fts_match(terms: list[str], operator: str = "OR") -> str:
    return f" {operator} ".join('"' + t.replace('"', '""') + '"' for t in terms)


def _rare_terms(q: LexicalQuery) -> list[str] | None:
    """The terms found in fewer than COMMON_DF chunks, or None when no term is that common (or all are).

    bm25 costs about a microsecond per matching chunk, and a common word matches tens of thousands
    of chunks in a large store. A chunk that holds none of the query's rarer terms seldom makes
    the top k, so only chunks holding one are ranked (bench/retrieval.py's scale section: faster at
    100k chunks with the same hit@k).
    """
    rare = [t for t in q.terms if q.counts[t] < COMMON_DF]
    return rare if 0 < len(rare) < len(q.terms) else None


_PG_TERM = "tsv @@ phraseto_tsquery('english', :t{})"


def _pg_score(q: LexicalQuery) -> tuple[str, str, dict]:
    """BM25-like: sum over query terms of idf(term) * ts_rank(tsv, term), length-normalized;
    the score expression, the match condition and their parameters."""
    n = q.total or 1
    weights = [(i, math.log(1 + (n - q.counts[t] + 0.5) / (q.counts[t] + 0.5)))
               for i, t in enumerate(q.terms) if q.counts[t]]
    any_term = " || ".join(f"phraseto_tsquery('english', :t{i})" for i, _ in weights)
    score = " + ".join(f"{w:.6f} * ts_rank(tsv, phraseto_tsquery('english', :t{i}), 1)" for i, w in weights)
    return score, f"tsv @@ ({any_term})", {f"t{i}": q.terms[i] for i, _ in weights}


def _search_postgres(conn, q: LexicalQuery, k, document_ids):
    score, where, params = _pg_score(q)
    if document_ids is not None:
        where += " AND document_id IN :doc_ids"
        params["doc_ids"] = document_ids
    sql = text(f"SELECT id, {score} AS s FROM chunks WHERE {where} ORDER BY s DESC LIMIT :k")
    if document_ids is not None:
        sql = sql.bindparams(bindparam("doc_ids", expanding=True))
    return [(int(i), float(s)) for i, s in conn.execute(sql, {**params, "k": k})]


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


def full_score_fusion(dense: dict[int, float], lexical: dict[int, float],
                      alpha: float = FULL_ALPHA) -> list[tuple[int, float]]:
    """alpha * min-max-normalized dense score + (1 - alpha) * lexical score / its maximum, over
    candidates that both sides have scored (every candidate of either side, see MemoryStore).

    A candidate that one side did not rank still gets that side's real score, so a chunk that is
    "generally relevant" on both sides no longer beats an exact match that one side missed.
    Dividing the lexical score by its maximum keeps a chunk without any query term at 0.
    """
    if not dense and not lexical:
        return []
    lo, hi = min(dense.values(), default=0.0), max(dense.values(), default=0.0)
    top = max(max(lexical.values(), default=0.0), 0.0) or 1.0

    def score(i):  # a chunk deleted since the search has no vector: the lowest dense score
        d = (dense.get(i, lo) - lo) / (hi - lo) if hi > lo else 1.0
        return alpha * d + (1 - alpha) * max(lexical.get(i, 0.0), 0.0) / top

    fused = {i: score(i) for i in dense.keys() | lexical.keys()}
    return sorted(fused.items(), key=lambda kv: -kv[1])


def exact_match_first(ranked: list[tuple[int, float]], holders: set[int]) -> list[tuple[int, float]]:
    """`ranked` with the exact matches (`holders`, see MemoryStore._lexical_side) moved first, in
    their ranked order and with at least the best score: an exact match on names and codes is not
    outvoted by chunks that are generally relevant on both sides. The others keep their order."""
    if not holders or not ranked:
        return ranked
    best = ranked[0][1]
    return [(i, max(s, best)) for i, s in ranked if i in holders] + [(i, s) for i, s in ranked if i not in holders]


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
