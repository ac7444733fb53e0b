"""train.py end to end on tiny generated corpora: learning, resume, outputs, bad input."""
import json
import math
import os
import random
import subprocess
import sys
from collections import Counter

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402
from demo_assets import word_corpus  # noqa: E402

TINY = ["--preset", "tiny", "--vocab-size", "300", "--batch-size", "8", "--seq-len", "32",
        "--no-progress", "--threads", "1", "--warmup-steps", "5", "--log-every", "5"]


@pytest.fixture()
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("WHETSTONE_CACHE", str(tmp_path / "cache"))
    rng = random.Random(0)
    words = ["the king", "my lord", "good night", "sweet prince", "to be", "or not", "alas"]
    lines = [" ".join(rng.choice(words) for _ in range(6)) + "." for _ in range(1500)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(l) for l in f]


def test_learns_far_below_unigram_entropy(corpus, tmp_path):
    run = str(tmp_path / "run")
    assert train.main(["--data", str(corpus), "--out", run, "--max-steps", "120",
                       "--eval-every", "40", "--lr", "3e-3", *TINY]) == 0
    from tokenizer import load_tokenizer
    tok = load_tokenizer(run)
    text = corpus.read_text()
    ids = tok.encode(text[int(len(text) * 0.9):], add_bos=False)
    counts = Counter(ids)
    unigram = -sum(c / len(ids) * math.log(c / len(ids)) for c in counts.values())
    final = [e for e in metrics(run) if e.get("final")][0]
    assert final["val_loss"] < 0.5 * unigram, (final, unigram)
    # outputs: HF-format checkpoint, tokenizer, metrics events, loss curve, resumable state
    for name in ("config.json", "model.safetensors", "tokenizer.model", "metrics.jsonl",
                 "loss.png", "last/training_state.pt"):
        assert os.path.isfile(os.path.join(run, name)), name
    ev = metrics(run)
    assert any({"step", "elapsed_s", "train_loss", "lr", "tokens_per_s"} <= e.keys() for e in ev)
    assert any({"step", "elapsed_s", "val_loss", "val_ppl", "val_bpb"} <= e.keys() for e in ev)
    e = [e for e in ev if "val_loss" in e][0]
    assert math.isclose(e["val_ppl"], math.exp(e["val_loss"]), rel_tol=1e-6)


def test_resume_gives_identical_losses(corpus, tmp_path):
    common = ["--data", str(corpus), "--max-steps", "30", "--eval-every", "10", *TINY]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    assert train.main([*common, "--out", full]) == 0
    assert train.main([*common, "--out", part, "--pause-at-step", "10"]) == 0
    assert train.main(["--resume", part, "--no-progress", "--threads", "1"]) == 0
    losses = lambda run: [(e["step"], e.get("train_loss"), e.get("val_loss")) for e in metrics(run)
                          if not e.get("final")]
    a, b = losses(full), losses(part)
    assert [s for s, *_ in a] == [s for s, *_ in b]
    for (s, tl1, vl1), (_, tl2, vl2) in zip(a, b):
        assert tl1 == pytest.approx(tl2, abs=1e-5) if tl1 is not None else tl2 is None, s
        assert vl1 == pytest.approx(vl2, abs=1e-5) if vl1 is not None else vl2 is None, s


def run_cli(*args, env=None):
    env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


@pytest.mark.parametrize("make, flags, message", [
    (None, ["--data", "/nonexistent/x.txt"], "corpus not found"),
    ("", [], "is empty"),
    ("hello there\n" * 3, ["--val-fraction", "0.5"], "fewer than one training window"),
    pytest.param("\0" * 5000, [], "c.txt is not a text file (only NUL bytes)",  # was sentencepiece's
                 id="nul-only"),                                            # "INTERNAL: ... all_chars_count"
    pytest.param(" \n\t\n" * 100, [], "corpus {tmp}/c.txt has no text: only whitespace",
                 id="whitespace-only"),
    (None, ["--top-k", "3"], "unrecognized arguments"),
    (None, ["--batch-size", "0"], "--batch-size must be >= 1"),
    (None, ["--preset", "huge"], "unknown preset 'huge'"),
    ("hello there, my lord\n" * 300, ["--pack"], "--pack applies only to SFT or preference"),
    ("hello there, my lord\n" * 300, ["--bad-lines", "skip"], "--bad-lines skip applies only"),
])
def test_bad_input_one_clear_line(tmp_path, make, flags, message):
    args = list(flags)
    if make is not None:
        p = tmp_path / "c.txt"
        p.write_text(make)
        args = ["--data", str(p), *args]
    r = run_cli("--out", str(tmp_path / "o"), *TINY, *args, env={"WHETSTONE_CACHE": str(tmp_path)})
    assert r.returncode == 2, r.stderr
    assert message.replace("{tmp}", str(tmp_path)) in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "o").exists()  # nothing was written: no empty run directory left


def test_invalid_utf8_is_replaced_and_counted(tmp_path, capsys):
    from engine.data import read_documents
    p = tmp_path / "bad.txt"
    p.write_bytes(b"good text \xff\xfe more\n")
    [text] = read_documents(str(p))
    assert "\ufffd" in text
    assert "2 invalid UTF-8" in capsys.readouterr().out


def test_utf16_and_byte_order_marks_are_read_as_text(tmp_path, capsys):
    """UTF-16 with a BOM (Windows PowerShell's `>`) was read as UTF-8: a NUL in every other
    byte, with a warning of only 2 invalid sequences; a UTF-8 BOM was kept as text."""
    from engine.data import read_documents
    text = "the king, café\nmy lord 😀\n"
    (tmp_path / "a.txt").write_bytes(text.encode("utf-16"))  # little-endian, with its BOM
    (tmp_path / "b.txt").write_bytes(("\ufeff" + text).encode("utf-16-be"))
    (tmp_path / "c.txt").write_bytes(text.encode("utf-8-sig"))
    assert read_documents(str(tmp_path)) == [text] * 3
    assert capsys.readouterr().out == ""


def test_directory_files_do_not_run_into_each_other(tmp_path):
    """A file without a final newline had its last line glued to the next file's first
    ("The EndChapter 2"); now each file is a document (an empty one is none), nested files too,
    and the text a tokenizer trains on puts a line break between them."""
    from engine.data import read_corpus, read_documents
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("The End")
    (tmp_path / "b.txt").write_text("")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "one doc"}) + "\n")
    (tmp_path / "sub" / "d.txt").write_text("Chapter 2\n")
    assert read_documents(str(tmp_path)) == ["The End", "one doc", "Chapter 2\n"]
    assert read_corpus(str(tmp_path)).text == "The End\none doc\nChapter 2\n"


def test_binary_files_are_skipped_in_a_directory_and_refused_as_the_corpus(tmp_path, capsys):
    """An image or an archive beside the .txt files was decoded (a warning counted its invalid
    UTF-8) and trained on as text; now each is skipped, one warning line names them. Given as
    the corpus itself, a binary file is an error naming it."""
    import zipfile
    import zlib
    from engine.data import read_documents
    d = tmp_path / "corpus"
    (d / "img").mkdir(parents=True)
    (d / "a.txt").write_text("the king\nmy lord\n")
    png = (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10\x00\x00\x00\x10\x08\x02"
           + zlib.compress(bytes(range(256)) * 4))
    (d / "img" / "pic.png").write_bytes(png)
    with zipfile.ZipFile(d / "b.zip", "w") as z:
        z.writestr("x.txt", "hello " * 100)
    (d / "c.txt").write_bytes("sweet prince\n".encode("utf-16"))  # NULs, but a BOM: text
    assert read_documents(str(d)) == ["the king\nmy lord\n", "sweet prince\n"]
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [f"warning: {d}: skipped 2 binary file(s) (NUL bytes, not text): "
                   f"b.zip, {os.path.join('img', 'pic.png')}"], out
    with pytest.raises(ValueError, match=r"pic\.png is not a text file \(NUL bytes in its first "
                                         r"8000 bytes: binary data, or UTF-16 text without"):
        read_documents(str(d / "img" / "pic.png"))
    with pytest.raises(ValueError, match=r"corpus directory .*img holds no text, only 1 binary "
                                         r"file\(s\) \(NUL bytes\): pic\.png"):
        read_documents(str(d / "img"))


def test_a_training_split_without_text_is_one_clear_error(tmp_path, monkeypatch):
    """Only newlines (or only NULs) in the text a tokenizer trains on: sentencepiece said
    'INTERNAL: src/trainer_interface.cc(467) [!sentences_.empty()]'."""
    from engine.data import load_or_train_tokenizer
    monkeypatch.setenv("WHETSTONE_CACHE", str(tmp_path))
    for text in ("\n" * 100, "\0" * 100):
        with pytest.raises(ValueError, match="the training split has no text to train a tokenizer"):
            load_or_train_tokenizer(text, 300, None)


