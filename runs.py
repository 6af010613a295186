"""
What a training run needs beyond train.py's loop and its settings (train_config.py), read
after them: one run per output folder, Ctrl-C that saves, DDP's share of an iteration, time
left, the closing sample.
"""

import os
import signal
import sys
import threading
import time

import numpy as np
import torch
import torch.distributed as dist

import cache_bytes
import checkpoint
import decoding
import prefill
from data import prepare


class OutDirLock:
    """One live run per output folder: OUT_DIR/run.lock holds the pid of the run writing
    there. A lock whose process is gone (killed with -9) is stale and taken over."""

    def __init__(self, out_dir):
        self.path = os.path.join(out_dir, "run.lock")
        while not self.take():
            other = self.holder()
            if other is not None and alive(other):
                raise ValueError(writing(out_dir, other))
            try:   # stale: its process is gone
                os.remove(self.path)
            except FileNotFoundError:
                pass

    def take(self):
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True

    def holder(self):
        return read_pid(self.path)

    def release(self):
        if self.holder() == os.getpid():
            os.remove(self.path)


def read_pid(path):
    """The pid in a lock file, or None (none there, or half written)."""
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def writing(out_dir, pid):
    return (f"{out_dir} is being written by another run (process {pid}); wait for it, stop "
            "it, or use --out_dir DIR")


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's process
        return True
    return True


