"""Tests for engine/serve_engine.py driven directly (no HTTP): the scheduler's bookkeeping
between its thread and the threads that submit requests. tests/test_serve.py covers the outputs
(greedy and seeded text against engine.generation.generate, adapters, cancellation)."""
import sys
import threading
import time

import pytest
import torch

from engine.config import preset
from engine.metrics import Registry
from engine.model import Transformer
from engine.serve_engine import Engine, GenRequest, SamplingParams


pytestmark = pytest.mark.usefixtures("one_thread")


def byte_tokenizer():
    from tokenizer.bpe import ByteLevelBPETokenizer, bytes_to_unicode
    b2u = bytes_to_unicode()
    return ByteLevelBPETokenizer({b2u[b]: b for b in range(256)}, [], pre_tokenizer="gpt-2",
                                 added_tokens=[{"id": 256, "content": "<|endoftext|>"}],
                                 eos_id=256)


def test_queue_count_survives_the_scheduler_discarding_finished_requests():
    """submit() (an HTTP thread) counts the running requests' rows under the lock while the
    scheduler thread discards finished ones without it. Iterating the live set raised
    "RuntimeError: Set changed size during iteration" (about 1 in 1500 counts here), which
    failed that request with a 500."""
    engine = Engine(Transformer(preset("tiny", vocab_size=257)), byte_tokenizer(), "m",
                    max_batch=8, registry=Registry())
    reqs = [GenRequest([[1]], SamplingParams(max_tokens=1)) for _ in range(64)]
    stop = threading.Event()

    def scheduler():  # what _sample / _iteration do to _running when requests finish
        while not stop.is_set():
            for r in reqs:
                engine._running.add(r)
            for r in reqs:
                engine._running.discard(r)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    t = threading.Thread(target=scheduler)
    t.start()
    try:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            with engine._cv:
                engine._queued_locked()
    finally:
        stop.set()
        t.join()
        sys.setswitchinterval(old)
