"""Evaluation tasks behind eval.py: sliding-window perplexity / bits per byte, response-only loss
on instruction or chat data, and multiple-choice log-likelihood accuracy.

perplexity   Hugging Face's "Perplexity of fixed-length models" guide: windows of seq_len
             tokens every `stride` tokens; a window scores only the targets no earlier window
             scored, so with stride < seq_len every token after the first window has at least
             seq_len - stride tokens of context. With stride == seq_len the windows are
             engine.data.eval_windows' (train.py's validation): same tokenization (each document
             without BOS, EOS after it), same batches, same sums, so the numbers are train.py's.
             Only whole windows are scored, as in training validation: fewer than `stride` tail
             tokens stay unscored (reported). Bits per byte = total nats / bytes / ln 2, with
             the bytes of the scored tokens taken as scored tokens * (UTF-8 bytes / tokens of
             the text), as in training.
response     engine.sft.response_loss: mean cross-entropy over the response tokens only.
choice       lm-evaluation-harness loglikelihood requests: the context's trailing whitespace
             moves to the continuation, the continuation's ids are those of encode(context +
             continuation) past len(encode(context)) (no BOS; an empty context is BOS, else EOS),
             the input keeps the last max_len tokens. acc = argmax of the summed log-probs;
             acc_norm = argmax of log-prob / len(choice) in characters (the harness' code, its
             `acc_norm`), acc_bytes = the same per UTF-8 byte (the harness' byte-normalized form);
             each with its standard error (sample std of the 0/1 scores / sqrt(n), the harness').
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from engine.data import json_error

TASKS = ("perplexity", "response-loss", "choice")


# ---------------------------------------------------------------------------------------------
# Perplexity over a text
# ---------------------------------------------------------------------------------------------
def sliding_windows(n_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int]]:
    """(start, skip) per window: inputs tokens[start:start+seq_len], targets the next tokens;
    the first `skip` targets were scored by an earlier window and are left out."""
    if not 1 <= stride <= seq_len:
        raise ValueError(f"--stride must be in 1..--seq-len ({seq_len}), got {stride}")
    windows, start, scored_to = [], 0, 0  # scored_to: index of the last target scored so far
    while start + seq_len < n_tokens:
        windows.append((start, max(0, scored_to - start)))
        scored_to = start + seq_len
        start += stride
    return windows


@torch.no_grad()
def perplexity(model, tokens: np.ndarray, n_bytes: int, seq_len: int, stride: int | None = None,
               batch_size: int = 8, device="cpu", progress: bool = False) -> dict:
    """Sliding-window loss (nats/token), perplexity and bits per byte of a token array."""
    stride = stride or seq_len
    if len(tokens) < 2:
        raise ValueError(f"the text has {len(tokens)} token(s); perplexity needs at least 2")
    if seq_len < 1:
        raise ValueError(f"--seq-len must be >= 1, got {seq_len}")
    seq_len = min(seq_len, len(tokens) - 1)  # a text shorter than one window is one window
    stride = min(stride, seq_len)
    windows = sliding_windows(len(tokens), seq_len, stride)
    model.eval()
    total_nats, total = 0.0, 0
    for i in tqdm(range(0, len(windows), batch_size), disable=not progress, desc="perplexity",
                  unit="batch", leave=False):
        rows = windows[i:i + batch_size]
        xy = torch.from_numpy(np.stack([tokens[s:s + seq_len + 1].astype(np.int64) for s, _ in rows]))
        x, y = xy[:, :-1].clone(), xy[:, 1:].clone()                        # (B, T) each
        for b, (_, skip) in enumerate(rows):
            y[b, :skip] = -100
        n = int((y != -100).sum())
        loss = model(x.to(device), labels=y.to(device))                     # mean over scored
        total_nats += loss.item() * n
        total += n
    mean = total_nats / max(1, total)
    bytes_per_token = n_bytes / len(tokens)
    return {"loss": mean, "ppl": math.exp(min(mean, 700.0)),
            "bpb": mean / bytes_per_token / math.log(2), "n_tokens": total,
            "n_windows": len(windows), "unscored_tail": len(tokens) - 1 - total,
            "seq_len": seq_len, "stride": stride}


# ---------------------------------------------------------------------------------------------
# Multiple choice
# ---------------------------------------------------------------------------------------------
@dataclass
class ChoiceItem:
    context: str
    choices: list[str]
    label: int
    line: int = 0


def _check_choice(obj) -> str | None:
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    if not isinstance(obj.get("context"), str):
        return "missing string 'context'"
    ch = obj.get("choices")
    if not isinstance(ch, list) or not ch:
        return "'choices' must be a non-empty list of strings" if ch != [] else "empty 'choices'"
    for i, c in enumerate(ch):
        if not isinstance(c, str) or not c:
            return f"choice {i} is not a non-empty string"
    if "label" not in obj:
        return "missing 'label' (the index of the correct choice)"
    label = obj["label"]
    if isinstance(label, str):
        if label not in ch:
            return f"label {label!r} is not one of the choices"
    elif not isinstance(label, int) or isinstance(label, bool):
        return f"'label' must be an integer index, got {type(label).__name__}"
    elif not 0 <= label < len(ch):
        return f"label {label} out of range for {len(ch)} choices"
    return None


def holds_choice_items(path: str) -> bool:
    """Whether a JSONL file's first JSON object is a multiple-choice item ('context' and
    'choices'): data for --task choice, whatever task it was given to."""
    from engine.sft import json_lines
    if not os.path.isfile(path) or not path.endswith((".jsonl", ".json")):
        return False
    try:
        obj = next((o for _, o, err in json_lines(path) if err is None and isinstance(o, dict)), {})
    except ValueError:  # a JSON array: the task's own reader says so
        return False
    return "context" in obj and "choices" in obj


def load_choice_items(path: str) -> list[ChoiceItem]:
    """{"context", "choices": [...], "label": index or the correct choice's text} per line.
    The first bad line raises ValueError("FILE:LINE: what is wrong")."""
    if os.path.isdir(path):
        raise ValueError(f"{path} is a directory; choice data is one JSONL file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    items = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").lstrip("\ufeff")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{n}: invalid UTF-8 at byte {e.start}") from None
            if not line.strip():
                continue
            try:  # without the line break: an error at its end is then not "column 1" of a next line
                obj = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: {json_error(e)}") from None
            err = _check_choice(obj)
            if err:
                raise ValueError(f"{path}:{n}: {err}")
            label = obj["label"]
            items.append(ChoiceItem(obj["context"], obj["choices"],
                                    obj["choices"].index(label) if isinstance(label, str) else label, n))
    if not items:
        raise ValueError(f"{path}: no multiple-choice items")
    return items


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) the way lm-evaluation-harness' HFLM._encode_pair does."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    if not context:
        prefix = tok.bos_id if tok.bos_id is not None else tok.eos_id
        return [prefix if prefix is not None else 0], tok.encode(continuation, add_bos=False)
    whole = tok.encode(context + continuation, add_bos=False)
    ctx = tok.encode(context, add_bos=False)
    return ctx, whole[len(ctx):]


@torch.no_grad()
def loglikelihoods(model, requests: list[tuple[list[int], list[int]]], max_len: int,
                   batch_size: int = 8, device="cpu", progress: bool = False
                   ) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), whether it is the greedy continuation) per
    request; longest first in right-padded batches (padding never changes a row's values:
    the attention is causal and padding sits after the row's tokens)."""
    model.eval()
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]) - len(requests[i][1]))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    for b in tqdm(range(0, len(order), batch_size), disable=not progress, desc="choice",
                  unit="batch", leave=False):
        idx = order[b:b + batch_size]
        rows = []
        for i in idx:
            ctx, cont = requests[i]
            seq = (ctx + cont)[-(max_len + 1):][:-1]  # the input: all but the last token
            rows.append((seq, cont[-len(seq):] if len(cont) > len(seq) else cont))
        T = max(len(s) for s, _ in rows)
        x = torch.zeros(len(rows), T, dtype=torch.long)
        for r, (seq, _) in enumerate(rows):
            x[r, :len(seq)] = torch.tensor(seq)
        # Only the positions that predict a continuation token need logits: the last `keep`
        # of the padded batch (not B x T x V of them, in fp32, on the host).
        first = min(len(seq) - len(cont) for seq, cont in rows)
        keep = T - first
        logits = model(x.to(device), logits_to_keep=keep)                   # (B, keep, V)
        for r, (i, (seq, cont)) in enumerate(zip(idx, rows)):
            start = len(seq) - len(cont) - first                            # predicts cont[0]
            lp = torch.log_softmax(logits[r, start:start + len(cont)].float(), -1)  # (n_cont, V)
            target = torch.tensor(cont, device=lp.device)
            out[i] = (lp.gather(1, target[:, None]).sum().item(),
                      bool((lp.argmax(dim=-1) == target).all()))
    return out


