"""Greedy decoding for every mode, with retrieval before each step in memory mode.

memory:   [prefix][k memory slots][question] -> generate; before every `retrieve_every`
          steps the retriever ranks the memory for the answer written so far, that ranking
          is fused with the question's, and slots whose chunk fell out of the fused top k
          are refilled (then the local tokens are re-run over the new slots).
rag:      the same chunks pasted into the prompt as text: [prefix][chunk texts][question].
truncate: the document text cut to fit the native window, in the prompt.
full:     the whole document text in the prompt, only where it fits.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from memstore.lexical import reciprocal_rank_fusion
from model.memory import SlotCache, SlotLayout, cache_arg, crop_to, encode_chunks, last_logits, prefill

SYSTEM = "Answer the question with a short phrase taken from the documents."
# Added to the attention logits onto every memory slot but the best-ranked chunk's (their
# attention weights times e^-1.5). The best chunk then gets 0.61 of the attention the answer
# pays to the chunks instead of 0.40 (rag: 0.43), and Qwen2.5-0.5B's F1 rises from 38.5 to 45.0
# on bench/qa.py's 200 questions (rag 41.8) and from 27.7 to 32.8 on 40 development questions
# (bench/results/slot_bias.json, where -1.0 scored 37.7 and rag 42.3: not resolved at 40).
SLOT_BIAS = -1.5
DOCS_MARK = "\x00DOCS\x00"
SEPARATOR = "\n\n"
PARAGRAPH_BREAK = "\n\n"


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    chunks: list[dict]  # what the slots (or the prompt) held at the end
    attention: list[float]  # attention mass the answer put on each of `chunks`
    timings: dict = field(default_factory=dict)
    refills: int = 0


class PromptParts:
    """The chat-templated prompt cut around the documents: prefix ids, question ids."""

    def __init__(self, tokenizer, question: str):
        messages = [{"role": "system", "content": SYSTEM},
                    {"role": "user", "content": f"Documents:\n{DOCS_MARK}\nQuestion: {question}"}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        before, after = text.split(DOCS_MARK)
        self.prefix = tokenizer(before, add_special_tokens=False)["input_ids"]
        self.suffix = tokenizer(after, add_special_tokens=False)["input_ids"]


def chunk_token_ids(tokenizer, text: str, limit: int) -> list[int]:
    return tokenizer(text + SEPARATOR, add_special_tokens=False)["input_ids"][:limit]


def eos_ids(tokenizer, model) -> set[int]:
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    ids |= set(gen_eos) if isinstance(gen_eos, (list, tuple)) else {gen_eos}
    for tok in ("<|im_end|>", "<|endoftext|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return {i for i in ids if i is not None}


class Decoder:
    """Holds a backbone and what can be reused across questions (prefix caches)."""

    def __init__(self, model, tokenizer, *, max_positions: int, slot_len: int = 256, slot_bias: float = SLOT_BIAS):
        self.model, self.tokenizer = model, tokenizer
        self.max_positions = max_positions
        self.slot_len = slot_len
        self.slot_bias = slot_bias
        self.eos = eos_ids(tokenizer, model)
        self._prefix_cache: dict[tuple, object] = {}

    # ---- shared pieces ---------------------------------------------------------------------

    def prefix(self, prefix_ids: list[int]):
        key = tuple(prefix_ids)
        if key not in self._prefix_cache:
            self._prefix_cache[key] = prefill(self.model, prefix_ids)
        return self._prefix_cache[key]

    def encode(self, texts: list[str], prefix_ids: list[int]) -> list[np.ndarray]:
        """Memory for chunk texts (un-rotated keys and values), computed after the prefix."""
        ids = [chunk_token_ids(self.tokenizer, t, self.slot_len) for t in texts]
        return encode_chunks(self.model, self.prefix(prefix_ids), ids)

    def _greedy(self, step: Callable, logits: torch.Tensor, max_new_tokens: int, on_token, started: float,
                timings: dict, after_token: Callable | None = None) -> list[int]:
        generated: list[int] = []
        text_so_far = ""
        for _ in range(max_new_tokens):
            token = int(torch.argmax(logits))
            if not generated:
                timings["ttft_s"] = time.perf_counter() - started
            if token in self.eos:
                break
            generated.append(token)
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            if PARAGRAPH_BREAK in text.lstrip():  # the short answer is over; small models repeat it after this
                generated.pop()
                break
            if on_token is not None:
                on_token(text[len(text_so_far):])
                text_so_far = text
            if len(generated) == max_new_tokens:
                break
            logits = (after_token(generated) if after_token else None)
            if logits is None:
                logits = step([token])
        return generated

    # ---- memory mode -----------------------------------------------------------------------

    @torch.no_grad()
    def memory(self, question: str, retrieve: Callable[[str], list[dict]], kv_for: Callable,
               *, k: int, max_new_tokens: int = 32, retrieve_every: int = 1, on_token=None) -> Generation:
        """Generate with k memory slots, refilled by retrieval as decoding goes on.

        retrieve(text) -> ranked chunk dicts (with chunk_id, text); kv_for(chunks, prefix_ids)
        -> their memory arrays (from the KV store, or encoded now).
        """
        started = time.perf_counter()
        timings: dict = {}
        parts = PromptParts(self.tokenizer, question)
        t = time.perf_counter()
        first_ranking = retrieve(question)
        chunks = best_last(first_ranking[:k])
        timings["retrieval_s"] = time.perf_counter() - t
        t = time.perf_counter()
        layout = SlotLayout(len(parts.prefix), max(1, len(chunks)), self.slot_len)
        slots = SlotCache(self.model, self.prefix(parts.prefix), layout)
        for i, kv in enumerate(kv_for(chunks, parts.prefix)):
            slots.fill(i, kv)
        for i in range(len(chunks) - 1):  # best_last: the best chunk is in the last slot, after a refill too
            slots.set_bias(i, self.slot_bias)
        timings["memory_load_s"] = time.perf_counter() - t
        logits, _ = slots.forward(parts.suffix)
        refills = 0
        last_query = ""

        def maybe_refill(generated: list[int]):
            nonlocal chunks, refills, last_query
            if not retrieve_every or len(generated) % retrieve_every:
                return None
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            query = text[:text.rfind(" ")].strip() if " " in text else ""  # the answer's complete words
            if not query or query == last_query:  # retrieval depends only on the text: same words, same slots
                return None
            last_query = query
            t = time.perf_counter()
            # The answer's own ranking fused with the question's: the question's chunks keep their
            # slots unless the answer turns to something else, whose chunk then comes in. A query of
            # question + answer (tried first) is dominated by the question's words and never moved
            # a slot in the two-hop test; answers on bench/qa.py are the same either way for
            # Qwen2.5-0.5B (F1 44.2 vs 44.4 on 100 questions), SmolLM2 loses 1.3 (11.1 vs 12.4).
            ranked = fuse_rankings(retrieve(query), first_ranking)[:len(chunks)]
            timings["retrieval_s"] += time.perf_counter() - t
            new_ids = {c["chunk_id"] for c in ranked}
            if new_ids == {c["chunk_id"] for c in chunks}:
                return None
            chunks = self._refill(slots, chunks, best_last(ranked), kv_for, parts.prefix)
            refills += 1
            slots.drop_local()
            return slots.forward(parts.suffix + generated)[0]

        generated = self._greedy(lambda ids: slots.forward(ids)[0], logits, max_new_tokens,
                                 on_token, started, timings, after_token=maybe_refill)
        timings["generate_s"] = time.perf_counter() - started
        attention = self._slot_attention(slots, parts.suffix, generated)[:len(chunks)]
        return self._result(generated, chunks, attention, timings, started, refills)

    def _refill(self, slots: SlotCache, current: list[dict], target: list[dict], kv_for, prefix_ids) -> list[dict]:
        """Lay `target` out in the slots; a slot whose chunk stays the same keeps its memory."""
        changed = [i for i, c in enumerate(target) if current[i]["chunk_id"] != c["chunk_id"]]
        for i, kv in zip(changed, kv_for([target[i] for i in changed], prefix_ids)):
            slots.fill(i, kv)
        return list(target)

    def _slot_attention(self, slots: SlotCache, suffix: list[int], generated: list[int]) -> list[float]:
        """Attention mass the answer tokens put on each slot (mean over layers and heads)."""
        if not generated:
            return [0.0] * slots.layout.n_slots
        slots.drop_local()
        with eager_attention(self.model):
            _, out = slots.forward(suffix + generated, output_attentions=True)
        return _span_mass(out.attentions, slots.slot_spans(), n_answer=len(generated))

    # ---- prompt modes (rag, truncate, full) ---------------------------------------------------

    @torch.no_grad()
    def prompt(self, question: str, chunks: list[dict], *, max_new_tokens: int = 32, on_token=None,
               timings: dict | None = None, started: float | None = None) -> Generation:
        """Generate with the chunks' texts pasted into the prompt, in order."""
        started = started or time.perf_counter()
        timings = dict(timings or {})
        parts = PromptParts(self.tokenizer, question)
        ids, spans = list(parts.prefix), []
        for c in chunks:
            piece = chunk_token_ids(self.tokenizer, c["text"], c.get("token_limit", self.slot_len))
            spans.append((len(ids), len(ids) + len(piece)))
            ids += piece
        n_context = len(ids)
        ids += parts.suffix
        if len(ids) + max_new_tokens > self.max_positions:
            raise ValueError(f"prompt of {len(ids)} tokens does not fit the model's {self.max_positions}-token window")
        from transformers import DynamicCache

        cache = DynamicCache()

        def step(new_ids):
            return last_logits(self.model, input_ids=torch.tensor([new_ids]), **cache_arg(self.model, cache),
                               use_cache=True)[0]

        logits = step(ids)
        generated = self._greedy(step, logits, max_new_tokens, on_token, started, timings)
        timings["generate_s"] = time.perf_counter() - started
        attention = [0.0] * len(chunks)
        if generated and chunks:
            crop_to(cache, n_context)
            with eager_attention(self.model):
                out = self.model.model(input_ids=torch.tensor([parts.suffix + generated]),
                                       **cache_arg(self.model, cache), use_cache=True, output_attentions=True)
            attention = _span_mass(out.attentions, spans, n_answer=len(generated))
        return self._result(generated, chunks, attention, timings, started, 0)

    def _result(self, generated, chunks, attention, timings, started, refills) -> Generation:
        timings["total_s"] = time.perf_counter() - started
        timings["tokens"] = len(generated)
        gen_time = timings["generate_s"] - timings.get("ttft_s", 0.0)
        timings["tokens_per_s"] = (len(generated) - 1) / gen_time if len(generated) > 1 and gen_time > 0 else None
        text = self.tokenizer.decode(generated, skip_special_tokens=True).strip()
        return Generation(text, generated, chunks, attention, timings, refills)


