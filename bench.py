"""
DAR against its baselines, measured side by side. Each sub-command prints a markdown
table and writes its raw numbers as JSON to --out_dir.

    python bench.py speed     training step time per regime; cached vs uncached generation
    python bench.py decode    decode step time against a plain static full cache, batch 1 and 8,
                              contexts up to 4096; KV bytes; batched against sequential samples
    python bench.py quality   val loss of each regime trained identically on Shakespeare, and
                              a trained full model converted (SVD or PCA), zero-shot and fine-tuned
    python bench.py distance  the paper's table where distant tokens matter (Python source): full,
                              DAR, uniform and sliding windows over seeds, loss against KV bytes
    python bench.py recall    associative recall accuracy by distance, per regime and as the
                              number of key-value pairs grows (data/recall.py)
    python bench.py capacity  recall beyond the window as far keys, far values or both shrink,
                              over numbers of pairs and seeds: how many far dimensions a fact needs
    python bench.py attention where recall models look: does the far tier select the pair?
    python bench.py tiers     a picture of what the two-tier cache holds (README's first picture)
    python bench.py pretrained  SmolLM2 made DAR training-free: perplexity against KV bytes
    python bench.py finetune  SmolLM2's DAR and full control fine-tuned identically
    python bench.py gpu       the CUDA path in one table

Sizes are flags, so the same commands scale up on a GPU; `--quick` runs quality, recall and
capacity in minutes. With matplotlib installed (an optional extra) decode, quality and
capacity also draw their pictures into --out_dir.
Times are medians of several runs after warm-up, the variants alternated in one process.
Each family lives in benchmarks/: speed.py (speed, tiers), decode.py, quality.py,
distance.py, recall.py (recall, attention), capacity.py, pretrained.py (pretrained,
finetune), gpu.py.
"""

import argparse

import decoding
import prefill
from benchmarks import capacity, decode, distance, gpu, pretrained, quality, recall, speed

FAMILIES = (speed, decode, quality, distance, recall, capacity, pretrained, gpu)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for family in FAMILIES:
        family.add_parsers(sub)
    args = p.parse_args(argv)
    if args.command in ("speed", "decode") and args.far_dim == 0:
        p.error("--far_dim must be > 0")   # quality: 0 means head_dim / 4; recall sets its own
    prefill.enable()   # cached prompts on CPU by the split path (it falls back elsewhere)
    decoding.enable()   # one-token steps read the cache in place
    run = args.run
    del args.run   # the JSON reports record the arguments alone
    run(args)


if __name__ == "__main__":
    main()
