"""The Tokenizer interface every tokenizer in Whetstone implements (SentencePiece, byte-level BPE),
and what both share of Hugging Face's tokenizer files.

Shared helpers: atomic writes, text checks, added-token matching as the `tokenizers` library
does, tokenizer_config.json read and written as transformers does (special tokens; chat
templates in all of transformers' forms: one string, a list of named templates such as
"default" + "tool_use", and transformers 5's chat_template.jinja + additional_chat_templates/,
whose stale files a save parks and drops so a directory never loads a mixed set), and the
named templates of GGUF metadata (tokenizer.chat_template[.NAME], as gguf-py writes them).

No torch here: tokenizers are plain Python over lists of ints.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from abc import ABC, abstractmethod
from collections.abc import Mapping
from types import MappingProxyType

import regex

_SURROGATE = re.compile("[\ud800-\udfff]")


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Temp file in the same directory, then rename (a copy of engine.config's: tokenizer/ must
    not import engine)."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def check_text(text) -> None:
    """encode()'s input check: a str with no lone surrogate (e.g. from json.loads of "\\ud800"),
    which has no UTF-8 form; sentencepiece would fail on it with a cryptic RuntimeError."""
    if not isinstance(text, str):
        raise ValueError(f"encode() takes a str, got {type(text).__name__}")
    m = _SURROGATE.search(text)
    if m:
        raise ValueError(f"text has a lone surrogate {m.group()!r} at index {m.start()}: "
                         "not valid Unicode, cannot be encoded")


_WHITESPACE = regex.compile(r"\s")  # Unicode White_Space, as Rust's char::is_whitespace / \s
_WORD = regex.compile(r"\w")  # alphabetic, marks, decimal digits, Pc, Join_Control: Rust's \w


class AddedTokenMatcher:
    """HF's AddedVocabulary.find_matches (added_vocabulary.rs), shared by both tokenizers:
    leftmost-longest matches of the tokens' texts (one alternation of escaped texts, longest
    first, no lookarounds), then for each match, in order:
      - a token in `skip` (encode_special_tokens) is passed over, yet still hides the shorter
        tokens it overlaps;
      - a single_word token is discarded unless no word character is directly before or after
        it; a discarded match does not fall back to a shorter token at the same place;
      - lstrip takes the whitespace before it (back to the previous match's end), rstrip the
        whitespace after it.
    Scanning whitespace by hand keeps it linear: a regex "whitespace* token" retries the whole
    run from each of its positions, quadratic (minutes for 100k spaces)."""

    def __init__(self, tokens: list[dict]):
        self.tokens = {t["content"]: t for t in tokens if t["content"]}
        contents = sorted(self.tokens, key=len, reverse=True)  # longest first at a position
        self.rx = regex.compile("|".join(map(regex.escape, contents))) if contents else None

    def finditer(self, text: str, skip=frozenset()):
        """Yield (start, end, content): text[start:end] is the token with the whitespace an
        lstrip / rstrip token takes along."""
        if self.rx is None:
            return
        prev, n = 0, len(text)
        for m in self.rx.finditer(text):
            start, end = m.span()
            t = self.tokens[m.group()]
            if t["content"] in skip:
                continue
            if t.get("single_word") and ((start > 0 and _WORD.match(text, start - 1))
                                         or (end < n and _WORD.match(text, end))):
                continue
            if t.get("lstrip"):
                while start > prev and _WHITESPACE.match(text, start - 1):
                    start -= 1
            if start < prev:  # inside the whitespace an rstrip token took (HF overlaps them)
                continue
            if t.get("rstrip"):
                while end < n and _WHITESPACE.match(text, end):
                    end += 1
            yield start, end, t["content"]
            prev = end

    def split(self, text: str, skip=frozenset()):
        """Yield (piece, None) for the text between matches and (piece, content) for a match
        (the piece with any stripped whitespace, content the token's own text)."""
        pos = 0
        for start, end, content in self.finditer(text, skip):
            if start > pos:
                yield text[pos:start], None
            yield text[start:end], content
            pos = end
        if pos < len(text):
            yield text[pos:], None


def read_json(path: str):
    """A JSON file's value; an unreadable or malformed file is one ValueError line."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None


def read_json_object(path: str) -> dict:
    """read_json for files that must hold an object (tokenizer.json, configs)."""
    value = read_json(path)
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return value


def unpadded_length(types: list[int]) -> int:
    """How many GGUF tokens to keep: without the trailing run of UNUSED (type 5) entries, the
    "[PAD{i}]" names llama.cpp's converter gives embedding rows past the tokenizer's vocab
    (Qwen2: 152064 rows for 151665 tokens). Left out, those rows stay masked in generation
    (engine.generation.mask_past_vocab), as they are for the HF checkpoint."""
    n = len(types)
    while n and types[n - 1] == 5:
        n -= 1
    return n


# transformers' SPECIAL_TOKENS_ATTRIBUTES: the named special tokens of a tokenizer config.
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                      "mask_token")


def template_specials(post: dict | None) -> tuple[str | None, str | None] | None:
    """(token before $A, token after $A) of a tokenizer.json `post_processor` (a TemplateProcessing,
    possibly inside a Sequence), e.g. ("<s>", "</s>") for "<s> $A </s>"; None when there is no
    post_processor at all. transformers 5 takes BOS / EOS from here whenever tokenizer.json
    exists, whatever add_bos_token / add_eos_token say."""
    if not post:
        return None
    if not isinstance(post, dict):
        raise ValueError(f"post_processor is not an object: {post!r:.80}")
    if post.get("type") == "Sequence":  # e.g. [ByteLevel, TemplateProcessing]
        post = next((p for p in post.get("processors") or [] if isinstance(p, dict)
                     and p.get("type") == "TemplateProcessing"), {})
    if post.get("type") != "TemplateProcessing":  # ByteLevel (offsets only): adds no tokens
        return None, None
    single = post.get("single") or []
    if not isinstance(single, list):
        raise ValueError("post_processor: single is not a list")

    def special(item):
        if isinstance(item, dict) and isinstance(item.get("SpecialToken"), dict):
            return item["SpecialToken"].get("id")
        return None
    return (special(single[0]) if single else None), (special(single[-1]) if len(single) > 1 else None)


CHAT_TEMPLATE_FILE = "chat_template.jinja"  # transformers 5's files for the templates
CHAT_TEMPLATE_DIR = "additional_chat_templates"  # NAME.jinja: the named ones besides "default"


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None


def named_chat_templates(value, where: str = "chat_template") -> dict[str, str]:
    """transformers' forms of a tokenizer's chat template(s) as {name: Jinja source}: None -> {},
    a str -> {"default": it}, [{"name": ..., "template": ...}, ...] (tokenizer_config.json's
    list, e.g. Hermes-2-Pro's default + tool_use) or a {name: template} dict -> that dict."""
    if not value:  # None, "" (no template), an empty list or dict
        return {}
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list):
        bad = next((t for t in value if not (isinstance(t, dict) and isinstance(t.get("name"), str)
                                             and isinstance(t.get("template"), str))), None)
        if bad is not None:
            raise ValueError(f"{where}: a list of chat templates holds {{\"name\": str, "
                             f"\"template\": str}} objects, got {bad!r:.80}")
        value = {t["name"]: t["template"] for t in value}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and k and isinstance(v, str)
                                              for k, v in value.items()):
        raise ValueError(f"{where}: expected a template string, a list of named templates or a "
                         f"{{name: template}} object, got {value!r:.80}")
    return dict(value)


def read_tokenizer_config(directory: str) -> dict:
    """HF tokenizer_config.json in `directory` ({} if absent), normalized: "chat_templates" is
    {name: template} ({"default": t} for a single one; a list of named templates gives each),
    "chat_template" the "default" one or None; as in transformers, chat_template.jinja and
    additional_chat_templates/NAME.jinja (where transformers 5 saves them), if any, replace the
    config's entry. The special tokens ("bos_token", "eos_token", ...) are strings or None,
    special_tokens_map.json's (a legacy file) taking precedence as in transformers."""
    cfg: dict = {}
    path = os.path.join(directory, "tokenizer_config.json")
    if os.path.isfile(path):
        cfg = read_json_object(path)
    templates = named_chat_templates(cfg.get("chat_template"), f"{path}: chat_template")
    files = {}
    if os.path.isfile(os.path.join(directory, CHAT_TEMPLATE_FILE)):
        files["default"] = _read_text(os.path.join(directory, CHAT_TEMPLATE_FILE))
    extra_dir = os.path.join(directory, CHAT_TEMPLATE_DIR)
    if os.path.isdir(extra_dir):
        for name in sorted(os.listdir(extra_dir)):
            if name.endswith(".jinja") and os.path.isfile(os.path.join(extra_dir, name)):
                files[name.removesuffix(".jinja")] = _read_text(os.path.join(extra_dir, name))
    cfg["chat_templates"] = files or templates
    cfg["chat_template"] = cfg["chat_templates"].get("default")
    # Legacy directories (no added_tokens_decoder) may name their special tokens in
    # special_tokens_map.json; transformers lets those override tokenizer_config.json's.
    smap = os.path.join(directory, "special_tokens_map.json")
    from_map: dict = {}
    if "added_tokens_decoder" not in cfg and os.path.isfile(smap):
        m = read_json_object(smap)
        from_map = {k: v for k, v in m.items() if k in SPECIAL_TOKEN_KEYS and v}
        cfg.update(from_map)
    for key in SPECIAL_TOKEN_KEYS:
        value = cfg.get(key)
        if isinstance(value, dict):  # old AddedToken form {"content": "<s>", ...}
            value = cfg[key] = value.get("content")
        if value is not None and not isinstance(value, str):  # e.g. a list: was a TypeError
            raise ValueError(f"{smap if key in from_map else path}: {key} must be a token string "
                             f"or an AddedToken object, got {value!r:.80}")
    return cfg


def named_special_tokens(cfg: dict) -> list[str]:
    """The token strings read_tokenizer_config's `cfg` names (bos_token, eos_token, ...): as in
    transformers 5 (_post_init), each is a special token whatever tokenizer.json or
    added_tokens_decoder say, so decode(skip_special) drops it and parse_special=False leaves
    it as text."""
    return [cfg[k] for k in SPECIAL_TOKEN_KEYS if cfg.get(k)]


def gguf_chat_templates(fields: dict) -> dict[str, str]:
    """{name: template} of GGUF metadata: tokenizer.chat_template is "default", each
    tokenizer.chat_template.NAME another one (as gguf-py's GGUFWriter.add_chat_template writes
    a list of named templates, tokenizer.chat_templates naming them; llama.cpp reads them so)."""
    prefix = "tokenizer.chat_template."
    named = {"default": fields.get("tokenizer.chat_template")}
    named.update((k[len(prefix):], v) for k, v in fields.items() if k.startswith(prefix))
    return {k: v for k, v in named.items() if isinstance(v, str) and v}


def chat_template_value(templates) -> str | list[dict] | None:
    """named_chat_templates' inverse: {name: template} as transformers (and gguf-py) write it,
    one "default" as a string, several as a list of {"name", "template"}; None for none."""
    if list(templates) == ["default"]:
        return templates["default"]
    return [{"name": k, "template": v} for k, v in templates.items()] if templates else None


def write_tokenizer_config(directory: str, cfg: dict, templates) -> None:
    """tokenizer_config.json = `cfg` + the chat templates {name: template}: one "default" as a
    string, several as transformers' list of {"name", "template"} (what its save_pretrained
    writes with save_jinja_files=False; transformers 5 loads both). Template files an earlier
    save left here (chat_template.jinja, additional_chat_templates/*.jinja) would replace these
    on loading, in transformers as here: they are removed, so that a crash at any point leaves
    a directory that loads the old set or the new one whole (park / drop below)."""
    cfg = dict(cfg)
    if templates:
        cfg["chat_template"] = chat_template_value(templates)
    park_chat_template_files(directory)
    atomic_write_text(os.path.join(directory, "tokenizer_config.json"),
                      json.dumps(cfg, ensure_ascii=False, indent=2))
    drop_chat_template_files(directory)


def park_chat_template_files(directory: str) -> None:
    """Gather transformers 5's template files into additional_chat_templates/ (chat_template.jinja
    becomes default.jinja there, which transformers and read_tokenizer_config read after it, so
    the same set loads at every step) so that drop_chat_template_files removes them all with one
    rename. Call it before replacing tokenizer_config.json, drop_chat_template_files after."""
    main = os.path.join(directory, CHAT_TEMPLATE_FILE)
    if not os.path.isfile(main):
        return
    extra_dir = os.path.join(directory, CHAT_TEMPLATE_DIR)
    os.makedirs(extra_dir, exist_ok=True)  # an empty folder: loads as before
    parked = os.path.join(extra_dir, "default.jinja")
    if os.path.isfile(parked):  # it already shadows chat_template.jinja
        os.remove(main)
    else:
        os.replace(main, parked)


def drop_chat_template_files(directory: str) -> None:
    """Remove the template files park_chat_template_files gathered: one rename of the folder
    takes them all out of the loaded set at once (its non-template files, if any, come back)."""
    if os.path.isfile(os.path.join(directory, CHAT_TEMPLATE_FILE)):
        os.remove(os.path.join(directory, CHAT_TEMPLATE_FILE))  # not parked: a default alone
    extra_dir = os.path.join(directory, CHAT_TEMPLATE_DIR)
    if not os.path.isdir(extra_dir):
        return
    if not any(n.endswith(".jinja") for n in os.listdir(extra_dir)):
        if not os.listdir(extra_dir):
            os.rmdir(extra_dir)
        return
    old = os.path.join(directory, f".{CHAT_TEMPLATE_DIR}.old{os.getpid()}")
    if os.path.isdir(old):  # a crashed save's, with the same pid
        shutil.rmtree(old)
    os.rename(extra_dir, old)
    for n in os.listdir(old):
        if n.endswith(".jinja") and os.path.isfile(os.path.join(old, n)):
            os.remove(os.path.join(old, n))
    if os.listdir(old):
        os.rename(old, extra_dir)
    else:
        os.rmdir(old)


class Tokenizer(ABC):
    """Text <-> token ids.

    Attributes every implementation sets:
      vocab_size: int            number of ids (embedding rows may be larger, never smaller)
      bos_id, eos_id: int | None
      pad_id: int | None
      add_bos: bool              whether encode() prepends BOS by default
      add_eos: bool              whether encode() appends EOS by default (add_eos_token, or a
                                 post_processor template "<s> $A </s>")
      chat_template: str | None  Jinja source of the model's (default) chat template, if any
      chat_templates: {name: str} every named template, "default" included (Hermes-2-Pro and
                                 Cohere models add "tool_use"), read-only; assign a dict (or a
                                 str) to replace them all. Assigning chat_template replaces them
                                 all too, as transformers' `tok.chat_template = "..."` does.
      extra_stop_ids: frozenset  more ids that end generation, from the model directory's
                                 generation_config.json (set by engine.hub.load_model)
    """

    vocab_size: int
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    add_bos: bool = False
    add_eos: bool = False
    _chat_templates: dict[str, str] = {}  # never changed in place: the setter replaces it
    extra_stop_ids: frozenset[int] = frozenset()

    @property
    def chat_template(self) -> str | None:
        return self._chat_templates.get("default")

    @chat_template.setter
    def chat_template(self, template: str | None) -> None:
        if template is not None and not isinstance(template, str):
            raise ValueError(f"chat_template must be a str or None, got {type(template).__name__}"
                             " (assign named templates to chat_templates)")
        self.chat_templates = template

    @property
    def chat_templates(self) -> Mapping[str, str]:
        # a read-only view: a change goes through the setter
        return MappingProxyType(self._chat_templates)

    @chat_templates.setter
    def chat_templates(self, templates) -> None:
        self._chat_templates = named_chat_templates(templates)

    @abstractmethod
    def encode(self, text: str, add_bos: bool | None = None, add_eos: bool | None = None,
               parse_special: bool = True) -> list[int]:
        """Ids for `text`. add_bos / add_eos = None use the tokenizer's defaults (self.add_bos,
        self.add_eos: HF's add_special_tokens=True), except that add_bos=False alone turns the
        default EOS off too (HF's add_special_tokens=False): callers that encode a rendered
        chat or pieces of a text pass add_bos=False and must not get an EOS in the middle.

        parse_special: special-token strings in the text (e.g. "<|im_end|>") become their ids,
        as Hugging Face and llama.cpp (`parse_special`) do; False encodes them as plain text
        (use it for untrusted text that must not inject control tokens)."""

    @abstractmethod
    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        """Text for `ids` (invalid UTF-8 becomes U+FFFD)."""

    @abstractmethod
    def save(self, directory: str) -> None:
        """Write this tokenizer's files into `directory` (atomic writes)."""

    def _bos_eos(self, add_bos: bool | None, add_eos: bool | None) -> tuple[bool, bool]:
        """encode()'s add_bos / add_eos resolved (see encode), checked against the vocab."""
        if add_eos is None:
            add_eos = self.add_eos and add_bos is not False
        if add_bos is None:
            add_bos = self.add_bos
        if add_bos and self.bos_id is None:
            raise ValueError("add_bos requested but this tokenizer has no BOS token")
        if add_eos and self.eos_id is None:
            raise ValueError("add_eos requested but this tokenizer has no EOS token")
        return bool(add_bos), bool(add_eos)

    # Not abstract, so that small test tokenizers elsewhere need not define them.
    def id_to_token(self, i: int) -> str:
        """The vocabulary string of id `i` (byte-level / SentencePiece form, e.g. 'Ġthe', '▁the')."""
        raise NotImplementedError(f"{type(self).__name__} has no id_to_token")

    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary string, or None."""
        raise NotImplementedError(f"{type(self).__name__} has no token_to_id")

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special (control) token strings -> ids, e.g. {'<|im_end|>': 2}."""
        return {}

    @property
    def bos_token(self) -> str | None:
        return self.id_to_token(self.bos_id) if self.bos_id is not None else None

    @property
    def eos_token(self) -> str | None:
        return self.id_to_token(self.eos_id) if self.eos_id is not None else None

    @property
    def stop_ids(self) -> set[int]:
        """Ids that end generation: EOS, the chat template's end-of-turn token if any, and
        extra_stop_ids (Llama 3's generation_config.json lists <|eot_id|> and <|eom_id|> too)."""
        from tokenizer.chat import end_of_turn_ids
        ids = {self.eos_id} if self.eos_id is not None else set()
        return ids | end_of_turn_ids(self) | set(self.extra_stop_ids)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            tokenize: bool = False, chat_template: str | None = None,
                            continue_final_message: bool | str = False, **kwargs):
        """transformers' method and defaults (no generation prompt unless asked): other kwargs
        (tools=[...], documents=...) reach the template; chat_template, a template or the name
        of one of chat_templates, replaces the tokenizer's own for this call. Without it, tools
        pick the "tool_use" template if there is one, else "default" (as transformers)."""
        from tokenizer.chat import render_chat
        text = render_chat(self, messages, add_generation_prompt=add_generation_prompt,
                           template=chat_template, continue_final_message=continue_final_message,
                           **kwargs)
        # as transformers: the rendered text with add_special_tokens=False (no BOS, no EOS)
        return self.encode(text, add_bos=False, add_eos=False) if tokenize else text


