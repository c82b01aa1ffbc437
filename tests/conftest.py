import contextlib
import os
import socket
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("MEMSTORE_MODEL", "smollm2-135m")  # the smallest real model keeps the suite fast

SQLITE_DOC = Path(__file__).resolve().parents[1] / "memstore" / "data" / "sqlite_doc"
PG_ADMIN_URL = os.environ.get("MEMSTORE_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def unit_vectors(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _pg_server_error() -> str | None:
    try:
        import psycopg

        with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test", connect_timeout=3):
            return None
    except Exception as e:  # any failure to connect means: no server here
        return f"no PostgreSQL server at 127.0.0.1:5432 ({type(e).__name__}: {e})"


@pytest.fixture(scope="session")
def pg_server():
    reason = _pg_server_error()
    if reason:
        pytest.skip(reason)
    return True


@pytest.fixture
def pg_url(pg_server):
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    import psycopg

    name = f"memstore_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgres"])
def store_target(request, tmp_path):
    """(target, data_dir) for a new store on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return str(tmp_path / "store"), None
    return request.getfixturevalue("pg_url"), str(tmp_path / "pgdata")


@pytest.fixture(scope="session")
def embedder():
    from memstore.ingest.embed import load_embedder

    return load_embedder()


@pytest.fixture(scope="module")
def tiny():
    """A real Llama, tiny and randomly initialised, in float32: exact comparisons of cache arithmetic."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_theta=10000.0)
    return LlamaForCausalLM(config).eval()


@contextlib.contextmanager
def serving(app):
    """The app served by uvicorn in a thread of this process: its host:port."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.1)
    yield f"127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=30)
