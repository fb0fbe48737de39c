"""Long runs: 1,000 consecutive `generate` calls leave no growing Python heap, RSS or live caches behind."""

import gc
import time
import tracemalloc

import pytest
import torch
from PIL import Image
from transformers.cache_utils import Cache

from dimple.tiny.build import build_tiny_model, build_tiny_processor
from prompts import encode

CALLS = 1_000
WARM_UP = 50
FIRST_MEASURE = 200
HEAP_BOUND = 64 * 1024  # bytes of Python heap over the last 800 calls; a leaked cache per call is far above
RSS_BOUND = 16 * 1024 * 1024


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def live(kind: type) -> int:
    return sum(1 for obj in gc.get_objects() if isinstance(obj, kind))


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared CPU, thread contention would dominate the run time of a tiny model."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_thousand_generate_calls_do_not_grow_memory(one_thread):
    processor = build_tiny_processor()
    model = build_tiny_model(processor)
    text_batch = encode(processor, ["Hi.", "Describe the cat please."])
    image_prompt = encode(processor, [("What is it?", [Image.new("RGB", (56, 56), (200, 30, 30))])])
    # Every kind of call a server makes: prefix cache on and off, both pipelines, dict output with history, images.
    calls = [
        (text_batch, {}),
        (text_batch, {"use_cache": False}),
        (text_batch, {"decoding_pipeline": "dream", "alg_p_threshold": None, "steps": 2}),
        (text_batch, {"return_dict_in_generate": True, "output_history": True}),
        (image_prompt, {}),
    ]

    def run(index: int) -> None:
        inputs, kwargs = calls[index % len(calls)]
        model.generate(**inputs, max_new_tokens=4, **kwargs)

    for index in range(WARM_UP):
        run(index)
    gc.collect()
    tensors_before = live(torch.Tensor)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        for index in range(CALLS):
            run(index)
            if index == FIRST_MEASURE - 1:
                gc.collect()
                heap_early, rss_early = tracemalloc.get_traced_memory()[0], rss_bytes()
        gc.collect()
        heap_late, rss_late = tracemalloc.get_traced_memory()[0], rss_bytes()
    finally:
        tracemalloc.stop()
    elapsed = time.perf_counter() - start

    assert heap_late - heap_early < HEAP_BOUND, f"Python heap grew by {heap_late - heap_early} bytes"
    assert rss_late - rss_early < RSS_BOUND, f"RSS grew by {(rss_late - rss_early) / 2**20:.1f} MiB"
    assert live(Cache) == 0, "a key/value cache outlived its generate() call"
    assert live(torch.Tensor) == tensors_before, "tensors outlived their generate() call"
    assert elapsed < 120, f"{CALLS} calls took {elapsed:.0f} s"
