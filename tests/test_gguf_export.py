"""GGUF export (engine/gguf_export.py): files read back by our loader and, independently, by
transformers' GGUF loader (its own q/k un-permutation, dequantization and tokenizer conversion);
the demo model's export keeps every llama.* and tokenizer.* key of llama.cpp's own file (slow).
"""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from engine.config import ModelConfig  # noqa: E402
from engine.gguf import load_gguf, tokenizer_from_gguf  # noqa: E402
from engine.gguf_export import PRE_PROBE, cli, export_gguf, pre_tokenizer_name  # noqa: E402
from engine.lora import apply_lora, save_adapter  # noqa: E402
from engine.model import Transformer  # noqa: E402
from tokenizer import SentencePieceTokenizer, load_tokenizer  # noqa: E402
from tokenizer.bpe import PRE_TOKENIZERS, PreTokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(vocab_size=640, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=0, eos_token_id=1)
TEXTS = ["Hello world, 1234 apples!", "  two  spaces\nand a newline\t tab", "naïve café 日本 🚀",
         "<|eot_id|>after a special token"]


def random_model(**kw) -> Transformer:
    model = Transformer(ModelConfig(**{**TINY, **kw})).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1 + 0.3 * torch.randn(p.shape, generator=g)) if name.endswith("norm.weight")
                    else 0.1 * torch.randn(p.shape, generator=g))
    return model


def bpe_tokenizer(tmp_path, family="llama-bpe"):
    """A byte-level BPE trained by HF tokenizers with a llama.cpp family's pre-tokenizer."""
    hf = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers
    t = hf.Tokenizer(models.BPE())
    tj = {"version": "1.0", "added_tokens": [], "normalizer": None, "post_processor": None,
          "pre_tokenizer": PRE_TOKENIZERS[family], "decoder": None,
          "model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}}
    t.pre_tokenizer = hf.Tokenizer.from_str(json.dumps(tj)).pre_tokenizer
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|begin_of_text|>", "<|eot_id|>"],
                                  show_progress=False)
    t.train_from_iterator(TEXTS * 20 + ["the king my lord good night sweet prince"] * 50, trainer)
    d = tmp_path / f"tok-{family}"
    d.mkdir()
    (d / "tokenizer.json").write_text(t.to_str())
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "add_bos_token": True,
         "chat_template": "{% for m in messages %}{{ m.content }}<|eot_id|>{% endfor %}"}))
    return load_tokenizer(str(d))


def hf_load(path):
    d, f = os.path.dirname(path), os.path.basename(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    return model.eval(), transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)


def logits(model, ids):
    with torch.no_grad():
        out = model(torch.tensor([ids]))
    return (out.logits if hasattr(out, "logits") else out)[0]


@pytest.mark.parametrize("family,kw", [
    ("llama-bpe", dict()),                                                 # llama, GQA, untied
    ("qwen2", dict(attention_bias=True, tie_word_embeddings=True,
                   architectures=["Qwen2ForCausalLM"])),                    # qwen2: bias, tied
])
def test_f32_export_loads_back_and_in_transformers(family, kw, tmp_path):
    model, tok = random_model(**kw), bpe_tokenizer(tmp_path, family)
    path = str(tmp_path / "m.gguf")
    info = export_gguf(model, tok, path, "f32", name="tiny")
    assert info["types"] == {"F32": 2 + 9 * 2 + (0 if kw else 1) + (6 if kw else 0)}
    back, fields = load_gguf(path)
    assert fields["general.architecture"] == ("qwen2" if kw else "llama")
    tok_back = tokenizer_from_gguf(fields, path)
    hf, hf_tok = hf_load(path)
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok_back.encode(text) == ids
        assert hf_tok(text)["input_ids"] == ids, text  # transformers' own GGUF tokenizer
        want = logits(model, ids)
        assert (logits(back, ids) - want).abs().max() < 1e-5
        assert (logits(hf, ids) - want).abs().max() < 1e-4
    assert tok_back.chat_template == tok.chat_template and tok_back.add_bos and tok_back.eos_id == 1
    # a token per embedding row, as llama.cpp requires: rows past the tokenizer are "[PAD{i}]"
    # UNUSED, which the reader leaves out again (so generation keeps masking those rows)
    types = gguf.GGUFReader(path).fields["tokenizer.ggml.token_type"].contents()
    assert len(types) == 640 and set(types[tok.vocab_size:]) == {5} and 5 not in types[:tok.vocab_size]
    assert tok_back.vocab_size == tok.vocab_size < 640