def test_existing_checkpoint_is_not_overwritten(corpus, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    r = run_cli("--data", str(corpus), "--out", str(run), *TINY,
                env={"WHETSTONE_CACHE": str(tmp_path)})
    assert r.returncode == 2 and "already holds a checkpoint" in r.stderr
    assert (run / "config.json").read_text() == "{}"


def test_a_tokenizer_left_in_out_is_not_reused_by_a_new_run(corpus, tmp_path):
    """A failed torchrun launch leaves rank 0's tokenizer in --out (its other ranks load it from
    there) but no run; a new run there with other data must train its own, not reuse that one."""
    from tokenizer.spm import SentencePieceTokenizer
    run = tmp_path / "run"
    SentencePieceTokenizer.train("ab ba\n" * 50, str(run), vocab_size=270)
    stale = (run / "tokenizer.model").read_bytes()
    assert train.main(["--data", str(corpus), "--out", str(run), *TINY, "--max-steps", "1"]) == 0
    assert (run / "tokenizer.model").read_bytes() != stale
    assert json.load(open(run / "config.json"))["vocab_size"] > 270


def test_lr_schedule_warmup_then_cosine():
    from engine.trainer import get_lr
    assert get_lr(0, 0.0, 1.0, 10, 0.1) == pytest.approx(0.1)
    assert get_lr(9, 0.0, 1.0, 10, 0.1) == pytest.approx(1.0)
    assert get_lr(50, 0.5, 1.0, 10, 0.1) == pytest.approx(0.55)
    assert get_lr(100, 1.0, 1.0, 10, 0.1) == pytest.approx(0.1)


def test_loss_plot_leaves_the_final_report_out_of_the_validation_curve(tmp_path, monkeypatch):
    """The final event scores the best checkpoint (say step 38's) on the whole validation split;
    drawn at the last step it made the curve drop at the end, as if the last weights were best."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.axes import Axes
    from engine.trainer import plot_losses
    drawn, plot = {}, Axes.plot

    def recording(self, *a, **k):
        drawn[k.get("label")] = [list(x) for x in a[:2]]  # (steps, losses) of each curve
        return plot(self, *a, **k)
    monkeypatch.setattr(Axes, "plot", recording)
    events = [{"step": 5, "train_loss": 3.0}, {"step": 5, "val_loss": 3.2},
              {"step": 10, "train_loss": 2.9}, {"step": 10, "val_loss": 3.5},
              {"step": 10, "final": True, "val_loss": 3.1, "val_ppl": 22.2, "val_bpb": 1.0}]
    plot_losses(events, str(tmp_path / "loss.png"))
    assert drawn["validation"] == [[5, 10], [3.2, 3.5]]
    assert drawn["train"] == [[5, 10], [3.0, 2.9]]
    assert (tmp_path / "loss.png").stat().st_size > 0


class _Bytes:
    """A tokenizer of UTF-8 bytes with EOS 299, counting its encode calls."""
    vocab_size, eos_id, calls = 300, 299, 0

    def encode(self, text, add_bos=False):
        _Bytes.calls += 1
        return list(text.encode())

    def save(self, d):
        open(os.path.join(d, "t"), "w").write("x")


def encode_documents(corpus, tok) -> list[int]:
    """The reference token stream of a corpus: each document encoded whole (no BOS), EOS after
    each but an open end."""
    ids = []
    for i, d in enumerate(corpus.docs):
        ids += tok.encode(d, add_bos=False)
        if tok.eos_id is not None and corpus.closed(i):
            ids.append(tok.eos_id)
    return ids


def test_token_cache_reused(tmp_path, monkeypatch):
    from engine.data import Documents, tokenize_cached
    monkeypatch.setenv("WHETSTONE_CACHE", str(tmp_path))
    _Bytes.calls = 0
    a = tokenize_cached(Documents(["abc\ndef\n"]), _Bytes())
    b = tokenize_cached(Documents(["abc\ndef\n"]), _Bytes())
    assert _Bytes.calls == 1 and list(a.tokens) == list(b.tokens) == [*b"abc\ndef\n", 299]
    assert a.n_bytes == 8  # the text's bytes: EOS has none


def test_token_caches_of_an_older_encoder_are_not_reused(tmp_path, monkeypatch):
    """The ids changed twice: chunks cut only where the tokenizer splits anyway (encoder 2), then
    EOS after each document (3). A cache written before, under the text + tokenizer key, was
    read back as is; the key now holds the document boundaries and the open end too."""
    import hashlib
    import numpy as np
    from engine.data import ENCODER_VERSION, Documents, tokenize_cached
    monkeypatch.setenv("WHETSTONE_CACHE", str(tmp_path))
    text = "abc\ndef\n"
    old = hashlib.sha256(text.encode()).hexdigest()[:24] + "-" + "0123456789abcdef"
    (tmp_path / "tokens").mkdir()
    for stem in (old, f"{old}-enc2"):  # unversioned, then encoder 2: text without EOS
        (tmp_path / "tokens" / f"{stem}.bin").write_bytes(np.arange(5, dtype=np.uint16).tobytes())
        (tmp_path / "tokens" / f"{stem}.json").write_text(json.dumps(
            {"dtype": "uint16", "n_tokens": 5, "n_bytes": 8}))
    split = tokenize_cached(Documents([text]), _Bytes(), "0123456789abcdef")
    assert ENCODER_VERSION == 3 and list(split.tokens) == [*text.encode(), 299]
    assert split.key.endswith("-0123456789abcdef") and split.key != old  # what --resume compares
    # the same characters cut into other documents, or left open, are other data
    keys = {tokenize_cached(c, _Bytes(), "0123456789abcdef").key
            for c in (Documents([text]), Documents([text], open_end=True),
                      Documents(["abc\n", "def\n"]), Documents(["abc", "\ndef\n"]))}
    assert len(keys) == 4


def test_corpus_documents_end_with_eos(tmp_path, monkeypatch):
    """A JSONL file's records and a directory's files are documents: the tokens are
    ids(doc 1) + [EOS] + ids(doc 2) + [EOS] + ... (nanoGPT's openwebtext prepare.py appends EOT
    to every document, the last one too). Before, they were joined by blank lines or line
    breaks into one text: a model trained on them never saw a document end, never emitted EOS,
    and generate.py ran to --max-new-tokens."""
    from engine.data import load_or_train_tokenizer, read_corpus, tokenize_cached
    monkeypatch.setenv("WHETSTONE_CACHE", str(tmp_path / "cache"))
    docs = ["the king is dead.\nlong live the king!", "my lord,\nsweet prince\n", "alas"]
    tok = load_or_train_tokenizer("\n".join(docs * 20), 300, None)
    assert tok.eos_id == 2 and tok.eos_token == "</s>"  # a from-scratch tokenizer has EOS
    want = [i for d in docs for i in tok.encode(d, add_bos=False) + [tok.eos_id]]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n"
                                              for d in [docs[0], "", *docs[1:]]))  # "": none
    (tmp_path / "dir").mkdir()
    for i, d in enumerate(docs):
        (tmp_path / "dir" / f"{i}.txt").write_text(d)
    for path in (tmp_path / "c.jsonl", tmp_path / "dir"):
        assert list(tokenize_cached(read_corpus(str(path)), tok).tokens) == want, path
    # a plain text file is one document: its ids as before, then one EOS
    (tmp_path / "one.txt").write_text(docs[1])
    assert list(tokenize_cached(read_corpus(str(tmp_path / "one.txt")), tok).tokens) \
        == tok.encode(docs[1], add_bos=False) + [2]


def _tiny_pieces(monkeypatch, chunk=40):
    """Pieces of ~`chunk` characters, a pool for any corpus, and the parallel path recorded."""
    import engine.data as data
    monkeypatch.setattr(data, "CHUNK_CHARS", chunk)
    monkeypatch.setattr(data, "PARALLEL_MIN_CHARS", 0)
    used = []
    real = data._write_ids_parallel
    monkeypatch.setattr(data, "_write_ids_parallel",
                        lambda *a: used.append(a[4]) or real(*a))  # (write, pieces, tok, dtype, workers, ctx)
    return used


def test_parallel_tokenization_writes_the_serial_ids(tmp_path, monkeypatch, capsys):
    """A big corpus is encoded by a process pool in pieces (documents grouped, a long one cut
    where the tokenizer splits anyway) and streamed to the cache file in order: the ids are
    encode_documents' (each document encoded whole, the reference), byte for byte, open end included."""
    import numpy as np
    from engine.data import Documents, load_or_train_tokenizer, tokenize_cached
    monkeypatch.setenv("WHETSTONE_CACHE", str(tmp_path / "cache"))
    rng = random.Random(0)
    words = ["the", "king", "is", "dead.", "long", "live", "my", "lord,", "sweet", "prince!"]
    docs = ["\n".join(" ".join(rng.choices(words, k=rng.randint(1, 9)))
                      for _ in range(rng.randint(1, 30))) for _ in range(25)]
    docs[3] = "one line, no break " * 20  # a long document no chunk cut applies to
    tok = load_or_train_tokenizer("\n".join(docs), 300, None)
    used = _tiny_pieces(monkeypatch)
    for corpus in (Documents(docs), Documents(docs, open_end=True)):
        want = encode_documents(corpus, tok)
        assert want.count(tok.eos_id) == len(docs) - corpus.open_end
        for workers in (2, 1):
            split = tokenize_cached(corpus, tok, f"tok{workers}", tmp_path / f"w{workers}",
                                    workers=workers)
            assert split.tokens.dtype == np.uint16 and split.tokens.tolist() == want
            assert split.n_bytes == sum(len(d.encode()) for d in docs)
    assert used == [2, 2]  # the pool ran (once a corpus), workers=1 in-process
    assert capsys.readouterr().err == ""  # no progress line for a small corpus


def test_token_cache_is_not_written_when_encoding_fails(tmp_path, monkeypatch):
    """A tokenizer error in a pool's worker is raised as it is (one line: the CLI prints
    `error: ...`), a worker that dies is one RuntimeError line, and neither leaves a cache
    file or a temp file behind."""
    from engine.data import Documents, load_or_train_tokenizer, tokenize_cached
    monkeypatch.setenv("WHETSTONE_CACHE", str(tmp_path / "cache"))
    docs = [f"line {i}\nand another {i}\n" for i in range(40)]
    tok = load_or_train_tokenizer("".join(docs), 300, None)
    _tiny_pieces(monkeypatch)
    bad = Documents(docs[:30] + ["a lone surrogate \ud800 here"] + docs[30:])  # as json.loads gives
    for workers in (2, 1):
        with pytest.raises(ValueError, match=r"^text has a lone surrogate '\\ud800' at index 17"):
            tokenize_cached(bad, tok, "t", tmp_path / "c", workers=workers)
        assert not os.listdir(tmp_path / "c" / "tokens")

    class Dies(_Bytes):  # a worker killed (out of memory, say) on one piece
        def encode(self, text, add_bos=False):
            if "and another 33" in text and os.getpid() != parent:
                os._exit(1)
            return list(text.encode())
    parent = os.getpid()
    with pytest.raises(RuntimeError, match="a worker process died"):
        tokenize_cached(Documents(docs), Dies(), "t", tmp_path / "c", workers=2)
    assert not os.listdir(tmp_path / "c" / "tokens")
    assert tokenize_cached(Documents(docs), Dies(), "t", tmp_path / "c", workers=1).n_bytes \
        == sum(map(len, docs))  # in-process it encodes (and the cache is written)


_KILLED_PARENT = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
import engine.data as data
class Slow:  # 0.2 s a piece: the pool is busy when the parent is killed
    vocab_size, eos_id = 300, 299
    def encode(self, text, add_bos=False):
        if os.getpid() != parent:
            time.sleep(0.2)
        return list(text.encode())
    def save(self, d):
        open(os.path.join(d, "t"), "w").write("x")
parent = os.getpid()
data.CHUNK_CHARS = 64
print("go", flush=True)
data.tokenize_cached(data.Documents(["line\\n" * 20] * 200), Slow(), "t", sys.argv[2], workers=2)
"""


def test_pool_workers_exit_when_the_tokenizing_process_is_killed(tmp_path):
    """SIGKILL (the OOM killer, torchrun's agent after SIGTERM's grace) of a process encoding a
    corpus with its pool: the forked workers exit too. They used to wait for work forever, and
    each still mapped the parent's memory at fork time (a loaded --base model's, CUDA's
    device files), so killing the run freed none of it."""
    import contextlib
    import signal
    import time
    script = tmp_path / "tok.py"
    script.write_text(_KILLED_PARENT)
    p = subprocess.Popen([sys.executable, str(script), ROOT, str(tmp_path / "c")],
                         stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert p.stdout.readline() == "go\n"
        time.sleep(1.5)  # pieces in flight
        group = subprocess.run(["ps", "-o", "pid=", "-g", str(p.pid)], capture_output=True,
                               text=True).stdout.split()
        assert len(group) == 3, group  # the parent and its 2 workers
        p.kill()
        p.wait()
        deadline = time.time() + 10
        while time.time() < deadline:
            states = subprocess.run(["ps", "-o", "stat=", "-g", str(p.pid)], capture_output=True,
                                    text=True).stdout.split()
            if all(st.startswith("Z") for st in states):  # gone, or dead and not yet reaped
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"pool workers outlived their killed parent: {states}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)


def test_progress_line_for_a_big_corpus(tmp_path, monkeypatch, capsys):
    import engine.data as data
    monkeypatch.setattr(data, "PROGRESS_MIN_CHARS", 10)
    monkeypatch.setattr(data, "PROGRESS_EVERY_S", 0.0)
    data.tokenize_cached(data.Documents(["abc\n" * 30]), _Bytes(), "t", tmp_path)
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "tokenizing 0.0M characters (1 document(s), 1 process(es)) ..."
    assert "M tokens/s" in err[1] and err[-1].startswith("  done: 0.0M tokens in ")


def test_validation_split_cuts_the_documents_by_characters():
    """--val-fraction holds out the last fraction of the characters, cut at the next line start
    inside a document (a one-document corpus splits as its text did), else at the document's
    end. The cut document's head ends the training split without EOS, its tail starts the
    validation split: the two splits' tokens are the whole corpus's, every fraction."""
    from engine.data import Documents, split_documents
    one = Documents(["aaa\nbbb\nccc\nddd\n"])
    assert split_documents(one, 0.3) == (Documents(["aaa\nbbb\nccc\n"], open_end=True),
                                         Documents(["ddd\n"]))
    docs = Documents(["ab\ncd\n", "efgh", "ij\nkl\n"])  # 16 characters
    assert split_documents(docs, 0.5) == (Documents(["ab\ncd\n", "efgh"]), Documents(["ij\nkl\n"]))
    assert split_documents(docs, 0.375) == split_documents(docs, 0.5)  # on the boundary
    assert split_documents(docs, 0.25) == (Documents(["ab\ncd\n", "efgh", "ij\n"], open_end=True),
                                           Documents(["kl\n"]))
    last = Documents(["ab\n", "cdef"])  # no line start left in the last document: inside its line
    assert split_documents(last, 0.3) == (Documents(["ab\n", "c"], open_end=True), Documents(["def"]))
    for corpus in (one, docs, last):
        whole = encode_documents(corpus, _Bytes())
        assert whole.count(299) == len(corpus.docs) and whole[-1] == 299
        for f in (0.05, 0.1, 0.25, 0.4, 0.5, 0.7, 0.95):
            train_docs, val_docs = split_documents(corpus, f)
            assert encode_documents(train_docs, _Bytes()) + encode_documents(val_docs, _Bytes()) \
                == whole, (corpus, f)
    with pytest.raises(ValueError, match=r"--val-fraction must be in \(0, 1\)"):
        split_documents(one, 1.0)


def test_finetune_windows_hold_eos_between_documents(ref):
    """Domain adaptation on a JSONL of short independent documents: train.py's first batch holds
    the base tokenizer's EOS after documents, so the tuned model learns to stop."""
    import torch
    from engine.data import get_batch
    from engine.tasks import build_task
    from tokenizer import load_tokenizer
    _, base, tmp = ref
    rng = random.Random(4)
    docs = [" ".join(rng.choices(["king", "lord", "night", "prince"], k=rng.randint(2, 6))) + "."
            for _ in range(80)]
    data = tmp / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    flags = ["--base", base, "--finetune", "lora", "--data", str(data), "--seq-len", "16",
             "--batch-size", "4", "--no-progress", "--threads", "1", "--warmup-steps", "1",
             "--max-steps", "1", "--eval-every", "100", "--eval-batches", "1",
             "--final-eval-windows", "2", "--out", str(tmp / "eos-ft")]
    assert train.main(flags) == 0
    tok, args = load_tokenizer(base), train.parse_args(flags)
    gen = torch.Generator().manual_seed(args.seed)  # train.py's: nothing draws before the batch
    task = build_task(args, tok, str(data), gen)
    first = [i for d in docs[:3] for i in tok.encode(d, add_bos=False) + [tok.eos_id]]
    assert list(task.train.tokens[:len(first)]) == first
    x, y = get_batch(task.train, args.batch_size, args.seq_len, gen)  # (4, 16) each
    assert (x == tok.eos_id).any() and (y == tok.eos_id).any()  # EOS is a training target


