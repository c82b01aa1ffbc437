"""Files -> text blocks with structure.

A loader yields `Block`s that tile the document text: each block's text starts where the
previous one ended, so char offsets into the concatenation are exact and a chunk's text is
always `document_text[start:end]`. Plain text is streamed, so a huge file needs bounded memory.
"""
from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

SNIFF_BYTES = 8192
STREAM_BYTES = 1 << 20


class LoadError(Exception):
    """A file could not be turned into text; the message is the per-file reason."""


class Unsupported(LoadError):
    """The file is not a kind memstore reads (binary, unknown extension)."""


@dataclass
class Block:
    text: str  # includes the separator that follows it, so blocks tile the document
    heading_path: tuple[str, ...] = ()
    is_heading: bool = False


@dataclass
class Loaded:
    title: str | None
    blocks: Iterator[Block]


# ---- plain text and markup ---------------------------------------------------------------

PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n\s*")


def read_text(path: Path) -> str:
    data = path.read_bytes()
    _refuse_binary(data[:SNIFF_BYTES])
    return _decode(data)


def _refuse_binary(head: bytes) -> None:
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return  # UTF-16 with BOM
    if b"\x00" in head:
        raise Unsupported("binary file (NUL bytes), skipped")


def _decode(data: bytes) -> str:
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise LoadError(f"not valid UTF-8 (bad byte at offset {e.start}); convert it to UTF-8") from None


def split_paragraphs(text: str, heading_path: tuple[str, ...] = ()) -> Iterator[Block]:
    """Cut text at blank lines; each block keeps its trailing blank lines."""
    pos = 0
    for m in PARAGRAPH_BREAK.finditer(text):
        yield Block(text[pos:m.end()], heading_path)
        pos = m.end()
    if pos < len(text):
        yield Block(text[pos:], heading_path)


def stream_paragraphs(path: Path) -> Iterator[Block]:
    """Paragraph blocks of a UTF-8 text file, read 1 MiB at a time."""
    with open(path, "rb") as f:
        _refuse_binary(f.read(SNIFF_BYTES))
        f.seek(0)
        bom = f.read(3)
        if bom != codecs.BOM_UTF8:
            f.seek(0)
        decoder = codecs.getincrementaldecoder("utf-8")()
        offset, pending = 0, ""
        while True:
            raw = f.read(STREAM_BYTES)
            try:
                pending += decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                raise LoadError(
                    f"not valid UTF-8 (bad byte near offset {offset + e.start}); convert it to UTF-8"
                ) from None
            offset += len(raw)
            cut = _last_paragraph_break(pending) if raw else len(pending)
            if cut:
                yield from split_paragraphs(pending[:cut])
                pending = pending[cut:]
            if not raw:
                return


def _last_paragraph_break(text: str) -> int:
    idx = text.rfind("\n\n")
    if idx < 0:
        # no paragraph break in a whole buffer: cut at a line end to keep memory bounded
        idx = text.rfind("\n") if len(text) > 4 * STREAM_BYTES else -1
        return idx + 1 if idx >= 0 else 0
    return idx + 2


MD_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$")
MD_FENCE = re.compile(r"^(```|~~~)")


def markdown_blocks(text: str) -> Iterator[Block]:
    """Markdown: ATX headings set the heading path; fenced code stays in one block."""
    path: list[str] = []
    buf: list[str] = []
    in_fence = False

    def flush():
        if buf:
            yield from split_paragraphs("".join(buf), tuple(path))
            buf.clear()

    for line in text.splitlines(keepends=True):
        if MD_FENCE.match(line):
            in_fence = not in_fence
        m = None if in_fence else MD_HEADING.match(line.rstrip("\r\n"))
        if m:
            yield from flush()
            level = len(m.group(1))
            path[:] = path[:level - 1] + [m.group(2).strip()]
            yield Block(line, tuple(path), is_heading=True)
        else:
            buf.append(line)
    yield from flush()


RST_ADORNMENT = re.compile(r"^([=\-~^\"'`#*+_:.])\1{2,}\s*$")


def rst_blocks(text: str) -> Iterator[Block]:
    """reStructuredText: a title underlined (optionally overlined) with punctuation is a heading;
    levels follow the order in which adornment styles first appear."""
    lines = text.splitlines(keepends=True)
    styles: list[str] = []
    path: list[str] = []
    buf: list[str] = []
    i = 0

    def flush():
        if buf:
            yield from split_paragraphs("".join(buf), tuple(path))
            buf.clear()

    while i < len(lines):
        title = lines[i].strip()
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        over = i > 0 and RST_ADORNMENT.match(lines[i - 1]) is not None
        if title and not RST_ADORNMENT.match(lines[i]) and RST_ADORNMENT.match(nxt) and len(nxt.strip()) >= len(title):
            style = nxt.strip()[0] + ("o" if over else "")
            if style not in styles:
                styles.append(style)
            level = styles.index(style)
            if over and buf and RST_ADORNMENT.match(buf[-1]):
                overline = buf.pop()
            else:
                overline = ""
            yield from flush()
            path[:] = path[:level] + [title]
            yield Block(overline + lines[i] + nxt, tuple(path), is_heading=True)
            i += 2
            continue
        buf.append(lines[i])
        i += 1
    yield from flush()


# ---- HTML ----------------------------------------------------------------------------------

