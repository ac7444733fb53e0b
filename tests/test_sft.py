"""SFT / preference data (engine/sft.py): exact loss masks, truncation, padding and packing,
resumable batch order, malformed JSONL.

Masks are checked by hand on a character-level stub tokenizer (one id per character, special
tokens whole) under ChatML, Llama 3, Llama 2 and a history-rewriting template; against
transformers' `return_assistant_tokens_mask` on a byte-level BPE built here; and on SmolLM2's
real tokenizer and template. Packing is checked against the tiny Transformer: the loss of a
packed batch equals the token-weighted loss of each sample on its own. At the end: engine/data.py's
random corpus windows and chunked corpus encoding.
"""
import json

import pytest
import torch

from chat_templates import QWEN25  # Qwen2.5-Instruct's: renders OpenAI-style tool use
from engine.config import preset
from engine.model import Transformer
from engine.sft import (IGNORE, BatchStream, Example, SFTDataset, chat_spans, collate_pairs,
                        detect_format, encode_example, format_report, load_examples,
                        load_preferences, load_sft, response_loss, split_indices, tokenize_example,
                        tokenize_pair)
from tokenizer.base import Tokenizer
from tokenizer.chat import DEFAULT_CHAT_TEMPLATE


class CharTok(Tokenizer):
    """One id per character (10 + code point, ASCII only), special tokens as single ids."""
    SPECIALS = {"<s>": 1, "</s>": 2, "<|im_start|>": 3, "<|im_end|>": 4, "<|eot_id|>": 5,
                "<|start_header_id|>": 6, "<|end_header_id|>": 7}

    def __init__(self, chat_template=None, add_bos=False, bos_id=1, eos_id=2, pad_id=None):
        self.vocab_size = 140
        self.chat_template, self.add_bos = chat_template, add_bos
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.inv = {v: k for k, v in self.SPECIALS.items()}

    def encode(self, text, add_bos=None, add_eos=False, parse_special=True):
        ids = [self.bos_id] if (self.add_bos if add_bos is None else add_bos) else []
        i = 0
        while i < len(text):
            sp = next((s for s in self.SPECIALS if parse_special and text.startswith(s, i)), None)
            if sp:
                ids.append(self.SPECIALS[sp])
                i += len(sp)
            else:
                assert ord(text[i]) < 128
                ids.append(10 + ord(text[i]))
                i += 1
        return ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids, skip_special=False):
        return "".join(self.inv[i] if i in self.inv else chr(i - 10) for i in ids)

    def save(self, directory):
        raise NotImplementedError

    def id_to_token(self, i):
        return self.inv[i] if i in self.inv else chr(i - 10)

    def token_to_id(self, t):
        return self.SPECIALS.get(t, 10 + ord(t) if len(t) == 1 else None)

    @property
    def special_tokens(self):
        return dict(self.SPECIALS)


LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
          "'<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA2 = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + m['content'].strip()"
          " + ' [/INST]' }}{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'].strip() + ' ' + eos_token }}"
          "{% endif %}{% endfor %}")
# Renders a header that depends on the whole conversation: prefixes never match the full text.
REWRITING = ("{{ 'turns=' + messages|length|string + '\n' }}{% for m in messages %}"
             "{{ m['role'] + ': ' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
             "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}]


def trained_runs(tok, input_ids, labels):
    """The text of each maximal run of trained targets (checks the alignment on the way)."""
    runs, cur = [], []
    for t, y in enumerate(labels):
        if y == IGNORE:
            if cur:
                runs.append(tok.decode(cur))
            cur = []
        else:
            assert t + 1 < len(input_ids) + 1
            cur.append(y)
    if cur:
        runs.append(tok.decode(cur))
    return runs


def check_alignment(ids, mask, x, y):
    """labels[t] is ids[t+1] where it is trained, -100 elsewhere; inputs are ids[:-1]."""
    assert x == ids[:len(x)]
    assert y == [ids[t + 1] if mask[t + 1] else IGNORE for t in range(len(x))]


# ---------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------
def test_chatml_mask_exact_by_hand():
    tok = CharTok(DEFAULT_CHAT_TEMPLATE)
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    x, y = tokenize_example({"messages": msgs}, tok, seq_len=64)
    text = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    ids = tok.encode(text)
    c = lambda ch: 10 + ord(ch)  # noqa: E731
    # 25 tokens: S u s e r \n h i E \n S a s s i s t a n t \n y o E \n. The untrained "\n" at
    # the end is dropped and the last token (E) is only a target: 23 positions.
    assert len(ids) == 25 and x == ids[:23]
    expected = [IGNORE] * 23
    expected[20], expected[21], expected[22] = c("y"), c("o"), 4  # "\n"->y, y->o, o-><|im_end|>
    assert y == expected


@pytest.mark.parametrize("template,runs", [
    (DEFAULT_CHAT_TEMPLATE, ["yo<|im_end|>", "4<|im_end|>"]),
    (LLAMA3, ["yo<|eot_id|>", "4<|eot_id|>"]),
    (LLAMA2, [" yo </s>", " 4 </s>"]),
    (REWRITING, ["yo<|im_end|>", "4<|im_end|>"]),
], ids=["chatml", "llama3", "llama2", "rewriting"])
def test_multi_turn_templates(template, runs):
    tok = CharTok(template)
    msgs = CONV if template != LLAMA2 else CONV[1:]
    ids, mask = encode_example({"messages": msgs}, tok)
    assert ids == tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=False))
    x, y = tokenize_example({"messages": msgs}, tok, 512)
    check_alignment(ids, mask, x, y)
    assert trained_runs(tok, x, y) == runs


def test_bos_not_doubled():
    """Chat samples are the ids apply_chat_template gives at inference (BOS only where the
    template renders it); a plain prompt gets the tokenizer's BOS, as generate.py --prompt."""
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    tok = CharTok(LLAMA3, add_bos=True)  # the template renders bos_token itself
    ids, _ = encode_example({"messages": msgs}, tok)
    assert ids[0] == 1 and ids[1] == 6
    tok = CharTok(DEFAULT_CHAT_TEMPLATE, add_bos=True)  # it does not: no BOS, as at inference
    ids, mask = encode_example({"messages": msgs}, tok)
    assert ids == tok.apply_chat_template(msgs, add_generation_prompt=False, tokenize=True)
    assert 1 not in ids
    tok = CharTok(None, add_bos=True)
    ids, _ = encode_example({"prompt": "a", "completion": "b"}, tok)
    assert ids == [1, 10 + ord("a"), 10 + ord("b"), 2]


def test_plain_completion_exact():
    tok = CharTok(None, add_bos=True)
    x, y = tokenize_example({"prompt": "ab", "completion": "c"}, tok, 16)
    a, b, c = (10 + ord(ch) for ch in "abc")
    assert x == [1, a, b, c] and y == [IGNORE, IGNORE, c, 2]


