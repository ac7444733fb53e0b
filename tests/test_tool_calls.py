"""Tests for tool calling in the server: engine/tool_calls.py (the Hermes-style parser) and its
use in engine/serve_api.py (request validation, rendering, responses, streaming).

References: transformers' apply_chat_template(messages, tools=...) under Qwen2.5-Instruct's chat
template for the rendered prompt; vLLM's hermes parser and OpenAI's API shapes for the answers;
the official `openai` client reading them. The model's output is fixed text: the parser and the
API layer are driven with it directly, and end to end a stub sampler (keyed by the request's
seed) makes a tiny random model "generate" it, so everything else (prefill, decode, stop ids,
detokenizing, HTTP, SSE) is the real path.
"""
import json
import random

import pytest
import torch

import engine.serve_engine as serve_engine
from chat_templates import QWEN25  # Qwen2.5-Instruct's: renders OpenAI-style tool use
from engine.config import preset
from engine.metrics import Registry
from engine.model import Transformer
from engine.serve import API, APIError, Engine, GenRequest, ServerThread
from engine.serve_api import _Answer
from engine.tool_calls import ToolCallParser, parse_tool_calls

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}


def call(name, args, pre="", post=""):
    return f'{pre}<tool_call>\n{json.dumps({"name": name, "arguments": args})}\n</tool_call>{post}'


PARIS = call("get_weather", {"city": "Paris"})
OSLO = call("get_weather", {"city": "Oslo é"})


pytestmark = pytest.mark.usefixtures("one_thread")


def byte_tok(template=QWEN25):
    """Byte-level BPE, no merges: id b < 256 is byte b; 256-258 are ChatML specials."""
    from tokenizer.bpe import ByteLevelBPETokenizer, bytes_to_unicode
    b2u = bytes_to_unicode()
    added = [{"id": 256, "content": "<|endoftext|>"}, {"id": 257, "content": "<|im_start|>"},
             {"id": 258, "content": "<|im_end|>"}]
    return ByteLevelBPETokenizer({b2u[b]: b for b in range(256)}, [], pre_tokenizer="gpt-2",
                                 added_tokens=added, eos_id=256, chat_template=template)


def make_engine(template=QWEN25, **kw):
    torch.manual_seed(0)  # a context long enough for the tool prompt (one token per byte)
    model = Transformer(preset("tiny", vocab_size=259, max_position_embeddings=2048))
    return Engine(model, byte_tok(template), "qwen", registry=Registry(), **kw)


@pytest.fixture(scope="module")
def api():
    return API(make_engine())


# ---------------------------------------------------------------------------------------------
# The parser
# ---------------------------------------------------------------------------------------------
PARSED = [  # (generated text, message content, [(name, arguments JSON)])
    ("Hello there.", "Hello there.", []),
    ("", "", []),
    (" \n", " \n", []),
    (PARIS, None, [("get_weather", '{"city": "Paris"}')]),
    ("Let me check.\n\n" + PARIS + "\n", "Let me check.", [("get_weather", '{"city": "Paris"}')]),
    (PARIS + "\n" + OSLO, None, [("get_weather", '{"city": "Paris"}'),
                                ("get_weather", '{"city": "Oslo é"}')]),
    (PARIS + "\nDone. ", "Done. ", [("get_weather", '{"city": "Paris"}')]),
    ('<tool_call>{"name": "get_time"}</tool_call>', None, [("get_time", "{}")]),
    ('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>', None,
     [("f", '{"a": 1}')]),  # arguments as a JSON string: kept as written
    # not calls: the text stays as generated (vLLM), tags included
    ("a <tool_call>{not json}</tool_call> b", "a <tool_call>{not json}</tool_call> b", []),
    ('<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', []),
    ('<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
     '<tool_call>{"name": "f", "arguments": [1]}</tool_call>', []),
    ('<tool_call>{"name": "f", "arguments": {"x": NaN}}</tool_call>',
     '<tool_call>{"name": "f", "arguments": {"x": NaN}}</tool_call>', []),
    ("x " + PARIS[:-3], "x " + PARIS[:-3], []),  # never closed (e.g. max_tokens)
    ("a <tool_ca", "a <tool_ca", []),
    # an invalid block beside a valid one stays in the content
    ("<tool_call>oops</tool_call>\n" + PARIS, "<tool_call>oops</tool_call>",
     [("get_weather", '{"city": "Paris"}')]),
    ("<" + PARIS, "<", [("get_weather", '{"city": "Paris"}')]),
]


