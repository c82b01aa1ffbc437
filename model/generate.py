"""Greedy decoding for every mode; in memory mode the answer steers what is read next.

memory:   [prefix][follow slots][k memory slots][question] -> generate; the k slots hold the
          question's chunks (best last); every `retrieve_every` steps the answer's new terms
          (names, numbers, variables the question lacks) are searched, and the chunk holding
          them comes into a follow slot (then the local tokens are re-run over it).
rag:      the same chunks pasted into the prompt as text: [prefix][chunk texts][question].
truncate: the document text cut to fit the native window, in the prompt.
full:     the whole document text in the prompt, only where it fits.
"""
from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from memstore.errors import DoesNotFitError
from memstore.model.batching import DecodeStep, StepBatcher
from memstore.model.memory import SlotCache, SlotLayout, cache_arg, crop_to, encode_chunks, last_logits, prefill
from memstore.settings import ANSWER_TOKENS
from memstore.store import Hit
from memstore.store.lexical import STOPWORDS, query_terms

SYSTEM = "Answer the question with a short phrase taken from the documents."
# Added to the attention logits onto every memory slot but the best-ranked chunk's (their
# attention weights times e^-1.5): the best chunk then gets more of the attention the answer pays
# to the chunks than in rag, and QA F1 rises to rag's level (bench/results/slot_bias.json, qa.json).
SLOT_BIAS = -1.5
# Slots whose chunk scores at least this share of the best chunk's score get no bias (close_to_best).
CO_BEST = 0.6
# Where the question asks for several things and several slots hold chunks close to the best one,
# those slots' tokens are recomputed together once filled (SlotCache.blend), so each chunk reads
# the others as it would in one prompt: bench/results/longctx_before_focus.json, memory against
# memory_unblended. Blending for every question cost QA answers (longctx_blend_everywhere.json,
# qa_runs/i_blend_everywhere.json), so single-fact questions keep chunks read alone.
BLEND = True
# English cues of a question that asks for several things: "all", "both", "list", a plural
# "what are ...", or a second question joined by ", and what ...".
SEVERAL = re.compile(r"\b(all|both|list|each|every)\b|^\s*(what|which|who|where)\s+(are|were)\b"
                     r"|,\s*and\s+(what|who|which|where|when|how)\b|\b(what|which)\s+\w+s\s+(are|were)\b", re.I)
# Where the answer names a new term that brings a follow in, the slots that do not hold it are biased
# down (Follows._steer): bench/results/longctx.json, memory against memory_unfocused.
FOCUS = True
# Where the question asks for several things, every chunk holding the asked key's words is read as a
# fact (close_chunks), and a slot whose value the answer has written is biased down, so the next item
# is read from the others (Follows._steer): bench/results/longctx_cover.json, memory against
# memory_uncovered.
COVER = True
# Where the question asks for one thing, a chunk scoring close to the best that lacks the question
# words the best holds is a look-alike and keeps its bias (close_chunks).
KEYED = True
# The answer turns (Follows): where it names a new term that held slots mention in different sentences
# (a two-hop bridge, a variable's link), the slots that do not mention it are biased down; where it
# ends a sentence copied from slots, those slots are (the answer has read it and must not copy on into
# the source's next sentence). bench/results/longctx_turns.json, memory against memory_unturned.
TURNS = True
# A sentence of the answer shorter than this (in words) is not taken for one copied from a slot.
MIN_COPIED_WORDS = 4
# Memory slots that the answer's own new terms fill (AnswerReader), besides the question's k.
FOLLOW_SLOTS = 2
# Where the question asks for several things (and COVER), up to this many of the chunks ranked just
# below the k come into slots of their own if they hold another fact asked for (close_chunks): a
# fourth value ranked fifth in three of the multi-value misses, behind two overlapping chunks that
# held the same value (bench/results/longctx_cover.json). Callers retrieve k + SEVERAL_SLOTS.
SEVERAL_SLOTS = 2
# An answer's last word shorter than this is never completed from the sources (a count "3" is not
# a cut "3.35.0"): see completion.
MIN_CUT_WORD = 6
DOCS_MARK = "\x00DOCS\x00"
SEPARATOR = "\n\n"
PARAGRAPH_BREAK = "\n\n"


