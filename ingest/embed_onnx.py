"""A sentence-transformers embedder run by ONNX Runtime: the same vectors as torch, several times faster.

The model's Transformer is exported to ONNX once per machine (`torch.onnx.export`, eager attention)
into `$MEMSTORE_CACHE/models/onnx/`, through a temporary folder renamed into place, and read by
ONNX Runtime from then on; pooling and normalization follow the folder's sentence-transformers
modules. Two formats:

- float32: the exact model (vectors within 1e-6 of sentence-transformers'), run 8 texts at a time:
  bench/results/embed_formats.json has the speed against torch at the old batch of 64 and at 8;
- int8: weights int8 per output channel, activations quantized per run. Their scale is taken over
  the whole run, so a text's vector would depend on the texts it is batched with: int8 runs one
  text at a time, which keeps every vector a function of its text alone (a query and the same text
  ingested get the same vector).

`auto` takes int8 where it is clearly faster than float32 on this CPU (`faster_format`: both
timed once per machine and model, on one thread, cached on disk): on the development set its
vectors found the same chunks (bench/results/embed_formats.json), so speed decides.

Only folders whose modules are a Transformer, a mean or CLS Pooling and an optional Normalize can
be run this way; `UnsupportedLayout` says why another cannot, and the caller falls back to torch.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memstore.errors import BackendMissingError
from memstore.paths import models_dir

EXPORT_VERSION = 1  # bump when the exported graph changes: old files are then ignored
INT8_MARGIN = 1.2  # int8 is taken only where it is at least this much faster than float32
FLOAT32_BATCH = 8  # texts per run: larger batches spill out of cache (bench/results/embed_formats.json)


class UnsupportedLayout(BackendMissingError):
    """The folder's sentence-transformers modules are not a Transformer + mean/CLS pooling."""


@dataclass(frozen=True)
class Layout:
    transformer: Path  # the Hugging Face model and tokenizer
    pooling: str  # "mean" or "cls"
    max_length: int  # tokens per text, special tokens included


def read_layout(folder: Path) -> Layout:
    """Where the Transformer is, how its token vectors are pooled, and the length texts are cut to."""
    modules_file = folder / "modules.json"
    if not modules_file.exists():
        raise UnsupportedLayout(f"{folder} has no modules.json (not a sentence-transformers folder)")
    modules = json.loads(modules_file.read_text())
    kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
    if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        raise UnsupportedLayout(f"{folder}: modules {kinds}, not Transformer, Pooling[, Normalize]")
    transformer = folder / modules[0]["path"]
    pooling_config = json.loads((folder / modules[1]["path"] / "config.json").read_text())
    modes = [name for name, on in pooling_config.items() if name.startswith("pooling_mode_") and on]
    if modes == ["pooling_mode_mean_tokens"]:
        pooling = "mean"
    elif modes == ["pooling_mode_cls_token"]:
        pooling = "cls"
    else:
        raise UnsupportedLayout(f"{folder}: pooling {modes}, not mean or CLS")
    config_file = next((p / "sentence_bert_config.json" for p in (transformer, folder)
                        if (p / "sentence_bert_config.json").exists()), None)
    max_length = json.loads(config_file.read_text()).get("max_seq_length") if config_file else None
    return Layout(transformer, pooling, int(max_length or 512))


def model_file(layout: Layout, fmt: str) -> Path:
    """The exported (and for int8, quantized) model: made on first use, then read from the cache."""
    weights = next((layout.transformer / n for n in ("model.safetensors", "pytorch_model.bin")
                    if (layout.transformer / n).exists()), None)
    if weights is None:
        raise UnsupportedLayout(f"{layout.transformer} holds no model.safetensors or pytorch_model.bin")
    stat = weights.stat()
    key = hashlib.sha1(f"{EXPORT_VERSION}|{weights.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    dest = models_dir() / "onnx" / f"{key[:16]}-{fmt}.onnx"
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    float32 = model_file(layout, "float32") if fmt == "int8" else None  # int8 is quantized from it; both are kept
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".export-") as tmp:
        made = Path(tmp) / f"{fmt}.onnx"
        if float32 is None:
            _export(layout.transformer, made)
        else:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            root = logging.getLogger()
            level, root.level = root.level, logging.ERROR  # its advice to pre-process, on the root logger
            try:
                # reduce_range: 7-bit weights, so CPUs without VNNI (AVX2's 16-bit sums) cannot saturate
                quantize_dynamic(float32, made, weight_type=QuantType.QInt8, per_channel=True, reduce_range=True)
            finally:
                root.level = level
        os.replace(made, dest)  # atomic: a killed export leaves only the temporary folder, removed
    return dest


