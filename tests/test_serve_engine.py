"""Tests for engine/serve_engine.py driven directly (no HTTP): the scheduler's bookkeeping
between its thread and the threads that submit requests. tests/test_serve.py covers the outputs
(greedy and seeded text against engine.generation.generate, adapters, cancellation)."""
import sys
import threading
import time

import pytest
import torch

from engine.config import preset
from engine.metrics import Registry
from engine.model import Transformer
from engine.serve_engine import Engine, GenRequest, SamplingParams


pytestmark = pytest.mark.usefixtures("one_thread")


def byte_tokenizer():
    from tokenizer.bpe import ByteLevelBPETokenizer, bytes_to_unicode
    b2u = bytes_to_unicode()
    return ByteLevelBPETokenizer({b2u[b]: b for b in range(256)}, [], pre_tokenizer="gpt-2",
                                 added_tokens=[{"id": 256, "content": "<|endoftext|>"}],
                                 eos_id=256)


def test_queue_count_survives_the_scheduler_discarding_finished_requests():
    """submit() (an HTTP thread) counts the running requests' rows under the lock while the
    scheduler thread discards finished ones without it. Iterating the live set raised
    "RuntimeError: Set changed size during iteration" (about 1 in 1500 counts here), which
    failed that request with a 500."""
    engine = Engine(Transformer(preset("tiny", vocab_size=257)), byte_tokenizer(), "m",
                    max_batch=8, registry=Registry())
    reqs = [GenRequest([[1]], SamplingParams(max_tokens=1)) for _ in range(64)]
    stop = threading.Event()

    def scheduler():  # what _sample / _iteration do to _running when requests finish
        while not stop.is_set():
            for r in reqs:
                engine._running.add(r)
            for r in reqs:
                engine._running.discard(r)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    t = threading.Thread(target=scheduler)
    t.start()
    try:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            with engine._cv:
                engine._queued_locked()
    finally:
        stop.set()
        t.join()
        sys.setswitchinterval(old)


def test_a_cancelled_waiting_request_frees_its_queue_place_at_once():
    """A request cancelled while it waits (its client left) stays in the queue until the
    scheduler's next iteration; the queue limit counted it, so a new request got a 429 for a
    place no one holds. (Scheduler not started here: that iteration never comes.)"""
    from engine.serve_engine import QueueFull
    engine = Engine(Transformer(preset("tiny", vocab_size=257)), byte_tokenizer(), "m",
                    max_batch=1, max_queue=1, registry=Registry())
    req = lambda: GenRequest([[1]], SamplingParams(max_tokens=1))  # noqa: E731
    first, queued = req(), req()
    engine.submit(first)   # takes the row at the next iteration
    engine.submit(queued)  # the one place in the queue
    with pytest.raises(QueueFull):
        engine.submit(req())
    engine.cancel(queued)
    engine.submit(req())   # the place is free again
    with pytest.raises(QueueFull):
        engine.submit(req())


# ---------------------------------------------------------------------------------------------
# Logprobs: per row in a mixed batch, against log_softmax of a direct forward
# ---------------------------------------------------------------------------------------------
def run_requests(engine, reqs, timeout=60):
    """Submit (prompts, params, n) before the scheduler starts, so they share its first
    iterations; per request: {"tokens": {index: [(text, TokenLogprob|None)]}, "prompt":
    {index: scores}, "finish": {index: (reason, n)}}."""
    results, done = [], threading.Semaphore(0)
    for prompts, params, n in reqs:
        res = {"tokens": {}, "prompt": {}, "finish": {}, "end": None}

        def on_event(ev, res=res):
            if ev[0] == "token":
                res["tokens"].setdefault(ev[1], []).append((ev[2], ev[3]))
            elif ev[0] == "prompt_logprobs":
                res["prompt"][ev[1]] = ev[2]
            elif ev[0] == "finish":
                res["finish"][ev[1]] = (ev[2], ev[3])
            else:
                res["end"] = ev
                done.release()
        results.append(res)
        engine.submit(GenRequest(prompts, params, n, on_event=on_event))
    engine.start()
    try:
        for _ in reqs:
            assert done.acquire(timeout=timeout)
    finally:
        engine.close()
    return results


def forward_logprobs(model, ids):
    """(T, V) fp32 log_softmax of the model's logits over ids; row t scores ids[t + 1]."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).float()[0], dim=-1)


def check_entries(model, ids, entries, first, k):
    """entries[j] scores ids[first + j]: its logprob and top k equal the forward's."""
    ref = forward_logprobs(model, ids)
    for j, e in enumerate(entries):
        t = first + j
        assert e.id == ids[t]
        assert abs(e.logprob - float(ref[t - 1, ids[t]])) < 1e-4, (t, e.logprob)
        top = ref[t - 1].topk(k) if k else None
        assert [i for i, _ in e.top] == (top.indices.tolist() if k else [])
        assert all(abs(v - w) < 1e-4 for (_, v), w in zip(e.top, top.values.tolist()
                                                          if k else []))