@dataclass
class GoOn:
    """Where the model would stop, logits to go on with, on trial: what follows is kept only if it
    writes one of `needs` (terms) before it ends a sentence or the answer."""
    logits: torch.Tensor
    needs: set[str]


@dataclass
class _Trial:
    tokens: int  # the answer's tokens and text where it would have ended
    chars: int
    needs: set[str]
    unsent: list[str] = field(default_factory=list)  # what went on, not yet streamed

    def wrote_what_it_needs(self, text: str) -> bool:
        return bool(set(_terms(text[self.chars:])) & self.needs)

    def ended_a_sentence(self, text: str) -> bool:
        return re.search(r"[.!?]\s|[^\W\d][.!?]$", text[self.chars:]) is not None


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    chunks: list[Hit]  # what the slots held at the end (prompt modes: none, the caller knows its passages)
    attention: list[float]  # attention mass the answer put on each of `chunks` (prompt modes: on each passage)
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

    def __init__(self, model, tokenizer, *, max_positions: int, slot_len: int = 256, slot_bias: float = SLOT_BIAS,
                 blend: bool = BLEND, focus: bool = FOCUS, cover: bool = COVER, keyed: bool = KEYED,
                 turns: bool = TURNS):
        self.model, self.tokenizer = model, tokenizer
        self.max_positions = max_positions
        self.slot_len = slot_len
        self.slot_bias = slot_bias
        self.blend = blend
        self.focus = focus
        self.cover = cover
        self.keyed = keyed
        self.turns = turns
        self.eos = eos_ids(tokenizer, model)
        self._prefix_cache: dict[tuple, object] = {}
        # answers may run in several threads: one forward pass at a time, their decoding steps batched
        self.lock = threading.RLock()
        self.batcher = StepBatcher(model, self.lock)

    # ---- shared pieces ---------------------------------------------------------------------

    def prefix(self, prefix_ids: list[int]):
        key = tuple(prefix_ids)
        with self.lock:
            if key not in self._prefix_cache:
                self._prefix_cache[key] = prefill(self.model, prefix_ids)
        return self._prefix_cache[key]

    def encode(self, texts: list[str], prefix_ids: list[int]) -> list[np.ndarray]:
        """Memory for chunk texts (un-rotated keys and values), computed after the prefix."""
        ids = [chunk_token_ids(self.tokenizer, t, self.slot_len) for t in texts]
        with self.lock:
            return encode_chunks(self.model, self.prefix(prefix_ids), ids)

    def _slot_step(self, slots: SlotCache, token: int) -> torch.Tensor:
        """The logits after one generated token, batched with the other answers' steps."""
        position, bias = slots.next_position()
        return self.batcher.step(DecodeStep(slots.cache, token, position, bias, solo=lambda: slots.forward([token])[0]))

    def _greedy(self, step: Callable, logits: torch.Tensor, max_new_tokens: int, on_token, started: float,
                timings: dict, on_end: Callable | None = None, sources: Callable[[], list[str]] | None = None
                ) -> list[int]:
        """Greedy tokens until EOS, a paragraph break or the limit; step(new ids, generated) -> next logits.

        on_end(generated, logits) -> logits to go on with, a GoOn (going on on trial), or None: asked
        when the model would stop (EOS). sources() -> the texts the answer reads: an answer that stops
        inside a number or code copied from them ends with the rest of it (`completion`)."""
        generated: list[int] = []
        text_so_far = ""
        trial: _Trial | None = None
        at_eos = False
        while len(generated) < max_new_tokens:
            token = int(torch.argmax(logits))
            if "ttft_s" not in timings:
                timings["ttft_s"] = time.perf_counter() - started
            if token in self.eos:
                again = on_end(generated, logits) if on_end and generated and trial is None else None
                if isinstance(again, GoOn):
                    trial, logits = _Trial(len(generated), len(text_so_far), again.needs), again.logits
                    continue
                if again is not None:
                    logits = again
                    continue
                at_eos = True
                break
            generated.append(token)
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            if PARAGRAPH_BREAK in text.lstrip():  # the short answer is over; small models repeat it after this
                generated.pop()
                break
            piece, text_so_far = text[len(text_so_far):], text
            if trial is not None:
                trial.unsent.append(piece)
                if trial.wrote_what_it_needs(text):
                    piece, trial = "".join(trial.unsent), None
                elif trial.ended_a_sentence(text):
                    break
            if trial is None and on_token is not None:
                on_token(piece)
            if len(generated) == max_new_tokens:
                break
            logits = step([token], generated)
        if trial is not None:  # it went on but wrote nothing it had to: it ends where it would have
            generated, at_eos = generated[:trial.tokens], True
        if at_eos and sources and generated:
            rest = completion(self.tokenizer.decode(generated, skip_special_tokens=True), sources())
            generated += self.tokenizer(rest, add_special_tokens=False)["input_ids"] if rest else []
            if rest and on_token is not None:
                on_token(rest)
        return generated

    # ---- memory mode -----------------------------------------------------------------------

    @torch.no_grad()
    def memory(self, question: str, retrieve: Callable[[str], list[Hit]], kv_for: Callable,
               *, k: int, max_new_tokens: int = ANSWER_TOKENS, retrieve_every: int = 1, on_token=None,
               follow: Callable[[str], list[Hit]] | None = None, follow_slots: int = FOLLOW_SLOTS) -> Generation:
        """Generate with k memory slots filled from the question, and follow slots that the answer fills.

        retrieve(text) -> ranked hits (k + SEVERAL_SLOTS of them, for the chunks just below k that a
        question asking for several things may take in); kv_for(chunks, prefix_ids)
        -> their memory arrays (from the KV store, or encoded now). follow(text) -> chunks that
        hold the words of `text` (a lexical search; defaults to `retrieve`). Every
        `retrieve_every` steps (0: never) the answer's complete words are read: when it has
        written a term that the question and earlier follows do not have (a name, a number, a
        variable), the best chunk holding that term that no slot holds yet comes into the next
        follow slot (the oldest one is replaced once all are used), and the local tokens are
        re-run over it. So what the model writes steers what it reads next.
        """
        started = time.perf_counter()
        timings: dict = {}
        parts = PromptParts(self.tokenizer, question)
        t = time.perf_counter()
        ranked = retrieve(question)
        several = self.cover and asks_for_several(question)
        extra = more_facts(question, ranked[:k], ranked[k:k + SEVERAL_SLOTS]) if several else []
        chunks = best_last(ranked[:k] + extra)
        timings["retrieval_s"] = time.perf_counter() - t
        t = time.perf_counter()
        n_follow = follow_slots if retrieve_every else 0
        with self.lock:
            slots = self._memory_slots(question, parts, chunks, kv_for, n_follow, timings)
            timings["memory_load_s"] = time.perf_counter() - t
            logits, _ = slots.forward(parts.suffix)
        follows = Follows(self, slots, parts, [None] * n_follow + list(chunks), kv_for,
                          AnswerReader(question, follow or retrieve, n_follow), timings, several=several,
                          key=asked_key(question, chunks[-1]) if chunks else set())

        def step(ids: list[int], generated: list[int]) -> torch.Tensor:
            logits = follows.refill(generated) if n_follow and len(generated) % retrieve_every == 0 else None
            return self._slot_step(slots, ids[0]) if logits is None else logits

        # at the end of the answer its last word is complete too: what it names may be read before it stops
        with self.batcher.member():
            generated = self._greedy(step, logits, max_new_tokens, on_token, started, timings,
                                     on_end=follows.at_end if n_follow else None,
                                     sources=lambda: [c.text for c in follows.held if c])
        timings["generate_s"] = time.perf_counter() - started
        kept = [(i, c) for i, c in enumerate(follows.held) if c is not None]
        with self.lock:
            attention = self._slot_attention(slots, parts.suffix, generated)
        return self._result(generated, [c for _, c in kept], [attention[i] for i, _ in kept], timings, started,
                            follows.reader.follows)

    def _memory_slots(self, question: str, parts: PromptParts, chunks: list[Hit], kv_for: Callable, n_follow: int,
                      timings: dict) -> SlotCache:
        """The slot cache with the question's chunks in the last slots (follow slots first, empty), the
        chunks far from the best one biased down, and the close ones read together where asked for."""
        layout = SlotLayout(len(parts.prefix), n_follow + max(1, len(chunks)), self.slot_len)
        slots = SlotCache(self.model, self.prefix(parts.prefix), layout)
        for i, kv in enumerate(kv_for(chunks, parts.prefix)):
            slots.fill(n_follow + i, kv)  # follow slots first: the question's best chunk stays nearest the question
        close = close_chunks(question, chunks, by_key=self.cover, one_fact_key=self.keyed)
        for i in range(len(chunks) - 1):
            if i not in close:
                slots.set_bias(n_follow + i, self.slot_bias)
        if self.blend and len(close) > 1 and asks_for_several(question):  # let the facts' chunks read each other
            slots.blend({n_follow + i: chunk_token_ids(self.tokenizer, chunks[i].text, self.slot_len)
                         for i in close})
            timings["blended_tokens"] = sum(slots.slot_tokens[n_follow + i] for i in close)
        return slots

    def _slot_attention(self, slots: SlotCache, suffix: list[int], generated: list[int]) -> list[float]:
        """Attention mass the answer tokens put on each slot (mean over layers and heads).

        The queries that wrote the answer (the question's last token's and every answer token's but
        the last) are run once more, with attention weights, over the cache as decoding left it."""
        if not generated:
            return [0.0] * slots.layout.n_slots
        again = suffix[-1:] + generated
        if not slots.keep_local(len(suffix) - 1):
            slots.drop_local()
            again = suffix + generated
        with eager_attention(self.model):
            _, out = slots.forward(again, output_attentions=True)
        return _span_mass(out.attentions, slots.slot_spans(), n_answer=len(generated))

    # ---- prompt modes (rag, truncate, full) ---------------------------------------------------

    @torch.no_grad()
    def prompt(self, question: str, passages: list[str], *, passage_tokens: int | None = None,
               max_new_tokens: int = ANSWER_TOKENS, on_token=None, timings: dict | None = None,
               started: float | None = None) -> Generation:
        """Generate with the passages pasted into the prompt, in order, each cut to `passage_tokens`
        (default: a slot's length, as memory mode reads a chunk)."""
        started = started or time.perf_counter()
        timings = dict(timings or {})
        parts = PromptParts(self.tokenizer, question)
        ids, spans = list(parts.prefix), []
        for passage in passages:
            piece = chunk_token_ids(self.tokenizer, passage, passage_tokens or self.slot_len)
            spans.append((len(ids), len(ids) + len(piece)))
            ids += piece
        ids += parts.suffix
        if len(ids) + max_new_tokens > self.max_positions:
            raise DoesNotFitError(f"prompt of {len(ids)} tokens does not fit the model's {self.max_positions}-token window")
        from transformers import DynamicCache

        cache = DynamicCache()

        def run(new_ids):
            return last_logits(self.model, input_ids=torch.tensor([new_ids]), **cache_arg(self.model, cache),
                               use_cache=True, **one_query_mask(cache, len(new_ids)))[0]

        def step(new_ids, generated):
            n = cache.get_seq_length()
            return self.batcher.step(DecodeStep(cache, new_ids[0], n, torch.zeros(n), solo=lambda: run(new_ids)))

        with self.lock:
            logits = run(ids)
        with self.batcher.member():
            generated = self._greedy(step, logits, max_new_tokens, on_token, started, timings,
                                     sources=lambda: passages)
        timings["generate_s"] = time.perf_counter() - started
        attention = [0.0] * len(passages)
        if generated and passages:
            crop_to(cache, len(ids) - 1)  # the answer's queries again (as in _slot_attention), with weights
            with self.lock, eager_attention(self.model):
                out = self.model.model(input_ids=torch.tensor([ids[-1:] + generated]),
                                       **cache_arg(self.model, cache), use_cache=True, output_attentions=True)
            attention = _span_mass(out.attentions, spans, n_answer=len(generated))
        return self._result(generated, [], attention, timings, started, 0)

    def _result(self, generated, chunks, attention, timings, started, refills) -> Generation:
        timings["total_s"] = time.perf_counter() - started
        timings["tokens"] = len(generated)
        gen_time = timings["generate_s"] - timings.get("ttft_s", 0.0)
        timings["tokens_per_s"] = (len(generated) - 1) / gen_time if len(generated) > 1 and gen_time > 0 else None
        text = self.tokenizer.decode(generated, skip_special_tokens=True).strip()
        return Generation(text, generated, chunks, attention, timings, refills)


