"""
Quality: every regime trained identically, validation loss over steps; a trained full
model converted (SVD or PCA), zero-shot and fine-tuned.

    python bench.py quality
"""

import os
import statistics



from benchmarks import common
from data import prepare


def quality_variants(args, configs):
    """name -> (GPTConfig fields, kv_shift): the regimes, DAR with kv_shift, DAR's far bytes
    split as a quarter for keys and three quarters for values ("k<v"), and rotary positions."""
    far = configs["dar"]["far_k_dim"]
    k_lt_v = {**configs["dar"], "far_k_dim": far // 2, "far_v_dim": 3 * far // 2}
    rope = lambda regime, prefix: {**regime, "rope": True, "rope_prefix": prefix}
    variants = {name: (regime, False) for name, regime in configs.items()}
    variants.update(
        {
            "dar+kv_shift": (configs["dar"], True),
            "dar k<v": (k_lt_v, False),
            "full rope": (rope(configs["full"], "high"), False),
            "dar k<v rope unrotated": (rope(k_lt_v, "unrotated"), False),
            "dar k<v rope unrotated wpe": ({**rope(k_lt_v, "unrotated"), "rope_wpe": True}, False),
        }
    )
    return common.selected(variants, args.only)


def bench_quality(args):
    """Each regime trained with the same data order and budget, on each seed; then the
    conversions of the first seed's full model."""
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    head_dim = args.n_embd // args.n_head
    configs = common.regimes(
        args.block_size, args.n_head, head_dim, args.window, args.far_dim or head_dim // 4
    )
    variants, seeds = quality_variants(args, configs), [args.seed + i for i in range(args.seeds)]
    schedule = ["--max_iters", args.max_iters, "--eval_interval", args.eval_interval,
                "--warmup_iters", args.warmup_iters, "--learning_rate", args.learning_rate]
    curves = {name: [] for name in variants}   # one curve per seed
    for args.seed in seeds:
        for name, (regime, kv_shift) in variants.items():
            folder = common.folder_name(
                name if args.seed == seeds[0] else f"{name} seed {args.seed}"
            )
            curves[name].append(
                common.train_run(
                    args,
                    os.path.join(args.out_dir, "quality", folder),
                    *schedule,
                    *common.flags(regime),
                    "--kv_shift" if kv_shift else "--no-kv_shift",
                )
            )
    args.seed = seeds[0]
    final = {name: [curve[-1][1] for curve in runs] for name, runs in curves.items()}
    median = {name: statistics.median(losses) for name, losses in final.items()}
    spread = lambda name: (
        f" ({min(final[name]):.4f}-{max(final[name]):.4f})" if len(seeds) > 1 else ""
    )
    vs_full = lambda name: (
        f"{100 * (median[name] / median['full'] - 1):+.2f}%" if "full" in median else "-"
    )
    rows = [
        [
            name,
            regime["window"],
            common.far_tier(regime),
            "yes" if shift else "no",
            f"{median[name]:.4f}{spread(name)}",
            vs_full(name),
            f"{common.kv_ratio(args.block_size, regime, args.n_embd, args.n_head):.3f}",
        ]
        for name, (regime, shift) in variants.items()
    ]
    variant_table = common.markdown(
        [
            "regime",
            "window",
            "far tier",
            "kv_shift",
            f"final val loss ({len(seeds)} seeds: median, range)",
            "vs full",
            f"KV bytes/token at T={args.block_size} vs full",
        ],
        rows,
    )
    first = {name: runs[0] for name, runs in curves.items()}   # the first seed's curves
    medians = {
        name: [
            (it, statistics.median(run[i][1] for run in runs)) for i, (it, _) in enumerate(runs[0])
        ]
        for name, runs in curves.items()
    }
    curve_table = common.markdown(
        ["iter"] + list(first),
        [
            [it] + [f"{first[n][i][1]:.4f}" for n in first]
            for i, (it, _) in enumerate(next(iter(first.values())))
        ],
    )
    conversions = (
        convert_and_fine_tune(args, configs)
        if "full" in curves
        else ("(no conversions: full not run)", {})
    )
    common.report(
        args,
        "quality",
        [
            variant_table,
            f"val loss during training (seed {seeds[0]}):\n\n" + curve_table,
            conversions[0],
        ],
        {
            "variants": variants,
            "seeds": seeds,
            "curves": curves,
            "final_val_loss": final,
            "conversion": conversions[1],
        },
    )
    plot_curves(medians, len(seeds), os.path.join(args.out_dir, "quality.png"))


def convert_and_fine_tune(args, configs):
    """The trained full model converted to DAR, uniform and DAR latent, by the weights
    (SVD) and by PCA on a calibration batch, each selected by --only."""
    source = os.path.join(args.out_dir, "quality", "full", "ckpt_last.pt")
    fine_tune = [
        "--max_iters",
        args.finetune_iters,
        "--eval_interval",
        args.finetune_iters,
        "--warmup_iters",
        max(1, args.finetune_iters // 10),
        "--learning_rate",
        args.finetune_lr,
        "--min_lr",
        args.finetune_lr / 10,
    ]
    results, rows = {}, []
    for target in [t for t in ("dar", "uniform", "dar latent") if not args.only or t in args.only]:
        for method, seqs in (("weight SVD", 0), ("PCA", args.calibration_seqs)):
            out_dir = os.path.join(
                args.out_dir,
                "quality",
                f"convert_{common.folder_name(target)}_{'pca' if seqs else 'svd'}",
            )
            curve = common.train_run(
                args,
                out_dir,
                "--init_from",
                "convert",
                "--convert_from",
                source,
                "--calibration_seqs",
                seqs,
                *common.flags(configs[target]),
                *fine_tune,
            )
            results[f"{target}/{method}"] = {"zero_shot": curve[0][1], "fine_tuned": curve[-1][1]}
            rows.append([target, method, f"{curve[0][1]:.4f}", f"{curve[-1][1]:.4f}"])
    table = common.markdown(["converted to", "axes", "val loss zero-shot",
                      f"after {args.finetune_iters} fine-tune iters"], rows)
    return table, results


def plot_curves(curves, n_seeds, path):
    """Val loss against iteration, one line per regime (the median over n_seeds seeds), from
    the first evaluation after init; the legend beside the axes, clear of the data."""
    plt = common.pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(8.4, 4.2))
    # a latent regime in its slice counterpart's colour, dashed with squares (dotted at r =
    # n_embd / 4)
    colors = {}
    for name, curve in curves.items():
        base = name.split(" latent")[0].replace(" rope", "")
        color = colors.setdefault(base, f"C{len(colors)}")
        latent, rope = "latent" in name, "rope" in name
        style = ":" if name.endswith("n/4") else "--" if latent else "-."if rope else "-"
        ax.plot(
            *zip(*curve[1:]),
            marker="s" if latent else "^" if rope else ".",
            markersize=4,
            color=color,
            linestyle=style,
            label=name,
        )
    seeds = f"median of {n_seeds} seeds" if n_seeds > 1 else "one seed"
    ax.set(title=f"validation loss while training, {seeds} (lower is better)", xlabel="iteration",
           ylabel="val loss")
    ax.grid(alpha=0.3)
    ax.legend(
        loc="upper left",
        bbox_to_anchor=(1.01, 1),
        fontsize=8,
        title="solid: slice far tier\ndashed, squares: latent\ndash-dot, triangles: rope",
        title_fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


QUICK = dict(n_layer=2, n_head=4, n_embd=64, block_size=128, window=16, far_dim=4, batch_size=8,
             max_iters=300, eval_interval=50, warmup_iters=20, finetune_iters=50)


def add_parsers(sub):
    D = common.D
    quality = sub.add_parser("quality", help=common.summary(bench_quality))
    quality.set_defaults(run=bench_quality)
    common.add_model_flags(quality, (4, 4, 128, 8, 32, 0))
    common.add_training_flags(quality, 256, 1500, 250, 100, 1e-3)
    quality.add_argument("--dataset", default=prepare.DEFAULT_DATASET,
                         help="a prepared dataset: a folder under data/ or a path" + D)
    quality.add_argument("--finetune_iters", type=int, default=150,
                         help="fine-tune iterations after each conversion" + D)
    quality.add_argument("--finetune_lr", type=float, default=3e-4,
                         help="their peak learning rate" + D)
    quality.add_argument("--calibration_seqs", type=int, default=16,
                         help="sequences in the PCA conversion's calibration batch" + D)
    quality.add_argument("--quick", action="store_true",
                         help=f"smaller sizes, to try the benchmark out: {QUICK}")
    quality.add_argument("--seeds", type=int, default=1,
                         help="runs per regime: seeds --seed, --seed + 1, ..." + D)
    quality.add_argument("--only", nargs="+", help="train only these regimes (default: all; "
                         "the conversions run only when full is among them)")
