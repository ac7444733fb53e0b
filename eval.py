"""Evaluate a model (and optionally a fine-tuned adapter against its base) on one task.

    python eval.py --model out/RUN --data val.txt --task perplexity --seq-len 256
    python eval.py --model smollm2-135m-instruct --adapter out/lora-RUN --data chat.jsonl \\
        --task response-loss --compare
    python eval.py --model smollm2-135m-instruct --data mc.jsonl --task choice

Tasks (engine/eval.py): perplexity (sliding window over a text; loss, perplexity, bits per
byte; with --stride = --seq-len the same windows and numbers as train.py's validation),
response-loss (instruction / chat JSONL, loss on response tokens only), choice (JSONL
{"context", "choices", "label"}: accuracy and length-normalized accuracy as
lm-evaluation-harness defines them, with their standard errors in the report). --compare
puts the base (adapters disabled) and the tuned model side by side.

A JSON report is written next to the printed table, never over an earlier one: by default
eval-MODEL-TASK-DATA.json (MODEL: the adapter's or the model's name, DATA: the data file's) in
the adapter directory, else in the current directory; when that name is taken, the next free
one of eval-MODEL-TASK-DATA-2.json, -3, ... . An existing --json OUT is refused before the run
unless --force is given. Reports are written whole (temp file, then link or rename).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time

import torch

from engine import eval as tasks
from engine.checkpoint import parse_dtype
from engine.config import OneLineParser, atomic_write_text, run_cli
from tokenizer import read_chat_template, set_chat_template


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", required=True, help="a model name (smollm2-135m-instruct), an HF/Whetstone model "
                                      "directory, a .gguf file, or an adapter directory (its base "
                                      "is read from adapter_config.json)")
    a("--adapter", help="LoRA adapter directory (ours or PEFT's) applied to --model")
    a("--data", required=True, help="text file/corpus (perplexity) or JSONL (response-loss, choice)")
    a("--task", required=True, choices=tasks.TASKS)
    a("--compare", action="store_true", help="also evaluate the base with adapters disabled")
    a("--seq-len", type=int, default=None, help="window (perplexity) or max sample length "
                                                "(default: min(1024, the model's context))")
    a("--stride", type=int, default=None, help="perplexity: tokens between windows (default --seq-len)")
    a("--val-fraction", type=float, default=None,
      help="perplexity: only the last FRACTION of the text, cut as train.py cuts its validation split")
    a("--delimiter", default=None,
      help="choice: text between context and each choice (default ' ')")
    a("--chat-template", metavar="FILE|JINJA|chatml",
      help="response-loss: render the samples with this template instead of the model's")
    a("--batch-size", type=int, default=8)
    a("--json", metavar="OUT", help="report path; refused if it exists, unless --force (default: "
                                    "eval-MODEL-TASK-DATA.json in the adapter directory, else in "
                                    "the current directory, numbered -2, -3, ... when taken)")
    a("--force", action="store_true", help="replace an existing report of the same name")
    a("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    a("--dtype", default="float32", help="float32, bfloat16 or float16")
    a("--threads", type=int, default=None, help="CPU threads for torch")
    a("--no-progress", action="store_true")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The checked flags: the parser's own checks, then those across flags and files."""
    p = build_parser()
    args = p.parse_args(argv)
    for name in ("seq_len", "stride", "batch_size", "threads"):
        v = getattr(args, name)
        if v is not None and v < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.stride and args.seq_len and args.stride > args.seq_len:
        p.error("--stride must be <= --seq-len (a larger stride would skip tokens)")
    if args.compare and not args.adapter and not os.path.isfile(os.path.join(args.model,
                                                                             "adapter_config.json")):
        p.error("--compare needs --adapter DIR (base = the model with that adapter disabled)")
    if args.chat_template is not None:
        if args.task != "response-loss":
            p.error("--chat-template applies to --task response-loss")
        try:
            args.chat_template = read_chat_template(args.chat_template)  # before loading
        except ValueError as e:
            p.error(str(e))
    for flag, value, task in (("--val-fraction", args.val_fraction, "perplexity"),
                              ("--stride", args.stride, "perplexity"),
                              ("--delimiter", args.delimiter, "choice")):
        if value is not None and args.task != task:  # it would be ignored silently
            p.error(f"{flag} applies to --task {task}")
    if args.task == "choice" and args.delimiter is None:
        args.delimiter = " "
    if not os.path.exists(args.data):  # found now, not after loading the model
        p.error(f"--data {args.data}: no such file or directory")
    if args.task != "choice" and tasks.holds_choice_items(args.data):  # else "line 1: no 'text'"
        p.error(f"--data {args.data} holds multiple-choice items (context/choices/label): "
                f"score them with --task choice")
    if args.task == "choice" and args.data.endswith((".jsonl", ".json")):
        from engine.sft import file_form, records_name
        # text / SFT / preference data: "line 1: missing string 'context'" says too little
        form = file_form(args.data)  # None for choice items (unknown keys) or bad lines
        if form is not None:
            use = {"text": "; score them with --task perplexity", "preference": ""}
            name = "text records" if form == "text" else records_name(form)
            p.error(f"--data {args.data} holds {name}: --task choice reads JSONL of "
                    f"{{\"context\", \"choices\", \"label\"}}"
                    + use.get(form, "; score them with --task response-loss"))
    if args.task == "perplexity":  # SFT data read as text: each line "expected ... 'text'"
        from engine.sft import records_not_text, records_name
        found = records_not_text(args.data)
        if found:
            f, form = found
            inner = f != args.data  # a file of a corpus directory
            hint = ("" if form == "preference" else "; score them with --task response-loss"
                    + (" on that file" if inner else ""))
            p.error(f"--data {args.data}" + (f": {f}" if inner else "") + f" holds "
                    f"{records_name(form)}: --task perplexity reads text, or JSONL with a 'text' "
                    f"field{hint}")
    if args.val_fraction is not None and not 0 < args.val_fraction < 1:
        p.error(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    if args.json is not None and os.path.isdir(args.json):  # found now, not after the run
        p.error(f"--json {args.json} is a directory; give the report's file path")
    if args.json is not None and os.path.exists(args.json) and not args.force:  # before the run
        p.error(f"--json {args.json} already exists; pass --force to replace it, or another path")
    try:
        parse_dtype(args.dtype)
    except ValueError as e:
        p.error(f"--dtype: {e}")
    return args


def resolve_model(model: str, adapter: str | None) -> tuple[str, str | None]:
    """An adapter directory given as --model stands for (its base, itself)."""
    from engine.hub import adapter_base
    base = adapter_base(model) if adapter is None and os.path.isdir(model) else None
    return (base, model) if base is not None else (model, adapter)


def _label(path: str) -> str:
    """A file-name-safe short name: the last path component without its extension."""
    name = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "x"


def default_report_path(model: str, adapter: str | None, task: str, data: str) -> str:
    """eval-MODEL-TASK-DATA.json in the adapter directory, else in the current directory."""
    name = f"eval-{_label(adapter or model)}-{task}-{_label(data)}.json"
    return os.path.join(adapter or ".", name)


def _claim(tmp: str, target: str) -> None:
    """Give the written temp file the name `target`; FileExistsError if that name is taken."""
    try:
        os.link(tmp, target)  # atomic, and never replaces a file
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: claim the name, then rename over it
        os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        os.replace(tmp, target)


def write_report(path: str, text: str, force: bool = False, numbered: bool = False) -> str:
    """Write `text` whole at `path` (or, with `numbered`, the first free one of path,
    NAME-2.json, NAME-3.json, ...) without ever replacing an existing file, unless `force`.
    The text goes to a temp file first, which then takes the name. Returns the path written."""
    if force:
        atomic_write_text(path, text)
        return path
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".eval-report-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        stem, ext = os.path.splitext(path)
        for n in range(1, 10_000):
            target = path if n == 1 else f"{stem}-{n}{ext}"
            try:
                _claim(tmp, target)
                return target
            except FileExistsError:
                if not numbered:
                    raise FileExistsError(f"{path} already exists; pass --force to replace it") from None
        raise FileExistsError(f"no free report name after {path} ... {stem}-9999{ext}")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def run_task(args, model, tok, device) -> tuple[dict, dict]:
    """(metrics, data description) of the model as it is now (adapters on or off)."""
    progress = not args.no_progress
    ctx = min(1024, model.config.max_position_embeddings)
    seq_len = args.seq_len or ctx  # main() has checked it fits the model's context
    if args.task == "perplexity":
        from engine.data import read_corpus, split_documents, tokenize_cached
        docs = read_corpus(args.data)
        if args.val_fraction is not None:
            docs = split_documents(docs, args.val_fraction)[1]
        # train.py's tokenization: each document chunked, no BOS, EOS after it; cached
        split = tokenize_cached(docs, tok)
        res = tasks.perplexity(model, split.tokens, split.n_bytes, seq_len, args.stride,
                               args.batch_size, device, progress)
        return res, {"tokens": len(split.tokens), "bytes": split.n_bytes}
    if args.task == "response-loss":
        from engine.sft import SFTDataset, load_examples, response_loss
        examples, _ = load_examples(args.data)
        ds = SFTDataset.from_examples(examples, tok, seq_len, source=args.data)
        if len(ds) == 0:
            raise ValueError(f"{args.data}: no example keeps a response token within --seq-len {seq_len}")
        res = response_loss(model, ds, args.batch_size, device)
        return res, {k: ds.report[k] for k in ("n_examples", "n_truncated", "n_dropped",
                                                 "n_loss_tokens")}
    items = tasks.load_choice_items(args.data)  # inputs keep their last --seq-len tokens
    res = tasks.choice_task(model, tok, items, seq_len,
                            args.batch_size, device, args.delimiter, progress, source=args.data)
    return res, {"n_items": len(items), "n_choices": sum(len(i.choices) for i in items)}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from engine.hub import load_model, pick_device
    model_src, adapter = resolve_model(args.model, args.adapter)
    device = pick_device(args.device)  # one line, not a traceback, for cuda on a CPU machine
    t0 = time.time()
    model, tok = load_model(model_src, dtype=args.dtype, device=device, adapter=adapter)
    if tok is None:
        raise ValueError(f"{model_src} has no tokenizer files")
    if args.chat_template is not None:
        set_chat_template(tok, args.chat_template)
    ctx = model.config.max_position_embeddings
    if args.seq_len is not None and args.seq_len > ctx:  # positions the model never saw
        raise ValueError(f"--seq-len {args.seq_len} exceeds the model context of {ctx}")
    window = args.seq_len or min(1024, ctx)
    if args.stride is not None and args.stride > window:  # it would be cut to the window silently
        raise ValueError(f"--stride {args.stride} exceeds --seq-len {window} (the default: "
                         "min(1024, the model's context)); a larger stride would skip tokens")
    model.eval()
    results, data = {}, {}
    if args.compare:
        from engine.lora import disable_adapters
        with disable_adapters(model):
            results["base"], data = run_task(args, model, tok, device)
    results["tuned" if adapter else "model"], data = run_task(args, model, tok, device)
    elapsed = time.time() - t0

    table = tasks.format_table(results)
    first = next(iter(results.values()))
    if args.task == "perplexity":
        what = (f"{first['n_tokens']:,} tokens scored in {first['n_windows']:,} windows of "
                f"{first['seq_len']}, stride {first['stride']}"
                + (f"; {first['unscored_tail']} tail tokens unscored" if first["unscored_tail"] else ""))
    elif args.task == "response-loss":
        what = f"{data['n_examples']:,} examples, {first['n_tokens']:,} response tokens"
    else:
        what = f"{first['n']:,} items, {data['n_choices']:,} choices"
    print(f"{args.task} on {args.data}: {what}\nmodel {model_src}"
          + (f" + adapter {adapter}" if adapter else "") + f" ({elapsed:.1f}s)\n{table}")

    report = {"task": args.task, "data": args.data, "model": model_src, "adapter": adapter,
              "settings": {k: getattr(args, k) for k in ("seq_len", "stride", "val_fraction",
                                                         "delimiter", "batch_size", "dtype")},
              "data_stats": data, "results": results, "elapsed_s": round(elapsed, 2),
              "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
    out = write_report(args.json or default_report_path(model_src, adapter, args.task, args.data),
                       json.dumps(report, indent=2) + "\n", force=args.force,
                       numbered=args.json is None)
    print(f"report: {out}")
    return 0


def cli(argv=None) -> int:
    """main() with bad input (and load / run failures) as one line on stderr and exit code 2."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
