"""Chat templates: render a model's Jinja chat template the way Hugging Face transformers does.

Follows transformers' utils/chat_template_utils.py (`_compile_jinja_template`,
`render_jinja_template`): an ImmutableSandboxedEnvironment with trim_blocks and lstrip_blocks,
the loopcontrols extension, a `tojson` filter that does not HTML-escape, `raise_exception`,
`strftime_now`, and the special-token strings (`bos_token`, `eos_token`, ...) as variables.
A tokenizer without a template gets ChatML. `end_of_turn_ids` finds the token that closes an
assistant turn (e.g. <|im_end|> for ChatML, <|eot_id|> for Llama 3) so generation can stop there.
"""
from __future__ import annotations

import json
import os
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


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
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


def render_chat(tok, messages: list[dict], add_generation_prompt: bool = True,
                template: str | None = None, **kwargs) -> str:
    """Text of `messages` through the tokenizer's chat template (ChatML if it has none).

    kwargs reach the template as variables (e.g. tools=..., documents=...), as in transformers.
    """
    _check_messages(messages)
    template = template or getattr(tok, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
    variables = {"tools": None, "documents": None}
    for name in ("bos", "eos", "unk", "pad"):
        i = getattr(tok, f"{name}_id", None)
        if i is not None:
            try:
                variables[f"{name}_token"] = tok.id_to_token(i)
            except NotImplementedError:
                pass
    variables.update(kwargs)
    try:
        return _compile(template).render(messages=[dict(m) for m in messages],
                                         add_generation_prompt=add_generation_prompt, **variables)
    except ChatTemplateError:
        raise
    except Exception as e:  # TemplateError from raise_exception, TypeError, SecurityError, ...
        raise ChatTemplateError(f"chat template failed to render: {_one_line(e)}") from None


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
    """Make `template` the tokenizer's chat template (saved with it; tok.stop_ids follow),
    after checking that it renders a one-message conversation with this tokenizer."""
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
    template = getattr(tok, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
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
