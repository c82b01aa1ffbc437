"""Does int8 KV memory answer like fp16? Memory-mode answers on newwiki questions, both ways.

Each dtype gets its own KV directory, so every chunk is encoded and stored in that dtype.
Reports how often the answers are identical, each dtype's F1, and the bytes per token.

    python bench/kv_precision.py --questions 60 --out bench/results/kv_precision.json
"""
from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

import torch

from bench.qa import DATA, build_store, load_jsonl, score
from memstore.model.answer import Answerer
from memstore.store.kv import bytes_per_token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--questions", type=int, default=60)
    parser.add_argument("-k", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--store", type=Path, default=Path("bench/data/newwiki-store"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/kv_precision.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    docs = load_jsonl(DATA / "newwiki_longdoc.docs.jsonl")
    questions = random.Random(1).sample(load_jsonl(DATA / "newwiki_longdoc.qas.jsonl"), args.questions)
    with build_store(args.store, docs) as mem, tempfile.TemporaryDirectory() as tmp:
        backbone = mem._answerer(args.model).backbone
        answerers = {d: Answerer(backbone, Path(tmp) / d, kv_dtype=d) for d in ("fp16", "int8")}

        def retrieve(text):
            return mem.search(text, k=args.k)

        rows = []
        for n, qa in enumerate(questions, 1):
            row = {"question": qa["question"], "answers": qa["answers"]}
            for dtype, answerer in answerers.items():
                started = time.perf_counter()
                answer = answerer.ask(qa["question"], retrieve, mode="memory", k=args.k, max_new_tokens=24)
                row[dtype] = {"text": answer.text, "f1": score(answer.text, qa["answers"])[1],
                              "seconds": time.perf_counter() - started}
            rows.append(row)
            print(n, row["fp16"]["text"][:50] == row["int8"]["text"][:50], flush=True)
        kv_bytes = {d: sum(p.stat().st_size for p in (Path(tmp) / d).rglob("*.npy")) for d in answerers}
    same = sum(r["fp16"]["text"] == r["int8"]["text"] for r in rows)
    report = {
        "model": args.model, "questions": len(rows), "k": args.k, "identical_answers": same,
        "f1": {d: round(100 * sum(r[d]["f1"] for r in rows) / len(rows), 1) for d in answerers},
        "kv_bytes_on_disk": kv_bytes,
        "bytes_per_token": {d: bytes_per_token(backbone.n_layers, backbone.n_kv_heads, backbone.head_dim, d)
                            for d in answerers},
        "load_avg": os.getloadavg(), "rows": rows,
    }
    args.out.write_text(json.dumps(report, indent=1))
    print({k: v for k, v in report.items() if k != "rows"})


if __name__ == "__main__":
    main()
