"""Chat templates (tokenizer/chat.py) against transformers' own rendering.

SmolLM2's GGUF template goes through PreTrainedTokenizerFast.apply_chat_template; other
templates (Llama 3, Llama 2, one using tojson/loop controls) through transformers'
render_jinja_template with the same special-token variables.
"""
import os

import pytest

from demo_assets import fetch_smollm2_gguf
from tokenizer import ChatTemplateError, DEFAULT_CHAT_TEMPLATE, end_of_turn_ids, from_gguf_metadata, \
    read_gguf_tokenizer_fields, render_chat
from tokenizer.bpe import ByteLevelBPETokenizer

transformers = pytest.importorskip("transformers")
hf_tokenizers = pytest.importorskip("tokenizers")
from transformers.utils.chat_template_utils import render_jinja_template  # noqa: E402

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "And 3+3?\n\nThanks  "}],
    [{"role": "system", "content": "Answer in French ü 日本 🤗"},
     {"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Bonjour !"}],
]

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}")

# Whitespace control (trim_blocks / lstrip_blocks), tojson without HTML escaping, loop controls,
# namespace, a custom variable.
FANCY_TEMPLATE = """{% set ns = namespace(n=0) %}
{% for message in messages %}
    {% if message['role'] == 'system' %}{% continue %}{% endif %}
    {% set ns.n = ns.n + 1 %}
    <{{ message['role'] }} n={{ ns.n }}>{{ message | tojson }}
{% endfor %}
{% if add_generation_prompt %}<assistant>{% endif %}{{ extra_var | default('') }}"""


@pytest.fixture(scope="module")
def smol():
    return from_gguf_metadata(read_gguf_tokenizer_fields(fetch_smollm2_gguf()))


def _hf_fast(tok: ByteLevelBPETokenizer):
    """transformers' PreTrainedTokenizerFast over the same vocab, with the same template."""
    ref = hf_tokenizers.Tokenizer.from_str(__import__("json").dumps(tok.to_tokenizer_json()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=ref, bos_token=tok.bos_token,
                                                eos_token=tok.eos_token)
    fast.chat_template = tok.chat_template
    return fast


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm2_template_matches_transformers(smol, add_generation_prompt):
    fast = _hf_fast(smol)
    for messages in CONVERSATIONS:
        ours = render_chat(smol, messages, add_generation_prompt=add_generation_prompt)
        ref = fast.apply_chat_template(messages, tokenize=False,
                                       add_generation_prompt=add_generation_prompt)
        assert ours == ref
        ids = smol.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                       tokenize=True)
        ref_ids = fast.apply_chat_template(messages, tokenize=True,
                                           add_generation_prompt=add_generation_prompt)
        ref_ids = ref_ids["input_ids"] if isinstance(ref_ids, dict) or hasattr(ref_ids, "keys") \
            else ref_ids
        assert ids == list(ref_ids)
        if not add_generation_prompt and messages[-1]["role"] == "assistant":
            assert render_chat(smol, messages, continue_final_message=True) == \
                fast.apply_chat_template(messages, tokenize=False, continue_final_message=True) \
                == ref[:-len("<|im_end|>\n")]


def test_smollm2_prompt_text_and_stop(smol):
    text = render_chat(smol, CONVERSATIONS[0])
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                    "Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?"
                    "<|im_end|>\n<|im_start|>assistant\n")
    assert end_of_turn_ids(smol) == {2} and smol.stop_ids == {2}


class _FakeTok:
    """Just what render_chat / end_of_turn_ids read from a tokenizer."""

    def __init__(self, template, specials, bos=None, eos=None):
        self.chat_template, self.special_tokens = template, specials
        self._names = {i: s for s, i in specials.items()}
        self.bos_id, self.eos_id = specials.get(bos), specials.get(eos)

    def id_to_token(self, i):
        return self._names[i]


