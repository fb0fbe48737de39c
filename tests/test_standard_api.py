"""transformers' standard calling conventions: what generic tooling passes to forward, get_image_features, generate,
the processor and the config is honoured or refused with a clear error, never silently ignored (issues 13 and 15)."""

import inspect
import textwrap

import pytest
import torch
from transformers import GenerationConfig
from transformers.modeling_outputs import BaseModelOutputWithPooling

from dimple import DimpleConfig, DimpleModel
from dimple.generation_utils import penalize_repetitions, token_presence
from dimple.tiny_checkpoint import BUNDLED_CHECKPOINT, stale_remote_code
from isolated import run_without_dimple
from prompts import chat, picture


def encode(processor, text: str, images: int = 0):
    prompt = processor.apply_chat_template(chat(text, images), add_generation_prompt=True)
    pictures = [picture(56 + 28 * i, 56, i) for i in range(images)] or None
    return processor(text=[prompt], images=pictures, return_tensors="pt")


def merged_embeddings(model, inputs) -> torch.Tensor:
    """The prompt's embeddings with the image features written in, as a caller merging images would build them."""
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    features = torch.cat(model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output)
    image_rows = (inputs["input_ids"] == model.config.image_token_id)[..., None]
    return embeds.masked_scatter(image_rows, features)


# --- forward with inputs_embeds (issue 13 item 1) ------------------------------------------------------------------


@torch.no_grad()
def test_forward_with_inputs_embeds_merges_the_images(model, processor):
    inputs = encode(processor, "What is in the pictures?", images=2)
    expected = model(**inputs).logits
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    vision = {key: inputs[key] for key in ("pixel_values", "image_grid_thw", "attention_mask")}
    text_only = model(input_ids=inputs["input_ids"].masked_fill(inputs["mm_token_type_ids"] == 1, 0)).logits
    for placeholders in (
        {"mm_token_type_ids": inputs["mm_token_type_ids"]},  # as Qwen2.5-VL finds them
        {"input_ids": inputs["input_ids"]},  # both passed
        {},  # the rows that hold the image-pad token's embedding
    ):
        got = model(inputs_embeds=embeds, **vision, **placeholders).logits
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    positions, _ = model.get_rope_index(inputs["input_ids"], inputs["image_grid_thw"], inputs["attention_mask"])
    with_positions = model(inputs_embeds=embeds, position_ids=positions, **vision).logits
    torch.testing.assert_close(with_positions, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(with_positions, text_only, atol=1e-3)


@torch.no_grad()
def test_forward_refuses_pixels_it_cannot_place(model, processor):
    inputs = encode(processor, "Describe it.", images=1)
    merged = merged_embeddings(model, inputs)  # no image-pad embedding left to find
    with pytest.raises(ValueError, match="the text holds 0 image tokens but the images give"):
        model(inputs_embeds=merged, pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
    with pytest.raises(ValueError, match="M-RoPE positions are unknown"):
        model(input_ids=inputs["input_ids"], inputs_embeds=merged)
    expected = model(**inputs).logits
    got = model(input_ids=inputs["input_ids"], inputs_embeds=merged, image_grid_thw=inputs["image_grid_thw"]).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


# --- get_image_features (item 2) -----------------------------------------------------------------------------------


@torch.no_grad()
def test_get_image_features_follows_the_vision_language_contract(model, processor):
    inputs = encode(processor, "Compare.", images=2)
    out = model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], output_hidden_states=True)
    assert isinstance(out, BaseModelOutputWithPooling)
    tokens = (inputs["image_grid_thw"].prod(-1) // 4).tolist()
    assert [tuple(f.shape) for f in out.pooler_output] == [(n, model.config.hidden_size) for n in tokens]
    assert out.last_hidden_state.shape[0] == inputs["pixel_values"].shape[0]
    assert len(out.hidden_states) == model.config.vision_config.depth + 1
    as_tuple = model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=False)
    assert isinstance(as_tuple, tuple)
    merged = merged_embeddings(model, inputs)
    image_rows = inputs["input_ids"] == model.config.image_token_id
    torch.testing.assert_close(merged[image_rows], torch.cat(out.pooler_output))


