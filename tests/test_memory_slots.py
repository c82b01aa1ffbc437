"""Memory slots on a real (tiny, randomly initialised) Llama: exact RoPE re-rotation, slots
equal to the prompt they replace, refill during decoding, and KV files that follow their chunks."""
import inspect
import warnings

import numpy as np
import pytest
import torch
from conftest import unit_vectors

from memstore.model.generate import (
    AnswerReader,
    Decoder,
    Follows,
    GoOn,
    PromptParts,
    Turn,
    asked_key,
    asks_for_several,
    close_chunks,
    completion,
)
from memstore.model.memory import (
    SlotCache,
    SlotLayout,
    cache_arg,
    encode_chunks,
    prefill,
    rope_cos_sin,
    rotate,
    unrotate,
)
from memstore.store import ChunkIn, DocumentIn, Hit, MemoryStore
from memstore.store.kv import KVMemory


def test_rotation_by_delta_equals_rotation_at_p_plus_delta(tiny):
    keys = torch.randn(2, 5, 7, 16)  # (layers, heads, tokens, head_dim)
    p = torch.arange(100, 107)
    cos_p, sin_p = rope_cos_sin(tiny, p)
    cos_d, sin_d = rope_cos_sin(tiny, torch.full((7,), 913))
    cos_pd, sin_pd = rope_cos_sin(tiny, p + 913)
    twice = rotate(rotate(keys, cos_p, sin_p), cos_d, sin_d)
    # float32 angles (as in the model itself) leave ~1e-5 relative error at positions near 1000
    torch.testing.assert_close(twice, rotate(keys, cos_pd, sin_pd), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(unrotate(rotate(keys, cos_p, sin_p), cos_p, sin_p), keys, atol=1e-6, rtol=1e-6)


def test_one_slot_is_the_prompt_it_replaces(tiny):
    """A chunk encoded after the prefix and placed right after it gives the same logits as prefilling text."""
    prefix, chunk, question = [1, 2, 3, 4], [10, 11, 12, 13, 14, 15], [20, 21, 22]
    with torch.no_grad():
        expected = tiny(input_ids=torch.tensor([prefix + chunk + question])).logits[0, -1]
    prefix_cache = prefill(tiny, prefix)
    [kv] = encode_chunks(tiny, prefix_cache, [chunk])
    assert kv.shape == (2, 2, 2, len(chunk), 16) and kv.dtype == np.float16
    slots = SlotCache(tiny, prefix_cache, SlotLayout(len(prefix), 1, len(chunk)))
    slots.fill(0, kv)
    got, _ = slots.forward(question)
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=2e-3)  # fp16 storage of the memory


@pytest.mark.parametrize("pack_tokens", [1024, 7])
def test_chunks_encoded_together_equal_chunks_encoded_alone(tiny, pack_tokens, monkeypatch):
    """Packed in one pass (or several, past PACK_TOKENS), each chunk sees the prefix and itself only."""
    from memstore.model import memory

    monkeypatch.setattr(memory, "PACK_TOKENS", pack_tokens)
    prefix_cache = prefill(tiny, [1, 2, 3])
    chunks = [[10, 11, 12], [30, 31, 32, 33, 34, 35], [40]]
    together = encode_chunks(tiny, prefix_cache, chunks)
    assert len(together) == 3
    for chunk, got in zip(chunks, together):
        [alone] = encode_chunks(tiny, prefix_cache, [chunk])
        assert got.shape == alone.shape == (2, 2, 2, len(chunk), 16)
        np.testing.assert_allclose(got.astype(np.float32), alone.astype(np.float32), atol=2e-3)
    assert prefix_cache.get_seq_length() == 3  # the shared prefix is left as it was


def test_the_cache_goes_by_the_name_the_installed_transformers_takes(tiny):
    """No deprecation warning per forward pass: past_key_values= warns once renamed to cache=."""
    [name] = cache_arg(tiny, None)
    assert name in inspect.signature(type(tiny.model).forward).parameters
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        prefix_cache = prefill(tiny, [1, 2, 3])
        [kv] = encode_chunks(tiny, prefix_cache, [[10, 11, 12]])
        slots = SlotCache(tiny, prefix_cache, SlotLayout(3, 1, 4))
        slots.fill(0, kv)
        slots.forward([20, 21])


