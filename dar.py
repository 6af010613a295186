"""
Distance-Adaptive Representation (DAR) in a nanoGPT-style GPT, in one file.

A token's key and value keep their full head dimension d while the token is among the
last `window` tokens, and only their first `far_k_dim` / `far_v_dim` coordinates once it
is further away. One softmax spans both tiers, so a distant token is the same vector seen
at lower resolution. At long contexts the KV cache shrinks by about
(far_k_dim + far_v_dim) / 2d. README.md explains the method and its regimes.

That is the "slice" far mode. In the "latent" mode (the paper's bottleneck, as MLA does it
for every token) a distant token is seen through a learned bottleneck instead: its key and
value are the layer's own projections of far_up(far_down(x)), and the cache keeps only the
r-dimensional far_down(x). Both modes answer one question: what a distant token keeps.

Sections, top to bottom:
  1. GPTConfig            the nanoGPT fields plus window, the far mode and its sizes, kv_shift
  2. dar_attention        the training path: masked scaled_dot_product_attention calls
  3. kv_shift             the learnable mix of each key/value with the previous token's
  4. LayerCache, KVCache  the two-tier cache, preallocated: a ring of full keys, a far store
                          of slices (SliceFar) or of latents read through absorbed maps (LatentFar)
  5. GPT                  nanoGPT's model with DAR attention; forward, cached forward, generate
  6. convert              rotate a trained full-dimension model so truncation loses least
                          (by the weights' SVD, or PCA of keys/values on a calibration batch),
                          or give it a bottleneck along the principal axes of its inputs
"""

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn as nn
from torch.nn import functional as F


# ----------------------------------------------------------------------------------------
# 1. Configuration

