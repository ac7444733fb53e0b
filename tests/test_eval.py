"""eval.py / engine/eval.py: sliding-window perplexity against an explicit per-window loop,
stride handling, equality with train.py's own validation numbers (final metrics.jsonl event),
--compare against the base and the adapter run, response-only loss, multiple-choice
log-likelihoods against direct unbatched computation, harness metric definitions, bad input."""
import json
import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import eval as eval_cli  # noqa: E402
import train  # noqa: E402
from engine import eval as tasks  # noqa: E402
from engine.config import preset  # noqa: E402
from engine.data import TokenSplit, eval_windows  # noqa: E402
from engine.model import Transformer  # noqa: E402
from engine.trainer import evaluate  # noqa: E402
from tokenizer.base import Tokenizer  # noqa: E402


class CharTok(Tokenizer):
    """One id per ASCII character (10 + code point); BOS 1, EOS 2."""

    def __init__(self):
        self.vocab_size, self.bos_id, self.eos_id, self.pad_id, self.add_bos = 140, 1, 2, None, False

    def encode(self, text, add_bos=None, add_eos=False, parse_special=True):
        return [1] * bool(add_bos) + [10 + ord(c) for c in text] + [2] * add_eos

    def decode(self, ids, skip_special=False):
        return "".join(chr(i - 10) for i in ids if i >= 10)

    def save(self, directory):
        raise NotImplementedError


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Transformer(preset("tiny", vocab_size=140)).eval()


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


# ---------------------------------------------------------------------------------------------
# Perplexity
# ---------------------------------------------------------------------------------------------
def explicit_sliding_nll(model, tokens, seq_len, stride):
    """HF's perplexity-guide loop, one window at a time, float64 log_softmax + gather per target;
    whole windows only. Returns (total nats, scored target indices, context length of each)."""
    total, scored, ctx, scored_to = 0.0, [], [], 0
    for begin in range(0, len(tokens), stride):
        if begin + seq_len + 1 > len(tokens):
            break
        x = torch.tensor(tokens[begin:begin + seq_len], dtype=torch.long)[None]
        with torch.no_grad():
            logp = torch.log_softmax(model(x)[0].double(), dim=-1)             # (T, V)
        for t in range(seq_len):
            j = begin + t + 1  # target index
            if j > scored_to:
                total -= logp[t, int(tokens[j])].item()
                scored.append(j)
                ctx.append(t + 1)
        scored_to = begin + seq_len
    return total, scored, ctx


@pytest.mark.parametrize("seq_len, stride", [(16, 16), (16, 5), (16, 1), (7, 3), (10, 9)])
def test_perplexity_equals_explicit_window_loop(tiny, seq_len, stride):
    rng = np.random.default_rng(seq_len * 100 + stride)
    n = 203 if stride > 1 else 61  # the explicit loop runs one window per stride
    tokens = rng.integers(10, 140, size=n).astype(np.uint16)
    res = tasks.perplexity(tiny, tokens, n_bytes=500, seq_len=seq_len, stride=stride, batch_size=3)
    total, scored, ctx = explicit_sliding_nll(tiny, tokens, seq_len, stride)
    assert scored == list(range(1, len(scored) + 1))  # every target once, in order, no gaps
    assert res["n_tokens"] == len(scored) and res["unscored_tail"] == len(tokens) - 1 - len(scored)
    assert res["unscored_tail"] < stride
    assert res["loss"] == pytest.approx(total / len(scored), rel=1e-6)
    assert res["ppl"] == pytest.approx(math.exp(total / len(scored)), rel=1e-6)
    assert res["bpb"] == pytest.approx(total / len(scored) / (500 / n) / math.log(2), rel=1e-6)
    # Beyond the first window every target sees more than seq_len - stride tokens of context.
    assert min(ctx[seq_len:], default=seq_len) == seq_len - stride + 1


def test_stride_equal_seq_len_is_train_validation(tiny):
    tokens = np.random.default_rng(1).integers(10, 140, size=300).astype(np.uint16)
    split = TokenSplit(tokens, n_bytes=777)
    starts = eval_windows(split, 32)
    assert [s for s, _ in tasks.sliding_windows(len(tokens), 32, 32)] == starts
    want = evaluate(tiny, split, starts, 32, 4, "cpu", torch.autocast("cpu", enabled=False))
    got = tasks.perplexity(tiny, tokens, 777, 32, 32, batch_size=4)
    assert got["loss"] == want["val_loss"] and got["ppl"] == want["val_ppl"]
    assert got["bpb"] == want["val_bpb"]
    # Shorter than one window: one window over the whole text; bad strides are refused.
    short = tasks.perplexity(tiny, tokens[:9], 20, 64)
    assert short["n_tokens"] == 8 and short["seq_len"] == 8
    with pytest.raises(ValueError, match="--stride must be in 1..--seq-len"):
        tasks.sliding_windows(100, 8, 9)


