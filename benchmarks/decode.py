"""
Decoding: the decode step and time to first token against a static full cache (the peer a
user would run: preallocated, one fused causal kernel), KV bytes, batched sampling.

    python bench.py decode
"""

import os
import sys

import torch
from torch.nn import functional as F

import cache_bytes
import checkpoint
import dar
from benchmarks import common


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
            raise ValueError(
                "the static peer turns rotary pairs in the usual order: rope_prefix='high'"
            )
        self.freqs = (
            config.rope_base ** -(torch.arange(0, d, 2, device=device).float() / d)
            if config.rope
            else None
        )

    def reset(self):
        self.length = 0

    @torch.no_grad()
    def forward(self, model, idx):
        """Append idx (B, n) and return the last position's logits (B, 1, vocab_size)."""
        (B, n), t, C = idx.shape, model.transformer, model.config.n_embd
        start, end = self.length, self.length + n
        positions = torch.arange(start, end, device=idx.device)
        x = t.wte(idx) + (t.wpe(positions) if model.has_wpe else 0)
        causal = (
            None
            if n == 1 or start == 0
            else torch.ones(n, end, dtype=torch.bool, device=idx.device).tril(start)
        )
        kv = self.k.size(2) * self.k.size(-1)
        for layer, block in enumerate(t.h):
            q, k, v = (z.view(B, n, -1, self.k.size(-1)).transpose(1, 2)
                       for z in block.attn.c_attn(block.ln_1(x)).split([C, kv, kv], 2))
            if self.freqs is not None:
                q, k = self.rotate(q, positions), self.rotate(k, positions)
            self.k[layer, :, :, start:end], self.v[layer, :, :, start:end] = k, v
            y = F.scaled_dot_product_attention(
                q,
                self.k[layer, :, :, :end],
                self.v[layer, :, :, :end],
                attn_mask=causal,
                is_causal=start == 0 and n > 1,
                enable_gqa=q.size(1) != k.size(1),
            )
            x = x + block.attn.c_proj(y.transpose(1, 2).reshape(B, n, C))
            x = x + block.mlp(block.ln_2(x))
        self.length = end
        return model.lm_head(t.ln_f(x[:, [-1]]))

    def rotate(self, x, positions):
        """Pairs (2i, 2i + 1) of x (B, H, n, d) turned by position * freqs[i]."""
        angle = positions[:, None].float() * self.freqs
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack(
            [x1 * angle.cos() - x2 * angle.sin(), x1 * angle.sin() + x2 * angle.cos()], -1
        ).flatten(-2)


DECODE_HEADERS = [
    "B",
    "T",
    "regime",
    "ms/step",
    "vs static",
    "KV MiB held",
    "MiB allocated",
    "KV bytes vs full",
]


# The static peers and the full regime each stands for: grouped-query rows against a
# static cache of as many key/value heads.
PEERS = {"static": "full", "static gqa": "full gqa", "static rope": "full rope"}


def peer_of(name):
    if "gqa" in name:
        return "static gqa"
    return "static rope" if "rope" in name else "static"


