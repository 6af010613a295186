"""
Train a DAR GPT. With no arguments: prepare Shakespeare (characters) if it is missing,
train a small DAR model sized for the device found (a few minutes on a laptop CPU, about
nanoGPT's baby Shakespeare on a CUDA GPU), and print a sample from the best checkpoint.

    python train.py
    python train.py --dataset mine_char --window 32 --far_k_dim 4 --far_v_dim 4
    python train.py --far_mode latent --far_latent_dim 32   # the far tier as a learned bottleneck
    python train.py --init_from resume                  # after an interruption
    python train.py --init_from convert --convert_from full/ckpt_best.pt --max_iters 200
    torchrun --standalone --nproc_per_node=2 train.py   # DDP: nccl on CUDA, gloo on CPU

Every setting is a flag below (a field of train.py's TrainConfig). Ctrl-C saves the
iteration in progress to OUT_DIR/ckpt_last.pt and stops; a second Ctrl-C stops at once.
"""

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Literal, get_args, get_origin

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import dar
import smollm2
from data.prepare import DATA_DIR, Tokenizer
from data.prepare import main as prepare_default_dataset
from sample import CHECKPOINT_FORMAT, DTYPE_HELP, autocast, cache_report, checksum, default_prompt_ids, \
    generate_samples, load_checkpoint, model_from_checkpoint, pick_device, read_checkpoint, tokenizer_from

DEFAULT_DATASET = "shakespeare_char"


def setting(default, meaning):
    """A TrainConfig field: its default, and its meaning for --help."""
    return field(default=default, metadata={"help": meaning})