def test_padding_in_a_slot_is_masked(tiny):
    """A short chunk in a long slot reads like the chunk followed by a positional gap: padding is invisible."""
    prefix, chunk, question = [1, 2, 3], [10, 11, 12], [20, 21]
    prefix_cache = prefill(tiny, prefix)
    [kv] = encode_chunks(tiny, prefix_cache, [chunk])
    padded = SlotCache(tiny, prefix_cache, SlotLayout(3, 1, 8))
    padded.fill(0, kv)
    garbage = np.random.default_rng(0).standard_normal((2, 2, 2, 8, 16)).astype(np.float16)
    other = SlotCache(tiny, prefix_cache, SlotLayout(3, 1, 8))
    other.fill(0, garbage)
    other.fill(0, kv)  # refilled: the old, longer content must be gone
    torch.testing.assert_close(padded.forward(question)[0], other.forward(question)[0])


class FakeTokenizer:
    """Just enough of a tokenizer for the decoder: characters are tokens."""

    eos_token_id = 0
    unk_token_id = 1

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [2 + (ord(c) % 250) for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("A") + i % 26) if i % 7 else " " for i in ids)  # capitals: names to follow

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    def convert_tokens_to_ids(self, token):
        return self.unk_token_id


def test_a_new_term_in_the_answer_fills_a_follow_slot(tiny):
    """Terms the answer writes that the question lacks are searched; the chunk holding them comes in."""
    tiny.generation_config.eos_token_id = None
    decoder = Decoder(tiny, FakeTokenizer(), max_positions=2048, slot_len=16)
    first = _chunk(1, "alpha facts")
    queries = []

    def follow(terms):  # a chunk that holds whatever the answer wrote
        queries.append(terms)
        return [first, _chunk(1 + len(queries), terms)]

    def kv_for(chunks, prefix_ids):
        return decoder.encode([c.text for c in chunks], prefix_ids)

    gen = decoder.memory("q?", lambda text: [first], kv_for, k=1, max_new_tokens=24, follow=follow, follow_slots=2)
    assert gen.refills == len(queries) >= 1
    assert 1 in {c.chunk_id for c in gen.chunks} and len(gen.chunks) == 1 + min(2, gen.refills)
    assert len(gen.attention) == len(gen.chunks)
    once = decoder.memory("q?", lambda text: [first], kv_for, k=1, max_new_tokens=24, follow=follow,
                          retrieve_every=0)
    assert once.refills == 0 and [c.chunk_id for c in once.chunks] == [1] and len(queries) == gen.refills


