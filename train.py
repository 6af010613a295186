"""
Train a DAR GPT. With no arguments: prepare Shakespeare (characters) if it is missing,
train a small DAR model sized for the device found (minutes on a laptop CPU, about
nanoGPT's baby Shakespeare on a CUDA GPU), and print a sample from the best checkpoint.

    python train.py
    python train.py --dataset mine_char --window 32 --far_k_dim 4 --far_v_dim 4
    python train.py --far_mode latent --far_latent_dim 32   # the paper's bottleneck
    python train.py --init_from resume                      # after an interruption
    python train.py --init_from convert --convert_from full/ckpt_best.pt --max_iters 200
    torchrun --standalone --nproc_per_node=2 train.py       # DDP: nccl on CUDA, gloo on CPU

Every setting is a flag: a field of TrainConfig, in train_config.py. Ctrl-C saves the
iteration in progress to OUT_DIR/ckpt_last.pt and stops; a second Ctrl-C stops at once.
"""

import dataclasses
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
import convert
import dar
import runs
import smollm2
import train_config


RESUME_NEEDS = ("model_config", "model", "tokenizer", "optimizer", "iter_num",
                "best_val_loss", "val_loss", "train_config", "rng_state")


# ----------------------------------------------------------------------------------------
# data

def get_batch(data, split, cfg, rng, device):
    """A random batch of (input, target) sequences; `rng` decides which, so a run (and a
    resumed run) sees the same data for the same seed. Targets that do not count are -1."""
    tokens = data[split]
    length = data["sequence_length"]
    if length is None:   # any window of the stream
        n = cfg.block_size
        ix = rng.integers(0, len(tokens) - n - 1, size=cfg.batch_size)
    else:                # whole sequences
        n = length - 1
        ix = rng.integers(0, len(tokens) // length, size=cfg.batch_size) * length
    x = torch.from_numpy(np.stack([tokens[i:i + n] for i in ix]).astype(np.int64))
    y = torch.from_numpy(np.stack([tokens[i + 1:i + 1 + n] for i in ix]).astype(np.int64))
    if split + "_answers" in data:   # the loss counts the answer tokens only
        answers = np.stack([data[split + "_answers"][i + 1:i + 1 + n] for i in ix])
        y[torch.from_numpy(answers == 0)] = -1
    if torch.device(device).type == "cuda":
        x = x.pin_memory().to(device, non_blocking=True)
        y = y.pin_memory().to(device, non_blocking=True)
        return x, y
    return x.to(device), y.to(device)


# ----------------------------------------------------------------------------------------
# model and optimizer

def build_model(cfg, given, data, tokenizer, device, resumed):
    if resumed is not None:
        return checkpoint.model_from(resumed, device).train()
    if cfg.init_from == "smollm2":
        return smollm2.for_training(cfg, given, tokenizer, device)
    if cfg.init_from == "convert":
        return convert.for_training(cfg, given, tokenizer, data["train"], device)
    fields = ("n_layer", "n_head", "n_embd", "block_size", "dropout", "bias", "window",
              "kv_shift", "rope", "rope_wpe", "rope_base", "rope_prefix")
    config = dar.GPTConfig(vocab_size=tokenizer.vocab_size, **cfg.far_tier(),
                           **{name: getattr(cfg, name) for name in fields})
    return dar.GPT(config).to(device)


def configure_optimizer(model, cfg, device):
    """AdamW; weight decay on matrices only (not biases, LayerNorms or KV-shift mixes)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = torch.device(device).type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                             fused=fused)


def lr_at(it, cfg):
    """Linear warm-up, then cosine decay to min_lr at lr_decay_iters (nanoGPT's schedule);
    stage1_lr while the bottleneck trains alone."""
    if it < cfg.stage1_iters:
        return cfg.stage1_lr
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


# ----------------------------------------------------------------------------------------
# evaluation, checkpoints and the training loop

@torch.no_grad()
def estimate_loss(model, data, cfg, device, ctx):
    """Mean loss over eval_iters batches per split; the same batches at every evaluation.
    Where the first batch is slow (a long block_size), says how long the rest will take."""
    model.eval()
    losses = {}
    started = time.time()
    for split in ("train", "val"):
        rng = np.random.default_rng([cfg.seed, 1 << 30])
        total = 0.0
        for i in range(cfg.eval_iters):
            x, y = get_batch(data, split, cfg, rng, device)
            with ctx:
                total += model(x, y)[1].item()
            first_batch = time.time() - started
            if split == "train" and i == 0 and first_batch > 5:
                left = runs.format_time(first_batch * (2 * cfg.eval_iters - 1))
                print(f"evaluating: {2 * cfg.eval_iters} batches at {first_batch:.0f} s each, "
                      f"about {left} left", flush=True)
        losses[split] = total / cfg.eval_iters
    model.train()
    return losses


class Run:
    """The model, its optimizer and where it stands (iteration, losses, last save)."""

    def __init__(self, cfg, model, optimizer, tokenizer, ctx):
        self.cfg = cfg
        self.model = model
        self.optimizer = optimizer
        self.tokenizer = tokenizer
        self.ctx = ctx   # autocast, or nothing
        self.iter_num = 0
        self.best_val_loss = float("inf")
        self.val_loss = None
        self.saved_iter = None

    def save(self, name):
        """OUT_DIR/ckpt_{name}.pt, atomically, while the weights are finite: a checkpoint is
        never worse than the one it replaces."""
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            raise FloatingPointError(f"the weights are not finite at iter {self.iter_num}")
        ckpt = {"model_config": dataclasses.asdict(self.model.config),
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "iter_num": self.iter_num, "best_val_loss": self.best_val_loss,
                "val_loss": self.val_loss, "train_config": dataclasses.asdict(self.cfg),
                "tokenizer": self.tokenizer.meta, "rng_state": torch.get_rng_state()}
        checkpoint.save(ckpt, os.path.join(self.cfg.out_dir, f"ckpt_{name}.pt"))
        self.saved_iter = self.iter_num

    def evaluate(self, data, device):
        """The losses, logged to eval_log.jsonl; ckpt_last.pt, and ckpt_best.pt if best."""
        losses = estimate_loss(self.model, data, self.cfg, device, self.ctx)
        if not all(math.isfinite(v) for v in losses.values()):
            raise FloatingPointError(f"evaluation loss is {losses['val']} at iter {self.iter_num}")
        best = losses["val"] < self.best_val_loss
        self.best_val_loss = min(self.best_val_loss, losses["val"])
        self.val_loss = losses["val"]
        self.save("last")
        if best:
            self.save("best")
        with open(os.path.join(self.cfg.out_dir, "eval_log.jsonl"), "a") as f:   # the curves
            f.write(json.dumps({"iter": self.iter_num, "train_loss": losses["train"],
                                "val_loss": losses["val"]}) + "\n")
        print(f"eval {self.iter_num}: train loss {losses['train']:.4f}, val loss "
              f"{losses['val']:.4f}{' (best, saved)' if best else ''}", flush=True)


def step(run, train_model, batches, scaler, ddp):
    """One iteration: the micro-steps' gradients, clipped, one optimizer step. The loss."""
    loss_sum = 0.0
    for micro, (x, y) in enumerate(batches):
        if ddp:   # synchronise gradients on the last micro-step only
            train_model.require_backward_grad_sync = micro == len(batches) - 1
        with run.ctx:
            loss = train_model(x, y)[1] / len(batches)
        scaler.scale(loss).backward()
        loss_sum += loss.item()
    if not math.isfinite(loss_sum):
        raise FloatingPointError(f"training loss is {loss_sum} at iter {run.iter_num}")
    if run.cfg.grad_clip > 0:
        scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.grad_clip)
    scaler.step(run.optimizer)
    scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    return loss_sum


def train_only_bottleneck(model, only):
    """Gradients for the latent bottleneck (far_down, far_up) alone, or for every weight."""
    for name, p in model.named_parameters():
        p.requires_grad_(not only or ".far_" in name)


def train(run, data, device, dtype, ddp, stop):
    """Iterations run.iter_num .. max_iters; the master evaluates and saves every
    eval_interval iterations and at the end, and saves ckpt_last.pt every ckpt_interval.
    Returns False where `stop` was asked first (the iteration reached is saved)."""
    cfg = run.cfg
    rank = dist.get_rank() if ddp else 0
    world = dist.get_world_size() if ddp else 1
    if run.iter_num < cfg.stage1_iters:   # the paper's stage 1: the bottleneck alone trains
        train_only_bottleneck(run.model, True)
    train_model = run.model
    if cfg.compile:
        train_model = torch.compile(train_model, backend=cfg.compile_backend)
    if ddp:
        device_ids = [torch.device(device).index] if "cuda" in device else None
        train_model = DDP(train_model, device_ids=device_ids)
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=dtype == "float16")
    clock = runs.Clock(cfg, run.iter_num)
    while True:
        it = run.iter_num
        if rank == 0 and it != run.saved_iter:   # (a resumed run saved this iteration)
            clock.pause()
            if it % cfg.eval_interval == 0 or it == cfg.max_iters:
                run.evaluate(data, device)
                clock.evaluated()
            elif it % cfg.ckpt_interval == 0:
                run.save("last")
            clock.resume()
        if it >= cfg.max_iters:
            return True
        if stop.agreed(ddp):
            if rank == 0 and run.saved_iter != it:
                run.save("last")
            return False
        for group in run.optimizer.param_groups:
            group["lr"] = lr_at(it, cfg)
        if cfg.stage1_iters > 0 and it == cfg.stage1_iters:   # stage 2: everything trains
            train_only_bottleneck(run.model, False)
        batches = runs.iteration_batches(get_batch, data, cfg, it, rank, world, device)
        loss = step(run, train_model, batches, scaler, ddp)
        run.iter_num = it + 1
        if rank == 0 and run.iter_num % cfg.log_interval == 0:
            print(f"iter {run.iter_num}/{cfg.max_iters}: loss {loss:.4f}, lr {lr_at(it, cfg):.2e}, "
                  f"{clock.progress(run.iter_num)}", flush=True)


