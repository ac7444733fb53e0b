"""Autoregressive generation: prefill / decode split, sampling, beam search, stop handling.

Follows gpt-fast's generate.py (`prefill`, `decode_one_token`, `generate`, a KV cache
preallocated to prompt + max_new_tokens rather than the model's whole context, tokens/s and
GB/s reported) and Hugging Face transformers' logits processors for the sampling math:
repetition penalty (CTRL, Keskar et al. 2019: divide positive logits, multiply negative ones),
then temperature, top-k, top-p (nucleus, Holtzman et al. 2019), min-p (Nguyen et al. 2024), in
that order. Beam search
follows HF's BeamSearchScorer: a hypothesis' score is sum(logprob) / len ** length_penalty,
finished hypotheses are kept, the cache follows its beams through `KVCache.reorder`.

Stop handling: stop ids (EOS, a chat template's end-of-turn) end a sequence and are not part of
its output; stop strings are matched on the decoded text and trimmed from it. While streaming,
text that could be the start of a stop string is held back until it is known not to be one, so
the streamed text always equals the final text. Special tokens the model emits mid-output
(`<|im_start|>`, an `<|endoftext|>` that is not a stop id) have no text by default, as HF's
decode(skip_special_tokens=True) and vLLM's default; skip_special_tokens=False keeps them.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from engine.model import KVCache, Transformer
from tokenizer.base import StreamDecoder, Tokenizer


# ---------------------------------------------------------------------------------------------
# Sampling: each step is a separate function so tests can check its math directly
# ---------------------------------------------------------------------------------------------
def apply_repetition_penalty(logits: torch.Tensor, prev_ids: torch.Tensor,
                             penalty: float) -> torch.Tensor:
    """CTRL / HF repetition penalty. logits: (B, V); prev_ids: (B, L) ids already in the
    sequence (prompt + generated). A seen token's logit is divided by `penalty` if positive and
    multiplied by it if negative, so penalty > 1 always makes it less likely. Returns new logits,
    in fp32 as transformers computes them (in bf16, logit / penalty is rounded again and can tie
    with, or pass, a token it should fall below)."""
    if penalty == 1.0 or prev_ids.numel() == 0:
        return logits
    logits = logits.float()
    seen = logits.gather(1, prev_ids)  # (B, L)
    # zero stays zero (0 * inf would be NaN); an extreme penalty saturates instead of overflowing
    seen = torch.where(seen > 0, seen / penalty, torch.where(seen < 0, seen * penalty, seen))
    seen = seen.clamp(max=torch.finfo(seen.dtype).max)
    return logits.scatter(1, prev_ids, seen)  # repeated ids write the same value


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the logits at least as large as the k-th largest per row, -inf elsewhere (HF's
    TopKLogitsWarper, vLLM too): tokens tied with the k-th all stay, so which of two equally
    likely tokens survives never depends on its id (bf16 logits tie often)."""
    if k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability sums to
    >= p (the top token is always kept), -inf elsewhere.

    HF's TopPLogitsWarper step for step (vLLM's too): ascending sort, tokens whose cumulative
    mass from the bottom is <= 1 - p dropped. Tokens tied at the boundary then fall the same way
    as there (the sort's order decides which of them stays); a descending sort kept the other
    ones, a different distribution from the same logits (bf16 logits tie often)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=False)  # (B, V), least likely first
    cum = sorted_logits.float().softmax(-1).cumsum(-1)  # mass of each token and all below it
    drop_sorted = cum <= 1 - p
    drop_sorted[..., -1] = False  # the top token always stays (a p of 1e-300 is 0 in float32)
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Min-p filter (HF MinPLogitsWarper): drop tokens whose probability is below p times the
    top token's, -inf there. The cut scales with the model's confidence: strict when one token
    dominates, lenient when many are plausible. The top token is always kept."""
    probs = logits.float().softmax(-1)  # (B, V)
    return logits.masked_fill(probs < p * probs.max(-1, keepdim=True).values, float("-inf"))


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None, *,
           min_p: float | None = None) -> torch.Tensor:
    """One token per row. logits: (B, V) -> (B,) int64. temperature 0 is greedy (argmax), and so
    is one below 1e-5 (as in vLLM: dividing by it overflows float32); the generator (on the
    logits' device) makes draws reproducible. Filters apply after temperature, as in HF:
    top-k, then top-p, then min-p."""
    if temperature < 1e-5:
        return logits.argmax(-1)
    logits = logits.float()
    # shift first (softmax ignores it): the top logit is 0, so dividing cannot make inf - inf
    logits = (logits - logits.max(-1, keepdim=True).values) / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    if min_p is not None:
        logits = min_p_filter(logits, min_p)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None,
                        repetition_penalty: float, min_p: float | None = None) -> None:
    """ValueError with one precise line for out-of-range sampling settings."""
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not (0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if min_p is not None and not (0 <= min_p <= 1):
        raise ValueError(f"min_p must be in [0, 1], got {min_p}")
    if not (repetition_penalty > 0 and math.isfinite(repetition_penalty)):
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")


# ---------------------------------------------------------------------------------------------
# Model steps
# ---------------------------------------------------------------------------------------------
def prefill(model: Transformer, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Run the prompt (B, T) through the model, filling the cache; last position's logits (B, V)."""
    return model(input_ids, cache=cache, logits_to_keep=1)[:, -1]


def decode_one_token(model: Transformer, token: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """token: (B, 1), the latest token of each row -> logits (B, V) for the next one."""
    return model(token, cache=cache)[:, -1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters and buffers: what one decode step must read (for GB/s)."""
    seen, n = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            n += t.numel() * t.element_size()
    return n


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------
@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prefill_s: float = 0.0
    new_tokens: int = 0  # over all rows
    decode_steps: int = 0  # forward passes after the prefill
    decode_s: float = 0.0
    model_bytes: int = 0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        return self.new_tokens / self.decode_s if self.decode_s > 0 else float("nan")

    @property
    def decode_gb_per_s(self) -> float:
        """Weight bytes streamed per second during decoding (gpt-fast's bandwidth figure)."""
        return (self.model_bytes * self.decode_steps / self.decode_s / 1e9
                if self.decode_s > 0 else float("nan"))

    def summary(self) -> str:
        return (f"prefill: {self.prompt_tokens} tokens in {self.prefill_s:.3f} s "
                f"({self.prefill_tokens_per_s:.1f} tok/s) | decode: {self.new_tokens} tokens in "
                f"{self.decode_s:.3f} s ({self.decode_tokens_per_s:.1f} tok/s, "
                f"{self.decode_gb_per_s:.2f} GB/s)")


@dataclass
class GenerationResult:
    """tokens[i]: new ids of sequence i (no prompt, no stop id); texts[i]: their text with any
    stop string and what follows trimmed (None without a tokenizer); finish_reasons[i]: 'stop'
    (stop id), 'stop_string' or 'length'; scores[i]: beam score (beam search only). Beam search
    returns its hypotheses best first."""
    tokens: list[list[int]]
    texts: list[str] | None
    finish_reasons: list[str]
    stats: GenerationStats = field(default_factory=GenerationStats)
    scores: list[float] | None = None


class StreamEvent(NamedTuple):
    row: int  # which sample
    token: int | None  # the id just generated (None for a final flush)
    text: str  # new text safe to show ("" while held back)


# ---------------------------------------------------------------------------------------------
# Text side of one sequence: incremental UTF-8, stop strings, hold-back for streaming
# ---------------------------------------------------------------------------------------------
def special_ids(tok: Tokenizer, keep: Iterable[str] = ()) -> frozenset[int]:
    """Ids of the tokenizer's special (control) tokens, less those whose text is in `keep`: what
    skip_special_tokens hides from generated text."""
    return frozenset(i for s, i in tok.special_tokens.items() if s not in keep)


class StopStringStream:
    """Feeds ids to a StreamDecoder, finds stop strings in the text, and releases only text that
    cannot turn out to be the start of a stop string. Ids in `hide` (special tokens) add no text:
    dropping them before decoding is HF's decode(skip_special_tokens=True); one whose text holds
    a stop string stops the text before it, as it did when shown."""

    def __init__(self, tok: Tokenizer, stop_strings: Sequence[str], prefix_ids: list[int] = (),
                 hide: Iterable[int] = ()):
        self.dec = StreamDecoder(tok, list(prefix_ids))
        self.hide = frozenset(hide)
        self.stops = [s for s in stop_strings if s]
        self.tables = [_kmp_table(s) for s in self.stops]
        # per stop string: how many of its first characters the text ends with (KMP's state),
        # so each new character costs O(1) however long the text or the stop strings are
        self.matched = [0] * len(self.stops)
        self.text = ""  # generated text so far (complete characters)
        self.emitted = 0  # characters of self.text already released
        self.stopped = False

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        if token_id in self.hide:
            # one whose own text holds a stop string (stop=["<|im_start|>"]) still stops there
            if not any(s in self.dec.tok.decode([token_id]) for s in self.stops):
                return ""
            out = self._advance(self.dec.flush(), final=True)
            self.stopped = True
            return out
        return self._advance(self.dec.push(token_id), final=False)

    def finish(self) -> str:
        return "" if self.stopped else self._advance(self.dec.flush(), final=True)

    def _advance(self, piece: str, final: bool) -> str:
        base, cut = len(self.text), None
        self.text += piece
        for j, (stop, table) in enumerate(zip(self.stops, self.tables)):
            k = self.matched[j]
            for i, ch in enumerate(piece):
                while k and stop[k] != ch:
                    k = table[k - 1]
                k += stop[k] == ch
                if k == len(stop):  # its first occurrence: the text is cut where it starts
                    start = base + i + 1 - k
                    cut = start if cut is None else min(cut, start)
                    break
            self.matched[j] = k
        if cut is not None:
            self.text, self.stopped = self.text[:max(cut, self.emitted)], True
            final = True
        # hold back a tail that may still become a stop string
        safe = len(self.text) if final else len(self.text) - max(self.matched, default=0)
        out = self.text[self.emitted:safe]
        self.emitted = max(self.emitted, safe)
        return out


def _kmp_table(s: str) -> list[int]:
    """table[i]: length of the longest proper prefix of s[:i + 1] that is also its suffix."""
    table, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = table[k - 1]
        k += s[i] == s[k]
        table[i] = k
    return table


def trim_stop_strings(text: str, stop_strings: Iterable[str]) -> tuple[str, bool]:
    """Cut `text` at the earliest stop string; (text, whether one was found)."""
    hits = [i for s in stop_strings if s and (i := text.find(s)) >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


# ---------------------------------------------------------------------------------------------
# Context budget
# ---------------------------------------------------------------------------------------------
def fit_context(prompt_ids: Sequence[int], max_new_tokens: int, context: int
                ) -> tuple[list[int], int]:
    """Fit prompt + generation into the model's context (warnings say what was cut).

    A prompt longer than the context is left-truncated, keeping room for up to half the context
    of new tokens; otherwise max_new_tokens is capped so the total fits."""
    ids = list(prompt_ids)
    if not ids:
        raise ValueError("the prompt is empty: give at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if context < 2:
        raise ValueError(f"model context {context} is too short to generate")
    if len(ids) >= context:
        keep = context - min(max_new_tokens, context // 2)
        warnings.warn(f"prompt has {len(ids)} tokens, more than the model context of {context}; "
                      f"keeping its last {keep} tokens")
        ids = ids[-keep:]
    if len(ids) + max_new_tokens > context:
        capped = context - len(ids)
        warnings.warn(f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                      f"model context of {context}; generating at most {capped} tokens")
        max_new_tokens = capped
    return ids, max_new_tokens


def _prompt_list(prompt_ids: Sequence[int] | torch.Tensor, model: Transformer) -> list[int]:
    """The prompt as a list of ids, checked: a 1-D (or 1 x T) tensor or a sequence of ints, each
    an embedding row of the model (a 2-row tensor is not silently concatenated into one prompt,
    and a bad id is a one-line error rather than an IndexError deep in the embedding)."""
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dim() > 2 or (prompt_ids.dim() == 2 and prompt_ids.shape[0] != 1):
            raise ValueError(f"prompt_ids must be one prompt (a 1-D or 1 x T tensor), got shape "
                             f"{tuple(prompt_ids.shape)}")
        prompt_ids = prompt_ids.flatten().tolist()
    ids = list(prompt_ids)
    vocab = model.config.vocab_size
    bad = next((i for i in ids if not 0 <= i < vocab), None)
    if bad is not None:
        raise ValueError(f"prompt token id {bad} is outside the model's vocabulary [0, {vocab})")
    return ids


def _device(model: torch.nn.Module) -> torch.device:
    return model.lm_head.weight.device


def _vocab_limit(vocab_size: int | None, tokenizer: Tokenizer | None) -> int | None:
    """How many ids may be generated: vocab_size, else the tokenizer's (None: every row)."""
    if vocab_size is not None:
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        return vocab_size
    return tokenizer.vocab_size if tokenizer is not None else None


def mask_past_vocab(logits: torch.Tensor, n_vocab: int | None) -> torch.Tensor:
    """-inf for ids >= n_vocab, in place: embedding rows padded past the tokenizer (Qwen2: 151,936
    rows, 151,665 tokens) are not tokens, so they must never be sampled (serve_engine too)."""
    if n_vocab is not None and logits.shape[-1] > n_vocab:
        logits[..., n_vocab:] = float("-inf")
    return logits


# ---------------------------------------------------------------------------------------------
# Sampling / greedy generation
# ---------------------------------------------------------------------------------------------
@torch.inference_mode()
def iter_generate(model: Transformer, prompt_ids: Sequence[int] | torch.Tensor,
                  max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, repetition_penalty: float = 1.0,
                  stop_ids: Iterable[int] = (), stop_strings: Sequence[str] = (),
                  generator: torch.Generator | None = None, num_samples: int = 1,
                  tokenizer: Tokenizer | None = None, vocab_size: int | None = None, *,
                  min_p: float | None = None, skip_special_tokens: bool = True
                  ) -> Iterator[StreamEvent]:
    """Generator version of `generate`: yields a StreamEvent per token and row, then returns the
    GenerationResult (as StopIteration.value). See `generate` for the arguments."""
    check_sampling_args(temperature, top_k, top_p, repetition_penalty, min_p)
    n_vocab = _vocab_limit(vocab_size, tokenizer)
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if stop_strings and tokenizer is None:
        raise ValueError("stop strings need a tokenizer to decode the text")
    ids, max_new_tokens = fit_context(_prompt_list(prompt_ids, model), max_new_tokens,
                                      model.config.max_position_embeddings)
    device, B, T = _device(model), num_samples, len(ids)
    stop_set = set(int(i) for i in stop_ids)
    stats = GenerationStats(prompt_tokens=T, model_bytes=model_bytes(model))

    # Prompt + generated ids of every row (the repetition penalty looks at all of them).
    seq = torch.tensor(ids, dtype=torch.long, device=device).repeat(B, 1)  # (B, T)
    seq = torch.cat([seq, seq.new_zeros(B, max_new_tokens)], dim=1)  # (B, T + N)
    cache = model.new_cache(1, T + max_new_tokens)

    _sync(device)
    t0 = time.perf_counter()
    # (1, V): the prompt once, then its cache is copied
    logits = mask_past_vocab(prefill(model, seq[:1, :T], cache), n_vocab)
    _sync(device)
    stats.prefill_s = time.perf_counter() - t0
    if B > 1:
        cache.reorder(torch.zeros(B, dtype=torch.long, device=device))
        logits = logits.expand(B, -1)

    hide = special_ids(tokenizer) if tokenizer is not None and skip_special_tokens else ()
    streams = ([StopStringStream(tokenizer, stop_strings, ids[-4:], hide) for _ in range(B)]
               if tokenizer is not None else None)
    out: list[list[int]] = [[] for _ in range(B)]
    reasons: list[str | None] = [None] * B
    t0 = time.perf_counter()
    for step in range(max_new_tokens):
        logits = apply_repetition_penalty(logits, seq[:, :T + step], repetition_penalty)
        nxt = sample(logits, temperature, top_k, top_p, generator, min_p=min_p)  # (B,)
        seq[:, T + step] = nxt
        for r, tid in enumerate(nxt.tolist()):
            if reasons[r] is not None:
                continue  # finished rows ride along until the batch ends
            if tid in stop_set:
                reasons[r] = "stop"
                text = streams[r].finish() if streams else ""
                yield StreamEvent(r, None, text)
                continue
            out[r].append(tid)
            stats.new_tokens += 1
            text = streams[r].push(tid) if streams else ""
            if streams and streams[r].stopped:
                reasons[r] = "stop_string"
            yield StreamEvent(r, tid, text)
        if all(reasons) or step == max_new_tokens - 1:
            break
        logits = mask_past_vocab(decode_one_token(model, nxt[:, None], cache), n_vocab)
        stats.decode_steps += 1
    for r in range(B):
        if reasons[r] is None:
            reasons[r] = "length"
            if streams:
                yield StreamEvent(r, None, streams[r].finish())
    _sync(device)
    stats.decode_s = time.perf_counter() - t0
    texts = [s.text for s in streams] if streams else None
    return GenerationResult(out, texts, reasons, stats)


def generate(model: Transformer, prompt_ids: Sequence[int] | torch.Tensor, max_new_tokens: int,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             repetition_penalty: float = 1.0, stop_ids: Iterable[int] = (),
             stop_strings: Sequence[str] = (), generator: torch.Generator | None = None,
             num_samples: int = 1, tokenizer: Tokenizer | None = None,
             stream: Callable[[int, str], None] | None = None,
             vocab_size: int | None = None, *, min_p: float | None = None,
             skip_special_tokens: bool = True) -> GenerationResult:
    """Sample `num_samples` continuations of one prompt (a batch sharing one prefill).

    prompt_ids: list of ids or a 1-D (or 1 x T) tensor. temperature 0 = greedy. top_k >= 1,
    top_p in (0, 1], min_p in [0, 1], repetition_penalty > 0 (1 = off). Generation of a row ends
    at a stop id, a stop string (needs `tokenizer`) or after max_new_tokens. `generator`
    (torch.Generator on the model's device) makes sampling reproducible: same seed, same tokens.
    `stream(row, text)` is called with each piece of finished text (complete UTF-8 characters,
    stop strings held back); special tokens have no text unless skip_special_tokens=False.
    Only ids below `vocab_size` (default: the tokenizer's vocab_size) are ever generated: a
    model may have more embedding rows than its tokenizer has tokens.
    A prompt + max_new_tokens past the model's context (max_position_embeddings) is fitted with
    a warning, not an error: max_new_tokens is capped, a prompt as long as the context is
    left-truncated (see fit_context).
    """
    it = iter_generate(model, prompt_ids, max_new_tokens, temperature, top_k, top_p,
                       repetition_penalty, stop_ids, stop_strings, generator, num_samples,
                       tokenizer, vocab_size=vocab_size, min_p=min_p,
                       skip_special_tokens=skip_special_tokens)
    while True:
        try:
            ev = next(it)
        except StopIteration as done:
            return done.value
        if stream is not None and ev.text:
            stream(ev.row, ev.text)


@torch.inference_mode()
def generate_many(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                  temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                  stop_ids: Iterable[int] = (), generator: torch.Generator | None = None,
                  batch_size: int = 32, progress: Callable[[int, int], None] | None = None,
                  vocab_size: int | None = None, *, min_p: float | None = None
                  ) -> list[tuple[list[int], bool]]:
    """One continuation of each of many prompts: (new ids without the stop id, ended by a stop
    id) per prompt, in order. Prompts of equal length decode together, batch_size at a time,
    one KV cache per group: no padding, so each row's result is what `generate` gives it alone
    (greedy). progress(done, total) after each group. Only ids below `vocab_size` (pass the
    tokenizer's) are generated. For evaluation sweeps on a CPU."""
    check_sampling_args(temperature, top_k, top_p, 1.0, min_p)
    n_vocab = _vocab_limit(vocab_size, None)
    stop_set = set(stop_ids)
    device = _device(model)
    stop = torch.tensor(sorted(stop_set), dtype=torch.long, device=device)
    # each prompt fitted into the context as `generate` fits it (empty ones refused)
    fitted = [fit_context(_prompt_list(ids, model), max_new_tokens,
                          model.config.max_position_embeddings) for ids in prompts]
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (ids, n_new) in enumerate(fitted):
        groups.setdefault((len(ids), n_new), []).append(i)
    work = [(g[k:k + batch_size], n_new) for (_, n_new), g in groups.items()
            for k in range(0, len(g), batch_size)]
    out: list[tuple[list[int], bool]] = [([], False)] * len(prompts)
    n_done = 0
    for rows, n_new in work:
        x = torch.tensor([fitted[i][0] for i in rows], device=device)      # (B, T)
        cache = model.new_cache(len(rows), x.shape[1] + n_new)
        logits = mask_past_vocab(prefill(model, x, cache), n_vocab)         # (B, V)
        new = []                                                            # [(B,)] per step
        done = torch.zeros(len(rows), dtype=torch.bool, device=device)
        for _ in range(n_new):
            nxt = sample(logits, temperature, top_k, top_p, generator, min_p=min_p)  # (B,)
            new.append(nxt)
            done |= torch.isin(nxt, stop)
            if done.all():
                break
            logits = mask_past_vocab(decode_one_token(model, nxt[:, None], cache), n_vocab)
        toks = torch.stack(new, dim=1).tolist()                             # (B, steps)
        for r, i in enumerate(rows):
            cut = next((k for k, t in enumerate(toks[r]) if t in stop_set), None)
            out[i] = (toks[r][:cut], cut is not None)
        n_done += len(rows)
        if progress is not None:
            progress(n_done, len(prompts))
    return out


# ---------------------------------------------------------------------------------------------
# Beam search
# ---------------------------------------------------------------------------------------------
@torch.inference_mode()
def beam_search(model: Transformer, prompt_ids: Sequence[int] | torch.Tensor, num_beams: int,
                max_new_tokens: int, length_penalty: float = 1.0, stop_ids: Iterable[int] = (),
                early_stopping: bool = False, stop_strings: Sequence[str] = (),
                tokenizer: Tokenizer | None = None, repetition_penalty: float = 1.0,
                vocab_size: int | None = None, skip_special_tokens: bool = True
                ) -> GenerationResult:
    """Beam search (HF BeamSearchScorer semantics). Returns up to num_beams hypotheses, best first.

    A hypothesis' score is sum(logprob of its new tokens) / len ** length_penalty, where len
    counts the new tokens including the stop token that ended it. A stop token among the top
    num_beams candidates of a step finishes that hypothesis (kept, the num_beams best); the
    other candidates continue. early_stopping=True stops once num_beams hypotheses are finished
    (then num_beams=1 is exactly greedy); False searches on while a running beam could still beat
    the worst kept hypothesis (an exact bound, HF's early_stopping="never").

    repetition_penalty is applied as HF's beam search applies its logits processors: to each
    beam's log-probs (ids in its prompt + tokens so far), and the penalized values are what the
    scores add up. Only ids below `vocab_size` (default: the tokenizer's) are generated. Texts are
    decoded with the end of the prompt as context (as the sampling path streams them), and stop
    strings are applied to the final texts only.
    """
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if not math.isfinite(length_penalty):
        raise ValueError(f"length_penalty must be a finite number, got {length_penalty}")
    check_sampling_args(0.0, None, None, repetition_penalty)
    if stop_strings and tokenizer is None:
        raise ValueError("stop strings need a tokenizer to decode the text")
    n_vocab = _vocab_limit(vocab_size, tokenizer)
    ids, max_new_tokens = fit_context(_prompt_list(prompt_ids, model), max_new_tokens,
                                      model.config.max_position_embeddings)
    device, K, T = _device(model), num_beams, len(ids)
    stop_set = set(int(i) for i in stop_ids)
    stats = GenerationStats(prompt_tokens=T, model_bytes=model_bytes(model))

    def norm(score: float, length: int) -> float:
        return score / (length ** length_penalty)

    cache = model.new_cache(1, T + max_new_tokens)
    _sync(device)
    t0 = time.perf_counter()
    logits = mask_past_vocab(prefill(model, torch.tensor([ids], device=device), cache),
                             n_vocab)  # (1, V)
    _sync(device)
    stats.prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    cache.reorder(torch.zeros(K, dtype=torch.long, device=device))
    logits = logits.expand(K, -1)
    V = logits.shape[-1]
    # Prompt + tokens of each beam, for the repetition penalty (reordered with the beams).
    seq = torch.tensor(ids, dtype=torch.long, device=device).repeat(K, 1)  # (K, T)
    # Only beam 0 is live at first, so the K copies of the prompt do not yield K equal beams.
    beam_scores = torch.full((K,), float("-inf"), device=device)
    beam_scores[0] = 0.0
    beam_seqs: list[list[int]] = [[] for _ in range(K)]
    finished: list[tuple[float, list[int], str]] = []  # (normalized score, tokens, reason)

    def keep(score: float, toks: list[int], reason: str) -> None:
        finished.append((score, toks, reason))
        finished.sort(key=lambda h: -h[0])
        del finished[K:]

    n_cand = min(K * V, K * (1 + max(1, len(stop_set))))  # enough to leave K non-stop ones
    for step in range(max_new_tokens):
        length = step + 1  # new tokens in every candidate of this step
        logp = F.log_softmax(logits.float(), dim=-1)  # (K, V)
        logp = apply_repetition_penalty(logp, seq, repetition_penalty)  # HF: on the log-probs
        cand = (beam_scores[:, None] + logp).view(-1)  # (K * V,)
        top_scores, top_idx = cand.topk(n_cand)
        running: list[tuple[float, int, int]] = []  # (sum logprob, source beam, token)
        for rank, (s, i) in enumerate(zip(top_scores.tolist(), top_idx.tolist())):
            if s == float("-inf"):
                break
            src, tok = divmod(i, V)
            if tok in stop_set:
                if rank < K:
                    keep(norm(s, length), beam_seqs[src], "stop")
                continue
            running.append((s, src, tok))
            if len(running) == K:
                break
        last = step == max_new_tokens - 1
        if last or not running:
            for s, src, tok in running:
                keep(norm(s, length), beam_seqs[src] + [tok], "length")
            break
        if len(finished) == K:
            if early_stopping:
                break
            best = running[0][0]  # future sums only go down; the best length depends on the sign
            bound = (norm(best, max_new_tokens) if length_penalty > 0 else norm(best, length))
            if bound <= finished[-1][0]:
                break
        while len(running) < K:  # tiny vocabularies: pad with dead beams
            running.append((float("-inf"), running[0][1], running[0][2]))
        src = torch.tensor([r[1] for r in running], device=device)
        toks = torch.tensor([r[2] for r in running], device=device)
        beam_scores = torch.tensor([r[0] for r in running], device=device)
        beam_seqs = [beam_seqs[r[1]] + [r[2]] for r in running]
        seq = torch.cat([seq[src], toks[:, None]], dim=1)  # (K, T + length)
        cache.reorder(src)
        logits = mask_past_vocab(decode_one_token(model, toks[:, None], cache), n_vocab)
        stats.decode_steps += 1
    _sync(device)
    stats.decode_s = time.perf_counter() - t0
    tokens = [h[1] for h in finished]
    reasons = [h[2] for h in finished]
    stats.new_tokens = len(tokens[0]) if tokens else 0
    texts = None
    if tokenizer is not None:
        texts, hide = [], special_ids(tokenizer) if skip_special_tokens else ()
        for r, toks in enumerate(tokens):
            # decoded after the prompt's last ids, as the sampling path streams it: SentencePiece
            # keeps the new text's leading space only with context before it
            stream = StopStringStream(tokenizer, stop_strings, ids[-4:], hide)
            for t in toks:
                stream.push(t)
            stream.finish()
            texts.append(stream.text)
            if stream.stopped:
                reasons[r] = "stop_string"
    return GenerationResult(tokens, texts, reasons, stats, scores=[h[0] for h in finished])
