"""The processor and the image processor: image pads expand to the merged patch count, real PNG and JPEG files go
through both call styles, pixels are CLIP-normalised, batches are padded on the left, videos are refused, and
pictures are held between min_pixels and max_pixels (CPU, offline)."""

import json

import pytest
import torch
from PIL import Image

from dimple.image_processing_dimple import DimpleImageProcessor
from dimple.processing_dimple import DimpleProcessor
from dimple.tiny.build import special_token_ids
from dimple.tokenization_dimple import DimpleTokenizer
from prompts import IMAGE, VIDEO, picture

PATCH_ROW = 3 * 2 * 14 * 14  # channels * temporal_patch_size * patch_size**2


# --------------------------------------------------------------------------------------------------------
# Processor: placeholder expansion, real image files, padding
# --------------------------------------------------------------------------------------------------------


def _runs(ids: list[int], token_id: int) -> list[int]:
    """Lengths of the maximal runs of ``token_id`` in ``ids``, left to right."""
    runs, current = [], 0
    for token in [*ids, None]:
        if token == token_id:
            current += 1
        elif current:
            runs.append(current)
            current = 0
    return runs


def test_image_pads_expand_to_merged_patch_count(processor):
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}]}],
            tokenize=False,
            add_generation_prompt=True,
        ),
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "text", "text": "Describe"}, {"type": "image"}]}],
            tokenize=False,
            add_generation_prompt=True,
        ),
    ]
    images = [picture(100, 60, 1), picture(230, 230, 2), picture(40, 100, 3)]
    out = processor(text=prompts, images=images, videos=None, padding="longest", return_tensors="pt")

    grid = out["image_grid_thw"]
    assert grid.tolist() == [[1, 4, 8], [1, 16, 16], [1, 8, 2]]
    tokens_per_image = (grid.prod(-1) // 4).tolist()
    image_id = special_token_ids(processor.tokenizer)["image_token_id"]
    assert _runs(out["input_ids"][0].tolist(), image_id) == tokens_per_image[:2]
    assert _runs(out["input_ids"][1].tolist(), image_id) == tokens_per_image[2:]
    assert torch.equal(out["mm_token_type_ids"] == 1, out["input_ids"] == image_id)
    assert out["pixel_values"].shape == (int(grid.prod(-1).sum()), PATCH_ROW)


def test_real_png_and_jpeg_files_through_both_call_styles(processor, image_file):
    png = image_file("photo.png", 300, 200, seed=4)
    jpeg = image_file("photo.jpg", 150, 400, seed=5)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "path": str(png)},
                {"type": "image", "image": str(jpeg)},
                {"type": "text", "text": "Compare the two pictures."},
            ],
        }
    ]
    hf_style = processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_tensors="pt", add_generation_prompt=True
    )
    prompt = processor.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, add_vision_id=False
    )
    ref_style = processor(
        text=[prompt],
        images=[Image.open(png), Image.open(jpeg)],
        videos=None,
        padding="longest",
        return_tensors="pt",
    )

    # 300x200 and 150x400 exceed max_pixels = 28*28*64 and are scaled down to multiples of 28.
    assert ref_style["image_grid_thw"].tolist() == [[1, 12, 18], [1, 26, 8]]
    assert ref_style["image_grid_thw"].dtype == torch.int64
    assert ref_style["pixel_values"].shape == (12 * 18 + 26 * 8, PATCH_ROW)
    assert ref_style["pixel_values"].dtype == torch.float32
    assert (ref_style["input_ids"] == processor.image_token_id).sum() == (12 * 18 + 26 * 8) // 4
    assert set(hf_style) == set(ref_style)
    for key in ref_style:
        assert torch.equal(hf_style[key], ref_style[key]), key