def test_instruction_alpaca_and_chat():
    plain = CharTok(None)
    ex = {"instruction": "Add.", "input": "2 2", "output": "4"}
    ids, mask = encode_example(ex, plain)
    prompt = ("Below is an instruction that describes a task, paired with an input that provides "
              "further context. Write a response that appropriately completes the request.\n\n"
              "### Instruction:\nAdd.\n\n### Input:\n2 2\n\n### Response:\n")
    assert plain.decode(ids) == prompt + "4</s>"
    assert [plain.decode([i]) for i, m in zip(ids, mask) if m] == ["4", "</s>"]
    ids, _ = encode_example({"instruction": "Add.", "output": "4"}, plain)
    assert "### Input" not in plain.decode(ids)
    # With a chat template: a user/assistant conversation (input after a blank line).
    chat = CharTok(DEFAULT_CHAT_TEMPLATE)
    as_chat = encode_example({"messages": [{"role": "user", "content": "Add.\n\n2 2"},
                                           {"role": "assistant", "content": "4"}]}, chat)
    assert encode_example(ex, chat) == as_chat
    assert encode_example({"prompt": "Add.\n\n2 2", "completion": "4"}, chat) == as_chat
    # Named templates without a "default" (only "tool_use"): not silently the plain format
    named = _byte_bpe(None)
    named.chat_templates = {"tool_use": DEFAULT_CHAT_TEMPLATE}
    with pytest.raises(ValueError, match="no default"):
        encode_example(ex, named)


def _byte_bpe(template, specials=("<|im_start|>", "<|im_end|>", "<|endoftext|>"),
              bos="<|endoftext|>", eos="<|endoftext|>"):
    """A small real byte-level BPE (GPT-2's pre-tokenizer) with special tokens and a few merges."""
    from tokenizer.bpe import ByteLevelBPETokenizer, bytes_to_unicode
    vocab = {ch: i for i, ch in enumerate(sorted(bytes_to_unicode().values()))}
    merges = []
    for a, b in [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "s"), ("a", "s"), ("as", "s"),
                 ("ass", "is"), ("Ċ", "Ċ"), ("o", "u"), ("y", "ou"), ("Ġ", "Ġ")]:
        merges.append(f"{a} {b}")
        vocab[a + b] = len(vocab)
    n = len(vocab)
    added = [{"id": n + k, "content": s, "special": True} for k, s in enumerate(specials)]
    return ByteLevelBPETokenizer(vocab, merges, added_tokens=added, bos_id=n + specials.index(bos),
                                 eos_id=n + specials.index(eos), chat_template=template)


def _hf_fast(tok):
    """The same tokenizer as transformers' PreTrainedTokenizerFast."""
    transformers = pytest.importorskip("transformers")
    hf_tokenizers = pytest.importorskip("tokenizers")
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=hf_tokenizers.Tokenizer.from_str(json.dumps(tok.to_tokenizer_json())),
        bos_token=tok.id_to_token(tok.bos_id), eos_token=tok.id_to_token(tok.eos_id))


# ChatML with transformers' {% generation %} tags around what the model must produce.
CHATML_GEN = ("{% for m in messages %}{% if m['role'] == 'assistant' %}"
              "{{ '<|im_start|>assistant\n' }}{% generation %}{{ m['content'] + '<|im_end|>' }}"
              "{% endgeneration %}{{ '\n' }}{% else %}"
              "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_mask_matches_transformers_assistant_mask():
    """Our trained tokens == transformers' return_assistant_tokens_mask on a real BPE."""
    transformers = pytest.importorskip("transformers")
    hf_tokenizers = pytest.importorskip("tokenizers")
    tok = _byte_bpe(CHATML_GEN)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=hf_tokenizers.Tokenizer.from_str(json.dumps(tok.to_tokenizer_json())),
        eos_token="<|endoftext|>")
    fast.chat_template = CHATML_GEN
    convs = [CONV, [{"role": "user", "content": "is the sea blue?"},
                    {"role": "assistant", "content": "Yes, the sea is blue.\n\nYou see?"},
                    {"role": "user", "content": "thanks"}]]
    for msgs in convs:
        ids, mask = encode_example({"messages": msgs}, tok)
        ref = fast.apply_chat_template(msgs, tokenize=True, return_dict=True,
                                       return_assistant_tokens_mask=True)
        assert ids == list(ref["input_ids"])
        assert [int(m) for m in mask] == list(ref["assistant_masks"])
        assert sum(mask) > 3


# The same text, with transformers' {% generation %} tags around what the model must produce
# (the assistant branches rewritten so that the tags can enclose it).
QWEN25_GEN = (QWEN25[:QWEN25.index("{%- for message in messages %}")] + r"""{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>assistant\n' }}{% generation %}
        {%- if message.content %}{{- message.content }}{%- endif %}
        {%- for tool_call in message.tool_calls or [] %}
            {%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
            {%- if message.content or not loop.first %}{{- '\n' }}{%- endif %}
            {{- '<tool_call>\n{"name": "' + tool_call.name + '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}{{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>' }}{% endgeneration %}{{- '\n' }}
""" + QWEN25[QWEN25.index('''    {%- elif message.role == "tool" %}'''):])
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string"}}}}}
TOOL_CONVS = [  # (messages, tools): a call without content, with content, two calls, string args
    ([{"role": "user", "content": "weather in Paris?"},
      {"role": "assistant", "tool_calls": [{"type": "function", "function": {
          "name": "get_weather", "arguments": {"city": "Paris"}}}]},
      {"role": "tool", "content": "sunny, 21C"},
      {"role": "assistant", "content": "It is sunny in Paris."}], [WEATHER]),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Rome and Oslo?"},
      {"role": "assistant", "content": "Checking.", "tool_calls": [
          {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}},
          {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
      {"role": "tool", "content": "hot"}, {"role": "tool", "content": "cold"},
      {"role": "assistant", "content": "Rome is hot, Oslo cold."}], [WEATHER]),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "ping", "arguments": {}}}]},
      {"role": "tool", "content": "pong"}, {"role": "assistant", "content": "pong!"}], None),
]


def test_tool_use_mask_matches_transformers_assistant_mask():
    """Chat samples with tool calls and results (OpenAI format, plus `tools`): the ids are
    apply_chat_template(messages, tools=...)'s under Qwen2.5's template, and the trained tokens
    are transformers' assistant mask (the tool-call turns included, the tool results not)."""
    transformers = pytest.importorskip("transformers")
    hf_tokenizers = pytest.importorskip("tokenizers")
    tok = _byte_bpe(QWEN25)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=hf_tokenizers.Tokenizer.from_str(json.dumps(tok.to_tokenizer_json())),
        eos_token="<|endoftext|>")
    for msgs, tools in TOOL_CONVS:
        row = {"messages": msgs, **({"tools": tools} if tools else {})}
        ids, mask = encode_example(row, tok)
        text = fast.apply_chat_template(msgs, tools=tools, tokenize=False, chat_template=QWEN25)
        assert fast.apply_chat_template(msgs, tools=tools, tokenize=False,
                                        chat_template=QWEN25_GEN) == text
        ref = fast.apply_chat_template(msgs, tools=tools, tokenize=True, return_dict=True,
                                       return_assistant_tokens_mask=True, chat_template=QWEN25_GEN)
        assert ids == list(ref["input_ids"]) == tok.encode(text, add_bos=False)
        assert [int(m) for m in mask] == list(ref["assistant_masks"])
        trained = tok.decode([i for i, m in zip(ids, mask) if m])
        assert trained.count("<tool_call>") == sum(len(m.get("tool_calls") or ()) for m in msgs)
        assert "<tool_response>" not in trained and "user" not in trained
    text = tok.decode(encode_example({"messages": TOOL_CONVS[1][0]}, tok)[0])
    assert ('Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n'
            '</tool_call>\n<tool_call>') in text


