"""Token-aware chunking that keeps char offsets and heading paths.

Blocks (paragraphs, headings) are cut into sentence pieces; pieces are packed into chunks of
at most `size` tokens of the tokenizer that will read them. A chunk closes early at a heading,
prefers to end at a paragraph boundary, and the next chunk repeats the last sentences of the
previous one up to `overlap` tokens (never across a heading).
"""
from __future__ import annotations

import bisect
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from memstore.errors import InvalidInputError
from memstore.ingest.loaders import Block
from memstore.settings import CHUNK_OVERLAP, CHUNK_TOKENS
from memstore.store import ChunkIn

SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")
HEADING_FILL = 0.25  # a heading starts a new chunk once the current one is this full
PARAGRAPH_FILL = 0.6  # an overfull chunk goes back to a paragraph start past this fill
TOKENIZE_CHARS = 100_000  # longest stretch of a block tokenized at once
MAX_CHARS_PER_TOKEN = 12  # a chunk of `size` tokens holds at most size * this many characters


@dataclass
class ChunkerConfig:
    size: int = CHUNK_TOKENS
    overlap: int = CHUNK_OVERLAP

    def validate(self, max_tokens: int) -> ChunkerConfig:
        if self.size < 16:
            raise InvalidInputError(f"chunk size must be at least 16 tokens, got {self.size}")
        if self.size > max_tokens:
            raise InvalidInputError(f"chunk size {self.size} exceeds the embedder's maximum of {max_tokens} tokens")
        if not 0 <= self.overlap <= self.size // 2:
            raise InvalidInputError(f"overlap must be between 0 and half the chunk size ({self.size // 2}), got {self.overlap}")
        return self


@dataclass
class Piece:
    start: int
    text: str
    tokens: int
    heading_path: tuple[str, ...]
    section_start: bool  # first piece after a heading
    paragraph_start: bool


class Chunker:
    def __init__(self, tokenizer, config: ChunkerConfig):
        self.tokenizer = tokenizer
        self.config = config
        self.char_count = 0  # document length, known once `chunks` is exhausted

    def chunks(self, blocks: Iterable[Block]) -> Iterator[ChunkIn]:
        size, overlap = self.config.size, self.config.overlap
        max_chars = size * MAX_CHARS_PER_TOKEN
        current: list[Piece] = []
        ordinal = 0

        def overfull(pieces: list[Piece], piece: Piece) -> bool:
            return (sum(p.tokens for p in pieces) + piece.tokens > size
                    or sum(len(p.text) for p in pieces) + len(piece.text) > max_chars)

        def emit(pieces: list[Piece]) -> ChunkIn | None:
            nonlocal ordinal
            chunk = _make_chunk(pieces, ordinal)
            if chunk is not None:
                ordinal += 1
            return chunk

        for piece in self._pieces(blocks):
            tokens = sum(p.tokens for p in current)
            heading_break = piece.section_start and tokens >= HEADING_FILL * size
            if current and (overfull(current, piece) or heading_break):
                keep = [] if heading_break else _paragraph_tail(current, size)
                done = current[:len(current) - len(keep)]
                if (chunk := emit(done)) is not None:
                    yield chunk
                carry = [] if piece.section_start else _overlap_tail(done, overlap)
                current = carry + keep
                while current and overfull(current, piece):
                    current.pop(0)
            current.append(piece)
        if current and (chunk := emit(current)) is not None:
            yield chunk

    def _pieces(self, blocks: Iterable[Block]) -> Iterator[Piece]:
        """Sentence pieces of every block, each at most `size` tokens."""
        for block in blocks:
            start = self.char_count
            self.char_count += len(block.text)
            if not block.text.strip():
                # kept, with no tokens: a chunk's text is its pieces joined, so none may be left out
                yield Piece(start, block.text, 0, block.heading_path, section_start=False, paragraph_start=False)
                continue
            first = True
            for s, e in _windows(block.text):
                enc = self.tokenizer(block.text[s:e], add_special_tokens=False, return_offsets_mapping=True)
                offsets = [(a + s, b + s) for a, b in enc["offset_mapping"]]
                starts = [o[0] for o in offsets]
                for ss, se in _sentence_spans(block.text, s, e):
                    for ps, pe, n in _split_by_tokens(block.text, offsets, starts, ss, se, self.config.size):
                        yield Piece(start + ps, block.text[ps:pe], n, block.heading_path,
                                    section_start=block.is_heading and first,
                                    paragraph_start=first)
                        first = False


