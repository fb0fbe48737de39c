"""Tokenizer, chat template, image processor and processor of Dimple (CPU, offline)."""

import inspect
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from dimple.image_processing_dimple import DimpleImageProcessor
from dimple.processing_dimple import DEFAULT_CHAT_TEMPLATE, DimpleProcessor
from dimple.tiny import (
    SPECIAL_TOKENS,
    build_tiny_processor,
    special_token_ids,
    tiny_vocab_and_merges,
)
from dimple.tokenization_dimple import DimpleTokenizer


SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
PATCH_ROW = 3 * 2 * 14 * 14  # channels * temporal_patch_size * patch_size**2
REPO_ROOT = Path(__file__).resolve().parents[1]
PROCESSOR_CODE_FILES = ("processing_dimple.py", "image_processing_dimple.py", "tokenization_dimple.py")


# --------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------


def test_tiny_tokenizer_special_tokens_follow_the_vocabulary_in_order(tiny_tokenizer):
    base = tiny_tokenizer.vocab_size
    assert [tiny_tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS] == list(
        range(base, base + len(SPECIAL_TOKENS))
    )
    assert len(tiny_tokenizer) == base + len(SPECIAL_TOKENS) <= 512
    assert special_token_ids(tiny_tokenizer) == {
        "pad_token_id": base,
        "eos_token_id": base,
        "image_token_id": base + 6,
        "video_token_id": base + 7,
        "vision_start_token_id": base + 3,
        "vision_end_token_id": base + 4,
        "vision_token_id": base + 5,
        "mask_token_id": base + 8,
    }
    assert tiny_tokenizer.mask_token_id == base + 8
    assert tiny_tokenizer.pad_token_id == base


def test_tiny_tokenizer_encodes_specials_atomically_and_round_trips(tiny_tokenizer):
    text = f"<|im_start|>user\n{IMAGE}Describe the image, please: 42 cats?<|im_end|>\n<|mask|><|mask|>"
    ids = tiny_tokenizer(text)["input_ids"]
    specials = [i for i in ids if i >= tiny_tokenizer.vocab_size]
    assert tiny_tokenizer.convert_ids_to_tokens(specials) == [
        "<|im_start|>",
        "<|vision_start|>",
        "<|image_pad|>",
        "<|vision_end|>",
        "<|im_end|>",
        "<|mask|>",
        "<|mask|>",
    ]
    assert tiny_tokenizer.decode(ids) == text
    # Qwen2 pre-tokenisation: digits are split one by one; BPE merged frequent corpus words.
    assert tiny_tokenizer.tokenize(" 42") == ["Ġ", "4", "2"]
    assert "Ġimage" in tiny_tokenizer.get_vocab()
    # Nothing is added automatically.
    assert tiny_tokenizer("Describe")["input_ids"] == tiny_tokenizer.convert_tokens_to_ids(["Describe"])


def test_tokenizer_defaults_mask_token_and_left_padding():
    vocab, merges = tiny_vocab_and_merges(300)
    tokenizer = DimpleTokenizer(vocab=vocab, merges=merges)
    assert tokenizer.mask_token == "<|mask|>"
    assert tokenizer.mask_token_id == len(tokenizer) - 1
    assert tokenizer.padding_side == "left"
    assert DimpleTokenizer(vocab=vocab, merges=merges, padding_side="right").padding_side == "right"


# --------------------------------------------------------------------------------------------------------
# Chat template
# --------------------------------------------------------------------------------------------------------

CHAT_CASES = {
    "text_only_default_system": (
        [{"role": "user", "content": "What is 2+2?"}],
        False,
        f"{SYSTEM}<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    ),
    "text_items_concatenated": (
        [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": " world"}]}],
        False,
        f"{SYSTEM}<|im_start|>user\nHello world<|im_end|>\n<|im_start|>assistant\n",
    ),
    "one_image": (
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}],
        False,
        f"{SYSTEM}<|im_start|>user\n{IMAGE}Describe the image.<|im_end|>\n<|im_start|>assistant\n",
    ),
    "two_images_text_first": (
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Compare "},
                    {"type": "image", "image": "a.png"},
                    {"type": "text", "text": " and "},
                    {"image_url": {"url": "b.png"}},
                ],
            }
        ],
        False,
        f"{SYSTEM}<|im_start|>user\nCompare {IMAGE} and {IMAGE}<|im_end|>\n<|im_start|>assistant\n",
    ),
    "two_images_with_vision_id": (
        [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Which is bigger?"}],
            }
        ],
        True,
        f"{SYSTEM}<|im_start|>user\nPicture 1: {IMAGE}Picture 2: {IMAGE}Which is bigger?<|im_end|>\n"
        "<|im_start|>assistant\n",
    ),
    "vision_ids_count_across_turns_and_videos": (
        [
            {"role": "user", "content": [{"image": "a.png"}, {"type": "video"}, {"text": "What happens?"}]},
            {"role": "assistant", "content": "A dog runs."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And here?"}]},
        ],
        True,
        f"{SYSTEM}<|im_start|>user\nPicture 1: {IMAGE}Video 1: {VIDEO}What happens?<|im_end|>\n"
        "<|im_start|>assistant\nA dog runs.<|im_end|>\n"
        f"<|im_start|>user\nPicture 2: {IMAGE}And here?<|im_end|>\n<|im_start|>assistant\n",
    ),
    "explicit_system": (
        [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
        ],
        False,
        f"<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\n{IMAGE}Colour?<|im_end|>\n"
        "<|im_start|>assistant\n",
    ),
}


