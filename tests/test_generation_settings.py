"""Settings of `generate` that Dimple defines: the defaults take the fast path, the generation config
round-trips, bounds are accepted, and a setting outside its domain is refused with one clear error before any
forward pass. transformers' standard generation keywords are in tests/test_standard_generation_settings.py."""

import math

import pytest
import torch

from dimple import DimpleGenerationConfig
from prompts import encode, picture


# --- defaults and the generation config ------------------------------------------------------------------------


def test_bare_generate_runs_the_fast_path_deterministically(model, processor):
    inputs = encode(processor, [("Describe the cat.", [picture(56, 84, 0)])])
    first = model.generate(**inputs, max_new_tokens=12)
    again = model.generate(**inputs, max_new_tokens=12)
    assert first.shape == (1, inputs["input_ids"].shape[1] + 12)
    assert torch.equal(first, again)
    assert torch.equal(first[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    explicit = model.generate(
        **inputs, max_new_tokens=12, alg="maskgit_plus", alg_p_threshold=0.95, use_cache=True, temperature=0.0
    )
    assert torch.equal(first, explicit)
    assert not (first == model.config.mask_token_id).any()


def test_generation_config_round_trip(tmp_path):
    config = DimpleGenerationConfig(steps=8, alg="entropy", alg_p_threshold=None, temperature=0.0)
    config.save_pretrained(tmp_path)
    loaded = DimpleGenerationConfig.from_pretrained(tmp_path)
    assert (loaded.steps, loaded.alg, loaded.alg_p_threshold, loaded.use_cache) == (8, "entropy", None, True)


def test_model_config_generation_file_carries_only_token_ids(model, tmp_path):
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path)
    config = reloaded.generation_config
    assert isinstance(config, DimpleGenerationConfig)
    assert (config.alg_p_threshold, config.use_cache, config.alg) == (0.95, True, "maskgit_plus")
    assert config.pad_token_id == model.config.pad_token_id


# --- values refused before any forward pass --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alg": "foo"}, "Unknown alg 'foo'; choose one of origin"),
        ({"decoding_pipeline": "bar"}, "Unknown decoding_pipeline 'bar'"),
        ({"alg_p_threshold": 1.5}, r"alg_p_threshold must lie in \[0, 1\]"),
        ({"alg_p_threshold": -0.1}, r"alg_p_threshold must lie in \[0, 1\]"),
        ({"steps": 0}, "steps must be a positive integer"),
        ({"max_new_tokens": 0}, "max_new_tokens must be a positive integer"),
        ({"max_new_tokens": 5000}, "exceed the model's max_position_embeddings"),
        ({"output_history": True}, "needs return_dict_in_generate=True"),
        ({"temperature": -1.0}, "temperature must be >= 0"),
    ],
)
def test_invalid_settings_raise_before_any_forward(model, processor, kwargs, message):
    inputs = encode(processor, ["Hello."])
    calls = []
    handle = model.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(ValueError, match=message):
            model.generate(**inputs, **kwargs)
    finally:
        handle.remove()
    assert not calls


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_new_tokens": 2048},
        {"max_new_tokens": 10**12},  # refused before a canvas of this size is allocated
        {"max_length": 10**6},
        {"response_template": torch.full((2040,), 7)},
    ],
)
def test_prompt_plus_answer_above_the_model_positions(model, padded_batch, kwargs, no_forward):
    with pytest.raises(ValueError, match=r"exceed the model's max_position_embeddings \(2048\); shorten"):
        model.generate(**padded_batch, **kwargs)


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        (0, "steps must be a positive integer, got 0"),
        (-3, "steps must be a positive integer"),
        (2.5, "steps must be a positive integer, got 2.5"),
        (True, "steps must be a positive integer, got True"),
        (10**9, r"steps=1000000000 is more than any answer needs .*at most 10000"),
    ],
)
def test_steps_below_one_or_absurd(model, padded_batch, steps, message, no_forward):
    with pytest.raises(ValueError, match=message):
        model.generate(**padded_batch, steps=steps, max_new_tokens=4)


@pytest.mark.parametrize(
    ("threshold", "message"),
    [
        (-0.1, r"alg_p_threshold must lie in \[0, 1\]"),
        (1.5, r"alg_p_threshold must lie in \[0, 1\].*None or 0 to disable"),
        (math.nan, "alg_p_threshold must be a finite number"),
        ("0.9", "alg_p_threshold must be a finite number, got '0.9'"),
    ],
)
def test_threshold_outside_zero_one(model, padded_batch, threshold, message, no_forward):
    with pytest.raises(ValueError, match=message):
        model.generate(**padded_batch, alg_p_threshold=threshold, max_new_tokens=4)


@pytest.mark.parametrize("threshold", [0.0, 1.0])
def test_threshold_bounds_are_accepted(model, padded_batch, threshold):
    out = model.generate(**padded_batch, alg_p_threshold=threshold, max_new_tokens=4)
    assert not (out == model.config.mask_token_id).any()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": math.nan}, "temperature must be a finite number"),
        ({"temperature": math.inf}, "temperature must be a finite number"),
        ({"alg_temp": math.nan}, "alg_temp must be a finite number"),
        ({"top_p": math.nan}, "top_p must be a finite number"),
        ({"alg": "foo"}, "Unknown alg 'foo'; choose one of origin"),
        ({"decoding_pipeline": "bar"}, "Unknown decoding_pipeline 'bar'; choose one of dim, dream"),
    ],
)
def test_other_invalid_settings(model, padded_batch, kwargs, message, no_forward):
    with pytest.raises(ValueError, match=message):
        model.generate(**padded_batch, **kwargs)


@pytest.mark.parametrize("block_length", [0, -4, 2.5, True])
def test_block_length_must_be_a_positive_integer(model, processor, block_length):
    inputs = encode(processor, ["Hi."])
    with pytest.raises(ValueError, match="block_length"):
        model.generate(**inputs, max_new_tokens=8, block_length=block_length)


def test_hooks_refuse_multi_block_decoding(model, processor):
    inputs = encode(processor, ["Hi."])
    with pytest.raises(ValueError, match="block_length"):
        model.generate(
            **inputs, max_new_tokens=8, block_length=4,
            generation_tokens_hook_func=lambda step, x, logits: x,
        )


def test_absurd_num_return_sequences_is_refused_before_allocating(model, padded_batch, no_forward):
    with pytest.raises(ValueError, match=r"num_return_sequences=10000000 is above 1024"):
        model.generate(**padded_batch, num_return_sequences=10**7, max_new_tokens=4)


@pytest.mark.parametrize(
    ("mask_token_id", "message"),
    [
        ("pad", r"mask_token_id \(\d+\) equals pad_token_id"),
        (512, r"mask_token_id must be a token id inside the vocabulary \[0, 512\), got 512"),
        (-1, r"inside the vocabulary \[0, 512\), got -1"),
    ],
)
def test_mask_token_id_given_to_generate(model, padded_batch, mask_token_id, message, no_forward):
    mask = model.config.pad_token_id if mask_token_id == "pad" else mask_token_id
    with pytest.raises(ValueError, match=message):
        model.generate(**padded_batch, mask_token_id=mask, max_new_tokens=4)
