"""The OpenAI request/response layer of the server (engine/serve.py): validates a JSON body
into a Job for the scheduler (engine/serve_engine.py) and shapes its events into responses.

Follows the OpenAI API shapes as llama.cpp's tools/server and vLLM's entrypoints serve them
(shared/FORMATS.md section 7): POST /v1/completions, POST /v1/chat/completions (streamed as
`data: {json}` events ending in `data: [DONE]`), GET /v1/models, /health, /metrics; errors are
`{"error": {"message", "type", "param", "code"}}` with a 4xx status for bad input.

Usage counts: prompt_tokens once per prompt (not per choice); completion_tokens are the output
tokens, without the stop id that ended a choice (as engine.generation counts them).

Special tokens the model generates mid-output (`<|im_start|>`, an `<|endoftext|>` that is not a
stop id) are not part of the text, streamed or not, as vLLM's default; the request field
`skip_special_tokens: false` (vLLM's) keeps them. Tool-call parsing keeps its markers.

Tool calling (chat), as vLLM's `--enable-auto-tool-choice --tool-call-parser hermes` and
llama.cpp's server do it for Hermes-style models (Qwen2.5, Hermes 2 Pro / 3, models tuned on it):
`tools` reach the model's chat template (a template that ignores them is a 400, not a silent
drop); assistant messages may carry `tool_calls` (their JSON-string arguments are parsed into
objects before rendering, as vLLM does: templates expect dicts) and `tool` messages their
results. With tool_choice "auto" (the default when tools are given) the answer's
<tool_call>{"name", "arguments"}</tool_call> blocks become message.tool_calls (engine/tool_calls.py
parses them, streamed or not) and finish_reason "tool_calls"; "none" renders the tools but
parses nothing (vLLM's default); "required" and a named function need guided decoding and get a
400. parallel_tool_calls=false keeps the first call (vLLM's rule).

Log-probabilities (engine/serve_engine.py computes them: the model's raw distribution, an fp32
log_softmax of its logits before penalty / temperature / top-k / top-p, as vLLM's default):
  chat: `logprobs: true` and `top_logprobs: 0..20` -> choices[i].logprobs = {"content":
    [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}] * k}],
    "refusal": null}, one entry per content token (the end-of-turn id is not content, as
    OpenAI); streamed, each chunk carries the entries of the tokens whose text it brings.
    top_logprobs without logprobs: true is a 400 (OpenAI's and vLLM's rule).
  completions: `logprobs: 0..20` (OpenAI stops at 5; 20 is vLLM's default max_logprobs) ->
    {"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}, one entry
    per sampled token, the stop id that ended a choice included (as vLLM: a max_tokens=1 scoring
    request always ends with its one sampled token, which lm-eval's [ctxlen:-1] slice drops).
    Each top_logprobs dict holds the N most likely tokens and the sampled one (OpenAI's "up to
    logprobs + 1"), so logprobs: 0 gives {sampled: logprob}. `echo: true` prepends the prompt
    (its text as given, or decoded ids) and, with logprobs, the prompt tokens' entries (the
    first's logprob and top_logprobs are null); max_tokens 0 is allowed with echo and only
    scores the prompt (lm-eval local-completions' loglikelihood request: echo, logprobs 1,
    max_tokens 0 or 1, temperature 0). text_offset counts characters of the returned text,
    from the tokens' bytes (a prompt's BOS counts its own text).
Token strings are the tokens' own text (serve_engine.TokenPieces): a piece of a UTF-8 character
is "bytes:\\xNN..." with the raw bytes in `bytes`; logprobs of -inf are -9999.0 (OpenAI's value).
"""
from __future__ import annotations

import codecs
import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Mapping

from engine.serve_engine import Engine, GenRequest, SamplingParams, TokenLogprob, TokenPieces
from engine.tool_calls import END as TOOL_END, START as TOOL_START, ToolCallParser
from tokenizer.chat import chat_templates_of, render_chat, select_chat_template

# =============================================================================================
# Errors
# =============================================================================================
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 408: "invalid_request_error",
               411: "invalid_request_error", 413: "invalid_request_error",
               429: "rate_limit_error", 431: "invalid_request_error", 500: "server_error",
               503: "server_error", 505: "invalid_request_error"}


