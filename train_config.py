"""
The settings of a training run, read after train.py: TrainConfig (every flag, its default
and meaning), the defaults that depend on the device and on init_from, and the refusals of
flags that cannot be honoured.
"""

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Literal, get_args, get_origin

import torch

import checkpoint
from data import prepare


def setting(default, meaning):
    """A TrainConfig field: its default, and its meaning for --help."""
    return field(default=default, metadata={"help": meaning})


@dataclass
class TrainConfig:
    # data and output
    dataset: str = setting(prepare.DEFAULT_DATASET, "a folder under data/ (or a path) with "
                           "train.bin, val.bin, meta.json")
    out_dir: str = setting("out", "where ckpt_last.pt, ckpt_best.pt and eval_log.jsonl go")
    overwrite: bool = setting(False, "a new run may replace the checkpoints in OUT_DIR")
    init_from: Literal["scratch", "resume", "convert", "smollm2"] = setting(
        "scratch", "a new model; continue OUT_DIR/ckpt_last.pt; convert --convert_from to this "
        "DAR setting; or fine-tune SmolLM2-135M (DAR with --window; data of --tokenizer smollm2)")
    convert_from: str = setting("", "convert: a full-dimension checkpoint, ours or nanoGPT's")
    calibration_seqs: int = setting(0, "convert: 0 rotates by the weights' SVD, N > 0 by PCA on "
                                    "N training sequences")
    pairs: Literal["score", "high", "low"] = setting(
        "score", "convert or smollm2 (rope): the rotary pairs far keys keep: by MHA2MLA's score "
        "on calibration tokens, or the highest or lowest frequencies")
    # model (resume keeps the checkpoint's, convert the source's: both refuse a change)
    n_layer: int = setting(4, "transformer blocks")
    n_head: int = setting(4, "attention heads per block")
    n_embd: int = setting(128, "model width (head_dim = n_embd / n_head)")
    block_size: int = setting(128, "the longest context, in tokens")
    dropout: float = setting(0.0, "dropout probability while training")
    bias: bool = setting(False, "biases in the linear layers and LayerNorms")
    window: int = setting(32, "tokens at distance < window keep full dimensions")
    far_mode: Literal["slice", "latent"] = setting(
        "slice", "what a distant token keeps: its first far_k_dim / far_v_dim coordinates, or "
        "the paper's learned bottleneck")
    far_k_dim: int = setting(8, "slice: key coordinates kept beyond the window")
    far_v_dim: int = setting(8, "slice: value coordinates kept beyond the window")
    far_latent_dim: int = setting(0, "latent: the bottleneck width r; 0: n_embd / 4")
    latent_init: Literal["inputs", "keys_values"] = setting(
        "inputs", "convert or smollm2 to latent: the bottleneck keeps the inputs' top axes, or "
        "best keeps the keys and values")
    kv_shift: bool = setting(False, "KV shifting: keys and values mixed with the previous token's")
    rope: bool = setting(False, "rotary positions instead of learned position embeddings")
    rope_wpe: bool = setting(False, "rope: keep the learned position embeddings as well")
    rope_base: float = setting(10000.0, "rope: the base of the rotary frequencies")
    rope_prefix: Literal["high", "low", "unrotated"] = setting(
        "low", "rope: a far key's first coordinates: low- or high-frequency pairs, or unrotated")
    # optimisation
    batch_size: int = setting(12, "sequences per micro-step")
    gradient_accumulation_steps: int = setting(1, "micro-steps per iteration")
    max_iters: int = setting(1250, "training iterations")
    learning_rate: float = setting(1e-3, "peak learning rate (AdamW)")
    min_lr: float = setting(1e-4, "learning rate at the end of the cosine decay")
    warmup_iters: int = setting(50, "iterations of linear warm-up")
    lr_decay_iters: int = setting(0, "the cosine decay ends here; 0: max_iters")
    weight_decay: float = setting(0.1, "AdamW weight decay, on matrices only")
    beta1: float = setting(0.9, "AdamW beta1: how slowly the mean gradient forgets")
    beta2: float = setting(0.99, "AdamW beta2: how slowly the mean squared gradient forgets")
    grad_clip: float = setting(1.0, "clip the gradient norm to this; 0: off")
    stage1_iters: int = setting(0, "the paper's recipe for a converted model: first train only "
                                "the latent bottleneck for this many iterations, then everything")
    stage1_lr: float = setting(3e-4, "the constant learning rate of those first iterations")
    # evaluation, checkpoints, logging, the closing sample
    eval_interval: int = setting(250, "evaluate and save every this many iterations")
    eval_iters: int = setting(20, "batches per split in an evaluation")
    ckpt_interval: int = setting(100, "also save ckpt_last.pt every this many iterations")
    log_interval: int = setting(10, "print a progress line every this many iterations")
    sample_tokens: int = setting(300, "tokens sampled from the best checkpoint at the end")
    # system
    device: str = setting("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = setting("auto",
                                                                       checkpoint.DTYPE_HELP)
    compile: bool = setting(False, "torch.compile the model")
    compile_backend: Literal["inductor", "aot_eager"] = setting(
        "inductor", "--compile's backend: inductor builds kernels; aot_eager only traces")
    seed: int = setting(1337, "seed of the weights, the batches and dropout")

    def far_tier(self):
        """The GPTConfig fields of the chosen far mode."""
        if self.far_mode == "latent":
            return dict(far_mode="latent", far_latent_dim=self.far_latent_dim or None)
        return dict(far_k_dim=self.far_k_dim, far_v_dim=self.far_v_dim)


