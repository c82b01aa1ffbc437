"""One error family: every error memstore raises on purpose is a MemstoreError carrying its exit code
and HTTP status; anything else is a bug (CLI exit 3, HTTP 500), never reported as the user's mistake."""
from __future__ import annotations

import fcntl
import importlib
import inspect
import pkgutil
import shutil

import click
import pytest
from click.testing import CliRunner
from conftest import SQLITE_DOC
from fastapi.testclient import TestClient

import memstore
from memstore import errors
from memstore.api import Memory
from memstore.cli import main
from memstore.server import create_app
from memstore.store import writes


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    (root / "docs").mkdir()
    shutil.copy(SQLITE_DOC / "autoinc.html", root / "docs")
    result = CliRunner().invoke(main, ["ingest", str(root / "docs"), "--store", str(root / "kb")])
    assert result.exit_code == 0, result.output
    return root / "kb"


def test_every_exception_class_in_memstore_is_a_memstore_error():
    classes = []
    for mod in pkgutil.walk_packages(memstore.__path__, "memstore."):
        if mod.name.startswith(("memstore.integrations", "memstore.mcp_server")):
            continue  # optional extras; they define no exceptions
        module = importlib.import_module(mod.name)
        classes += [c for _, c in inspect.getmembers(module, inspect.isclass)
                    if issubclass(c, BaseException) and c.__module__ == mod.name]
    assert len(classes) >= 15  # the family, plus the loaders', embedders' and backbone's own
    for cls in classes:
        if issubclass(cls, click.ClickException):
            continue  # the CLI's own rendering of them
        if not issubclass(cls, Exception):
            assert cls.__name__ == "Cancelled"  # control flow: a client went away, nothing is reported
            continue
        assert issubclass(cls, errors.MemstoreError), cls
        assert cls.exit_code in (1, 2) and 400 <= cls.http_status < 600, cls


def test_cli_exits_with_the_errors_code_and_a_bug_with_3(store, monkeypatch):
    from memstore import cli

    monkeypatch.setattr(cli.VERBOSE, "enabled", False)  # an earlier --verbose in this process left it on
    empty = CliRunner().invoke(main, ["search", " ", "--store", str(store)])
    assert empty.exit_code == 2 and "the query is empty" in empty.output

    def bug(*_args, **_kwargs):
        raise ValueError("an internal slip")

    monkeypatch.setattr(Memory, "search", bug)
    result = CliRunner().invoke(main, ["search", "autoincrement", "--store", str(store)])
    assert result.exit_code == 3, result.output  # a bug, not the user's bad input (it was exit 2)
    assert "internal error (ValueError: an internal slip)" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_server_answers_with_the_errors_status_and_500_for_a_bug(store, monkeypatch):
    with Memory(store, create=False) as mem:
        client = TestClient(create_app(mem), raise_server_exceptions=False)
        missing = client.get("/documents/99999")
        assert missing.status_code == 404 and "no document with id 99999" in missing.json()["error"]
        monkeypatch.setattr(Memory, "search", lambda *a, **k: [][1])
        broken = client.get("/search", params={"q": "autoincrement"})
        assert broken.status_code == 500 and broken.json()["error"] == "internal error (IndexError); see the server log"


def test_a_write_waits_for_another_writer_then_says_the_store_is_locked(store, monkeypatch):
    monkeypatch.setattr(writes, "WRITE_LOCK_WAIT_S", 0.3)
    with Memory(store, create=False) as mem, open(store / "write.lock", "a+") as other:
        fcntl.flock(other, fcntl.LOCK_EX)  # another process's ingest, mid-file
        with pytest.raises(errors.StoreLockedError, match="held the write lock"):
            mem.delete(1)
        fcntl.flock(other, fcntl.LOCK_UN)
        assert mem.store.document_text(1)  # nothing was changed meanwhile
