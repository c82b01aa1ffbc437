"""Answers take turns at the model through a bounded queue; reads never wait for them. A real
server (uvicorn, in a thread) over a real store and SmolLM2, driven over real connections."""
import http.client
import json
import time

import pytest
from conftest import serving
from fastapi.testclient import TestClient

import memstore
from memstore.answer_stream import AnswerQueue
from memstore.errors import BusyError
from memstore.server import create_app

LONG = {"question": "Count from one to two hundred in words, separated by commas.", "mode": "rag",
        "max_new_tokens": 256}


@pytest.fixture(scope="module")
def mem(tmp_path_factory):
    mem = memstore.open(tmp_path_factory.mktemp("q") / "store")
    mem.add_text("The capital of Freedonia is Zorbaville, on the river Quell. Numbers: one, two, three.",
                 source="freedonia.md")
    mem.load_model("smollm2-135m")
    yield mem
    mem.close()


@pytest.fixture(scope="module")
def served(mem):
    """(host:port, the server's answer queue): one answer at a time, one more may wait."""
    answers = AnswerQueue(waiting=1, concurrent=1)
    with serving(create_app(mem, default_model="smollm2-135m", answers=answers)) as address:
        yield address, answers


def stream(address, body):
    conn = http.client.HTTPConnection(address, timeout=120)
    conn.request("POST", "/ask/stream", body=json.dumps(body), headers={"content-type": "application/json"})
    return conn, conn.getresponse()


def events(response):
    for line in response:
        yield json.loads(line)


def wait_idle(answers, finished):
    deadline = time.time() + 120
    while answers.busy() or len(answers.finished) < finished:
        assert time.time() < deadline, "the answer never ended"
        time.sleep(0.05)


def test_a_search_answers_while_an_answer_is_generated(served):
    address, answers = served
    before = len(answers.finished)
    conn, response = stream(address, LONG)
    seen = events(response)
    assert next(e for e in seen if e["type"] == "token")
    search = http.client.HTTPConnection(address, timeout=120)
    search.request("GET", "/search?q=Zorbaville&k=1")
    assert json.loads(search.getresponse().read())["hits"][0]["source"] == "freedonia.md"
    after = [e for e in seen if e["type"] == "token"]  # the answer went on after the search had its hits
    assert len(after) >= 1 and answers.finished and len(answers.finished) == before + 1
    conn.close()


def test_a_full_queue_answers_503_and_a_waiting_stream_hears_its_place(served):
    address, answers = served
    wait_idle(answers, len(answers.finished))
    first, first_response = stream(address, LONG)
    assert next(e for e in events(first_response) if e["type"] == "token")  # it has the model
    second, second_response = stream(address, {**LONG, "max_new_tokens": 4})
    assert next(events(second_response)) == {"type": "queued", "ahead": 1}
    third = http.client.HTTPConnection(address, timeout=120)
    third.request("POST", "/ask", body=json.dumps(LONG), headers={"content-type": "application/json"})
    refused = third.getresponse()
    assert refused.status == 503 and refused.getheader("Retry-After") == str(BusyError.retry_after)
    assert "ahead" in json.loads(refused.read())["error"]
    first.close()
    assert [e["type"] for e in events(second_response)][-1] == "answer"  # its turn came


def test_a_client_that_goes_away_frees_the_model_within_a_token_or_two(served):
    address, answers = served
    wait_idle(answers, len(answers.finished))
    before = len(answers.finished)
    conn, response = stream(address, LONG)
    read = 0
    for event in events(response):
        read += event["type"] == "token"
        if read == 3:
            break
    conn.close()
    wait_idle(answers, before + 1)
    stopped = answers.finished[-1]
    assert stopped["outcome"] == "cancelled" and stopped["tokens"] <= read + 3, stopped


def test_an_answer_past_its_time_limit_is_stopped_with_504(tmp_path):
    with memstore.open(tmp_path / "store") as mem:
        mem.add_text("The capital of Freedonia is Zorbaville.", source="f.md")
        with TestClient(create_app(mem, default_model="smollm2-135m", answers=AnswerQueue(time_limit_s=0))) as client:
            stopped = client.post("/ask", json={"question": "What is the capital of Freedonia?", "mode": "rag"})
    assert stopped.status_code == 504 and "was stopped" in stopped.json()["error"]


def test_answers_are_generated_together_up_to_the_concurrency(mem):
    """With two answers allowed at once, a short answer asked while a long one is generated is not
    queued: it finishes while the long one still goes on, their steps sharing batches."""
    answers = AnswerQueue(waiting=0, concurrent=2)
    batcher = mem._answerer("smollm2-135m").decoder.batcher
    shared_before = sum(n for size, n in batcher.batch_sizes.items() if size > 1)
    with serving(create_app(mem, default_model="smollm2-135m", answers=answers)) as address:
        long_conn, long_response = stream(address, LONG)
        long_events = events(long_response)
        assert next(e for e in long_events if e["type"] == "token")
        short_conn, short_response = stream(address, {**LONG, "max_new_tokens": 8})
        kinds = [e["type"] for e in events(short_response)]
        assert "queued" not in kinds and kinds[-1] == "answer"
        assert next(e for e in long_events if e["type"] == "token")  # the long answer goes on after it
        long_conn.close()
        short_conn.close()
        wait_idle(answers, 2)
    assert sum(n for size, n in batcher.batch_sizes.items() if size > 1) > shared_before