@dataclass
class TrainConfig:
    # data and output
    dataset: str = setting(DEFAULT_DATASET, "a folder under data/ (or a path) holding train.bin, val.bin, meta.json")
    out_dir: str = setting("out", "where checkpoints (ckpt_last.pt, ckpt_best.pt) and eval_log.jsonl go")
    overwrite: bool = setting(False, "a new run (scratch, convert) may replace the checkpoints in OUT_DIR")
    init_from: Literal["scratch", "resume", "convert", "smollm2"] = setting(
        "scratch", "a new model; continue OUT_DIR/ckpt_last.pt; convert --convert_from to this DAR setting; or "
        "fine-tune SmolLM2-135M (full attention, or DAR with --window; a dataset of --tokenizer smollm2)")
    convert_from: str = setting("", "convert: a full-dimension checkpoint, ours or nanoGPT's")
    calibration_seqs: int = setting(0, "convert: 0 rotates by the weights' SVD, N > 0 by PCA on N training sequences")
    pairs: Literal["score", "high", "low"] = setting(
        "score", "convert or smollm2, a rope model: the rotary pairs far keys keep: by MHA2MLA's score on the "
        "calibration (convert: needs --calibration_seqs), or the highest or lowest frequencies")
    # model (resume keeps the checkpoint's, convert the source's architecture: both refuse a change)
    n_layer: int = setting(4, "transformer blocks")
    n_head: int = setting(4, "attention heads per block")
    n_embd: int = setting(128, "model width (head_dim = n_embd / n_head)")
    block_size: int = setting(128, "the longest context, in tokens")
    dropout: float = setting(0.0, "dropout probability while training")
    bias: bool = setting(False, "biases in the linear layers and LayerNorms")
    window: int = setting(32, "DAR: tokens at distance < window keep full dimensions (>= block_size: full attention)")
    far_mode: Literal["slice", "latent"] = setting(
        "slice", "what a distant token keeps: its first far_k_dim / far_v_dim coordinates, or a learned latent")
    far_k_dim: int = setting(8, "slice: key coordinates kept beyond the window")
    far_v_dim: int = setting(8, "slice: value coordinates kept beyond the window")
    far_latent_dim: int = setting(0, "latent: the bottleneck width r; 0: n_embd / 4")
    kv_shift: bool = setting(False, "KV shifting: each key and value a learned mix with the previous token's")
    rope: bool = setting(False, "rotary positions on queries and keys instead of learned position embeddings")
    rope_wpe: bool = setting(False, "rope: keep the learned position embeddings (wpe) as well")
    rope_base: float = setting(10000.0, "rope: the base of the rotary frequencies")
    rope_prefix: Literal["high", "low", "unrotated"] = setting(
        "low", "rope: what a far key's first coordinates hold: low- or high-frequency pairs, or unrotated ones")
    # optimisation
    batch_size: int = setting(12, "sequences per micro-step")
    gradient_accumulation_steps: int = setting(1, "micro-steps per iteration (DDP processes share them, or "
                                                  "each micro-step's sequences)")
    max_iters: int = setting(1250, "training iterations")
    learning_rate: float = setting(1e-3, "peak learning rate (AdamW)")
    min_lr: float = setting(1e-4, "learning rate at the end of the cosine decay")
    warmup_iters: int = setting(50, "iterations of linear warm-up")
    lr_decay_iters: int = setting(0, "the cosine decay ends here; 0: max_iters")
    weight_decay: float = setting(0.1, "AdamW weight decay, on matrices only")
    beta1: float = setting(0.9, "AdamW beta1: how slowly the running mean of gradients forgets")
    beta2: float = setting(0.99, "AdamW beta2: how slowly the running mean of squared gradients forgets")
    grad_clip: float = setting(1.0, "clip the gradient norm to this; 0: off")
    # evaluation, checkpoints, logging, the closing sample
    eval_interval: int = setting(250, "evaluate (and save ckpt_last.pt, ckpt_best.pt) every this many iterations")
    eval_iters: int = setting(20, "batches per split in an evaluation")
    ckpt_interval: int = setting(100, "also save ckpt_last.pt every this many iterations (a kill loses fewer)")
    log_interval: int = setting(10, "print a progress line every this many iterations")
    sample_tokens: int = setting(300, "tokens sampled from the best checkpoint at the end; 0: none")
    # system
    device: str = setting("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = setting("auto", DTYPE_HELP)
    compile: bool = setting(False, "torch.compile the model")
    compile_backend: Literal["inductor", "aot_eager"] = setting(
        "inductor", "--compile's backend: inductor builds kernels; aot_eager only traces (a quick check)")
    seed: int = setting(1337, "seed of the weights, the batches and dropout")


# On a CUDA GPU the defaults grow to about nanoGPT's baby Shakespeare model.
CUDA_DEFAULTS = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2, window=64,
                     far_k_dim=16, far_v_dim=16, batch_size=64, max_iters=5000, warmup_iters=100,
                     eval_iters=200, ckpt_interval=500)


# --init_from convert fine-tunes a trained model: a from-scratch schedule (warm-up to 1e-3)
# first undoes the conversion; 1e-4 with no warm-up never did (RESULTS.md, "Fine-tuning a
# conversion").
CONVERT_DEFAULTS = dict(learning_rate=1e-4, min_lr=1e-5, warmup_iters=0)

# --init_from smollm2 fine-tunes a pretrained 135M model: nanoGPT's finetune_shakespeare
# (a constant 3e-5), scaled to a CPU (short sequences, few iterations).
SMOLLM2_DEFAULTS = dict(learning_rate=3e-5, min_lr=3e-5, warmup_iters=0, block_size=256, batch_size=4,
                        max_iters=100, eval_interval=50, eval_iters=10, ckpt_interval=50, sample_tokens=100)