@pytest.mark.parametrize("template,specials,bos,eos,eot", [
    (LLAMA3_TEMPLATE, {"<|begin_of_text|>": 0, "<|end_of_text|>": 1, "<|eot_id|>": 2,
                       "<|start_header_id|>": 3, "<|end_header_id|>": 4},
     "<|begin_of_text|>", "<|end_of_text|>", {2}),
    (LLAMA2_TEMPLATE, {"<s>": 1, "</s>": 2}, "<s>", "</s>", {2}),
    (FANCY_TEMPLATE, {"<s>": 1, "</s>": 2}, "<s>", "</s>", set()),
    (None, {"<|im_start|>": 5, "<|im_end|>": 6}, None, None, {6}),  # default ChatML
])
def test_templates_match_transformers_and_end_of_turn(template, specials, bos, eos, eot):
    tok = _FakeTok(template, specials, bos, eos)
    for messages in CONVERSATIONS:
        if template is LLAMA2_TEMPLATE and messages[-1]["role"] == "assistant" and len(messages) == 3:
            continue
        for agp in (True, False):
            ref, _ = render_jinja_template(conversations=[messages], chat_template=template or
                                           DEFAULT_CHAT_TEMPLATE, add_generation_prompt=agp,
                                           bos_token=bos, eos_token=eos, extra_var="!")
            assert render_chat(tok, messages, add_generation_prompt=agp, extra_var="!") == ref[0]
    assert end_of_turn_ids(tok) == eot


def test_tojson_keeps_unicode():
    tok = _FakeTok(FANCY_TEMPLATE, {})
    out = render_chat(tok, [{"role": "user", "content": "<b>ü🤗</b>"}])
    assert '"content": "<b>ü🤗</b>"' in out


def test_errors_are_one_line():
    tok = _FakeTok(LLAMA2_TEMPLATE, {"<s>": 1, "</s>": 2}, "<s>", "</s>")
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        render_chat(tok, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(ChatTemplateError, match="does not compile"):
        render_chat(_FakeTok("{% for %}", {}), [{"role": "user", "content": "a"}])
    with pytest.raises(ChatTemplateError, match="failed to render"):
        render_chat(_FakeTok("{{ messages.append(1) }}", {}),
                    [{"role": "user", "content": "a"}])  # immutable sandbox: no mutation
    with pytest.raises(ValueError, match="must be a dict with 'role' and 'content'"):
        render_chat(tok, [{"role": "user"}])
    with pytest.raises(ValueError, match="must be a list"):
        render_chat(tok, "hello")


TOOL_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.content %}{{ m.content }}{% endif %}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}"
    "<|im_end|>\n{% endfor %}")


def test_tool_call_turn_without_content_renders_like_transformers():
    """An assistant turn that only calls a tool has no 'content' (OpenAI's format, Qwen2.5)."""
    tok = _FakeTok(TOOL_TEMPLATE, {})
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "tool_calls": [{"type": "function", "function": {
                    "name": "weather", "arguments": {"city": "Paris"}}}]},
                {"role": "tool", "content": "sunny"}]
    ref, _ = render_jinja_template(conversations=[messages], chat_template=TOOL_TEMPLATE)
    assert render_chat(tok, messages, add_generation_prompt=False) == ref[0]
    assert '<tool_call>{"name": "weather", "arguments": {"city": "Paris"}}</tool_call>' in ref[0]


def test_apply_chat_template_passes_tools_like_transformers(tmp_path):
    """tools=[...] reaches the template through apply_chat_template, as in transformers."""
    from tokenizer import load_tokenizer
    from tokenizer.bpe import bytes_to_unicode
    template = ("{% if tools %}TOOLS {{ tools | tojson }}\n{% endif %}"
                "{% for m in messages %}{{ m.content }}<|im_end|>{% endfor %}")
    chars = list(bytes_to_unicode().values())
    ByteLevelBPETokenizer(chars + ["<|im_end|>"], [], added_tokens=[
        {"id": 256, "content": "<|im_end|>"}], eos_id=256, chat_template=template).save(str(tmp_path))
    ours, ref = load_tokenizer(str(tmp_path)), transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    msgs = [{"role": "user", "content": "hi"}]
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {}}}]
    for tokenize in (False, True):
        got = ours.apply_chat_template(msgs, tokenize=tokenize, tools=tools)
        want = ref.apply_chat_template(msgs, tokenize=tokenize, tools=tools)
        if hasattr(want, "keys"):  # transformers 5: a BatchEncoding
            want = want["input_ids"]
        assert got == want
    assert ours.apply_chat_template(msgs, tools=tools).startswith('TOOLS [{"type": "function"')


def test_chat_template_jinja_file_wins_like_transformers(tmp_path):
    """chat_template.jinja beside a tokenizer_config.json that has a chat_template too:
    transformers uses the file; we used the config's entry."""
    from tokenizer import load_tokenizer
    from tokenizer.bpe import bytes_to_unicode
    chars = list(bytes_to_unicode().values())
    tok = ByteLevelBPETokenizer(chars + ["<|im_end|>"], [], added_tokens=[
        {"id": 256, "content": "<|im_end|>"}], eos_id=256,
        chat_template="CONFIG {{ messages[0]['content'] }}")
    tok.save(str(tmp_path))
    (tmp_path / "chat_template.jinja").write_text("FILE {{ messages[0]['content'] }}<|im_end|>")
    ours = load_tokenizer(str(tmp_path))
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    msgs = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(msgs) == ref.apply_chat_template(msgs, tokenize=False) == \
        "FILE hi<|im_end|>"