def _export(transformer: Path, out: Path) -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(str(transformer), local_files_only=True, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(str(transformer), local_files_only=True)
    sample = tokenizer(["a first text", "and a second, longer text"], padding=True, return_tensors="pt")
    names = [n for n in tokenizer.model_input_names if n in sample]

    class LastHidden(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *inputs):
            return self.model(**dict(zip(names, inputs, strict=True))).last_hidden_state

    axes = {name: {0: "batch", 1: "tokens"} for name in [*names, "hidden"]}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracing notes
        torch.onnx.export(LastHidden(), tuple(sample[n] for n in names), str(out), dynamo=False,
                          input_names=names, output_names=["hidden"], dynamic_axes=axes, opset_version=17)


class OnnxEncoder:
    """Normalized sentence vectors from an exported model, `threads` runs at a time."""

    def __init__(self, folder: Path, fmt: str, threads: int):
        from transformers import AutoTokenizer

        self.layout = read_layout(folder)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.layout.transformer), local_files_only=True)
        self.path = model_file(self.layout, fmt)
        self.session = self._session()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="embed") if threads > 1 else None
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.dim = int(self.session.get_outputs()[0].shape[-1])
        self.batch = 1 if fmt == "int8" else FLOAT32_BATCH

    def _session(self):
        """One ONNX Runtime thread per run, `threads` runs at once: a small model's matmuls split over
        threads wait on each other (two one-thread runs embedded 1.17x the chunks/s of one two-thread
        run, int8 on two cores)."""
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # ONNX Runtime's notes about graph fusions are not the user's business
        return onnxruntime.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])

    def encode(self, texts: list[str]) -> np.ndarray:
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # similar lengths pad little
        batches = [order[start:start + self.batch] for start in range(0, len(order), self.batch)]
        # tokenized here, in one thread: a fast tokenizer resets its padding state on every call and
        # refuses calls from two threads at once ("Already borrowed")
        encoded = [self._tokenize([texts[i] for i in rows]) for rows in batches]
        results = self._pool.map(self._vectors, encoded) if self._pool and len(batches) > 1 else map(self._vectors, encoded)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for rows, vectors in zip(batches, results, strict=True):
            out[rows] = vectors
        return out

    def _tokenize(self, texts: list[str]) -> dict:
        return self.tokenizer(texts, padding=True, truncation=True, max_length=self.layout.max_length,
                              return_tensors="np")

    def _vectors(self, enc: dict) -> np.ndarray:
        hidden = self.session.run(None, {n: enc[n].astype(np.int64) for n in self.inputs})[0]
        if self.layout.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = enc["attention_mask"][..., None].astype(np.float32)
            pooled = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.maximum(norms, 1e-12)).astype(np.float32)


def faster_format(folder: Path) -> str:
    """"int8" where this CPU runs the int8 model at least INT8_MARGIN times faster than float32, else "float32"."""
    layout = read_layout(folder)
    path = models_dir() / "embed-probe.json"
    key = f"{EXPORT_VERSION}|{model_file(layout, 'float32').name}|{_cpu_key()}"
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if key not in cached:
        cached[key] = _time_formats(folder)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(cached))
        tmp.replace(path)
    ms = cached[key]
    return "int8" if ms["int8"] * INT8_MARGIN <= ms["float32"] else "float32"


def _cpu_key() -> str:
    import onnxruntime

    flags = ""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        pass
    return hashlib.sha1(f"{flags}|{onnxruntime.__version__}".encode()).hexdigest()[:16]


def _time_formats(folder: Path) -> dict:
    """Milliseconds per text of each format, best of three passes over the same 16 chunk-sized texts."""
    import time

    words = "the store keeps every chunk of a document with its vector and its place in the text".split()
    texts = [" ".join(words[(i + j) % len(words)] for j in range(150)) for i in range(16)]
    timed = {}
    for fmt in ("float32", "int8"):
        encoder = OnnxEncoder(folder, fmt, threads=1)
        encoder.encode(texts[:2])
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            encoder.encode(texts)
            best = min(best, time.perf_counter() - t)
        timed[fmt] = round(best * 1000 / len(texts), 3)
    return timed