class APIError(Exception):
    """An error answered as an OpenAI error object with this HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, close: bool = False):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.close = close  # the connection cannot be reused (body not read, bad framing)

    @property
    def type(self) -> str:
        return ERROR_TYPES.get(self.status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


# =============================================================================================
# OpenAI request validation -> (prompts, params)
# =============================================================================================
@dataclass
class Job:
    kind: str  # "completion" | "chat"
    model: str
    adapter: str | None
    prompts: list[list[int]]
    params: SamplingParams
    n: int
    stream: bool
    include_usage: bool
    parse_tools: bool = False  # tool_choice "auto": <tool_call> blocks become tool_calls
    max_tool_calls: int | None = None  # 1 when parallel_tool_calls is false
    logprobs: int | None = None  # None: off; k: top_logprobs (chat) / logprobs (completions)
    echo_texts: list[str] | None = None  # completions with echo: each prompt's text
    pieces: TokenPieces | None = None  # id -> (token text, bytes) for logprobs
    hidden: frozenset[int] = frozenset()  # ids without text in the output (text_offset)


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def _finite(v: int | float) -> bool:
    """A finite float, also after conversion (a JSON integer like 1e400 overflows float)."""
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


def _typed(body: dict, name: str, kind: str, default=None):
    """body[name] checked against kind ('int', 'number', 'bool', 'str'); absent/null -> default."""
    v = body.get(name)
    if v is None:
        return default
    ok = {"int": isinstance(v, int) and not isinstance(v, bool),
          "number": isinstance(v, (int, float)) and not isinstance(v, bool) and _finite(v),
          "bool": isinstance(v, bool),
          "str": isinstance(v, str)}[kind]
    if not ok:
        what = {"int": "an integer", "number": "a number", "bool": "a boolean",
                "str": "a string"}[kind]
        raise _bad(f"'{name}' must be {what}, got {json.dumps(v)[:40]}", name)
    return v


# Fields we accept only at their "off" value (the API has them; this server does not).
_UNSUPPORTED = {"best_of": (None, 1), "suffix": (None, ""), "logit_bias": (None, {}),
                "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
                "functions": (None, []),
                "response_format": (None, {"type": "text"})}
# Chat-only fields that the completions endpoint refuses unless at their "off" value.
_CHAT_ONLY = {"tools": (None, []), "tool_choice": (None, "none"), "top_logprobs": (None,)}
# Completions-only fields that the chat endpoint refuses unless at their "off" value.
_COMPLETIONS_ONLY = {"echo": (None, False)}
# The most top tokens per position (vLLM's default max_logprobs; OpenAI's chat limit).
MAX_LOGPROBS = 20


# Message roles: OpenAI's ("developer" is its newer "system", "function" its deprecated "tool")
# and Llama 3.1's "ipython" for tool results, as engine/sft.py's ROLES.
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function", "ipython")


def _is_off(v, off: tuple) -> bool:
    return any(v == o and type(v) is type(o) for o in off)  # `false` is not 0 (nor 0 `false`)


class API:
    """Turns a parsed JSON body into a Job (runs on the tokenizer thread)."""

    def __init__(self, engine: Engine, max_stop: int = 16):
        self.engine, self.tok, self.max_stop = engine, engine.tok, max_stop
        self.pieces = TokenPieces(self.tok)

    def prepare(self, kind: str, body) -> Job:
        if not isinstance(body, dict):
            raise _bad("the request body must be a JSON object")
        for name, off in _UNSUPPORTED.items():
            if not _is_off(body.get(name), off):
                raise _bad(f"'{name}' is not supported by this server", name)
        if kind != "chat":
            for name, off in _CHAT_ONLY.items():
                if not _is_off(body.get(name), off):
                    raise _bad(f"'{name}' is only supported by /v1/chat/completions", name)
        else:
            for name, off in _COMPLETIONS_ONLY.items():
                if not _is_off(body.get(name), off):
                    raise _bad(f"'{name}' is only supported by /v1/completions", name)
        model = _typed(body, "model", "str", self.engine.name)
        if model not in self.engine.model_names:
            raise APIError(404, f"the model '{model}' does not exist; available: "
                           f"{', '.join(self.engine.model_names)}", "model", "model_not_found")
        adapter = model if model != self.engine.name else None
        parse_tools, max_calls = False, None
        if kind == "chat":
            tools, parse_tools, max_calls = _tool_options(body)
            # vLLM's extra fields: continue the final (assistant) message instead of starting one
            cont = _typed(body, "continue_final_message", "bool", False)
            gen_prompt = _typed(body, "add_generation_prompt", "bool", not cont)
            if cont and gen_prompt:
                raise _bad("'continue_final_message' and 'add_generation_prompt' cannot both be "
                           "true", "continue_final_message")
            prompts = [self._chat_ids(body.get("messages"), tools,
                                      self.engine.chat_templates[adapter],
                                      {"add_generation_prompt": gen_prompt,
                                       "continue_final_message": cont})]
        else:
            prompts = self._prompt_ids(body.get("prompt"))
        n = _typed(body, "n", "int", 1)
        if not 1 <= n <= self.engine.max_batch:
            raise _bad(f"'n' must be between 1 and {self.engine.max_batch}, got {n}", "n")
        if n * len(prompts) > self.engine.max_batch:
            raise _bad(f"{len(prompts)} prompts x n={n} exceeds this server's batch of "
                       f"{self.engine.max_batch} sequences", "n")
        logprobs, echo = _logprob_options(body, kind)
        params = self._params(body, kind, max(len(p) for p in prompts), echo)
        params.logprobs = logprobs
        params.prompt_logprobs = logprobs if echo else None
        # vLLM's extra field: special tokens generated mid-output are hidden unless it is false;
        # a tool parser still sees its markers (special tokens in some models, e.g. Hermes 2 Pro)
        params.skip_special_tokens = _typed(body, "skip_special_tokens", "bool", True)
        params.keep_special = (TOOL_START, TOOL_END) if parse_tools else ()
        echo_texts = None
        if echo:  # the prompt as the client wrote it; ids as their text
            given = body["prompt"]
            echo_texts = ([given] if isinstance(given, str) else list(given)
                          if all(isinstance(p, str) for p in given)
                          else [self.tok.decode(p) for p in prompts])
        stream = _typed(body, "stream", "bool", False)
        opts = body.get("stream_options")
        if opts is not None and not (isinstance(opts, dict) and isinstance(
                opts.get("include_usage", False), bool)):
            raise _bad("'stream_options' must be an object like {\"include_usage\": true}",
                       "stream_options")
        if opts is not None and not stream:
            raise _bad("'stream_options' is only allowed when 'stream' is true", "stream_options")
        return Job(kind, model, adapter, prompts, params, n, stream,
                   bool(opts and opts.get("include_usage")), parse_tools, max_calls, logprobs,
                   echo_texts, self.pieces if logprobs is not None else None,
                   self.engine.hidden_ids(params))

    def _params(self, body: dict, kind: str, prompt_len: int, echo: bool = False) -> SamplingParams:
        ctx = self.engine.max_len
        room = ctx - prompt_len
        max_tokens, name = _typed(body, "max_tokens", "int"), "max_tokens"
        if kind == "chat":  # OpenAI's newer name wins over the deprecated one (vLLM, SGLang)
            newer = _typed(body, "max_completion_tokens", "int")
            if newer is not None:
                max_tokens, name = newer, "max_completion_tokens"
        scoring = echo and max_tokens == 0  # only the prompt's logprobs: all ctx positions fit
        if prompt_len > ctx or (prompt_len == ctx and not scoring):
            raise _bad(f"this model's maximum context length is {ctx} tokens, but the prompt has "
                       f"{prompt_len} tokens", "messages" if kind == "chat" else "prompt",
                       "context_length_exceeded")
        if max_tokens is None:  # OpenAI's defaults: 16 for completions, the rest for chat
            max_tokens = min(16, room) if kind == "completion" else room
        if max_tokens < 1 and not scoring:
            raise _bad(f"'{name}' must be at least 1 (0 only with 'echo'), got {max_tokens}"
                       if kind == "completion" else
                       f"'{name}' must be at least 1, got {max_tokens}", name)
        if max_tokens > room:
            raise _bad(f"this model's maximum context length is {ctx} tokens; the prompt has "
                       f"{prompt_len} tokens and {name} asks for {max_tokens} more (at most "
                       f"{room} fit)", name, "context_length_exceeded")
        temperature = _typed(body, "temperature", "number", 1.0)
        if temperature < 0:
            raise _bad(f"'temperature' must be >= 0 (0 = greedy), got {temperature}", "temperature")
        top_p = _typed(body, "top_p", "number", 1.0)
        if not 0 < top_p <= 1:
            raise _bad(f"'top_p' must be in (0, 1], got {top_p}", "top_p")
        top_k = _typed(body, "top_k", "int", 0)
        if top_k < -1:
            raise _bad(f"'top_k' must be >= 1 (0 or -1 = off), got {top_k}", "top_k")
        min_p = _typed(body, "min_p", "number", 0.0)  # vLLM's extension, 0 = off
        if not 0 <= min_p <= 1:
            raise _bad(f"'min_p' must be in [0, 1] (0 = off), got {min_p}", "min_p")
        penalty = _typed(body, "repetition_penalty", "number", 1.0)
        if penalty <= 0:
            raise _bad(f"'repetition_penalty' must be > 0 (1 = off), got {penalty}",
                       "repetition_penalty")
        stop = body.get("stop")
        stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
        if not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
            raise _bad("'stop' must be a string or a list of strings", "stop")
        stop = [s for s in stop if s]  # an empty stop string stops nothing
        if len(stop) > self.max_stop:
            raise _bad(f"'stop' has {len(stop)} strings; at most {self.max_stop}", "stop")
        seed = _typed(body, "seed", "int")
        return SamplingParams(max_tokens, float(temperature), top_p if top_p < 1 else None,
                              top_k if top_k > 0 else None, float(penalty),
                              stop, seed, float(min_p) if min_p > 0 else None)

    def _prompt_ids(self, prompt) -> list[list[int]]:
        """prompt: a string, a list of strings, a list of token ids or a list of such lists."""
        if isinstance(prompt, str):
            return [self._encode(prompt)]
        if isinstance(prompt, list) and prompt:
            if all(isinstance(p, str) for p in prompt):
                prompts = [self._encode(p) for p in prompt]
            elif all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                prompts = [self._check_ids(prompt)]
            elif all(isinstance(p, list) and p for p in prompt):
                prompts = [self._check_ids(p) for p in prompt]
            else:
                prompts = None
            if prompts is not None:
                if len(prompts) > self.engine.max_batch:
                    raise _bad(f"{len(prompts)} prompts in one request; at most "
                               f"{self.engine.max_batch}", "prompt")
                return prompts
        raise _bad("'prompt' must be a string, a list of strings, a list of token ids or a list "
                   "of token-id lists (non-empty)", "prompt")

    def _encode(self, text: str) -> list[int]:
        """generate.py's rule: the tokenizer's BOS default, never its EOS (a prompt is the start
        of a text to continue); an empty prompt starts a document."""
        try:
            ids = self.tok.encode(text, add_eos=False)
        except ValueError as e:  # a lone surrogate: valid JSON, not valid text
            raise _bad(f"'prompt': {e}", "prompt") from None
        if not ids:
            start = self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id
            ids = [start] if start is not None else self.tok.encode("\n")
        return ids

    def _check_ids(self, ids: list) -> list[int]:
        V = self.engine.n_vocab
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < V for t in ids):
            raise _bad(f"token ids in 'prompt' must be integers in [0, {V})", "prompt")
        return list(ids)

    def _chat_ids(self, messages, tools: list[dict] | None = None,
                  templates: Mapping[str, str] | None = None, how: dict | None = None
                  ) -> list[int]:
        """The prompt ids of a chat request, rendered with the requested model's `templates`
        {name: template} (None: the tokenizer's): its "tool_use" one when tools are given and
        it has one, else "default", as transformers picks. how: render_chat's
        add_generation_prompt / continue_final_message (default: a new assistant turn)."""
        how = how or {"add_generation_prompt": True}
        if not isinstance(messages, list) or not messages:
            raise _bad("'messages' must be a non-empty list of {role, content} objects",
                       "messages")
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise _bad(f"messages[{i}] must be an object with a string 'role'", "messages")
            if m["role"] not in CHAT_ROLES:  # OpenAI's 400; a typo would render as a new role
                raise _bad(f"messages[{i}].role {json.dumps(m['role'])[:40]} is not one of "
                           f"{', '.join(CHAT_ROLES)}", "messages")
            content = m.get("content")
            # llama.cpp's rule: content is required, except for an assistant turn with tool_calls
            if content is None and (m["role"] != "assistant" or "tool_calls" not in m):
                raise _bad(f"messages[{i}] ({m['role']}) has no 'content'", "messages")
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                for k, p in enumerate(content):
                    kind = p.get("type") if isinstance(p, dict) else None
                    if kind != "text" or not isinstance(p.get("text"), str):
                        what = (f"a {json.dumps(kind)[:40]} part" if isinstance(kind, str)
                                else "not a {\"type\": \"text\", \"text\": ...} part")
                        raise _bad(f"messages[{i}].content[{k}] is {what}; this server takes "
                                   "text parts only (no images or audio)", "messages")
                # vLLM and llama.cpp join a message's text parts with newlines
                content = "\n".join(p["text"] for p in content)
            if content is None:  # an assistant turn that only calls tools
                content = ""
            if not isinstance(content, str):
                raise _bad(f"messages[{i}].content must be a string or a list of text parts",
                           "messages")
            role = "system" if m["role"] == "developer" else m["role"]
            msg = {"role": role, "content": content}
            calls = _message_tool_calls(i, m)
            if calls:
                msg["tool_calls"] = calls
            if role == "tool":  # templates may show which call a result answers
                for key in ("tool_call_id", "name"):
                    if m.get(key) is not None:
                        if not isinstance(m[key], str):
                            raise _bad(f"messages[{i}].{key} must be a string", "messages")
                        msg[key] = m[key]
            clean.append(msg)
        try:
            template = select_chat_template(
                chat_templates_of(self.tok) if templates is None else templates, tools=tools)
            text = self._render(clean, tools, template, how)
            # A template that leaves tools or calls out would answer without them: refuse.
            if tools and self._render(clean, None, template, how) == text:
                raise _bad("the model's chat template does not support tools (it renders none "
                           "of 'tools'); serve a model whose template does, or leave 'tools' "
                           "out", "tools")
            if any("tool_calls" in m for m in clean) and self._render(
                    [{k: v for k, v in m.items() if k != "tool_calls"} for m in clean],
                    tools, template, how) == text:
                raise _bad("the model's chat template does not render the assistant messages' "
                           "'tool_calls'", "messages")
            # as apply_chat_template(tokenize=True): the rendered text, no BOS / EOS added
            return self.tok.encode(text, add_bos=False, add_eos=False)
        except ValueError as e:  # ChatTemplateError, a lone surrogate, ...
            raise _bad(f"cannot apply the chat template: {e}", "messages") from None

    def _render(self, messages: list[dict], tools: list[dict] | None,
                template: str | None, how: dict) -> str:
        return render_chat(self.tok, messages, template=template, tools=tools, **how)


def _logprob_options(body: dict, kind: str) -> tuple[int | None, bool]:
    """(top tokens per position or None for no logprobs, echo) of a request; a 400 naming the
    field for a bad one."""
    if kind == "chat":
        on = _typed(body, "logprobs", "bool", False)
        top = _typed(body, "top_logprobs", "int")
        if top is not None and not on:
            raise _bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        if top is not None and not 0 <= top <= MAX_LOGPROBS:
            raise _bad(f"'top_logprobs' must be between 0 and {MAX_LOGPROBS}, got {top}",
                       "top_logprobs")
        return (top or 0) if on else None, False
    v = body.get("logprobs")
    if v is None or v is False:  # absent / null / false: none
        v = None
    elif isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_LOGPROBS:
        raise _bad(f"'logprobs' must be an integer between 0 and {MAX_LOGPROBS} (the number of "
                   f"most likely tokens per position), got {json.dumps(v)[:40]}", "logprobs")
    return v, _typed(body, "echo", "bool", False)


def _tool_options(body: dict) -> tuple[list[dict] | None, bool, int | None]:
    """(tools for the template, whether to parse tool calls, the most calls to return) of a
    chat request; a 400 naming the field for a malformed one."""
    tools = body.get("tools")  # [] stays a list: tools=[] reaches the template and picks a
    # "tool_use" one, as transformers, vLLM and SFT training render it (nothing to call, though)
    if tools is not None:
        if not isinstance(tools, list):
            raise _bad("'tools' must be a list of {\"type\": \"function\", \"function\": "
                       "{\"name\", \"description\", \"parameters\"}} objects", "tools")
        for k, t in enumerate(tools):
            fn = t.get("function") if isinstance(t, dict) else None
            if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict):
                raise _bad(f"tools[{k}] must be an object {{\"type\": \"function\", "
                           "\"function\": {...}}", "tools")
            if not isinstance(fn.get("name"), str) or not fn["name"]:
                raise _bad(f"tools[{k}].function.name must be a non-empty string", "tools")
            for key, kind, what in (("description", str, "a string"),
                                    ("parameters", dict, "a JSON Schema object"),
                                    ("strict", bool, "a boolean")):
                if fn.get(key) is not None and not isinstance(fn[key], kind):
                    raise _bad(f"tools[{k}].function.{key} must be {what}", "tools")
    choice = body.get("tool_choice")
    if choice is None:
        choice = "auto" if tools else "none"
    named = isinstance(choice, dict) and choice.get("type") == "function" and isinstance(
        choice.get("function"), dict) and isinstance(choice["function"].get("name"), str)
    if choice not in ("none", "auto", "required") and not named:
        raise _bad("'tool_choice' must be \"none\", \"auto\", \"required\" or {\"type\": "
                   "\"function\", \"function\": {\"name\": ...}}", "tool_choice")
    if choice != "none" and not tools:
        raise _bad("'tool_choice' is only allowed when 'tools' are given", "tool_choice")
    if choice != "none" and choice != "auto":
        raise _bad("'tool_choice' \"required\" or a named function is not supported by this "
                   "server (it needs guided decoding); use \"auto\" or \"none\"", "tool_choice")
    parallel = _typed(body, "parallel_tool_calls", "bool", True)
    return tools, choice == "auto", None if parallel else 1


def _message_tool_calls(i: int, m: dict) -> list[dict] | None:
    """An assistant message's OpenAI tool_calls for the template, arguments parsed from their
    JSON string into an object (vLLM's rule: templates expect dicts, e.g. Qwen2.5's tojson)."""
    calls = m.get("tool_calls")
    if calls is None or calls == []:
        return None
    if m["role"] != "assistant":
        raise _bad(f"messages[{i}].tool_calls: only assistant messages call tools", "messages")
    if not isinstance(calls, list):
        raise _bad(f"messages[{i}].tool_calls must be a list", "messages")
    out = []
    for k, c in enumerate(calls):
        where = f"messages[{i}].tool_calls[{k}]"
        fn = c.get("function") if isinstance(c, dict) else None
        if (not isinstance(fn, dict) or c.get("type", "function") != "function"
                or not isinstance(fn.get("name"), str) or not fn["name"]):
            raise _bad(f"{where} must be an object {{\"type\": \"function\", \"function\": "
                       "{\"name\", \"arguments\"}}", "messages")
        args = fn.get("arguments")
        if args is None or args == "":  # vLLM: no arguments are {}
            args = {}
        elif isinstance(args, str):
            try:
                args = json.loads(args, parse_constant=_no_constant)
            except (ValueError, RecursionError):
                raise _bad(f"{where}.function.arguments is not valid JSON", "messages") from None
        if not isinstance(args, dict):
            raise _bad(f"{where}.function.arguments must be a JSON object", "messages")
        call = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if c.get("id") is not None:
            if not isinstance(c["id"], str):
                raise _bad(f"{where}.id must be a string", "messages")
            call = {"id": c["id"], **call}
        out.append(call)
    return out


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


# =============================================================================================
# OpenAI responses (and stream chunks) from engine events
# =============================================================================================
class _Logprobs:
    """One choice's logprobs in the API's shape: every entry so far (the response), and how many
    a stream has sent (each chunk carries the entries of the tokens it brings)."""

    def __init__(self, job: Job, offset: int):
        self.chat, self.k, self.pieces = job.kind == "chat", job.logprobs, job.pieces
        self.hidden = job.hidden
        self.entries: list = []  # chat: token dicts; completions: (token, logprob, top, offset)
        self.sent = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._chars = offset  # text_offset of the next generated token

    def _piece(self, i: int, logprob: float) -> dict:
        text, raw = self.pieces(i)
        return {"token": text, "logprob": logprob, "bytes": list(raw)}

    def add(self, e: TokenLogprob) -> None:
        if self.chat:
            if not e.stop:  # the end-of-turn id is not content (OpenAI)
                self.entries.append({**self._piece(e.id, e.logprob), "top_logprobs": [
                    self._piece(t, lp) for t, lp in e.top[:self.k]]})
            return
        self.entries.append(self._completion_entry(e.id, e, self._chars))
        # characters the token adds to the text; an incomplete character counts when complete
        if e.id not in self.hidden:  # a hidden special token adds none
            self._chars += len(self._decoder.decode(self.pieces(e.id)[1]))

    def add_prompt(self, prompt: list[int], scores: list[TokenLogprob | None]) -> None:
        """Echo: the prompt's entries come first, their offsets from the start of the text."""
        decoder, chars = codecs.getincrementaldecoder("utf-8")("replace"), 0
        for t, e in zip(prompt, scores):
            self.entries.append(self._completion_entry(t, e, chars))
            chars += len(decoder.decode(self.pieces(t)[1]))

    def _completion_entry(self, t: int, e: TokenLogprob | None, offset: int) -> tuple:
        token = self.pieces(t)[0]
        if e is None:  # the first prompt token: nothing to condition on
            return token, None, None, offset
        top = {}
        for i, lp in e.top[:self.k]:
            top.setdefault(self.pieces(i)[0], lp)
        top.setdefault(token, e.logprob)  # OpenAI: the sampled token's always (up to k + 1)
        return token, e.logprob, top, offset

    def _shape(self, entries: list) -> dict:
        if self.chat:
            return {"content": entries, "refusal": None}
        return {"tokens": [e[0] for e in entries], "token_logprobs": [e[1] for e in entries],
                "top_logprobs": [e[2] for e in entries], "text_offset": [e[3] for e in entries]}

    def take(self) -> dict | None:
        """The entries no chunk has carried yet (None if there are none)."""
        if self.sent == len(self.entries):
            return None
        out, self.sent = self.entries[self.sent:], len(self.entries)
        return self._shape(out)

    def full(self) -> dict:
        return self._shape(self.entries)


class _Answer:
    """Builds the OpenAI response (or stream chunks) of one Job from engine events."""

    def __init__(self, job: Job, gen: GenRequest, route: str, t0: float,
                 on_first_token: Callable[[float], None]):
        """on_first_token(seconds since t0) runs once, at the first token (the TTFT metric)."""
        self.job, self.gen, self.route, self.t0 = job, gen, route, t0
        self.on_first_token = on_first_token
        chat = job.kind == "chat"
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.object = "chat.completion" if chat else "text_completion"
        self.created = int(time.time())
        k = gen.num_seqs
        self.texts, self.reasons, self.tokens = [""] * k, [None] * k, [0] * k
        # echo: choice i of prompt i // n starts with that prompt's text
        self.echo = ([job.echo_texts[i // job.n] for i in range(k)] if job.echo_texts is not None
                     else None)
        self.logprobs = ([_Logprobs(job, len(self.echo[i]) if self.echo else 0)
                          for i in range(k)] if job.logprobs is not None else None)
        # tool_choice "auto": each choice's text goes through a tool-call parser
        self.parsers = ([ToolCallParser(job.max_tool_calls) for _ in range(k)]
                        if job.parse_tools else None)
        self.finished = False
        self.first_token = False

    def _base(self, obj: str) -> dict:
        d = {"id": self.id, "object": obj, "created": self.created, "model": self.job.model}
        if self.job.stream and self.job.include_usage:
            d["usage"] = None
        return d

    def _choice(self, i: int, text: str | None, reason: str | None, first: bool = False,
                logprobs: dict | None = None) -> dict:
        if self.job.kind == "chat":
            delta = {"role": "assistant", "content": ""} if first else \
                ({} if text is None else {"content": text})
            return {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        return {"index": i, "text": text or "", "logprobs": logprobs, "finish_reason": reason}

    def _chunk(self, choices: list[dict]) -> dict:
        obj = "chat.completion.chunk" if self.job.kind == "chat" else "text_completion"
        return {**self._base(obj), "choices": choices}

    def _take(self, i: int) -> dict | None:
        return self.logprobs[i].take() if self.logprobs is not None else None

    def start_chunks(self) -> list[dict]:
        if self.job.kind != "chat":
            if self.echo is None or self.job.params.prompt_logprobs is not None:
                return []  # an echo with logprobs waits for the prompt's scores
            return [self._chunk([self._choice(i, t, None)]) for i, t in enumerate(self.echo)]
        return [self._chunk([self._choice(i, None, None, first=True)])
                for i in range(self.gen.num_seqs)]

    def apply(self, ev: tuple) -> list[dict]:
        """Record an engine event; the stream chunks it produces."""
        if ev[0] == "prompt_logprobs":
            _, i, scores = ev
            self.logprobs[i].add_prompt(self.job.prompts[i // self.job.n], scores)
            return [self._chunk([self._choice(i, self.echo[i], None, logprobs=self._take(i))])]
        if ev[0] == "token":
            _, i, text = ev[:3]
            entry = ev[3] if len(ev) > 3 else None
            if not self.first_token:
                self.first_token = True
                self.on_first_token(time.monotonic() - self.t0)
            self.texts[i] += text
            if entry is not None and self.logprobs is not None:
                self.logprobs[i].add(entry)
            if self.parsers is not None:
                chunks = self._tool_chunks(i, self.parsers[i].feed(text)) if text else []
                if chunks:  # the tokens' entries ride on the last chunk their text produced
                    chunks[-1]["choices"][0]["logprobs"] = self._take(i)
                return chunks
            return [self._chunk([self._choice(i, text, None, logprobs=self._take(i))])] \
                if text else []
        if ev[0] == "finish":
            _, i, reason, n = ev
            chunks = []
            if self.parsers is not None:
                chunks = self._tool_chunks(i, self.parsers[i].finish())
                if self.parsers[i].calls and reason == "stop":  # llama.cpp: "length" stays
                    reason = "tool_calls"
            self.reasons[i], self.tokens[i] = reason, n
            if chunks:
                chunks[-1]["choices"][0]["logprobs"] = self._take(i)
            return chunks + [self._chunk([self._choice(i, None if self.job.kind == "chat"
                                                       else "", reason,
                                                       logprobs=self._take(i))])]
        if ev[0] == "done":
            self.finished = True
        return []

    def _tool_chunks(self, i: int, events: list[tuple]) -> list[dict]:
        """Stream chunks of a tool-call parser's events: content deltas, and for each call one
        delta with its index, id, type and name, then one with its arguments (as vLLM)."""
        out = []
        for ev in events:
            if ev[0] == "content":
                out.append(self._chunk([self._choice(i, ev[1], None)]))
                continue
            call, k = ev[1], self.parsers[i].calls.index(ev[1])
            for delta in ({"index": k, "id": call.id, "type": "function",
                           "function": {"name": call.name, "arguments": ""}},
                          {"index": k, "function": {"arguments": call.arguments}}):
                out.append(self._chunk([{"index": i, "delta": {"tool_calls": [delta]},
                                         "logprobs": None, "finish_reason": None}]))
        return out

    def _message(self, i: int) -> dict:
        p = self.parsers[i] if self.parsers is not None else None
        if p is None or not p.found:  # no call: the text as generated
            return {"role": "assistant", "content": self.texts[i]}
        return {"role": "assistant", "content": p.content or None,
                "tool_calls": [c.to_openai() for c in p.calls]}

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.job.prompts)
        completion = sum(self.tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    def usage_chunk(self) -> dict:
        return {**self._chunk([]), "usage": self.usage()}

    def response(self) -> dict:
        lps = ([lp.full() for lp in self.logprobs] if self.logprobs is not None
               else [None] * len(self.reasons))
        if self.job.kind == "chat":
            choices = [{"index": i, "message": self._message(i), "logprobs": lps[i],
                        "finish_reason": r} for i, r in enumerate(self.reasons)]
        else:
            texts = ([e + t for e, t in zip(self.echo, self.texts)] if self.echo is not None
                     else self.texts)
            choices = [{"index": i, "text": t, "logprobs": lps[i], "finish_reason": r}
                       for i, (t, r) in enumerate(zip(texts, self.reasons))]
        return {"id": self.id, "object": self.object, "created": self.created,
                "model": self.job.model, "choices": choices, "usage": self.usage()}