def test_chat_template_flag_values(tmp_path):
    """--chat-template (generate.py, serve.py, train.py): a file, a tokenizer_config.json, the
    template itself or chatml; stop ids follow the new template; problems are one line."""
    from tokenizer import read_chat_template, set_chat_template
    (tmp_path / "t.jinja").write_text(LLAMA3_TEMPLATE)
    (tmp_path / "tokenizer_config.json").write_text(
        __import__("json").dumps({"chat_template": LLAMA2_TEMPLATE}))
    assert read_chat_template(str(tmp_path / "t.jinja")) == LLAMA3_TEMPLATE
    assert read_chat_template(str(tmp_path / "tokenizer_config.json")) == LLAMA2_TEMPLATE
    assert read_chat_template(LLAMA2_TEMPLATE) == LLAMA2_TEMPLATE
    assert read_chat_template("chatml") == DEFAULT_CHAT_TEMPLATE
    tok = _FakeTok(None, {"<|begin_of_text|>": 0, "<|eot_id|>": 2, "<|start_header_id|>": 3,
                          "<|end_header_id|>": 4, "<|im_end|>": 6}, "<|begin_of_text|>")
    assert end_of_turn_ids(tok) == {6}  # ChatML while it has no template
    set_chat_template(tok, read_chat_template(str(tmp_path / "t.jinja")))
    assert tok.chat_template == LLAMA3_TEMPLATE and end_of_turn_ids(tok) == {2}
    (tmp_path / "empty.jinja").write_text(" \n")
    (tmp_path / "bad.json").write_text("{}")
    for value, msg in [("missing.jinja", "no such file, and not a Jinja template"),
                       ("{% for %}", "does not compile"),
                       (str(tmp_path / "empty.jinja"), "the template is empty"),
                       (str(tmp_path / "bad.json"), 'must be an object with a "chat_template"')]:
        with pytest.raises(ValueError, match=msg) as e:
            read_chat_template(value)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="does not render the messages' content"):
        set_chat_template(tok, "{{ 'fixed prompt' }}")
    with pytest.raises(ValueError, match="--chat-template: chat template failed to render"):
        set_chat_template(tok, "{{ raise_exception('no') }}")
    assert tok.chat_template == LLAMA3_TEMPLATE  # unchanged by the refused ones


# --- real templates through transformers' whole apply_chat_template path -------------------------

import datetime as _dt  # noqa: E402
import json as _json  # noqa: E402

import chat_templates as T  # noqa: E402
import transformers.utils.chat_template_utils as _hf_chat_utils  # noqa: E402
import tokenizer.chat as _chat  # noqa: E402


class _FixedNow(_dt.datetime):
    @classmethod
    def now(cls, tz=None):
        return cls(2025, 3, 7, 12, 0, 0)


@pytest.fixture
def pinned_now(monkeypatch):
    """strftime_now reads the same fixed time in both renderers."""
    monkeypatch.setattr(_chat, "datetime", _FixedNow)
    monkeypatch.setattr(_hf_chat_utils, "datetime", _FixedNow)


def _hf_word_tokenizer(template, bos, eos):
    """A transformers tokenizer with just these special tokens: its apply_chat_template is the
    reference (message normalization, continue_final_message, special-token variables)."""
    from tokenizers.models import WordLevel
    vocab = {"<unk>": 0, **{t: i + 1 for i, t in enumerate(dict.fromkeys([bos, eos]))}}
    ref = hf_tokenizers.Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=ref, bos_token=bos,
                                                eos_token=eos, unk_token="<unk>")
    fast.chat_template = template
    return fast, _FakeTok(template, vocab, bos, eos)


def _both(template, bos, eos, messages, **kw):
    """(transformers' text or exception, ours or exception)."""
    fast, tok = _hf_word_tokenizer(template, bos, eos)
    try:
        ref = fast.apply_chat_template(_json.loads(_json.dumps(messages)), tokenize=False, **kw)
    except Exception as e:  # noqa: BLE001 (compared below)
        ref = e
    try:
        ours = render_chat(tok, _json.loads(_json.dumps(messages)),
                           add_generation_prompt=kw.pop("add_generation_prompt", False), **kw)
    except Exception as e:  # noqa: BLE001
        ours = e
    return ref, ours


