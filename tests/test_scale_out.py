"""Past one machine: ingestion and KV encoding on a two-node Ray cluster (Ray's own test cluster, both
nodes on this machine, one CPU each), and two servers over one PostgreSQL store."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import SQLITE_DOC
from test_server import free_port, request, wait_serving

from memstore.api import Memory
from memstore.cli import main

ray = pytest.importorskip("ray")  # the [ray] extra: installed by the test extra and .ci/run


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes.add_node(num_cpus=1)
    ray.init(address=nodes.address)
    assert ray.cluster_resources()["CPU"] == 2 and len(ray.nodes()) == 2
    yield nodes.address
    ray.shutdown()
    nodes.shutdown()


@pytest.fixture
def corpus(tmp_path) -> Path:
    """The bundled manual pages, plus a file of each kind that does not become chunks."""
    docs = tmp_path / "docs"
    shutil.copytree(SQLITE_DOC, docs)
    (docs / "broken.pdf").write_bytes(b"%PDF-1.7\nnot really a pdf")
    (docs / "picture.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    (docs / "blank.html").write_text("<html><body>   </body></html>")
    return docs


def chunks_of(mem: Memory) -> list[tuple]:
    return sorted((c.source, c.ordinal, c.char_start, c.char_end, c.heading_path, c.text) for c in mem.store.all_chunks())


def vectors_of(mem: Memory) -> np.ndarray:
    records = sorted(mem.store.all_chunks(), key=lambda c: (c.source, c.ordinal))
    found = mem.store.index.vectors([c.chunk_id for c in records])
    return np.stack([found[c.chunk_id] for c in records])


def outcome(summary: dict) -> dict:
    keep = ("files_seen", "files_ingested", "files_skipped", "files_failed", "documents_removed", "chunks_added",
            "chunks_removed", "tokens_added")
    return {**{k: summary[k] for k in keep}, "failed": sorted(f["path"] for f in summary["failed"]),
            "skipped": sorted(s["path"] for s in summary["skipped"])}


def test_ray_ingest_gives_the_same_store_as_one_process(cluster, corpus, tmp_path):
    with Memory(tmp_path / "here", create=True) as here, Memory(tmp_path / "ray", create=True) as spread:
        alone, on_ray = here.ingest(corpus), spread.ingest(corpus, ray=cluster)
        assert outcome(on_ray) == outcome(alone)
        assert on_ray["files_ingested"] == 13 and on_ray["files_failed"] == 1  # the broken pdf, with its reason
        assert on_ray["failed"][0]["reason"] == alone["failed"][0]["reason"]
        assert chunks_of(spread) == chunks_of(here)
        assert np.abs(vectors_of(spread) - vectors_of(here)).max() < 1e-4
        assert spread.check()["consistent"]
        assert spread.search("autoincrement rowid", k=1)[0].source.endswith("autoinc.html")

        again = spread.ingest(corpus, ray=cluster)  # nothing changed: nothing read, nothing embedded
        assert again["files_ingested"] == 0 and again["chunks_added"] == 0 and again["files_skipped"] == 15

        (corpus / "autoinc.html").write_text("<html><body><h1>Counters</h1><p>Quokka counters start at 7.</p></body></html>")
        (corpus / "lang_vacuum.html").unlink()
        changed_alone = here.ingest(corpus, prune=True)
        changed_on_ray = spread.ingest(corpus, ray=cluster, prune=True)
        assert outcome(changed_on_ray) == outcome(changed_alone)
        assert changed_on_ray["files_ingested"] == 1 and changed_on_ray["documents_removed"] == 1
        assert chunks_of(spread) == chunks_of(here)
        assert spread.check()["consistent"]


def _worker_pids(name: str) -> list[int]:
    """Processes whose title names `name` (Ray titles a worker process after the actor it runs)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if name.encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return pids


def test_a_killed_embedding_worker_loses_nothing(cluster, corpus, tmp_path):
    killed = []

    def kill_a_worker(done: int, total: int) -> None:
        if not killed and done < total:
            killed.extend(_worker_pids("EmbedChunks")[:1])
            for pid in killed:
                os.kill(pid, signal.SIGKILL)

    with Memory(tmp_path / "kb", create=True) as mem:
        summary = mem.ingest(corpus, ray=cluster, on_commit=kill_a_worker)
        assert killed  # a worker was killed mid-run; Ray restarted it and redid its batch
        assert summary["files_ingested"] == 13 and summary["chunks_added"] == len(mem.store.all_chunks())
        assert mem.check()["consistent"]
        rerun = mem.ingest(corpus, ray=cluster)
        assert rerun["files_ingested"] == 0 and rerun["chunks_added"] == 0


