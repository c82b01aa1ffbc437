"""One bad file never stops a run; any store path works; text in any common encoding (issue 20)."""
import codecs
import os

import psycopg
import pytest
from click.testing import CliRunner
from conftest import PG_ADMIN_URL
from sqlalchemy.exc import OperationalError
from zoo import cli
from zoo import needle_found as found

import memstore
from memstore.cli import main
from memstore.ingest import loaders, pipeline
from memstore.ingest.chunking import MAX_CHARS_PER_TOKEN, Chunker, ChunkerConfig
from memstore.ingest.loaders import Block, LoadError, load

PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=test"


def good_file(folder, word="zanzibar"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "good.txt").write_text(f"The harbour master of {word} keeps the tide tables.\n")
    return folder


# ---- the three reported cases ------------------------------------------------------------------

def test_deep_html_beside_a_good_file_ingests_both_without_a_traceback(tmp_path):
    docs = good_file(tmp_path / "docs")
    (docs / "deep.html").write_text("<html><body>" + "<div>" * 20000 + "bottom quokka" + "</div>" * 20000)
    store = str(tmp_path / "kb")
    code, out, err = cli("ingest", str(docs), "--store", store)
    assert code == 0 and "Traceback" not in err, err
    assert "2 ingested" in out
    with memstore.open(store) as mem:
        assert found(mem, "zanzibar") and found(mem, "quokka")


ODD_NAMES = ["o'brien docs", "R&D notes", "100% docs", "%41%25 a?b#c@d:e", "$HOME `x` \"q\"", "ünï 日本 🙂",
             "n" * 240]


@pytest.mark.parametrize("name", ODD_NAMES)
def test_any_directory_name_works_as_store_data_and_input(tmp_path, name):
    docs = good_file(tmp_path / f"in {name}")
    (docs / f"{name[:200]}.md").write_text("# Odd\n\nThe wombat sleeps.\n")
    store = str(tmp_path / name)
    runner = CliRunner()
    done = runner.invoke(main, ["ingest", str(docs), "--store", store, "--glob", "*.md", "--json"])
    assert done.exit_code == 0 and '"files_ingested": 1' in done.stdout, done.output
    done = runner.invoke(main, ["ingest", str(docs), "--store", store])
    assert done.exit_code == 0, done.output
    assert (tmp_path / name / "memstore.db").exists()
    assert runner.invoke(main, ["check", "--store", store]).exit_code == 0
    with memstore.open(store) as mem:
        assert found(mem, "zanzibar") and found(mem, "wombat")
        assert {os.path.basename(d["source"]) for d in mem.store.documents()} == {"good.txt", f"{name[:200]}.md"}


@pytest.fixture
def odd_pg_url():
    """A PostgreSQL database whose name and (ignored, trust auth) password hold URL-hostile characters."""
    from urllib.parse import quote

    name = f"memstore odd %&'$ ü {os.getpid()}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    host = PG_ADMIN_URL.split("@", 1)[1].rsplit("/", 1)[0]
    yield f"postgresql+psycopg://postgres:{quote('p@ss:w%rd/&$', safe='')}@{host}/{quote(name, safe='')}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_postgres_url_with_odd_database_name_and_password(tmp_path, pg_server, odd_pg_url):
    docs = good_file(tmp_path / "docs 100%")
    data_dir = str(tmp_path / "data o'brien & 100%")
    code, _, err = cli("ingest", str(docs), "--store", odd_pg_url, "--data-dir", data_dir)
    assert code == 0, err
    assert cli("check", "--store", odd_pg_url, "--data-dir", data_dir)[0] == 0
    with memstore.open(odd_pg_url, data_dir=data_dir) as mem:
        assert found(mem, "zanzibar")


def test_utf16_and_utf32_with_bom_are_read(tmp_path):
    text = "Grüße aus Köln, 日本語, emoji 🙂.\n\nSecond paragraph.\n"
    cases = {"u16.txt": (text.encode("utf-16"), "utf-16"),
             "u16be.md": (codecs.BOM_UTF16_BE + text.encode("utf-16-be"), "utf-16"),
             "u32.txt": (text.encode("utf-32"), "utf-32"),
             "u8bom.rst": (codecs.BOM_UTF8 + text.encode(), "utf-8-sig"),
             "noext": (text.encode("utf-16"), "utf-16"),
             "nul16.txt": (("\x00" + text).encode("utf-16"), "utf-16")}  # starts FF FE 00 00, like UTF-32
    for name, (data, encoding) in cases.items():
        (tmp_path / name).write_bytes(data)
        loaded = load(tmp_path / name)
        assert loaded.encoding == encoding, name
        expected = "\ufffd" + text if name == "nul16.txt" else text  # a NUL is stored as U+FFFD
        assert "".join(b.text for b in loaded.blocks) == expected, name


# ---- encodings ---------------------------------------------------------------------------------