HTML_SKIP = {"script", "style", "noscript", "template", "head", "svg", "iframe", "object", "canvas", "button", "select"}
HTML_BLOCK = {
    "p", "div", "li", "ul", "ol", "pre", "table", "tr", "td", "th", "blockquote", "section", "article",
    "header", "footer", "nav", "main", "aside", "dl", "dt", "dd", "hr", "br", "form", "figure",
    "figcaption", "caption", "tbody", "thead", "center", "address", "details", "summary",
}
HTML_HEADINGS = {f"h{i}": i for i in range(1, 7)}


def html_loaded(text: str) -> Loaded:
    from bs4 import BeautifulSoup, Comment, Doctype, NavigableString, ProcessingInstruction, Declaration

    soup = BeautifulSoup(text, "lxml")
    title = soup.title.get_text(" ", strip=True) if soup.title else None
    ignored = (Comment, Doctype, ProcessingInstruction, Declaration)
    blocks: list[Block] = []
    path: list[str] = []
    words: list[str] = []

    def flush():
        para = " ".join("".join(words).split())
        words.clear()
        if para:
            blocks.append(Block(para + "\n\n", tuple(path)))

    def walk(node, pre: bool):
        for child in node.children:
            if isinstance(child, NavigableString):
                if not isinstance(child, ignored):
                    words.append(str(child))
                continue
            name = child.name
            if name in HTML_SKIP:
                continue
            if name in HTML_HEADINGS:
                flush()
                heading = " ".join(child.get_text(" ").split())
                if heading:
                    level = HTML_HEADINGS[name]
                    path[:] = path[:level - 1] + [heading]
                    blocks.append(Block(heading + "\n\n", tuple(path), is_heading=True))
            elif name == "pre":
                flush()
                code = child.get_text().strip("\n")
                if code.strip():
                    blocks.append(Block(code + "\n\n", tuple(path)))
            elif name in HTML_BLOCK:
                flush()
                walk(child, pre)
                flush()
            else:
                walk(child, pre)

    body = soup.body or soup
    walk(body, False)
    flush()
    if not title:
        title = next((b.text.strip() for b in blocks if b.is_heading), None)
    return Loaded(title, iter(blocks))


# ---- PDF -----------------------------------------------------------------------------------

def pdf_loaded(path: Path) -> Loaded:
    with open(path, "rb") as f:
        if not f.read(1024).lstrip().startswith(b"%PDF-"):
            raise LoadError("not a PDF (no %PDF- header)")
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(str(path))
        title = (reader.metadata.title if reader.metadata else None) or None
        pages = [page.extract_text() or "" for page in reader.pages]
    except (PyPdfError, ValueError, KeyError, TypeError, OSError) as e:
        raise LoadError(f"unreadable PDF ({type(e).__name__}: {e})") from None
    blocks = []
    for n, page in enumerate(pages, 1):
        page = page.strip()
        if page:
            blocks += list(split_paragraphs(page + "\n\n", (f"page {n}",)))
    return Loaded(title, iter(blocks))


# ---- dispatch --------------------------------------------------------------------------------

STREAMED_SUFFIXES = {".txt", ".text", ".log", ""}


def _first_line_title(text: str) -> str | None:
    for line in text.splitlines():
        line = line.strip().lstrip("#").strip()
        if line:
            return line[:200]
    return None


def load_text(path: Path) -> Loaded:
    return Loaded(None, stream_paragraphs(path))


def load_markdown(path: Path) -> Loaded:
    text = read_text(path)
    return Loaded(_first_line_title(text), markdown_blocks(text))


def load_rst(path: Path) -> Loaded:
    text = read_text(path)
    return Loaded(_first_line_title(text), rst_blocks(text))


def load_html(path: Path) -> Loaded:
    return html_loaded(read_text(path))


LOADERS: dict[str, Callable[[Path], Loaded]] = {
    ".txt": load_text, ".text": load_text, ".log": load_text,
    ".md": load_markdown, ".markdown": load_markdown,
    ".rst": load_rst,
    ".html": load_html, ".htm": load_html, ".xhtml": load_html,
    ".pdf": pdf_loaded,
}


def sniff_kind(path: Path) -> str | None:
    """Guess a loader for a file with no known extension from its first bytes."""
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
    if head.lstrip().startswith(b"%PDF-"):
        return ".pdf"
    if b"\x00" in head:
        return None
    lowered = head.lstrip().lower()
    if lowered.startswith((b"<!doctype html", b"<html")):
        return ".html"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:  # not just a character cut at the sniff boundary
            return None
    return ".txt"


def loader_for(path: Path) -> Callable[[Path], Loaded]:
    """Pick a loader by extension; a file without one is sniffed (PDF, HTML, text or binary)."""
    suffix = path.suffix.lower()
    if suffix in LOADERS:
        return LOADERS[suffix]
    if suffix == "":
        kind = sniff_kind(path)
        if kind is None:
            raise Unsupported("binary file (not text), skipped")
        return LOADERS[kind]
    raise Unsupported(f"unsupported file type {suffix}, skipped")


def load(path: Path) -> Loaded:
    """Load a file into blocks; raises LoadError with a one-line reason."""
    return loader_for(path)(path)


__all__ = ["Block", "Loaded", "LoadError", "Unsupported", "load", "loader_for"]
