"""transformers' standard `generate` keywords (issue 13 item 3, issue 15 item 2): each is honoured as
transformers defines it, accepted when neutral, or refused by name, in keyword arguments and in a
`GenerationConfig` alike; none is silently ignored."""

import pytest
import torch
from transformers import GenerationConfig

from dimple.sampling_dimple import penalize_repetitions, token_presence
from prompts import encode, picture


NEUTRAL = dict(
    num_beams=1, repetition_penalty=1.0, min_new_tokens=0, output_scores=False, remove_invalid_values=False,
    length_penalty=1.0, early_stopping=False, num_beam_groups=1, temperature=None, top_p=None, top_k=None,
    do_sample=False, stop_strings=None, logits_processor=None, stopping_criteria=[], no_repeat_ngram_size=0,
    typical_p=1.0, diversity_penalty=0.0, output_attentions=False, output_logits=False,
)


def test_neutral_standard_settings_are_accepted_and_change_nothing(model, processor):
    inputs = encode(processor, [("Hello.", [picture(56, 56)])])
    expected = model.generate(**inputs, max_new_tokens=8)
    got = model.generate(**inputs, max_new_tokens=8, tokenizer=processor.tokenizer, **NEUTRAL)
    assert torch.equal(got, expected)
    config = GenerationConfig(num_beams=1, repetition_penalty=1.0, output_scores=False, max_new_tokens=8)
    assert torch.equal(model.generate(**inputs, generation_config=config), expected)


@pytest.mark.parametrize(
    "setting",
    [{"num_beams": 4}, {"typical_p": 0.5}, {"no_repeat_ngram_size": 2}, {"output_logits": True},
     {"penalty_alpha": 0.6}, {"num_beam_groups": 2}, {"length_penalty": 2.0}, {"forced_eos_token_id": 3}],
)
def test_unsupported_settings_are_refused_by_name_in_kwargs_and_in_configs(model, processor, setting):
    inputs = encode(processor, ["Hello."])
    name = next(iter(setting))
    with pytest.raises(ValueError, match=f"{name}=.* is not supported by Dimple's diffusion decoding"):
        model.generate(**inputs, **setting)
    with pytest.raises(ValueError, match=f"{name}=.* is not supported"):
        model.generate(**inputs, generation_config=GenerationConfig(**setting))


def test_unsupported_generate_arguments_and_multi_token_bad_words_are_refused(model, processor):
    inputs = encode(processor, ["Hello."])
    with pytest.raises(ValueError, match="logits_processor"):
        model.generate(**inputs, logits_processor=[lambda ids, scores: scores])
    with pytest.raises(ValueError, match="bad_words_ids .* have several tokens"):
        model.generate(**inputs, bad_words_ids=[[5, 6]])
    with pytest.raises(ValueError, match="stop_strings needs the tokenizer"):
        model.generate(**inputs, stop_strings=["."])


def favour(tokens_and_logits: dict[int, float]):
    """A logits hook that leaves only the given tokens with non-zero logits."""

    def hook(step, x, logits):
        logits = torch.zeros_like(logits)
        for token, value in tokens_and_logits.items():
            logits[..., token] = value
        return logits

    return hook


def test_suppress_tokens_and_single_token_bad_words_are_never_proposed(model, processor):
    inputs = encode(processor, ["Hello."])
    hook = favour({300: 5.0, 301: 4.0, 302: 3.0})
    answer = model.generate(**inputs, max_new_tokens=6, generation_logits_hook_func=hook)[0, -6:]
    assert set(answer.tolist()) == {300}
    banned = model.generate(
        **inputs, max_new_tokens=6, generation_logits_hook_func=hook, suppress_tokens=[300], bad_words_ids=[[301]]
    )[0, -6:]
    assert set(banned.tolist()) == {302}


def test_repetition_penalty_counts_prompt_and_committed_tokens(model, processor):
    inputs = encode(processor, ["Hello."])
    seen_token = int(inputs["input_ids"][0, -3])
    hook = favour({seen_token: 1.0, 300: 0.9})
    plain = model.generate(**inputs, max_new_tokens=4, generation_logits_hook_func=hook, alg_p_threshold=None)
    assert set(plain[0, -4:].tolist()) == {seen_token}
    penalized = model.generate(
        **inputs, max_new_tokens=4, generation_logits_hook_func=hook, alg_p_threshold=None, repetition_penalty=2.0
    )
    assert 300 in penalized[0, -4:].tolist()
    config = GenerationConfig(repetition_penalty=2.0, max_new_tokens=4, alg_p_threshold=None)
    from_config = model.generate(**inputs, generation_config=config, generation_logits_hook_func=hook)
    assert torch.equal(from_config, penalized)