def test_tool_use_the_template_cannot_render_is_a_line_error(tmp_path):
    """Under ChatML (no tool support) a content-less tool call fails to render, an empty-content
    one would train as an empty answer, `tools` would be dropped: each is a FILE:LINE error, or
    skipped with on_error="skip". Malformed tool calls are refused when the file is read."""
    msgs, tools = TOOL_CONVS[0]
    ok = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    empty = [msgs[0], {**msgs[1], "content": ""}, *msgs[2:]]
    cases = [({"messages": msgs}, "no attribute 'content'.*may not support tool calls"),
             ({"messages": empty}, "does not render the tool calls of assistant message 1"),
             ({**ok, "tools": tools}, "ignores the sample's 'tools'")]
    tok = CharTok(DEFAULT_CHAT_TEMPLATE)
    for k, (row, why) in enumerate(cases):
        path = _write(tmp_path, f"t{k}.jsonl", [ok, ok, row, ok])
        with pytest.raises(ValueError, match=rf"t{k}\.jsonl:3: .*{why}"):
            load_sft(path, tok, 64)
        warnings = []
        train, val, rep = load_sft(path, tok, 64, on_error="skip", warn=warnings.append)
        assert rep["skipped_lines"] == [3] and len(train) + len(val) == 3 and len(warnings) == 1
    # A template that renders tool calls but drops the results; one that escapes them (as
    # Llama 3.1's tojson does) renders them.
    tool_tpl = ("{%- for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
                "{%- if m['role'] == 'tool' %}{{ RESULT }}{% else %}{{ m['content'] or '' }}{% endif %}"
                "{%- for c in m['tool_calls'] or [] %}{{ '<call>' + c['function']['name'] + '</call>' }}"
                "{%- endfor %}{{ '<|im_end|>\n' }}{% endfor %}"
                "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    quoted = [*msgs[:2], {"role": "tool", "content": 'said "hi"\nbye'}, msgs[3]]
    with pytest.raises(ValueError, match=r"t\.jsonl:1: the chat template does not render the 'tool'"):
        load_sft(_write(tmp_path, "t.jsonl", [{"messages": quoted}, ok]),
                 CharTok(tool_tpl.replace("RESULT", "''")), 64)
    tok = CharTok(tool_tpl.replace("RESULT", "m['content'] | tojson"))
    x, y = tokenize_example({"messages": quoted}, tok, 128)
    assert '"said \\"hi\\"\\nbye"' in tok.decode(x)
    assert trained_runs(tok, x, y) == ["<call>get_weather</call><|im_end|>",
                                       "It is sunny in Paris.<|im_end|>"]
    call = msgs[1]["tool_calls"][0]
    bad = [({**ok, "tools": {"name": "f"}}, "'tools' must be a list"),
           ({"messages": [msgs[0], {"role": "assistant", "tool_calls": {"name": "f"}}]},
            r"\['tool_calls'\] must be a list of tool calls"),
           ({"messages": [msgs[0], {"role": "assistant", "tool_calls": []}]},  # no call: content
            r"\[1\] has no string 'content'"),
           ({"messages": [msgs[0], {"role": "assistant", "tool_calls": [{"function": {}}]}]},
            r"\[0\] has no 'function' with a string 'name'"),
           ({"messages": [msgs[0], {"role": "assistant", "tool_calls": [
               {"function": {"name": "f", "arguments": 3}}]}]}, "'arguments' must be"),
           ({"messages": [msgs[0], {"role": "assistant", "content": 1, "tool_calls": [call]}]},
            r"\[1\]'s 'content' must be a string"),
           ({"messages": [msgs[0], msgs[1], {"role": "tool"}, msgs[3]]},
            r"\[2\] has no string 'content'")]
    for k, (row, why) in enumerate(bad):
        with pytest.raises(ValueError, match=rf"b{k}\.jsonl:2: .*{why}"):
            load_examples(_write(tmp_path, f"b{k}.jsonl", [ok, row]))


# Meta-Llama-3-8B-Instruct's chat template, and the same text with {% generation %} tags.
LLAMA3_INSTRUCT = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA3_GEN = (
    "{% for message in messages %}{% if loop.index0 == 0 %}{{ bos_token }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}{% else %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# Mistral-7B-Instruct-v0.3's form: no generation prompt, so the assistant's output is everything
# after "[/INST]": ' ' + content + eos (the tags enclose the space the model generates).
MISTRAL_V03 = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.last and system_message is defined %}
            {{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}
        {%- else %}
            {{- '[INST] ' + message['content'] + '[/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""
MISTRAL_GEN = MISTRAL_V03.replace("{{- ' ' + message['content'] + eos_token}}",
                                  "{% generation %}{{- ' ' + message['content'] + eos_token}}{% endgeneration %}")
CHATML = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
TEMPLATES_WITH_GEN = {  # name: (template, the same with generation tags, specials, bos, eos, end of turn)
    "chatml": (DEFAULT_CHAT_TEMPLATE, CHATML_GEN, CHATML, "<|endoftext|>", "<|endoftext|>", "<|im_end|>"),
    "qwen2.5": (QWEN25, QWEN25_GEN, CHATML, "<|endoftext|>", "<|endoftext|>", "<|im_end|>"),
    "llama3": (LLAMA3_INSTRUCT, LLAMA3_GEN, ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                             "<|end_header_id|>", "<|eot_id|>"),
               "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"),
    "mistral": (MISTRAL_V03, MISTRAL_GEN, ("<s>", "</s>", "[INST]", "[/INST]"), "<s>", "</s>", "</s>"),
}
MULTI_TURN = [
    CONV,
    # untrimmed content; an answer that also occurs in its question
    [{"role": "user", "content": "is the sea blue?"},
     {"role": "assistant", "content": " Yes, the sea is blue.\n\nYou see? "},
     {"role": "user", "content": "say you"}, {"role": "assistant", "content": "you"},
     {"role": "user", "content": "thanks"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
     {"role": "assistant", "content": "the"}, {"role": "user", "content": "b"},
     {"role": "assistant", "content": "the"}, {"role": "user", "content": "c"},
     {"role": "assistant", "content": "is the"}],
]


@pytest.mark.parametrize("name", list(TEMPLATES_WITH_GEN))
def test_multi_turn_mask_matches_transformers_on_real_templates(name):
    """Every assistant turn of a multi-turn conversation is trained with its end-of-turn token,
    never the generation prompt or the other turns: our mask == transformers'
    return_assistant_tokens_mask under ChatML, Qwen2.5, Llama 3 and Mistral templates
    (rewritten with {% generation %} tags, rendering the same text) on a byte-level BPE."""
    template, gen, specials, bos, eos, eot = TEMPLATES_WITH_GEN[name]
    tok = _byte_bpe(template, specials, bos, eos)
    fast = _hf_fast(tok)
    for msgs in MULTI_TURN:
        if name == "mistral" and msgs[0]["role"] == "system":
            msgs = msgs[1:]  # its template drops the system message unless the last turn is the user's
        ids, mask = encode_example({"messages": msgs}, tok)
        text = fast.apply_chat_template(msgs, tokenize=False, chat_template=template)
        assert fast.apply_chat_template(msgs, tokenize=False, chat_template=gen) == text
        ref = fast.apply_chat_template(msgs, tokenize=True, return_dict=True, chat_template=gen,
                                       return_assistant_tokens_mask=True)
        assert ids == list(ref["input_ids"]) == tok.encode(text, add_bos=False)
        assert [int(m) for m in mask] == list(ref["assistant_masks"]), name
        trained = tok.decode([i for i, m in zip(ids, mask) if m])
        n_assistant = sum(m["role"] == "assistant" for m in msgs)
        assert trained.count(eot) == n_assistant and "assistant" not in trained
        assert trained.replace(eot, "").replace(" ", "") == "".join(
            m["content"].strip().replace(" ", "") for m in msgs if m["role"] == "assistant")


def test_prompt_whitespace_before_the_response_is_not_trained():
    """GPT-2's pre-tokenizer (SmolLM2's) splits a prompt's trailing "\\n\\n" or "  " otherwise
    in front of the response ("\\n", "\\n" / " ", " the") than on its own ("\\n\\n" / "  "):
    those whole tokens are the prompt's and stay untrained; a token holding response text is
    trained. Checked against transformers' offsets: trained = the tokens ending past the prompt."""
    tok = _byte_bpe(None)
    fast = _hf_fast(tok)
    eos = "<|endoftext|>"
    for prompt, completion, trained in [("Q?\n\n", "the", "the"), ("A:  ", "the", " the"),
                                        ("Q?\n", "\nthe", "\nthe"), ("say t", "he", " the")]:
        ids, mask = encode_example({"prompt": prompt, "completion": completion}, tok)
        ref = fast(prompt + completion, return_offsets_mapping=True)
        assert ids == ref["input_ids"] + [tok.eos_id]
        assert tok.decode([i for i, m in zip(ids, mask) if m]) == trained + eos, prompt
        assert mask == [e > len(prompt) for _, e in ref["offset_mapping"]] + [True]
    # the same boundary in a chat: the Llama 3 generation prompt ends in "\n\n"
    tok = _byte_bpe(LLAMA3_INSTRUCT, *TEMPLATES_WITH_GEN["llama3"][2:5])
    x, y = tokenize_example({"messages": CONV}, tok, 256)
    assert trained_runs(tok, x, y) == ["yo<|eot_id|>", "4<|eot_id|>"]


def test_boundary_inside_a_token():
    """A token straddling the prompt/response boundary is trained (it holds response text)."""
    tok = _byte_bpe(None)
    ids, mask = encode_example({"prompt": "say t", "completion": "he"}, tok)
    assert ids == tok.encode("say the") + [tok.eos_id]  # whole-text encoding: "Ġthe" is one token
    assert [tok.decode([i]) for i, m in zip(ids, mask) if m] == [" the", "<|endoftext|>"]
    ids, mask = encode_example({"prompt": "say", "completion": " the"}, tok)
    assert [tok.decode([i]) for i, m in zip(ids, mask) if m] == [" the", "<|endoftext|>"]


@pytest.fixture(scope="module")
def smol():
    from demo_assets import fetch_smollm2_gguf
    from tokenizer import from_gguf_metadata, read_gguf_tokenizer_fields
    try:
        path = fetch_smollm2_gguf()
    except RuntimeError as e:
        pytest.skip(f"SmolLM2 tokenizer unavailable: {e}")
    return from_gguf_metadata(read_gguf_tokenizer_fields(path))


def test_smollm2_real_template(smol):
    x, y = tokenize_example({"messages": CONV}, smol, 256)
    assert trained_runs(smol, x, y) == ["yo<|im_end|>", "4<|im_end|>"]
    full = smol.apply_chat_template(CONV, add_generation_prompt=False, tokenize=True)
    assert full == x + smol.encode("<|im_end|>\n")  # the trailing "\n" is never a target
    # The prompt tokens are exactly what generation gets for the same history.
    gen_prompt = smol.apply_chat_template(CONV[:2], add_generation_prompt=True, tokenize=True)
    first = next(t for t, v in enumerate(y) if v != IGNORE)
    assert x[:first + 1] == gen_prompt
    # Instruction data renders through the template (SmolLM2 adds its default system prompt).
    x2, y2 = tokenize_example({"instruction": "Say hi.", "output": "Hi!"}, smol, 256)
    assert "You are a helpful AI assistant" in smol.decode(x2)
    assert trained_runs(smol, x2, y2) == ["Hi!<|im_end|>"]


# ---------------------------------------------------------------------------------------------
# Truncation, datasets, batches
# ---------------------------------------------------------------------------------------------
def test_truncation_and_dropped():
    tok = CharTok(None)
    exs = [Example("completion", {"prompt": "ab", "completion": "cd"}, 1),    # 5 tokens
           Example("completion", {"prompt": "ab", "completion": "cde"}, 2),   # 6 tokens
           Example("completion", {"prompt": "abcdefg", "completion": "h"}, 3)]  # prompt > seq_len
    ds = SFTDataset.from_examples(exs, tok, seq_len=4)
    assert ds.report["n_truncated"] == 2 and ds.report["n_dropped"] == 1
    assert ds.report["dropped_lines"] == [3]
    assert len(ds) == 2
    (x0, y0), (x1, y1) = ds.samples
    assert len(x0) == 4 and len(x1) == 4  # seq_len + 1 tokens fill seq_len positions exactly
    assert tok.decode(x1) == "abcd" and y1[-1] == 10 + ord("e")  # kept the start
    assert ds.report["n_tokens"] == 8 and ds.report["n_loss_tokens"] == 3 + 3  # c d EOS; c d e
    # Untrained context after the last response is dropped, so it never counts as truncation.
    chat = CharTok(DEFAULT_CHAT_TEMPLATE)
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
            {"role": "user", "content": "x" * 100}]
    ds = SFTDataset.from_examples([{"messages": msgs}], chat, seq_len=30)
    # 9 tokens for the user turn, 13 for "<|im_start|>assistant\na<|im_end|>": 22 - 1 inputs.
    assert ds.report["n_truncated"] == 0 and len(ds.samples[0][0]) == 21


def _tiny_model():
    torch.manual_seed(0)
    return Transformer(preset("tiny")).eval()


def _dataset(n=7, seq_len=24):
    tok = CharTok(DEFAULT_CHAT_TEMPLATE)
    exs, words = [], ["a", "bb", "ccc dd", "e", "ffff gg h", "ij", "k l m n"]
    for i in range(n):
        w = words[i % len(words)]
        exs.append({"messages": [{"role": "user", "content": w[:2]}, {"role": "assistant", "content": w}]})
    return SFTDataset.from_examples(exs, tok, seq_len), tok


def test_packed_loss_equals_separate_rows():
    ds, tok = _dataset(seq_len=48)
    model = _tiny_model()
    rows = ds.rows(list(range(len(ds))), pack=True)
    assert any(len(r) > 1 for r in rows) and sorted(i for r in rows for i in r) == list(range(len(ds)))
    batch = ds.collate(rows, pack=True)
    assert batch.input_ids.shape[1] <= ds.seq_len
    with torch.no_grad():
        packed = model(batch.input_ids, **batch.model_kwargs()).item()
        padded_b = ds.collate([[i] for i in range(len(ds))], pack=False)
        padded = model(padded_b.input_ids, **padded_b.model_kwargs()).item()
        total, count = 0.0, 0
        for x, y in ds.samples:
            n = sum(t != IGNORE for t in y)
            total += model(torch.tensor([x]), labels=torch.tensor([y])).item() * n
            count += n
    ref = total / count
    ev = response_loss(model, ds, batch_size=3)  # uneven batches, still token-weighted
    assert ev["n_tokens"] == count and abs(ev["loss"] - ref) < 1e-5
    print(f"packed {packed:.7f} padded {padded:.7f} separate {ref:.7f}")
    assert abs(packed - ref) < 1e-5 and abs(padded - ref) < 1e-5
    # Without doc_ids the rows would attend across samples: a different loss.
    with torch.no_grad():
        leaky = model(batch.input_ids, labels=batch.labels).item()
    assert abs(leaky - ref) > 1e-4


def test_packed_loss_per_example_equals_unpacked():
    """Each sample's own mean loss inside a packed row (per-token losses, reduction="none") is
    its loss alone: attention stays within the sample (doc_ids), positions restart at 0 and no
    label reaches into the next sample."""
    ds, tok = _dataset(n=7, seq_len=48)
    model = _tiny_model()
    rows = ds.rows(list(range(len(ds))), pack=True)
    assert max(len(r) for r in rows) >= 2
    b = ds.collate(rows, pack=True)
    packed, alone = [], []
    with torch.no_grad():
        nll = model(b.input_ids, **b.model_kwargs(), reduction="none")  # (B, T)
        for r, row in enumerate(rows):
            t = 0
            for d, i in enumerate(row):
                x, y = ds.samples[i]
                n = len(x)
                assert b.doc_ids[r, t:t + n].eq(d).all()
                assert b.position_ids[r, t:t + n].tolist() == list(range(n))
                assert b.labels[r, t:t + n].tolist() == y
                keep = b.labels[r, t:t + n] != IGNORE
                packed.append(nll[r, t:t + n][keep].mean())
                alone.append(model(torch.tensor([x]), labels=torch.tensor([y])))
                t += n
            assert b.labels[r, t:].eq(IGNORE).all()  # padding: no loss
    assert len(packed) == len(ds)
    torch.testing.assert_close(torch.stack(packed), torch.stack(alone), rtol=1e-5, atol=1e-5)


def test_batch_layout():
    ds, tok = _dataset(n=3, seq_len=48)
    b = ds.collate([[0, 1], [2]], pack=True)
    n0, n1, n2 = (len(ds.samples[i][0]) for i in range(3))
    T = max(n0 + n1, n2)
    assert b.input_ids.shape == (2, T)
    assert b.doc_ids[0].tolist() == [0] * n0 + [1] * n1 + [2] * (T - n0 - n1)
    assert b.position_ids[0].tolist() == list(range(n0)) + list(range(n1)) + list(range(T - n0 - n1))
    assert b.labels[1, n2:].eq(IGNORE).all() and b.input_ids[1, n2:].eq(2).all()  # pad = eos
    u = ds.collate([[0], [1]], pack=False)
    assert u.doc_ids is None and u.position_ids is None and u.input_ids.shape == (2, max(n0, n1))


def test_shuffle_deterministic_and_resume():
    ds, _ = _dataset(n=7)
    one = [b.input_ids for b in ds.batches(3, torch.Generator().manual_seed(5))]
    two = [b.input_ids for b in ds.batches(3, torch.Generator().manual_seed(5))]
    assert len(one) == 3 and all(torch.equal(a, b) for a, b in zip(one, two))
    for pack in (False, True):
        gen = torch.Generator().manual_seed(1)
        stream = BatchStream(ds, 2, gen, pack=pack)
        ref = [next(stream) for _ in range(9)]  # crosses epoch boundaries
        gen = torch.Generator().manual_seed(1)
        stream = BatchStream(ds, 2, gen, pack=pack)
        for _ in range(5):
            next(stream)
        state, rng = json.loads(json.dumps(stream.state_dict())), gen.get_state()
        gen2 = torch.Generator()
        gen2.set_state(rng)
        resumed = BatchStream(ds, 2, gen2, pack=pack)
        resumed.load_state_dict(state)
        rest = [next(resumed) for _ in range(4)]
        for a, b in zip(ref[5:], rest):
            assert all(torch.equal(u, v) for u, v in zip(a, b) if u is not None)
        assert resumed.epoch >= 1


def test_split_deterministic(tmp_path):
    tr, va = split_indices(20, 0.1)
    assert (tr, va) == split_indices(20, 0.1) and len(va) == 2 and sorted(tr + va) == list(range(20))
    assert split_indices(20, 0.1, seed=1) != (tr, va)
    with pytest.raises(ValueError, match="too few"):
        split_indices(1, 0.1)
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"q{i} ", "completion": f"a{i}"}) for i in range(20)))
    vpath = tmp_path / "v.jsonl"
    vpath.write_text(json.dumps({"prompt": "q", "completion": "a"}) + "\n")
    tok = CharTok(None)
    train, val, rep = load_sft(str(path), tok, 32, val_fraction=0.25)
    assert (rep["n_train"], rep["n_val"], rep["n_examples"]) == (15, 5, 20)
    assert rep["format"] == "completion" and rep["n_skipped"] == 0
    assert rep["n_loss_tokens"] == sum(len(f"a{i}") + 1 for i in range(20))
    train, val, rep = load_sft(str(path), tok, 32, val_path=str(vpath))
    assert (len(train), len(val), rep["n_examples"]) == (20, 1, 21)
    assert "20 train / 1 val" in format_report(rep)


