"""SentencePiece tokenizers: train a BPE model on a corpus, load any `tokenizer.model`
(Llama 2, TinyLlama, Mistral, ours), and build one from GGUF metadata (`tokenizer.ggml.model` ==
"llama"). Follows the sentencepiece library (ModelProto in sentencepiece_model.proto) and
llama.cpp's llama-vocab.cpp for how special tokens and the dummy prefix interact.

Models trained here keep text exactly: identity normalization, no dummy prefix, no whitespace
collapsing, byte fallback (any UTF-8 round-trips), whitespace-only pieces allowed. The trainer is
fed paragraph-sized chunks with their newlines, so pieces like ".\n" are learned; sentencepiece
would otherwise see one line per sentence and spend a byte token on every newline.

Special tokens (control pieces such as "<s>", <unk>, HF's special added tokens) are split out of
the text first (only with parse_special), and so are user-defined pieces and non-special added
tokens (always); then each plain segment is encoded by sentencepiece. Whether a segment gets a
dummy "▁" in front is one rule, `prefix` (see PREFIX_RULES and _dummy_prefix): sentencepiece's and
llama.cpp's (every segment), or transformers' Metaspace "always" / "first" / "never", read from
tokenizer_config.json (legacy, add_prefix_space) and tokenizer.json as transformers 5 does.
HF's added tokens (tokenizer.json `added_tokens`, tokenizer_config.json `added_tokens_decoder`, a
legacy added_tokens.json) may lie past the model's pieces: ChatML's <|im_start|> = 32000 in a
Llama 2 fine-tune extends the vocab. Decode is the inverse segment by segment: it takes the
dummy "▁" off where encode puts one (HF's decode strips only at the start of the whole text, so
under the "sentencepiece" / "always" rules it keeps the "▁" after a special token as a space).
"""
from __future__ import annotations

import io
import os
import struct
from typing import Iterable, Iterator

import regex
import sentencepiece as spm

from tokenizer.base import SPECIAL_TOKEN_KEYS, AddedTokenMatcher, Tokenizer, atomic_write_bytes, \
    check_text, gguf_chat_templates, named_special_tokens, read_json, read_json_object, \
    read_tokenizer_config, template_specials, unpadded_length, write_tokenizer_config

