"""
DAR against its baselines, measured side by side. Each sub-command prints a markdown
table and writes its raw numbers as JSON to --out_dir.

    python bench.py speed     training step time per regime; cached vs uncached generation
    python bench.py decode    decode step time against a plain static full cache, batch 1 and 8,
                              contexts up to 4096; KV bytes; batched against sequential samples
    python bench.py quality   val loss of each regime trained identically on Shakespeare, and
                              a trained full model converted (SVD or PCA), zero-shot and fine-tuned
    python bench.py recall    associative recall accuracy by distance, per regime and as the
                              number of key-value pairs grows (data/recall.py)
    python bench.py capacity  recall beyond the window as far keys, far values or both shrink,
                              over numbers of pairs and seeds: how many far dimensions a fact needs
    python bench.py attention where recall models look: does the far tier select the pair?
    python bench.py tiers     a picture of what the two-tier cache holds (README's first picture)

Sizes are flags, so the same commands scale up on a GPU; `--quick` runs quality, recall and
capacity in minutes. With matplotlib installed (an optional extra) decode, quality and
capacity also draw their pictures into --out_dir.
Times are medians of several runs after warm-up, the variants alternated in one process.
"""

import argparse
import functools
import glob
import json
import math
import os
import statistics
import sys
import time

import numpy as np
import torch
from torch.nn import functional as F

import convert
import cache_bytes
import checkpoint
import dar
import prefill
import train
from data import prepare
from data.recall import write_recall


def sliced(window, far_k_dim, far_v_dim):
    return dict(window=window, far_k_dim=far_k_dim, far_v_dim=far_v_dim)


def latent(window, far_latent_dim):
    return dict(window=window, far_mode="latent", far_latent_dim=far_latent_dim)


def regimes(block_size, n_head, head_dim, window, far_dim):
    """name -> GPTConfig fields: the regimes of README.md at one model size, then the latent
    far tier at the slice's far bytes per token (r = n_head * 2 * far_dim) and at the
    paper's n_embd / 4, and with no window (uniform latent: MLA-like)."""
    same_bytes = min(n_head * 2 * far_dim, n_head * head_dim)
    return {"full": sliced(block_size, head_dim, head_dim),
            "dar": sliced(window, far_dim, far_dim),
            "uniform": sliced(0, far_dim, far_dim),
            "thin_keys": sliced(0, far_dim, head_dim),
            "sliding": sliced(window, 0, 0),
            "dar latent": latent(window, same_bytes),
            "dar latent n/4": latent(window, n_head * head_dim // 4),
            "uniform latent": latent(0, same_bytes)}


def far_tier(regime):
    """What a distant token keeps, for a table: 'k 8, v 8' or 'latent 64'."""
    if regime.get("far_mode") == "latent":
        return f"latent {regime['far_latent_dim']}"
    return f"k {regime['far_k_dim']}, v {regime['far_v_dim']}"


def row_label(name, regime):
    """A row as the README's tables name it: 'dar, k 8 + v 8, rope (unrotated prefix)'."""
    kind = name.split()[0].replace("_", " ")
    if kind == "full":
        label = "full attention"
    elif kind == "sliding":
        label = f"sliding window {regime['window']}"
    elif regime.get("far_mode") == "latent":
        label = f"{kind} latent, r {regime['far_latent_dim']}"
    else:
        label = f"{kind}, k {regime['far_k_dim']} + v {regime['far_v_dim']}"
    if regime.get("rope"):
        prefix = "" if kind == "full" else f" ({regime.get('rope_prefix', dar.GPTConfig.rope_prefix)} prefix)"
        label += f", rope{prefix}" + (" + wpe" if regime.get("rope_wpe") else "")
    return label


def flags(regime):
    """GPTConfig fields as train.py flags: --name value, or --name / --no-name for a bool."""
    return [x for name, value in regime.items() for x in
            ([f"--{name}" if value else f"--no-{name}"] if isinstance(value, bool) else [f"--{name}", str(value)])]


def kv_ratio(T, regime, n_embd, n_head):
    """KV bytes per token at context length T, relative to a full cache of n_head heads:
    the README's formula over the key/value heads (fewer with grouped-query attention);
    latent: the window's keys and values, and a latent for every token (README)."""
    W = regime["window"]
    kv_heads = regime.get("n_kv_head") or n_head
    kv_width = n_embd // n_head * kv_heads
    if regime.get("far_mode") == "latent":
        far = T * regime["far_latent_dim"]
    else:
        far = max(0, T - W) * kv_heads * (regime["far_k_dim"] + regime["far_v_dim"])
    return (min(T, W) * 2 * kv_width + far) / (T * 2 * n_embd)


def median_times(fns, repeats, warmup, device):
    """Median seconds of each function, the functions alternated in every round."""
    times = {name: [] for name in fns}
    for round in range(warmup + repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize()
            if round >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def markdown(headers, rows):
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(str(x) for x in row) + " |" for row in rows])


def report(args, name, tables, results):
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, f"{name}.json")
    with open(path, "w") as f:
        json.dump({"args": vars(args), **results}, f, indent=1)
    print("\n\n".join(tables) + f"\n\n(raw numbers: {path})")


def folder_name(name):
    """A regime's name as a folder name: 'dar latent n/4' -> 'dar_latent_n_4'."""
    return name.replace(" ", "_").replace("/", "_")


def model_for(args, regime, block_size):
    torch.manual_seed(0)   # the same initial weights in every regime
    return dar.GPT(dar.GPTConfig(vocab_size=args.vocab_size, block_size=block_size, n_layer=args.n_layer,
                                 n_head=args.n_head, n_embd=args.n_embd, bias=False, **regime))


# ----------------------------------------------------------------------------------------

def bench_speed(args):
    """Training step time of each regime at one size, and greedy generation with the
    two-tier cache against nanoGPT's recompute-everything loop."""
    device, head_dim = checkpoint.pick_device(args.device), args.n_embd // args.n_head
    ctx, _ = checkpoint.autocast(device)
    x, y = (torch.randint(args.vocab_size, (args.batch_size, args.block_size), device=device) for _ in range(2))
    steps, configs = {}, regimes(args.block_size, args.n_head, head_dim, args.window, args.far_dim)
    for name, regime in configs.items():
        model = model_for(args, regime, args.block_size).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        def step(model=model, optimizer=optimizer):
            with ctx:
                loss = model(x, y)[1]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        steps[name] = step
    step_s = median_times(steps, args.repeats, args.warmup, device)
    rows = [[name, configs[name]["window"], far_tier(configs[name]), f"{step_s[name] * 1000:.1f}",
             f"{step_s[name] / step_s['full']:.2f}x"] for name in configs]
    train_table = markdown(["regime", "window", "far tier", "ms/step", "vs full"], rows)

    model = model_for(args, configs["dar"], args.gen_block_size).to(device).eval()
    prompt = torch.zeros(1, 1, dtype=torch.long, device=device)
    def generator(use_cache):
        def run():
            with ctx:
                model.generate(prompt, args.gen_tokens, top_k=1, use_cache=use_cache)
        return run
    gen_s = median_times({"two-tier cache": generator(True), "no cache (nanoGPT)": generator(False)},
                         args.gen_repeats, 1, device)
    rows = [[name, f"{s:.2f}", f"{args.gen_tokens / s:.0f}", f"{gen_s['no cache (nanoGPT)'] / s:.1f}x"]
            for name, s in gen_s.items()]
    gen_table = markdown(["greedy generation", "seconds", "tokens/s", "speed-up"], rows)
    report(args, "speed", [train_table, gen_table], {"step_seconds": step_s, "generate_seconds": gen_s,
                                                     "regimes": configs})


class StaticCache:
    """The peer a user would run instead of the two-tier cache: a plain preallocated full
    cache, as gpt-fast, nanochat and HF's static cache keep it, and nanoGPT's forward over it,
    written here independently of dar's attention and cache (it reads only the weights of a
    full-regime dar.GPT, and its norm and MLP modules). Grouped-query heads and rotary
    positions (adjacent pairs, the usual frequency order) as Llama has them."""

    def __init__(self, config, batch_size, dtype, device):
        shape = (config.n_layer, batch_size, config.n_kv_head, config.block_size, config.head_dim)
        self.k, self.v = (torch.zeros(shape, dtype=dtype, device=device) for _ in "kv")
        self.length = 0
        d = config.head_dim
        if config.rope and config.rope_prefix != "high":
            raise ValueError("the static peer turns rotary pairs in the usual order: rope_prefix='high'")
        self.freqs = config.rope_base ** -(torch.arange(0, d, 2, device=device).float() / d) if config.rope else None

    def reset(self):
        self.length = 0

    @torch.no_grad()
    def forward(self, model, idx):
        """Append idx (B, n) and return the last position's logits (B, 1, vocab_size)."""
        (B, n), t, C = idx.shape, model.transformer, model.config.n_embd
        start, end = self.length, self.length + n
        positions = torch.arange(start, end, device=idx.device)
        x = t.wte(idx) + (t.wpe(positions) if model.has_wpe else 0)
        causal = None if n == 1 or start == 0 else torch.ones(n, end, dtype=torch.bool, device=idx.device).tril(start)
        kv = self.k.size(2) * self.k.size(-1)
        for layer, block in enumerate(t.h):
            q, k, v = (z.view(B, n, -1, self.k.size(-1)).transpose(1, 2)
                       for z in block.attn.c_attn(block.ln_1(x)).split([C, kv, kv], 2))
            if self.freqs is not None:
                q, k = self.rotate(q, positions), self.rotate(k, positions)
            self.k[layer, :, :, start:end], self.v[layer, :, :, start:end] = k, v
            y = F.scaled_dot_product_attention(q, self.k[layer, :, :, :end], self.v[layer, :, :, :end],
                                               attn_mask=causal, is_causal=start == 0 and n > 1,
                                               enable_gqa=q.size(1) != k.size(1))
            x = x + block.attn.c_proj(y.transpose(1, 2).reshape(B, n, C))
            x = x + block.mlp(block.ln_2(x))
        self.length = end
        return model.lm_head(t.ln_f(x[:, [-1]]))

    def rotate(self, x, positions):
        """Pairs (2i, 2i + 1) of x (B, H, n, d) turned by position * freqs[i]."""
        angle = positions[:, None].float() * self.freqs
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x1 * angle.cos() - x2 * angle.sin(), x1 * angle.sin() + x2 * angle.cos()], -1).flatten(-2)


DECODE_HEADERS = ["B", "T", "regime", "ms/step", "vs static", "KV MiB held", "MiB allocated", "KV bytes vs full"]


# The static peers and the full regime each stands for: grouped-query rows against a
# static cache of as many key/value heads.
PEERS = {"static": "full", "static gqa": "full gqa"}


