"""
What a dar.KVCache holds, in bytes: the README's formula, measured on the buffers. Read
after dar.py; sample.py prints it, bench.py tabulates it, test_dar.py checks it.

Per layer, a slice cache at T tokens holds
    B * Hkv * (min(T, W) * 2d + max(0, T - W) * (rk + rv))     elements,
a latent cache B * (Hkv * min(T, W) * 2d + T * r), a full one B * Hkv * T * 2d.
"""

import torch


def tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def layer_tiers(layer):
    """(local, far) bytes of one LayerCache: the window's tokens; what older ones keep."""
    T = layer.length
    m = min(T, layer.window)
    kept = [t for t in (layer.kept_k, layer.kept_v) if t is not None]
    rings = [t for t in (layer.ring_k, layer.ring_v) if t is not None]
    local = [t[:, :, :m] for t in rings] + [t[:, :, T - m:T] for t in kept]
    far = [t[:, :, :T - m] for t in kept]
    if layer.latents is not None:   # every token's latent, from its arrival
        far.append(layer.latents[:, :T])
    return tensor_bytes(local), tensor_bytes(far)


def tiers(cache):
    """(local, far) bytes of every layer at the cache's length."""
    per_layer = [layer_tiers(layer) for layer in cache.layers]
    return sum(local for local, _ in per_layer), sum(far for _, far in per_layer)


def held(cache):
    """The formula at the current length (+ kv_shift: each layer's last raw key and value)."""
    shift = sum(tensor_bytes((layer.last_k, layer.last_v)) for layer in cache.layers)
    return sum(tiers(cache)) + shift


def allocated(cache):
    """Every tensor the cache keeps: the formula at block_size (not the absorbed maps:
    they are weights)."""
    buffers = ("kept_k", "kept_v", "latents", "ring_k", "ring_v", "last_k", "last_v")
    return sum(tensor_bytes(getattr(layer, name) for name in buffers) for layer in cache.layers)


def full(cache):
    """Bytes a full cache of the same length and dtype would hold."""
    ring = cache.layers[0].ring_k
    element_size = 0 if ring is None else ring.element_size()
    kv_width = cache.config.n_kv_head * cache.config.head_dim
    return cache.config.n_layer * cache.batch_size * cache.length * 2 * kv_width * element_size


def report(cache):
    """One line: what the two-tier cache holds and allocated, against a full cache."""
    def size(n):
        return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"
    total = held(cache)
    local, far = tiers(cache)
    whole = full(cache)
    shift = f", kv-shift state {size(total - local - far)}" if total > local + far else ""
    return (f"kv cache at {cache.length} tokens: {size(total)} held (local {size(local)}, far "
            f"{size(far)}{shift}) of {size(allocated(cache))} allocated, vs {size(whole)} for a "
            f"full cache: {total / whole:.3f}x")