def _assert_same(ref, ours):
    if isinstance(ref, Exception):
        assert isinstance(ours, ValueError), f"transformers raised {ref!r}, we gave {ours!r}"
        assert "\n" not in str(ours)
        if isinstance(ref, __import__("jinja2").TemplateError) and str(ref):  # raise_exception
            assert str(ref).splitlines()[0] in str(ours)
    else:
        assert not isinstance(ours, Exception), f"{ours!r}; transformers rendered {ref!r}"
        assert ours == ref


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city <b>now</b>",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "Zürich"}},
                   "required": ["city"]}}}
SYSTEM_CHAT = [{"role": "system", "content": "Be brief. ü 🤗"}, {"role": "user", "content": " Hi "},
               {"role": "assistant", "content": "Hello!  "}, {"role": "user", "content": "2+2?"}]
# As a datasets column gives a JSONL of mixed rows: the keys a row lacks are None.
TOOL_CHAT = [
    {"role": "system", "content": "Use tools.", "tool_calls": None, "tool_call_id": None},
    {"role": "user", "content": "Weather in Paris?", "tool_calls": None, "tool_call_id": None},
    {"role": "assistant", "content": None, "tool_call_id": None, "tool_calls": [
        {"id": "call12345", "type": "function",
         "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "sunny, 21°C", "tool_calls": None, "tool_call_id": "call12345"},
    {"role": "assistant", "content": "Sunny, 21 °C.", "tool_calls": None, "tool_call_id": None},
]
NOT_ALTERNATING = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]

REAL_TEMPLATES = [  # (name, template, bos, eos)
    ("zephyr/tinyllama", T.ZEPHYR, "<s>", "</s>"),
    ("llama-2", T.LLAMA2, "<s>", "</s>"),
    ("llama-3.1", T.LLAMA31, "<|begin_of_text|>", "<|eot_id|>"),
    ("llama-3.2", T.LLAMA32, "<|begin_of_text|>", "<|eot_id|>"),
    ("mistral-v0.3", T.MISTRAL_V03, "<s>", "</s>"),
    ("qwen2.5", T.QWEN25, "<|endoftext|>", "<|im_end|>"),
    ("chatml", DEFAULT_CHAT_TEMPLATE, "<|im_start|>", "<|im_end|>"),
]


@pytest.mark.parametrize("name,template,bos,eos", REAL_TEMPLATES, ids=[r[0] for r in REAL_TEMPLATES])
def test_real_templates_match_transformers(pinned_now, name, template, bos, eos):
    """Every conversation x (generation prompt, continue the final message, tools) renders the
    same text as transformers' apply_chat_template, or fails as a one-line ValueError where it
    raises (Llama 2 / Mistral alternation, Llama 3.1's single tool call, ...)."""
    rendered = 0
    for messages in CONVERSATIONS + [SYSTEM_CHAT, TOOL_CHAT, NOT_ALTERNATING]:
        for kw in ({"add_generation_prompt": True}, {"add_generation_prompt": False},
                   {"continue_final_message": True}, {"tools": [WEATHER_TOOL]},
                   {"tools": [WEATHER_TOOL], "add_generation_prompt": True}):
            ref, ours = _both(template, bos, eos, messages, **kw)
            _assert_same(ref, ours)
            rendered += not isinstance(ref, Exception)
    assert rendered >= 12


def test_llama3_tools_and_pinned_date(pinned_now):
    """Llama 3.2 takes today's date from strftime_now; tools go into the first user message with
    tojson(indent=4) (unicode kept, no HTML escaping); a tool call renders as JSON."""
    ref, ours = _both(T.LLAMA32, "<|begin_of_text|>", "<|eot_id|>", TOOL_CHAT[1:],
                      tools=[WEATHER_TOOL], add_generation_prompt=True)
    _assert_same(ref, ours)
    assert "Today Date: 07 Mar 2025\n\n" in ours
    assert '\n    "type": "function",\n' in ours and "<b>now</b>" in ours and "Zürich" in ours
    assert ('<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", '
            '"parameters": {"city": "Paris"}}<|eot_id|>') in ours
    # (a string "is iterable" in Jinja: the template writes the result through tojson)
    assert '<|start_header_id|>ipython<|end_header_id|>\n\n"sunny, 21°C"<|eot_id|>' in ours
    # Llama 3.1 keeps its fixed date unless date_string is given
    ref, ours = _both(T.LLAMA31, "<|begin_of_text|>", "<|eot_id|>", SYSTEM_CHAT,
                      date_string="01 Jan 2030")
    _assert_same(ref, ours)
    assert "Today Date: 01 Jan 2030" in ours


def test_none_valued_keys_are_dropped_like_transformers():
    """transformers 5 drops a message's None-valued keys: a user turn with tool_calls=None is not
    a tool call to Llama 3 (`'tool_calls' in message`), content=None is absent."""
    ref, ours = _both(T.LLAMA31, "<|begin_of_text|>", "<|eot_id|>", TOOL_CHAT)
    _assert_same(ref, ours)
    assert "<|start_header_id|>user<|end_header_id|>\n\nWeather in Paris?<|eot_id|>" in ours
    ref, ours = _both(T.QWEN25, "<|endoftext|>", "<|im_end|>", TOOL_CHAT, tools=[WEATHER_TOOL])
    _assert_same(ref, ours)
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": '
            '{"city": "Paris"}}\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n'
            'sunny, 21°C\n</tool_response><|im_end|>\n') in ours


def test_mistral_errors_are_one_clear_line():
    for messages, msg in [(NOT_ALTERNATING, "conversation roles must alternate"),
                          ([{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [
                              {"id": "short", "function": {"name": "f", "arguments": {}}}]}],
                           "Tool call IDs should be alphanumeric strings with length 9")]:
        tok = _FakeTok(T.MISTRAL_V03, {"<s>": 1, "</s>": 2}, "<s>", "</s>")
        with pytest.raises(ChatTemplateError, match=msg) as e:
            render_chat(tok, messages)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("name,template,bos,eos", REAL_TEMPLATES, ids=[r[0] for r in REAL_TEMPLATES])
def test_continue_final_message(name, template, bos, eos):
    """The text ends right after the final message's content: its end-of-turn cut off, trailing
    spaces kept where the template keeps them; no generation prompt."""
    messages = [{"role": "user", "content": "Write a haiku"},
                {"role": "assistant", "content": "Autumn moonlight -  "}]
    ref, ours = _both(template, bos, eos, messages, continue_final_message=True)
    _assert_same(ref, ours)
    assert ours.endswith("Autumn moonlight -  " if ref.endswith("  ") else "Autumn moonlight -")
    fast, tok = _hf_word_tokenizer(template, bos, eos)
    # transformers' default add_generation_prompt is False; ours defaults to False here too
    assert render_chat(tok, messages, continue_final_message=True) == ours


def test_continue_final_message_errors():
    tok = _FakeTok(DEFAULT_CHAT_TEMPLATE, {})
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    for kw, template, msg in [
            ({"add_generation_prompt": True}, None, "not compatible"),
            ({}, "{% for m in messages %}{{ m.content[:1] }}{% endfor %}", "does not appear"),
            ({}, "{% for m in messages %}{{ m.role }}{% endfor %}", "does not read that field"),
            ({"continue_final_message": "reasoning_content"}, None, "has no 'reasoning_content'")]:
        kw = {"continue_final_message": True, **kw}
        with pytest.raises(ValueError, match=msg) as e:
            render_chat(tok, [{"role": "user", "content": "abcdef"}] if "[:1]" in (template or "")
                        else msgs, template=template, **kw)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="conversation is empty"):
        render_chat(tok, [], continue_final_message=True)


