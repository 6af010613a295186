"""
Converting a trained full-dimension model to DAR (slice or latent), read after dar.py.

Slice: per key/value head, W_K = U S V^T; W_Q <- U^T W_Q (every query head reading it)
and W_K <- U^T W_K leave q . k as it was (U is orthogonal) but order the key coordinates
by energy, so a far key's first coordinates keep the most. Values alike, c_proj absorbing
U_v. With calibration tokens U is the principal axes of the keys and values on them.
Rope: a rotation would not commute with RoPE, but a permutation of whole pairs does, with
their frequencies (rope_pairs). Latent: far_up = A, far_down = A^T, A the top r axes of
the attention input (PCA), or of the key/value weights.

    import convert
    dar_model = convert.convert(full_model, window=32, far_k_dim=8, far_v_dim=8)
"""

import dataclasses

import numpy as np
import torch
from torch.nn import functional as F

import checkpoint
import dar
import train_config

# What a converted model keeps of its source: the architecture.
KEEPS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "kv_shift", "rope", "rope_wpe",
         "rope_base", "rope_prefix")

def head_weights(attn):
    """c_attn as per-head views: weights q (H, d, C), k, v (Hkv, d, C); biases or None."""
    d = attn.head_dim
    weights = tuple(w.unflatten(0, (-1, d)) for w in attn.c_attn.weight.split(attn.qkv_sizes))
    if attn.c_attn.bias is None:
        return weights, None
    biases = attn.c_attn.bias.split(attn.qkv_sizes)
    return weights, tuple(b.unflatten(0, (-1, d)) for b in biases)


def principal_axes(moment):
    """Orthogonal matrices whose columns are eigenvectors, largest eigenvalue first."""
    return torch.linalg.eigh(moment)[1].flip(-1)


@torch.no_grad()
def calibrate(model, idx):
    """Per layer: the moment M (C + 1, C + 1) of the attention input with a 1 appended (E[y
    y^T] = [W, b] M [W, b]^T), and the mean norm of each pair of c_attn's output coordinates."""
    stats = []
    def record(module, inputs, output):
        x = F.pad(inputs[0].double().flatten(0, 1), (0, 1), value=1.0)
        pairs = output.double().flatten(0, 1).unflatten(-1, (-1, 2))
        stats.append((x.T @ x / x.size(0), pairs.norm(dim=-1).mean(0)))
    hooks = [b.attn.c_attn.register_forward_hook(record) for b in model.transformer.h]
    was_training = model.training
    model.eval()   # no dropout in what is measured
    model(idx)
    model.train(was_training)
    for hook in hooks:
        hook.remove()
    return stats


def key_value_axes(weights, biases, moment):
    """Axes (Hkv, d, d) of the keys and of the values: the weights' left singular vectors,
    or the principal axes of [W, b] M [W, b]^T (calibration)."""
    axes = []
    for i in (1, 2):
        w = weights[i].double()
        if moment is None:
            axes.append(torch.linalg.svd(w, full_matrices=False)[0])
            continue
        if biases is not None:
            w = torch.cat([w, biases[i][..., None].double()], dim=-1)
        M = moment[:w.size(-1), :w.size(-1)]
        axes.append(principal_axes(w @ M @ w.mT))
    return axes


