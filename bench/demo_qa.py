"""Ten questions about SQLite, asked of the demo store (`memstore demo --build-only` builds it).

For each model and mode: is the answer right (one of the accepted strings appears in it), does
it cite the page that answers the question (among its sources, and as the source it attended
to most), and how long it took. Writes bench/results/demo_qa.json.

    python bench/demo_qa.py [--store DIR] [--models smollm2-135m qwen2.5-0.5b] [--modes memory rag]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import time
from pathlib import Path

import torch

import memstore
from memstore.paths import cache_dir

# (question, accepted answers, pages that answer it)
QUESTIONS = [
    ("By default, how many columns can a table have at most?", ["2000", "2,000"], ["limits.html"]),
    ("Which PRAGMA turns on enforcement of foreign key constraints?", ["foreign_keys"], ["foreignkeys.html"]),
    ("What is the largest possible ROWID value?", ["9223372036854775807"], ["autoinc.html", "lang_createtable.html"]),
    ("Which journal mode lets readers and a writer proceed concurrently?", ["wal", "write-ahead"], ["wal.html"]),
    ("What is the default page size of a new database since SQLite 3.12.0?", ["4096"],
     ["pragma.html", "pgszchng2016.html"]),
    ("Which SQL function returns the number of rows modified by the most recent INSERT, UPDATE or DELETE?",
     ["changes"], ["lang_corefunc.html"]),
    ("What type affinity does a column declared as VARCHAR(10) get?", ["text"], ["datatype3.html"]),
    ("Which sqlite3 shell command shows the CREATE statements of the schema?", [".schema"], ["cli.html"]),
    ("What is the name of the table that holds a database's schema?", ["sqlite_schema", "sqlite_master"],
     ["schematab.html"]),
    ("Which built-in FTS5 auxiliary function ranks matches by relevance?", ["bm25"], ["fts5.html"]),
]


def is_right(answer: str, accepted: list[str]) -> bool:
    """One of the accepted answers appears in the answer as a whole word (so "wal" in "sqlite3_wal_x" does not count)."""
    return any(re.search(rf"(?<!\w){re.escape(a)}(?!\w)", answer, re.IGNORECASE) for a in accepted)


def page(source: str) -> str:
    return os.path.basename(source)


def run(store: Path, models: list[str], modes: list[str], k: int) -> dict:
    rows = []
    with memstore.open(store, create=False) as mem:
        stats = mem.stats()
        for model in models:
            mem.load_model(model)
            mem.ask(QUESTIONS[0][0], model=model, mode="rag", k=k)  # warm-up: first-call costs out of the timings
            for mode in modes:
                for question, accepted, pages in QUESTIONS:
                    answer = mem.ask(question, model=model, mode=mode, k=k, max_new_tokens=48)
                    cited = [page(s.source) for s in answer.sources]
                    rows.append({
                        "model": model, "mode": mode, "question": question, "answer": answer.text,
                        "right": is_right(answer.text, accepted),
                        "page_cited": any(p in pages for p in cited),
                        "page_cited_first": bool(cited) and cited[0] in pages,
                        "sources": cited, "ttft_s": answer.timings.get("ttft_s"),
                        "total_s": answer.timings["total_s"], "refills": answer.refills,
                    })
                    r = rows[-1]
                    print(f"{model:13} {mode:6} right={r['right']!s:5} cited={r['page_cited']!s:5} "
                          f"{r['total_s']:5.1f}s  {question[:50]!r} -> {answer.text[:60]!r}", flush=True)
    summary = {}
    for model in models:
        for mode in modes:
            sel = [r for r in rows if r["model"] == model and r["mode"] == mode]
            summary[f"{model}/{mode}"] = {
                "right": sum(r["right"] for r in sel), "page_cited": sum(r["page_cited"] for r in sel),
                "right_and_cited_first": sum(r["right"] and r["page_cited_first"] for r in sel),
                "of": len(sel), "median_ttft_s": round(statistics.median(r["ttft_s"] or 0 for r in sel), 3),
                "median_total_s": round(statistics.median(r["total_s"] for r in sel), 3),
            }
    return {"store": {k: stats[k] for k in ("documents", "chunks", "tokens")}, "k": k,
            "load_avg": os.getloadavg(), "summary": summary, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=cache_dir() / "demo" / "sqlite3-doc")
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-0.5b"])
    parser.add_argument("--modes", nargs="+", default=["memory", "rag"])
    parser.add_argument("-k", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "demo_qa.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    result = run(args.store, args.models, args.modes, args.k)
    result["seconds"] = round(time.time() - started, 1)
    result["torch_threads"] = torch.get_num_threads()
    args.out.write_text(json.dumps(result, indent=1))
    for name, s in result["summary"].items():
        print(f"{name:22} right {s['right']}/{s['of']}  cites the page {s['page_cited']}/{s['of']}  "
              f"right+cited first {s['right_and_cited_first']}/{s['of']}  "
              f"median first token {s['median_ttft_s']:.2f}s  total {s['median_total_s']:.2f}s")


if __name__ == "__main__":
    main()
