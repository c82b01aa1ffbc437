"""A zoo of bad and odd inputs for ingestion: each kind written into a directory, with what
ingesting it must give. Used by tests/test_zoo.py (scaled down) and bench/zoo.py (full size).

Every kind either becomes a document (its needle word is then searchable), is skipped with a
reason, or fails with a reason; none may stop the run or print a traceback."""
from __future__ import annotations

import codecs
import gzip
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

INGESTED, SKIPPED, FAILED, HANDLED = "ingested", "skipped", "failed", "handled"  # handled: any of the three


@dataclass
class Kind:
    name: str
    expect: str
    write: Callable[[Path, str, float], Path]  # (directory, needle, scale) -> the path to ingest
    encoding: str | None = None  # the encoding the document must record, where it matters


def needle(i: int) -> str:
    """A word found nowhere else: zq + letters + x."""
    letters = ""
    while True:
        letters = chr(97 + i % 26) + letters
        i //= 26
        if not i:
            return f"zq{letters}x"


def prose(word: str, sentences: int = 3) -> str:
    return " ".join(f"Sentence {n} of the note mentions {word} among ordinary words." for n in range(sentences)) + "\n"


def pdf_bytes(lines: list[str]) -> bytes:
    """A one-page PDF showing `lines` in Helvetica, with a correct cross-reference table."""
    content = "BT /F1 12 Tf 72 720 Td " + " ".join(f"({line}) Tj 0 -16 Td" for line in lines) + " ET"
    objects = [
        "<< /Type /Catalog /Pages 2 0 R >>",
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        "/Resources << /Font << /F1 5 0 R >> >> >>",
        f"<< /Length {len(content)} >>\nstream\n{content}\nendstream",
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out, offsets = b"%PDF-1.4\n", []
    for n, obj in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{n} 0 obj\n{obj}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    return out + f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()


def _file(name: str, data: bytes | str | Callable[[str, float], bytes | str]):
    def write(d: Path, word: str, scale: float) -> Path:
        body = data(word, scale) if callable(data) else data
        path = d / name
        path.write_bytes(body.encode() if isinstance(body, str) else body)
        return path
    return write


def _random_bytes(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def _single_line(word: str, scale: float) -> str:
    n = int(5_000_000 * scale)
    filler = ("lorem ipsum dolor sit amet " * (n // 27 + 1))[: n // 2]
    return filler + f" {word} " + filler


def _many_lines(word: str, scale: float) -> str:
    n = int(200_000 * scale)
    return "".join(f"line {i}\n" if i != n // 2 else f"{word}\n" for i in range(n))


def _deep_html(word: str, scale: float) -> str:
    n = max(2000, int(20_000 * scale))
    return "<html><body>" + "<div>" * n + f"deep {word} text" + "</div>" * n + "</body></html>"


def _odd_name(name: str | bytes):
    def write(d: Path, word: str, scale: float) -> Path:
        path = os.path.join(os.fsencode(d), name if isinstance(name, bytes) else os.fsencode(name))
        with open(path, "wb") as f:
            f.write(prose(word).encode())
        return Path(os.fsdecode(path))
    return write


def _dangling(d: Path, word: str, scale: float) -> Path:
    (d / "dangling.txt").symlink_to(d / "no-such-target.txt")
    return d / "dangling.txt"


def _loop(d: Path, word: str, scale: float) -> Path:
    (d / "loop").mkdir()
    (d / "loop" / "inside.txt").write_text(prose(word))
    (d / "loop" / "back").symlink_to(d / "loop")
    return d / "loop"


def _fifo(d: Path, word: str, scale: float) -> Path:
    os.mkfifo(d / "pipe.txt")
    return d / "pipe.txt"


def _unreadable(d: Path, word: str, scale: float) -> Path:
    path = d / "unreadable.md"
    path.write_text(prose(word))
    os.chmod(path, 0)
    return path


def _deep_dirs(d: Path, word: str, scale: float) -> Path:
    root = d / "deepdirs"
    path = root.joinpath(*["d"] * 60)
    path.mkdir(parents=True)
    (path / "bottom.txt").write_text(prose(word))
    return root


def _dir_named_txt(d: Path, word: str, scale: float) -> Path:
    (d / "folder.txt").mkdir()
    (d / "folder.txt" / "inner.md").write_text(prose(word))
    return d / "folder.txt"


def _truncated_pdf(word: str, scale: float) -> bytes:
    whole = pdf_bytes([f"Truncated {word} page"])
    return whole[: len(whole) * 2 // 3]


def _gzip(word: str, scale: float) -> bytes:
    return gzip.compress(prose(word).encode())


KINDS = [
    Kind("empty", SKIPPED, _file("empty.txt", b"")),
    Kind("whitespace only", SKIPPED, _file("blank.txt", " \n\t\n\r\n   \n")),
    Kind("binary, unknown extension", SKIPPED, _file("blob.bin", lambda w, s: _random_bytes(4096))),
    Kind("binary, no extension", SKIPPED, _file("blob", lambda w, s: b"\x00\x01" + _random_bytes(4096))),
    Kind("NUL bytes at the start", SKIPPED, _file("nulstart.txt", lambda w, s: b"\x00\x00" + prose(w).encode())),
    Kind("NUL bytes after 8 KB", INGESTED, _file("nullate.txt", lambda w, s: "x " * 5000 + "\x00\x00" + prose(w))),
    Kind("fake PDF", FAILED, _file("fake.pdf", "%PDX this is not a PDF")),
    Kind("truncated PDF", HANDLED, _file("truncated.pdf", _truncated_pdf)),
    Kind("real PDF", INGESTED, _file("real.pdf", lambda w, s: pdf_bytes([f"A real {w} page", "second line"]))),
    Kind("PDF without text", SKIPPED, _file("blankpage.pdf", lambda w, s: pdf_bytes([]))),
    Kind("PNG named .txt", SKIPPED, _file("image.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(64))),
    Kind("gzip named .txt", SKIPPED, _file("archive.txt", _gzip)),
    Kind("5 MB single line", INGESTED, _file("oneline.txt", _single_line)),
    Kind("200,000 short lines", INGESTED, _file("manylines.txt", _many_lines)),
    Kind("deeply nested HTML", INGESTED, _file("deep.html", _deep_html)),
    Kind("script-only HTML", SKIPPED, _file("script.html", "<html><script>var x = 1;</script><style>p{}</style></html>")),
    Kind("unclosed tags", INGESTED, _file("unclosed.html", lambda w, s: f"<html><body><div><p>Open <b>{w} <i>never <ul><li>closed")),
    Kind("HTML with a legacy meta charset", INGESTED,
         _file("cyrillic.html", lambda w, s: f'<html><head><meta charset="windows-1251"></head><body><p>Привет {w}, '
                                            f"это страница.</p></body></html>".encode("cp1251")), "cp1251"),
    Kind("UTF-8 BOM", INGESTED, _file("bom8.md", lambda w, s: codecs.BOM_UTF8 + f"# Title\n\n{prose(w)}".encode()), "utf-8-sig"),
    Kind("UTF-16 LE BOM", INGESTED, _file("u16le.txt", lambda w, s: prose(w).encode("utf-16")), "utf-16"),
    Kind("UTF-16 BE BOM", INGESTED, _file("u16be.txt", lambda w, s: codecs.BOM_UTF16_BE + prose(w).encode("utf-16-be")), "utf-16"),
    Kind("UTF-32 BOM", INGESTED, _file("u32.txt", lambda w, s: prose(w).encode("utf-32")), "utf-32"),
    Kind("broken UTF-16", FAILED, _file("badu16.txt", lambda w, s: prose(w).encode("utf-16") + b"\x00\xd8")),
    Kind("Latin-1 text", INGESTED, _file("latin1.txt", lambda w, s: f"Le café était fermé, {w}, où est le thé? Noël, élève.\n".encode("latin-1"))),
    Kind("Shift-JIS text", INGESTED, _file("sjis.txt", lambda w, s: (f"日本語の文書です {w} これはテストです。\n" * 4).encode("shift_jis"))),
    Kind("CRLF line ends", INGESTED, _file("crlf.md", lambda w, s: f"# Head\r\n\r\nFirst {w} para.\r\n\r\n## Sub\r\n\r\nMore.\r\n")),
    Kind("right-to-left text", INGESTED, _file("rtl.txt", lambda w, s: f"שלום עולם {w} مرحبا بالعالم\n")),
    Kind("CJK text", INGESTED, _file("cjk.md", lambda w, s: f"# 标题\n\n这是一个测试文件 {w}。日本語もあります。한국어도.\n")),
    Kind("emoji", INGESTED, _file("emoji.md", lambda w, s: f"# 🎉 Party\n\n🙂🙃 {w} 👩‍👩‍👧‍👦 🏳️‍🌈\n")),
    Kind("zero-width characters", INGESTED, _file("zw.txt", lambda w, s: f"zero\u200bwidth\u200d join\ufeff {w} \u2060end\n")),
    Kind("control characters", INGESTED, _file("ctrl.txt", lambda w, s: f"bell\x07 tab\x0b feed\x0c esc\x1b {w} del\x7f\n")),
    Kind("reST of adornments only", HANDLED, _file("adorn.rst", "=====\n=====\n-----\n")),
    Kind("dangling symlink", SKIPPED, _dangling),
    Kind("symlink loop", INGESTED, _loop),
    Kind("fifo named .txt", SKIPPED, _fifo),
    Kind("unreadable file", HANDLED, _unreadable),  # root reads anything; others get "permission denied"
    Kind("quotes, %, &, $ and spaces in the name", INGESTED, _odd_name("we'ird \"q\" & 100% $HOME `x`.txt")),
    Kind("file name not valid UTF-8", INGESTED, _odd_name(b"caf\xe9 latin1 name.txt")),
    Kind("255-byte file name", INGESTED, _odd_name("n" * 251 + ".txt")),
    Kind("newline in the file name", INGESTED, _odd_name("line\nbreak.txt")),
    Kind("leading dash in the name", INGESTED, _odd_name("-rf --help.md")),
    Kind("non-ASCII file name", INGESTED, _odd_name("résumé 日本 🙂.txt")),
    Kind("60 nested directories", INGESTED, _deep_dirs),
    Kind("directory named like a file", INGESTED, _dir_named_txt),
]


def build(root: Path, scale: float = 1.0, only: list[str] | None = None) -> dict[str, tuple[Kind, str, Path]]:
    """Write each kind (or those named in `only`) into its own folder under `root`.
    Returns {kind name: (kind, needle, path to ingest)}."""
    out = {}
    for i, kind in enumerate(KINDS):
        if only and kind.name not in only:
            continue
        folder = root / f"k{i:02d}"
        folder.mkdir(parents=True)
        word = needle(i)
        out[kind.name] = (kind, word, kind.write(folder, word, scale))
    return out


def write_good_files(root: Path) -> dict[str, str]:
    """Two ordinary files beside the zoo: {needle: path}."""
    root.mkdir(parents=True, exist_ok=True)
    good = {"goodtxtneedle": root / "good.txt", "goodmdneedle": root / "good.md"}
    for word, path in good.items():
        path.write_text(f"# Good\n\n{prose(word)}")
    return {w: str(p) for w, p in good.items()}


# ---- running the zoo through the command line ----------------------------------------------------

def cli(*args: str, env: dict | None = None, timeout: float = 3600) -> tuple[int, str, str]:
    """Run `memstore ARGS` in a fresh process: (exit code, stdout, stderr)."""
    import subprocess
    import sys

    run_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
    done = subprocess.run([sys.executable, "-m", "memstore.cli", *args], capture_output=True, text=True,
                          errors="backslashreplace", env=run_env, timeout=timeout)
    return done.returncode, done.stdout, done.stderr


def store_args(store: str, data_dir: str | None) -> list[str]:
    return ["--store", store] + (["--data-dir", data_dir] if data_dir else [])


def needle_found(mem, word: str) -> bool:
    """Whether lexical search for `word` in an open Memory ranks a chunk holding it first."""
    hits = mem.search(word, k=1, mode="lexical")
    return bool(hits) and word in hits[0].text


def outcome(summary: dict, found: bool) -> tuple[str, str]:
    """(ingested | failed | skipped, reason) for one kind's run."""
    if found:
        return INGESTED, ""
    if summary["failed"]:
        return FAILED, summary["failed"][0]["reason"]
    if summary["skipped"]:
        return SKIPPED, summary["skipped"][0]["reason"]
    return (INGESTED, "holds no needle") if summary["files_ingested"] else ("nothing", "")


def as_expected(kind: Kind, got: str) -> bool:
    return got == kind.expect or (kind.expect == HANDLED and got in (INGESTED, SKIPPED, FAILED))
