"""
The CUDA path in one table: cached = uncached in bf16, train.py's CUDA defaults eager and
compiled, decode and time to first token against the static peer.

    python bench.py gpu
"""

import functools
import json
import os
import statistics
import sys
import time

import torch

import dar
import train
from benchmarks import common
from benchmarks import decode
from data import prepare


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
        sys.exit(
            "error: bench.py gpu needs a CUDA device (--device cpu --quick tries it out without"
            " one)"
        )
    rows = [
        [
            "cached = uncached, bfloat16",
            regime,
            f"max |logit diff| {diff:.3g}",
            "ok" if diff < 0.1 else "FAIL",
        ]
        for regime, diff in cached_vs_uncached_bf16(args.device, args.n_embd).items()
    ]
    for compiled in (False, True):
        rows.append(gpu_training_row(args, compiled))
    decode = [
        "decode",
        "--device",
        args.device,
        "--batch_sizes",
        "1",
        "8",
        "--lengths",
        *map(str, args.decode_lengths),
        "--prefill_lengths",
        str(max(args.decode_lengths)),
        "--steps",
        "10",
        "--warmup",
        "3",
        "--prefill_repeats",
        "3",
        "--sample_repeats",
        "1",
        "--sample_tokens",
        "8",
        "--sample_prompt",
        "8",
        "--kv_heads",
        "0",
        "--out_dir",
        os.path.join(args.out_dir, "gpu"),
    ]
    import bench   # (here: bench.py imports this file)

    bench.main(decode)
    with open(os.path.join(args.out_dir, "gpu", "decode.json")) as f:
        measured = json.load(f)
    for r in measured["rows"]:
        if r["regime"] in ("full", "dar", "sliding"):
            rows.append(
                [
                    f"decode step, B {r['B']}, T {r['T']}",
                    r["regime"],
                    f"{r['ms_per_step']:.2f} ms",
                    f"{r['vs_static']:.2f}x static",
                ]
            )
    for r in measured["prefill"]:
        if r["regime"] in ("full", "dar"):
            rows.append(
                [
                    f"time to first token, T {r['T']}",
                    r["regime"],
                    f"{r['ms']:.1f} ms",
                    f"{r['vs_static']:.2f}x static",
                ]
            )
    name = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    common.report(
        args,
        "gpu",
        [
            f"device: {name}, torch {torch.__version__}\n\n"
            + common.markdown(["check", "case", "measured", ""], rows)
        ],
        {"rows": rows},
    )


@torch.no_grad()
def cached_vs_uncached_bf16(device, n_embd):
    """Per regime, a random bf16 model's logits decoded with the cache against its uncached
    forward, on the device."""
    families = {
        "dar": common.sliced(8, 4, 4),
        "latent": common.latent(8, 8),
        "rope": {**common.sliced(8, 4, 4), "rope": True},
        "gqa": {**common.sliced(8, 4, 4), "n_kv_head": 2},
        "kv_shift": {**common.sliced(8, 4, 4), "kv_shift": True},
    }
    diffs = {}
    for regime, tiers in families.items():
        torch.manual_seed(0)
        model = (
            dar.GPT(
                dar.GPTConfig(
                    vocab_size=65, block_size=64, n_layer=2, n_head=2, n_embd=n_embd, **tiers
                )
            )
            .to(device=device, dtype=torch.bfloat16)
            .eval()
        )
        idx = torch.randint(65, (2, 48), device=device)
        want = model(idx, targets=idx)[0][:, 15:].float()
        cache = model.new_cache(2)
        got = [model(idx[:, :16], cache=cache)[0]] + [
            model(idx[:, t : t + 1], cache=cache)[0] for t in range(16, 48)
        ]
        diffs[regime] = (torch.cat(got, 1).float() - want).abs().max().item()
    return diffs


