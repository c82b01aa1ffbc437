"""`memstore ingest` end to end on real SQLite documentation pages with the real embedder."""
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import SQLITE_DOC

import memstore


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "docs"
    shutil.copytree(SQLITE_DOC, root, ignore=shutil.ignore_patterns("SOURCE.md"))
    return root


def chunk_rows(store_dir):
    with sqlite3.connect(store_dir / "memstore.db") as conn:
        rows = conn.execute(
            "SELECT d.source, c.ordinal, c.char_start, c.char_end, c.text, c.vector "
            "FROM chunks c JOIN documents d ON d.id = c.document_id ORDER BY d.source, c.ordinal").fetchall()
    return rows


def test_ingest_search_and_incremental_reingest(corpus, tmp_path):
    store = tmp_path / "kb"
    with memstore.open(store) as mem:
        first = mem.ingest(corpus)
        assert first["files_ingested"] == 12 and first["files_failed"] == 0
        assert first["chunks_added"] > 50
        hits = mem.search("Does VACUUM rebuild the database file?", k=3)
        assert hits[0].source.endswith("lang_vacuum.html")
        doc_text = "".join(b.text for b in __import__("memstore.ingest.loaders", fromlist=["load"]).load(corpus / "lang_vacuum.html").blocks)
        assert doc_text[hits[0].char_start:hits[0].char_end] == hits[0].text

        again = mem.ingest(corpus)
        assert again["files_skipped"] == 12 and again["chunks_added"] == 0

        before = {r[:4]: r[5] for r in chunk_rows(store)}
        page = corpus / "autoinc.html"
        page.write_text(page.read_text().replace("AUTOINCREMENT", "AUTO-INCREMENT-KEYWORD"))
        edited = mem.ingest(corpus)
        assert edited["files_ingested"] == 1 and edited["files_skipped"] == 11
        after = {r[:4]: r[5] for r in chunk_rows(store)}
        changed = {k[0] for k in set(after) ^ set(before)}
        assert changed == {str(page)}
        untouched = [k for k in before if k[0] != str(page)]
        assert all(before[k] == after[k] for k in untouched)

        os.utime(corpus / "limits.html")  # touched but not changed: hash says skip
        assert mem.ingest(corpus)["files_skipped"] == 12

        (corpus / "limits.html").unlink()
        assert mem.ingest(corpus)["documents_removed"] == 0  # no --prune: kept
        pruned = mem.ingest(corpus, prune=True)
        assert pruned["documents_removed"] == 1 and pruned["chunks_removed"] > 0
        assert all(not h.source.endswith("limits.html") for h in mem.search("maximum length of a string", k=10))
        assert mem.check()["consistent"]


def test_bad_files_are_reported_and_do_not_stop_the_run(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    shutil.copy(SQLITE_DOC / "autoinc.html", docs)
    (docs / "empty.txt").write_text("")
    (docs / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (docs / "fake.pdf").write_text("not a pdf")
    (docs / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00")
    (docs / "locked.md").write_text("# secret")
    os.chmod(docs / "locked.md", 0)
    (docs / "loop").symlink_to(docs)
    (docs / "dangling.txt").symlink_to(docs / "nowhere.txt")
    with memstore.open(tmp_path / "kb") as mem:
        s = mem.ingest(docs)
        encodings = {os.path.basename(d["source"]): d["encoding"] for d in mem.store.documents()}
    reasons = {os.path.basename(f["path"]): f["reason"] for f in s["failed"] + s["skipped"]}
    assert encodings["latin1.txt"] not in (None, "utf-8") and encodings["autoinc.html"] == "utf-8"
    assert "not a PDF" in reasons["fake.pdf"]
    assert "unsupported" in reasons["image.png"]
    assert "empty" in reasons["empty.txt"]
    assert "broken symlink" in reasons["dangling.txt"]
    assert "symlink loop" in reasons["loop"]
    if os.geteuid() != 0:  # root reads anything
        assert "permission denied" in reasons["locked.md"]
    assert s["files_ingested"] >= 2 and s["files_failed"] >= 1


def run_cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "memstore.cli", *args], capture_output=True, text=True, **kw)


def test_kill_9_during_ingest_then_rerun_equals_uninterrupted_run(corpus, tmp_path):
    reference, killed = tmp_path / "ref", tmp_path / "killed"
    env = dict(os.environ, MEMSTORE_EMBED_BUFFER="16")  # commit early and often
    assert run_cli("ingest", str(corpus), "--store", str(reference), env=env).returncode == 0

    proc = subprocess.Popen([sys.executable, "-m", "memstore.cli", "ingest", str(corpus), "--store", str(killed)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill once some, but not all, files are committed
        try:
            with sqlite3.connect(killed / "memstore.db") as conn:
                if conn.execute("SELECT count(*) FROM documents").fetchone()[0] >= 2:
                    break
        except sqlite3.Error:
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with sqlite3.connect(killed / "memstore.db") as conn:
        committed = conn.execute("SELECT count(*) FROM documents").fetchone()[0]
    assert 2 <= committed < 12, "the kill should land mid-run"

    rerun = run_cli("ingest", str(corpus), "--store", str(killed), "--json", env=env)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout)
    assert summary["files_skipped"] >= committed and summary["files_ingested"] == 12 - summary["files_skipped"]

    ref_rows, got_rows = chunk_rows(reference), chunk_rows(killed)
    assert [r[:5] for r in ref_rows] == [r[:5] for r in got_rows]
    ref_vecs = np.frombuffer(b"".join(r[5] for r in ref_rows), np.float32)
    got_vecs = np.frombuffer(b"".join(r[5] for r in got_rows), np.float32)
    np.testing.assert_allclose(ref_vecs, got_vecs, atol=1e-4)
    check = run_cli("check", "--store", str(killed), "--json")
    assert check.returncode == 0 and json.loads(check.stdout)["consistent"]


def test_a_large_document_is_streamed_batch_by_batch(tmp_path, monkeypatch):
    """Past STREAM_AFTER chunks a document is embedded and written in batches inside one
    transaction, and past PENDING_LIMIT its vectors reach FAISS from SQL, not from memory."""
    from memstore.ingest import pipeline
    from memstore.store import writes as store_module

    monkeypatch.setattr(pipeline, "STREAM_AFTER", 4)
    monkeypatch.setenv("MEMSTORE_EMBED_BUFFER", "2")
    monkeypatch.setattr(store_module, "PENDING_LIMIT", 5)
    big = tmp_path / "big.txt"
    paragraphs = [f"Paragraph {i} is about the {w} harbour, its ships and its lighthouse keeper number {i}."
                  for i, w in enumerate(["northern", "southern", "eastern", "western"] * 15)]
    big.write_text("\n\n".join(paragraphs) + "\n")
    with memstore.open(tmp_path / "kb") as mem:
        summary = mem.ingest(big, chunk_size=40, overlap=0)
        assert summary["files_ingested"] == 1 and summary["chunks_added"] > 8
        assert mem.check()["consistent"]
        assert mem.stats()["index_vectors"] == summary["chunks_added"]
        text = big.read_text()
        for hit in mem.search("lighthouse keeper number 37", k=3):
            assert text[hit.char_start:hit.char_end] == hit.text
        assert "37" in mem.search("lighthouse keeper number 37", k=1, mode="lexical")[0].text