class ByteTokenizer(FakeTokenizer):
    """Answer token ids are the answer's bytes."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode()


def _chunk(i, text, score=0.0):
    return Hit(chunk_id=i, document_id=i, source=str(i), title=None, ordinal=0, char_start=0, char_end=len(text),
               heading_path="", text=text, token_count=len(text.split()), meta={}, score=score)


def test_answer_reader_follows_new_terms_only():
    staff = _chunk(1, "Ingrid Halvorsen's manager is Tobias Brennecke.")
    home = _chunk(2, "Tobias Brennecke was born in Quellstadt.")
    other = _chunk(3, "Brennecke is a common name in Quellstadt.")
    asked = []

    def follow(terms):
        asked.append(terms)
        return [staff, other, home]

    reader = AnswerReader("Where was Ingrid Halvorsen's manager born?", follow, n_slots=2)
    def held(*chunks):
        return {c.chunk_id: c.text for c in chunks}
    assert reader.read("Ingrid Halvorsen's manager", held(staff)) is None and not asked  # the question's words move nothing
    assert reader.read("Ingrid Halvorsen's manager Tobias", held(staff)) is None and not asked  # "Tobias" may still grow
    # held staff is not brought in again but loses its bias; other lacks "tobias": home comes in
    assert reader.read("Ingrid Halvorsen's manager Tobias ", held(staff)) == Turn(0, home, lift=[1])
    assert asked == ["tobias"]
    assert reader.read("Ingrid Halvorsen's manager Tobias Brennecke ", held(staff, home)) == Turn(1, other, lift=[1, 2])
    assert asked[-1] == "tobias brennecke"
    assert reader.read("Ingrid Halvorsen's manager Tobias Brennecke was", held(staff, home, other)) is None  # nothing new
    assert reader.read("Tobias Brennecke was born in the old harbour town ", held(staff)) is None  # prose names nothing
    assert asked[-1] == "tobias brennecke"
    assert reader.read("Tobias Brennecke was Zed ", held(staff, home, other)) is None  # no chunk holds "zed"
    assert reader.follows == 2
    assert reader.read("Tobias Brennecke was Quellstadt", held(staff)) is None  # the last word may still grow...
    assert reader.read("Tobias Brennecke was Quellstadt", held(staff), finished=True) == Turn(0, other)  # ...unless it ended
    assert reader.follows == 3


def test_a_term_only_held_chunks_hold_lifts_their_bias():
    staff = _chunk(1, "Ingrid Halvorsen's manager is Tobias Brennecke.")
    locker = _chunk(2, "The locker combination of Tobias Brennecke is 4821.")
    reader = AnswerReader("Who is Ingrid Halvorsen's manager, and what is the manager's locker combination?",
                          lambda terms: [locker, staff], n_slots=2)
    turn = reader.read("Ingrid Halvorsen's manager is Tobias ", {1: staff.text, 2: locker.text})
    assert turn == Turn(lift=[1, 2]) and reader.follows == 0


@pytest.mark.parametrize("focus", [True, False])
def test_a_turn_biases_the_slots_that_lack_the_new_term(tiny, focus):
    """Two-hop: the answer has named the manager; the asked person's own locker (the question's best
    chunk) is biased down with focus, and keeps its weight without."""
    decoder = Decoder(tiny, ByteTokenizer(), max_positions=2048, slot_len=64, focus=focus)
    staff = _chunk(1, "Ingrid Halvorsen's manager is Tobias Brennecke.")
    own_locker = _chunk(2, "The locker combination of Ingrid Halvorsen is 1111.")
    locker = _chunk(3, "The locker combination of Tobias Brennecke is 4821.")
    parts = PromptParts(decoder.tokenizer, "q?")

    def kv_for(chunks, _):
        return decoder.encode([c.text for c in chunks], parts.prefix)

    def follows(found):
        slots = decoder._memory_slots("q?", parts, [staff, own_locker], kv_for, 1, {})
        assert slots.slot_bias == [0.0, decoder.slot_bias, 0.0]  # follow slot empty, best (own locker) last
        return Follows(decoder, slots, parts, [None, staff, own_locker], kv_for,
                       AnswerReader("q?", lambda _: found, 1), {"retrieval_s": 0.0})

    hop = follows([locker])
    assert hop.refill(list(b"Tobias Brennecke ")) is not None and hop.held[0] is locker
    assert hop.slots.slot_bias == ([0.0, 0.0, decoder.slot_bias] if focus else [0.0, 0.0, 0.0])
    held = follows([])  # no chunk to follow: the held chunk naming Tobias is read, nothing else moves
    assert held.refill(list(b"Tobias Brennecke ")) is not None
    assert held.slots.slot_bias == [0.0, 0.0, 0.0]


def test_a_first_word_still_growing_is_not_followed():
    asked = []
    reader = AnswerReader("How many columns may a table have?", lambda terms: asked.append(terms) or [], n_slots=2)
    assert reader.read("200", {}) is None and reader.read("2000", {}) is None and not asked
    reader.read("2000", {}, finished=True)
    assert asked == ["2000"]


def test_kv_entries_vanish_with_their_document(tmp_path):
    with MemoryStore(tmp_path / "s") as store:
        store.require_embedder("test", 8)
        doc = DocumentIn("a.txt", "h", 1, 1.0, 20)
        store.add_document(doc, [ChunkIn(0, 0, 10, "x", 1), ChunkIn(1, 10, 20, "y", 1)], unit_vectors(2, 8))
        ids = [c.chunk_id for c in store.get_chunks(range(1, 10))]
        kv = KVMemory(store.kv_dir, "some-model")
        for cid in ids:
            kv.put(cid, np.zeros((2, 1, 1, 3, 4), np.float16))
        assert kv.get(ids[0]) is not None
        store.delete_document("a.txt")
        assert all(kv.get(cid) is None for cid in ids)
        assert store.check()["orphan_kv_entries"] == 0


def test_kv_budget_evicts_least_recently_used(tmp_path):
    entry = np.zeros((2, 1, 1, 64, 8), np.float16)
    kv = KVMemory(tmp_path, "m", budget_bytes=3 * (entry.nbytes + 200))
    for cid in range(3):
        kv.put(cid, entry)
    import os
    import time
    os.utime(kv.path(1), (time.time() - 100, time.time() - 100))  # 1 is the stalest
    kv.put(3, entry)
    assert kv.get(1) is None and all(kv.get(c) is not None for c in (0, 2, 3))


def test_slot_bias_scales_attention_to_that_slot_only(tiny):
    """A bias on a slot is added to the attention logits onto it: a huge negative one hides the slot."""
    prefix, chunks, question = [1, 2, 3], [[10, 11, 12], [30, 31, 32, 33]], [20, 21]
    prefix_cache = prefill(tiny, prefix)
    kvs = encode_chunks(tiny, prefix_cache, chunks)

    def logits(bias_on_slot1=None, fill_slot1=True):
        slots = SlotCache(tiny, prefix_cache, SlotLayout(3, 2, 4))
        slots.fill(0, kvs[0])
        if fill_slot1:
            slots.fill(1, kvs[1])
        if bias_on_slot1 is not None:
            slots.set_bias(1, bias_on_slot1)
        first, _ = slots.forward(question[:1])
        second, _ = slots.forward(question[1:])  # a decoding step sees the bias too
        return first, second

    empty = logits(fill_slot1=False)
    for got, want in zip(logits(bias_on_slot1=-1e4), empty):
        torch.testing.assert_close(got, want)
    for got, want in zip(logits(bias_on_slot1=0.0), logits()):
        torch.testing.assert_close(got, want)
    assert not torch.allclose(logits(bias_on_slot1=-1.0)[1], logits()[1])


def test_memory_mode_biases_every_slot_but_the_best_chunks(tiny):
    """With a prohibitive bias, whatever sits in the lesser slot cannot change the answer."""
    tiny.generation_config.eos_token_id = None
    best = _chunk(1, "alpha facts here")
    others = [_chunk(2, "beta notes"), _chunk(3, "gamma gamma gamma")]

    def answer(other, bias):
        decoder = Decoder(tiny, FakeTokenizer(), max_positions=2048, slot_len=24, slot_bias=bias)
        gen = decoder.memory("q?", lambda text: [best, other], lambda chunks, prefix: decoder.encode(
            [c.text for c in chunks], prefix), k=2, max_new_tokens=8, retrieve_every=0)
        return gen.token_ids

    assert answer(others[0], -1e4) == answer(others[1], -1e4)
    assert answer(others[0], 0.0) != answer(others[1], 0.0)  # unbiased, the lesser slot is read


def test_blending_every_slot_token_equals_the_prompt_it_replaces(tiny):
    """Chunks encoded alone, then all their tokens recomputed over the filled slots: the joint prompt's logits."""
    prefix, chunks, question = [1, 2, 3, 4], [[10, 11, 12, 13, 14], [30, 31, 32]], [20, 21, 22]
    prefix_cache = prefill(tiny, prefix)
    kvs = encode_chunks(tiny, prefix_cache, chunks)

    def logits(blend: bool) -> torch.Tensor:
        slots = SlotCache(tiny, prefix_cache, SlotLayout(len(prefix), 2, 5))
        slots.fill(0, kvs[0])
        slots.fill(1, kvs[1])
        if blend:
            slots.blend({0: chunks[0], 1: chunks[1]})
            assert slots.cache.get_seq_length() == slots.memory_len  # the recomputed copies are put in place
        return slots.forward(question)[0]

    with torch.no_grad():  # the same prompt, with the two-position gap that slot 1 leaves after its chunk
        ids = torch.tensor([prefix + chunks[0] + chunks[1] + question])
        positions = torch.tensor([list(range(12)) + [14, 15, 16]])
        expected = tiny(input_ids=ids, position_ids=positions).logits[0, -1]
    assert not torch.allclose(logits(blend=False), expected, atol=1e-3)  # alone, slot 1 never saw slot 0
    torch.testing.assert_close(logits(blend=True), expected, atol=2e-3, rtol=2e-3)