@pytest.mark.parametrize("case", list(CHAT_CASES))
def test_chat_template_renders_exactly(tiny_processor, case):
    messages, add_vision_id, expected = CHAT_CASES[case]
    rendered = tiny_processor.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, add_vision_id=add_vision_id
    )
    assert rendered == expected
    # The tokenizer carries the same template.
    assert (
        tiny_processor.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, add_vision_id=add_vision_id
        )
        == expected
    )


def test_chat_template_without_generation_prompt_closes_every_turn(tiny_processor):
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"},
    ]
    expected = "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
    assert tiny_processor.apply_chat_template(messages, tokenize=False) == expected


def test_explicit_chat_template_is_kept(tiny_processor):
    processor = DimpleProcessor(
        image_processor=tiny_processor.image_processor,
        tokenizer=tiny_processor.tokenizer,
        chat_template="[{{ messages[0]['content'] }}]",
    )
    assert processor.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "[hi]"
    assert tiny_processor.chat_template == DEFAULT_CHAT_TEMPLATE


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


def test_image_pads_expand_to_merged_patch_count(tiny_processor, make_image):
    prompts = [
        tiny_processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}]}],
            tokenize=False,
            add_generation_prompt=True,
        ),
        tiny_processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "text", "text": "Describe"}, {"type": "image"}]}],
            tokenize=False,
            add_generation_prompt=True,
        ),
    ]
    images = [make_image(100, 60, 1), make_image(230, 230, 2), make_image(40, 100, 3)]
    out = tiny_processor(text=prompts, images=images, videos=None, padding="longest", return_tensors="pt")

    grid = out["image_grid_thw"]
    assert grid.tolist() == [[1, 4, 8], [1, 16, 16], [1, 8, 2]]
    tokens_per_image = (grid.prod(-1) // 4).tolist()
    image_id = special_token_ids(tiny_processor.tokenizer)["image_token_id"]
    assert _runs(out["input_ids"][0].tolist(), image_id) == tokens_per_image[:2]
    assert _runs(out["input_ids"][1].tolist(), image_id) == tokens_per_image[2:]
    assert torch.equal(out["mm_token_type_ids"] == 1, out["input_ids"] == image_id)
    assert out["pixel_values"].shape == (int(grid.prod(-1).sum()), PATCH_ROW)


def test_real_png_and_jpeg_files_through_both_call_styles(tiny_processor, write_image):
    png = write_image("photo.png", 300, 200, seed=4)
    jpeg = write_image("photo.jpg", 150, 400, seed=5)
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
    hf_style = tiny_processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_tensors="pt", add_generation_prompt=True
    )
    prompt = tiny_processor.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, add_vision_id=False
    )
    ref_style = tiny_processor(
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
    assert (ref_style["input_ids"] == tiny_processor.image_token_id).sum() == (12 * 18 + 26 * 8) // 4
    assert set(hf_style) == set(ref_style)
    for key in ref_style:
        assert torch.equal(hf_style[key], ref_style[key]), key


def test_pixel_values_are_clip_normalised_channel_major(tiny_processor, tmp_path):
    path = tmp_path / "solid.png"
    Image.new("RGB", (56, 84), (200, 100, 50)).save(path)
    out = tiny_processor(text=[IMAGE], images=[Image.open(path)], return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 6, 4]]
    mean = (0.48145466, 0.4578275, 0.40821073)
    std = (0.26862954, 0.26130258, 0.27577711)
    block = PATCH_ROW // 3  # columns are ordered (channel, temporal, y, x)
    for channel, value in enumerate((200, 100, 50)):
        expected = (value / 255 - mean[channel]) / std[channel]
        columns = out["pixel_values"][:, channel * block : (channel + 1) * block]
        torch.testing.assert_close(columns, torch.full_like(columns, expected), atol=1e-5, rtol=0)


