"""`memstore mcp`: a real MCP client (the `mcp` SDK's) launches the server over stdio, lists and
calls its tools, and reads the store's documents as resources."""
import asyncio
import json
import os
import sys

import pytest

import memstore

NOTE = ("# Boiler\n\nThe boiler in the cellar is serviced every October by Halvard Nyström, "
        "whose phone number is 555-0143. The pressure should stay between 1.2 and 1.5 bar.\n")


@pytest.fixture
def store(tmp_path, embedder):
    path = tmp_path / "store"
    with memstore.open(path) as mem:
        mem._embedder = embedder
        mem.add_text(NOTE, source="boiler.md")
        mem.add_text("# Bicycles\n\nThe red bicycle has a flat tyre and needs a new chain.\n", source="bikes.md")
    return path


async def session_calls(store):
    from mcp import Client, StdioServerParameters

    params = StdioServerParameters(command=sys.executable, args=["-m", "memstore.cli", "mcp", "--store", str(store)],
                                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    async with Client(params, read_timeout_seconds=600) as client:
        tools = await client.list_tools()
        found = await client.call_tool("search", {"query": "Who services the boiler?", "k": 2})
        answer = await client.call_tool("ask", {"question": "Who services the boiler?", "mode": "rag", "k": 2,
                                                "max_new_tokens": 16})
        resources = await client.list_resources()
        boiler = next(r for r in resources.resources if r.name == "boiler.md")
        text = await client.read_resource(boiler.uri)
        missing = await client.call_tool("search", {"query": "", "k": 2})
        return tools, found, answer, resources, text, missing


def structured(result) -> dict:
    assert not result.is_error, result
    return result.structured_content or json.loads(result.content[0].text)


def test_mcp_client_lists_and_calls_the_tools_and_reads_documents(store):
    tools, found, answer, resources, text, missing = asyncio.run(session_calls(store))
    assert {"search", "ask"} <= {t.name for t in tools.tools}
    hits = structured(found)["hits"]
    assert hits[0]["source"] == "boiler.md" and "Halvard" in hits[0]["text"]
    assert NOTE[hits[0]["char_start"]:hits[0]["char_end"]] == hits[0]["text"]
    answered = structured(answer)
    assert answered["answer"].strip() and answered["mode"] == "rag"
    assert answered["sources"] and answered["sources"][0]["source"] == "boiler.md"
    assert {r.name for r in resources.resources} == {"boiler.md", "bikes.md"}
    assert text.contents[0].text.strip() == NOTE.strip()  # as the store keeps it: chunk texts joined
    assert missing.is_error and "empty" in missing.content[0].text  # a bad call is an error result, not a crash
