"""Build the tiny Dimple: tokenizer, processor, model config and random model, and write them to a folder.

Same architecture and key layout as Dimple-7B with a few hundred thousand random parameters; everything is built
deterministically and offline, for tests, examples and benchmarks. The tokenizer is a real byte-level BPE with Qwen2
pre-tokenisation (same pre-tokenizer, normaliser and decoder as the released tokenizer) and the real special-token
strings, just with a few hundred tokens, so everything that depends on token strings (chat template, placeholder
expansion, mask token) behaves as with the released checkpoint.
"""

import copy
from collections import Counter
from pathlib import Path

import torch
from tokenizers import pre_tokenizers

from ..configuration_dimple import DimpleConfig
from ..image_processing_dimple import DimpleImageProcessor
from ..modeling_dimple import DimpleModel
from ..processing_dimple import DEFAULT_CHAT_TEMPLATE, DimpleProcessor
from ..tokenization_dimple import DimpleTokenizer
from .bundled import BUNDLED_CHECKPOINT, write_checkpoint

# Special tokens of Qwen2.5 / Dream that Dimple uses, in the order they are appended after the regular
# vocabulary (the released vocabulary has them in the same relative order: 151643, 151644, 151645,
# 151652-151656, 151666).
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|mask|>",
)

DEFAULT_BASE_VOCAB_SIZE = 480
"""256 byte symbols + 224 merges; with the 9 special tokens ``len(tokenizer) == 489``, below a model
vocabulary of 512 (the released model also has padding rows beyond the tokenizer)."""

# Fixed training text for the BPE merges. Plain English around the prompts tests and demos use.
_CORPUS = """\
You are a helpful assistant. Describe the image in detail. What is shown in this picture?
The picture shows a red square on a white background. There is a blue circle next to the square.
Please answer the question with a single word or phrase. What colour is the car in the image?
The car is red. The sky is blue and the grass is green. A small dog is sitting on the grass.
How many people are in the photo? There are two people standing in front of a large building.
Answer the question using a single word. Is there a cat in the image? Yes, there is a cat.
The cat is sleeping on a chair near the window. The window is open and the sun is shining.
Read the text in the image and answer the question. The sign says "Open from 9 to 5".
What time does the shop open? The shop opens at 9 in the morning and closes at 5 in the evening.
Describe the scene: a busy street with cars, buses and people walking on the sidewalk.
The image contains a chart. The chart shows the number of visitors in each month of the year.
Which month has the most visitors? July has the most visitors, with 1200 people in total.
The answer is A. The answer is B. The answer is C. The answer is D. Thus, the answer is 42.
Think step by step. First, count the objects. Then, compare the numbers. Finally, give the answer.
There are three apples and two oranges on the table. The apples are red and the oranges are orange.
A man is riding a bicycle along the river. The water is calm and the trees are tall and green.
The woman in the picture is holding an umbrella because it is raining outside.
This is a photo of a kitchen. There is a table, four chairs, a sink and a white refrigerator.
The children are playing football in the park. One of them is wearing a yellow shirt.
What is written on the board? The board says "Welcome to the meeting" in large letters.
The image is a diagram of the water cycle: evaporation, condensation, precipitation and collection.
Question: what is the main object in the image? Answer: the main object is a wooden table.
Look at the picture carefully and tell me what the people are doing. They are cooking dinner together.
The bottle on the left is taller than the bottle on the right. The left one is made of glass.
In the top left corner of the image there is a clock showing ten past three in the afternoon.
The train is leaving the station. Many passengers are waiting on the platform with their bags.
Provide a short caption for this image: a brown horse standing in a field of yellow flowers.
"""


def _byte_alphabet() -> list[str]:
    """The 256 printable characters byte-level BPE uses for the 256 byte values, in a fixed order."""
    return sorted(pre_tokenizers.ByteLevel.alphabet())


