"""Question answering with citations, in any mode, over a store's chunks and KV memory."""
from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from memstore.errors import DoesNotFitError, InvalidInputError, KVBudgetError
from memstore.model.generate import Decoder, Generation, PromptParts
from memstore.settings import ANSWER_MODES, ANSWER_TOKENS, KV_BUDGET_GIB, TOP_K
from memstore.store import ChunkRecord, Hit
from memstore.store.kv import KVMemory, bytes_per_token

# int8 KV memory gives the same answers as fp16 in about half the bytes (bench/results/kv_precision.json,
# kv_precision_qwen.json).
DEFAULT_KV_DTYPE = "int8"


@dataclass
class Source(ChunkRecord):
    """A chunk the answer read, with the share of the answer's attention on it (memory and rag modes)."""

    attention: float = 0.0
    retrieval_score: float | None = None


@dataclass
class Answer:
    text: str
    sources: list[Source]
    mode: str
    model: str
    timings: dict = field(default_factory=dict)
    refills: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class Answerer:
    """Runs one backbone over one store: retrieval in, answer with ranked sources out."""

    def __init__(self, backbone, kv_root, *, slot_len: int = 256, kv_budget_bytes: int = int(KV_BUDGET_GIB * 2**30),
                 kv_dtype: str = DEFAULT_KV_DTYPE):
        self.backbone = backbone
        self.decoder = Decoder(backbone.model, backbone.tokenizer, max_positions=backbone.max_positions,
                               slot_len=slot_len)
        self.kv_root = kv_root
        self.kv_budget_bytes = kv_budget_bytes
        self.kv_dtype = kv_dtype
        self._kv: dict[str, KVMemory] = {}

    def kv_memory(self, prefix_ids: list[int]) -> KVMemory:
        """The KV store for this model and prompt prefix: memory from another model is never mixed in."""
        digest = hashlib.sha1(np.asarray(prefix_ids, dtype=np.int64).tobytes()).hexdigest()[:10]
        # the weight format is part of the key: int8 or bfloat16 weights compute slightly different memory
        key = f"{self.backbone.name}-{self.backbone.weights}-p{digest}-s{self.decoder.slot_len}"
        if key not in self._kv:
            self._kv[key] = KVMemory(self.kv_root, key, self.kv_budget_bytes, dtype=self.kv_dtype)
        return self._kv[key]

    def kv_for(self, chunks: list[ChunkRecord], prefix_ids: list[int]) -> list[np.ndarray]:
        """Each chunk's memory: read from disk, or encoded now (in one batch) and stored."""
        store = self.kv_memory(prefix_ids)
        found = [store.get(c.chunk_id) for c in chunks]
        missing = [i for i, kv in enumerate(found) if kv is None]
        if missing:
            encoded = self.decoder.encode([chunks[i].text for i in missing], prefix_ids)
            for i, kv in zip(missing, encoded):
                found[i] = store.put(chunks[i].chunk_id, kv)
        return found

    def kv_tokens(self, chunk: ChunkRecord) -> int:
        """Tokens of a chunk's memory: its text, the separator, at most a slot."""
        return min(chunk.token_count + 4, self.decoder.slot_len)

    def stored_memory(self) -> KVMemory:
        """The KV store that memory mode reads chunks from (their prefix does not depend on the question)."""
        return self.kv_memory(PromptParts(self.backbone.tokenizer, "").prefix)

    def without_memory(self, chunks: list[ChunkRecord]) -> list[ChunkRecord]:
        """The chunks whose memory is not stored yet, in their order."""
        kv = self.stored_memory()
        return [c for c in chunks if not kv.path(c.chunk_id).exists()]

    def precompute(self, chunks: list[ChunkRecord], batch: int = 8, progress=None) -> int:
        """Encode the memory of chunks that have none yet; returns how many were encoded.

        Refuses (before any work) when the memory would not fit the KV byte budget. Each batch
        is stored as it is done, so a killed run resumes where it stopped. progress(tokens) is
        called after each batch.
        """
        prefix = PromptParts(self.backbone.tokenizer, "").prefix
        todo = self.without_memory(chunks)
        self.check_budget(todo, len(chunks))
        for start in range(0, len(todo), batch):
            self.kv_for(todo[start:start + batch], prefix)
            if progress:
                progress(sum(self.kv_tokens(c) for c in todo[start:start + batch]))
        return len(todo)

    def check_budget(self, todo: list[ChunkRecord], of: int) -> None:
        """Refuse (KVBudgetError) when encoding `todo` (of `of` chunks asked for) would outgrow the KV byte budget."""
        b = self.backbone
        per_token = bytes_per_token(b.n_layers, b.n_kv_heads, b.head_dim, self.kv_dtype)
        need = self.stored_memory().nbytes() + per_token * sum(self.kv_tokens(c) for c in todo)
        if need > self.kv_budget_bytes:
            raise KVBudgetError(f"KV memory for {of} chunks needs about {need / 2**30:.1f} GiB with "
                                f"{b.name}, over the {self.kv_budget_bytes / 2**30:.1f} GiB budget; "
                                "raise --kv-budget or let memory mode encode chunks lazily")

    def ask(self, question: str, retrieve: Callable[[str], list[Hit]], *, mode: str = "memory", k: int = TOP_K,
            max_new_tokens: int = ANSWER_TOKENS, retrieve_every: int = 1, document_text: Callable[[], str] | None = None,
            on_token=None, follow: Callable[[str], list[Hit]] | None = None) -> Answer:
        if mode not in ANSWER_MODES:
            raise InvalidInputError(f"unknown mode {mode!r}; use one of {', '.join(ANSWER_MODES)}")
        if not question.strip():
            raise InvalidInputError("the question is empty")
        self._check_question_fits(question, max_new_tokens)
        started = time.perf_counter()
        if mode == "memory":
            gen = self.decoder.memory(question, retrieve, self.kv_for, k=k, max_new_tokens=max_new_tokens,
                                      retrieve_every=retrieve_every, on_token=on_token, follow=follow)
            return self._answer(gen, mode, gen.chunks)
        if mode == "rag":
            t = time.perf_counter()
            chunks = retrieve(question)[:k]
            timings = {"retrieval_s": time.perf_counter() - t}
            gen = self.decoder.prompt(question, [c.text for c in chunks], max_new_tokens=max_new_tokens,
                                      on_token=on_token, timings=timings, started=started)
            return self._answer(gen, mode, chunks)
        return self._answer(self._whole_text(question, mode, document_text, max_new_tokens, on_token, started), mode, [])

    def _check_question_fits(self, question: str, max_new_tokens: int) -> None:
        n = len(self.backbone.tokenizer(question, add_special_tokens=False)["input_ids"])
        budget = self.backbone.max_positions // 2
        if n > budget:
            raise DoesNotFitError(f"the question has {n} tokens; at most {budget} fit with room for documents "
                             f"in the {self.backbone.max_positions}-token window")

    def _whole_text(self, question, mode, document_text, max_new_tokens, on_token, started) -> Generation:
        if document_text is None:
            raise InvalidInputError(f"mode {mode!r} needs the document text")
        text = document_text()
        tok = self.backbone.tokenizer
        ids = tok(text, add_special_tokens=False)["input_ids"]
        budget = self.backbone.max_positions - max_new_tokens - 256  # room for the template and question
        if mode == "full" and len(ids) > budget:
            raise DoesNotFitError(f"the documents have {len(ids)} tokens but the window holds {budget}; "
                             "use mode 'memory' or 'rag', or 'truncate'")
        return self.decoder.prompt(question, [tok.decode(ids[:budget])], passage_tokens=budget,
                                   max_new_tokens=max_new_tokens, on_token=on_token, started=started)

    def _answer(self, gen: Generation, mode: str, chunks: list[Hit]) -> Answer:
        """The answer with `chunks` (what it read, attention aligned) as sources, most attended first."""
        total = sum(gen.attention) or 1.0
        ranked = sorted(zip(chunks, gen.attention), key=lambda ca: -ca[1])
        sources = [Source(**c.record(), attention=round(a / total, 4), retrieval_score=c.score) for c, a in ranked]
        return Answer(gen.text, sources, mode, self.backbone.name, gen.timings, gen.refills)