class StreamDecoder:
    """Incremental detokenizer for streaming: feed ids one at a time, get only the new text.

    Holds back output while the decoded tail is an incomplete UTF-8 sequence (U+FFFD at the
    end), so multi-byte characters split across tokens are printed whole. Decodes a window that
    starts one emission back (vLLM's prefix/read offsets), not the whole sequence, so a token
    costs the same at any length; the window's first tokens give the new ones their context
    (SentencePiece drops a leading space only at the start of a decode).
    """

    def __init__(self, tok: Tokenizer, prefix_ids: list[int] | None = None):
        self.tok = tok
        self.ids: list[int] = list(prefix_ids or [])
        self.read = len(self.ids)  # ids before this are emitted
        self.start = max(0, self.read - 4)  # the window's start: context for ids[read:]

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        window = self.ids[self.start:]
        text = self.tok.decode(window)
        if text.endswith("\ufffd") and not final:
            return ""
        head = self.tok.decode(window[:self.read - self.start])  # emitted already (or the prompt)
        cut = len(head)
        if not text.startswith(head):  # a prompt of ids ended inside a character the new ids
            cut = len(head.rstrip("\ufffd"))  # complete: emit that character whole
        new = text[cut:]
        self.start, self.read = self.read, len(self.ids)
        return new