@pytest.mark.parametrize("encoding,text", [
    ("cp1252", "Le café était fermé; “Noël” à l’école – 5 €.\n" * 3),
    ("cp1251", "Привет, как дела? Это тест кодировки на русском языке.\n" * 3),
    ("shift_jis", "日本語のテキストです。これはテストです。\n" * 3),
    ("gb18030", "这是一个中文测试文件。我们检查编码。\n" * 3),
])
def test_legacy_encodings_are_detected_and_recorded(tmp_path, store_target, encoding, text):
    (tmp_path / "legacy.txt").write_bytes(text.encode(encoding))
    target, data_dir = store_target
    with memstore.open(target, data_dir=data_dir) as mem:
        s = mem.ingest(tmp_path / "legacy.txt")
        [doc] = mem.store.documents()
        chunk_text = mem.search(text.split()[0], k=1, mode="lexical")[0].text
    assert s["files_ingested"] == 1
    assert text.encode(encoding).decode(doc["encoding"]) == text  # the guess decodes these bytes the same way
    assert chunk_text in text


def test_encoding_option_names_the_encoding_and_rejects_unknown_names(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_bytes("naïve café\n".encode("cp1252"))
    store = str(tmp_path / "kb")
    runner = CliRunner()
    result = runner.invoke(main, ["ingest", str(tmp_path / "docs"), "--store", store, "--encoding", "no-such-codec"])
    assert result.exit_code == 2 and "unknown encoding 'no-such-codec'" in result.output
    result = runner.invoke(main, ["ingest", str(tmp_path / "docs"), "--store", store, "--encoding", "windows-1252"])
    assert result.exit_code == 0, result.output
    with memstore.open(store) as mem:
        assert mem.store.documents()[0]["encoding"] == "cp1252"
        assert mem.search("naïve", k=1, mode="lexical")[0].text == "naïve café"
    (tmp_path / "docs" / "b.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    result = runner.invoke(main, ["ingest", str(tmp_path / "docs"), "--store", store, "--encoding", "utf-8"])
    assert result.exit_code == 1 and "not valid utf-8 (bad byte at offset 3)" in result.output


def test_nul_and_lone_surrogates_never_reach_the_store(tmp_path):
    (tmp_path / "late.txt").write_text("x " * 5000 + "before\x00after pelican\n")
    loaded = load(tmp_path / "late.txt")
    text = "".join(b.text for b in loaded.blocks)
    assert "\x00" not in text and "before\ufffdafter" in text and len(text) == 10000 + len("before\x00after pelican\n")


def test_add_text_stores_text_with_nul_and_lone_surrogates(store_target):
    target, data_dir = store_target
    with memstore.open(target, data_dir=data_dir) as mem:
        mem.add_text("An ibis\x00 stood \ud800 here.", source="odd")
        [hit] = mem.search("ibis", k=1, mode="lexical")
    assert hit.text == "An ibis\ufffd stood \ufffd here."


# ---- failures stay per file ---------------------------------------------------------------------

@pytest.mark.parametrize("error,reason", [
    (RecursionError("maximum recursion depth exceeded"), "too deeply nested"),
    (MemoryError(), "ran out of memory"),
    (KeyError("parser bug"), "internal error while reading it (KeyError"),
])
def test_any_loader_exception_fails_that_file_only(tmp_path, monkeypatch, error, reason):
    def broken(path, encoding=None):
        raise error

    monkeypatch.setitem(loaders.LOADERS, ".md", broken)
    docs = good_file(tmp_path / "docs")
    (docs / "bad.md").write_text("# Bad\n")
    with memstore.open(tmp_path / "kb") as mem:
        s = mem.ingest(docs)
        assert found(mem, "zanzibar")
    assert s["files_ingested"] == 1 and s["files_failed"] == 1
    assert s["failed"][0]["path"].endswith("bad.md") and reason in s["failed"][0]["reason"]


def test_verbose_shows_the_traceback_and_plain_runs_do_not(tmp_path, monkeypatch):
    def broken(path, encoding=None):
        raise ZeroDivisionError("a parser bug")

    monkeypatch.setitem(loaders.LOADERS, ".md", broken)
    docs = good_file(tmp_path / "docs")
    (docs / "bad.md").write_text("# Bad\n")
    runner = CliRunner()
    plain = runner.invoke(main, ["ingest", str(docs), "--store", str(tmp_path / "a")])
    assert plain.exit_code == 1 and "Traceback" not in plain.output
    assert "FAILED" in plain.stderr and "ZeroDivisionError: a parser bug" in plain.stderr
    loud = runner.invoke(main, ["ingest", str(docs), "--store", str(tmp_path / "b"), "--verbose"])
    assert loud.exit_code == 1 and "Traceback" in loud.stderr and "in broken" in loud.stderr


def test_an_embedding_failure_fails_only_the_file_that_causes_it(tmp_path, monkeypatch):
    docs = good_file(tmp_path / "docs")
    (docs / "poison.txt").write_text("this chunk breaks the embedder: poison\n")
    with memstore.open(tmp_path / "kb") as mem:
        encode = mem.embedder.encode

        def fragile(texts, *a, **kw):
            if any("poison" in t for t in texts):
                raise RuntimeError("embedder crashed")
            return encode(texts, *a, **kw)

        monkeypatch.setattr(mem.embedder, "encode", fragile)
        s = mem.ingest(docs)
        assert found(mem, "zanzibar") and not found(mem, "poison")
        assert mem.check()["consistent"]
    assert s["files_ingested"] == 1 and [f["path"].rsplit("/", 1)[1] for f in s["failed"]] == ["poison.txt"]
    assert "while embedding it (RuntimeError: embedder crashed)" in s["failed"][0]["reason"]


def test_a_document_the_database_refuses_fails_alone(tmp_path, monkeypatch, pg_url):
    """PostgreSQL refuses NUL in text; were a loader to let one through, only its file would fail."""
    real_load = pipeline.load

    def leaky(path, encoding=None):
        if path.name != "nul.txt":
            return real_load(path, encoding)
        return loaders.Loaded("t", iter([Block("NUL \x00 inside\n")]), "utf-8")

    monkeypatch.setattr(pipeline, "load", leaky)
    docs = good_file(tmp_path / "docs")
    (docs / "nul.txt").write_text("placeholder\n")
    with memstore.open(pg_url, data_dir=tmp_path / "d") as mem:
        s = mem.ingest(docs)
        assert found(mem, "zanzibar") and mem.check()["consistent"]
        assert [os.path.basename(d["source"]) for d in mem.store.documents()] == ["good.txt"]
    assert s["files_failed"] == 1 and "the database refused it (DataError" in s["failed"][0]["reason"]


def test_a_failing_store_ends_the_run(tmp_path, monkeypatch):
    docs = good_file(tmp_path / "docs")
    with memstore.open(tmp_path / "kb") as mem:
        def down(*a, **kw):
            raise OperationalError("INSERT", {}, Exception("database or disk is full"))

        monkeypatch.setattr(mem.store, "add_document", down)
        with pytest.raises(OperationalError):
            mem.ingest(docs)


def test_a_file_too_large_to_parse_whole_is_refused_with_its_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(loaders, "MAX_WHOLE_FILE", 1 << 20)
    (tmp_path / "big.md").write_text("# Big\n\n" + "word " * 300_000)
    with pytest.raises(LoadError, match=r"more than the 1 MiB a \.md file may have .* save it as \.txt"):
        load(tmp_path / "big.md")
    (tmp_path / "big.txt").write_text("word " * 300_000)  # streamed: no limit
    assert sum(len(b.text) for b in load(tmp_path / "big.txt").blocks) == 1_500_000


def test_a_line_without_breaks_is_streamed_in_bounded_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(loaders, "STREAM_BYTES", 256)
    text = "".join(f"w{i} " for i in range(20_000)) + "x" * 5000  # one line, then one long word
    (tmp_path / "line.txt").write_text(text)
    blocks = list(load(tmp_path / "line.txt").blocks)
    assert "".join(b.text for b in blocks) == text
    assert max(len(b.text) for b in blocks) <= 5 * 256


def test_chunks_are_bounded_in_characters_not_only_tokens(embedder):
    text = "a" * 300_000 + " " + ("€" * 120 + " ") * 200 + "Normal words follow here."
    chunker = Chunker(embedder.tokenizer, ChunkerConfig(size=100, overlap=10))
    chunks = list(chunker.chunks(iter([Block(text)])))
    assert all(text[c.char_start:c.char_end] == c.text for c in chunks)
    assert max(len(c.text) for c in chunks) <= 100 * MAX_CHARS_PER_TOKEN
    assert chunks[-1].text.endswith("Normal words follow here.")


def test_fifos_are_skipped_and_non_utf8_file_names_are_kept(tmp_path):
    docs = good_file(tmp_path / "docs")
    os.mkfifo(docs / "pipe.txt")
    odd = os.path.join(os.fsencode(docs), b"caf\xe9.txt")
    with open(odd, "wb") as f:
        f.write(b"The latin-1 name holds a narwhal.\n")
    store = tmp_path / "kb"
    with memstore.open(store) as mem:
        first = mem.ingest(docs)
        again = mem.ingest(docs, prune=True)
        sources = sorted(os.path.basename(d["source"]) for d in mem.store.documents())
        assert found(mem, "narwhal")
    assert first["files_ingested"] == 2 and first["files_failed"] == 0
    assert [s["reason"] for s in first["skipped"]] == ["not a regular file (a fifo, socket or device), skipped"]
    assert sources == ["caf\\xe9.txt", "good.txt"]
    assert again["files_ingested"] == 0 and again["documents_removed"] == 0  # unchanged, and not pruned
    code, _, err = cli("ingest", str(docs), "--store", str(store))  # printing the odd name must not crash
    assert code == 0 and "Traceback" not in err