@pytest.mark.parametrize("text,content,calls", PARSED)
def test_parse_whole_texts(text, content, calls):
    got_content, got = parse_tool_calls(text)
    assert got_content == content
    assert [(c.name, c.arguments) for c in got] == calls
    assert all(c.id.startswith("call_") and len(c.id) > 10 for c in got)
    assert len({c.id for c in got}) == len(got)
    for c in got:
        assert isinstance(json.loads(c.arguments), dict)


@pytest.mark.parametrize("text,content,calls", PARSED)
def test_parse_is_the_same_in_any_pieces(text, content, calls):
    """Fed in random pieces (tokens), the parser emits the whole text's content and calls,
    and never emits text it later takes back."""
    for seed in range(30):
        rng, p, events, i = random.Random(seed), ToolCallParser(), [], 0
        while i < len(text):
            j = i + rng.randint(1, 6)
            events += p.feed(text[i:j])
            i = j
        events += p.finish()
        streamed = "".join(e[1] for e in events if e[0] == "content")
        assert (streamed or None if calls else streamed) == content
        assert [(e[1].name, e[1].arguments) for e in events if e[0] == "call"] == calls


def test_parallel_tool_calls_false_keeps_the_first():
    content, calls = parse_tool_calls("On it.\n" + PARIS + "\n" + OSLO + "\n", max_calls=1)
    assert content == "On it." and [c.arguments for c in calls] == ['{"city": "Paris"}']


# ---------------------------------------------------------------------------------------------
# Requests: validation and the rendered prompt
# ---------------------------------------------------------------------------------------------
USER = [{"role": "user", "content": "Weather in Paris?"}]
BAD = [  # (body, param, message part)
    ({"tools": {"type": "function"}}, "tools", "'tools' must be a list"),
    ({"tools": [{"type": "function"}]}, "tools", "tools[0] must be an object"),
    ({"tools": [{"type": "code", "function": {"name": "f"}}]}, "tools", "tools[0]"),
    ({"tools": [WEATHER, {"type": "function", "function": {"name": ""}}]}, "tools",
     "tools[1].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "tools",
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "description": 3}}]}, "tools",
     "tools[0].function.description"),
    ({"tool_choice": "auto"}, "tool_choice", "only allowed when 'tools'"),
    ({"tools": [WEATHER], "tool_choice": "required"}, "tool_choice", "guided decoding"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
     "tool_choice", "guided decoding"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", "must be"),
    ({"tools": [WEATHER], "parallel_tool_calls": "no"}, "parallel_tool_calls", "boolean"),
    ({"functions": [{"name": "f"}]}, "functions", "not supported"),
    ({"messages": USER + [{"role": "assistant", "tool_calls": {"id": "x"}}]}, "messages",
     "messages[1].tool_calls must be a list"),
    ({"messages": USER + [{"role": "assistant", "tool_calls": [{"type": "function"}]}]},
     "messages", "messages[1].tool_calls[0]"),
    ({"messages": USER + [{"role": "assistant", "tool_calls": [{"type": "function", "function": {
        "name": "get_weather", "arguments": "{city: Paris}"}}]}]}, "messages",
     "messages[1].tool_calls[0].function.arguments is not valid JSON"),
    ({"messages": USER + [{"role": "assistant", "tool_calls": [{"type": "function", "function": {
        "name": "get_weather", "arguments": "[1]"}}]}]}, "messages", "must be a JSON object"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, "messages",
     "only assistant messages"),
    ({"messages": USER + [{"role": "tool", "content": "sunny", "tool_call_id": 7}]}, "messages",
     "messages[1].tool_call_id"),
]


