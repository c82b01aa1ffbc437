"""Long-document QA: SQuAD exact match and F1 per mode and model on newwiki_longdoc.

All 48 documents go into one store (200-token chunks). For a fixed sample of questions
(seed 0), each model answers in these modes:
  closed    no documents at all (what the model knows by itself)
  oracle    the chunk that holds the answer, pasted as text (the ceiling for retrieval)
  truncate  the question's document cut to the model's native window
  rag       the top-k retrieved chunks pasted as text
  memory    the same chunks in memory slots of the KV cache, refilled while decoding
  memory_static  memory slots filled once from the question (retrieve_every=0)
  memory_unbiased  memory mode without the attention bias on the lesser slots (SLOT_BIAS = 0)
  memory_unblended  memory mode without the joint recompute of the slots close to the best
  memory_unfocused  memory mode whose slots not holding the answer's new term keep their bias
  memory_uncovered  memory mode that, asked for several things, reads only the chunks close to the
                    best by score, and not one after another as the answer draws on them
Retrieval hit@k (the answer's char offset inside a retrieved chunk of the right document)
shows how much of the gap to the oracle is retrieval's.

    python bench/qa.py --models smollm2-135m --questions 200 --out bench/results/qa.json
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import string
import time
from pathlib import Path

import memstore
from memstore.model.generate import FOLLOW_SLOTS, SEVERAL_SLOTS, SLOT_BIAS

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MODES = ("closed", "oracle", "truncate", "rag", "memory", "memory_static", "memory_unbiased", "memory_unblended",
         "memory_unfocused", "memory_uncovered", "memory_unkeyed", "memory_unturned")


# ---- SQuAD scoring ---------------------------------------------------------------------------

def normalize(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def f1(prediction: str, truth: str) -> float:
    pred, gold = normalize(prediction).split(), normalize(truth).split()
    common = collections.Counter(pred) & collections.Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def score(prediction: str, answers: list[str]) -> tuple[float, float]:
    em = max(float(normalize(prediction) == normalize(a)) for a in answers)
    return em, max(f1(prediction, a) for a in answers)


# ---- data and store --------------------------------------------------------------------------

def load_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def build_store(path: Path, docs: list[dict]) -> memstore.api.Memory:
    mem = memstore.open(path)
    known = {d["source"] for d in mem.store.documents()}
    for doc in docs:
        if doc["doc_id"] not in known:
            mem.add_text(doc["text"], source=doc["doc_id"], title=doc["title"])
    return mem


def answer_chunk(mem, doc_id: int, answer_char: int):
    with mem.store.engine.connect() as conn:
        from sqlalchemy import select

        from memstore.store.schema import Chunk
        row = conn.execute(select(Chunk.id).where(Chunk.document_id == doc_id, Chunk.char_start <= answer_char,
                                                  Chunk.char_end > answer_char).order_by(Chunk.ordinal)).first()
    return mem.store.get_chunks([row[0]])[0] if row else None


# ---- one run ---------------------------------------------------------------------------------

def run_model(mem, model: str, questions: list[dict], modes: list[str], k: int, retrieval: str,
              max_new_tokens: int, checkpoint=None) -> dict:
    """Answer every question in every mode; `checkpoint(partial_run)` is called every 10 questions."""
    answerer = mem._answerer(model)
    docs = {d["source"]: d["id"] for d in mem.store.documents()}
    rows = {m: [] for m in modes}
    hits = []
    for n, qa in enumerate(questions, 1):
        doc_id = docs[qa["doc_id"]]
        ranked = mem.search(qa["question"], k=k, mode=retrieval)
        hits.append(any(h.document_id == doc_id and h.char_start <= qa["answer_char"] < h.char_end for h in ranked))
        for mode in modes:
            started = time.perf_counter()
            if mode == "closed":
                gen = answerer.decoder.prompt(qa["question"], [], max_new_tokens=max_new_tokens)
            elif mode == "oracle":
                chunk = answer_chunk(mem, doc_id, qa["answer_char"])
                gen = answerer.decoder.prompt(qa["question"], [chunk.text] if chunk else [], max_new_tokens=max_new_tokens)
            else:
                answerer.decoder.slot_bias = 0.0 if mode == "memory_unbiased" else SLOT_BIAS
                answerer.decoder.blend = mode != "memory_unblended"
                answerer.decoder.focus = mode != "memory_unfocused"
                answerer.decoder.cover = mode != "memory_uncovered"
                answerer.decoder.keyed = mode != "memory_unkeyed"
                answerer.decoder.turns = mode != "memory_unturned"
                gen = answerer.ask(qa["question"], lambda text: mem.search(text, k=k + SEVERAL_SLOTS, mode=retrieval),
                                   mode=mode.split("_")[0], k=k, max_new_tokens=max_new_tokens,
                                   retrieve_every=0 if mode == "memory_static" else 1,
                                   document_text=lambda: mem.store.document_text(doc_id),
                                   follow=lambda terms: mem.search(terms, k=k + FOLLOW_SLOTS, mode="lexical"))
            em, f = score(gen.text, qa["answers"])
            rows[mode].append({"id": qa["id"], "em": em, "f1": f, "seconds": round(time.perf_counter() - started, 3),
                               "ttft_s": gen.timings.get("ttft_s"), "text": gen.text,
                               "refills": getattr(gen, "refills", 0)})
        if n % 10 == 0:
            summary = {m: round(100 * sum(r["f1"] for r in rs) / len(rs), 1) for m, rs in rows.items()}
            print(f"{model} {n}/{len(questions)} F1 {summary} load {os.getloadavg()[0]:.1f}", flush=True)
            if checkpoint and n < len(questions):
                checkpoint(summarize(model, retrieval, k, questions, rows, hits, answerer.backbone.weights))
    return summarize(model, retrieval, k, questions, rows, hits, answerer.backbone.weights)


def summarize(model, retrieval, k, questions, rows, hits, weights=None) -> dict:
    table = {mode: mode_table(rs, [{"question": q["question"], "answers": q["answers"], "prediction": r["text"]}
                                   for q, r in list(zip(questions, rs))[:5]])
             for mode, rs in rows.items()}
    return {"model": model, "weights": weights, "retrieval": retrieval, "k": k, f"retrieval_hit@{k}": round(sum(hits) / len(hits), 3),
            "retrieval_hits": dict(zip((q["id"] for q in questions), hits)), "modes": table}


def mode_table(rs: list[dict], examples: list[dict], measured: str | None = None) -> dict:
    ttfts = [r["ttft_s"] for r in rs if r["ttft_s"] is not None]
    return {
        "exact_match": round(100 * sum(r["em"] for r in rs) / len(rs), 1),
        "f1": round(100 * sum(r["f1"] for r in rs) / len(rs), 1),
        "seconds_per_answer": round(sum(r["seconds"] for r in rs) / len(rs), 3),
        "ttft_s": round(sum(ttfts) / len(ttfts), 3) if ttfts else None,
        "questions": len(rs),
        "measured": measured or time.strftime("%Y-%m-%d %H:%M"),
        "examples": examples,
        "answers": rs,  # per question, in sample order: paired comparisons between modes
    }


def combine(paths: list[Path], out: Path) -> None:
    """Join reports of consecutive parts of one sample (a run, then its --skip extensions) into `out`.

    Per model, retrieval and mode the answers are concatenated in the order of `paths` (a question
    answered twice keeps its first answer) and the table is recomputed; the dates measured are kept."""
    reports = [json.loads(p.read_text()) for p in paths]
    joined: dict = {}
    for report in reports:
        for run in report["runs"]:
            into = joined.setdefault((run["model"], run["retrieval"]),
                                     {**run, "modes": {}, "retrieval_hits": {}, "kv_build": []})
            into["retrieval_hits"].update({q: h for q, h in run["retrieval_hits"].items() if q not in into["retrieval_hits"]})
            into["kv_build"] += [run["kv_build"]] if run.get("kv_build") else []  # one per part run
            for mode, table in run["modes"].items():
                acc = into["modes"].setdefault(mode, {"answers": [], "examples": table["examples"], "measured": []})
                seen = {r["id"] for r in acc["answers"]}
                acc["answers"] += [r for r in table["answers"] if r["id"] not in seen]
                acc["measured"].append(table["measured"])
    runs = []
    for run in joined.values():
        k = run["k"]
        hits = list(run["retrieval_hits"].values())
        run[f"retrieval_hit@{k}"] = round(sum(hits) / len(hits), 3)
        run["modes"] = {mode: mode_table(acc["answers"], acc["examples"], ", ".join(sorted(set(acc["measured"]))))
                        for mode, acc in run["modes"].items()}
        runs.append(run)
    last = reports[-1]
    report = {**{key: last[key] for key in ("benchmark", "documents", "chunks", "tokens", "cpus")},
              "date": time.strftime("%Y-%m-%d %H:%M"), "questions": max(r["questions"] for r in reports),
              "joined_from": [p.name for p in paths], "runs": runs}
    out.write_text(json.dumps(report, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m"])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--skip", type=int, default=0,
                        help="leave out the first SKIP questions of the sample (to extend an earlier run)")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--retrieval", default="hybrid", choices=["hybrid", "dense", "lexical"])
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--kv", choices=["precomputed", "lazy"], default="precomputed",
                        help="precomputed: build every chunk's KV memory first, as `memstore ingest --kv` does "
                             "(timed, and only chunks without one are encoded); lazy: encode on first retrieval")
    parser.add_argument("--kv-budget", type=float, default=8.0, help="KV memory budget in GiB")
    parser.add_argument("--store", type=Path, default=Path("bench/data/newwiki-store"))
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=Path("bench/results/qa.json"))
    parser.add_argument("--combine", nargs="+", type=Path, metavar="REPORT",
                        help="only join these reports (a run and its --skip extensions) into --out")
    args = parser.parse_args()
    if args.combine:
        return combine(args.combine, args.out)

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    docs = load_jsonl(args.data / "newwiki_longdoc.docs.jsonl")
    qas = load_jsonl(args.data / "newwiki_longdoc.qas.jsonl")
    questions = random.Random(0).sample(qas, args.questions)[args.skip:]  # a sample's prefix is a smaller sample
    args.store.parent.mkdir(parents=True, exist_ok=True)
    with build_store(args.store, docs) as mem:
        stats, runs = mem.stats(), []
        for m in args.models:  # a partial run is written every 10 questions: an interrupted bench keeps it
            kv_build = mem.build_kv(m, budget_gib=args.kv_budget) if args.kv == "precomputed" else None
            print(m, "kv memory", kv_build, flush=True)
            mem._answerer(m, args.kv_budget)
            run = run_model(mem, m, questions, args.modes, args.k, args.retrieval, args.max_new_tokens,
                            checkpoint=lambda partial: write_report(args, stats, runs + [dict(partial, kv_build=kv_build)]))
            runs.append(dict(run, kv=args.kv, kv_build=kv_build))
            write_report(args, stats, runs)
    for run in runs:
        print(run["model"], run["retrieval"], {m: (t["exact_match"], t["f1"], t["seconds_per_answer"])
                                               for m, t in run["modes"].items()}, f"hit@{run['k']}", run[f"retrieval_hit@{run['k']}"])


def write_report(args, stats: dict, runs: list[dict]) -> None:
    """Write the runs to args.out, keeping other models' runs and other modes of the same model there."""
    report = {"benchmark": "qa", "date": time.strftime("%Y-%m-%d %H:%M"), "questions": args.questions,
              "documents": stats["documents"], "chunks": stats["chunks"], "tokens": stats["tokens"],
              "cpus": os.cpu_count(), "load_average_end": os.getloadavg()[0], "runs": runs}
    if args.out.exists():  # keep other runs, and other modes of the same model and retrieval
        old = {(r["model"], r["retrieval"]): r for r in json.loads(args.out.read_text()).get("runs", [])}
        merged = []
        for run in runs:
            previous = old.pop((run["model"], run["retrieval"]), None)
            merged.append({**run, "modes": {**previous["modes"], **run["modes"]}} if previous else run)
        report["runs"] = list(old.values()) + merged
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(args.out)


if __name__ == "__main__":
    main()
