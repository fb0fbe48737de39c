"""transformers' standard calling conventions: what generic tooling passes to forward, get_image_features,
generate(inputs_embeds=...), the processor and the config is honoured or refused with a clear error, never silently
ignored (issues 13 and 15). The standard generation keywords are in tests/test_standard_generation_settings.py."""

import inspect
import textwrap

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from dimple import DimpleConfig, DimpleModel
from dimple.tiny.bundled import BUNDLED_CHECKPOINT, stale_remote_code
from isolated import run_without_dimple
from prompts import chat, encode, picture


def merged_embeddings(model, inputs) -> torch.Tensor:
    """The prompt's embeddings with the image features written in, as a caller merging images would build them."""
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    features = torch.cat(model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output)
    image_rows = (inputs["input_ids"] == model.config.image_token_id)[..., None]
    return embeds.masked_scatter(image_rows, features)


# --- forward with inputs_embeds (issue 13 item 1) ------------------------------------------------------------------


@torch.no_grad()
def test_forward_with_inputs_embeds_merges_the_images(model, processor):
    inputs = encode(processor, [("What is in the pictures?", [picture(56, 56), picture(84, 56, 1)])])
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
    positions, _ = model._rope_positions(inputs["input_ids"], inputs["image_grid_thw"], inputs["attention_mask"])
    with_positions = model(inputs_embeds=embeds, position_ids=positions, **vision).logits
    torch.testing.assert_close(with_positions, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(with_positions, text_only, atol=1e-3)


@torch.no_grad()
def test_forward_refuses_pixels_it_cannot_place(model, processor):
    inputs = encode(processor, [("Describe it.", [picture(56, 56)])])
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
    inputs = encode(processor, [("Compare.", [picture(56, 56), picture(84, 56, 1)])])
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


# --- generate(inputs_embeds=...) (item 4) --------------------------------------------------------------------------


def test_generate_from_text_embeddings_returns_the_answer(model, processor):
    inputs = encode(processor, ["Count to five."])
    expected = model.generate(**inputs, max_new_tokens=8)
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    got = model.generate(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], max_new_tokens=8)
    assert torch.equal(got, expected[:, inputs["input_ids"].shape[1]:])


def test_generate_from_embeddings_with_images(model, processor):
    inputs = encode(processor, [("Describe it.", [picture(56, 56)])])
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
    assert stale_remote_code() == [], "run `python -m dimple.tiny sync-code`"


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
