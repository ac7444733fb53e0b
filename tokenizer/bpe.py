"""Byte-level BPE (GPT-2 family: GPT-2, SmolLM, Llama 3, Qwen2), written from scratch.

Follows the GPT-2 encoder (bytes_to_unicode, merges by rank), Hugging Face `tokenizers`'
tokenizer.json semantics (added tokens split out first, leftmost-longest; normalizer none or
Unicode NFC / NFD / NFKC / NFKD (Qwen2 has NFC); pre-tokenizer Sequence / Split / Digits /
ByteLevel; ByteLevel decoder) and llama.cpp's llama-vocab.cpp for the pre-tokenizer regexes
chosen by GGUF `tokenizer.ggml.pre` name (shared/FORMATS.md sections 4, 5).

Pipeline for encode(text):
  1. split out added/special tokens (leftmost-longest match) -> their ids directly: as HF, the
     ones with normalized=false in the raw text, then the normalized=true ones in each
     remaining segment after normalization;
  2. pre-tokenize each remaining segment: every step splits
     every current piece (regex splits keep the unmatched gaps as pieces, like llama.cpp and HF
     `Isolated`); the ByteLevel step maps each piece's UTF-8 bytes to printable characters;
  3. BPE each piece: repeatedly merge the adjacent pair with the lowest merge rank (leftmost on
     ties), then map symbols to ids. Results are cached per piece, so a 5 MB corpus takes seconds.
"""
from __future__ import annotations

import heapq
import json
import os
import unicodedata
from functools import lru_cache

import regex

from tokenizer.base import AddedTokenMatcher, Tokenizer, atomic_write_text, check_text, \
    gguf_chat_templates, named_special_tokens, read_json_object, read_tokenizer_config, \
    template_specials, unpadded_length, write_tokenizer_config

# GPT-2's pattern as Hugging Face's ByteLevel pre-tokenizer spells it (trailing `|\s+` included).
BYTELEVEL_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _split(pattern: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}


def _byte_level(use_regex: bool) -> dict:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


# llama.cpp pre-tokenizer names -> the equivalent tokenizer.json `pre_tokenizer` config.
PRE_TOKENIZERS: dict[str, dict] = {
    "gpt-2": _byte_level(True),
    "smollm": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, _byte_level(True)]},
    "llama-bpe": {"type": "Sequence", "pretokenizers": [_split(LLAMA3_PATTERN), _byte_level(False)]},
    "qwen2": {"type": "Sequence", "pretokenizers": [_split(QWEN2_PATTERN), _byte_level(False)]},
    # llama.cpp's fallback for BPE vocabularies without a known `pre` name.
    "default": {"type": "Sequence", "pretokenizers": [
        _split(r"[\p{P}\$\+<=>\^~\|]+"), _split(GPT2_PATTERN), _split(r"\p{N}+"),
        _split(r"[0-9][0-9][0-9]"), _byte_level(False)]},
}
# Other llama.cpp names that use the same regexes (llama-vocab.cpp groups them in one `case`).
PRE_TOKENIZER_ALIASES = {
    "gpt2": "gpt-2", "mpt": "gpt-2", "olmo": "gpt-2", "jais": "gpt-2", "trillion": "gpt-2",
    "starcoder": "smollm", "refact": "smollm", "command-r": "smollm", "codeshell": "smollm",
    "exaone": "smollm", "minerva-7b": "smollm",
    "llama3": "llama-bpe", "dbrx": "llama-bpe", "smaug-bpe": "llama-bpe",
    "llama-v3": "llama-bpe", "falcon3": "llama-bpe", "falcon-h1": "llama-bpe",
    "pixtral": "llama-bpe", "midm-2.0": "llama-bpe", "lfm2": "llama-bpe",
    "stablelm2": "qwen2", "hunyuan": "qwen2", "deepseek-r1-qwen": "qwen2", "kormo": "qwen2",
    "megrez": "qwen2",
}


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (space -> 'Ġ', newline -> 'Ċ')."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, n = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:  # the 68 unprintable bytes go, in order, to U+0100 onwards
            table[b] = chr(256 + n)
            n += 1
    return table


