"""GGUF export: a model (a checkpoint, an HF directory, a GGUF file or a demo-model name, with an
optional LoRA adapter merged in) -> one .gguf file for llama.cpp, ollama or LM Studio.

    python -m engine.gguf_export --model out/RUN --out run.gguf                        # f16
    python -m engine.gguf_export --model smollm2-135m-instruct --adapter out/RUN \\
        --type q8_0 --out tuned.gguf

Follows llama.cpp's convert_hf_to_gguf.py (shared/FORMATS.md section 4): the `llama`
architecture for Llama and Mistral, whose q and k rows are permuted to GGUF's interleaved RoPE
pairs; `qwen2` for models with q/k/v bias, unpermuted. Norms and biases stay F32; in a q8_0
file a weight whose rows don't split into 32-value blocks stays F16, as llama.cpp does; Llama 3
RoPE scaling is written as the `rope_freqs` per-frequency divisors. llama.cpp has no sliding
window (a Mistral window shorter than the context gets a warning: the file attends to every
earlier token, as convert_hf_to_gguf.py's Mistral files do) and its qwen2 ignores `rope_freqs`
(llama3 scaling with q/k/v bias is refused: the file would give other logits). Tokenizer metadata is copied key by key from a GGUF source (the chat template replaced
by an adapter's own); otherwise it is built from the tokenizer: byte-level BPE ->
"gpt2" with llama.cpp's pre-tokenizer name (found by splitting a probe text both ways),
SentencePiece -> "llama" with each piece's score and type; llama.cpp wants a token per
embedding row, so rows past the tokenizer's vocab get "[PAD{i}]" tokens of type UNUSED. The file is written beside --out
and renamed into place, so an interrupted export leaves nothing half-written.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile

import numpy as np
import torch

Q_TYPES = ("f32", "f16", "bf16", "q8_0")  # what --type takes
# Splits differently under every pre-tokenizer llama.cpp knows: contractions, digit runs,
# punctuation runs, whitespace runs, newlines, non-Latin scripts, emoji.
PRE_PROBE = ("Hello World!! I've 'll 'LL 3 33 333 3333 1234567 ...  \t\n\n\n  x \r\n"
             " ~~~ $+<=>^ 日本語テキスト 🚀🦙 don't  Ünïcödé αβγ -- 10,000.5 a\u00a0b")


def _gguf():
    import gguf  # imported here: only an export needs the writer
    return gguf


# ---------------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------------
def gguf_arch(config) -> str:
    """llama.cpp architecture: q/k/v bias is Qwen2's; Llama and Mistral are both `llama`."""
    if config.attention_bias and config.sliding_window:
        raise ValueError("llama.cpp has no architecture with both q/k/v bias and a sliding window")
    return "qwen2" if config.attention_bias else "llama"


def gguf_tensor_names(config) -> dict[str, str]:
    """HF name -> GGUF name for every tensor of this config (engine.gguf.hf_name inverted)."""
    from engine.gguf import _GLOBAL_NAMES, _LAYER_NAMES
    out = {f"{hf}.weight": f"{g}.weight" for g, hf in _GLOBAL_NAMES.items()}
    for i in range(config.num_hidden_layers):
        for g, hf in _LAYER_NAMES.items():
            for kind in ("weight", "bias"):
                out[f"model.layers.{i}.{hf}.{kind}"] = f"blk.{i}.{g}.{kind}"
    return out


def target_type(shape: tuple, kind: str):
    """The GGML type a tensor of this shape gets in a --type `kind` file: 1-D tensors (norms,
    biases) stay F32; a q8_0 weight whose rows are not whole 32-value blocks becomes F16."""
    gguf = _gguf()
    Q = gguf.GGMLQuantizationType
    qtype = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[kind]
    if len(shape) == 1:
        return Q.F32
    if qtype == Q.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0]:
        return Q.F16
    return qtype


def encode_tensor(arr: np.ndarray, qtype) -> np.ndarray:
    """A float32 array as the bytes (or float16 / float32 values) of GGML type `qtype`."""
    gguf = _gguf()
    Q = gguf.GGMLQuantizationType
    if qtype == Q.F32:
        return arr
    if qtype == Q.F16:
        if np.abs(arr).max(initial=0.0) > np.finfo(np.float16).max:
            raise ValueError("a weight exceeds float16's range; export with --type bf16 or f32")
        return arr.astype(np.float16)
    return gguf.quants.quantize(arr, qtype)