# ---------------------------------------------------------------------------------------------
# Malformed input
# ---------------------------------------------------------------------------------------------
def _write(tmp_path, name, lines):
    p = tmp_path / name
    p.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    return str(p)


def test_detect_format(tmp_path):
    assert detect_format(_write(tmp_path, "a.jsonl", ["{bad", {"messages": []}])) == "chat"
    assert detect_format(_write(tmp_path, "b.jsonl", [{"instruction": "x", "output": "y"}])) == "instruction"
    assert detect_format(_write(tmp_path, "c.jsonl", [{"prompt": "x", "completion": "y"}])) == "completion"
    assert detect_format(_write(tmp_path, "d.jsonl", [{"prompt": "x", "chosen": "y", "rejected": "z"}])) == "preference"
    assert detect_format(_write(tmp_path, "e.jsonl", [{"text": "x"}])) == "text"
    assert detect_format(_write(tmp_path, "f.txt", ["hello"])) == "text"
    with pytest.raises(ValueError, match=r"f\.jsonl:1: cannot tell the data format"):
        detect_format(_write(tmp_path, "f.jsonl", [{"foo": 1}]))
    with pytest.raises(ValueError, match="not instruction/completion/chat JSONL: preference"):
        load_examples(str(tmp_path / "d.jsonl"))
    with pytest.raises(ValueError, match="JSON array"):
        detect_format(_write(tmp_path, "g.json", ['[{"prompt": "x", "completion": "y"}]']))


