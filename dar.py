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
  4. LayerCache, KVCache  the two-tier cache: a ring buffer of full keys, a truncated store
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
# token at position p lives in slot p % window, and a far store of older tokens' first
# far_k_dim / far_v_dim coordinates. When a token leaves the window only its leading
# coordinates are copied to the far store; the rest are never stored. Every tensor is
# exactly as large as what it holds, so `nbytes` is the memory really in use.

def masked(scores, mask):
    return scores if mask is None else scores.masked_fill(~mask, float("-inf"))


def two_tier_attention(q, local_k, local_v, far_k, far_v, local_mask=None, far_mask=None):
    """One softmax over full-dimension local keys and truncated far keys (far_k None: no
    far tier). q: (B, H, n, d); masks (n, keys) are True where a query may look."""
    d = q.size(-1)
    scale = 1.0 / math.sqrt(d)
    scores = [masked(q @ local_k.transpose(-2, -1) * scale, local_mask)]
    if far_k is not None:
        far_scores = q[..., :far_k.size(-1)] @ far_k.transpose(-2, -1) * scale
        scores.append(masked(far_scores, far_mask))
    att = F.softmax(torch.cat(scores, dim=-1), dim=-1)
    y = att[..., :local_k.size(2)] @ local_v
    if far_k is not None:
        y = y + F.pad(att[..., local_k.size(2):] @ far_v, (0, d - far_v.size(-1)))
    return y


class LayerCache:
    def __init__(self, window, far_k_dim, far_v_dim):
        self.window, self.far_k_dim, self.far_v_dim = window, far_k_dim, far_v_dim
        self.has_far = far_k_dim > 0 or far_v_dim > 0   # sliding window: nothing is kept
        self.length = 0                            # tokens seen so far
        self.local_k = self.local_v = None         # (B, H, min(length, window), d)
        self.far_k = self.far_v = None             # (B, H, length - window, far_k/v_dim)
        self.last_k = self.last_v = None           # raw key/value of the last token (kv_shift)

    def tensors(self):
        return [t for t in (self.local_k, self.local_v, self.far_k, self.far_v,
                            self.last_k, self.last_v) if t is not None]

    def attend(self, q, k, v):
        """Attend n new queries to everything held plus the n new keys/values (already
        shifted), then keep those. q, k, v: (B, H, n, d). Returns (B, H, n, d)."""
        if self.local_k is None:
            self.local_k, self.local_v = k[:, :, :0].clone(), v[:, :, :0].clone()
            if self.has_far:
                self.far_k = k[:, :, :0, :self.far_k_dim].clone()
                self.far_v = v[:, :, :0, :self.far_v_dim].clone()
        return self._attend_one(q, k, v) if q.size(2) == 1 else self._attend_chunk(q, k, v)

    def _attend_one(self, q, k, v):
        """Decoding: token t - window leaves the ring for the far store and token t takes
        its slot. Then every ring token is local and every stored one far: no masks."""
        W, slot = self.window, self.length % max(self.window, 1)
        if W == 0:
            self._spill(k, v)
        elif self.local_k.size(2) < W:   # ring still filling
            self.local_k, self.local_v = torch.cat([self.local_k, k], 2), torch.cat([self.local_v, v], 2)
        else:
            self._spill(self.local_k[:, :, slot:slot + 1], self.local_v[:, :, slot:slot + 1])
            self.local_k[:, :, slot:slot + 1], self.local_v[:, :, slot:slot + 1] = k, v
        self.length += 1
        return two_tier_attention(q, self.local_k, self.local_v, self.far_k, self.far_v)

    def _attend_chunk(self, q, k, v):
        """A prompt chunk: a new token may see a held or new token locally or far (the
        chunk spans the window boundary), so positions decide, as in dar_attention."""
        n, W = q.size(2), self.window
        new_pos = torch.arange(self.length, self.length + n, device=q.device)
        # ring slot s holds the token p with p % W == s among the last W positions
        slots = torch.arange(self.local_k.size(2), device=q.device)
        ring_pos = self.length - 1 - (self.length - 1 - slots) % max(W, 1)
        recent_k, recent_v = torch.cat([self.local_k, k], 2), torch.cat([self.local_v, v], 2)
        recent_pos = torch.cat([ring_pos, new_pos])
        local, far = tier_masks(new_pos, recent_pos, W)
        far_k = far_v = None
        if self.has_far:   # held far tokens are far for every new query
            far_k = torch.cat([self.far_k, recent_k[..., :self.far_k_dim]], 2)
            far_v = torch.cat([self.far_v, recent_v[..., :self.far_v_dim]], 2)
            far = torch.cat([far.new_ones(n, self.far_k.size(2)), far], 1)
        y = two_tier_attention(q, recent_k, recent_v, far_k, far_v, local, far)
        # keep: tokens now beyond the window go to the far store, the rest form the ring
        leaving = recent_pos < self.length + n - W
        self._spill(recent_k[:, :, leaving], recent_v[:, :, leaving])
        staying = torch.nonzero(~leaving).squeeze(1)
        staying = staying[torch.argsort(recent_pos[staying] % max(W, 1))]
        self.local_k, self.local_v = recent_k[:, :, staying], recent_v[:, :, staying]
        self.length += n
        return y

    def _spill(self, k, v):
        """Append tokens that left the window to the far store, first coordinates only."""
        if self.has_far:
            self.far_k = torch.cat([self.far_k, k[..., :self.far_k_dim]], 2)
            self.far_v = torch.cat([self.far_v, v[..., :self.far_v_dim]], 2)


