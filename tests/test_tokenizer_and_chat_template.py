"""The tiny tokenizer and the chat template: special tokens follow the vocabulary in order and encode atomically,
masks and left padding are the defaults, and the template renders Qwen2-VL's prompt format exactly (CPU, offline)."""

import pytest

from dimple.processing_dimple import DEFAULT_CHAT_TEMPLATE, DimpleProcessor
from dimple.tiny.build import SPECIAL_TOKENS, special_token_ids, tiny_vocab_and_merges
from dimple.tokenization_dimple import DimpleTokenizer
from prompts import IMAGE, VIDEO

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


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
def test_chat_template_renders_exactly(processor, case):
    messages, add_vision_id, expected = CHAT_CASES[case]
    rendered = processor.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, add_vision_id=add_vision_id
    )
    assert rendered == expected
    # The tokenizer carries the same template.
    assert (
        processor.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, add_vision_id=add_vision_id
        )
        == expected
    )


def test_chat_template_without_generation_prompt_closes_every_turn(processor):
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"},
    ]
    expected = "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
    assert processor.apply_chat_template(messages, tokenize=False) == expected


def test_explicit_chat_template_is_kept(processor):
    custom = DimpleProcessor(
        image_processor=processor.image_processor,
        tokenizer=processor.tokenizer,
        chat_template="[{{ messages[0]['content'] }}]",
    )
    assert custom.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "[hi]"
    assert processor.chat_template == DEFAULT_CHAT_TEMPLATE