# ModelProto.SentencePiece.Type (also GGUF tokenizer.ggml.token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Where a plain segment (text between split-out tokens) gets a dummy "▁" in front:
#   "sentencepiece"  every segment, even one that starts with a space: sentencepiece's
#                    add_dummy_prefix per segment, llama.cpp's tokenizer_add_space_prefix (a space
#                    before the text and after every token fragment), tokenizers' normalizer
#                    Prepend("▁"), transformers' legacy tokenizer built from tokenizer.model
#   "always"         tokenizers' Metaspace(prepend_scheme="always"): every segment that does not
#                    already start with a space / "▁" (" Hello" gives [▁Hello], not
#                    [▁, ▁Hello])
#   "first"          Metaspace "first" (legacy=false): only the segment at the start of the text,
#                    unless it starts with a space / "▁" ("<s>Hello" is [<s>, H, ello])
#   "never"          no dummy prefix (our trained models, add_space_prefix=false)
PREFIX_RULES = ("sentencepiece", "always", "first", "never")


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model behind the Tokenizer interface."""

    def __init__(self, model_proto: bytes, *, add_bos: bool | None = None, add_eos: bool = False,
                 chat_template: str | dict[str, str] | None = None, bos_id: int | None = None,
                 eos_id: int | None = None, pad_id: int | None = None,
                 added_tokens: list[dict] | None = None, prefix: str | None = None,
                 split_words: bool = False):
        """added_tokens: HF's tokens on top of the model, {"id", "content", "special", "lstrip",
        "rstrip", "single_word"} as in tokenizer.json; ids past the model's pieces extend the
        vocab (ChatML's <|im_start|> = 32000 in a Llama 2 fine-tune), others rename or reuse one.
        prefix: one of PREFIX_RULES; None follows the model ("sentencepiece" with
        add_dummy_prefix, else "never"). split_words: tokenizers' Metaspace(split=true), each
        "▁word" encoded on its own."""
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"not a valid sentencepiece model: {e}") from None
        self.model_proto = model_proto
        sp = self.sp
        self._piece_types, self.add_dummy_prefix = spm_piece_types(model_proto)
        if prefix is None:
            prefix = "sentencepiece" if self.add_dummy_prefix else "never"
        if prefix not in PREFIX_RULES:
            raise ValueError(f"prefix {prefix!r} is not one of {', '.join(PREFIX_RULES)}")
        self.prefix, self.split_words = prefix, bool(split_words)
        # The model with and without its dummy prefix: encode picks one per segment
        # (_dummy_prefix decides); decode uses the bare one, which strips no space, and strips
        # the prefix itself where encode put one.
        other = spm.SentencePieceProcessor(
            model_proto=_set_dummy_prefix(model_proto, not self.add_dummy_prefix))
        self._sp_prefixed, self._sp_bare = (sp, other) if self.add_dummy_prefix else (other, sp)
        self.sp_size = n = sp.get_piece_size()
        added: dict[int, dict] = {}
        for t in added_tokens or ():
            try:
                t = {"special": True, **t, "id": int(t["id"]), "content": str(t["content"])}
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"bad added token {t!r:.80}: needs an integer id and a content") \
                    from None
            if t["id"] < 0:
                raise ValueError(f"added token {t['content']!r} has a negative id {t['id']}")
            if t["content"]:
                added[t["id"]] = t
        self.added_tokens = [added[i] for i in sorted(added)]
        self.vocab_size = max([n] + [i + 1 for i in added])
        # None: an id between the model's pieces and an added token that has no token
        self._pieces: list[str | None] = [sp.id_to_piece(i) for i in range(n)] + \
            [None] * (self.vocab_size - n)
        self._piece_to_id = {p: i for i, p in enumerate(self._pieces[:n])}
        for i, t in added.items():  # an added token wins, as in HF's added vocabulary
            self._pieces[i] = t["content"]
            self._piece_to_id[t["content"]] = i
        ids = lambda v: v if v is not None and v >= 0 else None  # noqa: E731  (-1 = none)
        self.bos_id = ids(sp.bos_id()) if bos_id is None else bos_id
        self.eos_id = ids(sp.eos_id()) if eos_id is None else eos_id
        self.pad_id = ids(sp.pad_id()) if pad_id is None else pad_id
        self.unk_id = ids(sp.unk_id())
        # Llama convention: a BOS starts every sequence unless the config says otherwise.
        self.add_bos = (self.bos_id is not None) if add_bos is None else bool(add_bos)
        self.add_eos = bool(add_eos)
        self.chat_templates = chat_template  # a template or {name: template}
        self._index()
        # sentencepiece reads a literal "▁" (U+2581) in the text as a space. Without a dummy
        # prefix we encode it as its three UTF-8 byte pieces instead, so it round-trips; models
        # with a dummy prefix (Llama 2) keep sentencepiece's behaviour, as HF and llama.cpp do.
        meta = [self._piece_to_id.get(f"<0x{b:02X}>") for b in "▁".encode("utf-8")]
        self._meta_bytes = meta if None not in meta and not self.add_dummy_prefix else None

    def _index(self) -> None:
        """The tokens split out of the text before sentencepiece sees it (call again after
        changing bos/eos/pad_id). Special ones (control and unknown pieces, special added
        tokens, bos/eos/pad) only with parse_special, as llama.cpp and HF do; user-defined
        pieces and non-special added tokens always (HF's split_special_tokens, llama.cpp's
        user-defined tokens)."""
        special, plain = {}, {}  # id -> token dict
        for i, ty in enumerate(self._piece_types):
            if ty in (CONTROL, UNKNOWN, USER_DEFINED):
                kind = plain if ty == USER_DEFINED else special
                kind[i] = {"id": i, "content": self._pieces[i]}
        for t in self.added_tokens:
            special.pop(t["id"], None)
            plain.pop(t["id"], None)
            (special if t["special"] else plain)[t["id"]] = t
        for i in (self.bos_id, self.eos_id, self.pad_id):
            if i is not None:
                if not 0 <= i < self.vocab_size or self._pieces[i] is None:
                    raise ValueError(f"special id {i} is outside the vocab of {self.vocab_size}")
                if i not in plain:
                    special.setdefault(i, {"id": i, "content": self._pieces[i]})
        self._special_ids = set(special)
        self._split_ids = set(special) | set(plain)
        self._split_by_content = {t["content"]: i for d in (special, plain) for i, t in d.items()}
        self._special_by_content = {t["content"]: i for i, t in special.items()}
        self._split_matcher = AddedTokenMatcher([*special.values(), *plain.values()])
        # parse_special=False passes over the special ones (HF's encode_special_tokens)
        self._special_contents = frozenset(t["content"] for t in special.values())

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
        directory = os.path.dirname(file)
        cfg = read_tokenizer_config(directory)
        tj = os.path.join(directory, "tokenizer.json")
        tj_obj = read_json_object(tj) if os.path.isfile(tj) else None
        tok = cls(proto, chat_template=cfg["chat_templates"],
                  added_tokens=_read_added_tokens(directory, cfg))
        try:  # where a segment gets its dummy "▁", as transformers 5 reads this directory
            tok.prefix, tok.split_words = _hf_prefix_rule(cfg, tj_obj, tok.add_dummy_prefix)
        except ValueError as e:
            raise ValueError(f"{tj}: {e}") from None
        for key, attr in (("bos_token", "bos_id"), ("eos_token", "eos_id"), ("pad_token", "pad_id")):
            i = tok.token_to_id(cfg[key]) if cfg.get(key) is not None else None
            if i is not None:
                setattr(tok, attr, i)
        # BOS / EOS as transformers 5 adds them: a tokenizer.json beside the model (Llama 2's
        # layout) decides through its post_processor, whatever the config's flags say; without
        # one, add_bos_token / add_eos_token do (BOS by default, the Llama convention; EOS not).
        bos_eos = None
        if tj_obj is not None:
            post = tj_obj.get("post_processor")
            try:
                bos_eos = template_specials(post)
            except ValueError as e:
                raise ValueError(f"{tj}: {e}") from None
        if bos_eos is None:
            add_bos, add_eos = cfg.get("add_bos_token"), cfg.get("add_eos_token")
        else:
            add_bos, add_eos = (t is not None for t in bos_eos)
            for t, attr in zip(bos_eos, ("bos_id", "eos_id")):
                if t is not None and tok.token_to_id(t) is not None:
                    setattr(tok, attr, tok.token_to_id(t))
        if add_bos is not None:
            tok.add_bos = bool(add_bos) and tok.bos_id is not None
        tok.add_eos = bool(add_eos) and tok.eos_id is not None
        # eos_token etc. are special, as in transformers, even where added_tokens_decoder says
        # otherwise or the model has them as user-defined or normal pieces
        added = {t["id"]: t for t in tok.added_tokens}
        for content in named_special_tokens(cfg):
            i = tok.token_to_id(content)
            if i is not None and i not in tok._special_ids:
                added[i] = {**added.get(i, {"id": i, "content": content}), "special": True}
        tok.added_tokens = [added[i] for i in sorted(added)]
        tok._index()
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
        failed: list[ValueError] = []  # a bad document met inside sentencepiece's loop
        chunks = _training_chunks(docs, failed)
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
                # a space is "▁" inside sentencepiece: without that piece (a corpus with no
                # space, e.g. Chinese, or spaces rarer than character_coverage keeps) it fell
                # back to the bytes of "▁", and decoded as "▁", not " "
                required_chars="▁",
                train_extremely_large_corpus=False, minloglevel=2,
                hard_vocab_limit=False)  # a small corpus gets a smaller vocabulary, not an error
        except RuntimeError as e:  # e.g. "Vocabulary size is too high (8000). Must be <= 1234."
            if failed:  # sentencepiece wraps it in a RuntimeError holding a traceback
                raise failed[0] from None
            why = str(e).strip().splitlines()[-1]
            need = regex.search(r"smaller than required_chars\. \d+ vs (\d+)", why)
            if need:  # the corpus has more distinct characters than the vocab has room for
                raise ValueError(f"vocab_size {vocab_size} is too small for this corpus's "
                                 f"characters: it needs at least {need.group(1)}") from None
            if "sentences_.empty()" in why or "all_chars_count" in why:
                raise ValueError("the corpus has no text sentencepiece can train on (only "
                                 "whitespace or control characters)") from None
            raise ValueError(f"sentencepiece training failed: {why}") from None
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
        n = unpadded_length(types)
        tokens, scores, types = tokens[:n], scores[:n], types[:n]

        def get_id(key):
            v = fields.get(f"tokenizer.ggml.{key}_token_id")
            return int(v) if v is not None and 0 <= int(v) < len(tokens) else None

        proto = build_model_proto(
            tokens, scores, types, bos_id=get_id("bos"), eos_id=get_id("eos"),
            pad_id=get_id("padding"),
            add_dummy_prefix=bool(fields.get("tokenizer.ggml.add_space_prefix", True)))
        return cls(proto, add_bos=bool(fields.get("tokenizer.ggml.add_bos_token", True)),
                   add_eos=bool(fields.get("tokenizer.ggml.add_eos_token", False)),
                   chat_template=gguf_chat_templates(fields), bos_id=get_id("bos"),
                   eos_id=get_id("eos"), pad_id=get_id("padding"))

    # -- encode / decode ----------------------------------------------------------------------

    def _dummy_prefix(self, segment: str | None, at_start: bool) -> bool:
        """Does this plain segment get a dummy "▁" in front? The one place that decides, for
        encode and (segment None) decode. at_start: the segment begins the text (decode: nothing
        was output before it, as HF's Strip decoder sees it). The rules are PREFIX_RULES':
        sentencepiece / llama.cpp prefix every segment; tokenizers' Metaspace (metaspace.rs)
        skips a segment that already starts with "▁" after replacing spaces, and with
        prepend_scheme "first" prefixes only the one at offset 0 of the text. Decode cannot see whether a segment began with a space and
        strips it, as HF's Strip decoder does."""
        rule = self.prefix
        if rule == "never" or (rule == "first" and not at_start):
            return False
        if rule == "sentencepiece" or segment is None:
            return True
        return not segment.startswith((" ", "▁"))

    def encode(self, text: str, add_bos: bool | None = None, add_eos: bool | None = None,
               parse_special: bool = True) -> list[int]:
        check_text(text)
        add_bos, add_eos = self._bos_eos(add_bos, add_eos)
        ids: list[int] = [self.bos_id] if add_bos else []
        skip = frozenset() if parse_special else self._special_contents
        at = 0
        for piece, content in self._split_matcher.split(text, skip):
            if content is None:
                self._encode_segment(piece, self._dummy_prefix(piece, at == 0), ids)
            else:  # (piece may have the whitespace an lstrip / rstrip token takes along)
                ids.append(self._split_by_content[content])
            at += len(piece)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def _encode_segment(self, text: str, prefix: bool, ids: list[int]) -> None:
        """One plain segment; prefix: with the dummy "▁" in front."""
        if not self.split_words:
            self._encode_plain(text, prefix, ids)
            return
        # Metaspace(split=true): BPE never merges across "▁"; each delimiter starts a word
        # (MergedWithNext), the prefix goes on the first
        for k, m in enumerate(regex.finditer(r"[ ▁][^ ▁]*|[^ ▁]+", text)):
            self._encode_plain(m.group(), prefix and k == 0, ids)

    def _encode_plain(self, text: str, prefix: bool, ids: list[int]) -> None:
        sp = self._sp_prefixed if prefix else self._sp_bare
        if self._meta_bytes is None or "▁" not in text:
            ids.extend(sp.encode(text))
            return
        for k, part in enumerate(text.split("▁")):
            if k:
                ids.extend(self._meta_bytes)
            if part:
                ids.extend(sp.encode(part) if k == 0 else self._sp_bare.encode(part))
            elif k == 0 and prefix:
                ids.extend(self._sp_bare.encode(" "))  # the dummy prefix, before a literal "▁"

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        """sentencepiece's text for each run of ordinary ids, less the dummy prefix where encode
        puts one (_dummy_prefix); split-out tokens (control, user-defined, added) as their text
        between the runs, special ones dropped with skip_special (HF's skip_special_tokens)."""
        n = self.vocab_size
        out, run = [], []

        def flush():
            text = self._sp_bare.decode(run)
            if text.startswith(" ") and self._dummy_prefix(None, not out):
                text = text[1:]
            out.append(text)
            run.clear()

        for i in ids:
            i = int(i)
            if not 0 <= i < n or self._pieces[i] is None:
                raise ValueError(f"token id {i} is out of range for a vocab of {n}"
                                 if not 0 <= i < n else f"token id {i} has no token")
            if i in self._split_ids:
                if run:
                    flush()
                if not (skip_special and i in self._special_ids):
                    out.append(self._pieces[i])
            else:
                run.append(i)
        if run:
            flush()
        return "".join(out)

    def id_to_token(self, i: int) -> str:
        if not 0 <= i < self.vocab_size or self._pieces[i] is None:
            raise ValueError(f"token id {i} is not in the vocab of {self.vocab_size}")
        return self._pieces[i]

    def token_to_id(self, token: str) -> int | None:
        return self._piece_to_id.get(token)

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special_by_content)

    # -- save ---------------------------------------------------------------------------------

    def save(self, directory: str) -> None:
        """tokenizer.model and tokenizer_config.json with every split-out token in
        added_tokens_decoder, and the config that makes transformers 5 prefix as here
        (_hf_prefix_rule read backwards): LlamaTokenizer with legacy / add_prefix_space for the
        Metaspace rules; no tokenizer_class for "sentencepiece", so that it builds the
        tokenizer from the model's own settings. (split_words has no config form.)"""
        os.makedirs(directory, exist_ok=True)
        atomic_write_bytes(os.path.join(directory, "tokenizer.model"), self.model_proto)
        name = lambda i: self._pieces[i] if i is not None else None  # noqa: E731
        added = {t["id"]: t for t in self.added_tokens}
        decoder = {}
        for i in sorted(self._split_ids):
            t = added.get(i, {})
            decoder[str(i)] = {"content": self._pieces[i], "lstrip": bool(t.get("lstrip")),
                               "normalized": False, "rstrip": bool(t.get("rstrip")),
                               "single_word": bool(t.get("single_word")),
                               "special": i in self._special_ids}
        cfg = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": self.add_bos,
               "add_eos_token": self.add_eos, "bos_token": name(self.bos_id),
               "eos_token": name(self.eos_id), "unk_token": name(self.unk_id),
               "pad_token": name(self.pad_id), "legacy": self.prefix != "first",
               "add_prefix_space": self.prefix != "never", "clean_up_tokenization_spaces": False,
               "added_tokens_decoder": decoder}
        if self.prefix == "sentencepiece":
            del cfg["tokenizer_class"], cfg["add_prefix_space"]
        write_tokenizer_config(directory, cfg, self.chat_templates)


