"""Lexical search inside the database (FTS5 / tsvector) and hybrid fusion, on SQLite and PostgreSQL."""
import numpy as np
import pytest
from alembic import command
from conftest import unit_vectors
from sqlalchemy import text

from memstore.store import ChunkIn, DocumentIn, MemoryStore, db
from memstore.store import search as store_module

DIM = 16
FILLER = [
    "The committee reviewed the quarterly budget and approved new funding for the library.",
    "Rain is expected over the weekend, with clearer skies arriving by Monday afternoon.",
    "The bakery on the corner sells bread, pastries and a famous cinnamon roll.",
    "Engineers replaced the old pump station after a decade of faithful service.",
    "Students presented projects about renewable energy at the regional science fair.",
]


def add(store, source, texts, seed=0, meta=None, vectors=None):
    chunks = [ChunkIn(i, i * 200, i * 200 + len(t), t, 20) for i, t in enumerate(texts)]
    doc = DocumentIn(source, f"h{source}", 1, 1.0, 200 * len(texts), meta=meta or {})
    vectors = unit_vectors(len(texts), DIM, seed) if vectors is None else np.asarray(vectors, dtype=np.float32)
    store.add_document(doc, chunks, vectors)


@pytest.fixture
def store(store_target):
    target, data_dir = store_target
    s = MemoryStore(target, data_dir=data_dir)
    s.require_embedder("test", DIM)
    for i in range(8):
        add(s, f"filler{i}.txt", FILLER, seed=i)
    add(s, "needle.txt", FILLER[:2] + ["Ingrid's manager is Tobias. " + FILLER[2]], seed=100)
    yield s
    s.close()


def test_rare_name_ranks_first(store):
    hits = store.search(query="Who is Ingrid's manager?", k=3, mode="lexical")
    assert hits[0].source == "needle.txt" and "Tobias" in hits[0].text


def test_hybrid_keeps_the_lexical_winner(store):
    query_vector = unit_vectors(1, DIM, 12345)[0]  # a dense side that knows nothing
    hits = store.search(query_vector, k=4, query="Ingrid manager", mode="hybrid")
    assert "Tobias" in hits[0].text


def test_names_side_by_side_beat_the_same_names_apart(store):
    """Two-word phrases of the query: the chunk naming "Ferdinand Vintersol" wins over a chunk that
    has more of the query's words, but Ferdinand and Vintersol as parts of two other names."""
    from memstore.store import lexical

    add(store, "band.txt", ["Ferdinand Vintersol plays the bassoon in a band called The Moorcroft Owls.",
                            "Ferdinand Lindqvist plays the bassoon in a band, and so does Anselm Vintersol: "
                            "the bassoon band plays on Fridays."], seed=7)
    query = "What band does Ferdinand Vintersol play the bassoon in?"
    hits = store.search(query=query, k=2, mode="lexical")
    assert "Moorcroft" in hits[0].text
    with store.engine.connect() as conn:  # words alone are fooled: this test needs the phrases
        words_only = lexical.search(conn, query, 2, phrases=False)
    assert store.get_chunks([words_only[0][0]])[0].text.startswith("Ferdinand Lindqvist")


def test_common_terms_only_rank_chunks_that_hold_a_rare_one(store, monkeypatch):
    """With a term in more than COMMON_DF chunks, only chunks holding a rarer term are ranked, with
    the same bm25 score as in a full ranking; a query of common terms alone still ranks them all."""
    from memstore.store import lexical

    if store.engine.dialect.name != "sqlite":
        pytest.skip("PostgreSQL ranks every match")
    with store.engine.connect() as conn:
        full = lexical.search(conn, "Ingrid bread pastries", 10)
        common_only = lexical.search(conn, "bread pastries", 10)
        monkeypatch.setattr(lexical, "COMMON_DF", 5)  # bread and pastries are in 9 chunks, Ingrid in 1
        pruned = lexical.search(conn, "Ingrid bread pastries", 10)
        assert lexical.search(conn, "bread pastries", 10) == common_only
    assert len(full) == 9 and len(pruned) == 1
    assert pruned[0] == full[0] and "Ingrid" in store.get_chunks([pruned[0][0]])[0].text


