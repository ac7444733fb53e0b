"""Tests for engine/serve.py (with serve_api.py, serve_engine.py), serve.py and engine/metrics.py.

References: engine.generation.generate (and generate.py's CLI) on the same checkpoint for greedy
and seeded output, load_model(..., adapter=DIR) for adapters, the official `openai` client for
the API shapes, raw sockets for HTTP framing, slow and vanishing clients. Everything binds
127.0.0.1 on ephemeral ports; every wait is bounded.
"""
import contextlib
import http.client
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from engine.config import preset
from engine.generation import generate
from engine.hub import load_model
from engine.metrics import Registry, TrainingMetricsServer, parse_text
from engine.model import Transformer
from engine.serve import (Engine, GenRequest, Limits, SamplingParams, Server, ServerThread,
                          parse_adapter_specs)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "sk-test-key"


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# Fixtures: a random tiny checkpoint with a real byte-level BPE tokenizer (ChatML specials) and a
# LoRA adapter for it
# ---------------------------------------------------------------------------------------------
def byte_bpe_tokenizer():
    """Byte-level BPE with no merges: id b < 256 is byte b; 256-258 are ChatML specials."""
    from tokenizer.bpe import ByteLevelBPETokenizer, bytes_to_unicode
    b2u = bytes_to_unicode()
    added = [{"id": 256, "content": "<|endoftext|>"}, {"id": 257, "content": "<|im_start|>"},
             {"id": 258, "content": "<|im_end|>"}]
    return ByteLevelBPETokenizer({b2u[b]: b for b in range(256)}, [], pre_tokenizer="gpt-2",
                                 added_tokens=added, eos_id=256)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from engine.checkpoint import save_model
    from engine.lora import apply_lora, lora_layers, save_adapter
    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(1)
    model = Transformer(preset("tiny", vocab_size=259))
    with torch.no_grad():  # larger logits than the 0.02 init: clear argmax gaps
        model.lm_head.weight.mul_(20)
    save_model(model, str(root / "base"), byte_bpe_tokenizer())
    apply_lora(model, ["q_proj", "v_proj", "down_proj"], r=4, alpha=8)
    torch.manual_seed(2)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.5)
    save_adapter(model, str(root / "adapter"))
    return {"base": str(root / "base"), "adapter": str(root / "adapter"), "root": root}


@pytest.fixture(scope="module")
def refs(ckpt):
    """Reference (model, tokenizer) for the base and the adapter, loaded independently."""
    base, tok = load_model(ckpt["base"])
    tuned, _ = load_model(ckpt["base"], adapter=ckpt["adapter"])
    return {"base": base, "ad": tuned, "tok": tok}


def ref_text(refs, model, ids, max_tokens, stop=(), seed=None, **kw):
    g = None
    if seed is not None:
        g = torch.Generator()
        g.manual_seed(seed)
    res = generate(refs[model], ids, max_tokens, temperature=kw.pop("temperature", 0),
                   stop_ids=refs["tok"].stop_ids, stop_strings=list(stop),
                   tokenizer=refs["tok"], generator=g, **kw)
    reason = {"stop_string": "stop"}.get(res.finish_reasons[0], res.finish_reasons[0])
    return res.texts[0], reason, len(res.tokens[0])


def chat_ids(refs, messages):
    return refs["tok"].apply_chat_template(messages, add_generation_prompt=True, tokenize=True)


@contextlib.contextmanager
def serving(ckpt, adapters=True, api_key=KEY, limits=None, **engine_kw):
    model, tok = load_model(ckpt["base"])
    engine = Engine(model, tok, "base", {"ad": ckpt["adapter"]} if adapters else None,
                    registry=Registry(), **engine_kw)
    srv = ServerThread(engine, port=0, api_key=api_key, limits=limits).start()
    try:
        yield srv
    finally:
        srv.stop(grace=2)


@pytest.fixture(scope="module")
def server(ckpt):
    with serving(ckpt, max_batch=4, limits=Limits(max_body=64 << 10, header_timeout=2.0,
                                                  body_timeout=2.0)) as srv:
        yield srv