def choice_metrics(items: list[ChoiceItem], lls: list[list[float]]) -> dict:
    """acc, acc_norm (per character), acc_bytes (per UTF-8 byte), n, and each metric's
    standard error as lm-evaluation-harness reports it (X_stderr: sample standard deviation of
    the per-item 0/1 scores / sqrt(n); None for a single item)."""
    hits = {"acc": [], "acc_norm": [], "acc_bytes": []}
    for item, ll in zip(items, lls):
        ll = np.asarray(ll, dtype=np.float64)
        chars = np.array([len(c) for c in item.choices], dtype=np.float64)
        nbytes = np.array([len(c.encode("utf-8")) for c in item.choices], dtype=np.float64)
        hits["acc"].append(float(np.argmax(ll) == item.label))
        hits["acc_norm"].append(float(np.argmax(ll / chars) == item.label))
        hits["acc_bytes"].append(float(np.argmax(ll / nbytes) == item.label))
    n = len(items)
    res: dict = {k: sum(v) / n for k, v in hits.items()}
    res["n"] = n
    for k, v in hits.items():
        res[f"{k}_stderr"] = float(np.std(v, ddof=1) / math.sqrt(n)) if n > 1 else None
    return res


def choice_task(model, tok, items: list[ChoiceItem], max_len: int, batch_size: int = 8,
                device="cpu", delimiter: str = " ", progress: bool = False, source: str = "") -> dict:
    """Accuracy metrics of a model on multiple-choice items (continuation = delimiter + choice).
    A choice that tokenizes to nothing after its context raises ValueError("SOURCE:LINE: ...")."""
    requests, spans = [], []
    for item in items:
        spans.append((len(requests), len(item.choices)))
        for k, c in enumerate(item.choices):
            ctx, cont = encode_pair(tok, item.context, delimiter + c)
            if not cont:  # log p(nothing) = 0 would beat every real choice (the harness asserts)
                where = f"{source}:{item.line}" if source else f"line {item.line}"
                raise ValueError(f"{where}: choice {k} ({c!r}) adds no token after the "
                                 f"context: it merges into the context's last token; put a "
                                 f"--delimiter such as ' ' between them")
            requests.append((ctx, cont))
    res = loglikelihoods(model, requests, max_len, batch_size, device, progress)
    lls = [[res[s + k][0] for k in range(n)] for s, n in spans]
    return choice_metrics(items, lls)


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
METRIC_NAMES = {"loss": "loss (nats/token)", "ppl": "perplexity", "bpb": "bits per byte",
                "acc": "accuracy", "acc_norm": "accuracy (length-normalized)",
                "acc_bytes": "accuracy (byte-normalized)"}


def format_table(results: dict[str, dict]) -> str:
    """Metrics (rows) x models (columns: 'base', 'tuned' ... ), plus a change column for two."""
    cols = list(results)
    first = results[cols[0]]
    rows = [k for k in METRIC_NAMES if k in first]
    head = ["metric"] + cols + (["change"] if len(cols) == 2 else [])
    body = []
    for k in rows:
        vals = [results[c][k] for c in cols]
        line = [METRIC_NAMES[k]] + [f"{v:.4f}" for v in vals]
        if len(cols) == 2:
            line.append(f"{vals[1] - vals[0]:+.4f}")
        body.append(line)
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in body])