def test_reasoning_fields_are_aliased_like_transformers():
    """A reasoning given as "reasoning" or "thinking" reaches templates that read
    reasoning_content (Qwen3) or thinking (gpt-oss), as in transformers 5; and can be continued."""
    template = ("{% for m in messages %}<{{ m.role }}>{% if m.reasoning_content %}<think>"
                "{{ m.reasoning_content }}</think>{% endif %}{{ m.content }}|{{ m.thinking }}"
                "{% endfor %}")
    for key in ("reasoning", "thinking", "reasoning_content"):
        messages = [{"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a", key: "because"}]
        ref, ours = _both(template, "<s>", "</s>", messages)
        _assert_same(ref, ours)
        assert ours == "<user>q|<assistant><think>because</think>a|because"
        ref, ours = _both(template, "<s>", "</s>", messages, continue_final_message=key)
        _assert_same(ref, ours)  # (transformers tags every copy; the last one is cut at)
        assert ours.endswith("a|because")


def test_sandbox_like_transformers():
    """The immutable sandbox plus transformers' own guards: no dunder attributes, no mutation of
    the caller's messages through jinja's `dict` type, no underscore names on a namespace."""
    messages = [{"role": "user", "content": "hi", "meta": {"k": 1}}]
    for template, msg in [("{{ messages.__class__.__mro__ }}", "unsafe"),
                          ("{{ ''.__class__.__base__.__subclasses__() }}", "unsafe"),
                          ("{{ dict.update(messages[0].meta, {'pwned': 1}) }}", "no attribute 'update'"),
                          ("{% set ns = namespace(_x=1) %}", "underscore-prefixed"),
                          ("{% set ns = namespace() %}{% set ns.__init__ = 1 %}", "underscore-prefixed")]:
        fast, tok = _hf_word_tokenizer(template, "<s>", "</s>")
        with pytest.raises(Exception):
            fast.apply_chat_template(messages, tokenize=False)
        with pytest.raises(ChatTemplateError, match=msg) as e:
            render_chat(tok, messages)
        assert "\n" not in str(e.value)
    assert messages[0]["meta"] == {"k": 1}
    # dict() and namespace still work as templates use them
    tok = _FakeTok("{% set ns = namespace(n=1) %}{% set ns.n = ns.n + 1 %}{{ ns.n }}"
                   "{{ dict(a=1) | tojson }}{{ dict.fromkeys(['x']) | tojson }}", {})
    assert render_chat(tok, messages) == '2{"a": 1}{"x": null}'