# transformers 5 rebuilds these classes' pipeline from tokenizer_config.json alone
# (models/llama/tokenization_llama.py): a tokenizer.json's normalizer / pre_tokenizer is ignored
_LLAMA_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast")


def _hf_prefix_rule(cfg: dict, tj: dict | None, dummy_prefix: bool) -> tuple[str, bool]:
    """(prefix rule, Metaspace split) that transformers 5 gives a model directory:
      - tokenizer_class LlamaTokenizer(Fast): Metaspace(split=false) with _get_prepend_scheme:
        "never" if add_prefix_space is false, else "always" if legacy else "first" (both
        default to the non-legacy side: add_prefix_space true, legacy false);
      - otherwise a tokenizer.json as written (tokenizers' Metaspace / Prepend normalizer);
      - otherwise the model itself (convert_slow_tokenizer.build_tokenizer_from_spm_proto):
        no dummy prefix "never", else "sentencepiece" if legacy (default true) else "first"."""
    if cfg.get("tokenizer_class") in _LLAMA_CLASSES:
        if cfg.get("add_prefix_space") is False:
            return "never", False
        return ("always" if cfg.get("legacy") else "first"), False
    if tj is not None:
        return _tokenizer_json_prefix_rule(tj)
    if not dummy_prefix:
        return "never", False
    return ("sentencepiece" if cfg.get("legacy", True) else "first"), False