def test_memory_mode_blends_the_slots_of_chunks_close_to_the_best(tiny):
    """Several chunks scoring near the best (several facts asked for) are recomputed together; a lone best is not."""
    tiny.generation_config.eos_token_id = None
    best = _chunk(1, "alpha facts here", 1.0)
    near = _chunk(2, "beta notes", 0.9)
    far = _chunk(3, "gamma gamma", 0.1)

    def blended(ranked, blend=True, question="What are all the values?"):
        decoder = Decoder(tiny, FakeTokenizer(), max_positions=2048, slot_len=24, blend=blend)
        gen = decoder.memory(question, lambda text: ranked, lambda chunks, prefix: decoder.encode(
            [c.text for c in chunks], prefix), k=3, max_new_tokens=2, retrieve_every=0)
        return gen.timings.get("blended_tokens", 0)

    def tokens(c):
        return len(c.text) + 2  # FakeTokenizer: a token per character, and the separator's two
    assert blended([best, near, far]) == tokens(best) + tokens(near)
    assert blended([best, far]) == 0
    assert blended([best, near], blend=False) == 0
    assert blended([best, near, far], question="What is the value?") == 0  # one thing asked: chunks read alone


def test_questions_that_ask_for_several_things():
    several = ["What are all the special magic numbers for amber-fox?", "Which variables hold 42? List them all.",
               "Who is Ada's manager, and what is that manager's locker combination?",
               "What are the magic numbers for a-b and c-d?", "Which pragmas are deprecated?"]
    one = ["What is the special magic number for amber-fox?", "Who wrote the first draft?",
           "Which PRAGMA turns on enforcement of foreign key constraints?", "What year was hockey first mentioned?"]
    assert all(asks_for_several(q) for q in several) and not any(asks_for_several(q) for q in one)