def test_logprobs_are_per_row_in_a_mixed_batch():
    """Requests with and without logprobs, n=2 with sampling and a repetition penalty, two
    prompts scored with echo, and a scoring-only request (max_tokens 0) share the scheduler's
    batches: each row's logprobs are the raw distribution (log_softmax of its own forward,
    before penalty / temperature / top-k), rows that did not ask get none."""
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=257))
    sizes = []
    engine = Engine(model, byte_tokenizer(), "m", max_batch=8, registry=Registry(),
                    step_hook=lambda: sizes.append(len(engine.active)))
    sampled = SamplingParams(max_tokens=6, temperature=0.8, top_k=20, repetition_penalty=1.3,
                             seed=3, logprobs=2)
    reqs = [([[1, 2, 3]], SamplingParams(max_tokens=5, temperature=0), 1),
            ([[5, 6, 7, 8, 9]], sampled, 2),
            ([[10, 11], [12, 13, 14, 15]],
             SamplingParams(max_tokens=4, temperature=0, logprobs=0, prompt_logprobs=1), 1),
            ([[20, 21, 22]], SamplingParams(max_tokens=0, prompt_logprobs=3), 1)]
    plain, samp, echo, score = run_requests(engine, reqs)
    assert max(sizes) == 5  # A, B x2 and C x2 decoded together
    assert all(e is None for e in [x for _, x in plain["tokens"][0]])
    for res, (prompts, params, n) in zip((samp, echo), reqs[1:3]):
        for idx, toks in res["tokens"].items():
            prompt = prompts[idx // n]
            entries = [x for _, x in toks]
            assert len(entries) == res["finish"][idx][1] + (res["finish"][idx][0] == "stop")
            ids = prompt + [e.id for e in entries]
            check_entries(model, ids, entries, len(prompt), params.logprobs)
            if params.prompt_logprobs is not None:
                scores = res["prompt"][idx]
                assert scores[0] is None and len(scores) == len(prompt)
                check_entries(model, prompt, scores[1:], 1, params.prompt_logprobs)
    assert [e.id for _, e in samp["tokens"][0]] != [e.id for _, e in samp["tokens"][1]]
    assert score["tokens"] == {} and score["finish"] == {0: ("length", 0)}
    assert score["end"] == ("done",)
    check_entries(model, [20, 21, 22], score["prompt"][0][1:], 1, 3)


def test_prompt_logprobs_in_chunks_and_the_prefill_it_replaces():
    """prompt_logprobs runs the lm_head a chunk of positions at a time: any chunk size gives
    the same scores; forward_hidden's last row through the lm_head is forward_rows' prefill."""
    from engine.serve_engine import (RowsCache, SlotPool, forward_hidden, forward_rows,
                                     prompt_logprobs)
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=257)).eval()
    ids = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7]
    pool = SlotPool(model, 1, 64)
    pool.ensure(len(ids))
    x = torch.tensor([ids])
    with torch.inference_mode():
        def cache():
            return RowsCache(pool, slice(0, 1), torch.zeros(1, dtype=torch.long), len(ids))
        h = forward_hidden(model, x, cache())
        last = forward_rows(model, x, cache())
        assert torch.equal(model.lm_head(h[:, -1:])[:, -1], last)
        whole = prompt_logprobs(model, h, ids, 4, 257)
        for chunk in (1, 3, 13):  # a matmul of another size may differ in the last bits
            part = prompt_logprobs(model, h, ids, 4, 257, chunk=chunk)
            assert part[0] is None and len(part) == len(whole)
            for a, b in zip(part[1:], whole[1:]):
                assert (a.id, [i for i, _ in a.top]) == (b.id, [i for i, _ in b.top])
                assert abs(a.logprob - b.logprob) < 1e-5
                assert all(abs(v - w) < 1e-5 for (_, v), (_, w) in zip(a.top, b.top))
    check_entries(model, ids, whole[1:], 1, 4)


def test_token_pieces_text_and_bytes():
    """TokenPieces: a token's own bytes (byte-level BPE bytes, SentencePiece's ▁ as a space and
    <0xNN> as that byte); a piece of a character is "bytes:\\xNN..."; the bytes of a text's
    tokens join into the text."""
    from tokenizer.bpe import ByteLevelBPETokenizer, bytes_to_unicode
    from tokenizer.spm import SentencePieceTokenizer, build_model_proto
    from engine.serve_engine import TokenPieces
    b2u = bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    vocab[b2u[0xC3] + b2u[0xA9]] = 256  # "é"
    bpe = ByteLevelBPETokenizer(vocab, [(b2u[0xC3], b2u[0xA9])], pre_tokenizer="gpt-2",
                                added_tokens=[{"id": 257, "content": "<|endoftext|>"}],
                                eos_id=257)
    pieces = TokenPieces(bpe)
    assert pieces(256) == ("é", "é".encode())
    assert pieces(0xC3) == ("bytes:\\xc3", b"\xc3") and pieces(ord(" ")) == (" ", b" ")
    assert pieces(257) == ("<|endoftext|>", b"<|endoftext|>")
    for text in ("café au lait", "日本語 ok", "a<|endoftext|>b"):
        ids = bpe.encode(text)
        assert b"".join(pieces(i)[1] for i in ids) == text.encode()
    assert [pieces(i)[0] for i in bpe.encode("日")] == ["bytes:\\xe6", "bytes:\\x97",
                                                        "bytes:\\xa5"]

    toks = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + \
        ["▁the", "é", "the", "▁"]
    types = [2, 3, 3] + [6] * 256 + [1, 1, 1, 1]
    scores = [0.0 if t != 1 else -float(k) for k, t in enumerate(types)]
    spm = SentencePieceTokenizer(build_model_proto(toks, scores, types, bos_id=1, eos_id=2,
                                                   add_dummy_prefix=False))
    pieces = TokenPieces(spm)
    assert pieces(259) == (" the", b" the") and pieces(260) == ("é", "é".encode())
    assert pieces(3 + 0xC3) == ("bytes:\\xc3", b"\xc3") and pieces(3 + 0x41) == ("A", b"A")
    assert pieces(1) == ("<s>", b"<s>")
    for text in ("the é the", "the 日本 the"):
        ids = spm.encode(text, add_bos=False)
        assert b"".join(pieces(i)[1] for i in ids) == text.encode(), ids
