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
