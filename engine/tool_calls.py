"""Tool calls in generated text, Hermes style: the OpenAI API's `tool_calls` for the server.

Follows vLLM's `hermes` tool parser (`--enable-auto-tool-choice --tool-call-parser hermes`) and
llama.cpp's Hermes 2 Pro format, the one Qwen2.5, Hermes 2 Pro / 3 and SmolLM2-style chat
templates teach: a call is a block

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

in the assistant's text. Rules (the same for whole texts and streams, so a streamed answer always
concatenates to the non-streamed one):
- a block is complete once its `</tool_call>` arrives; inside it, a JSON object with a non-empty
  string "name" and "arguments" (an object, a string holding a JSON object, or absent: {}) is a
  call; its arguments become a JSON string (json.dumps, ensure_ascii=False, as vLLM writes them);
- anything else (invalid JSON, a block never closed) stays in the content as text, tags included,
  as vLLM leaves output it cannot parse;
- whitespace touching a call's block is dropped, the rest of the text around the blocks is the
  message content (None when nothing is left); a text without calls is returned unchanged;
- with max_calls (OpenAI's parallel_tool_calls=false: vLLM keeps the first call) later calls
  are dropped.
Streaming holds back text that may be the start of a `<tool_call>` tag (and whitespace before
it); a call is reported whole when its block closes.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

START, END = "<tool_call>", "</tool_call>"
_WS = " \t\r\n"


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as text

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_call(body: str) -> tuple[str, str] | None:
    """(name, arguments JSON) of the text inside one <tool_call> block, or None if it is not a
    call. NaN / Infinity are refused: they would make the arguments invalid JSON for clients."""
    try:
        obj = json.loads(body, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", {})
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            if isinstance(json.loads(args, parse_constant=_no_constant), dict):
                return obj["name"], args
        except (ValueError, RecursionError):
            pass
        return None
    if not isinstance(args, dict):
        return None
    return obj["name"], json.dumps(args, ensure_ascii=False)


class ToolCallParser:
    """Incremental parser of one choice's text. feed(text) and finish() return events:
    ("content", text) or ("call", ToolCall). `calls` and `content` hold what was found so far."""

    def __init__(self, max_calls: int | None = None):
        self.max_calls = max_calls
        self.calls: list[ToolCall] = []
        self.found = False  # a valid block was seen (also a dropped one)
        self._parts: list[str] = []  # the content emitted
        self._buf = ""  # text not decided yet
        self._in_call = False  # _buf is the inside of an open <tool_call> block
        self._ws = ""  # whitespace just before the open block (dropped if it is a call)
        self._after_call = False  # drop whitespace that follows a call's block

    @property
    def content(self) -> str:
        return "".join(self._parts)

    def feed(self, text: str) -> list[tuple]:
        self._buf += text
        out: list[tuple] = []
        while True:
            if self._in_call:
                j = self._buf.find(END)
                if j < 0:
                    return out
                self._close(self._buf[:j], out)
                self._buf = self._buf[j + len(END):]
                continue
            if self._after_call:
                self._buf = self._buf.lstrip(_WS)
                if not self._buf:
                    return out
                self._after_call = False
            i = self._buf.find(START)
            if i >= 0:
                before = self._buf[:i]
                kept = before.rstrip(_WS)
                self._content(kept, out)
                self._ws, self._in_call = before[len(kept):], True
                self._buf = self._buf[i + len(START):]
                continue
            # hold back a tail that may begin a tag, and the whitespace before it
            k = max((k for k in range(1, len(START)) if self._buf.endswith(START[:k])),
                    default=0)
            safe = self._buf[:len(self._buf) - k].rstrip(_WS)
            self._content(safe, out)
            self._buf = self._buf[len(safe):]
            return out

    def finish(self) -> list[tuple]:
        out: list[tuple] = []
        if self._in_call:  # a block never closed: plain text
            self._content(self._ws + START + self._buf, out)
        elif not self._after_call:
            self._content(self._buf, out)
        self._buf, self._in_call, self._after_call = "", False, False
        return out

    def _close(self, body: str, out: list) -> None:
        self._in_call = False
        call = parse_call(body)
        if call is None:
            self._content(self._ws + START + body + END, out)
            return
        self.found = self._after_call = True
        if self.max_calls is None or len(self.calls) < self.max_calls:
            tc = ToolCall(new_call_id(), *call)
            self.calls.append(tc)
            out.append(("call", tc))

    def _content(self, text: str, out: list) -> None:
        if text:
            self._parts.append(text)
            out.append(("content", text))


def parse_tool_calls(text: str, max_calls: int | None = None) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a whole generated text: content is the text unchanged when it holds
    no call, else the text around the calls (None if empty)."""
    p = ToolCallParser(max_calls)
    p.feed(text)
    p.finish()
    if not p.found:
        return p.content, []
    return p.content or None, p.calls
