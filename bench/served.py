"""What the benchmarks that drive a live server share: a free port, JSON over HTTP, a server process."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(base: str, path: str, body: dict | None = None, timeout: float = 600) -> dict:
    """GET `path` (POST `body` as JSON where given) and the reply's JSON."""
    return call(base, path, body, timeout)[1]


def call(base: str, path: str, body: dict | None = None, timeout: float = 600) -> tuple[int, dict]:
    """(status, JSON) of GET `path` (POST `body` as JSON where given); an error status raises HTTPError."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.status, json.loads(resp.read())


def start(args: list[str], env: dict | None = None, ready_path: str = "/stats", limit_s: float = 600):
    """(process, base URL) of `memstore ARGS --port P`, once `ready_path` answers."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "memstore.cli", *args, "--port", str(port)],
                            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + limit_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            get(base, ready_path, timeout=5)
            return proc, base
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise TimeoutError(f"the server did not answer within {limit_s:.0f} s")
