"""Settings one step off the happy path (issue 25): how a passed `generation_config` combines with the model's, what
`steps` bounds across blocks, and settings that would change nothing or waste compute, refused by name before any
forward pass (or honoured as transformers defines them)."""

import pytest
import torch
from transformers import GenerationConfig, TextIteratorStreamer

from dimple import DimpleGenerationConfig
from prompts import encode


@pytest.fixture
def prompt(processor):
    """One short text prompt."""
    return encode(processor, ["Hello."])


@pytest.fixture
def checkpoint_settings(model):
    """The model's generation config says 12 slots in at most 3 steps (as a generation_config.json can); undone
    after the test."""
    saved = model.generation_config
    model.generation_config = DimpleGenerationConfig.from_loaded(saved)  # as from_pretrained makes it
    model.generation_config.update(max_new_tokens=12, steps=3)
    yield model.generation_config
    model.generation_config = saved


def answer_len(out: torch.Tensor, inputs) -> int:
    return out.shape[1] - inputs["input_ids"].shape[1]


@pytest.mark.parametrize("config_class", [GenerationConfig, DimpleGenerationConfig])
def test_a_passed_generation_config_fills_its_gaps_from_the_models(model, prompt, checkpoint_settings, config_class):
    """As transformers' GenerationMixin: the fields a passed config leaves unset come from model.generation_config."""
    out = model.generate(**prompt, generation_config=config_class(top_k=5), return_dict_in_generate=True)
    assert answer_len(out.sequences, prompt) == 12
    assert out.num_forward_passes <= 3
    # What the passed config sets wins over the model's; keywords win over both.
    assert answer_len(model.generate(**prompt, generation_config=config_class(max_new_tokens=5)), prompt) == 5
    got = model.generate(**prompt, generation_config=config_class(max_new_tokens=5), max_new_tokens=4)
    assert answer_len(got, prompt) == 4
    # A field given explicitly is set even at Dimple's default value (64), as a server's request builds it.
    assert answer_len(model.generate(**prompt, generation_config=config_class(max_new_tokens=64)), prompt) == 64
    assigned = config_class()
    assigned.max_new_tokens = 64
    assert answer_len(model.generate(**prompt, generation_config=assigned), prompt) == 64


@pytest.mark.parametrize("config_class", [GenerationConfig, DimpleGenerationConfig])
def test_max_length_in_a_passed_config_sets_the_total_length(model, prompt, checkpoint_settings, config_class):
    total = prompt["input_ids"].shape[1] + 7
    assert model.generate(**prompt, generation_config=config_class(max_length=total)).shape[1] == total
    assert model.generate(**prompt, max_length=total).shape[1] == total


def test_max_new_tokens_none_falls_back_to_max_length_or_the_default(model, prompt):
    total = prompt["input_ids"].shape[1] + 5
    assert model.generate(**prompt, max_new_tokens=None, max_length=total).shape[1] == total
    config = DimpleGenerationConfig(max_length=total, max_new_tokens=None)
    assert model.generate(**prompt, generation_config=config).shape[1] == total
    assert answer_len(model.generate(**prompt, max_new_tokens=None, steps=4), prompt) == 64
    with pytest.raises(ValueError, match="max_length must be a positive integer, got 0"):
        model.generate(**prompt, max_new_tokens=None, max_length=0)


def test_steps_bound_the_forward_passes_across_blocks(model, prompt):
    """`steps` is the most forward passes in total: 5 over four blocks of 3 under `dream` (which spends every step)
    is 5 passes, not ceil(5 / 4) per block."""
    out = model.generate(
        **prompt, max_new_tokens=12, block_length=3, steps=5, decoding_pipeline="dream", return_dict_in_generate=True
    )
    assert out.num_forward_passes == 5
    assert not (out.sequences == model.config.mask_token_id).any()


def test_steps_are_shared_by_block_size(model, prompt, caplog):
    """12 slots in blocks of 5, 5 and 2 under `autoregressive` (one token per step): the default steps (the answer
    length) give each block one step per slot, so every slot is filled and nothing warns."""
    out = model.generate(
        **prompt, max_new_tokens=12, block_length=5, alg="autoregressive", alg_p_threshold=None,
        return_dict_in_generate=True,
    )
    assert out.num_forward_passes == 12
    assert not (out.sequences == model.config.mask_token_id).any()
    assert "still in the answer" not in caplog.text


def test_fewer_steps_than_blocks_is_refused(model, prompt, no_forward):
    with pytest.raises(ValueError, match="steps=2 is fewer than the 4 blocks"):
        model.generate(**prompt, max_new_tokens=12, block_length=3, steps=2)


def test_an_explicit_do_sample_false_decodes_greedily_whatever_the_temperature(model, prompt):
    greedy = model.generate(**prompt, max_new_tokens=8)
    for seed in range(3):
        torch.manual_seed(seed)
        assert torch.equal(model.generate(**prompt, max_new_tokens=8, do_sample=False, temperature=5.0), greedy)
        torch.manual_seed(seed)
        config = GenerationConfig(do_sample=False, temperature=5.0, max_new_tokens=8)
        assert torch.equal(model.generate(**prompt, generation_config=config), greedy)
    # A temperature alone still samples (the reference's convention), so the rule above is not vacuous.
    sampled = set()
    for seed in range(3):
        torch.manual_seed(seed)
        sampled.add(tuple(model.generate(**prompt, max_new_tokens=8, temperature=5.0)[0].tolist()))
    assert len(sampled) > 1