def test_quantized_types_and_q8_fallback(tmp_path):
    model = random_model(hidden_size=48, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64)  # rows of 48: not whole 32-value blocks
    ids = list(range(3, 40))
    want = logits(model, ids)
    for kind, bound in (("f16", 2e-3), ("bf16", 2e-2), ("q8_0", 2e-2)):
        path = str(tmp_path / f"{kind}.gguf")
        info = export_gguf(model, None, path, kind)
        back, _ = load_gguf(path)
        err = ((logits(back, ids) - want).abs().max() / want.abs().max()).item()
        assert err < bound, (kind, err)
        if kind == "q8_0":  # the 64-wide down_proj rows quantize, the 48-wide ones stay F16
            assert info["types"] == {"F32": 2 * 2 + 1, "Q8_0": 2, "F16": 2 * 6 + 2}
    small = export_gguf(model, None, str(tmp_path / "s.gguf"), "q8_0")["bytes"]
    assert small < os.path.getsize(tmp_path / "f16.gguf")


def test_rope_scaling_round_trips(tmp_path):
    for rs in ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
               {"rope_type": "linear", "factor": 2.0}):
        model = random_model(rope_scaling=rs, max_position_embeddings=512)
        path = str(tmp_path / f"{rs['rope_type']}.gguf")
        export_gguf(model, None, path, "f32")
        back, _ = load_gguf(path)
        assert back.config.rope_scaling == rs
        far = dict(input_ids=torch.tensor([[5, 6, 7]]), position_ids=torch.tensor([[0, 200, 500]]))
        with torch.no_grad():
            assert (back(**far) - model(**far)).abs().max() < 1e-5
    odd = {**rs, "rope_type": "llama3", "low_freq_factor": 2.0, "high_freq_factor": 4.0}
    with pytest.raises(ValueError, match="no GGUF form"):
        export_gguf(random_model(rope_scaling=odd), None, str(tmp_path / "y.gguf"))
    assert not os.path.exists(tmp_path / "y.gguf")
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # no temp file left


def llama_style_spm(corpus, vocab_size=400) -> SentencePieceTokenizer:
    """Llama 2's sentencepiece settings: byte fallback, a dummy prefix, no normalization."""
    import io
    import sentencepiece as spm
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(input=str(corpus), model_writer=proto, vocab_size=vocab_size,
                                   model_type="bpe", byte_fallback=True, add_dummy_prefix=True,
                                   normalization_rule_name="identity", minloglevel=2,
                                   remove_extra_whitespaces=False, split_digits=True,
                                   hard_vocab_limit=False)
    return SentencePieceTokenizer(proto.getvalue())


@pytest.mark.parametrize("style", ["ours", "llama"])
def test_sentencepiece_tokenizer_export(style, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(f"the king {i} my lord ünïcode {i * 7} good night"
                                for i in range(400)))
    tok = (SentencePieceTokenizer.train(str(corpus), str(tmp_path / "spm"), 400) if style == "ours"
           else llama_style_spm(corpus))
    path = str(tmp_path / "s.gguf")
    export_gguf(random_model(vocab_size=400), tok, path, "f32")
    back = tokenizer_from_gguf(load_gguf(path)[1], path)
    assert back.vocab_size == tok.vocab_size  # the "[PAD{i}]" rows past it are left out
    texts = ["the king 12 my lord", " leading space", "ünïcode 😀 unseen ✓", "</s> x", "a▁b"]
    for text in texts:
        assert back.encode(text) == tok.encode(text), text
    fields = gguf.GGUFReader(path).fields
    assert fields["tokenizer.ggml.add_space_prefix"].contents() == (style == "llama")
    types, sp = fields["tokenizer.ggml.token_type"].contents(), tok.sp
    assert [i for i, t in enumerate(types) if t == 6] == \
        [i for i in range(tok.vocab_size) if sp.is_byte(i)]
    assert types[sp.unk_id()] == 2 and types[tok.bos_id] == 3 and types[tok.eos_id] == 3
    if style == "llama":  # transformers' GGUF converter assumes the dummy prefix of Llama 2
        _, hf_tok = hf_load(path)
        # (not text starting with a space or following a special token: there HF's non-legacy
        # Metaspace differs from sentencepiece and llama.cpp, which ours follows)
        for text in [t for t in texts if not t.startswith((" ", "</s>"))]:
            assert hf_tok(text)["input_ids"] == tok.encode(text), text


