"""The loaders' and chunker's contract, checked by the property tests and the fuzzer: a file
either loads into blocks whose chunks quote the document text exactly at their offsets, or
fails with a LoadError (a clean per-file reason). Nothing else may escape."""
import tempfile
from pathlib import Path

from memstore.ingest.chunking import MAX_CHARS_PER_TOKEN, Chunker, ChunkerConfig
from memstore.ingest.loaders import UNSTORABLE, Block, LoadError, load

SIZE, OVERLAP = 32, 8
SUFFIXES = [".txt", ".md", ".rst", ".html", ".pdf", ""]


def kind_and_body(data: bytes) -> tuple[str, bytes]:
    """A fuzzer input: its first byte picks the kind of file, the rest is the file."""
    return (SUFFIXES[data[0] % len(SUFFIXES)], data[1:]) if data else (".txt", b"")


def loaded_text(data: bytes, suffix: str, tokenizer) -> str | None:
    """Load `data` as a file with `suffix` and chunk it; check every chunk against the text.
    Returns the document text, or None when the loader refused the file with a LoadError."""
    loaded = loaded_with_encoding(data, suffix, tokenizer)
    return loaded and loaded[0]


def loaded_with_encoding(data: bytes, suffix: str, tokenizer) -> tuple[str, str | None] | None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"input{suffix}"
        path.write_bytes(data)
        try:
            loaded = load(path)
            blocks = list(loaded.blocks)
        except LoadError:
            return None
    text = "".join(b.text for b in blocks)
    assert not UNSTORABLE.search(text)
    assert_chunks_quote(text, blocks, tokenizer)
    return text, loaded.encoding


def assert_chunks_quote(text: str, blocks: list[Block], tokenizer) -> None:
    chunker = Chunker(tokenizer, ChunkerConfig(size=SIZE, overlap=OVERLAP))
    chunks = list(chunker.chunks(iter(blocks)))
    assert chunker.char_count == len(text)
    assert [c.ordinal for c in chunks] == list(range(len(chunks)))
    for c in chunks:
        assert c.text and c.text == c.text.strip()
        assert text[c.char_start:c.char_end] == c.text
        assert len(c.text) <= SIZE * MAX_CHARS_PER_TOKEN
        assert c.token_count <= SIZE
    starts = [c.char_start for c in chunks]
    assert starts == sorted(starts)
