"""SentencePiece tokenizers: train a BPE model on a corpus, load any `tokenizer.model`
(Llama 2, TinyLlama, Mistral, ours), and build one from GGUF metadata (`tokenizer.ggml.model` ==
"llama"). Follows the sentencepiece library (ModelProto in sentencepiece_model.proto) and
llama.cpp's llama-vocab.cpp for how special tokens and the dummy prefix interact.

Models trained here keep text exactly: identity normalization, no dummy prefix, no whitespace
collapsing, byte fallback (any UTF-8 round-trips), whitespace-only pieces allowed. The trainer is
fed paragraph-sized chunks with their newlines, so pieces like ".\n" are learned; sentencepiece
would otherwise see one line per sentence and spend a byte token on every newline.

Special (control) tokens such as "<s>" are split out of the text first, then each plain segment is
encoded by sentencepiece, so a model with add_dummy_prefix (Llama 2) gets its "▁" at the start of
each segment, as llama.cpp does. Decode is the exact inverse segment by segment.
"""
from __future__ import annotations

import io
import json
import os
import struct
from typing import Iterable, Iterator

import regex
import sentencepiece as spm

from tokenizer.base import Tokenizer, atomic_write_bytes, atomic_write_text, check_text, \
    read_tokenizer_config

# ModelProto.SentencePiece.Type (also GGUF tokenizer.ggml.token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model behind the Tokenizer interface."""

    def __init__(self, model_proto: bytes, *, add_bos: bool | None = None,
                 chat_template: str | None = None, bos_id: int | None = None,
                 eos_id: int | None = None, pad_id: int | None = None):
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"not a valid sentencepiece model: {e}") from None
        self.model_proto = model_proto
        sp = self.sp
        self.vocab_size = sp.get_piece_size()
        ids = lambda v: v if v is not None and v >= 0 else None  # noqa: E731  (-1 = none)
        self.bos_id = ids(sp.bos_id()) if bos_id is None else bos_id
        self.eos_id = ids(sp.eos_id()) if eos_id is None else eos_id
        self.pad_id = ids(sp.pad_id()) if pad_id is None else pad_id
        self.unk_id = ids(sp.unk_id())
        # Llama convention: a BOS starts every sequence unless the config says otherwise.
        self.add_bos = (self.bos_id is not None) if add_bos is None else bool(add_bos)
        self.chat_template = chat_template
        self._pieces = [sp.id_to_piece(i) for i in range(self.vocab_size)]
        self._control = {self._pieces[i]: i for i in range(self.vocab_size) if sp.is_control(i)}
        for i in (self.bos_id, self.eos_id, self.pad_id):
            if i is not None:
                if not 0 <= i < self.vocab_size:
                    raise ValueError(f"special id {i} is outside the vocab of {self.vocab_size}")
                self._control.setdefault(self._pieces[i], i)
        # Longest first, so that of two control tokens sharing a prefix the longer wins.
        self._control_rx = regex.compile("|".join(
            regex.escape(p) for p in sorted(self._control, key=len, reverse=True) if p)) \
            if self._control else None
        self._piece_to_id = {p: i for i, p in enumerate(self._pieces)}
        # sentencepiece reads a literal "▁" (U+2581) in the text as a space. Without a dummy
        # prefix we encode it as its three UTF-8 byte pieces instead, so it round-trips; models
        # with a dummy prefix (Llama 2) keep sentencepiece's behaviour, as HF and llama.cpp do.
        meta = [self._piece_to_id.get(f"<0x{b:02X}>") for b in "▁".encode("utf-8")]
        dummy_prefix = sp.encode("a", out_type=str)[:1] != ["a"]
        self._meta_bytes = meta if None not in meta and not dummy_prefix else None

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str) -> "SentencePieceTokenizer":
        """From `tokenizer.model` or a directory holding it (+ optional tokenizer_config.json)."""
        file = os.path.join(path, "tokenizer.model") if os.path.isdir(path) else path
        try:
            with open(file, "rb") as f:
                proto = f.read()
        except OSError as e:
            raise ValueError(f"cannot read sentencepiece model {file}: {e.strerror}") from None
        cfg = read_tokenizer_config(os.path.dirname(file))
        tok = cls(proto, add_bos=cfg.get("add_bos_token"), chat_template=cfg["chat_template"])
        for key, attr in (("bos_token", "bos_id"), ("eos_token", "eos_id"), ("pad_token", "pad_id")):
            i = tok.token_to_id(cfg[key]) if cfg.get(key) is not None else None
            if i is not None:
                setattr(tok, attr, i)
        return tok

    @classmethod
    def train(cls, inputs, out_dir: str, vocab_size: int, *, max_sentences: int = 2_000_000,
              num_threads: int = 2, character_coverage: float = 0.9999, split_digits: bool = True,
              user_defined_symbols: Iterable[str] = (), add_bos: bool = True,
              seed: int = 0) -> "SentencePieceTokenizer":
        """Train a BPE model and save it into out_dir (tokenizer.model + tokenizer_config.json).

        inputs: the text itself (a str), a path (file or directory of .txt files), a list of paths,
        or an iterable of document strings. ids: <unk>=0, <s>=1, </s>=2, no pad. About 1 s per
        5 MB on 2 cores; at most `max_sentences` chunks (~130 bytes each) are sampled.
        """
        # `inputs` is a path only if it names an existing file/dir (a corpus text has newlines).
        if isinstance(inputs, (str, os.PathLike)) and (not isinstance(inputs, str) or (
                "\n" not in inputs and len(inputs) < 4096 and os.path.exists(inputs))):
            docs = _read_files([os.fspath(inputs)])
        elif isinstance(inputs, str):
            docs = iter([inputs])
        elif isinstance(inputs, (list, tuple)) and inputs and all(
                isinstance(x, os.PathLike) or (isinstance(x, str) and "\n" not in x
                                               and len(x) < 4096 and os.path.isfile(x)) for x in inputs):
            docs = _read_files([os.fspath(x) for x in inputs])
        else:
            docs = iter(inputs)
        chunks = _training_chunks(docs)
        first = next(chunks, None)
        if first is None:
            raise ValueError("cannot train a tokenizer on an empty corpus")
        if vocab_size < 256 + 3 + 1:
            raise ValueError(f"vocab_size {vocab_size} is too small: byte fallback alone needs 259 ids")
        model = io.BytesIO()
        spm.set_random_generator_seed(seed)
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=_prepend(first, chunks), model_writer=model,
                model_type="bpe", vocab_size=vocab_size, byte_fallback=True,
                character_coverage=character_coverage, normalization_rule_name="identity",
                add_dummy_prefix=False, remove_extra_whitespaces=False,
                allow_whitespace_only_pieces=True, split_digits=split_digits,
                user_defined_symbols=list(user_defined_symbols),
                unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                input_sentence_size=max_sentences, shuffle_input_sentence=True,
                max_sentence_length=1 << 14, num_threads=num_threads,
                train_extremely_large_corpus=False, minloglevel=2,
                hard_vocab_limit=False)  # a small corpus gets a smaller vocabulary, not an error
        except RuntimeError as e:  # e.g. "Vocabulary size is too high (8000). Must be <= 1234."
            raise ValueError(f"sentencepiece training failed: {str(e).strip().splitlines()[-1]}") \
                from None
        tok = cls(model.getvalue(), add_bos=add_bos)
        tok.save(out_dir)
        return tok

    @classmethod
    def from_gguf_metadata(cls, fields: dict) -> "SentencePieceTokenizer":
        """Build from GGUF metadata of a "llama" (sentencepiece) tokenizer: tokens, scores,
        token_type, special ids, add_bos_token, add_space_prefix, chat_template."""
        tokens = fields.get("tokenizer.ggml.tokens")
        if not tokens:
            raise ValueError("GGUF metadata lacks tokenizer.ggml.tokens")
        scores = fields.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        types = fields.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
        if not len(scores) == len(types) == len(tokens):
            raise ValueError(f"GGUF tokenizer arrays disagree: {len(tokens)} tokens, "
                             f"{len(scores)} scores, {len(types)} token types")
        if UNKNOWN not in types:
            raise ValueError("GGUF sentencepiece vocab has no unknown token (token_type 2)")

        def get_id(key):
            v = fields.get(f"tokenizer.ggml.{key}_token_id")
            return int(v) if v is not None and 0 <= int(v) < len(tokens) else None

        proto = build_model_proto(
            tokens, scores, types, bos_id=get_id("bos"), eos_id=get_id("eos"),
            pad_id=get_id("padding"),
            add_dummy_prefix=bool(fields.get("tokenizer.ggml.add_space_prefix", True)))
        return cls(proto, add_bos=bool(fields.get("tokenizer.ggml.add_bos_token", True)),
                   chat_template=fields.get("tokenizer.chat_template"), bos_id=get_id("bos"),
                   eos_id=get_id("eos"), pad_id=get_id("padding"))

    # -- encode / decode ----------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool | None = None, add_eos: bool = False,
               parse_special: bool = True) -> list[int]:
        check_text(text)
        ids: list[int] = []
        if (self.add_bos if add_bos is None else add_bos):
            if self.bos_id is None:
                raise ValueError("add_bos requested but this tokenizer has no BOS token")
            ids.append(self.bos_id)
        pos = 0
        if parse_special and self._control_rx is not None:
            for m in self._control_rx.finditer(text):
                if m.start() > pos:
                    self._encode_plain(text[pos:m.start()], ids)
                ids.append(self._control[m.group()])
                pos = m.end()
        if pos < len(text):
            self._encode_plain(text[pos:], ids)
        if add_eos:
            if self.eos_id is None:
                raise ValueError("add_eos requested but this tokenizer has no EOS token")
            ids.append(self.eos_id)
        return ids

    def _encode_plain(self, text: str, ids: list[int]) -> None:
        if self._meta_bytes is None or "▁" not in text:
            ids.extend(self.sp.encode(text))
            return
        for k, part in enumerate(text.split("▁")):
            if k:
                ids.extend(self._meta_bytes)
            if part:
                ids.extend(self.sp.encode(part))

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        n = self.vocab_size
        out, run = [], []
        for i in ids:
            i = int(i)
            if not 0 <= i < n:
                raise ValueError(f"token id {i} is out of range for a vocab of {n}")
            piece = self._pieces[i]
            if piece in self._control and self._control[piece] == i:
                if run:
                    out.append(self.sp.decode(run))
                    run = []
                if not skip_special:
                    out.append(piece)
            else:
                run.append(i)
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)

    def id_to_token(self, i: int) -> str:
        return self._pieces[i]

    def token_to_id(self, token: str) -> int | None:
        return self._piece_to_id.get(token)

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._control)

    # -- save ---------------------------------------------------------------------------------

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        atomic_write_bytes(os.path.join(directory, "tokenizer.model"), self.model_proto)
        name = lambda i: self._pieces[i] if i is not None else None  # noqa: E731
        cfg = {"add_bos_token": self.add_bos, "add_eos_token": False,
               "bos_token": name(self.bos_id), "eos_token": name(self.eos_id),
               "unk_token": name(self.unk_id), "pad_token": name(self.pad_id)}
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        atomic_write_text(os.path.join(directory, "tokenizer_config.json"),
                          json.dumps(cfg, ensure_ascii=False, indent=2))


