"""The engine's CPU path against transformers on the demo model (SmolLM2-135M-Instruct, fp32).

Both models hold the same weights (the demo GGUF, dequantized and saved as an HF directory).
Two jobs: a training step (forward + backward of a batch of random ids) and greedy decoding
(prefill + N new tokens, KV cache on both sides). Rounds alternate which side runs first:
glibc's allocator serves a freed large buffer from the heap only after the first free raised
its mmap threshold, so whichever side runs first pays page faults the other does not (a fixed
order showed a 14% "gap" either way). Prints a markdown table of median times and the ratio
ours / transformers, and appends it to benchmarks/results/cpu-vs-transformers.md.

    python benchmarks/cpu_vs_transformers.py [--rounds 4] [--batch 4 --seq 256] [--new 64]

Needs transformers (a test-only extra: pip install -e ".[dev]"); the engine never imports it.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.checkpoint import save_model  # noqa: E402
from engine.generation import generate  # noqa: E402
from engine.hub import load_model  # noqa: E402


def timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--new", type=int, default=64, help="greedy tokens to decode")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                 "results", "cpu-vs-transformers.md"))
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import transformers

    ours, tok = load_model("smollm2-135m-instruct")
    with tempfile.TemporaryDirectory() as d:
        save_model(ours, d, tokenizer=tok)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    torch.manual_seed(0)
    x = torch.randint(0, ours.config.vocab_size, (args.batch, args.seq))  # (B, T)
    prompt = tok.encode("The quick brown fox jumps over the lazy dog. " * 8)

    def ours_step():
        ours.train()
        ours(x).float().mean().backward()
        ours.zero_grad(set_to_none=True)

    def hf_step():
        hf.train()
        hf(x).logits.float().mean().backward()
        hf.zero_grad(set_to_none=True)

    out = {}

    def ours_decode():
        ours.eval()
        out["ours"] = generate(ours, prompt, args.new, temperature=0).tokens[0]

    def hf_decode():
        hf.eval()
        ids = hf.generate(torch.tensor([prompt]), max_new_tokens=args.new, min_new_tokens=args.new,
                          do_sample=False)
        out["hf"] = ids[0, len(prompt):].tolist()

    jobs = {"train step": (ours_step, hf_step), "greedy decode": (ours_decode, hf_decode)}
    times = {(j, s): [] for j in jobs for s in ("ours", "hf")}
    for job, (o, h) in jobs.items():
        o(), h()  # warm-up
        for r in range(args.rounds):
            order = [("ours", o), ("hf", h)] if r % 2 == 0 else [("hf", h), ("ours", o)]
            for side, f in order:
                times[job, side].append(timed(f))
    if out["ours"] != out["hf"][:len(out["ours"])]:
        print("warning: greedy tokens differ between the two models", file=sys.stderr)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    head = (f"## {datetime.date.today()} · {platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads · torch {torch.__version__}, transformers "
            f"{transformers.__version__} · commit {commit or '?'}\n\n"
            f"SmolLM2-135M-Instruct fp32; train step = forward + backward, batch {args.batch} x "
            f"{args.seq}; greedy decode = {len(prompt)}-token prompt + {args.new} tokens; "
            f"median of {args.rounds} rounds, alternating order.\n\n")
    rows = ["| job | ours s | transformers s | ours / transformers |", "|---|---|---|---|"]
    for job in jobs:
        a, b = (statistics.median(times[job, s]) for s in ("ours", "hf"))
        rows.append(f"| {job} | {a:.3f} | {b:.3f} | {a / b:.2f} |")
    text = head + "\n".join(rows) + "\n\n"
    print(text, end="")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "a", encoding="utf-8") as f:  # a log: each run appends its section
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