# str.translate table from latin-1 code points (= raw bytes) to the byte-level characters.
_BYTE_TRANSLATE = {b: c for b, c in bytes_to_unicode().items()}
_BYTE_DECODER = {c: b for b, c in bytes_to_unicode().items()}


def _to_byte_chars(piece: str) -> str:
    return piece.encode("utf-8").decode("latin-1").translate(_BYTE_TRANSLATE)


# ---------------------------------------------------------------------------------------------
# Pre-tokenizer: a list of steps, each mapping a list of pieces to a finer list of pieces.

class _RegexSplit:
    """HF `Split` with a regex: matches and the gaps between them, combined per `behavior`."""

    BEHAVIORS = ("isolated", "removed", "merged_with_previous", "merged_with_next", "contiguous")

    def __init__(self, pattern: str, behavior: str = "isolated", invert: bool = False):
        behavior = regex.sub(r"(?<!^)(?=[A-Z])", "_", behavior).lower()  # "MergedWithNext" -> snake
        if behavior not in self.BEHAVIORS:
            raise ValueError(f"unsupported Split behavior {behavior!r}; supported: {self.BEHAVIORS}")
        try:
            self.rx = regex.compile(pattern)
        except regex.error as e:
            raise ValueError(f"bad pre-tokenizer regex {pattern!r}: {e}") from None
        self.behavior, self.invert = behavior, invert
        # Fast path: regex.split with one capturing group returns gaps and matches interleaved.
        wrapped = regex.compile(f"({pattern})")
        self.fast = wrapped if behavior == "isolated" and not invert and wrapped.groups == 1 else None

    def spans(self, s: str):
        """Yield (text, is_match) covering s in order."""
        pos = 0
        for m in self.rx.finditer(s):
            if m.start() == m.end():
                continue
            if m.start() > pos:
                yield s[pos:m.start()], self.invert
            yield m.group(), not self.invert
            pos = m.end()
        if pos < len(s):
            yield s[pos:], self.invert

    def __call__(self, pieces: list[str]) -> list[str]:
        out: list[str] = []
        if self.fast is not None:
            for p in pieces:
                out.extend(x for x in self.fast.split(p) if x)
            return out
        for p in pieces:
            if self.behavior == "removed":
                out.extend(t for t, m in self.spans(p) if not m)
                continue
            # Same folds as tokenizers' NormalizedString::split (normalizer.rs).
            acc: list[str] = []
            prev_match = False
            spans = list(self.spans(p))
            if self.behavior == "merged_with_next":
                spans.reverse()
            for t, m in spans:
                if self.behavior == "isolated":
                    acc.append(t)
                elif self.behavior == "contiguous":
                    if acc and m == prev_match:
                        acc[-1] += t
                    else:
                        acc.append(t)
                elif m and not prev_match and acc:  # merge the delimiter into its neighbour
                    acc[-1] = acc[-1] + t if self.behavior == "merged_with_previous" else t + acc[-1]
                else:
                    acc.append(t)
                prev_match = m
            out.extend(reversed(acc) if self.behavior == "merged_with_next" else acc)
        return out


class _ByteLevel:
    """HF `ByteLevel` pre-tokenizer: optional prefix space, optional GPT-2 split, byte mapping."""

    def __init__(self, add_prefix_space: bool = False, use_regex: bool = True):
        self.add_prefix_space = add_prefix_space
        self.split = _RegexSplit(BYTELEVEL_PATTERN) if use_regex else None

    def __call__(self, pieces: list[str]) -> list[str]:
        if self.add_prefix_space:
            pieces = [p if p.startswith(" ") else " " + p for p in pieces]
        if self.split is not None:
            pieces = self.split(pieces)
        return [_to_byte_chars(p) for p in pieces]


