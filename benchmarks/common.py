"""
What every benchmark family shares: the regimes as GPTConfig fields, their labels,
KV bytes, alternated timing, markdown tables, JSON reports, train.py runs, pictures.
"""

import argparse
import json
import os
import statistics
import time

import torch

import dar
import train


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
        prefix = (
            ""
            if kind == "full"
            else f" ({regime.get('rope_prefix', dar.GPTConfig.rope_prefix)} prefix)"
        )
        label += f", rope{prefix}" + (" + wpe" if regime.get("rope_wpe") else "")
    return label


def flags(regime):
    """GPTConfig fields as train.py flags: --name value, or --name / --no-name for a bool."""
    return [
        x
        for name, value in regime.items()
        for x in (
            [f"--{name}" if value else f"--no-{name}"]
            if isinstance(value, bool)
            else [f"--{name}", str(value)]
        )
    ]


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
    return dar.GPT(
        dar.GPTConfig(
            vocab_size=args.vocab_size,
            block_size=block_size,
            n_layer=args.n_layer,
            n_head=args.n_head,
            n_embd=args.n_embd,
            bias=False,
            **regime,
        )
    )


def train_run(args, out_dir, *flags):
    """One train.py run; returns its eval curve [(iter, val loss), ...]."""
    common = [
        "--dataset",
        args.dataset,
        "--out_dir",
        out_dir,
        "--weight_decay",
        args.weight_decay,
        "--n_layer",
        args.n_layer,
        "--n_head",
        args.n_head,
        "--n_embd",
        args.n_embd,
        "--block_size",
        args.block_size,
        "--batch_size",
        args.batch_size,
        "--eval_iters",
        args.eval_iters,
        "--seed",
        args.seed,
        "--device",
        args.device,
        "--sample_tokens",
        0,
        "--log_interval",
        args.log_interval,
        "--overwrite",
    ]
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


# What the flags that several sub-commands share mean, for --help.
MEANING = dict(
    n_layer="transformer blocks of every model",
    n_head="attention heads per block",
    n_embd="model width (head_dim = n_embd / n_head)",
    batch_size="sequences per training batch",
    window="DAR's window: tokens at distance < window keep full dimensions",
    far_dim="far_k_dim = far_v_dim of the DAR rows (0: head_dim / 4)",
    device="auto (cuda, then mps, then cpu), cpu, cuda, mps",
    out_dir="where the JSON, the runs and the PNGs go",
    vocab_size="vocabulary of the random tokens timed",
    block_size="the longest context of every model, in tokens",
    max_iters="training iterations of every run",
    eval_interval="evaluate the val loss every this many iterations",
    eval_iters="batches per evaluation",
    warmup_iters="iterations of linear learning-rate warm-up",
    learning_rate="peak learning rate (AdamW)",
    weight_decay="AdamW weight decay, on matrices only",
    log_interval="print train.py's progress line every this many iterations",
    seed="the first seed: seeds --seed, --seed + 1, ... where a row has several",
    train_seqs="recall sequences generated for training",
    val_seqs="recall sequences generated to measure accuracy",
)


D = " (default: %(default)s)"


def add_model_flags(s, sizes, random_tokens=False):
    """The model sizes a family times or trains ((n_layer, n_head, n_embd, batch_size,
    window, far_dim): None leaves a flag out), and --device, --out_dir; --vocab_size for the
    families that time random tokens (the others take the dataset's)."""
    names = ("n_layer", "n_head", "n_embd", "batch_size", "window", "far_dim")
    for flag, default in zip(names, sizes):
        if default is not None:   # decode has --batch_sizes, capacity --dims instead
            s.add_argument(f"--{flag}", type=int, default=default, help=MEANING[flag] + D)
    add_device_flags(s)
    if random_tokens:
        s.add_argument("--vocab_size", type=int, default=65, help=MEANING["vocab_size"] + D)


def add_device_flags(s):
    s.add_argument("--device", default="auto", help=MEANING["device"] + D)
    s.add_argument("--out_dir", default="bench_out", help=MEANING["out_dir"] + D)


def add_training_flags(s, block, iters, interval, warmup, lr):
    """train.py's schedule for the families that train models, and --resume."""
    s.add_argument("--block_size", type=int, default=block, help=MEANING["block_size"] + D)
    s.add_argument("--max_iters", type=int, default=iters, help=MEANING["max_iters"] + D)
    s.add_argument("--eval_interval", type=int, default=interval,
                   help=MEANING["eval_interval"] + D)
    s.add_argument("--eval_iters", type=int, default=20, help=MEANING["eval_iters"] + D)
    s.add_argument("--warmup_iters", type=int, default=warmup, help=MEANING["warmup_iters"] + D)
    s.add_argument("--learning_rate", type=float, default=lr, help=MEANING["learning_rate"] + D)
    s.add_argument("--weight_decay", type=float, default=0.1, help=MEANING["weight_decay"] + D)
    s.add_argument("--log_interval", type=int, default=50, help=MEANING["log_interval"] + D)
    s.add_argument("--seed", type=int, default=1337, help=MEANING["seed"] + D)
    s.add_argument("--resume", action="store_true", help="continue each run from the "
                   "ckpt_last.pt in its folder, if there is one: an interrupted bench picks up "
                   "where it stopped, a finished run is only read (the folders must come from "
                   "this revision)")


def add_recall_data_flags(s, val_seqs):
    """The recall data of the recall and capacity families."""
    s.add_argument("--kv_shift", action=argparse.BooleanOptionalAction, default=True,
                   help="in every regime: one layer can then match a key and copy the token "
                   "after it; without it this size did not learn recall in 2000 iterations" + D)
    s.add_argument("--train_seqs", type=int, default=20000, help=MEANING["train_seqs"] + D)
    s.add_argument("--val_seqs", type=int, default=val_seqs, help=MEANING["val_seqs"] + D)


def summary(fn):
    """A bench function's docstring as its sub-command's help (argparse expands %)."""
    return fn.__doc__.replace("%", "%%")
