"""
Training speed per regime, cached against uncached generation, and the picture of what the
two-tier cache holds (the README's first picture).

    python bench.py speed
    python bench.py tiers
"""

import os

import numpy as np
import torch

import cache_bytes
import checkpoint
import dar
from benchmarks import common


def bench_speed(args):
    """Training step time of each regime at one size, and greedy generation with the
    two-tier cache against nanoGPT's recompute-everything loop."""
    device, head_dim = checkpoint.pick_device(args.device), args.n_embd // args.n_head
    ctx, _ = checkpoint.autocast(device)
    x, y = (
        torch.randint(args.vocab_size, (args.batch_size, args.block_size), device=device)
        for _ in range(2)
    )
    steps, configs = {}, common.regimes(
        args.block_size, args.n_head, head_dim, args.window, args.far_dim
    )
    for name, regime in configs.items():
        model = common.model_for(args, regime, args.block_size).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        def step(model=model, optimizer=optimizer):
            with ctx:
                loss = model(x, y)[1]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        steps[name] = step
    step_s = common.median_times(steps, args.repeats, args.warmup, device)
    rows = [
        [
            name,
            configs[name]["window"],
            common.far_tier(configs[name]),
            f"{step_s[name] * 1000:.1f}",
            f"{step_s[name] / step_s['full']:.2f}x",
        ]
        for name in configs
    ]
    train_table = common.markdown(["regime", "window", "far tier", "ms/step", "vs full"], rows)

    model = common.model_for(args, configs["dar"], args.gen_block_size).to(device).eval()
    prompt = torch.zeros(1, 1, dtype=torch.long, device=device)
    def generator(use_cache):
        def run():
            with ctx:
                model.generate(prompt, args.gen_tokens, top_k=1, use_cache=use_cache)
        return run
    gen_s = common.median_times(
        {"two-tier cache": generator(True), "no cache (nanoGPT)": generator(False)},
        args.gen_repeats,
        1,
        device,
    )
    rows = [
        [name, f"{s:.2f}", f"{args.gen_tokens / s:.0f}", f"{gen_s['no cache (nanoGPT)'] / s:.1f}x"]
        for name, s in gen_s.items()
    ]
    gen_table = common.markdown(["greedy generation", "seconds", "tokens/s", "speed-up"], rows)
    common.report(
        args,
        "speed",
        [train_table, gen_table],
        {"step_seconds": step_s, "generate_seconds": gen_s, "regimes": configs},
    )


def bench_tiers(args):
    """What the two-tier cache holds, drawn: for a filled context, which coordinates of each
    token's key and value are kept (read from the cache's buffers), and the bytes."""
    config = dar.GPTConfig(
        vocab_size=args.vocab_size,
        block_size=args.block_size,
        n_layer=1,
        n_head=1,
        n_embd=args.head_dim,
        window=args.window,
        far_k_dim=args.far_dim,
        far_v_dim=args.far_dim,
    )
    model, cache = dar.GPT(config).eval(), dar.KVCache(config, 1)
    with torch.no_grad():
        model(torch.randint(args.vocab_size, (1, args.block_size)), cache=cache)
    layer, T = cache.layers[0], cache.length
    # (coordinate, position) -> 1 in the store every token writes on arrival, 2 in the ring,
    # 0 not kept
    held = {}
    for name, kept, rest in (
        ("key", layer.kept_k, layer.ring_k),
        ("value", layer.kept_v, layer.ring_v),
    ):
        grid = np.zeros((args.head_dim, T))
        grid[:kept.size(-1), :] = 1
        grid[kept.size(-1):, T - rest.size(2):] = 2
        held[name] = grid
    ratio = cache_bytes.held(cache) / cache_bytes.full(cache)
    summary = {
        "T": T,
        "window": args.window,
        "head_dim": args.head_dim,
        "far_dim": args.far_dim,
        "held_bytes": cache_bytes.held(cache),
        "full_bytes": cache_bytes.full(cache),
        "ratio": ratio,
    }
    common.report(
        args,
        "tiers",
        [
            common.markdown(
                ["T", "window", "head_dim", "far dims", "bytes held / full cache"],
                [[T, args.window, args.head_dim, args.far_dim, f"{ratio:.3f}"]],
            )
        ],
        summary,
    )
    plot_tiers(held, summary, os.path.join(args.out_dir, "tiers.png"))


