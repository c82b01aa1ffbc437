"""float32 or bfloat16 compute: speed of prefill and decoding, and whether the answers change.

Speed: one rag-sized prompt (the question's top-4 newwiki chunks, about 900 tokens) prefilled
and then decoded for 24 tokens, per dtype, at 1 and 2 torch threads, alternating dtypes so
that machine noise falls on both. Answers: newwiki questions (a sample of their own, seed 2)
in rag and memory mode with each dtype, each with its own KV directory.

    python bench/dtype.py --model qwen2.5-0.5b --questions 40 --out bench/results/dtype.json
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from bench.qa import DATA, build_store, load_jsonl, score
from memstore.model.answer import Answerer
from memstore.model.backbone import load_backbone
from memstore.model.generate import PromptParts, chunk_token_ids
from memstore.model.memory import cache_arg, last_logits

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@torch.no_grad()
def time_prompt(model, ids: list[int], new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, seconds per decoded token) for one prompt."""
    cache = DynamicCache()
    started = time.perf_counter()
    logits, _ = last_logits(model, input_ids=torch.tensor([ids]), **cache_arg(model, cache), use_cache=True)
    prefill = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(new_tokens):
        token = logits.argmax().view(1, 1)
        logits, _ = last_logits(model, input_ids=token, **cache_arg(model, cache), use_cache=True)
    return prefill, (time.perf_counter() - started) / new_tokens


def speed(backbones: dict, prompts: list[list[int]], threads: int) -> dict:
    torch.set_num_threads(threads)
    runs = {name: [] for name in backbones}
    for b in backbones.values():  # warm-up: oneDNN builds its kernels on the first call of a shape
        time_prompt(b.model, prompts[0], 2)
    for ids in prompts:
        for name, b in backbones.items():
            runs[name].append(time_prompt(b.model, ids, 24))
    out = {name: {"prefill_s": round(statistics.median(p for p, _ in rs), 3),
                  "decode_ms_per_token": round(1000 * statistics.median(d for _, d in rs), 1)} for name, rs in runs.items()}
    out["prefill_speedup"] = round(out["float32"]["prefill_s"] / out["bfloat16"]["prefill_s"], 2)
    out["decode_speedup"] = round(out["float32"]["decode_ms_per_token"] / out["bfloat16"]["decode_ms_per_token"], 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-0.5b")
    parser.add_argument("--questions", type=int, default=40)
    parser.add_argument("--speed-prompts", type=int, default=5)
    parser.add_argument("-k", type=int, default=4)
    parser.add_argument("--store", type=Path, default=Path("bench/data/newwiki-store"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/dtype.json"))
    parser.add_argument("--sections", nargs="+", default=["speed", "answers"], choices=["speed", "answers"],
                        help="run these; the others are carried over from --out")
    args = parser.parse_args()
    docs = load_jsonl(DATA / "newwiki_longdoc.docs.jsonl")
    questions = random.Random(2).sample(load_jsonl(DATA / "newwiki_longdoc.qas.jsonl"), args.questions)
    backbones = {name: load_backbone(args.model, dtype=dt) for name, dt in DTYPES.items()}
    tok = backbones["float32"].tokenizer
    report = json.loads(args.out.read_text()) if args.out.exists() else {}
    report.pop("date", None)  # older layout: one date for both sections
    report.update({"benchmark": "dtype", "model": args.model, "k": args.k, "cpus": os.cpu_count()})
    with build_store(args.store, docs) as mem, tempfile.TemporaryDirectory() as tmp:
        def retrieve(text):
            return mem.search(text, k=args.k)

        prompts = []
        for qa in questions[:args.speed_prompts]:
            parts = PromptParts(tok, qa["question"])
            prompts.append(parts.prefix + sum((chunk_token_ids(tok, c.text, 256) for c in retrieve(qa["question"])), [])
                           + parts.suffix)
        if "speed" in args.sections:
            report["speed"] = {f"{t}_threads": speed(backbones, prompts, t) for t in (1, 2)}
            report.update(prompt_tokens=round(statistics.mean(len(p) for p in prompts)),
                          speed_measured=time.strftime("%Y-%m-%d %H:%M"), speed_load_average=os.getloadavg())
            print(json.dumps(report["speed"]), flush=True)
        if "answers" in args.sections:
            answers(report, answerers(backbones, Path(tmp)), questions, retrieve, args.k)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}, indent=1))


def answerers(backbones: dict, kv_root: Path) -> dict:
    return {name: Answerer(b, kv_root / name) for name, b in backbones.items()}


def answers(report: dict, answerers: dict, questions: list[dict], retrieve, k: int) -> None:
    """Each question in rag and memory mode with each dtype (one torch thread): identical answers, F1, time."""
    torch.set_num_threads(1)
    rows = []
    for n, qa in enumerate(questions, 1):
        row = {"question": qa["question"], "answers": qa["answers"]}
        for mode in ("rag", "memory"):
            for name, answerer in answerers.items():
                started = time.perf_counter()
                answer = answerer.ask(qa["question"], retrieve, mode=mode, k=k, max_new_tokens=24)
                row[f"{mode}_{name}"] = {"text": answer.text, "f1": score(answer.text, qa["answers"])[1],
                                         "seconds": round(time.perf_counter() - started, 3),
                                         "ttft_s": round(answer.timings["ttft_s"], 3)}
        rows.append(row)
        print(n, {k: v["text"][:30] for k, v in row.items() if isinstance(v, dict)}, flush=True)
    report["answers"] = {}
    for mode in ("rag", "memory"):
        a, b = (f"{mode}_{name}" for name in DTYPES)
        report["answers"][mode] = {
            "identical": sum(r[a]["text"] == r[b]["text"] for r in rows), "questions": len(rows),
            "f1": {name: round(100 * sum(r[f"{mode}_{name}"]["f1"] for r in rows) / len(rows), 1) for name in DTYPES},
            "seconds_per_answer": {name: round(statistics.mean(r[f"{mode}_{name}"]["seconds"] for r in rows), 2)
                                   for name in DTYPES},
            "median_ttft_s": {name: round(statistics.median(r[f"{mode}_{name}"]["ttft_s"] for r in rows), 3)
                              for name in DTYPES},
        }
    report.update(answers_measured=time.strftime("%Y-%m-%d %H:%M"), answers_load_average=os.getloadavg(), rows=rows)


if __name__ == "__main__":
    main()
