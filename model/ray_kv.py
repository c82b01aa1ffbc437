"""KV memory encoded on a Ray cluster: a pool of actors (one per CPU, one torch thread each), each
holding the backbone, writes chunks' memory into the store's KV directory (shared by all nodes;
every entry is written to a temporary name and renamed, so a reader never sees half of one).
The driver refuses up front a memory that would outgrow the byte budget, as without Ray.
"""
from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np

from memstore.cluster import cluster_cpus, connect
from memstore.store import ChunkRecord

KV_BATCH = 8  # chunks per actor call: each call's memory is on disk before the next starts


def encode_on_ray(answerer, model: str, chunks: list[ChunkRecord], address, progress: Callable[[int], None] | None = None) -> int:
    """Encode the memory of the chunks that have none for `answerer`'s backbone; returns how many."""
    todo = answerer.without_memory(chunks)
    answerer.check_budget(todo, len(chunks))
    if not todo:
        return 0
    ray = connect(address)
    actors = cluster_cpus()
    backbone = answerer.backbone
    rows = ray.data.from_items([dict(c.record(), meta=json.dumps(c.meta)) for c in todo],
                               override_num_blocks=min(len(todo), 4 * actors))
    encoded = rows.map_batches(EncodeKV, batch_size=KV_BATCH, num_cpus=1, compute=ray.data.ActorPoolStrategy(size=actors),
                               fn_constructor_kwargs={
                                   "model": model, "weights": backbone.weights, "dtype": str(backbone.model.dtype),
                                   "kv_root": str(answerer.kv_root), "budget_bytes": answerer.kv_budget_bytes,
                                   "kv_dtype": answerer.kv_dtype})
    for batch in encoded.iter_batches(batch_size=None):
        if progress:
            progress(int(np.sum(batch["kv_tokens"])))
    return len(todo)


class EncodeKV:
    """A Ray actor: the backbone, loaded once with the driver's weight format, encoding batches of chunks."""

    def __init__(self, model: str, weights: str, dtype: str, kv_root: str, budget_bytes: int, kv_dtype: str):
        import torch

        from memstore.model.answer import Answerer
        from memstore.model.backbone import load_backbone

        torch.set_num_threads(1)
        backbone = load_backbone(model, weights=weights, dtype=getattr(torch, dtype.removeprefix("torch.")))
        self.answerer = Answerer(backbone, kv_root, kv_budget_bytes=budget_bytes, kv_dtype=kv_dtype)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = list(batch)
        chunks = [ChunkRecord(**{n: _plain(batch[n][i]) for n in names}) for i in range(len(batch["chunk_id"]))]
        for c in chunks:
            c.meta = json.loads(c.meta)
        self.answerer.precompute(chunks, batch=len(chunks))
        return {"chunk_id": batch["chunk_id"], "kv_tokens": np.array([self.answerer.kv_tokens(c) for c in chunks])}


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value
