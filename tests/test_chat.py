"""Chat templates (tokenizer/chat.py) against transformers' own rendering.

SmolLM2's GGUF template goes through PreTrainedTokenizerFast.apply_chat_template; other
templates (Llama 3, Llama 2, one using tojson/loop controls) through transformers'
render_jinja_template with the same special-token variables.
"""
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
