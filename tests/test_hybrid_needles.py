"""Facts hidden in software documentation (the SQLite pages bundled with memstore), found by hybrid
search with a real embedder, on SQLite and PostgreSQL: the case behind full-score fusion, small."""
import random
import re

import pytest

import memstore
from memstore.demo import bundled_pages
from memstore.ingest.loaders import load

PEOPLE = ["Anselm Drury", "Odile Varga", "Kasimir Holt", "Yusra Penhale", "Thaddeus Mbeki", "Imogen Strand",
          "Ferdinand Oyelaran", "Zofia Wexford", "Caspian Lund", "Henrike Sato"]
FACTS = [  # worded like the manual around them: locks, codes, numbers, files
    ("{a}'s bicycle lock code is {n}.", "What is {a}'s bicycle lock code?"),
    ("The combination of {a}'s gym locker is {n}.", "What is the combination of {a}'s gym locker?"),
    ("{a} keeps the spare database file on drive {n}.", "On which drive does {a} keep the spare database file?"),
    ("The PIN of {a}'s office door is {n}.", "What is the PIN of {a}'s office door?"),
    ("{a}'s transaction log is archived under ticket {n}.", "Under which ticket is {a}'s transaction log archived?"),
]


def pages_with_facts(seed: int = 0) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    rng = random.Random(seed)
    pages = [(p.name, "".join(b.text for b in load(p).blocks)) for p in bundled_pages()]
    questions = []
    for i, person in enumerate(PEOPLE):
        fact, question = FACTS[i % len(FACTS)]
        fact = fact.format(a=person, n=rng.randint(1000, 9999))
        page = rng.randrange(len(pages))
        name, text = pages[page]
        pos = rng.choice([m.end() for m in re.finditer(r"[.!?]\s+", text)])
        pages[page] = (name, text[:pos] + fact + " " + text[pos:])
        questions.append((question.format(a=person), fact))
    return pages, questions


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_facts_in_software_docs_come_first(backend, tmp_path, embedder, request):
    target = str(tmp_path / "store") if backend == "sqlite" else request.getfixturevalue("pg_url")
    pages, questions = pages_with_facts()
    with memstore.open(target, data_dir=tmp_path / "data") as mem:
        mem._embedder = embedder
        for name, text in pages:
            mem.add_text(text, source=name)
        assert mem.stats()["chunks"] > 100
        for question, fact in questions:
            hits = mem.search(question, k=3)
            assert fact in hits[0].text, (question, [h.text[:80] for h in hits])
