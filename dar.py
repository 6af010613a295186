"""
Distance-Adaptive Representation (DAR) in a nanoGPT-style GPT, in one file.

A token's key and value keep their full head dimension d while the token is among the last
`window` tokens; further away it keeps less, in one of two far modes: "slice" keeps the
first far_k_dim / far_v_dim coordinates (the same vectors at lower resolution), "latent"
keeps far_down(x), r numbers seen through the layer's own key and value projections of
far_up(far_down(x)). One softmax spans both tiers. README.md explains the method.

  1. GPTConfig      nanoGPT's fields plus window, the far mode and its sizes, kv_shift
  2. dar_attention  DAR over a sequence: training, the uncached forward, cached prompts
  3. KVCache        storage: what every token keeps from its arrival, and the window's rest
  4. the model      attention (a sequence path and a one-token decode path), nanoGPT's GPT
  5. convert        a trained full model rotated (slice) or given a bottleneck (latent)
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
    far_k_dim: Optional[int] = None    # slice: key coordinates kept beyond the window (None: head_dim/4)
    far_v_dim: Optional[int] = None    # slice: value coordinates kept beyond the window (None: head_dim/4)
    kv_shift: bool = False             # KV shifting attention (Xu et al.)
    far_mode: str = "slice"            # what a distant token keeps: "slice" or "latent"
    far_latent_dim: Optional[int] = None   # latent: the bottleneck width r (None: n_embd/4)
    rope: bool = False                 # rotary positions on queries and keys instead of wpe
    rope_wpe: bool = False             # rope: keep wpe's learned absolute positions as well
    rope_base: float = 10000.0
    rope_prefix: str = "high"          # rope: what a far key's first coordinates hold: the
                                       # "high"- or "low"-frequency pairs, or "unrotated" ones

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
        # each far mode's sizes: (mode, field, smallest, largest); None means largest // 4
        for mode, name, low, high in (("slice", "far_k_dim", 0, self.head_dim), ("slice", "far_v_dim", 0, self.head_dim),
                                      ("latent", "far_latent_dim", 1, self.n_embd)):
            if mode != self.far_mode and getattr(self, name) is not None:
                raise ValueError(f"{name} applies to far_mode='{mode}' only")
            if mode == self.far_mode:
                setattr(self, name, max(1, high // 4) if getattr(self, name) is None else getattr(self, name))
                if not low <= getattr(self, name) <= high:
                    raise ValueError(f"{name}={getattr(self, name)} must be in [{low}, {high}]")
        if self.window == 0 and self.far_k_dim == 0 and self.far_v_dim == 0:
            raise ValueError("window=0 with far_k_dim=0 and far_v_dim=0 leaves nothing to attend to")
        if self.rope and not self.rope_base > 0:
            raise ValueError(f"rope_base={self.rope_base} must be > 0")
        if self.rope and self.rope_prefix not in ("high", "low", "unrotated"):
            raise ValueError(f"rope_prefix={self.rope_prefix!r} must be 'high', 'low' or 'unrotated'")
        if self.rope and (self.head_dim % 2 or (self.far_k_dim or 0) % 2):   # rotary pairs stay whole
            raise ValueError(f"far_k_dim={self.far_k_dim} and head_dim={self.head_dim} must be even with rope")
        if self.rope_wpe and not self.rope:
            raise ValueError("rope_wpe=True keeps wpe beside rope: it needs rope=True")
        if self.rope and self.far_mode == "latent" and not self.is_full:
            raise ValueError("far_mode='latent' with rope: a far key it never builds cannot be rotated (README)")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @property
    def is_full(self):
        """True when every token a context can hold is attended at full dimension."""
        d = self.head_dim
        return self.window >= self.block_size or (self.far_k_dim, self.far_v_dim) == (d, d)

    def tiers(self):
        """(window, far_mode, far_k_dim, far_v_dim) as computed: the full regime is a window of
        block_size, nothing kept beyond it; the latent mode keeps its latent, no slice."""
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
# one softmax over both tiers; a far token contributes far_v_j. What a distant token keeps:
#   slice:  far_k_j = [k_j[:rk], 0, ..., 0], far_v_j = [v_j[:rv], 0, ..., 0]
#   latent: far_k_j, far_v_j = the layer's key and value projections of far_up(far_down(x_j))
# Trick: give SDPA the keys and their far copies side by side, with a mask that lets query
# i see the first copy of j inside the window and the second beyond it: exactly the formula,
# by the fused kernel. Queries go in blocks, each given only the keys it can see. The
# queries may be the last n of T positions, so cached prompts take this same path.

def dar_attention(q, k, v, far_k, far_v, window, dropout_p=0.0, block=None):
    """q: (B, H, n, d), queries of the last n of T positions (training: all); k, v: (B, H, m,
    d), whole keys and values of the last m >= n positions (read inside the window only);
    far_k, far_v: (B, H, T, d), every position as seen beyond the window, or None: no far
    tier (a sliding window). Returns (B, H, n, d)."""
    n, m = q.size(2), k.size(2)
    T = m if far_k is None else far_k.size(2)
    if window >= T:   # every key a query sees is local: causal attention, aligned at the end
        causal = None if n == m else torch.ones(n, m, dtype=torch.bool, device=q.device).tril(m - n)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal, dropout_p=dropout_p, is_causal=n == m)
    block = block or max(2 * window, 64)   # measured fastest on CPU (bench.py decode, prefill)
    arange, out = (lambda a, b: torch.arange(a, b, device=q.device)), []
    for start in range(0, n, block):
        first, last = T - n + start, min(T, T - n + start + block) - 1   # the block's query positions
        pos = arange(first, last + 1)[:, None]
        near = max(T - m, first - window + 1)   # the oldest key local to a query of this block
        n_far = 0 if far_k is None else max(0, last - window + 1)   # keys far to one of them
        local = arange(near, last + 1)
        mask = torch.cat([(local > pos - window) & (local <= pos), arange(0, n_far) <= pos - window], dim=1)
        keys, values = k[:, :, near - T + m:last + 1 - T + m], v[:, :, near - T + m:last + 1 - T + m]
        if n_far:
            keys, values = torch.cat([keys, far_k[:, :, :n_far]], 2), torch.cat([values, far_v[:, :, :n_far]], 2)
        out.append(F.scaled_dot_product_attention(q[:, :, start:start + block], keys, values,
                                                  attn_mask=mask, dropout_p=dropout_p))
    return torch.cat(out, dim=2)


# ----------------------------------------------------------------------------------------
# 3. The two-tier KV cache: storage only; the attention module does the arithmetic.
#
# What a token keeps at any distance is written once, on arrival, at index p of a store of
# block_size positions (slice: the first rk / rv coordinates of its key and value; latent:
# far_down(x)); a ring of `window` slots (token p in slot p % window) holds the rest of the
# window's tokens (slice: the other coordinates; latent: the whole key and value). Nothing
# moves when a token leaves the window, and a slice cache holds exactly min(T, W) * 2d +
# max(0, T - W) * (rk + rv) numbers a head. Full regime: a ring of block_size that never
# wraps, a static cache. Allocated once, at the first tokens, as gpt-fast and nanochat do.

def tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


class LayerCache:

    def __init__(self, config, batch_size):
        self.window, self.far_mode, self.far_k_dim, self.far_v_dim = config.tiers()
        self.shape, self.block_size = (batch_size, config.n_head), config.block_size
        self.head_dim, self.latent_dim = config.head_dim, config.far_latent_dim
        self.length = 0                      # tokens held
        self.far_k = self.far_v = None       # slice: (B, H, block_size, rk / rv), index p
        self.latents = None                  # latent: (B, block_size, r), index p
        self.local_k = self.local_v = None   # (B, H, window, d - rk / d - rv), slot p % window
        self.last_k = self.last_v = None     # kv_shift: the last token's raw key and value
        self.maps = None                     # latent: the absorbed maps, derived once a fill

    def allocate(self, like):   # once, in the dtype and on the device of the first keys `like`
        if self.local_k is None:
            self.local_k = like.new_empty(*self.shape, self.window, self.head_dim - self.far_k_dim)
            self.local_v = like.new_empty(*self.shape, self.window, self.head_dim - self.far_v_dim)
            if self.far_mode == "latent":
                self.latents = like.new_empty(self.shape[0], self.block_size, self.latent_dim)
            elif self.far_k_dim or self.far_v_dim:
                self.far_k = like.new_empty(*self.shape, self.block_size, self.far_k_dim)
                self.far_v = like.new_empty(*self.shape, self.block_size, self.far_v_dim)

    def append(self, k, v, latents=None):
        """Write n new tokens at positions length, ..., length + n - 1; k, v: (B, H, n, d)."""
        self.allocate(k)
        L, n, W, rk, rv = self.length, k.size(2), self.window, self.far_k_dim, self.far_v_dim
        if self.far_k is not None:
            self.far_k[:, :, L:L + n], self.far_v[:, :, L:L + n] = k[..., :rk], v[..., :rv]
        if self.latents is not None:
            self.latents[:, L:L + n] = latents
        if W and n == 1:   # (a slice, not an index: fewer operations when decoding)
            self.local_k[:, :, L % W:L % W + 1], self.local_v[:, :, L % W:L % W + 1] = k[..., rk:], v[..., rv:]
        elif W:   # the chunk's last tokens: the earlier ones are beyond the window already
            slots = torch.arange(max(L, L + n - W), L + n, device=k.device) % W
            self.local_k.index_copy_(2, slots, k[:, :, n - len(slots):, rk:])
            self.local_v.index_copy_(2, slots, v[:, :, n - len(slots):, rv:])
        self.length = L + n

    def recent(self, like):
        """Whole keys and values, in position order, of the held tokens that the next token
        sees locally (the last window - 1): what they keep joined to the ring's rest."""
        self.allocate(like)
        pos = torch.arange(max(0, self.length - max(self.window - 1, 0)), self.length, device=self.local_k.device)
        k, v = (t[:, :, pos % max(1, self.window)] for t in (self.local_k, self.local_v))
        if self.far_k is not None:
            k, v = torch.cat([self.far_k[:, :, pos], k], -1), torch.cat([self.far_v[:, :, pos], v], -1)
        return k, v

    def kept(self):   # what every held token keeps: far_k, far_v (slice) or latents (latent)
        return tuple(t if t is None else t[..., :self.length, :] for t in (self.far_k, self.far_v, self.latents))

    def tier_nbytes(self):   # (local, far): the window's tokens whole; what older ones keep (latent: all)
        T, m = self.length, min(self.length, self.window)
        slices = [t for t in (self.far_k, self.far_v) if t is not None]
        local = [t[:, :, :m] for t in (self.local_k, self.local_v) if t is not None] + [t[:, :, T - m:T] for t in slices]
        far = [t[:, :, :T - m] for t in slices] + ([self.latents[:, :T]] if self.latents is not None else [])
        return tensor_bytes(local), tensor_bytes(far)


