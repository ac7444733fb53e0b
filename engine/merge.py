"""Merge a LoRA / DoRA adapter into its base and write a plain HF-format model directory.

    python -m engine.merge --base smollm2-135m-instruct --adapter out/RUN --out merged/
    python -m engine.merge --base M --adapter A1 --adapter A2 --weights 0.7 0.3 --method cat --out merged/

W' = W + scaling * B @ A (DoRA: rescaled rows), per shared/FORMATS.md section 2. With several
adapters they are first combined (engine.lora.combine_adapters: cat, linear or svd). The base
is loaded in full precision (fp32), also for a QLoRA adapter: as PEFT's merge_and_unload on an
unquantized base, its update goes into the original weights, not into the NF4 ones it was
trained against, so the merged model equals base + adapter (`load_model(base, adapter=...)`)
and differs from the QLoRA training model by the base's 4-bit quantization error. The base
directory's generation_config.json is kept (as HF's save_pretrained keeps it): its eos_token_id
list (Llama 3: <|eot_id|>) ends generation; a GGUF base's end-of-turn ids are written into one.
A chat template saved beside the adapter (train.py --chat-template) replaces the base's, as
`load_model(base, adapter=...)` does. A new --out is written whole in a hidden folder beside it
and renamed into place, so an interrupted merge leaves no half-written model.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

import torch


def adapter_chat_templates(adapters: list[str]) -> dict[str, str] | None:
    """The chat templates {name: template} saved beside the adapter(s) (None: keep the
    base's); adapters that carry different ones are refused rather than one picked at random."""
    from tokenizer.base import read_tokenizer_config
    found = {a: t for a in adapters if (t := read_tokenizer_config(a)["chat_templates"])}
    if len({json.dumps(t, sort_keys=True) for t in found.values()}) > 1:
        raise ValueError("the adapters carry different chat templates ("
                         + ", ".join(found) + "); merge them separately")
    return next(iter(found.values()), None)


def write_merged(model, tok, out: str, generation_config: bytes | None) -> None:
    """The merged model (config.json, safetensors, tokenizer files, generation_config.json) into
    `out`. A new or empty `out` is built whole in a hidden sibling folder, then renamed into
    place; in a non-empty one (a model replaced with --force) save_model replaces file by file."""
    from engine.checkpoint import save_model
    from engine.config import atomic_write_bytes
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    fresh = not os.path.isdir(out) or not os.listdir(out)
    target = tempfile.mkdtemp(prefix=".merge-", dir=parent) if fresh else out
    try:
        if fresh:  # mkdtemp's 0700 would keep other users out of the final directory
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(target, 0o777 & ~umask)
        save_model(model, target, tok)
        gen = os.path.join(target, "generation_config.json")
        if generation_config is not None:
            atomic_write_bytes(gen, generation_config)
        elif os.path.exists(gen):  # a replaced model's stop ids are not this one's
            os.remove(gen)
        if fresh:
            if os.path.isdir(out):
                os.rmdir(out)
            os.rename(target, out)
    finally:
        if fresh and os.path.isdir(target):
            shutil.rmtree(target, ignore_errors=True)


def build_parser() -> argparse.ArgumentParser:
    from engine.config import OneLineParser
    p = OneLineParser(prog="python -m engine.merge", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="model name, HF directory or .gguf file")
    p.add_argument("--adapter", action="append", required=True, help="adapter directory (repeatable)")
    p.add_argument("--weights", type=float, nargs="+", help="per-adapter weights (default 1 each)")
    p.add_argument("--method", choices=("cat", "linear", "svd"), default=None,
                   help="how several adapters combine (default cat)")
    p.add_argument("--rank", type=int, default=None, help="svd: rank of the combined adapter")
    p.add_argument("--out", required=True,
                   help="output directory (must not hold a model yet, unless --force)")
    p.add_argument("--force", action="store_true",
                   help="replace the model an existing --out holds (its other files stay)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.rank is not None and (args.method != "svd" or args.rank < 1):
        p.error(f"--rank {args.rank}: needs --method svd and a rank >= 1")
    if args.weights and len(args.adapter) != len(args.weights):
        p.error(f"{len(args.adapter)} adapter(s) but {len(args.weights)} --weights")
    from engine.checkpoint import parse_dtype
    try:  # checked now, not after loading and merging
        dtype = parse_dtype(args.dtype)
    except ValueError as e:
        p.error(f"--dtype: {e}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} is a file, not a directory")
    if os.path.isfile(os.path.join(args.out, "adapter_config.json")):
        # the merged tokenizer files would replace the adapter's (its chat template)
        raise ValueError(f"{args.out} holds an adapter; pick another --out")
    if os.path.isfile(os.path.join(args.out, "config.json")) and not args.force:
        raise ValueError(f"{args.out} already holds a model; pick another --out "
                         "(or pass --force to replace it)")
    from engine.hub import derived_generation_config, load_model
    from engine.lora import Adapter, combine_adapters, load_adapter, merge_lora
    templates = adapter_chat_templates(args.adapter)
    model, tok = load_model(args.base, dtype=torch.float32)
    how = ""
    if len(args.adapter) == 1 and not args.weights and not args.method:
        load_adapter(model, args.adapter[0])
    else:  # a single adapter too, when --weights scales it or --method svd --rank truncates it
        weights = args.weights or [1.0] * len(args.adapter)
        combined = combine_adapters([Adapter.load(a) for a in args.adapter], weights,
                                    method=args.method or "cat", rank=args.rank)
        load_adapter(model, combined)
        how = f" ({args.method or 'cat'}, rank {combined.rank_alpha()[0]})"  # svd's default too
    if templates and tok is not None:
        tok.chat_templates = templates
    merge_lora(model)
    model.to(dtype)
    # stop ids beyond config.json's eos, where the base (and base + adapter) stops
    write_merged(model, tok, args.out, derived_generation_config(args.base, tok, model.config))
    print(f"merged {', '.join(args.adapter)}{how} into {args.base} -> {args.out}")
    return 0


if __name__ == "__main__":
    from engine.config import run_cli
    sys.exit(run_cli(main))