# -- training input ---------------------------------------------------------------------------

def _read_files(paths: list[str]) -> Iterator[str]:
    files = []
    for p in paths:
        if os.path.isdir(p):
            files += sorted(os.path.join(p, f) for f in os.listdir(p) if f.endswith(".txt"))
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise ValueError(f"training input {p} does not exist")
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            yield fh.read()


def _training_chunks(docs: Iterable[str], target: int = 1000, hard: int = 2000) -> Iterator[str]:
    """Paragraph-sized chunks with their newlines: cut after a blank line once a chunk has any
    text, or at `target` characters at a line end; lines longer than `hard` are cut into pieces
    (sentencepiece skips sentences longer than max_sentence_length)."""
    for doc in docs:
        buf: list[str] = []
        size = 0
        for line in doc.splitlines(keepends=True):
            while len(line) > hard:
                yield line[:hard]
                line = line[hard:]
            buf.append(line)
            size += len(line)
            if size >= target or (not line.strip() and size > len(line)):
                yield "".join(buf)
                buf, size = [], 0
        if buf:
            yield "".join(buf)


def _prepend(first, rest):
    yield first
    yield from rest


# -- a minimal protobuf writer for ModelProto (no protobuf dependency) ------------------------

def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int32 -> two's complement, as protobuf encodes it
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num: int, value) -> bytes:
    if isinstance(value, bool) or isinstance(value, int):
        return _varint(num << 3 | 0) + _varint(int(value))
    if isinstance(value, float):
        return _varint(num << 3 | 5) + struct.pack("<f", value)
    data = value.encode("utf-8") if isinstance(value, str) else value
    return _varint(num << 3 | 2) + _varint(len(data)) + data