@pytest.mark.parametrize("query", [
    '"', '""', 'NEAR(', 'bread AND', 'bread*', '*', "bread OR NOT pastries", "col:bread",
    "'; DROP TABLE chunks; --", "bread') OR 1=1 --", "^bread", "(bread", "données café naïve",
    "数据库 查询", "Привет мир", "ل", "\\", "%_%",
])
def test_query_syntax_is_text(store, query):
    hits = store.search(query=query, k=5, mode="lexical")
    if "bread" in query:  # the word is searched as text, whatever syntax surrounds it
        assert hits and "bread" in hits[0].text.lower(), query
    else:
        assert all(hit.text for hit in hits)
    assert store.stats()["chunks"] == 8 * 5 + 3  # nothing dropped


def test_operator_words_match_as_words(store):
    add(store, "ops.txt", ["The NEAR operator and the AND keyword appear in this sentence about bread-making."], seed=7)
    assert store.search(query="NEAR", k=1, mode="lexical")[0].source == "ops.txt"
    assert store.search(query='"bread-making"', k=1, mode="lexical")[0].source == "ops.txt"


def test_non_latin_text_is_found(store):
    add(store, "ru.txt", ["Библиотека открыта каждый день."], seed=8)
    add(store, "fr.txt", ["Le café est fermé le dimanche."], seed=9)
    assert store.search(query="библиотека", k=1, mode="lexical")[0].source == "ru.txt"
    assert store.search(query="café fermé", k=1, mode="lexical")[0].source == "fr.txt"
    if store.engine.dialect.name == "sqlite":  # FTS5 folds diacritics; PostgreSQL's english config does not
        assert store.search(query="cafe ferme", k=1, mode="lexical")[0].source == "fr.txt"


def test_filters_apply_before_fusion(store):
    q = unit_vectors(1, DIM, 5)[0]
    hits = store.search(q, k=3, query="Ingrid manager", filters={"path": "filler3.txt"})
    assert len(hits) == 3 and {h.source for h in hits} == {"filler3.txt"}
    lexical = store.search(query="bakery bread", k=5, mode="lexical", filters={"path": "needle.txt"})
    assert [h.source for h in lexical] == ["needle.txt"]


def test_deleted_and_replaced_chunks_leave_the_lexical_index(store):
    store.delete_document("needle.txt")
    assert all(h.source != "needle.txt" for h in store.search(query="Ingrid Tobias", k=5, mode="lexical"))
    add(store, "needle.txt", ["Ingrid now reports to Margarethe."], seed=3)
    assert store.search(query="Ingrid", k=1, mode="lexical")[0].text == "Ingrid now reports to Margarethe."
    assert store.search(query="Tobias", k=5, mode="lexical") == []


def test_bad_mode_and_missing_inputs(store):
    with pytest.raises(ValueError, match="unknown search mode"):
        store.search(query="x", mode="fuzzy")
    with pytest.raises(ValueError, match="needs a query vector"):
        store.search(query="x", mode="dense")
    with pytest.raises(ValueError, match="needs query text"):
        store.search(unit_vectors(1, DIM)[0], mode="lexical")


def test_migration_backfills_existing_chunks(tmp_path):
    path = tmp_path / "s"
    path.mkdir()
    engine = db.make_engine(f"sqlite:///{path / 'memstore.db'}")
    cfg = db.alembic_config(engine)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")  # a store from before the lexical index
    vec = unit_vectors(1, DIM)[0].tobytes()
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO settings(key, value) VALUES ('embedder', '{\"name\": \"test\", \"dim\": 16}')"))
        conn.execute(text("INSERT INTO documents(source, content_hash, size, mtime, char_count, meta, created_at, updated_at) "
                          "VALUES ('old.txt', 'h', 1, 1, 100, '{}', '2026-01-01', '2026-01-01')"))
        conn.execute(text("INSERT INTO chunks(document_id, ordinal, char_start, char_end, token_count, text, heading_path, vector) "
                          "VALUES (1, 0, 0, 30, 5, 'Zanzibar spice markets at dawn', '', :v)"), {"v": vec})
    engine.dispose()
    with MemoryStore(path, create=False) as store:  # opening upgrades to head and back-fills
        assert store.revision == db.head_revision(store.engine)
        assert store.search(query="zanzibar", k=1, mode="lexical")[0].source == "old.txt"


