"""
Associative recall (data/recall.py): accuracy by distance per regime, over seeds, and
where the recall models look.

    python bench.py recall
    python bench.py attention
"""

import glob
import json
import os
import statistics

import numpy as np
import torch

import checkpoint
from benchmarks import common
from data.recall import write_recall


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
    return {
        name: (float(correct[m].mean()) if m.any() else None, int(m.sum()))
        for name, m in buckets.items()
    }


def model_predictor(model):
    """Greedy next-token predictions at every position (targets only ask for all logits)."""
    @torch.no_grad()
    def predict(x):
        x = x.to(next(model.parameters()).device)
        return model(x, targets=x)[0].argmax(-1)
    return predict


def recall_run(args, name, pairs, regime, folder="recall"):
    """Train one regime on recall data with `pairs` pairs; its accuracy on the val split."""
    data_dir = os.path.join(
        args.out_dir,
        folder,
        "data",  # --quick's data must not be reused by a full run
        f"pairs_{pairs}_block_{args.block_size}_seqs_{args.train_seqs}_{args.val_seqs}",
    )
    if not os.path.exists(os.path.join(data_dir, "meta.json")):
        write_recall(
            data_dir, pairs, args.block_size, train_seqs=args.train_seqs, val_seqs=args.val_seqs
        )
    out_dir = os.path.join(args.out_dir, folder, f"{common.folder_name(name)}_pairs_{pairs}")
    args.dataset = data_dir
    common.train_run(
        args,
        out_dir,
        "--max_iters",
        args.max_iters,
        "--eval_interval",
        args.eval_interval,
        "--warmup_iters",
        args.warmup_iters,
        "--learning_rate",
        args.learning_rate,
        *common.flags(regime),
        "--kv_shift" if args.kv_shift else "--no-kv_shift",
    )
    model = checkpoint.model_from(
        checkpoint.load(os.path.join(out_dir, "ckpt_last.pt")), checkpoint.pick_device(args.device)
    )
    val = lambda name: np.fromfile(os.path.join(data_dir, f"{name}.bin"), dtype=np.uint16)
    return recall_accuracy(
        model_predictor(model), val("val"), val("val_answers"), args.block_size + 1, args.window
    )