def best_last(ranked: list[dict]) -> list[dict]:
    """Slot order for ranked chunks: the best one last, nearest the question.

    Needles in a haystack (bench/niah.py): with the best chunk in the first slot, farthest
    from the question, SmolLM2 found 38% of needles; with it last, 62%.
    """
    return list(reversed(ranked))


def fuse_rankings(*rankings: list[dict]) -> list[dict]:
    """Reciprocal rank fusion of ranked chunk lists (by chunk id); ties go to the earlier list."""
    by_id = {c["chunk_id"]: c for ranking in rankings for c in ranking}
    fused = reciprocal_rank_fusion(*[[(c["chunk_id"], 0.0) for c in r] for r in rankings])
    return [by_id[i] for i, _ in fused]


class eager_attention:
    """Switch the model to eager attention (which returns weights) for a block."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.previous = self.model.config._attn_implementation
        self.model.set_attn_implementation("eager")

    def __exit__(self, *exc):
        self.model.set_attn_implementation(self.previous)


def _span_mass(attentions, spans: list[tuple[int, int]], n_answer: int) -> list[float]:
    """Mean attention mass from the answer's query positions onto each key span."""
    # attentions: per layer (1, heads, q_len, kv_len); the queries that produced the answer tokens
    stacked = torch.stack([a[0, :, -n_answer - 1:-1, :] for a in attentions])  # (layers, heads, n_answer, kv_len)
    mean = stacked.float().mean(dim=(0, 1, 2))  # (kv_len,)
    return [float(mean[a:b].sum()) for a, b in spans]
