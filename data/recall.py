"""
Multi-query associative recall (MQAR) data, with the answers far back: a probe of whether
a model can use distant tokens as memory (Zoology's recall task, arranged for DAR).

Each sequence holds block_size + 1 tokens: first N key-value pairs (k1 v1 k2 v2 ...), then
filler into which a query for every key is placed: the key again, followed by its value,
the answer, which can only be copied from the pair. Keys, values and filler come from
disjoint token sets, freshly drawn for every sequence. Each query sits at a distance from
its pair drawn uniformly from [min_dist, max_dist] (where the sequence leaves room), so
that with a window of block_size / 8 most answers lie beyond the window.

Written like the other datasets: data/<name>/train.bin, val.bin, meta.json, plus
train_answers.bin and val_answers.bin (uint16, one per token): at each answer token, the
distance from its query to the pair's value (the token to copy), 0 elsewhere. train.py
restricts the loss to the answers (every other token is random, so its loss is noise that
cannot be learnt).

    python data/recall.py                                  # 8 pairs, block_size 128
    python data/recall.py --pairs 32 --name recall_32
"""

import argparse
import json
import os
import sys

import numpy as np

DATA_DIR = os.path.dirname(os.path.abspath(__file__))


def make_sequence(rng, pairs, n_keys, n_values, n_filler, length, min_dist, max_dist):
    """One sequence of `length` tokens and its answer-distance array (0 = not an answer)."""
    keys = rng.choice(n_keys, size=pairs, replace=False)
    values = n_keys + rng.integers(0, n_values, size=pairs)
    tokens = n_keys + n_values + rng.integers(0, n_filler, size=length)   # filler everywhere
    tokens[0:2 * pairs:2], tokens[1:2 * pairs:2] = keys, values
    answers = np.zeros(length, dtype=np.int64)
    free = np.ones(length, dtype=bool)
    free[:2 * pairs] = False
    for j in rng.permutation(
        pairs
    ):  # pair j's value sits at 2j + 1; its query at 2j + 1 + distance
        lo, hi = max(2 * pairs, 2 * j + 1 + min_dist), min(length - 2, 2 * j + 1 + max_dist)
        slots = lo + np.flatnonzero(
            free[lo : hi + 1] & free[lo + 1 : hi + 2]
        )  # room for key and answer
        if len(slots) == 0:
            raise ValueError(f"no room for {pairs} queries at distances [{min_dist}, {max_dist}] "
                             f"in {length} tokens; use fewer pairs or a longer block_size")
        q = slots[rng.integers(len(slots))]
        tokens[q], tokens[q + 1] = keys[j], values[j]
        answers[q + 1] = q - (2 * j + 1)   # from the query to the token it must copy
        free[q:q + 2] = False
    return tokens, answers


def write_recall(out_dir, pairs=8, block_size=128, n_keys=64, n_values=64, n_filler=16,
                 min_dist=4, max_dist=None, train_seqs=20000, val_seqs=1000, seed=0):
    max_dist = max_dist or block_size
    if pairs < 1 or pairs > n_keys or min_dist < 1 or min_dist > max_dist:
        raise ValueError("need 1 <= pairs <= n_keys and 1 <= min_dist <= max_dist")
    length = block_size + 1
    os.makedirs(out_dir, exist_ok=True)
    for split, count, split_seed in (("train", train_seqs, 0), ("val", val_seqs, 1)):
        rng = np.random.default_rng([seed, split_seed])
        seqs = [make_sequence(rng, pairs, n_keys, n_values, n_filler, length, min_dist, max_dist)
                for _ in range(count)]
        np.concatenate([s[0] for s in seqs]).astype(np.uint16).tofile(
            os.path.join(out_dir, f"{split}.bin")
        )
        np.concatenate([s[1] for s in seqs]).astype(np.uint16).tofile(
            os.path.join(out_dir, f"{split}_answers.bin")
        )
    meta = {
        "tokenizer": "ids",
        "vocab_size": n_keys + n_values + n_filler,
        "sequence_length": length,
        "loss": "answers",
        "pairs": pairs,
        "n_keys": n_keys,
        "n_values": n_values,
        "n_filler": n_filler,
        "min_dist": min_dist,
        "max_dist": max_dist,
        "seed": seed,
    }
    with open(os.path.join(out_dir, "meta.json"), "w") as f:   # last: a complete dataset has it
        json.dump(meta, f)
    return meta


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    d = "(default: %(default)s)"
    p.add_argument("--pairs", type=int, default=8, help="key-value pairs per sequence " + d)
    p.add_argument(
        "--block_size", type=int, default=128, help="sequences hold block_size + 1 tokens " + d
    )
    p.add_argument(
        "--n_keys", type=int, default=64, help="distinct key tokens (ids 0 .. n_keys - 1) " + d
    )
    p.add_argument(
        "--n_values", type=int, default=64, help="distinct value tokens, after the keys " + d
    )
    p.add_argument(
        "--n_filler",
        type=int,
        default=16,
        help="distinct filler tokens between pairs, after the values " + d,
    )
    p.add_argument(
        "--min_dist", type=int, default=4, help="from a query to its pair's value, at least " + d
    )
    p.add_argument("--max_dist", type=int, default=0, help="and at most (default: block_size)")
    p.add_argument("--train_seqs", type=int, default=20000, help="sequences in train.bin " + d)
    p.add_argument("--val_seqs", type=int, default=1000, help="sequences in val.bin " + d)
    p.add_argument("--seed", type=int, default=0, help="seed of the sequences drawn " + d)
    p.add_argument("--name", help="written to data/<name>/ (default: recall_<pairs>)")
    p.add_argument("--data_dir", default=DATA_DIR, help="where <name>/ is written (default: data/)")
    args = p.parse_args(argv)
    out_dir = os.path.join(args.data_dir, args.name or f"recall_{args.pairs}")
    try:
        meta = write_recall(
            out_dir,
            args.pairs,
            args.block_size,
            args.n_keys,
            args.n_values,
            args.n_filler,
            args.min_dist,
            args.max_dist,
            args.train_seqs,
            args.val_seqs,
            args.seed,
        )
    except ValueError as e:
        sys.exit(f"error: {e}")
    print(f"{out_dir}: {args.train_seqs} train and {args.val_seqs} val sequences of "
          f"{meta['sequence_length']} tokens, {args.pairs} pairs each, vocab {meta['vocab_size']}")
    return out_dir


if __name__ == "__main__":
    main()
