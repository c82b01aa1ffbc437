"""Concurrent answers decode in one batch: a batched step equals each step run alone (a real tiny
Llama in float32, exactly), answers asked at once in threads are those asked one by one (SmolLM2),
and an answer that stops stepping never holds the others up."""
import threading
import time

import numpy as np
import torch
from transformers import DynamicCache

import memstore
from memstore.model.batching import DecodeStep, StepBatcher, run_batch
from memstore.model.memory import SlotCache, SlotLayout, cache_arg, encode_chunks, last_logits, prefill

PREFIX = [1, 2, 3, 4]


def slot_cache(model, chunks: list[list[int]], biases: list[float], local: list[int]) -> SlotCache:
    """A memory-mode cache: chunks in slots of 16 (shorter ones leave gaps), biases, local tokens run."""
    slots = SlotCache(model, prefill(model, PREFIX), SlotLayout(len(PREFIX), len(chunks), 16))
    for i, kv in enumerate(encode_chunks(model, prefill(model, PREFIX), chunks)):
        slots.fill(i, kv)
        slots.set_bias(i, biases[i])
    slots.forward(local)
    return slots


def answers_in_flight(model):
    """Three memory-mode caches of different lengths, biases and local tokens, and a prompt-mode cache."""
    rng = np.random.default_rng(0)
    ids = lambda n: [int(t) for t in rng.integers(5, 300, n)]  # noqa: E731
    slots = [slot_cache(model, [ids(9), ids(16)], [0.0, -1.5], ids(5)),
             slot_cache(model, [ids(3), ids(12), ids(7)], [-1.5, 0.0, 0.0], ids(11)),
             slot_cache(model, [ids(16)], [0.0], ids(2))]
    prompt = DynamicCache()
    model.model(input_ids=torch.tensor([ids(30)]), **cache_arg(model, prompt), use_cache=True)
    return slots, prompt


def steps_for(model, slots, prompt, tokens):
    steps = []
    for s, token in zip(slots, tokens):
        position, bias = s.next_position()
        steps.append(DecodeStep(s.cache, token, position, bias, solo=None))
    n = prompt.get_seq_length()
    return steps + [DecodeStep(prompt, tokens[-1], n, torch.zeros(n), solo=None)]