def request(srv, method, path, body=None, key=KEY, raw=None, headers=None, timeout=30):
    """(status, headers, decoded JSON or text) over a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=timeout)
    h = {"Content-Type": "application/json", **(headers or {})}
    if key:
        h["Authorization"] = f"Bearer {key}"
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    try:
        conn.request(method, path, body=data, headers=h)
        r = conn.getresponse()
        text = r.read().decode()
    finally:
        conn.close()
    ctype = r.getheader("Content-Type", "")
    return r.status, r, json.loads(text) if ctype.startswith("application/json") else text


def metrics(srv) -> dict:
    status, _, text = request(srv, "GET", "/metrics")
    assert status == 200
    return parse_text(text)


def sse_events(text: str) -> list:
    """Data payloads of an SSE body; the last one must be [DONE]."""
    events = [ln[len("data: "):] for ln in text.split("\n\n") if ln.startswith("data: ")]
    assert events and events[-1] == "[DONE]", text[-200:]
    return [json.loads(e) for e in events[:-1]]


# ---------------------------------------------------------------------------------------------
# The official client: completions and chat, streamed and not, equal to generate / generate.py
# ---------------------------------------------------------------------------------------------
def test_openai_client_greedy_equals_generate_and_generate_py(server, refs, ckpt, capsys):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=30)
    tok = refs["tok"]
    text, reason, n_tok = ref_text(refs, "base", tok.encode("To be"), 24)
    r = client.completions.create(model="base", prompt="To be", max_tokens=24, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == "base"
    assert r.choices[0].text == text and r.choices[0].finish_reason == reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(tok.encode("To be")), n_tok)
    assert r.usage.total_tokens == r.usage.prompt_tokens + n_tok

    chunks = list(client.completions.create(model="base", prompt="To be", max_tokens=24,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n_tok

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital?"}]
    text, reason, n_tok = ref_text(refs, "base", chat_ids(refs, msgs), 20)
    r = client.chat.completions.create(model="base", messages=msgs, max_tokens=20, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == text
    assert r.choices[0].finish_reason == reason and r.usage.completion_tokens == n_tok
    chunks = list(client.chat.completions.create(model="base", messages=msgs, max_tokens=20,
                                                 temperature=0, stream=True))
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == reason and chunks[-1].usage is None

    # generate.py, same checkpoint and settings, prints the same text.
    sys.path.insert(0, ROOT)
    import generate as gen_cli
    rc = gen_cli.cli(["--checkpoint", ckpt["base"], "--system", "Be brief.", "--chat", "Capital?",
                      "--temperature", "0", "--max-new-tokens", "20", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0 and out == text + "\n"
    rc = gen_cli.cli(["--checkpoint", ckpt["base"], "--prompt", "To be", "--temperature", "0",
                      "--max-new-tokens", "24", "--quiet"])
    out = capsys.readouterr().out
    r = client.completions.create(model="base", prompt="To be", max_tokens=24, temperature=0)
    assert rc == 0 and out == "To be" + r.choices[0].text + "\n"

    models = client.models.list()
    assert [m.id for m in models.data] == ["base", "ad"]
    assert client.models.retrieve("ad").id == "ad"


def test_adapters_per_request_in_mixed_batches(server, refs):
    """Each request gets its own adapter even when base and adapter rows share a decode step."""
    tok = refs["tok"]
    prompts = ["To be", "or not to be", "x", "Hello there, friend"]
    jobs = [(p, m, 12) for p in prompts for m in ("base", "ad")]
    expect = {(p, m): ref_text(refs, m, tok.encode(p), n)[0] for p, m, n in jobs}
    assert expect[("To be", "base")] != expect[("To be", "ad")]  # the adapter matters
    results, errors = {}, []

    def worker(p, m, n):
        try:
            s, _, body = request(server, "POST", "/v1/completions",
                                 {"model": m, "prompt": p, "max_tokens": n, "temperature": 0})
            results[(p, m)] = (s, body["choices"][0]["text"] if s == 200 else body)
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)
    threads = [threading.Thread(target=worker, args=j) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert {k: v for k, v in results.items()} == {k: (200, v) for k, v in expect.items()}


def test_seed_n_stop_and_repetition_penalty(server, refs):
    tok = refs["tok"]
    ids = tok.encode("To be")
    body = {"model": "base", "prompt": "To be", "max_tokens": 16, "temperature": 0.9,
            "top_k": 40, "top_p": 0.95, "min_p": 0.02, "seed": 7}
    s, _, one = request(server, "POST", "/v1/completions", body)
    want, _, _ = ref_text(refs, "base", ids, 16, seed=7, temperature=0.9, top_k=40, top_p=0.95,
                          min_p=0.02)
    assert s == 200 and one["choices"][0]["text"] == want  # same draws as generate(seed)
    s, _, two = request(server, "POST", "/v1/completions", {**body, "n": 2})
    assert [c["index"] for c in two["choices"]] == [0, 1]
    assert two["choices"][0]["text"] == want  # choice i uses seed + i
    s, _, again = request(server, "POST", "/v1/completions", {**body, "n": 2})
    assert again["choices"] == two["choices"]

    greedy, _, _ = ref_text(refs, "base", ids, 24)
    stop = greedy[4:6]
    s, _, r = request(server, "POST", "/v1/completions", {"prompt": "To be", "max_tokens": 24,
                                                         "temperature": 0, "stop": [stop, "zzz"]})
    assert r["choices"][0] == {"index": 0, "text": greedy[:greedy.index(stop)], "logprobs": None,
                               "finish_reason": "stop"}
    # empty stop strings stop nothing and do not count against the limit of 16
    many = [stop] + [f"zz{i}" for i in range(15)] + ["", ""]
    s, _, r2 = request(server, "POST", "/v1/completions", {"prompt": "To be", "max_tokens": 24,
                                                          "temperature": 0, "stop": many})
    assert s == 200 and r2["choices"][0] == r["choices"][0]
    s, _, r = request(server, "POST", "/v1/completions", {"prompt": "To be", "max_tokens": 3,
                                                         "temperature": 0})
    assert r["choices"][0]["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 3
    pen, _, _ = ref_text(refs, "base", ids, 24, repetition_penalty=1.5)
    s, _, r = request(server, "POST", "/v1/completions", {"prompt": "To be", "max_tokens": 24,
                                                         "temperature": 0,
                                                         "repetition_penalty": 1.5})
    assert r["choices"][0]["text"] == pen
    # A list of prompts (strings or token ids): choices indexed prompt * n + j.
    # Chat, n=2, seeded, streamed: per-index deltas add up to the non-streamed choices.
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "n": 2,
            "seed": 11, "temperature": 1.0}
    s, _, whole = request(server, "POST", "/v1/chat/completions", chat)
    s, _, text = request(server, "POST", "/v1/chat/completions", {**chat, "stream": True})
    events = sse_events(text)
    assert [e["choices"][0]["delta"] for e in events[:2]] == [{"role": "assistant",
                                                               "content": ""}] * 2
    parts = ["", ""]
    for e in events:
        parts[e["choices"][0]["index"]] += e["choices"][0]["delta"].get("content", "")
    assert parts == [c["message"]["content"] for c in whole["choices"]]
    five, _, _ = ref_text(refs, "base", ids, 5)
    for prompt in (["To be", "To be"], [ids, ids]):
        s, _, r = request(server, "POST", "/v1/completions", {"prompt": prompt, "n": 2,
                                                             "max_tokens": 5, "temperature": 0})
        assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
        assert [c["text"] for c in r["choices"]] == [five] * 4
        assert r["usage"]["prompt_tokens"] == 2 * len(ids)
    s, _, r = request(server, "POST", "/v1/completions", {"prompt": ["To be", ids]})
    assert s == 400 and r["error"]["param"] == "prompt"  # mixed kinds


def run_engine(engine, jobs, timeout=60):
    """Submit GenRequests before the scheduler starts (so they share iterations); collect
    {job index: (texts, reasons, completion tokens)}."""
    from engine.serve import GenRequest
    out, done = {}, threading.Semaphore(0)

    def sink(j, k):
        texts, reasons, ntok = [""] * k, [None] * k, [0] * k

        def on_event(ev):
            if ev[0] == "token":
                texts[ev[1]] += ev[2]
            elif ev[0] == "finish":
                reasons[ev[1]], ntok[ev[1]] = ev[2], ev[3]
            elif ev[0] in ("done", "error"):
                out[j] = ev if ev[0] == "error" else (texts, reasons, ntok)
                done.release()
        return on_event
    for j, (prompts, params, n, *adapter) in enumerate(jobs):  # (prompts, params, n[, adapter])
        engine.submit(GenRequest(prompts, params, n, adapter[0] if adapter else None,
                                 sink(j, n * len(prompts))))
    engine.start()
    try:
        for _ in jobs:
            assert done.acquire(timeout=timeout)
    finally:
        engine.close()
    return out


@pytest.mark.parametrize("window", [None, 16])
def test_engine_rows_of_different_lengths_across_pool_growth(refs, window):
    """Three sequences decode together at different positions (masked keys, per-row RoPE) while
    the KV pool grows 100 -> 200 under them; a sliding-window model puts each row's window in the
    key mask. Every text equals generate()'s."""
    from engine.serve import SamplingParams
    torch.manual_seed(3)
    model = Transformer(preset("tiny", vocab_size=259, sliding_window=window)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    tok = refs["tok"]
    rng = random.Random(0)
    prompts = [[rng.randrange(256) for _ in range(n)] for n in (3, 100, 37)]
    want = []
    for p in prompts:
        res = generate(model, p, 60, temperature=0, stop_ids=tok.stop_ids, tokenizer=tok)
        want.append(([res.texts[0]], [{"stop_string": "stop"}.get(r, r)
                                      for r in res.finish_reasons], [len(res.tokens[0])]))
    assert max(len(p) + w[2][0] for p, w in zip(prompts, want)) > 128  # the pool must grow
    engine = Engine(model, tok, "m", max_batch=4, registry=Registry())
    got = run_engine(engine, [([p], SamplingParams(max_tokens=60, temperature=0), 1)
                              for p in prompts])
    assert [got[j] for j in range(3)] == want
    assert engine.pool.length >= 128 and engine.m_batch.count() > 0
    assert "decode_batch_size_bucket{le=\"4\"}" in engine.registry.render()


def test_padded_embedding_rows_are_never_sampled_or_accepted():
    """A model with more embedding rows than tokens (padding) whose padding logits dominate:
    the server samples only real tokens, and rejects prompt ids past the tokenizer."""
    from engine.serve import API, APIError, SamplingParams
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=300)).eval()
    with torch.no_grad():
        model.lm_head.weight[259:] *= 1000  # untrained padding rows that would win every argmax
    tok = byte_bpe_tokenizer()
    engine = Engine(model, tok, "m", registry=Registry())
    with pytest.raises(APIError, match=r"integers in \[0, 259\)"):
        API(engine).prepare("completion", {"prompt": [1, 280]})
    got = run_engine(engine, [([[1, 2, 3]], SamplingParams(max_tokens=8, temperature=0), 1)])
    texts, reasons, ntok = got[0]
    assert reasons == ["length"] and ntok == [8] and isinstance(texts[0], str)


def test_adapter_on_lm_head_dora_and_rslora_in_one_batch(ckpt, refs, tmp_path):
    """Adapters covering lm_head (DoRA) and others (rsLoRA) served together with the base:
    each row equals generate() with load_model(..., adapter=DIR). (An AdapterSwitch on lm_head
    once broke the KV pool, which reads lm_head.weight: every request got a 500.)"""
    from engine.lora import apply_lora, lora_layers, save_adapter
    dirs = {}
    for name, targets, kw in (("dora", ["q_proj", "lm_head"], {"dora": True}),
                              ("rs", ["up_proj", "k_proj"], {"rslora": True})):
        model, _ = load_model(ckpt["base"])
        apply_lora(model, targets, r=2, alpha=4, **kw)
        torch.manual_seed(4)
        with torch.no_grad():
            for layer in lora_layers(model).values():
                layer.lora_B.weight.normal_(0, 0.5)
        dirs[name] = str(tmp_path / name)
        save_adapter(model, dirs[name])
    tok = refs["tok"]
    prompts = [tok.encode(p) for p in ("To be", "or not to be")]
    jobs, want = [], []
    for a in (None, "dora", "rs"):
        ref_model = refs["base"] if a is None else load_model(ckpt["base"], adapter=dirs[a])[0]
        for p in prompts:
            res = generate(ref_model, p, 12, temperature=0, stop_ids=tok.stop_ids, tokenizer=tok)
            want.append([res.texts[0]])
            jobs.append(([p], SamplingParams(max_tokens=12, temperature=0), 1, a))
    assert want[0] != want[2] != want[4]  # each adapter changes the text
    model, _ = load_model(ckpt["base"])
    got = run_engine(Engine(model, tok, "base", dirs, max_batch=6, registry=Registry()), jobs)
    assert [got[j][0] if got[j][0] != "error" else got[j] for j in range(len(jobs))] == want


def test_adapter_with_whole_module_tensors_is_refused(ckpt, tmp_path):
    from engine.lora import Adapter
    from engine.serve import install_adapters
    ad = Adapter.load(ckpt["adapter"])
    ad.tensors["lm_head.weight"] = torch.zeros(259, 64)
    ad.save(str(tmp_path / "mts"))
    model, _ = load_model(ckpt["base"])
    with pytest.raises(ValueError, match="modules_to_save"):
        install_adapters(model, {"x": str(tmp_path / "mts")})
    with pytest.raises(ValueError, match="must be non-empty and differ"):
        Engine(model, byte_bpe_tokenizer(), "base", {"base": ckpt["adapter"]},
               registry=Registry())


