"""Speed per preset and weight format: prefill, decode and KV-encode tokens/s, the decode bound
that memory bandwidth sets, and cold and warm answer times per mode on the demo's bundled pages.

Decoding one token reads every weight once, so tokens/s cannot beat (memory bandwidth) / (bytes
of weights read per token); the report gives that bound and the share of it each format reaches.
Each ISA runs in its own process: `native` is this CPU as it is, `avx2` caps torch, oneDNN and
MKL at AVX2 (bfloat16 then emulated, as on a CPU without AVX-512 BF16 or AMX), to see on one
machine, side by side, what an AVX2-only CPU gets. Memory bandwidth is the same machine's in both.

    python bench/speed.py --presets smollm2-135m qwen2.5-0.5b --out bench/results/speed.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_qa import QUESTIONS  # noqa: E402
from machine import cpu_name  # noqa: E402

AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
FORMATS = ("float32", "bfloat16", "int8")
TEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "newwiki_longdoc.docs.jsonl"


def cpu_flags() -> list[str]:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "avx_vnni")
    return [f for f in flags.split(":", 1)[1].split() if f in wanted]


def read_bandwidth_gbs(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes per second that a threaded sum over a large float32 tensor reads (what decoding does to weights)."""
    x = torch.ones(int(gib * 2**30 / 4))
    x.sum()
    best = min(_seconds(x.sum) for _ in range(repeats))
    return x.numel() * 4 / best / 1e9


def _seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def weight_bytes_per_token(model) -> int:
    """Bytes of the matrices one decoding step reads: every Linear (the LM head included), in its format."""
    from memstore.model.quant import Int8Linear

    total = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
        elif isinstance(m, Int8Linear):
            total += m.weight_int8.numel() + m.scale.numel() * m.scale.element_size()
    return total


@torch.no_grad()
def model_speed(preset: str, fmt: str, text_ids: list[int], chunk_ids: list[list[int]],
                reference: torch.Tensor | None) -> dict:
    from transformers import DynamicCache

    from memstore.model.backbone import load_backbone
    from memstore.model.generate import Decoder, PromptParts
    from memstore.model.memory import cache_arg, last_logits

    started = time.perf_counter()
    b = load_backbone(preset, weights=fmt)
    load_s = time.perf_counter() - started
    m = b.model
    ids = torch.tensor([text_ids])
    m.model(input_ids=ids[:, :16])  # first-call costs out of the timings
    prefill_s = min(_seconds(lambda: m.model(input_ids=ids)) for _ in range(2))
    hidden = m.model(input_ids=ids).last_hidden_state[0]
    top = torch.stack([m.lm_head(hidden[i:i + 1].to(m.dtype))[0].argmax() for i in range(len(hidden))])
    cache = DynamicCache()
    logits, _ = last_logits(m, input_ids=ids[:, :100], **cache_arg(m, cache), use_cache=True)
    n, t = 48, time.perf_counter()
    for _ in range(n):
        token = int(logits.argmax())
        logits, _ = last_logits(m, input_ids=torch.tensor([[token]]), **cache_arg(m, cache), use_cache=True)
    decode = n / (time.perf_counter() - t)
    decoder = Decoder(m, b.tokenizer, max_positions=b.max_positions)
    prefix = PromptParts(b.tokenizer, "").prefix
    chunks = [b.tokenizer.decode(ids) for ids in chunk_ids]
    decoder.encode(chunks[:1], prefix)
    t = time.perf_counter()
    encoded = decoder.encode(chunks, prefix)
    kv_tps = sum(e.shape[3] for e in encoded) / (time.perf_counter() - t)
    return {
        "preset": preset, "format": b.weights, "compute_dtype": str(m.dtype).removeprefix("torch."),
        "load_s": round(load_s, 2), "weight_bytes_per_token": weight_bytes_per_token(m),
        "prefill_tokens": len(text_ids), "prefill_tokens_per_s": round(len(text_ids) / prefill_s, 1),
        "decode_tokens_per_s": round(decode, 2), "kv_encode_tokens_per_s": round(kv_tps, 1),
        "top1_agreement_with_float32": None if reference is None else round(float((top == reference).float().mean()), 4),
        "_top": top,
    }


def answer_times(preset: str, fmt: str, store_root: Path, questions: list[str], k: int = 4) -> dict:
    """Cold (no chunk's KV memory encoded yet) and warm (second ask) answer times per mode, model loaded."""
    import memstore
    from memstore.model.answer import Answerer
    from memstore.model.backbone import load_backbone

    store = store_root / "store"
    mem = memstore.open(store, create=False)
    kv_dir = Path(tempfile.mkdtemp(prefix="kv-", dir=store_root))
    answerer = Answerer(load_backbone(preset, weights=fmt), kv_dir)

    def retrieve(text):
        return mem.search(text, k=k)

    def follow(terms):
        return mem.search(terms, k=k + 2, mode="lexical")

    answerer.ask("What is SQLite?", retrieve, mode="rag", k=k, max_new_tokens=4)  # first-call costs out
    rows = []
    for q in questions:
        for state in ("cold", "warm"):
            for mode in ("memory", "rag"):
                a = answerer.ask(q, retrieve, mode=mode, k=k, max_new_tokens=48, follow=follow)
                rows.append({"question": q, "mode": mode, "state": state, "total_s": round(a.timings["total_s"], 3),
                             "ttft_s": round(a.timings.get("ttft_s") or 0.0, 3), "tokens": a.timings["tokens"],
                             "tokens_per_s": a.timings.get("tokens_per_s"), "refills": a.refills,
                             "answer": a.text})
    mem.close()
    shutil.rmtree(kv_dir, ignore_errors=True)
    summary = {}
    for mode in ("memory", "rag"):
        for state in ("cold", "warm"):
            sel = [r for r in rows if r["mode"] == mode and r["state"] == state]
            summary[f"{mode}/{state}"] = {"median_total_s": round(statistics.median(r["total_s"] for r in sel), 3),
                                          "median_ttft_s": round(statistics.median(r["ttft_s"] for r in sel), 3),
                                          "max_ttft_s": max(r["ttft_s"] for r in sel),
                                          "median_decode_tokens_per_s": _median_rate(sel)}
    return {"preset": preset, "format": fmt, "summary": summary, "rows": rows}


