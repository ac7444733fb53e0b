"""Chat templates: render a model's Jinja chat template the way Hugging Face transformers does.

Follows transformers' utils/chat_template_utils.py (`_compile_jinja_template`,
`render_jinja_template`): an ImmutableSandboxedEnvironment with trim_blocks and lstrip_blocks,
the loopcontrols extension, a `tojson` filter that does not HTML-escape, `raise_exception`,
`strftime_now`, a `dict` and a `namespace` that cannot reach the caller's data or store
underscore names, and the special-token strings (`bos_token`, `eos_token`, ...) as variables.
The template sees a plain-JSON copy of its inputs, messages without their None-valued keys and
reasoning under all its names (`_plain_template_data`, `_normalize_chat_messages`,
`_alias_reasoning_fields`); `continue_final_message` cuts the text after the final message.
A tokenizer may have named templates ("default", "tool_use"): `select_chat_template` picks
one as transformers' get_chat_template does. A tokenizer without a template gets ChatML.
`end_of_turn_ids` finds the token that closes an assistant turn (e.g. <|im_end|> for ChatML,
<|eot_id|> for Llama 3) so generation can stop there.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

# ChatML, as used by SmolLM2 and Qwen, without a default system prompt.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_NAME = re.compile(r"[A-Za-z0-9_.-]+")  # a template's name, not its Jinja source

# Known end-of-turn tokens, checked when the probe render below finds none.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>",
                      "<|END_OF_TURN_TOKEN|>", "<|endofturn|>")


class ChatTemplateError(ValueError):
    """The chat template failed to compile or render (one-line message)."""


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask tag): renders its body."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


class _TemplateDict:
    """The template's `dict`: jinja's is the builtin type, whose unbound methods the immutable
    sandbox does not check, so `dict.update(messages[0], ...)` changed the caller's data."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace(...)` refusing underscore-prefixed attributes (CPython internals), as transformers."""

    def __init__(*args, **kwargs):  # jinja's signature trick: namespace(self=...) still works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"a chat template cannot store the underscore-prefixed attribute {name!r} on a "
                "namespace")


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template does not compile: {_one_line(e)}") from None


def _one_line(e: Exception) -> str:
    msg = str(e).strip().splitlines()
    where = f" (line {e.lineno})" if getattr(e, "lineno", None) else ""
    return (msg[0] if msg else type(e).__name__) + where


def _check_messages(messages) -> None:
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of {{'role', 'content'}} dicts, got "
                         f"{type(messages).__name__}")
    for i, m in enumerate(messages):
        # an assistant turn that only calls tools may have no content (OpenAI, Qwen2.5's template)
        if not isinstance(m, dict) or "role" not in m or not ("content" in m or "tool_calls" in m):
            raise ValueError(f"message {i} must be a dict with 'role' and 'content' (or "
                             f"'tool_calls'), got {m!r:.80}")