def test_records_not_text(tmp_path):
    """What a text corpus reader asks before reading: the first JSONL file (the corpus, or one
    in its directory, sorted) holding SFT or preference records; None for text, and for files
    whose form cannot be told (the reader names their bad line)."""
    from engine.sft import records_name, records_not_text
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    text = _write(d, "a.jsonl", [{"text": "x"}])
    _write(d, "b.txt", ['{"messages": []}'])  # plain text, whatever it reads
    _write(d, "c.jsonl", [{"foo": 1}])
    _write(d, "d.json", ["{bad", "[1]"])
    assert records_not_text(text) is None and records_not_text(str(d)) is None
    pair = _write(d / "sub", "p.jsonl", [{"prompt": "x", "chosen": "y", "rejected": "z"}])
    _write(d / "sub", "q.jsonl", [{"messages": []}])
    assert records_not_text(str(d)) == (pair, "preference")
    chat = _write(tmp_path, "chat.jsonl", ["{bad", {"messages": []}])
    assert records_not_text(chat) == (chat, "chat")
    assert records_name("chat") == "chat (messages) records (SFT data)"
    assert records_name("completion") == "prompt/completion records (SFT data)"
    assert records_name("preference") == "preference (prompt/chosen/rejected) records (DPO data)"


BAD_CHAT = [
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, None),
    ('{"messages": [', "invalid JSON"),
    ({"messages": [{"role": "user", "content": "q"}]}, "chat sample has no assistant turn"),
    ({"messages": []}, "'messages' is empty"),
    ({"messages": [{"role": "user"}]}, r"'messages'\[0\] has no string 'content'"),
    ({"messages": [{"role": "assistant", "content": 3}]}, r"'messages'\[0\] has no string 'content'"),
    ({"messages": "hi"}, "'messages' must be a list"),
    ({"prompt": "q", "completion": "a"}, r"a prompt/completion record in a file of chat "
                                         r"\(messages\) records \(its form, from line 1\); one file holds one form"),
    ({"role": "user", "content": "q"}, "no 'messages' field"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " \n"}]},
     r"'messages'\[1\] is an empty assistant turn"),
    ({"messages": [{"role": "human", "content": "q"}, {"role": "assistant", "content": "a"}]},
     r"'messages'\[0\] has unknown role 'human' \(expected one of system, developer, user, "
     r"assistant, tool, ipython\)$"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "Assistant", "content": "a"}]},
     r"'messages'\[1\] has unknown role 'Assistant'"),
    ([1, 2], "expected a JSON object, got list"),
]