def test_check_notices_a_damaged_lexical_index_and_repair_rebuilds_it(tmp_path):
    with MemoryStore(tmp_path / "s") as store:
        store.require_embedder("test", DIM)
        add(store, "a.txt", FILLER)
        assert store.check()["consistent"]
        with store.engine.begin() as conn:  # lose the FTS rows behind the triggers' back
            conn.execute(text("INSERT INTO chunks_fts(chunks_fts, rowid, text) VALUES ('delete', 1, :t)"), {"t": FILLER[0]})
        report = store.check()
        assert not report["consistent"] and report["lexical_error"]
        store.repair()
        assert store.check()["consistent"]
        assert store.search(query="committee budget", k=1, mode="lexical")[0].ordinal == 0


# ---- hybrid fusion over full scores -------------------------------------------------------------

def _near(vector, seed, noise=0.3):
    v = vector + noise * unit_vectors(1, DIM, seed)[0]
    return v / np.linalg.norm(v)


@pytest.fixture
def lock_store(store_target, monkeypatch):
    """A needle ("Ingrid Vasquez ... bicycle lock code") among chunks that are generally relevant on both
    sides: a guide about bicycle lock codes whose vectors sit next to the query's. With 3 candidates
    per side, this 22-chunk store acts like a large one whose needle chunk the dense side misses."""
    monkeypatch.setattr(store_module, "HYBRID_CANDIDATES", 3)
    target, data_dir = store_target
    s = MemoryStore(target, data_dir=data_dir)
    s.require_embedder("test", DIM)
    for i in range(6):
        add(s, f"filler{i}.txt", FILLER[:3], seed=i)
    guide = ["Ingrid asked about the bicycle lock: a bicycle lock code is set on the lock itself, and the code "
             "of a bicycle lock can be changed.", "A lock code for a bicycle: change the lock code of the bicycle lock often."]
    add(s, "guide.txt", guide, vectors=[_near(QUERY_VECTOR, 1), _near(QUERY_VECTOR, 2)])
    add(s, "codes.txt", ["Error code 42 means the code was rejected."], seed=50)
    add(s, "needle.txt", ["Ingrid Vasquez noted her bicycle lock code, 4821, on a card kept in the shed "
                          "with the gardening tools and the old paint."], seed=77)
    yield s
    s.close()


QUERY_VECTOR = unit_vectors(1, DIM, 999)[0]
LOCK_QUESTION = "What is Ingrid Vasquez's bicycle lock code?"



def test_every_candidate_is_scored_by_both_sides(lock_store):
    from memstore.store import lexical

    scored = lock_store.hybrid_scores(QUERY_VECTOR, LOCK_QUESTION, 3)
    assert len(scored.dense_top) == len(scored.lexical_top) == 3
    assert set(scored.dense) == set(scored.lexical) == {i for i, _ in scored.dense_top + scored.lexical_top}
    everything = lock_store.stats()["chunks"]
    dense_all = dict(lock_store._dense(QUERY_VECTOR, everything, None))
    with lock_store.engine.connect() as conn:
        lexical_all = dict(lexical.search(conn, LOCK_QUESTION, everything))
    for i in scored.dense:  # the score each side gives in a ranking of the whole store
        assert scored.dense[i] == pytest.approx(dense_all[i], abs=1e-5)
        assert scored.lexical[i] == pytest.approx(lexical_all.get(i, 0.0), rel=1e-6)
    (needle,) = scored.holders
    assert needle not in dict(scored.dense_top) and scored.dense[needle] < min(s for _, s in scored.dense_top)


