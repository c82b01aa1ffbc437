"""Ingest and KV-encode throughput in one process and on Ray clusters, side by side in one run.

    python bench/scale.py [--repeat 3] [--kv-model smollm2-135m] [--kv-files 6]

The corpus: the development set's 48 Wikipedia articles (../shared/data), cut into files of about
20k characters, `--repeat` copies under different names. Each configuration ingests it into a fresh
store: one process (torch on every core); Ray with one node of 2 CPUs; one node of 1 CPU; two nodes of
1 CPU each (Ray's test cluster: all nodes on this machine, each actor one torch thread). Throughput is
chunks/s over the whole ingest call (actor start-up and model loads included; the cluster is started
before). Then the KV memory of a few files' chunks is encoded with --kv-model in one process and on
one and two one-CPU nodes. Writes bench/results/scale.json after each configuration.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import cpu_features, cpu_name  # noqa: E402

from memstore.api import Memory  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT.parent / "shared" / "data" / "newwiki_longdoc.docs.jsonl"
OUT = ROOT / "bench" / "results" / "scale.json"
FILE_CHARS = 20_000
CLUSTERS = {  # name -> CPUs of each node (None: no Ray, one process)
    "one_process": None,
    "ray_1_node_2_cpus": [2],
    "ray_1_node_1_cpu": [1],
    "ray_2_nodes_1_cpu_each": [1, 1],
}


def build_corpus(dest: Path, repeat: int) -> Path:
    """The articles cut at paragraph ends into files of about FILE_CHARS characters, `repeat` times."""
    dest.mkdir(parents=True, exist_ok=True)
    for line in DOCS.read_text().splitlines():
        doc = json.loads(line)
        parts, current = [], ""
        for para in doc["text"].split("\n"):
            current += para + "\n"
            if len(current) >= FILE_CHARS:
                parts.append(current)
                current = ""
        parts += [current] if current.strip() else []
        for copy in range(repeat):
            for i, part in enumerate(parts):
                name = f"{doc['doc_id']}-{copy}-{i}.txt".replace("/", "_")
                (dest / name).write_text(f"{doc['title']}\n\n{part}")
    return dest


class RayCluster:
    """Ray's own multi-node test cluster on this machine, joined by this process."""

    def __init__(self, cpus: list[int]):
        import ray
        from ray.cluster_utils import Cluster

        self.ray = ray
        self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus[0]})
        for n in cpus[1:]:
            self.cluster.add_node(num_cpus=n)
        ray.init(address=self.cluster.address)
        self.address = self.cluster.address

    def close(self) -> None:
        self.ray.shutdown()
        self.cluster.shutdown()


def ingest_run(corpus: Path, store: Path, address: str | None) -> dict:
    with Memory(store, create=True) as mem:
        assert mem.embedder.dim  # the driver's embedder (tokenizer) loads before the clock starts, as in one process
        commits = []
        started = time.perf_counter()
        summary = mem.ingest(corpus, ray=address, on_commit=lambda done, total: commits.append(time.perf_counter()))
        seconds = time.perf_counter() - started
        assert summary["files_failed"] == 0, summary["failed"]
    first = commits[0] - started  # start-up: model loads (Ray: every actor's and reader's imports and loads)
    return {"files": summary["files_ingested"], "chunks": summary["chunks_added"], "tokens": summary["tokens_added"],
            "seconds": round(seconds, 2), "chunks_per_s": round(summary["chunks_added"] / seconds, 2),
            "first_commit_s": round(first, 2), "after_first_commit_chunks_per_s": round(summary["chunks_added"] / (seconds - first), 2)}


def kv_run(store: Path, model: str, address: str | None) -> dict:
    with Memory(store) as mem:
        answerer = mem._answerer(model)  # the driver's model loads before the clock starts
        shutil.rmtree(answerer.stored_memory().dir)
        answerer.stored_memory().dir.mkdir(parents=True)
        started = time.perf_counter()
        out = mem.build_kv(model, ray=address)
        seconds = time.perf_counter() - started
    return {"chunks": out["encoded"], "tokens": out["tokens"], "weights": out["weights"], "seconds": round(seconds, 2),
            "tokens_per_s": round(out["tokens"] / seconds, 1)}


def on_cluster(cpus: list[int] | None, work):
    if cpus is None:
        return work(None)
    cluster = RayCluster(cpus)
    try:
        return work(cluster.address)
    finally:
        cluster.close()


def save(result: dict) -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    tmp = OUT.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, OUT)


def ratios(runs: dict, key: str) -> dict:
    def r(a, b):
        return round(runs[a][key] / runs[b][key], 3) if a in runs and b in runs else None

    return {"key": key, "ray_1_node_vs_one_process": r("ray_1_node_2_cpus", "one_process"),
            "two_1_cpu_nodes_vs_one": r("ray_2_nodes_1_cpu_each", "ray_1_node_1_cpu")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3, help="copies of the corpus (more: longer runs, less start-up share)")
    ap.add_argument("--kv-model", default="smollm2-135m")
    ap.add_argument("--kv-files", type=int, default=6, help="files whose chunks the KV runs encode")
    ap.add_argument("--configs", nargs="*", default=list(CLUSTERS), choices=list(CLUSTERS))
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="memstore-scale-"))
    corpus = build_corpus(work / "corpus", args.repeat)
    result = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "cpu": cpu_name(),
              "cpu_features": cpu_features(), "cores": os.cpu_count(), "corpus": f"{DOCS.name}, {args.repeat} copies",
              "files": len(list(corpus.iterdir())), "ingest": {}, "kv": {}}
    for name in args.configs:
        result["ingest"][name] = on_cluster(CLUSTERS[name], lambda a: ingest_run(corpus, work / name, a))
        result["ingest_ratios"] = ratios(result["ingest"], "chunks_per_s")
        result["ingest_ratios_after_first_commit"] = ratios(result["ingest"], "after_first_commit_chunks_per_s")
        save(result)
        print(name, result["ingest"][name], flush=True)

    kv_corpus = work / "kv_corpus"
    kv_corpus.mkdir()
    for path in sorted(corpus.iterdir())[:args.kv_files]:
        shutil.copy(path, kv_corpus)
    with Memory(work / "kv_store", create=True) as mem:
        mem.ingest(kv_corpus)
    result["kv_model"] = args.kv_model
    for name in ("one_process", "ray_1_node_1_cpu", "ray_2_nodes_1_cpu_each"):
        result["kv"][name] = on_cluster(CLUSTERS[name], lambda a: kv_run(work / "kv_store", args.kv_model, a))
        result["kv_ratios"] = ratios(result["kv"], "tokens_per_s")
        save(result)
        print("kv", name, result["kv"][name], flush=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