def _build_steps(config: dict) -> list:
    kind = config.get("type")
    if kind == "Sequence":
        return [s for sub in config["pretokenizers"] for s in _build_steps(sub)]
    if kind == "Split":
        pat = config["pattern"]
        pattern = pat["Regex"] if "Regex" in pat else regex.escape(pat["String"])
        return [_RegexSplit(pattern, config.get("behavior", "Isolated"), config.get("invert", False))]
    if kind == "Digits":
        return [_RegexSplit(r"\p{N}", "isolated" if config.get("individual_digits") else "contiguous")]
    if kind == "ByteLevel":
        return [_ByteLevel(config.get("add_prefix_space", False), config.get("use_regex", True))]
    raise ValueError(f"unsupported pre_tokenizer type {kind!r} (supported: Sequence, Split, Digits, "
                     "ByteLevel)")


class PreTokenizer:
    """Splits text into pieces (already mapped to byte-level characters) for BPE."""

    def __init__(self, config: dict | str):
        if isinstance(config, str):
            name = PRE_TOKENIZER_ALIASES.get(config, config)
            if name not in PRE_TOKENIZERS:
                raise ValueError(f"unknown pre-tokenizer {config!r}; known: "
                                 f"{sorted(PRE_TOKENIZERS) + sorted(PRE_TOKENIZER_ALIASES)}")
            config = PRE_TOKENIZERS[name]
        self.config = config
        self.steps = _build_steps(config)
        if not any(isinstance(s, _ByteLevel) for s in self.steps):
            raise ValueError("pre_tokenizer has no ByteLevel step: not a byte-level BPE tokenizer")

    def __call__(self, text: str) -> list[str]:
        pieces = [text] if text else []
        for step in self.steps:
            pieces = step(pieces)
        return pieces


def _unicode_forms(config: dict | None) -> list[str]:
    """The unicodedata forms of a tokenizer.json `normalizer`: none, NFC / NFD / NFKC / NFKD, or
    a Sequence of them (the only ones byte-level BPE tokenizers use: Qwen2 has NFC)."""
    if not config:
        return []
    kind = config.get("type")
    if kind == "Sequence":
        return [f for sub in config.get("normalizers", []) for f in _unicode_forms(sub)]
    if kind in ("NFC", "NFD", "NFKC", "NFKD"):
        return [kind]
    raise ValueError(f"unsupported normalizer type {kind!r} for byte-level BPE (supported: none, "
                     "NFC, NFD, NFKC, NFKD)")


# ---------------------------------------------------------------------------------------------

