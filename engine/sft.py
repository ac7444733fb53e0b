"""Fine-tuning data: instruction / completion / chat JSONL -> token ids with loss masks, padded or
packed batches; preference pairs for DPO.

Formats, one JSON object per line (blank lines ignored), as TRL and the Alpaca/OpenAI data use them:
  instruction  {"instruction": str, "input": str (optional), "output": str}       (Alpaca)
  completion   {"prompt": str, "completion": str}                                 (TRL prompt-completion)
  chat         {"messages": [{"role": str, "content": str}, ...]}                  (conversational)
               with tool use as OpenAI writes it: an assistant message with "tool_calls"
               ([{"type": "function", "function": {"name", "arguments": {...} or str}}], its
               content then optional), "tool" messages with the results, and an optional
               top-level "tools" (function schemas, passed to the template as transformers'
               apply_chat_template(messages, tools=...) does); an assistant message's optional
               "weight" (0 or 1, OpenAI's fine-tuning format: 0 keeps the turn as context only)
  preference   {"prompt", "chosen", "rejected"}: strings, or message lists (TRL's DPO forms)

Label convention, the one `Transformer.forward(input_ids, labels=...)` and train.py's get_batch
use: a sample's full token list tok[0..n) gives
    input_ids = tok[:-1]        labels[t] = tok[t+1] if tok[t+1] is a trained token, else -100
so labels[t] is the target of position t (the NEXT token) and the model's loss is the mean
cross-entropy over response tokens only. A sample of seq_len+1 tokens fills seq_len positions;
longer ones keep their start and are counted as truncated.

Trained tokens: chat -> each assistant message as the template renders it after the generation
prompt (its content and tool calls plus the end-of-turn token, e.g. "Paris<|im_end|>", not the
"\\n" after it; tool results are context like user turns);
instruction / completion -> rendered as a user/assistant chat when the tokenizer has a chat
template, else plain "prompt + completion" + EOS (Alpaca's prompt text for the instruction form)
with the completion and EOS trained. Assistant spans are found by rendering prefixes of the
conversation (messages[:i] with the generation prompt, messages[:i+1] without), so any template
works; the whole text is then encoded at once (as inference sees it) and each character boundary
is mapped to a token boundary by encoding the text before it: the tokens wholly before it, as
transformers' return_assistant_tokens_mask counts them (a token straddling a response's start is
trained).

Chat roles are OpenAI's (system, developer, user, assistant, tool) and Llama 3.1's ipython; another
role (a typo such as "Assistant") or an assistant turn with empty content (and no tool calls) is a
malformed line, as is a missing role or content (an empty turn of "weight" 0 is allowed: it is not
trained). A message the template leaves out of its text (Mistral v0.3's drops a system message
unless the last turn is the user's) is refused: the sample would train without it.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from array import array
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import torch

from engine.data import BadLine, json_error
from tokenizer.chat import chat_templates_of

IGNORE = -100  # label of positions without loss (PyTorch's cross_entropy ignore_index default)
# Message roles: OpenAI's chat format ("developer" is its newer "system"), and Llama 3.1's
# "ipython" for tool results.
ROLES = ("system", "developer", "user", "assistant", "tool", "ipython")
SFT_FORMATS = ("instruction", "completion", "chat")

# Alpaca's prompts (tatsu-lab/stanford_alpaca, train.py PROMPT_DICT), ending in "### Response:\n"
# as its README and alpaca-lora's template write them (train.py's own end at the colon).
ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides "
                 "further context. Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that "
                          "appropriately completes the request.\n\n"
                          "### Instruction:\n{instruction}\n\n### Response:\n")


# ---------------------------------------------------------------------------------------------
# Reading JSONL
# ---------------------------------------------------------------------------------------------
@dataclass
class Example:
    """One validated sample. data holds the fields of its form; line is 1-based in its file."""
    form: str
    data: dict
    line: int = 0


def _form_of(obj) -> str | None:
    """The form an object's keys announce (None if none)."""
    if not isinstance(obj, dict):
        return None
    if "messages" in obj:
        return "chat"
    if "chosen" in obj or "rejected" in obj:
        return "preference"
    if "instruction" in obj:
        return "instruction"
    if "prompt" in obj or "completion" in obj:
        return "completion"
    if "text" in obj:
        return "text"
    return None


def json_lines(path: str) -> Iterator[tuple[int, object, str | None]]:
    """(line number, parsed object or None, error text or None) for each non-blank line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield n, None, f"invalid UTF-8 at byte {e.start}"
                continue
            if not line.strip():
                continue
            if n == 1 and line.lstrip("\ufeff").lstrip().startswith("[") and path.endswith(".json"):
                raise ValueError(f"{path}: a JSON array; write one JSON object per line (JSONL)")
            line = line.rstrip("\r\n")  # else an error at the line's end is "column 1" of the next
            try:
                yield n, json.loads(line.lstrip("\ufeff") if n == 1 else line), None
            except json.JSONDecodeError as e:
                yield n, None, json_error(e)


def detect_format(path: str) -> str:
    """"instruction", "completion", "chat", "preference" or "text" (a corpus: not .jsonl/.json,
    a directory, or JSONL with a "text" field), from the first valid JSON object's keys."""
    return _first_form(path)[0]