def _tokenizer_json_prefix_rule(tj: dict) -> tuple[str, bool]:
    """The prefix rule of a sentencepiece-style tokenizer.json: a normalizer Prepend("▁") (Llama
    2's conversion, with Replace(" ", "▁")) prefixes every segment as sentencepiece does;
    otherwise a pre_tokenizer Metaspace's prepend_scheme (older files: add_prefix_space true =
    "always"; split defaults to true), where a normalizer Replace(^▁ -> ▁▁) in front turns
    "always" into sentencepiece's rule; neither: no prefix."""
    def steps(item, key):
        if not isinstance(item, dict):
            return []
        if item.get("type") == "Sequence":
            return [s for sub in item.get(key) or [] for s in steps(sub, key)]
        return [item]

    norms = steps(tj.get("normalizer"), "normalizers")
    if any(n.get("type") == "Prepend" and n.get("prepend") == "▁" for n in norms):
        return "sentencepiece", False
    metas = [p for p in steps(tj.get("pre_tokenizer"), "pretokenizers")
             if p.get("type") == "Metaspace"]
    if not metas:
        return "never", False
    meta = metas[0]
    if meta.get("replacement", "▁") != "▁":
        raise ValueError(f"Metaspace replacement {meta.get('replacement')!r} is not '▁'")
    scheme = meta.get("prepend_scheme") or ("always" if meta.get("add_prefix_space", True)
                                            else "never")
    if scheme not in ("always", "first", "never"):
        raise ValueError(f"unknown Metaspace prepend_scheme {scheme!r}")
    doubled = any(n.get("type") == "Replace" and (n.get("pattern") or {}).get("Regex") == "\\A▁"
                  and n.get("content") == "▁▁" for n in norms)
    return ("sentencepiece" if scheme == "always" and doubled else scheme), \
        bool(meta.get("split", True))