def pair_order(attn, pairs, pair_norms):
    """Per key/value head, the order a far key keeps its pairs (Hkv, d / 2): by frequency, or
    MHA2MLA's score (arXiv 2502.14837): mean |q pair| * mean |k pair|, summed over a group."""
    if pairs != "score":
        freqs = dar.rope_frequencies(attn.config).to(attn.rope_pairs.device)[attn.rope_pairs]
        return freqs.argsort(dim=-1, descending=pairs == "high", stable=True)
    if pair_norms is None:
        raise ValueError("pairs='score' needs calibration tokens")
    q_norms, k_norms, _ = pair_norms.split([n // 2 for n in attn.qkv_sizes])
    q_norms = q_norms.view(attn.n_kv_head, -1, attn.head_dim // 2)   # (Hkv, g, d / 2)
    score = (q_norms * k_norms.view(attn.n_kv_head, 1, -1)).sum(1)
    return score.argsort(dim=-1, descending=True, stable=True)


@torch.no_grad()
def change_basis(attn, moment, key_order=None):
    """A new orthogonal basis for each head of a layer, in place: the principal axes of its
    values and keys (rope: the key pairs permuted into key_order), not RoPE's rotation."""
    weights, biases = head_weights(attn)   # views: writing them writes c_attn
    U_k, U_v = key_value_axes(weights, biases, moment)
    if attn.rope:   # U_k^T moves pair o = key_order[h, i] (2o, 2o + 1) to 2i, 2i + 1
        rows = torch.stack([2 * key_order, 2 * key_order + 1], dim=-1).flatten(1)
        U_k = torch.eye(attn.head_dim, dtype=U_v.dtype, device=U_v.device)[rows].mT
        attn.rope_pairs.copy_(attn.rope_pairs.gather(1, key_order))
    group = attn.n_head // attn.n_kv_head   # query heads per key/value head
    rotations = (U_k.repeat_interleave(group, 0), U_k, U_v)   # q by its key head's U_k
    for i, U in enumerate(rotations):
        weights[i].copy_(U.mT @ weights[i].double())
        if biases is not None:
            biases[i].copy_((U.mT @ biases[i][..., None].double())[..., 0])
    c_proj = attn.c_proj.weight.view(attn.n_embd, attn.n_head, -1)   # head h's columns
    U_out = U_v.repeat_interleave(group, 0)
    c_proj.copy_(torch.einsum("chi,hij->chj", c_proj.double(), U_out))


@torch.no_grad()
def convert(model, window, far_k_dim=None, far_v_dim=None, calibration=None, far_mode="slice",
            far_latent_dim=None, pairs="score", latent_init="inputs"):
    """A copy of a full model in the new tiers, rotated (slice) or given a bottleneck (latent,
    by latent_init: see bottleneck), by PCA on calibration token ids (B, T) if given; rope:
    its pairs ordered by `pairs`."""
    if not model.config.is_full:
        raise ValueError("convert expects a full-dimension model (far dims = head_dim)")
    if pairs not in ("score", "high", "low") or pairs != "score" and not model.config.rope:
        raise ValueError(f"pairs={pairs!r}: 'score', 'high' or 'low', for a rope model")
    if latent_init not in ("inputs", "keys_values"):
        raise ValueError(f"latent_init={latent_init!r}: 'inputs' or 'keys_values'")
    config = dataclasses.replace(model.config, window=window, far_k_dim=far_k_dim,
                                 far_v_dim=far_v_dim, far_mode=far_mode,
                                 far_latent_dim=far_latent_dim)
    param = next(model.parameters())
    new = dar.GPT(config).to(device=param.device, dtype=param.dtype)
    new.load_state_dict(model.state_dict(), strict=far_mode == "slice")   # latent: + far maps
    stats = [(None, None)] * config.n_layer
    if calibration is not None:
        stats = calibrate(model, calibration)
    for block, (M, pair_norms) in zip(new.transformer.h, stats):
        attn = block.attn
        if far_mode == "slice":
            key_order = pair_order(attn, pairs, pair_norms) if config.rope else None
            change_basis(attn, M, key_order)
            continue
        up, down = bottleneck(attn, M, config.far_latent_dim, latent_init)
        attn.far_up.weight.copy_(up)
        attn.far_down.weight.copy_(down)
    return new


def bottleneck(attn, moment, r, init):
    """far_up (C, r) and far_down (r, C) for a layer. Without calibration, a projection on
    the top r right singular vectors of W = [W_K; W_V]. With the inputs' moment S: "inputs",
    a projection on their top r principal axes (PCA of x); "keys_values", the rank-r map
    that best keeps W x: with U the top r axes of W S W^T (the keys' and values' moment),
    far_down = U^T W and far_up = W^+ U, so W far_up far_down x = U U^T W x."""
    W = attn.c_attn.weight[attn.n_embd:].double()
    if moment is None:
        A = torch.linalg.svd(W, full_matrices=False)[2].T[:, :r]
        return A, A.T
    S = moment[:-1, :-1]
    if init == "inputs":
        A = principal_axes(S)[:, :r]
        return A, A.T
    U = principal_axes(W @ S @ W.T)[:, :r]
    return torch.linalg.pinv(W) @ U, U.T @ W


# ----------------------------------------------------------------------------------------
# train.py --init_from convert: one call

def full_model_from(path, device, dropout):
    """The model in one of our checkpoints or a nanoGPT one (its model_args and weights),
    with the dropout of this run."""
    ckpt = checkpoint.read(path, device)
    if ckpt.get("format") == checkpoint.FORMAT:
        config = ckpt["model_config"]
        state = ckpt["model"]
    elif "model_args" in ckpt and "model" in ckpt:   # nanoGPT: a full-attention GPT
        names = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size")
        config = {k: ckpt["model_args"][k] for k in names}
        head_dim = config["n_embd"] // config["n_head"]
        config.update(window=config["block_size"], far_k_dim=head_dim, far_v_dim=head_dim)
        state = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
    else:
        raise ValueError(f"{path} is neither a dar nor a nanoGPT checkpoint")
    config = {**config, "dropout": dropout}
    return checkpoint.model_from({"model_config": config, "model": state}, device)


def for_training(cfg, given, tokenizer, train_tokens, device):
    """train.py's run cfg started from --convert_from, converted to cfg's tiers: calibrated
    on cfg.calibration_seqs random windows of train_tokens if > 0. cfg's architecture fields
    are set to the source's (a flag that would change them is refused)."""
    full = full_model_from(cfg.convert_from, device, cfg.dropout)
    source = dataclasses.asdict(full.config)
    why = "--init_from convert keeps the source model's architecture"
    train_config.refuse_changes(given, source, KEEPS, why)
    for name in KEEPS:   # the run's settings say what the model is
        setattr(cfg, name, source[name])
    if full.config.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"{cfg.convert_from} has vocab_size {full.config.vocab_size}, the "
                         f"dataset needs {tokenizer.vocab_size}")
    if "pairs" in given and not full.config.rope:
        raise ValueError(f"--pairs orders rotary pairs: {cfg.convert_from} has no rope")
    calibration = None
    if cfg.calibration_seqs > 0:
        n = full.config.block_size
        rng = np.random.default_rng([cfg.seed, 1 << 31])
        starts = rng.integers(0, len(train_tokens) - n - 1, size=cfg.calibration_seqs)
        windows = np.stack([train_tokens[i:i + n] for i in starts]).astype(np.int64)
        calibration = torch.from_numpy(windows).to(device)
    model = convert(full, cfg.window, calibration=calibration, pairs=cfg.pairs,
                    latent_init=cfg.latent_init, **cfg.far_tier())
    return model.train()
