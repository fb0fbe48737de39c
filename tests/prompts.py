"""Prompt material shared by the tests: placeholders, seeded noise pictures, single-turn chats and their batches."""

import torch
from PIL import Image
from transformers import BatchFeature

# The vision placeholders as a chat template writes them; the processor expands each pad to the picture's tokens.
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """A reproducible random RGB picture: real pixels for the image processor, no file needed."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def chat(text: str, images: int = 0) -> list[dict]:
    """One user turn: `images` image placeholders, then the text."""
    content = [{"type": "image"} for _ in range(images)] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def encode(processor, prompts: list[str | tuple[str, list]]) -> BatchFeature:
    """Single-turn chats, left-padded into one batch by the processor, as a caller of `generate` builds them.

    A prompt is its text, or (text, pictures): the turn gets one placeholder per picture, so the two counts cannot
    disagree by accident (a test of that mismatch calls the processor itself).
    """
    turns = [(prompt, []) if isinstance(prompt, str) else prompt for prompt in prompts]
    texts = [processor.apply_chat_template(chat(text, len(shown)), add_generation_prompt=True) for text, shown in turns]
    images = [image for _, shown in turns for image in shown] or None
    return processor(text=texts, images=images, padding="longest", return_tensors="pt")
