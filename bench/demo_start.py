"""`memstore demo` from a fresh cache, as a new user starts it: when the page answers, when the first
answer with sources comes back, and how the manual's pages become ready meanwhile.

A new MEMSTORE_CACHE (the model is converted again, the manual fetched or copied in) and a free
port; /stats is polled every half second and one question is asked as soon as the page is up
(it waits for the model, as a user's would). Writes bench/results/demo_start.json.

    python bench/demo_start.py [--mode memory] [--manual DIR]   # DIR: an unpacked sqlite3-doc, else fetched
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_features, cpu_name  # noqa: E402
from served import free_port, get  # noqa: E402

QUESTION = "Which PRAGMA turns on enforcement of foreign key constraints?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", default="memory")
    parser.add_argument("--manual", type=Path, help="an unpacked sqlite3-doc (its usr/ folder's parent) to copy in")
    parser.add_argument("--out", type=Path, default=Path("bench/results/demo_start.json"))
    parser.add_argument("--limit-s", type=float, default=1800)
    args = parser.parse_args()

    cache = Path(tempfile.mkdtemp(prefix="demo-start-"))
    if args.manual:
        shutil.copytree(args.manual, cache / "sqlite3-doc")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MEMSTORE_CACHE": str(cache)}
    started = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "memstore.cli", "demo", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    log: list[str] = []
    threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True).start()
    report: dict = {"benchmark": "demo_start", "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                    "machine": {"cpu": cpu_name(), "cpu_features": cpu_features(), "cpus": os.cpu_count()},
                    "embed_format": os.environ.get("MEMSTORE_EMBED_FORMAT", "auto"), "question": QUESTION,
                    "mode": args.mode, "manual": "copied in" if args.manual else "fetched (apt-get download)"}
    progress: list[dict] = []
    answer: dict = {}
    try:
        while True:
            try:
                ready = get(base, "/stats", timeout=5)["ready"]
                break
            except OSError:
                if proc.poll() is not None or time.time() - started > 300:
                    raise SystemExit("".join(log)) from None
                time.sleep(0.2)
        report["page_s"] = round(time.time() - started, 1)

        def ask() -> None:
            reply = get(base, "/ask", {"question": QUESTION, "mode": args.mode})
            answer.update(seconds=round(time.time() - started, 1), text=reply["text"],
                          sources=[s["source"].rsplit("/", 1)[-1] for s in reply["sources"]],
                          ttft_s=reply["timings"].get("ttft_s"), total_s=reply["timings"].get("total_s"))

        asker = threading.Thread(target=ask, daemon=True)  # an error reply ends it early: answer stays empty
        asker.start()
        while time.time() - started < args.limit_s:
            stats = get(base, "/stats", timeout=30)
            ready, kv = stats["ready"], stats.get("kv_memory") or {}
            progress.append({"s": round(time.time() - started, 1), "kv_warm": kv.get("warm"), **{k: ready.get(k) for k in
                             ("files_done", "files_total", "model_state", "ingest_state")}})
            if ready["ingest_state"] == "done" and not asker.is_alive():
                break
            time.sleep(0.5)
        done = next((p["s"] for p in progress if p["ingest_state"] == "done"), None)
        model = next((p["s"] for p in progress if p["model_state"] == "ready"), None)
        report.update(all_pages_s=done, model_ready_s=model, pages=progress[-1]["files_total"], first_answer=answer,
                      progress=progress[:: max(1, len(progress) // 60)])
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(cache, ignore_errors=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report.get(k) for k in ("page_s", "model_ready_s", "all_pages_s", "pages", "first_answer")},
                     indent=1))


if __name__ == "__main__":
    main()