BAD = [  # (method, path, body or raw bytes, extra kwargs, status, param)
    ("POST", "/v1/completions", b"{not json", {}, 400, None),
    ("POST", "/v1/completions", b"[1, 2]", {}, 400, None),
    ("POST", "/v1/completions", b'{"prompt": "a", "temperature": NaN}', {}, 400, None),
    ("POST", "/v1/completions", {"prompt": "a", "max_tokens": "ten"}, {}, 400, "max_tokens"),
    ("POST", "/v1/completions", {"prompt": "a", "max_tokens": True}, {}, 400, "max_tokens"),
    ("POST", "/v1/completions", {"prompt": 5}, {}, 400, "prompt"),
    ("POST", "/v1/completions", {"prompt": [1, 999]}, {}, 400, "prompt"),
    ("POST", "/v1/completions", {"prompt": "a", "temperature": -1}, {}, 400, "temperature"),
    ("POST", "/v1/completions", b'{"prompt": "a", "temperature": 1' + b"0" * 400 + b"}", {}, 400,
     "temperature"),  # an integer too large for a float: a 400, not a 500
    ("POST", "/v1/completions", {"prompt": "a", "top_p": 0}, {}, 400, "top_p"),
    ("POST", "/v1/completions", {"prompt": "a", "min_p": 1.5}, {}, 400, "min_p"),
    ("POST", "/v1/completions", {"prompt": "a", "stop": [1]}, {}, 400, "stop"),
    ("POST", "/v1/completions", {"prompt": "a", "n": 0}, {}, 400, "n"),
    ("POST", "/v1/completions", {"prompt": "a", "n": 5}, {}, 400, "n"),
    # logprobs: completions take 0..20 (an int), chat a boolean plus top_logprobs 0..20 that
    # needs logprobs: true; echo is completions-only, top_logprobs chat-only
    ("POST", "/v1/completions", {"prompt": "a", "logprobs": -1}, {}, 400, "logprobs"),
    ("POST", "/v1/completions", {"prompt": "a", "logprobs": 21}, {}, 400, "logprobs"),
    ("POST", "/v1/completions", {"prompt": "a", "logprobs": "x"}, {}, 400, "logprobs"),
    ("POST", "/v1/completions", {"prompt": "a", "logprobs": True}, {}, 400, "logprobs"),
    ("POST", "/v1/completions", {"prompt": "a", "logprobs": 1.5}, {}, 400, "logprobs"),
    ("POST", "/v1/completions", {"prompt": "a", "top_logprobs": 2}, {}, 400, "top_logprobs"),
    ("POST", "/v1/completions", {"prompt": "a", "echo": "yes"}, {}, 400, "echo"),
    ("POST", "/v1/completions", {"prompt": "a", "echo": True, "max_tokens": -1}, {}, 400,
     "max_tokens"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}],
                                      "logprobs": True, "top_logprobs": 21}, {}, 400,
     "top_logprobs"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}],
                                      "logprobs": True, "top_logprobs": -1}, {}, 400,
     "top_logprobs"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}],
                                      "top_logprobs": 2}, {}, 400, "top_logprobs"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}],
                                      "logprobs": 2}, {}, 400, "logprobs"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}],
                                      "echo": True}, {}, 400, "echo"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}],
                                      "max_tokens": 0, "logprobs": True}, {}, 400, "max_tokens"),
    ("POST", "/v1/completions", {"prompt": "a", "presence_penalty": False}, {}, 400,
     "presence_penalty"),
    ("POST", "/v1/completions", {"prompt": "a", "stream_options": {"include_usage": True}}, {},
     400, "stream_options"),
    ("POST", "/v1/completions", {"prompt": "a" * 300}, {}, 400, "prompt"),
    ("POST", "/v1/completions", {"prompt": "a", "max_tokens": 256}, {}, 400, "max_tokens"),
    ("POST", "/v1/completions", {"prompt": "a", "max_tokens": 0}, {}, 400, "max_tokens"),
    ("POST", "/v1/completions", {"prompt": "a", "model": "gpt-4"}, {}, 404, "model"),
    ("POST", "/v1/chat/completions", {"messages": []}, {}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"messages": [{"content": "hi"}]}, {}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, {}, 400,
     "messages"),
    # an unknown role (a typo) and a turn without content are OpenAI's 400s, not rendered as is
    ("POST", "/v1/chat/completions", {"messages": [{"role": "Assistant", "content": "hi"}]}, {},
     400, "messages"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user"}]}, {}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": None}]}, {}, 400,
     "messages"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}]}, {}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}],
                                      "max_completion_tokens": 0}, {}, 400,
     "max_completion_tokens"),
    ("POST", "/v1/completions", {"prompt": "a"}, {"key": None}, 401, None),
    ("POST", "/v1/completions", {"prompt": "a"}, {"key": "wrong"}, 401, None),
    ("GET", "/metrics", None, {"key": None}, 401, None),
    ("GET", "/v1/completions", None, {}, 405, None),
    ("POST", "/v1/models", {}, {}, 405, None),
    ("GET", "/v2/nothing", None, {}, 404, None),
    ("GET", "/v1/models/nope", None, {}, 404, "model"),
    ("POST", "/v1/completions", b"x" * (65 << 10), {}, 413, None),
    # lone surrogates are valid JSON: a 400 (prompt) and a 404 (model), not a dropped connection
    ("POST", "/v1/completions", {"prompt": "a\ud800"}, {}, 400, "prompt"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "a\ud800"}]}, {},
     400, "messages"),
    ("POST", "/v1/completions", {"prompt": "a", "model": "\ud800"}, {}, 404, "model"),
    # tool calling (tests/test_tool_calls.py has the rest): chat only, and only with a chat
    # template that renders the tools (this checkpoint has none: ChatML)
    ("POST", "/v1/completions", {"prompt": "a", "tools": [
        {"type": "function", "function": {"name": "f"}}]}, {}, 400, "tools"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "tools": [
        {"type": "function", "function": {"name": "f"}}]}, {}, 400, "tools"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}],
                                      "tools": "f"}, {}, 400, "tools"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}],
                                      "tool_choice": "required"}, {}, 400, "tool_choice"),
]


@pytest.mark.parametrize("method,path,body,kw,status,param", BAD)
def test_bad_requests_get_openai_error_objects(server, method, path, body, kw, status, param):
    raw = body if isinstance(body, bytes) else None
    s, r, obj = request(server, method, path, None if raw else body, raw=raw, **kw)
    assert s == status, obj
    err = obj["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param
    assert "\n" not in err["message"] and err["message"]
    want_type = {401: "authentication_error", 404: "not_found_error"}.get(status,
                                                                           "invalid_request_error")
    assert err["type"] == want_type
    if status == 401:
        assert r.getheader("WWW-Authenticate") == "Bearer"


def test_chat_messages_follow_openai_vllm_rules(server, refs):
    """Text parts are joined with newlines (vLLM, llama.cpp), every OpenAI role and Llama 3.1's
    ipython is accepted, max_completion_tokens wins over the deprecated max_tokens (vLLM), an
    image part gets a 400 naming it, and a 405 names the allowed methods (RFC 9110)."""
    api = server.server.api
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]
    got = api.prepare("chat", {"messages": [{"role": "user", "content": parts}]})
    assert got.prompts == [chat_ids(refs, [{"role": "user", "content": "Hello\nworld"}])]
    for role in ("system", "developer", "user", "assistant", "tool", "function", "ipython"):
        api.prepare("chat", {"messages": [{"role": role, "content": "x"}]})
    api.prepare("chat", {"messages": [{"role": "assistant", "content": None, "tool_calls": []}]})
    job = api.prepare("chat", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 9,
                               "max_completion_tokens": 5})
    assert job.params.max_tokens == 5
    s, _, obj = request(server, "POST", "/v1/chat/completions", {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "a"},
                                     {"type": "image_url", "image_url": {"url": "x"}}]}]})
    assert s == 400 and "content[1] is a \"image_url\" part" in obj["error"]["message"]
    s, r, _ = request(server, "DELETE", "/v1/chat/completions")
    assert s == 405 and r.getheader("Allow") == "POST"
    s, r, _ = request(server, "POST", "/health")
    assert s == 405 and r.getheader("Allow") == "GET"