def test_repetition_penalty_rule_is_ctrls():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = token_presence(torch.tensor([[0, 1, 7]]), torch.tensor([[True, True, False]]), vocab_size=3)
    assert seen.tolist() == [[True, True, False]]
    assert penalize_repetitions(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0]]


def test_min_new_tokens_keeps_the_stop_token_out_of_the_first_slots(model, processor):
    inputs = encode(processor, ["Hello."])
    stop = model.config.eos_token_id
    hook = favour({stop: 5.0, 300: 1.0})
    eager = model.generate(**inputs, max_new_tokens=6, generation_logits_hook_func=hook)[0, -6:]
    assert eager[0] == stop
    held = model.generate(**inputs, max_new_tokens=6, generation_logits_hook_func=hook, min_new_tokens=3)[0, -6:]
    assert stop not in held[:3].tolist() and held[3:].tolist() == [stop] * 3


def test_min_new_tokens_keeps_every_id_of_an_eos_list_out_of_the_first_slots(model, processor):
    """eos_token_id may be a list (as in transformers); each of its ids is a stop token, not just a lone int."""
    inputs = encode(processor, ["Hello."])
    other_stop = 300
    hook = favour({other_stop: 5.0, 301: 1.0})
    eos_list = [model.config.eos_token_id, other_stop]
    held = model.generate(
        **inputs, max_new_tokens=6, generation_logits_hook_func=hook, min_new_tokens=3, eos_token_id=eos_list
    )[0, -6:]
    assert other_stop not in held[:3].tolist() and held[3:].tolist() == [other_stop] * 3


def test_stop_strings_end_the_answer(model, processor):
    """Every slot after the token that completes the stop string becomes end-of-text; the stop string stays."""
    inputs = encode(processor, ["Answer."])
    tokenizer = processor.tokenizer
    word = tokenizer(" red", add_special_tokens=False)["input_ids"]
    assert len(word) == 1
    out = model.generate(
        **inputs, max_new_tokens=5, generation_logits_hook_func=favour({word[0]: 5.0}), stop_strings=["red"],
        tokenizer=tokenizer,
    )
    answer = out[0, inputs["input_ids"].shape[1]:]
    assert answer.tolist() == word + [model.config.pad_token_id] * 4
    assert processor.post_process_image_text_to_text(answer[None]) == [" red"]


def test_stop_strings_never_change_a_templates_fixed_tokens(model, processor):
    """A structure prior's fixed text is never changed (README): only the slots after the stop string end."""
    inputs = encode(processor, ["Answer."])
    tokenizer = processor.tokenizer
    mask = tokenizer.mask_token_id
    fixed = tokenizer(" is the answer", add_special_tokens=False)["input_ids"]
    template = torch.tensor([mask, mask] + fixed + [mask, mask])
    (red,) = tokenizer(" red", add_special_tokens=False)["input_ids"]
    out = model.generate(
        **inputs, response_template=template, generation_logits_hook_func=favour({red: 5.0}), stop_strings=["red"],
        tokenizer=tokenizer,
    )
    answer = out[0, inputs["input_ids"].shape[1]:].tolist()
    end = model.config.pad_token_id
    assert answer == [red, end] + fixed + [end, end]


def test_do_sample_without_temperature_samples_at_the_default_temperature(model, processor):
    inputs = encode(processor, ["Tell me a story."])
    torch.manual_seed(0)
    implicit = model.generate(**inputs, max_new_tokens=8, do_sample=True, temperature=None, alg="origin")
    torch.manual_seed(0)
    explicit = model.generate(**inputs, max_new_tokens=8, temperature=1.0, alg="origin")
    assert torch.equal(implicit, explicit)
    with pytest.raises(ValueError, match="do_sample=True asks for sampling but temperature=0"):
        model.generate(**inputs, do_sample=True, temperature=0.0)