def peer_of(name):
    return "static gqa" if "gqa" in name else "static"


def decode_row(r, results):
    """A row of the decode table; a static peer holds what its full regime holds."""
    full_name = PEERS.get(r["regime"], "full")
    full = next(f for f in results if (f["B"], f["T"], f["regime"]) == (r["B"], r["T"], full_name))
    held, allocated = (r.get(key, full[key]) / 2**20 for key in ("held_bytes", "allocated_bytes"))
    return [r["B"], r["T"], r["regime"], f"{r['ms_per_step']:.2f}", f"{r['vs_static']:.2f}", f"{held:.2f}",
            f"{allocated:.2f}", f"{r.get('bytes_vs_full', 1.0):.3f}"]


def cached_forward(name, models, cache):
    """idx -> last logits through a cache: the static peer's forward on the full model, or
    dar.GPT's cached forward."""
    if name in PEERS:
        return lambda idx: cache.forward(models[PEERS[name]], idx)
    return lambda idx: models[name](idx, cache=cache)[0]


def bench_decode(args):
    """One-token decode step per regime against a plain static full cache, at batch sizes
    and context lengths; KV bytes held and allocated; time to first token (prefill) at
    batch 1; batched against sequential samples."""
    device, head_dim = checkpoint.pick_device(args.device), args.n_embd // args.n_head
    ctx, dtype = checkpoint.autocast(device)
    block_size = max(args.lengths + args.prefill_lengths) + args.warmup + args.steps
    configs = regimes(block_size, args.n_head, head_dim, args.window, args.far_dim)
    if args.kv_heads:   # grouped-query attention, as Llama-family models have it
        configs.update({f"{name} gqa": {**configs[name], "n_kv_head": args.kv_heads} for name in ("full", "dar")})
    unknown = set(args.masked_prefill) - set(configs)
    if unknown:
        raise SystemExit(f"error: --masked_prefill {sorted(unknown)}: the regimes are {list(configs)}")
    models = {name: model_for(args, c, block_size).to(device).eval() for name, c in configs.items()}
    def new_caches(B):
        peers = {peer: StaticCache(models[full].config, B, getattr(torch, dtype), device)
                 for peer, full in PEERS.items() if full in models}
        return {**peers, **{name: model.new_cache(B) for name, model in models.items()}}
    results = []
    for B in args.batch_sizes:
        tokens = torch.randint(args.vocab_size, (B, max(args.lengths)), device=device)
        for T in args.lengths:
            caches, steps = new_caches(B), {}
            for name, cache in caches.items():
                forward = cached_forward(name, models, cache)
                with torch.no_grad(), ctx:
                    for start in range(0, T, args.prefill_chunk):   # in chunks: bounded memory
                        forward(tokens[:, start:min(T, start + args.prefill_chunk)])
                def step(forward=forward):
                    with torch.no_grad(), ctx:
                        forward(tokens[:, :1])
                steps[name] = step
            held = {name: (cache_bytes.held(c), cache_bytes.allocated(c)) for name, c in caches.items() if name not in PEERS}
            seconds = median_times(steps, args.steps, args.warmup, device)
            for name in caches:
                r = {"B": B, "T": T, "regime": name, "ms_per_step": 1000 * seconds[name],
                     "vs_static": seconds[name] / seconds[peer_of(name)]}
                if name not in PEERS:   # bytes at T, measured before the timed steps added tokens
                    ratio = kv_ratio(T, configs[name], args.n_embd, args.n_head)
                    at_block = kv_ratio(block_size, configs[name], args.n_embd, args.n_head)
                    full, full_allocated = held["full"]
                    r.update(held_bytes=held[name][0], allocated_bytes=held[name][1], full_bytes=full,
                             bytes_vs_full=ratio, formula_bytes=round(ratio * full),
                             formula_at_block_bytes=round(at_block * full_allocated))
                results.append(r)
            print(f"B={B} T={T} done", file=sys.stderr, flush=True)
    table = markdown(DECODE_HEADERS, [decode_row(r, results) for r in results])
    prefill = bench_prefill(args, models, new_caches(1), ctx, device)
    prefill_table = markdown(["prompt T", "regime", "ms to first token", "vs static"],
                             [[r["T"], r["regime"], f"{r['ms']:.1f}", f"{r['vs_static']:.2f}"] for r in prefill])
    # several samples of one prompt: one batch (one prefill, rows copied) against one at a time
    model, prompt = models["dar"], torch.randint(args.vocab_size, (1, args.sample_prompt), device=device)
    def sample(batched):
        def run():
            with ctx:
                if batched:
                    list(model.generate_stream(prompt, args.sample_tokens, num_samples=args.num_samples))
                else:
                    for _ in range(args.num_samples):
                        list(model.generate_stream(prompt, args.sample_tokens))
        return run
    sample_s = median_times({"batched": sample(True), "sequential": sample(False)}, args.sample_repeats, 1, device)
    sample_table = markdown([f"{args.num_samples} samples of {args.sample_tokens} tokens", "seconds", "speed-up"],
                            [[name, f"{s:.2f}", f"{sample_s['sequential'] / s:.2f}x"] for name, s in sample_s.items()])
    report(args, "decode", [table, "Time to first token (prefill of the whole prompt, batch 1):\n\n" + prefill_table,
                            sample_table], {"rows": results, "prefill": prefill, "regimes": configs,
                                            "block_size": block_size, "sample_seconds": sample_s})
    plot_decode(results, prefill, configs, os.path.join(args.out_dir, "decode.png"))


def bench_prefill(args, models, caches, ctx, device):
    """Time to first token: the whole prompt through an emptied cache in one call, per
    regime and prompt length, against the static peer; the --masked_prefill regimes also on
    dar.py's masked reference path (the split attention off), alternated with the rest."""
    rows = []
    for T in args.prefill_lengths:
        prompt = torch.randint(args.vocab_size, (1, T), device=device)
        def timed_prefill(name, cache, masked=False):
            forward = cached_forward(name, models, cache)
            def run():
                fast = dar.prompt_attention
                if masked:   # dar.py's reference path
                    dar.prompt_attention = dar.dar_attention
                with torch.no_grad(), ctx:
                    cache.reset()
                    forward(prompt)
                dar.prompt_attention = fast
            return run
        runs = {name: timed_prefill(name, cache) for name, cache in caches.items()}
        runs.update({f"{name} masked": timed_prefill(name, caches[name], True) for name in args.masked_prefill})
        seconds = median_times(runs, args.prefill_repeats, 1, device)
        rows += [{"T": T, "regime": name, "ms": 1000 * s, "vs_static": s / seconds[peer_of(name)]}
                 for name, s in seconds.items()]
        print(f"prefill T={T} done", file=sys.stderr, flush=True)
    return rows


def bench_tiers(args):
    """What the two-tier cache holds, drawn: for a filled context, which coordinates of each
    token's key and value are kept (read from the cache's buffers), and the bytes."""
    config = dar.GPTConfig(vocab_size=args.vocab_size, block_size=args.block_size, n_layer=1, n_head=1,
                           n_embd=args.head_dim, window=args.window, far_k_dim=args.far_dim, far_v_dim=args.far_dim)
    model, cache = dar.GPT(config).eval(), dar.KVCache(config, 1)
    with torch.no_grad():
        model(torch.randint(args.vocab_size, (1, args.block_size)), cache=cache)
    layer, T = cache.layers[0], cache.length
    held = {}   # (coordinate, position) -> 1 in the store every token writes on arrival, 2 in the ring, 0 not kept
    for name, kept, rest in (("key", layer.kept_k, layer.ring_k), ("value", layer.kept_v, layer.ring_v)):
        grid = np.zeros((args.head_dim, T))
        grid[:kept.size(-1), :] = 1
        grid[kept.size(-1):, T - rest.size(2):] = 2
        held[name] = grid
    ratio = cache_bytes.held(cache) / cache_bytes.full(cache)
    summary = {"T": T, "window": args.window, "head_dim": args.head_dim, "far_dim": args.far_dim,
               "held_bytes": cache_bytes.held(cache), "full_bytes": cache_bytes.full(cache), "ratio": ratio}
    report(args, "tiers", [markdown(["T", "window", "head_dim", "far dims", "bytes held / full cache"],
                                    [[T, args.window, args.head_dim, args.far_dim, f"{ratio:.3f}"]])], summary)
    plot_tiers(held, summary, os.path.join(args.out_dir, "tiers.png"))