def test_metrics_port_serves_prometheus_during_training(corpus, tmp_path):
    import socket
    import time
    import urllib.request
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), "--data", str(corpus),
                          "--out", str(tmp_path / "m"), "--max-steps", "400", "--eval-every", "50",
                          "--metrics-port", str(port), *TINY],
                         env={**os.environ, "WHETSTONE_CACHE": str(tmp_path / "cache")},
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        body, deadline = "", time.time() + 120
        while time.time() < deadline:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
                step = [l for l in body.splitlines() if l.startswith("whetstone_train_step ")]
                if step and float(step[0].split()[1]) >= 10:
                    break
            except OSError:
                pass
            time.sleep(0.3)
        assert "whetstone_train_loss" in body and "whetstone_train_tokens_per_second" in body
        assert float(step[0].split()[1]) >= 10
    finally:
        p.kill()
        p.wait()


# ---------------------------------------------------------------------------------------------
# Resume, interrupts and run-directory safety, on one shared reference run
# ---------------------------------------------------------------------------------------------
REF = [*TINY, "--max-steps", "16", "--eval-every", "5", "--log-every", "1"]


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """A corpus and an uninterrupted 16-step run (losses logged every step)."""
    tmp = tmp_path_factory.mktemp("ref")
    old = os.environ.get("WHETSTONE_CACHE")
    os.environ["WHETSTONE_CACHE"] = str(tmp / "cache")
    data = word_corpus(tmp / "corpus.txt", 1500)
    run = str(tmp / "ref")
    assert train.main(["--data", str(data), "--out", run, *REF]) == 0
    yield str(data), run, tmp
    if old is None:
        os.environ.pop("WHETSTONE_CACHE", None)
    else:
        os.environ["WHETSTONE_CACHE"] = old


def trajectory(run):
    return [(e["step"], e.get("train_loss"), e.get("val_loss"), e.get("lr")) for e in metrics(run)
            if not e.get("final")]


def assert_same_trajectory(a, b):
    """Same steps, losses and learning rates (a resume restores the schedule's position)."""
    ta, tb = trajectory(a), trajectory(b)
    assert [s for s, *_ in ta] == [s for s, *_ in tb]
    for (s, tl1, vl1, lr1), (_, tl2, vl2, lr2) in zip(ta, tb):
        assert ((tl1 is None) == (tl2 is None) and (vl1 is None) == (vl2 is None)
                and (lr1 is None) == (lr2 is None)), s
        assert tl1 is None or tl1 == pytest.approx(tl2, abs=1e-5), (s, tl1, tl2)
        assert vl1 is None or vl1 == pytest.approx(vl2, abs=1e-5), (s, vl1, vl2)
        # (pytest >= 9.2 refuses approx(None) with a relative tolerance)
        assert lr1 is None or lr1 == pytest.approx(lr2, rel=1e-12), (s, lr1, lr2)


def paused(ref, name, at):
    data, _, tmp = ref
    run = str(tmp / name)
    assert train.main(["--data", data, "--out", run, *REF, "--pause-at-step", str(at)]) == 0
    return run


def resume(run, *flags):
    return train.main(["--resume", run, "--no-progress", "--threads", "1", *flags])


def test_ctrl_c_then_resume_continues_exactly(ref, monkeypatch, capsys):
    """Ctrl-C (a real SIGINT) arrives in the middle of step 8, after its batch was drawn: the step
    finishes and the checkpoint is taken at the step boundary. A second, immediate interrupt
    (KeyboardInterrupt mid-step) saves nothing and leaves the last checkpoint (step 10)."""
    import signal
    from engine import tasks
    data, full, tmp = ref
    original = tasks.LMTask.train_step
    calls = {"n": 0}

    def interrupting(when, how):
        def train_step(self, *a):
            loss = original(self, *a)
            calls["n"] += 1
            if calls["n"] == when:
                how()
            return loss
        return train_step

    def sigint():
        os.kill(os.getpid(), signal.SIGINT)

    def hard():
        raise KeyboardInterrupt

    sigterm_handler = signal.getsignal(signal.SIGTERM)
    for name, when, how, stopped_at, msg in (("sigint", 8, sigint, 8, "interrupted at step 8"),
                                             ("hard", 13, hard, 10, "interrupted during step 13")):
        run, calls["n"] = str(tmp / name), 0
        with monkeypatch.context() as m:
            m.setattr(tasks.LMTask, "train_step", interrupting(when, how))
            assert train.main(["--data", data, "--out", run, *REF]) == 130
        assert msg in capsys.readouterr().err
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
        assert signal.getsignal(signal.SIGTERM) == sigterm_handler
        state = torch_load_state(run)
        assert state["step"] == stopped_at
        assert resume(run) == 0
        assert_same_trajectory(full, run)


