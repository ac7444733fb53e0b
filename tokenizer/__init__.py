"""Whetstone tokenizers: SentencePiece (tokenizer.model), byte-level BPE (tokenizer.json, GGUF "gpt2"),
chat templates. Entry points: `load_tokenizer(path)` and `from_gguf_metadata(fields)`.

Only the stdlib, sentencepiece, regex and jinja2 are imported here; `gguf` is imported lazily,
and only when load_tokenizer is given a .gguf file.
"""
from __future__ import annotations

import json
import os

from tokenizer.base import StreamDecoder, Tokenizer, read_json_object
from tokenizer.bpe import ByteLevelBPETokenizer
from tokenizer.chat import (DEFAULT_CHAT_TEMPLATE, ChatTemplateError, end_of_turn_ids, read_chat_template,
                            render_chat, select_chat_template, set_chat_template)
from tokenizer.spm import SentencePieceTokenizer

__all__ = ["Tokenizer", "StreamDecoder", "ByteLevelBPETokenizer", "SentencePieceTokenizer",
           "load_tokenizer", "from_gguf_metadata", "read_gguf_tokenizer_fields", "render_chat",
           "end_of_turn_ids", "read_chat_template", "select_chat_template", "set_chat_template",
           "ChatTemplateError", "DEFAULT_CHAT_TEMPLATE"]


def _is_byte_level_json(path: str) -> bool:
    """True if tokenizer.json is a byte-level BPE (a Llama 2 style one is sentencepiece-like)."""
    tj = read_json_object(path)
    return "ByteLevel" in json.dumps(tj.get("pre_tokenizer")) and (tj.get("model") or {}).get("type") == "BPE"


def load_tokenizer(path: str) -> Tokenizer:
    """A tokenizer from a directory (tokenizer.json -> byte-level BPE, tokenizer.model ->
    SentencePiece), a tokenizer.json / tokenizer.model file, or a .gguf file's metadata."""
    path = os.fspath(path)
    if os.path.isdir(path):
        tj, model = os.path.join(path, "tokenizer.json"), os.path.join(path, "tokenizer.model")
        if os.path.isfile(tj) and (not os.path.isfile(model) or _is_byte_level_json(tj)):
            return ByteLevelBPETokenizer.from_tokenizer_json(path)
        if os.path.isfile(model):
            return SentencePieceTokenizer.load(path)
        raise ValueError(f"no tokenizer.json or tokenizer.model in {path}")
    if not os.path.isfile(path):
        raise ValueError(f"tokenizer path {path} does not exist")
    if path.endswith(".gguf"):
        return from_gguf_metadata(read_gguf_tokenizer_fields(path))
    if path.endswith(".json"):
        return ByteLevelBPETokenizer.from_tokenizer_json(path)
    return SentencePieceTokenizer.load(path)


def read_gguf_tokenizer_fields(path: str) -> dict:
    """The `tokenizer.*` metadata of a GGUF file as plain Python values (imports gguf lazily)."""
    import gguf
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # gguf raises ValueError / struct errors on corrupt files
        raise ValueError(f"cannot read GGUF file {path}: {e}") from None
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


def from_gguf_metadata(fields: dict) -> Tokenizer:
    """A tokenizer from GGUF metadata: `tokenizer.ggml.model` "gpt2" -> byte-level BPE,
    "llama" -> SentencePiece. `fields` maps keys to plain values; gguf ReaderField objects
    (`GGUFReader(path).fields`) are accepted too."""
    fields = {k: (v.contents() if hasattr(v, "contents") else v) for k, v in fields.items()
              if k.startswith("tokenizer.")}
    kind = fields.get("tokenizer.ggml.model")
    if kind == "gpt2":
        return ByteLevelBPETokenizer.from_gguf_metadata(fields)
    if kind == "llama":
        return SentencePieceTokenizer.from_gguf_metadata(fields)
    raise ValueError(f"unsupported GGUF tokenizer.ggml.model {kind!r}; supported: 'gpt2' "
                     "(byte-level BPE), 'llama' (SentencePiece)")