def _read_added_tokens(directory: str, cfg: dict) -> list[dict]:
    """HF's added tokens of a model directory: tokenizer.json `added_tokens`, then
    tokenizer_config.json `added_tokens_decoder` ({"32000": {"content": ...}}) or, in a legacy
    directory without one, added_tokens.json ({"<|im_start|>": 32000}) for other ids. As in
    transformers, an added_tokens.json entry is special only if the config names it (bos_token,
    ..., additional_special_tokens); the others are still split out of the text."""
    added: dict[int, dict] = {}
    path = os.path.join(directory, "tokenizer.json")
    if os.path.isfile(path):
        for t in read_json_object(path).get("added_tokens") or []:
            if isinstance(t, dict) and "id" in t:
                added[t["id"]] = t
    if "added_tokens_decoder" in cfg:
        decoder = cfg["added_tokens_decoder"] or {}
        if not isinstance(decoder, dict):
            raise ValueError("tokenizer_config.json: added_tokens_decoder is not an object")
        for i, t in decoder.items():
            try:
                i = int(i)
            except ValueError:
                raise ValueError(f"tokenizer_config.json: added_tokens_decoder key {i!r} is not "
                                 "a token id") from None
            if isinstance(t, str):
                t = {"content": t}
            if not isinstance(t, dict):
                raise ValueError(f"tokenizer_config.json: added_tokens_decoder[{i}] is not an "
                                 f"object: {t!r:.80}")
            added.setdefault(i, {**t, "id": i})
    elif os.path.isfile(legacy := os.path.join(directory, "added_tokens.json")):
        tokens = read_json(legacy)
        if not isinstance(tokens, dict):
            raise ValueError(f"{legacy}: expected an object of token -> id")
        extra = cfg.get("extra_special_tokens") or cfg.get("additional_special_tokens") or []
        named = {cfg.get(k) for k in SPECIAL_TOKEN_KEYS} | \
            {t.get("content") if isinstance(t, dict) else t for t in extra
             if isinstance(extra, list)}
        for content, i in tokens.items():
            if not isinstance(i, int) or isinstance(i, bool):
                raise ValueError(f"{legacy}: the id of {content!r} is not an integer: {i!r:.40}")
            added.setdefault(i, {"id": i, "content": content, "special": content in named})
    keys = ("id", "content", "special", "lstrip", "rstrip", "single_word")
    return [{k: t[k] for k in keys if k in t} for t in added.values()]


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