def one_query_mask(cache, n_new: int) -> dict:
    """For one new token after a cache: an explicit all-zero mask and its position. With a mask given,
    torch's CPU attention kernel takes a faster path for a single query than without one (a decoding
    step of Qwen2.5-0.5B after 1,000 tokens: 44 against 62 ms; bench/results/prompt_step_mask.json)."""
    if n_new != 1 or cache.get_seq_length() == 0:
        return {}
    n = cache.get_seq_length()
    return {"attention_mask": torch.zeros(1, 1, 1, n + 1, dtype=cache.layers[0].keys.dtype),
            "position_ids": torch.tensor([[n]])}


def asks_for_several(question: str) -> bool:
    """Whether the question asks for several things (English cues only: see SEVERAL)."""
    return SEVERAL.search(question) is not None


def close_to_best(chunk: Hit, best: Hit) -> bool:
    """Whether a chunk's retrieval score is within CO_BEST of the best chunk's: another fact asked for.

    Where a question asks for several facts (several values of a key, several keys), their
    chunks score close to the best one (bench/longctx.py's multi-value and multi-query cases); the
    chunks below a single fact's best mostly score under half of it.
    """
    return best.score > 0 and chunk.score >= CO_BEST * best.score


def close_chunks(question: str, chunks: list[Hit], by_key: bool = True, one_fact_key: bool = True) -> list[int]:
    """Indexes of the chunks (best last) that hold another fact asked for: close to the best one by
    score, and (by_key) where the question asks for several things, also any chunk holding every
    question term that the best one holds (one of four values of a key, in a chunk of unrelated
    text, can score under CO_BEST of the best: longctx multi-value at 1M; a chunk about another key
    of the same form lacks the asked key's words). Where one thing is asked (one_fact_key), a chunk
    close by score that lacks the asked key is a look-alike, not close."""
    best = len(chunks) - 1
    close = [i for i in range(best) if close_to_best(chunks[i], chunks[best])] + [best]
    if best == 0:
        return close
    key, several = asked_key(question, chunks[best]), asks_for_several(question)
    if by_key and several:
        close = sorted(set(close) | {i for i in range(best) if holds_key(chunks[i], key)})
    elif one_fact_key and not several:
        close = [i for i in close if i == best or holds_key(chunks[i], key)]
    return close


