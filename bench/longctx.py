"""Effective context beyond single needles: a RULER-style suite over real filler, 8k to 1M+ tokens.

Each trial hides facts in a haystack of real text (the filler of bench/niah.py: Paul Graham
essays, then Debian's sqlite3-doc pages, cut into documents of about 500 tokens of --model),
asks one question and scores the answer by string match, as RULER does: the share of the
expected strings that appear in the answer (case-insensitive); for `qa`, 1 when any gold
answer appears.

tasks (values, keys and names are drawn from a seeded generator, so a trial is reproducible):
  niah_number, niah_uuid, niah_word
              one "special magic" fact; its value is a 6-digit number, a UUID or a word
  multikey    the asked key among 7 distractor keys of the same form (half share a word with it)
  multivalue  one key with 4 values spread through the haystack, all to be returned
  multiquery  2-4 keys asked in one question (plus 2 distractor keys)
  vartrack    a chain of 2-4 assignments (VAR B = VAR A) from a 5-digit value, and a distractor
              chain; "which variables hold 48123?" wants every name of the chain
  twohop      A's manager is B; B's locker combination is N (with distractors, A's own locker
              among them); "who is A's manager, and what is that manager's locker combination?"
              scores N (whether B was named is kept as `bridge_named`)
  qa          a development question (../shared/data) with its answer paragraph and 3
              paragraphs of other articles hidden in the filler
  aggregation "Tally word: X." sentences, 3 words 6 times each and 12 words twice; "which three
              occur most often?" Retrieval cannot count; reported as it is.

modes: truncate (the haystack in order cut to the window; slow, so only up to --truncate-max
tokens), rag (the k retrieved chunks pasted as text), memory_once (memory slots filled once
from the question: retrieve_every=0), memory (the API's default memory mode) and
memory_unblended (memory mode without the joint recompute of the slots close to the best) and
memory_unfocused (memory mode whose slots not holding the answer's new term keep their bias),
memory_uncovered (memory mode without the several-things rules: co-facts by the asked key, two
more slots, a slot read once its value is written), memory_unkeyed (memory mode that keeps
look-alike chunks, close by score but lacking the asked key, unbiased) and memory_unturned (memory
mode without the turns: slots that do not name a bridge the answer writes keep their weight, and a
slot whose sentence the answer copied is not read).

10M: the default filler has about 1.2M tokens; `--more-filler` adds folders of .txt/.html files
after it (bench/results/longctx_10m.json used the Python 3.11 and Linux 6.1 documentation
sources: `apt-get download python3.11-doc linux-doc-6.1`, `dpkg-deb -x` each, then the
`html/_sources` folders).

Stores: each length's filler store is built once and cached under bench/data/longctx/
(git-ignored), each length a copy of the previous one plus what it lacks. A trial re-adds the
documents it hides facts in and restores them afterwards. The KV memory starts empty for each
length and fills as chunks are retrieved: a `memory` or `memory_once` answer includes encoding
the chunks it is the first to retrieve (kv_chunks_encoded).

The report is rewritten (atomically) after every trial; with --resume, trials already in it
(same task, length, seed, mode) are kept and not run again, so a run is extended by asking
for more seeds or lengths.

    python bench/longctx.py --lengths 8k 32k --seeds 3             # a first look
    python bench/longctx.py --lengths 8k 32k 128k 1M --seeds 5 --resume
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import bisect  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import string  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import niah  # noqa: E402  (bench/ is on sys.path when this file is run as a script)
from machine import cpu_name  # noqa: E402

import memstore  # noqa: E402
from memstore.model.answer import Answerer  # noqa: E402

DATA = Path("bench/data/longctx")
DEV_DOCS = Path(__file__).resolve().parents[2] / "shared" / "data" / "newwiki_longdoc.docs.jsonl"
DEV_QAS = DEV_DOCS.with_name("newwiki_longdoc.qas.jsonl")
TASKS = ("niah_number", "niah_uuid", "niah_word", "multikey", "multivalue", "multiquery", "vartrack", "twohop",
         "qa", "aggregation")
RETRIEVAL_TASKS = tuple(t for t in TASKS if t != "aggregation")
MODES = ("truncate", "rag", "memory_once", "memory", "memory_unblended", "memory_unfocused", "memory_uncovered",
         "memory_unkeyed", "memory_unturned")
LENGTHS = ("8k", "32k", "128k", "1M")  # and 10M, given --more-filler
DOC_TOKENS = 500  # small filler documents: a trial re-embeds each one it hides a fact in
EFFECTIVE = 0.85  # RULER's threshold for an effective length (Llama-2-7B's score at 4k)

ADJECTIVES = """amber brisk cobalt dusky eager fabled gilded hollow ivory jagged kindly lunar mellow nimble olive
placid quiet russet silent tawny umber velvet wistful yellow zealous ashen bold crimson dapper elder frosty
gentle hazel idle jovial keen lofty misty noble""".split()
NOUNS = """falcon harbor lantern meadow orchard pebble quarry raven saddle thistle urchin valley willow
anchor beacon canyon dagger ember fjord garnet heron island juniper kettle ledger marble nectar osprey
parsnip quill ribbon spindle tundra violet walnut yarrow zephyr""".split()
FIRST = """Anselm Brigida Casimir Delphine Eamon Fenella Gaspard Hedda Ignatius Jolanda Kasper Leocadia Matthias
Nerys Odilon Perpetua Quillon Rosalind Severin Thessaly Ulrike Valentin Wilhelmina Xanthe Yannick Zosia""".split()
LAST = """Abernethy Blackwood Castellano Drummond Eriksdottir Fairweather Grimaldi Haverford Ilves Jankowski
Kettleborough Lindqvist Montague Nakashima Okonkwo Pemberton Quennell Rasmussen Szabo Thorne Underhill
Vasquez Whitlock Yarrow Zeller""".split()


@dataclass
class Case:
    facts: list[str]  # sentences hidden in the haystack
    question: str
    expected: list[str]  # strings the answer must contain
    need_all: bool = True  # score = share of expected found; else 1 if any is found
    needed: int | None = None  # the first `needed` facts answer the question (None: all of them)
    extra: dict = field(default_factory=dict)  # kept in the trial row (e.g. the 2-hop bridge)


# ---- tasks -----------------------------------------------------------------------------------

def _keys(rng: random.Random, n: int, share_with: str | None = None) -> list[str]:
    """n distinct adjective-noun keys; with share_with, about half reuse one of its words."""
    keys: list[str] = []
    while len(keys) < n:
        adj, noun = rng.choice(ADJECTIVES), rng.choice(NOUNS)
        if share_with and len(keys) % 2 == 0:
            a, b = share_with.split("-")
            adj, noun = (a, noun) if rng.random() < 0.5 else (adj, b)
        key = f"{adj}-{noun}"
        if key != share_with and key not in keys:
            keys.append(key)
    return keys


def _number(rng: random.Random, digits: int = 6) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10 ** digits))


def _magic(key: str, value: str, kind: str = "number") -> str:
    return f"One of the special magic {kind}s for {key} is: {value}."


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def task_niah(rng, kind: str) -> Case:
    key = _keys(rng, 1)[0]
    value = {"number": lambda: _number(rng), "uuid": lambda: str(uuid.UUID(int=rng.getrandbits(128), version=4)),
             "word": lambda: rng.choice(NOUNS)}[kind]()
    return Case([_magic(key, value, kind)], f"What is the special magic {kind} for {key}?", [value])


def task_multikey(rng) -> Case:
    key = _keys(rng, 1)[0]
    values = [_number(rng) for _ in range(8)]
    facts = [_magic(k, v) for k, v in zip([key] + _keys(rng, 7, share_with=key), values)]
    return Case(facts, f"What is the special magic number for {key}?", [values[0]], needed=1)


def task_multivalue(rng) -> Case:
    key = _keys(rng, 1)[0]
    values = list(dict.fromkeys(_number(rng) for _ in range(4)))
    return Case([_magic(key, v) for v in values], f"What are all the special magic numbers for {key}?", values)


def task_multiquery(rng) -> Case:
    keys = _keys(rng, rng.randint(2, 4) + 2)
    values = [_number(rng) for _ in keys]
    asked = rng.randint(2, len(keys) - 2)
    facts = [_magic(k, v) for k, v in zip(keys, values)]
    return Case(facts, f"What are the special magic numbers for {_and(keys[:asked])}?", values[:asked], needed=asked)


def _var_name(rng) -> str:
    return "".join(rng.choice(string.ascii_uppercase) for _ in range(5))


def task_vartrack(rng) -> Case:
    names = list(dict.fromkeys(_var_name(rng) for _ in range(12)))
    chain, decoy = names[:rng.randint(2, 4)], names[6:6 + rng.randint(2, 3)]
    value, decoy_value = _number(rng, 5), _number(rng, 5)
    facts = []
    for vars_, val in ((chain, value), (decoy, decoy_value)):
        facts.append(f"VAR {vars_[0]} = {val}.")
        facts += [f"VAR {b} = VAR {a}." for a, b in zip(vars_, vars_[1:])]
    question = (f"Which variables are assigned the value {value}, directly or through another variable? "
                "List them all.")
    return Case(facts, question, chain, needed=len(chain), extra={"chain_length": len(chain)})


def task_twohop(rng) -> Case:
    people = []
    while len(people) < 8:
        name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
        if name not in people and all(name.split()[0] != p.split()[0] for p in people):
            people.append(name)
    a, b = people[0], people[1]
    combo = _number(rng, 4)
    facts = [f"{a}'s manager is {b}.", f"The locker combination of {b} is {combo}.",
             f"The locker combination of {a} is {_number(rng, 4)}."]  # the asked name's own locker: a decoy
    for x, y in zip(people[2:5], people[5:8]):
        facts += [f"{x}'s manager is {y}.", f"The locker combination of {y} is {_number(rng, 4)}."]
    question = f"Who is {a}'s manager, and what is that manager's locker combination?"
    return Case(facts, question, [combo], needed=2, extra={"bridge": b})


def _paragraph_at(text: str, at: int, limit: int = 1200) -> str:
    """The paragraph of `text` that holds char `at`, cut to about `limit` chars around it."""
    start = text.rfind("\n", 0, at) + 1
    end = text.find("\n", at)
    end = len(text) if end < 0 else end
    lo = max(start, min(at - limit // 2, end - limit))
    hi = min(end, lo + limit)
    if lo > start:  # begin at a sentence
        cut = text.find(". ", lo, at)
        lo = cut + 2 if cut >= 0 else lo
    return text[lo:hi].strip()


_DEV: tuple[dict, list] | None = None


def _dev_set() -> tuple[dict, list]:
    global _DEV
    if _DEV is None:
        docs = {d["doc_id"]: d["text"] for d in map(json.loads, DEV_DOCS.open())}
        qas = [q for q in map(json.loads, DEV_QAS.open()) if q["answer_char"] >= 0]
        _DEV = docs, qas
    return _DEV


def task_qa(rng) -> Case:
    docs, qas = _dev_set()
    qa = rng.choice(qas)
    gold = _paragraph_at(docs[qa["doc_id"]], qa["answer_char"])
    others = [d for d in docs if d != qa["doc_id"]]
    distractors = []
    for doc_id in rng.sample(others, 3):
        text = docs[doc_id]
        distractors.append(_paragraph_at(text, rng.randrange(len(text))))
    return Case([gold] + distractors, qa["question"], qa["answers"], need_all=False, needed=1,
                extra={"qa_id": qa["id"]})


def task_aggregation(rng) -> Case:
    words = rng.sample(NOUNS, 15)
    top, rest = words[:3], words[3:]
    facts = [f"Tally word: {w}." for w in top * 6 + rest * 2]
    question = ("Sentences of the form 'Tally word: X.' are spread through the documents. "
                "Which three tally words occur most often?")
    return Case(facts, question, top)


MAKERS = {
    "niah_number": lambda rng: task_niah(rng, "number"), "niah_uuid": lambda rng: task_niah(rng, "uuid"),
    "niah_word": lambda rng: task_niah(rng, "word"), "multikey": task_multikey, "multivalue": task_multivalue,
    "multiquery": task_multiquery, "vartrack": task_vartrack, "twohop": task_twohop, "qa": task_qa,
    "aggregation": task_aggregation,
}


def make_case(task: str, length: int, seed: int) -> Case:
    return MAKERS[task](random.Random(f"{task}/{length}/{seed}"))


def score(case: Case, answer: str) -> float:
    text = answer.lower()
    hits = [e.lower() in text for e in case.expected]
    return sum(hits) / len(hits) if case.need_all else float(any(hits))


# ---- hiding facts in the haystack --------------------------------------------------------------

def place_facts(case: Case, docs: list, cum: list[int], rng: random.Random) -> dict[int, str]:
    """Each fact at a uniformly random depth: {document index: its text with the facts inserted}."""
    total = cum[-1]
    by_host: dict[int, list[tuple[float, str]]] = {}
    for fact in case.facts:
        pos = rng.random() * total
        host = min(bisect.bisect_right(cum, pos) - 1, len(docs) - 1)
        by_host.setdefault(host, []).append(((pos - cum[host]) / max(1, docs[host].tokens), fact))
    texts = {}
    for host, placed in by_host.items():
        text = docs[host].text
        for fraction, fact in sorted(placed, reverse=True):  # from the end, so earlier fractions stay valid
            text, _ = niah.insert_needle(text, fraction, fact)
        texts[host] = text
    return texts


def fact_chunks(mem, doc_ids: list[int], facts: list[str]) -> list[set[int]]:
    """For each fact, the ids of the chunks that hold it (whole, else its first 40 characters)."""
    from sqlalchemy import select

    from memstore.store.schema import Chunk
    with mem.store.engine.connect() as conn:
        rows = conn.execute(select(Chunk.id, Chunk.text).where(Chunk.document_id.in_(doc_ids))).all()
    return [{i for i, t in rows if f in t} or {i for i, t in rows if f[:40] in t} for f in facts]


def haystack_text(docs: list, texts: dict[int, str], tokens_needed: int) -> str:
    parts, n = [], 0
    for i, doc in enumerate(docs):
        parts.append(texts.get(i, doc.text).strip())
        n += doc.tokens
        if n > tokens_needed:
            break
    return "\n\n".join(parts)


# ---- one trial ---------------------------------------------------------------------------------

def run_trial(mem, answerer, docs, cum, task: str, length: int, seed: int, modes, args) -> list[dict]:
    case = make_case(task, length, seed)
    texts = place_facts(case, docs, cum, random.Random(f"place/{task}/{length}/{seed}"))
    t = time.perf_counter()
    doc_ids = [mem.add_text(text, source=docs[i].source, title=docs[i].title) for i, text in texts.items()]
    insert_s = time.perf_counter() - t
    try:
        holders = fact_chunks(mem, doc_ids, case.facts)[:case.needed]
        base = dict(task=task, length=cum[-1], length_label=niah.label(length), seed=seed, question=case.question,
                    expected=case.expected, facts=len(case.facts), insert_s=round(insert_s, 2), **case.extra)
        rows = []
        for mode in modes:
            if mode == "truncate" and length > args.truncate_max:
                continue
            before = niah.kv_files(mem)
            if mode == "truncate":
                budget = answerer.backbone.max_positions - args.max_new_tokens - 256  # as Answerer._whole_text
                ans = answerer.ask(case.question, lambda _: [], mode="truncate", max_new_tokens=args.max_new_tokens,
                                   document_text=lambda: haystack_text(docs, texts, budget + 512))
            else:
                answerer.decoder.blend = mode != "memory_unblended"
                answerer.decoder.focus = mode != "memory_unfocused"
                answerer.decoder.cover = mode != "memory_uncovered"
                answerer.decoder.keyed = mode != "memory_unkeyed"
                answerer.decoder.turns = mode != "memory_unturned"
                ans = mem.ask(case.question, model=args.model, mode="rag" if mode == "rag" else "memory", k=args.k,
                              max_new_tokens=args.max_new_tokens, retrieve_every=0 if mode == "memory_once" else 1)
            seen = {s.chunk_id for s in ans.sources}
            t = ans.timings
            row = dict(base, mode=mode, score=round(score(case, ans.text), 4), answer=ans.text,
                       needed_facts_in_sources=None if mode == "truncate" else round(
                           sum(bool(h & seen) for h in holders) / len(holders), 3),
                       total_s=niah._round(t.get("total_s"), 3), ttft_s=niah._round(t.get("ttft_s"), 3),
                       tokens=t.get("tokens"), refills=ans.refills,
                       kv_chunks_encoded=niah.kv_files(mem) - before)
            if "bridge" in case.extra:
                row["bridge_named"] = case.extra["bridge"].lower() in ans.text.lower()
            rows.append(row)
        return rows
    finally:
        for i in texts:
            mem.add_text(docs[i].text, source=docs[i].source, title=docs[i].title)  # restore the filler


# ---- the report --------------------------------------------------------------------------------

def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return round(sum(xs) / len(xs), 4) if xs else None


def _median(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return round(statistics.median(xs), 3) if xs else None


def effective_length(by_length: dict[int, float]) -> int | None:
    """The longest length up to which every measured length scores at least EFFECTIVE (RULER)."""
    best = None
    for length in sorted(by_length):
        if by_length[length] < EFFECTIVE:
            break
        best = length
    return best


def summarize(rows: list[dict]) -> dict:
    summary = {}
    for mode in dict.fromkeys(r["mode"] for r in rows):
        mine = [r for r in rows if r["mode"] == mode]
        cells, effective = {}, {}
        for task in dict.fromkeys(r["task"] for r in mine):
            per_len = {}
            for label in sorted({r["length_label"] for r in mine if r["task"] == task}, key=niah.parse_length):
                cell = [r for r in mine if r["task"] == task and r["length_label"] == label]
                per_len[label] = {"score": _mean(r["score"] for r in cell), "trials": len(cell),
                                  "needed_facts_in_sources": _mean(r["needed_facts_in_sources"] for r in cell),
                                  "median_total_s": _median(r["total_s"] for r in cell)}
            cells[task] = per_len
            longest = effective_length({niah.parse_length(lb): c["score"] for lb, c in per_len.items()})
            effective[task] = niah.label(longest) if longest else None
        labels = sorted({r["length_label"] for r in mine}, key=niah.parse_length)
        retrieval_mean = {}
        for label in labels:
            scores = [cells[t][label]["score"] for t in RETRIEVAL_TASKS if label in cells.get(t, {})]
            retrieval_mean[label] = _mean(scores)
        summary[mode] = {"cells": cells, "effective_length": effective, "retrieval_tasks_mean": retrieval_mean,
                         "median_total_s": _median(r["total_s"] for r in mine),
                         "median_ttft_s": _median(r["ttft_s"] for r in mine), "trials": len(mine)}
    return summary


def heatmap(summary_mode: dict, title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cells = summary_mode["cells"]
    tasks = [t for t in TASKS if t in cells]
    labels = sorted({lb for c in cells.values() for lb in c}, key=niah.parse_length)
    acc = np.full((len(tasks), len(labels)), np.nan)
    for i, t in enumerate(tasks):
        for j, lb in enumerate(labels):
            if lb in cells[t]:
                acc[i, j] = cells[t][lb]["score"]
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 3, 0.45 * len(tasks) + 1.6))
    im = ax.imshow(acc, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    for i, t in enumerate(tasks):
        for j, lb in enumerate(labels):
            if lb in cells[t]:
                ax.text(j, i, f"{100 * cells[t][lb]['score']:.0f}", ha="center", va="center", fontsize=9)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_xlabel("haystack tokens")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="score")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def trial_key(row: dict) -> tuple:
    return row["task"], row["length_label"], row["seed"], row["mode"]


# ---- main --------------------------------------------------------------------------------------

def load_model(args):
    scratch = niah.own_folder(DATA, "scratch")
    shutil.rmtree(scratch, ignore_errors=True)
    mem = memstore.open(scratch)  # only to load the model and warm it up
    answerer = mem._answerer(args.model)
    mem.add_text("A short note about nothing in particular. " * 20, source="warmup")
    for mode in ("memory", "rag"):
        mem.ask("What is this about?", model=args.model, mode=mode, max_new_tokens=4)
    mem.close()
    shutil.rmtree(scratch, ignore_errors=True)
    return answerer


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", nargs="+", default=list(LENGTHS), help="haystack tokens, e.g. 8k 128k 1M")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--seeds", type=int, default=3, help="trials per task and length (seeds 0..N-1)")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--model", default="qwen2.5-0.5b")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--truncate-max", type=niah.parse_length, default=niah.parse_length("8k"),
                        help="run truncate only up to this length (its prefill grows with the window)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    parser.add_argument("--filler", nargs="+", type=Path, default=None,
                        help="filler files (default: the PG essays and sqlite3-doc pages of bench/niah.py)")
    parser.add_argument("--more-filler", nargs="+", type=Path, default=[], metavar="DIR",
                        help="folders whose .txt and .html files follow the filler (10M needs about 9M more tokens)")
    parser.add_argument("--data", type=Path, default=DATA, help="where filler stores are cached")
    parser.add_argument("--build-only", action="store_true", help="build the filler stores and stop")
    parser.add_argument("--resume", action="store_true", help="keep the trials already in --out, run the rest")
    parser.add_argument("--out", type=Path, default=Path("bench/results/longctx.json"))
    parser.add_argument("--combine", nargs="+", type=Path, default=None, metavar="REPORT",
                        help="only join these reports (runs of one setting split by length or task) into --out")
    return parser.parse_args(argv)


def combine(paths: list[Path], out: Path) -> dict:
    """One report from several (a trial run twice keeps its first row): stores, trials and summary."""
    reports = [json.loads(p.read_text()) for p in paths]
    rows, seen = [], set()
    for r in reports:
        for row in r["trials"]:
            if trial_key(row) not in seen:
                seen.add(trial_key(row))
                rows.append(row)
    report = dict(reports[0], stores=[s for r in reports for s in r["stores"]], trials=rows, summary=summarize(rows),
                  total_s=max(r.get("total_s", 0) for r in reports), combined_from=[str(p) for p in paths])
    write_json(out, report)
    return report


def run(args) -> dict:
    import faiss
    import torch
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    global DATA
    DATA = args.data
    DATA.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    answerer = load_model(args)
    tokenizer = answerer.backbone.tokenizer
    lengths = sorted(niah.parse_length(x) for x in args.lengths)
    files = (args.filler or niah.filler_files(niah.PG_DIR, niah.SQLITE_DIR)) + [
        path for folder in args.more_filler for path in sorted(folder.rglob("*")) if path.suffix in (".txt", ".html")]
    docs = niah.filler_documents(files, tokenizer, lengths[-1], DOC_TOKENS, prefix="longctx")
    cum = [0]
    for d in docs:
        cum.append(cum[-1] + d.tokens)
    niah.log(started, f"filler: {len(docs)} documents, {cum[-1]} tokens")

    rows = json.loads(args.out.read_text())["trials"] if args.resume and args.out.exists() else []
    done = {trial_key(r) for r in rows}
    report = {"benchmark": "longctx", "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
              "machine": {"cpu": cpu_name(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "torch": torch.__version__, "load_avg_start": niah.load_avg()},
              "settings": {"model": answerer.backbone.name, "window": answerer.backbone.max_positions, "k": args.k,
                           "max_new_tokens": args.max_new_tokens, "document_tokens": DOC_TOKENS,
                           "truncate_max": args.truncate_max, "retrieval": "hybrid (API default)",
                           "scoring": "share of expected strings in the answer (qa: any gold answer)",
                           "effective": f"longest length up to which every length scores >= {EFFECTIVE}"},
              "stores": []}
    previous = None
    for length in lengths:
        n = bisect.bisect_left(cum, length)
        hay = docs[:n]
        snap, embed_s = niah.filler_store(hay, previous, started, data=DATA)
        previous = snap
        if args.build_only:
            niah.log(started, f"store for {niah.label(length)}: {snap} (embedded now in {embed_s:.0f}s)")
            continue
        todo = [(t, s, m) for t in args.tasks for s in range(args.first_seed, args.first_seed + args.seeds)
                for m in args.modes if (t, niah.label(length), s, m) not in done
                and not (m == "truncate" and length > args.truncate_max)]
        report["stores"].append({"length": niah.label(length), "tokens": cum[n], "documents": n,
                                 "embed_s_this_run": round(embed_s, 1)})
        if not todo:
            continue
        run_dir = niah.own_folder(DATA, "run")
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.copytree(snap, run_dir, ignore=shutil.ignore_patterns("kv", "write.lock"))
        mem = memstore.open(run_dir)
        prefix_cache = answerer.decoder._prefix_cache
        answerer = Answerer(answerer.backbone, mem.store.kv_dir)  # this store's KV memory, the same model
        answerer.decoder._prefix_cache = prefix_cache
        mem._answerers[args.model] = answerer
        niah.log(started, f"length {niah.label(length)}: {n} documents, {cum[n]} tokens, "
                          f"{mem.stats()['chunks']} chunks (embedded now in {embed_s:.0f}s)")
        for task in args.tasks:
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                modes = [m for m in args.modes if (task, niah.label(length), seed, m) not in done]
                if not modes:
                    continue
                trial = run_trial(mem, answerer, hay, cum[:n + 1], task, length, seed, modes, args)
                rows += trial
                niah.log(started, f"  {niah.label(length)} {task} s{seed}: " + "  ".join(
                    f"{r['mode']}={r['score']:.2f}/{r['needed_facts_in_sources']} {r['total_s']:.1f}s" for r in trial)
                    + f"  | {trial[-1]['answer'][:60]!r}" if trial else "")
                report.update(summary=summarize(rows), trials=rows, total_s=round(time.perf_counter() - started, 1))
                write_json(args.out, report)
        mem.close()
        shutil.rmtree(run_dir, ignore_errors=True)
    if args.build_only:  # no trials: the report in --out stays as it was
        return report
    report.update(summary=summarize(rows), trials=rows, total_s=round(time.perf_counter() - started, 1))
    report["machine"]["load_avg_end"] = niah.load_avg()
    write_json(args.out, report)
    return report


def main() -> None:
    args = parse_args()
    report = combine(args.combine, args.out) if args.combine else run(args)
    for mode, s in report.get("summary", {}).items():
        heatmap(s, f"{mode} ({report['settings']['model']}, k={args.k})",
                args.out.with_name(f"{args.out.stem}_{mode}.png"))
        print(mode, json.dumps({"retrieval_tasks_mean": s["retrieval_tasks_mean"],
                                "effective": s["effective_length"], "median_total_s": s["median_total_s"]}))


if __name__ == "__main__":
    main()