def gpu_training_row(args, compiled):
    """train.py with its CUDA defaults for --max_iters iterations: ms an iteration (the
    median of its progress lines), peak memory, first and last losses."""
    import contextlib
    import io
    out_dir = os.path.join(args.out_dir, "gpu", "compiled" if compiled else "eager")
    flags = [
        "--dataset",
        args.dataset,
        "--device",
        args.device,
        "--max_iters",
        args.max_iters,
        "--eval_interval",
        args.max_iters,
        "--eval_iters",
        "20",
        "--log_interval",
        max(1, args.max_iters // 10),
        "--sample_tokens",
        0,
        "--out_dir",
        out_dir,
        "--overwrite",
    ] + (["--compile"] if compiled else [])
    if args.quick:
        flags += [
            "--n_layer",
            1,
            "--n_head",
            2,
            "--n_embd",
            16,
            "--block_size",
            32,
            "--batch_size",
            2,
            "--eval_iters",
            1,
        ]
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
    label = (
        "CUDA defaults" if args.device == "cuda" else "tiny (--quick)" if args.quick else "defaults"
    )
    return [
        f"train.py, {label}, bf16 on CUDA, {args.max_iters} iters",
        "compiled" if compiled else "eager",
        (
            f"{statistics.median(ms[1:] or ms or [float('nan')]):.1f} ms/iter, peak {peak:.0f} MiB,"
            f" {seconds:.0f} s"
        ),
        " -> ".join(e.split(", ")[1].split(" (")[0] for e in (evals[0], evals[-1])),
    ]


def pretrained_speed(args, model, dtype, device, ctx, results):
    """dar's full cache against the static peer on SmolLM2: one-token steps after a prompt
    of T tokens (interleaved, median), and the prefill of T tokens."""
    tokens = torch.randint(model.config.vocab_size, (1, max(args.lengths)), device=device)
    decode_rows, prefill_rows = [], []
    for T in args.lengths:
        caches = {
            "static": decode.StaticCache(model.config, 1, getattr(torch, dtype), device),
            "dar full": model.new_cache(1),
        }
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
        steps = common.median_times(
            {name: functools.partial(step, f) for name, f in forwards.items()},
            args.steps,
            args.warmup,
            device,
        )
        static = statistics.median(prefill["static"])
        for name in caches:
            decode_rows.append(
                [T, name, f"{1000 * steps[name]:.1f}", f"{steps[name] / steps['static']:.2f}"]
            )
            ms = 1000 * statistics.median(prefill[name])
            prefill_rows.append(
                [
                    T,
                    name,
                    f"{ms:.0f}",
                    f"{statistics.median(prefill[name]) / static:.2f}",
                ]
            )
            results["decode"].append({"T": T, "regime": name, "ms_per_step": 1000 * steps[name]})
            results["prefill"].append({"T": T, "regime": name, "ms": ms})
    return [common.markdown(["context T", "cache", "ms per token step", "vs static"], decode_rows),
            common.markdown(["prompt T", "cache", "ms to first token", "vs static"], prefill_rows)]


def add_parsers(sub):
    D = common.D
    gpu = sub.add_parser("gpu", help=common.summary(bench_gpu))
    gpu.set_defaults(run=bench_gpu)
    gpu.add_argument("--device", default="cuda", help="the device checked" + D)
    gpu.add_argument("--max_iters", type=int, default=300,
                     help="training iterations of each train.py run" + D)
    gpu.add_argument("--decode_lengths", type=int, nargs="+", default=[1024, 4096],
                     help="decode contexts" + D)
    gpu.add_argument("--n_embd", type=int, default=64,
                     help="width of the cached = uncached models" + D)
    gpu.add_argument("--dataset", default=prepare.DEFAULT_DATASET, help="train.py's dataset "
                     "(prepared here if it is the default and missing: data/cache must hold the "
                     "corpus where there is no network)" + D)
    gpu.add_argument("--quick", action="store_true", help=f"tiny sizes, to try it out: {GPU_QUICK}")
    gpu.add_argument("--out_dir", default="bench_out", help=common.MEANING["out_dir"] + D)