def test_sentencepiece_without_prefix_exports_add_space_prefix_false(tmp_path):
    """A Llama-style model whose directory turns the prefix off (add_prefix_space false): the
    GGUF says so, and loads back to the same ids."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(f"the king {i} my lord good night" for i in range(300)))
    tok = SentencePieceTokenizer(llama_style_spm(corpus).model_proto, prefix="never")
    path = str(tmp_path / "n.gguf")
    export_gguf(random_model(vocab_size=400), tok, path, "f32")
    assert gguf.GGUFReader(path).fields["tokenizer.ggml.add_space_prefix"].contents() is False
    back = tokenizer_from_gguf(load_gguf(path)[1], path)
    for text in ["the king", " the king", "</s>good night"]:
        assert back.encode(text) == tok.encode(text), text
    assert tok.encode("the king") != llama_style_spm(corpus).encode("the king")


def test_sentencepiece_added_tokens_export(tmp_path):
    """ChatML tokens added past the sentencepiece pieces (a Llama 2 / Mistral fine-tune such as
    OpenHermes) are written after them as convert_hf_to_gguf.py does: CONTROL if special, else
    USER_DEFINED, score -1000, a gap filled with [PAD{i}] UNUSED; the export had failed on them."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(f"the king {i} my lord user assistant {i * 7}" for i in range(400)))
    base = llama_style_spm(corpus)
    n = base.vocab_size
    template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
                "'<|im_end|>\n' }}{% endfor %}{{ '<|im_start|>assistant\n' }}")
    tok = SentencePieceTokenizer(base.model_proto, chat_template=template, eos_id=n + 1,
                                 added_tokens=[{"id": n, "content": "<|im_start|>"},
                                               {"id": n + 1, "content": "<|im_end|>"},
                                               {"id": n + 3, "content": "<tool>", "special": False}])
    path = str(tmp_path / "s.gguf")
    export_gguf(random_model(vocab_size=n + 4), tok, path, "f32")
    fields = gguf.GGUFReader(path).fields
    assert fields["tokenizer.ggml.tokens"].contents()[n:] == \
        ["<|im_start|>", "<|im_end|>", f"[PAD{n + 2}]", "<tool>"]
    assert fields["tokenizer.ggml.token_type"].contents()[n:] == [3, 3, 5, 4]
    assert fields["tokenizer.ggml.scores"].contents()[n:n + 2] == [-1000.0, -1000.0]
    back = tokenizer_from_gguf(load_gguf(path)[1], path)
    assert (back.vocab_size, back.eos_id, back.stop_ids) == (n + 4, n + 1, {n + 1})
    chats = [[{"role": "user", "content": "the king 12 <tool> my lord"}],
             [{"role": "system", "content": "ünïcode 😀"}, {"role": "user", "content": "a▁b </s>"},
              {"role": "assistant", "content": " leading space"}]]
    for chat in chats:
        text = tok.apply_chat_template(chat)
        assert back.apply_chat_template(chat) == text
        assert back.encode(text) == tok.encode(text), text
        assert back.decode(tok.encode(text)) == tok.decode(tok.encode(text))


def test_pre_tokenizer_names_and_unknown_one():
    for name in PRE_TOKENIZERS:  # the probe tells every llama.cpp family apart
        assert pre_tokenizer_name(SimpleNamespace(pre_tokenizer=PreTokenizer(name))) == name
    odd = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": False}
    tok = SimpleNamespace(pre_tokenizer=PreTokenizer(odd))
    assert tok.pre_tokenizer(PRE_PROBE)  # it splits, just not like any llama.cpp family
    with pytest.raises(ValueError, match="matches none that llama.cpp knows"):
        pre_tokenizer_name(tok)


