"""
SmolLM2-135M made DAR: perplexity against KV bytes training-free, and DAR against the
full control fine-tuned identically.

    python bench.py pretrained
    python bench.py finetune
"""

import glob
import json
import math
import os
import sys
import time

import torch

import checkpoint
import train
from benchmarks import common
from benchmarks import gpu


FINETUNE_QUICK = dict(max_iters=2, eval_interval=1, eval_iters=1, seeds=1, block_size=64,
                      batch_size=1, window=16, latent_dim=8, stage1_iters=1)


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
            print(
                f"context {context}: window {w + 1}/{windows}, perplexity so far"
                f" {math.exp(total / (w + 1)):.2f}, {left / 60:.1f} min left",
                flush=True,
            )
    return math.exp(total / windows)


def pretrained_rows(head_dim):
    """name -> (family, window, far_k_dim, far_v_dim, pair order, latent) of bench.py
    pretrained: the full model, sliding windows, DAR by each pair order, its far values 16 /
    32 / 64 (64: thin keys, far keys only), its far keys, uniform reduction (window 0), and
    the paper's bottleneck (latent: (r, init), convert.bottleneck's two initialisations)."""
    d = head_dim
    rows = {"full": ("full attention", None, d, d, None, None)}
    for W in (256, 512, 704, 1024):
        rows[f"sliding {W}"] = ("sliding window", W, 0, 0, "score", None)
    for pairs in ("score", "low"):
        for W in (64, 128, 256):
            family = f"DAR k 16 + v 16, pairs by {pairs}"
            rows[f"dar {pairs} W{W} k16 v16"] = (family, W, 16, 16, pairs, None)
    rows["dar high W64 k16 v16"] = ("DAR k 16 + v 16, pairs by high", 64, 16, 16, "high", None)
    for k, v in ((16, 32), (16, 64), (8, 64), (8, 16), (32, 32)):
        family = "DAR W 64, other far dims, by score"
        if v == d:
            family = "thin keys (W 64, values whole)"
        rows[f"dar score W64 k{k} v{v}"] = (family, 64, k, v, "score", None)
    for k in (16, 32):
        rows[f"uniform k{k} v{k}"] = ("uniform (window 0)", 0, k, k, "score", None)
    for init in ("inputs", "keys_values"):
        for r in (96, 144):
            family = f"latent W 128, bottleneck by {init}"
            rows[f"latent {init} W128 r{r}"] = (family, 128, None, None, None, (r, init))
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
    for name, (family, W, k, v, pairs, latent) in rows.items():
        if args.only and name not in args.only:
            continue
        t0 = time.time()
        dar_model = model
        if W is not None:
            dar_model = smollm2.to_dar(model, tokenizer, W, k, v, pairs, args.calibration, latent)
        for T in args.contexts:
            windows = min(len(ids) // (T + 1), max(1, args.tokens // T))
            ppl = perplexity(dar_model, ids, T, windows, ctx)
            regime = common.sliced(T if W is None else W, k, v)
            if latent is not None:   # r numbers a token for all heads, every token (kv_ratio)
                regime = common.latent(W, latent[0])
            ratio = common.kv_ratio(
                T,
                {**regime, "n_kv_head": cfg.n_kv_head},
                cfg.n_kv_head * cfg.head_dim,
                cfg.n_kv_head,
            )
            kv_mib = ratio * cfg.n_layer * 2 * cfg.n_kv_head * cfg.head_dim * T * 4 / 2**20
            results["perplexity"].append(
                {
                    "name": name,
                    "family": family,
                    "T": T,
                    "window": regime["window"],
                    "far_k_dim": k,
                    "far_v_dim": v,
                    "pairs": pairs,
                    "latent": latent,
                    "perplexity": ppl,
                    "tokens": windows * T,
                    "kv_ratio": ratio,
                    "kv_mib": kv_mib,
                }
            )
            table.append([name, T, windows * T, f"{ppl:.2f}", f"{ratio:.3f}", f"{kv_mib:.1f}",
                          f"{time.time() - t0:.0f}"])
            print(
                common.markdown(
                    [
                        "row",
                        "context",
                        "tokens scored",
                        "perplexity",
                        "KV bytes vs full",
                        "KV MiB (fp32)",
                        "seconds",
                    ],
                    table[-1:],
                ).splitlines()[-1],
                flush=True,
            )
    tables = [common.markdown(["row", "context", "tokens scored", "perplexity", "KV bytes vs full",
                        "KV MiB held at the context (fp32)", "seconds"], table)]
    if args.lengths:
        tables += gpu.pretrained_speed(args, model, dtype, device, ctx, results)
    common.report(args, "pretrained", tables, results)
    plot_pretrained(results["perplexity"], os.path.join(args.out_dir, "pretrained.png"))


def plot_pretrained(points, path):
    """Perplexity against KV bytes, one panel per context: a curve per family, full a point.
    Points above 3x full attention's perplexity sit on the top edge as triangles, their value
    in the legend."""
    plt = common.pyplot()
    if plt is None or not points:
        return
    contexts = sorted({p["T"] for p in points})
    width = 5.6 * len(contexts) + 2.8
    fig, axes = plt.subplots(1, len(contexts), figsize=(width, 4.4), squeeze=False)
    for ax, T in zip(axes[0], contexts):
        families = {}
        for p in points:
            if p["T"] == T:
                families.setdefault(p["family"], []).append(p)
        here = [p for p in points if p["T"] == T]
        full = [p["perplexity"] for p in here if p["name"] == "full"]
        top = 3 * full[0] if full else max(p["perplexity"] for p in here)   # (--only: no full)
        for i, (family, members) in enumerate(families.items()):
            members.sort(key=lambda p: p["kv_ratio"])
            x = [p["kv_ratio"] for p in members]
            y = [min(p["perplexity"], top) for p in members]
            clipped = [p for p in members if p["perplexity"] > top]
            label = family + "".join(
                f" [{p['perplexity']:.0f} at {p['kv_ratio']:.2f}]" for p in clipped)
            size = 5 if len(members) > 1 else 9   # a family of one point: bigger
            ax.plot(x, y, color=f"C{i}", label=label, marker="o", markersize=size)
            for p in clipped:
                ax.plot(p["kv_ratio"], top, marker="^", markersize=10, color=f"C{i}")
        ax.set(title=f"SmolLM2-135M, context {T}", xlabel="KV bytes held, vs full attention",
               ylabel="perplexity, Shakespeare val",
               ylim=(0.9 * min(p["perplexity"] for p in here), 1.05 * top))
        ax.grid(alpha=0.3)
    axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def bench_finetune(args):
    """SmolLM2-135M fine-tuned on Shakespeare in its own tokens (data/prepare.py --tokenizer
    smollm2), as full attention (the control) and as DAR conversions, identically (same
    batches, steps, learning rate and seed): validation perplexity over steps, on each seed,
    how much of the training-free gap to the control the fine-tune closes, and its trend."""
    if args.quick:
        for name, value in FINETUNE_QUICK.items():
            setattr(args, name, value)
    if args.window >= args.block_size:
        sys.exit(f"error: --window {args.window} >= --block_size {args.block_size}: "
                 "DAR would be full attention")
    seeds = [args.seed + i for i in range(args.seeds)]
    curves = finetune_curves(args, seeds)
    table, closed = gap_table(curves, seeds, args.max_iters)
    curve_rows = []
    for j, (iteration, _) in enumerate(curves["full"][0]):
        row = [iteration]
        for s in range(len(seeds)):
            row += [f"{curves[name][s][j][1]:.2f}" for name in curves]
        curve_rows.append(row)
    curve_headers = ["iter"] + [f"{name} seed {seed}" for seed in seeds for name in curves]
    curve_table = common.markdown(curve_headers, curve_rows)
    common.report(args, "finetune", [table, "validation perplexity over steps:\n\n" + curve_table],
                  {"seeds": seeds, "curves": curves, "gap_closed": closed})
    plot_finetune(curves, seeds, args, os.path.join(args.out_dir, "finetune.png"))


def finetune_curves(args, seeds):
    """Train each model on each seed: {name: per seed [(iter, val perplexity), ...]}."""
    schedule = ["--init_from", "smollm2", "--dataset", args.dataset,
                "--max_iters", args.max_iters, "--eval_interval", args.eval_interval,
                "--eval_iters", args.eval_iters, "--block_size", args.block_size,
                "--batch_size", args.batch_size,
                "--learning_rate", args.learning_rate, "--min_lr", args.learning_rate,
                "--sample_tokens", 0, "--log_interval", args.log_interval,
                "--ckpt_interval", args.max_iters + 1, "--device", args.device, "--overwrite"]
    runs = {"full": [],
            "dar": ["--window", args.window, "--far_k_dim", args.far_k_dim,
                    "--far_v_dim", args.far_v_dim, "--pairs", args.pairs]}
    if args.latent_dim > 0:   # the paper's recipe: stage 1 (the bottleneck alone), stage 2
        runs["latent"] = ["--window", args.window, "--far_mode", "latent",
                          "--far_latent_dim", args.latent_dim, "--latent_init", args.latent_init,
                          "--stage1_iters", args.stage1_iters, "--stage1_lr", args.stage1_lr]
    curves = {name: [] for name in runs}
    for seed in seeds:
        for name, extra in runs.items():
            out_dir = os.path.join(args.out_dir, "finetune", f"{name}_seed_{seed}")
            print(f"\n=== {out_dir} ===", flush=True)
            train.main([str(a) for a in schedule + extra + ["--seed", seed, "--out_dir", out_dir]])
            with open(os.path.join(out_dir, "eval_log.jsonl")) as f:
                evals = [json.loads(line) for line in f]
            curves[name].append([(e["iter"], math.exp(e["val_loss"])) for e in evals])
            for path in glob.glob(os.path.join(out_dir, "ckpt_*.pt")):   # 1.6 GB each
                os.remove(path)   # (the curve is kept)
    return curves


def gap_table(curves, seeds, max_iters):
    """Per seed and DAR model: the gap to the control before and after, the share of it
    closed, how fast it fell over the last evaluation interval and how many more steps that
    rate needs to reach 3% (a lower bound while the fall slows down)."""
    rows = []
    closed = []
    for i, seed in enumerate(seeds):
        iterations = [iteration for iteration, _ in curves["full"][i]]
        full = [perplexity for _, perplexity in curves["full"][i]]
        for name in curves:
            if name == "full":
                continue
            dar = [perplexity for _, perplexity in curves[name][i]]
            gaps = [d / f - 1 for d, f in zip(dar, full)]
            closed.append(1 - gaps[-1] / gaps[0] if gaps[0] > 0.001 else None)   # (no gap)
            per_step = 0.0
            if len(gaps) > 1:   # the fall over the last evaluation interval
                per_step = (gaps[-2] - gaps[-1]) / (iterations[-1] - iterations[-2])
            if gaps[-1] <= 0.03:
                to_go = "0"
            elif per_step > 0:
                to_go = f"{math.ceil((gaps[-1] - 0.03) / per_step)}"
            else:
                to_go = "never (not falling)"
            rows.append([seed, name, f"{full[0]:.2f}", f"{dar[0]:.2f}", f"{100 * gaps[0]:+.1f}%",
                         f"{full[-1]:.2f}", f"{dar[-1]:.2f}", f"{100 * gaps[-1]:+.1f}%",
                         "-" if closed[-1] is None else f"{100 * closed[-1]:.0f}%",
                         f"{100 * per_step:.2f}", to_go])
    headers = ["seed", "DAR", "full, before", "DAR, before", "gap", f"full after {max_iters} iters",
               f"DAR after {max_iters} iters", "gap", "gap closed",
               "gap's fall a step, last interval (points)", "more steps to 3% at that rate"]
    return common.markdown(headers, rows), closed


def plot_finetune(curves, seeds, args, path):
    """Validation perplexity against iteration: the control solid, DAR dashed, a colour a seed."""
    plt = common.pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7.6, 4.2))
    labels = {"full": "full attention",
              "dar": f"DAR slice, window {args.window}, k {args.far_k_dim} + v {args.far_v_dim}",
              "latent": f"DAR latent (the paper's), window {args.window}, r {args.latent_dim}, "
                        f"stage 1 {args.stage1_iters} iters"}
    styles = {"full": "-", "dar": "--", "latent": ":"}
    for s, seed in enumerate(seeds):
        for name in curves:
            iterations = [it for it, _ in curves[name][s]]
            perplexities = [perplexity for _, perplexity in curves[name][s]]
            ax.plot(iterations, perplexities, linestyle=styles[name], marker=".", color=f"C{s}",
                    label=f"{labels[name]}, seed {seed}")
    ax.set(title="SmolLM2-135M fine-tuned on Shakespeare (lower is better)", xlabel="iteration",
           ylabel="validation perplexity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def add_parsers(sub):
    D = common.D
    pretrained = sub.add_parser("pretrained", help=common.summary(bench_pretrained))
    pretrained.set_defaults(run=bench_pretrained)
    pretrained.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048],
                            help="contexts at which the perplexity is measured, in windows of "
                            "that many tokens" + D)
    pretrained.add_argument("--tokens", type=int, default=8192, help="tokens scored per context "
                            "and row, the same for every row (the validation split holds "
                            "157,750)" + D)
    pretrained.add_argument("--calibration", type=int, default=1024,
                            help="tokens of the train split the conversions calibrate on" + D)
    pretrained.add_argument("--only", nargs="+", help="measure only these rows (default: all; "
                            "names as printed, e.g. full 'dar score W64 k16 v16')")
    pretrained.add_argument("--lengths", type=int, nargs="*", default=[1024, 4096],
                            help="contexts of the decode and prefill timings (none: no "
                            "timing)" + D)
    pretrained.add_argument("--steps", type=int, default=20,
                            help="one-token steps timed, alternated" + D)
    pretrained.add_argument("--warmup", type=int, default=3, help="untimed steps before them" + D)
    pretrained.add_argument("--prefill_repeats", type=int, default=3,
                            help="timed prefills per cache" + D)
    common.add_device_flags(pretrained)
    finetune = sub.add_parser("finetune", help=common.summary(bench_finetune))
    finetune.set_defaults(run=bench_finetune)
    for flag, default, meaning in FINETUNE_FLAGS:
        finetune.add_argument(f"--{flag}", type=int, default=default, help=meaning + D)
    finetune.add_argument("--latent_dim", type=int, default=96, help="the paper's bottleneck "
                          "rows: width r, stage 1 then stage 2 (0: none)" + D)
    finetune.add_argument("--latent_init", default="keys_values", choices=["inputs", "keys_values"],
                          help="how the bottleneck starts (convert.bottleneck)" + D)
    finetune.add_argument("--stage1_iters", type=int, default=10, help="the latent rows: "
                          "iterations of the bottleneck alone, of --max_iters" + D)
    finetune.add_argument("--stage1_lr", type=float, default=3e-4,
                          help="their constant learning rate (the paper's stage 1)" + D)
    finetune.add_argument("--pairs", default="score", choices=["score", "high", "low"],
                          help="which rotary pairs the far keys keep (smollm2.to_dar)" + D)
    finetune.add_argument("--learning_rate", type=float, default=3e-5,
                          help="AdamW's constant learning rate, both models" + D)
    finetune.add_argument("--dataset", default="shakespeare_smollm2",
                          help="a dataset prepared with --tokenizer smollm2" + D)
    finetune.add_argument("--quick", action="store_true",
                          help=f"a tiny run, to try it out: {FINETUNE_QUICK}")
    common.add_device_flags(finetune)


FINETUNE_FLAGS = [
    ("window", 128, "DAR: tokens at distance < window keep full keys and values"),
    ("far_k_dim", 16, "DAR: key coordinates (whole rotary pairs) a distant token keeps"),
    ("far_v_dim", 16, "DAR: value coordinates a distant token keeps"),
    ("max_iters", 40, "fine-tune iterations of every run"),
    ("eval_interval", 10, "evaluate the val loss every this many iterations"),
    ("eval_iters", 4, "batches per split in an evaluation (the same batches for both models)"),
    ("block_size", 1024, "tokens per training sequence"),
    ("batch_size", 1, "sequences per iteration"),
    ("seeds", 2, "runs per model: seeds --seed, --seed + 1, ..."),
    ("seed", 1337, "the first seed"),
    ("log_interval", 5, "print train.py's progress line every this many iterations"),
]