def decode_row(r, results):
    """A row of the decode table; a static peer holds what its full regime holds."""
    full_name = PEERS.get(r["regime"], "full")
    full = next(f for f in results if (f["B"], f["T"], f["regime"]) == (r["B"], r["T"], full_name))
    held, allocated = (r.get(key, full[key]) / 2**20 for key in ("held_bytes", "allocated_bytes"))
    return [
        r["B"],
        r["T"],
        r["regime"],
        f"{r['ms_per_step']:.2f}",
        f"{r['vs_static']:.2f}",
        f"{held:.2f}",
        f"{allocated:.2f}",
        f"{r.get('bytes_vs_full', 1.0):.3f}",
    ]


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
    configs = common.regimes(block_size, args.n_head, head_dim, args.window, args.far_dim)
    if args.kv_heads:   # grouped-query attention, as Llama-family models have it
        configs.update(
            {
                f"{name} gqa": {**configs[name], "n_kv_head": args.kv_heads}
                for name in ("full", "dar")
            }
        )
    if args.rope:   # rotary rows; the latent's far keys are rebuilt every step under RoPE
        rope = {"rope": True, "rope_prefix": "high"}   # the static peer's order of pairs
        configs.update({f"{name} rope": {**configs[name], **rope}
                        for name in ("full", "dar", "dar latent")})
    unknown = set(args.masked_prefill) - set(configs)
    if unknown:
        raise SystemExit(
            f"error: --masked_prefill {sorted(unknown)}: the regimes are {list(configs)}"
        )
    models = {
        name: common.model_for(args, c, block_size).to(device).eval() for name, c in configs.items()
    }
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
            held = {
                name: (cache_bytes.held(c), cache_bytes.allocated(c))
                for name, c in caches.items()
                if name not in PEERS
            }
            seconds = common.median_times(steps, args.steps, args.warmup, device)
            for name in caches:
                r = {"B": B, "T": T, "regime": name, "ms_per_step": 1000 * seconds[name],
                     "vs_static": seconds[name] / seconds[peer_of(name)]}
                if name not in PEERS:   # bytes at T, measured before the timed steps added tokens
                    ratio = common.kv_ratio(T, configs[name], args.n_embd, args.n_head)
                    at_block = common.kv_ratio(block_size, configs[name], args.n_embd, args.n_head)
                    full, full_allocated = held["full"]
                    r.update(
                        held_bytes=held[name][0],
                        allocated_bytes=held[name][1],
                        full_bytes=full,
                        bytes_vs_full=ratio,
                        formula_bytes=round(ratio * full),
                        formula_at_block_bytes=round(at_block * full_allocated),
                    )
                results.append(r)
            print(f"B={B} T={T} done", file=sys.stderr, flush=True)
    table = common.markdown(DECODE_HEADERS, [decode_row(r, results) for r in results])
    prefill = bench_prefill(args, models, new_caches(1), ctx, device)
    prefill_table = common.markdown(
        ["prompt T", "regime", "ms to first token", "vs static"],
        [[r["T"], r["regime"], f"{r['ms']:.1f}", f"{r['vs_static']:.2f}"] for r in prefill],
    )
    # several samples of one prompt: one batch (one prefill, rows copied) against one at a time
    model, prompt = models["dar"], torch.randint(
        args.vocab_size, (1, args.sample_prompt), device=device
    )
    def sample(batched):
        def run():
            with ctx:
                if batched:
                    list(
                        model.generate_stream(
                            prompt, args.sample_tokens, num_samples=args.num_samples
                        )
                    )
                else:
                    for _ in range(args.num_samples):
                        list(model.generate_stream(prompt, args.sample_tokens))
        return run
    sample_s = common.median_times(
        {"batched": sample(True), "sequential": sample(False)}, args.sample_repeats, 1, device
    )
    sample_table = common.markdown(
        [f"{args.num_samples} samples of {args.sample_tokens} tokens", "seconds", "speed-up"],
        [[name, f"{s:.2f}", f"{sample_s['sequential'] / s:.2f}x"] for name, s in sample_s.items()],
    )
    common.report(
        args,
        "decode",
        [
            table,
            "Time to first token (prefill of the whole prompt, batch 1):\n\n" + prefill_table,
            sample_table,
        ],
        {
            "rows": results,
            "prefill": prefill,
            "regimes": configs,
            "block_size": block_size,
            "sample_seconds": sample_s,
        },
    )
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
        runs.update(
            {
                f"{name} masked": timed_prefill(name, caches[name], True)
                for name in args.masked_prefill
            }
        )
        seconds = common.median_times(runs, args.prefill_repeats, 1, device)
        rows += [{"T": T, "regime": name, "ms": 1000 * s, "vs_static": s / seconds[peer_of(name)]}
                 for name, s in seconds.items()]
        print(f"prefill T={T} done", file=sys.stderr, flush=True)
    return rows