_SIGTERM_AT = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import train
from engine import tasks
when, times = int(sys.argv[2]), int(sys.argv[3])
original, calls = tasks.LMTask.train_step, [0]
def train_step(self, *a):  # SIGTERM `times` times in the middle of step `when`
    loss = original(self, *a)
    calls[0] += 1
    if calls[0] == when:
        for _ in range(times):
            os.kill(os.getpid(), signal.SIGTERM)
    return loss
tasks.LMTask.train_step = train_step
sys.exit(train.main(sys.argv[4:]))
"""


def test_sigterm_saves_at_the_step_boundary_like_ctrl_c(ref):
    """SIGTERM (timeout, a scheduler, kill PID) ended a run at once with no checkpoint: the first
    one now stops at the step boundary, saves last/ and exits 143, and the resumed run continues
    exactly; a second one quits at once (mid-step, not saved), keeping the previous checkpoint."""
    data, full, tmp = ref
    for name, when, times, stopped_at, msg in (("sigterm", 8, 1, 8, "interrupted at step 8; resume"),
                                               ("sigterm2", 13, 2, 10, "interrupted during step 13")):
        run = str(tmp / name)
        r = subprocess.run([sys.executable, "-c", _SIGTERM_AT, ROOT, str(when), str(times),
                            "--data", data, "--out", run, *REF], capture_output=True, text=True,
                           cwd=ROOT, timeout=300)
        assert r.returncode == 143, (r.returncode, r.stderr[-2000:])
        assert "SIGTERM: stopping after this step" in r.stderr and msg in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        assert torch_load_state(run)["step"] == stopped_at
        assert resume(run) == 0
        assert_same_trajectory(full, run)


def torch_load_state(run):
    import torch
    return torch.load(os.path.join(run, "last", "training_state.pt"), weights_only=True)


def test_resume_refuses_changed_flags_and_bad_pause(ref):
    data, _, _ = ref
    run = paused(ref, "flags", 6)
    before = open(os.path.join(run, "metrics.jsonl")).read()
    with pytest.raises(ValueError, match=r"--lr 1\.0 \(the run has 0\.003\); --max-steps 30"):
        resume(run, "--max-steps", "30", "--lr", "1")
    with pytest.raises(ValueError, match="--data /nonexistent"):
        resume(run, "--data", "/nonexistent")
    for at in ("3", "6", "17"):  # at or before the run's step, or after its end
        with pytest.raises(ValueError, match=f"--pause-at-step {at}: the run is at step 6"):
            resume(run, "--pause-at-step", at)
    assert open(os.path.join(run, "metrics.jsonl")).read() == before  # nothing touched
    # the same values as the run's are fine, as are per-invocation flags
    assert resume(run, "--data", data, "--max-steps", "16", "--pause-at-step", "8") == 0
    assert torch_load_state(run)["step"] == 8
    import shutil
    done = shutil.copytree(ref[1], os.path.join(os.path.dirname(run), "finished"))
    with pytest.raises(ValueError, match=r"--pause-at-step 5: .* is done \(max steps\): 16 steps; "
                       "nothing to resume"):
        resume(done, "--pause-at-step", "5")


def test_resume_refuses_a_corpus_that_changed_since_the_run_started(ref):
    """Resuming after the corpus file was edited would silently train on other text and judge
    the best checkpoint on another validation split: refused, nothing touched; restored, the
    run continues exactly."""
    import shutil
    data, full, tmp = ref
    copy = tmp / "changing.txt"
    shutil.copy(data, copy)
    run = str(tmp / "changed")
    assert train.main(["--data", str(copy), "--out", run, *REF, "--pause-at-step", "6"]) == 0
    before = open(os.path.join(run, "metrics.jsonl")).read()
    original = copy.read_text()
    copy.write_text(original + "a line added after the run started\n")
    with pytest.raises(ValueError, match="text differs from the one the run was trained on"):
        resume(run)
    assert open(os.path.join(run, "metrics.jsonl")).read() == before
    copy.write_text(original)
    assert resume(run) == 0
    assert_same_trajectory(full, run)


def test_resume_of_a_run_tokenized_before_documents_ended_with_eos_says_so():
    """A run saved by encoder 2 (no EOS after documents, keys of the joined text) cannot go on
    with the same tokens: refused with the reason, not with 'the data changed'."""
    import numpy as np
    from engine.data import ENCODER_VERSION, TokenSplit
    from engine.tasks import LMTask
    split = TokenSplit(np.arange(40, dtype=np.uint16), 80, "k")
    task = LMTask(split, split, 2, 8, 1)
    assert task.state_dict() == {"train_key": "k", "val_key": "k", "encoder": ENCODER_VERSION}
    task.load_state_dict(task.state_dict())
    task.load_state_dict({})  # saved before data keys existed: not checked
    with pytest.raises(ValueError, match=r"tokenized by an older encoder \(version 2 or older; "
                                         r"now 3: each document ends with EOS\)"):
        task.load_state_dict({"train_key": "k", "val_key": "k"})
    with pytest.raises(ValueError, match="training text differs"):
        task.load_state_dict({"train_key": "other", "val_key": "k", "encoder": ENCODER_VERSION})


def test_resume_recovers_an_interrupted_checkpoint_swap_and_a_torn_log(ref):
    """A kill between save_last's renames leaves last.old (previous) + last.new (complete), or
    only last.old; a kill during a metrics append leaves half a line. Resume uses the complete
    checkpoint and skips the torn line."""
    _, full, _ = ref
    a, b = paused(ref, "swap-new", 10), paused(ref, "swap-old", 10)
    os.rename(os.path.join(a, "last"), os.path.join(a, "last.new"))
    os.makedirs(os.path.join(a, "last.old"))  # the older one (incomplete here: must not be used)
    os.rename(os.path.join(b, "last"), os.path.join(b, "last.old"))
    with open(os.path.join(b, "metrics.jsonl"), "a") as f:
        f.write('{"step": 11, "elapsed_s": 1.2, "train_lo')
    for run in (a, b):
        assert resume(run) == 0
        assert_same_trajectory(full, run)
        assert not os.path.exists(os.path.join(run, "last.old"))
        assert not os.path.exists(os.path.join(run, "last.new"))


def drop_final_report(run):
    """What a kill during the final evaluation leaves: no final event, no model card."""
    events = [e for e in metrics(run) if not e.get("final")]
    with open(os.path.join(run, "metrics.jsonl"), "w") as f:
        f.write("".join(json.dumps(e) + "\n" for e in events))
    os.remove(os.path.join(run, "README.md"))


def test_resume_of_a_finished_run_rewrites_nothing(ref, capsys):
    """Resuming a run whose final report was written redid the final evaluation and rewrote the
    card, loss.png and metrics (its wall time grew): now one line says it is done, and where its
    results are. A final report cut short (a kill during the final evaluation) is still redone."""
    import shutil
    _, full, tmp = ref
    run = shutil.copytree(full, str(tmp / "finished-resumed"))
    outputs = ("metrics.jsonl", "README.md", "loss.png", "model.safetensors", "last/training_state.pt")
    read = lambda: {n: open(os.path.join(run, n), "rb").read() for n in outputs}  # noqa: E731
    before = read()
    capsys.readouterr()
    assert resume(run) == 0
    assert capsys.readouterr().out == (
        f"{run} is done (max steps): 16 steps; nothing to resume. Its results: the best checkpoint, "
        f"the model card README.md, metrics.jsonl and loss.png in {run}\n")
    assert read() == before
    events = metrics(run)  # a run from before the final event logged its stop reason
    del events[-1]["stop_reason"]
    with open(os.path.join(run, "metrics.jsonl"), "w") as f:
        f.write("".join(json.dumps(e) + "\n" for e in events))
    assert resume(run) == 0
    assert capsys.readouterr().out.startswith(f"{run} is done: 16 steps; nothing to resume.")
    drop_final_report(run)
    assert resume(run) == 0
    assert "done (max steps): 16 steps" in capsys.readouterr().out
    assert sum(1 for e in metrics(run) if e.get("final")) == 1
    assert os.path.isfile(os.path.join(run, "README.md"))
    assert_same_trajectory(full, run)


def test_done_line_of_a_resumed_run_says_what_its_figures_cover(ref, capsys):
    """The closing line's seconds were read after the plot and the model card were written (the
    final metrics event and the card had others) and did not say that a resumed run's figures
    cover all its sessions while peak memory is this session's."""
    import re
    run = paused(ref, "done-line", 5)
    capsys.readouterr()
    assert resume(run) == 0
    done = [l for l in capsys.readouterr().out.splitlines() if l.startswith("done")][0]
    m = re.match(r"done \(max steps\): 16 steps in ([\d.]+)s with evaluation \(([\d.]+)s in "
                 r"training steps: ([\d,]+) tokens/s\), counted over the whole run \(resumed at "
                 r"step 5\), peak rss [\d,]+ MB in this session; best checkpoint: ", done)
    assert m, done
    wall, train_s, tps = float(m[1]), float(m[2]), int(m[3].replace(",", ""))
    final = [e for e in metrics(run) if e.get("final")][0]
    assert wall == pytest.approx(final["elapsed_s"], abs=0.051)
    assert f"- wall time: {wall:.1f} s" in open(os.path.join(run, "README.md")).read()
    extra = json.loads(torch_load_state(run)["extra"])  # saved at step 16: every session's sums
    assert extra["tokens"] == 16 * 8 * 32 and train_s == pytest.approx(extra["train_s"], abs=0.051)
    assert tps == round(extra["tokens"] / extra["train_s"]) and train_s <= wall


def test_an_early_stopped_run_resumed_does_not_train_on(ref, monkeypatch, capsys):
    """Resuming a run that stopped early (to redo its final report, as the message of an
    interrupted final evaluation suggests) trained on until the next evaluation."""
    from engine import tasks
    data, _, tmp = ref
    losses = iter([3.0, 2.0, 2.5] + [9.0] * 10)  # steps 5, 10 improve; step 15 does not
    monkeypatch.setattr(tasks.LMTask, "evaluate", lambda *a, **k: dict(
        val_loss=next(losses), val_ppl=1.0, val_bpb=1.0))
    run = str(tmp / "early")
    assert train.main(["--data", data, "--out", run, *REF, "--max-steps", "40",
                       "--patience", "1"]) == 0
    assert "done (early stop" in capsys.readouterr().out
    assert torch_load_state(run)["step"] == 15
    assert resume(run) == 0  # its final report was written: nothing to redo
    assert capsys.readouterr().out.startswith(
        f"{run} is done (early stop (no improvement in 1 evaluations)): 15 steps; nothing to resume")
    before = open(os.path.join(run, "metrics.jsonl")).read()
    with pytest.raises(ValueError, match=r"--pause-at-step 30: .* is done \(early stop"):
        resume(run, "--pause-at-step", "30")  # it redid the final report before
    assert open(os.path.join(run, "metrics.jsonl")).read() == before
    drop_final_report(run)  # interrupted during the final evaluation: the resume redoes it
    assert resume(run) == 0
    assert "done (early stop" in capsys.readouterr().out
    assert torch_load_state(run)["step"] == 15
    assert max(e["step"] for e in metrics(run)) == 15