def test_greedy_decoding_with_several_return_sequences_is_refused(model, padded_batch, no_forward):
    with pytest.raises(ValueError, match="num_return_sequences=3 with greedy decoding would return identical"):
        model.generate(**padded_batch, max_new_tokens=4, num_return_sequences=3)
    with pytest.raises(ValueError, match="num_return_sequences=2 with greedy decoding"):
        model.generate(**padded_batch, max_new_tokens=4, num_return_sequences=2, do_sample=False, temperature=0.7)


def test_greedy_tokens_in_a_random_order_may_return_several_sequences(model, prompt):
    out = model.generate(**prompt, max_new_tokens=4, num_return_sequences=2, alg="origin", alg_p_threshold=None)
    assert out.shape[0] == 2


@pytest.mark.parametrize(
    "settings, reason",
    [
        (dict(decoding_pipeline="dream", alg_p_threshold=0.9), "the 'dream' pipeline follows its linear schedule"),
        (dict(alg="entropy", alg_p_threshold=0.5), "alg='entropy' ranks by negative entropy"),
    ],
)
def test_a_threshold_that_cannot_act_is_refused_by_name(model, padded_batch, no_forward, settings, reason):
    message = rf"alg_p_threshold={settings['alg_p_threshold']} has no effect here: {reason}"
    with pytest.raises(ValueError, match=message):
        model.generate(**padded_batch, max_new_tokens=4, **settings)
    with pytest.raises(ValueError, match=message):
        model.generate(**padded_batch, generation_config=GenerationConfig(max_new_tokens=4, **settings))
    with pytest.raises(ValueError, match=message):
        DimpleGenerationConfig(**settings)


def test_the_default_threshold_steps_aside_where_it_cannot_act(model, prompt):
    """The default 0.95 was never chosen: `dream` and `entropy` decode without it, with no error."""
    dream = model.generate(**prompt, max_new_tokens=6, decoding_pipeline="dream")
    unset = model.generate(**prompt, max_new_tokens=6, decoding_pipeline="dream", alg_p_threshold=None)
    assert torch.equal(dream, unset)
    assert DimpleGenerationConfig(alg="entropy").alg_p_threshold is None


def test_an_empty_stop_string_is_refused_like_a_list_holding_one(model, prompt, processor, no_forward):
    for stops in ("", [""]):
        with pytest.raises(ValueError, match="stop_strings must be a string or a list of non-empty strings"):
            model.generate(**prompt, max_new_tokens=4, stop_strings=stops, tokenizer=processor.tokenizer)
        with pytest.raises(ValueError, match="stop_strings must be"):
            DimpleGenerationConfig(stop_strings=stops)


def test_compile_config_is_accepted_as_a_dict_of_its_fields(model, prompt):
    expected = model.generate(**prompt, max_new_tokens=4)
    assert torch.equal(model.generate(**prompt, max_new_tokens=4, compile_config={"fullgraph": False}), expected)
    config = DimpleGenerationConfig()
    config.update(compile_config={"fullgraph": True, "dynamic": True})
    assert (config.compile_config.fullgraph, config.compile_config.dynamic) == (True, True)


def test_top_k_zero_is_no_top_k_filter(model, prompt):
    """transformers' meaning of top_k=0: off."""

    def sampled(**top_k) -> torch.Tensor:
        torch.manual_seed(3)
        return model.generate(**prompt, max_new_tokens=8, temperature=1.0, **top_k)

    assert torch.equal(sampled(top_k=0), sampled())


def test_templates_of_any_integer_width_and_a_single_row_serve_a_batch(model, processor, padded_batch):
    tokenizer = processor.tokenizer
    ids = tokenizer("The answer is", add_special_tokens=False)["input_ids"] + [tokenizer.mask_token_id] * 3
    expected = model.generate(**padded_batch, response_template=torch.tensor(ids))
    assert torch.equal(model.generate(**padded_batch, response_template=torch.tensor(ids, dtype=torch.int32)), expected)
    assert torch.equal(model.generate(**padded_batch, response_template=torch.tensor([ids])), expected)
    with pytest.raises(TypeError, match="response_template must hold integer token ids, got dtype torch.float32"):
        model.generate(**padded_batch, response_template=torch.tensor(ids, dtype=torch.float32))


def test_a_streamer_with_several_answers_is_refused_before_the_first_step(model, prompt, processor, no_forward):
    streamer = TextIteratorStreamer(processor.tokenizer, timeout=1)
    with pytest.raises(ValueError, match="A streamer follows a single answer, but this call makes 2 per prompt"):
        model.generate(**prompt, max_new_tokens=4, num_return_sequences=2, do_sample=True, streamer=streamer)
    assert streamer.text_queue.empty()