def test_batches_are_left_padded_even_if_tokenizer_was_saved_right(tiny_processor, make_image, tmp_path):
    tiny_processor.tokenizer.padding_side = "right"
    tiny_processor.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    assert saved["padding_side"] == "right"

    tokenizer = DimpleTokenizer.from_pretrained(tmp_path / "saved")
    assert tokenizer.padding_side == "right"
    processor = DimpleProcessor(
        image_processor=DimpleImageProcessor.from_pretrained(tmp_path / "saved"), tokenizer=tokenizer
    )
    assert processor.tokenizer.padding_side == "left"

    short = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    long = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image in detail."}]}]
    prompts = [processor.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in (short, long)]
    image = make_image(64, 64)
    out = processor(text=prompts, images=[image, image], videos=None, padding="longest", return_tensors="pt")

    ids, mask = out["input_ids"], out["attention_mask"]
    n_pad = int((mask[0] == 0).sum())
    assert n_pad > 0 and int((mask[1] == 0).sum()) == 0
    assert mask[0].tolist() == [0] * n_pad + [1] * (ids.shape[1] - n_pad)
    assert ids[0, :n_pad].tolist() == [tokenizer.pad_token_id] * n_pad
    # Both prompts end with the generation prompt in the same (last) columns.
    tail = tokenizer("<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
    assert ids[0, -len(tail) :].tolist() == ids[1, -len(tail) :].tolist() == tail


def test_videos_are_refused_not_silently_dropped(tiny_processor):
    video = [Image.new("RGB", (56, 56))] * 2
    with pytest.raises(ValueError, match="does not process videos"):
        tiny_processor(text=[VIDEO], videos=[video], return_tensors="pt")


# --------------------------------------------------------------------------------------------------------
# Image processor
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("width", "height"), [(20, 100), (100, 27), (5, 5)])
def test_images_smaller_than_28_pixels_raise_one_clear_error(tiny_processor, make_image, width, height):
    image = make_image(width, height)
    message = rf"{width}x{height} .*at least 28x28.*Resize or pad"
    with pytest.raises(ValueError, match=message):
        tiny_processor(text=[IMAGE], images=[image], return_tensors="pt")
    with pytest.raises(ValueError, match=message):
        tiny_processor.image_processor(image)


def test_28_pixel_image_is_accepted_and_upscaled_to_min_pixels(tiny_processor, make_image):
    out = tiny_processor.image_processor(make_image(28, 28), return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 4, 4]]  # 56x56 = min_pixels


def test_min_and_max_pixels_come_from_a_446_preprocessor_config(released_layout_dir, make_image):
    min_pixels, max_pixels = 28 * 28 * 9, 28 * 28 * 16
    folder = released_layout_dir(min_pixels, max_pixels)
    image_processor = DimpleImageProcessor.from_pretrained(folder)
    assert image_processor.size["shortest_edge"] == min_pixels
    assert image_processor.size["longest_edge"] == max_pixels

    big = image_processor(make_image(640, 480), return_tensors="pt")["image_grid_thw"]
    small = image_processor(make_image(28, 28), return_tensors="pt")["image_grid_thw"]
    assert big.tolist() == [[1, 6, 8]]  # 84x112 = 9408 <= max_pixels (class default would give 476x644)
    assert small.tolist() == [[1, 6, 6]]  # 84x84 = 7056 >= min_pixels
    for t, h, w in (big[0].tolist(), small[0].tolist()):
        assert min_pixels <= h * w * 14 * 14 <= max_pixels


# --------------------------------------------------------------------------------------------------------
# Remote code: save_pretrained -> fresh process -> AutoProcessor(trust_remote_code=True)
# --------------------------------------------------------------------------------------------------------


def process_inputs(processor, spec: dict) -> dict:
    """Run both call styles on ``spec``; also run verbatim in the fresh process (via ``inspect.getsource``)."""
    from PIL import Image

    chat = processor.apply_chat_template(
        spec["messages"], tokenize=True, return_dict=True, return_tensors="pt", add_generation_prompt=True
    )
    prompts = [
        processor.apply_chat_template(m, tokenize=False, add_generation_prompt=True, add_vision_id=False)
        for m in spec["batch"]
    ]
    batch = processor(
        text=prompts,
        images=[Image.open(path) for path in spec["batch_images"]],
        videos=None,
        padding="longest",
        return_tensors="pt",
    )
    return {"prompts": prompts, "chat": dict(chat), "batch": dict(batch)}


