"""The demo knowledge base: Debian's sqlite3-doc manual, fetched once, or the pages bundled with memstore."""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from memstore.checksums import sha256_of
from memstore.paths import cache_dir

BUNDLED = Path(__file__).parent / "data" / "sqlite_doc"
DOC_SUBDIR = Path("usr/share/doc/sqlite3")
SYSTEM_DOC = Path("/") / DOC_SUBDIR

# Top-level pages that are indexes, cross-reference tables, the requirements list, change logs
# or a duplicate: they would crowd out the prose that answers questions.
SKIPPED_PAGES = {
    "requirements.html", "capi3ref.html", "changes.html", "oldnews.html", "news.html", "chronology.html",
    "doc_backlink_crossref.html", "doc_keyword_crossref.html", "doc_pagelink_crossref.html",
    "doc_target_crossref.html", "keyword_index.html", "sitemap.html", "doclist.html", "docs.html",
    "fileformat.html", "syntaxdiagrams.html", "toc.html",
}

# The Debian package version the demo is fetched at (Debian 12) and its SHA-256, checked before it is
# unpacked; another version, or a changed file, is not used.
SQLITE_DOC_VERSION = "3.40.1-2+deb12u2"
SQLITE_DOC_SHA256 = "466e30d7066e2641fa13e56bc662a2ad521b8cc9c17dde9c9dac3d4f105e32f2"

EXAMPLE_QUESTIONS = [
    "How does AUTOINCREMENT choose a new ROWID?",
    "What is the maximum number of columns in a table?",
    "Which journal mode lets readers and a writer work at the same time?",
    "What does VACUUM INTO do?",
]


@dataclass
class Corpus:
    name: str
    files: list[Path]
    note: str  # where it came from, or why the fallback was used


def demo_corpus(fetch: bool = True, say=print) -> Corpus:
    """The sqlite3-doc manual pages: cached, installed, or fetched with apt; else the bundled pages."""
    cached = cache_dir() / "sqlite3-doc" / DOC_SUBDIR
    for root, note in ((cached, f"Debian sqlite3-doc, cached in {cached}"),
                       (SYSTEM_DOC, f"Debian sqlite3-doc, installed in {SYSTEM_DOC}")):
        if manual_pages(root):
            return Corpus("sqlite3-doc", manual_pages(root), note)
    if fetch:
        say("fetching Debian's sqlite3-doc (apt-get download, public domain) ...")
        problem = fetch_sqlite_doc(cache_dir() / "sqlite3-doc")
        if problem is None and manual_pages(cached):
            return Corpus("sqlite3-doc", manual_pages(cached), f"Debian sqlite3-doc, fetched into {cached}")
        say(f"could not fetch sqlite3-doc ({problem or 'no pages in the package'}); "
            f"using the {len(bundled_pages())} SQLite pages bundled with memstore")
    return Corpus("sqlite-doc-bundled", bundled_pages(), f"the SQLite pages bundled with memstore ({BUNDLED})")


def manual_pages(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("*.html") if p.name not in SKIPPED_PAGES)


def bundled_pages() -> list[Path]:
    return sorted(p for p in BUNDLED.iterdir() if p.suffix in {".html", ".pdf"})


def fetch_sqlite_doc(dest: Path) -> str | None:
    """Download and unpack the package into `dest`; returns None, or why it failed."""
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        return "apt-get and dpkg-deb are not available"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            got = subprocess.run(["apt-get", "download", f"sqlite3-doc={SQLITE_DOC_VERSION}"], cwd=tmp,
                                 capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            return "apt-get download took over 5 minutes"
        debs = list(Path(tmp).glob("sqlite3-doc*.deb"))
        if got.returncode != 0 or not debs:
            return (got.stderr.strip().splitlines() or [f"apt-get exit code {got.returncode}"])[-1]
        if sha256_of(debs[0]) != SQLITE_DOC_SHA256:
            return f"{debs[0].name} does not match its pinned SHA-256, so it was not used"
        unpacked = Path(tmp) / "x"
        done = subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)], capture_output=True, text=True)
        if done.returncode != 0:
            return done.stderr.strip() or "dpkg-deb failed"
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(unpacked), dest)
    return None
