"""Dev-set check of the exact-match rule's fallback (MemoryStore._lexical_side): where no single
candidate holds every rare word, the holders of the question's rarest named word go first when at
most lexical.SOLE_HOLDERS chunks hold it. Three rankings of the same hybrid candidates per question:

  before     the single-holder rule alone (the rule before the fallback)
  any_word   the fallback over any query word (not only named ones)
  shipped    what Memory.search returns (the fallback over named words)

on the 2,000 development questions of bench/retrieval.py's dev section (its store, built there
with --workdir bench/data/retrieval). Hit = the chunk holding the answer's char offset.

    python bench/retrieval.py --sections dev --workdir bench/data/retrieval   # builds the store once
    python bench/sole_holders.py
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import retrieval as R  # bench/ is on sys.path when this file is run as a script
from machine import cpu_name

import memstore
from memstore.store import HYBRID_CANDIDATES, lexical


def rankings(mem, question: str, vector, n: int) -> dict[str, list[int]]:
    scored = mem.store.hybrid_scores(vector, question, n)
    original = scored.lexical_top[:n]  # the fallback appends its holders after bm25's own top n
    keep = {i for i, _ in scored.dense_top} | {i for i, _ in original}
    full = lexical.full_score_fusion({i: v for i, v in scored.dense.items() if i in keep},
                                     {i: v for i, v in scored.lexical.items() if i in keep})
    with mem.store.engine.connect() as conn:
        holders = lexical.holding_all(conn, scored.rare, [i for i, _ in original]) if scored.rare else set()
        out = {"before": lexical.exact_match_first(full, holders if len(holders) == 1 else set())}
        if len(holders) != 1:
            prepared = lexical.prepare(conn, question)
            any_word = lexical.sole_holders(conn, prepared, set(prepared.terms))
            extra = lexical.scores(conn, prepared, [i for i in any_word if i not in keep])
            dense = {**scored.dense, **mem.store._dense_scores(vector, [i for i in extra if i not in scored.dense])}
            widened = lexical.full_score_fusion({i: v for i, v in dense.items() if i in keep | set(extra)},
                                                {**{i: v for i, v in scored.lexical.items() if i in keep}, **extra})
            out["any_word"] = lexical.exact_match_first(widened, any_word)
        else:
            out["any_word"] = out["before"]
    return {name: [i for i, _ in ranked[:R.K]] for name, ranked in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, default=Path("bench/data/retrieval/dev"))
    parser.add_argument("--questions", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=Path("bench/results/retrieval_sole_holders.json"))
    args = parser.parse_args()
    started = time.perf_counter()
    mem = memstore.open(args.store)
    chunks = R.all_chunks(mem.store)
    qas = [json.loads(line) for line in open(f"{R.DATA}.qas.jsonl")]
    sample = R.questions_sample(qas, args.questions, 0, 0)
    ranks: dict[str, list] = {"before": [], "any_word": [], "shipped": []}
    changed = {"any_word": 0, "shipped": 0}
    for q in sample:
        doc, pos = q["doc_id"], q["answer_char"]

        def hit(i):
            return chunks[i]["source"] == doc and chunks[i]["start"] <= pos < chunks[i]["end"]

        vector = mem.embedder.encode([q["question"]])[0]
        lists = rankings(mem, q["question"], vector, HYBRID_CANDIDATES)
        lists["shipped"] = [h.chunk_id for h in mem.search(q["question"], k=R.K)]
        for name in changed:
            changed[name] += lists[name] != lists["before"]
        for name, ids in lists.items():
            ranks[name].append(R.first_rank(ids, hit))
    report = {"benchmark": "sole_holders", "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "cpu": cpu_name(),
              "questions": len(sample), "rankings_changed_from_before": changed,
              "metrics": {name: R.rank_metrics(r) for name, r in ranks.items()},
              "seconds": round(time.perf_counter() - started, 1)}
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