def file_form(path: str) -> str | None:
    """detect_format's answer for a file whose form can be told; None for a missing file, a
    directory, or one without a valid object of known keys (its reader names the bad line)."""
    try:
        return detect_format(path) if os.path.isfile(path) else None
    except ValueError:
        return None


def _first_form(path: str) -> tuple[str, int]:
    """(detect_format's answer, the line of the record it read; 0 for a plain-text corpus)."""
    if os.path.isdir(path) or not path.endswith((".jsonl", ".json")):
        if not os.path.exists(path):
            raise FileNotFoundError(f"data not found: {path}")
        return "text", 0
    for n, obj, err in json_lines(path):
        if err is None and isinstance(obj, dict):
            form = _form_of(obj)
            if form is None:
                raise ValueError(f"{path}:{n}: cannot tell the data format from keys {sorted(obj)}; expected "
                                 "'messages', 'instruction'+'output', 'prompt'+'completion', "
                                 "'prompt'+'chosen'+'rejected' or 'text'")
            return form, n
    raise ValueError(f"{path}: no valid JSON object lines")


def records_not_text(path: str) -> tuple[str, str] | None:
    """For a text corpus (a file or a directory, as engine.data reads it): (the first of its
    JSONL files whose records are instruction / completion / chat or preference ones, their
    form), else None. Such a file is not malformed line by line but data of another kind: its
    reader names the way to use it. A file whose form cannot be told (no valid object, unknown
    keys) is left to the corpus reader, which names its bad line."""
    from engine.data import corpus_files
    for f in corpus_files(path):
        if not f.endswith((".jsonl", ".json")):
            continue
        form = file_form(f)
        if form not in (None, "text"):
            return f, form
    return None


def records_name(form: str) -> str:
    """How a message names a file's records: "chat (messages) records (SFT data)"."""
    return f"{_FORM_NAMES[form]} records ({'DPO' if form == 'preference' else 'SFT'} data)"


# A record is of another form than its file's when it has all of that form's keys (checked in
# _form_of's order); one that lacks some keys of every form is told what its file's form needs.
_FORM_KEYS = {"chat": ("messages",), "preference": ("prompt", "chosen", "rejected"),
              "instruction": ("instruction", "output"), "completion": ("prompt", "completion"),
              "text": ("text",)}
_FORM_NAMES = {"chat": "chat (messages)", "preference": "preference (prompt/chosen/rejected)",
               "instruction": "instruction", "completion": "prompt/completion", "text": "text"}


def _one_form(check, form: str, first: int):
    """`check` for the records of a `form` file whose first record is on line `first`: a record
    of another form (say prompt/completion in an instruction file) is named as such, rather than
    by a key of the file's form that it lacks."""
    def checked(obj) -> str | None:
        other = next((f for f, keys in _FORM_KEYS.items()
                      if isinstance(obj, dict) and all(k in obj for k in keys)), form)
        if other != form:
            name = _FORM_NAMES[other]
            return (f"a{'n' if name[0] in 'aeiou' else ''} {name} record in a file of "
                    f"{_FORM_NAMES[form]} records (its form, from line {first}); one file holds one form")
        return check(obj)
    return checked


def _check_tool_calls(calls, what: str) -> str | None:
    """Why an assistant message's OpenAI-style tool_calls are malformed, or None."""
    if not isinstance(calls, list):
        return f"{what} must be a list of tool calls"
    for k, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            return f"{what}[{k}] has no 'function' with a string 'name'"
        if not isinstance(fn.get("arguments"), (dict, str)):
            return f"{what}[{k}]'s 'arguments' must be an object or a string"
    return None


def _check_messages(msgs, what: str = "'messages'", tool_use: bool = False) -> str | None:
    """Why a message list is malformed, or None. tool_use: an assistant message may call tools
    (OpenAI's tool_calls, content then optional) and "tool" messages carry their results."""
    if not isinstance(msgs, list):
        return f"{what} must be a list of {{'role', 'content'}} objects"
    if not msgs:
        return f"{what} is empty"
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            return f"{what}[{i}] is not an object"
        w = m.get("weight", 1)
        if m.get("role") == "assistant" and (isinstance(w, bool) or w not in (0, 1)):
            return (f"{what}[{i}]'s 'weight' must be 0 or 1 (whether the turn is trained), "
                    f"got {w!r:.40}")
        if tool_use and m.get("role") == "assistant" and m.get("tool_calls") not in (None, []):
            bad = _check_tool_calls(m["tool_calls"], f"{what}[{i}]['tool_calls']")
            if bad:
                return bad
            if m.get("content") is not None and not isinstance(m["content"], str):
                return f"{what}[{i}]'s 'content' must be a string"
            continue
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                return f"{what}[{i}] has no string '{key}'"
        if m["role"] not in ROLES:  # a typo ("Assistant", "bot") would train as context
            return (f"{what}[{i}] has unknown role {m['role']!r:.40} (expected one of "
                    f"{', '.join(ROLES)})")
        if m["role"] == "assistant" and not m["content"].strip() and _trained(m):
            # it would teach the model to end its turn at once
            return f"{what}[{i}] is an empty assistant turn"
    return None


def _trained(m: dict) -> bool:
    """Whether an assistant message is trained: OpenAI's "weight": 0 keeps it as context."""
    return m.get("weight", 1) != 0


