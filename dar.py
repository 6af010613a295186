"""
Distance-Adaptive Representation (DAR) in a nanoGPT-style GPT, in one file.

Keys and values keep their full head dimension for the last `window` tokens and a reduced
one beyond; one softmax spans both tiers. far_mode "latent" is the paper's formulation (a
distant token's key and value rebuilt from a learned bottleneck of its input); "slice"
keeps their first far_k_dim / far_v_dim coordinates (no new parameters; convert.py makes a
trained model DAR). Sections: 1. config, 2. attention over a sequence, 3. the two-tier KV
cache, 4. the model, 5. generation.
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
from torch.nn import functional as F


# ----------------------------------------------------------------------------------------
# 1. Configuration: GPT-2 by default; Llama (SmolLM2): n_kv_head < n_head, norm="rmsnorm",
# mlp="swiglu", bias=False, rope=True.

CHOICES = {"norm": ("layernorm", "rmsnorm"), "mlp": ("gelu", "swiglu"),
           "far_mode": ("slice", "latent"), "rope_prefix": ("high", "low", "unrotated")}


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
        """Checks every field; fills in the far sizes left None (far_size)."""
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            self.require(name, getattr(self, name) >= 1, "must be at least 1")
        self.n_kv_head = self.n_kv_head or self.n_head
        divisible = self.n_embd % self.n_head == 0
        self.require("n_embd", divisible, f"must be divisible by n_head={self.n_head}")
        self.require("n_kv_head", self.n_head % self.n_kv_head == 0, "must divide n_head")
        for name, choices in CHOICES.items():
            self.require(name, getattr(self, name) in choices, f"must be one of {choices}")
        self.require("dropout", 0.0 <= self.dropout < 1.0, "must be in [0, 1)")
        self.require("window", self.window >= 0, "must be >= 0")
        self.far_k_dim = self.far_size("far_k_dim", "slice", 0, self.head_dim)
        self.far_v_dim = self.far_size("far_v_dim", "slice", 0, self.head_dim)
        self.far_latent_dim = self.far_size("far_latent_dim", "latent", 1, self.n_embd)
        empty = self.window == 0 and self.far_k_dim == 0 and self.far_v_dim == 0
        self.require("window", not empty, "with far_k_dim=far_v_dim=0 leaves nothing to attend to")
        self.require("rope_wpe", self.rope or not self.rope_wpe, "keeps wpe beside rope: needs it")
        if self.rope:
            self.require("rope_base", self.rope_base > 0, "must be > 0")
            even = self.head_dim % 2 == 0 and (self.far_k_dim or 0) % 2 == 0   # whole pairs
            self.require("head_dim", even, f"and far_k_dim={self.far_k_dim} must be even with rope")

    def require(self, name, ok, rule):
        if not ok:
            raise ValueError(f"{name}={getattr(self, name)!r} {rule}")

    def far_size(self, name, mode, low, high):
        """A far mode's size: None outside that mode, high // 4 unless given, in [low, high]."""
        value = getattr(self, name)
        if mode != self.far_mode:
            if value is not None:
                raise ValueError(f"{name} applies to far_mode='{mode}' only")
            return None
        if value is None:
            value = max(1, high // 4)
        if not low <= value <= high:
            raise ValueError(f"{name}={value} must be in [{low}, {high}]")
        return value

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @property
    def is_full(self):
        """Every token a context holds is attended at full dimension."""
        d = self.head_dim
        return self.window >= self.block_size or (self.far_k_dim, self.far_v_dim) == (d, d)

    def tiers(self):
        """What attention computes: (window, far_mode, far_k_dim, far_v_dim); a full model is
        a window of block_size with no far tier."""
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
# In one SDPA call: the T keys and their T far copies side by side, and a (T, 2T) mask that
# lets query i see the first copy of key j inside the window and the second beyond it:
#
#            keys 0 .. T-1      far copies 0 .. T-1
#   query i  [ i-W < j <= i ]   [ j <= i-W ]
#
# A cached chunk (a decoded token: a chunk of one) is the same with its queries at the last
# n of T positions (nanochat's offset). Queries go in blocks, each given only the keys it
# can see: fewer scores than the (T, 2T) mask, the same result.

def dar_mask(queries, keys, n_far, window):
    """Which keys each query sees: positions queries (n,) and keys (m,), then far copies of
    positions 0 .. n_far - 1; a boolean (n, m + n_far)."""
    i = queries[:, None]
    local = (keys > i - window) & (keys <= i)
    far = torch.arange(n_far, device=i.device) <= i - window
    return torch.cat([local, far], dim=1)


def dar_attention(q, k, v, far_k, far_v, window, dropout_p=0.0, block=None):
    """q: (B, H, n, d), the last n of T positions; k, v: (B, Hkv, m, d), the last m >= n;
    far_k, far_v: (B, Hkv, T, w), all T as seen beyond the window (w <= d: zero beyond what
    a far token keeps; it meets q's first w coordinates), or None (a sliding window)."""
    n = q.size(2)
    m = k.size(2)
    T = m if far_k is None else far_k.size(2)
    gqa = q.size(1) != k.size(1)
    if window >= T and n == m:   # every key is local: the fused causal kernel
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True,
                                              enable_gqa=gqa)
    if far_k is not None:   # far copies as wide as the keys: zeros meet zeros
        far_k = F.pad(far_k, (0, k.size(-1) - far_k.size(-1)))
        far_v = F.pad(far_v, (0, k.size(-1) - far_v.size(-1)))
    block = block or max(2 * window, 64)   # fastest on CPU (bench.py decode)
    key_start = T - m   # the position of k[:, :, 0]
    out = []
    for start in range(0, n, block):
        first = T - n + start   # the positions of this block's first and last queries
        last = min(T, first + block) - 1
        near = max(key_start, first - window + 1)   # the oldest key local to any of them
        n_far = 0 if far_k is None else max(0, last - window + 1)   # far copies they see
        queries = torch.arange(first, last + 1, device=q.device)
        keys = torch.arange(near, last + 1, device=q.device)
        mask = dar_mask(queries, keys, n_far, window)
        block_k = k[:, :, near - key_start:last + 1 - key_start]
        block_v = v[:, :, near - key_start:last + 1 - key_start]
        if n_far:
            block_k = torch.cat([block_k, far_k[:, :, :n_far]], dim=2)
            block_v = torch.cat([block_v, far_v[:, :, :n_far]], dim=2)
        y = F.scaled_dot_product_attention(q[:, :, start:start + block], block_k, block_v,
                                           attn_mask=mask, dropout_p=dropout_p, enable_gqa=gqa)
        out.append(y)
    return torch.cat(out, dim=2)