@pytest.mark.parametrize("body,param,part", BAD)
def test_bad_tool_requests_get_one_line_400s(api, body, param, part):
    with pytest.raises(APIError) as e:
        api.prepare("chat", {"messages": USER, **body})
    assert (e.value.status, e.value.param) == (400, param)
    assert part in e.value.message and "\n" not in e.value.message


def test_tool_fields_on_completions_are_refused(api):
    with pytest.raises(APIError) as e:
        api.prepare("completion", {"prompt": "a", "tools": [WEATHER]})
    assert (e.value.status, e.value.param) == (400, "tools")
    assert "/v1/chat/completions" in e.value.message


def test_tool_choice_defaults_and_none(api):
    assert api.prepare("chat", {"messages": USER, "tools": [WEATHER]}).parse_tools
    assert api.prepare("chat", {"messages": USER, "tools": [WEATHER],
                                "tool_choice": "auto"}).parse_tools
    # "none": the tools are still rendered (vLLM's default), nothing is parsed
    job = api.prepare("chat", {"messages": USER, "tools": [WEATHER], "tool_choice": "none"})
    assert not job.parse_tools
    assert job.prompts == api.prepare("chat", {"messages": USER, "tools": [WEATHER]}).prompts
    for body in ({"messages": USER}, {"messages": USER, "tools": []},
                 {"messages": USER, "tool_choice": "none"}):
        job = api.prepare("chat", body)
        assert not job.parse_tools and job.max_tool_calls is None
    assert api.prepare("chat", {"messages": USER, "tools": [WEATHER],
                                "parallel_tool_calls": False}).max_tool_calls == 1


CONVERSATION = [  # OpenAI's form: arguments as JSON text, tool results with tool_call_id
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and Oslo?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21C"},
    {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "rain"}]},
    {"role": "assistant", "content": "Checking the time too.", "tool_calls": [
        {"id": "call_3", "type": "function", "function": {"name": "get_time", "arguments": ""}}]},
    {"role": "tool", "tool_call_id": "call_3", "content": "12:00"},
]


def test_rendered_prompt_equals_transformers_apply_chat_template(api):
    """The prompt of a tool conversation is transformers' apply_chat_template(messages,
    tools=...) with the arguments as objects (what templates expect; vLLM parses them too)."""
    transformers = pytest.importorskip("transformers")
    hf_tokenizers = pytest.importorskip("tokenizers")
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=hf_tokenizers.Tokenizer.from_str(
            json.dumps(api.tok.to_tokenizer_json())), eos_token="<|endoftext|>")
    as_objects = json.loads(json.dumps(CONVERSATION))
    for m in as_objects:
        for c in m.get("tool_calls") or ():
            c["function"]["arguments"] = json.loads(c["function"]["arguments"] or "{}")
        if isinstance(m.get("content"), list):
            m["content"] = "".join(p["text"] for p in m["content"])
    for msgs, tools in ((CONVERSATION, [WEATHER, TIME]), (USER, [WEATHER]),
                        (CONVERSATION, None)):
        ref_msgs = as_objects if msgs is CONVERSATION else msgs
        ref = fast.apply_chat_template(ref_msgs, tools=tools, add_generation_prompt=True,
                                       tokenize=False, chat_template=QWEN25)
        job = api.prepare("chat", {"messages": msgs, **({"tools": tools} if tools else {})})
        assert api.tok.decode(job.prompts[0]) == ref
        assert job.prompts[0] == api.tok.encode(ref, add_bos=False, add_eos=False)
    assert '{"name": "get_weather", "arguments": {"city": "Oslo"}}' in ref
    assert '{"name": "get_time", "arguments": {}}' in ref


def test_a_template_without_tool_support_is_refused():
    """ChatML (no tools in it) would drop the tools or the calls silently: a 400 instead."""
    api = API(make_engine(template=None))
    with pytest.raises(APIError, match="does not support tools") as e:
        api.prepare("chat", {"messages": USER, "tools": [WEATHER]})
    assert e.value.param == "tools"
    with pytest.raises(APIError, match="does not render the assistant") as e:
        api.prepare("chat", {"messages": CONVERSATION[:4]})
    assert e.value.param == "messages"
    api.prepare("chat", {"messages": USER, "tools": []})  # no tools: fine


