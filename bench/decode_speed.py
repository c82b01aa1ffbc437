"""Decode speed of memory mode against rag on the same answers: tokens/s after the first token.

Asks the niah_uuid and multikey questions of bench/longctx.py (long answers: a UUID is ~25
tokens) on the cached 8k filler store, rag and memory side by side in one process, and
writes the medians and the memory/rag ratio. Run it from two checkouts to compare code
versions by their ratio (timings on a shared machine drift; the ratio holds).

    python bench/decode_speed.py --out bench/results/decode_speed.json
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import longctx  # noqa: E402
import niah  # noqa: E402
from machine import cpu_name  # noqa: E402

import memstore  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, required=True, help="a cached 8k store of bench/longctx.py")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--model", default="qwen2.5-0.5b")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path("/tmp/decode_speed_store")
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(args.store, work, ignore=shutil.ignore_patterns("kv", "write.lock"))
    mem = memstore.open(work)
    tok = mem._answerer(args.model).backbone.tokenizer
    docs = niah.filler_documents(niah.filler_files(niah.PG_DIR, niah.SQLITE_DIR), tok, 8000, longctx.DOC_TOKENS,
                                 prefix="longctx")
    cum = [0]
    for d in docs:
        cum.append(cum[-1] + d.tokens)
    rows = []
    for task in ("niah_uuid", "multikey"):
        for seed in range(args.seeds):
            case = longctx.make_case(task, 8000, seed)
            texts = longctx.place_facts(case, docs, cum, random.Random(f"place/{task}/8000/{seed}"))
            for i, text in texts.items():
                mem.add_text(text, source=docs[i].source, title=docs[i].title)
            mem.ask(case.question, model=args.model, mode="memory", max_new_tokens=40)  # KV encoded: warm runs below
            for mode in ("rag", "memory"):
                ans = mem.ask(case.question, model=args.model, mode=mode, max_new_tokens=40)
                rows.append({"task": task, "seed": seed, "mode": mode, "tokens": ans.timings["tokens"],
                             "tokens_per_s": ans.timings["tokens_per_s"], "total_s": ans.timings["total_s"],
                             "answer": ans.text})
            for i in texts:
                mem.add_text(docs[i].text, source=docs[i].source, title=docs[i].title)
    med = {m: statistics.median(r["tokens_per_s"] for r in rows if r["mode"] == m and r["tokens_per_s"])
           for m in ("rag", "memory")}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    report = {"benchmark": "decode_speed", "date": time.strftime("%Y-%m-%d %H:%M"), "commit": commit,
              "cpu": cpu_name(), "torch_threads": 1, "model": args.model,
              "median_tokens_per_s": med, "memory_over_rag": round(med["memory"] / med["rag"], 3), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("commit", "median_tokens_per_s", "memory_over_rag")}))


if __name__ == "__main__":
    main()
