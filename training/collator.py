"""The chat SFT collator: samples in the released training format, answers padded with `<|endoftext|>`.

Samples follow the released training format (the reference training code's): a system turn, then per user turn
``\\n<|im_start|>user\\n{content}<|im_end|>\\n<|im_start|>assistant\\n`` and per assistant turn its text followed
by one or more ``<|endoftext|>`` pads (no ``<|im_end|>``). Labels are the answer tokens and their pads; the
prompt is never masked or supervised.
"""

import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from PIL import Image

from ..processing_dimple import DEFAULT_SYSTEM_PROMPT
from .losses import IGNORE_INDEX


def padded_answer_length(answer_len: int, rng: random.Random, upper: int | None = None) -> int:
    """Answer length after `<|endoftext|>` padding: uniform in [n + 1, U], so at least one pad follows.

    The released rule: U = 2^ceil(log2(n + 1)) for n < 16, else 16 * (floor(n / 16) + 1). A fixed `upper`
    replaces U (clamped to at least n + 1) so that every canvas length up to the one used for decoding is seen.
    """
    n = answer_len
    if upper is None:
        upper = 2 ** math.ceil(math.log2(n + 1)) if n < 16 else 16 * (n // 16 + 1)
    return rng.randint(n + 1, max(upper, n + 1))


def _content_items(content: str | Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, Sequence) or not all(isinstance(item, Mapping) for item in content):
        raise TypeError("Message content must be a string or a list of {'type': 'text'|'image', ...} dicts.")
    return list(content)


def _is_image_item(item: Mapping[str, Any]) -> bool:
    return item.get("type") == "image" or "image" in item


class DimpleSFTCollator:
    """Turn chat samples into a right-padded training batch: input_ids, attention_mask, labels and images.

    A sample is ``{"messages": [...]}`` with chat-template messages (roles system/user/assistant; content a string
    or a list of ``{"type": "text", "text": ...}`` and ``{"type": "image", "image": PIL.Image}`` items). Each
    assistant turn is followed by ``<|endoftext|>`` pads (`padded_answer_length`); labels are its tokens and pads,
    -100 elsewhere. Images go through the processor's image processor; each becomes
    ``<|vision_start|>`` + one ``<|image_pad|>`` per merged patch + ``<|vision_end|>``.

    Args:
        processor: a `DimpleProcessor`.
        pad_upper: None for the released dynamic padding rule, or a fixed upper bound of the padded answer length
            (e.g. the `max_new_tokens` you decode with).
        seed: seeds the padding lengths, so batches are reproducible.
    """

    def __init__(self, processor: Any, pad_upper: int | None = None, seed: int = 0) -> None:
        if pad_upper is not None and (not isinstance(pad_upper, int) or pad_upper < 2):
            raise ValueError(f"pad_upper must be None or an int >= 2 (answer + one pad), got {pad_upper!r}.")
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.pad_upper = pad_upper
        self.rng = random.Random(seed)
        vocab = self.tokenizer.get_vocab()
        self.pad_id = vocab["<|endoftext|>"]
        self.image_pad_id = vocab["<|image_pad|>"]
        self.merge_area = processor.image_processor.merge_size**2

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def sample_tokens(
        self, messages: Sequence[Mapping[str, Any]], image_tokens: list[int]
    ) -> tuple[list[int], list[int], list[Image.Image]]:
        """(input_ids, labels, images) of one conversation; `image_tokens` gives the pad count per image in order."""
        if not messages or not isinstance(messages, Sequence):
            raise ValueError("A sample needs a non-empty 'messages' list of chat turns.")
        system = DEFAULT_SYSTEM_PROMPT
        if messages[0].get("role") == "system":
            system, messages = "".join(i.get("text", "") for i in _content_items(messages[0]["content"])), messages[1:]
        ids = self.encode(f"<|im_start|>system\n{system}<|im_end|>")
        labels = [IGNORE_INDEX] * len(ids)
        images: list[Image.Image] = []
        answered = False
        for message in messages:
            role = message.get("role")
            if role == "user":
                pieces = ["\n<|im_start|>user\n"]
                for item in _content_items(message["content"]):
                    if _is_image_item(item):
                        if not isinstance(item.get("image"), Image.Image):
                            raise TypeError("Image items must hold a PIL.Image under 'image' (load files first).")
                        count = image_tokens[len(images)]
                        images.append(item["image"])
                        pieces.append("<|vision_start|>" + "<|image_pad|>" * count + "<|vision_end|>")
                    else:
                        pieces.append(item.get("text", ""))
                pieces.append("<|im_end|>\n<|im_start|>assistant\n")
                prompt = self.encode("".join(pieces))
                ids += prompt
                labels += [IGNORE_INDEX] * len(prompt)
            elif role == "assistant":
                text = "".join(item.get("text", "") for item in _content_items(message["content"]))
                answer = self.encode(text)
                answer += [self.pad_id] * (padded_answer_length(len(answer), self.rng, self.pad_upper) - len(answer))
                ids += answer
                labels += answer
                answered = True
            else:
                raise ValueError(f"Unknown role {role!r}; use 'system' (first turn only), 'user' or 'assistant'.")
        if not answered:
            raise ValueError("A training sample needs at least one assistant turn to supervise.")
        return ids, labels, images

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        all_images = [
            item["image"]
            for sample in samples
            for message in self._messages(sample)
            if message.get("role") == "user"
            for item in _content_items(message["content"])
            if _is_image_item(item)
        ]
        vision = {}
        counts: list[int] = []
        if all_images:
            vision = self.processor.image_processor(images=all_images, return_tensors="pt")
            counts = (vision["image_grid_thw"].prod(dim=-1) // self.merge_area).tolist()
        rows, used = [], 0
        for sample in samples:
            ids, labels, images = self.sample_tokens(self._messages(sample), counts[used:])
            used += len(images)
            rows.append((ids, labels))
        width = max(len(ids) for ids, _ in rows)
        batch = {
            "input_ids": torch.full((len(rows), width), self.pad_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
            "labels": torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long),
        }
        for row, (ids, labels) in enumerate(rows):
            batch["input_ids"][row, : len(ids)] = torch.tensor(ids)
            batch["attention_mask"][row, : len(ids)] = 1
            batch["labels"][row, : len(ids)] = torch.tensor(labels)
        if all_images:
            batch["pixel_values"] = vision["pixel_values"]
            batch["image_grid_thw"] = vision["image_grid_thw"]
        return batch

    @staticmethod
    def _messages(sample: Mapping[str, Any]) -> Sequence[Mapping[str, Any]]:
        if not isinstance(sample, Mapping) or "messages" not in sample:
            raise TypeError("Each sample must be a dict with a 'messages' list (chat-template format).")
        return sample["messages"]
