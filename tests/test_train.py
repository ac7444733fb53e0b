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
    (None, ["--top-k", "3"], "unrecognized arguments"),
    (None, ["--batch-size", "0"], "--batch-size must be >= 1"),
    (None, ["--preset", "huge"], "unknown preset 'huge'"),
])
def test_bad_input_one_clear_line(tmp_path, make, flags, message):
    args = list(flags)
    if make is not None:
        p = tmp_path / "c.txt"
        p.write_text(make)
        args = ["--data", str(p), *args]
    r = run_cli("--out", str(tmp_path / "o"), *TINY, *args, env={"WHETSTONE_CACHE": str(tmp_path)})
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_invalid_utf8_is_replaced_and_counted(tmp_path, capsys):
    from engine.data import read_corpus
    p = tmp_path / "bad.txt"
    p.write_bytes(b"good text \xff\xfe more\n")
    text = read_corpus(str(p))
    assert "\ufffd" in text
    assert "2 invalid UTF-8" in capsys.readouterr().out


def test_existing_checkpoint_is_not_overwritten(corpus, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    r = run_cli("--data", str(corpus), "--out", str(run), *TINY,
                env={"WHETSTONE_CACHE": str(tmp_path)})
    assert r.returncode == 2 and "already holds a checkpoint" in r.stderr
    assert (run / "config.json").read_text() == "{}"


def test_lr_schedule_warmup_then_cosine():
    from engine.trainer import get_lr
    assert get_lr(0, 0.0, 1.0, 10, 0.1) == pytest.approx(0.1)
    assert get_lr(9, 0.0, 1.0, 10, 0.1) == pytest.approx(1.0)
    assert get_lr(50, 0.5, 1.0, 10, 0.1) == pytest.approx(0.55)
    assert get_lr(100, 1.0, 1.0, 10, 0.1) == pytest.approx(0.1)


def test_token_cache_reused(tmp_path, monkeypatch):
    from engine.data import tokenize_cached

    class Counting:
        vocab_size, calls = 300, 0

        def encode(self, text, add_bos=False):
            Counting.calls += 1
            return list(text.encode())

        def save(self, d):
            open(os.path.join(d, "t"), "w").write("x")

    monkeypatch.setenv("WHETSTONE_CACHE", str(tmp_path))
    a = tokenize_cached("abc\ndef\n", Counting())
    b = tokenize_cached("abc\ndef\n", Counting())
    assert Counting.calls == 1 and list(a.tokens) == list(b.tokens) == list(b"abc\ndef\n")
    assert a.n_bytes == 8


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
