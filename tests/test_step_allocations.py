"""A decoding step allocates few (masked rows x vocab) buffers (issue 25 item 16), counted by the profiler's
allocation timeline on the CPU (deterministic: events, not timings) with `benchmarks/step_allocations.py`, which
records the full-size numbers. Each count includes the LM head's own output, one float32 buffer."""

import importlib.util
from pathlib import Path

import pytest

ROWS, VOCAB = 16, 20000


def load_benchmark():
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "step_allocations.py"
    spec = importlib.util.spec_from_file_location("step_allocations", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = load_benchmark()


def float32_buffers(settings: dict) -> float:
    """Bytes the step allocated in (rows x vocab)-sized buffers, in float32 (rows, vocab) buffers."""
    _, total, _ = bench.step_allocations(ROWS, VOCAB, settings)
    return total / (ROWS * VOCAB * 4)


def test_a_greedy_step_allocates_nothing_vocabulary_wide_beyond_the_lm_head():
    """Bans, softmax and argmax work in the LM head's output (before: a softmax and a banned copy besides)."""
    count, total, _ = bench.step_allocations(ROWS, VOCAB, {})
    assert (count, total) == (1, ROWS * VOCAB * 4)


@pytest.mark.parametrize(
    ("settings", "most"),
    [
        # LM head, the original softmax (confidence), sort values + int64 order, two bool masks, multinomial's own
        (dict(do_sample=True, temperature=0.7, top_p=0.9), 6.5),  # before: 14.5
        # LM head, the original softmax, one bool mask, multinomial's own
        (dict(do_sample=True, temperature=0.7, top_k=50), 3.25),  # before: 9.2
    ],
    ids=["top_p", "top_k"],
)
def test_a_sampling_step_copies_the_logits_only_where_a_filter_needs_it(settings, most):
    assert float32_buffers(settings) <= most
