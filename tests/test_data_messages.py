"""What a user reads when data files are malformed: JSON errors named with their column in every
JSONL reader, --bad-lines on plain-text JSONL corpora ("text" records), and a record of another
form than its file's first one."""
import argparse
import json
import os
import subprocess
import sys

import pytest

from engine.data import BadLine, read_corpus, read_documents
from engine.eval import load_choice_items
from engine.sft import load_examples, load_preferences
from engine.tasks import LMTask, read_text_splits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402

GOOD = {"text": {"text": "a document"},
        "sft": {"instruction": "say hi", "output": "hi"},
        "choice": {"context": "2+2=", "choices": ["4", "5"], "label": 0}}
READERS = {"text": read_documents, "sft": load_examples, "choice": load_choice_items}


def write(path, rows, end="\n"):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + end for r in rows))
    return str(path)


# ---------------------------------------------------------------------------------------------
# 1. JSON errors: json's message and the column, the same in every reader
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(READERS))
@pytest.mark.parametrize("line, why", [
    # json's messages ending in "at" lost the position (data.py) or read "at at column" (sft, eval)
    ('{"text": "cut short', "Unterminated string starting at column 10"),
    ('{"text": "a\tb"}', "Invalid control character at column 12"),
    ('{"text": "a" "b"}', "Expecting ',' delimiter at column 14"),
    ('{"text": "a",}', "Expecting property name enclosed in double quotes at column 14"),
])
@pytest.mark.parametrize("end", ["\n", "\r\n"])
def test_invalid_json_names_the_column(tmp_path, kind, line, why, end):
    """A line json.loads refuses is FILE:LINE: invalid JSON (MESSAGE at column N), in the
    plain-text corpus reader, the SFT/preference reader and the multiple-choice reader, with
    LF or CRLF line ends (the line break is not part of the line: a string cut short is
    "unterminated", not a control character)."""
    path = write(tmp_path / "d.jsonl", [GOOD[kind], GOOD[kind], line, GOOD[kind]], end)
    with pytest.raises(ValueError) as e:
        READERS[kind](path)
    assert str(e.value) == f"{path}:3: invalid JSON ({why})"


# ---------------------------------------------------------------------------------------------
# 2. --bad-lines on a JSONL corpus of "text" records
# ---------------------------------------------------------------------------------------------
def _corpus(tmp_path, name="corrupt.jsonl"):
    rows = [{"text": f"the king and his lord walked in the night, number {i}. " * 3}
            for i in range(60)]
    rows[5] = '{"text": "a record cut short'
    rows[9] = {"txt": "a typo in the key"}
    return write(tmp_path / name, rows)


def _args(**kw):
    return argparse.Namespace(**{"bad_lines": "stop", "val_data": None, "val_fraction": 0.1, **kw})


def test_text_jsonl_bad_lines_stop_or_skip(tmp_path):
    path = _corpus(tmp_path)
    # stop (the default): the first bad line, and, from train.py's reader, the flag that skips it
    with pytest.raises(BadLine, match=r"corrupt\.jsonl:6: invalid JSON \(Unterminated string "
                                      r"starting at column 10\)$"):
        read_documents(path)
    with pytest.raises(ValueError) as e:
        read_text_splits(_args(), path)
    assert str(e.value) == (f"{path}:6: invalid JSON (Unterminated string starting at column 10); "
                            "--bad-lines skip leaves such lines out")
    # skip: each bad line warned about as SFT data's are, the rest read, the lines listed
    warnings, skipped = [], []
    docs = read_documents(path, warnings.append, "skip", skipped)
    assert len(docs) == 58 and skipped == ["corrupt.jsonl:6", "corrupt.jsonl:10"]
    assert warnings == [f"warning: skipping {path}:6: invalid JSON (Unterminated string starting "
                        "at column 10)",
                        f"warning: skipping {path}:10: expected an object with a string 'text' "
                        "field"]
    train_docs, val_docs = read_text_splits(_args(bad_lines="skip"), path)
    assert train_docs.docs + val_docs.docs == docs
    assert train_docs.skipped == skipped and val_docs.skipped == []
    with pytest.raises(ValueError, match="on_error must be 'stop' or 'skip'"):
        read_documents(path, on_error="ignore")
    # nothing left: the count says why the corpus is empty
    only_bad = write(tmp_path / "bad.jsonl", ["{", "[]"])
    with pytest.raises(ValueError, match=r"corpus .*bad\.jsonl is empty \(2 malformed line\(s\) "
                                         r"skipped\)"):
        read_documents(only_bad, lambda m: None, "skip")


