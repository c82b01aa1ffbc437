"""Answers per minute from a live `memstore serve`, one answer at a time against answers batched.

The demo's bundled SQLite pages, with their KV memory built beforehand (so every answer is warm
and the server's KV warmer has nothing to do), served twice: `--concurrent 1` (answers take
turns) and `--concurrent N` for each N given (up to N answers decode together, their steps in
one batch). Against
each, 1, 4 and 8 clients ask questions back to back over HTTP (`POST /ask`, memory mode) for a
fixed time. Reported per configuration: answers per minute, client-side latency (queueing
included) and how many answers are word for word the answer the same question gets alone.
First, one decoding step's cost by batch size (`model.batching.run_batch` over caches of a
memory-mode answer's length, in this process). Writes bench/results/serve_batch.json.

    python bench/serve_batch.py [--seconds 60] [--clients 1 4 8] [--concurrent 4 8]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_qa import QUESTIONS  # noqa: E402
from machine import cpu_features, cpu_name  # noqa: E402
from served import get, start  # noqa: E402

import memstore  # noqa: E402
from memstore.demo import EXAMPLE_QUESTIONS, bundled_pages  # noqa: E402

ASKED = list(EXAMPLE_QUESTIONS) + [q for q, _, _ in QUESTIONS]


def step_costs(model_name: str, cache_len: int = 1000, sizes=(1, 2, 4, 8), repeats: int = 15) -> dict:
    """Median ms of one decoding step for batches of answers whose caches hold `cache_len` entries."""
    import torch

    from memstore.model.backbone import load_backbone
    from memstore.model.batching import DecodeStep, run_batch
    from memstore.model.generate import one_query_mask
    from memstore.model.memory import cache_arg, last_logits, prefill

    model = load_backbone(model_name).model
    caches = [prefill(model, list(range(100, 100 + cache_len))) for _ in range(max(sizes))]
    found = {}
    for size in sizes:
        times = []
        for _ in range(repeats):
            steps = [DecodeStep(c, 42, c.get_seq_length(), torch.zeros(c.get_seq_length()), solo=None)
                     for c in caches[:size]]
            started = time.perf_counter()
            if size == 1:  # what a step alone runs: with a mask (memory mode's slot biases; one_query_mask in prompts)
                last_logits(model, input_ids=torch.tensor([[42]]), **cache_arg(model, caches[0]), use_cache=True,
                            **one_query_mask(caches[0], 1))
            else:
                run_batch(model, steps)
            times.append(time.perf_counter() - started)
        found[size] = {"ms_per_step": round(1000 * statistics.median(times), 1),
                       "ms_per_token": round(1000 * statistics.median(times) / size, 1)}
    return {"cache_entries": cache_len, "by_batch": found,
            "tokens_per_s_vs_one": {size: round(found[1]["ms_per_step"] * size / found[size]["ms_per_step"], 2)
                                    for size in sizes}}


def build_store(store: Path, model: str) -> dict:
    """The bundled pages' store with every chunk's KV memory for `model` (kept between runs)."""
    with memstore.open(store) as mem:
        mem.ingest(bundled_pages())
        kv = mem.build_kv(model, progress=True)
        return {"chunks": mem.stats()["chunks"], "kv_encoded_now": kv["encoded"]}


def clients_run(base: str, clients: int, seconds: float, mode: str) -> list[dict]:
    """Each client asks the next question as soon as its last answer came, until `seconds` are up."""
    done: list[dict] = []
    lock = threading.Lock()
    start_at = time.perf_counter()

    def client(i: int) -> None:
        n = i * 3  # clients start at different questions
        while time.perf_counter() - start_at < seconds:
            question = ASKED[n % len(ASKED)]
            asked = time.perf_counter()
            try:
                reply = get(base, "/ask", {"question": question, "mode": mode})
                row = {"question": question, "text": reply["text"], "tokens": reply["timings"].get("tokens")}
            except OSError as e:  # a 503 or a 5xx: counted, not retried at once
                row = {"question": question, "error": str(e)}
                time.sleep(1)
            row.update(client=i, start_s=asked - start_at, end_s=time.perf_counter() - start_at)
            with lock:
                done.append(row)
            n += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return done


def summary(rows: list[dict], alone: dict[str, str]) -> dict:
    answered = [r for r in rows if "text" in r]
    span = max(r["end_s"] for r in rows)
    latency = sorted(r["end_s"] - r["start_s"] for r in answered)
    return {"answers": len(answered), "errors": len(rows) - len(answered), "span_s": round(span, 1),
            "answers_per_min": round(60 * len(answered) / span, 2),
            "tokens_per_s": round(sum(r["tokens"] or 0 for r in answered) / span, 2),
            "latency_p50_s": round(statistics.median(latency), 2) if latency else None,
            "latency_p95_s": round(latency[int(0.95 * (len(latency) - 1))], 2) if latency else None,
            "same_as_alone": sum(r["text"] == alone.get(r["question"]) for r in answered),
            "compared": sum(r["question"] in alone for r in answered)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, default=Path("bench/data/serve_batch/store"))
    parser.add_argument("--model", default="qwen2.5-0.5b")
    parser.add_argument("--mode", default="memory")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--concurrent", type=int, nargs="+", default=[4, 8], help="the batched servers' --concurrent")
    parser.add_argument("--out", type=Path, default=Path("bench/results/serve_batch.json"))
    parser.add_argument("--steps-only", action="store_true", help="measure the step costs, keep the runs on file")
    args = parser.parse_args()

    if args.steps_only:
        report = json.loads(args.out.read_text())
        report["step_costs"] = step_costs(args.model)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        print(json.dumps(report["step_costs"]))
        return

    report = {"cpu": cpu_name(), "cpu_features": cpu_features(), "model": args.model, "mode": args.mode,
              "seconds": args.seconds, "questions": len(ASKED), "store": build_store(args.store, args.model),
              "step_costs": step_costs(args.model), "runs": []}
    alone: dict[str, str] = {}
    for concurrent in (1, *args.concurrent):
        server, base = start(["serve", "--store", str(args.store), "--model", args.model,
                              "--concurrent", str(concurrent), "--queue", str(max(args.clients))])
        try:
            if not alone:  # each question once, alone: the reference answers (and a warm server)
                alone = {q: get(base, "/ask", {"question": q, "mode": args.mode})["text"] for q in ASKED}
            get(base, "/ask", {"question": ASKED[0], "mode": args.mode})  # first-call costs out of the timings
            for clients in args.clients:
                rows = clients_run(base, clients, args.seconds, args.mode)
                run = {"concurrent": concurrent, "clients": clients, **summary(rows, alone)}
                report["runs"].append(run)
                print(json.dumps(run), flush=True)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                tmp = args.out.with_suffix(".tmp")
                tmp.write_text(json.dumps(report, indent=1) + "\n")
                tmp.replace(args.out)
        finally:
            server.terminate()
            server.wait(timeout=60)
    by = {(r["concurrent"], r["clients"]): r for r in report["runs"]}
    report["batched_vs_turns"] = {f"concurrent {n}, {c} clients": round(by[(n, c)]["answers_per_min"] / by[(1, c)]["answers_per_min"], 2)
                                  for n in args.concurrent for c in args.clients}
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["batched_vs_turns"]))


if __name__ == "__main__":
    main()
