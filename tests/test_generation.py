"""Behaviour of diffusion generate() beyond reference parity: defaults, batches, priors, hooks, streaming, errors."""

import pytest
import torch
from PIL import Image
from transformers import TextIteratorStreamer

from dimple import DimpleGenerationConfig
from prompts import chat, picture


def encode(processor, prompts: list[tuple[str, list[Image.Image]]]):
    texts = [processor.apply_chat_template(chat(text, len(imgs)), add_generation_prompt=True) for text, imgs in prompts]
    images = [image for _, imgs in prompts for image in imgs] or None
    return processor(text=texts, images=images, padding="longest", return_tensors="pt")


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


def test_padded_batch_with_images_equals_each_prompt_alone(model, processor):
    prompts = [
        ("What colour is the car in the image?", [picture(84, 56, 1)]),
        ("Hi.", []),
        ("Compare the two pictures please.", [picture(56, 56, 2), picture(112, 56, 3)]),
    ]
    batch = encode(processor, prompts)
    assert (batch["attention_mask"][:, 0] == 0).any()
    for use_cache in (True, False):
        out = model.generate(**batch, max_new_tokens=10, use_cache=use_cache, alg_p_threshold=0.3)
        for row, prompt in enumerate(prompts):
            alone = encode(processor, [prompt])
            solo = model.generate(**alone, max_new_tokens=10, use_cache=use_cache, alg_p_threshold=0.3)
            assert torch.equal(out[row, -10:], solo[0, -10:])


def test_num_return_sequences_with_images(model, processor):
    inputs = encode(processor, [("Describe it.", [picture(56, 56, 4)])])
    torch.manual_seed(0)
    out = model.generate(**inputs, max_new_tokens=6, num_return_sequences=3, temperature=1.0, do_sample=True)
    assert out.shape[0] == 3


def test_sampling_is_reproducible_under_a_seed(model, processor):
    inputs = encode(processor, [("Tell me a story.", [])])
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(model.generate(**inputs, max_new_tokens=12, temperature=0.8, top_p=0.9, alg="origin"))
    assert torch.equal(runs[0], runs[1])


def test_output_reports_history_and_forward_passes(model, processor):
    inputs = encode(processor, [("Count to five.", [])])
    out = model.generate(**inputs, max_new_tokens=8, return_dict_in_generate=True, output_history=True, alg_p_threshold=None)
    assert out.num_forward_passes == len(out.history)
    assert torch.equal(out.history[-1], out.sequences)
    masks = [int((h[:, -8:] == model.config.mask_token_id).sum()) for h in out.history]
    assert masks == sorted(masks, reverse=True) and masks[-1] == 0
    assert float(out.tokens_per_forward[0]) == pytest.approx(8 / out.num_forward_passes)


def test_response_template_keeps_fixed_tokens_and_fills_slots(model, processor):
    inputs = encode(processor, [("Answer in the given format.", [])])
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


def test_hooks_receive_documented_arguments(model, processor):
    inputs = encode(processor, [("Hello there.", [])])
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
    inputs = encode(processor, [("Hello.", [])])

    def bad_hook(step, x, logits):
        x = x.clone()
        x[:, 0] = 1
        return x

    with pytest.raises(ValueError, match="prompt"):
        model.generate(**inputs, max_new_tokens=4, generation_tokens_hook_func=bad_hook)


def test_streamers_receive_final_text_and_every_draft(model, processor):
    inputs = encode(processor, [("Stream this.", [])])
    text_streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True)
    out = model.generate(**inputs, max_new_tokens=8, streamer=text_streamer, alg_p_threshold=None)
    streamed = "".join(text_streamer)
    answer = out[0, inputs["input_ids"].shape[1] :]
    stops = torch.isin(answer, torch.tensor([processor.tokenizer.pad_token_id]))
    cut = int(stops.int().argmax()) if stops.any() else answer.shape[0]
    assert streamed == processor.tokenizer.decode(answer[:cut])

    class Drafts:
        def __init__(self):
            self.drafts = []

        def put_draft(self, value):
            self.drafts.append(value.clone())

        def put(self, value):
            pass

        def end(self):
            pass

    drafts = Drafts()
    out = model.generate(**inputs, max_new_tokens=8, streamer=drafts, return_dict_in_generate=True, output_history=True)
    assert len(drafts.drafts) == out.num_forward_passes
    assert torch.equal(drafts.drafts[-1], out.sequences[:, -8:])


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
    inputs = encode(processor, [("Hello.", [])])
    calls = []
    handle = model.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(ValueError, match=message):
            model.generate(**inputs, **kwargs)
    finally:
        handle.remove()
    assert not calls


def test_prompt_errors(model, processor):
    inputs = encode(processor, [("Hello.", []), ("A longer prompt here.", [])])
    right_padded = inputs["attention_mask"].flip(1)
    with pytest.raises(ValueError, match="right-padded"):
        model.generate(input_ids=inputs["input_ids"], attention_mask=right_padded)
    with_mask = inputs["input_ids"].clone()
    with_mask[0, -1] = model.config.mask_token_id
    with pytest.raises(ValueError, match="contains the mask token"):
        model.generate(input_ids=with_mask, attention_mask=inputs["attention_mask"])
    with pytest.raises(TypeError, match="unexpected keyword arguments"):
        model.generate(**inputs, not_a_setting=3)


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


def test_mask_and_vision_tokens_are_never_committed(model, processor):
    inputs = encode(processor, [("Hello.", [])])
    config = model.config
    banned = [config.mask_token_id, config.image_token_id, config.video_token_id, config.vision_start_token_id,
              config.vision_end_token_id, config.vision_token_id]

    def favour_banned(step, x, logits):
        logits = logits.clone()
        logits[..., banned] = logits.max() + 100.0
        return logits

    out = model.generate(**inputs, max_new_tokens=8, generation_logits_hook_func=favour_banned)
    assert not torch.isin(out[0, -8:], torch.tensor(banned)).any()


def test_decoded_answers_stop_at_the_first_end_of_text(processor):
    tokenizer = processor.tokenizer
    end = tokenizer.pad_token_id
    hello, bye = (tokenizer(word, add_special_tokens=False)["input_ids"] for word in ("Hello", " bye"))
    rows = torch.tensor([[end, end] + hello + [end] + bye, hello + bye + [end, end, end]])
    assert processor.post_process_image_text_to_text(rows) == ["Hello", "Hello bye"]


def test_text_template_with_mask_slots_gives_a_json_skeleton(model, processor):
    inputs = encode(processor, [("Describe the car as JSON.", [])])
    text = '{"colour": "<|mask|><|mask|>", "count": <|mask|>}<|endoftext|><|endoftext|>'
    template = processor.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    assert int((template == processor.tokenizer.mask_token_id).sum()) == 3
    out = model.generate(**inputs, response_template=template)
    answer = out[0, inputs["input_ids"].shape[1] :]
    fixed = template != processor.tokenizer.mask_token_id
    assert torch.equal(answer[fixed], template[fixed])
    decoded = processor.post_process_image_text_to_text(answer[None])[0]
    assert decoded.startswith('{"colour": "') and '", "count": ' in decoded and decoded.endswith("}")
