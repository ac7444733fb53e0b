"""Serve a model over an OpenAI-compatible HTTP API (engine/serve*.py does the work).

    python serve.py --model smollm2-135m-instruct                      # http://127.0.0.1:8000
    python serve.py --model out/RUN --adapter chat=out/RUN-lora --port 8001 --api-key secret
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi"}]}'

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with "stream": true),
GET /v1/models, GET /health, GET /metrics (Prometheus). Binds 127.0.0.1 unless --host says
otherwise. SIGINT / SIGTERM: stop accepting, finish in-flight requests (a second signal cancels
them). Bad flags get one line on stderr and exit code 2.

Tool calling: chat requests may send OpenAI `tools` (rendered by the model's chat template; a
template without tool support gets a 400), assistant `tool_calls` and `tool` results. With
tool_choice "auto" (the default when tools are given) Hermes-style <tool_call>{"name": ...,
"arguments": {...}}</tool_call> blocks in the answer (Qwen2.5, Hermes 2 Pro / 3, models tuned
on that format) come back as message.tool_calls with finish_reason "tool_calls", streamed or
not, as vLLM's `--enable-auto-tool-choice --tool-call-parser hermes` does; "none" leaves them
as text; "required" and named functions are refused (no guided decoding). Special tokens the
model generates mid-answer (e.g. <|im_start|>) are left out of the text, as vLLM does; a request
with "skip_special_tokens": false (vLLM's field) gets them.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

from engine.config import DefaultsHelpFormatter, RaisingParser, UsageError
from engine.hub import pick_device_dtype  # generate.py's --device / --dtype rules
from tokenizer import read_chat_template, set_chat_template


def build_parser() -> argparse.ArgumentParser:
    p = RaisingParser(description=__doc__.split("\n\n")[0],
                      epilog=" ".join(__doc__.split("\n\n")[-1].split()),
                      formatter_class=DefaultsHelpFormatter)
    a = p.add_argument
    a("--model", required=True, metavar="NAME|HF_DIR|FILE.gguf",
      help="a named model (e.g. smollm2-135m-instruct), a model directory, a GGUF file "
           "or an adapter run (its base with the adapter applied)")
    a("--served-model-name", metavar="NAME",
      help="the base model's id in the API (default: the --model name or directory name)")
    a("--chat-template", metavar="FILE|JINJA|chatml",
      help="chat template for /v1/chat/completions instead of the model's (a .jinja file, a "
           "tokenizer_config.json, the template itself, or chatml), as vLLM's flag")
    a("--adapter", action="append", default=[], metavar="NAME=DIR",
      help="LoRA adapter (PEFT format) selectable with \"model\": NAME (repeatable)")
    a("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
    a("--port", type=int, default=8000, help="0 picks a free port")
    a("--api-key", default=None,
      help="require 'Authorization: Bearer KEY' (default: $WHETSTONE_API_KEY, else none)")
    a("--max-batch", type=int, default=8, help="sequences generated together (KV cache rows)")
    a("--max-queue", type=int, default=64, help="requests waiting for a row; more get 429")
    a("--max-model-len", type=int, default=None,
      help="cap the context (prompt + max_tokens) below the model's")
    a("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    a("--timeout", type=float, default=30.0,
      help="seconds a client may stall sending its body or reading the response")
    a("--shutdown-grace", type=float, default=30.0,
      help="seconds in-flight requests get to finish on SIGINT / SIGTERM")
    a("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    a("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
      help="weights dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    a("--quiet", action="store_true", help="no startup / shutdown lines on stderr")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from engine.hub import adapter_base, load_model
    from engine.serve import Engine, Limits, parse_adapter_specs, run

    for flag, v in (("--max-batch", args.max_batch), ("--max-body-bytes", args.max_body_bytes)):
        if v < 1:
            raise UsageError(f"{flag} must be >= 1, got {v}")
    if args.max_queue < 0 or not 0 <= args.port <= 65535:
        raise UsageError("--max-queue must be >= 0 and --port in [0, 65535]")
    if args.timeout <= 0 or args.shutdown_grace < 0:
        raise UsageError("--timeout must be > 0 and --shutdown-grace >= 0")
    if args.max_model_len is not None and args.max_model_len < 2:
        raise UsageError(f"--max-model-len must be >= 2, got {args.max_model_len}")
    adapters = parse_adapter_specs(args.adapter)
    for name, d in adapters.items():
        if not os.path.isdir(d):
            raise UsageError(f"--adapter {name}={d}: no such directory")
    base = adapter_base(args.model) if adapters and os.path.isdir(args.model) else None
    if base is not None:  # it would load as base + adapter, with no room for more adapters
        raise UsageError(f"--model {args.model} is an adapter (of {base}); with --adapter, give "
                         f"the base as --model and this one as --adapter NAME={args.model}")
    template = read_chat_template(args.chat_template) if args.chat_template else None
    device, dtype = pick_device_dtype(args.device, args.dtype)
    try:
        model, tok = load_model(args.model, dtype=dtype, device=device)
    except RuntimeError as e:  # e.g. a device this torch build lacks
        raise UsageError(f"cannot load {args.model} on {device}: "
                         f"{str(e).strip().splitlines()[0]}") from None
    if template is not None:
        set_chat_template(tok, template)
    elif not tok.chat_templates:
        print(f"note: {args.model} has no chat template; /v1/chat/completions uses ChatML "
              "(--chat-template sets one)", file=sys.stderr)
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    engine = Engine(model, tok, name, adapters, max_batch=args.max_batch,
                    max_queue=args.max_queue, max_model_len=args.max_model_len,
                    chat_template=template)
    limits = Limits(max_body=args.max_body_bytes, body_timeout=args.timeout,
                    write_timeout=args.timeout)
    api_key = args.api_key or os.environ.get("WHETSTONE_API_KEY") or None
    run(engine, args.host, args.port, api_key, limits, args.shutdown_grace, args.quiet)
    return 0


def cli(argv: list[str] | None = None) -> int:
    try:
        return main(argv)
    except (UsageError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before the server's own signal handlers (loading the model)
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    warnings.formatwarning = lambda msg, *a, **k: f"warning: {msg}\n"
    sys.exit(cli())
