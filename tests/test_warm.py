"""The server warms the KV memory in the background: the examples' chunks first, never over a request."""
import time

import pytest
from fastapi.testclient import TestClient

import memstore
from memstore.server import create_app

DOCS = {
    "freedonia.md": "# Freedonia\n\nThe capital of Freedonia is Zorbaville, on the river Quell.",
    "staff.md": "# Staff\n\nIngrid Halvorsen's manager is Tobias Brennecke, who runs the logistics team.",
    "weather.md": "# Weather\n\nThe rainy season in Freedonia lasts from March to May.",
    "pets.md": "# Pets\n\nThe office cat is called Marmalade and sleeps on the printer.",
}
EXAMPLE = "Who is Ingrid Halvorsen's manager?"


@pytest.fixture
def mem(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for name, text in DOCS.items():
        (docs / name).write_text(text)
    with memstore.open(tmp_path / "store") as m:
        m.ingest(docs)
        yield m


def test_warmup_order_puts_the_examples_chunks_first(mem):
    order = mem.kv_warmup_order(questions=[EXAMPLE], k=1)
    assert len(order) == mem.stats()["chunks"] and "Tobias" in order[0].text
    assert mem.kv_status()["warm"] == 0
    assert mem.encode_kv(order[:1]) == 1
    assert mem.kv_status()["warm"] == 1 and len(mem.kv_warmup_order()) == len(order) - 1


def test_server_warms_every_chunk_and_answers_meanwhile(mem):
    app = create_app(mem, warm_kv=True, examples=[EXAMPLE])
    with TestClient(app) as client:
        answer = client.post("/ask", json={"question": "What is the capital of Freedonia?", "mode": "memory", "k": 1})
        assert answer.status_code == 200 and "Zorbaville" in answer.json()["text"]
        deadline = time.time() + 300
        while (kv := client.get("/stats").json()["kv_memory"])["state"] != "done":
            assert time.time() < deadline and not kv["state"].startswith("stopped"), kv
            time.sleep(0.5)
    assert kv["warm"] == kv["chunks"] == mem.stats()["chunks"]
    assert mem.kv_status()["warm"] == kv["chunks"]


def test_no_warmer_no_kv_field(mem):
    with TestClient(create_app(mem)) as client:
        assert "kv_memory" not in client.get("/stats").json()
