"""
Checkpoints, and the device and dtype they run on; used by train.py, sample.py, bench.py.
Read after dar.py.

A checkpoint is a dict of tensors and plain values (torch.load(weights_only=True) reads
it, nothing else), with "format": "dar-1", the model's config, its weights, the tokenizer
(JSON-able), the training state, and a sha256 of all of it: torch.load does not notice
bytes changed inside a tensor. It is written atomically (a temporary file of this process,
flushed, renamed over the old one), so a kill never leaves half a checkpoint.
"""

import hashlib
import os
import pickle
from contextlib import nullcontext

import torch

import dar
from data.prepare import Tokenizer

FORMAT = "dar-1"
DTYPE_HELP = ("autocast dtype; auto: bfloat16 on a CUDA GPU that supports it, float16 on "
              "other CUDA GPUs, float32 on the CPU and MPS")


def pick_device(name="auto"):
    """auto: cuda, then mps, then cpu; else the device named, checked with one tensor."""
    available = ["cpu"]
    if torch.cuda.is_available():
        available.append("cuda")
    if torch.backends.mps.is_available():
        available.append("mps")
    if name == "auto":
        return "cuda" if "cuda" in available else "mps" if "mps" in available else "cpu"
    try:
        torch.empty(0, device=name)
    except (RuntimeError, AssertionError, ValueError):   # torch's own message: 1,500 chars
        raise ValueError(f"device {name!r} is not available on this machine "
                         f"(available: {', '.join(available)})") from None
    return name


def autocast(device, dtype="auto"):
    """(context, dtype name): bf16 autocast on CUDA where supported (else fp16); fp32
    elsewhere unless asked."""
    device_type = torch.device(device).type
    if dtype == "auto":
        bf16 = device_type == "cuda" and torch.cuda.is_bf16_supported()
        dtype = "bfloat16" if bf16 else "float16" if device_type == "cuda" else "float32"
    if dtype == "float32":
        return nullcontext(), dtype
    return torch.autocast(device_type=device_type, dtype=getattr(torch, dtype)), dtype


def checksum(value):
    """sha256 of a checkpoint's contents: every tensor's dtype, shape and bytes and every
    plain value, in order."""
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


def save(ckpt, path):
    """Atomically, with its checksum: a temporary file of this process, flushed to disk,
    then renamed over the old one."""
    ckpt = {"format": FORMAT, **ckpt}
    ckpt["checksum"] = checksum(ckpt)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read(path, device="cpu"):
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
            raise ValueError(f"{damaged}: its contents do not match the checksum written "
                             "with them)")
    return ckpt


SAMPLE_NEEDS = ("model_config", "model", "tokenizer")   # what sampling reads of a checkpoint


def load(path, device="cpu", needs=SAMPLE_NEEDS):
    """One of our checkpoints, holding the entries `needs`; ValueError with one clear line
    for anything else."""
    ckpt = read(path, device)
    if ckpt.get("format") != FORMAT:
        hint = ""
        if "model_args" in ckpt:
            hint = "; for a nanoGPT checkpoint use train.py --init_from convert"
        raise ValueError(f"{path} is not a dar checkpoint{hint}")
    missing = [name for name in needs if name not in ckpt]
    if missing:
        raise ValueError(f"{path} is an incomplete dar checkpoint: it has no "
                         f"{', '.join(missing)}")
    return ckpt


def model_from(ckpt, device):
    """The dar.GPT a checkpoint describes, in eval mode on `device`."""
    try:
        model = dar.GPT(dar.GPTConfig(**ckpt["model_config"]))
        # a rope checkpoint from before rope_pairs: every head's pairs in their first order
        older = {k: v for k, v in model.state_dict().items() if k.endswith("rope_pairs")}
        model.load_state_dict({**older, **ckpt["model"]})
    except (RuntimeError, KeyError, TypeError) as e:
        reason = " ".join(str(e).split())[:160]
        raise ValueError(f"checkpoint weights do not fit its model config ({reason})") from None
    return model.to(device).eval()


def tokenizer_from(ckpt, path):
    """The tokenizer a checkpoint describes, or one line saying why it cannot be rebuilt."""
    try:
        return Tokenizer(ckpt["tokenizer"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path} has a tokenizer entry that cannot be rebuilt ({e})") from None
