"""
The paper's table where distance matters: full attention, DAR (the slice and the paper's
bottleneck), uniform (no window) and sliding windows, trained identically on a corpus
whose distant tokens matter (networkx's Python source), over seeds; validation loss
against the KV cache's bytes at block_size.

    python bench.py distance
"""

import argparse
import os
import statistics

from benchmarks import common


def distance_regimes(args):
    """name -> GPTConfig fields: the table's rows, each with rotary or learned positions."""
    head_dim = args.n_embd // args.n_head
    far = args.far_dim or head_dim // 4
    T = args.block_size
    W = args.window
    latent_dim = args.latent_dim or args.n_head * 2 * far   # the slice's far bytes
    dar = common.sliced(W, far, far)
    # a sliding window holding as many bytes as DAR at block_size: nothing beyond it
    same_bytes = round(common.kv_ratio(T, dar, args.n_embd, args.n_head) * T)
    rows = {
        "full": common.sliced(T, head_dim, head_dim),
        "dar": dar,
        "dar latent": common.latent(W, latent_dim),
        "uniform": common.sliced(0, far, far),
        "uniform latent": common.latent(0, latent_dim),
        f"sliding {W}": common.sliced(W, 0, 0),
        f"sliding {same_bytes}": common.sliced(same_bytes, 0, 0),
    }
    regimes = {}
    for positions in args.positions:
        for name, regime in rows.items():
            regimes[f"{name} {positions}"] = {**regime, "rope": positions == "rope"}
    return common.selected(regimes, args.only)


def bench_distance(args):
    """Each row trained with the same batches on each seed (kv_shift in every row); the
    table gives each row's final val loss over seeds and against full attention's on the
    same seed and positions."""
    regimes = distance_regimes(args)
    seeds = [args.seed + i for i in range(args.seeds)]
    schedule = ["--max_iters", args.max_iters, "--eval_interval", args.eval_interval,
                "--warmup_iters", args.warmup_iters, "--learning_rate", args.learning_rate,
                "--min_lr", args.learning_rate / 10,
                "--kv_shift" if args.kv_shift else "--no-kv_shift"]
    final = {name: [] for name in regimes}
    for args.seed in seeds:
        for name, regime in regimes.items():
            out_dir = os.path.join(args.out_dir, "distance", common.folder_name(name),
                                   f"seed_{args.seed}")
            curve = common.train_run(args, out_dir, *schedule, *common.flags(regime))
            final[name].append(curve[-1][1])
    args.seed = seeds[0]
    kv = {name: common.kv_ratio(args.block_size, regime, args.n_embd, args.n_head)
          for name, regime in regimes.items()}
    ratios = against_full(final)
    rows = [table_row(name, final[name], ratios.get(name), kv[name]) for name in regimes]
    headers = ["regime", "positions", f"final val loss ({len(seeds)} seeds: median, range)",
               "vs full (median of seeds)", "seeds within 1% of full",
               f"KV bytes at T={args.block_size} vs full"]
    table = common.markdown(headers, rows)
    common.report(args, "distance", [table],
                  {"regimes": regimes, "seeds": seeds, "final_val_loss": final, "kv_ratio": kv})
    plot_distance(ratios, kv, os.path.join(args.out_dir, "distance.png"))


def against_full(final):
    """name -> each seed's final val loss relative to full attention's on the same seed and
    positions (0.01: 1% above); rows whose positions have no full row are left out."""
    ratios = {}
    for name, losses in final.items():
        positions = name.rsplit(" ", 1)[1]
        full = final.get(f"full {positions}")
        if full is not None:
            ratios[name] = [loss / base - 1 for loss, base in zip(losses, full)]
    return ratios


def table_row(name, losses, ratios, kv):
    """One row: the losses over seeds, and each seed against full attention's on that seed."""
    regime, positions = name.rsplit(" ", 1)
    spread = f"{statistics.median(losses):.4f} ({min(losses):.4f}-{max(losses):.4f})"
    if ratios is None or regime == "full":
        return [regime, positions, spread, "-", "-", f"{kv:.3f}"]
    within = sum(r <= 0.01 for r in ratios)
    return [regime, positions, spread, f"{100 * statistics.median(ratios):+.2f}%",
            f"{within} of {len(ratios)}", f"{kv:.3f}"]


def plot_distance(ratios, kv, path):
    """Each seed's final val loss against full attention's on the same seed and positions
    (the seeds' absolute losses differ more than the rows do), against KV bytes: a colour a
    row, filled for rotary positions and hollow for learned ones. Only with the full rows."""
    if not ratios:
        print("no distance.png: it plots each row against full attention, which was not run")
        return
    plt = common.pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(8.4, 4.4))
    colors = {}
    for name, seed_ratios in ratios.items():
        regime, positions = name.rsplit(" ", 1)
        color = colors.setdefault(regime, f"C{len(colors)}")
        face = color if positions == "rope" else "none"
        vs_full = [100 * r for r in seed_ratios]
        ax.scatter([kv[name]] * len(vs_full), vs_full, s=28, edgecolors=color, facecolors=face,
                   label=name)
    ax.set(title="final validation loss against full attention's, one dot a seed",
           xlabel="KV cache bytes at block_size, relative to full attention",
           ylabel="% above full attention (lower is better)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8,
              title="filled: rope\nhollow: learned positions", title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def add_parsers(sub):
    D = common.D
    s = sub.add_parser("distance", help=common.summary(bench_distance))
    s.set_defaults(run=bench_distance)
    common.add_model_flags(s, (4, 4, 128, 8, 16, 0))
    common.add_training_flags(s, 256, 2000, 500, 100, 2e-3)
    s.set_defaults(eval_iters=40)   # the rows differ by about 1%: a steadier estimate
    s.add_argument("--dataset", default="networkx_char",
                   help="a prepared dataset (networkx_char is prepared on first use)" + D)
    s.add_argument("--latent_dim", type=int, default=0,
                   help="the bottleneck width r of the latent rows (0: the slice's far bytes, "
                   "n_head * 2 * far_dim)" + D)
    s.add_argument("--positions", nargs="+", choices=("rope", "wpe"), default=["rope", "wpe"],
                   help="rotary or learned positions: each row once for each" + D)
    s.add_argument("--kv_shift", action=argparse.BooleanOptionalAction, default=True,
                   help="KV shifting in every row" + D)
    s.add_argument("--seeds", type=int, default=5,
                   help="runs per row: seeds --seed, --seed + 1, ..." + D)
    s.add_argument("--only", nargs="+",
                   help="train only these rows, by their names in the table, e.g. 'dar rope' "
                   "(default: all)")