def tiny_vocab_and_merges(
    base_vocab_size: int = DEFAULT_BASE_VOCAB_SIZE,
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a byte-level BPE on the fixed corpus: ``(vocab, merges)`` as in ``vocab.json``/``merges.txt``.

    Pre-tokenisation is Qwen2's (taken from ``Qwen2Tokenizer``, not re-implemented), so the merges are ones
    the real tokenizer pipeline can apply. Training is a plain greedy BPE in Python with ties broken by the
    pair itself, which makes the result independent of the ``tokenizers`` version and of thread counts.
    ``vocab`` has exactly ``base_vocab_size`` entries: ids 0-255 the byte symbols, then one per merge.
    """
    alphabet = _byte_alphabet()
    if base_vocab_size < len(alphabet):
        raise ValueError(f"base_vocab_size must be at least {len(alphabet)} (the byte alphabet), got {base_vocab_size}")
    pre_tokenizer = DimpleTokenizer().backend_tokenizer.pre_tokenizer
    word_counts = Counter(piece for piece, _ in pre_tokenizer.pre_tokenize_str(_CORPUS))
    words = {tuple(word): count for word, count in word_counts.items()}

    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    merges: list[tuple[str, str]] = []
    while len(vocab) < base_vocab_size:
        pair_counts: Counter[tuple[str, str]] = Counter()
        for symbols, count in words.items():
            for pair in zip(symbols, symbols[1:]):
                pair_counts[pair] += count
        if not pair_counts or max(pair_counts.values()) < 2:
            raise ValueError(f"The tiny corpus only supports base_vocab_size <= {len(vocab)}, got {base_vocab_size}")
        best = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))
        merges.append(best)
        merged = best[0] + best[1]
        vocab.setdefault(merged, len(vocab))
        words = {_merge_pair(symbols, best, merged): count for symbols, count in words.items()}
    return vocab, merges


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str], merged: str) -> tuple[str, ...]:
    """Replace every non-overlapping occurrence of ``pair`` in ``symbols`` (left to right) by ``merged``."""
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(merged)
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def build_tiny_tokenizer(base_vocab_size: int = DEFAULT_BASE_VOCAB_SIZE) -> DimpleTokenizer:
    """A tiny ``DimpleTokenizer``: ``base_vocab_size`` BPE tokens, then ``SPECIAL_TOKENS`` in order.

    Token roles follow the released tokenizer: pad and unk ``<|endoftext|>``, bos ``<|im_start|>``, eos
    ``<|im_end|>``, mask ``<|mask|>``, the five vision tokens as extra special tokens. (The model config's
    eos is ``<|endoftext|>``, not the tokenizer's; see ``special_token_ids``.) Left padding, the Dimple chat
    template, and nothing added automatically when encoding.
    """
    vocab, merges = tiny_vocab_and_merges(base_vocab_size)
    tokenizer = DimpleTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token="<|endoftext|>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        mask_token="<|mask|>",
        extra_special_tokens=list(SPECIAL_TOKENS[3:8]),
        added_tokens_decoder={base_vocab_size + i: token for i, token in enumerate(SPECIAL_TOKENS)},
        padding_side="left",
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer


def special_token_ids(tokenizer: DimpleTokenizer) -> dict[str, int]:
    """The token ids a Dimple model config needs, looked up by their real strings in ``tokenizer``.

    ``eos_token_id`` is ``<|endoftext|>`` as in the released model config (the tokenizer's own eos is
    ``<|im_end|>``); ``vision_token_id`` is ``<|vision_pad|>``.
    """
    names = {
        "pad_token_id": "<|endoftext|>",
        "eos_token_id": "<|endoftext|>",
        "image_token_id": "<|image_pad|>",
        "video_token_id": "<|video_pad|>",
        "vision_start_token_id": "<|vision_start|>",
        "vision_end_token_id": "<|vision_end|>",
        "vision_token_id": "<|vision_pad|>",
        "mask_token_id": "<|mask|>",
    }
    vocab = tokenizer.get_vocab()
    return {key: vocab[token] for key, token in names.items()}


def build_tiny_processor(
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 64,
    base_vocab_size: int = DEFAULT_BASE_VOCAB_SIZE,
) -> DimpleProcessor:
    """A ``DimpleProcessor`` with the tiny tokenizer and a small pixel budget (at most 64 image tokens)."""
    image_processor = DimpleImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    return DimpleProcessor(image_processor=image_processor, tokenizer=build_tiny_tokenizer(base_vocab_size))


DECODER_DIMENSIONS: dict[str, int | list[int]] = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, mrope_section=[2, 3, 3],
)
"""The tiny decoder: 2 layers of width 64 over a 512-row vocabulary (the tokenizer's 489 tokens plus padding rows)."""
VISION_DIMENSIONS: dict[str, int | list[int]] = dict(
    depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=48, window_size=56,
    fullatt_block_indexes=[1],
)
"""The tiny vision tower: 2 blocks of width 32, the second with full attention, as in the 7B's pattern."""


def tiny_config(processor: DimpleProcessor, **overrides) -> DimpleConfig:
    """A 2-layer, 64-wide Dimple whose special-token ids are the tiny tokenizer's; `overrides` replace whole fields."""
    values = dict(
        **copy.deepcopy(DECODER_DIMENSIONS),  # copies: the config owns its lists, the dimensions above stay as they are
        max_position_embeddings=2048,
        vision_config=copy.deepcopy(VISION_DIMENSIONS),
        **special_token_ids(processor.tokenizer),
    )
    values.update(overrides)
    return DimpleConfig(**values)


def build_tiny_model(processor: DimpleProcessor, seed: int = 0, **overrides) -> DimpleModel:
    """Random weights from a fixed seed; a peaked LM head so confidences spread like a trained model's."""
    torch.manual_seed(seed)
    model = DimpleModel(tiny_config(processor, **overrides))
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 4.0 / model.config.hidden_size**0.5)
    return model.eval()


def save_tiny_checkpoint(folder: str | Path) -> Path:
    """Write the random tiny model and processor to `folder` (not the bundled, trained checkpoint).

    The folder holds no Python file: importing dimple serves it, and copies of the package's modules would go stale.
    """
    folder = Path(folder)
    if folder.resolve() == BUNDLED_CHECKPOINT:
        raise ValueError(
            "The bundled checkpoint is the trained tiny Dimple; rebuild it with `python -m dimple.tiny train`, "
            "or write the random tiny model to another folder."
        )
    processor = build_tiny_processor()
    return write_checkpoint(folder, build_tiny_model(processor), processor, with_code=False)