def more_facts(question: str, ranked: list[Hit], below: list[Hit]) -> list[Hit]:
    """Of the chunks ranked `below` the ranked ones (best first), those that hold another fact asked
    for: close to the best by score, or holding the asked key."""
    if not ranked:
        return []
    key = asked_key(question, ranked[0])
    return [c for c in below if close_to_best(c, ranked[0]) or holds_key(c, key)]


def asked_key(question: str, best: Hit) -> set[str]:
    """The question's terms that its best chunk holds: what a chunk holding another fact asked for holds."""
    return set(_terms(question)) & set(_terms(best.text))


def holds_key(chunk: Hit, key: set[str]) -> bool:
    return bool(key) and key <= set(_terms(chunk.text))


def best_last(ranked: list[Hit]) -> list[Hit]:
    """Slot order for ranked chunks: the best one last, nearest the question.

    Needles in a haystack: with the best chunk last, far more needles are found than with it in
    the first slot, farthest from the question (bench/results/qa_slot_order.json, niah.json).
    """
    return list(reversed(ranked))


class AnswerReader:
    """Reads the answer as it grows and decides which chunk, if any, the next follow slot gets.

    A follow starts from a term the answer has just completed that names something (a word with a
    digit, a capital or an underscore: a name, a number, a variable) and that the question does not
    hold (nor a stopword, nor a term followed before). The chunks that
    hold the answer's terms are searched lexically, and the best one that holds the new term
    and sits in no slot comes in; slots that already hold the new term lose their bias (the
    answer has turned to them: the second fact of a two-hop question is often retrieved by the
    question, then held down as a lesser slot). A term already in the question never moves a
    slot, so an answer that repeats the question's words reads what the question retrieved.
    """

    def __init__(self, question: str, follow: Callable[[str], list[Hit]], n_slots: int):
        self.question_terms = set(query_terms(question, phrases=False))
        self.follow, self.n_slots = follow, n_slots
        self.seen: list[str] = []  # the answer's terms that asked for a follow, in order
        self.follows = 0

    def read(self, answer: str, held: dict[int, str], finished: bool = False) -> Turn | None:
        """What to read next, or None. held: {chunk id: text} of the filled slots. Unless the answer
        is `finished`, its last word may still grow."""
        cut = max(answer.rfind(" "), answer.rfind("\n"))
        complete = answer if finished else answer[:max(cut, 0)]  # no space yet: no word is complete
        new = [t for t in dict.fromkeys(_named_terms(complete)) if t not in self.question_terms and t not in self.seen]
        if not new or not self.n_slots:
            return None
        self.seen += new
        turn = Turn(lift=[cid for cid, text in held.items() if new[-1] in _terms(text)], term=new[-1])
        for chunk in self.follow(" ".join(self.seen)):
            if chunk.chunk_id not in held and new[-1] in _terms(chunk.text):
                turn.slot, turn.chunk = self.follows % self.n_slots, chunk
                self.follows += 1
                break
        return turn if turn.chunk or turn.lift else None


