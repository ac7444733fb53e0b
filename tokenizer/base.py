"""The Tokenizer interface every tokenizer in Whetstone implements (SentencePiece, byte-level BPE).

No torch here: tokenizers are plain Python over lists of ints.
"""
from __future__ import annotations

import json
import os
import re
from abc import ABC, abstractmethod

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


def added_token_regex(tokens: list[dict]):
    """Leftmost-longest match of added tokens' texts (HF's AddedVocabulary; shared by both
    tokenizers), the text itself in group "t": lstrip / rstrip tokens also take the whitespace
    before / after them, single_word ones match only between non-word characters."""
    if not tokens:
        return None
    alts = []
    for t in sorted(tokens, key=lambda t: -len(t["content"])):  # longest first at a position
        alt = rf"(?P<t>{regex.escape(t['content'])})"
        if t.get("single_word"):  # no word character directly before or after it
            alt = rf"(?<!\w){alt}(?!\w)"
        alts.append((r"\s*" if t.get("lstrip") else "") + alt + (r"\s*" if t.get("rstrip") else ""))
    return regex.compile("|".join(alts))


def read_json(path: str):
    """A JSON file's value; an unreadable or malformed file is one ValueError line."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None


def unpadded_length(types: list[int]) -> int:
    """How many GGUF tokens to keep: without the trailing run of UNUSED (type 5) entries, the
    "[PAD{i}]" names llama.cpp's converter gives embedding rows past the tokenizer's vocab
    (Qwen2: 152064 rows for 151665 tokens). Left out, those rows stay masked in generation
    (engine.generation.mask_past_vocab), as they are for the HF checkpoint."""
    n = len(types)
    while n and types[n - 1] == 5:
        n -= 1
    return n


def read_tokenizer_config(directory: str) -> dict:
    """HF tokenizer_config.json in `directory` ({} if absent), normalized: "chat_template" is a
    str or None (a list of named templates gives "default"; newer transformers keep it in
    chat_template.jinja), and "bos_token"/"eos_token"/"pad_token" are strings or None."""
    cfg: dict = {}
    path = os.path.join(directory, "tokenizer_config.json")
    if os.path.isfile(path):
        cfg = read_json(path)
    tpl = cfg.get("chat_template")
    if isinstance(tpl, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        tpl = next((t["template"] for t in tpl if t.get("name") == "default"), None)
    jinja_file = os.path.join(directory, "chat_template.jinja")
    if tpl is None and os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            tpl = f.read()
    cfg["chat_template"] = tpl
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        if isinstance(cfg.get(key), dict):  # old AddedToken form {"content": "<s>", ...}
            cfg[key] = cfg[key].get("content")
    return cfg


class Tokenizer(ABC):
    """Text <-> token ids.

    Attributes every implementation sets:
      vocab_size: int            number of ids (embedding rows may be larger, never smaller)
      bos_id, eos_id: int | None
      pad_id: int | None
      add_bos: bool              whether encode() prepends BOS by default
      chat_template: str | None  Jinja source of the model's chat template, if it has one
      extra_stop_ids: frozenset  more ids that end generation, from the model directory's
                                 generation_config.json (set by engine.hub.load_model)
    """

    vocab_size: int
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    add_bos: bool = False
    chat_template: str | None = None
    extra_stop_ids: frozenset[int] = frozenset()

    @abstractmethod
    def encode(self, text: str, add_bos: bool | None = None, add_eos: bool = False,
               parse_special: bool = True) -> list[int]:
        """Ids for `text`. add_bos=None uses the tokenizer's default (self.add_bos).

        parse_special: special-token strings in the text (e.g. "<|im_end|>") become their ids,
        as Hugging Face and llama.cpp (`parse_special`) do; False encodes them as plain text
        (use it for untrusted text that must not inject control tokens)."""

    @abstractmethod
    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        """Text for `ids` (invalid UTF-8 becomes U+FFFD)."""

    @abstractmethod
    def save(self, directory: str) -> None:
        """Write this tokenizer's files into `directory` (atomic writes)."""

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

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tokenize: bool = False):
        from tokenizer.chat import render_chat
        text = render_chat(self, messages, add_generation_prompt=add_generation_prompt)
        return self.encode(text, add_bos=False) if tokenize else text


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
        new = text[len(self.tok.decode(window[:self.read - self.start])):]
        self.start, self.read = self.read, len(self.ids)
        return new