def test_a_finished_run_says_its_own_stop_reason(ref, monkeypatch, capsys):
    """The evaluation after the loop (12 is no multiple of --eval-every 5) spends the patience of a
    run that stopped at --max-steps: a resume says "max steps", as the run's done line did (it
    said "early stop" when the reason was rebuilt from the saved state)."""
    from engine import tasks
    data, _, tmp = ref
    losses = iter([3.0, 2.0, 2.5])  # steps 5 and 10 improve; the final step 12 does not
    monkeypatch.setattr(tasks.LMTask, "evaluate", lambda *a, **k: dict(
        val_loss=next(losses), val_ppl=1.0, val_bpb=1.0))
    monkeypatch.setattr(tasks.LMTask, "final_is_periodic", lambda self, full: True)
    run = str(tmp / "patience-at-the-end")
    assert train.main(["--data", data, "--out", run, *REF, "--max-steps", "12",
                       "--patience", "1"]) == 0
    assert "done (max steps)" in capsys.readouterr().out
    assert resume(run) == 0
    assert capsys.readouterr().out.startswith(f"{run} is done (max steps): 12 steps;")


def test_new_run_never_overwrites_a_paused_run(ref):
    data, _, _ = ref
    run = paused(ref, "keep", 3)  # before the first evaluation: no config.json yet, only last/
    state = open(os.path.join(run, "last", "training_state.pt"), "rb").read()
    with pytest.raises(ValueError, match="already holds a checkpoint or run .* or continue it "
                       "with --resume"):
        train.main(["--data", data, "--out", run, *TINY, "--max-steps", "6"])
    assert open(os.path.join(run, "last", "training_state.pt"), "rb").read() == state
    assert metrics(run)


def test_a_model_directory_without_resumable_state_is_not_sent_to_resume(tmp_path):
    """--out at a plain model (config.json, no last/): refused, without the advice to --resume
    it (which would say there is no resumable checkpoint)."""
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError) as e:
        train.main(["--out", str(tmp_path), *TINY, "--max-steps", "1"])
    assert str(e.value) == (f"{tmp_path} already holds a checkpoint or run (config.json); pick "
                            "another --out (it has no resumable state: nothing to --resume)")
    assert os.listdir(tmp_path) == ["config.json"]


def test_a_run_stopped_before_its_first_checkpoint_says_there_is_nothing_to_resume(ref):
    """A directory with only run_args.json (a run killed, or still starting, before its first
    checkpoint): a new run there said "continue it with --resume", and --resume said "no
    resumable checkpoint": both now say what is there and what to do, and touch nothing."""
    import shutil
    data, full, tmp = ref
    run = tmp / "starting"
    run.mkdir()
    shutil.copy(os.path.join(full, "run_args.json"), run)
    msg = (f"{run} holds only a run's flags (run_args.json), no checkpoint: a run that stopped (or is "
           f"still starting) before its first checkpoint; nothing to resume — remove {run} or pick "
           "another --out")
    with pytest.raises(ValueError) as e:
        train.main(["--data", data, "--out", str(run), *TINY, "--max-steps", "1"])
    assert str(e.value) == msg
    with pytest.raises(ValueError) as e:
        resume(str(run))
    assert str(e.value) == f"--resume {run}: {msg}"
    assert os.listdir(run) == ["run_args.json"]
    missing = str(tmp / "no-such-run")
    with pytest.raises(ValueError) as e:
        resume(missing)
    assert str(e.value) == f"--resume {missing}: {missing} does not exist"


def test_model_card_command_is_the_one_that_started_the_run(ref, monkeypatch):
    """After --resume the card's Command showed the resume command, not how the run was made: the
    starting command is saved in run_args.json (not a flag: resume does not compare it, the card's
    hyperparameters leave it out) and a run saved before that resumes, saying it is not recorded."""
    import shlex
    data, _, tmp = ref
    runs, starts = [str(tmp / "cmd"), str(tmp / "cmd-older")], []
    for run in runs:
        starts.append(["--data", data, "--out", run, *REF, "--pause-at-step", "5"])
        monkeypatch.setattr(sys, "argv", ["train.py", *starts[-1]])
        assert train.main(starts[-1]) == 0
    saved = json.load(open(os.path.join(runs[1], "run_args.json")))
    assert saved.pop("command") == shlex.join(["python", "train.py", *starts[1]])
    with open(os.path.join(runs[1], "run_args.json"), "w") as f:
        json.dump(saved, f)  # as an older train.py wrote it
    for run in runs:
        monkeypatch.setattr(sys, "argv", ["train.py", "--resume", run, "--no-progress", "--threads", "1"])
        assert resume(run, "--lr", "0.003") == 0  # the run's own value: allowed
    cards = [open(os.path.join(run, "README.md")).read() for run in runs]
    block = lambda card: card.split("## Command\n\n```bash\n")[1].split("```")[0].splitlines()  # noqa: E731
    resumed = "# resumed with: python train.py --resume {} --no-progress --threads 1"
    assert block(cards[0]) == [shlex.join(["python", "train.py", *starts[0]]), resumed.format(runs[0])]
    assert block(cards[1]) == ["# (not recorded: run_args.json predates the record of the command)",
                               resumed.format(runs[1])]
    assert "| command |" not in cards[0]


def test_damaged_run_files_give_one_line_errors(ref):
    data, _, tmp = ref
    run = paused(ref, "damaged", 2)
    state = os.path.join(run, "last", "training_state.pt")
    good = open(state, "rb").read()
    open(state, "wb").write(b"not a torch file")
    with pytest.raises(ValueError, match="cannot read .*training_state.pt"):
        resume(run)
    open(state, "wb").write(good)
    open(os.path.join(run, "run_args.json"), "w").write('{"batch_size": 8,')
    with pytest.raises(ValueError, match=r"run_args\.json is damaged"):
        resume(run)
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:
        f.write("garbage\n{}\n")  # a bad line that is not the last: named
    from engine.trainer import MetricsLog
    with pytest.raises(ValueError, match=r"metrics\.jsonl:\d+: not a JSON event"):
        MetricsLog(os.path.join(run, "metrics.jsonl"), truncate_after_step=2)  # what resume does
    afile = tmp / "afile"
    afile.write_text("x")
    for out, msg in ((afile, "is a file, not a directory"), (afile / "sub", "cannot create --out")):
        with pytest.raises(ValueError, match=msg):
            train.main(["--data", data, "--out", str(out), *TINY, "--max-steps", "1"])


