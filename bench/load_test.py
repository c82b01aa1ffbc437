"""A load test of a live `memstore serve` on loopback: readers, askers and a writer at once.

A copy of a store (default: the demo's bundled pages, as bench/serve_batch.py builds them) is
served with the given model. First an idle server's search latency (one client, one query at a
time); then, for a fixed time, `--readers` clients search (GET /search, now and then /stats and a
document), `--askers` clients ask (POST /ask, memory mode) and one writer adds documents (POST
/documents, each holding a word no other text has). Afterwards every document whose write was
acknowledged must be found by a search for its word, and `memstore check` must find the store
consistent. Reported: requests and status codes per kind, 5xx count, lost documents, search
latency p50/p95 under load next to idle. Writes bench/results/load.json.

    python bench/load_test.py [--seconds 60] [--readers 8] [--askers 2] [--model qwen2.5-0.5b]
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_name  # noqa: E402
from served import call, get, start  # noqa: E402

SEARCHES = ["AUTOINCREMENT ROWID", "maximum number of columns", "journal mode readers writer", "VACUUM INTO",
            "type affinity VARCHAR", "transaction BEGIN IMMEDIATE", "serverless database", "single file format"]
QUESTIONS = ["How does AUTOINCREMENT choose a new ROWID?", "What does VACUUM INTO do?",
             "What is the maximum number of columns in a table?", "Is SQLite serverless?"]


class Tally:
    """Status codes and latencies per kind of request, from every client thread."""

    def __init__(self):
        self.lock = threading.Lock()
        self.status: dict[str, Counter] = {}
        self.latency: dict[str, list[float]] = {}
        self.written: list[tuple[int, str]] = []  # (document id, its unique word) of acknowledged writes

    def call(self, kind: str, base: str, path: str, body: dict | None = None) -> dict | None:
        started = time.perf_counter()
        try:
            status, reply = call(base, path, body, timeout=300)
        except urllib.error.HTTPError as e:
            reply, status = None, e.code
        except OSError:
            reply, status = None, "no response"
        with self.lock:
            self.status.setdefault(kind, Counter())[status] += 1
            if reply is not None:
                self.latency.setdefault(kind, []).append(time.perf_counter() - started)
        return reply


def percentiles(values: list[float]) -> dict:
    values = sorted(values)
    if not values:
        return {"n": 0}
    return {"n": len(values), "p50_ms": round(1000 * statistics.median(values), 1),
            "p95_ms": round(1000 * values[int(0.95 * (len(values) - 1))], 1)}


def idle_searches(base: str, n: int) -> list[float]:
    times = []
    for i in range(n):
        started = time.perf_counter()
        get(base, "/search?" + urllib.parse.urlencode({"q": SEARCHES[i % len(SEARCHES)], "k": 5}))
        times.append(time.perf_counter() - started)
    return times


def under_load(base: str, seconds: float, readers: int, askers: int) -> Tally:
    tally, stop_at = Tally(), time.perf_counter() + seconds

    def reader(i: int) -> None:
        n = i
        while time.perf_counter() < stop_at:
            found = tally.call("search", base, "/search?" + urllib.parse.urlencode({"q": SEARCHES[n % len(SEARCHES)], "k": 5}))
            if n % 10 == 0:
                tally.call("stats", base, "/stats")
            if n % 10 == 5 and found and found["hits"]:
                tally.call("document", base, f"/documents/{found['hits'][0]['document_id']}")
            n += 1

    def asker(i: int) -> None:
        n = i
        while time.perf_counter() < stop_at:
            tally.call("ask", base, "/ask", {"question": QUESTIONS[n % len(QUESTIONS)], "mode": "memory"})
            n += 1

    def writer() -> None:
        n = 0
        while time.perf_counter() < stop_at:
            word = f"loadword{n:05d}x{int(time.time())}"
            text = f"# Load note {n}\n\nThe load test wrote this note. Its marker is {word}.\n"
            reply = tally.call("write", base, "/documents", {"text": text, "source": f"load/{word}.md"})
            if reply:
                with tally.lock:
                    tally.written.append((reply["id"], word))
            n += 1

    threads = ([threading.Thread(target=reader, args=(i,)) for i in range(readers)]
               + [threading.Thread(target=asker, args=(i,)) for i in range(askers)] + [threading.Thread(target=writer)])
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return tally


def lost_documents(base: str, written: list[tuple[int, str]]) -> list[str]:
    """The acknowledged writes that a search for their word does not find."""
    lost = []
    for document_id, word in written:
        hits = get(base, "/search?" + urllib.parse.urlencode({"q": word, "k": 3, "mode": "lexical"}))["hits"]
        if document_id not in [h["document_id"] for h in hits]:
            lost.append(word)
    return lost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, default=Path("bench/data/serve_batch/store"),
                        help="a store to copy (bench/serve_batch.py builds the default)")
    parser.add_argument("--model", default="qwen2.5-0.5b")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--readers", type=int, default=8)
    parser.add_argument("--askers", type=int, default=2)
    parser.add_argument("--idle-searches", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("bench/results/load.json"))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="memstore-load-"))
    store = work / "store"
    shutil.copytree(args.store, store)
    server, base = start(["serve", "--store", str(store), "--model", args.model])
    try:
        get(base, "/ask", {"question": QUESTIONS[0], "mode": "memory"})  # first-call costs out of the timings
        idle = idle_searches(base, args.idle_searches)
        started = time.perf_counter()
        tally = under_load(base, args.seconds, args.readers, args.askers)
        elapsed = time.perf_counter() - started
        lost = lost_documents(base, tally.written)
    finally:
        server.terminate()
        server.wait(timeout=60)
    check = subprocess.run([sys.executable, "-m", "memstore.cli", "check", "--store", str(store), "--json"],
                           capture_output=True, text=True)
    report = {
        "cpu": cpu_name(), "model": args.model, "seconds": round(elapsed, 1), "readers": args.readers,
        "askers": args.askers, "writers": 1,
        "status": {kind: {str(code): n for code, n in counts.items()} for kind, counts in tally.status.items()},
        "server_errors": sum(n for counts in tally.status.values() for code, n in counts.items()
                             if not isinstance(code, int) or code >= 500),
        "acknowledged_writes": len(tally.written), "lost_documents": lost,
        "check": json.loads(check.stdout) if check.returncode == 0 else {"failed": check.stderr[-2000:]},
        "search_idle": percentiles(idle), "search_under_load": percentiles(tally.latency.get("search", [])),
        "ask_under_load": percentiles(tally.latency.get("ask", [])),
        "write_under_load": percentiles(tally.latency.get("write", [])),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
