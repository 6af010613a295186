"""
Faster, exact one-token decoding from the two-tier cache, read after dar.py.

dar.py decodes a token as a chunk of one: its query at the last position, the window's keys
gathered from the ring, every far key rebuilt, one masked SDPA call. That is the clear path,
and it copies what the cache holds at every step. The forms here read the buffers in place:

- one tier (a sliding window, a full cache): the fused kernel over the ring as it lies;
- slice: the kept coordinates of every token and the ring's rest of the window's tokens
  score apart and meet in one softmax, nothing concatenated;
- latent: DeepSeek's MLA absorption, no far value rebuilt (W_V far_up applied once to the
  weighted sum of latents), the far keys too where no rope turns them.

    import decoding
    decoding.enable()   # dar.token_attention = decode (sample.py, bench.py, train.py)

test_dar.py checks every cache against the uncached forward on both paths.
"""

import math

import torch
from torch.nn import functional as F

import dar


def enable():
    """Decoded tokens take these forms from now on; dar.token_attention = None undoes it."""
    dar.token_attention = decode


def decode(attn, q, k, v, latents, cache):
    """One token of attention module `attn` attends to all the cache holds, itself included:
    no mask. q is viewed (B, Hkv, g, d): the g query heads that share a key/value head
    attend together. Returns (B, H, 1, d), as dar.dar_attention does."""
    cache.append(k, v, latents)
    B = q.size(0)
    q = q.view(B, attn.n_kv_head, -1, attn.head_dim)
    if not attn.has_far:   # one tier: the fused kernel (a softmax ignores the ring's order)
        m = min(cache.length, cache.window)
        y = F.scaled_dot_product_attention(q, cache.ring_k[:, :, :m], cache.ring_v[:, :, :m])
    elif attn.far_mode == "slice":
        y = decode_slice(attn, q / math.sqrt(attn.head_dim), cache)
    else:
        y = decode_latent(attn, q / math.sqrt(attn.head_dim), cache)
    return y.view(B, attn.n_head, 1, -1)


def decode_slice(attn, q, cache):
    """Every token's kept coordinates score; the window's tokens add their ring's. The ring is
    in slot order (position p in slot p % W), so its m scores are rolled into position order,
    and the weights back (cheaper than gathering the ring). By bmm: a 4-d matmul's reshapes
    cost more than its arithmetic here."""
    T = cache.length
    m = min(T, cache.window)
    oldest = (T - m) % max(cache.window, 1)   # the slot of the oldest token in the window
    rk = attn.far_k_dim
    q = q.flatten(0, 1)
    scores = torch.bmm(q[..., :rk], cache.kept_k[:, :, :T].flatten(0, 1).mT)
    ring_scores = torch.bmm(q[..., rk:], cache.ring_k[:, :, :m].flatten(0, 1).mT)
    scores[..., T - m:] += ring_scores.roll(-oldest, -1)   # slot order to position order
    att = F.softmax(scores, dim=-1)
    ring_att = att[..., T - m:].roll(oldest, -1)   # position order to slot order
    kept_y = torch.bmm(att, cache.kept_v[:, :, :T].flatten(0, 1))   # coordinates :rv
    ring_y = torch.bmm(ring_att, cache.ring_v[:, :, :m].flatten(0, 1))   # coordinates rv:
    return torch.cat([kept_y, ring_y], dim=-1)


def decode_latent(attn, q, cache):
    """MLA's absorb path: no far value is rebuilt. With far_v = W_V far_up c + b_V (c the
    latent), the far values' sum is W_V far_up sum_j a_j c_j + b_V sum_j a_j; the far keys'
    scores likewise (far_scores)."""
    B, Hkv, g, _ = q.shape
    T = cache.length
    m = min(T, cache.window)
    c = cache.latents[:, :T - m]   # (B, T - m, r), shared by all heads
    far = far_scores(attn, q, c, cache)
    local = q @ cache.ring_k[:, :, :m].mT   # (the ring's order: a softmax ignores it)
    att = F.softmax(torch.cat([far, local], dim=-1), dim=-1)
    far_att = att[..., :T - m]
    if attn.kv_shift:   # sum_j a_j (now v_j + prev v_j-1) = sum_j (now a_j + prev a_j+1) v_j
        after = F.pad(far_att[..., 1:], (0, 1))
        far_att = dar.mix(attn.v_shift_now, attn.v_shift_prev, far_att, after)
    far_sum = torch.bmm(far_att.flatten(1, 2), c).view(B, Hkv, g, -1)   # (B, Hkv, g, r)
    value_map = latent_maps(attn, cache)[1]
    y = att[..., T - m:] @ cache.ring_v[:, :, :m] + far_sum @ value_map.mT
    if attn.c_attn.bias is not None:   # c_attn's bias: q's, then k's, then v's
        value_bias = attn.c_attn.bias.split(attn.qkv_sizes)[2]
        y = y + far_att.sum(-1, keepdim=True) * value_bias.view(Hkv, 1, -1)
    return y


def latent_maps(attn, cache):
    """Per key/value head W_K far_up and W_V far_up (Hkv, d, r), computed once a fill."""
    if cache.maps is None:
        rows = attn.c_attn.weight[attn.n_embd:]
        w_k, w_v = rows.unflatten(0, (2, attn.n_kv_head, attn.head_dim))
        cache.maps = (w_k @ attn.far_up.weight, w_v @ attn.far_up.weight)
    return cache.maps


def far_scores(attn, q, c, cache):
    """q . far_k_j for the latents c_j (B, n, r): (B, Hkv, g, n). Without rope, absorbed:
    q . (W_K far_up c_j + b_K) = (q W_K far_up) . c_j + q . b_K. Under RoPE the turn between
    q and far_k_j depends on j, so no one map folds into q: the far keys are rebuilt from the
    latents every step (n r d multiply-adds a head) and turned."""
    B, Hkv, g, _ = q.shape
    key_map = latent_maps(attn, cache)[0]
    key_bias = None
    if attn.c_attn.bias is not None:   # c_attn's bias: q's, then k's, then v's
        key_bias = attn.c_attn.bias.split(attn.qkv_sizes)[1]
    if attn.rope:
        far_k = F.linear(c, key_map.flatten(0, 1), key_bias)   # (B, n, Hkv * d)
        far_k = far_k.unflatten(-1, (Hkv, attn.head_dim)).transpose(1, 2)
        if attn.kv_shift:   # shifted before the turn, as every key
            before = F.pad(far_k[:, :, :-1], (0, 0, 1, 0))
            far_k = dar.mix(attn.k_shift_now, attn.k_shift_prev, far_k, before)
        far_k = dar.rotate(far_k, attn.key_frequencies(q.device), 0)
        return q @ far_k.mT
    far = torch.bmm((q @ key_map).flatten(1, 2), c.mT).view(B, Hkv, g, -1)
    if key_bias is not None:
        far = far + (q * key_bias.view(Hkv, 1, -1)).sum(-1, keepdim=True)
    if attn.kv_shift:   # far key j is now far_k_j + prev far_k_{j-1}
        far = dar.mix(attn.k_shift_now, attn.k_shift_prev, far, F.pad(far[..., :-1], (1, 0)))
    return far
