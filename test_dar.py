"""Tests for dar.py. Each checks the model against an oracle written here: a naive DAR
attention straight from the formula in README.md, a functional GPT forward that reads a
nanoGPT-named state dict, the uncached forward for the cache, the original model for a
conversion."""

import contextlib
import io
import math

import pytest
import torch
from torch.nn import functional as F

import convert
import cache_bytes
import dar
import decoding
import prefill

torch.set_num_threads(1)   # tiny tensors: threads cost more than they give


# ----------------------------------------------------------------------------------------
# Oracles

def naive_dar_attention(q, k, v, window, far_k_dim, far_v_dim):
    """The README's formula, one (query, key) pair at a time. With far dims 0 there is no far
    tier: a sliding window."""
    B, H, T, d = q.shape
    out = torch.zeros_like(q)
    for i in range(T):
        scores, values = [], []
        for j in range(i + 1):
            if i - j < window:
                scores.append((q[:, :, i] * k[:, :, j]).sum(-1))
                values.append(v[:, :, j])
            elif far_k_dim > 0 or far_v_dim > 0:
                scores.append((q[:, :, i, :far_k_dim] * k[:, :, j, :far_k_dim]).sum(-1))
                padded = torch.zeros_like(v[:, :, j])
                padded[..., :far_v_dim] = v[:, :, j, :far_v_dim]
                values.append(padded)
        a = torch.softmax(torch.stack(scores, -1) / math.sqrt(d), dim=-1)
        out[:, :, i] = (a.unsqueeze(-1) * torch.stack(values, -2)).sum(-2)
    return out


def slice_attention(q, k, v, window, far_k_dim, far_v_dim, block=None):
    """dar_attention given the slice mode's far keys and values: the first far_k_dim /
    far_v_dim coordinates, zero-padded (none with far dims 0: a sliding window)."""
    far_k = torch.cat([k[..., :far_k_dim], torch.zeros_like(k[..., far_k_dim:])], -1)
    far_v = torch.cat([v[..., :far_v_dim], torch.zeros_like(v[..., far_v_dim:])], -1)
    sliding = far_k_dim == far_v_dim == 0
    return dar.dar_attention(q, k, v, None if sliding else far_k, None if sliding else far_v, window, block=block)


def naive_rotate(x, freqs):
    """RoPE written out: at position t, coordinates (2i, 2i + 1) of head h of x (B, H, T, d)
    turned by the angle t * freqs[h][i]."""
    out = torch.empty_like(x)
    for t in range(x.size(2)):
        for h in range(x.size(1)):
            for i, f in enumerate(freqs[h]):
                c, s = math.cos(t * f), math.sin(t * f)
                out[:, h, t, 2 * i] = x[:, h, t, 2 * i] * c - x[:, h, t, 2 * i + 1] * s
                out[:, h, t, 2 * i + 1] = x[:, h, t, 2 * i] * s + x[:, h, t, 2 * i + 1] * c
    return out


