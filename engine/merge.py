"""Merge a LoRA / DoRA adapter into its base and write a plain HF-format model directory.

    python -m engine.merge --base smollm2-135m-instruct --adapter out/RUN --out merged/
    python -m engine.merge --base M --adapter A1 --adapter A2 --weights 0.7 0.3 --method cat --out merged/

W' = W + scaling * B @ A (DoRA: rescaled rows), per shared/FORMATS.md section 2. With several
adapters they are first combined (engine.lora.combine_adapters: cat, linear or svd). The base
directory's generation_config.json is kept (as HF's save_pretrained keeps it): its eos_token_id
list (Llama 3: <|eot_id|>) ends generation; a GGUF base's end-of-turn ids are written into one.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch


def main(argv=None) -> int:
    from engine.config import OneLineParser
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="model name, HF directory or .gguf file")
    p.add_argument("--adapter", action="append", required=True, help="adapter directory (repeatable)")
    p.add_argument("--weights", type=float, nargs="+", help="per-adapter weights (default 1 each)")
    p.add_argument("--method", choices=("cat", "linear", "svd"), default=None,
                   help="how several adapters combine (default cat)")
    p.add_argument("--rank", type=int, default=None, help="svd: rank of the combined adapter")
    p.add_argument("--out", required=True, help="output directory (must not hold a model yet)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    args = p.parse_args(argv)
    if args.rank is not None and (args.method != "svd" or args.rank < 1):
        p.error(f"--rank {args.rank}: needs --method svd and a rank >= 1")
    if args.weights and len(args.weights) != len(args.adapter):
        p.error(f"{len(args.adapter)} adapter(s) but {len(args.weights)} --weights")
    from engine.checkpoint import parse_dtype, save_model
    try:  # checked now, not after loading and merging
        dtype = parse_dtype(args.dtype)
    except ValueError as e:
        p.error(f"--dtype: {e}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} is a file, not a directory")
    if os.path.isfile(os.path.join(args.out, "config.json")):
        raise ValueError(f"{args.out} already holds a model; pick another --out")
    from engine.config import atomic_write_bytes, atomic_write_text
    from engine.hub import load_model, resolve
    from engine.lora import Adapter, combine_adapters, load_adapter, merge_lora
    model, tok = load_model(args.base, dtype=torch.float32)
    if len(args.adapter) == 1 and not args.weights and not args.method:
        load_adapter(model, args.adapter[0])
    else:  # a single adapter too, when --weights scales it or --method svd --rank truncates it
        weights = args.weights or [1.0] * len(args.adapter)
        load_adapter(model, combine_adapters([Adapter.load(a) for a in args.adapter], weights,
                                             method=args.method or "cat", rank=args.rank))
    merge_lora(model)
    model.to(dtype)
    save_model(model, args.out, tok)
    # Stop ids beyond config.json's eos: without them the merged model would run past the end
    # of its answers where the base (and base + adapter) stops.
    kind, path = resolve(args.base)
    gen_cfg = os.path.join(path, "generation_config.json")
    if kind == "hf" and os.path.isfile(gen_cfg):
        with open(gen_cfg, "rb") as f:
            atomic_write_bytes(os.path.join(args.out, "generation_config.json"), f.read())
    elif tok is not None and set(tok.extra_stop_ids) - set(model.config.eos_ids):
        eos = sorted(set(tok.extra_stop_ids) | set(model.config.eos_ids))
        atomic_write_text(os.path.join(args.out, "generation_config.json"),
                          json.dumps({"eos_token_id": eos}, indent=2) + "\n")
    print(f"merged {', '.join(args.adapter)} into {args.base} -> {args.out}")
    return 0


if __name__ == "__main__":
    from engine.config import run_cli
    sys.exit(run_cli(main))