def test_malformed_chat_lines_stop_and_skip(tmp_path):
    lines = [l for l, _ in BAD_CHAT] + ["", BAD_CHAT[0][0]]  # a blank line is ignored
    path = _write(tmp_path, "chat.jsonl", lines)
    for k, (_, why) in enumerate(BAD_CHAT):
        if why is None:
            continue
        # Each bad line, first in its own file after one good line: stop names it and its number.
        p = _write(tmp_path, f"one{k}.jsonl", [BAD_CHAT[0][0], BAD_CHAT[k][0]])
        with pytest.raises(ValueError, match=rf"one{k}\.jsonl:2: {why}"):
            load_examples(p)
    with pytest.raises(ValueError, match=r"chat\.jsonl:2: invalid JSON \(Expecting value at column 15\)$"):
        load_examples(path)
    # an object cut short: the column is the line's end, not "column 1" of a next line
    p = _write(tmp_path, "cut.jsonl", [BAD_CHAT[0][0], '{"messages": []'])
    with pytest.raises(ValueError, match=r"cut\.jsonl:2: invalid JSON \(Expecting ',' delimiter at column 16\)$"):
        load_examples(p)
    warnings = []
    exs, skipped = load_examples(path, on_error="skip", warn=warnings.append)
    assert skipped == list(range(2, len(BAD_CHAT) + 1)) and len(exs) == 2
    assert [e.line for e in exs] == [1, len(BAD_CHAT) + 2]
    assert len(warnings) == len(skipped) and "chat.jsonl:3: chat sample has no assistant turn" in warnings[1]
    with pytest.raises(ValueError, match="on_error"):
        load_examples(path, on_error="ignore")


def test_malformed_instruction_lines(tmp_path):
    cases = [({"instruction": "i"}, "missing 'output'"),
             ({"instruction": "i", "output": 5}, "'output' must be a string, got int"),
             ({"instruction": "i", "input": ["x"], "output": "o"}, "'input' must be a string"),
             ({"instruction": " ", "output": "o"}, "empty 'instruction'"),
             ({"instruction": "i", "output": ""}, "empty 'output'")]
    for k, (obj, why) in enumerate(cases):
        p = _write(tmp_path, f"i{k}.jsonl", [{"instruction": "i", "input": None, "output": "o"}, obj])
        with pytest.raises(ValueError, match=rf"i{k}\.jsonl:2: {why}"):
            load_examples(p)
    p = _write(tmp_path, "c.jsonl", [{"prompt": "", "completion": "o"}, {"prompt": "p"}])
    with pytest.raises(ValueError, match=r"c\.jsonl:2: missing 'completion'"):
        load_examples(p)
    p = _write(tmp_path, "bad.jsonl", ["{nope", "[]"])
    with pytest.raises(ValueError, match="no valid JSON object lines"):
        load_examples(p)
    (tmp_path / "u.jsonl").write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff"}\n')
    with pytest.raises(ValueError, match=r"u\.jsonl:2: invalid UTF-8"):
        load_examples(str(tmp_path / "u.jsonl"))
    with pytest.raises(FileNotFoundError):
        load_examples(str(tmp_path / "missing.jsonl"))


# A template that refuses some conversations (as Gemma's and Llama 2's raise_exception does).
NO_SYSTEM = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
             "supported') }}{% endif %}" + DEFAULT_CHAT_TEMPLATE)


def test_sample_the_template_rejects_names_its_line_and_can_be_skipped(tmp_path):
    tok = CharTok(NO_SYSTEM)
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
            for i in range(5)]
    rows[3] = {"messages": [{"role": "system", "content": "s"}, *rows[3]["messages"]]}
    path = _write(tmp_path, "c.jsonl", rows)
    with pytest.raises(ValueError, match=r"c\.jsonl:4: chat template failed to render: System role"):
        load_sft(path, tok, 64)
    warnings = []
    train, val, rep = load_sft(path, tok, 64, on_error="skip", warn=warnings.append)
    assert len(train) + len(val) == 4 and rep["skipped_lines"] == [4] and rep["n_skipped"] == 1
    assert warnings == ["warning: skipping " + path + ":4: chat template failed to render: System "
                        "role not supported"]
    assert "1 malformed line(s) skipped (4)" in format_report(rep)


# ---------------------------------------------------------------------------------------------
# Preferences (DPO data)
# ---------------------------------------------------------------------------------------------
def test_preferences_load_and_errors(tmp_path):
    good = [{"prompt": "2+2=", "chosen": "4", "rejected": "5"},
            {"prompt": [{"role": "user", "content": "hi"}],
             "chosen": [{"role": "assistant", "content": "hello"}], "rejected": "go away"}]
    pairs, skipped = load_preferences(_write(tmp_path, "p.jsonl", good))
    assert skipped == [] and not pairs[0].conversational and pairs[1].conversational
    assert pairs[1].rejected == [{"role": "assistant", "content": "go away"}]
    cases = [({"prompt": "p", "chosen": "same", "rejected": "same"}, "'chosen' and 'rejected' are identical"),
             ({"prompt": "", "chosen": "a", "rejected": "b"}, "empty 'prompt'"),
             ({"prompt": "p", "chosen": "  ", "rejected": "b"}, "empty 'chosen'"),
             ({"prompt": "p", "chosen": "a"}, "missing 'rejected'"),
             ({"prompt": "p", "chosen": 1, "rejected": "b"}, "'chosen' must be a string or a list"),
             ({"prompt": "p", "chosen": [], "rejected": "b"}, "'chosen' is empty"),
             ({"prompt": "p", "chosen": [{"role": "user", "content": "x"}], "rejected": "b"},
              "'chosen' has no assistant message")]
    for k, (obj, why) in enumerate(cases):
        p = _write(tmp_path, f"p{k}.jsonl", [good[0], obj])
        with pytest.raises(ValueError, match=rf"p{k}\.jsonl:2: {why}"):
            load_preferences(p)
    p = _write(tmp_path, "mixed.jsonl", [good[0]] + [c for c, _ in cases] + [good[1]])
    pairs, skipped = load_preferences(p, on_error="skip")
    assert [q.line for q in pairs] == [1, len(cases) + 2] and skipped == list(range(2, len(cases) + 2))


