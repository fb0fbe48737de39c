"""Train the tiny Dimple bundled in `tiny/checkpoint/`: `python -m dimple.tiny train` (2 CPU threads, 2-4 minutes).

The task is synthetic and generated on the fly: an 84x84 picture with one to three shapes of one colour and one
kind (circle, square or triangle) in distinct cells of a 3x3 grid, and one of four questions about it (describe,
colour, shape, count). The recipe is Dimple's released training pipeline, scaled down, after a short vision
pretraining that stands in for the pretrained Qwen2.5-VL tower: an autoregressive phase (causal attention, every
weight trained), then a diffusion phase (bidirectional attention, vision tower and projector frozen, as in Dimple's
own diffusion stage). The model has Dimple-7B's architecture and key layout with 3.1 M parameters, and uses the tiny
tokenizer and processor of `dimple.tiny.build`. Everything is seeded and deterministic: example i of a split is
always the same picture and question, and a rerun with the same thread count writes the same weights bit for bit.
"""

import copy
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn
from torch.utils.data import Dataset
from transformers import TrainingArguments

from ..configuration_dimple import DimpleConfig
from ..generation_config_dimple import DimpleGenerationConfig
from ..modeling_dimple import DimpleModel
from ..processing_dimple import DimpleProcessor
from ..training import DimpleSFTCollator, DimpleTrainer
from .build import VISION_DIMENSIONS, build_tiny_processor, tiny_config
from .bundled import write_checkpoint

IMAGE_SIZE = 84
CELL = IMAGE_SIZE // 3
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 40),
}
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = ("one", "two", "three")
QUESTIONS = ("Describe the image.", "What colour are the shapes?", "What shape are they?", "How many shapes are there?")
ANSWER_SLOTS = 12
"""Canvas length the model is trained for (answers are padded to a random length up to this) and evaluated with."""
INIT_STD = 0.06
"""Weight init std. The 7B's 0.02 is tuned for width 3584; at width 64-128 it shrinks the image features through
the vision blocks, merger and projector to ~1e-4 of their variation, and the model ignores the image for hundreds
of steps. ~1/sqrt(width) keeps their scale."""
SPLIT_SEEDS = {"train": 0, "test": 1_000_003}
# The held-out picture saved next to the weights as example.png, which the README's quick start describes.
EXAMPLE_INDEX = 4