def _median_rate(rows: list[dict]) -> float | None:
    """Median decoding rate after the first token, over answers of more than one token."""
    rates = [r["tokens_per_s"] for r in rows if r["tokens_per_s"]]
    return round(statistics.median(rates), 2) if rates else None


def build_demo_store(root: Path) -> None:
    import memstore
    from memstore.demo import bundled_pages

    with memstore.open(root / "store") as mem:
        mem.ingest([str(p) for p in bundled_pages()])


def measure(args) -> dict:
    from memstore.model.quant import probe

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    text = json.loads(TEXT.open().readline())["text"]
    out = {"isa": args.isa, "cpu": cpu_name(), "flags": cpu_flags(), "torch_threads": torch.get_num_threads(),
           "read_bandwidth_gbs": round(read_bandwidth_gbs(), 2), "probe": probe().__dict__, "models": [],
           "answers": []}
    bandwidth = out["read_bandwidth_gbs"] * 1e9
    from memstore.model.backbone import load_backbone

    for preset in args.presets:
        tok = load_backbone(preset, weights="float32").tokenizer
        all_ids = tok(text)["input_ids"]
        text_ids = all_ids[:args.prefill_tokens]
        chunk_ids = [all_ids[i * 200:(i + 1) * 200] for i in range(8)]  # 8 chunks of 200 tokens, one batch
        assert len(all_ids) >= 1600, "the KV-encode batch needs a longer text"
        reference = None
        for fmt in args.formats:
            row = model_speed(preset, fmt, text_ids, chunk_ids, reference)
            if fmt == "float32":
                reference = row["_top"]
            row.pop("_top")
            row["decode_bound_tokens_per_s"] = round(bandwidth / row["weight_bytes_per_token"], 1)
            row["decode_share_of_bound"] = round(row["decode_tokens_per_s"] / row["decode_bound_tokens_per_s"], 3)
            out["models"].append(row)
            print(json.dumps(row), flush=True)
    if args.answers:
        root = Path(tempfile.mkdtemp(prefix="speed-"))
        try:
            build_demo_store(root)
            for preset in args.presets:
                for fmt in args.answer_formats:
                    res = answer_times(preset, fmt, root, [q for q, _, _ in QUESTIONS][:args.questions])
                    out["answers"].append(res)
                    print(preset, fmt, json.dumps(res["summary"]), flush=True)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return out


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4), squeeze=False)
    for ax, run in zip(axes[0], runs):
        rows = run["models"]
        labels = [f"{r['preset']}\n{r['format']}" for r in rows]
        x = range(len(rows))
        ax.bar(x, [r["decode_tokens_per_s"] for r in rows], color="tab:blue", label="decode tokens/s")
        ax.scatter(x, [r["decode_bound_tokens_per_s"] for r in rows], marker="_", s=400, color="black",
                   label="bandwidth bound")
        ax.set_xticks(list(x), labels, fontsize=6, rotation=45, ha="right")
        ax.set_yscale("log")
        ax.set_title(f"{run['isa']}: {run['cpu']}, {run['torch_threads']} threads", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["smollm2-135m", "qwen2.5-0.5b"])
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--isas", nargs="+", default=["native", "avx2"], choices=["native", "avx2"])
    parser.add_argument("--prefill-tokens", type=int, default=256)
    parser.add_argument("--answers", action=argparse.BooleanOptionalAction, default=True,
                        help="also time cold and warm answers on the bundled demo pages")
    parser.add_argument("--answer-formats", nargs="+", default=["auto"], help="weight formats to answer with")
    parser.add_argument("--questions", type=int, default=10)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: every core, as users run)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/speed.json"))
    parser.add_argument("--isa", default=None, help=argparse.SUPPRESS)  # set in the per-ISA child process
    parser.add_argument("--child-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.isa:  # child: measure and write
        args.child_out.write_text(json.dumps(measure(args)))
        return
    runs = []
    for isa in args.isas:
        child_out = Path(tempfile.mkstemp(suffix=".json")[1])
        env = {**os.environ, **(AVX2_ONLY if isa == "avx2" else {})}
        cmd = [sys.executable, __file__, "--isa", isa, "--child-out", str(child_out), "--presets", *args.presets,
               "--formats", *args.formats, "--prefill-tokens", str(args.prefill_tokens),
               "--answer-formats", *args.answer_formats, "--questions", str(args.questions),
               "--threads", str(args.threads), "--answers" if args.answers else "--no-answers"]
        subprocess.run(cmd, env=env, check=True)
        runs.append(json.loads(child_out.read_text()))
        child_out.unlink()
        report = {"benchmark": "speed", "date": time.strftime("%Y-%m-%d %H:%M"), "runs": runs,
                  "load_average": os.getloadavg()[0]}
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1))
        tmp.replace(args.out)
    plot(report, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