def test_a_chunk_holding_the_asked_key_is_close_however_it_scores():
    """Several values of one key: a value's chunk full of unrelated text scores low, yet holds every
    question word the best chunk holds; a chunk about another key of the same form does not."""
    question = "What are all the special magic numbers for fabled-marble?"
    best = _chunk(1, "One of the special magic numbers for fabled-marble is: 296000.", 1.0)
    diluted = _chunk(2, "Applications invoke a file-control. One of the special magic numbers for fabled-marble "
                        "is: 888318. Temporary files go elsewhere.", 0.55)
    other_key = _chunk(3, "One of the special magic numbers for amber-falcon is: 123456.", 0.5)
    ranked = [other_key, diluted, best]  # best last
    assert close_chunks(question, ranked) == [1, 2]
    assert close_chunks(question, ranked, by_key=False) == [2]  # by score alone: the best only
    assert close_chunks("What is the special magic number for fabled-marble?", ranked) == [2]  # one thing asked
    look_alike = _chunk(4, "One of the special magic numbers for fabled-nectar is: 508064.", 0.9)
    one = "What is the special magic number for fabled-marble?"
    assert close_chunks(one, [look_alike, best]) == [1]  # close by score, but another key: biased
    assert close_chunks(one, [look_alike, best], one_fact_key=False) == [0, 1]
    assert close_chunks(one, [_chunk(5, "A special magic number for fabled-marble is 1.", 0.9), best]) == [0, 1]


def test_an_answer_that_drew_on_a_slot_reads_the_unread_ones_next(tiny):
    """Asked for several things, a slot whose value the answer has written is biased down, so the next
    item is read from the others; no re-run (the next steps read elsewhere), but new logits where the
    answer would end."""
    decoder = Decoder(tiny, ByteTokenizer(), max_positions=2048, slot_len=64)
    question = "What are all the magic numbers for fabled-marble?"
    a = _chunk(1, "A magic number for fabled-marble is 296000.", 0.9)
    b = _chunk(2, "A magic number for fabled-marble is 746937.", 1.0)
    parts = PromptParts(decoder.tokenizer, question)

    def kv_for(chunks, _):
        return decoder.encode([c.text for c in chunks], parts.prefix)

    slots = decoder._memory_slots(question, parts, [a, b], kv_for, 1, {})
    follows = Follows(decoder, slots, parts, [None, a, b], kv_for, AnswerReader(question, lambda _: [], 1),
                      {"retrieval_s": 0.0}, several=True)
    slots.forward(parts.suffix + list(b"746937, "))
    assert follows.refill(list(b"746937, ")) is None  # b is read: biased down, a keeps its weight
    assert slots.slot_bias == [0.0, 0.0, decoder.slot_bias] and follows.read == {2}
    slots.forward(list(b"296000"))  # the answer's last token run; the model would end here
    n_cached = slots.cache.get_seq_length()
    logits = follows.refill(list(b"746937, 296000"), finished=True)  # a read too: that token again, over new biases
    assert logits is not None and slots.cache.get_seq_length() == n_cached
    assert slots.slot_bias == [0.0, decoder.slot_bias, decoder.slot_bias]
    assert follows.refill(list(b"746937, 296000, 296000 "), finished=True) is None  # nothing new: it ends