def parse_args(argv):
    """Only the flags given on the command line, as a dict (so defaults can depend on the
    device, and resume can keep the checkpoint's settings)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(TrainConfig):
        defaults = [f"default: {f.default!r}"] + [f"{name}: {table[f.name]!r}" for name, table in
                                                  (("CUDA", CUDA_DEFAULTS), ("convert", CONVERT_DEFAULTS),
                                                   ("smollm2", SMOLLM2_DEFAULTS)) if f.name in table]
        help = f"{f.metadata['help']} ({'; '.join(defaults)})"
        if f.type is bool:
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, help=help)
        elif get_origin(f.type) is Literal:   # the choices are the field's type
            p.add_argument(f"--{f.name}", choices=get_args(f.type), help=help)
        else:
            p.add_argument(f"--{f.name}", type=f.type, help=help, metavar=f.type.__name__.upper())
    return vars(p.parse_args(argv))


def settings(given, device, resumed=None):
    """Defaults, then the CUDA sizes and the fine-tune schedule of convert (or, on resume,
    the checkpoint's settings), then flags."""
    base = dataclasses.asdict(TrainConfig())
    if resumed is not None:
        refuse_changes(given, resumed, MODEL_FIELDS, "--init_from resume continues the checkpoint's model")
        base.update(resumed)
    else:
        if torch.device(device).type == "cuda":
            base.update(CUDA_DEFAULTS)
        if given.get("init_from") == "convert":
            base.update(CONVERT_DEFAULTS)
        if given.get("init_from") == "smollm2":
            base.update(SMOLLM2_DEFAULTS)
    cfg = TrainConfig(**{**base, **given})
    for name in ("batch_size", "gradient_accumulation_steps", "eval_interval", "eval_iters", "ckpt_interval",
                 "log_interval"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name}={getattr(cfg, name)} must be at least 1")
    if cfg.max_iters < 0 or cfg.learning_rate <= 0 or cfg.min_lr < 0:
        raise ValueError("max_iters must be >= 0, learning_rate > 0 and min_lr >= 0")
    if cfg.init_from == "convert" and not cfg.convert_from:
        raise ValueError("--init_from convert needs --convert_from PATH: a full-dimension checkpoint, ours or nanoGPT's")
    other_mode = ("far_k_dim", "far_v_dim") if cfg.far_mode == "latent" else ("far_latent_dim",)
    for name in other_mode:
        if name in given:
            raise ValueError(f"--{name} does not apply to --far_mode {cfg.far_mode}")
    return cfg


# What --init_from resume keeps of the checkpoint, and convert of the source model.
MODEL_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "dropout", "bias", "window", "far_mode",
                "far_k_dim", "far_v_dim", "far_latent_dim", "kv_shift", "rope", "rope_wpe", "rope_base",
                "rope_prefix")
CONVERT_KEEPS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "kv_shift", "rope", "rope_wpe",
                 "rope_base", "rope_prefix")


def refuse_changes(given, kept, names, why):
    """A flag among `names` whose value differs from `kept`'s cannot be honoured: one line."""
    changed = [name for name in names if name in given and given[name] != kept[name]]
    if changed:
        has = ", ".join(f"{name} {kept[name]!r}" for name in changed)
        raise ValueError(f"{' '.join('--' + name for name in changed)}: {why} ({has}); drop the flag or start a new run")


def far_settings(cfg):
    """The GPTConfig fields of the chosen far mode."""
    if cfg.far_mode == "latent":
        return dict(far_mode="latent", far_latent_dim=cfg.far_latent_dim or None)
    return dict(far_k_dim=cfg.far_k_dim, far_v_dim=cfg.far_v_dim)


# ----------------------------------------------------------------------------------------
# data

