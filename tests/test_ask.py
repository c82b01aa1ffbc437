"""Question answering end to end with the smallest real model (SmolLM2-135M-Instruct)."""
import json

import pytest
from click.testing import CliRunner

import memstore
from memstore.cli import main
from memstore.errors import MemstoreError

FACTS = {
    "freedonia.md": "# Freedonia\n\nThe capital of Freedonia is Zorbaville. Zorbaville sits on the river Quell "
                    "and is known for its copper bridges.",
    "staff.md": "# Staff\n\nIngrid Halvorsen's manager is Tobias Brennecke. Tobias joined the company in 2019 "
                "and runs the logistics team.",
    "weather.md": "# Weather\n\nThe rainy season in Freedonia lasts from March to May. Summers are dry and hot.",
}


@pytest.fixture(scope="module")
def kb(tmp_path_factory):
    docs = tmp_path_factory.mktemp("facts")
    for name, text in FACTS.items():
        (docs / name).write_text(text)
    mem = memstore.open(tmp_path_factory.mktemp("kb") / "store")
    mem.ingest(docs)
    yield mem
    mem.close()


@pytest.mark.parametrize("question", ["What is the capital of Freedonia?", "Who is Ingrid Halvorsen's manager?"])
def test_one_slot_memory_reproduces_rag(kb, question):
    """With one chunk, the memory slot holds exactly what rag mode prefills: same answer."""
    rag = kb.ask(question, mode="rag", k=1)
    mem = kb.ask(question, mode="memory", k=1, retrieve_every=0)
    assert mem.text == rag.text and mem.sources[0].chunk_id == rag.sources[0].chunk_id


def test_memory_mode_answers_and_cites_the_source(kb):
    answer = kb.ask("What is the capital of Freedonia?", mode="memory", k=2)  # refilled at every step
    assert "Zorbaville" in answer.text
    assert answer.sources[0].source.endswith("freedonia.md")  # the slot the answer attended to most
    assert answer.timings["ttft_s"] > 0 and answer.model == "smollm2-135m"


def test_streaming_pieces_add_up_to_the_answer(kb):
    pieces = []
    answer = kb.ask("What is the capital of Freedonia?", mode="memory", k=2, on_token=pieces.append)
    assert "".join(pieces).strip() == answer.text and len(pieces) > 1


def test_kv_memory_is_reused_and_dropped_with_the_document(kb):
    kb.ask("When is the rainy season in Freedonia?", mode="memory", k=3)
    kv_files = list(kb.store.kv_dir.glob("*/*.npy"))
    assert len(kv_files) >= 3
    before = {p: p.stat().st_ino for p in kv_files}
    kb.ask("When is the rainy season in Freedonia?", mode="memory", k=3)
    assert {p: p.stat().st_ino for p in kv_files} == before  # read back: a recomputed file is a new inode (temp + rename)
    weather = next(d for d in kb.store.documents() if d["source"].endswith("weather.md"))
    chunk_ids = [c.chunk_id for c in kb.store.get_chunks(range(1, 100)) if c.document_id == weather["id"]]
    kb.delete(weather["id"])
    assert not [p for p in kb.store.kv_dir.glob("*/*.npy") if int(p.stem) in chunk_ids]


def test_whole_text_modes(kb):
    assert "Zorbaville" in kb.ask("What is the capital of Freedonia?", mode="full").text
    assert kb.ask("What is the capital of Freedonia?", mode="truncate").text


def test_bad_questions(kb, tmp_path):
    with pytest.raises(ValueError, match="unknown mode"):
        kb.ask("x?", mode="psychic")
    with pytest.raises(ValueError, match="question has"):
        kb.ask("word " * 5000)
    with memstore.open(tmp_path / "empty") as empty:
        with pytest.raises(MemstoreError, match="store is empty"):
            empty.ask("anything?")


def test_cli_ask_json(kb):
    result = CliRunner().invoke(main, ["ask", "Who is Ingrid Halvorsen's manager?", "--store", str(kb.store.dir),
                                       "--json", "-k", "2"])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output)
    assert answer["mode"] == "memory" and answer["text"]
    assert {s["source"].rsplit("/", 1)[-1] for s in answer["sources"]} >= {"staff.md"}


def test_cli_unknown_model_is_a_clean_error(kb):
    result = CliRunner().invoke(main, ["ask", "q?", "--store", str(kb.store.dir), "--model", "no-such-model"])
    assert result.exit_code == 2 and "unknown model 'no-such-model'" in result.output