def test_chat_continue_final_message_and_no_generation_prompt(server, refs):
    """vLLM's extra chat fields: continue_final_message renders the conversation cut after the
    final assistant message (apply_chat_template's), add_generation_prompt false leaves the
    assistant header out; both true is a 400 naming the field."""
    api, tok = server.server.api, refs["tok"]
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Well, I"}]
    got = api.prepare("chat", {"messages": msgs, "continue_final_message": True})
    want = tok.apply_chat_template(msgs, continue_final_message=True, tokenize=True)
    assert got.prompts == [want] and tok.decode(want).endswith("Well, I")
    got = api.prepare("chat", {"messages": msgs[:1], "add_generation_prompt": False})
    assert got.prompts == [tok.apply_chat_template(msgs[:1], tokenize=True)] != \
        [chat_ids(refs, msgs[:1])]
    s, _, obj = request(server, "POST", "/v1/chat/completions", {
        "messages": msgs, "continue_final_message": True, "add_generation_prompt": True})
    assert s == 400 and obj["error"]["param"] == "continue_final_message"
    s, _, obj = request(server, "POST", "/v1/chat/completions", {
        "messages": msgs, "continue_final_message": "yes"})
    assert s == 400 and obj["error"]["param"] == "continue_final_message"


def test_openai_client_n_stop_parts_and_bad_top_logprobs(server, refs):
    """The official client: a streamed chat with n=2, a stop string and text parts; each choice
    equals generate() alone on the newline-joined prompt. top_logprobs past 20 is a 400 naming
    the field, which the client raises as BadRequestError."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=30)
    msgs = [{"role": "user", "content": "Say"}, {"role": "user", "content": "it"}]
    ids = chat_ids(refs, [{"role": "user", "content": "Say\nit"}])
    greedy, _, _ = ref_text(refs, "base", ids, 16)
    stop = greedy[5:7]
    want, reason, n_tok = ref_text(refs, "base", ids, 16, stop=[stop])
    assert reason == "stop" and want == greedy[:greedy.index(stop)]
    stream = client.chat.completions.create(
        model="base", messages=[{"role": "user", "content": [{"type": "text", "text": "Say"},
                                                             {"type": "text", "text": "it"}]}],
        max_tokens=16, temperature=0, n=2, stop=[stop], stream=True,
        stream_options={"include_usage": True})
    texts, reasons = ["", ""], [None, None]
    chunks = list(stream)
    for c in chunks[:-1]:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
            reasons[ch.index] = ch.finish_reason or reasons[ch.index]
    assert texts == [want, want] and reasons == ["stop", "stop"]
    assert chunks[-1].usage.completion_tokens == 2 * n_tok
    assert chunks[-1].usage.prompt_tokens == len(ids)
    r = client.completions.create(model="base", prompt=["To be", "or"], max_tokens=4, n=2,
                                  temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [ref_text(refs, "base", refs["tok"].encode(p), 4)[0]
                                           for p in ("To be", "To be", "or", "or")]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="base", messages=msgs, logprobs=True,
                                       top_logprobs=21)
    assert e.value.body["param"] == "top_logprobs"


# ---------------------------------------------------------------------------------------------
# Logprobs and echo: against log_softmax of a direct forward of the reference model
# ---------------------------------------------------------------------------------------------
SPECIAL_TEXT = {256: "<|endoftext|>", 257: "<|im_start|>", 258: "<|im_end|>"}


def piece(i: int) -> tuple[str, bytes]:
    """This checkpoint's token i as the API writes it (built here, not by serve_engine): id b <
    256 is byte b, a lone byte that is not a whole character "bytes:\\xNN" (OpenAI's form)."""
    raw = SPECIAL_TEXT[i].encode() if i in SPECIAL_TEXT else bytes([i])
    try:
        return raw.decode("utf-8"), raw
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), raw


TOKEN_ID = {piece(i)[0]: i for i in range(259)}  # the API's token string -> id


def forward_logprobs(model, ids: list[int]) -> torch.Tensor:
    """(T, V): log_softmax in fp32 of the model's logits over ids; row t scores ids[t + 1]."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).float()[0], dim=-1)


def check_top(got: dict, ref_row: torch.Tensor, k: int, chosen: int, tol=1e-4):
    """A completions top_logprobs dict: the k most likely tokens plus the chosen one."""
    top = ref_row.topk(k)
    want = {piece(i)[0]: v for i, v in zip(top.indices.tolist(), top.values.tolist())}
    want.setdefault(piece(chosen)[0], float(ref_row[chosen]))
    assert got.keys() == want.keys()
    assert all(abs(got[key] - want[key]) < tol for key in want)


def test_completion_logprobs_and_echo_equal_a_model_forward(server, refs):
    """logprobs=3 with echo: the prompt's tokens first (the first without a logprob), then the
    greedy tokens; every logprob and top-3 dict equals log_softmax of one full forward over the
    same ids (the raw distribution), streamed or not; text_offset counts characters."""
    tok, base = refs["tok"], refs["base"]
    prompt = "To be, or"
    p_ids = tok.encode(prompt, add_eos=False)
    body = {"model": "base", "prompt": prompt, "max_tokens": 6, "temperature": 0,
            "logprobs": 3, "echo": True}
    s, _, r = request(server, "POST", "/v1/completions", body)
    assert s == 200, r
    choice, lp = r["choices"][0], r["choices"][0]["logprobs"]
    text, reason, n_tok = ref_text(refs, "base", p_ids, 6)
    assert choice["text"] == prompt + text and choice["finish_reason"] == reason
    ids = [TOKEN_ID[t] for t in lp["tokens"]]
    # one entry per sampled token, a stop id included (usage does not count it)
    assert ids[:len(p_ids)] == p_ids and len(ids) == len(p_ids) + n_tok + (reason == "stop")
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    ref = forward_logprobs(base, ids)
    for t in range(1, len(ids)):
        assert abs(lp["token_logprobs"][t] - float(ref[t - 1, ids[t]])) < 1e-4, t
        check_top(lp["top_logprobs"][t], ref[t - 1], 3, ids[t])
    for t in range(len(p_ids), len(ids)):  # greedy: each generated token is the argmax
        assert ids[t] == int(ref[t - 1].argmax())
    assert lp["text_offset"][:len(p_ids) + 1] == list(range(len(p_ids) + 1))  # ASCII prompt

    s, _, stream_text = request(server, "POST", "/v1/completions", {**body, "stream": True})
    chunks = [c["choices"][0] for c in sse_events(stream_text)]
    assert chunks[0]["text"] == prompt  # the echo comes first, with the prompt's entries
    assert chunks[0]["logprobs"]["tokens"] == lp["tokens"][:len(p_ids)]
    merged = {key: [] for key in lp}
    for c in chunks:
        for key in merged:
            merged[key] += (c["logprobs"] or {}).get(key, [])
    assert "".join(c["text"] for c in chunks) == choice["text"]
    assert merged["tokens"] == lp["tokens"] and merged["text_offset"] == lp["text_offset"]
    assert merged["token_logprobs"][0] is None
    assert all(abs(a - b) < 1e-5 for a, b in zip(merged["token_logprobs"][1:],
                                                  lp["token_logprobs"][1:]))

    # echo without logprobs: the text only; logprobs without echo: the generated tokens only
    s, _, r2 = request(server, "POST", "/v1/completions", {**body, "logprobs": None})
    assert r2["choices"][0]["text"] == prompt + text and r2["choices"][0]["logprobs"] is None
    s, _, r3 = request(server, "POST", "/v1/completions", {**body, "echo": False, "logprobs": 0})
    lp3 = r3["choices"][0]["logprobs"]
    assert r3["choices"][0]["text"] == text and lp3["tokens"] == lp["tokens"][len(p_ids):]
    assert lp3["text_offset"][0] == 0
    # logprobs 0: the sampled token's logprob only, its top dict just that token (OpenAI's k+1)
    for t, (got, top) in enumerate(zip(lp3["token_logprobs"], lp3["top_logprobs"])):
        assert top == {lp3["tokens"][t]: got}
        assert abs(got - lp["token_logprobs"][len(p_ids) + t]) < 1e-5


def test_lm_eval_loglikelihood_requests(server, refs):
    """What lm-eval's local-completions sends for loglikelihood (openai_completions.py): a batch
    of token-id prompts with echo, logprobs 1, max_tokens 1 (and 0, the prompt alone),
    temperature 0. Its parse_logprobs (the sum of token_logprobs[ctxlen:-1], greedy when each
    equals the max of its top dict) gives the model's continuation log-likelihood; a prompt
    of the whole context scores with max_tokens 0."""
    tok, base = refs["tok"], refs["base"]
    ctx = tok.encode("To be, or not", add_eos=False)
    ref_ctx = forward_logprobs(base, ctx)
    greedy = [int(ref_ctx[-1].argmax())]
    greedy.append(int(forward_logprobs(base, ctx + greedy)[-1].argmax()))
    reqs = [(ctx, tok.encode(" to be")), (ctx[:4], tok.encode("x y")), (ctx, greedy)]
    prompts = [c + x for c, x in reqs]
    for max_tokens in (1, 0):
        body = {"model": "base", "prompt": prompts, "temperature": 0, "max_tokens": max_tokens,
                "logprobs": 1, "seed": 1234, "echo": True}
        s, _, r = request(server, "POST", "/v1/completions", body)
        assert s == 200, r
        choices = sorted(r["choices"], key=lambda c: c["index"])
        assert len(choices) == 3 and r["usage"]["prompt_tokens"] == sum(map(len, prompts))
        for choice, (c, x), ids in zip(choices, reqs, prompts):
            lp = choice["logprobs"]
            n = len(lp["token_logprobs"])
            assert n == len(ids) + max_tokens and choice["text"].startswith(tok.decode(ids))
            end = n - 1 if max_tokens else n  # lm-eval's [ctxlen:-1] drops the sampled token
            got = sum(lp["token_logprobs"][len(c):end])
            is_greedy = all(v == max(top.values()) for v, top in zip(
                lp["token_logprobs"][len(c):end], lp["top_logprobs"][len(c):end]))
            ref = forward_logprobs(base, ids)
            want = sum(float(ref[t - 1, ids[t]]) for t in range(len(c), len(ids)))
            assert abs(got - want) < 1e-3 * len(x)
            assert is_greedy == all(ids[t] == int(ref[t - 1].argmax())
                                    for t in range(len(c), len(ids)))
            if max_tokens == 0:
                assert choice["finish_reason"] == "length" and choice["text"] == tok.decode(ids)
        assert r["usage"]["completion_tokens"] <= 3 * max_tokens
        assert is_greedy  # the last request continues with the greedy tokens

    # a prompt that fills the context: only scoring fits it
    ids = [int(b) for b in (b"To be, or not to be. " * 20)[:256]]
    body = {"model": "base", "prompt": ids, "echo": True, "max_tokens": 0, "logprobs": 0}
    s, _, r = request(server, "POST", "/v1/completions", body)
    assert s == 200, r
    lp = r["choices"][0]["logprobs"]["token_logprobs"]
    ref = forward_logprobs(base, ids)
    assert len(lp) == 256 and lp[0] is None
    assert max(abs(lp[t] - float(ref[t - 1, ids[t]])) for t in range(1, 256)) < 1e-4
    s, _, r = request(server, "POST", "/v1/completions", {**body, "echo": False})
    assert s == 400 and r["error"]["param"] == "prompt"


def test_chat_logprobs_equal_a_model_forward_streamed_and_not(server, refs):
    """logprobs with top_logprobs=3: one entry per content token (not the end-of-turn id) with
    its text, bytes and the 3 most likely tokens, equal to log_softmax of a direct forward; the
    stream's chunks carry the same entries, each with the text it brings."""
    base = refs["base"]
    msgs = [{"role": "user", "content": "Hello"}]
    p_ids = chat_ids(refs, msgs)
    body = {"model": "base", "messages": msgs, "max_tokens": 10, "temperature": 0,
            "logprobs": True, "top_logprobs": 3}
    s, _, r = request(server, "POST", "/v1/chat/completions", body)
    assert s == 200, r
    choice = r["choices"][0]
    assert choice["logprobs"]["refusal"] is None
    content = choice["logprobs"]["content"]
    assert len(content) == r["usage"]["completion_tokens"]
    ids = p_ids + [TOKEN_ID[e["token"]] for e in content]
    ref = forward_logprobs(base, ids)
    for k, e in enumerate(content):
        t = len(p_ids) + k
        assert set(e) == {"token", "logprob", "bytes", "top_logprobs"}
        assert (e["token"], bytes(e["bytes"])) == piece(ids[t])
        assert abs(e["logprob"] - float(ref[t - 1, ids[t]])) < 1e-4
        top = ref[t - 1].topk(3)
        assert [TOKEN_ID[x["token"]] for x in e["top_logprobs"]] == top.indices.tolist()
        assert all(abs(x["logprob"] - v) < 1e-4 and bytes(x["bytes"]) == piece(i)[1]
                   for x, i, v in zip(e["top_logprobs"], top.indices.tolist(),
                                      top.values.tolist()))
        assert ids[t] == int(ref[t - 1].argmax())
    # the tokens' bytes spell the content
    assert b"".join(bytes(e["bytes"]) for e in content).decode("utf-8", "replace") == \
        choice["message"]["content"]

    s, _, text = request(server, "POST", "/v1/chat/completions", {**body, "stream": True})
    merged = []
    for c in sse_events(text):
        ch = c["choices"][0]
        got = (ch["logprobs"] or {}).get("content", [])
        if got:
            assert ch["delta"].get("content") or ch["finish_reason"]
        merged += got
    assert [e["token"] for e in merged] == [e["token"] for e in content]
    assert all(abs(a["logprob"] - b["logprob"]) < 1e-5 for a, b in zip(merged, content))
    # logprobs without top_logprobs: empty top lists
    s, _, r = request(server, "POST", "/v1/chat/completions", {**body, "top_logprobs": None})
    assert all(e["top_logprobs"] == [] for e in r["choices"][0]["logprobs"]["content"])