def export_tensors(model, kind: str) -> list[tuple]:
    """(GGUF name, shape, GGML type, make) for every weight of a merged (plain) Transformer;
    make() gives the float32 array as GGUF lays it out. Converted one at a time while writing,
    so an export needs the model plus one tensor, not a second copy of the model."""
    from engine.checkpoint import model_state_dict
    from engine.gguf import permute_qk
    from engine.model import rope_inv_freq
    cfg = model.config
    arch, names = gguf_arch(cfg), gguf_tensor_names(cfg)

    def make(name, t):
        t = t.detach().float().cpu()
        if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            t = permute_qk(t, cfg.num_attention_heads)
        elif arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            t = permute_qk(t, cfg.num_key_value_heads)
        return t.numpy()

    plan = []
    for name, t in model_state_dict(model).items():
        if name not in names:
            raise ValueError(f"cannot export tensor {name!r}: merge adapters and quantized "
                             "layers into plain weights first")
        shape = tuple(t.shape)
        plan.append((names[name], shape, target_type(shape, kind),
                     lambda name=name, t=t: make(name, t)))
    rs = cfg.rope_scaling or {}
    if rs.get("rope_type", rs.get("type")) == "llama3":  # per-frequency divisors, (head_dim/2,)
        factors = (rope_inv_freq(dataclasses.replace(cfg, rope_scaling=None))
                   / rope_inv_freq(cfg)).numpy()
        plan.append(("rope_freqs.weight", factors.shape, target_type(factors.shape, kind),
                     lambda: factors))
    return plan


def write_model_metadata(w, config, kind: str, name: str) -> None:
    """general.* and {arch}.* keys as convert_hf_to_gguf.py writes them."""
    gguf = _gguf()
    w.add_name(name)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind])
    if kind == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    c = config
    w.add_vocab_size(c.vocab_size)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    w.add_rope_dimension_count(c.head_dim)
    if c.head_dim != c.hidden_size // c.num_attention_heads:
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
    rs = c.rope_scaling or {}
    rope_type = rs.get("rope_type", rs.get("type"))
    if rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rs["factor"]))
    elif rope_type == "llama3":
        if gguf_arch(c) == "qwen2":  # llama.cpp's qwen2 graph never reads rope_freqs
            raise ValueError("llama3 rope scaling with q/k/v bias (GGUF architecture qwen2) has "
                             "no GGUF form: llama.cpp's qwen2 ignores the rope_freqs tensor")
        if (rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)) != (1.0, 4.0):
            raise ValueError("llama3 rope scaling with low/high frequency factors other than "
                             "1 and 4 has no GGUF form that loads back the same")
        w.add_rope_scaling_orig_ctx_len(int(rs.get("original_max_position_embeddings", 8192)))
    elif rope_type not in (None, "default"):
        raise ValueError(f"rope scaling {rope_type!r} has no GGUF export here (linear, llama3)")


# ---------------------------------------------------------------------------------------------
# Tokenizer metadata
# ---------------------------------------------------------------------------------------------
def add_chat_templates(w, templates) -> None:
    """A tokenizer's chat templates {name: template}: "default" as tokenizer.chat_template, the
    others as tokenizer.chat_template.NAME listed in tokenizer.chat_templates (gguf-py's
    add_chat_template of a named list, what llama.cpp reads)."""
    from tokenizer.base import chat_template_value
    if templates:
        w.add_chat_template(chat_template_value(templates))


def _is_chat_template_key(key: str) -> bool:
    return key in ("tokenizer.chat_template", "tokenizer.chat_templates") or key.startswith(
        "tokenizer.chat_template.")


def copy_tokenizer_fields(w, path: str, chat_templates=None) -> None:
    """Every tokenizer.* key of a GGUF file, with its exact value type; `chat_templates`
    {name: template} (an adapter's own, which load_model put on the tokenizer), if any and not
    the file's, replace all of the file's."""
    from tokenizer.base import gguf_chat_templates
    gguf = _gguf()
    fields = gguf.GGUFReader(path).fields
    file_templates = gguf_chat_templates({k: f.contents() for k, f in fields.items()
                                          if _is_chat_template_key(k)})
    replace = bool(chat_templates) and dict(chat_templates) != file_templates
    for key, field in fields.items():
        if not key.startswith("tokenizer.") or (replace and _is_chat_template_key(key)):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, field.contents(), vtype, sub_type=sub)
    if replace:
        add_chat_templates(w, chat_templates)


def pre_tokenizer_name(tok) -> str:
    """llama.cpp's name for this byte-level BPE pre-tokenizer: the known one that splits a probe
    text into the same pieces (convert_hf_to_gguf.py hashes a probe's tokens the same way)."""
    from tokenizer.bpe import PRE_TOKENIZERS, PreTokenizer
    want = tok.pre_tokenizer(PRE_PROBE)
    for name in PRE_TOKENIZERS:
        if PreTokenizer(name)(PRE_PROBE) == want:
            return name
    raise ValueError("this tokenizer's pre-tokenizer matches none that llama.cpp knows "
                     f"({', '.join(PRE_TOKENIZERS)}); it cannot be exported to GGUF")