# ---------------------------------------------------------------------------------------------
# Responses from fixed texts: streamed == non-streamed
# ---------------------------------------------------------------------------------------------
def answer(api, texts, stream, pieces_seed=0, reason="stop", **body):
    """Drive _Answer with engine events that spell `texts` (one per choice) in random pieces;
    (response or chunks)."""
    job = api.prepare("chat", {"messages": USER, "tools": [WEATHER], "n": len(texts),
                               "stream": stream, **body})
    gen = GenRequest(job.prompts, job.params, job.n)
    ans = _Answer(job, gen, "/v1/chat/completions", 0.0, lambda s: None)
    rng, chunks = random.Random(pieces_seed), ans.start_chunks()
    pos = [0] * len(texts)
    while any(p < len(t) for p, t in zip(pos, texts)):
        i = rng.choice([k for k, t in enumerate(texts) if pos[k] < len(t)])
        j = pos[i] + rng.randint(1, 5)
        chunks += ans.apply(("token", i, texts[i][pos[i]:j]))
        pos[i] = j
    for i, t in enumerate(texts):
        chunks += ans.apply(("finish", i, reason, len(t)))
    ans.apply(("done",))
    return chunks if stream else ans.response()


def merge_stream(chunks, n):
    """What a client builds from the chunks: per choice, content, tool calls, finish_reason."""
    out = [{"content": "", "tool_calls": {}, "finish_reason": None} for _ in range(n)]
    for ch in chunks:
        assert ch["object"] == "chat.completion.chunk"
        for c in ch["choices"]:
            o, d = out[c["index"]], c["delta"]
            o["content"] += d.get("content") or ""
            for tc in d.get("tool_calls") or ():
                cur = o["tool_calls"].setdefault(tc["index"], {"id": None, "name": "",
                                                               "arguments": ""})
                assert not ("id" in tc and cur["id"])  # the id comes once, with the name
                cur["id"] = tc.get("id") or cur["id"]
                cur["name"] += tc.get("function", {}).get("name") or ""
                cur["arguments"] += tc.get("function", {}).get("arguments") or ""
            o["finish_reason"] = c["finish_reason"] or o["finish_reason"]
    return out


@pytest.mark.parametrize("text", [t for t, _, _ in PARSED])
def test_streamed_equals_non_streamed(api, text):
    texts = [text, "Plain answer, " + text]
    resp = answer(api, texts, stream=False)
    for seed in range(5):
        merged = merge_stream(answer(api, texts, stream=True, pieces_seed=seed), 2)
        for choice, got in zip(resp["choices"], merged):
            msg = choice["message"]
            assert got["content"] == (msg["content"] or "")
            assert [(c["name"], c["arguments"]) for c in got["tool_calls"].values()] == [
                (c["function"]["name"], c["function"]["arguments"])
                for c in msg.get("tool_calls", [])]
            assert list(got["tool_calls"]) == list(range(len(msg.get("tool_calls", []))))
            assert all(c["id"].startswith("call_") for c in got["tool_calls"].values())
            assert got["finish_reason"] == choice["finish_reason"]