class KVCache:
    """One LayerCache per layer. Create with GPT.new_cache(batch_size)."""

    def __init__(self, config, batch_size):
        self.config, self.batch_size = config, batch_size
        self.layers = [LayerCache(config, batch_size) for _ in range(config.n_layer)]

    length = property(lambda self: self.layers[0].length)

    def reset(self):
        """Forget every token; the buffers stay for the next prefill."""
        for layer in self.layers:
            layer.length, layer.last_k, layer.last_v, layer.maps = 0, None, None, None

    def copy_rows(self, prefilled):
        """Take over a cache of fewer rows, each repeated batch_size // prefilled.batch_size
        times (rows b * repeats, ... are copies of row b): samples share one prefill."""
        repeats = self.batch_size // prefilled.batch_size
        if repeats * prefilled.batch_size != self.batch_size or prefilled.config != self.config:
            raise ValueError("copy_rows needs a cache of the same config and a batch size dividing this one's")
        self.reset()
        for mine, theirs in zip(self.layers, prefilled.layers):
            if theirs.local_k is not None:
                mine.allocate(theirs.local_k)
                for name in ("far_k", "far_v", "latents", "local_k", "local_v"):   # rows to their copies
                    if getattr(theirs, name) is not None:
                        getattr(mine, name).unflatten(0, (-1, repeats)).copy_(getattr(theirs, name).unsqueeze(1))
            mine.last_k, mine.last_v = (None if t is None else t.repeat_interleave(repeats, 0)
                                        for t in (theirs.last_k, theirs.last_v))
            mine.length = theirs.length

    def tier_nbytes(self):
        return tuple(map(sum, zip(*(layer.tier_nbytes() for layer in self.layers))))

    @property
    def nbytes(self):   # the README's formula at the current length (+ kv_shift: a raw key and value a head)
        return sum(self.tier_nbytes()) + sum(tensor_bytes((l.last_k, l.last_v)) for l in self.layers)

    @property
    def allocated_nbytes(self):   # every tensor held, nbytes at block_size (not the absorbed maps: weights)
        return sum(tensor_bytes(vars(layer).values()) for layer in self.layers)

    @property
    def full_nbytes(self):
        """Bytes a full-dimension cache of the same length and dtype would hold."""
        element_size = 0 if self.layers[0].local_k is None else self.layers[0].local_k.element_size()
        return self.config.n_layer * self.batch_size * self.length * 2 * self.config.n_embd * element_size


