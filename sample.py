"""
Sample from a trained checkpoint, decoding with the two-tier KV cache.

    python sample.py --out_dir out --prompt "ROMEO:" --max_new_tokens 500
    python sample.py --ckpt out/ckpt_best.pt --prompt FILE:prompt.txt --num_samples 3
    echo "KING:" | python sample.py --prompt - --top_k 1

One sample streams to stdout; several are decoded as one batch (one prefill of the
prompt, its cache rows copied). The cache's bytes and tokens/s go to stderr.
"""

import argparse
import os
import sys
import time
from contextlib import nullcontext

import torch

import cache_bytes
import checkpoint
import decoding
import prefill
import smollm2


def generate_samples(model, tokenizer, prompt_ids, max_new_tokens, num_samples=1,
                     temperature=0.8, top_k=200, use_cache=True, ctx=nullcontext(), stop=None):
    """Write num_samples continuations of the prompt to stdout: one as it is generated,
    several when done; each ends before the token `stop` if it comes (a chat model's end of
    turn). Returns (tokens/s, a line on the cache at its longest, or None)."""
    device = next(model.parameters()).device
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    cache = model.new_cache(num_samples) if use_cache else None
    prompt = tokenizer.decode(prompt_ids)
    decode = tokenizer.stream_decoder()
    new_tokens = []
    report = None
    if num_samples == 1:
        sys.stdout.write(prompt)
    start = time.perf_counter()
    with ctx:
        stream = model.generate_stream(idx, max_new_tokens, temperature, top_k, use_cache, cache,
                                       num_samples)
        for tokens in stream:
            new_tokens.append(tokens)
            ended = num_samples == 1 and tokens.item() == stop
            full = cache is not None and cache.length == model.config.block_size
            if cache is not None and report is None and (full or ended):
                report = cache_bytes.report(cache)
            if ended:
                break
            if num_samples == 1:
                sys.stdout.write(decode([tokens.item()]))
                sys.stdout.flush()
    tokens_per_s = num_samples * len(new_tokens) / (time.perf_counter() - start)
    if cache is not None and report is None:
        report = cache_bytes.report(cache)
    if num_samples > 1:
        samples = torch.cat(new_tokens, dim=1).tolist()
        samples = [s[:s.index(stop)] if stop in s else s for s in samples]
        texts = [prompt + tokenizer.decode(s) for s in samples]
        sys.stdout.write("\n---------------\n".join(texts))
    sys.stdout.write("\n")
    sys.stdout.flush()
    return tokens_per_s, report


def prompt_ids(args, tokenizer):
    """The token ids of --prompt (text, FILE:path, or - for stdin; default a newline, or
    token 0 for a vocabulary without one), in the chat template with --chat."""
    prompt = args.prompt
    if prompt is None and not args.chat:
        return tokenizer.default_prompt()
    if prompt is None:
        prompt = "\n"
    elif prompt == "-":
        prompt = sys.stdin.read()
    elif prompt.startswith("FILE:"):
        path = prompt[len("FILE:"):]
        if not os.path.isfile(path):
            raise ValueError(f"no prompt file {path}")
        with open(path, encoding="utf-8") as f:
            prompt = f.read()
    if not prompt:
        raise ValueError("the prompt is empty")
    ids = tokenizer.gguf.chat(prompt) if args.chat else tokenizer.encode(prompt)
    if not ids:
        raise ValueError(f"the prompt {prompt!r} encodes to no tokens with this tokenizer")
    return ids