def test_response_shape(api):
    resp = answer(api, ["Let me check.\n" + PARIS], stream=False)
    choice = resp["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    msg = choice["message"]
    assert msg["role"] == "assistant" and msg["content"] == "Let me check."
    (tc,) = msg["tool_calls"]
    assert set(tc) == {"id", "type", "function"} and tc["type"] == "function"
    assert tc["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    # truncated by max_tokens after a call: "length" stays (llama.cpp), the call is kept
    resp = answer(api, [PARIS + "\nand"], stream=False, reason="length")
    assert resp["choices"][0]["finish_reason"] == "length"
    assert resp["choices"][0]["message"]["tool_calls"]
    # no call / tool_choice "none": the text as generated, no tool_calls key, "stop"
    for text, body in (("Sunny.", {}), (PARIS, {"tool_choice": "none"})):
        choice = answer(api, [text], stream=False, **body)["choices"][0]
        assert choice["message"] == {"role": "assistant", "content": text}
        assert choice["finish_reason"] == "stop"


# ---------------------------------------------------------------------------------------------
# End to end: the openai client against the server, the model's output scripted by seed
# ---------------------------------------------------------------------------------------------
SCRIPTS = {
    7: "I will look it up.\n" + PARIS + "\n" + OSLO,
    8: PARIS,
    9: "It is sunny in Paris.",
}


@pytest.fixture
def scripted(monkeypatch):
    """engine.serve_engine.sample replaced: choice i of a request with seed s generates
    SCRIPTS[s + i] and then <|im_end|> (an end-of-turn stop id)."""
    tok, state = byte_tok(), {}

    def fake_sample(logits, temperature, top_k, top_p, generator, min_p=None):
        ids = state.setdefault(generator, tok.encode(SCRIPTS[generator.initial_seed()],
                                                     add_bos=False, add_eos=False) + [258])
        return ids.pop(0)
    monkeypatch.setattr(serve_engine, "sample", fake_sample)
    return tok


def test_openai_client_reads_tool_calls(scripted):
    openai = pytest.importorskip("openai")
    engine = make_engine(max_batch=4)
    with ServerThread(engine, port=0) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
        kw = dict(model="qwen", messages=USER, tools=[WEATHER], seed=7)
        r = client.chat.completions.create(**kw)
        choice, n_script = r.choices[0], len(scripted.encode(SCRIPTS[7], add_bos=False))
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content == "I will look it up."
        calls = choice.message.tool_calls
        assert [(c.type, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
            ("function", "get_weather", {"city": "Paris"}),
            ("function", "get_weather", {"city": "Oslo é"})]
        assert calls[0].id != calls[1].id
        assert r.usage.completion_tokens == n_script  # usage is unchanged by the parsing

        # streamed: the client's own accumulator gives the same message
        with client.beta.chat.completions.stream(**kw) as stream:
            for _ in stream:
                pass
            final = stream.get_final_completion()
        got = final.choices[0]
        assert got.finish_reason == "tool_calls" and got.message.content == "I will look it up."
        assert [(c.function.name, c.function.arguments) for c in got.message.tool_calls] == [
            (c.function.name, c.function.arguments) for c in calls]

        # the conversation goes on: the calls and their results sent back, a plain answer
        history = USER + [choice.message.model_dump(exclude_none=True)] + [
            {"role": "tool", "tool_call_id": c.id, "content": "sunny"} for c in calls]
        r = client.chat.completions.create(model="qwen", messages=history, tools=[WEATHER],
                                           seed=9)
        assert r.choices[0].message.content == SCRIPTS[9]
        assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "stop"

        # n=2 (seeds 7 and 8), parallel_tool_calls=False keeps each choice's first call
        r = client.chat.completions.create(**kw, n=2, parallel_tool_calls=False)
        assert [len(c.message.tool_calls) for c in r.choices] == [1, 1]
        assert r.choices[1].message.content is None

        # tool_choice "none": the tags come back as text
        r = client.chat.completions.create(**{**kw, "seed": 8}, tool_choice="none")
        assert r.choices[0].message.content == SCRIPTS[8]
        assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "stop"

        with pytest.raises(openai.BadRequestError, match="guided decoding"):
            client.chat.completions.create(**kw, tool_choice="required")


# ---------------------------------------------------------------------------------------------
# Special tokens generated mid-output: hidden (vLLM's skip_special_tokens), tool markers kept
# ---------------------------------------------------------------------------------------------
def hermes_tok():
    """byte_tok with <tool_call> / </tool_call> as special tokens 259, 260 (as in Hermes 2 Pro,
    where a tool parser that skipped special tokens would never see a call)."""
    tok = byte_tok()
    added = [*tok.added_tokens, {"id": 259, "content": "<tool_call>"},
             {"id": 260, "content": "</tool_call>"}]
    from tokenizer.bpe import ByteLevelBPETokenizer
    return ByteLevelBPETokenizer(tok.vocab, [], pre_tokenizer="gpt-2", added_tokens=added,
                                 eos_id=256, chat_template=QWEN25)


def test_special_tokens_are_hidden_and_tool_markers_still_parsed(monkeypatch):
    """<|im_start|> generated mid-answer used to come back as text; now it is hidden (streamed
    deltas too, and completions' text_offset skips it) unless skip_special_tokens is false, and
    special <tool_call> markers still become tool_calls."""
    http = pytest.importorskip("http.client")
    tok = hermes_tok()
    scripts = {1: "Sure<|im_start|>.\n" + PARIS, 2: "ab<|im_start|>c"}
    assert 257 in tok.encode(scripts[1], add_bos=False) and 259 in tok.encode(scripts[1])
    state = {}

    def fake_sample(logits, temperature, top_k, top_p, generator, min_p=None):
        ids = state.setdefault(generator, tok.encode(scripts[generator.initial_seed()],
                                                     add_bos=False, add_eos=False) + [258])
        return ids.pop(0)
    monkeypatch.setattr(serve_engine, "sample", fake_sample)
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=261, max_position_embeddings=2048))
    engine = Engine(model, tok, "hermes", registry=Registry())

    with ServerThread(engine, port=0) as srv:
        def post(path, body):
            conn = http.HTTPConnection("127.0.0.1", srv.port, timeout=60)
            conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
            r = conn.getresponse()
            text = r.read().decode()
            conn.close()
            if not body.get("stream") or r.status != 200:
                return r.status, json.loads(text)
            return r.status, [json.loads(line[6:]) for line in text.split("\n")
                              if line.startswith("data: {")]

        def chat(**kw):
            body = {"messages": USER, "tools": [WEATHER], "seed": 1, **kw}
            _, resp = post("/v1/chat/completions", body)
            _, chunks = post("/v1/chat/completions", {**body, "stream": True})
            merged = merge_stream(chunks, 1)[0]
            msg = resp["choices"][0]["message"]
            assert merged["content"] == (msg["content"] or "")
            assert [c["arguments"] for c in merged["tool_calls"].values()] == [
                c["function"]["arguments"] for c in msg.get("tool_calls", [])]
            return msg

        msg = chat()
        assert msg["content"] == "Sure."
        assert [c["function"]["arguments"] for c in msg["tool_calls"]] == ['{"city": "Paris"}']
        assert chat(skip_special_tokens=False)["content"] == "Sure<|im_start|>."
        # tool_choice "none": every special token hidden (the markers too, as vLLM)
        assert chat(tool_choice="none")["content"] == "Sure.\n" + PARIS[len("<tool_call>"):
                                                                        -len("</tool_call>")]
        assert chat(tool_choice="none", skip_special_tokens=False)["content"] == scripts[1]

        body = {"prompt": "x", "seed": 2, "logprobs": 0}
        s, resp = post("/v1/completions", body)
        choice = resp["choices"][0]
        assert s == 200 and choice["text"] == "abc"
        assert choice["logprobs"]["tokens"] == ["a", "b", "<|im_start|>", "c", "<|im_end|>"]
        assert choice["logprobs"]["text_offset"][:4] == [0, 1, 2, 2]
        _, chunks = post("/v1/completions", {**body, "stream": True})
        assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == "abc"
        _, resp = post("/v1/completions", {**body, "skip_special_tokens": False})
        assert resp["choices"][0]["text"] == "ab<|im_start|>c"
        assert resp["choices"][0]["logprobs"]["text_offset"][:4] == [0, 1, 2, 14]
        _, resp = post("/v1/completions", {**body, "stop": ["<|im_start|>"]})
        assert (resp["choices"][0]["text"], resp["choices"][0]["finish_reason"]) == ("ab", "stop")
        s, resp = post("/v1/completions", {**body, "skip_special_tokens": "no"})
        assert s == 400 and resp["error"]["param"] == "skip_special_tokens"