def test_one_value_in_two_overlapping_chunks_is_read_in_both(tiny):
    """Two overlapping chunks holding the same value's sentence are one item: both are read once the
    answer writes it. A name in two different sentences (a two-hop bridge) lifts its holders instead."""
    decoder = Decoder(tiny, ByteTokenizer(), max_positions=2048, slot_len=64)
    question = "What are all the magic numbers for fabled-marble?"
    first = _chunk(1, "Old text. A magic number for fabled-marble is 338028. More", 1.0)
    overlap = _chunk(2, "number for fabled-marble is 338028. More text follows here.", 0.9)
    other = _chunk(3, "Elsewhere. A magic number for fabled-marble is 954387.", 0.8)
    parts = PromptParts(decoder.tokenizer, question)

    def kv_for(chunks, _):
        return decoder.encode([c.text for c in chunks], parts.prefix)

    def follows(chunks):
        slots = decoder._memory_slots(question, parts, chunks, kv_for, 1, {})
        slots.forward(parts.suffix + list(b"338028, "))
        return Follows(decoder, slots, parts, [None, *chunks], kv_for, AnswerReader(question, lambda _: [], 1),
                       {"retrieval_s": 0.0}, several=True)

    values = follows([other, overlap, first])
    values.refill(list(b"338028, "))
    assert values.read == {1, 2} and values.slots.slot_bias == [0.0, 0.0, decoder.slot_bias, decoder.slot_bias]
    staff = _chunk(4, "Ingrid's manager is Tobias Brennecke.", 1.0)
    locker = _chunk(5, "The locker combination of Tobias Brennecke is 4821.", 0.5)
    bridge = follows([locker, staff])
    bridge.refill(list(b"Tobias "))
    assert bridge.read == set() and bridge.slots.slot_bias == [0.0, 0.0, 0.0]  # the locker's bias lifted


def test_an_answer_cut_inside_a_number_it_copies_ends_with_the_rest_of_it():
    sources = ["3.34.0 One of the special magic uuids for olive-spindle is: 09035fa7-23a8-4b81-8a52-2c6d62910b4e.",
               "Released 2021-03-12 as version 3.35.0 and 3.35.1."]
    assert completion("09035fa7-2", sources) == "3a8-4b81-8a52-2c6d62910b4e"  # a UUID's first ten characters
    assert completion("It is 09035fa7-23a8", sources) == "-4b81-8a52-2c6d62910b4e"
    assert completion("09035fa7-23a8-4b81-8a52-2c6d62910b4e", sources) == ""  # whole
    assert completion("09035fa7-23a8-4b81-8a52-2c6d62910b4e.", sources) == ""
    assert completion("2021-03-12", sources) == ""  # a whole word there
    assert completion("3.35.", sources) == ""  # under six characters: a count or a prefix, left as it is
    assert completion("2021-03-12", ["builds 2021-03-12a and 2021-03-12b"]) == ""  # begins two words: which one?
    assert completion("olive-spin", sources) == ""  # no digit: prose may end anywhere
    assert completion("09035fa7-2 ", sources) == ""  # the answer ended its word


def _follows(decoder, question, chunks, n_follow=1, found=()):
    """An answer's Follows over memory slots holding `chunks` (best last); follows find `found`."""
    parts = PromptParts(decoder.tokenizer, question)

    def kv_for(chunks, _):
        return decoder.encode([c.text for c in chunks], parts.prefix)

    slots = decoder._memory_slots(question, parts, chunks, kv_for, n_follow, {})
    return Follows(decoder, slots, parts, [None] * n_follow + list(chunks), kv_for,
                   AnswerReader(question, lambda _: list(found), n_follow), {"retrieval_s": 0.0},
                   several=asks_for_several(question), key=asked_key(question, chunks[-1]))


