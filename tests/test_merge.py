"""python -m engine.merge (engine/merge.py): merged logits equal base + adapter for every adapter
kind and in transformers, the adapter's chat template travels with it, the output directory is
written whole or not at all, and an existing model is replaced only with --force."""
import json
import os

import pytest
import torch

from engine.checkpoint import save_model
from engine.config import ModelConfig
from engine.hub import load_model
from engine.lora import apply_lora, save_adapter
from engine.merge import main as merge_main
from engine.model import Transformer
from tokenizer.bpe import ByteLevelBPETokenizer, bytes_to_unicode

CFG = dict(vocab_size=260, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
BASE_TEMPLATE = "{% for m in messages %}{{ m.content }}<|im_end|>{% endfor %}"


def byte_tokenizer(template=BASE_TEMPLATE) -> ByteLevelBPETokenizer:
    b2u = bytes_to_unicode()
    return ByteLevelBPETokenizer({b2u[b]: b for b in range(256)}, [], pre_tokenizer="gpt-2",
                                 added_tokens=[{"id": 256, "content": "<|im_start|>"},
                                               {"id": 257, "content": "<|im_end|>"}],
                                 eos_id=257, chat_template=template)


def base_and_adapter(tmp_path, quantize=None, **lora):
    """A random base directory (with tokenizer) and an adapter trained-looking on it (B != 0)."""
    torch.manual_seed(0)
    save_model(Transformer(ModelConfig(**CFG)), str(tmp_path / "base"), byte_tokenizer())
    model, _ = load_model(str(tmp_path / "base"), quantize=quantize)
    apply_lora(model, ["q_proj", "v_proj", "down_proj", "lm_head"], r=4, alpha=8, **lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
            elif "magnitude" in name:
                p.mul_(1 + 0.1 * torch.randn_like(p))
    save_adapter(model, str(tmp_path / "ad"))
    return model


@pytest.mark.parametrize("kind", ["lora", "dora", "rslora", "qlora"])
def test_merged_logits_equal_base_plus_adapter_also_in_transformers(kind, tmp_path):
    """QLoRA: the update goes into the full-precision base (as PEFT's merge_and_unload on an
    unquantized base), so the merged model is fp32 base + adapter, not the NF4 training model."""
    transformers = pytest.importorskip("transformers")
    trained = base_and_adapter(tmp_path, quantize="nf4" if kind == "qlora" else None,
                               dora=kind == "dora", rslora=kind == "rslora")
    assert merge_main(["--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "ad"),
                       "--out", str(tmp_path / "m")]) == 0
    ids = torch.randint(0, 256, (2, 12))
    merged, _ = load_model(str(tmp_path / "m"))
    adapted, _ = load_model(str(tmp_path / "base"), adapter=str(tmp_path / "ad"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "m")).eval()
    with torch.no_grad():
        want = adapted(ids)
        assert (merged(ids) - want).abs().max() < 1e-5
        assert (hf(ids).logits - want).abs().max() < 1e-5
        gap = (trained(ids) - want).abs().max()  # the NF4 base it trained on
    assert (gap > 1e-3) if kind == "qlora" else (gap < 1e-5)


def test_merge_keeps_the_adapters_chat_template(tmp_path):
    """An adapter trained with its own template (train.py --chat-template saves it beside the
    adapter) is used with it by load_model(base, adapter=...); the merged model had the base's."""
    base_and_adapter(tmp_path)
    own = "{% for m in messages %}### {{ m.content }}\n{% endfor %}"
    byte_tokenizer(own).save(str(tmp_path / "ad"))
    assert merge_main(["--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "ad"),
                       "--out", str(tmp_path / "m")]) == 0
    _, with_adapter = load_model(str(tmp_path / "base"), adapter=str(tmp_path / "ad"))
    assert with_adapter.chat_template == own
    assert load_model(str(tmp_path / "m"))[1].chat_template == own
    # a named set (default + tool_use) travels whole: load_model with the adapter and the merge
    named = {"default": own, "tool_use": "{{ tools | length }} tools{{ messages[0].content }}"}
    tok = byte_tokenizer()
    tok.chat_templates = named
    tok.save(str(tmp_path / "ad"))
    assert merge_main(["--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "ad"),
                       "--out", str(tmp_path / "m3")]) == 0
    for _, t in (load_model(str(tmp_path / "base"), adapter=str(tmp_path / "ad")),
                 load_model(str(tmp_path / "m3"))):
        assert dict(t.chat_templates) == named
        assert t.apply_chat_template([{"role": "user", "content": "x"}], tools=[{}]) == "1 toolsx"
    byte_tokenizer(own).save(str(tmp_path / "ad"))
    # two adapters with different templates: refused, not one picked silently
    os.makedirs(tmp_path / "ad2")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (tmp_path / "ad2" / name).write_bytes((tmp_path / "ad" / name).read_bytes())
    byte_tokenizer().save(str(tmp_path / "ad2"))
    with pytest.raises(ValueError, match="different chat templates"):
        merge_main(["--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "ad"),
                    "--adapter", str(tmp_path / "ad2"), "--out", str(tmp_path / "m2")])
    assert not (tmp_path / "m2").exists()


def test_merge_force_over_transformers_template_files(tmp_path):
    """--force over a model transformers 5 saved (chat_template.jinja + additional_chat_templates/
    NAME.jinja): those files would win over the merged model's tokenizer_config.json on loading,
    here and in transformers, so they go."""
    transformers = pytest.importorskip("transformers")
    base_and_adapter(tmp_path)
    old = byte_tokenizer("OLD {{ messages[0].content }}<|im_end|>")
    old.chat_templates = {"default": old.chat_template, "tool_use": "OLDTOOLS {{ tools }}"}
    save_model(Transformer(ModelConfig(**CFG)), str(tmp_path / "m"), old)
    transformers.AutoTokenizer.from_pretrained(str(tmp_path / "m")).save_pretrained(
        str(tmp_path / "m"))
    assert (tmp_path / "m" / "additional_chat_templates" / "tool_use.jinja").exists()
    assert merge_main(["--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "ad"),
                       "--out", str(tmp_path / "m"), "--force"]) == 0
    assert load_model(str(tmp_path / "m"))[1].chat_template == BASE_TEMPLATE
    assert transformers.AutoTokenizer.from_pretrained(str(tmp_path / "m")).chat_template == \
        BASE_TEMPLATE
    assert not (tmp_path / "m" / "chat_template.jinja").exists()


def test_interrupted_merge_leaves_no_model(tmp_path, monkeypatch):
    """The base's generation_config.json was written after the model: a failure there left a
    model without its stop ids, which a rerun then refused to replace ('already holds a model')."""
    import engine.config
    base_and_adapter(tmp_path)
    gen = json.dumps({"eos_token_id": [257, 7]})
    (tmp_path / "base" / "generation_config.json").write_text(gen)
    real = engine.config.atomic_write_bytes

    def disk_full(path, data):
        if path.endswith("generation_config.json"):
            raise OSError("No space left on device")
        return real(path, data)

    monkeypatch.setattr(engine.config, "atomic_write_bytes", disk_full)
    args = ["--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "ad"),
            "--out", str(tmp_path / "m")]
    with pytest.raises(OSError, match="No space"):
        merge_main(args)
    assert not (tmp_path / "m").exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no staging folder left
    monkeypatch.setattr(engine.config, "atomic_write_bytes", real)
    assert merge_main(args) == 0
    assert 7 in load_model(str(tmp_path / "m"))[1].stop_ids
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(tmp_path / "m").st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700


def test_existing_model_needs_force_and_an_adapter_directory_is_refused(tmp_path, capsys):
    from engine.config import run_cli
    base_and_adapter(tmp_path)
    base, ad, out = str(tmp_path / "base"), str(tmp_path / "ad"), tmp_path / "m"
    os.makedirs(out)
    (out / "notes.txt").write_text("mine")
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [5]}))
    save_model(Transformer(ModelConfig(**CFG)), str(out))  # an older model in --out
    before = (out / "model.safetensors").read_bytes()
    assert run_cli(merge_main, ["--base", base, "--adapter", ad, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already holds a model" in err and "--force" in err and len(err.splitlines()) == 1
    assert (out / "model.safetensors").read_bytes() == before
    assert merge_main(["--base", base, "--adapter", ad, "--out", str(out), "--force"]) == 0
    assert (out / "model.safetensors").read_bytes() != before
    assert (out / "notes.txt").read_text() == "mine"  # --force replaces the model, not the folder
    assert not (out / "generation_config.json").exists()  # the old model's stop ids went with it
    # the adapter's own directory: the merged tokenizer files would overwrite the adapter's
    files = sorted(os.listdir(ad))
    for flags in ([], ["--force"]):
        assert run_cli(merge_main, ["--base", base, "--adapter", ad, "--out", ad, *flags]) == 2
        assert "holds an adapter" in capsys.readouterr().err
    assert sorted(os.listdir(ad)) == files


def test_done_line_names_the_combination_and_the_rank_used(tmp_path, capsys):
    """--method svd without --rank keeps the largest adapter rank: the done line says which."""
    base_and_adapter(tmp_path)
    base, ad = str(tmp_path / "base"), str(tmp_path / "ad")
    assert merge_main(["--base", base, "--adapter", ad, "--out", str(tmp_path / "m1")]) == 0
    assert f"merged {ad} into {base}" in capsys.readouterr().out
    assert merge_main(["--base", base, "--adapter", ad, "--adapter", ad, "--method", "svd",
                       "--out", str(tmp_path / "m2")]) == 0
    assert f"merged {ad}, {ad} (svd, rank 4) into {base}" in capsys.readouterr().out