def test_template_sees_plain_data():
    """Inputs reach the template as plain JSON types (transformers' _plain_template_data): a
    str Enum role prints its value; a template cannot mutate nested data it is given."""
    import enum

    class Role(str, enum.Enum):
        USER = "user"

    template = "{% for m in messages %}[{{ m.role }}]{{ m.content | tojson }}{% endfor %}"
    fast, tok = _hf_word_tokenizer(template, "<s>", "</s>")
    messages = [{"role": Role.USER, "content": ("a", 1)}]
    assert render_chat(tok, messages) == fast.apply_chat_template(messages, tokenize=False) == \
        '[user]["a", 1]'


def test_invalid_jinja_and_bad_arguments_are_one_line():
    tok = _FakeTok("{% for m in messages %}{{ m.content }}", {})
    with pytest.raises(ChatTemplateError, match=r"does not compile: Unexpected end of template.*"
                                                 r"'endfor' or 'else'.*\(line 1\)") as e:
        render_chat(tok, [{"role": "user", "content": "a"}])
    assert "\n" not in str(e.value)
    tok = _FakeTok(DEFAULT_CHAT_TEMPLATE, {})

    def get_weather(city: str):
        """Weather."""
    with pytest.raises(ValueError, match=r"tools\[0\] must be a JSON schema dict, got function"):
        render_chat(tok, [{"role": "user", "content": "a"}], tools=[get_weather])
    with pytest.raises(ValueError, match=r"documents\[0\] must be a dict"):
        render_chat(tok, [{"role": "user", "content": "a"}], documents=["text"])


# -- named templates (Hermes-2-Pro, Mistral, Cohere: "default" + "tool_use") --------------------
NAMED = {"default": DEFAULT_CHAT_TEMPLATE,
         "tool_use": ("{% if tools is not none %}<|im_start|>system\nTOOLS {{ tools | tojson }}"
                      "<|im_end|>\n{% endif %}" + DEFAULT_CHAT_TEMPLATE)}
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]


def _named_dir(path, templates=NAMED):
    from tokenizer.bpe import bytes_to_unicode
    chars = list(bytes_to_unicode().values())
    tok = ByteLevelBPETokenizer(chars + ["<|im_start|>", "<|im_end|>"], [], added_tokens=[
        {"id": 256, "content": "<|im_start|>"}, {"id": 257, "content": "<|im_end|>"}],
        eos_id=257, chat_template=templates)
    tok.save(str(path))
    return tok


def _hf_apply(ref, msgs, **kw):
    out = ref.apply_chat_template(msgs, add_generation_prompt=True, **kw)
    return out["input_ids"] if hasattr(out, "keys") else out  # transformers 5: a BatchEncoding