# Defaults that depend on the run: on a CUDA GPU about nanoGPT's baby Shakespeare; convert
# fine-tunes a trained model (a from-scratch warm-up to 1e-3 undoes the conversion, see
# RESULTS.md); smollm2 as nanoGPT's finetune_shakespeare (3e-5), scaled to a CPU.
DEFAULTS = {
    "CUDA": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2, window=64,
                 far_k_dim=16, far_v_dim=16, batch_size=64, max_iters=5000, warmup_iters=100,
                 eval_iters=200, ckpt_interval=500),
    "convert": dict(learning_rate=1e-4, min_lr=1e-5, warmup_iters=0),
    "smollm2": dict(learning_rate=3e-5, min_lr=3e-5, warmup_iters=0, block_size=256,
                    batch_size=4, max_iters=100, eval_interval=50, eval_iters=10,
                    ckpt_interval=50, sample_tokens=100),
}
MODEL_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "dropout", "bias", "window",
                "far_mode", "far_k_dim", "far_v_dim", "far_latent_dim", "kv_shift", "rope",
                "rope_wpe", "rope_base", "rope_prefix")


def parse_args(description, argv):
    """Only the flags given, as a dict: defaults may depend on the device and init_from.
    Every field of TrainConfig is a flag, its metadata["help"] its meaning."""
    p = argparse.ArgumentParser(description=description, argument_default=argparse.SUPPRESS,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        defaults = [f"default: {f.default!r}"]
        defaults += [f"{name}: {table[f.name]!r}" for name, table in DEFAULTS.items()
                     if f.name in table]
        help = f"{f.metadata['help']} ({'; '.join(defaults)})"
        if f.type is bool:
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, help=help)
        elif get_origin(f.type) is Literal:   # the choices are the field's type
            p.add_argument(f"--{f.name}", choices=get_args(f.type), help=help)
        else:
            p.add_argument(f"--{f.name}", type=f.type, help=help, metavar=f.type.__name__.upper())
    return vars(p.parse_args(argv))


def resolve(given, device, resumed=None):
    """Defaults, then the device's and init_from's (or, on resume, the checkpoint's
    settings), then the flags given."""
    base = dataclasses.asdict(TrainConfig())
    if resumed is not None:
        why = "--init_from resume continues the checkpoint's model"
        refuse_changes(given, resumed, MODEL_FIELDS, why)
        base.update(resumed)
    else:
        if torch.device(device).type == "cuda":
            base.update(DEFAULTS["CUDA"])
        base.update(DEFAULTS.get(given.get("init_from"), {}))
    cfg = TrainConfig(**{**base, **given})
    for name in ("batch_size", "gradient_accumulation_steps", "eval_interval", "eval_iters",
                 "ckpt_interval", "log_interval"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name}={getattr(cfg, name)} must be at least 1")
    if cfg.max_iters < 0 or cfg.learning_rate <= 0 or cfg.min_lr < 0:
        raise ValueError("max_iters must be >= 0, learning_rate > 0 and min_lr >= 0")
    if cfg.init_from == "convert" and not cfg.convert_from:
        raise ValueError("--init_from convert needs --convert_from PATH: a full-dimension "
                         "checkpoint, ours or nanoGPT's")
    if cfg.stage1_iters > 0 and cfg.far_mode != "latent":
        raise ValueError("--stage1_iters trains the latent bottleneck alone: it needs --far_mode "
                         "latent")
    other_mode = ("far_k_dim", "far_v_dim") if cfg.far_mode == "latent" else ("far_latent_dim",)
    for name in other_mode:
        if name in given:
            raise ValueError(f"--{name} does not apply to --far_mode {cfg.far_mode}")
    return cfg


def refuse_changes(given, kept, names, why):
    """A flag among `names` whose value differs from `kept`'s cannot be honoured: one line."""
    changed = [name for name in names if name in given and given[name] != kept[name]]
    if changed:
        flags = " ".join("--" + name for name in changed)
        has = ", ".join(f"{name} {kept[name]!r}" for name in changed)
        raise ValueError(f"{flags}: {why} ({has}); drop the flag or start a new run")
