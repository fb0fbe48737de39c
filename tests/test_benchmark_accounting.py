"""The benchmark's FLOP ceiling and masked-row counts, checked against torch's own counters.

The ceiling it prints next to the measured cache speed-up is only as honest as `forward_flops`, so the formula is
compared with `torch.utils.flop_counter.FlopCounterMode` on real forwards (eager attention, whose matmuls the counter
sees), for a full pass and for a cached window, each with the LM head on a few rows.
"""

import importlib.util
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dimple.cache_dimple import DimpleDiffusionCache


def load_benchmark():
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_generate.py"
    spec = importlib.util.spec_from_file_location("bench_generate", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = load_benchmark()


@pytest.fixture(scope="module")
def tiny_model():
    model = bench.build("tiny", torch.float32, "cpu")
    model.set_attn_implementation("eager")
    return model


def counted_flops(model, **forward_inputs) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**forward_inputs)
    return counter.get_total_flops()


def test_forward_flops_match_torch_counter_for_full_and_window_forwards(tiny_model):
    total, window_start, head_rows = 40, 29, 7
    ids = torch.randint(10, tiny_model.config.vocab_size, (1, total), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(total).view(1, 1, -1).expand(3, 1, -1)
    embeds = tiny_model.get_input_embeddings()(ids).detach()
    rows = torch.stack([torch.zeros(head_rows, dtype=torch.long), torch.arange(head_rows) + 1], dim=1)

    full = counted_flops(tiny_model, inputs_embeds=embeds, position_ids=positions, logits_to_keep=rows)
    assert full == bench.forward_flops(tiny_model.config, total, total, head_rows)

    cache = DimpleDiffusionCache(tiny_model.config.num_hidden_layers)
    with torch.no_grad():
        tiny_model(inputs_embeds=embeds, position_ids=positions, cache=cache)
    cache.set_window(window_start)
    window = counted_flops(tiny_model, inputs_embeds=embeds[:, window_start:],
                           position_ids=positions[..., window_start:], cache=cache, logits_to_keep=rows)
    assert window == bench.forward_flops(tiny_model.config, total - window_start, total, head_rows)


def test_ceiling_is_the_token_bound_without_lm_head_rows_and_below_it_with_them(tiny_model):
    prompt_len, answer = 1000, 64
    bound = (prompt_len + answer) / (answer + 1)
    assert bench.cache_ceiling(tiny_model.config, prompt_len, answer, 0) == pytest.approx(bound)
    assert bench.cache_ceiling(tiny_model.config, prompt_len, answer, 32) < bound


def test_step_clock_counts_the_masked_rows_each_later_step_sees(tiny_model):
    ids = torch.randint(10, tiny_model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(1))
    settings = dict(input_ids=ids, max_new_tokens=30, steps=10, alg_p_threshold=None)
    result = bench.timed(lambda clock: tiny_model.generate(streamer=clock, **settings), True, 1,
                         tiny_model.config.mask_token_id)
    history = tiny_model.generate(output_history=True, return_dict_in_generate=True, **settings).history
    masks_before_later_steps = [int((step[:, 20:] == tiny_model.config.mask_token_id).sum()) for step in history[:-1]]
    assert result["forwards"] == len(history) == 10
    assert result["rows"] == sum(masks_before_later_steps) / len(masks_before_later_steps)