def test_named_templates_select_like_transformers(tmp_path):
    """A tokenizer_config.json list of named templates: tools pick "tool_use", none (or a
    template name) as transformers' get_chat_template; both kept, "default" is chat_template."""
    from tokenizer import load_tokenizer
    _named_dir(tmp_path)
    cfg = __import__("json").loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == [{"name": k, "template": v} for k, v in NAMED.items()]
    ours, ref = load_tokenizer(str(tmp_path)), transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert dict(ours.chat_templates) == ref.chat_template == NAMED
    assert ours.chat_template == NAMED["default"]
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    cases = [{}, {"tools": TOOLS}, {"tools": []}, {"chat_template": "tool_use"},
             {"chat_template": "default", "tools": TOOLS}, {"chat_template": "{{ 'X' }}"}]
    for kw in cases:
        for tokenize in (False, True):
            got = ours.apply_chat_template(msgs, add_generation_prompt=True, tokenize=tokenize, **kw)
            assert got == _hf_apply(ref, msgs, tokenize=tokenize, **kw), (kw, tokenize)
    assert ours.apply_chat_template(msgs, tools=TOOLS).startswith("<|im_start|>system\nTOOLS [")
    assert render_chat(ours, msgs).startswith("<|im_start|>user")
    assert end_of_turn_ids(ours) == {257}
    # no default and no choice: an error naming the templates, in both
    ours.chat_templates = {"tool_use": NAMED["tool_use"]}
    ref.chat_template = {"tool_use": NAMED["tool_use"]}
    with pytest.raises(ValueError, match=r"no default.*\['tool_use'\]"):
        ours.apply_chat_template(msgs)
    with pytest.raises(ValueError, match=r"no default.*\['tool_use'\]"):
        ref.apply_chat_template(msgs, tokenize=False)
    assert ours.apply_chat_template(msgs, tools=TOOLS) == ref.apply_chat_template(
        msgs, tools=TOOLS, tokenize=False)
    # an unknown name is one line here (transformers would render the name as a template)
    with pytest.raises(ValueError, match="no chat template named 'rag'"):
        ours.apply_chat_template(msgs, chat_template="rag")
    # assigning one template replaces them all, as transformers' tok.chat_template = str
    ours.chat_template = NAMED["default"]
    assert dict(ours.chat_templates) == {"default": NAMED["default"]}
    assert ours.apply_chat_template(msgs, tools=TOOLS) == ours.apply_chat_template(msgs)


def test_named_templates_save_and_load_both_forms(tmp_path):
    """save() writes transformers' list form, which transformers loads as the same dict; what
    transformers 5's save_pretrained writes (chat_template.jinja + additional_chat_templates/
    NAME.jinja) loads here as the same templates; saving over it leaves no stale file."""
    from tokenizer import load_tokenizer
    _named_dir(tmp_path / "a")
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "a"))
    ref.save_pretrained(str(tmp_path / "hf"))
    assert sorted(os.listdir(tmp_path / "hf" / "additional_chat_templates")) == ["tool_use.jinja"]
    ours = load_tokenizer(str(tmp_path / "hf"))
    assert dict(ours.chat_templates) == NAMED
    ours.save(str(tmp_path / "hf"))  # over transformers' files: its .jinja files would win
    assert not (tmp_path / "hf" / "chat_template.jinja").exists()
    assert not (tmp_path / "hf" / "additional_chat_templates" / "tool_use.jinja").exists()
    assert transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf")).chat_template == NAMED
    assert dict(load_tokenizer(str(tmp_path / "hf")).chat_templates) == NAMED
    # the .jinja files replace the config's entry as a whole, as in transformers
    (tmp_path / "a" / "additional_chat_templates").mkdir()
    (tmp_path / "a" / "additional_chat_templates" / "rag.jinja").write_text("RAG {{ messages }}")
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "a"))
    assert dict(load_tokenizer(str(tmp_path / "a")).chat_templates) == ref.chat_template == {
        "rag": "RAG {{ messages }}"}
    # a malformed list is one line
    (tmp_path / "a" / "tokenizer_config.json").write_text('{"chat_template": [{"name": "x"}]}')
    os.remove(tmp_path / "a" / "additional_chat_templates" / "rag.jinja")
    with pytest.raises(ValueError, match="list of chat templates"):
        load_tokenizer(str(tmp_path / "a"))


def test_sft_with_tools_renders_the_tool_use_template(tmp_path):
    """SFT's chat rendering (engine/sft.py chat_spans) picks tool_use for a sample with tools,
    and checks its tools against that same template."""
    from engine.sft import chat_spans
    tok = _named_dir(tmp_path)
    msgs = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "Sunny."}]
    text, spans = chat_spans(tok, msgs, tools=TOOLS)
    assert text == render_chat(tok, msgs, add_generation_prompt=False, template="tool_use",
                               tools=TOOLS)
    assert text.startswith("<|im_start|>system\nTOOLS [") and text[spans[0][0]:spans[0][1]] == \
        "Sunny.<|im_end|>"
    assert chat_spans(tok, msgs)[0] == render_chat(tok, msgs, add_generation_prompt=False)


