"""Which models a store keeps loaded, and that a request never makes the server download one."""
import pytest
from fastapi.testclient import TestClient

import memstore
from memstore.model import backbone
from memstore.server import create_app
from memstore.settings import LOADED_MODELS


@pytest.fixture
def mem(tmp_path):
    with memstore.open(tmp_path / "store") as m:
        m.add_text("The capital of Freedonia is Zorbaville, on the river Quell.", source="freedonia.md")
        yield m


def test_a_model_not_on_this_machine_is_refused_not_downloaded(mem, tmp_path, monkeypatch):
    monkeypatch.setenv("MEMSTORE_CACHE", str(tmp_path / "empty-cache"))  # nothing converted here
    monkeypatch.setattr(backbone, "_fetch", lambda *a: pytest.fail("a request started a download"))
    assert backbone.needs_download("qwen2.5-1.5b")
    with TestClient(create_app(mem, default_model="smollm2-135m")) as client:
        asked = client.post("/ask", json={"question": "What is the capital of Freedonia?", "model": "qwen2.5-1.5b"})
        assert asked.status_code == 503 and "never download" in asked.json()["error"]
        chat = client.post("/v1/chat/completions", json={"model": "qwen2.5-1.5b:rag",
                                                          "messages": [{"role": "user", "content": "Capital?"}]})
        assert chat.status_code == 503 and "pip install" in chat.json()["error"]["message"]
    assert not (tmp_path / "empty-cache" / "models" / "qwen2.5-1.5b").exists()


def test_the_started_model_stays_and_one_more_is_kept(mem, tmp_path):
    """Three names of the same converted SmolLM2 (the preset, its folder, a link to it) load as three models."""
    folder = backbone.resolve("smollm2-135m")[0]
    link = tmp_path / "smollm-link"
    link.symlink_to(folder)
    assert LOADED_MODELS == 2
    started = mem.load_model("smollm2-135m")
    mem._answerer(str(folder))
    assert list(mem._answerers) == [started, str(folder)]
    mem._answerer(str(link))  # one more: the least recently used other model goes, the started one stays
    assert list(mem._answerers) == [started, str(link)]
    answer = mem.ask("What is the capital of Freedonia?", model=str(folder), mode="rag", max_new_tokens=8)
    assert answer.text and list(mem._answerers) == [started, str(folder)]
