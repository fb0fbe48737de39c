"""Decoding modes beyond the reference change no token they should not: the LM head on masked positions only,
block decoding left to right, and the window cache behind both cache modes, whose buffers never move."""

import pytest
import torch

from dimple.cache_dimple import DimpleDiffusionCache
from prompts import encode, picture


def record_input_lengths(model) -> tuple[list[int], object]:
    lengths: list[int] = []
    handle = model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True
    )
    return lengths, handle


@pytest.mark.parametrize("use_cache", [True, False])
def test_lm_head_on_masked_positions_only_changes_no_token(model, processor, use_cache):
    """The default projects only masked rows; an identity logits hook forces the full LM head: same tokens."""
    inputs = encode(processor, [("Hi.", [picture(84, 56)]), ("Describe the picture in detail.", [picture(84, 56)])])
    rows: list[int] = []
    handle = model.lm_head.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[:-1].numel()))
    try:
        settings = dict(max_new_tokens=10, alg_p_threshold=0.3, use_cache=use_cache, return_dict_in_generate=True,
                        output_history=True)
        masked_only = model.generate(**inputs, **settings)
    finally:
        handle.remove()
    full = model.generate(**inputs, generation_logits_hook_func=lambda step, x, logits: logits, **settings)
    assert torch.equal(masked_only.sequences, full.sequences)
    assert torch.equal(torch.stack(masked_only.history), torch.stack(full.history))
    prompt_len, mask_id = inputs["input_ids"].shape[1], model.config.mask_token_id
    canvases = [torch.full((2, 10), mask_id)] + [h[:, prompt_len:] for h in masked_only.history[:-1]]
    assert rows == [int((canvas == mask_id).sum()) for canvas in canvases]


def test_a_window_in_the_middle_sees_the_whole_cached_sequence(model, processor):
    """Feeding a window's own tokens again after a full pass reproduces the full pass's logits there."""
    prompts = [(text, [picture(84, 56)]) for text in ("A short question?", "A much longer question about the picture?")]
    inputs = encode(processor, prompts)
    mask_id = model.config.mask_token_id
    ids = torch.cat([inputs["input_ids"], torch.full((2, 9), mask_id)], dim=1)
    ids[:, -9:-5] = torch.tensor([17, 42, 99, 7])
    attention_mask = torch.cat([inputs["attention_mask"], torch.ones(2, 9, dtype=torch.long)], dim=1)
    position_ids, _ = model._rope_positions(ids, inputs["image_grid_thw"], attention_mask)
    cache = DimpleDiffusionCache(model.config.num_hidden_layers)
    with torch.no_grad():
        full = model(
            input_ids=ids, attention_mask=attention_mask, pixel_values=inputs["pixel_values"],
            image_grid_thw=inputs["image_grid_thw"], cache=cache,
        ).logits
        start, end = ids.shape[1] - 8, ids.shape[1] - 3
        cache.set_window(start)
        window = model(
            input_ids=ids[:, start:end], attention_mask=attention_mask, position_ids=position_ids[..., start:end],
            cache=cache,
        ).logits
    torch.testing.assert_close(window, full[:, start:end], atol=1e-5, rtol=0)


def test_cache_buffers_keep_their_addresses_through_windows_and_refreshes(model, processor):
    """CUDA graphs replay a compiled window step only if the buffers it writes never move: they are marked static
    and every pass, full or windowed, writes into them in place; a refresh still leaves exactly fresh states."""
    inputs = encode(processor, ["A question?"])
    mask_id = model.config.mask_token_id
    ids = torch.cat([inputs["input_ids"], torch.full((1, 6), mask_id)], dim=1)
    refreshed_ids = ids.clone()
    refreshed_ids[:, -6:-3] = torch.tensor([17, 42, 99])
    positions, _ = model._rope_positions(ids, None, None)
    cache = DimpleDiffusionCache(model.config.num_hidden_layers)
    with torch.no_grad():
        model(input_ids=ids, position_ids=positions, cache=cache)
        addresses = [(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in cache.layers]
        cache.set_window(ids.shape[1] - 4)
        model(input_ids=ids[:, -4:], position_ids=positions[..., -4:], cache=cache)
        model(input_ids=refreshed_ids, position_ids=positions, cache=cache)
        fresh = DimpleDiffusionCache(model.config.num_hidden_layers)
        model(input_ids=refreshed_ids, position_ids=positions, cache=fresh)
    assert [(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in cache.layers] == addresses
    for layer, fresh_layer in zip(cache.layers, fresh.layers):
        assert layer.keys._dynamo_static_input_type and layer.values._dynamo_static_input_type
        assert torch.equal(layer.keys, fresh_layer.keys) and torch.equal(layer.values, fresh_layer.values)


@pytest.mark.parametrize("use_cache", [True, False])
def test_blocks_are_decoded_left_to_right(model, processor, use_cache):
    inputs = encode(processor, [("Describe it.", [picture(84, 56)])])
    prompt_len, answer_len, block = inputs["input_ids"].shape[1], 12, 4
    lengths, handle = record_input_lengths(model)
    try:
        out = model.generate(
            **inputs, max_new_tokens=answer_len, steps=6, block_length=block, alg_p_threshold=None,
            use_cache=use_cache, output_history=True, return_dict_in_generate=True,
        )
    finally:
        handle.remove()
    mask_id = model.config.mask_token_id
    before = torch.full((answer_len,), mask_id)
    active_blocks = []
    for snapshot in out.history:
        answer = snapshot[0, prompt_len:]
        changed = (answer != before).nonzero().flatten()
        assert changed.numel() > 0
        assert len({int(i) // block for i in changed}) == 1
        active_blocks.append(int(changed[0]) // block)
        before = answer
    assert active_blocks == sorted(active_blocks) and set(active_blocks) == {0, 1, 2}
    assert not (out.sequences == mask_id).any()
    assert len(lengths) == out.num_forward_passes == len(out.history)
    total = prompt_len + answer_len
    if use_cache:
        # one full pass (refresh) when a block starts, then the block and the position before it
        block_starts = [i for i, b in enumerate(active_blocks) if i == 0 or b != active_blocks[i - 1]]
        assert [i for i, n in enumerate(lengths) if n == total] == block_starts
        assert {n for n in lengths if n != total} <= {block + 1}
    else:
        assert set(lengths) == {total}


def test_one_step_per_block_needs_no_window_so_both_cache_modes_agree(model, processor):
    inputs = encode(processor, [("What is shown?", [picture(84, 56)])])
    settings = dict(max_new_tokens=12, steps=3, block_length=4, alg_p_threshold=None)
    cached = model.generate(**inputs, use_cache=True, **settings)
    uncached = model.generate(**inputs, use_cache=False, **settings)
    assert torch.equal(cached, uncached)


def test_blocks_without_masks_cost_no_forward_and_prior_tokens_stay(model, processor):
    inputs = encode(processor, ["Fill in the blanks."])
    mask_id = model.config.mask_token_id
    template = torch.tensor([30, 31, 32, 33, mask_id, mask_id, 34, mask_id])
    out = model.generate(
        **inputs, response_template=template, block_length=4, steps=4, alg_p_threshold=None,
        return_dict_in_generate=True,
    )
    answer = out.sequences[0, inputs["input_ids"].shape[1] :]
    fixed = template != mask_id
    assert torch.equal(answer[fixed], template[fixed])
    assert not (answer == mask_id).any()
    assert out.num_forward_passes <= 2
