"""KV memory files: fp16 and int8 (per-row absmax) round trips, budget and drop."""
import numpy as np
import pytest

from memstore.store.kv import KVMemory, bytes_per_token, dequantize, drop_chunks, quantize_int8


def kv_like(seed=0, tokens=37):
    """(2, layers, heads, tokens, head_dim) with a few large channels, as real keys have."""
    rng = np.random.default_rng(seed)
    kv = rng.standard_normal((2, 3, 2, tokens, 64)).astype(np.float32)
    kv[0, :, :, :, 5] *= 40  # an outlier channel in the keys
    return kv


def test_int8_round_trip_error_is_within_half_a_step_per_row():
    kv = kv_like()
    stored = quantize_int8(kv)
    assert stored.dtype == np.int8 and stored.shape == kv.shape[:-1] + (66,)
    back = dequantize(stored).astype(np.float32)
    step = np.abs(kv).max(axis=-1, keepdims=True) / 127
    assert np.all(np.abs(back - kv) <= 0.5 * step * 1.01 + 1e-3)


def test_zero_rows_survive_quantization():
    kv = np.zeros((2, 1, 1, 4, 8), dtype=np.float32)
    assert not dequantize(quantize_int8(kv)).any()


@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_store_returns_what_was_put(tmp_path, dtype):
    mem = KVMemory(tmp_path, "model-x", dtype=dtype)
    kv = kv_like()
    put = mem.put(7, kv)
    got = mem.get(7).astype(np.float32)
    assert np.array_equal(put, mem.get(7))  # what put returns is what every later read gives
    step = np.abs(kv).max(axis=-1, keepdims=True) / 127  # int8: half a step per row; fp16: 11 bits
    tolerance = 1e-3 * np.abs(kv) + 1e-4 if dtype == "fp16" else 0.51 * step + 1e-3
    assert got.shape == kv.shape and np.all(np.abs(got - kv) <= tolerance)
    assert mem.get(8) is None


def test_int8_files_are_about_half_the_size(tmp_path):
    fp16, int8 = KVMemory(tmp_path, "a", dtype="fp16"), KVMemory(tmp_path, "b", dtype="int8")
    fp16.put(1, kv_like())
    int8.put(1, kv_like())
    assert 0.5 < int8.nbytes() / fp16.nbytes() < 0.56
    assert bytes_per_token(30, 3, 64, "int8") / bytes_per_token(30, 3, 64, "fp16") == pytest.approx(66 / 128)


def test_a_store_reads_files_of_either_dtype(tmp_path):
    KVMemory(tmp_path, "m", dtype="fp16").put(1, kv_like())
    assert KVMemory(tmp_path, "m", dtype="int8").get(1).dtype == np.float16


def test_budget_evicts_least_recently_used_and_drop_removes(tmp_path):
    one = quantize_int8(kv_like()).nbytes + 128  # the .npy header
    mem = KVMemory(tmp_path, "m", budget_bytes=int(2.5 * one), dtype="int8")
    for cid in (1, 2, 3):
        mem.put(cid, kv_like(cid))
    assert mem.get(1) is None and mem.get(3) is not None
    assert drop_chunks(tmp_path, [2, 3]) == 2 and mem.nbytes() == 0


def test_unknown_dtype_is_refused(tmp_path):
    with pytest.raises(ValueError, match="int8"):
        KVMemory(tmp_path, "m", dtype="int4")


def test_put_under_the_budget_does_not_list_the_directory(tmp_path, monkeypatch):
    mem = KVMemory(tmp_path, "m", dtype="int8")
    mem.put(1, kv_like(1))
    size = mem.nbytes()

    def no_listing(*_args):
        raise AssertionError("the KV directory was listed")

    monkeypatch.setattr(type(mem.dir), "glob", no_listing)
    for cid in range(2, 40):  # ingest --kv: each put cost a listing of every file before
        mem.put(cid, kv_like(cid))
    assert mem.nbytes() == 39 * size
    monkeypatch.undo()
    KVMemory(tmp_path, "m", dtype="int8").put(100, kv_like(100))  # another process writes
    assert mem.nbytes() == 40 * size


def _writer(root, first: int, n: int, budget: int) -> None:
    mem = KVMemory(root, "shared", budget_bytes=budget, dtype="int8")
    for cid in range(first, first + n):
        mem.put(cid, kv_like(seed=cid))


def test_writers_sharing_a_directory_keep_the_budget_and_never_show_half_an_entry(tmp_path):
    """Several processes (as on nodes sharing a network filesystem) encode into one KV directory at once,
    overlapping chunk ids included, while a reader reads: every entry read is whole, no temporary file is
    left, and the budget holds up to the entries still being written by the other writers."""
    import multiprocessing

    KVMemory(tmp_path / "probe", "m", dtype="int8").put(0, kv_like())
    entry = (tmp_path / "probe" / "m" / "0.npy").stat().st_size
    budget = 12 * entry
    ctx = multiprocessing.get_context("spawn")
    writers = [ctx.Process(target=_writer, args=(tmp_path, start, 40, budget)) for start in (0, 20, 40)]
    for w in writers:
        w.start()
    reader = KVMemory(tmp_path, "shared", budget_bytes=budget, dtype="int8")
    expected = {cid: dequantize(quantize_int8(kv_like(seed=cid))) for cid in range(80)}
    seen = 0
    while any(w.is_alive() for w in writers):
        for cid in range(80):
            got = reader.get(cid)
            if got is not None:
                assert np.array_equal(got, expected[cid])
                seen += 1
    for w in writers:
        w.join()
        assert w.exitcode == 0
    names = [p.name for p in (tmp_path / "shared").iterdir()]
    assert all(n.endswith(".npy") and n[:-4].isdigit() for n in names), names  # no temporary file left
    assert seen > 0
    assert reader.nbytes() <= budget + 2 * entry  # the others' entries in flight at the last eviction