def setup(given, device, ddp, master):
    """The settings, the data and the Run (new, converted, pretrained or resumed from
    OUT_DIR/ckpt_last.pt); the autocast dtype."""
    resumed = None
    if given.get("init_from") == "resume":
        path = os.path.join(given.get("out_dir", "out"), "ckpt_last.pt")
        resumed = checkpoint.load(path, device, RESUME_NEEDS)
    resumed_config = None if resumed is None else resumed["train_config"]
    cfg = train_config.resolve(given, device, resumed_config)
    cfg.init_from = given.get("init_from", "scratch")
    if ddp and cfg.stage1_iters > 0:   # DDP reduces the gradients of what trains at its start
        raise ValueError("--stage1_iters is not supported with DDP")
    if ddp:
        share = runs.ddp_share(cfg, dist.get_world_size())
        if master:
            print(f"DDP: {dist.get_world_size()} processes, each computing {share} of an "
                  "iteration (the same step as one process)", flush=True)
    torch.manual_seed(cfg.seed + (dist.get_rank() if ddp else 0))
    if cfg.init_from == "smollm2":   # the optional extra, named before its dataset is missed
        smollm2.gguf_path()
    data, tokenizer = runs.open_dataset(cfg, master)
    if resumed is not None and resumed["tokenizer"]["vocab_size"] != tokenizer.vocab_size:
        raise ValueError(f"the checkpoint's tokenizer does not match dataset {cfg.dataset}")
    model = build_model(cfg, given, data, tokenizer, device, resumed)
    ctx, dtype = checkpoint.autocast(device, cfg.dtype)
    run = Run(cfg, model, configure_optimizer(model, cfg, device), tokenizer, ctx)
    if resumed is not None:
        run.optimizer.load_state_dict(resumed["optimizer"])
        run.iter_num = resumed["iter_num"]
        run.best_val_loss = resumed["best_val_loss"]
        run.val_loss = resumed["val_loss"]
        run.saved_iter = run.iter_num
        torch.set_rng_state(resumed["rng_state"].cpu())
    return run, data, dtype


