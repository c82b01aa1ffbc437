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