def _plain(value):
    """transformers' `_plain_template_data`: a copy of `value` in plain JSON types, so the template
    cannot change the caller's data nor reach the methods of rich objects; str/int/float
    subclasses (a str Enum role) become the base type, anything else a "<TypeName>" string."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    np = sys.modules.get("numpy")  # no numpy value exists unless numpy was imported
    if np is not None and isinstance(value, np.generic):
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


# Names a message's reasoning comes under; templates read the first (Qwen3) or "thinking" (gpt-oss).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # transformers' marker, cut off after rendering


def _template_messages(messages) -> list[dict]:
    """The messages as transformers 5 gives them to the template: plain copies without the
    None-valued keys (OpenAI's content=None / tool_calls=None, or the None a datasets column
    holds where a row lacks the key: templates test `'tool_calls' in message`), and a reasoning
    under any of its names copied to `reasoning_content` and `thinking`."""
    out = []
    for m in messages:
        m = {k: _plain(v) for k, v in m.items() if v is not None}
        reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def _mark_final_message(chat: list[dict], template: str, field: str) -> str:
    """Append the continue tag to the final message's `field` (transformers'
    continue_final_message); returns the text that must appear in the rendered chat."""
    if not chat:
        raise ValueError("continue_final_message is set but the conversation is empty")
    final = chat[-1].get(field)
    if final is None:
        raise ValueError(f"continue_final_message is set but the final message has no "
                         f"{field!r} to continue")
    fields = [field]
    if field in _REASONING_FIELDS:  # copied under several names: tag each copy
        fields = [f for f in _REASONING_FIELDS if chat[-1].get(f) == final]
    if not any(f in template for f in fields):
        raise ValueError(f"continue_final_message is set to {field!r} but the chat template "
                         "does not read that field")
    if isinstance(final, (list, tuple)):  # content blocks: continue the last text block
        for block in reversed(final):
            if isinstance(block, dict) and "text" in block:
                final = block["text"]
                block["text"] = block["text"] + _CONTINUE_TAG
                return final
        raise ValueError("continue_final_message is set but the final message has no text "
                         "block to continue")
    if not isinstance(final, str):
        raise ValueError(f"continue_final_message: the final message's {field!r} must be a "
                         f"string or a list of content blocks, got {type(final).__name__}")
    for f in fields:
        chat[-1][f] = chat[-1][f] + _CONTINUE_TAG
    return final


def _cut_after_final_message(text: str, final: str) -> str:
    """The rendered chat up to the end of the final message (transformers' rule): exactly at
    the tag where the template kept it whole, else before it with trailing space trimmed."""
    tag = _CONTINUE_TAG.strip()
    if final.strip() not in text or tag not in text:
        raise ValueError("continue_final_message is set but the final message does not appear "
                         "in the chat template's output (the template changes or drops it): "
                         f"{final.strip()[:60]!r}")
    at = text.rindex(tag)
    if text[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return text[:at]
    return text[:at].rstrip()


def chat_templates_of(tok) -> Mapping[str, str]:
    """A tokenizer's named templates {name: source} (see Tokenizer.chat_templates); duck-typed
    tokenizers with only a `chat_template` give {"default": it}."""
    named = getattr(tok, "chat_templates", None)
    if named is not None:
        return named
    template = getattr(tok, "chat_template", None)
    return {"default": template} if template else {}


def select_chat_template(templates: Mapping[str, str], chat_template: str | None = None,
                         tools=None) -> str:
    """The Jinja source to render with, chosen as transformers' get_chat_template does:
    `chat_template` names one of `templates` or is a template itself; None picks "tool_use"
    when `tools` is not None and there is one, else "default" (ChatML when there are no
    templates at all). Named templates without a default and no choice: ValueError naming
    them. A name that is none of them (no Jinja in it) is a ValueError too, where
    transformers would render the name itself as the template."""
    if chat_template is not None:
        if chat_template in templates:
            return templates[chat_template]
        if _NAME.fullmatch(chat_template):
            raise ValueError(f"no chat template named {chat_template!r}; this tokenizer has "
                             f"{sorted(templates) or 'none'}")
        return chat_template
    if tools is not None and "tool_use" in templates:
        return templates["tool_use"]
    if "default" in templates:
        return templates["default"]
    if templates:
        raise ValueError(f"this tokenizer has several chat templates and no default: name one "
                         f"(chat_template=...) of {sorted(templates)}")
    return DEFAULT_CHAT_TEMPLATE


def render_chat(tok, messages: list[dict], add_generation_prompt: bool | None = None,
                template: str | None = None, continue_final_message: bool | str = False,
                **kwargs) -> str:
    """Text of `messages` through the tokenizer's chat template (ChatML if it has none).

    template: a Jinja source or the name of one of the tokenizer's templates; None picks as
    transformers does ("tool_use" when tools=... is passed and the tokenizer has it, else
    "default": select_chat_template). kwargs reach the template as variables (e.g. tools=...,
    documents=...), as in transformers.
    add_generation_prompt defaults to True, or False with continue_final_message (True for the
    final message's content, or the name of the field to continue): then the text ends right
    after the final message, so the model continues it.
    """
    _check_messages(messages)
    if add_generation_prompt is None:
        add_generation_prompt = not continue_final_message
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message and add_generation_prompt are not compatible: "
                         "continue the final message, or prompt a new assistant message")
    tools, documents = kwargs.get("tools"), kwargs.get("documents")
    for i, t in enumerate(tools or ()):
        if not isinstance(t, dict):  # transformers converts Python functions: not done here
            raise ValueError(f"tools[{i}] must be a JSON schema dict, got {type(t).__name__}")
    for i, d in enumerate(documents or ()):
        if not isinstance(d, dict):
            raise ValueError(f"documents[{i}] must be a dict (e.g. 'title' and 'text'), got "
                             f"{type(d).__name__}")
    template = select_chat_template(chat_templates_of(tok), template or None, tools)
    variables = {"tools": None, "documents": None}
    for name in ("bos", "eos", "unk", "pad"):
        i = getattr(tok, f"{name}_id", None)
        if i is not None:
            try:
                variables[f"{name}_token"] = tok.id_to_token(i)
            except NotImplementedError:
                pass
    variables.update(kwargs)
    chat = _template_messages(messages)
    final = None
    if continue_final_message:
        field = continue_final_message if isinstance(continue_final_message, str) else "content"
        final = _mark_final_message(chat, template, field)
    try:
        text = _compile(template).render(messages=chat, add_generation_prompt=add_generation_prompt,
                                         **{k: _plain(v) for k, v in variables.items()})
    except ChatTemplateError:
        raise
    except Exception as e:  # TemplateError from raise_exception, TypeError, SecurityError, ...
        raise ChatTemplateError(f"chat template failed to render: {_one_line(e)}") from None
    return text if final is None else _cut_after_final_message(text, final)


def read_chat_template(value: str) -> str:
    """The Jinja source a --chat-template flag names, as vLLM's flag takes it: a file (.jinja,
    or a tokenizer_config.json-style .json with "chat_template"), the template itself, or
    "chatml". Read and compiled at startup, before a model loads; a problem is one ValueError."""
    flag = f"--chat-template {value[:60]!r}"
    if value == "chatml":
        return DEFAULT_CHAT_TEMPLATE
    if os.path.isfile(value):
        try:
            with open(value, encoding="utf-8") as f:
                template = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{flag}: cannot read it: {_one_line(e)}") from None
        if value.endswith(".json"):  # another model's tokenizer_config.json
            try:
                template = json.loads(template)["chat_template"]
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{flag}: a .json file must be an object with a "
                                 "\"chat_template\" string") from None
            if isinstance(template, list):  # named ones (default, tool_use): the flag sets one
                names = sorted(t.get("name") for t in template if isinstance(t, dict)
                               and isinstance(t.get("name"), str))
                raise ValueError(f"{flag}: the file holds named chat templates {names}; give "
                                 "the one to use as a .jinja file")
    elif "{{" in value or "{%" in value:  # the template itself, on the command line
        template = value
    else:
        raise ValueError(f"{flag}: no such file, and not a Jinja template or 'chatml'")
    if not isinstance(template, str) or not template.strip():
        raise ValueError(f"{flag}: the template is empty")
    try:
        _compile(template)
    except ChatTemplateError as e:
        raise ValueError(f"{flag}: {e}") from None
    return template


def set_chat_template(tok, template: str) -> None:
    """Make `template` the tokenizer's chat template (saved with it; tok.stop_ids follow), in
    place of all its named ones (a tool_use template too, as in transformers), after checking
    that it renders a one-message conversation with this tokenizer."""
    try:
        text = render_chat(tok, [{"role": "user", "content": "Qz7xProbe"}],
                           add_generation_prompt=True, template=template)
    except ChatTemplateError as e:
        raise ValueError(f"--chat-template: {e}") from None
    if "Qz7xProbe" not in text:
        raise ValueError("--chat-template: the template does not render the messages' content")
    tok.chat_template = template


def end_of_turn_ids(tok) -> set[int]:
    """Ids of special tokens that close an assistant turn in this tokenizer's chat template.

    Renders a probe conversation and takes the special token that directly follows the
    assistant's text (ChatML: "<|im_end|>", Llama 3: "<|eot_id|>", Llama 2: "</s>"); also any
    known end-of-turn token that the template mentions. Empty when nothing is found.
    """
    specials = getattr(tok, "special_tokens", None) or {}
    if not specials:
        return set()
    found: set[int] = set()
    # every named template's (a tool_use one may close its turns differently)
    for template in chat_templates_of(tok).values() or [DEFAULT_CHAT_TEMPLATE]:
        found |= _end_of_turn_ids(tok, specials, template)
    return found


def _end_of_turn_ids(tok, specials: dict[str, int], template: str) -> set[int]:
    found: set[int] = set()
    probe = "Qz7xProbeAnswer"
    for messages in ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": probe}],
                     [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": probe}]):
        try:
            text = render_chat(tok, messages, add_generation_prompt=False, template=template)
        except ValueError:
            continue
        at = text.rfind(probe)
        if at < 0:
            continue
        tail = text[at + len(probe):].lstrip(" \n")
        match = max((s for s in specials if s and tail.startswith(s)), key=len, default=None)
        if match is not None:
            found.add(specials[match])
            break
    found.update(specials[s] for s in END_OF_TURN_TOKENS if s in specials and s in template)
    return found