@pytest.mark.parametrize("turns", [True, False])
def test_a_bridge_both_held_slots_name_turns_the_answer_to_them(tiny, turns):
    """Two-hop, both of the manager's facts brought in by the question: once the answer names the
    manager, the asked person's own locker (the best chunk) is biased down (no re-run mid-answer)."""
    decoder = Decoder(tiny, ByteTokenizer(), max_positions=2048, slot_len=64, turns=turns)
    question = "Who is Ingrid Halvorsen's manager, and what is that manager's locker combination?"
    staff = _chunk(1, "Ingrid Halvorsen's manager is Tobias Brennecke.", 0.8)
    locker = _chunk(2, "The locker combination of Tobias Brennecke is 4821.", 0.7)
    own_locker = _chunk(3, "The locker combination of Ingrid Halvorsen is 1111.", 1.0)
    follows = _follows(decoder, question, [locker, staff, own_locker])
    assert follows.slots.slot_bias == [0.0, 0.0, 0.0, 0.0]  # all close to the best: read as facts
    follows.slots.forward(follows.parts.suffix + list(b"Ingrid Halvorsen's manager is Tobias Brennecke "))
    assert follows.refill(list(b"Ingrid Halvorsen's manager is Tobias Brennecke ")) is None
    assert follows.slots.slot_bias == ([0.0, 0.0, 0.0, decoder.slot_bias] if turns else [0.0, 0.0, 0.0, 0.0])


def test_a_name_in_one_held_sentence_is_no_bridge(tiny):
    decoder = Decoder(tiny, ByteTokenizer(), max_positions=2048, slot_len=64)
    question = "Who is Ingrid Halvorsen's manager?"
    staff = _chunk(1, "Ingrid Halvorsen's manager is Tobias Brennecke.", 1.0)
    other = _chunk(2, "Quellstadt is a town by the sea.", 0.9)
    follows = _follows(decoder, question, [other, staff])
    before = list(follows.slots.slot_bias)
    follows.refill(list(b"Tobias Brennecke "))
    assert follows.slots.slot_bias == before


@pytest.mark.parametrize("turns", [True, False])
def test_a_sentence_the_answer_copied_is_read(tiny, turns):
    """The answer has copied a sentence from a slot: that slot is biased down, so the answer goes on
    from the others instead of into the source's next sentence; the bridge the sentence names does
    not lift it again. Short sentences ("Birmingham.") and sentences in no slot move nothing."""
    decoder = Decoder(tiny, ByteTokenizer(), max_positions=2048, slot_len=64, turns=turns)
    question = "Who is Delphine Szabo's manager, and what is that manager's locker combination?"
    staff = _chunk(1, "the lines don't meet.\nDelphine Szabo's manager is Matthias Ilves. Instead you draw", 0.8)
    locker = _chunk(2, "The locker combination of Matthias Ilves is 8523.", 0.7)
    own_locker = _chunk(3, "The locker combination of Delphine Szabo is 1517.", 1.0)
    follows = _follows(decoder, question, [locker, staff, own_locker])
    answer = list(b"Delphine Szabo's manager is Matthias Ilves.")
    follows.slots.forward(follows.parts.suffix + answer)
    assert follows.refill(answer) is None  # biases only: the next tokens read elsewhere
    if turns:
        assert follows.read == {1} and follows.slots.slot_bias == [0.0, 0.0, decoder.slot_bias, decoder.slot_bias]
        assert follows.refill(answer + list(b" ")) is None  # the same sentence: nothing more
        assert follows.slots.slot_bias == [0.0, 0.0, decoder.slot_bias, decoder.slot_bias]
    else:
        assert follows.read == set() and follows.slots.slot_bias == [0.0, 0.0, 0.0, 0.0]
    short = _follows(decoder, "What town made the most guns?",
                     [_chunk(4, "Birmingham. It made guns.", 0.5), _chunk(5, "Guns were made.", 1.0)])
    short.refill(list(b"Birmingham."))  # (with turns its word is complete and lifts the slot naming it)
    assert short.read == set() and short.slots.slot_bias == [0.0, 0.0 if turns else decoder.slot_bias, 0.0]
    unseen = _follows(decoder, "What town made the most guns?",
                      [_chunk(4, "Birmingham made guns.", 0.5), _chunk(5, "Guns were made.", 1.0)])
    unseen.refill(list(b"The town of Birmingham made them."))
    assert unseen.read == set()