class KVCache:
    """One LayerCache per layer. Create with GPT.new_cache(batch_size)."""

    def __init__(self, config, batch_size):
        self.config, self.batch_size = config, batch_size
        self.reset()

    def reset(self):
        self.layers = [LayerCache(self.config.window, self.config.far_k_dim, self.config.far_v_dim)
                       for _ in range(self.config.n_layer)]

    @property
    def length(self):
        return self.layers[0].length

    @property
    def nbytes(self):
        """Bytes of keys and values held (plus, with kv_shift, one raw key/value per head)."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors())

    @property
    def full_nbytes(self):
        """Bytes a full-dimension cache of the same length and dtype would hold."""
        c, local_k = self.config, self.layers[0].local_k
        element_size = 0 if local_k is None else local_k.element_size()
        return c.n_layer * self.batch_size * self.length * 2 * c.n_embd * element_size

    def tier_nbytes(self):
        """(local tier bytes, far tier bytes)."""
        count = lambda *ts: sum(t.numel() * t.element_size() for t in ts if t is not None)
        return (sum(count(layer.local_k, layer.local_v) for layer in self.layers),
                sum(count(layer.far_k, layer.far_v) for layer in self.layers))


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
                        cache=None):
        """Yield (B, 1) sampled tokens one at a time, continuing idx (B, T).

        use_cache=False recomputes the last block_size tokens every step, as nanoGPT does.
        With the cache (pass one to inspect it), a full context keeps its last
        block_size // 2 tokens and is prefilled again: O(block_size) a token on average."""
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be > 0 (use top_k=1 for greedy)")
        block_size = self.config.block_size
        if use_cache and cache is None:
            cache = self.new_cache(idx.size(0))
        for step in range(max_new_tokens):
            if not use_cache:
                logits, _ = self(idx[:, -block_size:])
            elif step == 0 or cache.length == block_size:
                keep = block_size if step == 0 else max(1, block_size // 2)
                cache.reset()
                logits, _ = self(idx[:, -keep:], cache=cache)
            else:
                logits, _ = self(idx[:, -1:], cache=cache)
            logits = logits[:, -1, :] / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
            yield idx_next

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True):
        """nanoGPT's generate; top_k=1 is greedy."""
        new = list(self.generate_stream(idx, max_new_tokens, temperature, top_k, use_cache))
        return torch.cat([idx] + new, dim=1)


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