def rope_frequencies(cfg):
    """The angle per position of each pair, in the order the far prefix keeps them: the
    standard base^(-2i/d), highest first; reversed; or far_k_dim unrotated coordinates first,
    then partial rotary over the rest."""
    d, r, base = cfg.head_dim, cfg.far_k_dim or 0, cfg.rope_base
    standard = [base ** (-2 * i / d) for i in range(d // 2)]
    return {"high": standard, "low": standard[::-1],
            "unrotated": [0.0] * (r // 2) + [base ** (-2 * i / (d - r)) for i in range((d - r) // 2)]}[cfg.rope_prefix]


def naive_two_tier_attention(q, k, v, far_k, far_v, window):
    """The same formula with the far keys and values given per token (latent mode: the
    layer's projections of far_up(far_down(x)))."""
    B, H, T, d = q.shape
    out = torch.zeros_like(q)
    for i in range(T):
        scores, values = [], []
        for j in range(i + 1):
            key, value = (k, v) if i - j < window else (far_k, far_v)
            scores.append((q[:, :, i] * key[:, :, j]).sum(-1))
            values.append(value[:, :, j])
        a = torch.softmax(torch.stack(scores, -1) / math.sqrt(d), dim=-1)
        out[:, :, i] = (a.unsqueeze(-1) * torch.stack(values, -2)).sum(-2)
    return out


def naive_shift(x, now, prev):
    out = torch.zeros_like(x)
    for t in range(x.size(2)):
        before = x[:, :, t - 1] if t > 0 else torch.zeros_like(x[:, :, 0])
        out[:, :, t] = now.view(1, -1, 1) * x[:, :, t] + prev.view(1, -1, 1) * before
    return out


def nanogpt_state_dict(cfg, std=0.3, seed=0, shuffled_pairs=False):
    """Random weights under nanoGPT's parameter names and shapes (large enough that
    attention is peaked, so a wrong mask shows); rope: each key/value head's order of
    rotary pairs, the identity or (shuffled_pairs) a random one."""
    g = torch.Generator().manual_seed(seed)
    C, V = cfg.n_embd, cfg.vocab_size
    kv = cfg.n_kv_head * cfg.head_dim   # grouped-query attention: fewer key/value rows
    hidden = cfg.mlp_hidden or 4 * C
    fc = 2 * hidden if cfg.mlp == "swiglu" else hidden   # gate and up, one matrix
    shapes = {"transformer.wte.weight": (V, C), "transformer.ln_f.weight": (C,)}
    if not cfg.rope or cfg.rope_wpe:
        shapes["transformer.wpe.weight"] = (cfg.block_size, C)
    for l in range(cfg.n_layer):
        p = f"transformer.h.{l}."
        shapes.update({p + "ln_1.weight": (C,), p + "attn.c_attn.weight": (C + 2 * kv, C),
                       p + "attn.c_proj.weight": (C, C), p + "ln_2.weight": (C,),
                       p + "mlp.c_fc.weight": (fc, C), p + "mlp.c_proj.weight": (C, hidden)})
    if cfg.bias:
        shapes.update({k.replace(".weight", ".bias"): (s[0],) for k, s in shapes.items()
                       if "wte" not in k and "wpe" not in k and not (cfg.norm == "rmsnorm" and "ln_" in k)})
    sd = {k: torch.randn(s, generator=g) * std for k, s in shapes.items()}
    for k in sd:
        if "ln_" in k and k.endswith(".weight"):
            sd[k] = 1 + sd[k]
    sd["lm_head.weight"] = sd["transformer.wte.weight"] if cfg.tie_embeddings else torch.randn(V, C, generator=g) * std
    for l in range(cfg.n_layer) if cfg.rope else []:
        pairs = [torch.randperm(cfg.head_dim // 2, generator=g) if shuffled_pairs else
                 torch.arange(cfg.head_dim // 2) for _ in range(cfg.n_kv_head)]
        sd[f"transformer.h.{l}.attn.rope_pairs"] = torch.stack(pairs)
    for l in range(cfg.n_layer) if cfg.far_mode == "latent" else []:
        r, p = cfg.far_latent_dim, f"transformer.h.{l}.attn."
        sd[p + "far_down.weight"] = torch.randn(r, C, generator=g) / math.sqrt(C)
        sd[p + "far_up.weight"] = torch.randn(C, r, generator=g) / math.sqrt(r)
    return sd


def naive_norm(x, weight, bias, cfg):
    """LayerNorm by nn.functional, or RMSNorm written out: x / sqrt(mean(x^2) + eps) * w."""
    if cfg.norm == "layernorm":
        return F.layer_norm(x, (cfg.n_embd,), weight, bias, eps=cfg.norm_eps)
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * weight


def naive_mlp(x, lin, cfg):
    """GELU MLP, or SwiGLU: silu(gate) * up with gate, up the halves of c_fc's output."""
    h = lin(x, "mlp.c_fc")
    if cfg.mlp == "swiglu":
        gate, up = h[..., :h.size(-1) // 2], h[..., h.size(-1) // 2:]
        return lin(gate * torch.sigmoid(gate) * up, "mlp.c_proj")
    return lin(F.gelu(h), "mlp.c_proj")


def naive_gpt(sd, cfg, idx):
    """Logits at every position, computed functionally from a nanoGPT-named state dict.
    Grouped-query attention: each key/value head repeated for the query heads it serves."""
    B, T = idx.shape
    C, H, d = cfg.n_embd, cfg.n_head, cfg.head_dim
    kv, group = cfg.n_kv_head * d, cfg.n_head // cfg.n_kv_head
    x = sd["transformer.wte.weight"][idx] + (sd["transformer.wpe.weight"][:T] if "transformer.wpe.weight" in sd else 0)
    for l in range(cfg.n_layer):
        p = f"transformer.h.{l}."
        lin = lambda x, name: F.linear(x, sd[p + name + ".weight"], sd.get(p + name + ".bias"))
        ln = lambda x, name: naive_norm(x, sd[p + name + ".weight"], sd.get(p + name + ".bias"), cfg)
        heads = lambda t: t.view(B, T, -1, d).transpose(1, 2)
        expand = lambda t: t.repeat_interleave(group, dim=1)   # query head h reads kv head h // group
        x_in = ln(x, "ln_1")
        q, k, v = (heads(t) for t in lin(x_in, "attn.c_attn").split([C, kv, kv], 2))
        if cfg.kv_shift:
            k = naive_shift(k, sd[p + "attn.k_shift_now"], sd[p + "attn.k_shift_prev"])
            v = naive_shift(v, sd[p + "attn.v_shift_now"], sd[p + "attn.v_shift_prev"])
        if cfg.rope:   # after the shift; pair slot i of kv head h turns as pair rope_pairs[h, i]
            table = rope_frequencies(cfg)
            freqs = [[table[j] for j in order] for order in sd[p + "attn.rope_pairs"].tolist()]
            q, k = naive_rotate(q, [freqs[h // group] for h in range(H)]), naive_rotate(k, freqs)
        if cfg.far_mode == "latent":
            x_far = x_in @ sd[p + "attn.far_down.weight"].T @ sd[p + "attn.far_up.weight"].T
            _, far_k, far_v = (heads(t) for t in lin(x_far, "attn.c_attn").split([C, kv, kv], 2))
            if cfg.kv_shift:   # shifted like the near keys and values
                far_k = naive_shift(far_k, sd[p + "attn.k_shift_now"], sd[p + "attn.k_shift_prev"])
                far_v = naive_shift(far_v, sd[p + "attn.v_shift_now"], sd[p + "attn.v_shift_prev"])
            if cfg.rope:   # a far key turned at its own position, as the near key was
                far_k = naive_rotate(far_k, freqs)
            y = naive_two_tier_attention(q, expand(k), expand(v), expand(far_k), expand(far_v), cfg.window)
        else:
            y = naive_dar_attention(q, expand(k), expand(v), cfg.window, cfg.far_k_dim, cfg.far_v_dim)
        x = x + lin(y.transpose(1, 2).reshape(B, T, C), "attn.c_proj")
        x = x + naive_mlp(ln(x, "ln_2"), lin, cfg)
    x = naive_norm(x, sd["transformer.ln_f.weight"], sd.get("transformer.ln_f.bias"), cfg)
    return x @ sd["lm_head.weight"].T


def make_model(seed=0, shuffled_pairs=False, **kw):
    """A tiny GPT with nanoGPT-named random weights (+ random KV-shift mixes, rope pairs)."""
    kw = {**dict(block_size=32, vocab_size=13, n_layer=2, n_head=2, n_embd=16), **kw}
    cfg = dar.GPTConfig(**kw)
    sd = nanogpt_state_dict(cfg, seed=seed, shuffled_pairs=shuffled_pairs)
    if cfg.kv_shift:
        g = torch.Generator().manual_seed(seed + 1)
        for l in range(cfg.n_layer):
            for name in ("k_shift_now", "k_shift_prev", "v_shift_now", "v_shift_prev"):
                sd[f"transformer.h.{l}.attn.{name}"] = torch.randn(cfg.n_kv_head, generator=g)
    model = dar.GPT(cfg)
    model.load_state_dict(sd)   # strict: every name and shape must match
    return model.eval(), sd


def all_logits(model, idx):
    """Uncached logits at every position, one prefix at a time (nanoGPT's inference path)."""
    return torch.cat([model(idx[:, :t + 1])[0] for t in range(idx.size(1))], dim=1)


# How cached chunks are attended: dar.py's sequence path alone (a decoded token as a chunk of
# one), or prefill.py's split path for prompts and decoding.py's forms for one token.
PATHS = {"sequence": (dar.dar_attention, None), "fast": (prefill.split_attention, decoding.decode)}


@contextlib.contextmanager
def cached_paths(prompt, token):
    """Cached prompts attended by `prompt`, decoded tokens by `token` (one of PATHS)."""
    default_prompt = dar.prompt_attention
    default_token = dar.token_attention
    dar.prompt_attention = prompt
    dar.token_attention = token
    try:
        yield
    finally:
        dar.prompt_attention = default_prompt
        dar.token_attention = default_token


@pytest.fixture(autouse=True)
def sequence_path():
    """Every test starts on dar.py's own path, whatever an earlier one enabled."""
    with cached_paths(*PATHS["sequence"]):
        yield


@pytest.fixture(params=list(PATHS))
def path(request):
    """The test runs on both paths of PATHS."""
    with cached_paths(*PATHS[request.param]):
        yield request.param


def assert_cache_matches_uncached(model, prompt_len, tol=1e-5):
    """A prompt, one token at a time across the tier boundary, then a chunk after a
    non-empty cache: each cached step's logits are the uncached forward's, B = 2, on both
    paths of PATHS."""
    idx = torch.randint(0, 13, (2, 20), generator=torch.Generator().manual_seed(8))
    want = all_logits(model, idx)
    want = torch.cat([want[:, prompt_len - 1:14], want[:, 19:]], dim=1)
    for paths in PATHS.values():
        cache = model.new_cache(2)
        with torch.no_grad(), cached_paths(*paths):
            got = [model(idx[:, :prompt_len], cache=cache)[0]]
            got += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(prompt_len, 14)]
            got.append(model(idx[:, 14:20], cache=cache)[0])
        torch.testing.assert_close(torch.cat(got, dim=1), want, atol=tol, rtol=tol)
        assert cache.length == 20


# (window, far_k_dim, far_v_dim) with head_dim 8: every regime of README.md and the edges
REGIMES = {
    "dar": (3, 2, 2),
    "window1": (1, 2, 2),
    "odd_dims": (3, 3, 5),
    "k_ne_v": (4, 1, 6),
    "far_k0": (3, 0, 4),
    "far_v0": (3, 4, 0),
    "uniform": (0, 2, 2),
    "thin_keys": (0, 2, 8),
    "sliding": (3, 0, 0),
    "full_dims_small_window": (2, 8, 8),
    "full_window": (64, 2, 2),
}


# ----------------------------------------------------------------------------------------
# DAR attention

@pytest.mark.parametrize("name", list(REGIMES) + ["window_T-1", "window_T"])
@pytest.mark.parametrize("block", [None, 1, 2, 100])
def test_attention_matches_naive(name, block):
    T = 9
    window, far_k_dim, far_v_dim = {"window_T-1": (T - 1, 2, 3), "window_T": (T, 2, 3)}.get(name) or REGIMES[name]
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, T, 8, generator=g) for _ in range(3))
    got = slice_attention(q, k, v, window, far_k_dim, far_v_dim, block=block)
    want = naive_dar_attention(q, k, v, window, far_k_dim, far_v_dim)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [0, 1, 4, 20])
def test_full_far_dims_is_full_attention(window):
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 10, 8, generator=g) for _ in range(3))
    scores = (q @ k.transpose(-2, -1) / math.sqrt(8)).masked_fill(torch.ones(10, 10).triu(1).bool(), -math.inf)
    want = torch.softmax(scores, -1) @ v
    torch.testing.assert_close(slice_attention(q, k, v, window, 8, 8), want, atol=1e-5, rtol=1e-5)


def prompt_tensors(n, T, window, n_kv_head, far_k_dim, far_v_dim, seed=3):
    """q for the last n of T positions, the keys a cache hands dar_attention (the window's
    last ones before the chunk, then the chunk's), far keys and values of width max(rk, rv)."""
    g = torch.Generator().manual_seed(seed)
    m = n + min(T - n, max(window - 1, 0))
    width = max(far_k_dim, far_v_dim)
    q = torch.randn(2, 4, n, 8, generator=g)
    k, v = (torch.randn(2, n_kv_head, m, 8, generator=g) for _ in range(2))
    far_k = F.pad(torch.randn(2, n_kv_head, T, far_k_dim, generator=g), (0, width - far_k_dim))
    far_v = F.pad(torch.randn(2, n_kv_head, T, far_v_dim, generator=g), (0, width - far_v_dim))
    if width == 0:   # a sliding window
        return q, k, v, None, None
    return q, k, v, far_k, far_v


@pytest.mark.parametrize("far_dims, window", [(f, w) for f in [(2, 2), (1, 6), (0, 4), (4, 0), (8, 8), (0, 0)]
                                               for w in [0, 1, 3, 70, 300] if w or f != (0, 0)])
@pytest.mark.parametrize("n, T", [(150, 150), (1, 150), (2, 150), (40, 150), (130, 150)])
@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_split_attention_of_a_cached_prompt_is_the_masked_path(far_dims, window, n, T, n_kv_head):
    """The far tier as causal attention W behind plus the local band, merged by log-sum-exp:
    dar_attention's masked result, for fresh prompts and chunks after cached tokens (the
    first query seeing far keys or not), windows 0, 1, a few tokens, more than a block of
    64 queries, and beyond T; far (8, 8) is the latent's full-width far tier."""
    q, k, v, far_k, far_v = prompt_tensors(n, T, window, n_kv_head, *far_dims)
    want = dar.dar_attention(q, k, v, far_k, far_v, window)
    with torch.no_grad():
        got = prefill.split_attention(q, k, v, far_k, far_v, window)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-6)


def test_a_cached_prompt_takes_the_split_and_the_masked_path_where_the_kernel_is_missing(
        monkeypatch):
    """A model's cached prompt calls the log-sum-exp kernel (and equals the uncached
    forward); without the kernel, or with a gradient wanted, dar_attention runs instead."""
    calls = []
    kernel = prefill.FLASH_LSE
    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return kernel(*args, **kwargs)
    monkeypatch.setattr(prefill, "FLASH_LSE", spy)
    model, _ = make_model(window=3, far_k_dim=2, far_v_dim=2, kv_shift=True, rope=True)
    assert_cache_matches_uncached(model, prompt_len=7)
    assert len(calls) == 2 * (2 + 3)   # 2 layers x (band, far causal; then + far all see first)
    q, k, v, far_k, far_v = prompt_tensors(20, 20, 3, 4, 2, 2)
    calls.clear()
    q.requires_grad_(True)
    got = prefill.split_attention(q, k, v, far_k, far_v, 3)
    assert got.requires_grad and not calls   # the masked path: its gradient is the formula's
    monkeypatch.setattr(prefill, "FLASH_LSE", None)
    assert_cache_matches_uncached(model, prompt_len=7)


def test_regimes_differ():
    """The oracle comparisons mean something only if the regimes compute different things."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 12, 8, generator=g) for _ in range(3))
    outs = [slice_attention(q, k, v, *r) for r in [(3, 2, 2), (0, 2, 2), (3, 0, 0), (12, 8, 8)]]
    for i in range(len(outs)):
        for j in range(i):
            assert (outs[i] - outs[j]).abs().max() > 1e-2


# ----------------------------------------------------------------------------------------
# The whole model

@pytest.mark.parametrize("name", REGIMES)
@pytest.mark.parametrize("kv_shift", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_model_matches_naive_gpt(name, kv_shift, bias):
    window, far_k_dim, far_v_dim = REGIMES[name]
    model, sd = make_model(window=window, far_k_dim=far_k_dim, far_v_dim=far_v_dim,
                           kv_shift=kv_shift, bias=bias)
    idx = torch.randint(0, 13, (2, 11), generator=torch.Generator().manual_seed(4))
    logits, loss = model(idx, targets=idx)
    want = naive_gpt(sd, model.config, idx)
    torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(loss, F.cross_entropy(want.view(-1, 13), idx.view(-1)), atol=1e-4, rtol=1e-4)
    last, no_loss = model(idx)
    assert no_loss is None and last.shape == (2, 1, 13)
    torch.testing.assert_close(last[:, 0], want[:, -1], atol=1e-4, rtol=1e-4)


# The modern family (Llama: grouped-query attention, RMSNorm, SwiGLU, an untied head, rope)
FAMILY = dict(n_head=4, n_embd=32, n_kv_head=2, norm="rmsnorm", mlp="swiglu", mlp_hidden=24,
              bias=False, tie_embeddings=False)


@pytest.mark.parametrize("regime", ["dar", "uniform", "sliding", "full_window", "latent"])
@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
@pytest.mark.parametrize("kv_shift", [False, True])
def test_modern_family_matches_naive_gpt(regime, rope, n_kv_head, kv_shift):
    """The Llama family (GQA, RMSNorm, SwiGLU, untied head) in every regime, with and without
    rope (latent: far keys rebuilt from the bottleneck and turned at their own positions)
    and kv_shift, against the functional oracle, and cached = uncached."""
    tiers = dict(far_mode="latent", window=3, far_latent_dim=6) if regime == "latent" else dict(
        zip(("window", "far_k_dim", "far_v_dim"), REGIMES[regime]))
    model, sd = make_model(**{**FAMILY, "n_kv_head": n_kv_head}, **tiers, kv_shift=kv_shift, rope=rope,
                           shuffled_pairs=rope)   # each kv head its own order of rotary pairs
    assert model.lm_head.weight is not model.transformer.wte.weight
    idx = torch.randint(0, 13, (2, 11), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(model(idx, targets=idx)[0], naive_gpt(sd, model.config, idx), atol=1e-4, rtol=1e-4)
    assert_cache_matches_uncached(model, 5, tol=1e-4)   # (logits of an untied head: larger)


def test_grouped_query_cache_holds_the_key_value_heads_only():
    model, _ = make_model(**FAMILY, window=3, far_k_dim=2, far_v_dim=4)
    cache = model.new_cache(2)
    model(torch.randint(0, 13, (2, 9)), cache=cache)
    assert cache.layers[0].ring_k.shape == (2, 2, 3, 6) and cache.layers[0].kept_v.shape == (2, 2, 32, 4)
    assert cache_bytes.held(cache) == formula_nbytes(model.config, 2, 9)
    assert cache_bytes.full(cache) == model.config.n_layer * 2 * 9 * 2 * (2 * 8) * 4   # kv heads, not n_embd


@pytest.mark.parametrize("calibrated", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_convert_with_grouped_query_heads_is_exact_at_full_dims(calibrated, bias):
    model, _ = make_model(**{**FAMILY, "bias": bias, "norm": "layernorm"}, window=32, far_k_dim=8,
                          far_v_dim=8)
    calibration = torch.randint(0, 13, (4, 32), generator=torch.Generator().manual_seed(12)) if calibrated else None
    converted = convert.convert(model, window=3, far_k_dim=8, far_v_dim=8, calibration=calibration)
    c_attn = "transformer.h.0.attn.c_attn.weight"
    assert (converted.state_dict()[c_attn] - model.state_dict()[c_attn]).abs().max() > 1e-2   # rotated
    idx = torch.randint(0, 13, (2, 32), generator=torch.Generator().manual_seed(13))
    torch.testing.assert_close(converted(idx, targets=idx)[0], model(idx, targets=idx)[0], atol=1e-4, rtol=1e-4)
    small = convert.convert(model, window=3, far_k_dim=2, far_v_dim=2, calibration=calibration)
    assert_cache_matches_uncached(small, 5, tol=1e-4)


def test_nanogpt_state_dict_loads_as_full_model():
    """nanoGPT's names and shapes, no extra parameters, weights tied; logits equal."""
    model, sd = make_model(window=32, far_k_dim=8, far_v_dim=8)
    assert set(model.state_dict()) == set(sd)
    assert model.lm_head.weight is model.transformer.wte.weight
    idx = torch.randint(0, 13, (3, 32), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(model(idx, targets=idx)[0], naive_gpt(sd, model.config, idx), atol=1e-4, rtol=1e-4)


def test_same_parameter_count_in_every_regime():
    counts = {sum(p.numel() for p in dar.GPT(dar.GPTConfig(window=w, far_k_dim=k, far_v_dim=v)).parameters())
              for w, k, v in [(256, 32, 32), (64, 8, 8), (0, 8, 8), (0, 8, 32), (64, 0, 0)]}
    assert len(counts) == 1


@pytest.mark.parametrize("kv_shift", [False, True])
def test_causality(kv_shift):
    model, _ = make_model(window=3, far_k_dim=2, far_v_dim=3, kv_shift=kv_shift)
    idx = torch.randint(0, 13, (1, 14), generator=torch.Generator().manual_seed(6))
    changed = idx.clone()
    changed[0, 8] = (idx[0, 8] + 1) % 13
    a, b = model(idx, targets=idx)[0], model(changed, targets=idx)[0]
    torch.testing.assert_close(a[:, :8], b[:, :8], atol=0, rtol=0)
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 1e-3


@pytest.mark.parametrize("far_dims, ignores", [((0, 0), True), ((2, 2), False)])
def test_one_layer_sliding_window_ignores_distant_tokens(far_dims, ignores):
    window, T = 4, 12
    model, _ = make_model(n_layer=1, window=window, far_k_dim=far_dims[0], far_v_dim=far_dims[1])
    idx = torch.randint(0, 13, (1, T), generator=torch.Generator().manual_seed(7))
    changed = idx.clone()
    changed[0, :T - window] = (idx[0, :T - window] + 5) % 13   # every token at distance >= window
    diff = (model(idx)[0] - model(changed)[0]).abs().max()
    assert (diff == 0) if ignores else (diff > 1e-3)


def test_dropout_trains():
    model, _ = make_model(window=3, far_k_dim=2, far_v_dim=2, dropout=0.2)
    model.train()
    idx = torch.randint(0, 13, (2, 16))
    _, loss = model(idx, targets=idx)
    loss.backward()
    assert torch.isfinite(loss) and model.lm_head.weight.grad is not None


# ----------------------------------------------------------------------------------------
# The two-tier cache

@pytest.mark.parametrize("name", REGIMES)
@pytest.mark.parametrize("kv_shift", [False, True])
@pytest.mark.parametrize("prompt_len", [2, 3, 7])   # shorter than, equal to, longer than window 3
def test_cache_matches_uncached(name, kv_shift, prompt_len):
    window, far_k_dim, far_v_dim = REGIMES[name]
    model, _ = make_model(window=window, far_k_dim=far_k_dim, far_v_dim=far_v_dim, kv_shift=kv_shift)
    assert_cache_matches_uncached(model, prompt_len)


def formula_nbytes(cfg, B, T, element_size=4):
    d, W = cfg.head_dim, cfg.window
    per_layer = B * cfg.n_kv_head * (min(T, W) * 2 * d + max(0, T - W) * (cfg.far_k_dim + cfg.far_v_dim))
    return cfg.n_layer * per_layer * element_size


def storage_nbytes(cache):
    """Bytes of the storage behind every tensor the cache's layers keep."""
    held = [t for layer in cache.layers for t in vars(layer).values() if torch.is_tensor(t)]
    return sum(t.untyped_storage().nbytes() for t in held)


def buffer_addresses(cache):
    names = ("ring_k", "ring_v", "kept_k", "kept_v")
    return [getattr(layer, n).data_ptr() for layer in cache.layers for n in names if getattr(layer, n) is not None]


@pytest.mark.parametrize("name", ["dar", "odd_dims", "uniform", "thin_keys", "sliding", "full_window",
                                  "full_dims_small_window"])
@pytest.mark.parametrize("kv_shift", [False, True])
def test_cache_nbytes_is_the_formula_and_buffers_are_written_in_place(name, kv_shift, path):
    window, far_k_dim, far_v_dim = REGIMES[name]
    model, _ = make_model(window=window, far_k_dim=far_k_dim, far_v_dim=far_v_dim, kv_shift=kv_shift)
    cfg, B = model.config, 2
    idx = torch.randint(0, 13, (B, 32))
    cache = model.new_cache(B)
    assert cache_bytes.held(cache) == cache_bytes.allocated(cache) == 0
    # kv_shift also holds the last raw key and value: 2d per head per layer, not per token
    shift = cfg.n_layer * B * cfg.n_head * 2 * cfg.head_dim * 4 if kv_shift else 0
    for prompt_len in (5, 11):   # a second prefill after reset() reuses the buffers
        cache.reset()
        model(idx[:, :prompt_len], cache=cache)
        if prompt_len == 5:
            buffers = buffer_addresses(cache)
        for t in range(prompt_len, 32):
            T = cache.length
            assert cache_bytes.held(cache) == formula_nbytes(cfg, B, T) + shift
            assert cache_bytes.full(cache) == cfg.n_layer * B * T * 2 * cfg.n_embd * 4
            local_bytes = cfg.n_layer * B * cfg.n_head * min(T, cfg.window) * 2 * cfg.head_dim * 4
            if not cfg.is_full:   # the full regime keeps every token in its local tier
                assert cache_bytes.tiers(cache) == (local_bytes, formula_nbytes(cfg, B, T) - local_bytes)
            # allocated once for block_size tokens; nothing else is held, nothing is reallocated
            assert cache_bytes.allocated(cache) == formula_nbytes(cfg, B, cfg.block_size) + shift
            assert storage_nbytes(cache) == cache_bytes.allocated(cache)
            assert buffer_addresses(cache) == buffers
            model(idx[:, t:t + 1], cache=cache)


def random_case(rng):
    """A random configuration (regime, far mode, window 0, 1, >= block_size, kv_shift, bias,
    rope, grouped-query heads, RMSNorm, SwiGLU, an untied head, batch 1-3) and a random
    schedule: a prompt cut into chunks, then one-token steps."""
    n_head, head_dim = rng.choice([1, 2, 3, 4]), rng.choice([2, 4, 6])
    block_size = rng.randint(4, 20)
    kw = dict(block_size=block_size, n_layer=rng.randint(1, 2), n_head=n_head, n_embd=n_head * head_dim,
              window=rng.choice([0, 1, 2, rng.randint(0, block_size), block_size, block_size + 3]),
              kv_shift=rng.random() < 0.5, bias=rng.random() < 0.5,
              n_kv_head=rng.choice([k for k in (1, 2, 3, 4) if n_head % k == 0]),   # GQA half the time
              norm=rng.choice(["layernorm", "rmsnorm"]), mlp=rng.choice(["gelu", "swiglu"]),
              tie_embeddings=rng.random() < 0.7)
    if rng.random() < 0.35:
        kw.update(far_mode="latent", far_latent_dim=rng.randint(1, kw["n_embd"]))
        if rng.random() < 0.4:   # rotary positions: far keys rebuilt from latents and turned
            kw.update(rope=True, rope_prefix=rng.choice(["high", "low"]), rope_wpe=rng.random() < 0.3)
    else:
        kw.update(far_k_dim=rng.randint(0, head_dim), far_v_dim=rng.randint(0, head_dim))
        if rng.random() < 0.4:   # rotary positions: whole pairs in the far prefix
            kw.update(rope=True, rope_prefix=rng.choice(["high", "low", "unrotated"]), far_k_dim=kw["far_k_dim"] // 2 * 2,
                      rope_wpe=rng.random() < 0.3)
        if kw["window"] == 0 and kw["far_k_dim"] == kw["far_v_dim"] == 0:
            kw["far_v_dim"] = head_dim
    total = rng.randint(1, block_size)
    prompt, chunks = rng.randint(1, total), []
    while sum(chunks) < prompt:
        chunks.append(rng.randint(1, prompt - sum(chunks)))
    return kw, rng.randint(1, 3), chunks + [1] * (total - prompt)


@pytest.mark.parametrize("seed", range(10))
def test_cache_matches_uncached_on_random_schedules(seed, path):
    """30 random cases a seed: the cached logits of every chunk are the uncached forward's,
    and the bytes held are the formula, never more than those allocated."""
    import random
    rng = random.Random(seed)
    for case in range(30):
        kw, B, schedule = random_case(rng)
        model, _ = make_model(seed=case, shuffled_pairs=case % 2 == 1, **kw)
        cfg = model.config
        idx = torch.randint(0, 13, (B, sum(schedule)), generator=torch.Generator().manual_seed(case))
        want = model(idx, targets=idx)[0]   # causal: position t's logits see tokens <= t only
        cache, t = model.new_cache(B), 0
        shift = cfg.n_layer * B * cfg.n_kv_head * 2 * cfg.head_dim * 4 if cfg.kv_shift else 0
        formula = latent_formula_nbytes if cfg.far_mode == "latent" else formula_nbytes
        for n in schedule:
            got = model(idx[:, t:t + n], cache=cache)[0]
            t += n
            torch.testing.assert_close(got[:, 0], want[:, t - 1], atol=1e-4, rtol=1e-4, msg=lambda m: f"{kw} B={B} "
                                       f"{schedule} at {t}: {m}")
            assert cache_bytes.held(cache) == formula(cfg, B, t) + shift <= cache_bytes.allocated(cache), (kw, B, schedule, t)
        assert cache_bytes.allocated(cache) == formula(cfg, B, cfg.block_size) + shift


@pytest.mark.parametrize("name", ["dar", "uniform", "sliding", "full_window"])
@pytest.mark.parametrize("kv_shift", [False, True])
def test_copied_rows_decode_like_separate_prefills(name, kv_shift, path):
    window, far_k_dim, far_v_dim = REGIMES[name]
    model, _ = make_model(window=window, far_k_dim=far_k_dim, far_v_dim=far_v_dim, kv_shift=kv_shift)
    g = torch.Generator().manual_seed(3)
    prompt, continuations = torch.randint(0, 13, (2, 5), generator=g), torch.randint(0, 13, (6, 9), generator=g)
    prefilled = model.new_cache(2)
    model(prompt, cache=prefilled)
    batch = model.new_cache(6)
    batch.copy_rows(prefilled)   # rows 0-2 continue prompt 0, rows 3-5 prompt 1
    assert batch.length == 5 and cache_bytes.held(batch) == 3 * cache_bytes.held(prefilled)
    got = torch.cat([model(continuations[:, t:t + 1], cache=batch)[0] for t in range(9)], dim=1)
    for row in range(6):
        alone = model.new_cache(1)
        model(prompt[row // 3:row // 3 + 1], cache=alone)
        want = torch.cat([model(continuations[row:row + 1, t:t + 1], cache=alone)[0] for t in range(9)], dim=1)
        torch.testing.assert_close(got[row:row + 1], want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="batch size"):
        model.new_cache(5).copy_rows(prefilled)


def test_cache_ratio_approaches_far_over_full():
    kw = dict(block_size=512, vocab_size=13, n_layer=1, n_head=2, n_embd=32)   # head_dim 16
    dar_model = dar.GPT(dar.GPTConfig(window=8, far_k_dim=4, far_v_dim=2, **kw)).eval()
    full_model = dar.GPT(dar.GPTConfig(window=512, far_k_dim=16, far_v_dim=16, **kw)).eval()
    idx = torch.randint(0, 13, (1, 512))
    ratios = []
    for T in (64, 256, 512):
        caches = [m.new_cache(1) for m in (dar_model, full_model)]
        for m, c in zip((dar_model, full_model), caches):
            m(idx[:, :T], cache=c)
        ratios.append(cache_bytes.held(caches[0]) / cache_bytes.held(caches[1]))
    limit = (4 + 2) / (2 * 16)
    # the window's full-dimension tokens are the whole gap, and it shrinks as window / T
    for T, ratio in zip((64, 256, 512), ratios):
        assert ratio > limit and math.isclose((ratio - limit) * T, 8 * (1 - limit))


def test_cache_rejects_overflow_and_targets():
    model, _ = make_model(block_size=8, window=3, far_k_dim=2, far_v_dim=2)
    cache = model.new_cache(1)
    idx = torch.zeros(1, 8, dtype=torch.long)
    model(idx, cache=cache)
    with pytest.raises(ValueError, match="block_size"):
        model(idx[:, :1], cache=cache)
    with pytest.raises(ValueError):
        model(idx, targets=idx, cache=model.new_cache(1))


# ----------------------------------------------------------------------------------------
# Generation

@pytest.mark.parametrize("name", ["dar", "uniform", "sliding", "full_window"])
@pytest.mark.parametrize("kv_shift", [False, True])
def test_greedy_generate_same_with_and_without_cache(name, kv_shift, path):
    window, far_k_dim, far_v_dim = REGIMES[name]
    model, _ = make_model(window=window, far_k_dim=far_k_dim, far_v_dim=far_v_dim, kv_shift=kv_shift)
    prompt = torch.randint(0, 13, (2, 5), generator=torch.Generator().manual_seed(9))
    cached = model.generate(prompt, 27, top_k=1)
    plain = model.generate(prompt, 27, top_k=1, use_cache=False)
    assert cached.shape == (2, 32)
    assert torch.equal(cached, plain)
    assert torch.equal(cached[:, :5], prompt)


@pytest.mark.parametrize("name", ["dar", "uniform", "full_window"])
def test_several_samples_in_one_batch(name, path):
    window, far_k_dim, far_v_dim = REGIMES[name]
    model, _ = make_model(block_size=16, window=window, far_k_dim=far_k_dim, far_v_dim=far_v_dim, kv_shift=True)
    prompt = torch.randint(0, 13, (2, 5), generator=torch.Generator().manual_seed(4))
    out = {}
    for use_cache in (True, False):   # sampled, within block_size: as the uncached path
        torch.manual_seed(0)
        out[use_cache] = model.generate(prompt, 11, temperature=1.0, use_cache=use_cache, num_samples=3)
    assert out[True].shape == (6, 16) and torch.equal(out[True], out[False])
    assert torch.equal(out[True][:, :5], prompt.repeat_interleave(3, 0))
    assert len({tuple(row) for row in out[True][:3, 5:].tolist()}) == 3, "samples of one prompt differ"
    # greedy past block_size (the batch is prefilled again): every copy as one sample alone
    batched = model.generate(prompt, 30, top_k=1, num_samples=3)
    assert torch.equal(batched, model.generate(prompt, 30, top_k=1).repeat_interleave(3, 0))


def test_generate_past_block_size_with_bounded_work():
    model, _ = make_model(block_size=16, window=3, far_k_dim=2, far_v_dim=2)
    processed = []   # tokens run through the model, counted at the embedding
    model.transformer.wte.register_forward_hook(lambda m, inp, out: processed.append(inp[0].numel()))
    prompt = torch.randint(0, 13, (1, 20))   # already longer than block_size
    work = {}
    for use_cache in (True, False):
        processed.clear()
        assert model.generate(prompt, 50, top_k=1, use_cache=use_cache).shape == (1, 70)
        work[use_cache] = sum(processed)
    assert work[False] == 50 * 16   # nanoGPT: the last block_size tokens every step
    # cached: one prefill of 16, then one token a step and a re-prefill of 8 every 8 steps
    assert work[True] <= 16 + 50 + (50 // 8 + 1) * 8


def test_sampling_is_seeded_and_checks_temperature():
    model, _ = make_model(window=3, far_k_dim=2, far_v_dim=2)
    prompt = torch.zeros(1, 1, dtype=torch.long)
    torch.manual_seed(0)
    a = model.generate(prompt, 10, temperature=0.8, top_k=5)
    torch.manual_seed(0)
    b = model.generate(prompt, 10, temperature=0.8, top_k=5)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt, 1, temperature=0)


# ----------------------------------------------------------------------------------------
# Conversion

@pytest.mark.parametrize("kv_shift", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_convert_is_exact_at_full_dims(kv_shift, bias):
    model, _ = make_model(window=32, far_k_dim=8, far_v_dim=8, kv_shift=kv_shift, bias=bias)
    converted = convert.convert(model, window=3, far_k_dim=8, far_v_dim=8)
    assert converted.config.window == 3
    c_attn = "transformer.h.0.attn.c_attn.weight"
    assert (converted.state_dict()[c_attn] - model.state_dict()[c_attn]).abs().max() > 1e-2   # rotated
    idx = torch.randint(0, 13, (2, 32), generator=torch.Generator().manual_seed(10))
    torch.testing.assert_close(converted(idx, targets=idx)[0], model(idx, targets=idx)[0], atol=1e-4, rtol=1e-4)


def test_convert_error_decreases_with_far_dims_and_beats_plain_truncation():
    model, sd = make_model(window=32, far_k_dim=8, far_v_dim=8, bias=False)
    idx = torch.randint(0, 13, (4, 32), generator=torch.Generator().manual_seed(11))
    want = model(idx, targets=idx)[0]
    error = lambda m: (m(idx, targets=idx)[0] - want).pow(2).mean().item()
    errors = [error(convert.convert(model, 2, r, r)) for r in (1, 2, 4, 6, 8)]
    assert all(a > b for a, b in zip(errors, errors[1:])) and errors[-1] < 1e-8
    truncated = dar.GPT(dar.GPTConfig(**{**vars(model.config), "window": 2, "far_k_dim": 2, "far_v_dim": 2}))
    truncated.load_state_dict(sd)   # same weights, no rotation
    assert errors[1] < error(truncated.eval())


@pytest.mark.parametrize("kv_shift", [False, True])
def test_data_aware_convert_is_exact_at_full_dims(kv_shift):
    model, _ = make_model(window=32, far_k_dim=8, far_v_dim=8, kv_shift=kv_shift)
    calibration = torch.randint(0, 13, (4, 32), generator=torch.Generator().manual_seed(12))
    converted = convert.convert(model, window=3, far_k_dim=8, far_v_dim=8, calibration=calibration)
    idx = torch.randint(0, 13, (2, 32), generator=torch.Generator().manual_seed(13))
    torch.testing.assert_close(converted(idx, targets=idx)[0], model(idx, targets=idx)[0], atol=1e-4, rtol=1e-4)


def leading_key_energy(model, idx, r):
    """Fraction of the keys' squared norm in their first r coordinates, over idx."""
    C, H = model.config.n_embd, model.config.n_head
    keys = []
    hook = model.transformer.h[0].attn.c_attn.register_forward_hook(
        lambda m, i, out: keys.append(out.split(C, dim=2)[1].reshape(-1, H, C // H)))
    model(idx)
    hook.remove()
    return (keys[0][..., :r].pow(2).sum() / keys[0].pow(2).sum()).item()


def test_data_aware_convert_keeps_more_key_energy_than_svd():
    """PCA on the calibration keys is the best rotation for their energy (Ky Fan), so it
    holds at least as much in the leading coordinates as the weight SVD, and more than none."""
    model, _ = make_model(window=32, far_k_dim=8, far_v_dim=8)
    calibration = torch.randint(0, 13, (8, 32), generator=torch.Generator().manual_seed(14))
    svd, pca = convert.convert(model, 2, 2, 2), convert.convert(model, 2, 2, 2, calibration=calibration)
    energy = {name: leading_key_energy(m, calibration, 2) for name, m in
              [("none", model), ("svd", svd), ("pca", pca)]}
    assert energy["pca"] >= energy["svd"] - 1e-9 and energy["pca"] > energy["none"]


def test_convert_leaves_the_source_model_as_it_was():
    model, _ = make_model(window=32, far_k_dim=8, far_v_dim=8)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    convert.convert(model, 2, 2, 2, calibration=torch.zeros(1, 8, dtype=torch.long))
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_convert_needs_a_full_model():
    model, _ = make_model(window=3, far_k_dim=2, far_v_dim=2)
    with pytest.raises(ValueError, match="full"):
        convert.convert(model, 3, 2, 2)


# ----------------------------------------------------------------------------------------
# Configuration

@pytest.mark.parametrize("kw, field", [
    (dict(n_embd=30, n_head=4), "n_embd"),
    (dict(far_k_dim=33), "far_k_dim"),
    (dict(far_k_dim=-1), "far_k_dim"),
    (dict(far_v_dim=33), "far_v_dim"),
    (dict(far_v_dim=-2), "far_v_dim"),
    (dict(window=-1), "window"),
    (dict(window=0, far_k_dim=0, far_v_dim=0), "window"),
    (dict(n_head=0), "n_head"),
    (dict(n_layer=0), "n_layer"),
    (dict(block_size=0), "block_size"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(dropout=1.0), "dropout"),
])
def test_invalid_config_raises(kw, field):
    with pytest.raises(ValueError, match=field):
        dar.GPTConfig(**kw)


def test_default_config_is_dar():
    cfg = dar.GPTConfig()
    assert (cfg.window, cfg.far_k_dim, cfg.far_v_dim) == (64, cfg.head_dim // 4, cfg.head_dim // 4)
    assert not cfg.is_full


# ----------------------------------------------------------------------------------------
# The latent far tier (far_mode="latent")

def make_latent_model(window, r=6, bias=True, seed=0, **kw):
    return make_model(seed=seed, window=window, far_mode="latent", far_latent_dim=r, bias=bias, **kw)


@pytest.mark.parametrize("window", [0, 1, 3, 10, 11, 32])   # T = 11: W < T, W = T - 1, W >= T
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kv_shift", [False, True])
@pytest.mark.parametrize("rope", [False, True])
def test_latent_model_matches_naive_gpt(window, bias, kv_shift, rope):
    model, sd = make_latent_model(window, bias=bias, kv_shift=kv_shift, rope=rope, shuffled_pairs=rope)
    assert set(model.state_dict()) == set(sd)
    idx = torch.randint(0, 13, (2, 11), generator=torch.Generator().manual_seed(4))
    want = naive_gpt(sd, model.config, idx)
    torch.testing.assert_close(model(idx, targets=idx)[0], want, atol=1e-4, rtol=1e-4)


def test_latent_bottleneck_changes_distant_tokens_only():
    """The oracle comparison means something only if the bottleneck matters: beyond the
    window it does, and a window covering the context is plain attention."""
    idx = torch.randint(0, 13, (2, 11), generator=torch.Generator().manual_seed(4))
    logits = {w: make_latent_model(w)[0](idx, targets=idx)[0] for w in (3, 11)}
    slice_full, _ = make_model(window=3, far_k_dim=8, far_v_dim=8)
    want = slice_full(idx, targets=idx)[0]   # the same weights at full attention
    torch.testing.assert_close(logits[11], want, atol=1e-5, rtol=1e-5)
    assert (logits[3][:, 3:] - want[:, 3:]).abs().max() > 1e-2
    torch.testing.assert_close(logits[3][:, :3], want[:, :3], atol=1e-5, rtol=1e-5)


def test_latent_trains_its_bottleneck():
    model, _ = make_latent_model(3)
    model.train()
    idx = torch.randint(0, 13, (2, 16))
    model(idx, targets=idx)[1].backward()
    attn = model.transformer.h[0].attn
    assert attn.far_down.weight.grad.abs().max() > 0 and attn.far_up.weight.grad.abs().max() > 0


def test_latent_starts_as_an_orthogonal_projection():
    cfg = dar.GPTConfig(n_embd=32, n_head=2, far_mode="latent", far_latent_dim=8)
    attn = dar.GPT(cfg).transformer.h[0].attn
    projection = attn.far_up.weight @ attn.far_down.weight
    torch.testing.assert_close(projection @ projection, projection, atol=1e-5, rtol=1e-5)
    assert torch.linalg.matrix_rank(projection) == 8


@pytest.mark.parametrize("window", [0, 1, 3, 32])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kv_shift", [False, True])
@pytest.mark.parametrize("prompt_len", [2, 3, 7])
@pytest.mark.parametrize("rope", [False, True])
def test_latent_cache_matches_uncached(window, bias, kv_shift, prompt_len, rope):
    """Both decode paths: absorbed far keys, and (rope) far keys rebuilt and turned."""
    model, _ = make_latent_model(window, bias=bias, kv_shift=kv_shift, rope=rope, shuffled_pairs=rope)
    assert_cache_matches_uncached(model, prompt_len)


def latent_formula_nbytes(cfg, B, T, element_size=4):
    """The ring's full keys and values, and one latent per token seen (README.md: a latent
    is kept from the token's arrival), nothing else."""
    latents = T * cfg.far_latent_dim if cfg.window < cfg.block_size else 0
    return cfg.n_layer * B * (cfg.n_kv_head * min(T, cfg.window) * 2 * cfg.head_dim + latents) * element_size


@pytest.mark.parametrize("window", [0, 3, 32])
def test_latent_cache_nbytes_is_its_formula_and_holds_no_far_key(window):
    model, _ = make_latent_model(window)
    cfg, B = model.config, 2
    idx = torch.randint(0, 13, (B, 32))
    cache = model.new_cache(B)
    model(idx[:, :5], cache=cache)
    for t in range(5, 32):
        T = cache.length
        assert cache_bytes.held(cache) == latent_formula_nbytes(cfg, B, T)
        assert cache_bytes.allocated(cache) == storage_nbytes(cache) == latent_formula_nbytes(cfg, B, cfg.block_size)
        model(idx[:, t:t + 1], cache=cache)
    for layer in cache.layers:   # full-dimension keys and values only in the ring
        for name, tensor in vars(layer).items():
            if torch.is_tensor(tensor) and tensor.size(-1) == cfg.head_dim:
                assert name in ("ring_k", "ring_v") and tensor.size(2) == min(window, cfg.block_size)
        assert window >= cfg.block_size or layer.latents.shape == (B, cfg.block_size, cfg.far_latent_dim)


@pytest.mark.parametrize("kv_shift", [False, True])
def test_latent_generates_with_copied_rows_like_the_uncached_path(kv_shift, path):
    model, _ = make_latent_model(3, block_size=16, kv_shift=kv_shift)
    prompt = torch.randint(0, 13, (2, 5), generator=torch.Generator().manual_seed(4))
    out = {}
    for use_cache in (True, False):
        torch.manual_seed(0)
        out[use_cache] = model.generate(prompt, 11, temperature=1.0, use_cache=use_cache, num_samples=3)
    assert torch.equal(out[True], out[False])
    # greedy past block_size (the cache is prefilled again, the maps taken again)
    assert torch.equal(model.generate(prompt, 30, top_k=1, num_samples=3),
                       model.generate(prompt, 30, top_k=1).repeat_interleave(3, 0))


@pytest.mark.parametrize("calibrated", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_latent_convert_is_exact_at_full_width(calibrated, bias):
    model, _ = make_model(window=32, far_k_dim=8, far_v_dim=8, bias=bias)
    calibration = torch.randint(0, 13, (4, 32), generator=torch.Generator().manual_seed(12)) if calibrated else None
    converted = convert.convert(model, 3, calibration=calibration, far_mode="latent", far_latent_dim=16)
    assert converted.config.far_mode == "latent" and converted.config.window == 3
    idx = torch.randint(0, 13, (2, 32), generator=torch.Generator().manual_seed(13))
    torch.testing.assert_close(converted(idx, targets=idx)[0], model(idx, targets=idx)[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("calibrated", [False, True])
def test_latent_convert_error_falls_as_the_bottleneck_widens(calibrated):
    model, _ = make_model(window=32, far_k_dim=8, far_v_dim=8, bias=False)
    idx = torch.randint(0, 13, (4, 32), generator=torch.Generator().manual_seed(11))
    want = model(idx, targets=idx)[0]
    calibration = idx if calibrated else None
    errors = [(convert.convert(model, 2, calibration=calibration, far_mode="latent", far_latent_dim=r)(idx, targets=idx)[0]
               - want).pow(2).mean().item() for r in (2, 4, 8, 12, 16)]
    assert all(a > b for a, b in zip(errors, errors[1:])) and errors[-1] < 1e-8


@pytest.mark.parametrize("kw, field", [
    (dict(far_mode="bottleneck"), "far_mode"),
    (dict(far_latent_dim=8), "far_latent_dim"),   # slice mode
    (dict(far_mode="latent", far_k_dim=4), "far_k_dim"),
    (dict(far_mode="latent", far_v_dim=4), "far_v_dim"),
    (dict(far_mode="latent", far_latent_dim=0), "far_latent_dim"),
    (dict(far_mode="latent", far_latent_dim=129), "far_latent_dim"),
])
def test_invalid_far_mode_settings_raise(kw, field):
    with pytest.raises(ValueError, match=field):
        dar.GPTConfig(**kw)


def test_latent_defaults_to_a_quarter_of_n_embd():
    cfg = dar.GPTConfig(far_mode="latent")
    assert cfg.far_latent_dim == cfg.n_embd // 4 and cfg.far_k_dim is None and not cfg.is_full
    assert dar.GPTConfig(far_mode="latent", window=cfg.block_size).is_full


# ----------------------------------------------------------------------------------------
# Rotary positions

@pytest.mark.parametrize("prefix", ["high", "low", "unrotated"])
@pytest.mark.parametrize("name", ["dar", "far_k0", "thin_keys", "uniform", "sliding", "full_window"])
@pytest.mark.parametrize("kv_shift", [False, True])
def test_rope_model_matches_naive_rotated_gpt(prefix, name, kv_shift):
    window, far_k_dim, far_v_dim = REGIMES[name]
    model, sd = make_model(window=window, far_k_dim=far_k_dim, far_v_dim=far_v_dim, kv_shift=kv_shift,
                           rope=True, rope_prefix=prefix, rope_base=100.0)
    assert "transformer.wpe.weight" not in model.state_dict()   # positions come from the rotation
    idx = torch.randint(0, 13, (2, 11), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(model(idx, targets=idx)[0], naive_gpt(sd, model.config, idx), atol=1e-4, rtol=1e-4)
    assert_cache_matches_uncached(model, 7)


@pytest.mark.parametrize("kv_shift", [False, True])
def test_rope_with_learned_positions_kept_matches_naive_gpt(kv_shift):
    """rope_wpe: the rotation and wpe's absolute positions both; the oracle adds wpe."""
    model, sd = make_model(window=3, far_k_dim=4, far_v_dim=6, kv_shift=kv_shift, rope=True, rope_wpe=True,
                           rope_prefix="unrotated", rope_base=100.0)
    assert "transformer.wpe.weight" in model.state_dict()
    idx = torch.randint(0, 13, (2, 11), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(model(idx, targets=idx)[0], naive_gpt(sd, model.config, idx), atol=1e-4, rtol=1e-4)
    assert_cache_matches_uncached(model, 7)
    without, _ = make_model(window=3, far_k_dim=4, far_v_dim=6, kv_shift=kv_shift, rope=True,
                            rope_prefix="unrotated", rope_base=100.0)
    assert (without(idx, targets=idx)[0] - model(idx, targets=idx)[0]).abs().max() > 1e-2   # wpe counts


def test_rope_prefix_choices_compute_different_things():
    """The oracle comparisons mean something only if the prefix choices (and the base of
    the frequencies) change what the model computes."""
    idx = torch.randint(0, 13, (2, 11), generator=torch.Generator().manual_seed(4))
    logits = {(p, base): make_model(window=3, far_k_dim=4, far_v_dim=4, rope=True, rope_prefix=p, rope_base=base)[0](
              idx, targets=idx)[0] for p in ("high", "low", "unrotated") for base in (100.0, 10000.0)}
    for a, b in [(("high", 100.0), ("low", 100.0)), (("low", 100.0), ("unrotated", 100.0)), (("high", 100.0), ("high", 10000.0))]:
        assert (logits[a] - logits[b]).abs().max() > 1e-2, (a, b)


@pytest.mark.parametrize("kw, field", [
    (dict(rope=True, far_k_dim=3), "far_k_dim"),
    (dict(rope=True, n_embd=18, n_head=2, far_k_dim=2), "head_dim"),
    (dict(rope=True, rope_prefix="middle"), "rope_prefix"),
    (dict(rope_wpe=True), "rope_wpe"),
])
def test_invalid_rope_settings_raise(kw, field):
    with pytest.raises(ValueError, match=field):
        dar.GPTConfig(**kw)


def naive_pair_scores(model, idx):
    """MHA2MLA's score written out, per layer (Hkv, d / 2): for each key/value head and
    rotary pair i, the sum over the query heads reading it of mean_t |q_t pair i| times
    mean_t |k_t pair i|, from c_attn's outputs on idx."""
    cfg = model.config
    d, group = cfg.head_dim, cfg.n_head // cfg.n_kv_head
    outputs = []
    hooks = [b.attn.c_attn.register_forward_hook(lambda m, i, out: outputs.append(out)) for b in model.transformer.h]
    model(idx)
    for hook in hooks:
        hook.remove()
    scores = []
    for out in outputs:
        q, k, _ = out.double().flatten(0, 1).split([cfg.n_embd, cfg.n_kv_head * d, cfg.n_kv_head * d], -1)
        norm = lambda x, head, i: x[:, head * d + 2 * i:head * d + 2 * i + 2].norm(dim=-1).mean().item()
        scores.append(torch.tensor([[sum(norm(q, h, i) for h in range(kv * group, (kv + 1) * group)) * norm(k, kv, i)
                                     for i in range(d // 2)] for kv in range(cfg.n_kv_head)]))
    return scores


ROPE_CONVERT = [(n_kv_head, kv_shift, bias) for n_kv_head in (4, 2) for kv_shift in (False, True) for bias in (False, True)]


@pytest.mark.parametrize("pairs", ["score", "high", "low"])
@pytest.mark.parametrize("n_kv_head, kv_shift, bias", ROPE_CONVERT)
def test_rope_convert_by_whole_pairs_is_exact_at_full_dims(pairs, n_kv_head, kv_shift, bias):
    """Ours (n_kv_head = n_head) and grouped-query: queries and keys permuted by whole pairs
    with their frequencies, values rotated; logits unchanged; the order survives a save."""
    model, _ = make_model(n_head=4, n_embd=64, n_kv_head=n_kv_head, window=32, kv_shift=kv_shift, bias=bias,
                          rope=True, rope_base=100.0, shuffled_pairs=True)   # 8 pairs a head
    calibration = torch.randint(0, 13, (4, 32), generator=torch.Generator().manual_seed(12))
    converted = convert.convert(model, window=3, far_k_dim=16, far_v_dim=16, calibration=calibration, pairs=pairs)
    before = model.transformer.h[0].attn.rope_pairs
    after = converted.transformer.h[0].attn.rope_pairs
    assert not torch.equal(before, after) and torch.equal(after.sort(-1)[0], before.sort(-1)[0])
    idx = torch.randint(0, 13, (2, 32), generator=torch.Generator().manual_seed(13))
    want = model(idx, targets=idx)[0]
    torch.testing.assert_close(converted(idx, targets=idx)[0], want, atol=1e-4, rtol=1e-4)
    buffer = io.BytesIO()
    torch.save(converted.state_dict(), buffer)
    loaded = dar.GPT(converted.config).eval()
    loaded.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert torch.equal(loaded.transformer.h[1].attn.rope_pairs, converted.transformer.h[1].attn.rope_pairs)
    torch.testing.assert_close(loaded(idx, targets=idx)[0], want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_rope_convert_puts_first_the_pairs_its_order_ranks_first(n_kv_head):
    """A far key's first far_k_dim / 2 pairs: the best by the score written out here, or the
    highest / lowest frequencies; the converted model is the oracle's with that order, and
    its cache matches its uncached forward."""
    model, _ = make_model(n_head=4, n_embd=32, n_kv_head=n_kv_head, window=32, rope=True, rope_base=100.0,
                          shuffled_pairs=True)
    calibration = torch.randint(0, 13, (4, 32), generator=torch.Generator().manual_seed(12))
    table = torch.tensor(rope_frequencies(model.config))
    wanted = {"score": naive_pair_scores(model, calibration)}
    for l, block in enumerate(model.transformer.h):
        wanted.setdefault("high", []).append(table[block.attn.rope_pairs])
        wanted.setdefault("low", []).append(-table[block.attn.rope_pairs])
    for pairs, values in wanted.items():
        converted = convert.convert(model, window=3, far_k_dim=4, far_v_dim=2, calibration=calibration, pairs=pairs)
        for block, original, value in zip(converted.transformer.h, model.transformer.h, values):
            best = value.argsort(dim=-1, descending=True)[:, :2]   # 2 pairs: far_k_dim 4
            kept = block.attn.rope_pairs[:, :2]
            assert torch.equal(kept.sort(-1)[0], original.attn.rope_pairs.gather(1, best).sort(-1)[0]), pairs
        idx = torch.randint(0, 13, (2, 11), generator=torch.Generator().manual_seed(4))
        torch.testing.assert_close(converted(idx, targets=idx)[0], naive_gpt(converted.state_dict(), converted.config, idx),
                                   atol=1e-4, rtol=1e-4)
        assert_cache_matches_uncached(converted, 5)


@pytest.mark.parametrize("rope, kw, message", [
    (True, dict(pairs="score"), "calibration"),
    (True, dict(pairs="middle", calibration=torch.zeros(1, 4, dtype=torch.long)), "pairs"),
    (False, dict(pairs="low"), "rope"),
])
def test_convert_refuses_a_pair_order_it_cannot_follow(rope, kw, message):
    model, _ = make_model(window=32, rope=rope)
    with pytest.raises(ValueError, match=message):
        convert.convert(model, 3, 2, 2, **kw)

# ----------------------------------------------------------------------------------------
# What the GPU path and the sampling knobs do, checked on CPU

LOW_PRECISION_TIERS = {"slice": dict(window=3, far_k_dim=2, far_v_dim=4, kv_shift=True),
                       "latent": dict(window=3, far_mode="latent", far_latent_dim=6, kv_shift=True),
                       "rope": dict(window=3, far_k_dim=2, far_v_dim=4, rope=True, rope_base=100.0)}


def cached_logits(model, idx, prompt_len):
    """A prompt of prompt_len tokens, then one token at a time: the logits of each step."""
    cache = model.new_cache(idx.size(0))
    got = [model(idx[:, :prompt_len], cache=cache)[0]]
    got += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(prompt_len, idx.size(1))]
    return torch.cat(got, dim=1), cache


@pytest.mark.parametrize("name", list(LOW_PRECISION_TIERS))
def test_a_bfloat16_model_trains_and_caches_in_bfloat16(name, path):
    """train.py and sample.py run bf16 on a GPU: the model in bfloat16 takes AdamW steps,
    its cache is allocated in bfloat16 (2 bytes an element) and matches its uncached
    forward, and both stay near the float32 model's logits."""
    model, _ = make_model(**LOW_PRECISION_TIERS[name])
    idx = torch.randint(0, 13, (2, 12), generator=torch.Generator().manual_seed(3))
    want32 = model(idx, targets=idx)[0]
    half = make_model(**LOW_PRECISION_TIERS[name])[0].to(torch.bfloat16)
    uncached = half(idx, targets=idx)[0]
    assert uncached.dtype == torch.bfloat16
    torch.testing.assert_close(uncached.float(), want32, atol=0.15, rtol=0.05)
    got, cache = cached_logits(half, idx, 5)
    torch.testing.assert_close(got.float(), uncached[:, 4:].float(), atol=0.1, rtol=0.05)
    assert all(t.dtype == torch.bfloat16 for layer in cache.layers for t in vars(layer).values() if torch.is_tensor(t))
    float_cache = cached_logits(model, idx, 5)[1]
    assert cache_bytes.held(cache) * 2 == cache_bytes.held(float_cache) and cache_bytes.full(cache) * 2 == cache_bytes.full(float_cache)
    half.train()
    optimizer = torch.optim.AdamW(half.parameters(), lr=3e-2)
    losses = []
    for _ in range(4):
        loss = half(idx, targets=idx)[1]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


@pytest.mark.parametrize("name", list(LOW_PRECISION_TIERS))
def test_bfloat16_autocast_over_a_float32_model_caches_what_it_computes(name, path):
    """train.py's CUDA default: float32 weights under bf16 autocast. The cache takes the
    dtype of the keys autocast makes, and cached = uncached under the same autocast."""
    model, _ = make_model(**LOW_PRECISION_TIERS[name])
    idx = torch.randint(0, 13, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        uncached = model(idx, targets=idx)[0]
        got, cache = cached_logits(model, idx, 5)
        out = model.generate(idx[:, :4], 6, top_k=1)
    assert cache.layers[0].ring_k.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), uncached[:, 4:].float(), atol=0.1, rtol=0.05)
    assert out.shape == (2, 10)


@pytest.mark.parametrize("name", list(LOW_PRECISION_TIERS))
def test_eval_mode_turns_every_dropout_off(name):
    """estimate_loss runs in eval(): with dropout 0.5 the logits are those of the same
    weights with dropout 0, call after call; in train() they are not."""
    noisy, sd = make_model(**LOW_PRECISION_TIERS[name], dropout=0.5)
    quiet = dar.GPT(dar.GPTConfig(**{**vars(noisy.config), "dropout": 0.0})).eval()
    quiet.load_state_dict(noisy.state_dict())
    idx = torch.randint(0, 13, (2, 12), generator=torch.Generator().manual_seed(3))
    want = quiet(idx, targets=idx)[0]
    for _ in range(2):
        assert torch.equal(noisy(idx, targets=idx)[0], want)
    assert torch.equal(cached_logits(noisy, idx, 5)[0], cached_logits(quiet, idx, 5)[0])
    noisy.train()
    assert not torch.allclose(noisy(idx, targets=idx)[0], want)


@pytest.mark.parametrize("temperature, top_k", [(0.5, None), (2.0, None), (1.5, 3), (0.7, 100), (1.0, 1)])
@pytest.mark.parametrize("use_cache", [True, False])
def test_sampling_draws_from_softmax_of_logits_over_temperature(temperature, top_k, use_cache):
    """20,000 first tokens against softmax(logits / temperature) over the top_k likeliest,
    computed here (top_k above the vocabulary: all of it; 1: the argmax only)."""
    model, _ = make_model(window=3, far_k_dim=2, far_v_dim=2)
    prompt = torch.randint(0, 13, (1, 6), generator=torch.Generator().manual_seed(5))
    logits = model(prompt)[0][0, -1].double()
    kept = logits >= logits.topk(min(top_k or 13, 13)).values[-1]
    want = torch.softmax(torch.where(kept, logits / temperature, -math.inf), dim=-1)
    n = 20000
    torch.manual_seed(0)
    drawn = model.generate(prompt, 1, temperature=temperature, top_k=top_k, use_cache=use_cache, num_samples=n)
    got = torch.bincount(drawn[:, -1], minlength=13).double() / n
    assert (got[~kept] == 0).all()
    assert (got - want).abs().max() < 4 * math.sqrt(0.25 / n), (got, want)
    assert (want - torch.softmax(logits, -1)).abs().max() > 0.02   # the knobs change the distribution


@pytest.mark.parametrize("use_cache", [True, False])
def test_a_prompt_longer_than_block_size_keeps_its_last_tokens(use_cache):
    """Greedy continuation of a 40-token prompt with block_size 16 is that of its last 16
    tokens, in each path, and the first token is the same in both (not that of its first)."""
    model, _ = make_model(block_size=16, window=3, far_k_dim=2, far_v_dim=2, kv_shift=True)
    prompt = torch.randint(0, 13, (8, 40), generator=torch.Generator().manual_seed(6))
    out = model.generate(prompt, 12, top_k=1, use_cache=use_cache)
    last = model.generate(prompt[:, -16:], 12, top_k=1, use_cache=use_cache)
    assert torch.equal(out[:, 40:], last[:, 16:]) and torch.equal(out[:, :40], prompt)
    first = model.generate(prompt[:, :16], 1, top_k=1, use_cache=use_cache)
    assert not torch.equal(first[:, 16], last[:, 16])   # (which end is kept shows at once)
    other = model.generate(prompt, 1, top_k=1, use_cache=not use_cache)
    assert torch.equal(out[:, 40], other[:, 40])


@pytest.mark.parametrize("name", ["slice", "latent"])
def test_a_cache_refilled_after_the_weights_change_equals_a_fresh_one(name, path):
    """One cache, filled, then the weights change (a training step between two samples),
    reset and filled again: what it serves is a new cache's (nothing derived is stale)."""
    model, _ = make_model(**LOW_PRECISION_TIERS[name])
    idx = torch.randint(0, 13, (2, 12), generator=torch.Generator().manual_seed(3))
    cache = model.new_cache(2)
    model(idx[:, :5], cache=cache)
    for t in range(5, 12):
        model(idx[:, t:t + 1], cache=cache)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    cache.reset()
    got = [model(idx[:, :5], cache=cache)[0]] + [model(idx[:, t:t + 1], cache=cache)[0] for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(got, 1), cached_logits(model, idx, 5)[0], atol=1e-5, rtol=1e-5)
    torch.manual_seed(0)
    reused = model.generate(idx[:, :4], 6)   # a new cache
    torch.manual_seed(0)
    stream = torch.cat([idx[:, :4], *model.generate_stream(idx[:, :4], 6, cache=cache)], dim=1)
    assert torch.equal(stream, reused)


def test_pca_conversion_with_biases_is_the_pca_written_here():
    """Keys and values with their biases, on the calibration tokens: after conversion their
    second moment per key/value head is diagonal, the eigenvalues of the original's moment
    (E[k k^T], bias included) in decreasing order; that holds for no other rotation."""
    model, _ = make_model(**{**FAMILY, "bias": True, "norm": "layernorm"}, window=32, far_k_dim=8, far_v_dim=8)
    calibration = torch.randint(0, 13, (4, 32), generator=torch.Generator().manual_seed(12))
    converted = convert.convert(model, 3, 8, 8, calibration=calibration)   # full dims: the same inputs
    def moments(m):   # per layer: (keys, values) second moments (Hkv, d, d) from c_attn's outputs
        outs = []
        hooks = [b.attn.c_attn.register_forward_hook(lambda mod, i, out: outs.append(out.double())) for b in m.transformer.h]
        m(calibration)
        for h in hooks:
            h.remove()
        C, kv, d = m.config.n_embd, m.config.n_kv_head * m.config.head_dim, m.config.head_dim
        result = []
        for out in outs:
            _, k, v = out.flatten(0, 1).split([C, kv, kv], -1)
            result.append([torch.einsum("nhi,nhj->hij", x.view(-1, kv // d, d), x.view(-1, kv // d, d)) / x.size(0)
                           for x in (k, v)])
        return result
    for before, after in zip(moments(model), moments(converted)):
        for M, M_new in zip(before, after):
            eigenvalues = torch.linalg.eigvalsh(M).flip(-1)   # decreasing
            torch.testing.assert_close(M_new, torch.diag_embed(eigenvalues), atol=1e-6 * M.abs().max().item(), rtol=0)


@pytest.mark.parametrize("name", ["slice", "latent", "rope", "full"])
def test_a_compiled_training_step_computes_the_eager_one(name):
    """torch.compile's graph capture and AOTAutograd's backward (the aot_eager backend: no
    C++ build; train.py --compile's inductor build runs in test_e2e) give eager's loss and
    gradients for DAR slice, latent, rope and full attention."""
    tiers = LOW_PRECISION_TIERS.get(name, dict(window=32))
    model, _ = make_model(**tiers, dropout=0.0)
    model.train()
    idx = torch.randint(0, 13, (2, 32), generator=torch.Generator().manual_seed(3))
    def step(m):
        model.zero_grad()
        loss = m(idx, targets=idx)[1]
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]
    want_loss, want_grads = step(model)
    got_loss, got_grads = step(torch.compile(model, backend="aot_eager", fullgraph=False))
    torch.testing.assert_close(got_loss, want_loss, atol=1e-5, rtol=1e-5)
    for got, want in zip(got_grads, want_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_rope_model_cast_to_bfloat16_turns_far_positions_as_float32_does():
    """model.to(bfloat16) must not round rope's frequencies: at position 3000 a bf16
    frequency is off by radians. The turned vectors match float32's within bf16 rounding."""
    cfg = dar.GPTConfig(block_size=4096, vocab_size=13, n_layer=1, n_head=2, n_embd=64, window=4096, rope=True)
    attn32 = dar.GPT(cfg).transformer.h[0].attn
    attn16 = dar.GPT(cfg).to(torch.bfloat16).transformer.h[0].attn
    x = torch.randn(1, 2, 4, 32, generator=torch.Generator().manual_seed(0))
    want = attn32.turn(x, x, 3000)[1]
    got = attn16.turn(x.bfloat16(), x.bfloat16(), 3000)[1].float()
    torch.testing.assert_close(got, want, atol=0.05, rtol=0.02)


# ----------------------------------------------------------------------------------------
# Behaviours a loaded state dict hides: a fresh model's init, conversion's axes and dtype

def test_a_fresh_gpt_scales_its_residual_projections_as_gpt2():
    """nanoGPT's init: every c_proj weight (attention and MLP) ~ N(0, 0.02 / sqrt(2 n_layer)),
    every other linear weight ~ N(0, 0.02); 655,360 c_proj weights, so the measured std is
    within 0.2% of the true one (sqrt(1 / (2 n)) relative error), and sqrt(2) apart from
    the 0.02 / sqrt(n_layer) of a forgotten factor 2."""
    torch.manual_seed(0)
    cfg = dar.GPTConfig(n_layer=8, n_embd=128, n_head=4, vocab_size=13, block_size=32)
    model = dar.GPT(cfg)
    c_proj = [p.flatten() for n, p in model.named_parameters() if n.endswith("c_proj.weight")]
    c_proj = torch.cat(c_proj)
    assert c_proj.numel() == 8 * (128 * 128 + 512 * 128)
    want = 0.02 / math.sqrt(2 * cfg.n_layer)
    assert abs(c_proj.std().item() / want - 1) < 0.01
    c_fc = torch.cat([b.mlp.c_fc.weight.flatten() for b in model.transformer.h])
    assert abs(c_fc.std().item() / 0.02 - 1) < 0.01


def calibration_inputs(model, idx):
    """Every layer's attention input (ln_1's output) on the tokens idx: (N, C) each."""
    inputs = []
    def record(module, args, out):
        inputs.append(out.flatten(0, 1))
    hooks = [b.ln_1.register_forward_hook(record) for b in model.transformer.h]
    with torch.no_grad():
        model(idx)
    for hook in hooks:
        hook.remove()
    return inputs


def test_latent_conversion_keeps_the_top_axes_of_the_calibration_inputs():
    """With calibration tokens, far_up's r columns span the top r eigenvectors of E[x x^T]
    over the attention inputs x (computed here), and far_down is its transpose: a projection
    onto them. At r = 4 of 16 a wrong block of the moment keeps another subspace."""
    model, _ = make_model(window=32, bias=True)
    idx = torch.randint(0, 13, (4, 32), generator=torch.Generator().manual_seed(9))
    new = convert.convert(model, 3, far_mode="latent", far_latent_dim=4, calibration=idx)
    for x, block in zip(calibration_inputs(model, idx), new.transformer.h):
        x = x.double()
        moment = x.T @ x / x.size(0)
        axes = torch.linalg.eigh(moment)[1][:, -4:]   # the top 4 eigenvectors
        up = block.attn.far_up.weight.double()
        torch.testing.assert_close(up @ up.T, axes @ axes.T, atol=1e-5, rtol=0)
        torch.testing.assert_close(block.attn.far_down.weight.double(), up.T)


@pytest.mark.parametrize("far_mode", ["slice", "latent"])
def test_conversion_keeps_the_source_models_dtype_and_device(far_mode):
    """A bfloat16 model converts to a bfloat16 model on its device, not a float32 copy."""
    model, _ = make_model(window=32)
    model = model.to(torch.bfloat16)
    idx = torch.randint(0, 13, (2, 32), generator=torch.Generator().manual_seed(9))
    new = convert.convert(model, 3, far_mode=far_mode, calibration=idx)
    dtypes = {p.dtype for p in new.parameters()}
    devices = {p.device for p in new.parameters()}
    assert dtypes == {torch.bfloat16} and devices == {next(model.parameters()).device}
    assert new(idx)[0].dtype == torch.bfloat16


def test_latent_keys_values_init_is_the_best_rank_r_map_of_the_keys_and_values():
    """latent_init="keys_values": on the calibration inputs x, the keys and values W x are
    kept with the least squared error a rank-r map can have (the sum of the eigenvalues of
    W S W^T beyond the top r, computed here), no more than the inputs' PCA keeps; at r = C
    the model is the original (W has full column rank here)."""
    model, _ = make_model(window=32, bias=True)
    idx = torch.randint(0, 13, (4, 32), generator=torch.Generator().manual_seed(9))
    inputs = calibration_inputs(model, idx)
    errors = {}
    for init in ("keys_values", "inputs"):
        new = convert.convert(model, 3, far_mode="latent", far_latent_dim=4, calibration=idx,
                              latent_init=init)
        for layer, (x, block) in enumerate(zip(inputs, new.transformer.h)):
            x = x.double()
            W = block.attn.c_attn.weight[16:].double()
            P = block.attn.far_up.weight.double() @ block.attn.far_down.weight.double()
            errors[init, layer] = ((x @ W.T - x @ P.T @ W.T) ** 2).sum(-1).mean().item()
            if init == "keys_values":
                moment = W @ (x.T @ x / x.size(0)) @ W.T
                best = torch.linalg.eigvalsh(moment)[:-4].sum().item()   # all but the top 4
                assert errors[init, layer] == pytest.approx(best, rel=1e-6, abs=1e-9)
    for layer in range(2):
        assert errors["keys_values", layer] <= errors["inputs", layer] + 1e-12
    exact = convert.convert(model, 3, far_mode="latent", far_latent_dim=16, calibration=idx,
                            latent_init="keys_values")
    torch.testing.assert_close(exact(idx, targets=idx)[0], model(idx, targets=idx)[0],
                               atol=1e-4, rtol=1e-4)
