"""What `generate` takes as a prompt: its layout (left padding, the attention mask, no mask token), images that
match their placeholders, token ids and pixel values of the right dtype on any device. Every mistake gets one clear
error naming the fix before any forward pass (the README's *Common errors* table); harmless variants are accepted."""

import pytest
import torch

from dimple.tiny.build import build_tiny_model
from prompts import encode, picture


# --- prompt layout ---------------------------------------------------------------------------------------------


def test_prompt_errors(model, processor):
    inputs = encode(processor, ["Hello.", "A longer prompt here."])
    right_padded = inputs["attention_mask"].flip(1)
    with pytest.raises(ValueError, match="right-padded"):
        model.generate(input_ids=inputs["input_ids"], attention_mask=right_padded)
    with_mask = inputs["input_ids"].clone()
    with_mask[0, -1] = model.config.mask_token_id
    with pytest.raises(ValueError, match="contains the mask token"):
        model.generate(input_ids=with_mask, attention_mask=inputs["attention_mask"])
    with pytest.raises(TypeError, match="unexpected keyword arguments"):
        model.generate(**inputs, not_a_setting=3)


def test_mask_token_inside_the_prompt(model, padded_batch, no_forward):
    ids = padded_batch["input_ids"].clone()
    ids[1, 3] = model.config.mask_token_id
    with pytest.raises(ValueError, match=r"contains the mask token.*response_template"):
        model.generate(input_ids=ids, attention_mask=padded_batch["attention_mask"], max_new_tokens=4)


def test_right_padded_batch_is_refused_not_repadded(model, padded_batch, no_forward):
    """Decision: refuse (re-padding behind the user's back would change what they think they passed)."""
    mask = padded_batch["attention_mask"]
    ids = torch.stack([row.roll(-int((m == 0).sum())) for row, m in zip(padded_batch["input_ids"], mask)])
    with pytest.raises(ValueError, match=r"right-padded.*left-padded \(the processor pads on the left\)"):
        model.generate(input_ids=ids, attention_mask=mask.flip(1), max_new_tokens=4)


def test_padding_between_tokens_and_non_binary_masks_are_refused(model, padded_batch, no_forward):
    holes = padded_batch["attention_mask"].clone()
    holes[1, 2] = 0
    with pytest.raises(ValueError, match="padding between prompt tokens; only left padding"):
        model.generate(input_ids=padded_batch["input_ids"], attention_mask=holes, max_new_tokens=4)
    with pytest.raises(ValueError, match="only 0 .padding. and 1 .token."):
        model.generate(input_ids=padded_batch["input_ids"], attention_mask=padded_batch["attention_mask"] * 2)


def test_missing_attention_mask_with_padding_present(model, padded_batch, no_forward):
    with pytest.raises(ValueError, match=r"pad token .* no attention_mask was given.*pass the attention_mask"):
        model.generate(input_ids=padded_batch["input_ids"], max_new_tokens=4)


def test_missing_attention_mask_without_padding_means_all_tokens(model, processor):
    inputs = encode(processor, ["Hello there."])
    with_mask = model.generate(**inputs, max_new_tokens=6)
    without = model.generate(input_ids=inputs["input_ids"], max_new_tokens=6)
    assert torch.equal(with_mask, without)


# --- images ----------------------------------------------------------------------------------------------------


def test_image_placeholders_without_images_in_generate(model, image_inputs, no_forward):
    with pytest.raises(ValueError, match=r"holds 6 image tokens but no images were given; pass the `pixel_values`"):
        model.generate(input_ids=image_inputs["input_ids"], max_new_tokens=4)
    with pytest.raises(ValueError, match="go together; pass both"):
        model.generate(
            input_ids=image_inputs["input_ids"], image_grid_thw=image_inputs["image_grid_thw"], max_new_tokens=4
        )