def open_dataset(cfg, master):
    """meta.json and the two token files, checked; prepares the default corpus if missing."""
    data_dir = cfg.dataset if os.sep in cfg.dataset else os.path.join(DATA_DIR, cfg.dataset)
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(meta_path) and cfg.dataset == DEFAULT_DATASET and master:
        prepare_default_dataset([])
    if dist.is_initialized():
        dist.barrier()
    if not os.path.exists(meta_path):
        raise ValueError(f"no dataset at {data_dir} (meta.json missing); make one with "
                         f"python data/prepare.py --input FILE --name {os.path.basename(data_dir)}")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        tokenizer = Tokenizer(meta)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{meta_path} is not a valid tokenizer description ({e})")
    # A text is one stream, batches are any windows of it. A dataset of fixed-length
    # sequences (recall) says so, and may restrict the loss to its answer tokens.
    length = meta.get("sequence_length")
    data = {"sequence_length": length}
    if length is not None and length - 1 > cfg.block_size:
        raise ValueError(f"{data_dir} holds sequences of {length} tokens: block_size must be >= {length - 1}")
    files = ["train", "val"] + (["train_answers", "val_answers"] if meta.get("loss") == "answers" else [])
    for name in files:
        path = os.path.join(data_dir, f"{name}.bin")
        if not os.path.exists(path) or os.path.getsize(path) % 2:
            raise ValueError(f"{path} is missing or not a file of uint16 token ids")
        data[name] = np.memmap(path, dtype=np.uint16, mode="r")
        if len(data[name]) <= cfg.block_size + 1 or (length and len(data[name]) % length):
            raise ValueError(f"{path} has {len(data[name])} tokens: too few for block_size={cfg.block_size}, "
                             "or not whole sequences")
        if name in ("train", "val") and data[name].max() >= tokenizer.vocab_size:
            raise ValueError(f"{path} holds token ids >= vocab_size {tokenizer.vocab_size}: "
                             "corrupted, or prepared with another tokenizer")
    return data, tokenizer


def get_batch(data, split, cfg, rng, device):
    """A random batch of (input, target) sequences; `rng` decides which, so a run (and a
    resumed run) sees the same data for the same seed. Targets that do not count are -1."""
    tokens, length = data[split], data["sequence_length"]
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
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def iteration_batches(data, cfg, it, rank, world, device):
    """This process's share of iteration `it`'s batches. An iteration is the same
    gradient_accumulation_steps batches of batch_size sequences however many processes
    train (they depend on the seed and `it` only), so DDP computes the step one process
    would. The processes share out the micro-steps where they divide evenly, as nanoGPT
    does, else the sequences of each micro-step."""
    rng = np.random.default_rng([cfg.seed, 0, it])   # (0: the batches of runs made before DDP shared them)
    batches = [get_batch(data, "train", cfg, rng, device) for _ in range(cfg.gradient_accumulation_steps)]
    if world == 1:
        return batches
    if cfg.gradient_accumulation_steps % world == 0:
        share = cfg.gradient_accumulation_steps // world
        return batches[rank * share:(rank + 1) * share]
    rows = cfg.batch_size // world
    return [(x[rank * rows:(rank + 1) * rows], y[rank * rows:(rank + 1) * rows]) for x, y in batches]


def ddp_share(cfg, world):
    """What each of `world` processes computes of an iteration, in words; ValueError where
    neither the micro-steps nor the sequences divide among them."""
    if cfg.gradient_accumulation_steps % world == 0:
        return f"{cfg.gradient_accumulation_steps // world} of its {cfg.gradient_accumulation_steps} micro-steps"
    if cfg.batch_size % world == 0:
        return f"{cfg.batch_size // world} of every micro-step's {cfg.batch_size} sequences"
    raise ValueError(f"neither gradient_accumulation_steps={cfg.gradient_accumulation_steps} nor "
                     f"batch_size={cfg.batch_size} divides among the {world} processes")


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
                print(f"evaluating: {2 * cfg.eval_iters} batches at {first_batch:.0f} s each, about "
                      f"{format_time(first_batch * (2 * cfg.eval_iters - 1))} left", flush=True)
        losses[split] = total / cfg.eval_iters
    model.train()
    return losses


# ----------------------------------------------------------------------------------------
# model, optimizer, checkpoints