class StopRequest:
    """Ctrl-C (SIGINT) while training asks to stop once the iteration in progress is done,
    so that it can be saved; a second Ctrl-C raises KeyboardInterrupt at once."""

    def __init__(self):
        self.asked = False
        self.installed = threading.current_thread() is threading.main_thread()   # signals
        if self.installed:
            self.previous = signal.signal(signal.SIGINT, self.ask)

    def ask(self, signum, frame):
        self.asked = True
        print("\ninterrupt: stopping after this iteration, which is saved (Ctrl-C again: stop "
              "now)", file=sys.stderr, flush=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def agreed(self, ddp):
        """Whether to stop now; with DDP, every process stops if one was asked."""
        if not ddp:
            return self.asked
        flag = torch.tensor([float(self.asked)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self):
        if self.installed:
            signal.signal(signal.SIGINT, self.previous)


def ddp_share(cfg, world):
    """What each of `world` processes computes of an iteration, in words; ValueError where
    neither the micro-steps nor the sequences divide among them."""
    steps = cfg.gradient_accumulation_steps
    if steps % world == 0:
        return f"{steps // world} of its {steps} micro-steps"
    if cfg.batch_size % world == 0:
        return f"{cfg.batch_size // world} of every micro-step's {cfg.batch_size} sequences"
    raise ValueError(f"neither gradient_accumulation_steps={steps} nor "
                     f"batch_size={cfg.batch_size} divides among the {world} processes")


def iteration_batches(get_batch, data, cfg, it, rank, world, device):
    """This process's share of iteration `it`'s batches. An iteration is the same
    gradient_accumulation_steps batches however many processes train (they depend on the
    seed and `it` only), so DDP computes the step one process would: the processes share
    the micro-steps where they divide evenly, as nanoGPT does, else each one's sequences."""
    rng = np.random.default_rng([cfg.seed, 0, it])
    steps = cfg.gradient_accumulation_steps
    batches = [get_batch(data, "train", cfg, rng, device) for _ in range(steps)]
    if world == 1:
        return batches
    if steps % world == 0:
        share = steps // world
        return batches[rank * share:(rank + 1) * share]
    rows = cfg.batch_size // world
    return [(x[rank * rows:(rank + 1) * rows], y[rank * rows:(rank + 1) * rows])
            for x, y in batches]


def evaluations_left(it, cfg):
    """Evaluations still to come once `it` iterations are done: multiples of eval_interval
    after `it`, and the last iteration."""
    later = cfg.max_iters // cfg.eval_interval - it // cfg.eval_interval
    return later + (cfg.max_iters % cfg.eval_interval > 0)


def format_time(seconds):
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def kept_checkpoint(last, saved_iter):
    """What a stopped run leaves behind, in words."""
    if saved_iter is None:
        return "No checkpoint of this run was written before it"
    return (f"The last good checkpoint is untouched: {last} (iter {saved_iter}; --init_from "
            "resume continues it)")


class Clock:
    """ms per iteration and tokens/s over training alone (not evaluations or saves), and
    the time left: recent iterations weigh most, and each evaluation still to come."""

    def __init__(self, cfg, start_iter):
        self.cfg = cfg
        self.start_iter = start_iter
        self.last = time.time()
        self.paused = None
        self.per_iter = None
        self.eval_seconds = 0.0

    def pause(self):
        self.paused = time.time()

    def evaluated(self):
        self.eval_seconds = time.time() - self.paused

    def resume(self):
        self.last += time.time() - self.paused

    def progress(self, done):
        cfg = self.cfg
        now = time.time()
        recent = (now - self.last) / min(cfg.log_interval, done - self.start_iter)
        self.last = now
        if self.per_iter is None:
            self.per_iter = recent
        else:
            self.per_iter = 0.5 * self.per_iter + 0.5 * recent
        left = self.per_iter * (cfg.max_iters - done)
        left += self.eval_seconds * evaluations_left(done, cfg)
        tokens = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps
        return (f"{recent * 1000:.0f} ms/iter, {tokens / recent:,.0f} tok/s, "
                f"{format_time(left)} left")


def describe(c):
    """The model's settings on one line."""
    far = f"far_k_dim {c.far_k_dim}, far_v_dim {c.far_v_dim}"
    if c.far_mode == "latent":
        far = f"far_mode latent, far_latent_dim {c.far_latent_dim}"
    positions = "wpe"
    if c.rope:
        wpe = ", wpe kept" if c.rope_wpe else ""
        positions = f"rope (base {c.rope_base:g}, prefix {c.rope_prefix}{wpe})"
    return (f"n_layer {c.n_layer}, n_head {c.n_head}, n_embd {c.n_embd}, block_size "
            f"{c.block_size}; window {c.window}, {far}, kv_shift {c.kv_shift}, positions "
            f"{positions}")


def start_ddp(device):
    """The process group of a torchrun launch, and this process's device."""
    cuda = torch.device(device).type == "cuda"
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    if cuda:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    return device


def claim_out_dir(cfg, master, ddp):
    """OUT_DIR, checked by every process (the same answer everywhere, so no process waits
    for one that stopped), then locked for this run by the master."""
    out_dir = cfg.out_dir
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out_dir {out_dir} is a file, not a folder")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out_dir {out_dir} cannot be made ({e.strerror})") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise ValueError(f"--out_dir {out_dir} is not writable")
    other = read_pid(os.path.join(out_dir, "run.lock"))
    if other is not None and alive(other):
        raise ValueError(writing(out_dir, other))
    names = ("ckpt_last.pt", "ckpt_best.pt")
    held = [n for n in names if os.path.exists(os.path.join(out_dir, n))]
    if held and cfg.init_from != "resume" and not cfg.overwrite:
        raise ValueError(f"{out_dir} holds a run ({held[0]}): --init_from resume continues "
                         "it, --overwrite replaces it, --out_dir DIR starts elsewhere")
    if ddp:
        dist.barrier()   # every process checked before the master takes the lock
    return OutDirLock(out_dir) if master else None


def open_dataset(cfg, master):
    """The prepared dataset and tokenizer; a pinned corpus at characters (shakespeare_char,
    networkx_char) prepared first if missing, by the master while the other processes wait."""
    meta_path = os.path.join(prepare.dataset_dir(cfg.dataset), "meta.json")
    corpus = cfg.dataset.removesuffix("_char")
    if master and corpus in prepare.CORPORA and not os.path.exists(meta_path):
        prepare.main(["--corpus", corpus])
    if dist.is_initialized():
        dist.barrier()
    return prepare.open_dataset(cfg.dataset, cfg.block_size)


def closing_sample(cfg, device, ctx):
    """A short sample from the best checkpoint, decoded with the two-tier cache."""
    path = os.path.join(cfg.out_dir, "ckpt_best.pt")
    ckpt = checkpoint.load(path, device)
    model = checkpoint.model_from(ckpt, device)
    tokenizer = checkpoint.tokenizer_from(ckpt, path)
    prefill.enable()   # as sample.py decodes
    decoding.enable()
    print(f"--- sample from {path} (iter {ckpt['iter_num']}, val loss {ckpt['val_loss']:.4f}), "
          "decoded with the two-tier KV cache ---")
    torch.manual_seed(cfg.seed)
    prompt = tokenizer.default_prompt()
    idx = torch.tensor([prompt], device=device)
    cache = model.new_cache(1)
    start = time.perf_counter()
    with ctx:
        stream = model.generate_stream(idx, cfg.sample_tokens, 0.8, 200, cache=cache)
        tokens = [t.item() for t in stream]
    tokens_per_s = len(tokens) / (time.perf_counter() - start)
    print(tokenizer.decode(prompt + tokens))
    print(f"--- {cache_bytes.report(cache)}; {tokens_per_s:.0f} tokens/s ---")