def test_metrics_port_in_use_is_an_error_before_data_preparation(tmp_path, monkeypatch):
    import socket
    monkeypatch.setattr(train, "read_text_splits", lambda *a: pytest.fail("data was prepared"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(ValueError, match="cannot serve metrics"):
            train.main(["--data", "x.txt", "--out", str(tmp_path / "o"), *TINY,
                        "--metrics-port", str(s.getsockname()[1])])


def test_ctrl_c_outside_the_loop_is_one_short_message(tmp_path, monkeypatch, capsys):
    def interrupted(*a):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "read_text_splits", interrupted)
    assert train.main(["--data", "x.txt", "--out", str(tmp_path / "o"), *TINY]) == 130
    assert capsys.readouterr().err.strip() == "interrupted before training started; nothing was saved"


def test_nonfinite_run_keeps_the_last_good_checkpoint(corpus, tmp_path, capsys):
    """lr 1e6 blows up within a few steps: the first non-finite figure (gradient norm, training
    or validation loss) stops the run, before it reaches the weights on disk."""
    from safetensors.torch import load_file
    run = str(tmp_path / "nan")
    assert train.main(["--data", str(corpus), "--out", run, *TINY, "--max-steps", "50",
                       "--eval-every", "1", "--eval-batches", "1", "--warmup-steps", "1",
                       "--grad-clip", "0", "--lr", "1e6"]) == 1
    err = capsys.readouterr().err
    assert "became nan" in err or "became inf" in err or "non-finite" in err, err
    assert "last good checkpoint is kept" in err
    weights = load_file(os.path.join(run, "last", "model.safetensors"))
    assert all(t.isfinite().all() for t in weights.values())


def test_tokens_per_second_leaves_evaluation_out(corpus, tmp_path, monkeypatch, capsys):
    import time
    from engine import tasks
    slow = tasks.LMTask.evaluate

    def slow_evaluate(*a, **k):
        time.sleep(0.3)
        return slow(*a, **k)
    monkeypatch.setattr(tasks.LMTask, "evaluate", slow_evaluate)
    run = str(tmp_path / "tps")
    assert train.main(["--data", str(corpus), "--out", run, *TINY, "--max-steps", "4",
                       "--eval-every", "1", "--log-every", "1"]) == 0
    # 4 steps of 8 x 32 tokens with 1.5 s of evaluation: counting it would give < 700 tokens/s
    rates = [e["tokens_per_s"] for e in metrics(run) if "tokens_per_s" in e]
    done = [l for l in capsys.readouterr().out.splitlines() if l.startswith("done")][0]
    final = float(done.split(" tokens/s")[0].rsplit(" ", 1)[1].replace(",", ""))
    assert len(rates) == 4 and min(rates) > 2000 and final > 2000, (rates, done)


def test_time_budget_before_the_first_step_saves_the_step0_model(corpus, tmp_path, capsys):
    run = str(tmp_path / "budget")
    assert train.main(["--data", str(corpus), "--out", run, *TINY, "--max-minutes", "1e-9"]) == 0
    assert "time budget ended before the first step" in capsys.readouterr().err
    assert os.path.isfile(os.path.join(run, "model.safetensors"))
    assert [e["step"] for e in metrics(run)] == [0, 0]  # the step-0 evaluation, the final one


def test_a_time_budget_ends_the_default_warmup_by_a_tenth_of_it(corpus, tmp_path, monkeypatch):
    """--max-minutes without --max-steps: the default warmup is 50 steps, and a run that makes
    fewer (a fine-tune on a CPU) was warmup from start to end, never at --lr, never decaying.
    Warmup now ends by a tenth of the budget: a clock that moves 2 s a reading, 60 s budget."""
    import time as real_time
    import types
    clock = iter(range(0, 10**6, 2))
    monkeypatch.setattr(train, "time", types.SimpleNamespace(
        time=lambda: float(next(clock)), perf_counter=real_time.perf_counter,
        strftime=real_time.strftime))
    run = str(tmp_path / "budget")
    i = TINY.index("--warmup-steps")
    flags = TINY[:i] + TINY[i + 2:]  # the default warmup
    assert train.main(["--data", str(corpus), "--out", run, *flags, "--max-minutes", "1",
                       "--log-every", "1", "--eval-every", "1000", "--lr", "1e-3"]) == 0
    lrs = [e["lr"] for e in metrics(run) if "lr" in e]
    assert json.load(open(os.path.join(run, "run_args.json")))["warmup_steps"] == 50
    assert 5 < len(lrs) < 40, lrs  # the budget, not 50 warmup steps, ended the run
    top = lrs.index(max(lrs))
    assert max(lrs) == pytest.approx(1e-3, rel=1e-3) and top < 10, lrs  # reached by 6 s of 60
    assert all(a < b for a, b in zip(lrs[:top], lrs[1:top + 1]))        # up, linearly in time
    assert all(a >= b for a, b in zip(lrs[top:], lrs[top + 1:]))        # then the cosine
    assert lrs[-1] < 0.2e-3, lrs                                        # near --min-lr-ratio


def test_preset_tiny_alone_trains(corpus, tmp_path):
    flags = [f for f in TINY if f not in ("--vocab-size", "300")]
    run = str(tmp_path / "tiny")
    assert train.main(["--data", str(corpus), "--out", run, *flags, "--max-steps", "2"]) == 0
    cfg = json.load(open(os.path.join(run, "config.json")))
    assert 259 < cfg["vocab_size"] <= train.MIN_TRAINED_VOCAB


def test_json_corpus_is_read_as_jsonl_like_detect_format(tmp_path):
    from engine.data import read_documents
    from engine.sft import detect_format
    lines = "".join(json.dumps({"text": t}) + "\n" for t in ("first doc", "second doc"))
    (tmp_path / "t.json").write_text(lines)
    (tmp_path / "t.jsonl").write_text(lines)
    assert detect_format(str(tmp_path / "t.json")) == "text"
    assert read_documents(str(tmp_path / "t.json")) == read_documents(str(tmp_path / "t.jsonl")) \
        == ["first doc", "second doc"]
    (tmp_path / "a.json").write_text(json.dumps([{"text": "x"}]))
    for read in (read_documents, detect_format):
        with pytest.raises(ValueError, match="a JSON array; write one JSON object per line"):
            read(str(tmp_path / "a.json"))


@pytest.mark.parametrize("flags, message", [
    (["--eval-batches", "0"], "--eval-batches must be >= 1"),
    (["--eval-batches", "-3"], "--eval-batches must be >= 1"),
    (["--final-eval-windows", "0"], "--final-eval-windows must be >= 1"),
    (["--seq-len", "0"], "--seq-len must be >= 1"),
    (["--grad-accum", "0"], "--grad-accum must be >= 1"),
    (["--log-every", "0"], "--log-every must be >= 1"),
    (["--patience", "0"], "--patience must be >= 1"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--pause-at-step", "0"], "--pause-at-step must be >= 1"),
    (["--max-steps", "5", "--pause-at-step", "6"], "--pause-at-step 6 is after --max-steps 5"),
    (["--warmup-steps", "-1"], "--warmup-steps must be >= 0"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--lr", "nan"], "--lr must be > 0"),
    (["--max-minutes", "inf"], "--max-minutes must be > 0"),
    (["--min-lr-ratio", "1.5"], "--min-lr-ratio must be in [0, 1]"),
    (["--weight-decay", "-0.1"], "--weight-decay must be >= 0"),
    (["--grad-clip", "-1"], "--grad-clip must be >= 0"),
    (["--val-fraction", "1"], "--val-fraction must be in (0, 1)"),
    (["--val-data", "v.txt", "--val-fraction", "0.2"], "--val-fraction applies only to a validation "
                                                       "split held out from --data"),
    (["--vocab-size", "100"], "--vocab-size must be >= 260"),
    (["--metrics-port", "70000"], "--metrics-port must be in 0..65535"),
    (["--device", "potato"], "--device 'potato'"),
    (["--half-finetune"], "--half-finetune needs --base"),
    (["--base", "m", "--preset", "tiny"], "--preset applies only to training from scratch"),
    (["--base", "m", "--vocab-size", "300"], "--vocab-size applies only to training from scratch"),
    (["--base", "m", "--trainable-layers", "2"], "--trainable-layers applies only to --finetune full"),
    (["--base", "m", "--finetune", "full", "--lora-r", "4"], "--lora-r applies only to --finetune lora"),
    (["--beta", "0.2"], "--beta applies only to --objective dpo"),
    (["--half-round-steps", "5"], "--half-round-steps applies only to --half-finetune"),
    (["--base", "m", "--lora-targets", ","], "--lora-targets ',' names no module"),  # trained nothing
    (["--base", "m", "--objective", "dpo", "--data", "p.jsonl", "--eval-batches", "4"],
     "--eval-batches applies only to plain-text data"),
])
def test_nonsensical_flags_one_usage_line(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(flags)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and message in err[0], err


def test_eval_window_flags_are_refused_for_sft_data(tmp_path, capsys):
    """SFT and DPO evaluate their whole validation set: the LM window counts would be ignored."""
    sft = tmp_path / "chat.jsonl"
    sft.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    for flag in ("--eval-batches", "--final-eval-windows"):
        with pytest.raises(SystemExit):
            train.parse_args(["--base", "m", "--data", str(sft), flag, "3"])
        assert f"{flag} applies only to plain-text data" in capsys.readouterr().err
    corpus = tmp_path / "c.txt"
    corpus.write_text("plain text\n")
    assert train.parse_args(["--data", str(corpus), "--eval-batches", "3"]).eval_batches == 3


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a CPU-only machine")
def test_device_cuda_without_cuda_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--device", "cuda"])
    assert "CUDA is not available" in capsys.readouterr().err


def test_warmup_default_is_capped_and_an_explicit_long_one_warns(capsys):
    assert train.parse_args(["--max-steps", "20"]).warmup_steps == 2
    assert train.parse_args(["--max-steps", "2000"]).warmup_steps == 50
    assert train.parse_args(["--max-minutes", "1"]).warmup_steps == 50
    assert capsys.readouterr().err == ""
    assert train.parse_args(["--max-steps", "20", "--warmup-steps", "20"]).warmup_steps == 20
    assert "never reaches --lr" in capsys.readouterr().err


def test_lr_is_continuous_at_the_end_of_warmup_and_ends_at_min():
    from engine.trainer import decay_progress, get_lr
    lr, warm, steps = 5e-4, 50, 60
    lrs = [get_lr(s, decay_progress(s, steps, warm), lr, warm, 0.1) for s in range(steps)]
    assert lrs[warm - 1] == pytest.approx(lr)
    assert lrs[warm] == pytest.approx(lr, rel=0.03)  # was 8e-5: cosine evaluated at 50/60
    assert all(a >= b for a, b in zip(lrs[warm - 1:], lrs[warm:]))  # decays monotonically
    assert lrs[-1] == pytest.approx(0.1 * lr)
    # a time budget: the cosine runs over the time left when warmup ended (at 30 s of 130)
    assert decay_progress(50, 10**5, warm, 30.0, 130.0, 30.0) == pytest.approx(1e-5, abs=1e-4)
    assert decay_progress(80, 10**5, warm, 80.0, 130.0, 30.0) == pytest.approx(0.5)
    assert decay_progress(90, 10**5, warm, 140.0, 130.0, 30.0) == 1.0
    # and warmup ends by time if that comes first (warmup_time: the time used over a tenth of it)
    assert get_lr(9, 0.0, lr, warm, 0.1, warmup_time=0.5) == pytest.approx(0.5 * lr)
    assert get_lr(29, 0.0, lr, warm, 0.1, warmup_time=0.5) == pytest.approx(0.6 * lr)
    assert get_lr(9, 0.0, lr, warm, 0.1, warmup_time=1.0) == pytest.approx(lr)  # the cosine's start


def test_default_vocab_covers_a_corpus_with_many_characters(tmp_path, monkeypatch):
    """--preset tiny without --vocab-size on text of 90+ distinct characters (Shakespeare has 84):
    the vocabulary grows to hold them; an explicit --vocab-size too small says how much is needed."""
    monkeypatch.setenv("WHETSTONE_CACHE", str(tmp_path / "cache"))
    rng = random.Random(1)
    chars = [chr(c) for c in range(0x21, 0x7f)] + list("éèàçüöß")
    text = "\n".join(" ".join("".join(rng.choice(chars) for _ in range(5)) for _ in range(8))
                     for _ in range(800)) + "\n"
    (tmp_path / "c.txt").write_text(text)
    flags = ["--data", str(tmp_path / "c.txt"), "--preset", "tiny", "--max-steps", "1",
             "--batch-size", "2", "--seq-len", "16", "--no-progress", "--threads", "1"]
    assert train.main([*flags, "--out", str(tmp_path / "run")]) == 0
    from tokenizer import load_tokenizer
    assert load_tokenizer(str(tmp_path / "run")).vocab_size >= 259 + 90
    with pytest.raises(ValueError, match="vocab_size 300 is too small for this corpus's "
                       "characters: it needs at least"):
        train.main([*flags, "--out", str(tmp_path / "run2"), "--vocab-size", "300"])


def test_default_vocab_covers_a_corpus_without_spaces(tmp_path, monkeypatch):
    """Text with no space (Chinese, say) of 400 evenly used characters: sentencepiece still needs
    its "▁" piece, and the default vocabulary was one id short ("needs at least 661")."""
    monkeypatch.setenv("WHETSTONE_CACHE", str(tmp_path / "cache"))
    rng = random.Random(0)
    chars = [chr(0x4E00 + i) for i in range(400)]
    (tmp_path / "zh.txt").write_text(
        "\n".join("".join(rng.choice(chars) for _ in range(40)) for _ in range(800)) + "\n",
        encoding="utf-8")
    assert train.main(["--data", str(tmp_path / "zh.txt"), "--preset", "tiny", "--max-steps", "1",
                       "--batch-size", "2", "--seq-len", "16", "--no-progress", "--threads", "1",
                       "--out", str(tmp_path / "run")]) == 0


def test_checkpoint_save_after_a_recovered_swap_replaces_the_stale_last_old(tmp_path):
    """A kill between save_last's renames leaves the previous checkpoint in last.old; once
    last/ exists again (recover_last, or a kill before the old one was removed), the next
    save renamed last/ onto that non-empty directory: OSError 'Directory not empty'."""
    import types
    import torch
    from engine.config import preset
    from engine.model import Transformer
    from engine.trainer import configure_optimizer, load_training_state, save_last
    model = Transformer(preset("tiny", vocab_size=64))
    opt = configure_optimizer(model, 1e-3, 0.1, (0.9, 0.95))
    gen, args = torch.Generator(), types.SimpleNamespace(finetune=None, base=None, fsdp=False)
    save_last(model, None, str(tmp_path), opt, 1, gen, {}, args)
    os.makedirs(tmp_path / "last.old")
    (tmp_path / "last.old" / "model.safetensors").write_bytes(b"an older checkpoint")
    save_last(model, None, str(tmp_path), opt, 2, gen, {}, args)
    assert sorted(os.listdir(tmp_path)) == ["last"]
    assert load_training_state(str(tmp_path / "last"), opt, gen)[0] == 2


def test_grad_norm_is_logged_before_clipping(corpus, tmp_path):
    """metrics.jsonl carries the global gradient norm before clipping (as HF Trainer's
    grad_norm): the first step's is the same with no clipping, a loose and a tight --grad-clip."""
    first = {}
    for clip in ("0", "1e9", "1e-3"):
        run = str(tmp_path / f"clip{clip}")
        assert train.main(["--data", str(corpus), "--out", run, *TINY, "--max-steps", "3",
                           "--log-every", "1", "--grad-clip", clip]) == 0
        norms = [e["grad_norm"] for e in metrics(run) if "train_loss" in e]
        assert len(norms) == 3 and all(0 < n < math.inf for n in norms)
        first[clip] = norms[0]
    assert first["0"] == first["1e9"] == first["1e-3"] > 1e-3


# ---------------------------------------------------------------------------------------------
# The optimizer step's math against a reference written from the published formulas
# ---------------------------------------------------------------------------------------------
def _reference_groups(model, weight_decay):
    """What the docs promise, decided by name: matrices (embeddings and lm_head included) decay,
    norm weights and biases don't."""
    vector = lambda n: n.endswith(("norm.weight", ".bias"))  # noqa: E731
    named = dict(model.named_parameters())
    return [{"params": [p for n, p in named.items() if not vector(n)], "weight_decay": weight_decay},
            {"params": [p for n, p in named.items() if vector(n)], "weight_decay": 0.0}]


def test_an_accumulated_step_equals_one_big_batch_step_of_the_reference(corpus, tmp_path):
    """train.py with 2 rows x 3 accumulation steps against nanoGPT's step written out on the whole
    6-row batch: mean loss, global-norm clipping of the accumulated gradient (active: the norms
    are ~2 > 0.5), AdamW(0.9, 0.95, eps 1e-8) without decay on norm weights, the LR of HF's
    get_cosine_with_min_lr_schedule_with_warmup one step on (train.py's step s trains at HF's
    s + 1: no step at LR 0, the last one at the minimum). Each mistake this catches moves the
    weights by 5e-4 to 1e-2 (clipping per micro-batch or not at all, decay on the norms or not
    on the embeddings, the unshifted schedule, beta2 0.999); the exact step agrees to ~2e-6.
    The same flags again give bit-identical weights and losses."""
    import torch
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup
    from engine.checkpoint import read_safetensors_dir
    from engine.config import preset
    from engine.data import get_batch, read_corpus, split_documents, tokenize_cached, tokenizer_hash
    from engine.model import Transformer
    from tokenizer import load_tokenizer
    steps, warm, lr, clip, wd, seed, seq = 4, 2, 3e-3, 0.5, 1.0, 3, 32
    flags = ["--data", str(corpus), *TINY, "--warmup-steps", str(warm), "--log-every", "1",
             "--max-steps", str(steps), "--eval-every", "100", "--final-eval-windows", "2",
             "--batch-size", "2", "--grad-accum", "3", "--lr", str(lr), "--grad-clip", str(clip),
             "--weight-decay", str(wd), "--seed", str(seed), "--min-lr-ratio", "0.1"]
    run, again = str(tmp_path / "run"), str(tmp_path / "again")
    assert train.main([*flags, "--out", run]) == 0

    tok = load_tokenizer(run)
    torch.manual_seed(seed)  # train.py's initialization
    cfg = preset("tiny", vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    model = Transformer(cfg).train()
    split = tokenize_cached(split_documents(read_corpus(str(corpus)), 0.1)[0], tok, tokenizer_hash(tok))
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(_reference_groups(model, wd), lr=lr, betas=(0.9, 0.95), eps=1e-8)
    sched = get_cosine_with_min_lr_schedule_with_warmup(opt, warm, steps, min_lr_rate=0.1)
    opt.step()  # (no gradients yet: changes nothing) moves the schedule one step on
    sched.step()
    logged = [e for e in metrics(run) if "train_loss" in e]
    assert len(logged) == steps
    for s in range(steps):
        x, y = get_batch(split, 6, seq, gen)  # (6, T): the draws of three 2-row micro-batches
        loss = model(x, labels=y)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item()
        assert logged[s]["lr"] == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12), s
        assert logged[s]["train_loss"] == pytest.approx(loss.item(), abs=2e-5), s
        assert logged[s]["grad_norm"] == pytest.approx(norm, abs=2e-5) and norm > clip, s
        opt.step()
        opt.zero_grad()
        sched.step()
    got, want = read_safetensors_dir(os.path.join(run, "last")), model.state_dict()
    for name, t in got.items():
        torch.testing.assert_close(t, want[name], atol=1e-5, rtol=0, msg=name)

    assert train.main([*flags, "--out", again]) == 0  # seeds: the same run, bit for bit
    twice = read_safetensors_dir(os.path.join(again, "last"))
    assert all(torch.equal(got[k], twice[k]) for k in got)
    assert trajectory(run) == trajectory(again)


def test_sft_accumulation_weights_micro_batches_by_trained_tokens_end_to_end(ref):
    """Full fine-tuning on completions of different lengths: 4 rows x 1 and 1 row x 4 take the
    same steps (the loss is the mean over the step's trained tokens, as transformers >= 4.46);
    a plain mean over micro-batches moved them by 3e-3 on a tiny base like this one."""
    import torch
    from safetensors.torch import load_file
    _, base, tmp = ref
    rng = random.Random(1)
    words = ["king", "lord", "night", "prince", "be", "not", "alas", "sweet"]
    say = lambda n: " ".join(rng.choices(words, k=rng.randint(1, n)))  # noqa: E731
    data = tmp / "sft-accum.jsonl"
    data.write_text("".join(json.dumps({"prompt": say(6) + " ", "completion": say(12)}) + "\n"
                            for _ in range(16)))  # 12 train samples: no short batch in 3 steps
    flags = ["--base", base, "--finetune", "full", "--data", str(data), "--seq-len", "48",
             "--no-progress", "--threads", "1", "--warmup-steps", "1", "--log-every", "1",
             "--max-steps", "3", "--eval-every", "100", "--lr", "1e-3", "--val-fraction", "0.25"]
    runs = []
    for batch, accum in ((4, 1), (1, 4)):
        run = str(tmp / f"sft-{batch}x{accum}")
        assert train.main([*flags, "--batch-size", str(batch), "--grad-accum", str(accum),
                           "--out", run]) == 0
        runs.append((run, load_file(os.path.join(run, "last", "model.safetensors"))))
    (a, wa), (b, wb) = runs
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-4, rtol=0, msg=name)
    la, lb = ([e["train_loss"] for e in metrics(r) if "train_loss" in e] for r in (a, b))
    assert la == pytest.approx(lb, abs=2e-5)


def test_adamw_groups_decay_matrices_only():
    """Matrices decay (embeddings and an untied lm_head too: nanoGPT's rule, README's 'matrices
    decay, vectors don't'); norm weights, biases and DoRA magnitudes don't; a tied weight is in
    once; frozen parameters are left out; betas as given, eps 1e-8."""
    from engine import finetune
    from engine.config import preset
    from engine.model import Transformer
    from engine.trainer import configure_optimizer

    def groups(model):
        opt = configure_optimizer(model, 1e-3, 0.1, (0.9, 0.95))
        names = {id(p): n for n, p in model.named_parameters()}
        assert all(g["betas"] == (0.9, 0.95) and g["eps"] == 1e-8 for g in opt.param_groups)
        got = {g["weight_decay"]: sorted(names[id(p)] for p in g["params"]) for g in opt.param_groups}
        assert sum(map(len, got.values())) == len({id(p) for g in opt.param_groups for p in g["params"]})
        return got, names

    for tied, bias in ((False, False), (True, True)):
        model = Transformer(preset("tiny", vocab_size=64, tie_word_embeddings=tied,
                                   attention_bias=bias))
        got, names = groups(model)
        want = _reference_groups(model, 0.1)
        assert got == {g["weight_decay"]: sorted(names[id(p)] for p in g["params"]) for g in want}
        assert "model.embed_tokens.weight" in got[0.1]
        assert ("lm_head.weight" in got[0.1]) != tied  # tied: the embedding, counted once
        assert any(n.endswith(".bias") for n in got[0.0]) == bias
    model = Transformer(preset("tiny", vocab_size=64))
    finetune.prepare(model, "dora", r=2, alpha=4, dropout=0.0, rslora=False, targets="q_proj",
                     trainable_layers=None)
    got, _ = groups(model)
    assert {n.rsplit(".", 2)[-2] for n in got[0.1]} == {"lora_A", "lora_B"}
    assert {n.rsplit(".", 1)[-1] for n in got[0.0]} == {"lora_magnitude_vector"}


def test_lora_dropout_resume_does_not_depend_on_the_saved_global_rng(ref, monkeypatch):
    """LoRA dropout draws its masks from the global generator of the device: on CUDA, and on every
    rank under torchrun, that generator is not in training_state.pt (it holds the CPU one of rank
    0), so a resumed run drew other masks and its losses left the uninterrupted run's (seen under
    torchrun: 4.8668 vs 4.8446 at step 4). Here the CPU generator's restore is switched off to
    stand for them: the masks must come from (seed, rank, step), not from what was restored."""
    import torch
    data, base, tmp = ref
    flags = ["--base", base, "--finetune", "lora", "--lora-r", "4", "--lora-dropout", "0.3",
             "--data", data, "--seq-len", "16", "--batch-size", "4", "--no-progress",
             "--threads", "1", "--warmup-steps", "1", "--log-every", "1", "--eval-every", "100",
             "--eval-batches", "1", "--final-eval-windows", "2", "--max-steps", "5", "--lr", "1e-2"]
    full, part = str(tmp / "dropout-full"), str(tmp / "dropout-part")
    assert train.main([*flags, "--out", full]) == 0
    assert train.main([*flags, "--out", part, "--pause-at-step", "2"]) == 0
    monkeypatch.setattr(torch, "set_rng_state", lambda state: None)
    torch.manual_seed(12345)  # wherever the process's generator happens to be
    assert resume(part) == 0
    assert_same_trajectory(full, part)


def test_training_state_is_fsynced_before_it_replaces_the_last_one(tmp_path, monkeypatch):
    """recover_last takes a directory holding training_state.pt for a complete checkpoint: the
    file is written like the weights (temp file, fsync, rename), so a full disk keeps the previous
    state and leaves no temp file; it loads with weights_only=True."""
    import errno
    import torch
    from engine.config import preset
    from engine.model import Transformer
    from engine.trainer import STATE_FILE, configure_optimizer, load_training_state, save_training_state
    model = Transformer(preset("tiny", vocab_size=64))
    opt, gen = configure_optimizer(model, 1e-3, 0.1, (0.9, 0.95)), torch.Generator().manual_seed(1)
    save_training_state(str(tmp_path), opt, 3, gen, {"a": 1})
    before = (tmp_path / STATE_FILE).read_bytes()

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(os, "fsync", disk_full)
        with pytest.raises(OSError, match="No space left"):
            save_training_state(str(tmp_path), opt, 4, gen, {"a": 2})
    assert os.listdir(tmp_path) == [STATE_FILE] and (tmp_path / STATE_FILE).read_bytes() == before
    state = torch.load(tmp_path / STATE_FILE, weights_only=True)
    assert state["step"] == 3
    assert load_training_state(str(tmp_path), opt, torch.Generator()) == (3, {"a": 1})


def paused_run_on_a_replaced_base(ref, tmp_path, change):
    """A --finetune full run paused at step 1, then its --base directory overwritten by a random
    model whose config differs by change(config) -> {field: value}. Returns the run directory."""
    import dataclasses
    import shutil
    from engine.checkpoint import load_config, save_model
    from engine.model import Transformer
    data, full, _ = ref
    base = shutil.copytree(full, str(tmp_path / "base"))
    run = str(tmp_path / "run")
    assert train.main(["--base", base, "--finetune", "full", "--data", data, "--out", run,
                       "--max-steps", "3", "--pause-at-step", "1", "--batch-size", "2",
                       "--seq-len", "16", "--eval-batches", "1", "--no-progress",
                       "--threads", "1"]) == 0
    cfg = load_config(base)
    save_model(Transformer(dataclasses.replace(cfg, **change(cfg))), base)
    return run


def test_resume_refuses_optimizer_state_of_another_model_in_one_line(ref, tmp_path):
    """A --finetune full run whose --base was replaced by a deeper model: the weights restore
    by name, but the optimizer state was the old model's (torch's 'parameter group that doesn't
    match the size' said nothing of why). Same-count state of other shapes loaded silently and
    failed at the first step with a tensor size error."""
    import torch
    from engine.config import preset
    from engine.model import Transformer
    from engine.trainer import configure_optimizer, load_training_state, save_training_state
    run = paused_run_on_a_replaced_base(ref, tmp_path, lambda cfg: {
        "num_hidden_layers": cfg.num_hidden_layers + 1})
    with pytest.raises(ValueError, match=r"training_state\.pt: its optimizer state does not fit "
                                         r"the parameters that train now"):
        resume(run)

    def stepped(vocab):  # an optimizer with state (after one step)
        model = Transformer(preset("tiny", vocab_size=vocab))
        opt = configure_optimizer(model, 1e-3, 0.1, (0.9, 0.95))
        model(torch.randint(64, (2, 8)), labels=torch.randint(64, (2, 8))).backward()
        opt.step()
        return opt
    save_training_state(str(tmp_path), stepped(64), 3, torch.Generator(), {})
    with pytest.raises(ValueError, match="optimizer state does not fit"):
        load_training_state(str(tmp_path), stepped(128), torch.Generator())
    assert load_training_state(str(tmp_path), stepped(64), torch.Generator())[0] == 3


def test_resume_refuses_weights_of_another_shape_in_one_line(ref, tmp_path):
    """A --finetune full run whose --base was replaced by a wider model (same tensor names):
    restore_trained copied by name and failed with torch's 'The size of tensor a (...) must
    match the size of tensor b (...)'. Now one line naming the tensor and both shapes."""
    run = paused_run_on_a_replaced_base(ref, tmp_path, lambda cfg: {
        "intermediate_size": cfg.intermediate_size * 2})
    msg = (r"run/last: tensor 'model\.layers\.0\.mlp\.\w+\.weight' has shape \(\d+, \d+\), "
           r"the model has \(\d+, \d+\) \(a checkpoint of another model")
    with pytest.raises(ValueError, match=msg):
        resume(run)


@pytest.mark.parametrize("finetune", [None, "lora"])
def test_final_score_reuses_the_best_periodic_one_exactly(corpus, tmp_path, monkeypatch,
                                                          finetune):
    """When the periodic evaluation already covers every final window, the best checkpoint's
    periodic score is the final one: the figures equal a recomputation from the restored
    checkpoint, and no extra evaluation runs."""
    from engine import tasks
    base = None
    if finetune:  # a base to fine-tune: a short run from scratch
        base = str(tmp_path / "base")
        assert train.main(["--data", str(corpus), "--out", base, "--max-steps", "6", *TINY]) == 0
    tiny = TINY[4:] if finetune else TINY  # the base brings its preset and vocabulary
    assert TINY[:4] == ["--preset", "tiny", "--vocab-size", "300"]
    flags = ["--data", str(corpus), "--max-steps", "12", "--eval-every", "4", *tiny,
             "--eval-batches", "100", "--lr", "3e-3"]  # 100 x 8 rows: every validation window
    if finetune:
        flags += ["--base", base, "--finetune", finetune]
    calls = []
    evaluate = tasks.LMTask.evaluate
    monkeypatch.setattr(tasks.LMTask, "evaluate", lambda self, *a, **k: (
        calls.append(k.get("full", False)), evaluate(self, *a, **k))[1])
    assert train.main([*flags, "--out", str(tmp_path / "reused")]) == 0
    assert calls and not any(calls)  # periodic ones only
    monkeypatch.setattr(tasks.LMTask, "final_is_periodic", lambda self, full: False)
    assert train.main([*flags, "--out", str(tmp_path / "recomputed")]) == 0
    assert calls[-1]  # the final evaluation ran this time
    finals = [[e for e in metrics(tmp_path / run) if e.get("final")][0]
              for run in ("reused", "recomputed")]
    for f in finals:
        del f["elapsed_s"]
    assert finals[0] == finals[1]
    best = min((e for e in metrics(tmp_path / "reused") if "val_loss" in e and not e.get("final")),
               key=lambda e: e["val_loss"])
    assert finals[0]["val_loss"] == best["val_loss"]


def test_default_run_directory_names_preset_mode_base_and_objective(tmp_path, monkeypatch):
    """Without --out: out/<preset>-<time>, out/<mode>-<base>-<time>, and a DPO run says so
    (out/dpo-<mode>-<base>-<time>), so runs of one base stay apart in out/."""
    import argparse
    import re
    from engine.trainer import open_run_dir
    monkeypatch.chdir(tmp_path)
    names = []
    for base, finetune, objective in ((None, None, "lm"), ("models/my-base/", "lora", "lm"),
                                      ("my-base", "full", "dpo")):
        args = argparse.Namespace(resume=None, out=None, preset="tiny", base=base,
                                  finetune=finetune, objective=objective)
        _, run_dir, resume_dir = open_run_dir(args, set(), {})
        assert resume_dir is None and os.path.isdir(run_dir)
        names.append(re.sub(r"-\d{8}-\d{6}$", "-TIME", os.path.relpath(run_dir)))
    assert names == [os.path.join("out", n) for n in
                     ("tiny-TIME", "lora-my-base-TIME", "dpo-full-my-base-TIME")]


def test_progress_bar_under_a_time_budget_shows_the_budget_used(corpus, tmp_path, monkeypatch):
    """--max-minutes alone: the bar counted steps to the default --max-steps 100000 and showed
    an ETA of hours. Now it runs to 100 (% of the budget used); with --max-steps only, steps."""
    bars = []

    class Bar:
        write = staticmethod(print)

        def __init__(self, total, initial, **kw):
            self.total, self.n = total, initial
            bars.append(self)

        def update(self, k):
            self.n += k

        def __getattr__(self, name):  # set_postfix, set_description, close, ...
            return lambda *a, **k: None
    monkeypatch.setattr(train, "tqdm", Bar)
    assert train.main(["--data", str(corpus), "--out", str(tmp_path / "a"), "--max-minutes",
                       "0.02", *TINY]) == 0
    assert bars[-1].total == 100 and 0 < bars[-1].n <= 100
    assert train.main(["--data", str(corpus), "--out", str(tmp_path / "b"), "--max-steps", "3",
                       *TINY]) == 0
    assert (bars[-1].total, bars[-1].n) == (3, 3)