@dataclass
class Turn:
    """Where the answer turns: a chunk for a follow slot (or none), and held chunks to unbias."""
    slot: int | None = None
    chunk: Hit | None = None
    lift: list[int] = field(default_factory=list)
    term: str = field(default="", compare=False)  # the answer's new term
    bridge: bool = field(default=False, compare=False)  # held slots name the term in different sentences


class Follows:
    """One memory-mode answer's follow slots: where the answer turns (AnswerReader), the slots change."""

    def __init__(self, decoder: Decoder, slots: SlotCache, parts: PromptParts, held: list[Hit | None],
                 kv_for: Callable, reader: AnswerReader, timings: dict, several: bool = False,
                 key: set[str] | None = None):
        self.decoder, self.slots, self.parts, self.kv_for, self.reader = decoder, slots, parts, kv_for, reader
        self.held = held  # the chunk in each slot (None: an empty follow slot)
        self.timings = timings
        self.several = several  # several things asked: a slot whose value the answer has written is read
        self.key = key or set()  # the asked key (asked_key): a slot holding it holds another fact asked for
        self.read: set[int] = set()  # the chunk ids of those slots (and of slots whose sentence was copied)
        self.sentence_end = 0  # where the last sentence the answer ended ends
        self.brought: dict[int, str] = {}  # chunk id of each follow -> the answer's term that brought it in
        self.went_on: set[int] = set()  # slots whose owed item kept the answer going (once each)

    def refill(self, generated: list[int], finished: bool = False) -> torch.Tensor | None:
        """Logits after the slots changed (the local tokens re-run over them), or None when the answer
        names nothing new."""
        t = time.perf_counter()
        text = self.decoder.tokenizer.decode(generated, skip_special_tokens=True)
        turns = self.decoder.turns
        turn = self.reader.read(text, {c.chunk_id: c.text for c in self.held if c},
                                finished or (turns and _ends_word_and_sentence(text)))
        copied = self._copied(text) if turns else set()
        self.timings["retrieval_s"] += time.perf_counter() - t
        if turn is None and not copied:
            return None
        turn = turn or Turn()
        # the term's only mention (overlapping chunks may both hold its sentence): that item is read
        lift_sentences = [_sentence(c.text, turn.term) for c in self.held if c and c.chunk_id in turn.lift]
        item_read = self.several and turn.chunk is None and turn.lift and _one_mention(lift_sentences)
        if item_read:
            self.read.update(turn.lift)
            turn.lift = []
        turn.bridge = turns and turn.chunk is None and len(lift_sentences) > 1 and not _one_mention(lift_sentences)
        if copied:  # a sentence the answer copied is read; its term does not lift its slots again
            self.read |= copied
            turn.lift = [cid for cid in turn.lift if cid not in copied]
        slots = self.slots
        with self.decoder.lock:
            if turn.chunk is not None:
                [kv] = self.kv_for([turn.chunk], self.parts.prefix)
                slots.fill(turn.slot, kv)
                self.held[turn.slot] = turn.chunk
                self.brought[turn.chunk.chunk_id] = turn.term
            if not self._steer(turn) and turn.chunk is None:
                return None
            if item_read or ((turn.bridge or copied) and turn.chunk is None):
                # only the next tokens need to read elsewhere: no re-run
                if not finished:
                    return None
                if slots.keep_local(len(self.parts.suffix) + len(generated) - 1):  # the last token again
                    return slots.forward(generated[-1:])[0]
            slots.drop_local()
            return slots.forward(self.parts.suffix + generated)[0]

    def at_end(self, generated: list[int], logits: torch.Tensor) -> torch.Tensor | GoOn | None:
        """Where the model would stop: logits to go on with, or None. Its last word is read first
        (refill); where several things are asked and an unbiased slot the answer has not read owes
        an item (`_item`: a follow that the answer's own words brought in names something neither
        the answer nor the question has, the chain's next variable, the manager's locker; or a chunk
        holding the asked key has a value not written yet), the answer may not be over: it goes on
        with the model's best token but the end (once per slot), on trial (GoOn): what it then writes
        is kept only if it names one of those.
        bench/results/longctx_turns.json, memory against memory_unturned."""
        again = self.refill(generated, finished=True)
        if again is not None or not (self.decoder.turns and self.several):
            return again
        answer = self.decoder.tokenizer.decode(generated, skip_special_tokens=True)
        known = set(_terms(answer)) | self.reader.question_terms
        for i, chunk in enumerate(self.held):
            if chunk is None or chunk.chunk_id in self.went_on or chunk.chunk_id in self.read \
                    or self.slots.slot_bias[i] != 0.0:
                continue
            unwritten = set(_named_terms(self._item(chunk))) - known
            if unwritten:
                self.went_on.add(chunk.chunk_id)
                logits = logits.clone()
                logits[list(self.decoder.eos)] = float("-inf")
                return GoOn(logits, unwritten)
        return None

    def _item(self, chunk: Hit) -> str:
        """The sentence of a held chunk that the answer may still owe: for a follow, the one naming the
        term that brought it in; for a chunk holding the asked key (another value of it), the key's."""
        if chunk.chunk_id in self.brought:
            return _sentence(chunk.text, self.brought[chunk.chunk_id], lower=False)
        if self.decoder.cover and holds_key(chunk, self.key):
            return next((s for s in re.split(r"(?<=[.!?])\s+|\n", chunk.text) if self.key <= set(_terms(s))), "")
        return ""

    def _copied(self, answer: str) -> set[int]:
        """The chunk ids of held slots holding the sentence the answer has just ended (once per sentence)."""
        end = answer.rstrip()
        if not end or end[-1] not in ".!?" or len(end) <= self.sentence_end:
            return set()
        self.sentence_end = len(end)
        sentence = _last_sentence(end)
        if len(sentence.split()) < MIN_COPIED_WORDS:
            return set()
        return {c.chunk_id for c in self.held if c and sentence in " ".join(c.text.lower().split())}

    def _steer(self, turn: Turn) -> bool:
        """Set the slots' biases for where the answer turned; whether any changed.

        The slots that hold the answer's new term (the follow just read, held chunks naming it)
        are unbiased. Where a follow came in, the older follow slots are biased down, and with
        `focus` every other slot too, the question's best chunk included: the answer has named
        something the question's chunks did not lead to and goes on about it (a two-hop answer
        that has named the manager reads the manager's locker, not the asked person's). So does a
        term that held slots name in different sentences (`turn.bridge`: the manager, where the
        question brought both of the manager's facts in). Any other term that held chunks already
        have moves no other slot: a list of values goes on reading them all, and where several
        things are asked, a slot whose value the answer has written (`read`) is biased down, so the
        next value is read from the others; so is a slot whose sentence the answer has copied."""
        slots, changed = self.slots, False
        followed = turn.chunk is not None
        for i, chunk in enumerate(self.held):
            if chunk is None:
                continue
            if i == turn.slot or chunk.chunk_id in turn.lift:
                bias = 0.0
            elif chunk.chunk_id in self.read:  # the next item is read from the others
                bias = self.decoder.slot_bias
            elif (followed or turn.bridge) and (self.decoder.focus or i < self.reader.n_slots):
                bias = self.decoder.slot_bias
            else:
                continue
            if slots.slot_bias[i] != bias:
                slots.set_bias(i, bias)
                changed = True
        return changed