FRESH_SCRIPT = (
    "import json, sys\nimport torch\nfrom transformers import AutoProcessor\n\n"
    + inspect.getsource(process_inputs)
    + """
folder, spec_path, out_path = sys.argv[1:]
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
result = process_inputs(processor, json.loads(open(spec_path).read()))
result["modules"] = [
    type(processor).__module__,
    type(processor.image_processor).__module__,
    type(processor.tokenizer).__module__,
]
result["padding_side"] = processor.tokenizer.padding_side
result["dimple_imported"] = any(name == "dimple" or name.startswith("dimple.") for name in sys.modules)
result["sys_path"] = list(sys.path)
torch.save(result, out_path)
"""
)


def _spec(tmp_path: Path, write_image) -> Path:
    png = write_image("one.png", 300, 200, seed=7)
    jpeg = write_image("two.jpg", 64, 200, seed=8)
    spec = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Look: "},
                    {"type": "image", "path": str(png)},
                    {"type": "image", "path": str(jpeg)},
                    {"type": "text", "text": "What differs?"},
                ],
            }
        ],
        "batch": [
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}],
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}],
        ],
        "batch_images": [str(jpeg), str(png)],
    }
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def _load_fresh(fresh_python, folder: Path, spec_path: Path, tmp_path: Path) -> dict:
    out_path = tmp_path / "fresh_out.pt"
    fresh_python(FRESH_SCRIPT, str(folder), str(spec_path), str(out_path))
    result = torch.load(out_path)
    assert all(module.startswith("transformers_modules") for module in result["modules"]), result["modules"]
    assert not result["dimple_imported"]
    assert str(REPO_ROOT) not in result["sys_path"]
    return result


def _assert_same_outputs(fresh: dict, local: dict) -> None:
    assert fresh["prompts"] == local["prompts"]
    for style in ("chat", "batch"):
        assert set(fresh[style]) == set(local[style])
        for key, value in local[style].items():
            assert torch.equal(fresh[style][key], value), (style, key)


def test_save_pretrained_round_trips_through_remote_code(tiny_processor, write_image, fresh_python, tmp_path):
    folder = tmp_path / "saved"
    tiny_processor.tokenizer.padding_side = "right"  # as training saved it; loading must still pad left
    tiny_processor.save_pretrained(folder)
    tiny_processor.tokenizer.padding_side = "left"
    for name in PROCESSOR_CODE_FILES:
        assert (folder / name).read_text() == (REPO_ROOT / name).read_text()
    processor_config = json.loads((folder / "processor_config.json").read_text())
    assert processor_config["auto_map"]["AutoProcessor"] == "processing_dimple.DimpleProcessor"
    assert (
        processor_config["image_processor"]["auto_map"]["AutoImageProcessor"]
        == "image_processing_dimple.DimpleImageProcessor"
    )
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tokenizer_config["auto_map"]["AutoTokenizer"] == ["tokenization_dimple.DimpleTokenizer", None]

    spec_path = _spec(tmp_path, write_image)
    fresh = _load_fresh(fresh_python, folder, spec_path, tmp_path)
    assert fresh["padding_side"] == "left"
    local = process_inputs(tiny_processor, json.loads(spec_path.read_text()))
    mask = local["batch"]["attention_mask"]
    assert mask[0, 0] == 0 and mask[:, -1].all()  # the batch really is padded, on the left
    _assert_same_outputs(fresh, local)


def test_released_layout_loads_with_auto_processor(released_layout_dir, write_image, fresh_python, tmp_path):
    min_pixels, max_pixels = 56 * 56, 28 * 28 * 16
    folder = released_layout_dir(min_pixels, max_pixels)
    spec_path = _spec(tmp_path, write_image)
    fresh = _load_fresh(fresh_python, folder, spec_path, tmp_path)
    assert fresh["padding_side"] == "left"
    local = process_inputs(
        build_tiny_processor(min_pixels=min_pixels, max_pixels=max_pixels), json.loads(spec_path.read_text())
    )
    # max_pixels from the file is in force: the 300x200 PNG becomes 112x84, not 252x168 as with the default.
    assert local["chat"]["image_grid_thw"][0].tolist() == [1, 6, 8]
    _assert_same_outputs(fresh, local)