def _check_example(obj, form: str) -> str | None:
    """Why `obj` is not a valid `form` example, or None."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    if form == "chat":
        if "messages" not in obj:
            return f"no 'messages' field (chat data; keys: {sorted(obj)})"
        bad = _check_messages(obj["messages"], tool_use=True)
        if bad:
            return bad
        tools = obj.get("tools")
        if tools is not None and not (isinstance(tools, list)
                                      and all(isinstance(t, dict) for t in tools)):
            return "'tools' must be a list of function schemas (objects)"
        if not any(m["role"] == "assistant" for m in obj["messages"]):
            return "chat sample has no assistant turn (nothing to train on)"
        if not any(m["role"] == "assistant" and _trained(m) for m in obj["messages"]):
            return "every assistant turn has 'weight' 0 (nothing to train on)"
        return None
    need = {"instruction": ("instruction", "output"), "completion": ("prompt", "completion")}[form]
    for key in need:
        if key not in obj:
            return f"missing '{key}' ({form} data needs {' and '.join(need)}; keys: {sorted(obj)})"
        if not isinstance(obj[key], str):
            return f"'{key}' must be a string, got {type(obj[key]).__name__}"
    if form == "instruction":
        if obj.get("input") is not None and not isinstance(obj["input"], str):
            return f"'input' must be a string, got {type(obj['input']).__name__}"
        if not obj["instruction"].strip():
            return "empty 'instruction'"
    response = need[1]
    if not obj[response].strip():
        return f"empty '{response}'"
    return None


def _load(path: str, check, on_error: str, warn) -> tuple[list[tuple[int, object]], list[int]]:
    if on_error not in ("stop", "skip"):
        raise ValueError(f"on_error must be 'stop' or 'skip', got {on_error!r}")
    good, skipped = [], []
    for n, obj, err in json_lines(path):
        err = err or check(obj)
        if err is None:
            good.append((n, obj))
        elif on_error == "stop":
            raise BadLine(f"{path}:{n}: {err}")
        else:
            skipped.append(n)
            if warn is not None:
                warn(f"warning: skipping {path}:{n}: {err}")
    if not good:
        raise ValueError(f"{path}: no valid examples" + (f" ({len(skipped)} lines skipped)" if skipped else ""))
    return good, skipped


def load_examples(path: str, on_error: str = "stop", warn=None) -> tuple[list[Example], list[int]]:
    """Validated examples of an instruction / completion / chat JSONL, and the skipped line numbers.

    on_error="stop": the first malformed line raises ValueError("FILE:LINE: what is wrong").
    on_error="skip": malformed lines are left out (each reported through `warn(msg)` if given).
    The form is detected from the first valid line; every line must have that form.
    """
    form, first = _first_form(path)
    if form not in SFT_FORMATS:
        hint = {"preference": "preference pairs (prompt/chosen/rejected) are DPO data",
                "text": "plain text is a corpus, not SFT data"}[form]
        raise ValueError(f"{path}: not instruction/completion/chat JSONL: {hint}")
    good, skipped = _load(path, _one_form(lambda o: _check_example(o, form), form, first),
                          on_error, warn)
    return [Example(form, obj, n) for n, obj in good], skipped


# ---------------------------------------------------------------------------------------------
# Tokenization with loss masks
# ---------------------------------------------------------------------------------------------
def _token_str(tok, i) -> str | None:
    try:
        return tok.id_to_token(i)
    except (NotImplementedError, KeyError, IndexError):
        return None


def _end_of_turn_strings(tok) -> list[str]:
    """Strings that close an assistant turn: the template's end-of-turn token(s), EOS, and the
    known ones (matched as text when the tokenizer lacks them as special tokens)."""
    from tokenizer.chat import END_OF_TURN_TOKENS, end_of_turn_ids
    out = [_token_str(tok, i) for i in sorted(end_of_turn_ids(tok))]
    if tok.eos_id is not None:
        out.append(_token_str(tok, tok.eos_id))
    return [s for s in dict.fromkeys(out + list(END_OF_TURN_TOKENS)) if s]


def _turn_end(turn: str, content: str, eots: list[str]) -> int:
    """Length of the trained part of a rendered assistant turn: up to and including the first
    end-of-turn string after the content (the whole turn if there is none)."""
    content = content.strip()  # templates often trim it
    at = turn.find(content) if content else -1
    start = at + len(content) if at >= 0 else 0
    hits = [(turn.find(s, start), -len(s), s) for s in eots if turn.find(s, start) >= 0]
    if not hits:
        return len(turn)
    pos, _, s = min(hits)
    return pos + len(s)


def chat_spans(tok, messages: list[dict], first: int = 0, tools: list[dict] | None = None
               ) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of the assistant turns to train
    (those at index >= `first`, less any with "weight": 0), each from the end of the generation
    prompt to the end-of-turn token inclusive. `tools` (function schemas) reaches the template as in transformers'
    apply_chat_template(messages, tools=...); an assistant turn that calls tools is trained with
    its calls, and "tool" results are context like user turns. A template that leaves out the
    tools, a tool call or a tool result raises ValueError (training would silently lose them).
    With tools, a tokenizer's "tool_use" template renders the sample if it has one (as
    transformers and the server pick it)."""
    from tokenizer.chat import render_chat, select_chat_template
    template = select_chat_template(chat_templates_of(tok), tools=tools)
    render = lambda msgs, gen: render_chat(tok, msgs, add_generation_prompt=gen,  # noqa: E731
                                           template=template, tools=tools)
    full = render(messages, False)
    eots = _end_of_turn_strings(tok)
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < first:
            continue
        content = m.get("content") or ""  # None / absent: a turn that only calls tools
        span = None
        try:
            before = render(messages[:i], True)
            upto = render(messages[:i + 1], False)
        except ValueError:  # e.g. a template that cannot render an empty conversation
            before = upto = None
        if (before is not None and upto.startswith(before) and full.startswith(before)
                and content.strip() in upto[len(before):]):
            turn = upto[len(before):]
            end = len(before) + _turn_end(turn, content, eots)
            if full[len(before):end] == turn[:end - len(before)] and len(before) >= cursor:
                span = (len(before), end)
        if span is None and content:
            # The template renders earlier turns differently once later ones follow (some
            # drop reasoning, some add a system prompt only at the start): find the content,
            # after the message before it if that is found (an answer such as "ok" can occur
            # in the question "say ok").
            prev = (messages[i - 1].get("content") or "").strip() if i else ""
            at_prev = full.find(prev, cursor) if prev else -1
            after = at_prev + len(prev) if at_prev >= 0 else cursor
            at = full.find(content, after)
            if at < 0:
                at = full.find(content, cursor)
            if at >= 0:
                span = (at, at + _turn_end(full[at:], content, eots))
        if span is None:
            raise ValueError(f"cannot locate assistant message {i} in the chat template's output")
        trained = full[span[0]:span[1]].replace(content, "", 1)
        for call in m.get("tool_calls") or ():
            if call["function"]["name"] not in trained:
                raise ValueError(f"the chat template does not render the tool calls of assistant "
                                 f"message {i}")
        if _trained(m):  # a "weight": 0 turn is located only to move past it
            spans.append(span)
        cursor = span[1]
    for i, m in enumerate(messages):
        # a system / user message the template leaves out (Mistral v0.3's renders the system
        # prompt only before the LAST user turn, Qwen2.5's skips "developer") would silently
        # train without it: absent from the text, and rendering it empty changes nothing
        text = (m.get("content") or "").strip()
        if m["role"] not in ("assistant", "tool") and text and text not in full and render(
                [*messages[:i], {**m, "content": ""}, *messages[i + 1:]], False) == full:
            raise ValueError(f"the chat template does not render message {i} ({m['role']}): the "
                             "sample would train without it")
    # (compared by rendering without them: templates may escape a result, e.g. with tojson)
    if any(m["role"] == "tool" and m["content"].strip() for m in messages) and render(
            [{**m, "content": ""} if m["role"] == "tool" else m for m in messages], False) == full:
        raise ValueError("the chat template does not render the 'tool' messages (tool results)")
    if tools and render_chat(tok, messages, add_generation_prompt=False, template=template) == full:
        raise ValueError("the chat template ignores the sample's 'tools'")
    return full, spans


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _token_boundary(tok, ids: list[int], text: str, c: int) -> int:
    """Index of the first token of `ids` (the whole text's) that does not lie wholly in text[:c].

    The ids of text[:c] agree with the whole text's up to some p. After p they can differ in two
    ways: a token straddles c (" t|he" -> "Ġthe"), or the pre-tokenizer's lookahead splits the
    same characters otherwise ("\\n\\n" at the end of text[:c] is one piece, but "\\n", "\\n"
    before a letter, GPT-2's \\s+(?!\\S); "  " at the end, but " ", " Yes" in the whole). The
    whole text's tokens after p whose decoded text is a prefix of the rest of text[:c] lie
    wholly before c (transformers' char_to_token(c) is the next one)."""
    pre = tok.encode(text[:c], add_bos=False)
    p = _common_prefix(ids, pre)
    if p == len(pre):
        return p
    tail = tok.decode(pre[p:])  # text[e:c], e = where ids[p] and pre[p] both start
    best = p
    # every token holds at least one byte: no more tokens than the tail's bytes fit in it
    for q in range(p + 1, min(len(ids), p + len(tail.encode("utf-8"))) + 1):
        got = tok.decode(ids[p:q])
        if not tail.startswith(got):
            break  # ids[q-1] straddles c (or ends inside a character)
        best = q
        if len(got) == len(tail):
            break
    return best


