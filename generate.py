"""Generate text from a Whetstone checkpoint, a Hugging Face directory or a GGUF file.

    python generate.py --top-k 40                       # sample from the newest run under ./out
    python generate.py --checkpoint out/RUN --prompt "ROMEO:" --temperature 0.8 --seed 1
    python generate.py --model smollm2-135m-instruct --chat "What is the capital of France?" --temperature 0
    python generate.py --model smollm2-135m-instruct --interactive    # multi-turn chat, /exit ends

Laid out like gpt-fast's generate.py: load (meta device + mmap), prefill, decode token by token
with a preallocated KV cache (engine/generation.py), stream the text to stdout (whole UTF-8
characters only), report tokens/s to stderr. Bad input gets one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
import warnings

import torch

from engine.config import DefaultsHelpFormatter, RaisingParser, UsageError
from engine.generation import beam_search, check_sampling_args, generate
from engine.hub import adapter_base, pick_device_dtype
from tokenizer import read_chat_template, set_chat_template

CHECKPOINT_ROOT = "out"  # where train.py writes its run directories


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def unescape(text: str) -> str:
    """\\n, \\t, \\r and \\\\ in a command-line value become newline, tab, CR and a backslash (the
    shell passes "\\n\\n" as four characters); any other backslash stays as typed. Not Python's
    unicode_escape, which would also mangle non-ASCII text."""
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(0)), text, flags=re.S)


def build_parser() -> argparse.ArgumentParser:
    p = RaisingParser(description=__doc__.split("\n\n")[0],
                      formatter_class=DefaultsHelpFormatter)
    a = p.add_argument
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", metavar="DIR",
                     help=f"model directory (default: the newest run under ./{CHECKPOINT_ROOT})")
    src.add_argument("--model", metavar="NAME|HF_DIR|FILE.gguf",
                     help="a named model (smollm2-135m-instruct), an HF directory, a GGUF file, "
                          "or an adapter run (its base with the adapter applied)")
    a("--adapter", metavar="DIR", help="LoRA adapter directory to apply (PEFT format)")
    a("--prompt", default="", help="text to continue (empty: start from BOS)")
    a("--chat", metavar="MESSAGE", help="one chat turn through the model's chat template")
    a("--interactive", action="store_true", help="multi-turn chat in the terminal")
    a("--system", help="system message for --chat / --interactive")
    a("--chat-template", metavar="FILE|JINJA|chatml",
      help="use this chat template instead of the model's (a .jinja file, a tokenizer_config.json, "
           "the template itself, or chatml)")
    a("--max-new-tokens", type=int, default=200,
      help="capped, with a warning, where the prompt + this passes the model's context")
    a("--temperature", type=float, default=1.0, help="0 = greedy")
    a("--top-k", type=int, default=None)
    a("--top-p", type=float, default=None)
    a("--min-p", type=float, default=None,
      help="drop tokens less likely than this times the top token (e.g. 0.05)")
    a("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1 = off)")
    a("--seed", type=int, default=None,
      help="same seed, same text; 0 to 2**64-1 (default: random, printed)")
    a("--num-samples", type=int, default=1)
    a("--beams", type=int, default=1,
      help="beam search with N beams (1 = sampling / greedy); it applies --repetition-penalty, "
           "not --temperature / --top-k / --top-p / --min-p")
    a("--length-penalty", type=float, default=1.0, help="beam score = logprob / len**this")
    a("--stop", action="append", default=[], metavar="STRING", type=unescape,
      help="stop when this text appears (repeatable); it is trimmed from the output. \\n, \\t, "
           "\\r and \\\\ are escapes: --stop '\\n\\n' stops at a blank line")
    a("--keep-special-tokens", action="store_true",
      help="print the special tokens the model emits (e.g. <|im_start|>); hidden by default")
    a("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    a("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
      help="weights dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    a("--quiet", action="store_true", help="no speed report on stderr")
    return p


def validate(args) -> None:
    try:
        check_sampling_args(args.temperature, args.top_k, args.top_p, args.repetition_penalty,
                            args.min_p)
    except ValueError as e:
        raise UsageError(str(e).replace("top_k", "--top-k").replace("top_p", "--top-p")
                         .replace("min_p", "--min-p")
                         .replace("repetition_penalty", "--repetition-penalty")
                         .replace("temperature", "--temperature")) from None
    if not math.isfinite(args.length_penalty):
        raise UsageError(f"--length-penalty must be a finite number, got {args.length_penalty}")
    if args.seed is not None and not 0 <= args.seed < 2**64:
        raise UsageError(f"--seed must be between 0 and 2**64-1, got {args.seed}")
    for flag, value in (("--max-new-tokens", args.max_new_tokens),
                        ("--num-samples", args.num_samples), ("--beams", args.beams)):
        if value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    if args.chat is not None and args.interactive:
        raise UsageError("use either --chat or --interactive, not both")
    if args.beams > 1 and args.num_samples > 1:
        raise UsageError("--beams and --num-samples cannot be combined")
    if args.beams > 1 and args.interactive:
        raise UsageError("--interactive streams its answers; it does not support --beams")
    if args.interactive and args.num_samples > 1:
        raise UsageError("--interactive does not support --num-samples")
    if args.prompt and (args.chat is not None or args.interactive):
        raise UsageError("--prompt cannot be combined with --chat or --interactive")
    if args.system is not None and args.chat is None and not args.interactive:
        raise UsageError("--system needs --chat or --interactive (a plain --prompt has no "
                         "chat template to put it in)")
    if args.chat_template is not None:
        if args.chat is None and not args.interactive:
            raise UsageError("--chat-template needs --chat or --interactive")
        args.chat_template = read_chat_template(args.chat_template)  # before the model loads


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def latest_checkpoint(root: str = CHECKPOINT_ROOT) -> str:
    """Newest run under `root` (or `root` itself): a model directory (config.json + weights) or
    an adapter run (LoRA / DoRA / QLoRA: adapter_config.json + adapter_model.safetensors)."""
    def weights(d):  # the run's weights file, or None if `d` is neither kind
        for cfg, w in (("config.json", "model.safetensors"),
                       ("config.json", "model.safetensors.index.json"),
                       ("adapter_config.json", "adapter_model.safetensors")):
            if all(os.path.isfile(os.path.join(d, f)) for f in (cfg, w)):
                return os.path.join(d, w)
        return None

    if not os.path.isdir(root):
        raise FileNotFoundError(f"no checkpoint: ./{root} does not exist (train one with "
                                "`python train.py`, or pass --checkpoint DIR / --model NAME)")
    dirs = [os.path.join(root, d) for d in os.listdir(root)] + [root]
    found = {d: w for d in dirs if os.path.isdir(d) and (w := weights(d))}
    if not found:
        raise FileNotFoundError(f"no checkpoint under ./{root} (a model or adapter directory); "
                                "pass --checkpoint DIR or --model NAME")
    return max(found, key=lambda d: os.path.getmtime(found[d]))


def load(source: str, dtype: torch.dtype, device: str, adapter: str | None):
    """(model, tokenizer) through engine.load_model: a demo-model name, an HF / checkpoint
    directory, an adapter run (its base with it applied) or a GGUF file, with an optional LoRA
    adapter."""
    from engine import load_model
    model, tok = load_model(source, dtype=dtype, device=device, adapter=adapter)
    if tok is None:
        raise UsageError(f"{source} has no tokenizer files (tokenizer.json or tokenizer.model)")
    return model, tok


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------
def make_generator(seed: int | None, device: str, quiet: bool) -> torch.Generator:
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
        if not quiet:  # so that a sample worth keeping can be reproduced
            print(f"seed: {seed}", file=sys.stderr)
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(seed)
    return g


def out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run_once(model, tok, prompt_ids, stop_ids, args, gen, echo: str = "") -> list[str]:
    """Generate for one prompt; stream when there is a single sequence. Returns the texts."""
    if args.beams > 1:
        res = beam_search(model, prompt_ids, args.beams, args.max_new_tokens, args.length_penalty,
                          stop_ids, stop_strings=args.stop, tokenizer=tok,
                          repetition_penalty=args.repetition_penalty,
                          skip_special_tokens=not args.keep_special_tokens)
        out(echo + res.texts[0] + "\n")
        texts = res.texts[:1]
    else:
        single = args.num_samples == 1
        if single:
            out(echo)
        res = generate(model, prompt_ids, args.max_new_tokens, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                       repetition_penalty=args.repetition_penalty, stop_ids=stop_ids,
                       stop_strings=args.stop, generator=gen, num_samples=args.num_samples,
                       tokenizer=tok, stream=(lambda row, text: out(text)) if single else None,
                       skip_special_tokens=not args.keep_special_tokens)
        if single:  # the text was streamed
            out("\n")
        for i, text in enumerate(res.texts if not single else []):
            out(("-" * 40 + "\n" if i else "") + echo + text + "\n")
        texts = res.texts
    if not args.quiet:
        print(res.stats.summary(), file=sys.stderr, flush=True)
    return texts


def encode_prompt(tok, text: str) -> list[int]:
    """Ids of the prompt with the tokenizer's own BOS rule but never its EOS (add_eos_token
    tokenizers would end the text before the model continues it); an empty prompt starts a
    document (BOS, or EOS as the separator GPT-2-style vocabularies use, or a newline)."""
    ids = tok.encode(text, add_eos=False)
    if not ids:
        start = tok.bos_id if tok.bos_id is not None else tok.eos_id
        ids = [start] if start is not None else tok.encode("\n")
    return ids


def chat_ids(tok, messages: list[dict], budget: int) -> list[int]:
    """Render the conversation; drop the oldest exchanges (never the system message or the last
    user turn) until it fits in `budget` tokens."""
    msgs = list(messages)
    while True:
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        first = 1 if msgs and msgs[0]["role"] == "system" else 0
        if len(ids) <= budget or len(msgs) - first <= 1:
            return ids
        warnings.warn("conversation longer than the context: dropping the oldest turn")
        del msgs[first:first + 2]


def interactive(model, tok, args, gen) -> None:
    messages = [{"role": "system", "content": args.system}] if args.system else []
    # Room kept for the answer, as fit_context keeps it: at most half the context, so that a
    # --max-new-tokens near or past the context does not drop the whole history every turn.
    ctx = model.config.max_position_embeddings
    budget = ctx - min(args.max_new_tokens, ctx // 2)
    print("chat: type a message, /exit or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            user = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return
        if user.strip() in ("/exit", "/quit"):
            return
        if not user.strip():
            continue
        messages.append({"role": "user", "content": user})
        ids = chat_ids(tok, messages, max(budget, 1))
        answer = run_once(model, tok, ids, tok.stop_ids, args, gen)[0]
        messages.append({"role": "assistant", "content": answer.strip()})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    validate(args)
    device, dtype = pick_device_dtype(args.device, args.dtype)
    # `is not None`: an empty --checkpoint "$DIR" (an unset variable) is an error, not the
    # newest run under ./out loaded in its place
    if args.checkpoint is not None and not os.path.isdir(args.checkpoint):
        why = ("is not a directory (a GGUF file goes to --model)"
               if os.path.isfile(args.checkpoint) else "does not exist")
        raise FileNotFoundError(f"checkpoint directory {args.checkpoint!r} {why}")
    if args.model == "":
        raise UsageError("--model is empty: give a model name, an HF directory or a GGUF file")
    source = (args.model if args.model is not None else
              args.checkpoint if args.checkpoint is not None else latest_checkpoint())
    model, tok = load(source, dtype, device, args.adapter)
    if args.chat_template is not None:
        set_chat_template(tok, args.chat_template)
    elif (args.chat is not None or args.interactive) and not tok.chat_templates:
        # transformers refuses here; we fall back, but a model never trained on ChatML's
        # markers (one trained from scratch, say) will not follow them
        print(f"note: {source} has no chat template; using ChatML (--chat-template sets one)",
              file=sys.stderr)
    if not args.quiet:
        base = adapter_base(source) if os.path.isdir(source) else None  # an adapter run
        shown = f"{base} + adapter {source}" if base else source
        print(f"model: {shown}" + (f" + adapter {args.adapter}" if args.adapter else "")
              + f" ({model.num_parameters() / 1e6:.1f}M parameters, {dtype}, {device})",
              file=sys.stderr, flush=True)
    sampling = args.temperature > 0 and args.beams == 1
    gen = make_generator(args.seed, device, args.quiet or not sampling)
    if args.interactive:
        interactive(model, tok, args, gen)
    elif args.chat is not None:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": args.chat})
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        run_once(model, tok, ids, tok.stop_ids, args, gen)
    else:
        run_once(model, tok, encode_prompt(tok, args.prompt), tok.stop_ids, args, gen,
                 echo=args.prompt)
    return 0


def cli(argv: list[str] | None = None) -> int:
    """main() with bad input turned into one line on stderr and exit code 2."""
    try:
        return main(argv)
    except BrokenPipeError:  # e.g. `python generate.py | head`
        return 0
    except (UsageError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    warnings.formatwarning = lambda msg, *a, **k: f"warning: {msg}\n"  # one plain line
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(encoding="utf-8", errors="replace")  # whatever the locale says
    sys.exit(cli())
