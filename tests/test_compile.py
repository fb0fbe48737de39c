"""`compile_forward=True` runs each step through torch.compile and must not change a single token."""

import pytest
import torch
from transformers import CompileConfig

from prompts import encode


@pytest.fixture(scope="module")
def inputs(processor):
    return encode(processor, ["Hello there.", "What is the answer to this question?"])


@pytest.mark.parametrize(
    "settings",
    [dict(use_cache=True), dict(use_cache=False), dict(use_cache=True, block_length=4)],
    ids=["prefix-cache", "no-cache", "dual-cache"],
)
def test_dynamo_captured_steps_give_the_same_tokens(model, inputs, settings):
    settings = dict(max_new_tokens=12, alg_p_threshold=0.3, **settings)
    eager = model.generate(**inputs, **settings)
    compiled = model.generate(
        **inputs, compile_forward=True, compile_config=CompileConfig(backend="eager", mode=None), **settings
    )
    assert torch.equal(compiled, eager)


def test_inductor_compiled_steps_give_the_same_tokens(model, inputs):
    """The real compiler on CPU (C++ kernels): same tokens, and the compiled forward is built once."""
    unpadded = {key: value[1:] for key, value in inputs.items()}
    settings = dict(max_new_tokens=12, alg_p_threshold=0.3)
    eager = model.generate(**unpadded, **settings)
    first = model.generate(**unpadded, compile_forward=True, **settings)
    built = model._compiled_call
    again = model.generate(**unpadded, compile_forward=True, **settings)
    assert torch.equal(first, eager) and torch.equal(again, eager)
    assert model._compiled_call is built


def test_compile_config_must_be_a_compile_config(model, inputs):
    with pytest.raises(ValueError, match="CompileConfig"):
        model.generate(**inputs, max_new_tokens=4, compile_forward=True, compile_config="max-autotune")