def encode_spans(tok, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
    """Ids of `text` (encoded whole, no BOS) and a per-token flag: True inside a span.

    A character boundary c falls after the tokens that lie wholly before it (_token_boundary);
    if a token straddles c, before that token (so a straddling token at the start of a response
    is trained, as in transformers' assistant mask; one at its end is not).
    """
    ids = tok.encode(text, add_bos=False)
    where = {0: 0, len(text): len(ids)}
    for c in sorted({c for s in spans for c in s} - set(where)):
        where[c] = _token_boundary(tok, ids, text, c)
    mask = [False] * len(ids)
    for s, e in spans:
        for j in range(where[s], where[e]):
            mask[j] = True
    return ids, mask


def encode_or_skip(encode, source: str | None, line: int, on_error: str, warn):
    """encode(), or None when it raises ValueError and on_error is "skip" (a template that
    rejects the sample, e.g. "System role not supported"). The error names the file and line."""
    try:
        return encode()
    except ValueError as e:
        where = f"{source}:{line}" if source else f"line {line}"
        if on_error != "skip":
            raise ValueError(f"{where}: {e}") from None
        if warn is not None:
            warn(f"warning: skipping {where}: {e}")
        return None


def _with_bos(tok, ids: list[int], mask: list[bool]) -> tuple[list[int], list[bool]]:
    """Prepend BOS when the tokenizer adds one and the text does not already start with it: a
    plain prompt is encoded so at inference (generate.py --prompt)."""
    if tok.add_bos and tok.bos_id is not None and (not ids or ids[0] != tok.bos_id):
        return [tok.bos_id] + ids, [False] + mask
    return ids, mask


def _plain(tok, prompt: str, completion: str) -> tuple[list[int], list[bool]]:
    """prompt + completion + EOS, the completion and EOS trained."""
    if tok.eos_id is None:
        raise ValueError("the tokenizer has no EOS token: plain prompt/completion samples need one "
                         "to end the response")
    ids, mask = encode_spans(tok, prompt + completion, [(len(prompt), len(prompt) + len(completion))])
    return _with_bos(tok, ids + [tok.eos_id], mask + [True])


def _chat(tok, messages: list[dict], first: int = 0, tools: list[dict] | None = None
          ) -> tuple[list[int], list[bool]]:
    """The rendered conversation with no BOS beyond what the template writes: the ids
    apply_chat_template(tokenize=True) gives at inference (generate.py --chat, the server), as
    in transformers and TRL. (Llama 2 / 3 and Mistral templates render bos_token themselves.)"""
    text, spans = chat_spans(tok, messages, first, tools)
    return encode_spans(tok, text, spans)


def instruction_prompt(data: dict) -> str:
    """The user text of an instruction example (chat rendering): instruction, blank line, input."""
    inp = data.get("input") or ""
    return data["instruction"] + ("\n\n" + inp if inp.strip() else "")


def encode_example(example: Example | dict, tok) -> tuple[list[int], list[bool]]:
    """All token ids of one sample (untruncated) and per token whether it is trained."""
    if isinstance(example, dict):
        form = _form_of(example)
        err = _check_example(example, form) if form in SFT_FORMATS else \
            f"not an instruction/completion/chat example (keys {sorted(example)})"
        if err:
            raise ValueError(err)
        example = Example(form, example)
    d = example.data
    if example.form == "chat":
        tool_use = d.get("tools") is not None or any(
            m["role"] == "tool" or m.get("tool_calls") for m in d["messages"])
        try:
            return _chat(tok, d["messages"], tools=d.get("tools"))
        except ValueError as e:
            if tool_use and "tool" not in str(e):  # e.g. "no attribute 'content'"
                raise ValueError(f"{e} (a tool-use sample: this chat template may not support "
                                 "tool calls)") from None
            raise
    if example.form == "instruction":
        prompt, response = instruction_prompt(d), d["output"]
    else:
        prompt, response = d["prompt"], d["completion"]
    if chat_templates_of(tok):  # named ones without a "default": render_chat says to name one
        return _chat(tok, [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}])
    if example.form == "instruction":
        inp = d.get("input") or ""
        prompt = (ALPACA_PROMPT.format(instruction=d["instruction"], input=inp) if inp.strip()
                  else ALPACA_PROMPT_NO_INPUT.format(instruction=d["instruction"]))
    return _plain(tok, prompt, response)


