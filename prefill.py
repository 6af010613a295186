"""
A faster, exact attention for cached prompts on CPU, read after dar.py.

dar.dar_attention gives SDPA the keys and their far copies under one mask. A cached prompt
needs no gradient, and then the masks can go: the far tier of query i is causal attention
W tokens behind (keys j <= i - W, their first w coordinates), the local tier a band of W
keys; each part gives its outputs and log-sum-exps (lse), and weighting each part by
exp(lse - lse of both) gives one softmax over both (flash-decoding's merge). PyTorch's CPU
flash kernel returns the lse (no gradient flows through it; n >= 1 queries only).

    import prefill
    prefill.enable()   # dar.prompt_attention = split_attention (sample.py, bench.py, train.py)

test_dar.py checks split_attention against dar_attention; split_attention falls back to it
wherever the kernel or a gradient is missing, or the tensors are not on the CPU.
"""

import math

import torch
from torch.nn import functional as F

import dar

FLASH_LSE = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def enable():
    """Cached prompts take split_attention from now on (it falls back where it must)."""
    dar.prompt_attention = split_attention


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
    blocks = math.ceil(n / b)
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
        return dar.dar_attention(q, k, v, far_k, far_v, window)
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