def test_ingest_kv_precomputes_the_memory(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "freedonia.md").write_text(FACTS["freedonia.md"])
    runner = CliRunner()
    refused = runner.invoke(main, ["ingest", str(docs), "--store", str(tmp_path / "kb"), "--kv", "--kv-budget", "0.0001"])
    assert refused.exit_code == 2 and "over the 0.0 GiB budget" in refused.output
    result = runner.invoke(main, ["ingest", str(docs), "--store", str(tmp_path / "kb"), "--kv", "--json"])
    assert result.exit_code == 0, result.output
    kv = json.loads(result.output)["kv"]
    assert kv["encoded"] == kv["chunks"] >= 1 and kv["kv_bytes"] > 0 and kv["tokens_per_s"] > 0
    files = {p: p.stat().st_ino for p in (tmp_path / "kb" / "kv").glob("*/*.npy")}
    with memstore.open(tmp_path / "kb") as mem:
        answer = mem.ask("What is the capital of Freedonia?", k=1, retrieve_every=0)
    assert "Zorbaville" in answer.text
    assert {p: p.stat().st_ino for p in (tmp_path / "kb" / "kv").glob("*/*.npy")} == files  # ask used the precomputed memory
    runner.invoke(main, ["ingest", str(docs), "--store", str(tmp_path / "kb"), "--kv", "--kv-budget", "9"])
    with memstore.open(tmp_path / "kb") as mem:  # a later process keeps the budget the store was given
        assert mem._answerer("smollm2-135m").kv_budget_bytes == 9 * 2**30
    next(iter(files)).unlink()  # as if a run had been killed before this chunk: a rerun encodes it alone
    again = json.loads(runner.invoke(main, ["ingest", str(docs), "--store", str(tmp_path / "kb"), "--kv",
                                            "--json"]).output)["kv"]
    assert again["encoded"] == 1 and 0 < again["tokens"] <= 260 and again["chunks"] == kv["chunks"]


def test_whole_text_keeps_source_order_when_a_document_is_replaced(tmp_path):
    """Modes truncate and full read documents by source: a changed file keeps its place, not the end."""
    docs = tmp_path / "docs"
    docs.mkdir()
    for name, text in [("a.md", "Alpha first."), ("b.md", "Beta second."), ("c.md", "Gamma third.")]:
        (docs / name).write_text(text)
    with memstore.open(tmp_path / "store") as mem:
        mem.ingest(docs)
        (docs / "a.md").write_text("Alpha, rewritten.")
        mem.ingest(docs)  # a.md gets a new document id, the highest
        assert mem.whole_text() == "Alpha, rewritten.\n\nBeta second.\n\nGamma third."
        assert mem.whole_text({"path": "*[bc].md"}) == "Beta second.\n\nGamma third."


TWO_HOPS = {
    "staff.md": "# Staff\n\nIngrid Halvorsen's manager is Tobias Brennecke. Ingrid joined the logistics team in 2021.",
    "hometowns.md": "# Hometowns\n\nTobias Brennecke was born in Quellstadt, a small town on the river Quell.",
    "ingrid.md": "# Ingrid\n\nIngrid Halvorsen was born in Tromsø and studied logistics in Bergen.",
    "weather.md": FACTS["weather.md"],
}


@pytest.mark.slow
def test_refill_follows_the_answer_to_a_second_chunk(tmp_path):
    """The question finds who Ingrid's manager is; once the answer names him, retrieval during
    decoding brings in his own chunk, which the question alone ranks below the top 2."""
    docs = tmp_path / "docs"
    docs.mkdir()
    for name, text in TWO_HOPS.items():
        (docs / name).write_text(text)
    question = "Where was Ingrid Halvorsen's manager born?"
    with memstore.open(tmp_path / "kb") as mem:
        mem.ingest(docs)
        assert "hometowns.md" not in {h.source.rsplit("/", 1)[-1] for h in mem.search(question, k=2)}
        answer = mem.ask(question, model="qwen2.5-0.5b", mode="memory", k=2, max_new_tokens=24)
        static = mem.ask(question, model="qwen2.5-0.5b", mode="memory", k=2, max_new_tokens=24, retrieve_every=0)
    assert "Tobias" in answer.text and answer.refills >= 1
    cited = {s.source.rsplit("/", 1)[-1]: s.attention for s in answer.sources}
    assert cited.get("hometowns.md", 0) > 0.05  # the answer attended to the chunk the refill brought in
    assert static.refills == 0 and "hometowns.md" not in {s.source.rsplit("/", 1)[-1] for s in static.sources}
