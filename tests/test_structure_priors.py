"""Steering the decoding: a `response_template` keeps its fixed tokens and fills its mask slots, and the tokens
and logits hooks receive the documented arguments. A template or hook that would break the prompt or the canvas is
refused."""

import pytest
import torch

from prompts import encode


# --- response templates ----------------------------------------------------------------------------------------


def test_response_template_keeps_fixed_tokens_and_fills_slots(model, processor):
    inputs = encode(processor, ["Answer in the given format."])
    tokenizer = processor.tokenizer
    mask = tokenizer.mask_token_id
    fixed = tokenizer("The answer is", add_special_tokens=False)["input_ids"]
    end = tokenizer(".", add_special_tokens=False)["input_ids"]
    template = torch.tensor(fixed + [mask, mask, mask] + end + [tokenizer.pad_token_id] * 2)
    out = model.generate(**inputs, response_template=template, return_dict_in_generate=True, output_history=True)
    answer = out.sequences[0, inputs["input_ids"].shape[1] :]
    assert answer.shape[0] == template.shape[0]
    fixed_positions = template != mask
    for snapshot in out.history:
        assert torch.equal(snapshot[0, -template.shape[0] :][fixed_positions], template[fixed_positions])
    assert not (answer == mask).any()
    assert out.tokens_per_forward[0] * out.num_forward_passes == 3


def test_text_template_with_mask_slots_gives_a_json_skeleton(model, processor):
    inputs = encode(processor, ["Describe the car as JSON."])
    text = '{"colour": "<|mask|><|mask|>", "count": <|mask|>}<|endoftext|><|endoftext|>'
    template = processor.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    assert int((template == processor.tokenizer.mask_token_id).sum()) == 3
    out = model.generate(**inputs, response_template=template)
    answer = out[0, inputs["input_ids"].shape[1] :]
    fixed = template != processor.tokenizer.mask_token_id
    assert torch.equal(answer[fixed], template[fixed])
    decoded = processor.post_process_image_text_to_text(answer[None])[0]
    assert decoded.startswith('{"colour": "') and '", "count": ' in decoded and decoded.endswith("}")


def test_response_template_with_vision_or_unknown_tokens(model, padded_batch, no_forward):
    mask = model.config.mask_token_id
    with pytest.raises(ValueError, match="response_template contains vision tokens"):
        model.generate(**padded_batch, response_template=torch.tensor([mask, model.config.image_token_id]))
    with pytest.raises(ValueError, match=r"response_template holds ids outside the model's vocabulary"):
        model.generate(**padded_batch, response_template=torch.tensor([mask, 99999]))


# --- hooks -----------------------------------------------------------------------------------------------------


def test_hooks_receive_documented_arguments(model, processor):
    inputs = encode(processor, ["Hello there."])
    prompt_len, answer_len = inputs["input_ids"].shape[1], 6
    calls = []

    def tokens_hook(step, x, logits):
        calls.append(("tokens", step, tuple(x.shape), None if logits is None else tuple(logits.shape)))
        return x

    def logits_hook(step, x, logits):
        calls.append(("logits", step, tuple(x.shape), tuple(logits.shape)))
        return logits

    model.generate(
        **inputs, max_new_tokens=answer_len, alg_p_threshold=None, use_cache=True,
        generation_tokens_hook_func=tokens_hook, generation_logits_hook_func=logits_hook,
    )
    vocab, total = model.config.vocab_size, prompt_len + answer_len
    assert calls[0] == ("tokens", None, (1, total), None)
    assert calls[1] == ("logits", 0, (1, total), (1, total, vocab))
    assert calls[3] == ("logits", 1, (1, answer_len + 1), (1, answer_len + 1, vocab))


def test_tokens_hook_that_changes_the_prompt_is_refused(model, processor):
    inputs = encode(processor, ["Hello."])

    def bad_hook(step, x, logits):
        x = x.clone()
        x[:, 0] = 1
        return x

    with pytest.raises(ValueError, match="prompt"):
        model.generate(**inputs, max_new_tokens=4, generation_tokens_hook_func=bad_hook)


def shorter(step, x, logits):
    return x[:, :-1]


def rewrites_prompt(step, x, logits):
    x = x.clone()
    x[:, 0] = 5
    return x


@pytest.mark.parametrize(
    ("hook_name", "hook", "message"),
    [
        ("generation_tokens_hook_func", shorter, r"tokens_hook_func must return a tensor of shape \(2, \d+\)"),
        ("generation_tokens_hook_func", lambda s, x, l: None, "tokens_hook_func must return a tensor of shape"),
        ("generation_tokens_hook_func", rewrites_prompt, "changed prompt tokens; it may only change answer"),
        ("generation_logits_hook_func", lambda s, x, l: l[:, 1:], r"must return logits of shape \(2, \d+, 512\)"),
        ("generation_logits_hook_func", lambda s, x, l: None, "return the .modified. logits it was given"),
    ],
)
def test_hooks_with_wrong_shape_or_that_modify_the_prompt(model, padded_batch, hook_name, hook, message):
    with pytest.raises(ValueError, match=message):
        model.generate(**padded_batch, max_new_tokens=4, **{hook_name: hook})