def _tiny_hf_llama(tmp_path, vocab_size):
    """A random tiny transformers LlamaForCausalLM saved to tmp_path, and the engine's load of it."""
    transformers = pytest.importorskip("transformers")
    from engine.checkpoint import load_model_dir
    cfg = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=256, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # away from the default init (norms 1), so every tensor matters
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g) if name.endswith("norm.weight")
                    else 0.1 * torch.randn(p.shape, generator=g))
    hf.save_pretrained(str(tmp_path))
    return hf, load_model_dir(str(tmp_path)).eval()


def hf_guide_windows(model, ids, max_length, stride):
    """transformers' "Perplexity of fixed-length models" loop; per window (sum of NLL, scored
    tokens) instead of the running sums."""
    seq_len, prev_end_loc, out = ids.size(1), 0, []
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc  # may be different from stride on last loop
        input_ids = ids[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            nll = model(input_ids, labels=target_ids).loss.item()
        # the targets the loss averaged over: labels past the first position (transformers
        # shifts them). The guide counts valid - batch_size, one short for every window after
        # the first (its first label is already -100): its weights, not its windows, are off.
        n = (target_ids[:, 1:] != -100).sum().item()
        out.append((nll * n, n))
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return out


@pytest.mark.parametrize("seq_len, stride, n", [(16, 16, 97), (16, 5, 117), (31, 7, 95), (8, 1, 40),
                                                (16, 16, 100), (16, 5, 123)])
def test_perplexity_matches_transformers_guide(tmp_path, seq_len, stride, n):
    """A window of seq_len inputs is the guide's max_length = seq_len + 1 tokens: the first
    scores all but the first token, each later one only the stride targets no earlier one
    scored. Where whole windows end short of the text, the guide's last (partial) window
    scores the tail, which ours leaves unscored and reports."""
    hf, ours = _tiny_hf_llama(tmp_path, 128)
    tokens = np.random.default_rng(seq_len + stride + n).integers(0, 128, size=n)
    got = tasks.perplexity(ours, tokens.astype(np.uint16), 1000, seq_len, stride, batch_size=4)
    per = hf_guide_windows(hf, torch.tensor(tokens)[None], seq_len + 1, stride)
    whole = per[:got["n_windows"]]
    n_scored = sum(k for _, k in whole)
    assert got["n_tokens"] == n_scored
    assert got["n_tokens"] + got["unscored_tail"] == sum(k for _, k in per) == n - 1
    assert (got["unscored_tail"] == 0) == (len(per) == got["n_windows"])
    torch.testing.assert_close(got["loss"], sum(s for s, _ in whole) / n_scored, rtol=1e-5, atol=0)


FLAGS = ["--batch-size", "4", "--seq-len", "32", "--no-progress", "--threads", "1",
         "--warmup-steps", "2", "--log-every", "5", "--eval-batches", "2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny train.py run from scratch (validation = last 20% of the corpus) and a LoRA
    fine-tune of it on another text (separate --val-data file)."""
    tmp = tmp_path_factory.mktemp("ev")
    os.environ["WHETSTONE_CACHE"] = str(tmp / "cache")
    rng = random.Random(3)
    words = ["thou art", "my liege", "fair lady", "the crown", "good sir", "anon"]
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words) for _ in range(5)) for _ in range(700)))
    base = str(tmp / "base")
    assert train.main(["--data", str(corpus), "--out", base, "--preset", "tiny", "--vocab-size", "300",
                       "--max-steps", "20", "--eval-every", "10", "--lr", "3e-3",
                       "--val-fraction", "0.2", *FLAGS]) == 0
    other = ["to be", "or not", "that is", "the question"]
    dom, dom_val = tmp / "domain.txt", tmp / "domain_val.txt"
    dom.write_text("\n".join(" ".join(rng.choice(other) for _ in range(5)) for _ in range(400)))
    dom_val.write_text("\n".join(" ".join(rng.choice(other) for _ in range(5)) for _ in range(60)))
    lora = str(tmp / "lora")
    assert train.main(["--base", base, "--finetune", "lora", "--data", str(dom), "--val-data",
                       str(dom_val), "--out", lora, "--max-steps", "10", "--eval-every", "10",
                       "--lr", "1e-2", "--lora-r", "4", *FLAGS]) == 0
    return tmp, str(corpus), base, str(dom_val), lora


def final_event(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(l) for l in f if json.loads(l).get("final")][-1]


def test_reproduces_train_py_final_validation(runs, capsys):
    tmp, corpus, base, _, _ = runs
    out = str(tmp / "r1.json")
    assert eval_cli.main(["--model", base, "--data", corpus, "--task", "perplexity", "--seq-len", "32",
                          "--val-fraction", "0.2", "--batch-size", "4", "--json", out,
                          "--no-progress"]) == 0
    got = json.load(open(out))["results"]["model"]
    want = final_event(base)
    assert got["loss"] == pytest.approx(want["val_loss"], rel=1e-6)
    assert got["ppl"] == pytest.approx(want["val_ppl"], rel=1e-6)
    assert got["bpb"] == pytest.approx(want["val_bpb"], rel=1e-6)
    printed = capsys.readouterr().out
    assert "bits per byte" in printed and f"{want['val_loss']:.4f}" in printed


def test_compare_base_and_adapter(runs):
    tmp, _, base, dom_val, lora = runs
    out = str(tmp / "r2.json")
    # The adapter directory alone names its base (adapter_config.json).
    assert eval_cli.main(["--model", lora, "--compare", "--data", dom_val, "--task", "perplexity",
                          "--seq-len", "32", "--batch-size", "4", "--json", out, "--no-progress"]) == 0
    rep = json.load(open(out))
    assert rep["model"] == base and rep["adapter"] == lora
    tuned, base_res = rep["results"]["tuned"], rep["results"]["base"]
    assert tuned["loss"] == pytest.approx(final_event(lora)["val_loss"], rel=1e-6)
    plain = str(tmp / "r3.json")
    assert eval_cli.main(["--model", base, "--data", dom_val, "--task", "perplexity", "--seq-len",
                          "32", "--batch-size", "4", "--json", plain, "--no-progress"]) == 0
    assert base_res["loss"] == pytest.approx(json.load(open(plain))["results"]["model"]["loss"], rel=1e-6)
    assert tuned["loss"] < base_res["loss"]  # the adapter learned the domain
    # Default report location: inside the adapter directory, named after what was evaluated.
    assert eval_cli.main(["--model", base, "--adapter", lora, "--data", dom_val, "--task",
                          "perplexity", "--seq-len", "32", "--no-progress"]) == 0
    rep = os.path.join(lora, "eval-lora-perplexity-domain_val.json")
    assert json.load(open(rep))["results"]["tuned"]["loss"] == pytest.approx(tuned["loss"], rel=1e-5)


def test_response_loss_counts_only_response_tokens(runs):
    tmp, _, base, _, _ = runs
    rows = [{"prompt": "thou art ", "completion": "my liege"},
            {"prompt": "good sir, the crown", "completion": " fair lady anon"},
            {"prompt": "anon", "completion": " thou"}]
    data = write_jsonl(tmp / "sft.jsonl", rows)
    out = str(tmp / "r4.json")
    assert eval_cli.main(["--model", base, "--data", data, "--task", "response-loss", "--json", out,
                          "--batch-size", "2", "--no-progress"]) == 0
    got = json.load(open(out))["results"]["model"]
    # By hand: per sample, CE of each completion token (and the EOS) given everything before it.
    from engine.hub import load_model
    model, tok = load_model(base)
    total, n = 0.0, 0
    for r in rows:
        p = tok.encode(r["prompt"], add_bos=tok.add_bos)
        ids = tok.encode(r["prompt"] + r["completion"], add_bos=tok.add_bos) + [tok.eos_id]
        k = len(p) if ids[:len(p)] == p else len(p) - 1  # a token straddling the boundary trains
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0].double(), -1)
        total -= sum(logp[t - 1, ids[t]].item() for t in range(k, len(ids)))
        n += len(ids) - k
    assert got["n_tokens"] == n and got["loss"] == pytest.approx(total / n, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Multiple choice
# ---------------------------------------------------------------------------------------------
ITEMS = [{"context": "The sky is", "choices": ["blue", "green", "a very long answer"], "label": 0},
         {"context": "2 + 2 = ", "choices": ["4", "5"], "label": 0},
         {"context": "", "choices": ["yes", "no"], "label": 1},
         {"context": "Pick: ", "choices": ["abc", "x", "hello world", "z"], "label": "x"}]


def test_encode_pair_like_the_harness():
    tok = CharTok()
    assert tasks.encode_pair(tok, "ab ", "cd") == ([ord("a") + 10, ord("b") + 10],
                                                 [ord(" ") + 10, ord("c") + 10, ord("d") + 10])
    assert tasks.encode_pair(tok, "", " x") == ([1], [ord(" ") + 10, ord("x") + 10])


def test_choice_loglikelihoods_equal_direct_computation(tiny, tmp_path):
    tok = CharTok()
    items = tasks.load_choice_items(write_jsonl(tmp_path / "mc.jsonl", ITEMS))
    assert items[3].label == 1
    reqs = [tasks.encode_pair(tok, it.context, " " + c) for it in items for c in it.choices]
    got = tasks.loglikelihoods(tiny, reqs, max_len=256, batch_size=3)
    direct = []
    for ctx, cont in reqs:  # one unpadded sequence at a time
        ids = ctx + cont
        with torch.no_grad():
            logp = torch.log_softmax(tiny(torch.tensor([ids[:-1]]))[0].double(), -1)
        direct.append(sum(logp[len(ctx) + k - 1, t].item() for k, t in enumerate(cont)))
    assert [g for g, _ in got] == pytest.approx(direct, abs=1e-4)
    # Left truncation keeps the continuation and the last max_len tokens.
    short = tasks.loglikelihoods(tiny, reqs[:1], max_len=5)
    ctx, cont = reqs[0]
    ids = (ctx + cont)[-6:]
    with torch.no_grad():
        logp = torch.log_softmax(tiny(torch.tensor([ids[:-1]]))[0].double(), -1)
    assert short[0][0] == pytest.approx(sum(logp[5 - len(cont) + k, t].item()
                                            for k, t in enumerate(cont)), abs=1e-4)
    # Metrics from the direct numbers.
    res = tasks.choice_task(tiny, tok, items, 256, batch_size=2)
    k, lls = 0, []
    for it in items:
        lls.append(direct[k:k + len(it.choices)])
        k += len(it.choices)
    acc = np.mean([np.argmax(ll) == it.label for ll, it in zip(lls, items)])
    acc_norm = np.mean([np.argmax(np.array(ll) / [len(c) for c in it.choices]) == it.label
                        for ll, it in zip(lls, items)])
    assert res["acc"] == acc and res["acc_norm"] == acc_norm and res["n"] == 4


def _bpe_tokenizer():
    """A small byte-level BPE (GPT-2 pre-tokenizer, merges with a leading space) without BOS."""
    from tokenizer.bpe import ByteLevelBPETokenizer, bytes_to_unicode
    b2u = bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "a"), ("i", "s"), ("Ġ", "is"),
              ("Ġ", "b"), ("l", "u"), ("Ġb", "lu"), ("Ġblu", "e"), ("Ġ", "Ġ"), ("Ċ", "Ċ")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    eos = len(vocab)
    return ByteLevelBPETokenizer(vocab, merges, pre_tokenizer="gpt-2", eos_id=eos,
                                 added_tokens=[{"id": eos, "content": "<|endoftext|>"}])


def harness_loglikelihood(hf, htok, context, continuation, max_length):
    """lm-evaluation-harness' HFLM.loglikelihood for one request, on transformers objects:
    an empty context is prefix_token_id (BOS, else EOS); otherwise _encode_pair (the
    context's trailing whitespace moves to the continuation, whose ids are those of the whole
    past the context's, add_special_tokens=False); _loglikelihood_tokens' left truncation to
    max_length + 1 tokens and logits[inplen - contlen:inplen] slice; (sum, is_greedy)."""
    if context == "":
        prefix = htok.bos_token_id if htok.bos_token_id is not None else htok.eos_token_id
        context_enc, continuation_enc = [prefix], htok.encode(continuation, add_special_tokens=False)
    else:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces > 0:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole_enc = htok.encode(context + continuation, add_special_tokens=False)
        context_enc = htok.encode(context, add_special_tokens=False)
        continuation_enc = whole_enc[len(context_enc):]
    inp = torch.tensor((context_enc + continuation_enc)[-(max_length + 1):][:-1])
    inplen, contlen = len(inp), len(continuation_enc)
    with torch.no_grad():
        logits = torch.log_softmax(hf(inp[None]).logits.double(), dim=-1)[0]
    logits = logits[inplen - contlen:inplen]
    cont_toks = torch.tensor(continuation_enc)
    greedy = bool((logits.argmax(dim=-1) == cont_toks).all())
    return logits.gather(1, cont_toks[:, None]).sum().item(), greedy


def test_choice_matches_lm_evaluation_harness(tmp_path):
    """Log-likelihoods, greedy flags and metrics equal the harness' rules computed with
    transformers (model and tokenizer loaded from what the engine reads); batch size 1 and
    right-padded batches of mixed lengths give the same numbers."""
    transformers = pytest.importorskip("transformers")
    tok = _bpe_tokenizer()
    tok.save(str(tmp_path / "tok"))
    htok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    hf, ours = _tiny_hf_llama(tmp_path / "m", 272)
    rows = [{"context": "the sky is", "choices": ["blue", "the blue", "is"], "label": 0},
            {"context": "is the ", "choices": ["blue", "a"], "label": 1},     # trailing space
            {"context": "", "choices": ["the", "blue is"], "label": 0},       # EOS as context
            {"context": "the\n\n", "choices": ["é", "ab c"], "label": 1},   # newline, 2 bytes
            {"context": "a " * 30 + "the", "choices": ["blue", "x" * 3], "label": 0}]  # truncated
    items = tasks.load_choice_items(write_jsonl(tmp_path / "mc.jsonl", rows))
    max_len = 24
    ref = [harness_loglikelihood(hf, htok, it.context, " " + c, max_len)
           for it in items for c in it.choices]
    reqs = [tasks.encode_pair(tok, it.context, " " + c) for it in items for c in it.choices]
    assert len(reqs[-1][0]) + len(reqs[-1][1]) > max_len + 1  # the left truncation is exercised
    for bs in (1, 4, len(reqs)):
        got = tasks.loglikelihoods(ours, reqs, max_len, batch_size=bs)
        torch.testing.assert_close([g for g, _ in got], [r for r, _ in ref], rtol=0, atol=1e-4)
        assert [g for _, g in got] == [r for _, r in ref]
    res = tasks.choice_task(ours, tok, items, max_len, batch_size=3)
    k, lls = 0, []
    for it in items:
        lls.append([r for r, _ in ref[k:k + len(it.choices)]])
        k += len(it.choices)
    assert res == tasks.choice_metrics(items, lls)


def test_choice_metrics_by_hand():
    items = [tasks.ChoiceItem("c", ["a", "bbbb"], 1), tasks.ChoiceItem("c", ["é", "ab"], 1)]
    # item 0: raw picks "a" (-2 > -4); per character (and byte) -2 < -1 picks "bbbb".
    # item 1: raw picks "é" (-1.5 > -2.4); per character -1.5 < -1.2 picks "ab"; per byte
    # ("é" is 2 bytes) -0.75 > -1.2 picks "é".
    m = tasks.choice_metrics(items, [[-2.0, -4.0], [-1.5, -2.4]])
    # stderr as the harness' mean_stderr: sample std (n - 1) of the 0/1 scores / sqrt(n)
    assert m == {"acc": 0.0, "acc_norm": 1.0, "acc_bytes": 0.5, "n": 2, "acc_stderr": 0.0,
                 "acc_norm_stderr": 0.0, "acc_bytes_stderr": pytest.approx(0.5)}
    hits = [1, 0, 0, 1, 1, 1, 0]  # acc_stderr of 7 items, by the formula
    m = tasks.choice_metrics([tasks.ChoiceItem("c", ["a", "b"], 1 - h) for h in hits],
                             [[-1.0, -2.0]] * 7)
    mean = sum(hits) / 7
    want = math.sqrt(sum((h - mean) ** 2 for h in hits) / 6) / math.sqrt(7)
    assert m["acc"] == pytest.approx(mean) and m["acc_stderr"] == pytest.approx(want)
    assert tasks.choice_metrics(items[:1], [[-2.0, -4.0]])["acc_stderr"] is None


def test_choice_that_adds_no_token_is_an_error(tmp_path):
    """With --delimiter '' a choice can merge into the context's last token ("hel" + "lo" ->
    one token "hello"): its continuation was empty, scored log p = 0 and beat every real
    choice. lm-evaluation-harness asserts on it; here it is one FILE:LINE error."""
    from tokenizer.bpe import ByteLevelBPETokenizer, bytes_to_unicode
    b2u = bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    vocab.update({"he": 256, "hel": 257, "hell": 258, "hello": 259})
    tok = ByteLevelBPETokenizer(vocab, [("h", "e"), ("he", "l"), ("hel", "l"), ("hell", "o")],
                                pre_tokenizer="gpt-2", eos_id=0)
    assert tasks.encode_pair(tok, "hel", "lo") == ([257], [])
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=260)).eval()
    path = write_jsonl(tmp_path / "mc.jsonl", [{"context": "hel", "choices": ["p", "lo"], "label": 0}])
    items = tasks.load_choice_items(path)
    with pytest.raises(ValueError, match=r"mc\.jsonl:1: choice 1 \('lo'\) adds no token"):
        tasks.choice_task(model, tok, items, 64, delimiter="", source=path)
    assert tasks.choice_task(model, tok, items, 64)["n"] == 1  # with the default ' ' it scores


@pytest.mark.parametrize("row, why", [
    ({"context": "c", "choices": ["a", "b"]}, "missing 'label'"),
    ({"context": "c", "choices": ["a", "b"], "label": 2}, "label 2 out of range for 2 choices"),
    ({"context": "c", "choices": ["a", "b"], "label": -1}, "label -1 out of range"),
    ({"context": "c", "choices": [], "label": 0}, "empty 'choices'"),
    ({"context": "c", "choices": "ab", "label": 0}, "'choices' must be a non-empty list"),
    ({"context": "c", "choices": ["a", ""], "label": 0}, "choice 1 is not a non-empty string"),
    ({"context": "c", "choices": ["a", "b"], "label": True}, "'label' must be an integer"),
    ({"context": "c", "choices": ["a", "b"], "label": "z"}, "label 'z' is not one of the choices"),
    ({"choices": ["a"], "label": 0}, "missing string 'context'"),
    ("[1, 2", "invalid JSON"),
])
def test_bad_choice_lines(tmp_path, row, why):
    path = write_jsonl(tmp_path / "bad.jsonl", [ITEMS[0], "", row])
    with pytest.raises(ValueError, match=rf"bad\.jsonl:3: {why}"):
        tasks.load_choice_items(path)


def test_choice_data_missing_or_a_directory(tmp_path):
    with pytest.raises(ValueError, match="is a directory; choice data is one JSONL file"):
        tasks.load_choice_items(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="data file not found"):
        tasks.load_choice_items(str(tmp_path / "nope.jsonl"))


def test_cli_errors_one_line(runs, tmp_path, capsys):
    _, _, base, _, _ = runs
    for args, msg in [(["--task", "perplexity", "--compare"], "--compare needs --adapter"),
                      (["--task", "perplexity", "--seq-len", "8", "--stride", "9"], "--stride must be <="),
                      (["--task", "choice", "--val-fraction", "0.1"], "--val-fraction applies"),
                      # flags another task would ignore silently
                      (["--task", "choice", "--stride", "4"], "--stride applies to --task perplexity"),
                      (["--task", "response-loss", "--delimiter", ":"],
                       "--delimiter applies to --task choice"),
                      # a missing data file: before the model loads (a bad model name here)
                      (["--task", "perplexity", "--model", "no-such-model"],
                       "--data x: no such file or directory")]:
        with pytest.raises(SystemExit) as e:
            eval_cli.parse_args(["--model", base, "--data", "x", *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and msg in err[0]
    bad = write_jsonl(tmp_path / "mc.jsonl", [ITEMS[0], {"context": "c", "choices": ["a"], "label": 3}])
    r = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--model", base, "--data", bad,
                        "--task", "choice", "--no-progress"], capture_output=True, text=True,
                       cwd=str(tmp_path), env=dict(os.environ))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: {bad}:2: label 3 out of range for 1 choices"]


def test_perplexity_on_sft_data_names_response_loss(tmp_path, capsys):
    """Chat JSONL given to --task perplexity read "FILE:1: expected an object with a string
    'text' field" (after the model loaded); now, before it loads, what the file holds and the
    task that scores it."""
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}] * 3)
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    d = tmp_path / "docs"
    d.mkdir()
    (d / "a.txt").write_text("text")
    inner = write_jsonl(d / "b.jsonl", [{"instruction": "say hi", "output": "hi"}])
    reads = "--task perplexity reads text, or JSONL with a 'text' field"
    for data, msg in [
            (chat, f"--data {chat} holds chat (messages) records (SFT data): {reads}; score them "
                   "with --task response-loss"),
            (pairs, f"--data {pairs} holds preference (prompt/chosen/rejected) records (DPO "
                    f"data): {reads}"),
            (str(d), f"--data {d}: {inner} holds instruction records (SFT data): {reads}; score "
                     "them with --task response-loss on that file")]:
        with pytest.raises(SystemExit) as e:
            eval_cli.parse_args(["--model", "no-such-model", "--data", data, "--task", "perplexity"])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and f"error: {msg} (see --help)" in err[0], err
    # the other tasks read such files
    assert eval_cli.parse_args(["--model", "m", "--data", chat, "--task", "response-loss"]).data == chat


def test_task_given_data_of_another_task_names_the_task(tmp_path, capsys):
    """Choice items given to --task perplexity / response-loss read "FILE:1: expected an object
    with a string 'text' field" or "cannot tell the data format"; text / SFT / DPO records given
    to --task choice read "FILE:1: missing string 'context'". Now, before the model loads, one
    line naming what the file holds and the task that scores it."""
    mc = write_jsonl(tmp_path / "mc.jsonl", ITEMS)
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "the sky is blue"}])
    sft = write_jsonl(tmp_path / "i.jsonl", [{"instruction": "say hi", "output": "hi"}])
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    reads = '--task choice reads JSONL of {"context", "choices", "label"}'
    for task, data, msg in [
            ("perplexity", mc, f"--data {mc} holds multiple-choice items (context/choices/label): "
                               "score them with --task choice"),
            ("response-loss", mc, f"--data {mc} holds multiple-choice items (context/choices/label): "
                                  "score them with --task choice"),
            ("choice", text, f"--data {text} holds text records: {reads}; score them with --task "
                             "perplexity"),
            ("choice", sft, f"--data {sft} holds instruction records (SFT data): {reads}; score "
                            "them with --task response-loss"),
            ("choice", pairs, f"--data {pairs} holds preference (prompt/chosen/rejected) records "
                              f"(DPO data): {reads}")]:
        with pytest.raises(SystemExit) as e:
            eval_cli.parse_args(["--model", "no-such-model", "--data", data, "--task", task])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].endswith(f"error: {msg} (see --help)"), err
    assert eval_cli.parse_args(["--model", "m", "--data", mc, "--task", "choice"]).data == mc


def test_cli_device_and_bad_values_one_line(tmp_path, capsys, monkeypatch):
    """No traceback for --device cuda on a CPU-only machine, a --seq-len past the model's
    context (positions it never saw) or out-of-range --threads / --val-fraction / --dtype."""
    from engine.checkpoint import save_model
    from tokenizer.bpe import ByteLevelBPETokenizer, bytes_to_unicode
    b2u = bytes_to_unicode()
    tok = ByteLevelBPETokenizer({b2u[b]: b for b in range(256)}, [], pre_tokenizer="gpt-2",
                                added_tokens=[{"id": 256, "content": "<|endoftext|>"}], eos_id=256)
    save_model(Transformer(preset("tiny", vocab_size=257, max_position_embeddings=64)),
               str(tmp_path / "m"), tok)
    (tmp_path / "t.txt").write_text("to be or not to be " * 20)
    base = ["--model", str(tmp_path / "m"), "--data", str(tmp_path / "t.txt"), "--task",
            "perplexity", "--no-progress", "--json", str(tmp_path / "r.json")]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for args, msg in [(["--device", "cuda"], "error: --device cuda: CUDA is not available"),
                      (["--seq-len", "65"], "error: --seq-len 65 exceeds the model context of 64"),
                      # the default window is the context (64): a stride past it was cut silently
                      (["--stride", "100"], "error: --stride 100 exceeds --seq-len 64")]:
        assert eval_cli.cli(base + args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(msg), err
    for args, msg in [(["--threads", "0"], "--threads must be >= 1"),
                      (["--val-fraction", "1.5"], "--val-fraction must be in (0, 1)"),
                      (["--val-fraction", "nan"], "--val-fraction must be in (0, 1)"),
                      (["--dtype", "int8"], "--dtype: unknown dtype 'int8'"),
                      # refused before the run, not after it (the report was lost)
                      (["--json", str(tmp_path)], "is a directory")]:
        with pytest.raises(SystemExit) as e:
            eval_cli.cli(base + args)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and msg in err[0], err
    assert eval_cli.cli(base + ["--seq-len", "64", "--device", "cpu"]) == 0  # the context itself
    assert json.load(open(tmp_path / "r.json"))["results"]["model"]["seq_len"] == 64


def test_reports_never_overwrite_earlier_ones(tmp_path, capsys, monkeypatch):
    """eval.py wrote eval_report.json by default and replaced the report of any earlier
    evaluation. Default names now say what was evaluated and take the next free number; an
    existing --json is refused before the run unless --force."""
    from engine.checkpoint import save_model
    from tokenizer.bpe import ByteLevelBPETokenizer, bytes_to_unicode
    b2u = bytes_to_unicode()
    tok = ByteLevelBPETokenizer({b2u[b]: b for b in range(256)}, [], pre_tokenizer="gpt-2",
                                added_tokens=[{"id": 256, "content": "<|endoftext|>"}], eos_id=256)
    save_model(Transformer(preset("tiny", vocab_size=257, max_position_embeddings=32)),
               str(tmp_path / "m"), tok)
    (tmp_path / "a.txt").write_text("to be or not to be " * 6)
    (tmp_path / "b.txt").write_text("the quick brown fox " * 6)
    monkeypatch.chdir(tmp_path)
    run = lambda *a: eval_cli.cli(["--model", "m", "--task", "perplexity", "--no-progress", *a])  # noqa: E731
    for data in ("a.txt", "b.txt", "a.txt"):
        assert run("--data", data) == 0
    data_of = lambda f: json.load(open(tmp_path / f))["data"]  # noqa: E731
    assert data_of("eval-m-perplexity-a.json") == data_of("eval-m-perplexity-a-2.json") == "a.txt"
    assert data_of("eval-m-perplexity-b.json") == "b.txt"
    assert "report: ./eval-m-perplexity-a-2.json" in capsys.readouterr().out
    # an explicit path that exists: one line before the run; --force replaces it
    with pytest.raises(SystemExit) as e:
        run("--data", "b.txt", "--json", "eval-m-perplexity-a.json")
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "already exists; pass --force" in err[0]
    assert data_of("eval-m-perplexity-a.json") == "a.txt"
    assert run("--data", "b.txt", "--json", "eval-m-perplexity-a.json", "--force") == 0
    assert data_of("eval-m-perplexity-a.json") == "b.txt"
    # the name is claimed atomically: a file that appears during the run is not replaced either
    (tmp_path / "late.json").write_text("{}")
    with pytest.raises(FileExistsError, match="late.json already exists"):
        eval_cli.write_report(str(tmp_path / "late.json"), "x")
    assert (tmp_path / "late.json").read_text() == "{}"
    # file systems without hard links: the same rules
    monkeypatch.setattr(os, "link", lambda *a: (_ for _ in ()).throw(PermissionError("no links")))
    assert eval_cli.write_report(str(tmp_path / "late.json"), "y", numbered=True).endswith("late-2.json")
    assert (tmp_path / "late-2.json").read_text() == "y"
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith(".")) == []  # no temp files left


def test_response_loss_with_chat_template_flag(runs):
    """--chat-template renders the samples instead of the model's template (here ChatML, the
    fallback): the report counts exactly the assistant tokens the given template yields."""
    from engine.hub import load_model
    from engine.sft import encode_example
    tmp, _, base, _, _ = runs
    template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    rows = [{"messages": [{"role": "user", "content": "thou art"},
                          {"role": "assistant", "content": "my liege, the crown"}]}]
    data = write_jsonl(tmp / "chat-t.jsonl", rows)
    n = {}
    for name, flags in (("chatml", []), ("plain", ["--chat-template", template])):
        out = str(tmp / f"r-template-{name}.json")
        assert eval_cli.main(["--model", base, "--data", data, "--task", "response-loss",
                              "--json", out, "--no-progress", *flags]) == 0
        n[name] = json.load(open(out))["results"]["model"]["n_tokens"]
    _, tok = load_model(base)
    expected = {}
    for name, tpl in (("chatml", None), ("plain", template)):
        tok.chat_template = tpl
        expected[name] = sum(encode_example(rows[0], tok)[1])
    assert n == expected and n["chatml"] != n["plain"]
    with pytest.raises(SystemExit):  # one line from the parser
        eval_cli.main(["--model", base, "--data", data, "--task", "perplexity",
                       "--chat-template", "chatml"])
