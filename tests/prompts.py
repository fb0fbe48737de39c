"""Prompt material shared by the generation tests: seeded noise pictures and single-turn chats."""

import torch
from PIL import Image


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """A reproducible random RGB picture: real pixels for the image processor, no file needed."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def chat(text: str, images: int = 0) -> list[dict]:
    """One user turn: `images` image placeholders, then the text."""
    content = [{"type": "image"} for _ in range(images)] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def text_batch(processor, texts: list[str]):
    """Single-turn text chats, left-padded into one batch by the processor."""
    prompts = [processor.apply_chat_template(chat(text), add_generation_prompt=True) for text in texts]
    return processor(text=prompts, padding="longest", return_tensors="pt")