def render(rng: random.Random) -> tuple[Image.Image, str, str, int]:
    """A picture of `count` shapes of one colour and kind, each in its own cell of a 3x3 grid, size and offset
    jittered."""
    colour, shape, count = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.randint(1, 3)
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for cell in rng.sample(range(9), count):
        size = rng.randint(14, 22)
        left = (cell % 3) * CELL + rng.randint(1, CELL - size - 1)
        top = (cell // 3) * CELL + rng.randint(1, CELL - size - 1)
        box = (left, top, left + size, top + size)
        if shape == "circle":
            draw.ellipse(box, fill=COLOURS[colour])
        elif shape == "square":
            draw.rectangle(box, fill=COLOURS[colour])
        else:
            draw.polygon([(left + size / 2, top), (left, top + size), (left + size, top + size)], fill=COLOURS[colour])
    return image, colour, shape, count


def example(index: int, split: str = "train") -> dict[str, Any]:
    """Example `index` of a split: ``{"messages": [user turn with image + question, assistant answer], "answer"}``."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"Unknown split {split!r}; use 'train' or 'test'.")
    rng = random.Random(SPLIT_SEEDS[split] + index)
    image, colour, shape, count = render(rng)
    question = rng.choice(QUESTIONS)
    answer = {
        QUESTIONS[0]: f"{COUNT_WORDS[count - 1]} {colour} {shape}{'s' if count > 1 else ''}",
        QUESTIONS[1]: colour,
        QUESTIONS[2]: shape,
        QUESTIONS[3]: str(count),
    }[question]
    user = {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}
    return {"messages": [user, {"role": "assistant", "content": answer}], "answer": answer}


class SyntheticShapes(Dataset):
    """`size` examples of a split, rendered when read (nothing is stored)."""

    def __init__(self, size: int, split: str = "train") -> None:
        self.size, self.split = size, split

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        return example(index, self.split)


def trained_config(processor: DimpleProcessor) -> DimpleConfig:
    """Dimple-7B's architecture at a few million parameters: 6 decoder layers of width 192, the tiny 2-block vision
    tower at twice its width."""
    return tiny_config(
        processor, hidden_size=192, intermediate_size=576, num_hidden_layers=6, num_attention_heads=6,
        num_key_value_heads=2, mrope_section=[4, 6, 6], initializer_range=INIT_STD,
        vision_config={**copy.deepcopy(VISION_DIMENSIONS), "hidden_size": 64, "intermediate_size": 128,
                       "out_hidden_size": 192, "initializer_range": INIT_STD},
    )


def attributes(index: int) -> tuple[Image.Image, list[int]]:
    """Training picture `index` and its (colour, shape, count - 1) class ids, for vision pretraining."""
    image, colour, shape, count = render(random.Random(SPLIT_SEEDS["train"] + index))
    return image, [list(COLOURS).index(colour), SHAPES.index(shape), count - 1]


def pretrain_vision(
    model: DimpleModel, processor: DimpleProcessor, steps: int, batch_size: int, learning_rate: float
) -> list[float]:
    """Teach the random vision tower and projector to see colour, shape and count before any text is involved.

    Stands in for the pretrained Qwen2.5-VL tower the real model starts from: linear heads on the mean of each
    picture's projected image tokens classify its three attributes (the heads are thrown away afterwards).
    Without this step the decoder receives features it cannot yet tell apart and ignores the image for hundreds
    of steps. Returns the losses.
    """
    heads = nn.ModuleList(nn.Linear(model.config.hidden_size, n) for n in (len(COLOURS), len(SHAPES), 3))
    params = [*model.visual.parameters(), *model.img_projector.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 20))
    losses = []
    for step in range(steps):
        images, targets = zip(*(attributes(step * batch_size + i) for i in range(batch_size)))
        vision = processor.image_processor(images=list(images), return_tensors="pt")
        per_image = model.get_image_features(vision["pixel_values"], vision["image_grid_thw"]).pooler_output
        pooled = torch.stack([features.mean(dim=0) for features in per_image])
        labels = torch.tensor(targets)
        loss = sum(F.cross_entropy(head(pooled), labels[:, i]) for i, head in enumerate(heads))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def run_phase(
    model: DimpleModel,
    collator: DimpleSFTCollator,
    objective: str,
    steps: int,
    learning_rate: float,
    batch_size: int,
    seed: int,
    **trainer_kwargs: Any,
) -> list[float]:
    """One training phase with `DimpleTrainer`; returns the logged training losses."""
    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(
            output_dir=output_dir,
            max_steps=steps,
            per_device_train_batch_size=batch_size,
            learning_rate=learning_rate,
            warmup_steps=max(1, steps // 20),
            lr_scheduler_type="cosine",
            weight_decay=0.0,
            logging_steps=max(1, steps // 20),
            save_strategy="no",
            report_to="none",
            seed=seed,
            data_seed=seed,
            dataloader_num_workers=0,
            use_cpu=True,
            disable_tqdm=True,
        )
        trainer = DimpleTrainer(
            model=model,
            args=args,
            train_dataset=SyntheticShapes(steps * batch_size),
            data_collator=collator,
            objective=objective,
            **trainer_kwargs,
        )
        trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def train(
    vision_steps: int = 300,
    ar_steps: int = 400,
    diffusion_steps: int = 600,
    batch_size: int = 16,
    seed: int = 0,
) -> tuple[DimpleModel, DimpleProcessor, dict[str, Any]]:
    """Vision pretraining, AR phase, then diffusion phase (vision tower and projector frozen); eval-mode model."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    processor = build_tiny_processor()
    model = DimpleModel(trained_config(processor))
    collator = DimpleSFTCollator(processor, pad_upper=ANSWER_SLOTS, seed=seed)
    start = time.perf_counter()
    vision_losses = pretrain_vision(model, processor, vision_steps, 2 * batch_size, 3e-3)
    vision_seconds = time.perf_counter() - start
    start = time.perf_counter()
    ar_losses = run_phase(model, collator, "ar", ar_steps, 2e-3, batch_size, seed)
    ar_seconds = time.perf_counter() - start
    for module in (model.visual, model.img_projector):
        module.requires_grad_(False)
    diffusion_losses = run_phase(model, collator, "diffusion", diffusion_steps, 1e-3, batch_size, seed + 1)
    model.requires_grad_(True)
    stats = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "vision_steps": vision_steps,
        "ar_steps": ar_steps,
        "diffusion_steps": diffusion_steps,
        "vision_seconds": vision_seconds,
        "vision_losses": vision_losses,
        "ar_seconds": ar_seconds,
        "diffusion_seconds": time.perf_counter() - start - ar_seconds,
        "ar_losses": ar_losses,
        "diffusion_losses": diffusion_losses,
    }
    model.generation_config = DimpleGenerationConfig(
        max_new_tokens=ANSWER_SLOTS,
        **{key: getattr(model.config, key) for key in ("mask_token_id", "pad_token_id", "eos_token_id")},
    )
    return model.eval(), processor, stats


def save(model: DimpleModel, processor: DimpleProcessor, folder: Path) -> Path:
    """A complete checkpoint (weights, configs, tokenizer/processor files and the remote-code modules they name) plus
    example.png, the held-out picture the README's quick start describes."""

    def add_example(staging: Path) -> None:
        render(random.Random(SPLIT_SEEDS["test"] + EXAMPLE_INDEX))[0].save(staging / "example.png", optimize=True)

    return write_checkpoint(folder, model, processor, with_code=True, extra=add_example)


def summary(stats: dict[str, Any]) -> str:
    """The training report: parameters, then per phase its steps, seconds and first and last loss."""
    lines = [f"parameters: {stats['parameters']:,}"]
    for phase, name in (("vision", "vision pretraining"), ("ar", "AR phase"), ("diffusion", "diffusion phase")):
        losses = stats[f"{phase}_losses"]
        lines.append(f"{name}: {stats[f'{phase}_steps']} steps, {stats[f'{phase}_seconds']:.0f} s, loss "
                     f"{losses[0]:.3f} -> {losses[-1]:.3f}")
    return "\n".join(lines) + "\n"