def main(argv=None):
    given = train_config.parse_args(__doc__, argv)
    ddp = "RANK" in os.environ
    lock = None
    try:
        try:
            device = checkpoint.pick_device(given.get("device", "auto"))
            if ddp:
                device = runs.start_ddp(device)
            master = not ddp or dist.get_rank() == 0
            run, data, dtype = setup(given, device, ddp, master)
            lock = runs.claim_out_dir(run.cfg, master, ddp)   # after every refusal of a flag
        except ValueError as e:
            sys.exit(f"error: {e}")
        train_and_sample(run, data, device, dtype, ddp, master)
    finally:
        if lock is not None:
            lock.release()


def train_and_sample(run, data, device, dtype, ddp, master):
    """Trains to max_iters (or a Ctrl-C, saved), then samples from the best checkpoint."""
    cfg = run.cfg
    if master:
        log = os.path.join(cfg.out_dir, "eval_log.jsonl")
        if cfg.init_from != "resume" and os.path.exists(log):
            os.remove(log)   # a new run, a new curve
        params = sum(p.numel() for p in run.model.parameters()) / 1e6
        print(f"device {device}, {dtype}; {params:.2f}M parameters; "
              f"{runs.describe(run.model.config)}; from iter {run.iter_num}", flush=True)
    stop = runs.StopRequest()
    last = os.path.join(cfg.out_dir, "ckpt_last.pt")
    try:
        finished = train(run, data, device, dtype, ddp, stop)
        if ddp:
            dist.barrier()   # every process done with gloo's threads before any tears down
    except FloatingPointError as e:
        sys.exit(f"error: {e}; stopped. {runs.kept_checkpoint(last, run.saved_iter)}")
    except KeyboardInterrupt:
        done = run.iter_num - (run.saved_iter or 0)
        sys.exit(f"interrupted inside iter {run.iter_num}: it and the {done} finished since the "
                 f"last save are lost. {runs.kept_checkpoint(last, run.saved_iter)}")
    finally:
        stop.restore()
        if ddp:
            dist.destroy_process_group()
    if not finished:
        sys.exit(f"interrupted: saved {last} at iter {run.iter_num}; continue with --init_from "
                 "resume")
    if master and cfg.sample_tokens > 0:
        runs.closing_sample(cfg, device, run.ctx)


if __name__ == "__main__":
    main()