# ----------------------------------------------------------------------------------------
# 4. The model: in the full regime nanoGPT's GPT, with its parameter names and shapes (a
# nanoGPT state dict loads as is); kv_shift adds 4 (n_head,) vectors a layer, latent 2 maps.

def mix(now, prev, x, before):
    """KV shifting's mix, per head (dim 1): now * x + prev * before."""
    return now.view(1, -1, 1, 1) * x + prev.view(1, -1, 1, 1) * before


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_embd, self.head_dim, self.dropout = config.n_head, config.n_embd, config.head_dim, config.dropout
        self.window, self.far_mode, self.far_k_dim, self.far_v_dim = config.tiers()
        self.has_far = self.far_mode == "latent" or self.far_k_dim + self.far_v_dim > 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        if config.far_mode == "latent":   # the bottleneck a distant token's attention input passes
            self.far_down = nn.Linear(config.n_embd, config.far_latent_dim, bias=False)
            self.far_up = nn.Linear(config.far_latent_dim, config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.kv_shift = config.kv_shift
        if self.kv_shift:   # init as in the paper: now ~ U(0, 1), prev = 1 - now
            k_now, v_now = torch.rand(config.n_head), torch.rand(config.n_head)
            self.k_shift_now, self.k_shift_prev = nn.Parameter(k_now), nn.Parameter(1 - k_now)
            self.v_shift_now, self.v_shift_prev = nn.Parameter(v_now), nn.Parameter(1 - v_now)
        self.rope = config.rope
        if self.rope:   # pair (2i, 2i + 1) turns by p * rope_freqs[i] at position p; the order of
            # the pairs is what a far key's prefix keeps: the highest frequencies first, the lowest,
            # or far_k_dim unrotated coordinates (partial rotary over the rest)
            d, kept = self.head_dim, config.far_k_dim if config.far_mode == "slice" else 0
            freqs = config.rope_base ** -torch.arange(0, d, 2).double().div(d)
            freqs = {"high": freqs, "low": freqs.flip(0), "unrotated": torch.cat(
                [torch.zeros(kept // 2), config.rope_base ** -torch.arange(0, d - kept, 2).double().div(d - kept)])}
            self.register_buffer("rope_freqs", freqs[config.rope_prefix].float(), persistent=False)

    def heads(self, t):   # (B, T, C) -> (B, n_head, T, head_dim)
        return t.view(*t.shape[:2], self.n_head, self.head_dim).transpose(1, 2)

    def head_weights(self):
        """c_attn as per-head views: weight (3, H, d, C) and bias (3, H, d) or None, q k v."""
        w = self.c_attn.weight.view(3, self.n_head, self.head_dim, self.n_embd)
        return w, None if self.c_attn.bias is None else self.c_attn.bias.view(3, self.n_head, self.head_dim)

    def rotate(self, x, start):
        """RoPE: x (B, H, T, d) at positions start, start + 1, ... turned pair by pair."""
        angle = torch.arange(start, start + x.size(2), device=x.device).float()[:, None] * self.rope_freqs
        cos, sin, even, odd = angle.cos(), angle.sin(), x[..., 0::2].float(), x[..., 1::2].float()
        return torch.stack([even * cos - odd * sin, even * sin + odd * cos], -1).flatten(-2).type_as(x)

    def shift(self, k, v, last_k=None, last_v=None):
        """KV shifting: k^_t = now * k_t + prev * k_{t-1} per head (values alike); k_{-1} is
        last_k, the raw key before k, or 0 at the start."""
        before = lambda x, last: torch.cat([torch.zeros_like(x[:, :, :1]) if last is None else last, x[:, :, :-1]], 2)
        return (mix(self.k_shift_now, self.k_shift_prev, k, before(k, last_k)),
                mix(self.v_shift_now, self.v_shift_prev, v, before(v, last_v)))

    def far_keys_values(self, k, v, latents):
        """Every token as seen beyond the window, at full width (None: no far tier). Slice: the
        first rk / rv coordinates of k, v (or the slices a cache keeps), zero-padded. Latent:
        the layer's key and value projections of far_up(latents), shifted as k and v are."""
        if self.far_mode == "slice":   # (with nothing kept, no far tier: a sliding window)
            pad = lambda t, r: F.pad(t[..., :r], (0, self.head_dim - r))
            return (pad(k, self.far_k_dim), pad(v, self.far_v_dim)) if self.has_far else (None, None)
        w, b = self.head_weights()
        far = F.linear(self.far_up(latents), w[1:].flatten(0, 2), None if b is None else b[1:].flatten())
        far_k, far_v = (self.heads(t) for t in far.split(self.n_embd, dim=2))
        return self.shift(far_k, far_v) if self.kv_shift else (far_k, far_v)

    def forward(self, x, cache=None):
        B, T, C = x.size()
        q, k, v = (self.heads(t) for t in self.c_attn(x).split(C, dim=2))
        if self.kv_shift:
            last = (None, None) if cache is None else (cache.last_k, cache.last_v)
            if cache is not None:   # the next chunk mixes in this chunk's last *raw* key/value
                cache.last_k, cache.last_v = k[:, :, -1:].clone(), v[:, :, -1:].clone()
            k, v = self.shift(k, v, *last)
        if self.rope:   # after the shift, as the KV shifting paper orders them; keys cached turned
            start = 0 if cache is None else cache.length
            q, k = self.rotate(q, start), self.rotate(k, start)
        latents = self.far_down(x) if self.far_mode == "latent" else None
        if cache is None:
            dropout_p = self.dropout if self.training else 0.0
            y = dar_attention(q, k, v, *self.far_keys_values(k, v, latents), self.window, dropout_p)
        elif T == 1:
            y = self.decode(q, k, v, latents, cache)
        else:   # a prompt, or a chunk after cached tokens: the sequence path, over what is held
            recent_k, recent_v = cache.recent(k)
            cache.append(k, v, latents)
            y = dar_attention(q, torch.cat([recent_k, k], 2), torch.cat([recent_v, v], 2),
                              *self.far_keys_values(*cache.kept()), self.window)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def decode(self, q, k, v, latents, cache):
        """One token attends to all the cache holds, itself included: one softmax, no masks.
        The ring's first m slots hold the last m tokens, the oldest in slot `start`."""
        cache.append(k, v, latents)
        T, W = cache.length, cache.window
        m = min(T, W)
        start, local_k, local_v = (T - m) % max(W, 1), cache.local_k[:, :, :m], cache.local_v[:, :, :m]
        if not self.has_far:   # one tier (a sliding window, a full cache): the fused kernel
            return F.scaled_dot_product_attention(q, local_k, local_v)
        q, (B, H) = q / math.sqrt(self.head_dim), q.shape[:2]
        if self.far_mode == "slice":   # every token's kept coordinates, plus the window's others
            # as (B * H, ., .) views for bmm: a 4-d matmul's reshapes cost more than its arithmetic here
            rk, bh = self.far_k_dim, lambda t: t.flatten(0, 1)
            scores = torch.bmm(bh(q[..., :rk]), bh(cache.far_k[:, :, :T]).mT)
            scores[..., T - m:] += torch.bmm(bh(q[..., rk:]), bh(local_k).mT).roll(-start, -1)   # to position order
            att = F.softmax(scores, dim=-1)
            y = [torch.bmm(att, bh(cache.far_v[:, :, :T])), torch.bmm(att[..., T - m:].roll(start, -1), bh(local_v))]
            return torch.cat(y, -1).view(B, H, 1, -1)
        # Latent: no far key is rebuilt. Head h's far key is W_K far_up c + b_K (c the latent;
        # W_K, b_K its rows of c_attn), so q . far_k = (q W_K far_up) . c + q . b_K, and the
        # weighted far values are W_V far_up (sum_j a_j c_j) + (sum_j a_j) b_V.
        if cache.maps is None:   # per head W_K far_up, W_V far_up (H, d, r), b_K, b_V (H, d): once a fill
            w, b = self.head_weights()
            cache.maps = (w[1] @ self.far_up.weight, w[2] @ self.far_up.weight, *((None, None) if b is None else b[1:]))
        key_map, value_map, key_bias, value_bias = cache.maps
        c = cache.latents[:, :T - m]
        far = torch.bmm((q @ key_map).flatten(1, 2), c.mT).view(B, H, 1, T - m)   # heads share the latents
        if key_bias is not None:
            far = far + (q * key_bias[:, None]).sum(-1, keepdim=True)
        if self.kv_shift:   # far key j is now far_k_j + prev far_k_{j-1}
            far = mix(self.k_shift_now, self.k_shift_prev, far, F.pad(far[..., :-1], (1, 0)))
        att = F.softmax(torch.cat([far, q @ local_k.mT], -1), dim=-1)
        far_att = att[..., :T - m]
        if self.kv_shift:   # sum_j a_j (now v_j + prev v_{j-1}) = sum_j (now a_j + prev a_{j+1}) v_j
            far_att = mix(self.v_shift_now, self.v_shift_prev, far_att, F.pad(far_att[..., 1:], (0, 1)))
        y = att[..., T - m:] @ local_v + torch.bmm(far_att.flatten(1, 2), c).view(B, H, 1, -1) @ value_map.mT
        return y if value_bias is None else y + far_att.sum(-1, keepdim=True) * value_bias[:, None]


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
        self.has_wpe = not config.rope or config.rope_wpe   # learned absolute positions
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            **(dict(wpe=nn.Embedding(config.block_size, config.n_embd)) if self.has_wpe else {}),
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
        for block in self.transformer.h if config.far_mode == "latent" else []:   # the bottleneck
            torch.nn.init.orthogonal_(block.attn.far_up.weight)   # starts as a projection onto r axes
            block.attn.far_down.weight.data.copy_(block.attn.far_up.weight.T)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            torch.nn.init.zeros_(module.bias)

    def get_num_params(self, non_embedding=True):
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding and self.has_wpe else n

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
        x = self.transformer.wte(idx) + self.transformer.wpe(pos) if self.has_wpe else self.transformer.wte(idx)
        x = self.transformer.drop(x)
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
        (B, T) num_samples times (rows b * num_samples, ... continue row b). use_cache=False
        recomputes the last block_size tokens every step, as nanoGPT does. With the cache (pass
        one of batch B * num_samples to inspect it) a prompt is prefilled once and its rows
        copied to its samples; a full context keeps its last block_size // 2 tokens and is
        prefilled again, O(block_size) a token on average."""
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
# 5. Converting a trained full-dimension model
#
# Slice: per head, W_K = U S V^T; W_Q <- U^T W_Q and W_K <- U^T W_K leave every q . k as it
# was (U is orthogonal) but order the key coordinates by energy, so the first far_k_dim are
# the best truncation the weights allow. Values likewise by W_V's SVD, c_proj's columns
# absorbing U_v. With a calibration batch U is instead the principal axes (PCA about the
# origin) of the raw keys and values on it, biases included. kv_shift commutes with this.
# Latent: far_up = A, far_down = A^T for the top r axes A of the attention input (PCA on the
# batch, or the top right singular vectors of the key and value weights): a distant token
# is seen through A A^T x, the best rank-r view of x. At r = n_embd nothing changes.

def principal_axes(moment):
    """Orthogonal matrices whose columns are eigenvectors, largest eigenvalue first."""
    return torch.linalg.eigh(moment)[1].flip(-1)


@torch.no_grad()
def input_moments(model, idx):
    """Per layer, the second moment of the attention input with a 1 appended, (C + 1, C + 1)
    on idx: for any projection [W, b] of the input, E[y y^T] = [W, b] M [W, b]^T."""
    moments = []
    def record(module, inputs, output):
        x = F.pad(inputs[0].double().flatten(0, 1), (0, 1), value=1.0)
        moments.append(x.T @ x / x.size(0))
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
    given a bottleneck (latent); with calibration token ids (B, T), by PCA on them."""
    if not model.config.is_full or model.config.rope:   # (rope: rotations of the key space do not commute with it)
        raise ValueError("convert expects a full-dimension model (far dims = head_dim) without rope")
    config = replace(model.config, window=window, far_k_dim=far_k_dim, far_v_dim=far_v_dim,
                     far_mode=far_mode, far_latent_dim=far_latent_dim)
    param = next(model.parameters())
    new = GPT(config).to(device=param.device, dtype=param.dtype)
    new.load_state_dict(model.state_dict(), strict=far_mode == "slice")   # latent: + far_down, far_up
    moments = [None] * config.n_layer if calibration is None else input_moments(model, calibration)
    for block, M in zip(new.transformer.h, moments):
        attn, (w, b) = block.attn, block.attn.head_weights()   # views: writing them writes c_attn
        svd = lambda m: torch.linalg.svd(m.double(), full_matrices=False)
        if far_mode == "latent":
            A = svd(w[1:].flatten(0, 2))[2].T if M is None else principal_axes(M[:-1, :-1])
            attn.far_up.weight.copy_(A[:, :config.far_latent_dim])
            attn.far_down.weight.copy_(A[:, :config.far_latent_dim].T)
            continue
        Wb = w.double() if b is None else torch.cat([w, b[..., None]], -1).double()   # [W, b] per head
        U_k, U_v = (svd(w[i])[0] if M is None else principal_axes(Wb[i] @ M[:Wb.size(-1), :Wb.size(-1)] @ Wb[i].mT)
                    for i in (1, 2))   # (H, d, d)
        for i, U in ((0, U_k), (1, U_k), (2, U_v)):   # q and k by U_k, v by U_v
            w[i] = U.mT @ w[i].double()
            if b is not None:
                b[i] = (U.mT @ b[i, :, :, None].double())[..., 0]
        c_proj = attn.c_proj.weight.view(config.n_embd, config.n_head, -1)   # head h's output columns
        c_proj.copy_(torch.einsum("chi,hij->chj", c_proj.double(), U_v))
    return new