def configure_optimizer(model, cfg, device):
    """AdamW; weight decay on matrices only (not biases, LayerNorms or KV-shift mixes)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = torch.device(device).type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=fused)


def full_model_from(path, device, dropout):
    """The model in one of our checkpoints or a nanoGPT one (its model_args and weights),
    with the dropout of this run."""
    ckpt = read_checkpoint(path, device)
    if ckpt.get("format") == CHECKPOINT_FORMAT:
        config, state = ckpt["model_config"], ckpt["model"]
    elif "model_args" in ckpt and "model" in ckpt:   # nanoGPT: a full-attention GPT
        config = {k: ckpt["model_args"][k] for k in
                  ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size")}
        head_dim = config["n_embd"] // config["n_head"]
        config.update(window=config["block_size"], far_k_dim=head_dim, far_v_dim=head_dim)
        state = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
    else:
        raise ValueError(f"{path} is neither a dar nor a nanoGPT checkpoint")
    return model_from_checkpoint({"model_config": {**config, "dropout": dropout}, "model": state}, device)


def build_model(cfg, given, data, tokenizer, device, resumed):
    if resumed is not None:
        return model_from_checkpoint(resumed, device).train()
    if cfg.init_from == "smollm2":
        return pretrained_smollm2(cfg, given, tokenizer, device)
    if cfg.init_from == "convert":
        full = full_model_from(cfg.convert_from, device, cfg.dropout)
        source = dataclasses.asdict(full.config)
        refuse_changes(given, source, CONVERT_KEEPS, "--init_from convert keeps the source model's architecture")
        for name in CONVERT_KEEPS:   # the run's settings say what the model is
            setattr(cfg, name, source[name])
        if full.config.vocab_size < tokenizer.vocab_size:
            raise ValueError(f"{cfg.convert_from} has vocab_size {full.config.vocab_size}, "
                             f"the dataset needs {tokenizer.vocab_size}")
        calibration = None
        if cfg.calibration_seqs > 0:
            sizes = dataclasses.replace(cfg, batch_size=cfg.calibration_seqs, block_size=full.config.block_size)
            calibration = get_batch(data, "train", sizes, np.random.default_rng([cfg.seed, 1 << 31]), device)[0]
        if "pairs" in given and not full.config.rope:
            raise ValueError(f"--pairs orders rotary pairs: {cfg.convert_from} has no rope")
        return dar.convert(full, cfg.window, calibration=calibration, pairs=cfg.pairs, **far_settings(cfg)).train()
    config = dar.GPTConfig(vocab_size=tokenizer.vocab_size, **far_settings(cfg), **{
        f: getattr(cfg, f) for f in ("n_layer", "n_head", "n_embd", "block_size", "dropout", "bias", "window",
                                     "kv_shift", "rope", "rope_wpe", "rope_base", "rope_prefix")})
    return dar.GPT(config).to(device)


def pretrained_smollm2(cfg, given, tokenizer, device):
    """SmolLM2-135M from its GGUF file over block_size tokens, with this run's dropout: full
    attention, or with --window converted to DAR (smollm2.to_dar: whole rotary pairs, by
    --pairs, calibrated on Shakespeare's train split). Its architecture is the file's."""
    if tokenizer.meta["tokenizer"] != "smollm2":
        raise ValueError(f"--init_from smollm2 needs a dataset made with SmolLM2's tokenizer: "
                         f"python data/prepare.py --tokenizer smollm2 (got {tokenizer.meta['tokenizer']!r})")
    keeps = [name for name in CONVERT_KEEPS + ("far_mode", "far_latent_dim") if name != "block_size" and name in given]
    if keeps:
        raise ValueError(f"{' '.join('--' + n for n in keeps)}: --init_from smollm2 keeps the file's architecture "
                         "(a rotary model's far tier is a slice of whole pairs)")
    tiers = [name for name in ("far_k_dim", "far_v_dim", "pairs") if name in given]
    if tiers and "window" not in given:
        raise ValueError(f"--{tiers[0]}: --init_from smollm2 is full attention unless --window makes it DAR")
    model = smollm2.from_gguf(block_size=cfg.block_size, dropout=cfg.dropout, device=device)
    if "window" in given:
        model = smollm2.to_dar(model, tokenizer.gguf, cfg.window, given.get("far_k_dim"), given.get("far_v_dim"),
                               cfg.pairs)
    for name in CONVERT_KEEPS + ("window", "far_k_dim", "far_v_dim"):   # the run's settings say what it is
        setattr(cfg, name, getattr(model.config, name))
    return model.train()


def save_checkpoint(path, model, optimizer, cfg, tokenizer, iter_num, best_val_loss, val_loss):
    """Atomically: a temporary file, flushed to disk, then renamed over the old one."""
    ckpt = {"format": CHECKPOINT_FORMAT, "model_config": dataclasses.asdict(model.config),
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "iter_num": iter_num, "best_val_loss": best_val_loss, "val_loss": val_loss,
            "train_config": dataclasses.asdict(cfg), "tokenizer": tokenizer.meta,
            "rng_state": torch.get_rng_state()}
    ckpt["checksum"] = checksum(ckpt)   # loading checks it (sample.read_checkpoint)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def lr_at(it, cfg):
    """Linear warm-up, then cosine decay to min_lr at lr_decay_iters (nanoGPT's schedule)."""
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


# ----------------------------------------------------------------------------------------
# the training loop

def format_time(seconds):
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def evaluate_and_save(model, optimizer, data, cfg, tokenizer, state, device, ctx):
    losses = estimate_loss(model, data, cfg, device, ctx)
    if not all(math.isfinite(v) for v in losses.values()):
        raise FloatingPointError(f"evaluation loss is {losses['val']} at iter {state['iter_num']}")
    best = losses["val"] < state["best_val_loss"]
    state["best_val_loss"], state["val_loss"] = min(state["best_val_loss"], losses["val"]), losses["val"]
    for name in ["last"] + (["best"] if best else []):
        save_checkpoint(os.path.join(cfg.out_dir, f"ckpt_{name}.pt"), model, optimizer, cfg, tokenizer,
                        state["iter_num"], state["best_val_loss"], losses["val"])
    state["saved_iter"] = state["iter_num"]
    with open(os.path.join(cfg.out_dir, "eval_log.jsonl"), "a") as f:   # the loss curves
        f.write(json.dumps({"iter": state["iter_num"], "train_loss": losses["train"],
                            "val_loss": losses["val"]}) + "\n")
    print(f"eval {state['iter_num']}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
          f"{' (best, saved)' if best else ''}", flush=True)


def save_between_evaluations(model, optimizer, cfg, tokenizer, state):
    """ckpt_last.pt between evaluations (its val_loss is the last evaluation's), while the
    weights are finite: a checkpoint is never worse than the one it replaces."""
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise FloatingPointError(f"the weights are not finite at iter {state['iter_num']}")
    save_checkpoint(os.path.join(cfg.out_dir, "ckpt_last.pt"), model, optimizer, cfg, tokenizer,
                    state["iter_num"], state["best_val_loss"], state["val_loss"])
    state["saved_iter"] = state["iter_num"]


def evaluations_left(it, cfg):
    """Evaluations still to come once `it` iterations are done: multiples of eval_interval
    after `it`, and the last iteration."""
    return cfg.max_iters // cfg.eval_interval - it // cfg.eval_interval + (cfg.max_iters % cfg.eval_interval > 0)


class StopRequest:
    """Ctrl-C (SIGINT) while training asks to stop once the iteration in progress is done,
    so that it can be saved; a second Ctrl-C raises KeyboardInterrupt at once."""

    def __init__(self):
        self.asked = False
        self.installed = threading.current_thread() is threading.main_thread()   # (signals: main thread only)
        if self.installed:
            self.previous = signal.signal(signal.SIGINT, self.ask)

    def ask(self, signum, frame):
        self.asked = True
        print("\ninterrupt: stopping after this iteration, which is saved (Ctrl-C again: stop now)",
              file=sys.stderr, flush=True)
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


def train(model, optimizer, data, cfg, tokenizer, state, device, ctx, dtype, ddp, stop):
    """Runs iterations state['iter_num'] .. max_iters; on the master, evaluates and saves
    every eval_interval iterations and at the end, saves ckpt_last.pt every ckpt_interval.
    Returns False where `stop` was asked first (the iteration reached is saved)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    train_model = torch.compile(model, backend=cfg.compile_backend) if cfg.compile else model
    if ddp:
        train_model = DDP(train_model, device_ids=[torch.device(device).index] if "cuda" in device else None)
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=dtype == "float16")
    tokens_per_iter = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps
    start_iter, t_last, per_iter, eval_seconds = state["iter_num"], time.time(), None, 0.0
    while True:
        it = state["iter_num"]
        if rank == 0 and not (it == start_iter and it > 0):   # (a resumed run saved this iteration)
            t_save = time.time()
            if it % cfg.eval_interval == 0 or it == cfg.max_iters:
                evaluate_and_save(model, optimizer, data, cfg, tokenizer, state, device, ctx)
                eval_seconds = time.time() - t_save
            elif it % cfg.ckpt_interval == 0:
                save_between_evaluations(model, optimizer, cfg, tokenizer, state)
            t_last += time.time() - t_save   # ms/iter and tok/s count training only
        if it >= cfg.max_iters:
            return True
        if stop.agreed(ddp):
            if rank == 0 and state["saved_iter"] != it:
                save_between_evaluations(model, optimizer, cfg, tokenizer, state)
            return False
        for group in optimizer.param_groups:
            group["lr"] = lr_at(it, cfg)
        batches = iteration_batches(data, cfg, it, rank, world, device)
        loss_sum = 0.0
        for micro, (x, y) in enumerate(batches):
            if ddp:   # synchronise gradients on the last micro-step only
                train_model.require_backward_grad_sync = micro == len(batches) - 1
            with ctx:
                loss = train_model(x, y)[1] / len(batches)
            scaler.scale(loss).backward()
            loss_sum += loss.item()
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"training loss is {loss_sum} at iter {it}")
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        state["iter_num"] = it + 1
        if rank == 0 and (it + 1) % cfg.log_interval == 0:
            now = time.time()
            recent = (now - t_last) / min(cfg.log_interval, it + 1 - start_iter)
            per_iter = recent if per_iter is None else 0.5 * per_iter + 0.5 * recent   # recent iterations weigh most
            left = per_iter * (cfg.max_iters - it - 1) + eval_seconds * evaluations_left(it + 1, cfg)
            print(f"iter {it + 1}/{cfg.max_iters}: loss {loss_sum:.4f}, lr {lr_at(it, cfg):.2e}, "
                  f"{recent * 1000:.0f} ms/iter, {tokens_per_iter / recent:,.0f} tok/s, "
                  f"{format_time(left)} left", flush=True)
            t_last = now


def closing_sample(cfg, device, ctx):
    """A short sample from the best checkpoint, decoded with the two-tier cache."""
    path = os.path.join(cfg.out_dir, "ckpt_best.pt")
    ckpt = load_checkpoint(path, device)
    model, tokenizer = model_from_checkpoint(ckpt, device), tokenizer_from(ckpt, path)
    print(f"--- sample from {path} (iter {ckpt['iter_num']}, val loss {ckpt['val_loss']:.4f}), "
          "decoded with the two-tier KV cache ---")
    torch.manual_seed(cfg.seed)
    prompt = default_prompt_ids(tokenizer)
    tokens_per_s, stats = generate_samples(model, tokenizer, prompt, cfg.sample_tokens, ctx=ctx)
    print(f"--- {cache_report(stats)}; {tokens_per_s:.0f} tokens/s ---")


RESUME_NEEDS = ("model_config", "model", "tokenizer", "optimizer", "iter_num", "best_val_loss", "val_loss",
                "train_config", "rng_state")


def describe(c):
    """The model's settings on one line."""
    far = (f"far_mode latent, far_latent_dim {c.far_latent_dim}" if c.far_mode == "latent"
           else f"far_k_dim {c.far_k_dim}, far_v_dim {c.far_v_dim}")
    rope = f"rope (base {c.rope_base:g}, prefix {c.rope_prefix}{', wpe kept' if c.rope_wpe else ''})" if c.rope else "wpe"
    return (f"n_layer {c.n_layer}, n_head {c.n_head}, n_embd {c.n_embd}, block_size {c.block_size}; "
            f"window {c.window}, {far}, kv_shift {c.kv_shift}, positions {rope}")


def kept_checkpoint(last, state):
    """What a stopped run leaves behind, in words."""
    if state["saved_iter"] is None:
        return "No checkpoint of this run was written before it"
    return f"The last good checkpoint is untouched: {last} (iter {state['saved_iter']}; --init_from resume continues it)"


def setup(argv):
    """Settings, process group, device, data, model, optimizer and the resumed state."""
    given = parse_args(argv)
    ddp = "RANK" in os.environ
    device = pick_device(given.get("device", "auto"))
    if ddp:
        cuda = torch.device(device).type == "cuda"
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        if cuda:
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
    resumed = None
    if given.get("init_from") == "resume":
        resumed = load_checkpoint(os.path.join(given.get("out_dir", "out"), "ckpt_last.pt"), device, RESUME_NEEDS)
    cfg = settings(given, device, None if resumed is None else resumed["train_config"])
    cfg.init_from = given.get("init_from", "scratch")
    master = not ddp or dist.get_rank() == 0
    if ddp:
        share = ddp_share(cfg, dist.get_world_size())
        if master:
            print(f"DDP: {dist.get_world_size()} processes, each computing {share} of an iteration "
                  "(the same step as one process)", flush=True)
    if resumed is None and not cfg.overwrite:
        held = [n for n in ("ckpt_last.pt", "ckpt_best.pt") if os.path.exists(os.path.join(cfg.out_dir, n))]
        if held:
            raise ValueError(f"{cfg.out_dir} holds a run ({held[0]}): --init_from resume continues it, "
                             "--overwrite replaces it, --out_dir DIR starts elsewhere")
    torch.manual_seed(cfg.seed + (dist.get_rank() if ddp else 0))
    data, tokenizer = open_dataset(cfg, master)
    if resumed is not None and resumed["tokenizer"]["vocab_size"] != tokenizer.vocab_size:
        raise ValueError(f"the checkpoint's tokenizer does not match dataset {cfg.dataset}")
    model = build_model(cfg, given, data, tokenizer, device, resumed)
    optimizer = configure_optimizer(model, cfg, device)
    state = {"iter_num": 0, "best_val_loss": float("inf"), "val_loss": None, "saved_iter": None}
    if resumed is not None:
        optimizer.load_state_dict(resumed["optimizer"])
        state = {key: resumed[key] for key in ("iter_num", "best_val_loss", "val_loss")}
        state["saved_iter"] = state["iter_num"]
        torch.set_rng_state(resumed["rng_state"].cpu())
    return cfg, device, data, tokenizer, model, optimizer, state, ddp, master


def main(argv=None):
    try:
        cfg, device, data, tokenizer, model, optimizer, state, ddp, master = setup(argv)
        ctx, dtype = autocast(device, cfg.dtype)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        log = os.path.join(cfg.out_dir, "eval_log.jsonl")
        if cfg.init_from != "resume" and os.path.exists(log):
            os.remove(log)   # a new run, a new curve
        c = model.config
        print(f"device {device}, {dtype}; {model.get_num_params() / 1e6:.2f}M parameters; {describe(model.config)}; "
              f"from iter {state['iter_num']}", flush=True)
    stop = StopRequest()
    last = os.path.join(cfg.out_dir, "ckpt_last.pt")
    try:
        finished = train(model, optimizer, data, cfg, tokenizer, state, device, ctx, dtype, ddp, stop)
    except FloatingPointError as e:
        sys.exit(f"error: {e}; stopped. {kept_checkpoint(last, state)}")
    except KeyboardInterrupt:
        done = state["iter_num"] - (state["saved_iter"] or 0)
        sys.exit(f"interrupted inside iter {state['iter_num']}: it and the {done} finished since the last save "
                 f"are lost. {kept_checkpoint(last, state)}")
    finally:
        stop.restore()
        if ddp:
            dist.destroy_process_group()
    if not finished:
        sys.exit(f"interrupted: saved {last} at iter {state['iter_num']}; continue with --init_from resume")
    if master and cfg.sample_tokens > 0:
        closing_sample(cfg, device, ctx)


if __name__ == "__main__":
    main()
