"""Property-based tests (hypothesis): any bytes into any loader, any blocks into the chunker,
held to the contract in tests/contract.py."""
import codecs

from contract import SUFFIXES, assert_chunks_quote, loaded_text, loaded_with_encoding
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zoo import pdf_bytes

from memstore.ingest.loaders import Block

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MARKUP = st.text(alphabet=st.sampled_from(list("<>/!-=#*`~'\"&;:.? \n\r\tabcpdivhl1é日\u200b\x00")), max_size=600)
LINE = st.one_of(st.just(""), st.just("\n"), st.sampled_from(["# H", "## Sub", "=====", "-----", "```", "Title", ".. x::"]),
                 st.text(alphabet="ab .!?=#-", max_size=30))


@FUZZ
@given(data=st.binary(max_size=3000), suffix=st.sampled_from(SUFFIXES))
def test_any_bytes_load_cleanly_or_fail_with_a_reason(embedder, data, suffix):
    loaded_text(data, suffix, embedder.tokenizer)


@FUZZ
@given(text=st.text(max_size=800), encoding=st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-32"]))
def test_unicode_text_in_any_utf_round_trips_through_the_text_loader(embedder, text, encoding):
    raw = text.encode(encoding)
    if encoding == "utf-16" and raw.startswith(codecs.BOM_UTF32_LE) and len(raw) % 4 == 0:
        try:  # UTF-16 text that starts with NUL may be valid UTF-32 too: then it reads as that
            text = raw.decode("utf-32")
        except UnicodeDecodeError:
            pass
    got = loaded_text(raw, ".txt", embedder.tokenizer)
    if got is None:  # only a NUL in a BOM-less file's head makes it 'binary'
        assert encoding == "utf-8" and "\x00" in text
    else:
        assert got == text.replace("\x00", "\ufffd")


@FUZZ
@given(text=MARKUP, suffix=st.sampled_from([".md", ".rst", ".html", ".txt"]))
def test_markup_like_text_loads_and_chunks(embedder, text, suffix):
    got = loaded_text(text.encode(), suffix, embedder.tokenizer)
    if suffix in (".md", ".rst", ".txt") and got is not None:
        assert got == text.replace("\x00", "\ufffd")  # these loaders keep the text as it is


@FUZZ
@given(lines=st.lists(st.text(alphabet=st.characters(codec="latin-1", exclude_characters="()\\\r\n"), max_size=40),
                      max_size=4),
       cut=st.integers(min_value=0, max_value=2000), garbage=st.binary(max_size=64))
def test_damaged_pdfs_fail_with_a_reason(embedder, lines, cut, garbage):
    whole = pdf_bytes(lines)
    for data in (whole, whole[:cut] + garbage + whole[cut:], whole[:cut]):
        loaded_text(data, ".pdf", embedder.tokenizer)


@FUZZ
@given(data=st.data(), encoding=st.sampled_from(["cp1252", "cp1251", "shift_jis", "gb18030", "latin-1"]))
def test_legacy_text_decodes_faithfully_to_the_recorded_encoding(embedder, data, encoding):
    alphabet = st.characters(codec=encoding, exclude_characters="\x00", min_codepoint=9)
    raw = data.draw(st.text(alphabet=alphabet, min_size=1, max_size=300)).encode(encoding)
    loaded = loaded_with_encoding(raw, ".txt", embedder.tokenizer)
    if loaded is None:
        return  # no encoding fits: refused with a reason
    text, recorded = loaded
    assert text == raw.decode(recorded, errors="replace")  # whatever was guessed, it is what was read with
    assert recorded not in ("cp037", "cp500", "cp875", "utf-16", "utf-32")  # ASCII-compatible guesses only


@FUZZ
@given(blocks=st.lists(st.tuples(st.text(max_size=400), st.booleans(),
                                 st.lists(st.text(min_size=1, max_size=8), max_size=3)), max_size=12))
def test_the_chunker_quotes_any_blocks_exactly(embedder, blocks):
    blocks = [Block(t, tuple(path), is_heading=h) for t, h, path in blocks]
    assert_chunks_quote("".join(b.text for b in blocks), blocks, embedder.tokenizer)


@FUZZ
@given(lines=st.lists(LINE, max_size=40), suffix=st.sampled_from([".md", ".rst"]))
def test_heading_and_blank_line_structures_chunk_exactly(embedder, lines, suffix):
    text = "\n".join(lines)
    got = loaded_text(text.encode(), suffix, embedder.tokenizer)
    assert got is None or got == text.replace("\x00", "\ufffd")