@torch.no_grad()
def test_a_batched_step_equals_each_step_alone(tiny):
    alone_slots, alone_prompt = answers_in_flight(tiny)
    batch_slots, batch_prompt = answers_in_flight(tiny)
    for tokens in ([17, 18, 19, 20], [40, 41, 42, 43]):  # two steps: the second reads what the first appended
        alone = [s.forward([t])[0] for s, t in zip(alone_slots, tokens)]
        alone.append(last_logits(tiny, input_ids=torch.tensor([[tokens[-1]]]), **cache_arg(tiny, alone_prompt),
                                 use_cache=True)[0])
        batched = run_batch(tiny, steps_for(tiny, batch_slots, batch_prompt, tokens))
        for a, b in zip(alone, batched):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    for a, b in zip([s.cache for s in alone_slots] + [alone_prompt], [s.cache for s in batch_slots] + [batch_prompt]):
        assert a.get_seq_length() == b.get_seq_length()
        torch.testing.assert_close(b.layers[1].keys, a.layers[1].keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b.layers[1].values, a.layers[1].values, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_threads_stepping_together_share_batches_and_get_their_own_logits(tiny):
    alone_slots, _ = answers_in_flight(tiny)
    shared_slots, _ = answers_in_flight(tiny)
    batcher = StepBatcher(tiny, threading.RLock(), gather_s=0.5)
    got: dict[int, list] = {}
    all_decoding = threading.Barrier(3)

    def answer(i: int) -> None:
        s = shared_slots[i]
        with batcher.member():
            all_decoding.wait()
            got[i] = []
            for token in (30 + i, 60 + i, 90 + i):
                position, bias = s.next_position()
                got[i].append(batcher.step(DecodeStep(s.cache, token, position, bias,
                                                      solo=lambda s=s, token=token: s.forward([token])[0])))

    threads = [threading.Thread(target=answer, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert batcher.batch_sizes == {3: 9}  # each of the three rounds ran as one batch
    for i, s in enumerate(alone_slots):
        for token, logits in zip((30 + i, 60 + i, 90 + i), got[i]):
            torch.testing.assert_close(logits, s.forward([token])[0], atol=1e-5, rtol=1e-5)


def test_an_answer_that_stops_stepping_does_not_hold_the_others(tiny):
    [slots, *_], _ = answers_in_flight(tiny)
    batcher = StepBatcher(tiny, threading.RLock(), gather_s=0.05)
    idle = threading.Event()

    def member_that_never_steps():
        with batcher.member():
            idle.wait(30)

    threading.Thread(target=member_that_never_steps, daemon=True).start()
    time.sleep(0.1)
    with batcher.member():
        started = time.monotonic()
        position, bias = slots.next_position()
        logits = batcher.step(DecodeStep(slots.cache, 5, position, bias, solo=lambda: slots.forward([5])[0]))
    idle.set()
    assert logits.shape == (300,) and time.monotonic() - started < 2.0
    assert batcher.batch_sizes == {1: 1}


def test_an_error_in_a_batch_reaches_every_answer_in_it(tiny):
    batcher = StepBatcher(tiny, threading.RLock(), gather_s=1.0)
    errors = []

    def answer():
        with batcher.member():
            try:
                batcher.step(DecodeStep(DynamicCache(), 5, 0, torch.zeros(0), solo=None))  # an empty cache cannot batch
            except Exception as e:  # noqa: BLE001 - what the test looks at
                errors.append(e)

    threads = [threading.Thread(target=answer) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(errors) == 2


def test_answers_asked_at_once_are_the_answers_asked_one_by_one(tmp_path):
    """SmolLM2 over a real store: four memory-mode answers in four threads decode in shared batches
    and say word for word what each says alone."""
    with memstore.open(tmp_path / "store") as mem:
        facts = ["The capital of Freedonia is Zorbaville, on the river Quell.",
                 "Agent Mara Voss keeps locker combination 4471-88 at the Halden depot.",
                 "The Orrin bridge was built in 1871 by the engineer Tomas Yell.",
                 "Sylvie Kant manages the Brem office; her deputy is Olaf Renn."]
        for i, fact in enumerate(facts):
            mem.add_text(fact, source=f"fact{i}.md")
        questions = ["What is the capital of Freedonia?", "What is Mara Voss's locker combination?",
                     "Who built the Orrin bridge?", "Who is Sylvie Kant's deputy?"]
        alone = [mem.ask(q, max_new_tokens=16).text for q in questions]
        batcher = mem._answerer("smollm2-135m").decoder.batcher
        before = sum(n for size, n in batcher.batch_sizes.items() if size > 1)
        together: dict[int, str] = {}
        threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, mem.ask(questions[i], max_new_tokens=16).text))
                   for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert [together[i] for i in range(4)] == alone
    assert sum(n for size, n in batcher.batch_sizes.items() if size > 1) > before  # steps did run batched


@torch.no_grad()
def test_a_prompt_step_with_the_explicit_zero_mask_is_the_step_without(tiny):
    """generate.one_query_mask only changes which kernel runs, not what it computes."""
    from memstore.model.generate import one_query_mask

    with_mask, without = DynamicCache(), DynamicCache()
    prompt = torch.tensor([[5, 9, 14, 200, 31, 7, 88]])
    for cache in (with_mask, without):
        tiny.model(input_ids=prompt, **cache_arg(tiny, cache), use_cache=True)
    for token in (17, 40, 41):
        a = last_logits(tiny, input_ids=torch.tensor([[token]]), **cache_arg(tiny, with_mask), use_cache=True,
                        **one_query_mask(with_mask, 1))[0]
        b = last_logits(tiny, input_ids=torch.tensor([[token]]), **cache_arg(tiny, without), use_cache=True)[0]
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert one_query_mask(with_mask, 2) == {} and one_query_mask(DynamicCache(), 1) == {}