def test_cli_merges_an_adapter_and_refuses_bad_input(tmp_path, capsys):
    from engine.checkpoint import save_model
    from engine.lora import merge_lora
    model, tok = random_model(), bpe_tokenizer(tmp_path)
    save_model(model, str(tmp_path / "base"), tok)
    apply_lora(model, targets=("q_proj", "k_proj", "down_proj"), r=4, alpha=8)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    save_adapter(model, str(tmp_path / "ad"))
    merged = merge_lora(model)
    out = tmp_path / "x.gguf"
    assert cli(["--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "ad"),
                "--out", str(out), "--type", "f32"]) == 0
    assert "wrote" in capsys.readouterr().out
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o666 & ~umask  # readable by others, as a plain write
    back, _ = load_gguf(str(out))
    ids = tok.encode(TEXTS[0])
    assert (logits(back, ids) - logits(merged, ids)).abs().max() < 1e-5
    before = out.read_bytes()
    base = str(tmp_path / "base")
    for args, msg in ((["--model", base, "--out", str(out)], "exists; pass --force"),
                      (["--model", str(tmp_path / "nope"), "--out", str(tmp_path / "y.gguf")], "nope"),
                      (["--model", base, "--out", str(tmp_path / "no/y.gguf")], "no such directory"),
                      (["--model", base, "--out", base, "--force"], "is a directory"),
                      (["--model", base, "--adapter", base, "--out", str(tmp_path / "y.gguf")],
                       "adapter")):
        assert cli(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and msg in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(SystemExit) as e:
        cli(["--model", base, "--out", str(tmp_path / "y.gguf"), "--type", "q4_k"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "invalid choice" in err and len(err.strip().splitlines()) == 1
    assert out.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["ad", "base", "tok-llama-bpe",
                                                                           "x.gguf"]
    r = subprocess.run([sys.executable, "-m", "engine.gguf_export", "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--adapter" in r.stdout


@pytest.mark.slow
def test_demo_model_export_keeps_llamacpp_metadata(tmp_path):
    """Exporting the demo GGUF again: every llama.* and tokenizer.* key equals llama.cpp's own
    file, and the f16 copy still answers " Paris"."""
    from engine.hub import fetch, load_model
    src = fetch("smollm2-135m-instruct")
    model, tok = load_model(src)
    path = str(tmp_path / "smol.gguf")
    export_gguf(model, tok, path, "f16", tokenizer_from=src)
    a, b = gguf.GGUFReader(src).fields, gguf.GGUFReader(path).fields
    keys = [k for k in a if k.startswith(("llama.", "tokenizer."))]
    assert len(keys) > 20 and all(b[k].contents() == a[k].contents() for k in keys)
    back, _ = load_gguf(path)
    ids = tok.encode("The capital of France is")
    assert tok.decode([logits(back, ids)[-1].argmax().item()]) == " Paris"


def test_llama_cpp_reads_the_export_to_the_same_logits(tmp_path):
    """llama.cpp itself (llama-cpp-python, not in the dev extras: it compiles llama.cpp, about
    30 minutes on 2 cores) gives our logits for an exported llama and qwen2 model."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import numpy as np
    for family, kw in (("llama-bpe", {}), ("qwen2", dict(attention_bias=True,
                                                          architectures=["Qwen2ForCausalLM"]))):
        model, tok = random_model(**kw), bpe_tokenizer(tmp_path, family)
        path = str(tmp_path / f"{family}.gguf")
        export_gguf(model, tok, path, "f32")
        llm = llama_cpp.Llama(model_path=path, n_ctx=128, logits_all=True, verbose=False)
        for text in TEXTS:
            ids = tok.encode(text)
            assert llm.tokenize(text.encode(), add_bos=tok.add_bos, special=True) == ids, text
            llm.reset()
            llm.eval(ids)
            theirs = torch.from_numpy(np.array(llm.scores[:len(ids)]))
            assert (theirs - logits(model, ids)).abs().max() < 5e-3, (family, text)  # f16 KV cache


def test_window_warned_and_qwen2_llama3_without_gguf_form_refused(tmp_path, capsys):
    """llama.cpp's llama architecture (what convert_hf_to_gguf.py writes for Mistral too) has no
    sliding window: the export says so (same logits within the window, others past it: a window
    of 5 gave max |diff| 4.35 at 27 tokens). Its qwen2 never reads rope_freqs: refused. A window
    that covers the whole context hides nothing and exports as plain llama, without a word."""
    from engine.checkpoint import save_model
    mistral = random_model(sliding_window=5, architectures=["MistralForCausalLM"])
    save_model(mistral, str(tmp_path / "mistral"))
    out = tmp_path / "w.gguf"
    assert cli(["--model", str(tmp_path / "mistral"), "--out", str(out), "--type", "f32"]) == 0
    err = capsys.readouterr().err
    assert "warning: llama.cpp has no sliding window" in err and "up to 5 tokens" in err, err
    back, _ = load_gguf(str(out))
    assert (logits(back, [3, 4, 5, 6, 7]) - logits(mistral, [3, 4, 5, 6, 7])).abs().max() < 1e-5
    out.unlink()
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    qwen2 = random_model(attention_bias=True, rope_scaling=llama3, architectures=["Qwen2ForCausalLM"])
    with pytest.raises(ValueError, match="qwen2 ignores the rope_freqs"):
        export_gguf(qwen2, None, str(out), "f32")
    assert not out.exists()
    wide = random_model(sliding_window=128, architectures=["MistralForCausalLM"])  # = context
    export_gguf(wide, None, str(out), "f32")
    assert "warning" not in capsys.readouterr().err
    back, fields = load_gguf(str(out))
    assert fields["general.architecture"] == "llama"
    ids = list(range(3, 131))  # the whole context
    assert (logits(back, ids) - logits(wide, ids)).abs().max() < 1e-5


def test_gguf_source_with_adapter_keeps_the_adapters_chat_template(tmp_path):
    """--model FILE.gguf --adapter DIR (the README's demo-model export): the tokenizer keys are
    copied from the source file, and its chat template replaced the one the adapter was trained
    with (which load_model(model, adapter=...) and generate.py use)."""
    from engine.hub import load_model
    export_gguf(random_model(), bpe_tokenizer(tmp_path), str(tmp_path / "base.gguf"), "f32")
    model, tok = load_model(str(tmp_path / "base.gguf"))
    apply_lora(model, targets=("q_proj",), r=2, alpha=4)
    save_adapter(model, str(tmp_path / "ad"))
    own = "{% for m in messages %}### {{ m.content }}\n{% endfor %}"
    tok.chat_template = own
    tok.save(str(tmp_path / "ad"))
    out = str(tmp_path / "x.gguf")
    assert cli(["--model", str(tmp_path / "base.gguf"), "--adapter", str(tmp_path / "ad"),
                "--out", out, "--type", "f32"]) == 0
    a, b = gguf.GGUFReader(str(tmp_path / "base.gguf")).fields, gguf.GGUFReader(out).fields
    assert b["tokenizer.chat_template"].contents() == own
    assert all(b[k].contents() == a[k].contents() for k in a
               if k.startswith("tokenizer.") and k != "tokenizer.chat_template")


def test_q8_0_blocks_are_gguf_quants_bytes(tmp_path):
    """Every Q8_0 tensor of an export is, byte for byte, gguf.quants.quantize of the weight as
    llama.cpp lays it out (q and k rows permuted per head first)."""
    from engine.gguf import permute_qk
    from engine.gguf_export import gguf_tensor_names
    model = random_model()
    path = str(tmp_path / "q.gguf")
    export_gguf(model, None, path, "q8_0")
    by_gguf = {g: hf for hf, g in gguf_tensor_names(model.config).items()}
    by_gguf["output.weight"] = "lm_head.weight"
    sd, q8 = model.state_dict(), gguf.GGMLQuantizationType.Q8_0
    tensors = [t for t in gguf.GGUFReader(path).tensors if t.tensor_type == q8]
    assert len(tensors) == 2 + 7 * 2  # every matrix: rows of 64 and 96 are whole blocks
    for t in tensors:
        w = sd[by_gguf[t.name]].float()
        if ".attn_q." in t.name or ".attn_k." in t.name:
            w = permute_qk(w, 4 if ".attn_q." in t.name else 2)
        want = gguf.quants.quantize(w.numpy(), q8)
        assert bytes(memoryview(t.data).cast("B")) == want.tobytes(), t.name


@pytest.mark.parametrize("kind", ["f32", "f16", "bf16", "q8_0"])
def test_round_trip_per_type_and_llamacpp_keys(kind, tmp_path):
    """export -> load gives each weight exactly as the type stores it (f32 itself, f16 / bf16
    rounded, q8_0 = gguf.quants' blocks dequantized, q/k permuted and back) and the same config;
    GGUFReader finds the keys llama.cpp's loader requires. Without a tokenizer the file says
    tokenizer.ggml.model "none" (llama.cpp refuses a file without that key) and keeps bos/eos."""
    from engine.gguf import permute_qk, unpermute_qk
    model = random_model(head_dim=32, num_key_value_heads=1, rms_norm_eps=1e-5)  # hd != 64/4
    path = str(tmp_path / f"{kind}.gguf")
    export_gguf(model, None, path, kind)
    back, fields = load_gguf(path)
    assert back.config == model.config
    assert tokenizer_from_gguf(fields, path) is None
    q8 = gguf.GGMLQuantizationType.Q8_0
    for name, w in model.state_dict().items():
        w = w.float()
        if kind == "f16" and w.dim() == 2:
            want = w.half().float()
        elif kind == "bf16" and w.dim() == 2:
            want = w.bfloat16().float()
        elif kind == "q8_0" and w.dim() == 2:
            n = {"q_proj": 4, "k_proj": 1}.get(name.split(".")[-2])
            p = permute_qk(w, n) if n else w
            want = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(p.numpy(), q8), q8))
            want = unpermute_qk(want, n) if n else want
        else:
            want = w
        assert torch.equal(back.state_dict()[name], want), name
    r = gguf.GGUFReader(path).fields
    required = ["general.architecture", "tokenizer.ggml.model"] + [
        f"llama.{k}" for k in ("context_length", "embedding_length", "block_count",
                               "feed_forward_length", "attention.head_count",
                               "attention.head_count_kv", "attention.layer_norm_rms_epsilon",
                               "attention.key_length", "rope.dimension_count")]
    assert all(k in r for k in required), [k for k in required if k not in r]
    assert r["tokenizer.ggml.model"].contents() == "none"
    assert r["llama.context_length"].contents() == 128
    assert r["llama.attention.key_length"].contents() == 32


def test_failed_export_leaves_the_old_file_and_no_open_handle(tmp_path, monkeypatch):
    """A failure mid-write (a weight past float16's range, found while writing tensor data)
    leaves an existing --out as it was, no temp file and no open file; a good export is fsynced
    before the rename, as engine.config.atomic_write does."""
    import engine.gguf_export as ge
    writers, events = [], []

    class Spy(gguf.GGUFWriter):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            writers.append(self)

    monkeypatch.setattr(gguf, "GGUFWriter", Spy)
    out = tmp_path / "m.gguf"
    out.write_bytes(b"the previous export")
    model = random_model()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = 1e6  # the last tensors written
    with pytest.raises(ValueError, match="exceeds float16's range"):
        export_gguf(model, None, str(out), "f16")
    assert writers[0].state.name == "WEIGHTS"  # it failed after tensor data had been written
    assert out.read_bytes() == b"the previous export" and os.listdir(tmp_path) == ["m.gguf"]
    assert writers[0].fout is None  # closed (was left open)
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(ge.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd)))
    monkeypatch.setattr(ge.os, "replace",
                        lambda a, b: (events.append("replace"), real_replace(a, b)))
    export_gguf(random_model(), None, str(out), "f16")
    assert events == ["fsync", "replace"] and load_gguf(str(out))[0].config == model.config


def test_named_chat_templates_export_and_read_back(tmp_path):
    """default + tool_use templates: tokenizer.chat_template and tokenizer.chat_template.tool_use
    (listed in tokenizer.chat_templates), as gguf-py writes them for llama.cpp; read back as the
    same named templates. A source GGUF's keys are copied as they are, or all replaced by an
    adapter's own set."""
    from engine.gguf_export import copy_tokenizer_fields
    tok = bpe_tokenizer(tmp_path)
    named = {"default": tok.chat_template,
             "tool_use": "{{ tools | tojson }}{% for m in messages %}{{ m.content }}<|eot_id|>{% endfor %}"}
    tok.chat_templates = named
    path = str(tmp_path / "m.gguf")
    export_gguf(random_model(), tok, path, "f32")
    f = gguf.GGUFReader(path).fields
    assert f["tokenizer.chat_template"].contents() == named["default"]
    assert f["tokenizer.chat_template.tool_use"].contents() == named["tool_use"]
    assert f["tokenizer.chat_templates"].contents() == ["tool_use"]
    back = load_tokenizer(path)
    assert dict(back.chat_templates) == named
    msgs = [{"role": "user", "content": "hi"}]
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert back.apply_chat_template(msgs, tools=tools) == tok.apply_chat_template(msgs, tools=tools)

    def copied(templates):
        out = str(tmp_path / "copy.gguf")
        w = gguf.GGUFWriter(out, "llama")
        copy_tokenizer_fields(w, path, templates)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.close()
        return {k: v.contents() for k, v in gguf.GGUFReader(out).fields.items()
                if k.startswith("tokenizer.")}
    src = {k: v.contents() for k, v in f.items() if k.startswith("tokenizer.")}
    assert copied(back.chat_templates) == copied(None) == src
    own = copied({"default": "{{ messages[0].content }}"})
    assert own["tokenizer.chat_template"] == "{{ messages[0].content }}"
    assert not any(k.startswith("tokenizer.chat_template") and k != "tokenizer.chat_template"
                   for k in own)


def test_no_tokenizer_export_with_an_eos_list_writes_the_first(tmp_path, capsys):
    """A model without tokenizer files whose config has Llama 3's eos list: GGUF holds one eos id,
    so the file gets the first (what the tokenizer path writes as tok.eos_id); no eos, no key.
    (It crashed in struct.pack with a traceback.)"""
    from engine.checkpoint import save_model
    model = random_model(eos_token_id=[1, 5])
    save_model(model, str(tmp_path / "m"))
    out = tmp_path / "m.gguf"
    assert cli(["--model", str(tmp_path / "m"), "--out", str(out), "--type", "f32"]) == 0
    assert "no tokenizer" in capsys.readouterr().out
    back, fields = load_gguf(str(out))
    assert fields["tokenizer.ggml.eos_token_id"] == 1 and back.config.eos_token_id == 1
    assert fields["tokenizer.ggml.bos_token_id"] == 0
    assert (logits(back, [3, 4, 5]) - logits(model, [3, 4, 5])).abs().max() < 1e-5
    export_gguf(random_model(eos_token_id=None, bos_token_id=None), None, str(out), "f32")
    r = gguf.GGUFReader(str(out)).fields
    assert "tokenizer.ggml.eos_token_id" not in r and "tokenizer.ggml.bos_token_id" not in r


def test_byte_level_bpe_without_merges_is_refused_before_writing(tmp_path, capsys):
    """gguf-py silently drops an empty tokenizer.ggml.merges array and llama.cpp (and our loader)
    refuse a "gpt2" file without it: refused in one line, no file and no temp file written."""
    from engine.checkpoint import save_model
    from tokenizer.bpe import ByteLevelBPETokenizer, bytes_to_unicode
    tok = ByteLevelBPETokenizer(sorted(bytes_to_unicode().values()), [], pre_tokenizer="llama-bpe")
    out = tmp_path / "t.gguf"
    with pytest.raises(ValueError, match="without merges has no GGUF form"):
        export_gguf(random_model(), tok, str(out), "f32")
    assert os.listdir(tmp_path) == []
    save_model(random_model(), str(tmp_path / "m"), tok)
    assert cli(["--model", str(tmp_path / "m"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == ("error: a byte-level BPE tokenizer without merges has no GGUF form "
                   "(llama.cpp requires tokenizer.ggml.merges)\n"), err
    assert os.listdir(tmp_path) == ["m"]