def recall_regimes(args):
    """The rows of the recall table. Learned positions: far dims head_dim / 4, split evenly
    and as hd/8 for keys, 3hd/8 for values (the same bytes: "k<v"); head_dim / 8; the
    baselines; the latent far tier at the bytes of each (r = n_head * 2 * far dims). Then
    rotary positions: each prefix choice, the unrotated one with wpe kept as well, and the
    baselines (full attention with rope, and with rope and wpe)."""
    hd, W, H = args.n_embd // args.n_head, args.window, args.n_head
    k_lt_v = common.sliced(W, hd // 8, 3 * hd // 8)
    rope = lambda regime, prefix="high": {**regime, "rope": True, "rope_prefix": prefix}
    return {
        "full": common.sliced(args.block_size, hd, hd),
        "dar hd/4": common.sliced(W, hd // 4, hd // 4),
        "dar hd/4 k<v": k_lt_v,
        "dar hd/8": common.sliced(W, hd // 8, hd // 8),
        "uniform hd/4": common.sliced(0, hd // 4, hd // 4),
        "thin_keys": common.sliced(0, hd // 4, hd),
        "sliding": common.sliced(W, 0, 0),
        "dar latent as hd/4": common.latent(W, H * hd // 2),
        "dar latent as hd/8": common.latent(W, H * hd // 4),
        "uniform latent as hd/4": common.latent(0, H * hd // 2),
        "full rope": rope(common.sliced(args.block_size, hd, hd)),
        "full rope wpe": {**rope(common.sliced(args.block_size, hd, hd)), "rope_wpe": True},
        **{f"dar hd/4 k<v rope {p}": rope(k_lt_v, p) for p in ("high", "low", "unrotated")},
        "dar hd/4 k<v rope unrotated wpe": {**rope(k_lt_v, "unrotated"), "rope_wpe": True},
        "dar hd/4 rope unrotated": rope(common.sliced(W, hd // 4, hd // 4), "unrotated"),
        "uniform hd/4 rope": rope(common.sliced(0, hd // 4, hd // 4)),
        "sliding rope": rope(common.sliced(W, 0, 0)),
    }


# The rows the README shows (bench.py recall's default): each kind of positions, its baseline first.
RECALL_ROWS = [
    "full",
    "dar hd/4",
    "dar hd/4 k<v",
    "full rope",
    "full rope wpe",
    "dar hd/4 k<v rope unrotated wpe",
]


LEARNED = (
    0.9  # a seed learned recall when it answers this share of the far answers (beyond the window)
)


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
    variants = common.selected(
        {**recall_regimes(args), **{name: json.loads(fields) for name, fields in extra.items()}},
        args.only or RECALL_ROWS + list(extra),
    )
    seeds = [args.seed + i for i in range(args.seeds)]
    buckets = ["all", "inside window", "beyond window", "1-2x window", "farther"]
    def runs(name, regime, pairs):   # one recall_run per seed
        results = []
        for args.seed in seeds:
            results.append(
                recall_run(
                    args, f"{name} seed {args.seed}" if len(seeds) > 1 else name, pairs, regime
                )
            )
        args.seed = seeds[0]
        return results
    results = {name: runs(name, regime, args.pairs) for name, regime in variants.items()}
    rows = [
        [name, regime["window"], common.far_tier(regime)]
        + [seeds_cell(results[name], b) for b in buckets]
        + [f"{learned(results[name])}/{len(seeds)}", baseline_cell(regime, results)]
        for name, regime in variants.items()
    ]
    counts = {b: next(iter(results.values()))[0][b][1] for b in buckets}
    variant_table = common.markdown(
        ["regime", "window", "far tier"]
        + [f"{b} ({counts[b]})" for b in buckets]
        + ["seeds learned", "baseline at this budget"],
        rows,
    )
    per_seed = common.markdown(
        ["regime"] + [str(s) for s in seeds],
        [
            [name] + [f"{100 * a['beyond window'][0]:.1f}" for a in results[name]]
            for name in variants
        ],
    )
    sweep = {
        name: {
            pairs: results[name] if pairs == args.pairs else runs(name, variants[name], pairs)
            for pairs in args.sweep_pairs
        }
        for name in args.sweep_regimes
        if name in variants
    }
    sweep_table = common.markdown(
        ["pairs", "regime"] + buckets,
        [
            [pairs, name] + [seeds_cell(sweep[name][pairs], b) for b in buckets]
            for pairs in args.sweep_pairs
            for name in sweep
        ],
    )
    shift = "with" if args.kv_shift else "without"
    common.report(
        args,
        "recall",
        [
            f"{args.pairs} pairs per sequence, {shift} kv_shift, {args.max_iters} iterations, "
            f"{len(seeds)} seeds ({seeds[0]}-{seeds[-1]}), {args.threads} thread(s) per run: the "
            "median (lowest-highest seed); answers per bucket in brackets; 'learned': 90% or more "
            "of the answers beyond the window:\n\n"
            + variant_table,
            "Per seed, accuracy beyond the window (%):\n\n" + per_seed,
        ]
        + (["As pairs grow:\n\n" + sweep_table] if args.sweep_pairs else []),
        {
            "variants": variants,
            "kv_shift": args.kv_shift,
            "seeds": seeds,
            "threads": torch.get_num_threads(),
            "accuracy": results,
            "sweep": {
                name: {str(k): v for k, v in by_pairs.items()} for name, by_pairs in sweep.items()
            },
        },
    )
    plot_recall(variants, results, os.path.join(args.out_dir, "recall.png"))


def plot_recall(variants, results, path, n_values=64):
    """Accuracy beyond the window per regime: one dot per seed, a bar at the median; chance
    (one of n_values values) and the bar a seed must reach to count as learned (90%)."""
    plt = common.pyplot()
    if plt is None:
        return
    names = list(variants)
    kinds = {"full": ("C0", "learned positions"), "full rope": ("C1", "rotary positions"),
             "full rope wpe": ("C2", "rotary and learned positions")}
    fig, ax = plt.subplots(figsize=(0.8 * len(names) + 5.0, 5.6))
    for x, name in enumerate(names):
        accuracies = [100 * run["beyond window"][0] for run in results[name]]
        color, kind = kinds[baseline(variants[name])]
        ax.scatter(
            [x] * len(accuracies),
            accuracies,
            color=color,
            alpha=0.6,
            zorder=3,
            label=f"{kind}, one seed",
        )
        ax.hlines(statistics.median(accuracies), x - 0.3, x + 0.3, color=color, linewidth=2.5,
                  label="median of the seeds")
    ax.axhline(
        100 * LEARNED, color="black", linestyle="--", linewidth=1, label="learned: 90% right"
    )
    ax.axhline(
        100 / n_values,
        color="gray",
        linestyle=":",
        linewidth=1,
        label=f"chance (1 of {n_values} values)",
    )
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(
        unique.values(), unique.keys(), loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8
    )
    ax.set_xticks(
        range(len(names)),
        [common.row_label(name, variants[name]) for name in names],
        rotation=60,
        ha="right",
        fontsize=8,
    )
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
    hooks = [
        b.attn.register_forward_hook(lambda m, i, o: inputs.append((m, i[0])))
        for b in model.transformer.h
    ]
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
        val = (
            lambda name: np.fromfile(os.path.join(data_dir, f"{name}.bin"), dtype=np.uint16)
            .astype(np.int64)
            .reshape(-1, length)
        )
        tokens, dist = val("val")[:args.sequences], val("val_answers")[:args.sequences, 1:]
        maps, logits = attention_maps(model, torch.from_numpy(tokens[:, :-1]))
        b, a = np.nonzero(
            dist >= args.window
        )  # query position a answers with the value at a - dist
        on_target = (
            torch.stack([m[b, :, a, a - dist[b, a]] for m in maps]).amax((0, 2)).numpy()
        )  # best head
        right = logits.argmax(-1).numpy()[b, a] == tokens[b, a + 1]
        selects = on_target >= 0.5
        r = results[os.path.basename(os.path.dirname(run))] = {
            "answers": int(len(a)),
            "accuracy": float(right.mean()),
            "selects": float(selects.mean()),
            "right_when_selects": float(right[selects].mean()) if selects.any() else None,
            "right_otherwise": float(right[~selects].mean()) if (~selects).any() else None,
        }
        rows.append(
            [
                os.path.basename(os.path.dirname(run)),
                r["answers"],
                pct(r["accuracy"]),
                pct(r["selects"]),
                pct(r["right_when_selects"]),
                pct(r["right_otherwise"]),
            ]
        )
    common.report(
        args,
        "attention",
        [
            f"Answers at least {args.window} tokens from their pair, first {args.sequences}"
            " validation sequences; 'selects': some head of some layer puts >= 50% of its"
            " attention on the value to copy:\n\n"
            + common.markdown(
                [
                    "run",
                    "answers",
                    "accuracy",
                    "selects",
                    "right when it selects",
                    "right otherwise",
                ],
                rows,
            )
        ],
        {"runs": results},
    )


RECALL_QUICK = dict(
    block_size=64,
    window=8,
    max_iters=600,
    eval_interval=200,
    train_seqs=5000,
    val_seqs=200,
    seeds=3,
)


def add_parsers(sub):
    D = common.D
    recall = sub.add_parser("recall", help=common.summary(bench_recall))
    recall.set_defaults(run=bench_recall)
    common.add_model_flags(recall, (2, 2, 64, 32, 16, 0))
    common.add_training_flags(recall, 128, 1500, 500, 100, 3e-3)
    recall.add_argument("--only", nargs="+", help="train only these rows, by the names of "
                        f"recall_regimes (default: the README's rows, {RECALL_ROWS}, and the "
                        "--extra ones)")
    recall.add_argument("--pairs", type=int, default=8,
                        help="pairs per sequence for the regimes" + D)
    recall.add_argument("--seeds", type=int, default=10,
                        help="runs per regime: seeds --seed, --seed + 1, ..." + D)
    recall.add_argument("--threads", type=int, default=1, help="torch threads per run, the "
                        "same for every run: a seed's result can move with the thread count" + D)
    recall.add_argument("--extra", nargs="+", default=[], metavar="NAME=JSON",
                        help="more rows: a name and GPTConfig fields, e.g. 'k8 v12="
                        """{"window": 16, "far_k_dim": 8, "far_v_dim": 12}' (default: none)""")
    recall.add_argument("--sweep_pairs", type=int, nargs="*", default=[],
                        help="also run the sweep regimes at these numbers of pairs "
                        "(default: none)")
    recall.add_argument("--sweep_regimes", nargs="+", default=["full", "dar hd/8"],
                        help="the rows run at each --sweep_pairs" + D)
    common.add_recall_data_flags(recall, 500)
    recall.add_argument("--quick", action="store_true", help="smaller sizes and 3 seeds a row, "
                        f"to try the benchmark out: {RECALL_QUICK}")
    attention = sub.add_parser("attention", help=common.summary(bench_attention))
    attention.set_defaults(run=bench_attention)
    attention.add_argument("--out_dir", default="bench_out",
                           help="where bench.py recall wrote its runs" + D)
    attention.add_argument("--window", type=int, default=16,
                           help="count the answers this far from their pair" + D)
    attention.add_argument("--sequences", type=int, default=200,
                           help="validation sequences read" + D)