def plot_decode(results, prefill, configs, path):
    """Decode step time against context length at each batch size, time to first token
    against prompt length, and KV bytes held per sequence; each regime labelled with what a
    distant token keeps (configs: name -> GPTConfig fields)."""
    plt = common.pyplot()
    if plt is None:
        return
    batch_sizes = sorted({r["B"] for r in results})
    fig, axes = plt.subplots(1, len(batch_sizes) + 2, figsize=(4.2 * (len(batch_sizes) + 2), 4.6))
    for name, style, marker in (
        ("static", "k--", "."),
        ("full", "C0-", "."),
        ("dar", "C3-", "."),
        ("uniform", "C2-", "."),
        ("thin_keys", "C1-", "."),
        ("sliding", "C7-", "."),
        ("dar latent", "C3:", "s"),
        ("dar latent n/4", "C4-.", "^"),
        ("uniform latent", "C2:", "D"),
    ):
        label = (
            "static full cache (the peer)"
            if name == "static"
            else common.row_label(name, configs[name])
        )
        for ax, B in zip(axes, batch_sizes):
            rows = [r for r in results if r["regime"] == name and r["B"] == B]
            ax.plot(
                [r["T"] for r in rows],
                [r["ms_per_step"] for r in rows],
                style,
                marker=marker,
                markersize=5,
                label=label,
            )
            ax.set(
                title=f"decode step, batch {B}",
                xlabel="context length T",
                ylabel="ms per token step",
            )
        rows = [r for r in prefill if r["regime"] == name]
        axes[-2].plot(
            [r["T"] for r in rows],
            [r["ms"] for r in rows],
            style,
            marker=marker,
            markersize=5,
            label=label,
        )
        rows = [r for r in prefill if r["regime"] == f"{name} masked"]
        if rows:
            axes[-2].plot(
                [r["T"] for r in rows],
                [r["ms"] for r in rows],
                style,
                marker="x",
                alpha=0.5,
                label=f"{label}: masked reference path",
            )
        if name != "static":   # the peer holds what the full regime holds
            rows = [r for r in results if r["regime"] == name and r["B"] == batch_sizes[0]]
            axes[-1].plot(
                [r["T"] for r in rows],
                [r["held_bytes"] / r["B"] / 2**20 for r in rows],
                style,
                marker=marker,
                markersize=5,
                label=label,
            )
    axes[-2].set(
        title="time to first token, batch 1", xlabel="prompt length T", ylabel="ms (prefill)"
    )
    axes[-1].set(title="KV cache held per sequence", xlabel="context length T", ylabel="MiB")
    fig.legend(
        *axes[0].get_legend_handles_labels(), loc="lower center", bbox_to_anchor=(0.5, 0.06), ncol=3
    )
    fig.text(
        0.5,
        0.01,
        "the peer: a plain preallocated full cache (as gpt-fast and nanochat keep one) with"
        " nanoGPT's forward, written in benchmarks/decode.py apart from dar.py; lower is better",
        ha="center",
        fontsize=8,
    )
    for ax in axes:
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    fig.tight_layout(rect=(0, 0.22, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def add_parsers(sub):
    D = common.D
    decode = sub.add_parser("decode", help=common.summary(bench_decode))
    decode.set_defaults(run=bench_decode)
    common.add_model_flags(decode, (4, 4, 256, None, 128, 16), random_tokens=True)
    decode.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8],
                        help="batch sizes of the decode rows" + D)
    decode.add_argument("--kv_heads", type=int, default=1, help="key/value heads of the "
                        "grouped-query rows (full gqa, dar gqa, each against a static cache of "
                        "as many heads; 0: none)" + D)
    decode.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 2048, 4096],
                        help="context lengths of the decode rows (block_size is the longest)" + D)
    decode.add_argument("--steps", type=int, default=40,
                        help="one-token steps timed, variants interleaved" + D)
    decode.add_argument("--warmup", type=int, default=5,
                        help="untimed steps per variant before the timed ones" + D)
    decode.add_argument("--prefill_chunk", type=int, default=512, help="the decode rows' "
                        "contexts are filled in chunks of this many tokens" + D)
    decode.add_argument("--prefill_lengths", type=int, nargs="+", default=[1024, 4096],
                        help="prompt lengths for time to first token" + D)
    decode.add_argument("--prefill_repeats", type=int, default=5,
                        help="timed prefills per variant (the median)" + D)
    decode.add_argument("--masked_prefill", nargs="*", default=["dar", "dar latent"],
                        help="regimes whose prompts are also timed on dar.py's masked "
                        "reference path, as 'NAME masked'" + D)
    decode.add_argument("--rope", action="store_true", help="also rotary rows (full rope, dar "
                        "rope, dar latent rope, the latent's far keys rebuilt every step) "
                        "against a static cache that turns its keys")
    decode.add_argument("--num_samples", type=int, default=8,
                        help="batched against sequential sampling" + D)
    decode.add_argument("--sample_tokens", type=int, default=256,
                        help="tokens generated per sample there" + D)
    decode.add_argument("--sample_prompt", type=int, default=256,
                        help="prompt tokens of those samples" + D)
    decode.add_argument("--sample_repeats", type=int, default=3,
                        help="timed sampling runs (the median)" + D)
