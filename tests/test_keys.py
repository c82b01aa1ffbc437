"""API keys and writes over HTTP: the real app (FastAPI's test client), a real store."""
import subprocess
import sys
import time

import pytest
from fastapi.testclient import TestClient

import memstore
from memstore.errors import InvalidInputError
from memstore.keys import VIEW_LINK_S, ViewLinks, load_api_keys
from memstore.server import create_app

READ_KEY, WRITE_KEY = "r" * 8 + "-read-key-0001", "w" * 8 + "-write-key-0002"


@pytest.fixture
def keyfile(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"# team keys\nread {READ_KEY}\n\nwrite {WRITE_KEY}\n")
    return path


@pytest.fixture
def client(tmp_path, keyfile):
    with memstore.open(tmp_path / "store") as mem:
        mem.add_text("The capital of Freedonia is Zorbaville, on the river Quell.", source="freedonia.md")
        with TestClient(create_app(mem, default_model="smollm2-135m", api_keys=load_api_keys(keyfile))) as c:
            yield c


def auth(key):
    return {"authorization": f"Bearer {key}"}


def test_keys_guard_reads_and_writes(client):
    assert client.get("/search", params={"q": "Zorbaville"}).status_code == 401
    assert client.get("/search", params={"q": "Zorbaville"}, headers=auth("wrong-key-000000000")).status_code == 401
    assert client.get("/search", params={"q": "Zorbaville"}, headers=auth(READ_KEY)).json()["hits"]
    assert client.get("/", headers={}).status_code == 200 and client.get("/openapi.json").status_code == 200
    doc = {"text": "# Staff\n\nIngrid Halvorsen's manager is Tobias Brennecke.", "source": "staff.md",
           "meta": {"team": "logistics"}}
    refused = client.post("/documents", json=doc, headers=auth(READ_KEY))
    assert refused.status_code == 403 and "read, not write" in refused.json()["error"]
    added = client.post("/documents", json=doc, headers=auth(WRITE_KEY))
    assert added.status_code == 201 and added.json()["chunks"] >= 1
    hits = client.get("/search", params={"q": "Tobias Brennecke", "k": 1}, headers=auth(WRITE_KEY)).json()["hits"]
    assert hits[0]["source"] == "staff.md" and hits[0]["document_id"] == added.json()["id"]
    assert client.delete(f"/documents/{added.json()['id']}", headers=auth(READ_KEY)).status_code == 403
    assert client.delete(f"/documents/{added.json()['id']}", headers=auth(WRITE_KEY)).json() == {
        "deleted": added.json()["id"]}
    assert client.delete(f"/documents/{added.json()['id']}", headers=auth(WRITE_KEY)).status_code == 404
    hits = client.get("/search", params={"q": "Tobias Brennecke", "k": 5}, headers=auth(READ_KEY)).json()["hits"]
    assert all(h["source"] != "staff.md" for h in hits)


def test_a_source_link_opens_in_a_tab_without_a_key_but_only_as_signed(client, keyfile):
    """A browser tab sends no Authorization header: the links the server hands out are signed
    for their document and span, and expire; anything else under /view still needs a key."""
    hit = client.get("/search", params={"q": "Zorbaville", "k": 1}, headers=auth(READ_KEY)).json()["hits"][0]
    url = hit["url"].split("#")[0]
    page = client.get(url)
    assert page.status_code == 200 and "<mark" in page.text and "Zorbaville" in page.text
    doc, start, end = hit["document_id"], hit["char_start"], hit["char_end"]
    assert client.get(f"/view/{doc}?start={start}&end={end}").status_code == 401  # unsigned
    assert client.get(url.replace(f"start={start}", f"start={start + 1}")).status_code == 401  # another span
    assert client.get(url.replace(f"/view/{doc}?", f"/view/{doc + 1}?")).status_code == 401  # another document
    assert client.get(url[:-1] + ("0" if url[-1] != "0" else "1")).status_code == 401  # a changed signature
    assert client.get(url.replace("/view/", "/documents/").split("?")[0]).status_code == 401  # not a view
    links = ViewLinks(load_api_keys(keyfile))
    expired = links.sign(doc, start, end, now=time.time() - VIEW_LINK_S - 5)
    assert client.get(f"/view/{doc}?start={start}&end={end}&{expired}").status_code == 401
    other_keys = keyfile.with_name("other")
    other_keys.write_text("read " + "x" * 20 + "\n")
    foreign = ViewLinks(load_api_keys(other_keys)).sign(doc, start, end)  # signed by a server with other keys
    assert client.get(f"/view/{doc}?start={start}&end={end}&{foreign}").status_code == 401


def test_a_bad_key_file_says_which_line_and_never_shows_a_key(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"read {READ_KEY}\nadmin {WRITE_KEY}\n")
    with pytest.raises(InvalidInputError, match="line 2: expected") as bad:
        load_api_keys(path)
    assert WRITE_KEY not in str(bad.value)
    path.write_text("write short\n")
    with pytest.raises(InvalidInputError, match="at least 16"):
        load_api_keys(path)


def test_serving_beyond_loopback_needs_keys(tmp_path, keyfile):
    store = str(tmp_path / "store")
    cli = [sys.executable, "-m", "memstore.cli", "serve", "--store", store, "--host", "0.0.0.0", "--port", "1"]
    with memstore.open(store) as mem:
        mem.add_text("Some text.", source="a.md")
    out = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "without API keys" in out.stderr
    bad = tmp_path / "bad-keys"
    bad.write_text("read short\n")
    out = subprocess.run(cli + ["--api-key-file", str(bad)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "at least 16" in out.stderr and "short" not in out.stderr  # the key is not shown


def test_a_file_is_added_with_the_loader_of_its_kind(client):
    from conftest import SQLITE_DOC

    page = (SQLITE_DOC / "autoinc.html").read_bytes()
    files = {"file": ("autoinc.html", page, "text/html")}
    refused = client.post("/documents/file", files=files, headers=auth(READ_KEY))
    assert refused.status_code == 403
    added = client.post("/documents/file", files=files, data={"meta": '{"kind": "manual"}'}, headers=auth(WRITE_KEY))
    assert added.status_code == 201, added.text
    info = added.json()
    assert info["source"] == "autoinc.html" and info["meta"] == {"kind": "manual"} and info["chunks"] > 3
    hits = client.get("/search", params={"q": "AUTOINCREMENT ROWID", "k": 1}, headers=auth(READ_KEY)).json()["hits"]
    assert hits[0]["source"] == "autoinc.html" and "<" not in hits[0]["text"]  # read as HTML, not as text
    bad = client.post("/documents/file", files={"file": ("image.png", b"\x89PNG\r\n", "image/png")},
                      headers=auth(WRITE_KEY))
    assert bad.status_code == 400 and "png" in bad.json()["error"].lower()
