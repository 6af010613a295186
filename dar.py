"""
Distance-Adaptive Representation (DAR) in a nanoGPT-style GPT, in one file.

A token's key and value keep their full head dimension while it is among the last `window`
tokens; further away it keeps less ("slice": its first coordinates; "latent": a learned
bottleneck). One softmax spans both tiers. Sections: 1. GPTConfig, 2. dar_attention (and
split_attention, its mask-free form for cached prompts), 3. KVCache, 4. the model,
5. convert (a trained full model made DAR). See README.md.
"""

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn as nn
from torch.nn import functional as F


# ----------------------------------------------------------------------------------------
# 1. Configuration: GPT-2 by default; Llama (SmolLM2): n_kv_head < n_head, norm="rmsnorm",
# mlp="swiglu", bias=False, rope=True.

@dataclass
class GPTConfig:
    block_size: int = 256
    vocab_size: int = 50304
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True
    n_kv_head: Optional[int] = None    # key/value heads, shared by query heads (GQA)
    norm: str = "layernorm"            # "layernorm" (GPT-2) or "rmsnorm" (Llama)
    norm_eps: float = 1e-5
    mlp: str = "gelu"                  # "gelu": GPT-2's MLP; "swiglu": Llama's gated MLP
    mlp_hidden: Optional[int] = None   # the MLP's hidden width (None: 4 * n_embd)
    tie_embeddings: bool = True        # the output head is the token embedding (GPT-2)
    window: int = 64                   # tokens at distance < window keep full dimensions
    far_k_dim: Optional[int] = None    # slice: key coordinates kept beyond the window
    far_v_dim: Optional[int] = None    # slice: value coordinates kept (None: head_dim / 4)
    kv_shift: bool = False             # KV shifting attention
    far_mode: str = "slice"            # what a distant token keeps: "slice" or "latent"
    far_latent_dim: Optional[int] = None   # latent: the bottleneck width r (None: n_embd/4)
    rope: bool = False                 # rotary positions (queries, keys) instead of wpe
    rope_wpe: bool = False             # rope: keep wpe's learned positions as well
    rope_base: float = 10000.0
    rope_prefix: str = "low"           # rope: a far key's first pairs (rope_frequencies)

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        self.n_kv_head = self.n_kv_head or self.n_head
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")
        for name, choices in (("norm", ("layernorm", "rmsnorm")), ("mlp", ("gelu", "swiglu")),
                              ("far_mode", ("slice", "latent")),
                              ("rope_prefix", ("high", "low", "unrotated"))):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}={getattr(self, name)!r} must be one of {choices}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if self.window < 0:
            raise ValueError(f"window={self.window} must be >= 0")
        # each far mode's sizes: (mode, field, smallest, largest); None: largest // 4
        for mode, name, low, high in (("slice", "far_k_dim", 0, self.head_dim),
                                      ("slice", "far_v_dim", 0, self.head_dim),
                                      ("latent", "far_latent_dim", 1, self.n_embd)):
            value = getattr(self, name)
            if mode != self.far_mode:
                if value is not None:
                    raise ValueError(f"{name} applies to far_mode='{mode}' only")
                continue
            if value is None:
                value = max(1, high // 4)
            if not low <= value <= high:
                raise ValueError(f"{name}={value} must be in [{low}, {high}]")
            setattr(self, name, value)
        if self.window == 0 and self.far_k_dim == 0 and self.far_v_dim == 0:
            raise ValueError("window=0 with far_k_dim=far_v_dim=0 leaves nothing to attend to")
        if self.rope:
            self.check_rope()
        if self.rope_wpe and not self.rope:
            raise ValueError("rope_wpe=True keeps wpe beside rope: it needs rope=True")

    def check_rope(self):
        if not self.rope_base > 0:
            raise ValueError(f"rope_base={self.rope_base} must be > 0")
        if self.head_dim % 2 or (self.far_k_dim or 0) % 2:   # pairs stay whole
            raise ValueError(f"far_k_dim={self.far_k_dim} and head_dim={self.head_dim} must be "
                             "even with rope")
        if self.far_mode == "latent" and not self.is_full:
            raise ValueError("far_mode='latent' builds no far key to turn (rope)")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @property
    def is_full(self):
        """True when every token a context can hold is attended at full dimension."""
        d = self.head_dim
        return self.window >= self.block_size or (self.far_k_dim, self.far_v_dim) == (d, d)

    def tiers(self):
        """(window, far_mode, far_k_dim, far_v_dim) as computed (full: a window of block_size)."""
        if self.is_full:
            return self.block_size, "slice", 0, 0
        if self.far_mode == "latent":
            return self.window, "latent", 0, 0
        return self.window, "slice", self.far_k_dim, self.far_v_dim


# ----------------------------------------------------------------------------------------
# 2. DAR attention over a sequence
#
# score(i, j) = q_i . k_j / sqrt(d)       if 0 <= i - j < window   (local tier)
#             = q_i . far_k_j / sqrt(d)   if i - j >= window       (far tier)
# one softmax over both tiers; a far token gives far_v_j, where:
#   slice:  far_k_j = [k_j[:rk], 0, ..., 0], far_v_j = [v_j[:rv], 0, ..., 0]
#   latent: far_k_j, far_v_j = the key and value projections of far_up(far_down(x_j))
# Trick: give SDPA the keys and their far copies side by side, masked so that query i sees
# the first copy of j inside the window and the second beyond it. Queries go in blocks, each
# given only the keys it can see; they may be the last n of T positions (cached prompts).

def dar_attention(q, k, v, far_k, far_v, window, dropout_p=0.0, block=None):
    """q: (B, H, n, d), the last n of T positions; k, v: (B, Hkv, m, d), the last m >= n;
    far_k, far_v: (B, Hkv, T, w), all T as seen beyond the window (w <= d: zero beyond what
    a far token keeps; it meets q's first w coordinates), or None (a sliding window)."""
    n = q.size(2)
    m = k.size(2)
    T = m if far_k is None else far_k.size(2)
    gqa = q.size(1) != k.size(1)
    if window >= T:   # every key a query sees is local: causal attention, ends aligned
        causal = None
        if n != m:
            causal = torch.ones(n, m, dtype=torch.bool, device=q.device).tril(m - n)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal, dropout_p=dropout_p,
                                              is_causal=n == m, enable_gqa=gqa)
    block = block or max(2 * window, 64)   # fastest on CPU (bench.py decode)
    if far_k is not None:   # far copies as wide as the keys, padded once
        far_k = F.pad(far_k, (0, k.size(-1) - far_k.size(-1)))
        far_v = F.pad(far_v, (0, k.size(-1) - far_v.size(-1)))
    out = []
    for start in range(0, n, block):
        first = T - n + start                 # the block's first and last query positions
        last = min(T, first + block) - 1
        pos = torch.arange(first, last + 1, device=q.device)[:, None]
        near = max(T - m, first - window + 1)   # the oldest key local to any of them
        local = torch.arange(near, last + 1, device=q.device)
        mask = (local > pos - window) & (local <= pos)
        keys = k[:, :, near - T + m:last + 1 - T + m]
        values = v[:, :, near - T + m:last + 1 - T + m]
        n_far = 0 if far_k is None else max(0, last - window + 1)   # keys far to any of them
        if n_far:
            far = torch.arange(n_far, device=q.device) <= pos - window
            mask = torch.cat([mask, far], dim=1)
            keys = torch.cat([keys, far_k[:, :, :n_far]], dim=2)
            values = torch.cat([values, far_v[:, :, :n_far]], dim=2)
        y = F.scaled_dot_product_attention(q[:, :, start:start + block], keys, values,
                                           attn_mask=mask, dropout_p=dropout_p, enable_gqa=gqa)
        out.append(y)
    return torch.cat(out, dim=2)