@pytest.mark.parametrize("turns", [True, False])
def test_a_list_answer_goes_on_while_a_follow_it_brought_in_names_more(tiny, turns):
    """Asked for all the variables holding a value: the answer wrote the first, which brought in the
    link naming the next one; where the model would stop, it goes on (once per follow)."""
    decoder = Decoder(tiny, ByteTokenizer(), max_positions=2048, slot_len=64, turns=turns)
    question = "Which variables are assigned the value 36346? List them all."
    direct = _chunk(1, "Old text. VAR LJHTR = 36346. More text.", 1.0)
    link = _chunk(2, "Other text. VAR NCNVP = VAR LJHTR. Unrelated.", 0.2)
    follows = _follows(decoder, question, [direct], found=[link])
    slots = follows.slots
    answer = list(b"VAR LJHTR = 36346")
    assert follows.refill(list(b"VAR LJHTR ")) is not None and follows.held[0] is link
    slots.forward(list(b"= 36346"))
    logits = torch.zeros(300)
    again = follows.at_end(answer, logits)
    if turns:
        assert isinstance(again, GoOn) and again.needs == {"ncnvp"}
        assert decoder.eos and all(again.logits[i] == float("-inf") for i in decoder.eos)
        assert follows.at_end(answer, logits) is None  # once per follow
    else:
        assert again is None
    done = _follows(decoder, question, [link, direct], n_follow=0)
    done.brought[link.chunk_id] = "ljhtr"
    again = done.at_end(list(b"VAR LJHTR = 36346, VAR NCNVP"), logits)  # its names are written: it may end
    assert not isinstance(again, GoOn)


@pytest.mark.parametrize("went_on, kept", [("\nVAR NCNVP = VAR LJHTR.", True), (" The end of it. And", False),
                                           (" and more", False)])
def test_an_answer_that_goes_on_keeps_it_only_where_it_writes_what_it_had_to(tiny, went_on, kept):
    """Going on (GoOn) is on trial: kept where it names what it needed before ending a sentence; else
    the answer ends where it would have, and nothing of the trial is streamed."""
    decoder = Decoder(tiny, ByteTokenizer(), max_positions=2048, slot_len=64)
    eos = min(decoder.eos)
    script = iter(list(b" = 36346") + [eos] + list(went_on.encode()) + [eos, eos])

    def next_logits():
        logits = torch.zeros(300)
        logits[next(script)] = 1.0
        return logits

    asked = []

    def on_end(generated, logits):
        asked.append(bytes(generated))
        return GoOn(next_logits(), {"ncnvp"}) if len(asked) == 1 else None

    streamed = []
    out = decoder._greedy(lambda ids, generated: next_logits(), next_logits(), 64, streamed.append, 0.0, {},
                          on_end=on_end)
    answer = " = 36346" + (went_on if kept else "")
    assert bytes(out).decode() == answer == "".join(streamed)


def test_a_list_answer_goes_on_while_a_slot_holding_the_asked_key_has_a_value_unwritten(tiny):
    decoder = Decoder(tiny, ByteTokenizer(), max_positions=2048, slot_len=64)
    question = "What are all the magic numbers for fabled-marble?"
    a = _chunk(1, "Prose. A magic number for fabled-marble is 746937. More prose.", 0.9)
    b = _chunk(2, "A magic number for fabled-marble is 296000.", 1.0)
    follows = _follows(decoder, question, [a, b])
    follows.slots.forward(follows.parts.suffix + list(b"296000"))
    first = follows.at_end(list(b"296000"), torch.zeros(300))  # its value is read: the last token again
    assert isinstance(first, torch.Tensor) and follows.read == {2}
    again = follows.at_end(list(b"296000"), first)  # the model would still end: a's value is owed
    assert isinstance(again, GoOn) and again.needs == {"746937"}
    both = _follows(decoder, question, [a, b])
    assert not any(isinstance(both.at_end(list(b"296000, 746937"), torch.zeros(300)), GoOn) for _ in range(2))
    one_thing = _follows(decoder, "What is the magic number for fabled-marble?", [a, b])
    assert not any(isinstance(one_thing.at_end(list(b"296000"), torch.zeros(300)), GoOn) for _ in range(2))
