"""The compatibility seam (compat_dimple.py): one cache keyword across transformers releases, and no deprecation
warning from transformers on the paths users run."""

import warnings

import pytest
import torch
import transformers

from dimple.cache_dimple import prefix_cache
from dimple.compat_dimple import CACHE_ARG

RENAMED_CACHE = tuple(int(part) for part in transformers.__version__.split(".")[:2]) >= (5, 24)


def test_the_seam_names_the_cache_as_the_installed_transformers_does():
    """The name is read from transformers' signatures; it must agree with the release that made the rename."""
    assert CACHE_ARG == ("cache" if RENAMED_CACHE else "past_key_values")


def test_the_output_carries_the_cache_under_the_installed_name(model, image_inputs):
    cache = prefix_cache(model.config.num_hidden_layers, image_inputs["input_ids"].shape[1] - 1)
    with torch.no_grad():
        out = model(**image_inputs, cache=cache)
    assert out[CACHE_ARG] is cache
    assert out.rope_deltas is not None


def test_the_old_cache_keyword_gives_the_same_window_logits(model, image_inputs):
    """`past_key_values=` (every caller before 5.24) and `cache=` are one argument; the old name warns only where
    transformers itself has deprecated it."""
    prompt_len = image_inputs["input_ids"].shape[1]

    def window_logits(keyword: str) -> torch.Tensor:
        cache = prefix_cache(model.config.num_hidden_layers, prompt_len - 1)
        with torch.no_grad():
            first = model(**image_inputs, cache=cache)
            window = image_inputs["input_ids"][:, -1:]
            return model(input_ids=window, rope_deltas=first.rope_deltas, **{keyword: cache}).logits

    expected = window_logits("cache")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        legacy = window_logits("past_key_values")
    torch.testing.assert_close(legacy, expected, atol=0, rtol=0)
    renamed_warnings = [w for w in caught if issubclass(w.category, FutureWarning) and "cache" in str(w.message)]
    assert bool(renamed_warnings) == RENAMED_CACHE


def test_both_cache_keywords_at_once_are_refused(model, image_inputs):
    cache = prefix_cache(model.config.num_hidden_layers, image_inputs["input_ids"].shape[1] - 1)
    with pytest.raises((ValueError, TypeError), match="cache"):
        model(**image_inputs, cache=cache, past_key_values=cache)


@pytest.mark.parametrize("settings", [{}, {"use_cache": False}, {"block_length": 4}], ids=["prefix", "none", "dual"])
def test_generate_raises_no_transformers_deprecation(model, image_inputs, settings):
    """Every cache mode, with an image, under warnings-as-errors for deprecations from any module."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        out = model.generate(**image_inputs, max_new_tokens=8, **settings)
    assert out.shape == (1, image_inputs["input_ids"].shape[1] + 8)