def load_model(args, device):
    """The model and tokenizer --init_from names: a checkpoint of ours, or SmolLM2."""
    if args.init_from == "smollm2":
        return smollm2.for_sampling(args, device)
    for name in ("block_size", "window", "far_k_dim", "far_v_dim", "pairs"):
        if getattr(args, name) is not None:   # a checkpoint's context and tiers are its own
            raise ValueError(f"--{name} applies to --init_from smollm2 only (convert a "
                             "checkpoint with train.py --init_from convert)")
    path = args.ckpt
    if path is None:
        path = os.path.join(args.out_dir, "ckpt_best.pt")
        if not os.path.exists(path):
            path = os.path.join(args.out_dir, "ckpt_last.pt")
        if not os.path.exists(path):
            raise ValueError(f"no checkpoint in {args.out_dir} (neither ckpt_best.pt nor "
                             "ckpt_last.pt)")
    ckpt = checkpoint.load(path, device)
    return checkpoint.model_from(ckpt, device), checkpoint.tokenizer_from(ckpt, path)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = " (default: %(default)s)"
    p.add_argument("--init_from", choices=["resume", "smollm2"], default="resume",
                   help="resume: a checkpoint of train.py; smollm2: SmolLM2-135M-Instruct "
                   f"({smollm2.INSTALL})" + d)
    p.add_argument("--ckpt", help="a checkpoint file (default: OUT_DIR/ckpt_best.pt, else "
                   "OUT_DIR/ckpt_last.pt)")
    p.add_argument("--out_dir", default="out", help="the training run's folder" + d)
    smollm2.add_sampling_flags(p)
    p.add_argument("--prompt", help="text, FILE:path, or - for stdin; past block_size its "
                   "last tokens are kept (default: a newline, or token 0)")
    p.add_argument("--num_samples", type=int, default=1, help="samples, one batch" + d)
    p.add_argument("--max_new_tokens", type=int, default=500, help="tokens per sample" + d)
    p.add_argument("--temperature", type=float, default=0.8,
                   help="divides the logits: lower is more conservative, > 0" + d)
    p.add_argument("--top_k", type=int, default=200,
                   help="sample among the k likeliest tokens; 1 is greedy" + d)
    p.add_argument("--seed", type=int, default=1337, help="seed of the sampling" + d)
    p.add_argument("--device", default="auto",
                   help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps" + d)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help=checkpoint.DTYPE_HELP + d)
    p.add_argument("--no_cache", action="store_true",
                   help="recompute the whole context every step (nanoGPT's loop)")
    args = p.parse_args(argv)
    rules = [("num_samples", args.num_samples >= 1, ">= 1"),
             ("max_new_tokens", args.max_new_tokens >= 1, ">= 1"),
             ("temperature", args.temperature > 0, "> 0 (for greedy decoding use --top_k 1)"),
             ("top_k", args.top_k >= 1, ">= 1")]
    for name, ok, rule in rules:
        if not ok:
            sys.exit(f"error: --{name} {getattr(args, name)}: must be {rule}")
    return args


def main(argv=None):
    args = parse_args(argv)
    prefill.enable()   # cached prompts on CPU by the split path (it falls back elsewhere)
    decoding.enable()   # one-token steps read the cache in place
    try:
        device = checkpoint.pick_device(args.device)
        model, tokenizer = load_model(args, device)
        if args.chat and tokenizer.gguf is None:
            raise ValueError("--chat needs a model with a chat template (--init_from smollm2)")
        ids = prompt_ids(args, tokenizer)
        block_size = model.config.block_size
        if len(ids) > block_size:
            print(f"note: the prompt's {len(ids)} tokens exceed block_size {block_size}: the "
                  f"model sees its last {block_size}", file=sys.stderr)
        ctx, _ = checkpoint.autocast(device, args.dtype)
    except ValueError as e:
        sys.exit(f"error: {e}")
    torch.manual_seed(args.seed)
    stop = tokenizer.gguf.eos if args.chat else None
    try:
        tokens_per_s, report = generate_samples(model, tokenizer, ids, args.max_new_tokens,
                                                args.num_samples, args.temperature, args.top_k,
                                                not args.no_cache, ctx, stop)
    except BrokenPipeError:   # the reader went away (| head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return
    report = report or "no cache, context recomputed every step"
    batch = f"{args.num_samples} samples in one batch, " if args.num_samples > 1 else ""
    print(f"[{report}; {batch}{tokens_per_s:.1f} tokens/s]", file=sys.stderr)


if __name__ == "__main__":
    main()