# A cached prompt needs no gradient, and then the masks can go: the far tier of query i is
# causal attention W tokens behind (keys j <= i - W, their first w coordinates), the local
# tier a band of W keys; each part gives its outputs and log-sum-exps (lse), and weighting
# each part by exp(lse - lse of both) gives one softmax over both (flash-decoding's merge).
# PyTorch's CPU flash kernel returns the lse (no gradient flows through it; n >= 1 only):
FLASH_LSE = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def merge(part, other):
    """Two attentions of the same queries over disjoint keys, (out, lse) each: one softmax."""
    lse = torch.logaddexp(part[1], other[1])
    out = part[0].float() * (part[1] - lse).exp()[..., None]
    more = other[0].float() * (other[1] - lse).exp()[..., None]
    out[..., :more.size(-1)] += more   # a far part may be narrower: zero beyond its width
    return out.type_as(part[0]), lse


def band_attention(q, k, v, window, scale, block=64):
    """The local tier: query r sees the W keys up to its own (k ends with them). Blocks of b
    queries against the b + W keys around them, overlapping windows of one padded copy."""
    B, H, n, d = q.shape
    W = window
    b = min(W, block)   # blocks of up to 64 queries: fastest on CPU (bench.py decode)
    blocks = -(-n // b)
    front = W - (k.size(2) - n)   # zeros in front: query r's own key lands at r + W
    k = F.pad(k, (0, 0, front, blocks * b - n))
    v = F.pad(v, (0, 0, front, blocks * b - n))
    keys = k.unfold(2, b + W, b).transpose(-1, -2).flatten(0, 1)   # (B * H, blocks, b + W, d)
    values = v.unfold(2, b + W, b).transpose(-1, -2).flatten(0, 1)
    queries = F.pad(q, (0, 0, 0, blocks * b - n)).flatten(0, 1).unflatten(1, (blocks, b))
    col = torch.arange(b + W, device=q.device)
    row = torch.arange(b, device=q.device)[:, None]
    first = torch.arange(blocks, device=q.device)[:, None, None] * b
    seen = (col > row) & (col <= row + W) & (first + col >= front)   # (blocks, b, b + W)
    mask = torch.zeros(seen.shape, dtype=q.dtype, device=q.device).masked_fill(~seen, -math.inf)
    out, lse = FLASH_LSE(queries, keys, values, attn_mask=mask[None], scale=scale)
    return out.reshape(B, H, -1, d)[:, :, :n], lse.reshape(B, H, -1)[:, :, :n]


def far_attention(q, far_k, far_v, window, scale):
    """The far tier: query i (of the last n of T) sees far keys j <= i - W. The first keys,
    which every query sees, in one call; after them, causal attention from the first query
    that sees one (queries before it: lse -inf, no far key)."""
    n = q.size(2)
    T = far_k.size(2)
    q = q[..., :far_k.size(-1)]
    lag = T - n - window   # the first query sees far keys 0..lag
    first = max(lag, 0)
    skip = first - lag
    keys = slice(first, T - window)   # n - skip of them: a square causal mask
    out, lse = FLASH_LSE(q[:, :, skip:], far_k[:, :, keys], far_v[:, :, keys], is_causal=True,
                         scale=scale)
    out = F.pad(out, (0, 0, skip, 0))
    lse = F.pad(lse, (skip, 0), value=-math.inf)
    if first:
        seen = FLASH_LSE(q, far_k[:, :, :first], far_v[:, :, :first], scale=scale)
        return merge(seen, (out, lse))
    return out, lse


def split_attention(q, k, v, far_k, far_v, window):
    """dar_attention for a cached prompt: the far tier and the local band apart, no mask over
    their union. dar_attention (the reference) wherever the kernel or a gradient is missing."""
    T = k.size(2) if far_k is None else far_k.size(2)
    needs_grad = torch.is_grad_enabled() and q.requires_grad
    if FLASH_LSE is None or q.device.type != "cpu" or needs_grad or window >= T:
        return dar_attention(q, k, v, far_k, far_v, window)
    groups = q.size(1) // k.size(1)
    if groups > 1:   # the kernel takes as many key heads as query heads
        k = k.repeat_interleave(groups, 1)
        v = v.repeat_interleave(groups, 1)
        if far_k is not None:
            far_k = far_k.repeat_interleave(groups, 1)
            far_v = far_v.repeat_interleave(groups, 1)
    scale = 1 / math.sqrt(q.size(-1))
    far = None if far_k is None else far_attention(q, far_k, far_v, window, scale)
    if window == 0:   # every key is far: the output is zero beyond the far values' width
        return F.pad(far[0], (0, q.size(-1) - far[0].size(-1)))
    local = band_attention(q, k, v, window, scale)
    return local[0] if far is None else merge(local, far)[0]


# ----------------------------------------------------------------------------------------
# 3. The two-tier KV cache: storage only; the attention module does the arithmetic.
#
# What a token keeps at any distance is written once, on arrival, at index p of a store of
# block_size positions (slice: the first rk / rv coordinates of its key and value; latent:
# far_down(x)); a ring of `window` slots (token p in slot p % window) holds the rest of the
# window's tokens. Nothing moves when a token leaves the window; a slice cache holds min(T,
# W) * 2d + max(0, T - W) * (rk + rv) numbers a key/value head. Full: a ring of block_size.

def tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


class LayerCache:

    def __init__(self, config, batch_size):
        self.window, self.far_mode, self.far_k_dim, self.far_v_dim = config.tiers()
        self.shape = (batch_size, config.n_kv_head)
        self.config = config
        self.length = 0       # tokens held
        self.far_k = None     # slice: (B, Hkv, block_size, rk), index p
        self.far_v = None     # slice: (B, Hkv, block_size, rv), index p
        self.latents = None   # latent: (B, block_size, r), index p
        self.local_k = None   # (B, Hkv, window, d - rk), slot p % window
        self.local_v = None   # (B, Hkv, window, d - rv), slot p % window
        self.last_k = None    # kv_shift: the last token's raw key and value
        self.last_v = None
        self.maps = None      # latent: the absorbed maps

    def allocate(self, like):   # once, in the dtype and on the device of `like`
        if self.local_k is not None:
            return
        d = self.config.head_dim
        T = self.config.block_size
        self.local_k = like.new_empty(*self.shape, self.window, d - self.far_k_dim)
        self.local_v = like.new_empty(*self.shape, self.window, d - self.far_v_dim)
        if self.far_mode == "latent":
            self.latents = like.new_empty(self.shape[0], T, self.config.far_latent_dim)
        elif self.far_k_dim or self.far_v_dim:
            self.far_k = like.new_empty(*self.shape, T, self.far_k_dim)
            self.far_v = like.new_empty(*self.shape, T, self.far_v_dim)

    def append(self, k, v, latents=None):
        """Write n new tokens at positions length, ..., length + n - 1; k, v: (B, Hkv, n, d)."""
        self.allocate(k)
        L = self.length
        n = k.size(2)
        W = self.window
        rk = self.far_k_dim
        rv = self.far_v_dim
        if self.far_k is not None:
            self.far_k[:, :, L:L + n] = k[..., :rk]
            self.far_v[:, :, L:L + n] = v[..., :rv]
        if self.latents is not None:
            self.latents[:, L:L + n] = latents
        if W and n == 1:   # (a slice: fewer operations than an index)
            self.local_k[:, :, L % W:L % W + 1] = k[..., rk:]
            self.local_v[:, :, L % W:L % W + 1] = v[..., rv:]
        elif W:   # the chunk's last tokens: the others are beyond the window already
            slots = torch.arange(max(L, L + n - W), L + n, device=k.device) % W
            self.local_k.index_copy_(2, slots, k[:, :, n - len(slots):, rk:])
            self.local_v.index_copy_(2, slots, v[:, :, n - len(slots):, rv:])
        self.length = L + n

    def recent(self, like):
        """Whole keys and values of the last window - 1 tokens held, in position order."""
        self.allocate(like)
        first = max(0, self.length - max(self.window - 1, 0))
        pos = torch.arange(first, self.length, device=self.local_k.device)
        slots = pos % max(1, self.window)
        k = self.local_k[:, :, slots]
        v = self.local_v[:, :, slots]
        if self.far_k is not None:
            k = torch.cat([self.far_k[:, :, pos], k], dim=-1)
            v = torch.cat([self.far_v[:, :, pos], v], dim=-1)
        return k, v

    def kept(self):   # what every held token keeps: far_k, far_v (slice) or latents
        held = (self.far_k, self.far_v, self.latents)
        return tuple(None if t is None else t[..., :self.length, :] for t in held)

    def tier_nbytes(self):
        """(local, far) bytes: the window's tokens; what older ones keep."""
        T = self.length
        m = min(T, self.window)
        slices = [t for t in (self.far_k, self.far_v) if t is not None]
        rings = [t for t in (self.local_k, self.local_v) if t is not None]
        local = [t[:, :, :m] for t in rings] + [t[:, :, T - m:T] for t in slices]
        far = [t[:, :, :T - m] for t in slices]
        if self.latents is not None:
            far.append(self.latents[:, :T])
        return tensor_bytes(local), tensor_bytes(far)


class KVCache:
    """One LayerCache per layer: GPT.new_cache(batch_size)."""

    def __init__(self, config, batch_size):
        self.config = config
        self.batch_size = batch_size
        self.layers = [LayerCache(config, batch_size) for _ in range(config.n_layer)]

    @property
    def length(self):
        return self.layers[0].length

    def reset(self):
        """Forget every token; the buffers stay for the next prefill."""
        for layer in self.layers:
            layer.length = 0
            layer.last_k = None
            layer.last_v = None
            layer.maps = None

    def copy_rows(self, prefilled):
        """Row b of a cache of fewer rows copied to rows b * repeats, ... (one prefill)."""
        repeats = self.batch_size // prefilled.batch_size
        if repeats * prefilled.batch_size != self.batch_size or prefilled.config != self.config:
            raise ValueError("copy_rows needs the same config and a batch size dividing this")
        self.reset()
        for mine, theirs in zip(self.layers, prefilled.layers):
            for name in ("far_k", "far_v", "latents", "local_k", "local_v", "last_k", "last_v"):
                t = getattr(theirs, name)
                setattr(mine, name, None if t is None else t.repeat_interleave(repeats, 0))
            mine.length = theirs.length

    def tier_nbytes(self):
        per_layer = [layer.tier_nbytes() for layer in self.layers]
        return sum(local for local, _ in per_layer), sum(far for _, far in per_layer)

    @property
    def nbytes(self):
        """The README's formula at the current length (+ kv_shift: a raw key and value)."""
        shift = sum(tensor_bytes((layer.last_k, layer.last_v)) for layer in self.layers)
        return sum(self.tier_nbytes()) + shift

    @property
    def allocated_nbytes(self):
        """Every tensor held: nbytes at block_size (not the absorbed maps: weights)."""
        return sum(tensor_bytes(vars(layer).values()) for layer in self.layers)

    @property
    def full_nbytes(self):
        """Bytes a full cache of the same length and dtype would hold."""
        first = self.layers[0].local_k
        element_size = 0 if first is None else first.element_size()
        kv_width = self.config.n_kv_head * self.config.head_dim
        return self.config.n_layer * self.batch_size * self.length * 2 * kv_width * element_size


# ----------------------------------------------------------------------------------------
# 4. The model: in the full regime nanoGPT's GPT, its names and shapes (kv_shift adds 4
# (n_kv_head,) vectors a layer, latent 2 maps). GQA: c_attn's rows are the queries, then
# the keys and values of n_kv_head heads; query head h reads key/value head h // group.

def mix(now, prev, x, before):
    """KV shifting's mix per key/value head (dim 1), in x's dtype (bf16 under autocast)."""
    return (now.view(1, -1, 1, 1) * x + prev.view(1, -1, 1, 1) * before).type_as(x)


def rope_frequencies(config):
    """Pair (2i, 2i + 1) turns by p * freqs[i] at position p; a far key keeps the first: the
    lowest frequencies (best on SmolLM2), the highest (the usual order) or far_k_dim unrotated
    ones. convert orders a model's pairs per head (pair_order)."""
    d = config.head_dim
    kept = config.far_k_dim if config.far_mode == "slice" else 0
    freqs = config.rope_base ** -torch.arange(0, d, 2).double().div(d)
    if config.rope_prefix == "low":
        freqs = freqs.flip(0)
    if config.rope_prefix == "unrotated":
        rotated = config.rope_base ** -torch.arange(0, d - kept, 2).double().div(d - kept)
        freqs = torch.cat([torch.zeros(kept // 2), rotated])
    return freqs.float()


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.n_embd = config.n_embd
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        self.window, self.far_mode, self.far_k_dim, self.far_v_dim = config.tiers()
        self.has_far = self.far_mode == "latent" or self.far_k_dim + self.far_v_dim > 0
        kv_width = config.n_kv_head * config.head_dim
        self.qkv_sizes = [config.n_embd, kv_width, kv_width]   # c_attn's rows: q, k, v
        self.c_attn = nn.Linear(config.n_embd, sum(self.qkv_sizes), bias=config.bias)
        if config.far_mode == "latent":   # a distant token's bottleneck
            self.far_down = nn.Linear(config.n_embd, config.far_latent_dim, bias=False)
            self.far_up = nn.Linear(config.far_latent_dim, config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.kv_shift = config.kv_shift
        if self.kv_shift:   # init as in the paper: now ~ U(0, 1), prev = 1 - now
            k_now = torch.rand(config.n_kv_head)
            v_now = torch.rand(config.n_kv_head)
            self.k_shift_now = nn.Parameter(k_now)
            self.k_shift_prev = nn.Parameter(1 - k_now)
            self.v_shift_now = nn.Parameter(v_now)
            self.v_shift_prev = nn.Parameter(1 - v_now)
        self.rope = config.rope
        self.config = config
        if self.rope:   # kv head h's pair slot i turns at rope_freqs[rope_pairs[h, i]] (saved)
            self.register_buffer("rope_freqs", rope_frequencies(config), persistent=False)
            pairs = torch.arange(self.head_dim // 2).repeat(self.n_kv_head, 1)
            self.register_buffer("rope_pairs", pairs)

    def _apply(self, fn, *args):
        """.to(bfloat16) casts float buffers: the frequencies are rebuilt in float32 (in bf16
        the angle p * f is off by radians at p ~ 2000)."""
        super()._apply(fn, *args)
        if self.rope:
            self.rope_freqs = rope_frequencies(self.config).to(self.rope_pairs.device)
        return self

    def heads(self, t):   # (B, T, n * head_dim) -> (B, n, T, head_dim)
        return t.view(*t.shape[:2], -1, self.head_dim).transpose(1, 2)

    def head_weights(self):
        """c_attn as per-head views: weights q (H, d, C), k, v (Hkv, d, C); biases or None."""
        d = self.head_dim
        weights = tuple(w.unflatten(0, (-1, d)) for w in self.c_attn.weight.split(self.qkv_sizes))
        if self.c_attn.bias is None:
            return weights, None
        biases = self.c_attn.bias.split(self.qkv_sizes)
        return weights, tuple(b.unflatten(0, (-1, d)) for b in biases)

    def rotate(self, x, start):
        """RoPE: x (B, H, T, d) at positions start, start + 1, ... turned pair by pair."""
        positions = torch.arange(start, start + x.size(2), device=x.device).float()
        freqs = self.rope_freqs[self.rope_pairs]   # (Hkv, d / 2)
        freqs = freqs.repeat_interleave(x.size(1) // self.n_kv_head, 0)   # (H, d / 2) for q
        angle = positions[:, None] * freqs[:, None]   # (H, T, d / 2)
        cos = angle.cos()
        sin = angle.sin()
        even = x[..., 0::2].float()
        odd = x[..., 1::2].float()
        turned = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
        return turned.flatten(-2).type_as(x)

    def shift(self, k, v, last_k=None, last_v=None):
        """KV shifting: k^_t = now * k_t + prev * k_{t-1} per head (values alike); k_{-1} is
        last_k or 0."""
        def before(x, last):
            first = torch.zeros_like(x[:, :, :1]) if last is None else last
            return torch.cat([first, x[:, :, :-1]], dim=2)
        k = mix(self.k_shift_now, self.k_shift_prev, k, before(k, last_k))
        v = mix(self.v_shift_now, self.v_shift_prev, v, before(v, last_v))
        return k, v

    def far_keys_values(self, k, v, latents):
        """Every token as seen beyond the window (None: no far tier). Slice: k[:rk], v[:rv],
        zero-padded to the wider; latent: W_KV far_up(latents) as keys and values, shifted."""
        if self.far_mode == "slice":
            if not self.has_far:   # nothing kept: a sliding window
                return None, None
            width = max(self.far_k_dim, self.far_v_dim)
            far_k = F.pad(k[..., :self.far_k_dim], (0, width - self.far_k_dim))
            far_v = F.pad(v[..., :self.far_v_dim], (0, width - self.far_v_dim))
            return far_k, far_v
        key_value_rows = self.c_attn.weight[self.n_embd:]
        bias = None if self.c_attn.bias is None else self.c_attn.bias[self.n_embd:]
        far = F.linear(latents, key_value_rows @ self.far_up.weight, bias)   # (W_KV far_up) c
        far_k, far_v = (self.heads(t) for t in far.chunk(2, dim=-1))
        if self.kv_shift:
            return self.shift(far_k, far_v)
        return far_k, far_v

    def forward(self, x, cache=None):
        B, T, C = x.size()
        q, k, v = (self.heads(t) for t in self.c_attn(x).split(self.qkv_sizes, dim=-1))
        if self.kv_shift:
            last_k = None if cache is None else cache.last_k
            last_v = None if cache is None else cache.last_v
            if cache is not None:   # the next chunk mixes in this chunk's last *raw* key/value
                cache.last_k = k[:, :, -1:].clone()
                cache.last_v = v[:, :, -1:].clone()
            k, v = self.shift(k, v, last_k, last_v)
        if self.rope:   # after the shift (the KV shifting paper's order); keys cached turned
            start = 0 if cache is None else cache.length
            q = self.rotate(q, start)
            k = self.rotate(k, start)
        latents = self.far_down(x) if self.far_mode == "latent" else None
        if cache is None:
            dropout_p = self.dropout if self.training else 0.0
            far_k, far_v = self.far_keys_values(k, v, latents)
            y = dar_attention(q, k, v, far_k, far_v, self.window, dropout_p)
        elif T == 1:
            y = self.decode(q, k, v, latents, cache)
        else:   # a prompt, or a chunk after cached tokens: the sequence path
            recent_k, recent_v = cache.recent(k)
            cache.append(k, v, latents)
            far_k, far_v = self.far_keys_values(*cache.kept())
            keys = torch.cat([recent_k, k], dim=2)
            values = torch.cat([recent_v, v], dim=2)
            y = split_attention(q, keys, values, far_k, far_v, self.window)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def decode(self, q, k, v, latents, cache):
        """One token attends to all the cache holds, itself included: no masks. The ring's
        first m slots hold the last m tokens, the oldest in slot `start`; q: (B, Hkv, g, d)."""
        cache.append(k, v, latents)
        T = cache.length
        W = cache.window
        m = min(T, W)
        start = (T - m) % max(W, 1)
        local_k = cache.local_k[:, :, :m]
        local_v = cache.local_v[:, :, :m]
        B = q.size(0)
        q = q.view(B, self.n_kv_head, -1, self.head_dim)   # (B, Hkv, g, d)
        if not self.has_far:   # one tier (a sliding window, a full cache): the fused kernel
            y = F.scaled_dot_product_attention(q, local_k, local_v)
        elif self.far_mode == "slice":
            y = self.decode_slice(q / math.sqrt(self.head_dim), local_k, local_v, start, cache)
        else:
            y = self.decode_latent(q / math.sqrt(self.head_dim), local_k, local_v, cache)
        return y.view(B, self.n_head, 1, -1)

    def decode_slice(self, q, local_k, local_v, start, cache):
        """Every token's kept coordinates plus the window's others, by bmm (a 4-d matmul's
        reshapes cost more than its arithmetic here)."""
        T = cache.length
        m = local_k.size(2)
        rk = self.far_k_dim
        q = q.flatten(0, 1)
        scores = torch.bmm(q[..., :rk], cache.far_k[:, :, :T].flatten(0, 1).mT)
        local = torch.bmm(q[..., rk:], local_k.flatten(0, 1).mT)
        scores[..., T - m:] += local.roll(-start, -1)   # to position order
        att = F.softmax(scores, dim=-1)
        far_y = torch.bmm(att, cache.far_v[:, :, :T].flatten(0, 1))
        local_y = torch.bmm(att[..., T - m:].roll(start, -1), local_v.flatten(0, 1))
        return torch.cat([far_y, local_y], dim=-1)

    def decode_latent(self, q, local_k, local_v, cache):
        """No far key is rebuilt: with far_k = W_K far_up c + b_K (c the latent), q . far_k =
        (q W_K far_up) . c + q . b_K; the far values' sum is W_V far_up sum_j a_j c_j + b_V
        sum_j a_j."""
        if cache.maps is None:   # per kv head W_K far_up, W_V far_up (Hkv, d, r): once a fill
            (_, w_k, w_v), biases = self.head_weights()
            key_bias = None if biases is None else biases[1][:, None]    # (Hkv, 1, d)
            value_bias = None if biases is None else biases[2][:, None]
            cache.maps = (w_k @ self.far_up.weight, w_v @ self.far_up.weight, key_bias, value_bias)
        key_map, value_map, key_bias, value_bias = cache.maps
        B, Hkv, g, _ = q.shape
        T = cache.length
        m = local_k.size(2)
        c = cache.latents[:, :T - m]   # (B, T - m, r), shared by all heads
        far = torch.bmm((q @ key_map).flatten(1, 2), c.mT).view(B, Hkv, g, T - m)
        if key_bias is not None:
            far = far + (q * key_bias).sum(-1, keepdim=True)
        if self.kv_shift:   # far key j is now far_k_j + prev far_k_{j-1}
            far = mix(self.k_shift_now, self.k_shift_prev, far, F.pad(far[..., :-1], (1, 0)))
        att = F.softmax(torch.cat([far, q @ local_k.mT], dim=-1), dim=-1)
        far_att = att[..., :T - m]
        if self.kv_shift:   # sum_j a_j (now v_j + prev v_j-1) = sum_j (now a_j + prev a_j+1) v_j
            after = F.pad(far_att[..., 1:], (0, 1))
            far_att = mix(self.v_shift_now, self.v_shift_prev, far_att, after)
        far_sum = torch.bmm(far_att.flatten(1, 2), c).view(B, Hkv, g, -1)   # (B, Hkv, g, r)
        y = att[..., T - m:] @ local_v + far_sum @ value_map.mT
        if value_bias is not None:
            y = y + far_att.sum(-1, keepdim=True) * value_bias
        return y


def norm(config):
    """GPT-2's LayerNorm or Llama's RMSNorm."""
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


class MLP(nn.Module):
    """GPT-2's GELU MLP, or Llama's SwiGLU: silu(gate) * up, the halves of c_fc's output."""

    def __init__(self, config):
        super().__init__()
        hidden = config.mlp_hidden or 4 * config.n_embd
        self.swiglu = config.mlp == "swiglu"
        width = 2 * hidden if self.swiglu else hidden
        self.c_fc = nn.Linear(config.n_embd, width, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = self.gelu(h)
        return self.dropout(self.c_proj(h))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = norm(config)
        self.mlp = MLP(config)

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.has_wpe = not config.rope or config.rope_wpe   # learned absolute positions
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if self.has_wpe:
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        modules["drop"] = nn.Dropout(config.dropout)
        modules["h"] = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        modules["ln_f"] = norm(config)
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight   # weight tying, as in GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():   # GPT-2's scaled init of residual outputs
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if config.far_mode == "latent":   # the bottleneck starts as a projection onto r axes
            for block in self.transformer.h:
                torch.nn.init.orthogonal_(block.attn.far_up.weight)
                block.attn.far_down.weight.data.copy_(block.attn.far_up.weight.T)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            torch.nn.init.zeros_(module.bias)

    def get_num_params(self, non_embedding=True):
        n = sum(p.numel() for p in self.parameters())
        wpe = self.transformer.wpe.weight.numel() if self.has_wpe else 0
        return n - wpe if non_embedding else n

    def new_cache(self, batch_size):
        return KVCache(self.config, batch_size)

    def forward(self, idx, targets=None, cache=None):
        """nanoGPT's forward; with a cache, idx follows what it holds (last logits only)."""
        B, T = idx.size()
        start = 0 if cache is None else cache.length
        if start + T > self.config.block_size:
            raise ValueError(f"{start + T} tokens exceed block_size={self.config.block_size}")
        if cache is not None and (targets is not None or B != cache.batch_size):
            raise ValueError("a cached forward takes no targets and the cache's batch size")
        if cache is not None and torch.is_grad_enabled():   # a cache serves inference: no graph
            with torch.no_grad():
                return self.forward(idx, cache=cache)
        x = self.transformer.wte(idx)
        if self.has_wpe:
            pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
            x = x + self.transformer.wpe(pos)
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, None if cache is None else cache.layers[i])
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True,
                        cache=None, num_samples=1):
        """Yield (B * num_samples, 1) tokens, row b of idx (B, T) continued in rows b *
        num_samples, ...; use_cache=False: nanoGPT's loop. A full cache keeps its last half."""
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be > 0 (use top_k=1 for greedy)")
        block_size = self.config.block_size
        prompt = idx[:, -block_size:]
        idx = idx.repeat_interleave(num_samples, 0)
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

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True,
                 num_samples=1):
        """nanoGPT's generate (top_k=1: greedy): (B * num_samples, T + max_new_tokens)."""
        stream = self.generate_stream(idx, max_new_tokens, temperature, top_k, use_cache, None,
                                      num_samples)
        return torch.cat([idx.repeat_interleave(num_samples, 0), *stream], dim=1)


# ----------------------------------------------------------------------------------------
# 5. Converting a trained full-dimension model
#
# Slice: per key/value head, W_K = U S V^T; W_Q <- U^T W_Q (every query head reading it)
# and W_K <- U^T W_K leave q . k as it was (U is orthogonal) but order the key coordinates
# by energy. Values alike, c_proj absorbing U_v. With calibration tokens U is the principal
# axes of the keys and values on them. Rope: a rotation would not commute with RoPE, but a
# permutation of whole pairs does, with their frequencies (rope_pairs). Latent: far_up = A,
# far_down = A^T, A the top r axes of the attention input (PCA, or the key/value weights').

def principal_axes(moment):
    """Orthogonal matrices whose columns are eigenvectors, largest eigenvalue first."""
    return torch.linalg.eigh(moment)[1].flip(-1)


@torch.no_grad()
def calibrate(model, idx):
    """Per layer: the moment M (C + 1, C + 1) of the attention input with a 1 appended (E[y
    y^T] = [W, b] M [W, b]^T), and the mean norm of each pair of c_attn's output coordinates."""
    stats = []
    def record(module, inputs, output):
        x = F.pad(inputs[0].double().flatten(0, 1), (0, 1), value=1.0)
        pairs = output.double().flatten(0, 1).unflatten(-1, (-1, 2))
        stats.append((x.T @ x / x.size(0), pairs.norm(dim=-1).mean(0)))
    hooks = [b.attn.c_attn.register_forward_hook(record) for b in model.transformer.h]
    was_training = model.training
    model.eval()   # no dropout in what is measured
    model(idx)
    model.train(was_training)
    for hook in hooks:
        hook.remove()
    return stats


def key_value_axes(weights, biases, moment):
    """Axes (Hkv, d, d) of the keys and of the values: the weights' left singular vectors,
    or the principal axes of [W, b] M [W, b]^T (calibration)."""
    axes = []
    for i in (1, 2):
        w = weights[i].double()
        if moment is None:
            axes.append(torch.linalg.svd(w, full_matrices=False)[0])
            continue
        if biases is not None:
            w = torch.cat([w, biases[i][..., None].double()], dim=-1)
        M = moment[:w.size(-1), :w.size(-1)]
        axes.append(principal_axes(w @ M @ w.mT))
    return axes


def pair_order(attn, pairs, pair_norms):
    """Per key/value head, the order a far key keeps its pairs (Hkv, d / 2): by frequency, or
    MHA2MLA's score (arXiv 2502.14837): mean |q pair| * mean |k pair|, summed over a group."""
    if pairs != "score":
        freqs = attn.rope_freqs[attn.rope_pairs]
        return freqs.argsort(dim=-1, descending=pairs == "high", stable=True)
    if pair_norms is None:
        raise ValueError("pairs='score' needs calibration tokens")
    q_norms, k_norms, _ = pair_norms.split([n // 2 for n in attn.qkv_sizes])
    q_norms = q_norms.view(attn.n_kv_head, -1, attn.head_dim // 2)   # (Hkv, g, d / 2)
    score = (q_norms * k_norms.view(attn.n_kv_head, 1, -1)).sum(1)
    return score.argsort(dim=-1, descending=True, stable=True)


@torch.no_grad()
def rotate_heads(attn, moment, key_order=None):
    """Rotate a layer's values and keys (rope: key pairs into key_order), in place."""
    weights, biases = attn.head_weights()   # views: writing them writes c_attn
    U_k, U_v = key_value_axes(weights, biases, moment)
    if attn.rope:   # U_k^T moves pair o = key_order[h, i] (2o, 2o + 1) to 2i, 2i + 1
        rows = torch.stack([2 * key_order, 2 * key_order + 1], dim=-1).flatten(1)
        U_k = torch.eye(attn.head_dim, dtype=U_v.dtype, device=U_v.device)[rows].mT
        attn.rope_pairs.copy_(attn.rope_pairs.gather(1, key_order))
    group = attn.n_head // attn.n_kv_head   # query heads per key/value head
    rotations = (U_k.repeat_interleave(group, 0), U_k, U_v)   # q by its key head's U_k
    for i, U in enumerate(rotations):
        weights[i].copy_(U.mT @ weights[i].double())
        if biases is not None:
            biases[i].copy_((U.mT @ biases[i][..., None].double())[..., 0])
    c_proj = attn.c_proj.weight.view(attn.n_embd, attn.n_head, -1)   # head h's columns
    U_out = U_v.repeat_interleave(group, 0)
    c_proj.copy_(torch.einsum("chi,hij->chj", c_proj.double(), U_out))


@torch.no_grad()
def convert(model, window, far_k_dim=None, far_v_dim=None, calibration=None, far_mode="slice",
            far_latent_dim=None, pairs="score"):
    """A copy of a full model in the new tiers, rotated (slice) or given a bottleneck (latent),
    by PCA on calibration token ids (B, T) if given; rope: its pairs ordered by `pairs`."""
    if not model.config.is_full:
        raise ValueError("convert expects a full-dimension model (far dims = head_dim)")
    if pairs not in ("score", "high", "low") or pairs != "score" and not model.config.rope:
        raise ValueError(f"pairs={pairs!r}: 'score', 'high' or 'low', for a rope model")
    config = replace(model.config, window=window, far_k_dim=far_k_dim, far_v_dim=far_v_dim,
                     far_mode=far_mode, far_latent_dim=far_latent_dim)
    param = next(model.parameters())
    new = GPT(config).to(device=param.device, dtype=param.dtype)
    new.load_state_dict(model.state_dict(), strict=far_mode == "slice")   # latent: + far maps
    stats = [(None, None)] * config.n_layer
    if calibration is not None:
        stats = calibrate(model, calibration)
    for block, (M, pair_norms) in zip(new.transformer.h, stats):
        attn = block.attn
        if far_mode == "slice":
            key_order = pair_order(attn, pairs, pair_norms) if config.rope else None
            rotate_heads(attn, M, key_order)
            continue
        if M is None:   # the top right singular vectors of the key and value weights
            key_value_rows = attn.c_attn.weight[attn.n_embd:].double()
            A = torch.linalg.svd(key_value_rows, full_matrices=False)[2].T
        else:
            A = principal_axes(M[:-1, :-1])
        attn.far_up.weight.copy_(A[:, :config.far_latent_dim])
        attn.far_down.weight.copy_(A[:, :config.far_latent_dim].T)
    return new