def _windows(text: str) -> Iterator[tuple[int, int]]:
    """Spans of at most TOKENIZE_CHARS that tile `text`, cut after a space where there is one, so
    a 5 MB paragraph is tokenized piece by piece (time and memory stay linear)."""
    pos = 0
    while len(text) - pos > TOKENIZE_CHARS:
        cut = text.rfind(" ", pos + TOKENIZE_CHARS // 2, pos + TOKENIZE_CHARS) + 1 or pos + TOKENIZE_CHARS
        yield pos, cut
        pos = cut
    yield pos, len(text)


def _sentence_spans(text: str, s: int, e: int) -> list[tuple[int, int]]:
    spans, pos = [], s
    for m in SENTENCE_END.finditer(text, s, e):
        spans.append((pos, m.end()))
        pos = m.end()
    if pos < e:
        spans.append((pos, e))
    return spans


def _split_by_tokens(text: str, offsets, starts: list[int], s: int, e: int, size: int) -> Iterator[tuple[int, int, int]]:
    """Split text[s:e] into spans of at most `size` tokens and `size * MAX_CHARS_PER_TOKEN` chars,
    cutting between words where there is a gap. The char bound matters where a tokenizer maps a
    long run of characters to one unknown token (a 300,000-character 'word' is 3 tokens)."""
    max_chars = size * MAX_CHARS_PER_TOKEN
    i, j = bisect.bisect_left(starts, s), bisect.bisect_left(starts, e)
    pos = s
    while j - i > size or e - pos > max_chars:
        end = pos
        if j - i > size:
            cut = i + size
            for t in range(i + size, i + size // 2, -1):
                if offsets[t - 1][1] < offsets[t][0]:  # a gap between tokens: a word boundary
                    cut = t
                    break
            end = offsets[cut][0]
        if end - pos > max_chars or end <= pos:
            end = text.rfind(" ", pos + max_chars // 2, pos + max_chars) + 1 or pos + max_chars
        cut = bisect.bisect_left(starts, end, i, j)
        yield pos, end, cut - i
        pos, i = end, cut
    if pos < e:
        yield pos, e, j - i


def _paragraph_tail(pieces: list[Piece], size: int) -> list[Piece]:
    """Pieces after the last paragraph start, when cutting there still leaves a well-filled chunk."""
    cut, total = 0, 0
    for idx, p in enumerate(pieces):
        if idx and p.paragraph_start and total >= PARAGRAPH_FILL * size:
            cut = idx
        total += p.tokens
    return pieces[cut:] if cut else []


def _overlap_tail(pieces: list[Piece], overlap: int) -> list[Piece]:
    tail, total = [], 0
    for p in reversed(pieces[1:]):
        if total + p.tokens > overlap:
            break
        tail.insert(0, p)
        total += p.tokens
    return tail


def _make_chunk(pieces: list[Piece], ordinal: int) -> ChunkIn | None:
    if not pieces:
        return None
    raw = "".join(p.text for p in pieces)
    text = raw.strip()
    if not text:
        return None
    lead = len(raw) - len(raw.lstrip())
    start = pieces[0].start + lead
    path = next((p.heading_path for p in pieces if p.heading_path), ())
    return ChunkIn(ordinal=ordinal, char_start=start, char_end=start + len(text), text=text,
                   token_count=sum(p.tokens for p in pieces), heading_path=" > ".join(path))
