"""One decoding step after a plain prompt (rag, truncate, full modes), with and without an explicit
all-zero attention mask: torch's CPU attention kernel takes another path for one query when a mask
is given. Interleaved round by round, per preset and cache length. Adds its run to
bench/results/prompt_step_mask.json under --label (runs with ATEN_CPU_CAPABILITY=avx2 or
MEMSTORE_WEIGHTS=float32 set are worth a label of their own).

    python bench/prompt_step_mask.py [--models qwen2.5-0.5b smollm2-135m] [--label native]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_features, cpu_name  # noqa: E402

from memstore.model.backbone import load_backbone  # noqa: E402
from memstore.model.generate import one_query_mask  # noqa: E402
from memstore.model.memory import cache_arg, last_logits, prefill  # noqa: E402


def step_ms(model, entries: int, rounds: int = 15) -> dict:
    caches = {way: prefill(model, list(range(100, 100 + entries))) for way in ("no mask", "zero mask")}
    times: dict[str, list[float]] = {way: [] for way in caches}
    with torch.no_grad():
        for _ in range(rounds):
            for way, cache in caches.items():
                extra = one_query_mask(cache, 1) if way == "zero mask" else {}
                started = time.perf_counter()
                last_logits(model, input_ids=torch.tensor([[42]]), **cache_arg(model, cache), use_cache=True, **extra)
                times[way].append(time.perf_counter() - started)
    found = {way: round(1000 * statistics.median(t), 1) for way, t in times.items()}
    return {**found, "speedup": round(found["no mask"] / found["zero mask"], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["qwen2.5-0.5b", "smollm2-135m"])
    parser.add_argument("--label", default="native")
    parser.add_argument("--out", type=Path, default=Path("bench/results/prompt_step_mask.json"))
    args = parser.parse_args()
    report = json.loads(args.out.read_text()) if args.out.exists() else {}
    report.update(cpu=cpu_name(), cpu_features=cpu_features(), threads=torch.get_num_threads())
    report[args.label] = {}
    for name in args.models:
        backbone = load_backbone(name)
        for entries in (500, 1000, 2000):
            report[args.label][f"{name}, {entries} tokens"] = found = step_ms(backbone.model, entries)
            print(name, entries, found, flush=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