def check_tokenizer(tok) -> None:
    """Refuse, before a file is created, a tokenizer that has no GGUF form llama.cpp loads."""
    from tokenizer.bpe import ByteLevelBPETokenizer
    from tokenizer.spm import SentencePieceTokenizer
    if not isinstance(tok, (ByteLevelBPETokenizer, SentencePieceTokenizer)):
        raise ValueError(f"no GGUF form for a {type(tok).__name__}")
    if isinstance(tok, ByteLevelBPETokenizer):
        if not tok.merges:  # gguf-py drops an empty array; llama.cpp then refuses the file
            raise ValueError("a byte-level BPE tokenizer without merges has no GGUF form "
                             "(llama.cpp requires tokenizer.ggml.merges)")
        pre_tokenizer_name(tok)


def write_tokenizer_metadata(w, tok, n_rows: int) -> None:
    """tokenizer.ggml.* keys built from one of our tokenizers, checked by check_tokenizer (what
    tokenizer/ reads back).
    llama.cpp wants a token per embedding row: ids without a token (a gap, or rows past the
    tokenizer's vocab) become "[PAD{i}]" of type UNUSED, as convert_hf_to_gguf.py writes them."""
    from tokenizer.bpe import ByteLevelBPETokenizer
    from tokenizer.spm import spm_piece_types
    n = n_rows
    if isinstance(tok, ByteLevelBPETokenizer):
        kinds = {t["id"]: 3 if t["special"] else 4 for t in tok.added_tokens}
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre_tokenizer_name(tok))
        w.add_token_list([tok.id_to_tok.get(i, f"[PAD{i}]") for i in range(n)])
        w.add_token_types([kinds.get(i, 1) if i in tok.id_to_tok else 5 for i in range(n)])
        w.add_token_merges([f"{a} {b}" for a, b in tok.merges])
    else:  # a SentencePieceTokenizer: check_tokenizer refused the rest
        # As convert_hf_to_gguf.py's _set_vocab_sentencepiece: the model's pieces, then HF's
        # added tokens over them (score -1000, CONTROL if special, else USER_DEFINED), ids
        # without a token as "[PAD{i}]" UNUSED. An added token that only reuses a piece of the
        # same text and kind keeps it as is (an <unk> turned CONTROL would leave no unknown).
        sp, n_sp = tok.sp, tok.sp_size
        types, _ = spm_piece_types(tok.model_proto)
        tokens = [sp.id_to_piece(i) for i in range(n_sp)] + [f"[PAD{i}]" for i in range(n_sp, n)]
        scores = [float(sp.get_score(i)) for i in range(n_sp)] + [-10000.0] * (n - n_sp)
        types = types + [5] * (n - n_sp)
        for t in tok.added_tokens:
            i = t["id"]
            kinds = (3, 2) if t["special"] else (4,)
            if i < n_sp and tokens[i] == t["content"] and types[i] in kinds:
                continue
            tokens[i], scores[i], types[i] = t["content"], -1000.0, 3 if t["special"] else 4
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        # the tokenizer's rule, not only the model's flag: add_prefix_space=false in a directory
        # turns the prefix off. (llama.cpp has no Metaspace "first" / "always": those export as
        # the sentencepiece rule, equal except after special tokens and before leading spaces.)
        w.add_add_space_prefix(tok.prefix != "never")
    for key, tid in (("bos", tok.bos_id), ("eos", tok.eos_id), ("unk", tok.unk_id),
                     ("pad", tok.pad_id)):
        if tid is not None:
            getattr(w, f"add_{key}_token_id")(tid)
    w.add_add_bos_token(bool(tok.add_bos))
    w.add_add_eos_token(bool(tok.add_eos))
    add_chat_templates(w, tok.chat_templates)


