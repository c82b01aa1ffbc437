"""Concurrent answers decode together: one forward pass for the next token of every answer.

Decoding a token reads every weight of the model once, so on a CPU a step is bound by memory
bandwidth, and a step for 4 answers costs little more than a step for one. Each answer keeps
its own cache (its own memory slots, biases and positions); when several answers are at a
decoding step, their caches are laid side by side, right-padded to the longest, and run as
one batch:

    row b: [answer b's cache entries][padding, masked][its new token]
    mask:  its slot biases on its entries, -inf on the padding, 0 on the new token

and each answer's new keys and values are appended to its own cache. A step alone runs
exactly as it would without this module. Every other forward pass of the model (a prompt,
a refill, chunks to encode) holds the same lock as a batch, so passes never run at once.
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from memstore.model.memory import cache_arg

# How long a step waits for the other answers' steps before the batch runs without them: an
# answer between steps is decoding its text or reading its next chunk (milliseconds); one that
# is re-running its tokens over a new chunk holds the model lock, and the batch waits for it anyway.
GATHER_S = 0.01
MAX_BATCH = 8


@dataclass(eq=False)
class DecodeStep:
    """One answer's next token, to run after its cache: at `position`, with `bias` added to the
    attention logits onto the cache's entries (its slot biases; zeros in a plain prompt)."""

    cache: DynamicCache
    token: int
    position: int
    bias: torch.Tensor  # (cache length,)
    solo: Callable[[], torch.Tensor]  # the step run alone: logits (vocab,)
    logits: torch.Tensor | None = None
    error: BaseException | None = None
    done: bool = False


class StepBatcher:
    """Merges the decoding steps of the answers that are decoding at the same time (its members)."""

    def __init__(self, model, lock: threading.RLock, *, gather_s: float = GATHER_S, max_batch: int = MAX_BATCH):
        self.model, self.lock = model, lock
        self.gather_s, self.max_batch = gather_s, max_batch
        self.batch_sizes: Counter = Counter()  # steps run per batch size, for benchmarks and tests
        self._changed = threading.Condition()
        self._pending: list[tuple[float, DecodeStep]] = []
        self._members = 0
        self._running = False
        self._last_end = 0.0  # when the last batch ended: its answers' next steps come soon after

    @contextlib.contextmanager
    def member(self):
        """While an answer decodes: the others' steps wait a moment for its step."""
        with self._changed:
            self._members += 1
        try:
            yield
        finally:
            with self._changed:
                self._members -= 1
                self._changed.notify_all()

    def step(self, step: DecodeStep) -> torch.Tensor:
        """The logits after `step`'s token, its key and value appended to its cache."""
        with self._changed:
            self._pending.append((time.monotonic(), step))
            self._changed.notify_all()
        while True:
            with self._changed:
                while not step.done and (self._running or not self._gathered()):
                    wait = None if self._running else self.gather_s - (time.monotonic() - self._since())
                    self._changed.wait(None if wait is None else max(wait, 0.0005))
                if step.done:
                    break
                self._running = True
            self._lead()  # this step may be left for the next batch where more than max_batch wait
        if step.error is not None:
            raise step.error
        return step.logits

    def _gathered(self) -> bool:
        """Whether the oldest pending step should run now: every member has its step in, or it has waited enough."""
        waited = time.monotonic() - self._since()
        return len(self._pending) >= min(self._members, self.max_batch) or waited >= self.gather_s

    def _since(self) -> float:
        """When the oldest pending step began to wait for the others: its arrival, or the end of the
        batch that ran while it waited (whose answers are then about to step again; without this a
        step left out of one batch runs alone, and the answers split into groups that take turns)."""
        return max(self._pending[0][0], self._last_end)

    def _lead(self) -> None:
        """Run the pending steps (this thread's among them, or the oldest ones) as one batch."""
        batch: list[DecodeStep] = []
        try:
            with self.lock:  # steps that come while another pass runs join this batch
                with self._changed:
                    batch = [s for _, s in self._pending[:self.max_batch]]
                    del self._pending[:len(batch)]
                try:
                    if len(batch) == 1:
                        batch[0].logits = batch[0].solo()
                    else:
                        for s, logits in zip(batch, run_batch(self.model, batch)):
                            s.logits = logits
                except BaseException as e:  # noqa: BLE001 - each answer raises it in its own thread
                    for s in batch:
                        s.error = e
        finally:
            with self._changed:
                self.batch_sizes[len(batch)] += len(batch)
                for s in batch:
                    s.done = True
                self._running = False
                self._last_end = time.monotonic()
                self._changed.notify_all()


class _BatchLayer(DynamicLayer):
    """One layer of a batch's cache: every answer's entries, padded to the longest, then one column
    that the step's new keys and values fill in place (a cache that grew by concatenation would copy
    the whole batch again at every layer)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.keys, self.values = keys, values  # (B, kv_heads, T + 1, head_dim)
        self.device, self.is_initialized = keys.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.keys[:, :, -1:] = key_states
        self.values[:, :, -1:] = value_states
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.keys.shape[-2] - 1


@torch.no_grad()
def run_batch(model, steps: list[DecodeStep]) -> torch.Tensor:
    """(len(steps), vocab) logits of each step's token after its own cache, in one forward pass."""
    lengths = [s.cache.get_seq_length() for s in steps]
    T, B = max(lengths), len(steps)
    first = steps[0].cache.layers[0].keys  # (1, kv_heads, length, head_dim)
    dtype = first.dtype
    layers = []
    for layer in range(len(steps[0].cache.layers)):
        keys = first.new_empty(B, first.shape[1], T + 1, first.shape[3])  # (B, kv_heads, T + 1, head_dim)
        values = torch.empty_like(keys)
        for b, s in enumerate(steps):
            n = lengths[b]
            keys[b, :, :n] = s.cache.layers[layer].keys[0]
            values[b, :, :n] = s.cache.layers[layer].values[0]
            keys[b, :, n:T] = 0  # masked, but never NaN: a masked NaN value still poisons the weighted sum
            values[b, :, n:T] = 0
        layers.append(_BatchLayer(keys, values))
    mask = torch.full((B, 1, 1, T + 1), float("-inf"), dtype=dtype)
    for b, s in enumerate(steps):
        mask[b, 0, 0, :lengths[b]] = s.bias.to(dtype)
        mask[b, 0, 0, T] = 0.0
    batched = DynamicCache()
    batched.layers = layers
    out = model.model(input_ids=torch.tensor([[s.token] for s in steps]), **cache_arg(model, batched),
                      position_ids=torch.tensor([[s.position] for s in steps]), attention_mask=mask, use_cache=True)
    logits = model.lm_head(out.last_hidden_state[:, -1])  # (B, hidden) in: see memory.last_logits
    for layer, batch_layer in enumerate(layers):
        new_keys, new_values = batch_layer.keys[:, :, T:].contiguous(), batch_layer.values[:, :, T:].contiguous()
        for b, s in enumerate(steps):
            s.cache.layers[layer].update(new_keys[b:b + 1], new_values[b:b + 1])
    return logits