def completion(answer: str, sources: list[str]) -> str:
    """The rest of the number or code the answer stopped inside, or "": where its last word (six
    characters or more, a digit among them) is no whole word of the sources but begins exactly one.
    Qwen2.5-0.5B wrote a UUID's first ten characters and stopped, in a haystack of dates, in memory
    and rag alike; made to go on, it wrote a version number (bench/results/longctx_10m.json)."""
    if not answer or answer[-1].isspace():
        return ""
    last = answer.split()[-1].lstrip("([\"'`")
    if len(last) < MIN_CUT_WORD or not any(c.isdigit() for c in last):
        return ""
    words = {w.rstrip(".,;:!?)]\"'`") for text in sources for w in text.split()}
    longer = {w for w in words if w.startswith(last)}
    return next(iter(longer))[len(last):] if last not in words and len(longer) == 1 else ""


def _ends_word_and_sentence(answer: str) -> bool:
    """Whether the answer has just ended a sentence after a word (not a number: "3." may go on "3.14")."""
    return len(answer) > 1 and answer[-1] in ".!?" and answer[-2].isalpha()


def _last_sentence(text: str) -> str:
    """The last sentence of text (lower-cased, spaces collapsed, without its final stop)."""
    text = " ".join(text.lower().split()).rstrip(".!?")
    starts = [m.end() for m in re.finditer(r"[.!?:]\s", text)]
    return text[max(starts, default=0):].strip()