class _Crash(Exception):
    pass


def test_save_over_template_files_never_loads_a_mixed_set(tmp_path, monkeypatch):
    """Saving over transformers 5's template files (chat_template.jinja + additional_chat_
    templates/tool_use.jinja) with a crash after any filesystem step: the directory loads the
    old set or the new one, whole, here and in transformers, never a mix (e.g. only the old
    tool_use once chat_template.jinja is gone)."""
    import shutil
    from tokenizer import load_tokenizer
    _named_dir(tmp_path / "a")
    transformers.AutoTokenizer.from_pretrained(str(tmp_path / "a")).save_pretrained(
        str(tmp_path / "hf"))
    new = {"default": "NEW {{ messages[0].content }}<|im_end|>",
           "tool_use": "NEWTOOLS {{ tools | tojson }}<|im_end|>"}
    steps = ("remove", "replace", "rename", "rmdir", "mkdir")
    for crash_at in range(40):
        d = tmp_path / f"s{crash_at}"
        shutil.copytree(tmp_path / "hf", d)
        tok = load_tokenizer(str(d))
        assert dict(tok.chat_templates) == NAMED
        tok.chat_templates = new
        calls = []
        with monkeypatch.context() as m:
            for name in steps:
                real = getattr(os, name)

                def step(*a, _real=real, **k):
                    if len(calls) == crash_at:
                        raise _Crash
                    calls.append(1)
                    return _real(*a, **k)
                m.setattr(os, name, step)
            try:
                tok.save(str(d))
                done = True
            except _Crash:
                done = False
        got = dict(load_tokenizer(str(d)).chat_templates)
        ref = transformers.AutoTokenizer.from_pretrained(str(d)).chat_template
        assert got == ref and got in (NAMED, new), crash_at
        if done:
            assert got == new and not os.path.exists(d / "chat_template.jinja")
            assert not [n for n in os.listdir(d) if n.startswith(".")]  # no staging left
            break
    else:
        raise AssertionError("save never finished")


def test_chat_template_flag_refuses_a_list_of_named_templates(tmp_path):
    """--chat-template tokenizer_config.json of a model with named templates (Hermes-2-Pro:
    default + tool_use) is one line naming them, not 'the template is empty'."""
    from tokenizer import read_chat_template
    (tmp_path / "tokenizer_config.json").write_text(__import__("json").dumps(
        {"chat_template": [{"name": k, "template": v} for k, v in NAMED.items()]}))
    with pytest.raises(ValueError, match=r"named chat templates \['default', 'tool_use'\]"):
        read_chat_template(str(tmp_path / "tokenizer_config.json"))


def test_legacy_chat_template_json_is_not_a_tokenizer_file(tmp_path):
    """chat_template.json (processors' legacy file) is not read by transformers 5's tokenizers,
    nor here: the tokenizer_config.json template stays."""
    from tokenizer import load_tokenizer
    _named_dir(tmp_path, {"default": DEFAULT_CHAT_TEMPLATE})
    (tmp_path / "chat_template.json").write_text('{"chat_template": "JSON {{ messages }}"}')
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert load_tokenizer(str(tmp_path)).chat_template == ref.chat_template == DEFAULT_CHAT_TEMPLATE


def test_stop_ids_cover_every_named_template():
    """A tool_use template closing turns with another token (<|eot_id|>) adds it to the stop ids
    (llama.cpp stops at every end-of-generation token too); a template's own end token only."""
    from tokenizer.bpe import bytes_to_unicode
    chars = list(bytes_to_unicode().values())
    tok = ByteLevelBPETokenizer(chars + ["<|im_start|>", "<|im_end|>", "<|eot_id|>"], [],
                                added_tokens=[{"id": 256 + i, "content": c} for i, c in enumerate(
                                    ["<|im_start|>", "<|im_end|>", "<|eot_id|>"])],
                                chat_template={"default": DEFAULT_CHAT_TEMPLATE})
    assert end_of_turn_ids(tok) == tok.stop_ids == {257}
    tok.chat_templates = {"default": DEFAULT_CHAT_TEMPLATE, "tool_use": (
        "{% for m in messages %}{{ m.content }}<|eot_id|>{% endfor %}")}
    assert end_of_turn_ids(tok) == tok.stop_ids == {257, 258}