# --- generate() settings (item 3; issue 15 item 2) -----------------------------------------------------------------

NEUTRAL = dict(
    num_beams=1, repetition_penalty=1.0, min_new_tokens=0, output_scores=False, remove_invalid_values=False,
    length_penalty=1.0, early_stopping=False, num_beam_groups=1, temperature=None, top_p=None, top_k=None,
    do_sample=False, stop_strings=None, logits_processor=None, stopping_criteria=[], no_repeat_ngram_size=0,
    typical_p=1.0, diversity_penalty=0.0, output_attentions=False, output_logits=False,
)


def test_neutral_standard_settings_are_accepted_and_change_nothing(model, processor):
    inputs = encode(processor, "Hello.", images=1)
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
    inputs = encode(processor, "Hello.")
    name = next(iter(setting))
    with pytest.raises(ValueError, match=f"{name}=.* is not supported by Dimple's diffusion decoding"):
        model.generate(**inputs, **setting)
    with pytest.raises(ValueError, match=f"{name}=.* is not supported"):
        model.generate(**inputs, generation_config=GenerationConfig(**setting))


def test_unsupported_generate_arguments_and_multi_token_bad_words_are_refused(model, processor):
    inputs = encode(processor, "Hello.")
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
    inputs = encode(processor, "Hello.")
    hook = favour({300: 5.0, 301: 4.0, 302: 3.0})
    answer = model.generate(**inputs, max_new_tokens=6, generation_logits_hook_func=hook)[0, -6:]
    assert set(answer.tolist()) == {300}
    banned = model.generate(
        **inputs, max_new_tokens=6, generation_logits_hook_func=hook, suppress_tokens=[300], bad_words_ids=[[301]]
    )[0, -6:]
    assert set(banned.tolist()) == {302}


def test_repetition_penalty_counts_prompt_and_committed_tokens(model, processor):
    inputs = encode(processor, "Hello.")
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
    inputs = encode(processor, "Hello.")
    stop = model.config.eos_token_id
    hook = favour({stop: 5.0, 300: 1.0})
    eager = model.generate(**inputs, max_new_tokens=6, generation_logits_hook_func=hook)[0, -6:]
    assert eager[0] == stop
    held = model.generate(**inputs, max_new_tokens=6, generation_logits_hook_func=hook, min_new_tokens=3)[0, -6:]
    assert stop not in held[:3].tolist() and held[3:].tolist() == [stop] * 3


def test_output_scores_gives_per_step_confidences(model, processor):
    inputs = encode(processor, "Hello.")
    out = model.generate(**inputs, max_new_tokens=6, output_scores=True, return_dict_in_generate=True,
                         output_history=True, alg_p_threshold=None)
    assert len(out.scores) == out.num_forward_passes == len(out.history)
    assert all(score.shape == (1, 6) for score in out.scores)
    assert torch.isfinite(out.scores[0]).all()  # every slot is masked before the first step
    committed_first = out.history[0][0, -6:] != model.config.mask_token_id
    assert torch.isinf(out.scores[1][0, committed_first]).all()
    with pytest.raises(ValueError, match="output_scores=True needs return_dict_in_generate=True"):
        model.generate(**inputs, output_scores=True)


def test_stop_strings_end_the_answer(model, processor):
    inputs = encode(processor, "Answer.")
    tokenizer = processor.tokenizer
    fixed = tokenizer("The answer is", add_special_tokens=False)["input_ids"]
    template = torch.tensor(fixed + [tokenizer.mask_token_id] * 3)
    out = model.generate(**inputs, response_template=template, stop_strings=["answer"], tokenizer=tokenizer)
    answer = out[0, inputs["input_ids"].shape[1]:]
    assert processor.post_process_image_text_to_text(answer[None]) == ["The answer"]
    assert answer[len(fixed) - 1:].tolist() == [model.config.pad_token_id] * 4