def shift_labels(ids: list[int], mask: list[bool], seq_len: int) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated): drop the tokens after the last trained one (context that
    nothing learns from, e.g. the "\n" after a final <|im_end|>), keep the first seq_len+1
    tokens, then inputs = ids[:-1] and labels[t] = ids[t+1] where mask[t+1], else -100."""
    last = max((j for j, m in enumerate(mask) if m), default=len(ids) - 1)
    ids, mask = ids[:last + 1], mask[:last + 1]
    truncated = len(ids) > seq_len + 1
    ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
    labels = [i if m else IGNORE for i, m in zip(ids[1:], mask[1:])]
    return ids[:-1], labels, truncated


def tokenize_example(example: Example | dict, tok, seq_len: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of equal length <= seq_len; labels[t] is the target of position t
    (the next token) or -100 on prompt / non-assistant / padding positions."""
    ids, labels, _ = shift_labels(*encode_example(example, tok), seq_len)
    return ids, labels


# ---------------------------------------------------------------------------------------------
# Datasets and batches
# ---------------------------------------------------------------------------------------------
class Batch(NamedTuple):
    input_ids: torch.Tensor  # (B, T) int64, right-padded with the pad id
    labels: torch.Tensor  # (B, T) int64, -100 where no loss
    doc_ids: torch.Tensor | None  # (B, T) int64 document index within the row (packed only)
    position_ids: torch.Tensor | None  # (B, T) int64 position within the document (packed only)
    # (B,) int64 real (non-padding) tokens of each row: a truncated sample may end in untrained
    # tokens, so the labels cannot tell where its padding starts (tokens/s counts these)
    lengths: torch.Tensor | None = None

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device) if t is not None else None for t in self))

    def model_kwargs(self) -> dict:
        """Keyword arguments for `model(input_ids, **kwargs)`."""
        return {"labels": self.labels, "doc_ids": self.doc_ids, "position_ids": self.position_ids}