def _one_mention(sentences: list[str]) -> bool:
    """Whether the sentences are one, some of them cut at a chunk's edge."""
    longest = max(sentences, key=len)
    return all(s in longest for s in sentences)


def _sentence(text: str, term: str, lower: bool = True) -> str:
    """The sentence of `text` (lower-cased unless not `lower`) where `term` (lower case) first occurs;
    all of it if the term is not there."""
    lowered = text.lower()
    text = lowered if lower else text
    at = lowered.find(term)
    if at < 0 or len(lowered) != len(text):
        return text
    dot, newline = text.rfind(". ", 0, at), text.rfind("\n", 0, at)
    start = max(dot + 2 if dot >= 0 else 0, newline + 1)
    ends = [i for i in (text.find(". ", at), text.find("\n", at)) if i >= 0]
    return text[start:min(ends, default=len(text))].strip()


def _named_terms(text: str) -> list[str]:
    """The terms of the words that name something: with a digit, a capital letter or an underscore.

    A name, a number, a code or an identifier is what a follow can look up; an ordinary word of
    the answer's prose ("operation", "holding") matches chunks at random and only costs a re-run.
    """
    named = [w for w in text.split() if any(c.isdigit() or c.isupper() or c == "_" for c in w)]
    return _terms(" ".join(named))


def _terms(text: str) -> list[str]:
    return [w for w in query_terms(text, phrases=False) if len(w) > 1 and w not in STOPWORDS]


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
