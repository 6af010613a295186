"""
Capacity: recall beyond the window as far keys, far values or both shrink, over numbers
of pairs and seeds: how many far dimensions a fact needs.

    python bench.py capacity
"""

import os
import statistics
import time



from benchmarks import common
from benchmarks import recall


def capacity_cells(head_dim, window, block_size, dims, tied_dims):
    """name -> GPTConfig fields: full attention (the ceiling), a sliding window
    (the floor), then far keys reduced (selection), far values reduced (transfer), both."""
    cells = {
        "full": common.sliced(block_size, head_dim, head_dim),
        "sliding": common.sliced(window, 0, 0),
    }
    cells.update({f"keys {r}": common.sliced(window, r, head_dim) for r in dims})
    cells.update({f"values {r}": common.sliced(window, head_dim, r) for r in dims})
    cells.update({f"tied {r}": common.sliced(window, r, r) for r in tied_dims})
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
                result = recall.recall_run(
                    args, f"{name} seed {args.seed}", pairs, config, folder="capacity"
                )
                accuracy[name][pairs].append(result["beyond window"][0])
    learnt = {pairs: statistics.median(accuracy["full"][pairs]) >= 0.95 for pairs in args.pairs}
    def cell(accs, pairs):
        text = f"{100 * statistics.median(accs):.1f}%" + (
            f" ({100 * min(accs):.0f}-{100 * max(accs):.0f})" if len(accs) > 1 else ""
        )
        return text if learnt[pairs] else text + " budget"
    grid = common.markdown(
        ["cell", "window", "far_k_dim", "far_v_dim"] + [f"{pairs} pairs" for pairs in args.pairs],
        [
            [name, *config.values()] + [cell(accuracy[name][p], p) for p in args.pairs]
            for name, config in cells.items()
        ],
    )
    smallest = {
        series: {
            pairs: smallest_dim(accuracy, series, pairs, learnt[pairs]) for pairs in args.pairs
        }
        for series in ("keys", "values", "tied")
    }
    summary = common.markdown(
        [
            "pairs",
            "smallest far_k_dim (values full)",
            "smallest far_v_dim (keys full)",
            "smallest tied",
        ],
        [[pairs] + [smallest[series][pairs] for series in smallest] for pairs in args.pairs],
    )
    minutes = (time.time() - start) / 60
    common.report(
        args,
        "capacity",
        [
            f"Median accuracy beyond the window over {len(seeds)} seed(s) (min-max); 'budget': full"
            " attention below 95% at that many pairs, so the cell measures the budget:\n\n"
            + grid,
            "Smallest far dimension reaching 90% of full attention's accuracy:\n\n" + summary,
            f"{len(cells) * len(args.pairs) * len(seeds)} training runs, {minutes:.1f} minutes",
        ],
        {
            "cells": cells,
            "seeds": seeds,
            "learnt": learnt,
            "smallest": smallest,
            "minutes": minutes,
            "accuracy": {
                name: {str(p): a for p, a in by_pairs.items()}
                for name, by_pairs in accuracy.items()
            },
        },
    )
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
    plt = common.pyplot()
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
            err = [
                [m - 100 * min(a) for m, a in zip(med, runs)],
                [100 * max(a) - m for m, a in zip(med, runs)],
            ]
            ax.errorbar(
                dims + [head_dim],
                med,
                yerr=err,
                marker="o",
                color=f"C{i}",
                capsize=3,
                label=f"{pairs} pairs",
            )
            ax.axhline(
                100 * statistics.median(accuracy["sliding"][pairs]),
                color=f"C{i}",
                linestyle=":",
                alpha=0.8,
                label=f"{pairs} pairs, sliding window",
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks(dims + [head_dim], [str(r) for r in dims] + [f"{head_dim}\n(full)"])
        ax.minorticks_off()
        ax.set(title=title, xlabel="far dimension")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy beyond the window, %")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", bbox_to_anchor=(0.5, 0.05),
               ncol=len(pairs_list), fontsize=8)
    fig.text(
        0.5,
        0.015,
        f"points: the median over {n_seeds} seeds; bars: the lowest and highest seed; dotted: a"
        " sliding window (no far tier) at that many pairs",
        ha="center",
        fontsize=8,
    )
    fig.tight_layout(rect=(0, 0.2, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


CAPACITY_QUICK = dict(pairs=[4, 16], dims=[2, 8], tied_dims=[4], seeds=1)


def add_parsers(sub):
    D = common.D
    capacity = sub.add_parser("capacity", help=common.summary(bench_capacity))
    capacity.set_defaults(run=bench_capacity)
    common.add_model_flags(capacity, (1, 2, 64, 32, 12, None))
    common.add_training_flags(capacity, 96, 500, 250, 50, 3e-3)
    common.add_recall_data_flags(capacity, 200)
    capacity.add_argument("--pairs", type=int, nargs="+", default=[2, 4, 8, 16],
                          help="numbers of key-value pairs per sequence, one column each" + D)
    capacity.add_argument("--dims", type=int, nargs="+", default=[1, 2, 4, 8, 16],
                          help="far_k_dim (values full) and far_v_dim (keys full)" + D)
    capacity.add_argument("--tied_dims", type=int, nargs="+", default=[2, 4, 8],
                          help="far_k_dim = far_v_dim" + D)
    capacity.add_argument("--seeds", type=int, default=3,
                          help="runs per cell, seeds --seed, --seed + 1, ..." + D)
    capacity.add_argument("--quick", action="store_true",
                          help=f"one seed and a subset, to try it out: {CAPACITY_QUICK}")