# Pre-tokenizers of llama.cpp's LLAMA3 pre-type branch (llama-vocab.cpp): BOS when the file has
# no tokenizer.ggml.add_bos_token (any other BPE file adds none by default), and ignore_merges
# (a piece that is a whole token is that token, as Llama 3's tokenizer.json says too).
GGUF_LLAMA3_PRE = frozenset({"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                             "midm-2.0", "lfm2"})


class ByteLevelBPETokenizer(Tokenizer):
    """Byte-level BPE over a vocab and a ranked merge list, with added/special tokens."""

    CACHE_LIMIT = 1 << 20  # pieces kept in the per-piece cache before it is cleared

    def __init__(self, vocab: dict[str, int] | list[str], merges: list, *,
                 pre_tokenizer: dict | str = "gpt-2", added_tokens: list[dict] | None = None,
                 bos_id: int | None = None, eos_id: int | None = None, pad_id: int | None = None,
                 unk_id: int | None = None, add_bos: bool = False, add_eos: bool = False,
                 chat_template: str | dict[str, str] | None = None,
                 ignore_merges: bool = False, normalizer: dict | None = None):
        """vocab: token -> id, or the list of tokens by id (GGUF order; duplicates keep their ids,
        encoding uses the first). merges: "a b" strings or (a, b) pairs, by rank. normalizer: a
        tokenizer.json `normalizer` config, applied to the text between added tokens. chat_template:
        a template, or {name: template} (see Tokenizer.chat_templates)."""
        if isinstance(vocab, dict):
            self.vocab, self.id_to_tok = dict(vocab), {i: t for t, i in vocab.items()}
        else:
            self.id_to_tok = dict(enumerate(vocab))
            self.vocab = {}
            for i, t in enumerate(vocab):
                self.vocab.setdefault(t, i)
        self.merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
        bad = next((m for m in self.merges if len(m) != 2), None)
        if bad is not None:
            raise ValueError(f"bad merge {bad!r}: expected two symbols")
        self.ranks = {m: r for r, m in enumerate(self.merges)}
        self.pre_tokenizer = pre_tokenizer if isinstance(pre_tokenizer, PreTokenizer) \
            else PreTokenizer(pre_tokenizer)
        self.ignore_merges = ignore_merges
        self.normalizer = normalizer or None
        self._unicode_forms = _unicode_forms(normalizer)
        # Added tokens: {"id", "content", "special", "lstrip", "rstrip", "single_word",
        # "normalized"} as in tokenizer.json; normalized defaults to False (llama.cpp matches
        # every token in the raw text; GGUF has no such flag).
        self.added_tokens = [dict(t) for t in (added_tokens or [])]
        for t in self.added_tokens:
            t.setdefault("special", True)
            t.setdefault("normalized", False)
            self.vocab.setdefault(t["content"], t["id"])
            self.id_to_tok[t["id"]] = t["content"]
        self.vocab_size = max(self.id_to_tok) + 1 if self.id_to_tok else 0
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = bos_id, eos_id, pad_id, unk_id
        for name in ("bos_id", "eos_id", "pad_id", "unk_id"):
            v = getattr(self, name)
            if v is not None and v not in self.id_to_tok:
                raise ValueError(f"{name}={v} is not a token id (vocab has {self.vocab_size} ids)")
        self.add_bos, self.add_eos = add_bos, add_eos
        self.chat_templates = chat_template
        self._added_by_content = {t["content"]: t["id"] for t in self.added_tokens}
        self._special_ids = {t["id"] for t in self.added_tokens if t["special"]}
        # HF matches normalized=false tokens in the raw text first, then normalized=true ones in
        # the normalized text between those (the order matters where two tokens overlap).
        self._raw_added = AddedTokenMatcher([t for t in self.added_tokens if not t["normalized"]])
        self._norm_added = AddedTokenMatcher([t for t in self.added_tokens if t["normalized"]])
        # parse_special=False passes over special tokens only (HF's encode_special_tokens);
        # non-special added tokens (llama.cpp's user-defined ones) are still split out.
        self._special_contents = frozenset(t["content"] for t in self.added_tokens if t["special"])
        self._cache: dict[str, list[int]] = {}
        self._token_bytes: list[bytes] | None = None

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_tokenizer_json(cls, path: str) -> "ByteLevelBPETokenizer":
        """Load a HF `tokenizer.json` (a file, or a directory with tokenizer_config.json beside it)."""
        directory = path if os.path.isdir(path) else os.path.dirname(path)
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        tj = read_json_object(file)
        model = tj.get("model") or {}
        if model.get("type") != "BPE" or "merges" not in model:
            raise ValueError(f"{file}: model type {model.get('type')!r} is not BPE with merges")
        if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
            raise ValueError(f"{file}: subword prefix/suffix BPE is not byte-level BPE")
        try:
            _unicode_forms(tj.get("normalizer"))
        except ValueError as e:
            raise ValueError(f"{file}: {e}") from None
        decoder = tj.get("decoder")
        if decoder and decoder.get("type") != "ByteLevel":  # it would be ignored: wrong text
            raise ValueError(f"{file}: decoder {decoder.get('type')!r} is not supported for "
                             "byte-level BPE (expected ByteLevel)")
        if not tj.get("pre_tokenizer"):
            raise ValueError(f"{file}: no pre_tokenizer (expected ByteLevel for byte-level BPE)")
        cfg = read_tokenizer_config(directory)
        keys = ("id", "content", "special", "lstrip", "rstrip", "single_word", "normalized")
        added = [{k: t[k] for k in keys if k in t} for t in tj.get("added_tokens", [])]
        for t in added:  # HF's AddedToken default: special tokens are not normalized
            t.setdefault("normalized", not t.get("special", True))
        vocab = dict(model["vocab"])
        for t in added:
            vocab.setdefault(t["content"], t["id"])
        by_content = {t["content"]: t for t in added}
        for content in named_special_tokens(cfg):  # eos_token etc. are special, as transformers
            if content in by_content:
                by_content[content]["special"] = True
            elif content in vocab:  # a plain vocab entry becomes a special added token
                by_content[content] = {"id": vocab[content], "content": content, "special": True,
                                       "normalized": False}
                added.append(by_content[content])

        bos_id, eos_id, pad_id = (vocab.get(cfg.get(k))
                                  for k in ("bos_token", "eos_token", "pad_token"))
        try:
            bos_eos = template_specials(tj.get("post_processor"))
        except ValueError as e:
            raise ValueError(f"{file}: {e}") from None
        if bos_eos is None:  # no post_processor: the config's flags (transformers 4's rule)
            add_bos, add_eos = cfg.get("add_bos_token"), cfg.get("add_eos_token")
        else:  # "<|begin_of_text|> $A", "<s> $A </s>": the template decides, as in transformers 5
            add_bos, add_eos = (t is not None for t in bos_eos)
            bos_id = vocab.get(bos_eos[0], bos_id) if add_bos else bos_id
            eos_id = vocab.get(bos_eos[1], eos_id) if add_eos else eos_id
        return cls(vocab, model["merges"], pre_tokenizer=tj["pre_tokenizer"], added_tokens=added,
                   bos_id=bos_id, eos_id=eos_id, pad_id=pad_id,
                   unk_id=vocab.get(model["unk_token"]) if model.get("unk_token") else None,
                   add_bos=bool(add_bos) and bos_id is not None,
                   add_eos=bool(add_eos) and eos_id is not None,
                   chat_template=cfg["chat_templates"],
                   ignore_merges=bool(model.get("ignore_merges", False)),
                   normalizer=tj.get("normalizer"))

    @classmethod
    def from_gguf_metadata(cls, fields: dict) -> "ByteLevelBPETokenizer":
        """Build from GGUF tokenizer metadata (`tokenizer.ggml.model` == "gpt2").

        `fields` maps GGUF keys to plain values (str, int, bool, lists), e.g.
        `{k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}`.
        """
        tokens = fields.get("tokenizer.ggml.tokens")
        merges = fields.get("tokenizer.ggml.merges")
        if not tokens or merges is None:
            raise ValueError("GGUF metadata lacks tokenizer.ggml.tokens or tokenizer.ggml.merges")
        types = fields.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        tokens = tokens[:unpadded_length(types)]
        # 3 = control (special), 4 = user defined: both are split out before pre-tokenization.
        added = [{"id": i, "content": t, "special": types[i] == 3}
                 for i, t in enumerate(tokens) if types[i] in (3, 4)]

        def get_id(key):
            v = fields.get(f"tokenizer.ggml.{key}_token_id")
            return int(v) if v is not None and 0 <= int(v) < len(tokens) else None

        # No unk for BPE: llama.cpp (and HF without model.unk_token) drop a symbol missing from
        # the vocab, e.g. byte 0x1d in SmolLM2, rather than emit tokenizer.ggml.unknown_token_id.
        return cls(list(tokens), merges, pre_tokenizer=fields.get("tokenizer.ggml.pre") or "default",
                   added_tokens=added, bos_id=get_id("bos"), eos_id=get_id("eos"),
                   pad_id=get_id("padding"),
                   add_bos=bool(fields.get("tokenizer.ggml.add_bos_token",
                                           fields.get("tokenizer.ggml.pre") in GGUF_LLAMA3_PRE)),
                   add_eos=bool(fields.get("tokenizer.ggml.add_eos_token", False)),
                   chat_template=gguf_chat_templates(fields),
                   ignore_merges=fields.get("tokenizer.ggml.pre") in GGUF_LLAMA3_PRE)

    # -- encode -------------------------------------------------------------------------------

    def _segments(self, text: str, parse_special: bool):
        """Yield (normalized text, None) for plain text and (piece, id) for each added token."""
        skip = frozenset() if parse_special else self._special_contents
        for seg, content in self._raw_added.split(text, skip):
            if content is not None:
                yield seg, self._added_by_content[content]
                continue
            for form in self._unicode_forms:
                seg = unicodedata.normalize(form, seg)
            for piece, content2 in self._norm_added.split(seg, skip):
                yield piece, (None if content2 is None else self._added_by_content[content2])

    def _bpe(self, piece: str) -> list[int]:
        """Ids of one pre-tokenized piece (byte-level characters).

        As HF's Word::merge_all: characters missing from the vocab become unk (which merges with
        nothing) or are dropped before merging, so their neighbours may merge; then the adjacent
        pair of lowest rank (leftmost on ties) is merged until none is left. A heap of
        (rank, position) over a linked list of symbols keeps a long piece O(n log n): rescanning
        the whole piece per merge took minutes on a 100k-character word."""
        vocab = self.vocab
        if self.ignore_merges and piece in vocab:
            return [vocab[piece]]
        unk = self.unk_id
        syms: list[str | None] = [c for c in piece if c in vocab or unk is not None]
        n = len(syms)
        if n > 1:
            ranks = self.ranks
            nxt = list(range(1, n + 1))
            nxt[-1] = -1
            prv = list(range(-1, n - 1))
            heap = [(r, i) for i in range(n - 1)
                    if (r := ranks.get((syms[i], syms[i + 1]))) is not None]
            heapq.heapify(heap)
            while heap:
                r, i = heapq.heappop(heap)
                j = nxt[i]
                # stale entry: symbol i was merged away, or its pair has changed since the push
                if syms[i] is None or j < 0 or ranks.get((syms[i], syms[j])) != r:
                    continue
                syms[i], syms[j] = syms[i] + syms[j], None
                k = nxt[i] = nxt[j]
                if k >= 0:
                    prv[k] = i
                    if (r2 := ranks.get((syms[i], syms[k]))) is not None:
                        heapq.heappush(heap, (r2, i))
                if (h := prv[i]) >= 0 and (r2 := ranks.get((syms[h], syms[i]))) is not None:
                    heapq.heappush(heap, (r2, h))
        ids = (vocab.get(s, unk) for s in syms if s is not None)
        return [i for i in ids if i is not None]  # (a merge result missing from the vocab)

    def encode(self, text: str, add_bos: bool | None = None, add_eos: bool | None = None,
               parse_special: bool = True) -> list[int]:
        check_text(text)
        add_bos, add_eos = self._bos_eos(add_bos, add_eos)
        ids: list[int] = [self.bos_id] if add_bos else []
        cache = self._cache
        for seg, tid in self._segments(text, parse_special):
            if tid is not None:
                ids.append(tid)
                continue
            for piece in self.pre_tokenizer(seg):
                out = cache.get(piece)
                if out is None:
                    if len(cache) >= self.CACHE_LIMIT:
                        cache.clear()
                    out = cache[piece] = self._bpe(piece)
                ids.extend(out)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    # -- decode -------------------------------------------------------------------------------

    def _bytes_table(self) -> list[bytes]:
        if self._token_bytes is None:
            table = [b""] * self.vocab_size
            added = set(self._added_by_content.values())
            for i, tok in self.id_to_tok.items():
                if i not in added and all(c in _BYTE_DECODER for c in tok):
                    table[i] = bytes(_BYTE_DECODER[c] for c in tok)
                else:  # added tokens, and (as HF's ByteLevel decoder does) unmappable tokens: raw
                    table[i] = tok.encode("utf-8")
            self._token_bytes = table
        return self._token_bytes

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        table, n = self._bytes_table(), self.vocab_size
        out = bytearray()
        for i in ids:
            i = int(i)
            if not 0 <= i < n or i not in self.id_to_tok:
                raise ValueError(f"token id {i} is out of range for a vocab of {n}")
            if skip_special and i in self._special_ids:
                continue
            out += table[i]
        return out.decode("utf-8", errors="replace")

    def id_to_token(self, i: int) -> str:
        return self.id_to_tok[i]

    def token_to_id(self, token: str) -> int | None:
        return self.vocab.get(token)

    @property
    def special_tokens(self) -> dict[str, int]:
        return {t["content"]: t["id"] for t in self.added_tokens if t["special"]}

    # -- save ---------------------------------------------------------------------------------

    def to_tokenizer_json(self) -> dict:
        """This tokenizer as a HF tokenizer.json dict (loadable by the `tokenizers` library)."""
        added = sorted(self.added_tokens, key=lambda t: t["id"])
        # BOS / EOS as transformers' update_post_processor writes them: "<s> $A </s>"
        ends = [(self.id_to_tok[i], i, first) for i, first in ((self.bos_id, True), (self.eos_id, False))
                if i is not None and (self.add_bos if first else self.add_eos)]
        post = None
        if ends:
            def seq(name, type_id):
                s = [{"Sequence": {"id": name, "type_id": type_id}}]
                for t, _, first in ends:
                    s.insert(0 if first else len(s), {"SpecialToken": {"id": t, "type_id": type_id}})
                return s
            post = {"type": "TemplateProcessing", "single": seq("A", 0),
                    "pair": seq("A", 0) + seq("B", 1),
                    "special_tokens": {t: {"id": t, "ids": [i], "tokens": [t]} for t, i, _ in ends}}
        return {
            "version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": t["id"], "content": t["content"],
                              "single_word": bool(t.get("single_word")),
                              "lstrip": bool(t.get("lstrip")), "rstrip": bool(t.get("rstrip")),
                              "normalized": bool(t["normalized"]), "special": bool(t["special"])}
                             for t in added],
            "normalizer": self.normalizer,
            "pre_tokenizer": self.pre_tokenizer.config,
            "post_processor": post,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                        "use_regex": True},
            "model": {"type": "BPE", "dropout": None,
                      "unk_token": self.id_to_tok[self.unk_id] if self.unk_id is not None else None,
                      "continuing_subword_prefix": None, "end_of_word_suffix": None,
                      "fuse_unk": False, "byte_fallback": False, "ignore_merges": self.ignore_merges,
                      # added tokens stay in the model vocab too, or HF would give them new ids
                      "vocab": dict(sorted(self.vocab.items(), key=lambda x: x[1])),
                      "merges": [list(m) for m in self.merges]},
        }

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        atomic_write_text(os.path.join(directory, "tokenizer.json"),
                          json.dumps(self.to_tokenizer_json(), ensure_ascii=False, indent=1))
        name = lambda i: self.id_to_tok[i] if i is not None else None  # noqa: E731
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": self.add_bos,
               "add_eos_token": self.add_eos, "bos_token": name(self.bos_id),
               "eos_token": name(self.eos_id),
               "pad_token": name(self.pad_id), "unk_token": name(self.unk_id),
               "clean_up_tokenization_spaces": False, "model_max_length": 1 << 30}
        write_tokenizer_config(directory, cfg, self.chat_templates)

