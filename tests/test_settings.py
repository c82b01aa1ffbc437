"""One default per setting: the Python API, the CLI, the HTTP, OpenAI and MCP servers and the decoder agree."""
import inspect

from memstore import cli, settings
from memstore.api import Memory
from memstore.model.answer import Answerer
from memstore.model.generate import Decoder
from memstore.openai_api import ChatRequest
from memstore.server import AskRequest


def _default(func, name):
    return inspect.signature(func).parameters[name].default


def test_every_entry_point_answers_with_the_same_defaults():
    options = {p.name: p.default for p in cli.ask.params}
    assert options["max_new_tokens"] == settings.ANSWER_TOKENS and options["k"] == settings.TOP_K
    for func in (Memory.ask, Answerer.ask):
        assert _default(func, "max_new_tokens") == settings.ANSWER_TOKENS and _default(func, "k") == settings.TOP_K
    assert _default(Decoder.memory, "max_new_tokens") == _default(Decoder.prompt, "max_new_tokens") == settings.ANSWER_TOKENS
    assert AskRequest.model_fields["max_new_tokens"].default == settings.ANSWER_TOKENS
    assert AskRequest.model_fields["k"].default == ChatRequest.model_fields["k"].default == settings.TOP_K


def test_chunking_kv_budget_and_modes_come_from_settings():
    from memstore.ingest.chunking import ChunkerConfig
    from memstore.store.kv import KVMemory

    options = {p.name: p for p in cli.ingest.params}
    assert options["chunk_size"].default == _default(Memory.ingest, "chunk_size") == ChunkerConfig().size \
        == settings.CHUNK_TOKENS
    assert options["overlap"].default == _default(Memory.ingest, "overlap") == ChunkerConfig().overlap \
        == settings.CHUNK_OVERLAP
    assert _default(KVMemory, "budget_bytes") == _default(Answerer, "kv_budget_bytes") == settings.KV_BUDGET_GIB * 2**30
    ask_options = {p.name: p for p in cli.ask.params}
    assert tuple(ask_options["mode"].type.choices) == settings.ANSWER_MODES
    assert AskRequest.model_fields["mode"].annotation.__args__ == settings.ANSWER_MODES


def test_environment_is_read_when_used_not_at_import(monkeypatch):
    from memstore.model.backbone import preset_status

    monkeypatch.setenv("MEMSTORE_MODEL", "qwen2.5-1.5b")
    monkeypatch.setenv("MEMSTORE_STORE", "/tmp/elsewhere")
    assert settings.default_model() == "qwen2.5-1.5b"
    assert [p["name"] for p in preset_status() if p["default"]] == ["qwen2.5-1.5b"]
    assert {p.name: p for p in cli.ingest.params}["store"].default() == "/tmp/elsewhere"
    monkeypatch.delenv("MEMSTORE_MODEL")
    assert settings.default_model() == settings.MODEL