def data_key(rows) -> str:
    """Content hash of tokenized samples, each a tuple of token-id lists (ids, labels, ...), in
    order: what --resume compares to tell that a run's data changed (text, tokenizer, template
    or truncation alike)."""
    h = hashlib.sha256()
    for row in rows:
        for seq in row:
            h.update(len(seq).to_bytes(8, "little"))
            h.update(array("q", seq).tobytes())
    return h.hexdigest()[:24]


def pad_id_of(tok) -> int:
    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
    return pad if pad is not None else 0


class SFTDataset:
    """Tokenized samples, each (input_ids, labels) of equal length 1..seq_len."""

    def __init__(self, samples: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int,
                 report: dict | None = None):
        for i, (x, y) in enumerate(samples):
            if len(x) != len(y) or not 0 < len(x) <= seq_len:
                raise ValueError(f"sample {i}: input_ids/labels lengths {len(x)}/{len(y)} "
                                 f"(need equal, 1..{seq_len})")
        self.samples, self.seq_len, self.pad_id = samples, seq_len, pad_id
        self.report = report or {}
        self.report.update(n_examples=len(samples), n_tokens=sum(len(x) for x, _ in samples),
                           n_loss_tokens=sum(sum(t != IGNORE for t in y) for _, y in samples))

    @classmethod
    def from_examples(cls, examples: list, tok, seq_len: int, on_error: str = "stop", warn=None,
                      source: str | None = None) -> "SFTDataset":
        """Tokenize; count truncated samples and drop those left without a trained token. A
        sample the chat template rejects (or renders without its answer) raises
        ValueError("SOURCE:LINE: why") (on_error="stop"), or is left out, reported through
        `warn` and listed in report["skipped_lines"] (on_error="skip")."""
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        samples, truncated, dropped, skipped = [], 0, [], []
        for k, ex in enumerate(examples):
            line = getattr(ex, "line", 0) or k + 1
            encoded = encode_or_skip(lambda: encode_example(ex, tok), source, line, on_error, warn)
            if encoded is None:
                skipped.append(line)
                continue
            x, y, cut = shift_labels(*encoded, seq_len)
            truncated += cut
            if not x or all(t == IGNORE for t in y):  # prompt alone fills seq_len: nothing to learn
                dropped.append(line)
                continue
            samples.append((x, y))
        return cls(samples, seq_len, pad_id_of(tok),
                   {"n_truncated": truncated, "n_dropped": len(dropped), "dropped_lines": dropped,
                    "skipped_lines": skipped})

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def key(self) -> str:
        """data_key of the samples as trained (computed once)."""
        if getattr(self, "_key", None) is None:
            self._key = data_key(self.samples)
        return self._key

    def rows(self, order: list[int], pack: bool) -> list[list[int]]:
        """Sample indices per batch row. pack: consecutive samples (in `order`) share a row while
        they fit in seq_len positions (next-fit: the order, hence the trajectory, stays seeded)."""
        if not pack:
            return [[i] for i in order]
        rows, cur, used = [], [], 0
        for i in order:
            n = len(self.samples[i][0])
            if cur and used + n > self.seq_len:
                rows.append(cur)
                cur, used = [], 0
            cur.append(i)
            used += n
        return rows + ([cur] if cur else [])

    def collate(self, rows: list[list[int]], pack: bool) -> Batch:
        """One batch: rows right-padded to the longest; doc_ids / position_ids when packed.
        Padding gets its own document id, so no real token attends to it."""
        T = max(sum(len(self.samples[i][0]) for i in row) for row in rows)
        B = len(rows)
        x = torch.full((B, T), self.pad_id, dtype=torch.long)
        y = torch.full((B, T), IGNORE, dtype=torch.long)
        doc = torch.zeros((B, T), dtype=torch.long) if pack else None
        pos = torch.zeros((B, T), dtype=torch.long) if pack else None
        lengths = torch.zeros(B, dtype=torch.long)
        for b, row in enumerate(rows):
            t = 0
            for d, i in enumerate(row):
                ids, labels = self.samples[i]
                n = len(ids)
                x[b, t:t + n] = torch.tensor(ids)
                y[b, t:t + n] = torch.tensor(labels)
                if pack:
                    doc[b, t:t + n] = d
                    pos[b, t:t + n] = torch.arange(n)
                t += n
            lengths[b] = t
            if pack and t < T:
                doc[b, t:] = len(row)
                pos[b, t:] = torch.arange(T - t)
        return Batch(x, y, doc, pos, lengths)

    def batches(self, batch_size: int, generator: torch.Generator | None = None, pack: bool = False,
                drop_last: bool = False) -> Iterator[Batch]:
        """One epoch of batches, shuffled with `generator` (one randperm drawn up front; None
        keeps file order, e.g. for validation)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        order = (torch.randperm(len(self), generator=generator).tolist() if generator is not None
                 else list(range(len(self))))
        rows = self.rows(order, pack)
        for b in range(0, len(rows), batch_size):
            chunk = rows[b:b + batch_size]
            if drop_last and len(chunk) < batch_size:
                return
            yield self.collate(chunk, pack)

    def subset(self, indices: list[int]) -> "SFTDataset":
        return SFTDataset([self.samples[i] for i in indices], self.seq_len, self.pad_id)


class BatchStream:
    """Endless shuffled batches, epoch after epoch, resumable exactly.

    Each epoch draws one permutation from `generator` when its first batch is taken. state_dict()
    (JSON-serializable: epoch, batch index, the epoch's order) saved together with the
    generator's state, and restored with load_state_dict, continues the identical sequence.
    """

    def __init__(self, dataset: SFTDataset, batch_size: int, generator: torch.Generator,
                 pack: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(dataset) == 0:
            raise ValueError("no training samples")
        self.ds, self.batch_size, self.gen, self.pack = dataset, batch_size, generator, pack
        self.epoch, self.index, self.order, self._rows = 0, 0, None, None

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        if self._rows is None or self.index * self.batch_size >= len(self._rows):
            if self._rows is not None:
                self.epoch += 1
            self.order = torch.randperm(len(self.ds), generator=self.gen).tolist()
            self._rows, self.index = self.ds.rows(self.order, self.pack), 0
        b = self.index * self.batch_size
        self.index += 1
        return self.ds.collate(self._rows[b:b + self.batch_size], self.pack)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.index, "order": self.order}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index, self.order = state["epoch"], state["batch"], state["order"]
        if self.order is not None and sorted(self.order) != list(range(len(self.ds))):
            raise ValueError("saved data order does not match this dataset (different data?)")
        self._rows = self.ds.rows(self.order, self.pack) if self.order is not None else None


@torch.no_grad()
def response_loss(model, dataset: SFTDataset, batch_size: int, device="cpu", autocast=None) -> dict:
    """Token-weighted mean cross-entropy over every trained token of `dataset` (file order, padded
    batches): {"loss", "ppl", "n_tokens"}. The same number for train.py's validation and
    eval.py's response-loss task."""
    import contextlib
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in dataset.batches(batch_size):
        batch = batch.to(device)
        n = int((batch.labels != IGNORE).sum())
        with autocast or contextlib.nullcontext():
            loss = model(batch.input_ids, **batch.model_kwargs())
        total += float(loss) * n
        count += n
    model.train(was_training)
    loss = total / max(count, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "n_tokens": count}


def split_indices(n: int, val_fraction: float, seed: int = 0,
                  source: str | None = None) -> tuple[list[int], list[int]]:
    """Deterministic example-level split: a seeded permutation, the first ceil(n * fraction)
    (at least 1) held out. Same file, same fraction, same seed -> same split."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if n < 2:
        raise ValueError(f"{source + ': ' if source else ''}{n} example(s): too few to hold out "
                         "a validation split; give a separate validation file (--val-data)")
    n_val = min(n - 1, max(1, math.ceil(n * val_fraction)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def load_sft(path: str, tok, seq_len: int, val_fraction: float = 0.1, val_path: str | None = None,
             on_error: str = "stop", warn=print, split_seed: int = 0
             ) -> tuple[SFTDataset, SFTDataset, dict]:
    """(train, validation, report) from an SFT JSONL (+ an optional separate validation file).

    report: format, n_examples, n_skipped, skipped_lines, n_truncated, n_dropped (no trained token
    left after truncation), n_tokens (input positions), n_loss_tokens, n_train, n_val.
    """
    examples, skipped = load_examples(path, on_error, warn)
    if val_path:
        val_ex, val_skipped = load_examples(val_path, on_error, warn)
        train_ex = examples
    else:
        tr, va = split_indices(len(examples), val_fraction, split_seed, source=path)
        train_ex, val_ex, val_skipped = [examples[i] for i in tr], [examples[i] for i in va], []
    train = SFTDataset.from_examples(train_ex, tok, seq_len, on_error, warn, path)
    val = SFTDataset.from_examples(val_ex, tok, seq_len, on_error, warn, val_path or path)
    # lines the chat template rejected (on_error="skip"), with their file's malformed ones
    skipped = sorted(skipped + train.report["skipped_lines"]
                     + ([] if val_path else val.report["skipped_lines"]))
    val_skipped = sorted(val_skipped + (val.report["skipped_lines"] if val_path else []))
    if len(train) == 0:
        raise ValueError(f"{path}: no training sample keeps a response token within seq_len {seq_len}")
    if len(val) == 0:
        raise ValueError(f"{val_path or path}: no validation sample keeps a response token within "
                         f"seq_len {seq_len}")
    report = {"format": examples[0].form, "n_examples": len(examples) + (len(val_ex) if val_path else 0),
              "n_skipped": len(skipped) + len(val_skipped), "skipped_lines": skipped + val_skipped,
              "n_train": len(train), "n_val": len(val)}
    for k in ("n_truncated", "n_dropped", "n_tokens", "n_loss_tokens"):
        report[k] = train.report[k] + val.report[k]
    return train, val, report


def format_report(report: dict) -> str:
    """One log line for a load_sft report."""
    s = (f"{report['format']} data: {report['n_train']:,} train / {report['n_val']:,} val samples, "
         f"{report['n_tokens']:,} tokens ({report['n_loss_tokens']:,} trained)")
    if report.get("n_truncated"):
        s += f"; {report['n_truncated']:,} truncated to --seq-len"
    if report.get("n_dropped"):
        s += f"; {report['n_dropped']:,} dropped (no response token within --seq-len)"
    if report.get("n_skipped"):
        lines = report["skipped_lines"]
        s += f"; {report['n_skipped']:,} malformed line(s) skipped ({', '.join(map(str, lines[:10]))}" \
             + (", ..." if len(lines) > 10 else "") + ")"
    return s


# ---------------------------------------------------------------------------------------------
# Preference pairs (DPO, issue 6)
# ---------------------------------------------------------------------------------------------
@dataclass
class PreferencePair:
    """prompt, chosen, rejected: all strings (standard form) or all message lists (conversational:
    a string prompt becomes one user message, a string completion one assistant message)."""
    prompt: str | list[dict]
    chosen: str | list[dict]
    rejected: str | list[dict]
    line: int = 0

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


def _check_pair(obj) -> str | None:
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    for key in ("prompt", "chosen", "rejected"):
        if key not in obj:
            return f"missing '{key}' (preference data needs prompt, chosen and rejected)"
        v = obj[key]
        if isinstance(v, str):
            if not v.strip():
                return f"empty '{key}'"
        elif isinstance(v, list):
            bad = _check_messages(v, f"'{key}'")
            if bad:
                return bad
            if key != "prompt" and not any(m["role"] == "assistant" for m in v):
                return f"'{key}' has no assistant message"
            if key != "prompt" and not "".join(m["content"] for m in v).strip():
                return f"empty '{key}'"
        else:
            return f"'{key}' must be a string or a list of messages, got {type(v).__name__}"
    if obj["chosen"] == obj["rejected"]:
        return "'chosen' and 'rejected' are identical"
    return None


def _as_messages(v, role: str) -> list[dict]:
    return [{"role": role, "content": v}] if isinstance(v, str) else [dict(m) for m in v]


def load_preferences(path: str, on_error: str = "stop", warn=None
                     ) -> tuple[list[PreferencePair], list[int]]:
    """Validated preference pairs and the skipped line numbers (on_error as in load_examples).
    Errors: missing / empty / mistyped fields, identical chosen and rejected, a conversational
    completion without an assistant message."""
    try:
        form, first = _first_form(path)
    except (OSError, ValueError):  # no form to hold lines to: _load says what is wrong
        form, first = None, 0
    # a file of another form (SFT data given to DPO) is told, line by line, what a pair needs
    check = _one_form(_check_pair, form, first) if form == "preference" else _check_pair
    good, skipped = _load(path, check, on_error, warn)
    pairs = list(_pairs_from(good))
    return pairs, skipped


class TokenizedPair(NamedTuple):
    chosen_ids: list[int]
    chosen_labels: list[int]  # -100 on the prompt: the DPO log-prob sums over the others
    rejected_ids: list[int]
    rejected_labels: list[int]
    truncated: bool


def tokenize_pair(pair: PreferencePair | dict, tok, seq_len: int) -> TokenizedPair:
    """prompt+chosen and prompt+rejected as (input_ids, labels) with labels as in
    tokenize_example: only completion tokens (and their EOS / end-of-turn) carry a target.
    Standard (string) pairs: plain prompt + completion + EOS, as TRL does; conversational pairs:
    the chat template, training only the assistant turns after the prompt, each up to its
    end-of-turn token as in SFT (TRL 1.16 also scores what the template writes after it, e.g.
    ChatML's "\n": its log-probs differ from these by that token)."""
    if isinstance(pair, dict):
        err = _check_pair(pair)
        if err:
            raise ValueError(err)
        pair = next(iter(_pairs_from([(0, pair)])))
    out, truncated = [], False
    for completion in (pair.chosen, pair.rejected):
        if pair.conversational:
            ids, mask = _chat(tok, pair.prompt + completion, first=len(pair.prompt))
        else:
            ids, mask = _plain(tok, pair.prompt, completion)
        x, y, cut = shift_labels(ids, mask, seq_len)
        truncated |= cut
        out += [x, y]
    return TokenizedPair(*out, truncated)


def _pairs_from(good):
    for n, o in good:
        if any(isinstance(o[k], list) for k in ("prompt", "chosen", "rejected")):
            yield PreferencePair(_as_messages(o["prompt"], "user"), _as_messages(o["chosen"], "assistant"),
                                 _as_messages(o["rejected"], "assistant"), n)
        else:
            yield PreferencePair(o["prompt"], o["chosen"], o["rejected"], n)


def collate_pairs(pairs: list[TokenizedPair], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels), both (2B, T): the B chosen rows, then the B rejected rows, right-padded."""
    seqs = [(p.chosen_ids, p.chosen_labels) for p in pairs] + \
           [(p.rejected_ids, p.rejected_labels) for p in pairs]
    T = max(len(x) for x, _ in seqs)
    x = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    y = torch.full((len(seqs), T), IGNORE, dtype=torch.long)
    for b, (ids, labels) in enumerate(seqs):
        x[b, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        y[b, :len(labels)] = torch.tensor(labels, dtype=torch.long)
    return x, y