def build_model_proto(tokens: list[str], scores: list[float], types: list[int], *,
                      bos_id: int | None, eos_id: int | None, pad_id: int | None = None,
                      add_dummy_prefix: bool = True) -> bytes:
    """A serialized sentencepiece ModelProto (BPE, identity normalizer) for this vocab.

    Field numbers from sentencepiece_model.proto: ModelProto{pieces=1, trainer_spec=2,
    normalizer_spec=3}; SentencePiece{piece=1, score=2, type=3}; TrainerSpec{model_type=3,
    vocab_size=4, byte_fallback=35, unk_id=40, bos_id=41, eos_id=42, pad_id=43, unk_piece=45,
    bos_piece=46, eos_piece=47, pad_piece=48}; NormalizerSpec{name=1, add_dummy_prefix=3,
    remove_extra_whitespaces=4, escape_whitespaces=5}.
    """
    unk_id = types.index(UNKNOWN)
    out = bytearray()
    for t, s, ty in zip(tokens, scores, types):
        out += _field(1, _field(1, t) + _field(2, float(s)) + _field(3, int(ty)))
    trainer = (_field(3, 2) + _field(4, len(tokens)) + _field(35, BYTE in types)
               + _field(40, unk_id) + _field(45, tokens[unk_id]))
    for num, piece_num, i in ((41, 46, bos_id), (42, 47, eos_id), (43, 48, pad_id)):
        trainer += _field(num, -1 if i is None else i)
        if i is not None:
            trainer += _field(piece_num, tokens[i])
    normalizer = (_field(1, "identity") + _field(3, add_dummy_prefix) + _field(4, False)
                  + _field(5, True))
    out += _field(2, trainer) + _field(3, normalizer)
    return bytes(out)
