"""schemathesis against the live server's own OpenAPI document: every operation, generated requests
(valid and invalid), real HTTP to uvicorn over a real store and SmolLM2. No response may be a
5xx, and every response must match what the schema says (status, content type, body).

Examples are bounded per operation and the same in every run (derandomized, so that a CI run does
not depend on luck: set derandomize=False and more examples to explore), and answers are kept
short (the token limits a request asks for are cut to a few): the run takes about a minute."""

import pytest
import schemathesis
from conftest import serving
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

import memstore
from memstore.answer_stream import AnswerQueue
from memstore.server import create_app

ANSWER_TOKEN_FIELDS = ("max_new_tokens", "max_tokens", "max_completion_tokens")  # each at most 256 by the schema
# An upload can match the schema and still be refused for what it holds (a file with no text: 400,
# saying so); every other schema-valid request must be accepted.
CONTENT_CHECKED = {"POST /documents/file"}


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory):
    with memstore.open(tmp_path_factory.mktemp("fuzz") / "store") as mem:
        mem.add_text("# Freedonia\n\nThe capital of Freedonia is Zorbaville, on the river Quell.", source="freedonia.md")
        mem.add_text("# Orrin bridge\n\nThe Orrin bridge was built in 1871 by Tomas Yell.", source="orrin.md")
        mem.load_model("smollm2-135m")
        mem.search("Freedonia", rerank=True)  # loads the re-ranker here, not inside a request's 10 s timeout
        app = create_app(mem, default_model="smollm2-135m", models=["smollm2-135m"],
                         answers=AnswerQueue(waiting=8, concurrent=2))
        with serving(app) as address:
            yield schemathesis.openapi.from_url(f"http://{address}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_every_operation_answers_within_its_schema(case):
    if isinstance(case.body, dict):
        for name in ANSWER_TOKEN_FIELDS:
            if isinstance(case.body.get(name), int) and 4 < case.body[name] <= 256:  # a valid limit: made short
                case.body[name] = 4
    content_checked = case.operation.label in CONTENT_CHECKED
    case.call_and_validate(excluded_checks=[positive_data_acceptance] if content_checked else None)