def test_images_without_placeholders_in_generate(model, processor, image_inputs, no_forward):
    text_only = encode(processor, ["Describe it."])
    with pytest.raises(ValueError, match="holds 0 image tokens but the images give 6 features"):
        model.generate(
            **text_only, pixel_values=image_inputs["pixel_values"], image_grid_thw=image_inputs["image_grid_thw"]
        )


def test_more_images_than_placeholders_in_generate(model, processor, image_inputs, no_forward):
    two = encode(processor, [("Describe them.", [picture(56, 84), picture(56, 56)])])
    with pytest.raises(ValueError, match="holds 6 image tokens but the images give 10 features"):
        model.generate(**{**image_inputs, "pixel_values": two["pixel_values"], "image_grid_thw": two["image_grid_thw"]})


def test_image_token_count_differs_from_features(model, image_inputs, no_forward):
    ids = image_inputs["input_ids"].clone()
    ids[ids == model.config.image_token_id] = 40  # one image placeholder's tokens replaced by text
    with pytest.raises(ValueError, match="holds 0 image tokens but the images give 6 features"):
        model.generate(**{**image_inputs, "input_ids": ids}, max_new_tokens=4)
    with pytest.raises(ValueError, match=r"pixel_values has shape \(20, 1176\) but image_grid_thw describes 24"):
        model.generate(**{**image_inputs, "pixel_values": image_inputs["pixel_values"][:20]}, max_new_tokens=4)


def test_forward_checks_images_like_generate(model, image_inputs):
    with pytest.raises(ValueError, match="image tokens but no images were given"):
        model(input_ids=image_inputs["input_ids"])


# --- dtypes and devices ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make_ids", "error", "message"),
    [
        (lambda ids: ids.float(), TypeError, "input_ids must hold integer token ids, got dtype torch.float32"),
        (lambda ids: ids.bool(), TypeError, "input_ids must hold integer token ids, got dtype torch.bool"),
        (lambda ids: ids.tolist(), TypeError, 'as a torch.LongTensor, got list; call the processor with return_t'),
        (lambda ids: ids[0], ValueError, r"of shape \(batch, prompt_len\), got \(\d+,\); add a batch dimension"),
        (lambda ids: ids + 1000, ValueError, r"outside the model's vocabulary \[0, 512\)"),
        (lambda ids: ids - 1000, ValueError, r"outside the model's vocabulary .*own processor/tokenizer"),
    ],
)
def test_wrong_input_ids(model, processor, make_ids, error, message, no_forward):
    ids = encode(processor, ["Hello."])["input_ids"]
    with pytest.raises(error, match=message):
        model.generate(input_ids=make_ids(ids), max_new_tokens=4)


def test_integer_ids_of_another_width_and_float_masks_are_cast(model, padded_batch):
    expected = model.generate(**padded_batch, max_new_tokens=6)
    narrow = model.generate(
        input_ids=padded_batch["input_ids"].int(),
        attention_mask=padded_batch["attention_mask"].float(),
        max_new_tokens=6,
    )
    assert narrow.dtype == torch.long and torch.equal(narrow, expected)


def test_pixel_values_dtypes(model, image_inputs):
    expected = model.generate(**image_inputs, max_new_tokens=6)
    double = image_inputs["pixel_values"].double()
    as_double = model.generate(**{**image_inputs, "pixel_values": double}, max_new_tokens=6)
    assert torch.equal(as_double, expected)
    with pytest.raises(TypeError, match="pixel_values must be floating point .*not raw pixels"):
        model.generate(**{**image_inputs, "pixel_values": image_inputs["pixel_values"].to(torch.uint8)})
    with pytest.raises(TypeError, match="image_grid_thw must be integer"):
        model.generate(**{**image_inputs, "image_grid_thw": image_inputs["image_grid_thw"].float()})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_inputs_on_another_device_are_moved_to_the_model(processor, image_inputs):
    model = build_tiny_model(processor)
    expected = model.generate(**image_inputs, max_new_tokens=6)
    model.to("cuda")
    out = model.generate(**image_inputs, max_new_tokens=6)
    assert out.device.type == "cuda"
    assert torch.equal(out.cpu(), expected)