def test_openai_client_parses_logprobs(server, refs):
    """The official client's types parse what the server returns for logprobs and echo."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=30)
    r = client.completions.create(model="base", prompt="To be", max_tokens=3, temperature=0,
                                  logprobs=2, echo=True)
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith("To be") and lp.tokens[:5] == list("To be")
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == \
        len(lp.text_offset) >= 5 + r.usage.completion_tokens
    assert lp.text_offset[:5] == [0, 1, 2, 3, 4]
    assert all(2 <= len(top) <= 3 for top in lp.top_logprobs[1:])
    msgs = [{"role": "user", "content": "Hi"}]
    r = client.chat.completions.create(model="base", messages=msgs, max_tokens=4, temperature=0,
                                       logprobs=True, top_logprobs=3, n=2)
    for ch in r.choices:
        content = ch.logprobs.content
        assert len(content) == r.usage.completion_tokens // 2
        assert all(len(e.top_logprobs) == 3 and isinstance(e.bytes, list) for e in content)
        assert all(e.top_logprobs[0].logprob >= e.logprob for e in content)  # greedy: the top
    chunks = list(client.chat.completions.create(model="base", messages=msgs, max_tokens=4,
                                                 temperature=0, logprobs=True, top_logprobs=3,
                                                 stream=True))
    tokens = [e.token for c in chunks for ch in c.choices if ch.logprobs
              for e in ch.logprobs.content or []]
    assert tokens == [e.token for e in r.choices[0].logprobs.content]


def test_port_in_use_is_one_line_and_the_engine_can_retry(ckpt):
    """A port in use: 'cannot listen on HOST:PORT: Address already in use' (not asyncio's long
    form), and another Server on the same engine can then start (the failed one registered no
    metrics)."""
    model, tok = load_model(ckpt["base"])
    engine = Engine(model, tok, "base", registry=Registry())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError) as e:
            ServerThread(engine, port=port).start()
        assert str(e.value) == f"cannot listen on 127.0.0.1:{port}: Address already in use"
    with ServerThread(engine, port=0) as srv:
        assert request(srv, "GET", "/health", key=None)[0] == 200


def test_health_needs_no_key_and_chunked_body_and_keep_alive(server):
    s, _, body = request(server, "GET", "/health", key=None)
    assert s == 200 and body == {"status": "ok"}
    # One connection, three requests: a chunked body, then Expect: 100-continue, then a 400.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        payload = json.dumps({"prompt": "To be", "max_tokens": 3, "temperature": 0}).encode()
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (payload[:7], payload[7:]))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     + KEY.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks
                     + b"0\r\n\r\n")
        f = sock.makefile("rb")
        assert f.readline().startswith(b"HTTP/1.1 200")
        resp = http_body(f)
        assert json.loads(resp)["usage"]["completion_tokens"] == 3
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     + KEY.encode() + b"\r\nExpect: 100-continue\r\nContent-Length: "
                     + str(len(payload)).encode() + b"\r\n\r\n")
        assert f.readline().startswith(b"HTTP/1.1 100")
        assert f.readline() == b"\r\n"
        sock.sendall(payload)
        assert f.readline().startswith(b"HTTP/1.1 200")
        http_body(f)
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        assert f.readline().startswith(b"HTTP/1.1 401")


@pytest.mark.parametrize("head,message", [
    (b"Content-Length: \xc2\xb2\r\n", "invalid Content-Length"),  # a digit to str.isdigit
    (b"Transfer-Encoding: chunked\r\n", "malformed chunk size"),  # then a chunk of size -1
    (b"Transfer-Encoding: chunked\r\n\r\n0x2\r\n{}\r\n0\r\n", "malformed chunk size"),  # hex only
])
def test_bad_framing_gets_one_400(server, head, message):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n-1\r\n")
        f = sock.makefile("rb")
        assert f.readline().startswith(b"HTTP/1.1 400")
        assert message in json.loads(http_body(f))["error"]["message"]


def test_extreme_sampling_values_and_quoted_model_ids(server):
    """A temperature or penalty that overflows float32 is answered (greedy, or saturated),
    not a 500; a percent-encoded model id (as the OpenAI client sends it) is found."""
    greedy = request(server, "POST", "/v1/completions",
                     {"prompt": "ab", "max_tokens": 6, "temperature": 0})[2]["choices"][0]["text"]
    for extra in ({"temperature": 1e-300}, {"repetition_penalty": 1e-300},
                  {"repetition_penalty": 1e300}, {"top_p": 1e-300}):
        s, _, obj = request(server, "POST", "/v1/completions",
                            {"prompt": "ab", "max_tokens": 6, **extra})
        assert s == 200, obj
        if "temperature" in extra or "top_p" in extra:  # top_p 1e-300: only the top token
            assert obj["choices"][0]["text"] == greedy
    s, _, obj = request(server, "GET", "/v1/models/%61d")
    assert s == 200 and obj["id"] == "ad"


def http_body(f) -> bytes:
    """Read headers and a Content-Length body from a socket file."""
    length = 0
    while (line := f.readline()) not in (b"\r\n", b""):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return f.read(length)


def test_slow_clients_do_not_block_others(server):
    """A stalled head and a stalled body each get 408 after the timeout (2 s here) while other
    requests are answered at once."""
    slow_head = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    slow_head.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
    slow_body = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    slow_body.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    t0 = time.monotonic()
    for _ in range(3):
        s, _, _ = request(server, "POST", "/v1/completions", {"prompt": "a", "max_tokens": 2})
        assert s == 200
    assert time.monotonic() - t0 < 1.5  # answered while both slow clients still hold sockets
    for sock in (slow_head, slow_body):
        data = sock.recv(4096)
        assert data.startswith(b"HTTP/1.1 408"), data[:40]
        assert sock.recv(4096) == b""  # and closed
        sock.close()


# ---------------------------------------------------------------------------------------------
# Slots, cancellation, queueing, shutdown
# ---------------------------------------------------------------------------------------------
def test_disconnecting_a_stream_frees_its_slot(ckpt):
    """max_batch=1 and a slowed decode: the streamed request would take ~4 s to finish; closing
    its socket after the first event frees the only slot, and the next request runs at once."""
    with serving(ckpt, adapters=False, api_key=None, max_batch=1,
                 step_hook=lambda: time.sleep(0.02)) as srv:
        sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        body = json.dumps({"prompt": "a", "max_tokens": 200, "temperature": 1.0, "seed": 3,
                           "stream": True}).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body))
        got = b""
        while b"data: " not in got:
            got += sock.recv(4096)
        m = metrics(srv)
        assert m["whetstone_kv_slots_used"] == 1 and m["whetstone_requests_running"] == 1
        sock.close()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            m = metrics(srv)
            if m["whetstone_kv_slots_used"] == 0 and m["whetstone_requests_running"] == 0:
                break
            time.sleep(0.05)
        assert m["whetstone_kv_slots_used"] == 0 and m["whetstone_requests_running"] == 0
        assert m['whetstone_requests_cancelled_total{reason="client_disconnected"}'] == 1
        assert m['whetstone_generation_tokens_total{model="base"}'] < 100
        assert m['whetstone_http_requests_total{route="/v1/completions",status="499"}'] == 1
        t0 = time.monotonic()
        s, _, r = request(srv, "POST", "/v1/completions", {"prompt": "b", "max_tokens": 5})
        assert s == 200 and r["usage"]["completion_tokens"] <= 5
        assert time.monotonic() - t0 < 2


def test_full_queue_gets_429_and_shutdown_finishes_in_flight(ckpt):
    gate = threading.Event()
    with serving(ckpt, adapters=False, api_key=None, max_batch=1, max_queue=1,
                 step_hook=lambda: gate.wait(10)) as srv:
        results = {}

        def call(name, body):
            results[name] = request(srv, "POST", "/v1/completions", body)
        a = threading.Thread(target=call, args=("a", {"prompt": "a", "max_tokens": 4,
                                                      "temperature": 0}))
        a.start()
        wait_for(lambda: metrics(srv)["whetstone_requests_running"] == 1)
        b = threading.Thread(target=call, args=("b", {"prompt": "b", "max_tokens": 4,
                                                      "stream": True}))
        b.start()
        wait_for(lambda: metrics(srv)["whetstone_requests_waiting"] == 1)
        s, r, obj = request(srv, "POST", "/v1/completions", {"prompt": "c"})
        assert s == 429 and obj["error"]["type"] == "rate_limit_error"
        assert r.getheader("Retry-After") == "1"
        # Graceful shutdown while a runs and b waits: both finish, then the port closes.
        stopper = threading.Thread(target=srv.stop, kwargs={"grace": 10})
        stopper.start()
        time.sleep(0.2)
        gate.set()
        stopper.join(30)
        a.join(10)
        b.join(10)
        assert results["a"][0] == 200 and results["a"][2]["usage"]["completion_tokens"] <= 4
        assert results["b"][0] == 200 and sse_events(results["b"][2])
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", srv.port), timeout=2).close()


def test_queue_limit_counts_only_requests_waiting_for_a_row(ckpt):
    """--max-queue 0 still serves while rows are free; a request past the free rows is 429."""
    gate = threading.Event()
    with serving(ckpt, adapters=False, api_key=None, max_batch=2, max_queue=0,
                 step_hook=lambda: gate.wait(10)) as srv:
        results = {}

        def call(name):
            results[name] = request(srv, "POST", "/v1/completions",
                                    {"prompt": name, "max_tokens": 3})
        threads = [threading.Thread(target=call, args=(k,)) for k in "ab"]
        threads[0].start()  # two requests for two rows while the first decode step is held
        wait_for(lambda: metrics(srv)["whetstone_requests_running"] == 1)
        threads[1].start()
        wait_for(lambda: metrics(srv)["whetstone_requests_waiting"] == 1)
        s, _, obj = request(srv, "POST", "/v1/completions", {"prompt": "c"})
        assert s == 429 and "all 2 rows are taken" in obj["error"]["message"]
        gate.set()
        for t in threads:
            t.join(20)
        assert results["a"][0] == 200 and results["b"][0] == 200
        with pytest.raises(ValueError, match="does not fit"):  # could never be admitted
            srv.server.engine.submit(GenRequest([[1]], SamplingParams(2), n=3))


def test_shutdown_requested_before_the_server_runs(ckpt):
    model, tok = load_model(ckpt["base"])
    server = Server(Engine(model, tok, "base", registry=Registry()), port=0)
    server.request_shutdown(grace=0)  # e.g. a signal during startup: not lost, no error
    t0 = time.monotonic()
    asyncio.run(asyncio.wait_for(server.serve(), 20))
    assert time.monotonic() - t0 < 10


def test_shutdown_with_no_grace_cancels_in_flight_with_503(ckpt):
    with serving(ckpt, adapters=False, api_key=None, max_batch=2,
                 step_hook=lambda: time.sleep(0.02)) as srv:
        results = {}

        def call(name, body):
            results[name] = request(srv, "POST", "/v1/completions", body)
        # Greedy: a sampled stop token could end a request before the shutdown (then 200).
        threads = [threading.Thread(target=call, args=(k, {"prompt": "a", "max_tokens": 200,
                                                           "temperature": 0, "stream": k == "s"}))
                   for k in ("s", "j")]
        for t in threads:
            t.start()
        wait_for(lambda: metrics(srv)["whetstone_requests_running"] == 2)
        srv.stop(grace=0)
        for t in threads:
            t.join(10)
    assert results["j"][0] == 503 and results["j"][2]["error"]["type"] == "server_error"
    events = sse_events(results["s"][2])  # headers were sent: the error is the last event
    assert results["s"][0] == 200 and events[-1]["error"]["type"] == "server_error"


def wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------------
# Load: 16 concurrent clients, a few hundred requests, ~20% malformed
# ---------------------------------------------------------------------------------------------
def test_load_16_clients_no_5xx_all_correct_metrics_agree(ckpt, refs):
    tok = refs["tok"]
    prompts = ["To be", "or not", "What light through yonder window", "a", "Hello, world", "xyz"]
    kinds = ["cmpl", "cmpl_stream", "chat", "chat_stream", "n2", "adapter"]
    expect = {}
    for p in prompts:
        for m in ("base", "ad"):
            expect[("cmpl", m, p)] = ref_text(refs, m, tok.encode(p), 6)
        msgs = [{"role": "user", "content": p}]
        expect[("chat", "base", p)] = ref_text(refs, "base", chat_ids(refs, msgs), 6)
    malformed = [  # (method, path, raw body, key, status)
        ("POST", "/v1/completions", b"{bad json", KEY, 400),
        ("POST", "/v1/completions", b'{"prompt": "a", "max_tokens": "x"}', KEY, 400),
        ("POST", "/v1/completions", b'{"prompt": "a", "model": "nope"}', KEY, 404),
        ("POST", "/v1/chat/completions", b'{"messages": "hi"}', KEY, 400),
        ("POST", "/v1/completions", b'{"prompt": "a"}', None, 401),
        ("POST", "/v1/completions", json.dumps({"prompt": "a" * 300}).encode(), KEY, 400),
        ("GET", "/v1/chat/completions", None, KEY, 405),
        ("POST", "/v1/completions", b"x" * ((1 << 20) + 1), KEY, 413),
    ]
    n_clients, per_client = 16, 20
    sent = {}  # (route, status) -> count
    tokens = {"prompt": 0, "completion": 0}
    failures, lock = [], threading.Lock()

    def client(cid):
        rng = random.Random(cid)
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
        for i in range(per_client):
            try:
                if i % 5 == 4:  # 20% malformed
                    method, path, raw, key, want = malformed[(cid + i) % len(malformed)]
                    h = {"Authorization": f"Bearer {key}"} if key else {}
                    conn.request(method, path, body=raw, headers=h)
                    r = conn.getresponse()
                    body = json.loads(r.read())
                    ok = r.status == want and "error" in body
                    route = path
                    with lock:
                        if not ok:
                            failures.append((method, path, r.status, body))
                        sent[(route, r.status)] = sent.get((route, r.status), 0) + 1
                    continue
                kind, p = rng.choice(kinds), rng.choice(prompts)
                stream = kind.endswith("_stream")
                model = "ad" if kind == "adapter" else "base"
                n = 2 if kind == "n2" else 1
                if kind.startswith("chat"):
                    path = "/v1/chat/completions"
                    body = {"messages": [{"role": "user", "content": p}]}
                    want = expect[("chat", "base", p)]
                else:
                    path = "/v1/completions"
                    body = {"prompt": p}
                    want = expect[("cmpl", model, p)]
                body.update(model=model, max_tokens=6, temperature=0, n=n, stream=stream)
                if stream:
                    body["stream_options"] = {"include_usage": True}
                conn.request("POST", path, body=json.dumps(body),
                             headers={"Authorization": f"Bearer {KEY}",
                                      "Content-Type": "application/json"})
                r = conn.getresponse()
                raw = r.read().decode()
                texts, reasons = [""] * n, [None] * n
                if stream:
                    events = sse_events(raw)
                    usage = events[-1]["usage"]
                    for ev in events[:-1]:
                        for c in ev["choices"]:
                            piece = c["delta"].get("content") if "delta" in c else c["text"]
                            texts[c["index"]] += piece or ""
                            reasons[c["index"]] = c["finish_reason"] or reasons[c["index"]]
                else:
                    obj = json.loads(raw)
                    usage = obj["usage"]
                    for c in obj["choices"]:
                        texts[c["index"]] = c["message"]["content"] if "message" in c else c["text"]
                        reasons[c["index"]] = c["finish_reason"]
                ok = (r.status == 200 and texts == [want[0]] * n and reasons == [want[1]] * n
                      and usage["completion_tokens"] == n * want[2])
                with lock:
                    if not ok:
                        failures.append((kind, p, r.status, texts, want))
                    sent[(path, r.status)] = sent.get((path, r.status), 0) + 1
                    tokens["prompt"] += usage["prompt_tokens"]
                    tokens["completion"] += usage["completion_tokens"]
            except Exception as e:  # noqa: BLE001 (a crash of the client thread is a failure)
                with lock:
                    failures.append(("exception", repr(e)))
                conn.close()
        conn.close()

    with serving(ckpt, max_batch=8, max_queue=64) as srv:
        t0 = time.monotonic()
        threads = [threading.Thread(target=client, args=(c,)) for c in range(n_clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        elapsed = time.monotonic() - t0
        m = metrics(srv)
    total = n_clients * per_client
    print(f"\nload: {total} requests from {n_clients} clients in {elapsed:.2f} s "
          f"({total / elapsed:.1f} req/s, {tokens['completion'] / elapsed:.0f} generated tok/s)")
    assert not failures, failures[:5]
    assert sum(sent.values()) == total and not any(s >= 500 for _, s in sent)
    served = {k: v for k, v in m.items() if k.startswith("whetstone_http_requests_total")}
    want = {f'whetstone_http_requests_total{{route="{r}",status="{s}"}}': float(c)
            for (r, s), c in sent.items()}
    assert served == want
    assert m['whetstone_generation_tokens_total{model="base"}'] + \
        m['whetstone_generation_tokens_total{model="ad"}'] == tokens["completion"]
    assert m['whetstone_prompt_tokens_total{model="base"}'] + \
        m['whetstone_prompt_tokens_total{model="ad"}'] == tokens["prompt"]
    n_ok = sum(c for (r, s), c in sent.items() if s == 200)
    gen_routes = ("/v1/completions", "/v1/chat/completions")
    assert sum(m[f'whetstone_http_request_duration_seconds_count{{route="{r}"}}']
               for r in gen_routes) == sum(c for (r, s), c in sent.items() if r in gen_routes)
    assert sum(m.get(f'whetstone_time_to_first_token_seconds_count{{route="{r}"}}', 0)
               for r in gen_routes) == n_ok
    assert m["whetstone_requests_running"] == 0 and m["whetstone_requests_waiting"] == 0
    assert m["whetstone_decode_batch_size_sum"] > m["whetstone_decode_batch_size_count"]  # batched


# ---------------------------------------------------------------------------------------------
# serve.py as a process: flags, SIGTERM
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,msg", [
    (["--adapter", "noequals"], "NAME=DIR"),
    (["--adapter", "x=/does/not/exist"], "no such directory"),
    (["--max-batch", "0"], "--max-batch"),
    (["--port", "70000"], "--port"),
    (["--device", "foo"], "--device"),
    (["--max-model-len", "0"], "--max-model-len"),
])
def test_cli_bad_flags_one_line_exit_2(ckpt, capsys, args, msg):
    sys.path.insert(0, ROOT)
    import serve as serve_cli
    rc = serve_cli.cli(["--model", ckpt["base"], *args])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and err.count("\n") == 1


def test_cli_adapter_as_model_with_more_adapters_says_what_to_give(ckpt, tmp_path, capsys):
    """--model ADAPTER_DIR alone serves base + adapter; with --adapter too the line says to give
    the base as --model (it used to fail later on 'already has LoRA layers')."""
    import shutil
    import serve as serve_cli
    ad = tmp_path / "run"
    shutil.copytree(ckpt["adapter"], ad)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps({**cfg,
                                                        "base_model_name_or_path": ckpt["base"]}))
    rc = serve_cli.cli(["--model", str(ad), "--adapter", f"x={ckpt['adapter']}"])
    err = capsys.readouterr().err
    assert rc == 2 and "is an adapter" in err and f"--adapter NAME={ad}" in err, err
    assert err.count("\n") == 1


def test_cli_process_serves_and_stops_on_sigterm(ckpt):
    env = {**os.environ, "WHETSTONE_API_KEY": "k2", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), "--model",
                             ckpt["base"], "--port", "0", "--served-model-name", "tiny"],
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        line, before = "", ""
        deadline = time.monotonic() + 60
        while "serving" not in line and time.monotonic() < deadline:
            line = proc.stderr.readline()
            before += line
            assert line or proc.poll() is None, "server exited"
        assert "127.0.0.1:" in line and "API key required" in line
        assert "has no chat template; /v1/chat/completions uses ChatML" in before  # byte BPE: none
        port = int(line.split("127.0.0.1:")[1].split()[0])

        class Srv:
            pass
        srv = Srv()
        srv.port = port
        s, _, r = request(srv, "POST", "/v1/completions", {"model": "tiny", "prompt": "a",
                                                          "max_tokens": 3}, key="k2")
        assert s == 200 and r["model"] == "tiny"
        assert request(srv, "GET", "/v1/models", key=None)[0] == 401
        proc.send_signal(signal.SIGTERM)
        while "stopped" not in line:
            line = proc.stderr.readline()
            assert line, "exited without 'stopped'"
        # a second signal while the process exits (Ctrl-C twice) changes nothing: exit 0, no
        # KeyboardInterrupt traceback from the interpreter's teardown
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        rest = proc.stderr.read()
        assert "Traceback" not in rest and "KeyboardInterrupt" not in rest, rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_parse_adapter_specs():
    assert parse_adapter_specs(["a=/x", "b=y=z"]) == {"a": "/x", "b": "y=z"}
    with pytest.raises(ValueError, match="twice"):
        parse_adapter_specs(["a=/x", "a=/y"])
    with pytest.raises(ValueError, match="twice"):
        parse_adapter_specs(["a=/x", "a =/y"])


@pytest.mark.slow
def test_smollm2_concurrent_chats_equal_generate_py(capsys):
    """The real demo model: four chats at once (batched rows of different lengths) each answer
    exactly what generate.py answers alone; the capital question gets Paris."""
    from engine.hub import demo_model_path
    if not os.path.isfile(demo_model_path("smollm2-135m-instruct")):
        pytest.skip("SmolLM2 demo model not in the cache (python generate.py --model "
                    "smollm2-135m-instruct fetches it)")
    openai = pytest.importorskip("openai")
    sys.path.insert(0, ROOT)
    import generate as gen_cli
    questions = ["What is the capital of France?", "Name a primary color.",
                 "Write one word that rhymes with cat.", "What is 2 + 2? Answer briefly."]
    want = []
    for q in questions:
        rc = gen_cli.cli(["--model", "smollm2-135m-instruct", "--chat", q, "--temperature", "0",
                          "--max-new-tokens", "24", "--quiet"])
        want.append(capsys.readouterr().out)
        assert rc == 0
    model, tok = load_model("smollm2-135m-instruct")
    engine = Engine(model, tok, "smollm2", max_batch=4, max_model_len=512, registry=Registry())
    with ServerThread(engine, port=0) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0,
                               timeout=120)
        got = [None] * len(questions)

        def ask(i):
            r = client.chat.completions.create(
                model="smollm2", messages=[{"role": "user", "content": questions[i]}],
                max_tokens=24, temperature=0)
            got[i] = r.choices[0].message.content + "\n"
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(questions))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        batch = parse_text(engine.registry.render())
    assert got == want and "Paris" in got[0]
    assert batch["whetstone_decode_batch_size_sum"] > batch["whetstone_decode_batch_size_count"]


# ---------------------------------------------------------------------------------------------
# engine/metrics.py
# ---------------------------------------------------------------------------------------------
def test_registry_text_format_pinned():
    reg = Registry(prefix="t_")
    c = reg.counter("reqs_total", "Requests", ["route", "status"])
    c.inc(route="/a", status="200")
    c.inc(2, route='/q"\\\n', status="400")
    g = reg.gauge("temp", "A gauge")
    g.set(3.5)
    g.dec(1)
    h = reg.histogram("lat_seconds", "Latency", ["route"], buckets=[0.1, 1])
    for v in (0.05, 0.1, 0.5, 7):
        h.observe(v, route="/a")
    assert reg.render() == (
        "# HELP t_reqs_total Requests\n# TYPE t_reqs_total counter\n"
        't_reqs_total{route="/a",status="200"} 1\n'
        't_reqs_total{route="/q\\"\\\\\\n",status="400"} 2\n'
        "# HELP t_temp A gauge\n# TYPE t_temp gauge\nt_temp 2.5\n"
        "# HELP t_lat_seconds Latency\n# TYPE t_lat_seconds histogram\n"
        't_lat_seconds_bucket{route="/a",le="0.1"} 2\n'
        't_lat_seconds_bucket{route="/a",le="1"} 3\n'
        't_lat_seconds_bucket{route="/a",le="+Inf"} 4\n'
        't_lat_seconds_sum{route="/a"} 7.65\n'
        't_lat_seconds_count{route="/a"} 4\n')
    with pytest.raises(ValueError, match="can only increase"):
        c.inc(-1, route="/a", status="200")
    with pytest.raises(ValueError, match="takes labels"):
        c.inc(route="/a")
    with pytest.raises(ValueError, match="already registered"):
        reg.gauge("temp", "again")


def test_training_metrics_server_standalone():
    import urllib.request
    with TrainingMetricsServer(0) as srv:
        assert srv.host == "127.0.0.1" and srv.port > 0
        srv.update(step=10, loss=2.5, lr=3e-4, tokens_per_s=1234.5, eta_s=60)
        srv.update(step=20, loss=2.25, val_loss=2.4, lr=None)
        with urllib.request.urlopen(srv.url, timeout=10) as r:
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            m = parse_text(r.read().decode())
        assert m["whetstone_train_step"] == 20 and m["whetstone_train_loss"] == 2.25
        assert m["whetstone_train_val_loss"] == 2.4 and m["whetstone_train_lr"] == 3e-4
        assert m["whetstone_train_tokens_per_second"] == 1234.5
        assert m["whetstone_train_eta_seconds"] == 60 and m["whetstone_train_updates_total"] == 2
        with pytest.raises(ValueError, match="unknown training metric"):
            srv.update(stepp=1)
        with pytest.raises(OSError, match="cannot serve metrics"):
            TrainingMetricsServer(srv.port)  # port taken: one clear line
    with pytest.raises(OSError):  # closed
        urllib.request.urlopen(srv.url, timeout=2)


def test_chat_request_with_tools_renders_the_tool_use_template(ckpt, tmp_path):
    """A model with named templates ("default" + "tool_use", as Hermes-2-Pro): a chat request
    with tools is rendered with tool_use, one without with default (transformers' choice); an
    adapter's own saved set replaces the base's. "tools": [] is tools given, as transformers,
    TRL's SFT (and ours) and vLLM read it: tool_use, rendered with an empty list."""
    import shutil
    from engine.serve import API
    from tokenizer.chat import DEFAULT_CHAT_TEMPLATE, render_chat
    tool_use = ("{% if tools %}<|im_start|>system\nTOOLS {{ tools | tojson }}<|im_end|>\n"
                "{% endif %}" + DEFAULT_CHAT_TEMPLATE)
    own = {"default": "{% for m in messages %}{{ m.content }}<|im_end|>{% endfor %}",
           "tool_use": "{{ tools | tojson }}{% for m in messages %}{{ m.content }}<|im_end|>{% endfor %}"}
    tuned = tmp_path / "tuned"
    shutil.copytree(ckpt["adapter"], tuned)
    (tuned / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": k, "template": v} for k, v in own.items()]}))
    model, tok = load_model(ckpt["base"])
    tok.chat_templates = {"default": DEFAULT_CHAT_TEMPLATE, "tool_use": tool_use}
    api = API(Engine(model, tok, "base", {"t": str(tuned)}, registry=Registry()))
    msgs = [{"role": "user", "content": "Weather?"}]
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {}}}]
    for name, templates in (("base", tok.chat_templates), ("t", own)):
        for t in (tools, [], None):
            ids = api.prepare("chat", {"model": name, "messages": msgs, "tools": t}).prompts[0]
            want = templates["tool_use" if t is not None else "default"]
            assert ids == tok.encode(render_chat(tok, msgs, template=want, tools=t), add_bos=False)
    assert tok.decode(api.prepare("chat", {"model": "base", "messages": msgs, "tools": tools}
                                  ).prompts[0]).startswith("<|im_start|>system\nTOOLS [")


