"""Memory slots in the KV cache of a pretrained RoPE decoder.

The prompt is laid out as

    [prefix][slot 0][slot 1]...[slot k-1][question][generated tokens]
     0..P    P+i*S .. P+(i+1)*S                  P+k*S ..

Each slot holds one retrieved chunk's keys and values. A chunk is encoded once, after the
shared prefix (so it reads like the start of a document list), and its keys are stored
un-rotated (RoPE removed). Placing it in slot i rotates the keys to positions P+i*S...;
a chunk shorter than S leaves masked padding. Because RoPE is a rotation, rotating a key
by position p equals computing it at p: the model reads the slot as if the chunk had been
in the prompt at that place, without re-running it.
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


@torch.no_grad()
def encode_chunks(model, prefix: DynamicCache, chunks: list[list[int]]) -> list[np.ndarray]:
    """Per-chunk (2, layers, kv_heads, T, head_dim) fp16 arrays: un-rotated keys, and values.

    Chunks are run as one right-padded batch after the shared prefix: a causal model never
    lets a real token see the padding that follows it, so no mask is needed.
    """
    if not chunks:
        return []
    P = prefix.get_seq_length()
    T = max(len(c) for c in chunks)
    ids = torch.zeros((len(chunks), T), dtype=torch.long)
    for row, c in enumerate(chunks):
        ids[row, :len(c)] = torch.tensor(c)
    batch_prefix = DynamicCache(ddp_cache_data=[(k.expand(len(chunks), -1, -1, -1), v.expand(len(chunks), -1, -1, -1))
                                                for k, v in cache_layers(prefix)])
    positions = torch.arange(P, P + T)
    # the decoder body only: the LM head's logits for every chunk token would cost a quarter of the time
    model.model(input_ids=ids, **cache_arg(model, batch_prefix), position_ids=positions.expand(len(chunks), -1),
                use_cache=True)
    cos, sin = rope_cos_sin(model, positions)
    keys = torch.stack([layer.keys[:, :, P:, :] for layer in batch_prefix.layers], dim=1)  # (B, L, H, T, D)
    values = torch.stack([layer.values[:, :, P:, :] for layer in batch_prefix.layers], dim=1)
    keys = unrotate(keys.float(), cos, sin)
    out = torch.stack([keys, values.float()], dim=1).to(torch.float16).numpy()  # (B, 2, L, H, T, D)
    return [out[row, :, :, :, :len(c), :] for row, c in enumerate(chunks)]


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
    """A DynamicCache whose first P + k*S positions are the prefix and k memory slots."""

    def __init__(self, model, prefix: DynamicCache, layout: SlotLayout):
        self.model, self.layout = model, layout
        P, end = layout.prefix_len, layout.memory_end
        layers = []
        for k, v in cache_layers(prefix):
            _, H, _, D = k.shape
            keys = torch.zeros((1, H, end, D), dtype=k.dtype)
            values = torch.zeros((1, H, end, D), dtype=v.dtype)
            keys[:, :, :P], values[:, :, :P] = k, v
            layers.append((keys, values))
        self.cache = DynamicCache(ddp_cache_data=layers)
        self.mask = torch.zeros(end, dtype=torch.long)  # 1 = attend, 0 = empty slot padding
        self.mask[:P] = 1
        self.bias = torch.zeros(end)  # added to the attention logits of queries onto these positions
        self.slot_tokens = [0] * layout.n_slots  # how many real tokens each slot holds
        cos, sin = rope_cos_sin(model, torch.arange(layout.memory_end))
        self._cos, self._sin = cos, sin

    def fill(self, i: int, kv: np.ndarray) -> None:
        """Place one chunk's (2, L, H, T, D) memory in slot i, rotated to the slot's positions."""
        kv = torch.from_numpy(np.asarray(kv, dtype=np.float32))
        T = min(kv.shape[3], self.layout.slot_len)
        a = self.layout.slot_start(i)
        dtype = self.cache.layers[0].keys.dtype
        keys = rotate(kv[0, :, :, :T], self._cos[a:a + T], self._sin[a:a + T]).to(dtype)  # (L, H, T, D)
        values = kv[1, :, :, :T].to(dtype)
        for layer_idx, layer in enumerate(self.cache.layers):
            layer.keys[0, :, a:a + self.layout.slot_len] = 0
            layer.values[0, :, a:a + self.layout.slot_len] = 0
            layer.keys[0, :, a:a + T] = keys[layer_idx]
            layer.values[0, :, a:a + T] = values[layer_idx]
        self.mask[a:a + self.layout.slot_len] = 0
        self.mask[a:a + T] = 1
        self.slot_tokens[i] = T

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
        positions, ids = [], []
        for i in sorted(slot_ids):
            span = self.slot_positions(i)
            positions += span
            ids += slot_ids[i][:len(span)]
        if not positions:
            return
        end = self.layout.memory_end
        pos = torch.tensor(positions)
        n = len(positions)
        memory = torch.zeros(end).masked_fill(self.mask == 0, float("-inf")).expand(n, -1).clone()  # no slot bias
        memory[:, pos] = float("-inf")  # the stale copies of the tokens being recomputed
        memory = memory.masked_fill(torch.arange(end)[None, :] >= pos[:, None], float("-inf"))  # causal
        fresh = torch.full((n, n), float("-inf")).triu(1)
        mask = torch.cat([memory, fresh], dim=1)[None, None].to(self.cache.layers[0].keys.dtype)
        self.model.model(input_ids=torch.tensor([ids]), **cache_arg(self.model, self.cache),
                         position_ids=pos.view(1, -1), attention_mask=mask, use_cache=True)
        for layer in self.cache.layers:
            layer.keys[0, :, pos] = layer.keys[0, :, end:end + n]
            layer.values[0, :, pos] = layer.values[0, :, end:end + n]
        crop_to(self.cache, end)

    def set_bias(self, i: int, bias: float) -> None:
        """Add `bias` to every attention logit onto slot i (its attention weight times e^bias)."""
        a = self.layout.slot_start(i)
        self.bias[a:a + self.layout.slot_len] = bias

    def biased(self, i: int) -> bool:
        return bool(self.bias[self.layout.slot_start(i)] != 0)

    def drop_local(self) -> None:
        """Forget everything after the slots (question and generated tokens)."""
        crop_to(self.cache, self.layout.memory_end)

    @torch.no_grad()
    def forward(self, input_ids: list[int], output_attentions: bool = False) -> tuple[torch.Tensor, object]:
        """Run new local tokens after whatever the cache holds: (last position's logits, body output)."""
        past = self.cache.get_seq_length()
        n = len(input_ids)
        offset = past - self.layout.memory_end  # local tokens so far
        positions = torch.arange(self.layout.memory_end + offset, self.layout.memory_end + offset + n)
        return last_logits(self.model, input_ids=torch.tensor([input_ids]), **cache_arg(self.model, self.cache),
                           position_ids=positions.view(1, -1), attention_mask=self._attention_mask(n, offset),
                           use_cache=True, output_attentions=output_attentions)

    def _attention_mask(self, n: int, offset: int) -> torch.Tensor:
        """(1, 1, n, memory_end + offset + n) additive mask for n new local tokens after `offset` older
        ones: the slot biases on the memory, -inf on empty slot padding, causal over local tokens."""
        memory = self.bias.masked_fill(self.mask == 0, float("-inf")).expand(n, -1)
        local = torch.full((n, offset + n), float("-inf")).triu(offset + 1)
        return torch.cat([memory, local], dim=1)[None, None].to(self.cache.layers[0].keys.dtype)

    def slot_positions(self, i: int) -> range:
        """The cache positions of slot i's real tokens."""
        return range(self.layout.slot_start(i), self.layout.slot_start(i) + self.slot_tokens[i])

    def slot_spans(self) -> list[tuple[int, int]]:
        return [(self.layout.slot_start(i), self.layout.slot_start(i) + t) for i, t in enumerate(self.slot_tokens)]