def test_kv_memory_encoded_on_ray_is_what_one_process_encodes(cluster, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for name in ("autoinc.html", "lang_vacuum.html"):
        shutil.copy(SQLITE_DOC / name, docs)
    with Memory(tmp_path / "kb", create=True) as mem:
        mem.ingest(docs)
        on_ray = mem.build_kv("smollm2-135m", ray=cluster)
        assert on_ray["encoded"] == on_ray["chunks"] > 4
        assert mem.kv_status("smollm2-135m")["warm"] == on_ray["chunks"]
        answerer = mem._answerer("smollm2-135m")
        stored = answerer.stored_memory()
        spread = {c.chunk_id: stored.get(c.chunk_id).astype(np.float32) for c in mem.store.all_chunks()}
        assert not list(stored.dir.glob(".*"))  # no temporary file left
        assert mem.build_kv("smollm2-135m", ray=cluster)["encoded"] == 0  # resumes: nothing left to do

        for path in stored.dir.glob("*.npy"):
            path.unlink()
        assert mem.build_kv("smollm2-135m")["encoded"] == on_ray["chunks"]  # the same, in this process
        for cid, kv in spread.items():
            here = stored.get(cid).astype(np.float32)
            assert kv.shape == here.shape
            assert np.abs(kv - here).mean() < 0.02 * np.abs(here).mean()  # thread counts round differently


def test_ray_without_the_extra_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as on a machine without it: `import ray` fails
    docs = tmp_path / "docs"
    docs.mkdir()
    shutil.copy(SQLITE_DOC / "autoinc.html", docs)
    result = CliRunner().invoke(main, ["ingest", str(docs), "--store", str(tmp_path / "kb"), "--ray"])
    assert result.exit_code == 2
    assert "pip install 'memstore[ray]'" in result.output


def test_an_address_where_no_ray_listens_fails_at_once(tmp_path):
    port = free_port()  # nothing listens here once closed
    docs = tmp_path / "docs"
    docs.mkdir()
    shutil.copy(SQLITE_DOC / "autoinc.html", docs)
    started = time.monotonic()
    result = CliRunner().invoke(main, ["ingest", str(docs), "--store", str(tmp_path / "kb"), "--ray", f"127.0.0.1:{port}"])
    assert result.exit_code == 2, result.output
    assert f"no Ray cluster answers at 127.0.0.1:{port}" in result.output
    assert time.monotonic() - started < 30  # not Ray's own minutes of retrying


# ---- many servers, one PostgreSQL store --------------------------------------------------------

def _start_server(url: str, data_dir: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "memstore.cli", "serve", "--store", url, "--data-dir", str(data_dir),
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


@pytest.mark.postgres
def test_two_servers_over_one_postgres_store_see_each_others_writes(pg_url, tmp_path):
    from urllib.parse import quote

    with Memory(pg_url, data_dir=tmp_path / "seed", create=True) as mem:  # a store with its embedder
        mem.add_text("The lighthouse keeper's name is Ingrid Solberg.", source="lighthouse.txt")
    ports = [free_port(), free_port()]
    procs = [_start_server(pg_url, tmp_path / f"node{i}", port) for i, port in enumerate(ports)]
    a, b = (f"http://127.0.0.1:{port}" for port in ports)
    try:
        for base, proc in zip((a, b), procs):
            wait_serving(base, proc, timeout_s=180)
        status, added = request(a, "/documents", {"text": "Quarry 9 ships basalt on Tuesdays from the Vellmar dock.",
                                                  "source": "quarry.txt"})
        assert status == 201, added
        status, found = request(b, "/search?q=" + quote("Which dock ships basalt?") + "&k=1")
        assert status == 200 and found["hits"][0]["source"] == "quarry.txt"  # written on A, found on B at once

        status, _ = request(b, f"/documents/{added['id']}", method="DELETE")
        assert status == 200
        status, found = request(a, "/search?q=" + quote("Which dock ships basalt?") + "&k=3")
        assert all(h["source"] != "quarry.txt" for h in found["hits"])  # deleted on B, gone on A
        assert request(a, "/stats")[1]["documents"] == request(b, "/stats")[1]["documents"] == 1
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)
