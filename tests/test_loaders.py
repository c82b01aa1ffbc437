"""Loaders and the chunker on real pages and on the awkward files users have."""
import tracemalloc

import pytest
from conftest import SQLITE_DOC

from memstore.ingest.chunking import Chunker, ChunkerConfig
from memstore.ingest.loaders import LoadError, Unsupported, load, markdown_blocks, rst_blocks


def text_of(blocks):
    return "".join(b.text for b in blocks)


def test_html_keeps_visible_text_and_headings_drops_scripts(tmp_path):
    page = tmp_path / "p.html"
    page.write_text(
        "<html><head><title>T</title><style>.x{color:red}</style></head><body>"
        "<h1>Intro</h1><p>Hello <b>world</b>.</p><script>alert('x')</script>"
        "<h2>Details</h2><ul><li>one</li><li>two</li></ul><pre>code  block\n  kept</pre></body></html>"
    )
    loaded = load(page)
    blocks = list(loaded.blocks)
    text = text_of(blocks)
    assert loaded.title == "T"
    assert "alert" not in text and "color" not in text
    assert "Hello world." in text and "code  block\n  kept" in text
    assert [b.heading_path for b in blocks if b.is_heading] == [("Intro",), ("Intro", "Details")]
    assert next(b for b in blocks if b.text.startswith("one")).heading_path == ("Intro", "Details")


def test_markdown_and_rst_heading_paths():
    md = "# Guide\n\nIntro text.\n\n## Install\n\n```\n# not a heading\n```\n\nRun it.\n"
    blocks = list(markdown_blocks(md))
    assert text_of(blocks) == md
    assert [b.heading_path for b in blocks if b.is_heading] == [("Guide",), ("Guide", "Install")]
    rst = "Guide\n=====\n\nIntro.\n\nInstall\n-------\n\nRun it.\n"
    blocks = list(rst_blocks(rst))
    assert text_of(blocks) == rst
    assert blocks[-1].heading_path == ("Guide", "Install")


def test_pdf_and_fake_pdf(tmp_path):
    blocks = list(load(SQLITE_DOC / "copyright-release.pdf").blocks)
    assert "Copyright Release" in text_of(blocks) and blocks[0].heading_path == ("page 1",)
    fake = tmp_path / "fake.pdf"
    fake.write_text("I am not a PDF")
    with pytest.raises(LoadError, match="not a PDF"):
        load(fake)


def test_binary_invalid_utf8_and_unknown_types(tmp_path):
    (tmp_path / "img.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.raises(Unsupported):
        load(tmp_path / "img.png")
    (tmp_path / "blob").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(Unsupported, match="binary"):
        load(tmp_path / "blob")
    (tmp_path / "latin.txt").write_bytes("caf\xe9 ol\xe9\n".encode("latin-1"))
    with pytest.raises(LoadError, match="not valid utf-8 .* --encoding"):
        list(load(tmp_path / "latin.txt", "utf-8").blocks)  # named by the user: strict
    (tmp_path / "data.xyz").write_text("some text")
    with pytest.raises(Unsupported, match="unsupported file type .xyz"):
        load(tmp_path / "data.xyz")
    (tmp_path / "README").write_text("plain text without an extension")
    assert "plain text" in text_of(load(tmp_path / "README").blocks)


def test_chunk_offsets_point_at_the_text(embedder):
    for page in sorted(SQLITE_DOC.glob("*.html")):
        blocks = list(load(page).blocks)
        text = text_of(blocks)
        chunker = Chunker(embedder.tokenizer, ChunkerConfig(size=120, overlap=24))
        chunks = list(chunker.chunks(iter(blocks)))
        assert chunker.char_count == len(text)
        assert [c.ordinal for c in chunks] == list(range(len(chunks)))
        for c in chunks:
            assert text[c.char_start:c.char_end] == c.text
            n = len(embedder.tokenizer(c.text, add_special_tokens=False)["input_ids"])
            assert n <= 120 + 2, (page.name, n)  # +2: tokenization across sentence seams
        # consecutive chunks overlap or touch: no text is lost between them
        for a, b in zip(chunks, chunks[1:]):
            gap = text[a.char_end:b.char_start]
            assert b.char_start <= a.char_end or not gap.strip(), (page.name, gap[:80])


def test_chunks_start_at_headings(embedder):
    md = "# A\n\n" + "Alpha sentence here. " * 40 + "\n\n# B\n\n" + "Beta sentence here. " * 10 + "\n"
    chunks = list(Chunker(embedder.tokenizer, ChunkerConfig(size=100, overlap=20)).chunks(markdown_blocks(md)))
    b_chunks = [c for c in chunks if c.heading_path == "B"]
    assert b_chunks and b_chunks[0].text.startswith("# B")
    assert all("Beta" not in c.text for c in chunks if c.heading_path == "A")


def test_chunk_settings_are_validated(embedder):
    with pytest.raises(ValueError, match="exceeds the embedder's maximum"):
        ChunkerConfig(size=1000).validate(embedder.max_tokens)
    with pytest.raises(ValueError, match="overlap"):
        ChunkerConfig(size=100, overlap=80).validate(embedder.max_tokens)


def test_large_text_file_streams_in_bounded_memory(tmp_path):
    big = tmp_path / "big.txt"
    para = ("The quick brown fox jumps over the lazy dog. " * 20 + "\n\n").encode()
    with open(big, "wb") as f:
        for _ in range((64 << 20) // len(para)):  # 64 MiB
            f.write(para)
    tracemalloc.start()
    total = sum(len(b.text) for b in load(big).blocks)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert total == big.stat().st_size
    assert peak < 16 << 20, f"peak {peak / 2**20:.1f} MiB while streaming a 64 MiB file"