def test_pixel_values_are_clip_normalised_channel_major(processor, tmp_path):
    path = tmp_path / "solid.png"
    Image.new("RGB", (56, 84), (200, 100, 50)).save(path)
    out = processor(text=[IMAGE], images=[Image.open(path)], return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 6, 4]]
    mean = (0.48145466, 0.4578275, 0.40821073)
    std = (0.26862954, 0.26130258, 0.27577711)
    block = PATCH_ROW // 3  # columns are ordered (channel, temporal, y, x)
    for channel, value in enumerate((200, 100, 50)):
        expected = (value / 255 - mean[channel]) / std[channel]
        columns = out["pixel_values"][:, channel * block : (channel + 1) * block]
        torch.testing.assert_close(columns, torch.full_like(columns, expected), atol=1e-5, rtol=0)


def test_batches_are_left_padded_even_if_tokenizer_was_saved_right(processor, tmp_path, monkeypatch):
    monkeypatch.setattr(processor.tokenizer, "padding_side", "right")
    processor.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    assert saved["padding_side"] == "right"

    tokenizer = DimpleTokenizer.from_pretrained(tmp_path / "saved")
    assert tokenizer.padding_side == "right"
    reloaded = DimpleProcessor(
        image_processor=DimpleImageProcessor.from_pretrained(tmp_path / "saved"), tokenizer=tokenizer
    )
    assert reloaded.tokenizer.padding_side == "left"

    short = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    long = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image in detail."}]}]
    prompts = [reloaded.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in (short, long)]
    image = picture(64, 64)
    out = reloaded(text=prompts, images=[image, image], videos=None, padding="longest", return_tensors="pt")

    ids, mask = out["input_ids"], out["attention_mask"]
    n_pad = int((mask[0] == 0).sum())
    assert n_pad > 0 and int((mask[1] == 0).sum()) == 0
    assert mask[0].tolist() == [0] * n_pad + [1] * (ids.shape[1] - n_pad)
    assert ids[0, :n_pad].tolist() == [tokenizer.pad_token_id] * n_pad
    # Both prompts end with the generation prompt in the same (last) columns.
    tail = tokenizer("<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
    assert ids[0, -len(tail) :].tolist() == ids[1, -len(tail) :].tolist() == tail


def test_videos_are_refused_not_silently_dropped(processor):
    video = [Image.new("RGB", (56, 56))] * 2
    with pytest.raises(ValueError, match="does not process videos"):
        processor(text=[VIDEO], videos=[video], return_tensors="pt")


# --------------------------------------------------------------------------------------------------------
# Image processor
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("width", "height"), [(20, 100), (100, 27), (5, 5)])
def test_images_smaller_than_28_pixels_raise_one_clear_error(processor, width, height):
    image = picture(width, height)
    message = rf"{width}x{height} .*at least 28x28.*Resize or pad"
    with pytest.raises(ValueError, match=message):
        processor(text=[IMAGE], images=[image], return_tensors="pt")
    with pytest.raises(ValueError, match=message):
        processor.image_processor(image)


def test_28_pixel_image_is_accepted_and_upscaled_to_min_pixels(processor):
    out = processor.image_processor(picture(28, 28), return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 4, 4]]  # 56x56 = min_pixels


def test_min_and_max_pixels_come_from_a_446_preprocessor_config(released_layout_dir):
    min_pixels, max_pixels = 28 * 28 * 9, 28 * 28 * 16
    folder = released_layout_dir(min_pixels, max_pixels)
    image_processor = DimpleImageProcessor.from_pretrained(folder)
    assert image_processor.size["shortest_edge"] == min_pixels
    assert image_processor.size["longest_edge"] == max_pixels

    big = image_processor(picture(640, 480), return_tensors="pt")["image_grid_thw"]
    small = image_processor(picture(28, 28), return_tensors="pt")["image_grid_thw"]
    assert big.tolist() == [[1, 6, 8]]  # 84x112 = 9408 <= max_pixels (class default would give 476x644)
    assert small.tolist() == [[1, 6, 6]]  # 84x84 = 7056 >= min_pixels
    for t, h, w in (big[0].tolist(), small[0].tolist()):
        assert min_pixels <= h * w * 14 * 14 <= max_pixels