# ---------------------------------------------------------------------------------------------
# The export
# ---------------------------------------------------------------------------------------------
def export_gguf(model, tok, out: str, kind: str = "f16", name: str = "model",
                tokenizer_from: str | None = None) -> dict:
    """Write `model` (plain weights, no LoRA layers) and `tok` to `out` atomically.
    tokenizer_from: a GGUF file whose tokenizer.* keys are copied instead of built from `tok`.
    Returns {"tensors": n, "bytes": file size, "types": {ggml type: count}}."""
    if kind not in Q_TYPES:
        raise ValueError(f"unknown GGUF type {kind!r}; choose from {', '.join(Q_TYPES)}")
    gguf = _gguf()
    cfg = model.config
    if tok is not None and tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} tokens, the model {cfg.vocab_size} rows")
    gguf_arch(cfg)  # refusals before a file is created
    if tok is not None and tokenizer_from is None:
        check_tokenizer(tok)
    w = cfg.sliding_window
    if w is not None and w < cfg.max_position_embeddings:
        # llama.cpp's llama architecture (which convert_hf_to_gguf.py gives Mistral too) has no
        # window: the same model up to w tokens, every earlier token attended to past them
        print(f"warning: llama.cpp has no sliding window: the GGUF file attends to every earlier "
              f"token, so it gives this model's logits up to {w} tokens and others past them "
              f"(as convert_hf_to_gguf.py's Mistral files do)", file=sys.stderr)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(out)), suffix=".gguf.tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would keep other users (ollama's) out
    types: dict[str, int] = {}
    w = None
    try:
        w = gguf.GGUFWriter(tmp, gguf_arch(cfg))
        write_model_metadata(w, cfg, kind, name)
        if tokenizer_from is not None:
            copy_tokenizer_fields(w, tokenizer_from, tok.chat_templates if tok is not None else None)
        elif tok is not None:
            write_tokenizer_metadata(w, tok, cfg.vocab_size)
        else:  # llama.cpp requires tokenizer.ggml.model: "none" loads as a model without vocab
            w.add_tokenizer_model("none")
            # kept for our loader's config (llama.cpp ignores them). GGUF has one eos id: the
            # first of a list (Llama 3's [eos, eot, ...]), as the tokenizer path writes tok.eos_id
            if cfg.bos_token_id is not None:
                w.add_bos_token_id(cfg.bos_token_id)
            if cfg.eos_ids:
                w.add_eos_token_id(cfg.eos_ids[0])
        plan = export_tensors(model, kind)
        for gname, shape, qtype, _ in plan:
            nbytes = int(np.prod(gguf.quant_shape_to_byte_shape(shape, qtype)))
            w.add_tensor_info(gname, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
            types[qtype.name] = types.get(qtype.name, 0) + 1
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for _, _, qtype, make in plan:
            w.write_tensor_data(encode_tensor(make(), qtype))
        w.flush()
        for f in w.fout:  # on disk before the rename, as engine.config.atomic_write
            os.fsync(f.fileno())
        w.close()
        os.replace(tmp, out)
    finally:
        if w is not None:
            w.close()  # a failed export's file handle (no-op after a good one)
        if os.path.exists(tmp):
            os.remove(tmp)
    return {"tensors": sum(types.values()), "bytes": os.path.getsize(out), "types": types}


def build_parser() -> argparse.ArgumentParser:
    from engine.config import OneLineParser
    from engine.config import DefaultsHelpFormatter
    p = OneLineParser(prog="python -m engine.gguf_export", description=__doc__.split("\n\n")[0],
                      formatter_class=DefaultsHelpFormatter)
    p.add_argument("--model", required=True, metavar="NAME|DIR|FILE.gguf",
                   help="a demo-model name, an HF / checkpoint directory or a GGUF file")
    p.add_argument("--adapter", metavar="DIR", help="LoRA / DoRA adapter to merge in first")
    p.add_argument("--out", required=True, metavar="FILE.gguf")
    p.add_argument("--type", default="f16", choices=Q_TYPES, help="weights type")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype the model is loaded (and an adapter merged) in: bfloat16 halves "
                        "the memory an export needs")
    p.add_argument("--name", default=None, help="general.name (default: the output file's name)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if os.path.isdir(args.out):  # checked before the (slow) model load
        raise ValueError(f"--out {args.out} is a directory; give a FILE.gguf path")
    if os.path.exists(args.out) and not args.force:
        raise ValueError(f"{args.out} exists; pass --force to replace it")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        raise ValueError(f"{os.path.dirname(args.out)}: no such directory for --out")
    from engine.hub import load_model, resolve
    from engine.lora import merge_lora
    model, tok = load_model(args.model, dtype=getattr(torch, args.dtype), adapter=args.adapter)
    merge_lora(model)
    kind, path = resolve(args.model)
    name = args.name or os.path.splitext(os.path.basename(args.out))[0]
    info = export_gguf(model, tok, args.out, args.type, name,
                       tokenizer_from=path if kind == "gguf" else None)
    types = ", ".join(f"{n} {t}" for t, n in sorted(info["types"].items()))
    print(f"wrote {args.out}: {info['tensors']} tensors ({types}), "
          f"{info['bytes'] / 2**20:.1f} MiB" + ("" if tok is not None else "; no tokenizer"))
    return 0


def cli(argv=None) -> int:
    """main() with bad input and load failures as one line on stderr and exit code 2."""
    from engine.config import run_cli
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
