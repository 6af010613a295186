"""
Sample from a trained checkpoint, decoding with the two-tier KV cache.

    python sample.py --out_dir out --prompt "ROMEO:" --max_new_tokens 500
    python sample.py --ckpt out/ckpt_best.pt --prompt FILE:prompt.txt --num_samples 3
    echo "KING:" | python sample.py --prompt - --top_k 1

Text goes to stdout as it is generated; the KV cache held (bytes per tier, against a full
cache of the same length) and tokens/s go to stderr.
"""

import argparse
import os
import sys
import time
from contextlib import nullcontext

import torch

import dar
from data.prepare import Tokenizer

CHECKPOINT_FORMAT = "dar-1"


def pick_device(name="auto"):
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        torch.empty(0, device=name)
    except (RuntimeError, AssertionError) as e:
        raise ValueError(f"device {name!r} is not usable here ({str(e).splitlines()[0]})")
    return name


def autocast(device, dtype="auto"):
    """bf16 autocast on CUDA where supported (else fp16); fp32 elsewhere unless asked."""
    device_type = torch.device(device).type
    if dtype == "auto":
        bf16 = device_type == "cuda" and torch.cuda.is_bf16_supported()
        dtype = "bfloat16" if bf16 else "float16" if device_type == "cuda" else "float32"
    if dtype == "float32":
        return nullcontext(), dtype
    return torch.autocast(device_type=device_type, dtype=getattr(torch, dtype)), dtype


def read_checkpoint(path, device="cpu"):
    """A checkpoint file's dict, loaded safely (tensors and plain values only)."""
    if not os.path.isfile(path):
        raise ValueError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120]})") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} is not a checkpoint (no dict inside)")
    return ckpt


def load_checkpoint(path, device="cpu"):
    """One of our checkpoints; ValueError with one clear line for anything else."""
    ckpt = read_checkpoint(path, device)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        hint = "; for a nanoGPT checkpoint use train.py --init_from convert" if "model_args" in ckpt else ""
        raise ValueError(f"{path} is not a dar checkpoint{hint}")
    return ckpt


def model_from_checkpoint(ckpt, device):
    try:
        model = dar.GPT(dar.GPTConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError, TypeError) as e:
        raise ValueError(f"checkpoint weights do not fit its model config ({' '.join(str(e).split())[:160]})")
    return model.to(device).eval()


def stream_sample(model, tokenizer, prompt_ids, max_new_tokens, temperature=0.8, top_k=200,
                  use_cache=True, out=None, ctx=nullcontext()):
    """Write one sample to `out` (stdout) as it is generated. Returns (tokens/s, the cache
    at its longest or None)."""
    out = out or sys.stdout
    device = next(model.parameters()).device
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    cache = model.new_cache(1) if use_cache else None
    decode, longest = tokenizer.stream_decoder(), None
    start = time.perf_counter()
    with ctx:
        for token in model.generate_stream(idx, max_new_tokens, temperature, top_k, use_cache, cache):
            out.write(decode([token.item()]))
            out.flush()
            if cache is not None and (longest is None or cache.length >= longest[0]):
                longest = (cache.length, cache.nbytes, cache.tier_nbytes(), cache.full_nbytes)
    return max_new_tokens / (time.perf_counter() - start), longest


def cache_report(longest):
    """One line: what the two-tier cache held against a full cache of the same length."""
    def size(n):
        return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"
    length, held, (local, far), full = longest
    extra = f", kv-shift state {size(held - local - far)}" if held > local + far else ""
    return (f"kv cache at {length} tokens: {size(held)} (local {size(local)}, far {size(far)}{extra}) "
            f"vs {size(full)} for a full cache: {held / full:.3f}x")


def read_prompt(prompt):
    if prompt == "-":
        return sys.stdin.read()
    if prompt.startswith("FILE:"):
        path = prompt[len("FILE:"):]
        if not os.path.isfile(path):
            raise ValueError(f"no prompt file {path}")
        with open(path, encoding="utf-8") as f:
            return f.read()
    return prompt


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="checkpoint file (default: OUT_DIR/ckpt_best.pt, else ckpt_last.pt)")
    p.add_argument("--out_dir", default="out", help="training output folder (default: %(default)s)")
    p.add_argument("--prompt", default="\n", help="text, FILE:path, or - for stdin (default: a newline)")
    p.add_argument("--num_samples", type=int, default=1, help="(default: %(default)s)")
    p.add_argument("--max_new_tokens", type=int, default=500, help="(default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.8, help="(default: %(default)s)")
    p.add_argument("--top_k", type=int, default=200, help="1 is greedy (default: %(default)s)")
    p.add_argument("--seed", type=int, default=1337, help="(default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps (default: %(default)s)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="(default: auto: bfloat16 on CUDA where supported, else float32)")
    p.add_argument("--no_cache", action="store_true", help="recompute the context every step instead")
    args = p.parse_args(argv)
    try:
        if args.num_samples < 1 or args.max_new_tokens < 1 or args.temperature <= 0 or args.top_k < 1:
            raise ValueError("num_samples, max_new_tokens, top_k must be >= 1 and temperature > 0")
        path = args.ckpt or os.path.join(args.out_dir, "ckpt_best.pt")
        if not args.ckpt and not os.path.exists(path):
            path = os.path.join(args.out_dir, "ckpt_last.pt")
        device = pick_device(args.device)
        ckpt = load_checkpoint(path, device)
        model, tokenizer = model_from_checkpoint(ckpt, device), Tokenizer(ckpt["tokenizer"])
        prompt = read_prompt(args.prompt)
        if not prompt:
            raise ValueError("the prompt is empty")
        prompt_ids = tokenizer.encode(prompt)
        ctx, _ = autocast(device, args.dtype)
    except ValueError as e:
        sys.exit(f"error: {e}")
    torch.manual_seed(args.seed)
    try:
        for i in range(args.num_samples):
            sys.stdout.write(prompt)
            tokens_per_s, longest = stream_sample(model, tokenizer, prompt_ids, args.max_new_tokens,
                                                  args.temperature, args.top_k, not args.no_cache, ctx=ctx)
            sys.stdout.write("\n" if i == args.num_samples - 1 else "\n---------------\n")
            sys.stdout.flush()
            report = "no cache, context recomputed every step" if longest is None else \
                cache_report(longest)
            print(f"[{report}; {tokens_per_s:.1f} tokens/s]", file=sys.stderr)
    except BrokenPipeError:   # the reader went away (| head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


if __name__ == "__main__":
    main()