def test_tokenize_pair_masks():
    tok = CharTok(None, add_bos=True)
    tp = tokenize_pair({"prompt": "Q:", "chosen": "yes", "rejected": "no"}, tok, 32)
    assert tok.decode(tp.chosen_ids) == "<s>Q:yes" and tok.decode(tp.rejected_ids) == "<s>Q:no"
    assert trained_runs(tok, tp.chosen_ids, tp.chosen_labels) == ["yes</s>"]
    assert trained_runs(tok, tp.rejected_ids, tp.rejected_labels) == ["no</s>"]
    assert not tp.truncated
    # Conversational: the template; an assistant turn inside the prompt is context, not trained.
    chat = CharTok(DEFAULT_CHAT_TEMPLATE)
    prompt = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
              {"role": "user", "content": "c"}]
    tp = tokenize_pair({"prompt": prompt, "chosen": [{"role": "assistant", "content": "good"}],
                        "rejected": "bad"}, chat, 64)
    assert trained_runs(chat, tp.chosen_ids, tp.chosen_labels) == ["good<|im_end|>"]
    assert trained_runs(chat, tp.rejected_ids, tp.rejected_labels) == ["bad<|im_end|>"]
    x, y = collate_pairs([tp, tp], pad_id=0)
    assert x.shape == (4, len(tp.chosen_ids)) and torch.equal(x[0], x[1])
    assert y[2, len(tp.rejected_ids):].eq(IGNORE).all()
    assert tokenize_pair({"prompt": "Q:", "chosen": "yes!!", "rejected": "no"}, tok, 4).truncated
    with pytest.raises(ValueError, match="identical"):
        tokenize_pair({"prompt": "Q", "chosen": "a", "rejected": "a"}, tok, 8)


def test_history_rewriting_template_answer_inside_the_question():
    """When the template rewrites history (the content search is used), an answer that also
    occurs in the question is found after the question, not inside it."""
    tok = CharTok(REWRITING)
    msgs = [{"role": "user", "content": "say ok"}, {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "and no?"}, {"role": "assistant", "content": "no"}]
    ids, mask = encode_example({"messages": msgs}, tok)
    text = tok.decode(ids)
    assert text.endswith("user: say ok<|im_end|>\nassistant: ok<|im_end|>\nuser: and no?<|im_end|>\n"
                         "assistant: no<|im_end|>\n")
    trained = [j for j, m in enumerate(mask) if m]
    # the two answers with their end-of-turn tokens, at their own places
    assert tok.decode([ids[j] for j in trained]) == "ok<|im_end|>no<|im_end|>"
    assert tok.decode(ids[:trained[0]]).endswith("assistant: ")
    assert tok.decode(ids[:trained[3]]).endswith("assistant: ")


def test_a_message_the_template_drops_is_a_line_error(tmp_path):
    """Mistral v0.3's template renders the system prompt only before the LAST user turn (so
    never in a sample ending with the answer), Qwen2.5's skips a "developer" message: the
    sample would silently train without it. One line naming the message, for SFT and DPO
    pairs; skippable. A template that renders the message transformed (tojson) is fine."""
    t = TEMPLATES_WITH_GEN["mistral"]
    mistral = _byte_bpe(t[0], *t[2:5])
    sys_msg = {"role": "system", "content": "Always answer in French."}
    qa = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "bonjour"}]
    with pytest.raises(ValueError, match=r"does not render message 0 \(system\)"):
        encode_example({"messages": [sys_msg, *qa]}, mistral)
    assert encode_example({"messages": qa}, mistral)[0]  # without it: fine
    with pytest.raises(ValueError, match=r"does not render message 0 \(developer\)"):
        encode_example({"messages": [{**sys_msg, "role": "developer"}, *qa]}, _byte_bpe(QWEN25))
    with pytest.raises(ValueError, match=r"does not render message 0 \(system\)"):
        tokenize_pair({"prompt": [sys_msg, qa[0]], "chosen": [qa[1]],
                       "rejected": [{"role": "assistant", "content": "hello"}]}, mistral, 64)
    path = _write(tmp_path, "m.jsonl", [{"messages": qa}, {"messages": [sys_msg, *qa]},
                                         {"messages": qa}])
    with pytest.raises(ValueError, match=r"m\.jsonl:2: the chat template does not render message 0"):
        load_sft(path, mistral, 64)
    _, _, rep = load_sft(path, mistral, 64, on_error="skip", warn=None)
    assert rep["skipped_lines"] == [2]
    quoting = CharTok("{% for m in messages %}{{ m['role'] + ':' }}{{ m['content'] | tojson }}"
                      "{{ '<|im_end|>' }}{% endfor %}")
    x, y = tokenize_example({"messages": [{"role": "user", "content": 'say "x"'},
                                          {"role": "assistant", "content": "x"}]}, quoting, 64)
    assert 'user:"say \\"x\\""' in quoting.decode(x)  # escaped, not dropped: no error


@pytest.mark.parametrize("template", [DEFAULT_CHAT_TEMPLATE, REWRITING], ids=["chatml", "rewriting"])
def test_openai_weight_zero_turns_are_context_only(tmp_path, template):
    """OpenAI's fine-tuning format: an assistant message with "weight": 0 is context, not
    trained (1, or no weight: trained); another weight, or no trained turn left, is a line
    error. The rewriting template locates turns by searching the text: still the right ones."""
    tok = CharTok(template)
    msgs = [dict(m) for m in CONV]
    msgs[2]["weight"] = 0
    x, y = tokenize_example({"messages": msgs}, tok, 512)
    assert trained_runs(tok, x, y) == ["4<|im_end|>"]
    assert x == tokenize_example({"messages": CONV}, tok, 512)[0]  # same text, only the mask
    msgs[4]["weight"] = 1
    assert tokenize_example({"messages": msgs}, tok, 512)[1] == y
    ok = {"messages": CONV}
    for k, (w, why) in enumerate([("1", r"\[4\]'s 'weight' must be 0 or 1"),
                                  (True, r"\[4\]'s 'weight' must be 0 or 1"),
                                  (0, "every assistant turn has 'weight' 0")]):
        bad = [*msgs[:2], {**msgs[2], "content": ""}, msgs[3], {**msgs[4], "weight": w}]
        with pytest.raises(ValueError, match=rf"w{k}\.jsonl:2: .*{why}"):
            load_examples(_write(tmp_path, f"w{k}.jsonl", [ok, {"messages": bad}]))


def test_chat_spans_unlocatable():
    # A template that drops assistant content cannot be trained on: a clear error.
    tok = CharTok("{% for m in messages %}{{ m['role'] }}|{% endfor %}")
    with pytest.raises(ValueError, match="cannot locate assistant message 1"):
        chat_spans(tok, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "zq"}])


def test_grad_accumulation_weights_micro_batches_by_trained_tokens():
    """SFTTask with batch 1 x accumulation 2 takes the same step as batch 2: each micro-batch
    counts by its trained tokens (samples of different lengths), as across ranks."""
    from engine.tasks import SFTTask, _n_real, _n_trained
    ds, _ = _dataset(n=7, seq_len=24)
    grads = []
    for batch, accum in ((2, 1), (1, 2)):
        model = _tiny_model().train()
        task = SFTTask(ds, ds, batch, torch.Generator().manual_seed(0))
        for _ in range(2):  # two optimizer steps' worth of data; gradients of the second
            model.zero_grad()
            task.start_step(accum)
            if accum == 2:  # the case that needs the weighting: 4 vs 2, then 3 vs 2 tokens
                assert len({_n_trained(b) for b in task._queue}) == 2
            total = 0.0
            for _ in range(accum):
                loss = task.train_step(model, None, "cpu") / accum
                loss.backward()
                total += loss.item()
        grads.append((total, [p.grad.clone() for p in model.parameters()]))
    (l1, g1), (l2, g2) = grads
    assert l1 == pytest.approx(l2, abs=1e-6)
    assert max((a - b).abs().max().item() for a, b in zip(g1, g2)) < 1e-6
    # tokens/s counts a batch's real (non-padding) tokens, not only the trained ones
    b = ds.collate([[0], [4]], pack=False)
    assert _n_real(b) == len(ds.samples[0][0]) + len(ds.samples[4][0]) < b.input_ids.numel()
    packed = ds.collate([[0, 1], [4]], pack=True)
    assert _n_real(packed) == sum(len(ds.samples[i][0]) for i in (0, 1, 4))


