"""The `memstore` command: exit codes, --json, one-line errors that leave the disk alone."""
import json
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import SQLITE_DOC

from memstore.cli import main

README = Path(__file__).parent.parent / "README.md"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def all_commands(group=main, prefix=()):
    for name, cmd in group.commands.items():
        yield prefix + (name,), cmd
        if hasattr(cmd, "commands"):
            yield from all_commands(cmd, prefix + (name,))


def test_every_command_has_help_and_a_readme_mention():
    readme = README.read_text()
    for path, cmd in all_commands():
        assert cmd.help and len(cmd.help) > 20, f"memstore {' '.join(path)} needs a help text"
        result = invoke(*path, "--help")
        assert result.exit_code == 0 and "Usage:" in result.output
        assert f"memstore {' '.join(path)}" in readme, f"README does not mention `memstore {' '.join(path)}`"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    docs = root / "docs"
    docs.mkdir()
    for name in ("autoinc.html", "lang_vacuum.html", "limits.html"):
        shutil.copy(SQLITE_DOC / name, docs)
    result = invoke("ingest", docs, "--store", root / "kb", "--json", "--meta", "team=db")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["files_ingested"] == 3
    return root / "kb"


def test_search_json_and_filters(store):
    result = invoke("search", "largest possible ROWID", "--store", store, "--json", "-k", "2")
    hits = json.loads(result.output)
    assert result.exit_code == 0 and len(hits) == 2
    assert hits[0]["source"].endswith("autoinc.html") and hits[0]["meta"] == {"team": "db"}
    result = invoke("search", "rowid", "--store", store, "--json", "--filter", "path=*vacuum*")
    assert {Path(h["source"]).name for h in json.loads(result.output)} == {"lang_vacuum.html"}
    human = invoke("search", "rowid", "--store", store)
    assert human.exit_code == 0 and re.search(r"^1\. \d\.\d{4}  .*autoinc.html:\d+-\d+", human.output, re.M)


def test_check_and_stats(store):
    result = invoke("check", "--store", store, "--json")
    assert result.exit_code == 0 and json.loads(result.output)["consistent"]
    stats = json.loads(invoke("stats", "--store", store, "--json").output)
    assert stats["documents"] == 3 and stats["embedder"]["name"] == "all-MiniLM-L6-v2"


def test_check_repair_fixes_a_corrupt_index(store, tmp_path):
    copy = tmp_path / "kb"
    shutil.copytree(store, copy)
    (copy / "vectors.faiss").write_bytes(b"\x00" * 100)
    result = invoke("search", "rowid", "--store", copy)
    assert result.exit_code == 2 and "memstore check --repair" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert invoke("check", "--store", copy).exit_code == 1
    repaired = invoke("check", "--repair", "--store", copy, "--json")
    assert repaired.exit_code == 0, repaired.output
    assert invoke("check", "--store", copy).exit_code == 0


def snapshot(path: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file() and p.name != "write.lock"}


@pytest.mark.parametrize("args, message", [
    (["search", "q", "--filter", "colour=red"], "unknown filter field 'colour'"),
    (["search", "q", "--filter", "nonsense"], "expected KEY=VALUE"),
    (["ingest", "{docs}", "--embedder", "/no/such/model"], "not all-MiniLM-L6-v2 and not a local"),
    (["ingest", "{docs}", "--chunk-size", "5000"], "exceeds the embedder's maximum"),
])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(store, args, message):
    before = snapshot(store)
    docs = Path(store).parent / "docs"
    result = invoke(*[a.format(docs=docs) for a in args], "--store", store)
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert snapshot(store) == before


def test_not_a_store(tmp_path):
    result = invoke("search", "q", "--store", tmp_path / "nothing")
    assert result.exit_code == 2 and "is not a memstore store" in result.output
    assert not (tmp_path / "nothing").exists()
    assert invoke("check", "--store", tmp_path / "nothing").exit_code == 2
    assert invoke("db", "current", "--store", tmp_path / "nothing").exit_code == 2
    result = invoke("ingest", SQLITE_DOC, "--store", tmp_path / "new", "--embedder", "/no/such/model")
    assert result.exit_code == 2 and "not all-MiniLM-L6-v2 and not a local" in result.output
    assert not (tmp_path / "new").exists()


def test_failed_file_sets_exit_code_1(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    shutil.copy(SQLITE_DOC / "autoinc.html", docs)
    (docs / "broken.pdf").write_text("not a pdf")
    result = invoke("ingest", docs, "--store", tmp_path / "kb")
    assert result.exit_code == 1
    assert "FAILED" in result.output and "broken.pdf: not a PDF" in result.output