def test_skipped_lines_name_their_file_in_a_directory_and_with_val_data(tmp_path):
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    write(d / "a.txt", ["plain text is one document"])
    write(d / "sub" / "b.jsonl", [{"text": "one"}, "{oops", {"text": "two"}])
    skipped = []
    assert read_documents(str(d), lambda m: None, "skip", skipped) == \
        ["plain text is one document\n", "one", "two"]
    assert skipped == [os.path.join("sub", "b.jsonl") + ":2"]
    val = write(tmp_path / "val.jsonl", [{"text": "held"}, {"text": 3}])
    train_docs, val_docs = read_text_splits(_args(bad_lines="skip", val_data=val), str(d))
    assert train_docs.skipped == skipped and val_docs.skipped == ["val.jsonl:2"]


def test_skipped_lines_are_reported_and_keyed_by_what_was_read(tmp_path):
    """The data line and the model card's sizes count skipped lines as SFT data's do; the token
    cache is keyed by the documents read, so a corpus read with skip is another cache than the
    whole file's (and the same as the file without those lines)."""
    import numpy as np
    from engine.data import TokenSplit
    path = _corpus(tmp_path)
    skipped = read_corpus(path, lambda m: None, "skip")
    rows = open(path).read().splitlines()
    clean = write(tmp_path / "clean.jsonl", [r for i, r in enumerate(rows) if i not in (5, 9)])
    fixed = write(tmp_path / "fixed.jsonl", [json.dumps({"text": "a record cut short"})
                                             if i in (5, 9) else r for i, r in enumerate(rows)])
    assert skipped.key() == read_corpus(clean).key() != read_corpus(fixed).key()
    split = TokenSplit(np.arange(200, dtype=np.uint16), 400, "k")
    task = LMTask(split, split, 2, 8, 1)
    assert "malformed" not in task.describe(path) and "skipped lines" not in task.sizes()
    task.skipped = [f"corrupt.jsonl:{i}" for i in range(1, 13)]
    assert task.describe(path).endswith(
        "2.00 bytes/token; 12 malformed line(s) skipped (corrupt.jsonl:1, corrupt.jsonl:2, "
        "corrupt.jsonl:3, corrupt.jsonl:4, corrupt.jsonl:5, corrupt.jsonl:6, corrupt.jsonl:7, "
        "corrupt.jsonl:8, corrupt.jsonl:9, corrupt.jsonl:10, ...)")
    assert task.sizes()["skipped lines"] == 12


TINY = ["--preset", "tiny", "--max-steps", "1", "--vocab-size", "300", "--batch-size", "2",
        "--seq-len", "16", "--no-progress", "--threads", "1", "--eval-batches", "1",
        "--final-eval-windows", "1"]


def test_train_cli_bad_lines_on_a_text_jsonl(tmp_path, monkeypatch, capsys):
    """`train.py --bad-lines skip --data corrupt.jsonl` stopped at the broken line (the flag
    was refused only after the corpus was read); now it trains on the other lines, and without
    the flag the error says how to skip."""
    monkeypatch.setenv("WHETSTONE_CACHE", str(tmp_path / "cache"))
    path = _corpus(tmp_path)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *TINY, "--data", path,
                        "--out", str(tmp_path / "stop")], capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, "WHETSTONE_CACHE": str(tmp_path / "cache")},
                       timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: {path}:6: invalid JSON (Unterminated string starting at column 10); "
        "--bad-lines skip leaves such lines out"]
    assert train.main([*TINY, "--data", path, "--bad-lines", "skip",
                       "--out", str(tmp_path / "skip")]) == 0
    out = capsys.readouterr().out
    assert f"warning: skipping {path}:6: invalid JSON" in out
    assert f"warning: skipping {path}:10: expected an object" in out
    assert "; 2 malformed line(s) skipped (corrupt.jsonl:6, corrupt.jsonl:10)" in out
    assert "- skipped lines: 2" in (tmp_path / "skip" / "README.md").read_text()


def test_bad_lines_skip_on_plain_text_is_refused_before_reading(tmp_path):
    """Plain text has no lines to skip: said at once, not after the corpus was read (here the
    reading would have failed first on a binary file)."""
    p = tmp_path / "c.txt"
    p.write_bytes(b"\0" * 100)
    with pytest.raises(ValueError, match=r"--bad-lines skip applies only to JSONL data \(SFT, "
                                         r"preference or 'text' records\); .*c\.txt is plain text"):
        read_text_splits(_args(bad_lines="skip"), str(p))
    # a JSONL --val-data is something to skip lines of
    val = write(tmp_path / "v.jsonl", [{"text": "held out"}, "{"])
    p.write_text("the training text\n" * 10)
    tr, va = read_text_splits(_args(bad_lines="skip", val_data=val), str(p))
    assert va.docs == ["held out"] and va.skipped == ["v.jsonl:2"]


