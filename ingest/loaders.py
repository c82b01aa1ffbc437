"""Files -> text blocks with structure.

A loader yields `Block`s that tile the document text: each block's text starts where the
previous one ended, so char offsets into the concatenation are exact and a chunk's text is
always `document_text[start:end]`. Plain text is streamed, so a huge file needs bounded memory.
"""
from __future__ import annotations

import codecs
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from memstore.errors import LoadError, Unsupported

SNIFF_BYTES = 8192
STREAM_BYTES = 1 << 20


@dataclass
class Block:
    text: str  # includes the separator that follows it, so blocks tile the document
    heading_path: tuple[str, ...] = ()
    is_heading: bool = False


@dataclass
class Loaded:
    title: str | None
    blocks: Iterator[Block]
    encoding: str | None = None  # the text encoding the file was read with (None for PDF)


# ---- text and its encoding -------------------------------------------------------------------

MAX_WHOLE_FILE = 256 << 20  # loaders that parse a whole file at once (HTML, Markdown, rST) read at most this
GUESS_BYTES = 1 << 20  # how much of a non-UTF-8 file the encoding guess looks at
PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n\s*")
# NUL and lone surrogates cannot be stored (PostgreSQL text, UTF-8); one U+FFFD each keeps every offset
UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
BOMS = (  # UTF-32 first: its little-endian mark starts with UTF-16's
    (codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"),
)
# when several encodings fit a short sample equally well, the most common one wins
COMMON_ENCODINGS = ("utf_8", "cp1252", "latin_1", "cp1250", "cp1251", "gb18030", "cp932", "euc_kr", "big5")
HTML_CHARSET = re.compile(rb"<meta[^>]+charset\s*=\s*[\"']?\s*([A-Za-z0-9_.:-]+)", re.IGNORECASE)


@dataclass(frozen=True)
class TextEncoding:
    name: str  # Python codec name, recorded with the document
    errors: str = "strict"  # "replace" when the encoding is a guess: a stray byte must not sink the file

    def decoder(self):
        return codecs.getincrementaldecoder(self.name)(errors=self.errors)

    def decode(self, data: bytes) -> str:
        try:
            return data.decode(self.name, errors=self.errors)
        except UnicodeDecodeError as e:
            raise self.error(e.start) from None

    def error(self, offset: int) -> LoadError:
        return LoadError(f"not valid {self.name} (bad byte at offset {offset}); "
                         f"name the file's encoding with --encoding, or convert it to UTF-8")


def codec_name(name: str) -> str:
    """The canonical Python codec for an encoding name; LookupError if Python has none."""
    return codecs.lookup(name).name


def text_encoding(path: Path, named: str | None = None, declared: str | None = None) -> TextEncoding:
    """How to decode a text file: the encoding the user named; else a byte-order mark; else UTF-8
    when the whole file is valid UTF-8; else `declared` (an HTML meta charset) or the best guess."""
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
    if named:
        return TextEncoding(codec_name(named))
    for bom, name in BOMS:
        if head.startswith(bom) and (name != "utf-32" or _fits_utf32(head, path.stat().st_size)):
            return TextEncoding(name)
    if b"\x00" in head:
        raise Unsupported("binary file (NUL bytes), skipped")
    if _is_utf8(path):
        return TextEncoding("utf-8")
    if declared:
        try:
            return TextEncoding(codec_name(declared.decode("ascii")), "replace")
        except (LookupError, UnicodeDecodeError):
            pass
    guess = guess_encoding(path)
    if guess is None:
        raise Unsupported("not text: no encoding fits (if it is text, name its encoding with --encoding), skipped")
    return TextEncoding(guess, "replace")


def _fits_utf32(head: bytes, size: int) -> bool:
    """Whether a file that starts FF FE 00 00 reads as UTF-32: UTF-16 text whose first character
    is NUL starts with the same four bytes."""
    try:
        head[:len(head) // 4 * 4].decode("utf-32")
    except UnicodeDecodeError:
        return False
    return size % 4 == 0


def _is_utf8(path: Path) -> bool:
    decoder = codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as f:
        try:
            while block := f.read(STREAM_BYTES):
                decoder.decode(block)
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return False
    return True


def guess_encoding(path: Path) -> str | None:
    """charset-normalizer's best fit for the file's first MiB, preferring common encodings on a tie."""
    import charset_normalizer

    with open(path, "rb") as f:
        sample = f.read(GUESS_BYTES)
    matches = [m for m in charset_normalizer.from_bytes(sample) if _ascii_compatible(m.encoding)]
    if not matches:
        return None
    best = min((m.chaos, -m.coherence) for m in matches)
    tied = [m.encoding for m in matches if (m.chaos, -m.coherence) == best]
    name = next((e for e in COMMON_ENCODINGS if e in tied), tied[0])
    return codec_name("utf-8" if name == "ascii" else name)


def _ascii_compatible(encoding: str) -> bool:
    """Whether ASCII bytes mean ASCII in `encoding`: true of every plausible guess for a file
    without NUL bytes, false of UTF-16/32 and EBCDIC, which fit short samples by accident."""
    probe = bytes(range(0x20, 0x7F)) + b"\t\n\r"
    try:
        return probe.decode(encoding) == probe.decode("ascii")
    except (UnicodeDecodeError, LookupError):
        return False


def read_text(path: Path, encoding: TextEncoding) -> str:
    size = path.stat().st_size
    if size > MAX_WHOLE_FILE:
        raise LoadError(f"{size / 2**20:.0f} MiB is more than the {MAX_WHOLE_FILE >> 20} MiB a {path.suffix or 'text'} "
                        f"file may have (it is parsed whole); split it, or save it as .txt, which is streamed")
    return encoding.decode(path.read_bytes())


def split_paragraphs(text: str, heading_path: tuple[str, ...] = ()) -> Iterator[Block]:
    """Cut text at blank lines; each block keeps its trailing blank lines."""
    pos = 0
    for m in PARAGRAPH_BREAK.finditer(text):
        yield Block(text[pos:m.end()], heading_path)
        pos = m.end()
    if pos < len(text):
        yield Block(text[pos:], heading_path)


def stream_paragraphs(path: Path, encoding: TextEncoding) -> Iterator[Block]:
    """Paragraph blocks of a text file, read and decoded 1 MiB at a time."""
    decoder = encoding.decoder()
    with open(path, "rb") as f:
        offset, pending = 0, ""
        while True:
            raw = f.read(STREAM_BYTES)
            try:
                pending += decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                raise encoding.error(offset + e.start) from None
            offset += len(raw)
            cut = _safe_cut(pending) if raw else len(pending)
            if cut:
                yield from split_paragraphs(pending[:cut])
                pending = pending[cut:]
            if not raw:
                return


def _safe_cut(text: str) -> int:
    """Where to end what can be handed on: after the last paragraph break; in a buffer that has
    grown past 4 MiB without one, at the last line end, else the last space, else anywhere."""
    idx = text.rfind("\n\n")
    if idx >= 0:
        return idx + 2
    if len(text) <= 4 * STREAM_BYTES:
        return 0
    for sep in ("\n", " "):
        idx = text.rfind(sep)
        if idx >= 0:
            return idx + 1
    return len(text)


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


def html_loaded(text: str, encoding: str | None = None) -> Loaded:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(text, "lxml")
    title = soup.title.get_text(" ", strip=True) if soup.title else None
    blocks = html_blocks(soup.body or soup)
    if not title:
        title = next((b.text.strip() for b in blocks if b.is_heading), None)
    return Loaded(title, iter(blocks), encoding)


def html_blocks(root) -> list[Block]:
    """Visible text of a parsed page as paragraph blocks, headings setting the heading path.

    The tree is walked with an explicit stack, so a page nested 100,000 elements deep costs
    memory, not Python's recursion limit."""
    from bs4 import (
        Comment,
        Declaration,
        Doctype,
        NavigableString,
        ProcessingInstruction,
    )

    ignored = (Comment, Doctype, ProcessingInstruction, Declaration)
    blocks: list[Block] = []
    path: list[str] = []
    words: list[str] = []

    def flush():
        para = " ".join("".join(words).split())
        words.clear()
        if para:
            blocks.append(Block(para + "\n\n", tuple(path)))

    stack = [(iter(root.children), False)]  # (children still to visit, flush when they are done)
    while stack:
        children, is_block = stack[-1]
        child = next(children, None)
        if child is None:
            stack.pop()
            if is_block:
                flush()
            continue
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
        else:
            if name in HTML_BLOCK:
                flush()
            stack.append((iter(child.children), name in HTML_BLOCK))
    flush()
    return blocks


# ---- PDF -----------------------------------------------------------------------------------

def pdf_loaded(path: Path, encoding: str | None = None) -> Loaded:
    with open(path, "rb") as f:
        if not f.read(1024).lstrip().startswith(b"%PDF-"):
            raise LoadError("not a PDF (no %PDF- header)")
    if path.stat().st_size > MAX_WHOLE_FILE:
        raise LoadError(f"PDF larger than {MAX_WHOLE_FILE >> 20} MiB; split it")
    from pypdf import PdfReader

    try:
        reader = PdfReader(str(path))
        title = (reader.metadata.title if reader.metadata else None) or None
        pages = [page.extract_text() or "" for page in reader.pages]
    except Exception as e:  # noqa: BLE001 - a damaged PDF breaks pypdf in any number of ways
        raise LoadError(f"unreadable PDF ({type(e).__name__}: {one_line(e)})") from None
    blocks = []
    for n, page in enumerate(pages, 1):
        page = page.strip()
        if page:
            blocks += list(split_paragraphs(page + "\n\n", (f"page {n}",)))
    return Loaded(str(title) if title else None, iter(blocks))


def one_line(error: BaseException, limit: int = 200) -> str:
    text = " ".join(str(error).split())
    return text[:limit] + ("..." if len(text) > limit else "")


# ---- dispatch --------------------------------------------------------------------------------

MAX_TITLE = 500


def _first_line_title(text: str) -> str | None:
    for line in text.splitlines():
        line = line.strip().lstrip("#").strip()
        if line:
            return line[:200]
    return None


def _decoded(path: Path, encoding: str | None, declared: bytes | None = None) -> tuple[str, str]:
    enc = text_encoding(path, encoding, declared)
    return read_text(path, enc), enc.name


def load_text(path: Path, encoding: str | None = None) -> Loaded:
    enc = text_encoding(path, encoding)
    return Loaded(None, stream_paragraphs(path, enc), enc.name)


def load_markdown(path: Path, encoding: str | None = None) -> Loaded:
    text, name = _decoded(path, encoding)
    return Loaded(_first_line_title(text), markdown_blocks(text), name)


def load_rst(path: Path, encoding: str | None = None) -> Loaded:
    text, name = _decoded(path, encoding)
    return Loaded(_first_line_title(text), rst_blocks(text), name)


def load_html(path: Path, encoding: str | None = None) -> Loaded:
    with open(path, "rb") as f:
        declared = HTML_CHARSET.search(f.read(SNIFF_BYTES))
    text, name = _decoded(path, encoding, declared.group(1) if declared else None)
    return html_loaded(UNSTORABLE.sub("\ufffd", text), name)


LOADERS: dict[str, Callable[[Path, str | None], Loaded]] = {
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
    if b"\x00" in head and not any(head.startswith(bom) for bom, _ in BOMS):
        return None
    lowered = head.lstrip().lower()
    if lowered.startswith((b"<!doctype html", b"<html")):
        return ".html"
    return ".txt"


def loader_for(path: Path) -> Callable[[Path, str | None], Loaded]:
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


def load(path: Path, encoding: str | None = None) -> Loaded:
    """Load a file into blocks; raises LoadError with a one-line reason.

    `encoding` names the text encoding of text files (txt, md, rst, html); by default it is
    read from a byte-order mark, else UTF-8, else guessed. Block text never holds NUL or a lone
    surrogate (each becomes U+FFFD, so offsets are unchanged)."""
    loaded = loader_for(path)(path, encoding)
    title = storable(loaded.title)[:MAX_TITLE] if loaded.title else None
    return Loaded(title, _storable_blocks(loaded.blocks), loaded.encoding)


def storable(text: str) -> str:
    return UNSTORABLE.sub("\ufffd", text)


def _storable_blocks(blocks: Iterator[Block]) -> Iterator[Block]:
    for block in blocks:
        if UNSTORABLE.search(block.text) or any(UNSTORABLE.search(h) for h in block.heading_path):
            block = Block(storable(block.text), tuple(map(storable, block.heading_path)), block.is_heading)
        yield block


__all__ = ["Block", "LoadError", "Loaded", "TextEncoding", "Unsupported", "codec_name", "load", "loader_for"]
