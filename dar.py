"""
Distance-Adaptive Representation (DAR) in a nanoGPT-style GPT, in one file.

A token's key and value keep their full head dimension d while the token is among the
last `window` tokens, and only their first `far_k_dim` / `far_v_dim` coordinates once it
is further away. One softmax spans both tiers, so a distant token is the same vector seen
at lower resolution. At long contexts the KV cache shrinks by about
(far_k_dim + far_v_dim) / 2d. README.md explains the method and its regimes.

Sections, top to bottom:
  1. GPTConfig            the nanoGPT fields plus window, far_k_dim, far_v_dim, kv_shift
  2. dar_attention        the training path: masked scaled_dot_product_attention calls
  3. kv_shift             the learnable mix of each key/value with the previous token's
  4. LayerCache, KVCache  the two-tier cache, preallocated: a ring of full keys, a truncated store
  5. GPT                  nanoGPT's model with DAR attention; forward, cached forward, generate
  6. convert              rotate a trained full-dimension model so truncation loses least
                          (by the weights' SVD, or PCA of keys/values on a calibration batch)
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
        for name in ("far_k_dim", "far_v_dim"):
            if getattr(self, name) is None:
                setattr(self, name, max(1, self.head_dim // 4))
            if not 0 <= getattr(self, name) <= self.head_dim:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, head_dim={self.head_dim}]")
        if self.window == 0 and self.far_k_dim == 0 and self.far_v_dim == 0:
            raise ValueError("window=0 with far_k_dim=0 and far_v_dim=0 leaves nothing to attend to")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @property
    def is_full(self):
        """True when every token a context can hold is attended at full dimension."""
        d = self.head_dim
        return self.window >= self.block_size or (self.far_k_dim == d and self.far_v_dim == d)


# ----------------------------------------------------------------------------------------
# 2. DAR attention over whole sequences (training and the uncached forward)
#
# score(i, j) = q_i . k_j / sqrt(d)             if 0 <= i - j < window   (local tier)
#             = q_i[:rk] . k_j[:rk] / sqrt(d)   if i - j >= window       (far tier)
# one softmax over both tiers; a far token contributes [v_j[:rv], 0, ..., 0].
#
# Trick: give attention the full keys and a copy with coordinates >= rk zeroed (values
# likewise with rv), and a mask that lets token i see the first copy of j only inside the
# window and the second copy only beyond it. Zeroed coordinates add nothing to a dot
# product, so this is exactly the formula, computed by the fused SDPA kernel.
#
# Done in one call over all T queries, the kernel scores T x 2T pairs, most of them masked.
# So queries go in blocks of about `window` rows: a block sees full keys only from the
# window before its first query, and far keys only up to its last query minus the window.
# With block >= T it is the single call (the tests check both against a naive oracle).

def tier_masks(q_pos, k_pos, window):
    """Boolean (len(q_pos), len(k_pos)) masks: which keys each query sees locally / far."""
    dist = q_pos[:, None] - k_pos[None, :]
    return (dist >= 0) & (dist < window), dist >= window


def dar_attention(q, k, v, window, far_k_dim, far_v_dim, dropout_p=0.0, block=None):
    """q, k, v: (B, H, T, d). Returns (B, H, T, d). `block`: queries per SDPA call."""
    T, d = q.size(-2), q.size(-1)
    if window >= T or (far_k_dim == d and far_v_dim == d):   # nothing is truncated
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    # Sliding window (far dims 0): the far tier holds nothing, so it is left out of the
    # softmax entirely; zero-score entries would let the count of old tokens dilute it.
    has_far = far_k_dim > 0 or far_v_dim > 0
    far_k = F.pad(k[..., :far_k_dim], (0, d - far_k_dim))
    far_v = F.pad(v[..., :far_v_dim], (0, d - far_v_dim))
    block = block or max(window, 32)   # at least 32 queries a call keeps the loop short
    pos, out = torch.arange(T, device=q.device), []
    for start in range(0, T, block):
        end = min(T, start + block)
        near = max(0, start - window + 1)            # oldest token local to this block
        n_far = max(0, end - window) if has_far else 0   # far tokens: j <= i - window
        local, _ = tier_masks(pos[start:end], pos[near:end], window)
        _, far = tier_masks(pos[start:end], pos[:n_far], window)
        keys = torch.cat([k[:, :, near:end], far_k[:, :, :n_far]], dim=2)
        values = torch.cat([v[:, :, near:end], far_v[:, :, :n_far]], dim=2)
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

def masked(scores, mask):
    return scores if mask is None else scores.masked_fill(~mask, float("-inf"))


def two_tier_attention(q, local_k, local_v, far_k=None, far_v=None, local_mask=None, far_mask=None):
    """One softmax over full-dimension local keys and truncated far keys (far_k None: no
    far tier). q: (B, H, n, d); masks (n, keys) are True where a query may look."""
    if far_k is None:   # one tier (a full cache, a sliding window): the fused kernel
        return F.scaled_dot_product_attention(q, local_k, local_v, attn_mask=local_mask)
    B, H, n, d = q.shape
    # (B * H, ., .) views for bmm: 4-d matmul would add expand and reshape calls, which
    # cost more than the arithmetic when decoding one token
    q, local_k, local_v, far_k, far_v = (t.flatten(0, 1) for t in (q / math.sqrt(d), local_k, local_v, far_k, far_v))
    scores = torch.cat([masked(torch.bmm(q, local_k.mT), local_mask),
                        masked(torch.bmm(q[..., :far_k.size(-1)], far_k.mT), far_mask)], dim=-1)
    att = F.softmax(scores, dim=-1)
    y = torch.bmm(att[..., :local_k.size(1)], local_v)
    y[..., :far_v.size(-1)] += torch.bmm(att[..., local_k.size(1):], far_v)   # [v[:rv], 0, ..., 0]
    return y.unflatten(0, (B, H))


class LayerCache:
    def __init__(self, config, batch_size):
        self.shape = (batch_size, config.n_head)
        self.head_dim, self.far_k_dim, self.far_v_dim = config.head_dim, config.far_k_dim, config.far_v_dim
        self.window = config.block_size if config.is_full else min(config.window, config.block_size)
        self.far_size = config.block_size - self.window   # positions that can ever be far
        self.has_far = self.far_size > 0 and (self.far_k_dim > 0 or self.far_v_dim > 0)   # sliding: none
        self.length = 0                            # tokens seen so far
        self.local_k = self.local_v = None         # (B, H, window, d), slot p % window
        self.far_k = self.far_v = None             # (B, H, block_size - window, far_k/v_dim)
        self.last_k = self.last_v = None           # raw key/value of the last token (kv_shift)

    def allocate(self, like):
        """The buffers, once, in the dtype and on the device of `like`."""
        self.local_k, self.local_v = (like.new_empty(*self.shape, self.window, self.head_dim) for _ in "kv")
        if self.has_far:
            self.far_k = like.new_empty(*self.shape, self.far_size, self.far_k_dim)
            self.far_v = like.new_empty(*self.shape, self.far_size, self.far_v_dim)

    def held(self):
        """Views of what is filled: local_k, local_v, far_k, far_v (far None: no far tier)."""
        if self.local_k is None:
            return (None,) * 4
        n_local, n_far = min(self.length, self.window), max(0, self.length - self.window)
        far = (self.far_k[:, :, :n_far], self.far_v[:, :, :n_far]) if self.has_far else (None, None)
        return (self.local_k[:, :, :n_local], self.local_v[:, :, :n_local]) + far

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
        local_k, local_v, far_k, far_v = self.held()
        first = L - local_k.size(2)   # the oldest ring token; ring slots in position order:
        ring = torch.arange(first, L, device=q.device) % max(W, 1)
        recent_k, recent_v = torch.cat([local_k[:, :, ring], k], 2), torch.cat([local_v[:, :, ring], v], 2)
        new_pos, recent_pos = (torch.arange(start, L + n, device=q.device) for start in (L, first))
        local, far = tier_masks(new_pos, recent_pos, W)
        if self.has_far:   # held far tokens are far for every new query
            far_k = torch.cat([far_k, recent_k[..., :self.far_k_dim]], 2)
            far_v = torch.cat([far_v, recent_v[..., :self.far_v_dim]], 2)
            far = torch.cat([far.new_ones(n, first), far], 1)
        y = two_tier_attention(q, recent_k, recent_v, far_k, far_v, local, far)
        # keep: tokens now beyond the window go to the far store, the rest to their slots
        leaving = max(0, L + n - W - first)
        self._store_far(first, recent_k[:, :, :leaving], recent_v[:, :, :leaving])
        if W > 0:
            slots = recent_pos[leaving:] % W
            self.local_k.index_copy_(2, slots, recent_k[:, :, leaving:])
            self.local_v.index_copy_(2, slots, recent_v[:, :, leaving:])
        self.length = L + n
        return y

    def _store_far(self, start, k, v):
        """Write tokens start, start + 1, ... that left the window to the far store, first
        coordinates only."""
        if self.has_far:
            self.far_k[:, :, start:start + k.size(2)] = k[..., :self.far_k_dim]
            self.far_v[:, :, start:start + v.size(2)] = v[..., :self.far_v_dim]


def tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


class KVCache:
    """One LayerCache per layer. Create with GPT.new_cache(batch_size)."""

    def __init__(self, config, batch_size):
        self.config, self.batch_size = config, batch_size
        self.layers = [LayerCache(config, batch_size) for _ in range(config.n_layer)]

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
            for name in ("local_k", "local_v", "far_k", "far_v"):
                src = getattr(theirs, name)
                if src is not None:   # in place, each row broadcast to its copies
                    getattr(mine, name).unflatten(0, (-1, repeats)).copy_(src.unsqueeze(1))
            mine.last_k, mine.last_v = (None if t is None else t.repeat_interleave(repeats, 0)
                                        for t in (theirs.last_k, theirs.last_v))
            mine.length = theirs.length

    @property
    def length(self):
        return self.layers[0].length

    def tier_nbytes(self):
        """(local, far) bytes of the keys and values held."""
        held = [layer.held() for layer in self.layers]
        return sum(tensor_bytes(h[:2]) for h in held), sum(tensor_bytes(h[2:]) for h in held)

    @property
    def nbytes(self):
        """Bytes held: DESIGN.md's formula at the current length (plus, with kv_shift, one
        raw key and value per head)."""
        return sum(self.tier_nbytes()) + sum(tensor_bytes((l.last_k, l.last_v)) for l in self.layers)

    @property
    def allocated_nbytes(self):
        """Bytes of every tensor the cache holds: the formula at block_size (plus kv_shift's)."""
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
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.kv_shift = config.kv_shift
        if self.kv_shift:   # init as in the paper: now ~ U(0, 1), prev = 1 - now
            k_now, v_now = torch.rand(config.n_head), torch.rand(config.n_head)
            self.k_shift_now, self.k_shift_prev = nn.Parameter(k_now), nn.Parameter(1 - k_now)
            self.v_shift_now, self.v_shift_prev = nn.Parameter(v_now), nn.Parameter(1 - v_now)

    def forward(self, x, cache=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.kv_shift:
            last_k, last_v = (None, None) if cache is None else (cache.last_k, cache.last_v)
            if cache is not None:   # the next chunk mixes in this chunk's last *raw* key/value
                cache.last_k, cache.last_v = k[:, :, -1:].clone(), v[:, :, -1:].clone()
            k = kv_shift(k, last_k, self.k_shift_now, self.k_shift_prev)
            v = kv_shift(v, last_v, self.v_shift_now, self.v_shift_prev)
        if cache is None:
            dropout_p = self.dropout if self.training else 0.0
            y = dar_attention(q, k, v, self.window, self.far_k_dim, self.far_v_dim, dropout_p)
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
# Per head, W_K = U S V^T. Replacing W_Q <- U^T W_Q and W_K <- U^T W_K leaves every q.k
# unchanged (U is orthogonal) but orders key coordinates by energy, so the first far_k_dim
# of them are the best truncation the weights allow. Values likewise with W_V's SVD, the
# matching columns of the output projection absorbing U_v. KV shifting mixes whole vectors
# with scalars, so it commutes with the rotation.
# Data-aware variant: with a calibration batch, U is instead the principal axes (PCA, about
# the origin) of the keys and values the model computes on it, so the leading coordinates
# hold the most energy of real activations, biases included.

def principal_axes(moment):
    """Orthogonal (d, d) matrix whose columns are eigenvectors, largest eigenvalue first."""
    return torch.linalg.eigh(moment)[1].flip(-1)


@torch.no_grad()
def key_value_moments(model, idx):
    """Per layer, the (n_head, d, d) second moments of raw keys and of raw values on idx."""
    C, H = model.config.n_embd, model.config.n_head
    moments = []
    def record(module, inputs, output):
        _, k, v = output.double().split(C, dim=2)
        k, v = (t.reshape(-1, H, C // H) for t in (k, v))
        moments.append(tuple(torch.einsum("nhi,nhj->hij", t, t) / t.size(0) for t in (k, v)))
    hooks = [b.attn.c_attn.register_forward_hook(record) for b in model.transformer.h]
    was_training = model.training
    model.eval()   # no dropout in what is measured
    model(idx)
    model.train(was_training)
    for hook in hooks:
        hook.remove()
    return moments


@torch.no_grad()
def convert(model, window, far_k_dim, far_v_dim, calibration=None):
    """A copy of a full-dimension model, rotated per head and set to the new tiers.
    calibration: optional (B, T) token ids for the data-aware (PCA) rotation."""
    if not model.config.is_full:
        raise ValueError("convert expects a full-dimension model (far dims = head_dim)")
    config = replace(model.config, window=window, far_k_dim=far_k_dim, far_v_dim=far_v_dim)
    param = next(model.parameters())
    new = GPT(config).to(device=param.device, dtype=param.dtype)
    new.load_state_dict(model.state_dict())
    moments = None if calibration is None else key_value_moments(model, calibration)
    C, d = config.n_embd, config.head_dim
    for layer, block in enumerate(new.transformer.h):
        c_attn, c_proj = block.attn.c_attn, block.attn.c_proj
        for h in range(config.n_head):
            q, k, v = (slice(part * C + h * d, part * C + (h + 1) * d) for part in range(3))
            if moments is None:
                U_k = torch.linalg.svd(c_attn.weight[k].double(), full_matrices=False)[0]
                U_v = torch.linalg.svd(c_attn.weight[v].double(), full_matrices=False)[0]
            else:
                U_k, U_v = (principal_axes(m[h]) for m in moments[layer])
            for rows, U in ((q, U_k), (k, U_k), (v, U_v)):
                c_attn.weight[rows] = (U.T @ c_attn.weight[rows].double()).to(param.dtype)
                if c_attn.bias is not None:
                    c_attn.bias[rows] = (U.T @ c_attn.bias[rows].double()).to(param.dtype)
            cols = slice(h * d, (h + 1) * d)   # where head h's output enters c_proj
            c_proj.weight[:, cols] = (c_proj.weight[:, cols].double() @ U_v).to(param.dtype)
    return new
