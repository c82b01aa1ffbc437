"""How much attention bias on the lesser memory slots? Memory-mode F1 per bias, against rag.

Memory mode (the API's: best chunk in the last slot, refills while decoding) with the bias
on every slot but the best chunk's set to each value in --biases, and rag mode, on a sample
of newwiki questions of its own (seed 7: development questions, not bench/qa.py's sample).

    python -m bench.slot_bias --questions 60 --out bench/results/slot_bias.json
"""
from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import torch

from bench.qa import DATA, build_store, load_jsonl, score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-0.5b")
    parser.add_argument("--questions", type=int, default=60)
    parser.add_argument("--biases", nargs="+", type=float, default=[0.0, -0.5, -1.0, -1.5, -2.0, -3.0])
    parser.add_argument("-k", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--store", type=Path, default=Path("bench/data/newwiki-store"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/slot_bias.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    docs = load_jsonl(DATA / "newwiki_longdoc.docs.jsonl")
    questions = random.Random(7).sample(load_jsonl(DATA / "newwiki_longdoc.qas.jsonl"), args.questions)
    variants = ["rag"] + [f"memory{b:+.1f}" for b in args.biases]
    rows = []
    with build_store(args.store, docs) as mem:
        answerer = mem._answerer(args.model)

        def retrieve(text):
            return mem.search(text, k=args.k)

        for n, qa in enumerate(questions, 1):
            row = {"id": qa["id"], "question": qa["question"], "answers": qa["answers"]}
            best_id = retrieve(qa["question"])[0].chunk_id
            for variant, bias in zip(variants, [None] + args.biases):
                if bias is not None:
                    answerer.decoder.slot_bias = bias
                answer = answerer.ask(qa["question"], retrieve, mode="rag" if bias is None else "memory", k=args.k,
                                      max_new_tokens=24)
                row[variant] = {"text": answer.text, "f1": score(answer.text, qa["answers"])[1],
                                "ttft_s": round(answer.timings["ttft_s"], 3),
                                "best_chunk_attention": best_chunk_share(answer, best_id)}
            rows.append(row)
            if n % 10 == 0:
                print(n, {v: round(100 * sum(r[v]["f1"] for r in rows) / n, 1) for v in variants}, flush=True)
    report = {"benchmark": "slot_bias", "model": args.model, "k": args.k, "questions": len(rows),
              "sample": "newwiki_longdoc, random.Random(7).sample", "measured": time.strftime("%Y-%m-%d %H:%M"),
              "load_average": os.getloadavg(),
              "f1": {v: round(100 * sum(r[v]["f1"] for r in rows) / len(rows), 1) for v in variants},
              "best_chunk_attention": {v: mean_share(rows, v) for v in variants},
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report["f1"]))


def best_chunk_share(answer, best_id: int) -> float | None:
    """The top-ranked chunk's share of the answer tokens' attention on all chunks (None if refilled away)."""
    total = sum(s.attention for s in answer.sources)
    shares = {s.chunk_id: s.attention / total for s in answer.sources} if total > 0 else {}
    return round(shares[best_id], 4) if best_id in shares else None


def mean_share(rows: list[dict], variant: str) -> float | None:
    shares = [r[variant]["best_chunk_attention"] for r in rows if r[variant]["best_chunk_attention"] is not None]
    return round(sum(shares) / len(shares), 3) if shares else None


if __name__ == "__main__":
    main()