def test_an_exact_match_is_not_outvoted_by_generally_relevant_chunks(lock_store):
    """The dense side misses the needle, and chunks relevant on both sides win every fusion of
    scores (on SQLite lexical search alone ranks the needle first, on PostgreSQL third: ts_rank
    counts the guide's repeated words); only the needle holds all the rare words."""
    def top(fusion):
        return lock_store.search(QUERY_VECTOR, k=3, query=LOCK_QUESTION, mode="hybrid", fusion=fusion)[0].source

    assert "needle.txt" in [h.source for h in lock_store.search(query=LOCK_QUESTION, k=3, mode="lexical")]
    assert top("weighted") == top("rrf") == "guide.txt"  # the failure this guards against
    scored = lock_store.hybrid_scores(QUERY_VECTOR, LOCK_QUESTION, 3)
    assert lock_store.get_chunks([lexical_full(scored)[0][0]])[0].text.startswith("Ingrid asked")
    assert top("full") == "needle.txt"
    hits = lock_store.search(QUERY_VECTOR, k=3, query=LOCK_QUESTION)
    assert hits[0].source == "needle.txt" and "4821" in hits[0].text
    assert [h.source for h in hits[1:]] == ["guide.txt", "guide.txt"]  # the rest keep their fused order


def test_the_holders_of_a_word_the_store_holds_twice_come_first_in_fused_order(lock_store):
    add(lock_store, "other.txt", ["Ingrid Vasquez sold her old bicycle lock, code and all."], seed=78)
    scored = lock_store.hybrid_scores(QUERY_VECTOR, LOCK_QUESTION, 10)
    sources = {c.chunk_id: c.source for c in lock_store.get_chunks(scored.dense)}
    assert {sources[i] for i in scored.holders} == {"needle.txt", "other.txt"}  # "vasquez": two chunks
    fused, plain = scored.fused("full"), lexical_full(scored)
    assert [i for i, _ in fused[:2]] == [i for i, _ in plain if i in scored.holders]
    assert fused[1][1] >= fused[2][1]  # scores still fall along the ranking
    assert fused[2:] == [x for x in plain if x[0] not in scored.holders]


def test_a_value_asked_in_a_long_question_is_found_however_many_common_words_outscore_it(store_target, monkeypatch):
    """The question's many ordinary words match a general chunk far better than its one value does,
    so bm25 ranks the value's chunks below the lexical candidates; the value is in two chunks (a
    sentence in the overlap of neighbours), both come first."""
    monkeypatch.setattr(store_module, "HYBRID_CANDIDATES", 3)
    target, data_dir = store_target
    with MemoryStore(target, data_dir=data_dir) as s:
        s.require_embedder("test", DIM)
        general = ("Variables are assigned a value directly, or through another variable, and the list of "
                   "variables assigned that value can be long: list them all, each variable in the list.")
        for i in range(5):
            add(s, f"general{i}.txt", [general, FILLER[i]], seed=10 + i, vectors=[_near(QUERY_VECTOR, 20 + i), _near(
                QUERY_VECTOR, 30 + i)])
        add(s, "facts.txt", ["The crew loaded the boat. VAR TZOVM = 34795.", "VAR TZOVM = 34795. Then it rained."],
            seed=90)
        question = "Which variables are assigned the value 34795, directly or through another variable? List them all."
        assert "facts.txt" not in [h.source for h in s.search(query=question, k=3, mode="lexical")]
        hits = s.search(QUERY_VECTOR, k=3, query=question)
        assert [h.source for h in hits[:2]] == ["facts.txt", "facts.txt"] and hits[2].source.startswith("general")


def lexical_full(scored):
    from memstore.store import lexical

    return lexical.full_score_fusion(scored.dense, scored.lexical)


def test_named_words_are_numbers_codes_and_names_not_a_sentence_opening():
    from memstore.store.lexical import named_words

    assert named_words("Which variables hold 34795? List them all.") == {"34795"}
    assert named_words("Why is cautious care needed when Windows 9x runs on PowerPC or my_var?") == {
        "windows", "9x", "powerpc", "my_var"}