def plot_tiers(held, s, path):
    plt = common.pyplot()
    if plt is None:
        return
    from matplotlib.colors import ListedColormap
    fig, axes = plt.subplots(2, 1, figsize=(8.4, 4.6), sharex=True)
    colors = ListedColormap(
        ["#f2f2f2", "#7fa7d9", "#d9534f"]
    )  # not kept, kept at any distance, the window's
    T, W, r, d = s["T"], s["window"], s["far_dim"], s["head_dim"]
    for ax, (name, grid) in zip(axes, held.items()):
        ax.imshow(grid, aspect="auto", cmap=colors, vmin=0, vmax=2, interpolation="nearest")
        ax.set_ylabel(f"{name}\ncoordinate")
        ax.set_yticks([0, r, d - 1], [0, r, d - 1])
        ax.axvline(T - W - 0.5, color="k", linewidth=1)
        far = f"score q[:{r}] . k[:{r}]" if name == "key" else f"value [v[:{r}], 0, ..., 0]"
        ax.text(
            (T - W) / 2, (r + d) / 2, f"far tier: not kept; the {far}", ha="center", va="center"
        )
        ax.text(
            T - W / 2 - 0.5, (r + d) / 2, "local tier:\nwhole", ha="center", va="center", color="w"
        )
    axes[-1].set_xlabel(
        f"token position (the newest, {T - 1}, is the query's; the line is the window's edge)"
    )
    axes[0].set_title(
        f"One head's cache at {T} tokens: every token's first {r} of {d} coordinates, written on"
        f" arrival (blue),\nthe last {W} tokens' other {d - r} in a ring (red):"
        f" {s['held_bytes'] / 2**10:.1f} KiB, {s['ratio']:.3f}x a full cache's"
        f" {s['full_bytes'] / 2**10:.1f} KiB",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def add_parsers(sub):
    D = common.D
    speed = sub.add_parser("speed", help=common.summary(bench_speed))
    speed.set_defaults(run=bench_speed)
    common.add_model_flags(speed, (4, 4, 128, 16, 64, 8), random_tokens=True)
    speed.add_argument("--block_size", type=int, default=256,
                       help="the training step's sequence length" + D)
    speed.add_argument("--repeats", type=int, default=7,
                       help="timed training steps per variant (the median)" + D)
    speed.add_argument("--warmup", type=int, default=2,
                       help="untimed training steps per variant first" + D)
    speed.add_argument("--gen_block_size", type=int, default=1024,
                       help="the context of the generation rows" + D)
    speed.add_argument("--gen_tokens", type=int, default=1023,
                       help="a 1-token prompt then fills gen_block_size" + D)
    speed.add_argument("--gen_repeats", type=int, default=3,
                       help="timed generations per variant (the median)" + D)
    tiers = sub.add_parser("tiers", help=common.summary(bench_tiers))
    tiers.set_defaults(run=bench_tiers)
    tiers.add_argument("--block_size", type=int, default=96, help="tokens in the context drawn" + D)
    tiers.add_argument("--window", type=int, default=16, help="tokens drawn whole, at the end" + D)
    tiers.add_argument("--head_dim", type=int, default=32,
                       help="coordinates of the one head drawn" + D)
    tiers.add_argument("--far_dim", type=int, default=8,
                       help="far_k_dim = far_v_dim: coordinates every token keeps" + D)
    tiers.add_argument("--vocab_size", type=int, default=65,
                       help="vocabulary of the random model drawn" + D)
    tiers.add_argument("--out_dir", default="bench_out", help="where tiers.png goes" + D)