def _training_chunks(docs: Iterable[str], failed: list | None = None, target: int = 1000,
                     hard: int = 2000) -> Iterator[str]:
    """Paragraph-sized chunks with their newlines: cut after a blank line once a chunk has any
    text, or at `target` characters at a line end; lines longer than `hard` are cut into pieces
    (sentencepiece skips sentences longer than max_sentence_length). A document that is not a
    str or has a lone surrogate is a ValueError, also appended to `failed`."""
    for doc in docs:
        try:
            if not isinstance(doc, str):
                raise ValueError(f"training documents must be str, got {type(doc).__name__}")
            check_text(doc)  # one clear line, not pybind11's "Unable to cast" error
        except ValueError as e:
            if failed is not None:
                failed.append(e)
            raise
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


# -- a minimal protobuf reader and writer for ModelProto (no protobuf dependency) -------------

def _proto_fields(buf: bytes):
    """(field number, value) pairs of a protobuf message: varints as ints, the rest as bytes."""
    def varint(i):
        n = shift = 0
        while True:
            b = buf[i]
            n |= (b & 0x7F) << shift
            i, shift = i + 1, shift + 7
            if b < 0x80:
                return n, i

    i = 0
    while i < len(buf):
        key, i = varint(i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            val, i = varint(i)
        elif wire in (1, 5):  # fixed 64 / 32 bits
            size = 8 if wire == 1 else 4
            val, i = buf[i:i + size], i + size
        elif wire == 2:  # length-delimited
            size, i = varint(i)
            val, i = buf[i:i + size], i + size
        else:
            raise ValueError(f"unexpected protobuf wire type {wire} in the sentencepiece model")
        yield num, val


def spm_piece_types(proto: bytes) -> tuple[list[int], bool]:
    """(each piece's type, add_dummy_prefix) from a sentencepiece ModelProto, read by hand (no
    protobuf dependency): field 1 is the repeated SentencePiece {1: piece, 2: score, 3: type,
    default 1 normal; 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte}; field 3 the
    NormalizerSpec {3: add_dummy_prefix, default true}."""
    types, dummy_prefix = [], True
    for num, val in _proto_fields(proto):
        if num == 1:
            types.append(next((v for n, v in _proto_fields(val) if n == 3), 1))
        elif num == 3:
            dummy_prefix = bool(next((v for n, v in _proto_fields(val) if n == 3), 1))
    return types, dummy_prefix


def _set_dummy_prefix(proto: bytes, on: bool) -> bytes:
    """The ModelProto with NormalizerSpec.add_dummy_prefix = on: a second normalizer_spec
    (field 3) holding only that field (3), which protobuf merges into the first (the last value
    of a scalar wins)."""
    return proto + _field(3, _field(3, on))


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
