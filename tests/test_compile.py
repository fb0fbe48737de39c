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


def test_one_compiled_step_serves_every_block_and_prompt_length(model, processor):
    """Issue 25 item 14: the window's start and the request's lengths are not baked into the graph. Twelve blocks
    used to compile one graph each (the window start was a guarded int) until dynamo's recompile limit (8) sent the
    rest eagerly, and every new prompt length compiled again. `dynamic=False` (transformers' CompileConfig default
    before 5.24) turns off dynamo's automatic dynamic shapes, so only what the step marks as varying varies."""
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    config = CompileConfig(backend=counting_backend, mode=None, dynamic=False)
    settings = dict(max_new_tokens=24, block_length=2, use_cache=True, alg_p_threshold=0.3)
    torch._dynamo.reset()
    for text in ("Hi.", "Hello there, my friend.", "What is the answer to this question, please?"):
        inputs = encode(processor, [text])
        eager = model.generate(**inputs, **settings)
        compiled = model.generate(**inputs, compile_forward=True, compile_config=config, **settings)
        assert torch.equal(compiled, eager)
    assert len(graphs) == 1