def test_do_sample_without_temperature_samples_at_the_default_temperature(model, processor):
    inputs = encode(processor, "Tell me a story.")
    torch.manual_seed(0)
    implicit = model.generate(**inputs, max_new_tokens=8, do_sample=True, temperature=None, alg="origin")
    torch.manual_seed(0)
    explicit = model.generate(**inputs, max_new_tokens=8, temperature=1.0, alg="origin")
    assert torch.equal(implicit, explicit)
    with pytest.raises(ValueError, match="do_sample=True asks for sampling but temperature=0"):
        model.generate(**inputs, do_sample=True, temperature=0.0)


# --- generate(inputs_embeds=...) (item 4) --------------------------------------------------------------------------


def test_generate_from_text_embeddings_returns_the_answer(model, processor):
    inputs = encode(processor, "Count to five.")
    expected = model.generate(**inputs, max_new_tokens=8)
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    got = model.generate(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], max_new_tokens=8)
    assert torch.equal(got, expected[:, inputs["input_ids"].shape[1]:])


def test_generate_from_embeddings_with_images(model, processor):
    inputs = encode(processor, "Describe it.", images=1)
    expected = model.generate(**inputs, max_new_tokens=8)
    merged = merged_embeddings(model, inputs)
    by_caller = model.generate(input_ids=inputs["input_ids"], inputs_embeds=merged,
                               image_grid_thw=inputs["image_grid_thw"], max_new_tokens=8)
    assert torch.equal(by_caller, expected)
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    by_model = model.generate(inputs_embeds=embeds, pixel_values=inputs["pixel_values"],
                              image_grid_thw=inputs["image_grid_thw"], max_new_tokens=8)
    assert torch.equal(by_model, expected[:, inputs["input_ids"].shape[1]:])


# --- config (item 5) -----------------------------------------------------------------------------------------------


def test_sliding_window_is_refused_not_stored(model):
    with pytest.raises(ValueError, match="use_sliding_window=True is not supported"):
        DimpleConfig(**{**model.config.to_dict(), "use_sliding_window": True})
    config = DimpleConfig(**model.config.to_dict())
    config.use_sliding_window = True
    with pytest.raises(ValueError, match="use_sliding_window=True is not supported"):
        DimpleModel(config)


# --- processor (item 6; issue 15 item 2) ---------------------------------------------------------------------------


def test_processor_declares_no_video_and_accepts_empty_videos(processor):
    assert processor.video_token is None and processor.video_token_id is None
    text = processor.apply_chat_template(chat("Hi."), add_generation_prompt=True)
    plain = processor(text=[text], return_tensors="pt")
    for no_video in ([], None):
        same = processor(text=[text], videos=no_video, return_tensors="pt")
        assert torch.equal(same["input_ids"], plain["input_ids"])
    with pytest.raises(ValueError, match="does not process videos"):
        processor(text=[text], videos=[picture(56, 56)])
    parameters = inspect.signature(type(processor).__call__).parameters
    assert all(parameters[name].annotation is not inspect.Parameter.empty for name in ("images", "text"))
    assert "videos" not in parameters


# --- the bundled checkpoint (item 7) -------------------------------------------------------------------------------


def test_bundled_checkpoint_carries_current_remote_code():
    assert stale_remote_code() == [], "run `python -m dimple.tiny_checkpoint --sync-code`"


def test_bundled_checkpoint_loads_without_the_package(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys
        from PIL import Image
        from transformers import AutoModel, AutoProcessor, AutoTokenizer
        folder = {str(BUNDLED_CHECKPOINT)!r}
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        model = AutoModel.from_pretrained(folder, trust_remote_code=True)
        for loaded in (processor, processor.image_processor, tokenizer, model):
            assert type(loaded).__module__.startswith("transformers_modules"), type(loaded).__module__
        image = Image.open(folder + "/example.png")
        messages = [{{"role": "user", "content": [{{"type": "image", "image": image}},
                                                 {{"type": "text", "text": "Describe the image."}}]}}]
        inputs = processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        out = model.generate(**inputs)
        assert "dimple" not in sys.modules
        print(processor.post_process_image_text_to_text(out[:, inputs["input_ids"].shape[1]:])[0])
        """
    )
    result = run_without_dimple(script, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "two blue circles"