def test_tokens_per_second_counts_truncated_samples_whole():
    """A chat cut by --seq-len inside a user turn ends in untrained tokens: they are real tokens
    (the model ran them), not padding, for tokens/s, padded or packed, and under SFTTask."""
    from engine.tasks import SFTTask, _n_real
    chat = CharTok(DEFAULT_CHAT_TEMPLATE)
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
            {"role": "user", "content": "x" * 40}, {"role": "assistant", "content": "b"}]
    short = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "yo"}]
    ds = SFTDataset.from_examples([{"messages": msgs}, {"messages": short}], chat, seq_len=30)
    assert ds.report["n_truncated"] == 1
    (x0, y0), (x1, _) = ds.samples
    assert len(x0) == 30 and y0[-1] == IGNORE  # cut inside the second user turn
    last = max(t for t, v in enumerate(y0) if v != IGNORE) + 1
    assert last < 30  # the labels alone would end the row there
    assert _n_real(ds.collate([[0], [1]], pack=False)) == 30 + len(x1)
    assert _n_real(ds.collate([[1, 0]], pack=True)) == len(x1) + 30
    task = SFTTask(ds, ds, 2, torch.Generator().manual_seed(0))
    task.train_step(_tiny_model().train(), None, "cpu")
    assert task.pop_tokens() == 30 + len(x1)


# ---------------------------------------------------------------------------------------------
# Corpus windows (engine/data.py)
# ---------------------------------------------------------------------------------------------
def test_get_batch_draws_every_window_including_the_last():
    """Starts 0..len-seq_len-1 (nanoGPT's bound): the last token is a target, and a split of
    exactly seq_len + 1 tokens (one window, as the error says) trains."""
    import numpy as np
    from engine.data import TokenSplit, check_trainable, get_batch
    split = TokenSplit(np.arange(10, dtype=np.uint16), 20)
    gen = torch.Generator().manual_seed(0)
    starts = set()
    for _ in range(100):
        x, y = get_batch(split, 4, 5, gen)
        assert torch.equal(y, x + 1)
        starts |= set(x[:, 0].tolist())
    assert starts == set(range(5))  # 10 - 5 windows, the last one ending at token 9
    one = TokenSplit(np.arange(6, dtype=np.uint16), 12)
    check_trainable(one, 5, "the training split")
    x, y = get_batch(one, 2, 5, gen)
    assert x[0].tolist() == [0, 1, 2, 3, 4] and y[0].tolist() == [1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="has 5 tokens, fewer than one training window"):
        check_trainable(TokenSplit(np.arange(5, dtype=np.uint16), 10), 5, "the training split")


def test_chunked_corpus_encoding_equals_encoding_the_whole_text():
    """The token cache encodes large corpora in pieces cut at line starts; a cut never falls
    inside a token that spans a newline (".\\n'" and "\\n\\n" below, as SentencePiece and
    byte-level BPE learn them)."""
    from engine.data import _chunk_bounds

    def _encode_chunked(text, tok, chunk_chars):  # the token cache's pieces, encoded and joined
        return [i for s, e in _chunk_bounds(text, tok, chunk_chars) for i in tok.encode(text[s:e])]

    class SpanningTok:  # greedy longest match; two tokens that span a newline
        merges = {".\n'": 300, "\n\n": 301}

        def encode(self, text, add_bos=False):
            ids, i = [], 0
            while i < len(text):
                m = next((m for m in self.merges if text.startswith(m, i)), None)
                ids.append(self.merges[m] if m else ord(text[i]))
                i += len(m) if m else 1
            return ids

    tok = SpanningTok()
    text = "".join(f"line {i}.\n'tis\n\n\nend {i}\n" for i in range(40))
    whole = tok.encode(text)
    assert whole.count(300) == 40 and whole.count(301) == 40
    for chunk in (1, 7, 16, 50):
        assert _encode_chunked(text, tok, chunk_chars=chunk) == whole, chunk


# ---------------------------------------------------------------------------------------------
# train.py: resuming an SFT run checks its data
# ---------------------------------------------------------------------------------------------
def _strip_data_keys(run):
    """Make run/last look like a checkpoint saved before the data keys existed."""
    import os
    path = os.path.join(run, "last", "training_state.pt")
    state = torch.load(path, weights_only=True)
    extra = json.loads(state["extra"])
    del extra["data"]["train_key"], extra["data"]["val_key"]
    state["extra"] = json.dumps(extra)
    torch.save(state, path)


def test_resume_refuses_sft_data_that_changed(tmp_path, monkeypatch):
    """A resumed SFT run on edited data (same number of samples, so the saved order still fits)
    would silently train on other samples: refused, nothing touched; with the data restored it
    continues. A run saved before the key existed still resumes."""
    import os
    import train
    from engine.checkpoint import save_model
    monkeypatch.setenv("WHETSTONE_CACHE", str(tmp_path / "cache"))
    tok = _byte_bpe(DEFAULT_CHAT_TEMPLATE)
    torch.manual_seed(0)
    base = str(tmp_path / "base")
    save_model(Transformer(preset("tiny", vocab_size=tok.vocab_size)), base, tok)
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(12)]
    data = _write(tmp_path, "d.jsonl", rows)
    original = open(data).read()
    run = str(tmp_path / "run")
    flags = ["--base", base, "--finetune", "lora", "--data", data, "--max-steps", "3",
             "--eval-every", "3", "--batch-size", "2", "--seq-len", "48", "--no-progress",
             "--threads", "1", "--warmup-steps", "1"]
    resume = lambda: train.main(["--resume", run, "--no-progress", "--threads", "1",  # noqa: E731
                                 "--pause-at-step", "2"])
    assert train.main([*flags, "--out", run, "--pause-at-step", "1"]) == 0
    before = open(os.path.join(run, "metrics.jsonl")).read()
    tr, va = split_indices(len(rows), 0.1)
    for k, split in ((tr[0], "training"), (va[0], "validation")):
        changed = [dict(r) for r in rows]
        changed[k] = {"messages": [rows[k]["messages"][0], {"role": "assistant", "content": "b"}]}
        _write(tmp_path, "d.jsonl", changed)
        with pytest.raises(ValueError, match=f"the {split} data differs from the one the run"):
            resume()
        assert open(os.path.join(run, "metrics.jsonl")).read() == before
    open(data, "w").write(original)
    assert resume() == 0
    _write(tmp_path, "d.jsonl", changed)
    _strip_data_keys(run)
    assert train.main(["--resume", run, "--no-progress", "--threads", "1"]) == 0  # not checked


def test_one_example_file_names_itself_in_the_split_error(tmp_path):
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    with pytest.raises(ValueError, match=rf"^{path}: 1 example\(s\): too few .* \(--val-data\)$"):
        load_sft(str(path), _byte_bpe(None), seq_len=16)
