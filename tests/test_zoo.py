"""The zoo of bad and odd inputs (tests/zoo.py), scaled down: all kinds together beside good
files through `memstore ingest` on SQLite and PostgreSQL, and each kind alone. bench/zoo.py
runs it at full size (5 MB line, 200,000 lines) and keeps the table."""
import os

import pytest
import zoo

import memstore

SCALE = 0.01


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo 'odd' 100% &")
    built = zoo.build(root / "inputs", SCALE)
    good = zoo.write_good_files(root / "good")
    yield built, good
    os.chmod(built["unreadable file"][2], 0o644)


def test_all_kinds_together_keep_every_good_file_and_print_no_traceback(inputs, store_target):
    built, good = inputs
    target, data_dir = store_target
    store = zoo.store_args(target, data_dir)
    paths = [str(p) for _, _, p in built.values()] + list(good.values())
    code, out, err = zoo.cli("ingest", *paths, *store)
    assert code == 1, err  # some kinds fail on purpose
    assert "Traceback" not in out + err
    code, out, err = zoo.cli("check", *store)
    assert code == 0, out + err
    with memstore.open(target, data_dir=data_dir) as mem:
        assert all(zoo.needle_found(mem, word) for word in good)
        for name, (kind, word, _) in built.items():
            if kind.expect != zoo.HANDLED:
                assert zoo.needle_found(mem, word) == (kind.expect == zoo.INGESTED), name
        recorded = {os.path.basename(d["source"]): d["encoding"] for d in mem.store.documents()}
    for kind, _, path in built.values():
        if kind.encoding:
            assert recorded[path.name] == kind.encoding, kind.name


def test_each_kind_alone_gives_its_outcome(inputs, tmp_path):
    built, _ = inputs
    for i, (name, (kind, word, path)) in enumerate(built.items()):
        with memstore.open(tmp_path / f"s{i}") as mem:
            summary = mem.ingest(path)
            got, reason = zoo.outcome(summary, zoo.needle_found(mem, word))
            assert mem.check()["consistent"], name
        assert zoo.as_expected(kind, got), (name, got, reason)
        assert got == zoo.INGESTED or reason, name  # never refused without a reason