@dataclass
class GPTConfig:
    block_size: int = 256
    vocab_size: int = 50304
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True
    window: int = 64                   # tokens at distance < window keep full dimensions
    far_k_dim: Optional[int] = None    # key coordinates kept beyond the window (None: head_dim/4)
    far_v_dim: Optional[int] = None    # value coordinates kept beyond the window (None: head_dim/4)
    kv_shift: bool = False             # KV shifting attention (Xu et al.)
    far_mode: str = "slice"            # what a distant token keeps: "slice" (far_k_dim, far_v_dim
                                       # leading coordinates) or "latent" (far_down(x), r numbers)
    far_latent_dim: Optional[int] = None   # latent: the bottleneck width r (None: n_embd/4)

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if self.window < 0:
            raise ValueError(f"window={self.window} must be >= 0")
        if self.far_mode not in ("slice", "latent"):
            raise ValueError(f"far_mode={self.far_mode!r} must be 'slice' or 'latent'")
        self._check_latent() if self.far_mode == "latent" else self._check_slice()

    def _check_slice(self):
        if self.far_latent_dim is not None:
            raise ValueError("far_latent_dim applies to far_mode='latent' only")
        for name in ("far_k_dim", "far_v_dim"):
            if getattr(self, name) is None:
                setattr(self, name, max(1, self.head_dim // 4))
            if not 0 <= getattr(self, name) <= self.head_dim:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, head_dim={self.head_dim}]")
        if self.window == 0 and self.far_k_dim == 0 and self.far_v_dim == 0:
            raise ValueError("window=0 with far_k_dim=0 and far_v_dim=0 leaves nothing to attend to")

    def _check_latent(self):
        for name in ("far_k_dim", "far_v_dim"):
            if getattr(self, name) is not None:
                raise ValueError(f"{name} applies to far_mode='slice' only (latent: far_latent_dim)")
        if self.far_latent_dim is None:
            self.far_latent_dim = max(1, self.n_embd // 4)
        if not 1 <= self.far_latent_dim <= self.n_embd:
            raise ValueError(f"far_latent_dim={self.far_latent_dim} must be in [1, n_embd={self.n_embd}]")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @property
    def is_full(self):
        """True when every token a context can hold is attended at full dimension."""
        if self.window >= self.block_size:
            return True
        d = self.head_dim
        return self.far_mode == "slice" and self.far_k_dim == d and self.far_v_dim == d


# ----------------------------------------------------------------------------------------
# 2. DAR attention over whole sequences (training and the uncached forward)
#
# score(i, j) = q_i . k_j / sqrt(d)         if 0 <= i - j < window   (local tier)
#             = q_i . far_k_j / sqrt(d)     if i - j >= window       (far tier)
# one softmax over both tiers; a far token contributes far_v_j. What a distant token keeps:
#   slice:  far_k_j = [k_j[:rk], 0, ..., 0], far_v_j = [v_j[:rv], 0, ..., 0]
#   latent: far_k_j, far_v_j = the layer's key and value projections of far_up(far_down(x_j))
#
# Trick: give attention the keys and their far copies side by side, and a mask that lets
# token i see the first copy of j only inside the window and the second copy only beyond
# it. This is exactly the formula (zeroed coordinates add nothing to a dot product),
# computed by the fused SDPA kernel.
#
# Done in one call over all T queries, the kernel scores T x 2T pairs, most of them masked.
# So queries go in blocks of about `window` rows: a block sees full keys only from the
# window before its first query, and far keys only up to its last query minus the window.
# With block >= T it is the single call (the tests check both against a naive oracle).

def tier_masks(q_pos, k_pos, window):
    """Boolean (len(q_pos), len(k_pos)) masks: which keys each query sees locally / far."""
    dist = q_pos[:, None] - k_pos[None, :]
    return (dist >= 0) & (dist < window), dist >= window


def far_slice(k, v, far_k_dim, far_v_dim):
    """Slice mode: a distant token keeps its first far_k_dim / far_v_dim coordinates, given
    here at full width with the rest zero. (k, v) itself: it keeps everything; (None, None):
    nothing (a sliding window)."""
    d = k.size(-1)
    if far_k_dim == d and far_v_dim == d:
        return k, v
    if far_k_dim == 0 and far_v_dim == 0:
        return None, None
    return F.pad(k[..., :far_k_dim], (0, d - far_k_dim)), F.pad(v[..., :far_v_dim], (0, d - far_v_dim))


def dar_attention(q, k, v, far_k, far_v, window, dropout_p=0.0, block=None):
    """q, k, v: (B, H, T, d); far_k, far_v: (B, H, T, d), each token as seen beyond the
    window (None: no far tier). Returns (B, H, T, d). `block`: queries per SDPA call."""
    T = q.size(-2)
    if window >= T or (far_k is k and far_v is v):   # distance changes nothing
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    # Sliding window: the far tier holds nothing, so it is left out of the softmax
    # entirely; zero-score entries would let the count of old tokens dilute it.
    has_far = far_k is not None
    block = block or max(window, 32)   # at least 32 queries a call keeps the loop short
    pos, out = torch.arange(T, device=q.device), []
    for start in range(0, T, block):
        end = min(T, start + block)
        near = max(0, start - window + 1)            # oldest token local to this block
        n_far = max(0, end - window) if has_far else 0   # far tokens: j <= i - window
        local, _ = tier_masks(pos[start:end], pos[near:end], window)
        _, far = tier_masks(pos[start:end], pos[:n_far], window)
        keys, values = k[:, :, near:end], v[:, :, near:end]
        if has_far:
            keys = torch.cat([keys, far_k[:, :, :n_far]], dim=2)
            values = torch.cat([values, far_v[:, :, :n_far]], dim=2)
        mask = torch.cat([local, far], dim=1)
        out.append(F.scaled_dot_product_attention(q[:, :, start:end], keys, values,
                                                  attn_mask=mask, dropout_p=dropout_p))
    return torch.cat(out, dim=2)


# ----------------------------------------------------------------------------------------
# 3. KV shifting: k^_t = now * k_t + prev * k_{t-1}, per head, with k_{-1} = 0.
# `last` is the raw (unshifted) key of the token before x[:, :, 0], or None at the start.

def kv_shift(x, last, now, prev):
    if last is None:
        last = torch.zeros_like(x[:, :, :1])
    x_prev = torch.cat([last, x[:, :, :-1]], dim=2)
    return now.view(1, -1, 1, 1) * x + prev.view(1, -1, 1, 1) * x_prev


# ----------------------------------------------------------------------------------------
# 4. The two-tier KV cache
#
# Per layer: a ring buffer of the last `window` tokens' full keys and values, where the
# token at position p lives in slot p % window, and a far store where an older token's
# first far_k_dim / far_v_dim coordinates live at index p. When a token leaves the window
# only those coordinates are copied to the far store; the rest are never stored.
# Like the static caches of gpt-fast and nanochat, both are allocated once (at the first
# tokens, when their dtype and device are known) for the most a context can hold,
# block_size tokens, and written in place; attention reads views of the filled part. In
# the full regime every token is local: the ring holds block_size tokens and never wraps,
# so the same code is a plain static full cache.
# The latent mode keeps the same ring; its far store holds each token's latent far_down(x)
# instead (LatentLayerCache), and a query reads it without rebuilding a far key (LatentFar).
# Either far tier is read through two calls: its scores against the queries, and its
# weighted values added to the output.

def masked(scores, mask):
    return scores if mask is None else scores.masked_fill(~mask, float("-inf"))


class SliceFar:
    """Slice mode's far tier: the first far_k_dim / far_v_dim coordinates of distant keys
    and values, (B, H, n_far, far_k_dim / far_v_dim). Queries, weights and outputs come as
    (B * H, n, .) views, for bmm."""

    def __init__(self, k, v):
        self.k, self.v = k, v

    def scores(self, q):
        return torch.bmm(q[..., :self.k.size(-1)], self.k.flatten(0, 1).mT)

    def add_output(self, y, att):   # a far value is [v[:rv], 0, ..., 0]
        y[..., :self.v.size(-1)] += torch.bmm(att, self.v.flatten(0, 1))


class LatentFar:
    """Latent mode's far tier: each distant token's latent c = far_down(x), (B, n_far, r),
    one for all heads. Head h's far key is W_K far_up c + b_K (W_K, b_K: the head's rows of
    c_attn), so q . k = (q W_K far_up) . c + q . b_K: the query moves into the latent space
    and far keys are never rebuilt. Likewise the weighted far values are
    W_V far_up (sum_j a_j c_j) + (sum_j a_j) b_V. `maps` come from absorbed_maps.
    With kv_shift, far key j is now * far_k_j + prev * far_k_{j-1}, so its score mixes the
    scores of j and j - 1, and far value j's weight moves partly onto j - 1."""

    def __init__(self, latents, maps):
        self.latents = latents
        self.key_map, self.key_bias, self.value_map, self.value_bias, self.shift = maps

    def mix(self, now, prev, t, back):
        """now * t + prev * t moved one far token back (back=True: t_{j-1}, 0 at j = 0) or
        on (t_{j+1}, 0 at the last), per head; t: (B * H, n, n_far)."""
        now, prev = (w.repeat(self.latents.size(0)).view(-1, 1, 1) for w in (now, prev))
        return now * t + prev * (F.pad(t[..., :-1], (1, 0)) if back else F.pad(t[..., 1:], (0, 1)))

    def scores(self, q):   # q: (B * H, n, d) -> (B * H, n, n_far)
        B, n = self.latents.size(0), q.size(1)
        q = q.unflatten(0, (B, -1))
        q_latent = (q @ self.key_map).flatten(1, 2)   # (B, H * n, r): heads share the latents
        scores = torch.bmm(q_latent, self.latents.mT).view(B * q.size(1), n, self.latents.size(1))
        if self.key_bias is not None:
            scores = scores + (q * self.key_bias.unsqueeze(1)).sum(-1, keepdim=True).flatten(0, 1)
        return scores if self.shift is None else self.mix(*self.shift[:2], scores, back=True)

    def add_output(self, y, att):
        if self.shift is not None:   # sum_j a_j (now v_j + prev v_{j-1}) = sum_j (now a_j + prev a_{j+1}) v_j
            att = self.mix(*self.shift[2:], att, back=False)
        B, n = self.latents.size(0), att.size(1)
        summed = torch.bmm(att.reshape(B, att.size(0) // B * n, att.size(2)), self.latents)   # (B, H * n, r)
        y += (summed.unflatten(1, (-1, n)) @ self.value_map.mT).flatten(0, 1)
        if self.value_bias is not None:
            y += (att.sum(-1, keepdim=True).unflatten(0, (B, -1)) * self.value_bias.unsqueeze(1)).flatten(0, 1)


def two_tier_attention(q, local_k, local_v, far=None, local_mask=None, far_mask=None):
    """One softmax over full-dimension local keys and a far tier (SliceFar, LatentFar or
    None). q: (B, H, n, d); masks (n, keys) are True where a query may look."""
    if far is None:   # one tier (a full cache, a sliding window): the fused kernel
        return F.scaled_dot_product_attention(q, local_k, local_v, attn_mask=local_mask)
    B, H, n, d = q.shape
    # (B * H, ., .) views for bmm: 4-d matmul would add expand and reshape calls, which
    # cost more than the arithmetic when decoding one token
    q, local_k, local_v = (t.flatten(0, 1) for t in (q / math.sqrt(d), local_k, local_v))
    scores = torch.cat([masked(torch.bmm(q, local_k.mT), local_mask), masked(far.scores(q), far_mask)], dim=-1)
    att = F.softmax(scores, dim=-1)
    y = torch.bmm(att[..., :local_k.size(1)], local_v)
    far.add_output(y, att[..., local_k.size(1):])
    return y.unflatten(0, (B, H))


class LayerCache:
    """Slice mode: the ring and a far store of leading coordinates."""
    buffers = ("local_k", "local_v", "far_k", "far_v")   # what copy_rows copies

    def __init__(self, config, batch_size):
        self.shape = (batch_size, config.n_head)
        self.head_dim, self.far_k_dim, self.far_v_dim = config.head_dim, config.far_k_dim, config.far_v_dim
        self.window = config.block_size if config.is_full else min(config.window, config.block_size)
        self.far_size = config.block_size - self.window   # positions that can ever be far
        self.has_far = self.far_size > 0 and bool(self.far_k_dim or self.far_v_dim)   # sliding: none
        self.length = 0                            # tokens seen so far
        self.local_k = self.local_v = None         # (B, H, window, d), slot p % window
        self.far_k = self.far_v = None             # (B, H, block_size - window, far_k/v_dim)
        self.last_k = self.last_v = None           # raw key/value of the last token (kv_shift)

    def allocate(self, like):
        """The buffers, once, in the dtype and on the device of `like`."""
        self.local_k, self.local_v = (like.new_empty(*self.shape, self.window, self.head_dim) for _ in "kv")
        if self.has_far:
            self.allocate_far(like)

    def allocate_far(self, like):
        self.far_k = like.new_empty(*self.shape, self.far_size, self.far_k_dim)
        self.far_v = like.new_empty(*self.shape, self.far_size, self.far_v_dim)

    def held(self):
        """Views of what is filled: local_k, local_v and the far tier (None: none)."""
        if self.local_k is None:
            return None, None, None
        n_local, n_far = min(self.length, self.window), max(0, self.length - self.window)
        return self.local_k[:, :, :n_local], self.local_v[:, :, :n_local], self.far_upto(n_far)

    def far_upto(self, n):
        """The far tier of tokens 0 .. n - 1 (None: none is kept)."""
        return SliceFar(self.far_k[:, :, :n], self.far_v[:, :, :n]) if self.has_far else None

    def tier_nbytes(self):
        local_k, local_v, far = self.held()
        return tensor_bytes((local_k, local_v)), tensor_bytes((far.k, far.v) if far else ())

    def attend(self, q, k, v):
        """Attend n new queries to everything held plus the n new keys/values (already
        shifted), then keep those. q, k, v: (B, H, n, d). Returns (B, H, n, d)."""
        if self.local_k is None:
            self.allocate(k)
        return self._attend_one(q, k, v) if q.size(2) == 1 else self._attend_chunk(q, k, v)

    def _attend_one(self, q, k, v):
        """Decoding token t: token t - window leaves the ring for the far store and t takes
        its slot (with window 0, t goes to the far store). Then every ring token is local
        and every stored one far: no masks."""
        t, W = self.length, self.window
        if W == 0:
            self._store_far(t, k, v)
        else:
            slot = t % W
            if t >= W:
                self._store_far(t - W, self.local_k[:, :, slot:slot + 1], self.local_v[:, :, slot:slot + 1])
            self.local_k[:, :, slot:slot + 1] = k
            self.local_v[:, :, slot:slot + 1] = v
        self.length = t + 1
        return two_tier_attention(q, *self.held())

    def _attend_chunk(self, q, k, v):
        """A prompt chunk: a new token may see a held or new token locally or far (the
        chunk spans the window boundary), so positions decide, as in dar_attention."""
        n, W, L = q.size(2), self.window, self.length
        local_k, local_v, _ = self.held()
        first = L - local_k.size(2)   # the oldest ring token; ring slots in position order:
        ring = torch.arange(first, L, device=q.device) % max(W, 1)
        recent_k, recent_v = torch.cat([local_k[:, :, ring], k], 2), torch.cat([local_v[:, :, ring], v], 2)
        new_pos, recent_pos = (torch.arange(start, L + n, device=q.device) for start in (L, first))
        local, _ = tier_masks(new_pos, recent_pos, W)
        far = self.chunk_far(L + n, recent_k, recent_v)
        _, far_mask = tier_masks(new_pos, torch.arange(L + n, device=q.device), W)
        y = two_tier_attention(q, recent_k, recent_v, far, local, far_mask)
        # keep: tokens now beyond the window go to the far store, the rest to their slots
        leaving = max(0, L + n - W - first)
        self._store_far(first, recent_k[:, :, :leaving], recent_v[:, :, :leaving])
        if W > 0:
            slots = recent_pos[leaving:] % W
            self.local_k.index_copy_(2, slots, recent_k[:, :, leaving:])
            self.local_v.index_copy_(2, slots, recent_v[:, :, leaving:])
        self.length = L + n
        return y

    def chunk_far(self, end, recent_k, recent_v):
        """The far tier of every token before `end`, which a chunk's queries may see far:
        held far tokens, then the ring's and the chunk's (recent_k, recent_v), sliced."""
        far = self.held()[2]
        if far is None:
            return None
        return SliceFar(torch.cat([far.k, recent_k[..., :self.far_k_dim]], 2),
                        torch.cat([far.v, recent_v[..., :self.far_v_dim]], 2))

    def _store_far(self, start, k, v):
        """Write tokens start, start + 1, ... that left the window to the far store, first
        coordinates only."""
        if self.has_far:
            self.far_k[:, :, start:start + k.size(2)] = k[..., :self.far_k_dim]
            self.far_v[:, :, start:start + v.size(2)] = v[..., :self.far_v_dim]


class LatentLayerCache(LayerCache):
    """Latent mode: the same ring, and a store of each token's latent far_down(x),
    (B, block_size, r). A token's x is gone once it has been attended, so its latent is
    written when it arrives (at index p), not when it leaves the window: the store holds
    min(T, window) latents more than the far tier reads, r numbers each."""
    buffers = ("local_k", "local_v", "latents")

    def __init__(self, config, batch_size):
        super().__init__(config, batch_size)
        self.has_far, self.latent_dim = self.far_size > 0, config.far_latent_dim
        self.latents = None   # (B, block_size, r), index p
        self.maps = None      # the layer's absorbed maps, taken at the first tokens of a fill

    def allocate_far(self, like):
        self.latents = like.new_empty(self.shape[0], self.window + self.far_size, self.latent_dim)

    def attend(self, q, k, v, latents, maps):
        """As LayerCache.attend; latents: far_down(x) of the new tokens, (B, n, r); maps: a
        function giving the layer's absorbed maps, called at the first tokens of each fill
        (so a cache reused after training steps reads the new weights)."""
        if self.length == 0:
            self.maps = maps()
        if self.local_k is None:
            self.allocate(k)
        if self.has_far:
            self.latents[:, self.length:self.length + latents.size(1)] = latents
        return super().attend(q, k, v)

    def far_upto(self, n):
        return LatentFar(self.latents[:, :n], self.maps) if self.has_far else None

    def tier_nbytes(self):
        local_k, local_v, _ = self.held()   # and a latent for every token seen
        return tensor_bytes((local_k, local_v)), tensor_bytes([self.latents[:, :self.length]] if self.has_far else [])

    def chunk_far(self, end, recent_k, recent_v):
        return self.far_upto(end)

    def _store_far(self, start, k, v):
        pass   # the latent was stored when the token arrived


def tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


class KVCache:
    """One LayerCache per layer. Create with GPT.new_cache(batch_size)."""

    def __init__(self, config, batch_size):
        self.config, self.batch_size = config, batch_size
        layer_cache = LatentLayerCache if config.far_mode == "latent" else LayerCache
        self.layers = [layer_cache(config, batch_size) for _ in range(config.n_layer)]

    def reset(self):
        """Forget every token; the buffers stay for the next prefill."""
        for layer in self.layers:
            layer.length, layer.last_k, layer.last_v = 0, None, None

    def copy_rows(self, prefilled):
        """Take over a cache of fewer rows, each repeated batch_size // prefilled.batch_size
        times (rows b * repeats, ... are copies of row b): samples share one prefill."""
        repeats = self.batch_size // prefilled.batch_size
        if repeats * prefilled.batch_size != self.batch_size or prefilled.config != self.config:
            raise ValueError("copy_rows needs a cache of the same config and a batch size dividing this one's")
        for mine, theirs in zip(self.layers, prefilled.layers):
            if theirs.local_k is not None and mine.local_k is None:
                mine.allocate(theirs.local_k)
            for name in mine.buffers:
                src = getattr(theirs, name)
                if src is not None:   # in place, each row broadcast to its copies
                    getattr(mine, name).unflatten(0, (-1, repeats)).copy_(src.unsqueeze(1))
            mine.last_k, mine.last_v = (None if t is None else t.repeat_interleave(repeats, 0)
                                        for t in (theirs.last_k, theirs.last_v))
            mine.length = theirs.length
            if isinstance(mine, LatentLayerCache):   # taken at the first tokens, which mine did not see
                mine.maps = theirs.maps

    @property
    def length(self):
        return self.layers[0].length

    def tier_nbytes(self):
        """(local, far) bytes held: the ring's keys and values, the far store's slices or
        latents."""
        local, far = zip(*(layer.tier_nbytes() for layer in self.layers))
        return sum(local), sum(far)

    @property
    def nbytes(self):
        """Bytes held: DESIGN.md's formula at the current length (plus, with kv_shift, one
        raw key and value per head; latent: a latent for every token, README.md)."""
        return sum(self.tier_nbytes()) + sum(tensor_bytes((l.last_k, l.last_v)) for l in self.layers)

    @property
    def allocated_nbytes(self):
        """Bytes of every tensor the cache holds: nbytes at block_size tokens. (Latent: the
        absorbed maps are the layer's weights, 2 * n_embd * r a layer, not counted.)"""
        return sum(tensor_bytes(vars(layer).values()) for layer in self.layers)

    @property
    def full_nbytes(self):
        """Bytes a full-dimension cache of the same length and dtype would hold."""
        c, local_k = self.config, self.layers[0].local_k
        element_size = 0 if local_k is None else local_k.element_size()
        return c.n_layer * self.batch_size * self.length * 2 * c.n_embd * element_size


# ----------------------------------------------------------------------------------------
# 5. The GPT. In the full regime this is nanoGPT's model: same parameter names and shapes,
# so a nanoGPT state dict loads as is. KV shifting adds four (n_head,) vectors per layer.

class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
        self.window, self.far_k_dim, self.far_v_dim = config.window, config.far_k_dim, config.far_v_dim
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.far_mode = config.far_mode
        if self.far_mode == "latent":   # the bottleneck a distant token's attention input passes
            self.far_down = nn.Linear(config.n_embd, config.far_latent_dim, bias=False)
            self.far_up = nn.Linear(config.far_latent_dim, config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.kv_shift = config.kv_shift
        if self.kv_shift:   # init as in the paper: now ~ U(0, 1), prev = 1 - now
            k_now, v_now = torch.rand(config.n_head), torch.rand(config.n_head)
            self.k_shift_now, self.k_shift_prev = nn.Parameter(k_now), nn.Parameter(1 - k_now)
            self.v_shift_now, self.v_shift_prev = nn.Parameter(v_now), nn.Parameter(1 - v_now)

    def heads(self, t):
        """(B, T, C) -> (B, n_head, T, head_dim)"""
        B, T, C = t.size()
        return t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)

    def far_keys_values(self, x, k, v):
        """What each token keeps beyond the window, as full-width keys and values."""
        if self.far_mode == "slice":
            return far_slice(k, v, self.far_k_dim, self.far_v_dim)
        x_far = self.far_up(self.far_down(x))
        C = self.n_embd   # the layer's own key and value projections, bias included
        far = F.linear(x_far, self.c_attn.weight[C:], None if self.c_attn.bias is None else self.c_attn.bias[C:])
        far_k, far_v = (self.heads(t) for t in far.split(C, dim=2))
        return self.shift(far_k, far_v) if self.kv_shift else (far_k, far_v)

    def shift(self, k, v, last_k=None, last_v=None):
        return (kv_shift(k, last_k, self.k_shift_now, self.k_shift_prev),
                kv_shift(v, last_v, self.v_shift_now, self.v_shift_prev))

    def absorbed_maps(self):
        """Latent cache: per head, W_K far_up and W_V far_up (n_head, head_dim, r), the key
        and value biases (n_head, head_dim) or None, the kv_shift mixes or None."""
        C, H = self.n_embd, self.n_head
        W_k, W_v = (w.view(H, C // H, C) for w in self.c_attn.weight[C:].split(C))
        b_k, b_v = (None, None) if self.c_attn.bias is None else self.c_attn.bias[C:].view(2, H, C // H)
        shift = (self.k_shift_now, self.k_shift_prev, self.v_shift_now, self.v_shift_prev) if self.kv_shift else None
        return W_k @ self.far_up.weight, b_k, W_v @ self.far_up.weight, b_v, shift

    def forward(self, x, cache=None):
        B, T, C = x.size()
        q, k, v = (self.heads(t) for t in self.c_attn(x).split(self.n_embd, dim=2))
        if self.kv_shift:
            last_k, last_v = (None, None) if cache is None else (cache.last_k, cache.last_v)
            if cache is not None:   # the next chunk mixes in this chunk's last *raw* key/value
                cache.last_k, cache.last_v = k[:, :, -1:].clone(), v[:, :, -1:].clone()
            k, v = self.shift(k, v, last_k, last_v)
        if cache is None:
            dropout_p = self.dropout if self.training else 0.0
            y = dar_attention(q, k, v, *self.far_keys_values(x, k, v), self.window, dropout_p)
        elif self.far_mode == "latent":
            y = cache.attend(q, k, v, self.far_down(x), self.absorbed_maps)
        else:
            y = cache.attend(q, k, v)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight   # weight tying, as in GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():   # GPT-2's scaled init of residual projections
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        for block in self.transformer.h if config.far_mode == "latent" else []:
            # the bottleneck starts as the projection onto r random orthogonal axes, so a
            # distant token starts as itself less the directions it cannot keep
            torch.nn.init.orthogonal_(block.attn.far_up.weight)
            block.attn.far_down.weight.data.copy_(block.attn.far_up.weight.T)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=True):
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def new_cache(self, batch_size):
        return KVCache(self.config, batch_size)

    def forward(self, idx, targets=None, cache=None):
        """Without a cache: nanoGPT's forward. With a cache: append idx after what the cache
        holds and return the logits of the last position."""
        B, T = idx.size()
        start = 0 if cache is None else cache.length
        if start + T > self.config.block_size:
            raise ValueError(f"{start + T} tokens exceed block_size={self.config.block_size}")
        if cache is not None and (targets is not None or B != cache.batch_size):
            raise ValueError("a cached forward takes no targets and the cache's batch size")
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for i, block in enumerate(self.transformer.h):
            x = block(x, None if cache is None else cache.layers[i])
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True,
                        cache=None, num_samples=1):
        """Yield (B * num_samples, 1) sampled tokens one at a time, continuing each row of idx
        (B, T) num_samples times (rows b * num_samples, ... continue row b).

        use_cache=False recomputes the last block_size tokens every step, as nanoGPT does.
        With the cache (pass one of batch B * num_samples to inspect it), each prompt is
        prefilled once and its cache rows copied to its samples. A full context keeps its
        last block_size // 2 tokens and is prefilled again: O(block_size) a token on average."""
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be > 0 (use top_k=1 for greedy)")
        block_size = self.config.block_size
        prompt, idx = idx[:, -block_size:], idx.repeat_interleave(num_samples, 0)
        if use_cache and cache is None:
            cache = self.new_cache(idx.size(0))
        for step in range(max_new_tokens):
            if not use_cache:
                logits, _ = self(idx[:, -block_size:])
            elif step == 0:
                cache.reset()
                prefilled = cache if num_samples == 1 else self.new_cache(prompt.size(0))
                logits, _ = self(prompt, cache=prefilled)
                if num_samples > 1:
                    cache.copy_rows(prefilled)
                    logits = logits.repeat_interleave(num_samples, 0)
            elif cache.length == block_size:
                cache.reset()
                logits, _ = self(idx[:, -max(1, block_size // 2):], cache=cache)
            else:
                logits, _ = self(idx[:, -1:], cache=cache)
            logits = logits[:, -1, :] / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
            yield idx_next

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True, num_samples=1):
        """nanoGPT's generate; top_k=1 is greedy. Returns (B * num_samples, T + max_new_tokens)."""
        new = list(self.generate_stream(idx, max_new_tokens, temperature, top_k, use_cache, None, num_samples))
        return torch.cat([idx.repeat_interleave(num_samples, 0)] + new, dim=1)


# ----------------------------------------------------------------------------------------
# 6. Converting a trained full-dimension model
#
# Slice mode. Per head, W_K = U S V^T. Replacing W_Q <- U^T W_Q and W_K <- U^T W_K leaves
# every q.k unchanged (U is orthogonal) but orders key coordinates by energy, so the first
# far_k_dim of them are the best truncation the weights allow. Values likewise with W_V's
# SVD, the matching columns of the output projection absorbing U_v. KV shifting mixes whole
# vectors with scalars, so it commutes with the rotation.
# Data-aware variant: with a calibration batch, U is instead the principal axes (PCA, about
# the origin) of the keys and values the model computes on it, so the leading coordinates
# hold the most energy of real activations, biases included.
#
# Latent mode. The bottleneck keeps r directions of the attention input x: far_up = A, the
# (n_embd, r) top axes, far_down = A^T, so a distant token is seen through A A^T x, the
# best rank-r view of x. A: the principal axes of x on the calibration batch, or without
# one the top right singular vectors of the stacked key and value weights (the directions
# of x that move keys and values most). At r = n_embd, A A^T = I: the model is unchanged.

def principal_axes(moment):
    """Orthogonal (d, d) matrix whose columns are eigenvectors, largest eigenvalue first."""
    return torch.linalg.eigh(moment)[1].flip(-1)


@torch.no_grad()
def attention_moments(model, idx):
    """Per layer, the (n_head, d, d) second moments of raw keys and of raw values on idx,
    and the (n_embd, n_embd) second moment of the attention input."""
    C, H = model.config.n_embd, model.config.n_head
    moments = []
    def record(module, inputs, output):
        _, k, v = output.double().split(C, dim=2)
        k, v = (t.reshape(-1, H, C // H) for t in (k, v))
        x = inputs[0].double().reshape(-1, C)
        moments.append((*(torch.einsum("nhi,nhj->hij", t, t) / t.size(0) for t in (k, v)), x.T @ x / x.size(0)))
    hooks = [b.attn.c_attn.register_forward_hook(record) for b in model.transformer.h]
    was_training = model.training
    model.eval()   # no dropout in what is measured
    model(idx)
    model.train(was_training)
    for hook in hooks:
        hook.remove()
    return moments


@torch.no_grad()
def convert(model, window, far_k_dim=None, far_v_dim=None, calibration=None, far_mode="slice",
            far_latent_dim=None):
    """A copy of a full-dimension model set to the new tiers: rotated per head (slice) or
    given a bottleneck (latent). calibration: optional (B, T) token ids for the data-aware
    (PCA) variant."""
    if not model.config.is_full:
        raise ValueError("convert expects a full-dimension model (far dims = head_dim)")
    config = replace(model.config, window=window, far_k_dim=far_k_dim, far_v_dim=far_v_dim,
                     far_mode=far_mode, far_latent_dim=far_latent_dim)
    param = next(model.parameters())
    new = GPT(config).to(device=param.device, dtype=param.dtype)
    new.load_state_dict(model.state_dict(), strict=far_mode == "slice")   # latent: + far_down, far_up
    moments = None if calibration is None else attention_moments(model, calibration)
    for layer, block in enumerate(new.transformer.h):
        if far_mode == "latent":
            add_bottleneck(block.attn, None if moments is None else moments[layer][2], param.dtype)
        else:
            rotate_heads(block.attn, None if moments is None else moments[layer][:2], param.dtype)
    return new


def add_bottleneck(attn, input_moment, dtype):
    C, r = attn.n_embd, attn.far_down.out_features
    if input_moment is None:
        axes = torch.linalg.svd(attn.c_attn.weight[C:].double(), full_matrices=False)[2].T
    else:
        axes = principal_axes(input_moment)
    attn.far_up.weight.copy_(axes[:, :r].to(dtype))
    attn.far_down.weight.copy_(axes[:, :r].T.to(dtype))


def rotate_heads(attn, key_value_moments, dtype):
    c_attn, c_proj, C, H = attn.c_attn, attn.c_proj, attn.n_embd, attn.n_head
    d = C // H
    for h in range(H):
        q, k, v = (slice(part * C + h * d, part * C + (h + 1) * d) for part in range(3))
        if key_value_moments is None:
            U_k = torch.linalg.svd(c_attn.weight[k].double(), full_matrices=False)[0]
            U_v = torch.linalg.svd(c_attn.weight[v].double(), full_matrices=False)[0]
        else:
            U_k, U_v = (principal_axes(m[h]) for m in key_value_moments)
        for rows, U in ((q, U_k), (k, U_k), (v, U_v)):
            c_attn.weight[rows] = (U.T @ c_attn.weight[rows].double()).to(dtype)
            if c_attn.bias is not None:
                c_attn.bias[rows] = (U.T @ c_attn.bias[rows].double()).to(dtype)
        cols = slice(h * d, (h + 1) * d)   # where head h's output enters c_proj
        c_proj.weight[:, cols] = (c_proj.weight[:, cols].double() @ U_v).to(dtype)