def test_adapter_with_its_own_chat_template_gets_its_prompt_and_stop_ids(ckpt, tmp_path):
    """An adapter trained with train.py --chat-template saved that template: chat requests to
    it are rendered with it and stop at its end of turn; the base keeps ChatML. serve.py's
    --chat-template (chat_template=) replaces every model's. An unknown adapter is refused."""
    import shutil
    from engine.serve import API
    from tokenizer.chat import DEFAULT_CHAT_TEMPLATE, render_chat
    own = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '<|endoftext|>' }}"
           "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    tuned = tmp_path / "tuned"
    shutil.copytree(ckpt["adapter"], tuned)
    (tuned / "tokenizer_config.json").write_text(json.dumps({"chat_template": own}))
    msgs = [{"role": "user", "content": "Hi"}]
    for override in (None, own):
        model, tok = load_model(ckpt["base"])
        engine = Engine(model, tok, "base", {"ad": ckpt["adapter"], "t": str(tuned)},
                        registry=Registry(), chat_template=override)
        api = API(engine)
        for name in ("base", "ad", "t"):
            expected = own if override or name == "t" else DEFAULT_CHAT_TEMPLATE
            ids = api.prepare("chat", {"model": name, "messages": msgs}).prompts[0]
            assert ids == tok.encode(render_chat(tok, msgs, template=expected), add_bos=False)
            adapter = None if name == "base" else name
            assert (258 in engine.stop_ids_of[adapter]) == (expected == DEFAULT_CHAT_TEMPLATE)
            assert 256 in engine.stop_ids_of[adapter]  # EOS always
    with pytest.raises(ValueError, match="no adapter 'nope'"):
        engine.submit(GenRequest([[1, 2]], SamplingParams(max_tokens=1), adapter="nope"))
