"""Memory slots in the KV cache of a pretrained RoPE decoder.

The prompt is laid out as

    [prefix][slot 0][slot 1]...[slot k-1][question][generated tokens]
     0..P    P+i*S .. P+(i+1)*S                  P+k*S ..

Each slot holds one retrieved chunk's keys and values. A chunk is encoded once, after the
shared prefix (so it reads like the start of a document list), and its keys are stored
un-rotated (RoPE removed). Placing it in slot i rotates the keys to positions P+i*S...;
a chunk shorter than S leaves a gap in positions (the cache holds only real tokens).
Because RoPE is a rotation, rotating a key by position p equals computing it at p: the
model reads the slot as if the chunk had been in the prompt at that place, without
re-running it.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache

# ---- RoPE helpers ----------------------------------------------------------------------------

def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_cos_sin(model, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (T, head_dim) for the given positions, from the model's own rotary_emb."""
    rotary = model.model.rotary_emb
    assert getattr(rotary, "attention_scaling", 1.0) == 1.0, "RoPE variants that scale attention are not supported"
    probe = torch.zeros(1, dtype=torch.float32)
    cos, sin = rotary(probe, positions.view(1, -1))  # (1, T, head_dim)
    return cos[0], sin[0]


def rotate(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply RoPE to keys (..., T, head_dim): the key as if computed at those positions."""
    return keys * cos + rotate_half(keys) * sin


def unrotate(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Inverse of `rotate` (a rotation by the negative angle)."""
    return keys * cos - rotate_half(keys) * sin


# ---- encoding chunks -------------------------------------------------------------------------

def cache_arg(model, cache) -> dict:
    """The keyword argument that hands a KV cache to the decoder body.

    Recent transformers 5.x releases renamed `past_key_values` to `cache` (the old name warns
    on every call and goes in 5.40); older ones only know `past_key_values`.
    """
    return {_cache_keyword(type(model.model)): cache}


@functools.cache
def _cache_keyword(body_class) -> str:  # once per class: cache_arg runs at every decoding step
    return "cache" if "cache" in inspect.signature(body_class.forward).parameters else "past_key_values"


@torch.no_grad()
def prefill(model, input_ids: list[int]) -> DynamicCache:
    cache = DynamicCache()
    model.model(input_ids=torch.tensor([input_ids]), **cache_arg(model, cache), use_cache=True)  # no logits needed
    return cache


def last_logits(model, **forward_args) -> tuple[torch.Tensor, object]:
    """(logits at the last position, the decoder body's output) for one forward pass.

    The LM head runs on the last hidden state alone, as a 2-D (1, hidden) matrix: given a 3-D
    (1, 1, hidden) input, a bfloat16 linear on CPU takes a batched-matmul path that copies the
    whole (vocab x hidden) weight, over an order of magnitude slower per call. Logit
    soft-capping (Gemma) is left out: it is monotonic, and the logits only feed an argmax.
    """
    out = model.model(**forward_args)
    last = out.last_hidden_state[0, -1:]  # (1, hidden)
    return model.lm_head(last)[0], out


def crop_to(cache: DynamicCache, length: int) -> None:
    """Keep the first `length` positions of the cache."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)  # transformers 5.x: a negative count of tokens to remove


def cache_layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


# Tokens per packed pass of encode_chunks. Every token of a pack attends over the whole pack (the
# mask hides the other chunks but is computed): long packs spend more on attention than padding saves.
PACK_TOKENS = 1024


def encode_chunks(model, prefix: DynamicCache, chunks: list[list[int]]) -> list[np.ndarray]:
    """Per-chunk (2, layers, kv_heads, T, head_dim) fp16 arrays: un-rotated keys, and values.

    Chunks run packed into sequences of at most PACK_TOKENS after the shared prefix, each at the
    positions it would have alone (P, P+1, ...) and attending to the prefix and its own earlier
    tokens only: the same memory as one chunk at a time, with no padding (a right-padded batch
    computed every chunk to the longest one's length).
    """
    out: list[np.ndarray] = []
    pack: list[list[int]] = []
    for chunk in chunks:
        if pack and sum(map(len, pack)) + len(chunk) > PACK_TOKENS:
            out += _encode_pack(model, prefix, pack)
            pack = []
        pack.append(chunk)
    return out + (_encode_pack(model, prefix, pack) if pack else [])


@torch.no_grad()
def _encode_pack(model, prefix: DynamicCache, chunks: list[list[int]]) -> list[np.ndarray]:
    P = prefix.get_seq_length()
    lengths = [len(c) for c in chunks]
    owner = torch.repeat_interleave(torch.arange(len(chunks)), torch.tensor(lengths))  # chunk of each token
    positions = torch.cat([torch.arange(P, P + n) for n in lengths])
    n = len(owner)
    own = (owner[:, None] == owner[None, :]) & (positions[None, :] <= positions[:, None])
    dtype = cache_layers(prefix)[0][0].dtype
    mask = torch.cat([torch.zeros(n, P), torch.zeros(n, n).masked_fill(~own, float("-inf"))], dim=1)[None, None]
    cache = DynamicCache(ddp_cache_data=[(k.clone(), v.clone()) for k, v in cache_layers(prefix)])
    # the decoder body only: the LM head's logits for every chunk token would cost a quarter of the time
    model.model(input_ids=torch.tensor([[t for c in chunks for t in c]]), **cache_arg(model, cache),
                position_ids=positions.view(1, -1), attention_mask=mask.to(dtype), use_cache=True)
    cos, sin = rope_cos_sin(model, positions)
    keys = torch.stack([layer.keys[0, :, P:, :] for layer in cache.layers])  # (L, H, n, D)
    values = torch.stack([layer.values[0, :, P:, :] for layer in cache.layers])
    keys = unrotate(keys.float(), cos, sin)
    out = torch.stack([keys, values.float()]).to(torch.float16).numpy()  # (2, L, H, n, D)
    starts = np.cumsum([0] + lengths)
    return [out[:, :, :, a:b, :] for a, b in zip(starts[:-1], starts[1:])]


# ---- the slot cache --------------------------------------------------------------------------

@dataclass
class SlotLayout:
    prefix_len: int  # P
    n_slots: int  # k
    slot_len: int  # S

    def slot_start(self, i: int) -> int:
        return self.prefix_len + i * self.slot_len

    @property
    def memory_end(self) -> int:
        return self.prefix_len + self.n_slots * self.slot_len


class SlotCache:
    """A DynamicCache holding the prefix and k memory slots, then the local tokens.

    RoPE positions follow the layout (slot i at P + i*S ..., the local tokens from P + k*S), but
    the cache holds only the slots' real tokens, back to back: a chunk shorter than S leaves a
    gap in positions, not masked padding that every decoding step would attend over (with k=4
    and two follow slots of 256, about half the memory positions were padding).
    """

    def __init__(self, model, prefix: DynamicCache, layout: SlotLayout):
        self.model, self.layout = model, layout
        self.prefix = cache_layers(prefix)
        self.slot_kv: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * layout.n_slots  # (L, H, T, D) each
        self.slot_tokens = [0] * layout.n_slots  # how many real tokens each slot holds
        self.slot_bias = [0.0] * layout.n_slots  # added to the attention logits of queries onto the slot
        cos, sin = rope_cos_sin(model, torch.arange(layout.memory_end))
        self._cos, self._sin = cos, sin
        self._bias_key: tuple | None = None
        self._bias = torch.zeros(0)
        self._build()  # sets self.cache and self._dirty

    @property
    def memory_len(self) -> int:
        """Cache entries before the local tokens: the prefix and the slots' real tokens."""
        return self.layout.prefix_len + sum(self.slot_tokens)

    def fill(self, i: int, kv: np.ndarray) -> None:
        """Place one chunk's (2, L, H, T, D) memory in slot i, rotated to the slot's positions. The local
        tokens are dropped (run them again over the new memory)."""
        kv = torch.from_numpy(np.asarray(kv, dtype=np.float32))
        T = min(kv.shape[3], self.layout.slot_len)
        a = self.layout.slot_start(i)
        dtype = self.prefix[0][0].dtype
        keys = rotate(kv[0, :, :, :T], self._cos[a:a + T], self._sin[a:a + T]).to(dtype)  # (L, H, T, D)
        self.slot_kv[i] = (keys, kv[1, :, :, :T].to(dtype))
        self.slot_tokens[i] = T
        self._dirty = True

    def _build(self) -> None:
        """The cache: prefix, then each filled slot's tokens, nothing local."""
        layers = []
        for layer, (k, v) in enumerate(self.prefix):
            keys = [k] + [kv[0][layer][None] for kv in self.slot_kv if kv is not None]
            values = [v] + [kv[1][layer][None] for kv in self.slot_kv if kv is not None]
            layers.append((torch.cat(keys, dim=2), torch.cat(values, dim=2)))
        self.cache = DynamicCache(ddp_cache_data=layers)
        self._dirty = False

    def _ready(self) -> None:
        if self._dirty:
            self._build()

    def _slot_cache_spans(self) -> list[tuple[int, int]]:
        """Each slot's (start, end) in the cache."""
        spans, at = [], self.layout.prefix_len
        for t in self.slot_tokens:
            spans.append((at, at + t))
            at += t
        return spans

    def _memory_positions(self) -> torch.Tensor:
        """The RoPE position of every memory entry of the cache."""
        parts = [torch.arange(self.layout.prefix_len)]
        parts += [torch.arange(self.layout.slot_start(i), self.layout.slot_start(i) + t)
                  for i, t in enumerate(self.slot_tokens)]
        return torch.cat(parts)

    def _memory_bias(self) -> torch.Tensor:
        """The slot biases over the memory entries, in the cache's dtype (kept until a slot changes)."""
        key = (tuple(self.slot_tokens), tuple(self.slot_bias))
        if self._bias_key != key:
            bias = torch.zeros(self.memory_len)
            for (a, b), value in zip(self._slot_cache_spans(), self.slot_bias):
                bias[a:b] = value
            self._bias, self._bias_key = bias.to(self.prefix[0][0].dtype), key
        return self._bias

    @torch.no_grad()
    def blend(self, slot_ids: dict[int, list[int]]) -> None:
        """Recompute the keys and values of the given slots' tokens ({slot: its token ids}) together.

        Each chunk's memory was encoded alone, so no slot token has seen another slot: where an
        answer needs several chunks at once (several values of a key, a chain of facts) the
        model reads them worse than the same chunks pasted together as text. Running those
        slots' tokens once more over the filled cache (the other slots' memory as stored, the
        stale copies of the recomputed tokens masked out) gives them that cross-slot view, at
        the cost of a prefill of those tokens only.
        """
        self._ready()
        self.drop_local()
        spans = self._slot_cache_spans()
        index, ids = [], []
        for i in sorted(slot_ids):
            a, b = spans[i]
            index += range(a, b)
            ids += slot_ids[i][:b - a]
        if not index:
            return
        end = self.memory_len
        idx = torch.tensor(index)
        positions = self._memory_positions()
        pos = positions[idx]
        n = len(index)
        memory = torch.zeros(n, end)  # no slot bias
        memory[:, idx] = float("-inf")  # the stale copies of the tokens being recomputed
        memory = memory.masked_fill(positions[None, :] >= pos[:, None], float("-inf"))  # causal, by position
        fresh = torch.full((n, n), float("-inf")).triu(1)
        mask = torch.cat([memory, fresh], dim=1)[None, None].to(self.cache.layers[0].keys.dtype)
        self.model.model(input_ids=torch.tensor([ids]), **cache_arg(self.model, self.cache),
                         position_ids=pos.view(1, -1), attention_mask=mask, use_cache=True)
        for layer in self.cache.layers:
            layer.keys[0, :, idx] = layer.keys[0, :, end:end + n]
            layer.values[0, :, idx] = layer.values[0, :, end:end + n]
        crop_to(self.cache, end)
        for i in slot_ids:  # keep the recomputed memory if the cache is rebuilt (a later fill)
            a, b = spans[i]
            self.slot_kv[i] = (torch.stack([layer.keys[0, :, a:b] for layer in self.cache.layers]),
                               torch.stack([layer.values[0, :, a:b] for layer in self.cache.layers]))

    def set_bias(self, i: int, bias: float) -> None:
        """Add `bias` to every attention logit onto slot i (its attention weight times e^bias)."""
        self.slot_bias[i] = bias

    def keep_local(self, n: int) -> bool:
        """Forget the local tokens after the first n; False (nothing done) where the slots changed since
        the local tokens were run, so that those are stale."""
        if self._dirty:
            return False
        crop_to(self.cache, self.memory_len + n)
        return True

    def drop_local(self) -> None:
        """Forget everything after the slots (question and generated tokens)."""
        if not self._dirty:
            crop_to(self.cache, self.memory_len)

    @torch.no_grad()
    def forward(self, input_ids: list[int], output_attentions: bool = False) -> tuple[torch.Tensor, object]:
        """Run new local tokens after whatever the cache holds: (last position's logits, body output)."""
        self._ready()
        n = len(input_ids)
        offset = self.cache.get_seq_length() - self.memory_len  # local tokens so far
        positions = torch.arange(self.layout.memory_end + offset, self.layout.memory_end + offset + n)
        return last_logits(self.model, input_ids=torch.tensor([input_ids]), **cache_arg(self.model, self.cache),
                           position_ids=positions.view(1, -1), attention_mask=self._attention_mask(n, offset),
                           use_cache=True, output_attentions=output_attentions)

    def next_position(self) -> tuple[int, torch.Tensor]:
        """(RoPE position, attention bias over the cache's entries) of the next local token: what a
        batched decoding step (model.batching) needs to run it as `forward` would."""
        self._ready()
        offset = self.cache.get_seq_length() - self.memory_len
        bias = self._memory_bias()
        return self.layout.memory_end + offset, torch.cat([bias, bias.new_zeros(offset)])

    def _attention_mask(self, n: int, offset: int) -> torch.Tensor:
        """(1, 1, n, memory_len + offset + n) additive mask for n new local tokens after `offset` older
        ones: the slot biases on the memory, causal over local tokens."""
        memory = self._memory_bias().expand(n, -1)
        local = torch.full((n, offset + n), float("-inf"), dtype=memory.dtype).triu(offset + 1)
        return torch.cat([memory, local], dim=1)[None, None]

    def slot_spans(self) -> list[tuple[int, int]]:
        """Each slot's (start, end) in the cache: where the answer's attention onto it is read."""
        self._ready()
        return self._slot_cache_spans()