# ---------------------------------------------------------------------------------------------
# 3. One file, one form
# ---------------------------------------------------------------------------------------------
CHAT = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
INSTRUCTION = {"instruction": "say hi", "output": "hi"}
COMPLETION = {"prompt": "2+2=", "completion": "4"}
PAIR = {"prompt": "2+2=", "chosen": "4", "rejected": "5"}


@pytest.mark.parametrize("first, other, message", [
    (INSTRUCTION, COMPLETION, "a prompt/completion record in a file of instruction records"),
    (COMPLETION, INSTRUCTION, "an instruction record in a file of prompt/completion records"),
    (CHAT, COMPLETION, "a prompt/completion record in a file of chat (messages) records"),
    (INSTRUCTION, CHAT, "a chat (messages) record in a file of instruction records"),
    (INSTRUCTION, PAIR, "a preference (prompt/chosen/rejected) record in a file of instruction "
                        "records"),
    (COMPLETION, {"text": "a document"}, "a text record in a file of prompt/completion records"),
])
def test_a_record_of_another_form_is_named(tmp_path, first, other, message):
    """It read `missing 'instruction' (instruction data needs instruction and output; keys:
    ['completion', 'prompt'])`: the record's own form, and the file's (its first record's line)."""
    path = write(tmp_path / "sft.jsonl", [first, other, first])
    with pytest.raises(ValueError) as e:
        load_examples(path)
    assert str(e.value) == f"{path}:2: {message} (its form, from line 1); one file holds one form"
    # the file's form is its first record's: the line named is that record's
    path = write(tmp_path / "late.jsonl", ["", "{not json", first, other])
    warnings = []
    exs, skipped = load_examples(path, on_error="skip", warn=warnings.append)
    assert [e.line for e in exs] == [3] and skipped == [2, 4]
    assert warnings[1] == f"warning: skipping {path}:4: {message} (its form, from line 3); one file holds one form"


def test_an_incomplete_record_is_told_what_its_files_form_needs(tmp_path):
    """A record with only some keys of another form is no record of that form."""
    path = write(tmp_path / "sft.jsonl", [INSTRUCTION, {"prompt": "p"}])
    with pytest.raises(ValueError, match=r"sft\.jsonl:2: missing 'instruction' \(instruction data "
                                         r"needs instruction and output; keys: \['prompt'\]\)$"):
        load_examples(path)


def test_preference_files_hold_one_form(tmp_path):
    for other, name in ((COMPLETION, "a prompt/completion"), (CHAT, "a chat (messages)"),
                        (INSTRUCTION, "an instruction")):
        path = write(tmp_path / "p.jsonl", [PAIR, other])
        with pytest.raises(ValueError) as e:
            load_preferences(path)
        assert str(e.value) == (f"{path}:2: {name} record in a file of preference "
                                "(prompt/chosen/rejected) records (its form, from line 1); one file holds one form")
    # a pair with a key missing is still told what a pair needs; SFT data given as preferences
    # is told so from its first line on
    path = write(tmp_path / "q.jsonl", [PAIR, {"prompt": "p", "chosen": "a"}])
    with pytest.raises(ValueError, match=r"q\.jsonl:2: missing 'rejected'"):
        load_preferences(path)
    path = write(tmp_path / "s.jsonl", [COMPLETION, PAIR])
    with pytest.raises(ValueError, match=r"s\.jsonl:1: missing 'chosen'"):
        load_preferences(path)
    path = write(tmp_path / "b.jsonl", ["{bad"])  # no record to take a form from
    with pytest.raises(ValueError, match=r"b\.jsonl:1: invalid JSON \(Expecting property name "
                                         r"enclosed in double quotes at column 2\)$"):
        load_preferences(path)


# ---------------------------------------------------------------------------------------------
# 4. SFT or preference JSONL given as a text corpus (a from-scratch run, perplexity)
# ---------------------------------------------------------------------------------------------
SCRATCH = " (a from-scratch run reads text, or JSONL with a 'text' field)"