def plot_tiers(held, s, path):
    plt = pyplot()
    if plt is None:
        return
    from matplotlib.colors import ListedColormap
    fig, axes = plt.subplots(2, 1, figsize=(8.4, 4.6), sharex=True)
    colors = ListedColormap(["#f2f2f2", "#7fa7d9", "#d9534f"])   # not kept, kept at any distance, the window's
    T, W, r, d = s["T"], s["window"], s["far_dim"], s["head_dim"]
    for ax, (name, grid) in zip(axes, held.items()):
        ax.imshow(grid, aspect="auto", cmap=colors, vmin=0, vmax=2, interpolation="nearest")
        ax.set_ylabel(f"{name}\ncoordinate")
        ax.set_yticks([0, r, d - 1], [0, r, d - 1])
        ax.axvline(T - W - 0.5, color="k", linewidth=1)
        far = f"score q[:{r}] . k[:{r}]" if name == "key" else f"value [v[:{r}], 0, ..., 0]"
        ax.text((T - W) / 2, (r + d) / 2, f"far tier: not kept; the {far}", ha="center", va="center")
        ax.text(T - W / 2 - 0.5, (r + d) / 2, "local tier:\nwhole", ha="center", va="center", color="w")
    axes[-1].set_xlabel(f"token position (the newest, {T - 1}, is the query's; the line is the window's edge)")
    axes[0].set_title(f"One head's cache at {T} tokens: every token's first {r} of {d} coordinates, written on arrival "
                      f"(blue),\nthe last {W} tokens' other {d - r} in a ring (red): {s['held_bytes'] / 2**10:.1f} KiB, "
                      f"{s['ratio']:.3f}x a full cache's {s['full_bytes'] / 2**10:.1f} KiB", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------

def train_run(args, out_dir, *flags):
    """One train.py run; returns its eval curve [(iter, val loss), ...]."""
    common = ["--dataset", args.dataset, "--out_dir", out_dir, "--weight_decay", args.weight_decay, "--n_layer", args.n_layer, "--n_head",
              args.n_head, "--n_embd", args.n_embd, "--block_size", args.block_size, "--batch_size",
              args.batch_size, "--eval_iters", args.eval_iters, "--seed", args.seed, "--device", args.device,
              "--sample_tokens", 0, "--log_interval", args.log_interval, "--overwrite"]
    if args.resume and os.path.exists(os.path.join(out_dir, "ckpt_last.pt")):
        flags = list(flags) + ["--init_from", "resume"]   # the last --init_from wins
    print(f"\n=== {out_dir} ===", flush=True)
    train.main([str(a) for a in common + list(flags)])
    with open(os.path.join(out_dir, "eval_log.jsonl")) as f:
        return [(e["iter"], e["val_loss"]) for e in map(json.loads, f)]


def selected(variants, only):
    """The variants named by --only (all when it is empty)."""
    unknown = set(only or []) - set(variants)
    if unknown:
        raise SystemExit(f"error: --only {sorted(unknown)}: the regimes are {list(variants)}")
    return {name: v for name, v in variants.items() if not only or name in only}


def quality_variants(args, configs):
    """name -> (GPTConfig fields, kv_shift): the regimes, DAR with kv_shift, DAR's far bytes
    split as a quarter for keys and three quarters for values ("k<v"), and rotary positions."""
    far = configs["dar"]["far_k_dim"]
    k_lt_v = {**configs["dar"], "far_k_dim": far // 2, "far_v_dim": 3 * far // 2}
    rope = lambda regime, prefix: {**regime, "rope": True, "rope_prefix": prefix}
    variants = {name: (regime, False) for name, regime in configs.items()}
    variants.update({"dar+kv_shift": (configs["dar"], True), "dar k<v": (k_lt_v, False),
                     "full rope": (rope(configs["full"], "high"), False),
                     "dar k<v rope unrotated": (rope(k_lt_v, "unrotated"), False),
                     "dar k<v rope unrotated wpe": ({**rope(k_lt_v, "unrotated"), "rope_wpe": True}, False)})
    return selected(variants, args.only)


def bench_quality(args):
    """Each regime trained with the same data order and budget, on each seed; then the
    conversions of the first seed's full model."""
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    head_dim = args.n_embd // args.n_head
    configs = regimes(args.block_size, args.n_head, head_dim, args.window, args.far_dim or head_dim // 4)
    variants, seeds = quality_variants(args, configs), [args.seed + i for i in range(args.seeds)]
    schedule = ["--max_iters", args.max_iters, "--eval_interval", args.eval_interval,
                "--warmup_iters", args.warmup_iters, "--learning_rate", args.learning_rate]
    curves = {name: [] for name in variants}   # one curve per seed
    for args.seed in seeds:
        for name, (regime, kv_shift) in variants.items():
            folder = folder_name(name if args.seed == seeds[0] else f"{name} seed {args.seed}")
            curves[name].append(train_run(args, os.path.join(args.out_dir, "quality", folder), *schedule,
                                          *flags(regime), "--kv_shift" if kv_shift else "--no-kv_shift"))
    args.seed = seeds[0]
    final = {name: [curve[-1][1] for curve in runs] for name, runs in curves.items()}
    median = {name: statistics.median(losses) for name, losses in final.items()}
    spread = lambda name: f" ({min(final[name]):.4f}-{max(final[name]):.4f})" if len(seeds) > 1 else ""
    vs_full = lambda name: f"{100 * (median[name] / median['full'] - 1):+.2f}%" if "full" in median else "-"
    rows = [[name, regime["window"], far_tier(regime), "yes" if shift else "no", f"{median[name]:.4f}{spread(name)}",
             vs_full(name), f"{kv_ratio(args.block_size, regime, args.n_embd, args.n_head):.3f}"]
            for name, (regime, shift) in variants.items()]
    variant_table = markdown(["regime", "window", "far tier", "kv_shift", f"final val loss ({len(seeds)} seeds: median, range)",
                              "vs full", f"KV bytes/token at T={args.block_size} vs full"], rows)
    first = {name: runs[0] for name, runs in curves.items()}   # the first seed's curves
    medians = {name: [(it, statistics.median(run[i][1] for run in runs)) for i, (it, _) in enumerate(runs[0])]
               for name, runs in curves.items()}
    curve_table = markdown(["iter"] + list(first), [[it] + [f"{first[n][i][1]:.4f}" for n in first]
                                                   for i, (it, _) in enumerate(next(iter(first.values())))])
    conversions = convert_and_fine_tune(args, configs) if "full" in curves else ("(no conversions: full not run)", {})
    report(args, "quality", [variant_table, f"val loss during training (seed {seeds[0]}):\n\n" + curve_table,
                             conversions[0]], {"variants": variants, "seeds": seeds, "curves": curves,
                                               "final_val_loss": final, "conversion": conversions[1]})
    plot_curves(medians, len(seeds), os.path.join(args.out_dir, "quality.png"))


def convert_and_fine_tune(args, configs):
    """The trained full model converted to DAR, uniform and DAR latent, by the weights
    (SVD) and by PCA on a calibration batch, each selected by --only."""
    source = os.path.join(args.out_dir, "quality", "full", "ckpt_last.pt")
    fine_tune = ["--max_iters", args.finetune_iters, "--eval_interval", args.finetune_iters,
                 "--warmup_iters", max(1, args.finetune_iters // 10), "--learning_rate", args.finetune_lr,
                 "--min_lr", args.finetune_lr / 10]
    results, rows = {}, []
    for target in [t for t in ("dar", "uniform", "dar latent") if not args.only or t in args.only]:
        for method, seqs in (("weight SVD", 0), ("PCA", args.calibration_seqs)):
            out_dir = os.path.join(args.out_dir, "quality", f"convert_{folder_name(target)}_{'pca' if seqs else 'svd'}")
            curve = train_run(args, out_dir, "--init_from", "convert",
                              "--convert_from", source, "--calibration_seqs", seqs, *flags(configs[target]), *fine_tune)
            results[f"{target}/{method}"] = {"zero_shot": curve[0][1], "fine_tuned": curve[-1][1]}
            rows.append([target, method, f"{curve[0][1]:.4f}", f"{curve[-1][1]:.4f}"])
    table = markdown(["converted to", "axes", "val loss zero-shot",
                      f"after {args.finetune_iters} fine-tune iters"], rows)
    return table, results


def pyplot():
    """matplotlib.pyplot drawing to files, or None (one line says so): an optional extra."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("matplotlib is not installed: no PNG (pip install matplotlib)")
        return None


def plot_curves(curves, n_seeds, path):
    """Val loss against iteration, one line per regime (the median over n_seeds seeds), from
    the first evaluation after init; the legend beside the axes, clear of the data."""
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(8.4, 4.2))
    colors = {}   # a latent regime in its slice counterpart's colour, dashed with squares (dotted at r = n_embd / 4)
    for name, curve in curves.items():
        base = name.split(" latent")[0].replace(" rope", "")
        color = colors.setdefault(base, f"C{len(colors)}")
        latent, rope = "latent" in name, "rope" in name
        style = ":" if name.endswith("n/4") else "--" if latent else "-."if rope else "-"
        ax.plot(*zip(*curve[1:]), marker="s" if latent else "^" if rope else ".", markersize=4, color=color,
                linestyle=style, label=name)
    seeds = f"median of {n_seeds} seeds" if n_seeds > 1 else "one seed"
    ax.set(title=f"validation loss while training, {seeds} (lower is better)", xlabel="iteration",
           ylabel="val loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8,
              title="solid: slice far tier\ndashed, squares: latent\ndash-dot, triangles: rope", title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_decode(results, prefill, configs, path):
    """Decode step time against context length at each batch size, time to first token
    against prompt length, and KV bytes held per sequence; each regime labelled with what a
    distant token keeps (configs: name -> GPTConfig fields)."""
    plt = pyplot()
    if plt is None:
        return
    batch_sizes = sorted({r["B"] for r in results})
    fig, axes = plt.subplots(1, len(batch_sizes) + 2, figsize=(4.2 * (len(batch_sizes) + 2), 4.6))
    for name, style, marker in (("static", "k--", "."), ("full", "C0-", "."), ("dar", "C3-", "."),
                                ("uniform", "C2-", "."), ("thin_keys", "C1-", "."), ("sliding", "C7-", "."),
                                ("dar latent", "C3:", "s"), ("dar latent n/4", "C4-.", "^"),
                                ("uniform latent", "C2:", "D")):
        label = "static full cache (the peer)" if name == "static" else row_label(name, configs[name])
        for ax, B in zip(axes, batch_sizes):
            rows = [r for r in results if r["regime"] == name and r["B"] == B]
            ax.plot([r["T"] for r in rows], [r["ms_per_step"] for r in rows], style, marker=marker, markersize=5,
                    label=label)
            ax.set(title=f"decode step, batch {B}", xlabel="context length T", ylabel="ms per token step")
        rows = [r for r in prefill if r["regime"] == name]
        axes[-2].plot([r["T"] for r in rows], [r["ms"] for r in rows], style, marker=marker, markersize=5, label=label)
        rows = [r for r in prefill if r["regime"] == f"{name} masked"]
        if rows:
            axes[-2].plot([r["T"] for r in rows], [r["ms"] for r in rows], style, marker="x", alpha=0.5,
                          label=f"{label}: masked reference path")
        if name != "static":   # the peer holds what the full regime holds
            rows = [r for r in results if r["regime"] == name and r["B"] == batch_sizes[0]]
            axes[-1].plot([r["T"] for r in rows], [r["held_bytes"] / r["B"] / 2**20 for r in rows], style,
                          marker=marker, markersize=5, label=label)
    axes[-2].set(title="time to first token, batch 1", xlabel="prompt length T", ylabel="ms (prefill)")
    axes[-1].set(title="KV cache held per sequence", xlabel="context length T", ylabel="MiB")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", bbox_to_anchor=(0.5, 0.06), ncol=3)
    fig.text(0.5, 0.01, "the peer: a plain preallocated full cache (as gpt-fast and nanochat keep one) with nanoGPT's "
             "forward, written in bench.py apart from dar.py; lower is better", ha="center", fontsize=8)
    for ax in axes:
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    fig.tight_layout(rect=(0, 0.22, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------

def recall_accuracy(predict, tokens, answers, length, window, batch_size=100):
    """Accuracy on the answer tokens, overall and by the distance from the query to the
    token it must copy: inside the window, 1-2x the window, farther (and the last two
    together, beyond the window). Returns
    {bucket: (accuracy or None, answers counted)}. predict: (B, n) ids -> (B, n) next ids."""
    seqs = np.asarray(tokens, dtype=np.int64).reshape(-1, length)
    dist = np.asarray(answers, dtype=np.int64).reshape(-1, length)[:, 1:]
    correct = np.zeros(dist.shape, dtype=bool)
    for i in range(0, len(seqs), batch_size):
        x = torch.from_numpy(seqs[i:i + batch_size, :-1])
        correct[i:i + batch_size] = predict(x).cpu().numpy() == seqs[i:i + batch_size, 1:]
    buckets = {"all": dist > 0, "inside window": (dist > 0) & (dist < window),
               "1-2x window": (dist >= window) & (dist < 2 * window), "farther": dist >= 2 * window,
               "beyond window": dist >= window}
    return {name: (float(correct[m].mean()) if m.any() else None, int(m.sum())) for name, m in buckets.items()}


def model_predictor(model):
    """Greedy next-token predictions at every position (targets only ask for all logits)."""
    @torch.no_grad()
    def predict(x):
        x = x.to(next(model.parameters()).device)
        return model(x, targets=x)[0].argmax(-1)
    return predict


def recall_run(args, name, pairs, regime, folder="recall"):
    """Train one regime on recall data with `pairs` pairs; its accuracy on the val split."""
    data_dir = os.path.join(args.out_dir, folder, "data",   # --quick's data must not be reused by a full run
                            f"pairs_{pairs}_block_{args.block_size}_seqs_{args.train_seqs}_{args.val_seqs}")
    if not os.path.exists(os.path.join(data_dir, "meta.json")):
        write_recall(data_dir, pairs, args.block_size, train_seqs=args.train_seqs, val_seqs=args.val_seqs)
    out_dir = os.path.join(args.out_dir, folder, f"{folder_name(name)}_pairs_{pairs}")
    args.dataset = data_dir
    train_run(args, out_dir, "--max_iters", args.max_iters, "--eval_interval", args.eval_interval,
              "--warmup_iters", args.warmup_iters, "--learning_rate", args.learning_rate,
              *flags(regime), "--kv_shift" if args.kv_shift else "--no-kv_shift")
    model = checkpoint.model_from(checkpoint.load(os.path.join(out_dir, "ckpt_last.pt")), checkpoint.pick_device(args.device))
    val = lambda name: np.fromfile(os.path.join(data_dir, f"{name}.bin"), dtype=np.uint16)
    return recall_accuracy(model_predictor(model), val("val"), val("val_answers"), args.block_size + 1, args.window)


def recall_regimes(args):
    """The rows of the recall table. Learned positions: far dims head_dim / 4, split evenly
    and as hd/8 for keys, 3hd/8 for values (the same bytes: "k<v"); head_dim / 8; the
    baselines; the latent far tier at the bytes of each (r = n_head * 2 * far dims). Then
    rotary positions: each prefix choice, the unrotated one with wpe kept as well, and the
    baselines (full attention with rope, and with rope and wpe)."""
    hd, W, H = args.n_embd // args.n_head, args.window, args.n_head
    k_lt_v = sliced(W, hd // 8, 3 * hd // 8)
    rope = lambda regime, prefix="high": {**regime, "rope": True, "rope_prefix": prefix}
    return {"full": sliced(args.block_size, hd, hd), "dar hd/4": sliced(W, hd // 4, hd // 4), "dar hd/4 k<v": k_lt_v,
            "dar hd/8": sliced(W, hd // 8, hd // 8), "uniform hd/4": sliced(0, hd // 4, hd // 4),
            "thin_keys": sliced(0, hd // 4, hd), "sliding": sliced(W, 0, 0),
            "dar latent as hd/4": latent(W, H * hd // 2), "dar latent as hd/8": latent(W, H * hd // 4),
            "uniform latent as hd/4": latent(0, H * hd // 2),
            "full rope": rope(sliced(args.block_size, hd, hd)),
            "full rope wpe": {**rope(sliced(args.block_size, hd, hd)), "rope_wpe": True},
            **{f"dar hd/4 k<v rope {p}": rope(k_lt_v, p) for p in ("high", "low", "unrotated")},
            "dar hd/4 k<v rope unrotated wpe": {**rope(k_lt_v, "unrotated"), "rope_wpe": True},
            "dar hd/4 rope unrotated": rope(sliced(W, hd // 4, hd // 4), "unrotated"),
            "uniform hd/4 rope": rope(sliced(0, hd // 4, hd // 4)), "sliding rope": rope(sliced(W, 0, 0))}


# The rows the README shows (bench.py recall's default): each kind of positions, its baseline first.
RECALL_ROWS = ["full", "dar hd/4", "dar hd/4 k<v", "full rope", "full rope wpe", "dar hd/4 k<v rope unrotated wpe"]
LEARNED = 0.9   # a seed learned recall when it answers this share of the far answers (beyond the window)


def baseline(regime):
    """Full attention with the same kind of positions: learned, rotary, or rotary and learned."""
    if not regime.get("rope"):
        return "full"
    return "full rope wpe" if regime.get("rope_wpe") else "full rope"


def seeds_cell(accuracies, bucket):
    """The median over seeds, and the lowest and highest seed: '97.5% (12-100)'."""
    values = [100 * a[bucket][0] for a in accuracies if a[bucket][0] is not None]
    if not values:
        return "-"
    spread = f" ({min(values):.0f}-{max(values):.0f})" if len(values) > 1 else ""
    return f"{statistics.median(values):.1f}%{spread}"


def learned(accuracies):
    """The seeds that learned: at least 90% of the answers beyond the window right."""
    return sum(a["beyond window"][0] >= LEARNED for a in accuracies)


def baseline_cell(regime, results):
    """Whether the row's baseline learns at this budget (9 seeds of 10 or more): a row compared
    against a baseline that does not learn the task measures nothing."""
    base = baseline(regime)
    if base not in results:
        return f"{base}: not run"
    runs = results[base]
    count = learned(runs)
    verdict = "learns" if 10 * count >= 9 * len(runs) else "does not learn: no comparison"
    return f"{base} {count}/{len(runs)}, {verdict}"


def bench_recall(args):
    """Recall accuracy per regime over seeds (median, spread, how many seeds learned: 90% of
    the answers beyond the window), by distance from the query to its pair; optionally as the
    number of pairs grows. One thread per run (--threads), so that a seed's result does not
    depend on the machine."""
    if args.quick:
        for name, value in RECALL_QUICK.items():
            setattr(args, name, value)
    torch.set_num_threads(args.threads)
    extra = dict(spec.split("=", 1) for spec in args.extra)
    variants = selected({**recall_regimes(args), **{name: json.loads(fields) for name, fields in extra.items()}},
                        args.only or RECALL_ROWS + list(extra))
    seeds = [args.seed + i for i in range(args.seeds)]
    buckets = ["all", "inside window", "beyond window", "1-2x window", "farther"]
    def runs(name, regime, pairs):   # one recall_run per seed
        results = []
        for args.seed in seeds:
            results.append(recall_run(args, f"{name} seed {args.seed}" if len(seeds) > 1 else name, pairs, regime))
        args.seed = seeds[0]
        return results
    results = {name: runs(name, regime, args.pairs) for name, regime in variants.items()}
    rows = [[name, regime["window"], far_tier(regime)] + [seeds_cell(results[name], b) for b in buckets]
            + [f"{learned(results[name])}/{len(seeds)}", baseline_cell(regime, results)]
            for name, regime in variants.items()]
    counts = {b: next(iter(results.values()))[0][b][1] for b in buckets}
    variant_table = markdown(["regime", "window", "far tier"] + [f"{b} ({counts[b]})" for b in buckets]
                             + ["seeds learned", "baseline at this budget"], rows)
    per_seed = markdown(["regime"] + [str(s) for s in seeds],
                        [[name] + [f"{100 * a['beyond window'][0]:.1f}" for a in results[name]] for name in variants])
    sweep = {name: {pairs: results[name] if pairs == args.pairs else runs(name, variants[name], pairs)
                    for pairs in args.sweep_pairs} for name in args.sweep_regimes if name in variants}
    sweep_table = markdown(["pairs", "regime"] + buckets, [[pairs, name] + [seeds_cell(sweep[name][pairs], b) for b in buckets]
                                                           for pairs in args.sweep_pairs for name in sweep])
    shift = "with" if args.kv_shift else "without"
    report(args, "recall", [f"{args.pairs} pairs per sequence, {shift} kv_shift, {args.max_iters} iterations, "
                            f"{len(seeds)} seeds ({seeds[0]}-{seeds[-1]}), {args.threads} thread(s) per run: the "
                            "median (lowest-highest seed); answers per bucket in brackets; 'learned': 90% or more "
                            "of the answers beyond the window:\n\n" + variant_table,
                            "Per seed, accuracy beyond the window (%):\n\n" + per_seed]
           + (["As pairs grow:\n\n" + sweep_table] if args.sweep_pairs else []),
           {"variants": variants, "kv_shift": args.kv_shift, "seeds": seeds, "threads": torch.get_num_threads(),
            "accuracy": results,
            "sweep": {name: {str(k): v for k, v in by_pairs.items()} for name, by_pairs in sweep.items()}})
    plot_recall(variants, results, os.path.join(args.out_dir, "recall.png"))


def plot_recall(variants, results, path, n_values=64):
    """Accuracy beyond the window per regime: one dot per seed, a bar at the median; chance
    (one of n_values values) and the bar a seed must reach to count as learned (90%)."""
    plt = pyplot()
    if plt is None:
        return
    names = list(variants)
    kinds = {"full": ("C0", "learned positions"), "full rope": ("C1", "rotary positions"),
             "full rope wpe": ("C2", "rotary and learned positions")}
    fig, ax = plt.subplots(figsize=(0.8 * len(names) + 5.0, 5.6))
    for x, name in enumerate(names):
        accuracies = [100 * run["beyond window"][0] for run in results[name]]
        color, kind = kinds[baseline(variants[name])]
        ax.scatter([x] * len(accuracies), accuracies, color=color, alpha=0.6, zorder=3, label=f"{kind}, one seed")
        ax.hlines(statistics.median(accuracies), x - 0.3, x + 0.3, color=color, linewidth=2.5,
                  label="median of the seeds")
    ax.axhline(100 * LEARNED, color="black", linestyle="--", linewidth=1, label="learned: 90% right")
    ax.axhline(100 / n_values, color="gray", linestyle=":", linewidth=1, label=f"chance (1 of {n_values} values)")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    ax.set_xticks(range(len(names)), [row_label(name, variants[name]) for name in names], rotation=60, ha="right",
                  fontsize=8)
    seeds = len(next(iter(results.values())))
    ax.set(ylabel="accuracy beyond the window (%)", ylim=(-3, 103),
           title=f"associative recall beyond the window: {seeds} seeds a row, one dot each")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@torch.no_grad()
def attention_maps(model, x):
    """Per layer, the attention weights (B, H, T, T) of x, written from the formula (scores
    q . k inside the window, q[:rk] . k[:rk] beyond it) off the module's own projections."""
    inputs = []
    hooks = [b.attn.register_forward_hook(lambda m, i, o: inputs.append((m, i[0]))) for b in model.transformer.h]
    logits = model(x, targets=x)[0]
    for hook in hooks:
        hook.remove()
    maps, T = [], x.size(1)
    dist = torch.arange(T)[:, None] - torch.arange(T)[None]
    for attn, h in inputs:
        q, k, v = (attn.heads(t) for t in attn.c_attn(h).split(attn.n_embd, 2))
        k, v = attn.shift(k, v) if attn.kv_shift else (k, v)
        q, k = attn.turn(q, k, 0) if attn.rope else (q, k)
        near, far = q @ k.mT, q[..., :attn.far_k_dim] @ k[..., :attn.far_k_dim].mT
        far = far if attn.has_far else torch.full_like(far, -float("inf"))
        scores = torch.where(dist < attn.window, near, far).masked_fill(dist < 0, -float("inf"))
        maps.append(torch.softmax(scores / attn.head_dim ** 0.5, -1))
    return maps, logits


def bench_attention(args):
    """Where trained recall models look (the runs bench.py recall left in --out_dir): for
    the answers beyond --window, how often some head puts half its attention or more on the
    value to copy (the far tier selects it), and how often the answer is right then."""
    rows, results = [], {}
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"
    for run in sorted(glob.glob(os.path.join(args.out_dir, "recall", "*", "ckpt_last.pt"))):
        ckpt = checkpoint.load(run)
        data_dir = ckpt["train_config"]["dataset"]
        model = checkpoint.model_from(ckpt, "cpu")
        if model.config.far_mode == "latent":   # its far keys are not a slice of the keys
            continue
        length = model.config.block_size + 1
        val = lambda name: np.fromfile(os.path.join(data_dir, f"{name}.bin"), dtype=np.uint16).astype(np.int64).reshape(-1, length)
        tokens, dist = val("val")[:args.sequences], val("val_answers")[:args.sequences, 1:]
        maps, logits = attention_maps(model, torch.from_numpy(tokens[:, :-1]))
        b, a = np.nonzero(dist >= args.window)   # query position a answers with the value at a - dist
        on_target = torch.stack([m[b, :, a, a - dist[b, a]] for m in maps]).amax((0, 2)).numpy()   # best head
        right = logits.argmax(-1).numpy()[b, a] == tokens[b, a + 1]
        selects = on_target >= 0.5
        r = results[os.path.basename(os.path.dirname(run))] = {
            "answers": int(len(a)), "accuracy": float(right.mean()), "selects": float(selects.mean()),
            "right_when_selects": float(right[selects].mean()) if selects.any() else None,
            "right_otherwise": float(right[~selects].mean()) if (~selects).any() else None}
        rows.append([os.path.basename(os.path.dirname(run)), r["answers"], pct(r["accuracy"]), pct(r["selects"]),
                     pct(r["right_when_selects"]), pct(r["right_otherwise"])])
    report(args, "attention", [f"Answers at least {args.window} tokens from their pair, first {args.sequences} validation "
                               "sequences; 'selects': some head of some layer puts >= 50% of its attention on the value "
                               "to copy:\n\n" + markdown(["run", "answers", "accuracy", "selects", "right when it selects",
                                                         "right otherwise"], rows)], {"runs": results})


# ----------------------------------------------------------------------------------------

def capacity_cells(head_dim, window, block_size, dims, tied_dims):
    """name -> GPTConfig fields: full attention (the ceiling), a sliding window
    (the floor), then far keys reduced (selection), far values reduced (transfer), both."""
    cells = {"full": sliced(block_size, head_dim, head_dim), "sliding": sliced(window, 0, 0)}
    cells.update({f"keys {r}": sliced(window, r, head_dim) for r in dims})
    cells.update({f"values {r}": sliced(window, head_dim, r) for r in dims})
    cells.update({f"tied {r}": sliced(window, r, r) for r in tied_dims})
    return cells


def bench_capacity(args):
    """Recall accuracy on answers beyond the window as far keys, far values or both shrink,
    for several numbers of pairs and seeds, between full attention and a sliding window."""
    if args.quick:
        for name, value in CAPACITY_QUICK.items():
            setattr(args, name, value)
    head_dim = args.n_embd // args.n_head
    cells = capacity_cells(head_dim, args.window, args.block_size, args.dims, args.tied_dims)
    seeds, start = [args.seed + i for i in range(args.seeds)], time.time()
    accuracy = {name: {pairs: [] for pairs in args.pairs} for name in cells}   # one per seed
    for pairs in args.pairs:
        for name, config in cells.items():
            for args.seed in seeds:   # train_run passes args.seed to train.py
                result = recall_run(args, f"{name} seed {args.seed}", pairs, config, folder="capacity")
                accuracy[name][pairs].append(result["beyond window"][0])
    learnt = {pairs: statistics.median(accuracy["full"][pairs]) >= 0.95 for pairs in args.pairs}
    def cell(accs, pairs):
        text = f"{100 * statistics.median(accs):.1f}%" + (f" ({100 * min(accs):.0f}-{100 * max(accs):.0f})" if len(accs) > 1 else "")
        return text if learnt[pairs] else text + " budget"
    grid = markdown(["cell", "window", "far_k_dim", "far_v_dim"] + [f"{pairs} pairs" for pairs in args.pairs],
                    [[name, *config.values()] + [cell(accuracy[name][p], p) for p in args.pairs]
                     for name, config in cells.items()])
    smallest = {series: {pairs: smallest_dim(accuracy, series, pairs, learnt[pairs]) for pairs in args.pairs}
                for series in ("keys", "values", "tied")}
    summary = markdown(["pairs", "smallest far_k_dim (values full)", "smallest far_v_dim (keys full)", "smallest tied"],
                       [[pairs] + [smallest[series][pairs] for series in smallest] for pairs in args.pairs])
    minutes = (time.time() - start) / 60
    report(args, "capacity", [f"Median accuracy beyond the window over {len(seeds)} seed(s) (min-max); 'budget': full "
                              f"attention below 95% at that many pairs, so the cell measures the budget:\n\n" + grid,
                              "Smallest far dimension reaching 90% of full attention's accuracy:\n\n" + summary,
                              f"{len(cells) * len(args.pairs) * len(seeds)} training runs, {minutes:.1f} minutes"],
           {"cells": cells, "seeds": seeds, "learnt": learnt, "smallest": smallest, "minutes": minutes,
            "accuracy": {name: {str(p): a for p, a in by_pairs.items()} for name, by_pairs in accuracy.items()}})
    plot_capacity(cells, accuracy, args.pairs, head_dim, os.path.join(args.out_dir, "capacity.png"))


def smallest_dim(accuracy, series, pairs, learnt):
    """The smallest dimension of a series whose median reaches 90% of full attention's."""
    if not learnt:
        return "budget"
    target = 0.9 * statistics.median(accuracy["full"][pairs])
    dims = sorted(int(name.split()[1]) for name in accuracy if name.startswith(series + " "))
    passing = [r for r in dims if statistics.median(accuracy[f"{series} {r}"][pairs]) >= target]
    return str(passing[0]) if passing else f"> {dims[-1]}" if dims else "-"


def plot_capacity(cells, accuracy, pairs_list, head_dim, path):
    """Accuracy beyond the window against far dimension, one line per number of pairs (the
    median over seeds, bars from the lowest seed to the highest); the rightmost point (head_dim)
    is full attention, the dotted line of the same colour the sliding window."""
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 3, figsize=(12.6, 4.4), sharey=True)
    titles = {"keys": "far keys reduced (values full)", "values": "far values reduced (keys full)",
              "tied": "both reduced (DAR)"}
    n_seeds = len(next(iter(accuracy["full"].values())))
    for ax, (series, title) in zip(axes, titles.items()):
        dims = sorted(int(name.split()[1]) for name in cells if name.startswith(series + " "))
        for i, pairs in enumerate(pairs_list):
            runs = [accuracy[f"{series} {r}"][pairs] for r in dims] + [accuracy["full"][pairs]]
            med = [100 * statistics.median(a) for a in runs]
            err = [[m - 100 * min(a) for m, a in zip(med, runs)], [100 * max(a) - m for m, a in zip(med, runs)]]
            ax.errorbar(dims + [head_dim], med, yerr=err, marker="o", color=f"C{i}", capsize=3, label=f"{pairs} pairs")
            ax.axhline(100 * statistics.median(accuracy["sliding"][pairs]), color=f"C{i}", linestyle=":", alpha=0.8,
                       label=f"{pairs} pairs, sliding window")
        ax.set_xscale("log", base=2)
        ax.set_xticks(dims + [head_dim], [str(r) for r in dims] + [f"{head_dim}\n(full)"])
        ax.minorticks_off()
        ax.set(title=title, xlabel="far dimension")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy beyond the window, %")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", bbox_to_anchor=(0.5, 0.05),
               ncol=len(pairs_list), fontsize=8)
    fig.text(0.5, 0.015, f"points: the median over {n_seeds} seeds; bars: the lowest and highest seed; dotted: a sliding "
             "window (no far tier) at that many pairs", ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.2, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


QUICK = dict(n_layer=2, n_head=4, n_embd=64, block_size=128, window=16, far_dim=4, batch_size=8,
             max_iters=300, eval_interval=50, warmup_iters=20, finetune_iters=50)
CAPACITY_QUICK = dict(pairs=[4, 16], dims=[2, 8], tied_dims=[4], seeds=1)
FINETUNE_QUICK = dict(max_iters=2, eval_interval=1, eval_iters=1, seeds=1, block_size=64, batch_size=1, window=16)
RECALL_QUICK = dict(block_size=64, window=8, max_iters=600, eval_interval=200, train_seqs=5000, val_seqs=200,
                    seeds=3)


# ----------------------------------------------------------------------------------------

@torch.no_grad()
def perplexity(model, ids, context, windows, ctx):
    """exp(mean loss) over `windows` consecutive windows of `context` + 1 tokens, every token
    of each scored with the context its window gives it (the first ones little)."""
    total, start = 0.0, time.time()
    for w in range(windows):
        x = torch.tensor([ids[w * (context + 1):(w + 1) * (context + 1)]])
        with ctx:
            total += model(x[:, :-1], targets=x[:, 1:])[1].item()
        if (w + 1) % 10 == 0 or w + 1 == windows:
            left = (time.time() - start) / (w + 1) * (windows - w - 1)
            print(f"context {context}: window {w + 1}/{windows}, perplexity so far {math.exp(total / (w + 1)):.2f}, "
                  f"{left / 60:.1f} min left", flush=True)
    return math.exp(total / windows)


def pretrained_rows(head_dim):
    """name -> (family, window, far_k_dim, far_v_dim, pair order) of bench.py pretrained: the
    full model, sliding windows, DAR by each pair order, its far values 16 / 32 / 64 (64:
    thin keys, far keys only), its far keys, and uniform reduction (window 0)."""
    d = head_dim
    rows = {"full": ("full attention", None, d, d, None)}
    for W in (256, 512, 704, 1024):
        rows[f"sliding {W}"] = ("sliding window", W, 0, 0, "score")
    for pairs in ("score", "low"):
        for W in (64, 128, 256):
            rows[f"dar {pairs} W{W} k16 v16"] = (f"DAR k 16 + v 16, pairs by {pairs}", W, 16, 16, pairs)
    rows["dar high W64 k16 v16"] = ("DAR k 16 + v 16, pairs by high", 64, 16, 16, "high")
    for k, v in ((16, 32), (16, 64), (8, 64), (8, 16), (32, 32)):
        family = "thin keys (W 64, values whole)" if v == d else "DAR W 64, other far dims, by score"
        rows[f"dar score W64 k{k} v{v}"] = (family, 64, k, v, "score")
    for k in (16, 32):
        rows[f"uniform k{k} v{k}"] = ("uniform (window 0)", 0, k, k, "score")
    return rows


def bench_pretrained(args):
    """SmolLM2-135M on Shakespeare's validation split, training-free: perplexity and KV bytes
    at each context for full attention, sliding windows and DAR conversions (calibrated on
    the train split); decode step time and time to first token against the static peer."""
    import smollm2
    device = checkpoint.pick_device(args.device)
    ctx, dtype = checkpoint.autocast(device)
    block_size = max(args.contexts + args.lengths) + args.warmup + args.steps
    model = smollm2.from_gguf(block_size=block_size, device=device)
    cfg = model.config
    tokenizer = smollm2.GGUFTokenizer()
    ids = smollm2.shakespeare_ids(tokenizer, "val")
    rows = pretrained_rows(cfg.head_dim)
    unknown = sorted(set(args.only or []) - set(rows))
    if unknown:
        sys.exit(f"error: --only {' '.join(unknown)}: not a row (choices: {', '.join(rows)})")
    table, results = [], {"perplexity": [], "decode": [], "prefill": []}
    for name, (family, W, k, v, pairs) in rows.items():
        if args.only and name not in args.only:
            continue
        t0 = time.time()
        dar_model = model if W is None else smollm2.to_dar(model, tokenizer, W, k, v, pairs, args.calibration)
        for T in args.contexts:
            windows = min(len(ids) // (T + 1), max(1, args.tokens // T))
            ppl = perplexity(dar_model, ids, T, windows, ctx)
            regime = sliced(T if W is None else W, k, v)
            ratio = kv_ratio(T, {**regime, "n_kv_head": cfg.n_kv_head}, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head)
            kv_mib = ratio * cfg.n_layer * 2 * cfg.n_kv_head * cfg.head_dim * T * 4 / 2**20
            results["perplexity"].append({"name": name, "family": family, "T": T, "window": regime["window"],
                                          "far_k_dim": k, "far_v_dim": v, "pairs": pairs, "perplexity": ppl,
                                          "tokens": windows * T, "kv_ratio": ratio, "kv_mib": kv_mib})
            table.append([name, T, windows * T, f"{ppl:.2f}", f"{ratio:.3f}", f"{kv_mib:.1f}",
                          f"{time.time() - t0:.0f}"])
            print(markdown(["row", "context", "tokens scored", "perplexity", "KV bytes vs full",
                            "KV MiB (fp32)", "seconds"], table[-1:]).splitlines()[-1], flush=True)
    tables = [markdown(["row", "context", "tokens scored", "perplexity", "KV bytes vs full",
                        "KV MiB held at the context (fp32)", "seconds"], table)]
    if args.lengths:
        tables += pretrained_speed(args, model, dtype, device, ctx, results)
    report(args, "pretrained", tables, results)
    plot_pretrained(results["perplexity"], os.path.join(args.out_dir, "pretrained.png"))


def plot_pretrained(points, path):
    """Perplexity against KV bytes, one panel per context: a curve per family, full a point.
    Points above 3x full attention's perplexity sit on the top edge as triangles, their value
    in the legend."""
    plt = pyplot()
    if plt is None or not points:
        return
    contexts = sorted({p["T"] for p in points})
    fig, axes = plt.subplots(1, len(contexts), figsize=(5.6 * len(contexts) + 2.8, 4.4), squeeze=False)
    for ax, T in zip(axes[0], contexts):
        families = {}
        for p in points:
            if p["T"] == T:
                families.setdefault(p["family"], []).append(p)
        full = min(p["perplexity"] for p in points if p["T"] == T and p["window"] >= T and p["far_k_dim"] > 0)
        top = 3 * full
        for i, (family, members) in enumerate(families.items()):
            members.sort(key=lambda p: p["kv_ratio"])
            x = [p["kv_ratio"] for p in members]
            y = [min(p["perplexity"], top) for p in members]
            clipped = [p for p in members if p["perplexity"] > top]
            label = family + "".join(f" [{p['perplexity']:.0f} at {p['kv_ratio']:.2f}]" for p in clipped)
            ax.plot(x, y, color=f"C{i}", label=label, marker="o", markersize=5 if len(members) > 1 else 9)
            for p in clipped:
                ax.plot(p["kv_ratio"], top, marker="^", markersize=10, color=f"C{i}")
        ax.set(title=f"SmolLM2-135M, context {T}", xlabel="KV bytes held, vs full attention",
               ylabel="perplexity, Shakespeare val", ylim=(0.9 * full, 1.05 * top))
        ax.grid(alpha=0.3)
    axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def bench_finetune(args):
    """SmolLM2-135M fine-tuned on Shakespeare in its own tokens (data/prepare.py --tokenizer
    smollm2), as full attention (the control) and as a DAR conversion, identically (same
    batches, steps, learning rate and seed): validation perplexity over steps, on each seed,
    and how much of the training-free gap to the control the fine-tune closes."""
    if args.quick:
        for name, value in FINETUNE_QUICK.items():
            setattr(args, name, value)
    if args.window >= args.block_size:
        sys.exit(f"error: --window {args.window} >= --block_size {args.block_size}: DAR would be full attention")
    tiers = ["--window", args.window, "--far_k_dim", args.far_k_dim, "--far_v_dim", args.far_v_dim,
             "--pairs", args.pairs]
    schedule = ["--init_from", "smollm2", "--dataset", args.dataset, "--max_iters", args.max_iters,
                "--eval_interval", args.eval_interval, "--eval_iters", args.eval_iters, "--block_size",
                args.block_size, "--batch_size", args.batch_size, "--learning_rate", args.learning_rate,
                "--min_lr", args.learning_rate, "--sample_tokens", 0, "--log_interval", args.log_interval,
                "--ckpt_interval", args.max_iters + 1, "--device", args.device, "--overwrite"]
    seeds = [args.seed + i for i in range(args.seeds)]
    curves = {"full": [], "dar": []}   # per seed: [(iter, val perplexity), ...]
    for seed in seeds:
        for name, extra in (("full", []), ("dar", tiers)):
            out_dir = os.path.join(args.out_dir, "finetune", f"{name}_seed_{seed}")
            print(f"\n=== {out_dir} ===", flush=True)
            train.main([str(a) for a in schedule + extra + ["--seed", seed, "--out_dir", out_dir]])
            with open(os.path.join(out_dir, "eval_log.jsonl")) as f:
                curves[name].append([(e["iter"], math.exp(e["val_loss"])) for e in map(json.loads, f)])
            for path in glob.glob(os.path.join(out_dir, "ckpt_*.pt")):   # 1.6 GB each: the curve is kept
                os.remove(path)
    rows, closed = [], []
    for i, seed in enumerate(seeds):
        full = curves["full"][i]
        dar_curve = curves["dar"][i]
        before = dar_curve[0][1] / full[0][1] - 1
        after = dar_curve[-1][1] / full[-1][1] - 1
        closed.append(1 - after / before if before > 0.001 else None)   # (no gap: nothing to close)
        rows.append([seed, f"{full[0][1]:.2f}", f"{dar_curve[0][1]:.2f}", f"{100 * before:+.1f}%", f"{full[-1][1]:.2f}",
                     f"{dar_curve[-1][1]:.2f}", f"{100 * after:+.1f}%",
                     "-" if closed[-1] is None else f"{100 * closed[-1]:.0f}%"])
    n = args.max_iters
    table = markdown(["seed", "full, before", "DAR, before", "gap", f"full after {n} iters", f"DAR after {n} iters",
                      "gap", "gap closed"], rows)
    curve_rows = [[it] + [f"{curves[name][s][j][1]:.2f}" for s in range(len(seeds)) for name in curves]
                  for j, (it, _) in enumerate(curves["full"][0])]
    curve_table = markdown(["iter"] + [f"{name} seed {seed}" for seed in seeds for name in curves], curve_rows)
    report(args, "finetune", [table, "validation perplexity over steps:\n\n" + curve_table],
           {"seeds": seeds, "curves": curves, "gap_closed": closed})
    plot_finetune(curves, seeds, args, os.path.join(args.out_dir, "finetune.png"))


def plot_finetune(curves, seeds, args, path):
    """Validation perplexity against iteration: the control solid, DAR dashed, a colour a seed."""
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7.6, 4.2))
    for s, seed in enumerate(seeds):
        for name, style in (("full", "-"), ("dar", "--")):
            label = "full attention" if name == "full" else f"DAR, window {args.window}, k {args.far_k_dim} + v {args.far_v_dim}"
            ax.plot(*zip(*curves[name][s]), linestyle=style, marker=".", color=f"C{s}", label=f"{label}, seed {seed}")
    ax.set(title="SmolLM2-135M fine-tuned on Shakespeare (lower is better)", xlabel="iteration",
           ylabel="validation perplexity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


GPU_QUICK = dict(max_iters=2, decode_lengths=[16], n_embd=16)


def bench_gpu(args):
    """The CUDA path in one table (about 6 minutes on one GPU; `--device cpu --quick` tries
    it out here): cached = uncached in bfloat16 for each regime family; train.py's CUDA
    defaults (bf16 autocast) for --max_iters iterations with and without --compile (ms an
    iteration, peak memory, losses); decode and time to first token against the static
    peer (bench.py decode, batch 1 and 8)."""
    if args.quick:
        for name, value in GPU_QUICK.items():
            setattr(args, name, value)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: bench.py gpu needs a CUDA device (--device cpu --quick tries it out without one)")
    rows = [["cached = uncached, bfloat16", regime, f"max |logit diff| {diff:.3g}", "ok" if diff < 0.1 else "FAIL"]
            for regime, diff in cached_vs_uncached_bf16(args.device, args.n_embd).items()]
    for compiled in (False, True):
        rows.append(gpu_training_row(args, compiled))
    decode = ["decode", "--device", args.device, "--batch_sizes", "1", "8", "--lengths", *map(str, args.decode_lengths),
              "--prefill_lengths", str(max(args.decode_lengths)), "--steps", "10", "--warmup", "3", "--prefill_repeats",
              "3", "--sample_repeats", "1", "--sample_tokens", "8", "--sample_prompt", "8", "--kv_heads", "0",
              "--out_dir", os.path.join(args.out_dir, "gpu")]
    main(decode)
    with open(os.path.join(args.out_dir, "gpu", "decode.json")) as f:
        measured = json.load(f)
    for r in measured["rows"]:
        if r["regime"] in ("full", "dar", "sliding"):
            rows.append([f"decode step, B {r['B']}, T {r['T']}", r["regime"], f"{r['ms_per_step']:.2f} ms",
                         f"{r['vs_static']:.2f}x static"])
    for r in measured["prefill"]:
        if r["regime"] in ("full", "dar"):
            rows.append([f"time to first token, T {r['T']}", r["regime"], f"{r['ms']:.1f} ms", f"{r['vs_static']:.2f}x static"])
    name = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    report(args, "gpu", [f"device: {name}, torch {torch.__version__}\n\n" + markdown(["check", "case", "measured", ""], rows)],
           {"rows": rows})


@torch.no_grad()
def cached_vs_uncached_bf16(device, n_embd):
    """Per regime, a random bf16 model's logits decoded with the cache against its uncached
    forward, on the device."""
    families = {"dar": sliced(8, 4, 4), "latent": latent(8, 8), "rope": {**sliced(8, 4, 4), "rope": True},
                "gqa": {**sliced(8, 4, 4), "n_kv_head": 2}, "kv_shift": {**sliced(8, 4, 4), "kv_shift": True}}
    diffs = {}
    for regime, tiers in families.items():
        torch.manual_seed(0)
        model = dar.GPT(dar.GPTConfig(vocab_size=65, block_size=64, n_layer=2, n_head=2, n_embd=n_embd,
                                      **tiers)).to(device=device, dtype=torch.bfloat16).eval()
        idx = torch.randint(65, (2, 48), device=device)
        want = model(idx, targets=idx)[0][:, 15:].float()
        cache = model.new_cache(2)
        got = [model(idx[:, :16], cache=cache)[0]] + [model(idx[:, t:t + 1], cache=cache)[0] for t in range(16, 48)]
        diffs[regime] = (torch.cat(got, 1).float() - want).abs().max().item()
    return diffs


def gpu_training_row(args, compiled):
    """train.py with its CUDA defaults for --max_iters iterations: ms an iteration (the
    median of its progress lines), peak memory, first and last losses."""
    import contextlib
    import io
    out_dir = os.path.join(args.out_dir, "gpu", "compiled" if compiled else "eager")
    flags = ["--dataset", args.dataset, "--device", args.device, "--max_iters", args.max_iters, "--eval_interval", args.max_iters, "--eval_iters",
             "20", "--log_interval", max(1, args.max_iters // 10), "--sample_tokens", 0, "--out_dir", out_dir,
             "--overwrite"] + (["--compile"] if compiled else [])
    if args.quick:
        flags += ["--n_layer", 1, "--n_head", 2, "--n_embd", 16, "--block_size", 32, "--batch_size", 2, "--eval_iters", 1]
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    printed = io.StringIO()
    start = time.time()
    with contextlib.redirect_stdout(printed):
        train.main([str(f) for f in flags])
    seconds = time.time() - start
    lines = printed.getvalue().splitlines()
    ms = [float(line.split(" ms/iter")[0].split()[-1]) for line in lines if " ms/iter" in line]
    evals = [line for line in lines if line.startswith("eval ")]
    peak = torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else float("nan")
    label = "CUDA defaults" if args.device == "cuda" else "tiny (--quick)" if args.quick else "defaults"
    return [f"train.py, {label}, bf16 on CUDA, {args.max_iters} iters", "compiled" if compiled else "eager",
            f"{statistics.median(ms[1:] or ms or [float('nan')]):.1f} ms/iter, peak {peak:.0f} MiB, {seconds:.0f} s",
            " -> ".join(e.split(", ")[1].split(" (")[0] for e in (evals[0], evals[-1]))]


def pretrained_speed(args, model, dtype, device, ctx, results):
    """dar's full cache against the static peer on SmolLM2: one-token steps after a prompt
    of T tokens (interleaved, median), and the prefill of T tokens."""
    tokens = torch.randint(model.config.vocab_size, (1, max(args.lengths)), device=device)
    decode_rows, prefill_rows = [], []
    for T in args.lengths:
        caches = {"static": StaticCache(model.config, 1, getattr(torch, dtype), device), "dar full": model.new_cache(1)}
        forwards = {"static": lambda idx, c=caches["static"]: c.forward(model, idx),
                    "dar full": lambda idx, c=caches["dar full"]: model(idx, cache=c)[0]}
        prefill = {name: [] for name in caches}
        for _ in range(args.prefill_repeats):   # time to first token, alternated
            for name, cache in caches.items():
                cache.reset()
                start = time.perf_counter()
                with torch.no_grad(), ctx:
                    forwards[name](tokens[:, :T])
                prefill[name].append(time.perf_counter() - start)
        def step(forward):   # one token after what the cache holds
            with torch.no_grad(), ctx:
                forward(tokens[:, :1])
        steps = median_times({name: functools.partial(step, f) for name, f in forwards.items()}, args.steps,
                             args.warmup, device)
        for name in caches:
            decode_rows.append([T, name, f"{1000 * steps[name]:.1f}", f"{steps[name] / steps['static']:.2f}"])
            ms = 1000 * statistics.median(prefill[name])
            prefill_rows.append([T, name, f"{ms:.0f}", f"{statistics.median(prefill[name]) / statistics.median(prefill['static']):.2f}"])
            results["decode"].append({"T": T, "regime": name, "ms_per_step": 1000 * steps[name]})
            results["prefill"].append({"T": T, "regime": name, "ms": ms})
    return [markdown(["context T", "cache", "ms per token step", "vs static"], decode_rows),
            markdown(["prompt T", "cache", "ms to first token", "vs static"], prefill_rows)]


# What the flags that several sub-commands share mean, for --help.
MEANING = dict(
    n_layer="transformer blocks of every model", n_head="attention heads per block",
    n_embd="model width (head_dim = n_embd / n_head)", batch_size="sequences per training batch",
    window="DAR's window: tokens at distance < window keep full dimensions",
    far_dim="far_k_dim = far_v_dim of the DAR rows (0: head_dim / 4)",
    device="auto (cuda, then mps, then cpu), cpu, cuda, mps", out_dir="where the JSON, the runs and the PNGs go",
    vocab_size="vocabulary of the random tokens timed", block_size="the longest context of every model, in tokens",
    max_iters="training iterations of every run", eval_interval="evaluate the val loss every this many iterations",
    eval_iters="batches per evaluation", warmup_iters="iterations of linear learning-rate warm-up",
    learning_rate="peak learning rate (AdamW)", weight_decay="AdamW weight decay, on matrices only",
    log_interval="print train.py's progress line every this many iterations",
    seed="the first seed: seeds --seed, --seed + 1, ... where a row has several",
    train_seqs="recall sequences generated for training", val_seqs="recall sequences generated to measure accuracy")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    d = "(default: %(default)s)"
    attention = sub.add_parser("attention", help=bench_attention.__doc__)
    attention.add_argument("--out_dir", default="bench_out", help="where bench.py recall wrote its runs " + d)
    attention.add_argument("--window", type=int, default=16, help="count the answers this far from their pair " + d)
    attention.add_argument("--sequences", type=int, default=200, help="validation sequences read " + d)
    tiers = sub.add_parser("tiers", help=bench_tiers.__doc__)
    tiers.add_argument("--block_size", type=int, default=96, help="tokens in the context drawn " + d)
    tiers.add_argument("--window", type=int, default=16, help="tokens drawn whole, at the end " + d)
    tiers.add_argument("--head_dim", type=int, default=32, help="coordinates of the one head drawn " + d)
    tiers.add_argument("--far_dim", type=int, default=8, help="far_k_dim = far_v_dim: coordinates every token keeps " + d)
    tiers.add_argument("--vocab_size", type=int, default=65, help="vocabulary of the random model drawn " + d)
    tiers.add_argument("--out_dir", default="bench_out", help="where tiers.png goes " + d)
    for name, size in (("speed", (4, 4, 128, 16, 64, 8)), ("decode", (4, 4, 256, None, 128, 16)),
                       ("quality", (4, 4, 128, 8, 32, 0)), ("recall", (2, 2, 64, 32, 16, 0)),
                       ("capacity", (1, 2, 64, 32, 12, None))):
        s = sub.add_parser(name, help=globals()[f"bench_{name}"].__doc__)
        for flag, default in zip(("n_layer", "n_head", "n_embd", "batch_size", "window", "far_dim"), size):
            if default is not None:   # decode has --batch_sizes, capacity --dims instead
                s.add_argument(f"--{flag}", type=int, default=default, help=f"{MEANING[flag]} {d}")
        for flag, default in (("device", "auto"), ("out_dir", "bench_out")):
            s.add_argument(f"--{flag}", default=default, help=f"{MEANING[flag]} {d}")
        s.add_argument("--vocab_size", type=int, default=65, help=f"{MEANING['vocab_size']} {d}")
    speed, decode, quality, recall, capacity = (sub.choices[n] for n in ("speed", "decode", "quality", "recall",
                                                                           "capacity"))
    speed.add_argument("--block_size", type=int, default=256, help="the training step's sequence length " + d)
    speed.add_argument("--repeats", type=int, default=7, help="timed training steps per variant (the median) " + d)
    speed.add_argument("--warmup", type=int, default=2, help="untimed training steps per variant first " + d)
    speed.add_argument("--gen_block_size", type=int, default=1024, help="the context of the generation rows " + d)
    speed.add_argument("--gen_tokens", type=int, default=1023, help="a 1-token prompt then fills gen_block_size " + d)
    speed.add_argument("--gen_repeats", type=int, default=3, help="timed generations per variant (the median) " + d)
    decode.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8], help="batch sizes of the decode "
                        "rows " + d)
    decode.add_argument("--kv_heads", type=int, default=1, help="key/value heads of the grouped-query rows "
                        "(full gqa, dar gqa, each against a static cache of as many heads; 0: none) " + d)
    decode.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 2048, 4096], help="context lengths "
                        "of the decode rows (block_size is the longest) " + d)
    decode.add_argument("--steps", type=int, default=40, help="one-token steps timed, variants interleaved " + d)
    decode.add_argument("--warmup", type=int, default=5, help="untimed steps per variant before the timed ones " + d)
    decode.add_argument("--prefill_chunk", type=int, default=512, help="the decode rows' contexts are filled "
                        "in chunks of this many tokens " + d)
    decode.add_argument("--prefill_lengths", type=int, nargs="+", default=[1024, 4096],
                        help="prompt lengths for time to first token " + d)
    decode.add_argument("--prefill_repeats", type=int, default=5, help="timed prefills per variant (the median) " + d)
    decode.add_argument("--masked_prefill", nargs="*", default=["dar", "dar latent"], help="regimes whose prompts "
                        "are also timed on dar.py's masked reference path, as 'NAME masked' " + d)
    decode.add_argument("--num_samples", type=int, default=8, help="batched against sequential sampling " + d)
    decode.add_argument("--sample_tokens", type=int, default=256, help="tokens generated per sample there " + d)
    decode.add_argument("--sample_prompt", type=int, default=256, help="prompt tokens of those samples " + d)
    decode.add_argument("--sample_repeats", type=int, default=3, help="timed sampling runs (the median) " + d)
    for s, (block, iters, interval, warmup, lr, wd) in ((quality, (256, 1500, 250, 100, 1e-3, 0.1)),
                                                         (recall, (128, 1500, 500, 100, 3e-3, 0.1)),
                                                         (capacity, (96, 500, 250, 50, 3e-3, 0.1))):
        s.add_argument("--block_size", type=int, default=block, help=f"{MEANING['block_size']} {d}")
        s.add_argument("--max_iters", type=int, default=iters, help=f"{MEANING['max_iters']} {d}")
        s.add_argument("--eval_interval", type=int, default=interval, help=f"{MEANING['eval_interval']} {d}")
        s.add_argument("--eval_iters", type=int, default=20, help=f"{MEANING['eval_iters']} {d}")
        s.add_argument("--warmup_iters", type=int, default=warmup, help=f"{MEANING['warmup_iters']} {d}")
        s.add_argument("--learning_rate", type=float, default=lr, help=f"{MEANING['learning_rate']} {d}")
        s.add_argument("--weight_decay", type=float, default=wd, help=f"{MEANING['weight_decay']} {d}")
        s.add_argument("--log_interval", type=int, default=50, help=f"{MEANING['log_interval']} {d}")
        s.add_argument("--seed", type=int, default=1337, help=f"{MEANING['seed']} {d}")
        s.add_argument("--resume", action="store_true", help="continue each run from the ckpt_last.pt in its folder, "
                       "if there is one: an interrupted bench picks up where it stopped, a finished run is only "
                       "read (the folders must come from this revision) " + d)
    quality.add_argument("--dataset", default=prepare.DEFAULT_DATASET, help="a prepared dataset: a folder under "
                         "data/ or a path " + d)
    quality.add_argument("--finetune_iters", type=int, default=150, help="fine-tune iterations after each "
                         "conversion " + d)
    quality.add_argument("--finetune_lr", type=float, default=3e-4, help="their peak learning rate " + d)
    quality.add_argument("--calibration_seqs", type=int, default=16, help="sequences in the PCA conversion's "
                         "calibration batch " + d)
    quality.add_argument("--quick", action="store_true", help=f"smaller sizes, to try the benchmark out: {QUICK}")
    quality.add_argument("--seeds", type=int, default=1, help="runs per regime: seeds --seed, --seed + 1, ... " + d)
    quality.add_argument("--only", nargs="+", help="train only these regimes (default: all; the conversions "
                                                   "run only when full is among them)")
    recall.add_argument("--only", nargs="+", help="train only these rows, by the names of recall_regimes "
                        f"(default: the README's rows, {RECALL_ROWS}, and the --extra ones)")
    recall.add_argument("--pairs", type=int, default=8, help="pairs per sequence for the regimes " + d)
    recall.add_argument("--seeds", type=int, default=10, help="runs per regime: seeds --seed, --seed + 1, ... " + d)
    recall.add_argument("--threads", type=int, default=1, help="torch threads per run, the same for every run: "
                        "a seed's result can move with the thread count " + d)
    recall.add_argument("--extra", nargs="+", default=[], metavar="NAME=JSON", help="more rows: a name and GPTConfig "
                        """fields, e.g. 'k8 v12={"window": 16, "far_k_dim": 8, "far_v_dim": 12}' (default: none)""")
    recall.add_argument("--sweep_pairs", type=int, nargs="*", default=[],
                        help="also run the sweep regimes at these numbers of pairs (default: none)")
    recall.add_argument("--sweep_regimes", nargs="+", default=["full", "dar hd/8"], help="the rows run at each "
                        "--sweep_pairs " + d)
    for s, val_seqs in ((recall, 500), (capacity, 200)):
        s.add_argument("--kv_shift", action=argparse.BooleanOptionalAction, default=True,
                       help="in every regime: one layer can then match a key and copy the token after it; "
                            "without it this size did not learn recall in 2000 iterations " + d)
        s.add_argument("--train_seqs", type=int, default=20000, help=f"{MEANING['train_seqs']} {d}")
        s.add_argument("--val_seqs", type=int, default=val_seqs, help=f"{MEANING['val_seqs']} {d}")
    recall.add_argument("--quick", action="store_true", help="smaller sizes and 3 seeds a row, to try the "
                        f"benchmark out: {RECALL_QUICK}")
    capacity.add_argument("--pairs", type=int, nargs="+", default=[2, 4, 8, 16], help="numbers of key-value pairs "
                          "per sequence, one column each " + d)
    capacity.add_argument("--dims", type=int, nargs="+", default=[1, 2, 4, 8, 16],
                          help="far_k_dim (values full) and far_v_dim (keys full) " + d)
    capacity.add_argument("--tied_dims", type=int, nargs="+", default=[2, 4, 8], help="far_k_dim = far_v_dim " + d)
    capacity.add_argument("--seeds", type=int, default=3, help="runs per cell, seeds --seed, --seed + 1, ... " + d)
    capacity.add_argument("--quick", action="store_true", help=f"one seed and a subset, to try it out: {CAPACITY_QUICK}")
    pretrained = sub.add_parser("pretrained", help=bench_pretrained.__doc__)
    pretrained.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048], help="contexts at which "
                            "the perplexity is measured, in windows of that many tokens " + d)
    pretrained.add_argument("--tokens", type=int, default=8192, help="tokens scored per context and row, the "
                            "same for every row (the validation split holds 157,750) " + d)
    pretrained.add_argument("--calibration", type=int, default=1024, help="tokens of the train split the "
                            "conversions calibrate on " + d)
    pretrained.add_argument("--only", nargs="+", help="measure only these rows (default: all; names as "
                            "printed, e.g. full 'dar score W64 k16 v16')")
    pretrained.add_argument("--lengths", type=int, nargs="*", default=[1024, 4096], help="contexts of the "
                            "decode and prefill timings (none: no timing) " + d)
    pretrained.add_argument("--steps", type=int, default=20, help="one-token steps timed, alternated " + d)
    pretrained.add_argument("--warmup", type=int, default=3, help="untimed steps before them " + d)
    pretrained.add_argument("--prefill_repeats", type=int, default=3, help="timed prefills per cache " + d)
    for flag, default in (("device", "auto"), ("out_dir", "bench_out")):
        pretrained.add_argument(f"--{flag}", default=default, help=f"{MEANING[flag]} {d}")
    finetune = sub.add_parser("finetune", help=bench_finetune.__doc__)
    for flag, default, meaning in (
            ("window", 128, "DAR: tokens at distance < window keep full keys and values"),
            ("far_k_dim", 16, "DAR: key coordinates (whole rotary pairs) a distant token keeps"),
            ("far_v_dim", 16, "DAR: value coordinates a distant token keeps"),
            ("max_iters", 40, "fine-tune iterations of every run"),
            ("eval_interval", 10, "evaluate the val loss every this many iterations"),
            ("eval_iters", 4, "batches per split in an evaluation (the same batches for both models)"),
            ("block_size", 1024, "tokens per training sequence"), ("batch_size", 1, "sequences per iteration"),
            ("seeds", 2, "runs per model: seeds --seed, --seed + 1, ..."), ("seed", 1337, "the first seed"),
            ("log_interval", 5, "print train.py's progress line every this many iterations")):
        finetune.add_argument(f"--{flag}", type=int, default=default, help=f"{meaning} {d}")
    finetune.add_argument("--pairs", default="score", choices=["score", "high", "low"], help="which rotary "
                          "pairs the far keys keep (smollm2.to_dar) " + d)
    finetune.add_argument("--learning_rate", type=float, default=3e-5, help="AdamW's constant learning rate, "
                          "both models " + d)
    finetune.add_argument("--dataset", default="shakespeare_smollm2", help="a dataset prepared with "
                          "--tokenizer smollm2 " + d)
    finetune.add_argument("--quick", action="store_true", help=f"a tiny run, to try it out: {FINETUNE_QUICK}")
    for flag, default in (("device", "auto"), ("out_dir", "bench_out")):
        finetune.add_argument(f"--{flag}", default=default, help=f"{MEANING[flag]} {d}")
    gpu = sub.add_parser("gpu", help=bench_gpu.__doc__)
    gpu.add_argument("--device", default="cuda", help="the device checked " + d)
    gpu.add_argument("--max_iters", type=int, default=300, help="training iterations of each train.py run " + d)
    gpu.add_argument("--decode_lengths", type=int, nargs="+", default=[1024, 4096], help="decode contexts " + d)
    gpu.add_argument("--n_embd", type=int, default=64, help="width of the cached = uncached models " + d)
    gpu.add_argument("--dataset", default=prepare.DEFAULT_DATASET, help="train.py's dataset (prepared here if it "
                     "is the default and missing: data/cache must hold the corpus where there is no network) " + d)
    gpu.add_argument("--quick", action="store_true", help=f"tiny sizes, to try it out: {GPU_QUICK}")
    gpu.add_argument("--out_dir", default="bench_out", help=f"{MEANING['out_dir']} {d}")
    args = p.parse_args(argv)
    if args.command in ("speed", "decode") and args.far_dim == 0:
        p.error("--far_dim must be > 0")   # quality: 0 means head_dim / 4; recall sets its own
    prefill.enable()   # cached prompts on CPU by the split path (it falls back elsewhere)
    globals()[f"bench_{args.command}"](args)


if __name__ == "__main__":
    main()
