"""The embedder's formats: ONNX Runtime float32 gives torch's vectors, int8 a close and
batch-independent approximation; the format follows the setting and falls back where it must."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from memstore.errors import InvalidInputError
from memstore.ingest.embed import DEFAULT_EMBEDDER, Embedder, load_embedder, resolve_embedder_path
from memstore.ingest.embed_onnx import INT8_MARGIN, UnsupportedLayout, faster_format

TEXTS = [
    "PRAGMA foreign_keys turns on enforcement of foreign key constraints.",
    "The quick brown fox jumps over the lazy dog. " * 40,  # longer than the model's window: truncated
    "A short one.",
    "SQLite stores the largest ROWID in the sqlite_sequence table when AUTOINCREMENT is used.",
    "Résumé, naïve café — and a few emoji 🙂 for the tokenizer.",
]


@pytest.fixture(scope="module")
def torch_vectors():
    return Embedder(fmt="torch").encode(TEXTS)


def test_onnx_float32_gives_torchs_vectors(torch_vectors):
    onnx = Embedder(fmt="float32")
    assert onnx.format == "float32" and onnx.onnx is not None
    assert onnx.dim == 384 and onnx.max_tokens == 254
    np.testing.assert_allclose(onnx.encode(TEXTS), torch_vectors, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(onnx.encode(TEXTS), axis=1), 1.0, atol=1e-5)


def test_int8_is_close_to_torch_and_independent_of_its_batch(torch_vectors):
    int8 = Embedder(fmt="int8")
    batched = int8.encode(TEXTS)
    cosine = (batched * torch_vectors).sum(axis=1)
    assert cosine.min() > 0.95, cosine
    alone = np.stack([int8.encode([t])[0] for t in TEXTS])
    np.testing.assert_array_equal(batched, alone)  # a query gets the vector its text was stored with
    np.testing.assert_array_equal(int8.encode(TEXTS[:3]), batched[:3])  # a few texts: the query path
    # and it ranks like torch: each text's nearest neighbour among the torch vectors is itself
    assert (np.argmax(batched @ torch_vectors.T, axis=1) == np.arange(len(TEXTS))).all()


def test_the_format_follows_the_setting(monkeypatch):
    monkeypatch.setenv("MEMSTORE_EMBED_FORMAT", "torch")
    assert load_embedder().format == "torch"
    monkeypatch.setenv("MEMSTORE_EMBED_FORMAT", "fp8")
    with pytest.raises(InvalidInputError, match="embedding format must be one of"):
        load_embedder()
    monkeypatch.delenv("MEMSTORE_EMBED_FORMAT")
    folder = resolve_embedder_path(DEFAULT_EMBEDDER)
    assert load_embedder(DEFAULT_EMBEDDER).format == faster_format(folder)  # auto: what this CPU runs faster
    assert load_embedder(DEFAULT_EMBEDDER, exact=True).format == "float32"  # never int8 when exactness is asked


def test_auto_picks_int8_only_where_it_was_timed_faster(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMSTORE_CACHE", str(tmp_path))
    folder = resolve_embedder_path(DEFAULT_EMBEDDER)
    first = faster_format(folder)
    probe = tmp_path / "models" / "embed-probe.json"
    (key, timed), = json.loads(probe.read_text()).items()
    assert set(timed) == {"float32", "int8"} and all(ms > 0 for ms in timed.values())
    assert first == ("int8" if timed["int8"] * INT8_MARGIN <= timed["float32"] else "float32")
    for int8_ms, expected in ((timed["float32"] / 2, "int8"), (timed["float32"], "float32")):
        probe.write_text(json.dumps({key: {"float32": timed["float32"], "int8": int8_ms}}))
        assert faster_format(folder) == expected  # read from the cache: not timed again


def test_a_layout_onnx_cannot_run_falls_back_to_torch_unless_asked_for(tmp_path):
    folder = tmp_path / "max-pooled"
    shutil.copytree(resolve_embedder_path(DEFAULT_EMBEDDER), folder)
    pooling = folder / "1_Pooling" / "config.json"
    config = json.loads(pooling.read_text())
    pooling.write_text(json.dumps({**config, "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": True}))
    auto = Embedder(str(folder), fmt="auto")
    assert auto.format == "torch" and auto.encode(["max pooled"]).shape == (1, 384)
    with pytest.raises(UnsupportedLayout, match="pooling"):
        Embedder(str(folder), fmt="float32")


def test_the_export_is_made_once_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMSTORE_CACHE", str(tmp_path))
    Embedder(fmt="int8")
    made = sorted(p.name for p in (tmp_path / "models" / "onnx").iterdir())
    assert [name.split("-", 1)[1] for name in made] == ["float32.onnx", "int8.onnx"]  # no temporary left
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "models" / "onnx").iterdir()}
    Embedder(fmt="int8")
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "models" / "onnx").iterdir()} == stamps
