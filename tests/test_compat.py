"""The compatibility seam (compat_dimple.py): one cache keyword across transformers releases, and no deprecation
warning from transformers on the paths users run."""

import warnings

import pytest
import torch
import transformers

from dimple.cache_dimple import prefix_cache
from dimple.compat_dimple import CACHE_ARG
from prompts import picture, chat

RENAMED_CACHE = tuple(int(part) for part in transformers.__version__.split(".")[:2]) >= (5, 24)


def image_inputs(processor):
    prompt = processor.apply_chat_template(chat("What is in the picture?", images=1), add_generation_prompt=True)
    return processor(text=[prompt], images=[picture(56, 84)], return_tensors="pt")


def test_the_seam_names_the_cache_as_the_installed_transformers_does():
    """The name is read from transformers' signatures; it must agree with the release that made the rename."""
    assert CACHE_ARG == ("cache" if RENAMED_CACHE else "past_key_values")


def test_the_output_carries_the_cache_under_the_installed_name(model, processor):
    inputs = image_inputs(processor)
    cache = prefix_cache(model.config.num_hidden_layers, inputs["input_ids"].shape[1] - 1)
    with torch.no_grad():
        out = model(**inputs, cache=cache)
    assert out[CACHE_ARG] is cache
    assert out.rope_deltas is not None


def test_the_old_cache_keyword_gives_the_same_window_logits(model, processor):
    """`past_key_values=` (every caller before 5.24) and `cache=` are one argument; the old name warns only where
    transformers itself has deprecated it."""
    inputs = image_inputs(processor)
    prompt_len = inputs["input_ids"].shape[1]

    def window_logits(keyword: str) -> torch.Tensor:
        cache = prefix_cache(model.config.num_hidden_layers, prompt_len - 1)
        with torch.no_grad():
            first = model(**inputs, cache=cache)
            window = inputs["input_ids"][:, -1:]
            return model(input_ids=window, rope_deltas=first.rope_deltas, **{keyword: cache}).logits

    expected = window_logits("cache")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        legacy = window_logits("past_key_values")
    torch.testing.assert_close(legacy, expected, atol=0, rtol=0)
    renamed_warnings = [w for w in caught if issubclass(w.category, FutureWarning) and "cache" in str(w.message)]
    assert bool(renamed_warnings) == RENAMED_CACHE


def test_both_cache_keywords_at_once_are_refused(model, processor):
    inputs = image_inputs(processor)
    cache = prefix_cache(model.config.num_hidden_layers, inputs["input_ids"].shape[1] - 1)
    with pytest.raises((ValueError, TypeError), match="cache"):
        model(**inputs, cache=cache, past_key_values=cache)


@pytest.mark.parametrize("settings", [{}, {"use_cache": False}, {"block_length": 4}], ids=["prefix", "none", "dual"])
def test_generate_raises_no_transformers_deprecation(model, processor, settings):
    """Every cache mode, with an image, under warnings-as-errors for deprecations from any module."""
    inputs = image_inputs(processor)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        out = model.generate(**inputs, max_new_tokens=8, **settings)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 8)