# Faster exact forms plug in from outside: prefill.py's for cached prompts on CPU
# (dar.prompt_attention), decoding.py's for one token, reading the cache in place.
prompt_attention = dar_attention
token_attention = None


# ----------------------------------------------------------------------------------------
# 3. The two-tier KV cache: storage only (gpt-fast's KVCache); attention does the math.
#
# A far key is a prefix of its near key, so what a token keeps at any distance is written
# once, on arrival, and nothing moves when it leaves the window. Slice, one key/value head,
# window W = 3, T = 7 tokens held:
#
#   position p           0    1    2    3    4    5    6
#   kept_k[p]  (rk)     [k0] [k1] [k2] [k3] [k4] [k5] [k6]    k_p[:rk], every token
#   ring_k[p % W]                           [k4] [k5] [k6]    k_p[rk:], the window's tokens
#
# A local key is cat(kept_k[p], ring_k[p % W]); a far key is kept_k[p] alone. Values alike
# with rv. Latent: latents[p] = far_down(x_p) for every token, and a ring of whole keys and
# values. Full: a ring of block_size whole keys and values. Buffers are allocated once, for
# block_size tokens; a slice cache holds min(T, W) * 2d + max(0, T - W) * (rk + rv) numbers
# per key/value head at T tokens.

class LayerCache:

    def __init__(self, config, batch_size):
        self.window, self.far_mode, self.far_k_dim, self.far_v_dim = config.tiers()
        self.shape = (batch_size, config.n_kv_head)
        self.config = config
        self.length = 0       # tokens held
        self.kept_k = None    # slice: (B, Hkv, block_size, rk), index p
        self.kept_v = None    # slice: (B, Hkv, block_size, rv), index p
        self.latents = None   # latent: (B, block_size, r), index p
        self.ring_k = None    # (B, Hkv, window, d - rk), slot p % window
        self.ring_v = None    # (B, Hkv, window, d - rv), slot p % window
        self.last_k = None    # kv_shift: the last token's raw key and value
        self.last_v = None
        self.maps = None      # latent: decoding.py's absorbed maps, taken once a fill

    def allocate(self, like):   # once, in the dtype and on the device of `like`
        if self.ring_k is not None:
            return
        d = self.config.head_dim
        T = self.config.block_size
        self.ring_k = like.new_empty(*self.shape, self.window, d - self.far_k_dim)
        self.ring_v = like.new_empty(*self.shape, self.window, d - self.far_v_dim)
        if self.far_mode == "latent":
            self.latents = like.new_empty(self.shape[0], T, self.config.far_latent_dim)
        elif self.far_k_dim or self.far_v_dim:
            self.kept_k = like.new_empty(*self.shape, T, self.far_k_dim)
            self.kept_v = like.new_empty(*self.shape, T, self.far_v_dim)

    def append(self, k, v, latents=None):
        """Write n new tokens at positions length, ..., length + n - 1; k, v: (B, Hkv, n, d)."""
        self.allocate(k)
        L = self.length
        n = k.size(2)
        W = self.window
        rk = self.far_k_dim
        rv = self.far_v_dim
        if self.kept_k is not None:
            self.kept_k[:, :, L:L + n] = k[..., :rk]
            self.kept_v[:, :, L:L + n] = v[..., :rv]
        if self.latents is not None:
            self.latents[:, L:L + n] = latents
        if W and n == 1:   # decoding: a slice costs less than an index
            self.ring_k[:, :, L % W:L % W + 1] = k[..., rk:]
            self.ring_v[:, :, L % W:L % W + 1] = v[..., rv:]
        elif W:   # the chunk's last W tokens: the others are beyond the window already
            positions = torch.arange(max(L, L + n - W), L + n, device=k.device)
            slots = positions % W
            self.ring_k.index_copy_(2, slots, k[:, :, n - len(slots):, rk:])
            self.ring_v.index_copy_(2, slots, v[:, :, n - len(slots):, rv:])
        self.length = L + n

    def recent(self, like):
        """Whole keys and values of the last window - 1 tokens, which a new token sees."""
        self.allocate(like)
        first = max(0, self.length - max(self.window - 1, 0))
        positions = torch.arange(first, self.length, device=self.ring_k.device)
        slots = positions % max(1, self.window)
        k = self.ring_k[:, :, slots]
        v = self.ring_v[:, :, slots]
        if self.kept_k is not None:
            k = torch.cat([self.kept_k[:, :, positions], k], dim=-1)
            v = torch.cat([self.kept_v[:, :, positions], v], dim=-1)
        return k, v

    def kept(self):   # what every held token keeps: kept_k, kept_v (slice) or latents
        return tuple(None if t is None else t[..., :self.length, :]
                     for t in (self.kept_k, self.kept_v, self.latents))


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
            for name in ("kept_k", "kept_v", "latents", "ring_k", "ring_v", "last_k", "last_v"):
                t = getattr(theirs, name)
                setattr(mine, name, None if t is None else t.repeat_interleave(repeats, 0))
            mine.length = theirs.length


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
    ones. Each key/value head reads them in its own order (rope_pairs; convert.py sets it)."""
    d = config.head_dim
    kept = config.far_k_dim if config.far_mode == "slice" else 0
    freqs = config.rope_base ** -torch.arange(0, d, 2).double().div(d)
    if config.rope_prefix == "low":
        freqs = freqs.flip(0)
    if config.rope_prefix == "unrotated":
        rotated = config.rope_base ** -torch.arange(0, d - kept, 2).double().div(d - kept)
        freqs = torch.cat([torch.zeros(kept // 2), rotated])
    return freqs.float()


def rotate(x, freqs, start):
    """RoPE: x (B, H, T, d) at positions start, start + 1, ..., pair i of head h turned by
    freqs[h, i] per position. In float32: in bf16 the angle is off by radians at p ~ 2000."""
    positions = torch.arange(start, start + x.size(2), device=x.device).float()
    angle = positions[:, None] * freqs[:, None]   # (H, T, d / 2)
    cos = angle.cos()
    sin = angle.sin()
    even = x[..., 0::2].float()
    odd = x[..., 1::2].float()
    turned = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return turned.flatten(-2).type_as(x)


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
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
        if self.rope:   # each key/value head's pair order: identity until convert.py sets it
            pairs = torch.arange(self.head_dim // 2).repeat(self.n_kv_head, 1)
            self.register_buffer("rope_pairs", pairs)

    def heads(self, t):   # (B, T, n * head_dim) -> (B, n, T, head_dim)
        return t.view(*t.shape[:2], -1, self.head_dim).transpose(1, 2)

    def key_frequencies(self, device):
        """(Hkv, d / 2): key/value head h turns its pair i at rope_frequencies[rope_pairs[h, i]]."""
        return rope_frequencies(self.config).to(device)[self.rope_pairs]

    def turn(self, q, k, start):
        """RoPE on q and k at positions start, start + 1, ...; a query head turns as the
        key/value head it reads."""
        freqs = self.key_frequencies(q.device)
        group = self.n_head // self.n_kv_head
        return rotate(q, freqs.repeat_interleave(group, 0), start), rotate(k, freqs, start)

    def shift(self, k, v, last_k=None, last_v=None):
        """KV shifting: k^_t = now * k_t + prev * k_{t-1} per head (values alike); k_{-1} is
        last_k or 0."""
        if last_k is None:
            last_k = torch.zeros_like(k[:, :, :1])
            last_v = torch.zeros_like(v[:, :, :1])
        k_before = torch.cat([last_k, k[:, :, :-1]], dim=2)
        v_before = torch.cat([last_v, v[:, :, :-1]], dim=2)
        k = mix(self.k_shift_now, self.k_shift_prev, k, k_before)
        v = mix(self.v_shift_now, self.v_shift_prev, v, v_before)
        return k, v

    def far_keys_values(self, k, v, latents):
        """Every token as seen beyond the window (None: no far tier). Slice: k[:rk], v[:rv],
        zero-padded to the wider; latent: W_KV far_up(latents) as keys and values, shifted
        and (rope) the keys turned at their own positions 0, 1, ..., as near keys are."""
        if self.far_mode == "slice":
            if not self.has_far:   # nothing kept: a sliding window
                return None, None
            width = max(self.far_k_dim, self.far_v_dim)
            far_k = F.pad(k[..., :self.far_k_dim], (0, width - self.far_k_dim))
            far_v = F.pad(v[..., :self.far_v_dim], (0, width - self.far_v_dim))
            return far_k, far_v
        key_value_rows = self.c_attn.weight[self.n_embd:]
        bias = None if self.c_attn.bias is None else self.c_attn.bias[self.n_embd:]
        far = F.linear(latents, key_value_rows @ self.far_up.weight, bias)
        far_k, far_v = far.chunk(2, dim=-1)
        far_k = self.heads(far_k)
        far_v = self.heads(far_v)
        if self.kv_shift:
            far_k, far_v = self.shift(far_k, far_v)
        if self.rope:
            far_k = rotate(far_k, self.key_frequencies(far_k.device), 0)
        return far_k, far_v

    def forward(self, x, cache=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.qkv_sizes, dim=-1)
        q = self.heads(q)
        k = self.heads(k)
        v = self.heads(v)
        if self.kv_shift:
            last_k = None if cache is None else cache.last_k
            last_v = None if cache is None else cache.last_v
            if cache is not None:   # the next chunk mixes in this chunk's last *raw* key/value
                cache.last_k = k[:, :, -1:].clone()
                cache.last_v = v[:, :, -1:].clone()
            k, v = self.shift(k, v, last_k, last_v)
        if self.rope:   # after the shift (the KV shifting paper's order); keys cached turned
            q, k = self.turn(q, k, 0 if cache is None else cache.length)
        latents = self.far_down(x) if self.far_mode == "latent" else None
        if cache is None:   # training, or a forward without a cache
            dropout_p = self.dropout if self.training else 0.0
            far_k, far_v = self.far_keys_values(k, v, latents)
            y = dar_attention(q, k, v, far_k, far_v, self.window, dropout_p)
        elif T == 1 and token_attention is not None:   # decoding.py's one-token forms
            y = token_attention(self, q, k, v, latents, cache)
        else:   # a prompt, a chunk after cached tokens, one token: the sequence path
            recent_k, recent_v = cache.recent(k)
            cache.append(k, v, latents)
            far_k, far_v = self.far_keys_values(*cache.kept())
            keys = torch.cat([recent_k, k], dim=2)
            values = torch.cat([recent_v, v], dim=2)
            y = prompt_attention(q, keys, values, far_k, far_v, self.window)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


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

    # ------------------------------------------------------------------------------------
    # 5. Generation: prefill the prompt once, then one token at a time from the cache.

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
            elif step == 0:   # one prefill, its cache rows copied to every sample
                cache.reset()
                prefilled = cache if num_samples == 1 else self.new_cache(prompt.size(0))
                logits, _ = self(prompt, cache=prefilled)
                if num_samples > 1:
                    cache.copy_rows(prefilled)
                    logits = logits.repeat_interleave(num_samples, 0)
            elif cache.length == block_size:   # full: start again from the last half
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