@pytest.mark.parametrize("row, records, need", [
    (CHAT, "chat (messages) records (SFT data)", "fine-tuning on them needs --base MODEL"),
    (INSTRUCTION, "instruction records (SFT data)", "fine-tuning on them needs --base MODEL"),
    (COMPLETION, "prompt/completion records (SFT data)", "fine-tuning on them needs --base MODEL"),
    (PAIR, "preference (prompt/chosen/rejected) records (DPO data)",
     "training on them needs --objective dpo --base MODEL"),
])
def test_sft_data_as_a_text_corpus_names_the_way_to_train_on_it(tmp_path, row, records, need):
    """A from-scratch run reads its corpus before build_task tells SFT data from text: every
    line was "expected an object with a string 'text' field; --bad-lines skip leaves such lines
    out", and with skip the corpus was empty after a warning a line. Now one line says what the
    file holds and what trains on it, with either --bad-lines (a malformed first line does not
    hide the form)."""
    path = write(tmp_path / "sft.jsonl", ["{oops", row, row])
    for mode in ("stop", "skip"):
        with pytest.raises(ValueError) as e:
            read_text_splits(_args(bad_lines=mode), path)
        assert str(e.value) == f"{path} holds {records}: {need}{SCRATCH}"
    # a file of a corpus directory: the directory cannot be SFT data, the file can
    d = tmp_path / "docs"
    d.mkdir()
    write(d / "a.txt", ["plain text"])
    inner = write(d / "b.jsonl", [row])
    with pytest.raises(ValueError) as e:
        read_text_splits(_args(), str(d))
    assert str(e.value) == (f"{inner} (in corpus directory {d}) holds {records}: a corpus reads "
                            f"text, or JSONL with a 'text' field; {need}, with that file as --data")
    # --val-data of another kind than a text --data (with or without --base)
    text = write(tmp_path / "t.jsonl", [{"text": "the training text"}] * 3)
    with pytest.raises(ValueError) as e:
        read_text_splits(_args(val_data=path), text)
    assert str(e.value) == (f"--val-data {path} holds {records}, but --data {text} is text: "
                            "validation data is of the training data's kind")


def test_text_corpora_are_read_as_before(tmp_path):
    """The check leaves text alone: 'text' records, plain files, and JSONL whose form cannot be
    told (only bad lines, unknown keys: the corpus reader names the line)."""
    d = tmp_path / "docs"
    d.mkdir()
    write(d / "a.txt", ["plain text"])
    write(d / "b.jsonl", ["{oops", {"text": "a record"}])
    write(d / "c.json", [{"text": "another"}])
    tr, va = read_text_splits(_args(bad_lines="skip"), str(d))
    assert "".join(tr.docs + va.docs) == "plain text\na recordanother" and tr.skipped == [
        "b.jsonl:1"]
    odd = write(tmp_path / "odd.jsonl", [{"body": "x"}])
    with pytest.raises(ValueError) as e:
        read_text_splits(_args(), odd)
    assert str(e.value) == (f"{odd}:1: expected an object with a string 'text' field; "
                            "--bad-lines skip leaves such lines out")


def test_train_cli_sft_data_without_base(tmp_path):
    """`train.py --data chat.jsonl` without --base: one line naming --base, not line 1's
    missing 'text' field (nor "--eval-batches applies only to plain-text data": without --base
    the data is read as text)."""
    path = write(tmp_path / "chat.jsonl", [CHAT] * 20)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *TINY, "--data", path,
                        "--bad-lines", "skip", "--out", str(tmp_path / "run")],
                       capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**os.environ, "WHETSTONE_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 2 and r.stdout == "" and r.stderr.strip().splitlines() == [
        f"error: {path} holds chat (messages) records (SFT data): fine-tuning on them needs "
        f"--base MODEL{SCRATCH}"]


# ---------------------------------------------------------------------------------------------
# 5. A lone surrogate in a 'text' record
# ---------------------------------------------------------------------------------------------
def test_a_lone_surrogate_names_its_line_and_can_be_skipped(tmp_path):
    """JSON can escape half a surrogate pair; the tokenizer refused the whole corpus with "text
    has a lone surrogate '\\ud83d' at index 984" (an index into the joined training text). Now it
    is the record's FILE:LINE, and --bad-lines skip leaves the line out. A pair is one
    character, and plain text cannot hold one (an encoded surrogate is invalid UTF-8)."""
    path = write(tmp_path / "s.jsonl", ['{"text": "ok \\ud83d\\ude00"}', '{"text": "bad \\ud83d!"}',
                                        {"text": "fine"}])
    why = "'text' has a lone surrogate '\\ud83d' at index 4: not valid Unicode, cannot be encoded"
    with pytest.raises(BadLine) as e:
        read_documents(path)
    assert str(e.value) == f"{path}:2: {why}"
    with pytest.raises(ValueError) as e:
        read_text_splits(_args(), path)
    assert str(e.value) == f"{path}:2: {why}; --bad-lines skip leaves such lines out"
    warnings, skipped = [], []
    assert read_documents(path, warnings.append, "skip", skipped) == ["ok \U0001F600", "fine"]
    assert warnings == [f"warning: skipping {path}:2: {why}"] and skipped == ["s.jsonl:2"]
    plain = tmp_path / "p.txt"
    plain.write_bytes(b"bad \xed\xa0\xbd!")  # '\ud83d' as CESU-8
    warnings = []
    assert read_documents(str(plain), warnings.append) == ["bad \ufffd\ufffd\ufffd!"]
    assert warnings == [f"warning: {plain}: 3 invalid UTF-8 byte sequence(s) replaced with U+FFFD"]
